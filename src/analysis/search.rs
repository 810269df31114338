//! Neighbour lists for the report's search box (`search.json`) and the nearest base rows of the
//! projector export: for a set of query rows, the top-k rows by cosine among the base rows and
//! the Wake rows together (the query itself left out), each tagged with its group.
//!
//! `search.json` stores every row it mentions once, in a word table with the base rows first
//! (`words[..n_base]`) and the Wake rows after; a query and its neighbours are indices into that
//! table, and cosines are integers in thousandths (`cos_milli`), so a 45,000-row lexicon stays a
//! few megabytes (docs/analysis.md, "Search lists").

use super::neighbours::{keep_top, safe_norms};
use super::{linalg, sample_indices, unit_rows_f64, Embeddings, Layout, Vocabulary};
use crate::util::rng::Rng;
use anyhow::Result;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;

/// Query rows per block of products (`BLOCK × candidate rows` cosines at a time).
const BLOCK: usize = 256;

/// Knobs of the search lists.
#[derive(Debug, Clone, Copy)]
pub struct SearchOptions {
    /// Neighbours per query.
    pub k: usize,
    /// Base rows sampled as queries (every Wake row is one); `usize::MAX` for all.
    pub base: usize,
    /// Seed of the base sample.
    pub seed: u64,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            k: 10,
            base: 2000,
            seed: 42,
        }
    }
}

/// `search.json` (docs/analysis.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SearchIndex {
    pub format: u32,
    pub k: usize,
    /// Every row mentioned, base rows first: `words[i]` is a base row for `i < n_base`.
    pub words: Vec<String>,
    /// The matrix row of each entry of `words`.
    pub ids: Vec<usize>,
    pub n_base: usize,
    /// Indices into `words` of the query rows (Wake rows, then the sampled base rows).
    pub queries: Vec<usize>,
    /// For each query, its neighbours (indices into `words`), nearest first.
    pub neighbours: Vec<Vec<usize>>,
    /// For each query, the cosines of its neighbours in thousandths (rounded).
    pub cos_milli: Vec<Vec<i32>>,
}

/// The base rows `0..base_vocab` and the Wake rows: where neighbours are looked for.
pub fn candidate_ranges(layout: &Layout) -> Vec<Range<usize>> {
    let (base, wake) = (0..layout.base_vocab, layout.wake());
    if wake.is_empty() {
        std::iter::once(base).collect()
    } else if wake.start == base.end {
        std::iter::once(0..wake.end).collect()
    } else {
        [base, wake].into()
    }
}

/// `k` rows of `0..n` drawn with `seed`, in increasing order (all of them when `k ≥ n`).
pub fn sample_rows(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut s = sample_indices(&mut Rng::new(seed), n, k);
    s.sort_unstable();
    s
}

/// For each query row, the `k` rows of `ranges` with the highest cosine, the query itself
/// excluded, nearest first (ties by row index). `progress` is called after each block.
pub fn top_k(
    e: &Embeddings,
    queries: &[usize],
    ranges: &[Range<usize>],
    k: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<(usize, f64)>>> {
    let cand_norms: Vec<Vec<f64>> = ranges.iter().map(|r| safe_norms(e, r.clone())).collect();
    let mut out = Vec::with_capacity(queries.len());
    for ids in queries.chunks(BLOCK) {
        // unit query rows in f32; dot products through gemm, divided by the f64 norms
        let q: Vec<f32> = unit_rows_f64(&e.gather(ids), e.dim)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let mut best: Vec<Vec<(usize, f64)>> = vec![Vec::with_capacity(k + 1); ids.len()];
        for (range, norms) in ranges.iter().zip(&cand_norms) {
            if range.is_empty() {
                continue;
            }
            let dots =
                linalg::matmul_nt_f32(&q, ids.len(), e.slice(range.clone()), range.len(), e.dim)?;
            best.par_iter_mut()
                .zip(dots.par_chunks_exact(range.len()))
                .zip(ids.par_iter())
                .for_each(|((best, row), &self_id)| {
                    for (j, (&d, n)) in row.iter().zip(norms).enumerate() {
                        let id = range.start + j;
                        if id != self_id {
                            keep_top(best, k, id, d as f64 / n);
                        }
                    }
                });
        }
        out.extend(best);
        progress(out.len());
    }
    Ok(out)
}

/// The search lists: every Wake row and `opts.base` sampled base rows as queries, each with
/// its `opts.k` nearest rows among the base and Wake rows.
pub fn build(
    e: &Embeddings,
    layout: &Layout,
    vocab: &Vocabulary,
    opts: SearchOptions,
) -> Result<SearchIndex> {
    let mut queries: Vec<usize> = layout.wake().collect();
    queries.extend(sample_rows(layout.base_vocab, opts.base, opts.seed));
    let k = opts.k.min(e.rows.saturating_sub(1));
    let found = top_k(e, &queries, &candidate_ranges(layout), k, &mut |_| {})?;
    // the word table: every row mentioned, base rows first, each in row order
    let wake = layout.wake();
    let mut table: BTreeMap<(bool, usize), usize> = BTreeMap::new();
    for &id in queries
        .iter()
        .chain(found.iter().flatten().map(|(id, _)| id))
    {
        table.insert((wake.contains(&id), id), 0);
    }
    let mut words = Vec::with_capacity(table.len());
    let mut ids = Vec::with_capacity(table.len());
    for (i, ((_, id), slot)) in table.iter_mut().enumerate() {
        *slot = i;
        words.push(vocab.word(*id));
        ids.push(*id);
    }
    let index = |id: usize| table[&(wake.contains(&id), id)];
    Ok(SearchIndex {
        format: 1,
        k,
        n_base: table.keys().filter(|(w, _)| !w).count(),
        queries: queries.iter().map(|&q| index(q)).collect(),
        neighbours: found
            .iter()
            .map(|nb| nb.iter().map(|&(id, _)| index(id)).collect())
            .collect(),
        cos_milli: found
            .iter()
            .map(|nb| {
                nb.iter()
                    .map(|&(_, c)| (c * 1000.0).round() as i32)
                    .collect()
            })
            .collect(),
        words,
        ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_exclude_the_query_and_follow_cosine() {
        // rows on the unit circle at angles 0, 10, 20, ... degrees, scaled differently
        let n = 12;
        let mut data = Vec::new();
        for i in 0..n {
            let a = (i as f64 * 10.0).to_radians();
            let s = 1.0 + i as f64;
            data.extend([(a.cos() * s) as f32, (a.sin() * s) as f32]);
        }
        let e = Embeddings::new(data, n, 2).unwrap();
        let layout = Layout {
            base_vocab: 8,
            wake_start: 8,
            wake_count: 4,
            words: (0..4).map(|i| format!("w{i}")).collect(),
        };
        assert_eq!(candidate_ranges(&layout), vec![0..12]);
        let vocab = Vocabulary {
            layout: &layout,
            tokenizer: None,
        };
        let s = build(
            &e,
            &layout,
            &vocab,
            SearchOptions {
                k: 3,
                base: 2,
                seed: 1,
            },
        )
        .unwrap();
        assert_eq!(s.queries.len(), 6);
        // the first query is row 8 (w0): neighbours rows 7 and 9 (10°), then 6 or 10 (20°; which
        // of a tie comes first depends on f32 rounding)
        let q = s.queries[0];
        assert_eq!(s.words[q], "w0");
        assert!(q >= s.n_base);
        let mut nb: Vec<usize> = s.neighbours[0].iter().map(|&i| s.ids[i]).collect();
        nb[..2].sort_unstable();
        assert_eq!(nb[..2], [7, 9]);
        assert!([6, 10].contains(&nb[2]), "{nb:?}");
        assert_eq!(s.cos_milli[0][0], 985);
        for (i, &id) in s.ids.iter().enumerate() {
            assert_eq!(i >= s.n_base, id >= 8);
        }
        assert_eq!(sample_rows(8, 2, 1), sample_rows(8, 2, 1));
    }
}
