//! LoRA adapters (Phases 2 and 3): for each decoder layer and each target projection `W`
//! `[out, in]`, two trainable matrices `A` `[r, in]` and `B` `[out, r]` so that the projection
//! becomes `x·Wᵀ + (α/r)·(dropout(x)·Aᵀ)·Bᵀ`, as PEFT's `LoraLayer` computes it. The adapters
//! are saved in PEFT's format (`adapter_config.json` + `adapter_model.safetensors` with PEFT's key
//! names, loadable by `peft.PeftModel.from_pretrained`) and can be merged into the weights
//! (`W += (α/r)·B·A`) for an export that plain transformers loads.

use super::llama::Llama;
use super::weights::Weights;
use crate::sampling::Rng;
use crate::train::ops::{gemm_f32, slice};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A projection of a decoder block that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    /// Every target, in the fixed order of [`Lora::params`].
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// HF's module name (`q_proj`, …), as in PEFT's `target_modules`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The submodule holding the projection: `self_attn` or `mlp`.
    pub fn module(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    /// The target called `name` (`q_proj`, …).
    pub fn from_name(name: &str) -> Result<Self> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .with_context(|| {
                format!(
                    "unknown LoRA target '{name}': allowed are {}",
                    Target::ALL.map(|t| t.name()).join(", ")
                )
            })
    }

    /// Position in [`Target::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// HF's name of the base weight in layer `layer`: `model.layers.{i}.self_attn.q_proj.weight`.
    pub fn weight_name(self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}.weight",
            self.module(),
            self.name()
        )
    }

    /// PEFT's saved key of this target's `A` (`which` = "A") or `B` matrix in layer `layer`.
    pub fn peft_key(self, layer: usize, which: &str) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.{}.lora_{which}.weight",
            self.module(),
            self.name()
        )
    }
}

/// The shape of the adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of each adapter.
    pub r: usize,
    /// `α`: the update is scaled by `α / r`.
    pub alpha: f64,
    /// Dropout probability on the adapters' input during training.
    pub dropout: f64,
    /// Which projections carry adapters (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`).
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.1,
            targets: [
                "q_proj",
                "k_proj",
                "v_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl LoraConfig {
    /// Checks every field; the error names the bad value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.r >= 1, "lora.r must be at least 1, got {}", self.r);
        ensure!(
            self.alpha.is_finite() && self.alpha > 0.0,
            "lora.alpha must be a positive number, got {}",
            self.alpha
        );
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "lora.dropout must be in [0, 1), got {}",
            self.dropout
        );
        ensure!(
            !self.targets.is_empty(),
            "lora.targets is empty: name at least one of {}",
            Target::ALL.map(|t| t.name()).join(", ")
        );
        let mut seen = Vec::new();
        for name in &self.targets {
            let t = Target::from_name(name).context("in lora.targets")?;
            ensure!(
                !seen.contains(&t),
                "lora.targets names '{name}' twice: list each projection once"
            );
            seen.push(t);
        }
        Ok(())
    }

    /// The update's scale `α / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// The targets, in the fixed order of [`Target::ALL`] (call [`LoraConfig::validate`] first).
    pub fn target_set(&self) -> Result<Vec<Target>> {
        let mut ts = self
            .targets
            .iter()
            .map(|n| Target::from_name(n))
            .collect::<Result<Vec<_>>>()?;
        ts.sort();
        ts.dedup();
        Ok(ts)
    }
}

/// One projection's adapter: `A` `[r, in]` and `B` `[out, r]`, f32.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub a: Var,
    pub b: Var,
}

/// The adapters of a [`Llama`]. Cloning shares the variables (as candle's `Var` does).
#[derive(Debug, Clone)]
pub struct Lora {
    config: LoraConfig,
    /// Per layer, per [`Target::index`].
    layers: Vec<[Option<Adapter>; 7]>,
}

/// LoRA in a training forward pass ([`Llama::hidden_states_train`]).
#[derive(Debug, Clone, Copy)]
pub struct LoraPass<'a> {
    pub lora: &'a Lora,
    /// Seeds the dropout masks; `None`: no dropout (evaluation).
    pub dropout_seed: Option<u64>,
}

/// `(out, in)` of a target's base weight in layer `layer`.
fn base_dims(model: &Llama, layer: usize, t: Target) -> Result<(usize, usize)> {
    let b = &model.blocks[layer];
    let l = match t {
        Target::Q => &b.q,
        Target::K => &b.k,
        Target::V => &b.v,
        Target::O => &b.o,
        Target::Gate => &b.gate,
        Target::Up => &b.up,
        Target::Down => &b.down,
    };
    Ok(l.weight.dims2()?)
}

impl Lora {
    /// Fresh adapters with PEFT's default initialisation: `A` by `kaiming_uniform_(a = √5)`, i.e.
    /// uniform in `±1/√in`, and `B = 0` (so the adapted model starts equal to the base). The
    /// draws come from [`Rng`] seeded with `seed`, in the order of [`Lora::params`].
    pub fn new(model: &Llama, config: LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let targets = config.target_set()?;
        let device = model.embed.device();
        let mut rng = Rng::new(seed);
        let mut layers = Vec::with_capacity(model.blocks.len());
        for layer in 0..model.blocks.len() {
            let mut slots: [Option<Adapter>; 7] = Default::default();
            for &t in &targets {
                let (out, inp) = base_dims(model, layer, t)?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..config.r * inp)
                    .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
                    .collect();
                slots[t.index()] = Some(Adapter {
                    a: Var::from_vec(a, (config.r, inp), device)?,
                    b: Var::zeros((out, config.r), candle_core::DType::F32, device)?,
                });
            }
            layers.push(slots);
        }
        Ok(Self { config, layers })
    }

    /// Adapters from PEFT-named tensors (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, …):
    /// every target of every layer must be there with shapes `[r, in]` and `[out, r]`, and
    /// nothing else.
    pub fn from_tensors(
        model: &Llama,
        config: LoraConfig,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let targets = config.target_set()?;
        let mut layers = Vec::with_capacity(model.blocks.len());
        for layer in 0..model.blocks.len() {
            let mut slots: [Option<Adapter>; 7] = Default::default();
            for &t in &targets {
                let (out, inp) = base_dims(model, layer, t)?;
                let mut take = |which: &str, shape: [usize; 2]| -> Result<Var> {
                    let key = t.peft_key(layer, which);
                    let v = tensors.remove(&key).with_context(|| {
                        format!(
                            "the adapter has no tensor '{key}': it was made for other targets or fewer layers (lora.targets = {:?})",
                            config.targets
                        )
                    })?;
                    ensure!(
                        v.dims() == shape,
                        "adapter tensor '{key}' has shape {:?}, expected {shape:?} (r = {}, base weight {out}×{inp}): the adapter belongs to another model or rank",
                        v.dims(),
                        config.r
                    );
                    Ok(Var::from_tensor(&v.to_dtype(candle_core::DType::F32)?)?)
                };
                let a = take("A", [config.r, inp])?;
                let b = take("B", [out, config.r])?;
                slots[t.index()] = Some(Adapter { a, b });
            }
            layers.push(slots);
        }
        if !tensors.is_empty() {
            let mut extra: Vec<&String> = tensors.keys().collect();
            extra.sort();
            bail!(
                "the adapter has {} tensor(s) this model and config do not use, e.g. '{}': it was made for more layers or other targets (lora.targets = {:?})",
                extra.len(),
                extra[0],
                config.targets
            );
        }
        Ok(Self { config, layers })
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// `α / r`.
    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    /// How many decoder layers the adapters cover.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The adapter of `target` in `layer`, if that projection carries one.
    pub fn adapter(&self, layer: usize, target: Target) -> Option<&Adapter> {
        self.layers.get(layer)?[target.index()].as_ref()
    }

    /// Every matrix with its PEFT key, in a fixed order: layer by layer, targets in
    /// [`Target::ALL`] order, `A` before `B`.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (layer, slots) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                if let Some(ad) = &slots[t.index()] {
                    out.push((t.peft_key(layer, "A"), ad.a.clone()));
                    out.push((t.peft_key(layer, "B"), ad.b.clone()));
                }
            }
        }
        out
    }

    /// The number of trainable values.
    pub fn num_params(&self) -> usize {
        self.params().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Writes `DIR/adapter_config.json` and `DIR/adapter_model.safetensors` as PEFT saves them
    /// (`base_model` becomes `base_model_name_or_path`). Each file is written atomically.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create adapter directory {}", dir.display()))?;
        let tensors: BTreeMap<String, Tensor> = self
            .params()
            .into_iter()
            .map(|(k, v)| (k, v.as_detached_tensor()))
            .collect();
        super::weights::save_file(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
        let json = peft_config_json(&self.config, base_model);
        let mut text = serde_json::to_string_pretty(&json)?;
        text.push('\n');
        crate::atomic::write(&dir.join(ADAPTER_CONFIG), text.as_bytes())
    }

    /// Reads adapters saved by [`Lora::save_peft`] or by PEFT (`save_pretrained`) for `model`.
    pub fn load_peft(dir: &Path, model: &Llama) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "cannot read {}: is {} a PEFT adapter directory?",
                cfg_path.display(),
                dir.display()
            )
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
        let config =
            config_from_peft_json(&json).with_context(|| format!("in {}", cfg_path.display()))?;
        let weights = dir.join(ADAPTER_WEIGHTS);
        if !weights.is_file() {
            bail!(
                "no {} in {}: only safetensors adapters are read (re-save with safe_serialization=True)",
                ADAPTER_WEIGHTS,
                dir.display()
            );
        }
        let tensors = super::weights::load_file(&weights, model.embed.device())?;
        Self::from_tensors(model, config, tensors)
            .with_context(|| format!("in {}", weights.display()))
    }

    /// Adds each adapter's update into the base weights: `W += (α/r)·B·A`, for the HF names
    /// `model.layers.{i}.self_attn.q_proj.weight`, ….
    pub fn merge_into(&self, weights: &mut Weights) -> Result<()> {
        let scale = self.scale();
        for (layer, slots) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                let Some(ad) = &slots[t.index()] else {
                    continue;
                };
                let name = t.weight_name(layer);
                let w = weights
                    .get(&name)
                    .with_context(|| format!("cannot merge the adapters: no weight '{name}'"))?;
                let delta = (ad
                    .b
                    .as_detached_tensor()
                    .matmul(&ad.a.as_detached_tensor())?
                    * scale)?;
                ensure!(
                    w.dims() == delta.dims(),
                    "cannot merge the adapters: weight '{name}' is {:?} but the update is {:?}",
                    w.dims(),
                    delta.dims()
                );
                let merged = (w.to_dtype(candle_core::DType::F32)? + delta)?;
                weights.insert(name, merged);
            }
        }
        Ok(())
    }
}

/// PEFT's adapter file names.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The `adapter_config.json` PEFT writes for a plain LoRA on a causal LM (peft 0.21's fields
/// that bear on loading).
fn peft_config_json(c: &LoraConfig, base_model: &str) -> serde_json::Value {
    // PEFT writes an integral alpha as an integer (16, not 16.0).
    let alpha = if c.alpha.fract() == 0.0 && c.alpha.abs() < 1e15 {
        serde_json::json!(c.alpha as i64)
    } else {
        serde_json::json!(c.alpha)
    };
    serde_json::json!({
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_bias": false,
        "lora_dropout": c.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": c.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": c.targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false,
    })
}

/// The [`LoraConfig`] of a PEFT `adapter_config.json`; refuses what wake2vec does not implement.
fn config_from_peft_json(j: &serde_json::Value) -> Result<LoraConfig> {
    let obj = j
        .as_object()
        .context("adapter_config.json is not a JSON object")?;
    let field = |k: &str| obj.get(k).unwrap_or(&serde_json::Value::Null);
    let peft_type = field("peft_type").as_str().unwrap_or("");
    ensure!(
        peft_type == "LORA",
        "peft_type is {}, but wake2vec reads only \"LORA\" adapters",
        field("peft_type")
    );
    for flag in ["use_dora", "use_rslora", "fan_in_fan_out", "lora_bias"] {
        ensure!(
            !field(flag).as_bool().unwrap_or(false),
            "{flag} = true is not supported: wake2vec reads plain LoRA adapters only ({flag} false)"
        );
    }
    let bias = field("bias").as_str().unwrap_or("none");
    ensure!(
        bias == "none",
        "bias = \"{bias}\" is not supported: wake2vec's adapters have no bias (bias \"none\")"
    );
    for k in ["rank_pattern", "alpha_pattern"] {
        let empty = match field(k) {
            serde_json::Value::Null => true,
            serde_json::Value::Object(m) => m.is_empty(),
            _ => false,
        };
        ensure!(
            empty,
            "{k} = {} is not supported: every adapter must share r and lora_alpha ({k} {{}})",
            field(k)
        );
    }
    for k in [
        "layers_to_transform",
        "modules_to_save",
        "layer_replication",
    ] {
        ensure!(
            field(k).is_null(),
            "{k} = {} is not supported: wake2vec adapts every layer and saves no extra modules ({k} null)",
            field(k)
        );
    }
    let r = field("r")
        .as_u64()
        .context("\"r\" is missing or not a positive integer")? as usize;
    let alpha = field("lora_alpha")
        .as_f64()
        .context("\"lora_alpha\" is missing or not a number")?;
    let dropout = match field("lora_dropout") {
        serde_json::Value::Null => 0.0,
        v => v.as_f64().context("\"lora_dropout\" is not a number")?,
    };
    let targets = match field("target_modules") {
        serde_json::Value::Array(a) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .context("\"target_modules\" holds a non-string")
            })
            .collect::<Result<Vec<_>>>()?,
        serde_json::Value::String(s) => bail!(
            "target_modules is the pattern \"{s}\": wake2vec reads only a list of module names (q_proj, k_proj, …)"
        ),
        _ => bail!("\"target_modules\" is missing: expected a list of module names"),
    };
    let config = LoraConfig {
        r,
        alpha,
        dropout,
        targets,
    };
    config.validate()?;
    Ok(config)
}

/// splitmix64's finaliser: a well-mixed 64-bit value from `x`.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Values per independently seeded chunk of a dropout mask (chunks are drawn in parallel; the
/// mask depends only on the seed, the stream and the shape, never on the thread count).
const MASK_CHUNK: usize = 1 << 14;

/// An inverted-dropout mask of `n` values for stream `(seed, layer, target)`: each value is 0
/// with probability `p` and `1/(1 − p)` otherwise. A value is dropped when a 32-bit draw is
/// below `p·2³²`; each chunk of [`MASK_CHUNK`] values has its own generator.
pub fn dropout_mask(n: usize, p: f64, seed: u64, layer: usize, target: Target) -> Vec<f32> {
    let stream = mix(mix(mix(seed) ^ layer as u64) ^ target.index() as u64);
    let threshold = (p * 4_294_967_296.0).round() as u64;
    let keep = (1.0 / (1.0 - p)) as f32;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(MASK_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = Rng::new(mix(stream ^ c as u64));
            for pair in chunk.chunks_mut(2) {
                let bits = rng.next_u64();
                for (k, v) in pair.iter_mut().enumerate() {
                    let u = (bits >> (32 * k)) & 0xFFFF_FFFF;
                    *v = if u < threshold { 0.0 } else { keep };
                }
            }
        });
    out
}

/// The dropout mask of one adapter application.
#[derive(Debug, Clone)]
pub enum Mask {
    /// No dropout (evaluation, or p = 0).
    None,
    /// An explicit mask `[rows·in]`.
    Given(std::sync::Arc<Vec<f32>>),
    /// [`dropout_mask`]`(rows·in, p, seed, layer, target)`, drawn again in the backward pass
    /// instead of being kept in memory.
    Seeded {
        p: f64,
        seed: u64,
        layer: usize,
        target: Target,
    },
}

impl Mask {
    fn values(&self, n: usize) -> Option<std::borrow::Cow<'_, [f32]>> {
        match self {
            Mask::None => None,
            Mask::Given(m) => Some(std::borrow::Cow::Borrowed(m.as_slice())),
            Mask::Seeded {
                p,
                seed,
                layer,
                target,
            } => Some(std::borrow::Cow::Owned(dropout_mask(
                n, *p, *seed, *layer, *target,
            ))),
        }
    }
}

/// The adapter's contribution `scale·(mask ⊙ x)·Aᵀ·Bᵀ` for `x` `[rows, in]`, as one operation
/// with a hand-written backward pass (gradients for `x`, `A` and `B`; the masked input and the
/// `[rows, r]` product are recomputed there rather than kept). Composed from candle ops the
/// 180 adapters of SmolLM2 made a micro-batch 1.7× slower than Phase 1's.
pub fn adapter_delta(x: &Tensor, adapter: &Adapter, scale: f64, mask: Mask) -> Result<Tensor> {
    let (rows, inp) = x.dims2()?;
    let (r, a_in) = adapter.a.dims2()?;
    let (out, b_r) = adapter.b.dims2()?;
    ensure!(
        a_in == inp && b_r == r,
        "LoRA shapes: x {rows}×{inp}, A {r}×{a_in}, B {out}×{b_r}"
    );
    if let Mask::Given(m) = &mask {
        ensure!(m.len() == rows * inp, "the dropout mask has the wrong size");
    }
    let op = LoraDelta {
        scale: scale as f32,
        mask,
    };
    Ok(x.contiguous()?.apply_op3(
        &adapter.a.as_tensor().contiguous()?,
        &adapter.b.as_tensor().contiguous()?,
        op,
    )?)
}

struct LoraDelta {
    scale: f32,
    mask: Mask,
}

/// `(mask ⊙ x)` and `t = (mask ⊙ x)·Aᵀ` of the forward pass.
fn masked_and_low_rank(
    x: &[f32],
    a: &[f32],
    mask: Option<&[f32]>,
    (rows, inp, r): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let xm: Vec<f32> = match mask {
        Some(m) => x.iter().zip(m).map(|(x, m)| x * m).collect(),
        None => x.to_vec(),
    };
    let mut t = vec![0f32; rows * r];
    gemm_f32(rows, r, inp, &mut t, &xm, (inp, 1), a, (1, inp));
    (xm, t)
}

impl CustomOp3 for LoraDelta {
    fn name(&self) -> &'static str {
        "lora-delta"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inp) = l1.shape().dims2()?;
        let (r, _) = l2.shape().dims2()?;
        let (out, _) = l3.shape().dims2()?;
        let (x, a, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let mask = self.mask.values(rows * inp);
        let (_, mut t) = masked_and_low_rank(x, a, mask.as_deref(), (rows, inp, r));
        t.iter_mut().for_each(|v| *v *= self.scale);
        let mut y = vec![0f32; rows * out];
        gemm_f32(rows, out, r, &mut y, &t, (r, 1), b, (1, r));
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let (r, _) = a.dims2()?;
        let (out, _) = b.dims2()?;
        let (x, a, b) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
        let dy: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        let (x, a, b): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            x.flatten_all()?.to_vec1()?,
            a.flatten_all()?.to_vec1()?,
            b.flatten_all()?.to_vec1()?,
        );
        let mask = self.mask.values(rows * inp);
        let (xm, t) = masked_and_low_rank(&x, &a, mask.as_deref(), (rows, inp, r));
        let s = self.scale;
        // dyB = dy·B [rows, r]; dB = s·dyᵀ·t [out, r]; dA = s·dyBᵀ·xm [r, in];
        // dx = s·(dyB·A) ⊙ mask [rows, in].
        let mut dyb = vec![0f32; rows * r];
        gemm_f32(rows, r, out, &mut dyb, &dy, (out, 1), &b, (r, 1));
        let mut db = vec![0f32; out * r];
        gemm_f32(out, r, rows, &mut db, &dy, (1, out), &t, (r, 1));
        let mut da = vec![0f32; r * inp];
        gemm_f32(r, inp, rows, &mut da, &dyb, (1, r), &xm, (inp, 1));
        let mut dx = vec![0f32; rows * inp];
        gemm_f32(rows, inp, r, &mut dx, &dyb, (r, 1), &a, (inp, 1));
        db.iter_mut().for_each(|v| *v *= s);
        da.iter_mut().for_each(|v| *v *= s);
        match &mask {
            Some(m) => dx.iter_mut().zip(m.iter()).for_each(|(v, m)| *v *= s * m),
            None => dx.iter_mut().for_each(|v| *v *= s),
        }
        let dev = Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dx, (rows, inp), &dev)?),
            Some(Tensor::from_vec(da, (r, inp), &dev)?),
            Some(Tensor::from_vec(db, (out, r), &dev)?),
        ))
    }
}

impl LoraPass<'_> {
    /// The adapter's contribution for `target` in `layer` on `x` `[rows, in]` (with this pass's
    /// dropout), or `None` when the projection carries no adapter.
    pub fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(adapter) = self.lora.adapter(layer, target) else {
            return Ok(None);
        };
        let p = self.lora.config.dropout;
        let mask = match self.dropout_seed {
            Some(seed) if p > 0.0 => Mask::Seeded {
                p,
                seed,
                layer,
                target,
            },
            _ => Mask::None,
        };
        adapter_delta(x, adapter, self.lora.scale(), mask).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn default_config_is_the_seeds_and_valid() {
        let c = LoraConfig::default();
        c.validate().unwrap();
        assert_eq!((c.r, c.alpha, c.dropout), (8, 16.0, 0.1));
        assert_eq!(c.scale(), 2.0);
        assert_eq!(
            c.target_set().unwrap(),
            vec![
                Target::Q,
                Target::K,
                Target::V,
                Target::Gate,
                Target::Up,
                Target::Down
            ]
        );
    }

    #[test]
    fn bad_configs_name_the_value_and_the_allowed_ones() {
        let bad = |f: &dyn Fn(&mut LoraConfig)| {
            let mut c = LoraConfig::default();
            f(&mut c);
            format!("{:#}", c.validate().unwrap_err())
        };
        let e = bad(&|c| c.targets = vec!["qproj".into()]);
        assert!(e.contains("'qproj'") && e.contains("o_proj"), "{e}");
        let e = bad(&|c| c.targets = vec!["q_proj".into(), "q_proj".into()]);
        assert!(e.contains("twice"), "{e}");
        let e = bad(&|c| c.targets.clear());
        assert!(e.contains("empty"), "{e}");
        let e = bad(&|c| c.r = 0);
        assert!(e.contains("lora.r") && e.contains('0'), "{e}");
        let e = bad(&|c| c.alpha = -1.0);
        assert!(e.contains("lora.alpha") && e.contains("-1"), "{e}");
        let e = bad(&|c| c.dropout = 1.0);
        assert!(e.contains("lora.dropout") && e.contains("[0, 1)"), "{e}");
        // Unknown keys are refused when read from TOML.
        let e = toml::from_str::<LoraConfig>("rank = 4").unwrap_err();
        assert!(e.to_string().contains("rank"), "{e}");
        let c: LoraConfig = toml::from_str("r = 4\ntargets = [\"o_proj\"]").unwrap();
        assert_eq!((c.r, c.alpha, c.targets.len()), (4, 16.0, 1));
    }

    #[test]
    fn dropout_mask_is_deterministic_and_has_the_right_rate() {
        let n = 3 * MASK_CHUNK + 17;
        let a = dropout_mask(n, 0.1, 7, 3, Target::Up);
        assert_eq!(a, dropout_mask(n, 0.1, 7, 3, Target::Up));
        // Other seed, layer or target: another mask.
        assert_ne!(a, dropout_mask(n, 0.1, 8, 3, Target::Up));
        assert_ne!(a, dropout_mask(n, 0.1, 7, 4, Target::Up));
        assert_ne!(a, dropout_mask(n, 0.1, 7, 3, Target::Down));
        let keep = 1.0 / 0.9f32;
        assert!(a.iter().all(|&v| v == 0.0 || v == keep));
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        // Binomial sd at n ≈ 49K is 0.0014.
        assert!((dropped - 0.1).abs() < 0.006, "dropped {dropped}");
        // The mask's mean is 1: inverted dropout keeps the expectation.
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        assert!(dropout_mask(1000, 0.0, 1, 0, Target::Q)
            .iter()
            .all(|&v| v == 1.0));
    }

    /// `y = scale·(m ⊙ x)·Aᵀ·Bᵀ` against central differences in x, A and B (f64 sums of an f32
    /// function, weighted by fixed random coefficients so every output counts).
    #[test]
    fn adapter_delta_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let (rows, inp, out, r) = (5, 7, 6, 3);
        let mut rng = Rng::new(11);
        let mut rand =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect() };
        let x0 = rand(rows * inp);
        let a0 = rand(r * inp);
        let b0 = rand(out * r);
        let w = Tensor::from_vec(rand(rows * out), (rows, out), &dev).unwrap();
        let mask = std::sync::Arc::new(dropout_mask(rows * inp, 0.3, 5, 0, Target::Q));
        let scale = 1.7;
        let f = |x: &[f32], a: &[f32], b: &[f32]| -> f64 {
            let ad = Adapter {
                a: Var::from_vec(a.to_vec(), (r, inp), &dev).unwrap(),
                b: Var::from_vec(b.to_vec(), (out, r), &dev).unwrap(),
            };
            let x = Tensor::from_vec(x.to_vec(), (rows, inp), &dev).unwrap();
            let y = adapter_delta(&x, &ad, scale, Mask::Given(mask.clone())).unwrap();
            let y: Vec<f32> = (y * &w).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            y.iter().map(|&v| v as f64).sum()
        };
        let x = Var::from_vec(x0.clone(), (rows, inp), &dev).unwrap();
        let ad = Adapter {
            a: Var::from_vec(a0.clone(), (r, inp), &dev).unwrap(),
            b: Var::from_vec(b0.clone(), (out, r), &dev).unwrap(),
        };
        let y = adapter_delta(x.as_tensor(), &ad, scale, Mask::Given(mask.clone())).unwrap();
        let grads = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = |v: &Var| -> Vec<f32> {
            grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (gx, ga, gb) = (g(&x), g(&ad.a), g(&ad.b));
        let eps = 1e-2f32;
        let check = |which: usize, grad: &[f32]| {
            for i in 0..grad.len() {
                let mut args = [x0.clone(), a0.clone(), b0.clone()];
                args[which][i] += eps;
                let up = f(&args[0], &args[1], &args[2]);
                args[which][i] -= 2.0 * eps;
                let down = f(&args[0], &args[1], &args[2]);
                let fd = (up - down) / (2.0 * eps as f64);
                assert!(
                    (fd - grad[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                    "operand {which} entry {i}: analytic {} vs finite difference {fd}",
                    grad[i]
                );
            }
        };
        check(0, &gx);
        check(1, &ga);
        check(2, &gb);
        // Dropped inputs get no gradient.
        let m = mask.as_slice();
        assert!(m.contains(&0.0));
        for (gi, mi) in gx.iter().zip(m) {
            if *mi == 0.0 {
                assert_eq!(*gi, 0.0);
            }
        }
    }

    #[test]
    fn peft_json_round_trips_and_refuses_what_is_unsupported() {
        let c = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.05,
            targets: vec!["o_proj".into(), "q_proj".into()],
        };
        let j = peft_config_json(&c, "base");
        assert_eq!(config_from_peft_json(&j).unwrap(), c);
        let with = |k: &str, v: serde_json::Value| {
            let mut j = j.clone();
            j[k] = v;
            format!("{:#}", config_from_peft_json(&j).unwrap_err())
        };
        assert!(with("peft_type", "IA3".into()).contains("IA3"));
        assert!(with("use_dora", true.into()).contains("use_dora"));
        assert!(with("use_rslora", true.into()).contains("use_rslora"));
        assert!(with("bias", "all".into()).contains("bias"));
        assert!(with("target_modules", ".*proj".into()).contains("pattern"));
        assert!(with("target_modules", serde_json::json!(["x_proj"])).contains("x_proj"));
        assert!(with("rank_pattern", serde_json::json!({"q_proj": 2})).contains("rank_pattern"));
        assert!(with("r", serde_json::Value::Null).contains("\"r\""));
    }
}
