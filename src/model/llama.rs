//! The Llama-family decoder (Llama 1/2/3, TinyLlama, SmolLM2, Mistral, Qwen2), in f32, built
//! only from differentiable candle operations so that training can reuse it (candle's fused
//! `rms_norm`, `softmax_last_dim` and `rope` drop gradients: DESIGN.md §2). One code path serves
//! whole-sequence scoring and KV-cached generation.

use super::config::{ModelConfig, RopeScaling};
use super::lora::{LoraPass, Target};
use super::weights::Weights;
use crate::train::ops::{FrozenLinear, WakeHeadLoss};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};

/// A projection `y = x·Wᵀ (+ b)`, with `W` stored `[out, in]` as in HF checkpoints.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Applies the projection to `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (lead, inner) = dims.split_at(dims.len() - 1);
        let rows: usize = lead.iter().product();
        let y = x.reshape((rows, inner[0]))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = lead.to_vec();
        out.push(self.weight.dim(0)?);
        Ok(y.reshape(out)?)
    }
}

/// One decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_attention_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// Keys and values of the positions seen so far, per layer, `[batch, kv_heads, seen, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// How many positions the cache holds.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Keys and values of one layer, if it has seen any position.
    pub fn layer(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(i).and_then(|l| l.as_ref())
    }

    /// True when no position has been seen yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The whole model: embeddings, blocks, final norm and head.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    /// Input embeddings `[vocab, hidden]`; also the head when `lm_head` is `None` (tied).
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    /// The untied output head `[vocab, hidden]`.
    pub lm_head: Option<Tensor>,
    /// RoPE tables `[max_positions, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    /// Builds the model from HF-named weights (`model.layers.N.self_attn.q_proj.weight`, …).
    pub fn from_weights(config: ModelConfig, mut w: Weights, device: &Device) -> Result<Self> {
        let mut take = |name: &str| -> Result<Tensor> {
            w.remove(name)
                .with_context(|| format!("the weights have no tensor '{name}'"))
        };
        let embed = take("model.embed_tokens.weight")?;
        let (rows, hidden) = embed.dims2()?;
        if hidden != config.hidden_size || rows < config.vocab_size {
            bail!(
                "model.embed_tokens.weight is {rows}×{hidden}, but config.json says vocab_size {} × hidden_size {}",
                config.vocab_size,
                config.hidden_size
            );
        }
        let mut blocks = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let mut linear = |name: &str, bias: bool| -> Result<Linear> {
                let weight = take(&format!("{p}.{name}.weight"))?;
                let bias = if bias {
                    Some(take(&format!("{p}.{name}.bias"))?)
                } else {
                    None
                };
                Ok(Linear { weight, bias })
            };
            let q = linear("self_attn.q_proj", config.qkv_bias)?;
            let k = linear("self_attn.k_proj", config.qkv_bias)?;
            let v = linear("self_attn.v_proj", config.qkv_bias)?;
            let o = linear("self_attn.o_proj", config.o_bias)?;
            let gate = linear("mlp.gate_proj", config.mlp_bias)?;
            let up = linear("mlp.up_proj", config.mlp_bias)?;
            let down = linear("mlp.down_proj", config.mlp_bias)?;
            blocks.push(Block {
                input_norm: take(&format!("{p}.input_layernorm.weight"))?,
                q,
                k,
                v,
                o,
                post_attention_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                gate,
                up,
                down,
            });
        }
        let norm = take("model.norm.weight")?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight").context("config.json says tie_word_embeddings = false")?)
        };
        let (cos, sin) = rope_tables(&config, device)?;
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            cos,
            sin,
        })
    }

    /// Loads a model directory (config.json + safetensors).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let weights = super::weights::load_dir(dir, device)?;
        Self::from_weights(config, weights, device)
            .with_context(|| format!("in model directory {}", dir.display()))
    }

    /// The output head `[vocab, hidden]` (the embeddings when tied).
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// cos and sin of one position, `head_dim / 2` values each.
    pub(crate) fn rope_row(&self, pos: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.cos.get(pos)?.to_vec1()?, self.sin.get(pos)?.to_vec1()?))
    }

    /// The longest sequence the RoPE tables cover.
    pub fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// Final hidden states `[batch, seq, hidden]` for `ids` `[batch, seq]`, continuing after the
    /// positions held in `cache` (pass `None` for a stateless whole-sequence pass).
    pub fn hidden_states(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.hidden_states_with(ids, cache, Mode::Inference)
    }

    /// Final hidden states for training: every weight frozen (backward computes input gradients
    /// only, DESIGN.md §2), except the Wake rows of the embedding when `wake` is given, which are
    /// read from its trainable block.
    ///
    /// With `lora`, each target projection adds its adapter's update
    /// `(α/r)·(dropout(x)·Aᵀ)·Bᵀ` through differentiable candle ops, so the backward pass gives
    /// the adapters (variables) their gradients; the dropout masks follow from
    /// `lora.dropout_seed` alone.
    pub fn hidden_states_train(
        &self,
        ids: &Tensor,
        wake: Option<&WakeRows>,
        lora: Option<&LoraPass<'_>>,
    ) -> Result<Tensor> {
        if let Some(l) = lora {
            ensure!(
                l.lora.num_layers() == self.blocks.len(),
                "the LoRA adapters cover {} layers but the model has {}",
                l.lora.num_layers(),
                self.blocks.len()
            );
        }
        self.hidden_states_with(ids, None, Mode::Train { wake, lora })
    }

    fn hidden_states_with(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        mode: Mode<'_>,
    ) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if offset + seq > self.max_positions() {
            bail!(
                "{} positions exceed the model's context of {} (max_position_embeddings): use a shorter text or fewer new tokens",
                offset + seq,
                self.max_positions()
            );
        }
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize(self.blocks.len(), None);
        }
        let flat = ids.flatten_all()?;
        let mut x = match mode {
            Mode::Train {
                wake: Some(wake), ..
            } => self.embed_with_wake(&flat, wake)?,
            _ => self.embed.index_select(&flat, 0)?,
        }
        .reshape((batch, seq, self.config.hidden_size))?;
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        let mask = causal_mask(seq, offset, x.device())?;
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = self.block_forward(i, block, &x, &cos, &sin, mask.as_ref(), layer_cache, mode)?;
        }
        match mode {
            Mode::Inference => rms_norm(&x, &self.norm, self.config.rms_norm_eps),
            Mode::Train { .. } => {
                crate::train::ops::rms_norm_frozen(&x, &self.norm, self.config.rms_norm_eps)
            }
        }
    }

    /// Embedding lookup where Wake ids read the trainable block and every other id the frozen
    /// matrix: `base[id]·(1 − m) + wake[id − start]·m`, `m` = 1 on Wake positions. Only the Wake
    /// block is in the graph, so only it receives a gradient.
    fn embed_with_wake(&self, ids: &Tensor, wake: &WakeRows) -> Result<Tensor> {
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
        let base = self
            .embed
            .index_select(&Tensor::from_vec(base_ids, n, device)?, 0)?;
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

    /// Per-row next-token loss `[rows]` of final hidden states `[rows, hidden]` against
    /// `targets` for training: the head and the cross-entropy fused ([`WakeHeadLoss`]) when
    /// `wake` is given, else the frozen head and the fused cross-entropy.
    pub fn head_loss_train(
        &self,
        h: &Tensor,
        targets: &[u32],
        wake: Option<&WakeRows>,
    ) -> Result<Tensor> {
        let Some(wake) = wake else {
            let logits = FrozenLinear::new(self.head(), None)?.forward(h)?;
            return crate::train::ops::cross_entropy(&logits, targets);
        };
        let trainable = match (&self.lm_head, &wake.head) {
            (None, _) => &wake.embed,
            (Some(_), Some(t)) => t,
            (Some(_), None) => {
                bail!("the head is untied but no trainable Wake head rows were given")
            }
        };
        let sink = wake.sink.as_ref().map(|s| match &self.lm_head {
            None => s.embed.clone(),
            Some(_) => s.head.clone().unwrap_or_else(|| s.embed.clone()),
        });
        WakeHeadLoss::forward(self.head(), wake.start, trainable, h, targets, sink)
    }

    /// Training logits `[rows, vocab]` for final hidden states `[rows, hidden]`: the frozen head
    /// rows through [`FrozenLinear`], the Wake rows (when `wake` is given) from the trainable
    /// block: the embedding block when the head is tied, the head block when it is not.
    pub fn logits_train(&self, h: &Tensor, wake: Option<&WakeRows>) -> Result<Tensor> {
        let head = self.head();
        let Some(wake) = wake else {
            return FrozenLinear::new(head, None)?.forward(h);
        };
        let rows = head.dim(0)?;
        let (start, count) = (wake.start, wake.count());
        let trainable = match (&self.lm_head, &wake.head) {
            (None, _) => &wake.embed,
            (Some(_), Some(t)) => t,
            (Some(_), None) => {
                bail!("the head is untied but no trainable Wake head rows were given")
            }
        };
        let mut parts = vec![FrozenLinear::new(&head.narrow(0, 0, start)?, None)?.forward(h)?];
        parts.push(h.matmul(&trainable.t()?)?);
        if start + count < rows {
            let tail = head.narrow(0, start + count, rows - start - count)?;
            parts.push(FrozenLinear::new(&tail, None)?.forward(h)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// Logits `[batch, seq, vocab]` for `ids` `[batch, seq]`.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.hidden_states(ids, cache)?;
        Linear {
            weight: self.head().clone(),
            bias: None,
        }
        .forward(&h)
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        layer: usize,
        b: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mode: Mode<'_>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let norm = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
            match mode {
                Mode::Inference => rms_norm(x, w, c.rms_norm_eps),
                Mode::Train { .. } => crate::train::ops::rms_norm_frozen(x, w, c.rms_norm_eps),
            }
        };
        let rotate = |x: &Tensor| -> Result<Tensor> {
            match mode {
                Mode::Inference => rope(x, cos, sin),
                Mode::Train { .. } => crate::train::ops::rope_fused(x, cos, sin),
            }
        };
        let project = |l: &Linear, target: Target, x: &Tensor| -> Result<Tensor> {
            match mode {
                Mode::Inference => l.forward(x),
                Mode::Train { lora, .. } => {
                    let y = FrozenLinear::new(&l.weight, l.bias.as_ref())?.forward(x)?;
                    let Some(pass) = lora else {
                        return Ok(y);
                    };
                    let inner = x.dim(D::Minus1)?;
                    let x2 = x.reshape((x.elem_count() / inner, inner))?;
                    match pass.delta(layer, target, &x2)? {
                        Some(d) => {
                            let d = d.reshape(y.shape())?;
                            Ok((y + d)?)
                        }
                        None => Ok(y),
                    }
                }
            }
        };
        let (batch, seq, _) = x.dims3()?;
        let h = norm(x, &b.input_norm)?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rotate(&heads(project(&b.q, Target::Q, &h)?, c.num_heads)?)?;
        let mut k = rotate(&heads(project(&b.k, Target::K, &h)?, c.num_kv_heads)?)?;
        let mut v = heads(project(&b.v, Target::V, &h)?, c.num_kv_heads)?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let attn = match mode {
            // Training never uses the cache: one whole causal sequence.
            Mode::Train { .. } => crate::train::ops::causal_attention(&q, &k, &v)?,
            Mode::Inference => {
                let rep = c.num_heads / c.num_kv_heads;
                let (k, v) = (repeat_kv(&k, rep)?, repeat_kv(&v, rep)?);
                let scores = (q.matmul(&k.t()?)? * (1.0 / (c.head_dim as f64).sqrt()))?;
                let scores = match mask {
                    Some(m) => scores.broadcast_add(m)?,
                    None => scores,
                };
                softmax_last_dim(&scores)?.matmul(&v)?
            }
        };
        let attn = attn
            .transpose(1, 2)?
            .reshape((batch, seq, c.num_heads * c.head_dim))?;
        let x = (x + project(&b.o, Target::O, &attn)?)?;
        let h = norm(&x, &b.post_attention_norm)?;
        let (gate, up) = (
            project(&b.gate, Target::Gate, &h)?,
            project(&b.up, Target::Up, &h)?,
        );
        let act = match mode {
            Mode::Inference => (gate.silu()? * up)?,
            Mode::Train { .. } => crate::train::ops::swiglu(&gate, &up)?,
        };
        let mlp = project(&b.down, Target::Down, &act)?;
        Ok((x + mlp)?)
    }
}

use std::path::Path;

/// How a forward pass treats the weights.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Plain matmuls (generation, scoring).
    Inference,
    /// Frozen projections that give their weights no gradient, optionally trainable Wake rows
    /// and LoRA adapters.
    Train {
        wake: Option<&'a WakeRows>,
        lora: Option<&'a LoraPass<'a>>,
    },
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

/// RMSNorm composed from differentiable ops: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?
        .broadcast_mul(weight)?)
}

/// Softmax over the last dimension, composed from differentiable ops (max-shifted).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

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
fn causal_mask(seq: usize, offset: usize, device: &Device) -> Result<Option<Tensor>> {
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
fn rope_tables(c: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = inv_freqs(c).iter().map(|&f| f as f32).collect();
    let n = c.max_position_embeddings;
    let angles: Vec<f32> = (0..n)
        .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
        .collect();
    let angles = Tensor::from_vec(angles, (n, inv.len()), device)?;
    Ok((angles.cos()?.to_dtype(DType::F32)?, angles.sin()?))
}
