//! What an export is made from: a finished run directory (its student, task, recipe, teacher and
//! metrics) or a bare model directory / Hub id, resolved into the model, configuration, labels,
//! maximum length and dev data the export writes. The only part of `export` that reads recipes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use serde_json::{Value, json};

use super::format::{position_cap, read_json, sha256_file};
use super::write::{ExportOptions, Source};
use crate::data::{self, Dataset, Fields, Task};
use crate::eval;
use crate::model::{LoadOptions, ModelConfig, Overrides, SequenceClassifier, load_pretrained};
use crate::train::recipe::{Recipe, StageKind};

/// The parts of a run directory an export records.
pub(super) struct RunInfo {
    pub dir: PathBuf,
    pub summary: Value,
    pub recipe_text: String,
    pub recipe: Option<Recipe>,
    recipe_error: Option<String>,
    recipe_value: Value,
}

/// The source resolved: the model as loaded, and what the export says about it.
pub(super) struct Resolved {
    pub run: Option<RunInfo>,
    pub task: Option<&'static Task>,
    /// The source model, dropout off.
    pub model: SequenceClassifier,
    /// The configuration to write: the file's, the approximation flags, the export's labels.
    pub config: ModelConfig,
    pub labels: Vec<String>,
    pub regression: bool,
    pub max_len: usize,
    pub tokenizer_dir: PathBuf,
}

/// Dev data for the export's dev pass.
pub(super) struct DevData {
    pub task: &'static Task,
    pub set: Dataset,
    pub split: String,
}

/// Reads `opts.source` and everything the export needs from it; `notes` collects what the user
/// should hear (a recipe of another version, per-layer choices taken from the recipe, ...).
pub(super) fn resolve(opts: &ExportOptions, notes: &mut Vec<String>) -> Result<Resolved> {
    let run = match &opts.source {
        Source::Run(dir) => {
            let o = &opts.overrides;
            if o.act.is_some() || o.attn.is_some() || !o.layers.is_empty() {
                bail!(
                    "--act/--attn/--layer apply to --model exports: a run's student is exported \
                     with the approximations it was distilled with"
                );
            }
            Some(read_run(dir)?)
        }
        Source::Model(_) => None,
    };
    let model_spec = match (&opts.source, &run) {
        (Source::Run(_), Some(r)) => r.dir.join("student").to_string_lossy().to_string(),
        (Source::Model(m), _) => m.clone(),
        (Source::Run(_), None) => unreachable!("a run source was read above"),
    };
    let model_dir = crate::hub::model_dir(&model_spec)?;
    let task = task_of(opts, run.as_ref())?;
    let overrides = overrides_of(opts, run.as_ref(), &model_dir, notes)?;
    let file_cfg = overrides.apply(ModelConfig::from_file(&model_dir.join("config.json"))?);
    let model = load_source(&model_spec, &model_dir, &overrides, &opts.device, notes)?;
    let (labels, regression) = export_labels(&file_cfg, task)?;
    let config = file_cfg.with_labels(labels.clone(), regression);
    let recipe_max_len = run
        .as_ref()
        .and_then(|r| r.recipe.as_ref())
        .and_then(|r| r.data.max_len);
    let max_len = opts
        .max_len
        .or(recipe_max_len)
        .or(task.map(|t| t.max_len))
        .unwrap_or(512)
        .min(position_cap(&config));
    let tokenizer_dir = match &opts.tokenizer {
        Some(t) => crate::hub::model_dir(t)?,
        None => model_dir,
    };
    Ok(Resolved {
        run,
        task,
        model,
        config,
        labels,
        regression,
        max_len,
        tokenizer_dir,
    })
}

fn read_run(dir: &Path) -> Result<RunInfo> {
    let summary_path = dir.join("summary.json");
    if !summary_path.is_file() {
        bail!(
            "{}: no summary.json — not a finished run directory (run `mpcformer run` to the end, \
             or export a model directory with --model)",
            dir.display()
        );
    }
    let summary = read_json(&summary_path)?;
    if !dir.join("student").join("config.json").is_file() {
        bail!(
            "{}: no student/ — this run trained no student (export its teacher with --model {})",
            dir.display(),
            dir.join("teacher").display()
        );
    }
    let recipe_path = dir.join("recipe.toml");
    let recipe_text = std::fs::read_to_string(&recipe_path)
        .with_context(|| format!("reading {}", recipe_path.display()))?;
    let mut value: toml::Value = toml::from_str(&recipe_text)
        .with_context(|| format!("{}: invalid TOML", recipe_path.display()))?;
    let recipe_value = serde_json::to_value(&value)?;
    if let Some(t) = value.as_table_mut() {
        t.remove("resolved");
    }
    let (recipe, recipe_error) = match value.try_into::<Recipe>() {
        Ok(r) => (Some(r), None),
        Err(e) => (
            None,
            Some(format!(
                "{} does not read as a recipe of this version ({e}): its data, maximum length \
                 and teacher are not used",
                recipe_path.display()
            )),
        ),
    };
    Ok(RunInfo {
        dir: dir.to_path_buf(),
        summary,
        recipe_text,
        recipe,
        recipe_error,
        recipe_value,
    })
}

/// `--task`, else the run's; a `--task` that differs from the run's is refused.
fn task_of(opts: &ExportOptions, run: Option<&RunInfo>) -> Result<Option<&'static Task>> {
    let name = match (&opts.task, run) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(r)) => r.summary["task"].as_str().map(str::to_string),
        (None, None) => None,
    };
    let task: Option<&'static Task> = name
        .as_deref()
        .map(Task::find)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if let (Some(r), Some(t)) = (run, task)
        && let Some(rt) = r.summary["task"].as_str()
        && Task::find(rt).ok() != Some(t)
    {
        bail!(
            "--task {} differs from the run's task `{rt}` ({})",
            t.name,
            r.dir.join("summary.json").display()
        );
    }
    Ok(task)
}

/// The approximation flags and, for a run saved before config.json carried per-layer choices,
/// the recipe's. The configuration is otherwise the file's (dropout included).
fn overrides_of(
    opts: &ExportOptions,
    run: Option<&RunInfo>,
    model_dir: &Path,
    notes: &mut Vec<String>,
) -> Result<Overrides> {
    let mut overrides = opts.overrides.clone();
    let Some(r) = run else {
        return Ok(overrides);
    };
    if let Some(e) = &r.recipe_error {
        notes.push(e.clone());
    }
    let Some(recipe) = &r.recipe else {
        return Ok(overrides);
    };
    let raw = read_json(&model_dir.join("config.json"))?;
    let file_cfg = ModelConfig::from_file(&model_dir.join("config.json"))?;
    if raw.get("mpc").is_none() && !recipe.student.layers.is_empty() {
        for (k, o) in &recipe.student.layers {
            let i: usize = k.parse().with_context(|| {
                format!("recipe.toml: student.layers key `{k}` is not a layer index")
            })?;
            overrides.layers.push((i, *o));
        }
        notes.push(
            "student/config.json has no `mpc` object: per-layer choices taken from recipe.toml"
                .into(),
        );
    }
    if (file_cfg.approx.act, file_cfg.approx.attn) != (recipe.student.act, recipe.student.attn) {
        notes.push(format!(
            "student/config.json says {}+{}, the recipe {}+{}: exporting what config.json says",
            file_cfg.approx.act, file_cfg.approx.attn, recipe.student.act, recipe.student.attn
        ));
    }
    Ok(overrides)
}

/// The source model without dropout; a model without a trained head is refused.
fn load_source(
    model_spec: &str,
    model_dir: &Path,
    overrides: &Overrides,
    device: &Device,
    notes: &mut Vec<String>,
) -> Result<SequenceClassifier> {
    let load = Overrides {
        no_dropout: true,
        load: LoadOptions::default(),
        ..overrides.clone()
    };
    let pre = load_pretrained(&model_dir.to_string_lossy(), &load, device)
        .with_context(|| format!("loading {model_spec}"))?;
    if !pre.report.initialised.is_empty() {
        bail!(
            "{}: no trained classification head ({} not in the checkpoint): an export of it would \
             predict at random",
            model_dir.display(),
            pre.report.initialised.join(", ")
        );
    }
    if !pre.report.unexpected.is_empty() {
        notes.push(format!(
            "not exported (unused by the model): {}",
            pre.report.unexpected.join(", ")
        ));
    }
    Ok(pre.model)
}

/// Labels for the export's head: the model's own when they are the task's names in some order
/// (the head was trained with them), else the task's in its order (as `eval` reads them).
fn export_labels(config: &ModelConfig, task: Option<&Task>) -> Result<(Vec<String>, bool)> {
    let Some(task) = task else {
        return Ok((config.labels.clone(), config.is_regression()));
    };
    if config.num_labels != task.num_outputs() || config.is_regression() != task.is_regression() {
        bail!(
            "the model's classification head has {} output(s){}, but {} needs {}: export a \
             model fine-tuned on {}",
            config.num_labels,
            if config.is_regression() {
                " (regression)"
            } else {
                ""
            },
            task.title,
            task.num_outputs(),
            task.title
        );
    }
    if task.is_regression() {
        return Ok(task.head_labels());
    }
    let map = eval::label_map(&config.labels, task);
    let by_name = config
        .labels
        .iter()
        .zip(&map)
        .all(|(l, &i)| l.trim().eq_ignore_ascii_case(task.labels[i]));
    if by_name {
        Ok((config.labels.clone(), false))
    } else {
        Ok(task.head_labels())
    }
}

/// The manifest's `teacher`: for a run, the recipe's teacher, the run's fine-tuned teacher and its
/// hash and metrics; for a model, what `--teacher` says.
pub(super) fn teacher_info(opts: &ExportOptions, run: Option<&RunInfo>) -> Result<Option<Value>> {
    let Some(r) = run else {
        return Ok(opts.teacher.as_ref().map(|t| json!({"model": t})));
    };
    let mut v = json!({
        "approximations": r.summary["teacher"]["approximations"],
        "dev_metrics": r.summary["teacher"]["metrics"],
    });
    if let Some(recipe) = &r.recipe {
        let t = &recipe.teacher;
        v["model"] = json!(t.model);
        v["config"] = json!(t.config.as_ref().map(|p| p.display().to_string()));
        v["tokenizer"] = json!(t.tokenizer);
        v["fine_tuned_in_run"] = json!(recipe.stages.contains(&StageKind::Finetune));
    }
    let teacher_dir = r.dir.join("teacher");
    if teacher_dir.join("model.safetensors").is_file() {
        v["checkpoint"] = json!(teacher_dir.display().to_string());
        v["checkpoint_sha256"] = json!(sha256_file(&teacher_dir.join("model.safetensors"))?.sha256);
    }
    if let Some(t) = &opts.teacher {
        v["given"] = json!(t);
    }
    Ok(Some(v))
}

/// The manifest's `recipe` for a run: the staged `recipe.toml`'s hash beside the one the run
/// recorded (a difference is noted), and the resolved recipe as JSON.
pub(super) fn recipe_entry(
    run: Option<&RunInfo>,
    stage: &Path,
    notes: &mut Vec<String>,
) -> Result<Option<Value>> {
    let Some(r) = run else {
        return Ok(None);
    };
    let sha = sha256_file(&stage.join("recipe.toml"))?.sha256;
    let summary_hash = r.summary["recipe_hash"].as_str().map(str::to_string);
    if summary_hash.as_deref().is_some_and(|h| h != sha) {
        notes.push(
            "recipe.toml's sha256 differs from summary.json's recipe_hash: the recipe file \
             changed after the run"
                .into(),
        );
    }
    Ok(Some(json!({
        "file": "recipe.toml",
        "sha256": sha,
        "summary_recipe_hash": summary_hash,
        "content": r.recipe_value,
    })))
}

/// The dev pass's data: `--data`/`--split`, else the run's recipe's, else the task's default;
/// `None` without a task.
pub(super) fn dev_data(
    opts: &ExportOptions,
    run: Option<&RunInfo>,
    task: Option<&'static Task>,
) -> Result<Option<DevData>> {
    let Some(task) = task else {
        return Ok(None);
    };
    let recipe_data = run.and_then(|r| r.recipe.as_ref()).map(|r| &r.data);
    let spec = opts
        .data
        .clone()
        .or_else(|| recipe_data.and_then(|d| d.spec.clone()));
    let split_name = opts
        .split
        .clone()
        .or_else(|| recipe_data.map(|d| d.eval_split.clone()))
        .unwrap_or_else(|| "dev".into());
    let split = task
        .resolve_splits(&split_name)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .next()
        .with_context(|| format!("{}: no split `{split_name}`", task.title))?;
    let mut set =
        data::load(task, spec.as_deref(), split, &Fields::default()).with_context(|| {
            format!(
                "reading {} {} for the dev pass (value ranges, metrics); pass --data SPEC, or \
                 --no-data to export without them",
                task.title, split.name
            )
        })?;
    let limit = match (recipe_data.and_then(|d| d.eval_limit), opts.range_limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(n) = limit {
        set.examples.truncate(n);
    }
    Ok(Some(DevData {
        task,
        set,
        split: split.name.to_string(),
    }))
}

/// The eval split a run's recipe names (for metrics recorded at training only).
pub(super) fn eval_split(run: &RunInfo) -> Option<String> {
    run.recipe.as_ref().map(|x| x.data.eval_split.clone())
}
