//! `mpcformer report`: Markdown tables and SVG plots from run directories — teacher, each student
//! variant and the baselines per task, official metrics, averages, and student/teacher retention,
//! with seeds of the same recipe grouped into mean ± std. Everything comes from the files a run
//! writes (`summary.json`, `recipe.toml`, `metrics.jsonl`), so `results/` (those files, no weights)
//! regenerates every number.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde_json::Value;

/// Files of a run that a report needs (and `--save-runs` keeps); the comparison is optional.
pub const RUN_FILES: &[&str] = &[
    "summary.json",
    "recipe.toml",
    "metrics.jsonl",
    COMPARISON_FILE,
];

/// `mpcformer compare --output` of a run's student against its teacher on dev (see [`Parting`]).
pub const COMPARISON_FILE: &str = "teacher-comparison.json";

/// How a student was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// MPCFormer: distillation (stage 1 and/or 2).
    Distilled,
    /// `w/o d`: teacher weights + approximations, labels only.
    WithoutD,
    /// `w/o p,d`: random init + approximations, labels only.
    WithoutPD,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Distilled => "MPCFormer",
            Kind::WithoutD => "w/o d",
            Kind::WithoutPD => "w/o p,d",
        }
    }
}

/// Metrics of one model over seeds, and the seeds already counted.
type SeedGroup = (Vec<BTreeMap<String, f64>>, Vec<u64>);

/// One point of a curve from `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub stage: String,
    pub step: f64,
    pub value: f64,
}

/// What a report needs of one run.
#[derive(Clone, Debug)]
pub struct Run {
    pub dir: PathBuf,
    pub name: String,
    pub task: String,
    pub seed: u64,
    pub teacher_model: String,
    pub kind: Option<Kind>,
    pub student_approx: Option<String>,
    /// The recipe's `label`, if any: runs with different labels are different rows.
    pub label: Option<String>,
    pub teacher_metrics: BTreeMap<String, f64>,
    pub teacher_primary: f64,
    pub student_metrics: Option<BTreeMap<String, f64>>,
    pub student_primary: Option<f64>,
    pub stage_wall_s: BTreeMap<String, f64>,
    /// `teacher.finetuned_run`: the teacher came fine-tuned from that run, not from this one.
    pub teacher_from: Option<String>,
    /// `student.stage1_run`: the student after stage 1 came from that run.
    pub stage1_from: Option<String>,
    pub losses: Vec<Point>,
    /// Primary dev metric at each evaluation during training.
    pub dev: Vec<Point>,
    /// The best constant answer's primary dev score, if the run recorded it.
    pub trivial_primary: Option<f64>,
    /// Student–teacher agreement on dev (share of equal classes; regression: Pearson).
    pub agreement: Option<f64>,
    /// The teacher's learning-rate sweep: (learning rate, best primary dev score).
    pub teacher_grid: Vec<(f64, f64)>,
    /// The learning rate the teacher was fine-tuned at (without a sweep).
    pub finetune_lr: Option<f64>,
    pub stage1_epochs: Option<f64>,
    pub eval_examples: u64,
    /// Training examples the run held out to choose checkpoints and learning rates on, instead
    /// of dev (`data.select_examples`).
    pub held_out: Option<u64>,
    /// Teachers fine-tuned as this run's was but with another seed, measured against it.
    pub teacher_reseeds: Vec<Reseed>,
    /// Where the student parts from its teacher, from [`COMPARISON_FILE`] if the run has one.
    pub parting: Option<Parting>,
}

/// A second teacher fine-tuned as a run's own (same data and learning rate), with another
/// seed: how often two teachers of the task agree is the yardstick for a student's agreement.
/// From `reseeded-teacher-s<seed>.json` in the run's directory, `mpcformer compare`'s output
/// with the run's teacher as `--teacher` and the reseeded one as `--model`.
#[derive(Clone, Debug, PartialEq)]
pub struct Reseed {
    pub seed: u64,
    pub primary: f64,
    pub agreement: f64,
    pub parting: Option<Parting>,
}

/// Where a classifier parts from a teacher on dev, from `mpcformer compare --output`: agreement
/// on the half of the examples where the teacher is surest and on the other half, the teacher's
/// accuracy on each, and the examples they answer differently by who is right.
#[derive(Clone, Debug, PartialEq)]
pub struct Parting {
    /// Dev examples compared.
    pub n: u64,
    pub agreement: [f64; 2],
    pub teacher_accuracy: [f64; 2],
    pub teacher_right: u64,
    pub student_right: u64,
}

/// The parting recorded in a comparison, `None` for a regression task or a file written before
/// comparisons recorded it.
fn parting(c: &Value) -> Option<Parting> {
    let pair = |v: &Value| Some([v[0].as_f64()?, v[1].as_f64()?]);
    let h = &c["by_teacher_confidence"];
    let d = &c["disagreements"];
    Some(Parting {
        n: c["n"].as_u64()?,
        agreement: pair(&h["agreement"])?,
        teacher_accuracy: pair(&h["teacher_accuracy"])?,
        teacher_right: d["teacher_right"].as_u64()?,
        student_right: d["student_right"].as_u64()?,
    })
}

/// The first comparison of an `mpcformer compare --output` file.
fn read_comparison(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    match v {
        Value::Array(mut a) if !a.is_empty() => Ok(a.swap_remove(0)),
        _ => bail!(
            "{}: expected `mpcformer compare --output` JSON (a list of comparisons)",
            path.display()
        ),
    }
}

/// Name of the file that records the teacher reseeded with `seed` (see [`Reseed`]).
pub fn reseed_file(seed: u64) -> String {
    format!("reseeded-teacher-s{seed}.json")
}

fn load_reseeds(dir: &Path, primary_name: &str) -> Result<Vec<Reseed>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(seed) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("reseeded-teacher-s")?.strip_suffix(".json"))
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let c = read_comparison(&path)?;
        let (Some(primary), Some(agreement)) =
            (c["student"][primary_name].as_f64(), c["agreement"].as_f64())
        else {
            bail!(
                "{}: expected `mpcformer compare --output` JSON with student.{primary_name} and agreement",
                path.display()
            );
        };
        out.push(Reseed {
            seed,
            primary,
            agreement,
            parting: parting(&c),
        });
    }
    out.sort_by_key(|r| r.seed);
    Ok(out)
}

impl Run {
    /// The run that fine-tuned this run's teacher: itself, or its `teacher.finetuned_run`.
    pub fn teacher_origin(&self) -> &str {
        self.teacher_from.as_deref().unwrap_or(&self.name)
    }

    /// (student − trivial) / (teacher − trivial): the share of the teacher's lead over the
    /// best constant answer that the student keeps.
    pub fn margin_retention(&self) -> Option<f64> {
        self.margin_of(self.student_primary?)
    }

    /// Margin retention of a student score `s` against this run's teacher.
    fn margin_of(&self, s: f64) -> Option<f64> {
        let (t, z) = (self.teacher_primary, self.trivial_primary?);
        (t > z).then(|| (s - z) / (t - z))
    }

    /// The student's dev score at the last evaluation of its last training stage (stage 2, or
    /// supervised training): the score without choosing a checkpoint on dev, which the
    /// reported one is where that stage keeps its best (`keep_best`, as the reference does).
    pub fn last_dev(&self) -> Option<f64> {
        ["stage2", "supervised"].iter().find_map(|stage| {
            self.dev
                .iter()
                .filter(|p| p.stage == *stage)
                .max_by(|a, b| a.step.total_cmp(&b.step))
                .map(|p| p.value)
        })
    }
}

fn metrics(v: &Value) -> BTreeMap<String, f64> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, x)| x.as_f64().map(|f| (k.clone(), f)))
                .collect()
        })
        .unwrap_or_default()
}

/// A run's log: the loss at each logged step and the primary dev metric at each evaluation;
/// each finished stage's wall time into `stage_wall_s` (a stage finished by an earlier process
/// of a resumed run took no time in the last one: its time is in its `done` record).
fn read_log(
    text: &str,
    primary_name: &str,
    stage_wall_s: &mut BTreeMap<String, f64>,
) -> (Vec<Point>, Vec<Point>) {
    let (mut losses, mut dev) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let (Some(true), Some(stage), Some(w)) = (
            v["done"].as_bool(),
            v["stage"].as_str(),
            v["wall_s"].as_f64(),
        ) {
            stage_wall_s.insert(stage.to_string(), w);
        }
        let (Some(stage), Some(step)) = (v["stage"].as_str(), v["step"].as_f64()) else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            losses.push(Point {
                stage: stage.into(),
                step,
                value: l,
            });
        }
        // Evaluations on held-out training examples (`data.select_examples`) are not dev's.
        if let (Some(m), true) = (v["eval"][&primary_name].as_f64(), v["on"].is_null()) {
            dev.push(Point {
                stage: stage.into(),
                step,
                value: m,
            });
        }
    }
    (losses, dev)
}

/// What a run trained: a distilled student, a baseline without distillation, or none.
fn run_kind(recipe: &toml::Value) -> Option<Kind> {
    let stages: Vec<&str> = recipe
        .get("stages")
        .and_then(|s| s.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let random_init = recipe
        .get("student")
        .and_then(|s| s.get("init"))
        .and_then(|i| i.as_str())
        == Some("random");
    if stages.iter().any(|s| *s == "stage1" || *s == "stage2") {
        Some(Kind::Distilled)
    } else if stages.contains(&"supervised") {
        Some(if random_init {
            Kind::WithoutPD
        } else {
            Kind::WithoutD
        })
    } else {
        None
    }
}

/// Reads a run directory.
pub fn load_run(dir: &Path) -> Result<Run> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).with_context(|| format!("{}/{f}", dir.display()))
    };
    let summary: Value = serde_json::from_str(&read("summary.json")?)
        .with_context(|| format!("{}/summary.json", dir.display()))?;
    let recipe: toml::Value = toml::from_str(&read("recipe.toml")?)
        .with_context(|| format!("{}/recipe.toml", dir.display()))?;
    let kind = run_kind(&recipe);
    let label = recipe
        .get("label")
        .and_then(|l| l.as_str())
        .map(str::to_string);
    let teacher = recipe.get("teacher");
    let teacher_model = teacher
        .and_then(|t| t.get("model").or_else(|| t.get("config")))
        .and_then(|m| m.as_str())
        .unwrap_or("?")
        .to_string();
    let primary_key = |m: &Value| m.get("primary").and_then(|p| p.as_f64());
    let resolved = |stage: &str, key: &str| {
        recipe
            .get("resolved")
            .and_then(|r| r.get(stage))
            .and_then(|s| s.get(key))
            .and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
    };
    let student = summary.get("student").filter(|s| !s.is_null());
    let task = summary["task"].as_str().unwrap_or("?").to_string();
    let primary_name = crate::data::Task::find(&task)
        .map(|t| t.primary.name().to_string())
        .unwrap_or_default();
    let mut stage_wall_s = metrics(&summary["stage_wall_s"]);
    let (losses, dev) = match read("metrics.jsonl") {
        Ok(text) => read_log(&text, &primary_name, &mut stage_wall_s),
        Err(_) => (Vec::new(), Vec::new()),
    };
    Ok(Run {
        dir: dir.to_path_buf(),
        name: summary["name"].as_str().unwrap_or("?").to_string(),
        seed: summary["seed"].as_u64().unwrap_or(0),
        task,
        teacher_model,
        kind: student.and(kind),
        label,
        student_approx: student
            .and_then(|s| s["approximations"].as_str())
            .map(str::to_string),
        teacher_metrics: metrics(&summary["teacher"]["metrics"]),
        teacher_primary: primary_key(&summary["teacher"])
            .context("summary.json: no teacher.primary")?,
        student_metrics: student.map(|s| metrics(&s["metrics"])),
        student_primary: student.and_then(primary_key),
        stage_wall_s,
        teacher_from: teacher
            .and_then(|t| t.get("finetuned_run"))
            .and_then(|r| r.as_str())
            .map(|r| r.rsplit('/').next().unwrap_or(r).to_string()),
        stage1_from: recipe
            .get("student")
            .and_then(|t| t.get("stage1_run"))
            .and_then(|r| r.as_str())
            .map(|r| r.rsplit('/').next().unwrap_or(r).to_string()),
        losses,
        dev,
        trivial_primary: summary["trivial"]["primary"].as_f64(),
        agreement: summary["agreement"].as_f64(),
        teacher_grid: summary["teacher_grid"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p["lr"].as_f64()?, p["primary"].as_f64()?)))
                    .collect()
            })
            .unwrap_or_default(),
        finetune_lr: resolved("finetune", "lr"),
        stage1_epochs: resolved("stage1", "epochs"),
        eval_examples: summary["eval_examples"].as_u64().unwrap_or(0),
        held_out: summary["held_out_examples"].as_u64(),
        teacher_reseeds: load_reseeds(dir, &primary_name)?,
        parting: match dir.join(COMPARISON_FILE) {
            p if p.is_file() => parting(&read_comparison(&p)?),
            _ => None,
        },
    })
}

/// Runs of one task evaluated on the same dev examples share one trivial baseline: a run made
/// before runs recorded it borrows it from such a run (or knows it is 0, under MCC and the
/// correlations).
fn fill_trivial(runs: &mut [Run]) {
    let known: BTreeMap<(String, u64), f64> = runs
        .iter()
        .filter_map(|r| Some(((r.task.clone(), r.eval_examples), r.trivial_primary?)))
        .collect();
    for r in runs.iter_mut().filter(|r| r.trivial_primary.is_none()) {
        r.trivial_primary = known
            .get(&(r.task.clone(), r.eval_examples))
            .copied()
            .or_else(|| constant_scores_zero(&r.task).then_some(0.0));
    }
}

/// Whether every constant answer scores 0 under the task's primary metric (MCC, correlations),
/// whatever the dev set.
fn constant_scores_zero(task: &str) -> bool {
    use crate::metric::Metric::*;
    crate::data::Task::find(task)
        .is_ok_and(|t| matches!(t.primary, Mcc | Pearson | Spearman | PearsonAndSpearman))
}

/// Run directories under `paths`: each path is a run (has `summary.json`) or holds runs.
pub fn find_runs(paths: &[PathBuf]) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for p in paths {
        if p.join("summary.json").is_file() {
            runs.push(load_run(p)?);
            continue;
        }
        let mut subs: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("{}: not a run directory", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|d| d.join("summary.json").is_file())
            .collect();
        subs.sort();
        for d in subs {
            runs.push(load_run(&d)?);
        }
    }
    if runs.is_empty() {
        bail!("no finished runs (directories with summary.json) under {paths:?}");
    }
    fill_trivial(&mut runs);
    Ok(runs)
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn cell(v: &[f64], scale: f64) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let (m, s) = mean_std(v);
    if v.len() > 1 {
        format!("{:.1} ± {:.1} (n={})", m * scale, s * scale, v.len())
    } else {
        format!("{:.1}", m * scale)
    }
}

/// Values per task, over seeds.
type PerTask = BTreeMap<String, Vec<f64>>;

/// One row of the main table: values per task (over seeds).
#[derive(Default)]
struct Row {
    label: String,
    /// A teacher row: the runs that fine-tuned its teachers.
    teacher: bool,
    /// A student row of the shipped recipe: distilled, without a label.
    shipped: bool,
    per_task: PerTask,
    retention: PerTask,
    margin: PerTask,
    agreement: PerTask,
    /// The student's score, retention and margin retention at its last evaluation.
    last: PerTask,
    last_retention: PerTask,
    last_margin: PerTask,
    /// Where each seed's student parts from its teacher, and (accuracy tasks) the teacher's lead
    /// over the trivial answer, which turns an accuracy gap into margin retention.
    parted: BTreeMap<String, Vec<Parting>>,
    lead: PerTask,
}

impl Row {
    /// The task's examples scored and its seeds' pooled student − teacher accuracy gap
    /// ([`crate::metric::paired_accuracy_gap`]); `None` without comparisons on one example set.
    fn paired_gap(&self, task: &str) -> Option<(u64, crate::metric::PairedGap)> {
        let parted = self.parted.get(task).filter(|p| !p.is_empty())?;
        let n = parted[0].n;
        if parted.iter().any(|p| p.n != n) {
            return None;
        }
        let counts: Vec<(usize, usize)> = parted
            .iter()
            .map(|p| (p.teacher_right as usize, p.student_right as usize))
            .collect();
        Some((n, crate::metric::paired_accuracy_gap(n as usize, &counts)?))
    }

    /// On a task scored by accuracy: margin retention at the paired gap, and at its 95 %
    /// interval's ends.
    fn margin_interval(&self, task: &str) -> Option<[f64; 3]> {
        let lead = mean_std(self.lead.get(task).filter(|l| !l.is_empty())?).0;
        let (_, gap) = self.paired_gap(task)?;
        Some([gap.mean, gap.low(), gap.high()].map(|g| 1.0 + g / lead))
    }
}

/// The run that fine-tuned `r`'s teacher, if it is among `runs`, else `r`.
fn origin<'a>(runs: &'a [Run], r: &'a Run) -> &'a Run {
    runs.iter()
        .find(|o| o.name == r.teacher_origin())
        .unwrap_or(r)
}

/// The label of the run that fine-tuned `r`'s teacher (a teacher belongs to the recipe that
/// made it, whichever students later reused it) — none when an unlabelled run learnt from it:
/// the shipped recipe's teacher is the shipped recipe's, even if a relabelled variant made it.
fn teacher_label(runs: &[Run], r: &Run) -> Option<String> {
    let o = origin(runs, r);
    let shipped = runs
        .iter()
        .any(|x| x.label.is_none() && std::ptr::eq(origin(runs, x), o));
    if shipped { None } else { o.label.clone() }
}

/// Which teacher `r` learnt from: fine-tuning is reproducible, so runs of one recipe label that
/// fine-tuned with the same seed, or took the teacher of such a run, share one teacher. Each
/// teacher counts once in the tables.
fn teacher_key(runs: &[Run], r: &Run) -> (String, u64, Option<String>) {
    let o = origin(runs, r);
    (o.task.clone(), o.seed, teacher_label(runs, r))
}

fn with_label(what: &str, label: &Option<String>, model: &str) -> String {
    match label {
        Some(l) => format!("{what}, {l} ({})", short(model)),
        None => format!("{what} ({})", short(model)),
    }
}

fn rows(runs: &[Run]) -> Vec<Row> {
    let mut out: BTreeMap<(String, u8, String), Row> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in runs {
        let tl = teacher_label(runs, r);
        let key = (r.teacher_model.clone(), 0, tl.clone().unwrap_or_default());
        let row = out.entry(key).or_insert_with(|| Row {
            label: with_label("teacher", &tl, &r.teacher_model),
            teacher: true,
            ..Row::default()
        });
        // A teacher counts once, however many students learnt from it.
        if seen.insert(teacher_key(runs, r)) {
            row.per_task
                .entry(r.task.clone())
                .or_default()
                .push(r.teacher_primary);
        }
        if let (Some(kind), Some(approx), Some(s)) = (r.kind, &r.student_approx, r.student_primary)
        {
            let variant = match &r.label {
                Some(l) => format!("{approx}, {l}"),
                None => approx.clone(),
            };
            let key = (r.teacher_model.clone(), 1 + kind as u8, variant.clone());
            let row = out.entry(key).or_insert_with(|| Row {
                label: format!("{} {} ({})", kind.label(), variant, short(&r.teacher_model)),
                shipped: r.label.is_none() && kind == Kind::Distilled,
                ..Row::default()
            });
            let t = r.task.clone();
            row.per_task.entry(t.clone()).or_default().push(s);
            row.retention
                .entry(t.clone())
                .or_default()
                .push(s / r.teacher_primary);
            if let Some(m) = r.margin_retention() {
                row.margin.entry(t.clone()).or_default().push(m);
            }
            if let Some(a) = r.agreement {
                row.agreement.entry(t.clone()).or_default().push(a);
            }
            if let Some(p) = &r.parting {
                row.parted.entry(t.clone()).or_default().push(p.clone());
            }
            if let (true, Some(z)) = (primary_is_accuracy(&t), r.trivial_primary) {
                row.lead
                    .entry(t.clone())
                    .or_default()
                    .push(r.teacher_primary - z);
            }
            if let Some(l) = r.last_dev() {
                row.last.entry(t.clone()).or_default().push(l);
                row.last_retention
                    .entry(t.clone())
                    .or_default()
                    .push(l / r.teacher_primary);
                if let Some(m) = r.margin_of(l) {
                    row.last_margin.entry(t).or_default().push(m);
                }
            }
        }
    }
    let mut trivial = Row {
        label: "trivial (best constant answer)".into(),
        teacher: true,
        ..Row::default()
    };
    let mut dev_sets = std::collections::BTreeSet::new();
    for r in runs {
        if let Some(z) = r.trivial_primary
            && dev_sets.insert((r.task.clone(), r.eval_examples))
        {
            trivial.per_task.entry(r.task.clone()).or_default().push(z);
        }
    }
    std::iter::once(trivial)
        .filter(|t| !t.per_task.is_empty())
        .chain(out.into_values())
        .collect()
}

/// What the best constant answer is under a task's primary metric.
fn trivial_answer(task: &str) -> &'static str {
    use crate::metric::Metric;
    match crate::data::Task::find(task).map(|t| t.primary) {
        Ok(Metric::Accuracy) => "majority class",
        Ok(Metric::F1) => "always positive",
        Ok(Metric::AccuracyAndF1) => "best constant",
        _ => "any constant: 0",
    }
}

/// Per teacher (the recipe that fine-tuned it) and task: the trivial baseline, the teacher's
/// lead over it, and the learning rates it was chosen from.
fn teachers_table(runs: &[Run], md: &mut String) {
    let mut groups: BTreeMap<(String, String), Vec<&Run>> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in runs {
        if seen.insert(teacher_key(runs, r)) {
            let label = with_label("teacher", &teacher_label(runs, r), &r.teacher_model);
            groups
                .entry((label, r.task.clone()))
                .or_default()
                .push(origin(runs, r));
        }
    }
    let _ = writeln!(
        md,
        "
Teachers against the trivial answer (dev, ×100), the learning rates each was chosen from (best dev score per rate; the kept one in bold), and the same fine-tuning with another seed: its score, and how often it agrees with the kept teacher (STS-B: Pearson of their scores), the yardstick for a student's agreement:
"
    );
    let _ = writeln!(
        md,
        "| teacher | task | trivial | teacher | lead over trivial | learning rates | reseeded: score · agreement |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for ((label, task), origins) in &groups {
        let t: Vec<f64> = origins.iter().map(|o| o.teacher_primary).collect();
        let z = origins.iter().find_map(|o| o.trivial_primary);
        let lead = z.map_or("–".into(), |z| {
            format!("{:+.1}", 100.0 * (mean_std(&t).0 - z))
        });
        let mut sweeps: Vec<String> = origins.iter().map(|o| sweep(o)).collect();
        sweeps.dedup();
        let reseeds: Vec<String> = origins
            .iter()
            .flat_map(|o| &o.teacher_reseeds)
            .map(|r| {
                format!(
                    "s{} {:.1} · {:.1} %",
                    r.seed,
                    100.0 * r.primary,
                    100.0 * r.agreement
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "| {label} | {task} | {} ({}) | {} | {lead} | {} | {} |",
            z.map_or("–".into(), |z| format!("{:.1}", 100.0 * z)),
            trivial_answer(task),
            cell(&t, 100.0),
            sweeps.join("; "),
            if reseeds.is_empty() {
                "–".to_string()
            } else {
                reseeds.join("; ")
            }
        );
    }
}

/// `2e-5 55.2 · 5e-5 **60.1**`, or the one rate used; `(on 250 held out)` after a sweep scored
/// on held-out training examples.
fn sweep(r: &Run) -> String {
    if r.teacher_grid.is_empty() {
        return r
            .finetune_lr
            .map_or("–".into(), |lr| format!("{lr:e} only"));
    }
    let best = r.teacher_grid.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let parts: Vec<String> = r
        .teacher_grid
        .iter()
        .map(|&(lr, v)| {
            if v == best {
                format!("{lr:e} **{:.1}**", 100.0 * v)
            } else {
                format!("{lr:e} {:.1}", 100.0 * v)
            }
        })
        .collect();
    match r.held_out {
        Some(n) => format!("{} (on {n} held out)", parts.join(" · ")),
        None => parts.join(" · "),
    }
}

/// Per student and task: retention, margin retention and agreement over seeds, and their
/// GLUE averages.
fn fidelity_table(rows: &[Row], md: &mut String) {
    let _ = writeln!(
        md,
        "
How much of its teacher each student keeps (%, mean ± std over seeds): retention = student / teacher; margin retention = (student − trivial) / (teacher − trivial); agreement = dev examples where student and teacher predict the same class (STS-B: Pearson of their scores):
"
    );
    let _ = writeln!(
        md,
        "| model | task | retention | margin retention | agreement |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    let glue = |t: &str| crate::data::Task::find(t).is_ok_and(|x| x.is_glue());
    for row in rows.iter().filter(|r| !r.teacher) {
        let get = |m: &PerTask, t: &str| m.get(t).cloned().unwrap_or_default();
        for t in row.retention.keys() {
            let _ = writeln!(
                md,
                "| {} | {t} | {} | {} | {} |",
                row.label,
                cell(&get(&row.retention, t), 100.0),
                cell(&get(&row.margin, t), 100.0),
                cell(&get(&row.agreement, t), 100.0)
            );
        }
        let avg = |m: &PerTask| {
            let means: Vec<f64> = m
                .iter()
                .filter(|(t, v)| glue(t) && !v.is_empty())
                .map(|(_, v)| mean_std(v).0)
                .collect();
            let min = means.iter().copied().fold(f64::MAX, f64::min);
            if means.len() < 2 {
                "–".to_string()
            } else {
                format!(
                    "{:.1} (lowest {:.1})",
                    100.0 * mean_std(&means).0,
                    100.0 * min
                )
            }
        };
        if row.retention.keys().filter(|t| glue(t)).count() > 1 {
            let _ = writeln!(
                md,
                "| {} | GLUE average | {} | {} | {} |",
                row.label,
                avg(&row.retention),
                avg(&row.margin),
                avg(&row.agreement)
            );
        }
    }
}

/// What the shipped recipe aims at: retention ≥ 97 % on the GLUE average and ≥ 93 % on every
/// task, margin retention ≥ 90 % on every task, over 3 seeds each.
const BAR_AVERAGE: f64 = 0.97;
const BAR_TASK: f64 = 0.93;
const BAR_MARGIN: f64 = 0.90;
const BAR_SEEDS: usize = 3;

/// Each shipped student row against [`BAR_AVERAGE`] and the rest: per task, what it still
/// lacks.
fn bar_table(rows: &[Row], tasks: &[String], md: &mut String) {
    let shipped: Vec<&Row> = rows.iter().filter(|r| r.shipped).collect();
    if shipped.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "
Against the bar the shipped recipe aims at: retention ≥ {:.0} % on every task and ≥ {:.0} % on the GLUE average, margin retention ≥ {:.0} % on every task, {BAR_SEEDS} seeds each (%, mean over seeds; what each still lacks):
",
        100.0 * BAR_TASK,
        100.0 * BAR_AVERAGE,
        100.0 * BAR_MARGIN
    );
    let _ = writeln!(
        md,
        "| model | task | seeds | retention | margin retention | still lacks |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let glue = |t: &str| crate::data::Task::find(t).is_ok_and(|x| x.is_glue());
    let mean = |v: &[f64]| (!v.is_empty()).then(|| mean_std(v).0);
    let pct = |v: Option<f64>| v.map_or("–".into(), |v| format!("{:.1}", 100.0 * v));
    for row in shipped {
        let mut glue_means = Vec::new();
        for t in tasks {
            let get = |m: &PerTask| m.get(t).cloned().unwrap_or_default();
            let (ret, margin) = (get(&row.retention), get(&row.margin));
            let (r, m) = (mean(&ret), mean(&margin));
            if glue(t) {
                glue_means.extend(r);
            }
            let mut lacks = Vec::new();
            if ret.is_empty() {
                lacks.push("a run".to_string());
            } else if ret.len() < BAR_SEEDS {
                let more = BAR_SEEDS - ret.len();
                lacks.push(format!(
                    "{more} more seed{}",
                    if more > 1 { "s" } else { "" }
                ));
            }
            if r.is_some_and(|r| r < BAR_TASK) {
                lacks.push(format!("retention ≥ {:.0} %", 100.0 * BAR_TASK));
            }
            if !ret.is_empty() && m.is_none_or(|m| m < BAR_MARGIN) {
                let mut lack = format!("margin retention ≥ {:.0} %", 100.0 * BAR_MARGIN);
                if let Some([_, low, high]) = row.margin_interval(t)
                    && low < BAR_MARGIN
                    && high >= BAR_MARGIN
                {
                    let _ = write!(
                        lack,
                        " (inside its 95 % interval, {:.0}–{:.0} %: not resolved on these examples)",
                        100.0 * low,
                        100.0 * high
                    );
                }
                lacks.push(lack);
            }
            let _ = writeln!(
                md,
                "| {} | {t} | {} | {} | {} | {} |",
                row.label,
                ret.len(),
                pct(r),
                pct(m),
                if lacks.is_empty() {
                    "nothing".to_string()
                } else {
                    lacks.join(", ")
                }
            );
        }
        let glue_tasks = tasks.iter().filter(|t| glue(t)).count();
        let avg = mean(&glue_means);
        let mut lacks = Vec::new();
        if glue_means.len() < glue_tasks {
            lacks.push("a run on every task".to_string());
        }
        if avg.is_some_and(|a| a < BAR_AVERAGE) {
            lacks.push(format!("retention ≥ {:.0} %", 100.0 * BAR_AVERAGE));
        }
        let _ = writeln!(
            md,
            "| {} | GLUE average | | {} | | {} |",
            row.label,
            pct(avg),
            if lacks.is_empty() {
                "nothing".to_string()
            } else {
                lacks.join(", ")
            }
        );
    }
}

fn primary_is_accuracy(task: &str) -> bool {
    crate::data::Task::find(task).is_ok_and(|t| t.primary == crate::metric::Metric::Accuracy)
}

/// What dev can tell apart: each shipped student row's accuracy gap to its teacher with a paired
/// 95 % interval over the dev examples ([`crate::metric::paired_accuracy_gap`]), and on the
/// tasks scored by accuracy the margin retention that interval allows. A margin bar inside the
/// interval is one the dev set cannot show met or missed.
fn resolution_table(rows: &[Row], md: &mut String) {
    let mut lines = Vec::new();
    for row in rows.iter().filter(|r| r.shipped) {
        for task in row.parted.keys() {
            let Some((n, gap)) = row.paired_gap(task) else {
                continue;
            };
            let points = |v: f64| format!("{:+.1}", 100.0 * v);
            let margin = row.margin_interval(task).map_or("–".to_string(), |m| {
                let pct = |v: f64| format!("{:.0}", 100.0 * v);
                format!("{} [{}, {}]", pct(m[0]), pct(m[1]), pct(m[2]))
            });
            let verdict = if gap.high() < 0.0 {
                "below its teacher"
            } else if gap.low() > 0.0 {
                "above its teacher"
            } else {
                "not significantly different from its teacher"
            };
            lines.push(format!(
                "| {} | {task} | {} | {n} | {} [{}, {}] | {margin} | {verdict} |",
                row.label,
                row.parted[task].len(),
                points(gap.mean),
                points(gap.low()),
                points(gap.high()),
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "
What dev can tell apart: each student's accuracy minus its teacher's (points; classification tasks with `mpcformer compare` records), with a paired 95 % interval over the examples scored (dev; IMDb: the 1,000 drawn test reviews) that takes the seeds' errors as perfectly correlated (the widest case), and on the tasks scored by accuracy the margin retention (%) that interval allows. A bar inside the interval is one this dev set cannot show met or missed:
"
    );
    let _ = writeln!(
        md,
        "| model | task | seeds | examples | student − teacher accuracy [95 % interval] | margin retention [95 % interval] | on dev, the student is |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for l in lines {
        let _ = writeln!(md, "{l}");
    }
}

/// Per student and task: the reported score (stage 2's best checkpoint on dev) beside the same
/// runs' last evaluation, and retention from the latter: how much choosing on dev adds.
fn selection_table(rows: &[Row], md: &mut String) {
    let students: Vec<&Row> = rows
        .iter()
        .filter(|r| !r.teacher && !r.last.is_empty())
        .collect();
    if students.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "
Stage 2 keeps the checkpoint that scored best on dev, as the reference does, so a reported student score is chosen on the set it is scored on (its teacher's epoch and learning rate are too, as `run_glue` users choose them). What that choice adds (dev, ×100, mean ± std over seeds): the reported score beside the same runs' score at their last evaluation, and retention and margin retention from the last:
"
    );
    let _ = writeln!(
        md,
        "| model | task | reported (best on dev) | last evaluation | retention at last | margin retention at last |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for row in students {
        let get = |m: &PerTask, t: &str| m.get(t).cloned().unwrap_or_default();
        for t in row.last.keys() {
            let _ = writeln!(
                md,
                "| {} | {t} | {} | {} | {} | {} |",
                row.label,
                cell(&get(&row.per_task, t), 100.0),
                cell(&get(&row.last, t), 100.0),
                cell(&get(&row.last_retention, t), 100.0),
                cell(&get(&row.last_margin, t), 100.0)
            );
        }
    }
}

/// Where students (and reseeded teachers) part from their teachers: the runs and reseeds with a
/// recorded [`Parting`], task by task.
fn parting_table(runs: &[Run], md: &mut String) {
    let mut lines: Vec<(String, String)> = Vec::new();
    let pct = |v: f64| format!("{:.1}", 100.0 * v);
    let line = |task: &str, who: &str, agreement: Option<f64>, p: &Parting| {
        format!(
            "| {who} | {task} | {} | {} ({}) | {} ({}) | {} · {} |",
            agreement.map_or("–".into(), pct),
            pct(p.agreement[0]),
            pct(p.teacher_accuracy[0]),
            pct(p.agreement[1]),
            pct(p.teacher_accuracy[1]),
            p.teacher_right,
            p.student_right
        )
    };
    for r in runs {
        if let Some(p) = &r.parting {
            lines.push((r.task.clone(), line(&r.task, &r.name, r.agreement, p)));
        }
        for t in &r.teacher_reseeds {
            if let Some(p) = &t.parting {
                let who = format!("teacher of {}, reseeded (seed {})", r.name, t.seed);
                lines.push((r.task.clone(), line(&r.task, &who, Some(t.agreement), p)));
            }
        }
    }
    if lines.is_empty() {
        return;
    }
    lines.sort();
    let _ = writeln!(
        md,
        "
Where each student parts from its teacher (dev, %; `mpcformer compare`, classification tasks): the examples split at the teacher's median confidence (its top-class probability), with the agreement on each half and the teacher's accuracy there in brackets, and the examples the two answer differently, by which of them is right. Disagreements blind to the right answer fall in the ratio of the teacher's right answers to its errors; a teacher fine-tuned again with another seed is the yardstick:
"
    );
    let _ = writeln!(
        md,
        "| model | task | agreement | teacher's surer half: agreement (teacher right) | other half: agreement (teacher right) | they differ: teacher right · student right |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for (_, l) in lines {
        let _ = writeln!(md, "{l}");
    }
}

/// What each lever was worth: every variant against the run that fine-tuned its teacher, with
/// the same seed (so the same teacher and data order; only the lever differs), in points of the
/// task's primary dev metric and of agreement. One seed each: differences of about a point are
/// within seed-to-seed spread.
fn levers_table(runs: &[Run], md: &mut String) {
    let mut lines = Vec::new();
    for r in runs.iter().filter(|r| r.label.is_some()) {
        let base = lever_base(runs, r);
        if std::ptr::eq(base, r) || base.seed != r.seed || base.task != r.task {
            continue;
        }
        let (Some(s), Some(b)) = (r.student_primary, base.student_primary) else {
            continue;
        };
        let lever = lever_name(base, r);
        if lever.is_empty() {
            continue;
        }
        let delta = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) => format!("{:.1} ({:+.1})", 100.0 * x, 100.0 * (x - y)),
            (Some(x), None) => format!("{:.1}", 100.0 * x),
            _ => "–".into(),
        };
        lines.push(format!(
            "| {} | {lever} | {} | {} | {} |",
            r.task,
            base.name,
            delta(Some(s), Some(b)),
            delta(r.agreement, base.agreement)
        ));
    }
    if lines.is_empty() {
        return;
    }
    lines.sort();
    let _ = writeln!(
        md,
        "
What each lever was worth: each labelled variant against the run it varies, on the same teacher and seed (the run labelled as its label's stem, else the shipped recipe's; dev, ×100; the change in brackets):
"
    );
    let _ = writeln!(md, "| task | lever | against | student | agreement |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for l in lines {
        let _ = writeln!(md, "{l}");
    }
}

/// What the labelled variant `r` is measured against, among the runs on its teacher with its
/// seed: the run labelled as its label's longest stem (`"2 + 2"` for `"2 + 2, T = 2"`), else the
/// shipped recipe's (unlabelled) run with the variant's approximations, else with any, else the
/// run that made the teacher.
fn lever_base<'a>(runs: &'a [Run], r: &'a Run) -> &'a Run {
    let o = origin(runs, r);
    let siblings = || {
        runs.iter().filter(move |x| {
            x.seed == r.seed && !std::ptr::eq(*x, r) && std::ptr::eq(origin(runs, x), o)
        })
    };
    let label = r.label.as_deref().unwrap_or_default();
    label
        .rmatch_indices(", ")
        .map(|(i, _)| &label[..i])
        .find_map(|stem| siblings().find(|x| x.label.as_deref() == Some(stem)))
        .or_else(|| siblings().find(|x| x.label.is_none() && x.student_approx == r.student_approx))
        .or_else(|| siblings().find(|x| x.label.is_none()))
        .unwrap_or(o)
}

/// How `r` differs from `base`: its kind, its approximations, and its label less the base's.
fn lever_name(base: &Run, r: &Run) -> String {
    let mut parts: Vec<String> = Vec::new();
    if r.kind != base.kind
        && let Some(k) = r.kind
    {
        parts.push(k.label().to_string());
    }
    if r.student_approx != base.student_approx
        && let Some(a) = &r.student_approx
    {
        parts.push(a.clone());
    }
    match (&r.label, &base.label) {
        (Some(l), Some(b)) if l != b => {
            parts.push(l.strip_prefix(&format!("{b}, ")).unwrap_or(l).to_string())
        }
        (Some(l), None) => parts.push(l.clone()),
        _ => {}
    }
    parts.join(", ")
}

/// Wall time to a student with the shipped recipe (the runs without a label), per task and
/// approximation: the teacher's fine-tuning (its whole sweep) and both stages.
fn time_table(runs: &[Run], md: &mut String) {
    let mut groups: BTreeMap<(String, String), Vec<&Run>> = BTreeMap::new();
    for r in runs.iter().filter(|r| {
        r.label.is_none() && r.kind == Some(Kind::Distilled) && r.student_approx.is_some()
    }) {
        groups
            .entry((r.task.clone(), r.student_approx.clone().unwrap_or_default()))
            .or_default()
            .push(r);
    }
    if groups.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "
Time to a student with the shipped recipe (this machine, seconds; per stage the fastest seed, since runs share the machine with builds and checks; stage 1 with the fitted start's fit where the recipe has one), and stage 1's epochs against the reference's:
"
    );
    let _ = writeln!(
        md,
        "| task | student | teacher fine-tuning | stage 1 | stage 2 | total (min) | stage-1 epochs: here / reference |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for ((task, approx), rs) in &groups {
        let fastest =
            |f: &dyn Fn(&Run) -> Option<f64>| rs.iter().filter_map(|r| f(r)).min_by(f64::total_cmp);
        let teacher = fastest(&|r| finetune_wall(origin(runs, r)));
        // The fitted start's fit is part of getting a student through stage 1.
        let s1 = fastest(&|r| {
            let fit = r.stage_wall_s.get("fit").copied().unwrap_or(0.0);
            r.stage_wall_s.get("stage1").map(|s| s + fit)
        });
        let s2 = fastest(&|r| r.stage_wall_s.get("stage2").copied());
        let fmt = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
        let total = [teacher, s1, s2].iter().flatten().sum::<f64>() / 60.0;
        let epochs = rs[0].stage1_epochs.map_or("–".into(), |e| format!("{e}"));
        let _ = writeln!(
            md,
            "| {task} | {approx} | {} | {} | {} | {total:.0} | {epochs} / {} |",
            fmt(teacher),
            fmt(s1),
            fmt(s2),
            crate::train::recipe::reference_stage1_epochs(task)
        );
    }
}

/// The teacher's fine-tuning time: its whole sweep when it had one.
fn finetune_wall(r: &Run) -> Option<f64> {
    let sweep: Vec<f64> = r
        .stage_wall_s
        .iter()
        .filter(|(k, _)| k.starts_with("finetune "))
        .map(|(_, v)| *v)
        .collect();
    if sweep.is_empty() {
        r.stage_wall_s.get("finetune").copied()
    } else {
        Some(sweep.iter().sum())
    }
}

fn short(model: &str) -> String {
    Path::new(model)
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_else(|| model.to_string())
}

/// The lines that delimit the generated tables in a hand-written document (`--update`).
pub const BEGIN: &str = "<!-- mpcformer report: begin -->";
pub const END: &str = "<!-- mpcformer report: end -->";

/// The generated block of `doc` (between [`BEGIN`] and [`END`], without them), if it has one.
pub fn generated(doc: &str) -> Option<&str> {
    let start = doc.find(BEGIN)? + BEGIN.len();
    let end = start + doc[start..].find(END)?;
    Some(doc[start..end].trim_matches('\n'))
}

/// `doc` with its generated block replaced by `md`; the prose around it is untouched.
pub fn splice(doc: &str, md: &str) -> Result<String> {
    let Some(start) = doc.find(BEGIN) else {
        bail!("no `{BEGIN}` line: add it and `{END}` where the tables go");
    };
    let body = start + BEGIN.len();
    let Some(end) = doc[body..].find(END).map(|e| body + e) else {
        bail!("`{BEGIN}` without a `{END}` after it");
    };
    Ok(format!(
        "{}\n\n{}\n\n{}",
        &doc[..body],
        md.trim_matches('\n'),
        &doc[end..]
    ))
}

/// The Markdown report: main table (primary metric ×100 per task, average, retention), then
/// every metric per task, then wall times.
pub fn markdown(runs: &[Run]) -> String {
    let tasks: Vec<String> = {
        let mut t: Vec<String> = runs.iter().map(|r| r.task.clone()).collect();
        t.sort();
        t.dedup();
        t
    };
    let rows = rows(runs);
    let mut md = String::new();
    headline_table(&rows, &tasks, &mut md);
    teachers_table(runs, &mut md);
    fidelity_table(&rows, &mut md);
    bar_table(&rows, &tasks, &mut md);
    resolution_table(&rows, &mut md);
    selection_table(&rows, &mut md);
    parting_table(runs, &mut md);
    levers_table(runs, &mut md);
    time_table(runs, &mut md);
    metrics_table(runs, &tasks, &mut md);
    runs_table(runs, &mut md);
    md
}

/// The paper's table: each row's primary metric per task, the GLUE average and retention.
fn headline_table(rows: &[Row], tasks: &[String], md: &mut String) {
    let title = |t: &str| {
        crate::data::Task::find(t)
            .map(|x| format!("{} ({})", x.title, x.primary.name()))
            .unwrap_or_else(|_| t.to_string())
    };
    // Averages run over GLUE's tasks only; IMDb gets its column after the average, as the paper
    // reports it.
    let glue = |t: &str| crate::data::Task::find(t).is_ok_and(|x| x.is_glue());
    let (averaged, others): (Vec<&String>, Vec<&String>) = tasks.iter().partition(|t| glue(t));
    let avg_title = if others.is_empty() {
        "average"
    } else {
        "GLUE average"
    };
    let titles = |ts: &[&String]| {
        ts.iter()
            .map(|t| format!(" {} |", title(t)))
            .collect::<String>()
    };
    let _ = writeln!(
        md,
        "| model |{} {avg_title} |{} retention (student / teacher) |",
        titles(&averaged),
        titles(&others)
    );
    let _ = writeln!(md, "|---|{}---|---|", "---|".repeat(tasks.len()));
    for row in rows {
        let means: Vec<f64> = averaged
            .iter()
            .filter_map(|t| {
                row.per_task
                    .get(*t)
                    .filter(|v| !v.is_empty())
                    .map(|v| mean_std(v).0)
            })
            .collect();
        let avg = if means.len() == averaged.len() && !means.is_empty() {
            format!(
                "{:.1}",
                100.0 * means.iter().sum::<f64>() / means.len() as f64
            )
        } else {
            "–".into()
        };
        let retention = retention_cell(row, &glue);
        let cells = |ts: &[&String]| {
            ts.iter()
                .map(|t| {
                    let v = row.per_task.get(*t).map(Vec::as_slice).unwrap_or(&[]);
                    format!(" {} |", cell(v, 100.0))
                })
                .collect::<String>()
        };
        let _ = writeln!(
            md,
            "| {} |{} {avg} |{} {retention} |",
            row.label,
            cells(&averaged),
            cells(&others)
        );
    }
}

/// A row's retention: its mean over GLUE's tasks with each task's, then the others'.
fn retention_cell(row: &Row, glue: &dyn Fn(&str) -> bool) -> String {
    if row.retention.is_empty() {
        String::new()
    } else {
        let part = |(t, v): (&String, &Vec<f64>)| format!("{t} {}", cell(v, 100.0));
        let (inside, outside): (Vec<_>, Vec<_>) = row.retention.iter().partition(|(t, _)| glue(t));
        let per: Vec<f64> = inside.iter().map(|(_, v)| mean_std(v).0).collect();
        let rest: Vec<String> = outside.into_iter().map(part).collect();
        let rest = if rest.is_empty() {
            String::new()
        } else {
            format!("; {}", rest.join(", "))
        };
        if per.is_empty() {
            rest.trim_start_matches("; ").to_string()
        } else {
            let parts: Vec<String> = inside.into_iter().map(part).collect();
            format!(
                "{:.1}% ({}){rest}",
                100.0 * per.iter().sum::<f64>() / per.len() as f64,
                parts.join(", ")
            )
        }
    }
}

/// Every metric of every model, per task, over its seeds.
fn metrics_table(runs: &[Run], tasks: &[String], md: &mut String) {
    let _ = writeln!(md, "\nEvery metric (dev, ×100; mean ± std over seeds):\n");
    let _ = writeln!(md, "| task | model | metrics | seeds |");
    let _ = writeln!(md, "|---|---|---|---|");
    for t in tasks {
        let mut groups: BTreeMap<String, SeedGroup> = BTreeMap::new();
        let mut counted = std::collections::BTreeSet::new();
        for r in runs.iter().filter(|r| &r.task == t) {
            let label = with_label("teacher", &teacher_label(runs, r), &r.teacher_model);
            let key = teacher_key(runs, r);
            let seed = key.1;
            if counted.insert(key) {
                let g = groups.entry(label).or_default();
                g.0.push(r.teacher_metrics.clone());
                g.1.push(seed);
            }
            if let (Some(k), Some(a), Some(m)) = (r.kind, &r.student_approx, &r.student_metrics) {
                let variant = match &r.label {
                    Some(l) => format!("{a}, {l}"),
                    None => a.clone(),
                };
                let g = groups
                    .entry(format!("{} {variant}", k.label()))
                    .or_default();
                g.0.push(m.clone());
                g.1.push(r.seed);
            }
        }
        for (label, (ms, seeds)) in groups {
            let names: Vec<String> = ms[0].keys().cloned().collect();
            let parts: Vec<String> = names
                .iter()
                .map(|n| {
                    let v: Vec<f64> = ms.iter().filter_map(|m| m.get(n).copied()).collect();
                    format!("{n} {}", cell(&v, 100.0))
                })
                .collect();
            let _ = writeln!(md, "| {t} | {label} | {} | {seeds:?} |", parts.join(", "));
        }
    }
}

/// Each run's wall time per stage, and where it took a stage from another run.
fn runs_table(runs: &[Run], md: &mut String) {
    let _ = writeln!(md, "\nRuns (wall time per stage, seconds):\n");
    let _ = writeln!(md, "| run | task | seed | stages |");
    let _ = writeln!(md, "|---|---|---|---|");
    for r in runs {
        let stages: Vec<String> = r
            .stage_wall_s
            .iter()
            .map(|(k, v)| match k.as_str() {
                "finetune" if let Some(from) = &r.teacher_from => {
                    format!("finetune: teacher of {from}")
                }
                "stage1" if let Some(from) = &r.stage1_from => format!("stage1: of {from}"),
                _ => format!("{k} {v:.0}"),
            })
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            r.name,
            r.task,
            r.seed,
            stages.join(", ")
        );
    }
}

fn line_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, s)| s.iter().copied()).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_label)
        .draw()?;
    for (i, (name, s)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn by_stage(points: &[Point]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut m: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for p in points {
        m.entry(p.stage.clone())
            .or_default()
            .push((p.step, p.value));
    }
    m.into_iter().collect()
}

/// Writes `<run>-loss.svg` and `<run>-dev.svg` per run and `teacher-vs-student.svg`; returns the
/// files written.
pub fn plots(runs: &[Run], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    for r in runs {
        let charts = [
            ("loss", "training loss", "loss", &r.losses),
            ("dev", "dev metric", "primary metric", &r.dev),
        ];
        for (file, title, y_label, points) in charts {
            let p = dir.join(format!("{}-{file}.svg", r.name));
            line_chart(
                &p,
                &format!("{}: {title}", r.name),
                y_label,
                &by_stage(points),
            )?;
            out.push(p);
        }
    }
    let rows = rows(runs);
    let tasks: Vec<String> = {
        let mut t: Vec<String> = runs.iter().map(|r| r.task.clone()).collect();
        t.sort();
        t.dedup();
        t
    };
    let p = dir.join("teacher-vs-student.svg");
    let root = SVGBackend::new(&p, (120 + 160 * tasks.len() as u32, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = rows.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption("dev score per task (×100)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..tasks.len() as f64, 0.0..100.0)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(tasks.len().max(1))
        .x_label_formatter(&|x| tasks.get(x.floor() as usize).cloned().unwrap_or_default())
        .draw()?;
    for (i, row) in rows.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let bars: Vec<Rectangle<(f64, f64)>> = tasks
            .iter()
            .enumerate()
            .filter_map(|(t, task)| {
                let v = row.per_task.get(task).filter(|v| !v.is_empty())?;
                let x = t as f64 + 0.1 + 0.8 * i as f64 / n as f64;
                let w = 0.8 / n as f64;
                Some(Rectangle::new(
                    [(x, 0.0), (x + w, 100.0 * mean_std(v).0)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(row.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    out.push(p);
    Ok(out)
}

/// Copies each run's metrics files (no weights) to `<dest>/<run name>/`.
pub fn save_runs(runs: &[Run], dest: &Path) -> Result<()> {
    for r in runs {
        let d = dest.join(&r.name);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        for f in RUN_FILES {
            let from = r.dir.join(f);
            if from.is_file() {
                let bytes =
                    std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
                crate::io::write_atomic(&d.join(f), &bytes)?;
            }
        }
    }
    Ok(())
}
