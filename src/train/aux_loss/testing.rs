//! What the terms' tests share: losses built by hand ([`parts`], [`problem`]), the
//! finite-difference check ([`check_gradient`]) and a tiny extended vocabulary ([`Tiny`]).

use super::device::Devices;
use super::morph::{Centroid, Direction, Morph};
use super::norm_band::NormBand;
use super::vectors::Lin;
use super::{below, AuxConfig, AuxLosses, Components, MorphVariant, Stats};
use crate::analysis::morph::{word_vector, WordIndex};
use crate::analysis::{Embeddings, Layout, Vocabulary};
use crate::util::rng::Rng;
use anyhow::Result;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// `n` standard normal values.
pub(super) fn normal(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = vec![0f64; n];
    rng.fill_normal(&mut v);
    v.into_iter().map(|x| x as f32).collect()
}

/// Every λ 0 except `on`'s, which is 1 (`"none"`: all 0; another name: all four, unequal).
pub(super) fn only(on: &str) -> AuxConfig {
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

/// The losses from their parts, without files or a vocabulary; `band`: the norm band's
/// (target, margin).
pub(super) fn parts(
    config: AuxConfig,
    dim: usize,
    wake_count: usize,
    band: (f64, f64),
    morph: Morph,
    devices: Option<Devices>,
) -> AuxLosses {
    let stats = Stats::before_setup(config.morph, (band.0, band.1, 0), config.rep_pairs);
    AuxLosses {
        config,
        dim,
        wake_count,
        norm: NormBand {
            target: band.0,
            margin: band.1,
            base_rows: 0,
        },
        morph,
        devices,
        on_device: None,
        stats,
    }
}

/// `fixed + Σ coef·wake[row]`, finished.
pub(super) fn lin(fixed: &[f64], terms: &[(u32, f64)]) -> Lin {
    Lin {
        fixed: fixed.to_vec(),
        terms: terms.to_vec(),
    }
    .finish()
}

/// The vectors of `groups` in one list, their ranges and the group of each.
fn grouped(groups: Vec<Vec<Lin>>) -> (Vec<Lin>, Vec<Range<usize>>, Vec<u32>) {
    let (mut all, mut ranges, mut of) = (Vec::new(), Vec::new(), Vec::new());
    for (g, list) in groups.into_iter().enumerate() {
        ranges.push(all.len()..all.len() + list.len());
        of.extend(std::iter::repeat_n(g as u32, list.len()));
        all.extend(list);
    }
    (all, ranges, of)
}

/// Device groups of the given word vectors.
pub(super) fn devices(groups: Vec<Vec<Lin>>) -> Devices {
    let (words, groups, group_of) = grouped(groups);
    Devices {
        words,
        groups,
        group_of,
    }
}

/// The direction variant over groups of the given differences.
pub(super) fn direction(groups: Vec<Vec<Lin>>) -> Morph {
    let (pairs, groups, _) = grouped(groups);
    Morph::Direction(Direction { pairs, groups })
}

/// A random `Lin` over `count` rows: 1–3 terms, a fixed part half of the time.
pub(super) fn random_lin(rng: &mut Rng, count: usize, dim: usize) -> Lin {
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

/// A small random problem with every term active, and its Wake block.
pub(super) fn problem(
    config: AuxConfig,
    variant: MorphVariant,
    seed: u64,
) -> (AuxLosses, Vec<f32>) {
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
pub(super) fn check_gradient(
    aux: &AuxLosses,
    wake: &[f32],
    value: fn(&Components) -> f64,
    what: &str,
) {
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

/// tiny-qwen2's tokenizer (400 ids, 408 rows: 8 padded) extended with a few Wake words.
pub(super) struct Tiny {
    pub(super) layout: Layout,
    pub(super) tokenizer: tokenizers::Tokenizer,
    pub(super) embed: Vec<f32>,
    /// A scratch directory of its own, removed on drop.
    pub(super) dir: PathBuf,
}

pub(super) const TINY_DIM: usize = 8;

impl Tiny {
    /// `tag` names the scratch directory (one per test: tests run in parallel).
    pub(super) fn new(tag: &str) -> Tiny {
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
        let dir = std::env::temp_dir().join(format!("wake2vec-aux-{tag}-{}", std::process::id()));
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

    pub(super) fn vocab(&self) -> Vocabulary<'_> {
        Vocabulary {
            layout: &self.layout,
            tokenizer: Some(&self.tokenizer),
        }
    }

    /// Writes `text` to `name` in the scratch directory.
    pub(super) fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// The Wake block.
    pub(super) fn wake(&self) -> &[f32] {
        &self.embed[408 * TINY_DIM..]
    }

    pub(super) fn build(&self, config: &AuxConfig) -> Result<AuxLosses> {
        AuxLosses::build(config, &self.vocab(), &self.embed, TINY_DIM)
    }

    /// A word's vector as the analysis computes it.
    pub(super) fn vector(&self, word: &str) -> Vec<f64> {
        let e = Embeddings::new(self.embed.clone(), self.embed.len() / TINY_DIM, TINY_DIM).unwrap();
        let vocab = self.vocab();
        word_vector(&e, &vocab, &WordIndex::new(&vocab), word).unwrap()
    }
}

impl Drop for Tiny {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The error `config` gives on `t`, checked to be one line.
pub(super) fn build_error(t: &Tiny, config: AuxConfig) -> String {
    let e = format!("{:#}", t.build(&config).unwrap_err());
    assert!(!e.contains('\n'), "{e}");
    e
}

/// The element-wise mean of `vs`.
pub(super) fn mean(vs: &[Vec<f64>]) -> Vec<f64> {
    let mut m = vec![0f64; vs[0].len()];
    for v in vs {
        m.iter_mut()
            .zip(v)
            .for_each(|(a, b)| *a += b / vs.len() as f64);
    }
    m
}

/// `Σ (a − b)²`.
pub(super) fn sq(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, &y)| (x - y as f64).powi(2)).sum()
}
