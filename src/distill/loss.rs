//! Distillation losses, exactly as MPCFormer's `task_distill.py` (a TinyBERT fork) computes them.
//!
//! Stage 1 ("intermediate"): Σ MSE over attention scores + Σ MSE over hidden states, unweighted.
//! Stage 2 ("prediction"): soft cross-entropy against the teacher's logits (classification) or MSE
//! against the gold score (regression).
//!
//! Every loss computes in f32: under mixed precision (`train::precision`) the student's outputs
//! may be half precision, and a sum of squares over a batch's attention scores is what overflows
//! f16 first. The casts are no-ops on f32 inputs.

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::{log_softmax, softmax};

use crate::model::approx::MASK_NEG;

/// Scores as TinyBERT's layers return them: `QKᵀ/√d` plus the additive key mask (−10000 on
/// padded keys). Our encoder returns the raw scores; this puts the mask back.
pub fn with_additive_mask(scores: Tensor<4>, key_mask: Tensor<2>) -> Tensor<4> {
    let [b, _, _, lk] = scores.dims();
    let key_mask = key_mask.cast(DType::F32);
    let additive = (key_mask.reshape([b, 1, 1, lk]).neg() + 1.0) * MASK_NEG;
    scores.cast(DType::F32) + additive
}

/// `F.mse_loss`: mean over all elements.
pub fn mse<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<1> {
    (a.cast(DType::F32) - b.cast(DType::F32)).square().mean()
}

/// TinyBERT's attention term: entries ≤ −100 (the masked keys) are set to 0 in both the student's
/// and the teacher's masked scores before the MSE, so padding contributes nothing.
pub fn attention_mse(student_masked: Tensor<4>, teacher_masked: Tensor<4>) -> Tensor<1> {
    let zero_low = |t: Tensor<4>| {
        let low = t.clone().lower_equal_elem(-100.0);
        t.mask_fill(low, 0.0)
    };
    mse(zero_low(student_masked), zero_low(teacher_masked))
}

/// What stage 1 matches of each attention layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionTarget {
    /// MSE between the raw scores, masked as TinyBERT (the reference). Under 2Quad it holds the
    /// student's scores where the teacher's softmax wants them, although `(s + c)²` turns the
    /// same scores into other weights (and is not even monotone below `−c`).
    #[default]
    Scores,
    /// KL(teacher ‖ student) between the attention distributions of each real query, averaged
    /// over heads and queries (MiniLM's attention transfer): the student may move its scores
    /// wherever its own normaliser gives the teacher's weights.
    Probs,
}

impl AttentionTarget {
    pub fn is_scores(&self) -> bool {
        *self == AttentionTarget::Scores
    }
}

/// How stage 1 weighs each layer's hidden-state MSE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenNorm {
    /// The plain MSE summed over layers (the reference): a layer whose states are larger
    /// weighs more in the sum.
    #[default]
    None,
    /// Each layer's MSE divided by the teacher's mean square in that layer (no gradient through
    /// it), so each term is a relative error and every layer pulls alike.
    Layer,
}

impl HiddenNorm {
    pub fn is_none(&self) -> bool {
        *self == HiddenNorm::None
    }
}

/// One layer's hidden-state term of stage 1, normalised as `norm` says.
pub fn hidden_mse(student: Tensor<3>, teacher: Tensor<3>, norm: HiddenNorm) -> Tensor<1> {
    match norm {
        HiddenNorm::None => mse(student, teacher),
        HiddenNorm::Layer => {
            let power = teacher.clone().cast(DType::F32).square().mean().detach();
            mse(student, teacher) / power
        }
    }
}

/// What stage 2 fits on a regression task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegressionTarget {
    /// The gold score, as the reference does for STS-B: stage 2 is then plain supervision.
    #[default]
    Gold,
    /// The teacher's score (MSE), the regression form of logit distillation; needs no label,
    /// so stage 2 can train on transfer examples.
    Teacher,
}

impl RegressionTarget {
    pub fn is_gold(&self) -> bool {
        *self == RegressionTarget::Gold
    }
}

/// Added inside the logarithms of [`attention_kl`]: 2Quad gives exactly 0 weight at `s = −c`.
pub const KL_EPS: f64 = 1e-6;

/// Σₖ p·(ln(p + ε) − ln(q + ε)) per query row of `teacher` p and `student` q ([B, H, Lq, Lk],
/// each row a distribution over the real keys), averaged over heads and the real queries of
/// `query_mask` ([B, Lq], 1 = real token).
pub fn attention_kl(student: Tensor<4>, teacher: Tensor<4>, query_mask: Tensor<2>) -> Tensor<1> {
    let [b, h, lq, _] = student.dims();
    let (q, p) = (student.cast(DType::F32), teacher.cast(DType::F32));
    let rows = (p.clone() * ((p + KL_EPS).log() - (q + KL_EPS).log())).sum_dim(3);
    let m = query_mask.cast(DType::F32).reshape([b, 1, lq, 1]);
    let real_rows = m.clone().sum() * h as f64;
    (rows * m).sum() / real_rows
}

/// How soft cross-entropy is normalised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SoftCeNorm {
    /// Per-example cross-entropy averaged over the batch (the textbook KD loss).
    #[default]
    PerExample,
    /// The reference's literal `(-p·log q).mean()` over B·K elements, i.e. per-example / K.
    ElementMean,
}

/// How stage 2 matches the teacher's logits on a classification task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogitLoss {
    /// Soft cross-entropy against the teacher's softmax at temperature T (the reference).
    #[default]
    SoftCe,
    /// MSE between the raw logits (Kim et al., 2021). Where a weak teacher's classes are
    /// nearly tied its softmax is flat and soft cross-entropy barely pulls the student to the
    /// teacher's side; the logit difference keeps pulling until the margin itself matches.
    Mse,
}

impl LogitLoss {
    pub fn is_soft_ce(&self) -> bool {
        *self == LogitLoss::SoftCe
    }
}

/// `-(softmax(t/T) · log_softmax(s/T)).sum(-1)`, normalised as `norm` says. No T² factor (as the
/// reference).
pub fn soft_cross_entropy(
    student: Tensor<2>,
    teacher: Tensor<2>,
    temperature: f64,
    norm: SoftCeNorm,
) -> Tensor<1> {
    let [_, k] = student.dims();
    let (student, teacher) = (student.cast(DType::F32), teacher.cast(DType::F32));
    let p = softmax(teacher / temperature, 1);
    let ce = (p * log_softmax(student / temperature, 1))
        .sum_dim(1)
        .mean()
        .neg();
    match norm {
        SoftCeNorm::PerExample => ce,
        SoftCeNorm::ElementMean => ce / k as f64,
    }
}

#[cfg(test)]
mod tests {
    //! Values and gradients against `tests/fixtures/losses` (PyTorch, float64 from float32 inputs).
    use super::*;
    use crate::io::{HostTensor, load_safetensors};
    use std::collections::BTreeMap;

    fn fixture(case: &str) -> BTreeMap<String, HostTensor> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/losses")
            .join(format!("{case}.safetensors"));
        load_safetensors(&p).unwrap()
    }

    fn plain<const D: usize>(t: &HostTensor, device: &Device) -> Tensor<D> {
        let data: Vec<f32> = t.to_f64().iter().map(|&x| x as f32).collect();
        Tensor::<D>::from_data(TensorData::new(data, t.shape().to_vec()), device)
    }

    fn leaf<const D: usize>(t: &HostTensor, device: &Device) -> Tensor<D> {
        plain(t, device).require_grad()
    }

    fn scalar(t: Tensor<1>) -> f64 {
        t.into_scalar::<f32>() as f64
    }

    /// Checks a loss value (relative 1e-5) and its gradient (1e-5 of the gradient's scale).
    fn check<const D: usize>(
        f: &BTreeMap<String, HostTensor>,
        name: &str,
        student: Tensor<D>,
        loss: Tensor<1>,
    ) {
        let want = f[&format!("out.{name}")].to_f64()[0];
        let got = scalar(loss.clone());
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1e-3),
            "{name}: {got} vs {want}"
        );
        let grads = loss.backward();
        let g = HostTensor::from_float(student.grad(&grads).expect("student gradient"));
        let r = &f[&format!("out.grad.{name}")];
        assert_eq!(g.shape(), r.shape(), "{name}");
        let rv = r.to_f64();
        let scale = rv.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
        let d = g
            .to_f64()
            .iter()
            .zip(&rv)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(d <= 1e-5 * scale, "grad {name}: {d:e} vs scale {scale:e}");
    }

    fn layers(f: &BTreeMap<String, HostTensor>, prefix: &str) -> usize {
        f.keys().filter(|k| k.starts_with(prefix)).count()
    }

    #[test]
    fn losses_match_reference() {
        let device = Device::flex().autodiff();
        for case in ["case0", "case1"] {
            let f = fixture(case);
            let nh = layers(&f, "in.student_hidden.");
            let mut hidden_total = Tensor::<1>::zeros([1], &device);
            for l in 0..nh {
                let s: Tensor<3> = leaf(&f[&format!("in.student_hidden.{l}")], &device);
                let t: Tensor<3> = leaf(&f[&format!("in.teacher_hidden.{l}")], &device);
                check(
                    &f,
                    &format!("hidden_mse.{l}"),
                    s.clone(),
                    mse(s.clone(), t.clone()),
                );
                hidden_total = hidden_total + mse(s, t);
            }
            let want = f["out.hidden_mse_total"].to_f64()[0];
            assert!((scalar(hidden_total) - want).abs() < 1e-5 * want);

            let na = layers(&f, "in.student_att_scores.");
            for l in 0..na {
                let s: Tensor<4> = leaf(&f[&format!("in.student_att_scores.{l}")], &device);
                let t: Tensor<4> = leaf(&f[&format!("in.teacher_att_scores.{l}")], &device);
                check(
                    &f,
                    &format!("att_mse_tinybert.{l}"),
                    s.clone(),
                    attention_mse(s.clone(), t.clone()),
                );
                check(&f, &format!("att_mse_raw.{l}"), s.clone(), mse(s, t));
            }

            for (name, temp, norm) in [
                ("soft_ce_T1", 1.0, SoftCeNorm::PerExample),
                ("soft_ce_T2", 2.0, SoftCeNorm::PerExample),
                ("soft_ce_elemmean_T1", 1.0, SoftCeNorm::ElementMean),
                ("soft_ce_elemmean_T2", 2.0, SoftCeNorm::ElementMean),
            ] {
                let s: Tensor<2> = leaf(&f["in.student_logits"], &device);
                let t: Tensor<2> = leaf(&f["in.teacher_logits"], &device).detach();
                check(&f, name, s.clone(), soft_cross_entropy(s, t, temp, norm));
            }
            let s: Tensor<2> = leaf(&f["in.student_logits_reg"], &device);
            let t: Tensor<2> = leaf(&f["in.teacher_logits_reg"], &device).detach();
            check(&f, "logits_mse", s.clone(), mse(s, t));
        }
    }

    /// The KL term and its gradient `−p / (q + ε)` per real row, / (heads · real queries),
    /// against plain f64 loops over distributions from softmax (teacher) and 2Quad (student).
    #[test]
    fn attention_kl_matches_direct_sum() {
        use crate::model::approx::Attn;
        let device = Device::flex().autodiff();
        let [b, h, l] = [2usize, 3, 5];
        let raw: Vec<f32> = (0..b * h * l * l)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 3.0)
            .collect();
        let scores = |shift: f32| {
            let v: Vec<f32> = raw.iter().map(|x| x * 0.7 + shift).collect();
            Tensor::<4>::from_data(TensorData::new(v, [b, h, l, l]), &device)
        };
        let mask_rows = [[1.0f32, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]];
        let mask = Tensor::<2>::from_data(TensorData::new(mask_rows.concat(), [b, l]), &device);
        let p = Attn::Softmax.composite(scores(0.0), mask.clone(), 5.0);
        let q = Attn::TwoQuad
            .composite(scores(0.4), mask.clone(), 5.0)
            .detach()
            .require_grad();
        let loss = attention_kl(q.clone(), p.clone(), mask);
        let got = scalar(loss.clone());
        let grad = HostTensor::from_float(q.grad(&loss.backward()).unwrap()).to_f64();
        let (pv, qv) = (
            HostTensor::from_float(p.detach()).to_f64(),
            HostTensor::from_float(q.detach()).to_f64(),
        );
        let real_queries: f64 = mask_rows.iter().flatten().map(|&x| x as f64).sum();
        let n = h as f64 * real_queries;
        let (mut want, mut worst) = (0.0f64, 0.0f64);
        for (bi, row) in mask_rows.iter().enumerate() {
            for hi in 0..h {
                for (qi, &real) in row.iter().enumerate() {
                    for k in 0..l {
                        let i = ((bi * h + hi) * l + qi) * l + k;
                        let (pk, qk, real) = (pv[i], qv[i], real as f64);
                        want += real * pk * ((pk + KL_EPS).ln() - (qk + KL_EPS).ln()) / n;
                        let g = -real * pk / (qk + KL_EPS) / n;
                        worst = worst.max((grad[i] - g).abs() / g.abs().max(1e-3));
                    }
                }
            }
        }
        assert!(want > 0.01, "the two normalisers should disagree: {want}");
        assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
        assert!(worst <= 1e-4, "gradient: worst relative gap {worst:e}");
    }

    /// `layer`: MSE / mean(t²) with the gradient `2(s − t) / (n · mean(t²))` on the student and
    /// none on the teacher; `none`: the plain MSE. Against f64 sums.
    #[test]
    fn hidden_mse_per_layer_is_the_relative_error() {
        let device = Device::flex().autodiff();
        let shape = [2usize, 3, 4];
        let n = shape.iter().product::<usize>();
        let vals = |a: f32, b: usize| -> Vec<f32> {
            (0..n).map(|i| a * (((i * b) % 11) as f32 - 5.0)).collect()
        };
        let (sv, tv) = (vals(0.3, 7), vals(2.5, 3));
        let leaf = |v: &Vec<f32>| {
            Tensor::<3>::from_data(TensorData::new(v.clone(), shape), &device).require_grad()
        };
        let (s, t) = (leaf(&sv), leaf(&tv));
        let sq_err: f64 = sv
            .iter()
            .zip(&tv)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum();
        let power: f64 = tv.iter().map(|b| (*b as f64).powi(2)).sum::<f64>() / n as f64;
        assert!(
            power > 2.0,
            "the test needs a teacher far from unit scale: {power}"
        );
        let plain = hidden_mse(s.clone(), t.clone(), HiddenNorm::None);
        assert!((scalar(plain) - sq_err / n as f64).abs() <= 1e-5 * sq_err / n as f64);
        let loss = hidden_mse(s.clone(), t.clone(), HiddenNorm::Layer);
        let want = sq_err / n as f64 / power;
        assert!((scalar(loss.clone()) - want).abs() <= 1e-5 * want, "{want}");
        let grads = loss.backward();
        let gs = HostTensor::from_float(s.grad(&grads).unwrap()).to_f64();
        for (i, g) in gs.iter().enumerate() {
            let w = 2.0 * (sv[i] as f64 - tv[i] as f64) / (n as f64 * power);
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1e-3), "{i}: {g} vs {w}");
        }
        // The teacher's gradient is the plain MSE's alone: none flows through the normaliser.
        let gt = HostTensor::from_float(t.grad(&grads).unwrap()).to_f64();
        for (i, g) in gt.iter().enumerate() {
            let w = -2.0 * (sv[i] as f64 - tv[i] as f64) / (n as f64 * power);
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1e-3), "{i}: {g} vs {w}");
        }
    }

    #[test]
    fn with_additive_mask_reproduces_tinybert_scores() {
        // The fixture's scores already carry the mask; removing and re-adding it is the identity
        // on the masked entries' zeroing, so the TinyBERT term is unchanged.
        let device = Device::flex();
        let f = fixture("case1");
        let mask = f["in.attention_mask"].to_f64();
        let [b, s] = f["in.attention_mask"].shape().try_into().unwrap();
        let m = Tensor::<2>::from_data(
            TensorData::new(mask.iter().map(|&x| x as f32).collect::<Vec<_>>(), [b, s]),
            &device,
        );
        let sm: Tensor<4> = plain(&f["in.student_att_scores.0"], &device);
        let tm: Tensor<4> = plain(&f["in.teacher_att_scores.0"], &device);
        let raw = |t: Tensor<4>| {
            // Unmask: masked entries are −10000 + s; set them to an arbitrary raw value.
            let masked = t.clone().lower_equal_elem(-100.0);
            t.mask_fill(masked, 3.0)
        };
        let again = attention_mse(
            with_additive_mask(raw(sm), m.clone()),
            with_additive_mask(raw(tm), m),
        );
        let want = f["out.att_mse_tinybert.0"].to_f64()[0];
        assert!((scalar(again) - want).abs() < 1e-5 * want);
    }
}
