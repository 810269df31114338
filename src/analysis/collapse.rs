//! Where the Wake rows land among the base rows, from the nearest base rows of every Wake row:
//! - collapse: the share of Wake rows whose nearest base row is a byte token (`<0x..>` byte
//!   fallback in SentencePiece, a single-byte piece in byte-level BPE) at a cosine above a
//!   threshold (the seed read ~60% "collapsed onto the byte-token cluster" off a sample);
//! - hubness: the k-occurrence of each base row (how many Wake rows have it among their `k`
//!   nearest base rows) and the skewness of that distribution (Radovanović et al., JMLR 2010):
//!   a few base rows that are everybody's neighbour give a large positive skew.

use super::{neighbours, stats, Embeddings, Layout, Vocabulary};
use anyhow::Result;
use serde::Serialize;

/// Knobs of the stage.
#[derive(Debug, Clone, Copy)]
pub struct CollapseOptions {
    /// The cosine above which a Wake row counts as collapsed onto its byte token.
    pub threshold: f64,
    /// Neighbours per Wake row for the k-occurrence.
    pub k: usize,
}

impl Default for CollapseOptions {
    fn default() -> Self {
        Self {
            threshold: 0.9,
            k: 10,
        }
    }
}

/// A Wake row whose nearest base row is a byte token.
#[derive(Debug, Clone, Serialize)]
pub struct Collapsed {
    pub id: usize,
    pub word: String,
    pub byte_id: usize,
    /// The byte token as the vocabulary spells it (`<0xE2>`, `Ã`).
    pub byte_piece: String,
    pub cos: f64,
}

/// The collapse measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Collapse {
    pub threshold: f64,
    /// Base rows that are byte tokens.
    pub byte_tokens: usize,
    pub wake_rows: usize,
    /// Wake rows whose nearest base row is a byte token, at any cosine.
    pub nearest_is_byte: usize,
    /// ... and at a cosine above the threshold.
    pub collapsed: usize,
    /// `collapsed / wake_rows`.
    pub share: f64,
    /// The collapsed rows with the highest cosine (all of them are in `collapse.tsv`).
    pub top: Vec<Collapsed>,
}

/// A base row and how often it is a neighbour.
#[derive(Debug, Clone, Serialize)]
pub struct Hub {
    pub id: usize,
    pub word: String,
    pub count: usize,
}

/// The k-occurrence distribution over the base rows.
#[derive(Debug, Clone, Serialize)]
pub struct Hubness {
    pub k: usize,
    /// Skewness (third standardized moment, population, as `scipy.stats.skew`).
    pub skewness: f64,
    /// Mean k-occurrence: `k × wake rows / base rows`.
    pub mean: f64,
    pub max: usize,
    /// Base rows that are nobody's neighbour ("anti-hubs").
    pub never_share: f64,
    /// The base rows most often a neighbour.
    pub top: Vec<Hub>,
}

/// What the stage measured, and every collapsed row (for `collapse.tsv`).
pub struct Crowding {
    pub collapse: Option<Collapse>,
    pub hubness: Hubness,
    pub collapsed: Vec<Collapsed>,
}

/// Wake rows per block of products (`block × base rows` cosines at a time).
const BLOCK: usize = 512;
/// Entries of the `top` lists in summary.json.
const TOP: usize = 20;

/// The nearest `k` base rows of every Wake row; collapse needs the tokenizer (to know the byte
/// tokens) and is `None` without one.
pub fn crowding(
    e: &Embeddings,
    layout: &Layout,
    vocab: &Vocabulary,
    opts: CollapseOptions,
) -> Result<Crowding> {
    let base = layout.base_vocab;
    let k = opts.k.clamp(1, base);
    let bytes = vocab.byte_tokens(base);
    let mut counts = vec![0usize; base];
    let mut nearest_is_byte = 0;
    let mut collapsed = Vec::new();
    let wake: Vec<usize> = layout.wake().collect();
    for ids in wake.chunks(BLOCK) {
        for (&id, nb) in ids.iter().zip(neighbours::nearest_base(e, base, ids, k)?) {
            for &(j, _) in &nb {
                counts[j] += 1;
            }
            let Some(&(j, cos)) = nb.first() else {
                continue;
            };
            if bytes.as_ref().is_some_and(|b| b[j]) {
                nearest_is_byte += 1;
                if cos > opts.threshold {
                    collapsed.push(Collapsed {
                        id,
                        word: vocab.word(id),
                        byte_id: j,
                        byte_piece: vocab.piece(j),
                        cos,
                    });
                }
            }
        }
    }
    collapsed.sort_by(|a, b| b.cos.total_cmp(&a.cos).then(a.id.cmp(&b.id)));
    let collapse = bytes.map(|b| Collapse {
        threshold: opts.threshold,
        byte_tokens: b.iter().filter(|&&x| x).count(),
        wake_rows: wake.len(),
        nearest_is_byte,
        collapsed: collapsed.len(),
        share: collapsed.len() as f64 / wake.len().max(1) as f64,
        top: collapsed.iter().take(TOP).cloned().collect(),
    });
    Ok(Crowding {
        collapse,
        hubness: hubness(&counts, k, vocab),
        collapsed,
    })
}

/// The k-occurrence summary of `counts` (one per base row).
fn hubness(counts: &[usize], k: usize, vocab: &Vocabulary) -> Hubness {
    let x: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    let (mean, var) = stats::mean_var(&x, 0);
    let m3 = x.iter().map(|v| (v - mean).powi(3)).sum::<f64>() / x.len().max(1) as f64;
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    Hubness {
        k,
        skewness: if var > 0.0 { m3 / var.powf(1.5) } else { 0.0 },
        mean,
        max: counts.iter().copied().max().unwrap_or(0),
        never_share: counts.iter().filter(|&&c| c == 0).count() as f64 / counts.len().max(1) as f64,
        top: order
            .into_iter()
            .take(TOP)
            .filter(|&i| counts[i] > 0)
            .map(|i| Hub {
                id: i,
                word: vocab.word(i),
                count: counts[i],
            })
            .collect(),
    }
}

/// `collapse.tsv`: every collapsed row, highest cosine first.
pub fn tsv(rows: &[Collapsed]) -> String {
    let mut s = String::from("wake_id\tword\tbyte_id\tbyte_piece\tcos\n");
    for r in rows {
        let clean = |t: &str| t.replace(['\t', '\n', '\r'], " ");
        s += &format!(
            "{}\t{}\t{}\t{}\t{:.6}\n",
            r.id,
            clean(&r.word),
            r.byte_id,
            clean(&r.byte_piece),
            r.cos
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A four-piece BPE: `<0x41>` (byte fallback), `a`, `b`, `ab`, with `pre` as pre-tokenizer.
    fn tokenizer(pre: &str) -> tokenizers::Tokenizer {
        let json = format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{pre},"post_processor":null,"decoder":null,
            "model":{{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
            "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":true,
            "vocab":{{"<0x41>":0,"a":1,"b":2,"ab":3}},"merges":["a b"]}}}}"#
        );
        json.parse().unwrap()
    }

    #[test]
    fn byte_tokens_by_family_and_collapse_finds_them() {
        let sp = tokenizer("null");
        let bl = tokenizer(
            r#"{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}"#,
        );
        assert_eq!(crate::vocab::tokenizer::byte_token_ids(&sp), vec![0]);
        assert_eq!(crate::vocab::tokenizer::byte_token_ids(&bl), vec![0, 1, 2]);
        // base rows: axes; Wake row 4 lies on the byte token's axis, row 5 near `ab`'s
        let dim = 4;
        let mut data = vec![0f32; 6 * dim];
        for i in 0..4 {
            data[i * dim + i] = 1.0;
        }
        data[4 * dim..5 * dim].copy_from_slice(&[2.0, 0.1, 0.0, 0.0]);
        data[5 * dim..].copy_from_slice(&[0.0, 0.5, 0.0, 1.0]);
        let e = Embeddings::new(data, 6, dim).unwrap();
        let layout = Layout {
            base_vocab: 4,
            wake_start: 4,
            wake_count: 2,
            words: vec!["wa".into(), "wb".into()],
        };
        let vocab = Vocabulary {
            layout: &layout,
            tokenizer: Some(&sp),
        };
        let opts = CollapseOptions {
            threshold: 0.9,
            k: 2,
        };
        let c = crowding(&e, &layout, &vocab, opts).unwrap();
        let col = c.collapse.unwrap();
        assert_eq!(
            (col.byte_tokens, col.collapsed, col.nearest_is_byte),
            (1, 1, 1)
        );
        assert_eq!((col.share, c.collapsed[0].id), (0.5, 4));
        assert_eq!(c.collapsed[0].byte_piece, "<0x41>");
        // k = 2: row 4 → 0, 1; row 5 → 3, 1
        assert_eq!(c.hubness.max, 2);
        assert_eq!(c.hubness.top[0].id, 1);
        let tsv = tsv(&c.collapsed);
        assert!(tsv
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("4\twa\t0\t<0x41>\t0.99"));
        // without a tokenizer: no collapse, still hubness
        let plain = Vocabulary {
            layout: &layout,
            tokenizer: None,
        };
        let c = crowding(&e, &layout, &plain, opts).unwrap();
        assert!(c.collapse.is_none() && c.collapsed.is_empty());
    }

    #[test]
    fn skewness_is_scipys() {
        // scipy.stats.skew([0, 0, 0, 1, 9]) (bias=True: population moments) = 1.4565472846
        let vocab_layout = Layout {
            base_vocab: 5,
            wake_start: 5,
            wake_count: 0,
            words: vec![],
        };
        let vocab = Vocabulary {
            layout: &vocab_layout,
            tokenizer: None,
        };
        let h = hubness(&[0, 0, 0, 1, 9], 2, &vocab);
        let x = [0.0, 0.0, 0.0, 1.0, 9.0f64];
        let m = 2.0;
        let m2 = x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 5.0;
        let m3 = x.iter().map(|v| (v - m).powi(3)).sum::<f64>() / 5.0;
        assert!((h.skewness - m3 / m2.powf(1.5)).abs() < 1e-12);
        assert!(
            (h.skewness - 1.456_547_284_6).abs() < 1e-9,
            "{}",
            h.skewness
        );
        assert_eq!((h.max, h.never_share), (9, 0.6));
        assert_eq!(h.top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![4, 3]);
    }
}
