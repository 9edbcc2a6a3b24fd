//! Training: a tiny student distilled from a tiny teacher learns (stage-1 loss falls), the
//! `fit_dense` path of a narrower student, NaN handling, and exact resume after a kill.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use burn::prelude::*;
use common::{fixtures, synthetic};
use mpcformer::distill::loss::AttentionTarget;
use mpcformer::distill::{Student, init_student, intermediate_loss, stage1_capture};
use mpcformer::model::{self, Overrides};
use mpcformer::train::fit::{LossTerms, MetricsLog, Stage};
use mpcformer::train::precision::Precision;
use mpcformer::train::recipe::{StageConfig, StageKind, StudentSpec};

fn stage1_losses(spec: StudentSpec, target: AttentionTarget) -> Vec<f64> {
    let ad = Device::flex().autodiff();
    ad.seed(1);
    let dir = fixtures().join("tiny-bert/model");
    let teacher = model::load_pretrained(
        dir.to_str().unwrap(),
        &Overrides {
            no_dropout: true,
            ..Default::default()
        },
        &ad,
    )
    .unwrap()
    .model;
    let (student, _) = init_student(&teacher, &spec, &ad).unwrap();
    let frozen = teacher.no_grad();
    let train = synthetic(64, 7);
    let run_dir = tempfile::tempdir().unwrap();
    let settings = StageConfig {
        max_steps: Some(24),
        lr: Some(1e-3),
        batch_size: Some(8),
        log_every: Some(1),
        checkpoint_every: Some(1000),
        eval_every: Some(0),
        attention_target: Some(target),
        ..Default::default()
    }
    .resolve(StageKind::Stage1, "rte");
    let stage = Stage {
        kind: StageKind::Stage1,
        settings: settings.clone(),
        dir: run_dir.path().join("stage1"),
        train: &train,
        seed: 3,
        device: ad.clone(),
        precision: Precision::F32,
        resume: false,
        tag: None,
        held_out: false,
    };
    let mut log = MetricsLog::open(&run_dir.path().join("metrics.jsonl")).unwrap();
    let capture = stage1_capture(&settings);
    stage
        .fit(
            student,
            &mut log,
            |m: &Student, b| {
                let inputs = b.inputs.to_inputs(&ad);
                let t = frozen.forward(&inputs, capture);
                let s = m.model.forward(&inputs, capture);
                let (total, _, _) =
                    intermediate_loss(m, &s, &t, inputs.attention_mask.clone().float(), &settings);
                Ok(LossTerms {
                    total,
                    parts: vec![],
                })
            },
            |_| Ok((0.0, Default::default())),
        )
        .unwrap();
    read_losses(&run_dir.path().join("metrics.jsonl"))
}

fn read_losses(path: &Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("loss")?
                .as_f64()
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn stage1_loss_falls_for_a_quad_2quad_student() {
    let spec = StudentSpec::default();
    for target in [AttentionTarget::Scores, AttentionTarget::Probs] {
        let l = stage1_losses(spec.clone(), target);
        assert_eq!(l.len(), 24);
        assert!(
            l[0] > 0.0,
            "the approximations make the student differ from its teacher"
        );
        assert!(mean(&l[18..]) < 0.5 * mean(&l[..6]), "{target:?}: {l:?}");
    }
}

#[test]
fn narrower_shallower_student_uses_fit_dense() {
    let spec = StudentSpec {
        num_hidden_layers: Some(1),
        hidden_size: Some(16),
        intermediate_size: Some(32),
        ..Default::default()
    };
    let ad = Device::flex().autodiff();
    let dir = fixtures().join("tiny-bert/model");
    let teacher = model::load_pretrained(dir.to_str().unwrap(), &Overrides::default(), &ad)
        .unwrap()
        .model;
    let (student, _) = init_student(&teacher, &spec, &ad).unwrap();
    let fd = student
        .fit_dense
        .as_ref()
        .expect("a narrower student gets fit_dense");
    assert_eq!(fd.weight.dims(), [16, 32]);
    assert_eq!(student.model.config.num_hidden_layers, 1);
    let l = stage1_losses(spec, AttentionTarget::Scores);
    assert!(mean(&l[18..]) < mean(&l[..6]), "{l:?}");
}

#[test]
fn shallower_student_takes_every_kth_teacher_layer() {
    let ad = Device::flex();
    let dir = fixtures().join("tiny-bert/model");
    let teacher = model::load_pretrained(dir.to_str().unwrap(), &Overrides::default(), &ad)
        .unwrap()
        .model;
    let spec = StudentSpec {
        num_hidden_layers: Some(1),
        ..Default::default()
    };
    let (student, _) = init_student(&teacher, &spec, &ad).unwrap();
    let get = |m: &model::SequenceClassifier, name: &str| {
        m.hf_tensors()
            .into_iter()
            .find(|t| t.name == name)
            .unwrap()
            .data
    };
    // k = 2: student layer 0 is teacher layer 1 (i·k + k − 1).
    assert_eq!(
        get(
            &student.model,
            "bert.encoder.layer.0.attention.self.query.weight"
        ),
        get(&teacher, "bert.encoder.layer.1.attention.self.query.weight")
    );
}

#[test]
fn nan_loss_stops_with_the_step() {
    let ad = Device::flex().autodiff();
    let dir = fixtures().join("tiny-bert/model");
    let teacher = model::load_pretrained(dir.to_str().unwrap(), &Overrides::default(), &ad)
        .unwrap()
        .model;
    let train = synthetic(32, 7);
    let run_dir = tempfile::tempdir().unwrap();
    let stage = Stage {
        kind: StageKind::Finetune,
        settings: StageConfig {
            max_steps: Some(10),
            batch_size: Some(4),
            checkpoint_every: Some(2),
            ..Default::default()
        }
        .resolve(StageKind::Finetune, "rte"),
        dir: run_dir.path().join("finetune"),
        train: &train,
        seed: 0,
        device: ad.clone(),
        precision: Precision::F32,
        resume: false,
        tag: None,
        held_out: false,
    };
    let mut log = MetricsLog::open(&run_dir.path().join("metrics.jsonl")).unwrap();
    let mut calls = 0;
    let err = stage
        .fit(
            teacher,
            &mut log,
            |m, b| {
                calls += 1;
                let logits = m.logits(&b.inputs.to_inputs(&ad));
                let total = logits.sum().reshape([1]) * if calls == 5 { f64::NAN } else { 1e-3 };
                Ok(LossTerms {
                    total,
                    parts: vec![],
                })
            },
            |_| Ok((0.0, Default::default())),
        )
        .expect_err("a NaN loss must stop the run");
    let msg = err.to_string();
    assert!(
        msg.contains("step 5") && msg.contains("ckpt-00000004"),
        "{msg}"
    );
}

/// A recipe small enough to run in seconds: quickstart's data, a 1-layer hidden-32 teacher.
fn tiny_recipe(dir: &Path) -> std::path::PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(repo.join("data/quickstart/config.json"))
        .unwrap()
        .replace("\"hidden_size\": 64", "\"hidden_size\": 32")
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1")
        .replace("\"intermediate_size\": 256", "\"intermediate_size\": 64");
    std::fs::write(&config, text).unwrap();
    let recipe = dir.join("tiny.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"
name = "tiny"
output_dir = {out:?}
stages = ["finetune", "stage1", "stage2"]
[teacher]
config = {config:?}
tokenizer = {tok:?}
[data]
task = "sst2"
spec = {data:?}
max_len = 32
train_limit = 256
eval_limit = 128
[finetune]
max_steps = 20
lr = 1e-3
batch_size = 16
checkpoint_every = 5
[stage1]
max_steps = 60
lr = 5e-4
batch_size = 16
checkpoint_every = 3
[stage2]
max_steps = 20
lr = 2e-4
batch_size = 16
eval_every = 5
checkpoint_every = 3
"#,
            out = dir.join("runs").display().to_string(),
            config = config.display().to_string(),
            tok = repo.join("data/quickstart").display().to_string(),
            data = repo.join("data/quickstart").display().to_string(),
        ),
    )
    .unwrap();
    recipe
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("runs/tiny/summary.json")).unwrap())
        .unwrap()
}

#[test]
fn resume_after_kill_reaches_the_same_result() {
    let bin = env!("CARGO_BIN_EXE_mpcformer");
    let a = tempfile::tempdir().unwrap();
    let recipe_a = tiny_recipe(a.path());
    let out = Command::new(bin)
        .args(["run"])
        .arg(&recipe_a)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uninterrupted = summary(a.path());

    let b = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(b.path());
    let mut child = Command::new(bin)
        .args(["run"])
        .arg(&recipe)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let latest = b.path().join("runs/tiny/stage1/latest");
    let t0 = Instant::now();
    while !latest.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no stage-1 checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !b.path().join("runs/tiny/summary.json").exists(),
        "killed too late: the run had finished"
    );
    // Without --resume the run refuses to overwrite.
    let out = Command::new(bin)
        .args(["run"])
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    let out = Command::new(bin)
        .args(["run"])
        .arg(&recipe)
        .arg("--resume")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resumed = summary(b.path());
    assert_eq!(
        resumed["teacher"]["metrics"],
        uninterrupted["teacher"]["metrics"]
    );
    assert_eq!(
        resumed["student"]["metrics"],
        uninterrupted["student"]["metrics"]
    );
    assert!(resumed["recipe_hash"].as_str().is_some());

    // A second variant may take the first run's fine-tuned teacher instead of fine-tuning again:
    // the same teacher and, with the same seed and student, the same student.
    let first = a.path().join("runs/tiny");
    let reuse = |name: &str, extra: &[&str]| {
        let mut c = Command::new(bin);
        c.args(["run"]).arg(&recipe_a).args([
            "--set",
            &format!("name={name}"),
            "--set",
            &format!("teacher.finetuned_run={:?}", first.display().to_string()),
        ]);
        for e in extra {
            c.args(["--set", e]);
        }
        c.output().unwrap()
    };
    // Another fine-tuning setting is refused; another seed is not: its student learns from the
    // same teacher.
    let out = reuse("tiny-lr", &["finetune.lr=5e-4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("resolved.finetune"),
        "{err}"
    );
    let out = reuse("tiny-s7", &["seed=7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(a.path().join("runs/tiny-s7/teacher/model.safetensors")).unwrap(),
        std::fs::read(first.join("teacher/model.safetensors")).unwrap()
    );
    let out = reuse("tiny-reused", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.path().join("runs/tiny-reused/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        again["teacher"]["metrics"],
        uninterrupted["teacher"]["metrics"]
    );
    assert_eq!(
        again["student"]["metrics"],
        uninterrupted["student"]["metrics"]
    );
    assert_eq!(
        std::fs::read(a.path().join("runs/tiny-reused/teacher/model.safetensors")).unwrap(),
        std::fs::read(first.join("teacher/model.safetensors")).unwrap()
    );
}

/// Predictions of a checkpoint on the quickstart SST-2 dev set, by `mpcformer predict`.
fn predict_dev(model: &Path, out: &Path) -> Vec<String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let st = Command::new(env!("CARGO_BIN_EXE_mpcformer"))
        .args(["predict", "--task", "sst2", "--split", "dev", "--model"])
        .arg(model)
        .arg("--data")
        .arg(repo.join("data/quickstart"))
        .arg("--output-dir")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::read_to_string(out.join("SST-2-dev.tsv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split('\t').nth(1).unwrap().to_string())
        .collect()
}

#[test]
fn lr_grid_transfer_data_trivial_and_agreement() {
    let bin = env!("CARGO_BIN_EXE_mpcformer");
    let a = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(a.path());
    let out = Command::new(bin)
        .args(["run"])
        .arg(&recipe)
        .args(["--set", "finetune.lr_grid=[1e-3, 1e-5]"])
        // Stage 1 also sees 100 unlabelled sentences of the training corpus itself.
        .args(["--set", "data.transfer_examples=100"])
        .args(["--set", "data.transfer_from=[\"sst2\"]"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("stage1: 100 transfer examples added to 256 training examples"),
        "{err}"
    );
    let s = summary(a.path());
    let grid = s["teacher_grid"].as_array().unwrap();
    let lrs: Vec<f64> = grid.iter().map(|p| p["lr"].as_f64().unwrap()).collect();
    assert_eq!(lrs, [1e-3, 1e-5]);
    let best = grid
        .iter()
        .map(|p| p["primary"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert_eq!(s["teacher"]["primary"].as_f64().unwrap(), best);
    assert!(a.path().join("runs/tiny/finetune/lr-1e-3").is_dir());

    // Trivial: the majority class of the 128 dev sentences the recipe evaluates on.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dev = std::fs::read_to_string(repo.join("data/quickstart/SST-2/dev.tsv")).unwrap();
    let positive = dev
        .lines()
        .skip(1)
        .take(128)
        .filter(|l| l.trim_end().ends_with('1'))
        .count();
    let majority = positive.max(128 - positive) as f64 / 128.0;
    assert_eq!(s["trivial"]["primary"].as_f64().unwrap(), majority);

    // Agreement against the two checkpoints' own predictions on those sentences (`predict`
    // batches the whole dev set, so a near-tie may fall either way: 2 of 128 slack).
    let run = a.path().join("runs/tiny");
    let t = predict_dev(&run.join("teacher"), &a.path().join("pt"));
    let st = predict_dev(&run.join("student"), &a.path().join("ps"));
    let same = t.iter().zip(&st).take(128).filter(|(x, y)| x == y).count();
    let agreement = s["agreement"].as_f64().unwrap();
    assert!(
        (agreement - same as f64 / 128.0).abs() <= 2.0 / 128.0,
        "{agreement} vs {same}/128"
    );

    // `teacher.sweep_from` remakes the teacher from the sweep's record: only the best point
    // trains, reproduces its score, and the same teacher comes out.
    let replay = |name: &str| {
        let out = Command::new(bin)
            .args(["run"])
            .arg(&recipe)
            .args(["--set", "finetune.lr_grid=[1e-3, 1e-5]"])
            .args(["--set", "stages=[\"finetune\"]"])
            .args(["--set", &format!("name={name}")])
            .args([
                "--set",
                &format!("teacher.sweep_from={:?}", run.display().to_string()),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        let dir = a.path().join("runs").join(name);
        let log = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let reproduced: Vec<bool> = log
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v["sweep_reproduced"].as_bool())
            .collect();
        (dir, reproduced, err)
    };
    let refused = |grid: &str, needs: &str| {
        let out = Command::new(bin)
            .args(["run"])
            .arg(&recipe)
            .args(["--set", grid])
            .args(["--set", "name=tiny-refused"])
            .args([
                "--set",
                &format!("teacher.sweep_from={:?}", run.display().to_string()),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needs), "{err}");
    };
    refused("finetune.lr=1e-3", "it needs finetune.lr_grid");
    refused(
        "finetune.lr_grid=[1e-3]",
        "other settings (finetune.lr_grid)",
    );
    let best_lr = grid
        .iter()
        .find(|p| p["primary"].as_f64().unwrap() == best)
        .unwrap()["lr"]
        .as_f64()
        .unwrap();
    let other_lr = if best_lr == 1e-3 {
        "lr-1e-5"
    } else {
        "lr-1e-3"
    };
    let (dir, reproduced, _) = replay("tiny-replay");
    assert_eq!(reproduced, [true]);
    assert!(!dir.join("finetune").join(other_lr).exists());
    assert_eq!(
        std::fs::read(dir.join("teacher/model.safetensors")).unwrap(),
        std::fs::read(run.join("teacher/model.safetensors")).unwrap()
    );
    let replayed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let by_lr = |g: &serde_json::Value| {
        let mut v: Vec<(f64, f64)> = g
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["lr"].as_f64().unwrap(), p["primary"].as_f64().unwrap()))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    assert_eq!(by_lr(&replayed["teacher_grid"]), by_lr(&s["teacher_grid"]));

    // A record the best point does not reproduce (by 100× the tolerance a correlation's
    // summation order is allowed): the rest of the sweep runs.
    let path = run.join("summary.json");
    let tampered = std::fs::read_to_string(&path).unwrap().replace(
        &format!("\"primary\": {best}"),
        &format!("\"primary\": {}", best + 1e-4),
    );
    assert_ne!(tampered, std::fs::read_to_string(&path).unwrap());
    std::fs::write(&path, tampered).unwrap();
    let (dir, reproduced, err) = replay("tiny-replay-2");
    assert_eq!(reproduced, [false]);
    assert!(err.contains("running the rest of the sweep"), "{err}");
    assert!(dir.join("finetune").join(other_lr).is_dir());
}

/// `(stage, steps)` of every finished stage in a run's metrics.
fn stage_steps(run: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["done"] == true)
        .map(|v| {
            (
                v["stage"].as_str().unwrap().to_string(),
                v["steps"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The tiny recipe with both distillation stages run for one epoch instead of a step budget.
fn one_epoch_recipe(dir: &Path) -> std::path::PathBuf {
    let recipe = tiny_recipe(dir);
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("max_steps = 60", "epochs = 1")
        .replace("max_steps = 20\nlr = 2e-4", "epochs = 1\nlr = 2e-4");
    std::fs::write(&recipe, text).unwrap();
    recipe
}

#[test]
fn neighbour_copies_feed_both_distillation_stages() {
    let bin = env!("CARGO_BIN_EXE_mpcformer");
    let run_with = |stages: &str| {
        let a = tempfile::tempdir().unwrap();
        let out = Command::new(bin)
            .arg("run")
            .arg(one_epoch_recipe(a.path()))
            .args(["--set", "data.transfer_examples=64"])
            .args(["--set", "data.transfer_kind=neighbours"])
            .args(["--set", &format!("data.transfer_stages={stages}")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        (stage_steps(&a.path().join("runs/tiny")), err)
    };
    // 256 training sentences + 64 copies, batches of 16 (the last partial one dropped).
    let (steps, err) = run_with("[\"stage1\", \"stage2\"]");
    assert!(
        err.contains("stage1, stage2: 64 transfer examples added to 256 training examples"),
        "{err}"
    );
    assert!(err.contains("transfer: nearest words of "), "{err}");
    let of = |steps: &[(String, u64)], s: &str| steps.iter().find(|x| x.0 == s).unwrap().1;
    assert_eq!((of(&steps, "stage1"), of(&steps, "stage2")), (20, 20));
    let (steps, _) = run_with("[\"stage1\"]");
    assert_eq!((of(&steps, "stage1"), of(&steps, "stage2")), (20, 16));
}

#[test]
fn transfer_settings_that_cannot_work_are_refused_by_key() {
    let a = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(a.path());
    let refuse = |sets: &[&str], says: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mpcformer"));
        c.arg("run")
            .arg(&recipe)
            .args(["--set", "data.transfer_examples=8"]);
        for s in sets {
            c.args(["--set", s]);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{sets:?}: {err}"
        );
        assert!(err.contains("tiny.toml"), "{err}");
    };
    refuse(
        &["data.transfer_kind=repaired"],
        "data.transfer_kind = \"repaired\": SST-2 has single sentences",
    );
    refuse(
        &["data.task=rte", "data.transfer_kind=sentences"],
        "RTE has sentence pairs",
    );
    refuse(
        &["data.transfer_stages=[\"finetune\"]"],
        "data.transfer_stages: `finetune` trains on labels",
    );
    refuse(
        &[
            "data.task=stsb",
            "data.transfer_stages=[\"stage1\", \"stage2\"]",
        ],
        "set stage2.regression_target = \"teacher\"",
    );
}

/// STS-B's stage 2 on the teacher's scores, over the training set and its neighbour copies.
#[test]
fn regression_stage_two_fits_the_teacher_on_transfer_examples() {
    let Some(glue) = common::shared("data/glue/STS-B") else {
        return;
    };
    let a = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mpcformer"))
        .arg("run")
        .arg(one_epoch_recipe(a.path()))
        .args(["--set", "data.task=stsb"])
        .args([
            "--set",
            &format!(
                "data.spec={:?}",
                glue.parent().unwrap().display().to_string()
            ),
        ])
        .args([
            "--set",
            "data.train_limit=64",
            "--set",
            "data.eval_limit=32",
        ])
        .args([
            "--set",
            "data.transfer_examples=32",
            "--set",
            "data.transfer_kind=neighbours",
        ])
        .args(["--set", "data.transfer_stages=[\"stage1\", \"stage2\"]"])
        .args(["--set", "stage2.regression_target=teacher"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let steps = stage_steps(&a.path().join("runs/tiny"));
    assert!(steps.contains(&("stage2".to_string(), 6)), "{steps:?}");
    let s = summary(a.path());
    assert!(s["agreement"].as_f64().unwrap().is_finite());
}

/// `stage1.prediction_weight`: stage 1's logged loss is the weighted sum of its three terms.
#[test]
fn stage_one_joined_with_the_prediction_term() {
    let bin = env!("CARGO_BIN_EXE_mpcformer");
    let stage1_rows = |sets: &[&str]| {
        let a = tempfile::tempdir().unwrap();
        let mut c = Command::new(bin);
        c.arg("run").arg(tiny_recipe(a.path()));
        c.args([
            "--set",
            "stages=[\"finetune\", \"stage1\"]",
            "--set",
            "stage1.max_steps=20",
        ]);
        for s in sets {
            c.args(["--set", s]);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(a.path().join("runs/tiny/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["stage"] == "stage1" && v.get("loss").is_some())
            .collect::<Vec<_>>()
    };
    for w in [1.0, 0.25] {
        let rows = stage1_rows(&[&format!("stage1.prediction_weight={w}")]);
        assert_eq!(rows.len(), 2);
        for r in &rows {
            let f = |k: &str| {
                r[k].as_f64()
                    .unwrap_or_else(|| panic!("{k} missing in {r}"))
            };
            let sum = f("attention_loss") + f("hidden_loss") + w * f("prediction_loss");
            assert!(f("prediction_loss") > 0.0, "{r}");
            assert!((f("loss") - sum).abs() <= 1e-5 * sum, "{r}: {sum}");
        }
    }
    assert!(
        stage1_rows(&[])
            .iter()
            .all(|r| r.get("prediction_loss").is_none())
    );

    let a = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .arg("run")
        .arg(tiny_recipe(a.path()))
        .args(["--set", "stage2.prediction_weight=1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("stage2.prediction_weight: only stage 1"),
        "{err}"
    );
}

#[test]
fn fitted_start_is_logged_and_refused_with_score_matching() {
    let bin = env!("CARGO_BIN_EXE_mpcformer");
    let a = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .arg("run")
        .arg(tiny_recipe(a.path()))
        .args(["--set", "student.init=fitted"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("set stage1.attention_target = \"probs\""),
        "{err}"
    );
    assert!(err.contains("tiny.toml"), "{err}");
    let out = Command::new(bin)
        .arg("run")
        .arg(tiny_recipe(a.path()))
        .args([
            "--set",
            "student.init=fitted",
            "--set",
            "student.num_hidden_layers=1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("drop student.num_hidden_layers"),
        "{err}"
    );

    let out = Command::new(bin)
        .arg("run")
        .arg(tiny_recipe(a.path()))
        .args([
            "--set",
            "student.init=fitted",
            "--set",
            "stage1.attention_target=probs",
            "--set",
            "stages=[\"finetune\", \"stage1\"]",
            "--set",
            "stage1.max_steps=2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fit: Vec<serde_json::Value> =
        std::fs::read_to_string(a.path().join("runs/tiny/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["stage"] == "fit")
            .collect();
    assert_eq!(fit.len(), 1, "{fit:?}");
    let layers = fit[0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    for l in layers {
        let [before, after] = [0, 1].map(|i| l["ffn_mse"][i].as_f64().unwrap());
        assert!(after < before, "{l}");
        let [before, after] = [0, 1].map(|i| l["attention_kl"][i].as_f64().unwrap());
        assert!(after <= before, "{l}");
    }
    assert!(fit[0]["tokens"].as_u64().unwrap() > 0);
}

/// `stage2.label_weight`: stage 2's logged loss is the teacher term plus the weighted gold-label
/// term, both logged; the key is refused where it cannot apply.
#[test]
fn stage_two_with_the_gold_labels() {
    let bin = env!("CARGO_BIN_EXE_mpcformer");
    let run = |sets: &[&str]| {
        let a = tempfile::tempdir().unwrap();
        let mut c = Command::new(bin);
        c.arg("run").arg(tiny_recipe(a.path()));
        c.args([
            "--set",
            "stage1.max_steps=2",
            "--set",
            "stage2.max_steps=20",
        ]);
        for s in sets {
            c.args(["--set", s]);
        }
        let out = c.output().unwrap();
        let rows = std::fs::read_to_string(a.path().join("runs/tiny/metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["stage"] == "stage2" && v.get("loss").is_some())
            .collect::<Vec<_>>();
        (out, rows)
    };
    let (out, rows) = run(&["stage2.label_weight=0.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let f = |k: &str| {
            r[k].as_f64()
                .unwrap_or_else(|| panic!("{k} missing in {r}"))
        };
        let sum = f("distillation_loss") + 0.5 * f("label_loss");
        assert!(f("label_loss") > 0.0, "{r}");
        assert!((f("loss") - sum).abs() <= 1e-5 * sum, "{r}: {sum}");
    }
    let (_, plain) = run(&[]);
    assert!(plain.iter().all(|r| r.get("label_loss").is_none()));
    for (sets, message) in [
        (
            &["stage1.label_weight=1"][..],
            "stage1.label_weight: only stage 2",
        ),
        (
            &["stage2.label_weight=-1"][..],
            "stage2.label_weight must be ≥ 0",
        ),
        (
            &[
                "stage2.label_weight=1",
                "data.transfer_examples=32",
                "data.transfer_kind=neighbours",
                "data.transfer_stages=[\"stage1\", \"stage2\"]",
            ][..],
            "transfer examples, which have none",
        ),
    ] {
        let (out, _) = run(sets);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(message),
            "{sets:?}: {err}"
        );
    }
}

#[test]
fn stage_two_variants_share_one_stage_one() {
    let bin = env!("CARGO_BIN_EXE_mpcformer");
    let a = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(a.path());
    let runs = a.path().join("runs");
    let run = |name: &str, sets: &[String]| {
        let mut c = Command::new(bin);
        c.arg("run")
            .arg(&recipe)
            .args(["--set", &format!("name={name}")]);
        for s in sets {
            c.args(["--set", s]);
        }
        c.output().unwrap()
    };
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let first = runs.join("first");
    ok(run("first", &[]));
    let from_first = format!("student.stage1_run={:?}", first.display().to_string());
    let labels = "stage2.label_weight=0.5".to_string();
    ok(run("shared", &[from_first.clone(), labels.clone()]));
    ok(run("alone", &[labels]));
    // Stage 1 is deterministic: taking it from `first` gives the student that running it here
    // gives, bit for bit, and the teacher's fine-tuning is credited to `first`.
    let bytes = |run: &str, file: &str| std::fs::read(runs.join(run).join(file)).unwrap();
    assert_eq!(
        bytes("shared", "student/model.safetensors"),
        bytes("alone", "student/model.safetensors")
    );
    assert_eq!(
        bytes("shared", "teacher/model.safetensors"),
        bytes("first", "teacher/model.safetensors")
    );
    let log = String::from_utf8(bytes("shared", "metrics.jsonl")).unwrap();
    let stage1_steps = log
        .lines()
        .filter(|l| l.contains("\"stage\":\"stage1\"") && l.contains("\"loss\""))
        .count();
    assert_eq!(stage1_steps, 0, "{log}");
    assert!(log.contains("\"reused_from\""), "{log}");
    let resolved = String::from_utf8(bytes("shared", "recipe.toml")).unwrap();
    assert!(
        resolved.contains(&format!(
            "finetuned_run = {:?}",
            first.display().to_string()
        )),
        "{resolved}"
    );
    for (sets, message) in [
        (
            vec![from_first.clone(), "stage1.lr=1e-4".to_string()],
            "resolved.stage1.lr",
        ),
        (vec![from_first.clone(), "seed=7".to_string()], "seed"),
        (
            vec![
                from_first.clone(),
                "stages=[\"finetune\", \"stage1\"]".to_string(),
            ],
            "`stages` needs both",
        ),
        (
            vec![format!(
                "student.stage1_run={:?}",
                runs.join("shared-lr").display().to_string()
            )],
            "recipe.toml",
        ),
    ] {
        let out = run("refused", &sets);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(message),
            "{sets:?}: {err}"
        );
        let _ = std::fs::remove_dir_all(runs.join("refused"));
    }
}

/// `--resume` continues a run only with the settings its logged stages ran with: a stage not
/// begun may change (and a stage may be added), a finished one may not, and a refused resume
/// leaves the run's recipe.toml as it was.
#[test]
fn resume_refuses_other_settings_for_stages_begun() {
    let bin = env!("CARGO_BIN_EXE_mpcformer");
    let a = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(a.path());
    let run = |resume: bool, sets: &[&str]| {
        let mut c = Command::new(bin);
        c.arg("run").arg(&recipe);
        if resume {
            c.arg("--resume");
        }
        for s in sets {
            c.args(["--set", s]);
        }
        c.output().unwrap()
    };
    let resume = |sets: &[&str]| run(true, sets);
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(run(false, &["stages=[\"finetune\", \"stage1\"]"]));
    let stored = a.path().join("runs/tiny/recipe.toml");
    let before = std::fs::read(&stored).unwrap();
    for (sets, key) in [
        (vec!["stage1.lr=1e-4"], "resolved.stage1.lr"),
        (vec!["seed=7"], "seed"),
        (vec!["student.attn=2relu"], "student.attn"),
        (vec!["finetune.max_steps=10"], "resolved.finetune.max_steps"),
    ] {
        let out = resume(&sets);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(key) && err.contains("stage1"),
            "{sets:?}: {err}"
        );
        assert_eq!(std::fs::read(&stored).unwrap(), before, "{sets:?}");
    }
    // Stage 2 has not begun: it is added, with a setting of its own, and a new label.
    ok(resume(&["stage2.label_weight=0.5", "label=with stage 2"]));
    let log = std::fs::read_to_string(a.path().join("runs/tiny/metrics.jsonl")).unwrap();
    assert!(log.contains("\"stage\":\"stage2\""), "{log}");
    assert!(
        std::fs::read_to_string(&stored)
            .unwrap()
            .contains("label_weight = 0.5")
    );
}

/// `data.select_examples`: checkpoints and the teacher's learning rate are chosen on training
/// examples held out of training, every such evaluation is logged as held-out, and the scores
/// in the summary are dev's, of the chosen models.
#[test]
fn checkpoints_chosen_on_held_out_training_examples() {
    let bin = env!("CARGO_BIN_EXE_mpcformer");
    let a = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(a.path());
    let run = |sets: &[&str]| {
        let mut c = Command::new(bin);
        c.arg("run").arg(&recipe);
        for s in sets {
            c.args(["--set", s]);
        }
        c.output().unwrap()
    };
    let out = run(&[
        "data.select_examples=64",
        "finetune.lr_grid=[1e-3, 1e-5]",
        "stage1.max_steps=2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let s = summary(a.path());
    assert_eq!(s["train_examples"], 256 - 64);
    assert_eq!(s["held_out_examples"], 64);
    assert_eq!(s["eval_examples"], 128);

    let dir = a.path().join("runs/tiny");
    let log: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let in_training: Vec<&serde_json::Value> = log
        .iter()
        .filter(|v| v.get("eval").is_some() && v["stage"] != "teacher" && v["stage"] != "student")
        .collect();
    assert!(in_training.len() >= 2 + 4, "{in_training:?}");
    assert!(
        in_training.iter().all(|v| v["on"] == "held-out"),
        "{in_training:?}"
    );

    // The summary's scores are the chosen models' on dev: recounted from their predictions
    // (`predict` batches the whole dev set, so a near-tie may fall either way: 2 of 128 slack).
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gold: Vec<String> = std::fs::read_to_string(repo.join("data/quickstart/SST-2/dev.tsv"))
        .unwrap()
        .lines()
        .skip(1)
        .take(128)
        .map(|l| l.trim_end().rsplit('\t').next().unwrap().to_string())
        .collect();
    for who in ["teacher", "student"] {
        let predicted = predict_dev(&dir.join(who), &a.path().join(format!("p-{who}")));
        let right = predicted.iter().zip(&gold).filter(|(p, g)| p == g).count();
        let reported = s[who]["primary"].as_f64().unwrap();
        assert!(
            (reported - right as f64 / 128.0).abs() <= 2.0 / 128.0,
            "{who}: {reported} vs {right}/128"
        );
    }

    let err =
        String::from_utf8_lossy(&run(&["name=all", "data.select_examples=256"]).stderr).to_string();
    assert!(
        err.contains("data.select_examples = 256") && err.contains("256 training examples"),
        "{err}"
    );
}
