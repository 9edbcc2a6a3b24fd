//! Knowledge distillation from a teacher into an MPC-friendly student (MPCFormer's two stages):
//! the student, the layer map between them, and the loss of each stage.

pub mod fitted;
pub mod gap;
pub mod loss;

use anyhow::{Result, bail};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use crate::model::bert::Capture;
use crate::model::load::RawTensor;
use crate::model::{
    Checkpoint, ClassifierOutput, LoadOptions, LoadReport, ModelConfig, SequenceClassifier,
};
use crate::train::recipe::{StageSettings, StudentInit, StudentSpec};
use loss::{
    AttentionTarget, LogitLoss, attention_kl, attention_mse, hidden_mse, mse, soft_cross_entropy,
    with_additive_mask,
};

/// Which teacher layer each student layer learns from, with k = teacher layers / student layers:
/// hidden state `i ↔ i·k` (i = 0 is the embedding output), attention `i ↔ i·k + k − 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerMap {
    pub k: usize,
    pub student_layers: usize,
}

impl LayerMap {
    pub fn new(teacher_layers: usize, student_layers: usize) -> Result<Self> {
        if student_layers == 0 || !teacher_layers.is_multiple_of(student_layers) {
            bail!(
                "the student's {student_layers} layers must divide the teacher's {teacher_layers}"
            );
        }
        Ok(Self {
            k: teacher_layers / student_layers,
            student_layers,
        })
    }

    /// (student, teacher) pairs of hidden states, embedding output included.
    pub fn hidden(&self) -> Vec<(usize, usize)> {
        (0..=self.student_layers).map(|i| (i, i * self.k)).collect()
    }

    /// (student, teacher) pairs of attention layers.
    pub fn attention(&self) -> Vec<(usize, usize)> {
        (0..self.student_layers)
            .map(|i| (i, i * self.k + self.k - 1))
            .collect()
    }
}

/// The student being trained, with TinyBERT's `fit_dense` when it is narrower than the teacher.
#[derive(Module, Debug)]
pub struct Student {
    pub model: SequenceClassifier,
    pub fit_dense: Option<Linear>,
}

/// The student's configuration: the teacher's, with the approximations and sizes of `spec`.
pub fn student_config(teacher: &ModelConfig, spec: &StudentSpec) -> Result<ModelConfig> {
    let mut c = teacher.clone();
    c.approx.act = spec.act;
    c.approx.attn = spec.attn;
    if let Some(shift) = spec.two_quad_c {
        c.approx.c = shift;
    }
    c.approx.layers.clear();
    for (k, o) in &spec.layers {
        let i: usize = k
            .parse()
            .map_err(|_| anyhow::anyhow!("student.layers key `{k}` is not a layer index"))?;
        c.approx.layers.insert(i, *o);
    }
    if let Some(l) = spec.num_hidden_layers {
        c.num_hidden_layers = l;
    }
    if let Some(h) = spec.hidden_size {
        c.hidden_size = h;
    }
    if let Some(f) = spec.intermediate_size {
        c.intermediate_size = f;
    }
    if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        bail!(
            "student hidden_size {} is not a multiple of {} heads",
            c.hidden_size,
            c.num_attention_heads
        );
    }
    LayerMap::new(teacher.num_hidden_layers, c.num_hidden_layers)?;
    Ok(c)
}

/// Builds the student. With `init = teacher` it starts from the teacher's weights (a shallower
/// student takes teacher layer `i·k + k − 1` as its layer `i`); a narrower student cannot, and
/// starts from random weights with a `fit_dense` projection.
pub fn init_student(
    teacher: &SequenceClassifier,
    spec: &StudentSpec,
    device: &Device,
) -> Result<(Student, Option<LoadReport>)> {
    let config = student_config(&teacher.config, spec)?;
    let model = config.init(device);
    let narrower = config.hidden_size != teacher.config.hidden_size;
    let fit_dense = narrower
        .then(|| LinearConfig::new(config.hidden_size, teacher.config.hidden_size).init(device));
    if spec.init == StudentInit::Random || narrower {
        return Ok((Student { model, fit_dense }, None));
    }
    let map = LayerMap::new(teacher.config.num_hidden_layers, config.num_hidden_layers)?;
    let mut ckpt = Checkpoint {
        source: "teacher (in memory)".into(),
        ..Default::default()
    };
    for t in teacher.hf_tensors() {
        let name = match layer_of(&t.name) {
            Some((prefix, layer, rest)) => {
                if (layer + 1) % map.k != 0 {
                    continue;
                }
                format!("{prefix}{}{rest}", layer / map.k)
            }
            None => t.name.clone(),
        };
        let intermediate = config.intermediate_size != teacher.config.intermediate_size
            && (t.name.contains(".intermediate.") || t.name.contains(".output.dense.weight"))
            && !t.name.contains("attention");
        if intermediate {
            continue;
        }
        ckpt.tensors.insert(
            name,
            RawTensor {
                shape: t.shape,
                data: Ok(t.data),
                file: "teacher".into(),
            },
        );
    }
    let options = LoadOptions {
        reinit_mismatched_head: false,
    };
    // A narrower FFN cannot take the teacher's FFN weights: those stay random.
    let tolerant = config.intermediate_size != teacher.config.intermediate_size;
    let model = if tolerant {
        let mut kept = Checkpoint {
            source: ckpt.source.clone(),
            ..Default::default()
        };
        let fresh = config.init(device).hf_tensors();
        for f in fresh {
            if let Some(t) = ckpt.tensors.remove(&f.name) {
                kept.tensors.insert(f.name, t);
            } else {
                kept.tensors.insert(
                    f.name,
                    RawTensor {
                        shape: f.shape,
                        data: Ok(f.data),
                        file: "random".into(),
                    },
                );
            }
        }
        model.load_checkpoint(&kept, options)?
    } else {
        model.load_checkpoint(&ckpt, options)?
    };
    Ok((
        Student {
            model: model.0,
            fit_dense,
        },
        Some(model.1),
    ))
}

/// `bert.encoder.layer.7.attention…` → (`bert.encoder.layer.`, 7, `.attention…`).
fn layer_of(name: &str) -> Option<(&str, usize, &str)> {
    let key = "encoder.layer.";
    let at = name.find(key)? + key.len();
    let rest = &name[at..];
    let dot = rest.find('.')?;
    let layer = rest[..dot].parse().ok()?;
    Some((&name[..at], layer, &rest[dot..]))
}

/// What stage 1 needs of both models' forward passes.
pub fn stage1_capture(settings: &StageSettings) -> Capture {
    let scores = settings.attention_target.is_scores();
    Capture {
        hidden_states: true,
        attention_scores: scores,
        attentions: !scores,
    }
}

/// Stage-1 loss: Σ attention term ([`AttentionTarget`]: MSE of scores masked as TinyBERT, or KL
/// of the distributions) + Σ MSE(hidden states) ([`loss::HiddenNorm`]), weighted. Both outputs come from a forward pass
/// with [`stage1_capture`]. Returns (total, attention part, hidden part).
pub fn intermediate_loss(
    student: &Student,
    s: &ClassifierOutput,
    t: &ClassifierOutput,
    key_mask: Tensor<2>,
    settings: &StageSettings,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let layers = |o: &ClassifierOutput| o.encoder.hidden_states.len().saturating_sub(1).max(1);
    let map = LayerMap::new(layers(t), layers(s)).expect("checked when the student was built");
    let device = key_mask.device();
    let mut att = Tensor::<1>::zeros([1], &device);
    for (si, ti) in map.attention() {
        att = att
            + match settings.attention_target {
                AttentionTarget::Scores => attention_mse(
                    with_additive_mask(s.encoder.attention_scores[si].clone(), key_mask.clone()),
                    with_additive_mask(t.encoder.attention_scores[ti].clone(), key_mask.clone()),
                ),
                AttentionTarget::Probs => attention_kl(
                    s.encoder.attentions[si].clone(),
                    t.encoder.attentions[ti].clone(),
                    key_mask.clone(),
                ),
            };
    }
    let mut hid = Tensor::<1>::zeros([1], &device);
    for (si, ti) in map.hidden() {
        let h = s.encoder.hidden_states[si].clone();
        let h = match &student.fit_dense {
            Some(fd) => crate::model::bert::apply_linear(fd, h),
            None => h,
        };
        hid = hid + hidden_mse(h, t.encoder.hidden_states[ti].clone(), settings.hidden_norm);
    }
    let total = att.clone() * settings.attention_weight + hid.clone() * settings.hidden_weight;
    (total, att, hid)
}

/// The logit-matching loss against the teacher: soft cross-entropy or logit MSE
/// ([`LogitLoss`], classification), or MSE to
/// the teacher's score (regression). Stage 2's loss unless it fits gold scores, and stage 1's
/// extra term when `stage1.prediction_weight > 0`.
pub fn prediction_loss(
    student_logits: Tensor<2>,
    teacher_logits: Tensor<2>,
    regression: bool,
    settings: &StageSettings,
) -> Tensor<1> {
    if regression {
        let n = teacher_logits.dims()[0];
        crate::loss::mse(student_logits, teacher_logits.reshape([n]))
    } else {
        match settings.logit_loss {
            LogitLoss::SoftCe => soft_cross_entropy(
                student_logits,
                teacher_logits,
                settings.temperature,
                settings.soft_ce_norm,
            ),
            LogitLoss::Mse => mse(student_logits, teacher_logits),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_map_for_k_1_2_3() {
        let m = LayerMap::new(4, 4).unwrap();
        assert_eq!(m.hidden(), vec![(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]);
        assert_eq!(m.attention(), vec![(0, 0), (1, 1), (2, 2), (3, 3)]);
        let m = LayerMap::new(12, 6).unwrap();
        assert_eq!(m.hidden()[..3], [(0, 0), (1, 2), (2, 4)]);
        assert_eq!(*m.hidden().last().unwrap(), (6, 12));
        assert_eq!(m.attention()[..3], [(0, 1), (1, 3), (2, 5)]);
        let m = LayerMap::new(6, 2).unwrap();
        assert_eq!(m.hidden(), vec![(0, 0), (1, 3), (2, 6)]);
        assert_eq!(m.attention(), vec![(0, 2), (1, 5)]);
        assert!(LayerMap::new(6, 4).is_err());
    }

    #[test]
    fn logit_mse_is_the_mean_squared_logit_difference() {
        use crate::train::recipe::{StageConfig, StageKind};
        let device = Default::default();
        let (s, t) = ([0.3f32, -0.2, 1.5, 0.0], [0.1f32, 0.1, -0.5, 0.25]);
        let tensor =
            |v: [f32; 4]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [2, 2]), &device);
        let value = |settings: &StageSettings| {
            prediction_loss(tensor(s), tensor(t), false, settings).into_scalar::<f32>() as f64
        };
        let mut settings = StageConfig::default().resolve(StageKind::Stage2, "rte");
        assert_eq!(
            settings.logit_loss,
            LogitLoss::SoftCe,
            "the reference's loss by default"
        );
        let soft_ce = value(&settings);
        settings.logit_loss = LogitLoss::Mse;
        let expected = s
            .iter()
            .zip(&t)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / 4.0;
        assert!(
            (value(&settings) - expected).abs() < 1e-6,
            "{} vs {expected}",
            value(&settings)
        );
        assert!(
            (soft_ce - expected).abs() > 1e-3,
            "the two losses differ on these logits"
        );
    }

    #[test]
    fn layer_names_split() {
        assert_eq!(
            layer_of("bert.encoder.layer.11.output.dense.weight"),
            Some(("bert.encoder.layer.", 11, ".output.dense.weight"))
        );
        assert_eq!(layer_of("bert.embeddings.word_embeddings.weight"), None);
    }
}
