//! Evaluation: run a checkpoint over a split (batches sorted by length, results back in dataset
//! order), score it with the task's official metrics, print tables, and write GLUE submission
//! files for test splits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::data::{self, Dataset, Fields, Label, Order, Task, Tokenized};
use crate::device::default_pad_multiple;
use crate::metric::{self, GlueAverage, Scores};
use crate::model::{Arch, ModelConfig, Overrides, SequenceClassifier, load_pretrained};
use crate::tokenize::TextTokenizer;

/// The model's outputs for every example, in dataset order.
#[derive(Clone, Debug)]
pub struct Outputs {
    /// `[n, num_outputs]` row-major.
    pub logits: Vec<f32>,
    pub num_outputs: usize,
    /// Wall time of the forward passes.
    pub seconds: f64,
}

impl Outputs {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.num_outputs..(i + 1) * self.num_outputs]
    }

    pub fn examples_per_sec(&self) -> f64 {
        let n = self.logits.len() / self.num_outputs.max(1);
        n as f64 / self.seconds.max(1e-9)
    }
}

/// Runs `model` over all of `data`, `batch_size` examples at a time, longest batches first;
/// `title` labels the progress bar.
pub fn run_model(
    model: &SequenceClassifier,
    data: &Tokenized,
    batch_size: usize,
    device: &Device,
    title: &str,
) -> Outputs {
    let k = model.config.num_labels;
    let n = data.len();
    let mut logits = vec![0f32; n * k];
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} {bar:30} {pos}/{len} examples, {per_sec} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
    );
    bar.set_message(title.to_string());
    let threads = crate::model::bert::inference_threads(device);
    let start = Instant::now();
    for idx in data.plan(batch_size, Order::ByLength, false) {
        let batch = data.batch(&idx);
        let out = model.logits_threaded(&batch.inputs.to_inputs(device), threads);
        let values: Vec<f32> = out
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("float logits");
        for (r, &i) in idx.iter().enumerate() {
            logits[i * k..(i + 1) * k].copy_from_slice(&values[r * k..(r + 1) * k]);
        }
        bar.inc(idx.len() as u64);
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Outputs {
        logits,
        num_outputs: k,
        seconds,
    }
}

/// For each model output, the task label it stands for. A head whose label names are the
/// task's in another order (an MNLI model trained on the Hub's order) is mapped by name;
/// otherwise outputs are taken in the task's order.
pub fn label_map(model_labels: &[String], task: &Task) -> Vec<usize> {
    let identity: Vec<usize> = (0..task.labels.len()).collect();
    if model_labels.len() != task.labels.len() {
        return identity;
    }
    let mapped: Option<Vec<usize>> = model_labels
        .iter()
        .map(|m| {
            task.labels
                .iter()
                .position(|t| t.eq_ignore_ascii_case(m.trim()))
        })
        .collect();
    match mapped {
        Some(m)
            if {
                let mut s = m.clone();
                s.sort();
                s == identity
            } =>
        {
            m
        }
        _ => identity,
    }
}

/// Predicted labels: the arg-max class (through `map`), or the score for regression.
pub fn predictions(outputs: &Outputs, task: &Task, map: &[usize]) -> Vec<Label> {
    let n = outputs.logits.len() / outputs.num_outputs.max(1);
    (0..n)
        .map(|i| {
            let row = outputs.row(i);
            if task.is_regression() {
                Label::Score(row[0] as f64)
            } else {
                let best = row
                    .iter()
                    .enumerate()
                    .fold(0, |b, (j, v)| if *v > row[b] { j } else { b });
                Label::Class(map.get(best).copied().unwrap_or(best))
            }
        })
        .collect()
}

/// One evaluated split, as written to JSON.
#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    #[serde(skip)]
    pub task_ref: &'static Task,
    pub task: String,
    pub split: String,
    pub n: usize,
    pub metrics: BTreeMap<String, f64>,
    pub examples_per_sec: f64,
    #[serde(skip)]
    pub scores: Scores,
}

/// What `eval` and `predict` share: the checkpoint, how to load it, and how to run it.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Model directory or Hub id; `{task}` is replaced by the task's name (one checkpoint per
    /// task, e.g. `checkpoints/{task}/best`).
    pub model: String,
    /// Approximations (`act`, `attn`, `layers`); dropout is always off.
    pub overrides: Overrides,
    /// Run a model whose classification head is not in the checkpoint (random predictions).
    pub allow_random_head: bool,
    pub batch_size: usize,
    /// Default: the task's (128; IMDb 512), capped at the model's positions.
    pub max_len: Option<usize>,
    /// Data spec (see [`crate::data`]); `None`: the task's Hub dataset.
    pub data: Option<String>,
    /// Keep this many examples of each split, drawn as [`data::Dataset::sample`] draws.
    pub sample: Option<usize>,
    pub fields: Fields,
    pub device: Device,
}

/// A checkpoint loaded for a task.
pub struct TaskModel {
    pub model: SequenceClassifier,
    pub tokenizer: TextTokenizer,
    /// Model output → task label.
    pub label_map: Vec<usize>,
    /// Head parameters left random (only with `allow_random_head`).
    pub random_head: Vec<String>,
}

/// Loads the checkpoint for `task`. A checkpoint without a head for the task (none, or one of
/// another size) is refused unless `allow_random_head`, as its predictions would be random.
pub fn load_for_task(setup: &Setup, task: &'static Task) -> Result<TaskModel> {
    let spec = setup.model.replace("{task}", task.name);
    let dir = crate::hub::model_dir(&spec)?;
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let fits =
        config.num_labels == task.num_outputs() && config.is_regression() == task.is_regression();
    let mut overrides = Overrides {
        no_dropout: true,
        ..setup.overrides.clone()
    };
    if !fits {
        overrides.labels = Some(task.head_labels());
        overrides.load.reinit_mismatched_head = true;
    }
    setup.device.seed(0);
    let pre = load_pretrained(&dir.to_string_lossy(), &overrides, &setup.device)
        .with_context(|| format!("loading {spec}"))?;
    let random_head: Vec<String> = pre
        .report
        .initialised
        .iter()
        .chain(&pre.report.reinitialised)
        .cloned()
        .collect();
    if !random_head.is_empty() && !setup.allow_random_head {
        let why = if pre.report.reinitialised.is_empty() {
            "has no classification head".to_string()
        } else {
            format!(
                "has a classification head with {} output(s), but {} needs {}",
                config.num_labels,
                task.title,
                task.num_outputs()
            )
        };
        bail!(
            "{spec} {why} ({} not in the checkpoint): the head is untrained and its predictions \
             would be random. Evaluate a checkpoint fine-tuned on {}, or pass --allow-random-head \
             to run it anyway (e.g. to time it)",
            random_head.join(", "),
            task.title
        );
    }
    let cap = match config.arch {
        Arch::Roberta => config.max_position_embeddings.saturating_sub(2),
        Arch::Bert => config.max_position_embeddings,
    };
    let max_len = setup.max_len.unwrap_or(task.max_len).min(cap);
    let tokenizer = TextTokenizer::from_dir(&pre.dir, max_len)?;
    let label_map = if random_head.is_empty() {
        label_map(&pre.model.config.labels, task)
    } else {
        (0..task.labels.len()).collect()
    };
    Ok(TaskModel {
        model: pre.model,
        tokenizer,
        label_map,
        random_head,
    })
}

/// Tokenises `data` for `tm`, padded as `device` wants it ([`default_pad_multiple`]).
fn tokenize(data: &Dataset, tm: &TaskModel, device: &Device) -> Result<Tokenized> {
    let t = Tokenized::new(data, &tm.tokenizer).map_err(anyhow::Error::msg)?;
    Ok(t.pad_to_multiple_of(default_pad_multiple(device, tm.tokenizer.max_len)))
}

/// Scores `model` on a labelled dataset.
pub fn evaluate(
    tm: &TaskModel,
    data: &Dataset,
    batch_size: usize,
    device: &Device,
) -> Result<EvalResult> {
    let task = data.task;
    let gold = data.labels().with_context(|| {
        format!(
            "{} {} ({}) has unlabelled examples: evaluate a labelled split, or write predictions \
             with `mpcformer predict`",
            task.title, data.split, data.source
        )
    })?;
    let tokenized = tokenize(data, tm, device)?;
    let title = format!("{} {}", task.title, data.split);
    let outputs = run_model(&tm.model, &tokenized, batch_size, device, &title);
    let pred = predictions(&outputs, task, &tm.label_map);
    let scores = metric::score(task, &gold, &pred).map_err(anyhow::Error::msg)?;
    Ok(EvalResult {
        task_ref: task,
        task: task.name.to_string(),
        split: data.split.clone(),
        n: data.len(),
        metrics: scores.to_map(),
        examples_per_sec: outputs.examples_per_sec(),
        scores,
    })
}

/// One split of `task` as the setup reads it: its data, then `sample` examples drawn from it.
fn load_split(
    setup: &Setup,
    task: &'static Task,
    split: &'static data::Split,
) -> Result<data::Dataset> {
    let mut set = data::load(task, setup.data.as_deref(), split, &setup.fields)?;
    if let Some(n) = setup.sample {
        if n == 0 {
            bail!("--sample 0: draw at least 1 example");
        }
        set.sample(n);
    }
    Ok(set)
}

/// The splits `split` means for `task`; a single file as `--data` is one split (the first, e.g.
/// MNLI's `dev_matched`), not read twice.
fn splits_for(
    setup: &Setup,
    task: &'static Task,
    split: &str,
) -> Result<Vec<&'static data::Split>> {
    let mut splits = task.resolve_splits(split).map_err(anyhow::Error::msg)?;
    if splits.len() > 1
        && setup
            .data
            .as_deref()
            .is_some_and(|d| Path::new(d).is_file())
    {
        eprintln!(
            "{} {split}: --data is one file, read as {}",
            task.title, splits[0].name
        );
        splits.truncate(1);
    }
    Ok(splits)
}

/// Evaluates each task on `split` (`dev` = each task's evaluation splits, MNLI's two).
pub fn eval_tasks(setup: &Setup, tasks: &[&'static Task], split: &str) -> Result<Vec<EvalResult>> {
    let mut results = Vec::new();
    for &task in tasks {
        let splits = splits_for(setup, task, split)?;
        let tm = load_for_task(setup, task)?;
        if !tm.random_head.is_empty() {
            eprintln!(
                "warning: {} head randomly initialised (not in the checkpoint): {}",
                task.title,
                tm.random_head.join(", ")
            );
        }
        for s in splits {
            let data = load_split(setup, task, s)?;
            eprintln!(
                "{} {}: {} examples from {}",
                task.title,
                s.name,
                data.len(),
                data.source
            );
            results.push(evaluate(&tm, &data, setup.batch_size, &setup.device)?);
        }
    }
    Ok(results)
}

/// Writes GLUE submission files (`<Task>.tsv`: `index`, `prediction`) for each task's test
/// splits (MNLI: `MNLI-m.tsv` and `MNLI-mm.tsv`) into `out_dir`. Returns the files written.
pub fn predict_tasks(
    setup: &Setup,
    tasks: &[&'static Task],
    split: &str,
    out_dir: &Path,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for &task in tasks {
        let splits = splits_for(setup, task, split)?;
        let tm = load_for_task(setup, task)?;
        for s in splits {
            let data = load_split(setup, task, s)?;
            eprintln!(
                "{} {}: {} examples from {}",
                task.title,
                s.name,
                data.len(),
                data.source
            );
            let tokenized = tokenize(&data, &tm, &setup.device)?;
            let title = format!("{} {}", task.title, s.name);
            let outputs = run_model(
                &tm.model,
                &tokenized,
                setup.batch_size,
                &setup.device,
                &title,
            );
            let pred = predictions(&outputs, task, &tm.label_map);
            let name = s
                .submission
                .map(str::to_string)
                .unwrap_or_else(|| format!("{}-{}.tsv", task.title, s.name));
            let path = out_dir.join(name);
            crate::io::write_atomic(&path, submission_tsv(task, &data, &pred).as_bytes())?;
            eprintln!(
                "wrote {} ({} predictions, {:.1} examples/s)",
                path.display(),
                pred.len(),
                outputs.examples_per_sec()
            );
            written.push(path);
        }
    }
    Ok(written)
}

/// A GLUE submission file: header `index\tprediction`, then one row per example with GLUE's
/// label names (STS-B: the score clipped to 0–5, three decimals).
pub fn submission_tsv(task: &Task, data: &Dataset, pred: &[Label]) -> String {
    let mut s = String::from("index\tprediction\n");
    for (e, p) in data.examples.iter().zip(pred) {
        let value = match p {
            Label::Class(c) => task.labels[*c].to_string(),
            Label::Score(v) => format!("{:.3}", v.clamp(0.0, 5.0)),
        };
        let _ = writeln!(s, "{}\t{value}", e.id);
    }
    s
}

/// The GLUE average of the paper over these results, if any is a GLUE task.
pub fn glue_average(results: &[EvalResult]) -> Option<GlueAverage> {
    metric::glue_average(
        results
            .iter()
            .map(|r| (r.task_ref, r.split.as_str(), &r.scores)),
    )
}

/// A plain-text table: task, split, n, every metric (×100), examples/s; then the GLUE average
/// when more than one task was evaluated.
pub fn format_table(results: &[EvalResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<6} {:<15} {:>6}  {:<44} {:>10}",
        "task", "split", "n", "metrics (x100)", "examples/s"
    );
    for r in results {
        let metrics = r
            .scores
            .0
            .iter()
            .map(|(m, v)| format!("{} {:.2}", m.short(), 100.0 * v))
            .collect::<Vec<_>>()
            .join("  ");
        let _ = writeln!(
            s,
            "{:<6} {:<15} {:>6}  {:<44} {:>10.1}",
            r.task_ref.title, r.split, r.n, metrics, r.examples_per_sec
        );
    }
    let tasks: std::collections::BTreeSet<&str> = results.iter().map(|r| r.task.as_str()).collect();
    if tasks.len() > 1
        && let Some(avg) = glue_average(results)
    {
        let _ = writeln!(
            s,
            "GLUE average {:.2} over {} (paper's metrics: CoLA MCC, STS-B Pearson/Spearman mean, \
             MRPC F1, QQP acc/F1 mean, others accuracy; MNLI matched; WNLI excluded)",
            100.0 * avg.value,
            avg.over.join(", ")
        );
    }
    s
}

/// The JSON `eval --output` writes: one result object, or a list for several.
pub fn results_json(results: &[EvalResult]) -> serde_json::Value {
    if results.len() == 1 {
        serde_json::to_value(&results[0]).expect("serialisable")
    } else {
        serde_json::to_value(results).expect("serialisable")
    }
}

/// A student against its teacher on one split (`mpcformer compare`).
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub task: String,
    pub split: String,
    pub n: usize,
    pub teacher: BTreeMap<String, f64>,
    pub student: BTreeMap<String, f64>,
    /// Share of examples with the same class (regression: Pearson of the two scores).
    pub agreement: f64,
    /// Classification: the examples where they differ, by who is right.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disagreements: Option<metric::Disagreements>,
    /// Classification: agreement and the teacher's accuracy on the half of the examples where
    /// the teacher's top-class probability is highest, and on the other half.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_teacher_confidence: Option<metric::ConfidenceHalves>,
    pub gap: crate::distill::gap::Gap,
}

/// The softmax probability of a row's largest logit.
fn top_probability(logits: &[f32]) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    1.0 / logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>()
}

/// Compares the student of `student` with the teacher of `teacher` (the same task, data and
/// tokenisation: the teacher's) on each task's `split`.
pub fn compare_tasks(
    teacher: &Setup,
    student: &Setup,
    tasks: &[&'static Task],
    split: &str,
) -> Result<Vec<Comparison>> {
    let mut out = Vec::new();
    for &task in tasks {
        let (t, s) = (load_for_task(teacher, task)?, load_for_task(student, task)?);
        for sp in splits_for(teacher, task, split)? {
            let data = load_split(teacher, task, sp)?;
            let gold = data.labels().with_context(|| {
                format!(
                    "{} {} ({}) has unlabelled examples",
                    task.title, sp.name, data.source
                )
            })?;
            let tokenized = tokenize(&data, &t, &teacher.device)?;
            eprintln!(
                "{} {}: comparing on {} examples",
                task.title,
                sp.name,
                data.len()
            );
            let (gap, to, so) = crate::distill::gap::gap(
                &t.model,
                &s.model,
                &tokenized,
                teacher.batch_size,
                &teacher.device,
            )?;
            let (tp, sp_) = (
                predictions(&to, task, &t.label_map),
                predictions(&so, task, &s.label_map),
            );
            let score = |p: &[Label]| -> Result<BTreeMap<String, f64>> {
                Ok(metric::score(task, &gold, p)
                    .map_err(anyhow::Error::msg)?
                    .to_map())
            };
            let confidence: Vec<f64> = (0..data.len())
                .map(|i| top_probability(to.row(i)))
                .collect();
            out.push(Comparison {
                task: task.name.to_string(),
                split: sp.name.to_string(),
                n: data.len(),
                teacher: score(&tp)?,
                student: score(&sp_)?,
                agreement: metric::agreement(&tp, &sp_).map_err(anyhow::Error::msg)?,
                disagreements: metric::disagreements(&gold, &tp, &sp_)
                    .map_err(anyhow::Error::msg)?,
                by_teacher_confidence: metric::by_teacher_confidence(&confidence, &gold, &tp, &sp_)
                    .map_err(anyhow::Error::msg)?,
                gap,
            });
        }
    }
    Ok(out)
}

/// Per comparison: the scores and agreement, then one row per layer of the gap.
pub fn format_comparison(c: &Comparison) -> String {
    let mut s = String::new();
    let metrics = |m: &BTreeMap<String, f64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {:.2}", 100.0 * v))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let _ = writeln!(s, "{} {}, {} examples", c.task, c.split, c.n);
    let _ = writeln!(s, "  teacher: {}", metrics(&c.teacher));
    let _ = writeln!(s, "  student: {}", metrics(&c.student));
    let _ = writeln!(s, "  agreement: {:.2} %", 100.0 * c.agreement);
    if let Some(h) = c.by_teacher_confidence {
        let _ = writeln!(
            s,
            "    on the half where the teacher is surest: {:.2} % (the teacher right on {:.2} %); \
             on the other half: {:.2} % (right on {:.2} %)",
            100.0 * h.agreement[0],
            100.0 * h.teacher_accuracy[0],
            100.0 * h.agreement[1],
            100.0 * h.teacher_accuracy[1]
        );
    }
    if let Some(d) = c.disagreements {
        let _ = writeln!(
            s,
            "    where they differ: the teacher right {}, the student right {}, both wrong {} \
             (student − teacher: {:+} correct)",
            d.teacher_right,
            d.student_right,
            d.both_wrong,
            d.student_right as i64 - d.teacher_right as i64
        );
        if let Some(g) = metric::paired_accuracy_gap(c.n, &[(d.teacher_right, d.student_right)]) {
            let _ = writeln!(
                s,
                "    student − teacher accuracy: {:+.2} points, paired 95 % interval {:+.2} to {:+.2}",
                100.0 * g.mean,
                100.0 * g.low(),
                100.0 * g.high()
            );
        }
    }
    let _ = writeln!(
        s,
        "  {:<10} {:>12} {:>20} {:>24}",
        "layer", "hidden MSE", "attention score MSE", "attention KL (t ‖ s)"
    );
    let g = &c.gap;
    for (i, h) in g.hidden_mse.iter().enumerate() {
        let (name, att) = match i {
            0 => ("embeddings".to_string(), None),
            _ => (
                i.to_string(),
                Some((g.attention_score_mse[i - 1], g.attention_kl[i - 1])),
            ),
        };
        let (m, k) = att.map_or(("".into(), "".into()), |(m, k)| {
            (format!("{m:.4}"), format!("{k:.4}"))
        });
        let _ = writeln!(s, "  {name:<10} {h:>12.4} {m:>20} {k:>24}");
    }
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let _ = writeln!(
        s,
        "  {:<10} {:>12.4} {:>20.4} {:>24.4}",
        "sum",
        sum(&g.hidden_mse),
        sum(&g.attention_score_mse),
        sum(&g.attention_kl)
    );
    s
}
