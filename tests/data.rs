//! Data: the real GLUE and IMDb files give the official row counts; each reader's edge cases
//! (BOM, no header, quotes, bad labels, wrong column counts, empty splits, missing files); the
//! Hub's parquet files from a generated cache; tokenisation and batching.

mod common;
mod datagen;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mpcformer::data::hub::{HubSpec, matching_files, read_parquet};
use mpcformer::data::{
    self, DataError, Dataset, Example, Fields, Label, Order, TASKS, Task, Tokenized, generic, glue,
    plan_batches,
};

fn task(name: &str) -> &'static Task {
    Task::find(name).unwrap()
}

fn no_fields() -> Fields {
    Fields::default()
}

/// Official sizes of every split (GLUE as distributed, and IMDb's 25k/25k).
fn official(task: &str, split: &str) -> Option<usize> {
    Some(match (task, split) {
        ("cola", "train") => 8551,
        ("cola", "dev") => 1043,
        ("cola", "test") => 1063,
        ("sst2", "train") => 67349,
        ("sst2", "dev") => 872,
        ("sst2", "test") => 1821,
        ("mrpc", "train") => 3668,
        ("mrpc", "dev") => 408,
        ("mrpc", "test") => 1725,
        ("stsb", "train") => 5749,
        ("stsb", "dev") => 1500,
        ("stsb", "test") => 1379,
        ("qqp", "train") => 363846,
        ("qqp", "dev") => 40430,
        ("qqp", "test") => 390965,
        ("mnli", "train") => 392702,
        ("mnli", "dev_matched") => 9815,
        ("mnli", "dev_mismatched") => 9832,
        ("mnli", "test_matched") => 9796,
        ("mnli", "test_mismatched") => 9847,
        ("qnli", "train") => 104743,
        ("qnli", "dev") => 5463,
        ("qnli", "test") => 5463,
        ("rte", "train") => 2490,
        ("rte", "dev") => 277,
        ("rte", "test") => 3000,
        ("wnli", "train") => 635,
        ("wnli", "dev") => 71,
        ("wnli", "test") => 146,
        ("imdb", "train") => 25000,
        ("imdb", "test") => 25000,
        _ => return None,
    })
}

fn load_split(task: &'static Task, spec: &Path, split: &str) -> Result<Dataset, DataError> {
    data::load(
        task,
        Some(&spec.to_string_lossy()),
        task.split(split).unwrap(),
        &no_fields(),
    )
}

fn class_counts(d: &Dataset) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for e in &d.examples {
        let c = e.label.unwrap().class().unwrap();
        *m.entry(d.task.labels[c]).or_insert(0) += 1;
    }
    m
}

#[test]
fn every_shared_glue_file_has_the_official_row_count() {
    let Some(root) = common::shared("data/glue") else {
        return;
    };
    let mut checked = Vec::new();
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        let t = Task::find(&dir.file_name().unwrap().to_string_lossy())
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_none_or(|e| e != "tsv") {
                continue;
            }
            let split = f.file_stem().unwrap().to_string_lossy().to_string();
            let want = official(t.name, &split).unwrap_or_else(|| {
                panic!("{}: no official count for {} {split}", f.display(), t.name)
            });
            // Through the folder (the task's file name) and through the file itself.
            let d = load_split(t, &dir, &split).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(d.len(), want, "{}", f.display());
            assert_eq!(
                data::read_file(t, &f, &no_fields()).unwrap().len(),
                want,
                "{}",
                f.display()
            );
            if split != "test" {
                assert!(d.is_labelled(), "{}: unlabelled rows", f.display());
            }
            if t.tsv.text.len() == 2 {
                assert!(d.examples.iter().all(|e| e.text_b.is_some()));
            }
            checked.push(format!("{} {split}", t.title));
        }
    }
    checked.sort();
    eprintln!("checked: {checked:?}");
    assert!(
        checked.len() >= 13,
        "only {} files: {checked:?}",
        checked.len()
    );
}

#[test]
fn shared_glue_contents_are_read_right() {
    let Some(root) = common::shared("data/glue") else {
        return;
    };
    // The GLUE root works as a spec too (RTE/dev.tsv under it).
    let rte = load_split(task("rte"), &root, "dev").unwrap();
    assert_eq!(rte.examples[0].id, "0");
    assert!(
        rte.examples[0]
            .text_a
            .starts_with("Dana Reeve, the widow of the actor")
    );
    assert_eq!(
        rte.examples[0].text_b.as_deref(),
        Some("Christopher Reeve had an accident.")
    );
    assert_eq!(rte.examples[0].label, Some(Label::Class(1))); // not_entailment
    // CoLA: no header, label column 1.
    let cola = load_split(task("cola"), &root, "train").unwrap();
    assert_eq!(
        class_counts(&cola),
        BTreeMap::from([("0", 2528), ("1", 6023)])
    );
    assert_eq!(
        cola.examples[0].text_a,
        "Our friends won't buy this analysis, let alone the next one we propose."
    );
    // MRPC: BOM before the header; quotes are ordinary characters.
    let mrpc = load_split(task("mrpc"), &root, "dev").unwrap();
    assert_eq!(mrpc.examples[0].label, Some(Label::Class(1)));
    assert_eq!(
        mrpc.examples[0].text_b.as_deref(),
        Some("\"The foodservice pie business does not fit our long-term growth strategy.")
    );
    // STS-B: scores 0–5.
    let stsb = load_split(task("stsb"), &root, "dev").unwrap();
    assert_eq!(stsb.examples[1].label, Some(Label::Score(4.75)));
    assert!(
        stsb.examples
            .iter()
            .all(|e| (0.0..=5.0).contains(&e.label.unwrap().score().unwrap()))
    );
    // QNLI: string labels in GLUE's order.
    let qnli = load_split(task("qnli"), &root, "dev").unwrap();
    assert_eq!(qnli.examples[0].label, Some(Label::Class(0)));
    assert_eq!(class_counts(&qnli).len(), 2);
}

#[test]
fn shared_imdb_has_the_official_row_counts() {
    let Some(root) = common::shared("data/imdb") else {
        return;
    };
    let imdb = task("imdb");
    for split in ["train", "test"] {
        let d = load_split(imdb, &root, split).unwrap();
        assert_eq!(Some(d.len()), official("imdb", split));
        assert_eq!(
            class_counts(&d),
            BTreeMap::from([("neg", 12500), ("pos", 12500)])
        );
        assert!(
            d.examples.iter().all(|e| !e.text_a.contains("<br")),
            "{split}: <br /> left"
        );
    }
    // `--split dev` means IMDb's evaluation split, test.
    let splits = imdb.resolve_splits("dev").unwrap();
    assert_eq!(splits.iter().map(|s| s.name).collect::<Vec<_>>(), ["test"]);
}

// ---------------------------------------------------------------- registry

#[test]
fn registry_knows_every_task() {
    let names: Vec<&str> = TASKS.iter().map(|t| t.name).collect();
    for n in [
        "cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "imdb",
    ] {
        assert!(names.contains(&n), "{n}");
    }
    assert_eq!(task("SST-2").name, "sst2");
    assert_eq!(task("sts_b").name, "stsb");
    assert!(Task::find("squad").unwrap_err().contains("known tasks"));
    assert_eq!(
        task("mnli").labels,
        ["contradiction", "entailment", "neutral"]
    );
    assert_eq!(task("rte").labels, ["entailment", "not_entailment"]);
    assert_eq!(task("qnli").labels, ["entailment", "not_entailment"]);
    assert!(task("stsb").is_regression());
    assert_eq!(task("stsb").num_outputs(), 1);
    assert_eq!(task("imdb").max_len, 512);
    assert_eq!(task("rte").max_len, 128);
    let mnli: Vec<&str> = task("mnli")
        .resolve_splits("dev")
        .unwrap()
        .iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(mnli, ["dev_matched", "dev_mismatched"]);
    let mnli_test: Vec<Option<&str>> = task("mnli")
        .resolve_splits("test")
        .unwrap()
        .iter()
        .map(|s| s.submission)
        .collect();
    assert_eq!(mnli_test, [Some("MNLI-m.tsv"), Some("MNLI-mm.tsv")]);
    assert_eq!(task("rte").split("validation").unwrap().name, "dev");
    assert!(task("rte").split("dev_matched").is_err());
}

#[test]
fn hub_label_ids_follow_the_hubs_order() {
    let mnli = task("mnli");
    // The Hub's MNLI ids: 0 entailment, 1 neutral, 2 contradiction.
    assert_eq!(mnli.label_from_hub_id(0).unwrap(), Some(Label::Class(1)));
    assert_eq!(mnli.label_from_hub_id(1).unwrap(), Some(Label::Class(2)));
    assert_eq!(mnli.label_from_hub_id(2).unwrap(), Some(Label::Class(0)));
    assert_eq!(mnli.label_from_hub_id(-1).unwrap(), None);
    assert!(mnli.label_from_hub_id(3).is_err());
    assert_eq!(mnli.label_from_text("neutral").unwrap(), Label::Class(2));
    assert_eq!(mnli.label_from_text("0").unwrap(), Label::Class(1));
    assert_eq!(task("sst2").label_from_text("1").unwrap(), Label::Class(1));
}

// ---------------------------------------------------------------- GLUE TSV edge cases

fn tsv(task_name: &str, text: &str) -> Result<Vec<Example>, DataError> {
    glue::parse_tsv(task(task_name), Path::new("x/dev.tsv"), text, &no_fields())
}

#[test]
fn tsv_bom_before_the_header_is_ignored() {
    let text = "\u{feff}Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA b.\tC d.\n";
    let ex = tsv("mrpc", text).unwrap();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].label, Some(Label::Class(1)));
    assert_eq!(ex[0].text_a, "A b.");
}

#[test]
fn tsv_cola_has_no_header_and_its_test_file_has_one() {
    let ex = tsv(
        "cola",
        "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode sailors the.",
    )
    .unwrap();
    assert_eq!(
        ex.len(),
        2,
        "the first line is data, and no trailing newline is needed"
    );
    assert_eq!(ex[1].text_a, "Rode sailors the.");
    assert_eq!(ex[1].label, Some(Label::Class(0)));
    let test = tsv(
        "cola",
        "index\tsentence\n0\tBill whistled.\n1\tBill sang.\n",
    )
    .unwrap();
    assert_eq!(test.len(), 2);
    assert_eq!(test[1].id, "1");
    assert!(test.iter().all(|e| e.label.is_none()));
}

#[test]
fn tsv_quotes_are_ordinary_characters() {
    let text = "index\tsentence1\tsentence2\tlabel\n\
                0\tHe said \"hi\tand left.\tentailment\n\
                1\t\"unbalanced\t'x' \"\"\tnot_entailment\n";
    let ex = tsv("rte", text).unwrap();
    assert_eq!(ex[0].text_a, "He said \"hi");
    assert_eq!(ex[0].text_b.as_deref(), Some("and left."));
    assert_eq!(ex[1].text_a, "\"unbalanced");
    assert_eq!(ex[1].text_b.as_deref(), Some("'x' \"\""));
}

#[test]
fn tsv_crlf_line_ends_are_accepted() {
    let ex = tsv("sst2", "sentence\tlabel\r\ngood film \t1\r\nbad\t0\r\n").unwrap();
    assert_eq!(ex[0].label, Some(Label::Class(1)));
    assert_eq!(ex[1].label, Some(Label::Class(0)));
}

#[test]
fn tsv_bad_label_names_file_and_line() {
    let text = "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n";
    let e = tsv("rte", text).unwrap_err().to_string();
    assert!(e.starts_with("x/dev.tsv:3: "), "{e}");
    assert!(
        e.contains("unknown label `neutral`") && e.contains("entailment, not_entailment"),
        "{e}"
    );
    let e = tsv(
        "stsb",
        "index\tsentence1\tsentence2\tscore\n0\ta\tb\tfive\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("x/dev.tsv:2: unparsable score `five`"), "{e}");
    let e = tsv("cola", "gj04\t1\t\tok.\ngj04\tyes\t\tnot ok.\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("x/dev.tsv:2: unknown label `yes`"), "{e}");
}

#[test]
fn tsv_wrong_column_count_names_file_and_line() {
    let text = "sentence\tlabel\nfine\t1\nan extra\ttab\t1\n";
    let e = tsv("sst2", text).unwrap_err().to_string();
    assert_eq!(
        e,
        "x/dev.tsv:3: 3 tab-separated fields, expected 2 as in the header"
    );
    let e = tsv("cola", "gj04\t1\t\tok.\ngj04\t1\tok.\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("x/dev.tsv:2: 3 tab-separated fields, expected 4"),
        "{e}"
    );
    let e = tsv("rte", "just some text\n").unwrap_err().to_string();
    assert!(
        e.starts_with("x/dev.tsv:1: expected a header naming the columns sentence1, sentence2"),
        "{e}"
    );
}

#[test]
fn tsv_test_files_have_no_label_column() {
    let ex = tsv("rte", "index\tsentence1\tsentence2\n0\ta\tb\n7\tc\td\n").unwrap();
    assert!(ex.iter().all(|e| e.label.is_none()));
    assert_eq!(ex[1].id, "7");
    let q = tsv("qqp", "id\tquestion1\tquestion2\n5\tWhy?\tHow?\n").unwrap();
    assert_eq!(q[0].id, "5");
    assert_eq!(q[0].text_b.as_deref(), Some("How?"));
}

#[test]
fn tsv_mnli_reads_gold_label_among_many_columns() {
    let head = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label";
    let row = "0\t1\t2\tfiction\t(\t(\t(\t(\tA man.\tA person.\tentailment\tentailment\tneutral\tentailment\tentailment\tentailment";
    let ex = tsv("mnli", &format!("{head}\n{row}\n")).unwrap();
    assert_eq!(ex[0].label, Some(Label::Class(1)));
    assert_eq!(ex[0].text_b.as_deref(), Some("A person."));
}

fn temp_glue(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

#[test]
fn empty_split_is_an_error() {
    let dir = temp_glue(&[("RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n")]);
    let e = load_split(task("rte"), dir.path(), "dev")
        .unwrap_err()
        .to_string();
    assert!(e.contains("RTE dev has no examples (empty split)"), "{e}");
    assert!(e.contains("RTE/dev.tsv"), "{e}");
    let dir = temp_glue(&[("dev.jsonl", "\n\n")]);
    let e = load_split(task("sst2"), dir.path(), "dev")
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty split"), "{e}");
}

#[test]
fn missing_file_names_the_paths_tried_and_the_expected_names() {
    let dir = temp_glue(&[(
        "RTE/train.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n",
    )]);
    let e = load_split(task("rte"), dir.path(), "dev")
        .unwrap_err()
        .to_string();
    let tried = dir.path().join("RTE").join("dev.tsv");
    assert!(e.contains(&tried.display().to_string()), "{e}");
    assert!(e.contains("train.tsv, dev.tsv, test.tsv"), "{e}");
    let e = data::load(
        task("rte"),
        Some("/no/such/place"),
        task("rte").split("dev").unwrap(),
        &no_fields(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("/no/such/place") && e.contains("no such file"),
        "{e}"
    );
    let e = load_split(task("mnli"), dir.path(), "dev_matched")
        .unwrap_err()
        .to_string();
    assert!(e.contains("dev_matched.tsv, dev_mismatched.tsv"), "{e}");
}

// ---------------------------------------------------------------- IMDb, JSONL, CSV

#[test]
fn acl_imdb_folder_is_read_in_label_then_number_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("aclImdb");
    for (class, files) in [
        (
            "pos",
            vec![
                ("10_9.txt", "Great.<br /><br />Loved it"),
                ("2_8.txt", "Fine"),
            ],
        ),
        (
            "neg",
            vec![("0_2.txt", "Bad"), ("1_1.txt", "Awful<br />film")],
        ),
    ] {
        let d = root.join("test").join(class);
        std::fs::create_dir_all(&d).unwrap();
        for (n, t) in files {
            std::fs::write(d.join(n), t).unwrap();
        }
    }
    // The folder above aclImdb/ works too.
    let d = load_split(task("imdb"), dir.path(), "test").unwrap();
    let ids: Vec<&str> = d.examples.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "test/neg/0_2.txt",
            "test/neg/1_1.txt",
            "test/pos/2_8.txt",
            "test/pos/10_9.txt"
        ]
    );
    assert_eq!(d.examples[1].text_a, "Awful film");
    assert_eq!(d.examples[3].text_a, "Great.  Loved it");
    assert_eq!(d.examples[3].label, Some(Label::Class(1)));
    let e = load_split(task("imdb"), dir.path(), "train")
        .unwrap_err()
        .to_string();
    assert!(e.contains("aclImdb/{train,test}/{pos,neg}"), "{e}");
}

#[test]
fn jsonl_reads_hub_field_names_and_label_forms() {
    let p = Path::new("rte.jsonl");
    let text = r#"{"sentence1": "a", "sentence2": "b", "label": 0, "idx": 4}

{"sentence1": "c", "sentence2": "d", "label": "not_entailment", "idx": 5}
"#;
    let ex = generic::parse_jsonl(task("rte"), p, text, &no_fields()).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].label, Some(Label::Class(0)));
    assert_eq!(ex[1].label, Some(Label::Class(1)));
    assert_eq!(ex[1].id, "5");
    // MNLI integer labels are the Hub's ids.
    let ex = generic::parse_jsonl(
        task("mnli"),
        p,
        r#"{"premise": "p", "hypothesis": "h", "label": 2}"#,
        &no_fields(),
    )
    .unwrap();
    assert_eq!(ex[0].label, Some(Label::Class(0)), "2 = contradiction");
    // IMDb's shared form: text, label, id; <br /> becomes a space.
    let ex = generic::parse_jsonl(
        task("imdb"),
        p,
        r#"{"text": "One<br />two", "label": 1, "id": "test/pos/0_10.txt", "rating": 10}"#,
        &no_fields(),
    )
    .unwrap();
    assert_eq!(ex[0].text_a, "One two");
    assert_eq!(ex[0].id, "test/pos/0_10.txt");
}

#[test]
fn jsonl_custom_fields_and_errors() {
    let p = Path::new("my.jsonl");
    let fields = Fields {
        text: vec!["review".into()],
        label: Some("stars".into()),
    };
    let ex = generic::parse_jsonl(
        task("sst2"),
        p,
        r#"{"review": "nice", "stars": 1}"#,
        &fields,
    )
    .unwrap();
    assert_eq!(ex[0].text_a, "nice");
    assert_eq!(ex[0].label, Some(Label::Class(1)));
    let e = generic::parse_jsonl(
        task("sst2"),
        p,
        "{\"review\": \"x\", \"stars\": 1}\n{\"text\": \"y\"}",
        &fields,
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("my.jsonl:2: no field `review`"), "{e}");
    let e = generic::parse_jsonl(
        task("sst2"),
        p,
        "{\"review\": \"x\", \"stars\": 7}",
        &fields,
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("my.jsonl:1: unknown label `7`"), "{e}");
    let e = generic::parse_jsonl(
        task("sst2"),
        p,
        "{\"review\": \"x\", \"stars\": 1}\n{oops",
        &fields,
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("my.jsonl:2: invalid JSON"), "{e}");
    let e = generic::parse_jsonl(
        task("sst2"),
        p,
        "{\"review\": \"x\", \"stars\": 1}\n{\"review\": \"y\"}",
        &fields,
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("my.jsonl:2: no label (field `stars`)"), "{e}");
    // Unlabelled throughout: a test split.
    let ex = generic::parse_jsonl(task("sst2"), p, "{\"review\": \"x\"}", &fields).unwrap();
    assert_eq!(ex[0].label, None);
}

#[test]
fn csv_is_quoted_and_labels_may_be_names_or_ids() {
    let p = Path::new("d.csv");
    let text =
        "\u{feff}premise,hypothesis,label\n\"A, quoted \"\"one\"\"\",h1,neutral\np2,h2,0\np3,h3,\n";
    let e = generic::parse_csv(task("mnli"), p, text, &no_fields())
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("d.csv:4: no label"), "{e}");
    let ex =
        generic::parse_csv(task("mnli"), p, &text.replace("p3,h3,\n", ""), &no_fields()).unwrap();
    assert_eq!(ex[0].text_a, "A, quoted \"one\"");
    assert_eq!(ex[0].label, Some(Label::Class(2)));
    assert_eq!(
        ex[1].label,
        Some(Label::Class(1)),
        "0 = entailment in the Hub's order"
    );
    let e = generic::parse_csv(
        task("mnli"),
        p,
        "premise,hypothesis,label\na,b\n",
        &no_fields(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("d.csv:2: 2 fields, expected 3"), "{e}");
    let e = generic::parse_csv(task("mnli"), p, "premise,label\na,b\n", &no_fields())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no column `hypothesis`"), "{e}");
    let stsb = generic::parse_csv(
        task("stsb"),
        p,
        "sentence1,sentence2,label\na,b,3.2\n",
        &no_fields(),
    )
    .unwrap();
    assert_eq!(stsb[0].label, Some(Label::Score(3.2)));
}

#[test]
fn a_folder_of_split_files_in_other_formats_works() {
    let dir = temp_glue(&[(
        "sst2/validation.jsonl",
        "{\"sentence\": \"good\", \"label\": 1}\n{\"sentence\": \"bad\", \"label\": 0}\n",
    )]);
    let d = load_split(task("sst2"), dir.path(), "dev").unwrap();
    assert_eq!(d.len(), 2);
    assert!(d.source.ends_with("validation.jsonl"), "{}", d.source);
}

// ---------------------------------------------------------------- Hub parquet

#[test]
fn hub_specs_parse() {
    let h = HubSpec::parse("hub:nyu-mll/glue/rte").unwrap();
    assert_eq!(
        (h.repo.as_str(), h.config.as_deref(), h.revision.as_str()),
        ("nyu-mll/glue", Some("rte"), "main")
    );
    let h = HubSpec::parse("stanfordnlp/imdb@abc").unwrap();
    assert_eq!((h.config, h.revision.as_str()), (None, "abc"));
    assert!(HubSpec::parse("hub:imdb").is_err());
    assert!(HubSpec::parse("hub:a/b/c/d").is_err());
}

#[test]
fn hub_file_layouts_are_matched() {
    let files: Vec<String> = [
        "README.md",
        "rte/train-00000-of-00001.parquet",
        "rte/validation-00000-of-00001.parquet",
        "rte/test-00000-of-00001.parquet",
        "mnli/validation_matched-00000-of-00001.parquet",
        "mnli/validation_mismatched-00000-of-00001.parquet",
        "mnli_matched/validation-00000-of-00001.parquet",
        "cola/validation/0000.parquet",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(
        matching_files(&files, Some("rte"), "validation").unwrap(),
        ["rte/validation-00000-of-00001.parquet"]
    );
    assert_eq!(
        matching_files(&files, Some("mnli"), "validation_matched").unwrap(),
        ["mnli/validation_matched-00000-of-00001.parquet"]
    );
    assert_eq!(
        matching_files(&files, Some("cola"), "validation").unwrap(),
        ["cola/validation/0000.parquet"]
    );
    let e = matching_files(&files, None, "validation").unwrap_err();
    assert!(e.contains("several configs"), "{e}");
    assert!(
        matching_files(&files, Some("qqp"), "validation")
            .unwrap_err()
            .contains("no parquet file")
    );
    let imdb = [
        "plain_text/train-00000-of-00001.parquet",
        "plain_text/unsupervised-00000-of-00001.parquet",
    ]
    .map(String::from);
    assert_eq!(
        matching_files(&imdb, None, "train").unwrap(),
        ["plain_text/train-00000-of-00001.parquet"]
    );
}

#[test]
fn hub_parquet_from_the_cache_reads_offline() {
    let cache = tempfile::tempdir().unwrap();
    let snap = datagen::fake_hub_dataset(cache.path(), "nyu-mll/glue");
    datagen::write_parquet(
        &snap.join("rte/validation-00000-of-00001.parquet"),
        &datagen::rte_rows(5, true),
    );
    datagen::write_parquet(
        &snap.join("rte/test-00000-of-00001.parquet"),
        &datagen::rte_rows(3, false),
    );
    let spec = HubSpec::parse("hub:nyu-mll/glue/rte").unwrap();
    let files = spec
        .split_files_in("validation", cache.path(), true)
        .unwrap();
    assert_eq!(files.len(), 1);
    let ex = read_parquet(&files[0], task("rte"), &no_fields()).unwrap();
    assert_eq!(ex.len(), 5);
    assert_eq!(ex[3].text_a, "the cat sat on mat number 3 .");
    assert_eq!(ex[3].text_b.as_deref(), Some("a cat sat 3"));
    assert_eq!(ex[3].label, Some(Label::Class(1)));
    assert_eq!(ex[4].id, "4");
    let test = spec.split_files_in("test", cache.path(), true).unwrap();
    let ex = read_parquet(&test[0], task("rte"), &no_fields()).unwrap();
    assert!(ex.iter().all(|e| e.label.is_none()), "-1 = unlabelled");
    // Not cached and offline: says so.
    let e = spec
        .split_files_in("train", cache.path(), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    let e = HubSpec::parse("hub:stanfordnlp/imdb")
        .unwrap()
        .split_files_in("test", cache.path(), true);
    assert!(e.is_err());
}

#[test]
fn parquet_files_read_directly_and_check_columns() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("validation.parquet");
    datagen::write_parquet(
        &p,
        &[
            datagen::Col::Str("sentence1", vec!["a".into(), "b".into()]),
            datagen::Col::Str("sentence2", vec!["c".into(), "d".into()]),
            datagen::Col::F32("label", vec![4.5, 0.25]),
            datagen::Col::I32("idx", vec![10, 11]),
        ],
    );
    let d = load_split(task("stsb"), &p, "dev").unwrap();
    assert_eq!(d.examples[0].label, Some(Label::Score(4.5)));
    assert_eq!(d.examples[1].id, "11");
    let e = read_parquet(&p, task("qqp"), &no_fields())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no column `question1`") && e.contains("sentence1"),
        "{e}"
    );
    std::fs::write(dir.path().join("bad.parquet"), b"not parquet").unwrap();
    let e = read_parquet(&dir.path().join("bad.parquet"), task("rte"), &no_fields()).unwrap_err();
    assert!(e.to_string().contains("not a readable parquet file"), "{e}");
}

// ---------------------------------------------------------------- tokenise and batch

#[test]
fn eval_batches_keep_every_example_longest_first() {
    let lengths = [5, 9, 3, 9, 1, 7, 2];
    let b = plan_batches(&lengths, 3, Order::ByLength, false);
    assert_eq!(b, vec![vec![1, 3, 5], vec![0, 2, 6], vec![4]]);
    let seq = plan_batches(&lengths, 3, Order::Sequential, false);
    assert_eq!(seq, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
    assert_eq!(plan_batches(&lengths, 3, Order::Sequential, true).len(), 2);
}

#[test]
fn shuffling_is_deterministic_from_the_seed() {
    let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 50 + 1).collect();
    for bucket in [0, 4] {
        let a = plan_batches(&lengths, 8, Order::Shuffle { seed: 42, bucket }, false);
        let b = plan_batches(&lengths, 8, Order::Shuffle { seed: 42, bucket }, false);
        let c = plan_batches(&lengths, 8, Order::Shuffle { seed: 43, bucket }, false);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert_eq!(a.last().unwrap().len(), 103 % 8, "partial batch last");
        let dropped = plan_batches(&lengths, 8, Order::Shuffle { seed: 42, bucket }, true);
        assert_eq!(dropped.len(), 103 / 8);
        assert!(dropped.iter().all(|b| b.len() == 8));
        assert_ne!(a.concat(), (0..103).collect::<Vec<_>>(), "shuffled");
    }
    // Bucketing: each batch is sorted by length (less padding).
    let a = plan_batches(&lengths, 8, Order::Shuffle { seed: 1, bucket: 4 }, false);
    for b in &a {
        assert!(b.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
    }
}

fn minilm() -> Option<PathBuf> {
    common::shared("models/all-MiniLM-L6-v2")
}

#[test]
fn tokenized_pairs_truncate_longest_first_and_pad_to_the_batch() {
    let Some(dir) = minilm() else { return };
    let tok = mpcformer::tokenize::TextTokenizer::from_dir(&dir, 16).unwrap();
    let long = "one two three four five six seven eight nine ten eleven twelve thirteen";
    let d = Dataset {
        task: task("rte"),
        split: "dev".into(),
        source: "test".into(),
        examples: vec![
            Example {
                text_a: long.into(),
                text_b: Some("a short one".into()),
                label: Some(Label::Class(0)),
                id: "0".into(),
            },
            Example {
                text_a: "hello".into(),
                text_b: Some("world".into()),
                label: Some(Label::Class(1)),
                id: "1".into(),
            },
        ],
    };
    let t = Tokenized::new(&d, &tok).unwrap();
    assert_eq!(t.truncated, 1);
    // Same ids as encoding one by one.
    for (e, enc) in d.examples.iter().zip(&t.encoded) {
        assert_eq!(
            enc.ids,
            tok.encode(&e.text_a, e.text_b.as_deref()).unwrap().ids
        );
    }
    let first = &t.encoded[0];
    assert_eq!(first.ids.len(), 16);
    // Longest-first: the short second sentence is intact ([CLS] a(10) [SEP] b(3) [SEP]).
    assert_eq!(first.type_ids.iter().filter(|&&x| x == 1).count(), 4);
    let b = t.batch(&[1, 0]);
    assert_eq!((b.inputs.batch, b.inputs.seq), (2, 16));
    assert_eq!(b.labels, Some(vec![Label::Class(1), Label::Class(0)]));
    assert_eq!(b.class_ids(), Some(vec![1, 0]));
    assert_eq!(b.scores(), None);
    let short = t.batch(&[1]);
    assert_eq!(
        short.inputs.seq,
        t.encoded[1].ids.len(),
        "padded to the longest in the batch"
    );
}

#[test]
fn a_sample_is_uniform_in_file_order_and_the_same_for_every_run() {
    use mpcformer::data::{Dataset, Example, Label, Task};
    // IMDb's files are sorted by label: a head would hold one class only.
    let sorted = || Dataset {
        task: Task::find("imdb").unwrap(),
        split: "test".into(),
        source: "synthetic".into(),
        examples: (0..10_000)
            .map(|i| Example {
                text_a: format!("review {i}"),
                text_b: None,
                label: Some(Label::Class(usize::from(i >= 5_000))),
                id: i.to_string(),
            })
            .collect(),
    };
    let mut a = sorted();
    a.sample(1_000);
    assert_eq!(a.len(), 1_000);
    let ids: Vec<usize> = a.examples.iter().map(|e| e.id.parse().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "file order, no repeats"
    );
    let positives = a
        .examples
        .iter()
        .filter(|e| e.label == Some(Label::Class(1)))
        .count();
    // Hypergeometric: mean 500, std ≈ 15; six std either side.
    assert!((410..=590).contains(&positives), "{positives} positives");
    let mut b = sorted();
    b.sample(1_000);
    assert_eq!(a.examples, b.examples, "the same subset every time");
    let mut c = sorted();
    c.sample(20_000);
    assert_eq!(c.len(), 10_000, "asking for more keeps everything");

    // Held-out examples (`data.select_examples`): taken out of the set, both labels, the same
    // every time, and another draw than the sample's.
    let mut rest = sorted();
    let held = rest.hold_out(1_000);
    assert_eq!((held.len(), rest.len()), (1_000, 9_000));
    let held_ids: Vec<usize> = held
        .examples
        .iter()
        .map(|e| e.id.parse().unwrap())
        .collect();
    let rest_ids: std::collections::BTreeSet<usize> = rest
        .examples
        .iter()
        .map(|e| e.id.parse().unwrap())
        .collect();
    assert!(held_ids.windows(2).all(|w| w[0] < w[1]));
    assert!(held_ids.iter().all(|i| !rest_ids.contains(i)), "disjoint");
    assert_eq!(rest_ids.len() + held_ids.len(), 10_000, "nothing lost");
    let held_pos = held
        .examples
        .iter()
        .filter(|e| e.label == Some(Label::Class(1)))
        .count();
    assert!(
        (410..=590).contains(&held_pos),
        "{held_pos} positives held out"
    );
    assert_ne!(held_ids, ids, "not the sample's draw");
    let mut again = sorted();
    assert_eq!(again.hold_out(1_000).examples, held.examples);
    assert_eq!(again.examples, rest.examples);
}
