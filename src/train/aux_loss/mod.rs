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
use crate::util::rng::Rng;
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
    /// How many distinct Wake rows the vectors `lins` depend on.
    fn rows_reached(lins: &[Lin]) -> usize {
        lins.iter()
            .flat_map(|l| l.terms.iter().map(|t| t.0))
            .collect::<HashSet<u32>>()
            .len()
    }

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
    /// Targets, `[T, D]` (f32 like the rows: the rounding only fixes the target).
    targets: Vec<f32>,
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

/// `Σ x²` in f64 over 8 interleaved lanes (a fixed order the compiler can vectorise).
fn sum_sq(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        acc.iter_mut()
            .zip(c)
            .for_each(|(a, &v)| *a += v as f64 * v as f64);
    }
    let mut s = acc.iter().sum::<f64>();
    for &v in rest {
        s += v as f64 * v as f64;
    }
    s
}

/// `Σ (x − y)²` in f64, as [`sum_sq`].
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
            embed.len().is_multiple_of(hidden) && embed.len() / hidden >= start + count,
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
        let reached = Lin::rows_reached(&words);
        if reached == 0 {
            bail!(
                "{}: none of its words contains a Wake token, so L_device cannot train the Wake rows",
                path.display()
            );
        }
        stats.device_groups = groups.len();
        stats.device_words = words.len();
        stats.device_rows = reached;
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
            Some(d) => self.device(d, wake, rng, grad, scale * c.lambda_device),
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
                let len = sum_sq(e).sqrt();
                let off = len - self.norm_target;
                let h = off.abs() - self.norm_margin;
                if h > 0.0 {
                    norm += h * h;
                    if let Some(g) = g.as_deref_mut().filter(|_| k_norm != 0.0) {
                        if len > 0.0 {
                            let k = (k_norm * h * off.signum() / len) as f32;
                            g[r * dim..(r + 1) * dim]
                                .iter_mut()
                                .zip(e)
                                .for_each(|(o, &v)| *o += k * v);
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
                    morph += sq_dist(e, t);
                    if let Some(g) = g.as_deref_mut().filter(|_| k_morph != 0.0) {
                        let k = k_morph as f32;
                        g[r * dim..(r + 1) * dim]
                            .iter_mut()
                            .zip(e.iter().zip(t))
                            .for_each(|(o, (&x, &y))| *o += k * (x - y));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{morph::word_vector, Embeddings, Layout};

    fn normal(rng: &mut Rng, n: usize) -> Vec<f32> {
        let mut v = vec![0f64; n];
        rng.fill_normal(&mut v);
        v.into_iter().map(|x| x as f32).collect()
    }

    /// Every λ 0 except `on`'s, which is 1.
    fn only(on: &str) -> AuxConfig {
        let mut c = AuxConfig {
            lambda_morph: 0.0,
            lambda_rep: 0.0,
            lambda_norm: 0.0,
            lambda_device: 0.0,
            ..AuxConfig::default()
        };
        match on {
            "morph" => c.lambda_morph = 1.0,
            "rep" => c.lambda_rep = 1.0,
            "norm" => c.lambda_norm = 1.0,
            "device" => c.lambda_device = 1.0,
            "none" => {}
            _ => {
                c.lambda_morph = 0.7;
                c.lambda_rep = 0.3;
                c.lambda_norm = 0.2;
                c.lambda_device = 0.4;
            }
        }
        c
    }

    fn parts(
        config: AuxConfig,
        dim: usize,
        wake_count: usize,
        band: (f64, f64),
        morph: Morph,
        devices: Option<Devices>,
    ) -> AuxLosses {
        let stats = Stats {
            morph: config.morph,
            morph_groups_in_file: 0,
            morph_groups: 0,
            morph_pairs: 0,
            morph_rows: 0,
            device_groups: 0,
            device_words: 0,
            device_rows: 0,
            norm_target: band.0,
            norm_margin: band.1,
            norm_base_rows: 0,
            rep_pairs: config.rep_pairs,
        };
        AuxLosses {
            config,
            dim,
            wake_count,
            norm_target: band.0,
            norm_margin: band.1,
            morph,
            devices,
            stats,
        }
    }

    fn lin(fixed: &[f64], terms: &[(u32, f64)]) -> Lin {
        Lin {
            fixed: fixed.to_vec(),
            terms: terms.to_vec(),
        }
        .finish()
    }

    fn grouped(groups: Vec<Vec<Lin>>) -> (Vec<Lin>, Vec<Range<usize>>, Vec<u32>) {
        let (mut all, mut ranges, mut of) = (Vec::new(), Vec::new(), Vec::new());
        for (g, list) in groups.into_iter().enumerate() {
            ranges.push(all.len()..all.len() + list.len());
            of.extend(std::iter::repeat_n(g as u32, list.len()));
            all.extend(list);
        }
        (all, ranges, of)
    }

    fn devices(groups: Vec<Vec<Lin>>) -> Devices {
        let (words, groups, group_of) = grouped(groups);
        Devices {
            words,
            groups,
            group_of,
        }
    }

    fn direction(groups: Vec<Vec<Lin>>) -> Morph {
        let (pairs, groups, _) = grouped(groups);
        Morph::Direction(Direction { pairs, groups })
    }

    /// A random `Lin` over `count` rows: 1–3 terms, a fixed part half of the time.
    fn random_lin(rng: &mut Rng, count: usize, dim: usize) -> Lin {
        let n = 1 + below(rng, 3);
        let terms: Vec<(u32, f64)> = (0..n)
            .map(|_| (below(rng, count) as u32, rng.next_f64() * 2.0 - 1.0))
            .collect();
        let fixed = if below(rng, 2) == 0 {
            Vec::new()
        } else {
            normal(rng, dim).into_iter().map(f64::from).collect()
        };
        lin(&fixed, &terms)
    }

    const DIM: usize = 5;
    const COUNT: usize = 7;

    /// A small random problem with every term active.
    fn problem(config: AuxConfig, variant: MorphVariant, seed: u64) -> (AuxLosses, Vec<f32>) {
        let mut rng = Rng::new(seed);
        let wake = normal(&mut rng, COUNT * DIM);
        let morph = match variant {
            MorphVariant::Centroid => {
                let targets = normal(&mut rng, 2 * DIM);
                Morph::Centroid(Centroid {
                    rows: vec![(0, 0), (2, 1), (3, 0), (6, 1)],
                    targets,
                })
            }
            MorphVariant::Direction => direction(
                (0..2)
                    .map(|_| (0..4).map(|_| random_lin(&mut rng, COUNT, DIM)).collect())
                    .collect(),
            ),
            MorphVariant::Off => Morph::Off,
        };
        let dev = devices(
            (0..3)
                .map(|_| (0..3).map(|_| random_lin(&mut rng, COUNT, DIM)).collect())
                .collect(),
        );
        let mean_norm = wake
            .chunks(DIM)
            .map(|r| r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt())
            .sum::<f64>()
            / COUNT as f64;
        let config = AuxConfig {
            morph: variant,
            rep_threshold: -0.5,
            rep_pairs: 12,
            device_triplets: 20,
            ..config
        };
        (
            parts(config, DIM, COUNT, (mean_norm, 0.1), morph, Some(dev)),
            wake,
        )
    }

    /// Central differences (f64, on the f32 inputs actually seen) against the analytic
    /// gradient of `value`, every coordinate.
    fn check_gradient(aux: &AuxLosses, wake: &[f32], value: fn(&Components) -> f64, what: &str) {
        let seed = 99;
        let mut grad = vec![0f32; wake.len()];
        let c = aux.compute(wake, &mut Rng::new(seed), Some(&mut grad), 1.0);
        assert!(
            value(&c) > 0.0,
            "{what}: the term is zero, the check would be empty"
        );
        let mut fd = vec![0f64; wake.len()];
        let mut x = wake.to_vec();
        for i in 0..wake.len() {
            let h = 1e-3f32;
            x[i] = wake[i] + h;
            let xp = x[i] as f64;
            let up = value(&aux.compute(&x, &mut Rng::new(seed), None, 1.0));
            x[i] = wake[i] - h;
            let xm = x[i] as f64;
            let down = value(&aux.compute(&x, &mut Rng::new(seed), None, 1.0));
            x[i] = wake[i];
            fd[i] = (up - down) / (xp - xm);
        }
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let gnorm = norm(&mut grad.iter().map(|&g| g as f64));
        let diff = norm(&mut grad.iter().zip(&fd).map(|(&g, f)| g as f64 - f));
        let gmax = grad.iter().fold(0f64, |m, &g| m.max((g as f64).abs()));
        assert!(gnorm > 0.0, "{what}: zero gradient");
        assert!(
            diff <= 1e-3 * gnorm,
            "{what}: |fd − analytic| {diff} vs |g| {gnorm}\n{grad:?}\n{fd:?}"
        );
        for (i, (&g, &f)) in grad.iter().zip(&fd).enumerate() {
            if (g as f64).abs() > 0.1 * gmax {
                assert!(
                    (g as f64 - f).abs() <= 1e-2 * (g as f64).abs(),
                    "{what}: coordinate {i}: analytic {g}, finite differences {f}"
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (aux, wake) = problem(only("norm"), MorphVariant::Off, 1);
        check_gradient(&aux, &wake, |c| c.norm, "L_norm");
        let (aux, wake) = problem(only("rep"), MorphVariant::Off, 2);
        check_gradient(&aux, &wake, |c| c.rep, "L_rep");
        let (aux, wake) = problem(only("morph"), MorphVariant::Centroid, 3);
        check_gradient(&aux, &wake, |c| c.morph, "L_morph centroid");
        let (aux, wake) = problem(only("morph"), MorphVariant::Direction, 4);
        check_gradient(&aux, &wake, |c| c.morph, "L_morph direction");
        let (aux, wake) = problem(only("device"), MorphVariant::Off, 5);
        check_gradient(&aux, &wake, |c| c.device, "L_device");
        // all four weighted together, and the scale
        for variant in [MorphVariant::Centroid, MorphVariant::Direction] {
            let (aux, wake) = problem(only("all"), variant, 6);
            check_gradient(&aux, &wake, |c| c.total_weighted, "Σ λ L");
            let c = aux.compute(&wake, &mut Rng::new(1), None, 1.0);
            let l = &aux.config;
            let total = l.lambda_morph * c.morph
                + l.lambda_rep * c.rep
                + l.lambda_norm * c.norm
                + l.lambda_device * c.device;
            assert_eq!(c.total_weighted, total);
            let mut g1 = vec![0f32; wake.len()];
            let mut g2 = vec![0.5f32; wake.len()];
            aux.compute(&wake, &mut Rng::new(1), Some(&mut g1), 1.0);
            aux.compute(&wake, &mut Rng::new(1), Some(&mut g2), -2.0);
            for (a, b) in g1.iter().zip(&g2) {
                assert!(
                    (b - 0.5 + 2.0 * a).abs() <= 1e-6 * (1.0 + a.abs()),
                    "{a} {b}"
                );
            }
        }
    }

    #[test]
    fn a_zero_lambda_reports_the_term_but_adds_no_gradient() {
        let (aux, wake) = problem(only("none"), MorphVariant::Centroid, 7);
        let mut grad = vec![0f32; wake.len()];
        let c = aux.compute(&wake, &mut Rng::new(3), Some(&mut grad), 1.0);
        assert!(
            c.morph > 0.0 && c.rep > 0.0 && c.norm > 0.0 && c.device > 0.0,
            "{c:?}"
        );
        assert_eq!(c.total_weighted, 0.0);
        assert!(grad.iter().all(|&g| g == 0.0));
    }

    #[test]
    fn norm_band_zero_inside_and_hand_value_outside() {
        let config = only("norm");
        let aux = parts(config.clone(), 2, 3, (2.0, 0.5), Morph::Off, None);
        // norms 2, 1.6, 2.5: all inside [1.5, 2.5]
        let inside = [2.0f32, 0.0, 0.0, 1.6, 1.5, 2.0];
        let c = aux.compute(&inside, &mut Rng::new(1), None, 1.0);
        assert_eq!(c.norm, 0.0);
        // norms 3.5 (1 past the band), 0.5 (1 below it), 2
        let outside = [3.5f32, 0.0, 0.0, 0.5, 2.0, 0.0];
        let mut grad = vec![0f32; 6];
        let c = aux.compute(&outside, &mut Rng::new(1), Some(&mut grad), 1.0);
        assert!((c.norm - 2.0 / 3.0).abs() < 1e-12, "{c:?}");
        // d/de of h²/3 along the row's direction: ±2h/3
        assert_eq!(grad, [2.0 / 3.0, 0.0, 0.0, -2.0 / 3.0, 0.0, 0.0]);
    }

    #[test]
    fn repulsion_zero_below_threshold_and_hand_value_above() {
        let aux = parts(only("rep"), 2, 3, (1.0, 10.0), Morph::Off, None);
        // three rows: all 3 pairs are drawn; cosines 0.8, 0, 0.6
        let low = [1.0f32, 0.0, 0.8, 0.6, 0.0, 1.0];
        assert_eq!(aux.compute(&low, &mut Rng::new(1), None, 1.0).rep, 0.0);
        // rows 0 and 1 parallel (cos 1): (1 − 0.95)² over 3 pairs
        let high = [1.0f32, 0.0, 3.0, 0.0, 0.0, 1.0];
        let c = aux.compute(&high, &mut Rng::new(1), None, 1.0);
        assert!((c.rep - 0.05f64.powi(2) / 3.0).abs() < 1e-15, "{c:?}");
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
    fn device_zero_when_separated_and_hand_value_otherwise() {
        let w = |r: u32, k: f64| lin(&[], &[(r, k)]);
        // rows 0, 1 along x, rows 2, 3 along y: cos(a, p) = 1, cos(a, n) = 0
        let dev = devices(vec![vec![w(0, 1.0), w(1, 2.0)], vec![w(2, 1.0), w(3, 3.0)]]);
        let aux = parts(only("device"), 2, 4, (1.0, 10.0), Morph::Off, Some(dev));
        let separated = [1.0f32, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.5];
        assert_eq!(
            aux.compute(&separated, &mut Rng::new(1), None, 1.0).device,
            0.0
        );
        // four orthogonal words: every triplet costs the margin, 0.2
        let dev = devices(vec![vec![w(0, 1.0), w(1, 1.0)], vec![w(2, 1.0), w(3, 1.0)]]);
        let aux = parts(only("device"), 4, 4, (1.0, 10.0), Morph::Off, Some(dev));
        let mut eye = [0f32; 16];
        (0..4).for_each(|i| eye[i * 5] = 1.0 + i as f32);
        let c = aux.compute(&eye, &mut Rng::new(1), None, 1.0);
        assert!((c.device - 0.2).abs() < 1e-15, "{c:?}");
    }

    #[test]
    fn samples_are_seeded_distinct_and_valid() {
        let a = sample_pairs(&mut Rng::new(5), 50, 100);
        assert_eq!(a, sample_pairs(&mut Rng::new(5), 50, 100));
        assert_ne!(a, sample_pairs(&mut Rng::new(6), 50, 100));
        assert_eq!(a.len(), 100);
        let mut seen = HashSet::new();
        for &(i, j) in &a {
            assert!(i != j && i < 50 && j < 50);
            assert!(seen.insert((i.min(j), i.max(j))), "pair {i},{j} twice");
        }
        // fewer distinct pairs than asked: each once
        assert_eq!(
            sample_pairs(&mut Rng::new(5), 3, 100),
            [(0, 1), (0, 2), (1, 2)]
        );
        // 15 of the 21 pairs of 7 rows: still no repeat
        let few = sample_pairs(&mut Rng::new(5), 7, 15);
        let set: HashSet<_> = few.iter().map(|&(i, j)| (i.min(j), i.max(j))).collect();
        assert_eq!(set.len(), 15);

        let groups = [0..2, 2..5, 5..10];
        let group_of = [0, 0, 1, 1, 1, 2, 2, 2, 2, 2];
        let t = sample_triplets(&mut Rng::new(8), &groups, &group_of, 2000);
        assert_eq!(
            t,
            sample_triplets(&mut Rng::new(8), &groups, &group_of, 2000)
        );
        let mut anchors = [0usize; 10];
        let mut negatives = [0usize; 10];
        for &(a, p, n) in &t {
            assert_ne!(a, p, "positive equals anchor");
            assert_eq!(group_of[a], group_of[p]);
            assert_ne!(group_of[a], group_of[n]);
            anchors[a] += 1;
            negatives[n] += 1;
            // a two-word group has one possible positive
            if a < 2 {
                assert_eq!(p, 1 - a);
            }
        }
        assert!(anchors.iter().all(|&c| c > 100), "{anchors:?}");
        assert!(negatives.iter().all(|&c| c > 50), "{negatives:?}");
    }

    #[test]
    fn same_inputs_same_rng_state_give_identical_bits_on_any_thread_count() {
        let (aux, wake) = problem(only("all"), MorphVariant::Direction, 11);
        let run = || {
            let mut rng = Rng::new(21);
            let mut grad = vec![0f32; wake.len()];
            let c = aux.compute(&wake, &mut rng, Some(&mut grad), 1.0);
            (c, grad, rng.state())
        };
        let many = run();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        assert_eq!(many.0, one.0);
        assert_eq!(
            many.1.iter().map(|g| g.to_bits()).collect::<Vec<_>>(),
            one.1.iter().map(|g| g.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(many.2, one.2);
        // without a gradient buffer: the same values, the same draws
        let mut rng = Rng::new(21);
        assert_eq!(aux.compute(&wake, &mut rng, None, 1.0), many.0);
        assert_eq!(rng.state(), many.2);
        // the next step draws other samples
        let next = aux.compute(&wake, &mut rng, None, 1.0);
        assert_ne!(next.rep, many.0.rep);
    }

    #[test]
    fn config_defaults_serde_and_validation() {
        let c = AuxConfig::default();
        c.validate().unwrap_err(); // centroid without a morpheme file
        let off = AuxConfig {
            morph: MorphVariant::Off,
            ..AuxConfig::default()
        };
        off.validate().unwrap();
        let text = toml::to_string(&off).unwrap();
        assert_eq!(toml::from_str::<AuxConfig>(&text).unwrap(), off);
        let parsed: AuxConfig =
            toml::from_str("morph = \"direction\"\nmorphemes = \"g.jsonl\"\nlambda_morph = 50.0")
                .unwrap();
        assert_eq!(parsed.morph, MorphVariant::Direction);
        assert_eq!(parsed.lambda_rep, 0.05);
        parsed.validate().unwrap();
        let err = toml::from_str::<AuxConfig>("lambda_mrph = 1.0").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let bad = [
            (
                AuxConfig {
                    lambda_device: 0.05,
                    ..off.clone()
                },
                "aux.devices is empty",
            ),
            (
                AuxConfig {
                    morph: MorphVariant::Direction,
                    morphemes: "morpheme_data.json".into(),
                    ..off.clone()
                },
                "wake_embedding_groups.jsonl",
            ),
            (c.clone(), "needs aux.morphemes"),
            (
                AuxConfig {
                    lambda_rep: -1.0,
                    ..off.clone()
                },
                "aux.lambda_rep = -1",
            ),
            (
                AuxConfig {
                    lambda_norm: f64::NAN,
                    ..off.clone()
                },
                "aux.lambda_norm = NaN",
            ),
            (
                AuxConfig {
                    rep_threshold: 1.0,
                    ..off.clone()
                },
                "rep_threshold",
            ),
            (
                AuxConfig {
                    min_group_size: 1,
                    ..off.clone()
                },
                "min_group_size",
            ),
            (
                AuxConfig {
                    rep_pairs: 0,
                    ..off.clone()
                },
                "rep_pairs",
            ),
        ];
        for (config, expected) in bad {
            let err = format!("{:#}", config.validate().unwrap_err());
            assert!(err.contains(expected), "{expected}: {err}");
            assert!(!err.contains('\n'));
        }
        // a devices file with λ 0 is allowed (reported, not trained)
        AuxConfig {
            devices: "d.jsonl".into(),
            ..off
        }
        .validate()
        .unwrap();
    }

    /// tiny-qwen2's tokenizer (400 ids, 408 rows: 8 padded) extended with a few Wake words.
    struct Tiny {
        layout: Layout,
        tokenizer: tokenizers::Tokenizer,
        embed: Vec<f32>,
        dir: PathBuf,
    }

    const TINY_DIM: usize = 8;

    impl Tiny {
        fn new(tag: &str) -> Tiny {
            let path = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/tiny-qwen2/tokenizer.json"
            );
            let base = crate::vocab::tokenizer::BaseTokenizer::from_file(Path::new(path)).unwrap();
            let words: Vec<String> = [
                "undoings",
                "unkind",
                "rerunning",
                "thinking",
                "riverrun",
                "redo",
            ]
            .iter()
            .map(|w| w.to_string())
            .collect();
            let ext = crate::vocab::tokenizer::extend(&base, &words, 408).unwrap();
            assert_eq!(ext.words, words);
            let rows = 408 + words.len();
            let mut embed = normal(&mut Rng::new(17), rows * TINY_DIM);
            // the padded rows must not count in the norm band
            embed[400 * TINY_DIM..408 * TINY_DIM].fill(100.0);
            let dir =
                std::env::temp_dir().join(format!("wake2vec-aux-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Tiny {
                layout: Layout {
                    base_vocab: 408,
                    wake_start: 408,
                    wake_count: words.len(),
                    words,
                },
                tokenizer: ext.tokenizer,
                embed,
                dir,
            }
        }

        fn vocab(&self) -> Vocabulary<'_> {
            Vocabulary {
                layout: &self.layout,
                tokenizer: Some(&self.tokenizer),
            }
        }

        fn file(&self, name: &str, text: &str) -> PathBuf {
            let p = self.dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        }

        fn wake(&self) -> &[f32] {
            &self.embed[408 * TINY_DIM..]
        }

        fn build(&self, config: &AuxConfig) -> Result<AuxLosses> {
            AuxLosses::build(config, &self.vocab(), &self.embed, TINY_DIM)
        }

        fn vector(&self, word: &str) -> Vec<f64> {
            let e =
                Embeddings::new(self.embed.clone(), self.embed.len() / TINY_DIM, TINY_DIM).unwrap();
            let vocab = self.vocab();
            word_vector(&e, &vocab, &WordIndex::new(&vocab), word).unwrap()
        }
    }

    impl Drop for Tiny {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn mean(vs: &[Vec<f64>]) -> Vec<f64> {
        let mut m = vec![0f64; vs[0].len()];
        for v in vs {
            m.iter_mut()
                .zip(v)
                .for_each(|(a, b)| *a += b / vs.len() as f64);
        }
        m
    }

    fn sq(a: &[f64], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, &y)| (x - y as f64).powi(2)).sum()
    }

    #[test]
    fn builds_on_a_tiny_vocabulary() {
        let t = Tiny::new("build");
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
        // the norm band: mean and sample std of the 400 rows with a token
        let norms: Vec<f64> = (0..400)
            .map(|i| sq(&[0.0; TINY_DIM], &t.embed[i * TINY_DIM..(i + 1) * TINY_DIM]).sqrt())
            .collect();
        let m = norms.iter().sum::<f64>() / 400.0;
        let sd = (norms.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 399.0).sqrt();
        assert_eq!(s.norm_base_rows, 400);
        assert!(
            (s.norm_target - m).abs() < 1e-12 && (s.norm_margin - sd).abs() < 1e-12,
            "{s:?}"
        );
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

        // direction: one group with 3 usable pairs, one with 2 (dropped)
        let groups = t.file(
            "groups.jsonl",
            "{\"morpheme\": \"-ing\", \"morpheme_type\": \"suffix\", \"examples\": [\"thinking\", \"rerunning\", \"sitting\"], \"bases\": [\"think\", \"rerun\", \"sit\"]}\n\
             {\"morpheme\": \"re-\", \"morpheme_type\": \"prefix\", \"examples\": [\"redo\", \"rerunning\"], \"bases\": [\"do\", \"running\"]}\n\
             {\"morpheme\": \"un-\", \"morpheme_type\": \"prefix\", \"examples\": [\"unkind\"]}\n",
        );
        let devices = t.file(
            "device_groups.jsonl",
            "{\"device\": \"pun\", \"examples\": [\"undoings\", \"riverrun\", \"redo\"]}\n\
             {\"device\": \"nonce\", \"examples\": [\"unkind\", \"thinking\", \"zzzq\", \"unkind\"]}\n\
             {\"device\": \"faust\", \"examples\": [\"faust\"]}\n",
        );
        let config = AuxConfig {
            morph: MorphVariant::Direction,
            morphemes: groups.clone(),
            devices: devices.clone(),
            lambda_device: 0.05,
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
        // pun 3 words, nonce 3 (duplicate once), faust dropped; 5 Wake rows reached
        assert_eq!((s.device_groups, s.device_words, s.device_rows), (2, 6, 5));
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
        let c = aux.compute(w, &mut Rng::new(1), None, 1.0);
        assert!(
            (c.morph - expected).abs() < 1e-9 * expected,
            "{} vs {expected}",
            c.morph
        );
        assert!(c.device > 0.0 && c.rep >= 0.0 && c.norm >= 0.0, "{c:?}");
        // the gradient reaches only the rows the terms use
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
        let t = Tiny::new("errors");
        let err = |config: AuxConfig| {
            let e = format!("{:#}", t.build(&config).unwrap_err());
            assert!(!e.contains('\n'), "{e}");
            e
        };
        let with = |morph, path: PathBuf| AuxConfig {
            morph,
            morphemes: path,
            ..AuxConfig::default()
        };
        let missing = t.dir.join("nope.json");
        let e = err(with(MorphVariant::Centroid, missing));
        assert!(e.contains("nope.json"), "{e}");
        let no_examples = t.file("empty.json", r#"{"prefixes": {"un": []}, "suffixes": {}}"#);
        let e = err(with(MorphVariant::Centroid, no_examples));
        assert!(
            e.contains("none of its 1 affixes has an example word"),
            "{e}"
        );
        let no_match = t.file(
            "nomatch.json",
            r#"{"prefixes": {"xy": ["unkind"]}, "suffixes": {}}"#,
        );
        let e = err(with(MorphVariant::Centroid, no_match));
        assert!(e.contains("no Wake word starts or ends"), "{e}");
        let small = t.file(
            "small.jsonl",
            "{\"morpheme\": \"re-\", \"morpheme_type\": \"prefix\", \"examples\": [\"redo\"], \"bases\": [\"do\"]}\n",
        );
        let e = err(with(MorphVariant::Direction, small));
        assert!(e.contains("no group has 3"), "{e}");
        let base_only = t.file(
            "baseonly.jsonl",
            "{\"morpheme\": \"-s\", \"morpheme_type\": \"suffix\", \"examples\": [\"cats\", \"dogs\", \"hats\"], \"bases\": [\"cat\", \"dog\", \"hat\"]}\n",
        );
        let e = err(with(MorphVariant::Direction, base_only));
        assert!(e.contains("contains a Wake token"), "{e}");
        let ragged = t.file(
            "ragged.jsonl",
            "{\"morpheme\": \"-s\", \"morpheme_type\": \"suffix\", \"examples\": [\"cats\", \"dogs\"], \"bases\": [\"cat\"]}\n",
        );
        let e = err(with(MorphVariant::Direction, ragged));
        assert!(e.contains("2 examples but 1 bases"), "{e}");
        let one_group = t.file(
            "devices.jsonl",
            "{\"device\": \"pun\", \"examples\": [\"undoings\", \"riverrun\", \"redo\"]}\n",
        );
        let e = err(AuxConfig {
            morph: MorphVariant::Off,
            devices: one_group,
            ..AuxConfig::default()
        });
        assert!(e.contains("triplets need 2 groups"), "{e}");
        let e = err(AuxConfig {
            lambda_device: 1.0,
            morph: MorphVariant::Off,
            ..AuxConfig::default()
        });
        assert!(e.contains("aux.devices is empty"), "{e}");
    }

    /// The setup on the injected SmolLM2 (`/root/models/smollm2-135m-wake`) with morpheme data
    /// mined from its own words; prints what takes part. Skips when the model is absent.
    /// `cargo test --release --lib aux_loss::tests::real_model_setup -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn real_model_setup() {
        let dir = Path::new("/root/models/smollm2-135m-wake");
        if !dir.join("wake2vec.json").is_file() {
            eprintln!("skipped: no injected model at {}", dir.display());
            return;
        }
        let e = crate::analysis::load::load_embeddings(dir).unwrap();
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let m = crate::vocab::Manifest::load(dir).unwrap();
        let known: HashSet<String> = m.words.iter().map(|w| w.to_lowercase()).collect();
        let data = crate::lexicon::morphemes::mine_affixes(
            &m.words,
            &|s: &str| known.contains(s),
            Default::default(),
        );
        let tmp = std::env::temp_dir().join(format!("wake2vec-aux-real-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let path = tmp.join("morpheme_data.json");
        data.save(&path).unwrap();
        let config = AuxConfig {
            morphemes: path,
            ..AuxConfig::default()
        };
        let t0 = std::time::Instant::now();
        let aux = AuxLosses::build_for_model(&config, dir, &tokenizer, &e.data, e.dim).unwrap();
        let setup = t0.elapsed().as_secs_f64();
        let wake = e.slice(m.wake_ids());
        let mut grad = vec![0f32; wake.len()];
        let t0 = std::time::Instant::now();
        let c = aux.compute(wake, &mut Rng::new(1), Some(&mut grad), 1.0);
        eprintln!(
            "setup {setup:.2} s, one step {:.1} ms\n{}\n{}",
            t0.elapsed().as_secs_f64() * 1e3,
            serde_json::to_string(aux.participating()).unwrap(),
            serde_json::to_string(&c).unwrap()
        );
        std::fs::remove_dir_all(&tmp).unwrap();
        assert!(aux.participating().morph_rows > 0);
    }

    /// Per-step cost on the seed's scale: 44,500 × 576 Wake rows. Prints; asserts nothing
    /// about time. `cargo test --release --lib aux_loss::tests::step_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn step_cost() {
        let (count, dim) = (44_500usize, 576usize);
        let mut rng = Rng::new(1);
        let wake = normal(&mut rng, count * dim);
        let base_dir =
            |rng: &mut Rng| -> Vec<f64> { normal(rng, dim).into_iter().map(f64::from).collect() };
        // centroid: every row takes part, 16 × 16 affix combinations
        let targets = normal(&mut rng, 256 * dim);
        let rows: Vec<(u32, u32)> = (0..count as u32).map(|r| (r, r % 256)).collect();
        // direction: 258 groups, 6,048 pairs; device: 5 groups, 2,123 words
        let pairs: Vec<Vec<Lin>> = (0..258)
            .map(|g| {
                (0..6048 / 258 + usize::from(g < 6048 % 258))
                    .map(|_| lin(&base_dir(&mut rng), &[(below(&mut rng, count) as u32, 1.0)]))
                    .collect()
            })
            .collect();
        let dev: Vec<Vec<Lin>> = [757, 690, 465, 150, 61]
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| lin(&[], &[(below(&mut rng, count) as u32, 1.0)]))
                    .collect()
            })
            .collect();
        let config = AuxConfig {
            lambda_device: 0.05,
            ..AuxConfig::default()
        };
        for (name, morph) in [
            ("centroid", Morph::Centroid(Centroid { rows, targets })),
            ("direction", direction(pairs)),
            ("off (norm, rep, device)", Morph::Off),
        ] {
            let aux = parts(
                config.clone(),
                dim,
                count,
                (1.0, 0.2),
                morph,
                Some(devices(dev.clone())),
            );
            let mut grad = vec![0f32; wake.len()];
            let mut rng = Rng::new(2);
            aux.compute(&wake, &mut rng, Some(&mut grad), 1.0);
            let n = 20;
            let time = |f: &mut dyn FnMut()| {
                let (t0, c0) = (
                    std::time::Instant::now(),
                    crate::analysis::process_cpu_seconds(),
                );
                for _ in 0..n {
                    f();
                }
                (
                    t0.elapsed().as_secs_f64() * 1e3 / n as f64,
                    (crate::analysis::process_cpu_seconds() - c0) * 1e3 / n as f64,
                )
            };
            let with = time(&mut || {
                aux.compute(&wake, &mut rng, Some(&mut grad), 1.0);
            });
            let without = time(&mut || {
                aux.compute(&wake, &mut rng, None, 1.0);
            });
            eprintln!(
                "{name}: per step {:.1} ms wall / {:.1} ms CPU with the gradient, {:.1} / {:.1} without ({} threads)",
                with.0,
                with.1,
                without.0,
                without.1,
                rayon::current_num_threads()
            );
        }
    }
}
