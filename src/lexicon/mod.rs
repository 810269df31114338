//! The lexicon: loading a word list, mining one from a corpus, and the morpheme data
//! (affixes with example words, greedy prefix|root|suffix decomposition).

pub mod mine;
pub mod morphemes;

pub use mine::{mine, Candidate, MineOptions};
pub use morphemes::{Decomposer, Decomposition, MorphemeData, MorphemeGroup};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

/// How many lines of each kind [`Lexicon::parse`] skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Empty or whitespace-only lines.
    pub blank: usize,
    /// Lines starting with `#`.
    pub comment: usize,
    /// Entries equal (after trimming and NFC) to an earlier one.
    pub duplicate: usize,
    /// Entries with whitespace inside them (a lexicon entry is one word).
    pub whitespace: usize,
    /// Entries with control characters.
    pub control: usize,
    /// Entries of invisible characters only (zero-width joiners, direction marks, …).
    #[serde(default)]
    pub invisible: usize,
    /// Entries longer than [`MAX_WORD_BYTES`].
    #[serde(default)]
    pub long: usize,
}

/// The longest entry a lexicon may hold, in UTF-8 bytes: far above any word (the Wake's longest,
/// its hundred-letter thunderwords, are about 100), far below what would make one token of a
/// whole file.
pub const MAX_WORD_BYTES: usize = 256;

/// Characters that render as nothing: format characters (zero-width space, joiners, direction
/// marks and embeddings, word joiner, byte-order mark), soft hyphen, variation selectors, Hangul
/// fillers and tags.
fn is_invisible(c: char) -> bool {
    matches!(c as u32,
        0xAD | 0x34F | 0x61C | 0x115F..=0x1160 | 0x17B4..=0x17B5 | 0x180B..=0x180F
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
        | 0xFEFF | 0xFFA0 | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0000..=0xE0FFF)
}

impl Skipped {
    pub fn total(&self) -> usize {
        self.blank
            + self.comment
            + self.duplicate
            + self.whitespace
            + self.control
            + self.invisible
            + self.long
    }
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} blank, {} comment, {} duplicate, {} with inner whitespace, {} with control \
             characters, {} invisible, {} longer than {MAX_WORD_BYTES} bytes",
            self.blank,
            self.comment,
            self.duplicate,
            self.whitespace,
            self.control,
            self.invisible,
            self.long
        )
    }
}

/// A list of words, one entry per line of its file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lexicon {
    pub words: Vec<String>,
    pub skipped: Skipped,
}

impl Lexicon {
    /// Reads a lexicon file (UTF-8, one entry per line). An unreadable or non-UTF-8 file, or one
    /// without a single usable entry, is an error.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::corpus::read_text(path)?;
        let lexicon = Self::parse(&text);
        if lexicon.words.is_empty() {
            bail!(
                "lexicon {} has no usable entries ({}): give a file with one word per line",
                path.display(),
                lexicon.skipped
            );
        }
        Ok(lexicon)
    }

    /// Parses lexicon text (a leading byte-order mark dropped): each line trimmed and
    /// NFC-normalized; blank lines, `#` comments, duplicates, entries with inner whitespace or
    /// control characters, entries of invisible characters only, and entries longer than
    /// [`MAX_WORD_BYTES`] skipped and counted.
    pub fn parse(text: &str) -> Self {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut skipped = Skipped::default();
        let mut seen = HashSet::new();
        let mut words = Vec::new();
        for line in text.lines() {
            let entry = line.trim();
            if entry.is_empty() {
                skipped.blank += 1;
            } else if entry.starts_with('#') {
                skipped.comment += 1;
            } else if entry.chars().any(char::is_whitespace) {
                skipped.whitespace += 1;
            } else if entry.chars().any(char::is_control) {
                skipped.control += 1;
            } else if entry.chars().all(is_invisible) {
                skipped.invisible += 1;
            } else if entry.len() > MAX_WORD_BYTES {
                skipped.long += 1;
            } else {
                let entry = crate::corpus::nfc(entry);
                if seen.insert(entry.clone()) {
                    words.push(entry);
                } else {
                    skipped.duplicate += 1;
                }
            }
        }
        Lexicon { words, skipped }
    }

    /// The surface forms to inject under `case`, de-duplicated, in lexicon order (for
    /// [`Case::Both`]: every lower-case form first, then every capitalised form).
    pub fn forms(&self, case: Case) -> Vec<String> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut push = |w: String| {
            if seen.insert(w.clone()) {
                out.push(w);
            }
        };
        match case {
            Case::AsIs => self.words.iter().cloned().for_each(&mut push),
            Case::Lower => self
                .words
                .iter()
                .map(|w| w.to_lowercase())
                .for_each(&mut push),
            Case::Both => {
                let lower: Vec<String> = self.words.iter().map(|w| w.to_lowercase()).collect();
                lower.iter().cloned().for_each(&mut push);
                lower.iter().map(|w| capitalise(w)).for_each(&mut push);
            }
        }
        out
    }
}

/// Upper-cases the first character: `riverrun` → `Riverrun`.
pub fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Which letter cases of each lexicon word become vocabulary entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    /// The lower-case form of each entry (the default).
    Lower,
    /// Each entry exactly as written in the lexicon file.
    AsIs,
    /// The lower-case and the capitalised form (`riverrun`, `Riverrun`): two rows per word.
    Both,
}

impl std::str::FromStr for Case {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lower" => Ok(Case::Lower),
            "as-is" => Ok(Case::AsIs),
            "both" => Ok(Case::Both),
            other => bail!("unknown case '{other}': expected lower, as-is or both"),
        }
    }
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Case::Lower => "lower",
            Case::AsIs => "as-is",
            Case::Both => "both",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_a_byte_order_mark_and_skips_invisible_and_overlong_entries() {
        let long = "w".repeat(MAX_WORD_BYTES + 1);
        let text = format!("\u{feff}riverrun\n\u{200d}\n\u{200f}\u{200b}\n{long}\nHowth\n");
        let lex = Lexicon::parse(&text);
        assert_eq!(lex.words, ["riverrun", "Howth"]);
        assert_eq!((lex.skipped.invisible, lex.skipped.long), (2, 1));
        assert_eq!(lex.skipped.total(), 3);
    }

    #[test]
    fn parse_counts_every_kind_of_skip() {
        let text = "  riverrun \n\n# a comment\nriverrun\ncafe\u{301}\ncafé\ntwo words\nbad\u{7}\n\t\nHowth\n";
        let lex = Lexicon::parse(text);
        assert_eq!(lex.words, ["riverrun", "café", "Howth"]);
        assert_eq!(
            lex.skipped,
            Skipped {
                blank: 2,
                comment: 1,
                duplicate: 2,
                whitespace: 1,
                control: 1,
                invisible: 0,
                long: 0,
            }
        );
        assert_eq!(lex.skipped.total(), 7);
    }

    #[test]
    fn forms_by_case() {
        let lex = Lexicon::parse("Howth\nhowth\nriverrun\nélan\n");
        assert_eq!(
            lex.forms(Case::AsIs),
            ["Howth", "howth", "riverrun", "élan"]
        );
        assert_eq!(lex.forms(Case::Lower), ["howth", "riverrun", "élan"]);
        assert_eq!(
            lex.forms(Case::Both),
            ["howth", "riverrun", "élan", "Howth", "Riverrun", "Élan"]
        );
        assert_eq!("both".parse::<Case>().unwrap(), Case::Both);
        assert!("upper".parse::<Case>().is_err());
    }

    #[test]
    fn load_refuses_empty_and_non_utf8_files() {
        let dir = std::env::temp_dir().join(format!("wake2vec-lexicon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.txt");
        std::fs::write(&empty, "\n# only a comment\n\n").unwrap();
        let err = Lexicon::load(&empty).unwrap_err().to_string();
        assert!(
            err.contains("has no usable entries (2 blank, 1 comment"),
            "{err}"
        );
        let latin1 = dir.join("latin1.txt");
        std::fs::write(&latin1, b"caf\xe9\n").unwrap();
        let err = format!("{:#}", Lexicon::load(&latin1).unwrap_err());
        assert!(
            err.contains("is not UTF-8 text (invalid byte at offset 3)"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
