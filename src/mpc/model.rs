//! An exported model under MPC: BERT or RoBERTa, the teacher (GeLU + softmax) or a student
//! (Quad / ReLU; 2Quad / 2ReLU), any mix per layer.
//!
//! # Who holds what
//!
//! - **P0** holds the weights (`model.safetensors` of an export). In a once-per-model setup it
//!   sends P1 every weight masked by its PRG (`F = W − B0`, see [`super::dealer`]); biases,
//!   LayerNorm β and the position table stay with P0, which adds them to its share.
//! - **P1** holds the token ids (and token-type ids). It reads only `config.json` and
//!   `mpc_manifest.json` (architecture, constants, value ranges), never the weights.
//! - **Public**: the architecture, the batch shape and the attention mask (i.e. each
//!   sequence's length), as in CrypTen — P1 sends the mask to P0 with each batch. RoBERTa's
//!   position ids (`cumsum(ids ≠ pad)·(ids ≠ pad) + pad`) follow from the mask for
//!   right-padded batches, so P0 adds the position rows itself; P1 checks locally that its ids
//!   agree with the mask.
//!
//! # Embedding
//!
//! CrypTen's one-hot × table, but the one-hot is P1's own plaintext and the table P0's masked
//! weight: P1 one-hot-encodes word and token-type ids into one row `[V + T]` and the product
//! with the stacked `[word; type]` table is a single weight product ([`Ctx::linear`], no
//! truncation: the one-hot is an integer). Only `e = onehot − a` crosses (P1 → P0,
//! `8·B·S·(V + T)` bytes); CrypTen shares the one-hot and opens both operands.
//!
//! # Ops and labels
//!
//! `setup` (weights, once), `input` (shape and mask), `embedding`, `layernorm`, `linear`
//! (Q/K/V as one `[d, 3d]` product, attention output, FFN), `attention_matmul` (`QKᵀ`, `P·V`),
//! `2quad` / `2relu` / `softmax`, `quad` / `gelu` / `relu`, `pooler` (dense + tanh; RoBERTa's `classifier.dense` + tanh), `classifier`,
//! `output` (logits to P1). The `1/√d_head` of the scores is folded into P0's query weights.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde::Serialize;
use serde_json::Value;

use super::compare::{GeluKind, GeluPlan, SoftmaxPlan};
use super::dealer::{Dealer, DealerClient, DealerStats};
use super::net::{Channel, Net, OpStats, mem_pair};
use super::protocols::{ChebPlan, Ctx, NewtonKind, NewtonPlan, Op, PrivWeight};
use super::ring::{FixedPoint, RingTensor};
use super::session::{PROTOCOL_VERSION, Settings};
use super::share::{AShare, os_seed};
use super::trunc::Truncation;
use super::{MpcError, Party, Result};
use crate::export::format::{MANIFEST, OpRange, PUBLIC_MANIFEST, PublicManifest};
use crate::model::approx::{QUAD_A, QUAD_B, QUAD_C};
use crate::model::{Act, Arch, Attn, ModelConfig};

/// Factor by which manifest ranges are widened (inputs outside them converge slowly or
/// diverge): the ranges come from the export's dev pass, other inputs go a little beyond (the
/// tiny RoBERTa fixture's random-id batches need more than 2×).
pub const RANGE_MARGIN: f64 = 4.0;
/// Relative error the Newton plans aim for (relaxed step by step if a range is too wide).
pub const NEWTON_TARGETS: [f64; 4] = [1e-4, 1e-3, 1e-2, 5e-2];
/// Absolute error the tanh series aims for.
pub const TANH_TARGET: f64 = 2e-4;

/// Largest batch P0 accepts from P1 (a bound on what an announced shape makes it allocate).
pub const MAX_BATCH: usize = 4096;

/// CrypTen's exp iterations (`(1 + x/2^8)^(2^8)`), the least the softmax plan uses.
pub const DEFAULT_EXP_ITERS: u32 = 8;

/// Plans of one encoder layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerPlans {
    pub act: Act,
    pub attn: Attn,
    /// Reciprocal of the attention row sums (2Quad, 2ReLU; softmax: `softmax.recip`).
    pub recip: NewtonPlan,
    /// Softmax only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub softmax: Option<SoftmaxPlan>,
    /// GeLU (erf or tanh form) only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gelu: Option<GeluPlan>,
    pub attn_ln: NewtonPlan,
    pub out_ln: NewtonPlan,
}

/// Everything both parties know: sizes, constants, fixed point, plans.
#[derive(Clone, Debug, Serialize)]
pub struct MpcConfig {
    #[serde(skip)]
    pub model: ModelConfig,
    pub frac_bits: u32,
    pub emb_ln: NewtonPlan,
    pub layers: Vec<LayerPlans>,
    pub tanh: ChebPlan,
    /// Where the ranges came from (`manifest` or `defaults`).
    pub ranges_from: String,
    /// Prepare each forward pass's correlated randomness in an offline phase before the input
    /// (default). Without it, every round draws its material and P1 asks the dealer during the
    /// round (what CrypTen's timing includes): the same results with far less memory — the
    /// teacher at BERT-base shapes and seq 512 needs more than 20 GB of material for one
    /// forward pass.
    pub offline: bool,
    /// How the hot spots truncate (default exact; see [`super::trunc`]).
    pub truncation: Truncation,
}

/// A planning error, naming the op whose range it could not plan for.
fn in_op(op: &str, e: MpcError) -> MpcError {
    match e {
        MpcError::Config(m) => MpcError::Config(format!("{op}: {m}")),
        other => other,
    }
}

/// The tightest target a plan of at most 16 steps reaches; failing every one, the tightest a
/// longer plan reaches (ranges as wide as a fitted student's 2Quad row sums).
fn newton(kind: NewtonKind, lo: f64, hi: f64) -> Result<NewtonPlan> {
    let mut last = None;
    for plan in [NewtonPlan::new, NewtonPlan::new_wide] {
        for t in NEWTON_TARGETS {
            match plan(kind, lo, hi, t) {
                Ok(p) => return Ok(p),
                Err(e) => last = Some(e),
            }
        }
    }
    Err(last.expect("targets tried"))
}

/// The fewest bits above zero the smallest 2Quad row sum may keep once scaled: its squares are
/// truncated one by one before they are summed, so below this the sum is rounding noise, and a
/// row that rounds to 0 makes the reciprocal double every step — garbage the client cannot
/// tell from an answer. A fitted CoLA student keeps 7.6; the STS-B one whose 2Quad heads mixed
/// query scales of 1 and 100 in one layer kept 0.4, and its scores under MPC were noise.
/// (LayerNorm's variance is summed at 2f bits and truncated once: its encoding alone limits it.)
pub const MIN_INPUT_BITS: f64 = 4.0;

/// The plan of the reciprocal (2Quad) or inverse square root (LayerNorm) of a sum of squares
/// lying in `[lo, hi]`: above ~256, the squared value is scaled down by `2^k` first (see
/// [`Ctx::layer_norm`], [`Ctx::two_quad`]) and the plan covers `[lo, hi] / 4^k`, which keeps
/// the sums ≤ 256 and every truncated square and sum far from the ring's limit — a reciprocal's
/// refused when that leaves `lo` fewer than [`MIN_INPUT_BITS`] at `frac_bits`.
fn scaled_plan(kind: NewtonKind, lo: f64, hi: f64, frac_bits: u32) -> Result<NewtonPlan> {
    let k = ((hi.log2() / 2.0).ceil() - 4.0).max(0.0) as u32;
    let s = 4f64.powi(k as i32);
    let bits = (lo / s).log2() + frac_bits as f64;
    if kind == NewtonKind::Reciprocal && bits < MIN_INPUT_BITS {
        return Err(MpcError::Config(format!(
            "{kind:?} inputs span [{lo:.3e}, {hi:.3e}] (calibrated range with its ×{RANGE_MARGIN} margin), 2^{:.1} apart: scaled by 4^-{k} so that the largest fits, the smallest keeps {bits:.1} bits at {frac_bits} fractional bits (at least {MIN_INPUT_BITS}), and its result would be noise; narrow the range (e.g. a fitted student's 2Quad query scales)",
            (hi / lo).log2()
        )));
    }
    let mut plan = newton(kind, lo / s, hi / s)?;
    plan.input_shift = k;
    Ok(plan)
}

impl MpcConfig {
    /// Plans every layer's non-linear ops (Quad or GeLU or ReLU; 2Quad, 2ReLU or softmax) from
    /// `ranges` (the manifest's `value_ranges.ops`), or from defaults when `None`. `exp_iters`
    /// forces the softmax's exp iterations (default: [`DEFAULT_EXP_ITERS`], more when the
    /// manifest's range of `x − max` goes below `−2^8 / RANGE_MARGIN`).
    pub fn new(model: ModelConfig, frac_bits: u32, ranges: Option<&[OpRange]>) -> Result<Self> {
        Self::with_exp_iters(model, frac_bits, ranges, None)
    }

    pub fn with_exp_iters(
        model: ModelConfig,
        frac_bits: u32,
        ranges: Option<&[OpRange]>,
        exp_iters: Option<u32>,
    ) -> Result<Self> {
        FixedPoint::new(frac_bits)?;
        if let Some(n) = exp_iters
            && !(1..=16).contains(&n)
        {
            return Err(MpcError::Config(format!(
                "exp iterations must be 1..=16, got {n}"
            )));
        }
        let find = |op: &str| ranges.and_then(|r| r.iter().find(|x| x.op == op));
        let interval = |op: &str, default: (f64, f64)| -> (f64, f64) {
            match find(op) {
                Some(r) => {
                    let lo = r.min.unwrap_or(default.0).max(1e-9);
                    (lo / RANGE_MARGIN, r.max_abs.max(lo) * RANGE_MARGIN)
                }
                None => default,
            }
        };
        // Without a manifest (benchmarks on random weights): LayerNorm variances in
        // [0.01, 100], 2Quad row sums in [1, 10⁴].
        let var_default = (1e-2, 1e2);
        let sum_default = (1.0, 1e4);
        let (lo, hi) = interval("embeddings.LayerNorm.inv_sqrt", var_default);
        let emb_ln = scaled_plan(NewtonKind::InvSqrt, lo, hi, frac_bits)
            .map_err(|e| in_op("embeddings.LayerNorm.inv_sqrt", e))?;
        let mut layers = Vec::new();
        for i in 0..model.num_hidden_layers {
            let p = format!("layer.{i}");
            let la = model.approx.layer(i);
            let mut softmax = None;
            let recip = match la.attn {
                Attn::TwoQuad => {
                    let op = format!("{p}.2quad.row_sum");
                    let (lo, hi) = interval(&op, sum_default);
                    scaled_plan(NewtonKind::Reciprocal, lo, hi, frac_bits)
                        .map_err(|e| in_op(&op, e))?
                }
                Attn::TwoRelu => {
                    // Sums of ReLUs: no scaling (nothing is squared); a lower bound of 1/64
                    // at least (the reference's ε = 10⁻¹² is below one fixed-point unit).
                    let (lo, hi) = interval(&format!("{p}.2relu.row_sum"), sum_default);
                    newton(NewtonKind::Reciprocal, lo.max(1.0 / 64.0), hi)?
                }
                Attn::Softmax => {
                    // Σ exp(x − max) over real keys lies in [1, L] (the max's own term is 1).
                    let hi = model.max_position_embeddings as f64 + 1.0;
                    let plan = newton(NewtonKind::Reciprocal, 0.5, hi)?;
                    let n = exp_iters.unwrap_or_else(|| {
                        let r = find(&format!("{p}.softmax.exp")).map_or(0.0, |r| r.max_abs);
                        let need = (r * RANGE_MARGIN).max(1.0).log2().ceil() as u32;
                        need.clamp(DEFAULT_EXP_ITERS, 16)
                    });
                    softmax = Some(SoftmaxPlan {
                        exp_iters: n,
                        recip: plan.clone(),
                    });
                    plan
                }
            };
            let gelu = match la.act {
                Act::Gelu => Some(GeluPlan::new(GeluKind::Erf)),
                Act::GeluTanh => Some(GeluPlan::new(GeluKind::Tanh)),
                Act::Quad | Act::Relu => None,
            };
            let ln_plan = |name: &str| {
                let op = format!("{p}.{name}.LayerNorm.inv_sqrt");
                let (lo, hi) = interval(&op, var_default);
                scaled_plan(NewtonKind::InvSqrt, lo, hi, frac_bits).map_err(|e| in_op(&op, e))
            };
            let attn_ln = ln_plan("attention.output")?;
            let out_ln = ln_plan("output")?;
            layers.push(LayerPlans {
                act: la.act,
                attn: la.attn,
                recip,
                softmax,
                gelu,
                attn_ln,
                out_ln,
            });
        }
        let tanh_max = find("pooler.tanh")
            .or_else(|| find("classifier.dense.tanh"))
            .map(|r| r.max_abs)
            .unwrap_or(8.0);
        let tanh = ChebPlan::tanh((tanh_max * 1.5).max(1.0), TANH_TARGET)
            .or_else(|_| ChebPlan::tanh((tanh_max * 1.5).max(1.0), 1e-3))?;
        Ok(Self {
            model,
            frac_bits,
            emb_ln,
            layers,
            tanh,
            offline: true,
            truncation: Truncation::default(),
            ranges_from: if ranges.is_some() {
                "manifest".into()
            } else {
                "defaults".into()
            },
        })
    }

    /// `config.json` and `mpc_manifest.json` of an export (what both parties read).
    pub fn from_export(dir: &Path) -> anyhow::Result<Self> {
        Self::from_export_with(dir, None, None)
    }

    /// [`MpcConfig::from_export`] with the approximations replaced by `approx` (benchmarks of
    /// other variants on the same weights) and the exp iterations forced.
    pub fn from_export_with(
        dir: &Path,
        approx: Option<crate::model::Approx>,
        exp_iters: Option<u32>,
    ) -> anyhow::Result<Self> {
        let mut model = ModelConfig::from_file(&dir.join("config.json"))?;
        if let Some(a) = approx {
            model.approx = a;
        }
        // P0 reads the export's manifest; P1 the public part's (`<export>/p1/`), which holds the
        // same plans and nothing else.
        let path = [MANIFEST, PUBLIC_MANIFEST]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .unwrap_or_else(|| dir.join(MANIFEST));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let manifest: PublicManifest =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let ranges: Option<Vec<OpRange>> = manifest
            .value_ranges
            .as_ref()
            .and_then(|v| v.get("ops"))
            .map(|ops| serde_json::from_value(ops.clone()))
            .transpose()?;
        Ok(Self::with_exp_iters(
            model,
            manifest.fixed_point.fractional_bits,
            ranges.as_deref(),
            exp_iters,
        )?)
    }

    pub fn fp(&self) -> FixedPoint {
        FixedPoint::new(self.frac_bits).expect("checked")
    }

    /// Digests of everything both parties must share, checked when a session starts
    /// ([`super::session`]): a difference in any would give wrong logits silently.
    pub fn settings(&self) -> Settings {
        let bytes = |v: &Value| serde_json::to_vec(v).expect("JSON values serialise");
        let mut arch = serde_json::to_value(&self.model).expect("the config serialises");
        if let Some(o) = arch.as_object_mut() {
            o.remove("approx");
        }
        let approx = serde_json::json!({
            "approx": self.model.approx,
            "quad": [QUAD_A, QUAD_B, QUAD_C],
        });
        let versions = serde_json::json!({
            "session_protocol": PROTOCOL_VERSION,
            "export_format": crate::export::format::FORMAT_VERSION,
        });
        let plans = serde_json::to_value(self).expect("the plans serialise");
        Settings::new(&[
            ("protocol and export format versions", &bytes(&versions)),
            ("architecture", &bytes(&arch)),
            ("approximations (incl. 2Quad's c)", &bytes(&approx)),
            ("fixed-point fractional bits", &self.frac_bits.to_le_bytes()),
            ("protocol plans", &bytes(&plans)),
        ])
    }

    /// P1's announced input shape, checked before P0 allocates anything for it: `None` for the
    /// end-of-session shape `[0, _]`.
    pub fn check_input_shape(&self, shape: &[u64]) -> Result<Option<(usize, usize)>> {
        let (b, s) = (shape[0], shape[1]);
        if b == 0 {
            return Ok(None);
        }
        let max_s = self.model.max_position_embeddings as u64;
        if b > MAX_BATCH as u64 || s == 0 || s > max_s {
            return Err(MpcError::Config(format!(
                "input: P1 announced batch {b} × sequence {s}, outside 1..={MAX_BATCH} × 1..={max_s}"
            )));
        }
        Ok(Some((b as usize, s as usize)))
    }

    /// Rounds of one forward pass at sequence length `seq`, from the plans (setup and input
    /// excluded).
    pub fn rounds_per_forward(&self, seq: usize) -> u64 {
        // Each hot-spot truncation adds `tr` rounds (see `super::trunc`).
        let tr = self.truncation.rounds() as u64;
        let ln = |p: &NewtonPlan| 2 + 3 * tr + p.rounds() as u64;
        let product = 1 + tr; // a linear layer, QKᵀ or P·V, truncated at a hot spot
        let levels = (seq.max(1) as f64).log2().ceil() as u64;
        let mut r = 1 + ln(&self.emb_ln);
        for l in &self.layers {
            // qkv, QKᵀ, attention weights, P·V, out, ln, ffn up, activation, ffn down, ln
            let attn = match (l.attn, &l.softmax) {
                (Attn::Softmax, Some(sp)) => {
                    9 * levels + sp.exp_iters as u64 * (1 + tr) + sp.recip.rounds() as u64 + 1
                }
                (Attn::TwoRelu, _) => 9 + 8 + l.recip.rounds() as u64 + 1,
                _ => 1 + tr + l.recip.rounds() as u64 + 1,
            };
            let act = match (&l.gelu, l.act) {
                (Some(g), _) => g.rounds(self.truncation) as u64,
                (None, Act::Relu) => 9,
                _ => 1 + tr,
            };
            r += 4 * product + attn + ln(&l.attn_ln);
            r += 2 * product + act + ln(&l.out_ln);
        }
        r + product + self.tanh.rounds() as u64 + product + 1
    }
}

/// P0's plaintext weights by Hugging Face name (row-major, HF layout).
#[derive(Clone, Default)]
pub struct PlainWeights {
    pub tensors: std::collections::BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

impl std::fmt::Debug for PlainWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PlainWeights {{ {} tensors }}", self.tensors.len())
    }
}

impl PlainWeights {
    /// `model.safetensors` of an export.
    pub fn from_export(dir: &Path) -> anyhow::Result<Self> {
        let map = crate::io::load_safetensors(&dir.join("model.safetensors"))?;
        Ok(Self {
            tensors: map
                .into_iter()
                .map(|(k, v)| (k, (v.shape().to_vec(), v.to_f64())))
                .collect(),
        })
    }

    /// Random weights of `cfg`'s shapes (N(0, 0.02²), LayerNorm γ = 1, β = 0), for benchmarks.
    pub fn random(cfg: &ModelConfig, seed: u64) -> Self {
        use rand_core::RngCore;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut normal = move || {
            // Box–Muller.
            let u1 = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            0.02 * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        let mut w = Self::default();
        for (name, shape) in weight_shapes(cfg) {
            let n: usize = shape.iter().product();
            let data = if name.ends_with("LayerNorm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal()).collect()
            };
            w.tensors.insert(name, (shape, data));
        }
        w
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<&[f64]> {
        let (s, d) = self
            .tensors
            .get(name)
            .ok_or_else(|| MpcError::Config(format!("weight `{name}` missing")))?;
        if s != shape {
            return Err(MpcError::Shape {
                op: format!("weight `{name}`"),
                lhs: s.clone(),
                rhs: shape.to_vec(),
            });
        }
        Ok(d)
    }
}

/// Every tensor the MPC forward reads, with its HF shape.
pub fn weight_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let p = cfg.arch.prefix();
    let d = cfg.hidden_size;
    let mut v = vec![
        (
            format!("{p}.embeddings.word_embeddings.weight"),
            vec![cfg.vocab_size, d],
        ),
        (
            format!("{p}.embeddings.position_embeddings.weight"),
            vec![cfg.max_position_embeddings, d],
        ),
        (
            format!("{p}.embeddings.token_type_embeddings.weight"),
            vec![cfg.type_vocab_size, d],
        ),
        (format!("{p}.embeddings.LayerNorm.weight"), vec![d]),
        (format!("{p}.embeddings.LayerNorm.bias"), vec![d]),
    ];
    for i in 0..cfg.num_hidden_layers {
        let l = format!("{p}.encoder.layer.{i}");
        for (n, o, inp) in [
            ("attention.self.query", d, d),
            ("attention.self.key", d, d),
            ("attention.self.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", cfg.intermediate_size, d),
            ("output.dense", d, cfg.intermediate_size),
        ] {
            v.push((format!("{l}.{n}.weight"), vec![o, inp]));
            v.push((format!("{l}.{n}.bias"), vec![o]));
        }
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            v.push((format!("{l}.{n}.weight"), vec![d]));
            v.push((format!("{l}.{n}.bias"), vec![d]));
        }
    }
    match cfg.arch {
        Arch::Bert => {
            v.push((format!("{p}.pooler.dense.weight"), vec![d, d]));
            v.push((format!("{p}.pooler.dense.bias"), vec![d]));
            v.push(("classifier.weight".into(), vec![cfg.num_labels, d]));
            v.push(("classifier.bias".into(), vec![cfg.num_labels]));
        }
        Arch::Roberta => {
            v.push(("classifier.dense.weight".into(), vec![d, d]));
            v.push(("classifier.dense.bias".into(), vec![d]));
            v.push(("classifier.out_proj.weight".into(), vec![cfg.num_labels, d]));
            v.push(("classifier.out_proj.bias".into(), vec![cfg.num_labels]));
        }
    }
    v
}

/// One batch: shape and public mask for both; ids for P1 only.
#[derive(Clone)]
pub struct Input {
    pub batch: usize,
    pub seq: usize,
    /// `[batch · seq]`, 1 for real tokens (public).
    pub mask: Vec<u64>,
    /// P1 only: token ids and token-type ids, `[batch · seq]`.
    pub ids: Option<Vec<i64>>,
    pub type_ids: Option<Vec<i64>>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Input {{ batch: {}, seq: {}, ids: <redacted> }}",
            self.batch, self.seq
        )
    }
}

impl Input {
    /// P1's input from a host batch.
    pub fn from_host(b: &crate::tokenize::HostBatch) -> Self {
        Self {
            batch: b.batch,
            seq: b.seq,
            mask: b
                .attention_mask
                .iter()
                .map(|&m| u64::from(m != 0))
                .collect(),
            ids: Some(b.input_ids.clone()),
            type_ids: Some(b.token_type_ids.clone()),
        }
    }

    /// What P0 learns: shape and mask.
    pub fn public(&self) -> Self {
        Self {
            ids: None,
            type_ids: None,
            ..self.clone()
        }
    }
}

struct LnW {
    gamma: PrivWeight,
    beta: Option<RingTensor>,
}

struct LayerW {
    qkv: PrivWeight,
    qkv_b: Option<RingTensor>,
    o: PrivWeight,
    o_b: Option<RingTensor>,
    ln1: LnW,
    up: PrivWeight,
    up_b: Option<RingTensor>,
    down: PrivWeight,
    down_b: Option<RingTensor>,
    ln2: LnW,
}

/// The model as one party holds it after setup.
pub struct MpcModel {
    pub cfg: MpcConfig,
    emb: PrivWeight,
    pos: Option<RingTensor>,
    emb_ln: LnW,
    layers: Vec<LayerW>,
    pool: PrivWeight,
    pool_b: Option<RingTensor>,
    cls: PrivWeight,
    cls_b: Option<RingTensor>,
}

/// Encodes P0's tensors; P1 gets `None`s and shapes.
struct Loader<'a> {
    w: Option<&'a PlainWeights>,
    fp: FixedPoint,
    next_id: u64,
}

impl Loader<'_> {
    fn enc(&self, v: &[f64], shape: &[usize]) -> RingTensor {
        RingTensor::new(shape.to_vec(), self.fp.encode_slice(v)).expect("shape from the data")
    }

    /// `[out, in]` HF linear weight as `[in, out]`, scaled.
    fn linear_t(&self, name: &str, out: usize, inp: usize, scale: f64) -> Result<Option<Vec<f64>>> {
        let Some(w) = self.w else { return Ok(None) };
        let d = w.get(name, &[out, inp])?;
        let mut t = vec![0.0; out * inp];
        for r in 0..out {
            for c in 0..inp {
                t[c * out + r] = d[r * inp + c] * scale;
            }
        }
        Ok(Some(t))
    }

    fn vec(&self, name: &str, n: usize, scale: f64) -> Result<Option<Vec<f64>>> {
        let Some(w) = self.w else { return Ok(None) };
        Ok(Some(w.get(name, &[n])?.iter().map(|x| x * scale).collect()))
    }

    fn private(
        &mut self,
        ctx: &mut Ctx,
        data: Option<Vec<f64>>,
        shape: &[usize],
    ) -> Result<PrivWeight> {
        let id = self.next_id;
        self.next_id += 1;
        let t = data.map(|d| self.enc(&d, shape));
        ctx.share_weight(id, t.as_ref(), shape)
    }

    fn p0(&self, data: Option<Vec<f64>>, shape: &[usize]) -> Option<RingTensor> {
        data.map(|d| self.enc(&d, shape))
    }

    /// The embedding table, `[word; type]` rows masked to P1, and the position embeddings,
    /// public to P0.
    fn embeddings(
        &mut self,
        ctx: &mut Ctx,
        m: &ModelConfig,
    ) -> Result<(PrivWeight, Option<RingTensor>)> {
        let (d, v, t) = (m.hidden_size, m.vocab_size, m.type_vocab_size);
        let p = m.arch.prefix();
        let table = match self.w {
            Some(w) => {
                let mut x = w
                    .get(&format!("{p}.embeddings.word_embeddings.weight"), &[v, d])?
                    .to_vec();
                x.extend_from_slice(w.get(
                    &format!("{p}.embeddings.token_type_embeddings.weight"),
                    &[t, d],
                )?);
                Some(x)
            }
            None => None,
        };
        let emb = self.private(ctx, table, &[v + t, d])?;
        let pos = match self.w {
            Some(w) => {
                let np = m.max_position_embeddings;
                let name = format!("{p}.embeddings.position_embeddings.weight");
                Some(self.enc(w.get(&name, &[np, d])?, &[np, d]))
            }
            None => None,
        };
        Ok((emb, pos))
    }

    /// A Linear layer `name` (`[out, in]` as stored): its weight transposed to `[in, out]` and
    /// masked to P1, its bias public to P0.
    fn dense(
        &mut self,
        ctx: &mut Ctx,
        name: &str,
        out: usize,
        inp: usize,
    ) -> Result<(PrivWeight, Option<RingTensor>)> {
        let w = self.linear_t(&format!("{name}.weight"), out, inp, 1.0)?;
        let w = self.private(ctx, w, &[inp, out])?;
        let b = self.vec(&format!("{name}.bias"), out, 1.0)?;
        Ok((w, self.p0(b, &[out])))
    }

    /// Encoder layer `l`: query, key and value fused into one `[d, 3d]` matrix, the query
    /// scaled by 1/√head_dim so that no party multiplies the scores by it.
    fn layer(&mut self, ctx: &mut Ctx, m: &ModelConfig, l: &str) -> Result<LayerW> {
        let (d, ffn) = (m.hidden_size, m.intermediate_size);
        let qscale = 1.0 / ((d / m.num_attention_heads) as f64).sqrt();
        let scales = [("query", qscale), ("key", 1.0), ("value", 1.0)];
        let (qkv, qkv_b) = match self.w {
            Some(_) => {
                let mut cat = vec![0.0; d * 3 * d];
                let mut bias = Vec::with_capacity(3 * d);
                for (j, (part, scale)) in scales.into_iter().enumerate() {
                    let name = format!("{l}.attention.self.{part}");
                    let w = self.linear_t(&format!("{name}.weight"), d, d, scale)?;
                    let w = w.expect("P0 holds the weights");
                    for r in 0..d {
                        cat[r * 3 * d + j * d..r * 3 * d + (j + 1) * d]
                            .copy_from_slice(&w[r * d..(r + 1) * d]);
                    }
                    let b = self.vec(&format!("{name}.bias"), d, scale)?;
                    bias.extend(b.expect("P0 holds the weights"));
                }
                (Some(cat), Some(bias))
            }
            None => (None, None),
        };
        let qkv = self.private(ctx, qkv, &[d, 3 * d])?;
        let qkv_b = self.p0(qkv_b, &[3 * d]);
        let (o, o_b) = self.dense(ctx, &format!("{l}.attention.output.dense"), d, d)?;
        let ln1 = self.ln(ctx, &format!("{l}.attention.output.LayerNorm"), d)?;
        let (up, up_b) = self.dense(ctx, &format!("{l}.intermediate.dense"), ffn, d)?;
        let (down, down_b) = self.dense(ctx, &format!("{l}.output.dense"), d, ffn)?;
        let ln2 = self.ln(ctx, &format!("{l}.output.LayerNorm"), d)?;
        Ok(LayerW {
            qkv,
            qkv_b,
            o,
            o_b,
            ln1,
            up,
            up_b,
            down,
            down_b,
            ln2,
        })
    }

    fn ln(&mut self, ctx: &mut Ctx, name: &str, d: usize) -> Result<LnW> {
        let g = self.vec(&format!("{name}.weight"), d, 1.0)?;
        let b = self.vec(&format!("{name}.bias"), d, 1.0)?;
        Ok(LnW {
            gamma: self.private(ctx, g, &[d])?,
            beta: self.p0(b, &[d]),
        })
    }
}

impl MpcModel {
    /// Setup (once per model): P0 passes its weights, P1 `None`. Every weight matrix and γ is
    /// masked and sent to P1 (op `setup`).
    pub fn setup(ctx: &mut Ctx, cfg: MpcConfig, weights: Option<&PlainWeights>) -> Result<Self> {
        if (ctx.party == Party::P0) != weights.is_some() {
            return Err(MpcError::Config("P0 and only P0 holds the weights".into()));
        }
        ctx.op("setup");
        let m = &cfg.model;
        let d = m.hidden_size;
        let p = m.arch.prefix();
        let mut ld = Loader {
            w: weights,
            fp: cfg.fp(),
            next_id: 0,
        };
        let (emb, pos) = ld.embeddings(ctx, m)?;
        let emb_ln = ld.ln(ctx, &format!("{p}.embeddings.LayerNorm"), d)?;
        let layers = (0..m.num_hidden_layers)
            .map(|i| ld.layer(ctx, m, &format!("{p}.encoder.layer.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let (pool_name, cls_name) = match m.arch {
            Arch::Bert => (format!("{p}.pooler.dense"), "classifier".to_string()),
            Arch::Roberta => (
                "classifier.dense".to_string(),
                "classifier.out_proj".to_string(),
            ),
        };
        let (pool, pool_b) = ld.dense(ctx, &pool_name, d, d)?;
        let (cls, cls_b) = ld.dense(ctx, &cls_name, m.num_labels, d)?;
        ctx.warm_dealer()?;
        Ok(Self {
            cfg,
            emb,
            pos,
            emb_ln,
            layers,
            pool,
            pool_b,
            cls,
            cls_b,
        })
    }

    /// Offline phase for one forward pass of shape `[batch, seq]`: runs the forward pass on
    /// dummy inputs in the offline mode of [`Ctx`] (no peer traffic; P1 talks to the dealer),
    /// so the next forward pass of that shape finds its correlated randomness and P1's weight
    /// products ready. Needs no input: the rounds depend on the shape only.
    pub fn preprocess(&self, ctx: &mut Ctx, batch: usize, seq: usize) -> Result<()> {
        let n = batch * seq;
        let dummy = Input {
            batch,
            seq,
            mask: vec![1; n],
            ids: (ctx.party == Party::P1).then(|| vec![0; n]),
            type_ids: None,
        };
        ctx.op("offline");
        ctx.begin_offline();
        let r = self.forward(ctx, &dummy);
        let e = ctx.end_offline();
        r?;
        e?;
        // Both parties done: the online phase starts together.
        ctx.net.exchange(&[])?;
        Ok(())
    }

    /// One private forward pass. Returns the logits `[batch · num_labels]` at P1, `None` at P0.
    pub fn forward(&self, ctx: &mut Ctx, input: &Input) -> Result<Option<Vec<f64>>> {
        let m = &self.cfg.model;
        let (b, s) = (input.batch, input.seq);
        if input.mask.len() != b * s {
            return Err(MpcError::Length {
                op: "input mask".into(),
                shape: vec![b, s],
                len: input.mask.len(),
            });
        }
        let positions = position_ids(m, input)?;
        if positions.iter().any(|&p| p >= m.max_position_embeddings) {
            return Err(MpcError::Config(format!(
                "sequence length {s} exceeds the model's {} positions",
                m.max_position_embeddings
            )));
        }
        let mut x = self.embed(ctx, input, &positions)?;
        if ctx.is_offline() {
            ctx.fetch_offline()?; // the embedding's share of the dealer's work, before the timer
        }
        let t_enc = Instant::now();
        for (lw, lp) in self.layers.iter().zip(&self.cfg.layers) {
            x = self.layer(ctx, (lw, lp), &x, input)?;
            if ctx.is_offline() {
                ctx.pipeline_offline()?; // the dealer works on this layer while P1 records the next
            }
        }
        if ctx.is_offline() {
            ctx.fetch_offline()?; // the encoder's share of the dealer's work
        }
        let enc_s = t_enc.elapsed().as_secs_f64();
        if ctx.is_offline() {
            ctx.encoder_offline_s += enc_s;
        } else {
            ctx.encoder_s += enc_s;
        }
        self.head(ctx, &x, (b, s))
    }

    /// The word and token-type embeddings (the one-hot rows P1 shares, times the table), the
    /// public positions' embeddings, and their LayerNorm.
    fn embed(&self, ctx: &mut Ctx, input: &Input, positions: &[usize]) -> Result<AShare> {
        let m = &self.cfg.model;
        let (rows, d) = (input.batch * input.seq, m.hidden_size);
        ctx.op("embedding");
        let width = m.vocab_size + m.type_vocab_size;
        let onehot = match ctx.party {
            Party::P0 => RingTensor::zeros(&[rows, width]),
            Party::P1 => {
                let ids = input
                    .ids
                    .as_ref()
                    .ok_or_else(|| MpcError::Config("P1 needs the token ids".into()))?;
                let zero = vec![0i64; rows];
                let tt = input.type_ids.as_ref().unwrap_or(&zero);
                let mut oh = vec![0u64; rows * width];
                for r in 0..rows {
                    let (id, t) = (ids[r], tt[r]);
                    if id < 0
                        || id as usize >= m.vocab_size
                        || t < 0
                        || t as usize >= m.type_vocab_size
                    {
                        return Err(MpcError::Config(format!(
                            "a token id or token-type id is outside the vocabulary ({} words, {} types)",
                            m.vocab_size, m.type_vocab_size
                        )));
                    }
                    oh[r * width + id as usize] = 1;
                    oh[r * width + m.vocab_size + t as usize] = 1;
                }
                RingTensor::new(vec![rows, width], oh)?
            }
        };
        let onehot = AShare::new(ctx.party, onehot);
        let mut x = ctx.linear(&onehot, &self.emb, None, 0)?;
        if let Some(pos) = &self.pos {
            for (r, &p) in positions.iter().enumerate() {
                for c in 0..d {
                    x.t.data[r * d + c] = x.t.data[r * d + c].wrapping_add(pos.data[p * d + c]);
                }
            }
        }
        ctx.op("layernorm");
        ctx.layer_norm(
            &x,
            &self.emb_ln.gamma,
            self.emb_ln.beta.as_ref(),
            m.layer_norm_eps,
            &self.cfg.emb_ln,
        )
    }

    /// One encoder layer: attention and the feed-forward block, each with its residual and
    /// LayerNorm.
    fn layer(
        &self,
        ctx: &mut Ctx,
        (lw, lp): (&LayerW, &LayerPlans),
        x: &AShare,
        input: &Input,
    ) -> Result<AShare> {
        let (f, eps) = (ctx.f(), self.cfg.model.layer_norm_eps);
        let c = self.attention(ctx, (lw, lp), x, input)?;
        ctx.op("linear");
        let ao = ctx.linear(&c, &lw.o, lw.o_b.as_ref(), f)?.add(x)?;
        ctx.op("layernorm");
        let x1 = ctx.layer_norm(&ao, &lw.ln1.gamma, lw.ln1.beta.as_ref(), eps, &lp.attn_ln)?;
        ctx.op("linear");
        let up = ctx.linear(&x1, &lw.up, lw.up_b.as_ref(), f)?;
        let act = activation(ctx, lp, &up)?;
        ctx.op("linear");
        let down = ctx
            .linear(&act, &lw.down, lw.down_b.as_ref(), f)?
            .add(&x1)?;
        ctx.op("layernorm");
        ctx.layer_norm(&down, &lw.ln2.gamma, lw.ln2.beta.as_ref(), eps, &lp.out_ln)
    }

    /// Self-attention up to the merged heads, before the output projection: the scores, their
    /// normalisation (softmax, 2Quad or 2ReLU, as the layer's plan says), the weighted values.
    fn attention(
        &self,
        ctx: &mut Ctx,
        (lw, lp): (&LayerW, &LayerPlans),
        x: &AShare,
        input: &Input,
    ) -> Result<AShare> {
        let m = &self.cfg.model;
        let f = ctx.f();
        let (b, s) = (input.batch, input.seq);
        let (d, h) = (m.hidden_size, m.num_attention_heads);
        let dh = d / h;
        ctx.op("linear");
        let qkv = ctx.linear(x, &lw.qkv, lw.qkv_b.as_ref(), f)?;
        let (q, kt, v) = split_heads(&qkv.t, b, s, h, dh);
        let (q, kt, v) = (
            AShare::new(ctx.party, q),
            AShare::new(ctx.party, kt),
            AShare::new(ctx.party, v),
        );
        ctx.op("attention_matmul");
        // One score per query-key pair: a hot spot as soon as sequences are long.
        let scores = ctx.run(&[Op::MatMul(&q, &kt)])?.remove(0);
        let scores = ctx.truncate_hot(&scores, f)?.reshape(&[b, h, s, s])?;
        let probs = match (lp.attn, &lp.softmax) {
            (Attn::Softmax, Some(sp)) => {
                ctx.op("softmax");
                ctx.softmax(&scores, &input.mask, sp)?
            }
            (Attn::TwoRelu, _) => {
                ctx.op("2relu");
                ctx.two_relu(&scores, &input.mask, &lp.recip)?
            }
            _ => {
                ctx.op("2quad");
                ctx.two_quad(&scores, &input.mask, m.approx.c, &lp.recip)?
            }
        };
        ctx.op("attention_matmul");
        let probs = probs.reshape(&[b * h, s, s])?;
        let c = ctx.run(&[Op::MatMul(&probs, &v)])?.remove(0);
        let c = ctx.truncate_hot(&c, f)?;
        Ok(AShare::new(ctx.party, merge_heads(&c.t, b, s, h, dh)))
    }

    /// The pooler over each sequence's first token, the classifier, and the logits revealed to
    /// P1 (`None` at P0).
    fn head(&self, ctx: &mut Ctx, x: &AShare, (b, s): (usize, usize)) -> Result<Option<Vec<f64>>> {
        let (d, f) = (self.cfg.model.hidden_size, ctx.f());
        ctx.op("pooler");
        let mut first = Vec::with_capacity(b * d);
        for i in 0..b {
            first.extend_from_slice(&x.t.data[i * s * d..i * s * d + d]);
        }
        let first = AShare::new(ctx.party, RingTensor::new(vec![b, d], first)?);
        let pre = ctx.linear(&first, &self.pool, self.pool_b.as_ref(), f)?;
        let pooled = ctx.tanh(&pre, &self.cfg.tanh)?;
        ctx.op("classifier");
        let logits = ctx.linear(&pooled, &self.cls, self.cls_b.as_ref(), f)?;
        ctx.op("output");
        let out = ctx.reveal_to(&logits, Party::P1)?;
        Ok(out.map(|t| t.to_f64(ctx.fp)))
    }
}

/// The feed-forward block's activation: GeLU, ReLU or Quad, as the layer's plan says.
fn activation(ctx: &mut Ctx, lp: &LayerPlans, up: &AShare) -> Result<AShare> {
    match (&lp.gelu, lp.act) {
        (Some(g), _) => {
            ctx.op("gelu");
            ctx.gelu(up, g)
        }
        (None, Act::Relu) => {
            ctx.op("relu");
            ctx.relu(up)
        }
        _ => {
            ctx.op("quad");
            ctx.quad(up, QUAD_A, QUAD_B, QUAD_C)
        }
    }
}

/// Position ids from the public mask (BERT: 0..s; RoBERTa: `cumsum(mask)·mask + pad`). P1
/// checks that its ids agree with the mask for RoBERTa.
fn position_ids(m: &ModelConfig, input: &Input) -> Result<Vec<usize>> {
    let (b, s) = (input.batch, input.seq);
    match m.arch {
        Arch::Bert => Ok((0..b * s).map(|i| i % s).collect()),
        Arch::Roberta => {
            if let Some(ids) = &input.ids {
                let pad = m.pad_token_id as i64;
                if ids
                    .iter()
                    .zip(&input.mask)
                    .any(|(&id, &mk)| (id != pad) != (mk == 1))
                {
                    return Err(MpcError::Config(
                        "RoBERTa under MPC takes position ids from the public attention mask: \
                         the mask must be 1 exactly where the ids are not padding"
                            .into(),
                    ));
                }
            }
            let pad = m.pad_token_id;
            let mut out = vec![pad; b * s];
            for r in 0..b {
                let mut c = 0;
                for j in 0..s {
                    if input.mask[r * s + j] == 1 {
                        c += 1;
                        out[r * s + j] = c + pad;
                    }
                }
            }
            Ok(out)
        }
    }
}

/// `qkv` `[b·s, 3d]` → Q `[b·h, s, dh]`, Kᵀ `[b·h, dh, s]`, V `[b·h, s, dh]`.
fn split_heads(
    qkv: &RingTensor,
    b: usize,
    s: usize,
    h: usize,
    dh: usize,
) -> (RingTensor, RingTensor, RingTensor) {
    let d = h * dh;
    let n = b * h * s * dh;
    let (mut q, mut kt, mut v) = (vec![0u64; n], vec![0u64; n], vec![0u64; n]);
    for bi in 0..b {
        for si in 0..s {
            let row = &qkv.data[(bi * s + si) * 3 * d..(bi * s + si + 1) * 3 * d];
            for hi in 0..h {
                let g = bi * h + hi;
                for j in 0..dh {
                    q[(g * s + si) * dh + j] = row[hi * dh + j];
                    kt[(g * dh + j) * s + si] = row[d + hi * dh + j];
                    v[(g * s + si) * dh + j] = row[2 * d + hi * dh + j];
                }
            }
        }
    }
    (
        RingTensor::new(vec![b * h, s, dh], q).expect("sizes"),
        RingTensor::new(vec![b * h, dh, s], kt).expect("sizes"),
        RingTensor::new(vec![b * h, s, dh], v).expect("sizes"),
    )
}

/// `[b·h, s, dh]` → `[b·s, d]`.
fn merge_heads(c: &RingTensor, b: usize, s: usize, h: usize, dh: usize) -> RingTensor {
    let d = h * dh;
    let mut out = vec![0u64; b * s * d];
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                let src = &c.data[((bi * h + hi) * s + si) * dh..((bi * h + hi) * s + si + 1) * dh];
                out[(bi * s + si) * d + hi * dh..(bi * s + si) * d + (hi + 1) * dh]
                    .copy_from_slice(src);
            }
        }
    }
    RingTensor::new(vec![b * s, d], out).expect("sizes")
}

// ---------------------------------------------------------------------------------------------
// Sessions.
// ---------------------------------------------------------------------------------------------

/// What one party did in a session.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct PartyReport {
    pub party: usize,
    /// Per op label, in order of first use.
    pub ops: Vec<(String, OpStats)>,
    /// Wall time of the forward passes, online phase only (setup and offline excluded).
    pub forward_s: f64,
    /// Wall time of the offline phases (correlated randomness, P1's weight products).
    #[serde(default)]
    pub offline_s: f64,
    /// The encoder layers' share of `forward_s` and `offline_s`.
    #[serde(default)]
    pub encoder_s: f64,
    #[serde(default)]
    pub encoder_offline_s: f64,
    pub setup_s: f64,
    pub batches: usize,
    /// `[batch, seq]` of each batch, in order (public: P1 announces them).
    #[serde(default)]
    pub shapes: Vec<(usize, usize)>,
    /// Logits `[n · num_labels]` in batch order (P1 only).
    pub logits: Vec<f64>,
}

/// Runs one party over a connected peer channel and dealer: setup, then for each batch P1 sends
/// the shape and mask (op `input`), both run the forward pass; P1 ends the session with an
/// empty shape. P0 passes `weights`, P1 passes `inputs`.
pub fn run_party(
    party: Party,
    cfg: MpcConfig,
    weights: Option<&PlainWeights>,
    inputs: Option<&[Input]>,
    peer: Box<dyn Channel>,
    dealer: DealerClient,
) -> Result<PartyReport> {
    let mut ctx = Ctx::new(cfg.fp(), Net::new(peer), dealer);
    ctx.truncation = cfg.truncation;
    let t0 = Instant::now();
    let model = MpcModel::setup(&mut ctx, cfg, weights)?;
    let setup_s = t0.elapsed().as_secs_f64();
    let mut report = PartyReport {
        party: party.index(),
        setup_s,
        ..PartyReport::default()
    };
    let mut online_s = 0.0;
    let mut offline_s = 0.0;
    match party {
        Party::P1 => {
            let inputs = inputs.ok_or_else(|| MpcError::Config("P1 needs inputs".into()))?;
            for inp in inputs {
                // The shape is public and announced first; the offline phase needs only it.
                ctx.op("input");
                ctx.net.send(&[inp.batch as u64, inp.seq as u64])?;
                let t = Instant::now();
                if model.cfg.offline {
                    model.preprocess(&mut ctx, inp.batch, inp.seq)?;
                }
                offline_s += t.elapsed().as_secs_f64();
                let t = Instant::now();
                ctx.op("input");
                ctx.net.send(&inp.mask)?;
                let logits = model.forward(&mut ctx, inp)?.expect("P1 gets the logits");
                online_s += t.elapsed().as_secs_f64();
                report.logits.extend(logits);
                report.batches += 1;
                report.shapes.push((inp.batch, inp.seq));
            }
            ctx.op("input");
            ctx.net.send(&[0, 0])?;
            ctx.dealer.finish()?;
        }
        Party::P0 => serve_batches(&model, &mut ctx, &mut report)?,
    }
    report.forward_s += online_s;
    report.offline_s += offline_s;
    report.encoder_s = ctx.encoder_s;
    report.encoder_offline_s = ctx.encoder_offline_s;
    report.ops = ctx.net.stats.snapshot();
    Ok(report)
}

/// P0 after setup: P1's batches until P1 ends the session with an empty shape.
fn serve_batches(model: &MpcModel, ctx: &mut Ctx, report: &mut PartyReport) -> Result<()> {
    loop {
        ctx.op("input");
        let shape = ctx.net.recv_exact(2)?;
        let Some((b, s)) = model.cfg.check_input_shape(&shape)? else {
            return Ok(());
        };
        let t = Instant::now();
        if model.cfg.offline {
            model.preprocess(ctx, b, s)?;
        }
        report.offline_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        ctx.op("input");
        let mask = ctx.net.recv_exact(b * s)?;
        let inp = Input {
            batch: b,
            seq: s,
            mask,
            ids: None,
            type_ids: None,
        };
        model.forward(ctx, &inp)?;
        report.forward_s += t.elapsed().as_secs_f64();
        report.batches += 1;
        report.shapes.push((b, s));
    }
}

/// Frames P0's setup would send, kept instead ([`PreparedP0`]).
#[derive(Default)]
struct SetupRecorder(Arc<std::sync::Mutex<Vec<Vec<u64>>>>);

impl Channel for SetupRecorder {
    fn send(&mut self, _op: &str, words: &[u64]) -> Result<()> {
        self.0.lock().expect("recorder").push(words.to_vec());
        Ok(())
    }

    fn recv(&mut self, op: &str) -> Result<Vec<u64>> {
        Err(MpcError::Config(format!(
            "{op}: P0's setup receives nothing"
        )))
    }
}

/// P0's side of a model, set up once for many sessions (`mpc serve`): the encoded weights, and
/// the masked weights `F = W − B0` every client receives, under masks `B0` from a seed of this
/// model alone (`weight_seed`, told to the dealer in each session's hello). A session then
/// only sends `F` ([`run_prepared_p0`]).
///
/// One `F` for every client is safe: `F` is `W` under a one-time pad that only P0 and the
/// dealer know, and each session's products with it use fresh per-session masks (the dealer's
/// `c1 = a·B0 − c0` is uniform to P1, whatever it saw before).
pub struct PreparedP0 {
    pub model: MpcModel,
    frames: Vec<Vec<u64>>,
    pub weight_seed: [u8; 32],
    /// Time spent preparing (once).
    pub setup_s: f64,
}

impl PreparedP0 {
    pub fn new(cfg: MpcConfig, weights: &PlainWeights) -> Result<Self> {
        let t = Instant::now();
        let weight_seed = os_seed();
        let rec = SetupRecorder::default();
        let frames = rec.0.clone();
        let dealer = DealerClient::new(Party::P0, os_seed(), None)?.with_weight_seed(weight_seed);
        let mut ctx = Ctx::new(cfg.fp(), Net::new(Box::new(rec)), dealer);
        ctx.truncation = cfg.truncation;
        let model = MpcModel::setup(&mut ctx, cfg, Some(weights))?;
        drop(ctx);
        let frames = std::mem::take(&mut *frames.lock().expect("recorder"));
        Ok(Self {
            model,
            frames,
            weight_seed,
            setup_s: t.elapsed().as_secs_f64(),
        })
    }
}

/// P0's session with a prepared model: sends the masked weights (op `setup`), then serves P1's
/// batches. `dealer` must have been connected with `prep.weight_seed`.
pub fn run_prepared_p0(
    prep: &PreparedP0,
    peer: Box<dyn Channel>,
    dealer: DealerClient,
) -> Result<PartyReport> {
    let mut ctx = Ctx::new(prep.model.cfg.fp(), Net::new(peer), dealer);
    ctx.truncation = prep.model.cfg.truncation;
    let t0 = Instant::now();
    ctx.op("setup");
    for f in &prep.frames {
        ctx.net.send(f)?;
    }
    let mut report = PartyReport {
        party: Party::P0.index(),
        setup_s: t0.elapsed().as_secs_f64(),
        ..PartyReport::default()
    };
    serve_batches(&prep.model, &mut ctx, &mut report)?;
    report.encoder_s = ctx.encoder_s;
    report.encoder_offline_s = ctx.encoder_offline_s;
    report.ops = ctx.net.stats.snapshot();
    Ok(report)
}

/// Result of an in-process session (three threads: dealer, P0, P1).
#[derive(Debug)]
pub struct LocalRun {
    pub p0: PartyReport,
    pub p1: PartyReport,
    pub dealer: DealerStats,
    pub wall_s: f64,
}

/// Runs P0, P1 and the dealer as threads with in-process channels (tests, quick checks).
pub fn run_in_process(
    cfg: MpcConfig,
    weights: Arc<PlainWeights>,
    inputs: Vec<Input>,
    timeout: Duration,
) -> Result<LocalRun> {
    let t = Instant::now();
    let (c0, c1) = mem_pair(timeout);
    let (d1, dd) = mem_pair(timeout);
    let mut dealer = Dealer::from_seeds([os_seed(), os_seed()]);
    let (s0, s1) = (dealer.seed(Party::P0), dealer.seed(Party::P1));
    let dh = std::thread::spawn(move || {
        let mut dd = dd;
        dealer.serve(&mut dd).map(|_| dealer.stats)
    });
    let cfg0 = cfg.clone();
    let h0 = std::thread::spawn(move || {
        let dc = DealerClient::new(Party::P0, s0, None)?;
        run_party(Party::P0, cfg0, Some(&weights), None, Box::new(c0), dc)
    });
    let dc = DealerClient::new(Party::P1, s1, Some(Box::new(d1)))?;
    let r1 = run_party(Party::P1, cfg, None, Some(&inputs), Box::new(c1), dc);
    let r0 = h0
        .join()
        .map_err(|_| MpcError::Config("P0 thread panicked".into()))?;
    let rd = dh
        .join()
        .map_err(|_| MpcError::Config("dealer thread panicked".into()))?;
    Ok(LocalRun {
        p0: r0?,
        p1: r1?,
        dealer: rd?,
        wall_s: t.elapsed().as_secs_f64(),
    })
}

/// JSON of per-op stats of both parties: `{label: {wall_s, rounds, bytes_p0, bytes_p1, dealer_bytes}}`.
pub fn ops_json(p0: &PartyReport, p1: &PartyReport) -> Value {
    let mut obj = serde_json::Map::new();
    for (label, s0) in &p0.ops {
        let s1 = p1
            .ops
            .iter()
            .find(|(l, _)| l == label)
            .map(|x| x.1.clone())
            .unwrap_or_default();
        obj.insert(
            label.clone(),
            serde_json::json!({
                "wall_s": s0.wall_s.max(s1.wall_s),
                "rounds": s0.rounds.max(s1.rounds),
                "bytes_sent_p0": s0.bytes_sent,
                "bytes_sent_p1": s1.bytes_sent,
                "dealer_bytes": s0.dealer_bytes + s1.dealer_bytes,
            }),
        );
    }
    Value::Object(obj)
}
