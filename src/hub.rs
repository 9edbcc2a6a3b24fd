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

/// A local directory for `spec`: the path itself if it is a directory, else the snapshot
/// directory of the Hub model `org/name` (optionally `org/name@revision`), downloaded as needed.
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
    if id.split('/').count() != 2 || id.starts_with('.') || id.starts_with('/') {
        return Err(LoadError::Hub {
            id: spec.into(),
            msg: "no such directory, and not a Hub id of the form `org/name`".into(),
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
                "not in the local Hugging Face cache and HF_HUB_OFFLINE is set".into()
            } else {
                "the repository has no config.json".into()
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
