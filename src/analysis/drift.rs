//! Drift: how far each row moved from its reference row (cosine and L2), and the rows that
//! moved most.

use super::{
    describe, Describe, DriftReference, Embeddings, FigureData, Layout, Options, Vocabulary,
};
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::Serialize;

/// Cosine and L2 distance to the reference over one group of rows.
#[derive(Debug, Clone, Serialize)]
pub struct DriftStats {
    pub n: usize,
    pub cos: Describe,
    pub l2: Describe,
}

/// A row that moved, with its distances to its reference row.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    pub id: usize,
    pub word: String,
    pub cos: f64,
    pub l2: f64,
}

/// Drift of the base and Wake rows against one reference.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    /// What the rows were compared with.
    pub reference: String,
    pub base: Option<DriftStats>,
    pub wake: Option<DriftStats>,
    /// Wake rows sorted by ascending cosine to their reference (the most moved first).
    pub most_moved_wake: Vec<Moved>,
    pub most_moved_base: Vec<Moved>,
}

/// Per-row cosine and L2 distance between `a` and `b` (same shape).
pub fn row_drift(a: &[f32], b: &[f32], dim: usize) -> (Vec<f64>, Vec<f64>) {
    a.par_chunks_exact(dim)
        .zip(b.par_chunks_exact(dim))
        .map(|(x, y)| {
            let (mut xy, mut xx, mut yy, mut dd) = (0f64, 0f64, 0f64, 0f64);
            for (&p, &q) in x.iter().zip(y) {
                let (p, q) = (p as f64, q as f64);
                xy += p * q;
                xx += p * p;
                yy += q * q;
                dd += (p - q) * (p - q);
            }
            (
                xy / (xx.sqrt().max(1e-12) * yy.sqrt().max(1e-12)),
                dd.sqrt(),
            )
        })
        .unzip()
}

/// Drift of `e` against `reference` (named `name`): statistics per group that the reference
/// covers and the `opts.most_moved` most moved rows; the cosines go to `figures`.
pub fn drift(
    e: &Embeddings,
    layout: &Layout,
    vocab: &Vocabulary,
    name: &str,
    reference: &DriftReference,
    opts: &Options,
    figures: &mut FigureData,
) -> Result<Drift> {
    let dim = e.dim;
    let wake = layout.wake();
    let (base_ref, wake_ref): (Option<&[f32]>, Option<&[f32]>) = match reference {
        DriftReference::Full(r) => {
            if r.dim != dim {
                bail!(
                    "{name}: hidden size {} differs from the model's {dim}",
                    r.dim
                );
            }
            // The base model (its rows, or up to where the Wake rows start) or the injected
            // model: any other row count is another vocabulary, whose rows mean other tokens.
            if ![layout.base_vocab, wake.start, e.rows].contains(&r.rows) {
                bail!(
                    "{name}: {} embedding rows, but the model's base vocabulary has {} and the model {}: --pre must be the base model or the injected model before training",
                    r.rows,
                    layout.base_vocab,
                    e.rows
                );
            }
            let base = (r.rows >= layout.base_vocab).then(|| r.slice(0..layout.base_vocab));
            let wk = (r.rows >= wake.end && !wake.is_empty()).then(|| r.slice(wake.clone()));
            (base, wk)
        }
        DriftReference::WakeOnly(r) => {
            if r.dim != dim || r.rows != layout.wake_count {
                bail!(
                    "{name}: snapshot of {} × {} Wake rows does not match the model's {} × {dim}",
                    r.rows,
                    r.dim,
                    layout.wake_count
                );
            }
            (None, Some(r.slice(0..r.rows)))
        }
    };
    let moved = |cos: &[f64], l2: &[f64], offset: usize| -> Vec<Moved> {
        let mut order: Vec<usize> = (0..cos.len()).collect();
        order.sort_by(|&a, &b| cos[a].total_cmp(&cos[b]));
        order
            .into_iter()
            .take(opts.most_moved)
            .map(|i| Moved {
                id: offset + i,
                word: vocab.word(offset + i),
                cos: cos[i],
                l2: l2[i],
            })
            .collect()
    };
    let mut out = Drift {
        reference: name.to_string(),
        base: None,
        wake: None,
        most_moved_wake: Vec::new(),
        most_moved_base: Vec::new(),
    };
    if let Some(b) = base_ref {
        let (cos, l2) = row_drift(e.slice(0..layout.base_vocab), b, dim);
        out.base = Some(DriftStats {
            n: cos.len(),
            cos: describe(&cos),
            l2: describe(&l2),
        });
        out.most_moved_base = moved(&cos, &l2, 0);
        figures.drift_base_cos = cos;
    }
    if let Some(w) = wake_ref {
        let (cos, l2) = row_drift(e.slice(wake.clone()), w, dim);
        out.wake = Some(DriftStats {
            n: cos.len(),
            cos: describe(&cos),
            l2: describe(&l2),
        });
        out.most_moved_wake = moved(&cos, &l2, wake.start);
        figures.drift_wake_cos = cos;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_of_identical_rows_is_zero() {
        let a = vec![1.0f32, 2.0, 3.0, -1.0, 0.5, 0.0];
        let (cos, l2) = row_drift(&a, &a, 3);
        assert!(cos.iter().all(|c| (c - 1.0).abs() < 1e-12));
        assert!(l2.iter().all(|&d| d == 0.0));
        let b = vec![2.0f32, 4.0, 6.0, 1.0, -0.5, 0.0];
        let (cos, l2) = row_drift(&a, &b, 3);
        assert!((cos[0] - 1.0).abs() < 1e-12 && (cos[1] + 1.0).abs() < 1e-12);
        assert!((l2[0] - 14f64.sqrt()).abs() < 1e-12);
    }
}
