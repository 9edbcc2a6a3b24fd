//! `mpcformer run`: a whole recipe — optional teacher fine-tuning, distillation stages or the
//! label-only baseline, evaluation of teacher and student, and a `summary.json`.
//!
//! Run directory `<output_dir>/<name>/`: `recipe.toml` (resolved), `metrics.jsonl`, one folder per
//! stage with resumable checkpoints, `teacher/` and `student/` as Hugging Face directories, and
//! `summary.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::checkpoint::Checkpoints;
use super::fit::{LossTerms, MetricsLog, Score, Stage};
use super::recipe::{Recipe, StageKind, StageSettings, StudentInit, TransferKind};
use crate::data::{self, Batch, Dataset, Fields, Label, Task, Tokenized};
use crate::distill::fitted;
use crate::distill::loss::RegressionTarget;
use crate::distill::{Student, init_student, intermediate_loss, prediction_loss, stage1_capture};
use crate::eval::{predictions, run_model};
use crate::io::write_atomic;
use crate::metric;
use crate::model::bert::{Capture, ClassifierOutput};
use crate::model::{self, Inputs, ModelConfig, Overrides, SequenceClassifier, load_pretrained};
use crate::tokenize::TextTokenizer;

#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    pub approximations: String,
    pub metrics: BTreeMap<String, f64>,
    pub primary: f64,
}

/// A score on dev without a model: what the best constant answer gets.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    pub metrics: BTreeMap<String, f64>,
    pub primary: f64,
}

/// One learning rate of the teacher's sweep and its best dev score.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GridPoint {
    pub lr: f64,
    pub primary: f64,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub name: String,
    pub task: String,
    pub seed: u64,
    pub recipe_hash: String,
    pub teacher: ModelSummary,
    pub student: Option<ModelSummary>,
    /// student primary / teacher primary.
    pub retention: Option<f64>,
    /// The best constant answer on dev (majority class, always-positive F1, 0 for MCC and
    /// correlations): the floor both models are judged against.
    pub trivial: Baseline,
    /// Share of dev examples where student and teacher predict the same class (regression: the
    /// Pearson correlation of their scores).
    pub agreement: Option<f64>,
    /// `finetune.lr_grid`: every learning rate tried and its best score on what the run chooses
    /// on (dev, or the held-out examples); the teacher is the best of them. Empty when the teacher was fine-tuned at one learning rate or reused.
    pub teacher_grid: Vec<GridPoint>,
    pub stage_wall_s: BTreeMap<String, f64>,
    pub train_examples: usize,
    pub eval_examples: usize,
    /// Training examples held out to choose checkpoints and the teacher's learning rate on
    /// (`data.select_examples`); absent when those were chosen on dev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out_examples: Option<usize>,
}

/// Data shared by every stage: tokenised once.
struct TaskData {
    task: &'static Task,
    train: Tokenized,
    /// `train` and the transfer examples, when the recipe adds some: the training data of
    /// `data.transfer_stages`.
    augmented: Option<Tokenized>,
    dev: Tokenized,
    dev_set: Dataset,
    /// Training examples held out to choose checkpoints and learning rates on
    /// (`data.select_examples`), instead of dev.
    select: Option<(Dataset, Tokenized)>,
}

fn load_split(
    task: &'static Task,
    spec: Option<&str>,
    split: &str,
    (limit, sample): (Option<usize>, Option<usize>),
) -> Result<Dataset> {
    let s = task.split(split).map_err(anyhow::Error::msg)?;
    let mut d = data::load(task, spec, s, &Fields::default())?;
    if let Some(n) = limit {
        d.examples.truncate(n);
    }
    if let Some(n) = sample {
        d.sample(n);
    }
    Ok(d)
}

/// The training set with `data.transfer_examples` unlabelled examples added (the data of
/// `data.transfer_stages`), or `None` when the recipe adds none.
fn transfer_set(
    recipe: &Recipe,
    task: &'static Task,
    train: &Dataset,
    (teacher, tokenizer): (&SequenceClassifier, &TextTokenizer),
) -> Result<Option<Dataset>> {
    let Some(n) = recipe.data.transfer_examples else {
        return Ok(None);
    };
    // Its own stream: the same for every stage and resume, different per seed.
    let seed = recipe.seed ^ 0x7472_616E_7366_6572;
    let pairs = task.tsv.text.len() == 2;
    let kind = recipe.data.transfer_kind.unwrap_or(if pairs {
        TransferKind::Repaired
    } else {
        TransferKind::Sentences
    });
    let extra = match kind {
        TransferKind::Repaired => data::transfer::repaired(&train.examples, n, seed),
        TransferKind::Sentences => {
            data::transfer::sentences(&transfer_sources(recipe, task)?, n, seed)
        }
        TransferKind::Neighbours => {
            let texts = train
                .examples
                .iter()
                .flat_map(|e| std::iter::once(e.text_a.as_str()).chain(e.text_b.as_deref()));
            let near = data::transfer::WordNeighbours::new(
                &tokenizer.inner().get_vocab(false),
                teacher.bert.embeddings.word_embeddings.weight.val(),
                texts,
                data::transfer::NEIGHBOURS,
            )
            .map_err(|e| anyhow::anyhow!("data.transfer_kind = \"neighbours\": {e}"))?;
            eprintln!(
                "transfer: nearest words of {} training-set words, by the pretrained model's word embeddings",
                near.len()
            );
            data::transfer::neighbour_copies(
                &train.examples,
                n,
                data::transfer::REPLACE_P,
                &near,
                seed,
            )
        }
    };
    if let Some(e) = extra.first() {
        eprintln!(
            "transfer: e.g. {:?}{}",
            e.text_a,
            e.text_b
                .as_ref()
                .map(|b| format!(" / {b:?}"))
                .unwrap_or_default()
        );
    }
    let stages: Vec<&str> = recipe
        .data
        .transfer_stages()
        .iter()
        .map(|k| k.name())
        .collect();
    eprintln!(
        "{}: {} transfer examples added to {} training examples",
        stages.join(", "),
        extra.len(),
        train.examples.len()
    );
    let mut out = train.clone();
    out.examples.extend(extra);
    Ok(Some(out))
}

/// The training texts of `data.transfer_from`, where single-sentence transfer examples come from.
fn transfer_sources(recipe: &Recipe, task: &Task) -> Result<Vec<data::Example>> {
    if recipe.data.transfer_from.is_empty() {
        bail!(
            "data.transfer_examples: {} has single sentences; name corpora to draw them from in data.transfer_from (e.g. [\"sst2\"]), or set data.transfer_kind = \"neighbours\"",
            task.title
        );
    }
    let mut sources = Vec::new();
    for from in &recipe.data.transfer_from {
        let (name, spec) = match from.split_once('=') {
            Some((n, s)) => (n, Some(s)),
            None => (from.as_str(), recipe.data.spec.as_deref()),
        };
        let t =
            Task::find(name).map_err(|e| anyhow::anyhow!("data.transfer_from `{from}`: {e}"))?;
        let split = t.split("train").map_err(anyhow::Error::msg)?;
        let d = data::load(t, spec, split, &Fields::default())
            .with_context(|| format!("data.transfer_from `{from}`"))?;
        sources.extend(d.examples);
    }
    Ok(sources)
}

/// Host labels → class ids or scores on `device`.
fn label_tensors(labels: &[Label], device: &Device) -> (Option<Tensor<1, Int>>, Option<Tensor<1>>) {
    let n = labels.len();
    if let Some(ids) = labels
        .iter()
        .map(|l| l.class().map(|c| c as i64))
        .collect::<Option<Vec<_>>>()
    {
        (
            Some(Tensor::from_data(TensorData::new(ids, [n]), device)),
            None,
        )
    } else {
        let y: Vec<f32> = labels
            .iter()
            .map(|l| l.score().unwrap_or(0.0) as f32)
            .collect();
        (
            None,
            Some(Tensor::from_data(TensorData::new(y, [n]), device)),
        )
    }
}

/// Supervised loss on gold labels: cross-entropy, or MSE for regression.
fn label_loss(model: &SequenceClassifier, batch: &Batch, device: &Device) -> Result<LossTerms> {
    let logits = model.logits(&batch.inputs.to_inputs(device));
    Ok(LossTerms {
        total: gold_loss(logits, batch, device)?,
        parts: vec![],
    })
}

/// Stage 2's loss on one batch: the student's logits against the teacher's (classification, and
/// regression on `regression_target = "teacher"`) or the gold scores, plus `label_weight` times
/// the gold-label term.
fn stage2_loss(
    student_logits: Tensor<2>,
    teacher_logits: impl FnOnce() -> Tensor<2>,
    batch: &Batch,
    regression: bool,
    settings: &StageSettings,
    device: &Device,
) -> Result<LossTerms> {
    let gold = (settings.label_weight > 0.0)
        .then(|| gold_loss(student_logits.clone(), batch, device))
        .transpose()?;
    let main = match (regression, settings.regression_target) {
        (true, RegressionTarget::Gold) => {
            gold_loss(student_logits, batch, device).context("stage 2 fits gold scores")?
        }
        _ => prediction_loss(student_logits, teacher_logits(), regression, settings),
    };
    Ok(match gold {
        Some(g) => LossTerms {
            total: main.clone() + g.clone() * settings.label_weight,
            parts: vec![("distillation_loss", main), ("label_loss", g)],
        },
        None => LossTerms {
            total: main,
            parts: vec![],
        },
    })
}

/// Cross-entropy with the batch's gold classes, or MSE to its gold scores.
fn gold_loss(logits: Tensor<2>, batch: &Batch, device: &Device) -> Result<Tensor<1>> {
    let labels = batch
        .labels
        .as_ref()
        .context("training data has unlabelled examples")?;
    Ok(match label_tensors(labels, device) {
        (Some(ids), _) => crate::loss::cross_entropy(logits, ids),
        (_, Some(y)) => crate::loss::mse(logits, y),
        _ => unreachable!(),
    })
}

/// Training examples the fitted start gathers its statistics on: a seeded sample, in batches of
/// similar length.
fn fitting_batches(train: &Tokenized, seed: u64, device: &Device) -> Vec<Inputs> {
    let lengths = train.lengths();
    let mut idx = fitted::sample(&lengths, seed);
    idx.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    idx.chunks(32)
        .map(|c| train.batch(c).inputs.to_inputs(device))
        .collect()
}

fn fit_record(fit: &fitted::FitReport) -> serde_json::Value {
    let layers: Vec<_> = fit
        .layers
        .iter()
        .map(|l| {
            let mut layer = json!({
                "ffn_mse": l.ffn_mse.map(|(b, a)| [b, a]),
                "flat_neurons": l.flat_neurons,
                "attention_kl": l.attention_kl.map(|(b, a)| [b, a]),
                "alphas": l.alphas,
            });
            if !l.shifts.is_empty() {
                layer["shifts"] = json!(l.shifts);
            }
            layer
        })
        .collect();
    json!({"stage": "fit", "tokens": fit.tokens, "layers": layers})
}

/// `model`'s answers on dev.
fn predict(model: &SequenceClassifier, d: &TaskData, device: &Device) -> Vec<Label> {
    predict_on(model, d.task, &d.dev, device)
}

fn predict_on(
    model: &SequenceClassifier,
    task: &'static Task,
    examples: &Tokenized,
    device: &Device,
) -> Vec<Label> {
    let out = run_model(model, examples, 64, device, "eval");
    let map: Vec<usize> = (0..task.labels.len()).collect();
    predictions(&out, task, &map)
}

/// Scores `model` on dev with the task's metrics.
fn score(model: &SequenceClassifier, d: &TaskData, device: &Device) -> Result<Score> {
    score_on(model, d.task, (&d.dev_set, &d.dev), device)
}

/// Scores `model` on what checkpoints and learning rates are chosen on: the held-out training
/// examples (`data.select_examples`), else dev, as the reference and `run_glue` users choose.
fn selection_score(model: &SequenceClassifier, d: &TaskData, device: &Device) -> Result<Score> {
    match &d.select {
        Some((set, examples)) => score_on(model, d.task, (set, examples), device),
        None => score(model, d, device),
    }
}

fn score_on(
    model: &SequenceClassifier,
    task: &'static Task,
    (set, examples): (&Dataset, &Tokenized),
    device: &Device,
) -> Result<Score> {
    let gold = set
        .labels()
        .with_context(|| format!("{} ({}) is unlabelled", set.split, set.source))?;
    let predicted = predict_on(model, task, examples, device);
    let s = metric::score(task, &gold, &predicted).map_err(anyhow::Error::msg)?;
    let primary = s.get(task.primary).unwrap_or(f64::NAN);
    Ok((primary, s.to_map()))
}

/// The best constant answer's score on dev.
fn trivial(d: &TaskData) -> Result<Baseline> {
    let gold = d.dev_set.labels().context("dev split is unlabelled")?;
    let s = metric::trivial(d.task, &gold).map_err(anyhow::Error::msg)?;
    Ok(Baseline {
        primary: s.get(d.task.primary).unwrap_or(f64::NAN),
        metrics: s.to_map(),
    })
}

fn summary_of(model: &SequenceClassifier, s: &Score) -> ModelSummary {
    ModelSummary {
        approximations: model.config.approx.label(),
        metrics: s.1.clone(),
        primary: s.0,
    }
}

/// Every setting of a resolved recipe by its dotted key (`resolved.stage1.lr`), arrays whole.
fn flat_settings(v: &toml::Value, prefix: &str, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flat_settings(v, &key, out);
            }
        }
        v => {
            out.insert(prefix.to_string(), v.to_string());
        }
    }
}

/// Whether `key` is `section` or lies under it.
fn under(key: &str, section: &str) -> bool {
    key.strip_prefix(section)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// The settings among `relevant` (sections, by dotted key) on which the finished run `src`
/// differs from `recipe`, by dotted key; `relevant` `None` compares all but `free`.
fn settings_differ(
    recipe: &Recipe,
    src: &Path,
    relevant: Option<&[&str]>,
    free: &[&str],
) -> Result<Vec<String>> {
    let path = src.join("recipe.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let theirs: toml::Value =
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
    let ours: toml::Value = toml::from_str(&recipe.resolved_toml())?;
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flat_settings(&theirs, "", &mut a);
    flat_settings(&ours, "", &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    Ok(keys
        .into_iter()
        .filter(|k| relevant.is_none_or(|r| r.iter().any(|s| under(k, s))))
        .filter(|k| !free.iter().any(|s| under(k, s)))
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect())
}

/// The teacher settings (model, data, resolved `finetune`, device, precision) on which the
/// finished run `src` differs from `recipe`: the seed may differ, so students of several seeds
/// learn from one teacher and their spread measures distillation alone.
fn teacher_settings_differ(recipe: &Recipe, src: &Path) -> Result<Vec<String>> {
    let teacher = [
        "teacher.model",
        "teacher.config",
        "resolved.finetune",
        "finetune.lr_grid",
        "data.task",
        "data.spec",
        "data.max_len",
        "data.train_split",
        "data.train_limit",
        "data.train_sample",
        "data.eval_split",
        "data.eval_limit",
        "data.eval_sample",
        "data.select_examples",
        "device",
        "precision",
    ];
    settings_differ(recipe, src, Some(&teacher), &[])
}

/// What a run that takes `src`'s stage 1 (`student.stage1_run`) may set otherwise: stage 2,
/// its name and place, and where the teacher was copied from (the teacher itself is compared
/// through its settings).
const STAGE1_FREE: [&str; 8] = [
    "name",
    "label",
    "output_dir",
    "stage2",
    "resolved.stage2",
    "student.stage1_run",
    "teacher.finetuned_run",
    "teacher.sweep_from",
];

/// Refuses to resume `dir` with settings other than those its work so far ran with: each stage
/// it has logged, and the teacher, data, seed and (once distillation has begun) student they rest
/// on. Stages not begun, the run's name and label, where it lives, the device and `stages`
/// itself may change; so may `teacher.sweep_from`, whose teacher is checked against its record.
/// A distillation stage is compared by its resolved settings alone, so that a recipe spelling
/// out a default does not count as a change.
fn check_resume(recipe: &Recipe, dir: &Path) -> Result<()> {
    let begun = logged_stages(dir)?;
    if begun.is_empty() || !dir.join("recipe.toml").is_file() {
        return Ok(());
    }
    let mut free = vec![
        "name",
        "label",
        "output_dir",
        "device",
        "stages",
        "teacher.sweep_from",
        "stage1",
        "stage2",
        "supervised",
    ];
    if begun.iter().all(|b| b == "finetune") {
        free.push("student");
    }
    if !begun.iter().any(|b| b == "finetune") {
        free.push("finetune");
    }
    for (stage, resolved) in TRAINING_STAGES {
        if !begun.iter().any(|b| b == stage) {
            free.push(resolved);
        }
    }
    let differ = settings_differ(recipe, dir, None, &free)?;
    if !differ.is_empty() {
        bail!(
            "--resume {}: it ran with other values of {} (stages begun: {}); resume with the settings in its recipe.toml, or start another run (--set name=...)",
            dir.display(),
            differ.join(", "),
            begun.join(", ")
        );
    }
    Ok(())
}

/// Each training stage's name in the metrics log, and its resolved settings in `recipe.toml`.
const TRAINING_STAGES: [(&str, &str); 4] = [
    ("finetune", "resolved.finetune"),
    ("stage1", "resolved.stage1"),
    ("stage2", "resolved.stage2"),
    ("supervised", "resolved.supervised"),
];

/// The training stages `dir`'s metrics log has a record of, in the order first logged.
fn logged_stages(dir: &Path) -> Result<Vec<String>> {
    let log = dir.join("metrics.jsonl");
    if !log.exists() {
        return Ok(Vec::new());
    }
    let text =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let mut begun: Vec<String> = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(stage) = v["stage"].as_str()
            && TRAINING_STAGES.iter().any(|(s, _)| *s == stage)
            && !begun.iter().any(|b| b == stage)
        {
            begun.push(stage.to_string());
        }
    }
    Ok(begun)
}

/// `recipe` with the teacher's origin of `src`, whose finished stage 1 it takes
/// (`student.stage1_run`), after checking that `src` ran stage 1 as `recipe` would. The origin
/// is `src`'s own `teacher.finetuned_run` (or `src`, when it fine-tuned), so that the report
/// credits the teacher's fine-tuning to the run that did it.
fn with_stage1_of(recipe: &Recipe, src: &Path) -> Result<Recipe> {
    let differ = settings_differ(recipe, src, None, &STAGE1_FREE)?;
    if !differ.is_empty() {
        bail!(
            "student.stage1_run {}: its stage 1 ran with other settings ({}); run stage 1 here instead",
            src.display(),
            differ.join(", ")
        );
    }
    let log = src.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let finished = text.lines().any(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .is_ok_and(|v| v["stage"] == "stage1" && v["done"] == true)
    });
    if !finished {
        bail!(
            "student.stage1_run {}: its stage 1 has not finished (no `done` record in {})",
            src.display(),
            log.display()
        );
    }
    let theirs: toml::Value = toml::from_str(&std::fs::read_to_string(src.join("recipe.toml"))?)?;
    let origin = theirs
        .get("teacher")
        .and_then(|t| t.get("finetuned_run"))
        .and_then(|r| r.as_str())
        .map_or_else(|| src.to_path_buf(), PathBuf::from);
    if let Some(ours) = &recipe.teacher.finetuned_run
        && *ours != origin
    {
        bail!(
            "student.stage1_run {}: its teacher came from {}, not from teacher.finetuned_run {}; drop teacher.finetuned_run",
            src.display(),
            origin.display(),
            ours.display()
        );
    }
    let mut r = recipe.clone();
    r.teacher.finetuned_run = Some(origin);
    Ok(r)
}

/// Copies the fine-tuned teacher of the finished run `src` into `teacher_dir`, after checking
/// that `src` fine-tuned it as `recipe` would ([`teacher_settings_differ`]).
fn reuse_teacher(recipe: &Recipe, src: &Path, teacher_dir: &Path) -> Result<()> {
    let differ = teacher_settings_differ(recipe, src)?;
    if !differ.is_empty() {
        bail!(
            "teacher.finetuned_run {}: its teacher was made with other settings ({}); fine-tune here instead",
            src.display(),
            differ.join(", ")
        );
    }
    let from = src.join("teacher");
    if !from.join("model.safetensors").is_file() {
        bail!(
            "{}: no fine-tuned teacher (model.safetensors) there",
            from.display()
        );
    }
    std::fs::create_dir_all(teacher_dir)
        .with_context(|| format!("creating {}", teacher_dir.display()))?;
    for entry in std::fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let bytes = std::fs::read(entry.path())
                .with_context(|| format!("reading {}", entry.path().display()))?;
            write_atomic(&teacher_dir.join(entry.file_name()), &bytes)?;
        }
    }
    Ok(())
}

/// Copies the last checkpoint of `src`'s stage 1 into `stage_dir` (unless a resumed run has
/// one there already), where stage 1 then resumes at its end.
fn adopt_stage1(src: &Path, stage_dir: &Path, log: &mut MetricsLog) -> Result<()> {
    let ours = Checkpoints {
        dir: stage_dir.to_path_buf(),
        keep: 2,
    };
    if ours.latest().is_some() {
        return Ok(());
    }
    let theirs = Checkpoints {
        dir: src.join(StageKind::Stage1.name()),
        keep: 2,
    };
    let last = theirs.latest().with_context(|| {
        format!(
            "student.stage1_run {}: no stage-1 checkpoint in {}",
            src.display(),
            theirs.dir.display()
        )
    })?;
    ours.adopt(&last)?;
    log.write(json!({"stage": "stage1", "reused_from": src}))?;
    eprintln!("stage1: the student of {} after its stage 1", src.display());
    Ok(())
}

/// What every part of a run needs: its recipe, directory, devices and data.
struct RunContext<'a> {
    recipe: &'a Recipe,
    dir: PathBuf,
    /// Evaluation and the frozen teacher run here; training on its autodiff twin `ad`.
    device: Device,
    ad: Device,
    data: TaskData,
    resume: bool,
}

impl RunContext<'_> {
    fn stage(&self, kind: StageKind) -> Stage<'_> {
        let (recipe, d) = (self.recipe, &self.data);
        Stage {
            kind,
            settings: recipe.stage(kind),
            dir: self.dir.join(kind.name()),
            train: match &d.augmented {
                Some(t) if recipe.data.transfer_stages().contains(&kind) => t,
                _ => &d.train,
            },
            seed: recipe.seed,
            device: self.ad.clone(),
            precision: recipe.precision,
            // A stage 1 taken from another run continues from its last checkpoint: its end.
            resume: self.resume
                || (kind == StageKind::Stage1 && recipe.student.stage1_run.is_some()),
            tag: None,
            held_out: d.select.is_some(),
        }
    }
}

impl TaskData {
    /// The recipe's splits, tokenised once, and its transfer examples (which `teacher` labels).
    fn load(
        recipe: &Recipe,
        task: &'static Task,
        (teacher, tok_dir): (&SequenceClassifier, &Path),
        device: &Device,
    ) -> Result<TaskData> {
        let max_len = recipe.data.max_len.unwrap_or(task.max_len);
        let tokenizer = TextTokenizer::from_dir(tok_dir, max_len)?;
        let spec = recipe.data.spec.as_deref();
        let mut train_set = load_split(
            task,
            spec,
            &recipe.data.train_split,
            (recipe.data.train_limit, recipe.data.train_sample),
        )?;
        let select_set = match recipe.data.select_examples {
            Some(n) if n == 0 || n >= train_set.len() => bail!(
                "data.select_examples = {n}: hold out at least 1 and fewer than the {} training examples of {} ({})",
                train_set.len(),
                task.title,
                train_set.source
            ),
            Some(n) => Some(train_set.hold_out(n)),
            None => None,
        };
        let dev_set = load_split(
            task,
            spec,
            &recipe.data.eval_split,
            (recipe.data.eval_limit, recipe.data.eval_sample),
        )?;
        let pad = recipe
            .data
            .pad_to_multiple_of
            .unwrap_or_else(|| crate::device::default_pad_multiple(device, max_len));
        let tokenize = |set: &Dataset| -> Result<Tokenized> {
            let t = Tokenized::new(set, &tokenizer).map_err(anyhow::Error::msg)?;
            Ok(t.pad_to_multiple_of(pad))
        };
        let augmented = match transfer_set(recipe, task, &train_set, (teacher, &tokenizer))? {
            Some(t) => Some(tokenize(&t)?),
            None => None,
        };
        let d = TaskData {
            task,
            augmented,
            train: tokenize(&train_set)?,
            dev: tokenize(&dev_set)?,
            dev_set,
            select: match select_set {
                Some(s) => {
                    let t = tokenize(&s)?;
                    Some((s, t))
                }
                None => None,
            },
        };
        let held_out = match &d.select {
            Some((s, _)) => format!(" ({} more held out to choose on)", s.len()),
            None => String::new(),
        };
        eprintln!(
            "{}: {} train{held_out} / {} dev examples of {}, max length {max_len}, batches padded to a multiple of {pad}",
            recipe.name,
            d.train.len(),
            d.dev.len(),
            task.title
        );
        Ok(d)
    }
}

/// Runs `recipe`; with `resume`, continues each stage from its last checkpoint and skips stages
/// already finished.
pub fn run(recipe: &Recipe, resume: bool) -> Result<Summary> {
    let with_source;
    let recipe = match &recipe.student.stage1_run {
        Some(src) => {
            with_source = with_stage1_of(recipe, src)?;
            &with_source
        }
        None => recipe,
    };
    let dir = recipe.output_dir.join(&recipe.name);
    if dir.join("metrics.jsonl").exists() && !resume {
        bail!(
            "{} already holds a run: pass --resume to continue it, or choose another name (--set name=...)",
            dir.display()
        );
    }
    if resume {
        check_resume(recipe, &dir)?;
    }
    // Before the run directory exists: a device that is not there (a build without the backend,
    // no driver) or a precision it refuses must not leave a run behind that only --resume gets
    // past.
    let device = recipe.device.device()?;
    recipe.precision.check(&device)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = crate::io::lock_dir(&dir)?;
    write_atomic(&dir.join("recipe.toml"), recipe.resolved_toml().as_bytes())?;
    let mut log = MetricsLog::open(&dir.join("metrics.jsonl"))?;
    let ad = device.clone().autodiff();
    device.seed(recipe.seed);
    ad.seed(recipe.seed);

    let task = Task::find(&recipe.data.task).map_err(anyhow::Error::msg)?;
    let (pretrained, tok_dir) = load_teacher(recipe, task, &ad)?;
    let data = TaskData::load(recipe, task, (&pretrained, &tok_dir), &device)?;
    let cx = RunContext {
        recipe,
        dir,
        device,
        ad,
        data,
        resume,
    };
    let mut walls = BTreeMap::new();

    // 1. The teacher.
    let teacher = if recipe.stages.contains(&StageKind::Finetune) {
        let t0 = Instant::now();
        let t = finetuned_teacher(&cx, pretrained, &tok_dir, &mut log)?;
        walls.insert("finetune".to_string(), t0.elapsed().as_secs_f64());
        t
    } else {
        pretrained
    };
    let teacher_plain = teacher.valid();
    let teacher_score = score(&teacher_plain, &cx.data, &cx.device)?;
    log.write(json!({"stage": "teacher", "eval": teacher_score.1}))?;
    eprintln!(
        "teacher ({}): {:?}",
        teacher_plain.config.approx.label(),
        teacher_score.1
    );

    // 2. The student.
    let distilling = recipe.stages.iter().any(|k| {
        matches!(
            k,
            StageKind::Stage1 | StageKind::Stage2 | StageKind::Supervised
        )
    });
    let (student, agreement) = if distilling {
        let (s, a) = distil(&cx, &teacher, &tok_dir, &mut log, &mut walls)?;
        (Some(s), Some(a))
    } else {
        (None, None)
    };
    let summary = Summary {
        name: recipe.name.clone(),
        task: task.name.to_string(),
        seed: recipe.seed,
        recipe_hash: recipe.hash(),
        retention: student.as_ref().map(|s| s.primary / teacher_score.0),
        teacher: summary_of(&teacher_plain, &teacher_score),
        student,
        trivial: trivial(&cx.data)?,
        agreement,
        teacher_grid: grid_from_log(&log.path)?,
        stage_wall_s: walls,
        train_examples: cx.data.train.len(),
        eval_examples: cx.data.dev.len(),
        held_out_examples: cx.data.select.as_ref().map(|(s, _)| s.len()),
    };
    write_atomic(
        &cx.dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

/// The run's teacher: loaded when a resumed run fine-tuned it already, copied from the run named
/// by `student.stage1_run` or `teacher.finetuned_run`, or fine-tuned from `pretrained` and saved.
fn finetuned_teacher(
    cx: &RunContext,
    pretrained: SequenceClassifier,
    tok_dir: &Path,
    log: &mut MetricsLog,
) -> Result<SequenceClassifier> {
    let recipe = cx.recipe;
    let teacher_dir = cx.dir.join("teacher");
    let load = || -> Result<SequenceClassifier> {
        let dir = teacher_dir.to_string_lossy();
        Ok(load_pretrained(&dir, &Overrides::default(), &cx.ad)?.model)
    };
    if cx.resume && teacher_dir.join("model.safetensors").is_file() {
        eprintln!("finetune: done earlier, loaded {}", teacher_dir.display());
        return load();
    }
    let source = recipe.student.stage1_run.as_ref();
    if let Some(src) = source.or(recipe.teacher.finetuned_run.as_ref()) {
        reuse_teacher(recipe, src, &teacher_dir)?;
        log.write(json!({"stage": "finetune", "reused_from": src}))?;
        eprintln!("finetune: the teacher of {} (same settings)", src.display());
        return load();
    }
    let stage = cx.stage(StageKind::Finetune);
    let t = finetune(recipe, pretrained, stage, log, &cx.data, &cx.device)?;
    t.valid().save_pretrained(&teacher_dir, Some(tok_dir))?;
    Ok(t)
}

/// The teacher as the distillation stages query it: without gradients and (unlike the
/// reference) without dropout, on the plain device, where no autodiff bookkeeping happens and
/// its forward runs as two half-batches side by side (`forward_threaded`). Dropout needs the
/// autodiff device (`teacher.dropout_during_distill`, the reference's fault). Its Linear layers
/// run in the student's precision, cast once here (the losses take its outputs in f32).
struct FrozenTeacher {
    model: SequenceClassifier,
    device: Device,
    threads: usize,
    /// Where the student trains, and the teacher's outputs go.
    ad: Device,
}

impl FrozenTeacher {
    fn new(cx: &RunContext, teacher: &SequenceClassifier) -> Self {
        let recipe = cx.recipe;
        let (model, device) = if recipe.teacher.dropout_during_distill {
            (
                with_dropout_config(teacher.clone().no_grad()),
                cx.ad.clone(),
            )
        } else {
            let plain = teacher.clone().valid();
            let model = SequenceClassifier {
                config: plain.config.clone().without_dropout(),
                ..plain
            };
            (model, cx.device.clone())
        };
        Self {
            model: recipe.precision.compute_copy(&model),
            threads: crate::model::bert::inference_threads(&device),
            device,
            ad: cx.ad.clone(),
        }
    }

    fn forward(&self, b: &Batch, capture: Capture) -> ClassifierOutput {
        let inputs = b.inputs.to_inputs(&self.device);
        self.model
            .forward_threaded(&inputs, capture, self.threads)
            .to_device(&self.ad)
    }

    fn logits(&self, b: &Batch) -> Tensor<2> {
        let inputs = b.inputs.to_inputs(&self.device);
        self.model
            .logits_threaded(&inputs, self.threads)
            .to_device(&self.ad)
    }
}

/// Stage 1's loss: hidden states and attention against the teacher's, plus the weighted logit
/// term when `stage1.prediction_weight` joins stage 2's objective in.
fn stage1_loss(
    m: &Student,
    b: &Batch,
    teacher: &FrozenTeacher,
    settings: &StageSettings,
    regression: bool,
) -> Result<LossTerms> {
    let inputs = b.inputs.to_inputs(&teacher.ad);
    let capture = stage1_capture(settings);
    let t = teacher.forward(b, capture);
    let s = m.model.forward(&inputs, capture);
    let mask = inputs.attention_mask.clone().float();
    let (total, att, hid) = intermediate_loss(m, &s, &t, mask, settings);
    let mut parts = vec![("attention_loss", att), ("hidden_loss", hid)];
    if settings.prediction_weight == 0.0 {
        return Ok(LossTerms { total, parts });
    }
    let p = prediction_loss(s.logits, t.logits, regression, settings);
    parts.push(("prediction_loss", p.clone()));
    Ok(LossTerms {
        total: total + p * settings.prediction_weight,
        parts,
    })
}

/// The student from `init_student`, refitted to the teacher when `student.init = "fitted"`.
fn initial_student(
    cx: &RunContext,
    teacher: &SequenceClassifier,
    log: &mut MetricsLog,
    walls: &mut BTreeMap<String, f64>,
) -> Result<Student> {
    let recipe = cx.recipe;
    cx.ad.seed(recipe.seed);
    let (mut student, report) = init_student(teacher, &recipe.student, &cx.ad)?;
    if let Some(r) = report {
        eprintln!("student from teacher: {r}");
    }
    if recipe.student.init == StudentInit::Fitted {
        let t0 = Instant::now();
        let batches = fitting_batches(&cx.data.train, recipe.seed, &cx.device);
        let options = fitted::FitOptions {
            key_shift: recipe.student.fit_shift,
        };
        let (model, fit) = fitted::refit(student.model, &teacher.valid(), &batches, options)?;
        let seconds = t0.elapsed().as_secs_f64();
        eprintln!("{fit}\n  ({seconds:.1} s)");
        walls.insert("fit".to_string(), seconds);
        let mut record = fit_record(&fit);
        record["seconds"] = json!(seconds);
        log.write(record)?;
        student.model = model;
    }
    Ok(student)
}

/// Runs the recipe's student stages, saves the student, and returns its summary and its
/// agreement with the teacher on dev.
fn distil(
    cx: &RunContext,
    teacher: &SequenceClassifier,
    tok_dir: &Path,
    log: &mut MetricsLog,
    walls: &mut BTreeMap<String, f64>,
) -> Result<(ModelSummary, f64)> {
    let (recipe, d, device) = (cx.recipe, &cx.data, &cx.device);
    let mut student = initial_student(cx, teacher, log, walls)?;
    let frozen = FrozenTeacher::new(cx, teacher);
    if let Some(src) = &recipe.student.stage1_run {
        adopt_stage1(src, &cx.dir.join(StageKind::Stage1.name()), log)?;
    }
    let regression = d.task.is_regression();
    let mut last = None;
    for &kind in recipe.stages.iter().filter(|k| **k != StageKind::Finetune) {
        let st = cx.stage(kind);
        let settings = st.settings.clone();
        let t0 = Instant::now();
        let eval = |m: &Student| selection_score(&m.model, d, device);
        let (s, best) = match kind {
            StageKind::Stage1 => st.fit(
                student,
                log,
                |m: &Student, b: &Batch| stage1_loss(m, b, &frozen, &settings, regression),
                eval,
            )?,
            StageKind::Stage2 => st.fit(
                student,
                log,
                |m: &Student, b: &Batch| {
                    let s = m.model.logits(&b.inputs.to_inputs(&cx.ad));
                    stage2_loss(s, || frozen.logits(b), b, regression, &settings, &cx.ad)
                },
                eval,
            )?,
            StageKind::Supervised => st.fit(
                student,
                log,
                |m: &Student, b: &Batch| label_loss(&m.model, b, &cx.ad),
                eval,
            )?,
            StageKind::Finetune => unreachable!(),
        };
        walls.insert(kind.name().to_string(), t0.elapsed().as_secs_f64());
        student = s;
        last = best;
    }
    let student_plain = student.model.valid();
    student_plain.save_pretrained(&cx.dir.join("student"), Some(tok_dir))?;
    // A score chosen on held-out examples is not the dev score.
    let s = match last {
        Some(s) if d.select.is_none() => s,
        _ => score(&student_plain, d, device)?,
    };
    log.write(json!({"stage": "student", "eval": s.1}))?;
    eprintln!(
        "student ({}): {:?}",
        student_plain.config.approx.label(),
        s.1
    );
    let (t, p) = (
        predict(&teacher.valid(), d, device),
        predict(&student_plain, d, device),
    );
    let agreement = metric::agreement(&t, &p).map_err(anyhow::Error::msg)?;
    Ok((summary_of(&student_plain, &s), agreement))
}

/// Fine-tunes the teacher, at `finetune.lr` or at each learning rate of `finetune.lr_grid` —
/// each from the same pretrained weights and head, in `finetune/lr-<lr>/` — and returns the best
/// on dev. Each point of a sweep is logged (`grid_lr`). With `teacher.sweep_from`, the recorded
/// best point runs first and, if it reproduces, the others are taken from the record.
fn finetune(
    recipe: &Recipe,
    pretrained: SequenceClassifier,
    stage: Stage,
    log: &mut MetricsLog,
    d: &TaskData,
    device: &Device,
) -> Result<SequenceClassifier> {
    let fit = |model: SequenceClassifier, st: &Stage, log: &mut MetricsLog| {
        st.fit(
            model,
            log,
            |m, b| label_loss(m, b, &st.device),
            |m| selection_score(m, d, device),
        )
    };
    let Some(mut grid) = recipe.finetune.lr_grid.clone() else {
        return Ok(fit(pretrained, &stage, log)?.0);
    };
    let record = |lr: f64, s: &Score| {
        let mut r = json!({"stage": "finetune", "grid_lr": lr, "primary": s.0, "eval": s.1});
        if d.select.is_some() {
            r["on"] = "held-out".into();
        }
        r
    };
    let recorded = match &recipe.teacher.sweep_from {
        Some(src) => recorded_sweep(recipe, src, &grid)?,
        None => Vec::new(),
    };
    // The sweep kept the first of tied points (`>` below); `max_by` keeps the last.
    let recorded_best = recorded
        .iter()
        .rev()
        .max_by(|a, b| a.primary.total_cmp(&b.primary))
        .cloned();
    if let Some(b) = &recorded_best {
        grid.sort_by_key(|lr| *lr != b.lr);
    }
    let mut best: Option<(SequenceClassifier, f64)> = None;
    let mut reproduced = false;
    for lr in grid {
        if reproduced {
            let p = recorded.iter().find(|p| p.lr == lr).expect("checked");
            log.write(
                json!({"stage": "finetune", "grid_lr": lr, "primary": p.primary,
                "eval": p.metrics, "recorded_in": recipe.teacher.sweep_from}),
            )?;
            continue;
        }
        let (model, s) = fit(pretrained.clone(), &grid_point(&stage, lr), log)?;
        let s = match s {
            Some(s) => s,
            None => selection_score(&model.valid(), d, device)?,
        };
        log.write(record(lr, &s))?;
        let on = if d.select.is_some() {
            " (held out)"
        } else {
            ""
        };
        eprintln!(
            "finetune lr={lr:e}: {}{on} {:.4}",
            d.task.primary.name(),
            s.0
        );
        if let Some(b) = recorded_best.as_ref().filter(|b| b.lr == lr) {
            reproduced = check_reproduced(b, s.0, d.task, log)?;
        }
        if best.as_ref().is_none_or(|(_, b)| s.0 > *b) {
            best = Some((model, s.0));
        }
    }
    let (model, _) = best.expect("lr_grid is checked non-empty");
    Ok(model)
}

/// The fine-tuning stage at one learning rate of its sweep, in its own directory.
fn grid_point<'a>(stage: &Stage<'a>, lr: f64) -> Stage<'a> {
    Stage {
        kind: stage.kind,
        settings: StageSettings {
            lr,
            ..stage.settings.clone()
        },
        dir: stage.dir.join(format!("lr-{lr:e}")),
        train: stage.train,
        seed: stage.seed,
        device: stage.device.clone(),
        precision: stage.precision,
        resume: stage.resume,
        tag: Some(format!("lr={lr:e}")),
        held_out: stage.held_out,
    }
}

/// How far a remade teacher's dev score may lie from the recorded one and still be the same
/// teacher. A discrete metric (accuracy, F1, MCC) comes out exactly; a correlation can move in
/// its eighth digit when a kernel sums in another order (STS-B's remade teacher: 0.85681752 vs
/// 0.85681753 on the same best step), which is no reason to sweep again for 40 minutes. A
/// different teacher moves it by far more than this.
const SWEEP_TOLERANCE: f64 = 1e-6;

fn reproduces(recorded: f64, got: f64) -> bool {
    (got - recorded).abs() <= SWEEP_TOLERANCE
}

/// Whether the recorded sweep's best point came out again (then the other points are taken from
/// the record); logged either way, with both scores.
fn check_reproduced(
    recorded: &GridPoint,
    got: f64,
    task: &Task,
    log: &mut MetricsLog,
) -> Result<bool> {
    let (lr, metric) = (recorded.lr, task.primary.name());
    let reproduced = reproduces(recorded.primary, got);
    log.write(json!({"stage": "finetune", "sweep_reproduced": reproduced,
        "recorded": recorded.primary, "got": got}))?;
    if reproduced {
        eprintln!(
            "teacher.sweep_from: lr={lr:e} reproduced the recorded {metric} {got}; the other points are taken from the record"
        );
    } else {
        eprintln!(
            "teacher.sweep_from: lr={lr:e} gave {metric} {got} where the sweep recorded {}; running the rest of the sweep",
            recorded.primary
        );
    }
    Ok(reproduced)
}

/// The sweep recorded in `src/summary.json`, after checking that `src` fine-tuned with this
/// recipe's teacher settings and swept exactly `grid`.
fn recorded_sweep(recipe: &Recipe, src: &Path, grid: &[f64]) -> Result<Vec<GridPoint>> {
    let differ = teacher_settings_differ(recipe, src)?;
    if !differ.is_empty() {
        bail!(
            "teacher.sweep_from {}: its sweep ran with other settings ({})",
            src.display(),
            differ.join(", ")
        );
    }
    let path = src.join("summary.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let points: Vec<GridPoint> = serde_json::from_value(v["teacher_grid"].clone())
        .with_context(|| format!("{}: teacher_grid", path.display()))?;
    let mut theirs: Vec<f64> = points.iter().map(|p| p.lr).collect();
    let mut ours = grid.to_vec();
    theirs.sort_by(f64::total_cmp);
    ours.sort_by(f64::total_cmp);
    if theirs != ours {
        bail!(
            "{}: teacher_grid swept {theirs:?}, this recipe's finetune.lr_grid is {ours:?}",
            path.display()
        );
    }
    Ok(points)
}

/// The sweep's points from the run's log (the last record per learning rate: a resumed run
/// re-scores each point), so a run resumed after its sweep still reports it.
fn grid_from_log(path: &Path) -> Result<Vec<GridPoint>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut points: Vec<GridPoint> = Vec::new();
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let (Some(lr), Some(primary)) = (v["grid_lr"].as_f64(), v["primary"].as_f64()) else {
            continue;
        };
        let metrics = v["eval"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, x)| Some((k.clone(), x.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        points.retain(|p| p.lr != lr);
        points.push(GridPoint {
            lr,
            primary,
            metrics,
        });
    }
    Ok(points)
}

/// Dropout modules keep the probabilities they were built with; a config change alone does not
/// reach them, so rebuild the frozen teacher's dropout from its config.
fn with_dropout_config(m: SequenceClassifier) -> SequenceClassifier {
    let c = m.config.clone();
    let mut m = m;
    let p = c.hidden_dropout_prob;
    let a = c.attention_probs_dropout_prob;
    let drop = crate::model::dropout::Dropout::new;
    m.bert.embeddings.dropout = drop(p);
    for l in &mut m.bert.encoder.layer {
        l.attention.self_attn.dropout = drop(a);
        l.attention.output.dropout = drop(p);
        l.output.dropout = drop(p);
    }
    m.classifier.dropout = drop(c.classifier_dropout.unwrap_or(p));
    m
}

/// The teacher: a checkpoint (head sized for the task), or a fresh model of a config file.
fn load_teacher(
    recipe: &Recipe,
    task: &'static Task,
    device: &Device,
) -> Result<(SequenceClassifier, PathBuf)> {
    let (labels, regression) = task.head_labels();
    let t = &recipe.teacher;
    if let Some(cfg) = &t.config {
        let config = ModelConfig::from_file(cfg)?.with_labels(labels, regression);
        device.seed(recipe.seed);
        let tok = t
            .tokenizer
            .clone()
            .context("teacher.config needs teacher.tokenizer")?;
        return Ok((config.init(device), resolve_dir(&tok)?));
    }
    let overrides = Overrides {
        labels: Some((labels, regression)),
        load: model::LoadOptions {
            reinit_mismatched_head: true,
        },
        ..Overrides::default()
    };
    device.seed(recipe.seed);
    let spec = t.model.as_deref().context("teacher.model is not set")?;
    let pre = load_pretrained(spec, &overrides, device)?;
    if !pre.report.initialised.is_empty() || !pre.report.reinitialised.is_empty() {
        eprintln!("teacher: {}", pre.report);
        if !recipe.stages.contains(&StageKind::Finetune) {
            bail!(
                "teacher `{}` has no trained head for {} ({}) and the recipe does not fine-tune it: add \"finetune\" to stages",
                spec,
                task.title,
                pre.report
            );
        }
    }
    let tok = match &t.tokenizer {
        Some(s) => resolve_dir(s)?,
        None => pre.dir.clone(),
    };
    Ok((pre.model, tok))
}

fn resolve_dir(spec: &str) -> Result<PathBuf> {
    Ok(crate::hub::model_dir(spec)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::HostBatch;
    use crate::train::recipe::StageConfig;

    #[test]
    fn a_remade_teacher_reproduces_within_the_tolerance_and_not_beyond() {
        // STS-B's seed-42 teacher, recorded and remade at lr 1e-4 on 2026-12-03.
        assert!(reproduces(0.8568175152948945, 0.8568175258058881));
        assert!(reproduces(0.6028880866425993, 0.6028880866425993));
        // One RTE dev pair more or less is 1/277.
        assert!(!reproduces(
            0.6028880866425993,
            0.6028880866425993 + 1.0 / 277.0
        ));
        assert!(!reproduces(0.5, 0.5 + 2.0 * SWEEP_TOLERANCE));
    }

    fn labelled(classes: &[usize]) -> Batch {
        Batch {
            indices: vec![],
            inputs: HostBatch {
                input_ids: vec![],
                attention_mask: vec![],
                token_type_ids: vec![],
                batch: 0,
                seq: 0,
            },
            labels: Some(classes.iter().map(|&c| Label::Class(c)).collect()),
        }
    }

    #[test]
    fn stage2_adds_the_weighted_gold_cross_entropy() {
        let device = Device::default();
        let tensor =
            |v: [f32; 4]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [2, 2]), &device);
        let (s, t) = ([2.0f32, 0.0, 0.0, 1.0], [0.0f32, 1.0, 1.0, 0.0]);
        let mut settings = StageConfig::default().resolve(StageKind::Stage2, "rte");
        let value = |x: Tensor<1>| x.into_scalar::<f32>() as f64;
        let teacher_term = value(prediction_loss(tensor(s), tensor(t), false, &settings));
        let plain = stage2_loss(
            tensor(s),
            || tensor(t),
            &labelled(&[0, 0]),
            false,
            &settings,
            &device,
        )
        .unwrap();
        assert!((value(plain.total) - teacher_term).abs() < 1e-6);
        assert!(plain.parts.is_empty());
        // Gold class 0 for both rows: −log softmax([2, 0])₀ and −log softmax([0, 1])₀.
        let gold = ((1.0 + (-2.0f64).exp()).ln() + (1.0 + 1.0f64.exp()).ln()) / 2.0;
        settings.label_weight = 0.5;
        let mixed = stage2_loss(
            tensor(s),
            || tensor(t),
            &labelled(&[0, 0]),
            false,
            &settings,
            &device,
        )
        .unwrap();
        assert!((value(mixed.total) - (teacher_term + 0.5 * gold)).abs() < 1e-5);
        let names: Vec<&str> = mixed.parts.iter().map(|p| p.0).collect();
        assert_eq!(names, ["distillation_loss", "label_loss"]);
        // An unlabelled batch cannot feed the label term.
        let mut unlabelled = labelled(&[0, 0]);
        unlabelled.labels = None;
        assert!(
            stage2_loss(
                tensor(s),
                || tensor(t),
                &unlabelled,
                false,
                &settings,
                &device
            )
            .is_err()
        );
    }
}
