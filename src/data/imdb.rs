//! IMDb (Maas et al. 2011) in its original layout, `aclImdb/{train,test}/{neg,pos}/<n>_<rating>.txt`.
//! The JSONL form (`text`, `label`, optional `id`) is read by [`super::generic::read_jsonl`];
//! either way `<br />` becomes a space ([`super::Task::clean_text`]).

use std::path::{Path, PathBuf};

use super::{DataError, Example};
use crate::data::task::Task;

/// The class folders, in label order.
const CLASSES: [&str; 2] = ["neg", "pos"];

/// True when `root/<split>/{neg,pos}` are folders.
pub fn is_acl_imdb(root: &Path, split: &str) -> bool {
    CLASSES.iter().all(|c| root.join(split).join(c).is_dir())
}

/// Reads `root/<split>/{neg,pos}/*.txt`, ordered by label then file number (the order of the
/// shared JSONL files); ids are `<split>/<neg|pos>/<file name>`.
pub fn read_folder(task: &Task, root: &Path, split: &str) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for class in CLASSES {
        let dir = root.join(split).join(class);
        let label = task
            .parse_label(class)
            .map_err(|m| DataError::file(&dir, m))?;
        let mut files: Vec<(u64, String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| DataError::io(&dir, e))? {
            let entry = entry.map_err(|e| DataError::io(&dir, e))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "txt") {
                continue;
            }
            let name = entry.file_name().to_string_lossy().to_string();
            let number = name
                .split(['_', '.'])
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(u64::MAX);
            files.push((number, name, path));
        }
        files.sort();
        for (_, name, path) in files {
            let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
            out.push(Example {
                text_a: task.clean_text(text),
                text_b: None,
                label: Some(label),
                id: format!("{split}/{class}/{name}"),
            });
        }
    }
    Ok(out)
}
