//! The official GLUE metrics, computed as scikit-learn and scipy compute them: accuracy, binary
//! F1 (positive class 1), Matthews correlation, Pearson, Spearman (average ranks for ties), the
//! combined scores, and the GLUE average of the paper's table.

use std::collections::BTreeMap;

use crate::data::{Label, Task};

/// A metric, named as in the metrics fixture (scikit-learn's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    Accuracy,
    /// Binary F1 of class 1; 0 when there are no positive labels or predictions.
    F1,
    /// Matthews correlation; 0 when a row or column of the confusion matrix is empty.
    Mcc,
    /// (accuracy + F1) / 2: MRPC's and QQP's combined score.
    AccuracyAndF1,
    Pearson,
    Spearman,
    /// (Pearson + Spearman) / 2: STS-B's combined score.
    PearsonAndSpearman,
}

impl Metric {
    pub const ALL: [Metric; 7] = [
        Metric::Accuracy,
        Metric::F1,
        Metric::Mcc,
        Metric::AccuracyAndF1,
        Metric::Pearson,
        Metric::Spearman,
        Metric::PearsonAndSpearman,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::F1 => "f1",
            Metric::Mcc => "matthews_corrcoef",
            Metric::AccuracyAndF1 => "accuracy_and_f1",
            Metric::Pearson => "pearson",
            Metric::Spearman => "spearman",
            Metric::PearsonAndSpearman => "pearson_and_spearman",
        }
    }

    /// A short column heading for tables.
    pub fn short(self) -> &'static str {
        match self {
            Metric::Accuracy => "acc",
            Metric::F1 => "f1",
            Metric::Mcc => "mcc",
            Metric::AccuracyAndF1 => "acc+f1",
            Metric::Pearson => "pearson",
            Metric::Spearman => "spearman",
            Metric::PearsonAndSpearman => "corr",
        }
    }

    pub fn from_name(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// Fraction of equal entries.
pub fn accuracy(gold: &[usize], pred: &[usize]) -> f64 {
    assert_eq!(gold.len(), pred.len(), "gold and predicted lengths differ");
    if gold.is_empty() {
        return 0.0;
    }
    let correct = gold.iter().zip(pred).filter(|(g, p)| g == p).count();
    correct as f64 / gold.len() as f64
}

/// Binary F1 with class 1 positive (scikit-learn's `f1_score(pos_label=1, zero_division=0)`).
pub fn f1(gold: &[usize], pred: &[usize]) -> f64 {
    assert_eq!(gold.len(), pred.len(), "gold and predicted lengths differ");
    let (mut tp, mut fp, mut fnn) = (0usize, 0usize, 0usize);
    for (&g, &p) in gold.iter().zip(pred) {
        match (g == 1, p == 1) {
            (true, true) => tp += 1,
            (false, true) => fp += 1,
            (true, false) => fnn += 1,
            (false, false) => {}
        }
    }
    if tp == 0 {
        return 0.0;
    }
    let precision = tp as f64 / (tp + fp) as f64;
    let recall = tp as f64 / (tp + fnn) as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Matthews correlation for any number of classes, as scikit-learn computes it.
pub fn mcc(gold: &[usize], pred: &[usize]) -> f64 {
    assert_eq!(gold.len(), pred.len(), "gold and predicted lengths differ");
    let k = gold.iter().chain(pred).copied().max().map_or(0, |m| m + 1);
    let mut t = vec![0f64; k];
    let mut p = vec![0f64; k];
    let mut correct = 0f64;
    for (&g, &q) in gold.iter().zip(pred) {
        t[g] += 1.0;
        p[q] += 1.0;
        if g == q {
            correct += 1.0;
        }
    }
    let s = gold.len() as f64;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let cov_tp = correct * s - dot(&t, &p);
    let cov_pp = s * s - dot(&p, &p);
    let cov_tt = s * s - dot(&t, &t);
    if cov_pp * cov_tt == 0.0 {
        return 0.0;
    }
    cov_tp / (cov_tt * cov_pp).sqrt()
}

/// Pearson correlation (scipy's `pearsonr`); 0 when either input is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "lengths differ");
    let n = x.len() as f64;
    if x.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let xm: Vec<f64> = x.iter().map(|v| v - mx).collect();
    let ym: Vec<f64> = y.iter().map(|v| v - my).collect();
    let nx = xm.iter().map(|v| v * v).sum::<f64>().sqrt();
    let ny = ym.iter().map(|v| v * v).sum::<f64>().sqrt();
    if nx == 0.0 || ny == 0.0 {
        return 0.0;
    }
    let r: f64 = xm.iter().zip(&ym).map(|(a, b)| (a / nx) * (b / ny)).sum();
    r.clamp(-1.0, 1.0)
}

/// Ranks from 1, ties sharing their average rank (scipy's `rankdata(method="average")`).
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        // Positions i..=j (0-based) share ranks i+1..=j+1.
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &o in &order[i..=j] {
            ranks[o] = rank;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman correlation: Pearson of the average ranks.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&average_ranks(x), &average_ranks(y))
}

/// The values of a task's metrics, in the task's display order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scores(pub Vec<(Metric, f64)>);

impl Scores {
    pub fn get(&self, metric: Metric) -> Option<f64> {
        self.0.iter().find(|(m, _)| *m == metric).map(|(_, v)| *v)
    }

    /// Name → value, as written to JSON.
    pub fn to_map(&self) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .map(|(m, v)| (m.name().to_string(), *v))
            .collect()
    }
}

/// Every metric of classification (`regression = false`) or regression, by the fixture's names.
pub fn all_metrics(gold: &[Label], pred: &[Label], regression: bool) -> Result<Scores, String> {
    if gold.len() != pred.len() {
        return Err(format!(
            "{} gold labels but {} predictions",
            gold.len(),
            pred.len()
        ));
    }
    if regression {
        let g = scores_of(gold)?;
        let p = scores_of(pred)?;
        let (pe, sp) = (pearson(&g, &p), spearman(&g, &p));
        Ok(Scores(vec![
            (Metric::Pearson, pe),
            (Metric::Spearman, sp),
            (Metric::PearsonAndSpearman, (pe + sp) / 2.0),
        ]))
    } else {
        let g = classes_of(gold)?;
        let p = classes_of(pred)?;
        let (acc, f) = (accuracy(&g, &p), f1(&g, &p));
        Ok(Scores(vec![
            (Metric::Accuracy, acc),
            (Metric::F1, f),
            (Metric::Mcc, mcc(&g, &p)),
            (Metric::AccuracyAndF1, (acc + f) / 2.0),
        ]))
    }
}

/// The task's metrics (those it reports, in its order).
pub fn score(task: &Task, gold: &[Label], pred: &[Label]) -> Result<Scores, String> {
    let all = all_metrics(gold, pred, task.is_regression())?;
    Ok(Scores(
        task.metrics
            .iter()
            .map(|m| (*m, all.get(*m).expect("metric computed for its kind")))
            .collect(),
    ))
}

/// The best any constant answer scores on `gold`, metric by metric: the majority class for
/// accuracy, always-positive for F1, and 0 for MCC and the correlations (a constant has none).
/// A model is only worth as much as it beats this.
pub fn trivial(task: &Task, gold: &[Label]) -> Result<Scores, String> {
    let constants: Vec<Label> = if task.is_regression() {
        vec![Label::Score(0.0)]
    } else {
        (0..task.labels.len()).map(Label::Class).collect()
    };
    let mut best: Option<Scores> = None;
    for c in constants {
        let s = score(task, gold, &vec![c; gold.len()])?;
        best = Some(match best {
            None => s,
            Some(b) => Scores(
                b.0.iter()
                    .map(|&(m, v)| (m, v.max(s.get(m).unwrap_or(f64::MIN))))
                    .collect(),
            ),
        });
    }
    best.ok_or_else(|| format!("{}: no labels", task.name))
}

/// How closely a student follows its teacher on the same examples: the share of examples where
/// both predict the same class, or (regression) the Pearson correlation of their scores.
pub fn agreement(teacher: &[Label], student: &[Label]) -> Result<f64, String> {
    if teacher.len() != student.len() || teacher.is_empty() {
        return Err(format!(
            "{} teacher and {} student predictions",
            teacher.len(),
            student.len()
        ));
    }
    if let (Ok(t), Ok(s)) = (classes_of(teacher), classes_of(student)) {
        return Ok(accuracy(&t, &s));
    }
    Ok(pearson(&scores_of(teacher)?, &scores_of(student)?))
}

/// Where a classifier student parts from its teacher, judged by the gold labels. The student's
/// accuracy differs from the teacher's by `(student_right − teacher_right) / n`; a student whose
/// disagreements are blind to which answers are right has the two counts in the ratio of the
/// teacher's errors to its right answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Disagreements {
    /// The teacher is right and the student is not.
    pub teacher_right: usize,
    /// The student is right and the teacher is not.
    pub student_right: usize,
    /// Both are wrong, with different classes (three or more classes only).
    pub both_wrong: usize,
}

/// `None` for regression, where agreement is a correlation and there is nothing to count.
pub fn disagreements(
    gold: &[Label],
    teacher: &[Label],
    student: &[Label],
) -> Result<Option<Disagreements>, String> {
    if gold.len() != teacher.len() || teacher.len() != student.len() {
        return Err(format!(
            "{} gold labels, {} teacher and {} student predictions",
            gold.len(),
            teacher.len(),
            student.len()
        ));
    }
    let (Ok(g), Ok(t), Ok(s)) = (classes_of(gold), classes_of(teacher), classes_of(student)) else {
        return Ok(None);
    };
    let mut d = Disagreements {
        teacher_right: 0,
        student_right: 0,
        both_wrong: 0,
    };
    for ((g, t), s) in g.iter().zip(&t).zip(&s) {
        match (t == g, s == g) {
            _ if t == s => {}
            (true, _) => d.teacher_right += 1,
            (_, true) => d.student_right += 1,
            _ => d.both_wrong += 1,
        }
    }
    Ok(Some(d))
}

/// A student's accuracy minus its teacher's on one dev set, in points of accuracy (0–1), with
/// the half-width of its 95 % confidence interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairedGap {
    pub mean: f64,
    pub half_width: f64,
}

impl PairedGap {
    pub fn low(&self) -> f64 {
        self.mean - self.half_width
    }
    pub fn high(&self) -> f64 {
        self.mean + self.half_width
    }
}

/// The student − teacher accuracy gap over `n` dev examples, from each seed's
/// `(teacher_right, student_right)` disagreement counts, paired: per example and seed the gap is
/// +1 where only the student is right, −1 where only the teacher is, else 0, so the examples both
/// answer alike add nothing to the spread. The dev examples are the sample; seeds are not new
/// examples, and their per-example gaps may be correlated to any degree, so the interval takes
/// the worst case (perfect correlation: the standard deviation of the seeds' mean is at most the
/// mean of their standard deviations). Normal approximation; `None` without examples or seeds.
pub fn paired_accuracy_gap(n: usize, parted: &[(usize, usize)]) -> Option<PairedGap> {
    if n < 2 || parted.is_empty() {
        return None;
    }
    let nf = n as f64;
    let seeds = parted.len() as f64;
    let (mut mean, mut sd) = (0.0, 0.0);
    for &(teacher_right, student_right) in parted {
        let m = (student_right as f64 - teacher_right as f64) / nf;
        let second_moment = (student_right + teacher_right) as f64 / nf;
        let var = (second_moment - m * m) * nf / (nf - 1.0);
        mean += m / seeds;
        sd += var.max(0.0).sqrt() / seeds;
    }
    Some(PairedGap {
        mean,
        half_width: 1.959_964 * sd / nf.sqrt(),
    })
}

/// The examples split at the teacher's median confidence: the half where it is surest (the
/// larger `confidence`; the first half of an odd count), then the other half. A student that
/// disagrees mostly where the teacher is unsure has followed what the teacher knows, and the
/// teacher's accuracy on that half says what following it there is worth.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ConfidenceHalves {
    pub agreement: [f64; 2],
    pub teacher_accuracy: [f64; 2],
}

/// `None` for regression.
pub fn by_teacher_confidence(
    confidence: &[f64],
    gold: &[Label],
    teacher: &[Label],
    student: &[Label],
) -> Result<Option<ConfidenceHalves>, String> {
    let n = teacher.len();
    if confidence.len() != n || gold.len() != n || student.len() != n || n < 2 {
        return Err(format!(
            "{} confidences, {} gold labels, {} teacher and {} student predictions (at least 2 \
             needed)",
            confidence.len(),
            gold.len(),
            n,
            student.len()
        ));
    }
    let (Ok(g), Ok(t), Ok(s)) = (classes_of(gold), classes_of(teacher), classes_of(student)) else {
        return Ok(None);
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| confidence[b].total_cmp(&confidence[a]));
    let (sure, unsure) = order.split_at(n.div_ceil(2));
    let share = |idx: &[usize], other: &[usize]| {
        idx.iter().filter(|&&i| t[i] == other[i]).count() as f64 / idx.len() as f64
    };
    Ok(Some(ConfidenceHalves {
        agreement: [share(sure, &s), share(unsure, &s)],
        teacher_accuracy: [share(sure, &g), share(unsure, &g)],
    }))
}

fn classes_of(labels: &[Label]) -> Result<Vec<usize>, String> {
    labels
        .iter()
        .map(|l| {
            l.class()
                .ok_or_else(|| format!("expected a class label, found {l:?}"))
        })
        .collect()
}

fn scores_of(labels: &[Label]) -> Result<Vec<f64>, String> {
    labels
        .iter()
        .map(|l| {
            l.score()
                .ok_or_else(|| format!("expected a score, found {l:?}"))
        })
        .collect()
}

/// The GLUE average as the paper's table computes it: the mean over the GLUE tasks evaluated
/// of each task's primary metric (CoLA MCC, STS-B mean of Pearson and Spearman, MRPC F1, QQP
/// mean of accuracy and F1, the others accuracy), MNLI counted once by its matched accuracy,
/// WNLI left out (the paper has no WNLI column).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GlueAverage {
    pub value: f64,
    /// `TASK split` of each result averaged.
    pub over: Vec<String>,
}

pub fn glue_average<'a>(
    results: impl IntoIterator<Item = (&'a Task, &'a str, &'a Scores)>,
) -> Option<GlueAverage> {
    let mut picked: Vec<(&Task, &str, f64)> = Vec::new();
    for (task, split, scores) in results {
        if !task.glue || task.name == "wnli" {
            continue;
        }
        let Some(v) = scores.get(task.primary) else {
            continue;
        };
        match picked.iter_mut().find(|(t, _, _)| t.name == task.name) {
            // MNLI: matched wins over mismatched.
            Some(slot) if split == "dev_matched" && slot.1 != "dev_matched" => {
                *slot = (task, split, v)
            }
            Some(_) => {}
            None => picked.push((task, split, v)),
        }
    }
    if picked.is_empty() {
        return None;
    }
    Some(GlueAverage {
        value: picked.iter().map(|p| p.2).sum::<f64>() / picked.len() as f64,
        over: picked
            .iter()
            .map(|(t, s, _)| format!("{} {s}", t.title))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(v: &[usize]) -> Vec<Label> {
        v.iter().map(|&c| Label::Class(c)).collect()
    }

    #[test]
    fn disagreements_are_counted_by_who_is_right() {
        let gold = classes(&[0, 1, 2, 0, 1, 2]);
        let teacher = classes(&[0, 1, 0, 1, 1, 2]);
        let student = classes(&[1, 1, 2, 2, 1, 2]);
        // 0: teacher right; 2: student right; 3: both wrong; 1, 4, 5: same answer.
        let d = disagreements(&gold, &teacher, &student).unwrap().unwrap();
        assert_eq!(
            d,
            Disagreements {
                teacher_right: 1,
                student_right: 1,
                both_wrong: 1
            }
        );
        let scores = |v: &[f64]| v.iter().map(|&x| Label::Score(x)).collect::<Vec<_>>();
        let r = scores(&[1.0, 2.0]);
        assert_eq!(disagreements(&r, &r, &r).unwrap(), None);
        assert!(disagreements(&gold, &teacher, &student[..5]).is_err());
    }

    /// Sample mean and standard deviation of explicit per-example gaps.
    fn mean_sd(d: &[f64]) -> (f64, f64) {
        let n = d.len() as f64;
        let m = d.iter().sum::<f64>() / n;
        let var = d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
        (m, var.sqrt())
    }

    #[test]
    fn the_paired_gap_is_the_mean_of_per_example_gaps() {
        // Seed A: 20 examples only the teacher gets right, 17 only the student, 240 alike
        // (RTE's seed 42); seed B: 22 and 15.
        let gaps = |teacher_right: usize, student_right: usize| {
            let mut d = vec![-1.0; teacher_right];
            d.extend(vec![1.0; student_right]);
            d.resize(277, 0.0);
            d
        };
        let (a, b) = (gaps(20, 17), gaps(22, 15));
        let one = paired_accuracy_gap(277, &[(20, 17)]).unwrap();
        let (m, sd) = mean_sd(&a);
        assert!((one.mean - m).abs() < 1e-12 && (one.mean + 3.0 / 277.0).abs() < 1e-12);
        assert!((one.half_width - 1.959_964 * sd / 277f64.sqrt()).abs() < 1e-12);
        // Two seeds: the mean of their gaps, and the mean of their spreads (the bound, reached
        // when their per-example gaps are perfectly correlated).
        let two = paired_accuracy_gap(277, &[(20, 17), (22, 15)]).unwrap();
        let (mb, sdb) = mean_sd(&b);
        assert!((two.mean - (m + mb) / 2.0).abs() < 1e-12);
        assert!((two.half_width - 1.959_964 * (sd + sdb) / 2.0 / 277f64.sqrt()).abs() < 1e-12);
        // Identical seeds are one seed; a seed that answers like its teacher has no spread.
        let same = paired_accuracy_gap(277, &[(20, 17), (20, 17)]).unwrap();
        assert!((same.half_width - one.half_width).abs() < 1e-12);
        let alike = paired_accuracy_gap(277, &[(0, 0)]).unwrap();
        assert_eq!((alike.mean, alike.half_width), (0.0, 0.0));
        assert_eq!(paired_accuracy_gap(277, &[]), None);
        assert_eq!(paired_accuracy_gap(0, &[(1, 1)]), None);
    }

    #[test]
    fn halves_split_at_the_teachers_median_confidence() {
        let gold = classes(&[0, 0, 1, 0, 0]);
        let teacher = classes(&[0, 1, 1, 0, 1]);
        let student = classes(&[0, 0, 1, 1, 1]);
        // Surest three: 4 (0.99), 0 (0.9), 3 (0.8): agree on 4 and 0, the teacher right on 0
        // and 3. The rest, 2 and 1: agree on 2, the teacher right on 2.
        let conf = [0.9, 0.5, 0.6, 0.8, 0.99];
        let h = by_teacher_confidence(&conf, &gold, &teacher, &student)
            .unwrap()
            .unwrap();
        let close = |a: [f64; 2], b: [f64; 2]| (a[0] - b[0]).abs() + (a[1] - b[1]).abs() < 1e-12;
        assert!(close(h.agreement, [2.0 / 3.0, 0.5]), "{h:?}");
        assert!(close(h.teacher_accuracy, [2.0 / 3.0, 0.5]), "{h:?}");
        assert!(by_teacher_confidence(&conf[..4], &gold, &teacher, &student).is_err());
    }

    #[test]
    fn trivial_is_the_best_constant_per_metric() {
        // 3 of 4 positive: always-positive has accuracy 3/4 and F1 2·(3/4)·1 / (3/4 + 1) = 6/7.
        let mrpc = Task::find("mrpc").unwrap();
        let t = trivial(mrpc, &classes(&[1, 1, 0, 1])).unwrap();
        assert_eq!(t.get(Metric::Accuracy), Some(0.75));
        assert!((t.get(Metric::F1).unwrap() - 6.0 / 7.0).abs() < 1e-12);
        // Majority negative: accuracy from "always 0", F1 still from "always 1" (2·(1/3) / (4/3)).
        let t = trivial(mrpc, &classes(&[0, 0, 1])).unwrap();
        assert!((t.get(Metric::Accuracy).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((t.get(Metric::F1).unwrap() - 0.5).abs() < 1e-12);
        let cola = Task::find("cola").unwrap();
        assert_eq!(
            trivial(cola, &classes(&[0, 1, 1]))
                .unwrap()
                .get(Metric::Mcc),
            Some(0.0)
        );
        let stsb = Task::find("stsb").unwrap();
        let gold = [Label::Score(1.0), Label::Score(4.5), Label::Score(2.0)];
        let t = trivial(stsb, &gold).unwrap();
        assert_eq!(t.get(Metric::Pearson), Some(0.0));
        assert_eq!(t.get(Metric::Spearman), Some(0.0));
    }

    #[test]
    fn agreement_counts_equal_classes_or_correlates_scores() {
        let a = agreement(&classes(&[0, 1, 1, 0]), &classes(&[0, 1, 0, 0])).unwrap();
        assert_eq!(a, 0.75);
        let s = |v: &[f64]| v.iter().map(|&x| Label::Score(x)).collect::<Vec<_>>();
        let r = agreement(&s(&[1.0, 2.0, 3.0]), &s(&[2.0, 4.0, 6.5])).unwrap();
        // Pearson of (1,2,3) and (2,4,6.5): 4.5 / sqrt(2 · 10.1667) = 0.997949.
        assert!((r - 0.997_948_7).abs() < 1e-6, "{r}");
        assert!(agreement(&classes(&[0]), &classes(&[0, 1])).is_err());
    }
}
