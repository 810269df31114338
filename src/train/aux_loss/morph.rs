//! `L_morph`: pulls Wake words that share an affix together, in one of two variants
//! (docs/origin/original-system.md §5.4 and §5.3).
//!
//! - `centroid` (§5.4, the seed's v1): each affix of `morpheme_data.json` has a centroid, the
//!   mean of its example words' vectors **at phase start**; a Wake row whose word (its
//!   `wake2vec.json` form) has a prefix or a suffix by greedy longest match ([`Decomposer`], root
//!   kept non-empty, over the affixes that have a centroid) takes part with target `t_r` = the
//!   mean of its matched affixes' centroids. `L = (1/M) Σ_r ‖e_r − t_r‖² / D` over the `M`
//!   participating rows. Targets are fixed for the phase: an example word that is itself a
//!   participating row contributes its phase-start value.
//! - `direction` (§5.3, all the original's runs): for each (word, base) pair of a group with at
//!   least `min_group_size` pairs whose word and base both have vectors, `d_i = w_i − b_i` from
//!   the **current** rows (Wake rows from the block, base rows fixed at their phase-start
//!   values); `L = (1/(N·D)) Σ_g Σ_{i∈g} ‖d_i − d̄_g‖²`, `N` the number of pairs kept. Pairs
//!   without a Wake token stay in `N` and in their group's mean, as in the original.

use super::vectors::Lin;
use super::{AuxConfig, MorphVariant, Stats};
use crate::analysis::Vocabulary;
use crate::lexicon::morphemes::{load_groups, Decomposer, MorphemeData};
use anyhow::{bail, ensure, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::Path;

/// The rows whose mean is a word's vector (see `analysis::morph::word_ids`).
pub(super) type IdsOf<'a> = &'a dyn Fn(&str) -> Option<Vec<usize>>;

/// The term, as set up for the phase.
#[derive(Debug, Clone)]
pub(super) enum Morph {
    Off,
    Centroid(Centroid),
    Direction(Direction),
}

/// The centroid variant: fixed targets for the participating rows.
#[derive(Debug, Clone)]
pub(super) struct Centroid {
    /// (Wake row, target index), rows ascending, each row once.
    pub(super) rows: Vec<(u32, u32)>,
    /// Targets, `[T, D]` (f32 like the rows: the rounding only fixes the target).
    pub(super) targets: Vec<f32>,
}

/// The direction variant: the differences `d_i`, linear in the Wake block.
#[derive(Debug, Clone)]
pub(super) struct Direction {
    /// `d_i` of every kept pair, grouped.
    pub(super) pairs: Vec<Lin>,
    pub(super) groups: Vec<Range<usize>>,
}

impl Morph {
    /// Sets up `config.morph`'s variant from `config.morphemes` (`embed`: the full `[V, dim]`
    /// matrix at phase start, the Wake rows from `start`), recording what it found in `stats`.
    pub(super) fn build(
        config: &AuxConfig,
        vocab: &Vocabulary,
        ids_of: IdsOf,
        start: usize,
        embed: &[f32],
        dim: usize,
        stats: &mut Stats,
    ) -> Result<Morph> {
        Ok(match config.morph {
            MorphVariant::Off => Morph::Off,
            MorphVariant::Centroid => Morph::Centroid(Centroid::build(
                &config.morphemes,
                vocab,
                ids_of,
                embed,
                dim,
                stats,
            )?),
            MorphVariant::Direction => {
                Morph::Direction(Direction::build(config, ids_of, start, embed, dim, stats)?)
            }
        })
    }

    /// The centroid variant, whose rows the row-wise pass visits.
    pub(super) fn centroid(&self) -> Option<&Centroid> {
        match self {
            Morph::Centroid(c) => Some(c),
            _ => None,
        }
    }
}

/// Each affix's centroid, prefixes then suffixes, by affix as the decomposer sees it.
type Centroids = [HashMap<String, Vec<f64>>; 2];

impl Centroid {
    fn build(
        path: &Path,
        vocab: &Vocabulary,
        ids_of: IdsOf,
        embed: &[f32],
        dim: usize,
        stats: &mut Stats,
    ) -> Result<Centroid> {
        let data = MorphemeData::load(path)?;
        let (centroids, usable) = affix_centroids(&data, ids_of, embed, dim, stats);
        stats.morph_groups = centroids[0].len() + centroids[1].len();
        if stats.morph_groups == 0 {
            bail!(
                "{}: none of its {} affixes has an example word the tokenizer can encode, so no centroid can be made; give example words (wake2vec morphemes mine writes them)",
                path.display(),
                stats.morph_groups_in_file
            );
        }
        let (rows, targets) = row_targets(vocab, &Decomposer::new(&usable), &centroids, dim);
        if rows.is_empty() {
            bail!(
                "{}: no Wake word starts or ends with one of its {} usable affixes, so L_morph has no rows; use morpheme data mined from this lexicon (wake2vec morphemes mine) or aux.morph = \"off\"",
                path.display(),
                stats.morph_groups
            );
        }
        stats.morph_rows = rows.len();
        Ok(Centroid { rows, targets })
    }

    /// `Σ ‖e_r − t_r‖²` over the participating rows among the block's rows `first..` (`block`:
    /// `[rows, dim]`). With `grad` (the block's rows) and `k ≠ 0`, adds `k · (e_r − t_r)` to
    /// each: `k/2 · ∂/∂e_r`.
    pub(super) fn chunk(
        &self,
        first: usize,
        block: &[f32],
        dim: usize,
        grad: Option<&mut [f32]>,
        k: f64,
    ) -> f64 {
        let mut grad = grad.filter(|_| k != 0.0);
        let end = first + block.len() / dim;
        let lo = self.rows.partition_point(|x| (x.0 as usize) < first);
        let hi = self.rows.partition_point(|x| (x.0 as usize) < end);
        let mut sum = 0f64;
        for &(row, t) in &self.rows[lo..hi] {
            let r = row as usize - first;
            let e = &block[r * dim..(r + 1) * dim];
            let t = &self.targets[t as usize * dim..(t as usize + 1) * dim];
            sum += sq_dist(e, t);
            if let Some(g) = grad.as_deref_mut() {
                let k = k as f32;
                g[r * dim..(r + 1) * dim]
                    .iter_mut()
                    .zip(e.iter().zip(t))
                    .for_each(|(o, (&x, &y))| *o += k * (x - y));
            }
        }
        sum
    }
}

/// The centroid of every affix with at least one example word that has a vector (examples
/// merged over affixes that differ only in case), and those affixes as the decomposer's set.
/// Records the affixes in the file and the example words used in `stats`.
fn affix_centroids(
    data: &MorphemeData,
    ids_of: IdsOf,
    embed: &[f32],
    dim: usize,
    stats: &mut Stats,
) -> (Centroids, MorphemeData) {
    // affixes as the decomposer sees them (lower-cased), examples merged
    let lower = |m: &BTreeMap<String, Vec<String>>| {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (a, ex) in m {
            out.entry(a.to_lowercase())
                .or_default()
                .extend(ex.iter().cloned());
        }
        out
    };
    let (prefixes, suffixes) = (lower(&data.prefixes), lower(&data.suffixes));
    stats.morph_groups_in_file = prefixes.len() + suffixes.len();
    let mut usable = MorphemeData::default();
    let mut centroids: Centroids = Default::default();
    for (kind, map) in [&prefixes, &suffixes].into_iter().enumerate() {
        for (affix, examples) in map {
            let mut sum = vec![0f64; dim];
            let mut n = 0usize;
            let mut seen = HashSet::new();
            for w in examples.iter().filter(|w| seen.insert(w.as_str())) {
                let Some(ids) = ids_of(w) else { continue };
                let k = 1.0 / ids.len() as f64;
                for id in ids {
                    sum.iter_mut()
                        .zip(&embed[id * dim..(id + 1) * dim])
                        .for_each(|(s, &v)| *s += k * v as f64);
                }
                n += 1;
            }
            if n == 0 {
                continue;
            }
            sum.iter_mut().for_each(|s| *s /= n as f64);
            stats.morph_pairs += n;
            centroids[kind].insert(affix.clone(), sum);
            let target = if kind == 0 {
                &mut usable.prefixes
            } else {
                &mut usable.suffixes
            };
            target.insert(affix.clone(), Vec::new());
        }
    }
    (centroids, usable)
}

/// The Wake rows whose word has an affix, each with the index of its target, and the targets
/// (`[T, D]`): the mean of the matched affixes' centroids, one per (prefix, suffix) met, in the
/// order first met.
fn row_targets(
    vocab: &Vocabulary,
    decomposer: &Decomposer,
    centroids: &Centroids,
    dim: usize,
) -> (Vec<(u32, u32)>, Vec<f32>) {
    let mut combos: HashMap<(String, String), u32> = HashMap::new();
    let mut targets: Vec<f32> = Vec::new();
    let mut rows = Vec::new();
    for i in 0..vocab.layout.wake_count {
        let Some(word) = wake_word(vocab, i) else {
            continue;
        };
        let d = decomposer.decompose(&word);
        if d.prefix.is_empty() && d.suffix.is_empty() {
            continue;
        }
        let next = combos.len() as u32;
        let t = *combos
            .entry((d.prefix.clone(), d.suffix.clone()))
            .or_insert_with(|| {
                let parts: Vec<&Vec<f64>> =
                    [centroids[0].get(&d.prefix), centroids[1].get(&d.suffix)]
                        .into_iter()
                        .flatten()
                        .collect();
                let k = 1.0 / parts.len() as f64;
                let mut t = vec![0f64; dim];
                for p in parts {
                    t.iter_mut().zip(p).for_each(|(a, b)| *a += k * b);
                }
                targets.extend(t.iter().map(|&v| v as f32));
                next
            });
        rows.push((i as u32, t));
    }
    (rows, targets)
}

/// The word of Wake row `i`: its `wake2vec.json` form, else its token without the word-start
/// marker.
fn wake_word(vocab: &Vocabulary, i: usize) -> Option<String> {
    if let Some(w) = vocab.layout.words.get(i).filter(|w| !w.is_empty()) {
        return Some(w.clone());
    }
    let token = vocab
        .tokenizer?
        .id_to_token((vocab.layout.wake_start + i) as u32)?;
    let word = token
        .strip_prefix('Ġ')
        .or_else(|| token.strip_prefix('▁'))
        .unwrap_or(&token);
    (!word.is_empty()).then(|| word.to_string())
}

/// `Σ (x − y)²` in f64 over 8 interleaved lanes (a fixed order the compiler can vectorise).
fn sq_dist(x: &[f32], y: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let cx = x.chunks_exact(8);
    let cy = y.chunks_exact(8);
    let (rx, ry) = (cx.remainder(), cy.remainder());
    for (a, b) in cx.zip(cy) {
        acc.iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(s, (&u, &v))| {
                let d = u as f64 - v as f64;
                *s += d * d;
            });
    }
    let mut s = acc.iter().sum::<f64>();
    for (&a, &b) in rx.iter().zip(ry) {
        s += (a as f64 - b as f64).powi(2);
    }
    s
}

impl Direction {
    fn build(
        config: &AuxConfig,
        ids_of: IdsOf,
        start: usize,
        embed: &[f32],
        dim: usize,
        stats: &mut Stats,
    ) -> Result<Direction> {
        let path = &config.morphemes;
        let file_groups = load_groups(path)?;
        stats.morph_groups_in_file = file_groups.len();
        let mut pairs = Vec::new();
        let mut groups = Vec::new();
        for (k, g) in file_groups.iter().enumerate() {
            if g.bases.is_empty() {
                continue;
            }
            ensure!(
                g.bases.len() == g.examples.len(),
                "{} record {} ({}): {} examples but {} bases; they must be parallel lists",
                path.display(),
                k + 1,
                g.morpheme,
                g.examples.len(),
                g.bases.len()
            );
            let kept: Vec<Lin> = g
                .examples
                .iter()
                .zip(&g.bases)
                .filter_map(|(w, b)| {
                    let (wi, bi) = (ids_of(w)?, ids_of(b)?);
                    let mut d = Lin::default();
                    d.add_mean(&wi, 1.0, start, embed, dim);
                    d.add_mean(&bi, -1.0, start, embed, dim);
                    Some(d.finish())
                })
                .collect();
            if kept.len() < config.min_group_size {
                continue;
            }
            groups.push(pairs.len()..pairs.len() + kept.len());
            pairs.extend(kept);
        }
        if groups.is_empty() {
            bail!(
                "{}: no group has {} (word, base) pairs the tokenizer can encode (with bases given), so L_morph is empty; check the file or lower aux.min_group_size",
                path.display(),
                config.min_group_size
            );
        }
        let reached = Lin::rows_reached(&pairs);
        if reached == 0 {
            bail!(
                "{}: no word or base of its usable pairs contains a Wake token, so L_morph cannot train the Wake rows; use groups of this lexicon's words",
                path.display()
            );
        }
        stats.morph_groups = groups.len();
        stats.morph_pairs = pairs.len();
        stats.morph_rows = reached;
        Ok(Direction { pairs, groups })
    }

    /// `L_morph` at the Wake block `wake` (`[count, dim]`); with `grad` and `k ≠ 0`, adds
    /// `k · ∂L/∂wake` to it.
    pub(super) fn loss(&self, wake: &[f32], dim: usize, grad: Option<&mut [f32]>, k: f64) -> f64 {
        let n = self.pairs.len() as f64;
        let mut grad = grad.filter(|_| k != 0.0);
        let mut loss = 0.0;
        let mut vecs: Vec<f64> = Vec::new();
        let mut mean = vec![0f64; dim];
        for g in &self.groups {
            vecs.resize(g.len() * dim, 0.0);
            mean.fill(0.0);
            for (i, p) in self.pairs[g.clone()].iter().enumerate() {
                let v = &mut vecs[i * dim..(i + 1) * dim];
                p.eval(wake, dim, v);
                mean.iter_mut().zip(v.iter()).for_each(|(m, &x)| *m += x);
            }
            mean.iter_mut().for_each(|m| *m /= g.len() as f64);
            for (i, p) in self.pairs[g.clone()].iter().enumerate() {
                let v = &mut vecs[i * dim..(i + 1) * dim];
                v.iter_mut().zip(&mean).for_each(|(x, m)| {
                    *x -= m;
                    loss += *x * *x;
                });
                // Σ_i (d_i − d̄) = 0, so ∂L/∂d_i = 2 (d_i − d̄) / (N D)
                if let Some(gr) = grad.as_deref_mut() {
                    p.backward(v, k * 2.0 / (n * dim as f64), gr, dim);
                }
            }
        }
        loss / (n * dim as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::aux_loss::testing::{
        build_error, check_gradient, direction, lin, mean, only, parts, problem, sq, Tiny, TINY_DIM,
    };
    use crate::util::rng::Rng;
    use std::path::PathBuf;

    #[test]
    fn centroid_gradient_matches_finite_differences() {
        let (aux, wake) = problem(only("morph"), MorphVariant::Centroid, 3);
        check_gradient(&aux, &wake, |c| c.morph, "L_morph centroid");
    }

    #[test]
    fn direction_gradient_matches_finite_differences() {
        let (aux, wake) = problem(only("morph"), MorphVariant::Direction, 4);
        check_gradient(&aux, &wake, |c| c.morph, "L_morph direction");
    }

    #[test]
    fn centroid_zero_at_targets_and_hand_value_off_them() {
        let targets = vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 0.5, 0.25];
        let morph = Morph::Centroid(Centroid {
            rows: vec![(0, 1), (2, 0)],
            targets,
        });
        let aux = parts(only("morph"), 4, 3, (1.0, 10.0), morph, None);
        // row 1 does not take part
        let mut wake = [
            -1.0f32, 0.0, 0.5, 0.25, 9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0,
        ];
        assert_eq!(aux.compute(&wake, &mut Rng::new(1), None, 1.0).morph, 0.0);
        wake[8] += 1.0;
        let mut grad = vec![0f32; 12];
        let c = aux.compute(&wake, &mut Rng::new(1), Some(&mut grad), 1.0);
        // ‖e − t‖² / D over M = 2 rows: 1 / 4 / 2
        assert_eq!(c.morph, 0.125);
        // 2 (e − t) / (M D)
        let mut expected = [0f32; 12];
        expected[8] = 0.25;
        assert_eq!(grad, expected);
    }

    #[test]
    fn direction_zero_when_consistent_and_hand_value_otherwise() {
        // d_i = wake[i] − fixed base vector; two groups of two pairs
        let base = [0.5, -1.0];
        let pair = |r: u32| lin(&base.map(|b: f64| -b), &[(r, 1.0)]);
        let morph = direction(vec![vec![pair(0), pair(1)], vec![pair(2), pair(3)]]);
        let aux = parts(only("morph"), 2, 4, (1.0, 10.0), morph, None);
        // equal directions within each group (different across groups)
        let consistent = [1.0f32, 1.0, 1.0, 1.0, -3.0, 2.0, -3.0, 2.0];
        assert_eq!(
            aux.compute(&consistent, &mut Rng::new(1), None, 1.0).morph,
            0.0
        );
        // group 0: d = (0.5, 2), (2.5, 2): residuals ±(1, 0); group 1 consistent
        let off = [1.0f32, 1.0, 3.0, 1.0, -3.0, 2.0, -3.0, 2.0];
        let mut grad = vec![0f32; 8];
        let c = aux.compute(&off, &mut Rng::new(1), Some(&mut grad), 1.0);
        // Σ ‖d_i − d̄‖² / (N D) = 2 / (4 · 2)
        assert_eq!(c.morph, 0.25);
        // 2 (d_i − d̄) / (N D)
        assert_eq!(grad, [-0.25, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn builds_centroids_on_a_tiny_vocabulary() {
        let t = Tiny::new("centroid");
        let morphemes = t.file(
            "morpheme_data.json",
            r#"{"prefixes": {"un": ["undone", "unkind"], "re": ["redo"], "zz": []},
                "suffixes": {"ing": ["thinking", "sitting"]}}"#,
        );
        let config = AuxConfig {
            morphemes: morphemes.clone(),
            ..AuxConfig::default()
        };
        let aux = t.build(&config).unwrap();
        let s = aux.participating();
        // centroids: zz has no example; un, re, ing do
        assert_eq!(
            (s.morph_groups_in_file, s.morph_groups, s.morph_pairs),
            (4, 3, 5)
        );
        // undoings → un, unkind → un, rerunning → re + ing, thinking → ing, redo → re;
        // riverrun has none
        assert_eq!(s.morph_rows, 5);
        let un = mean(&[t.vector("undone"), t.vector("unkind")]);
        let re = t.vector("redo");
        let ing = mean(&[t.vector("thinking"), t.vector("sitting")]);
        let targets = [un.clone(), un, mean(&[re.clone(), ing.clone()]), ing, re];
        let w = t.wake();
        let rows = [0, 1, 2, 3, 5];
        let expected = rows
            .iter()
            .zip(&targets)
            .map(|(&r, tg)| sq(tg, &w[r * TINY_DIM..(r + 1) * TINY_DIM]))
            .sum::<f64>()
            / (5 * TINY_DIM) as f64;
        let c = aux.compute(w, &mut Rng::new(1), None, 1.0);
        // the targets are stored in f32
        assert!(
            (c.morph - expected).abs() < 1e-6 * expected,
            "{} vs {expected}",
            c.morph
        );
        assert!(c.morph > 0.0);
    }

    #[test]
    fn builds_direction_pairs_on_a_tiny_vocabulary() {
        let t = Tiny::new("direction");
        // one group with 3 usable pairs, one with 2 (dropped), one without bases
        let groups = t.file(
            "groups.jsonl",
            "{\"morpheme\": \"-ing\", \"morpheme_type\": \"suffix\", \"examples\": [\"thinking\", \"rerunning\", \"sitting\"], \"bases\": [\"think\", \"rerun\", \"sit\"]}\n\
             {\"morpheme\": \"re-\", \"morpheme_type\": \"prefix\", \"examples\": [\"redo\", \"rerunning\"], \"bases\": [\"do\", \"running\"]}\n\
             {\"morpheme\": \"un-\", \"morpheme_type\": \"prefix\", \"examples\": [\"unkind\"]}\n",
        );
        let config = AuxConfig {
            morph: MorphVariant::Direction,
            morphemes: groups.clone(),
            ..AuxConfig::default()
        };
        let aux = t.build(&config).unwrap();
        let s = aux.participating();
        assert_eq!(
            (
                s.morph_groups_in_file,
                s.morph_groups,
                s.morph_pairs,
                s.morph_rows
            ),
            (3, 1, 3, 2)
        );
        let d: Vec<Vec<f64>> = [
            ("thinking", "think"),
            ("rerunning", "rerun"),
            ("sitting", "sit"),
        ]
        .iter()
        .map(|(w, b)| {
            t.vector(w)
                .iter()
                .zip(t.vector(b))
                .map(|(x, y)| x - y)
                .collect()
        })
        .collect();
        let dbar = mean(&d);
        let expected = d
            .iter()
            .map(|v| {
                v.iter()
                    .zip(&dbar)
                    .map(|(x, y)| (x - y).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / (3 * TINY_DIM) as f64;
        let w = t.wake();
        let c = aux.compute(w, &mut Rng::new(1), None, 1.0);
        assert!(
            (c.morph - expected).abs() < 1e-9 * expected,
            "{} vs {expected}",
            c.morph
        );
        // the gradient reaches only the rows the term uses
        let mut grad = vec![0f32; w.len()];
        let only_morph = AuxConfig {
            lambda_rep: 0.0,
            lambda_norm: 0.0,
            lambda_device: 0.0,
            ..config.clone()
        };
        t.build(&only_morph)
            .unwrap()
            .compute(w, &mut Rng::new(1), Some(&mut grad), 1.0);
        let touched: Vec<usize> = (0..6)
            .filter(|r| {
                grad[r * TINY_DIM..(r + 1) * TINY_DIM]
                    .iter()
                    .any(|&g| g != 0.0)
            })
            .collect();
        assert_eq!(touched, [2, 3]);
    }

    #[test]
    fn build_errors_say_what_is_wrong() {
        let t = Tiny::new("morph-errors");
        let err = |morph, path: PathBuf| {
            build_error(
                &t,
                AuxConfig {
                    morph,
                    morphemes: path,
                    ..AuxConfig::default()
                },
            )
        };
        let missing = t.dir.join("nope.json");
        let e = err(MorphVariant::Centroid, missing);
        assert!(e.contains("nope.json"), "{e}");
        let no_examples = t.file("empty.json", r#"{"prefixes": {"un": []}, "suffixes": {}}"#);
        let e = err(MorphVariant::Centroid, no_examples);
        assert!(
            e.contains("none of its 1 affixes has an example word"),
            "{e}"
        );
        let no_match = t.file(
            "nomatch.json",
            r#"{"prefixes": {"xy": ["unkind"]}, "suffixes": {}}"#,
        );
        let e = err(MorphVariant::Centroid, no_match);
        assert!(e.contains("no Wake word starts or ends"), "{e}");
        let small = t.file(
            "small.jsonl",
            "{\"morpheme\": \"re-\", \"morpheme_type\": \"prefix\", \"examples\": [\"redo\"], \"bases\": [\"do\"]}\n",
        );
        let e = err(MorphVariant::Direction, small);
        assert!(e.contains("no group has 3"), "{e}");
        let base_only = t.file(
            "baseonly.jsonl",
            "{\"morpheme\": \"-s\", \"morpheme_type\": \"suffix\", \"examples\": [\"cats\", \"dogs\", \"hats\"], \"bases\": [\"cat\", \"dog\", \"hat\"]}\n",
        );
        let e = err(MorphVariant::Direction, base_only);
        assert!(e.contains("contains a Wake token"), "{e}");
        let ragged = t.file(
            "ragged.jsonl",
            "{\"morpheme\": \"-s\", \"morpheme_type\": \"suffix\", \"examples\": [\"cats\", \"dogs\"], \"bases\": [\"cat\"]}\n",
        );
        let e = err(MorphVariant::Direction, ragged);
        assert!(e.contains("2 examples but 1 bases"), "{e}");
    }
}
