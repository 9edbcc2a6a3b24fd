//! `mpcformer bench`: steps of training, distillation or inference timed on random data of
//! fixed shapes — the same work as `shared/tools/bench_torch.py`'s cases, so the tokens/s compare.

use std::time::Instant;

use anyhow::Result;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use serde::Serialize;

use crate::distill::loss::{SoftCeNorm, mse, soft_cross_entropy};
use crate::loss;
use crate::model::{Act, Approx, Attn, Capture, Inputs, ModelConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Case {
    /// Forward + backward + AdamW step of a classifier (cross-entropy).
    Train,
    /// Exact teacher forward (no grad) + Quad/2Quad student forward, backward and AdamW step;
    /// loss = Σ hidden-state MSE + soft cross-entropy, as bench_torch.py's `minilm_distill`.
    Distill,
    /// Forward only, no autodiff.
    Infer,
}

pub use crate::model::shapes::Shape;

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub case: Case,
    pub shape: Shape,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub warmup: usize,
    pub median_step_s: f64,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: u64,
    pub backend: String,
    pub step_s: Vec<f64>,
}

/// Peak resident set size of this process (`VmHWM`), 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// SplitMix64: a tiny deterministic generator for synthetic inputs.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Random ids in [1000, vocab), full attention, second half of each row is segment B.
fn synthetic_batch(b: usize, s: usize, vocab: usize, device: &Device) -> (Inputs, Tensor<1, Int>) {
    let mut rng = SplitMix(0);
    let ids: Vec<i64> = (0..b * s)
        .map(|_| 1000 + (rng.next() % (vocab as u64 - 1000)) as i64)
        .collect();
    let types: Vec<i64> = (0..b * s).map(|i| ((i % s) >= s / 2) as i64).collect();
    let labels: Vec<i64> = (0..b).map(|_| (rng.next() % 2) as i64).collect();
    let t = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, s]), device);
    let inputs = Inputs {
        input_ids: t(ids),
        attention_mask: Tensor::ones([b, s], device),
        token_type_ids: Some(t(types)),
    };
    (
        inputs,
        Tensor::from_data(TensorData::new(labels, [b]), device),
    )
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// What to time: a case on random data of a shape.
#[derive(Clone, Copy, Debug)]
pub struct BenchSpec {
    pub case: Case,
    pub shape: Shape,
    pub batch: usize,
    pub seq: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Hidden and attention dropout of the trained model (HF: 0.1).
    pub dropout: f64,
}

/// Runs `warmup + steps` steps of `spec.case` and reports the median step time.
pub fn run(spec: &BenchSpec, device: &Device) -> Result<BenchResult> {
    let BenchSpec {
        case,
        shape,
        batch,
        seq,
        warmup,
        steps,
        dropout,
    } = *spec;
    let config = |approx: Approx| {
        let mut c = shape.config(approx);
        c.hidden_dropout_prob = dropout;
        c.attention_probs_dropout_prob = dropout;
        c
    };
    device.seed(0);
    let mut step_s = Vec::with_capacity(steps);
    let mut time = |i: usize, f: &mut dyn FnMut() -> f32| -> Result<()> {
        let t0 = Instant::now();
        let v = f();
        // GPU backends queue work: the step reads its loss before backward and the optimizer
        // step, so without waiting here their kernels would be timed in the next step (and the
        // last step's not at all). On Flex this returns at once.
        device
            .sync()
            .map_err(|e| anyhow::anyhow!("{device:?}: a step failed on the device: {e:?}"))?;
        let dt = t0.elapsed().as_secs_f64();
        eprintln!(
            "{} step {i}: {dt:.3} s (loss/out {v:.4})",
            if i < warmup { "warmup" } else { "timed" }
        );
        if i >= warmup {
            step_s.push(dt);
        }
        Ok(())
    };
    let n = warmup + steps;
    match case {
        Case::Infer => infer_steps(&config, batch, seq, n, device, &mut time)?,
        Case::Train => train_steps(&config, batch, seq, n, device, &mut time)?,
        Case::Distill => distill_steps(&config, batch, seq, n, device, &mut time)?,
    }
    let median_step_s = median(&step_s);
    Ok(BenchResult {
        case,
        shape,
        batch,
        seq,
        steps,
        warmup,
        median_step_s,
        tokens_per_s: (batch * seq) as f64 / median_step_s,
        peak_rss_bytes: peak_rss_bytes(),
        backend: format!("{device:?}"),
        step_s,
    })
}

/// Times one measured step: `time(i, step)`.
type Timer<'a> = dyn FnMut(usize, &mut dyn FnMut() -> f32) -> Result<()> + 'a;

fn infer_steps(
    config: &dyn Fn(Approx) -> ModelConfig,
    batch: usize,
    seq: usize,
    n: usize,
    device: &Device,
    time: &mut Timer,
) -> Result<()> {
    let model = config(Approx::exact()).init(device);
    let (inputs, _) = synthetic_batch(batch, seq, 30522, device);
    let threads = crate::model::bert::inference_threads(device);
    for i in 0..n {
        time(i, &mut || {
            let logits = model.logits_threaded(&inputs, threads);
            logits.sum().into_scalar::<f32>()
        })?;
    }
    Ok(())
}

fn train_steps(
    config: &dyn Fn(Approx) -> ModelConfig,
    batch: usize,
    seq: usize,
    n: usize,
    device: &Device,
    time: &mut Timer,
) -> Result<()> {
    let ad = device.clone().autodiff();
    let mut model = config(Approx::exact()).init(&ad);
    let mut optim = AdamWConfig::new().init();
    let (inputs, labels) = synthetic_batch(batch, seq, 30522, &ad);
    for i in 0..n {
        time(i, &mut || {
            let logits = model.logits(&inputs);
            let loss = loss::cross_entropy(logits, labels.clone());
            let v = loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-4, model.clone(), grads);
            v
        })?;
    }
    Ok(())
}

/// A distillation step as stage 1 + 2 take it: the frozen teacher's forward pass (no autodiff),
/// the Quad+2Quad student's forward and backward on the logits and every hidden state.
fn distill_steps(
    config: &dyn Fn(Approx) -> ModelConfig,
    batch: usize,
    seq: usize,
    n: usize,
    device: &Device,
    time: &mut Timer,
) -> Result<()> {
    let teacher = config(Approx::exact()).without_dropout().init(device);
    let threads = crate::model::bert::inference_threads(device);
    let ad = device.clone().autodiff();
    let mut student = config(Approx::new(Act::Quad, Attn::TwoQuad)).init(&ad);
    let mut optim = AdamWConfig::new().init();
    let (inputs, _) = synthetic_batch(batch, seq, 30522, device);
    let (inputs_ad, _) = synthetic_batch(batch, seq, 30522, &ad);
    let capture = Capture {
        hidden_states: true,
        ..Capture::NONE
    };
    for i in 0..n {
        time(i, &mut || {
            let t = teacher.forward_threaded(&inputs, capture, threads);
            let s = student.forward(&inputs_ad, capture);
            let mut total = soft_cross_entropy(
                s.logits,
                t.logits.to_device(&ad),
                1.0,
                SoftCeNorm::PerExample,
            );
            for (hs, ht) in s
                .encoder
                .hidden_states
                .into_iter()
                .zip(t.encoder.hidden_states)
            {
                total = total + mse(hs, ht.to_device(&ad));
            }
            let v = total.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(total.backward(), &student);
            student = optim.step(1e-4, student.clone(), grads);
            v
        })?;
    }
    Ok(())
}
