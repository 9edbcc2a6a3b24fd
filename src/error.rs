//! Errors a user can act on: each names the file, key or line at fault.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error(
        "{path}: not a valid safetensors file ({msg}); the file may be truncated or corrupt, download it again"
    )]
    Corrupt { path: PathBuf, msg: String },
    #[error(
        "{path}: tensor `{key}` has shape {found:?} but the model expects {expected:?} (check config.json against the weights)"
    )]
    Shape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: missing tensor `{key}`{hint}")]
    Missing {
        path: PathBuf,
        key: String,
        hint: String,
    },
    #[error(
        "{path}: tensor `{key}` has dtype {dtype}, expected a float type (F32, F16, BF16, F64)"
    )]
    Dtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error(
        "{dir}: only `pytorch_model.bin` found; convert it to safetensors first, e.g.\n  python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{dir}').save_pretrained('{dir}', safe_serialization=True)\""
    )]
    PytorchBin { dir: PathBuf },
    #[error("{dir}: no `model.safetensors` or `model.safetensors.index.json`")]
    NoWeights { dir: PathBuf },
    #[error("{path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("model `{id}`: {msg}")]
    Hub { id: String, msg: String },
}

impl LoadError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        LoadError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
