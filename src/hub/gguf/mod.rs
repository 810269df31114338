//! GGUF import: dequantized weights and a rebuilt tokenizer, written as a standard HF directory
//! (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json).

mod header;
pub mod tokenizer;

use crate::hub::config::{Architecture, ModelConfig, RopeScaling};
use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

/// What an import wrote.
#[derive(Debug)]
pub struct ImportSummary {
    /// The model configuration, `None` for a vocabulary-only GGUF.
    pub config: Option<ModelConfig>,
    pub tensors: usize,
    pub vocab_size: usize,
}

/// Opens a GGUF file and reads its header (metadata and tensor table).
/// Sizes in the header are checked before anything is allocated from them: the alignment
/// (candle divides by it), every tensor's element count and extent against the file, and the
/// memory their f32 copies would take.
pub fn read_content(path: &Path) -> Result<(Content, BufReader<std::fs::File>)> {
    crate::util::fs::check_regular(path)?;
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
    let file_size = file.metadata()?.len();
    let mut reader = BufReader::new(file);
    // candle reads the alignment from these integer types only, 32 otherwise.
    let alignment = header::alignment(&mut reader);
    if let Some(a) = alignment {
        ensure!(
            a.is_power_of_two(),
            "cannot read {}: its general.alignment is {a}, not a power of two: the file is \
             corrupt; re-download or re-convert it",
            path.display()
        );
    }
    reader.rewind()?;
    let content = Content::read(&mut reader).map_err(|e| {
        let message = e.to_string();
        // candle says "unknown dtype for tensor N", N being the ggml type id, not a tensor index.
        let unknown = message
            .strip_prefix("unknown dtype for tensor ")
            .and_then(|rest| rest.split_whitespace().next());
        match unknown {
            Some(id) => anyhow::anyhow!(
                "cannot read {}: it holds tensors of ggml type {id} ({}), which wake2vec cannot \
                 dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K–Q8_K); \
                 re-quantize it to one of those (llama-quantize) or use the model's HF directory",
                path.display(),
                ggml_type_name(id)
            ),
            None => anyhow::anyhow!(
                "cannot read {}: {message}: it is not a valid GGUF file (truncated or corrupt?); \
                 re-download or re-convert it",
                path.display()
            ),
        }
    })?;
    check_tensor_extents(&content, file_size, alignment.unwrap_or(32), path)?;
    Ok((content, reader))
}

/// Refuses tensors whose element count overflows, whose data lies outside the file or is not
/// packed as GGUF writers pack it (llama.cpp's reader demands the same: the first at offset 0,
/// each next one at the end of the one before, rounded up to the alignment; a changed type,
/// shape or offset breaks that, where it would otherwise read other bytes as weights), or whose
/// f32 copies together exceed the memory bound.
fn check_tensor_extents(
    content: &Content,
    file_size: u64,
    alignment: u64,
    path: &Path,
) -> Result<()> {
    let corrupt = "the file is truncated or corrupt; re-download or re-convert it";
    let mut f32_bytes = 0u128;
    let mut extents = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let elems = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .filter(|&n| n.is_multiple_of(info.ggml_dtype.block_size() as u64));
        let bytes = elems.and_then(|n| {
            (n / info.ggml_dtype.block_size() as u64)
                .checked_mul(info.ggml_dtype.type_size() as u64)
        });
        let end = bytes.and_then(|b| {
            content
                .tensor_data_offset
                .checked_add(info.offset)?
                .checked_add(b)
        });
        ensure!(
            end.is_some_and(|end| end <= file_size),
            "cannot read {}: tensor '{name}' of shape {dims:?} ({:?}) at offset {} does not fit \
             in the file's {file_size} bytes: {corrupt}",
            path.display(),
            info.ggml_dtype,
            info.offset
        );
        f32_bytes += u128::from(elems.unwrap_or(0)) * 4;
        extents.push((info.offset, bytes.unwrap_or(0), name));
    }
    extents.sort();
    let mut expected = 0u64;
    for (offset, bytes, name) in extents {
        ensure!(
            offset == expected,
            "cannot read {}: tensor '{name}' starts at offset {offset}, but the tensors before it \
             end at {expected}: its offset, type or shape, or another's, is damaged; {corrupt}",
            path.display()
        );
        expected = (offset + bytes).next_multiple_of(alignment);
    }
    crate::util::mem::check_fits(
        f32_bytes,
        &format!("importing {} (its tensors in f32)", path.display()),
        "use a smaller model or a machine with more memory",
    )
}

/// llama.cpp's name of a ggml tensor type id that candle cannot read (`ggml_type` in ggml.h).
fn ggml_type_name(id: &str) -> &'static str {
    match id {
        "4" | "5" => "Q4_2/Q4_3, removed from llama.cpp",
        "16" => "IQ2_XXS",
        "17" => "IQ2_XS",
        "18" => "IQ3_XXS",
        "19" => "IQ1_S",
        "20" => "IQ4_NL",
        "21" => "IQ3_S",
        "22" => "IQ2_S",
        "23" => "IQ4_XS",
        "24" => "I8",
        "25" => "I16",
        "26" => "I32",
        "27" => "I64",
        "28" => "F64",
        "29" => "IQ1_M",
        "34" => "TQ1_0",
        "35" => "TQ2_0",
        "39" => "MXFP4",
        "40" => "NVFP4",
        "41" => "Q1_0",
        _ => "unknown to wake2vec",
    }
}

/// Imports `gguf` into a new HF directory `out`, written under a temporary name and renamed,
/// so an interrupted import never leaves a directory that looks complete.
pub fn import(gguf: &Path, out: &Path) -> Result<ImportSummary> {
    crate::util::fs::check_new_dir(out)?;
    let (content, mut reader) = read_content(gguf)?;
    let tok = tokenizer::from_gguf(&content, gguf)?;
    crate::util::fs::create_dir_atomically(out, |tmp| {
        let vocab_size = tok.tokenizer.get_vocab_size(true);
        write_tokenizer(&tok, tmp)?;
        if content.tensor_infos.is_empty() {
            return Ok(ImportSummary {
                config: None,
                tensors: 0,
                vocab_size,
            });
        }
        let config = config_of(&content, &tok, gguf)?;
        let shapes: BTreeMap<String, Vec<usize>> = content
            .tensor_infos
            .iter()
            .filter_map(|(name, info)| Some((hf_name(name)?, info.shape.dims().to_vec())))
            .collect();
        config
            .check_weights(|name| shapes.get(name).cloned())
            .with_context(|| {
                format!("{}: its tensors do not match its metadata", gguf.display())
            })?;
        let weights = hf_weights(&content, &mut reader, &config, gguf)?;
        let tensors = weights.len();
        crate::hub::weights::save_file(&weights, &tmp.join("model.safetensors"))?;
        write_json(&tmp.join("config.json"), &config.to_hf_json())?;
        let generation = serde_json::json!({
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_ids.first(),
        });
        write_json(&tmp.join("generation_config.json"), &generation)?;
        Ok(ImportSummary {
            config: Some(config),
            tensors,
            vocab_size,
        })
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    crate::util::fs::write(path, serde_json::to_string_pretty(value)?.as_bytes())
}

fn write_tokenizer(tok: &tokenizer::GgufTokenizer, dir: &Path) -> Result<()> {
    let json = tok
        .tokenizer
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("cannot serialize the tokenizer: {e}"))?;
    crate::util::fs::write(&dir.join("tokenizer.json"), json.as_bytes())?;
    let name = |id: Option<u32>| id.and_then(|i| tok.tokenizer.id_to_token(i));
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tok.bos_token_id),
        "eos_token": name(tok.eos_token_id),
        "add_bos_token": tok.add_bos,
        "clean_up_tokenization_spaces": false,
    });
    write_json(&dir.join("tokenizer_config.json"), &config)
}

/// Builds the model configuration from `{arch}.*` metadata.
fn config_of(
    content: &Content,
    tok: &tokenizer::GgufTokenizer,
    path: &Path,
) -> Result<ModelConfig> {
    let md = &content.metadata;
    let get = |key: &str| md.get(key);
    let arch = get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let architecture = match arch.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => bail!(
            "{}: architecture '{other}' is not supported: wake2vec imports llama-family (llama) and qwen2 GGUFs",
            path.display()
        ),
    };
    let num = |key: &str| -> Result<u64> {
        let full = format!("{arch}.{key}");
        let v = get(&full)
            .with_context(|| format!("{}: metadata '{full}' is missing", path.display()))?;
        value_u64(v).with_context(|| {
            format!(
                "{}: metadata '{full}' is not a non-negative whole number ({v:?})",
                path.display()
            )
        })
    };
    // GGUF stores these as f32; go through the shortest decimal that round-trips, so that
    // 1e-5 becomes 1e-5 in config.json rather than 9.99999974737875e-6.
    let float = |key: &str| {
        get(&format!("{arch}.{key}"))
            .and_then(|v| v.to_f32().ok())
            .map(|x| x.to_string().parse::<f64>().unwrap_or(f64::from(x)))
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        bail!(
            "{}: per-dimension RoPE factors (rope_freqs.weight, Llama 3.1 style) are not imported yet: \
             use the model's HF directory instead",
            path.display()
        );
    }
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .context("the GGUF has no token_embd.weight")?;
    let (vocab_size, hidden_size) = embd.shape.dims2()?;
    let num_heads = num("attention.head_count")? as usize;
    let head_dim = match num("attention.key_length") {
        Ok(d) => d as usize,
        Err(_) => crate::hub::config::implied_head_dim(hidden_size, num_heads)
            .with_context(|| format!("{}: {arch}.attention.head_count", path.display()))?,
    };
    let rope_scaling = match get(&format!("{arch}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
    {
        Some(t) if t == "linear" => RopeScaling::Linear {
            factor: float("rope.scaling.factor").unwrap_or(1.0),
        },
        Some(t) if t != "none" => bail!("{}: RoPE scaling '{t}' is not supported", path.display()),
        _ => RopeScaling::Default,
    };
    let eos = tok.eos_token_id.into_iter().collect();
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: num("feed_forward_length")? as usize,
        num_layers: num("block_count")? as usize,
        num_heads,
        num_kv_heads: num("attention.head_count_kv")
            .map(|v| v as usize)
            .unwrap_or(num_heads),
        head_dim,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: num("context_length")? as usize,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: content.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        bos_token_id: tok.bos_token_id,
        eos_token_ids: eos,
    };
    config
        .validate()
        .with_context(|| format!("{}: its metadata describes no usable model", path.display()))?;
    Ok(config)
}

/// A whole number of any GGUF integer type; `None` for a negative one or another type.
fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// Dequantizes every tensor to f32 under its HF name, un-permuting llama's q/k projections.
fn hf_weights<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    c: &ModelConfig,
    path: &Path,
) -> Result<BTreeMap<String, Tensor>> {
    let device = Device::Cpu;
    let mut out = BTreeMap::new();
    for name in content.tensor_infos.keys() {
        let hf = hf_name(name).with_context(|| {
            format!(
                "{}: tensor '{name}' has no HF counterpart wake2vec knows",
                path.display()
            )
        })?;
        let t = content
            .tensor(reader, name, &device)
            .and_then(|q| q.dequantize(&device))
            .with_context(|| format!("{}: cannot dequantize tensor '{name}'", path.display()))?;
        // llama.cpp's converter permutes llama q/k rows for interleaved RoPE; undo it so one
        // (half-split, HF) RoPE serves every source. Qwen2 is stored unpermuted.
        let t = match (c.architecture, name.rsplit('.').nth(1)) {
            (Architecture::Llama, Some("attn_q")) => unpermute(&t, c.num_heads)?,
            (Architecture::Llama, Some("attn_k")) => unpermute(&t, c.num_kv_heads)?,
            _ => t,
        };
        out.insert(hf, t);
    }
    Ok(out)
}

/// Inverse of llama.cpp's `permute`: rows grouped `(head, dim/2, 2)` back to `(head, 2, dim/2)`.
fn unpermute(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The HF tensor name of a llama.cpp tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (part, kind) = tail.rsplit_once('.')?;
    let hf_part = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_part}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_llama_cpp_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").unwrap(),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight").unwrap(),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.0.attn_q_norm.weight").is_none());
    }

    /// llama.cpp's permute, written as in its converter, to check `unpermute` inverts it.
    fn permute(t: &Tensor, heads: usize) -> Tensor {
        let (rows, cols) = t.dims2().unwrap();
        t.reshape((heads, 2, rows / heads / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let t = Tensor::arange(0f32, 8.0 * 3.0 * 5.0, &Device::Cpu)
            .unwrap()
            .reshape((24, 5))
            .unwrap();
        let back = unpermute(&permute(&t, 3), 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }
}
