//! Writing an export: resolve the source ([`super::source`]), stage every file in a temporary
//! sibling of `--out`, load the staged files back as `mpcformer eval --model <export>` loads
//! them and check them against the source, run the dev pass (value ranges and metrics) on that
//! copy, write the manifest with every file's hash and P1's public part, and rename the
//! directory into place.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use serde_json::{Value, json};

use super::check::check_torch_bin;
use super::format::{
    Dtype, FORMAT, FORMAT_VERSION, FixedPoint, MANIFEST, Manifest, P1_DIR, PUBLIC_MANIFEST,
    PublicManifest, RING_BITS, VOCAB_FILES, read_json, sha256_file,
};
use super::ranges::{self, RangeStats};
use super::source::{self, DevData, Resolved};
use super::torch_bin;
use crate::data::{Order, Tokenized};
use crate::eval::{self, Outputs};
use crate::io::write_atomic;
use crate::metric;
use crate::model::{
    Arch, Inputs, LayerApprox, ModelConfig, Overrides, SequenceClassifier, load_pretrained,
};
use crate::tokenize::TextTokenizer;

/// What to export.
#[derive(Clone, Debug)]
pub enum Source {
    /// A run directory of `mpcformer run`: its `student/`, with the run's task, recipe, teacher
    /// and metrics.
    Run(PathBuf),
    /// A model directory or Hub id.
    Model(String),
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub source: Source,
    pub out: PathBuf,
    /// Approximation flags (`--act`, `--attn`, `--layer`); only with [`Source::Model`].
    pub overrides: Overrides,
    pub dtype: Dtype,
    /// Also write `pytorch_model.bin` (the same tensors), for loaders that read only that.
    pub pytorch_bin: bool,
    /// Fractional bits of the fixed-point encoding a runtime should use (CrypTen: 16).
    pub fractional_bits: u32,
    /// Task (labels, maximum length, data); a run's own task when `None`.
    pub task: Option<String>,
    /// Data spec for the dev pass (value ranges, dev metrics); a run's recipe data when `None`;
    /// for a bare model with a task, the task's Hub dataset.
    pub data: Option<String>,
    /// Split of the dev pass (default: a run's eval split, else `dev`; MNLI: `dev_matched`).
    pub split: Option<String>,
    /// Use at most this many examples for the dev pass.
    pub range_limit: Option<usize>,
    /// Skip the dev pass: no value ranges, no recomputed metrics.
    pub no_data: bool,
    /// Tokenizer directory when the model directory has none.
    pub tokenizer: Option<String>,
    /// The teacher a bare model came from (recorded only).
    pub teacher: Option<String>,
    /// Maximum length (default: the recipe's or task's, capped by the model's positions).
    pub max_len: Option<usize>,
    pub batch_size: usize,
    pub device: Device,
}

impl ExportOptions {
    pub fn new(source: Source, out: impl Into<PathBuf>) -> Self {
        Self {
            source,
            out: out.into(),
            overrides: Overrides::default(),
            dtype: Dtype::F32,
            pytorch_bin: true,
            fractional_bits: 16,
            task: None,
            data: None,
            split: None,
            range_limit: None,
            no_data: false,
            tokenizer: None,
            teacher: None,
            max_len: None,
            batch_size: 64,
            device: Device::flex(),
        }
    }
}

#[derive(Debug)]
pub struct ExportReport {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Worth telling the user (dropped tensors, missing data, metric drift).
    pub notes: Vec<String>,
}

/// Writes the export described by `opts`; see the module docs.
pub fn export(opts: &ExportOptions) -> Result<ExportReport> {
    if opts.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    check_out(&opts.out)?;
    if !(1..=31).contains(&opts.fractional_bits) {
        bail!(
            "--fixed-point-bits {} is out of range: 1..=31 fractional bits of a {RING_BITS}-bit ring",
            opts.fractional_bits
        );
    }
    let mut notes = Vec::new();
    let src = source::resolve(opts, &mut notes)?;
    let tmp = staging_dir(&opts.out)?;
    let stage = tmp.path();
    stage_files(opts, &src, stage)?;
    let (exported, probe_diff) = load_back(opts, &src, stage)?;
    if opts.dtype == Dtype::F16 {
        notes.push(format!(
            "f16 weights: logits differ from the f32 source by up to {probe_diff:.2e} on a probe batch"
        ));
    }
    let dev = if opts.no_data {
        None
    } else {
        let d = source::dev_data(opts, src.run.as_ref(), src.task)?;
        if d.is_none() {
            notes.push("no task: value ranges not estimated (give --task and --data)".into());
        }
        d
    };
    let (value_ranges, dev_metrics) = match &dev {
        Some(d) => {
            let (ranges, metrics) = dev_pass(opts, &src, d, &exported, stage, &mut notes)?;
            (Some(ranges), Some(metrics))
        }
        None => (None, None),
    };
    let dev_metrics = with_training_metrics(opts, &src, dev_metrics, &mut notes);
    let manifest = manifest(opts, &src, stage, value_ranges, dev_metrics, &mut notes)?;
    write_atomic(
        &stage.join(MANIFEST),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    write_p1_part(stage, &manifest)?;
    place(tmp, &opts.out)?;
    Ok(ExportReport {
        dir: opts.out.clone(),
        manifest,
        notes,
    })
}

/// A temporary directory beside `out` (so the final rename stays on one file system).
fn staging_dir(out: &Path) -> Result<tempfile::TempDir> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    tempfile::Builder::new()
        .prefix(".exporting-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))
}

/// `config.json`, the weights, the tokenizer and a run's `recipe.toml` into `stage`.
fn stage_files(opts: &ExportOptions, src: &Resolved, stage: &Path) -> Result<()> {
    write_atomic(
        &stage.join("config.json"),
        serde_json::to_string_pretty(&src.config.to_hf_json())?.as_bytes(),
    )?;
    write_weights(&src.model, opts.dtype, stage, opts.pytorch_bin)?;
    write_tokenizer(&src.tokenizer_dir, &src.config, src.max_len, stage)?;
    if let Some(r) = &src.run {
        write_atomic(&stage.join("recipe.toml"), r.recipe_text.as_bytes())?;
    }
    Ok(())
}

/// Loads the staged files back as `eval --model` does and checks them against the source: a
/// clean load, `pytorch_model.bin` equal to `model.safetensors`, the same per-layer
/// approximations, and (f32) bit-identical logits on a probe batch. Returns the loaded model and
/// the largest logit difference.
fn load_back(
    opts: &ExportOptions,
    src: &Resolved,
    stage: &Path,
) -> Result<(SequenceClassifier, f64)> {
    let exported = load_pretrained(
        &stage.to_string_lossy(),
        &Overrides {
            no_dropout: true,
            ..Overrides::default()
        },
        &opts.device,
    )
    .context("loading the staged export back")?;
    if !exported.report.initialised.is_empty() || !exported.report.unexpected.is_empty() {
        bail!(
            "internal error: the staged export does not load cleanly: {}",
            exported.report
        );
    }
    let exported = exported.model;
    if opts.pytorch_bin {
        check_torch_bin(stage).context("internal error: the staged pytorch_model.bin")?;
    }
    let resolved = |c: &ModelConfig| (per_layer(c), c.approx.c);
    if resolved(&exported.config) != resolved(&src.model.config) {
        bail!(
            "internal error: the staged config.json reads back as {:?}, not {:?}",
            resolved(&exported.config),
            resolved(&src.model.config)
        );
    }
    let probe = probe_batch(&src.config, src.max_len, &opts.device);
    let a = logits_vec(src.model.logits(&probe));
    let b = logits_vec(exported.logits(&probe));
    let probe_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let identical = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
    if opts.dtype == Dtype::F32 && !identical {
        bail!(
            "internal error: the staged export's logits differ from the source's by {probe_diff:e}"
        );
    }
    Ok((exported, probe_diff))
}

fn per_layer(c: &ModelConfig) -> Vec<LayerApprox> {
    (0..c.num_hidden_layers)
        .map(|i| c.approx.layer(i))
        .collect()
}

/// The dev pass on the staged copy: the manifest's `value_ranges` and `dev_metrics`.
fn dev_pass(
    opts: &ExportOptions,
    src: &Resolved,
    d: &DevData,
    exported: &SequenceClassifier,
    stage: &Path,
    notes: &mut Vec<String>,
) -> Result<(Value, Value)> {
    let tokenizer = TextTokenizer::from_dir(stage, src.max_len)?;
    let tokenized = Tokenized::new(&d.set, &tokenizer).map_err(anyhow::Error::msg)?;
    let k = exported.config.num_labels;
    let mut logits = vec![0f32; tokenized.len() * k];
    let mut stats = RangeStats::default();
    for idx in tokenized.plan(opts.batch_size, Order::ByLength, false) {
        let batch = tokenized.batch(&idx);
        let out = logits_vec(stats.capture(exported, &batch.inputs.to_inputs(&opts.device)));
        for (r, &i) in idx.iter().enumerate() {
            logits[i * k..(i + 1) * k].copy_from_slice(&out[r * k..(r + 1) * k]);
        }
    }
    if stats.recompute_error > 1e-3 {
        notes.push(format!(
            "value ranges: layer outputs recomputed for range capture differ from the model's by \
             {:.2e}",
            stats.recompute_error
        ));
    }
    let data = json!({
        "task": d.task.name,
        "split": d.split,
        "source": d.set.source,
        "examples": d.set.len(),
        "batch_size": opts.batch_size,
        "padding": "each batch padded to its longest example (batches sorted by length)",
        "max_length": src.max_len,
    });
    let (mut value_ranges, min_headroom) =
        ranges::manifest_entry(&stats, opts.fractional_bits, data);
    if min_headroom <= 0.0 {
        notes.push(format!(
            "value ranges: an op overflows {RING_BITS}-bit fixed point with {} fractional bits on \
             dev data (headroom {min_headroom:.1} bits)",
            opts.fractional_bits
        ));
    }
    let ops: Vec<crate::export::format::OpRange> =
        serde_json::from_value(value_ranges["ops"].clone())?;
    if let Err(e) =
        crate::mpc::model::MpcConfig::new(exported.config.clone(), opts.fractional_bits, Some(&ops))
    {
        notes.push(format!(
            "under MPC: `mpcformer mpc` cannot plan this export: {e}"
        ));
        value_ranges["summary"]["fits"] = false.into();
        value_ranges["summary"]["mpc_plan_error"] = e.to_string().into();
    }
    let mut metrics = json!({
        "split": d.split,
        "source": d.set.source,
        "examples": d.set.len(),
        "computed": "at export, on the exported files",
    });
    if let Some(gold) = d.set.labels() {
        let outputs = Outputs {
            logits,
            num_outputs: k,
            seconds: 0.0,
        };
        let map = eval::label_map(&exported.config.labels, d.task);
        let pred = eval::predictions(&outputs, d.task, &map);
        let scores = metric::score(d.task, &gold, &pred).map_err(anyhow::Error::msg)?;
        metrics["primary"] = d.task.primary.name().into();
        metrics["metrics"] = json!(scores.to_map());
    } else {
        metrics["metrics"] = Value::Null;
        metrics["note"] = "the split is unlabelled".into();
    }
    Ok((value_ranges, metrics))
}

/// A run's metrics at training (`summary.json`) beside those recomputed at export, or alone when
/// there was no dev pass; a difference is noted unless the dev data was changed on purpose.
fn with_training_metrics(
    opts: &ExportOptions,
    src: &Resolved,
    dev_metrics: Option<Value>,
    notes: &mut Vec<String>,
) -> Option<Value> {
    let Some(r) = &src.run else {
        return dev_metrics;
    };
    let at_training = r.summary["student"]["metrics"].clone();
    let Some(mut m) = dev_metrics else {
        return Some(json!({
            "split": source::eval_split(r),
            "computed": "at training (summary.json); not recomputed at export",
            "metrics": at_training,
        }));
    };
    if m["metrics"].is_object()
        && at_training.is_object()
        && opts.range_limit.is_none()
        && opts.data.is_none()
        && metrics_differ(&m["metrics"], &at_training)
    {
        notes.push(format!(
            "dev metrics at export {} differ from the run's summary.json {}",
            m["metrics"], at_training
        ));
    }
    m["at_training"] = at_training;
    Some(m)
}

fn metrics_differ(a: &Value, b: &Value) -> bool {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return false;
    };
    a.iter().any(
        |(k, v)| match (v.as_f64(), b.get(k).and_then(Value::as_f64)) {
            (Some(x), Some(y)) => (x - y).abs() > 1e-9,
            _ => false,
        },
    )
}

/// The manifest, with the hash of every staged file.
fn manifest(
    opts: &ExportOptions,
    src: &Resolved,
    stage: &Path,
    value_ranges: Option<Value>,
    dev_metrics: Option<Value>,
    notes: &mut Vec<String>,
) -> Result<Manifest> {
    let cfg = &src.config;
    let source = match &opts.source {
        Source::Run(dir) => json!({
            "kind": "run",
            "path": dir.display().to_string(),
            "run": src.run.as_ref().and_then(|r| r.summary["name"].as_str().map(str::to_string)),
            "model": "student/",
        }),
        Source::Model(m) => json!({"kind": "model", "path": m}),
    };
    let mut names: Vec<String> = std::fs::read_dir(stage)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let mut files = BTreeMap::new();
    for n in names {
        files.insert(n.clone(), sha256_file(&stage.join(&n))?);
    }
    Ok(Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        created_by: format!("mpcformer {}", env!("CARGO_PKG_VERSION")),
        source,
        task: src.task.map(|t| t.name.to_string()),
        labels: src.labels.clone(),
        regression: src.regression,
        max_length: src.max_len,
        architecture: match cfg.arch {
            Arch::Bert => "BertForSequenceClassification".into(),
            Arch::Roberta => "RobertaForSequenceClassification".into(),
        },
        approximations: json!({
            "label": cfg.approx.label(),
            "hidden_act": cfg.approx.act.hf_name(),
            "softmax_act": cfg.approx.attn.hf_name(),
            "per_layer": per_layer(cfg).iter().map(|l| json!({
                "hidden_act": l.act.hf_name(), "softmax_act": l.attn.hf_name()
            })).collect::<Vec<_>>(),
            "formulas": "config.json → mpc",
        }),
        dtype: opts.dtype,
        teacher: source::teacher_info(opts, src.run.as_ref())?,
        recipe: source::recipe_entry(src.run.as_ref(), stage, notes)?,
        dev_metrics,
        fixed_point: FixedPoint::new(opts.fractional_bits),
        value_ranges,
        files,
    })
}

/// The staged directory into place, readable by others (temporary files are created owner-only).
fn place(tmp: tempfile::TempDir, out: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let stage = tmp.path();
        let entries = std::fs::read_dir(stage)?.chain(std::fs::read_dir(stage.join(P1_DIR))?);
        for e in entries.flatten() {
            let mode = if e.path().is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting permissions of {}", e.path().display()))?;
        }
        std::fs::set_permissions(stage, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting permissions of {}", stage.display()))?;
    }
    let staged = tmp.keep();
    if let Err(e) = replace_dir(&staged, out) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(e);
    }
    Ok(())
}

/// A tensor ready to serialise.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// `model.safetensors` and, with `pytorch_bin`, `pytorch_model.bin` (the same tensors in the same
/// order and dtype) in `dir`.
fn write_weights(
    model: &SequenceClassifier,
    dtype: Dtype,
    dir: &Path,
    pytorch_bin: bool,
) -> Result<()> {
    let tensors: BTreeMap<String, RawTensor> = model
        .hf_tensors()
        .into_iter()
        .map(|t| {
            let bytes = match dtype {
                Dtype::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F16 => t
                    .data
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
            };
            (
                t.name,
                RawTensor {
                    dtype: dtype.safetensors(),
                    shape: t.shape,
                    bytes,
                },
            )
        })
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let path = dir.join("model.safetensors");
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .with_context(|| format!("serialising {}", path.display()))?;
    write_atomic(&path, &bytes)?;
    if pytorch_bin {
        let storage = match dtype {
            Dtype::F32 => torch_bin::Storage::Float,
            Dtype::F16 => torch_bin::Storage::Half,
        };
        let state: Vec<torch_bin::Tensor> = tensors
            .iter()
            .map(|(name, t)| torch_bin::Tensor {
                name: name.clone(),
                storage,
                shape: t.shape.clone(),
                data: &t.bytes,
            })
            .collect();
        let path = dir.join(torch_bin::FILE);
        let bytes =
            torch_bin::write(&state).with_context(|| format!("serialising {}", path.display()))?;
        write_atomic(&path, &bytes)?;
    }
    Ok(())
}

/// `tokenizer.json` (copied, or written from the vocabulary files as this project reads them),
/// the vocabulary files, and `tokenizer_config.json` with the export's maximum length.
fn write_tokenizer(src: &Path, config: &ModelConfig, max_len: usize, dest: &Path) -> Result<()> {
    let tok = TextTokenizer::from_dir(src, max_len).with_context(|| {
        format!(
            "{}: the export needs the model's tokenizer; pass --tokenizer DIR when the model \
             directory has none",
            src.display()
        )
    })?;
    if tok.vocab_size() > config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model only {} embeddings (vocab_size): \
             wrong tokenizer?",
            src.display(),
            tok.vocab_size(),
            config.vocab_size
        );
    }
    let json = src.join("tokenizer.json");
    if json.is_file() {
        std::fs::copy(&json, dest.join("tokenizer.json"))
            .with_context(|| format!("copying {}", json.display()))?;
    } else {
        let mut inner = tok.inner().clone();
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let text = inner
            .to_string(true)
            .map_err(|e| anyhow::anyhow!("serialising the tokenizer of {}: {e}", src.display()))?;
        write_atomic(&dest.join("tokenizer.json"), text.as_bytes())?;
    }
    for f in VOCAB_FILES {
        let from = src.join(f);
        if from.is_file() {
            std::fs::copy(&from, dest.join(f))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    let tc_path = src.join("tokenizer_config.json");
    let mut tc = if tc_path.is_file() {
        read_json(&tc_path)?
    } else {
        json!({})
    };
    let obj = tc
        .as_object_mut()
        .with_context(|| format!("{}: not a JSON object", tc_path.display()))?;
    let (class, specials) = match config.arch {
        Arch::Bert => (
            "BertTokenizer",
            [
                ("cls_token", "[CLS]"),
                ("sep_token", "[SEP]"),
                ("pad_token", "[PAD]"),
                ("unk_token", "[UNK]"),
                ("mask_token", "[MASK]"),
            ],
        ),
        Arch::Roberta => (
            "RobertaTokenizer",
            [
                ("cls_token", "<s>"),
                ("sep_token", "</s>"),
                ("pad_token", "<pad>"),
                ("unk_token", "<unk>"),
                ("mask_token", "<mask>"),
            ],
        ),
    };
    obj.entry("tokenizer_class").or_insert_with(|| class.into());
    for (k, v) in specials {
        obj.entry(k).or_insert_with(|| v.into());
    }
    if config.arch == Arch::Bert {
        // What this project's reader assumes when the key is absent; HF's default too.
        obj.entry("do_lower_case").or_insert(Value::Bool(true));
    }
    obj.insert("model_max_length".into(), max_len.into());
    write_atomic(
        &dest.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?.as_bytes(),
    )
}

/// A small deterministic batch (one full row, one padded) for the export's self-check.
fn probe_batch(config: &ModelConfig, max_len: usize, device: &Device) -> Inputs {
    let s = max_len.clamp(1, 12);
    let pad = config.pad_token_id as i64;
    let vocab = config.vocab_size as i64;
    let mut ids = Vec::with_capacity(2 * s);
    let mut mask = Vec::with_capacity(2 * s);
    for row in 0..2 {
        let len = if row == 0 { s } else { s.div_ceil(2) };
        for j in 0..s {
            if j < len {
                let mut id = (7 * j as i64 + 3 * row as i64 + 1) % vocab;
                if id == pad {
                    id = (id + 1) % vocab;
                }
                ids.push(id);
                mask.push(1i64);
            } else {
                ids.push(pad);
                mask.push(0);
            }
        }
    }
    let t = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [2, s]), device);
    Inputs {
        input_ids: t(ids),
        attention_mask: t(mask),
        token_type_ids: None,
    }
}

fn logits_vec(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("float logits")
}

/// Writes `<export>/p1/`: the public files copied, and the public manifest.
fn write_p1_part(export: &Path, manifest: &Manifest) -> Result<()> {
    let dir = export.join(P1_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let public = ["config.json", "tokenizer.json", "tokenizer_config.json"];
    for f in public.iter().chain(VOCAB_FILES) {
        let from = export.join(f);
        if from.is_file() {
            let bytes =
                std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
            write_atomic(&dir.join(f), &bytes)?;
        }
    }
    write_atomic(
        &dir.join(PUBLIC_MANIFEST),
        serde_json::to_string_pretty(&PublicManifest::of(manifest))?.as_bytes(),
    )
}

/// An existing `out` may be replaced only when it is an earlier export or empty.
fn check_out(out: &Path) -> Result<()> {
    if out.exists() {
        let is_export = out.join(MANIFEST).is_file();
        let is_empty = out.is_dir()
            && std::fs::read_dir(out)
                .with_context(|| format!("reading {}", out.display()))?
                .next()
                .is_none();
        if !is_export && !is_empty {
            bail!(
                "{} exists and is not an export (no {MANIFEST}): choose another --out",
                out.display()
            );
        }
    }
    Ok(())
}

fn replace_dir(staged: &Path, out: &Path) -> Result<()> {
    check_out(out)?;
    if out.exists() {
        let parent = out.parent().unwrap_or(Path::new("."));
        let old = parent.join(format!(
            ".replaced-{}",
            out.file_name().unwrap_or_default().to_string_lossy()
        ));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(out, &old).with_context(|| format!("moving {} aside", out.display()))?;
        std::fs::rename(staged, out).with_context(|| format!("renaming into {}", out.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(staged, out).with_context(|| format!("renaming into {}", out.display()))?;
    }
    Ok(())
}
