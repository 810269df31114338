//! [`inject`]: the lexicon into a model in memory (tokenizer entries, new rows, manifest), and
//! [`write`]: the injected model as an HF model directory plus `wake2vec.json`.

use super::init::{self, BaseStats, CompositionCounts, InitScheme, Matrix, Pieces};
use super::manifest::{InitRecord, LexiconRecord, Manifest, TokenizerRecord, WakeRange, MANIFEST};
use super::tokenizer::{extend, BaseTokenizer, Extension};
use crate::hub::ModelConfig;
use crate::lexicon::{Case, Lexicon, MorphemeData};
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

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
    pub stats: BaseStats,
    pub composition: Option<CompositionCounts>,
}

/// The embedding's tensor name.
const EMBED: &str = "model.embed_tokens.weight";
/// The (untied) head's tensor name.
const HEAD: &str = "lm_head.weight";

/// What `inject` was asked for, shared by its steps.
struct Request<'a> {
    base_model: &'a str,
    lexicon: &'a Lexicon,
    lexicon_path: &'a str,
    options: &'a InjectOptions,
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
    let req = Request {
        base_model,
        lexicon,
        lexicon_path,
        options,
    };
    options.scheme.validate()?;
    let (mut config, model_config) = read_config(dir)?;
    let base = BaseTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let forms = lexicon.forms(options.case);
    let mut weights = read_weights(dir, &model_config, &base)?;
    let first_id = weights.rows.max(model_config.vocab_size);
    let extension = extend_tokenizer(&req, &base, &forms, first_id)?;
    let (morphemes, morpheme_source) = morphemes_for(&req, &base);

    let stat_rows = base.known_ids();
    let rows = NewRows {
        stat_rows: &stat_rows,
        words: &extension.words,
        pieces: &|text: &str, word_start: bool| base.pieces(text, word_start),
        morphemes: morphemes.as_deref(),
        scheme: options.scheme,
    };
    let mut rng = Rng::new(options.seed);
    let (stats, composition) = rows.extend_embedding(&mut weights, &mut rng)?;
    let head = rows.extend_head(&mut weights, &mut rng)?;
    config["vocab_size"] = Value::from(first_id + extension.words.len());

    let init = InitRecord {
        scheme: options.scheme,
        seed: options.seed,
        head,
        morphemes: morpheme_source,
    };
    let manifest = manifest(
        &req,
        &extension,
        weights.rows,
        stat_rows.len(),
        first_id,
        init,
    );
    Ok(Injected {
        base,
        extension,
        config,
        weights: weights.tensors,
        manifest,
        stats,
        composition,
    })
}

/// The base `config.json`: as JSON (to be written back with the new `vocab_size`) and parsed.
fn read_config(dir: &Path) -> Result<(Value, ModelConfig)> {
    let config_path = dir.join("config.json");
    let config_text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config: Value = serde_json::from_str(&config_text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let model_config = ModelConfig::from_json(&config_text)
        .with_context(|| format!("in {}", config_path.display()))?;
    Ok((config, model_config))
}

/// The base weights, f32, and the shape of their embedding.
struct Weights {
    /// Every tensor, without `lm_head.weight` when the head is tied.
    tensors: BTreeMap<String, Tensor>,
    tied: bool,
    /// Rows and width of the base embedding.
    rows: usize,
    dim: usize,
}

/// Loads the weights of `dir` and checks the embedding against config.json and the tokenizer.
fn read_weights(dir: &Path, config: &ModelConfig, base: &BaseTokenizer) -> Result<Weights> {
    let mut tensors: BTreeMap<String, Tensor> = crate::hub::weights::load_dir(dir, &Device::Cpu)?
        .into_iter()
        .collect();
    let embed = tensors
        .get(EMBED)
        .with_context(|| format!("{} has no tensor {EMBED}", dir.display()))?;
    let (rows, dim) = embed.dims2()?;
    let tied = config.tie_word_embeddings;
    if tied {
        tensors.remove(HEAD);
    }
    if rows < config.vocab_size {
        bail!(
            "{EMBED} has {rows} rows but config.json says vocab_size {}: the model is inconsistent",
            config.vocab_size
        );
    }
    if base.id_end() as usize > rows {
        bail!(
            "the tokenizer of {} uses ids up to {} but the embedding matrix has only {rows} rows",
            dir.display(),
            base.id_end() - 1
        );
    }
    Ok(Weights {
        tensors,
        tied,
        rows,
        dim,
    })
}

/// The tokenizer extended with the lexicon's `forms` from `first_id` on; an error when no
/// word is left to inject.
fn extend_tokenizer(
    req: &Request,
    base: &BaseTokenizer,
    forms: &[String],
    first_id: usize,
) -> Result<Extension> {
    let extension = extend(base, forms, first_id as u32)?;
    if extension.words.is_empty() {
        bail!(
            "nothing to inject: of the {} words of {} (case {}), {} are already one token \
             of the base vocabulary and {} can never be one token under its pre-tokenizer",
            forms.len(),
            req.lexicon_path,
            req.options.case,
            extension.existing.len(),
            extension.unreachable.len()
        );
    }
    Ok(extension)
}

/// The morpheme data the scheme needs (the options' or mined from the lexicon) and where it
/// came from; `None` for a scheme that needs none.
fn morphemes_for<'a>(
    req: &Request<'a>,
    base: &BaseTokenizer,
) -> (Option<Cow<'a, MorphemeData>>, Option<String>) {
    match (&req.options.morphemes, req.options.scheme.needs_morphemes()) {
        (_, false) => (None, None),
        (Some((data, source)), true) => (Some(Cow::Borrowed(data)), Some(source.clone())),
        (None, true) => (
            Some(Cow::Owned(mine_morphemes(req.lexicon, Some(base)))),
            Some(format!("mined from {}", req.lexicon_path)),
        ),
    }
}

/// How the new rows of the embedding and of the head are made: the scheme over the words.
struct NewRows<'a> {
    stat_rows: &'a [u32],
    words: &'a [String],
    pieces: Pieces<'a>,
    morphemes: Option<&'a MorphemeData>,
    scheme: InitScheme,
}

impl NewRows<'_> {
    /// The new rows initialized from `data` (`[rows, dim]`) and the decomposition counts.
    fn init(
        &self,
        data: &[f32],
        dim: usize,
        rng: &mut Rng,
    ) -> Result<(Vec<f32>, Option<CompositionCounts>)> {
        init::init_rows(
            Matrix { data, dim },
            self.stat_rows,
            self.words,
            self.pieces,
            self.morphemes,
            self.scheme,
            rng,
        )
    }

    /// `base` with the new `rows` appended.
    fn append(&self, base: &Tensor, rows: Vec<f32>, dim: usize) -> Result<Tensor> {
        let new = Tensor::from_vec(rows, (self.words.len(), dim), &Device::Cpu)?;
        Ok(Tensor::cat(&[base, &new], 0)?)
    }

    /// Appends the new rows to the embedding; returns the base rows' statistics and the
    /// decomposition counts.
    fn extend_embedding(
        &self,
        weights: &mut Weights,
        rng: &mut Rng,
    ) -> Result<(BaseStats, Option<CompositionCounts>)> {
        let embed = weights.tensors[EMBED].clone();
        let data = embed.flatten_all()?.to_vec1::<f32>()?;
        let stats = init::base_stats(
            Matrix {
                data: &data,
                dim: weights.dim,
            },
            self.stat_rows,
        )?;
        let (new_rows, composition) = self.init(&data, weights.dim, rng)?;
        let extended = self.append(&embed, new_rows, weights.dim)?;
        weights.tensors.insert(EMBED.to_string(), extended);
        Ok((stats, composition))
    }

    /// Appends new rows to an untied head, drawn after the embedding's from the same `rng`;
    /// returns how, for the manifest (`None` for a tied head).
    fn extend_head(&self, weights: &mut Weights, rng: &mut Rng) -> Result<Option<String>> {
        if weights.tied {
            return Ok(None);
        }
        let head = weights
            .tensors
            .get(HEAD)
            .context("config.json says tie_word_embeddings = false but there is no lm_head.weight")?
            .clone();
        let data = head.flatten_all()?.to_vec1::<f32>()?;
        let (new_rows, _) = self.init(&data, weights.dim, rng)?;
        let extended = self.append(&head, new_rows, weights.dim)?;
        weights.tensors.insert(HEAD.to_string(), extended);
        Ok(Some(format!(
            "{} on the head's own rows (its own statistics and piece rows), drawn after the embedding rows",
            self.scheme.name()
        )))
    }
}

/// The manifest of the injected model: the base, the Wake range, the words and how they were
/// made.
fn manifest(
    req: &Request,
    extension: &Extension,
    base_vocab: usize,
    base_tokenizer_size: usize,
    first_id: usize,
    init: InitRecord,
) -> Manifest {
    Manifest {
        format: 1,
        base_model: Some(req.base_model.to_string()),
        base_vocab,
        base_tokenizer_size: Some(base_tokenizer_size),
        wake: WakeRange {
            start: first_id,
            count: extension.words.len(),
        },
        words: extension.words.clone(),
        existing: extension.existing.clone(),
        unreachable: extension.unreachable.clone(),
        init: Some(init),
        case: Some(req.options.case),
        tokenizer: Some(TokenizerRecord {
            family: extension.family,
            split: extension.split.map(String::from),
            ignore_merges: true,
        }),
        lexicon: Some(LexiconRecord {
            path: req.lexicon_path.to_string(),
            entries: req.lexicon.words.len(),
            skipped: req.lexicon.skipped.clone(),
        }),
    }
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

/// Writes the injected model to `out` (created; must not exist or be empty): config.json,
/// model.safetensors, tokenizer.json, tokenizer_config.json (see [`tokenizer_config`]),
/// wake2vec.json and the base's generation_config.json and special_tokens_map.json. Everything is written into a temporary
/// directory beside `out` and renamed, so a failure leaves nothing behind.
pub fn write(injected: &Injected, base_dir: &Path, out: &Path) -> Result<()> {
    let tokenizer_config = tokenizer_config(base_dir)?;
    crate::util::fs::create_dir_atomically(out, |tmp| {
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
    })
}
