//! Rotary position embedding in HF's half-split layout: the tables (with the configured
//! scaling), the composed rotation ([`rope`], inference) and one op whose backward is the inverse
//! rotation ([`rope_fused`], training). One convention serves HF and GGUF weights: the GGUF
//! importer un-permutes llama.cpp's interleaved q/k rows.

use super::gemm::{cpu_tensor, slice, with_f32};
use crate::hub::config::{ModelConfig, RopeScaling};
use anyhow::{ensure, Result};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Rotary embedding in HF's half-split layout on `x` `[batch, heads, seq, head_dim]` with
/// tables `[seq, head_dim / 2]`: `(x₁·cos − x₂·sin, x₂·cos + x₁·sin)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[a, b], D::Minus1)?)
}

/// Inverse frequencies of RoPE with the configured scaling (transformers' `_compute_*_parameters`).
pub fn inv_freqs(c: &ModelConfig) -> Vec<f64> {
    let base: Vec<f64> = (0..c.head_dim / 2)
        .map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f64 / c.head_dim as f64))
        .collect();
    match c.rope_scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// cos and sin of `position · inv_freq`, `[max_positions, head_dim / 2]`, computed as
/// transformers does (f32 inverse frequencies, f32 product).
pub fn rope_tables(c: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = inv_freqs(c).iter().map(|&f| f as f32).collect();
    let n = c.max_position_embeddings;
    let angles: Vec<f32> = (0..n)
        .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
        .collect();
    let angles = Tensor::from_vec(angles, (n, inv.len()), device)?;
    Ok((angles.cos()?.to_dtype(DType::F32)?, angles.sin()?))
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
        Ok(Some(cpu_tensor(dx, arg.shape().clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::check::{check_gradient, close, uniform, weighted_sum};
    use crate::util::rng::Rng;

    #[test]
    fn rope_gradient() {
        let mut rng = Rng::new(11);
        let x = uniform(&mut rng, &[1, 2, 5, 8], 1.0);
        let cos = uniform(&mut rng, &[5, 4], 1.0);
        let sin = uniform(&mut rng, &[5, 4], 1.0);
        check_gradient(&[x], &|a| weighted_sum(&rope(&a[0], &cos, &sin)?, 12), 1e-2);
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
