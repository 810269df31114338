//! The verbs of training: train, run (the whole pipeline), export, status.

use crate::args::{ExportArgs, InitStudyArgs, RunArgs, StatusArgs, TrainArgs};
use anyhow::Result;
use std::path::PathBuf;
use wake2vec::hub::cache;
use wake2vec::pipeline::{self, Finished, PipelineConfig};
use wake2vec::study::{self, StudyConfig, StudyEnd};
use wake2vec::train::{self, Outcome, TrainConfig, Trainer};

/// `wake2vec train`: a new run, or a run continued with --resume.
pub fn train(args: TrainArgs) -> Result<()> {
    train::tune_runtime();
    train::install_interrupt_handler();
    let mut trainer = match &args.resume {
        Some(dir) => {
            let t = Trainer::resume_on(dir, args.checkpoint.as_deref(), args.device)?;
            eprintln!(
                "resuming {} at step {} of {} on {}",
                dir.display(),
                t.step_done(),
                t.config.steps,
                t.device
            );
            if let Some(before) = &t.resumed_from_device {
                eprintln!(
                    "note: the checkpoint was trained on {before}; this session trains on {}: the run continues, but its losses will not be bit-identical to an uninterrupted run on one device",
                    t.device
                );
            }
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
        "{} blocks of {} tokens: {} train, {} validation; Wake rows {}..{}; on {}",
        trainer.blocks.train.len() + trainer.blocks.val.len(),
        trainer.config.seq_len,
        trainer.blocks.train.len(),
        trainer.blocks.val.len(),
        trainer.manifest.wake.start,
        trainer.manifest.wake.end(),
        trainer.device
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

/// `wake2vec run`: the pipeline, started or continued.
pub fn run(args: RunArgs) -> Result<()> {
    train::tune_runtime();
    train::install_interrupt_handler();
    let (config, out) = match args.resume {
        Some(dir) => (None, dir),
        None => {
            let preset = match (&args.preset, &args.config) {
                (Some(p), _) => Some(p.as_str()),
                (None, None) => Some("demo"),
                (None, Some(_)) => None,
            };
            let mut set = args.set.clone();
            let quoted = |v: &dyn std::fmt::Display| toml::Value::String(v.to_string()).to_string();
            if let Some(d) = args.device {
                set.insert(0, format!("device={}", quoted(&d)));
            }
            if let Some(d) = args.dtype {
                set.insert(0, format!("dtype={}", quoted(&d.name())));
            }
            let config = PipelineConfig::resolve(preset, args.config.as_deref(), &set)?;
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
        Finished::Done => wake2vec::outln!(
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

/// `wake2vec export`: a checkpoint of a run as an HF directory.
pub fn export(args: ExportArgs) -> Result<()> {
    let ExportArgs {
        run,
        out,
        checkpoint,
        merge,
    } = args;
    let step = wake2vec::run::select::checkpoint_step(
        &wake2vec::run::dir::RunDir::new(&run),
        &checkpoint,
    )?;
    train::export::export(&run, step, &out, merge)?;
    wake2vec::outln!(
        "wrote {} (the model of {} at step {step})",
        out.display(),
        run.display()
    );
    Ok(())
}

/// `wake2vec status`: the table (or JSON) of where a run stands.
pub fn status(args: StatusArgs) -> Result<()> {
    let st = wake2vec::run::status::status(&args.run)?;
    if args.json {
        wake2vec::outln!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        wake2vec::out!("{}", wake2vec::run::status::render(&st));
    }
    Ok(())
}

/// `wake2vec init-study`: the schemes side by side.
pub fn init_study(args: InitStudyArgs) -> Result<()> {
    train::tune_runtime();
    train::install_interrupt_handler();
    let (config, out) = match (args.resume, args.out) {
        (Some(dir), _) => (None, dir),
        (None, Some(out)) => {
            let need = |p: Option<PathBuf>, flag: &str| {
                p.ok_or_else(|| anyhow::anyhow!("{flag} is required to start a study"))
            };
            let config = StudyConfig {
                model: args.model,
                lexicon: need(args.lexicon, "--lexicon")?,
                corpus: need(args.corpus, "--corpus")?,
                control: need(args.control, "--control")?,
                schemes: args.schemes,
                steps: args.steps,
                seq_len: args.seq_len,
                grad_accum: args.grad_accum,
                lr: args.lr,
                eval_blocks: args.eval_blocks,
                control_segments: args.control_segments,
                seed: args.seed,
            };
            (Some(config), out)
        }
        (None, None) => unreachable!("clap requires --out or --resume"),
    };
    match study::run(config, &out, !args.quiet)? {
        StudyEnd::Done(s) => {
            for r in &s.schemes {
                wake2vec::outln!(
                    "{:<14} control {:.4} → {:.4} bits/byte, Wake {} → {} bits/byte",
                    r.scheme,
                    r.start.control.bpb.bits_per_byte,
                    r.end.control.bpb.bits_per_byte,
                    r.start.wake_bpb.map_or("–".into(), |v| format!("{v:.4}")),
                    r.end.wake_bpb.map_or("–".into(), |v| format!("{v:.4}"))
                );
            }
            wake2vec::outln!("wrote {}", out.join("init_study.html").display());
        }
        StudyEnd::Interrupted { scheme, step } => eprintln!(
            "interrupted in {scheme} at step {step}: continue with `wake2vec init-study --resume {}`",
            out.display()
        ),
    }
    Ok(())
}
