//! Causal self-attention with grouped-query heads: composed from candle ops ([`attention`],
//! inference, with a KV cache's offset mask) and as one op with a hand-written backward
//! ([`causal_attention`], training: one whole causal sequence).

use super::gemm::{cpu_tensor, gemm_strided, in_serial, slice, with_f32};
use anyhow::{ensure, Result};
use candle_core::{CpuStorage, Device, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Mutex;

/// Softmax over the last dimension, composed from differentiable ops (max-shifted).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Attention composed from candle ops: `softmax(Q·Kᵀ/√d + mask)·V` on `[batch, heads, seq, d]`
/// queries and `[batch, kv_heads, keys, d]` keys and values (grouped-query heads repeated as
/// transformers' `repeat_kv` does), `mask` `[seq, keys]` additive.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let rep = q.dim(1)? / k.dim(1)?;
    let (k, v) = (repeat_kv(k, rep)?, repeat_kv(v, rep)?);
    let d = q.dim(D::Minus1)?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax_last_dim(&scores)?.matmul(&v).map_err(Into::into)
}

/// `[batch, kv_heads, seq, d]` → `[batch, kv_heads · rep, seq, d]`, each kv head repeated `rep`
/// times in place (grouped-query attention, as transformers' `repeat_kv`).
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, h, rep, s, d))?
        .reshape((b, h * rep, s, d))?)
}

/// Additive mask `[seq, offset + seq]`: query `i` sees keys `0..=offset + i`. `None` for one query.
pub fn causal_mask(seq: usize, offset: usize, device: &Device) -> Result<Option<Tensor>> {
    if seq == 1 {
        return Ok(None);
    }
    let total = offset + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (seq, total), device)?))
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
        let tensor = |v: Vec<f32>, heads: usize| cpu_tensor(v, (b, heads, t, d));
        Ok((
            Some(tensor(dq, h)),
            Some(tensor(dk, kvh)),
            Some(tensor(dv, kvh)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::check::{check_gradient, uniform, weighted_sum};
    use crate::util::rng::Rng;
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

    #[test]
    fn softmax_gradient() {
        let mut rng = Rng::new(9);
        let x = uniform(&mut rng, &[2, 3, 7], 2.0);
        check_gradient(&[x], &|a| weighted_sum(&softmax_last_dim(&a[0])?, 10), 1e-2);
    }
}
