//! Small data the data and eval tests generate: parquet files in a fake Hugging Face cache, and
//! a tiny model directory (a fixture's weights plus a word-level vocabulary).
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, FloatType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

/// A parquet column.
pub enum Col {
    Str(&'static str, Vec<String>),
    I64(&'static str, Vec<i64>),
    I32(&'static str, Vec<i32>),
    F32(&'static str, Vec<f32>),
}

impl Col {
    fn decl(&self) -> String {
        match self {
            Col::Str(n, _) => format!("REQUIRED BYTE_ARRAY {n} (UTF8);"),
            Col::I64(n, _) => format!("REQUIRED INT64 {n};"),
            Col::I32(n, _) => format!("REQUIRED INT32 {n};"),
            Col::F32(n, _) => format!("REQUIRED FLOAT {n};"),
        }
    }
}

/// Writes `cols` as one snappy-compressed row group, as the Hub's files are.
pub fn write_parquet(path: &Path, cols: &[Col]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let decls: String = cols.iter().map(Col::decl).collect::<Vec<_>>().join(" ");
    let schema = Arc::new(parse_message_type(&format!("message schema {{ {decls} }}")).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut w = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut i = 0;
    while let Some(mut c) = rg.next_column().unwrap() {
        match &cols[i] {
            Col::Str(_, v) => {
                let v: Vec<ByteArray> = v
                    .iter()
                    .map(|s| ByteArray::from(s.as_bytes().to_vec()))
                    .collect();
                c.typed::<ByteArrayType>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
            Col::I64(_, v) => {
                c.typed::<Int64Type>().write_batch(v, None, None).unwrap();
            }
            Col::I32(_, v) => {
                c.typed::<Int32Type>().write_batch(v, None, None).unwrap();
            }
            Col::F32(_, v) => {
                c.typed::<FloatType>().write_batch(v, None, None).unwrap();
            }
        }
        c.close().unwrap();
        i += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
}

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Lays `files` (path in the repo → writer) out as a cached snapshot of dataset `repo` at
/// `main`, as `hf-hub` does; returns the snapshot folder.
pub fn fake_hub_dataset(cache: &Path, repo: &str) -> PathBuf {
    let dir = cache.join(format!("datasets--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs/main"), COMMIT).unwrap();
    let snap = dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    snap
}

/// RTE-like rows in the Hub's columns: label ids 0 = entailment, 1 = not_entailment.
pub fn rte_rows(n: usize, labelled: bool) -> Vec<Col> {
    vec![
        Col::Str(
            "sentence1",
            (0..n)
                .map(|i| format!("the cat sat on mat number {i} ."))
                .collect(),
        ),
        Col::Str(
            "sentence2",
            (0..n).map(|i| format!("a cat sat {i}")).collect(),
        ),
        Col::I64(
            "label",
            (0..n)
                .map(|i| if labelled { (i % 2) as i64 } else { -1 })
                .collect(),
        ),
        Col::I32("idx", (0..n as i32).collect()),
    ]
}

const WORDS: &str = "the a an cat dog sat on mat is was not no yes man woman played guitar \
    music good bad movie film great terrible . , ! ? and or but it this that he she they \
    number of in to for with plays playing someone instrument people car red blue green";

/// A model directory: a tiny fixture's config and weights (`tiny-bert`: 3 labels;
/// `tiny-bert-regression`: 1) and a WordPiece vocabulary that fits its 120 embeddings.
pub fn tiny_model(fixture: &str, dest: &Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture)
        .join("model");
    std::fs::create_dir_all(dest).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dest.join(f)).unwrap();
    }
    let mut vocab = vec!["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    vocab.extend(WORDS.split_whitespace());
    for d in ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"] {
        vocab.push(d);
    }
    assert!(vocab.len() <= 120);
    std::fs::write(dest.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    dest.to_path_buf()
}

/// `tiny-roberta`'s weights with a byte-level BPE vocabulary (letters, `Ġ`, punctuation; no
/// merges) that fits its 120 embeddings.
pub fn tiny_roberta(dest: &Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-roberta/model");
    std::fs::create_dir_all(dest).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dest.join(f)).unwrap();
    }
    let mut vocab = vec![
        "<s>".to_string(),
        "<pad>".into(),
        "</s>".into(),
        "<unk>".into(),
        "Ġ".into(),
    ];
    vocab.extend(('a'..='z').map(|c| c.to_string()));
    vocab.extend(['.', ',', '!', '?'].map(|c| c.to_string()));
    vocab.extend(('0'..='9').map(|c| c.to_string()));
    let map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    std::fs::write(dest.join("vocab.json"), Value::Object(map).to_string()).unwrap();
    std::fs::write(dest.join("merges.txt"), "#version: 0.2\n").unwrap();
    dest.to_path_buf()
}

/// An MNLI dev file in GLUE's layout, labels cycling, pairs of varied length.
pub const MNLI_HEAD: &str = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label";

pub fn mnli_dev(path: &Path, n: usize) {
    let labels = ["contradiction", "entailment", "neutral"];
    let mut s = format!("{MNLI_HEAD}\n");
    for i in 0..n {
        let l = labels[i % 3];
        let extra = "the good dog ".repeat(i % 4);
        s += &format!(
            "{i}\t1\t1e\tfiction\t(\t(\t(\t(\tthe man played guitar {i} .\ta man {extra}plays music\t{l}\t{l}\n"
        );
    }
    std::fs::write(path, s).unwrap();
}

/// An SST-2 dev file in GLUE's layout, labels alternating, sentences of varied length.
pub fn sst2_dev(path: &Path, n: usize) {
    let mut s = String::from("sentence\tlabel\n");
    for i in 0..n {
        let extra = "so very good and great ".repeat(i % 3);
        s += &format!("this movie is {extra}bad number {i} .\t{}\n", i % 2);
    }
    std::fs::write(path, s).unwrap();
}
