//! `torch.optim.AdamW` (see the module above for the formula): its settings and its step.

use super::CHUNK;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// `torch.optim.AdamW`'s settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One AdamW step of `p` with `g × scale`, moments `m` and `v`, at step `step` (from 1) and
/// learning rate `lr`.
#[allow(clippy::too_many_arguments)]
pub(super) fn adamw_step(
    c: &AdamWConfig,
    step: u64,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f64,
    scale: f32,
) {
    let decay = (1.0 - lr * c.weight_decay) as f32;
    let b2 = c.beta2 as f32;
    let w1 = (1.0 - c.beta1) as f32;
    let bc1 = 1.0 - c.beta1.powi(step as i32);
    let bc2 = 1.0 - c.beta2.powi(step as i32);
    let step_size = (lr / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let eps = c.eps as f32;
    let one_minus_b2 = 1.0 - b2;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let g = if scale == 1.0 { g[i] } else { g[i] * scale };
                p[i] *= decay;
                // torch.lerp with weight < 0.5: start + weight·(end − start).
                m[i] += w1 * (g - m[i]);
                v[i] = v[i] * b2 + one_minus_b2 * g * g;
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] -= step_size * (m[i] / denom);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fixture, replay};
    use super::super::OptimizerConfig;
    use super::*;

    #[test]
    fn adamw_matches_torch() {
        let f = fixture();
        replay(
            &f["adamw"],
            OptimizerConfig::Adamw(AdamWConfig {
                weight_decay: 0.01,
                ..AdamWConfig::default()
            }),
            Some(1.0),
        );
    }
}
