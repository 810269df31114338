//! The LoRA update `scale·(mask ⊙ x)·Aᵀ·Bᵀ` of one adapted projection as one op with a
//! hand-written backward, and the seeded inverted-dropout masks it redraws in the backward pass
//! instead of keeping them (composed from candle ops, the 180 adapters of SmolLM2 kept ~2 GB of
//! masks per 8×256 micro-batch).

use super::gemm::{gemm_f32, slice};
use crate::util::rng::{splitmix64, Rng};
use anyhow::{ensure, Result};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Values per independently seeded chunk of a dropout mask (chunks are drawn in parallel; the
/// mask depends only on the seed, the stream and the shape, never on the thread count).
const MASK_CHUNK: usize = 1 << 14;

/// An inverted-dropout mask of `n` values for stream `(seed, layer, target)` (`target`: the
/// projection's index in a block): each value is 0
/// with probability `p` and `1/(1 − p)` otherwise. A value is dropped when a 32-bit draw is
/// below `p·2³²`; each chunk of [`MASK_CHUNK`] values has its own generator.
pub fn dropout_mask(n: usize, p: f64, seed: u64, layer: usize, target: usize) -> Vec<f32> {
    let stream = splitmix64(splitmix64(splitmix64(seed) ^ layer as u64) ^ target as u64);
    let threshold = (p * 4_294_967_296.0).round() as u64;
    let keep = (1.0 / (1.0 - p)) as f32;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(MASK_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = Rng::new(splitmix64(stream ^ c as u64));
            for pair in chunk.chunks_mut(2) {
                let bits = rng.next_u64();
                for (k, v) in pair.iter_mut().enumerate() {
                    let u = (bits >> (32 * k)) & 0xFFFF_FFFF;
                    *v = if u < threshold { 0.0 } else { keep };
                }
            }
        });
    out
}

/// The dropout mask of one adapter application.
#[derive(Debug, Clone)]
pub enum Mask {
    /// No dropout (evaluation, or p = 0).
    None,
    /// An explicit mask `[rows·in]`.
    Given(std::sync::Arc<Vec<f32>>),
    /// [`dropout_mask`]`(rows·in, p, seed, layer, target)`, drawn again in the backward pass
    /// instead of being kept in memory.
    Seeded {
        p: f64,
        seed: u64,
        layer: usize,
        target: usize,
    },
}

impl Mask {
    fn values(&self, n: usize) -> Option<std::borrow::Cow<'_, [f32]>> {
        match self {
            Mask::None => None,
            Mask::Given(m) => Some(std::borrow::Cow::Borrowed(m.as_slice())),
            Mask::Seeded {
                p,
                seed,
                layer,
                target,
            } => Some(std::borrow::Cow::Owned(dropout_mask(
                n, *p, *seed, *layer, *target,
            ))),
        }
    }
}

/// A LoRA adapter's contribution `scale·(mask ⊙ x)·Aᵀ·Bᵀ` for `x` `[rows, in]`, as one operation
/// with a hand-written backward pass (gradients for `x`, `A` and `B`; the masked input and the
/// `[rows, r]` product are recomputed there rather than kept). Composed from candle ops the
/// 180 adapters of SmolLM2 made a micro-batch 1.7× slower than Phase 1's.
pub fn lora_delta(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64, mask: Mask) -> Result<Tensor> {
    let (rows, inp) = x.dims2()?;
    let (r, a_in) = a.dims2()?;
    let (out, b_r) = b.dims2()?;
    ensure!(
        a_in == inp && b_r == r,
        "LoRA shapes: x {rows}×{inp}, A {r}×{a_in}, B {out}×{b_r}"
    );
    if let Mask::Given(m) = &mask {
        ensure!(m.len() == rows * inp, "the dropout mask has the wrong size");
    }
    let op = LoraDelta {
        scale: scale as f32,
        mask,
    };
    Ok(x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?)
}

struct LoraDelta {
    scale: f32,
    mask: Mask,
}

/// `(mask ⊙ x)` and `t = (mask ⊙ x)·Aᵀ` of the forward pass.
fn masked_and_low_rank(
    x: &[f32],
    a: &[f32],
    mask: Option<&[f32]>,
    (rows, inp, r): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let xm: Vec<f32> = match mask {
        Some(m) => x.iter().zip(m).map(|(x, m)| x * m).collect(),
        None => x.to_vec(),
    };
    let mut t = vec![0f32; rows * r];
    gemm_f32(rows, r, inp, &mut t, &xm, (inp, 1), a, (1, inp));
    (xm, t)
}

impl CustomOp3 for LoraDelta {
    fn name(&self) -> &'static str {
        "lora-delta"
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
        let (rows, inp) = l1.shape().dims2()?;
        let (r, _) = l2.shape().dims2()?;
        let (out, _) = l3.shape().dims2()?;
        let (x, a, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let mask = self.mask.values(rows * inp);
        let (_, mut t) = masked_and_low_rank(x, a, mask.as_deref(), (rows, inp, r));
        t.iter_mut().for_each(|v| *v *= self.scale);
        let mut y = vec![0f32; rows * out];
        gemm_f32(rows, out, r, &mut y, &t, (r, 1), b, (1, r));
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let (r, _) = a.dims2()?;
        let (out, _) = b.dims2()?;
        let (x, a, b) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
        let dy: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        let (x, a, b): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            x.flatten_all()?.to_vec1()?,
            a.flatten_all()?.to_vec1()?,
            b.flatten_all()?.to_vec1()?,
        );
        let mask = self.mask.values(rows * inp);
        let (xm, t) = masked_and_low_rank(&x, &a, mask.as_deref(), (rows, inp, r));
        let s = self.scale;
        // dyB = dy·B [rows, r]; dB = s·dyᵀ·t [out, r]; dA = s·dyBᵀ·xm [r, in];
        // dx = s·(dyB·A) ⊙ mask [rows, in].
        let mut dyb = vec![0f32; rows * r];
        gemm_f32(rows, r, out, &mut dyb, &dy, (out, 1), &b, (r, 1));
        let mut db = vec![0f32; out * r];
        gemm_f32(out, r, rows, &mut db, &dy, (1, out), &t, (r, 1));
        let mut da = vec![0f32; r * inp];
        gemm_f32(r, inp, rows, &mut da, &dyb, (1, r), &xm, (inp, 1));
        let mut dx = vec![0f32; rows * inp];
        gemm_f32(rows, inp, r, &mut dx, &dyb, (r, 1), &a, (inp, 1));
        db.iter_mut().for_each(|v| *v *= s);
        da.iter_mut().for_each(|v| *v *= s);
        match &mask {
            Some(m) => dx.iter_mut().zip(m.iter()).for_each(|(v, m)| *v *= s * m),
            None => dx.iter_mut().for_each(|v| *v *= s),
        }
        let dev = Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dx, (rows, inp), &dev)?),
            Some(Tensor::from_vec(da, (r, inp), &dev)?),
            Some(Tensor::from_vec(db, (out, r), &dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn dropout_mask_is_deterministic_and_has_the_right_rate() {
        let n = 3 * MASK_CHUNK + 17;
        let a = dropout_mask(n, 0.1, 7, 3, 5);
        assert_eq!(a, dropout_mask(n, 0.1, 7, 3, 5));
        // Other seed, layer or target (5 = up_proj, 6 = down_proj): another mask.
        assert_ne!(a, dropout_mask(n, 0.1, 8, 3, 5));
        assert_ne!(a, dropout_mask(n, 0.1, 7, 4, 5));
        assert_ne!(a, dropout_mask(n, 0.1, 7, 3, 6));
        let keep = 1.0 / 0.9f32;
        assert!(a.iter().all(|&v| v == 0.0 || v == keep));
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        // Binomial sd at n ≈ 49K is 0.0014.
        assert!((dropped - 0.1).abs() < 0.006, "dropped {dropped}");
        // The mask's mean is 1: inverted dropout keeps the expectation.
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        assert!(dropout_mask(1000, 0.0, 1, 0, 0).iter().all(|&v| v == 1.0));
    }

    /// `y = scale·(m ⊙ x)·Aᵀ·Bᵀ` against central differences in x, A and B (f64 sums of an f32
    /// function, weighted by fixed random coefficients so every output counts).
    #[test]
    fn adapter_delta_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let (rows, inp, out, r) = (5, 7, 6, 3);
        let mut rng = Rng::new(11);
        let mut rand =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect() };
        let x0 = rand(rows * inp);
        let a0 = rand(r * inp);
        let b0 = rand(out * r);
        let w = Tensor::from_vec(rand(rows * out), (rows, out), &dev).unwrap();
        let mask = std::sync::Arc::new(dropout_mask(rows * inp, 0.3, 5, 0, 0));
        let scale = 1.7;
        let f = |x: &[f32], a: &[f32], b: &[f32]| -> f64 {
            let a = Tensor::from_vec(a.to_vec(), (r, inp), &dev).unwrap();
            let b = Tensor::from_vec(b.to_vec(), (out, r), &dev).unwrap();
            let x = Tensor::from_vec(x.to_vec(), (rows, inp), &dev).unwrap();
            let y = lora_delta(&x, &a, &b, scale, Mask::Given(mask.clone())).unwrap();
            let y: Vec<f32> = (y * &w).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            y.iter().map(|&v| v as f64).sum()
        };
        let x = Var::from_vec(x0.clone(), (rows, inp), &dev).unwrap();
        let a = Var::from_vec(a0.clone(), (r, inp), &dev).unwrap();
        let b = Var::from_vec(b0.clone(), (out, r), &dev).unwrap();
        let y = lora_delta(
            x.as_tensor(),
            a.as_tensor(),
            b.as_tensor(),
            scale,
            Mask::Given(mask.clone()),
        )
        .unwrap();
        let grads = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = |v: &Var| -> Vec<f32> {
            grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (gx, ga, gb) = (g(&x), g(&a), g(&b));
        let eps = 1e-2f32;
        let check = |which: usize, grad: &[f32]| {
            for i in 0..grad.len() {
                let mut args = [x0.clone(), a0.clone(), b0.clone()];
                args[which][i] += eps;
                let up = f(&args[0], &args[1], &args[2]);
                args[which][i] -= 2.0 * eps;
                let down = f(&args[0], &args[1], &args[2]);
                let fd = (up - down) / (2.0 * eps as f64);
                assert!(
                    (fd - grad[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                    "operand {which} entry {i}: analytic {} vs finite difference {fd}",
                    grad[i]
                );
            }
        };
        check(0, &gx);
        check(1, &ga);
        check(2, &gb);
        // Dropped inputs get no gradient.
        let m = mask.as_slice();
        assert!(m.contains(&0.0));
        for (gi, mi) in gx.iter().zip(m) {
            if *mi == 0.0 {
                assert_eq!(*gi, 0.0);
            }
        }
    }
}
