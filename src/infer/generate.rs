//! Text generation: prompt prefill through the tensor forward pass, then KV-cached decoding one
//! token at a time, sampled with HF `generate` semantics, streamed as it comes.

use crate::infer::sampling::Sampler;
use crate::model::{decode::DecodeWeights, KvCache, Llama};
use crate::nn::device::{generic_forced, Kernels};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::time::Instant;

/// The original's default prompt, the Wake's first words.
pub const DEFAULT_PROMPT: &str = "riverrun, past Eve and Adam's,";

/// One generated continuation.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub prompt: String,
    pub prompt_tokens: usize,
    /// The continuation (special tokens removed), without the prompt.
    pub text: String,
    pub ids: Vec<u32>,
    pub stopped_on_eos: bool,
    /// Seconds for the prompt pass and first token.
    pub first_token_s: f64,
    pub total_s: f64,
    /// New tokens per second after the first.
    pub decode_tokens_per_s: f64,
}

/// How the tokens after the prompt are decoded.
pub enum Decoder<'a> {
    /// The fast CPU decoder (f32 or bf16 weights packed in decode order).
    Fast(DecodeWeights<'a>),
    /// The tensor forward pass, its KV cache on the model's device (a GPU, f16 weights, or the
    /// CPU forced onto the generic kernels).
    Tensor(&'a Llama),
}

impl<'a> Decoder<'a> {
    /// The fast decoder for a model on the fast kernels or with bf16 weights on the CPU, else
    /// the tensor one.
    pub fn new(model: &'a Llama) -> Result<Self> {
        let bf16_on_cpu = model.embed.device().is_cpu()
            && model.blocks.first().map(|b| b.q.weight.dtype()) == Some(DType::BF16)
            && !generic_forced()?;
        Ok(match model.kernels {
            Kernels::Fast => Decoder::Fast(DecodeWeights::new(model)?),
            Kernels::Generic if bf16_on_cpu => Decoder::Fast(DecodeWeights::new(model)?),
            Kernels::Generic => Decoder::Tensor(model),
        })
    }
}

/// How a generation ends.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_new_tokens: usize,
    /// Stop at an end-of-sequence token (off for fixed-length benchmarks).
    pub stop_at_eos: bool,
}

/// Tokenizes `prompt` (with the tokenizer's special-token rules, as HF `tokenizer(prompt)`).
pub fn encode_prompt(tokenizer: &tokenizers::Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    let enc = tokenizer
        .encode(prompt, true)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?;
    if enc.get_ids().is_empty() {
        bail!("the prompt is empty: give --prompt some text");
    }
    Ok(enc.get_ids().to_vec())
}

/// Fails, saying what to change, unless a prompt of `prompt_tokens` tokens and
/// `max_new_tokens` new ones fit in the model's `context` positions.
pub fn check_context(prompt_tokens: usize, max_new_tokens: usize, context: usize) -> Result<()> {
    if prompt_tokens
        .checked_add(max_new_tokens)
        .is_some_and(|n| n <= context)
    {
        return Ok(());
    }
    if prompt_tokens >= context {
        bail!(
            "the prompt has {prompt_tokens} tokens but the model's context is {context} tokens \
             (max_position_embeddings): shorten the prompt so that it plus --max-new-tokens \
             ({max_new_tokens}) fits in {context}"
        );
    }
    bail!(
        "the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} exceed the \
         model's context of {context} tokens: lower --max-new-tokens to at most {} or shorten the prompt",
        context - prompt_tokens
    )
}

/// Generates one continuation of `prompt`; `on_text` receives the text as it is produced.
pub fn generate(
    decoder: &Decoder,
    model: &Llama,
    tokenizer: &tokenizers::Tokenizer,
    prompt: &str,
    limits: Limits,
    sampler: &mut Sampler,
    on_text: &mut dyn FnMut(&str),
) -> Result<Sample> {
    let start = Instant::now();
    let (prompt_ids, mut cache, logits) = prefill(model, tokenizer, prompt, limits)?;
    let capacity = prompt_ids.len() + limits.max_new_tokens;
    let mut state = match decoder {
        Decoder::Fast(weights) => {
            let state = weights.start(&cache, capacity)?;
            cache = KvCache::default();
            Some(state)
        }
        Decoder::Tensor(_) => None,
    };
    let mut seq = Sequence::new(&prompt_ids, logits, limits);
    let mut streamed = String::new();
    while !seq.done {
        let token = seq.advance(sampler, model, limits, start);
        if seq.stopped_on_eos {
            break;
        }
        stream(tokenizer, &seq.ids, &mut streamed, on_text)?;
        if !seq.done {
            seq.logits = match (decoder, state.as_mut()) {
                (Decoder::Fast(weights), Some(state)) => weights.step(state, token)?,
                _ => {
                    let input = Tensor::new(&[token], model.embed.device())?.unsqueeze(0)?;
                    let l = model.forward(&input, Some(&mut cache))?;
                    l.squeeze(0)?.get(0)?.to_vec1()?
                }
            };
        }
    }
    let sample = seq.into_sample(tokenizer, prompt, prompt_ids.len())?;
    if let Some(rest) = sample.text.strip_prefix(streamed.as_str()) {
        on_text(rest);
    }
    Ok(sample)
}

/// A continuation being decoded: its tokens so far and the logits for its next one.
struct Sequence {
    /// The prompt and the new tokens (what the repetition penalty sees).
    context: Vec<u32>,
    /// The new tokens.
    ids: Vec<u32>,
    logits: Vec<f32>,
    done: bool,
    stopped_on_eos: bool,
    first_token_s: f64,
    total_s: f64,
}

impl Sequence {
    /// Before the first new token: the prompt and the logits after it.
    fn new(prompt_ids: &[u32], logits: Vec<f32>, limits: Limits) -> Self {
        Self {
            context: prompt_ids.to_vec(),
            ids: Vec::with_capacity(limits.max_new_tokens),
            logits,
            done: limits.max_new_tokens == 0,
            stopped_on_eos: false,
            first_token_s: 0.0,
            total_s: 0.0,
        }
    }

    /// Samples the next token from the logits and appends it; the sequence is done at an
    /// end-of-sequence token (when `limits` stop there) or at the token limit. Times are
    /// seconds since `start`.
    fn advance(
        &mut self,
        sampler: &mut Sampler,
        model: &Llama,
        limits: Limits,
        start: Instant,
    ) -> u32 {
        let token = sampler.next_token(&self.logits, &self.context);
        if self.ids.is_empty() {
            self.first_token_s = start.elapsed().as_secs_f64();
        }
        self.ids.push(token);
        self.context.push(token);
        self.stopped_on_eos = limits.stop_at_eos && model.config.eos_token_ids.contains(&token);
        self.done = self.stopped_on_eos || self.ids.len() >= limits.max_new_tokens;
        if self.done {
            self.total_s = start.elapsed().as_secs_f64();
        }
        token
    }

    /// The finished sample, its text decoded without special tokens.
    fn into_sample(
        self,
        tokenizer: &tokenizers::Tokenizer,
        prompt: &str,
        prompt_tokens: usize,
    ) -> Result<Sample> {
        let text = tokenizer
            .decode(&self.ids, true)
            .map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?;
        Ok(Sample {
            prompt: prompt.to_string(),
            prompt_tokens,
            text,
            stopped_on_eos: self.stopped_on_eos,
            decode_tokens_per_s: (self.ids.len().saturating_sub(1)) as f64
                / (self.total_s - self.first_token_s).max(1e-9),
            ids: self.ids,
            first_token_s: self.first_token_s,
            total_s: self.total_s,
        })
    }
}

/// The prompt's ids, its key/value cache and the logits after its last token.
fn prefill(
    model: &Llama,
    tokenizer: &tokenizers::Tokenizer,
    prompt: &str,
    limits: Limits,
) -> Result<(Vec<u32>, KvCache, Vec<f32>)> {
    let prompt_ids = encode_prompt(tokenizer, prompt)?;
    check_context(
        prompt_ids.len(),
        limits.max_new_tokens,
        model.max_positions(),
    )?;
    let mut cache = KvCache::default();
    let input = Tensor::new(prompt_ids.as_slice(), model.embed.device())?.unsqueeze(0)?;
    let logits = model.forward(&input, Some(&mut cache))?.squeeze(0)?;
    let logits = logits.get(prompt_ids.len() - 1)?.to_vec1()?;
    Ok((prompt_ids, cache, logits))
}

/// One continuation of `prompt` per sampler, decoded together: each decoding step reads the
/// weights once for every sequence still going. Sample `i` is exactly what [`generate`] gives
/// with `samplers[i]` (the fast decoder's batched step sums as its single step does); the
/// tensor decoder generates them one after another.
pub fn generate_batch(
    decoder: &Decoder,
    model: &Llama,
    tokenizer: &tokenizers::Tokenizer,
    prompt: &str,
    limits: Limits,
    samplers: &mut [Sampler],
) -> Result<Vec<Sample>> {
    let Decoder::Fast(weights) = decoder else {
        return samplers
            .iter_mut()
            .map(|s| generate(decoder, model, tokenizer, prompt, limits, s, &mut |_| {}))
            .collect();
    };
    let start = Instant::now();
    let (prompt_ids, cache, logits) = prefill(model, tokenizer, prompt, limits)?;
    let capacity = prompt_ids.len() + limits.max_new_tokens;
    let mut seqs = Vec::with_capacity(samplers.len());
    for _ in 0..samplers.len() {
        let state = weights.start(&cache, capacity)?;
        seqs.push((Sequence::new(&prompt_ids, logits.clone(), limits), state));
    }
    drop(cache);
    loop {
        for ((seq, _), sampler) in seqs.iter_mut().zip(samplers.iter_mut()) {
            if !seq.done {
                seq.advance(sampler, model, limits, start);
            }
        }
        let (mut states, tokens): (Vec<_>, Vec<u32>) = seqs
            .iter_mut()
            .filter(|(seq, _)| !seq.done)
            .map(|(seq, state)| (state, seq.ids[seq.ids.len() - 1]))
            .unzip();
        if tokens.is_empty() {
            break;
        }
        let logits = weights.step_batch(&mut states, &tokens)?;
        for ((seq, _), l) in seqs.iter_mut().filter(|(seq, _)| !seq.done).zip(logits) {
            seq.logits = l;
        }
    }
    seqs.into_iter()
        .map(|(seq, _)| seq.into_sample(tokenizer, prompt, prompt_ids.len()))
        .collect()
}

/// Sends the newly decoded text, holding back an incomplete UTF-8 sequence (decoded as U+FFFD)
/// until its last byte arrives.
fn stream(
    tokenizer: &tokenizers::Tokenizer,
    ids: &[u32],
    streamed: &mut String,
    on_text: &mut dyn FnMut(&str),
) -> Result<()> {
    let text = tokenizer
        .decode(ids, true)
        .map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?;
    if text.ends_with('\u{FFFD}') {
        return Ok(());
    }
    if let Some(rest) = text.strip_prefix(streamed.as_str()) {
        if !rest.is_empty() {
            on_text(rest);
            streamed.push_str(rest);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_context;

    #[test]
    fn context_check_names_the_limit_to_respect() {
        assert!(check_context(6, 250, 256).is_ok());
        let over = check_context(6, 251, 256).unwrap_err().to_string();
        assert!(over.contains("at most 250"), "{over}");
        let huge = check_context(6, usize::MAX, 256).unwrap_err().to_string();
        assert!(
            huge.contains("lower --max-new-tokens to at most 250"),
            "{huge}"
        );
        let long = check_context(300, 1, 256).unwrap_err().to_string();
        assert!(
            long.contains("300 tokens") && long.contains("shorten the prompt"),
            "{long}"
        );
    }
}
