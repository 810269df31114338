//! Mining a lexicon from a corpus with a model-aware novelty rule.
//!
//! The original (docs/origin/original-system.md §1.2) kept words that are rare in English by `wordfreq`'s
//! Zipf frequency. Here a word is novel when the base model's tokenizer cannot write it as one
//! word-start token; its novelty is the number of extra tokens it costs, `pieces − 1`. The
//! score keeps the original's multipliers:
//!
//! `score = (pieces − 1) × (1 + 0.10·[freq ≥ 5]) × (1 + 0.20·[non-ASCII]) × (1 + 0.15·[length ≥ 8])`
//!
//! Candidates come from the original's word pattern ([`crate::corpus::words`]), lower-cased,
//! at least `min_length` characters, at least `min_freq` occurrences, not in the stop list.
//! They are sorted by score, then frequency, then length (all descending), then alphabetically.

use anyhow::Result;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// Filters of [`mine`].
#[derive(Debug, Clone)]
pub struct MineOptions {
    /// Minimum number of occurrences in the corpus (lower-cased).
    pub min_freq: usize,
    /// Minimum length in characters.
    pub min_length: usize,
    /// Lower-case words never to keep.
    pub stop: HashSet<String>,
}

impl Default for MineOptions {
    fn default() -> Self {
        // min_freq 1 is what the original's code used (its docstring says 2).
        MineOptions {
            min_freq: 1,
            min_length: 3,
            stop: HashSet::new(),
        }
    }
}

/// One mined word with the numbers behind its score (a row of the CSV).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub word: String,
    pub freq: usize,
    /// Tokens the base tokenizer needs for the word at a word start.
    pub pieces: usize,
    /// Length in characters.
    pub length: usize,
    pub nonascii: bool,
    pub score: f64,
}

/// What [`mine`] found, with the counts of what it dropped.
#[derive(Debug, Clone)]
pub struct Mined {
    pub candidates: Vec<Candidate>,
    /// Distinct lower-cased word types in the corpus.
    pub types: usize,
    pub too_short: usize,
    pub too_rare: usize,
    pub stopped: usize,
    /// Words the base tokenizer already writes as one word-start token.
    pub single_token: usize,
}

/// Mines candidate words from `text` (already cleaned). `pieces(word)` is the number of base
/// tokens of `word` at a word start.
pub fn mine(
    text: &str,
    options: &MineOptions,
    pieces: &dyn Fn(&str) -> Result<usize>,
) -> Result<Mined> {
    let mut freq: HashMap<String, usize> = HashMap::new();
    for (_, w) in crate::corpus::words(text) {
        *freq.entry(w.to_lowercase()).or_default() += 1;
    }
    let mut mined = Mined {
        candidates: Vec::new(),
        types: freq.len(),
        too_short: 0,
        too_rare: 0,
        stopped: 0,
        single_token: 0,
    };
    let mut types: Vec<(String, usize)> = freq.into_iter().collect();
    types.sort();
    for (word, freq) in types {
        let length = word.chars().count();
        if length < options.min_length {
            mined.too_short += 1;
            continue;
        }
        if freq < options.min_freq {
            mined.too_rare += 1;
            continue;
        }
        if options.stop.contains(&word) {
            mined.stopped += 1;
            continue;
        }
        let pieces = pieces(&word)?;
        if pieces <= 1 {
            mined.single_token += 1;
            continue;
        }
        let nonascii = !word.is_ascii();
        let score = (pieces - 1) as f64
            * if freq >= 5 { 1.10 } else { 1.0 }
            * if nonascii { 1.20 } else { 1.0 }
            * if length >= 8 { 1.15 } else { 1.0 };
        mined.candidates.push(Candidate {
            word,
            freq,
            pieces,
            length,
            nonascii,
            score,
        });
    }
    mined.candidates.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.freq.cmp(&a.freq))
            .then(b.length.cmp(&a.length))
            .then(a.word.cmp(&b.word))
    });
    Ok(mined)
}

/// The candidates as CSV: `word,freq,pieces,length,nonascii,score` (words are quoted when they
/// contain a comma or a quote).
pub fn to_csv(candidates: &[Candidate]) -> String {
    let mut out = String::from("word,freq,pieces,length,nonascii,score\n");
    for c in candidates {
        let word = if c.word.contains([',', '"']) {
            format!("\"{}\"", c.word.replace('"', "\"\""))
        } else {
            c.word.clone()
        };
        out.push_str(&format!(
            "{word},{},{},{},{},{:.4}\n",
            c.freq, c.pieces, c.length, c.nonascii as u8, c.score
        ));
    }
    out
}

/// How two word lists overlap.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overlap {
    pub ours: usize,
    pub theirs: usize,
    pub common: usize,
    /// `common / |ours ∪ theirs|`.
    pub jaccard: f64,
}

/// Overlap of two word lists, compared as sets.
pub fn overlap(ours: &[String], theirs: &[String]) -> Overlap {
    let a: HashSet<&str> = ours.iter().map(String::as_str).collect();
    let b: HashSet<&str> = theirs.iter().map(String::as_str).collect();
    let common = a.intersection(&b).count();
    let union = a.len() + b.len() - common;
    Overlap {
        ours: a.len(),
        theirs: b.len(),
        common,
        jaccard: if union == 0 {
            0.0
        } else {
            common as f64 / union as f64
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in tokenizer: words of up to 4 characters are one token, longer ones cost one
    /// token per 4 characters.
    fn pieces(w: &str) -> Result<usize> {
        Ok(w.chars().count().div_ceil(4))
    }

    #[test]
    fn mines_filters_and_scores() {
        let text =
            "Riverrun riverrun riverrun riverrun riverrun, the bababadal bababadal tauftauf \
                    paùpulation of it xy stopword stopword";
        let options = MineOptions {
            min_freq: 1,
            min_length: 3,
            stop: HashSet::from(["stopword".to_string()]),
        };
        let mined = mine(text, &options, &pieces).unwrap();
        let words: Vec<&str> = mined.candidates.iter().map(|c| c.word.as_str()).collect();
        // paùpulation: 3 pieces → novelty 2 × 1.2 × 1.15; bababadal 3 pieces → 2 × 1.15;
        // riverrun: 2 pieces, freq 5 → 1 × 1.1 × 1.15; tauftauf: 2 pieces → 1 × 1.15.
        assert_eq!(words, ["paùpulation", "bababadal", "riverrun", "tauftauf"]);
        let r = &mined.candidates[2];
        assert_eq!((r.freq, r.pieces, r.length), (5, 2, 8));
        assert!((r.score - 1.1 * 1.15).abs() < 1e-12);
        assert!((mined.candidates[0].score - 2.0 * 1.2 * 1.15).abs() < 1e-12);
        assert_eq!(mined.too_short, 3); // of, it, xy
        assert_eq!(mined.stopped, 1);
        assert_eq!(mined.single_token, 1); // the
        let rare = mine(
            text,
            &MineOptions {
                min_freq: 2,
                ..options
            },
            &pieces,
        )
        .unwrap();
        let words: Vec<&str> = rare.candidates.iter().map(|c| c.word.as_str()).collect();
        assert_eq!(words, ["bababadal", "riverrun"]);
        let csv = to_csv(&mined.candidates);
        assert!(csv
            .starts_with("word,freq,pieces,length,nonascii,score\npaùpulation,1,3,11,1,2.7600\n"));
    }

    #[test]
    fn overlap_counts_sets() {
        let a = vec!["x".to_string(), "y".to_string(), "z".to_string()];
        let b = vec![
            "y".to_string(),
            "z".to_string(),
            "w".to_string(),
            "y".to_string(),
        ];
        let o = overlap(&a, &b);
        assert_eq!((o.ours, o.theirs, o.common), (3, 3, 2));
        assert!((o.jaccard - 0.5).abs() < 1e-12);
    }
}
