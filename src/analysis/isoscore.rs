//! IsoScore (Rudman, Gillman, Rayne & Eickhoff, Findings of ACL 2022): how evenly the variance
//! of a point cloud spreads over the dimensions of its space, from 0 (all of it on one axis) to
//! 1 (isotropic). Unlike the partition ratio and the mean cosine (`isotropy`), it is invariant
//! to rotation and to the mean of the cloud. Computed as PyPI `IsoScore` 2.0.1 does: the
//! spectrum of the sample covariance (ddof 1), scaled to norm √n, its distance from the
//! all-ones vector ("isotropy defect"), rescaled.

use super::{linalg, Embeddings};
use anyhow::Result;
use serde::Serialize;

/// IsoScore of every row, of the base rows and of the Wake rows (`None` for a group of fewer
/// than two rows or without variance).
#[derive(Debug, Clone, Serialize)]
pub struct IsoScores {
    pub all: Option<f64>,
    pub base: Option<f64>,
    pub wake: Option<f64>,
}

/// IsoScore of the covariance whose eigenvalues (or singular values) are `spectrum`: one per
/// dimension of the space, zeros included.
pub fn from_spectrum(spectrum: &[f64]) -> Option<f64> {
    let n = spectrum.len() as f64;
    let norm = spectrum.iter().map(|v| v * v).sum::<f64>().sqrt();
    if spectrum.len() < 2 || norm == 0.0 || !norm.is_finite() {
        return None;
    }
    let scale = n.sqrt() / norm;
    let l2 = spectrum
        .iter()
        .map(|v| (v.abs() * scale - 1.0).powi(2))
        .sum::<f64>()
        .sqrt();
    let defect = l2 / (2.0 * (n - n.sqrt())).sqrt();
    Some(((n - defect * defect * (n - n.sqrt())).powi(2) - n) / (n * (n - 1.0)))
}

/// IsoScore of the rows `x` (`n × dim`).
pub fn of_rows(x: &[f32], dim: usize) -> Result<Option<f64>> {
    let n = x.len() / dim.max(1);
    if n < 2 {
        return Ok(None);
    }
    let cov = linalg::covariance(x, n, dim)?;
    Ok(from_spectrum(&linalg::sym_eigen(cov, dim, false).values))
}

/// IsoScore of every row; the base and Wake groups' come from the spectra `pca` computed.
pub fn groups(
    e: &Embeddings,
    base_spectrum: &[f64],
    wake_spectrum: Option<&[f64]>,
) -> Result<IsoScores> {
    Ok(IsoScores {
        all: of_rows(e.slice(0..e.rows), e.dim)?,
        base: from_spectrum(base_spectrum),
        wake: wake_spectrum.and_then(from_spectrum),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isotropic_is_one_and_one_axis_is_zero() {
        assert!((from_spectrum(&[2.0; 8]).unwrap() - 1.0).abs() < 1e-12);
        let mut one = vec![0.0; 8];
        one[3] = 5.0;
        assert!(from_spectrum(&one).unwrap().abs() < 1e-12);
        assert_eq!(from_spectrum(&[0.0; 4]), None);
        assert_eq!(from_spectrum(&[1.0]), None);
    }

    #[test]
    fn it_ignores_rotation_and_mean() {
        // Points along x and y with variances 4 and 1, then rotated by 30° and shifted.
        let pts = [(2.0f64, 0.0f64), (-2.0, 0.0), (0.0, 1.0), (0.0, -1.0)];
        let (s, c) = (0.5f64, 3f64.sqrt() / 2.0);
        let plain: Vec<f32> = pts
            .iter()
            .flat_map(|&(x, y)| [x as f32, y as f32])
            .collect();
        let turned: Vec<f32> = pts
            .iter()
            .flat_map(|&(x, y)| [(c * x - s * y + 7.0) as f32, (s * x + c * y - 3.0) as f32])
            .collect();
        let a = of_rows(&plain, 2).unwrap().unwrap();
        let b = of_rows(&turned, 2).unwrap().unwrap();
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        // spectrum (8/3, 2/3): the formula by hand
        let want = from_spectrum(&[8.0 / 3.0, 2.0 / 3.0]).unwrap();
        assert!((a - want).abs() < 1e-6 && want > 0.0 && want < 1.0);
    }
}
