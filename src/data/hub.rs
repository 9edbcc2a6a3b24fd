//! Hugging Face hub datasets (`hub:nyu-mll/glue/rte`, `hub:stanfordnlp/imdb`) as parquet files,
//! through `hf-hub` and the standard HF cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`). Files already cached are used without a network call;
//! `HF_HUB_OFFLINE=1` forbids the network altogether. Parquet files are read with the
//! `parquet` crate's record API.

use std::fs::File;
use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use super::generic::all_or_none_labelled;
use super::{DataError, Example, Fields};
use crate::data::task::{Label, Task};

/// `org/name[/config][@revision]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub config: Option<String>,
    pub revision: String,
}

pub use crate::hub::cache_dir;

impl HubSpec {
    /// Parses `org/name[/config][@revision]` (a leading `hub:` is allowed).
    pub fn parse(spec: &str) -> Result<Self, DataError> {
        let s = spec.strip_prefix("hub:").unwrap_or(spec);
        let err = |msg: &str| DataError::Spec {
            spec: format!("hub:{s}"),
            msg: msg.into(),
        };
        let (path, revision) = match s.rsplit_once('@') {
            Some((p, r)) if !r.is_empty() => (p, r.to_string()),
            Some(_) => return Err(err("empty revision after `@`")),
            None => (s, "main".to_string()),
        };
        let parts: Vec<&str> = path.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(err(
                "expected hub:org/name or hub:org/name/config (e.g. hub:nyu-mll/glue/rte)",
            ));
        }
        Ok(HubSpec {
            repo: format!("{}/{}", parts[0], parts[1]),
            config: parts.get(2).map(|c| c.to_string()),
            revision,
        })
    }

    fn display(&self) -> String {
        let mut s = format!("hub:{}", self.repo);
        if let Some(c) = &self.config {
            s = format!("{s}/{c}");
        }
        if self.revision != "main" {
            s = format!("{s}@{}", self.revision);
        }
        s
    }

    fn err(&self, msg: impl Into<String>) -> DataError {
        DataError::Hub {
            spec: self.display(),
            msg: msg.into(),
        }
    }

    /// The local parquet files of a split (`validation`, `test_matched`, ...): from the cache,
    /// downloaded when missing unless `HF_HUB_OFFLINE` is set.
    pub fn split_files(&self, split: &str) -> Result<Vec<PathBuf>, DataError> {
        self.split_files_in(split, &cache_dir(), crate::hub::offline())
    }

    /// As [`Self::split_files`] with an explicit cache directory and offline switch.
    pub fn split_files_in(
        &self,
        split: &str,
        cache: &Path,
        offline: bool,
    ) -> Result<Vec<PathBuf>, DataError> {
        let repo = Repo::with_revision(self.repo.clone(), RepoType::Dataset, self.revision.clone());
        let repo_dir = cache.join(repo.folder_name());
        if let Some(snapshot) = snapshot_dir(&repo_dir, &self.revision) {
            let mut files = Vec::new();
            list_files(&snapshot, "", &mut files);
            if let Ok(found) = matching_files(&files, self.config.as_deref(), split)
                && complete(&found)
            {
                return Ok(found.iter().map(|f| snapshot.join(f)).collect());
            }
        }
        if offline {
            return Err(self.err(format!(
                "split `{split}` is not in the local Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                cache.display()
            )));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_cache_dir(cache.to_path_buf())
            .with_progress(true)
            .build()
            .map_err(|e| self.err(e.to_string()))?;
        let api_repo = api.repo(repo);
        let info = api_repo
            .info()
            .map_err(|e| self.err(format!("listing the repository: {e}")))?;
        let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let found =
            matching_files(&files, self.config.as_deref(), split).map_err(|m| self.err(m))?;
        found
            .iter()
            .map(|f| {
                api_repo
                    .get(f)
                    .map_err(|e| self.err(format!("downloading {f}: {e}")))
            })
            .collect()
    }
}

/// The snapshot folder a revision points to in a cached repo.
fn snapshot_dir(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    let direct = repo_dir.join("snapshots").join(revision);
    if direct.is_dir() {
        return Some(direct);
    }
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
    let dir = repo_dir.join("snapshots").join(commit.trim());
    dir.is_dir().then_some(dir)
}

fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let path = e.path();
        if path.is_dir() {
            list_files(&path, &rel, out);
        } else if path.is_file() {
            out.push(rel);
        }
    }
}

/// Shards named `*-NNNNN-of-MMMMM.parquet` are all there.
fn complete(files: &[String]) -> bool {
    let total = files.iter().find_map(|f| {
        let (_, rest) = f.rsplit_once("-of-")?;
        rest.trim_end_matches(".parquet").parse::<usize>().ok()
    });
    total.is_none_or(|t| files.len() >= t)
}

/// The parquet files of `split` among a repository's files, in order. The layouts of the Hub:
/// `<config>/<split>-00000-of-00001.parquet`, `<config>/<split>/0000.parquet` (the parquet
/// conversion branch), `data/<split>-*.parquet`. Without a config, files of several configs
/// are an error naming them.
pub fn matching_files(
    files: &[String],
    config: Option<&str>,
    split: &str,
) -> Result<Vec<String>, String> {
    let mut found: Vec<String> = files
        .iter()
        .filter(|f| {
            if !f.ends_with(".parquet") {
                return false;
            }
            let parts: Vec<&str> = f.split('/').collect();
            let rest = match config {
                Some(c) if parts.len() >= 2 && parts[0] == c => &parts[1..],
                Some(_) => return false,
                None => &parts[..],
            };
            let name = rest[rest.len() - 1];
            let parent = (rest.len() >= 2).then(|| rest[rest.len() - 2]);
            name.starts_with(&format!("{split}-"))
                || name == format!("{split}.parquet")
                || parent == Some(split)
        })
        .cloned()
        .collect();
    found.sort();
    if config.is_none() {
        let mut tops: Vec<&str> = found
            .iter()
            .filter_map(|f| f.split_once('/').map(|(t, _)| t))
            .collect();
        tops.dedup();
        if tops.len() > 1 {
            return Err(format!(
                "split `{split}` exists in several configs ({}); name one, e.g. hub:org/name/{}",
                tops.join(", "),
                tops[0]
            ));
        }
    }
    if found.is_empty() {
        let parquet: Vec<&str> = files
            .iter()
            .filter(|f| f.ends_with(".parquet"))
            .map(String::as_str)
            .take(12)
            .collect();
        return Err(format!(
            "no parquet file for split `{split}`{}; parquet files there: {}",
            config
                .map(|c| format!(" of config `{c}`"))
                .unwrap_or_default(),
            if parquet.is_empty() {
                "none".to_string()
            } else {
                parquet.join(", ")
            }
        ));
    }
    Ok(found)
}

/// Reads a Hugging Face datasets parquet file of `task`: the text columns, `label` (integer ids
/// in the Hub's order, -1 = unlabelled; STS-B a float score) and `idx`.
pub fn read_parquet(path: &Path, task: &Task, fields: &Fields) -> Result<Vec<Example>, DataError> {
    let cols = fields
        .resolve(&task.hub)
        .map_err(|m| DataError::file(path, m))?;
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| DataError::file(path, format!("not a readable parquet file: {e}")))?;
    let names: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    for c in &cols.text {
        if !names.contains(c) {
            return Err(DataError::file(
                path,
                format!("no column `{c}` (columns: {})", names.join(", ")),
            ));
        }
    }
    let rows_iter = reader
        .get_row_iter(None)
        .map_err(|e| DataError::file(path, e.to_string()))?;
    let mut rows = Vec::new();
    for (i, row) in rows_iter.enumerate() {
        let n = i + 1;
        let row = row.map_err(|e| DataError::row(path, n, e.to_string()))?;
        let get = |name: &str| {
            row.get_column_iter()
                .find(|(k, _)| k.as_str() == name)
                .map(|(_, v)| v)
        };
        let text = |name: &str| -> Result<String, DataError> {
            match get(name) {
                Some(Field::Str(s)) => Ok(task.clean_text(s.clone())),
                other => Err(DataError::row(
                    path,
                    n,
                    format!("row {n}: column `{name}` is {other:?}, expected a string"),
                )),
            }
        };
        let text_a = text(&cols.text[0])?;
        let text_b = match cols.text.get(1) {
            Some(c) => Some(text(c)?),
            None => None,
        };
        let label = match get(&cols.label) {
            None | Some(Field::Null) => None,
            Some(f) => field_label(task, f).map_err(|m| DataError::row(path, n, m))?,
        };
        let id = cols
            .index
            .iter()
            .find_map(|c| match get(c) {
                Some(Field::Int(v)) => Some(v.to_string()),
                Some(Field::Long(v)) => Some(v.to_string()),
                Some(Field::Str(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_else(|| i.to_string());
        rows.push((
            n,
            Example {
                text_a,
                text_b,
                label,
                id,
            },
        ));
    }
    all_or_none_labelled(task, path, &cols, rows)
}

fn field_label(task: &Task, f: &Field) -> Result<Option<Label>, String> {
    let int = match f {
        Field::Byte(v) => Some(*v as i64),
        Field::Short(v) => Some(*v as i64),
        Field::Int(v) => Some(*v as i64),
        Field::Long(v) => Some(*v),
        Field::UByte(v) => Some(*v as i64),
        Field::UShort(v) => Some(*v as i64),
        Field::UInt(v) => Some(*v as i64),
        _ => None,
    };
    if let Some(id) = int {
        return task.label_from_hub_id(id);
    }
    let float = match f {
        Field::Float(v) => Some(*v as f64),
        Field::Double(v) => Some(*v),
        _ => None,
    };
    match (float, f) {
        // The Hub marks unlabelled (test) rows with -1.
        (Some(-1.0), _) => Ok(None),
        (Some(v), _) if task.is_regression() => Ok(Some(Label::Score(v))),
        (Some(v), _) => Err(format!("label {v} is not an integer id")),
        (None, Field::Str(s)) => task.label_from_text(s).map(Some),
        (None, other) => Err(format!("label {other:?} is neither a number nor a string")),
    }
}
