//! Metrics of generated text, so samples can be compared without a reader: the share of Wake
//! tokens, the coinage rate (words in neither the corpus nor the base vocabulary), the
//! fused-word rate (two known words glued without a space, like "haveheard"), distinct-n and
//! a repetition rate.
//!
//! Words are maximal runs of letters (apostrophes inside a word kept), lower-cased.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

/// Lower-cased words of `text`.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let inner_apostrophe = (c == '\'' || c == '’')
            && !cur.is_empty()
            && chars.get(i + 1).is_some_and(|n| n.is_alphabetic());
        if c.is_alphabetic() || inner_apostrophe {
            cur.extend(c.to_lowercase());
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The words a text is judged against.
#[derive(Debug, Clone, Default)]
pub struct KnownWords {
    /// Words of the corpus (lower-cased).
    pub corpus: HashSet<String>,
    /// Whole words of the base vocabulary (tokens with a word-start marker, lower-cased).
    pub base_vocab: HashSet<String>,
    /// Words of an optional dictionary (e.g. /usr/share/dict/words): English words that are
    /// neither in the corpus nor single tokens ("multiverse") are then not taken for coinages.
    pub dictionary: HashSet<String>,
}

impl KnownWords {
    /// The known words of a model's samples: the whole-word tokens of `tokenizer` below
    /// `base_vocab`, the words of the text file `corpus` and the lines of the word list
    /// `dictionary` (one word each), the files when given.
    pub fn load(
        tokenizer: &tokenizers::Tokenizer,
        base_vocab: usize,
        corpus: Option<&Path>,
        dictionary: Option<&Path>,
    ) -> Result<Self> {
        Ok(Self {
            corpus: match corpus {
                Some(p) => Self::from_corpus_text(&crate::corpus::read_text(p)?),
                None => HashSet::new(),
            },
            base_vocab: Self::from_tokenizer(tokenizer, base_vocab),
            dictionary: match dictionary {
                Some(p) => crate::corpus::read_text(p)?
                    .lines()
                    .map(|l| l.trim().to_lowercase())
                    .filter(|l| !l.is_empty())
                    .collect(),
                None => HashSet::new(),
            },
        })
    }

    /// The words of a text.
    pub fn from_corpus_text(text: &str) -> HashSet<String> {
        words(text).into_iter().collect()
    }

    /// Whole-word entries of a tokenizer's vocabulary with id below `base_vocab`: pieces that
    /// start with a word-start marker (`Ġ` byte-level, `▁` SentencePiece) followed by letters.
    pub fn from_tokenizer(t: &tokenizers::Tokenizer, base_vocab: usize) -> HashSet<String> {
        let mut out = HashSet::new();
        for (piece, id) in t.get_vocab(false) {
            if id as usize >= base_vocab {
                continue;
            }
            let rest = piece.strip_prefix('Ġ').or_else(|| piece.strip_prefix('▁'));
            if let Some(w) = rest {
                if !w.is_empty() && w.chars().all(char::is_alphabetic) {
                    out.insert(w.to_lowercase());
                }
            }
        }
        out
    }

    pub fn is_known(&self, w: &str) -> bool {
        self.corpus.contains(w) || self.base_vocab.contains(w) || self.dictionary.contains(w)
    }

    /// A word that is not known itself but splits into two known words, each of at least two
    /// letters ("a" and "i" excepted): `Some((left, right))` for the first such split.
    pub fn fused_split<'w>(&self, w: &'w str) -> Option<(&'w str, &'w str)> {
        if self.is_known(w) {
            return None;
        }
        let ok = |p: &str| (p.chars().count() >= 2 || p == "a" || p == "i") && self.is_known(p);
        w.char_indices()
            .skip(1)
            .map(|(i, _)| (&w[..i], &w[i..]))
            .find(|(l, r)| ok(l) && ok(r))
    }
}

/// The metrics of one text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextMetrics {
    pub words: usize,
    /// Share of generated tokens that are Wake rows (None when the row layout is unknown).
    pub wake_token_share: Option<f64>,
    /// Share of words in neither the corpus nor the base vocabulary.
    pub coinage_rate: f64,
    /// Share of words that are two known words glued together ("haveheard").
    pub fused_rate: f64,
    /// Distinct word n-grams over all word n-grams.
    pub distinct_1: f64,
    pub distinct_2: f64,
    pub distinct_3: f64,
    /// Share of word 4-grams that repeat an earlier 4-gram of the same text (loops).
    pub repetition_rate: f64,
    /// Up to 10 fused words found, as "have+heard".
    pub fused_examples: Vec<String>,
}

fn distinct(ws: &[String], n: usize) -> (usize, usize) {
    if ws.len() < n {
        return (0, 0);
    }
    let total = ws.len() + 1 - n;
    let unique: HashSet<&[String]> = ws.windows(n).collect();
    (unique.len(), total)
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Metrics of `text`; `ids` and `wake` give the Wake-token share.
pub fn metrics(
    text: &str,
    known: &KnownWords,
    ids: &[u32],
    wake: Option<std::ops::Range<usize>>,
) -> TextMetrics {
    let ws = words(text);
    let coined = ws.iter().filter(|w| !known.is_known(w)).count();
    let mut fused_examples = Vec::new();
    let mut fused = 0;
    for w in &ws {
        if let Some((l, r)) = known.fused_split(w) {
            fused += 1;
            if fused_examples.len() < 10 {
                fused_examples.push(format!("{l}+{r}"));
            }
        }
    }
    let d = |n| {
        let (u, t) = distinct(&ws, n);
        ratio(u, t)
    };
    let (u4, t4) = distinct(&ws, 4);
    TextMetrics {
        words: ws.len(),
        wake_token_share: wake.map(|r| {
            ratio(
                ids.iter().filter(|&&i| r.contains(&(i as usize))).count(),
                ids.len(),
            )
        }),
        coinage_rate: ratio(coined, ws.len()),
        fused_rate: ratio(fused, ws.len()),
        distinct_1: d(1),
        distinct_2: d(2),
        distinct_3: d(3),
        repetition_rate: ratio(t4 - u4, t4),
        fused_examples,
    }
}

/// One sample of the generation battery, as written to `samples.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatterySample {
    pub label: String,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub repetition_penalty: f32,
    pub seed: u64,
    pub prompt: String,
    pub text: String,
    pub tokens: usize,
    pub metrics: TextMetrics,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(corpus: &[&str], vocab: &[&str]) -> KnownWords {
        KnownWords {
            corpus: corpus.iter().map(|s| s.to_string()).collect(),
            base_vocab: vocab.iter().map(|s| s.to_string()).collect(),
            dictionary: HashSet::new(),
        }
    }

    #[test]
    fn words_split_on_non_letters_and_keep_inner_apostrophes() {
        assert_eq!(
            words("Riverrun, past Eve and Adam's, from swerve-of shore!"),
            vec!["riverrun", "past", "eve", "and", "adam's", "from", "swerve", "of", "shore"]
        );
        assert_eq!(words("  'tis 42 l'eau  "), vec!["tis", "l'eau"]);
        assert_eq!(words("Ùnà café"), vec!["ùnà", "café"]);
    }

    #[test]
    fn haveheard_is_fused_and_have_heard_is_not() {
        let k = known(&[], &["have", "heard", "the", "river"]);
        let glued = metrics("haveheard", &k, &[], None);
        assert_eq!(glued.fused_rate, 1.0);
        assert_eq!(glued.fused_examples, vec!["have+heard"]);
        assert_eq!(glued.coinage_rate, 1.0, "a fused word is also a coinage");
        let spaced = metrics("have heard", &k, &[], None);
        assert_eq!(spaced.fused_rate, 0.0);
        assert_eq!(spaced.coinage_rate, 0.0);
        // a known compound is not fused, and a one-letter piece other than a/i does not count
        let k2 = known(&["nowhere"], &["no", "where", "x", "ray"]);
        assert_eq!(k2.fused_split("nowhere"), None);
        assert_eq!(k2.fused_split("xray"), None);
        assert_eq!(k2.fused_split("noray"), Some(("no", "ray")));
        let k3 = known(&[], &["a", "plan"]);
        assert_eq!(k3.fused_split("aplan"), Some(("a", "plan")));
        // a dictionary word is neither a coinage nor fused
        let mut k4 = known(&[], &["multi", "verse"]);
        assert_eq!(k4.fused_split("multiverse"), Some(("multi", "verse")));
        k4.dictionary.insert("multiverse".into());
        assert_eq!(k4.fused_split("multiverse"), None);
        assert_eq!(metrics("multiverse", &k4, &[], None).coinage_rate, 0.0);
    }

    #[test]
    fn coinages_are_words_outside_corpus_and_vocabulary() {
        let k = known(&["riverrun", "past"], &["eve", "and", "adam"]);
        let m = metrics("riverrun past Eve and Adam commodius vicus", &k, &[], None);
        assert_eq!(m.words, 7);
        assert!((m.coinage_rate - 2.0 / 7.0).abs() < 1e-12);
        assert_eq!(m.fused_rate, 0.0);
    }

    #[test]
    fn distinct_and_repetition() {
        let k = KnownWords::default();
        let m = metrics("a b a b a b", &k, &[], None);
        assert!((m.distinct_1 - 2.0 / 6.0).abs() < 1e-12);
        assert!((m.distinct_2 - 2.0 / 5.0).abs() < 1e-12);
        assert!((m.distinct_3 - 2.0 / 4.0).abs() < 1e-12);
        // 4-grams: abab, baba, abab → one repeat of three
        assert!((m.repetition_rate - 1.0 / 3.0).abs() < 1e-12);
        let fresh = metrics("one two three four five", &k, &[], None);
        assert_eq!(fresh.distinct_2, 1.0);
        assert_eq!(fresh.repetition_rate, 0.0);
        let short = metrics("one", &k, &[], None);
        assert_eq!(short.distinct_3, 0.0);
    }

    #[test]
    fn wake_share_counts_ids_in_the_wake_range() {
        let k = KnownWords::default();
        let m = metrics("x", &k, &[1, 100, 101, 5], Some(100..200));
        assert_eq!(m.wake_token_share, Some(0.5));
        assert_eq!(metrics("x", &k, &[1], None).wake_token_share, None);
    }

    #[test]
    fn known_words_load_the_tokenizer_the_corpus_and_the_dictionary() {
        let dir = std::env::temp_dir().join(format!("w2v-known-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (corpus, dictionary) = (dir.join("corpus.txt"), dir.join("words.txt"));
        std::fs::write(&corpus, "Riverrun, past Eve").unwrap();
        std::fs::write(&dictionary, "  Multiverse \n\ndog\n").unwrap();
        let tok = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-llama/tokenizer.json"
        );
        let t = tokenizers::Tokenizer::from_file(tok).unwrap();
        let k = KnownWords::load(&t, usize::MAX, Some(&corpus), Some(&dictionary)).unwrap();
        let set = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        assert_eq!(k.corpus, set(&["riverrun", "past", "eve"]));
        assert_eq!(k.dictionary, set(&["multiverse", "dog"]));
        assert_eq!(k.base_vocab, KnownWords::from_tokenizer(&t, usize::MAX));
        assert!(!k.base_vocab.is_empty());
        let none = KnownWords::load(&t, 0, None, None).unwrap();
        assert!(none.corpus.is_empty() && none.base_vocab.is_empty() && none.dictionary.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
