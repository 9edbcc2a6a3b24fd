//! Hub ids resolve through the standard cache; `HF_HUB_OFFLINE` keeps us off the network.
//! One test function sets process-wide environment variables; the other reads none.

mod common;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use common::fixtures;
use mpcformer::hub;
use mpcformer::model::{self, Overrides};

/// The tiny BERT fixture as the Hub cache holds a model: `<hub>/<folder>/refs/main` naming
/// `commit`, and the files under `snapshots/<commit>/`, which is returned.
fn cached_model(hub: &Path, folder: &str, commit: &str) -> PathBuf {
    let repo = hub.join(folder);
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-bert/model").join(f), snap.join(f)).unwrap();
    }
    snap
}

#[test]
fn hub_ids_resolve_from_the_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let snap = cached_model(
        &home.path().join("hub"),
        "models--acme--tiny-bert",
        "0123456789abcdef",
    );
    // SAFETY: the other test of this binary reads no environment, so no other thread does.
    unsafe {
        std::env::set_var("HF_HOME", home.path());
        std::env::remove_var("HF_HUB_CACHE");
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    assert!(hub::offline());
    let dir = hub::model_dir("acme/tiny-bert").unwrap();
    assert_eq!(dir, snap);
    let pre =
        model::load_pretrained("acme/tiny-bert", &Overrides::default(), &Device::flex()).unwrap();
    assert_eq!(pre.model.config.num_labels, 3);

    let err = hub::model_dir("acme/not-cached").unwrap_err().to_string();
    assert!(
        err.contains("acme/not-cached") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );

    // HF_HUB_CACHE points straight at the hub folder, as in huggingface_hub.
    unsafe {
        std::env::set_var("HF_HOME", "/nonexistent");
        std::env::set_var("HF_HUB_CACHE", home.path().join("hub"));
    }
    assert_eq!(hub::model_dir("acme/tiny-bert").unwrap(), snap);

    let err = hub::model_dir("not a path or id").unwrap_err().to_string();
    assert!(err.contains("not a Hub id"), "{err}");

    // Canonical ids have no organisation (`bert-base-uncased`, `roberta-base`); the cache keeps
    // them as `models--bert-base-uncased`, as huggingface_hub and hf-hub lay it out.
    let snap = cached_model(
        &home.path().join("hub"),
        "models--bert-base-uncased",
        "fedcba98",
    );
    assert_eq!(hub::model_dir("bert-base-uncased").unwrap(), snap);
    assert_eq!(hub::model_dir("bert-base-uncased@main").unwrap(), snap);
    let pre = model::load_pretrained("bert-base-uncased", &Overrides::default(), &Device::flex())
        .unwrap();
    assert_eq!(pre.model.config.num_labels, 3);
    // Not cached: the error names the id and the offline switch, not the id's form.
    let err = hub::model_dir("roberta-base").unwrap_err().to_string();
    assert!(
        err.contains("roberta-base")
            && err.contains("HF_HUB_OFFLINE")
            && !err.contains("not a Hub id"),
        "{err}"
    );
}

/// The Hub's own rules for repository ids (`huggingface_hub.utils.validate_repo_id`).
#[test]
fn repo_ids_follow_the_hubs_rules() {
    for ok in [
        "bert-base-uncased",
        "roberta-base",
        "gpt2",
        "acme/tiny-bert",
        "sentence-transformers/all-MiniLM-L6-v2",
        "FacebookAI/roberta-base",
        "a_b.c",
        "_x_",
    ] {
        assert!(hub::is_repo_id(ok), "{ok} is a repo id");
    }
    let long = "a".repeat(97);
    for bad in [
        "",
        "a/b/c",
        "/abs",
        "org/",
        "/name",
        "-x",
        "x-",
        ".x",
        "x.",
        "a--b",
        "a..b",
        "name.git",
        "not a path or id",
        "tab\there",
        long.as_str(),
    ] {
        assert!(!hub::is_repo_id(bad), "{bad:?} is not a repo id");
    }
    assert!(hub::is_repo_id(&"a".repeat(96)));
}
