//! Validation loss on a corpus with the training protocol (docs/origin/original-system.md §1.4–1.6): the
//! whole text tokenized without special tokens, cut into non-overlapping blocks (the remainder
//! dropped), a seeded 90/10 split by block, and the mean loss of the validation blocks (each
//! block's first token has no context and is not scored, as with HF labels = inputs).
//!
//! The split shuffles the block indices with a Fisher–Yates pass driven by [`Rng`] and takes
//! the first `ceil(fraction·n)` as validation (scikit-learn's `train_test_split` sizes, not its
//! numpy permutation).

use crate::model::Llama;
use crate::util::rng::Rng;
use anyhow::{anyhow, bail, Result};
use serde::Serialize;

/// Non-overlapping blocks of `len` ids; the remainder is dropped.
pub fn blocks(ids: &[u32], len: usize) -> Vec<&[u32]> {
    ids.chunks_exact(len).collect()
}

/// The validation block indices (sorted) of a seeded split of `n` blocks.
pub fn validation_indices(n: usize, fraction: f64, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let take = ((fraction * n as f64).ceil() as usize).min(n);
    let mut val = order[..take].to_vec();
    val.sort_unstable();
    val
}

/// What [`validation_loss`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct ValLoss {
    pub tokens: usize,
    pub blocks: usize,
    pub validation_blocks: usize,
    pub block_len: usize,
    pub seed: u64,
    /// Mean loss of the validation blocks, nats per token.
    pub mean_loss: f64,
    /// Total loss in bits over the UTF-8 bytes the scored tokens cover: comparable across
    /// tokenizers, unlike nats per token.
    pub bits_per_byte: f64,
}

/// Mean validation loss of `model` on `text` tokenized by `tokenizer`. `progress` is called
/// after each block with (done, total).
pub fn validation_loss(
    model: &Llama,
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
    block_len: usize,
    fraction: f64,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ValLoss> {
    if block_len < 2 || block_len > model.max_positions() {
        bail!(
            "block length {block_len} must be between 2 and the model's context ({})",
            model.max_positions()
        );
    }
    if !(0.0..1.0).contains(&fraction) || fraction == 0.0 {
        bail!("the validation fraction must be in (0, 1), got {fraction}");
    }
    let enc = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow!("cannot tokenize the corpus: {e}"))?;
    let ids = enc.get_ids();
    let offsets = enc.get_offsets();
    let all = blocks(ids, block_len);
    if all.len() < 2 {
        bail!(
            "the corpus has {} tokens: fewer than 2 blocks of {block_len}",
            ids.len()
        );
    }
    let val = validation_indices(all.len(), fraction, seed);
    let mut total = 0.0f64;
    let mut count = 0usize;
    let mut bytes = 0usize;
    for (done, &i) in val.iter().enumerate() {
        let lp = crate::infer::score::logprobs(model, all[i])?;
        total -= lp.iter().map(|&x| x as f64).sum::<f64>();
        count += lp.len();
        // Scored tokens are positions 1.. of the block.
        let start = i * block_len;
        bytes += offsets[start + 1..start + block_len]
            .iter()
            .map(|(a, b)| b - a)
            .sum::<usize>();
        progress(done + 1, val.len());
    }
    Ok(ValLoss {
        tokens: ids.len(),
        blocks: all.len(),
        validation_blocks: val.len(),
        block_len,
        seed,
        mean_loss: total / count as f64,
        bits_per_byte: total / std::f64::consts::LN_2 / bytes.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_and_sized_like_sklearn() {
        let v = validation_indices(1197, 0.1, 42);
        assert_eq!(v.len(), 120); // ceil(119.7)
        assert!(v.windows(2).all(|w| w[0] < w[1]) && *v.last().unwrap() < 1197);
        assert_eq!(v, validation_indices(1197, 0.1, 42));
        assert_ne!(v, validation_indices(1197, 0.1, 43));
        // Not a contiguous tail: blocks from all over the text.
        assert!(v[0] < 100 && v[119] > 1097);
        assert_eq!(validation_indices(10, 0.1, 1).len(), 1);
        let ids: Vec<u32> = (0..10).collect();
        assert_eq!(blocks(&ids, 4), [&[0, 1, 2, 3][..], &[4, 5, 6, 7]]);
    }
}
