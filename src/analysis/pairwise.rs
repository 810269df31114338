//! Pairwise cosine distributions of sampled base and Wake rows, and the KS test between the
//! base–base and the Wake–Wake cosines.

use super::{linalg, stats, unit_rows_f64, Embeddings, FigureData};
use anyhow::Result;
use serde::Serialize;

/// Count, mean and sample standard deviation of a set of pairwise cosines.
#[derive(Debug, Clone, Serialize)]
pub struct PairStats {
    pub n_pairs: usize,
    pub mean: f64,
    pub sd_sample: f64,
}

/// The pairwise cosine distributions and their KS test.
#[derive(Debug, Clone, Serialize)]
pub struct Pairwise {
    /// Rows sampled from each group.
    pub rows_per_group: usize,
    pub base_base: PairStats,
    pub wake_wake: PairStats,
    pub base_wake: PairStats,
    /// Two-sample KS test of the base–base cosines against the Wake–Wake cosines.
    pub ks_base_base_vs_wake_wake: stats::KolmogorovSmirnov,
}

/// The cosines among and between the sampled base rows `base` and Wake rows `wake`; the
/// cosines go to `figures`.
pub fn pairwise(
    e: &Embeddings,
    base: &[usize],
    wake: &[usize],
    figures: &mut FigureData,
) -> Result<Pairwise> {
    let (xb, xw) = (e.gather(base), e.gather(wake));
    let bb = pair_cosines(&xb, &xb, e.dim, true)?;
    let ww = pair_cosines(&xw, &xw, e.dim, true)?;
    let bw = pair_cosines(&xb, &xw, e.dim, false)?;
    let p = Pairwise {
        rows_per_group: base.len().min(wake.len()),
        base_base: pair_stats(&bb),
        wake_wake: pair_stats(&ww),
        base_wake: pair_stats(&bw),
        ks_base_base_vs_wake_wake: stats::ks_2samp(&bb, &ww),
    };
    figures.cos_base_base = bb;
    figures.cos_wake_wake = ww;
    figures.cos_base_wake = bw;
    Ok(p)
}

/// Cosines between the rows of `a` and `b` (unit-normalised in f64); with `same`, only the
/// strict upper triangle of `a` against itself.
pub fn pair_cosines(a: &[f32], b: &[f32], dim: usize, same: bool) -> Result<Vec<f64>> {
    let ua = unit_rows_f64(a, dim);
    let na = a.len() / dim;
    if same {
        let c = linalg::matmul_nt(&ua, na, &ua, na, dim)?;
        let mut out = Vec::with_capacity(na * na.saturating_sub(1) / 2);
        for i in 0..na {
            out.extend_from_slice(&c[i * na + i + 1..(i + 1) * na]);
        }
        Ok(out)
    } else {
        let ub = unit_rows_f64(b, dim);
        let nb = b.len() / dim;
        linalg::matmul_nt(&ua, na, &ub, nb, dim)
    }
}

fn pair_stats(x: &[f64]) -> PairStats {
    let (mean, var) = stats::mean_var(x, 1);
    PairStats {
        n_pairs: x.len(),
        mean,
        sd_sample: var.sqrt(),
    }
}
