//! The pieces of one optimizer step, shared by the engine and `bench train`: the loss of a
//! batch, one micro-batch's forward and backward passes into the gradient buffers, the
//! auxiliary losses' gradient, clipping and the in-place parameter update.

use super::aux_loss::{AuxLosses, Components};
use super::optim::{self, Optimizer};
use super::phase::Param;
use super::wake_rows::{self, WakeRows};
use crate::model::lora::LoraPass;
use crate::model::Llama;
use crate::nn::device::Kernels;
use crate::util::rng::Rng;
use anyhow::{ensure, Result};
use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};
use std::cell::RefCell;

/// Mean next-token cross-entropy of a batch of equally long blocks, through the training
/// forward (frozen weights, trainable Wake rows when `wake` is given, LoRA adapters when `lora`
/// is given).
pub fn batch_loss(
    model: &Llama,
    blocks: &[&[u32]],
    wake: Option<&WakeRows>,
    lora: Option<&LoraPass<'_>>,
) -> Result<Tensor> {
    let t = blocks.first().map_or(0, |b| b.len());
    ensure!(t >= 2, "blocks need at least two tokens");
    let ids: Vec<u32> = blocks.iter().flat_map(|b| b.iter().copied()).collect();
    let targets: Vec<u32> = blocks.iter().flat_map(|b| b[1..].iter().copied()).collect();
    let input = Tensor::from_vec(ids, (blocks.len(), t), model.embed.device())?;
    let h = wake_rows::hidden_states(model, &input, wake, lora)?;
    let h = h
        .narrow(1, 0, t - 1)?
        .contiguous()?
        .reshape((blocks.len() * (t - 1), model.config.hidden_size))?;
    let per_row = wake_rows::head_loss(model, &h, &targets, wake)?;
    Ok((per_row.sum_all()? / targets.len() as f64)?)
}

/// One micro-batch: the forward pass, and unless its loss is not finite, the backward pass of
/// loss / `divisor` with the gradients added into the parameters' gradients: on the fast
/// kernels the Wake rows' through their sink and the adapters' (`params[wake_params..]`) from
/// candle's gradient store into host buffers; on the generic kernels every parameter's from the
/// gradient store into its device tensor. Returns the loss.
pub(crate) fn accumulate(
    model: &Llama,
    blocks: &[&[u32]],
    wake: Option<&WakeRows>,
    lora: Option<&LoraPass>,
    params: (&[Param], usize),
    divisor: f64,
) -> Result<f64> {
    let loss = batch_loss(model, blocks, wake, lora)?;
    let value = loss.to_scalar::<f32>()? as f64;
    if !value.is_finite() {
        return Ok(value);
    }
    let grads = (loss / divisor)?.backward()?;
    let (params, wake_params) = params;
    if model.kernels == Kernels::Generic {
        for p in params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                let mut slot = p.device_grad.lock().expect("gradient");
                let g = g.reshape((p.rows, p.cols))?;
                *slot = Some(match slot.take() {
                    Some(sum) => (sum + g)?,
                    None => g,
                });
            }
        }
        return Ok(value);
    }
    if let Some(sink) = wake.and_then(|w| w.sink.as_ref()) {
        sink.collect_inputs(&grads)?;
    }
    for p in &params[wake_params..] {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            let mut buf = p.grad.lock().expect("gradient buffer");
            buf.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
    }
    Ok(value)
}

/// Adds the auxiliary losses' gradient at the Wake block's current values into its gradient;
/// returns the terms.
pub(crate) fn add_aux(
    aux: &AuxLosses,
    wake: &Param,
    rng: &mut Rng,
    kernels: Kernels,
) -> Result<Components> {
    if kernels == Kernels::Generic {
        let (terms, total) = aux.compute_tensor(wake.var.as_tensor(), rng)?;
        let grads = total.backward()?;
        let Some(g) = grads.get(wake.var.as_tensor()) else {
            return Ok(terms);
        };
        let g = g.clone();
        let mut slot = wake.device_grad.lock().expect("gradient");
        *slot = Some(match slot.take() {
            Some(sum) => (sum + g)?,
            None => g,
        });
        return Ok(terms);
    }
    let mut grad = wake.grad.lock().expect("gradient buffer");
    // Read in place: the block is 100 MB for the Wake lexicon on SmolLM2.
    Ok(crate::nn::gemm::with_f32(wake.var.as_tensor(), |values| {
        aux.compute(values, rng, Some(&mut grad), 1.0)
    })?)
}

/// Zeroes the gradient buffers (at the start of an optimizer step).
pub(crate) fn zero_grads(params: &[Param]) {
    use rayon::prelude::*;
    for p in params {
        *p.device_grad.lock().expect("gradient") = None;
        p.grad
            .lock()
            .expect("gradient buffer")
            .par_chunks_mut(1 << 16)
            .for_each(|c| c.fill(0.0));
    }
}

/// Clips the accumulated gradients to `max_grad_norm` (0: no clipping) and updates every
/// parameter in place at `lr`; returns the gradient norm before clipping.
pub(crate) fn apply_update(
    params: &mut [Param],
    optimizer: &mut Optimizer,
    lr: f64,
    max_grad_norm: f64,
) -> Result<f64> {
    if optimizer.is_on_device() {
        return apply_update_on_device(params, optimizer, lr, max_grad_norm);
    }
    let guards: Vec<_> = params
        .iter()
        .map(|p| p.grad.lock().expect("gradient buffer"))
        .collect();
    // One read of each gradient gives the clipping norm and Adafactor's factored statistics.
    let stats: Vec<_> = params
        .iter()
        .zip(&guards)
        .map(|(p, g)| optimizer.grad_stats(g, (p.rows, p.cols)))
        .collect();
    let norm = stats.iter().map(|s| s.sum_sq).sum::<f64>().sqrt();
    let scale = optim::clip_coef(norm, max_grad_norm);
    if !norm.is_finite() {
        return Ok(norm);
    }
    for ((p, grad), stats) in params.iter().zip(&guards).zip(&stats) {
        let (name, grad, shape) = (&p.name, &grad[..], (p.rows, p.cols));
        let mut update =
            |values: &mut [f32]| optimizer.step_with(name, values, grad, shape, lr, scale, stats);
        p.var
            .as_tensor()
            .inplace_op1(&InPlace(RefCell::new(&mut update)))?;
    }
    Ok(norm)
}

/// [`apply_update`] on the generic kernels: the norm and the updates by tensor ops on the
/// parameters' device (one scalar per parameter comes back to the host, for the norm).
fn apply_update_on_device(
    params: &mut [Param],
    optimizer: &mut Optimizer,
    lr: f64,
    max_grad_norm: f64,
) -> Result<f64> {
    let grads = params
        .iter()
        .map(|p| {
            let g = p.device_grad.lock().expect("gradient").take();
            match g {
                Some(g) => Ok(g),
                None => Ok(p.var.as_tensor().zeros_like()?),
            }
        })
        .collect::<Result<Vec<Tensor>>>()?;
    let mut sum_sq = 0f64;
    for g in &grads {
        sum_sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sum_sq.sqrt();
    let scale = optim::clip_coef(norm, max_grad_norm);
    if !norm.is_finite() {
        return Ok(norm);
    }
    for (p, g) in params.iter().zip(&grads) {
        optimizer.step_tensor(&p.name, &p.var, g, lr, scale)?;
    }
    Ok(norm)
}

/// Runs a closure on a variable's storage in place (the optimizer update), so that the update
/// is one pass over the buffer with no copy.
type UpdateFn<'b> = dyn FnMut(&mut [f32]) -> Result<()> + 'b;
struct InPlace<'a, 'b>(RefCell<&'a mut UpdateFn<'b>>);

impl InplaceOp1 for InPlace<'_, '_> {
    fn name(&self) -> &'static str {
        "optimizer-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("optimizer-update: parameters must be f32");
        };
        if !layout.is_contiguous() {
            candle_core::bail!("optimizer-update: parameters must be contiguous");
        }
        let n = layout.shape().elem_count();
        let values = &mut v[layout.start_offset()..layout.start_offset() + n];
        (self.0.borrow_mut())(values).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }
}
