//! How far a student is from its teacher, layer by layer, on a dataset: the stage-1 terms
//! (hidden-state MSE, TinyBERT's attention-score MSE) and the KL divergence of the attention
//! distributions, next to both models' logits. `mpcformer compare` prints it: it shows where a
//! student loses its teacher, which the final accuracy alone does not.

use anyhow::{Result, bail};
use burn::prelude::*;
use serde::Serialize;

use super::LayerMap;
use super::loss::{attention_kl, attention_mse, mse, with_additive_mask};
use crate::data::{Order, Tokenized};
use crate::eval::Outputs;
use crate::model::{Capture, Inputs, SequenceClassifier};

/// Per pair of layers of [`LayerMap`], each a mean over the examples (every batch's term, as
/// the training loss computes it, weighted by the batch's size).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Gap {
    /// Student hidden state `i` against teacher `i·k`; `[0]` is the embedding output.
    pub hidden_mse: Vec<f64>,
    /// Raw attention scores, masked as TinyBERT (stage 1's reference term).
    pub attention_score_mse: Vec<f64>,
    /// KL(teacher ‖ student) of the attention distributions per real query.
    pub attention_kl: Vec<f64>,
    pub examples: usize,
}

impl Gap {
    fn add(&mut self, other: &Gap) {
        let n = (self.examples + other.examples) as f64;
        let (a, b) = (self.examples as f64 / n, other.examples as f64 / n);
        let mix = |x: &mut Vec<f64>, y: &[f64]| {
            if x.is_empty() {
                *x = vec![0.0; y.len()];
            }
            for (x, y) in x.iter_mut().zip(y) {
                *x = a * *x + b * y;
            }
        };
        mix(&mut self.hidden_mse, &other.hidden_mse);
        mix(&mut self.attention_score_mse, &other.attention_score_mse);
        mix(&mut self.attention_kl, &other.attention_kl);
        self.examples += other.examples;
    }
}

/// The gap on one batch, and both models' logits.
pub fn batch_gap(
    teacher: &SequenceClassifier,
    student: &SequenceClassifier,
    inputs: &Inputs,
) -> Result<(Gap, Tensor<2>, Tensor<2>)> {
    if teacher.config.hidden_size != student.config.hidden_size {
        bail!(
            "the student's hidden size {} differs from the teacher's {}: its hidden states only \
             compare through the fit_dense projection of its run",
            student.config.hidden_size,
            teacher.config.hidden_size
        );
    }
    let map = LayerMap::new(
        teacher.config.num_hidden_layers,
        student.config.num_hidden_layers,
    )?;
    let (t, s) = (
        teacher.forward(inputs, Capture::ALL),
        student.forward(inputs, Capture::ALL),
    );
    let mask = inputs.attention_mask.clone().float();
    let value = |x: Tensor<1>| x.into_scalar::<f32>() as f64;
    let gap = Gap {
        hidden_mse: map
            .hidden()
            .into_iter()
            .map(|(si, ti)| {
                value(mse(
                    s.encoder.hidden_states[si].clone(),
                    t.encoder.hidden_states[ti].clone(),
                ))
            })
            .collect(),
        attention_score_mse: map
            .attention()
            .into_iter()
            .map(|(si, ti)| {
                value(attention_mse(
                    with_additive_mask(s.encoder.attention_scores[si].clone(), mask.clone()),
                    with_additive_mask(t.encoder.attention_scores[ti].clone(), mask.clone()),
                ))
            })
            .collect(),
        attention_kl: map
            .attention()
            .into_iter()
            .map(|(si, ti)| {
                value(attention_kl(
                    s.encoder.attentions[si].clone(),
                    t.encoder.attentions[ti].clone(),
                    mask.clone(),
                ))
            })
            .collect(),
        examples: inputs.input_ids.dims()[0],
    };
    Ok((gap, t.logits, s.logits))
}

/// The gap over all of `data`, with both models' logits in dataset order.
pub fn gap(
    teacher: &SequenceClassifier,
    student: &SequenceClassifier,
    data: &Tokenized,
    batch_size: usize,
    device: &Device,
) -> Result<(Gap, Outputs, Outputs)> {
    let start = std::time::Instant::now();
    let mut total = Gap::default();
    let k = teacher.config.num_labels;
    let mut logits = [vec![0f32; data.len() * k], vec![0f32; data.len() * k]];
    for idx in data.plan(batch_size, Order::ByLength, false) {
        let inputs = data.batch(&idx).inputs.to_inputs(device);
        let (g, t, s) = batch_gap(teacher, student, &inputs)?;
        total.add(&g);
        for (out, l) in logits.iter_mut().zip([t, s]) {
            let v: Vec<f32> = l
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("float logits");
            for (r, &i) in idx.iter().enumerate() {
                out[i * k..(i + 1) * k].copy_from_slice(&v[r * k..(r + 1) * k]);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let [t, s] = logits.map(|logits| Outputs {
        logits,
        num_outputs: k,
        seconds,
    });
    Ok((total, t, s))
}
