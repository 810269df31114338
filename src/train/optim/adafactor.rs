//! HF Adafactor (see the module above for the formulas): its settings, its factored
//! statistics of `g²` and its step.

use super::{lanes_sum, rows_per_chunk, sum_squares, State, CHUNK, LANES};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

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
pub(super) fn matrix_sum_squares(g: &[f32], rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>) {
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

/// RMS of a buffer: `‖x‖ / √n`.
fn rms(x: &[f32]) -> f64 {
    (sum_squares(x) / x.len().max(1) as f64).sqrt()
}

/// One Adafactor step of `p` (`[rows, cols]`) with `g × scale`: the learning rate, the second
/// moments and their factors, the update's RMS for its clipping, then the fused update.
/// `sums` are the row and column sums of `g²` when [`super::Optimizer::grad_stats`] read them.
#[allow(clippy::too_many_arguments)]
pub(super) fn adafactor_step(
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
    let lr = step_lr(c, t, sched_lr, p);
    let moments = Moments::of(c, t);
    let factors = if rows > 1 {
        let (r_factor, c_factor) = moments.factored(row, col, g, (rows, cols), scale, sums);
        Factors::matrix(cols, r_factor, c_factor)
    } else {
        Factors::vector(moments.full(row, g, scale))
    };
    let update_rms = factors.update_rms(g, scale);
    let apply = Apply {
        factors: &factors,
        scale,
        denom: ((update_rms / c.clip_threshold) as f32).max(1.0),
        lr32: lr as f32,
        decay: (-c.weight_decay * lr) as f32,
        beta1: c.beta1.map(|b| (b as f32, (1.0 - b) as f32)),
    };
    let chunk = factors.chunk;
    let chunks = p.par_chunks_mut(chunk).zip(g.par_chunks(chunk)).enumerate();
    if apply.beta1.is_some() {
        chunks
            .zip(exp_avg.par_chunks_mut(chunk))
            .for_each(|((k, (p, g)), m)| apply.chunk(k, p, g, Some(m)));
    } else {
        chunks.for_each(|(k, (p, g))| apply.chunk(k, p, g, None));
    }
}

/// The step's learning rate: the scheduled one or, with `relative_step`, `min(1e-6·t if
/// warmup_init else 1e-2, 1/√t)`; times `max(eps₂, RMS(p))` with `scale_parameter`.
fn step_lr(c: &AdafactorConfig, t: f64, sched_lr: f64, p: &[f32]) -> f64 {
    let mut lr = sched_lr;
    if c.relative_step {
        let min_step = if c.warmup_init { 1e-6 * t } else { 1e-2 };
        lr = min_step.min(1.0 / t.sqrt());
    }
    if c.scale_parameter {
        lr *= c.eps.1.max(rms(p));
    }
    lr
}

/// The second-moment update of step `t`: `x ← β₂ₜ·x + (1 − β₂ₜ)·(mean of g² + eps₁)`.
struct Moments {
    beta2t: f32,
    alpha: f32,
    eps1: f32,
}

impl Moments {
    fn of(c: &AdafactorConfig, t: f64) -> Self {
        // torch: `row.mul_(beta2t).add_(mean, alpha=1.0 - beta2t)`, both scalars f64 → f32.
        let beta2t = 1.0 - t.powf(c.decay_rate);
        Self {
            beta2t: beta2t as f32,
            alpha: (1.0 - beta2t) as f32,
            eps1: c.eps.0 as f32,
        }
    }

    /// Updates a matrix's factored moments `row` (`R`) and `col` (`C`) from the sums of `g²`
    /// (`sums`, or read now) and returns the factors `rsqrt(R/mean(R))` and `rsqrt(C)`.
    fn factored(
        &self,
        row: &mut [f32],
        col: &mut [f32],
        g: &[f32],
        (rows, cols): (usize, usize),
        scale: f32,
        sums: Option<(&[f64], &[f64])>,
    ) -> (Vec<f32>, Vec<f32>) {
        let Self {
            beta2t,
            alpha,
            eps1,
        } = *self;
        let owned;
        let (row_sums, col_sums) = match sums {
            Some(s) => s,
            None => {
                owned = matrix_sum_squares(g, rows, cols);
                (&owned.0[..], &owned.1[..])
            }
        };
        // The clipping factor applies to g before Adafactor squares it: mean((s·g)² + eps₁) =
        // s²·Σg²/n + eps₁, from the sums of g² read before the step.
        let s2 = (scale as f64) * (scale as f64);
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
    }

    /// Updates a vector's full moment `v` from `(scale·g)²` and returns its factor `rsqrt(v)`.
    fn full(&self, v: &mut [f32], g: &[f32], scale: f32) -> Vec<f32> {
        for (v, &x) in v.iter_mut().zip(g) {
            let x = if scale == 1.0 { x } else { x * scale };
            *v = *v * self.beta2t + (x * x + self.eps1) * self.alpha;
        }
        v.iter().map(|&v| 1.0 / v.sqrt()).collect()
    }
}

/// The update's factors, `r_factor[row] · c_factor[col]` for a matrix or `c_factor[i]` for a
/// vector, and how a pass walks them: a chunk is a whole number of rows (`unit` values each),
/// so no index is divided per element.
struct Factors {
    factored: bool,
    /// Values per chunk of a parallel pass and per row within it.
    chunk: usize,
    unit: usize,
    rows_per_chunk: usize,
    r_factor: Vec<f32>,
    c_factor: Vec<f32>,
}

impl Factors {
    fn matrix(cols: usize, r_factor: Vec<f32>, c_factor: Vec<f32>) -> Self {
        let rpc = rows_per_chunk(cols);
        Self {
            factored: true,
            chunk: rpc * cols,
            unit: cols,
            rows_per_chunk: rpc,
            r_factor,
            c_factor,
        }
    }

    fn vector(c_factor: Vec<f32>) -> Self {
        Self {
            factored: false,
            chunk: CHUNK,
            unit: CHUNK,
            rows_per_chunk: 1,
            r_factor: vec![],
            c_factor,
        }
    }

    /// The row factor of row `u` of chunk `k` (1 for a vector).
    #[inline]
    fn row_factor(&self, k: usize, u: usize) -> f32 {
        if self.factored {
            self.r_factor[k * self.rows_per_chunk + u]
        } else {
            1.0
        }
    }

    /// The column factors from the start of chunk `k`'s rows.
    #[inline]
    fn col_factors(&self, k: usize) -> &[f32] {
        if self.factored {
            &self.c_factor
        } else {
            &self.c_factor[k * self.chunk..]
        }
    }

    /// RMS of the unclipped update: `Σ (rf·cf·s·g)² = s² Σ_rows rf² Σ_cols (cf·g)²`, in f64.
    fn update_rms(&self, g: &[f32], scale: f32) -> f64 {
        let cf64: Vec<f64> = self.c_factor.iter().map(|&x| x as f64).collect();
        let parts: Vec<f64> = g
            .par_chunks(self.chunk)
            .enumerate()
            .map(|(k, block)| {
                let cf = if self.factored {
                    &cf64[..]
                } else {
                    &cf64[k * self.chunk..]
                };
                let mut s = 0f64;
                for (u, g_row) in block.chunks(self.unit).enumerate() {
                    let rf = self.row_factor(k, u) as f64;
                    s += (rf * rf) * run_weighted_sum_squares(g_row, cf);
                }
                s
            })
            .collect();
        let s2 = (scale as f64) * (scale as f64);
        (s2 * parts.iter().sum::<f64>() / g.len() as f64).sqrt()
    }
}

/// `Σ (f·x)²` of a run of values with their factors (`f` at least as long as `x`), in f64.
fn run_weighted_sum_squares(x: &[f32], f: &[f64]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut xc = x.chunks_exact(LANES);
    let mut fc = f.chunks_exact(LANES);
    for (x8, f8) in (&mut xc).zip(&mut fc) {
        for k in 0..LANES {
            let v = f8[k] * x8[k] as f64;
            acc[k] += v * v;
        }
    }
    let mut r = lanes_sum(acc);
    for (&x, &f) in xc.remainder().iter().zip(fc.remainder()) {
        let v = f * x as f64;
        r += v * v;
    }
    r
}

/// The fused update of one chunk: `p −= lr·(rf·cf·s·g)/denom`, through the first moment and
/// with decoupled weight decay when configured.
struct Apply<'a> {
    factors: &'a Factors,
    scale: f32,
    /// `max(1, RMS(update)/clip_threshold)`.
    denom: f32,
    lr32: f32,
    /// `−wd·lr`.
    decay: f32,
    /// `(β₁, 1 − β₁)`.
    beta1: Option<(f32, f32)>,
}

impl Apply<'_> {
    /// Updates chunk `k` of the parameter (`p`, its gradient `g`, its first moment `m`).
    fn chunk(&self, k: usize, p: &mut [f32], g: &[f32], mut m: Option<&mut [f32]>) {
        let Self {
            factors,
            scale,
            denom,
            lr32,
            decay,
            beta1,
        } = *self;
        let unit = factors.unit;
        let cf = factors.col_factors(k);
        let scaled = |x: f32| if scale == 1.0 { x } else { x * scale };
        for (u, (p_row, g_row)) in p.chunks_mut(unit).zip(g.chunks(unit)).enumerate() {
            let rf = factors.row_factor(k, u);
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
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fixture, replay};
    use super::super::{clip_coef, Optimizer, OptimizerConfig};
    use super::*;

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
}
