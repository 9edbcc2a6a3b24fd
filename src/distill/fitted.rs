//! The fitted start (`student.init = "fitted"`): the teacher's weights, refitted so that each
//! approximation starts as close to what it replaces as the weights around it allow.
//!
//! MPCFormer starts the student from the teacher's weights with Quad and 2Quad switched on, and
//! leaves distillation to undo the damage: Quad(0) = 0.5 where GeLU(0) = 0, and (s + 5)² is far
//! flatter than exp(s). The protocols fix the formulas, not the layers around them:
//!
//! - **FFN.** Shifting neuron j's up-projection bias by β_j and scaling its down-projection
//!   column by γ_j makes it compute γ_j·Quad(z + β_j), which is any quadratic a·z² + b·z + c
//!   with a > 0 (c goes into the down-projection's bias). Each neuron gets the least-squares
//!   quadratic from its pre-activations to the teacher's activations on training examples.
//! - **2Quad.** Scaling a head's queries by α turns its scores s into α·s, so the head computes
//!   (α·s + c)²; α is chosen from a grid to minimise KL(teacher's softmax ‖ 2Quad) on the same
//!   examples. This changes the student's scores, so stage 1 must match attention
//!   probabilities (`stage1.attention_target = "probs"`), which the recipe check enforces.
//!
//! - **Key shift** (`student.fit_shift`). Moving a head's key bias by δ adds q·δ to each query's
//!   scores, a per-query constant that softmax ignores (so the teacher's key bias says nothing
//!   about it) but 2ReLU and 2Quad do not: it sets where 2ReLU cuts a row off and where 2Quad's
//!   parabola turns. δ is taken along the head's mean query q̄ (δ = t·q̄/|q̄|², so a query near
//!   the mean has its scores shifted by t) and t is chosen from a grid, after the query scale.
//!   It is the only attention fit 2ReLU has: its weights do not change when the scores scale.
//!
//! Layers are fitted from the bottom up, each on the inputs the fitted layers below it give it,
//! against the teacher's outputs on the same examples: fitting every layer on the teacher's own
//! activations instead left CoLA's untrained student agreeing with its teacher on 51 % of dev
//! examples, against 87 % this way.
//!
//! The result is an ordinary checkpoint of the student's architecture: export and the MPC engine
//! see weights, not a new formula.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Result, bail};
use burn::prelude::*;

use crate::data::batch::SplitMix64;
use crate::model::approx::{Act, Attn, QUAD_A, QUAD_B, QUAD_C};
use crate::model::bert::{BertLayer, Capture, Inputs, apply_linear};
use crate::model::load::RawTensor;
use crate::model::{Checkpoint, LoadOptions, ModelConfig, SequenceClassifier};

/// The smallest curvature a fitted neuron may take: a flatter fit needs a shift β = b/(2a) − 1
/// so large that fixed-point MPC and training both suffer; such neurons are refitted with a fixed.
pub const MIN_CURVATURE: f64 = 0.02;

/// Training examples the statistics are gathered on (a seeded sample of the training set).
pub const EXAMPLES: usize = 512;

/// Tokens they may hold at most: 512 examples at length 128, so that every GLUE task (length
/// 128) keeps its 512. Longer inputs take fewer examples: the query-scale search costs
/// length² per example and head for each α on the grid, and IMDb's 512 reviews at length 512
/// had not left it after 17 min on 2 cores (one pass over 512² scores per α, head and layer).
pub const TOKENS: usize = EXAMPLES * 128;

/// Which of the training examples (by their token `lengths`) the statistics are gathered on:
/// a prefix of one seeded shuffle, at most [`EXAMPLES`] long and holding at most [`TOKENS`]
/// tokens (and at least one example).
pub fn sample(lengths: &[usize], seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    SplitMix64::new(seed).shuffle(&mut idx);
    idx.truncate(EXAMPLES);
    let mut tokens = 0;
    let kept = idx
        .iter()
        .take_while(|&&i| {
            tokens += lengths[i];
            tokens <= TOKENS
        })
        .count();
    idx.truncate(kept.max(1));
    idx
}

/// The query scales tried for each 2Quad head: geometric from 0.1 to 10^(15/12) ≈ 17.8, with 1
/// (the unfitted start) on it. Heads of all-MiniLM-L6-v2 pick 0.8–17.8 at c = 5 (CoLA, RTE).
/// Not more: as α grows, 2Quad tends to s² / Σ s² and its KL flattens, so a grid to 100 let
/// STS-B heads take 100 beside heads at 1 in the same layer — row sums 2^21.7 apart, more than
/// one fixed-point plan holds under MPC ([`crate::mpc::model::MIN_INPUT_BITS`]).
fn alpha_grid() -> Vec<f64> {
    (-12..=15).map(|i| 10f64.powf(i as f64 / 12.0)).collect()
}

/// The key shifts t tried for each head (`student.fit_shift`), in units of a mean query's
/// scores: −4 to 12 in steps of 0.5, with 0 (no shift) on it. all-MiniLM-L6-v2's scores span
/// about ±10; a shift past the largest makes 2ReLU's rows nearly uniform, which the KL then
/// refuses.
fn shift_grid() -> Vec<f64> {
    (-8..=24).map(|i| i as f64 / 2.0).collect()
}

/// What the fit may change beyond the FFN quadratics and 2Quad's query scales.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FitOptions {
    /// Each approximated head's key shift (module docs).
    pub key_shift: bool,
}

/// What the fit changed, per layer: the error of the approximation before and after.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FitReport {
    pub layers: Vec<LayerFit>,
    /// Tokens the statistics were gathered on.
    pub tokens: usize,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerFit {
    /// Mean squared error of the activation against the teacher's, per token and neuron:
    /// Quad as MPCFormer starts it, and fitted. `None` where the layer's FFN was not refitted.
    pub ffn_mse: Option<(f64, f64)>,
    /// Neurons whose fit was held at [`MIN_CURVATURE`].
    pub flat_neurons: usize,
    /// Mean KL(teacher ‖ student) of the attention rows, at α = 1 and fitted.
    pub attention_kl: Option<(f64, f64)>,
    /// The chosen query scale of each 2Quad head.
    pub alphas: Vec<f64>,
    /// The chosen key shift t of each head (`student.fit_shift`; empty without it).
    pub shifts: Vec<f64>,
}

impl fmt::Display for FitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fitted start on {} tokens:", self.tokens)?;
        for (i, l) in self.layers.iter().enumerate() {
            write!(f, "\n  layer {i}:")?;
            if let Some((before, after)) = l.ffn_mse {
                write!(
                    f,
                    " FFN activation MSE {before:.4} → {after:.4} ({} flat neurons)",
                    l.flat_neurons
                )?;
            }
            if let Some((before, after)) = l.attention_kl {
                write!(f, "; attention KL {before:.4} → {after:.4} (")?;
                let range = |v: &[f64]| {
                    let (lo, hi) = v
                        .iter()
                        .fold((f64::MAX, f64::MIN), |(lo, hi), a| (lo.min(*a), hi.max(*a)));
                    format!("{lo:.2}–{hi:.2}")
                };
                let mut parts = Vec::new();
                if !l.alphas.is_empty() {
                    parts.push(format!("query scale {}", range(&l.alphas)));
                }
                if !l.shifts.is_empty() {
                    parts.push(format!("key shift {}", range(&l.shifts)));
                }
                write!(f, "{})", parts.join(", "))?;
            }
        }
        Ok(())
    }
}

/// Power sums of one neuron's pre-activation z and its teacher activation g over tokens:
/// Σz⁰…Σz⁴, Σg, Σz·g, Σz²·g, Σg².
#[derive(Clone, Copy, Debug, Default)]
struct Moments([f64; 9]);

impl Moments {
    fn add(&mut self, z: f64, g: f64) {
        let z2 = z * z;
        let m = &mut self.0;
        m[0] += 1.0;
        m[1] += z;
        m[2] += z2;
        m[3] += z2 * z;
        m[4] += z2 * z2;
        m[5] += g;
        m[6] += z * g;
        m[7] += z2 * g;
        m[8] += g * g;
    }

    /// Σ(a·z² + b·z + c − g)².
    fn sse(&self, (a, b, c): (f64, f64, f64)) -> f64 {
        let m = &self.0;
        let pp = a * a * m[4]
            + 2.0 * a * b * m[3]
            + (b * b + 2.0 * a * c) * m[2]
            + 2.0 * b * c * m[1]
            + c * c * m[0];
        let pg = a * m[7] + b * m[6] + c * m[5];
        (pp - 2.0 * pg + m[8]).max(0.0)
    }

    /// The least-squares quadratic (a, b, c), with a held at `min_a` when the free fit is
    /// flatter; the flag says it was held.
    fn quadratic(&self, min_a: f64) -> ((f64, f64, f64), bool) {
        let m = &self.0;
        let free = solve3(
            [[m[4], m[3], m[2]], [m[3], m[2], m[1]], [m[2], m[1], m[0]]],
            [m[7], m[6], m[5]],
        );
        if let Some([a, b, c]) = free
            && a >= min_a
        {
            return ((a, b, c), false);
        }
        // a fixed: fit b·z + c to g − a·z².
        let a = min_a;
        let rhs = [m[6] - a * m[3], m[5] - a * m[2]];
        let det = m[2] * m[0] - m[1] * m[1];
        if det.abs() < 1e-12 * (m[2] * m[0]).max(1e-300) {
            // One distinct value: a constant through its mean.
            let c = (m[5] - a * m[2]) / m[0].max(1.0);
            return ((a, 0.0, c), true);
        }
        let b = (rhs[0] * m[0] - rhs[1] * m[1]) / det;
        let c = (m[2] * rhs[1] - m[1] * rhs[0]) / det;
        ((a, b, c), true)
    }
}

/// Solves a 3 × 3 system by Gaussian elimination with partial pivoting; `None` if singular.
fn solve3(mut a: [[f64; 3]; 3], mut y: [f64; 3]) -> Option<[f64; 3]> {
    let scale = a.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    for col in 0..3 {
        let pivot = (col..3).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() <= 1e-12 * scale {
            return None;
        }
        a.swap(col, pivot);
        y.swap(col, pivot);
        for row in col + 1..3 {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (v, p) in a[row].iter_mut().zip(pivot_row).skip(col) {
                *v -= f * p;
            }
            y[row] -= f * y[col];
        }
    }
    let mut x = [0.0; 3];
    for row in (0..3).rev() {
        let rest: f64 = (row + 1..3).map(|k| a[row][k] * x[k]).sum();
        x[row] = (y[row] - rest) / a[row][row];
    }
    Some(x)
}

/// Quad's shift and scale (β, γ) that make γ·Quad(z + β) = a·z² + b·z + const, and that const.
fn quad_form(a: f64, b: f64) -> (f64, f64, f64) {
    let gamma = a / QUAD_A;
    let beta = (b / gamma - QUAD_B) / (2.0 * QUAD_A);
    let constant = gamma * (QUAD_A * beta * beta + QUAD_B * beta + QUAD_C);
    (beta, gamma, constant)
}

/// Refits `student` (the teacher's architecture, with its approximations) to the `teacher` on
/// `batches` of training inputs (on the teacher's device), one layer at a time: each layer is
/// fitted on the inputs the already-fitted layers below it give it, so that errors do not
/// compound, against the teacher's outputs on the same examples.
pub fn refit(
    student: SequenceClassifier,
    teacher: &SequenceClassifier,
    batches: &[Inputs],
    options: FitOptions,
) -> Result<(SequenceClassifier, FitReport)> {
    let (s, t) = (&student.config, &teacher.config);
    if (s.num_hidden_layers, s.hidden_size, s.intermediate_size)
        != (t.num_hidden_layers, t.hidden_size, t.intermediate_size)
    {
        bail!(
            "student.init = \"fitted\" needs the teacher's shape (layers, hidden and FFN sizes); this student differs"
        );
    }
    let masks: Vec<Tensor<2>> = batches
        .iter()
        .map(|x| x.attention_mask.clone().float())
        .collect();
    let host_masks: Vec<Vec<f32>> = masks.iter().map(|m| host(m.clone())).collect();
    let teacher_in: Vec<Vec<Tensor<3>>> = batches
        .iter()
        .map(|x| teacher.bert.forward(x, Capture::HIDDEN).hidden_states)
        .collect();
    let mut report = FitReport {
        layers: Vec::new(),
        tokens: host_masks.iter().flatten().filter(|m| **m > 0.0).count(),
    };
    let mut weights = Weights::of(&student);
    // Fitted without autodiff: on a training device every op would be recorded, and the graph
    // of every batch through every layer kept alive (19 GB on RTE).
    let mut model = student.clone().valid();
    let mut student_in: Vec<Tensor<3>> = batches
        .iter()
        .map(|x| model.bert.embeddings.forward(x))
        .collect();
    for (l, t_layer) in teacher.bert.encoder.layer.iter().enumerate() {
        let fitting = LayerInputs {
            masks: &masks,
            host_masks: &host_masks,
            teacher_in: &teacher_in,
            student_in: &student_in,
        };
        let want = model.config.approx.layer(l);
        let mut fit = LayerFit::default();
        if t_layer.approx.attn == Attn::Softmax && want.attn != Attn::Softmax {
            model = fit_attention(model, &mut weights, t_layer, l, &fitting, options, &mut fit)?;
        }
        if want.act == Act::Quad && t_layer.approx.act != Act::Quad {
            let neurons = ffn_moments(&model, t_layer, l, &fitting);
            let (mse, flat) = weights.fit_ffn(&model.config, l, &neurons)?;
            fit.ffn_mse = Some(mse);
            fit.flat_neurons = flat;
            model = weights.load(model)?;
        }
        for (x, mask) in student_in.iter_mut().zip(&masks) {
            *x = model.bert.encoder.layer[l]
                .forward(x.clone(), mask.clone(), false)
                .0;
        }
        report.layers.push(fit);
    }
    drop(model);
    Ok((weights.load(student)?, report))
}

/// Layer `l`'s attention, fitted to the teacher's softmax: each 2Quad head's query scale, then
/// (with `options.key_shift`) each head's key shift, folded into `weights` and loaded into the
/// returned model; what changed goes into `fit`.
fn fit_attention(
    mut model: SequenceClassifier,
    weights: &mut Weights,
    t_layer: &BertLayer,
    l: usize,
    fitting: &LayerInputs,
    options: FitOptions,
    fit: &mut LayerFit,
) -> Result<SequenceClassifier> {
    let attn = model.config.approx.layer(l).attn;
    let c = model.config.approx.c;
    if attn == Attn::TwoQuad {
        let grid = alpha_grid();
        let (kl, rows) = head_kl(&model, t_layer, l, fitting, grid.len(), |_, s, m, i| {
            Attn::TwoQuad.composite(s * grid[i], m, c)
        });
        let (before, after, alphas) = pick(&kl, &grid, 1.0, rows);
        for (head, alpha) in alphas.iter().enumerate() {
            weights.scale_head(&model.config, l, head, *alpha)?;
        }
        fit.attention_kl = Some((before, after));
        fit.alphas = alphas;
        model = weights.load(model)?;
    }
    if options.key_shift {
        let shifts = shift_grid();
        let means = mean_queries(&model, l, fitting);
        let units = shift_units(&model, l, fitting, &means);
        let (kl, rows) = head_kl(&model, t_layer, l, fitting, shifts.len(), |b, s, m, i| {
            attn.composite(s + units[b].clone() * shifts[i], m, c)
        });
        let (before, after, chosen) = pick(&kl, &shifts, 0.0, rows);
        for (head, t) in chosen.iter().enumerate() {
            weights.shift_keys(&model.config, l, head, &means[head], *t)?;
        }
        fit.attention_kl = Some((fit.attention_kl.map_or(before, |(b, _)| b), after));
        fit.shifts = chosen;
        model = weights.load(model)?;
    }
    Ok(model)
}

/// What one layer is fitted on: per batch, the key mask (as a tensor and on the host), the
/// teacher's input to every layer, and the fitted student's input to this one.
struct LayerInputs<'a> {
    masks: &'a [Tensor<2>],
    host_masks: &'a [Vec<f32>],
    teacher_in: &'a [Vec<Tensor<3>>],
    student_in: &'a [Tensor<3>],
}

/// Per head and grid point `i < points`, the KL of layer `l`'s attention from the teacher's
/// softmax attention, summed over real query rows; and the number of those rows. `candidate(b,
/// scores, key_mask, i)` gives the student's weights on batch `b` at point `i` from its scores.
fn head_kl(
    model: &SequenceClassifier,
    t_layer: &BertLayer,
    l: usize,
    ins: &LayerInputs,
    points: usize,
    candidate: impl Fn(usize, Tensor<4>, Tensor<2>, usize) -> Tensor<4>,
) -> (Vec<Vec<f64>>, f64) {
    let heads = model.config.num_attention_heads;
    let (mut kl, mut rows) = (vec![vec![0.0; points]; heads], 0.0);
    let s_layer = &model.bert.encoder.layer[l];
    let weights_of = |block: (Tensor<3>, Option<(Tensor<4>, Tensor<4>)>)| {
        block.1.expect("attention weights were asked for")
    };
    for (b, mask) in ins.masks.iter().enumerate() {
        let (_, p) =
            weights_of(t_layer.attention_block(ins.teacher_in[b][l].clone(), mask.clone(), true));
        let (scores, _) =
            weights_of(s_layer.attention_block(ins.student_in[b].clone(), mask.clone(), true));
        let scores = scores.cast(burn::tensor::DType::F32);
        add_kl(&mut kl, p, mask.clone(), points, |i| {
            candidate(b, scores.clone(), mask.clone(), i)
        });
        rows += ins.host_masks[b].iter().sum::<f32>() as f64;
    }
    (kl, rows)
}

/// The student's queries of layer `l` as its scores use them (`Wq·x + b` over √d_head),
/// [B, H, S, d_head], on batch `b`.
fn queries(model: &SequenceClassifier, l: usize, ins: &LayerInputs, b: usize) -> Tensor<4> {
    let attn = &model.bert.encoder.layer[l].attention.self_attn;
    let q = apply_linear(&attn.query, ins.student_in[b].clone());
    let [batch, s, d] = q.dims();
    let h = model.config.num_attention_heads;
    let dh = d / h;
    (q.cast(burn::tensor::DType::F32) * (1.0 / (dh as f64).sqrt()))
        .reshape([batch, s, h, dh])
        .swap_dims(1, 2)
}

/// Each head's mean query over the real tokens of every batch (q̄ of the key shift).
fn mean_queries(model: &SequenceClassifier, l: usize, ins: &LayerInputs) -> Vec<Vec<f64>> {
    let h = model.config.num_attention_heads;
    let dh = model.config.hidden_size / h;
    let (mut sums, mut count) = (vec![vec![0.0f64; dh]; h], 0.0);
    for (b, mask) in ins.host_masks.iter().enumerate() {
        let q = queries(model, l, ins, b);
        let [_, _, s, _] = q.dims();
        let q = host(q);
        for (head, sum) in sums.iter_mut().enumerate() {
            for (row, m) in mask.iter().enumerate() {
                if *m == 0.0 {
                    continue;
                }
                let (bi, t) = (row / s, row % s);
                let at = ((bi * h + head) * s + t) * dh;
                for (acc, v) in sum.iter_mut().zip(&q[at..at + dh]) {
                    *acc += *v as f64;
                }
            }
        }
        count += mask.iter().filter(|m| **m > 0.0).count() as f64;
    }
    for sum in &mut sums {
        sum.iter_mut().for_each(|v| *v /= count.max(1.0));
    }
    sums
}

/// Per batch, the shift each query's scores take per unit of t: q·q̄/|q̄|², [B, H, S, 1].
fn shift_units(
    model: &SequenceClassifier,
    l: usize,
    ins: &LayerInputs,
    means: &[Vec<f64>],
) -> Vec<Tensor<4>> {
    let h = means.len();
    let dh = means[0].len();
    let unit: Vec<f32> = means
        .iter()
        .flat_map(|m| {
            let norm2 = m.iter().map(|v| v * v).sum::<f64>().max(1e-12);
            m.iter().map(move |v| (v / norm2) as f32)
        })
        .collect();
    (0..ins.masks.len())
        .map(|b| {
            let q = queries(model, l, ins, b);
            let u =
                Tensor::<4>::from_data(TensorData::new(unit.clone(), [1, h, 1, dh]), &q.device());
            (q * u).sum_dim(3)
        })
        .collect()
}

/// Per FFN neuron of layer `l`, the moments of the student's pre-activation against the
/// teacher's activation, over real tokens: what the least-squares quadratic is solved from.
fn ffn_moments(
    model: &SequenceClassifier,
    t_layer: &BertLayer,
    l: usize,
    ins: &LayerInputs,
) -> Vec<Moments> {
    let mut neurons = vec![Moments::default(); model.config.intermediate_size];
    let s_layer = &model.bert.encoder.layer[l];
    for (b, mask) in ins.masks.iter().enumerate() {
        let (s_out, _) = s_layer.attention_block(ins.student_in[b].clone(), mask.clone(), false);
        let z = apply_linear(&s_layer.intermediate.dense, s_out);
        let (t_out, _) = t_layer.attention_block(ins.teacher_in[b][l].clone(), mask.clone(), false);
        let g = t_layer
            .approx
            .act
            .apply(apply_linear(&t_layer.intermediate.dense, t_out));
        add_moments(&mut neurons, &z, &g, &ins.host_masks[b]);
    }
    neurons
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .try_into_vec_as::<f32>()
        .expect("a float tensor reads as f32")
}

/// Adds one batch's (z, g) pairs of real tokens to each neuron's moments.
fn add_moments(neurons: &mut [Moments], z: &Tensor<3>, g: &Tensor<3>, mask: &[f32]) {
    let f = neurons.len();
    let z = host(z.clone());
    let g = host(g.clone());
    for (t, m) in mask.iter().enumerate() {
        if *m == 0.0 {
            continue;
        }
        let (zr, gr) = (&z[t * f..(t + 1) * f], &g[t * f..(t + 1) * f]);
        for (n, (zv, gv)) in neurons.iter_mut().zip(zr.iter().zip(gr)) {
            n.add(*zv as f64, *gv as f64);
        }
    }
}

/// Adds Σ KL(p ‖ qᵢ) over real query rows, per head, for each grid point i < `points`: `p` the
/// teacher's attention weights, `q(i)` the student's at point i.
fn add_kl(
    kl: &mut [Vec<f64>],
    p: Tensor<4>,
    key_mask: Tensor<2>,
    points: usize,
    q: impl Fn(usize) -> Tensor<4>,
) {
    let [b, h, s, _] = p.dims();
    let p = p.cast(burn::tensor::DType::F32);
    let rows = key_mask.reshape([b, 1, s, 1]);
    // Masked keys carry p = 0 (exp(−10000)), so they add 0 whatever q is there.
    let log_p = (p.clone() + 1e-9).log();
    for i in 0..points {
        let per = (p.clone() * (log_p.clone() - (q(i) + 1e-9).log()) * rows.clone())
            .sum_dim(3)
            .sum_dim(2)
            .sum_dim(0)
            .reshape([h]);
        for (head, x) in kl.iter_mut().zip(host(per)) {
            head[i] += x as f64;
        }
    }
}

/// Each head's best point on `grid`, with the mean KL per row at `neutral` (the unfitted value,
/// which must be on the grid) and at the chosen points.
fn pick(kl: &[Vec<f64>], grid: &[f64], neutral: f64, rows: f64) -> (f64, f64, Vec<f64>) {
    let start = grid
        .iter()
        .position(|a| (*a - neutral).abs() < 1e-9)
        .expect("the unfitted value is on the grid");
    let rows = rows.max(1.0);
    let (mut before, mut after, mut chosen) = (0.0, 0.0, Vec::new());
    for kls in kl {
        let best = (0..grid.len())
            .min_by(|&i, &j| kls[i].total_cmp(&kls[j]))
            .expect("a non-empty grid");
        before += kls[start] / rows;
        after += kls[best] / rows;
        chosen.push(grid[best]);
    }
    let n = kl.len().max(1) as f64;
    (before / n, after / n, chosen)
}

/// The student's weights as host tensors under their HF names (HF layout: weights [out, in]),
/// edited layer by layer and loaded back.
struct Weights {
    tensors: BTreeMap<String, Vec<f32>>,
    shapes: BTreeMap<String, Vec<usize>>,
}

impl Weights {
    fn of(model: &SequenceClassifier) -> Self {
        let mut w = Weights {
            tensors: BTreeMap::new(),
            shapes: BTreeMap::new(),
        };
        for t in model.hf_tensors() {
            w.shapes.insert(t.name.clone(), t.shape);
            w.tensors.insert(t.name, t.data);
        }
        w
    }

    fn load(&self, model: SequenceClassifier) -> Result<SequenceClassifier> {
        let mut ckpt = Checkpoint {
            source: "fitted student (in memory)".into(),
            ..Default::default()
        };
        for (name, data) in &self.tensors {
            ckpt.tensors.insert(
                name.clone(),
                RawTensor {
                    shape: self.shapes[name].clone(),
                    data: Ok(data.clone()),
                    file: "fitted".into(),
                },
            );
        }
        let options = LoadOptions {
            reinit_mismatched_head: false,
        };
        Ok(model.load_checkpoint(&ckpt, options)?.0)
    }

    fn get(&mut self, config: &ModelConfig, layer: usize, rest: &str) -> Result<&mut Vec<f32>> {
        let name = format!("{}.encoder.layer.{layer}.{rest}", config.arch.prefix());
        self.tensors
            .get_mut(&name)
            .ok_or_else(|| anyhow::anyhow!("fitted start: the student has no `{name}`"))
    }

    /// Fits each FFN neuron's quadratic and folds it into the two dense layers of `layer`.
    /// Returns the mean squared error (Quad as is → fitted) and the flat neurons.
    fn fit_ffn(
        &mut self,
        config: &ModelConfig,
        layer: usize,
        neurons: &[Moments],
    ) -> Result<((f64, f64), usize)> {
        let f = neurons.len();
        let mut up_bias = std::mem::take(self.get(config, layer, "intermediate.dense.bias")?);
        let mut down = std::mem::take(self.get(config, layer, "output.dense.weight")?);
        let mut down_bias = std::mem::take(self.get(config, layer, "output.dense.bias")?);
        let d = down_bias.len();
        if up_bias.len() != f || down.len() != d * f {
            bail!("fitted start: layer {layer}'s FFN shapes do not match its width {f}");
        }
        let (mut before, mut after, mut count, mut flat) = (0.0, 0.0, 0.0, 0);
        for (j, m) in neurons.iter().enumerate() {
            let ((a, b, c), held) = m.quadratic(MIN_CURVATURE);
            flat += held as usize;
            before += m.sse((QUAD_A, QUAD_B, QUAD_C));
            after += m.sse((a, b, c));
            count += m.0[0];
            let (beta, gamma, constant) = quad_form(a, b);
            up_bias[j] += beta as f32;
            let offset = c - constant;
            for (i, out_bias) in down_bias.iter_mut().enumerate() {
                let w = &mut down[i * f + j];
                *out_bias += (*w as f64 * offset) as f32;
                *w = (*w as f64 * gamma) as f32;
            }
        }
        *self.get(config, layer, "intermediate.dense.bias")? = up_bias;
        *self.get(config, layer, "output.dense.weight")? = down;
        *self.get(config, layer, "output.dense.bias")? = down_bias;
        let count = count.max(1.0);
        Ok(((before / count, after / count), flat))
    }

    /// Adds t·q̄/|q̄|² to head `head`'s key bias in `layer`, which adds t·(q·q̄)/|q̄|² to every
    /// score of a query q (`mean` = q̄, a scaled query as the scores use it).
    fn shift_keys(
        &mut self,
        config: &ModelConfig,
        layer: usize,
        head: usize,
        mean: &[f64],
        t: f64,
    ) -> Result<()> {
        let dh = config.hidden_size / config.num_attention_heads;
        let norm2 = mean.iter().map(|v| v * v).sum::<f64>().max(1e-12);
        let bias = self.get(config, layer, "attention.self.key.bias")?;
        for (v, m) in bias[head * dh..(head + 1) * dh].iter_mut().zip(mean) {
            *v = (*v as f64 + t * m / norm2) as f32;
        }
        Ok(())
    }

    /// Scales head `head`'s query projection (weight rows and bias) in `layer` by `alpha`.
    fn scale_head(
        &mut self,
        config: &ModelConfig,
        layer: usize,
        head: usize,
        alpha: f64,
    ) -> Result<()> {
        let d = config.hidden_size;
        let dh = d / config.num_attention_heads;
        let rows = head * dh..(head + 1) * dh;
        let w = self.get(config, layer, "attention.self.query.weight")?;
        for v in &mut w[rows.start * d..rows.end * d] {
            *v = (*v as f64 * alpha) as f32;
        }
        let bias = self.get(config, layer, "attention.self.query.bias")?;
        for v in &mut bias[rows] {
            *v = (*v as f64 * alpha) as f32;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_keeps_512_examples_at_length_128_and_a_quarter_at_512() {
        let short = sample(&[128; 8551], 42);
        assert_eq!(short.len(), 512);
        let long = sample(&[512; 1000], 42);
        assert_eq!(long.len(), 65_536 / 512);
        // The long sample is the short one's prefix: one seeded shuffle, cut by the budget.
        let all = sample(&[1; 1000], 42);
        assert_eq!(all.len(), 512);
        assert_eq!(long[..], all[..long.len()]);
        let mut distinct = all.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 512);
        assert!(all.iter().all(|&i| i < 1000));
    }

    #[test]
    fn the_sample_holds_at_most_the_token_budget_but_never_nothing() {
        let lengths: Vec<usize> = (0..3000).map(|i| 1 + (i * 7919) % 512).collect();
        let s = sample(&lengths, 7);
        let tokens: usize = s.iter().map(|&i| lengths[i]).sum();
        assert!(
            tokens <= TOKENS && s.len() < EXAMPLES,
            "{tokens} tokens, {}",
            s.len()
        );
        // One more example of the same shuffle would have passed the budget.
        let next = sample(&vec![1; 3000], 7)[s.len()];
        assert!(tokens + lengths[next] > TOKENS);
        assert_eq!(sample(&[100_000; 10], 1).len(), 1);
        assert!(sample(&[], 1).is_empty());
    }

    fn moments(points: &[(f64, f64)]) -> Moments {
        let mut m = Moments::default();
        for (z, g) in points {
            m.add(*z, *g);
        }
        m
    }

    #[test]
    fn an_exact_quadratic_is_recovered() {
        let pts: Vec<(f64, f64)> = (-20..=20)
            .map(|i| {
                let z = i as f64 / 5.0;
                (z, 0.3 * z * z - 0.7 * z + 0.2)
            })
            .collect();
        let ((a, b, c), held) = moments(&pts).quadratic(MIN_CURVATURE);
        assert!(!held);
        assert!((a - 0.3).abs() < 1e-9 && (b + 0.7).abs() < 1e-9 && (c - 0.2).abs() < 1e-9);
        assert!(moments(&pts).sse((a, b, c)) < 1e-12);
    }

    #[test]
    fn the_sum_of_squares_matches_a_direct_sum() {
        let pts: [(f64, f64); 5] = [(-1.5, 0.2), (0.0, 0.0), (0.7, 0.9), (2.0, 1.1), (3.0, 3.2)];
        let p: (f64, f64, f64) = (0.2, -0.1, 0.4);
        let direct: f64 = pts
            .iter()
            .map(|(z, g)| (p.0 * z * z + p.1 * z + p.2 - g).powi(2))
            .sum();
        assert!((moments(&pts).sse(p) - direct).abs() < 1e-9);
    }

    #[test]
    fn a_flat_target_is_held_at_the_minimum_curvature() {
        // GeLU far left is ≈ 0: the free fit is flat, so a is held and b, c fit the rest.
        let pts: Vec<(f64, f64)> = (0..50).map(|i| (-6.0 + i as f64 * 0.05, 0.0)).collect();
        let ((a, b, c), held) = moments(&pts).quadratic(MIN_CURVATURE);
        assert!(held);
        assert_eq!(a, MIN_CURVATURE);
        // The best line through −a·z² on z ∈ [−6, −3.55]: check against its normal equations.
        let (n, sz, szz) = pts.iter().fold((0.0, 0.0, 0.0), |(n, s, ss), (z, _)| {
            (n + 1.0, s + z, ss + z * z)
        });
        let (sr, szr) = pts.iter().fold((0.0, 0.0), |(s, sz), (z, _)| {
            let r = -a * z * z;
            (s + r, sz + z * r)
        });
        assert!((b * szz + c * sz - szr).abs() < 1e-6);
        assert!((b * sz + c * n - sr).abs() < 1e-6);
    }

    #[test]
    fn quad_with_shift_and_scale_is_the_fitted_quadratic() {
        for (a, b) in [(0.3, 0.5), (0.05, -0.2), (1.0, 2.0)] {
            let (beta, gamma, constant) = quad_form(a, b);
            for z in [-3.0, -0.5, 0.0, 1.25, 4.0] {
                let x: f64 = z + beta;
                let quad = QUAD_A * x * x + QUAD_B * x + QUAD_C;
                let want = a * z * z + b * z + constant;
                assert!((gamma * quad - want).abs() < 1e-9, "a={a} b={b} z={z}");
            }
        }
    }
}
