//! Loading Hugging Face checkpoints: `config.json` + `model.safetensors` (or a sharded index),
//! with or without the `bert.`/`roberta.` prefix, with or without a task head.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};

use super::bert::SequenceClassifier;
use super::config::ModelConfig;
use super::names::{PathTracker, hf_name, is_head, transpose};
use crate::error::LoadError;

/// One tensor read from a checkpoint, converted to f32 when it is a float tensor.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    /// `Err(dtype)` for non-float tensors (e.g. HF's int64 `position_ids` buffer).
    pub data: Result<Vec<f32>, String>,
    pub file: PathBuf,
}

/// All tensors of a checkpoint, by their names in the file(s).
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub tensors: BTreeMap<String, RawTensor>,
    /// Where the weights came from, for messages.
    pub source: PathBuf,
}

fn f32_from(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, String> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => return Err(format!("{other:?}")),
    })
}

impl Checkpoint {
    /// Reads the weights of a model directory: `model.safetensors`, else the shards listed in
    /// `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            Self::open_files(&[single], dir)
        } else if index.is_file() {
            let shards = Self::shards(&index)?;
            let files: Vec<PathBuf> = shards.iter().map(|f| dir.join(f)).collect();
            Self::open_files(&files, &index)
        } else if dir.join("pytorch_model.bin").is_file() {
            Err(LoadError::PytorchBin {
                dir: dir.to_path_buf(),
            })
        } else {
            Err(LoadError::NoWeights {
                dir: dir.to_path_buf(),
            })
        }
    }

    /// The shard file names of a `model.safetensors.index.json`, in order.
    pub fn shards(index: &Path) -> Result<Vec<String>, LoadError> {
        let text = std::fs::read_to_string(index).map_err(|e| LoadError::io(index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::Config {
            path: index.to_path_buf(),
            msg: e.to_string(),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::Config {
                path: index.to_path_buf(),
                msg: "no `weight_map` object".into(),
            })?;
        let set: BTreeSet<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        Ok(set.into_iter().collect())
    }

    pub fn open_files(files: &[PathBuf], source: &Path) -> Result<Self, LoadError> {
        let mut tensors = BTreeMap::new();
        for file in files {
            let bytes = std::fs::read(file).map_err(|e| LoadError::io(file, e))?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| LoadError::Corrupt {
                path: file.clone(),
                msg: e.to_string(),
            })?;
            for (name, view) in st.tensors() {
                tensors.insert(
                    name,
                    RawTensor {
                        shape: view.shape().to_vec(),
                        data: f32_from(view.dtype(), view.data()),
                        file: file.clone(),
                    },
                );
            }
        }
        Ok(Self {
            tensors,
            source: source.to_path_buf(),
        })
    }

    /// Looks a name up as written, then without its `bert.`/`roberta.` prefix (checkpoints of a
    /// bare `BertModel`, like sentence-transformers', have none). Returns the key found.
    fn find(&self, hf: &str) -> Option<(&str, &RawTensor)> {
        if let Some((k, t)) = self.tensors.get_key_value(hf) {
            return Some((k.as_str(), t));
        }
        let stripped = hf.split_once('.').map(|(_, rest)| rest)?;
        if hf.starts_with("bert.") || hf.starts_with("roberta.") {
            return self
                .tensors
                .get_key_value(stripped)
                .map(|(k, t)| (k.as_str(), t));
        }
        None
    }
}

/// What a load did besides loading: the user should see this.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Head parameters absent from the checkpoint, left at their random initialisation.
    pub initialised: Vec<String>,
    /// Head parameters whose shape differed (a new task), re-initialised on request.
    pub reinitialised: Vec<String>,
    /// Checkpoint tensors no parameter used (e.g. an MLM head).
    pub unexpected: Vec<String>,
    pub loaded: usize,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "loaded {} tensors", self.loaded)?;
        if !self.initialised.is_empty() {
            write!(
                f,
                "; newly initialised (not in checkpoint): {}",
                self.initialised.join(", ")
            )?;
        }
        if !self.reinitialised.is_empty() {
            write!(
                f,
                "; re-initialised (shape differs): {}",
                self.reinitialised.join(", ")
            )?;
        }
        if !self.unexpected.is_empty() {
            write!(f, "; unused in checkpoint: {}", self.unexpected.join(", "))?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Re-initialise head tensors whose shape differs instead of failing (fine-tuning a
    /// checkpoint on a task with a different label count; HF's `ignore_mismatched_sizes`).
    pub reinit_mismatched_head: bool,
}

struct Loader<'a> {
    ckpt: &'a Checkpoint,
    config: &'a ModelConfig,
    options: LoadOptions,
    tracker: PathTracker,
    used: BTreeSet<String>,
    report: LoadReport,
    error: Option<LoadError>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.tracker.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let hf = hf_name(&self.tracker.parts(), self.config.arch);
        let linear = self.tracker.is_linear_weight();
        let mut expected = param.lazy_shape().to_vec();
        if linear {
            expected.reverse();
        }
        let Some((key, raw)) = self.ckpt.find(&hf) else {
            if is_head(&hf) {
                self.report.initialised.push(hf);
            } else {
                self.error = Some(LoadError::Missing {
                    path: self.ckpt.source.clone(),
                    key: hf.clone(),
                    hint: missing_hint(self.ckpt, &hf),
                });
            }
            return param;
        };
        self.used.insert(key.to_string());
        if raw.shape != expected {
            if is_head(&hf) && self.options.reinit_mismatched_head {
                self.report.reinitialised.push(hf);
            } else {
                self.error = Some(LoadError::Shape {
                    path: raw.file.clone(),
                    key: key.to_string(),
                    expected,
                    found: raw.shape.clone(),
                });
            }
            return param;
        }
        let values = match &raw.data {
            Ok(v) => v,
            Err(dtype) => {
                self.error = Some(LoadError::Dtype {
                    path: raw.file.clone(),
                    key: key.to_string(),
                    dtype: dtype.clone(),
                });
                return param;
            }
        };
        let (data, shape) = if linear {
            (
                transpose(values, raw.shape[0], raw.shape[1]),
                vec![raw.shape[1], raw.shape[0]],
            )
        } else {
            (values.clone(), raw.shape.clone())
        };
        let device = param.lazy_device();
        let tensor = Tensor::<D>::from_data(TensorData::new(data, shape), &device);
        self.report.loaded += 1;
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

fn missing_hint(ckpt: &Checkpoint, hf: &str) -> String {
    let leaf = hf.rsplit('.').take(3).collect::<Vec<_>>();
    let similar: Vec<&String> = ckpt
        .tensors
        .keys()
        .filter(|k| {
            let kl = k.rsplit('.').take(3).collect::<Vec<_>>();
            kl == leaf
        })
        .take(3)
        .collect();
    if similar.is_empty() {
        format!(
            " (the checkpoint has {} tensors, none ending like it; is config.json for this checkpoint?)",
            ckpt.tensors.len()
        )
    } else {
        format!(" (similar names in the checkpoint: {similar:?})")
    }
}

impl SequenceClassifier {
    /// Replaces this model's parameters with the checkpoint's. Backbone tensors must all be
    /// present with the right shapes; head tensors may be missing (then they keep their
    /// initialisation and are listed in the report).
    pub fn load_checkpoint(
        self,
        ckpt: &Checkpoint,
        options: LoadOptions,
    ) -> Result<(Self, LoadReport), LoadError> {
        let config = self.config.clone();
        let mut loader = Loader {
            ckpt,
            config: &config,
            options,
            tracker: PathTracker::default(),
            used: BTreeSet::new(),
            report: LoadReport::default(),
            error: None,
        };
        let model = self.map(&mut loader);
        if let Some(e) = loader.error {
            return Err(e);
        }
        let mut report = loader.report;
        report.unexpected = ckpt
            .tensors
            .keys()
            // HF's registered buffer, recomputed here.
            .filter(|k| !loader.used.contains(*k) && !k.ends_with("position_ids"))
            .cloned()
            .collect();
        Ok((model, report))
    }
}
