//! Optimizers as fused passes over flat f32 buffers (docs/origin/brief.md §2, trap 3: tensor-op updates of
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

/// Interleaved partial sums within a run of values (a chunk or a row): value `j` goes to
/// accumulator `j % LANES`, and the accumulators are added in a fixed tree. The order depends
/// only on the data's length, so it vectorizes and stays deterministic.
const LANES: usize = 8;

/// Adds `LANES` partial sums in a fixed order.
#[inline]
fn lanes_sum(a: [f64; LANES]) -> f64 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// `Σ x²` of a run of values, in f64.
fn run_sum_squares(x: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for k in 0..LANES {
            let v = c[k] as f64;
            acc[k] += v * v;
        }
    }
    let mut s = lanes_sum(acc);
    for &v in it.remainder() {
        s += (v as f64) * (v as f64);
    }
    s
}

/// `Σ x²` of a buffer, in f64, chunked deterministically.
pub fn sum_squares(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(CHUNK).map(run_sum_squares).collect();
    parts.iter().sum()
}

/// The clipping factor of `torch.nn.utils.clip_grad_norm_` for a total gradient norm:
/// `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_coef(norm: f64, max_norm: f64) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0) as f32
}

/// Gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`: the total L2 norm of all
/// gradients and the factor `min(1, max_norm / (norm + 1e-6))` to multiply them by.
pub fn clip_factor(grads: &[&[f32]], max_norm: f64) -> (f64, f32) {
    let norm = grads.iter().map(|g| sum_squares(g)).sum::<f64>().sqrt();
    (norm, clip_coef(norm, max_norm))
}

/// Rows of a `cols`-wide matrix per chunk of a parallel pass (a chunk is whole rows).
fn rows_per_chunk(cols: usize) -> usize {
    (CHUNK / cols.max(1)).max(1)
}

/// What one read of a gradient yields before the step: its `Σ g²` (for the clipping norm) and,
/// for a matrix under Adafactor, the row and column sums of `g²` (its factored statistics), so
/// that clipping and the second-moment update share one pass. Made by [`Optimizer::grad_stats`].
#[derive(Debug, Clone)]
pub struct GradStats {
    /// `Σ g²` over the whole buffer.
    pub sum_sq: f64,
    /// Row sums and column sums of `g²` (Adafactor, `rows > 1` only).
    factored: Option<(Vec<f64>, Vec<f64>)>,
}

/// Row sums of `g²` of a block of whole rows into `rs`, column sums added into `col`.
fn block_sum_squares(rs: &mut [f64], col: &mut [f64], block: &[f32]) {
    for (r, g_row) in rs.iter_mut().zip(block.chunks(col.len())) {
        let mut acc = [0f64; LANES];
        let mut gc = g_row.chunks_exact(LANES);
        let mut cc = col.chunks_exact_mut(LANES);
        for (g8, c8) in (&mut gc).zip(&mut cc) {
            for k in 0..LANES {
                let v = g8[k] as f64;
                let u = v * v;
                c8[k] += u;
                acc[k] += u;
            }
        }
        let mut s = lanes_sum(acc);
        for (&v, c) in gc.remainder().iter().zip(cc.into_remainder()) {
            let u = (v as f64) * (v as f64);
            *c += u;
            s += u;
        }
        *r = s;
    }
}

/// Row sums and column sums of `g²` of a `[rows, cols]` matrix in one pass: each chunk of rows
/// writes its rows' sums and a partial column sum; the partials are added in chunk order.
fn matrix_sum_squares(g: &[f32], rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>) {
    let rpc = rows_per_chunk(cols);
    let mut row_sums = vec![0f64; rows];
    let parts: Vec<Vec<f64>> = row_sums
        .par_chunks_mut(rpc)
        .zip(g.par_chunks(rpc * cols))
        .map(|(rs, block)| {
            let mut col = vec![0f64; cols];
            block_sum_squares(rs, &mut col, block);
            col
        })
        .collect();
    let mut col_sums = vec![0f64; cols];
    for part in &parts {
        col_sums.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    (row_sums, col_sums)
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

    /// Reads `grad` (`[rows, cols]`) once for what the step needs before it can run: `Σ g²`
    /// for the clipping norm and, for an Adafactor matrix, its factored statistics.
    pub fn grad_stats(&self, grad: &[f32], (rows, cols): (usize, usize)) -> GradStats {
        match &self.config {
            OptimizerConfig::Adafactor(_) if rows > 1 && grad.len() == rows * cols => {
                let (row_sums, col_sums) = matrix_sum_squares(grad, rows, cols);
                GradStats {
                    sum_sq: row_sums.iter().sum(),
                    factored: Some((row_sums, col_sums)),
                }
            }
            _ => GradStats {
                sum_sq: sum_squares(grad),
                factored: None,
            },
        }
    }

    /// Updates `param` (`[rows, cols]`, row-major) with `grad × grad_scale` at learning rate `lr`.
    pub fn step(
        &mut self,
        name: &str,
        param: &mut [f32],
        grad: &[f32],
        shape: (usize, usize),
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        let stats = self.grad_stats(grad, shape);
        self.step_with(name, param, grad, shape, lr, grad_scale, &stats)
    }

    /// [`Optimizer::step`] with the gradient's statistics already read by
    /// [`Optimizer::grad_stats`] (of this same `grad`).
    #[allow(clippy::too_many_arguments)]
    pub fn step_with(
        &mut self,
        name: &str,
        param: &mut [f32],
        grad: &[f32],
        (rows, cols): (usize, usize),
        lr: f64,
        grad_scale: f32,
        stats: &GradStats,
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
                let sums = match &stats.factored {
                    Some((r, c)) if rows > 1 => {
                        ensure!(
                            r.len() == rows && c.len() == cols,
                            "parameter '{name}': gradient statistics of another shape"
                        );
                        Some((&r[..], &c[..]))
                    }
                    _ => None,
                };
                adafactor_step(
                    c,
                    &mut entry.2,
                    param,
                    grad,
                    (rows, cols),
                    lr,
                    grad_scale,
                    sums,
                )
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

#[allow(clippy::too_many_arguments)]
fn adafactor_step(
    c: &AdafactorConfig,
    state: &mut State,
    p: &mut [f32],
    g: &[f32],
    (rows, cols): (usize, usize),
    sched_lr: f64,
    scale: f32,
    sums: Option<(&[f64], &[f64])>,
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
    let scaled = |x: f32| if scale == 1.0 { x } else { x * scale };
    let factored = rows > 1;
    // The clipping factor applies to g before Adafactor squares it: mean((s·g)² + eps₁) =
    // s²·Σg²/n + eps₁, from the sums of g² read before the step.
    let s2 = (scale as f64) * (scale as f64);
    let (r_factor, c_factor): (Vec<f32>, Vec<f32>) = if factored {
        let owned;
        let (row_sums, col_sums) = match sums {
            Some(s) => s,
            None => {
                owned = matrix_sum_squares(g, rows, cols);
                (&owned.0[..], &owned.1[..])
            }
        };
        let mean = |sum: f64, n: usize| (s2 * sum / n as f64 + eps1 as f64) as f32;
        for (r, &sum) in row.iter_mut().zip(row_sums) {
            *r = *r * beta2t + mean(sum, cols) * alpha;
        }
        for (cv, &sum) in col.iter_mut().zip(col_sums) {
            *cv = *cv * beta2t + mean(sum, rows) * alpha;
        }
        let row_mean = (row.iter().map(|&x| x as f64).sum::<f64>() / rows as f64) as f32;
        (
            row.iter().map(|&r| 1.0 / (r / row_mean).sqrt()).collect(),
            col.iter().map(|&c| 1.0 / c.sqrt()).collect(),
        )
    } else {
        for (v, &x) in row.iter_mut().zip(g) {
            let x = scaled(x);
            *v = *v * beta2t + (x * x + eps1) * alpha;
        }
        (vec![], row.iter().map(|&v| 1.0 / v.sqrt()).collect())
    };
    // The update is (r_factor[row] · c_factor[col]) · g, or c_factor[i] · g for a vector. Passes
    // go row by row (a chunk is a whole number of rows), so no index is divided per element.
    let (chunk, unit) = if factored {
        (rows_per_chunk(cols) * cols, cols)
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
    // RMS of the update: Σ (rf·cf·s·g)² = s² Σ_rows rf² Σ_cols (cf·g)², in f64.
    let cf64: Vec<f64> = c_factor.iter().map(|&x| x as f64).collect();
    let parts: Vec<f64> = g
        .par_chunks(chunk)
        .enumerate()
        .map(|(k, block)| {
            let cf = if factored {
                &cf64[..]
            } else {
                &cf64[k * chunk..]
            };
            let mut s = 0f64;
            for (u, g_row) in block.chunks(unit).enumerate() {
                let rf = row_factor(k, u) as f64;
                let mut acc = [0f64; LANES];
                let mut gc = g_row.chunks_exact(LANES);
                let mut fc = cf.chunks_exact(LANES);
                for (g8, f8) in (&mut gc).zip(&mut fc) {
                    for k in 0..LANES {
                        let v = f8[k] * g8[k] as f64;
                        acc[k] += v * v;
                    }
                }
                let mut r = lanes_sum(acc);
                for (&x, &f) in gc.remainder().iter().zip(fc.remainder()) {
                    let v = f * x as f64;
                    r += v * v;
                }
                s += (rf * rf) * r;
            }
            s
        })
        .collect();
    let update_rms = (s2 * parts.iter().sum::<f64>() / (rows * cols) as f64).sqrt();
    let denom = ((update_rms / c.clip_threshold) as f32).max(1.0);
    let lr32 = lr as f32;
    let decay = (-c.weight_decay * lr) as f32;
    let beta1 = c.beta1.map(|b| (b as f32, (1.0 - b) as f32));
    let apply = |k: usize, p: &mut [f32], g: &[f32], mut m: Option<&mut [f32]>| {
        let cf = col_factors(k);
        for (u, (p_row, g_row)) in p.chunks_mut(unit).zip(g.chunks(unit)).enumerate() {
            let rf = row_factor(k, u);
            let update = |j: usize, x: f32| (((rf * cf[j]) * scaled(x)) / denom) * lr32;
            if beta1.is_none() && decay == 0.0 {
                // The common case (the original's settings), kept branch-free to vectorize.
                for (j, (p, &x)) in p_row.iter_mut().zip(g_row).enumerate() {
                    *p += -update(j, x);
                }
                continue;
            }
            for (j, (p, &x)) in p_row.iter_mut().zip(g_row).enumerate() {
                let mut upd = update(j, x);
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
    /// One gradient per step.
    fn naive_adafactor(p: &mut [f64], grads: &[Vec<f64>], rows: usize, cols: usize, lr: f64) {
        let (mut r, mut c, mut v) = (vec![0f64; rows], vec![0f64; cols], vec![0f64; cols]);
        for (t, g) in (1..).zip(grads) {
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
        let mut rng = crate::util::rng::Rng::new(5);
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
            naive_adafactor(&mut q, &vec![g64; 3], rows, cols, 1e-2);
            for (i, (a, b)) in p.iter().zip(&q).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 2e-6,
                    "{rows}x{cols} element {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn clipped_steps_from_gradient_statistics_match_the_plain_formula() {
        // The clipping factor folds into the statistics read before the step (mean((s·g)²) =
        // s²·mean(g²)); gradients of changing size make the factor matter to the moments.
        let mut rng = crate::util::rng::Rng::new(9);
        for (rows, cols) in [(700usize, 45usize), (1, 30000)] {
            let n = rows * cols;
            let mut p: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32).collect();
            let mut q: Vec<f64> = p.iter().map(|&x| x as f64).collect();
            let mut opt = Optimizer::new(OptimizerConfig::default()).unwrap();
            let mut clipped = vec![];
            for size in [1.0f32, 8.0, 0.5] {
                let g: Vec<f32> = (0..n)
                    .map(|_| (rng.next_f64() as f32 - 0.5) * size)
                    .collect();
                let stats = opt.grad_stats(&g, (rows, cols));
                let direct = sum_squares(&g);
                assert!((stats.sum_sq - direct).abs() <= 1e-12 * direct);
                let scale = clip_coef(stats.sum_sq.sqrt(), 1.0);
                assert!(scale < 0.1, "the test must clip");
                opt.step_with("w", &mut p, &g, (rows, cols), 1e-2, scale, &stats)
                    .unwrap();
                clipped.push(g.iter().map(|&x| (x * scale) as f64).collect::<Vec<_>>());
            }
            naive_adafactor(&mut q, &clipped, rows, cols, 1e-2);
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
