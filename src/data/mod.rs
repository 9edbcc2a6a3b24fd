//! Datasets: the task registry, readers for every form the data comes in (GLUE TSV, aclImdb
//! folders, JSONL/CSV, Hugging Face hub parquet), and tokenisation + batching.
//!
//! A *data spec* names where a task's data is:
//! - `hub:org/name[/config][@revision]`: a Hugging Face dataset (`hub:nyu-mll/glue/rte`,
//!   `hub:stanfordnlp/imdb`), cached in the standard HF cache;
//! - a directory: GLUE's folder (`glue/` or `glue/RTE/`), an `aclImdb/` folder, or a folder of
//!   `<split>.{tsv,jsonl,csv,parquet}` files;
//! - a file: `.tsv` (GLUE format), `.jsonl`/`.json`, `.csv`, `.parquet`.
//!
//! With no spec, the task's Hub dataset is used.

pub mod batch;
pub mod generic;
pub mod glue;
pub mod hub;
pub mod imdb;
pub mod task;
pub mod transfer;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use batch::{Batch, Order, Tokenized, plan_batches};
pub use task::{Label, Split, TASKS, Task};

/// One example as read: text(s), label (absent in test splits) and id.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub text_a: String,
    pub text_b: Option<String>,
    pub label: Option<Label>,
    /// The file's index/id column, else the row number from 0: what submission files list.
    pub id: String,
}

/// The examples of one split of one task.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub task: &'static Task,
    /// Our split name (`dev`, `dev_matched`, `test`, ...).
    pub split: String,
    /// Where it was read from, for messages.
    pub source: String,
    pub examples: Vec<Example>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Keeps `n` examples drawn uniformly without replacement, in file order. The draw depends
    /// only on `n` and the split's size, not on the run's seed, so every seed and variant of a
    /// recipe sees the same subset — and a split sorted by label (IMDb's) keeps both labels,
    /// which a head (`*_limit`) would not.
    pub fn sample(&mut self, n: usize) {
        if n < self.len() {
            let keep = draw(self.len(), n, 0);
            self.examples = self.split_off(&keep);
        }
    }

    /// Moves `n` examples, drawn uniformly as [`Dataset::sample`] draws (the same for every
    /// seed, another draw than `sample`'s), into a dataset of their own, and returns it: the
    /// held-out examples a run chooses its checkpoints on (`data.select_examples`).
    pub fn hold_out(&mut self, n: usize) -> Dataset {
        let out = draw(
            self.len(),
            n.min(self.len()),
            u64::from_be_bytes(*b"held-out"),
        );
        Dataset {
            task: self.task,
            split: format!("{} (held out)", self.split),
            source: self.source.clone(),
            examples: self.split_off(&out),
        }
    }

    /// Removes the examples at `idx` (sorted) and returns them in order.
    fn split_off(&mut self, idx: &[usize]) -> Vec<Example> {
        let mut taken = Vec::with_capacity(idx.len());
        let mut rest = Vec::with_capacity(self.len() - idx.len());
        let mut next = idx.iter().peekable();
        for (i, e) in std::mem::take(&mut self.examples).into_iter().enumerate() {
            if next.next_if(|&&j| j == i).is_some() {
                taken.push(e);
            } else {
                rest.push(e);
            }
        }
        self.examples = rest;
        taken
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// True when every example has a label.
    pub fn is_labelled(&self) -> bool {
        self.examples.iter().all(|e| e.label.is_some())
    }

    /// The gold labels, or `None` when the split is unlabelled (a test split).
    pub fn labels(&self) -> Option<Vec<Label>> {
        self.examples.iter().map(|e| e.label).collect()
    }
}

/// Errors in data: each names the file (and line) or the spec at fault.
#[derive(Debug, Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A malformed row: wrong column count, unparsable label or score, unknown label.
    #[error("{path}:{line}: {msg}")]
    Row {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{source_name}: {task} {split} has no examples (empty split)")]
    Empty {
        source_name: String,
        task: String,
        split: String,
    },
    #[error(
        "{task} {split}: no data file found; tried {tried}; {task}'s files are named {expected}"
    )]
    Missing {
        task: String,
        split: String,
        tried: String,
        expected: String,
    },
    #[error("data spec `{spec}`: {msg}")]
    Spec { spec: String, msg: String },
    #[error("Hub dataset `{spec}`: {msg}")]
    Hub { spec: String, msg: String },
}

impl DataError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn row(path: &Path, line: usize, msg: impl Into<String>) -> Self {
        DataError::Row {
            path: path.to_path_buf(),
            line,
            msg: msg.into(),
        }
    }

    pub fn file(path: &Path, msg: impl Into<String>) -> Self {
        DataError::File {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// Column (field) names overriding the task's defaults, for JSONL/CSV/TSV/parquet files whose
/// columns are named otherwise (`--text-field`, `--label-field`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields {
    /// One field, or two for a pair.
    pub text: Vec<String>,
    pub label: Option<String>,
}

impl Fields {
    /// The columns to read: these overrides on top of `default`.
    pub fn resolve(&self, default: &task::Columns) -> Result<Resolved, String> {
        let text: Vec<String> = if self.text.is_empty() {
            default.text.iter().map(|s| s.to_string()).collect()
        } else {
            self.text.clone()
        };
        if text.is_empty() || text.len() > 2 {
            return Err(format!(
                "give one text field, or two for a pair (got {})",
                text.len()
            ));
        }
        Ok(Resolved {
            text,
            label: self.label.clone().unwrap_or_else(|| default.label.into()),
            index: vec![
                default.index.to_string(),
                "idx".into(),
                "id".into(),
                "index".into(),
            ],
        })
    }
}

/// Column names after applying [`Fields`] overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub text: Vec<String>,
    pub label: String,
    /// Candidate id columns, first present wins.
    pub index: Vec<String>,
}

/// The file formats a local spec may be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// GLUE's TSV: tab-separated, not quoted.
    Tsv,
    Jsonl,
    Csv,
    Parquet,
}

impl Format {
    pub fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "tsv" => Some(Format::Tsv),
            "jsonl" | "json" | "ndjson" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }
}

/// The task's default spec: its Hub dataset.
pub fn default_spec(task: &Task) -> String {
    match task.hub_config {
        Some(c) => format!("hub:{}/{c}", task.hub_repo),
        None => format!("hub:{}", task.hub_repo),
    }
}

/// Reads one split of a task from a data spec (see the module docs); `None` means the task's
/// Hub dataset. An empty split is an error.
pub fn load(
    task: &'static Task,
    spec: Option<&str>,
    split: &Split,
    fields: &Fields,
) -> Result<Dataset, DataError> {
    let spec = spec
        .map(str::to_string)
        .unwrap_or_else(|| default_spec(task));
    let (source, examples) = if let Some(hub_spec) = spec.strip_prefix("hub:") {
        let h = hub::HubSpec::parse(hub_spec)?;
        let files = h.split_files(split.hub)?;
        let mut examples = Vec::new();
        for f in &files {
            examples.extend(hub::read_parquet(f, task, fields)?);
        }
        (spec.clone(), examples)
    } else {
        let path = Path::new(&spec);
        if path.is_dir() {
            let found = find_in_dir(task, path, split)?;
            let examples = match &found {
                Found::File(f) => read_file(task, f, fields)?,
                Found::AclImdb(root) => imdb::read_folder(task, root, split.name)?,
            };
            (found.path().display().to_string(), examples)
        } else if path.is_file() {
            (spec.clone(), read_file(task, path, fields)?)
        } else {
            return Err(DataError::Spec {
                spec: spec.clone(),
                msg: "no such file or directory (a data spec is a path or `hub:org/name[/config]`)"
                    .into(),
            });
        }
    };
    if examples.is_empty() {
        return Err(DataError::Empty {
            source_name: source,
            task: task.title.into(),
            split: split.name.into(),
        });
    }
    Ok(Dataset {
        task,
        split: split.name.into(),
        source,
        examples,
    })
}

/// Reads one file, its format from its extension.
pub fn read_file(task: &Task, path: &Path, fields: &Fields) -> Result<Vec<Example>, DataError> {
    match Format::of(path) {
        Some(Format::Tsv) => glue::read_tsv(task, path, fields),
        Some(Format::Jsonl) => generic::read_jsonl(task, path, fields),
        Some(Format::Csv) => generic::read_csv(task, path, fields),
        Some(Format::Parquet) => hub::read_parquet(path, task, fields),
        None => Err(DataError::file(
            path,
            "unknown format: expected .tsv, .jsonl, .json, .csv or .parquet",
        )),
    }
}

enum Found {
    File(PathBuf),
    AclImdb(PathBuf),
}

impl Found {
    fn path(&self) -> &Path {
        match self {
            Found::File(p) | Found::AclImdb(p) => p,
        }
    }
}

/// Finds a split's file in a directory: the task's own file name (`dev.tsv`) or
/// `<split>.{tsv,jsonl,csv,parquet}`, in the directory itself or its `<Task>/` subfolder; for
/// IMDb also the `aclImdb/<split>/{pos,neg}` layout.
fn find_in_dir(task: &Task, dir: &Path, split: &Split) -> Result<Found, DataError> {
    let mut bases = vec![dir.to_path_buf()];
    for sub in [task.title, task.name] {
        let p = dir.join(sub);
        if p.is_dir() && !bases.contains(&p) {
            bases.push(p);
        }
    }
    let mut names = vec![split.file.to_string()];
    for ext in ["tsv", "jsonl", "csv", "parquet"] {
        for stem in [split.name, split.hub] {
            let n = format!("{stem}.{ext}");
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    let mut tried = Vec::new();
    for base in &bases {
        if task.name == "imdb" {
            for root in [base.clone(), base.join("aclImdb")] {
                if imdb::is_acl_imdb(&root, split.name) {
                    return Ok(Found::AclImdb(root));
                }
            }
        }
        for n in &names {
            let p = base.join(n);
            if p.is_file() {
                return Ok(Found::File(p));
            }
        }
        tried.push(base.join(split.file).display().to_string());
    }
    if !bases.iter().any(|b| b != dir) {
        tried.push(dir.join(task.title).join(split.file).display().to_string());
    }
    Err(DataError::Missing {
        task: task.title.into(),
        split: split.name.into(),
        tried: tried.join(", "),
        expected: format!(
            "{}{}",
            task.file_names(),
            if task.name == "imdb" {
                " (or an aclImdb/{train,test}/{pos,neg} folder)"
            } else {
                " (or <split>.jsonl/.csv/.parquet)"
            }
        ),
    })
}

/// `n` of `0..len` drawn uniformly without replacement, sorted; the draw depends only on `len`,
/// `n` and `salt`.
fn draw(len: usize, n: usize, salt: u64) -> Vec<usize> {
    use rand_chacha::ChaCha8Rng;
    use rand_core::{RngCore, SeedableRng};
    let mut rng = ChaCha8Rng::seed_from_u64(len as u64 ^ salt);
    let mut idx: Vec<usize> = (0..len).collect();
    // Partial Fisher–Yates: the first n slots become a uniform n-subset.
    for i in 0..n {
        let j = i + (rng.next_u64() % (len - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(n);
    idx.sort_unstable();
    idx
}
