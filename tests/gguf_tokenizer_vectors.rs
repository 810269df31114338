//! Tokenizers rebuilt from GGUF metadata against llama.cpp's tokenizer test vectors.
//!
//! Each `ggml-vocab-NAME.gguf.inp` holds texts, each followed by `\n__ggml_vocab_test__\n`;
//! line i of the `.out` file holds the ids HF's tokenizer gives text i with
//! `add_special_tokens=False`, so without BOS.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file::Content;
use tokenizers::Tokenizer;
use wake2vec::hub::gguf::tokenizer::{from_gguf, GgufTokenizer, TokenizerKind};

const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

fn vocab_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tokenizers")
}

fn load(path: &Path) -> GgufTokenizer {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = Content::read(&mut file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    from_gguf(&content, path).unwrap_or_else(|e| panic!("{e}"))
}

/// The `(text, ids)` cases of one vocabulary.
fn cases(gguf: &Path) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| {
        let path = gguf.with_extension(format!("gguf.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let inp = read("inp");
    let texts: Vec<&str> = inp
        .strip_suffix(SEPARATOR)
        .expect(".inp ends with the separator")
        .split(SEPARATOR)
        .collect();
    let out = read("out");
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(|id| id.parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "{}: texts vs id lines",
        gguf.display()
    );
    texts.into_iter().map(String::from).zip(ids).collect()
}

fn encode(tokenizer: &Tokenizer, text: &str, add_special_tokens: bool) -> Vec<u32> {
    tokenizer
        .encode(text, add_special_tokens)
        .unwrap_or_else(|e| panic!("encoding {text:?}: {e}"))
        .get_ids()
        .to_vec()
}

fn check_vocab(name: &str, kind: TokenizerKind, add_bos: bool) {
    let path = vocab_dir().join(format!("ggml-vocab-{name}.gguf"));
    let gguf = load(&path);
    assert_eq!(gguf.kind, kind, "{name}");
    assert_eq!(gguf.add_bos, add_bos, "{name}");
    let cases = cases(&path);
    let reloaded = Tokenizer::from_str(&gguf.tokenizer.to_string(false).unwrap()).unwrap();

    let mut failures = Vec::new();
    for (text, expected) in &cases {
        let ids = encode(&gguf.tokenizer, text, false);
        if &ids != expected {
            failures.push(format!("{text:?}: got {ids:?}, want {expected:?}"));
        }
        assert_eq!(
            encode(&reloaded, text, false),
            ids,
            "{name}: JSON round trip, {text:?}"
        );
        let with_special = encode(&gguf.tokenizer, text, true);
        match gguf.bos_token_id.filter(|_| add_bos) {
            Some(bos) => assert_eq!(with_special, [&[bos][..], &ids].concat(), "{name}: BOS"),
            None => assert_eq!(with_special, ids, "{name}: no BOS"),
        }
    }
    eprintln!(
        "{name}: {} of {} texts match",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

#[test]
fn llama_spm_vectors() {
    check_vocab("llama-spm", TokenizerKind::SentencePieceBpe, true);
}

#[test]
fn phi_3_vectors() {
    check_vocab("phi-3", TokenizerKind::SentencePieceBpe, true);
}

#[test]
fn gpt_2_vectors() {
    check_vocab("gpt-2", TokenizerKind::ByteLevelBpe, false);
}

#[test]
fn starcoder_vectors() {
    check_vocab("starcoder", TokenizerKind::ByteLevelBpe, false);
}

/// The whole of Finnegans Wake through SmolLM2's tokenizer, when `$WAKE2VEC_SMOLLM2_GGUF`
/// names the model's GGUF.
#[test]
fn smollm2_wake() {
    let Some(path) = std::env::var_os("WAKE2VEC_SMOLLM2_GGUF").map(PathBuf::from) else {
        eprintln!("skipped: set WAKE2VEC_SMOLLM2_GGUF to SmolLM2-135M-Instruct's GGUF to run it");
        return;
    };
    if !path.exists() {
        eprintln!("skipped: {} does not exist", path.display());
        return;
    }
    let gguf = load(&path);
    assert_eq!(gguf.kind, TokenizerKind::ByteLevelBpe);
    assert!(!gguf.add_bos);
    let wake_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/finnegans_wake.txt");
    let wake = std::fs::read_to_string(&wake_path).unwrap();
    let ids = encode(&gguf.tokenizer, &wake, false);
    assert_eq!(ids.len(), 367_346);
    assert_eq!(gguf.tokenizer.decode(&ids, false).unwrap(), wake);
}
