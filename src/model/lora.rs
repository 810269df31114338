//! LoRA adapters (Phases 2 and 3): for each decoder layer and each target projection `W`
//! `[out, in]`, two trainable matrices `A` `[r, in]` and `B` `[out, r]` so that the projection
//! becomes `x·Wᵀ + (α/r)·(dropout(x)·Aᵀ)·Bᵀ`, as PEFT's `LoraLayer` computes it. The adapters
//! are saved in PEFT's format (`adapter_config.json` + `adapter_model.safetensors` with PEFT's key
//! names, loadable by `peft.PeftModel.from_pretrained`) and can be merged into the weights
//! (`W += (α/r)·B·A`) for an export that plain transformers loads.

use super::llama::{Adapters, Llama};
use crate::hub::weights::Weights;
use crate::nn::device::Kernels;
use crate::nn::lora_op::{dropout_mask, lora_delta, Mask};
use crate::util::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub use super::proj::Target;

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
    /// The kernels of the model the adapters were made for.
    kernels: Kernels,
}

/// LoRA in a training forward pass: the [`Adapters`] of [`Llama::hidden_states_train`].
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
                ensure!(
                    config.r <= out.min(inp),
                    "lora.r = {} exceeds the {} projection's {out}×{inp}: a rank above min(out, in) = {} adds nothing; lower lora.r",
                    config.r,
                    t.name(),
                    out.min(inp)
                );
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
        Ok(Self {
            config,
            layers,
            kernels: model.kernels,
        })
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
        Ok(Self {
            config,
            layers,
            kernels: model.kernels,
        })
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
        crate::hub::weights::save_file(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
        let json = peft_config_json(&self.config, base_model);
        let mut text = serde_json::to_string_pretty(&json)?;
        text.push('\n');
        crate::util::fs::write(&dir.join(ADAPTER_CONFIG), text.as_bytes())
    }

    /// Reads adapters saved by [`Lora::save_peft`] or by PEFT (`save_pretrained`) for `model`.
    pub fn load_peft(dir: &Path, model: &Llama) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let text = crate::util::fs::read_to_string(&cfg_path).with_context(|| {
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
        let tensors = crate::hub::weights::load_file(&weights, model.embed.device())?;
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

impl LoraPass<'_> {
    /// The generic kernels' adapter update, composed from candle ops on the adapters' device:
    /// `scale·(mask ⊙ x)·Aᵀ·Bᵀ`, the mask drawn on the host by the same seeded stream as the
    /// fused op's, so both kernels drop the same values.
    fn delta_composed(
        &self,
        layer: usize,
        target: Target,
        adapter: &Adapter,
        x: &Tensor,
    ) -> Result<Tensor> {
        let p = self.lora.config.dropout;
        let x = match self.dropout_seed {
            Some(seed) if p > 0.0 => {
                let mask = dropout_mask(x.elem_count(), p, seed, layer, target.index());
                (x * Tensor::from_vec(mask, x.shape(), x.device())?)?
            }
            _ => x.clone(),
        };
        let low = x.matmul(&adapter.a.as_tensor().t()?)?;
        Ok((low.matmul(&adapter.b.as_tensor().t()?)? * self.lora.scale())?)
    }
}

impl Adapters for LoraPass<'_> {
    fn num_layers(&self) -> usize {
        self.lora.num_layers()
    }

    /// The adapter's contribution for `target` in `layer` on `x` `[rows, in]` (with this pass's
    /// dropout), or `None` when the projection carries no adapter.
    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(adapter) = self.lora.adapter(layer, target) else {
            return Ok(None);
        };
        let p = self.lora.config.dropout;
        if self.lora.kernels == Kernels::Generic {
            return self.delta_composed(layer, target, adapter, x).map(Some);
        }
        let mask = match self.dropout_seed {
            Some(seed) if p > 0.0 => Mask::Seeded {
                p,
                seed,
                layer,
                target: target.index(),
            },
            _ => Mask::None,
        };
        lora_delta(
            x,
            adapter.a.as_tensor(),
            adapter.b.as_tensor(),
            self.lora.scale(),
            mask,
        )
        .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
