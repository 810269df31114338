//! Finding what to analyze: a model directory or a run directory (docs/formats.md), its
//! embedding matrix, the row layout from `wake2vec.json`, the training log and the snapshots.

use super::{DriftReference, Embeddings, Layout};
use crate::hub::weights;
use crate::run::dir::{step_name, RunDir};
use crate::vocab::Manifest;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What `wake2vec analyze PATH` resolved `PATH` to.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub input: PathBuf,
    /// The HF model directory whose embedding matrix is analyzed.
    pub model_dir: PathBuf,
    /// The run directory (log.jsonl, snapshots/), when `PATH` is one.
    pub run_dir: Option<PathBuf>,
    /// `step-N` when the model is a run's checkpoint.
    pub checkpoint: Option<String>,
    /// The checkpoint's trained parameters when it is not a whole model directory
    /// (`params.safetensors`: `wake_embed` replaces the Wake rows of `model_dir`).
    pub params: Option<PathBuf>,
}

fn has_weights(dir: &Path) -> bool {
    dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file()
}

/// The `model = "..."` of a run's run.toml (relative paths are relative to the run directory).
fn run_model(run: &Path) -> Result<PathBuf> {
    let path = RunDir::new(run).config();
    let text = crate::util::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: a checkpoint without model.safetensors needs the run's model",
            path.display()
        )
    })?;
    let v: toml::Value =
        toml::from_str(&text).with_context(|| format!("{} is not TOML", path.display()))?;
    let model = v
        .get("model")
        .and_then(|m| m.as_str())
        .with_context(|| format!("{} has no `model = \"DIR\"` entry", path.display()))?;
    let m = PathBuf::from(model);
    Ok(if m.is_absolute() { m } else { run.join(m) })
}

/// Resolves a model directory (has `config.json`) or a run directory (has `checkpoints/`,
/// whose highest `step-N` with weights is analyzed).
pub fn resolve(path: &Path) -> Result<Source> {
    if !path.is_dir() {
        bail!(
            "{} is not a directory: give a model directory (config.json + *.safetensors) or a \
             run directory (log.jsonl, checkpoints/)",
            path.display()
        );
    }
    if path.join("config.json").is_file() {
        return Ok(Source {
            input: path.to_path_buf(),
            model_dir: path.to_path_buf(),
            run_dir: None,
            checkpoint: None,
            params: None,
        });
    }
    let run = RunDir::new(path);
    let ckpts = run.checkpoints();
    if ckpts.is_dir() {
        // An unreadable checkpoints/ is an error, not a run without checkpoints.
        std::fs::read_dir(&ckpts).with_context(|| format!("cannot list {}", ckpts.display()))?;
        let newest_usable = run
            .list_checkpoints()
            .into_iter()
            .rev()
            .find(|(_, dir)| has_weights(dir) || dir.join("params.safetensors").is_file());
        if let Some((n, dir)) = newest_usable {
            let (model_dir, params) = if has_weights(&dir) {
                (dir, None)
            } else {
                (run_model(path)?, Some(dir.join("params.safetensors")))
            };
            return Ok(Source {
                input: path.to_path_buf(),
                model_dir,
                run_dir: Some(path.to_path_buf()),
                checkpoint: Some(step_name(n)),
                params,
            });
        }
        bail!(
            "{} has no checkpoint with weights (checkpoints/step-N/ with model.safetensors or \
             params.safetensors)",
            path.display()
        );
    }
    bail!(
        "{} is neither a model directory (no config.json) nor a run directory (no checkpoints/)",
        path.display()
    )
}

/// Loads the input embedding matrix (`*embed_tokens.weight`) of a model directory, as f32.
pub fn load_embeddings(model_dir: &Path) -> Result<Embeddings> {
    for file in weights::weight_files(model_dir)? {
        let (w, _) = weights::load_file_filtered(
            &file,
            |n| n.ends_with("embed_tokens.weight"),
            &Device::Cpu,
        )?;
        if let Some((_, t)) = w.into_iter().next() {
            let (rows, dim) = t.dims2().context("embed_tokens.weight is not a matrix")?;
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            return Embeddings::new(data, rows, dim);
        }
    }
    bail!(
        "no embed_tokens.weight tensor in {}: is it a Llama-family model directory?",
        model_dir.display()
    )
}

/// Which rows a checkpoint's trained parameters replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// None: the checkpoint holds no embedding rows (a LoRA phase).
    Nothing,
    /// The Wake rows (`wake_embed`, `[wake_count, hidden]`).
    Wake,
    /// Every row (`embed`, the whole matrix: Phase 1 with `train_rows = "all"`).
    All,
}

/// Puts a checkpoint's trained rows into `e`: its `wake_embed` over the Wake rows, or its
/// `embed` over the whole matrix.
pub fn apply_params(e: &mut Embeddings, layout: &Layout, params: &Path) -> Result<Applied> {
    let (w, _) =
        weights::load_file_filtered(params, |n| n == "wake_embed" || n == "embed", &Device::Cpu)?;
    let (t, applied, rows_wanted, start) = match (w.get("wake_embed"), w.get("embed")) {
        (Some(t), _) => (t, Applied::Wake, layout.wake_count, layout.wake_start),
        (None, Some(t)) => (t, Applied::All, e.rows, 0),
        (None, None) => return Ok(Applied::Nothing),
    };
    let (rows, dim) = t.dims2()?;
    if rows != rows_wanted || dim != e.dim {
        bail!(
            "{}: its trained rows are {rows} × {dim}, the model has {rows_wanted} such rows of \
             width {}: the checkpoint does not belong to this model",
            params.display(),
            e.dim
        );
    }
    let data = t.flatten_all()?.to_vec1::<f32>()?;
    let start = start * e.dim;
    e.data[start..start + data.len()].copy_from_slice(&data);
    Ok(applied)
}

/// Loads a drift reference: a model directory, a safetensors file holding `*embed_tokens.weight`
/// (full matrix) or a snapshot holding `wake_rows` (Wake rows only, docs/formats.md).
pub fn load_reference(path: &Path) -> Result<DriftReference> {
    if path.is_dir() {
        return Ok(DriftReference::Full(load_embeddings(path)?));
    }
    let (w, _) = weights::load_file_filtered(
        path,
        |n| n == "wake_rows" || n.ends_with("embed_tokens.weight"),
        &Device::Cpu,
    )?;
    let to_emb = |t: &candle_core::Tensor| -> Result<Embeddings> {
        let (rows, dim) = t.dims2()?;
        Embeddings::new(t.flatten_all()?.to_vec1::<f32>()?, rows, dim)
    };
    if let Some(t) = w.get("wake_rows") {
        return Ok(DriftReference::WakeOnly(to_emb(t)?));
    }
    if let Some((_, t)) = w.iter().next() {
        return Ok(DriftReference::Full(to_emb(t)?));
    }
    bail!(
        "{} holds neither `wake_rows` (a snapshot) nor `*embed_tokens.weight` (a full matrix)",
        path.display()
    )
}

/// The row layout: `--base-vocab N` (all rows after N are "new"), else `wake2vec.json` beside
/// the model's config.json or in the run directory.
pub fn load_layout(
    source: &Source,
    rows: usize,
    base_vocab: Option<usize>,
) -> Result<(Layout, Option<Manifest>)> {
    if let Some(n) = base_vocab {
        let m = Manifest::from_base_vocab(n, rows)?;
        return Ok((Layout::of(&m), None));
    }
    let mut dirs = vec![source.model_dir.as_path()];
    dirs.extend(source.run_dir.as_deref());
    for dir in dirs {
        if let Some(m) = Manifest::load_if_present(dir)? {
            return Ok((Layout::of(&m), Some(m)));
        }
    }
    bail!(
        "no wake2vec.json in {}: analyze an injected model, or pass --base-vocab N to treat rows \
         N.. as the new rows",
        source.model_dir.display()
    )
}

/// The Wake rows of one snapshot.
pub fn load_snapshot(path: &Path) -> Result<Embeddings> {
    let (w, _) = weights::load_file_filtered(path, |n| n == "wake_rows", &Device::Cpu)?;
    let t = w
        .get("wake_rows")
        .with_context(|| format!("{} has no `wake_rows` tensor", path.display()))?;
    let (rows, dim) = t.dims2()?;
    Embeddings::new(t.flatten_all()?.to_vec1::<f32>()?, rows, dim)
}
