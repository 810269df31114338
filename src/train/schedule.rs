//! Learning-rate schedules with HF transformers' semantics (`get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup` with 0.5 cycles): the
//! LR of the optimizer step that follows `done` completed steps is `base_lr · λ(done)`, so with
//! warmup the first step runs at LR 0, as in the Trainer.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// The shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// Warmup steps as HF's Trainer resolves them: `warmup_steps` when set, else
/// `ceil(warmup_ratio · total)`.
pub fn warmup_steps(warmup_steps: Option<u64>, warmup_ratio: f64, total: u64) -> Result<u64> {
    ensure!(
        (0.0..=1.0).contains(&warmup_ratio),
        "warmup_ratio must be in [0, 1], got {warmup_ratio}"
    );
    Ok(match warmup_steps {
        Some(w) => w,
        None => (warmup_ratio * total as f64).ceil() as u64,
    })
}

/// A resolved schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule {
    /// The multiplier λ after `done` optimizer steps.
    pub fn factor(&self, done: u64) -> f64 {
        let (step, warmup, total) = (done as f64, self.warmup as f64, self.total as f64);
        if done < self.warmup {
            return step / warmup.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (step - warmup) / (total - warmup).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of the optimizer step that follows `done` completed steps.
    pub fn lr(&self, done: u64) -> f64 {
        self.base_lr * self.factor(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_schedules() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/optim_golden.json"
        );
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = golden["schedules"].as_array().unwrap();
        assert!(cases.len() >= 12);
        for c in cases {
            let kind = match c["kind"].as_str().unwrap() {
                "constant" => ScheduleKind::Constant,
                "linear" => ScheduleKind::Linear,
                _ => ScheduleKind::Cosine,
            };
            let s = Schedule {
                kind,
                base_lr: 1.0,
                warmup: c["warmup"].as_u64().unwrap(),
                total: c["total"].as_u64().unwrap(),
            };
            for (done, want) in c["lrs"].as_array().unwrap().iter().enumerate() {
                let want = want.as_f64().unwrap();
                let got = s.lr(done as u64);
                assert!(
                    (got - want).abs() < 1e-12,
                    "{kind:?} warmup {} total {} after {done} steps: {got} vs {want}",
                    s.warmup,
                    s.total
                );
            }
        }
    }

    #[test]
    fn warmup_ratio_rounds_up_like_the_trainer() {
        assert_eq!(warmup_steps(None, 0.1, 3000).unwrap(), 300);
        assert_eq!(warmup_steps(None, 0.1, 25).unwrap(), 3);
        assert_eq!(warmup_steps(Some(7), 0.1, 25).unwrap(), 7);
        assert!(warmup_steps(None, 1.5, 25).is_err());
    }
}
