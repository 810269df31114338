//! Benchmarks. Every speed is reported next to a baseline measured in the same run, so the
//! ratios hold on any machine; absolute times are printed for the record only.

use crate::generate::{self, Limits, DEFAULT_PROMPT};
use crate::model::{decode::DecodeWeights, KvCache, LoadedModel};
use crate::sampling::{Sampler, SamplingParams};
use anyhow::Result;
use candle_core::Tensor;
use rayon::prelude::*;
use std::time::Instant;

/// Generation speed: the fast decoder against the tensor forward pass (both KV-cached, greedy,
/// fixed length), and against the memory bandwidth needed to stream the weights once a token.
pub fn generation(m: &LoadedModel, new_tokens: usize, repeats: usize) -> Result<()> {
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let weights = DecodeWeights::new(&m.model)?;
    let limits = Limits {
        max_new_tokens: new_tokens,
        stop_at_eos: false,
    };
    let mut best = 0f64;
    for run in 0..repeats.max(1) {
        let mut sampler = Sampler::new(greedy, 0)?;
        let s = generate::generate(
            &weights,
            &m.model,
            &m.tokenizer,
            DEFAULT_PROMPT,
            limits,
            &mut sampler,
            &mut |_| {},
        )?;
        println!(
            "run {run}: {} tokens in {:.2} s, first token {:.0} ms, decode {:.1} tokens/s",
            s.ids.len(),
            s.total_s,
            s.first_token_s * 1e3,
            s.decode_tokens_per_s
        );
        best = best.max(s.decode_tokens_per_s);
    }
    let baseline_tokens = new_tokens.clamp(2, 50);
    let tensor_path = tensor_path_tokens_per_s(m, baseline_tokens)?;
    let bytes = weights.streamed_bytes() as f64;
    let bandwidth = read_bandwidth(weights.streamed_bytes() / 4)?;
    let roofline = bandwidth / bytes;
    println!("fast decoder:      {best:.1} tokens/s (best of {repeats}, {new_tokens} new tokens)");
    println!(
        "tensor forward:    {tensor_path:.1} tokens/s ({baseline_tokens} new tokens)  -> fast decoder is {:.2}x",
        best / tensor_path
    );
    println!(
        "memory bandwidth:  {:.1} GB/s measured reading {:.0} MB with {} threads: streaming the f32 weights \
         allows at most {roofline:.1} tokens/s -> fast decoder reaches {:.0}% of it",
        bandwidth / 1e9,
        bytes / 1e6,
        rayon::current_num_threads(),
        100.0 * best / roofline
    );
    println!("peak memory:       {:.0} MiB", peak_rss_mib());
    Ok(())
}

/// Greedy KV-cached decoding through [`crate::model::Llama::forward`], one token at a time.
fn tensor_path_tokens_per_s(m: &LoadedModel, tokens: usize) -> Result<f64> {
    let ids = generate::encode_prompt(&m.tokenizer, DEFAULT_PROMPT)?;
    let device = m.model.embed.device();
    let mut cache = KvCache::default();
    let mut logits = m.model.forward(
        &Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?,
        Some(&mut cache),
    )?;
    let start = Instant::now();
    for _ in 0..tokens {
        let next = logits
            .squeeze(0)?
            .get(logits.dim(1)? - 1)?
            .argmax(0)?
            .to_scalar::<u32>()?;
        logits = m.model.forward(
            &Tensor::new(&[next], device)?.unsqueeze(0)?,
            Some(&mut cache),
        )?;
    }
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

/// Read bandwidth in bytes/s: the best of five parallel sums over `floats` f32 on huge pages.
fn read_bandwidth(floats: usize) -> Result<f64> {
    let mut buf = crate::model::weights::huge_page_vec(floats);
    buf.extend((0..floats).map(|i| (i % 7) as f32));
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let sum: f32 = buf.par_chunks(1 << 16).map(lane_sum).sum();
        std::hint::black_box(sum);
        best = best.max((floats * 4) as f64 / start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// A sum with independent lanes, so it vectorizes and runs at memory speed.
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    for c in x.chunks_exact(32) {
        acc.iter_mut().zip(c).for_each(|(a, v)| *a += v);
    }
    acc.iter().sum::<f32>() + x.chunks_exact(32).remainder().iter().sum::<f32>()
}

/// Peak resident memory of this process (VmHWM), in MiB; 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
