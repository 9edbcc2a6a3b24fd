//! Bad checkpoints get errors that name the file, the key and the shapes; partial checkpoints
//! (no head, no prefix, sharded) load and say what they did.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use common::{fixtures, load};
use mpcformer::LoadError;
use mpcformer::io::{HostTensor, batch_from_safetensors, save_safetensors};
use mpcformer::model::{self, Overrides};

fn tiny_dir() -> std::path::PathBuf {
    fixtures().join("tiny-bert/model")
}

/// A temp model dir with tiny-bert's config and the given tensors.
fn model_dir_with(tensors: &BTreeMap<String, HostTensor>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    save_safetensors(&dir.path().join("model.safetensors"), tensors, None).unwrap();
    dir
}

fn try_load(dir: &Path) -> Result<model::Pretrained, LoadError> {
    model::load_pretrained(
        dir.to_str().unwrap(),
        &Overrides::default(),
        &Device::flex(),
    )
}

fn logits(pre: &model::Pretrained) -> Vec<f64> {
    let inputs = batch_from_safetensors(
        &fixtures().join("tiny-bert/batch0.safetensors"),
        &Device::flex(),
    )
    .unwrap();
    HostTensor::from_float(pre.model.logits(&inputs)).to_f64()
}

fn weights() -> BTreeMap<String, HostTensor> {
    load(&tiny_dir().join("model.safetensors"))
}

#[test]
fn truncated_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(tiny_dir().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let err = try_load(dir.path())
        .err()
        .expect("a truncated file must not load");
    assert!(matches!(err, LoadError::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn garbage_header_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json",
    )
    .unwrap();
    let err = try_load(dir.path()).err().unwrap();
    assert!(matches!(err, LoadError::Corrupt { .. }), "{err}");
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let mut w = weights();
    let key = "bert.encoder.layer.1.intermediate.dense.weight";
    w.insert(
        key.into(),
        HostTensor::F32 {
            shape: vec![48, 32],
            data: vec![0.0; 48 * 32],
        },
    );
    let dir = model_dir_with(&w);
    let err = try_load(dir.path()).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Shape { .. }), "{msg}");
    assert!(
        msg.contains(key) && msg.contains("[48, 32]") && msg.contains("[64, 32]"),
        "{msg}"
    );
}

#[test]
fn missing_backbone_key_is_an_error() {
    let mut w = weights();
    let key = "bert.encoder.layer.0.attention.self.value.bias";
    w.remove(key);
    let dir = model_dir_with(&w);
    let err = try_load(dir.path()).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Missing { .. }), "{msg}");
    assert!(msg.contains(key), "{msg}");
}

#[test]
fn bad_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        "{ \"model_type\": \"bert\", ",
    )
    .unwrap();
    let err = try_load(dir.path()).err().unwrap();
    assert!(matches!(err, LoadError::Config { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    let text = std::fs::read_to_string(tiny_dir().join("config.json"))
        .unwrap()
        .replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 5");
    std::fs::write(dir.path().join("config.json"), text).unwrap();
    let err = try_load(dir.path()).err().unwrap();
    assert!(err.to_string().contains("not a multiple"), "{err}");

    let text = std::fs::read_to_string(tiny_dir().join("config.json"))
        .unwrap()
        .replace("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"swish2\"");
    std::fs::write(dir.path().join("config.json"), text).unwrap();
    let err = try_load(dir.path()).err().unwrap();
    assert!(err.to_string().contains("swish2"), "{err}");
}

#[test]
fn pytorch_bin_only_says_how_to_convert() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"PK").unwrap();
    let err = try_load(dir.path()).err().unwrap();
    assert!(matches!(err, LoadError::PytorchBin { .. }), "{err}");
    assert!(err.to_string().contains("safe_serialization=True"), "{err}");
}

#[test]
fn missing_head_is_initialised_and_reported() {
    let mut w = weights();
    w.retain(|k, _| !k.starts_with("classifier."));
    let dir = model_dir_with(&w);
    let pre = try_load(dir.path()).unwrap();
    assert_eq!(
        pre.report.initialised,
        vec!["classifier.weight", "classifier.bias"]
    );
    assert!(pre.report.to_string().contains("classifier.weight"));
}

#[test]
fn unexpected_keys_are_reported() {
    let mut w = weights();
    w.insert(
        "cls.predictions.bias".into(),
        HostTensor::F32 {
            shape: vec![120],
            data: vec![0.0; 120],
        },
    );
    let dir = model_dir_with(&w);
    let pre = try_load(dir.path()).unwrap();
    assert_eq!(pre.report.unexpected, vec!["cls.predictions.bias"]);
}

#[test]
fn weights_without_prefix_load_identically() {
    let reference = logits(&try_load(&tiny_dir()).unwrap());
    let w: BTreeMap<String, HostTensor> = weights()
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("bert.").map(str::to_string).unwrap_or(k), v))
        .collect();
    assert!(w.keys().any(|k| k.starts_with("encoder.")));
    let dir = model_dir_with(&w);
    let pre = try_load(dir.path()).unwrap();
    assert!(pre.report.unexpected.is_empty(), "{}", pre.report);
    assert_eq!(logits(&pre), reference);
}

#[test]
fn sharded_checkpoint_loads_identically() {
    let reference = logits(&try_load(&tiny_dir()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) = weights()
        .into_iter()
        .partition(|(k, _)| k.contains("layer.0") || k.contains("embeddings"));
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", &a),
        ("model-00002-of-00002.safetensors", &b),
    ] {
        save_safetensors(&dir.path().join(file), part, None).unwrap();
        for k in part.keys() {
            map.insert(k.clone(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let pre = try_load(dir.path()).unwrap();
    assert_eq!(logits(&pre), reference);
}

#[test]
fn f16_weights_are_converted() {
    // Same values rounded through f16: logits move a little but stay close.
    let reference = logits(&try_load(&tiny_dir()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let w = weights();
    let halves: Vec<(String, Vec<usize>, Vec<u8>)> = w
        .iter()
        .map(|(k, v)| {
            let bytes = v
                .to_f64()
                .iter()
                .flat_map(|&x| half::f16::from_f64(x).to_le_bytes())
                .collect();
            (k.clone(), v.shape().to_vec(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = halves
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let got = logits(&try_load(dir.path()).unwrap());
    let d = got
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(d > 0.0 && d < 0.05, "{d}");
}
