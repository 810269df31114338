//! Differentiable operations the training path needs beyond candle's own, each a `CustomOp`
//! with an analytic backward pass (and a finite-difference test below):
//!
//! - [`FrozenLinear`]: `y = x·Wᵀ (+ b)` with a frozen `W`. Its backward returns only the input
//!   gradient `g·W`; candle's `matmul` would also compute `xᵀ·g` for `W` even when `W` is a plain
//!   tensor (DESIGN.md §2, trap 2), which is most of the backward work of a frozen model.
//! - [`cross_entropy`]: per-row `logsumexp(l) − l[target]` over `[rows, vocab]` logits in one
//!   pass, whose backward is `softmax − onehot` in one more pass; the composed version would
//!   materialise several vocabulary-sized intermediates per row.
//!
//! The forward of [`FrozenLinear`] calls `gemm` exactly as candle's CPU `matmul` does, so it is
//! bit-identical to the inference path's `x.matmul(&w.t())`.

use anyhow::{bail, ensure, Result};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Target id that contributes neither loss nor gradient.
pub const IGNORE: u32 = u32::MAX;

/// A projection whose weight (and bias) never train: `y = x·Wᵀ (+ b)`, `W` stored `[out, in]`.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// Wraps a weight `[out, in]` (f32, contiguous) and an optional bias `[out]`.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (out, _) = weight.dims2()?;
        if let Some(b) = bias {
            ensure!(
                b.dims1()? == out,
                "bias has {} values for {out} outputs",
                b.dims1()?
            );
        }
        Ok(Self {
            weight: weight.detach().contiguous()?,
            bias: bias.map(|b| b.detach().contiguous()).transpose()?,
        })
    }

    /// Applies the projection to `x` `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1(self.clone())?)
    }
}

/// Runs `f` on the f32 values of a contiguous CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("wake2vec's training ops run on the CPU only")
    };
    if !layout.is_contiguous() {
        candle_core::bail!("internal: expected a contiguous tensor");
    }
    let s = cpu.as_slice::<f32>()?;
    Ok(f(
        &s[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()]
    ))
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]` with explicit (row, column) strides, through `gemm` with the
/// same arguments candle's CPU matmul uses.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    gemm_strided(m, n, k, dst, n, false, lhs, lhs_strides, rhs, rhs_strides)
}

thread_local! {
    /// Set inside tasks that already run in parallel (one attention head each): their products
    /// run on the calling thread.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn serial() -> bool {
    SERIAL.with(|s| s.get())
}

/// Runs `f` with this thread's products single-threaded.
fn in_serial<R>(f: impl FnOnce() -> R) -> R {
    SERIAL.with(|s| {
        let old = s.replace(true);
        let r = f();
        s.set(old);
        r
    })
}

/// `dst (+)= lhs · rhs` where `dst` rows are `dst_rs` apart (a column block of a wider matrix)
/// and `accumulate` adds to what `dst` holds.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() > (m - 1) * dst_rs + (n - 1) && dst_rs >= n);
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs)
                .take(m)
                .for_each(|row| row[..n].iter_mut().for_each(|x| *x = 0.0));
        }
        return;
    }
    assert!(k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    let threads = if serial() {
        1
    } else {
        candle_core::utils::get_num_threads()
    };
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index gemm touches inside the three slices, and the
    // destination rows do not overlap (dst_rs >= n).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if !l.is_contiguous() {
            candle_core::bail!("frozen-linear: the input must be contiguous");
        }
        let dims = l.dims();
        let inner = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let (out, w_in) = self.weight.dims2()?;
        if w_in != inner {
            candle_core::bail!("frozen-linear: input has {inner} features, weight expects {w_in}");
        }
        let x = &s.as_slice::<f32>()?[l.start_offset()..l.start_offset() + rows * inner];
        let mut dst = vec![0f32; rows * out];
        with_f32(&self.weight, |w| {
            gemm_f32(rows, out, inner, &mut dst, x, (inner, 1), w, (1, inner))
        })?;
        if let Some(b) = &self.bias {
            with_f32(b, |b| {
                dst.par_chunks_mut(out.max(1)).for_each(|row| {
                    row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                })
            })?;
        }
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap() = out;
        Ok((CpuStorage::F32(dst), Shape::from(shape)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (out, inner) = self.weight.dims2()?;
        let rows = grad.elem_count() / out.max(1);
        let g = grad.reshape((rows, out))?.matmul(&self.weight)?;
        debug_assert_eq!(g.dim(1)?, inner);
        Ok(Some(g.reshape(arg.shape())?))
    }
}

/// Per-row cross-entropy of `[rows, vocab]` logits against `targets` (one id per row,
/// [`IGNORE`] for rows without a target): `[rows]` values `logsumexp(row) − row[target]`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    check_targets(rows, vocab, targets)?;
    let op = CrossEntropy {
        targets: targets.to_vec(),
        lse: Mutex::new(Vec::new()),
    };
    Ok(logits.contiguous()?.apply_op1(op)?)
}

/// One target per row of logits, each [`IGNORE`] or a vocabulary id.
fn check_targets(rows: usize, vocab: usize, targets: &[u32]) -> Result<()> {
    ensure!(
        rows == targets.len(),
        "{rows} rows of logits but {} targets",
        targets.len()
    );
    if let Some(t) = targets
        .iter()
        .find(|&&t| t != IGNORE && t as usize >= vocab)
    {
        bail!("target id {t} is outside the vocabulary of {vocab}");
    }
    Ok(())
}

/// Mean cross-entropy over the rows that have a target: a scalar.
pub fn mean_cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let counted = targets.iter().filter(|&&t| t != IGNORE).count();
    ensure!(counted > 0, "no row has a target");
    Ok((cross_entropy(logits, targets)?.sum_all()? / counted as f64)?)
}

struct CrossEntropy {
    targets: Vec<u32>,
    /// logsumexp of each row, kept from the forward pass for the backward pass.
    lse: Mutex<Vec<f32>>,
}

/// `log Σ exp(x)` of one row, shifted by its maximum, the sum in f64.
fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f64 = row.iter().map(|&x| ((x - max).exp()) as f64).sum();
    (sum.ln() as f32) + max
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        if !l.is_contiguous() {
            candle_core::bail!("cross-entropy: the logits must be contiguous");
        }
        let x = &s.as_slice::<f32>()?[l.start_offset()..l.start_offset() + rows * vocab];
        let lse: Vec<f32> = x.par_chunks(vocab).map(logsumexp).collect();
        let loss: Vec<f32> = (0..rows)
            .map(|r| match self.targets[r] {
                IGNORE => 0.0,
                t => lse[r] - x[r * vocab + t as usize],
            })
            .collect();
        *self.lse.lock().expect("cross-entropy state") = lse;
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rows, vocab) = arg.dims2()?;
        let g: Vec<f32> = grad.to_vec1()?;
        let lse = self.lse.lock().expect("cross-entropy state").clone();
        let arg = arg.contiguous()?;
        let mut dst = vec![0f32; rows * vocab];
        with_f32(&arg, |x| {
            dst.par_chunks_mut(vocab)
                .zip(x.par_chunks(vocab))
                .enumerate()
                .for_each(|(r, (d, x))| {
                    let t = self.targets[r];
                    if t == IGNORE || g[r] == 0.0 {
                        return;
                    }
                    let (gr, m) = (g[r], lse[r]);
                    d.iter_mut()
                        .zip(x)
                        .for_each(|(d, &x)| *d = gr * (x - m).exp());
                    d[t as usize] -= gr;
                })
        })?;
        Ok(Some(Tensor::from_storage(
            Storage::Cpu(CpuStorage::F32(dst)),
            (rows, vocab),
            BackpropOp::none(),
            false,
        )))
    }
}

/// RMSNorm with a frozen weight, `y = x / √(mean(x²) + eps) · w`, as one operation whose backward
/// gives only `dx = r·(g⊙w) − x·r³·mean(g⊙w⊙x)` (`r` the inverse RMS of the row, kept from the
/// forward pass); the composed version runs six operations forward and a dozen backward.
pub fn rms_norm_frozen(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = *x.dims().last().unwrap_or(&0);
    ensure!(
        weight.dims1()? == d,
        "rms-norm: weight of {} for rows of {d}",
        weight.dims1()?
    );
    let op = RmsNorm {
        weight: weight.detach().contiguous()?,
        eps: eps as f32,
        inv_rms: std::sync::Arc::new(Mutex::new(Vec::new())),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

#[derive(Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
    inv_rms: std::sync::Arc<Mutex<Vec<f32>>>,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *l.dims().last().unwrap_or(&1);
        let x = slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        let r: Vec<f32> = with_f32(&self.weight, |w| {
            y.par_chunks_mut(d)
                .zip(x.par_chunks(d))
                .map(|(y, x)| {
                    let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                    let r = 1.0 / (ms + self.eps).sqrt();
                    y.iter_mut()
                        .zip(x)
                        .zip(w)
                        .for_each(|((y, &x), &w)| *y = (x * r) * w);
                    r
                })
                .collect()
        })?;
        *self.inv_rms.lock().expect("rms-norm state") = r;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let d = *arg.dims().last().unwrap_or(&1);
        let r = self.inv_rms.lock().expect("rms-norm state").clone();
        let (x, g) = (arg.contiguous()?, grad.contiguous()?);
        let mut dx = vec![0f32; x.elem_count()];
        with_f32(&x, |x| {
            with_f32(&g, |g| {
                with_f32(&self.weight, |w| {
                    dx.par_chunks_mut(d)
                        .zip(x.par_chunks(d).zip(g.par_chunks(d)))
                        .zip(r.par_iter())
                        .for_each(|((dx, (x, g)), &r)| {
                            let dot = x
                                .iter()
                                .zip(g)
                                .zip(w)
                                .map(|((x, g), w)| x * g * w)
                                .sum::<f32>()
                                / d as f32;
                            let c = r * r * r * dot;
                            dx.iter_mut()
                                .zip(x.iter().zip(g).zip(w))
                                .for_each(|(dx, ((&x, &g), &w))| *dx = r * g * w - x * c);
                        })
                })
            })
        })???;
        Ok(Some(Tensor::from_storage(
            Storage::Cpu(CpuStorage::F32(dx)),
            arg.shape().clone(),
            BackpropOp::none(),
            false,
        )))
    }
}

/// The gated MLP's activation `silu(gate) ⊙ up` as one operation (backward:
/// `dgate = dy·up·σ(g)·(1 + g·(1 − σ(g)))`, `dup = dy·silu(g)`).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    ensure!(
        gate.dims() == up.dims(),
        "swiglu: gate {:?} and up {:?} differ",
        gate.dims(),
        up.dims()
    );
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

#[derive(Clone, Copy)]
struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(1 << 14)
            .zip(g.par_chunks(1 << 14).zip(u.par_chunks(1 << 14)))
            .for_each(|(y, (g, u))| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gc, uc, dc) = (gate.contiguous()?, up.contiguous()?, grad.contiguous()?);
        let n = gate.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        with_f32(&gc, |g| {
            with_f32(&uc, |u| {
                with_f32(&dc, |dy| {
                    dg.par_chunks_mut(1 << 14)
                        .zip(du.par_chunks_mut(1 << 14))
                        .enumerate()
                        .for_each(|(k, (dg, du))| {
                            let o = k << 14;
                            for i in 0..dg.len() {
                                let (g, u, dy) = (g[o + i], u[o + i], dy[o + i]);
                                let s = sigmoid(g);
                                dg[i] = dy * u * s * (1.0 + g * (1.0 - s));
                                du[i] = dy * g * s;
                            }
                        })
                })
            })
        })???;
        let t = |v: Vec<f32>| {
            Tensor::from_storage(
                Storage::Cpu(CpuStorage::F32(v)),
                gate.shape().clone(),
                BackpropOp::none(),
                false,
            )
        };
        Ok((Some(t(dg)), Some(t(du))))
    }
}

/// Rotary embedding (HF half-split layout) on `x` `[batch, heads, seq, head_dim]` with tables
/// `[seq, head_dim / 2]`, as one operation: the backward is the inverse rotation of the gradient.
pub fn rope_fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    ensure!(
        d % 2 == 0 && cos.dims2()? == (t, d / 2) && sin.dims2()? == (t, d / 2),
        "rope: x {:?} with tables {:?}",
        x.dims(),
        cos.dims()
    );
    let op = Rope {
        cos: cos.detach().contiguous()?,
        sin: sin.detach().contiguous()?,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

#[derive(Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Rotates every `[seq, head_dim]` slice of `x` by `sign · angle`.
    fn rotate(&self, x: &[f32], t: usize, d: usize, sign: f32) -> candle_core::Result<Vec<f32>> {
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        with_f32(&self.cos, |cos| {
            with_f32(&self.sin, |sin| {
                y.par_chunks_mut(t * d)
                    .zip(x.par_chunks(t * d))
                    .for_each(|(y, x)| {
                        for p in 0..t {
                            let (c, s) = (
                                &cos[p * half..(p + 1) * half],
                                &sin[p * half..(p + 1) * half],
                            );
                            let (xr, yr) = (&x[p * d..(p + 1) * d], &mut y[p * d..(p + 1) * d]);
                            for i in 0..half {
                                let (x1, x2, s) = (xr[i], xr[i + half], sign * s[i]);
                                yr[i] = x1 * c[i] - x2 * s;
                                yr[i + half] = x2 * c[i] + x1 * s;
                            }
                        }
                    })
            })
        })??;
        Ok(y)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, _, t, d) = l.shape().dims4()?;
        let y = self.rotate(slice(s, l)?, t, d, 1.0)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, _, t, d) = arg.dims4()?;
        let g = grad.contiguous()?;
        let dx = with_f32(&g, |g| self.rotate(g, t, d, -1.0))??;
        Ok(Some(Tensor::from_storage(
            Storage::Cpu(CpuStorage::F32(dx)),
            arg.shape().clone(),
            BackpropOp::none(),
            false,
        )))
    }
}

/// Causal self-attention with grouped-query heads, forward and backward by hand:
/// `O = softmax(Q·Kᵀ/√d + causal mask)·V` per head, query head `h` reading key/value head
/// `h / (heads / kv_heads)`. Only the probabilities `P` are kept for the backward pass
/// (`dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = dS·K/√d`,
/// `dK = dSᵀ·Q/√d`); the composed version keeps about five `[heads, seq, seq]` tensors per layer
/// and runs some twenty separate passes over them.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, kvh, kt, kd) = k.dims4()?;
    ensure!(
        (kb, kt, kd) == (b, t, d) && v.dims4()? == (b, kvh, t, d) && kvh > 0 && h % kvh == 0,
        "attention: q {:?}, k {:?}, v {:?} do not fit together",
        q.dims(),
        k.dims(),
        v.dims()
    );
    let op = Attention {
        saved: std::sync::Arc::new(Mutex::new(None)),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// Row blocks `[r0, r1)` of a `t × t` causal product: the products of a block skip the keys
/// after `r1` (or, transposed, the queries before `r0`), whose probabilities are zero; the terms
/// they leave out are exact zeros, so the sums are unchanged.
fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    const BLOCK: usize = 64;
    (0..t)
        .step_by(BLOCK)
        .map(move |r0| (r0, (r0 + BLOCK).min(t)))
}

#[derive(Clone)]
struct Attention {
    /// `P` of every (batch, head), `[b·h, t, t]`.
    saved: std::sync::Arc<Mutex<Option<Vec<f32>>>>,
}

/// The slice of a contiguous `[.., t, d]` tensor's storage.
/// The f32 values a CPU storage holds under a contiguous layout.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let n = l.shape().elem_count();
    Ok(&s.as_slice::<f32>()?[l.start_offset()..l.start_offset() + n])
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = l1.shape().dims4()?;
        let kvh = l2.shape().dims4()?.1;
        let rep = h / kvh;
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let scale = 1.0 / (d as f32).sqrt();
        let mut p = vec![0f32; b * h * t * t];
        let mut out = vec![0f32; b * h * t * d];
        p.par_chunks_mut(t * t)
            .zip(out.par_chunks_mut(t * d))
            .enumerate()
            .for_each(|(bh, (p, o))| {
                let kv = (bh / h) * kvh + (bh % h) / rep;
                let (q, k, v) = (
                    &q[bh * t * d..(bh + 1) * t * d],
                    &k[kv * t * d..(kv + 1) * t * d],
                    &v[kv * t * d..(kv + 1) * t * d],
                );
                in_serial(|| {
                    // Causal: query rows [r0, r1) see keys [0, r1) only.
                    for (r0, r1) in causal_blocks(t) {
                        gemm_strided(
                            r1 - r0,
                            r1,
                            d,
                            &mut p[r0 * t..],
                            t,
                            false,
                            &q[r0 * d..],
                            (d, 1),
                            k,
                            (1, d),
                        );
                    }
                    for (i, row) in p.chunks_mut(t).enumerate() {
                        let live = &mut row[..=i];
                        let max = live
                            .iter()
                            .fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                        let mut sum = 0f32;
                        for x in live.iter_mut() {
                            *x = (*x * scale - max).exp();
                            sum += *x;
                        }
                        live.iter_mut().for_each(|x| *x /= sum);
                        row[i + 1..].iter_mut().for_each(|x| *x = 0.0);
                    }
                    for (r0, r1) in causal_blocks(t) {
                        let (o, p) = (&mut o[r0 * d..], &p[r0 * t..]);
                        gemm_strided(r1 - r0, d, r1, o, d, false, p, (t, 1), v, (d, 1));
                    }
                });
            });
        *self.saved.lock().expect("attention state") = Some(p);
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, t, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        let rep = h / kvh;
        let scale = 1.0 / (d as f32).sqrt();
        let Some(p) = self.saved.lock().expect("attention state").take() else {
            candle_core::bail!("attention: backward ran twice or without a forward pass");
        };
        let (q, k, v, g) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            grad.contiguous()?,
        );
        let mut dq = vec![0f32; b * h * t * d];
        // Per query head: dK and dV contributions, summed into the key/value heads below.
        let mut dk_h = vec![0f32; b * h * t * d];
        let mut dv_h = vec![0f32; b * h * t * d];
        with_f32(&q, |q| {
            with_f32(&k, |k| {
                with_f32(&v, |v| {
                    with_f32(&g, |g| {
                        dq.par_chunks_mut(t * d)
                            .zip(dk_h.par_chunks_mut(t * d))
                            .zip(dv_h.par_chunks_mut(t * d))
                            .enumerate()
                            .for_each(|(bh, ((dq, dk), dv))| {
                                let kv = (bh / h) * kvh + (bh % h) / rep;
                                let n = t * d;
                                let (q, k, v, g) = (
                                    &q[bh * n..(bh + 1) * n],
                                    &k[kv * n..(kv + 1) * n],
                                    &v[kv * n..(kv + 1) * n],
                                    &g[bh * n..(bh + 1) * n],
                                );
                                let p = &p[bh * t * t..(bh + 1) * t * t];
                                let mut ds = vec![0f32; t * t];
                                in_serial(|| {
                                    for (r0, r1) in causal_blocks(t) {
                                        // dV = Pᵀ·dO: key rows [r0, r1) from queries r0..
                                        gemm_strided(
                                            r1 - r0,
                                            d,
                                            t - r0,
                                            &mut dv[r0 * d..],
                                            d,
                                            false,
                                            &p[r0 * t + r0..],
                                            (1, t),
                                            &g[r0 * d..],
                                            (d, 1),
                                        );
                                        // dP = dO·Vᵀ: query rows [r0, r1) on keys ..r1
                                        gemm_strided(
                                            r1 - r0,
                                            r1,
                                            d,
                                            &mut ds[r0 * t..],
                                            t,
                                            false,
                                            &g[r0 * d..],
                                            (d, 1),
                                            v,
                                            (1, d),
                                        );
                                    }
                                    for (i, (dsr, pr)) in
                                        ds.chunks_mut(t).zip(p.chunks(t)).enumerate()
                                    {
                                        let dot: f32 = dsr[..=i]
                                            .iter()
                                            .zip(&pr[..=i])
                                            .map(|(a, b)| a * b)
                                            .sum();
                                        for (x, &pv) in dsr[..=i].iter_mut().zip(&pr[..=i]) {
                                            *x = pv * (*x - dot) * scale;
                                        }
                                        dsr[i + 1..].iter_mut().for_each(|x| *x = 0.0);
                                    }
                                    // dQ = dS·K, dK = dSᵀ·Q (the scale is in dS)
                                    for (r0, r1) in causal_blocks(t) {
                                        gemm_strided(
                                            r1 - r0,
                                            d,
                                            r1,
                                            &mut dq[r0 * d..],
                                            d,
                                            false,
                                            &ds[r0 * t..],
                                            (t, 1),
                                            k,
                                            (d, 1),
                                        );
                                        gemm_strided(
                                            r1 - r0,
                                            d,
                                            t - r0,
                                            &mut dk[r0 * d..],
                                            d,
                                            false,
                                            &ds[r0 * t + r0..],
                                            (1, t),
                                            &q[r0 * d..],
                                            (d, 1),
                                        );
                                    }
                                });
                            });
                    })
                })
            })
        })????;
        let mut dk = vec![0f32; b * kvh * t * d];
        let mut dv = vec![0f32; b * kvh * t * d];
        for bh in 0..b * h {
            let kv = (bh / h) * kvh + (bh % h) / rep;
            let (src_k, src_v) = (
                &dk_h[bh * t * d..(bh + 1) * t * d],
                &dv_h[bh * t * d..(bh + 1) * t * d],
            );
            dk[kv * t * d..(kv + 1) * t * d]
                .iter_mut()
                .zip(src_k)
                .for_each(|(a, x)| *a += x);
            dv[kv * t * d..(kv + 1) * t * d]
                .iter_mut()
                .zip(src_v)
                .for_each(|(a, x)| *a += x);
        }
        let tensor = |v: Vec<f32>, heads: usize| {
            Tensor::from_storage(
                Storage::Cpu(CpuStorage::F32(v)),
                (b, heads, t, d),
                BackpropOp::none(),
                false,
            )
        };
        Ok((
            Some(tensor(dq, h)),
            Some(tensor(dk, kvh)),
            Some(tensor(dv, kvh)),
        ))
    }
}

/// Logits buffers handed back by the backward pass for the next forward pass: a fresh
/// `[rows, vocab]` buffer (about 95 MB for SmolLM2 with the Wake rows) would be page-faulted and
/// cleared by the kernel at every micro-batch.
static LOGITS_BUFFERS: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `n` floats (contents unspecified), reused when one is free.
fn take_buffer(n: usize) -> Vec<f32> {
    let reused = {
        let mut pool = LOGITS_BUFFERS.lock().expect("buffer pool");
        let i = pool.iter().position(|b| b.capacity() >= n);
        i.map(|i| pool.swap_remove(i))
    };
    let mut v = reused.unwrap_or_else(|| crate::model::weights::huge_page_vec(n));
    v.resize(n, 0.0);
    v
}

/// Returns a buffer to the pool (at most two are kept).
fn give_buffer(v: Vec<f32>) {
    let mut pool = LOGITS_BUFFERS.lock().expect("buffer pool");
    if pool.len() < 2 {
        pool.push(v);
    }
}

/// `exp(logit − row max)` `[rows × vocab]` and per-row `1 / Σ exp` kept from the forward pass.
type Saved = (Vec<f32>, Vec<f32>);

/// The forward pass's logits until the backward pass takes them; a forward pass without a
/// backward one (evaluation) returns them to the pool when the graph is dropped.
#[derive(Default)]
struct SavedLogits(Mutex<Option<Saved>>);

impl Drop for SavedLogits {
    fn drop(&mut self) {
        if let Some((logits, _)) = self.0.lock().ok().and_then(|mut s| s.take()) {
            give_buffer(logits);
        }
    }
}

/// The head and the cross-entropy of Phase 1 in one operation: logits `h·Wᵀ` over a head whose
/// rows `start .. start + count` come from the trainable block `wake` and all others from the
/// frozen matrix `head`, then per-row `logsumexp − logit[target]`.
///
/// The logits are written by three `gemm` calls straight into one `[rows, vocab]` buffer (no
/// concatenation), kept for the backward pass and overwritten there by `g·(softmax − onehot)`,
/// from which `dh` (two accumulating `gemm`s over the frozen and trainable rows) and `dwake`
/// (one `gemm`) are computed. The frozen rows get no gradient work.
#[derive(Clone)]
pub struct WakeHeadLoss {
    /// The whole head `[vocab, hidden]` (its Wake rows are ignored).
    head: Tensor,
    start: usize,
    count: usize,
    targets: std::sync::Arc<Vec<u32>>,
    /// Logits and per-row logsumexp from the forward pass.
    saved: std::sync::Arc<SavedLogits>,
    /// When set, the Wake block's gradient is added here instead of being returned.
    sink: Option<std::sync::Arc<Mutex<Vec<f32>>>>,
}

impl WakeHeadLoss {
    /// Per-row loss `[rows]` of hidden states `h` `[rows, hidden]` against `targets`. With a
    /// `sink` (a `count × hidden` buffer) the Wake block's gradient is accumulated into it and
    /// the block gets none through candle.
    pub fn forward(
        head: &Tensor,
        start: usize,
        wake: &Tensor,
        h: &Tensor,
        targets: &[u32],
        sink: Option<std::sync::Arc<Mutex<Vec<f32>>>>,
    ) -> Result<Tensor> {
        let (vocab, hidden) = head.dims2()?;
        let (count, wake_hidden) = wake.dims2()?;
        let (rows, h_hidden) = h.dims2()?;
        ensure!(
            wake_hidden == hidden && h_hidden == hidden && start + count <= vocab,
            "wake-head-loss: head {vocab}×{hidden}, Wake block {count}×{wake_hidden} at {start}, hidden states {rows}×{h_hidden}"
        );
        check_targets(rows, vocab, targets)?;
        let op = WakeHeadLoss {
            head: head.detach().contiguous()?,
            start,
            count,
            targets: std::sync::Arc::new(targets.to_vec()),
            saved: Default::default(),
            sink,
        };
        let wake = if op.sink.is_some() {
            wake.detach()
        } else {
            wake.clone()
        };
        Ok(h.contiguous()?.apply_op2(&wake.contiguous()?, op)?)
    }
}

impl candle_core::CustomOp2 for WakeHeadLoss {
    fn name(&self) -> &'static str {
        "wake-head-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, d) = l1.shape().dims2()?;
        let (vocab, _) = self.head.dims2()?;
        let h = &s1.as_slice::<f32>()?[l1.start_offset()..l1.start_offset() + rows * d];
        let wake = &s2.as_slice::<f32>()?[l2.start_offset()..l2.start_offset() + self.count * d];
        let mut logits = take_buffer(rows * vocab);
        let (start, end) = (self.start, self.start + self.count);
        with_f32(&self.head, |w| {
            // Frozen rows before and after the Wake block, then the Wake block.
            gemm_strided(
                rows,
                start,
                d,
                &mut logits,
                vocab,
                false,
                h,
                (d, 1),
                w,
                (1, d),
            );
            if end < vocab {
                gemm_strided(
                    rows,
                    vocab - end,
                    d,
                    &mut logits[end..],
                    vocab,
                    false,
                    h,
                    (d, 1),
                    &w[end * d..],
                    (1, d),
                );
            }
        })?;
        gemm_strided(
            rows,
            self.count,
            d,
            &mut logits[start..],
            vocab,
            false,
            h,
            (d, 1),
            wake,
            (1, d),
        );
        // Per row: the loss, and the logits replaced by exp(logit − max) with 1/Σ kept, so the
        // backward pass gets the softmax without a second exponential per logit.
        let (loss, inv_sum): (Vec<f32>, Vec<f32>) = logits
            .par_chunks_mut(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let picked = if t == IGNORE { 0.0 } else { row[t as usize] };
                let mut sum = 0f64;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x as f64;
                }
                let lse = (sum.ln() as f32) + max;
                let loss = if t == IGNORE { 0.0 } else { lse - picked };
                (loss, (1.0 / sum) as f32)
            })
            .unzip();
        *self.saved.0.lock().expect("wake-head-loss state") = Some((logits, inv_sum));
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        wake: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, d) = h.dims2()?;
        let (vocab, _) = self.head.dims2()?;
        let (start, end) = (self.start, self.start + self.count);
        let g: Vec<f32> = grad.to_vec1()?;
        let Some((mut dl, inv_sum)) = self.saved.0.lock().expect("wake-head-loss state").take()
        else {
            candle_core::bail!("wake-head-loss: backward ran twice or without a forward pass");
        };
        // dlogits = g · (softmax − onehot), in place.
        dl.par_chunks_mut(vocab).enumerate().for_each(|(r, row)| {
            let t = self.targets[r];
            if t == IGNORE || g[r] == 0.0 {
                row.iter_mut().for_each(|x| *x = 0.0);
                return;
            }
            let scale = g[r] * inv_sum[r];
            row.iter_mut().for_each(|x| *x *= scale);
            row[t as usize] -= g[r];
        });
        let mut dh = vec![0f32; rows * d];
        with_f32(&self.head, |w| {
            gemm_strided(rows, d, start, &mut dh, d, true, &dl, (vocab, 1), w, (d, 1));
            if end < vocab {
                gemm_strided(
                    rows,
                    d,
                    vocab - end,
                    &mut dh,
                    d,
                    true,
                    &dl[end..],
                    (vocab, 1),
                    &w[end * d..],
                    (d, 1),
                );
            }
        })?;
        let wake_c = wake.contiguous()?;
        with_f32(&wake_c, |wv| {
            gemm_strided(
                rows,
                d,
                self.count,
                &mut dh,
                d,
                true,
                &dl[start..],
                (vocab, 1),
                wv,
                (d, 1),
            )
        })?;
        let h_c = h.contiguous()?;
        // dwake = dlogits[:, start..end]ᵀ · h, into the sink or a new buffer.
        // In blocks of Wake rows, one per task: a single product packs the whole transposed
        // `count × rows` operand into a fresh buffer (45 MB for SmolLM2, 11K page faults a step);
        // blocks pack 2 MB each, from memory the allocator reuses.
        const BLOCK: usize = 2048;
        let dwake_into = |dst: &mut [f32], accumulate: bool| {
            with_f32(&h_c, |hv| {
                dst.par_chunks_mut(BLOCK * d)
                    .enumerate()
                    .for_each(|(b, dst)| {
                        in_serial(|| {
                            gemm_strided(
                                dst.len() / d,
                                d,
                                rows,
                                dst,
                                d,
                                accumulate,
                                &dl[start + b * BLOCK..],
                                (1, vocab),
                                hv,
                                (d, 1),
                            )
                        })
                    })
            })
        };
        let dwake = match &self.sink {
            // A frozen block (Phase 2 reads its Wake rows through this op too): no gradient.
            None if !wake.track_op() => None,
            Some(sink) => {
                let mut buf = sink.lock().expect("gradient sink");
                if buf.len() != self.count * d {
                    candle_core::bail!("wake-head-loss: the gradient sink has the wrong size");
                }
                dwake_into(&mut buf, true)?;
                None
            }
            None => {
                let mut buf = vec![0f32; self.count * d];
                dwake_into(&mut buf, false)?;
                Some(buf)
            }
        };
        give_buffer(dl);
        let tensor = |v: Vec<f32>, shape: (usize, usize)| {
            Tensor::from_storage(
                Storage::Cpu(CpuStorage::F32(v)),
                shape,
                BackpropOp::none(),
                false,
            )
        };
        Ok((
            Some(tensor(dh, (rows, d))),
            dwake.map(|v| tensor(v, (self.count, d))),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::llama::{rms_norm, rope, softmax_last_dim};
    use crate::sampling::Rng;
    use candle_core::{Device, Var, D};

    /// A tensor of uniform values in [-scale, scale).
    pub(crate) fn uniform(rng: &mut Rng, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Checks the analytic gradient of `f` (a scalar function of `inputs`) against central
    /// differences: every element of small inputs, and one random direction of all of them.
    /// Returns the largest relative error seen.
    pub(crate) fn check_gradient(
        inputs: &[Tensor],
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        tol: f64,
    ) -> f64 {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let loss = f(&args).unwrap();
        let grads = loss.backward().unwrap();
        let eval = |xs: &[Tensor]| -> f64 { f(xs).unwrap().to_scalar::<f32>().unwrap() as f64 };
        let eps = 1e-2f32;
        let mut worst = 0f64;
        for (i, v) in vars.iter().enumerate() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("input {i} got no gradient: the graph dropped it"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            let x: Vec<f32> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
            let shape = inputs[i].shape().clone();
            let at = |x: Vec<f32>| -> f64 {
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(x, shape.clone(), &Device::Cpu).unwrap();
                eval(&xs)
            };
            // Element by element (capped, so big inputs stay quick).
            let scale = g.iter().map(|v| v.abs() as f64).fold(1e-3, f64::max);
            for j in (0..x.len()).step_by((x.len() / 64).max(1)) {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[j] += eps;
                xm[j] -= eps;
                let fd = (at(xp) - at(xm)) / (2.0 * eps as f64);
                let err = (fd - g[j] as f64).abs() / scale;
                worst = worst.max(err);
                assert!(
                    err < tol,
                    "input {i} element {j}: analytic {} vs finite difference {fd} (rel. err {err:.2e})",
                    g[j]
                );
            }
            // One random direction over every element.
            let mut rng = Rng::new(7 + i as u64);
            let u: Vec<f32> = (0..x.len()).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let dir: f64 = g.iter().zip(&u).map(|(g, u)| (g * u) as f64).sum();
            let step = |s: f32| x.iter().zip(&u).map(|(x, u)| x + s * u).collect::<Vec<_>>();
            let fd = (at(step(eps)) - at(step(-eps))) / (2.0 * eps as f64);
            let err = (fd - dir).abs() / dir.abs().max(1e-3);
            worst = worst.max(err);
            assert!(
                err < tol,
                "input {i}: directional derivative {dir} vs finite difference {fd} (rel. err {err:.2e})"
            );
        }
        worst
    }

    /// `Σ w ⊙ y`: a scalar that weighs every output differently.
    pub(crate) fn weighted_sum(y: &Tensor, seed: u64) -> Result<Tensor> {
        let w = uniform(&mut Rng::new(seed), y.dims(), 1.0);
        Ok((y * w)?.sum_all()?)
    }

    #[test]
    fn frozen_linear_forward_is_bit_identical_to_matmul() {
        let mut rng = Rng::new(1);
        let x = uniform(&mut rng, &[2, 5, 12], 1.0);
        let w = uniform(&mut rng, &[7, 12], 1.0);
        let b = uniform(&mut rng, &[7], 1.0);
        let ours = FrozenLinear::new(&w, Some(&b))
            .unwrap()
            .forward(&x)
            .unwrap();
        let theirs = crate::model::llama::Linear {
            weight: w,
            bias: Some(b),
        }
        .forward(&x)
        .unwrap();
        let a: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = theirs.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn frozen_linear_gradient() {
        let mut rng = Rng::new(2);
        let x = uniform(&mut rng, &[3, 4, 6], 1.0);
        let w = uniform(&mut rng, &[5, 6], 1.0);
        let b = uniform(&mut rng, &[5], 1.0);
        let lin = FrozenLinear::new(&w, Some(&b)).unwrap();
        check_gradient(&[x], &|a| weighted_sum(&lin.forward(&a[0])?, 3), 1e-2);
    }

    #[test]
    fn frozen_linear_gives_the_weight_no_gradient() {
        let mut rng = Rng::new(3);
        let x = Var::from_tensor(&uniform(&mut rng, &[4, 6], 1.0)).unwrap();
        let w = Var::from_tensor(&uniform(&mut rng, &[5, 6], 1.0)).unwrap();
        let y = FrozenLinear::new(w.as_tensor(), None)
            .unwrap()
            .forward(x.as_tensor())
            .unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(w.as_tensor()).is_none());
    }

    #[test]
    fn cross_entropy_matches_composed_log_softmax() {
        let mut rng = Rng::new(4);
        let logits = uniform(&mut rng, &[6, 11], 4.0);
        let targets = [3u32, 0, 10, IGNORE, 7, 7];
        let ours: Vec<f32> = cross_entropy(&logits, &targets).unwrap().to_vec1().unwrap();
        let lse: Vec<f32> = logits.log_sum_exp(D::Minus1).unwrap().to_vec1().unwrap();
        let l: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        for (r, &t) in targets.iter().enumerate() {
            let want = if t == IGNORE {
                0.0
            } else {
                lse[r] - l[r][t as usize]
            };
            assert!(
                (ours[r] - want).abs() < 1e-5,
                "row {r}: {} vs {want}",
                ours[r]
            );
        }
    }

    #[test]
    fn cross_entropy_gradient() {
        let mut rng = Rng::new(5);
        let logits = uniform(&mut rng, &[5, 9], 3.0);
        let targets = [1u32, 8, IGNORE, 0, 4];
        check_gradient(&[logits], &|a| mean_cross_entropy(&a[0], &targets), 1e-2);
    }

    #[test]
    fn rms_norm_gradient() {
        let mut rng = Rng::new(6);
        let x = uniform(&mut rng, &[2, 3, 8], 1.0);
        let w = uniform(&mut rng, &[8], 1.0);
        check_gradient(
            &[x, w],
            &|a| weighted_sum(&rms_norm(&a[0], &a[1], 1e-5)?, 8),
            1e-2,
        );
    }

    #[test]
    fn softmax_gradient() {
        let mut rng = Rng::new(9);
        let x = uniform(&mut rng, &[2, 3, 7], 2.0);
        check_gradient(&[x], &|a| weighted_sum(&softmax_last_dim(&a[0])?, 10), 1e-2);
    }

    #[test]
    fn rope_gradient() {
        let mut rng = Rng::new(11);
        let x = uniform(&mut rng, &[1, 2, 5, 8], 1.0);
        let cos = uniform(&mut rng, &[5, 4], 1.0);
        let sin = uniform(&mut rng, &[5, 4], 1.0);
        check_gradient(&[x], &|a| weighted_sum(&rope(&a[0], &cos, &sin)?, 12), 1e-2);
    }

    #[test]
    fn silu_mlp_gradient() {
        let mut rng = Rng::new(13);
        let x = uniform(&mut rng, &[4, 6], 1.0);
        let gate = FrozenLinear::new(&uniform(&mut rng, &[10, 6], 0.5), None).unwrap();
        let up = FrozenLinear::new(&uniform(&mut rng, &[10, 6], 0.5), None).unwrap();
        let down = FrozenLinear::new(&uniform(&mut rng, &[6, 10], 0.5), None).unwrap();
        check_gradient(
            &[x],
            &|a| {
                let h = (gate.forward(&a[0])?.silu()? * up.forward(&a[0])?)?;
                weighted_sum(&down.forward(&h)?, 14)
            },
            1e-2,
        );
    }

    #[test]
    fn embedding_lookup_gradient() {
        let mut rng = Rng::new(15);
        let table = uniform(&mut rng, &[7, 4], 1.0);
        let ids = Tensor::new(&[3u32, 0, 3, 6, 1], &Device::Cpu).unwrap();
        check_gradient(
            &[table],
            &|a| weighted_sum(&a[0].index_select(&ids, 0)?, 16),
            1e-2,
        );
    }
}

#[cfg(test)]
mod head_loss_tests {
    use super::tests::{check_gradient, uniform};
    use super::*;
    use crate::sampling::Rng;

    /// The fused op against the composed path (frozen head rows + trainable rows, cat, CE).
    fn composed(head: &Tensor, start: usize, wake: &Tensor, h: &Tensor, t: &[u32]) -> Tensor {
        let (vocab, _) = head.dims2().unwrap();
        let count = wake.dim(0).unwrap();
        let mut parts = vec![h
            .matmul(&head.narrow(0, 0, start).unwrap().t().unwrap())
            .unwrap()];
        parts.push(h.matmul(&wake.t().unwrap()).unwrap());
        if start + count < vocab {
            let tail = head
                .narrow(0, start + count, vocab - start - count)
                .unwrap();
            parts.push(h.matmul(&tail.t().unwrap()).unwrap());
        }
        cross_entropy(&Tensor::cat(&parts, 1).unwrap(), t).unwrap()
    }

    #[test]
    fn matches_the_composed_head_and_cross_entropy_with_and_without_a_tail() {
        let mut rng = Rng::new(21);
        for (vocab, start, count) in [(40, 25, 15), (40, 20, 12), (40, 0, 40)] {
            let head = uniform(&mut rng, &[vocab, 8], 1.0);
            let wake = uniform(&mut rng, &[count, 8], 1.0);
            let h = uniform(&mut rng, &[6, 8], 1.0);
            let t = [3u32, (vocab - 1) as u32, IGNORE, 22, 0, (start + 1) as u32];
            let ours: Vec<f32> = WakeHeadLoss::forward(&head, start, &wake, &h, &t, None)
                .unwrap()
                .to_vec1()
                .unwrap();
            let theirs: Vec<f32> = composed(&head, start, &wake, &h, &t).to_vec1().unwrap();
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() < 1e-5, "{vocab}/{start}/{count}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn wake_gradient_into_the_sink_over_several_blocks_matches_the_composed_path() {
        // More Wake rows than one block of the blocked dwake product.
        let mut rng = Rng::new(23);
        let (start, count, hidden) = (7, 2 * 2048 + 37, 4);
        let vocab = start + count + 5;
        let head = uniform(&mut rng, &[vocab, hidden], 1.0);
        let wake = uniform(&mut rng, &[count, hidden], 1.0);
        let h = uniform(&mut rng, &[3, hidden], 1.0);
        let t = [2u32, (start + count - 1) as u32, (vocab - 1) as u32];
        let sink = std::sync::Arc::new(Mutex::new(vec![0.5f32; count * hidden]));
        // The hidden states are a variable, so the backward pass runs (the sink's block is not).
        let hv = candle_core::Var::from_tensor(&h).unwrap();
        let loss =
            WakeHeadLoss::forward(&head, start, &wake, hv.as_tensor(), &t, Some(sink.clone()))
                .unwrap()
                .sum_all()
                .unwrap();
        loss.backward().unwrap();
        let var = candle_core::Var::from_tensor(&wake).unwrap();
        let theirs = composed(&head, start, var.as_tensor(), &h, &t)
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want: Vec<f32> = theirs
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = sink.lock().unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // The sink accumulates onto what it held (0.5).
            assert!(
                (a - 0.5 - b).abs() < 1e-5,
                "element {i}: {} vs {b}",
                a - 0.5
            );
        }
    }

    #[test]
    fn gradient_of_hidden_states_and_wake_rows() {
        let mut rng = Rng::new(22);
        let head = uniform(&mut rng, &[30, 6], 1.0);
        let wake = uniform(&mut rng, &[10, 6], 1.0);
        let h = uniform(&mut rng, &[5, 6], 1.0);
        let t = [1u32, 29, 15, IGNORE, 24];
        for start in [12, 20] {
            check_gradient(
                &[h.clone(), wake.clone()],
                &|a| {
                    let l = WakeHeadLoss::forward(&head, start, &a[1], &a[0], &t, None)?;
                    super::tests::weighted_sum(&l, 23)
                },
                1e-2,
            );
        }
    }
}

#[cfg(test)]
mod attention_tests {
    use super::tests::{check_gradient, uniform, weighted_sum};
    use super::*;
    use crate::model::llama::softmax_last_dim;
    use crate::sampling::Rng;
    use candle_core::Var;

    /// The composed attention of the inference path (GQA repeat, scale, causal mask, softmax).
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let kvh = k.dim(1).unwrap();
        let rep = h / kvh;
        let expand = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kvh, rep, t, d))
                .unwrap()
                .reshape((b, h, t, d))
                .unwrap()
        };
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &candle_core::Device::Cpu).unwrap();
        let s = (q.matmul(&expand(k).t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt())).unwrap();
        softmax_last_dim(&s.broadcast_add(&mask).unwrap())
            .unwrap()
            .matmul(&expand(v))
            .unwrap()
    }

    #[test]
    fn matches_the_composed_attention() {
        let mut rng = Rng::new(31);
        let q = uniform(&mut rng, &[2, 6, 9, 8], 1.5);
        let k = uniform(&mut rng, &[2, 2, 9, 8], 1.5);
        let v = uniform(&mut rng, &[2, 2, 9, 8], 1.0);
        let ours: Vec<f32> = causal_attention(&q, &k, &v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs: Vec<f32> = composed(&q, &k, &v)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn sequences_of_several_causal_blocks_match_the_composed_attention_and_its_gradient() {
        // 150 positions: two whole blocks of 64 and a partial one.
        let mut rng = Rng::new(34);
        let q = Var::from_tensor(&uniform(&mut rng, &[1, 4, 150, 8], 1.5)).unwrap();
        let k = Var::from_tensor(&uniform(&mut rng, &[1, 2, 150, 8], 1.5)).unwrap();
        let v = Var::from_tensor(&uniform(&mut rng, &[1, 2, 150, 8], 1.0)).unwrap();
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let ours = causal_attention(qt, kt, vt).unwrap();
        let theirs = composed(qt, kt, vt);
        let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        for (a, b) in flat(&ours).iter().zip(&flat(&theirs)) {
            assert!((a - b).abs() < 1e-5, "output {a} vs {b}");
        }
        let g_ours = weighted_sum(&ours, 35).unwrap().backward().unwrap();
        let g_theirs = weighted_sum(&theirs, 35).unwrap().backward().unwrap();
        for (name, x) in [("q", qt), ("k", kt), ("v", vt)] {
            let (a, b) = (flat(g_ours.get(x).unwrap()), flat(g_theirs.get(x).unwrap()));
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                assert!((a - b).abs() < 1e-4, "d{name}[{i}]: {a} vs {b}");
            }
        }
    }

    #[test]
    fn gradient_of_queries_keys_and_values() {
        let mut rng = Rng::new(32);
        let q = uniform(&mut rng, &[1, 4, 5, 3], 1.0);
        let k = uniform(&mut rng, &[1, 2, 5, 3], 1.0);
        let v = uniform(&mut rng, &[1, 2, 5, 3], 1.0);
        check_gradient(
            &[q, k, v],
            &|a| weighted_sum(&causal_attention(&a[0], &a[1], &a[2])?, 33),
            1e-2,
        );
    }
}

#[cfg(test)]
mod norm_rope_tests {
    use super::tests::{check_gradient, uniform, weighted_sum};
    use super::*;
    use crate::model::llama::{rms_norm, rope};
    use crate::sampling::Rng;

    fn close(a: &Tensor, b: &Tensor) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn rms_norm_matches_the_composed_one_and_its_gradient() {
        let mut rng = Rng::new(41);
        let x = uniform(&mut rng, &[2, 3, 8], 1.0);
        let w = uniform(&mut rng, &[8], 1.0);
        close(
            &rms_norm_frozen(&x, &w, 1e-5).unwrap(),
            &rms_norm(&x, &w, 1e-5).unwrap(),
        );
        check_gradient(
            &[x],
            &|a| weighted_sum(&rms_norm_frozen(&a[0], &w, 1e-5)?, 42),
            1e-2,
        );
    }

    #[test]
    fn swiglu_matches_silu_times_up_and_its_gradient() {
        let mut rng = Rng::new(45);
        let g = uniform(&mut rng, &[3, 7], 3.0);
        let u = uniform(&mut rng, &[3, 7], 1.0);
        close(&swiglu(&g, &u).unwrap(), &(g.silu().unwrap() * &u).unwrap());
        check_gradient(&[g, u], &|a| weighted_sum(&swiglu(&a[0], &a[1])?, 46), 1e-2);
        // Against candle's own gradients of the composed form, over several chunks.
        let g = candle_core::Var::from_tensor(&uniform(&mut rng, &[40, 1000], 4.0)).unwrap();
        let u = candle_core::Var::from_tensor(&uniform(&mut rng, &[40, 1000], 1.0)).unwrap();
        let ours = weighted_sum(&swiglu(&g, &u).unwrap(), 47)
            .unwrap()
            .backward()
            .unwrap();
        let theirs = weighted_sum(&(g.silu().unwrap() * u.as_tensor()).unwrap(), 47)
            .unwrap()
            .backward()
            .unwrap();
        for v in [&g, &u] {
            close(ours.get(v).unwrap(), theirs.get(v).unwrap());
        }
    }

    #[test]
    fn rope_matches_the_composed_one_and_its_gradient() {
        let mut rng = Rng::new(43);
        let x = uniform(&mut rng, &[1, 2, 5, 8], 1.0);
        let cos = uniform(&mut rng, &[5, 4], 1.0);
        let sin = uniform(&mut rng, &[5, 4], 1.0);
        close(
            &rope_fused(&x, &cos, &sin).unwrap(),
            &rope(&x, &cos, &sin).unwrap(),
        );
        // A true rotation (cos² + sin² = 1) for the gradient check: the backward is its inverse.
        let angle = uniform(&mut rng, &[5, 4], 3.0);
        let (cos, sin) = (angle.cos().unwrap(), angle.sin().unwrap());
        check_gradient(
            &[x],
            &|a| weighted_sum(&rope_fused(&a[0], &cos, &sin)?, 44),
            1e-2,
        );
    }
}
