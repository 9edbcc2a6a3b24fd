//! `load-check`: validates an export directory against its manifest and against this build —
//! the manifest's format and version, every listed file's sha256, `config.json` (its `mpc`
//! object, labels, architecture), `model.safetensors` (every tensor the config needs, with its
//! shape, in the manifest's dtype, nothing else), `pytorch_model.bin` (the same tensors), the
//! tokenizer, P1's public part and the manifest's own fields. Every problem found is listed,
//! each naming its file.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use serde_json::Value;

use super::format::{
    FORMAT, FORMAT_VERSION, MANIFEST, Manifest, OpRange, P1_DIR, PUBLIC_MANIFEST, PublicManifest,
    REQUIRED_FILES, RING_BITS, position_cap, read_json, sha256_file,
};
use super::torch_bin;
use crate::data::Task;
use crate::model::config::MPC_BLOCK_VERSION;
use crate::model::{Act, Attn, Checkpoint, LayerApprox, LoadOptions, ModelConfig};
use crate::tokenize::TextTokenizer;

/// What `load-check` found.
#[derive(Debug)]
pub struct CheckReport {
    /// One line per check that passed.
    pub passed: Vec<String>,
    /// Not failures: files the manifest does not list, thin fixed-point headroom.
    pub warnings: Vec<String>,
    pub manifest: Manifest,
}

/// What the checks found so far.
#[derive(Default)]
struct Findings {
    passed: Vec<String>,
    warnings: Vec<String>,
    problems: Vec<String>,
}

/// Validates an export directory (see the module docs). Every problem found is listed in the
/// error, each naming its file.
pub fn load_check(dir: &Path) -> Result<CheckReport> {
    let manifest = read_manifest(dir)?;
    let mut f = Findings::default();
    check_hashes(dir, &manifest, &mut f);
    check_p1_part(dir, &manifest, &mut f);
    let config = check_config(dir, &manifest, &mut f);
    if let Some(cfg) = &config {
        check_weights(dir, cfg, &manifest, &mut f);
    }
    // Absent with `--no-pytorch-bin`.
    if dir.join(torch_bin::FILE).is_file() {
        match check_torch_bin(dir) {
            Ok(n) => f.passed.push(format!(
                "{}: {n} tensors, names, dtypes, shapes and values as model.safetensors",
                torch_bin::FILE
            )),
            Err(e) => f.problems.push(format!("{e:#}")),
        }
    }
    check_tokenizer(dir, config.as_ref(), &manifest, &mut f);
    check_manifest_fields(dir, &manifest, &mut f);

    if !f.problems.is_empty() {
        let n = f.problems.len();
        let mut msg = format!(
            "{}: export check failed ({n} problem{}):",
            dir.display(),
            if n == 1 { "" } else { "s" }
        );
        for p in &f.problems {
            let _ = write!(msg, "\n  - {p}");
        }
        bail!(msg);
    }
    Ok(CheckReport {
        passed: f.passed,
        warnings: f.warnings,
        manifest,
    })
}

/// The manifest, refused outright when its format or version is not this build's.
fn read_manifest(dir: &Path) -> Result<Manifest> {
    let mpath = dir.join(MANIFEST);
    if !dir.is_dir() {
        bail!("{}: no such directory", dir.display());
    }
    let raw = read_json(&mpath).with_context(|| {
        format!(
            "{}: not an export (exports have {MANIFEST}; write one with `mpcformer export`)",
            dir.display()
        )
    })?;
    let format = raw["format"].as_str().unwrap_or_default();
    if format != FORMAT {
        bail!(
            "{}: `format` is {:?}, expected {FORMAT:?}",
            mpath.display(),
            raw["format"]
        );
    }
    let version = raw["format_version"].as_u64().unwrap_or(0);
    if version != FORMAT_VERSION as u64 {
        bail!(
            "{}: format_version {version} is not supported (this build reads version \
             {FORMAT_VERSION}){}",
            mpath.display(),
            if version > FORMAT_VERSION as u64 {
                "; update mpcformer"
            } else {
                ""
            }
        );
    }
    serde_json::from_value(raw).with_context(|| format!("{}: invalid manifest", mpath.display()))
}

/// Every file the manifest lists has its hash; files it does not list are warnings.
fn check_hashes(dir: &Path, manifest: &Manifest, f: &mut Findings) {
    let mpath = dir.join(MANIFEST);
    let d = |name: &str| dir.join(name).display().to_string();
    for req in REQUIRED_FILES {
        if !manifest.files.contains_key(*req) {
            f.problems
                .push(format!("{}: `files` does not list {req}", mpath.display()));
        }
    }
    let mut hashed = 0;
    for (name, entry) in &manifest.files {
        let bad_name =
            name.contains('/') || name.contains('\\') || name == ".." || name == MANIFEST;
        if bad_name {
            f.problems
                .push(format!("{}: `files` lists {name:?}", mpath.display()));
            continue;
        }
        match sha256_file(&dir.join(name)) {
            Err(_) => f
                .problems
                .push(format!("{}: missing (listed in {MANIFEST})", d(name))),
            Ok(got) if got.sha256 != entry.sha256 => f.problems.push(format!(
                "{}: sha256 {} does not match the manifest's {} ({} bytes, manifest {}): the \
                 file changed after export",
                d(name),
                got.sha256,
                entry.sha256,
                got.bytes,
                entry.bytes
            )),
            Ok(_) => hashed += 1,
        }
    }
    if hashed == manifest.files.len() {
        f.passed
            .push(format!("sha256 of {hashed} files match the manifest"));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n != MANIFEST && n != P1_DIR && !manifest.files.contains_key(&n) {
                f.warnings
                    .push(format!("{}: not listed in the manifest", d(&n)));
            }
        }
    }
}

/// P1's public part, when there is one, must describe the same circuit as the export.
fn check_p1_part(dir: &Path, m: &Manifest, f: &mut Findings) {
    let p1 = dir.join(P1_DIR);
    if !p1.is_dir() {
        return;
    }
    let public: Option<PublicManifest> = std::fs::read_to_string(p1.join(PUBLIC_MANIFEST))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let config = |d: &Path| std::fs::read(d.join("config.json")).ok();
    if public.as_ref() == Some(&PublicManifest::of(m)) && config(&p1) == config(dir) {
        f.passed
            .push(format!("{P1_DIR}/ (P1's public part) matches the export"));
    } else {
        f.problems.push(format!(
            "{}: P1's public part does not match the export (export again)",
            p1.display()
        ));
    }
}

/// `config.json` parses and agrees with itself (its `mpc` object), with this build's constants
/// and with the manifest (approximations, labels, maximum length, architecture). Returns it
/// when it parses.
fn check_config(dir: &Path, manifest: &Manifest, f: &mut Findings) -> Option<ModelConfig> {
    let cfg_path = dir.join("config.json");
    let mpath = dir.join(MANIFEST);
    let cfg = match ModelConfig::from_file(&cfg_path) {
        Ok(c) => c,
        Err(e) => {
            f.problems.push(e.to_string());
            return None;
        }
    };
    let before = f.problems.len();
    let raw = read_json(&cfg_path).unwrap_or(Value::Null);
    check_mpc_block(dir, &raw, &cfg, manifest, &mut f.problems);
    if cfg.labels != manifest.labels || cfg.is_regression() != manifest.regression {
        f.problems.push(format!(
            "{}: id2label {:?}{} differs from the manifest's labels {:?}",
            cfg_path.display(),
            cfg.labels,
            if cfg.is_regression() {
                " (regression)"
            } else {
                ""
            },
            manifest.labels
        ));
    }
    let cap = position_cap(&cfg);
    if manifest.max_length == 0 || manifest.max_length > cap {
        f.problems.push(format!(
            "{}: max_length {} does not fit the model's {} positions",
            mpath.display(),
            manifest.max_length,
            cap
        ));
    }
    let arch = raw["architectures"][0].as_str().unwrap_or_default();
    if arch != manifest.architecture {
        f.problems.push(format!(
            "{}: architectures[0] {arch:?} differs from the manifest's {:?}",
            cfg_path.display(),
            manifest.architecture
        ));
    }
    if f.problems.len() == before {
        f.passed.push(format!(
            "config.json: {} {} layers, hidden {}, {} ({}), labels {:?}",
            manifest.architecture,
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.approx.label(),
            if cfg.approx.layers.is_empty() {
                "same in every layer".to_string()
            } else {
                format!("{} layer overrides", cfg.approx.layers.len())
            },
            cfg.labels
        ));
    }
    Some(cfg)
}

/// `config.json`'s `mpc` object: present, of this build's version, consistent with
/// `hidden_act`/`softmax_act`, with a formula for every approximation the model uses, and with
/// the per-layer choices the manifest lists.
fn check_mpc_block(
    dir: &Path,
    raw: &Value,
    cfg: &ModelConfig,
    manifest: &Manifest,
    problems: &mut Vec<String>,
) {
    let file = dir.join("config.json");
    let file = file.display();
    let mpc = &raw["mpc"];
    if !mpc.is_object() {
        problems.push(format!("{file}: no `mpc` object"));
        return;
    }
    if mpc["version"].as_u64() != Some(MPC_BLOCK_VERSION as u64) {
        problems.push(format!(
            "{file}: mpc.version is {}, this build reads {MPC_BLOCK_VERSION}",
            mpc["version"]
        ));
    }
    for key in ["hidden_act", "softmax_act"] {
        if mpc[key] != raw[key] {
            problems.push(format!(
                "{file}: mpc.{key} {} differs from {key} {}",
                mpc[key], raw[key]
            ));
        }
    }
    let per_layer: Vec<LayerApprox> = (0..cfg.num_hidden_layers)
        .map(|i| cfg.approx.layer(i))
        .collect();
    let used_acts = |a: Act| per_layer.iter().any(|l| l.act == a);
    let used_attns = |a: Attn| per_layer.iter().any(|l| l.attn == a);
    for (used, key) in [
        (used_acts(Act::Quad), "quad"),
        (used_attns(Attn::TwoQuad), "2quad"),
        (used_attns(Attn::TwoRelu), "2relu"),
    ] {
        if used && !mpc[key].is_object() {
            problems.push(format!(
                "{file}: the model uses {key} but mpc.{key} (its formula and constants) is missing"
            ));
        }
    }
    if per_layer.iter().any(|l| *l != per_layer[0]) && !mpc["per_layer"].is_array() {
        problems.push(format!(
            "{file}: layers differ in their approximations but mpc.per_layer is missing"
        ));
    }
    let m = manifest.per_layer();
    if m != per_layer {
        problems.push(format!(
            "{}: approximations.per_layer {:?} differ from config.json's {:?}",
            dir.join(MANIFEST).display(),
            m,
            per_layer
        ));
    }
}

/// `model.safetensors` in the manifest's dtype, with every tensor `cfg` needs and nothing else.
fn check_weights(dir: &Path, cfg: &ModelConfig, manifest: &Manifest, f: &mut Findings) {
    let weights = dir.join("model.safetensors");
    let before = f.problems.len();
    match std::fs::read(&weights) {
        Err(e) => f.problems.push(format!("{}: {e}", weights.display())),
        Ok(bytes) => match safetensors::SafeTensors::deserialize(&bytes) {
            Err(e) => f.problems.push(format!(
                "{}: not a valid safetensors file ({e})",
                weights.display()
            )),
            Ok(st) => {
                let want = manifest.dtype.safetensors();
                let mut wrong: Vec<String> = st
                    .tensors()
                    .into_iter()
                    .filter(|(_, v)| v.dtype() != want)
                    .map(|(n, v)| format!("{n} ({:?})", v.dtype()))
                    .collect();
                wrong.sort();
                if !wrong.is_empty() {
                    f.problems.push(format!(
                        "{}: tensors not in the manifest's dtype {:?}: {}",
                        weights.display(),
                        want,
                        wrong.join(", ")
                    ));
                }
            }
        },
    }
    let ckpt = match Checkpoint::open_dir(dir) {
        Ok(c) => c,
        Err(e) => return f.problems.push(e.to_string()),
    };
    let model = cfg.clone().without_dropout().init(&Device::flex());
    let report = match model.load_checkpoint(&ckpt, LoadOptions::default()) {
        Ok((_, report)) => report,
        Err(e) => return f.problems.push(e.to_string()),
    };
    if !report.initialised.is_empty() {
        f.problems.push(format!(
            "{}: missing tensors {}",
            weights.display(),
            report.initialised.join(", ")
        ));
    }
    if !report.unexpected.is_empty() {
        f.problems.push(format!(
            "{}: tensors config.json has no place for: {}",
            weights.display(),
            report.unexpected.join(", ")
        ));
    }
    if f.problems.len() == before {
        f.passed.push(format!(
            "model.safetensors: {} tensors ({:?}), names and shapes as config.json says",
            report.loaded, manifest.dtype
        ));
    }
}

/// The tokenizer loads, fits the vocabulary and pads with the model's padding id.
fn check_tokenizer(
    dir: &Path,
    config: Option<&ModelConfig>,
    manifest: &Manifest,
    f: &mut Findings,
) {
    let tok = match TextTokenizer::from_dir(dir, manifest.max_length.max(1)) {
        Ok(t) => t,
        Err(e) => return f.problems.push(e.to_string()),
    };
    let Some(cfg) = config else {
        return;
    };
    let file = dir.join("tokenizer.json");
    if tok.vocab_size() > cfg.vocab_size {
        f.problems.push(format!(
            "{}: {} tokens, but config.json's vocab_size is {}",
            file.display(),
            tok.vocab_size(),
            cfg.vocab_size
        ));
    } else if tok.pad_id as usize != cfg.pad_token_id {
        f.problems.push(format!(
            "{}: padding token id {} differs from config.json's pad_token_id {}",
            file.display(),
            tok.pad_id,
            cfg.pad_token_id
        ));
    } else {
        f.passed.push(format!(
            "tokenizer: {} tokens, padding id {}, max length {}",
            tok.vocab_size(),
            tok.pad_id,
            manifest.max_length
        ));
    }
}

/// The manifest's own fields: the fixed-point ring, the task, the recipe's hash, the ranges.
fn check_manifest_fields(dir: &Path, manifest: &Manifest, f: &mut Findings) {
    let mpath = dir.join(MANIFEST);
    let fp = &manifest.fixed_point;
    if fp.ring_bits != RING_BITS || !(1..=31).contains(&fp.fractional_bits) {
        f.problems.push(format!(
            "{}: fixed_point ring_bits {} / fractional_bits {} (expected a {RING_BITS}-bit ring \
             and 1..=31 fractional bits)",
            mpath.display(),
            fp.ring_bits,
            fp.fractional_bits
        ));
    } else {
        f.passed.push(format!(
            "fixed point: Z_2^{} with {} fractional bits",
            fp.ring_bits, fp.fractional_bits
        ));
    }
    if let Some(task) = &manifest.task
        && Task::find(task).is_err()
    {
        f.problems
            .push(format!("{}: unknown task {task:?}", mpath.display()));
    }
    if let Some(recipe) = &manifest.recipe {
        let file = recipe["file"].as_str().unwrap_or_default();
        match manifest.files.get(file) {
            Some(e) if Some(e.sha256.as_str()) == recipe["sha256"].as_str() => {}
            _ => f.problems.push(format!(
                "{}: recipe.sha256 does not match the listed {file:?}",
                mpath.display()
            )),
        }
    }
    let Some(vr) = &manifest.value_ranges else {
        return f.warnings.push(format!(
            "{}: no value ranges (exported without dev data)",
            mpath.display()
        ));
    };
    match serde_json::from_value::<Vec<OpRange>>(vr["ops"].clone()) {
        Err(e) => f.problems.push(format!(
            "{}: value_ranges.ops is malformed ({e})",
            mpath.display()
        )),
        Ok(ops) => {
            for o in ops.iter().filter(|o| o.headroom_bits <= 0.0) {
                f.warnings.push(format!(
                    "{}: {} overflows the fixed-point ring on dev data (headroom {:.1} bits)",
                    mpath.display(),
                    o.op,
                    o.headroom_bits
                ));
            }
            f.passed.push(format!("value ranges: {} ops", ops.len()));
        }
    }
}

/// Reads `dir`'s `pytorch_model.bin` back and compares it with its `model.safetensors`: the same
/// tensor names, dtypes, shapes and bytes. Returns the number of tensors.
pub fn check_torch_bin(dir: &Path) -> Result<usize> {
    let bin_path = dir.join(torch_bin::FILE);
    let st_path = dir.join("model.safetensors");
    let bin =
        std::fs::read(&bin_path).with_context(|| format!("reading {}", bin_path.display()))?;
    let sd = torch_bin::read(&bin).with_context(|| {
        format!(
            "{}: not a PyTorch state dict of f32/f16 tensors",
            bin_path.display()
        )
    })?;
    let st_bytes =
        std::fs::read(&st_path).with_context(|| format!("reading {}", st_path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&st_bytes)
        .with_context(|| format!("{}: not a valid safetensors file", st_path.display()))?;
    let mut diffs = Vec::new();
    let mut seen = BTreeSet::new();
    for t in &sd.tensors {
        if !seen.insert(t.name.as_str()) {
            diffs.push(format!("{} twice", t.name));
            continue;
        }
        let Ok(v) = st.tensor(&t.name) else {
            diffs.push(format!("{} is not in model.safetensors", t.name));
            continue;
        };
        if v.dtype() != t.storage.safetensors() || v.shape() != t.shape.as_slice() {
            diffs.push(format!(
                "{}: {} {:?}, model.safetensors {:?} {:?}",
                t.name,
                t.storage.class(),
                t.shape,
                v.dtype(),
                v.shape()
            ));
        } else if v.data() != t.data {
            diffs.push(format!("{}: different values", t.name));
        }
    }
    let mut missing: Vec<&str> = st
        .names()
        .into_iter()
        .filter(|n| !seen.contains(n))
        .collect();
    missing.sort();
    if !missing.is_empty() {
        diffs.push(format!("missing {}", missing.join(", ")));
    }
    if !diffs.is_empty() {
        bail!(
            "{}: differs from model.safetensors: {}",
            bin_path.display(),
            diffs.join("; ")
        );
    }
    Ok(sd.tensors.len())
}
