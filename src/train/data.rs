//! Training data: the corpus tokenized with the (extended) tokenizer, cut into non-overlapping
//! blocks of `seq_len` tokens (the remainder dropped; no padding, no special tokens), split by
//! block with a seed, and served in a per-epoch order derived from the seed, so that a position
//! in the stream (`epoch`, `cursor`) is all a checkpoint needs to resume the same order.

use crate::util::rng::Rng;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The blocks of a corpus and their split.
#[derive(Debug, Clone)]
pub struct Blocks {
    pub seq_len: usize,
    /// `n_blocks × seq_len` token ids, block after block.
    pub ids: Vec<u32>,
    /// UTF-8 bytes each token covers (for bits per byte).
    pub byte_lens: Vec<u32>,
    /// Indices of the training blocks (ascending).
    pub train: Vec<usize>,
    /// Indices of the validation blocks (ascending).
    pub val: Vec<usize>,
    /// Tokens the text had before the remainder was dropped.
    pub total_tokens: usize,
    /// CRC-32 of the block ids: a resumed run checks it sees the same data.
    pub fingerprint: u32,
}

impl Blocks {
    /// Tokenizes `text` (without special tokens) and cuts and splits it.
    pub fn from_text(
        tokenizer: &tokenizers::Tokenizer,
        text: &str,
        seq_len: usize,
        split: f64,
        seed: u64,
    ) -> Result<Self> {
        let enc = tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the corpus: {e}"))?;
        let ids = enc.get_ids();
        let byte_lens: Vec<u32> = enc
            .get_offsets()
            .iter()
            .map(|(a, b)| (b - a) as u32)
            .collect();
        Self::from_ids(ids, &byte_lens, seq_len, split, seed)
    }

    /// Cuts token ids into blocks and splits them: `ceil((1 − split) · n)` validation blocks
    /// (as scikit-learn's `test_size`), chosen by a seeded shuffle.
    pub fn from_ids(
        ids: &[u32],
        byte_lens: &[u32],
        seq_len: usize,
        split: f64,
        seed: u64,
    ) -> Result<Self> {
        let n = ids.len() / seq_len;
        if n < 2 {
            bail!(
                "the corpus has {} tokens: fewer than two blocks of seq_len {seq_len}; use a longer text or a smaller seq_len",
                ids.len()
            );
        }
        let n_val = (((1.0 - split) * n as f64).ceil() as usize).clamp(1, n - 1);
        let mut order: Vec<usize> = (0..n).collect();
        shuffle(&mut order, &mut Rng::new(seed));
        let mut val = order[..n_val].to_vec();
        let mut train = order[n_val..].to_vec();
        val.sort_unstable();
        train.sort_unstable();
        let kept = &ids[..n * seq_len];
        let mut h = crc32fast::Hasher::new();
        kept.iter().for_each(|id| h.update(&id.to_le_bytes()));
        h.update(&(seq_len as u64).to_le_bytes());
        Ok(Self {
            seq_len,
            ids: kept.to_vec(),
            byte_lens: byte_lens[..n * seq_len].to_vec(),
            train,
            val,
            total_tokens: ids.len(),
            fingerprint: h.finalize(),
        })
    }

    /// The ids of block `b`.
    pub fn block(&self, b: usize) -> &[u32] {
        &self.ids[b * self.seq_len..(b + 1) * self.seq_len]
    }

    /// Bytes covered by the tokens of block `b` that are predicted (all but the first).
    pub fn predicted_bytes(&self, b: usize) -> u64 {
        self.byte_lens[b * self.seq_len + 1..(b + 1) * self.seq_len]
            .iter()
            .map(|&x| x as u64)
            .sum()
    }
}

/// Fisher–Yates with an unbiased-enough multiply-shift draw.
fn shuffle(v: &mut [usize], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        v.swap(i, j);
    }
}

/// The order of the training blocks in `epoch`: a permutation seeded by (seed, epoch).
pub fn epoch_order(train: &[usize], seed: u64, epoch: u64) -> Vec<usize> {
    let mut order = train.to_vec();
    let mixed = seed ^ 0x7A6B_2C3D_4E5F_6071u64.wrapping_mul(epoch.wrapping_add(1));
    shuffle(&mut order, &mut Rng::new(mixed));
    order
}

/// A position in the endless stream of training blocks (epoch after epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    /// Index into the epoch's order of the next block.
    pub index: usize,
}

/// Serves blocks in the per-epoch order.
#[derive(Debug, Clone)]
pub struct Stream {
    seed: u64,
    cursor: Cursor,
    order: Vec<usize>,
}

impl Stream {
    /// A stream positioned at `cursor`.
    pub fn new(blocks: &Blocks, seed: u64, cursor: Cursor) -> Result<Self> {
        if blocks.train.is_empty() {
            bail!("no training blocks");
        }
        if cursor.index > blocks.train.len() {
            bail!(
                "the checkpoint's data position {} is past the {} training blocks: the corpus changed",
                cursor.index,
                blocks.train.len()
            );
        }
        Ok(Self {
            seed,
            cursor,
            order: epoch_order(&blocks.train, seed, cursor.epoch),
        })
    }

    /// The position of the next block.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The next block index, moving to the next epoch when one ends.
    pub fn next_block(&mut self, blocks: &Blocks) -> usize {
        if self.cursor.index == self.order.len() {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                index: 0,
            };
            self.order = epoch_order(&blocks.train, self.seed, self.cursor.epoch);
        }
        let b = self.order[self.cursor.index];
        self.cursor.index += 1;
        b
    }
}

/// Reads the corpus and, if given, appends the lexicon file's text after a newline.
pub fn read_training_text(
    corpus: &std::path::Path,
    lexicon: Option<&std::path::Path>,
) -> Result<String> {
    let read = |p: &std::path::Path| -> Result<String> {
        let bytes = crate::util::fs::read(p)?;
        String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{} is not UTF-8 text (invalid byte at offset {})",
                p.display(),
                e.utf8_error().valid_up_to()
            )
        })
    };
    let mut text = read(corpus)?;
    if let Some(l) = lexicon {
        text.push('\n');
        text.push_str(&read(l)?);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_drop_the_remainder_and_split_by_seed() {
        let ids: Vec<u32> = (0..1005).collect();
        let lens = vec![1u32; ids.len()];
        let b = Blocks::from_ids(&ids, &lens, 10, 0.9, 42).unwrap();
        assert_eq!(b.ids.len(), 1000);
        assert_eq!(b.val.len(), 10);
        assert_eq!(b.train.len(), 90);
        assert_eq!(b.block(3), &(30..40).collect::<Vec<u32>>()[..]);
        let mut all: Vec<usize> = b.train.iter().chain(&b.val).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        let again = Blocks::from_ids(&ids, &lens, 10, 0.9, 42).unwrap();
        assert_eq!(again.val, b.val);
        let other = Blocks::from_ids(&ids, &lens, 10, 0.9, 43).unwrap();
        assert_ne!(other.val, b.val);
        // A split that is not at the start or the end of the text.
        assert!(b.val.iter().any(|&v| v > 10 && v < 90));
    }

    #[test]
    fn stream_resumes_from_a_cursor_and_reshuffles_each_epoch() {
        let ids: Vec<u32> = (0..200).collect();
        let b = Blocks::from_ids(&ids, &vec![1; 200], 10, 0.8, 1).unwrap();
        let mut s = Stream::new(&b, 7, Cursor { epoch: 0, index: 0 }).unwrap();
        let first: Vec<usize> = (0..40).map(|_| s.next_block(&b)).collect();
        let (e0, e1) = first.split_at(16);
        assert_ne!(e0, &e1[..16]);
        let mut sorted = e0.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, b.train);
        // Resuming at any point continues the same sequence.
        let mut s2 = Stream::new(&b, 7, Cursor { epoch: 1, index: 5 }).unwrap();
        let rest: Vec<usize> = (0..19).map(|_| s2.next_block(&b)).collect();
        assert_eq!(&rest[..], &first[21..40]);
    }
}
