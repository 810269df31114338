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
//!
//! [`OptimizerConfig`] and [`Optimizer`] (state, export and import) live here with the passes
//! every optimizer shares (the clipping norm); the kernels are in `adafactor` and `adamw`.

mod adafactor;
mod adamw;
mod device;

pub use adafactor::AdafactorConfig;
pub use adamw::AdamWConfig;

use adafactor::{adafactor_step, matrix_sum_squares};
use adamw::adamw_step;
use anyhow::{bail, ensure, Result};
use device::DeviceState;
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
/// `min(1, max_norm / (norm + 1e-6))`; 1 (no clipping) when `max_norm ≤ 0`.
pub fn clip_coef(norm: f64, max_norm: f64) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
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
                let (eps1, eps2) = c.eps;
                ensure!(
                    [eps1, eps2].iter().all(|e| e.is_finite() && *e >= 0.0),
                    "adafactor eps must be two finite numbers >= 0 (the original uses [1e-30, 1e-3]), got [{eps1}, {eps2}]"
                );
                ensure!(
                    c.clip_threshold.is_finite() && c.clip_threshold > 0.0,
                    "adafactor clip_threshold must be a finite number > 0, got {}",
                    c.clip_threshold
                );
                ensure!(
                    c.decay_rate.is_finite() && c.decay_rate < 0.0,
                    "adafactor decay_rate must be a finite number < 0 (the original uses -0.8), got {}",
                    c.decay_rate
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
                ensure!(
                    c.eps.is_finite() && c.eps > 0.0,
                    "adamw eps must be a finite number > 0, got {}",
                    c.eps
                );
            }
        }
        Ok(())
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
    /// The generic kernels' states, on `device`.
    device_states: BTreeMap<String, (usize, usize, DeviceState)>,
    /// Where [`Optimizer::step_tensor`] keeps its state (`None`: host buffers only).
    device: Option<candle_core::Device>,
}

impl Optimizer {
    /// A fresh optimizer; parameter states are created on their first step.
    pub fn new(config: OptimizerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            states: BTreeMap::new(),
            device_states: BTreeMap::new(),
            device: None,
        })
    }

    /// A fresh optimizer for `kernels`: host buffers for the fast ones, state on `device` for
    /// the generic ones.
    pub fn for_kernels(
        config: OptimizerConfig,
        kernels: crate::nn::device::Kernels,
        device: &candle_core::Device,
    ) -> Result<Self> {
        Ok(Self {
            device: (kernels == crate::nn::device::Kernels::Generic).then(|| device.clone()),
            ..Self::new(config)?
        })
    }

    /// Whether the state lives on a device (the generic kernels' [`Optimizer::step_tensor`]).
    pub fn is_on_device(&self) -> bool {
        self.device.is_some()
    }

    /// Updates the variable `var` (`[rows, cols]`) with `grad × grad_scale` at `lr` by tensor
    /// ops on its device, the state staying there.
    pub fn step_tensor(
        &mut self,
        name: &str,
        var: &candle_core::Var,
        grad: &candle_core::Tensor,
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        let shape = match var.dims() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            d => bail!("parameter '{name}' has shape {d:?}; expected a matrix"),
        };
        let device = var.device().clone();
        let entry = match self.device_states.entry(name.to_string()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let state = match &self.config {
                    OptimizerConfig::Adafactor(c) => DeviceState::adafactor(c, shape, &device)?,
                    OptimizerConfig::Adamw(_) => DeviceState::adamw(shape, &device)?,
                };
                e.insert((shape.0, shape.1, state))
            }
        };
        ensure!(
            (entry.0, entry.1) == shape,
            "parameter '{name}' changed shape from {}×{} to {}×{}",
            entry.0,
            entry.1,
            shape.0,
            shape.1
        );
        match &self.config {
            OptimizerConfig::Adafactor(c) => {
                device::adafactor_step(c, &mut entry.2, var, grad, lr, grad_scale)
            }
            OptimizerConfig::Adamw(c) => {
                device::adamw_step(c, &mut entry.2, var, grad, lr, grad_scale)
            }
        }
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
    /// `NAME.v`, each with its shape) and step counts, for a checkpoint; the same names
    /// whichever kernels made them.
    pub fn export(&self) -> Result<(super::Buffers, BTreeMap<String, u64>)> {
        let mut bufs = super::Buffers::new();
        let mut steps = BTreeMap::new();
        for (name, (rows, cols, state)) in &self.device_states {
            let host =
                |t: &candle_core::Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
            let full = vec![*rows, *cols];
            steps.insert(name.clone(), state.step());
            match state {
                DeviceState::Adafactor {
                    row, col, exp_avg, ..
                } => {
                    bufs.insert(format!("{name}.row"), (vec![row.elem_count()], host(row)?));
                    bufs.insert(format!("{name}.col"), (vec![col.elem_count()], host(col)?));
                    if let Some(m) = exp_avg {
                        bufs.insert(format!("{name}.exp_avg"), (full, host(m)?));
                    }
                }
                DeviceState::AdamW { m, v, .. } => {
                    bufs.insert(format!("{name}.m"), (full.clone(), host(m)?));
                    bufs.insert(format!("{name}.v"), (full, host(v)?));
                }
            }
        }
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
        Ok((bufs, steps))
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
        self.device_states.clear();
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
            match &self.device {
                None => {
                    self.states.insert(name.clone(), (rows, cols, state));
                }
                Some(device) => {
                    let on = |v: Vec<f32>, shape: &[usize]| -> Result<candle_core::Tensor> {
                        Ok(candle_core::Tensor::from_vec(v, shape, device)?)
                    };
                    let state = match state {
                        State::Adafactor {
                            step,
                            row,
                            col,
                            exp_avg,
                        } => DeviceState::Adafactor {
                            step,
                            row: on(row.clone(), &[row.len()])?,
                            col: on(col.clone(), &[col.len()])?,
                            exp_avg: (!exp_avg.is_empty())
                                .then(|| on(exp_avg, &[rows, cols]))
                                .transpose()?,
                        },
                        State::AdamW { step, m, v } => DeviceState::AdamW {
                            step,
                            m: on(m, &[rows, cols])?,
                            v: on(v, &[rows, cols])?,
                        },
                    };
                    self.device_states.insert(name.clone(), (rows, cols, state));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn fixture() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/optim_golden.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    pub(super) fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }

    /// Runs the fixture's gradient sequence through `config` and compares every step's
    /// parameters with torch's.
    pub(super) fn replay(case: &serde_json::Value, config: OptimizerConfig, clip: Option<f64>) {
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
    fn state_round_trips_through_export() {
        let mut a = Optimizer::new(OptimizerConfig::default()).unwrap();
        let mut p = vec![0.5f32; 12];
        let g: Vec<f32> = (0..12).map(|i| i as f32 * 0.1 - 0.4).collect();
        a.step("w", &mut p, &g, (3, 4), 1e-2, 1.0).unwrap();
        let (bufs, steps) = a.export().unwrap();
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
