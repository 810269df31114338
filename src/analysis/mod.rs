//! The embedding-geometry suite (original-system.md §6, with the defects of its Appendix B
//! fixed): norms and two-sample tests, isotropy under two named definitions, nearest base
//! neighbours of Wake tokens, PCA on the full spectrum, pairwise cosine distributions with a
//! KS test, drift against a snapshot, morpheme directions and device cohesion.
//!
//! Input is one embedding matrix and the row layout from `wake2vec.json`; the output is the
//! [`Summary`] written as `summary.json` (schema in `docs/analysis.md`) plus the arrays the
//! figures are drawn from ([`FigureData`]).

pub mod linalg;
pub mod load;
pub mod morph;
pub mod npy_random;
pub mod stats;
pub mod trajectory;

use crate::util::rng::Rng;
use crate::vocab::Manifest;
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::ops::Range;
use std::time::Instant;

/// A row-major embedding matrix in f32.
#[derive(Clone, Debug)]
pub struct Embeddings {
    pub data: Vec<f32>,
    pub rows: usize,
    pub dim: usize,
}

impl Embeddings {
    pub fn new(data: Vec<f32>, rows: usize, dim: usize) -> Result<Self> {
        if data.len() != rows * dim {
            bail!(
                "embedding matrix has {} values, not {rows} × {dim}",
                data.len()
            );
        }
        Ok(Self { data, rows, dim })
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows `ids`, copied into a new matrix.
    pub fn gather(&self, ids: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len() * self.dim);
        for &i in ids {
            out.extend_from_slice(self.row(i));
        }
        out
    }

    /// The rows `range` as one slice.
    pub fn slice(&self, range: Range<usize>) -> &[f32] {
        &self.data[range.start * self.dim..range.end * self.dim]
    }
}

/// Which rows are base vocabulary and which are Wake rows (from `wake2vec.json`).
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Rows `0..base_vocab` are the base vocabulary (padded rows included).
    pub base_vocab: usize,
    /// Rows `wake_start..wake_start + wake_count` are Wake rows.
    pub wake_start: usize,
    pub wake_count: usize,
    /// `words[i]` is the word of row `wake_start + i` (may be empty when unknown).
    pub words: Vec<String>,
}

impl Layout {
    /// The layout a manifest describes.
    pub fn of(m: &Manifest) -> Self {
        Layout {
            base_vocab: m.base_vocab,
            wake_start: m.wake.start,
            wake_count: m.wake.count,
            words: m.words.clone(),
        }
    }

    /// The Wake rows.
    pub fn wake(&self) -> Range<usize> {
        self.wake_start..self.wake_start + self.wake_count
    }
}

/// Knobs of the suite; the defaults are the original's.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// Rows sampled per group for isotropy and mean cosine.
    pub isotropy_rows: usize,
    /// Rows sampled per group for the pairwise cosine distributions.
    pub pair_rows: usize,
    /// Neighbours reported per query.
    pub top_k: usize,
    /// Extra query words for the nearest-neighbour table (besides the original's 20-token sample).
    pub query_words: Vec<String>,
    /// Wake words listed as most moved by drift.
    pub most_moved: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seed: 42,
            isotropy_rows: 5000,
            pair_rows: 2000,
            top_k: 5,
            query_words: Vec::new(),
            most_moved: 20,
        }
    }
}

/// Mean, standard deviations, extremes and count of a set of values.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Describe {
    pub n: usize,
    pub mean: f64,
    /// Population standard deviation (ddof 0), as the original reported.
    pub sd_population: f64,
    /// Sample standard deviation (ddof 1).
    pub sd_sample: f64,
    pub min: f64,
    pub max: f64,
}

pub fn describe(x: &[f64]) -> Describe {
    let (mean, vp) = stats::mean_var(x, 0);
    let (_, vs) = stats::mean_var(x, 1);
    Describe {
        n: x.len(),
        mean,
        sd_population: vp.sqrt(),
        sd_sample: vs.sqrt(),
        min: x.iter().copied().fold(f64::INFINITY, f64::min),
        max: x.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

/// Row norms and the tests comparing Wake rows with base rows.
#[derive(Debug, Clone, Serialize)]
pub struct Norms {
    pub all: Describe,
    pub base: Describe,
    pub wake: Option<Describe>,
    /// Tests of Wake norms against base norms; positive statistics mean Wake norms are larger.
    pub tests: Option<NormTests>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NormTests {
    pub welch: stats::Welch,
    pub mann_whitney: stats::MannWhitney,
    pub cohens_d: stats::CohensD,
    /// Coefficient of variation of Wake norms, `sd / mean` (lower = still spherical).
    pub wake_cv: f64,
}

/// Isotropy of one group of rows, under both definitions.
#[derive(Debug, Clone, Serialize)]
pub struct Isotropy {
    /// Rows sampled (at most `isotropy_rows`).
    pub n: usize,
    /// The original's number: rows centred on the group mean and unit-normalised, `C = S Sᵀ`
    /// with a zeroed diagonal, `Z_i = Σ_j exp(C_ij)`, score `min Z / max Z`.
    pub partition_ratio: f64,
    /// The original's mean cosine: mean off-diagonal entry of that `C` (centred rows).
    pub mean_cos_centred: f64,
    /// Mu, Bhat & Viswanath (2018): `Z(c) = Σ_w exp(cᵀw)` over the raw rows `w`, for the
    /// eigenvectors `c` of `WᵀW` and their negatives (sign-invariant), `min Z / max Z`,
    /// computed as `exp(min log Z − max log Z)`.
    pub mu2018: f64,
    pub mu2018_log_z_min: f64,
    pub mu2018_log_z_max: f64,
    /// Mean cosine over all pairs i ≠ j of the raw (uncentred) rows.
    pub mean_cos: f64,
}

/// One nearest-neighbour query.
#[derive(Debug, Clone, Serialize)]
pub struct NeighbourQuery {
    pub id: usize,
    pub word: String,
    /// `"sample"` (the original's 20 Wake rows) or `"user"`.
    pub source: &'static str,
    pub neighbours: Vec<Neighbour>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Neighbour {
    pub id: usize,
    pub word: String,
    pub cos: f64,
}

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

#[derive(Debug, Clone, Serialize)]
pub struct PairStats {
    pub n_pairs: usize,
    pub mean: f64,
    pub sd_sample: f64,
}

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

#[derive(Debug, Clone, Serialize)]
pub struct DriftStats {
    pub n: usize,
    pub cos: Describe,
    pub l2: Describe,
}

#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    pub id: usize,
    pub word: String,
    pub cos: f64,
    pub l2: f64,
}

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

/// The rows the drift is measured against: a full matrix, or Wake rows only (a snapshot).
pub enum DriftReference {
    Full(Embeddings),
    WakeOnly(Embeddings),
}

/// Everything `summary.json` holds about the geometry.
#[derive(Debug, Clone, Serialize)]
pub struct Geometry {
    pub shape: [usize; 2],
    pub base_vocab: usize,
    pub wake_start: usize,
    pub wake_count: usize,
    pub seed: u64,
    pub norms: Norms,
    pub isotropy: IsotropyGroups,
    pub neighbours: Vec<NeighbourQuery>,
    pub pca: PcaGroups,
    pub pairwise_cosine: Option<Pairwise>,
    pub drift: Option<Drift>,
    pub morphemes: Option<morph::MorphemeReport>,
    pub devices: Option<morph::DeviceReport>,
    /// Wall time of each stage, in order.
    pub timings_s: Vec<Timing>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub stage: String,
    /// Wall time.
    pub seconds: f64,
    /// CPU time of the process (user + system, all threads): on a shared machine this, not
    /// the wall time, is what the stage costs.
    pub cpu_seconds: f64,
}

/// User + system CPU seconds of this process so far (0 where getrusage fails).
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; it has no other effect.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

#[derive(Debug, Clone, Serialize)]
pub struct IsotropyGroups {
    pub all: Isotropy,
    pub base: Isotropy,
    pub wake: Option<Isotropy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PcaGroups {
    pub base: Pca,
    pub wake: Option<Pca>,
}

/// Arrays the figures are drawn from (not serialized).
#[derive(Debug, Clone, Default)]
pub struct FigureData {
    pub base_norms: Vec<f64>,
    pub wake_norms: Vec<f64>,
    /// Norm of every row, by row index.
    pub all_norms: Vec<f64>,
    pub wake_range: Range<usize>,
    pub cos_base_base: Vec<f64>,
    pub cos_wake_wake: Vec<f64>,
    pub cos_base_wake: Vec<f64>,
    pub pca_base_ratios: Vec<f64>,
    pub pca_wake_ratios: Vec<f64>,
    pub drift_base_cos: Vec<f64>,
    pub drift_wake_cos: Vec<f64>,
}

/// Word/token strings for ids: Wake words from the layout, others from the tokenizer.
pub struct Vocabulary<'a> {
    pub layout: &'a Layout,
    pub tokenizer: Option<&'a tokenizers::Tokenizer>,
}

impl Vocabulary<'_> {
    pub fn word(&self, id: usize) -> String {
        let wake = self.layout.wake();
        if wake.contains(&id) {
            if let Some(w) = self.layout.words.get(id - wake.start) {
                if !w.is_empty() {
                    return w.clone();
                }
            }
        }
        match self.tokenizer {
            Some(t) => t
                .decode(&[id as u32], false)
                .unwrap_or_else(|_| format!("#{id}")),
            None => format!("#{id}"),
        }
    }

    /// The row of a query word: a Wake word by the layout, else the tokenizer's single token
    /// for " word" (word-start form) or "word".
    pub fn id_of(&self, word: &str) -> Option<usize> {
        if let Some(i) = self.layout.words.iter().position(|w| w == word) {
            return Some(self.layout.wake_start + i);
        }
        let t = self.tokenizer?;
        for form in [format!(" {word}"), word.to_string()] {
            if let Ok(enc) = t.encode(form.as_str(), false) {
                if enc.get_ids().len() == 1 {
                    return Some(enc.get_ids()[0] as usize);
                }
            }
        }
        None
    }
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

/// `k` distinct indices of `0..n` drawn uniformly without replacement (partial Fisher-Yates),
/// in draw order; all of `0..n` in order when `k ≥ n`.
pub fn sample_indices(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    if k >= n {
        return (0..n).collect();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + (rng.next_f64() * (n - i) as f64) as usize;
        idx.swap(i, j.min(n - 1));
    }
    idx.truncate(k);
    idx
}

fn unit_rows_f64(x: &[f32], dim: usize) -> Vec<f64> {
    let mut out = vec![0f64; x.len()];
    out.par_chunks_exact_mut(dim)
        .zip(x.par_chunks_exact(dim))
        .for_each(|(o, r)| {
            let n = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let n = n.max(1e-12);
            o.iter_mut().zip(r).for_each(|(a, &b)| *a = b as f64 / n);
        });
    out
}

/// `exp(x)` for a cosine (clamped to [−1, 1]) by its Taylor series to x¹³, whose remainder
/// there is below 2e-10 relative: branch-free, so the partition sums vectorize.
#[inline(always)]
fn exp_cosine(x: f64) -> f64 {
    // 1/k! for k = 13 down to 0
    const C: [f64; 14] = [
        1.6059043836821613e-10,
        2.08767569878681e-09,
        2.505210838544172e-08,
        2.755731922398589e-07,
        2.7557319223985893e-06,
        2.48015873015873e-05,
        0.0001984126984126984,
        0.001388888888888889,
        0.008333333333333333,
        0.041666666666666664,
        0.16666666666666666,
        0.5,
        1.0,
        1.0,
    ];
    let x = x.clamp(-1.0, 1.0);
    C.iter().fold(0.0, |p, &c| p * x + c)
}

/// For unit rows `s` (`n × dim`, f32): `Z_i = 1 + Σ_{j≠i} exp(s_i · s_j)` and the sum of all
/// off-diagonal cosines. The cosine matrix is symmetric, so it is computed in row blocks
/// `a ≤ b` (f32 gemm) and each off-diagonal block feeds the sums of both of its row ranges.
fn partition_sums(s: &[f32], n: usize, dim: usize) -> Result<(Vec<f64>, f64)> {
    let nb = n.div_ceil(1280).max(1);
    let bh = n.div_ceil(nb);
    let mut z = vec![1f64; n]; // the zeroed diagonal contributes exp(0)
    let mut off = 0f64;
    for a in 0..nb {
        let (la, ha) = (a * bh, ((a + 1) * bh).min(n));
        for b in a..nb {
            let (lb, hb) = (b * bh, ((b + 1) * bh).min(n));
            let wb = hb - lb;
            let c = linalg::matmul_nt_f32(
                &s[la * dim..ha * dim],
                ha - la,
                &s[lb * dim..hb * dim],
                wb,
                dim,
            )?;
            let diag = a == b;
            // (row sums, column sums, cosine sum), folded over rows in parallel; the diagonal
            // of a diagonal block is summed with the rest and taken out afterwards, so the
            // inner loop has no branch and vectorizes
            let (rows, cols, sum) = c
                .par_chunks_exact(wb)
                .enumerate()
                .fold(
                    || (Vec::new(), vec![0f64; wb], 0f64),
                    |(mut rows, mut cols, mut sum), (i, row)| {
                        let (mut rs, mut cs_sum) = ([0f64; 8], [0f64; 8]);
                        let mut chunks = row.chunks_exact(8);
                        let mut col_chunks = cols.chunks_exact_mut(8);
                        for (v8, c8) in (&mut chunks).zip(&mut col_chunks) {
                            for k in 0..8 {
                                let e = exp_cosine(v8[k] as f64);
                                rs[k] += e;
                                c8[k] += e;
                                cs_sum[k] += v8[k] as f64;
                            }
                        }
                        let mut r = rs.iter().sum::<f64>();
                        let mut cos_sum = cs_sum.iter().sum::<f64>();
                        let done = wb - chunks.remainder().len();
                        for (j, &v) in chunks.remainder().iter().enumerate() {
                            let e = exp_cosine(v as f64);
                            r += e;
                            cols[done + j] += e;
                            cos_sum += v as f64;
                        }
                        if diag {
                            let v = row[i] as f64;
                            let e = exp_cosine(v);
                            r -= e;
                            cols[i] -= e;
                            cos_sum -= v;
                        }
                        rows.push((i, r));
                        sum += cos_sum;
                        (rows, cols, sum)
                    },
                )
                .reduce(
                    || (Vec::new(), vec![0f64; wb], 0f64),
                    |(mut r1, mut c1, s1), (r2, c2, s2)| {
                        r1.extend(r2);
                        c1.iter_mut().zip(&c2).for_each(|(x, y)| *x += y);
                        (r1, c1, s1 + s2)
                    },
                );
            for (i, rs) in rows {
                z[la + i] += rs;
            }
            if diag {
                off += sum;
            } else {
                z[lb..hb].iter_mut().zip(&cols).for_each(|(x, y)| *x += y);
                off += 2.0 * sum;
            }
        }
    }
    Ok((z, off))
}

/// Mean row (f64) of the rows `range` of `e`.
pub fn group_mean(e: &Embeddings, range: Range<usize>) -> Vec<f64> {
    let n = range.len().max(1) as f64;
    let mut m = e
        .slice(range)
        .par_chunks(e.dim * 1024)
        .map(|block| {
            let mut acc = vec![0f64; e.dim];
            for r in block.chunks_exact(e.dim) {
                acc.iter_mut().zip(r).for_each(|(a, &v)| *a += v as f64);
            }
            acc
        })
        .reduce(
            || vec![0f64; e.dim],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    m.iter_mut().for_each(|v| *v /= n);
    m
}

/// Isotropy of the rows `x` (`n × dim`, already sampled) under both definitions; `centre` is
/// the mean of the whole group the rows were drawn from (the original centres the set, then
/// samples).
pub fn isotropy(x: &[f32], dim: usize, centre: &[f64]) -> Result<Isotropy> {
    let n = x.len() / dim;
    if n < 2 {
        bail!("isotropy needs at least 2 rows, got {n}");
    }
    // --- the original: centred, normalised, self-referential partition ratio (f32 gram)
    let mean = centre;
    let mut s = vec![0f32; x.len()];
    s.par_chunks_exact_mut(dim)
        .zip(x.par_chunks_exact(dim))
        .for_each(|(o, r)| {
            let c: Vec<f64> = r.iter().zip(mean).map(|(&v, m)| v as f64 - m).collect();
            let nn = c.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            o.iter_mut().zip(&c).for_each(|(a, b)| *a = (b / nn) as f32);
        });
    let (z, off_sum) = partition_sums(&s, n, dim)?;
    let zmin = z.iter().copied().fold(f64::INFINITY, f64::min);
    let zmax = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean_cos_centred = off_sum / (n * (n - 1)) as f64;
    // --- Mu et al. 2018 on raw rows, f64
    let w: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let g = linalg::gram_t(&w, n, dim)?;
    let eig = linalg::sym_eigen(g, dim, true);
    // proj[i][k] = w_i · c_k  =  W Vᵀ (rows of `vectors` are the c_k)
    let proj = linalg::matmul_nt(&w, n, &eig.vectors, dim, dim)?;
    let mut log_z = Vec::with_capacity(2 * dim);
    for sign in [1.0f64, -1.0] {
        let mut mx = vec![f64::NEG_INFINITY; dim];
        for r in proj.chunks_exact(dim) {
            mx.iter_mut()
                .zip(r)
                .for_each(|(m, &v)| *m = m.max(sign * v));
        }
        let sums = proj
            .par_chunks(dim * 256)
            .map(|block| {
                let mut acc = vec![0f64; dim];
                for r in block.chunks_exact(dim) {
                    acc.iter_mut()
                        .zip(r)
                        .zip(&mx)
                        .for_each(|((a, &v), m)| *a += (sign * v - m).exp());
                }
                acc
            })
            .reduce(
                || vec![0f64; dim],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        log_z.extend(sums.iter().zip(&mx).map(|(s, m)| m + s.ln()));
    }
    let lmin = log_z.iter().copied().fold(f64::INFINITY, f64::min);
    let lmax = log_z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // mean raw cosine: (|Σu|² − Σ|u|²) / (n(n−1))
    let u = unit_rows_f64(x, dim);
    let mut su = vec![0f64; dim];
    let mut self_sum = 0.0;
    for r in u.chunks_exact(dim) {
        su.iter_mut().zip(r).for_each(|(a, b)| *a += b);
        self_sum += r.iter().map(|v| v * v).sum::<f64>();
    }
    let mean_cos = (su.iter().map(|v| v * v).sum::<f64>() - self_sum) / (n * (n - 1)) as f64;
    Ok(Isotropy {
        n,
        partition_ratio: zmin / zmax,
        mean_cos_centred,
        mu2018: (lmin - lmax).exp(),
        mu2018_log_z_min: lmin,
        mu2018_log_z_max: lmax,
        mean_cos,
    })
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
    let base_norms: Vec<f64> = e
        .slice(0..base_vocab)
        .par_chunks_exact(e.dim)
        .map(|r| {
            r.iter()
                .map(|&v| (v as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-12)
        })
        .collect();
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
        .chunks_exact(base_vocab)
        .map(|row| {
            let mut best: Vec<(usize, f64)> = Vec::with_capacity(k + 1);
            for (j, (&d, n)) in row.iter().zip(&base_norms).enumerate() {
                let c = d as f64 / n;
                if best.len() < k || c > best[best.len() - 1].1 {
                    let pos = best.partition_point(|&(_, b)| b >= c);
                    best.insert(pos, (j, c));
                    best.truncate(k);
                }
            }
            best
        })
        .collect())
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

/// The whole suite.
pub struct Analysis {
    pub geometry: Geometry,
    pub figures: FigureData,
}

/// Runs every analysis on `e` with the row `layout`. `reference` gives drift; `morph` the
/// optional morpheme and device groups.
pub fn analyze(
    e: &Embeddings,
    layout: &Layout,
    vocab: &Vocabulary,
    opts: &Options,
    reference: Option<(&str, &DriftReference)>,
    groups: &morph::Groups,
) -> Result<Analysis> {
    let dim = e.dim;
    let base_vocab = layout.base_vocab;
    if base_vocab < 2 || base_vocab > e.rows {
        bail!(
            "base vocabulary of {base_vocab} rows does not fit a matrix of {} rows: \
             check wake2vec.json or --base-vocab",
            e.rows
        );
    }
    if layout.wake().end > e.rows {
        bail!(
            "Wake rows {}..{} exceed the matrix's {} rows: wake2vec.json does not belong to \
             this model",
            layout.wake_start,
            layout.wake().end,
            e.rows
        );
    }
    let has_wake = layout.wake_count >= 2;
    let mut timings = Vec::new();
    let mut clock = Instant::now();
    let mut cpu = process_cpu_seconds();
    let mut lap = |name: &str, timings: &mut Vec<Timing>| {
        let now = process_cpu_seconds();
        timings.push(Timing {
            stage: name.to_string(),
            seconds: clock.elapsed().as_secs_f64(),
            cpu_seconds: now - cpu,
        });
        clock = Instant::now();
        cpu = now;
    };

    // ---- norms and tests
    let all_norms = row_norms(e);
    let base_norms = all_norms[..base_vocab].to_vec();
    let wake_norms = all_norms[layout.wake()].to_vec();
    let tests = has_wake.then(|| {
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
    lap("norms_tests", &mut timings);

    // ---- isotropy. One numpy-compatible generator (default_rng(seed)) draws, in order, the
    // isotropy rows of all / base / Wake, the reference's 20 random query rows, then the
    // pairwise rows of base and Wake: the same rows as analysis_reference.py takes.
    let mut rng = npy_random::Pcg64::new(opts.seed);
    let mut draw = |range: Range<usize>, k: usize| -> Vec<usize> {
        rng.choice(range.len(), k.min(range.len()))
            .into_iter()
            .map(|i| range.start + i)
            .collect()
    };
    let mut iso_groups = vec![0..e.rows, 0..base_vocab];
    if has_wake {
        iso_groups.push(layout.wake());
    }
    let iso_rows: Vec<(Vec<usize>, Range<usize>)> = iso_groups
        .into_iter()
        .map(|g| (draw(g.clone(), opts.isotropy_rows), g))
        .collect();
    let pair_rows = if has_wake {
        let _reference_queries = draw(layout.wake(), 20);
        Some((
            draw(0..base_vocab, opts.pair_rows),
            draw(layout.wake(), opts.pair_rows),
        ))
    } else {
        None
    };
    // the groups run side by side: the eigen-solver's many small parallel steps leave cores
    // idle that another group's work fills
    let mut iso: Vec<Isotropy> = iso_rows
        .into_par_iter()
        .map(|(idx, g)| isotropy(&e.gather(&idx), dim, &group_mean(e, g)))
        .collect::<Result<Vec<_>>>()?;
    let wake_iso = if has_wake { iso.pop() } else { None };
    let base_iso = iso.pop().expect("two groups");
    let all_iso = iso.pop().expect("two groups");
    let isotropy = IsotropyGroups {
        all: all_iso,
        base: base_iso,
        wake: wake_iso,
    };
    lap("isotropy", &mut timings);

    // ---- nearest base neighbours
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
    let found = nearest_base(e, base_vocab, &ids, opts.top_k)?;
    let neighbours = queries
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
        .collect();
    lap("neighbours", &mut timings);

    // ---- PCA, full spectrum
    let (pca_base, base_ratios) = pca(e.slice(0..base_vocab), dim)?;
    let (pca_wake, wake_ratios) = if has_wake {
        let (p, r) = pca(e.slice(layout.wake()), dim)?;
        (Some(p), r)
    } else {
        (None, Vec::new())
    };
    lap("pca", &mut timings);

    // ---- pairwise cosines on the rows drawn above
    let mut figures = FigureData::default();
    let pairwise = if let Some((ib, iw)) = pair_rows {
        let (xb, xw) = (e.gather(&ib), e.gather(&iw));
        let bb = pair_cosines(&xb, &xb, dim, true)?;
        let ww = pair_cosines(&xw, &xw, dim, true)?;
        let bw = pair_cosines(&xb, &xw, dim, false)?;
        let ks = stats::ks_2samp(&bb, &ww);
        let p = Pairwise {
            rows_per_group: ib.len().min(iw.len()),
            base_base: pair_stats(&bb),
            wake_wake: pair_stats(&ww),
            base_wake: pair_stats(&bw),
            ks_base_base_vs_wake_wake: ks,
        };
        figures.cos_base_base = bb;
        figures.cos_wake_wake = ww;
        figures.cos_base_wake = bw;
        Some(p)
    } else {
        None
    };
    lap("pairwise_ks", &mut timings);

    // ---- drift
    let drift = match reference {
        None => None,
        Some((name, r)) => Some(drift(e, layout, vocab, name, r, opts, &mut figures)?),
    };
    lap("drift", &mut timings);

    // ---- morphemes and devices
    let morphemes = match &groups.morphemes {
        Some(g) => Some(morph::morpheme_directions(e, g, vocab)?),
        None => None,
    };
    let devices = match &groups.devices {
        Some(g) => Some(morph::device_cohesion(e, g, vocab)?),
        None => None,
    };
    lap("morphemes_devices", &mut timings);

    figures.base_norms = base_norms;
    figures.wake_norms = wake_norms;
    figures.all_norms = all_norms;
    figures.wake_range = layout.wake();
    figures.pca_base_ratios = base_ratios;
    figures.pca_wake_ratios = wake_ratios;
    Ok(Analysis {
        geometry: Geometry {
            shape: [e.rows, dim],
            base_vocab,
            wake_start: layout.wake_start,
            wake_count: layout.wake_count,
            seed: opts.seed,
            norms,
            isotropy,
            neighbours,
            pca: PcaGroups {
                base: pca_base,
                wake: pca_wake,
            },
            pairwise_cosine: pairwise,
            drift,
            morphemes,
            devices,
            timings_s: timings,
        },
        figures,
    })
}

fn drift(
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
    fn sampling_is_without_replacement_and_seeded() {
        let mut a = Rng::new(42);
        let s = sample_indices(&mut a, 1000, 100);
        let mut t = s.clone();
        t.sort();
        t.dedup();
        assert_eq!(t.len(), 100);
        assert!(t.iter().all(|&i| i < 1000));
        assert_eq!(s, sample_indices(&mut Rng::new(42), 1000, 100));
        assert_eq!(sample_indices(&mut a, 5, 10), vec![0, 1, 2, 3, 4]);
    }

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

    #[test]
    fn exp_of_a_cosine_is_within_1e_10() {
        for i in 0..=2000 {
            let x = -1.0 + i as f64 / 1000.0;
            let rel = (exp_cosine(x) - x.exp()).abs() / x.exp();
            assert!(rel < 1e-10, "x = {x}: rel {rel:e}");
        }
        assert_eq!(exp_cosine(1.0000001), exp_cosine(1.0));
    }

    #[test]
    fn blocked_partition_sums_equal_the_plain_sums() {
        // 2,900 rows → 3 row blocks of the cosine matrix
        let (n, dim) = (2900, 6);
        let mut rng = Rng::new(3);
        let mut s: Vec<f32> = (0..n * dim).map(|_| rng.next_f64() as f32 - 0.5).collect();
        for r in s.chunks_exact_mut(dim) {
            let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            r.iter_mut().for_each(|v| *v /= norm);
        }
        let (z, off) = partition_sums(&s, n, dim).unwrap();
        let mut off_want = 0f64;
        for i in (0..n).step_by(97) {
            let mut zi = 1f64;
            for j in 0..n {
                if i != j {
                    let c: f32 = (0..dim).map(|k| s[i * dim + k] * s[j * dim + k]).sum();
                    zi += (c as f64).exp();
                }
            }
            assert!((z[i] - zi).abs() / zi < 1e-6, "row {i}: {} vs {zi}", z[i]);
        }
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    off_want += (0..dim)
                        .map(|k| s[i * dim + k] * s[j * dim + k])
                        .sum::<f32>() as f64;
                }
            }
        }
        assert!(
            (off - off_want).abs() < 1e-3 * off_want.abs().max(1.0),
            "{off} vs {off_want}"
        );
    }

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
