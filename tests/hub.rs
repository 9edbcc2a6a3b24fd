//! Hub ids resolve through the standard cache; `HF_HUB_OFFLINE` keeps us off the network.
//! One test function: it sets process-wide environment variables.

mod common;

use burn::prelude::*;
use common::fixtures;
use mpcformer::hub;
use mpcformer::model::{self, Overrides};

#[test]
fn hub_ids_resolve_from_the_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--acme--tiny-bert");
    let snap = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-bert/model").join(f), snap.join(f)).unwrap();
    }
    // SAFETY: this test binary has a single test, so no other thread reads the environment.
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
}
