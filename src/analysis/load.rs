//! Finding what to analyze: a model directory or a run directory (docs/formats.md), its
//! embedding matrix, the row layout from `wake2vec.json`, the training log and the snapshots.

use super::{DriftReference, Embeddings, Layout};
use crate::hub::weights;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
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

fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

fn has_weights(dir: &Path) -> bool {
    dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file()
}

/// The `model = "..."` of a run's run.toml (relative paths are relative to the run directory).
fn run_model(run: &Path) -> Result<PathBuf> {
    let path = run.join("run.toml");
    let text = std::fs::read_to_string(&path).with_context(|| {
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
    let ckpts = path.join("checkpoints");
    if ckpts.is_dir() {
        let mut best: Option<(u64, PathBuf)> = None;
        for entry in
            std::fs::read_dir(&ckpts).with_context(|| format!("cannot list {}", ckpts.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = step_of(&name) {
                let dir = entry.path();
                let usable = has_weights(&dir) || dir.join("params.safetensors").is_file();
                if usable && best.as_ref().is_none_or(|(b, _)| n > *b) {
                    best = Some((n, dir));
                }
            }
        }
        if let Some((n, dir)) = best {
            let (model_dir, params) = if has_weights(&dir) {
                (dir, None)
            } else {
                (run_model(path)?, Some(dir.join("params.safetensors")))
            };
            return Ok(Source {
                input: path.to_path_buf(),
                model_dir,
                run_dir: Some(path.to_path_buf()),
                checkpoint: Some(format!("step-{n}")),
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

/// Replaces the Wake rows of `e` with a checkpoint's trained `wake_embed` (`[wake_count,
/// hidden]`); returns false when the checkpoint holds no `wake_embed` (the Wake rows were not
/// trained, e.g. a LoRA phase).
pub fn apply_params(e: &mut Embeddings, layout: &Layout, params: &Path) -> Result<bool> {
    let (w, _) = weights::load_file_filtered(params, |n| n == "wake_embed", &Device::Cpu)?;
    let Some(t) = w.get("wake_embed") else {
        return Ok(false);
    };
    let (rows, dim) = t.dims2()?;
    if rows != layout.wake_count || dim != e.dim {
        bail!(
            "{}: wake_embed is {rows} × {dim}, the model has {} Wake rows of width {}: the \
             checkpoint does not belong to this model",
            params.display(),
            layout.wake_count,
            e.dim
        );
    }
    let data = t.flatten_all()?.to_vec1::<f32>()?;
    let start = layout.wake_start * e.dim;
    e.data[start..start + data.len()].copy_from_slice(&data);
    Ok(true)
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

/// The fields of `wake2vec.json` that training and analysis read (docs/formats.md; the whole
/// file is `vocab::Manifest`, written by `inject`).
#[derive(Debug, Clone, Deserialize)]
pub struct WakeJson {
    pub base_vocab: usize,
    pub wake_start: usize,
    pub wake_count: usize,
    #[serde(default)]
    pub words: Vec<String>,
    #[serde(default)]
    pub base_model: Option<String>,
}

impl WakeJson {
    /// Reads a `wake2vec.json` and checks that its words match its row count.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let w: WakeJson = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a wake2vec.json (see docs/formats.md)",
                path.display()
            )
        })?;
        if !w.words.is_empty() && w.words.len() != w.wake_count {
            bail!(
                "{}: {} words for wake_count {}; the file is inconsistent",
                path.display(),
                w.words.len(),
                w.wake_count
            );
        }
        Ok(w)
    }
}

/// The row layout: `--base-vocab N` (all rows after N are "new"), else `wake2vec.json` beside
/// the model's config.json or in the run directory.
pub fn load_layout(
    source: &Source,
    rows: usize,
    base_vocab: Option<usize>,
) -> Result<(Layout, Option<WakeJson>)> {
    if let Some(n) = base_vocab {
        if n > rows {
            bail!("--base-vocab {n} exceeds the matrix's {rows} rows");
        }
        return Ok((
            Layout {
                base_vocab: n,
                wake_start: n,
                wake_count: rows - n,
                words: Vec::new(),
            },
            None,
        ));
    }
    let mut candidates = vec![source.model_dir.join("wake2vec.json")];
    if let Some(r) = &source.run_dir {
        candidates.push(r.join("wake2vec.json"));
    }
    for path in &candidates {
        if path.is_file() {
            let w = WakeJson::read(path)?;
            let layout = Layout {
                base_vocab: w.base_vocab,
                wake_start: w.wake_start,
                wake_count: w.wake_count,
                words: w.words.clone(),
            };
            return Ok((layout, Some(w)));
        }
    }
    bail!(
        "no wake2vec.json in {}: analyze an injected model, or pass --base-vocab N to treat rows \
         N.. as the new rows",
        source.model_dir.display()
    )
}

/// One line of `log.jsonl` (docs/formats.md); unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct LogLine {
    pub kind: String,
    #[serde(default)]
    pub phase: Option<String>,
    pub step: u64,
    #[serde(default)]
    pub loss: Option<f64>,
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub val_loss: Option<f64>,
    #[serde(default)]
    pub val_bpb: Option<f64>,
    #[serde(default)]
    pub train_loss: Option<f64>,
    /// Training time of all sessions so far (step lines).
    #[serde(default)]
    pub elapsed_s: Option<f64>,
}

/// Reads `log.jsonl`; a torn last line (a run killed mid-write) is skipped, any other bad line
/// is an error.
/// Several training logs as one: each log's steps are shifted to continue after the previous
/// log's last step (a pipeline's phases in order).
pub fn chain_logs(paths: &[PathBuf]) -> Result<Vec<LogLine>> {
    let mut out: Vec<LogLine> = Vec::new();
    for p in paths {
        let offset = out.iter().map(|l| l.step).max().unwrap_or(0);
        out.extend(load_log(p)?.into_iter().map(|mut l| {
            l.step += offset;
            l
        }));
    }
    Ok(out)
}

pub fn load_log(path: &Path) -> Result<Vec<LogLine>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<LogLine>(line) {
            Ok(l) => out.push(l),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => bail!("{} line {}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Loss numbers for the summary, from the log.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LossSummary {
    pub steps_logged: usize,
    pub final_step: Option<u64>,
    pub final_train: Option<f64>,
    pub init_val: Option<f64>,
    pub final_val: Option<f64>,
    pub best_val: Option<f64>,
    pub best_val_step: Option<u64>,
    /// Validation bits per byte: comparable across tokenizers.
    pub final_val_bpb: Option<f64>,
    pub best_val_bpb: Option<f64>,
}

pub fn summarize_log(log: &[LogLine]) -> LossSummary {
    let steps: Vec<&LogLine> = log.iter().filter(|l| l.kind == "step").collect();
    let evals: Vec<&LogLine> = log
        .iter()
        .filter(|l| l.kind == "eval" && l.val_loss.is_some())
        .collect();
    let best = evals
        .iter()
        .min_by(|a, b| a.val_loss.unwrap().total_cmp(&b.val_loss.unwrap()));
    LossSummary {
        steps_logged: steps.len(),
        final_step: log.iter().map(|l| l.step).max(),
        final_train: steps.iter().rev().find_map(|l| l.loss),
        init_val: evals.iter().find(|l| l.step == 0).and_then(|l| l.val_loss),
        final_val: evals.last().and_then(|l| l.val_loss),
        best_val: best.and_then(|l| l.val_loss),
        best_val_step: best.map(|l| l.step),
        final_val_bpb: evals.last().and_then(|l| l.val_bpb),
        best_val_bpb: evals.iter().filter_map(|l| l.val_bpb).reduce(f64::min),
    }
}

/// `snapshots/step-N.safetensors` of a run, sorted by step.
pub fn list_snapshots(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = run_dir.join("snapshots");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".safetensors") {
            if let Some(n) = step_of(stem) {
                out.push((n, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_summary_takes_final_and_best() {
        let text = r#"{"kind":"eval","phase":"p1","step":0,"val_loss":9.0,"val_bpb":3.0,"train_loss":9.1}
{"kind":"step","phase":"p1","step":1,"loss":8.0,"lr":0.001,"grad_norm":1.0,"tokens_per_s":100.0,"elapsed_s":1.0}
{"kind":"step","phase":"p1","step":2,"loss":7.0,"lr":0.001,"grad_norm":1.0,"tokens_per_s":100.0,"elapsed_s":2.0}
{"kind":"eval","phase":"p1","step":2,"val_loss":6.5,"val_bpb":2.1,"train_loss":7.0}
{"kind":"eval","phase":"p1","step":4,"val_loss":6.7,"val_bpb":2.2,"train_loss":6.9}
{"kind":"step","phase":"p1","step":5,"lo"#;
        let dir = std::env::temp_dir().join(format!("w2v-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log.jsonl");
        std::fs::write(&p, text).unwrap();
        let log = load_log(&p).unwrap();
        assert_eq!(log.len(), 5, "the torn last line is skipped");
        let s = summarize_log(&log);
        assert_eq!(s.final_train, Some(7.0));
        assert_eq!(s.init_val, Some(9.0));
        assert_eq!(s.final_val, Some(6.7));
        assert_eq!(s.best_val, Some(6.5));
        assert_eq!(s.best_val_step, Some(2));
        assert_eq!(s.best_val_bpb, Some(2.1));
        // a bad line in the middle is an error
        std::fs::write(&p, "{\"kind\":\"step\"}\n{\"kind\":\"step\",\"step\":1}\n").unwrap();
        assert!(load_log(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
