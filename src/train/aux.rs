//! Phase 3's auxiliary losses (original-system.md §5, issue 5), computed from the Wake rows of
//! the embedding alone, with hand-written gradients.
//!
//! `L_aux = λ_morph·L_morph + λ_rep·L_rep + λ_norm·L_norm + λ_device·L_device`, where `D` is the
//! width, `e_r` a Wake row of the block being trained, and every "word vector" is the mean of
//! the rows of the word's tokens under the extended tokenizer ([`word_ids`]: the Wake row of a
//! Wake word, else the pieces of `" word"`):
//!
//! - `L_morph`, variant `centroid` (§5.4, the seed's v1): each affix of `morpheme_data.json` has
//!   a centroid, the mean of its example words' vectors **at phase start**; a Wake row whose word
//!   (its `wake2vec.json` form) has a prefix or a suffix by greedy longest match ([`Decomposer`],
//!   root kept non-empty, over the affixes that have a centroid) takes part with target `t_r` =
//!   the mean of its matched affixes' centroids. `L = (1/M) Σ_r ‖e_r − t_r‖² / D` over the `M`
//!   participating rows. Targets are fixed for the phase: an example word that is itself a
//!   participating row contributes its phase-start value.
//! - `L_morph`, variant `direction` (§5.3): for each (word, base) pair of a group with at least
//!   `min_group_size` pairs whose word and base both have vectors, `d_i = w_i − b_i` from the
//!   **current** rows (Wake rows from the block, base rows fixed at their phase-start values);
//!   `L = (1/(N·D)) Σ_g Σ_{i∈g} ‖d_i − d̄_g‖²`, `N` the number of pairs kept. Pairs without a
//!   Wake token stay in `N` and in their group's mean, as in the original.
//! - `L_rep` (§5.7, with distinct pairs): `rep_pairs` pairs `(i, j)`, `i ≠ j`, no unordered pair
//!   twice, drawn uniformly each step (all pairs when there are no more than that);
//!   `L = mean max(0, cos(e_i, e_j) − rep_threshold)²`.
//! - `L_norm` (§5.8): `L = mean_r max(0, |‖e_r‖ − T| − M)²` over every Wake row; `T` and `M` are
//!   the mean and the **sample** standard deviation (n − 1, torch's `.std()`) of the L2 norms of
//!   the base rows the tokenizer has a token for (padded rows of a matrix larger than the
//!   tokenizer are left out, as in the init statistics), measured at phase start.
//! - `L_device` (§5.5, the P3 loop): device groups with at least `min_group_size` tokenisable
//!   (distinct) words; each step `device_triplets` anchors drawn uniformly over all their words,
//!   a positive uniformly from the anchor's group other than the anchor, a negative uniformly
//!   from the other groups; on unit-normalised current word vectors,
//!   `L = mean max(0, margin + cos(a, n) − cos(a, p))`.
//!
//! Gradients reach the Wake rows only. Every term is computed (and reported, unweighted) whatever
//! its λ, so that a run can watch a term it does not train (λ = 0 skips only its gradient).
//! [`AuxLosses::compute`] draws the rep pairs and then the device triplets from the given
//! [`Rng`], so the same state gives the same samples; sums are accumulated in f64 over fixed
//! chunks in a fixed order, so values and gradients do not depend on the thread count.

use crate::analysis::morph::{word_ids, WordIndex};
use crate::analysis::Vocabulary;
use crate::lexicon::morphemes::{load_device_groups, load_groups, Decomposer, MorphemeData};
use crate::sampling::Rng;
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Which `L_morph`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MorphVariant {
    /// MSE to affix centroids (`morpheme_data.json`).
    #[default]
    Centroid,
    /// Direction consistency over (word, base) pairs (`wake_embedding_groups.jsonl`).
    Direction,
    /// No morpheme term.
    Off,
}

/// The auxiliary terms' settings; the defaults are the seed's TinyLlama Phase 3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuxConfig {
    pub morph: MorphVariant,
    /// `centroid`: a `morpheme_data.json` (or a `wake_embedding_groups.jsonl`, read as its
    /// prefix and suffix groups); `direction`: a `wake_embedding_groups.jsonl`. Ignored when
    /// `morph = "off"`.
    pub morphemes: PathBuf,
    /// A `device_groups.jsonl` (or `device_classification.jsonl`); empty: no device term.
    pub devices: PathBuf,
    pub lambda_morph: f64,
    pub lambda_rep: f64,
    pub lambda_norm: f64,
    /// Must be 0 without a devices file. A devices file with λ 0 computes and reports the term
    /// without training it.
    pub lambda_device: f64,
    pub rep_pairs: usize,
    pub rep_threshold: f64,
    pub device_triplets: usize,
    pub device_margin: f64,
    /// Least number of usable pairs (direction) or words (device) a group needs.
    pub min_group_size: usize,
}

impl Default for AuxConfig {
    fn default() -> Self {
        AuxConfig {
            morph: MorphVariant::Centroid,
            morphemes: PathBuf::new(),
            devices: PathBuf::new(),
            lambda_morph: 0.1,
            lambda_rep: 0.05,
            lambda_norm: 0.01,
            lambda_device: 0.0,
            rep_pairs: 100,
            rep_threshold: 0.95,
            device_triplets: 64,
            device_margin: 0.2,
            min_group_size: 3,
        }
    }
}

impl AuxConfig {
    /// Checks the values and their combinations; one-line errors naming the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("lambda_morph", self.lambda_morph),
            ("lambda_rep", self.lambda_rep),
            ("lambda_norm", self.lambda_norm),
            ("lambda_device", self.lambda_device),
            ("device_margin", self.device_margin),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "aux.{name} = {v}: must be a finite number >= 0"
            );
        }
        ensure!(
            self.rep_threshold.is_finite() && self.rep_threshold > -1.0 && self.rep_threshold < 1.0,
            "aux.rep_threshold = {}: must be a cosine strictly between -1 and 1",
            self.rep_threshold
        );
        ensure!(
            self.rep_pairs >= 1,
            "aux.rep_pairs = 0: draw at least one pair (set lambda_rep = 0 to not train the term)"
        );
        ensure!(
            self.device_triplets >= 1,
            "aux.device_triplets = 0: draw at least one triplet (leave aux.devices empty for no device term)"
        );
        ensure!(
            self.min_group_size >= 2,
            "aux.min_group_size = {}: must be at least 2 (a positive must differ from its anchor)",
            self.min_group_size
        );
        let morphemes_set = !self.morphemes.as_os_str().is_empty();
        match self.morph {
            MorphVariant::Off => {}
            v if !morphemes_set => bail!(
                "aux.morph = \"{}\" needs aux.morphemes ({}); set it, or aux.morph = \"off\"",
                v.name(),
                v.file_kind()
            ),
            MorphVariant::Direction if !is_jsonl(&self.morphemes) => bail!(
                "aux.morph = \"direction\" needs word/base pairs from a wake_embedding_groups.jsonl, not {}; use aux.morph = \"centroid\" for a morpheme_data.json",
                self.morphemes.display()
            ),
            _ => {}
        }
        if self.lambda_device > 0.0 && self.devices.as_os_str().is_empty() {
            bail!(
                "aux.lambda_device = {} but aux.devices is empty: give a device_groups.jsonl, or set lambda_device = 0",
                self.lambda_device
            );
        }
        Ok(())
    }
}

impl MorphVariant {
    fn name(self) -> &'static str {
        match self {
            MorphVariant::Centroid => "centroid",
            MorphVariant::Direction => "direction",
            MorphVariant::Off => "off",
        }
    }

    fn file_kind(self) -> &'static str {
        match self {
            MorphVariant::Direction => "a wake_embedding_groups.jsonl",
            _ => "a morpheme_data.json or wake_embedding_groups.jsonl",
        }
    }
}

fn is_jsonl(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
}

/// The unweighted value of each term at one step, and `Σ λ_k L_k`. A term that is off is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Components {
    pub morph: f64,
    pub rep: f64,
    pub norm: f64,
    pub device: f64,
    pub total_weighted: f64,
}

/// What the setup found, for the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub morph: MorphVariant,
    /// centroid: affixes in the file / with a centroid; direction: groups in the file / kept.
    pub morph_groups_in_file: usize,
    pub morph_groups: usize,
    /// direction: (word, base) pairs kept (N); centroid: example words that gave a vector.
    pub morph_pairs: usize,
    /// Wake rows `L_morph` reaches (centroid: the participating rows M).
    pub morph_rows: usize,
    pub device_groups: usize,
    pub device_words: usize,
    /// Distinct Wake rows the device words reach.
    pub device_rows: usize,
    /// The norm band: `norm_target ± norm_margin`, from `norm_base_rows` base rows.
    pub norm_target: f64,
    pub norm_margin: f64,
    pub norm_base_rows: usize,
    /// Pairs drawn per step (fewer when the block has fewer distinct pairs).
    pub rep_pairs: usize,
}

/// A vector that is linear in the Wake block: `fixed + Σ coef·wake[row]` (`fixed` empty = 0).
#[derive(Debug, Clone, Default, PartialEq)]
struct Lin {
    fixed: Vec<f64>,
    terms: Vec<(u32, f64)>,
}

impl Lin {
    /// `sign ×` the mean of the rows `ids` of the phase-start matrix `embed`, Wake rows
    /// (`start..start + count`) kept as terms.
    fn add_mean(&mut self, ids: &[usize], sign: f64, start: usize, embed: &[f32], dim: usize) {
        let coef = sign / ids.len() as f64;
        for &id in ids {
            if id >= start {
                self.terms.push(((id - start) as u32, coef));
            } else {
                if self.fixed.is_empty() {
                    self.fixed = vec![0.0; dim];
                }
                let row = &embed[id * dim..(id + 1) * dim];
                self.fixed
                    .iter_mut()
                    .zip(row)
                    .for_each(|(f, &v)| *f += coef * v as f64);
            }
        }
    }

    /// Merges repeated rows (in row order) and drops terms that cancel.
    fn finish(mut self) -> Self {
        self.terms.sort_by_key(|t| t.0);
        let mut merged: Vec<(u32, f64)> = Vec::with_capacity(self.terms.len());
        for (r, c) in self.terms {
            match merged.last_mut() {
                Some(last) if last.0 == r => last.1 += c,
                _ => merged.push((r, c)),
            }
        }
        merged.retain(|t| t.1 != 0.0);
        self.terms = merged;
        self
    }

    fn eval(&self, wake: &[f32], dim: usize, out: &mut [f64]) {
        if self.fixed.is_empty() {
            out.fill(0.0);
        } else {
            out.copy_from_slice(&self.fixed);
        }
        for &(r, c) in &self.terms {
            let row = &wake[r as usize * dim..(r as usize + 1) * dim];
            out.iter_mut()
                .zip(row)
                .for_each(|(o, &v)| *o += c * v as f64);
        }
    }

    /// `grad[rows] += factor · coef · g`.
    fn backward(&self, g: &[f64], factor: f64, grad: &mut [f32], dim: usize) {
        for &(r, c) in &self.terms {
            let row = &mut grad[r as usize * dim..(r as usize + 1) * dim];
            let k = factor * c;
            row.iter_mut()
                .zip(g)
                .for_each(|(o, &v)| *o += (k * v) as f32);
        }
    }
}

#[derive(Debug, Clone)]
struct Centroid {
    /// (Wake row, target index), rows ascending, each row once.
    rows: Vec<(u32, u32)>,
    /// Targets, `[T, D]`.
    targets: Vec<f64>,
}

#[derive(Debug, Clone)]
struct Direction {
    /// `d_i` of every kept pair, grouped.
    pairs: Vec<Lin>,
    groups: Vec<Range<usize>>,
}

#[derive(Debug, Clone)]
enum Morph {
    Off,
    Centroid(Centroid),
    Direction(Direction),
}

#[derive(Debug, Clone)]
struct Devices {
    /// Word vectors, grouped.
    words: Vec<Lin>,
    groups: Vec<Range<usize>>,
    /// The group of each word.
    group_of: Vec<u32>,
}

/// The auxiliary losses of a phase, set up once at its start.
#[derive(Debug, Clone)]
pub struct AuxLosses {
    config: AuxConfig,
    dim: usize,
    wake_count: usize,
    norm_target: f64,
    norm_margin: f64,
    morph: Morph,
    devices: Option<Devices>,
    stats: Stats,
}

/// Rows per chunk of the row-wise passes (a fixed chunking keeps sums reproducible).
const CHUNK_ROWS: usize = 512;

/// A uniform integer in `0..n` (Lemire's multiply-and-reject; `n > 0`).
fn below(rng: &mut Rng, n: usize) -> usize {
    debug_assert!(n > 0);
    let n = n as u64;
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = rng.next_u64() as u128 * n as u128;
        if m as u64 >= threshold {
            return (m >> 64) as usize;
        }
    }
}

/// `k` pairs `(i, j)` of `0..n`, `i ≠ j`, no unordered pair twice, uniformly; all the pairs
/// `i < j` in order when there are no more than `k`.
fn sample_pairs(rng: &mut Rng, n: usize, k: usize) -> Vec<(u32, u32)> {
    if n < 2 {
        return Vec::new();
    }
    let total = n as u128 * (n as u128 - 1) / 2;
    if total <= k as u128 {
        return (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i as u32, j as u32)))
            .collect();
    }
    let mut seen = HashSet::with_capacity(k);
    let mut out = Vec::with_capacity(k);
    while out.len() < k {
        let i = below(rng, n);
        let mut j = below(rng, n - 1);
        if j >= i {
            j += 1;
        }
        if seen.insert((i.min(j), i.max(j))) {
            out.push((i as u32, j as u32));
        }
    }
    out
}

/// `k` (anchor, positive, negative) word indices: the anchor uniform over all words, the
/// positive uniform over the anchor's group without the anchor, the negative uniform over the
/// other groups. Every group must have ≥ 2 words and there must be ≥ 2 groups.
fn sample_triplets(
    rng: &mut Rng,
    groups: &[Range<usize>],
    group_of: &[u32],
    k: usize,
) -> Vec<(usize, usize, usize)> {
    let total = group_of.len();
    (0..k)
        .map(|_| {
            let a = below(rng, total);
            let g = &groups[group_of[a] as usize];
            let mut p = g.start + below(rng, g.len() - 1);
            if p >= a {
                p += 1;
            }
            let mut n = below(rng, total - g.len());
            if n >= g.start {
                n += g.len();
            }
            (a, p, n)
        })
        .collect()
}

/// `(cos, |a|, |b|)`; the cosine is 0 when either vector is (nearly) zero.
fn cosine(a: &[f64], b: &[f64]) -> (f64, f64, f64) {
    let ab: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na < 1e-12 || nb < 1e-12 {
        return (0.0, na, nb);
    }
    (ab / (na * nb), na, nb)
}

/// `out += k · ∂cos(a, b)/∂a = k · (b/(|a||b|) − cos·a/|a|²)`.
fn add_cos_grad(out: &mut [f64], a: &[f64], b: &[f64], c: f64, na: f64, nb: f64, k: f64) {
    if na < 1e-12 || nb < 1e-12 {
        return;
    }
    let kb = k / (na * nb);
    let ka = k * c / (na * na);
    out.iter_mut()
        .zip(a.iter().zip(b))
        .for_each(|(o, (&x, &y))| *o += kb * y - ka * x);
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

impl AuxLosses {
    /// Sets the terms up from the configuration, the vocabulary (its layout gives the Wake
    /// rows `wake_start..wake_start + wake_count` and their words; its tokenizer, the extended
    /// one, places other words) and the full `[V, hidden]` embedding at phase start.
    pub fn build(
        config: &AuxConfig,
        vocab: &Vocabulary,
        embed: &[f32],
        hidden: usize,
    ) -> Result<Self> {
        config.validate()?;
        let layout = vocab.layout;
        let (start, count) = (layout.wake_start, layout.wake_count);
        ensure!(hidden > 0, "the embedding width is 0");
        ensure!(
            embed.len() % hidden == 0 && embed.len() / hidden >= start + count,
            "the embedding has {} values: not a [V, {hidden}] matrix with the {} rows the layout needs (Wake rows {start}..{})",
            embed.len(),
            start + count,
            start + count
        );
        ensure!(
            count >= 2,
            "the model has {count} Wake rows: the auxiliary losses need at least 2"
        );
        ensure!(
            layout.base_vocab <= start,
            "wake2vec.json: base_vocab {} is past wake_start {start}",
            layout.base_vocab
        );
        let rows = start + count;
        let index = WordIndex::new(vocab);
        let ids_of = |w: &str| word_ids(rows, vocab, &index, w);

        // norm band
        let base_rows: Vec<usize> = match vocab.tokenizer {
            Some(t) => {
                let mut ids: Vec<usize> = t
                    .get_vocab(true)
                    .into_values()
                    .map(|i| i as usize)
                    .filter(|&i| i < layout.base_vocab)
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            }
            None => (0..layout.base_vocab).collect(),
        };
        ensure!(
            base_rows.len() >= 2,
            "the norm band needs at least 2 base rows with a token; found {}",
            base_rows.len()
        );
        let norms: Vec<f64> = base_rows
            .par_iter()
            .map(|&i| {
                embed[i * hidden..(i + 1) * hidden]
                    .iter()
                    .map(|&v| v as f64 * v as f64)
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let n = norms.len() as f64;
        let norm_target = norms.iter().sum::<f64>() / n;
        let norm_margin =
            (norms.iter().map(|x| (x - norm_target).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();

        let mut stats = Stats {
            morph: config.morph,
            morph_groups_in_file: 0,
            morph_groups: 0,
            morph_pairs: 0,
            morph_rows: 0,
            device_groups: 0,
            device_words: 0,
            device_rows: 0,
            norm_target,
            norm_margin,
            norm_base_rows: base_rows.len(),
            rep_pairs: (count * (count - 1) / 2).min(config.rep_pairs),
        };

        let morph = match config.morph {
            MorphVariant::Off => Morph::Off,
            MorphVariant::Centroid => Morph::Centroid(Self::build_centroid(
                &config.morphemes,
                vocab,
                &ids_of,
                embed,
                hidden,
                &mut stats,
            )?),
            MorphVariant::Direction => Morph::Direction(Self::build_direction(
                config, &ids_of, start, embed, hidden, &mut stats,
            )?),
        };
        let devices = if config.devices.as_os_str().is_empty() {
            None
        } else {
            Some(Self::build_devices(
                config, &ids_of, start, embed, hidden, &mut stats,
            )?)
        };
        Ok(AuxLosses {
            config: config.clone(),
            dim: hidden,
            wake_count: count,
            norm_target,
            norm_margin,
            morph,
            devices,
            stats,
        })
    }

    fn build_centroid(
        path: &Path,
        vocab: &Vocabulary,
        ids_of: &dyn Fn(&str) -> Option<Vec<usize>>,
        embed: &[f32],
        dim: usize,
        stats: &mut Stats,
    ) -> Result<Centroid> {
        let data = MorphemeData::load(path)?;
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
        let mut centroids: [HashMap<String, Vec<f64>>; 2] = Default::default();
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
        stats.morph_groups = centroids[0].len() + centroids[1].len();
        if stats.morph_groups == 0 {
            bail!(
                "{}: none of its {} affixes has an example word the tokenizer can encode, so no centroid can be made; give example words (wake2vec morphemes mine writes them)",
                path.display(),
                stats.morph_groups_in_file
            );
        }
        let decomposer = Decomposer::new(&usable);
        let mut combos: HashMap<(String, String), u32> = HashMap::new();
        let mut targets: Vec<f64> = Vec::new();
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
                    targets.extend_from_slice(&t);
                    next
                });
            rows.push((i as u32, t));
        }
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

    fn build_direction(
        config: &AuxConfig,
        ids_of: &dyn Fn(&str) -> Option<Vec<usize>>,
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
        let reached: HashSet<u32> = pairs
            .iter()
            .flat_map(|p| p.terms.iter().map(|t| t.0))
            .collect();
        if reached.is_empty() {
            bail!(
                "{}: no word or base of its usable pairs contains a Wake token, so L_morph cannot train the Wake rows; use groups of this lexicon's words",
                path.display()
            );
        }
        stats.morph_groups = groups.len();
        stats.morph_pairs = pairs.len();
        stats.morph_rows = reached.len();
        Ok(Direction { pairs, groups })
    }

    fn build_devices(
        config: &AuxConfig,
        ids_of: &dyn Fn(&str) -> Option<Vec<usize>>,
        start: usize,
        embed: &[f32],
        dim: usize,
        stats: &mut Stats,
    ) -> Result<Devices> {
        let path = &config.devices;
        let file_groups = load_device_groups(path)?;
        let mut words = Vec::new();
        let mut groups = Vec::new();
        let mut group_of = Vec::new();
        for list in file_groups.values() {
            let mut seen = HashSet::new();
            let kept: Vec<Lin> = list
                .iter()
                .filter(|w| seen.insert(w.as_str()))
                .filter_map(|w| {
                    let ids = ids_of(w)?;
                    let mut v = Lin::default();
                    v.add_mean(&ids, 1.0, start, embed, dim);
                    Some(v.finish())
                })
                .collect();
            if kept.len() < config.min_group_size {
                continue;
            }
            group_of.extend(std::iter::repeat_n(groups.len() as u32, kept.len()));
            groups.push(words.len()..words.len() + kept.len());
            words.extend(kept);
        }
        if groups.len() < 2 {
            bail!(
                "{}: {} device group(s) of {} has at least {} words the tokenizer can encode; triplets need 2 groups",
                path.display(),
                groups.len(),
                file_groups.len(),
                config.min_group_size
            );
        }
        let reached: HashSet<u32> = words
            .iter()
            .flat_map(|w| w.terms.iter().map(|t| t.0))
            .collect();
        if reached.is_empty() {
            bail!(
                "{}: none of its words contains a Wake token, so L_device cannot train the Wake rows",
                path.display()
            );
        }
        stats.device_groups = groups.len();
        stats.device_words = words.len();
        stats.device_rows = reached.len();
        Ok(Devices {
            words,
            groups,
            group_of,
        })
    }

    /// Reads the layout (`wake2vec.json`) and the extended tokenizer of an injected model
    /// directory, then [`AuxLosses::build`].
    pub fn build_for_model(
        config: &AuxConfig,
        model_dir: &Path,
        tokenizer: &tokenizers::Tokenizer,
        embed: &[f32],
        hidden: usize,
    ) -> Result<Self> {
        let m = crate::vocab::Manifest::load(model_dir)?;
        let layout = crate::analysis::Layout {
            base_vocab: m.base_vocab,
            wake_start: m.wake_start,
            wake_count: m.wake_count,
            words: m.words,
        };
        let vocab = Vocabulary {
            layout: &layout,
            tokenizer: Some(tokenizer),
        };
        Self::build(config, &vocab, embed, hidden).with_context(|| {
            format!(
                "setting up the auxiliary losses for {}",
                model_dir.display()
            )
        })
    }

    /// What the setup found.
    pub fn participating(&self) -> &Stats {
        &self.stats
    }

    pub fn config(&self) -> &AuxConfig {
        &self.config
    }

    /// The value of each term for the Wake block `wake` (`[wake_count, D]`, row-major), drawing
    /// this step's rep pairs and device triplets from `rng`. With `grad` (`[wake_count, D]`),
    /// adds `scale · Σ_k λ_k ∂L_k/∂wake` to it.
    pub fn compute(
        &self,
        wake: &[f32],
        rng: &mut Rng,
        mut grad: Option<&mut [f32]>,
        scale: f32,
    ) -> Components {
        let dim = self.dim;
        assert_eq!(
            wake.len(),
            self.wake_count * dim,
            "the Wake block is not [wake_count, D]"
        );
        if let Some(g) = grad.as_deref() {
            assert_eq!(g.len(), wake.len(), "the gradient is not [wake_count, D]");
        }
        let scale = scale as f64;
        let c = &self.config;
        let (norm, centroid) = self.rowwise(wake, grad.as_deref_mut(), scale);
        let rep = self.repulsion(wake, rng, grad.as_deref_mut(), scale * c.lambda_rep);
        let morph = match &self.morph {
            Morph::Off => 0.0,
            Morph::Centroid(_) => centroid,
            Morph::Direction(d) => {
                self.direction(d, wake, grad.as_deref_mut(), scale * c.lambda_morph)
            }
        };
        let device = match &self.devices {
            None => 0.0,
            Some(d) => self.device(d, wake, rng, grad.as_deref_mut(), scale * c.lambda_device),
        };
        Components {
            morph,
            rep,
            norm,
            device,
            total_weighted: c.lambda_morph * morph
                + c.lambda_rep * rep
                + c.lambda_norm * norm
                + c.lambda_device * device,
        }
    }

    /// `L_norm` and the centroid `L_morph` (0 under another variant) in one pass over the rows,
    /// in fixed chunks.
    fn rowwise(&self, wake: &[f32], grad: Option<&mut [f32]>, scale: f64) -> (f64, f64) {
        let dim = self.dim;
        let centroid = match &self.morph {
            Morph::Centroid(c) => Some(c),
            _ => None,
        };
        let n_rows = self.wake_count as f64;
        let m_rows = centroid.map_or(1.0, |c| c.rows.len() as f64);
        // d L_norm / d e = (2 h sign / n) e/‖e‖; d L_morph / d e = 2 (e − t) / (M D)
        let k_norm = scale * self.config.lambda_norm * 2.0 / n_rows;
        let k_morph = scale * self.config.lambda_morph * 2.0 / (m_rows * dim as f64);
        let chunk = |ci: usize, block: &[f32], mut g: Option<&mut [f32]>| -> (f64, f64) {
            let first = ci * CHUNK_ROWS;
            let mut norm = 0f64;
            for (r, e) in block.chunks_exact(dim).enumerate() {
                let len = e.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                let off = len - self.norm_target;
                let h = off.abs() - self.norm_margin;
                if h > 0.0 {
                    norm += h * h;
                    if let Some(g) = g.as_deref_mut().filter(|_| k_norm != 0.0) {
                        if len > 0.0 {
                            let k = k_norm * h * off.signum() / len;
                            g[r * dim..(r + 1) * dim]
                                .iter_mut()
                                .zip(e)
                                .for_each(|(o, &v)| *o += (k * v as f64) as f32);
                        }
                    }
                }
            }
            let mut morph = 0f64;
            if let Some(c) = centroid {
                let lo = c.rows.partition_point(|x| (x.0 as usize) < first);
                let hi = c
                    .rows
                    .partition_point(|x| (x.0 as usize) < first + CHUNK_ROWS);
                for &(row, t) in &c.rows[lo..hi] {
                    let r = row as usize - first;
                    let e = &block[r * dim..(r + 1) * dim];
                    let t = &c.targets[t as usize * dim..(t as usize + 1) * dim];
                    let mut s = 0f64;
                    for (&x, &y) in e.iter().zip(t) {
                        let d = x as f64 - y;
                        s += d * d;
                    }
                    morph += s;
                    if let Some(g) = g.as_deref_mut().filter(|_| k_morph != 0.0) {
                        g[r * dim..(r + 1) * dim]
                            .iter_mut()
                            .zip(e.iter().zip(t))
                            .for_each(|(o, (&x, &y))| *o += (k_morph * (x as f64 - y)) as f32);
                    }
                }
            }
            (norm, morph)
        };
        let parts: Vec<(f64, f64)> = match grad {
            Some(g) => wake
                .par_chunks(CHUNK_ROWS * dim)
                .zip(g.par_chunks_mut(CHUNK_ROWS * dim))
                .enumerate()
                .map(|(ci, (b, g))| chunk(ci, b, Some(g)))
                .collect(),
            None => wake
                .par_chunks(CHUNK_ROWS * dim)
                .enumerate()
                .map(|(ci, b)| chunk(ci, b, None))
                .collect(),
        };
        let (mut norm, mut morph) = (0f64, 0f64);
        for (a, b) in parts {
            norm += a;
            morph += b;
        }
        (
            norm / n_rows,
            centroid.map_or(0.0, |_| morph / (m_rows * dim as f64)),
        )
    }

    fn repulsion(&self, wake: &[f32], rng: &mut Rng, grad: Option<&mut [f32]>, k: f64) -> f64 {
        let dim = self.dim;
        let pairs = sample_pairs(rng, self.wake_count, self.config.rep_pairs);
        if pairs.is_empty() {
            return 0.0;
        }
        let p = pairs.len() as f64;
        let row = |i: u32| -> Vec<f64> {
            wake[i as usize * dim..(i as usize + 1) * dim]
                .iter()
                .map(|&v| v as f64)
                .collect()
        };
        let mut grad = grad.filter(|_| k != 0.0);
        let mut loss = 0.0;
        let mut ga = vec![0f64; dim];
        let mut gb = vec![0f64; dim];
        for &(i, j) in &pairs {
            let (a, b) = (row(i), row(j));
            let (c, na, nb) = cosine(&a, &b);
            let h = c - self.config.rep_threshold;
            if h <= 0.0 {
                continue;
            }
            loss += h * h;
            if let Some(g) = grad.as_deref_mut() {
                // d/dc of h²/P
                let kc = k * 2.0 * h / p;
                ga.fill(0.0);
                gb.fill(0.0);
                add_cos_grad(&mut ga, &a, &b, c, na, nb, kc);
                add_cos_grad(&mut gb, &b, &a, c, nb, na, kc);
                for (r, gv) in [(i, &ga), (j, &gb)] {
                    g[r as usize * dim..(r as usize + 1) * dim]
                        .iter_mut()
                        .zip(gv.iter())
                        .for_each(|(o, &v)| *o += v as f32);
                }
            }
        }
        loss / p
    }

    fn direction(&self, d: &Direction, wake: &[f32], grad: Option<&mut [f32]>, k: f64) -> f64 {
        let dim = self.dim;
        let n = d.pairs.len() as f64;
        let mut grad = grad.filter(|_| k != 0.0);
        let mut loss = 0.0;
        let mut vecs: Vec<f64> = Vec::new();
        let mut mean = vec![0f64; dim];
        for g in &d.groups {
            vecs.resize(g.len() * dim, 0.0);
            mean.fill(0.0);
            for (i, p) in d.pairs[g.clone()].iter().enumerate() {
                let v = &mut vecs[i * dim..(i + 1) * dim];
                p.eval(wake, dim, v);
                mean.iter_mut().zip(v.iter()).for_each(|(m, &x)| *m += x);
            }
            mean.iter_mut().for_each(|m| *m /= g.len() as f64);
            for (i, p) in d.pairs[g.clone()].iter().enumerate() {
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

    fn device(
        &self,
        d: &Devices,
        wake: &[f32],
        rng: &mut Rng,
        grad: Option<&mut [f32]>,
        k: f64,
    ) -> f64 {
        let dim = self.dim;
        let triplets = sample_triplets(rng, &d.groups, &d.group_of, self.config.device_triplets);
        let t = triplets.len() as f64;
        let mut grad = grad.filter(|_| k != 0.0);
        let (mut a, mut p, mut n) = (vec![0f64; dim], vec![0f64; dim], vec![0f64; dim]);
        let (mut ga, mut gp, mut gn) = (vec![0f64; dim], vec![0f64; dim], vec![0f64; dim]);
        let mut loss = 0.0;
        for &(ia, ip, ineg) in &triplets {
            d.words[ia].eval(wake, dim, &mut a);
            d.words[ip].eval(wake, dim, &mut p);
            d.words[ineg].eval(wake, dim, &mut n);
            let (cp, na, np) = cosine(&a, &p);
            let (cn, _, nn) = cosine(&a, &n);
            let h = self.config.device_margin + cn - cp;
            if h <= 0.0 {
                continue;
            }
            loss += h;
            if let Some(g) = grad.as_deref_mut() {
                let kt = k / t;
                ga.fill(0.0);
                gp.fill(0.0);
                gn.fill(0.0);
                add_cos_grad(&mut ga, &a, &n, cn, na, nn, kt);
                add_cos_grad(&mut ga, &a, &p, cp, na, np, -kt);
                add_cos_grad(&mut gn, &n, &a, cn, nn, na, kt);
                add_cos_grad(&mut gp, &p, &a, cp, np, na, -kt);
                d.words[ia].backward(&ga, 1.0, g, dim);
                d.words[ip].backward(&gp, 1.0, g, dim);
                d.words[ineg].backward(&gn, 1.0, g, dim);
            }
        }
        loss / t
    }
}
