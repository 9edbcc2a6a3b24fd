//! Mixed-precision training (`precision = "f16" | "bf16"`): f32 master weights and optimiser
//! state, matmuls in half precision.
//!
//! Burn 0.22 has half-precision tensors, a differentiable `Tensor::cast` and per-device
//! `supports_dtype`, but no autocast and no loss scaler (tracel-ai/burn#5696; docs/src/gpu.md,
//! "Mixed precision"). So each step makes a *compute copy* of the model whose Linear weights
//! and biases are casts of the f32 masters. Autodiff carries the gradient back through the cast
//! into the f32 leaves, where `GradientsParams::from_grads` on the master model finds it and the
//! optimiser updates in f32. Embeddings, LayerNorm parameters and the optimiser never leave f32;
//! the model casts around its precision-sensitive ops itself (LayerNorm, the attention
//! normaliser and the losses run in f32, `model::bert::linear` casts a Linear's input to the
//! weight's dtype), as PyTorch's autocast lists do.

use anyhow::{Result, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use serde::{Deserialize, Serialize};

use crate::model::names::PathTracker;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (default).
    #[default]
    F32,
    /// Linear layers in IEEE half precision, with dynamic loss scaling.
    F16,
    /// Linear layers in bfloat16 (f32's exponent range: no loss scaling needed).
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The dtype of the compute copy's Linear layers; `None` for f32 (no copy is made).
    pub fn dtype(self) -> Option<FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::F16 => Some(FloatDType::F16),
            Precision::Bf16 => Some(FloatDType::BF16),
        }
    }

    /// Refuses a precision `device` cannot compute in: on a Vulkan device bf16 is storage only,
    /// and Burn warns that arithmetic in an unsupported dtype gives backend-dependent garbage.
    pub fn check(self, device: &Device) -> Result<()> {
        if let Some(dt) = self.dtype()
            && !device.supports_dtype(dt)
        {
            bail!(
                "precision {self:?}: this device ({device:?}) cannot compute in {dt:?}; use precision = \"f32\"{}",
                if self == Precision::Bf16 {
                    " or \"f16\""
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    /// The model the forward pass runs: `model` itself in f32, else its compute copy.
    pub fn compute_copy<M: Module>(self, model: &M) -> M {
        match self.dtype() {
            None => model.clone(),
            Some(dtype) => model.clone().map(&mut CastLinears {
                dtype,
                tracker: PathTracker::default(),
            }),
        }
    }

    /// The loss scaler of a fresh stage: f16 only, since bf16 has f32's range.
    pub fn loss_scale(self) -> Option<LossScale> {
        (self == Precision::F16).then(LossScale::default)
    }
}

/// Whether every parameter of `module` holds a value. A model built from a config (not loaded)
/// has lazily initialised parameters, which draw from the device's generator when first used.
pub fn initialized<M: Module>(module: &M) -> bool {
    struct All(bool);
    impl ModuleVisitor for All {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0 &= param.is_initialized();
        }
    }
    let mut v = All(true);
    module.visit(&mut v);
    v.0
}

/// Casts the parameters of every `Linear` to `dtype`. The cast is an autodiff op, so the copy's
/// parameters are not leaves: their gradients land on the f32 masters they were cast from.
struct CastLinears {
    dtype: FloatDType,
    tracker: PathTracker,
}

impl ModuleMapper for CastLinears {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.tracker.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !self.tracker.in_struct("Linear") {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, tensor.cast(self.dtype), mapper)
    }
}

/// Dynamic loss scaling (as `torch.amp.GradScaler`): the loss is multiplied by `scale` before
/// the backward pass so that small f16 gradients do not flush to zero; the gradients are divided
/// by it again in f32. A step whose gradients overflowed is skipped and the scale halved; after
/// `GROWTH_INTERVAL` good steps in a row it doubles.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: u64,
    /// Steps skipped for non-finite gradients, over the stage.
    pub skipped: u64,
}

const INITIAL_SCALE: f64 = 65536.0;
const GROWTH_INTERVAL: u64 = 2000;
/// f16's largest finite value is 65504; a scale past 2^24 only overflows.
const MAX_SCALE: f64 = 16_777_216.0;

impl Default for LossScale {
    fn default() -> Self {
        Self {
            scale: INITIAL_SCALE,
            good_steps: 0,
            skipped: 0,
        }
    }
}

impl LossScale {
    /// Divides every gradient of `module` by the scale. Returns `None`, and backs the scale off,
    /// when any gradient is not finite: the caller then skips the update.
    pub fn unscale<M: Module>(
        &mut self,
        module: &M,
        grads: GradientsParams,
    ) -> Option<GradientsParams> {
        let mut v = Unscale {
            grads,
            inv: 1.0 / self.scale,
            sq_norm: None,
        };
        module.visit(&mut v);
        // One host read per step: the sum of squares is NaN or infinite iff some gradient is.
        let finite = v.sq_norm.is_none_or(|t| t.into_scalar::<f32>().is_finite());
        if !finite {
            self.scale /= 2.0;
            self.good_steps = 0;
            self.skipped += 1;
            return None;
        }
        self.good_steps += 1;
        if self.good_steps >= GROWTH_INTERVAL && self.scale < MAX_SCALE {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        Some(v.grads)
    }
}

struct Unscale {
    grads: GradientsParams,
    inv: f64,
    sq_norm: Option<Tensor<1>>,
}

impl ModuleVisitor for Unscale {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(g) = self.grads.remove::<D>(param.id) else {
            return;
        };
        let g = g.cast(DType::F32) * self.inv;
        let s = g.clone().square().sum();
        self.sq_norm = Some(match self.sq_norm.take() {
            Some(t) => t + s,
            None => s,
        });
        self.grads.register::<D>(param.id, g);
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

    #[test]
    fn compute_copy_casts_linears_only_and_grads_reach_the_f32_masters() {
        let device = Device::flex().autodiff();
        let model = Tiny {
            dense: LinearConfig::new(3, 2).init(&device),
            layer_norm: LayerNormConfig::new(2).init(&device),
        };
        let copy = Precision::Bf16.compute_copy(&model);
        assert_eq!(copy.dense.weight.val().dtype(), DType::BF16);
        assert_eq!(copy.layer_norm.gamma.val().dtype(), DType::F32);
        let x = Tensor::<2>::from_floats([[1.0, -2.0, 0.5]], &device);
        let y = copy.dense.forward(x.cast(DType::BF16)).cast(DType::F32);
        let grads = GradientsParams::from_grads(y.sum().backward(), &model);
        let gw = grads
            .get::<2>(model.dense.weight.id)
            .expect("the master weight has a gradient");
        assert_eq!(gw.dtype(), DType::F32);
        // Burn's weight is [in, out] (y = xW + b): d(sum y)/dW[i][j] = x[i], exact in bf16.
        let got: Vec<f32> = gw.into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(got, vec![1.0, 1.0, -2.0, -2.0, 0.5, 0.5]);
    }

    #[test]
    fn loss_scale_skips_overflow_and_grows_after_good_steps() {
        let device = Device::flex().autodiff();
        let model = Tiny {
            dense: LinearConfig::new(1, 1).init(&device),
            layer_norm: LayerNormConfig::new(1).init(&device),
        };
        let grads_of = |v: f32| {
            let mut g = GradientsParams::new();
            g.register::<2>(
                model.dense.weight.id,
                Tensor::<2>::from_floats([[v]], &device),
            );
            g
        };
        let mut s = LossScale::default();
        let g = s.unscale(&model, grads_of(65536.0 * 3.0)).unwrap();
        let w = g.get::<2>(model.dense.weight.id).unwrap();
        assert_eq!(w.into_scalar::<f32>(), 3.0);
        assert!(s.unscale(&model, grads_of(f32::INFINITY)).is_none());
        assert_eq!((s.scale, s.skipped, s.good_steps), (32768.0, 1, 0));
        for _ in 0..GROWTH_INTERVAL {
            s.unscale(&model, grads_of(1.0)).unwrap();
        }
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
    }
}
