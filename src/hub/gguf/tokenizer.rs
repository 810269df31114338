//! Rebuild an HF `tokenizers` tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Two GGUF tokenizer types are read, each rebuilt the way HF's own converters build it, so
//! the result encodes like the model's original `tokenizer.json`:
//! - `gpt2`: byte-level BPE from the stored tokens and merges;
//! - `llama`: SentencePiece BPE with byte fallback, merges derived from the token scores.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};

/// SentencePiece's word-boundary marker, which stands for a space.
const SPIECE_SPACE: &str = "\u{2581}";

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Which GGUF tokenizer type a [`GgufTokenizer`] was rebuilt from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// `tokenizer.ggml.model = "gpt2"`: byte-level BPE (GPT-2, StarCoder, SmolLM...).
    ByteLevelBpe,
    /// `tokenizer.ggml.model = "llama"`: SentencePiece BPE with byte fallback (Llama 2, Phi-3...).
    SentencePieceBpe,
}

/// A tokenizer rebuilt from GGUF metadata, with the special-token facts llama.cpp reads.
pub struct GgufTokenizer {
    /// The rebuilt tokenizer; its post-processor prepends BOS when `add_bos` is set.
    pub tokenizer: Tokenizer,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`, else llama.cpp's default: true for `llama`, false for `gpt2`.
    pub add_bos: bool,
    pub kind: TokenizerKind,
}

/// Rebuild the tokenizer described by `content`'s metadata; `source` names the file in errors.
pub fn from_gguf(content: &Content, source: &Path) -> Result<GgufTokenizer> {
    let meta = Meta { content, source };
    let model = meta.string("tokenizer.ggml.model")?.ok_or_else(|| {
        anyhow!(
            "{} has no tokenizer.ggml.model: it carries no tokenizer; \
             pass a GGUF converted with its vocabulary, or a HF directory with tokenizer.json",
            source.display()
        )
    })?;
    let kind = match model {
        "gpt2" => TokenizerKind::ByteLevelBpe,
        "llama" => TokenizerKind::SentencePieceBpe,
        other => bail!(
            "tokenizer type '{other}' in {} is not supported: wake2vec reads 'gpt2' (byte-level BPE) \
             and 'llama' (SentencePiece BPE)",
            source.display()
        ),
    };

    let tokens = match meta.strings("tokenizer.ggml.tokens")? {
        Some(tokens) if !tokens.is_empty() => tokens,
        _ => bail!(
            "{} has no tokenizer.ggml.tokens: the vocabulary is missing; re-convert the model \
             with llama.cpp's convert_hf_to_gguf.py",
            source.display()
        ),
    };
    let types = match meta.ints("tokenizer.ggml.token_type")? {
        Some(types) if types.len() != tokens.len() => bail!(
            "{} has {} token types for {} tokens: the metadata is inconsistent; re-convert the model",
            source.display(),
            types.len(),
            tokens.len()
        ),
        Some(types) => types,
        None => vec![1; tokens.len()],
    };
    let token_id = |key: &str| -> Result<Option<u32>> {
        match meta.int(key)? {
            None => Ok(None),
            Some(id) if (0..tokens.len() as i64).contains(&id) => Ok(Some(id as u32)),
            Some(id) => bail!(
                "{key} = {id} in {} is outside the {}-token vocabulary: the metadata is corrupt; \
                 re-convert the model",
                source.display(),
                tokens.len()
            ),
        }
    };
    let bos_token_id = token_id("tokenizer.ggml.bos_token_id")?;
    let eos_token_id = token_id("tokenizer.ggml.eos_token_id")?;
    let add_bos = match (meta.bool("tokenizer.ggml.add_bos_token")?, bos_token_id) {
        (Some(true), None) => bail!(
            "{} sets tokenizer.ggml.add_bos_token but has no tokenizer.ggml.bos_token_id: \
             re-convert the model",
            source.display()
        ),
        (Some(flag), _) => flag,
        (None, bos) => kind == TokenizerKind::SentencePieceBpe && bos.is_some(),
    };

    let vocab = vocab_map(&tokens);
    let mut tokenizer = match kind {
        TokenizerKind::ByteLevelBpe => byte_level_bpe(&meta, vocab)?,
        TokenizerKind::SentencePieceBpe => sentencepiece_bpe(&meta, &tokens, vocab)?,
    };

    // Control and unknown tokens are special (matched verbatim, skippable when decoding);
    // user-defined ones are matched verbatim too but decode like text, as llama.cpp does.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter_map(|(token, &ty)| match ty {
            TYPE_UNKNOWN | TYPE_CONTROL => Some(AddedToken::from(*token, true)),
            TYPE_USER_DEFINED => Some(AddedToken::from(*token, false).normalized(false)),
            _ => None,
        })
        .collect();
    tokenizer
        .add_tokens(added)
        .map_err(|e| anyhow!("cannot add the special tokens of {}: {e}", source.display()))?;

    if let Some(bos) = bos_token_id.filter(|_| add_bos) {
        let bos_token = tokens[bos as usize];
        let template = TemplateProcessing::builder()
            .try_single(format!("{bos_token} $A"))
            .and_then(|b| b.try_pair(format!("{bos_token} $A {bos_token}:1 $B:1")))
            .map_err(|e| anyhow!("BOS template for {}: {e}", source.display()))?
            .special_tokens(vec![(bos_token.to_string(), bos)])
            .build()
            .map_err(|e| anyhow!("BOS template for {}: {e}", source.display()))?;
        tokenizer.with_post_processor(Some(template));
    }

    Ok(GgufTokenizer {
        tokenizer,
        bos_token_id,
        eos_token_id,
        add_bos,
        kind,
    })
}

/// Token → id; a token listed twice keeps its first id.
fn vocab_map(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry(token.to_string()).or_insert(id as u32);
    }
    vocab
}

/// Byte-level BPE: stored merges, pre-tokenizer chosen by `tokenizer.ggml.pre`.
fn byte_level_bpe(meta: &Meta, vocab: Vocab) -> Result<Tokenizer> {
    let source = meta.source.display();
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .ok_or_else(|| {
            anyhow!("{source} has no tokenizer.ggml.merges: a gpt2 tokenizer needs them; re-convert the model")
        })?
        .into_iter()
        .map(|merge| {
            // As llama.cpp: split at the first space after the first byte.
            merge
                .bytes()
                .skip(1)
                .position(|b| b == b' ')
                .map(|at| (merge[..=at].to_string(), merge[at + 2..].to_string()))
                .ok_or_else(|| {
                    anyhow!("merge '{merge}' in {source} is not two tokens separated by a space: re-convert the model")
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| {
            anyhow!("cannot build the BPE model of {source}: {e}; re-convert the model")
        })?;

    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = match meta.string("tokenizer.ggml.pre")? {
        None | Some("default" | "gpt-2") => byte_level.into(),
        Some("smollm" | "starcoder") => {
            PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        Some(other) => bail!(
            "pre-tokenizer '{other}' (tokenizer.ggml.pre) in {source} is not supported: wake2vec \
             rebuilds 'gpt-2', 'default', 'smollm' and 'starcoder'; use the model's HF directory \
             with its tokenizer.json instead"
        ),
    };

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// SentencePiece BPE as HF's Llama converter builds it: merges ranked by score, byte fallback,
/// spaces as `▁` with one prepended unless `tokenizer.ggml.add_space_prefix` is false.
fn sentencepiece_bpe(meta: &Meta, tokens: &[&str], vocab: Vocab) -> Result<Tokenizer> {
    let source = meta.source.display();
    let scores = meta.floats("tokenizer.ggml.scores")?.ok_or_else(|| {
        anyhow!("{source} has no tokenizer.ggml.scores: a llama tokenizer needs them; re-convert the model")
    })?;
    if scores.len() != tokens.len() {
        bail!(
            "{source} has {} scores for {} tokens: the metadata is inconsistent; re-convert the model",
            scores.len(),
            tokens.len()
        );
    }
    let merges = merges_from_scores(tokens, &scores, &vocab);
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = meta.int("tokenizer.ggml.unknown_token_id")? {
        let unk = usize::try_from(unk)
            .ok()
            .and_then(|id| tokens.get(id))
            .ok_or_else(|| anyhow!("tokenizer.ggml.unknown_token_id = {unk} in {source} is outside the vocabulary; re-convert the model"))?;
        bpe = bpe.unk_token(unk.to_string());
    }
    let bpe = bpe.build().map_err(|e| {
        anyhow!("cannot build the BPE model of {source}: {e}; re-convert the model")
    })?;

    let space_prefix = meta
        .bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to)
            .map_err(|e| anyhow!("cannot build Replace({from:?}) for {source}: {e}"))
    };
    let to_spiece = replace(" ", SPIECE_SPACE)?;
    let from_spiece = replace(SPIECE_SPACE, " ")?;
    let mut normalizers: Vec<NormalizerWrapper> = vec![to_spiece.into()];
    let mut decoders: Vec<DecoderWrapper> = vec![
        from_spiece.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        normalizers.insert(0, Prepend::new(SPIECE_SPACE.to_string()).into());
        decoders.push(Strip::new(' ', 1, 0).into());
    }

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| anyhow!("cannot set the normalizer for {source}: {e}"))?
        .with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Merges for SentencePiece BPE, as HF's `SentencePieceExtractor`: every split of every piece
/// into two pieces of the vocabulary, ordered by the whole piece's score (highest first), ties
/// in vocabulary order, the splits of one piece by the ids of their halves.
fn merges_from_scores(tokens: &[&str], scores: &[f32], vocab: &Vocab) -> Merges {
    let mut merges: Vec<(u32, u32, f32)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let first = merges.len();
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                merges.push((l, r, score));
            }
        }
        merges[first..].sort_by_key(|&(l, r, _)| (l, r));
    }
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| {
            (
                tokens[l as usize].to_string(),
                tokens[r as usize].to_string(),
            )
        })
        .collect()
}

/// Typed reads of GGUF metadata; a key of the wrong type is an error naming key and file.
struct Meta<'a> {
    content: &'a Content,
    source: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn wrong_type(&self, key: &str, value: &Value, expected: &str) -> anyhow::Error {
        anyhow!(
            "{key} in {} is {:?}, expected {expected}: the metadata is malformed; re-convert the model",
            self.source.display(),
            value.value_type()
        )
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.wrong_type(key, other, "a string")),
            })
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                other => Err(self.wrong_type(key, other, "a bool")),
            })
            .transpose()
    }

    fn int(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| as_int(v).ok_or_else(|| self.wrong_type(key, v, "an integer")))
            .transpose()
    }

    /// The elements of an array value, each converted by `f`.
    fn array<'v, T>(
        &'v self,
        key: &str,
        expected: &str,
        f: impl Fn(&'v Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(self.wrong_type(key, value, expected));
        };
        items
            .iter()
            .map(|item| f(item).ok_or_else(|| self.wrong_type(key, item, expected)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.array(key, "an array of strings", |v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.array(key, "an array of integers", as_int)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.array(key, "an array of floats", |v| match v {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        })
    }
}

fn as_int(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;

    fn content(metadata: &[(&str, Value)]) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    }

    fn string(s: &str) -> Value {
        Value::String(s.to_string())
    }

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| string(s)).collect())
    }

    /// Bad metadata gives a one-line error naming the file and the offending value.
    #[test]
    fn bad_metadata_is_a_clear_error() {
        let tokens = ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"]));
        let merges = ("tokenizer.ggml.merges", strings(&["a b"]));
        let gpt2 = ("tokenizer.ggml.model", string("gpt2"));
        let cases = [
            (
                vec![("tokenizer.ggml.model", string("bert")), tokens.clone()],
                "tokenizer type 'bert' in m.gguf is not supported",
            ),
            (vec![gpt2.clone()], "m.gguf has no tokenizer.ggml.tokens"),
            (
                vec![gpt2.clone(), ("tokenizer.ggml.tokens", string("a"))],
                "tokenizer.ggml.tokens in m.gguf is String, expected an array of strings",
            ),
            (
                vec![
                    gpt2.clone(),
                    tokens.clone(),
                    ("tokenizer.ggml.merges", strings(&["ab"])),
                ],
                "merge 'ab' in m.gguf",
            ),
            (
                vec![
                    gpt2.clone(),
                    tokens.clone(),
                    merges.clone(),
                    ("tokenizer.ggml.pre", string("llama-bpe")),
                ],
                "pre-tokenizer 'llama-bpe' (tokenizer.ggml.pre) in m.gguf is not supported",
            ),
            (
                vec![
                    gpt2,
                    tokens,
                    merges,
                    ("tokenizer.ggml.bos_token_id", Value::U32(3)),
                ],
                "tokenizer.ggml.bos_token_id = 3 in m.gguf is outside",
            ),
        ];
        for (metadata, expected) in cases {
            let err = from_gguf(&content(&metadata), Path::new("m.gguf"))
                .err()
                .expect("bad metadata is refused")
                .to_string();
            assert!(err.starts_with(expected), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
