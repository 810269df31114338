//! The speed measurements: bench train, bench generate, bench analyze.

use crate::args::BenchCommand;
use crate::model_verbs::load_model;
use anyhow::{bail, Result};
use wake2vec::bench;
use wake2vec::hub::cache;
use wake2vec::train::{self, Phase, TrainRows};

/// `wake2vec bench train | generate | analyze`.
pub fn bench(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train {
            model,
            compute,
            phase,
            wake_rows,
            seq_len,
            repeats,
            no_baseline,
            train_rows,
        } => {
            let phase = match phase {
                1 => Phase::P1,
                2 => Phase::P2,
                3 => Phase::P3,
                n => bail!("--phase must be 1, 2 or 3, got {n}"),
            };
            train::tune_runtime();
            let dir = cache::resolve(&model, true)?;
            let compute = compute.open()?;
            bench::train::phase(
                &dir,
                &compute,
                phase,
                wake_rows,
                seq_len,
                repeats,
                !no_baseline,
                match train_rows.as_str() {
                    "all" => TrainRows::All,
                    _ => TrainRows::Wake,
                },
            )
        }
        BenchCommand::Generate {
            model,
            compute,
            new_tokens,
            repeats,
        } => {
            let loaded = load_model(&model, &compute)?;
            bench::generation(&loaded, new_tokens, repeats)
        }
        BenchCommand::Analyze {
            model,
            base_rows,
            dim,
            new_rows,
            repeats,
            python,
            script,
        } => {
            let base = match &model {
                Some(dir) => Some(wake2vec::analysis::load::load_embeddings(dir)?),
                None => None,
            };
            let e = bench::analysis_matrix(base, base_rows, dim, new_rows, 42)?;
            let base_vocab = e.rows - new_rows;
            let reference = python.as_deref().zip(script.as_deref());
            bench::analysis(&e, base_vocab, repeats, reference)
        }
    }
}
