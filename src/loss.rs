//! Supervised losses, as Hugging Face's `*ForSequenceClassification` computes them by default.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// Mean cross-entropy of `logits` [B, K] against class ids [B].
pub fn cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let [b, _] = logits.dims();
    let logp = log_softmax(logits, 1);
    logp.gather(1, labels.reshape([b, 1])).mean().neg()
}

/// Mean squared error of a regression head [B, 1] against targets [B] (HF squeezes the head).
pub fn mse(pred: Tensor<2>, target: Tensor<1>) -> Tensor<1> {
    let [b, _] = pred.dims();
    (pred.reshape([b]) - target).square().mean()
}

/// Soft cross-entropy of student logits against teacher logits at temperature `t`, per example
/// and averaged over the batch: `-(softmax(t/T)·log_softmax(s/T)).sum(-1).mean()`.
/// MPCFormer's literal `soft_cross_entropy` averages over B·K elements instead, i.e. this
/// divided by K: pass `elementwise_mean` to get that.
pub fn soft_cross_entropy(
    student: Tensor<2>,
    teacher: Tensor<2>,
    t: f64,
    elementwise_mean: bool,
) -> Tensor<1> {
    let [_, k] = student.dims();
    let p = burn::tensor::activation::softmax(teacher / t, 1);
    let ce = (p * log_softmax(student / t, 1)).sum_dim(1).mean().neg();
    if elementwise_mean { ce / k as f64 } else { ce }
}

/// `F.mse_loss`: mean over all elements.
pub fn mse_all<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<1> {
    (a - b).square().mean()
}
