//! Next-token sampling with HF transformers' semantics, driven by a seeded, serializable RNG.
//!
//! [`Sampler::next_token`] does to one position's logits what `model.generate(do_sample=True)`
//! does, in the order `GenerationMixin._get_logits_processor` builds its list
//! (`src/transformers/generation/utils.py` and `logits_process.py` in huggingface/transformers):
//!
//! 1. `RepetitionPenaltyLogitsProcessor` (only when `repetition_penalty != 1.0`): every distinct
//!    id of the context (prompt included) is penalized once: `score * penalty` if `score < 0`,
//!    else `score / penalty`.
//! 2. `TemperatureLogitsWarper` (only when `temperature != 1.0`): `score / temperature`.
//! 3. `TopKLogitsWarper` (only when `top_k != 0`, `min_tokens_to_keep = 1`): scores strictly
//!    below the k-th largest become −inf, so ties with the k-th score are all kept; `top_k`
//!    larger than the vocabulary keeps everything.
//! 4. `TopPLogitsWarper` (only when `top_p < 1.0`, `min_tokens_to_keep = 1`): scores sorted
//!    ascending, cumulative softmax, tokens whose cumulative probability is `<= 1 - top_p`
//!    become −inf, the most probable token is always kept.
//! 5. Softmax over what is left and one multinomial draw.
//!
//! Deliberate departures: `temperature == 0` (which HF rejects) and `top_k == 1` mean greedy
//! decoding, the argmax after the repetition penalty with ties going to the lowest id as with
//! `torch.argmax` (HF's sampling with `top_k = 1` would draw among exactly tied maxima); where
//! `torch.sort` leaves the order of equal scores unspecified, top-p orders them by id; sums are
//! accumulated in f64, so results can differ from torch's only by float rounding at an exact
//! boundary. The draw uses this module's [`Rng`], not torch's generator.

use crate::util::rng::Rng;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The knobs of HF `generate(do_sample=True, ...)` that wake2vec exposes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Divides the logits; `0` means greedy decoding. Must be finite and `>= 0`.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (ties with the k-th kept too); `0` disables it.
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to `top_p`; in (0, 1], `1` disables it.
    pub top_p: f32,
    /// Penalty for tokens already in the context; `> 0` and finite, `1` disables it.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    /// The original project's settings.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.92,
            repetition_penalty: 1.15,
        }
    }
}

impl SamplingParams {
    /// Checks each value's range; the error names the command-line option and its range.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            bail!("--temperature must be a finite number >= 0 (0 = greedy), got {t}");
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p must be in (0, 1] (1 = disabled), got {p}");
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            bail!("--repetition-penalty must be a finite number > 0 (1 = disabled), got {r}");
        }
        Ok(())
    }
}

/// Draws next tokens with [`SamplingParams`] and its own [`Rng`]; keeps scratch buffers so that a
/// call allocates nothing once warmed up.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// `1 - top_p` as HF compares it (Python-double arithmetic, then rounded to f32); `None`
    /// when top-p is disabled.
    top_p_cut: Option<f32>,
    scores: Vec<f32>,
    order: Vec<u32>,
    weights: Vec<f32>,
    seen: Vec<u32>,
}

impl Sampler {
    /// A sampler whose RNG is seeded with `seed`; fails if `params` are out of range.
    pub fn new(params: SamplingParams, seed: u64) -> Result<Self> {
        Self::with_rng(params, Rng::new(seed))
    }

    /// A sampler continuing from an existing RNG (e.g. restored from a checkpoint).
    pub fn with_rng(params: SamplingParams, rng: Rng) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng,
            top_p_cut: (params.top_p < 1.0).then(|| (1.0 - python_float(params.top_p)) as f32),
            scores: Vec::new(),
            order: Vec::new(),
            weights: Vec::new(),
            seen: Vec::new(),
        })
    }

    /// The parameters this sampler applies.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The RNG, whose [`Rng::state`] is what to checkpoint.
    pub fn rng(&self) -> &Rng {
        &self.rng
    }

    /// Picks the next token from one position's `logits` (one per vocabulary id), given
    /// `context`, every id so far (prompt and generated). Greedy decoding draws no random number.
    ///
    /// # Panics
    /// If `logits` is empty or a context id is not below `logits.len()`.
    pub fn next_token(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "next_token: no logits");
        let p = self.params;
        self.scores.clear();
        // `+ 0.0` turns −0.0 into +0.0, so that `total_cmp` sees the tie that torch sees.
        self.scores.extend(logits.iter().map(|&x| x + 0.0));

        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(
                &mut self.scores,
                context,
                p.repetition_penalty,
                &mut self.seen,
            );
        }
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(&self.scores);
        }
        if p.temperature != 1.0 {
            for s in &mut self.scores {
                *s /= p.temperature;
            }
        }
        match filter(
            &self.scores,
            p.top_k,
            self.top_p_cut,
            &mut self.order,
            &mut self.weights,
        ) {
            Some(start) => draw(
                &self.order[start..],
                &self.weights[start..],
                self.rng.next_f64(),
            ),
            // Degenerate logits (all −inf, or +inf/NaN): no distribution to draw from.
            None => argmax(&self.scores),
        }
    }
}

/// The f64 that Python would hold for the decimal the user typed: the shortest decimal that
/// round-trips `x`, parsed as f64 (e.g. 0.92f32 gives 0.92, not 0.920000016689…).
fn python_float(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// HF `RepetitionPenaltyLogitsProcessor`: each distinct id of `context` once.
fn apply_repetition_penalty(
    scores: &mut [f32],
    context: &[u32],
    penalty: f32,
    seen: &mut Vec<u32>,
) {
    seen.clear();
    seen.extend_from_slice(context);
    seen.sort_unstable();
    seen.dedup();
    let n = scores.len();
    for &id in seen.iter() {
        let s = scores
            .get_mut(id as usize)
            .unwrap_or_else(|| panic!("context id {id} is outside the vocabulary of {n} logits"));
        *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
    }
}

/// `torch.argmax`: the first index of the largest score.
fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate().skip(1) {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// HF `TopKLogitsWarper`: fills `order` with the ids whose score is not below the k-th largest
/// (all ids when `k` is 0 or not below the vocabulary size), in no particular order. Linear
/// time: a selection, not a sort of the vocabulary.
fn top_k_candidates(scores: &[f32], k: usize, order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..scores.len() as u32);
    if k == 0 || k >= scores.len() {
        return;
    }
    let score = |i: &u32| scores[*i as usize];
    let (_, kth, _) = order.select_nth_unstable_by(k - 1, |a, b| score(b).total_cmp(&score(a)));
    let threshold = score(kth);
    order.retain(|i| score(i) >= threshold);
}

/// Top-k then top-p on `scores` (already penalized and scaled): leaves the surviving ids in
/// `order[start..]`, their unnormalized probabilities in `weights[start..]`, and returns `start`;
/// `None` when the scores have no finite maximum. Sorts only the top-k survivors, and only when
/// top-p needs them sorted.
fn filter(
    scores: &[f32],
    top_k: usize,
    top_p_cut: Option<f32>,
    order: &mut Vec<u32>,
    weights: &mut Vec<f32>,
) -> Option<usize> {
    top_k_candidates(scores, top_k, order);
    let score = |i: u32| scores[i as usize];
    if top_p_cut.is_some() {
        order.sort_unstable_by(|&a, &b| score(a).total_cmp(&score(b)).then(a.cmp(&b)));
    }
    let max = order
        .iter()
        .map(|&i| score(i))
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    weights.clear();
    weights.extend(order.iter().map(|&i| (score(i) - max).exp()));
    Some(top_p_cut.map_or(0, |cut| top_p_start(weights, cut)))
}

/// HF `TopPLogitsWarper` on `weights` (unnormalized probabilities sorted ascending): the index of
/// the first kept entry, i.e. the first whose cumulative probability exceeds `cut = 1 - top_p`;
/// the last entry is always kept.
fn top_p_start(weights: &[f32], cut: f32) -> usize {
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    let mut cumulative = 0.0f64;
    for (i, &w) in weights.iter().enumerate() {
        // torch: f32 softmax, cumsum accumulated in double and stored as f32.
        cumulative += ((w as f64 / total) as f32) as f64;
        if cumulative as f32 > cut {
            return i;
        }
    }
    weights.len() - 1
}

/// Multinomial draw of one of `ids` with probability proportional to `weights`, from a uniform
/// `u` in [0, 1). Walks from the end, where top-p sorting puts the most likely tokens.
fn draw(ids: &[u32], weights: &[f32], u: f64) -> u32 {
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    let target = u * total;
    let mut cumulative = 0.0f64;
    let mut last_positive = ids[ids.len() - 1];
    for (&id, &w) in ids.iter().zip(weights).rev() {
        if w > 0.0 {
            cumulative += w as f64;
            last_positive = id;
            if target < cumulative {
                return id;
            }
        }
    }
    // Only reachable through rounding (`target` within an ulp of `total`).
    last_positive
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(
        temperature: f32,
        top_k: usize,
        top_p: f32,
        repetition_penalty: f32,
    ) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty,
        }
    }

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    /// Ids surviving top-k then top-p (temperature already applied), sorted.
    fn kept(scores: &[f32], top_k: usize, top_p: f32) -> Vec<u32> {
        let cut = (top_p < 1.0).then(|| (1.0 - python_float(top_p)) as f32);
        let (mut order, mut weights) = (Vec::new(), Vec::new());
        let start = filter(scores, top_k, cut, &mut order, &mut weights).unwrap();
        sorted(order[start..].to_vec())
    }

    #[test]
    fn defaults_are_the_original_settings() {
        let d = SamplingParams::default();
        assert_eq!(d, params(0.9, 50, 0.92, 1.15));
        d.validate().unwrap();
    }

    #[test]
    fn validation_names_the_option() {
        for (bad, option) in [
            (params(-0.1, 50, 0.9, 1.0), "--temperature"),
            (params(f32::NAN, 50, 0.9, 1.0), "--temperature"),
            (params(f32::INFINITY, 50, 0.9, 1.0), "--temperature"),
            (params(1.0, 50, 0.0, 1.0), "--top-p"),
            (params(1.0, 50, 1.5, 1.0), "--top-p"),
            (params(1.0, 50, f32::NAN, 1.0), "--top-p"),
            (params(1.0, 50, 0.9, 0.0), "--repetition-penalty"),
            (params(1.0, 50, 0.9, f32::INFINITY), "--repetition-penalty"),
        ] {
            let err = Sampler::new(bad, 0).unwrap_err().to_string();
            assert!(err.starts_with(option), "{err}");
        }
        params(0.0, 0, 1.0, 1.0).validate().unwrap();
    }

    #[test]
    fn repetition_penalty_matches_hf() {
        // HF test_repetition_penalty_dist_process, first row: uniform 0.1 logits, ids [0, 1].
        let mut scores = vec![0.1f32; 10];
        scores[0] = -0.1;
        let mut seen = Vec::new();
        apply_repetition_penalty(&mut scores, &[0, 1, 1, 0], 2.0, &mut seen);
        assert_eq!(scores[0], -0.2);
        assert_eq!(scores[1], 0.05);
        assert!(scores[2..].iter().all(|&s| s == 0.1));
        // Zero is "not < 0", so it is divided (and stays 0).
        let mut scores = vec![0.0f32, 3.0];
        apply_repetition_penalty(&mut scores, &[0, 1], 1.5, &mut seen);
        assert_eq!(scores, [0.0, 2.0]);
    }

    #[test]
    #[should_panic(expected = "outside the vocabulary")]
    fn context_id_outside_vocabulary_panics() {
        let mut s = Sampler::new(SamplingParams::default(), 0).unwrap();
        s.next_token(&[0.0, 1.0], &[2]);
    }

    #[test]
    fn temperature_divides_logits() {
        // Temperature 0.5 doubles the gap: softmax([0, ln 2] / 0.5) = [1/5, 4/5].
        let mut s = Sampler::new(params(0.5, 0, 1.0, 1.0), 3).unwrap();
        let logits = [0.0, std::f32::consts::LN_2];
        let n = 50_000;
        let ones = (0..n).filter(|_| s.next_token(&logits, &[]) == 1).count();
        assert!((ones as f64 / n as f64 - 0.8).abs() < 0.01, "{ones}");
    }

    #[test]
    fn top_k_matches_hf() {
        // HF test_top_k_dist_warper: ramps with k = 3.
        let ramp: Vec<f32> = (0..10).map(|i| i as f32).collect();
        assert_eq!(kept(&ramp, 3, 1.0), [7, 8, 9]);
        let bumped: Vec<f32> = (0..10)
            .map(|i| if i < 5 { i as f32 + 10.0 } else { i as f32 })
            .collect();
        assert_eq!(kept(&bumped, 3, 1.0), [2, 3, 4]);
        // Ties with the k-th score are kept; k above the vocabulary keeps everything.
        assert_eq!(kept(&[3.0, 2.0, 2.0, 1.0], 2, 1.0), [0, 1, 2]);
        assert_eq!(kept(&[1.0, 3.0, 3.0, 2.0], 2, 1.0), [1, 2]);
        assert_eq!(kept(&[1.0, 2.0], 5, 1.0), [0, 1]);
    }

    #[test]
    fn top_p_matches_hf() {
        // HF test_top_p_dist_warper with top_p = 0.8.
        let ln = |v: [f32; 4]| v.map(f32::ln);
        assert_eq!(kept(&ln([0.3, 0.1, 0.1, 0.5]), 0, 0.8), [0, 3]);
        assert_eq!(kept(&ln([0.15, 0.3, 0.3, 0.25]), 0, 0.8), [1, 2, 3]);
        // Ramps with top_p = 0.9: three tokens, and one for the extreme ramp.
        let ramp: Vec<f32> = (0..10).map(|i| i as f32 - 5.0).collect();
        assert_eq!(kept(&ramp, 0, 0.9), [7, 8, 9]);
        let extreme: Vec<f32> = ramp.iter().map(|x| x * 100.0).collect();
        assert_eq!(kept(&extreme, 0, 0.9), [9]);
        // A cumulative probability exactly at 1 - top_p is removed: 0, .25, .5 | 1 at cut .5.
        assert_eq!(top_p_start(&[0.0, 1.0, 1.0, 2.0], 0.5), 3);
        // Ties straddling the cut: the lower id goes first.
        assert_eq!(kept(&ln([0.3, 0.3, 0.4, 0.0]), 0, 0.5), [1, 2]);
    }

    #[test]
    fn top_p_keeps_at_least_one_token() {
        let uniform = [0.0f32; 8];
        assert_eq!(kept(&uniform, 0, 1e-9), [7]);
        let mut s = Sampler::new(params(1.0, 0, 1e-9, 1.0), 0).unwrap();
        for _ in 0..10 {
            assert_eq!(s.next_token(&uniform, &[]), 7);
        }
    }

    #[test]
    fn top_k_then_top_p() {
        // Top-k cuts to 3 tokens first and top-p renormalizes over those: id 1 holds 0.086 of
        // the whole mass but 0.090 of the top 3, so a 0.1 cut keeps it only without top-k.
        let logits = [1.0f32, 2.0, 3.0, 4.0, 0.0];
        assert_eq!(kept(&logits, 3, 0.7), [2, 3]);
        assert_eq!(kept(&logits, 0, 0.7), [2, 3]);
        assert_eq!(kept(&logits, 3, 0.9), [2, 3]);
        assert_eq!(kept(&logits, 0, 0.9), [1, 2, 3]);
        assert_eq!(kept(&logits, 2, 0.99), [2, 3]);
    }

    #[test]
    fn greedy_takes_lowest_id_among_ties() {
        let logits = [1.0f32, 5.0, 2.0, 5.0];
        for p in [params(0.0, 50, 0.9, 1.0), params(1.0, 1, 1.0, 1.0)] {
            let mut s = Sampler::new(p, 9).unwrap();
            let before = s.rng().state();
            assert_eq!(s.next_token(&logits, &[]), 1);
            assert_eq!(s.rng().state(), before, "greedy draws no random number");
        }
        // The repetition penalty applies before the argmax: 5/2 < 3.
        let mut s = Sampler::new(params(0.0, 0, 1.0, 2.0), 0).unwrap();
        assert_eq!(s.next_token(&[3.0, 5.0, 1.0], &[1]), 0);
    }

    #[test]
    fn seeded_draws_are_reproducible() {
        let mut rng = Rng::new(1);
        let logits: Vec<f32> = (0..1000).map(|_| rng.next_f64() as f32 * 8.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams::default(), seed).unwrap();
            let mut ctx = vec![3, 14, 15];
            for _ in 0..200 {
                let t = s.next_token(&logits, &ctx);
                ctx.push(t);
            }
            ctx
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        // Resuming from a checkpointed RNG continues the same sequence.
        let mut a = Sampler::new(SamplingParams::default(), 5).unwrap();
        a.next_token(&logits, &[]);
        let mut b = Sampler::with_rng(SamplingParams::default(), a.rng().clone()).unwrap();
        for _ in 0..50 {
            assert_eq!(a.next_token(&logits, &[]), b.next_token(&logits, &[]));
        }
    }

    /// Pearson's chi-square statistic of `n` draws against `expected` probabilities.
    fn chi_square(sampler: &mut Sampler, logits: &[f32], expected: &[f64], n: usize) -> f64 {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[sampler.next_token(logits, &[]) as usize] += 1;
        }
        counts
            .iter()
            .zip(expected)
            .map(|(&c, &p)| {
                if p == 0.0 {
                    assert_eq!(c, 0, "drew a filtered token");
                    0.0
                } else {
                    let e = p * n as f64;
                    (c as f64 - e).powi(2) / e
                }
            })
            .sum()
    }

    fn softmax(xs: &[f64]) -> Vec<f64> {
        let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = xs.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    }

    #[test]
    fn empirical_frequencies_match_softmax() {
        // 4 degrees of freedom: chi-square 18.5 is the 0.001 critical value.
        let logits = [0.5f32, -1.0, 2.0, 0.0, 1.2];
        let expected = softmax(&logits.map(f64::from));
        let mut s = Sampler::new(params(1.0, 0, 1.0, 1.0), 2024).unwrap();
        let chi2 = chi_square(&mut s, &logits, &expected, 200_000);
        assert!(chi2 < 18.5, "chi-square {chi2}");
    }

    #[test]
    fn empirical_frequencies_after_filtering() {
        // Temperature 0.7, top-k 4 drops id 1, top-p 0.9 then drops id 3 (0.038 of the mass of
        // the 4 left): the draw follows softmax(logits / 0.7) over ids {0, 2, 4}.
        let logits = [0.5f32, -1.0, 2.0, 0.0, 1.2];
        assert_eq!(kept(&logits.map(|x| x / 0.7), 4, 0.9), [0, 2, 4]);
        let scaled: Vec<f64> = [0.5, 2.0, 1.2].iter().map(|x| x / 0.7).collect();
        let p = softmax(&scaled);
        let expected = [p[0], 0.0, p[1], 0.0, p[2]];
        let mut s = Sampler::new(params(0.7, 4, 0.9, 1.0), 77).unwrap();
        // 2 degrees of freedom: 13.8 is the 0.001 critical value.
        let chi2 = chi_square(&mut s, &logits, &expected, 100_000);
        assert!(chi2 < 13.8, "chi-square {chi2}");
    }

    #[test]
    fn degenerate_logits_fall_back_to_argmax() {
        let mut s = Sampler::new(params(1.0, 0, 0.9, 1.0), 0).unwrap();
        let inf = f32::INFINITY;
        assert_eq!(s.next_token(&[-inf, -inf, -inf], &[]), 0);
        assert_eq!(s.next_token(&[0.0, inf, 1.0], &[]), 1);
        assert_eq!(s.next_token(&[-inf, 1.0, -inf], &[]), 1);
    }
}
