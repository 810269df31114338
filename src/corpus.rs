//! Reading and cleaning the corpus text, and the word pattern the lexicon is mined with.
//!
//! Training reads the corpus verbatim (as the original did); [`clean`] is the lexicon builder's
//! cleaning (docs/origin/original-system.md §1.1): NFC, line endings, Project Gutenberg / Faded Page
//! boilerplate, and an optional anchor word before which everything is cut.

use anyhow::{anyhow, Context, Result};
use std::path::Path;
use tokenizers::{NormalizedString, Normalizer};

/// Reads a UTF-8 text file; a file that is not UTF-8 is an error naming the first bad byte.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {}): convert it first, e.g. \
             `iconv -f latin1 -t utf-8`",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Unicode NFC normalization (the `tokenizers` crate's own normalizer).
pub fn nfc(text: &str) -> String {
    // Text below U+0300 has no combining marks and is already NFC.
    if text.chars().all(|c| (c as u32) < 0x300) {
        return text.to_string();
    }
    let mut n = NormalizedString::from(text);
    tokenizers::normalizers::unicode::NFC
        .normalize(&mut n)
        .expect("NFC normalization cannot fail");
    n.get().to_string()
}

/// The lexicon builder's cleaning: NFC, CRLF/CR → LF, header and footer boilerplate removed,
/// everything before the first whole-word, case-insensitive `anchor` cut (when given and
/// found), surrounding whitespace stripped.
pub fn clean(text: &str, anchor: Option<&str>) -> String {
    let text = nfc(text).replace("\r\n", "\n").replace('\r', "\n");
    let mut lines: Vec<&str> = text.split('\n').collect();
    cut_header(&mut lines);
    cut_footer(&mut lines);
    let mut out = lines.join("\n");
    if let Some(anchor) = anchor.filter(|a| !a.is_empty()) {
        if let Some(at) = find_word_ci(&out, anchor) {
            out.drain(..at);
        }
    }
    out.trim().to_string()
}

fn lower(line: &str) -> String {
    line.to_lowercase()
}

/// Drops the header: everything through a `*** START OF THE/THIS PROJECT GUTENBERG EBOOK` line,
/// and the credit blocks ("Produced by", "Faded Page", "A Distributed Proofreaders Canada
/// eBook") up to their first blank line.
fn cut_header(lines: &mut Vec<&str>) {
    if let Some(i) = lines.iter().position(|l| {
        let l = lower(l);
        l.contains("*** start of") && l.contains("project gutenberg")
    }) {
        lines.drain(..=i);
    }
    // Credit blocks near the top, each up to the next blank line.
    let starts = [
        "produced by",
        "a distributed proofreaders canada ebook",
        "faded page",
    ];
    let mut i = 0;
    while i < lines.len().min(200) {
        let l = lower(lines[i].trim());
        if starts.iter().any(|s| l.starts_with(s)) {
            let end = lines[i..]
                .iter()
                .position(|l| l.trim().is_empty())
                .map_or(lines.len(), |p| i + p);
            lines.drain(i..end);
        } else {
            i += 1;
        }
    }
}

/// Drops the footer: from a `*** END OF … PROJECT GUTENBERG EBOOK`, `End of (the) Project
/// Gutenberg` or `Transcriber's Note` line to the end, and any line mentioning "This eBook is
/// made available".
fn cut_footer(lines: &mut Vec<&str>) {
    if let Some(i) = lines.iter().position(|l| {
        let l = lower(l.trim());
        (l.contains("*** end of") && l.contains("project gutenberg"))
            || l.starts_with("end of the project gutenberg")
            || l.starts_with("end of project gutenberg")
            || l.starts_with("transcriber's note")
            || l.starts_with("transcriber’s note")
    }) {
        lines.truncate(i);
    }
    lines.retain(|l| !lower(l).contains("this ebook is made available"));
}

/// Byte offset of the first case-insensitive whole-word occurrence of `word` in `text`.
fn find_word_ci(text: &str, word: &str) -> Option<usize> {
    let needle: Vec<char> = word.chars().flat_map(char::to_lowercase).collect();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    'outer: for start in 0..chars.len() {
        if start > 0 && chars[start - 1].1.is_alphanumeric() {
            continue;
        }
        let mut j = start;
        for &n in &needle {
            match chars.get(j) {
                Some(&(_, c)) if c.to_lowercase().eq(std::iter::once(n)) => j += 1,
                _ => continue 'outer,
            }
        }
        if chars.get(j).is_some_and(|&(_, c)| c.is_alphanumeric()) {
            continue;
        }
        return Some(chars[start].0);
    }
    None
}

/// A letter of the original's word pattern: `A–Z a–z À–Ö Ø–ö ø–ÿ` (Latin-1 letters without
/// × and ÷).
pub fn is_word_letter(c: char) -> bool {
    c.is_ascii_alphabetic() || matches!(c, 'À'..='Ö' | 'Ø'..='ö' | 'ø'..='ÿ')
}

/// A joiner allowed between letters inside a word: `'`, `’`, `-`.
pub fn is_joiner(c: char) -> bool {
    matches!(c, '\'' | '’' | '-')
}

/// The words of `text` by the original's pattern (docs/origin/original-system.md §1.2): one or more
/// letters, optionally followed by groups of one joiner plus more letters. Yields
/// `(byte offset, word)`.
pub fn words(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let bytes_len = text.len();
    let mut it = text.char_indices().peekable();
    std::iter::from_fn(move || {
        // Skip to the next letter.
        let (start, _) = loop {
            let (i, c) = it.next()?;
            if is_word_letter(c) {
                break (i, c);
            }
        };
        let mut end = bytes_len;
        loop {
            match it.peek().copied() {
                Some((_, c)) if is_word_letter(c) => {
                    it.next();
                }
                Some((i, c)) if is_joiner(c) => {
                    // A joiner counts only when a letter follows it.
                    let after = text[i + c.len_utf8()..].chars().next();
                    if after.is_some_and(is_word_letter) {
                        it.next();
                    } else {
                        end = i;
                        break;
                    }
                }
                Some((i, _)) => {
                    end = i;
                    break;
                }
                None => break,
            }
        }
        Some((start, &text[start..end]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_the_original_pattern() {
        let text =
            "riverrun, past Eve and Adam's, fr'over the passen-core œuvre 1922–1939 naïve- ‘tis x";
        let got: Vec<&str> = words(text).map(|(_, w)| w).collect();
        assert_eq!(
            got,
            [
                "riverrun",
                "past",
                "Eve",
                "and",
                "Adam's",
                "fr'over",
                "the",
                "passen-core",
                "uvre",
                "naïve",
                "tis",
                "x"
            ]
        );
        for (at, w) in words(text) {
            assert_eq!(&text[at..at + w.len()], w);
        }
    }

    #[test]
    fn nfc_composes() {
        assert_eq!(nfc("cafe\u{301}"), "café");
        assert_eq!(nfc("plain"), "plain");
    }

    #[test]
    fn clean_strips_boilerplate_and_anchors() {
        let text = "The Project Gutenberg eBook\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n\
                    Produced by someone\r\nand friends\r\n\r\nFinnegans Wake\r\n\r\nriverrun, past Eve\r\n\
                    and Adam's.\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicense text\r\n";
        assert_eq!(
            clean(text, Some("riverrun")),
            "riverrun, past Eve\nand Adam's."
        );
        assert_eq!(
            clean(text, None),
            "Finnegans Wake\n\nriverrun, past Eve\nand Adam's."
        );
        // An anchor inside another word does not count; a missing anchor cuts nothing.
        assert_eq!(clean("xriverrun riverrun", Some("RIVERRUN")), "riverrun");
        assert_eq!(clean("abc", Some("riverrun")), "abc");
    }
}
