//! Learning-rate schedules by optimisation step.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The reference's stage 1 (`schedule='none'`).
    Constant,
    /// Linear warm-up over `warmup` (a fraction of all steps), then linear decay to 0
    /// (TinyBERT's `warmup_linear`, HF's `get_linear_schedule_with_warmup`).
    Linear { warmup: f64 },
}

impl Schedule {
    /// Learning rate for step `step` (0-based) of `total`.
    pub fn lr(self, base: f64, step: u64, total: u64) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Linear { warmup } => {
                let total = total.max(1) as f64;
                let warm = (warmup * total).round();
                let s = step as f64;
                if s < warm {
                    base * (s + 1.0) / warm
                } else {
                    base * ((total - s) / (total - warm).max(1.0)).clamp(0.0, 1.0)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_warmup_then_decay() {
        let s = Schedule::Linear { warmup: 0.1 };
        let lrs: Vec<f64> = (0..100).map(|i| s.lr(1.0, i, 100)).collect();
        assert!((lrs[0] - 0.1).abs() < 1e-12);
        assert!((lrs[9] - 1.0).abs() < 1e-12);
        assert!((lrs[10] - 1.0).abs() < 1e-12);
        assert!((lrs[55] - 0.5).abs() < 1e-12);
        assert!(lrs[99] > 0.0 && lrs[99] < 0.02);
        assert_eq!(Schedule::Constant.lr(3e-5, 7, 10), 3e-5);
    }
}
