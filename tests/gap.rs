//! `distill::gap` and `mpcformer compare`: the per-layer distance between a student and its
//! teacher, against sums computed here in f64 from PyTorch's outputs of the tiny fixtures.

mod common;

use std::process::Command;

use burn::prelude::Device;
use common::{fixtures, load};
use mpcformer::distill::gap::batch_gap;
use mpcformer::distill::loss::KL_EPS;
use mpcformer::io::{HostTensor, batch_from_safetensors};
use mpcformer::model::{self, Act, Attn, Overrides, SequenceClassifier};

fn tiny_bert(act: Act, attn: Attn, device: &Device) -> SequenceClassifier {
    let dir = fixtures().join("tiny-bert/model");
    let overrides = Overrides {
        act: Some(act),
        attn: Some(attn),
        no_dropout: true,
        ..Overrides::default()
    };
    model::load_pretrained(dir.to_str().unwrap(), &overrides, device)
        .unwrap()
        .model
}

/// The three terms from the fixture's tensors: teacher `exact.*`, student `quad_2quad.*`.
fn reference_gap(f: &std::collections::BTreeMap<String, HostTensor>) -> [Vec<f64>; 3] {
    let t = |name: &str| f[&format!("exact.{name}")].to_f64();
    let s = |name: &str| f[&format!("quad_2quad.{name}")].to_f64();
    let mask = f["attention_mask"].to_f64();
    let [b, l] = f["attention_mask"].shape().try_into().unwrap();
    let mean_sq = |a: &[f64], b: &[f64]| {
        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len() as f64
    };
    let layers = (0..)
        .take_while(|i| f.contains_key(&format!("exact.attentions.{i}")))
        .count();
    let hidden = (0..=layers)
        .map(|i| {
            let n = format!("hidden_states.{i}");
            mean_sq(&s(&n), &t(&n))
        })
        .collect();
    let h = f["exact.attentions.0"].shape()[1];
    let (mut scores, mut kl) = (vec![], vec![]);
    for i in 0..layers {
        let (ts, ss) = (
            t(&format!("attention_scores.{i}")),
            s(&format!("attention_scores.{i}")),
        );
        let (tp, sp) = (t(&format!("attentions.{i}")), s(&format!("attentions.{i}")));
        let (mut sq, mut k, mut rows) = (0.0, 0.0, 0.0);
        for bi in 0..b {
            for hi in 0..h {
                for q in 0..l {
                    let real_query = mask[bi * l + q] > 0.5;
                    rows += if real_query { 1.0 } else { 0.0 };
                    for key in 0..l {
                        let at = ((bi * h + hi) * l + q) * l + key;
                        if mask[bi * l + key] > 0.5 {
                            sq += (ss[at] - ts[at]).powi(2);
                        }
                        if real_query {
                            let (p, r) = (tp[at], sp[at]);
                            k += p * ((p + KL_EPS).ln() - (r + KL_EPS).ln());
                        }
                    }
                }
            }
        }
        scores.push(sq / ts.len() as f64);
        kl.push(k / rows);
    }
    [hidden, scores, kl]
}

#[test]
fn gap_matches_sums_over_pytorch_outputs() {
    let device = Device::flex();
    let teacher = tiny_bert(Act::Gelu, Attn::Softmax, &device);
    let student = tiny_bert(Act::Quad, Attn::TwoQuad, &device);
    for b in 0..3 {
        let path = fixtures().join(format!("tiny-bert/batch{b}.safetensors"));
        let inputs = batch_from_safetensors(&path, &device).unwrap();
        let (gap, _, _) = batch_gap(&teacher, &student, &inputs).unwrap();
        let want = reference_gap(&load(&path));
        for (name, got, want) in [
            ("hidden MSE", &gap.hidden_mse, &want[0]),
            ("attention score MSE", &gap.attention_score_mse, &want[1]),
            ("attention KL", &gap.attention_kl, &want[2]),
        ] {
            assert_eq!(got.len(), want.len(), "batch {b} {name}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-3 * w.abs() + 1e-6,
                    "batch {b} {name} layer {i}: {g} vs {w}"
                );
            }
        }
        // Quad changes the FFN output, not layer 1's scores: only the normaliser differs there.
        assert!(gap.attention_score_mse[0] < 1e-9, "{gap:?}");
        assert!(gap.attention_kl[0] > 1e-3, "{gap:?}");
        assert_eq!(gap.hidden_mse[0], 0.0);
    }
}

fn compare(extra: &[&str]) -> serde_json::Value {
    let student = fixtures().join("quickstart-student");
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("gap.json");
    let run = Command::new(env!("CARGO_BIN_EXE_mpcformer"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("compare")
        .arg("--teacher")
        .arg(&student)
        .arg("--model")
        .arg(&student)
        .args(["--task", "sst2", "--data", "data/quickstart", "--output"])
        .arg(&json)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    v[0].clone()
}

#[test]
fn compare_cli_finds_no_gap_between_a_model_and_itself() {
    let c = compare(&[]);
    assert_eq!(c["n"], 872);
    assert_eq!(c["agreement"], 1.0);
    assert_eq!(c["teacher"], c["student"]);
    for term in ["hidden_mse", "attention_score_mse", "attention_kl"] {
        for v in c["gap"][term].as_array().unwrap() {
            assert!(v.as_f64().unwrap().abs() < 1e-9, "{term}: {c}");
        }
    }
}

#[test]
fn compare_cli_locates_a_changed_normaliser() {
    // The saved model (2Quad) against itself with softmax: identical scores in layer 1, other
    // attention weights there, and everything after it moves.
    let c = compare(&["--attn", "softmax"]);
    let g = &c["gap"];
    let at = |term: &str, i: usize| g[term][i].as_f64().unwrap();
    assert!(at("attention_score_mse", 0) < 1e-9, "{c}");
    assert!(at("attention_kl", 0) > 1e-3, "{c}");
    assert_eq!(at("hidden_mse", 0), 0.0);
    assert!(at("hidden_mse", 1) > 0.0, "{c}");
    assert!(c["agreement"].as_f64().unwrap() < 1.0, "{c}");
}

/// `--sample N` scores the examples a recipe's `data.eval_sample = N` would: N of them, drawn as
/// `Dataset::sample` draws, the same for `eval` and `compare`.
#[test]
fn compare_and_eval_sample_the_same_examples() {
    let c = compare(&["--sample", "100"]);
    assert_eq!(c["n"], 100);
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("eval.json");
    let run = Command::new(env!("CARGO_BIN_EXE_mpcformer"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["eval", "--model"])
        .arg(fixtures().join("quickstart-student"))
        .args([
            "--task",
            "sst2",
            "--data",
            "data/quickstart",
            "--sample",
            "100",
        ])
        .arg("--output")
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("100 examples"), "{stderr}");
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(e["n"], 100);
    // Both commands scored the same 100 examples, which are not the whole split's.
    assert_eq!(e["metrics"], c["teacher"]);
    assert_ne!(compare(&[])["teacher"], c["teacher"]);
}
