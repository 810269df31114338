//! LoRA adapters on the tiny fixtures: the training forward with adapters (gradients against
//! finite differences, B = 0 leaves the model unchanged, dropout determinism), merging, and the
//! PEFT save/load round trip.

mod common;
use candle_core::{Device, Tensor, Var};
use common::{fixture, random_lora, Scratch};
use std::collections::HashMap;
use wake2vec::model::lora::{Target, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use wake2vec::model::{Llama, Lora, LoraConfig, LoraPass};
use wake2vec::train::step::batch_loss;
use wake2vec::train::wake_rows::{self, WakeRows};

const FIXTURES: [&str; 2] = ["tiny-llama", "tiny-qwen2"];

fn load(name: &str) -> Llama {
    Llama::load(&fixture(name), &Device::Cpu).unwrap()
}

/// Two blocks of 20 ids below 400 (both fixtures' vocabulary).
fn blocks() -> (Vec<u32>, Vec<u32>) {
    let a = (0..20u32).map(|i| (i * 37 + 11) % 400).collect();
    let b = (0..20u32).map(|i| (i * 53 + 301) % 400).collect();
    (a, b)
}

fn loss_of(model: &Llama, wake: Option<&WakeRows>, lora: Option<&LoraPass>) -> Tensor {
    let (a, b) = blocks();
    batch_loss(model, &[&a, &b], wake, lora).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn all_targets() -> LoraConfig {
    LoraConfig {
        targets: Target::ALL.map(|t| t.name().to_string()).to_vec(),
        ..LoraConfig::default()
    }
}

#[test]
fn init_is_peft_default_and_deterministic() {
    let model = load("tiny-llama");
    let lora = Lora::new(&model, LoraConfig::default(), 1).unwrap();
    let again = Lora::new(&model, LoraConfig::default(), 1).unwrap();
    let other = Lora::new(&model, LoraConfig::default(), 2).unwrap();
    let params = lora.params();
    // 2 layers × 6 targets × (A, B).
    assert_eq!(params.len(), 2 * 6 * 2);
    assert_eq!(
        params[0].0,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    assert_eq!(
        params.last().unwrap().0,
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    );
    let c = &model.config;
    let (h, i, kv) = (
        c.hidden_size,
        c.intermediate_size,
        c.num_kv_heads * c.head_dim,
    );
    let q = c.num_heads * c.head_dim;
    let per_layer = 8 * ((h + q) + 2 * (h + kv) + 2 * (h + i) + (i + h));
    assert_eq!(lora.num_params(), 2 * per_layer);
    for (((name, v), (_, w)), (_, o)) in params.iter().zip(again.params()).zip(other.params()) {
        let (x, y, z) = (
            values(v.as_tensor()),
            values(w.as_tensor()),
            values(o.as_tensor()),
        );
        assert_eq!(x, y, "{name}: same seed, same values");
        if name.contains("lora_B") {
            assert!(x.iter().all(|&v| v == 0.0), "{name} starts at zero");
        } else {
            assert_ne!(x, z, "{name}: another seed, other values");
            let bound = 1.0 / (v.dim(1).unwrap() as f64).sqrt();
            assert!(x.iter().all(|&v| (v as f64).abs() <= bound));
            // Uniform on ±bound has variance bound²/3.
            let var = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64;
            let want = bound * bound / 3.0;
            assert!(
                (var - want).abs() < 0.2 * want,
                "{name}: variance {var} vs {want}"
            );
        }
    }
}

#[test]
fn with_b_zero_the_training_forward_equals_the_base_forward() {
    for name in FIXTURES {
        let model = load(name);
        let lora = Lora::new(&model, all_targets(), 3).unwrap();
        let (a, _) = blocks();
        let ids = Tensor::new(a.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let base = values(&wake_rows::hidden_states(&model, &ids, None, None).unwrap());
        for seed in [None, Some(9)] {
            let pass = LoraPass {
                lora: &lora,
                dropout_seed: seed,
            };
            let with = values(&wake_rows::hidden_states(&model, &ids, None, Some(&pass)).unwrap());
            assert_eq!(base, with, "{name}, dropout seed {seed:?}");
            assert_eq!(
                scalar(&loss_of(&model, None, None)),
                scalar(&loss_of(&model, None, Some(&pass)))
            );
        }
    }
}

/// Central differences of the loss along `u` in `var`, against the analytic directional
/// derivative `⟨g, u⟩` (which must stand well above the loss's rounding noise).
fn check_direction(what: &str, var: &Var, g: &[f32], u: &[f32], eps: f32, loss: &dyn Fn() -> f64) {
    let base = var.as_detached_tensor().copy().unwrap();
    let x0 = values(&base);
    let at = |s: f32| {
        let v: Vec<f32> = x0.iter().zip(u).map(|(x, u)| x + s * u).collect();
        var.set(&Tensor::from_vec(v, base.shape(), &Device::Cpu).unwrap())
            .unwrap();
        loss()
    };
    let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
    var.set(&base).unwrap();
    let an: f64 = g.iter().zip(u).map(|(g, u)| (g * u) as f64).sum();
    assert!(
        an.abs() > 10.0 * 1e-6 / eps as f64,
        "{what}: the derivative {an} is too small to check at step {eps}"
    );
    let err = (fd - an).abs() / an.abs().max(1e-4);
    assert!(
        err < 2e-2,
        "{what}: analytic {an} vs finite difference {fd}"
    );
}

/// A direction with random magnitudes in [0, 1) and the analytic gradient's signs, so that the
/// directional derivative stands well above the f32 loss's noise while every entry counts (an
/// entry with a wrong sign or size would pull the finite difference away).
fn aligned(g: &[f32], rng: &mut wake2vec::util::rng::Rng) -> Vec<f32> {
    g.iter()
        .map(|&x| {
            let r = rng.next_f64() as f32;
            if x == 0.0 {
                (r - 0.5) * 0.2
            } else {
                r * x.signum()
            }
        })
        .collect()
}

/// The loss gradient w.r.t. A and B (random non-zero B) and w.r.t. the input embeddings (Wake
/// rows, which reach the adapters through every layer) against finite differences; with and
/// without a (fixed) dropout mask.
fn gradient_check(name: &str) {
    let model = load(name);
    let lora = random_lora(&model, all_targets(), 5, 0.1);
    let (start, count) = (300usize, 100usize);
    let embed = Var::from_tensor(&model.embed.narrow(0, start, count).unwrap()).unwrap();
    let head = model
        .lm_head
        .as_ref()
        .map(|h| Var::from_tensor(&h.narrow(0, start, count).unwrap()).unwrap());
    let wake = WakeRows {
        start,
        embed: embed.as_tensor().clone(),
        head: head.as_ref().map(|h| h.as_tensor().clone()),
        sink: None,
    };
    for seed in [None, Some(17)] {
        let pass = LoraPass {
            lora: &lora,
            dropout_seed: seed,
        };
        let loss = || scalar(&loss_of(&model, Some(&wake), Some(&pass)));
        let grads = loss_of(&model, Some(&wake), Some(&pass))
            .backward()
            .unwrap();
        let params = lora.params();
        let mut rng = wake2vec::util::rng::Rng::new(42);
        // A few matrices: both layers, attention and MLP, A and B.
        for k in [0, 1, 7, 13, 22, 27] {
            let (key, var) = &params[k];
            let g = values(grads.get(var.as_tensor()).unwrap());
            assert!(g.iter().any(|&x| x != 0.0), "{name} {key}: no gradient");
            // Single entries: the largest gradient and a random one.
            let big = (0..g.len())
                .max_by(|&i, &j| g[i].abs().total_cmp(&g[j].abs()))
                .unwrap();
            let random = (rng.next_u64() % g.len() as u64) as usize;
            for i in [big, random] {
                let mut u = vec![0f32; g.len()];
                u[i] = 1.0;
                if i == random && g[i].abs() < 5e-4 {
                    continue; // below the f32 loss's finite-difference resolution
                }
                check_direction(
                    &format!("{name} {key}[{i}] dropout {seed:?}"),
                    var,
                    &g,
                    &u,
                    2e-2,
                    &loss,
                );
            }
            let u = aligned(&g, &mut rng);
            check_direction(
                &format!("{name} {key} along a random direction, dropout {seed:?}"),
                var,
                &g,
                &u,
                1e-2,
                &loss,
            );
        }
        // The input: the Wake rows of the embedding feed every projection, adapters included.
        let g = values(grads.get(embed.as_tensor()).unwrap());
        let u = aligned(&g, &mut rng);
        check_direction(
            &format!("{name} Wake rows, dropout {seed:?}"),
            &embed,
            &g,
            &u,
            5e-3,
            &loss,
        );
        // …and the adapters change that gradient.
        let plain = loss_of(&model, Some(&wake), None).backward().unwrap();
        let g0 = values(plain.get(embed.as_tensor()).unwrap());
        let diff = g
            .iter()
            .zip(&g0)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff > 1e-4,
            "{name}: the adapters do not reach the input gradient"
        );
    }
}

#[test]
fn gradients_match_finite_differences_untied() {
    gradient_check("tiny-llama");
}

#[test]
fn gradients_match_finite_differences_tied_with_biases() {
    gradient_check("tiny-qwen2");
}

#[test]
fn merged_weights_give_the_lora_forwards_logits() {
    for name in FIXTURES {
        let model = load(name);
        let lora = random_lora(&model, all_targets(), 7, 0.1);
        let mut weights = wake2vec::hub::weights::load_dir(&fixture(name), &Device::Cpu).unwrap();
        lora.merge_into(&mut weights).unwrap();
        let merged = Llama::from_weights(model.config.clone(), weights, &Device::Cpu).unwrap();
        let (a, _) = blocks();
        let ids = Tensor::new(a.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let pass = LoraPass {
            lora: &lora,
            dropout_seed: None,
        };
        let h = wake_rows::hidden_states(&model, &ids, None, Some(&pass))
            .unwrap()
            .squeeze(0)
            .unwrap();
        let trained = values(&wake_rows::logits(&model, &h, None).unwrap());
        let merged = values(&merged.forward(&ids, None).unwrap());
        let base = values(&model.forward(&ids, None).unwrap());
        let max_diff = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        let d = max_diff(&trained, &merged);
        assert!(d < 1e-5, "{name}: merged vs LoRA forward differ by {d}");
        // The adapters do change the logits, so the comparison means something.
        let moved = max_diff(&base, &merged);
        assert!(
            moved > 1e-2,
            "{name}: the adapters moved the logits by only {moved}"
        );
    }
}

#[test]
fn dropout_masks_follow_the_seed() {
    let model = load("tiny-llama");
    let lora = random_lora(&model, LoraConfig::default(), 8, 0.1);
    let run = |seed: Option<u64>| {
        let pass = LoraPass {
            lora: &lora,
            dropout_seed: seed,
        };
        let l = loss_of(&model, None, Some(&pass));
        let g = l.backward().unwrap();
        let ga = values(g.get(lora.params()[0].1.as_tensor()).unwrap());
        (scalar(&l), ga)
    };
    let (l1, g1) = run(Some(1));
    let (l1b, g1b) = run(Some(1));
    assert_eq!(l1, l1b);
    assert_eq!(g1, g1b);
    let (l2, _) = run(Some(2));
    assert_ne!(l1, l2, "another seed, another mask");
    let (l0, _) = run(None);
    assert_ne!(l1, l0, "dropout 0.1 with a seed changes the loss");
    // Dropout probability 0: a seed draws no mask.
    let no_drop = random_lora(
        &model,
        LoraConfig {
            dropout: 0.0,
            ..LoraConfig::default()
        },
        8,
        0.1,
    );
    let pass = |seed| LoraPass {
        lora: &no_drop,
        dropout_seed: seed,
    };
    assert_eq!(
        scalar(&loss_of(&model, None, Some(&pass(Some(1))))),
        scalar(&loss_of(&model, None, Some(&pass(None))))
    );
    // Same matrices as `lora` (same seeds), so without dropout both give the same loss.
    assert_eq!(scalar(&loss_of(&model, None, Some(&pass(None)))), l0);
}

#[test]
fn peft_files_round_trip_bit_for_bit() {
    let model = load("tiny-qwen2");
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.05,
        targets: vec!["o_proj".into(), "q_proj".into(), "down_proj".into()],
    };
    let lora = random_lora(&model, config.clone(), 11, 0.3);
    let dir = Scratch::new("lora-roundtrip");
    let out = dir.path("adapter");
    lora.save_peft(&out, "tiny-qwen2").unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8);
    assert_eq!(json["lora_dropout"], 0.05);
    assert_eq!(json["base_model_name_or_path"], "tiny-qwen2");
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["o_proj", "q_proj", "down_proj"])
    );
    let back = Lora::load_peft(&out, &model).unwrap();
    assert_eq!(back.config(), &config);
    let (p, q) = (lora.params(), back.params());
    assert_eq!(p.len(), 2 * 2 * 3);
    for ((k1, v1), (k2, v2)) in p.iter().zip(&q) {
        assert_eq!(k1, k2);
        assert_eq!(v1.dims(), v2.dims());
        let bits =
            |v: &Var| -> Vec<u32> { values(v.as_tensor()).iter().map(|x| x.to_bits()).collect() };
        assert_eq!(bits(v1), bits(v2), "{k1}");
    }
    // Nothing else in the directory (no temporary files left).
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [ADAPTER_CONFIG, ADAPTER_WEIGHTS]);
}

#[test]
fn bad_adapters_give_clear_errors() {
    let model = load("tiny-llama");
    let lora = random_lora(&model, LoraConfig::default(), 12, 0.1);
    let dir = Scratch::new("lora-bad");
    let good = dir.path("good");
    lora.save_peft(&good, "tiny-llama").unwrap();
    let err = |d: &std::path::Path| format!("{:#}", Lora::load_peft(d, &model).unwrap_err());

    let e = err(&dir.path("missing"));
    assert!(
        e.contains(ADAPTER_CONFIG) && e.contains("PEFT adapter directory"),
        "{e}"
    );

    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let d = dir.path(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(good.join(ADAPTER_WEIGHTS), d.join(ADAPTER_WEIGHTS)).unwrap();
        let mut j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(good.join(ADAPTER_CONFIG)).unwrap())
                .unwrap();
        f(&mut j);
        std::fs::write(d.join(ADAPTER_CONFIG), j.to_string()).unwrap();
        d
    };
    let e = err(&edit("ia3", &|j| j["peft_type"] = "IA3".into()));
    assert!(
        e.contains("IA3") && e.contains("LORA") && e.contains(ADAPTER_CONFIG),
        "{e}"
    );
    let e = err(&edit("dora", &|j| j["use_dora"] = true.into()));
    assert!(e.contains("use_dora"), "{e}");
    let e = err(&edit("rslora", &|j| j["use_rslora"] = true.into()));
    assert!(e.contains("use_rslora"), "{e}");
    let e = err(&edit("rank", &|j| j["r"] = 4.into()));
    assert!(e.contains("shape") && e.contains("[4, 64]"), "{e}");
    let e = err(&edit("targets", &|j| {
        j["target_modules"] = serde_json::json!(["q_proj", "o_proj"])
    }));
    assert!(e.contains("o_proj.lora_A"), "{e}");
    let e = err(&edit("fewer", &|j| {
        j["target_modules"] = serde_json::json!(["q_proj"])
    }));
    assert!(e.contains("do not use") && e.contains("lora_"), "{e}");
    let broken = edit("json", &|_| {});
    std::fs::write(broken.join(ADAPTER_CONFIG), "{ not json").unwrap();
    let e = err(&broken);
    assert!(e.contains("not valid JSON"), "{e}");
    let no_weights = edit("noweights", &|_| {});
    std::fs::remove_file(no_weights.join(ADAPTER_WEIGHTS)).unwrap();
    let e = err(&no_weights);
    assert!(e.contains(ADAPTER_WEIGHTS), "{e}");

    // from_tensors: a missing tensor is named.
    let mut tensors: HashMap<String, Tensor> = lora
        .params()
        .into_iter()
        .map(|(k, v)| (k, v.as_detached_tensor()))
        .collect();
    tensors.remove("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight");
    let e = format!(
        "{:#}",
        Lora::from_tensors(&model, LoraConfig::default(), tensors).unwrap_err()
    );
    assert!(e.contains("layers.1.mlp.up_proj.lora_B"), "{e}");
    // A model with another layer count refuses the adapters in the forward pass.
    let mut shallow = model.clone();
    shallow.blocks.truncate(1);
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let pass = LoraPass {
        lora: &lora,
        dropout_seed: None,
    };
    let e = wake_rows::hidden_states(&shallow, &ids, None, Some(&pass)).unwrap_err();
    assert!(format!("{e:#}").contains("cover 2 layers"), "{e:#}");
}

/// Writes the adapters and merged model of the PEFT interop check (scripts/fixtures/peft_check.py):
/// `WAKE2VEC_PEFT_OUT=DIR cargo test --release --test lora -- --ignored write_peft_interop`.
#[test]
#[ignore]
fn write_peft_interop_files() {
    let Ok(out) = std::env::var("WAKE2VEC_PEFT_OUT") else {
        eprintln!("set WAKE2VEC_PEFT_OUT=DIR to write the interop files");
        return;
    };
    let out = std::path::PathBuf::from(out);
    let base = fixture("tiny-llama");
    let model = load("tiny-llama");
    let lora = random_lora(&model, all_targets(), 21, 0.2);
    lora.save_peft(&out.join("adapter"), base.to_str().unwrap())
        .unwrap();
    let mut weights = wake2vec::hub::weights::load_dir(&base, &Device::Cpu).unwrap();
    lora.merge_into(&mut weights).unwrap();
    let merged = out.join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    let sorted: std::collections::BTreeMap<_, _> = weights.into_iter().collect();
    wake2vec::hub::weights::save_file(&sorted, &merged.join("model.safetensors")).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(base.join(f), merged.join(f)).unwrap();
    }
    eprintln!(
        "wrote {}/adapter and {}/merged",
        out.display(),
        out.display()
    );
}

/// An adapter written by Python `peft` (scripts/fixtures/peft_golden.py): `load_peft` reads it,
/// and the LoRA training forward without dropout gives PEFT's log-probs.
#[test]
fn a_peft_written_adapter_gives_peft_log_probs() {
    let model = load("tiny-llama");
    let dir = fixture("peft-tiny-llama");
    let lora = Lora::load_peft(&dir, &model).unwrap();
    let c = lora.config();
    assert_eq!((c.r, c.alpha, c.dropout), (2, 6.0, 0.1));
    // PEFT writes target_modules from a set, in no fixed order.
    assert_eq!(
        c.target_set().unwrap(),
        [Target::Q, Target::O, Target::Down]
    );
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(golden["ids"].clone()).unwrap();
    let want: Vec<f64> = serde_json::from_value(golden["logprobs"].clone()).unwrap();
    let input = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let pass = LoraPass {
        lora: &lora,
        dropout_seed: None,
    };
    let h = wake_rows::hidden_states(&model, &input, None, Some(&pass))
        .unwrap()
        .squeeze(0)
        .unwrap();
    let logits = wake_rows::logits(&model, &h, None).unwrap();
    let lse = values(&logits.log_sum_exp(1).unwrap());
    let l = values(&logits);
    let vocab = logits.dim(1).unwrap();
    let base = wake2vec::infer::score::logprobs(&model, &ids).unwrap();
    let (mut max_diff, mut moved) = (0f64, 0f64);
    for (i, w) in want.iter().enumerate() {
        let ours = (l[i * vocab + ids[i + 1] as usize] - lse[i]) as f64;
        max_diff = max_diff.max((ours - w).abs());
        moved = moved.max((base[i] as f64 - w).abs());
    }
    eprintln!(
        "wake2vec vs peft log-probs: max |Δ| {max_diff:.2e}, adapter moves them by {moved:.2}"
    );
    assert!(
        max_diff < 1e-4,
        "wake2vec vs peft log-probs: max |Δ| {max_diff}"
    );
    assert!(
        moved > 0.1,
        "the adapter moves the log-probs by only {moved}"
    );
}

/// On SmolLM2-135M (skipped when absent; `--ignored`, it takes a few seconds): with fresh
/// adapters the loss equals the base loss, and one backward gives every adapter a finite
/// gradient (B's non-zero). Prints the time of a micro-batch with adapters and of Phase 1's
/// (trainable embedding rows, so both run a backward through the whole network).
#[test]
#[ignore]
fn smollm2_lora_micro_batch() {
    let dir = std::path::Path::new("/root/models/smollm2-135m");
    if !dir.join("config.json").is_file() {
        eprintln!("skipped: no model at {}", dir.display());
        return;
    }
    let model = Llama::load(dir, &Device::Cpu).unwrap();
    let lora = Lora::new(&model, LoraConfig::default(), 1).unwrap();
    eprintln!("adapters: {} values", lora.num_params());
    let blocks: Vec<Vec<u32>> = (0..2u32)
        .map(|b| {
            (0..128u32)
                .map(|i| (i * 7919 + b * 104_729) % 49_152)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = blocks.iter().map(|b| b.as_slice()).collect();
    let plain = batch_loss(&model, &refs, None, None).unwrap();
    // Phase 1's work for comparison: the same pass with trainable (tracked) embedding rows, so
    // the backward runs through the whole network.
    let start = 40_000;
    let rows = Var::from_tensor(&model.embed.narrow(0, start, 9_152).unwrap()).unwrap();
    let wake = WakeRows {
        start,
        embed: rows.as_tensor().clone(),
        head: None,
        sink: None,
    };
    let t = std::time::Instant::now();
    let p1 = batch_loss(&model, &refs, Some(&wake), None).unwrap();
    let t_p1_fwd = t.elapsed();
    let _ = p1.backward().unwrap();
    let t_plain = t.elapsed();
    eprintln!("P1 forward {t_p1_fwd:?}");
    let pass = LoraPass {
        lora: &lora,
        dropout_seed: Some(3),
    };
    let t = std::time::Instant::now();
    let with = batch_loss(&model, &refs, None, Some(&pass)).unwrap();
    let t_fwd = t.elapsed();
    let grads = with.backward().unwrap();
    let t_lora = t.elapsed();
    eprintln!("LoRA forward {t_fwd:?}");
    let t = std::time::Instant::now();
    let nodrop = LoraPass {
        lora: &lora,
        dropout_seed: None,
    };
    let l2 = batch_loss(&model, &refs, None, Some(&nodrop)).unwrap();
    let t_fwd2 = t.elapsed();
    let _ = l2.backward().unwrap();
    eprintln!(
        "LoRA no dropout: forward {t_fwd2:?}, total {:?}",
        t.elapsed()
    );
    eprintln!(
        "micro-batch 2×128 forward+backward: {t_plain:?} P1 (Wake rows), {t_lora:?} with LoRA"
    );
    assert_eq!(scalar(&plain), scalar(&with));
    for (name, var) in lora.params() {
        let g = values(grads.get(var.as_tensor()).unwrap());
        assert!(g.iter().all(|x| x.is_finite()), "{name}");
        if name.contains("lora_B") {
            assert!(g.iter().any(|&x| x != 0.0), "{name} has no gradient");
        }
    }
}
