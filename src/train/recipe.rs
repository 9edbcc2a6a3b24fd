//! Declarative recipes (TOML). A recipe may `extends = "other.toml"` (its tables are merged over
//! the parent's), may hold per-task tables `[tasks.<name>]` applied when `data.task` is that task,
//! and every field can be overridden from the command line (`--set stage1.epochs=3`). Unknown keys
//! are errors. Unset stage fields take MPCFormer's reference values for the task
//! ([`StageConfig::resolve`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Value;

use super::optim::{OptimizerConfig, OptimizerKind};
use super::precision::Precision;
use super::schedule::Schedule;
use crate::device::Backend;
use crate::distill::loss::{AttentionTarget, HiddenNorm, LogitLoss, RegressionTarget, SoftCeNorm};
use crate::model::{Act, Attn, LayerOverride};

/// One step of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    /// Fine-tune the teacher on the task's labels (like `run_glue`).
    Finetune,
    /// Distillation stage 1: attention scores + hidden states.
    Stage1,
    /// Distillation stage 2: logits (soft cross-entropy; MSE to gold for regression).
    Stage2,
    /// Train the student on labels only (the `w/o d` and `w/o p,d` baselines).
    Supervised,
}

impl StageKind {
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Finetune => "finetune",
            StageKind::Stage1 => "stage1",
            StageKind::Stage2 => "stage2",
            StageKind::Supervised => "supervised",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Run name: the run directory is `<output_dir>/<name>`.
    pub name: String,
    /// How `mpcformer report` lists the run beside its kind and approximations, for variations
    /// of a recipe that must not be averaged with it (e.g. `"stage 2 ×5"`); seeds of one label
    /// are grouped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_output")]
    pub output_dir: PathBuf,
    #[serde(default)]
    pub device: Backend,
    /// Precision of the Linear layers in training: `f32` (default), `f16` (with dynamic loss
    /// scaling) or `bf16`; master weights and optimiser state stay f32 (`train::precision`).
    /// Left out of the resolved recipe when f32, so f32 recipes keep their hash.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// Stages to run, in order.
    pub stages: Vec<StageKind>,
    pub teacher: TeacherSpec,
    #[serde(default)]
    pub student: StudentSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub finetune: StageConfig,
    #[serde(default)]
    pub stage1: StageConfig,
    #[serde(default)]
    pub stage2: StageConfig,
    #[serde(default)]
    pub supervised: StageConfig,
}

fn default_seed() -> u64 {
    42
}
fn default_output() -> PathBuf {
    PathBuf::from("checkpoints")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSpec {
    /// Directory or Hub id of the teacher (pretrained, or already fine-tuned when `finetune` is
    /// not among the stages).
    #[serde(default)]
    pub model: Option<String>,
    /// Instead of `model`: a fresh model of this HF config file (the quickstart's from-scratch
    /// teacher), initialised from `seed`.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Tokenizer directory when it differs from `model`'s (e.g. with `config`).
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Reproduce the reference's fault of running the teacher with dropout on.
    #[serde(default)]
    pub dropout_during_distill: bool,
    /// A finished run whose fine-tuned `teacher/` this run takes instead of fine-tuning again
    /// (students of several variants share one teacher). Its seed, teacher, data and `finetune`
    /// settings must be this recipe's, so the result is the one fine-tuning would give.
    #[serde(default)]
    pub finetuned_run: Option<PathBuf>,
    /// A finished run (its directory, or its copy in `results/`) that swept this recipe's
    /// `finetune.lr_grid` with its settings: only the sweep's best learning rate is fine-tuned
    /// again, and once that point reproduces its recorded dev score exactly, the other points'
    /// recorded scores stand for theirs. If it does not, the rest of the sweep runs. Remakes a
    /// lost teacher at one point's cost instead of the whole sweep's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep_from: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StudentInit {
    /// The (fine-tuned) teacher's weights, as MPCFormer does.
    #[default]
    Teacher,
    /// Random initialisation (the `w/o p,d` baseline).
    Random,
    /// The teacher's weights, refitted so that Quad and 2Quad start close to GeLU and softmax
    /// on training examples ([`crate::distill::fitted`]).
    Fitted,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSpec {
    #[serde(default = "default_act")]
    pub act: Act,
    #[serde(default = "default_attn")]
    pub attn: Attn,
    /// Per-layer overrides, keyed by layer index.
    #[serde(default)]
    pub layers: BTreeMap<String, LayerOverride>,
    #[serde(default)]
    pub init: StudentInit,
    /// With `init = "fitted"`: also fit each approximated head's key shift, the per-query score
    /// offset 2ReLU and 2Quad feel and softmax ignores ([`crate::distill::fitted`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub fit_shift: bool,
    /// Fewer layers than the teacher (must divide the teacher's count).
    #[serde(default)]
    pub num_hidden_layers: Option<usize>,
    /// A narrower student; its hidden states are projected by a learned `fit_dense`.
    #[serde(default)]
    pub hidden_size: Option<usize>,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// 2Quad's shift `c` in `(s + c)²` (MPCFormer hard-codes 5; it is public, part of the
    /// exported config, and the MPC engine uses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub two_quad_c: Option<f64>,
    /// A finished run whose student after stage 1 (and whose teacher) this run takes instead of
    /// running stage 1 again: variants that differ in stage 2 alone share one stage 1. Every
    /// setting but stage 2's, the name, label and output directory must be this recipe's, so
    /// the student is the one stage 1 would give here (stage 1 is deterministic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage1_run: Option<PathBuf>,
}

impl StudentSpec {
    /// Whether any layer of the student normalises attention with `attn`.
    pub fn uses(&self, attn: Attn) -> bool {
        self.attn == attn || self.layers.values().any(|o| o.attn == Some(attn))
    }
}

fn default_act() -> Act {
    Act::Quad
}
fn default_attn() -> Attn {
    Attn::TwoQuad
}

impl Default for StudentSpec {
    fn default() -> Self {
        Self {
            act: default_act(),
            attn: default_attn(),
            layers: BTreeMap::new(),
            init: StudentInit::Teacher,
            fit_shift: false,
            num_hidden_layers: None,
            hidden_size: None,
            intermediate_size: None,
            two_quad_c: None,
            stage1_run: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Task name: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, imdb.
    pub task: String,
    /// Data spec (path or `hub:org/name[/config]`); default: the task's Hub dataset.
    #[serde(default)]
    pub spec: Option<String>,
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Pad each batch to a multiple of this many positions (`transformers`'
    /// `pad_to_multiple_of`); default: to the longest example on Flex, to `max_len` on GPU
    /// backends, which compile kernels per shape. Stage 1's hidden-state MSE averages over padded
    /// positions too, as the reference's does, so this is part of the recipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_to_multiple_of: Option<usize>,
    #[serde(default = "default_train_split")]
    pub train_split: String,
    #[serde(default = "default_eval_split")]
    pub eval_split: String,
    /// Use only the first N training examples (CPU-scale recipes).
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Use only the first N evaluation examples.
    #[serde(default)]
    pub eval_limit: Option<usize>,
    /// Use N training examples drawn uniformly (the same N for every seed; see
    /// `Dataset::sample`), after `train_limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_sample: Option<usize>,
    /// Use N evaluation examples drawn uniformly, after `eval_limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_sample: Option<usize>,
    /// Hold N training examples out of training (drawn as `train_sample` draws, the same for
    /// every seed) and choose on them what is otherwise chosen on the evaluation split: each
    /// stage's best checkpoint (`keep_best`) and the teacher's learning rate. The evaluation
    /// split is then scored once, at the end. Unset: chosen on the evaluation split, as the
    /// reference and `run_glue` users do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_examples: Option<usize>,
    /// Add this many unlabelled transfer examples to the training data of the stages in
    /// `transfer_stages` (`data::transfer`), drawn from the seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_examples: Option<usize>,
    /// Which transfer examples: `repaired` (pair tasks' default), `sentences` of
    /// `transfer_from` (single-sentence tasks' default), or `neighbours`, TinyBERT-style copies
    /// of the training examples with words replaced by their nearest words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_kind: Option<TransferKind>,
    /// The stages that train on the transfer examples too: `["stage1"]` (default) or
    /// `["stage1", "stage2"]` (TinyBERT). Regression tasks need
    /// `stage2.regression_target = "teacher"` for stage 2: transfer examples have no gold score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_stages: Option<Vec<StageKind>>,
    /// Corpora whose training texts give a single-sentence task its transfer sentences: `task`
    /// (read from `spec`) or `task=spec`, e.g. `["sst2", "imdb=../shared/data/imdb"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transfer_from: Vec<String>,
}

/// What `data.transfer_examples` are (`data::transfer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    Repaired,
    Sentences,
    Neighbours,
}

impl DataSpec {
    /// The stages whose training data include the transfer examples (none without any).
    pub fn transfer_stages(&self) -> &[StageKind] {
        match (&self.transfer_examples, &self.transfer_stages) {
            (None, _) => &[],
            (Some(_), Some(s)) => s,
            (Some(_), None) => &[StageKind::Stage1],
        }
    }
}

fn default_train_split() -> String {
    "train".into()
}
fn default_eval_split() -> String {
    "dev".into()
}

/// One stage's settings; unset fields take the reference's values ([`StageConfig::resolve`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub epochs: Option<f64>,
    /// Stop after this many optimisation steps (overrides `epochs`).
    pub max_steps: Option<u64>,
    pub lr: Option<f64>,
    /// `finetune` only: fine-tune at each of these learning rates, each from the pretrained
    /// weights, and keep the best on dev (a `run_glue` sweep); replaces `lr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_grid: Option<Vec<f64>>,
    pub batch_size: Option<usize>,
    pub schedule: Option<ScheduleKind>,
    /// Warm-up fraction for the linear schedule.
    pub warmup: Option<f64>,
    pub optimizer: Option<OptimizerKind>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    /// Evaluate on dev every N steps (and always at the end); 0 = only at epoch ends.
    pub eval_every: Option<u64>,
    /// Save a resumable checkpoint every N steps.
    pub checkpoint_every: Option<u64>,
    pub log_every: Option<u64>,
    /// Drop the last partial batch of each epoch (the reference does).
    pub drop_last: Option<bool>,
    /// Sort shuffled examples into length buckets of this many batches (less padding).
    pub bucket: Option<usize>,
    /// Keep the checkpoint with the best dev score (else the last).
    pub keep_best: Option<bool>,
    /// Stage 1 weights.
    pub hidden_weight: Option<f64>,
    pub attention_weight: Option<f64>,
    /// What stage 1 matches of attention: `scores` (MSE, the reference) or `probs` (KL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_target: Option<AttentionTarget>,
    /// Stage 1's hidden-state MSE per layer: `none` (the reference) or `layer` (each divided by
    /// the teacher's mean square in that layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_norm: Option<HiddenNorm>,
    /// Stage 1 joined with stage 2: this weight times the logit-matching loss is added to stage
    /// 1's (0, the reference, by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_weight: Option<f64>,
    /// Stage 2.
    pub temperature: Option<f64>,
    /// Stage 2 on regression tasks: fit the gold score (the reference) or the teacher's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regression_target: Option<RegressionTarget>,
    pub soft_ce_norm: Option<SoftCeNorm>,
    /// Stage 2 on classification tasks: soft cross-entropy (the reference) or logit MSE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_loss: Option<LogitLoss>,
    /// Stage 2 with the gold labels too (Hinton et al.'s distillation): this weight times the
    /// cross-entropy with the gold class (regression: MSE to the gold score) is added to the
    /// teacher term (0, the reference, by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_weight: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Linear,
}

/// A stage's settings with every default filled in.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageSettings {
    pub epochs: f64,
    pub max_steps: Option<u64>,
    pub lr: f64,
    pub batch_size: usize,
    pub schedule: Schedule,
    pub optimizer: OptimizerConfig,
    pub eval_every: u64,
    pub checkpoint_every: u64,
    pub log_every: u64,
    pub drop_last: bool,
    pub bucket: usize,
    pub keep_best: bool,
    pub hidden_weight: f64,
    pub attention_weight: f64,
    #[serde(skip_serializing_if = "AttentionTarget::is_scores")]
    pub attention_target: AttentionTarget,
    #[serde(skip_serializing_if = "HiddenNorm::is_none")]
    pub hidden_norm: HiddenNorm,
    #[serde(skip_serializing_if = "is_zero")]
    pub prediction_weight: f64,
    pub temperature: f64,
    pub soft_ce_norm: SoftCeNorm,
    #[serde(skip_serializing_if = "RegressionTarget::is_gold")]
    pub regression_target: RegressionTarget,
    #[serde(skip_serializing_if = "LogitLoss::is_soft_ce")]
    pub logit_loss: LogitLoss,
    #[serde(skip_serializing_if = "is_zero")]
    pub label_weight: f64,
}

fn is_false(x: &bool) -> bool {
    !*x
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// MPCFormer's stage-1 epochs per task (`default_params` in `exp2.py`).
pub fn reference_stage1_epochs(task: &str) -> f64 {
    match task {
        "cola" => 50.0,
        "mnli" => 5.0,
        "mrpc" => 20.0,
        "sst2" => 10.0,
        "stsb" => 100.0,
        "qqp" => 5.0,
        "qnli" => 10.0,
        "rte" => 50.0,
        "imdb" => 30.0,
        _ => 50.0,
    }
}

impl StageConfig {
    /// Fills unset fields with the reference's values for `kind` on `task`.
    pub fn resolve(&self, kind: StageKind, task: &str) -> StageSettings {
        use StageKind::*;
        let (epochs, lr, schedule, warmup, optimizer, eval_every, keep_best) = match kind {
            // run_glue: 3 epochs, 2e-5, linear warm-up/decay, AdamW; best on dev per epoch.
            Finetune => (
                3.0,
                2e-5,
                ScheduleKind::Linear,
                0.1,
                OptimizerKind::AdamW,
                0,
                true,
            ),
            Stage1 => (
                reference_stage1_epochs(task),
                if task == "stsb" { 3e-5 } else { 5e-5 },
                ScheduleKind::Constant,
                0.0,
                OptimizerKind::BertAdam,
                0,
                false,
            ),
            Stage2 => (
                5.0,
                1e-5,
                ScheduleKind::Linear,
                0.1,
                OptimizerKind::BertAdam,
                100,
                true,
            ),
            Supervised => (
                10.0,
                1e-5,
                ScheduleKind::Linear,
                0.2,
                OptimizerKind::AdamW,
                0,
                true,
            ),
        };
        let warmup = self.warmup.unwrap_or(warmup);
        let opt_kind = self.optimizer.unwrap_or(optimizer);
        let base = OptimizerConfig {
            kind: opt_kind,
            ..OptimizerConfig::default()
        };
        StageSettings {
            epochs: self.epochs.unwrap_or(epochs),
            max_steps: self.max_steps,
            lr: self.lr.unwrap_or(lr),
            batch_size: self
                .batch_size
                .unwrap_or(if task == "mrpc" && kind != Finetune {
                    8
                } else {
                    32
                }),
            schedule: match self.schedule.unwrap_or(schedule) {
                ScheduleKind::Constant => Schedule::Constant,
                ScheduleKind::Linear => Schedule::Linear { warmup },
            },
            optimizer: OptimizerConfig {
                weight_decay: self.weight_decay.unwrap_or(base.weight_decay),
                max_grad_norm: self.max_grad_norm.unwrap_or(base.max_grad_norm),
                ..base
            },
            eval_every: self.eval_every.unwrap_or(eval_every),
            checkpoint_every: self.checkpoint_every.unwrap_or(200),
            log_every: self.log_every.unwrap_or(10),
            drop_last: self.drop_last.unwrap_or(true),
            bucket: self.bucket.unwrap_or(0),
            keep_best: self.keep_best.unwrap_or(keep_best),
            hidden_weight: self.hidden_weight.unwrap_or(1.0),
            attention_weight: self.attention_weight.unwrap_or(1.0),
            attention_target: self.attention_target.unwrap_or_default(),
            hidden_norm: self.hidden_norm.unwrap_or_default(),
            prediction_weight: self.prediction_weight.unwrap_or(0.0),
            temperature: self.temperature.unwrap_or(1.0),
            soft_ce_norm: self.soft_ce_norm.unwrap_or(SoftCeNorm::ElementMean),
            regression_target: self.regression_target.unwrap_or_default(),
            logit_loss: self.logit_loss.unwrap_or_default(),
            label_weight: self.label_weight.unwrap_or(0.0),
        }
    }
}

impl Recipe {
    pub fn stage(&self, kind: StageKind) -> StageSettings {
        let c = match kind {
            StageKind::Finetune => &self.finetune,
            StageKind::Stage1 => &self.stage1,
            StageKind::Stage2 => &self.stage2,
            StageKind::Supervised => &self.supervised,
        };
        c.resolve(kind, &self.data.task)
    }

    /// Loads a recipe file, following `extends`, applying `[tasks.<task>]` and `--set` overrides.
    ///
    /// `--set extends=<file>` (a path from the working directory) replaces the file's own
    /// `extends`: the baselines in `recipes/baselines/` run over any base recipe that way.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let (base, sets): (Vec<&String>, Vec<&String>) = sets.iter().partition(|s| {
            s.split_once('=')
                .is_some_and(|(k, _)| k.trim() == "extends")
        });
        let base = base.last().map(|s| {
            let raw = s.split_once('=').map(|(_, v)| v.trim()).unwrap_or_default();
            PathBuf::from(raw.trim_matches('"'))
        });
        let sets: Vec<String> = sets.into_iter().cloned().collect();
        let mut value = load_value(path, 0, base.as_deref())?;
        for s in &sets {
            apply_set(&mut value, s)?;
        }
        if let Some(tasks) = value.as_table_mut().and_then(|t| t.remove("tasks")) {
            let task = value
                .get("data")
                .and_then(|d| d.get("task"))
                .and_then(|t| t.as_str())
                .map(str::to_string);
            if let (Some(task), Some(tables)) = (task, tasks.as_table())
                && let Some(over) = tables.get(&task)
            {
                merge(&mut value, over.clone());
                // Command-line values win over task tables.
                for s in &sets {
                    apply_set(&mut value, s)?;
                }
            }
        }
        let text = toml::to_string(&value)?;
        let mut recipe: Recipe =
            toml::from_str(&text).with_context(|| format!("{}: invalid recipe", path.display()))?;
        recipe.name = recipe
            .name
            .replace("{task}", &recipe.data.task)
            .replace("{act}", &recipe.student.act.to_string())
            .replace("{attn}", &recipe.student.attn.to_string())
            .replace("{seed}", &recipe.seed.to_string());
        recipe
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(recipe)
    }

    /// Refuses settings that cannot work together, naming the key.
    fn validate(&self) -> Result<()> {
        if self.teacher.model.is_none() && self.teacher.config.is_none() {
            bail!("set teacher.model (a checkpoint) or teacher.config");
        }
        if self.stages.is_empty() {
            bail!("`stages` is empty");
        }
        let task = crate::data::Task::find(&self.data.task)
            .map_err(|e| anyhow::anyhow!("data.task: {e}"))?;
        self.check_transfer(task)?;
        self.check_stage_terms(task)?;
        self.check_student()?;
        self.check_teacher()
    }

    /// Each stage's loss terms and grids, against the stages that have them.
    fn check_stage_terms(&self, task: &crate::data::Task) -> Result<()> {
        for (name, stage) in [
            ("stage1", &self.stage1),
            ("stage2", &self.stage2),
            ("supervised", &self.supervised),
        ] {
            if stage.lr_grid.is_some() {
                bail!(
                    "{name}.lr_grid: only the teacher's fine-tuning sweeps learning rates (finetune.lr_grid)"
                );
            }
        }
        for (name, stage) in [
            ("finetune", &self.finetune),
            ("stage2", &self.stage2),
            ("supervised", &self.supervised),
        ] {
            if stage.prediction_weight.is_some() {
                bail!(
                    "{name}.prediction_weight: only stage 1 adds a prediction term to its loss (stage1.prediction_weight)"
                );
            }
            if stage.hidden_norm.is_some() {
                bail!(
                    "{name}.hidden_norm: only stage 1 matches hidden states (stage1.hidden_norm)"
                );
            }
        }
        if let Some(w) = self.stage1.prediction_weight
            && !(w >= 0.0 && w.is_finite())
        {
            bail!("stage1.prediction_weight must be ≥ 0, found {w}");
        }
        for (name, stage) in [
            ("finetune", &self.finetune),
            ("stage1", &self.stage1),
            ("supervised", &self.supervised),
        ] {
            if stage.label_weight.is_some() {
                bail!(
                    "{name}.label_weight: only stage 2 adds a gold-label term to the teacher's (stage2.label_weight)"
                );
            }
        }
        if let Some(w) = self.stage2.label_weight {
            if !(w >= 0.0 && w.is_finite()) {
                bail!("stage2.label_weight must be ≥ 0, found {w}");
            }
            if w > 0.0
                && task.is_regression()
                && self.stage2.regression_target.unwrap_or_default() == RegressionTarget::Gold
            {
                bail!(
                    "stage2.label_weight: stage 2 of {} already fits the gold scores (stage2.regression_target = \"gold\"); the label term is for a stage 2 on the teacher's outputs",
                    task.name
                );
            }
            if w > 0.0 && self.data.transfer_stages().contains(&StageKind::Stage2) {
                bail!(
                    "stage2.label_weight needs gold labels, and stage 2 trains on transfer examples, which have none (data.transfer_stages)"
                );
            }
        }
        Ok(())
    }

    /// The student's start against its shape and stages.
    fn check_student(&self) -> Result<()> {
        if self.student.init == StudentInit::Fitted {
            let st = &self.student;
            for (key, set) in [
                ("num_hidden_layers", st.num_hidden_layers.is_some()),
                ("hidden_size", st.hidden_size.is_some()),
                ("intermediate_size", st.intermediate_size.is_some()),
            ] {
                if set {
                    bail!(
                        "student.init = \"fitted\" refits the teacher's own layers, so the student keeps the teacher's shape; drop student.{key}"
                    );
                }
            }
        }
        if self.student.fit_shift && self.student.init != StudentInit::Fitted {
            bail!("student.fit_shift is part of the fitted start; set student.init = \"fitted\"");
        }
        if self.student.init == StudentInit::Fitted
            && self.stages.contains(&StageKind::Stage1)
            && self.stage(StageKind::Stage1).attention_target.is_scores()
            && (self.student.uses(crate::model::approx::Attn::TwoQuad) || self.student.fit_shift)
        {
            bail!(
                "student.init = \"fitted\" rescales each 2Quad head's scores (and student.fit_shift shifts them), which stage 1's score MSE would undo; set stage1.attention_target = \"probs\""
            );
        }
        if self.student.stage1_run.is_some()
            && !(self.stages.contains(&StageKind::Stage1)
                && self.stages.contains(&StageKind::Stage2))
        {
            bail!(
                "student.stage1_run takes another run's stage 1 for this run's stage 2; `stages` needs both"
            );
        }
        Ok(())
    }

    /// Where the teacher comes from, and its learning-rate sweep.
    fn check_teacher(&self) -> Result<()> {
        if self.teacher.sweep_from.is_some() {
            let needs = if self.finetune.lr_grid.is_none() {
                Some("finetune.lr_grid")
            } else if self.teacher.finetuned_run.is_some() {
                Some("no teacher.finetuned_run (that run's teacher is taken as it is)")
            } else if !self.stages.contains(&StageKind::Finetune) {
                Some("the finetune stage")
            } else {
                None
            };
            if let Some(needs) = needs {
                bail!("teacher.sweep_from replays a learning-rate sweep; it needs {needs}");
            }
        }
        if let Some(grid) = &self.finetune.lr_grid
            && (grid.is_empty() || grid.iter().any(|lr| !(*lr > 0.0 && lr.is_finite())))
        {
            bail!("finetune.lr_grid must list positive learning rates, found {grid:?}");
        }
        Ok(())
    }

    /// `data.transfer_*` against the task and stage 2's regression target.
    fn check_transfer(&self, task: &crate::data::Task) -> Result<()> {
        let d = &self.data;
        let pairs = task.tsv.text.len() == 2;
        match d.transfer_kind {
            Some(TransferKind::Repaired) if !pairs => bail!(
                "data.transfer_kind = \"repaired\": {} has single sentences (use \"sentences\" or \"neighbours\")",
                task.title
            ),
            Some(TransferKind::Sentences) if pairs => bail!(
                "data.transfer_kind = \"sentences\": {} has sentence pairs (use \"repaired\" or \"neighbours\")",
                task.title
            ),
            _ => {}
        }
        for k in d.transfer_stages.iter().flatten() {
            if !matches!(k, StageKind::Stage1 | StageKind::Stage2) {
                bail!(
                    "data.transfer_stages: `{}` trains on labels; only stage1 and stage2 can use unlabelled transfer examples",
                    k.name()
                );
            }
        }
        if task.is_regression()
            && d.transfer_stages().contains(&StageKind::Stage2)
            && self.stage(StageKind::Stage2).regression_target == RegressionTarget::Gold
        {
            bail!(
                "data.transfer_stages includes stage2, but {} is a regression task and stage 2 fits the gold score, which transfer examples lack: set stage2.regression_target = \"teacher\"",
                task.title
            );
        }
        Ok(())
    }

    /// The resolved recipe as TOML, with every stage's defaults written out.
    pub fn resolved_toml(&self) -> String {
        let mut v = toml::Value::try_from(self).expect("recipe serialises");
        let mut stages = toml::map::Map::new();
        for kind in &self.stages {
            stages.insert(
                kind.name().into(),
                toml::Value::try_from(self.stage(*kind)).expect("settings serialise"),
            );
        }
        v.as_table_mut()
            .expect("table")
            .insert("resolved".into(), Value::Table(stages));
        toml::to_string_pretty(&v).expect("toml")
    }

    /// sha256 of the resolved recipe: identifies a configuration in summaries and manifests.
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.resolved_toml().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `base`, when given, replaces `path`'s own `extends` (it is already a full path).
fn load_value(path: &Path, depth: usize, base: Option<&Path>) -> Result<Value> {
    if depth > 8 {
        bail!("{}: `extends` nests too deeply (a cycle?)", path.display());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut value: Value =
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
    let parent = value.as_table_mut().and_then(|t| t.remove("extends"));
    if let Some(b) = base {
        let mut base = load_value(b, depth + 1, None)?;
        merge(&mut base, value);
        return Ok(base);
    }
    match parent {
        Some(Value::String(p)) => {
            let ppath = path.parent().unwrap_or(Path::new(".")).join(p);
            let mut base = load_value(&ppath, depth + 1, None)?;
            merge(&mut base, value);
            Ok(base)
        }
        Some(_) => bail!("{}: `extends` must be a file path", path.display()),
        None => Ok(value),
    }
}

/// Merges `over` into `base`: tables recursively, everything else replaced.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Table(b), Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(bv) if bv.is_table() && v.is_table() => merge(bv, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// `a.b.c=value`: the value is parsed as TOML (`3`, `1e-5`, `true`, `"x"`, `[1, 2]`), else taken
/// as a string.
pub fn apply_set(value: &mut Value, set: &str) -> Result<()> {
    let (key, raw) = set
        .split_once('=')
        .with_context(|| format!("--set `{set}`: expected key=value"))?;
    let parsed: Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut cur = value;
    for (i, p) in parts.iter().enumerate() {
        let table = cur
            .as_table_mut()
            .with_context(|| format!("--set `{set}`: `{}` is not a table", parts[..i].join(".")))?;
        if i + 1 == parts.len() {
            table.insert(p.to_string(), parsed);
            return Ok(());
        }
        cur = table
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Default::default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const BASE: &str = r#"
name = "base-{task}-{attn}"
stages = ["stage1", "stage2"]
[teacher]
model = "some/teacher"
[data]
task = "rte"
[stage1]
lr = 4e-5
[tasks.mrpc.stage1]
epochs = 7
"#;

    #[test]
    fn extends_tasks_and_sets() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "base.toml", BASE);
        let child = write(
            dir.path(),
            "child.toml",
            "extends = \"base.toml\"\nname = \"child\"\n[student]\nattn = \"2relu\"\n",
        );
        let r = Recipe::load(&dir.path().join("base.toml"), &[]).unwrap();
        assert_eq!(r.name, "base-rte-2quad");
        let r = Recipe::load(&child, &[]).unwrap();
        assert_eq!(r.name, "child");
        assert_eq!(r.student.attn, Attn::TwoRelu);
        assert_eq!(r.student.act, Act::Quad);
        let s1 = r.stage(StageKind::Stage1);
        assert_eq!((s1.lr, s1.epochs, s1.batch_size), (4e-5, 50.0, 32));
        assert_eq!(r.stage(StageKind::Stage2).eval_every, 100);

        let r = Recipe::load(&child, &["data.task=mrpc".into()]).unwrap();
        let s1 = r.stage(StageKind::Stage1);
        assert_eq!((s1.epochs, s1.batch_size), (7.0, 8));
        let r = Recipe::load(
            &child,
            &[
                "data.task=mrpc".into(),
                "stage1.epochs=2".into(),
                "teacher.model=x/y".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.stage(StageKind::Stage1).epochs, 2.0);
        assert_eq!(r.teacher.model.as_deref(), Some("x/y"));
        assert_ne!(r.hash(), Recipe::load(&child, &[]).unwrap().hash());
    }

    /// Every recipe in `recipes/` loads for every task, including the per-task tables that a
    /// default task never reaches; and the shipped recipe's gold-label term in stage 2 is on for
    /// classification and off where stage 2 fits the gold scores already.
    #[test]
    fn shipped_recipes_load_for_every_task() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let mut files = Vec::new();
        for dir in [root.clone(), root.join("baselines")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    files.push(path);
                }
            }
        }
        assert!(files.len() >= 7, "recipes found: {files:?}");
        for file in &files {
            for task in crate::data::TASKS {
                let set = format!("data.task={}", task.name);
                if let Err(e) = Recipe::load(file, &[set]) {
                    panic!("{} for {}: {e:#}", file.display(), task.name);
                }
            }
        }
        let minilm = root.join("minilm.toml");
        let label_weight = |task: &str| {
            let r = Recipe::load(&minilm, &[format!("data.task={task}")]).unwrap();
            r.stage(StageKind::Stage2).label_weight
        };
        for task in ["rte", "mrpc", "cola", "sst2", "imdb"] {
            assert_eq!(label_weight(task), 1.0, "{task}");
        }
        assert_eq!(label_weight("stsb"), 0.0);
    }

    #[test]
    fn extends_can_be_replaced_from_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "base.toml", BASE);
        let other = write(
            dir.path(),
            "other.toml",
            &BASE.replace("some/teacher", "other/teacher"),
        );
        let child = write(
            dir.path(),
            "child.toml",
            "extends = \"base.toml\"\nname = \"child-{task}\"\n[stage1]\nepochs = 3\n",
        );
        let set = format!("extends={}", other.display());
        let r = Recipe::load(&child, &[set, "data.task=mrpc".into()]).unwrap();
        assert_eq!(r.teacher.model.as_deref(), Some("other/teacher"));
        assert_eq!(r.name, "child-mrpc");
        // The replaced base's task tables apply (over the child's values, as with a file's own
        // `extends`).
        let s1 = r.stage(StageKind::Stage1);
        assert_eq!((s1.epochs, s1.batch_size), (7.0, 8));
        let r = Recipe::load(&child, &[format!("extends={}", other.display())]).unwrap();
        assert_eq!(r.stage(StageKind::Stage1).epochs, 3.0);
        let err = format!(
            "{:#}",
            Recipe::load(&child, &["extends=nowhere.toml".into()]).unwrap_err()
        );
        assert!(err.contains("nowhere.toml"), "{err}");
    }

    #[test]
    fn unknown_keys_and_tasks_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "r.toml",
            &BASE.replace("lr = 4e-5", "lr = 4e-5\nlearning_rate = 1"),
        );
        let err = format!("{:#}", Recipe::load(&p, &[]).unwrap_err());
        assert!(err.contains("learning_rate"), "{err}");
        let p = write(dir.path(), "r2.toml", BASE);
        let err = format!(
            "{:#}",
            Recipe::load(&p, &["data.task=squad".into()]).unwrap_err()
        );
        assert!(err.contains("squad"), "{err}");
    }

    /// `hidden_norm` belongs to stage 1 and changes nothing in a resolved recipe when unset,
    /// so the runs made before it keep their `recipe.toml`.
    #[test]
    fn hidden_norm_is_stage_one_only_and_silent_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "r.toml", BASE);
        let err = format!(
            "{:#}",
            Recipe::load(&p, &["stage2.hidden_norm=\"layer\"".into()]).unwrap_err()
        );
        assert!(err.contains("stage2.hidden_norm: only stage 1"), "{err}");
        let plain = Recipe::load(&p, &[]).unwrap();
        let text = toml::to_string(&plain.stage(StageKind::Stage1)).unwrap();
        assert!(!text.contains("hidden_norm"), "{text}");
        let layer = Recipe::load(&p, &["stage1.hidden_norm=\"layer\"".into()]).unwrap();
        assert_eq!(
            layer.stage(StageKind::Stage1).hidden_norm,
            HiddenNorm::Layer
        );
    }

    #[test]
    fn reference_defaults() {
        let c = StageConfig::default();
        let s = c.resolve(StageKind::Stage1, "stsb");
        assert_eq!(
            (s.epochs, s.lr, s.schedule),
            (100.0, 3e-5, Schedule::Constant)
        );
        assert_eq!(s.optimizer.kind, OptimizerKind::BertAdam);
        let s = c.resolve(StageKind::Stage2, "cola");
        assert_eq!(
            (s.epochs, s.lr, s.schedule),
            (5.0, 1e-5, Schedule::Linear { warmup: 0.1 })
        );
        assert_eq!(s.soft_ce_norm, SoftCeNorm::ElementMean);
    }
}
