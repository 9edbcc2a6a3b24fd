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

/// Files of a run that a report needs (and `--save-runs` keeps).
pub const RUN_FILES: &[&str] = &["summary.json", "recipe.toml", "metrics.jsonl"];

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
    pub losses: Vec<Point>,
    /// Primary dev metric at each evaluation during training.
    pub dev: Vec<Point>,
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

/// Reads a run directory.
pub fn load_run(dir: &Path) -> Result<Run> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).with_context(|| format!("{}/{f}", dir.display()))
    };
    let summary: Value = serde_json::from_str(&read("summary.json")?)
        .with_context(|| format!("{}/summary.json", dir.display()))?;
    let recipe: toml::Value = toml::from_str(&read("recipe.toml")?)
        .with_context(|| format!("{}/recipe.toml", dir.display()))?;
    let stages: Vec<String> = recipe
        .get("stages")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let random_init = recipe
        .get("student")
        .and_then(|s| s.get("init"))
        .and_then(|i| i.as_str())
        == Some("random");
    let kind = if stages.iter().any(|s| s == "stage1" || s == "stage2") {
        Some(Kind::Distilled)
    } else if stages.iter().any(|s| s == "supervised") {
        Some(if random_init {
            Kind::WithoutPD
        } else {
            Kind::WithoutD
        })
    } else {
        None
    };
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
    let student = summary.get("student").filter(|s| !s.is_null());
    let task = summary["task"].as_str().unwrap_or("?").to_string();
    let primary_name = crate::data::Task::find(&task)
        .map(|t| t.primary.name().to_string())
        .unwrap_or_default();
    let (mut losses, mut dev) = (Vec::new(), Vec::new());
    // A stage finished by an earlier process of a resumed run took no time in the last one:
    // its wall time is in its `done` record.
    let mut stage_wall_s = metrics(&summary["stage_wall_s"]);
    if let Ok(text) = read("metrics.jsonl") {
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
            if let Some(m) = v["eval"][&primary_name].as_f64() {
                dev.push(Point {
                    stage: stage.into(),
                    step,
                    value: m,
                });
            }
        }
    }
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
        losses,
        dev,
    })
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

/// One row of the main table: values per task (over seeds).
struct Row {
    label: String,
    per_task: BTreeMap<String, Vec<f64>>,
    retention: BTreeMap<String, Vec<f64>>,
}

fn rows(runs: &[Run]) -> Vec<Row> {
    let mut out: BTreeMap<(String, u8, String), Row> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in runs {
        let key = (r.teacher_model.clone(), 0, String::new());
        let row = out.entry(key).or_insert_with(|| Row {
            label: format!("teacher ({})", short(&r.teacher_model)),
            per_task: BTreeMap::new(),
            retention: BTreeMap::new(),
        });
        // Runs of one seed fine-tune the same teacher: it counts once per seed.
        if seen.insert((r.teacher_model.clone(), r.task.clone(), r.seed)) {
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
                per_task: BTreeMap::new(),
                retention: BTreeMap::new(),
            });
            row.per_task.entry(r.task.clone()).or_default().push(s);
            row.retention
                .entry(r.task.clone())
                .or_default()
                .push(s / r.teacher_primary);
        }
    }
    out.into_values().collect()
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
    for row in &rows {
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
        let retention = if row.retention.is_empty() {
            String::new()
        } else {
            let part = |(t, v): (&String, &Vec<f64>)| format!("{t} {}", cell(v, 100.0));
            let (inside, outside): (Vec<_>, Vec<_>) =
                row.retention.iter().partition(|(t, _)| glue(t));
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
        };
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
    let _ = writeln!(md, "\nEvery metric (dev, ×100; mean ± std over seeds):\n");
    let _ = writeln!(md, "| task | model | metrics | seeds |");
    let _ = writeln!(md, "|---|---|---|---|");
    for t in &tasks {
        let mut groups: BTreeMap<String, SeedGroup> = BTreeMap::new();
        for r in runs.iter().filter(|r| &r.task == t) {
            let g = groups
                .entry(format!("teacher ({})", short(&r.teacher_model)))
                .or_default();
            if !g.1.contains(&r.seed) {
                g.0.push(r.teacher_metrics.clone());
                g.1.push(r.seed);
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
    let _ = writeln!(md, "\nRuns (wall time per stage, seconds):\n");
    let _ = writeln!(md, "| run | task | seed | stages |");
    let _ = writeln!(md, "|---|---|---|---|");
    for r in runs {
        let stages: Vec<String> = r
            .stage_wall_s
            .iter()
            .map(|(k, v)| match (&r.teacher_from, k.as_str()) {
                (Some(from), "finetune") => format!("finetune: teacher of {from}"),
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
    md
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
