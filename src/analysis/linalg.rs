//! Dense linear algebra for the analysis suite, in f64: Gram and covariance matrices through
//! candle's matmul (gemm), and a symmetric eigen-solver (Householder tridiagonalization, then
//! the implicit QL algorithm with Wilkinson shifts), written here because the suite needs the
//! full spectrum of a D×D matrix (D = 576–5120) and nothing else from a linear-algebra crate.
//!
//! Row-major throughout. The Householder update and the QL rotations touch whole rows, so they
//! vectorize, and both are split across threads with rayon.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// `XᵀX` of a row-major `rows × cols` matrix (f64 in, f64 out), via gemm.
pub fn gram_t(x: &[f64], rows: usize, cols: usize) -> Result<Vec<f64>> {
    let mut xt = vec![0f64; rows * cols];
    transpose_into(x, rows, cols, &mut xt);
    let mut acc = vec![0f64; cols * cols];
    add_gram_sym(&xt, cols, rows, &mut acc)?;
    Ok(acc)
}

/// Writes `x[r][c]` to `xt[c][r]` (`x` row-major `rows × cols`), in cache-sized tiles.
fn transpose_into(x: &[f64], rows: usize, cols: usize, xt: &mut [f64]) {
    const TILE: usize = 64;
    xt.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(cb, out)| {
            let c0 = cb * TILE;
            let c1 = (c0 + TILE).min(cols);
            for r0 in (0..rows).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let row = &x[r * cols..(r + 1) * cols];
                    for c in c0..c1 {
                        out[(c - c0) * rows + r] = row[c];
                    }
                }
            }
        });
}

/// Adds `X Xᵀ` of the row-major `n × k` matrix `x` into `acc` (`n × n`); called with
/// `x = Yᵀ` it adds `YᵀY`. The product is symmetric, so only the row-block pairs `a ≤ b` go
/// through gemm (as `A Bᵀ`, the layout gemm runs fastest) and are mirrored: with 4 blocks that
/// is 10 of 16 block products.
pub fn add_gram_sym(x: &[f64], n: usize, k: usize, acc: &mut [f64]) -> Result<()> {
    let nb = match n {
        c if c >= 256 => 4,
        c if c >= 64 => 2,
        _ => 1,
    };
    let bw = n.div_ceil(nb);
    let blocks = (0..nb)
        .map(|b| {
            let (lo, hi) = (b * bw, ((b + 1) * bw).min(n));
            let t = Tensor::from_slice(&x[lo * k..hi * k], (hi - lo, k), &Device::Cpu)?;
            Ok((lo, hi, t))
        })
        .collect::<Result<Vec<_>>>()?;
    for a in 0..nb {
        for b in a..nb {
            let (la, ha, ta) = &blocks[a];
            let (lb, hb, tb) = &blocks[b];
            let g = ta.matmul(&tb.t()?)?.flatten_all()?.to_vec1::<f64>()?;
            let (wa, wb) = (ha - la, hb - lb);
            for i in 0..wa {
                let row = &g[i * wb..(i + 1) * wb];
                let dst = &mut acc[(la + i) * n + lb..(la + i) * n + lb + wb];
                dst.iter_mut().zip(row).for_each(|(d, v)| *d += v);
                if a != b {
                    for (j, v) in row.iter().enumerate() {
                        acc[(lb + j) * n + la + i] += v;
                    }
                }
            }
        }
    }
    Ok(())
}

/// `A Bᵀ` for row-major `A: m × k`, `B: n × k`, in f64.
pub fn matmul_nt(a: &[f64], m: usize, b: &[f64], n: usize, k: usize) -> Result<Vec<f64>> {
    let ta = Tensor::from_slice(a, (m, k), &Device::Cpu)?;
    let tb = Tensor::from_slice(b, (n, k), &Device::Cpu)?;
    Ok(ta.matmul(&tb.t()?)?.flatten_all()?.to_vec1::<f64>()?)
}

/// `A B` for row-major `A: m × k`, `B: k × n`, in f64.
pub fn matmul_nn(a: &[f64], m: usize, b: &[f64], n: usize, k: usize) -> Result<Vec<f64>> {
    let ta = Tensor::from_slice(a, (m, k), &Device::Cpu)?;
    let tb = Tensor::from_slice(b, (k, n), &Device::Cpu)?;
    Ok(ta.matmul(&tb)?.flatten_all()?.to_vec1::<f64>()?)
}

/// `A Bᵀ` in f32 (for the large cosine matrices where f32 is enough), straight from the
/// slices: no copy of `B`, which is the whole base matrix for the neighbour searches.
pub fn matmul_nt_f32(a: &[f32], m: usize, b: &[f32], n: usize, k: usize) -> Result<Vec<f32>> {
    anyhow::ensure!(
        a.len() == m * k && b.len() == n * k,
        "internal: matmul_nt_f32 shapes"
    );
    let mut out = vec![0f32; m * n];
    crate::nn::gemm::gemm_f32(m, n, k, &mut out, a, (k, 1), b, (1, k));
    Ok(out)
}

/// Sample covariance (ddof 1) of the rows of `x` (`rows × cols`, f32): rows are centred in
/// f64 a block at a time and the blocks' `XᵀX` summed, so no f64 copy of the whole matrix is made.
pub fn covariance(x: &[f32], rows: usize, cols: usize) -> Result<Vec<f64>> {
    let mut mean = vec![0f64; cols];
    for r in x.chunks_exact(cols) {
        mean.iter_mut().zip(r).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= rows as f64);
    const BLOCK_ROWS: usize = 8192;
    let mut c = vec![0f64; cols * cols];
    let mut xt = Vec::new();
    for block in x.chunks(BLOCK_ROWS * cols) {
        let n = block.len() / cols;
        // centred and transposed (cols × n) in one pass, so gemm runs as A Bᵀ
        xt.resize(n * cols, 0f64);
        transpose_centred(block, n, cols, &mean, &mut xt);
        add_gram_sym(&xt, cols, n, &mut c)?;
    }
    let div = (rows.max(2) - 1) as f64;
    c.iter_mut().for_each(|v| *v /= div);
    Ok(c)
}

/// `xt[c][r] = x[r][c] − mean[c]` for the row-major `rows × cols` block `x`.
fn transpose_centred(x: &[f32], rows: usize, cols: usize, mean: &[f64], xt: &mut [f64]) {
    const TILE: usize = 64;
    xt.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(cb, out)| {
            let c0 = cb * TILE;
            let c1 = (c0 + TILE).min(cols);
            for r0 in (0..rows).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let row = &x[r * cols..(r + 1) * cols];
                    for c in c0..c1 {
                        out[(c - c0) * rows + r] = row[c] as f64 - mean[c];
                    }
                }
            }
        });
}

/// Eigen-decomposition of a symmetric matrix.
pub struct SymEigen {
    /// Eigenvalues, ascending.
    pub values: Vec<f64>,
    /// Row `i` (of `n`) is the unit eigenvector of `values[i]`; empty unless requested.
    pub vectors: Vec<f64>,
}

/// Eigenvalues (ascending) and, if `vectors`, eigenvectors of the symmetric `n × n` matrix
/// `a` (row-major; only symmetric input is meaningful).
pub fn sym_eigen(mut a: Vec<f64>, n: usize, vectors: bool) -> SymEigen {
    assert_eq!(a.len(), n * n, "sym_eigen: matrix is not n × n");
    if n == 0 {
        return SymEigen {
            values: vec![],
            vectors: vec![],
        };
    }
    let (d, e, betas) = tridiagonalize(&mut a, n);
    let mut zt = if vectors {
        accumulate_q_transposed(&a, &betas, n)
    } else {
        Vec::new()
    };
    let mut d = d;
    let mut e = e;
    tridiagonal_ql(
        &mut d,
        &mut e,
        if vectors { Some(&mut zt) } else { None },
        n,
    );
    // sort ascending (with their vectors)
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[i].total_cmp(&d[j]));
    let values = order.iter().map(|&i| d[i]).collect();
    let vectors = if vectors {
        let mut v = vec![0.0; n * n];
        for (dst, &src) in v.chunks_exact_mut(n).zip(&order) {
            dst.copy_from_slice(&zt[src * n..(src + 1) * n]);
        }
        v
    } else {
        Vec::new()
    };
    SymEigen { values, vectors }
}

/// Householder reduction `A = Q T Qᵀ`. Returns the diagonal and super-diagonal of `T`
/// (`e[k] = T[k][k+1]`, `e[n−1] = 0`) and the reflector scalars; the reflector vectors are
/// left in `a`'s rows (`v_k` in `a[k][k+1..]`, with `v_k[0] = 1` implied by storage below).
fn tridiagonalize(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    let mut betas = vec![0.0; n];
    let mut p = vec![0.0; n];
    for k in 0..n.saturating_sub(2) {
        let m = n - k - 1; // size of the trailing block
                           // x = A[k+1.., k] = A[k][k+1..] by symmetry
        let x: Vec<f64> = a[k * n + k + 1..(k + 1) * n].to_vec();
        let alpha_sq: f64 = x.iter().map(|v| v * v).sum();
        let x0 = x[0];
        let norm = alpha_sq.sqrt();
        if norm == 0.0 || alpha_sq - x0 * x0 == 0.0 {
            // already tridiagonal in this column
            d[k] = a[k * n + k];
            e[k] = x0;
            betas[k] = 0.0;
            continue;
        }
        let alpha = if x0 >= 0.0 { -norm } else { norm };
        // v = x − alpha e1, beta = 2 / (vᵀv)
        let mut v = x;
        v[0] -= alpha;
        let vtv: f64 = v.iter().map(|t| t * t).sum();
        let beta = 2.0 / vtv;
        d[k] = a[k * n + k];
        e[k] = alpha;
        // p = beta A22 v, rows of A22 in parallel
        let start = k + 1;
        {
            let a_ro: &[f64] = a;
            p[..m]
                .par_iter_mut()
                .enumerate()
                .with_min_len(16)
                .for_each(|(i, pi)| {
                    let row = &a_ro[(start + i) * n + start..(start + i + 1) * n];
                    *pi = beta * dot(row, &v);
                });
        }
        // w = p − (beta pᵀv / 2) v
        let kcoef = beta * dot(&p[..m], &v) / 2.0;
        let w: Vec<f64> = p[..m]
            .iter()
            .zip(&v)
            .map(|(pi, vi)| pi - kcoef * vi)
            .collect();
        // A22 −= v wᵀ + w vᵀ
        a[start * n..]
            .par_chunks_exact_mut(n)
            .enumerate()
            .with_min_len(16)
            .for_each(|(i, row)| {
                let (vi, wi) = (v[i], w[i]);
                for ((r, &wj), &vj) in row[start..].iter_mut().zip(&w).zip(&v) {
                    *r -= vi * wj + wi * vj;
                }
            });
        // keep v (scaled so v[0] = 1) in row k for the accumulation of Q
        let v0 = v[0];
        for (dst, vi) in a[k * n + k + 1..(k + 1) * n].iter_mut().zip(&v) {
            *dst = vi / v0;
        }
        betas[k] = beta * v0 * v0;
    }
    if n >= 2 {
        d[n - 2] = a[(n - 2) * n + n - 2];
        e[n - 2] = a[(n - 2) * n + n - 1];
    }
    d[n - 1] = a[(n - 1) * n + n - 1];
    e[n - 1] = 0.0;
    (d, e, betas)
}

/// `Qᵀ` (row-major) from the reflectors stored by [`tridiagonalize`]: `Q = H_0 H_1 … H_{n−3}`,
/// accumulated backwards, then transposed so eigenvector rotations touch contiguous rows.
fn accumulate_q_transposed(a: &[f64], betas: &[f64], n: usize) -> Vec<f64> {
    let mut q = vec![0.0; n * n];
    for i in 0..n {
        q[i * n + i] = 1.0;
    }
    for k in (0..n.saturating_sub(2)).rev() {
        let beta = betas[k];
        if beta == 0.0 {
            continue;
        }
        let start = k + 1;
        let mut v = Vec::with_capacity(n - start);
        v.push(1.0);
        v.extend_from_slice(&a[k * n + k + 2..(k + 1) * n]);
        // u = vᵀ Q[start.., start..] (only columns start.. are non-identity there)
        let u: Vec<f64> = q[start * n..]
            .par_chunks_exact(n)
            .zip(v.par_iter())
            .with_min_len(32)
            .fold(
                || vec![0.0; n - start],
                |mut acc, (row, &vi)| {
                    acc.iter_mut()
                        .zip(&row[start..])
                        .for_each(|(s, &r)| *s += vi * r);
                    acc
                },
            )
            .reduce(
                || vec![0.0; n - start],
                |mut x, y| {
                    x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
                    x
                },
            );
        q[start * n..]
            .par_chunks_exact_mut(n)
            .zip(v.par_iter())
            .with_min_len(32)
            .for_each(|(row, &vi)| {
                let s = beta * vi;
                row[start..]
                    .iter_mut()
                    .zip(&u)
                    .for_each(|(r, &uj)| *r -= s * uj);
            });
    }
    // transpose
    let mut qt = vec![0.0; n * n];
    const B: usize = 32;
    for ib in (0..n).step_by(B) {
        for jb in (0..n).step_by(B) {
            for i in ib..(ib + B).min(n) {
                for j in jb..(jb + B).min(n) {
                    qt[j * n + i] = q[i * n + j];
                }
            }
        }
    }
    qt
}

/// Implicit QL with Wilkinson shifts on the symmetric tridiagonal `(d, e)` (`e[i]` couples
/// `i` and `i+1`). Eigenvalues replace `d`; if `zt` is given (rows = vectors), each sweep's
/// rotations are applied to its rows, in parallel over column blocks.
fn tridiagonal_ql(d: &mut [f64], e: &mut [f64], mut zt: Option<&mut Vec<f64>>, n: usize) {
    let mut rotations: Vec<(usize, f64, f64)> = Vec::new();
    for l in 0..n {
        let mut iter = 0;
        loop {
            let mut m = l;
            while m + 1 < n {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * dd {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iter += 1;
            if iter > 60 {
                break; // give up on this eigenvalue rather than loop forever
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[m] - d[l] + e[l] / (g + r.copysign(g));
            let (mut s, mut c, mut p) = (1.0f64, 1.0f64, 0.0f64);
            rotations.clear();
            let mut underflow = false;
            let mut i = m;
            while i > l {
                i -= 1;
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    underflow = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                rotations.push((i, c, s));
            }
            if let Some(z) = zt.as_deref_mut() {
                apply_rotations(z, n, &rotations);
            }
            if underflow {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
}

/// Applies the rotations `(i, c, s)` in order to rows `i`, `i+1` of `zt`:
/// `z[i+1] ← s z[i] + c z[i+1]`, `z[i] ← c z[i] − s z[i+1]`.
fn apply_rotations(zt: &mut [f64], n: usize, rotations: &[(usize, f64, f64)]) {
    if rotations.is_empty() {
        return;
    }
    // two blocks per thread keeps the threads balanced whatever n is
    let nblocks = (2 * rayon::current_num_threads())
        .min(n.div_ceil(32))
        .max(1);
    let block = n.div_ceil(nblocks);
    let nblocks = n.div_ceil(block);
    let ptr = SyncPtr(zt.as_mut_ptr());
    (0..nblocks).into_par_iter().for_each(|b| {
        let lo = b * block;
        let hi = (lo + block).min(n);
        let p = &ptr;
        for &(i, c, s) in rotations {
            // SAFETY: each task touches only columns lo..hi of rows i and i+1; the blocks are
            // disjoint, and i != i+1, so the two row slices never alias.
            let (ri, ri1) = unsafe {
                (
                    std::slice::from_raw_parts_mut(p.0.add(i * n + lo), hi - lo),
                    std::slice::from_raw_parts_mut(p.0.add((i + 1) * n + lo), hi - lo),
                )
            };
            for (x, y) in ri.iter_mut().zip(ri1.iter_mut()) {
                let (zi, zi1) = (*x, *y);
                *y = s * zi + c * zi1;
                *x = c * zi - s * zi1;
            }
        }
    });
}

struct SyncPtr(*mut f64);
// SAFETY: used only to hand disjoint column blocks of one buffer to rayon tasks.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg_matrix(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let b: Vec<f64> = (0..n * n).map(|_| next()).collect();
        // symmetric: (B + Bᵀ) / 2
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (b[i * n + j] + b[j * n + i]) / 2.0;
            }
        }
        a
    }

    #[test]
    fn eigen_reconstructs_the_matrix() {
        for &n in &[1usize, 2, 3, 7, 40, 130] {
            let a = lcg_matrix(n, n as u64);
            let eig = sym_eigen(a.clone(), n, true);
            // A v = λ v for each pair, and the vectors are orthonormal
            for i in 0..n {
                let v = &eig.vectors[i * n..(i + 1) * n];
                for r in 0..n {
                    let av: f64 = (0..n).map(|c| a[r * n + c] * v[c]).sum();
                    assert!(
                        (av - eig.values[i] * v[r]).abs() < 1e-11,
                        "n={n} pair {i} row {r}: {av} vs {}",
                        eig.values[i] * v[r]
                    );
                }
                for j in 0..n {
                    let vj = &eig.vectors[j * n..(j + 1) * n];
                    let d = dot(v, vj);
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((d - want).abs() < 1e-12, "n={n} <v{i},v{j}> = {d}");
                }
            }
            assert!(eig.values.windows(2).all(|w| w[0] <= w[1]));
            let no_vec = sym_eigen(a, n, false);
            for (x, y) in no_vec.values.iter().zip(&eig.values) {
                assert!((x - y).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn eigen_of_a_diagonal_and_of_a_degenerate_matrix() {
        let a = vec![3.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0];
        assert_eq!(sym_eigen(a, 3, false).values, vec![1.0, 2.0, 3.0]);
        // all-ones 4×4: eigenvalues 0, 0, 0, 4
        let eig = sym_eigen(vec![1.0; 16], 4, true);
        for (v, w) in eig.values.iter().zip([0.0, 0.0, 0.0, 4.0]) {
            assert!((v - w).abs() < 1e-12, "{:?}", eig.values);
        }
    }

    #[test]
    fn blocked_gram_equals_the_plain_product() {
        // 300 columns → 4 column blocks; 70 → 2; 10 → 1
        for &cols in &[300usize, 70, 10] {
            let rows = 37;
            let x: Vec<f64> = lcg_matrix(cols.max(rows), cols as u64)
                .into_iter()
                .take(rows * cols)
                .collect();
            let g = gram_t(&x, rows, cols).unwrap();
            for i in (0..cols).step_by(7) {
                for j in 0..cols {
                    let want: f64 = (0..rows).map(|r| x[r * cols + i] * x[r * cols + j]).sum();
                    assert!(
                        (g[i * cols + j] - want).abs() < 1e-12,
                        "cols {cols} ({i},{j})"
                    );
                }
            }
        }
    }

    #[test]
    fn covariance_matches_the_definition() {
        let x: Vec<f32> = vec![1.0, 2.0, 3.0, 5.0, 0.0, 1.0, 2.0, 2.0];
        let c = covariance(&x, 4, 2).unwrap();
        // columns [1,3,0,2] and [2,5,1,2]
        let (m0, m1) = (1.5, 2.5);
        let c01: f64 = [(1.0, 2.0), (3.0, 5.0), (0.0, 1.0), (2.0, 2.0)]
            .iter()
            .map(|(a, b)| (a - m0) * (b - m1))
            .sum::<f64>()
            / 3.0;
        assert!((c[1] - c01).abs() < 1e-12 && (c[2] - c01).abs() < 1e-12);
    }
}
