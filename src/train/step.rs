//! The pieces of one optimizer step, shared by the engine and `bench train`: the loss of a
//! batch, one micro-batch's forward and backward passes into the gradient buffers, the
//! auxiliary losses' gradient, clipping and the in-place parameter update.

use super::aux_loss::{AuxLosses, Components};
use super::optim::{self, Optimizer};
use super::phase::Param;
use super::wake_rows::{self, WakeRows};
use crate::model::lora::LoraPass;
use crate::model::Llama;
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
/// loss / `divisor` with the gradients added into the parameters' buffers (the Wake rows' through
/// their sink, the adapters' from candle's gradient store). Returns the loss.
pub(crate) fn accumulate(
    model: &Llama,
    blocks: &[&[u32]],
    wake: Option<&WakeRows>,
    lora: Option<&LoraPass>,
    lora_params: &[Param],
    divisor: f64,
) -> Result<f64> {
    let loss = batch_loss(model, blocks, wake, lora)?;
    let value = loss.to_scalar::<f32>()? as f64;
    if !value.is_finite() {
        return Ok(value);
    }
    let grads = (loss / divisor)?.backward()?;
    if let Some(sink) = wake.and_then(|w| w.sink.as_ref()) {
        sink.collect_inputs(&grads)?;
    }
    for p in lora_params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            let mut buf = p.grad.lock().expect("gradient buffer");
            buf.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
    }
    Ok(value)
}

/// Adds the auxiliary losses' gradient at the Wake block's current values into its buffer;
/// returns the terms.
pub(crate) fn add_aux(aux: &AuxLosses, wake: &Param, rng: &mut Rng) -> Result<Components> {
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
    let scale = if max_grad_norm > 0.0 {
        optim::clip_coef(norm, max_grad_norm)
    } else {
        1.0
    };
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
