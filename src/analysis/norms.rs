//! Row norms, and the tests of Wake-row norms against base-row norms.

use super::{describe, has_wake_group, stats, Describe, Embeddings, FigureData, Layout};
use rayon::prelude::*;
use serde::Serialize;

/// Row norms and the tests comparing Wake rows with base rows.
#[derive(Debug, Clone, Serialize)]
pub struct Norms {
    pub all: Describe,
    pub base: Describe,
    pub wake: Option<Describe>,
    /// Tests of Wake norms against base norms; positive statistics mean Wake norms are larger.
    pub tests: Option<NormTests>,
}

/// The two-sample tests of Wake norms against base norms.
#[derive(Debug, Clone, Serialize)]
pub struct NormTests {
    pub welch: stats::Welch,
    pub mann_whitney: stats::MannWhitney,
    pub cohens_d: stats::CohensD,
    /// Coefficient of variation of Wake norms, `sd / mean` (lower = still spherical).
    pub wake_cv: f64,
}

/// Row norms (f64) of all rows.
pub fn row_norms(e: &Embeddings) -> Vec<f64> {
    e.data
        .par_chunks_exact(e.dim)
        .map(|r| {
            r.iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

/// Norms of all rows, of each group, and the tests when there are two Wake rows or more; the
/// norms go to `figures`.
pub fn norms(e: &Embeddings, layout: &Layout, figures: &mut FigureData) -> Norms {
    let all_norms = row_norms(e);
    let base_norms = all_norms[..layout.base_vocab].to_vec();
    let wake_norms = all_norms[layout.wake()].to_vec();
    let tests = has_wake_group(layout).then(|| {
        let d = describe(&wake_norms);
        NormTests {
            welch: stats::welch(&wake_norms, &base_norms),
            mann_whitney: stats::mann_whitney(&wake_norms, &base_norms),
            cohens_d: stats::cohens_d(&wake_norms, &base_norms),
            wake_cv: d.sd_population / d.mean,
        }
    });
    let norms = Norms {
        all: describe(&all_norms),
        base: describe(&base_norms),
        wake: (!wake_norms.is_empty()).then(|| describe(&wake_norms)),
        tests,
    };
    figures.base_norms = base_norms;
    figures.wake_norms = wake_norms;
    figures.all_norms = all_norms;
    figures.wake_range = layout.wake();
    norms
}
