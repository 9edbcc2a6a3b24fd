//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use mpcformer::io::{HostTensor, load_safetensors};

/// The fixtures copied into the repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `../shared` (or `$MPCFORMER_SHARED`). Missing: a failure under CI, a loud skip otherwise.
pub fn shared(what: &str) -> Option<PathBuf> {
    let p = std::env::var_os("MPCFORMER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let target = p.join(what);
    if target.exists() {
        return Some(target);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} not found: set MPCFORMER_SHARED to the shared folder",
            target.display()
        );
    }
    eprintln!(
        "\n*** SKIPPED: {} not found (set MPCFORMER_SHARED); this test did not run ***\n",
        target.display()
    );
    None
}

pub fn load(path: &std::path::Path) -> BTreeMap<String, HostTensor> {
    load_safetensors(path).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Max |a − b| after checking shapes.
pub fn max_abs_diff(name: &str, ours: &HostTensor, reference: &HostTensor) -> f64 {
    assert_eq!(
        ours.shape(),
        reference.shape(),
        "{name}: shape {:?} vs reference {:?}",
        ours.shape(),
        reference.shape()
    );
    ours.to_f64()
        .iter()
        .zip(reference.to_f64())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

pub fn assert_close(name: &str, ours: &HostTensor, reference: &HostTensor, tol: f64) {
    let d = max_abs_diff(name, ours, reference);
    assert!(d <= tol, "{name}: max abs diff {d:.3e} > {tol:.0e}");
}
