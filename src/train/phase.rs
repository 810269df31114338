//! What a phase trains and where it starts: the trainable parameters (the Wake blocks, the LoRA
//! matrices) and a later phase's starting state, taken from its source run's checkpoint.

use super::checkpoint;
use super::config::{Phase, TrainConfig, TrainRows};
use super::wake_rows::{GradSink, WakeRows};
use super::Buffers;
use crate::model::{Llama, Lora};
use crate::nn::device::Kernels;
use crate::run::dir::RunDir;
use crate::run::select::checkpoint_step;
use crate::util::fs::absolute;
use crate::vocab::{Manifest, WakeRange};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A trainable parameter: its variable and the gradient accumulated over the micro-batches.
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) var: Var,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Its gradient, accumulated over the micro-batches of a step (fast kernels).
    pub(crate) grad: Arc<Mutex<Vec<f32>>>,
    /// Its gradient on the variable's device (generic kernels); `None` while zero.
    pub(crate) device_grad: Mutex<Option<Tensor>>,
}

impl Param {
    /// A trainable matrix (or vector, as one row) with a zeroed gradient: a host buffer for the
    /// fast kernels, a device tensor (made by the first backward pass) for the generic ones.
    pub(crate) fn new(name: String, var: Var, kernels: Kernels) -> Result<Self> {
        let (rows, cols) = match var.dims() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            d => bail!("parameter '{name}' has shape {d:?}; expected a matrix"),
        };
        let host = match kernels {
            Kernels::Fast => rows * cols,
            Kernels::Generic => 0,
        };
        Ok(Self {
            name,
            var,
            rows,
            cols,
            grad: Arc::new(Mutex::new(vec![0f32; host])),
            device_grad: Mutex::new(None),
        })
    }

    /// Its shape and values, as checkpoints and snapshots store them.
    pub(crate) fn buffer(&self) -> Result<(Vec<usize>, Vec<f32>)> {
        Ok((
            vec![self.rows, self.cols],
            self.var.as_tensor().flatten_all()?.to_vec1()?,
        ))
    }
}

/// Checkpoint names of the trainable row blocks: the Wake rows of the embedding and of an
/// untied head.
pub(crate) const WAKE_BLOCKS: [&str; 2] = ["wake_embed", "wake_head"];
/// Checkpoint names of the whole embedding and untied head (`train_rows = "all"`).
pub(crate) const FULL_BLOCKS: [&str; 2] = ["embed", "head"];

/// Whether a state's tensor is a row block (not a LoRA matrix).
pub(crate) fn is_row_block(name: &str) -> bool {
    WAKE_BLOCKS.contains(&name) || FULL_BLOCKS.contains(&name)
}

/// The rows Phase 1's blocks cover: the Wake rows, or every row for `train_rows = "all"`.
pub(crate) fn trained_range(model: &Llama, wake: WakeRange, rows: TrainRows) -> Result<WakeRange> {
    Ok(match rows {
        TrainRows::Wake => wake,
        TrainRows::All => WakeRange {
            start: 0,
            count: model.embed.dim(0)?,
        },
    })
}

/// The trained rows of the embedding (and of an untied head) as trainable variables: the Wake
/// rows (`wake_embed`, `wake_head`), or the whole matrices (`embed`, `head`) for `all`.
pub(crate) fn wake_params(model: &Llama, wake: WakeRange, rows: TrainRows) -> Result<Vec<Param>> {
    let range = trained_range(model, wake, rows)?;
    let names = match rows {
        TrainRows::Wake => WAKE_BLOCKS,
        TrainRows::All => FULL_BLOCKS,
    };
    let make = |name: &str, matrix: &Tensor| -> Result<Param> {
        let rows = matrix
            .narrow(0, range.start, range.count)?
            .to_dtype(DType::F32)?;
        Param::new(
            name.into(),
            Var::from_tensor(&rows.contiguous()?)?,
            model.kernels,
        )
    };
    let mut params = vec![make(names[0], &model.embed)?];
    if let Some(head) = &model.lm_head {
        params.push(make(names[1], head)?);
    }
    Ok(params)
}

/// Phase 2's frozen Wake rows: plain tensors, no gradient sink.
pub(crate) fn frozen_wake_rows(model: &Llama, wake: WakeRange) -> Result<WakeRows> {
    let rows =
        |m: &Tensor| -> Result<Tensor> { Ok(m.narrow(0, wake.start, wake.count)?.contiguous()?) };
    Ok(WakeRows {
        start: wake.start,
        embed: rows(&model.embed)?,
        head: model.lm_head.as_ref().map(rows).transpose()?,
        sink: None,
    })
}

/// The Wake rows of `params` (the embedding block, then the untied head's) for the forward pass,
/// with the parameters' gradient buffers as the sink on the fast kernels; on the generic ones
/// the rows are the variables themselves and autograd finds their gradients.
pub(crate) fn wake_rows_of(start: usize, params: &[Param], kernels: Kernels) -> WakeRows {
    WakeRows {
        start,
        embed: params[0].var.as_tensor().clone(),
        head: params.get(1).map(|p| p.var.as_tensor().clone()),
        sink: (kernels == Kernels::Fast).then(|| GradSink {
            embed: params[0].grad.clone(),
            head: params.get(1).map(|p| p.grad.clone()),
            inputs: Default::default(),
        }),
    }
}

/// The row blocks a state holds and the first row they replace: the whole matrices (`embed`,
/// `head`, from row 0) when its Phase 1 trained every row, else the Wake rows.
pub(crate) fn row_blocks(
    tensors: &HashMap<String, Tensor>,
    wake: WakeRange,
) -> ([&'static str; 2], usize) {
    if tensors.contains_key(FULL_BLOCKS[0]) {
        (FULL_BLOCKS, 0)
    } else {
        (WAKE_BLOCKS, wake.start)
    }
}

/// Puts the row blocks of a starting state into the model's embedding (and untied head): its
/// Wake rows, or the whole matrices when its Phase 1 trained every row.
pub(crate) fn set_wake_rows(model: &mut Llama, wake: WakeRange, state: &Buffers) -> Result<()> {
    let tensors = tensors_of(state, model.embed.device())?;
    let (names, start) = row_blocks(&tensors, wake);
    let rows = tensors
        .get(names[0])
        .context("the starting state has no 'wake_embed'")?;
    model.embed = replace_rows(&model.embed, start, rows)?;
    if let Some(head) = &model.lm_head {
        let rows = tensors.get(names[1]).with_context(|| {
            format!(
                "the head is untied but the starting state has no '{}'",
                names[1]
            )
        })?;
        model.lm_head = Some(replace_rows(head, start, rows)?);
    }
    Ok(())
}

/// `full` with rows `start .. start + rows.len()` replaced by `rows`.
pub(crate) fn replace_rows(full: &Tensor, start: usize, rows: &Tensor) -> Result<Tensor> {
    let (total, count) = (full.dim(0)?, rows.dim(0)?);
    ensure!(
        start + count <= total,
        "{count} Wake rows at {start} do not fit a matrix of {total} rows"
    );
    let rows = rows.to_dtype(full.dtype())?;
    if count == total {
        return Ok(rows);
    }
    let mut parts = vec![full.narrow(0, 0, start)?, rows];
    if start + count < total {
        parts.push(full.narrow(0, start + count, total - start - count)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// What a phase trains, set up on the model: the Wake blocks (Phases 1 and 3) and the LoRA
/// matrices (Phases 2 and 3), and Phase 2's frozen Wake rows.
pub(crate) struct Trainables {
    /// The Wake blocks first, then the LoRA matrices.
    pub(crate) params: Vec<Param>,
    /// How many of `params` are Wake blocks.
    pub(crate) wake_params: usize,
    /// The first row the Wake blocks cover: the first Wake row, or 0 for `train_rows = "all"`.
    pub(crate) row_start: usize,
    pub(crate) lora: Option<Lora>,
    /// Phase 2: the frozen Wake rows, read through the same path as when they trained, so the
    /// evaluation at step 0 equals the source checkpoint's.
    pub(crate) frozen_wake: Option<WakeRows>,
}

impl Trainables {
    /// Phases 2 and 3 start from the state their source chose (`start.safetensors`): its Wake
    /// rows go into the model; Phase 2 draws fresh adapters from the seed, Phase 3 continues its
    /// source's.
    pub(crate) fn of_phase(
        config: &TrainConfig,
        model: &mut Llama,
        wake: WakeRange,
        run: &RunDir,
    ) -> Result<Self> {
        let start = match config.phase {
            Phase::P1 => Buffers::new(),
            _ => read_buffers(&run.start_state())?,
        };
        if config.phase != Phase::P1 {
            set_wake_rows(model, wake, &start)?;
        }
        let mut params = if config.phase.trains_wake_rows() {
            wake_params(model, wake, config.train_rows)?
        } else {
            vec![]
        };
        let wake_params = params.len();
        let lora = match config.phase {
            Phase::P1 => None,
            Phase::P2 => Some(Lora::new(model, config.lora.clone(), config.seed)?),
            Phase::P3 => Some(Lora::from_tensors(
                model,
                config.lora.clone(),
                lora_tensors(&start, model.embed.device())?,
            )?),
        };
        for (name, var) in lora.iter().flat_map(Lora::params) {
            params.push(Param::new(name, var, model.kernels)?);
        }
        let frozen_wake = (config.phase == Phase::P2)
            .then(|| frozen_wake_rows(model, wake))
            .transpose()?;
        Ok(Self {
            params,
            wake_params,
            row_start: trained_range(model, wake, config.train_rows)?.start,
            lora,
            frozen_wake,
        })
    }
}

/// Everything a run's model had at checkpoint `step` besides the frozen base model: the Wake
/// blocks (`wake_embed`, and `wake_head` when the head is untied) and the LoRA matrices (PEFT
/// names). Step 0 is the starting state, without Phase 2's fresh adapters (drawn from the
/// seed; no rule selects step 0).
pub fn phase_state(run: &Path, step: u64) -> Result<(TrainConfig, Buffers)> {
    let run = RunDir::new(run);
    let config = TrainConfig::load(&run.config()).with_context(|| {
        format!(
            "{} is not a run directory (no readable run.toml)",
            run.root().display()
        )
    })?;
    let mut state = match config.phase {
        Phase::P1 => {
            let model = Llama::load(&config.model, &candle_core::Device::Cpu)?;
            wake_params(
                &model,
                Manifest::load(&config.model)?.wake,
                config.train_rows,
            )?
            .iter()
            .map(|p| Ok((p.name.clone(), p.buffer()?)))
            .collect::<Result<Buffers>>()?
        }
        _ => read_buffers(&run.start_state())?,
    };
    if step > 0 {
        let path = run.checkpoint(step);
        ensure!(
            path.is_dir(),
            "{} has no checkpoint of step {step}",
            run.root().display()
        );
        state.extend(checkpoint::load(&path)?.params);
    }
    Ok((config, state))
}

/// Fills in a later phase's source: its model and corpus default to the source run's, its rule
/// picks a step (recorded in the config), and the source's state at that step is returned.
pub(crate) fn resolve_source(config: &mut TrainConfig) -> Result<Buffers> {
    let run = absolute(&config.source.run)?;
    let source = TrainConfig::load(&RunDir::new(&run).config()).with_context(|| {
        format!(
            "source.run {} is not a run directory (no readable run.toml)",
            run.display()
        )
    })?;
    // Phase 2 continues Phase 1; Phase 3 continues Phase 2, or Phase 3 itself (the seed's P3b).
    let allowed: &[Phase] = match config.phase {
        Phase::P2 => &[Phase::P1],
        _ => &[Phase::P2, Phase::P3],
    };
    ensure!(
        allowed.contains(&source.phase),
        "phase {} starts from a {} run, but {} is a phase {} run",
        config.phase.name(),
        if config.phase == Phase::P2 {
            "phase p1"
        } else {
            "phase p2 (or p3)"
        },
        run.display(),
        source.phase.name()
    );
    if config.model.as_os_str().is_empty() {
        config.model = source.model.clone();
    }
    if config.corpus.as_os_str().is_empty() {
        config.corpus = source.corpus.clone();
        config.append_lexicon = source.append_lexicon.clone();
    }
    ensure!(
        absolute(&config.model)? == source.model,
        "the model {} differs from the source run's {}",
        config.model.display(),
        source.model.display()
    );
    if config.phase == Phase::P3 {
        // Phase 3 trains the adapters its source trained.
        config.lora = source.lora.clone();
    }
    let step = match config.source.step {
        Some(step) => step,
        None => checkpoint_step(&RunDir::new(&run), &config.source.select.to_string())?,
    };
    config.source.run = run.clone();
    config.source.step = Some(step);
    Ok(phase_state(&run, step)?.1)
}

pub(crate) fn read_buffers(path: &Path) -> Result<Buffers> {
    let bytes = crate::util::fs::read(path)?;
    checkpoint::read_safetensors(&bytes, path)
}

pub(crate) fn tensors_of(buffers: &Buffers, device: &Device) -> Result<HashMap<String, Tensor>> {
    buffers
        .iter()
        .map(|(name, (shape, values))| {
            Ok((
                name.clone(),
                Tensor::from_slice(values, shape.as_slice(), device)?,
            ))
        })
        .collect()
}

/// The LoRA matrices of a state (every tensor but the Wake blocks).
pub(crate) fn lora_tensors(state: &Buffers, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut t = tensors_of(state, device)?;
    t.retain(|name, _| !is_row_block(name));
    Ok(t)
}
