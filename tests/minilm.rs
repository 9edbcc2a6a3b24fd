//! The real all-MiniLM-L6-v2 (from ../shared): token ids of the fixture sentences exactly, and
//! hidden states within 2e-4 of PyTorch on the default backend. Also the RoBERTa BPE tokenizer.

mod common;

use burn::prelude::*;
use common::{assert_close, fixtures, load, shared};
use mpcformer::io::{HostTensor, batch_from_safetensors};
use mpcformer::model::{self, Capture, Overrides};
use mpcformer::tokenize::{Encoded, HostBatch, TextTokenizer};
use serde_json::Value;

fn sentences() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("minilm/minilm_fixture.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["sentences"].as_array().unwrap().clone()
}

fn encode(tok: &TextTokenizer, s: &Value) -> Encoded {
    match s["pair"].as_array() {
        Some(p) => tok.encode(p[0].as_str().unwrap(), Some(p[1].as_str().unwrap())),
        None => tok.encode(s["text"].as_str().unwrap(), None),
    }
    .unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_tokens(tok: &TextTokenizer) -> Vec<Encoded> {
    sentences()
        .iter()
        .map(|s| {
            let e = encode(tok, s);
            assert_eq!(e.ids, u32s(&s["ids"]), "ids of {s}");
            assert_eq!(e.type_ids, u32s(&s["type_ids"]), "type ids of {s}");
            let tokens: Vec<String> = s["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect();
            assert_eq!(e.tokens, tokens);
            e
        })
        .collect()
}

#[test]
fn minilm_token_ids_match_from_tokenizer_json() {
    let Some(dir) = shared("models/all-MiniLM-L6-v2") else {
        return;
    };
    let tok = TextTokenizer::from_dir(&dir, 512).unwrap();
    let encs = check_tokens(&tok);
    // Our batch equals the fixture's padded batch (padding to the longest, not to 128).
    let reference = load(&fixtures().join("minilm/minilm_outputs.safetensors"));
    let b = HostBatch::collate(&encs.iter().collect::<Vec<_>>(), tok.pad_id);
    assert_eq!(b.seq, 36);
    assert_eq!(b.input_ids, reference["input_ids"].to_i64().unwrap());
    assert_eq!(
        b.attention_mask,
        reference["attention_mask"].to_i64().unwrap()
    );
    assert_eq!(
        b.token_type_ids,
        reference["token_type_ids"].to_i64().unwrap()
    );
}

#[test]
fn minilm_token_ids_match_from_vocab_txt() {
    let Some(src) = shared("models/all-MiniLM-L6-v2") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let tok = TextTokenizer::from_dir(dir.path(), 512).unwrap();
    check_tokens(&tok);
}

#[test]
fn truncation_is_longest_first() {
    let Some(dir) = shared("models/all-MiniLM-L6-v2") else {
        return;
    };
    let tok = TextTokenizer::from_dir(&dir, 12).unwrap();
    let e = tok
        .encode(
            "one two three four five six seven eight nine ten",
            Some("alpha beta"),
        )
        .unwrap();
    // 12 = [CLS] + 7 + [SEP] + 2 + [SEP]: the longer sentence loses tokens first.
    assert_eq!(e.ids.len(), 12);
    assert_eq!(e.tokens[8], "[SEP]");
    assert_eq!(&e.tokens[9..], &["alpha", "beta", "[SEP]"]);
}

#[test]
fn minilm_hidden_states_match() {
    let Some(dir) = shared("models/all-MiniLM-L6-v2") else {
        return;
    };
    let device = Device::flex();
    let pre =
        model::load_pretrained(dir.to_str().unwrap(), &Overrides::default(), &device).unwrap();
    // A bare BertModel: no head in the checkpoint, no unexplained tensors.
    assert_eq!(
        pre.report.initialised,
        vec!["classifier.weight", "classifier.bias"]
    );
    assert!(pre.report.unexpected.is_empty(), "{}", pre.report);
    let path = fixtures().join("minilm/minilm_outputs.safetensors");
    let reference = load(&path);
    let inputs = batch_from_safetensors(&path, &device).unwrap();
    let out = pre.model.forward(
        &inputs,
        Capture {
            hidden_states: true,
            ..Capture::NONE
        },
    );
    let h = &out.encoder.hidden_states;
    assert_close(
        "hidden_states.0",
        &HostTensor::from_float(h[0].clone()),
        &reference["hidden_states.0"],
        2e-4,
    );
    assert_close(
        "hidden_states.3",
        &HostTensor::from_float(h[3].clone()),
        &reference["hidden_states.3"],
        2e-4,
    );
    assert_close(
        "last_hidden_state",
        &HostTensor::from_float(out.encoder.last_hidden_state.clone()),
        &reference["last_hidden_state"],
        2e-4,
    );
}

#[test]
fn roberta_bpe_tokenizer_both_formats() {
    let Some(src) = shared("models/roberta-base-tokenizer") else {
        return;
    };
    let from_json = TextTokenizer::from_dir(&src, 512).unwrap();
    assert_eq!(
        from_json.encode("Hello world", None).unwrap().ids,
        vec![0, 31414, 232, 2]
    );
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let from_files = TextTokenizer::from_dir(dir.path(), 512).unwrap();
    assert_eq!(from_files.pad_id, 1);
    for (a, b) in [
        ("Hello world", None),
        (
            "The café's naïve price: €4.50!",
            Some("Second sentence here."),
        ),
    ] {
        assert_eq!(
            from_files.encode(a, b).unwrap(),
            from_json.encode(a, b).unwrap(),
            "{a}"
        );
    }
    // RoBERTa pairs: <s> A </s></s> B </s>.
    let e = from_json.encode("Hello", Some("world")).unwrap();
    assert_eq!(e.ids, vec![0, 31414, 2, 2, 8331, 2]);
}
