//! `mpcformer report` on small synthetic run directories: grouping over seeds, mean ± std,
//! averages, retention, plots, and `--save-runs`.

use std::path::Path;
use std::process::Command;

use mpcformer::report::{find_runs, markdown, mean_std, plots, reseed_file, save_runs};

/// `mpcformer report <args>`.
fn report_cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mpcformer"))
        .arg("report")
        .args(args)
        .output()
        .unwrap()
}

/// Writes a finished run as `mpcformer run` would (only the files a report reads).
fn fake_run(
    root: &Path,
    name: &str,
    task: &str,
    seed: u64,
    (teacher, student): (f64, f64),
    stages: &str,
    init: &str,
) {
    fake_labelled_run(
        root,
        name,
        task,
        seed,
        (teacher, student),
        stages,
        init,
        None,
    );
}

#[allow(clippy::too_many_arguments)]
fn fake_labelled_run(
    root: &Path,
    name: &str,
    task: &str,
    seed: u64,
    (teacher, student): (f64, f64),
    stages: &str,
    init: &str,
    label: Option<&str>,
) {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let summary = serde_json::json!({
        "name": name, "task": task, "seed": seed, "recipe_hash": "x",
        "teacher": {"approximations": "gelu+softmax", "metrics": {"accuracy": teacher}, "primary": teacher},
        "student": {"approximations": "quad+2quad", "metrics": {"accuracy": student}, "primary": student},
        "retention": student / teacher,
        "stage_wall_s": {"finetune": 10.0, "stage1": 20.0},
        "train_examples": 10, "eval_examples": 5
    });
    std::fs::write(d.join("summary.json"), summary.to_string()).unwrap();
    std::fs::write(
        d.join("recipe.toml"),
        format!(
            "name = {name:?}\n{}stages = {stages}\n[teacher]\nmodel = \"models/minilm\"\n[student]\ninit = {init:?}\n",
            label.map_or(String::new(), |l| format!("label = {l:?}\n"))
        ),
    )
    .unwrap();
    let mut lines = String::new();
    for step in 1..=5 {
        lines += &format!(
            "{{\"stage\":\"stage1\",\"step\":{step},\"loss\":{}}}\n",
            1.0 / step as f64
        );
        lines += &format!(
            "{{\"stage\":\"stage2\",\"step\":{step},\"eval\":{{\"accuracy\":{}}}}}\n",
            0.5 + 0.01 * step as f64
        );
    }
    // The finetune stage finished in an earlier process of a resumed run: its `done` record.
    lines += "{\"done\":true,\"stage\":\"finetune\",\"steps\":3,\"wall_s\":123.0}\n";
    std::fs::write(d.join("metrics.jsonl"), lines).unwrap();
}

#[test]
fn tables_group_seeds_and_compute_retention() {
    let root = tempfile::tempdir().unwrap();
    let distill = r#"["finetune", "stage1", "stage2"]"#;
    fake_run(
        root.path(),
        "rte-s1",
        "rte",
        1,
        (0.60, 0.57),
        distill,
        "teacher",
    );
    fake_run(
        root.path(),
        "rte-s2",
        "rte",
        2,
        (0.70, 0.70),
        distill,
        "teacher",
    );
    fake_run(
        root.path(),
        "mrpc-s1",
        "mrpc",
        1,
        (0.80, 0.76),
        distill,
        "teacher",
    );
    fake_run(
        root.path(),
        "rte-wod-s1",
        "rte",
        1,
        (0.60, 0.50),
        r#"["finetune", "supervised"]"#,
        "teacher",
    );
    fake_run(
        root.path(),
        "rte-wopd-s1",
        "rte",
        1,
        (0.60, 0.45),
        r#"["finetune", "supervised"]"#,
        "random",
    );

    let runs = find_runs(&[root.path().to_path_buf()]).unwrap();
    assert_eq!(runs.len(), 5);
    let md = markdown(&runs);
    // Teacher RTE over seeds 1 and 2 (the w/o-d runs' seed-1 teacher counts once): 65.0 ± 7.1.
    let (m, s) = mean_std(&[0.60, 0.70]);
    assert!((m - 0.65).abs() < 1e-12 && (s - 0.0707107).abs() < 1e-6);
    assert!(
        md.contains("| teacher (minilm) | 80.0 | 65.0 ± 7.1 (n=2) | 72.5 |"),
        "{md}"
    );
    // Student: RTE mean 63.5 ± 9.2, MRPC 76.0, average 69.8; retention per run: 0.95, 1.0, 0.95.
    assert!(
        md.contains("| MPCFormer quad+2quad (minilm) | 76.0 | 63.5 ± 9.2 (n=2) | 69.8 |"),
        "{md}"
    );
    assert!(
        md.contains("96.2% (mrpc 95.0, rte 97.5 ± 3.5 (n=2))"),
        "{md}"
    );
    assert!(
        md.contains("| w/o d quad+2quad (minilm) | – | 50.0 | – |"),
        "{md}"
    );
    // Against the bar: RTE has 2 of 3 seeds and no trivial baseline (so no margin), MRPC one
    // seed under 97 %, the GLUE average (95.0 + 97.5) / 2 under 97 %.
    assert!(
        md.contains(
            "| MPCFormer quad+2quad (minilm) | rte | 2 | 97.5 | – | 1 more seed, margin retention ≥ 90 % |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| MPCFormer quad+2quad (minilm) | mrpc | 1 | 95.0 | – | 2 more seeds, margin retention ≥ 90 % |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| MPCFormer quad+2quad (minilm) | GLUE average | | 96.2 | | retention ≥ 97 % |"
        ),
        "{md}"
    );
    assert!(
        !md.contains("| w/o d quad+2quad (minilm) | rte | 1 |"),
        "{md}"
    );
    assert!(
        md.contains("| w/o p,d quad+2quad (minilm) | – | 45.0 | – |"),
        "{md}"
    );
    assert!(
        md.contains("| rte | teacher (minilm) | accuracy 65.0 ± 7.1 (n=2) | [1, 2] |"),
        "{md}"
    );

    let dir = root.path().join("plots");
    let files = plots(&runs, &dir).unwrap();
    assert_eq!(files.len(), 2 * 5 + 1);
    let svg = std::fs::read_to_string(dir.join("teacher-vs-student.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("rect"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    let loss = std::fs::read_to_string(dir.join("rte-s1-loss.svg")).unwrap();
    assert!(loss.contains("polyline") || loss.contains("path"));

    let kept = root.path().join("kept");
    save_runs(&runs, &kept).unwrap();
    assert!(kept.join("rte-s2/metrics.jsonl").is_file());
    assert_eq!(markdown(&find_runs(&[kept]).unwrap()), md);
}

#[test]
fn a_labelled_variation_is_its_own_row() {
    let root = tempfile::tempdir().unwrap();
    let distill = r#"["finetune", "stage1", "stage2"]"#;
    fake_run(
        root.path(),
        "stsb-s1",
        "stsb",
        1,
        (0.84, 0.57),
        distill,
        "teacher",
    );
    fake_labelled_run(
        root.path(),
        "stsb-long-s1",
        "stsb",
        1,
        (0.84, 0.80),
        distill,
        "teacher",
        Some("stage 2 ×5"),
    );
    // The long run took its teacher from stsb-s1 (`teacher.finetuned_run`).
    let recipe = root.path().join("stsb-long-s1/recipe.toml");
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        "[teacher]\n",
        "[teacher]\nfinetuned_run = \"checkpoints/stsb-s1\"\n",
    );
    std::fs::write(&recipe, text).unwrap();
    let runs = find_runs(&[root.path().to_path_buf()]).unwrap();
    let md = markdown(&runs);
    // Not averaged together: 57.0 and 80.0 each alone, the teacher counted once.
    assert!(
        md.contains("| MPCFormer quad+2quad (minilm) | 57.0 |"),
        "{md}"
    );
    assert!(
        md.contains("| MPCFormer quad+2quad, stage 2 ×5 (minilm) | 80.0 |"),
        "{md}"
    );
    assert!(md.contains("| teacher (minilm) | 84.0 |"), "{md}");
    // No trivial baseline recorded, but under a correlation every constant scores 0: margin
    // retention equals retention, 57 / 84.
    assert!(
        md.contains("| MPCFormer quad+2quad (minilm) | stsb | 67.9 | 67.9 | – |"),
        "{md}"
    );
    // Stage times: the `done` record's (123 s) over the summary's (10 s) for finetune.
    assert!(
        md.contains("| stsb-s1 | stsb | 1 | finetune 123, stage1 20 |"),
        "{md}"
    );
    assert!(
        md.contains("| stsb-long-s1 | stsb | 1 | finetune: teacher of stsb-s1, stage1 20 |"),
        "{md}"
    );
    assert!(
        md.contains("| stsb | MPCFormer quad+2quad, stage 2 ×5 | accuracy 80.0 | [1] |"),
        "{md}"
    );
}

#[test]
fn report_cli_writes_markdown() {
    let root = tempfile::tempdir().unwrap();
    fake_run(
        root.path(),
        "sst2-s1",
        "sst2",
        1,
        (0.9, 0.88),
        r#"["stage1", "stage2"]"#,
        "teacher",
    );
    let out = root.path().join("tables.md");
    let st = report_cli(&[
        root.path().as_os_str(),
        "--output".as_ref(),
        out.as_os_str(),
    ]);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let md = std::fs::read_to_string(out).unwrap();
    assert!(
        md.contains("SST-2 (accuracy)") && md.contains("97.8%"),
        "{md}"
    );
    let st = report_cli(&["/nonexistent-runs".as_ref()]);
    assert!(!st.status.success());
}

#[test]
fn update_replaces_only_the_generated_block() {
    use mpcformer::report::{BEGIN, END, generated, splice};
    let root = tempfile::tempdir().unwrap();
    fake_run(
        root.path(),
        "rte-s1",
        "rte",
        1,
        (0.60, 0.57),
        r#"["finetune", "stage1", "stage2"]"#,
        "teacher",
    );
    let run = root.path().join("rte-s1");
    let doc = root.path().join("RESULTS.md");
    let prose = format!("# Results\n\nWritten by hand.\n\n{BEGIN}\nold tables\n{END}\n\nAfter.\n");
    std::fs::write(&doc, &prose).unwrap();
    let st = report_cli(&[run.as_os_str(), "--update".as_ref(), doc.as_os_str()]);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let updated = std::fs::read_to_string(&doc).unwrap();
    let md = markdown(&find_runs(std::slice::from_ref(&run)).unwrap());
    assert_eq!(generated(&updated), Some(md.trim_matches('\n')));
    assert!(updated.starts_with("# Results\n\nWritten by hand.\n\n"));
    assert!(updated.ends_with(&format!("{END}\n\nAfter.\n")));
    assert!(!updated.contains("old tables"));
    // Idempotent, and a document without the markers is an error, not overwritten.
    assert_eq!(splice(&updated, &md).unwrap(), updated);
    std::fs::write(&doc, "no markers\n").unwrap();
    let st = report_cli(&[run.as_os_str(), "--update".as_ref(), doc.as_os_str()]);
    assert!(!st.status.success());
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(err.contains("RESULTS.md") && err.contains(BEGIN), "{err}");
    assert_eq!(std::fs::read_to_string(&doc).unwrap(), "no markers\n");
}

#[test]
fn imdb_is_beside_the_glue_average_not_in_it() {
    let root = tempfile::tempdir().unwrap();
    for (task, scores) in [
        ("rte", (0.60, 0.57)),
        ("mrpc", (0.80, 0.80)),
        ("imdb", (0.90, 0.45)),
    ] {
        let stages = r#"["finetune", "stage1", "stage2"]"#;
        fake_run(
            root.path(),
            &format!("{task}-s1"),
            task,
            1,
            scores,
            stages,
            "teacher",
        );
    }
    let md = markdown(&find_runs(&[root.path().to_path_buf()]).unwrap());
    // GLUE average (57 + 80) / 2 = 68.5 and retention (95 + 100) / 2 = 97.5; IMDb's 50 % apart.
    assert!(
        md.contains("| MRPC (f1) | RTE (accuracy) | GLUE average | IMDb (accuracy) | retention"),
        "{md}"
    );
    assert!(
        md.contains("| MPCFormer quad+2quad (minilm) | 80.0 | 57.0 | 68.5 | 45.0 | 97.5% (mrpc 100.0, rte 95.0); imdb 50.0 |"),
        "{md}"
    );
    assert!(
        md.contains("| teacher (minilm) | 80.0 | 60.0 | 70.0 | 90.0 |  |"),
        "{md}"
    );
}

/// Adds `fields` to a fake run's summary.json and the tables `toml` to its recipe.toml.
fn patch_run(root: &Path, name: &str, fields: serde_json::Value, toml: &str) {
    let d = root.join(name);
    let path = d.join("summary.json");
    let mut summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (k, v) in fields.as_object().unwrap() {
        summary[k] = v.clone();
    }
    std::fs::write(&path, summary.to_string()).unwrap();
    let recipe = d.join("recipe.toml");
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(&recipe, format!("{text}{toml}\n")).unwrap();
}

#[test]
fn trivial_baseline_margin_retention_agreement_and_sweep() {
    let root = tempfile::tempdir().unwrap();
    let distill = r#"["finetune", "stage1", "stage2"]"#;
    // One teacher (fine-tuned by the seed-42 run over a learning-rate sweep), three student seeds.
    for (seed, student, agree) in [(42, 0.68, 0.9), (1, 0.66, 0.8), (2, 0.70, 1.0)] {
        let name = format!("rte-s{seed}");
        fake_run(
            root.path(),
            &name,
            "rte",
            seed,
            (0.70, student),
            distill,
            "teacher",
        );
        let mut fields = serde_json::json!({
            "trivial": {"primary": 0.5, "metrics": {"accuracy": 0.5}},
            "agreement": agree,
            "stage_wall_s": {"stage1": 100.0, "stage2": 50.0},
        });
        if seed == 42 {
            fields["stage_wall_s"]["fit"] = serde_json::json!(30.0);
            fields["teacher_grid"] = serde_json::json!([
                {"lr": 3e-5, "primary": 0.65, "metrics": {}},
                {"lr": 1e-4, "primary": 0.70, "metrics": {}}
            ]);
        }
        patch_run(
            root.path(),
            &name,
            fields,
            "[resolved.stage1]\nepochs = 6.0",
        );
        if seed != 42 {
            let recipe = root.path().join(&name).join("recipe.toml");
            let text = std::fs::read_to_string(&recipe).unwrap().replace(
                "[teacher]\n",
                "[teacher]\nfinetuned_run = \"checkpoints/rte-s42\"\n",
            );
            // Seed 2 took seed 42's stage 1 as well (`student.stage1_run`).
            let text = if seed == 2 {
                text.replace(
                    "[student]\n",
                    "[student]\nstage1_run = \"checkpoints/rte-s42\"\n",
                )
            } else {
                text
            };
            std::fs::write(&recipe, text).unwrap();
        }
    }
    // A run recorded before summaries had a trivial baseline borrows its task's.
    fake_labelled_run(
        root.path(),
        "rte-old-s7",
        "rte",
        7,
        (0.60, 0.55),
        distill,
        "teacher",
        Some("2 + 2 epochs"),
    );
    // The seed-42 teacher's fine-tuning again with seed 1, compared with it (`mpcformer compare`).
    std::fs::write(
        root.path().join("rte-s42").join(reseed_file(1)),
        r#"[{"task": "rte", "split": "dev", "n": 5, "teacher": {"accuracy": 0.7},
             "student": {"accuracy": 0.64}, "agreement": 0.8, "gap": {}}]"#,
    )
    .unwrap();
    // Seed 1's stage 2 ended on a later evaluation (every fake run's stage 2 evaluates
    // 51–55 at steps 1–5).
    let log = root.path().join("rte-s1").join("metrics.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(
        &log,
        format!("{text}{{\"stage\":\"stage2\",\"step\":6,\"eval\":{{\"accuracy\":0.61}}}}\n"),
    )
    .unwrap();
    let runs = find_runs(&[root.path().to_path_buf()]).unwrap();
    let md = markdown(&runs);
    assert!(
        md.contains("| trivial (best constant answer) | 50.0 | 50.0 |"),
        "{md}"
    );
    // The shared teacher counts once (70.0, not a mean over three copies); the old one apart.
    assert!(md.contains("| teacher (minilm) | 70.0 | 70.0 |"), "{md}");
    // ... under the seed of the run that fine-tuned it, though rte-s1 is listed first.
    let teacher_line = md
        .lines()
        .find(|l| l.starts_with("| rte | teacher (minilm) |"))
        .unwrap();
    assert!(teacher_line.ends_with("| [42] |"), "{teacher_line}");
    assert!(
        md.contains("| teacher, 2 + 2 epochs (minilm) | 60.0 | 60.0 |"),
        "{md}"
    );
    // Lead 70 − 50 = +20.0; the sweep with the kept rate in bold.
    assert!(
        md.contains(
            "| teacher (minilm) | rte | 50.0 (majority class) | 70.0 | +20.0 | 3e-5 65.0 · 1e-4 **70.0** | s1 64.0 · 80.0 % |"
        ),
        "{md}"
    );
    // Retention 68/70, 66/70, 70/70 = 97.1 ± 2.9; margin 18/20, 16/20, 20/20 = 90.0 ± 10.0;
    // agreement 90.0 ± 10.0.
    assert!(
        md.contains(
            "| MPCFormer quad+2quad (minilm) | rte | 97.1 ± 2.9 (n=3) | 90.0 ± 10.0 (n=3) | 90.0 ± 10.0 (n=3) |"
        ),
        "{md}"
    );
    // The old run: margin (55 − 50) / (60 − 50) = 50.0 with the borrowed baseline, no agreement.
    assert!(
        md.contains("| MPCFormer quad+2quad, 2 + 2 epochs (minilm) | rte | 91.7 | 50.0 | – |"),
        "{md}"
    );
    // The reported scores (68, 66, 70) beside the last evaluations (55, 61, 55), and retention
    // from those: 55/70, 61/70, 55/70 = 81.4 ± 4.9; margin 5/20, 11/20, 5/20 = 35.0 ± 17.3.
    assert!(
        md.contains(
            "| MPCFormer quad+2quad (minilm) | rte | 68.0 ± 2.0 (n=3) | 57.0 ± 3.5 (n=3) | 81.4 ± 4.9 (n=3) | 35.0 ± 17.3 (n=3) |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| MPCFormer quad+2quad, 2 + 2 epochs (minilm) | rte | 55.0 | 55.0 | 91.7 | 50.0 |"
        ),
        "{md}"
    );
    // At the bar: three seeds, retention 97.1 %, margin 90.0 % (within rounding of 90).
    assert!(
        md.contains("| MPCFormer quad+2quad (minilm) | rte | 3 | 97.1 | 90.0 | nothing |"),
        "{md}"
    );
    assert!(
        md.contains("| MPCFormer quad+2quad (minilm) | GLUE average | | 97.1 | | nothing |"),
        "{md}"
    );
    // Time to a student: the seed-42 run's fine-tuning (123 s in its `done` record) and each
    // stage's fastest seed, stage 1 with its fit (seed 42: 100 + 30 s; seeds 1 and 2: 100 s);
    // 273 s ≈ 5 min; 6 stage-1 epochs against the reference's 50.
    assert!(
        md.contains("| rte | quad+2quad | 123 | 100 | 50 | 5 | 6 / 50 |"),
        "{md}"
    );
    let runs_line = |name: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {name} | rte |")))
            .unwrap_or_else(|| panic!("no line for {name} in {md}"))
            .to_string()
    };
    assert!(
        runs_line("rte-s2").contains("stage1: of rte-s42"),
        "{}",
        runs_line("rte-s2")
    );
    assert!(
        runs_line("rte-s1").contains("stage1 100"),
        "{}",
        runs_line("rte-s1")
    );
    // A reseed file that is not `compare`'s output is refused by name.
    std::fs::write(
        root.path().join("rte-s1").join(reseed_file(3)),
        r#"[{"agreement": 0.8}]"#,
    )
    .unwrap();
    let err = format!("{:#}", find_runs(&[root.path().to_path_buf()]).unwrap_err());
    assert!(err.contains("rte-s1/reseeded-teacher-s3.json"), "{err}");
}

/// Each variant against the run whose teacher it reused, same seed; other seeds of the same
/// recipe are not levers, and neither is a variant on another seed's teacher.
#[test]
fn levers_are_measured_against_the_run_that_made_their_teacher() {
    let root = tempfile::tempdir().unwrap();
    let distill = r#"["finetune", "stage1", "stage2"]"#;
    let reuse = |name: &str, from: &str| {
        let recipe = root.path().join(name).join("recipe.toml");
        let text = std::fs::read_to_string(&recipe).unwrap().replace(
            "[teacher]\n",
            &format!("[teacher]\nfinetuned_run = \"checkpoints/{from}\"\n"),
        );
        std::fs::write(&recipe, text).unwrap();
    };
    fake_run(
        root.path(),
        "cola-s42",
        "cola",
        42,
        (0.30, 0.20),
        distill,
        "teacher",
    );
    patch_run(
        root.path(),
        "cola-s42",
        serde_json::json!({"agreement": 0.9}),
        "",
    );
    fake_labelled_run(
        root.path(),
        "cola-probs-s42",
        "cola",
        42,
        (0.30, 0.224),
        distill,
        "teacher",
        Some("attention KL"),
    );
    patch_run(
        root.path(),
        "cola-probs-s42",
        serde_json::json!({"agreement": 0.925}),
        "",
    );
    reuse("cola-probs-s42", "cola-s42");
    // Another seed of the shipped recipe: not a lever.
    fake_run(
        root.path(),
        "cola-s1",
        "cola",
        1,
        (0.30, 0.21),
        distill,
        "teacher",
    );
    reuse("cola-s1", "cola-s42");
    // An older recipe's variant, labelled with that recipe's label and its own lever.
    fake_labelled_run(
        root.path(),
        "old-s42",
        "cola",
        42,
        (0.25, 0.10),
        distill,
        "teacher",
        Some("2 + 2"),
    );
    fake_labelled_run(
        root.path(),
        "old-t2-s42",
        "cola",
        42,
        (0.25, 0.12),
        distill,
        "teacher",
        Some("2 + 2, T = 2"),
    );
    reuse("old-t2-s42", "old-s42");
    let md = markdown(&find_runs(&[root.path().to_path_buf()]).unwrap());
    assert!(
        md.contains("| task | lever | against | student | agreement |"),
        "{md}"
    );
    assert!(
        md.contains("| cola | attention KL | cola-s42 | 22.4 (+2.4) | 92.5 (+2.5) |"),
        "{md}"
    );
    assert!(
        md.contains("| cola | T = 2 | old-s42 | 12.0 (+2.0) | – |"),
        "{md}"
    );
    // Exactly those two rows: the block ends at the first blank line after its header.
    let block = md.split("| task | lever | against |").nth(1).unwrap();
    let block = block.split("\n\n").next().unwrap();
    assert_eq!(
        block.lines().filter(|l| l.starts_with("| cola |")).count(),
        2,
        "{block}"
    );
}

/// Once a new recipe ships, the old one's runs are relabelled: the shipped runs, unlabelled,
/// keep the teacher unlabelled; the old start is a lever against them, the old recipe's levers
/// stay against its run, and new levers are measured against the shipped recipe's.
#[test]
fn a_shipped_recipe_on_a_relabelled_runs_teacher() {
    let root = tempfile::tempdir().unwrap();
    let distill = r#"["finetune", "stage1", "stage2"]"#;
    let run = |name: &str, student: f64, init: &str, label: Option<&str>| {
        fake_labelled_run(
            root.path(),
            name,
            "rte",
            42,
            (0.70, student),
            distill,
            init,
            label,
        );
        if name != "rte-s42" {
            let recipe = root.path().join(name).join("recipe.toml");
            let text = std::fs::read_to_string(&recipe).unwrap().replace(
                "[teacher]\n",
                "[teacher]\nfinetuned_run = \"checkpoints/rte-s42\"\n",
            );
            std::fs::write(&recipe, text).unwrap();
        }
    };
    run("rte-s42", 0.60, "teacher", Some("MPCFormer's start"));
    run("rte-fitted-s42", 0.66, "fitted", None);
    run(
        "rte-probs-s42",
        0.62,
        "teacher",
        Some("MPCFormer's start, attention KL, same compute"),
    );
    run("rte-linear-s42", 0.67, "fitted", Some("linear decay"));
    // A lever on another approximation is measured against the shipped recipe's run of that
    // approximation, not the first unlabelled run.
    run("rte-2relu-s42", 0.64, "fitted", None);
    run(
        "rte-2relu-shift-s42",
        0.63,
        "fitted",
        Some("key shift fitted"),
    );
    for name in ["rte-2relu-s42", "rte-2relu-shift-s42"] {
        let student = if name == "rte-2relu-s42" { 0.64 } else { 0.63 };
        let approx = serde_json::json!({"student": {
            "approximations": "quad+2relu", "metrics": {"accuracy": student}, "primary": student
        }});
        patch_run(root.path(), name, approx, "");
    }
    let md = markdown(&find_runs(&[root.path().to_path_buf()]).unwrap());
    for row in [
        "| rte | MPCFormer's start | rte-fitted-s42 | 60.0 (-6.0) | – |",
        "| rte | attention KL, same compute | rte-s42 | 62.0 (+2.0) | – |",
        "| rte | linear decay | rte-fitted-s42 | 67.0 (+1.0) | – |",
        "| rte | key shift fitted | rte-2relu-s42 | 63.0 (-1.0) | – |",
        "| teacher (minilm) | 70.0 |",
    ] {
        assert!(md.contains(row), "{row}\n{md}");
    }
    assert!(!md.contains("teacher, MPCFormer's start"), "{md}");
    let block = md.split("| task | lever | against |").nth(1).unwrap();
    assert_eq!(
        block.split("\n\n").next().unwrap().lines().count(),
        6,
        "{md}"
    );
}

/// The parting table: a student's `compare` output and a reseeded teacher's, in the fields
/// `mpcformer compare --output` writes (the library's own types, so the format cannot drift).
#[test]
fn where_students_part_from_their_teachers() {
    use mpcformer::metric::{ConfidenceHalves, Disagreements};
    let root = tempfile::tempdir().unwrap();
    let distill = r#"["finetune", "stage1", "stage2"]"#;
    fake_run(
        root.path(),
        "rte-s42",
        "rte",
        42,
        (0.60, 0.58),
        distill,
        "fitted",
    );
    patch_run(
        root.path(),
        "rte-s42",
        serde_json::json!({
            "agreement": 0.88,
            "trivial": {"primary": 0.5, "metrics": {"accuracy": 0.5}}
        }),
        "",
    );
    let comparison = |student: f64, agreement: f64, halves: [f64; 2], differ: (usize, usize)| {
        serde_json::json!([{
            "task": "rte", "split": "dev", "n": 277,
            "teacher": {"accuracy": 0.60}, "student": {"accuracy": student},
            "agreement": agreement,
            "disagreements": Disagreements {
                teacher_right: differ.0, student_right: differ.1, both_wrong: 0
            },
            "by_teacher_confidence": ConfidenceHalves {
                agreement: halves, teacher_accuracy: [0.62, 0.587]
            },
            "gap": {}
        }])
        .to_string()
    };
    let run = root.path().join("rte-s42");
    std::fs::write(
        run.join("teacher-comparison.json"),
        comparison(0.58, 0.88, [0.978, 0.797], (19, 12)),
    )
    .unwrap();
    std::fs::write(
        run.join(reseed_file(1)),
        comparison(0.61, 0.87, [0.935, 0.804], (17, 19)),
    )
    .unwrap();
    let runs = find_runs(&[root.path().to_path_buf()]).unwrap();
    let md = markdown(&runs);
    for row in [
        "| rte-s42 | rte | 88.0 | 97.8 (62.0) | 79.7 (58.7) | 19 · 12 |",
        "| teacher of rte-s42, reseeded (seed 1) | rte | 87.0 | 93.5 (62.0) | 80.4 (58.7) | 17 · 19 |",
    ] {
        assert!(md.contains(row), "{row} not in\n{md}");
    }
    // What dev can tell apart, from the counts alone: per-example gaps of −1 (19), +1 (12) and 0
    // (246) have mean −7/277 = −2.5 points and sample sd 0.3342, so the interval is
    // ±1.96 · 0.3342 / √277 = ±3.9 points; over the teacher's lead of 10 points that is margin
    // retention 75 [35, 114].
    let row = "| MPCFormer quad+2quad (minilm) | rte | 1 | 277 | -2.5 [-6.5, +1.4] | 75 [35, 114] | not significantly different from its teacher |";
    assert!(md.contains(row), "{row} not in\n{md}");
    // The bar table says so where the run misses the margin bar (80 %) inside that interval.
    assert!(
        md.contains("margin retention ≥ 90 % (inside its 95 % interval, 35–114 %: not resolved on these examples)"),
        "{md}"
    );
    // 40 against 5: −12.6 ± 4.5 points, an interval clear of 0.
    std::fs::write(
        run.join("teacher-comparison.json"),
        comparison(0.58, 0.84, [0.978, 0.797], (40, 5)),
    )
    .unwrap();
    let below = markdown(&find_runs(&[root.path().to_path_buf()]).unwrap());
    assert!(
        below.contains("| -12.6 [-17.2, -8.1] | -26 [-72, 19] | below its teacher |"),
        "{below}"
    );
    assert!(!below.contains("not resolved"), "{below}");
    std::fs::write(
        run.join("teacher-comparison.json"),
        comparison(0.58, 0.88, [0.978, 0.797], (19, 12)),
    )
    .unwrap();
    // `--save-runs` keeps the comparison beside the run's files.
    let saved = tempfile::tempdir().unwrap();
    save_runs(&runs, saved.path()).unwrap();
    assert!(
        saved
            .path()
            .join("rte-s42/teacher-comparison.json")
            .is_file()
    );
    // Without comparisons there is no table; a comparison that is not a list is refused by name.
    std::fs::remove_file(run.join("teacher-comparison.json")).unwrap();
    std::fs::remove_file(run.join(reseed_file(1))).unwrap();
    let md = markdown(&find_runs(&[root.path().to_path_buf()]).unwrap());
    assert!(!md.contains("Where each student parts"), "{md}");
    std::fs::write(run.join("teacher-comparison.json"), r#"{"agreement": 0.8}"#).unwrap();
    let err = format!("{:#}", find_runs(&[root.path().to_path_buf()]).unwrap_err());
    assert!(err.contains("rte-s42/teacher-comparison.json"), "{err}");
}

/// A run that chose its checkpoints and learning rate on held-out training examples
/// (`data.select_examples`): its evaluations during training are not dev's, so it has no "last
/// evaluation" on dev, and its sweep says what it was scored on.
#[test]
fn choices_on_held_out_examples_are_not_read_as_dev() {
    let root = tempfile::tempdir().unwrap();
    let distill = r#"["finetune", "stage1", "stage2"]"#;
    fake_labelled_run(
        root.path(),
        "rte-held-s1",
        "rte",
        1,
        (0.60, 0.57),
        distill,
        "teacher",
        Some("held out"),
    );
    patch_run(
        root.path(),
        "rte-held-s1",
        serde_json::json!({
            "held_out_examples": 249,
            "teacher_grid": [
                {"lr": 3e-5, "primary": 0.64, "metrics": {}},
                {"lr": 1e-4, "primary": 0.62, "metrics": {}}
            ],
        }),
        "",
    );
    let log = root.path().join("rte-held-s1/metrics.jsonl");
    let text = std::fs::read_to_string(&log)
        .unwrap()
        .replace("\"eval\":", "\"on\":\"held-out\",\"eval\":");
    std::fs::write(&log, text).unwrap();
    let runs = find_runs(&[root.path().to_path_buf()]).unwrap();
    assert!(runs[0].dev.is_empty(), "{:?}", runs[0].dev);
    assert_eq!(runs[0].last_dev(), None);
    let md = markdown(&runs);
    assert!(!md.contains("| reported (best on dev) |"), "{md}");
    assert!(
        md.contains("| 3e-5 **64.0** · 1e-4 62.0 (on 249 held out) |"),
        "{md}"
    );
}
