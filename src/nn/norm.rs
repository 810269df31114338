//! RMSNorm `y = x / √(mean(x²) + eps) · w`: composed from differentiable ops ([`rms_norm`],
//! inference and the finite-difference reference) and as one op with a frozen weight
//! ([`rms_norm_frozen`], training).

use super::gemm::{cpu_tensor, slice, with_f32};
use anyhow::{ensure, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Mutex;

/// RMSNorm composed from differentiable ops: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?
        .broadcast_mul(weight)?)
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
        Ok(Some(cpu_tensor(dx, arg.shape().clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::check::{check_gradient, close, uniform, weighted_sum};
    use crate::util::rng::Rng;

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
}
