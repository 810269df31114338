//! The nearest base rows of Wake tokens (and of the user's query words), by cosine.

use super::{linalg, unit_rows_f64, Embeddings, Layout, Options, Vocabulary};
use anyhow::Result;
use rayon::prelude::*;
use serde::Serialize;

/// One nearest-neighbour query.
#[derive(Debug, Clone, Serialize)]
pub struct NeighbourQuery {
    pub id: usize,
    pub word: String,
    /// `"sample"` (the original's 20 Wake rows) or `"user"`.
    pub source: &'static str,
    pub neighbours: Vec<Neighbour>,
}

/// A base row near a query.
#[derive(Debug, Clone, Serialize)]
pub struct Neighbour {
    pub id: usize,
    pub word: String,
    pub cos: f64,
}

/// The neighbours of the original's sample of Wake rows and of the query words of `opts` (a
/// word that is not one token of the vocabulary is skipped with a warning).
pub fn neighbours(
    e: &Embeddings,
    layout: &Layout,
    vocab: &Vocabulary,
    opts: &Options,
) -> Result<Vec<NeighbourQuery>> {
    let mut queries: Vec<(usize, &'static str)> = sample_queries(layout)
        .into_iter()
        .map(|i| (i, "sample"))
        .collect();
    for w in &opts.query_words {
        match vocab.id_of(w) {
            Some(id) if id < e.rows => queries.push((id, "user")),
            _ => {
                eprintln!("warning: query word {w:?} is not one token of this vocabulary; skipped")
            }
        }
    }
    let ids: Vec<usize> = queries.iter().map(|q| q.0).collect();
    let found = nearest_base(e, layout.base_vocab, &ids, opts.top_k)?;
    Ok(queries
        .iter()
        .zip(found)
        .map(|(&(id, source), nb)| NeighbourQuery {
            id,
            word: vocab.word(id),
            source,
            neighbours: nb
                .into_iter()
                .map(|(j, cos)| Neighbour {
                    id: j,
                    word: vocab.word(j),
                    cos,
                })
                .collect(),
        })
        .collect())
}

/// The original's 20 query rows: the first 10 Wake rows, 5 from the middle if there are more
/// than 100, the last 5 if more than 1000.
pub fn sample_queries(layout: &Layout) -> Vec<usize> {
    let (s, n) = (layout.wake_start, layout.wake_count);
    let mut q: Vec<usize> = (s..s + n.min(10)).collect();
    if n > 100 {
        q.extend(s + n / 2..s + n / 2 + 5);
    }
    if n > 1000 {
        q.extend(s + n - 5..s + n);
    }
    q.dedup();
    q
}

/// Norms (f64) of the rows `range` of `e`, at least 1e-12 so that a zero row divides safely.
pub(crate) fn safe_norms(e: &Embeddings, range: std::ops::Range<usize>) -> Vec<f64> {
    e.slice(range)
        .par_chunks_exact(e.dim)
        .map(|r| {
            r.iter()
                .map(|&v| (v as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-12)
        })
        .collect()
}

/// Puts row `id` with cosine `c` into `best`, the `k` highest cosines so far, nearest first
/// (an equal cosine after those already there).
pub(crate) fn keep_top(best: &mut Vec<(usize, f64)>, k: usize, id: usize, c: f64) {
    if best.len() < k || c > best[best.len() - 1].1 {
        let pos = best.partition_point(|&(_, b)| b >= c);
        best.insert(pos, (id, c));
        best.truncate(k);
    }
}

/// Top-`k` base rows by cosine for each query row.
pub fn nearest_base(
    e: &Embeddings,
    base_vocab: usize,
    queries: &[usize],
    k: usize,
) -> Result<Vec<Vec<(usize, f64)>>> {
    if queries.is_empty() || base_vocab == 0 {
        return Ok(vec![Vec::new(); queries.len()]);
    }
    let q = unit_rows_f64(&e.gather(queries), e.dim);
    let base_norms = safe_norms(e, 0..base_vocab);
    // dot products in f32 through gemm, divided by the f64 norms
    let qf: Vec<f32> = q.iter().map(|&v| v as f32).collect();
    let dots = linalg::matmul_nt_f32(
        &qf,
        queries.len(),
        e.slice(0..base_vocab),
        base_vocab,
        e.dim,
    )?;
    Ok(dots
        .par_chunks_exact(base_vocab)
        .map(|row| {
            let mut best: Vec<(usize, f64)> = Vec::with_capacity(k + 1);
            for (j, (&d, n)) in row.iter().zip(&base_norms).enumerate() {
                keep_top(&mut best, k, j, d as f64 / n);
            }
            best
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_follow_the_original() {
        let l = Layout {
            base_vocab: 100,
            wake_start: 100,
            wake_count: 2000,
            words: vec![],
        };
        let q = sample_queries(&l);
        assert_eq!(q.len(), 20);
        assert_eq!(q[..10], (100..110).collect::<Vec<_>>()[..]);
        assert_eq!(q[10], 1100);
        assert_eq!(q[19], 2099);
        let small = Layout {
            wake_count: 50,
            ..l
        };
        assert_eq!(sample_queries(&small).len(), 10);
    }

    #[test]
    fn nearest_neighbours_find_the_parallel_row() {
        // base rows are axis vectors; the query is close to axis 2
        let dim = 4;
        let mut data = vec![0f32; 5 * dim];
        for i in 0..4 {
            data[i * dim + i] = 1.0 + i as f32;
        }
        data[4 * dim..].copy_from_slice(&[0.1, 0.0, 3.0, 0.2]);
        let e = Embeddings::new(data, 5, dim).unwrap();
        let nb = nearest_base(&e, 4, &[4], 2).unwrap();
        assert_eq!(nb[0][0].0, 2);
        assert!((nb[0][0].1 - 3.0 / (0.01f64 + 9.0 + 0.04).sqrt()).abs() < 1e-6);
        assert_eq!(nb[0][1].0, 3);
    }
}
