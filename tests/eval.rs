//! `mpcformer eval` and `predict` end to end (tiny fixture models with a generated vocabulary,
//! the shared MiniLM on RTE dev), and the evaluation helpers.

mod common;
mod datagen;

use std::path::Path;
use std::process::{Command, Output};

use mpcformer::data::{Dataset, Example, Label, Task};
use mpcformer::eval::{self, Outputs};

fn mpcformer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mpcformer"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.env_remove("RUST_BACKTRACE").output().unwrap();
    eprintln!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

const MNLI_HEAD: &str = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label";

fn mnli_dev(n: usize) -> String {
    let labels = ["contradiction", "entailment", "neutral"];
    let mut s = format!("{MNLI_HEAD}\n");
    for i in 0..n {
        let l = labels[i % 3];
        s += &format!(
            "{i}\t1\t1e\tfiction\t(\t(\t(\t(\tthe man played guitar {i} .\ta man plays music\t{l}\t{l}\t{l}\t{l}\t{l}\t{l}\n"
        );
    }
    s
}

fn stsb_file(n: usize, labelled: bool) -> String {
    let mut s = String::from(
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2",
    );
    s += if labelled { "\tscore\n" } else { "\n" };
    for i in 0..n {
        s += &format!(
            "{i}\tmain-captions\tMSRvid\t2012test\t000{i}\tnone\tnone\ta dog is good\tthe dog was {i}"
        );
        s += &if labelled {
            format!("\t{}.000\n", i % 6)
        } else {
            "\n".into()
        };
    }
    s
}

/// Models `<dir>/mnli` (3 labels) and `<dir>/stsb` (regression) and their GLUE data.
fn tiny_glue(dir: &Path) {
    datagen::tiny_model("tiny-bert", &dir.join("models/mnli"));
    datagen::tiny_model("tiny-bert-regression", &dir.join("models/stsb"));
    write(dir, "glue/MNLI/dev_matched.tsv", &mnli_dev(7));
    write(dir, "glue/MNLI/dev_mismatched.tsv", &mnli_dev(5));
    write(dir, "glue/STS-B/dev.tsv", &stsb_file(9, true));
    write(
        dir,
        "glue/MNLI/test_matched.tsv",
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\n\
         0\t1\t1\tfiction\t(\t(\t(\t(\tthe cat sat\ta cat\n\
         1\t1\t1\tfiction\t(\t(\t(\t(\tno dog\tthe dog is red\n",
    );
    write(
        dir,
        "glue/MNLI/test_mismatched.tsv",
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\n\
         9\t1\t1\tfiction\t(\t(\t(\t(\tthe cat sat\ta cat\n",
    );
    write(dir, "glue/STS-B/test.tsv", &stsb_file(4, false));
}

#[test]
fn eval_several_tasks_prints_a_glue_table_and_writes_json() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_glue(d);
    let json = d.join("out/results.json");
    let out = run(mpcformer()
        .args([
            "eval",
            "--task",
            "mnli",
            "--task",
            "STS-B",
            "--batch-size",
            "4",
            "--model",
        ])
        .arg(d.join("models/{task}"))
        .arg("--data")
        .arg(d.join("glue"))
        .arg("--output")
        .arg(&json));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "MNLI",
        "dev_matched",
        "dev_mismatched",
        "STS-B",
        "acc ",
        "pearson",
        "spearman",
        "GLUE average",
    ] {
        assert!(stdout.contains(needle), "no `{needle}` in\n{stdout}");
    }
    assert!(
        stdout.contains("over MNLI dev_matched, STS-B dev"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let list = v.as_array().expect("a list for several results");
    let got: Vec<(String, String, u64)> = list
        .iter()
        .map(|r| {
            (
                r["task"].as_str().unwrap().to_string(),
                r["split"].as_str().unwrap().to_string(),
                r["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("mnli".into(), "dev_matched".into(), 7),
            ("mnli".into(), "dev_mismatched".into(), 5),
            ("stsb".into(), "dev".into(), 9)
        ]
    );
    let acc = list[0]["metrics"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let m = list[2]["metrics"].as_object().unwrap();
    assert_eq!(
        m.keys().collect::<Vec<_>>(),
        ["pearson", "pearson_and_spearman", "spearman"]
    );
}

#[test]
fn eval_results_do_not_depend_on_batching() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_glue(d);
    let mut metrics = Vec::new();
    for bs in ["1", "3", "64"] {
        let json = d.join(format!("r{bs}.json"));
        let out = run(mpcformer()
            .args(["eval", "--task", "stsb", "--batch-size", bs, "--model"])
            .arg(d.join("models/stsb"))
            .arg("--data")
            .arg(d.join("glue/STS-B/dev.tsv"))
            .arg("--output")
            .arg(&json));
        assert!(out.status.success());
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["n"], 9, "one object for one result");
        metrics.push(v["metrics"]["pearson"].as_f64().unwrap());
    }
    assert!(
        metrics.iter().all(|m| (m - metrics[0]).abs() < 1e-5),
        "length-sorted batches must score the same: {metrics:?}"
    );
}

#[test]
fn one_file_for_mnli_dev_is_read_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_glue(d);
    let out = run(mpcformer()
        .args(["eval", "--task", "mnli", "--model"])
        .arg(d.join("models/mnli"))
        .arg("--data")
        .arg(d.join("glue/MNLI/dev_mismatched.tsv")));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 2, "header and one row:\n{stdout}");
    assert!(stdout.contains("     5  acc "), "{stdout}");
}

#[test]
fn predict_writes_glue_submission_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_glue(d);
    let sub = d.join("submission");
    let out = run(mpcformer()
        .args(["predict", "--task", "mnli", "--task", "stsb", "--model"])
        .arg(d.join("models/{task}"))
        .arg("--data")
        .arg(d.join("glue"))
        .arg("--output-dir")
        .arg(&sub));
    assert!(out.status.success());
    let read = |n: &str| std::fs::read_to_string(sub.join(n)).unwrap();
    let m = read("MNLI-m.tsv");
    let lines: Vec<&str> = m.lines().collect();
    assert_eq!(lines[0], "index\tprediction");
    assert_eq!(lines.len(), 3);
    for l in &lines[1..] {
        let (_, p) = l.split_once('\t').unwrap();
        assert!(
            ["contradiction", "entailment", "neutral"].contains(&p),
            "{l}"
        );
    }
    assert!(
        read("MNLI-mm.tsv")
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("9\t")
    );
    let s = read("STS-B.tsv");
    let rows: Vec<&str> = s.lines().skip(1).collect();
    assert_eq!(rows.len(), 4);
    for (i, r) in rows.iter().enumerate() {
        let (idx, v) = r.split_once('\t').unwrap();
        assert_eq!(idx, i.to_string());
        let x: f64 = v.parse().unwrap();
        assert!(
            (0.0..=5.0).contains(&x) && v.split('.').nth(1).unwrap().len() == 3,
            "{r}"
        );
    }
}

#[test]
fn eval_on_an_unlabelled_split_points_to_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_glue(d);
    let out = run(mpcformer()
        .args(["eval", "--task", "stsb", "--split", "test", "--model"])
        .arg(d.join("models/stsb"))
        .arg("--data")
        .arg(d.join("glue")));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unlabelled") && err.contains("mpcformer predict"),
        "{err}"
    );
}

#[test]
fn eval_reads_a_hub_dataset_from_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = datagen::tiny_model("tiny-bert", &d.join("model"));
    let cache = d.join("hf/hub");
    let snap = datagen::fake_hub_dataset(&cache, "nyu-mll/glue");
    datagen::write_parquet(
        &snap.join("rte/validation-00000-of-00001.parquet"),
        &datagen::rte_rows(6, true),
    );
    let cmd = || {
        let mut c = mpcformer();
        c.args([
            "eval",
            "--task",
            "rte",
            "--data",
            "hub:nyu-mll/glue/rte",
            "--model",
        ])
        .arg(&model)
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1");
        c
    };
    // tiny-bert's head has 3 outputs; RTE needs 2.
    let out = run(&mut cmd());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("3 output(s), but RTE needs 2") && err.contains("--allow-random-head"),
        "{err}"
    );
    let out = run(cmd().arg("--allow-random-head"));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("RTE") && stdout.contains("     6  acc "),
        "{stdout}"
    );
    // Not cached: the error says where it looked.
    let out = run(mpcformer()
        .args(["eval", "--task", "sst2", "--allow-random-head", "--model"])
        .arg(&model)
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("hub:nyu-mll/glue/sst2")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

#[test]
fn minilm_on_rte_dev_needs_a_head_or_the_flag() {
    let Some(model) = common::shared("models/all-MiniLM-L6-v2") else {
        return;
    };
    let Some(glue) = common::shared("data/glue") else {
        return;
    };
    let base = || {
        let mut c = mpcformer();
        c.args(["eval", "--task", "rte", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&glue);
        c
    };
    let out = run(&mut base());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has no classification head") && err.contains("untrained"),
        "{err}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("rte.json");
    let out = run(base().arg("--allow-random-head").arg("--output").arg(&json));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("RTE    dev") && stdout.contains("277"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        (v["task"].as_str(), v["split"].as_str(), v["n"].as_u64()),
        (Some("rte"), Some("dev"), Some(277))
    );
    let acc = v["metrics"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(v["examples_per_sec"].as_f64().unwrap() > 0.0);
}

// ---------------------------------------------------------------- helpers

#[test]
fn label_map_follows_the_heads_label_names() {
    let mnli = Task::find("mnli").unwrap();
    let hub_order: Vec<String> = ["ENTAILMENT", "NEUTRAL", "CONTRADICTION"]
        .map(String::from)
        .to_vec();
    assert_eq!(eval::label_map(&hub_order, mnli), [1, 2, 0]);
    let generic: Vec<String> = ["LABEL_0", "LABEL_1", "LABEL_2"].map(String::from).to_vec();
    assert_eq!(eval::label_map(&generic, mnli), [0, 1, 2]);
    let outputs = Outputs {
        logits: vec![0.1, 0.9, 0.0, 3.0, -1.0, 0.0],
        num_outputs: 3,
        seconds: 1.0,
    };
    assert_eq!(
        eval::predictions(&outputs, mnli, &[1, 2, 0]),
        [Label::Class(2), Label::Class(1)]
    );
    let stsb = Task::find("stsb").unwrap();
    let reg = Outputs {
        logits: vec![2.5, 7.0],
        num_outputs: 1,
        seconds: 1.0,
    };
    assert_eq!(
        eval::predictions(&reg, stsb, &[]),
        [Label::Score(2.5), Label::Score(7.0)]
    );
}

#[test]
fn submission_rows_use_glue_label_names() {
    let rte = Task::find("rte").unwrap();
    let ex = |id: &str| Example {
        text_a: "a".into(),
        text_b: Some("b".into()),
        label: None,
        id: id.into(),
    };
    let data = Dataset {
        task: rte,
        split: "test".into(),
        source: "x".into(),
        examples: vec![ex("0"), ex("1")],
    };
    assert_eq!(
        eval::submission_tsv(rte, &data, &[Label::Class(1), Label::Class(0)]),
        "index\tprediction\n0\tnot_entailment\n1\tentailment\n"
    );
    let stsb = Task::find("stsb").unwrap();
    assert_eq!(
        eval::submission_tsv(stsb, &data, &[Label::Score(5.7), Label::Score(1.23456)]),
        "index\tprediction\n0\t5.000\n1\t1.235\n"
    );
}
