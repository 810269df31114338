//! The gated MLP's activation `silu(gate) ⊙ up`: composed ([`swiglu_composed`], inference) and
//! as one op (backward: `dgate = dy·up·σ(g)·(1 + g·(1 − σ(g)))`, `dup = dy·silu(g)`).

use super::gemm::{cpu_tensor, slice, with_f32};
use anyhow::{ensure, Result};
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `silu(gate) ⊙ up` from candle's differentiable ops.
pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
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
        let t = |v: Vec<f32>| cpu_tensor(v, gate.shape().clone());
        Ok((Some(t(dg)), Some(t(du))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::check::{check_gradient, close, uniform, weighted_sum};
    use crate::nn::linear::FrozenLinear;
    use crate::util::rng::Rng;

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
}
