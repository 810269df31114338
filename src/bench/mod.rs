//! Benchmarks. Every speed is reported next to a baseline measured in the same run, so the
//! ratios hold on any machine; absolute times are printed for the record only.

pub mod train;

use crate::analysis::{self, linalg, Embeddings, Geometry, Layout, Options, Vocabulary};
use crate::infer::battery;
use crate::infer::generate::{self, Limits, DEFAULT_PROMPT};
use crate::infer::sampling::{Sampler, SamplingParams};
use crate::model::{KvCache, LoadedModel};
use anyhow::Result;
use candle_core::Tensor;
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;

/// Generation speed: the fast decoder against the tensor forward pass (both KV-cached, greedy,
/// fixed length), and against the memory bandwidth needed to stream the weights once a token;
/// with bf16 weights, also against the f32 decoder on the same weights widened.
pub fn generation(m: &LoadedModel, new_tokens: usize, repeats: usize) -> Result<()> {
    let decoder = generate::Decoder::new(&m.model)?;
    let best = decode_tokens_per_s(&decoder, &m.model, &m.tokenizer, new_tokens, repeats)?;
    let generate::Decoder::Fast(weights) = &decoder else {
        // The tensor path (a GPU, f16 weights, forced generic kernels) decodes here; its
        // baseline is a peer on the same device (e.g. transformers' generate), run beside this.
        crate::outln!(
            "tensor decoder ({}): {best:.1} tokens/s (best of {repeats}, {new_tokens} new tokens)",
            crate::nn::device::device_name(m.model.embed.device())
        );
        crate::outln!("peak memory:       {:.0} MiB", peak_rss_mib());
        return Ok(());
    };
    let baseline_tokens = new_tokens.clamp(2, 50);
    let tensor_path = tensor_path_tokens_per_s(m, baseline_tokens)?;
    let bytes = weights.streamed_bytes() as f64;
    let bandwidth = read_bandwidth(weights.streamed_bytes() / 4)?;
    let roofline = bandwidth / bytes;
    crate::outln!(
        "fast decoder:      {best:.1} tokens/s (best of {repeats}, {new_tokens} new tokens)"
    );
    if weights.precision() != "f32" {
        let mut wide = m.model.clone();
        wide.set_compute(&crate::nn::device::Compute::cpu())?;
        let f32_decoder = generate::Decoder::new(&wide)?;
        crate::outln!("the f32 decoder on the same weights widened to f32:");
        let f32_best = decode_tokens_per_s(&f32_decoder, &wide, &m.tokenizer, new_tokens, repeats)?;
        crate::outln!(
            "f32 decoder:       {f32_best:.1} tokens/s  -> {} decoder is {:.2}x",
            weights.precision(),
            best / f32_best
        );
    }
    crate::outln!(
        "tensor forward:    {tensor_path:.1} tokens/s ({baseline_tokens} new tokens)  -> fast decoder is {:.2}x",
        best / tensor_path
    );
    crate::outln!(
        "memory bandwidth:  {:.1} GB/s measured reading {:.0} MB with {} threads: streaming the {} weights \
         allows at most {roofline:.1} tokens/s -> fast decoder reaches {:.0}% of it",
        bandwidth / 1e9,
        bytes / 1e6,
        rayon::current_num_threads(),
        weights.precision(),
        100.0 * best / roofline
    );
    let (sequential, together) = battery_seconds(&decoder, m, new_tokens)?;
    crate::outln!(
        "battery:           {} samples x {new_tokens} tokens decoded together in {together:.2} s, \
         one after another in {sequential:.2} s -> {:.2}x (same texts)",
        battery::plan().len(),
        sequential / together
    );
    crate::outln!("peak memory:       {:.0} MiB", peak_rss_mib());
    Ok(())
}

/// Greedy fixed-length decoding of `new_tokens` after the default prompt, `repeats` times, each
/// run printed; the best tokens/s.
fn decode_tokens_per_s(
    decoder: &generate::Decoder,
    model: &crate::model::Llama,
    tokenizer: &tokenizers::Tokenizer,
    new_tokens: usize,
    repeats: usize,
) -> Result<f64> {
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let limits = Limits {
        max_new_tokens: new_tokens,
        stop_at_eos: false,
    };
    let mut best = 0f64;
    for run in 0..repeats.max(1) {
        let mut sampler = Sampler::new(greedy, 0)?;
        let s = generate::generate(
            decoder,
            model,
            tokenizer,
            DEFAULT_PROMPT,
            limits,
            &mut sampler,
            &mut |_| {},
        )?;
        crate::outln!(
            "run {run}: {} tokens in {:.2} s, first token {:.0} ms, decode {:.1} tokens/s",
            s.ids.len(),
            s.total_s,
            s.first_token_s * 1e3,
            s.decode_tokens_per_s
        );
        best = best.max(s.decode_tokens_per_s);
    }
    Ok(best)
}

/// Seconds for the battery's samples (its temperatures and seeds, `new_tokens` each) decoded one
/// after another and decoded together; fails if the two give different texts.
fn battery_seconds(
    decoder: &generate::Decoder,
    m: &LoadedModel,
    new_tokens: usize,
) -> Result<(f64, f64)> {
    let settings = battery::Settings::original(new_tokens);
    let limits = Limits {
        max_new_tokens: new_tokens,
        stop_at_eos: false,
    };
    let start = Instant::now();
    let alone = settings
        .samplers()?
        .iter_mut()
        .map(|s| {
            let (model, tokenizer) = (&m.model, &m.tokenizer);
            generate::generate(
                decoder,
                model,
                tokenizer,
                &settings.prompt,
                limits,
                s,
                &mut |_| {},
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let sequential = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let together = generate::generate_batch(
        decoder,
        &m.model,
        &m.tokenizer,
        &settings.prompt,
        limits,
        &mut settings.samplers()?,
    )?;
    let batched = start.elapsed().as_secs_f64();
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        anyhow::ensure!(
            a.ids == b.ids,
            "battery sample {i}: decoding together gave other tokens than decoding alone"
        );
    }
    Ok((sequential, batched))
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
    let mut buf = crate::hub::weights::huge_page_vec(floats);
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

/// `(name, wake2vec, reference, relative difference)` for every statistic both compute:
/// `ours` is a serialized [`Geometry`], `reference` analysis_reference.py's JSON.
/// p-values that underflow to 0 on both sides are skipped.
pub fn compare_with_reference(
    ours: &serde_json::Value,
    reference: &serde_json::Value,
) -> Vec<(String, f64, f64, f64)> {
    let mut out = Vec::new();
    let mut cmp = |name: String, a: &serde_json::Value, b: &serde_json::Value| {
        if let (Some(a), Some(b)) = (a.as_f64(), b.as_f64()) {
            if a == 0.0 && b == 0.0 {
                return;
            }
            let rel = if b == 0.0 {
                a.abs()
            } else {
                ((a - b) / b).abs()
            };
            out.push((name, a, b, rel));
        }
    };
    let (t, rt) = (
        &ours["norms"]["tests"],
        &reference["norm_tests_new_vs_base"],
    );
    cmp("Welch t".into(), &t["welch"]["t"], &rt["welch_t"]);
    cmp("Welch df".into(), &t["welch"]["df"], &rt["welch_df"]);
    cmp("Welch p".into(), &t["welch"]["p"], &rt["welch_p"]);
    cmp(
        "Mann-Whitney U".into(),
        &t["mann_whitney"]["U"],
        &rt["mannwhitney_U"],
    );
    cmp(
        "Mann-Whitney p".into(),
        &t["mann_whitney"]["p"],
        &rt["mannwhitney_p"],
    );
    cmp(
        "Cohen's d pooled".into(),
        &t["cohens_d"]["pooled"],
        &rt["cohens_d"],
    );
    for (r, o) in [("all", "all"), ("base", "base"), ("new", "wake")] {
        let (i, ri) = (&ours["isotropy"][o], &reference["isotropy"][r]);
        cmp(format!("Mu isotropy {o}"), &i["mu2018"], &ri["isotropy_pm"]);
        cmp(
            format!("mean cosine {o}"),
            &i["mean_cos"],
            &reference["mean_pairwise_cosine"][r],
        );
    }
    for (r, o) in [("base", "base"), ("new", "wake")] {
        let (p, rp) = (&ours["pca"][o], &reference["pca"][r]);
        cmp(format!("PCA k90 {o}"), &p["k90"], &rp["k90_uncapped"]);
        cmp(format!("PCA k95 {o}"), &p["k95"], &rp["k95_uncapped"]);
        if let (Some(a), Some(b)) = (p["top10_ratios"].as_array(), rp["top10_ratios"].as_array()) {
            for (j, (x, y)) in a.iter().zip(b).enumerate() {
                cmp(format!("PCA ratio {j} {o}"), x, y);
            }
        }
    }
    let (c, rc) = (&ours["pairwise_cosine"], &reference["pairwise_cosine"]);
    for (o, r) in [
        ("base_base", "base_base"),
        ("wake_wake", "new_new"),
        ("base_wake", "base_new"),
    ] {
        cmp(format!("pairwise {o} mean"), &c[o]["mean"], &rc[r]["mean"]);
        cmp(
            format!("pairwise {o} sd"),
            &c[o]["sd_sample"],
            &rc[r]["std"],
        );
    }
    let (k, rk) = (
        &c["ks_base_base_vs_wake_wake"],
        &rc["ks_base_base_vs_new_new"],
    );
    cmp("KS D".into(), &k["D"], &rk["statistic"]);
    cmp("KS p".into(), &k["p"], &rk["pvalue"]);
    out
}

/// User + system CPU seconds of the waited-for child processes.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; it has no other effect.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
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

/// The matrix `bench analyze` runs on: the rows of `base` (or `base_rows` synthetic anisotropic
/// rows of width `dim`) followed by `new_rows` rows drawn as the original's spherical init
/// (uniform directions at 1.5× the mean base norm), seeded.
pub fn analysis_matrix(
    base: Option<Embeddings>,
    base_rows: usize,
    dim: usize,
    new_rows: usize,
    seed: u64,
) -> Result<Embeddings> {
    let mut rng = crate::util::rng::Rng::new(seed);
    let mut normal = move || {
        let (u1, u2) = (rng.next_f64(), rng.next_f64());
        ((-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    };
    let (mut data, rows, dim) = match base {
        Some(e) => (e.data, e.rows, e.dim),
        None => {
            let scales: Vec<f32> = (0..dim)
                .map(|j| 0.05 + 1.0 / (1.0 + 0.05 * j as f32))
                .collect();
            let data: Vec<f32> = (0..base_rows * dim)
                .map(|i| normal() * scales[i % dim] * 0.1)
                .collect();
            (data, base_rows, dim)
        }
    };
    let mean_norm = data
        .chunks_exact(dim)
        .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt() as f64)
        .sum::<f64>()
        / rows as f64;
    data.reserve(new_rows * dim);
    for _ in 0..new_rows {
        let v: Vec<f32> = (0..dim).map(|_| normal()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        data.extend(v.iter().map(|x| x / n * (1.5 * mean_norm) as f32));
    }
    Embeddings::new(data, rows + new_rows, dim)
}

/// `bench analyze`: the whole suite (norms, tests, both isotropies, neighbours, PCA, pairwise
/// cosines + KS) on `e`, against a baseline measured in the same run: one f64 `XᵀX` of the
/// whole matrix through gemm (the suite's unit of heavy work), and optionally the numpy/scipy
/// reference script on the same matrix.
pub fn analysis(
    e: &Embeddings,
    base_vocab: usize,
    repeats: usize,
    reference: Option<(&Path, &Path)>,
) -> Result<()> {
    crate::outln!(
        "matrix {} × {} (base {}, new {}), {} threads",
        e.rows,
        e.dim,
        base_vocab,
        e.rows - base_vocab,
        rayon::current_num_threads()
    );
    let suite = time_suite(e, base_vocab, repeats)?;
    let gemm = gram_seconds(e)?;
    let flops = 2.0 * e.rows as f64 * (e.dim * e.dim) as f64;
    crate::outln!(
        "suite:    {:.2} s wall, {:.2} s CPU (best of {repeats})",
        suite.wall,
        suite.cpu
    );
    crate::outln!(
        "baseline: f64 XᵀX of the whole matrix {gemm:.3} s ({:.0} GFLOP/s) -> the suite costs {:.1} of them",
        flops / gemm / 1e9,
        suite.wall / gemm
    );
    if let Some((python, script)) = reference {
        against_reference(e, base_vocab, python, script, &suite)?;
    }
    crate::outln!("peak memory: {:.0} MiB", peak_rss_mib());
    Ok(())
}

/// The best wall and CPU times of the suite, and the geometry of its last run.
struct SuiteTimes {
    wall: f64,
    cpu: f64,
    geometry: Geometry,
}

/// Runs the suite `repeats` times (at least once) with the default options, printing each run's
/// times by stage.
fn time_suite(e: &Embeddings, base_vocab: usize, repeats: usize) -> Result<SuiteTimes> {
    let layout = Layout {
        base_vocab,
        wake_start: base_vocab,
        wake_count: e.rows - base_vocab,
        words: Vec::new(),
    };
    let vocab = Vocabulary {
        layout: &layout,
        tokenizer: None,
    };
    let mut best = f64::INFINITY;
    let mut best_cpu = f64::INFINITY;
    let mut last = None;
    for run in 0..repeats.max(1) {
        let start = Instant::now();
        let cpu0 = analysis::process_cpu_seconds();
        let a = analysis::analyze(
            e,
            &layout,
            &vocab,
            &Options::default(),
            None,
            &Default::default(),
        )?;
        let t = start.elapsed().as_secs_f64();
        let cpu = analysis::process_cpu_seconds() - cpu0;
        let parts: Vec<String> = a
            .geometry
            .timings_s
            .iter()
            .map(|t| format!("{} {:.2}/{:.2}", t.stage, t.seconds, t.cpu_seconds))
            .collect();
        crate::outln!(
            "run {run}: suite {t:.2} s wall, {cpu:.2} s CPU (stage wall/CPU: {})",
            parts.join(", ")
        );
        best = best.min(t);
        best_cpu = best_cpu.min(cpu);
        last = Some(a.geometry);
    }
    Ok(SuiteTimes {
        wall: best,
        cpu: best_cpu,
        geometry: last.expect("at least one run"),
    })
}

/// The baseline: seconds of one f64 `XᵀX` of the whole matrix, best of 3.
fn gram_seconds(e: &Embeddings) -> Result<f64> {
    let x: Vec<f64> = e.data.iter().map(|&v| v as f64).collect();
    let mut gemm = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        std::hint::black_box(linalg::gram_t(&x, e.rows, e.dim)?);
        gemm = gemm.min(start.elapsed().as_secs_f64());
    }
    Ok(gemm)
}

/// Runs the reference `script` with `python` on the same matrix (written to a temporary
/// safetensors file), compares its statistics with ours and prints both speeds.
fn against_reference(
    e: &Embeddings,
    base_vocab: usize,
    python: &Path,
    script: &Path,
    suite: &SuiteTimes,
) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("wake2vec-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("emb.safetensors");
    let t = candle_core::Tensor::from_slice(&e.data, (e.rows, e.dim), &candle_core::Device::Cpu)?;
    crate::hub::weights::save_file(
        &std::collections::BTreeMap::from([("embed_tokens".to_string(), t)]),
        &file,
    )?;
    let out = dir.join("ref.json");
    let child_cpu0 = children_cpu_seconds();
    let status = std::process::Command::new(python)
        .arg(script)
        .arg("--emb")
        .arg(&file)
        .arg("--base-vocab")
        .arg(base_vocab.to_string())
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", python.display()))?;
    anyhow::ensure!(status.success(), "the reference script failed ({status})");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let t = &json["timings"];
    let total = t["total_s"].as_f64().unwrap_or(f64::NAN) - t["load_s"].as_f64().unwrap_or(0.0);
    let child_cpu = children_cpu_seconds() - child_cpu0;
    let ours = serde_json::to_value(&suite.geometry)?;
    let diffs = compare_with_reference(&ours, &json);
    let worst = diffs
        .iter()
        .max_by(|a, b| a.3.total_cmp(&b.3))
        .map(|d| format!("{:.1e} ({}: {} vs {})", d.3, d.0, d.1, d.2))
        .unwrap_or_default();
    crate::outln!(
        "same numbers: {} statistics compared with the reference, largest relative difference {worst}",
        diffs.len()
    );
    crate::outln!(
        "reference: numpy/scipy/sklearn {total:.2} s wall without loading -> wake2vec is {:.1}x faster; \
         {:.1} s CPU for the whole script (start-up and loading included) -> {:.1}x",
        total / suite.wall,
        child_cpu,
        child_cpu / suite.cpu
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_comparison_pairs_the_right_fields() {
        let ours = serde_json::json!({
            "norms": {"tests": {"welch": {"t": 2.0, "df": 10.0, "p": 0.0},
                                "mann_whitney": {"U": 5.0, "p": 0.5},
                                "cohens_d": {"pooled": 0.3}}},
            "pca": {"base": {"k90": 3, "k95": 4, "top10_ratios": [0.5, 0.3]}},
            "pairwise_cosine": {"ks_base_base_vs_wake_wake": {"D": 0.2, "p": 0.01}}
        });
        let reference = serde_json::json!({
            "norm_tests_new_vs_base": {"welch_t": 2.0, "welch_df": 10.0, "welch_p": 0.0,
                                       "mannwhitney_U": 5.0, "mannwhitney_p": 0.4, "cohens_d": 0.3},
            "pca": {"base": {"k90_uncapped": 3, "k95_uncapped": 5, "top10_ratios": [0.5, 0.3]}},
            "pairwise_cosine": {"ks_base_base_vs_new_new": {"statistic": 0.2, "pvalue": 0.01}}
        });
        let d = compare_with_reference(&ours, &reference);
        let get = |n: &str| d.iter().find(|x| x.0 == n).map(|x| x.3);
        assert_eq!(get("Welch p"), None, "both underflowed: skipped");
        assert_eq!(get("Welch t"), Some(0.0));
        assert!((get("Mann-Whitney p").unwrap() - 0.25).abs() < 1e-12);
        assert!((get("PCA k95 base").unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(get("PCA ratio 1 base"), Some(0.0));
        assert_eq!(get("KS D"), Some(0.0));
    }
}
