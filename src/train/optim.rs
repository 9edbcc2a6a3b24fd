//! Optimisers, written against parameter paths so that weight-decay exclusions and saved state
//! are by name.
//!
//! - `BertAdam`: TinyBERT/MPCFormer's optimiser — Adam without bias correction, eps 1e-6,
//!   decoupled weight decay, and gradient-norm clipping applied to each tensor separately.
//! - `AdamW`: PyTorch's AdamW (bias-corrected) with clipping of the global gradient norm, as HF's
//!   `Trainer` does.
//!
//! Neither decays biases or LayerNorm parameters (the reference's `no_decay` list).

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::io::HostTensor;
use crate::model::kernels;
use crate::model::names::PathTracker;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    BertAdam,
    AdamW,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    #[serde(default = "default_kind")]
    pub kind: OptimizerKind,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Clip threshold: per tensor for BertAdam, global for AdamW. 0 disables clipping.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
}

fn default_kind() -> OptimizerKind {
    OptimizerKind::BertAdam
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-6
}
fn default_wd() -> f64 {
    0.01
}
fn default_clip() -> f64 {
    1.0
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: default_kind(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: default_wd(),
            max_grad_norm: default_clip(),
        }
    }
}

/// Adam moments of one parameter, flattened.
struct Moments {
    m: Tensor<1>,
    v: Tensor<1>,
}

/// The optimiser and its state (moments by parameter path, step count).
pub struct Optimizer {
    pub config: OptimizerConfig,
    state: HashMap<String, Moments>,
    pub step: u64,
}

fn decays(path: &str) -> bool {
    !(path.ends_with("bias") || path.contains("layer_norm"))
}

/// Σ‖g‖² over every gradient, as a one-element tensor (no host round trip).
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

struct Step<'a> {
    opt: &'a mut Optimizer,
    grads: GradientsParams,
    lr: f64,
    /// Global clip coefficient (AdamW), a one-element tensor.
    global_coef: Option<Tensor<1>>,
    tracker: PathTracker,
}

/// `min(1, max_norm / (norm + 1e-6))`, torch's `clip_grad_norm_` coefficient.
fn clip_coef(sq_norm: Tensor<1>, max_norm: f64) -> Tensor<1> {
    (sq_norm.sqrt() + 1e-6)
        .recip()
        .mul_scalar(max_norm)
        .clamp_max(1.0)
}

impl ModuleMapper for Step<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.tracker.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let path = self.tracker.parts().join(".");
        let c = &self.opt.config;
        let require_grad = tensor.is_require_grad();
        let p = tensor.inner();
        let shape = p.dims();
        let n: usize = shape.iter().product();
        let g = grad.reshape([n]);
        let flat = p.reshape([n]);
        let st = self.opt.state.remove(&path).unwrap_or_else(|| Moments {
            m: flat.zeros_like(),
            v: flat.zeros_like(),
        });
        let wd = if decays(&path) { c.weight_decay } else { 0.0 };
        if [&flat, &g, &st.m, &st.v].into_iter().all(kernels::takes) {
            // The same update as below, in one parallel pass (`model::kernels::adam`).
            let clip = match (&self.global_coef, c.kind) {
                (Some(coef), _) => coef.clone().into_scalar::<f32>(),
                (None, OptimizerKind::BertAdam) if c.max_grad_norm > 0.0 => {
                    clip_coef(g.clone().square().sum(), c.max_grad_norm).into_scalar::<f32>()
                }
                _ => 1.0,
            };
            let t = self.opt.step as i32;
            let step = kernels::AdamStep {
                bias_correction: (c.kind == OptimizerKind::AdamW)
                    .then(|| (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t))),
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                lr: self.lr,
                weight_decay: wd,
                clip,
            };
            let (p, m, v) = kernels::adam(flat, g, st.m, st.v, &step);
            self.opt.state.insert(path, Moments { m, v });
            let mut updated = Tensor::from_inner(p.reshape(shape));
            if require_grad {
                updated = updated.require_grad();
            }
            return Param::from_mapped_value(id, updated, mapper);
        }
        let g = match (&self.global_coef, c.kind) {
            (Some(coef), _) => g * coef.clone(),
            (None, OptimizerKind::BertAdam) if c.max_grad_norm > 0.0 => {
                let coef = clip_coef(g.clone().square().sum(), c.max_grad_norm);
                g * coef
            }
            _ => g,
        };
        let m = st.m * c.beta1 + g.clone() * (1.0 - c.beta1);
        let v = st.v * c.beta2 + g.square() * (1.0 - c.beta2);
        let t = self.opt.step as i32;
        let updated = match c.kind {
            OptimizerKind::BertAdam => {
                let mut update = m.clone() / (v.clone().sqrt() + c.eps);
                if wd > 0.0 {
                    update = update + flat.clone() * wd;
                }
                flat - update * self.lr
            }
            OptimizerKind::AdamW => {
                let bc1 = 1.0 - c.beta1.powi(t);
                let bc2 = 1.0 - c.beta2.powi(t);
                let decayed = flat * (1.0 - self.lr * wd);
                let denom = (v.clone() / bc2).sqrt() + c.eps;
                decayed - (m.clone() / bc1) / denom * self.lr
            }
        };
        self.opt.state.insert(path, Moments { m, v });
        let mut updated = Tensor::from_inner(updated.reshape(shape));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

impl Optimizer {
    pub fn new(config: OptimizerConfig) -> Self {
        Self {
            config,
            state: HashMap::new(),
            step: 0,
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn step<M: Module>(&mut self, module: M, grads: GradientsParams, lr: f64) -> M {
        self.step += 1;
        let global_coef = match self.config.kind {
            OptimizerKind::AdamW if self.config.max_grad_norm > 0.0 => {
                let mut v = SquaredNorm {
                    grads: &grads,
                    total: None,
                };
                module.visit(&mut v);
                v.total.map(|t| clip_coef(t, self.config.max_grad_norm))
            }
            _ => None,
        };
        let mut mapper = Step {
            opt: self,
            grads,
            lr,
            global_coef,
            tracker: PathTracker::default(),
        };
        module.map(&mut mapper)
    }

    /// The moments as host tensors (`m.<path>`, `v.<path>`), for checkpoints.
    pub fn state_tensors(&self) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        for (k, s) in &self.state {
            out.insert(format!("m.{k}"), HostTensor::from_float(s.m.clone()));
            out.insert(format!("v.{k}"), HostTensor::from_float(s.v.clone()));
        }
        out
    }

    /// Restores moments saved by [`Self::state_tensors`].
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, HostTensor>,
        step: u64,
        device: &Device,
    ) -> anyhow::Result<()> {
        self.state.clear();
        for (k, t) in tensors {
            let Some(path) = k.strip_prefix("m.") else {
                continue;
            };
            let v = tensors
                .get(&format!("v.{path}"))
                .ok_or_else(|| anyhow::anyhow!("optimizer state: `m.{path}` without `v.{path}`"))?;
            let to = |h: &HostTensor| -> Tensor<1> {
                let data: Vec<f32> = h.to_f64().iter().map(|&x| x as f32).collect();
                let n = data.len();
                Tensor::from_data(TensorData::new(data, [n]), device)
            };
            self.state
                .insert(path.to_string(), Moments { m: to(t), v: to(v) });
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};

    #[derive(Module, Debug)]
    struct Tiny {
        dense: Linear,
        layer_norm: LayerNorm,
    }

    /// Plain-f64 reference of both optimisers for one scalar parameter sequence.
    fn reference(kind: OptimizerKind, decay: bool, grads: &[f64], p0: f64, lr: f64) -> f64 {
        let c = OptimizerConfig {
            kind,
            max_grad_norm: 0.0,
            ..OptimizerConfig::default()
        };
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, &g) in grads.iter().enumerate() {
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let wd = if decay { c.weight_decay } else { 0.0 };
            match kind {
                OptimizerKind::BertAdam => p -= lr * (m / (v.sqrt() + c.eps) + wd * p),
                OptimizerKind::AdamW => {
                    let t = (i + 1) as i32;
                    p *= 1.0 - lr * wd;
                    p -= lr * (m / (1.0 - c.beta1.powi(t)))
                        / ((v / (1.0 - c.beta2.powi(t))).sqrt() + c.eps);
                }
            }
        }
        p
    }

    #[test]
    fn matches_scalar_reference_and_skips_decay_on_bias_and_layernorm() {
        for kind in [OptimizerKind::BertAdam, OptimizerKind::AdamW] {
            let device = Device::flex().autodiff();
            let mut model = Tiny {
                dense: LinearConfig::new(1, 1).init(&device),
                layer_norm: LayerNormConfig::new(1).init(&device),
            };
            let w0 = model.dense.weight.val().into_scalar::<f32>() as f64;
            let b0 = model
                .dense
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_scalar::<f32>() as f64;
            let mut opt = Optimizer::new(OptimizerConfig {
                kind,
                max_grad_norm: 0.0,
                ..OptimizerConfig::default()
            });
            let (mut gw, mut gb) = (vec![], vec![]);
            let lr = 0.05;
            for x in [1.0f32, -2.0, 0.5] {
                let input = Tensor::<2>::from_floats([[x]], &device);
                let y = model.dense.forward(input).square().sum();
                let grads = y.backward();
                gw.push(
                    model
                        .dense
                        .weight
                        .val()
                        .grad(&grads)
                        .unwrap()
                        .into_scalar::<f32>() as f64,
                );
                gb.push(
                    model
                        .dense
                        .bias
                        .as_ref()
                        .unwrap()
                        .val()
                        .grad(&grads)
                        .unwrap()
                        .into_scalar::<f32>() as f64,
                );
                let gp = GradientsParams::from_grads(grads, &model);
                model = opt.step(model, gp, lr);
            }
            let w = model.dense.weight.val().into_scalar::<f32>() as f64;
            let b = model
                .dense
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_scalar::<f32>() as f64;
            assert!(
                (w - reference(kind, true, &gw, w0, lr)).abs() < 1e-5,
                "{kind:?} weight"
            );
            assert!(
                (b - reference(kind, false, &gb, b0, lr)).abs() < 1e-5,
                "{kind:?} bias"
            );
        }
    }

    #[test]
    fn bert_adam_clips_each_tensor() {
        let device = Device::flex().autodiff();
        let model = Tiny {
            dense: LinearConfig::new(2, 1).init(&device),
            layer_norm: LayerNormConfig::new(1).init(&device),
        };
        let w0: Vec<f32> = model
            .dense
            .weight
            .val()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        // A huge gradient: after clipping to norm 1, the first BertAdam step is lr·g/(|g|+eps)
        // per element whatever the scale, i.e. ≈ lr·sign(g).
        let y = model
            .dense
            .forward(Tensor::<2>::from_floats([[1000.0, -1000.0]], &device))
            .sum();
        let grads = GradientsParams::from_grads(y.backward(), &model);
        let mut opt = Optimizer::new(OptimizerConfig {
            weight_decay: 0.0,
            ..OptimizerConfig::default()
        });
        let model = opt.step(model, grads, 0.1);
        let w: Vec<f32> = model
            .dense
            .weight
            .val()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        // m = 0.1·g_c, v = 0.001·g_c² ⇒ update = 0.1/sqrt(0.001)·sign = 3.162·sign.
        let step = 0.1 * 0.1 / 0.001f64.sqrt();
        assert!(((w0[0] - w[0]) as f64 - step).abs() < 1e-3, "{w0:?} {w:?}");
        assert!(((w0[1] - w[1]) as f64 + step).abs() < 1e-3, "{w0:?} {w:?}");
        assert_eq!(
            opt.state_tensors().len(),
            4,
            "m and v of dense.weight and dense.bias"
        );
    }
}
