//! The same optimizers on the generic kernels: tensor ops on the device that holds the
//! parameter, so parameters, gradients and state never leave it between steps. Formulas as in
//! the module above (HF Adafactor, `torch.optim.AdamW`); reductions are candle's (f32 on the
//! device) where the flat passes add in f64, so the two agree to float rounding, not bit for bit.

use super::{AdafactorConfig, AdamWConfig};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};

/// One parameter's state on the device.
#[derive(Debug, Clone)]
pub(super) enum DeviceState {
    Adafactor {
        step: u64,
        /// `R` `[rows]` and `C` `[cols]` of a matrix, or a vector's full `V` in `row`.
        row: Tensor,
        col: Tensor,
        exp_avg: Option<Tensor>,
    },
    AdamW {
        step: u64,
        m: Tensor,
        v: Tensor,
    },
}

impl DeviceState {
    /// A fresh state for a `[rows, cols]` parameter on `device`.
    pub(super) fn adafactor(
        c: &AdafactorConfig,
        (rows, cols): (usize, usize),
        device: &Device,
    ) -> Result<Self> {
        let z = |n: usize| Tensor::zeros(n, DType::F32, device);
        Ok(DeviceState::Adafactor {
            step: 0,
            row: z(if rows > 1 { rows } else { cols })?,
            col: z(if rows > 1 { cols } else { 0 })?,
            exp_avg: c
                .beta1
                .map(|_| Tensor::zeros((rows, cols), DType::F32, device))
                .transpose()?,
        })
    }

    /// A fresh AdamW state.
    pub(super) fn adamw((rows, cols): (usize, usize), device: &Device) -> Result<Self> {
        Ok(DeviceState::AdamW {
            step: 0,
            m: Tensor::zeros((rows, cols), DType::F32, device)?,
            v: Tensor::zeros((rows, cols), DType::F32, device)?,
        })
    }

    /// Steps taken.
    pub(super) fn step(&self) -> u64 {
        match self {
            DeviceState::Adafactor { step, .. } | DeviceState::AdamW { step, .. } => *step,
        }
    }
}

/// `sqrt(mean(x²))` as a host number.
fn rms(x: &Tensor) -> Result<f64> {
    let n = x.elem_count().max(1) as f64;
    Ok((x.sqr()?.sum_all()?.to_scalar::<f32>()? as f64 / n).sqrt())
}

/// One Adafactor step of `var` (`[rows, cols]`) with `grad × scale`.
pub(super) fn adafactor_step(
    c: &AdafactorConfig,
    state: &mut DeviceState,
    var: &Var,
    grad: &Tensor,
    sched_lr: f64,
    scale: f32,
) -> Result<()> {
    let DeviceState::Adafactor {
        step,
        row,
        col,
        exp_avg,
    } = state
    else {
        anyhow::bail!("internal: an AdamW state for Adafactor");
    };
    *step += 1;
    let t = *step as f64;
    let (rows, cols) = grad.dims2()?;
    let p = &var.as_tensor().reshape((rows, cols))?;
    let mut lr = sched_lr;
    if c.relative_step {
        let min_step = if c.warmup_init { 1e-6 * t } else { 1e-2 };
        lr = min_step.min(1.0 / t.sqrt());
    }
    if c.scale_parameter {
        lr *= c.eps.1.max(rms(p)?);
    }
    let beta2t = 1.0 - t.powf(c.decay_rate);
    let alpha = 1.0 - beta2t;
    let g = if scale == 1.0 {
        grad.clone()
    } else {
        (grad * scale as f64)?
    };
    let sq = (g.sqr()? + c.eps.0)?;
    let update = if rows > 1 {
        *row = ((&*row * beta2t)? + (sq.mean(D::Minus1)? * alpha)?)?;
        *col = ((&*col * beta2t)? + (sq.mean(0)? * alpha)?)?;
        let r_factor = row
            .broadcast_div(&row.mean_all()?)?
            .sqrt()?
            .recip()?
            .reshape((rows, 1))?;
        let c_factor = col.sqrt()?.recip()?.reshape((1, cols))?;
        r_factor.broadcast_mul(&c_factor)?.mul(&g)?
    } else {
        let v = row.reshape((1, cols))?;
        let v = ((v * beta2t)? + (sq * alpha)?)?;
        *row = v.reshape(cols)?;
        v.sqrt()?.recip()?.mul(&g)?
    };
    let denom = (rms(&update)? / c.clip_threshold).max(1.0);
    let mut update = ((update / denom)? * lr)?;
    if let (Some(b1), Some(m)) = (c.beta1, exp_avg.as_mut()) {
        *m = ((&*m * b1)? + (&update * (1.0 - b1))?)?;
        update = m.clone();
    }
    let mut p = p.clone();
    if c.weight_decay != 0.0 {
        p = (&p + (&p * (-c.weight_decay * lr))?)?;
    }
    var.set(&(p - update)?.reshape(var.shape())?)?;
    Ok(())
}

/// One AdamW step of `var` with `grad × scale` at learning rate `lr`.
pub(super) fn adamw_step(
    c: &AdamWConfig,
    state: &mut DeviceState,
    var: &Var,
    grad: &Tensor,
    lr: f64,
    scale: f32,
) -> Result<()> {
    let DeviceState::AdamW { step, m, v } = state else {
        anyhow::bail!("internal: an Adafactor state for AdamW");
    };
    *step += 1;
    let g = if scale == 1.0 {
        grad.clone()
    } else {
        (grad * scale as f64)?
    };
    let p = (var.as_tensor().reshape(grad.shape())? * (1.0 - lr * c.weight_decay))?;
    *m = (&*m + ((&g - &*m)? * (1.0 - c.beta1))?)?;
    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
    let bc1 = 1.0 - c.beta1.powi(*step as i32);
    let bc2 = 1.0 - c.beta2.powi(*step as i32);
    let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
    var.set(&(p - (m.div(&denom)? * (lr / bc1))?)?.reshape(var.shape())?)?;
    Ok(())
}
