//! The verbs that use a model: score, generate (and its battery), import-gguf, eval.

use crate::args::{ComputeArgs, EvalArgs, GenerateArgs, ImportGgufArgs, ModelArg, ScoreArgs};
use anyhow::{Context, Result};
use std::io::Write;
use wake2vec::corpus;
use wake2vec::hub::{cache, gguf};
use wake2vec::infer::generate::{self, Limits};
use wake2vec::infer::sampling::{Sampler, SamplingParams};
use wake2vec::infer::text_metrics::KnownWords;
use wake2vec::infer::{battery, control, score};
use wake2vec::model::LoadedModel;

/// The model `--model` names, resolved and loaded onto `--device`.
pub fn load_model(arg: &ModelArg, compute: &ComputeArgs) -> Result<LoadedModel> {
    let compute = compute.open()?;
    let dir = cache::resolve(&arg.model, true)?;
    LoadedModel::load_with(&dir, &compute)
}

/// `wake2vec score`: the table (or JSON) of a text's surprisal.
pub fn score(args: ScoreArgs) -> Result<()> {
    let text = match (&args.text, &args.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => corpus::read_text(f)?,
        (None, None) => unreachable!("clap requires --text or --file"),
    };
    let m = load_model(&args.model, &args.compute)?;
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

/// `wake2vec generate`: streamed samples, or the battery with --battery.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
    };
    if args.battery {
        return run_battery(&args, params);
    }
    let m = load_model(&args.model, &args.compute)?;
    // Checked before the prompt is echoed, so a prompt that cannot run prints nothing.
    let prompt_tokens = generate::encode_prompt(&m.tokenizer, &args.prompt)?.len();
    generate::check_context(prompt_tokens, args.max_new_tokens, m.model.max_positions())?;
    let weights = generate::Decoder::new(&m.model)?;
    let limits = Limits {
        max_new_tokens: args.max_new_tokens,
        stop_at_eos: true,
    };
    if args.num_samples > 1 {
        return generate_together(&args, &weights, &m, params, limits);
    }
    let mut sampler = Sampler::new(params, args.seed)?;
    if !args.json {
        wake2vec::out!("{}", args.prompt);
    }
    let mut stream = |t: &str| {
        if !args.json {
            wake2vec::out!("{t}");
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
        wake2vec::outln!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    wake2vec::outln!();
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
    Ok(())
}

/// `--num-samples N > 1`: the samples decoded together, sample `i` seeded `seed + i` (the text
/// `--num-samples 1 --seed seed+i` gives), printed once all are finished.
fn generate_together(
    args: &GenerateArgs,
    weights: &generate::Decoder,
    m: &LoadedModel,
    params: SamplingParams,
    limits: Limits,
) -> Result<()> {
    let mut samplers = (0..args.num_samples)
        .map(|i| Sampler::new(params, args.seed + i))
        .collect::<Result<Vec<_>>>()?;
    let start = std::time::Instant::now();
    let samples = generate::generate_batch(
        weights,
        &m.model,
        &m.tokenizer,
        &args.prompt,
        limits,
        &mut samplers,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    for (i, s) in samples.iter().enumerate() {
        if args.json {
            wake2vec::outln!("{}", serde_json::to_string(s)?);
            continue;
        }
        wake2vec::outln!(
            "--- sample {} of {} (seed {}) ---",
            i + 1,
            args.num_samples,
            args.seed + i as u64
        );
        wake2vec::outln!("{}{}", args.prompt, s.text);
    }
    let tokens: usize = samples.iter().map(|s| s.ids.len()).sum();
    eprintln!(
        "[{} samples, {tokens} new tokens in {seconds:.1} s, {:.1} tokens/s together]",
        samples.len(),
        tokens as f64 / seconds
    );
    Ok(())
}

fn run_battery(args: &GenerateArgs, params: SamplingParams) -> Result<()> {
    let compute = args.compute.open()?;
    let dir = cache::resolve(&args.model.model, true)?;
    let m = LoadedModel::load_with(&dir, &compute)?;
    // The Wake rows, from wake2vec.json (none for a base model).
    let wake = wake2vec::vocab::Manifest::load_if_present(&dir)?.map(|m| m.wake.range());
    let base_vocab = wake.as_ref().map_or(usize::MAX, |w| w.start);
    let known = KnownWords::load(
        &m.tokenizer,
        base_vocab,
        args.corpus.as_deref(),
        args.dictionary.as_deref(),
    )?;
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
    let settings = battery::Settings {
        prompt: args.prompt.clone(),
        params,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
    };
    let samples = battery::run(&m, &settings, &known, wake, &mut |s| {
        eprintln!(
            "[{}] {} tokens, coinage {:.3}, fused {:.3}, distinct-2 {:.3}",
            s.label, s.tokens, s.metrics.coinage_rate, s.metrics.fused_rate, s.metrics.distinct_2
        )
    })?;
    battery::write(&args.out, &samples, &name)?;
    wake2vec::outln!(
        "wrote {} and {}",
        args.out.join("samples.md").display(),
        args.out.join("samples.jsonl").display()
    );
    Ok(())
}

/// `wake2vec import-gguf`.
pub fn import_gguf(args: ImportGgufArgs) -> Result<()> {
    let ImportGgufArgs { file, out } = args;
    let summary = gguf::import(&file, &out)?;
    match summary.config {
        Some(c) => wake2vec::outln!(
            "imported {} tensors ({} layers, hidden {}, vocab {}) into {}",
            summary.tensors,
            c.num_layers,
            c.hidden_size,
            summary.vocab_size,
            out.display()
        ),
        None => wake2vec::outln!(
            "imported a tokenizer ({} tokens) into {}",
            summary.vocab_size,
            out.display()
        ),
    }
    Ok(())
}

/// `wake2vec eval`: the validation loss of a model on a corpus, and forgetting on a control text.
pub fn eval(args: EvalArgs) -> Result<()> {
    let texts = (
        args.corpus
            .as_ref()
            .map(|c| corpus::read_text(c))
            .transpose()?,
        args.control
            .as_ref()
            .map(|c| corpus::read_text(c))
            .transpose()?,
    );
    let base = args
        .base
        .as_ref()
        .map(|b| load_model(&ModelArg { model: b.clone() }, &args.compute))
        .transpose()?;
    let m = load_model(&args.model, &args.compute)?;
    if let (Some(path), Some(text)) = (&args.corpus, &texts.0) {
        let mut progress = |done: usize, total: usize| {
            if done.is_multiple_of(10) || done == total {
                eprint!("\r{done}/{total} validation blocks");
            }
        };
        let r = wake2vec::infer::eval::validation_loss(
            &m.model,
            &m.tokenizer,
            text,
            args.block,
            args.val_fraction,
            args.seed,
            &mut progress,
        )?;
        eprintln!();
        wake2vec::outln!(
            "{}: {} tokens, {} blocks of {}, {} validation (seed {}): mean loss {:.4} nats/token, {:.4} bits/byte",
            path.display(),
            r.tokens,
            r.blocks,
            r.block_len,
            r.validation_blocks,
            r.seed,
            r.mean_loss,
            r.bits_per_byte
        );
    }
    if let (Some(path), Some(text)) = (&args.control, &texts.1) {
        let c = control::ControlText::new(text, args.control_segments as usize)
            .with_context(|| format!("control text {}", path.display()))?;
        let r = control::bits_per_byte(&m.model, &m.tokenizer, &c)?;
        wake2vec::outln!(
            "control {}: {} segments, {} tokens over {} bytes: {:.4} bits/byte ({:.4} nats/token)",
            path.display(),
            r.segments,
            r.tokens,
            r.bytes,
            r.bits_per_byte,
            r.mean_loss
        );
        if let Some(b) = &base {
            let base_vocab = b.model.head().dim(0)?;
            let kl = control::kl_from_base(&b.model, &b.tokenizer, &m.model, base_vocab, &c)?;
            wake2vec::outln!(
                "KL from the base on {} positions: {:.6} nats over the base vocabulary; mass moved onto new rows {:.6} (largest {:.4})",
                kl.positions,
                kl.kl_base_vocab,
                kl.moved_mass,
                kl.moved_mass_max
            );
        }
    }
    Ok(())
}
