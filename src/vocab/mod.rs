//! Vocabulary injection: the lexicon's words become whole-word entries of the model's BPE
//! vocabulary ([`tokenizer`]), with new embedding rows (and head rows, when untied) initialized
//! by a seeded scheme ([`init`]), written as a standard HF model directory plus `wake2vec.json`
//! (docs/formats.md).

pub mod check;
pub mod init;
pub mod manifest;
pub mod tokenizer;

pub use check::{check_corpus, CorpusReport, Coverage};
pub use init::{InitScheme, Matrix};
pub use manifest::{InitRecord, LexiconRecord, Manifest, TokenizerRecord, WakeRange, MANIFEST};
pub use tokenizer::{extend, BaseTokenizer, Extension, Family};

use crate::lexicon::{Case, Lexicon, MorphemeData};
use crate::util::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything `inject` needs besides the model and the lexicon.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    pub case: Case,
    pub scheme: InitScheme,
    pub seed: u64,
    /// Morpheme data for the compositional scheme and where it came from; when `None`, it is
    /// mined from the lexicon with the default options.
    pub morphemes: Option<(MorphemeData, String)>,
}

/// An injected model in memory, ready to be written.
pub struct Injected {
    pub base: BaseTokenizer,
    pub extension: Extension,
    /// The base `config.json` with the new `vocab_size`.
    pub config: Value,
    /// All weights, f32, with the extended embedding (and head).
    pub weights: BTreeMap<String, Tensor>,
    pub manifest: Manifest,
    pub stats: init::BaseStats,
    pub composition: Option<init::CompositionCounts>,
}

/// Extends the model in `dir` with the lexicon: tokenizer entries, new rows, manifest.
/// `base_model` is what the manifest records as the base (the `--model` argument).
pub fn inject(
    dir: &Path,
    base_model: &str,
    lexicon: &Lexicon,
    lexicon_path: &str,
    options: &InjectOptions,
) -> Result<Injected> {
    options.scheme.validate()?;
    let config_path = dir.join("config.json");
    let config_text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let mut config: Value = serde_json::from_str(&config_text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let model_config = crate::hub::ModelConfig::from_json(&config_text)
        .with_context(|| format!("in {}", config_path.display()))?;
    let base = BaseTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let forms = lexicon.forms(options.case);

    let mut weights: BTreeMap<String, Tensor> = crate::hub::weights::load_dir(dir, &Device::Cpu)?
        .into_iter()
        .collect();
    let embed_name = "model.embed_tokens.weight";
    let embed = weights
        .get(embed_name)
        .with_context(|| format!("{} has no tensor {embed_name}", dir.display()))?
        .clone();
    let (rows, dim) = embed.dims2()?;
    let tied = model_config.tie_word_embeddings;
    if tied {
        weights.remove("lm_head.weight");
    }
    let first_id = rows.max(model_config.vocab_size);
    if rows < model_config.vocab_size {
        bail!(
            "{embed_name} has {rows} rows but config.json says vocab_size {}: the model is inconsistent",
            model_config.vocab_size
        );
    }
    if base.id_end() as usize > rows {
        bail!(
            "the tokenizer of {} uses ids up to {} but the embedding matrix has only {rows} rows",
            dir.display(),
            base.id_end() - 1
        );
    }

    let extension = extend(&base, &forms, first_id as u32)?;
    if extension.words.is_empty() {
        bail!(
            "nothing to inject: of the {} words of {lexicon_path} (case {}), {} are already one token \
             of the base vocabulary and {} can never be one token under its pre-tokenizer",
            forms.len(),
            options.case,
            extension.existing.len(),
            extension.unreachable.len()
        );
    }

    let mined;
    let (morphemes, morpheme_source) = match (&options.morphemes, options.scheme.needs_morphemes())
    {
        (_, false) => (None, None),
        (Some((data, source)), true) => (Some(data), Some(source.clone())),
        (None, true) => {
            mined = mine_morphemes(lexicon, Some(&base));
            (Some(&mined), Some(format!("mined from {lexicon_path}")))
        }
    };

    let stat_rows = base.known_ids();
    let pieces = |text: &str, word_start: bool| base.pieces(text, word_start);
    let mut rng = Rng::new(options.seed);
    let embed_data = embed.flatten_all()?.to_vec1::<f32>()?;
    let matrix = Matrix {
        data: &embed_data,
        dim,
    };
    let stats = init::base_stats(matrix, &stat_rows)?;
    let (new_rows, composition) = init::init_rows(
        matrix,
        &stat_rows,
        &extension.words,
        &pieces,
        morphemes,
        options.scheme,
        &mut rng,
    )?;
    let n = extension.words.len();
    let append = |base: &Tensor, rows: Vec<f32>| -> Result<Tensor> {
        let new = Tensor::from_vec(rows, (n, dim), &Device::Cpu)?;
        Ok(Tensor::cat(&[base, &new], 0)?)
    };
    weights.insert(embed_name.to_string(), append(&embed, new_rows)?);
    let head = if tied {
        None
    } else {
        let head = weights
            .get("lm_head.weight")
            .context("config.json says tie_word_embeddings = false but there is no lm_head.weight")?
            .clone();
        let head_data = head.flatten_all()?.to_vec1::<f32>()?;
        let (head_rows, _) = init::init_rows(
            Matrix {
                data: &head_data,
                dim,
            },
            &stat_rows,
            &extension.words,
            &pieces,
            morphemes,
            options.scheme,
            &mut rng,
        )?;
        weights.insert("lm_head.weight".to_string(), append(&head, head_rows)?);
        Some(format!(
            "{} on the head's own rows (its own statistics and piece rows), drawn after the embedding rows",
            options.scheme.name()
        ))
    };
    config["vocab_size"] = Value::from(first_id + n);

    let manifest = Manifest {
        format: 1,
        base_model: Some(base_model.to_string()),
        base_vocab: rows,
        base_tokenizer_size: Some(stat_rows.len()),
        wake: WakeRange {
            start: first_id,
            count: n,
        },
        words: extension.words.clone(),
        existing: extension.existing.clone(),
        unreachable: extension.unreachable.clone(),
        init: Some(InitRecord {
            scheme: options.scheme,
            seed: options.seed,
            head,
            morphemes: morpheme_source,
        }),
        case: Some(options.case),
        tokenizer: Some(TokenizerRecord {
            family: extension.family,
            split: extension.split.map(String::from),
            ignore_merges: true,
        }),
        lexicon: Some(LexiconRecord {
            path: lexicon_path.to_string(),
            entries: lexicon.words.len(),
            skipped: lexicon.skipped.clone(),
        }),
    };
    Ok(Injected {
        base,
        extension,
        config,
        weights,
        manifest,
        stats,
        composition,
    })
}

/// Morpheme data mined from `lexicon` with the default options; stems count as known when
/// they are lexicon words or (with `base`) whole-word tokens of the base vocabulary.
pub fn mine_morphemes(lexicon: &Lexicon, base: Option<&BaseTokenizer>) -> MorphemeData {
    let lower: Vec<String> = lexicon.words.iter().map(|w| w.to_lowercase()).collect();
    let mut known: std::collections::HashSet<String> = lower.iter().cloned().collect();
    if let Some(base) = base {
        known.extend(base.whole_words());
    }
    crate::lexicon::morphemes::mine_affixes(
        &lower,
        &|stem| known.contains(stem),
        Default::default(),
    )
}

/// Files copied unchanged from the base directory when present.
const COPIED: [&str; 2] = ["generation_config.json", "special_tokens_map.json"];

/// The base `tokenizer_config.json` (or an empty one) with `tokenizer_class` set to
/// `PreTrainedTokenizerFast`. transformers 5 rebuilds a model-specific tokenizer class
/// (`LlamaTokenizer`, `Qwen2Tokenizer`, …) from the vocabulary and merges alone, with that
/// class's own pre-tokenizer and without `ignore_merges`, which would drop the whole-word
/// matching; the generic class loads tokenizer.json as written. (transformers 5 still forces
/// its own class for a few model types, Qwen2 and Phi-3 among them: load those with
/// `PreTrainedTokenizerFast(tokenizer_file=...)`.)
fn tokenizer_config(base_dir: &Path) -> Result<Value> {
    let path = base_dir.join("tokenizer_config.json");
    let mut config = if path.is_file() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?
    } else {
        Value::Object(Default::default())
    };
    let map = config
        .as_object_mut()
        .with_context(|| format!("{} is not a JSON object", path.display()))?;
    map.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    Ok(config)
}

/// Refuses an `out` that exists and is not an empty directory.
pub fn check_out_dir(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            bail!(
                "{} already exists and is not an empty directory: remove it or choose another --out",
                out.display()
            );
        }
    }
    Ok(())
}

/// Writes the injected model to `out` (created; must not exist or be empty): config.json,
/// model.safetensors, tokenizer.json, tokenizer_config.json (see [`tokenizer_config`]),
/// wake2vec.json and the base's generation_config.json and special_tokens_map.json. Everything is written into a temporary
/// directory beside `out` and renamed, so a failure leaves nothing behind.
pub fn write(injected: &Injected, base_dir: &Path, out: &Path) -> Result<()> {
    check_out_dir(out)?;
    let tokenizer_config = tokenizer_config(base_dir)?;
    let tmp: PathBuf = crate::util::fs::tmp_path(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        let json = |v: &Value| -> Result<Vec<u8>> { Ok(serde_json::to_vec_pretty(v)?) };
        crate::util::fs::write(&tmp.join("config.json"), &json(&injected.config)?)?;
        crate::util::fs::write(
            &tmp.join("tokenizer.json"),
            injected.extension.to_json()?.as_bytes(),
        )?;
        crate::util::fs::write(
            &tmp.join(MANIFEST),
            &serde_json::to_vec_pretty(&injected.manifest)?,
        )?;
        crate::util::fs::write(
            &tmp.join("tokenizer_config.json"),
            &json(&tokenizer_config)?,
        )?;
        for name in COPIED {
            let from = base_dir.join(name);
            if from.is_file() {
                let bytes = std::fs::read(&from)
                    .with_context(|| format!("cannot read {}", from.display()))?;
                crate::util::fs::write(&tmp.join(name), &bytes)?;
            }
        }
        crate::hub::weights::save_file(&injected.weights, &tmp.join("model.safetensors"))
    })();
    match result {
        Ok(()) => {
            if out.exists() {
                std::fs::remove_dir(out).ok();
            }
            std::fs::rename(&tmp, out)
                .map_err(|e| anyhow!("cannot move the injected model into {}: {e}", out.display()))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}
