//! The fitted start: refitting Quad and 2Quad to the teacher brings the student's forward pass
//! closer to the teacher's on inputs it was not fitted on, measured here by forward passes, not
//! by the fit's own statistics.

mod common;

use burn::prelude::*;
use common::{fixtures, synthetic};
use mpcformer::distill::fitted::{FitOptions, refit};
use mpcformer::distill::init_student;
use mpcformer::model::{self, Capture, Inputs, Overrides, SequenceClassifier};
use mpcformer::train::recipe::StudentSpec;

fn batches(seed: u64, device: &Device) -> Vec<Inputs> {
    let t = synthetic(64, seed);
    (0..8)
        .map(|b| {
            let idx: Vec<usize> = (b * 8..b * 8 + 8).collect();
            t.batch(&idx).inputs.to_inputs(device)
        })
        .collect()
}

/// Per layer: the mean squared difference of the student's hidden state from the teacher's,
/// and the mean KL of the attention rows (real keys and queries), over `inputs`.
fn distance(s: &SequenceClassifier, t: &SequenceClassifier, inputs: &[Inputs]) -> Vec<(f64, f64)> {
    let capture = Capture {
        hidden_states: true,
        attention_scores: false,
        attentions: true,
    };
    let layers = t.config.num_hidden_layers;
    let mut sums = vec![(0.0, 0.0); layers];
    for x in inputs {
        let (so, to) = (s.forward(x, capture).encoder, t.forward(x, capture).encoder);
        let [b, n] = x.attention_mask.dims();
        let m = x.attention_mask.clone().float();
        let rows = m.clone().sum().into_scalar::<f32>() as f64;
        for (l, sum) in sums.iter_mut().enumerate() {
            let d = (so.hidden_states[l + 1].clone() - to.hidden_states[l + 1].clone())
                .square()
                .mean_dim(2)
                .reshape([b, n]);
            sum.0 += (d * m.clone()).sum().into_scalar::<f32>() as f64 / rows;
            let (p, q) = (to.attentions[l].clone(), so.attentions[l].clone());
            let kl = (p.clone() * ((p + 1e-9).log() - (q + 1e-9).log()))
                .sum_dim(3)
                .mean_dim(1)
                .reshape([b, n]);
            sum.1 += (kl * m.clone()).sum().into_scalar::<f32>() as f64 / rows;
        }
    }
    sums.iter()
        .map(|(h, a)| (h / inputs.len() as f64, a / inputs.len() as f64))
        .collect()
}

#[test]
fn fitted_start_brings_the_student_closer_to_its_teacher() {
    let device = Device::flex();
    device.seed(3);
    let teacher = model::load_pretrained(
        fixtures().join("tiny-bert/model").to_str().unwrap(),
        &Overrides {
            no_dropout: true,
            ..Default::default()
        },
        &device,
    )
    .unwrap()
    .model;
    let (plain, _) = init_student(&teacher, &StudentSpec::default(), &device).unwrap();
    let (fitted, report) = refit(
        plain.model.clone(),
        &teacher,
        &batches(5, &device),
        FitOptions::default(),
    )
    .unwrap();
    let held_out = batches(6, &device);
    let before = distance(&plain.model, &teacher, &held_out);
    let after = distance(&fitted, &teacher, &held_out);
    eprintln!("{report}\nheld out, per layer (hidden MSE, attention KL): {before:?} → {after:?}");
    assert_eq!(report.layers.len(), teacher.config.num_hidden_layers);
    for (l, ((hb, ab), (ha, aa))) in before.iter().zip(&after).enumerate() {
        assert!(ha < &(0.2 * hb), "layer {l}: hidden MSE {hb} → {ha}");
        assert!(aa < &(0.6 * ab), "layer {l}: attention KL {ab} → {aa}");
        let fit = &report.layers[l];
        let (fb, fa) = fit.ffn_mse.expect("every FFN is Quad");
        assert!(fa < fb, "layer {l}: fitted activation MSE {fb} → {fa}");
        assert_eq!(fit.alphas.len(), teacher.config.num_attention_heads);
    }
    // The fitted student is still the student: same architecture and approximations.
    assert_eq!(fitted.config, plain.model.config);
}

/// A training student (autodiff device, dropout on) is fitted exactly as its plain copy: the fit
/// must neither see dropout nor record a graph (which held 19 GB on RTE).
#[test]
fn a_training_student_is_fitted_as_its_plain_copy() {
    let device = Device::flex();
    let ad = device.clone().autodiff();
    ad.seed(3);
    let load = |d: &Device| {
        model::load_pretrained(
            fixtures().join("tiny-bert/model").to_str().unwrap(),
            &Overrides::default(),
            d,
        )
        .unwrap()
        .model
    };
    let teacher = load(&device);
    let fit_on = |d: &Device| {
        let (s, _) = init_student(&load(d), &StudentSpec::default(), d).unwrap();
        let (fitted, _) = refit(
            s.model,
            &teacher,
            &batches(5, &device),
            FitOptions::default(),
        )
        .unwrap();
        fitted.hf_tensors()
    };
    let (plain, training) = (fit_on(&device), fit_on(&ad));
    assert_eq!(plain.len(), training.len());
    for (p, t) in plain.iter().zip(&training) {
        assert_eq!(p.name, t.name);
        assert_eq!(p.data, t.data, "{}", p.name);
    }
}

/// Per layer, the fit's own measure: KL(teacher ‖ student) of the attention rows summed over
/// heads and real queries of every batch, over heads × real queries.
fn fit_kl(s: &SequenceClassifier, t: &SequenceClassifier, inputs: &[Inputs]) -> Vec<f64> {
    let capture = Capture {
        hidden_states: false,
        attention_scores: false,
        attentions: true,
    };
    let (layers, heads) = (t.config.num_hidden_layers, t.config.num_attention_heads);
    let (mut sums, mut rows) = (vec![0.0; layers], 0.0);
    for x in inputs {
        let (so, to) = (s.forward(x, capture).encoder, t.forward(x, capture).encoder);
        let [b, n] = x.attention_mask.dims();
        let m = x.attention_mask.clone().float();
        rows += m.clone().sum().into_scalar::<f32>() as f64;
        for (l, sum) in sums.iter_mut().enumerate() {
            let (p, q) = (to.attentions[l].clone(), so.attentions[l].clone());
            let kl = (p.clone() * ((p + 1e-9).log() - (q + 1e-9).log()))
                .sum_dim(3)
                .sum_dim(1)
                .reshape([b, n]);
            *sum += (kl * m.clone()).sum().into_scalar::<f32>() as f64;
        }
    }
    sums.iter().map(|s| s / (heads as f64 * rows)).collect()
}

/// The key shift (`student.fit_shift`): the KL the fit reports after it is the fitted model's
/// own on the fit's examples, so the key-bias edit realises the shift it searched; it lowers
/// 2ReLU's KL on held-out inputs (2ReLU has no other attention fit); and under 2Quad it only
/// adds to the query scale's fit.
#[test]
fn the_key_shift_is_what_the_fit_measured_and_helps_2relu() {
    use mpcformer::model::approx::Attn;
    let device = Device::flex();
    device.seed(3);
    let teacher = model::load_pretrained(
        fixtures().join("tiny-bert/model").to_str().unwrap(),
        &Overrides {
            no_dropout: true,
            ..Default::default()
        },
        &device,
    )
    .unwrap()
    .model;
    let (fit_on, held_out) = (batches(5, &device), batches(6, &device));
    let shift = FitOptions { key_shift: true };
    for attn in [Attn::TwoRelu, Attn::TwoQuad] {
        let spec = StudentSpec {
            attn,
            ..Default::default()
        };
        let (plain, _) = init_student(&teacher, &spec, &device).unwrap();
        let fit = |options| refit(plain.model.clone(), &teacher, &fit_on, options).unwrap();
        let ((without, _), (with, report)) = (fit(FitOptions::default()), fit(shift));
        eprintln!("{attn:?}: {report}");
        let measured = fit_kl(&with, &teacher, &fit_on);
        let (kl_without, kl_with) = (
            fit_kl(&without, &teacher, &held_out),
            fit_kl(&with, &teacher, &held_out),
        );
        eprintln!("held out: {kl_without:?} → {kl_with:?}");
        for (l, layer) in report.layers.iter().enumerate() {
            assert_eq!(layer.shifts.len(), teacher.config.num_attention_heads);
            let (before, after) = layer
                .attention_kl
                .expect("every layer's attention is fitted");
            assert!(after <= before, "layer {l}: {before} → {after}");
            let gap = (after - measured[l]).abs();
            assert!(
                gap <= 1e-3 * after.max(1e-3),
                "layer {l}: fit says {after}, model {}",
                measured[l]
            );
        }
        assert!(
            report
                .layers
                .iter()
                .any(|l| l.shifts.iter().any(|t| *t != 0.0))
        );
        if attn == Attn::TwoRelu {
            assert!(report.layers.iter().all(|l| l.alphas.is_empty()));
            let (a, b): (f64, f64) = (kl_without.iter().sum(), kl_with.iter().sum());
            assert!(b < 0.8 * a, "2ReLU held-out KL {a} → {b}");
        }
    }
}
