//! MPC-ready export: a directory that Hugging Face `transformers`, MPCFormer's patched BERT and an
//! MPC runtime can load unchanged, and `load-check`, which validates one.
//!
//! An export holds `model.safetensors` (HF names, HF layout, f32 or f16), the same tensors as
//! `pytorch_model.bin` (PyTorch's zip serialization of a state dict, [`torch_bin`], which is all
//! MPCFormer's own loaders read; `--no-pytorch-bin` leaves it out), `config.json` (HF keys,
//! MPCFormer's `hidden_act`/`softmax_act`, and the `mpc` object of
//! [`ModelConfig::mpc_json`]), the tokenizer (`tokenizer.json` plus the vocabulary files, and
//! `tokenizer_config.json`), for a run also its `recipe.toml`, and `mpc_manifest.json`
//! ([`Manifest`]): task, labels, maximum length, provenance (teacher, recipe and hash), dev
//! metrics, the fixed-point encoding a runtime should use, the value ranges seen on dev data
//! per op ([`RangeStats`]), and the sha256 of every other file.
//!
//! The directory is written to a temporary sibling and renamed into place; before that, the
//! staged files are loaded back exactly as `mpcformer eval --model <export>` loads them and
//! checked against the source model (bit-identical logits for f32), `pytorch_model.bin` is read
//! back and compared with `model.safetensors` tensor for tensor, and the dev-data pass that
//! estimates the ranges runs on the loaded copy, so the manifest describes the files on disk.

pub mod torch_bin;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::tensor::activation;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::data::{self, Dataset, Fields, Order, Task, Tokenized};
use crate::eval::{self, Outputs};
use crate::io::write_atomic;
use crate::metric;
use crate::model::approx::{MASK_NEG, TWO_RELU_EPS};
use crate::model::bert::BertEmbeddings;
use crate::model::config::MPC_BLOCK_VERSION;
use crate::model::{
    Act, Arch, Attn, Capture, Checkpoint, Inputs, LayerApprox, LoadOptions, ModelConfig, Overrides,
    SequenceClassifier, load_pretrained,
};
use crate::tokenize::TextTokenizer;
use crate::train::recipe::Recipe;

/// The manifest's file name.
pub const MANIFEST: &str = "mpc_manifest.json";
/// `format` of every manifest.
pub const FORMAT: &str = "mpcformer-export";
/// The manifest layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The ring a runtime should compute in: Z_2^64, two's complement.
pub const RING_BITS: u32 = 64;
/// Files every export has (besides the manifest).
pub const REQUIRED_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];
/// The folder inside an export with what P1 (the client) needs and nothing else: `config.json`,
/// the tokenizer files and [`PUBLIC_MANIFEST`]. It never holds the weights.
pub const P1_DIR: &str = "p1";
/// P1's manifest ([`PublicManifest`]).
pub const PUBLIC_MANIFEST: &str = "mpc_public.json";
/// Vocabulary files copied from the source's tokenizer when present.
const VOCAB_FILES: &[&str] = &[
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
];

/// Weight dtype of `model.safetensors`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    F16,
}

impl Dtype {
    fn safetensors(self) -> safetensors::Dtype {
        match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F16 => safetensors::Dtype::F16,
        }
    }
}

/// What to export.
#[derive(Clone, Debug)]
pub enum Source {
    /// A run directory of `mpcformer run`: its `student/`, with the run's task, recipe, teacher
    /// and metrics.
    Run(PathBuf),
    /// A model directory or Hub id.
    Model(String),
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub source: Source,
    pub out: PathBuf,
    /// Approximation flags (`--act`, `--attn`, `--layer`); only with [`Source::Model`].
    pub overrides: Overrides,
    pub dtype: Dtype,
    /// Also write `pytorch_model.bin` (the same tensors), for loaders that read only that.
    pub pytorch_bin: bool,
    /// Fractional bits of the fixed-point encoding a runtime should use (CrypTen: 16).
    pub fractional_bits: u32,
    /// Task (labels, maximum length, data); a run's own task when `None`.
    pub task: Option<String>,
    /// Data spec for the dev pass (value ranges, dev metrics); a run's recipe data when `None`;
    /// for a bare model with a task, the task's Hub dataset.
    pub data: Option<String>,
    /// Split of the dev pass (default: a run's eval split, else `dev`; MNLI: `dev_matched`).
    pub split: Option<String>,
    /// Use at most this many examples for the dev pass.
    pub range_limit: Option<usize>,
    /// Skip the dev pass: no value ranges, no recomputed metrics.
    pub no_data: bool,
    /// Tokenizer directory when the model directory has none.
    pub tokenizer: Option<String>,
    /// The teacher a bare model came from (recorded only).
    pub teacher: Option<String>,
    /// Maximum length (default: the recipe's or task's, capped by the model's positions).
    pub max_len: Option<usize>,
    pub batch_size: usize,
    pub device: Device,
}

impl ExportOptions {
    pub fn new(source: Source, out: impl Into<PathBuf>) -> Self {
        Self {
            source,
            out: out.into(),
            overrides: Overrides::default(),
            dtype: Dtype::F32,
            pytorch_bin: true,
            fractional_bits: 16,
            task: None,
            data: None,
            split: None,
            range_limit: None,
            no_data: false,
            tokenizer: None,
            teacher: None,
            max_len: None,
            batch_size: 64,
            device: Device::flex(),
        }
    }
}

/// sha256 and size of one file of the export.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// The fixed-point encoding a runtime should use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FixedPoint {
    pub ring_bits: u32,
    pub fractional_bits: u32,
    /// 2^fractional_bits.
    pub scale: f64,
    pub encoding: String,
    /// Largest |x| an encoded value may have: 2^(ring_bits − 1 − fractional_bits).
    pub max_abs_value: f64,
    /// Largest |x·y| a product may have before truncation: 2^(ring_bits − 1 − 2·fractional_bits).
    pub max_abs_product: f64,
}

impl FixedPoint {
    pub fn new(fractional_bits: u32) -> Self {
        let f = fractional_bits as i32;
        Self {
            ring_bits: RING_BITS,
            fractional_bits,
            scale: 2f64.powi(f),
            encoding: format!(
                "x ↦ round(x·2^{fractional_bits}) mod 2^{RING_BITS}, two's complement; a product \
                 of two encoded values carries 2·{fractional_bits} fractional bits until it is \
                 truncated by 2^{fractional_bits}"
            ),
            max_abs_value: 2f64.powi(RING_BITS as i32 - 1 - f),
            max_abs_product: 2f64.powi(RING_BITS as i32 - 1 - 2 * f),
        }
    }
}

/// What kind of input a range entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// The input of a square (Quad, 2Quad, LayerNorm's (x − μ)²).
    Square,
    /// The input of a reciprocal (2Quad / 2ReLU / softmax row sums).
    Reciprocal,
    /// The input of an inverse square root (LayerNorm's var + eps).
    InvSqrt,
    /// The input of exp (softmax, after subtracting the row maximum; real keys only).
    Exp,
    /// A comparison's input (ReLU, 2ReLU).
    Compare,
    /// The input of another non-linear function (GeLU, tanh).
    Nonlinear,
    /// A matrix product's output (attention scores).
    Matmul,
}

/// The range of one op's input over the dev data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpRange {
    /// `embeddings.LayerNorm.square`, `layer.0.2quad.square`, `layer.0.2quad.row_sum`, ...
    pub op: String,
    pub kind: OpKind,
    /// max |x| of the input.
    pub max_abs: f64,
    /// Smallest input (reciprocal and inverse square root, whose inputs are positive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Bits to spare before the op's first product overflows the signed ring at 2f fractional
    /// bits: 63 − 2f − log2(max_abs²) for a square, 63 − 2f − log2(max_abs) otherwise (a product
    /// with a value of magnitude ≤ 1). Negative: it overflows.
    pub headroom_bits: f64,
    /// log2(min·2^f) for reciprocal / inverse square root: the significant bits the smallest
    /// input keeps once encoded (below 0 it rounds to 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_bits: Option<f64>,
}

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
        let cfg = &model.config;
        let eps = cfg.layer_norm_eps;
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
            let x = enc.hidden_states[l].clone();
            let scores = enc.attention_scores[l].clone();
            let probs = enc.attentions[l].clone();
            let p = format!("layer.{l}");
            self.observe(
                format!("{p}.attention.scores"),
                OpKind::Matmul,
                max_abs(scores.clone()),
                None,
            );
            match layer.approx.attn {
                Attn::TwoQuad => {
                    let t = scores + layer.two_quad_c;
                    self.observe(
                        format!("{p}.2quad.square"),
                        OpKind::Square,
                        max_abs(t.clone()),
                        None,
                    );
                    let z = (t.square() * m.clone()).sum_dim(3);
                    self.observe(
                        format!("{p}.2quad.row_sum"),
                        OpKind::Reciprocal,
                        max_of(z.clone()),
                        Some(min_of(z)),
                    );
                }
                Attn::TwoRelu => {
                    self.observe(
                        format!("{p}.2relu.relu"),
                        OpKind::Compare,
                        max_abs(scores.clone()),
                        None,
                    );
                    let z = (activation::relu(scores) * m.clone()).sum_dim(3) + TWO_RELU_EPS;
                    self.observe(
                        format!("{p}.2relu.row_sum"),
                        OpKind::Reciprocal,
                        max_of(z.clone()),
                        Some(min_of(z)),
                    );
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
                    let z = (shifted.exp() * m.clone()).sum_dim(3);
                    self.observe(
                        format!("{p}.softmax.row_sum"),
                        OpKind::Reciprocal,
                        max_of(z.clone()),
                        Some(min_of(z)),
                    );
                }
            }
            // The rest of the layer, as `BertLayer::forward` computes it (dropout is off).
            let sa = &layer.attention.self_attn;
            let [_, _, d] = x.dims();
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
            let y = layer.output.layer_norm.forward(pre, None);
            err = err.max(max_abs(y - enc.hidden_states[l + 1].clone()));
        }

        let [_, _, d] = enc.last_hidden_state.dims();
        let first = enc
            .last_hidden_state
            .clone()
            .slice(s![.., 0..1, ..])
            .reshape([b, d]);
        let (name, pre_tanh) = match (&model.bert.pooler, &model.classifier.dense) {
            (_, Some(dense)) => ("classifier.dense.tanh", Some(dense.forward(first))),
            (Some(pooler), None) => ("pooler.tanh", Some(pooler.dense.forward(first))),
            (None, None) => ("", None),
        };
        if let Some(t) = pre_tanh {
            self.observe(name.into(), OpKind::Nonlinear, max_abs(t), None);
        }
        self.recompute_error = self.recompute_error.max(err);
        out.logits
    }
}

/// Dev data for the export's dev pass.
struct DevData {
    task: &'static Task,
    set: Dataset,
    split: String,
}

/// The export's `mpc_manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub created_by: String,
    /// `{"kind": "run"|"model", "path": ..., "run": name}`.
    pub source: Value,
    /// Task name (`sst2`, ...), when known.
    pub task: Option<String>,
    /// Output names in id order (`id2label`); regression: one output.
    pub labels: Vec<String>,
    pub regression: bool,
    /// Maximum tokens per example the model was trained/evaluated with (and its positions allow).
    pub max_length: usize,
    pub architecture: String,
    /// `{"label", "hidden_act", "softmax_act", "per_layer": [...]}`; exact formulas are in
    /// `config.json`'s `mpc` object.
    pub approximations: Value,
    pub dtype: Dtype,
    /// Where the model came from: the recipe's teacher, the run's fine-tuned teacher.
    pub teacher: Option<Value>,
    /// `{"file": "recipe.toml", "sha256", "summary_recipe_hash", "content"}` for a run.
    pub recipe: Option<Value>,
    /// Metrics on dev data at export (computed on the exported files) and at training.
    pub dev_metrics: Option<Value>,
    pub fixed_point: FixedPoint,
    /// `{"data": {...}, "note", "ops": [OpRange...], "summary": {...}}`.
    pub value_ranges: Option<Value>,
    /// Every other file of the directory.
    pub files: BTreeMap<String, FileEntry>,
}

/// What P1 may see of an export: enough to tokenise, to build the same circuit and to check the
/// session's settings — nothing of how the model was made (recipe, teacher, sources), how well it
/// does (dev metrics) or what its weights hash to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PublicManifest {
    pub format: String,
    pub format_version: u32,
    pub labels: Vec<String>,
    pub regression: bool,
    pub max_length: usize,
    pub architecture: String,
    pub approximations: Value,
    pub fixed_point: FixedPoint,
    /// `{"ops": [OpRange...]}`: the protocol plans' ranges, without the data they came from.
    pub value_ranges: Option<Value>,
}

impl PublicManifest {
    pub fn of(m: &Manifest) -> Self {
        Self {
            format: m.format.clone(),
            format_version: m.format_version,
            labels: m.labels.clone(),
            regression: m.regression,
            max_length: m.max_length,
            architecture: m.architecture.clone(),
            approximations: m.approximations.clone(),
            fixed_point: m.fixed_point.clone(),
            value_ranges: m
                .value_ranges
                .as_ref()
                .and_then(|v| v.get("ops"))
                .map(|ops| json!({ "ops": ops })),
        }
    }
}

/// Writes `<export>/p1/`: the public files copied, and the public manifest.
fn write_p1_part(export: &Path, manifest: &Manifest) -> Result<()> {
    let dir = export.join(P1_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let public = ["config.json", "tokenizer.json", "tokenizer_config.json"];
    for f in public.iter().chain(VOCAB_FILES) {
        let from = export.join(f);
        if from.is_file() {
            let bytes =
                std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
            write_atomic(&dir.join(f), &bytes)?;
        }
    }
    write_atomic(
        &dir.join(PUBLIC_MANIFEST),
        serde_json::to_string_pretty(&PublicManifest::of(manifest))?.as_bytes(),
    )
}

/// P1's public part, when there is one, must describe the same circuit as the export.
fn check_p1_part(dir: &Path, m: &Manifest, passed: &mut Vec<String>, problems: &mut Vec<String>) {
    let p1 = dir.join(P1_DIR);
    if !p1.is_dir() {
        return;
    }
    let public: Option<PublicManifest> = std::fs::read_to_string(p1.join(PUBLIC_MANIFEST))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let config = |d: &Path| std::fs::read(d.join("config.json")).ok();
    if public.as_ref() == Some(&PublicManifest::of(m)) && config(&p1) == config(dir) {
        passed.push(format!("{P1_DIR}/ (P1's public part) matches the export"));
    } else {
        problems.push(format!(
            "{}: P1's public part does not match the export (export again)",
            p1.display()
        ));
    }
}

/// What [`export`] did.
#[derive(Debug)]
pub struct ExportReport {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Worth telling the user (dropped tensors, missing data, metric drift).
    pub notes: Vec<String>,
}

/// A tensor ready to serialise.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// `model.safetensors` and, with `pytorch_bin`, `pytorch_model.bin` (the same tensors in the same
/// order and dtype) in `dir`.
fn write_weights(
    model: &SequenceClassifier,
    dtype: Dtype,
    dir: &Path,
    pytorch_bin: bool,
) -> Result<()> {
    let tensors: BTreeMap<String, RawTensor> = model
        .hf_tensors()
        .into_iter()
        .map(|t| {
            let bytes = match dtype {
                Dtype::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F16 => t
                    .data
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
            };
            (
                t.name,
                RawTensor {
                    dtype: dtype.safetensors(),
                    shape: t.shape,
                    bytes,
                },
            )
        })
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let path = dir.join("model.safetensors");
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .with_context(|| format!("serialising {}", path.display()))?;
    write_atomic(&path, &bytes)?;
    if pytorch_bin {
        let storage = match dtype {
            Dtype::F32 => torch_bin::Storage::Float,
            Dtype::F16 => torch_bin::Storage::Half,
        };
        let state: Vec<torch_bin::Tensor> = tensors
            .iter()
            .map(|(name, t)| torch_bin::Tensor {
                name: name.clone(),
                storage,
                shape: t.shape.clone(),
                data: &t.bytes,
            })
            .collect();
        let path = dir.join(torch_bin::FILE);
        let bytes =
            torch_bin::write(&state).with_context(|| format!("serialising {}", path.display()))?;
        write_atomic(&path, &bytes)?;
    }
    Ok(())
}

/// Reads `dir`'s `pytorch_model.bin` back and compares it with its `model.safetensors`: the same
/// tensor names, dtypes, shapes and bytes. Returns the number of tensors.
pub fn check_torch_bin(dir: &Path) -> Result<usize> {
    let bin_path = dir.join(torch_bin::FILE);
    let st_path = dir.join("model.safetensors");
    let bin =
        std::fs::read(&bin_path).with_context(|| format!("reading {}", bin_path.display()))?;
    let sd = torch_bin::read(&bin).with_context(|| {
        format!(
            "{}: not a PyTorch state dict of f32/f16 tensors",
            bin_path.display()
        )
    })?;
    let st_bytes =
        std::fs::read(&st_path).with_context(|| format!("reading {}", st_path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&st_bytes)
        .with_context(|| format!("{}: not a valid safetensors file", st_path.display()))?;
    let mut diffs = Vec::new();
    let mut seen = BTreeSet::new();
    for t in &sd.tensors {
        if !seen.insert(t.name.as_str()) {
            diffs.push(format!("{} twice", t.name));
            continue;
        }
        let Ok(v) = st.tensor(&t.name) else {
            diffs.push(format!("{} is not in model.safetensors", t.name));
            continue;
        };
        if v.dtype() != t.storage.safetensors() || v.shape() != t.shape.as_slice() {
            diffs.push(format!(
                "{}: {} {:?}, model.safetensors {:?} {:?}",
                t.name,
                t.storage.class(),
                t.shape,
                v.dtype(),
                v.shape()
            ));
        } else if v.data() != t.data {
            diffs.push(format!("{}: different values", t.name));
        }
    }
    let mut missing: Vec<&str> = st
        .names()
        .into_iter()
        .filter(|n| !seen.contains(n))
        .collect();
    missing.sort();
    if !missing.is_empty() {
        diffs.push(format!("missing {}", missing.join(", ")));
    }
    if !diffs.is_empty() {
        bail!(
            "{}: differs from model.safetensors: {}",
            bin_path.display(),
            diffs.join("; ")
        );
    }
    Ok(sd.tensors.len())
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<FileEntry> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(FileEntry {
        sha256: hex(&Sha256::digest(&bytes)),
        bytes: bytes.len() as u64,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// The longest input the model's positions allow (RoBERTa's start after the padding id).
fn position_cap(config: &ModelConfig) -> usize {
    match config.arch {
        Arch::Roberta => config.max_position_embeddings.saturating_sub(2),
        Arch::Bert => config.max_position_embeddings,
    }
}

/// Labels for the export's head: the model's own when they are the task's names in some order
/// (the head was trained with them), else the task's in its order (as `eval` reads them).
fn export_labels(config: &ModelConfig, task: Option<&Task>) -> Result<(Vec<String>, bool)> {
    let Some(task) = task else {
        return Ok((config.labels.clone(), config.is_regression()));
    };
    if config.num_labels != task.num_outputs() || config.is_regression() != task.is_regression() {
        bail!(
            "the model's classification head has {} output(s){}, but {} needs {}: export a \
             model fine-tuned on {}",
            config.num_labels,
            if config.is_regression() {
                " (regression)"
            } else {
                ""
            },
            task.title,
            task.num_outputs(),
            task.title
        );
    }
    if task.is_regression() {
        return Ok(task.head_labels());
    }
    let map = eval::label_map(&config.labels, task);
    let by_name = config
        .labels
        .iter()
        .zip(&map)
        .all(|(l, &i)| l.trim().eq_ignore_ascii_case(task.labels[i]));
    if by_name {
        Ok((config.labels.clone(), false))
    } else {
        Ok(task.head_labels())
    }
}

/// `tokenizer.json` (copied, or written from the vocabulary files as this project reads them),
/// the vocabulary files, and `tokenizer_config.json` with the export's maximum length.
fn write_tokenizer(src: &Path, config: &ModelConfig, max_len: usize, dest: &Path) -> Result<()> {
    let tok = TextTokenizer::from_dir(src, max_len).with_context(|| {
        format!(
            "{}: the export needs the model's tokenizer; pass --tokenizer DIR when the model \
             directory has none",
            src.display()
        )
    })?;
    if tok.vocab_size() > config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model only {} embeddings (vocab_size): \
             wrong tokenizer?",
            src.display(),
            tok.vocab_size(),
            config.vocab_size
        );
    }
    let json = src.join("tokenizer.json");
    if json.is_file() {
        std::fs::copy(&json, dest.join("tokenizer.json"))
            .with_context(|| format!("copying {}", json.display()))?;
    } else {
        let mut inner = tok.inner().clone();
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let text = inner
            .to_string(true)
            .map_err(|e| anyhow::anyhow!("serialising the tokenizer of {}: {e}", src.display()))?;
        write_atomic(&dest.join("tokenizer.json"), text.as_bytes())?;
    }
    for f in VOCAB_FILES {
        let from = src.join(f);
        if from.is_file() {
            std::fs::copy(&from, dest.join(f))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    let tc_path = src.join("tokenizer_config.json");
    let mut tc = if tc_path.is_file() {
        read_json(&tc_path)?
    } else {
        json!({})
    };
    let obj = tc
        .as_object_mut()
        .with_context(|| format!("{}: not a JSON object", tc_path.display()))?;
    let (class, specials) = match config.arch {
        Arch::Bert => (
            "BertTokenizer",
            [
                ("cls_token", "[CLS]"),
                ("sep_token", "[SEP]"),
                ("pad_token", "[PAD]"),
                ("unk_token", "[UNK]"),
                ("mask_token", "[MASK]"),
            ],
        ),
        Arch::Roberta => (
            "RobertaTokenizer",
            [
                ("cls_token", "<s>"),
                ("sep_token", "</s>"),
                ("pad_token", "<pad>"),
                ("unk_token", "<unk>"),
                ("mask_token", "<mask>"),
            ],
        ),
    };
    obj.entry("tokenizer_class").or_insert_with(|| class.into());
    for (k, v) in specials {
        obj.entry(k).or_insert_with(|| v.into());
    }
    if config.arch == Arch::Bert {
        // What this project's reader assumes when the key is absent; HF's default too.
        obj.entry("do_lower_case").or_insert(Value::Bool(true));
    }
    obj.insert("model_max_length".into(), max_len.into());
    write_atomic(
        &dest.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?.as_bytes(),
    )
}

/// A small deterministic batch (one full row, one padded) for the export's self-check.
fn probe_batch(config: &ModelConfig, max_len: usize, device: &Device) -> Inputs {
    let s = max_len.clamp(1, 12);
    let pad = config.pad_token_id as i64;
    let vocab = config.vocab_size as i64;
    let mut ids = Vec::with_capacity(2 * s);
    let mut mask = Vec::with_capacity(2 * s);
    for row in 0..2 {
        let len = if row == 0 { s } else { s.div_ceil(2) };
        for j in 0..s {
            if j < len {
                let mut id = (7 * j as i64 + 3 * row as i64 + 1) % vocab;
                if id == pad {
                    id = (id + 1) % vocab;
                }
                ids.push(id);
                mask.push(1i64);
            } else {
                ids.push(pad);
                mask.push(0);
            }
        }
    }
    let t = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [2, s]), device);
    Inputs {
        input_ids: t(ids),
        attention_mask: t(mask),
        token_type_ids: None,
    }
}

fn logits_vec(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("float logits")
}

/// The parts of a run directory an export records.
struct RunInfo {
    dir: PathBuf,
    summary: Value,
    recipe_text: String,
    recipe: Option<Recipe>,
    recipe_error: Option<String>,
    recipe_value: Value,
}

fn read_run(dir: &Path) -> Result<RunInfo> {
    let summary_path = dir.join("summary.json");
    if !summary_path.is_file() {
        bail!(
            "{}: no summary.json — not a finished run directory (run `mpcformer run` to the end, \
             or export a model directory with --model)",
            dir.display()
        );
    }
    let summary = read_json(&summary_path)?;
    if !dir.join("student").join("config.json").is_file() {
        bail!(
            "{}: no student/ — this run trained no student (export its teacher with --model {})",
            dir.display(),
            dir.join("teacher").display()
        );
    }
    let recipe_path = dir.join("recipe.toml");
    let recipe_text = std::fs::read_to_string(&recipe_path)
        .with_context(|| format!("reading {}", recipe_path.display()))?;
    let mut value: toml::Value = toml::from_str(&recipe_text)
        .with_context(|| format!("{}: invalid TOML", recipe_path.display()))?;
    let recipe_value = serde_json::to_value(&value)?;
    if let Some(t) = value.as_table_mut() {
        t.remove("resolved");
    }
    let (recipe, recipe_error) = match value.try_into::<Recipe>() {
        Ok(r) => (Some(r), None),
        Err(e) => (
            None,
            Some(format!(
                "{} does not read as a recipe of this version ({e}): its data, maximum length \
                 and teacher are not used",
                recipe_path.display()
            )),
        ),
    };
    Ok(RunInfo {
        dir: dir.to_path_buf(),
        summary,
        recipe_text,
        recipe,
        recipe_error,
        recipe_value,
    })
}

/// An existing `out` may be replaced only when it is an earlier export or empty.
fn check_out(out: &Path) -> Result<()> {
    if out.exists() {
        let is_export = out.join(MANIFEST).is_file();
        let is_empty = out.is_dir()
            && std::fs::read_dir(out)
                .with_context(|| format!("reading {}", out.display()))?
                .next()
                .is_none();
        if !is_export && !is_empty {
            bail!(
                "{} exists and is not an export (no {MANIFEST}): choose another --out",
                out.display()
            );
        }
    }
    Ok(())
}

fn replace_dir(staged: &Path, out: &Path) -> Result<()> {
    check_out(out)?;
    if out.exists() {
        let parent = out.parent().unwrap_or(Path::new("."));
        let old = parent.join(format!(
            ".replaced-{}",
            out.file_name().unwrap_or_default().to_string_lossy()
        ));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(out, &old).with_context(|| format!("moving {} aside", out.display()))?;
        std::fs::rename(staged, out).with_context(|| format!("renaming into {}", out.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(staged, out).with_context(|| format!("renaming into {}", out.display()))?;
    }
    Ok(())
}

/// Writes the export described by `opts`; see the module docs.
pub fn export(opts: &ExportOptions) -> Result<ExportReport> {
    let device = &opts.device;
    let mut notes = Vec::new();
    if opts.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    check_out(&opts.out)?;
    if !(1..=31).contains(&opts.fractional_bits) {
        bail!(
            "--fixed-point-bits {} is out of range: 1..=31 fractional bits of a {RING_BITS}-bit ring",
            opts.fractional_bits
        );
    }

    // 1. The source: model directory, task, provenance.
    let run = match &opts.source {
        Source::Run(dir) => {
            let o = &opts.overrides;
            if o.act.is_some() || o.attn.is_some() || !o.layers.is_empty() {
                bail!(
                    "--act/--attn/--layer apply to --model exports: a run's student is exported \
                     with the approximations it was distilled with"
                );
            }
            Some(read_run(dir)?)
        }
        Source::Model(_) => None,
    };
    let model_spec = match (&opts.source, &run) {
        (Source::Run(_), Some(r)) => r.dir.join("student").to_string_lossy().to_string(),
        (Source::Model(m), _) => m.clone(),
        _ => unreachable!(),
    };
    let model_dir = crate::hub::model_dir(&model_spec)?;
    let task_name = match (&opts.task, &run) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(r)) => r.summary["task"].as_str().map(str::to_string),
        (None, None) => None,
    };
    let task: Option<&'static Task> = task_name
        .as_deref()
        .map(Task::find)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if let (Some(r), Some(t)) = (&run, task)
        && let Some(rt) = r.summary["task"].as_str()
        && Task::find(rt).ok() != Some(t)
    {
        bail!(
            "--task {} differs from the run's task `{rt}` ({})",
            t.name,
            r.dir.join("summary.json").display()
        );
    }

    // The configuration as the file says (dropout included), with the approximation flags and,
    // for a run saved before config.json carried per-layer choices, the recipe's.
    let mut overrides = opts.overrides.clone();
    if let Some(e) = run.as_ref().and_then(|r| r.recipe_error.clone()) {
        notes.push(e);
    }
    if let Some(r) = &run {
        let raw = read_json(&model_dir.join("config.json"))?;
        if let Some(recipe) = &r.recipe {
            let file_cfg = ModelConfig::from_file(&model_dir.join("config.json"))?;
            if raw.get("mpc").is_none() && !recipe.student.layers.is_empty() {
                for (k, o) in &recipe.student.layers {
                    let i: usize = k.parse().with_context(|| {
                        format!("recipe.toml: student.layers key `{k}` is not a layer index")
                    })?;
                    overrides.layers.push((i, *o));
                }
                notes.push(
                    "student/config.json has no `mpc` object: per-layer choices taken from \
                     recipe.toml"
                        .into(),
                );
            }
            if (file_cfg.approx.act, file_cfg.approx.attn)
                != (recipe.student.act, recipe.student.attn)
            {
                notes.push(format!(
                    "student/config.json says {}+{}, the recipe {}+{}: exporting what \
                     config.json says",
                    file_cfg.approx.act,
                    file_cfg.approx.attn,
                    recipe.student.act,
                    recipe.student.attn
                ));
            }
        }
    }
    let file_cfg = overrides.apply(ModelConfig::from_file(&model_dir.join("config.json"))?);
    let load = Overrides {
        no_dropout: true,
        load: LoadOptions::default(),
        ..overrides.clone()
    };
    let pre = load_pretrained(&model_dir.to_string_lossy(), &load, device)
        .with_context(|| format!("loading {model_spec}"))?;
    if !pre.report.initialised.is_empty() {
        bail!(
            "{}: no trained classification head ({} not in the checkpoint): an export of it would \
             predict at random",
            model_dir.display(),
            pre.report.initialised.join(", ")
        );
    }
    if !pre.report.unexpected.is_empty() {
        notes.push(format!(
            "not exported (unused by the model): {}",
            pre.report.unexpected.join(", ")
        ));
    }
    let source_model = pre.model;
    let (labels, regression) = export_labels(&file_cfg, task)?;
    let write_cfg = file_cfg.clone().with_labels(labels.clone(), regression);
    let cap = position_cap(&write_cfg);
    let recipe_max_len = run
        .as_ref()
        .and_then(|r| r.recipe.as_ref())
        .and_then(|r| r.data.max_len);
    let max_len = opts
        .max_len
        .or(recipe_max_len)
        .or(task.map(|t| t.max_len))
        .unwrap_or(512)
        .min(cap);
    let tok_dir = match &opts.tokenizer {
        Some(t) => crate::hub::model_dir(t)?,
        None => model_dir.clone(),
    };

    // 2. Stage the files.
    let out = &opts.out;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".exporting-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    let stage = tmp.path();
    write_atomic(
        &stage.join("config.json"),
        serde_json::to_string_pretty(&write_cfg.to_hf_json())?.as_bytes(),
    )?;
    write_weights(&source_model, opts.dtype, stage, opts.pytorch_bin)?;
    write_tokenizer(&tok_dir, &write_cfg, max_len, stage)?;
    if let Some(r) = &run {
        write_atomic(&stage.join("recipe.toml"), r.recipe_text.as_bytes())?;
    }

    // 3. Load the staged files back as `eval --model` does and check them against the source.
    let exported = load_pretrained(
        &stage.to_string_lossy(),
        &Overrides {
            no_dropout: true,
            ..Overrides::default()
        },
        device,
    )
    .context("loading the staged export back")?;
    if !exported.report.initialised.is_empty() || !exported.report.unexpected.is_empty() {
        bail!(
            "internal error: the staged export does not load cleanly: {}",
            exported.report
        );
    }
    let exported = exported.model;
    if opts.pytorch_bin {
        check_torch_bin(stage).context("internal error: the staged pytorch_model.bin")?;
    }
    let resolved = |c: &ModelConfig| {
        let layers: Vec<LayerApprox> = (0..c.num_hidden_layers)
            .map(|i| c.approx.layer(i))
            .collect();
        (layers, c.approx.c)
    };
    if resolved(&exported.config) != resolved(&source_model.config) {
        bail!(
            "internal error: the staged config.json reads back as {:?}, not {:?}",
            resolved(&exported.config),
            resolved(&source_model.config)
        );
    }
    let probe = probe_batch(&write_cfg, max_len, device);
    let a = logits_vec(source_model.logits(&probe));
    let b = logits_vec(exported.logits(&probe));
    let probe_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let identical = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
    if opts.dtype == Dtype::F32 && !identical {
        bail!(
            "internal error: the staged export's logits differ from the source's by {probe_diff:e}"
        );
    }

    // 4. The dev pass: value ranges and metrics, on the staged files.
    let dev = if opts.no_data {
        None
    } else {
        match dev_data(opts, run.as_ref(), task)? {
            Some(d) => Some(d),
            None => {
                notes.push(
                    "no task: value ranges not estimated (give --task and --data)".to_string(),
                );
                None
            }
        }
    };
    let mut value_ranges = None;
    let mut dev_metrics = None;
    if let Some(d) = &dev {
        let tokenizer = TextTokenizer::from_dir(stage, max_len)?;
        let tokenized = Tokenized::new(&d.set, &tokenizer).map_err(anyhow::Error::msg)?;
        let k = exported.config.num_labels;
        let mut logits = vec![0f32; tokenized.len() * k];
        let mut stats = RangeStats::default();
        for idx in tokenized.plan(opts.batch_size, Order::ByLength, false) {
            let batch = tokenized.batch(&idx);
            let out = logits_vec(stats.capture(&exported, &batch.inputs.to_inputs(device)));
            for (r, &i) in idx.iter().enumerate() {
                logits[i * k..(i + 1) * k].copy_from_slice(&out[r * k..(r + 1) * k]);
            }
        }
        if stats.recompute_error > 1e-3 {
            notes.push(format!(
                "value ranges: layer outputs recomputed for range capture differ from the \
                 model's by {:.2e}",
                stats.recompute_error
            ));
        }
        let ranges = stats.ranges(opts.fractional_bits);
        let squares: Vec<&OpRange> = ranges.iter().filter(|r| r.kind == OpKind::Square).collect();
        let min_headroom = ranges
            .iter()
            .map(|r| r.headroom_bits)
            .fold(f64::INFINITY, f64::min);
        let min_bits = ranges
            .iter()
            .filter_map(|r| r.min_bits)
            .fold(f64::INFINITY, f64::min);
        value_ranges = Some(json!({
            "data": {
                "task": d.task.name,
                "split": d.split,
                "source": d.set.source,
                "examples": d.set.len(),
                "batch_size": opts.batch_size,
                "padding": "each batch padded to its longest example (batches sorted by length)",
                "max_length": max_len,
            },
            "note": "max |x| of each op's input over every entry of the padded dev batches, \
                padded query rows and masked keys included (an MPC runtime computes them before \
                the mask); min for reciprocal / inverse-square-root inputs. headroom_bits: \
                63 − 2f − log2(max_abs²) for a square, 63 − 2f − log2(max_abs) otherwise; \
                min_bits: log2(min·2^f). Estimates from dev data: inputs outside it can exceed them.",
            "ops": ranges,
            "summary": {
                "max_square_input": squares.iter().map(|r| r.max_abs).fold(0.0, f64::max),
                "min_headroom_bits": min_headroom,
                "min_input_bits": if min_bits.is_finite() { json!(min_bits) } else { Value::Null },
                "fits": min_headroom > 0.0 && min_bits >= 0.0,
            },
        }));
        if min_headroom <= 0.0 {
            notes.push(format!(
                "value ranges: an op overflows {RING_BITS}-bit fixed point with {} fractional \
                 bits on dev data (headroom {min_headroom:.1} bits)",
                opts.fractional_bits
            ));
        }
        let mut metrics = json!({
            "split": d.split,
            "source": d.set.source,
            "examples": d.set.len(),
            "computed": "at export, on the exported files",
        });
        if let Some(gold) = d.set.labels() {
            let outputs = Outputs {
                logits,
                num_outputs: k,
                seconds: 0.0,
            };
            let map = eval::label_map(&exported.config.labels, d.task);
            let pred = eval::predictions(&outputs, d.task, &map);
            let scores = metric::score(d.task, &gold, &pred).map_err(anyhow::Error::msg)?;
            metrics["primary"] = d.task.primary.name().into();
            metrics["metrics"] = json!(scores.to_map());
        } else {
            metrics["metrics"] = Value::Null;
            metrics["note"] = "the split is unlabelled".into();
        }
        dev_metrics = Some(metrics);
    }
    if let Some(r) = &run {
        let at_training = r.summary["student"]["metrics"].clone();
        match &mut dev_metrics {
            Some(m) => {
                if m["metrics"].is_object()
                    && at_training.is_object()
                    && opts.range_limit.is_none()
                    && opts.data.is_none()
                    && metrics_differ(&m["metrics"], &at_training)
                {
                    notes.push(format!(
                        "dev metrics at export {} differ from the run's summary.json {}",
                        m["metrics"], at_training
                    ));
                }
                m["at_training"] = at_training;
            }
            None => {
                dev_metrics = Some(json!({
                    "split": r.recipe.as_ref().map(|x| x.data.eval_split.clone()),
                    "computed": "at training (summary.json); not recomputed at export",
                    "metrics": at_training,
                }));
            }
        }
    }

    // 5. The manifest, with every file's hash.
    let per_layer: Vec<LayerApprox> = (0..write_cfg.num_hidden_layers)
        .map(|i| write_cfg.approx.layer(i))
        .collect();
    let source = match &opts.source {
        Source::Run(dir) => json!({
            "kind": "run",
            "path": dir.display().to_string(),
            "run": run.as_ref().and_then(|r| r.summary["name"].as_str().map(str::to_string)),
            "model": "student/",
        }),
        Source::Model(m) => json!({"kind": "model", "path": m}),
    };
    let teacher = teacher_info(opts, run.as_ref())?;
    let recipe = match &run {
        Some(r) => {
            let sha = sha256_file(&stage.join("recipe.toml"))?.sha256;
            let summary_hash = r.summary["recipe_hash"].as_str().map(str::to_string);
            if summary_hash.as_deref().is_some_and(|h| h != sha) {
                notes.push(
                    "recipe.toml's sha256 differs from summary.json's recipe_hash: the recipe \
                     file changed after the run"
                        .into(),
                );
            }
            Some(json!({
                "file": "recipe.toml",
                "sha256": sha,
                "summary_recipe_hash": summary_hash,
                "content": r.recipe_value,
            }))
        }
        None => None,
    };
    if opts.dtype == Dtype::F16 {
        notes.push(format!(
            "f16 weights: logits differ from the f32 source by up to {probe_diff:.2e} on a probe batch"
        ));
    }
    let mut files = BTreeMap::new();
    let mut names: Vec<String> = std::fs::read_dir(stage)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    for n in names {
        files.insert(n.clone(), sha256_file(&stage.join(&n))?);
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        created_by: format!("mpcformer {}", env!("CARGO_PKG_VERSION")),
        source,
        task: task.map(|t| t.name.to_string()),
        labels,
        regression,
        max_length: max_len,
        architecture: match write_cfg.arch {
            Arch::Bert => "BertForSequenceClassification".into(),
            Arch::Roberta => "RobertaForSequenceClassification".into(),
        },
        approximations: json!({
            "label": write_cfg.approx.label(),
            "hidden_act": write_cfg.approx.act.hf_name(),
            "softmax_act": write_cfg.approx.attn.hf_name(),
            "per_layer": per_layer.iter().map(|l| json!({
                "hidden_act": l.act.hf_name(), "softmax_act": l.attn.hf_name()
            })).collect::<Vec<_>>(),
            "formulas": "config.json → mpc",
        }),
        dtype: opts.dtype,
        teacher,
        recipe,
        dev_metrics,
        fixed_point: FixedPoint::new(opts.fractional_bits),
        value_ranges,
        files,
    };
    write_atomic(
        &stage.join(MANIFEST),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    write_p1_part(stage, &manifest)?;

    // 6. Into place, readable by others (temporary files are created owner-only).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let p1 = stage.join(P1_DIR);
        let entries = std::fs::read_dir(stage)?.chain(std::fs::read_dir(&p1)?);
        for e in entries.flatten() {
            let mode = if e.path().is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting permissions of {}", e.path().display()))?;
        }
        std::fs::set_permissions(stage, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting permissions of {}", stage.display()))?;
    }
    let staged = tmp.keep();
    if let Err(e) = replace_dir(&staged, out) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(e);
    }
    Ok(ExportReport {
        dir: out.clone(),
        manifest,
        notes,
    })
}

fn metrics_differ(a: &Value, b: &Value) -> bool {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return false;
    };
    a.iter().any(
        |(k, v)| match (v.as_f64(), b.get(k).and_then(Value::as_f64)) {
            (Some(x), Some(y)) => (x - y).abs() > 1e-9,
            _ => false,
        },
    )
}

fn teacher_info(opts: &ExportOptions, run: Option<&RunInfo>) -> Result<Option<Value>> {
    let Some(r) = run else {
        return Ok(opts.teacher.as_ref().map(|t| json!({"model": t})));
    };
    let mut v = json!({
        "approximations": r.summary["teacher"]["approximations"],
        "dev_metrics": r.summary["teacher"]["metrics"],
    });
    if let Some(recipe) = &r.recipe {
        let t = &recipe.teacher;
        v["model"] = json!(t.model);
        v["config"] = json!(t.config.as_ref().map(|p| p.display().to_string()));
        v["tokenizer"] = json!(t.tokenizer);
        v["fine_tuned_in_run"] = json!(
            recipe
                .stages
                .contains(&crate::train::recipe::StageKind::Finetune)
        );
    }
    let teacher_dir = r.dir.join("teacher");
    if teacher_dir.join("model.safetensors").is_file() {
        v["checkpoint"] = json!(teacher_dir.display().to_string());
        v["checkpoint_sha256"] = json!(sha256_file(&teacher_dir.join("model.safetensors"))?.sha256);
    }
    if let Some(t) = &opts.teacher {
        v["given"] = json!(t);
    }
    Ok(Some(v))
}

fn dev_data(
    opts: &ExportOptions,
    run: Option<&RunInfo>,
    task: Option<&'static Task>,
) -> Result<Option<DevData>> {
    let Some(task) = task else {
        return Ok(None);
    };
    let recipe_data = run.and_then(|r| r.recipe.as_ref()).map(|r| &r.data);
    let spec = opts
        .data
        .clone()
        .or_else(|| recipe_data.and_then(|d| d.spec.clone()));
    let split_name = opts
        .split
        .clone()
        .or_else(|| recipe_data.map(|d| d.eval_split.clone()))
        .unwrap_or_else(|| "dev".into());
    let split = task
        .resolve_splits(&split_name)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .next()
        .with_context(|| format!("{}: no split `{split_name}`", task.title))?;
    let mut set =
        data::load(task, spec.as_deref(), split, &Fields::default()).with_context(|| {
            format!(
                "reading {} {} for the dev pass (value ranges, metrics); pass --data SPEC, or \
             --no-data to export without them",
                task.title, split.name
            )
        })?;
    let limit = match (recipe_data.and_then(|d| d.eval_limit), opts.range_limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(n) = limit {
        set.examples.truncate(n);
    }
    Ok(Some(DevData {
        task,
        set,
        split: split.name.to_string(),
    }))
}

/// What `load-check` found.
#[derive(Debug)]
pub struct CheckReport {
    /// One line per check that passed.
    pub passed: Vec<String>,
    /// Not failures: files the manifest does not list, thin fixed-point headroom.
    pub warnings: Vec<String>,
    pub manifest: Manifest,
}

/// Validates an export directory: the manifest's format and version, every listed file's
/// sha256, config.json (parses, `mpc` object consistent with `hidden_act`/`softmax_act` and this
/// build's constants, labels as the manifest's), model.safetensors (every tensor the config
/// needs, with its shape, in the manifest's dtype, nothing else), pytorch_model.bin when present
/// (the same tensors as model.safetensors: names, dtypes, shapes, bytes), the tokenizer (loads,
/// fits the vocabulary, the same padding id), and the manifest's own fields. Every problem found
/// is listed in the error, each naming its file.
pub fn load_check(dir: &Path) -> Result<CheckReport> {
    let d = |f: &str| dir.join(f).display().to_string();
    let mpath = dir.join(MANIFEST);
    if !dir.is_dir() {
        bail!("{}: no such directory", dir.display());
    }
    let raw = read_json(&mpath).with_context(|| {
        format!(
            "{}: not an export (exports have {MANIFEST}; write one with `mpcformer export`)",
            dir.display()
        )
    })?;
    let format = raw["format"].as_str().unwrap_or_default();
    if format != FORMAT {
        bail!(
            "{}: `format` is {:?}, expected {FORMAT:?}",
            mpath.display(),
            raw["format"]
        );
    }
    let version = raw["format_version"].as_u64().unwrap_or(0);
    if version != FORMAT_VERSION as u64 {
        bail!(
            "{}: format_version {version} is not supported (this build reads version \
             {FORMAT_VERSION}){}",
            mpath.display(),
            if version > FORMAT_VERSION as u64 {
                "; update mpcformer"
            } else {
                ""
            }
        );
    }
    let manifest: Manifest = serde_json::from_value(raw)
        .with_context(|| format!("{}: invalid manifest", mpath.display()))?;
    let mut problems: Vec<String> = Vec::new();
    let mut passed = Vec::new();
    let mut warnings = Vec::new();

    // Hashes.
    for f in REQUIRED_FILES {
        if !manifest.files.contains_key(*f) {
            problems.push(format!("{}: `files` does not list {f}", mpath.display()));
        }
    }
    let mut hashed = 0;
    for (name, entry) in &manifest.files {
        let bad_name =
            name.contains('/') || name.contains('\\') || name == ".." || name == MANIFEST;
        if bad_name {
            problems.push(format!("{}: `files` lists {name:?}", mpath.display()));
            continue;
        }
        let p = dir.join(name);
        match sha256_file(&p) {
            Err(_) => problems.push(format!("{}: missing (listed in {MANIFEST})", d(name))),
            Ok(got) if got.sha256 != entry.sha256 => problems.push(format!(
                "{}: sha256 {} does not match the manifest's {} ({} bytes, manifest {}): the \
                 file changed after export",
                d(name),
                got.sha256,
                entry.sha256,
                got.bytes,
                entry.bytes
            )),
            Ok(_) => hashed += 1,
        }
    }
    if hashed == manifest.files.len() {
        passed.push(format!("sha256 of {hashed} files match the manifest"));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n != MANIFEST && n != P1_DIR && !manifest.files.contains_key(&n) {
                warnings.push(format!("{}: not listed in the manifest", d(&n)));
            }
        }
    }
    check_p1_part(dir, &manifest, &mut passed, &mut problems);

    // config.json.
    let cfg_path = dir.join("config.json");
    let config = match ModelConfig::from_file(&cfg_path) {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    if let Some(cfg) = &config {
        let before = problems.len();
        let raw = read_json(&cfg_path).unwrap_or(Value::Null);
        let mpc = &raw["mpc"];
        if !mpc.is_object() {
            problems.push(format!("{}: no `mpc` object", d("config.json")));
        } else {
            if mpc["version"].as_u64() != Some(MPC_BLOCK_VERSION as u64) {
                problems.push(format!(
                    "{}: mpc.version is {}, this build reads {MPC_BLOCK_VERSION}",
                    d("config.json"),
                    mpc["version"]
                ));
            }
            for key in ["hidden_act", "softmax_act"] {
                if mpc[key] != raw[key] {
                    problems.push(format!(
                        "{}: mpc.{key} {} differs from {key} {}",
                        d("config.json"),
                        mpc[key],
                        raw[key]
                    ));
                }
            }
            let per_layer: Vec<LayerApprox> = (0..cfg.num_hidden_layers)
                .map(|i| cfg.approx.layer(i))
                .collect();
            let used_acts = |a: Act| per_layer.iter().any(|l| l.act == a);
            let used_attns = |a: Attn| per_layer.iter().any(|l| l.attn == a);
            for (used, key) in [
                (used_acts(Act::Quad), "quad"),
                (used_attns(Attn::TwoQuad), "2quad"),
                (used_attns(Attn::TwoRelu), "2relu"),
            ] {
                if used && !mpc[key].is_object() {
                    problems.push(format!(
                        "{}: the model uses {key} but mpc.{key} (its formula and constants) is \
                         missing",
                        d("config.json")
                    ));
                }
            }
            if per_layer.iter().any(|l| *l != per_layer[0]) && !mpc["per_layer"].is_array() {
                problems.push(format!(
                    "{}: layers differ in their approximations but mpc.per_layer is missing",
                    d("config.json")
                ));
            }
            let m = manifest_approx(&manifest);
            if m != per_layer {
                problems.push(format!(
                    "{}: approximations.per_layer {:?} differ from config.json's {:?}",
                    mpath.display(),
                    m,
                    per_layer
                ));
            }
        }
        if cfg.labels != manifest.labels || cfg.is_regression() != manifest.regression {
            problems.push(format!(
                "{}: id2label {:?}{} differs from the manifest's labels {:?}",
                d("config.json"),
                cfg.labels,
                if cfg.is_regression() {
                    " (regression)"
                } else {
                    ""
                },
                manifest.labels
            ));
        }
        let cap = position_cap(cfg);
        if manifest.max_length == 0 || manifest.max_length > cap {
            problems.push(format!(
                "{}: max_length {} does not fit the model's {} positions",
                mpath.display(),
                manifest.max_length,
                cap
            ));
        }
        let arch = raw["architectures"][0].as_str().unwrap_or_default();
        if arch != manifest.architecture {
            problems.push(format!(
                "{}: architectures[0] {arch:?} differs from the manifest's {:?}",
                d("config.json"),
                manifest.architecture
            ));
        }
        if problems.len() == before {
            passed.push(format!(
                "config.json: {} {} layers, hidden {}, {} ({}), labels {:?}",
                manifest.architecture,
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.approx.label(),
                if cfg.approx.layers.is_empty() {
                    "same in every layer".to_string()
                } else {
                    format!("{} layer overrides", cfg.approx.layers.len())
                },
                cfg.labels
            ));
        }
    }

    // model.safetensors against config.json.
    let weights = dir.join("model.safetensors");
    if let Some(cfg) = &config {
        let before = problems.len();
        match std::fs::read(&weights) {
            Err(e) => problems.push(format!("{}: {e}", weights.display())),
            Ok(bytes) => match safetensors::SafeTensors::deserialize(&bytes) {
                Err(e) => problems.push(format!(
                    "{}: not a valid safetensors file ({e})",
                    weights.display()
                )),
                Ok(st) => {
                    let want = manifest.dtype.safetensors();
                    let mut wrong: Vec<String> = st
                        .tensors()
                        .into_iter()
                        .filter(|(_, v)| v.dtype() != want)
                        .map(|(n, v)| format!("{n} ({:?})", v.dtype()))
                        .collect();
                    wrong.sort();
                    if !wrong.is_empty() {
                        problems.push(format!(
                            "{}: tensors not in the manifest's dtype {:?}: {}",
                            weights.display(),
                            want,
                            wrong.join(", ")
                        ));
                    }
                }
            },
        }
        match Checkpoint::open_dir(dir) {
            Err(e) => problems.push(e.to_string()),
            Ok(ckpt) => {
                let model = cfg.clone().without_dropout().init(&Device::flex());
                match model.load_checkpoint(&ckpt, LoadOptions::default()) {
                    Err(e) => problems.push(e.to_string()),
                    Ok((_, report)) => {
                        if !report.initialised.is_empty() {
                            problems.push(format!(
                                "{}: missing tensors {}",
                                weights.display(),
                                report.initialised.join(", ")
                            ));
                        }
                        if !report.unexpected.is_empty() {
                            problems.push(format!(
                                "{}: tensors config.json has no place for: {}",
                                weights.display(),
                                report.unexpected.join(", ")
                            ));
                        }
                        if problems.len() == before {
                            passed.push(format!(
                                "model.safetensors: {} tensors ({:?}), names and shapes as \
                                 config.json says",
                                report.loaded, manifest.dtype
                            ));
                        }
                    }
                }
            }
        }
    }

    // pytorch_model.bin against model.safetensors (absent with `--no-pytorch-bin`).
    if dir.join(torch_bin::FILE).is_file() {
        match check_torch_bin(dir) {
            Ok(n) => passed.push(format!(
                "{}: {n} tensors, names, dtypes, shapes and values as model.safetensors",
                torch_bin::FILE
            )),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }

    // Tokenizer.
    match TextTokenizer::from_dir(dir, manifest.max_length.max(1)) {
        Err(e) => problems.push(e.to_string()),
        Ok(tok) => {
            if let Some(cfg) = &config {
                if tok.vocab_size() > cfg.vocab_size {
                    problems.push(format!(
                        "{}: {} tokens, but config.json's vocab_size is {}",
                        d("tokenizer.json"),
                        tok.vocab_size(),
                        cfg.vocab_size
                    ));
                } else if tok.pad_id as usize != cfg.pad_token_id {
                    problems.push(format!(
                        "{}: padding token id {} differs from config.json's pad_token_id {}",
                        d("tokenizer.json"),
                        tok.pad_id,
                        cfg.pad_token_id
                    ));
                } else {
                    passed.push(format!(
                        "tokenizer: {} tokens, padding id {}, max length {}",
                        tok.vocab_size(),
                        tok.pad_id,
                        manifest.max_length
                    ));
                }
            }
        }
    }

    // The manifest's own fields.
    let fp = &manifest.fixed_point;
    if fp.ring_bits != RING_BITS || !(1..=31).contains(&fp.fractional_bits) {
        problems.push(format!(
            "{}: fixed_point ring_bits {} / fractional_bits {} (expected a {RING_BITS}-bit ring \
             and 1..=31 fractional bits)",
            mpath.display(),
            fp.ring_bits,
            fp.fractional_bits
        ));
    } else {
        passed.push(format!(
            "fixed point: Z_2^{} with {} fractional bits",
            fp.ring_bits, fp.fractional_bits
        ));
    }
    if let Some(task) = &manifest.task
        && Task::find(task).is_err()
    {
        problems.push(format!("{}: unknown task {task:?}", mpath.display()));
    }
    if let Some(recipe) = &manifest.recipe {
        let file = recipe["file"].as_str().unwrap_or_default();
        match manifest.files.get(file) {
            Some(e) if Some(e.sha256.as_str()) == recipe["sha256"].as_str() => {}
            _ => problems.push(format!(
                "{}: recipe.sha256 does not match the listed {file:?}",
                mpath.display()
            )),
        }
    }
    if let Some(vr) = &manifest.value_ranges {
        match serde_json::from_value::<Vec<OpRange>>(vr["ops"].clone()) {
            Err(e) => problems.push(format!(
                "{}: value_ranges.ops is malformed ({e})",
                mpath.display()
            )),
            Ok(ops) => {
                for o in ops.iter().filter(|o| o.headroom_bits <= 0.0) {
                    warnings.push(format!(
                        "{}: {} overflows the fixed-point ring on dev data (headroom {:.1} bits)",
                        mpath.display(),
                        o.op,
                        o.headroom_bits
                    ));
                }
                passed.push(format!("value ranges: {} ops", ops.len()));
            }
        }
    } else {
        warnings.push(format!(
            "{}: no value ranges (exported without dev data)",
            mpath.display()
        ));
    }

    if !problems.is_empty() {
        let mut msg = format!(
            "{}: export check failed ({} problem{}):",
            dir.display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        for p in &problems {
            let _ = write!(msg, "\n  - {p}");
        }
        bail!(msg);
    }
    Ok(CheckReport {
        passed,
        warnings,
        manifest,
    })
}

fn manifest_approx(m: &Manifest) -> Vec<LayerApprox> {
    m.approximations["per_layer"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|l| {
                    Some(LayerApprox {
                        act: l["hidden_act"].as_str()?.parse().ok()?,
                        attn: l["softmax_act"].as_str()?.parse().ok()?,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}
