//! Named shapes of well-known encoders, with random weights where a benchmark needs a model
//! of the right size and no checkpoint: `bench` and `mpc bench`. Apart from `bench`, so the MPC
//! engine can name them without reaching the training code.

use serde::Serialize;

use super::{Approx, Arch, ModelConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, FFN 1536.
    Minilm,
    /// BERT-base: 12 layers, hidden 768, 12 heads, FFN 3072.
    BertBase,
}

impl Shape {
    /// The shape's config, with HF's default dropout (0.1).
    pub fn config(self, approx: Approx) -> ModelConfig {
        let (d, l, ffn) = match self {
            Shape::Minilm => (384, 6, 1536),
            Shape::BertBase => (768, 12, 3072),
        };
        ModelConfig {
            arch: Arch::Bert,
            vocab_size: 30522,
            hidden_size: d,
            num_hidden_layers: l,
            num_attention_heads: 12,
            intermediate_size: ffn,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            classifier_dropout: None,
            num_labels: 2,
            labels: vec!["0".into(), "1".into()],
            approx,
        }
    }
}
