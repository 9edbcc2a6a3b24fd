//! The one table between field paths and Hugging Face weight names, used in both directions:
//! loading (`hf_name` of each parameter, looked up in the checkpoint) and export/gradient dumps
//! (each parameter written under its `hf_name`).

use burn::module::{ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::Gradients;

use super::bert::SequenceClassifier;
use super::config::Arch;

/// `["bert", "encoder", "layer", "0", "attention", "self_attn", "query", "weight"]` →
/// `bert.encoder.layer.0.attention.self.query.weight` (or `roberta.…`).
pub fn hf_name(path: &[String], arch: Arch) -> String {
    let mut out: Vec<&str> = Vec::with_capacity(path.len());
    for (i, part) in path.iter().enumerate() {
        let mapped = match part.as_str() {
            "bert" if i == 0 => arch.prefix(),
            "self_attn" => "self",
            "layer_norm" => "LayerNorm",
            "gamma" => "weight",
            "beta" => "bias",
            // BERT's head is a single Linear called `classifier`.
            "out_proj" if arch == Arch::Bert && i == 1 && path[0] == "classifier" => continue,
            other => other,
        };
        out.push(mapped);
    }
    out.join(".")
}

/// True for names that belong to the task head, which a backbone-only checkpoint lacks and which
/// is then initialised (and reported) instead of failing the load.
pub fn is_head(hf: &str) -> bool {
    hf.starts_with("classifier.") || hf.contains(".pooler.") || hf.starts_with("pooler.")
}

/// Tracks the module path during a visit; `Struct:Linear` weights are stored [in, out] in Burn and
/// [out, in] in PyTorch.
#[derive(Default)]
pub(crate) struct PathTracker {
    pub path: Vec<String>,
    containers: Vec<String>,
}

impl PathTracker {
    pub fn enter(&mut self, name: &str, container: &str) {
        self.path.push(name.to_string());
        self.containers.push(container.to_string());
    }
    pub fn exit(&mut self) {
        self.path.pop();
        self.containers.pop();
    }
    /// Path without empty components (the root module enters with an empty name).
    pub fn parts(&self) -> Vec<String> {
        self.path
            .iter()
            .filter(|p| !p.is_empty())
            .cloned()
            .collect()
    }
    /// Whether the current field is declared by the struct named `ty` (e.g. `Linear`).
    pub fn in_struct(&self, ty: &str) -> bool {
        self.containers
            .last()
            .and_then(|c| c.strip_prefix("Struct:"))
            .is_some_and(|c| c == ty)
    }
    pub fn is_linear_weight(&self) -> bool {
        // A field is entered with the type of the struct that declares it.
        self.path.last().is_some_and(|p| p == "weight")
            && self.containers.last().is_some_and(|c| c == "Struct:Linear")
    }
}

/// A tensor in Hugging Face layout, row-major f32.
#[derive(Clone, Debug)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Transposes a row-major [rows, cols] matrix.
pub(crate) fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

struct Collect<'a> {
    arch: Arch,
    grads: Option<&'a Gradients>,
    tracker: PathTracker,
    out: Vec<NamedTensor>,
}

impl ModuleVisitor for Collect<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.tracker.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let tensor = match self.grads {
            Some(g) => match value.grad(g) {
                Some(t) => t,
                None => return,
            },
            None => value,
        };
        let dims = tensor.dims().to_vec();
        let data: Vec<f32> = tensor
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("float tensor converts to f32");
        let (shape, data) = if self.tracker.is_linear_weight() {
            (vec![dims[1], dims[0]], transpose(&data, dims[0], dims[1]))
        } else {
            (dims, data)
        };
        self.out.push(NamedTensor {
            name: hf_name(&self.tracker.parts(), self.arch),
            shape,
            data,
        });
    }
}

impl SequenceClassifier {
    /// Every parameter under its HF name, in HF layout.
    pub fn hf_tensors(&self) -> Vec<NamedTensor> {
        let mut v = Collect {
            arch: self.config.arch,
            grads: None,
            tracker: PathTracker::default(),
            out: Vec::new(),
        };
        self.visit(&mut v);
        v.out
    }

    /// The gradient of every parameter that has one, under its HF name, in HF layout.
    pub fn hf_grads(&self, grads: &Gradients) -> Vec<NamedTensor> {
        let mut v = Collect {
            arch: self.config.arch,
            grads: Some(grads),
            tracker: PathTracker::default(),
            out: Vec::new(),
        };
        self.visit(&mut v);
        v.out
    }
}
