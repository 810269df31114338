//! The properties an extended tokenizer must have on a corpus, measured: lossless round trip,
//! no new entry matched inside a longer word, base ids everywhere else, token counts, and how
//! many corpus occurrences of lexicon words it actually covers.

use super::tokenizer::{BaseTokenizer, Extension};
use anyhow::{anyhow, Result};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// What [`check_corpus`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct CorpusReport {
    /// Tokens of the corpus with the base tokenizer.
    pub base_tokens: usize,
    /// Tokens with the extended tokenizer.
    pub tokens: usize,
    /// `decode(encode(text)) == text`, byte for byte.
    pub round_trip: bool,
    /// Tokens that are new entries.
    pub new_tokens: usize,
    /// New-entry tokens that are not a whole word of the text (a letter right before or after
    /// the word, or text different from the entry's word).
    pub in_word_matches: usize,
    /// Every token outside the new-entry tokens has the base tokenizer's id and offsets.
    pub base_identical: bool,
    /// Where the first difference is, when not identical.
    pub first_difference: Option<String>,
    pub coverage: Coverage,
}

/// Occurrences of lexicon words in the corpus (by the lexicon word pattern,
/// [`crate::corpus::words`]) and how many of them the extended tokenizer writes as one token
/// (a new entry or an entry the base already had).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Coverage {
    /// Words whose lower-case form is a lexicon word.
    pub occurrences: usize,
    /// Of those, words written exactly as a lexicon entry (same case).
    pub exact_case: usize,
    /// Of those, words that are one whole-word token.
    pub matched: usize,
}

impl Coverage {
    pub fn fraction(&self) -> f64 {
        self.matched as f64 / self.occurrences.max(1) as f64
    }
}

/// Measures `ext` against `base` on `text`. `lexicon` holds the lexicon's entries as written.
pub fn check_corpus(
    base: &BaseTokenizer,
    ext: &Extension,
    lexicon: &[String],
    text: &str,
) -> Result<CorpusReport> {
    let encode = |t: &tokenizers::Tokenizer| {
        t.encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize the corpus: {e}"))
    };
    let b = encode(&base.tokenizer)?;
    let e = encode(&ext.tokenizer)?;
    let decoded = ext
        .tokenizer
        .decode(e.get_ids(), false)
        .map_err(|e| anyhow!("cannot decode: {e}"))?;

    let word_start = |(a, b): (usize, usize)| a + text[a..b].len() - text[a..b].trim_start().len();
    let is_letter = |c: Option<char>| c.is_some_and(char::is_alphabetic);
    let mut in_word = 0;
    let mut new_tokens = 0;
    let mut new_spans: Vec<(usize, usize)> = Vec::new();
    let existing_ids: HashSet<u32> = ext.existing.values().copied().collect();
    let mut whole_tokens: HashMap<usize, usize> = HashMap::new();
    for (&id, &span) in e.get_ids().iter().zip(e.get_offsets()) {
        let start = word_start(span);
        if ext.is_new(id) {
            new_tokens += 1;
            new_spans.push(span);
            let word = &ext.words[(id - ext.first_id) as usize];
            let before = text[..start].chars().next_back();
            let after = text[span.1..].chars().next();
            if &text[start..span.1] != word || is_letter(before) || is_letter(after) {
                in_word += 1;
            }
        }
        if ext.is_new(id) || existing_ids.contains(&id) {
            whole_tokens.insert(start, span.1);
        }
    }

    // Base tokens outside the new-entry spans, against extended tokens that are not new.
    let mut spans = new_spans.iter().peekable();
    let mut outside_base = Vec::new();
    for (&id, &(a, b)) in b.get_ids().iter().zip(b.get_offsets()) {
        while spans.peek().is_some_and(|s| s.1 <= a) {
            spans.next();
        }
        let overlaps = spans.peek().is_some_and(|s| s.0 < b && a < s.1);
        if !overlaps {
            outside_base.push((id, (a, b)));
        }
    }
    let outside_ext: Vec<(u32, (usize, usize))> = e
        .get_ids()
        .iter()
        .zip(e.get_offsets())
        .filter(|(id, _)| !ext.is_new(**id))
        .map(|(&id, &span)| (id, span))
        .collect();
    let first_difference = outside_base
        .iter()
        .zip(&outside_ext)
        .position(|(x, y)| x != y)
        .or_else(|| {
            (outside_base.len() != outside_ext.len())
                .then_some(outside_base.len().min(outside_ext.len()))
        })
        .map(|i| {
            let show = |v: &[(u32, (usize, usize))]| {
                v.get(i).map_or("nothing".to_string(), |(id, (a, b))| {
                    format!("id {id} {:?}", &text[*a..*b])
                })
            };
            format!(
                "token {i} outside new words: base has {}, extended has {}",
                show(&outside_base),
                show(&outside_ext)
            )
        });

    let lower: HashSet<String> = lexicon.iter().map(|w| w.to_lowercase()).collect();
    let exact: HashSet<&str> = lexicon.iter().map(String::as_str).collect();
    let mut coverage = Coverage {
        occurrences: 0,
        exact_case: 0,
        matched: 0,
    };
    for (at, w) in crate::corpus::words(text) {
        if !lower.contains(&w.to_lowercase()) {
            continue;
        }
        coverage.occurrences += 1;
        coverage.exact_case += exact.contains(w) as usize;
        coverage.matched += (whole_tokens.get(&at) == Some(&(at + w.len()))) as usize;
    }

    Ok(CorpusReport {
        base_tokens: b.len(),
        tokens: e.len(),
        round_trip: decoded == text,
        new_tokens,
        in_word_matches: in_word,
        base_identical: first_difference.is_none(),
        first_difference,
        coverage,
    })
}

impl std::fmt::Display for CorpusReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let change = 100.0 * (self.tokens as f64 / self.base_tokens.max(1) as f64 - 1.0);
        writeln!(
            f,
            "corpus tokens: {} extended, {} base ({change:+.1}%); {} new-word tokens",
            self.tokens, self.base_tokens, self.new_tokens
        )?;
        writeln!(
            f,
            "round trip decode(encode(text)) == text: {}",
            if self.round_trip { "yes" } else { "NO" }
        )?;
        writeln!(
            f,
            "new entries matched inside a longer word: {}",
            self.in_word_matches
        )?;
        match &self.first_difference {
            None => writeln!(
                f,
                "ids outside new words identical to the base tokenizer: yes"
            )?,
            Some(d) => writeln!(
                f,
                "ids outside new words identical to the base tokenizer: NO ({d})"
            )?,
        }
        let c = &self.coverage;
        write!(
            f,
            "lexicon-word occurrences: {} ({} in the lexicon's case), {} written as one token ({:.1}%)",
            c.occurrences,
            c.exact_case,
            c.matched,
            100.0 * c.fraction()
        )
    }
}

/// One row of [`case_table`].
#[derive(Debug, Clone, Serialize)]
pub struct CaseRow {
    pub case: crate::lexicon::Case,
    /// New entries (rows) this choice makes.
    pub new_words: usize,
    pub tokens: usize,
    pub coverage: Coverage,
}

/// Extends `base` with the lexicon under each case choice and measures it on `text`: how many
/// rows each choice costs and what share of the corpus occurrences it covers.
pub fn case_table(
    base: &BaseTokenizer,
    lexicon: &crate::lexicon::Lexicon,
    first_id: u32,
    text: &str,
) -> Result<Vec<CaseRow>> {
    use crate::lexicon::Case;
    [Case::Lower, Case::AsIs, Case::Both]
        .into_iter()
        .map(|case| {
            let ext = super::tokenizer::extend(base, &lexicon.forms(case), first_id)?;
            let r = check_corpus(base, &ext, &lexicon.words, text)?;
            Ok(CaseRow {
                case,
                new_words: ext.words.len(),
                tokens: r.tokens,
                coverage: r.coverage,
            })
        })
        .collect()
}
