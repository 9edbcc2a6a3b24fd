//! Parity with PyTorch + transformers on the tiny fixtures: every stored tensor of every batch in
//! every approximation variant, the loss, and the gradients of every parameter, on Flex and,
//! with `--features wgpu`, on wgpu (CI: Mesa's lavapipe), at the same tolerances.

mod common;

use std::collections::BTreeMap;

use burn::prelude::*;
use common::{assert_close, fixtures, load, max_abs_diff};
use mpcformer::io::{HostTensor, batch_from_safetensors};
use mpcformer::loss;
use mpcformer::model::{self, Act, Attn, Capture, Overrides, SequenceClassifier};

const VARIANTS: [(&str, Act, Attn); 3] = [
    ("exact", Act::Gelu, Attn::Softmax),
    ("quad_gelu", Act::Quad, Attn::Softmax),
    ("quad_2quad", Act::Quad, Attn::TwoQuad),
];

fn load_model(fixture: &str, act: Act, attn: Attn, device: &Device) -> SequenceClassifier {
    let dir = fixtures().join(fixture).join("model");
    let overrides = Overrides {
        act: Some(act),
        attn: Some(attn),
        no_dropout: true,
        ..Overrides::default()
    };
    let pre = model::load_pretrained(dir.to_str().unwrap(), &overrides, device).unwrap();
    assert!(pre.report.initialised.is_empty(), "{}", pre.report);
    assert!(pre.report.unexpected.is_empty(), "{}", pre.report);
    pre.model
}

fn task_loss(
    model: &SequenceClassifier,
    logits: Tensor<2>,
    labels: &HostTensor,
    device: &Device,
) -> Tensor<1> {
    let n = labels.shape()[0];
    if model.config.is_regression() {
        let y: Vec<f32> = labels.to_f64().iter().map(|&v| v as f32).collect();
        loss::mse(logits, Tensor::from_data(TensorData::new(y, [n]), device))
    } else {
        let y = labels.to_i64().unwrap();
        loss::cross_entropy(logits, Tensor::from_data(TensorData::new(y, [n]), device))
    }
}

fn forward_parity(fixture: &str, device: &Device) {
    let device = device.clone();
    let dir = fixtures().join(fixture);
    let mut checked = 0;
    for (variant, act, attn) in VARIANTS {
        let model = load_model(fixture, act, attn, &device);
        for b in 0..3 {
            let path = dir.join(format!("batch{b}.safetensors"));
            let reference = load(&path);
            let inputs = batch_from_safetensors(&path, &device).unwrap();
            let out = model.forward(&inputs, Capture::ALL);
            let mut ours: BTreeMap<String, (HostTensor, f64)> = BTreeMap::new();
            let l = model.config.num_hidden_layers;
            assert_eq!(out.encoder.hidden_states.len(), l + 1);
            for (i, h) in out.encoder.hidden_states.iter().enumerate() {
                ours.insert(
                    format!("hidden_states.{i}"),
                    (HostTensor::from_float(h.clone()), 1e-4),
                );
            }
            for (i, t) in out.encoder.attention_scores.iter().enumerate() {
                ours.insert(
                    format!("attention_scores.{i}"),
                    (HostTensor::from_float(t.clone()), 1e-4),
                );
            }
            for (i, t) in out.encoder.attentions.iter().enumerate() {
                ours.insert(
                    format!("attentions.{i}"),
                    (HostTensor::from_float(t.clone()), 1e-5),
                );
            }
            ours.insert(
                "pooled_output".into(),
                (HostTensor::from_float(out.pooled_output.clone()), 1e-4),
            );
            ours.insert(
                "logits".into(),
                (HostTensor::from_float(out.logits.clone()), 1e-4),
            );
            // Without captured weights the normalisers write in place (the scores are not
            // kept): the same logits, padded batches included (batch1 and batch2 are padded).
            let lean = model.forward(&inputs, Capture::NONE);
            assert_close(
                &format!("{fixture} batch{b} {variant} logits, no capture"),
                &HostTensor::from_float(lean.logits),
                &reference[&format!("{variant}.logits")],
                1e-4,
            );
            // Half-batches side by side (a frozen teacher's forward on Flex): every captured
            // tensor joined back along the batch axis.
            let threaded = model.forward_threaded(&inputs, Capture::ALL, 2);
            let last = out.encoder.hidden_states.len() - 1;
            assert_close(
                &format!("{fixture} batch{b} {variant} hidden_states.{last}, threaded"),
                &HostTensor::from_float(threaded.encoder.hidden_states[last].clone()),
                &reference[&format!("{variant}.hidden_states.{last}")],
                1e-4,
            );
            assert_close(
                &format!("{fixture} batch{b} {variant} attention_scores.0, threaded"),
                &HostTensor::from_float(threaded.encoder.attention_scores[0].clone()),
                &reference[&format!("{variant}.attention_scores.0")],
                1e-4,
            );
            assert_close(
                &format!("{fixture} batch{b} {variant} logits, threaded"),
                &HostTensor::from_float(threaded.logits),
                &reference[&format!("{variant}.logits")],
                1e-4,
            );
            let loss = task_loss(&model, out.logits, &reference["labels"], &device);
            ours.insert(
                "loss".into(),
                (HostTensor::from_float(loss.reshape([1])), 1e-4),
            );
            // Every reference tensor of this variant is compared; none may be left unchecked.
            let prefix = format!("{variant}.");
            let names: Vec<&String> = reference
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .collect();
            assert!(!names.is_empty());
            for name in names {
                let short = &name[prefix.len()..];
                let (t, tol) = ours
                    .get(short)
                    .unwrap_or_else(|| panic!("{fixture}/{name}: we produce no such tensor"));
                assert_close(
                    &format!("{fixture} batch{b} {name}"),
                    t,
                    &reference[name],
                    *tol,
                );
                checked += 1;
            }
            // 2Quad gives padded keys exactly zero weight.
            if attn == Attn::TwoQuad {
                let mask = reference["attention_mask"].to_i64().unwrap();
                let p = HostTensor::from_float(out.encoder.attentions[0].clone());
                let [bb, h, s, _] = p.shape().try_into().unwrap();
                let pv = p.to_f64();
                for r in 0..bb {
                    for k in 0..s {
                        if mask[r * s + k] == 0 {
                            for hh in 0..h {
                                for q in 0..s {
                                    assert_eq!(pv[((r * h + hh) * s + q) * s + k], 0.0);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} tensors compared");
}

fn grad_parity(fixture: &str, device: &Device) {
    let device = device.clone().autodiff();
    let dir = fixtures().join(fixture);
    let grads_ref = load(&dir.join("grads_batch0.safetensors"));
    let batch = dir.join("batch0.safetensors");
    let reference = load(&batch);
    for (variant, act, attn) in VARIANTS {
        let model = load_model(fixture, act, attn, &device);
        let inputs = batch_from_safetensors(&batch, &device).unwrap();
        let logits = model.logits(&inputs);
        let loss = task_loss(&model, logits, &reference["labels"], &device);
        let grads = loss.backward();
        let ours = model.hf_grads(&grads);
        let expected: Vec<&String> = grads_ref
            .keys()
            .filter(|k| k.starts_with(&format!("{variant}.grad.")))
            .collect();
        assert_eq!(ours.len(), expected.len(), "{variant}: number of gradients");
        for g in &ours {
            let key = format!("{variant}.grad.{}", g.name);
            let r = grads_ref
                .get(&key)
                .unwrap_or_else(|| panic!("{fixture}: no reference gradient {key}"));
            let t = HostTensor::F32 {
                shape: g.shape.clone(),
                data: g.data.clone(),
            };
            // Key biases get an analytically zero gradient (softmax ignores a per-row shift): their
            // reference values are rounding noise, so relative error is measured against 1e-4.
            let scale = r
                .to_f64()
                .iter()
                .fold(0.0f64, |m, x| m.max(x.abs()))
                .max(1e-4);
            let d = max_abs_diff(&key, &t, r);
            assert!(
                d <= 1e-3 * scale,
                "{fixture} {key}: max abs diff {d:.3e} vs max |grad| {scale:.3e}"
            );
            // `padding_idx`: the pad row gets no gradient at all, as in HF.
            if g.name.ends_with("word_embeddings.weight")
                || (model.config.arch == model::Arch::Roberta
                    && g.name.ends_with("position_embeddings.weight"))
            {
                let pad = model.config.pad_token_id;
                let d = g.shape[1];
                assert!(
                    g.data[pad * d..(pad + 1) * d].iter().all(|&x| x == 0.0),
                    "{key}: pad row"
                );
            }
        }
    }
}

/// Every parity check, on one device.
macro_rules! parity_tests {
    ($device:expr) => {
        #[test]
        fn tiny_bert_forward() {
            super::forward_parity("tiny-bert", &$device);
        }

        #[test]
        fn tiny_roberta_forward() {
            super::forward_parity("tiny-roberta", &$device);
        }

        #[test]
        fn tiny_bert_regression_forward() {
            super::forward_parity("tiny-bert-regression", &$device);
        }

        #[test]
        fn tiny_bert_gradients() {
            super::grad_parity("tiny-bert", &$device);
        }

        #[test]
        fn tiny_roberta_gradients() {
            super::grad_parity("tiny-roberta", &$device);
        }

        #[test]
        fn tiny_bert_regression_gradients() {
            super::grad_parity("tiny-bert-regression", &$device);
        }
    };
}

mod on_flex {
    use burn::prelude::Device;
    parity_tests!(Device::flex());
}

/// `cargo test --features wgpu --test parity on_wgpu`; a machine without a Vulkan device fails
/// here rather than skipping: CI installs lavapipe (`.ci/run`).
#[cfg(feature = "wgpu")]
mod on_wgpu {
    use burn::prelude::Device;
    parity_tests!(Device::wgpu(Default::default()));
}
