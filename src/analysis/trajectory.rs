//! Trajectories of sampled Wake tokens across a run's snapshots (docs/origin/original-system.md §6.10,
//! with its mapping bugs gone: snapshot row i is Wake row `wake_start + i`, so the word is
//! `words[i]`). A 2-D PCA is fitted on the last snapshot's Wake rows and every frame is
//! projected with it.

use super::{describe, linalg, sample_indices, Describe, Embeddings, Vocabulary};
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Trajectory {
    pub steps: Vec<u64>,
    pub n_tokens: usize,
    /// Share of the last snapshot's Wake-row variance on the two plotted components.
    pub pca_variance_explained: [f64; 2],
    /// L2 distance in the full space from the first to the last snapshot, per sampled token.
    pub displacement_full: Describe,
    pub displacement_2d: Describe,
    /// Mean full-space distance from the first snapshot, per snapshot.
    pub mean_displacement_by_step: Vec<(u64, f64)>,
    pub most_mobile: Vec<(String, f64)>,
    pub most_stationary: Vec<(String, f64)>,
}

/// The plotted coordinates: `coords[frame][token] = (x, y)`.
#[derive(Debug, Clone, Default)]
pub struct TrajectoryPlot {
    pub steps: Vec<u64>,
    pub words: Vec<String>,
    pub coords: Vec<Vec<(f64, f64)>>,
}

/// `frames` are `(step, Wake rows)` sorted by step; `n_tokens` are sampled with `seed`.
pub fn trajectory(
    frames: &[(u64, Embeddings)],
    wake_start: usize,
    vocab: &Vocabulary,
    n_tokens: usize,
    seed: u64,
) -> Result<(Trajectory, TrajectoryPlot)> {
    let Some((_, last)) = frames.last() else {
        bail!("no snapshots to draw a trajectory from");
    };
    let (rows, dim) = (last.rows, last.dim);
    if let Some((step, f)) = frames.iter().find(|(_, f)| f.rows != rows || f.dim != dim) {
        bail!(
            "snapshot at step {step} is {} × {}, the last is {rows} × {dim}: snapshots of one run \
             must have the same shape",
            f.rows,
            f.dim
        );
    }
    if rows < 3 {
        bail!("snapshots hold {rows} Wake rows: too few for a 2-D PCA");
    }
    // PCA(2) on the last frame
    let cov = linalg::covariance(&last.data, rows, dim)?;
    let eig = linalg::sym_eigen(cov, dim, true);
    let total: f64 = eig.values.iter().map(|v| v.max(0.0)).sum();
    let pc1 = &eig.vectors[(dim - 1) * dim..dim * dim];
    let pc2 = &eig.vectors[(dim - 2) * dim..(dim - 1) * dim];
    let ev = [eig.values[dim - 1] / total, eig.values[dim - 2] / total];
    let mut mean = vec![0f64; dim];
    for r in last.data.chunks_exact(dim) {
        mean.iter_mut().zip(r).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= rows as f64);
    let mut rng = Rng::new(seed);
    let ids = sample_indices(&mut rng, rows, n_tokens);
    let project = |r: &[f32]| -> (f64, f64) {
        let (mut x, mut y) = (0.0, 0.0);
        for ((&v, m), (a, b)) in r.iter().zip(&mean).zip(pc1.iter().zip(pc2)) {
            let c = v as f64 - m;
            x += c * a;
            y += c * b;
        }
        (x, y)
    };
    let coords: Vec<Vec<(f64, f64)>> = frames
        .iter()
        .map(|(_, f)| ids.iter().map(|&i| project(f.row(i))).collect())
        .collect();
    let dist = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let first = &frames[0].1;
    let full: Vec<f64> = ids
        .iter()
        .map(|&i| dist(first.row(i), last.row(i)))
        .collect();
    let d2: Vec<f64> = (0..ids.len())
        .map(|t| {
            let (a, b) = (coords[0][t], coords[coords.len() - 1][t]);
            ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt()
        })
        .collect();
    let by_step = frames
        .iter()
        .map(|(s, f)| {
            let m = ids
                .iter()
                .map(|&i| dist(first.row(i), f.row(i)))
                .sum::<f64>()
                / ids.len() as f64;
            (*s, m)
        })
        .collect();
    let words: Vec<String> = ids.iter().map(|&i| vocab.word(wake_start + i)).collect();
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by(|&a, &b| full[b].total_cmp(&full[a]));
    let most_mobile = order
        .iter()
        .take(10)
        .map(|&t| (words[t].clone(), full[t]))
        .collect();
    let most_stationary = order
        .iter()
        .rev()
        .take(10)
        .map(|&t| (words[t].clone(), full[t]))
        .collect();
    let steps: Vec<u64> = frames.iter().map(|(s, _)| *s).collect();
    Ok((
        Trajectory {
            steps: steps.clone(),
            n_tokens: ids.len(),
            pca_variance_explained: ev,
            displacement_full: describe(&full),
            displacement_2d: describe(&d2),
            mean_displacement_by_step: by_step,
            most_mobile,
            most_stationary,
        },
        TrajectoryPlot {
            steps,
            words,
            coords,
        },
    ))
}
