//! Morpheme data: affixes with example words, the group files of the original
//! (docs/origin/original-system.md §1.7), automatic affix mining from a lexicon, and the greedy
//! longest-match decomposition (§5.6) with the root kept non-empty.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// `morpheme_data.json`: `{"prefixes": {prefix: [example words]}, "suffixes": {suffix: [...]}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MorphemeData {
    pub prefixes: BTreeMap<String, Vec<String>>,
    pub suffixes: BTreeMap<String, Vec<String>>,
}

/// One line of `wake_embedding_groups.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MorphemeGroup {
    /// As written in the file, e.g. `"-ing"` or `"un-"`.
    pub morpheme: String,
    /// `"prefix"`, `"suffix"`, or another label (infix, …).
    pub morpheme_type: String,
    pub examples: Vec<String>,
    /// Parallel to `examples`: the stem of each example (may be absent).
    #[serde(default)]
    pub bases: Vec<String>,
    #[serde(default)]
    pub n_examples: Option<usize>,
}

/// One line of `device_groups.jsonl`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceGroupLine {
    device: String,
    examples: Vec<String>,
}

/// One line of `device_classification.jsonl`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceLabelLine {
    text: String,
    label: String,
}

const MORPHEME_DATA_SHAPE: &str =
    r#"{"prefixes": {"un": ["word", ...]}, "suffixes": {"ing": ["word", ...]}}"#;

impl MorphemeData {
    /// Reads morpheme data: a `.jsonl` file is read as `wake_embedding_groups.jsonl` (prefix and
    /// suffix groups kept, others ignored), anything else as `morpheme_data.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let is_jsonl = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
        let data = if is_jsonl {
            Self::from_groups(&load_groups(path)?)
        } else {
            let text = crate::corpus::read_text(path)?;
            serde_json::from_str::<MorphemeData>(&text).map_err(|e| {
                anyhow!(
                    "{} is not valid morpheme data ({e}); expected {MORPHEME_DATA_SHAPE}",
                    path.display()
                )
            })?
        };
        data.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(data)
    }

    /// Prefix and suffix groups as morpheme data; the `-` marking the attachment side is
    /// dropped and affixes are lower-cased.
    pub fn from_groups(groups: &[MorphemeGroup]) -> Self {
        let mut data = MorphemeData::default();
        for g in groups {
            let affix = g.morpheme.trim().trim_matches('-').to_lowercase();
            let map = match g.morpheme_type.as_str() {
                "prefix" => &mut data.prefixes,
                "suffix" => &mut data.suffixes,
                _ => continue,
            };
            let examples = map.entry(affix).or_default();
            examples.extend(g.examples.iter().cloned());
            examples.sort();
            examples.dedup();
        }
        data
    }

    /// Checks that no affix is empty or contains whitespace and that there is at least one.
    pub fn validate(&self) -> Result<()> {
        if self.prefixes.is_empty() && self.suffixes.is_empty() {
            bail!("the morpheme data has no prefixes and no suffixes");
        }
        for (kind, map) in [("prefix", &self.prefixes), ("suffix", &self.suffixes)] {
            for affix in map.keys() {
                if affix.is_empty() || affix.chars().any(char::is_whitespace) {
                    bail!("{kind} {affix:?} is empty or contains whitespace");
                }
            }
        }
        Ok(())
    }

    /// Writes `morpheme_data.json` (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        crate::util::fs::write(path, json.as_bytes())
    }
}

/// Reads `wake_embedding_groups.jsonl`: one [`MorphemeGroup`] per non-blank line.
pub fn load_groups(path: &Path) -> Result<Vec<MorphemeGroup>> {
    read_jsonl(
        path,
        "a morpheme group {\"morpheme\", \"morpheme_type\", \"examples\", …}",
    )
}

/// Reads device groups, `label → words`, from `device_groups.jsonl`
/// (`{"device", "examples"}` per line) or `device_classification.jsonl` (`{"text", "label"}`).
pub fn load_device_groups(path: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    Ok(load_device_groups_in_order(path)?.into_iter().collect())
}

/// The device groups of [`load_device_groups`] in the order their labels first appear in the
/// file (lines with the same label are one group).
pub fn load_device_groups_in_order(path: &Path) -> Result<Vec<(String, Vec<String>)>> {
    let text = crate::corpus::read_text(path)?;
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let lines: Vec<(String, Vec<String>)> = if first.contains("\"label\"") {
        let lines: Vec<DeviceLabelLine> =
            parse_jsonl(&text, path, "{\"text\": word, \"label\": device}")?;
        lines.into_iter().map(|l| (l.label, vec![l.text])).collect()
    } else {
        let lines: Vec<DeviceGroupLine> =
            parse_jsonl(&text, path, "{\"device\": label, \"examples\": [words]}")?;
        lines.into_iter().map(|l| (l.device, l.examples)).collect()
    };
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for (label, words) in lines {
        match groups.iter_mut().find(|(l, _)| *l == label) {
            Some((_, w)) => w.extend(words),
            None => groups.push((label, words)),
        }
    }
    if groups.is_empty() {
        bail!("{} has no device groups", path.display());
    }
    Ok(groups)
}

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path, shape: &str) -> Result<Vec<T>> {
    let text = crate::corpus::read_text(path)?;
    let items = parse_jsonl(&text, path, shape)?;
    if items.is_empty() {
        bail!("{} has no JSON lines", path.display());
    }
    Ok(items)
}

fn parse_jsonl<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
    shape: &str,
) -> Result<Vec<T>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                anyhow!(
                    "{} line {}: {e}; each line must be {shape}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// A word split into `prefix | root | suffix` (lower-cased); prefix and suffix may be empty,
/// the root never is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decomposition {
    pub prefix: String,
    pub root: String,
    pub suffix: String,
}

impl std::fmt::Display for Decomposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}|{}|{}", self.prefix, self.root, self.suffix)
    }
}

/// Greedy longest-match decomposition over a fixed affix inventory.
#[derive(Debug, Clone)]
pub struct Decomposer {
    prefixes: Vec<(usize, String)>,
    suffixes: Vec<(usize, String)>,
}

impl Decomposer {
    /// Affixes are tried longest first (in characters), ties alphabetically.
    pub fn new(data: &MorphemeData) -> Self {
        let sorted = |map: &BTreeMap<String, Vec<String>>| {
            let mut v: Vec<(usize, String)> = map
                .keys()
                .map(|a| a.to_lowercase())
                .map(|a| (a.chars().count(), a))
                .collect();
            v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            v.dedup();
            v
        };
        Decomposer {
            prefixes: sorted(&data.prefixes),
            suffixes: sorted(&data.suffixes),
        }
    }

    /// The longest prefix the (lower-cased) word starts with that leaves a non-empty rest,
    /// then the longest suffix it ends with that leaves a non-empty root.
    pub fn decompose(&self, word: &str) -> Decomposition {
        let w = word.to_lowercase();
        let n = w.chars().count();
        let prefix = self
            .prefixes
            .iter()
            .find(|(len, p)| *len < n && w.starts_with(p.as_str()))
            .map_or("", |(_, p)| p.as_str());
        let used = prefix.chars().count();
        let rest = &w[prefix.len()..];
        let suffix = self
            .suffixes
            .iter()
            .find(|(len, s)| used + *len < n && rest.ends_with(s.as_str()))
            .map_or("", |(_, s)| s.as_str());
        Decomposition {
            prefix: prefix.to_string(),
            root: rest[..rest.len() - suffix.len()].to_string(),
            suffix: suffix.to_string(),
        }
    }
}

/// Options of [`mine_affixes`].
#[derive(Debug, Clone, Copy)]
pub struct AffixOptions {
    /// Prefixes to keep, and as many suffixes.
    pub count: usize,
    /// Example words kept per affix.
    pub examples: usize,
    pub min_len: usize,
    pub max_len: usize,
    /// Characters an example must keep besides the affix.
    pub min_stem: usize,
}

impl Default for AffixOptions {
    fn default() -> Self {
        AffixOptions {
            count: 15,
            examples: 10,
            min_len: 2,
            max_len: 5,
            min_stem: 3,
        }
    }
}

/// Derives morpheme data from a word list. An affix candidate is a string of
/// `min_len..=max_len` letters, with a vowel, that starts (or ends) words leaving at least
/// `min_stem` characters. Two signals make a morpheme: the stem left over is itself a word
/// (`known(stem)` — the lexicon and, from the CLI, the base model's whole-word tokens), and
/// many different letters follow the prefix / precede the suffix (successor variety, Harris),
/// which rules out the inside of a longer affix (`ng` of `-ing`). With `n` words carrying the
/// candidate, `k` of them with a known stem, and `H` the entropy (bits) of the boundary letter:
///
/// `score = k · (k / n) · H`
///
/// (the share `k / n` keeps word onsets such as `co-`, frequent but rarely followed by a word,
/// out). The `count` best of each kind are kept, ties alphabetically, each with its first
/// `examples` words that have a known stem, then others, in list order (stored sorted).
pub fn mine_affixes(
    words: &[String],
    known: &dyn Fn(&str) -> bool,
    options: AffixOptions,
) -> MorphemeData {
    let lower: Vec<Vec<char>> = words
        .iter()
        .map(|w| w.to_lowercase().chars().collect())
        .collect();
    let pick = |suffix: bool| -> BTreeMap<String, Vec<String>> {
        #[derive(Default)]
        struct Stats {
            boundary: HashMap<char, usize>,
            with_known_stem: Vec<usize>,
            others: Vec<usize>,
        }
        let mut stats: HashMap<String, Stats> = HashMap::new();
        for (i, w) in lower.iter().enumerate() {
            for len in options.min_len..=options.max_len {
                if w.len() < len + options.min_stem {
                    break;
                }
                let (affix, stem, boundary): (&[char], &[char], char) = if suffix {
                    let cut = w.len() - len;
                    (&w[cut..], &w[..cut], w[cut - 1])
                } else {
                    (&w[..len], &w[len..], w[len])
                };
                if !affix.iter().all(|c| c.is_alphabetic()) || !affix.iter().any(|&c| is_vowel(c)) {
                    continue;
                }
                let entry = stats.entry(affix.iter().collect()).or_default();
                *entry.boundary.entry(boundary).or_default() += 1;
                if known(&stem.iter().collect::<String>()) {
                    entry.with_known_stem.push(i);
                } else {
                    entry.others.push(i);
                }
            }
        }
        let mut scored: Vec<(f64, String, Vec<usize>)> = stats
            .into_iter()
            .map(|(affix, st)| {
                let n = (st.with_known_stem.len() + st.others.len()) as f64;
                let k = st.with_known_stem.len() as f64;
                let entropy: f64 = st
                    .boundary
                    .values()
                    .map(|&c| {
                        let p = c as f64 / n;
                        -p * p.log2()
                    })
                    .sum();
                let order = st.with_known_stem.into_iter().chain(st.others).collect();
                (k * (k / n) * entropy, affix, order)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored
            .into_iter()
            .take(options.count)
            .map(|(_, affix, order)| {
                let mut examples: Vec<String> = Vec::new();
                for i in order {
                    let w = &words[i];
                    if !examples.contains(w) {
                        examples.push(w.clone());
                    }
                    if examples.len() == options.examples {
                        break;
                    }
                }
                examples.sort();
                (affix, examples)
            })
            .collect()
    };
    MorphemeData {
        prefixes: pick(false),
        suffixes: pick(true),
    }
}

fn is_vowel(c: char) -> bool {
    matches!(
        c,
        'a' | 'e'
            | 'i'
            | 'o'
            | 'u'
            | 'y'
            | 'à'..='æ'
            | 'è'..='ï'
            | 'ò'..='ö'
            | 'ø'..='ü'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(prefixes: &[&str], suffixes: &[&str]) -> MorphemeData {
        MorphemeData {
            prefixes: prefixes.iter().map(|p| (p.to_string(), vec![])).collect(),
            suffixes: suffixes.iter().map(|s| (s.to_string(), vec![])).collect(),
        }
    }

    #[test]
    fn greedy_longest_match_keeps_the_root() {
        let d = Decomposer::new(&data(&["un", "unde", "re"], &["ing", "g", "ings"]));
        let split = |w: &str| d.decompose(w).to_string();
        assert_eq!(split("undoings"), "un|do|ings");
        assert_eq!(split("underthing"), "unde|rth|ing");
        assert_eq!(split("Rerunning"), "re|runn|ing");
        // The prefix may not eat the whole word, nor prefix + suffix.
        assert_eq!(split("un"), "|un|");
        assert_eq!(split("unde"), "un|de|");
        assert_eq!(split("uning"), "un|in|g");
        assert_eq!(split("ing"), "|in|g");
        assert_eq!(split("riverrun"), "|riverrun|");
    }

    #[test]
    fn mines_productive_affixes() {
        let words: Vec<String> = [
            "unhappy", "undone", "unkind", "unless", "unmade", "untold", "rebuild", "remade",
            "retold", "rethink", "cobalt", "cocoa", "cotton", "cobweb", "colour", "copper",
            "holding", "thinking", "building", "telling", "running", "sitting", "going",
        ]
        .iter()
        .map(|w| w.to_string())
        .collect();
        let stems = [
            "happy", "done", "kind", "made", "told", "build", "think", "web", "hold", "tell",
        ];
        let known = |s: &str| stems.contains(&s);
        let options = AffixOptions {
            count: 2,
            examples: 3,
            ..AffixOptions::default()
        };
        let m = mine_affixes(&words, &known, options);
        // co- starts six words with five different next letters, but leaves no known word.
        assert_eq!(m.prefixes.keys().collect::<Vec<_>>(), ["re", "un"]);
        // Examples with a known stem come first.
        assert_eq!(m.prefixes["un"], ["undone", "unhappy", "unkind"]);
        assert!(m.suffixes.contains_key("ing"), "{:?}", m.suffixes);
        assert!(!m.suffixes.contains_key("ng"), "{:?}", m.suffixes);
        assert_eq!(m.suffixes["ing"], ["building", "holding", "thinking"]);
    }

    #[test]
    fn reads_morpheme_json_and_groups_and_refuses_malformed_files() {
        let dir = std::env::temp_dir().join(format!("wake2vec-morph-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("morpheme_data.json");
        std::fs::write(
            &json,
            r#"{"prefixes": {"un": ["undo"]}, "suffixes": {"ing": []}}"#,
        )
        .unwrap();
        let m = MorphemeData::load(&json).unwrap();
        assert_eq!(m.prefixes["un"], ["undo"]);

        let groups = dir.join("groups.jsonl");
        std::fs::write(
            &groups,
            "{\"morpheme\": \"-ing\", \"morpheme_type\": \"suffix\", \"examples\": [\"Acting\", \"acknowledging\"], \"bases\": [\"Act\", \"acknowledg\"], \"n_examples\": 2}\n\n\
             {\"morpheme\": \"un-\", \"morpheme_type\": \"prefix\", \"examples\": [\"undone\"]}\n\
             {\"morpheme\": \"-x-\", \"morpheme_type\": \"infix\", \"examples\": []}\n",
        )
        .unwrap();
        let m = MorphemeData::load(&groups).unwrap();
        assert_eq!(m.suffixes["ing"], ["Acting", "acknowledging"]);
        assert_eq!(m.prefixes["un"], ["undone"]);
        assert_eq!(
            load_groups(&groups).unwrap()[0].bases,
            ["Act", "acknowledg"]
        );

        let devices = dir.join("device_groups.jsonl");
        std::fs::write(
            &devices,
            "{\"device\": \"pun\", \"examples\": [\"a\", \"b\"]}\n{\"device\": \"nonce\", \"examples\": [\"c\"]}\n",
        )
        .unwrap();
        let d = load_device_groups(&devices).unwrap();
        assert_eq!(d["pun"], ["a", "b"]);
        let labels = dir.join("device_classification.jsonl");
        std::fs::write(
            &labels,
            "{\"text\": \"a\", \"label\": \"pun\"}\n{\"text\": \"b\", \"label\": \"pun\"}\n",
        )
        .unwrap();
        assert_eq!(load_device_groups(&labels).unwrap()["pun"], ["a", "b"]);

        let bad = [
            (
                r#"{"prefixes": {"un": "undo"}, "suffixes": {}}"#,
                "is not valid morpheme data",
            ),
            (r#"{"prefixes": {}}"#, "is not valid morpheme data"),
            (
                r#"{"prefixes": {}, "suffixes": {}, "infixes": {}}"#,
                "unknown field",
            ),
            (
                r#"{"prefixes": {}, "suffixes": {}}"#,
                "has no prefixes and no suffixes",
            ),
            (
                r#"{"prefixes": {"": []}, "suffixes": {}}"#,
                "prefix \"\" is empty",
            ),
            ("[1, 2", "is not valid morpheme data"),
        ];
        for (text, expected) in bad {
            std::fs::write(&json, text).unwrap();
            let err = format!("{:#}", MorphemeData::load(&json).unwrap_err());
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        std::fs::write(&groups, "{\"morpheme\": \"-ing\"}\n").unwrap();
        let err = format!("{:#}", MorphemeData::load(&groups).unwrap_err());
        assert!(err.contains("groups.jsonl line 1: missing field"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
