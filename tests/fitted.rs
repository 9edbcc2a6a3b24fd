//! The fitted start: refitting Quad and 2Quad to the teacher brings the student's forward pass
//! closer to the teacher's on inputs it was not fitted on, measured here by forward passes, not
//! by the fit's own statistics.

mod common;

use burn::prelude::*;
use common::{fixtures, synthetic};
use mpcformer::distill::fitted::refit;
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
    let (fitted, report) = refit(plain.model.clone(), &teacher, &batches(5, &device)).unwrap();
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
        let (fitted, _) = refit(s.model, &teacher, &batches(5, &device)).unwrap();
        fitted.hf_tensors()
    };
    let (plain, training) = (fit_on(&device), fit_on(&ad));
    assert_eq!(plain.len(), training.len());
    for (p, t) in plain.iter().zip(&training) {
        assert_eq!(p.name, t.name);
        assert_eq!(p.data, t.data, "{}", p.name);
    }
}
