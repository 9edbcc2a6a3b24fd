//! The GLUE metrics against scikit-learn / scipy values (`tests/fixtures/metrics/metrics.json`),
//! to a relative 1e-9, plus the edge cases and the GLUE average.

mod common;

use mpcformer::data::{Label, Task};
use mpcformer::metric::{self, Metric, Scores, all_metrics};

fn close(name: &str, ours: f64, theirs: f64) {
    let tol = 1e-9 * theirs.abs().max(1e-12);
    assert!(
        (ours - theirs).abs() <= tol.max(1e-15),
        "{name}: ours {ours:.17} vs reference {theirs:.17}"
    );
}

#[test]
fn every_fixture_case_matches_sklearn_and_scipy() {
    let path = common::fixtures().join("metrics/metrics.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 9, "fixture has {} cases", cases.len());
    let mut checked = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let regression = case["kind"] == "regression";
        let to_labels = |key: &str| -> Vec<Label> {
            case[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    if regression {
                        Label::Score(x.as_f64().unwrap())
                    } else {
                        Label::Class(x.as_u64().unwrap() as usize)
                    }
                })
                .collect()
        };
        let scores = all_metrics(&to_labels("labels"), &to_labels("predictions"), regression)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut n = 0;
        for (key, want) in case.as_object().unwrap() {
            let Some(metric) = Metric::from_name(key) else {
                continue;
            };
            let ours = scores
                .get(metric)
                .unwrap_or_else(|| panic!("{name}: {key} not computed"));
            close(&format!("{name}.{key}"), ours, want.as_f64().unwrap());
            n += 1;
        }
        assert!(n >= 1, "{name}: no metric compared");
        checked += n;
    }
    assert!(checked >= 30, "only {checked} values compared");
}

#[test]
fn f1_and_mcc_are_zero_when_undefined() {
    // No positive labels or predictions.
    assert_eq!(metric::f1(&[0, 0, 0], &[0, 0, 0]), 0.0);
    // Positives exist but none predicted.
    assert_eq!(metric::f1(&[1, 0, 1], &[0, 0, 0]), 0.0);
    // Constant prediction: a column of the confusion matrix is empty.
    assert_eq!(metric::mcc(&[1, 0, 1, 0], &[1, 1, 1, 1]), 0.0);
    assert_eq!(metric::mcc(&[1, 1], &[1, 0]), 0.0);
    assert_eq!(metric::mcc(&[], &[]), 0.0);
}

#[test]
fn simple_values() {
    assert_eq!(metric::accuracy(&[0, 1, 2, 1], &[0, 1, 1, 1]), 0.75);
    // tp 2, fp 1, fn 1: precision = recall = 2/3.
    close(
        "f1",
        metric::f1(&[1, 1, 1, 0, 0], &[1, 1, 0, 1, 0]),
        2.0 / 3.0,
    );
    assert_eq!(metric::mcc(&[0, 1, 0, 1], &[0, 1, 0, 1]), 1.0);
    assert_eq!(metric::mcc(&[0, 1, 0, 1], &[1, 0, 1, 0]), -1.0);
    close(
        "pearson",
        metric::pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]),
        0.9979487157886734,
    );
    assert_eq!(metric::pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), 0.0);
}

#[test]
fn ranks_average_ties() {
    assert_eq!(
        metric::average_ranks(&[10.0, 20.0, 10.0, 30.0, 20.0, 10.0]),
        vec![2.0, 4.5, 2.0, 6.0, 4.5, 2.0]
    );
    // Monotone but non-linear: Spearman 1, Pearson below 1.
    let x = [1.0, 2.0, 3.0, 4.0];
    let y = [1.0, 4.0, 9.0, 100.0];
    assert_eq!(metric::spearman(&x, &y), 1.0);
    assert!(metric::pearson(&x, &y) < 0.99);
}

#[test]
fn task_metrics_and_combined_scores() {
    let mrpc = Task::find("mrpc").unwrap();
    let gold: Vec<Label> = [1, 1, 0, 0].map(Label::Class).to_vec();
    let pred: Vec<Label> = [1, 0, 0, 0].map(Label::Class).to_vec();
    let s = metric::score(mrpc, &gold, &pred).unwrap();
    let names: Vec<&str> = s.0.iter().map(|(m, _)| m.name()).collect();
    assert_eq!(names, ["f1", "accuracy", "accuracy_and_f1"]);
    close("acc", s.get(Metric::Accuracy).unwrap(), 0.75);
    close("f1", s.get(Metric::F1).unwrap(), 2.0 / 3.0);
    close(
        "acc+f1",
        s.get(Metric::AccuracyAndF1).unwrap(),
        (0.75 + 2.0 / 3.0) / 2.0,
    );

    let stsb = Task::find("STS-B").unwrap();
    let g: Vec<Label> = [0.0, 1.0, 2.5, 5.0].map(Label::Score).to_vec();
    let p: Vec<Label> = [0.7, 0.5, 3.0, 4.0].map(Label::Score).to_vec();
    let s = metric::score(stsb, &g, &p).unwrap();
    let pe = s.get(Metric::Pearson).unwrap();
    let sp = s.get(Metric::Spearman).unwrap();
    close("spearman", sp, 0.8);
    close(
        "corr",
        s.get(Metric::PearsonAndSpearman).unwrap(),
        (pe + sp) / 2.0,
    );

    let cola = Task::find("cola").unwrap();
    assert_eq!(cola.metrics, [Metric::Mcc]);
    // Mismatched kinds are refused.
    assert!(metric::score(stsb, &gold, &pred).is_err());
    assert!(metric::score(mrpc, &gold[..2], &pred).is_err());
}

#[test]
fn glue_average_uses_the_papers_metric_per_task() {
    let t = |n: &str| Task::find(n).unwrap();
    let s = |v: Vec<(Metric, f64)>| Scores(v);
    let mrpc = s(vec![
        (Metric::F1, 0.9),
        (Metric::Accuracy, 0.8),
        (Metric::AccuracyAndF1, 0.85),
    ]);
    let qqp = s(vec![
        (Metric::F1, 0.7),
        (Metric::Accuracy, 0.9),
        (Metric::AccuracyAndF1, 0.8),
    ]);
    let stsb = s(vec![
        (Metric::Pearson, 0.8),
        (Metric::Spearman, 0.6),
        (Metric::PearsonAndSpearman, 0.7),
    ]);
    let mm = s(vec![(Metric::Accuracy, 0.1)]);
    let m = s(vec![(Metric::Accuracy, 0.6)]);
    let wnli = s(vec![(Metric::Accuracy, 0.0)]);
    let avg = metric::glue_average([
        (t("mrpc"), "dev", &mrpc),
        (t("qqp"), "dev", &qqp),
        (t("stsb"), "dev", &stsb),
        (t("mnli"), "dev_mismatched", &mm),
        (t("mnli"), "dev_matched", &m),
        (t("wnli"), "dev", &wnli),
    ])
    .unwrap();
    // MRPC F1 0.9, QQP combined 0.8, STS-B combined 0.7, MNLI matched 0.6; WNLI left out.
    close("avg", avg.value, (0.9 + 0.8 + 0.7 + 0.6) / 4.0);
    assert_eq!(
        avg.over,
        ["MRPC dev", "QQP dev", "STS-B dev", "MNLI dev_matched"]
    );
    assert!(metric::glue_average([(t("imdb"), "test", &m)]).is_none());
}

#[test]
fn paper_table_row_averages_to_its_avg_column() {
    // MPCBert-B Quad+2Quad row of the paper's GLUE table: MNLI(m) 84.9, QQP 88.1, QNLI 90.6,
    // SST-2 92.0, CoLA 52.6, STS-B 80.3, MRPC 88.7, RTE 64.9 -> Avg 80.3.
    let rows = [
        ("mnli", "dev_matched", 84.9),
        ("qqp", "dev", 88.1),
        ("qnli", "dev", 90.6),
        ("sst2", "dev", 92.0),
        ("cola", "dev", 52.6),
        ("stsb", "dev", 80.3),
        ("mrpc", "dev", 88.7),
        ("rte", "dev", 64.9),
    ];
    let scores: Vec<(&'static Task, &str, Scores)> = rows
        .iter()
        .map(|(n, split, v)| {
            let task = Task::find(n).unwrap();
            (task, *split, Scores(vec![(task.primary, v / 100.0)]))
        })
        .collect();
    let avg = metric::glue_average(scores.iter().map(|(t, s, sc)| (*t, *s, sc))).unwrap();
    assert_eq!((avg.value * 1000.0).round() / 10.0, 80.3);
    assert_eq!(avg.over.len(), 8);
}
