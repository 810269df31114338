//! Initial values of the new embedding rows (docs/origin/original-system.md §2), seeded.
//!
//! Statistics come from the *base* rows the base tokenizer has a token for (padded rows of a
//! matrix larger than the tokenizer are left out). `μ_d`, `σ_d` are the per-dimension mean and
//! (unbiased) standard deviation over those rows, `s` the standard deviation over all their
//! entries, `z` a vector of standard normal draws (Box–Muller over [`Rng`]), `D` the width.
//!
//! - `mean-noise`: `μ + noise·σ ⊙ z`, noise 0.1 (the seed's TinyLlama run, §2.1).
//! - `spherical`: `r·g/‖g‖` with `g = z` and `r = k·s·√D`, k = 1.5 (§2.3).
//! - `subword-mean`: the mean of the rows of the word's pieces under the **base** tokenizer
//!   (with its word-start marker) `+ noise·s·z`, noise 0.01 (§2.6, without the original's
//!   self-lookup defect).
//! - `compositional`: `α·E(prefix) + (1−2α)·E(root) + α·E(suffix) + noise·s·z`, α = 0.25,
//!   noise 0.01 (§2.4), with the greedy longest-match decomposition ([`Decomposer`]).
//!   `E(affix)` is the mean, over the affix's example words, of each example's subword mean
//!   (an example that is one base token contributes its row); an affix without examples
//!   falls back to the subword mean of the affix itself. `E(root)` is the subword mean of the
//!   root (with the word-start marker when there is no prefix). A missing affix gives its
//!   weight to the root (`α·E(p) + (1−α)·E(r)`, or `E(r)` alone) instead of the original's
//!   zero vector, which shrank those rows.
//! - `hf-mean`: HF transformers' `resize_token_embeddings(mean_resizing=True)`
//!   (`_init_added_embeddings_weights_with_mean`): `μ'` and `Σ = XᵀX/N` (biased) of the centred
//!   rows over **every** row of the old matrix, padded rows included; when `1e-9·Σ` is positive
//!   definite (its Cholesky factor `L` exists in f32, torch's `positive_definite` check) each
//!   row is `μ' + L·z` (a draw of `N(μ', 1e-9·Σ)`, from our generator instead of torch's),
//!   else every row is `μ'` (transformers' fallback). Either way the rows are all nearly equal.
//! - `interpolation`: unsloth's `add_new_tokens(method="interpolation")`: `0.5·μ + 0.5·` the
//!   mean of the word's base pieces (word-start form), no noise.
//!
//! Rows are drawn in word order, each from the same generator, so a seed fixes them all.

use crate::lexicon::{Decomposer, MorphemeData};
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// An initialization scheme with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "kebab-case")]
pub enum InitScheme {
    MeanNoise { noise: f64 },
    Spherical { radius_factor: f64 },
    SubwordMean { noise: f64 },
    Compositional { alpha: f64, noise: f64 },
    HfMean,
    Interpolation,
}

impl InitScheme {
    /// The scheme named `name` with its default parameters.
    pub fn named(name: &str) -> Result<Self> {
        Ok(match name {
            "mean-noise" => InitScheme::MeanNoise { noise: 0.1 },
            "spherical" => InitScheme::Spherical { radius_factor: 1.5 },
            "subword-mean" => InitScheme::SubwordMean { noise: 0.01 },
            "compositional" => InitScheme::Compositional {
                alpha: 0.25,
                noise: 0.01,
            },
            "hf-mean" => InitScheme::HfMean,
            "interpolation" => InitScheme::Interpolation,
            other => bail!(
                "unknown init scheme '{other}': expected {}",
                Self::NAMES.join(", ")
            ),
        })
    }

    /// Every scheme's name.
    pub const NAMES: [&'static str; 6] = [
        "mean-noise",
        "spherical",
        "subword-mean",
        "compositional",
        "hf-mean",
        "interpolation",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            InitScheme::MeanNoise { .. } => "mean-noise",
            InitScheme::Spherical { .. } => "spherical",
            InitScheme::SubwordMean { .. } => "subword-mean",
            InitScheme::Compositional { .. } => "compositional",
            InitScheme::HfMean => "hf-mean",
            InitScheme::Interpolation => "interpolation",
        }
    }

    /// True when the scheme needs morpheme data.
    pub fn needs_morphemes(&self) -> bool {
        matches!(self, InitScheme::Compositional { .. })
    }

    /// Checks the parameters are in range.
    pub fn validate(&self) -> Result<()> {
        let ok = match *self {
            InitScheme::MeanNoise { noise } | InitScheme::SubwordMean { noise } => {
                noise >= 0.0 && noise.is_finite()
            }
            InitScheme::Spherical { radius_factor } => {
                radius_factor > 0.0 && radius_factor.is_finite()
            }
            InitScheme::Compositional { alpha, noise } => {
                (0.0..=0.5).contains(&alpha) && noise >= 0.0 && noise.is_finite()
            }
            InitScheme::HfMean | InitScheme::Interpolation => true,
        };
        if !ok {
            bail!(
                "bad parameters for init scheme {}: {self:?} (noise ≥ 0, radius factor > 0, 0 ≤ alpha ≤ 0.5)",
                self.name()
            );
        }
        Ok(())
    }
}

/// Base pieces of a text: `(text, word_start) → ids` (see `BaseTokenizer::pieces`).
pub type Pieces<'a> = &'a dyn Fn(&str, bool) -> Result<Vec<u32>>;

/// A row-major `[rows, dim]` f32 matrix (an embedding matrix or head).
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub dim: usize,
}

impl<'a> Matrix<'a> {
    pub fn rows(&self) -> usize {
        self.data.len() / self.dim
    }
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// The statistics of the base rows.
#[derive(Debug, Clone, Serialize)]
pub struct BaseStats {
    pub rows: usize,
    /// Norm of the mean row `‖μ‖`.
    pub mean_norm: f64,
    /// Average of the per-dimension standard deviations.
    pub mean_dim_std: f64,
    /// Standard deviation over all entries, `s`.
    pub std: f64,
    /// Mean row norm.
    pub mean_row_norm: f64,
    #[serde(skip)]
    pub mean: Vec<f64>,
    #[serde(skip)]
    pub dim_std: Vec<f64>,
}

/// `μ_d`, `σ_d` (unbiased), and `s` (unbiased, all entries) over `rows` of `m`.
pub fn base_stats(m: Matrix, rows: &[u32]) -> Result<BaseStats> {
    let d = m.dim;
    let n = rows.len();
    if n < 2 {
        bail!("need at least 2 base rows for statistics, got {n}");
    }
    let mut mean = vec![0.0f64; d];
    let mut row_norms = 0.0;
    for &r in rows {
        let row = m.row(r as usize);
        row_norms += row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        for (acc, &x) in mean.iter_mut().zip(row) {
            *acc += x as f64;
        }
    }
    mean.iter_mut().for_each(|x| *x /= n as f64);
    let global_mean = mean.iter().sum::<f64>() / d as f64;
    let mut var = vec![0.0f64; d];
    let mut global_ss = 0.0;
    for &r in rows {
        for ((acc, &x), mu) in var.iter_mut().zip(m.row(r as usize)).zip(&mean) {
            *acc += (x as f64 - mu).powi(2);
            global_ss += (x as f64 - global_mean).powi(2);
        }
    }
    let dim_std: Vec<f64> = var.iter().map(|v| (v / (n - 1) as f64).sqrt()).collect();
    Ok(BaseStats {
        rows: n,
        mean_norm: mean.iter().map(|x| x * x).sum::<f64>().sqrt(),
        mean_dim_std: dim_std.iter().sum::<f64>() / d as f64,
        std: (global_ss / (n * d - 1) as f64).sqrt(),
        mean_row_norm: row_norms / n as f64,
        mean,
        dim_std,
    })
}

/// How the words of a compositional init were decomposed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CompositionCounts {
    pub prefix_and_suffix: usize,
    pub prefix_only: usize,
    pub suffix_only: usize,
    pub root_only: usize,
}

/// New rows for `words`, `[words.len(), dim]` row-major, and (compositional) the
/// decomposition counts.
pub fn init_rows(
    m: Matrix,
    stat_rows: &[u32],
    words: &[String],
    pieces: Pieces,
    morphemes: Option<&MorphemeData>,
    scheme: InitScheme,
    rng: &mut Rng,
) -> Result<(Vec<f32>, Option<CompositionCounts>)> {
    scheme.validate()?;
    let stats = base_stats(m, stat_rows)?;
    let means = PieceMeans { m, pieces };
    match scheme {
        InitScheme::MeanNoise { noise } => Ok((mean_noise_rows(&stats, words, noise, rng), None)),
        InitScheme::Spherical { radius_factor } => Ok((
            spherical_rows(&stats, m.dim, words, radius_factor, rng),
            None,
        )),
        InitScheme::SubwordMean { noise } => {
            Ok((subword_mean_rows(&stats, &means, words, noise, rng)?, None))
        }
        InitScheme::Compositional { alpha, noise } => {
            let Some(data) = morphemes else {
                bail!("the compositional init needs morpheme data");
            };
            let (rows, counts) =
                compositional_rows(&stats, &means, data, words, (alpha, noise), rng)?;
            Ok((rows, Some(counts)))
        }
        InitScheme::HfMean => Ok((hf_mean_rows(m, words.len(), rng)?, None)),
        InitScheme::Interpolation => {
            let mut out = Vec::with_capacity(words.len() * m.dim);
            for w in words {
                let pieces = means.subword_mean(w, true)?;
                out.extend(
                    pieces
                        .iter()
                        .zip(&stats.mean)
                        .map(|(p, mu)| (0.5 * mu + 0.5 * p) as f32),
                );
            }
            Ok((out, None))
        }
    }
}

/// `hf-mean`: `n` rows as transformers' `mean_resizing` makes them from every row of `m`.
fn hf_mean_rows(m: Matrix, n: usize, rng: &mut Rng) -> Result<Vec<f32>> {
    let (d, rows) = (m.dim, m.rows());
    // transformers computes in f32; the sums here are f64, rounded to f32 where torch holds f32
    let mut mean = vec![0f64; d];
    for r in 0..rows {
        mean.iter_mut()
            .zip(m.row(r))
            .for_each(|(a, &x)| *a += x as f64);
    }
    mean.iter_mut().for_each(|a| *a /= rows as f64);
    let mut cov = vec![0f64; d * d];
    let mut c = vec![0f64; d];
    for r in 0..rows {
        c.iter_mut()
            .zip(m.row(r))
            .zip(&mean)
            .for_each(|((c, &x), mu)| *c = x as f64 - mu);
        for i in 0..d {
            let ci = c[i];
            for (acc, cj) in cov[i * d..i * d + i + 1].iter_mut().zip(&c[..=i]) {
                *acc += ci * cj;
            }
        }
    }
    let scaled: Vec<f32> = (0..d * d)
        .map(|k| {
            let (i, j) = (k / d, k % d);
            let v = if j <= i { cov[k] } else { cov[j * d + i] };
            (1e-9 * v / rows as f64) as f32
        })
        .collect();
    let mean32: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
    let Some(l) = cholesky_f32(&scaled, d) else {
        return Ok(mean32.repeat(n));
    };
    let mut out = Vec::with_capacity(n * d);
    let mut z = vec![0f64; d];
    for _ in 0..n {
        rng.fill_normal(&mut z);
        for i in 0..d {
            let lz: f64 = l[i * d..i * d + i + 1]
                .iter()
                .zip(&z)
                .map(|(&a, b)| a as f64 * b)
                .sum();
            out.push((mean32[i] as f64 + lz) as f32);
        }
    }
    Ok(out)
}

/// The lower Cholesky factor of the symmetric `d × d` matrix `a` in f32, or `None` when `a` is
/// not positive definite in f32 (a pivot ≤ 0 or not finite), as `torch.linalg.cholesky_ex`.
fn cholesky_f32(a: &[f32], d: usize) -> Option<Vec<f32>> {
    let mut l = vec![0f32; d * d];
    for i in 0..d {
        for j in 0..=i {
            let dot: f32 = (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            let v = a[i * d + j] - dot;
            if i == j {
                if v.is_nan() || v <= 0.0 || !v.is_finite() {
                    return None;
                }
                l[i * d + i] = v.sqrt();
            } else {
                l[i * d + j] = v / l[j * d + j];
            }
        }
    }
    Some(l)
}

/// `mean-noise`: `μ + noise·σ ⊙ z` per word.
fn mean_noise_rows(stats: &BaseStats, words: &[String], noise: f64, rng: &mut Rng) -> Vec<f32> {
    let mut out = Vec::with_capacity(words.len() * stats.mean.len());
    let mut z = vec![0.0f64; stats.mean.len()];
    for _ in words {
        rng.fill_normal(&mut z);
        out.extend(
            stats
                .mean
                .iter()
                .zip(&stats.dim_std)
                .zip(&z)
                .map(|((mu, sd), z)| (mu + noise * sd * z) as f32),
        );
    }
    out
}

/// `spherical`: `r·z/‖z‖` per word, `r = radius_factor·s·√D`.
fn spherical_rows(
    stats: &BaseStats,
    d: usize,
    words: &[String],
    radius_factor: f64,
    rng: &mut Rng,
) -> Vec<f32> {
    let radius = radius_factor * stats.std * (d as f64).sqrt();
    let mut out = Vec::with_capacity(words.len() * d);
    let mut z = vec![0.0f64; d];
    for _ in words {
        rng.fill_normal(&mut z);
        let norm = z.iter().map(|x| x * x).sum::<f64>().sqrt();
        out.extend(z.iter().map(|x| (radius * x / norm) as f32));
    }
    out
}

/// `subword-mean`: the mean of the word's base pieces `+ noise·s·z` per word.
fn subword_mean_rows(
    stats: &BaseStats,
    means: &PieceMeans,
    words: &[String],
    noise: f64,
    rng: &mut Rng,
) -> Result<Vec<f32>> {
    let d = means.m.dim;
    let mut out = Vec::with_capacity(words.len() * d);
    let mut z = vec![0.0f64; d];
    for w in words {
        let mean = means.subword_mean(w, true)?;
        rng.fill_normal(&mut z);
        out.extend(
            mean.iter()
                .zip(&z)
                .map(|(mu, z)| (mu + noise * stats.std * z) as f32),
        );
    }
    Ok(out)
}

/// `compositional`: `wp·E(prefix) + wr·E(root) + ws·E(suffix) + noise·s·z` per word, the
/// weights from [`composition_weights`]; `(alpha, noise)` are the scheme's.
fn compositional_rows(
    stats: &BaseStats,
    means: &PieceMeans,
    data: &MorphemeData,
    words: &[String],
    (alpha, noise): (f64, f64),
    rng: &mut Rng,
) -> Result<(Vec<f32>, CompositionCounts)> {
    let d = means.m.dim;
    let decomposer = Decomposer::new(data);
    let mut affixes = AffixMeans {
        means,
        data,
        cache: HashMap::new(),
    };
    let mut out = Vec::with_capacity(words.len() * d);
    let mut z = vec![0.0f64; d];
    let mut counts = CompositionCounts::default();
    for w in words {
        let parts = decomposer.decompose(w);
        let (has_p, has_s) = (!parts.prefix.is_empty(), !parts.suffix.is_empty());
        let (wp, wr, ws) = composition_weights(alpha, has_p, has_s, &mut counts);
        let mut row: Vec<f64> = means
            .subword_mean(&parts.root, !has_p)?
            .into_iter()
            .map(|x| wr * x)
            .collect();
        if has_p {
            for (r, x) in row.iter_mut().zip(affixes.get(&parts.prefix, true)?) {
                *r += wp * x;
            }
        }
        if has_s {
            for (r, x) in row.iter_mut().zip(affixes.get(&parts.suffix, false)?) {
                *r += ws * x;
            }
        }
        rng.fill_normal(&mut z);
        out.extend(
            row.iter()
                .zip(&z)
                .map(|(r, z)| (r + noise * stats.std * z) as f32),
        );
    }
    Ok((out, counts))
}

/// The weights `(prefix, root, suffix)` of a word with or without a prefix and a suffix (a
/// missing affix gives its weight to the root), counted into `counts`.
fn composition_weights(
    alpha: f64,
    has_p: bool,
    has_s: bool,
    counts: &mut CompositionCounts,
) -> (f64, f64, f64) {
    match (has_p, has_s) {
        (true, true) => {
            counts.prefix_and_suffix += 1;
            (alpha, 1.0 - 2.0 * alpha, alpha)
        }
        (true, false) => {
            counts.prefix_only += 1;
            (alpha, 1.0 - alpha, 0.0)
        }
        (false, true) => {
            counts.suffix_only += 1;
            (0.0, 1.0 - alpha, alpha)
        }
        (false, false) => {
            counts.root_only += 1;
            (0.0, 1.0, 0.0)
        }
    }
}

/// Means of rows of `m` picked by the base tokenizer's pieces.
struct PieceMeans<'a> {
    m: Matrix<'a>,
    pieces: Pieces<'a>,
}

impl PieceMeans<'_> {
    /// The mean of rows `ids` of the matrix (the pieces of `text`, named in errors), in f64.
    fn mean_of(&self, ids: &[u32], text: &str) -> Result<Vec<f64>> {
        let m = self.m;
        if ids.is_empty() {
            bail!("the base tokenizer gives no pieces for {text:?}");
        }
        let mut acc = vec![0.0f64; m.dim];
        for &id in ids {
            if id as usize >= m.rows() {
                bail!(
                    "piece id {id} of {text:?} is outside the {}-row matrix: the tokenizer does not match the model",
                    m.rows()
                );
            }
            for (a, &x) in acc.iter_mut().zip(m.row(id as usize)) {
                *a += x as f64;
            }
        }
        acc.iter_mut().for_each(|a| *a /= ids.len() as f64);
        Ok(acc)
    }

    /// The mean of the rows of `text`'s base pieces (with the word-start marker or not).
    fn subword_mean(&self, text: &str, word_start: bool) -> Result<Vec<f64>> {
        self.mean_of(&(self.pieces)(text, word_start)?, text)
    }
}

/// `E(affix)` of the compositional scheme, each affix computed once.
struct AffixMeans<'a> {
    means: &'a PieceMeans<'a>,
    data: &'a MorphemeData,
    cache: HashMap<(bool, String), Vec<f64>>,
}

impl AffixMeans<'_> {
    /// The mean over the affix's example words of each one's subword mean, or the affix's own
    /// subword mean when it has no examples.
    fn get(&mut self, affix: &str, is_prefix: bool) -> Result<Vec<f64>> {
        let key = (is_prefix, affix.to_string());
        if let Some(v) = self.cache.get(&key) {
            return Ok(v.clone());
        }
        let map = if is_prefix {
            &self.data.prefixes
        } else {
            &self.data.suffixes
        };
        let examples: Vec<&String> = map
            .iter()
            .find(|(a, _)| a.to_lowercase() == affix)
            .map(|(_, ex)| ex.iter().filter(|e| !e.trim().is_empty()).collect())
            .unwrap_or_default();
        let v = if examples.is_empty() {
            self.means.subword_mean(affix, is_prefix)?
        } else {
            let mut acc = vec![0.0f64; self.means.m.dim];
            for e in &examples {
                for (a, x) in acc.iter_mut().zip(self.means.subword_mean(e.trim(), true)?) {
                    *a += x;
                }
            }
            acc.iter_mut().for_each(|a| *a /= examples.len() as f64);
            acc
        };
        self.cache.insert(key, v.clone());
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_validation() {
        for name in InitScheme::NAMES {
            assert_eq!(InitScheme::named(name).unwrap().name(), name);
        }
        assert!(InitScheme::named("xavier").is_err());
        assert!(InitScheme::Spherical { radius_factor: 0.0 }
            .validate()
            .is_err());
        assert!(InitScheme::Compositional {
            alpha: 0.6,
            noise: 0.01
        }
        .validate()
        .is_err());
        let json = serde_json::to_value(InitScheme::named("spherical").unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"scheme": "spherical", "radius_factor": 1.5})
        );
    }

    #[test]
    fn hf_mean_draws_around_the_mean_of_every_row_or_falls_back_to_it() {
        // 400 rows in 3 dimensions with variances 1, 4, 9 (all rows, padding included)
        let mut rng = Rng::new(7);
        let mut data = vec![0f64; 400 * 3];
        rng.fill_normal(&mut data);
        let data: Vec<f32> = data
            .iter()
            .enumerate()
            .map(|(i, z)| (z * (1 + i % 3) as f64 + 2.0) as f32)
            .collect();
        let m = Matrix {
            data: &data,
            dim: 3,
        };
        let rows = hf_mean_rows(m, 2000, &mut Rng::new(1)).unwrap();
        let mean: Vec<f64> = (0..3)
            .map(|j| {
                data.iter()
                    .skip(j)
                    .step_by(3)
                    .map(|&x| x as f64)
                    .sum::<f64>()
                    / 400.0
            })
            .collect();
        for (j, want_mu) in mean.iter().enumerate() {
            let col: Vec<f64> = rows.iter().skip(j).step_by(3).map(|&x| x as f64).collect();
            let (mu, var) = crate::analysis::stats::mean_var(&col, 1);
            let pop: Vec<f64> = data.iter().skip(j).step_by(3).map(|&x| x as f64).collect();
            let (_, want) = crate::analysis::stats::mean_var(&pop, 0);
            assert!((mu - want_mu).abs() < 1e-5, "mean {mu} vs {want_mu}");
            // 1e-9 of the population variance, within sampling error (2,000 draws)
            let ratio = var / (1e-9 * want);
            assert!(
                (0.85..1.15).contains(&ratio),
                "dim {j}: variance ratio {ratio}"
            );
        }
        // rank-deficient (the third dimension is constant): not positive definite, so every
        // row is exactly the mean, as transformers falls back
        let flat: Vec<f32> = data.chunks(3).flat_map(|r| [r[0], r[1], 0.5]).collect();
        let m = Matrix {
            data: &flat,
            dim: 3,
        };
        let rows = hf_mean_rows(m, 4, &mut Rng::new(1)).unwrap();
        let first = rows[..3].to_vec();
        assert_eq!(first[2], 0.5);
        assert!(rows.chunks(3).all(|r| r == &first[..]));
    }

    #[test]
    fn interpolation_is_half_the_mean_and_half_the_pieces() {
        let data = [1.0f32, 2.0, 3.0, 6.0, 5.0, 10.0];
        let m = Matrix {
            data: &data,
            dim: 2,
        };
        let pieces = |_: &str, _: bool| -> Result<Vec<u32>> { Ok(vec![0, 2]) };
        let (rows, _) = init_rows(
            m,
            &[0, 1, 2],
            &["word".to_string()],
            &pieces,
            None,
            InitScheme::Interpolation,
            &mut Rng::new(3),
        )
        .unwrap();
        // the global mean (3, 6) equals the mean of rows 0 and 2
        assert_eq!(rows, [3.0, 6.0]);
        let pieces = |_: &str, _: bool| -> Result<Vec<u32>> { Ok(vec![0]) };
        let (rows, _) = init_rows(
            m,
            &[0, 1, 2],
            &["word".to_string()],
            &pieces,
            None,
            InitScheme::Interpolation,
            &mut Rng::new(3),
        )
        .unwrap();
        assert_eq!(rows, [2.0, 4.0]); // 0.5·(3, 6) + 0.5·(1, 2)
    }

    #[test]
    fn stats_are_unbiased() {
        // Rows (1, 2), (3, 6), (5, 10); row 3 is padding and left out.
        let data = [1.0, 2.0, 3.0, 6.0, 5.0, 10.0, 100.0, 100.0];
        let s = base_stats(
            Matrix {
                data: &data,
                dim: 2,
            },
            &[0, 1, 2],
        )
        .unwrap();
        assert_eq!(s.mean, [3.0, 6.0]);
        assert_eq!(s.dim_std, [2.0, 4.0]);
        // All six entries: mean 4.5, sum of squares 1+4+9+36+25+100 - 6·4.5² = 53.5.
        assert!((s.std - (53.5f64 / 5.0).sqrt()).abs() < 1e-12);
    }
}
