//! BERT/RoBERTa with MPC approximations: configuration, the encoder, and checkpoint loading.

pub mod approx;
pub mod bert;
pub mod config;
pub mod dropout;
pub mod kernels;
pub mod load;
pub mod names;
pub mod save;
pub mod shapes;

use std::path::PathBuf;

use burn::prelude::*;

pub use approx::{Act, Approx, Attn, LayerApprox, LayerOverride};
pub use bert::{Capture, ClassifierOutput, EncoderOutput, Inputs, SequenceClassifier};
pub use config::{Arch, ModelConfig};
pub use load::{Checkpoint, LoadOptions, LoadReport};
pub use names::NamedTensor;

use crate::error::LoadError;

/// Changes applied to a checkpoint's own configuration when loading it.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Model-wide FFN activation (e.g. `quad` for a student).
    pub act: Option<Act>,
    /// Model-wide attention normalisation (e.g. `2quad`).
    pub attn: Option<Attn>,
    /// Per-layer choices on top of the model-wide ones.
    pub layers: Vec<(usize, LayerOverride)>,
    /// Task labels when they differ from the checkpoint's (`regression` = one output).
    pub labels: Option<(Vec<String>, bool)>,
    /// All dropout off (parity checks).
    pub no_dropout: bool,
    pub load: LoadOptions,
}

impl Overrides {
    pub fn apply(&self, mut config: ModelConfig) -> ModelConfig {
        if let Some(a) = self.act {
            config.approx.act = a;
        }
        if let Some(a) = self.attn {
            config.approx.attn = a;
        }
        for (i, o) in &self.layers {
            config.approx.layers.insert(*i, *o);
        }
        if let Some((labels, regression)) = &self.labels {
            config = config.with_labels(labels.clone(), *regression);
        }
        if self.no_dropout {
            config = config.without_dropout();
        }
        config
    }
}

/// A model loaded from a directory or the Hub.
pub struct Pretrained {
    pub model: SequenceClassifier,
    /// The local directory the files came from (the Hub snapshot for a Hub id).
    pub dir: PathBuf,
    pub report: LoadReport,
}

/// Loads `config.json` + weights from a directory or a Hub id, applying `overrides`.
pub fn load_pretrained(
    spec: &str,
    overrides: &Overrides,
    device: &Device,
) -> Result<Pretrained, LoadError> {
    let dir = crate::hub::model_dir(spec)?;
    let config = overrides.apply(ModelConfig::from_file(&dir.join("config.json"))?);
    let ckpt = Checkpoint::open_dir(&dir)?;
    let (model, report) = config.init(device).load_checkpoint(&ckpt, overrides.load)?;
    Ok(Pretrained { model, dir, report })
}
