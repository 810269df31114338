//! The Llama-family decoder (Llama 1/2/3, TinyLlama, SmolLM2, Mistral, Qwen2), in f32. A pass
//! is built from one set of layers: the composed ops of `nn` for scoring and KV-cached
//! generation, or the fused ops with hand-written backward passes for training, where an
//! [`Embedding`] (the trainable Wake rows) and [`Adapters`] (LoRA) add what trains.

use super::proj::Target;
use crate::hub::config::ModelConfig;
use crate::hub::weights::Weights;
use crate::nn::device::{Compute, Kernels};
use crate::nn::linear::Linear;
use crate::nn::{attention, norm, rope, swiglu};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor, D};
use std::path::Path;

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
    /// The kernels of training passes ([`Kernels::Fast`] unless loaded with generic ones).
    pub kernels: Kernels,
}

impl Llama {
    /// Builds the model from HF-named weights (`model.layers.N.self_attn.q_proj.weight`, …).
    pub fn from_weights(config: ModelConfig, mut w: Weights, device: &Device) -> Result<Self> {
        config.check_weights(|name| w.get(name).map(|t| t.dims().to_vec()))?;
        let mut take = |name: &str| -> Result<Tensor> {
            w.remove(name)
                .with_context(|| format!("the weights have no tensor '{name}'"))
        };
        let embed = take("model.embed_tokens.weight")?;
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
            Some(take("lm_head.weight")?)
        };
        let (cos, sin) = rope::rope_tables(&config, device)?;
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            cos,
            sin,
            kernels: Kernels::Fast,
        })
    }

    /// Loads a model directory (config.json + safetensors).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let weights = crate::hub::weights::load_dir(dir, device)?;
        Self::from_weights(config, weights, device)
            .with_context(|| format!("in model directory {}", dir.display()))
    }

    /// Loads a model directory onto `compute`'s device with its kernels; the block projections
    /// and an untied head are stored in its dtype (the embedding, norms and RoPE tables stay f32).
    pub fn load_with(dir: &Path, compute: &Compute) -> Result<Self> {
        let mut model = Self::load(dir, &compute.device)?;
        model.set_compute(compute)?;
        Ok(model)
    }

    /// Switches the kernels and rounds the projections to `compute`'s dtype (the model must
    /// already be on its device).
    pub fn set_compute(&mut self, compute: &Compute) -> Result<()> {
        self.kernels = compute.kernels;
        let dt = compute.dtype.dtype();
        for b in &mut self.blocks {
            for l in [
                &mut b.q,
                &mut b.k,
                &mut b.v,
                &mut b.o,
                &mut b.gate,
                &mut b.up,
                &mut b.down,
            ] {
                l.weight = l.weight.to_dtype(dt)?;
            }
        }
        if let Some(h) = &mut self.lm_head {
            *h = h.to_dtype(dt)?;
        }
        Ok(())
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
        self.pass(ids, cache, &Pass::inference())
    }

    /// Final hidden states for training: every weight frozen (backward computes input gradients
    /// only), except what `embedding` and `adapters` make trainable: the embedding lookup is
    /// theirs when given (e.g. the Wake rows read from a trainable block), and each projection
    /// adds the adapters' update when they carry one for it.
    pub fn hidden_states_train(
        &self,
        ids: &Tensor,
        embedding: Option<&dyn Embedding>,
        adapters: Option<&dyn Adapters>,
    ) -> Result<Tensor> {
        if let Some(a) = adapters {
            ensure!(
                a.num_layers() == self.blocks.len(),
                "the LoRA adapters cover {} layers but the model has {}",
                a.num_layers(),
                self.blocks.len()
            );
        }
        let pass = Pass {
            layers: match self.kernels {
                Kernels::Fast => TRAINING,
                Kernels::Generic => GENERIC,
            },
            embedding,
            adapters,
        };
        self.pass(ids, None, &pass)
    }

    fn pass(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, pass: &Pass) -> Result<Tensor> {
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
        let mut x = match pass.embedding {
            Some(e) => e.embed(&self.embed, &flat)?,
            None => self.embed.index_select(&flat, 0)?,
        }
        .reshape((batch, seq, self.config.hidden_size))?;
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        let mask = (pass.layers.mask)(seq, offset, x.device())?;
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let at = Position {
                cos: &cos,
                sin: &sin,
                mask: mask.as_ref(),
            };
            x = self.block_forward(i, block, &x, at, layer_cache, pass)?;
        }
        (pass.layers.norm)(&x, &self.norm, self.config.rms_norm_eps)
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

    fn block_forward(
        &self,
        layer: usize,
        b: &Block,
        x: &Tensor,
        at: Position,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        pass: &Pass,
    ) -> Result<Tensor> {
        let c = &self.config;
        let ops = &pass.layers;
        let norm = |x: &Tensor, w: &Tensor| (ops.norm)(x, w, c.rms_norm_eps);
        let project = |l: &Linear, target: Target, x: &Tensor| -> Result<Tensor> {
            let y = (ops.linear)(l, x)?;
            let Some(adapters) = pass.adapters else {
                return Ok(y);
            };
            let inner = x.dim(D::Minus1)?;
            let x2 = x.reshape((x.elem_count() / inner, inner))?;
            match adapters.delta(layer, target, &x2)? {
                Some(d) => {
                    let d = d.reshape(y.shape())?;
                    Ok((y + d)?)
                }
                None => Ok(y),
            }
        };
        let (batch, seq, _) = x.dims3()?;
        let h = norm(x, &b.input_norm)?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let rotate = |t: Tensor| (ops.rope)(&t, at.cos, at.sin);
        let q = rotate(heads(project(&b.q, Target::Q, &h)?, c.num_heads)?)?;
        let mut k = rotate(heads(project(&b.k, Target::K, &h)?, c.num_kv_heads)?)?;
        let mut v = heads(project(&b.v, Target::V, &h)?, c.num_kv_heads)?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let attn = (ops.attention)(&q, &k, &v, at.mask)?
            .transpose(1, 2)?
            .reshape((batch, seq, c.num_heads * c.head_dim))?;
        let x = (x + project(&b.o, Target::O, &attn)?)?;
        let h = norm(&x, &b.post_attention_norm)?;
        let gate = project(&b.gate, Target::Gate, &h)?;
        let up = project(&b.up, Target::Up, &h)?;
        let mlp = project(&b.down, Target::Down, &(ops.swiglu)(&gate, &up)?)?;
        Ok((x + mlp)?)
    }
}

/// The RoPE rows and the mask of the positions a pass covers.
#[derive(Clone, Copy)]
struct Position<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: Option<&'a Tensor>,
}

/// The layer implementations a pass is built from, chosen when the pass starts.
#[derive(Clone, Copy)]
struct Layers {
    norm: fn(&Tensor, &Tensor, f64) -> Result<Tensor>,
    rope: fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    linear: fn(&Linear, &Tensor) -> Result<Tensor>,
    /// The additive attention mask of `seq` queries after `offset` cached positions.
    mask: fn(usize, usize, &Device) -> Result<Option<Tensor>>,
    attention: fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
    swiglu: fn(&Tensor, &Tensor) -> Result<Tensor>,
}

/// Scoring and generation: candle's differentiable ops, composed; KV cache and offset masks.
const INFERENCE: Layers = Layers {
    norm: norm::rms_norm,
    rope: rope::rope,
    linear: Linear::forward,
    mask: attention::causal_mask,
    attention: attention::attention,
    swiglu: swiglu::swiglu_composed,
};

/// Training: the fused ops with hand-written backward passes; frozen weights get no gradient
/// work; one whole causal sequence (no cache, so no mask tensor).
const TRAINING: Layers = Layers {
    norm: norm::rms_norm_frozen,
    rope: rope::rope_fused,
    linear: Linear::forward_frozen,
    mask: |_, _, _| Ok(None),
    attention: |q, k, v, _| attention::causal_attention(q, k, v),
    swiglu: swiglu::swiglu,
};

/// Training on the generic kernels (any device): candle's differentiable ops and autograd, the
/// projections through the device's matmul with no weight-gradient work, an explicit causal mask.
const GENERIC: Layers = Layers {
    norm: norm::rms_norm,
    rope: rope::rope,
    linear: Linear::forward_frozen_generic,
    mask: attention::causal_mask,
    attention: attention::attention,
    swiglu: swiglu::swiglu_composed,
};

/// One forward pass: its layers, and what it trains besides the frozen weights.
struct Pass<'a> {
    layers: Layers,
    embedding: Option<&'a dyn Embedding>,
    adapters: Option<&'a dyn Adapters>,
}

impl Pass<'_> {
    fn inference() -> Self {
        Pass {
            layers: INFERENCE,
            embedding: None,
            adapters: None,
        }
    }
}

/// An input embedding that replaces the frozen lookup in a training pass (the Wake rows of
/// Phase 1 and 3 read from their trainable block).
pub trait Embedding {
    /// Rows `[n, hidden]` of the flat ids `[n]`; `table` is the model's frozen embedding.
    fn embed(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor>;
}

/// Low-rank adapters on the block projections of a training pass (LoRA).
pub trait Adapters {
    /// How many layers the adapters cover.
    fn num_layers(&self) -> usize;
    /// The update to add to projection `target` of `layer` for inputs `x` `[rows, in]`, or
    /// `None` when that projection carries no adapter.
    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>>;
}
