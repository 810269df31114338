//! `wake2vec.json`, the manifest beside an injected model's `config.json` (docs/formats.md):
//! where the Wake rows are ([`WakeRange`]), their words, and how the injection made them. The
//! one reader and writer of the file: `inject` writes it whole; training, analysis, generation
//! and export read it. Files written by hand (tests, other tools) need only `format`,
//! `base_vocab`, `wake_start` and `wake_count`; the provenance fields are then absent.

use super::init::InitScheme;
use super::tokenizer::Family;
use crate::lexicon::{Case, Skipped};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

/// The manifest's file name, beside the model's config.json.
pub const MANIFEST: &str = "wake2vec.json";

/// The Wake rows: ids (and rows of the embedding and head) `start .. start + count`; stored as
/// `wake_start` and `wake_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeRange {
    #[serde(rename = "wake_start")]
    pub start: usize,
    #[serde(rename = "wake_count")]
    pub count: usize,
}

impl WakeRange {
    /// One past the last Wake row.
    pub fn end(&self) -> usize {
        self.start + self.count
    }

    /// `start .. end`.
    pub fn range(&self) -> Range<usize> {
        self.start..self.end()
    }

    /// True when `id` is a Wake id.
    pub fn contains(&self, id: usize) -> bool {
        self.range().contains(&id)
    }
}

/// `wake2vec.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The `--model` the injection started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// Rows of the base embedding matrix (padded rows included).
    pub base_vocab: usize,
    /// Tokens the base tokenizer had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_tokenizer_size: Option<usize>,
    /// The Wake rows; `start` equals `base_vocab` for what `inject` writes.
    #[serde(flatten)]
    pub wake: WakeRange,
    /// `words[i]` is the word of id `wake.start + i` (empty when unknown).
    #[serde(default)]
    pub words: Vec<String>,
    /// Lexicon forms that were already one whole-word token, with their base id.
    #[serde(default)]
    pub existing: BTreeMap<String, u32>,
    /// Lexicon forms the tokenizer always cuts into several pre-tokens: no row was made.
    #[serde(default)]
    pub unreachable: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<Case>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexicon: Option<LexiconRecord>,
}

/// The init scheme, its parameters and its seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitRecord {
    #[serde(flatten)]
    pub scheme: InitScheme,
    pub seed: u64,
    /// How the head's new rows were made (`null` when the head is tied).
    pub head: Option<String>,
    /// Where the compositional scheme's morpheme data came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub morphemes: Option<String>,
}

/// How the tokenizer was extended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerRecord {
    pub family: Family,
    /// The SentencePiece split regex added, if any.
    pub split: Option<String>,
    pub ignore_merges: bool,
}

/// Where the lexicon came from and what its loading skipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LexiconRecord {
    pub path: String,
    pub entries: usize,
    pub skipped: Skipped,
}

impl Manifest {
    /// A layout without a file: rows `base_vocab .. rows` are the new rows, words unknown
    /// (`analyze --base-vocab N`).
    pub fn from_base_vocab(base_vocab: usize, rows: usize) -> Result<Self> {
        ensure!(
            base_vocab <= rows,
            "--base-vocab {base_vocab} exceeds the matrix's {rows} rows"
        );
        Ok(Self {
            format: 1,
            base_model: None,
            base_vocab,
            base_tokenizer_size: None,
            wake: WakeRange {
                start: base_vocab,
                count: rows - base_vocab,
            },
            words: Vec::new(),
            existing: BTreeMap::new(),
            unreachable: Vec::new(),
            init: None,
            case: None,
            tokenizer: None,
            lexicon: None,
        })
    }

    /// Reads a manifest file and checks that its words match its row count.
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::util::fs::read_to_string(path)?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a wake2vec.json (see docs/formats.md)",
                path.display()
            )
        })?;
        if !m.words.is_empty() && m.words.len() != m.wake.count {
            bail!(
                "{}: {} words for wake_count {}; the file is inconsistent",
                path.display(),
                m.words.len(),
                m.wake.count
            );
        }
        Ok(m)
    }

    /// Reads `DIR/wake2vec.json` of an injected model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        ensure!(
            path.is_file(),
            "{} has no {MANIFEST}: it is not an injected model; run `wake2vec inject` first",
            dir.display()
        );
        Self::read(&path)
    }

    /// `DIR/wake2vec.json` when the directory has one.
    pub fn load_if_present(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST);
        path.is_file().then(|| Self::read(&path)).transpose()
    }

    /// Checks that the Wake rows lie inside a matrix of `rows` rows (`what` names it).
    pub fn check_fits(&self, rows: usize, what: &str) -> Result<()> {
        ensure!(
            self.wake.count > 0 && self.wake.end() <= rows,
            "{MANIFEST} puts {} Wake rows at {}, but {what} has {rows} rows",
            self.wake.count,
            self.wake.start
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_file_reads_and_round_trips_with_the_same_keys() {
        let dir = std::env::temp_dir().join(format!("w2v-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text =
            r#"{"format":1,"base_vocab":360,"wake_start":360,"wake_count":2,"words":["a","b"]}"#;
        std::fs::write(dir.join(MANIFEST), text).unwrap();
        let m = Manifest::load(&dir).unwrap();
        assert_eq!(m.wake.range(), 360..362);
        assert!(m.wake.contains(361) && !m.wake.contains(362));
        assert_eq!(m.init, None);
        let back: serde_json::Value = serde_json::to_value(&m).unwrap();
        let want = serde_json::json!({"format":1,"base_vocab":360,"wake_start":360,"wake_count":2,
            "words":["a","b"],"existing":{},"unreachable":[]});
        assert_eq!(back, want);
        m.check_fits(362, "the embedding").unwrap();
        let err = m.check_fits(361, "the embedding").unwrap_err().to_string();
        assert!(
            err.contains("2 Wake rows at 360") && err.contains("361 rows"),
            "{err}"
        );
        // Words that do not match the count are refused, naming the file.
        std::fs::write(dir.join(MANIFEST), text.replace(r#""b"]"#, r#""b","c"]"#)).unwrap();
        let err = format!("{:#}", Manifest::load(&dir).unwrap_err());
        assert!(err.contains("3 words for wake_count 2"), "{err}");
        assert!(Manifest::load_if_present(&dir.join("none"))
            .unwrap()
            .is_none());
        let err = Manifest::load(&dir.join("none")).unwrap_err().to_string();
        assert!(err.contains("wake2vec inject"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
