//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use mpcformer::data::{Label, Tokenized};
use mpcformer::io::{HostTensor, load_safetensors};
use mpcformer::tokenize::Encoded;

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

/// `n` random token sequences in tiny-bert's vocabulary (120), lengths 5..12, drawn from `seed`,
/// labelled with classes 0, 1, 2 in turn.
pub fn synthetic(n: usize, seed: u64) -> Tokenized {
    let mut x: u64 = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as u32
    };
    let encoded = (0..n)
        .map(|_| {
            let len = 5 + (next() % 8) as usize;
            let mut ids = vec![1u32];
            ids.extend((0..len - 2).map(|_| 3 + next() % 110));
            ids.push(2);
            Encoded {
                type_ids: vec![0; ids.len()],
                ids,
                tokens: vec![],
            }
        })
        .collect();
    Tokenized {
        encoded,
        labels: (0..n).map(|i| Some(Label::Class(i % 3))).collect(),
        pad_id: 0,
        truncated: 0,
        pad_multiple: 1,
    }
}
