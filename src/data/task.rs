//! The task registry: for each GLUE task and IMDb, its text columns, labels (in GLUE's order),
//! metrics, default maximum length, splits and file names. Everything else asks here.

use std::fmt;

use crate::metric::Metric;

/// A gold or predicted label.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Label {
    /// Index into [`Task::labels`].
    Class(usize),
    /// A regression target (STS-B: 0–5).
    Score(f64),
}

impl Label {
    pub fn class(self) -> Option<usize> {
        match self {
            Label::Class(c) => Some(c),
            Label::Score(_) => None,
        }
    }

    pub fn score(self) -> Option<f64> {
        match self {
            Label::Score(s) => Some(s),
            Label::Class(_) => None,
        }
    }
}

/// One split of a task: its name on our command line, its GLUE file and its Hub name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// `train`, `dev`, `test`, or MNLI's `dev_matched`, `dev_mismatched`, `test_matched`, ...
    pub name: &'static str,
    /// The file as GLUE (or our IMDb JSONL) distributes it.
    pub file: &'static str,
    /// The split's name in the Hugging Face dataset (`validation`, `validation_matched`, ...).
    pub hub: &'static str,
    /// The GLUE server's submission file for this (test) split.
    pub submission: Option<&'static str>,
}

/// Where a column of a headerless GLUE file is (CoLA's train and dev).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headerless {
    pub columns: usize,
    pub text: usize,
    pub label: usize,
}

/// The columns of a task's files, by header name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Columns {
    /// One column for single sentences, two for pairs.
    pub text: &'static [&'static str],
    pub label: &'static str,
    /// The example id column (used for submission files), when there is one.
    pub index: &'static str,
}

/// Everything this project knows about a task.
#[derive(Debug, PartialEq)]
pub struct Task {
    /// Command-line name and Hugging Face config name: `cola`, `sst2`, ..., `imdb`.
    pub name: &'static str,
    /// Display name, GLUE folder name: `CoLA`, `SST-2`, ..., `IMDb`.
    pub title: &'static str,
    /// Label names in id order, exactly as GLUE's processors order them. Empty for regression.
    pub labels: &'static [&'static str],
    /// Label names (ours) in the order of the Hugging Face dataset's integer ids, which differ
    /// from GLUE's for MNLI.
    pub hub_labels: &'static [&'static str],
    /// Every metric reported, in display order.
    pub metrics: &'static [Metric],
    /// The task's score in the paper's GLUE table (and for picking the best checkpoint).
    pub primary: Metric,
    pub max_len: usize,
    pub splits: &'static [Split],
    /// What `--split dev` means: the evaluation splits.
    pub eval_splits: &'static [&'static str],
    /// The original GLUE TSV columns (IMDb: the JSONL fields).
    pub tsv: Columns,
    /// CoLA's train/dev files have no header.
    pub headerless: Option<Headerless>,
    /// The Hugging Face dataset's columns.
    pub hub: Columns,
    /// The Hugging Face dataset: repository and config.
    pub hub_repo: &'static str,
    pub hub_config: Option<&'static str>,
    /// Part of the GLUE benchmark (and of its average).
    pub glue: bool,
}

const fn split(
    name: &'static str,
    file: &'static str,
    hub: &'static str,
    submission: Option<&'static str>,
) -> Split {
    Split {
        name,
        file,
        hub,
        submission,
    }
}

const fn glue_splits(submission: &'static str) -> [Split; 3] {
    [
        split("train", "train.tsv", "train", None),
        split("dev", "dev.tsv", "validation", None),
        split("test", "test.tsv", "test", Some(submission)),
    ]
}

const COLA_SPLITS: [Split; 3] = glue_splits("CoLA.tsv");
const SST2_SPLITS: [Split; 3] = glue_splits("SST-2.tsv");
const MRPC_SPLITS: [Split; 3] = glue_splits("MRPC.tsv");
const STSB_SPLITS: [Split; 3] = glue_splits("STS-B.tsv");
const QQP_SPLITS: [Split; 3] = glue_splits("QQP.tsv");
const QNLI_SPLITS: [Split; 3] = glue_splits("QNLI.tsv");
const RTE_SPLITS: [Split; 3] = glue_splits("RTE.tsv");
const WNLI_SPLITS: [Split; 3] = glue_splits("WNLI.tsv");
const MNLI_SPLITS: [Split; 5] = [
    split("train", "train.tsv", "train", None),
    split("dev_matched", "dev_matched.tsv", "validation_matched", None),
    split(
        "dev_mismatched",
        "dev_mismatched.tsv",
        "validation_mismatched",
        None,
    ),
    split(
        "test_matched",
        "test_matched.tsv",
        "test_matched",
        Some("MNLI-m.tsv"),
    ),
    split(
        "test_mismatched",
        "test_mismatched.tsv",
        "test_mismatched",
        Some("MNLI-mm.tsv"),
    ),
];
const IMDB_SPLITS: [Split; 2] = [
    split("train", "train.jsonl", "train", None),
    split("test", "test.jsonl", "test", Some("IMDb.tsv")),
];

const BINARY: &[&str] = &["0", "1"];
const NLI2: &[&str] = &["entailment", "not_entailment"];
const ACC: &[Metric] = &[Metric::Accuracy];
const F1_ACC: &[Metric] = &[Metric::F1, Metric::Accuracy, Metric::AccuracyAndF1];
const PAIR: &[&str] = &["sentence1", "sentence2"];

const fn cols(text: &'static [&'static str], label: &'static str, index: &'static str) -> Columns {
    Columns { text, label, index }
}

const fn hub_cols(text: &'static [&'static str]) -> Columns {
    cols(text, "label", "idx")
}

/// Every task, in the paper's table order, IMDb last.
pub static TASKS: &[Task] = &[
    Task {
        name: "mnli",
        title: "MNLI",
        labels: &["contradiction", "entailment", "neutral"],
        hub_labels: &["entailment", "neutral", "contradiction"],
        metrics: ACC,
        primary: Metric::Accuracy,
        max_len: 128,
        splits: &MNLI_SPLITS,
        eval_splits: &["dev_matched", "dev_mismatched"],
        tsv: cols(PAIR, "gold_label", "index"),
        headerless: None,
        hub: hub_cols(&["premise", "hypothesis"]),
        hub_repo: "nyu-mll/glue",
        hub_config: Some("mnli"),
        glue: true,
    },
    Task {
        name: "qqp",
        title: "QQP",
        labels: BINARY,
        hub_labels: BINARY,
        metrics: F1_ACC,
        primary: Metric::AccuracyAndF1,
        max_len: 128,
        splits: &QQP_SPLITS,
        eval_splits: &["dev"],
        tsv: cols(&["question1", "question2"], "is_duplicate", "id"),
        headerless: None,
        hub: hub_cols(&["question1", "question2"]),
        hub_repo: "nyu-mll/glue",
        hub_config: Some("qqp"),
        glue: true,
    },
    Task {
        name: "qnli",
        title: "QNLI",
        labels: NLI2,
        hub_labels: NLI2,
        metrics: ACC,
        primary: Metric::Accuracy,
        max_len: 128,
        splits: &QNLI_SPLITS,
        eval_splits: &["dev"],
        tsv: cols(&["question", "sentence"], "label", "index"),
        headerless: None,
        hub: hub_cols(&["question", "sentence"]),
        hub_repo: "nyu-mll/glue",
        hub_config: Some("qnli"),
        glue: true,
    },
    Task {
        name: "sst2",
        title: "SST-2",
        labels: BINARY,
        hub_labels: BINARY,
        metrics: ACC,
        primary: Metric::Accuracy,
        max_len: 128,
        splits: &SST2_SPLITS,
        eval_splits: &["dev"],
        tsv: cols(&["sentence"], "label", "index"),
        headerless: None,
        hub: hub_cols(&["sentence"]),
        hub_repo: "nyu-mll/glue",
        hub_config: Some("sst2"),
        glue: true,
    },
    Task {
        name: "cola",
        title: "CoLA",
        labels: BINARY,
        hub_labels: BINARY,
        metrics: &[Metric::Mcc],
        primary: Metric::Mcc,
        max_len: 128,
        splits: &COLA_SPLITS,
        eval_splits: &["dev"],
        tsv: cols(&["sentence"], "label", "index"),
        headerless: Some(Headerless {
            columns: 4,
            text: 3,
            label: 1,
        }),
        hub: hub_cols(&["sentence"]),
        hub_repo: "nyu-mll/glue",
        hub_config: Some("cola"),
        glue: true,
    },
    Task {
        name: "stsb",
        title: "STS-B",
        labels: &[],
        hub_labels: &[],
        metrics: &[
            Metric::Pearson,
            Metric::Spearman,
            Metric::PearsonAndSpearman,
        ],
        primary: Metric::PearsonAndSpearman,
        max_len: 128,
        splits: &STSB_SPLITS,
        eval_splits: &["dev"],
        tsv: cols(PAIR, "score", "index"),
        headerless: None,
        hub: hub_cols(PAIR),
        hub_repo: "nyu-mll/glue",
        hub_config: Some("stsb"),
        glue: true,
    },
    Task {
        name: "mrpc",
        title: "MRPC",
        labels: BINARY,
        hub_labels: BINARY,
        metrics: F1_ACC,
        primary: Metric::F1,
        max_len: 128,
        splits: &MRPC_SPLITS,
        eval_splits: &["dev"],
        tsv: cols(&["#1 String", "#2 String"], "Quality", "index"),
        headerless: None,
        hub: hub_cols(PAIR),
        hub_repo: "nyu-mll/glue",
        hub_config: Some("mrpc"),
        glue: true,
    },
    Task {
        name: "rte",
        title: "RTE",
        labels: NLI2,
        hub_labels: NLI2,
        metrics: ACC,
        primary: Metric::Accuracy,
        max_len: 128,
        splits: &RTE_SPLITS,
        eval_splits: &["dev"],
        tsv: cols(PAIR, "label", "index"),
        headerless: None,
        hub: hub_cols(PAIR),
        hub_repo: "nyu-mll/glue",
        hub_config: Some("rte"),
        glue: true,
    },
    Task {
        name: "wnli",
        title: "WNLI",
        labels: BINARY,
        hub_labels: BINARY,
        metrics: ACC,
        primary: Metric::Accuracy,
        max_len: 128,
        splits: &WNLI_SPLITS,
        eval_splits: &["dev"],
        tsv: cols(PAIR, "label", "index"),
        headerless: None,
        hub: hub_cols(PAIR),
        hub_repo: "nyu-mll/glue",
        hub_config: Some("wnli"),
        glue: true,
    },
    Task {
        name: "imdb",
        title: "IMDb",
        labels: &["neg", "pos"],
        hub_labels: &["neg", "pos"],
        metrics: ACC,
        primary: Metric::Accuracy,
        max_len: 512,
        splits: &IMDB_SPLITS,
        eval_splits: &["test"],
        tsv: cols(&["text"], "label", "id"),
        headerless: None,
        hub: cols(&["text"], "label", "idx"),
        hub_repo: "stanfordnlp/imdb",
        hub_config: None,
        glue: false,
    },
];

fn normalise(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

impl Task {
    /// One of GLUE's tasks: counted in a GLUE average (IMDb is reported beside it, as the paper does).
    pub fn is_glue(&self) -> bool {
        self.hub_repo == "nyu-mll/glue"
    }

    /// Looks a task up by name, ignoring case, `-` and `_` (`SST-2`, `sst2`, `sts_b`).
    pub fn find(name: &str) -> Result<&'static Task, String> {
        let key = normalise(name);
        TASKS
            .iter()
            .find(|t| normalise(t.name) == key || normalise(t.title) == key)
            .ok_or_else(|| {
                format!(
                    "unknown task `{name}`; known tasks: {}",
                    TASKS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
                )
            })
    }

    pub fn is_regression(&self) -> bool {
        self.labels.is_empty()
    }

    /// Outputs of the classification head: 1 for regression.
    pub fn num_outputs(&self) -> usize {
        self.labels.len().max(1)
    }

    /// Labels for the model's head (`Overrides::labels`): names and whether it is regression.
    pub fn head_labels(&self) -> (Vec<String>, bool) {
        if self.is_regression() {
            (vec!["LABEL_0".into()], true)
        } else {
            (self.labels.iter().map(|s| s.to_string()).collect(), false)
        }
    }

    pub fn split(&self, name: &str) -> Result<&'static Split, String> {
        let splits: &'static [Split] = self.splits;
        let key = match name {
            "validation" | "val" => "dev",
            other => other,
        };
        splits
            .iter()
            .find(|s| s.name == key || s.hub == key)
            .ok_or_else(|| {
                format!(
                    "{} has no split `{name}`; {}",
                    self.title,
                    self.split_list()
                )
            })
    }

    /// The concrete splits a `--split` value means: `dev` is the task's evaluation splits
    /// (MNLI: matched and mismatched; IMDb: test), anything else one split.
    pub fn resolve_splits(&self, name: &str) -> Result<Vec<&'static Split>, String> {
        if name == "dev" && !self.splits.iter().any(|s| s.name == "dev") {
            return self.eval_splits.iter().map(|s| self.split(s)).collect();
        }
        if name == "test" && !self.splits.iter().any(|s| s.name == "test") {
            return Ok(self
                .splits
                .iter()
                .filter(|s| s.submission.is_some())
                .collect());
        }
        Ok(vec![self.split(name)?])
    }

    fn split_list(&self) -> String {
        format!(
            "its splits are {}",
            self.splits
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// GLUE's (or our JSONL's) file names, for messages.
    pub fn file_names(&self) -> String {
        self.splits
            .iter()
            .map(|s| s.file)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A label written by name (`entailment`, `0`), or the score of a regression task.
    pub fn parse_label(&self, text: &str) -> Result<Label, String> {
        let t = text.trim();
        if self.is_regression() {
            return parse_score(t);
        }
        self.labels
            .iter()
            .position(|l| *l == t)
            .map(Label::Class)
            .ok_or_else(|| self.unknown_label(text))
    }

    /// A label given as an integer id in the Hugging Face dataset's order (negative: no label,
    /// as in the Hub's test splits), or a float score.
    pub fn label_from_hub_id(&self, id: i64) -> Result<Option<Label>, String> {
        if id < 0 {
            return Ok(None);
        }
        if self.is_regression() {
            return Ok(Some(Label::Score(id as f64)));
        }
        let name = self
            .hub_labels
            .get(id as usize)
            .ok_or_else(|| self.unknown_label(&id.to_string()))?;
        Ok(Some(Label::Class(
            self.labels
                .iter()
                .position(|l| l == name)
                .expect("hub labels are task labels"),
        )))
    }

    /// A label given as a string: a label name, else an integer id in the Hub's order.
    pub fn label_from_text(&self, text: &str) -> Result<Label, String> {
        match self.parse_label(text) {
            Ok(l) => Ok(l),
            Err(e) => match text.trim().parse::<i64>() {
                Ok(id) if id >= 0 => self
                    .label_from_hub_id(id)
                    .map(|l| l.expect("non-negative id")),
                _ => Err(e),
            },
        }
    }

    fn unknown_label(&self, text: &str) -> String {
        format!(
            "unknown label `{text}` ({} labels: {}{})",
            self.title,
            self.labels.join(", "),
            if self.labels != self.hub_labels {
                format!(
                    "; integer ids follow the Hub's order: {}",
                    self.hub_labels.join(", ")
                )
            } else {
                String::new()
            }
        )
    }

    /// Text as the model should see it: IMDb's `<br />` tags become spaces.
    pub fn clean_text(&self, text: String) -> String {
        if self.name == "imdb" && text.contains("<br") {
            text.replace("<br />", " ")
                .replace("<br/>", " ")
                .replace("<br>", " ")
        } else {
            text
        }
    }
}

fn parse_score(t: &str) -> Result<Label, String> {
    let v: f64 = t.parse().map_err(|_| {
        format!("unparsable score `{t}` (expected a number; STS-B scores run from 0 to 5)")
    })?;
    if !v.is_finite() {
        return Err(format!("score `{t}` is not a finite number"));
    }
    Ok(Label::Score(v))
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title)
    }
}
