//! PCA of each group on the full spectrum of its covariance.

use super::{has_wake_group, linalg, Embeddings, FigureData, Layout};
use anyhow::{bail, Result};
use serde::Serialize;

/// PCA of one group on the full spectrum of its covariance.
#[derive(Debug, Clone, Serialize)]
pub struct Pca {
    pub n_rows: usize,
    /// Components needed to reach 90% / 95% of the total variance (no cap).
    pub k90: usize,
    pub k95: usize,
    /// Share of the total variance on the first component.
    pub top1_share: f64,
    pub top10_ratios: Vec<f64>,
}

/// PCA of the base rows and (with two Wake rows or more) of the Wake rows.
#[derive(Debug, Clone, Serialize)]
pub struct PcaGroups {
    pub base: Pca,
    pub wake: Option<Pca>,
}

/// PCA of each group; the explained-variance ratios go to `figures`.
pub fn groups(e: &Embeddings, layout: &Layout, figures: &mut FigureData) -> Result<PcaGroups> {
    let (base, base_ratios) = pca(e.slice(0..layout.base_vocab), e.dim)?;
    let (wake, wake_ratios) = if has_wake_group(layout) {
        let (p, r) = pca(e.slice(layout.wake()), e.dim)?;
        (Some(p), r)
    } else {
        (None, Vec::new())
    };
    figures.pca_base_ratios = base_ratios;
    figures.pca_wake_ratios = wake_ratios;
    Ok(PcaGroups { base, wake })
}

/// Explained-variance ratios (descending) of the rows `x` on the full spectrum of their
/// covariance, and the summary numbers.
pub fn pca(x: &[f32], dim: usize) -> Result<(Pca, Vec<f64>)> {
    let n = x.len() / dim;
    if n < 2 {
        bail!("PCA needs at least 2 rows, got {n}");
    }
    let cov = linalg::covariance(x, n, dim)?;
    let eig = linalg::sym_eigen(cov, dim, false);
    let mut ev: Vec<f64> = eig.values.iter().rev().map(|v| v.max(0.0)).collect();
    // a covariance of n rows has rank ≤ n − 1: the rest is rounding noise
    for v in ev.iter_mut().skip(n - 1) {
        *v = 0.0;
    }
    let total: f64 = ev.iter().sum();
    let ratios: Vec<f64> = ev.iter().map(|v| v / total).collect();
    let k_at = |th: f64| {
        let mut c = 0.0;
        for (i, r) in ratios.iter().enumerate() {
            c += r;
            if c >= th {
                return i + 1;
            }
        }
        ratios.len()
    };
    Ok((
        Pca {
            n_rows: n,
            k90: k_at(0.90),
            k95: k_at(0.95),
            top1_share: ratios[0],
            top10_ratios: ratios.iter().take(10).copied().collect(),
        },
        ratios,
    ))
}
