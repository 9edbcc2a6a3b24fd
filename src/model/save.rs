//! Writing a model as a Hugging Face directory (`config.json`, `model.safetensors`, tokenizer
//! files) that `load_pretrained`, `transformers` and MPCFormer's code read.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use super::bert::SequenceClassifier;
use crate::io::{HostTensor, save_safetensors, write_atomic};

/// Tokenizer files copied next to the weights when the source directory has them.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
];

impl SequenceClassifier {
    /// Writes `dir` completely or not at all: everything goes to a sibling temporary directory
    /// that replaces `dir` by rename at the end.
    pub fn save_pretrained(&self, dir: &Path, tokenizer_dir: Option<&Path>) -> Result<()> {
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".saving-")
            .tempdir_in(parent)
            .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
        let config = serde_json::to_string_pretty(&self.config.to_hf_json())?;
        write_atomic(&tmp.path().join("config.json"), config.as_bytes())?;
        let tensors: BTreeMap<String, HostTensor> = self
            .hf_tensors()
            .into_iter()
            .map(|t| {
                (
                    t.name,
                    HostTensor::F32 {
                        shape: t.shape,
                        data: t.data,
                    },
                )
            })
            .collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        save_safetensors(&tmp.path().join("model.safetensors"), &tensors, Some(meta))?;
        if let Some(src) = tokenizer_dir {
            for f in TOKENIZER_FILES {
                let from = src.join(f);
                if from.is_file() {
                    std::fs::copy(&from, tmp.path().join(f))
                        .with_context(|| format!("copying {}", from.display()))?;
                }
            }
        }
        let staged = tmp.keep();
        if dir.exists() {
            let old = parent.join(format!(
                ".replaced-{}",
                dir.file_name().unwrap_or_default().to_string_lossy()
            ));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(dir, &old)
                .with_context(|| format!("moving {} aside", dir.display()))?;
            std::fs::rename(&staged, dir)
                .with_context(|| format!("renaming into {}", dir.display()))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&staged, dir)
                .with_context(|| format!("renaming into {}", dir.display()))?;
        }
        Ok(())
    }
}
