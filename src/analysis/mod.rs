//! The embedding-geometry suite (docs/origin/original-system.md §6, with the defects of its
//! Appendix B fixed): norms and two-sample tests, isotropy under two named definitions, nearest
//! base neighbours of Wake tokens, PCA on the full spectrum, pairwise cosine distributions with
//! a KS test, drift against a snapshot, morpheme directions and device cohesion.
//!
//! Input is one embedding matrix and the row layout from `wake2vec.json`; the output is the
//! [`Geometry`] written into `summary.json` (schema in `docs/analysis.md`) plus the arrays the
//! figures are drawn from ([`FigureData`]). This module holds the inputs, the outputs and the
//! order of the stages; each measurement has a module of its own.

pub mod collapse;
pub mod drift;
pub mod isoscore;
pub mod isotropy;
pub mod linalg;
pub mod load;
pub mod morph;
pub mod neighbours;
pub mod norms;
pub mod npy_random;
pub mod pairwise;
pub mod pca;
pub mod search;
pub mod stats;
pub mod trajectory;

use crate::util::rng::Rng;
use crate::vocab::Manifest;
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::ops::Range;
use std::time::Instant;

/// A row-major embedding matrix in f32.
#[derive(Clone, Debug)]
pub struct Embeddings {
    pub data: Vec<f32>,
    pub rows: usize,
    pub dim: usize,
}

impl Embeddings {
    /// A `rows × dim` matrix; refuses data of another length.
    pub fn new(data: Vec<f32>, rows: usize, dim: usize) -> Result<Self> {
        if data.len() != rows * dim {
            bail!(
                "embedding matrix has {} values, not {rows} × {dim}",
                data.len()
            );
        }
        Ok(Self { data, rows, dim })
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows `ids`, copied into a new matrix.
    pub fn gather(&self, ids: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len() * self.dim);
        for &i in ids {
            out.extend_from_slice(self.row(i));
        }
        out
    }

    /// The rows `range` as one slice.
    pub fn slice(&self, range: Range<usize>) -> &[f32] {
        &self.data[range.start * self.dim..range.end * self.dim]
    }
}

/// Which rows are base vocabulary and which are Wake rows (from `wake2vec.json`).
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Rows `0..base_vocab` are the base vocabulary (padded rows included).
    pub base_vocab: usize,
    /// Rows `wake_start..wake_start + wake_count` are Wake rows.
    pub wake_start: usize,
    pub wake_count: usize,
    /// `words[i]` is the word of row `wake_start + i` (may be empty when unknown).
    pub words: Vec<String>,
}

impl Layout {
    /// The layout a manifest describes.
    pub fn of(m: &Manifest) -> Self {
        Layout {
            base_vocab: m.base_vocab,
            wake_start: m.wake.start,
            wake_count: m.wake.count,
            words: m.words.clone(),
        }
    }

    /// The Wake rows.
    pub fn wake(&self) -> Range<usize> {
        self.wake_start..self.wake_start + self.wake_count
    }
}

/// Knobs of the suite; the defaults are the original's.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// Rows sampled per group for isotropy and mean cosine.
    pub isotropy_rows: usize,
    /// Rows sampled per group for the pairwise cosine distributions.
    pub pair_rows: usize,
    /// Neighbours reported per query.
    pub top_k: usize,
    /// Extra query words for the nearest-neighbour table (besides the original's 20-token sample).
    pub query_words: Vec<String>,
    /// Wake words listed as most moved by drift.
    pub most_moved: usize,
    /// The collapse threshold and the k of the k-occurrence.
    pub collapse: collapse::CollapseOptions,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seed: 42,
            isotropy_rows: 5000,
            pair_rows: 2000,
            top_k: 5,
            query_words: Vec::new(),
            most_moved: 20,
            collapse: collapse::CollapseOptions::default(),
        }
    }
}

/// Mean, standard deviations, extremes and count of a set of values.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Describe {
    pub n: usize,
    pub mean: f64,
    /// Population standard deviation (ddof 0), as the original reported.
    pub sd_population: f64,
    /// Sample standard deviation (ddof 1).
    pub sd_sample: f64,
    pub min: f64,
    pub max: f64,
}

/// The count, mean, standard deviations and extremes of `x`.
pub fn describe(x: &[f64]) -> Describe {
    let (mean, vp) = stats::mean_var(x, 0);
    let (_, vs) = stats::mean_var(x, 1);
    Describe {
        n: x.len(),
        mean,
        sd_population: vp.sqrt(),
        sd_sample: vs.sqrt(),
        min: x.iter().copied().fold(f64::INFINITY, f64::min),
        max: x.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

/// The rows the drift is measured against: a full matrix, or Wake rows only (a snapshot).
pub enum DriftReference {
    Full(Embeddings),
    WakeOnly(Embeddings),
}

/// Everything `summary.json` holds about the geometry.
#[derive(Debug, Clone, Serialize)]
pub struct Geometry {
    pub shape: [usize; 2],
    pub base_vocab: usize,
    pub wake_start: usize,
    pub wake_count: usize,
    pub seed: u64,
    pub norms: norms::Norms,
    pub isotropy: isotropy::IsotropyGroups,
    pub isoscore: isoscore::IsoScores,
    pub neighbours: Vec<neighbours::NeighbourQuery>,
    pub pca: pca::PcaGroups,
    /// Wake rows collapsed onto byte tokens (needs the tokenizer; with Wake rows).
    pub collapse: Option<collapse::Collapse>,
    /// k-occurrence of the base rows among the Wake rows' neighbours (with Wake rows).
    pub hubness: Option<collapse::Hubness>,
    pub pairwise_cosine: Option<pairwise::Pairwise>,
    pub drift: Option<drift::Drift>,
    pub morphemes: Option<morph::MorphemeReport>,
    pub devices: Option<morph::DeviceReport>,
    /// Wall time of each stage, in order.
    pub timings_s: Vec<Timing>,
}

/// Wall and CPU time of one stage of the suite.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub stage: String,
    /// Wall time.
    pub seconds: f64,
    /// CPU time of the process (user + system, all threads): on a shared machine this, not
    /// the wall time, is what the stage costs.
    pub cpu_seconds: f64,
}

/// User + system CPU seconds of this process so far (0 where getrusage fails).
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; it has no other effect.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Arrays the figures and the files beside summary.json are drawn from (not serialized).
#[derive(Debug, Clone, Default)]
pub struct FigureData {
    pub base_norms: Vec<f64>,
    pub wake_norms: Vec<f64>,
    /// Norm of every row, by row index.
    pub all_norms: Vec<f64>,
    pub wake_range: Range<usize>,
    pub cos_base_base: Vec<f64>,
    pub cos_wake_wake: Vec<f64>,
    pub cos_base_wake: Vec<f64>,
    pub pca_base_ratios: Vec<f64>,
    pub pca_wake_ratios: Vec<f64>,
    pub drift_base_cos: Vec<f64>,
    pub drift_wake_cos: Vec<f64>,
    /// Every collapsed Wake row, for `collapse.tsv`.
    pub collapsed: Vec<collapse::Collapsed>,
}

/// Word/token strings for ids: Wake words from the layout, others from the tokenizer.
pub struct Vocabulary<'a> {
    pub layout: &'a Layout,
    pub tokenizer: Option<&'a tokenizers::Tokenizer>,
}

impl Vocabulary<'_> {
    /// The word of row `id`: its Wake word, else the tokenizer's decoding, else `#id`.
    pub fn word(&self, id: usize) -> String {
        let wake = self.layout.wake();
        if wake.contains(&id) {
            if let Some(w) = self.layout.words.get(id - wake.start) {
                if !w.is_empty() {
                    return w.clone();
                }
            }
        }
        match self.tokenizer {
            Some(t) => t
                .decode(&[id as u32], false)
                .unwrap_or_else(|_| format!("#{id}")),
            None => format!("#{id}"),
        }
    }

    /// The vocabulary's spelling of row `id` (`Ġthe`, `<0xE2>`), else [`Self::word`].
    pub fn piece(&self, id: usize) -> String {
        self.tokenizer
            .and_then(|t| t.id_to_token(id as u32))
            .unwrap_or_else(|| self.word(id))
    }

    /// Which of the first `base` rows are byte tokens (`vocab::tokenizer::byte_token_ids`);
    /// `None` without a tokenizer.
    pub fn byte_tokens(&self, base: usize) -> Option<Vec<bool>> {
        let t = self.tokenizer?;
        let mut is = vec![false; base];
        for id in crate::vocab::tokenizer::byte_token_ids(t) {
            if let Some(b) = is.get_mut(id as usize) {
                *b = true;
            }
        }
        Some(is)
    }

    /// The row of a query word: a Wake word by the layout, else the tokenizer's single token
    /// for " word" (word-start form) or "word".
    pub fn id_of(&self, word: &str) -> Option<usize> {
        if let Some(i) = self.layout.words.iter().position(|w| w == word) {
            return Some(self.layout.wake_start + i);
        }
        let t = self.tokenizer?;
        for form in [format!(" {word}"), word.to_string()] {
            if let Ok(enc) = t.encode(form.as_str(), false) {
                if enc.get_ids().len() == 1 {
                    return Some(enc.get_ids()[0] as usize);
                }
            }
        }
        None
    }
}

/// `k` distinct indices of `0..n` drawn uniformly without replacement (partial Fisher-Yates),
/// in draw order; all of `0..n` in order when `k ≥ n`.
pub fn sample_indices(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    if k >= n {
        return (0..n).collect();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + (rng.next_f64() * (n - i) as f64) as usize;
        idx.swap(i, j.min(n - 1));
    }
    idx.truncate(k);
    idx
}

/// The rows of `x` scaled to unit length, in f64.
fn unit_rows_f64(x: &[f32], dim: usize) -> Vec<f64> {
    let mut out = vec![0f64; x.len()];
    out.par_chunks_exact_mut(dim)
        .zip(x.par_chunks_exact(dim))
        .for_each(|(o, r)| {
            let n = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let n = n.max(1e-12);
            o.iter_mut().zip(r).for_each(|(a, &b)| *a = b as f64 / n);
        });
    out
}

/// Whether the Wake rows form a group for the group statistics (norm tests, isotropy, PCA,
/// pairwise cosines): two rows or more.
fn has_wake_group(layout: &Layout) -> bool {
    layout.wake_count >= 2
}

/// The whole suite.
pub struct Analysis {
    pub geometry: Geometry,
    pub figures: FigureData,
}

/// Runs every analysis on `e` with the row `layout`. `reference` gives drift; `groups` the
/// optional morpheme and device groups.
pub fn analyze(
    e: &Embeddings,
    layout: &Layout,
    vocab: &Vocabulary,
    opts: &Options,
    reference: Option<(&str, &DriftReference)>,
    groups: &morph::Groups,
) -> Result<Analysis> {
    check_layout(e, layout)?;
    let mut watch = Stopwatch::start();
    let mut figures = FigureData::default();
    let norms = norms::norms(e, layout, &mut figures);
    watch.lap("norms_tests");
    let samples = draw_samples(e.rows, layout, opts);
    let isotropy = isotropy::groups(e, samples.isotropy)?;
    watch.lap("isotropy");
    let neighbours = neighbours::neighbours(e, layout, vocab, opts)?;
    watch.lap("neighbours");
    let pca = pca::groups(e, layout, &mut figures)?;
    watch.lap("pca");
    let isoscore = isoscore::groups(
        e,
        &figures.pca_base_ratios,
        has_wake_group(layout).then_some(&figures.pca_wake_ratios[..]),
    )?;
    watch.lap("isoscore");
    let (collapse, hubness) = if layout.wake_count > 0 {
        let c = collapse::crowding(e, layout, vocab, opts.collapse)?;
        figures.collapsed = c.collapsed;
        (c.collapse, Some(c.hubness))
    } else {
        (None, None)
    };
    watch.lap("collapse_hubness");
    let pairwise_cosine = match &samples.pairs {
        Some((base, wake)) => Some(pairwise::pairwise(e, base, wake, &mut figures)?),
        None => None,
    };
    watch.lap("pairwise_ks");
    let drift = match reference {
        Some((name, r)) => Some(drift::drift(e, layout, vocab, name, r, opts, &mut figures)?),
        None => None,
    };
    watch.lap("drift");
    let morphemes = match &groups.morphemes {
        Some(g) => Some(morph::morpheme_directions(e, g, vocab)?),
        None => None,
    };
    let devices = match &groups.devices {
        Some(g) => Some(morph::device_cohesion(e, g, vocab)?),
        None => None,
    };
    watch.lap("morphemes_devices");
    Ok(Analysis {
        geometry: Geometry {
            shape: [e.rows, e.dim],
            base_vocab: layout.base_vocab,
            wake_start: layout.wake_start,
            wake_count: layout.wake_count,
            seed: opts.seed,
            norms,
            isotropy,
            isoscore,
            neighbours,
            pca,
            collapse,
            hubness,
            pairwise_cosine,
            drift,
            morphemes,
            devices,
            timings_s: watch.timings,
        },
        figures,
    })
}

/// Refuses a layout that does not fit the matrix.
fn check_layout(e: &Embeddings, layout: &Layout) -> Result<()> {
    let base_vocab = layout.base_vocab;
    if base_vocab < 2 || base_vocab > e.rows {
        bail!(
            "base vocabulary of {base_vocab} rows does not fit a matrix of {} rows: \
             check wake2vec.json or --base-vocab",
            e.rows
        );
    }
    if layout.wake().end > e.rows {
        bail!(
            "Wake rows {}..{} exceed the matrix's {} rows: wake2vec.json does not belong to \
             this model",
            layout.wake_start,
            layout.wake().end,
            e.rows
        );
    }
    Ok(())
}

/// Wall and CPU time of consecutive stages.
struct Stopwatch {
    timings: Vec<Timing>,
    clock: Instant,
    cpu: f64,
}

impl Stopwatch {
    fn start() -> Self {
        Self {
            timings: Vec::new(),
            clock: Instant::now(),
            cpu: process_cpu_seconds(),
        }
    }

    /// Ends the stage `name`; the next one starts now.
    fn lap(&mut self, name: &str) {
        let now = process_cpu_seconds();
        self.timings.push(Timing {
            stage: name.to_string(),
            seconds: self.clock.elapsed().as_secs_f64(),
            cpu_seconds: now - self.cpu,
        });
        self.clock = Instant::now();
        self.cpu = now;
    }
}

/// The sampled rows of the isotropy and pairwise stages.
struct Samples {
    /// Rows of all rows, of the base rows and (with a Wake group) of the Wake rows, each with
    /// the range of its group.
    isotropy: Vec<(Vec<usize>, Range<usize>)>,
    /// Base rows and Wake rows for the pairwise cosines, with a Wake group.
    pairs: Option<(Vec<usize>, Vec<usize>)>,
}

/// One numpy-compatible generator (`default_rng(seed)`) draws, in order, the isotropy rows of
/// all / base / Wake, the reference script's 20 random query rows, then the pairwise rows of
/// base and Wake: the same rows as analysis_reference.py takes.
fn draw_samples(rows: usize, layout: &Layout, opts: &Options) -> Samples {
    let has_wake = has_wake_group(layout);
    let mut rng = npy_random::Pcg64::new(opts.seed);
    let mut draw = |range: Range<usize>, k: usize| -> Vec<usize> {
        rng.choice(range.len(), k.min(range.len()))
            .into_iter()
            .map(|i| range.start + i)
            .collect()
    };
    let mut groups = vec![0..rows, 0..layout.base_vocab];
    if has_wake {
        groups.push(layout.wake());
    }
    let isotropy = groups
        .into_iter()
        .map(|g| (draw(g.clone(), opts.isotropy_rows), g))
        .collect();
    let pairs = has_wake.then(|| {
        let _reference_queries = draw(layout.wake(), 20);
        (
            draw(0..layout.base_vocab, opts.pair_rows),
            draw(layout.wake(), opts.pair_rows),
        )
    });
    Samples { isotropy, pairs }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_without_replacement_and_seeded() {
        let mut a = Rng::new(42);
        let s = sample_indices(&mut a, 1000, 100);
        let mut t = s.clone();
        t.sort();
        t.dedup();
        assert_eq!(t.len(), 100);
        assert!(t.iter().all(|&i| i < 1000));
        assert_eq!(s, sample_indices(&mut Rng::new(42), 1000, 100));
        assert_eq!(sample_indices(&mut a, 5, 10), vec![0, 1, 2, 3, 4]);
    }
}
