//! The trainable Wake rows: rows `start .. start + count` of the embedding (and of the head)
//! read from trainable blocks instead of the frozen matrices, with Phase 1's fast gradient path
//! (gradients written straight into flat buffers), and the training forward pass that reads them.

use crate::model::llama::{Adapters, Embedding};
use crate::model::lora::LoraPass;
use crate::model::Llama;
use crate::nn::device::Kernels;
use crate::nn::linear::FrozenLinear;
use crate::nn::loss::{cross_entropy, cross_entropy_composed, WakeHeadLoss};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Final hidden states of a training pass over `ids` with the Wake rows (when given) and the
/// LoRA adapters (when given) trainable.
pub fn hidden_states(
    model: &Llama,
    ids: &Tensor,
    wake: Option<&WakeRows>,
    lora: Option<&LoraPass<'_>>,
) -> Result<Tensor> {
    model.hidden_states_train(
        ids,
        wake.map(|w| w as &dyn Embedding),
        lora.map(|l| l as &dyn Adapters),
    )
}

/// Per-row next-token loss `[rows]` of final hidden states `[rows, hidden]` against
/// `targets` for training: the head and the cross-entropy fused ([`WakeHeadLoss`]) when
/// `wake` is given, else the frozen head and the fused cross-entropy.
pub fn head_loss(
    model: &Llama,
    h: &Tensor,
    targets: &[u32],
    wake: Option<&WakeRows>,
) -> Result<Tensor> {
    if model.kernels == Kernels::Generic {
        return cross_entropy_composed(&logits(model, h, wake)?, targets);
    }
    let Some(wake) = wake else {
        let logits = FrozenLinear::new(model.head(), None)?.forward(h)?;
        return cross_entropy(&logits, targets);
    };
    let trainable = match (&model.lm_head, &wake.head) {
        (None, _) => &wake.embed,
        (Some(_), Some(t)) => t,
        (Some(_), None) => {
            bail!("the head is untied but no trainable Wake head rows were given")
        }
    };
    let sink = wake.sink.as_ref().map(|s| match &model.lm_head {
        None => s.embed.clone(),
        Some(_) => s.head.clone().unwrap_or_else(|| s.embed.clone()),
    });
    WakeHeadLoss::forward(model.head(), wake.start, trainable, h, targets, sink)
}

/// Training logits `[rows, vocab]` for final hidden states `[rows, hidden]`: the frozen head
/// rows through [`FrozenLinear`], the Wake rows (when `wake` is given) from the trainable
/// block: the embedding block when the head is tied, the head block when it is not.
pub fn logits(model: &Llama, h: &Tensor, wake: Option<&WakeRows>) -> Result<Tensor> {
    let head = model.head();
    let frozen = |w: &Tensor| match model.kernels {
        Kernels::Fast => FrozenLinear::new(w, None),
        Kernels::Generic => FrozenLinear::generic(w, None),
    };
    let Some(wake) = wake else {
        return frozen(head)?.forward(h);
    };
    let rows = head.dim(0)?;
    let (start, count) = (wake.start, wake.count());
    let trainable = match (&model.lm_head, &wake.head) {
        (None, _) => &wake.embed,
        (Some(_), Some(t)) => t,
        (Some(_), None) => {
            bail!("the head is untied but no trainable Wake head rows were given")
        }
    };
    let mut parts = Vec::with_capacity(3);
    if start > 0 {
        parts.push(frozen(&head.narrow(0, 0, start)?)?.forward(h)?);
    }
    parts.push(if trainable.is_variable() {
        h.matmul(&trainable.t()?)?
    } else {
        // Phase 2's frozen Wake rows: no gradient work for them either.
        frozen(trainable)?.forward(h)?
    });
    if start + count < rows {
        let tail = head.narrow(0, start + count, rows - start - count)?;
        parts.push(frozen(&tail)?.forward(h)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// The trainable Wake rows of Phase 1: rows `start .. start + count` of the embedding matrix
/// (and of the head) are read from these blocks instead of the frozen matrix.
#[derive(Debug, Clone)]
pub struct WakeRows {
    /// First Wake row (`wake_start` of wake2vec.json).
    pub start: usize,
    /// The embedding's Wake rows `[count, hidden]`; also the head's when it is tied.
    pub embed: Tensor,
    /// The untied head's Wake rows `[count, hidden]`.
    pub head: Option<Tensor>,
    /// Where the Wake rows' gradients go; `None`: to candle's gradient store, for `embed` and
    /// `head` as variables.
    pub sink: Option<GradSink>,
}

/// The Wake rows a forward pass read as inputs: their row indices and the leaf variable that
/// held them.
pub type InputRows = (Vec<u32>, candle_core::Var);

/// Phase 1's fast gradient path: the Wake rows' gradients are accumulated straight into these
/// buffers instead of going through candle's gradient store, which would allocate, zero and add
/// several `[count, hidden]` tensors per micro-batch (45K × 576 floats each).
#[derive(Debug, Clone)]
pub struct GradSink {
    /// Gradient of the embedding's Wake block (and of the tied head's), `count × hidden`.
    pub embed: std::sync::Arc<std::sync::Mutex<Vec<f32>>>,
    /// Gradient of the untied head's Wake block.
    pub head: Option<std::sync::Arc<std::sync::Mutex<Vec<f32>>>>,
    /// The Wake rows the last forward pass read as inputs (row indices) and the leaf variable
    /// that held them; [`GradSink::collect_inputs`] adds its gradient into `embed`.
    pub inputs: std::sync::Arc<std::sync::Mutex<Option<InputRows>>>,
}

impl GradSink {
    /// Zeroed buffers for `count × hidden` blocks (and a head block when untied).
    pub fn new(count: usize, hidden: usize, untied: bool) -> Self {
        let buf = || std::sync::Arc::new(std::sync::Mutex::new(vec![0f32; count * hidden]));
        Self {
            embed: buf(),
            head: untied.then(buf),
            inputs: Default::default(),
        }
    }

    /// After a backward pass: adds the input rows' gradients into `embed`.
    pub fn collect_inputs(&self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        let Some((rows, leaf)) = self.inputs.lock().expect("gradient sink").take() else {
            return Ok(());
        };
        let Some(g) = grads.get(leaf.as_tensor()) else {
            return Ok(());
        };
        let hidden = leaf.dim(1)?;
        let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
        let mut embed = self.embed.lock().expect("gradient sink");
        for (i, &r) in rows.iter().enumerate() {
            let dst = &mut embed[r as usize * hidden..(r as usize + 1) * hidden];
            dst.iter_mut()
                .zip(&g[i * hidden..(i + 1) * hidden])
                .for_each(|(a, b)| *a += b);
        }
        Ok(())
    }
}

impl WakeRows {
    /// How many Wake rows there are.
    pub fn count(&self) -> usize {
        self.embed.dim(0).unwrap_or(0)
    }
}

impl Embedding for WakeRows {
    /// Wake ids read the trainable block and every other id the frozen matrix: `base[id]·(1 − m) + wake[id − start]·m`, `m` = 1 on Wake positions. Only the Wake
    /// block is in the graph, so only it receives a gradient.
    fn embed(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let wake = self;
        let ids_v: Vec<u32> = ids.to_vec1()?;
        let (start, count) = (wake.start as u32, wake.count() as u32);
        let is_wake = |&id: &u32| id >= start && id < start + count;
        let base_ids: Vec<u32> = ids_v
            .iter()
            .map(|id| if is_wake(id) { 0 } else { *id })
            .collect();
        let wake_ids: Vec<u32> = ids_v
            .iter()
            .map(|id| if is_wake(id) { id - start } else { 0 })
            .collect();
        let m: Vec<f32> = ids_v.iter().map(|id| f32::from(is_wake(id))).collect();
        let device = ids.device();
        let n = ids_v.len();
        let base = table.index_select(&Tensor::from_vec(base_ids, n, device)?, 0)?;
        if !ids_v.iter().any(is_wake) {
            return Ok(base);
        }
        let m = Tensor::from_vec(m, (n, 1), device)?;
        let rows = match &wake.sink {
            None => wake
                .embed
                .index_select(&Tensor::from_vec(wake_ids, n, device)?, 0)?,
            Some(sink) => {
                // Only the rows this batch reads become a (small) leaf variable; the engine adds
                // its gradient into the sink's rows after the backward pass.
                let wanted: Vec<u32> = ids_v
                    .iter()
                    .filter(|id| is_wake(id))
                    .map(|id| id - start)
                    .collect();
                let leaf = candle_core::Var::from_tensor(
                    &wake
                        .embed
                        .detach()
                        .index_select(&Tensor::new(wanted.as_slice(), device)?, 0)?,
                )?;
                let mut k = 0u32;
                let position: Vec<u32> = ids_v
                    .iter()
                    .map(|id| {
                        let here = k.min(wanted.len() as u32 - 1);
                        if is_wake(id) {
                            k += 1;
                        }
                        here
                    })
                    .collect();
                let rows = leaf
                    .as_tensor()
                    .index_select(&Tensor::from_vec(position, n, device)?, 0)?;
                *sink.inputs.lock().expect("gradient sink") = Some((wanted, leaf));
                rows
            }
        };
        Ok((base.broadcast_mul(&(1.0 - &m)?)? + rows.broadcast_mul(&m)?)?)
    }
}
