//! Extending a BPE tokenizer with whole-word vocabulary entries (docs/origin/brief.md §2).
//!
//! Each new word becomes one entry of the BPE **vocabulary** (never an HF "added token"),
//! spelled with the word-start marker: `Ġword` (the byte-level spelling of `" word"`) for
//! byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2), `▁word` for SentencePiece BPE (Llama 2,
//! TinyLlama, Mistral). The model gets `ignore_merges = true`, so a pre-token that is a
//! vocabulary entry maps straight to its id. A new word is therefore matched only when a
//! whole pre-token equals it (never inside a longer word), and decodes with its space.
//!
//! Base tokenization is unchanged for every pre-token that is not a new entry, which this
//! module checks rather than assumes:
//! - `ignore_merges` changes nothing when every base vocabulary piece is what BPE makes of its
//!   own text ([`Extension::merge_unreachable`] lists the pieces for which that fails);
//! - SentencePiece tokenizers have no pre-tokenizer (the whole text is one piece), so one is
//!   added: a `Split` with behavior `Isolated` on [`WORD_SPLIT`] (words with their `▁` and
//!   inner `'`/`’`/`-` joiners, punctuation runs with their `▁`), applied after the spaces
//!   have become `▁`. A split point cannot change the base ids when no vocabulary piece
//!   contains one; when some piece does, the coarser [`WORD_START_SPLIT`] (a split before each
//!   run of `▁` only, docs/origin/brief.md §2) is tried, and if that fails too the tokenizer is refused.
//!
//! New ids start at `first_id`, normally the row count of the base embedding matrix, so they
//! never fall inside a padded region (Qwen2/Phi: matrix larger than the tokenizer). The ids in
//! between belong to no token, as in the base tokenizer.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    Model, ModelWrapper, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    SplitDelimiterBehavior, Tokenizer,
};

/// SentencePiece's word-start marker (a space).
pub const SPIECE: char = '\u{2581}';

/// The SentencePiece pre-tokenizer regex used when the vocabulary allows it: a word (letters
/// and marks, with `'`, `’` or `-` between letters) with the `▁` before it, a run of anything
/// else with its `▁`, or trailing `▁`.
pub const WORD_SPLIT: &str = "▁*[\\p{L}\\p{M}]+(?:['’-][\\p{L}\\p{M}]+)*|▁*[^▁\\p{L}\\p{M}]+|▁+";

/// The fallback: every run of `▁` starts a new piece (docs/origin/brief.md §2). A lexicon word followed by
/// punctuation (`▁word,`) is then one piece and is not matched.
pub const WORD_START_SPLIT: &str = "▁+[^▁]*";

/// The two BPE tokenizer families wake2vec extends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Byte-level BPE: `ByteLevel` pre-tokenizer, word start spelled `Ġ`.
    ByteLevel,
    /// SentencePiece BPE: spaces become `▁` (normalizer or `Metaspace`), usually byte fallback.
    SentencePiece,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::ByteLevel => "byte-level BPE",
            Family::SentencePiece => "SentencePiece BPE",
        })
    }
}

/// A base tokenizer, kept both as JSON (to extend) and loaded (to tokenize).
#[derive(Clone)]
pub struct BaseTokenizer {
    json: Value,
    pub tokenizer: Tokenizer,
    pub family: Family,
    /// Where it came from, for messages.
    pub source: String,
}

impl BaseTokenizer {
    /// Reads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the tokenizer {}", path.display()))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the text of a `tokenizer.json`; `source` names it in messages.
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let json: Value = serde_json::from_str(text)
            .map_err(|e| anyhow!("{source} is not valid JSON ({e}): give an HF tokenizer.json"))?;
        let tokenizer = Tokenizer::from_str(text)
            .map_err(|e| anyhow!("{source} is not a tokenizer HF tokenizers can load: {e}"))?;
        let model_type = json["model"]["type"].as_str().unwrap_or("");
        let is_bpe = matches!(tokenizer.get_model(), ModelWrapper::BPE(_));
        if !is_bpe {
            bail!(
                "{source} has a {} model: wake2vec extends BPE tokenizers (byte-level or SentencePiece BPE) only",
                if model_type.is_empty() { "non-BPE" } else { model_type }
            );
        }
        let family = if contains_type(&json["pre_tokenizer"], "ByteLevel") {
            Family::ByteLevel
        } else if contains_type(&json["pre_tokenizer"], "Metaspace")
            || replaces_space_with_spiece(&json["normalizer"])
        {
            Family::SentencePiece
        } else {
            bail!(
                "{source}: cannot tell the tokenizer family: expected a ByteLevel pre-tokenizer \
                 (byte-level BPE) or spaces turned into ▁ by the normalizer or a Metaspace \
                 pre-tokenizer (SentencePiece BPE)"
            );
        };
        Ok(BaseTokenizer {
            json,
            tokenizer,
            family,
            source: source.to_string(),
        })
    }

    fn bpe(&self) -> &BPE {
        match self.tokenizer.get_model() {
            ModelWrapper::BPE(bpe) => bpe,
            _ => unreachable!("checked in from_json"),
        }
    }

    /// The vocabulary spelling of `text` without a word-start marker.
    pub fn spell(&self, text: &str) -> String {
        match self.family {
            Family::ByteLevel => byte_level_spelling(text),
            Family::SentencePiece => text.replace(' ', &SPIECE.to_string()),
        }
    }

    /// The vocabulary entry of `word` at a word start: `Ġword` or `▁word`.
    pub fn entry(&self, word: &str) -> String {
        self.spell(&format!(" {word}"))
    }

    /// The base model's pieces for `text` as one pre-token (with the word-start marker when
    /// `word_start`), as base ids.
    pub fn pieces(&self, text: &str, word_start: bool) -> Result<Vec<u32>> {
        let spelled = if word_start {
            self.entry(text)
        } else {
            self.spell(text)
        };
        let tokens = self
            .bpe()
            .tokenize(&spelled)
            .map_err(|e| anyhow!("cannot tokenize {text:?} with {}: {e}", self.source))?;
        Ok(tokens.into_iter().map(|t| t.id).collect())
    }

    /// The words the base vocabulary has as one word-start token (`Ġword`, `▁word`), lower-cased,
    /// letters only (ASCII letters for byte-level BPE, whose spelling of other letters is
    /// mangled), at least 3 letters.
    pub fn whole_words(&self) -> HashSet<String> {
        let marker = match self.family {
            Family::ByteLevel => "Ġ",
            Family::SentencePiece => "\u{2581}",
        };
        self.bpe()
            .get_vocab()
            .into_keys()
            .filter_map(|piece| {
                let word = piece.strip_prefix(marker)?;
                let letters = match self.family {
                    Family::ByteLevel => word.chars().all(|c| c.is_ascii_alphabetic()),
                    Family::SentencePiece => word.chars().all(char::is_alphabetic),
                };
                (letters && word.chars().count() >= 3).then(|| word.to_lowercase())
            })
            .collect()
    }

    /// Every id the base tokenizer knows (vocabulary and added tokens), sorted.
    pub fn known_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.tokenizer.get_vocab(true).into_values().collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// One more than the largest id the tokenizer knows.
    pub fn id_end(&self) -> u32 {
        self.known_ids().last().map_or(0, |&m| m + 1)
    }

    /// Base vocabulary pieces BPE does not rebuild from their own text; `ignore_merges` would
    /// change how a pre-token equal to one of them is tokenized. Added tokens and byte-fallback
    /// pieces (`<0x41>`) are not produced by merges and are left out.
    pub fn merge_unreachable(&self) -> Result<Vec<String>> {
        let mut model = self.json["model"].clone();
        model["ignore_merges"] = Value::Bool(false);
        let bpe: BPE = serde_json::from_str(&model.to_string())
            .map_err(|e| anyhow!("cannot rebuild the BPE model of {}: {e}", self.source))?;
        let added: HashSet<String> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .collect();
        let mut bad = Vec::new();
        let mut vocab: Vec<(String, u32)> = bpe.get_vocab().into_iter().collect();
        vocab.sort_by_key(|&(_, id)| id);
        for (piece, id) in vocab {
            if added.contains(&piece) || is_byte_piece(&piece) {
                continue;
            }
            let tokens = bpe.tokenize(&piece).map_err(|e| anyhow!("{e}"))?;
            if tokens.len() != 1 || tokens[0].id != id {
                bad.push(piece);
            }
        }
        Ok(bad)
    }
}

/// The ids of the byte tokens of `t`: byte-fallback pieces (`<0x41>`) and, in a byte-level
/// BPE, the single-byte pieces (one character of the byte alphabet). Added tokens are not.
pub fn byte_token_ids(t: &Tokenizer) -> Vec<u32> {
    let byte_level =
        serde_json::to_value(t.get_pre_tokenizer()).is_ok_and(|v| contains_type(&v, "ByteLevel"));
    let added: HashSet<u32> = t.get_added_tokens_decoder().into_keys().collect();
    let mut ids: Vec<u32> = t
        .get_model()
        .get_vocab()
        .into_iter()
        .filter(|(piece, id)| {
            !added.contains(id)
                && (is_byte_piece(piece) || (byte_level && piece.chars().count() == 1))
        })
        .map(|(_, id)| id)
        .collect();
    ids.sort_unstable();
    ids
}

fn is_byte_piece(piece: &str) -> bool {
    piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>')
}

/// The byte-level (GPT-2) spelling of `text`, from `tokenizers`' own ByteLevel pre-tokenizer.
fn byte_level_spelling(text: &str) -> String {
    let mut pts = PreTokenizedString::from(text);
    ByteLevel::new(false, false, false)
        .pre_tokenize(&mut pts)
        .expect("ByteLevel without regex cannot fail");
    pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s)
        .collect()
}

/// True when `v` is, or is a `Sequence` containing, a component of type `ty`.
fn contains_type(v: &Value, ty: &str) -> bool {
    if v["type"] == ty {
        return true;
    }
    ["pretokenizers", "normalizers"]
        .iter()
        .filter_map(|k| v[*k].as_array())
        .flatten()
        .any(|c| contains_type(c, ty))
}

fn replaces_space_with_spiece(v: &Value) -> bool {
    if v["type"] == "Replace" && v["pattern"]["String"] == " " && v["content"] == "\u{2581}" {
        return true;
    }
    v["normalizers"]
        .as_array()
        .is_some_and(|a| a.iter().any(replaces_space_with_spiece))
}

/// The base tokenizer with new whole-word entries.
#[derive(Clone)]
pub struct Extension {
    pub tokenizer: Tokenizer,
    pub family: Family,
    /// The SentencePiece split regex added ([`WORD_SPLIT`] or [`WORD_START_SPLIT`]).
    pub split: Option<&'static str>,
    /// Id of `words[0]`.
    pub first_id: u32,
    /// The new words in id order: `words[i]` has id `first_id + i`.
    pub words: Vec<String>,
    /// Requested words the base vocabulary already has as one word-start entry, with their id.
    pub existing: BTreeMap<String, u32>,
    /// Requested words the pre-tokenizer always cuts into several pieces (apostrophes and
    /// hyphens under byte-level BPE, digits, …): an entry for them could never be produced, so
    /// none is made.
    pub unreachable: Vec<String>,
    /// See [`BaseTokenizer::merge_unreachable`]; empty for every tokenizer measured so far.
    pub merge_unreachable: Vec<String>,
}

impl Extension {
    /// The extended `tokenizer.json`.
    pub fn to_json(&self) -> Result<String> {
        self.tokenizer
            .to_string(true)
            .map_err(|e| anyhow!("cannot serialize the extended tokenizer: {e}"))
    }

    /// One past the last new id.
    pub fn id_end(&self) -> u32 {
        self.first_id + self.words.len() as u32
    }

    /// True for the ids of new words.
    pub fn is_new(&self, id: u32) -> bool {
        (self.first_id..self.id_end()).contains(&id)
    }
}

/// Adds `forms` (surface words, in order) to `base` as whole-word entries with ids from
/// `first_id`. With no forms, only the structural change is made (ignore_merges, and the
/// SentencePiece split), which must leave every id unchanged.
pub fn extend(base: &BaseTokenizer, forms: &[String], first_id: u32) -> Result<Extension> {
    let id_end = base.id_end();
    if first_id < id_end {
        bail!(
            "new ids would start at {first_id}, but {} already uses ids up to {}",
            base.source,
            id_end - 1
        );
    }
    let fits = u32::try_from(forms.len())
        .ok()
        .and_then(|n| first_id.checked_add(n))
        .is_some();
    if !fits {
        bail!(
            "new ids from {first_id} for {} words would pass the largest token id, {}: lower \
             --first-id (normally the base's row count, {id_end})",
            forms.len(),
            u32::MAX
        );
    }
    let mut json = base.json.clone();
    json["model"]["ignore_merges"] = Value::Bool(true);
    let split = match base.family {
        Family::ByteLevel => None,
        Family::SentencePiece => {
            let regex = choose_split(base)?;
            let split = serde_json::json!({
                "type": "Split",
                "pattern": {"Regex": regex},
                "behavior": "Isolated",
                "invert": false,
            });
            json["pre_tokenizer"] = match json["pre_tokenizer"].take() {
                Value::Null => split,
                existing => {
                    serde_json::json!({"type": "Sequence", "pretokenizers": [existing, split]})
                }
            };
            Some(regex)
        }
    };

    let vocab = base.bpe().get_vocab();
    let mut existing = BTreeMap::new();
    let mut candidates = Vec::new();
    for form in forms {
        let entry = base.entry(form);
        match vocab.get(&entry) {
            Some(&id) => {
                existing.insert(form.clone(), id);
            }
            None => candidates.push(form.clone()),
        }
    }

    let build = |words: &[String]| -> Result<Tokenizer> {
        let mut json = json.clone();
        let v = json["model"]["vocab"]
            .as_object_mut()
            .with_context(|| format!("{} has no model.vocab object", base.source))?;
        for (i, w) in words.iter().enumerate() {
            v.insert(base.entry(w), Value::from(first_id + i as u32));
        }
        Tokenizer::from_str(&json.to_string())
            .map_err(|e| anyhow!("cannot build the extended tokenizer: {e}"))
    };
    let tokenizer = build(&candidates)?;
    // A word is reachable when it comes out as its own id in running text.
    let probes: Vec<String> = candidates.iter().map(|w| format!("a {w} a")).collect();
    let encodings = tokenizer
        .encode_batch(probes, false)
        .map_err(|e| anyhow!("cannot tokenize the new words: {e}"))?;
    let (mut words, mut unreachable) = (Vec::new(), Vec::new());
    for (i, (w, enc)) in candidates.iter().zip(&encodings).enumerate() {
        if enc.get_ids().contains(&(first_id + i as u32)) {
            words.push(w.clone());
        } else {
            unreachable.push(w.clone());
        }
    }
    let tokenizer = if unreachable.is_empty() {
        tokenizer
    } else {
        build(&words)?
    };
    Ok(Extension {
        tokenizer,
        family: base.family,
        split,
        first_id,
        words,
        existing,
        unreachable,
        merge_unreachable: base.merge_unreachable()?,
    })
}

/// [`WORD_SPLIT`] when no vocabulary piece would be cut by it, else [`WORD_START_SPLIT`] under
/// the same condition, else an error naming the pieces.
fn choose_split(base: &BaseTokenizer) -> Result<&'static str> {
    let mut cut = Vec::new();
    for regex in [WORD_SPLIT, WORD_START_SPLIT] {
        cut = pieces_cut_by(base, regex)?;
        if cut.is_empty() {
            return Ok(regex);
        }
    }
    let shown: Vec<&str> = cut.iter().take(5).map(String::as_str).collect();
    bail!(
        "{}: {} vocabulary pieces contain ▁ after another character (e.g. {shown:?}), so a merge \
         can cross a word start; whole-word entries cannot be added without changing the base \
         tokenization",
        base.source,
        cut.len()
    )
}

/// Vocabulary pieces the split `regex` would cut (added tokens and byte pieces left out).
pub fn pieces_cut_by(base: &BaseTokenizer, regex: &str) -> Result<Vec<String>> {
    let split = Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow!("bad split regex {regex:?}: {e}"))?;
    let added: HashSet<String> = base
        .tokenizer
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .collect();
    let mut cut = Vec::new();
    let mut vocab: Vec<(String, u32)> = base.bpe().get_vocab().into_iter().collect();
    vocab.sort_by_key(|&(_, id)| id);
    for (piece, _) in vocab {
        if added.contains(&piece) || is_byte_piece(&piece) {
            continue;
        }
        let mut pts = PreTokenizedString::from(piece.as_str());
        split
            .pre_tokenize(&mut pts)
            .map_err(|e| anyhow!("split of {piece:?}: {e}"))?;
        if pts
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .len()
            > 1
        {
            cut.push(piece);
        }
    }
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_spelling_matches_gpt2() {
        assert_eq!(byte_level_spelling(" word"), "Ġword");
        assert_eq!(byte_level_spelling(" paù"), "ĠpaÃ¹");
        assert_eq!(byte_level_spelling("d'a-b"), "d'a-b");
        assert_eq!(byte_level_spelling("\n"), "Ċ");
    }
}
