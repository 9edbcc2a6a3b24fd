//! One encoder for BERT and RoBERTa, with the MPC approximations as configuration.
//!
//! Struct and field names follow Hugging Face's `modeling_bert.py` / `modeling_roberta.py`, so a
//! weight name maps onto a field path by the short table in [`super::names`]
//! (`LayerNorm` ↔ `layer_norm`, `self` ↔ `self_attn`, the `bert.`/`roberta.` prefix).

use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::{DType, activation};
use rayon::prelude::*;

use super::approx::{Approx, LayerApprox};
use super::config::{Arch, ModelConfig};
use super::dropout::Dropout;
use super::kernels;

/// HF's `initializer_range`: every weight N(0, 0.02²), biases 0, LayerNorm (1, 0).
const INIT_STD: f64 = 0.02;

fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    let mut l = LinearConfig::new(d_in, d_out)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: INIT_STD,
        })
        .init(device);
    l.bias = Some(Param::from_tensor(Tensor::zeros([d_out], device)));
    l
}

fn embedding(n: usize, d: usize, device: &Device) -> Embedding {
    EmbeddingConfig::new(n, d)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: INIT_STD,
        })
        .init(device)
}

fn layer_norm(d: usize, eps: f64, device: &Device) -> LayerNorm {
    LayerNorm {
        gamma: Initializer::Ones.init([d], device),
        beta: Initializer::Zeros.init([d], device),
        epsilon: eps,
    }
}

/// `nn.LayerNorm` (HF name `LayerNorm`), over the last axis.
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub gamma: Param<Tensor<1>>,
    pub beta: Param<Tensor<1>>,
    #[module(skip)]
    pub epsilon: f64,
}

impl LayerNorm {
    /// `LayerNorm(x + residual)`: BERT adds the residual right before every LayerNorm but the
    /// embeddings', and the fused kernel does both in one pass.
    ///
    /// Always in f32, whatever its inputs' precision: under mixed precision (`train::precision`)
    /// the residual stream stays f32 and only the Linear layers compute in half precision, as
    /// PyTorch's autocast keeps `layer_norm` in f32. The casts are no-ops on f32 inputs.
    pub fn forward<const D: usize>(&self, x: Tensor<D>, residual: Option<Tensor<D>>) -> Tensor<D> {
        let f32 = |t: Tensor<D>| t.cast(DType::F32);
        let (x, residual) = (f32(x), residual.map(f32));
        let gamma = self.gamma.val().cast(DType::F32);
        let beta = self.beta.val().cast(DType::F32);
        match kernels::layer_norm(x, residual, gamma, beta, self.epsilon) {
            Ok(y) => y,
            Err((x, residual, gamma, beta)) => {
                let x = residual.map_or(x.clone(), |r| x + r);
                burn::tensor::module::layer_norm(x, gamma, Some(beta), self.epsilon)
            }
        }
    }
}

/// `layer(x)` in the precision of the layer's weight: a mixed-precision compute copy
/// (`train::precision`) holds half-precision Linear weights while the residual stream is f32.
pub fn apply_linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dtype = layer.weight.val().dtype();
    layer.forward(x.cast(dtype))
}

/// A Linear layer over [B, S, D] as one [B·S, D] product: Burn keeps a 128-row batch as a
/// batched matmul that packs the weight again for every sequence; one tall product packs it once
/// and splits the rows over the cores.
fn dense(layer: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [b, s, d] = x.dims();
    let y = apply_linear(layer, x.reshape([b * s, d]));
    let out = y.dims()[1];
    y.reshape([b, s, out])
}

fn dropout(p: f64) -> Dropout {
    Dropout::new(p)
}

/// Embedding lookup with PyTorch's `padding_idx` semantics: the pad row is used in the forward
/// pass but receives no gradient, as in HF's `nn.Embedding(..., padding_idx=pad)`.
fn embed(table: &Embedding, ids: Tensor<2, Int>, padding_idx: Option<usize>) -> Tensor<3> {
    let out = table.forward(ids.clone());
    match padding_idx {
        Some(pad) if table.weight.val().is_require_grad() => {
            // x·1 + x̄·0 = x exactly, so the forward value is untouched.
            let keep = ids.not_equal_elem(pad as i64).float().unsqueeze_dim::<3>(2);
            out.clone() * keep.clone() + out.detach() * (keep.neg() + 1.0)
        }
        _ => out,
    }
}

/// Which intermediate tensors a forward pass keeps. Inference asks for none and pays for none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capture {
    /// Embedding output and every layer's output (`hidden_states`, L + 1 tensors).
    pub hidden_states: bool,
    /// Raw scores `QKᵀ/√d` before any mask (`attention_scores`, L tensors).
    pub attention_scores: bool,
    /// Attention weights after normalisation (`attentions`, L tensors).
    pub attentions: bool,
}

impl Capture {
    pub const NONE: Capture = Capture {
        hidden_states: false,
        attention_scores: false,
        attentions: false,
    };
    /// Hidden states only (the inputs of every layer and the last output).
    pub const HIDDEN: Capture = Capture {
        hidden_states: true,
        attention_scores: false,
        attentions: false,
    };
    pub const ALL: Capture = Capture {
        hidden_states: true,
        attention_scores: true,
        attentions: true,
    };
}

/// A tokenised, right-padded batch.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub input_ids: Tensor<2, Int>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor<2, Int>,
    /// `None` means all zeros.
    pub token_type_ids: Option<Tensor<2, Int>>,
}

impl Inputs {
    /// The batch cut into `parts` contiguous groups of rows (the last may be smaller; fewer parts
    /// when there are fewer rows).
    pub fn split(&self, parts: usize) -> Vec<Inputs> {
        let [b, _] = self.input_ids.dims();
        let size = b.div_ceil(parts.max(1)).max(1);
        (0..b)
            .step_by(size)
            .map(|start| {
                let r = start..(start + size).min(b);
                Inputs {
                    input_ids: self.input_ids.clone().slice(s![r.clone(), ..]),
                    attention_mask: self.attention_mask.clone().slice(s![r.clone(), ..]),
                    token_type_ids: self.token_type_ids.clone().map(|t| t.slice(s![r, ..])),
                }
            })
            .collect()
    }
}

/// What the encoder returns; the `Vec`s are empty unless asked for by [`Capture`].
#[derive(Clone, Debug)]
pub struct EncoderOutput {
    pub last_hidden_state: Tensor<3>,
    pub hidden_states: Vec<Tensor<3>>,
    pub attention_scores: Vec<Tensor<4>>,
    pub attentions: Vec<Tensor<4>>,
}

/// Sequence-classification output: the encoder's plus the head's.
#[derive(Clone, Debug)]
pub struct ClassifierOutput {
    pub encoder: EncoderOutput,
    /// BERT: the pooler's `tanh(W h₀ + b)`; RoBERTa: the head's `tanh(dense(h₀))`.
    pub pooled_output: Tensor<2>,
    /// [B, num_labels]; [B, 1] for regression.
    pub logits: Tensor<2>,
}

impl ClassifierOutput {
    /// The outputs of consecutive groups of rows, joined along the batch axis.
    pub fn cat(parts: Vec<ClassifierOutput>) -> Self {
        fn each<const D: usize>(
            parts: &[ClassifierOutput],
            f: impl Fn(&ClassifierOutput) -> &Vec<Tensor<D>>,
        ) -> Vec<Tensor<D>> {
            (0..f(&parts[0]).len())
                .map(|i| Tensor::cat(parts.iter().map(|p| f(p)[i].clone()).collect(), 0))
                .collect()
        }
        let one = |f: &dyn Fn(&ClassifierOutput) -> Tensor<2>| {
            Tensor::cat(parts.iter().map(f).collect(), 0)
        };
        ClassifierOutput {
            encoder: EncoderOutput {
                last_hidden_state: Tensor::cat(
                    parts
                        .iter()
                        .map(|p| p.encoder.last_hidden_state.clone())
                        .collect(),
                    0,
                ),
                hidden_states: each(&parts, |p| &p.encoder.hidden_states),
                attention_scores: each(&parts, |p| &p.encoder.attention_scores),
                attentions: each(&parts, |p| &p.encoder.attentions),
            },
            pooled_output: one(&|p| p.pooled_output.clone()),
            logits: one(&|p| p.logits.clone()),
        }
    }

    /// Every tensor moved to `device` (a frozen teacher's outputs onto the student's autodiff
    /// device, where they enter the loss as constants).
    pub fn to_device(self, device: &Device) -> Self {
        let all = |v: Vec<Tensor<3>>| v.into_iter().map(|t| t.to_device(device)).collect();
        let all4 = |v: Vec<Tensor<4>>| v.into_iter().map(|t| t.to_device(device)).collect();
        let e = self.encoder;
        ClassifierOutput {
            encoder: EncoderOutput {
                last_hidden_state: e.last_hidden_state.to_device(device),
                hidden_states: all(e.hidden_states),
                attention_scores: all4(e.attention_scores),
                attentions: all4(e.attentions),
            },
            pooled_output: self.pooled_output.to_device(device),
            logits: self.logits.to_device(device),
        }
    }
}

/// `BertEmbeddings` / `RobertaEmbeddings`.
#[derive(Module, Debug)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
    #[module(skip)]
    pub arch: Arch,
    #[module(skip)]
    pub pad_token_id: usize,
}

impl BertEmbeddings {
    pub fn forward(&self, inputs: &Inputs) -> Tensor<3> {
        let ids = inputs.input_ids.clone();
        let [b, s] = ids.dims();
        let device = ids.device();
        let pad = self.pad_token_id;
        let position_ids = match self.arch {
            Arch::Bert => Tensor::<1, Int>::arange(0..s as i64, &device)
                .reshape([1, s])
                .repeat_dim(0, b),
            // `create_position_ids_from_input_ids`: real tokens count from pad + 1, pads sit at pad.
            Arch::Roberta => {
                let real = ids.clone().not_equal_elem(pad as i64).int();
                real.clone().cumsum(1) * real + pad as i64
            }
        };
        let token_type_ids = inputs
            .token_type_ids
            .clone()
            .unwrap_or_else(|| Tensor::zeros([b, s], &device));
        let position_padding = (self.arch == Arch::Roberta).then_some(pad);
        let x = embed(&self.word_embeddings, ids, Some(pad))
            + embed(&self.position_embeddings, position_ids, position_padding)
            + self.token_type_embeddings.forward(token_type_ids);
        self.dropout.forward(self.layer_norm.forward(x, None))
    }
}

/// `BertSelfAttention` (HF name `attention.self`).
#[derive(Module, Debug)]
pub struct BertSelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub dropout: Dropout,
    #[module(skip)]
    pub num_heads: usize,
}

impl BertSelfAttention {
    /// Returns the context and, when `weights` is set, the raw scores and the weights
    /// ([B, H, S, S]).
    fn forward(
        &self,
        x: Tensor<3>,
        key_mask: Tensor<2>,
        approx: LayerApprox,
        c: f64,
        weights: bool,
    ) -> (Tensor<3>, Option<(Tensor<4>, Tensor<4>)>) {
        let [b, s, d] = x.dims();
        let h = self.num_heads;
        let dh = d / h;
        let heads = |t: Tensor<3>| t.reshape([b, s, h, dh]).swap_dims(1, 2);
        // Scaling q ([B, H, S, dh]) instead of the scores ([B, H, S, S]) is the same product
        // for a quarter of the elementwise work at S = 128, dh = 32, in the forward and backward.
        let q = heads(dense(&self.query, x.clone()) * (1.0 / (dh as f64).sqrt()));
        let k = heads(dense(&self.key, x.clone()));
        let v = heads(dense(&self.value, x));
        let merge = |t: Tensor<4>| t.swap_dims(1, 2).reshape([b, s, d]);
        // Scores, then the normaliser's fused kernel, then the context: on Flex this beats the
        // backend's one-pass attention op (its softmax is a scalar loop; BENCHMARKS.md).
        let scores = q.matmul(k.swap_dims(2, 3));
        // The normaliser runs in f32 (a half-precision score squared by 2Quad and summed over
        // the keys overflows f16); its weights meet `v` in `v`'s precision.
        let normalise = |scores: Tensor<4>| {
            approx
                .attn
                .apply(scores.cast(DType::F32), key_mask.cast(DType::F32), c)
        };
        let dtype = v.dtype();
        if !weights {
            let probs = normalise(scores);
            return (
                merge(self.dropout.forward(probs).cast(dtype).matmul(v)),
                None,
            );
        }
        let probs = normalise(scores.clone());
        let ctx = merge(self.dropout.forward(probs.clone()).cast(dtype).matmul(v));
        (ctx, Some((scores, probs)))
    }
}

/// `BertSelfOutput` (HF name `attention.output`).
#[derive(Module, Debug)]
pub struct BertSelfOutput {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
}

impl BertSelfOutput {
    fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        self.layer_norm
            .forward(self.dropout.forward(dense(&self.dense, x)), Some(residual))
    }
}

/// `BertAttention`.
#[derive(Module, Debug)]
pub struct BertAttention {
    pub self_attn: BertSelfAttention,
    pub output: BertSelfOutput,
}

/// `BertIntermediate`: the FFN up-projection and its activation (GeLU or Quad).
#[derive(Module, Debug)]
pub struct BertIntermediate {
    pub dense: Linear,
}

/// `BertOutput`: the FFN down-projection, residual and LayerNorm.
#[derive(Module, Debug)]
pub struct BertOutput {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
}

/// `BertLayer`, with this layer's approximation choice.
#[derive(Module, Debug)]
pub struct BertLayer {
    pub attention: BertAttention,
    pub intermediate: BertIntermediate,
    pub output: BertOutput,
    #[module(skip)]
    pub approx: LayerApprox,
    #[module(skip)]
    pub two_quad_c: f64,
}

impl BertLayer {
    pub fn forward(
        &self,
        x: Tensor<3>,
        key_mask: Tensor<2>,
        weights: bool,
    ) -> (Tensor<3>, Option<(Tensor<4>, Tensor<4>)>) {
        let (attn_out, weights) = self.attention_block(x, key_mask, weights);
        let inter = self
            .approx
            .act
            .apply(dense(&self.intermediate.dense, attn_out.clone()));
        let y = dense(&self.output.dense, inter);
        let y = self
            .output
            .layer_norm
            .forward(self.output.dropout.forward(y), Some(attn_out));
        (y, weights)
    }

    /// The attention half of the layer: its output (the FFN's input) and, when `weights` is set,
    /// the raw scores and the weights.
    pub fn attention_block(
        &self,
        x: Tensor<3>,
        key_mask: Tensor<2>,
        weights: bool,
    ) -> (Tensor<3>, Option<(Tensor<4>, Tensor<4>)>) {
        let (ctx, weights) = self.attention.self_attn.forward(
            x.clone(),
            key_mask,
            self.approx,
            self.two_quad_c,
            weights,
        );
        (self.attention.output.forward(ctx, x), weights)
    }
}

/// `BertEncoder`.
#[derive(Module, Debug)]
pub struct BertEncoder {
    pub layer: Vec<BertLayer>,
}

/// `BertPooler`: `tanh(dense(h[:, 0]))`.
#[derive(Module, Debug)]
pub struct BertPooler {
    pub dense: Linear,
}

/// `BertModel` / `RobertaModel` (RoBERTa's classifier has no pooler).
#[derive(Module, Debug)]
pub struct BertModel {
    pub embeddings: BertEmbeddings,
    pub encoder: BertEncoder,
    pub pooler: Option<BertPooler>,
}

impl BertModel {
    pub fn forward(&self, inputs: &Inputs, capture: Capture) -> EncoderOutput {
        let key_mask = inputs.attention_mask.clone().float();
        let mut x = self.embeddings.forward(inputs);
        let n = self.encoder.layer.len();
        let mut out = EncoderOutput {
            last_hidden_state: x.clone(),
            hidden_states: Vec::with_capacity(if capture.hidden_states { n + 1 } else { 0 }),
            attention_scores: Vec::new(),
            attentions: Vec::new(),
        };
        if capture.hidden_states {
            out.hidden_states.push(x.clone());
        }
        for layer in &self.encoder.layer {
            let weights = capture.attention_scores || capture.attentions;
            let (y, w) = layer.forward(x, key_mask.clone(), weights);
            if capture.hidden_states {
                out.hidden_states.push(y.clone());
            }
            if let Some((scores, probs)) = w {
                if capture.attention_scores {
                    out.attention_scores.push(scores);
                }
                if capture.attentions {
                    out.attentions.push(probs);
                }
            }
            x = y;
        }
        out.last_hidden_state = x;
        out
    }
}

/// The classification head. BERT (`BertForSequenceClassification`): dropout → `classifier` on the
/// pooler output (`dense` is `None`; the field `out_proj` is HF's `classifier`). RoBERTa
/// (`RobertaClassificationHead`): dropout → `classifier.dense` → tanh → dropout →
/// `classifier.out_proj` on the first token.
#[derive(Module, Debug)]
pub struct ClassificationHead {
    pub dense: Option<Linear>,
    pub out_proj: Linear,
    pub dropout: Dropout,
}

/// `BertForSequenceClassification` / `RobertaForSequenceClassification`. The field `bert` holds
/// the backbone for both families; its HF prefix (`bert.` or `roberta.`) comes from the config.
#[derive(Module, Debug)]
pub struct SequenceClassifier {
    pub bert: BertModel,
    pub classifier: ClassificationHead,
    #[module(skip)]
    pub config: ModelConfig,
}

impl ModelConfig {
    /// Builds a randomly initialised model (HF's init); load weights with [`super::load`].
    pub fn init(&self, device: &Device) -> SequenceClassifier {
        let d = self.hidden_size;
        let approx: &Approx = &self.approx;
        let embeddings = BertEmbeddings {
            word_embeddings: embedding(self.vocab_size, d, device),
            position_embeddings: embedding(self.max_position_embeddings, d, device),
            token_type_embeddings: embedding(self.type_vocab_size, d, device),
            layer_norm: layer_norm(d, self.layer_norm_eps, device),
            dropout: dropout(self.hidden_dropout_prob),
            arch: self.arch,
            pad_token_id: self.pad_token_id,
        };
        let layer = (0..self.num_hidden_layers)
            .map(|i| BertLayer {
                attention: BertAttention {
                    self_attn: BertSelfAttention {
                        query: linear(d, d, device),
                        key: linear(d, d, device),
                        value: linear(d, d, device),
                        dropout: dropout(self.attention_probs_dropout_prob),
                        num_heads: self.num_attention_heads,
                    },
                    output: BertSelfOutput {
                        dense: linear(d, d, device),
                        layer_norm: layer_norm(d, self.layer_norm_eps, device),
                        dropout: dropout(self.hidden_dropout_prob),
                    },
                },
                intermediate: BertIntermediate {
                    dense: linear(d, self.intermediate_size, device),
                },
                output: BertOutput {
                    dense: linear(self.intermediate_size, d, device),
                    layer_norm: layer_norm(d, self.layer_norm_eps, device),
                    dropout: dropout(self.hidden_dropout_prob),
                },
                approx: approx.layer(i),
                two_quad_c: approx.c,
            })
            .collect();
        let classifier_dropout = self.classifier_dropout.unwrap_or(self.hidden_dropout_prob);
        let (pooler, head_dense) = match self.arch {
            Arch::Bert => (
                Some(BertPooler {
                    dense: linear(d, d, device),
                }),
                None,
            ),
            Arch::Roberta => (None, Some(linear(d, d, device))),
        };
        SequenceClassifier {
            bert: BertModel {
                embeddings,
                encoder: BertEncoder { layer },
                pooler,
            },
            classifier: ClassificationHead {
                dense: head_dense,
                out_proj: linear(d, self.num_labels, device),
                dropout: dropout(classifier_dropout),
            },
            config: self.clone(),
        }
    }
}

impl SequenceClassifier {
    pub fn forward(&self, inputs: &Inputs, capture: Capture) -> ClassifierOutput {
        let encoder = self.bert.forward(inputs, capture);
        let [b, _, d] = encoder.last_hidden_state.dims();
        let first = encoder
            .last_hidden_state
            .clone()
            .slice(s![.., 0..1, ..])
            .reshape([b, d]);
        let head = &self.classifier;
        let pooled_output = match (&self.bert.pooler, &head.dense) {
            (_, Some(dense)) => activation::tanh(apply_linear(dense, head.dropout.forward(first))),
            (Some(pooler), None) => activation::tanh(apply_linear(&pooler.dense, first)),
            (None, None) => first,
        };
        let logits = apply_linear(&head.out_proj, head.dropout.forward(pooled_output.clone()));
        ClassifierOutput {
            encoder,
            pooled_output,
            logits,
        }
    }

    /// Logits only: what inference and evaluation need.
    pub fn logits(&self, inputs: &Inputs) -> Tensor<2> {
        self.forward(inputs, Capture::NONE).logits
    }

    /// [`Self::forward`] with the batch cut into `threads` groups of rows run side by side (see
    /// [`Self::logits_threaded`]): a frozen teacher's forward pass during distillation.
    pub fn forward_threaded(
        &self,
        inputs: &Inputs,
        capture: Capture,
        threads: usize,
    ) -> ClassifierOutput {
        let parts = inputs.split(threads);
        if parts.len() <= 1 {
            return self.forward(inputs, capture);
        }
        ClassifierOutput::cat(parts.par_iter().map(|p| self.forward(p, capture)).collect())
    }

    /// [`Self::logits`] with the batch cut into `threads` groups of rows run side by side. On the
    /// CPU backend the matmuls use every core but much else runs on the calling thread, so two
    /// half-batches at once keep both cores busy (BENCHMARKS.md: +15 % tokens/s on 2 cores). Rows are independent, so the logits are
    /// those of one call up to the matmul's rounding.
    pub fn logits_threaded(&self, inputs: &Inputs, threads: usize) -> Tensor<2> {
        let parts = inputs.split(threads);
        if parts.len() <= 1 {
            return self.logits(inputs);
        }
        // Inside rayon's pool, not on threads of their own: the matmuls' parallel loops then
        // share the pool's two workers instead of four threads contending for two cores
        // (+15 % tokens/s, BENCHMARKS.md).
        let outs: Vec<Tensor<2>> = parts.par_iter().map(|p| self.logits(p)).collect();
        Tensor::cat(outs, 0)
    }
}

/// Threads [`SequenceClassifier::logits_threaded`] should use on `device`: the available cores on
/// the CPU backend (capped at 2, beyond which the matmuls' own threads already compete), 1 on a
/// GPU or under autodiff.
pub fn inference_threads(device: &Device) -> usize {
    if device.is_autodiff() || *device != Device::flex() {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}
