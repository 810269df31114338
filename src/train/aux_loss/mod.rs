//! Phase 3's auxiliary losses (docs/origin/original-system.md §5), computed from the Wake rows
//! of the embedding alone, with hand-written gradients.
//!
//! `L_aux = λ_morph·L_morph + λ_rep·L_rep + λ_norm·L_norm + λ_device·L_device`, where `D` is the
//! width, `e_r` a Wake row of the block being trained, and every "word vector" is the mean of
//! the rows of the word's tokens under the extended tokenizer ([`word_ids`]: the Wake row of a
//! Wake word, else the pieces of `" word"`). One file per term, holding its definition, setup,
//! value, gradient and tests:
//!
//! - `morph`: `L_morph`, MSE to affix centroids (`centroid`, the seed's) or consistent
//!   word − base differences within a morpheme group (`direction`, the original's);
//! - `repulsion`: `L_rep`, a hinge on the cosine of pairs of Wake rows drawn each step;
//! - `norm_band`: `L_norm`, a hinge keeping each row's norm in the band of the base rows';
//! - `device`: `L_device`, a triplet margin between literary-device groups, drawn each step;
//! - `vectors`: the word vectors and the cosine those terms share.
//!
//! Gradients reach the Wake rows only. Every term is computed (and reported, unweighted) whatever
//! its λ, so that a run can watch a term it does not train (λ = 0 skips only its gradient).
//! [`AuxLosses::compute`] draws the rep pairs and then the device triplets from the given
//! [`Rng`], so the same state gives the same samples; sums are accumulated in f64 over fixed
//! chunks in a fixed order, so values and gradients do not depend on the thread count.

mod device;
mod morph;
mod norm_band;
mod on_device;
mod repulsion;
#[cfg(test)]
mod testing;
mod vectors;

use crate::analysis::morph::{word_ids, WordIndex};
use crate::analysis::Vocabulary;
use crate::util::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use device::Devices;
use morph::Morph;
use norm_band::NormBand;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
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
    /// Which `L_morph`: `centroid`, `direction` or `off`.
    pub morph: MorphVariant,
    /// `centroid`: a `morpheme_data.json` (or a `wake_embedding_groups.jsonl`, read as its
    /// prefix and suffix groups); `direction`: a `wake_embedding_groups.jsonl`. Ignored when
    /// `morph = "off"`.
    pub morphemes: PathBuf,
    /// A `device_groups.jsonl` (or `device_classification.jsonl`); empty: no device term.
    pub devices: PathBuf,
    /// λ of `L_morph` in the total.
    pub lambda_morph: f64,
    /// λ of `L_rep`.
    pub lambda_rep: f64,
    /// λ of `L_norm`.
    pub lambda_norm: f64,
    /// λ of `L_device`; must be 0 without a devices file. A devices file with λ 0 computes and
    /// reports the term without training it.
    pub lambda_device: f64,
    /// `L_rep`: distinct pairs of Wake rows drawn per step.
    pub rep_pairs: usize,
    /// `L_rep`: the cosine above which a pair costs.
    pub rep_threshold: f64,
    /// `L_device`: (anchor, positive, negative) triplets drawn per step.
    pub device_triplets: usize,
    /// `L_device`: how far `cos(a, p)` must exceed `cos(a, n)` for a triplet to cost nothing.
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

impl Stats {
    /// The counts before the morpheme and device files are read: the norm band
    /// `(target, margin, base rows)` and the pairs drawn per step.
    fn before_setup(morph: MorphVariant, norm: (f64, f64, usize), rep_pairs: usize) -> Self {
        Stats {
            morph,
            morph_groups_in_file: 0,
            morph_groups: 0,
            morph_pairs: 0,
            morph_rows: 0,
            device_groups: 0,
            device_words: 0,
            device_rows: 0,
            norm_target: norm.0,
            norm_margin: norm.1,
            norm_base_rows: norm.2,
            rep_pairs,
        }
    }
}

/// The auxiliary losses of a phase, set up once at its start.
#[derive(Debug, Clone)]
pub struct AuxLosses {
    config: AuxConfig,
    dim: usize,
    wake_count: usize,
    norm: NormBand,
    morph: Morph,
    devices: Option<Devices>,
    stats: Stats,
    /// The terms on a device, for the generic kernels ([`AuxLosses::upload`]).
    on_device: Option<on_device::OnDevice>,
}

/// Rows per chunk of the row-wise passes (a fixed chunking keeps sums reproducible).
const CHUNK_ROWS: usize = 512;

/// A uniform integer in `0..n` (Lemire's multiply-and-reject; `n > 0`): the per-step draws of
/// `L_rep`'s pairs and `L_device`'s triplets.
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
        let norm = NormBand::measure(vocab, embed, hidden)?;
        let mut stats = Stats::before_setup(
            config.morph,
            (norm.target, norm.margin, norm.base_rows),
            (count * (count - 1) / 2).min(config.rep_pairs),
        );
        let morph = Morph::build(config, vocab, &ids_of, start, embed, hidden, &mut stats)?;
        let devices = if config.devices.as_os_str().is_empty() {
            None
        } else {
            Some(Devices::build(
                config, &ids_of, start, embed, hidden, &mut stats,
            )?)
        };
        Ok(AuxLosses {
            config: config.clone(),
            dim: hidden,
            wake_count: count,
            norm,
            morph,
            devices,
            stats,
            on_device: None,
        })
    }

    /// Uploads the terms' setup to `device`, for [`AuxLosses::compute_tensor`].
    pub fn upload(&mut self, device: &candle_core::Device) -> Result<()> {
        self.on_device = Some(on_device::OnDevice::new(self, device)?);
        Ok(())
    }

    /// [`AuxLosses::compute`] on the generic kernels: the Wake block `wake` (`[count, D]`) on
    /// its device after [`AuxLosses::upload`], the same draws from `rng`; returns the terms
    /// and `Σ_k λ_k L_k` as a scalar tensor whose backward pass gives the gradient.
    pub fn compute_tensor(
        &self,
        wake: &candle_core::Tensor,
        rng: &mut Rng,
    ) -> Result<(Components, candle_core::Tensor)> {
        let on = self
            .on_device
            .as_ref()
            .context("internal: the auxiliary losses were not uploaded to the device")?;
        ensure!(
            wake.dims() == [self.wake_count, self.dim],
            "the Wake block is {:?}, not [{}, {}]",
            wake.dims(),
            self.wake_count,
            self.dim
        );
        on.compute(self, wake, rng)
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
        let layout = crate::analysis::Layout::of(&crate::vocab::Manifest::load(model_dir)?);
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

    /// The settings it was built with.
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
        let rep = repulsion::loss(c, wake, dim, rng, grad.as_deref_mut(), scale * c.lambda_rep);
        let morph = match &self.morph {
            Morph::Off => 0.0,
            Morph::Centroid(_) => centroid,
            Morph::Direction(d) => d.loss(wake, dim, grad.as_deref_mut(), scale * c.lambda_morph),
        };
        let device = match &self.devices {
            None => 0.0,
            Some(d) => d.loss(c, wake, dim, rng, grad, scale * c.lambda_device),
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

    /// `L_norm` and the centroid `L_morph` (0 under another variant): both are sums over rows,
    /// taken in one pass over the block in fixed chunks of [`CHUNK_ROWS`] rows, then means.
    fn rowwise(&self, wake: &[f32], grad: Option<&mut [f32]>, scale: f64) -> (f64, f64) {
        let dim = self.dim;
        let centroid = self.morph.centroid();
        let n_rows = self.wake_count as f64;
        let m_rows = centroid.map_or(1.0, |c| c.rows.len() as f64);
        // d L_norm / d e = (2 h sign / n) e/‖e‖; d L_morph / d e = 2 (e − t) / (M D)
        let k_norm = scale * self.config.lambda_norm * 2.0 / n_rows;
        let k_morph = scale * self.config.lambda_morph * 2.0 / (m_rows * dim as f64);
        let chunk = |ci: usize, block: &[f32], mut g: Option<&mut [f32]>| -> (f64, f64) {
            let norm = self.norm.chunk(block, dim, g.as_deref_mut(), k_norm);
            let morph = centroid.map_or(0.0, |c| c.chunk(ci * CHUNK_ROWS, block, dim, g, k_morph));
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
}

#[cfg(test)]
mod tests {
    use super::morph::Centroid;
    use super::testing::{check_gradient, devices, direction, lin, normal, only, parts, problem};
    use super::vectors::Lin;
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn weighted_total_gradient_matches_finite_differences_and_scales() {
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
        let wake = e.slice(m.wake.range());
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
