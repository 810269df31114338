//! Model configuration, read from an HF `config.json` (Llama family and Qwen2).

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The architectures whose forward pass wake2vec implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// Llama 1/2/3, TinyLlama, SmolLM2, Mistral: no attention bias unless `attention_bias`.
    Llama,
    /// Qwen2: bias on the q/k/v projections.
    Qwen2,
}

/// RoPE frequency scaling, as in transformers' `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Llama 3.1's piecewise wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The keys of an HF `config.json` that name the architecture, read first: another family's
/// config lacks the Llama keys, and "missing field `hidden_size`" would hide the real problem.
#[derive(Debug, Deserialize)]
struct HfArchitecture {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
}

/// The subset of an HF `config.json` that wake2vec reads; unknown keys are ignored.
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 folds `rope_theta` and `rope_scaling` into this object.
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

impl ModelConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = crate::util::fs::read_to_string(&path)
            .context("a model directory needs config.json, *.safetensors and tokenizer.json")?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses and validates the text of an HF `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let arch: HfArchitecture =
            serde_json::from_str(text).context("config.json is not a valid model config")?;
        let architecture = architecture_of(&arch)?;
        let hf: HfConfig =
            serde_json::from_str(text).context("config.json is not a valid model config")?;
        if let Some(act) = &hf.hidden_act {
            if act != "silu" && act != "swish" {
                bail!("hidden_act '{act}' is not supported: wake2vec implements SiLU-gated MLPs");
            }
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None => implied_head_dim(hf.hidden_size, hf.num_attention_heads)?,
        };
        let (rope_theta, rope_scaling) = rope_of(&hf)?;
        let config = Self {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || hf.attention_bias,
            o_bias: architecture == Architecture::Llama && hf.attention_bias,
            mlp_bias: hf.mlp_bias,
            bos_token_id: hf
                .bos_token_id
                .as_ref()
                .map(ids_of)
                .transpose()?
                .and_then(|v| v.first().copied()),
            eos_token_ids: hf
                .eos_token_id
                .as_ref()
                .map(ids_of)
                .transpose()?
                .unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that the configuration describes a model wake2vec can build and hold: every size
    /// positive, heads that divide, finite positive norm and RoPE parameters, special ids inside
    /// the vocabulary, and f32 weights that fit in this machine's memory. HF and GGUF loading
    /// both pass through here, so neither writes or reads a model the other would refuse.
    pub fn validate(&self) -> Result<()> {
        for (key, n) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            ensure!(n > 0, "{key} is 0: a model needs at least one");
        }
        ensure!(
            self.num_heads.is_multiple_of(self.num_kv_heads),
            "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            self.num_heads,
            self.num_kv_heads
        );
        ensure!(
            self.head_dim.is_multiple_of(2),
            "head_dim {} must be even for rotary embeddings",
            self.head_dim
        );
        ensure!(
            self.vocab_size <= 1 << 32,
            "vocab_size {} exceeds the 2^32 ids a token id can take",
            self.vocab_size
        );
        let positive = |key: &str, x: f64| {
            ensure!(
                x.is_finite() && x > 0.0,
                "{key} = {} must be a finite positive number",
                shown(x)
            );
            Ok(())
        };
        positive("rms_norm_eps", self.rms_norm_eps)?;
        // Below 1 the inverse frequencies grow past 1 and, for tiny values, past f32.
        let at_least_one = |key: &str, x: f64| {
            ensure!(
                x.is_finite() && x >= 1.0,
                "{key} = {} must be a finite number >= 1",
                shown(x)
            );
            Ok(())
        };
        at_least_one("rope_theta", self.rope_theta)?;
        match self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => at_least_one("rope scaling factor", factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                at_least_one("rope scaling factor", factor)?;
                positive("rope scaling low_freq_factor", low_freq_factor)?;
                ensure!(
                    high_freq_factor.is_finite() && high_freq_factor > low_freq_factor,
                    "rope scaling high_freq_factor = {high_freq_factor} must exceed \
                     low_freq_factor = {low_freq_factor} (llama3 scaling divides by their difference)"
                );
                ensure!(
                    original_max_position_embeddings > 0,
                    "rope scaling original_max_position_embeddings is 0: a model needs at least one"
                );
            }
        }
        for (key, id) in self
            .bos_token_id
            .iter()
            .map(|id| ("bos_token_id", id))
            .chain(self.eos_token_ids.iter().map(|id| ("eos_token_id", id)))
        {
            ensure!(
                (*id as usize) < self.vocab_size,
                "{key} {id} is outside the vocabulary of {} tokens",
                self.vocab_size
            );
        }
        crate::util::mem::check_fits(
            self.f32_bytes(),
            &format!(
                "the model ({} layers, hidden {}, vocabulary {}, context {}) in f32",
                self.num_layers, self.hidden_size, self.vocab_size, self.max_position_embeddings
            ),
            "check these sizes, or use a machine with more memory",
        )
    }

    /// Bytes of the f32 weights and RoPE tables this configuration describes (saturating).
    fn f32_bytes(&self) -> u128 {
        let n = |x: usize| x as u128;
        let (h, q, kv) = (
            n(self.hidden_size),
            n(self.num_heads).saturating_mul(n(self.head_dim)),
            n(self.num_kv_heads).saturating_mul(n(self.head_dim)),
        );
        let attention = h.saturating_mul(q.saturating_mul(2).saturating_add(kv.saturating_mul(2)));
        let mlp = h
            .saturating_mul(n(self.intermediate_size))
            .saturating_mul(3);
        let layer = attention
            .saturating_add(mlp)
            .saturating_add(q + 2 * kv + 2 * h + 2 * n(self.intermediate_size));
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        let embeddings = n(self.vocab_size).saturating_mul(h).saturating_mul(heads);
        // The angle, cos and sin tables, [context, head_dim / 2] each.
        let rope = n(self.max_position_embeddings).saturating_mul(n(self.head_dim / 2) * 3);
        n(self.num_layers)
            .saturating_mul(layer)
            .saturating_add(embeddings)
            .saturating_add(rope)
            .saturating_add(h)
            .saturating_mul(4)
    }

    /// The shape each HF-named weight must have, `[out, in]` for projections; the embedding
    /// (and an untied head) must have at least `vocab_size` rows and `hidden_size` columns.
    pub fn check_weights(&self, shape_of: impl Fn(&str) -> Option<Vec<usize>>) -> Result<()> {
        let (h, q, kv, m) = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        );
        let embed = "model.embed_tokens.weight";
        let rows = match shape_of(embed).as_deref() {
            Some(&[rows, hidden]) if hidden == h && rows >= self.vocab_size => rows,
            Some(dims) => bail!(
                "{embed} is {}, but the configuration says vocab_size {} × hidden_size {h}",
                dims_of(dims),
                self.vocab_size
            ),
            None => bail!("the weights have no tensor '{embed}'"),
        };
        let mut expected: Vec<(String, Vec<usize>)> = vec![("model.norm.weight".into(), vec![h])];
        if !self.tie_word_embeddings {
            expected.push(("lm_head.weight".into(), vec![rows, h]));
        }
        for i in 0..self.num_layers {
            let p = format!("model.layers.{i}");
            expected.push((format!("{p}.input_layernorm.weight"), vec![h]));
            expected.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            for (name, out, inp, bias) in [
                ("self_attn.q_proj", q, h, self.qkv_bias),
                ("self_attn.k_proj", kv, h, self.qkv_bias),
                ("self_attn.v_proj", kv, h, self.qkv_bias),
                ("self_attn.o_proj", h, q, self.o_bias),
                ("mlp.gate_proj", m, h, self.mlp_bias),
                ("mlp.up_proj", m, h, self.mlp_bias),
                ("mlp.down_proj", h, m, self.mlp_bias),
            ] {
                expected.push((format!("{p}.{name}.weight"), vec![out, inp]));
                if bias {
                    expected.push((format!("{p}.{name}.bias"), vec![out]));
                }
            }
        }
        for (name, want) in expected {
            match shape_of(&name) {
                Some(dims) if dims == want => {}
                Some(dims) => bail!(
                    "{name} is {}, but the configuration implies {}: the weights and config.json \
                     describe different models",
                    dims_of(&dims),
                    dims_of(&want)
                ),
                None if name == "lm_head.weight" => {
                    bail!("the weights have no tensor '{name}', and config.json says tie_word_embeddings = false")
                }
                None => bail!("the weights have no tensor '{name}'"),
            }
        }
        Ok(())
    }

    /// The `config.json` transformers expects for this model (used when importing GGUF).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (arch, model_type) = match self.architecture {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::Default => serde_json::Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                })
            }
        };
        let mut json = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [] => serde_json::Value::Null,
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            },
            "torch_dtype": "float32",
        });
        if self.architecture == Architecture::Llama {
            json["attention_bias"] = serde_json::json!(self.qkv_bias);
            json["mlp_bias"] = serde_json::json!(self.mlp_bias);
        }
        json
    }
}

fn architecture_of(hf: &HfArchitecture) -> Result<Architecture> {
    let names: Vec<&str> = hf.architectures.iter().map(String::as_str).collect();
    let model_type = hf.model_type.as_deref().unwrap_or("");
    let is = |arch: &str, ty: &str| names.contains(&arch) || model_type == ty;
    if is("LlamaForCausalLM", "llama") || is("MistralForCausalLM", "mistral") {
        Ok(Architecture::Llama)
    } else if is("Qwen2ForCausalLM", "qwen2") {
        Ok(Architecture::Qwen2)
    } else {
        bail!(
            "architecture {:?} (model_type '{model_type}') is not supported: wake2vec runs \
             LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM models; pass one of those \
             (e.g. --model smollm2-135m)",
            names
        )
    }
}

/// Reads `rope_theta` and the scaling rule from either the transformers 4 keys
/// (`rope_theta`, `rope_scaling`) or the transformers 5 `rope_parameters` object.
fn rope_of(hf: &HfConfig) -> Result<(f64, RopeScaling)> {
    let params = hf.rope_parameters.as_ref().filter(|v| v.is_object());
    let theta = hf
        .rope_theta
        .or_else(|| {
            params
                .and_then(|p| p.get("rope_theta"))
                .and_then(|v| v.as_f64())
        })
        .unwrap_or(10_000.0);
    let scaling = hf
        .rope_scaling
        .as_ref()
        .filter(|v| v.is_object())
        .or(params);
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        s.get(key)
            .and_then(|v| v.as_f64())
            .with_context(|| format!("rope scaling '{kind}' needs a numeric '{key}'"))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: s
                .get("original_max_position_embeddings")
                .and_then(|v| v.as_u64())
                .and_then(|v| usize::try_from(v).ok())
                .with_context(|| {
                    format!("rope scaling '{kind}' needs a whole 'original_max_position_embeddings'")
                })?,
        },
        other => bail!("rope scaling type '{other}' is not supported: wake2vec implements default, linear and llama3"),
    };
    Ok((theta, scaling))
}

/// `hidden_size / num_attention_heads`, the head width when config.json does not give one.
pub fn implied_head_dim(hidden_size: usize, num_heads: usize) -> Result<usize> {
    ensure!(
        num_heads > 0 && hidden_size.is_multiple_of(num_heads),
        "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}, and no \
         head_dim is given: fix the head count, or give head_dim"
    );
    Ok(hidden_size / num_heads)
}

/// A number as people write it: `1e-45` rather than forty-five zeros.
fn shown(x: f64) -> String {
    if x != 0.0 && x.is_finite() && !(1e-4..1e16).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

/// `12 × 34` for a shape.
fn dims_of(dims: &[usize]) -> String {
    let parts: Vec<String> = dims.iter().map(usize::to_string).collect();
    parts.join("×")
}

/// The token ids of a `bos_token_id` / `eos_token_id` value: one id, a list, or null.
fn ids_of(v: &serde_json::Value) -> Result<Vec<u32>> {
    let id = |x: &serde_json::Value| {
        x.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .with_context(|| format!("token id {x} is not an id from 0 to 2^32 - 1"))
    };
    match v {
        serde_json::Value::Null => Ok(vec![]),
        serde_json::Value::Array(a) => a.iter().map(id).collect(),
        other => Ok(vec![id(other)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":49152,"hidden_size":576,
        "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
        "rms_norm_eps":1e-5,"rope_theta":100000.0,"max_position_embeddings":8192,"tie_word_embeddings":true,
        "bos_token_id":1,"eos_token_id":2}"#;

    #[test]
    fn reads_a_llama_config() {
        let c = ModelConfig::from_json(SMOL).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.head_dim, c.num_kv_heads), (64, 3));
        assert!(c.tie_word_embeddings && !c.qkv_bias);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(
            ModelConfig::from_json(&c.to_hf_json().to_string()).unwrap(),
            c
        );
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let text = SMOL.replace(
            r#""rope_theta":100000.0"#,
            r#""rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
               "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        );
        let c = ModelConfig::from_json(&text).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn refuses_other_architectures() {
        let text = SMOL.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let err = format!("{:#}", ModelConfig::from_json(&text).unwrap_err());
        assert!(
            err.contains("GPT2LMHeadModel") && err.contains("not supported"),
            "{err}"
        );
    }

    #[test]
    fn names_the_architecture_of_a_config_without_llama_keys() {
        let gpt2 = r#"{"architectures":["GPT2LMHeadModel"],"model_type":"gpt2","n_embd":768,
            "n_head":12,"n_layer":12,"n_positions":1024,"vocab_size":50257}"#;
        let err = format!("{:#}", ModelConfig::from_json(gpt2).unwrap_err());
        assert!(
            err.contains("GPT2LMHeadModel") && err.contains("not supported"),
            "{err}"
        );
    }

    #[test]
    fn qwen2_has_qkv_bias() {
        let text = SMOL.replace("LlamaForCausalLM", "Qwen2ForCausalLM");
        let c = ModelConfig::from_json(&text).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
    }

    fn error_of(from: &str, to: &str) -> String {
        let text = SMOL.replace(from, to);
        assert_ne!(text, SMOL, "{from} not in the config");
        format!("{:#}", ModelConfig::from_json(&text).unwrap_err())
    }

    #[test]
    fn refuses_sizes_and_numbers_no_model_has() {
        for (from, to, says) in [
            (
                r#""vocab_size":49152"#,
                r#""vocab_size":0"#,
                "vocab_size is 0",
            ),
            (
                r#""num_hidden_layers":30"#,
                r#""num_hidden_layers":0"#,
                "num_hidden_layers is 0",
            ),
            (
                r#""num_key_value_heads":3"#,
                r#""num_key_value_heads":0"#,
                "num_key_value_heads is 0",
            ),
            (
                r#""num_key_value_heads":3"#,
                r#""num_key_value_heads":2"#,
                "a multiple of",
            ),
            (
                r#""num_attention_heads":9"#,
                r#""num_attention_heads":7"#,
                "not a multiple of num_attention_heads 7",
            ),
            (
                r#""rms_norm_eps":1e-5"#,
                r#""rms_norm_eps":-1e-5"#,
                "rms_norm_eps = -1e-5 must be",
            ),
            (
                r#""rope_theta":100000.0"#,
                r#""rope_theta":0"#,
                "rope_theta = 0 must be a finite number >= 1",
            ),
            (
                r#""eos_token_id":2"#,
                r#""eos_token_id":49152"#,
                "eos_token_id 49152 is outside",
            ),
            (
                r#""eos_token_id":2"#,
                r#""eos_token_id":4294967296"#,
                "not an id from 0",
            ),
            (
                r#""num_hidden_layers":30"#,
                r#""num_hidden_layers":1000000000000"#,
                "more than this machine's",
            ),
            (
                r#""max_position_embeddings":8192"#,
                r#""max_position_embeddings":100000000000"#,
                "more than this machine's",
            ),
            (
                r#""rope_theta":100000.0"#,
                r#""rope_theta":1e4,"rope_scaling":{"rope_type":"llama3","factor":0,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":8192}"#,
                "factor = 0 must be a finite number >= 1",
            ),
            (
                r#""rope_theta":100000.0"#,
                r#""rope_theta":1e4,"rope_scaling":{"rope_type":"llama3","factor":8,"low_freq_factor":4,"high_freq_factor":4,"original_max_position_embeddings":8192}"#,
                "must exceed",
            ),
        ] {
            let err = error_of(from, to);
            assert!(err.contains(says), "{to}: {err}");
        }
    }

    #[test]
    fn names_the_tensor_whose_shape_differs() {
        let c = ModelConfig::from_json(SMOL).unwrap();
        let shape = |name: &str| -> Option<Vec<usize>> {
            Some(match name {
                "model.embed_tokens.weight" => vec![49152, 576],
                n if n.ends_with("layers.3.self_attn.k_proj.weight") => vec![64, 576],
                n if n.ends_with("norm.weight") || n.ends_with("layernorm.weight") => vec![576],
                n if n.contains("k_proj") || n.contains("v_proj") => vec![192, 576],
                n if n.contains("q_proj") => vec![576, 576],
                n if n.contains("o_proj") => vec![576, 576],
                n if n.contains("down_proj") => vec![576, 1536],
                _ => vec![1536, 576],
            })
        };
        let err = c.check_weights(shape).unwrap_err().to_string();
        assert!(
            err.starts_with("model.layers.3.self_attn.k_proj.weight is 64×576, but the configuration implies 192×576"),
            "{err}"
        );
    }
}
