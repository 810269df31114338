//! Projections `y = x·Wᵀ (+ b)`: [`Linear`], composed from candle's `matmul` (inference), and
//! [`FrozenLinear`], one op whose backward returns only the input gradient `g·W`. candle's
//! `matmul` would also compute `xᵀ·g` for `W` even when `W` is a plain tensor, which is most of
//! the backward work of a frozen model. The forward of [`FrozenLinear`] calls `gemm` as candle's
//! CPU `matmul` does, so it is bit-identical to [`Linear::forward`]. On the generic kernels
//! (any device, weights in f32, bf16 or f16) the forward is the device's own matmul
//! ([`BackendStorage::matmul`]: cuBLAS on a GPU, accumulating in f32), the same op either way.

use super::gemm::{gemm_f32, with_f32};
use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

/// A projection `y = x·Wᵀ (+ b)`, with `W` stored `[out, in]` as in HF checkpoints.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Applies the projection to `x` of shape `[.., in]` (f32; a bf16 or f16 weight multiplies
    /// `x` rounded to its dtype and the product comes back as f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (lead, inner) = dims.split_at(dims.len() - 1);
        let rows: usize = lead.iter().product();
        let wd = self.weight.dtype();
        let y = x
            .reshape((rows, inner[0]))?
            .to_dtype(wd)?
            .matmul(&self.weight.t()?)?
            .to_dtype(DType::F32)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = lead.to_vec();
        out.push(self.weight.dim(0)?);
        Ok(y.reshape(out)?)
    }

    /// The same projection with the weight frozen: [`FrozenLinear`] (no weight-gradient work).
    pub fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        FrozenLinear::new(&self.weight, self.bias.as_ref())?.forward(x)
    }

    /// [`Linear::forward_frozen`] on the generic kernels: any device, any weight dtype.
    pub fn forward_frozen_generic(&self, x: &Tensor) -> Result<Tensor> {
        FrozenLinear::generic(&self.weight, self.bias.as_ref())?.forward(x)
    }
}

/// A projection whose weight (and bias) never train: `y = x·Wᵀ (+ b)`, `W` stored `[out, in]`.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The device's own matmul (any device and weight dtype) instead of the CPU gemm kernel.
    generic: bool,
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
            generic: false,
        })
    }

    /// The same projection on the generic kernels: the weight may live on any device, in f32,
    /// bf16 or f16 (the input is rounded to it; the output is f32).
    pub fn generic(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        Ok(Self {
            generic: true,
            ..Self::new(weight, bias)?
        })
    }

    /// Applies the projection to `x` `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if !self.generic {
            return Ok(x.apply_op1(self.clone())?);
        }
        let op = FrozenLinear {
            bias: None,
            ..self.clone()
        };
        let y = x.apply_op1(op)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// For an input layout `[.., in]`: the rows, `in`, `out` and the output's shape `[.., out]`.
    fn product_dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, Shape)> {
        let dims = l.dims();
        let inner = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let (out, w_in) = self.weight.dims2()?;
        if w_in != inner {
            candle_core::bail!("frozen-linear: input has {inner} features, weight expects {w_in}");
        }
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap() = out;
        Ok((rows, inner, out, Shape::from(shape)))
    }

    /// `x·Wᵀ` with the device's matmul, in the weight's dtype, returned as f32.
    fn device_forward<S: BackendStorage>(
        &self,
        x: &S,
        l: &Layout,
        w: &S,
        wl: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let (rows, inner, out, shape) = self.product_dims(l)?;
        let wd = self.weight.dtype();
        let x2 = Layout::contiguous_with_offset((rows, inner), l.start_offset());
        let converted;
        let (x, x2) = if x.dtype() == wd {
            (x, x2)
        } else {
            converted = x.to_dtype(&x2, wd)?;
            (&converted, Layout::contiguous((rows, inner)))
        };
        let y = x.matmul(w, (1, rows, out, inner), &x2, &wl.transpose(0, 1)?)?;
        let y = if wd == DType::F32 {
            y
        } else {
            y.to_dtype(&Layout::contiguous((rows, out)), DType::F32)?
        };
        Ok((y, shape))
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
        if self.generic {
            let (w, wl) = self.weight.storage_and_layout();
            let Storage::Cpu(w) = &*w else {
                candle_core::bail!("frozen-linear: the weight is not on the CPU");
            };
            return self.device_forward(s, l, w, wl);
        }
        let (rows, inner, out, shape) = self.product_dims(l)?;
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
        Ok((CpuStorage::F32(dst), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if !l.is_contiguous() {
            candle_core::bail!("frozen-linear: the input must be contiguous");
        }
        let (w, wl) = self.weight.storage_and_layout();
        let Storage::Cuda(w) = &*w else {
            candle_core::bail!("frozen-linear: the weight is not on the GPU");
        };
        self.device_forward(s, l, w, wl)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (out, inner) = self.weight.dims2()?;
        let rows = grad.elem_count() / out.max(1);
        let wd = self.weight.dtype();
        let g = grad
            .reshape((rows, out))?
            .to_dtype(wd)?
            .matmul(&self.weight)?
            .to_dtype(DType::F32)?;
        debug_assert_eq!(g.dim(1)?, inner);
        Ok(Some(g.reshape(arg.shape())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::check::{check_gradient, uniform, weighted_sum};
    use crate::util::rng::Rng;
    use candle_core::Var;

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
        let theirs = Linear {
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
}
