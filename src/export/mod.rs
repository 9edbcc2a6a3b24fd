//! MPC-ready export: a directory that Hugging Face `transformers`, MPCFormer's patched BERT and an
//! MPC runtime can load unchanged, and `load-check`, which validates one.
//!
//! An export holds `model.safetensors` (HF names, HF layout, f32 or f16), the same tensors as
//! `pytorch_model.bin` (PyTorch's zip serialization of a state dict, [`torch_bin`], which is all
//! MPCFormer's own loaders read; `--no-pytorch-bin` leaves it out), `config.json` (HF keys,
//! MPCFormer's `hidden_act`/`softmax_act`, and the `mpc` object of
//! [`crate::model::ModelConfig::mpc_json`]), the tokenizer (`tokenizer.json` plus the vocabulary
//! files, and `tokenizer_config.json`), for a run also its `recipe.toml`, `mpc_manifest.json`
//! ([`Manifest`]): task, labels, maximum length, provenance (teacher, recipe and hash), dev
//! metrics, the fixed-point encoding a runtime should use, the value ranges seen on dev data
//! per op ([`RangeStats`]), and the sha256 of every other file — and `p1/`, what the MPC client
//! needs and nothing else.
//!
//! One concept a module:
//! - [`format`] holds the files and their fields (manifest, public manifest, fixed point, op
//!   ranges, names). Readers of an export — `load-check` and the MPC engine — need it only.
//! - [`ranges`] measures the value ranges on dev data.
//! - `source` reads what an export is made from (a run and its recipe, or a model directory).
//! - [`write`] stages, self-checks and places an export.
//! - [`check`] is `load-check`.
//! - [`torch_bin`] writes and reads `pytorch_model.bin` without PyTorch.

pub mod check;
pub mod format;
pub mod ranges;
mod source;
pub mod torch_bin;
pub mod write;

pub use check::{CheckReport, check_torch_bin, load_check};
pub use format::{
    Dtype, FORMAT, FORMAT_VERSION, FileEntry, FixedPoint, MANIFEST, Manifest, OpKind, OpRange,
    P1_DIR, PUBLIC_MANIFEST, PublicManifest, REQUIRED_FILES, RING_BITS, sha256_file,
};
pub use ranges::RangeStats;
pub use write::{ExportOptions, ExportReport, Source, export};
