//! GGUF files written from the tiny HF fixtures the way llama.cpp's `convert_hf_to_gguf.py`
//! lays them out: tensor names, llama q/k row permutation, `{arch}.*` hyperparameters,
//! `tokenizer.ggml.*` vocabulary.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
use wake2vec::hub::config::{Architecture, ModelConfig};
use wake2vec::hub::weights;

/// A JSON file's value.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// llama.cpp's `LlamaModel.permute`: rows `(head, 2, dim/2)` reordered to `(head, dim/2, 2)`,
/// so that its interleaved RoPE pairs the same components as HF's half-split one.
pub fn permute(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    t.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// The llama.cpp name of an HF tensor name.
pub fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, tail) = rest.split_once('.').unwrap();
    let (part, kind) = tail.rsplit_once('.').unwrap();
    let part = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no llama.cpp name for {other}"),
    };
    format!("blk.{layer}.{part}.{kind}")
}

/// The HF weights as llama.cpp stores them: llama.cpp names, llama q/k rows permuted (q with
/// the query heads, k with the kv heads).
pub fn gguf_layout(c: &ModelConfig, hf: &weights::Weights) -> BTreeMap<String, Tensor> {
    hf.iter()
        .map(|(name, t)| {
            let gguf = gguf_name(name);
            let t = match (c.architecture, name.rsplit('.').nth(1)) {
                (Architecture::Llama, Some("q_proj")) if name.ends_with(".weight") => {
                    permute(t, c.num_heads)
                }
                (Architecture::Llama, Some("k_proj")) if name.ends_with(".weight") => {
                    permute(t, c.num_kv_heads)
                }
                _ => t.clone(),
            };
            (gguf, t)
        })
        .collect()
}

/// `tokenizer.ggml.*` for a byte-level BPE tokenizer.json, as llama.cpp's converter writes it
/// (`gpt2` model, tokens in id order padded to `vocab_size` with `[PADn]`, merges as
/// `"a b"`, token types, special ids).
pub fn tokenizer_metadata(dir: &Path, c: &ModelConfig) -> Vec<(String, Value)> {
    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    const UNUSED: i32 = 5;
    let tok = read_json(&dir.join("tokenizer.json"));
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut by_id: Vec<Option<&str>> = vec![None; c.vocab_size];
    for (token, id) in vocab {
        by_id[id.as_u64().unwrap() as usize] = Some(token);
    }
    let special: Vec<&str> = tok["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["special"].as_bool().unwrap())
        .map(|t| t["content"].as_str().unwrap())
        .collect();
    let (tokens, types): (Vec<Value>, Vec<Value>) = by_id
        .iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some(t) if special.contains(t) => (Value::String(t.to_string()), Value::I32(CONTROL)),
            Some(t) => (Value::String(t.to_string()), Value::I32(NORMAL)),
            None => (Value::String(format!("[PAD{i}]")), Value::I32(UNUSED)),
        })
        .unzip();
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let pair = m.as_array().unwrap();
            Value::String(format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ))
        })
        .collect();
    let add_bos = read_json(&dir.join("tokenizer_config.json"))["add_bos_token"]
        .as_bool()
        .unwrap();
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(c.bos_token_id.unwrap()),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(c.eos_token_ids[0]),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)),
    ]
}

/// Writes the HF directory `hf` as a GGUF file: matrices in `matrix_type`, vectors (norms,
/// biases) in F32 as llama.cpp keeps them.
pub fn write_gguf(hf: &Path, matrix_type: GgmlDType, path: &Path) {
    let c = ModelConfig::from_dir(hf).unwrap();
    let arch = match c.architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
    let tensors: Vec<(String, QTensor)> =
        gguf_layout(&c, &weights::load_dir(hf, &Device::Cpu).unwrap())
            .into_iter()
            .map(|(name, t)| {
                let dtype = if t.rank() == 2 {
                    matrix_type
                } else {
                    GgmlDType::F32
                };
                (name, QTensor::quantize(&t, dtype).unwrap())
            })
            .collect();
    let key = |k: &str| format!("{arch}.{k}");
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.name".into(), Value::String("tiny".into())),
        (
            key("context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (key("embedding_length"), Value::U32(c.hidden_size as u32)),
        (key("block_count"), Value::U32(c.num_layers as u32)),
        (
            key("feed_forward_length"),
            Value::U32(c.intermediate_size as u32),
        ),
        (key("attention.head_count"), Value::U32(c.num_heads as u32)),
        (
            key("attention.head_count_kv"),
            Value::U32(c.num_kv_heads as u32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (key("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (key("rope.dimension_count"), Value::U32(c.head_dim as u32)),
        (key("vocab_size"), Value::U32(c.vocab_size as u32)),
    ];
    if c.architecture == Architecture::Llama {
        // Written by the converter when config.json has head_dim; qwen2 exercises the default.
        metadata.push((key("attention.key_length"), Value::U32(c.head_dim as u32)));
    }
    metadata.extend(tokenizer_metadata(hf, &c));
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}
