//! Optimizers as fused passes over flat f32 buffers (DESIGN.md §2, trap 3: tensor-op updates of
//! the 45K Wake rows took 1–2.6 s a step). Each parameter is a row-major `[rows, cols]` buffer
//! (`rows = 1` for a vector) with a same-sized gradient buffer.
//!
//! - [`Adafactor`] follows HF transformers' `transformers.optimization.Adafactor.step`
//!   operation for operation: `update = g² + eps₁`; for a matrix the row and column means of it
//!   feed the factored second moments `R ← β₂ₜR + (1−β₂ₜ)·mean_c`, `C ← β₂ₜC + (1−β₂ₜ)·mean_r`
//!   with `β₂ₜ = 1 − t^decay_rate`; `update = (rsqrt(R/mean(R)) · rsqrt(C)) · g` (a vector keeps
//!   a full `V` and uses `rsqrt(V)·g`); `update /= max(1, RMS(update)/clip_threshold)`;
//!   `update *= lr`; optional first moment `m ← β₁m + (1−β₁)·update`; decoupled weight decay
//!   `p −= wd·lr·p`; `p −= update`. `lr` is the scheduled LR, or with `relative_step`
//!   `min(1e-6·t if warmup_init else 1e-2, 1/√t)`, times `max(eps₂, RMS(p))` with
//!   `scale_parameter`. Means and norms are accumulated in f64 (torch sums in f32), so results
//!   agree with torch's to float rounding.
//! - [`AdamW`] follows `torch.optim.AdamW` (single-tensor path): `p ← p·(1 − lr·wd)`,
//!   `m ← m + (g − m)(1 − β₁)`, `v ← β₂v + (1 − β₂)g²`, `p ← p − lr/(1 − β₁ᵗ) · m /
//!   (√v/√(1 − β₂ᵗ) + eps)`.
//!
//! Every reduction sums fixed-size chunks and adds the partial sums in order, so results are the
//! same whatever the number of threads: resumed runs stay bit-identical.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Elements per chunk of a parallel pass; fixed so that reductions are deterministic.
const CHUNK: usize = 1 << 14;

/// `Σ x²` of a buffer, in f64, chunked deterministically.
pub fn sum_squares(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum())
        .collect();
    parts.iter().sum()
}

/// Gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`: the total L2 norm of all
/// gradients and the factor `min(1, max_norm / (norm + 1e-6))` to multiply them by.
pub fn clip_factor(grads: &[&[f32]], max_norm: f64) -> (f64, f32) {
    let norm = grads.iter().map(|g| sum_squares(g)).sum::<f64>().sqrt();
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    (norm, coef as f32)
}

/// The optimizer's settings (run.toml `[optimizer]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase", deny_unknown_fields)]
pub enum OptimizerConfig {
    Adafactor(AdafactorConfig),
    Adamw(AdamWConfig),
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::Adafactor(AdafactorConfig::default())
    }
}

impl OptimizerConfig {
    /// The decoupled weight decay.
    pub fn weight_decay(&self) -> f64 {
        match self {
            OptimizerConfig::Adafactor(c) => c.weight_decay,
            OptimizerConfig::Adamw(c) => c.weight_decay,
        }
    }

    /// Sets the decoupled weight decay.
    pub fn set_weight_decay(&mut self, wd: f64) {
        match self {
            OptimizerConfig::Adafactor(c) => c.weight_decay = wd,
            OptimizerConfig::Adamw(c) => c.weight_decay = wd,
        }
    }

    /// Checks the values are usable.
    pub fn validate(&self) -> Result<()> {
        let wd = self.weight_decay();
        ensure!(
            wd.is_finite() && wd >= 0.0,
            "optimizer weight_decay must be >= 0, got {wd}"
        );
        match self {
            OptimizerConfig::Adafactor(c) => {
                ensure!(
                    c.clip_threshold > 0.0,
                    "adafactor clip_threshold must be > 0"
                );
                ensure!(
                    c.decay_rate < 0.0,
                    "adafactor decay_rate must be < 0 (the original uses -0.8)"
                );
                if let Some(b) = c.beta1 {
                    ensure!((0.0..1.0).contains(&b), "adafactor beta1 must be in [0, 1)");
                }
            }
            OptimizerConfig::Adamw(c) => {
                ensure!(
                    (0.0..1.0).contains(&c.beta1) && (0.0..1.0).contains(&c.beta2),
                    "adamw betas must be in [0, 1)"
                );
                ensure!(c.eps > 0.0, "adamw eps must be > 0");
            }
        }
        Ok(())
    }
}

/// HF Adafactor's settings; the defaults are the original's (`optim="adafactor"` in the Trainer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdafactorConfig {
    /// Regularization constants: added to g² (eps₁) and the floor of the parameter scale (eps₂).
    pub eps: (f64, f64),
    pub clip_threshold: f64,
    pub decay_rate: f64,
    /// First-moment coefficient; `None` (the default) keeps no momentum.
    pub beta1: Option<f64>,
    pub weight_decay: f64,
    pub scale_parameter: bool,
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: false,
            relative_step: false,
            warmup_init: false,
        }
    }
}

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

/// The state of one parameter.
#[derive(Debug, Clone, PartialEq)]
enum State {
    Adafactor {
        step: u64,
        /// Factored second moments (`row` `[rows]`, `col` `[cols]`), or the full one in `row`.
        row: Vec<f32>,
        col: Vec<f32>,
        exp_avg: Vec<f32>,
    },
    AdamW {
        step: u64,
        m: Vec<f32>,
        v: Vec<f32>,
    },
}

/// An optimizer over named parameters, each a `[rows, cols]` f32 buffer.
#[derive(Debug, Clone)]
pub struct Optimizer {
    config: OptimizerConfig,
    states: BTreeMap<String, (usize, usize, State)>,
}

impl Optimizer {
    /// A fresh optimizer; parameter states are created on their first step.
    pub fn new(config: OptimizerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            states: BTreeMap::new(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Updates `param` (`[rows, cols]`, row-major) with `grad × grad_scale` at learning rate `lr`.
    pub fn step(
        &mut self,
        name: &str,
        param: &mut [f32],
        grad: &[f32],
        (rows, cols): (usize, usize),
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        ensure!(
            param.len() == rows * cols && grad.len() == param.len(),
            "parameter '{name}': buffers of {} and {} values for shape {rows}×{cols}",
            param.len(),
            grad.len()
        );
        let config = self.config.clone();
        let entry = self.states.entry(name.to_string()).or_insert_with(|| {
            let state = match &config {
                OptimizerConfig::Adafactor(c) => State::Adafactor {
                    step: 0,
                    row: vec![0.0; if rows > 1 { rows } else { cols }],
                    col: vec![0.0; if rows > 1 { cols } else { 0 }],
                    exp_avg: if c.beta1.is_some() {
                        vec![0.0; rows * cols]
                    } else {
                        vec![]
                    },
                },
                OptimizerConfig::Adamw(_) => State::AdamW {
                    step: 0,
                    m: vec![0.0; rows * cols],
                    v: vec![0.0; rows * cols],
                },
            };
            (rows, cols, state)
        });
        ensure!(
            (entry.0, entry.1) == (rows, cols),
            "parameter '{name}' changed shape from {}×{} to {rows}×{cols}",
            entry.0,
            entry.1
        );
        match (&config, &mut entry.2) {
            (OptimizerConfig::Adafactor(c), State::Adafactor { .. }) => {
                adafactor_step(c, &mut entry.2, param, grad, (rows, cols), lr, grad_scale)
            }
            (OptimizerConfig::Adamw(c), State::AdamW { step, m, v }) => {
                *step += 1;
                adamw_step(c, *step, param, grad, m, v, lr, grad_scale);
            }
            _ => bail!("internal: optimizer state of the wrong kind for '{name}'"),
        }
        Ok(())
    }

    /// The state as named f32 buffers (`NAME.row`, `NAME.col`, `NAME.exp_avg`, `NAME.m`,
    /// `NAME.v`, each with its shape) and step counts, for a checkpoint.
    pub fn export(&self) -> (super::Buffers, BTreeMap<String, u64>) {
        let mut bufs = super::Buffers::new();
        let mut steps = BTreeMap::new();
        for (name, (rows, cols, state)) in &self.states {
            let full = vec![*rows, *cols];
            match state {
                State::Adafactor {
                    step,
                    row,
                    col,
                    exp_avg,
                } => {
                    steps.insert(name.clone(), *step);
                    bufs.insert(format!("{name}.row"), (vec![row.len()], row.clone()));
                    bufs.insert(format!("{name}.col"), (vec![col.len()], col.clone()));
                    if !exp_avg.is_empty() {
                        bufs.insert(format!("{name}.exp_avg"), (full.clone(), exp_avg.clone()));
                    }
                }
                State::AdamW { step, m, v } => {
                    steps.insert(name.clone(), *step);
                    bufs.insert(format!("{name}.m"), (full.clone(), m.clone()));
                    bufs.insert(format!("{name}.v"), (full, v.clone()));
                }
            }
        }
        (bufs, steps)
    }

    /// Restores the state written by [`Optimizer::export`]; `shapes` gives each parameter's
    /// `[rows, cols]`.
    pub fn import(
        &mut self,
        mut bufs: BTreeMap<String, Vec<f32>>,
        steps: &BTreeMap<String, u64>,
        shapes: &BTreeMap<String, (usize, usize)>,
    ) -> Result<()> {
        let mut take = |key: String, len: usize| -> Result<Vec<f32>> {
            let v = bufs.remove(&key).ok_or_else(|| {
                anyhow::anyhow!("the checkpoint's optimizer state has no '{key}'")
            })?;
            ensure!(
                v.len() == len,
                "optimizer state '{key}' has {} values, expected {len}",
                v.len()
            );
            Ok(v)
        };
        self.states.clear();
        for (name, &step) in steps {
            let &(rows, cols) = shapes.get(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "the checkpoint has optimizer state for an unknown parameter '{name}'"
                )
            })?;
            let state = match &self.config {
                OptimizerConfig::Adafactor(c) => State::Adafactor {
                    step,
                    row: take(format!("{name}.row"), if rows > 1 { rows } else { cols })?,
                    col: take(format!("{name}.col"), if rows > 1 { cols } else { 0 })?,
                    exp_avg: if c.beta1.is_some() {
                        take(format!("{name}.exp_avg"), rows * cols)?
                    } else {
                        vec![]
                    },
                },
                OptimizerConfig::Adamw(_) => State::AdamW {
                    step,
                    m: take(format!("{name}.m"), rows * cols)?,
                    v: take(format!("{name}.v"), rows * cols)?,
                },
            };
            self.states.insert(name.clone(), (rows, cols, state));
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn adamw_step(
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

/// RMS of a buffer: `‖x‖ / √n`.
fn rms(x: &[f32]) -> f64 {
    (sum_squares(x) / x.len().max(1) as f64).sqrt()
}

fn adafactor_step(
    c: &AdafactorConfig,
    state: &mut State,
    p: &mut [f32],
    g: &[f32],
    (rows, cols): (usize, usize),
    sched_lr: f64,
    scale: f32,
) {
    let State::Adafactor {
        step,
        row,
        col,
        exp_avg,
    } = state
    else {
        unreachable!()
    };
    *step += 1;
    let t = *step as f64;
    let mut lr = sched_lr;
    if c.relative_step {
        let min_step = if c.warmup_init { 1e-6 * t } else { 1e-2 };
        lr = min_step.min(1.0 / t.sqrt());
    }
    if c.scale_parameter {
        lr *= c.eps.1.max(rms(p));
    }
    // torch: `row.mul_(beta2t).add_(mean, alpha=1.0 - beta2t)`, both scalars f64 → f32.
    let beta2t_f64 = 1.0 - t.powf(c.decay_rate);
    let beta2t = beta2t_f64 as f32;
    let alpha = (1.0 - beta2t_f64) as f32;
    let eps1 = c.eps.0 as f32;
    let sq = |g: f32| {
        let g = if scale == 1.0 { g } else { g * scale };
        g * g + eps1
    };
    let factored = rows > 1;
    // update = rsqrt(R/mean R)·rsqrt(C) · g, or rsqrt(V)·g, as a function of the element index.
    let (r_factor, c_factor): (Vec<f32>, Vec<f32>) = if factored {
        // Row means (each row in one chunk of rows) and column sums (partial per chunk of rows).
        let rows_per_chunk = (CHUNK / cols.max(1)).max(1);
        let parts: Vec<(Vec<f64>, Vec<f64>)> = g
            .par_chunks(rows_per_chunk * cols)
            .map(|block| {
                let mut col_sum = vec![0f64; cols];
                let row_mean: Vec<f64> = block
                    .chunks(cols)
                    .map(|r| {
                        let mut s = 0f64;
                        for (j, &x) in r.iter().enumerate() {
                            let u = sq(x) as f64;
                            s += u;
                            col_sum[j] += u;
                        }
                        s / cols as f64
                    })
                    .collect();
                (row_mean, col_sum)
            })
            .collect();
        let mut col_sum = vec![0f64; cols];
        let mut i = 0;
        for (row_mean, cs) in &parts {
            for m in row_mean {
                row[i] = row[i] * beta2t + (*m as f32) * alpha;
                i += 1;
            }
            col_sum.iter_mut().zip(cs).for_each(|(a, b)| *a += b);
        }
        for (cv, s) in col.iter_mut().zip(&col_sum) {
            *cv = *cv * beta2t + ((s / rows as f64) as f32) * alpha;
        }
        let row_mean = (row.iter().map(|&x| x as f64).sum::<f64>() / rows as f64) as f32;
        (
            row.iter().map(|&r| 1.0 / (r / row_mean).sqrt()).collect(),
            col.iter().map(|&c| 1.0 / c.sqrt()).collect(),
        )
    } else {
        for (v, &x) in row.iter_mut().zip(g) {
            *v = *v * beta2t + sq(x) * alpha;
        }
        (vec![], row.iter().map(|&v| 1.0 / v.sqrt()).collect())
    };
    // The update is (r_factor[row] · c_factor[col]) · g, or c_factor[i] · g for a vector. Passes
    // go row by row (a chunk is a whole number of rows), so no index is divided per element.
    let (chunk, unit) = if factored {
        let rows_per_chunk = (CHUNK / cols.max(1)).max(1);
        (rows_per_chunk * cols, cols)
    } else {
        (CHUNK, CHUNK)
    };
    let row_factor = |k: usize, u: usize| {
        if factored {
            r_factor[k * (chunk / cols) + u]
        } else {
            1.0
        }
    };
    let col_factors = |k: usize| -> &[f32] {
        if factored {
            &c_factor
        } else {
            &c_factor[k * chunk..]
        }
    };
    let scaled = |x: f32| if scale == 1.0 { x } else { x * scale };
    // RMS of the update, then the clipped, scaled update applied in one more pass.
    let parts: Vec<f64> = g
        .par_chunks(chunk)
        .enumerate()
        .map(|(k, c)| {
            let cf = col_factors(k);
            let mut s = 0f64;
            for (u, g_row) in c.chunks(unit).enumerate() {
                let rf = row_factor(k, u);
                s += g_row
                    .iter()
                    .zip(cf)
                    .map(|(&x, &cf)| {
                        let u = ((rf * cf) * scaled(x)) as f64;
                        u * u
                    })
                    .sum::<f64>();
            }
            s
        })
        .collect();
    let update_rms = (parts.iter().sum::<f64>() / (rows * cols) as f64).sqrt();
    let denom = ((update_rms / c.clip_threshold) as f32).max(1.0);
    let lr32 = lr as f32;
    let decay = (-c.weight_decay * lr) as f32;
    let beta1 = c.beta1.map(|b| (b as f32, (1.0 - b) as f32));
    let apply = |k: usize, p: &mut [f32], g: &[f32], mut m: Option<&mut [f32]>| {
        let cf = col_factors(k);
        for (u, (p_row, g_row)) in p.chunks_mut(unit).zip(g.chunks(unit)).enumerate() {
            let rf = row_factor(k, u);
            for (j, (p, &x)) in p_row.iter_mut().zip(g_row).enumerate() {
                let mut upd = (((rf * cf[j]) * scaled(x)) / denom) * lr32;
                if let (Some((b1, w)), Some(m)) = (beta1, m.as_deref_mut()) {
                    let m = &mut m[u * unit + j];
                    *m = *m * b1 + upd * w;
                    upd = *m;
                }
                if decay != 0.0 {
                    *p += *p * decay;
                }
                *p += -upd;
            }
        }
    };
    let chunks = p.par_chunks_mut(chunk).zip(g.par_chunks(chunk)).enumerate();
    if beta1.is_some() {
        chunks
            .zip(exp_avg.par_chunks_mut(chunk))
            .for_each(|((k, (p, g)), m)| apply(k, p, g, Some(m)));
    } else {
        chunks.for_each(|(k, (p, g))| apply(k, p, g, None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/optim_golden.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }

    /// Runs the fixture's gradient sequence through `config` and compares every step's
    /// parameters with torch's.
    fn replay(case: &serde_json::Value, config: OptimizerConfig, clip: Option<f64>) {
        let mut opt = Optimizer::new(config).unwrap();
        for (pi, param) in case["params"].as_array().unwrap().iter().enumerate() {
            let shape: Vec<usize> = param["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let (rows, cols) = if shape.len() == 1 {
                (1, shape[0])
            } else {
                (shape[0], shape[1])
            };
            let mut p = floats(&param["init"]);
            let lrs = floats(&case["lrs"]);
            for (s, step) in param["steps"].as_array().unwrap().iter().enumerate() {
                let g = floats(&step["grad"]);
                let scale = match clip {
                    Some(max) => clip_factor(&[&g], max).1,
                    None => 1.0,
                };
                opt.step(
                    &format!("p{pi}"),
                    &mut p,
                    &g,
                    (rows, cols),
                    lrs[s] as f64,
                    scale,
                )
                .unwrap();
                let want = floats(&step["param"]);
                for (i, (a, b)) in p.iter().zip(&want).enumerate() {
                    let tol = 2e-6 * b.abs().max(1.0);
                    assert!(
                        (a - b).abs() <= tol,
                        "param {pi} step {s} element {i}: ours {a}, torch {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn adafactor_matches_transformers() {
        let f = fixture();
        replay(
            &f["adafactor"],
            OptimizerConfig::Adafactor(AdafactorConfig::default()),
            Some(1.0),
        );
    }

    #[test]
    fn adafactor_with_momentum_decay_and_parameter_scaling_matches_transformers() {
        let f = fixture();
        replay(
            &f["adafactor_variant"],
            OptimizerConfig::Adafactor(AdafactorConfig {
                beta1: Some(0.9),
                weight_decay: 0.1,
                scale_parameter: true,
                ..AdafactorConfig::default()
            }),
            None,
        );
    }

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

    /// Adafactor written the plain way (f64, no chunks), for shapes spanning several chunks.
    fn naive_adafactor(p: &mut [f64], g: &[f64], rows: usize, cols: usize, lr: f64, steps: usize) {
        let (mut r, mut c, mut v) = (vec![0f64; rows], vec![0f64; cols], vec![0f64; cols]);
        for t in 1..=steps {
            let b = 1.0 - (t as f64).powf(-0.8);
            let u: Vec<f64> = if rows > 1 {
                for i in 0..rows {
                    let m = (0..cols)
                        .map(|j| g[i * cols + j].powi(2) + 1e-30)
                        .sum::<f64>()
                        / cols as f64;
                    r[i] = b * r[i] + (1.0 - b) * m;
                }
                for j in 0..cols {
                    let m = (0..rows)
                        .map(|i| g[i * cols + j].powi(2) + 1e-30)
                        .sum::<f64>()
                        / rows as f64;
                    c[j] = b * c[j] + (1.0 - b) * m;
                }
                let rm = r.iter().sum::<f64>() / rows as f64;
                (0..rows * cols)
                    .map(|k| g[k] / (r[k / cols] / rm).sqrt() / c[k % cols].sqrt())
                    .collect()
            } else {
                for j in 0..cols {
                    v[j] = b * v[j] + (1.0 - b) * (g[j].powi(2) + 1e-30);
                }
                (0..cols).map(|j| g[j] / v[j].sqrt()).collect()
            };
            let rms = (u.iter().map(|x| x * x).sum::<f64>() / u.len() as f64).sqrt();
            let d = rms.max(1.0);
            p.iter_mut().zip(&u).for_each(|(p, u)| *p -= lr * u / d);
        }
    }

    #[test]
    fn adafactor_over_many_chunks_matches_the_plain_formula() {
        let mut rng = crate::sampling::Rng::new(5);
        for (rows, cols) in [(1000usize, 40usize), (3, 20000), (1, 50000)] {
            let n = rows * cols;
            let g: Vec<f32> = (0..n)
                .map(|_| (rng.next_f64() as f32 - 0.5) * 0.1)
                .collect();
            let mut p: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32).collect();
            let mut q: Vec<f64> = p.iter().map(|&x| x as f64).collect();
            let mut opt = Optimizer::new(OptimizerConfig::default()).unwrap();
            for _ in 0..3 {
                opt.step("w", &mut p, &g, (rows, cols), 1e-2, 1.0).unwrap();
            }
            let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            naive_adafactor(&mut q, &g64, rows, cols, 1e-2, 3);
            for (i, (a, b)) in p.iter().zip(&q).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 2e-6,
                    "{rows}x{cols} element {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn state_round_trips_through_export() {
        let mut a = Optimizer::new(OptimizerConfig::default()).unwrap();
        let mut p = vec![0.5f32; 12];
        let g: Vec<f32> = (0..12).map(|i| i as f32 * 0.1 - 0.4).collect();
        a.step("w", &mut p, &g, (3, 4), 1e-2, 1.0).unwrap();
        let (bufs, steps) = a.export();
        let mut b = Optimizer::new(OptimizerConfig::default()).unwrap();
        b.import(
            bufs.into_iter().map(|(n, (_, v))| (n, v)).collect(),
            &steps,
            &BTreeMap::from([("w".to_string(), (3, 4))]),
        )
        .unwrap();
        let mut q = p.clone();
        a.step("w", &mut p, &g, (3, 4), 1e-2, 1.0).unwrap();
        b.step("w", &mut q, &g, (3, 4), 1e-2, 1.0).unwrap();
        assert_eq!(p, q);
    }
}
