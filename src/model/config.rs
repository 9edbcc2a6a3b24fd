//! The model configuration, read from (and written back to) a Hugging Face `config.json`.
//!
//! Mirrors `transformers.BertConfig` / `RobertaConfig` plus MPCFormer's two extra keys
//! (`hidden_act: "quad"`, `softmax_act`) and our `mpc` block with per-layer choices.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::approx::{
    Act, Approx, Attn, LayerApprox, LayerOverride, MASK_NEG, QUAD_A, QUAD_B, QUAD_C, TWO_QUAD_C,
    TWO_RELU_EPS,
};
use crate::error::LoadError;

/// Which family of checkpoint: decides position ids, the head and the weight-name prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Bert,
    Roberta,
}

impl Arch {
    /// Prefix of the backbone's weight names in a `*ForSequenceClassification` checkpoint.
    pub fn prefix(self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::Roberta => "roberta",
        }
    }
}

/// Everything needed to build the encoder and its head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: usize,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    /// `None` means "as hidden_dropout_prob" (HF's `classifier_dropout`).
    pub classifier_dropout: Option<f64>,
    /// 1 = regression.
    pub num_labels: usize,
    /// Label names in id order (`id2label`).
    pub labels: Vec<String>,
    pub approx: Approx,
}

/// The subset of HF's `config.json` we read; unknown keys are ignored like `AutoConfig` does.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    layer_norm_eps: f64,
    pad_token_id: Option<usize>,
    #[serde(default = "default_dropout")]
    hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    attention_probs_dropout_prob: f64,
    classifier_dropout: Option<f64>,
    #[serde(default = "default_act")]
    hidden_act: String,
    softmax_act: Option<String>,
    num_labels: Option<usize>,
    id2label: Option<BTreeMap<String, String>>,
    problem_type: Option<String>,
    position_embedding_type: Option<String>,
    mpc: Option<MpcBlock>,
}

/// The `mpc` object [`ModelConfig::to_hf_json`] writes (see [`ModelConfig::mpc_json`]); read
/// back so per-layer choices survive a round trip, and checked so that a file whose constants
/// differ from the ones this build computes with is refused instead of silently run differently.
#[derive(Deserialize)]
struct MpcBlock {
    #[serde(default)]
    two_quad_c: Option<f64>,
    #[serde(default)]
    layers: BTreeMap<String, LayerOverride>,
    /// Every layer's resolved choice (written when they differ); checked against `layers`.
    #[serde(default)]
    per_layer: Option<Vec<PerLayer>>,
    #[serde(default)]
    quad: Option<QuadBlock>,
    #[serde(default, rename = "2quad")]
    two_quad: Option<TwoQuadBlock>,
    #[serde(default, rename = "2relu")]
    two_relu: Option<TwoReluBlock>,
}

#[derive(Deserialize)]
struct PerLayer {
    hidden_act: String,
    softmax_act: String,
}

#[derive(Deserialize)]
struct QuadBlock {
    a: f64,
    b: f64,
    c: f64,
}

#[derive(Deserialize)]
struct TwoQuadBlock {
    c: f64,
}

#[derive(Deserialize)]
struct TwoReluBlock {
    eps: f64,
}

impl HfConfig {
    fn arch(&self) -> Result<Arch, String> {
        match self.model_type.as_deref() {
            Some("bert") => Ok(Arch::Bert),
            Some("roberta") => Ok(Arch::Roberta),
            Some(other) => Err(format!(
                "model_type `{other}` is not supported (bert and roberta are)"
            )),
            None if self.architectures.iter().any(|a| a.starts_with("Roberta")) => {
                Ok(Arch::Roberta)
            }
            None if self.architectures.iter().any(|a| a.starts_with("Bert")) => Ok(Arch::Bert),
            None => Err("no `model_type` and no recognised `architectures`".into()),
        }
    }

    fn attn(&self) -> Result<Attn, String> {
        match self.softmax_act.as_deref() {
            Some(s) => s.parse(),
            None => Ok(Attn::Softmax),
        }
    }

    /// The class names in id order: `id2label`, else `num_labels` of HF's `LABEL_i`, else HF's
    /// `PretrainedConfig` default of two.
    fn labels(&self) -> Result<Vec<String>, String> {
        match (&self.id2label, self.num_labels) {
            (Some(map), _) => {
                let mut v: Vec<(usize, String)> = map
                    .iter()
                    .map(|(k, v)| {
                        k.parse::<usize>()
                            .map(|i| (i, v.clone()))
                            .map_err(|_| format!("id2label key `{k}` is not an integer"))
                    })
                    .collect::<Result<_, _>>()?;
                v.sort();
                if v.iter().enumerate().any(|(i, (k, _))| i != *k) {
                    return Err("id2label ids are not 0..n".into());
                }
                Ok(v.into_iter().map(|(_, s)| s).collect())
            }
            (None, Some(n)) => Ok((0..n).map(|i| format!("LABEL_{i}")).collect()),
            (None, None) => Ok(vec!["LABEL_0".into(), "LABEL_1".into()]),
        }
    }
}

impl MpcBlock {
    /// Applies the block to `approx` (built from `hidden_act`/`softmax_act`): 2Quad's constant
    /// and the per-layer choices. Coefficients this implementation does not compute, and a
    /// `per_layer` list that contradicts the rest, are refused rather than silently ignored.
    fn apply(&self, approx: &mut Approx, num_layers: usize) -> Result<(), String> {
        approx.c = self.two_quad_c.unwrap_or(TWO_QUAD_C);
        if let Some(q) = &self.two_quad {
            if self.two_quad_c.is_some_and(|c| c != q.c) {
                return Err(format!(
                    "mpc.two_quad_c {} and mpc.2quad.c {} differ",
                    approx.c, q.c
                ));
            }
            approx.c = q.c;
        }
        self.check_fixed_coefficients()?;
        for (k, v) in &self.layers {
            let i = k
                .parse::<usize>()
                .map_err(|_| format!("mpc.layers key `{k}` is not a layer index"))?;
            if i >= num_layers {
                return Err(format!(
                    "mpc.layers names layer {i}, but the model has {num_layers} layers"
                ));
            }
            approx.layers.insert(i, *v);
        }
        self.check_per_layer(approx, num_layers)
    }

    fn check_fixed_coefficients(&self) -> Result<(), String> {
        if let Some(q) = &self.quad
            && (q.a, q.b, q.c) != (QUAD_A, QUAD_B, QUAD_C)
        {
            return Err(format!(
                "mpc.quad coefficients (a, b, c) = ({}, {}, {}) differ from the ones this \
                 implementation computes ({QUAD_A}, {QUAD_B}, {QUAD_C})",
                q.a, q.b, q.c
            ));
        }
        if let Some(r) = &self.two_relu
            && r.eps != TWO_RELU_EPS
        {
            return Err(format!(
                "mpc.2relu.eps {} differs from the one this implementation computes \
                 ({TWO_RELU_EPS})",
                r.eps
            ));
        }
        Ok(())
    }

    fn check_per_layer(&self, approx: &Approx, num_layers: usize) -> Result<(), String> {
        let Some(per_layer) = &self.per_layer else {
            return Ok(());
        };
        if per_layer.len() != num_layers {
            return Err(format!(
                "mpc.per_layer lists {} layers, but num_hidden_layers is {num_layers}",
                per_layer.len()
            ));
        }
        for (i, p) in per_layer.iter().enumerate() {
            let want = LayerApprox {
                act: p.hidden_act.parse()?,
                attn: p.softmax_act.parse()?,
            };
            if approx.layer(i) != want {
                return Err(format!(
                    "mpc.per_layer[{i}] says {}+{}, but hidden_act/softmax_act and \
                     mpc.layers give {}+{}",
                    want.act,
                    want.attn,
                    approx.layer(i).act,
                    approx.layer(i).attn
                ));
            }
        }
        Ok(())
    }
}

/// Version of the `mpc` object's layout.
pub const MPC_BLOCK_VERSION: u32 = 1;

fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}
fn default_act() -> String {
    "gelu".into()
}

impl ModelConfig {
    /// Reads `config.json`. Errors name the file and what is wrong with it.
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        Self::from_json_str(&text).map_err(|msg| LoadError::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self, String> {
        let hf: HfConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let arch = hf.arch()?;
        if let Some(p) = hf.position_embedding_type.as_deref()
            && p != "absolute"
        {
            return Err(format!(
                "position_embedding_type `{p}` is not supported (only absolute)"
            ));
        }
        if hf.num_attention_heads == 0 || !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                hf.hidden_size, hf.num_attention_heads
            ));
        }
        let labels = hf.labels()?;
        let num_labels = if hf.problem_type.as_deref() == Some("regression") {
            1
        } else {
            labels.len()
        };
        let mut approx = Approx::new(hf.hidden_act.parse()?, hf.attn()?);
        if let Some(mpc) = &hf.mpc {
            mpc.apply(&mut approx, hf.num_hidden_layers)?;
        }
        let default_pad = match arch {
            Arch::Bert => 0,
            Arch::Roberta => 1,
        };
        Ok(Self {
            arch,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            intermediate_size: hf.intermediate_size,
            max_position_embeddings: hf.max_position_embeddings,
            type_vocab_size: hf.type_vocab_size,
            layer_norm_eps: hf.layer_norm_eps,
            pad_token_id: hf.pad_token_id.unwrap_or(default_pad),
            hidden_dropout_prob: hf.hidden_dropout_prob,
            attention_probs_dropout_prob: hf.attention_probs_dropout_prob,
            classifier_dropout: hf.classifier_dropout,
            num_labels,
            labels,
            approx,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn is_regression(&self) -> bool {
        self.num_labels == 1
    }

    /// A config with every dropout at zero: for parity checks and deterministic evaluation.
    pub fn without_dropout(mut self) -> Self {
        self.hidden_dropout_prob = 0.0;
        self.attention_probs_dropout_prob = 0.0;
        self.classifier_dropout = Some(0.0);
        self
    }

    /// Sets the classification head's size, e.g. for a task whose labels differ from the checkpoint.
    pub fn with_labels(mut self, labels: Vec<String>, regression: bool) -> Self {
        self.num_labels = if regression { 1 } else { labels.len() };
        self.labels = labels;
        self
    }

    /// The Hugging Face `config.json` that `AutoConfig` and MPCFormer's patched BERT accept.
    pub fn to_hf_json(&self) -> Value {
        let arch_name = match self.arch {
            Arch::Bert => "BertForSequenceClassification",
            Arch::Roberta => "RobertaForSequenceClassification",
        };
        let id2label: BTreeMap<String, String> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.clone()))
            .collect();
        let label2id: BTreeMap<String, usize> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i))
            .collect();
        let mut v = serde_json::json!({
            "model_type": self.arch.prefix(),
            "architectures": [arch_name],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "classifier_dropout": self.classifier_dropout,
            "position_embedding_type": "absolute",
            "hidden_act": self.approx.act.hf_name(),
            "softmax_act": self.approx.attn.hf_name(),
            "num_labels": self.num_labels,
            "id2label": id2label,
            "label2id": label2id,
        });
        if self.is_regression() {
            v["problem_type"] = "regression".into();
        }
        if self.arch == Arch::Roberta {
            v["bos_token_id"] = 0.into();
            v["eos_token_id"] = 2.into();
        }
        v["mpc"] = self.mpc_json();
        v
    }

    /// The `mpc` object of `config.json`: everything an MPC runtime needs to compute this model
    /// beyond what a BERT/RoBERTa config says — the exact formula and constants of each
    /// approximation the model uses (from [`super::approx`], the code that computes them),
    /// every layer's choice when they differ, how the attention mask is applied, and LayerNorm.
    /// Readers: [`ModelConfig::from_json_str`] (reads `two_quad_c` and `layers` back, checks the
    /// constants) and export's `load-check`.
    pub fn mpc_json(&self) -> Value {
        let n = self.num_hidden_layers;
        let per_layer: Vec<LayerApprox> = (0..n).map(|i| self.approx.layer(i)).collect();
        let uses_act = |a: Act| per_layer.iter().any(|l| l.act == a);
        let uses_attn = |a: Attn| per_layer.iter().any(|l| l.attn == a);
        // Only overrides that change something, keyed as `Approx::layers` is.
        let overrides: BTreeMap<String, LayerOverride> = self
            .approx
            .layers
            .iter()
            .filter(|(i, _)| **i < n)
            .filter_map(|(i, o)| {
                let o = LayerOverride {
                    act: o.act.filter(|a| *a != self.approx.act),
                    attn: o.attn.filter(|a| *a != self.approx.attn),
                };
                (o != LayerOverride::default()).then(|| (i.to_string(), o))
            })
            .collect();
        let c = self.approx.c;
        let mut v = serde_json::json!({
            "version": MPC_BLOCK_VERSION,
            "hidden_act": self.approx.act.hf_name(),
            "softmax_act": self.approx.attn.hf_name(),
            "two_quad_c": c,
            "layers": overrides,
            "attention_scores": "s = q·kᵀ/√head_dim per head, q = x·W_qᵀ + b_q, k = x·W_kᵀ + b_k \
                (weights [out, in] as stored); no additive mask is added to s",
            "layer_norm": {
                "formula": "y = (x − mean(x)) / sqrt(var(x) + eps) · weight + bias, over the \
                    hidden dimension, var biased (mean of squares of x − mean)",
                "eps": self.layer_norm_eps,
                "ops": "a square (x − mean)², a mean, an inverse square root of var + eps",
            },
            "head": match self.arch {
                Arch::Bert => "logits = classifier(tanh(pooler.dense(h[:, 0]))): exact tanh",
                Arch::Roberta => "logits = classifier.out_proj(tanh(classifier.dense(h[:, 0]))): exact tanh",
            },
        });
        if per_layer.iter().any(|l| *l != per_layer[0]) {
            v["per_layer"] = per_layer
                .iter()
                .map(|l| {
                    serde_json::json!({"hidden_act": l.act.hf_name(), "softmax_act": l.attn.hf_name()})
                })
                .collect();
        }
        for (key, formula) in activation_formulas(&uses_act) {
            v[key] = formula;
        }
        let (formulas, mask) = attention_formulas(&uses_attn, c);
        for (key, formula) in formulas {
            v[key] = formula;
        }
        v["mask"] = Value::Object(mask);
        v
    }
}

/// The `mpc` block's formula entries for the FFN activations that some layer uses.
fn activation_formulas(uses_act: &dyn Fn(Act) -> bool) -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    if uses_act(Act::Quad) {
        out.push((
            "quad",
            serde_json::json!({
                "formula": format!("{QUAD_A}·x² + {QUAD_B}·x + {QUAD_C}"),
                "a": QUAD_A, "b": QUAD_B, "c": QUAD_C,
                "where": "FFN activation (intermediate.dense output) of the layers that use it; \
                    the pooler/classifier tanh is not replaced",
            }),
        ));
    }
    if uses_act(Act::Gelu) {
        out.push((
            "gelu",
            serde_json::json!({
                "formula": "x·Φ(x) = 0.5·x·(1 + erf(x/√2)) (exact erf form)",
            }),
        ));
    }
    if uses_act(Act::GeluTanh) {
        out.push((
            "gelu_new",
            serde_json::json!({
                "formula": "0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))",
            }),
        ));
    }
    if uses_act(Act::Relu) {
        out.push(("relu", serde_json::json!({"formula": "max(x, 0)"})));
    }
    out
}

/// The `mpc` block's formula entries for the attentions that some layer uses, and how each
/// applies the key mask.
fn attention_formulas(
    uses_attn: &dyn Fn(Attn) -> bool,
    c: f64,
) -> (Vec<(&'static str, Value)>, serde_json::Map<String, Value>) {
    let mut out = Vec::new();
    let mut mask = serde_json::Map::new();
    mask.insert(
        "m".into(),
        "m_j = attention_mask[j]: 1 for a real key token, 0 for padding (public); padded \
         query rows are computed like the others"
            .into(),
    );
    if uses_attn(Attn::TwoQuad) {
        out.push((
            "2quad",
            serde_json::json!({
                "formula": format!("p_ij = (s_ij + {c})²·m_j / Σ_k (s_ik + {c})²·m_k"),
                "c": c,
                "eps": 0.0,
                "ops": "a square per score, a row sum, a reciprocal per row",
            }),
        ));
        mask.insert(
            "2quad".into(),
            "multiplicative: (s + c)² is multiplied by the 0/1 key mask m after squaring, so \
             masked keys get exactly 0; the additive −10000 mask is NOT applied (MPCFormer's \
             code adds it and multiplies by m as well: the same result in exact arithmetic, \
             but (s − 10000 + c)² overflows fixed point)"
                .into(),
        );
    }
    if uses_attn(Attn::TwoRelu) {
        out.push((
            "2relu",
            serde_json::json!({
                "formula": "p_ij = (relu(s_ij)·m_j + eps/L) / (Σ_k relu(s_ik)·m_k + eps), \
                    L = key length including padding",
                "eps": TWO_RELU_EPS,
                "ops": "a comparison per score, a row sum, a reciprocal per row",
            }),
        ));
        mask.insert(
            "2relu".into(),
            "multiplicative: relu(s) is multiplied by the 0/1 key mask m; masked keys keep \
             the eps/L share, as in MPCFormer"
                .into(),
        );
    }
    if uses_attn(Attn::Softmax) {
        out.push(("softmax", serde_json::json!({
            "formula": format!("p_ij = exp(s_ij + (1 − m_j)·({MASK_NEG})) / Σ_k exp(s_ik + (1 − m_k)·({MASK_NEG}))"),
            "mask_value": MASK_NEG,
        })));
        mask.insert(
            "softmax".into(),
            format!(
                "additive: (1 − m_j)·({MASK_NEG}) is added to the scores before softmax, as BERT"
            )
            .into(),
        );
    }
    (out, mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::approx::LayerOverride;

    const TINY: &str = include_str!("../../tests/fixtures/tiny-bert/model/config.json");

    #[test]
    fn reads_hf_and_mpcformer_keys() {
        let c = ModelConfig::from_json_str(TINY).unwrap();
        assert_eq!((c.arch, c.hidden_size, c.num_labels), (Arch::Bert, 32, 3));
        assert_eq!(c.approx, Approx::exact());
        let quad = TINY.replace(
            "\"hidden_act\": \"gelu\"",
            "\"hidden_act\": \"quad\", \"softmax_act\": \"2quad\"",
        );
        let c = ModelConfig::from_json_str(&quad).unwrap();
        assert_eq!((c.approx.act, c.approx.attn), (Act::Quad, Attn::TwoQuad));
    }

    #[test]
    fn hf_json_round_trips() {
        let mut c = ModelConfig::from_json_str(TINY).unwrap();
        c.approx = Approx::new(Act::Quad, Attn::TwoRelu);
        c.approx.layers.insert(
            1,
            LayerOverride {
                act: Some(Act::Gelu),
                attn: None,
            },
        );
        let mut v = c.to_hf_json();
        // Per-layer choices travel in the `mpc` block (export writes it).
        v["mpc"] = serde_json::json!({"two_quad_c": 5.0, "layers": {"1": {"act": "gelu"}}});
        let back = ModelConfig::from_json_str(&v.to_string()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn mpc_object_carries_the_constants_and_per_layer_choices() {
        let mut c = ModelConfig::from_json_str(TINY).unwrap();
        c.approx = Approx::new(Act::Quad, Attn::TwoQuad);
        c.approx.layers.insert(
            1,
            LayerOverride {
                act: Some(Act::Gelu),
                attn: Some(Attn::TwoQuad),
            },
        );
        let v = c.to_hf_json();
        let mpc = &v["mpc"];
        assert_eq!(mpc["quad"]["a"].as_f64(), Some(QUAD_A));
        assert_eq!(mpc["quad"]["b"].as_f64(), Some(QUAD_B));
        assert_eq!(mpc["quad"]["c"].as_f64(), Some(QUAD_C));
        assert_eq!(mpc["2quad"]["c"].as_f64(), Some(TWO_QUAD_C));
        assert_eq!(
            mpc["gelu"]["formula"].as_str().map(|s| s.contains("erf")),
            Some(true)
        );
        assert!(mpc["2relu"].is_null() && mpc["softmax"].is_null());
        // Only what differs from the model-wide choice is an override.
        assert_eq!(mpc["layers"], serde_json::json!({"1": {"act": "gelu"}}));
        assert_eq!(mpc["per_layer"][1]["hidden_act"], "gelu");
        assert_eq!(mpc["per_layer"][0]["hidden_act"], "quad");
        let back = ModelConfig::from_json_str(&v.to_string()).unwrap();
        assert_eq!(back.approx.layer(1), c.approx.layer(1));
        assert_eq!(back.approx.layer(0), c.approx.layer(0));
        // One layer's choice everywhere: no per_layer list.
        c.approx.layers.clear();
        assert!(c.to_hf_json()["mpc"]["per_layer"].is_null());

        // Constants this build does not compute with, or an inconsistent list, are refused.
        let mut bad = v.clone();
        bad["mpc"]["quad"]["b"] = 0.5.into();
        let e = ModelConfig::from_json_str(&bad.to_string()).unwrap_err();
        assert!(e.contains("mpc.quad"), "{e}");
        let mut bad = v.clone();
        bad["mpc"]["per_layer"][0]["softmax_act"] = "softmax".into();
        let e = ModelConfig::from_json_str(&bad.to_string()).unwrap_err();
        assert!(e.contains("per_layer[0]"), "{e}");
        let mut bad = v;
        bad["mpc"]["layers"] = serde_json::json!({"7": {"act": "gelu"}});
        assert!(ModelConfig::from_json_str(&bad.to_string()).is_err());
    }

    #[test]
    fn regression_and_roberta_defaults() {
        let reg = include_str!("../../tests/fixtures/tiny-bert-regression/model/config.json");
        assert_eq!(ModelConfig::from_json_str(reg).unwrap().num_labels, 1);
        let rob = include_str!("../../tests/fixtures/tiny-roberta/model/config.json");
        let c = ModelConfig::from_json_str(rob).unwrap();
        assert_eq!(
            (c.arch, c.pad_token_id, c.num_labels, c.type_vocab_size),
            (Arch::Roberta, 1, 2, 1)
        );
    }
}
