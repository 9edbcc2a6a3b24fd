//! Resumable training checkpoints: parameters (by module path, Burn layout — exact, whatever
//! the module), optimiser moments and the loop's position, written as one directory that appears
//! atomically, with a `latest` pointer written last.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::optim::Optimizer;
use crate::io::{HostTensor, load_safetensors, save_safetensors, write_atomic};
use crate::model::names::PathTracker;

/// Where the loop is: enough to continue exactly.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Optimisation steps done.
    pub step: u64,
    pub epoch: u64,
    /// Batches of `epoch` already consumed.
    pub batch: usize,
    pub best_score: Option<f64>,
    pub best_step: Option<u64>,
    /// Seconds spent in the stage before this checkpoint (wall time survives a resume).
    pub elapsed_s: f64,
    /// f16 training's loss scaler, so that a resumed run scales as the uninterrupted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<super::precision::LossScale>,
}

struct Collect {
    tracker: PathTracker,
    out: BTreeMap<String, HostTensor>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.tracker.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.insert(
            self.tracker.parts().join("."),
            HostTensor::from_float(param.val()),
        );
    }
}

/// Every parameter of `module` by its path.
pub fn params<M: Module>(module: &M) -> BTreeMap<String, HostTensor> {
    let mut c = Collect {
        tracker: PathTracker::default(),
        out: BTreeMap::new(),
    };
    module.visit(&mut c);
    c.out
}

struct Restore<'a> {
    tracker: PathTracker,
    tensors: &'a BTreeMap<String, HostTensor>,
    missing: Vec<String>,
}

impl ModuleMapper for Restore<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.tracker.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.tracker.parts().join(".");
        match self.tensors.get(&path) {
            Some(HostTensor::F32 { shape, data }) if *shape == param.lazy_shape().to_vec() => {
                let t = Tensor::<D>::from_data(
                    TensorData::new(data.clone(), shape.clone()),
                    &param.lazy_device(),
                );
                let id = param.id;
                param.transform_for_load(t, id)
            }
            _ => {
                self.missing.push(path);
                param
            }
        }
    }
}

/// Replaces `module`'s parameters with `tensors` (from [`params`]); every one must be present.
pub fn load_params<M: Module>(module: M, tensors: &BTreeMap<String, HostTensor>) -> Result<M> {
    let mut r = Restore {
        tracker: PathTracker::default(),
        tensors,
        missing: Vec::new(),
    };
    let m = module.map(&mut r);
    if !r.missing.is_empty() {
        bail!(
            "checkpoint lacks (or has a different shape for) {}",
            r.missing.join(", ")
        );
    }
    Ok(m)
}

/// The checkpoints of one stage: `<dir>/ckpt-<step>/{model,optimizer}.safetensors + state.json`
/// and `<dir>/latest` naming the newest complete one.
pub struct Checkpoints {
    pub dir: PathBuf,
    /// Complete checkpoints to keep.
    pub keep: usize,
}

impl Checkpoints {
    pub fn save<M: Module>(
        &self,
        module: &M,
        optim: &Optimizer,
        state: &LoopState,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let name = format!("ckpt-{:08}", state.step);
        let tmp = tempfile::Builder::new()
            .prefix(".ckpt-")
            .tempdir_in(&self.dir)?;
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), state.step.to_string());
        save_safetensors(
            &tmp.path().join("model.safetensors"),
            &params(module),
            Some(meta.clone()),
        )?;
        save_safetensors(
            &tmp.path().join("optimizer.safetensors"),
            &optim.state_tensors(),
            Some(meta),
        )?;
        write_atomic(
            &tmp.path().join("state.json"),
            serde_json::to_string_pretty(&(state, optim.step))?.as_bytes(),
        )?;
        let final_dir = self.install(tmp, &name)?;
        self.prune(&name);
        Ok(final_dir)
    }

    /// Moves the complete checkpoint written in `tmp` to `<dir>/<name>` and points `latest` at it.
    fn install(&self, tmp: tempfile::TempDir, name: &str) -> Result<PathBuf> {
        let final_dir = self.dir.join(name);
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(tmp.keep(), &final_dir)
            .with_context(|| format!("renaming into {}", final_dir.display()))?;
        write_atomic(&self.dir.join("latest"), name.as_bytes())?;
        Ok(final_dir)
    }

    fn prune(&self, newest: &str) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut all: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("ckpt-") && n.as_str() <= newest)
            .collect();
        all.sort();
        let n = all.len().saturating_sub(self.keep);
        for old in &all[..n] {
            let _ = std::fs::remove_dir_all(self.dir.join(old));
        }
    }

    /// Copies the complete checkpoint `ckpt` (another run's) in as this stage's newest.
    pub fn adopt(&self, ckpt: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let name = ckpt
            .file_name()
            .with_context(|| format!("{}: not a checkpoint directory", ckpt.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".ckpt-")
            .tempdir_in(&self.dir)?;
        for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            std::fs::copy(ckpt.join(file), tmp.path().join(file))
                .with_context(|| format!("copying {}", ckpt.join(file).display()))?;
        }
        self.install(tmp, &name.to_string_lossy())
    }

    /// The newest complete checkpoint, if any.
    pub fn latest(&self) -> Option<PathBuf> {
        let name = std::fs::read_to_string(self.dir.join("latest")).ok()?;
        let p = self.dir.join(name.trim());
        p.join("state.json").is_file().then_some(p)
    }

    /// Restores module, optimiser and loop state from checkpoint directory `ckpt`.
    pub fn restore<M: Module>(
        ckpt: &Path,
        module: M,
        optim: &mut Optimizer,
        device: &Device,
    ) -> Result<(M, LoopState)> {
        let (state, opt_step): (LoopState, u64) = serde_json::from_str(
            &std::fs::read_to_string(ckpt.join("state.json"))
                .with_context(|| format!("reading {}/state.json", ckpt.display()))?,
        )?;
        let module = load_params(module, &load_safetensors(&ckpt.join("model.safetensors"))?)
            .with_context(|| format!("{}/model.safetensors", ckpt.display()))?;
        optim.load_state(
            &load_safetensors(&ckpt.join("optimizer.safetensors"))?,
            opt_step,
            device,
        )?;
        Ok((module, state))
    }
}
