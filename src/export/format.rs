//! The export format: what an export directory holds and what each file's fields mean — the
//! manifest ([`Manifest`]), P1's public manifest ([`PublicManifest`]), the fixed-point encoding,
//! the per-op value ranges ([`OpRange`]) and the file names.
//!
//! This is the part of `export` that readers of an export share: `load-check`, and the MPC
//! engine (`src/mpc`), which depends on this module alone. It knows nothing of how an export is
//! made (runs, recipes, training), so a runtime that reads exports does not pull those in.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::model::{Arch, LayerApprox, ModelConfig};

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
pub const VOCAB_FILES: &[&str] = &[
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
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F16 => safetensors::Dtype::F16,
        }
    }
}

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

impl Manifest {
    /// Every layer's approximations as `approximations.per_layer` lists them (entries that do
    /// not parse are left out, so a damaged list compares unequal to the model's).
    pub fn per_layer(&self) -> Vec<LayerApprox> {
        self.approximations["per_layer"]
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

/// A JSON file of the export (the manifest, `config.json`), its path in the error.
pub fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// The longest input the model's positions allow (RoBERTa's start after the padding id).
pub fn position_cap(config: &ModelConfig) -> usize {
    match config.arch {
        Arch::Roberta => config.max_position_embeddings.saturating_sub(2),
        Arch::Bert => config.max_position_embeddings,
    }
}
