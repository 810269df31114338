//! `L_norm` (docs/origin/original-system.md §5.8): keeps every Wake row's length in the band of
//! the base rows' lengths.
//!
//! `L = mean_r max(0, |‖e_r‖ − T| − M)²` over every Wake row; `T` and `M` are the mean and the
//! **sample** standard deviation (n − 1, torch's `.std()`) of the L2 norms of the base rows the
//! tokenizer has a token for (padded rows of a matrix larger than the tokenizer are left out, as
//! in the init statistics), measured at phase start.

use crate::analysis::Vocabulary;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// The band `target ± margin`, measured once at phase start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct NormBand {
    pub(super) target: f64,
    pub(super) margin: f64,
    /// The base rows it was measured on.
    pub(super) base_rows: usize,
}

impl NormBand {
    /// The mean and sample standard deviation of the norms of the base rows of `embed`
    /// (`[V, dim]`) that the vocabulary's tokenizer has a token for (without a tokenizer, all
    /// `base_vocab` of them).
    pub(super) fn measure(vocab: &Vocabulary, embed: &[f32], dim: usize) -> Result<NormBand> {
        let base_vocab = vocab.layout.base_vocab;
        let base_rows: Vec<usize> = match vocab.tokenizer {
            Some(t) => {
                let mut ids: Vec<usize> = t
                    .get_vocab(true)
                    .into_values()
                    .map(|i| i as usize)
                    .filter(|&i| i < base_vocab)
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            }
            None => (0..base_vocab).collect(),
        };
        ensure!(
            base_rows.len() >= 2,
            "the norm band needs at least 2 base rows with a token; found {}",
            base_rows.len()
        );
        let norms: Vec<f64> = base_rows
            .par_iter()
            .map(|&i| {
                embed[i * dim..(i + 1) * dim]
                    .iter()
                    .map(|&v| v as f64 * v as f64)
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let n = norms.len() as f64;
        let target = norms.iter().sum::<f64>() / n;
        let margin = (norms.iter().map(|x| (x - target).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        Ok(NormBand {
            target,
            margin,
            base_rows: base_rows.len(),
        })
    }

    /// `Σ_r h_r²`, `h_r = |‖e_r‖ − T| − M`, over the rows of `block` (`[rows, dim]`) outside the
    /// band. With `grad` (the block's rows) and `k ≠ 0`, adds `k · h_r·sign(‖e_r‖ − T)/‖e_r‖ ·
    /// e_r` to each such row: `k/2 · ∂h_r²/∂e_r`.
    pub(super) fn chunk(&self, block: &[f32], dim: usize, grad: Option<&mut [f32]>, k: f64) -> f64 {
        let mut grad = grad.filter(|_| k != 0.0);
        let mut sum = 0f64;
        for (r, e) in block.chunks_exact(dim).enumerate() {
            let len = sum_sq(e).sqrt();
            let off = len - self.target;
            let h = off.abs() - self.margin;
            if h > 0.0 {
                sum += h * h;
                if let Some(g) = grad.as_deref_mut() {
                    if len > 0.0 {
                        let k = (k * h * off.signum() / len) as f32;
                        g[r * dim..(r + 1) * dim]
                            .iter_mut()
                            .zip(e)
                            .for_each(|(o, &v)| *o += k * v);
                    }
                }
            }
        }
        sum
    }
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

#[cfg(test)]
mod tests {
    use crate::train::aux_loss::morph::Morph;
    use crate::train::aux_loss::testing::{
        check_gradient, only, parts, problem, sq, Tiny, TINY_DIM,
    };
    use crate::train::aux_loss::{AuxConfig, MorphVariant};
    use crate::util::rng::Rng;

    #[test]
    fn gradient_matches_finite_differences() {
        let (aux, wake) = problem(only("norm"), MorphVariant::Off, 1);
        check_gradient(&aux, &wake, |c| c.norm, "L_norm");
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
    fn band_is_measured_on_the_base_rows_with_a_token() {
        let t = Tiny::new("norm-band");
        let config = AuxConfig {
            morph: MorphVariant::Off,
            ..AuxConfig::default()
        };
        let s = t.build(&config).unwrap().participating().clone();
        // the mean and sample std of the 400 rows with a token (not the 8 padded ones)
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
    }
}
