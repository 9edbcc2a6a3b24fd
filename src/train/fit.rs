//! The training loop of every stage: batches → loss → backward → optimiser step, with progress,
//! JSONL metrics, periodic evaluation, best-checkpoint selection and exact resume.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::checkpoint::{Checkpoints, LoopState, load_params, params};
use super::optim::Optimizer;
use super::precision::{LossScale, Precision, initialized};
use super::recipe::{StageKind, StageSettings};
use crate::data::{Batch, Order, Tokenized};
use crate::io::{HostTensor, load_safetensors, save_safetensors};

/// A loss and its named parts (for the log).
pub struct LossTerms {
    pub total: Tensor<1>,
    pub parts: Vec<(&'static str, Tensor<1>)>,
}

/// Appends one JSON object per line to `metrics.jsonl`.
pub struct MetricsLog {
    file: std::fs::File,
    pub path: PathBuf,
}

impl MetricsLog {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").with_context(|| format!("writing {}", self.path.display()))
    }
}

/// What one stage needs besides the model and its loss.
pub struct Stage<'a> {
    pub kind: StageKind,
    pub settings: StageSettings,
    /// `<run>/<stage>`: checkpoints and the best parameters.
    pub dir: PathBuf,
    pub train: &'a Tokenized,
    pub seed: u64,
    /// The autodiff device the model lives on.
    pub device: Device,
    /// The Linear layers' precision in the forward and backward passes (the master weights and
    /// the optimiser stay f32).
    pub precision: Precision,
    pub resume: bool,
    /// Written after the stage's name in the log (`finetune lr=5e-5`), when one stage runs
    /// several times in a run (a learning-rate sweep).
    pub tag: Option<String>,
    /// The stage's evaluations score held-out training examples, not the evaluation split
    /// (`data.select_examples`): their log records say so (`"on": "held-out"`).
    pub held_out: bool,
}

/// Dev score: the primary metric (higher is better) and every metric.
pub type Score = (f64, BTreeMap<String, f64>);

/// Seed of everything random in step `step` of a stage (dropout masks): a function of the step
/// alone, so a resumed run draws what the uninterrupted one drew.
fn step_seed(seed: u64, kind: StageKind, step: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((kind as u64) << 56) ^ step
}

/// The stage's progress bar, at `pos` of `total` steps.
fn progress_bar(name: &str, total: u64, pos: u64) -> ProgressBar {
    let bar = ProgressBar::new(total).with_position(pos);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} {bar:28} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("template"),
    );
    bar.set_prefix(name.to_string());
    bar
}

/// One optimiser step down `loss`'s gradient at `lr`. The compute copy's parameters are casts
/// of `model`'s, so the gradients are collected on the f32 masters; with f16's `scaler` the loss
/// is scaled before the backward pass, and a step whose scaled gradients overflowed is skipped
/// (the scale was halved).
fn descend<M: Module>(
    model: M,
    loss: Tensor<1>,
    scaler: Option<&mut LossScale>,
    optim: &mut Optimizer,
    lr: f64,
) -> M {
    let loss = match &scaler {
        Some(ls) => loss * ls.scale,
        None => loss,
    };
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let grads = match scaler {
        Some(ls) => ls.unscale(&model, grads),
        None => Some(grads),
    };
    match grads {
        Some(grads) => optim.step(model, grads, lr),
        None => model,
    }
}

/// The loss's parts and f16's loss scale, into a step's log line.
fn record_terms(
    line: &mut serde_json::Value,
    parts: &[(&'static str, Tensor<1>)],
    scale: Option<&LossScale>,
) {
    for (k, v) in parts {
        line[*k] = json!(v.clone().into_scalar::<f32>());
    }
    if let Some(ls) = scale {
        line["loss_scale"] = json!(ls.scale);
        line["skipped_steps"] = json!(ls.skipped);
    }
}

impl Stage<'_> {
    /// `finetune`, or `finetune lr=5e-5` in a sweep.
    fn name(&self) -> String {
        match &self.tag {
            Some(t) => format!("{} {t}", self.kind.name()),
            None => self.kind.name().to_string(),
        }
    }

    fn total_steps(&self) -> Result<u64> {
        let s = &self.settings;
        let per_epoch = self.plan(0).len() as u64;
        if per_epoch == 0 {
            bail!(
                "{}: no full batch of {} in the training data",
                self.name(),
                s.batch_size
            );
        }
        Ok(s.max_steps
            .unwrap_or((s.epochs * per_epoch as f64).ceil() as u64))
    }

    /// The model, optimiser and loop state of the last checkpoint when resuming, else a start.
    fn restore<M: Module>(
        &self,
        model: M,
        ckpts: &Checkpoints,
        optim: &mut Optimizer,
    ) -> Result<(M, LoopState)> {
        let (model, mut st) = match ckpts.latest() {
            Some(ck) if self.resume => {
                let (m, st) = Checkpoints::restore(&ck, model, optim, &self.device)?;
                eprintln!(
                    "{}: resumed from {} (step {})",
                    self.name(),
                    ck.display(),
                    st.step
                );
                (m, st)
            }
            _ => (model, LoopState::default()),
        };
        if st.loss_scale.is_none() {
            st.loss_scale = self.precision.loss_scale();
        }
        Ok((model, st))
    }

    fn plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        let s = &self.settings;
        self.train.plan(
            s.batch_size,
            Order::Shuffle {
                seed: self.seed ^ (epoch + 1).wrapping_mul(0x5851_F42D_4C95_7F2D),
                bucket: s.bucket,
            },
            s.drop_last,
        )
    }

    /// Runs the stage; returns the best model under `eval_fn` when `keep_best`, else the last.
    pub fn fit<M: Module>(
        &self,
        model: M,
        log: &mut MetricsLog,
        mut loss_fn: impl FnMut(&M, &Batch) -> Result<LossTerms>,
        mut eval_fn: impl FnMut(&M) -> Result<Score>,
    ) -> Result<(M, Option<Score>)> {
        let s = &self.settings;
        let name = self.name();
        let name = name.as_str();
        let total = self.total_steps()?;
        let ckpts = Checkpoints {
            dir: self.dir.clone(),
            keep: 2,
        };
        let best_path = self.dir.join("best.safetensors");
        let mut optim = Optimizer::new(s.optimizer.clone());
        let (mut model, mut st) = self.restore(model, &ckpts, &mut optim)?;
        let bar = progress_bar(name, total, st.step);
        let started = Instant::now() - std::time::Duration::from_secs_f64(st.elapsed_s);
        let mut last_good: Option<PathBuf> = ckpts.latest();
        let mut window = (Instant::now(), 0usize);
        let mut best: Option<Score> = None;
        let mut evaluated_at: Option<u64> = None;
        let mut evaluate = |model: &M, st: &mut LoopState, log: &mut MetricsLog| -> Result<Score> {
            let score = eval_fn(&model.valid())?;
            let mut record =
                json!({"stage": name, "step": st.step, "epoch": st.epoch, "eval": score.1});
            if self.held_out {
                record["on"] = "held-out".into();
            }
            log.write(record)?;
            if st.best_score.is_none_or(|b| score.0 > b) {
                st.best_score = Some(score.0);
                st.best_step = Some(st.step);
                if s.keep_best {
                    save_safetensors(&best_path, &params(model), None)?;
                }
            }
            Ok(score)
        };
        while st.step < total {
            let plan = self.plan(st.epoch);
            while st.batch < plan.len() && st.step < total {
                self.device.seed(step_seed(self.seed, self.kind, st.step));
                let batch = self.train.batch(&plan[st.batch]);
                let precision = self.step_precision(&model);
                let terms = loss_fn(&precision.compute_copy(&model), &batch)?;
                let loss = terms.total.clone().into_scalar::<f32>();
                check_finite(name, loss, st.step + 1, last_good.as_deref())?;
                let lr = s.schedule.lr(s.lr, st.step, total);
                let scaler = match precision {
                    Precision::F16 => st.loss_scale.as_mut(),
                    _ => None,
                };
                model = descend(model, terms.total, scaler, &mut optim, lr);
                st.step += 1;
                st.batch += 1;
                window.1 += batch.inputs.batch * batch.inputs.seq;
                bar.set_position(st.step);
                if st.step % s.log_every == 0 || st.step == total {
                    let tps = window.1 as f64 / window.0.elapsed().as_secs_f64();
                    window = (Instant::now(), 0);
                    bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
                    let mut line = json!({"stage": name, "step": st.step, "epoch": st.epoch,
                        "loss": loss, "lr": lr, "tokens_per_s": tps});
                    record_terms(&mut line, &terms.parts, st.loss_scale.as_ref());
                    log.write(line)?;
                }
                if s.eval_every > 0 && st.step % s.eval_every == 0 {
                    best = Some(evaluate(&model, &mut st, log)?);
                    evaluated_at = Some(st.step);
                }
                if st.step % s.checkpoint_every == 0 {
                    st.elapsed_s = started.elapsed().as_secs_f64();
                    last_good = Some(ckpts.save(&model, &optim, &st)?);
                }
            }
            if st.batch >= plan.len() {
                st.epoch += 1;
                st.batch = 0;
                if s.eval_every == 0 && st.step < total {
                    best = Some(evaluate(&model, &mut st, log)?);
                    evaluated_at = Some(st.step);
                }
            }
        }
        if evaluated_at != Some(st.step) {
            best = Some(evaluate(&model, &mut st, log)?);
        }
        st.elapsed_s = started.elapsed().as_secs_f64();
        ckpts.save(&model, &optim, &st)?;
        bar.finish_and_clear();
        log.write(json!({"stage": name, "done": true, "steps": st.step,
            "wall_s": st.elapsed_s, "best_step": st.best_step, "best_score": st.best_score}))?;
        if s.keep_best && best_path.is_file() && st.best_step != Some(st.step) {
            let best_params: BTreeMap<String, HostTensor> = load_safetensors(&best_path)?;
            model = load_params(model, &best_params)?;
            best = Some(eval_fn(&model.valid())?);
        }
        Ok((model, best))
    }

    /// Lazily initialised parameters (a model built from a config) take their values from the
    /// generator in the order they are first used: the f32 forward pass draws the embeddings
    /// first, the compute copy every Linear first. Such a model's first step runs in f32, so
    /// every precision starts from the weights (and dropout masks) of the f32 run.
    fn step_precision<M: Module>(&self, model: &M) -> Precision {
        if initialized(model) {
            self.precision
        } else {
            Precision::F32
        }
    }
}

/// Stops the stage at a non-finite loss, naming the step and the checkpoint to resume from.
fn check_finite(stage: &str, loss: f32, step: u64, last_good: Option<&Path>) -> Result<()> {
    if loss.is_finite() {
        return Ok(());
    }
    bail!(
        "{stage}: loss is {loss} at step {step}; last good checkpoint: {}",
        last_good.map_or("none".into(), |p| p.display().to_string())
    )
}
