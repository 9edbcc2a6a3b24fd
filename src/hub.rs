//! Hugging Face Hub access through `hf-hub`'s standard cache (`$HF_HOME/hub`, or
//! `$HF_HUB_CACHE`), with `HF_HUB_OFFLINE` honoured as `transformers` does: offline, only the cache
//! is read and nothing is downloaded. (hf-hub 0.5 reads neither variable itself.)

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::LoadError;

pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The hub cache directory: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (as `huggingface_hub`).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => PathBuf::from(p),
        None => Cache::from_env().path().clone(),
    }
}

fn cache() -> Cache {
    Cache::new(cache_dir())
}

/// Fetches one file of a repo: from the cache when present (no network call), else from the Hub
/// unless offline. `Ok(None)` means the repo does not have it.
pub fn repo_file(repo: &Repo, file: &str) -> Result<Option<PathBuf>, String> {
    if let Some(p) = cache().repo(repo.clone()).get(file) {
        return Ok(Some(p));
    }
    if offline() {
        return Ok(None);
    }
    let builder = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .with_cache_dir(cache_dir());
    let api = builder.build().map_err(|e| e.to_string())?;
    match api.repo(repo.clone()).get(file) {
        Ok(p) => Ok(Some(p)),
        Err(hf_hub::api::sync::ApiError::RequestError(e)) if e.to_string().contains("404") => {
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Whether `id` is a Hub repository id as the Hub validates one (`huggingface_hub`'s
/// `validate_repo_id`): `name` or `org/name` — canonical models such as `bert-base-uncased` and
/// `roberta-base` have no organisation — each part made of ASCII letters, digits, `-`, `_` and
/// `.`, starting and ending with a letter, digit or `_`, without `--` or `..` (the cache's
/// separator), not ending in `.git`, 96 characters at most.
pub fn is_repo_id(id: &str) -> bool {
    let part_ok = |p: &str| {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        p.chars().all(|c| word(c) || c == '-' || c == '.')
            && p.starts_with(word)
            && p.ends_with(word)
    };
    let parts: Vec<&str> = id.split('/').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| part_ok(p))
        && !id.contains("--")
        && !id.contains("..")
        && !id.ends_with(".git")
        && id.len() <= 96
}

/// A local directory for `spec`: the path itself if it is a directory, else the snapshot
/// directory of the Hub model `name` or `org/name` (optionally `@revision`), downloaded as
/// needed. A path that does not exist and reads as a Hub id is looked up on the Hub.
pub fn model_dir(spec: &str) -> Result<PathBuf, LoadError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(LoadError::Hub {
            id: spec.into(),
            msg: "is a file; pass the model directory".into(),
        });
    }
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, rev.to_string()),
        None => (spec, "main".to_string()),
    };
    if !is_repo_id(id) {
        return Err(LoadError::Hub {
            id: spec.into(),
            msg: "no such directory, and not a Hub id (`name` or `org/name`, e.g. \
                  `bert-base-uncased`, `sentence-transformers/all-MiniLM-L6-v2`)"
                .into(),
        });
    }
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision);
    let hub_err = |msg: String| LoadError::Hub {
        id: spec.into(),
        msg,
    };
    let config = repo_file(&repo, "config.json")
        .map_err(hub_err)?
        .ok_or_else(|| {
            hub_err(if offline() {
                "no such directory, and not in the local Hugging Face cache (HF_HUB_OFFLINE is \
                 set: nothing is downloaded)"
                    .into()
            } else {
                "no such directory, and no config.json in that Hub repository".into()
            })
        })?;
    // Tokenizer files are optional: a repo has one of the formats.
    for f in crate::model::save::TOKENIZER_FILES {
        repo_file(&repo, f).map_err(hub_err)?;
    }
    if repo_file(&repo, "model.safetensors")
        .map_err(hub_err)?
        .is_none()
        && let Some(index) = repo_file(&repo, "model.safetensors.index.json").map_err(hub_err)?
    {
        for shard in crate::model::load::Checkpoint::shards(&index)? {
            repo_file(&repo, &shard)
                .map_err(hub_err)?
                .ok_or_else(|| hub_err(format!("shard {shard} is missing")))?;
        }
    }
    Ok(config
        .parent()
        .expect("a cached file lives in a snapshot directory")
        .to_path_buf())
}
