//! `L_rep` (docs/origin/original-system.md §5.7, with distinct pairs): keeps Wake rows from
//! collapsing onto one direction.
//!
//! `rep_pairs` pairs `(i, j)`, `i ≠ j`, no unordered pair twice, drawn uniformly each step (all
//! pairs when there are no more than that); `L = mean max(0, cos(e_i, e_j) − rep_threshold)²`.

use super::vectors::{add_cos_grad, cosine};
use super::{below, AuxConfig};
use crate::util::rng::Rng;
use std::collections::HashSet;

/// `L_rep` at the Wake block `wake` (`[count, dim]`) over `config.rep_pairs` pairs drawn from
/// `rng`; with `grad` and `k ≠ 0`, adds `k · ∂L/∂wake` to it.
pub(super) fn loss(
    config: &AuxConfig,
    wake: &[f32],
    dim: usize,
    rng: &mut Rng,
    grad: Option<&mut [f32]>,
    k: f64,
) -> f64 {
    let pairs = sample_pairs(rng, wake.len() / dim, config.rep_pairs);
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
        let h = c - config.rep_threshold;
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

/// `k` pairs `(i, j)` of `0..n`, `i ≠ j`, no unordered pair twice, uniformly; all the pairs
/// `i < j` in order when there are no more than `k`.
pub(super) fn sample_pairs(rng: &mut Rng, n: usize, k: usize) -> Vec<(u32, u32)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::aux_loss::morph::Morph;
    use crate::train::aux_loss::testing::{check_gradient, only, parts, problem};
    use crate::train::aux_loss::MorphVariant;

    #[test]
    fn gradient_matches_finite_differences() {
        let (aux, wake) = problem(only("rep"), MorphVariant::Off, 2);
        check_gradient(&aux, &wake, |c| c.rep, "L_rep");
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
    fn pairs_are_seeded_distinct_and_valid() {
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
    }
}
