//! The GGUF importer end to end, without network: GGUF files are written here from the tiny
//! fixtures the way llama.cpp's `convert_hf_to_gguf.py` lays them out (tensor names, llama q/k
//! row permutation, `{arch}.*` hyperparameters, `tokenizer.ggml.*` vocabulary), imported with
//! `wake2vec::hub::gguf::import`, and the imported directory is compared with the HF original.
//!
//! Two models, because each covers what the other cannot:
//! - llama, from tiny-llama's weights: untied head (`output.weight`), GQA (4 query heads, 2 kv
//!   heads), so q and k are permuted with different head counts and the importer must undo each.
//!   tiny-llama uses llama3 RoPE scaling, which llama.cpp stores as a `rope_freqs` tensor the
//!   importer refuses; the reference is therefore a copy of tiny-llama with plain RoPE, the
//!   same weights otherwise. Written once in F32 (exact) and once in Q8_0.
//! - qwen2, from tiny-qwen2: tied head (no `output.weight`), q/k/v biases, no permutation
//!   (llama.cpp stores qwen2 q/k as HF does), an embedding padded past the tokenizer (408 rows,
//!   400 tokens; the converter pads the vocabulary with `[PADn]`). Matrices in F16, which is
//!   lossless for these f16 weights.

mod common;
use common::gguf::{permute, read_json, write_gguf};
use common::{fixture, Scratch};
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use wake2vec::hub::config::ModelConfig;
use wake2vec::hub::weights;
use wake2vec::infer::score;
use wake2vec::model::{Llama, LoadedModel};

/// The golden prompt of the fixtures and its token ids (both fixtures share one tokenizer).
fn golden(model: &str) -> (String, Vec<u32>) {
    let g = read_json(&fixture(model).join("golden.json"));
    let ids = g["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    (g["prompt"].as_str().unwrap().to_string(), ids)
}

/// tiny-llama with plain RoPE: its shards, index and tokenizer, and its config.json without
/// `rope_scaling`, written into `dir`.
fn plain_rope_llama(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let mut config = read_json(&dir.join("config.json"));
    config.as_object_mut().unwrap().remove("rope_scaling");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let c = ModelConfig::from_dir(dir).unwrap();
    assert_eq!(c.rope_scaling, wake2vec::hub::config::RopeScaling::Default);
}

/// Per-token log-probs of `ids` under `model`.
fn logprobs(model: &Llama, ids: &[u32]) -> Vec<f32> {
    score::logprobs(model, ids).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Imports `gguf` into `out` and checks what every import of a fixture must satisfy: the
/// config equals the original's, the HF files are there, and the tokenizer encodes like the
/// original's tokenizer.json. Returns the loaded import.
fn import_and_check(gguf: &Path, out: &Path, original: &Path) -> LoadedModel {
    let summary = wake2vec::hub::gguf::import(gguf, out).unwrap();
    let expected = ModelConfig::from_dir(original).unwrap();
    let written = ModelConfig::from_dir(out).unwrap();
    assert_eq!(written, expected, "config.json of the import");
    assert_eq!(summary.config.as_ref(), Some(&expected));
    assert_eq!(
        summary.tensors,
        weights::load_dir(original, &Device::Cpu).unwrap().len()
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let generation = read_json(&out.join("generation_config.json"));
    assert_eq!(
        generation["eos_token_id"],
        serde_json::json!(expected.eos_token_ids[0])
    );

    let imported = LoadedModel::load(out).unwrap();
    let reference = tokenizers::Tokenizer::from_file(original.join("tokenizer.json")).unwrap();
    let (prompt, golden_ids) = golden("tiny-llama");
    let encode =
        |t: &tokenizers::Tokenizer, text: &str| t.encode(text, true).unwrap().get_ids().to_vec();
    assert_eq!(encode(&imported.tokenizer, &prompt), golden_ids);
    for text in [
        prompt.as_str(),
        "<|endoftext|>Howth Castle and Environs<|endoftext|>",
        "  two spaces, digits 1132 and Ève — 河 ",
    ] {
        let ids = encode(&imported.tokenizer, text);
        assert_eq!(ids, encode(&reference, text), "{text:?}");
        assert_eq!(
            imported.tokenizer.decode(&ids, false).unwrap(),
            reference.decode(&ids, false).unwrap()
        );
    }
    imported
}

#[test]
fn llama_f32_imports_exactly() {
    let tmp = Scratch::new("llama-f32");
    let original = tmp.path("hf");
    plain_rope_llama(&original);
    let gguf = tmp.path("tiny-llama.F32.gguf");
    write_gguf(&original, GgmlDType::F32, &gguf);
    let imported = import_and_check(&gguf, &tmp.path("imported"), &original);

    let (_, ids) = golden("tiny-llama");
    let want = logprobs(&Llama::load(&original, &Device::Cpu).unwrap(), &ids);
    let got = logprobs(&imported.model, &ids);
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-5, "max |Δ logprob| = {diff}");
}

#[test]
fn llama_q8_0_imports_the_quantized_weights() {
    let tmp = Scratch::new("llama-q8");
    let original = tmp.path("hf");
    plain_rope_llama(&original);
    let gguf = tmp.path("tiny-llama.Q8_0.gguf");
    write_gguf(&original, GgmlDType::Q8_0, &gguf);
    let imported = import_and_check(&gguf, &tmp.path("imported"), &original);
    let (_, ids) = golden("tiny-llama");
    let got = logprobs(&imported.model, &ids);

    // Exact against what the file holds: every matrix quantized and dequantized in memory, in
    // HF layout. Q8_0 blocks run along a row and the permutation only moves whole rows, so
    // this equals un-permuting the dequantized file; any slip in the importer shows here.
    let c = ModelConfig::from_dir(&original).unwrap();
    let hf = weights::load_dir(&original, &Device::Cpu).unwrap();
    let rounded: HashMap<String, Tensor> = hf
        .iter()
        .map(|(name, t)| {
            let t = if t.rank() == 2 {
                QTensor::quantize(t, GgmlDType::Q8_0)
                    .unwrap()
                    .dequantize(&Device::Cpu)
                    .unwrap()
            } else {
                t.clone()
            };
            (name.clone(), t)
        })
        .collect();
    let want = logprobs(
        &Llama::from_weights(c.clone(), rounded, &Device::Cpu).unwrap(),
        &ids,
    );
    let exact = max_abs_diff(&got, &want);
    assert!(exact <= 1e-5, "against the rounded weights: {exact}");

    // Against the unquantized original. Q8_0 stores each block of 32 weights as int8 times
    // amax/127, so every weight moves by up to amax/254 (~0.5% RMS noise on each matrix). On
    // this model, whose logits are deliberately far from uniform (log-probs down to -10.6),
    // that moves the 79 log-probs by 0.031 nats on average and 0.093 at most (measured). The
    // tolerance, 0.25, leaves 2.7x room over that for other machines' float rounding and is
    // still 10x below the damage of the bug it must catch: q/k left in llama.cpp's permuted
    // order moves them by 4.1 (the last assertion measures it, so the margin is checked).
    const Q8_0_TOLERANCE: f32 = 0.25;
    let full = logprobs(&Llama::load(&original, &Device::Cpu).unwrap(), &ids);
    let quantized = max_abs_diff(&got, &full);
    assert!(
        quantized > 0.0 && quantized <= Q8_0_TOLERANCE,
        "Q8_0 against the original: {quantized}"
    );
    let still_permuted: HashMap<String, Tensor> = hf
        .iter()
        .map(|(name, t)| {
            let t = if name.ends_with("q_proj.weight") {
                permute(t, c.num_heads)
            } else if name.ends_with("k_proj.weight") {
                permute(t, c.num_kv_heads)
            } else {
                t.clone()
            };
            (name.clone(), t)
        })
        .collect();
    let wrong = logprobs(
        &Llama::from_weights(c, still_permuted, &Device::Cpu).unwrap(),
        &ids,
    );
    let bug = max_abs_diff(&wrong, &full);
    assert!(
        bug >= 10.0 * Q8_0_TOLERANCE,
        "the tolerance must separate Q8_0 rounding ({quantized}) from a permutation bug ({bug})"
    );
}

#[test]
fn qwen2_f16_imports_exactly() {
    let tmp = Scratch::new("qwen2-f16");
    let original = fixture("tiny-qwen2");
    let gguf = tmp.path("tiny-qwen2.F16.gguf");
    write_gguf(&original, GgmlDType::F16, &gguf);
    // Through a symbolic link, as the Hugging Face hub cache hands files out: reading follows it.
    #[cfg(unix)]
    let gguf = {
        let link = tmp.path("linked.gguf");
        std::os::unix::fs::symlink(&gguf, &link).unwrap();
        link
    };
    let out = tmp.path("imported");
    let imported = import_and_check(&gguf, &out, &original);
    assert!(
        imported.model.lm_head.is_none(),
        "tied head imported untied"
    );
    // The converter pads the vocabulary to the embedding rows; the tokenizer keeps them.
    assert_eq!(imported.tokenizer.get_vocab_size(true), 408);

    let (_, ids) = golden("tiny-qwen2");
    let want = logprobs(&Llama::load(&original, &Device::Cpu).unwrap(), &ids);
    let got = logprobs(&imported.model, &ids);
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-5, "max |Δ logprob| = {diff}");
}

#[test]
fn refuses_a_non_empty_output_directory_and_leaves_it_alone() {
    let tmp = Scratch::new("non-empty");
    let gguf = tmp.path("tiny-qwen2.F32.gguf");
    write_gguf(&fixture("tiny-qwen2"), GgmlDType::F32, &gguf);
    let out = tmp.path("taken");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();

    let err = format!(
        "{:#}",
        wake2vec::hub::gguf::import(&gguf, &out).unwrap_err()
    );
    assert!(
        err.contains(out.to_str().unwrap()) && err.contains("not an empty directory"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["notes.txt"]);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "keep me"
    );
    let mut siblings: Vec<_> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    siblings.sort();
    assert_eq!(siblings, ["taken", "tiny-qwen2.F32.gguf"]);

    // An empty directory is fine: it is filled.
    let empty = tmp.path("empty");
    std::fs::create_dir(&empty).unwrap();
    wake2vec::hub::gguf::import(&gguf, &empty).unwrap();
    assert!(empty.join("config.json").is_file());
}

#[test]
fn vocabulary_only_gguf_imports_a_tokenizer_alone() {
    let vocab = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/tokenizers/ggml-vocab-gpt-2.gguf");
    let tmp = Scratch::new("vocab-only");
    let out = tmp.path("gpt-2");
    let summary = wake2vec::hub::gguf::import(&vocab, &out).unwrap();
    assert!(summary.config.is_none());
    assert_eq!(summary.tensors, 0);
    assert_eq!(summary.vocab_size, 50257);
    let mut files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["tokenizer.json", "tokenizer_config.json"]);

    // The written tokenizer.json encodes llama.cpp's test texts to their ids (no BOS).
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let separator = "\n__ggml_vocab_test__\n";
    let inp = std::fs::read_to_string(vocab.with_extension("gguf.inp")).unwrap();
    let out_ids = std::fs::read_to_string(vocab.with_extension("gguf.out")).unwrap();
    let texts: Vec<&str> = inp
        .strip_suffix(separator)
        .unwrap()
        .split(separator)
        .collect();
    let expected: Vec<&str> = out_ids.lines().collect();
    assert_eq!(texts.len(), expected.len());
    assert!(texts.len() > 10);
    for (text, line) in texts.iter().zip(expected) {
        let want: Vec<u32> = line
            .split_whitespace()
            .map(|id| id.parse().unwrap())
            .collect();
        let got = tokenizer.encode(*text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "{text:?}");
    }
}
