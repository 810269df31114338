//! Morpheme direction consistency and device cohesion (docs/origin/original-system.md §5.11),
//! on the files of its §1.7: `wake_embedding_groups.jsonl` (`morpheme`, `examples`, parallel
//! `bases`) and `device_groups.jsonl` (`device`, `examples`). A word's vector is its Wake row when it is a
//! Wake word, else the mean of the rows of its tokens (word-start form, no special tokens).

use super::{Embeddings, Vocabulary};
use crate::lexicon::morphemes::{load_device_groups_in_order, load_groups};
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct MorphemeGroup {
    pub morpheme: String,
    /// (word, base) pairs, e.g. ("acknowledging", "acknowledg").
    pub pairs: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct DeviceGroup {
    pub device: String,
    pub words: Vec<String>,
}

/// The optional group files of an analysis run.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    pub morphemes: Option<Vec<MorphemeGroup>>,
    pub devices: Option<Vec<DeviceGroup>>,
}

/// Reads `wake_embedding_groups.jsonl` (one reader of the format: [`load_groups`]); every
/// group needs a base for each example.
pub fn load_morphemes(path: &Path) -> Result<Vec<MorphemeGroup>> {
    load_groups(path)?
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            if g.examples.len() != g.bases.len() {
                bail!(
                    "{} record {}: {} examples but {} bases (they must be parallel lists)",
                    path.display(),
                    i + 1,
                    g.examples.len(),
                    g.bases.len()
                );
            }
            Ok(MorphemeGroup {
                morpheme: g.morpheme,
                pairs: g.examples.into_iter().zip(g.bases).collect(),
            })
        })
        .collect()
}

/// Reads `device_groups.jsonl` (or `device_classification.jsonl`), groups in file order.
pub fn load_devices(path: &Path) -> Result<Vec<DeviceGroup>> {
    Ok(load_device_groups_in_order(path)?
        .into_iter()
        .map(|(device, words)| DeviceGroup { device, words })
        .collect())
}

/// Wake word → row, built once per analysis (the lexicon has ~45,000 words).
pub struct WordIndex(std::collections::HashMap<String, usize>);

impl WordIndex {
    pub fn new(vocab: &Vocabulary) -> Self {
        let start = vocab.layout.wake_start;
        WordIndex(
            vocab
                .layout
                .words
                .iter()
                .enumerate()
                .map(|(i, w)| (w.clone(), start + i))
                .collect(),
        )
    }
}

/// The rows whose mean is a word's vector, among rows `0..rows`: its Wake row when it is a
/// Wake word, else the ids of `" word"` (word-start form, no special tokens) under the
/// tokenizer; `None` when the vocabulary cannot place it. An id may repeat.
pub fn word_ids(
    rows: usize,
    vocab: &Vocabulary,
    index: &WordIndex,
    word: &str,
) -> Option<Vec<usize>> {
    if let Some(&row) = index.0.get(word) {
        if row < rows {
            return Some(vec![row]);
        }
    }
    let t = vocab.tokenizer?;
    let enc = t.encode(format!(" {word}").as_str(), false).ok()?;
    let ids: Vec<usize> = enc
        .get_ids()
        .iter()
        .map(|&i| i as usize)
        .filter(|&i| i < rows)
        .collect();
    (!ids.is_empty()).then_some(ids)
}

/// The vector of a word (f64): the mean of its [`word_ids`] rows, or `None` when the
/// vocabulary cannot place it.
pub fn word_vector(
    e: &Embeddings,
    vocab: &Vocabulary,
    index: &WordIndex,
    word: &str,
) -> Option<Vec<f64>> {
    let ids = word_ids(e.rows, vocab, index, word)?;
    let mut v = vec![0f64; e.dim];
    for &i in &ids {
        v.iter_mut()
            .zip(e.row(i))
            .for_each(|(a, &b)| *a += b as f64);
    }
    v.iter_mut().for_each(|a| *a /= ids.len() as f64);
    Some(v)
}

fn cos(a: &[f64], b: &[f64]) -> f64 {
    let ab: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let aa: f64 = a.iter().map(|x| x * x).sum();
    let bb: f64 = b.iter().map(|x| x * x).sum();
    ab / (aa.sqrt().max(1e-12) * bb.sqrt().max(1e-12))
}

fn mean_sd(x: &[f64]) -> (f64, f64) {
    let (m, v) = super::stats::mean_var(x, 0);
    (m, v.sqrt())
}

#[derive(Debug, Clone, Serialize)]
pub struct MorphemeStats {
    pub morpheme: String,
    pub n_pairs: usize,
    /// Mean over pairs of `cos(d_i, d̄)`, `d_i = word − base`, `d̄` the group mean.
    pub consistency_mean: f64,
    pub consistency_sd: f64,
    pub magnitude_mean: f64,
    pub magnitude_sd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupPair {
    pub a: String,
    pub b: String,
    pub cos: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MorphemeReport {
    pub groups_in_file: usize,
    /// Groups with at least 2 pairs whose word and base both have vectors.
    pub groups_used: usize,
    pub pairs_used: usize,
    /// Every used group, most consistent first.
    pub groups: Vec<MorphemeStats>,
    /// Among the 20 most consistent groups: the most similar and most different mean directions.
    pub most_similar_directions: Vec<GroupPair>,
    pub most_different_directions: Vec<GroupPair>,
}

pub fn morpheme_directions(
    e: &Embeddings,
    groups: &[MorphemeGroup],
    vocab: &Vocabulary,
) -> Result<MorphemeReport> {
    let index = WordIndex::new(vocab);
    let mut stats = Vec::new();
    let mut means: Vec<(String, Vec<f64>)> = Vec::new();
    let mut pairs_used = 0;
    for g in groups {
        let dirs: Vec<Vec<f64>> = g
            .pairs
            .iter()
            .filter_map(|(w, b)| {
                let wv = word_vector(e, vocab, &index, w)?;
                let bv = word_vector(e, vocab, &index, b)?;
                Some(wv.iter().zip(&bv).map(|(x, y)| x - y).collect())
            })
            .collect();
        if dirs.len() < 2 {
            continue;
        }
        let mut mean = vec![0f64; e.dim];
        for d in &dirs {
            mean.iter_mut().zip(d).for_each(|(m, v)| *m += v);
        }
        mean.iter_mut().for_each(|m| *m /= dirs.len() as f64);
        let cons: Vec<f64> = dirs.iter().map(|d| cos(d, &mean)).collect();
        let mags: Vec<f64> = dirs
            .iter()
            .map(|d| d.iter().map(|v| v * v).sum::<f64>().sqrt())
            .collect();
        let (cm, cs) = mean_sd(&cons);
        let (mm, ms) = mean_sd(&mags);
        pairs_used += dirs.len();
        stats.push(MorphemeStats {
            morpheme: g.morpheme.clone(),
            n_pairs: dirs.len(),
            consistency_mean: cm,
            consistency_sd: cs,
            magnitude_mean: mm,
            magnitude_sd: ms,
        });
        means.push((g.morpheme.clone(), mean));
    }
    let mut order: Vec<usize> = (0..stats.len()).collect();
    order.sort_by(|&a, &b| {
        stats[b]
            .consistency_mean
            .total_cmp(&stats[a].consistency_mean)
    });
    let top: Vec<usize> = order.iter().take(20).copied().collect();
    let mut cross = Vec::new();
    for (x, &i) in top.iter().enumerate() {
        for &j in &top[x + 1..] {
            cross.push(GroupPair {
                a: means[i].0.clone(),
                b: means[j].0.clone(),
                cos: cos(&means[i].1, &means[j].1),
            });
        }
    }
    cross.sort_by(|a, b| b.cos.total_cmp(&a.cos));
    let most_similar = cross.iter().take(10).cloned().collect();
    let most_different = cross.iter().rev().take(5).cloned().collect();
    Ok(MorphemeReport {
        groups_in_file: groups.len(),
        groups_used: stats.len(),
        pairs_used,
        groups: order.into_iter().map(|i| stats[i].clone()).collect(),
        most_similar_directions: most_similar,
        most_different_directions: most_different,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceStats {
    pub device: String,
    pub n_words: usize,
    /// Words that have a vector.
    pub n_found: usize,
    /// Mean cosine over the pairs i < j of the group's word vectors.
    pub intra_mean_cos: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub groups: Vec<DeviceStats>,
    /// Cosines between group centroids, rows and columns in `groups` order.
    pub centroid_cos: Vec<Vec<f64>>,
}

pub fn device_cohesion(
    e: &Embeddings,
    groups: &[DeviceGroup],
    vocab: &Vocabulary,
) -> Result<DeviceReport> {
    let index = WordIndex::new(vocab);
    let mut out = Vec::new();
    let mut centroids = Vec::new();
    for g in groups {
        let vs: Vec<Vec<f64>> = g
            .words
            .iter()
            .filter_map(|w| word_vector(e, vocab, &index, w))
            .collect();
        let units: Vec<Vec<f64>> = vs
            .iter()
            .map(|v| {
                let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                v.iter().map(|x| x / n).collect()
            })
            .collect();
        let mut sum = 0.0;
        let mut count = 0usize;
        for i in 0..units.len() {
            for j in i + 1..units.len() {
                sum += units[i]
                    .iter()
                    .zip(&units[j])
                    .map(|(a, b)| a * b)
                    .sum::<f64>();
                count += 1;
            }
        }
        let mut c = vec![0f64; e.dim];
        for v in &vs {
            c.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        out.push(DeviceStats {
            device: g.device.clone(),
            n_words: g.words.len(),
            n_found: vs.len(),
            intra_mean_cos: if count > 0 {
                sum / count as f64
            } else {
                f64::NAN
            },
        });
        centroids.push(c);
    }
    let centroid_cos = centroids
        .iter()
        .map(|a| centroids.iter().map(|b| cos(a, b)).collect())
        .collect();
    Ok(DeviceReport {
        groups: out,
        centroid_cos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::Layout;

    #[test]
    fn a_consistent_suffix_scores_one() {
        // rows: base words b0, b1 and Wake words w0 = b0 + d, w1 = b1 + 2d
        let dim = 3;
        let d = [0.0f32, 0.0, 1.0];
        let b0 = [1.0f32, 0.0, 0.0];
        let b1 = [0.0f32, 1.0, 0.0];
        let mut data = Vec::new();
        data.extend_from_slice(&b0);
        data.extend_from_slice(&b1);
        data.extend(b0.iter().zip(&d).map(|(a, b)| a + b));
        data.extend(b1.iter().zip(&d).map(|(a, b)| a + 2.0 * b));
        let e = Embeddings::new(data, 4, dim).unwrap();
        // every word is placed through the layout (no tokenizer in this test)
        let layout_all = Layout {
            base_vocab: 0,
            wake_start: 0,
            wake_count: 4,
            words: vec!["x".into(), "y".into(), "xing".into(), "ying".into()],
        };
        let vocab = Vocabulary {
            layout: &layout_all,
            tokenizer: None,
        };
        let groups = vec![MorphemeGroup {
            morpheme: "-ing".into(),
            pairs: vec![("xing".into(), "x".into()), ("ying".into(), "y".into())],
        }];
        let r = morpheme_directions(&e, &groups, &vocab).unwrap();
        assert_eq!(r.groups_used, 1);
        assert!((r.groups[0].consistency_mean - 1.0).abs() < 1e-12);
        assert!((r.groups[0].magnitude_mean - 1.5).abs() < 1e-12);
        // a word nobody knows drops the pair, and a group of one pair is not used
        let groups = vec![MorphemeGroup {
            morpheme: "-ing".into(),
            pairs: vec![("xing".into(), "x".into()), ("zzz".into(), "y".into())],
        }];
        assert_eq!(
            morpheme_directions(&e, &groups, &vocab)
                .unwrap()
                .groups_used,
            0
        );
        let dev = device_cohesion(
            &e,
            &[DeviceGroup {
                device: "pun".into(),
                words: vec!["x".into(), "xing".into()],
            }],
            &vocab,
        )
        .unwrap();
        assert!((dev.groups[0].intra_mean_cos - 1.0 / 2f64.sqrt()).abs() < 1e-12);
        assert!((dev.centroid_cos[0][0] - 1.0).abs() < 1e-12);
    }
}
