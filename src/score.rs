//! Teacher-forced scoring: per-token log-probabilities and surprisal, mean loss, bits per byte.
//! Long texts are cut into non-overlapping windows scored independently; the first token of each
//! window has no context and is not scored (as in the original's surprisal method).

use crate::model::Llama;
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::Serialize;

/// One scored token: `logprob = ln P(token | everything before it in its window)`.
#[derive(Debug, Clone, Serialize)]
pub struct TokenScore {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    pub surprisal_nats: f32,
    pub surprisal_bits: f32,
}

/// The scores of a whole text.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    /// Number of tokens in the text (scored or not).
    pub tokens: usize,
    /// Tokens that have a score (all but the first of each window).
    pub scored: usize,
    /// Mean negative log-likelihood of the scored tokens, nats per token.
    pub mean_loss: f64,
    pub perplexity: f64,
    /// Total surprisal in bits divided by the UTF-8 bytes the scored tokens cover: comparable
    /// across tokenizers.
    pub bits_per_byte: f64,
    pub bytes: usize,
    pub window: usize,
    pub per_token: Vec<TokenScore>,
}

/// Log-probabilities of `ids[1..]` given their prefixes, in one forward pass over `ids`.
pub fn logprobs(model: &Llama, ids: &[u32]) -> Result<Vec<f32>> {
    if ids.len() < 2 {
        return Ok(vec![]);
    }
    let input = Tensor::new(&ids[..ids.len() - 1], model.embed.device())?.unsqueeze(0)?;
    let logits = model.forward(&input, None)?.squeeze(0)?;
    let targets = Tensor::new(&ids[1..], model.embed.device())?.unsqueeze(1)?;
    let picked = logits.gather(&targets, 1)?.squeeze(1)?;
    let lse = logits.log_sum_exp(D::Minus1)?;
    Ok((picked - lse)?.to_vec1::<f32>()?)
}

/// Scores `ids` in windows of `window` tokens. `byte_lens[i]` is the number of text bytes token
/// `i` covers, `pieces[i]` its printable form.
pub fn score_ids(
    model: &Llama,
    ids: &[u32],
    pieces: &[String],
    byte_lens: &[usize],
    window: usize,
) -> Result<Score> {
    if window < 2 {
        bail!("--window must be at least 2 tokens, got {window}");
    }
    if window > model.max_positions() {
        bail!(
            "--window {window} exceeds the model's context of {} tokens",
            model.max_positions()
        );
    }
    if ids.len() < 2 {
        bail!(
            "the text has {} token(s): scoring needs at least 2; give a longer text",
            ids.len()
        );
    }
    let mut per_token = Vec::with_capacity(ids.len());
    let mut bytes = 0;
    for (w, chunk) in ids.chunks(window).enumerate() {
        let start = w * window;
        for (j, lp) in logprobs(model, chunk)?.into_iter().enumerate() {
            let i = start + j + 1;
            bytes += byte_lens[i];
            per_token.push(TokenScore {
                id: ids[i],
                token: pieces[i].clone(),
                logprob: lp,
                surprisal_nats: -lp,
                surprisal_bits: -lp / std::f32::consts::LN_2,
            });
        }
    }
    let total: f64 = per_token.iter().map(|t| -(t.logprob as f64)).sum();
    let scored = per_token.len();
    let mean_loss = total / scored as f64;
    Ok(Score {
        tokens: ids.len(),
        scored,
        mean_loss,
        perplexity: mean_loss.exp(),
        bits_per_byte: total / std::f64::consts::LN_2 / bytes.max(1) as f64,
        bytes,
        window,
        per_token,
    })
}

/// Tokenizes `text` (with the tokenizer's own special-token rules, as HF `tokenizer(text)`) and
/// scores it.
pub fn score_text(
    model: &Llama,
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
    window: usize,
) -> Result<Score> {
    if text.trim().is_empty() {
        bail!("the text to score is empty: give --text or --file some text");
    }
    let enc = tokenizer
        .encode(text, true)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the text: {e}"))?;
    let ids = enc.get_ids();
    let byte_lens: Vec<usize> = enc.get_offsets().iter().map(|(a, b)| b - a).collect();
    let pieces: Vec<String> = enc.get_tokens().to_vec();
    score_ids(model, ids, &pieces, &byte_lens, window)
}
