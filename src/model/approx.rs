//! MPC-friendly replacements for GeLU and softmax, as MPCFormer defines them.
//!
//! The approximations are configuration of the one encoder in [`crate::model::bert`]: a model-wide
//! choice plus optional per-layer overrides. The formulas here are the single source of truth;
//! export writes the same constants into `config.json`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use burn::tensor::Tensor;
use burn::tensor::activation;

use super::kernels;
use serde::{Deserialize, Serialize};

/// Quad coefficients: `QUAD_A·x² + QUAD_B·x + QUAD_C` (MPCFormer's training code; its CrypTen
/// benchmark swaps B and C, which we do not copy).
pub const QUAD_A: f64 = 0.125;
pub const QUAD_B: f64 = 0.25;
pub const QUAD_C: f64 = 0.5;
/// 2Quad shift `c` in `(s + c)²`; hard-coded to 5 in the reference.
pub const TWO_QUAD_C: f64 = 5.0;
/// 2ReLU smoothing term, as the reference.
pub const TWO_RELU_EPS: f64 = 1e-12;
/// Additive key mask of BERT's softmax path (transformers 4.20 as MPCFormer used it).
pub const MASK_NEG: f64 = -10000.0;

/// The FFN (intermediate) activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    /// Exact GeLU, `x·Φ(x)` with erf (HF `"gelu"`).
    Gelu,
    /// Tanh approximation (HF `"gelu_new"` / `"gelu_pytorch_tanh"`).
    GeluTanh,
    Relu,
    /// `0.125x² + 0.25x + 0.5` (MPCFormer `"quad"`).
    Quad,
}

/// How attention scores become weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum Attn {
    #[serde(rename = "softmax")]
    Softmax,
    /// `(s + c)²·m / Σ (s + c)²·m`.
    #[serde(rename = "2quad")]
    TwoQuad,
    /// `(relu(s)·m + ε/L) / (Σ relu(s)·m + ε)`.
    #[serde(rename = "2relu")]
    TwoRelu,
}

impl Act {
    /// Name as written in a Hugging Face `config.json` (`hidden_act`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Act::Gelu => "gelu",
            Act::GeluTanh => "gelu_new",
            Act::Relu => "relu",
            Act::Quad => "quad",
        }
    }

    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Act::Gelu => kernels::elementwise::<kernels::Gelu, D>(x).unwrap_or_else(gelu_erf),
            Act::GeluTanh => activation::gelu_approximate(x),
            Act::Relu => activation::relu(x),
            // Horner form: one multiply fewer than the textbook polynomial, same values in f32
            // to within rounding; the fixtures hold us to 1e-4.
            Act::Quad => kernels::elementwise::<kernels::Quad, D>(x)
                .unwrap_or_else(|x| (x.clone() * QUAD_A + QUAD_B) * x + QUAD_C),
        }
    }
}

/// Exact GeLU, `x·½(1 + erf(x/√2))`, built from `erf` so that autodiff differentiates it exactly.
///
/// Burn 0.22's `activation::gelu` computes erf GeLU forward, but its default `gelu_backward`
/// (burn-backend `ops/activation.rs`), which every CubeCL backend (wgpu, CUDA) inherits, is the
/// derivative of the *tanh* approximation: gradients ~1e-3 off, caught by `tests/parity.rs`
/// `on_wgpu` against PyTorch. Flex overrides it correctly, and Flex takes the fused kernel above.
fn gelu_erf<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    (x.clone() * std::f64::consts::FRAC_1_SQRT_2)
        .erf()
        .add_scalar(1.0)
        * x
        * 0.5
}

impl FromStr for Act {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "gelu" | "gelu_erf" => Ok(Act::Gelu),
            "gelu_tanh" | "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Act::GeluTanh),
            "relu" => Ok(Act::Relu),
            "quad" => Ok(Act::Quad),
            other => Err(format!(
                "unknown activation `{other}` (expected gelu, gelu_tanh, relu or quad)"
            )),
        }
    }
}

impl FromStr for Attn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "softmax" => Ok(Attn::Softmax),
            "2quad" => Ok(Attn::TwoQuad),
            "2relu" => Ok(Attn::TwoRelu),
            other => Err(format!(
                "unknown attention normalisation `{other}` (expected softmax, 2quad or 2relu)"
            )),
        }
    }
}

impl fmt::Display for Act {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Act::Gelu => "gelu",
            Act::GeluTanh => "gelu_tanh",
            Act::Relu => "relu",
            Act::Quad => "quad",
        })
    }
}

impl fmt::Display for Attn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hf_name())
    }
}

impl Attn {
    /// Name as MPCFormer's patched config writes it (`softmax_act`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Attn::Softmax => "softmax",
            Attn::TwoQuad => "2quad",
            Attn::TwoRelu => "2relu",
        }
    }

    /// Attention weights from raw scores `QKᵀ/√d` ([B, H, Lq, Lk]) and the 0/1 key mask
    /// ([B, Lk], 1 = real token). A masked key gets exactly 0 under 2Quad, `ε/L`-small mass
    /// under 2ReLU (as the reference), and `exp(-10000)` = 0 under softmax.
    pub fn apply(self, scores: Tensor<4>, key_mask: Tensor<2>, c: f64) -> Tensor<4> {
        let fused = match self {
            Attn::Softmax => Some(kernels::Normaliser::Softmax),
            Attn::TwoQuad => Some(kernels::Normaliser::TwoQuad(c as f32)),
            Attn::TwoRelu => None,
        };
        let (scores, key_mask) = match fused {
            Some(kind) => match kernels::normalise(kind, scores, key_mask) {
                Ok(p) => return p,
                Err(inputs) => inputs,
            },
            None => (scores, key_mask),
        };
        self.composite(scores, key_mask, c)
    }

    /// [`Self::apply`] as Burn ops: the definition, and the path on backends without kernels.
    pub fn composite(self, scores: Tensor<4>, key_mask: Tensor<2>, c: f64) -> Tensor<4> {
        let [b, _, _, lk] = scores.dims();
        let m = key_mask.reshape([b, 1, 1, lk]);
        match self {
            Attn::Softmax => {
                let additive = (m.neg() + 1.0) * MASK_NEG;
                activation::softmax(scores + additive, 3)
            }
            Attn::TwoQuad => {
                let e = (scores + c).square() * m;
                let z = e.clone().sum_dim(3);
                e / z
            }
            Attn::TwoRelu => {
                let r = activation::relu(scores) * m;
                let z = r.clone().sum_dim(3) + TWO_RELU_EPS;
                (r + TWO_RELU_EPS / lk as f64) / z
            }
        }
    }
}

/// The approximations of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerApprox {
    pub act: Act,
    pub attn: Attn,
}

/// Per-layer override: unset fields keep the model-wide choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Act>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn: Option<Attn>,
}

/// Model-wide approximation choice with per-layer overrides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Approx {
    pub act: Act,
    pub attn: Attn,
    /// 2Quad shift `c`.
    #[serde(default = "default_c")]
    pub c: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layers: BTreeMap<usize, LayerOverride>,
}

fn default_c() -> f64 {
    TWO_QUAD_C
}

impl Default for Approx {
    fn default() -> Self {
        Self::exact()
    }
}

impl Approx {
    /// The teacher: erf GeLU and softmax.
    pub fn exact() -> Self {
        Self::new(Act::Gelu, Attn::Softmax)
    }

    pub fn new(act: Act, attn: Attn) -> Self {
        Self {
            act,
            attn,
            c: TWO_QUAD_C,
            layers: BTreeMap::new(),
        }
    }

    pub fn layer(&self, i: usize) -> LayerApprox {
        let o = self.layers.get(&i).copied().unwrap_or_default();
        LayerApprox {
            act: o.act.unwrap_or(self.act),
            attn: o.attn.unwrap_or(self.attn),
        }
    }

    /// Short label such as `quad+2quad`, used in run names and reports.
    pub fn label(&self) -> String {
        let base = format!("{}+{}", self.act, self.attn);
        if self.layers.is_empty() {
            base
        } else {
            format!("{base}(+{} layer overrides)", self.layers.len())
        }
    }

    /// Parses a per-layer override `N:act`, `N:attn` or `N:act:attn`, e.g. `0:gelu:softmax`.
    pub fn parse_override(spec: &str) -> Result<(usize, LayerOverride), String> {
        let mut parts = spec.split(':');
        let idx = parts
            .next()
            .and_then(|p| p.trim().parse::<usize>().ok())
            .ok_or_else(|| format!("layer override `{spec}`: expected `N:act[:attn]`"))?;
        let mut o = LayerOverride::default();
        for p in parts {
            if let Ok(a) = p.parse::<Act>() {
                o.act = Some(a);
            } else {
                o.attn = Some(
                    p.parse::<Attn>()
                        .map_err(|e| format!("layer override `{spec}`: {e}"))?,
                );
            }
        }
        Ok((idx, o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::prelude::*;

    fn vec1(t: Tensor<1>) -> Vec<f32> {
        t.into_data().try_into_vec_as::<f32>().unwrap()
    }

    #[test]
    fn activations_match_their_formulas() {
        let d = Device::flex();
        let xs = [-6.0f32, -2.5, -1.0, -0.1, 0.0, 0.3, 1.0, 2.0, 7.5];
        let x = Tensor::<1>::from_floats(xs, &d);
        let erf_gelu = |x: f64| {
            // Φ(x) via a 1e-7-accurate erf series-free form (Abramowitz–Stegun 7.1.26 is too coarse):
            // integrate the normal density with Simpson's rule instead.
            let n = 20_000;
            let (a, b) = (-12.0f64, x);
            let h = (b - a) / n as f64;
            let f = |t: f64| (-t * t / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let mut s = f(a) + f(b);
            for i in 1..n {
                s += f(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
            }
            x * s * h / 3.0
        };
        let cases: [(Act, &dyn Fn(f64) -> f64); 4] = [
            (Act::Quad, &|x| 0.125 * x * x + 0.25 * x + 0.5),
            (Act::Relu, &|x| x.max(0.0)),
            (Act::Gelu, &erf_gelu),
            (Act::GeluTanh, &|x| {
                0.5 * x
                    * (1.0
                        + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
            }),
        ];
        for (act, f) in cases {
            let got = vec1(act.apply(x.clone()));
            for (g, &xi) in got.iter().zip(&xs) {
                let want = f(xi as f64);
                assert!(
                    (*g as f64 - want).abs() < 1e-5 * want.abs().max(1.0),
                    "{act} at {xi}: {g} vs {want}"
                );
            }
        }
    }

    /// Scores [1, 1, 1, 3] with the last key masked.
    fn probs(attn: Attn, scores: [f32; 3]) -> Vec<f32> {
        let d = Device::flex();
        let s = Tensor::<1>::from_floats(scores, &d).reshape([1, 1, 1, 3]);
        let m = Tensor::<1>::from_floats([1.0, 1.0, 0.0], &d).reshape([1, 3]);
        attn.apply(s, m, TWO_QUAD_C)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    }

    #[test]
    fn two_quad_zeroes_masked_keys() {
        let p = probs(Attn::TwoQuad, [1.0, -2.0, 30.0]);
        let (a, b) = (36.0f64, 9.0f64);
        assert!((p[0] as f64 - a / (a + b)).abs() < 1e-6);
        assert!((p[1] as f64 - b / (a + b)).abs() < 1e-6);
        assert_eq!(p[2], 0.0);
    }

    #[test]
    fn two_relu_matches_reference_formula() {
        let p = probs(Attn::TwoRelu, [2.0, -1.0, 5.0]);
        let eps = TWO_RELU_EPS;
        let z = 2.0 + eps;
        let want = [(2.0 + eps / 3.0) / z, (eps / 3.0) / z, (eps / 3.0) / z];
        for (g, w) in p.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{p:?}");
        }
    }

    #[test]
    fn softmax_ignores_masked_keys() {
        let p = probs(Attn::Softmax, [0.0, 1.0, 50.0]);
        let e = std::f64::consts::E;
        assert!((p[0] as f64 - 1.0 / (1.0 + e)).abs() < 1e-6, "{p:?}");
        assert_eq!(p[2], 0.0);
    }

    #[test]
    fn per_layer_overrides() {
        let mut a = Approx::new(Act::Quad, Attn::TwoQuad);
        let (i, o) = Approx::parse_override("1:gelu:softmax").unwrap();
        a.layers.insert(i, o);
        let (i, o) = Approx::parse_override("2:2relu").unwrap();
        a.layers.insert(i, o);
        assert_eq!(
            a.layer(0),
            LayerApprox {
                act: Act::Quad,
                attn: Attn::TwoQuad
            }
        );
        assert_eq!(
            a.layer(1),
            LayerApprox {
                act: Act::Gelu,
                attn: Attn::Softmax
            }
        );
        assert_eq!(
            a.layer(2),
            LayerApprox {
                act: Act::Quad,
                attn: Attn::TwoRelu
            }
        );
        assert!(Approx::parse_override("x:quad").is_err());
        assert!(Approx::parse_override("0:cubic").is_err());
    }
}
