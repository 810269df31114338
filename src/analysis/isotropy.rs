//! Isotropy under two definitions: the original's self-referential partition ratio of
//! centred unit rows, and Mu, Bhat & Viswanath (2018) on the raw rows.

use super::{linalg, unit_rows_f64, Embeddings};
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::ops::Range;

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

/// Isotropy of all rows, of the base rows and (with two Wake rows or more) of the Wake rows.
#[derive(Debug, Clone, Serialize)]
pub struct IsotropyGroups {
    pub all: Isotropy,
    pub base: Isotropy,
    pub wake: Option<Isotropy>,
}

/// Isotropy of each group: `samples` are the sampled rows of all rows, of the base rows and
/// optionally of the Wake rows, each with the range of its group.
pub fn groups(e: &Embeddings, samples: Vec<(Vec<usize>, Range<usize>)>) -> Result<IsotropyGroups> {
    // the groups run side by side: the eigen-solver's many small parallel steps leave cores
    // idle that another group's work fills
    let mut iso = samples
        .into_par_iter()
        .map(|(idx, g)| isotropy(&e.gather(&idx), e.dim, &group_mean(e, g)))
        .collect::<Result<Vec<_>>>()?
        .into_iter();
    Ok(IsotropyGroups {
        all: iso.next().expect("two groups"),
        base: iso.next().expect("two groups"),
        wake: iso.next(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

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
}
