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
    /// Surprisal summed over the tokens of each word (the tokenizer's pre-tokenization words);
    /// empty when scored from ids alone.
    pub per_word: Vec<WordScore>,
}

/// One word's surprisal: the sum over its tokens.
#[derive(Debug, Clone, Serialize)]
pub struct WordScore {
    pub word: String,
    pub tokens: usize,
    pub surprisal_nats: f64,
    pub surprisal_bits: f64,
    /// False when one of its tokens has no score (the first token of a window), so the sum
    /// misses a part.
    pub complete: bool,
}

/// Per-word surprisal from per-token scores: `word_ids[i]` is token `i`'s word (None for
/// special tokens), `spans[i]` its byte span in `text`; token `i` is scored unless `i` is the
/// first of a window.
pub fn per_word(
    text: &str,
    word_ids: &[Option<u32>],
    spans: &[(usize, usize)],
    score: &Score,
) -> Vec<WordScore> {
    let mut out: Vec<WordScore> = Vec::new();
    let mut current: Option<(u32, usize, usize)> = None; // (word id, start, end)
    let mut scores = score.per_token.iter();
    for (i, (wid, &(a, b))) in word_ids.iter().zip(spans).enumerate() {
        let scored = i % score.window != 0;
        let nats = if scored {
            scores.next().map(|t| t.surprisal_nats as f64)
        } else {
            None
        };
        let Some(w) = *wid else { continue };
        let same = matches!(current, Some((cw, _, _)) if cw == w);
        if !same {
            if let Some((_, s, e)) = current {
                if let Some(last) = out.last_mut() {
                    last.word = text.get(s..e).unwrap_or("").trim().to_string();
                }
            }
            out.push(WordScore {
                word: String::new(),
                tokens: 0,
                surprisal_nats: 0.0,
                surprisal_bits: 0.0,
                complete: true,
            });
            current = Some((w, a, b));
        } else if let Some((_, _, e)) = current.as_mut() {
            *e = b.max(*e);
        }
        let last = out.last_mut().expect("pushed above");
        last.tokens += 1;
        match nats {
            Some(n) => {
                last.surprisal_nats += n;
                last.surprisal_bits += n / std::f64::consts::LN_2;
            }
            None => last.complete = false,
        }
    }
    if let (Some((_, s, e)), Some(last)) = (current, out.last_mut()) {
        last.word = text.get(s..e).unwrap_or("").trim().to_string();
    }
    out
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
        per_word: Vec::new(),
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
    let mut score = score_ids(model, ids, &pieces, &byte_lens, window)?;
    score.per_word = per_word(text, enc.get_word_ids(), enc.get_offsets(), &score);
    Ok(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(nats: f32) -> TokenScore {
        TokenScore {
            id: 0,
            token: String::new(),
            logprob: -nats,
            surprisal_nats: nats,
            surprisal_bits: nats / std::f32::consts::LN_2,
        }
    }

    #[test]
    fn word_surprisal_sums_its_tokens() {
        // "river run": tokens [BOS] "river"(0..5) " ru"(5..8) "n"(8..9); window 4 → token 0 unscored
        let text = "river run";
        let word_ids = [None, Some(0), Some(1), Some(1)];
        let spans = [(0, 0), (0, 5), (5, 8), (8, 9)];
        let s = Score {
            tokens: 4,
            scored: 3,
            mean_loss: 0.0,
            perplexity: 1.0,
            bits_per_byte: 0.0,
            bytes: 9,
            window: 4,
            per_token: vec![token(1.0), token(2.0), token(0.5)],
            per_word: vec![],
        };
        let w = per_word(text, &word_ids, &spans, &s);
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].word.as_str(), w[0].tokens), ("river", 1));
        assert!((w[0].surprisal_nats - 1.0).abs() < 1e-9 && w[0].complete);
        assert_eq!((w[1].word.as_str(), w[1].tokens), ("run", 2));
        assert!((w[1].surprisal_nats - 2.5).abs() < 1e-6);
        assert!((w[1].surprisal_bits - 2.5 / std::f64::consts::LN_2).abs() < 1e-6);
        // window 2: token 2 (" ru") starts a window and has no score → "run" is incomplete
        let s2 = Score {
            window: 2,
            per_token: vec![token(1.0), token(0.5)],
            ..s
        };
        let w2 = per_word(text, &word_ids, &spans, &s2);
        assert!(w2[0].complete && !w2[1].complete);
        assert!((w2[1].surprisal_nats - 0.5).abs() < 1e-6);
    }
}
