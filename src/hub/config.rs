//! Model configuration, read from an HF `config.json` (Llama family and Qwen2).

use anyhow::{bail, Context, Result};
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
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: a model directory needs config.json, *.safetensors and tokenizer.json",
                path.display()
            )
        })?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses the text of an HF `config.json`.
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
        if hf.num_attention_heads == 0
            || num_kv_heads == 0
            || !hf.num_attention_heads.is_multiple_of(num_kv_heads)
        {
            bail!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({num_kv_heads})",
                hf.num_attention_heads
            );
        }
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            bail!("head_dim {head_dim} must be even for rotary embeddings");
        }
        let (rope_theta, rope_scaling) = rope_of(&hf)?;
        Ok(Self {
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
            bos_token_id: hf.bos_token_id.as_ref().and_then(first_id),
            eos_token_ids: hf.eos_token_id.as_ref().map(all_ids).unwrap_or_default(),
        })
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
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        },
        other => bail!("rope scaling type '{other}' is not supported: wake2vec implements default, linear and llama3"),
    };
    Ok((theta, scaling))
}

fn first_id(v: &serde_json::Value) -> Option<u32> {
    all_ids(v).first().copied()
}

fn all_ids(v: &serde_json::Value) -> Vec<u32> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
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
}
