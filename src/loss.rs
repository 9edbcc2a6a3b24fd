//! Supervised losses, as Hugging Face's `*ForSequenceClassification` computes them by default.

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::log_softmax;

/// Mean cross-entropy of `logits` [B, K] against class ids [B].
pub fn cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let [b, _] = logits.dims();
    // In f32 whatever the logits' precision (mixed precision: `train::precision`).
    let logp = log_softmax(logits.cast(DType::F32), 1);
    logp.gather(1, labels.reshape([b, 1])).mean().neg()
}

/// Mean squared error of a regression head [B, 1] against targets [B] (HF squeezes the head).
pub fn mse(pred: Tensor<2>, target: Tensor<1>) -> Tensor<1> {
    let [b, _] = pred.dims();
    (pred.reshape([b]).cast(DType::F32) - target.cast(DType::F32))
        .square()
        .mean()
}
