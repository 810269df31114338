//! Injection into the tiny fixture models: new ids after a padded matrix, the defining
//! statistic of each init scheme (issue 3, item 4), the untied head, and the written directory
//! loading for scoring and generation.

use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;
use wake2vec::lexicon::{Case, Lexicon, MorphemeData};
use wake2vec::model::LoadedModel;
use wake2vec::vocab::{self, InitScheme, InjectOptions, Injected, Manifest};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn wake() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/finnegans_wake.txt");
    std::fs::read_to_string(path).unwrap()
}

/// The first `n` words of the original lexicon.
fn lexicon(n: usize) -> Lexicon {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/wake_lexicon.txt");
    let text = std::fs::read_to_string(path).unwrap();
    let head: Vec<&str> = text.lines().take(n).collect();
    Lexicon::parse(&head.join("\n"))
}

fn options(scheme: InitScheme, seed: u64) -> InjectOptions {
    InjectOptions {
        case: Case::Lower,
        scheme,
        seed,
        morphemes: None,
    }
}

fn inject(model: &str, lex: &Lexicon, options: &InjectOptions) -> Injected {
    vocab::inject(&fixture(model), model, lex, "test-lexicon", options).unwrap()
}

/// A tensor as rows of f64.
fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect()
}

fn base_rows(model: &str, name: &str) -> Vec<Vec<f64>> {
    let w = wake2vec::hub::weights::load_dir(&fixture(model), &Device::Cpu).unwrap();
    rows(&w[name])
}

/// Rows `a..b` of an injected tensor.
fn new_rows(inj: &Injected, name: &str) -> Vec<Vec<f64>> {
    let start = inj.manifest.wake.start;
    rows(&inj.weights[name])[start..].to_vec()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Per-dimension mean and unbiased std, and the unbiased std of all entries.
fn stats(m: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>, f64) {
    let n = m.len() as f64;
    let d = m[0].len();
    let mean: Vec<f64> = (0..d)
        .map(|k| m.iter().map(|r| r[k]).sum::<f64>() / n)
        .collect();
    let std: Vec<f64> = (0..d)
        .map(|k| (m.iter().map(|r| (r[k] - mean[k]).powi(2)).sum::<f64>() / (n - 1.0)).sqrt())
        .collect();
    let all: Vec<f64> = m.iter().flatten().copied().collect();
    let mu = all.iter().sum::<f64>() / all.len() as f64;
    let s = (all.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (all.len() as f64 - 1.0)).sqrt();
    (mean, std, s)
}

/// Mean of the rows of `text`'s pieces under the base fixture tokenizer (through the full
/// tokenizer, not the library's piece function).
fn piece_mean(tokenizer: &Tokenizer, base: &[Vec<f64>], text: &str) -> Vec<f64> {
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert!(!ids.is_empty());
    let d = base[0].len();
    (0..d)
        .map(|k| ids.iter().map(|&i| base[i as usize][k]).sum::<f64>() / ids.len() as f64)
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}: dim {k}: {x} vs {y}");
    }
}

#[test]
fn mean_noise_has_the_base_mean_and_a_tenth_of_its_spread() {
    let lex = lexicon(3000);
    let inj = inject(
        "tiny-llama",
        &lex,
        &options(InitScheme::named("mean-noise").unwrap(), 42),
    );
    let base = base_rows("tiny-llama", "model.embed_tokens.weight");
    let (mu, sd, _) = stats(&base);
    let new = new_rows(&inj, "model.embed_tokens.weight");
    let n = new.len() as f64;
    assert!(n > 2500.0, "{n} new rows");
    let (new_mu, new_sd, _) = stats(&new);
    for k in 0..mu.len() {
        // 5 standard errors of the mean; the sample std of n normals is within 8% w.h.p.
        let se = 0.1 * sd[k] / n.sqrt();
        assert!(
            (new_mu[k] - mu[k]).abs() < 5.0 * se,
            "dim {k}: mean {} vs {}",
            new_mu[k],
            mu[k]
        );
        assert!(
            (new_sd[k] / (0.1 * sd[k]) - 1.0).abs() < 0.08,
            "dim {k}: std {} vs {}",
            new_sd[k],
            0.1 * sd[k]
        );
    }
    // Without noise every row is the base mean.
    let exact = inject(
        "tiny-llama",
        &lex,
        &options(InitScheme::MeanNoise { noise: 0.0 }, 42),
    );
    for row in new_rows(&exact, "model.embed_tokens.weight") {
        assert_close(&row, &mu, 1e-6, "mean row");
    }
}

#[test]
fn spherical_rows_lie_on_the_sphere_embedding_and_untied_head() {
    let lex = lexicon(500);
    let inj = inject(
        "tiny-llama",
        &lex,
        &options(InitScheme::named("spherical").unwrap(), 7),
    );
    assert!(inj.manifest.init.as_ref().unwrap().head.is_some());
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let base = base_rows("tiny-llama", name);
        let (_, _, s) = stats(&base);
        let radius = 1.5 * s * (base[0].len() as f64).sqrt();
        let new = new_rows(&inj, name);
        assert_eq!(new.len(), inj.manifest.wake.count);
        for row in &new {
            assert!(
                (norm(row) / radius - 1.0).abs() < 1e-5,
                "{name}: norm {} vs radius {radius}",
                norm(row)
            );
        }
        // Directions are spread out: the mean direction is short.
        let d = new[0].len();
        let mean: Vec<f64> = (0..d)
            .map(|k| new.iter().map(|r| r[k]).sum::<f64>() / new.len() as f64)
            .collect();
        assert!(
            norm(&mean) < 0.2 * radius,
            "{name}: mean direction {}",
            norm(&mean)
        );
    }
    // The base rows are untouched.
    let base = base_rows("tiny-llama", "model.embed_tokens.weight");
    let all = rows(&inj.weights["model.embed_tokens.weight"]);
    assert_eq!(all[..base.len()], base[..]);
}

#[test]
fn subword_mean_is_the_mean_of_the_base_pieces() {
    let lex = lexicon(300);
    let tokenizer = Tokenizer::from_file(fixture("tiny-llama/tokenizer.json")).unwrap();
    let exact = inject(
        "tiny-llama",
        &lex,
        &options(InitScheme::SubwordMean { noise: 0.0 }, 1),
    );
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let base = base_rows("tiny-llama", name);
        for (word, row) in exact.manifest.words.iter().zip(new_rows(&exact, name)) {
            assert_close(
                &row,
                &piece_mean(&tokenizer, &base, &format!(" {word}")),
                1e-6,
                word,
            );
        }
    }
    // With the default noise, the residual has std 0.01·s.
    let noisy = inject(
        "tiny-llama",
        &lex,
        &options(InitScheme::named("subword-mean").unwrap(), 1),
    );
    let base = base_rows("tiny-llama", "model.embed_tokens.weight");
    let (_, _, s) = stats(&base);
    let residual: Vec<f64> = new_rows(&noisy, "model.embed_tokens.weight")
        .iter()
        .zip(new_rows(&exact, "model.embed_tokens.weight"))
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>())
        .collect();
    let rms = (residual.iter().map(|x| x * x).sum::<f64>() / residual.len() as f64).sqrt();
    assert!(
        (rms / (0.01 * s) - 1.0).abs() < 0.03,
        "residual rms {rms} vs {}",
        0.01 * s
    );
}

/// Three hand-worked words with prefixes `unbabab` (no examples) and `un` (examples `under`,
/// `unto`), suffixes `ing` (no examples) and `run` (example `rerun`), α = 0.25, no noise.
#[test]
fn compositional_follows_the_formula_for_a_hand_worked_word() {
    let lex = Lexicon::parse("unbababing\nriverrun\nunriver\n");
    let morphemes: MorphemeData = serde_json::from_str(
        r#"{"prefixes": {"un": ["under", "unto"], "unbabab": []}, "suffixes": {"ing": [], "run": ["rerun"]}}"#,
    )
    .unwrap();
    let mut opts = options(
        InitScheme::Compositional {
            alpha: 0.25,
            noise: 0.0,
        },
        3,
    );
    opts.morphemes = Some((morphemes, "test".into()));
    let inj = inject("tiny-qwen2", &lex, &opts);
    assert_eq!(inj.manifest.words, ["unbababing", "riverrun", "unriver"]);
    let tokenizer = Tokenizer::from_file(fixture("tiny-qwen2/tokenizer.json")).unwrap();
    let base = base_rows("tiny-qwen2", "model.embed_tokens.weight");
    let e = |text: &str| piece_mean(&tokenizer, &base, text);
    let mix = |parts: &[(f64, Vec<f64>)]| -> Vec<f64> {
        (0..base[0].len())
            .map(|k| parts.iter().map(|(w, v)| w * v[k]).sum())
            .collect()
    };
    let avg = |a: Vec<f64>, b: Vec<f64>| {
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x + y) / 2.0)
            .collect::<Vec<f64>>()
    };
    let new = new_rows(&inj, "model.embed_tokens.weight");
    // unbababing: the longest prefix `unbabab` wins; `ing` would then leave no root, so it is
    // not taken: unbabab|ing|, E = 0.25·E(" unbabab") + 0.75·E("ing") (affix without examples:
    // the affix's own pieces; root after a prefix: no word-start marker).
    let unbababing = mix(&[(0.25, e(" unbabab")), (0.75, e("ing"))]);
    assert_close(&new[0], &unbababing, 1e-6, "unbababing");
    // riverrun: no prefix; suffix `run` with example `rerun`: 0.75·E(" river") + 0.25·E(" rerun").
    let riverrun = mix(&[(0.75, e(" river")), (0.25, e(" rerun"))]);
    assert_close(&new[1], &riverrun, 1e-6, "riverrun");
    // unriver: prefix `un` (examples under, unto), no suffix: 0.25·E_p + 0.75·E("river").
    let unriver = mix(&[(0.25, avg(e(" under"), e(" unto"))), (0.75, e("river"))]);
    assert_close(&new[2], &unriver, 1e-6, "unriver");
    let c = inj.composition.unwrap();
    assert_eq!(
        (
            c.prefix_and_suffix,
            c.prefix_only,
            c.suffix_only,
            c.root_only
        ),
        (0, 2, 1, 0)
    );
}

#[test]
fn the_seed_fixes_the_rows() {
    let lex = lexicon(200);
    let scheme = InitScheme::named("spherical").unwrap();
    let a = inject("tiny-qwen2", &lex, &options(scheme, 5));
    let b = inject("tiny-qwen2", &lex, &options(scheme, 5));
    let c = inject("tiny-qwen2", &lex, &options(scheme, 6));
    let name = "model.embed_tokens.weight";
    assert_eq!(new_rows(&a, name), new_rows(&b, name));
    assert_ne!(new_rows(&a, name), new_rows(&c, name));
}

/// tiny-qwen2's matrix has 408 rows for a 400-token tokenizer: new ids start at 408, the
/// padded rows stay as they were, and no text ever gets a padded id.
#[test]
fn padded_matrix_new_ids_start_after_the_padding() {
    let lex = lexicon(400);
    let inj = inject(
        "tiny-qwen2",
        &lex,
        &options(InitScheme::named("mean-noise").unwrap(), 42),
    );
    let m = &inj.manifest;
    assert_eq!(
        (m.base_vocab, m.base_tokenizer_size.unwrap(), m.wake.start),
        (408, 400, 408)
    );
    assert_eq!(inj.config["vocab_size"], 408 + m.wake.count);
    let embed = rows(&inj.weights["model.embed_tokens.weight"]);
    assert_eq!(embed.len(), 408 + m.wake.count);
    let base = base_rows("tiny-qwen2", "model.embed_tokens.weight");
    assert_eq!(embed[400..408], base[400..408]);
    assert!(
        !inj.weights.contains_key("lm_head.weight"),
        "tied head stays tied"
    );

    let out = temp_dir("padded");
    vocab::write(&inj, &fixture("tiny-qwen2"), &out).unwrap();
    let tokenizer = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    for id in 400..408 {
        assert_eq!(
            tokenizer.id_to_token(id),
            None,
            "padded id {id} has a token"
        );
    }
    let ids = tokenizer
        .encode(wake().as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(ids.iter().all(|&i| !(400..408).contains(&i)));
    assert!(ids.iter().any(|&i| i >= 408), "no Wake id in the Wake");
    assert_eq!(Manifest::load(&out).unwrap(), inj.manifest);
    std::fs::remove_dir_all(&out).unwrap();
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wake2vec-inject-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The written directory loads back, tokenizes Wake words to their new ids, and scores text
/// with logits over the extended vocabulary.
#[test]
fn written_directory_loads_and_scores() {
    let lex = lexicon(300);
    let inj = inject(
        "tiny-llama",
        &lex,
        &options(InitScheme::named("subword-mean").unwrap(), 42),
    );
    let out = temp_dir("roundtrip");
    vocab::write(&inj, &fixture("tiny-llama"), &out).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "wake2vec.json"
        ]
    );
    let loaded = LoadedModel::load(&out).unwrap();
    let v = inj.manifest.wake.start + inj.manifest.wake.count;
    assert_eq!(loaded.model.config.vocab_size, v);
    assert_eq!(loaded.model.head().dims2().unwrap().0, v);
    // The in-memory and the reloaded weights agree.
    let saved: BTreeMap<String, Tensor> = wake2vec::hub::weights::load_dir(&out, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(saved.len(), inj.weights.len());
    for (name, t) in &inj.weights {
        assert_eq!(saved[name].dims(), t.dims(), "{name}");
        assert_eq!(flat(&saved[name]), flat(t), "{name}");
    }
    let word = &inj.manifest.words[0];
    let text = format!("the {word} of the river");
    let ids = loaded
        .tokenizer
        .encode(text.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(ids.contains(&(inj.manifest.wake.start as u32)), "{ids:?}");
    let s =
        wake2vec::infer::score::score_text(&loaded.model, &loaded.tokenizer, &text, 64).unwrap();
    assert!(s.mean_loss.is_finite() && s.mean_loss > 0.0);
    // And the tokenizer reloaded from disk gives the in-memory extension's ids on the Wake.
    let wake = wake();
    assert_eq!(
        loaded
            .tokenizer
            .encode(wake.as_str(), false)
            .unwrap()
            .get_ids(),
        inj.extension
            .tokenizer
            .encode(wake.as_str(), false)
            .unwrap()
            .get_ids()
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// The TinyLlama path end to end: a tiny random Llama with Llama 2's SentencePiece vocabulary
/// (32,000 tokens from the vocabulary-only GGUF) and an untied head gets the lexicon; the
/// written directory loads, matches Wake words as `▁word` ids, and scores text.
#[test]
fn sentencepiece_model_end_to_end() {
    let base_dir = temp_dir("spm-base");
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/tokenizers/ggml-vocab-llama-spm.gguf");
    wake2vec::hub::gguf::import(&gguf, &base_dir).unwrap();
    // tiny-llama's blocks with 32,000-row embedding and head drawn from a seeded generator.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap())
            .unwrap();
    config["vocab_size"] = 32_000.into();
    config["bos_token_id"] = 1.into();
    config["eos_token_id"] = 2.into();
    std::fs::write(base_dir.join("config.json"), config.to_string()).unwrap();
    let mut weights: BTreeMap<String, Tensor> =
        wake2vec::hub::weights::load_dir(&fixture("tiny-llama"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    let mut rng = wake2vec::util::rng::Rng::new(11);
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let mut z = vec![0.0f64; 32_000 * 64];
        rng.fill_normal(&mut z);
        let v: Vec<f32> = z.iter().map(|x| (0.15 * x) as f32).collect();
        weights.insert(
            name.into(),
            Tensor::from_vec(v, (32_000, 64), &Device::Cpu).unwrap(),
        );
    }
    wake2vec::hub::weights::save_file(&weights, &base_dir.join("model.safetensors")).unwrap();

    let lex = lexicon(2000);
    let inj = vocab::inject(
        &base_dir,
        "tiny-spm",
        &lex,
        "test",
        &options(InitScheme::named("compositional").unwrap(), 42),
    )
    .unwrap();
    assert_eq!(
        inj.manifest.tokenizer.as_ref().unwrap().family,
        vocab::Family::SentencePiece
    );
    assert_eq!(inj.manifest.wake.start, 32_000);
    assert!(inj.manifest.unreachable.is_empty());
    assert!(
        inj.manifest.init.as_ref().unwrap().head.is_some(),
        "untied head rows"
    );
    let out = temp_dir("spm-out");
    vocab::write(&inj, &base_dir, &out).unwrap();
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    let loaded = LoadedModel::load(&out).unwrap();
    assert_eq!(
        loaded.model.head().dims2().unwrap().0,
        32_000 + inj.manifest.wake.count
    );
    let word = &inj.manifest.words[0];
    let text = format!("{word}, {word} and {word}");
    let enc = loaded.tokenizer.encode(text.as_str(), false).unwrap();
    let wake_id = inj.manifest.wake.start as u32;
    // The first word (after the prepended ▁) and the two after spaces are all the new id.
    assert_eq!(
        enc.get_ids().iter().filter(|&&i| i == wake_id).count(),
        3,
        "{:?}",
        enc.get_tokens()
    );
    assert_eq!(enc.get_tokens()[0], format!("▁{word}"));
    assert_eq!(loaded.tokenizer.decode(enc.get_ids(), false).unwrap(), text);
    let s =
        wake2vec::infer::score::score_text(&loaded.model, &loaded.tokenizer, &text, 64).unwrap();
    assert!(s.mean_loss.is_finite());
    std::fs::remove_dir_all(&base_dir).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
}
