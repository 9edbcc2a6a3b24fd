//! Value ranges: the input range of every op an MPC runtime computes non-linearly (squares,
//! reciprocals, inverse square roots, exp, comparisons, GeLU, tanh), measured by running the
//! exported model on dev data. The manifest records them ([`OpRange`]) so that a runtime can plan
//! its fixed-point protocols (initial guesses, iteration counts, shifts) for the inputs it will
//! meet, and so that an export says whether it fits the ring at all.

use burn::prelude::*;
use burn::tensor::activation;
use serde_json::{Value, json};

use super::format::{OpKind, OpRange};
use crate::model::approx::{MASK_NEG, TWO_RELU_EPS};
use crate::model::bert::{BertEmbeddings, BertLayer};
use crate::model::{Act, Arch, Attn, Capture, Inputs, SequenceClassifier};

/// Per-op maxima (and minima where they matter) accumulated over batches, in model order.
#[derive(Clone, Debug, Default)]
pub struct RangeStats {
    ops: Vec<(String, OpKind, f64, Option<f64>)>,
    /// Largest difference between a layer output recomputed here and the model's own.
    pub recompute_error: f64,
}

impl RangeStats {
    fn observe(&mut self, op: String, kind: OpKind, max_abs: f64, min: Option<f64>) {
        if let Some(e) = self.ops.iter_mut().find(|e| e.0 == op) {
            e.2 = e.2.max(max_abs);
            e.3 = match (e.3, min) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        } else {
            self.ops.push((op, kind, max_abs, min));
        }
    }

    /// The ranges, with headroom for `fractional_bits`.
    pub fn ranges(&self, fractional_bits: u32) -> Vec<OpRange> {
        let f = fractional_bits as f64;
        self.ops
            .iter()
            .map(|(op, kind, max_abs, min)| {
                let log = max_abs.max(f64::MIN_POSITIVE).log2();
                let headroom = match kind {
                    OpKind::Square => 63.0 - 2.0 * f - 2.0 * log,
                    _ => 63.0 - 2.0 * f - log,
                };
                OpRange {
                    op: op.clone(),
                    kind: *kind,
                    max_abs: *max_abs,
                    min: *min,
                    headroom_bits: round3(headroom),
                    min_bits: min.map(|m| round3((m.max(f64::MIN_POSITIVE) * 2f64.powf(f)).log2())),
                }
            })
            .collect()
    }

    pub fn get(&self, op: &str) -> Option<f64> {
        self.ops.iter().find(|e| e.0 == op).map(|e| e.2)
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn max_abs<const D: usize>(t: Tensor<D>) -> f64 {
    t.abs().max().into_scalar::<f32>() as f64
}

fn max_of<const D: usize>(t: Tensor<D>) -> f64 {
    t.max().into_scalar::<f32>() as f64
}

fn min_of<const D: usize>(t: Tensor<D>) -> f64 {
    t.min().into_scalar::<f32>() as f64
}

/// Word + position + token-type embeddings before LayerNorm, as [`BertEmbeddings::forward`]
/// sums them.
fn embedding_sum(e: &BertEmbeddings, inputs: &Inputs) -> Tensor<3> {
    let ids = inputs.input_ids.clone();
    let [b, s] = ids.dims();
    let device = ids.device();
    let pad = e.pad_token_id as i64;
    let position_ids = match e.arch {
        Arch::Bert => Tensor::<1, Int>::arange(0..s as i64, &device)
            .reshape([1, s])
            .repeat_dim(0, b),
        Arch::Roberta => {
            let real = ids.clone().not_equal_elem(pad).int();
            real.clone().cumsum(1) * real + pad
        }
    };
    let token_type_ids = inputs
        .token_type_ids
        .clone()
        .unwrap_or_else(|| Tensor::zeros([b, s], &device));
    e.word_embeddings.forward(ids)
        + e.position_embeddings.forward(position_ids)
        + e.token_type_embeddings.forward(token_type_ids)
}

impl RangeStats {
    fn layer_norm(&mut self, name: &str, x: Tensor<3>, eps: f64) {
        let (var, mean) = x.clone().var_mean_bias(2);
        self.observe(
            format!("{name}.square"),
            OpKind::Square,
            max_abs(x - mean),
            None,
        );
        let v = var + eps;
        self.observe(
            format!("{name}.inv_sqrt"),
            OpKind::InvSqrt,
            max_of(v.clone()),
            Some(min_of(v)),
        );
    }

    /// Runs `model` on one batch and records the input range of every square, reciprocal,
    /// inverse square root and other non-linear op an MPC runtime computes, over every entry
    /// of the padded batch (padded queries and masked keys included: a runtime computes them
    /// before masking). Returns the logits.
    ///
    /// The values inside a layer are recomputed from the captured layer inputs with the
    /// model's own modules; the recomputed layer output is compared with the model's
    /// ([`RangeStats::recompute_error`]).
    pub fn capture(&mut self, model: &SequenceClassifier, inputs: &Inputs) -> Tensor<2> {
        let eps = model.config.layer_norm_eps;
        let out = model.forward(inputs, Capture::ALL);
        let enc = &out.encoder;
        let [b, s] = inputs.attention_mask.dims();
        let m = inputs.attention_mask.clone().float().reshape([b, 1, 1, s]);

        let emb = embedding_sum(&model.bert.embeddings, inputs);
        self.layer_norm("embeddings.LayerNorm", emb.clone(), eps);
        let mut err = max_abs(
            model.bert.embeddings.layer_norm.forward(emb, None) - enc.hidden_states[0].clone(),
        );
        for (l, layer) in model.bert.encoder.layer.iter().enumerate() {
            let p = format!("layer.{l}");
            let scores = enc.attention_scores[l].clone();
            self.attention(&p, layer, scores, m.clone());
            let y = self.rest_of_layer(
                &p,
                layer,
                enc.hidden_states[l].clone(),
                enc.attentions[l].clone(),
                eps,
            );
            err = err.max(max_abs(y - enc.hidden_states[l + 1].clone()));
        }
        self.head(model, enc.last_hidden_state.clone());
        self.recompute_error = self.recompute_error.max(err);
        out.logits
    }

    /// The attention scores and what the layer's attention computes from them; `m` is the 0/1
    /// key mask as `[batch, 1, 1, keys]`.
    fn attention(&mut self, p: &str, layer: &BertLayer, scores: Tensor<4>, m: Tensor<4>) {
        self.observe(
            format!("{p}.attention.scores"),
            OpKind::Matmul,
            max_abs(scores.clone()),
            None,
        );
        let (name, row_sum) = match layer.approx.attn {
            Attn::TwoQuad => {
                let t = scores + layer.two_quad_c;
                self.observe(
                    format!("{p}.2quad.square"),
                    OpKind::Square,
                    max_abs(t.clone()),
                    None,
                );
                ("2quad", (t.square() * m).sum_dim(3))
            }
            Attn::TwoRelu => {
                self.observe(
                    format!("{p}.2relu.relu"),
                    OpKind::Compare,
                    max_abs(scores.clone()),
                    None,
                );
                (
                    "2relu",
                    (activation::relu(scores) * m).sum_dim(3) + TWO_RELU_EPS,
                )
            }
            Attn::Softmax => {
                let masked = scores + (m.clone().neg() + 1.0) * MASK_NEG;
                let shifted = masked.clone() - masked.max_dim(3);
                self.observe(
                    format!("{p}.softmax.exp"),
                    OpKind::Exp,
                    max_abs(shifted.clone() * m.clone()),
                    None,
                );
                ("softmax", (shifted.exp() * m).sum_dim(3))
            }
        };
        self.observe(
            format!("{p}.{name}.row_sum"),
            OpKind::Reciprocal,
            max_of(row_sum.clone()),
            Some(min_of(row_sum)),
        );
    }

    /// The rest of the layer from its input `x` and attention probabilities, as
    /// `BertLayer::forward` computes it (dropout is off): the two LayerNorms and the FFN's
    /// activation. Returns the layer's output.
    fn rest_of_layer(
        &mut self,
        p: &str,
        layer: &BertLayer,
        x: Tensor<3>,
        probs: Tensor<4>,
        eps: f64,
    ) -> Tensor<3> {
        let sa = &layer.attention.self_attn;
        let [b, s, d] = x.dims();
        let h = sa.num_heads;
        let v = sa
            .value
            .forward(x.clone())
            .reshape([b, s, h, d / h])
            .swap_dims(1, 2);
        let ctx = probs.matmul(v).swap_dims(1, 2).reshape([b, s, d]);
        let pre = layer.attention.output.dense.forward(ctx) + x;
        self.layer_norm(&format!("{p}.attention.output.LayerNorm"), pre.clone(), eps);
        let a = layer.attention.output.layer_norm.forward(pre, None);
        let hidden = layer.intermediate.dense.forward(a.clone());
        let (name, kind) = match layer.approx.act {
            Act::Quad => ("quad.square", OpKind::Square),
            Act::Gelu => ("gelu", OpKind::Nonlinear),
            Act::GeluTanh => ("gelu_new", OpKind::Nonlinear),
            Act::Relu => ("relu", OpKind::Compare),
        };
        self.observe(
            format!("{p}.intermediate.{name}"),
            kind,
            max_abs(hidden.clone()),
            None,
        );
        let pre = layer.output.dense.forward(layer.approx.act.apply(hidden)) + a;
        self.layer_norm(&format!("{p}.output.LayerNorm"), pre.clone(), eps);
        layer.output.layer_norm.forward(pre, None)
    }

    /// The head's tanh input: RoBERTa's classifier dense layer, or BERT's pooler.
    fn head(&mut self, model: &SequenceClassifier, last_hidden_state: Tensor<3>) {
        let [b, _, d] = last_hidden_state.dims();
        let first = last_hidden_state.slice(s![.., 0..1, ..]).reshape([b, d]);
        let (name, pre_tanh) = match (&model.bert.pooler, &model.classifier.dense) {
            (_, Some(dense)) => ("classifier.dense.tanh", dense.forward(first)),
            (Some(pooler), None) => ("pooler.tanh", pooler.dense.forward(first)),
            (None, None) => return,
        };
        self.observe(name.into(), OpKind::Nonlinear, max_abs(pre_tanh), None);
    }
}

/// The manifest's `value_ranges` object: where the ranges come from (`data`), what they mean,
/// every op's range at `fractional_bits`, and a summary (largest square input, smallest
/// headroom and input bits, whether everything fits). Also returns the smallest headroom.
pub fn manifest_entry(stats: &RangeStats, fractional_bits: u32, data: Value) -> (Value, f64) {
    let ranges = stats.ranges(fractional_bits);
    let max_square_input = ranges
        .iter()
        .filter(|r| r.kind == OpKind::Square)
        .map(|r| r.max_abs)
        .fold(0.0, f64::max);
    let min_headroom = ranges
        .iter()
        .map(|r| r.headroom_bits)
        .fold(f64::INFINITY, f64::min);
    let min_bits = ranges
        .iter()
        .filter_map(|r| r.min_bits)
        .fold(f64::INFINITY, f64::min);
    let entry = json!({
        "data": data,
        "note": "max |x| of each op's input over every entry of the padded dev batches, \
            padded query rows and masked keys included (an MPC runtime computes them before \
            the mask); min for reciprocal / inverse-square-root inputs. headroom_bits: \
            63 − 2f − log2(max_abs²) for a square, 63 − 2f − log2(max_abs) otherwise; \
            min_bits: log2(min·2^f). Estimates from dev data: inputs outside it can exceed them.",
        "ops": ranges,
        "summary": {
            "max_square_input": max_square_input,
            "min_headroom_bits": min_headroom,
            "min_input_bits": if min_bits.is_finite() { json!(min_bits) } else { Value::Null },
            "fits": min_headroom > 0.0 && min_bits >= 0.0,
        },
    });
    (entry, min_headroom)
}
