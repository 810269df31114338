//! Checkpoints: `RUN/checkpoints/step-N/` holding the trainable parameters
//! (`params.safetensors`), the optimizer state (`optimizer.safetensors`), everything else the
//! loop needs to continue exactly (`state.json`) and a CRC-32 of each of those files
//! (`checksums.json`, written last).
//!
//! A checkpoint is written into `.step-N.tmp-PID/`, each file synced, then the directory is
//! renamed to `step-N` and the parent synced: a crash leaves either the whole checkpoint or
//! none, and the previous ones untouched. Loading verifies every checksum.

use super::data::Cursor;
use super::Buffers;
use crate::run::dir::{step_name, RunDir};
use crate::util::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Early-stopping state: it lives in the checkpoint so a resumed run stops where an
/// uninterrupted one would (the original lost it on every resume, Appendix B.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EarlyStop {
    /// Best validation loss so far (`None` before the first evaluation).
    pub best: Option<f64>,
    pub best_step: u64,
    /// Evaluations since the last improvement.
    pub bad_evals: u64,
}

/// The loop's state at the end of an optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: u32,
    pub phase: String,
    /// Optimizer steps done.
    pub step: u64,
    /// The next training block.
    pub cursor: Cursor,
    /// The engine's random generator (data order is derived from the seed; later phases draw
    /// from this one).
    pub rng: Rng,
    pub early: EarlyStop,
    /// Per-parameter step counts of the optimizer.
    pub optimizer_steps: BTreeMap<String, u64>,
    /// Length of log.jsonl when this checkpoint was taken; resuming truncates the log to it.
    pub log_bytes: u64,
    /// Fingerprint of the training blocks (a resume refuses a changed corpus or tokenizer).
    pub data_fingerprint: u32,
    /// Step losses since the last evaluation (the evaluation line reports their mean).
    pub losses_since_eval: Vec<f64>,
    /// The evaluation due at `step` has not run yet (the run was interrupted during it).
    pub needs_eval: bool,
    /// Training time of all sessions so far.
    pub elapsed_s: f64,
    /// The run ended (steps done or early stop).
    pub finished: bool,
    /// Where the last session trained: `cpu`, `cpu (generic kernels)`, `cuda:0`, with the
    /// frozen weights' dtype (empty in checkpoints written before devices were recorded).
    #[serde(default)]
    pub device: String,
}

/// What a checkpoint holds, in memory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Trainable parameters: name → (shape, values).
    pub params: Buffers,
    /// Optimizer buffers: name → (shape, values).
    pub optimizer: Buffers,
    pub state: TrainState,
}

/// Test hook: sleep this many milliseconds between the files of a checkpoint write, so a test
/// can kill the process in the middle of one.
const DELAY_ENV: &str = "WAKE2VEC_TEST_CHECKPOINT_DELAY_MS";

/// Serializes f32 tensors as safetensors bytes.
pub fn safetensors_bytes(
    tensors: &Buffers,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<(&String, &Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, (s, v))| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, d)| Ok(((*n).clone(), TensorView::new(Dtype::F32, (*s).clone(), d)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, metadata)?)
}

/// Reads f32 tensors from safetensors bytes.
pub fn read_safetensors(bytes: &[u8], what: &Path) -> Result<Buffers> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", what.display()))?;
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            ensure!(
                v.dtype() == Dtype::F32,
                "tensor '{n}' in {} is {:?}, expected F32",
                what.display(),
                v.dtype()
            );
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok((n, (v.shape().to_vec(), vals)))
        })
        .collect()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

#[derive(Debug, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    crc32: String,
}

/// Writes `ckpt` as `DIR/step-N` atomically and returns its path. If a loadable `step-N` already
/// exists (a run resumed from it saves again at the same step) it is left as it is; a damaged
/// one, or anything else under that name, is replaced.
pub fn save(run: &RunDir, ckpt: &Checkpoint) -> Result<PathBuf> {
    let dir = &run.checkpoints();
    crate::util::fs::ensure_dir(dir)?;
    let final_dir = run.checkpoint(ckpt.state.step);
    if let Ok(meta) = std::fs::symlink_metadata(&final_dir) {
        if meta.is_dir() && load(&final_dir).is_ok() {
            return Ok(final_dir);
        }
        let removed = if meta.is_dir() {
            std::fs::remove_dir_all(&final_dir)
        } else {
            std::fs::remove_file(&final_dir)
        };
        removed.with_context(|| {
            format!(
                "cannot replace the damaged checkpoint {}",
                final_dir.display()
            )
        })?;
    }
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        step_name(ckpt.state.step),
        std::process::id()
    ));
    let result = write_files(&tmp, ckpt).and_then(|()| {
        std::fs::rename(&tmp, &final_dir).with_context(|| {
            format!("cannot rename {} to {}", tmp.display(), final_dir.display())
        })?;
        sync_dir(dir)
    });
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| {
            format!(
                "cannot write checkpoint {} (the previous checkpoints are untouched; fix the cause, then continue with `wake2vec train --resume {}`)",
                final_dir.display(),
                run.root().display()
            )
        });
    }
    Ok(final_dir)
}

fn write_files(tmp: &Path, ckpt: &Checkpoint) -> Result<()> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp)?;
    }
    std::fs::create_dir(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let delay = std::env::var(DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_millis);
    let files: [(&str, Vec<u8>); 3] = [
        ("params.safetensors", safetensors_bytes(&ckpt.params, None)?),
        (
            "optimizer.safetensors",
            safetensors_bytes(&ckpt.optimizer, None)?,
        ),
        ("state.json", serde_json::to_vec_pretty(&ckpt.state)?),
    ];
    let mut sums = BTreeMap::new();
    for (file, bytes) in &files {
        write_synced(&tmp.join(file), bytes)?;
        sums.insert(
            file.to_string(),
            FileSum {
                bytes: bytes.len() as u64,
                crc32: format!("{:08x}", crc32fast::hash(bytes)),
            },
        );
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
    }
    write_synced(
        &tmp.join("checksums.json"),
        &serde_json::to_vec_pretty(&sums)?,
    )?;
    sync_dir(tmp)
}

/// Reads and verifies a checkpoint directory.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let sums_path = path.join("checksums.json");
    let mut sums: BTreeMap<String, FileSum> =
        serde_json::from_slice(&crate::util::fs::read(&sums_path).with_context(|| {
            format!(
                "checkpoint {} is incomplete: cannot read {}",
                path.display(),
                sums_path.display()
            )
        })?)
        .with_context(|| format!("{} is corrupt", sums_path.display()))?;
    let mut read = |file: &str| -> Result<Vec<u8>> {
        let p = path.join(file);
        let bytes = crate::util::fs::read(&p)?;
        let want = sums
            .remove(file)
            .with_context(|| format!("{} lists no checksum for {file}", sums_path.display()))?;
        let got = format!("{:08x}", crc32fast::hash(&bytes));
        if bytes.len() as u64 != want.bytes || got != want.crc32 {
            bail!(
                "checkpoint file {} is corrupt: {} bytes with CRC-32 {got}, but checksums.json records {} bytes with CRC-32 {}",
                p.display(),
                bytes.len(),
                want.bytes,
                want.crc32
            );
        }
        Ok(bytes)
    };
    let params = read_safetensors(
        &read("params.safetensors")?,
        &path.join("params.safetensors"),
    )?;
    let optimizer = read_safetensors(
        &read("optimizer.safetensors")?,
        &path.join("optimizer.safetensors"),
    )?;
    let state: TrainState = serde_json::from_slice(&read("state.json")?)
        .with_context(|| format!("{} is not a valid state.json", path.display()))?;
    Ok(Checkpoint {
        params,
        optimizer,
        state,
    })
}

/// Removes temporary directories left by interrupted checkpoint writes; returns their names.
pub fn remove_partial(dir: &Path) -> Vec<String> {
    let mut removed = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-")
            && name.contains(".tmp-")
            && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed.push(name);
        }
    }
    removed
}

/// Deletes checkpoints beyond the `keep_last` newest, except the steps in `keep`.
pub fn prune(run: &RunDir, keep_last: usize, keep: &[u64]) -> Result<()> {
    let all = run.list_checkpoints();
    let cut = all.len().saturating_sub(keep_last.max(1));
    for (step, path) in &all[..cut] {
        if !keep.contains(step) {
            std::fs::remove_dir_all(path)
                .with_context(|| format!("cannot remove old checkpoint {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: u64) -> Checkpoint {
        Checkpoint {
            params: BTreeMap::from([("w".to_string(), (vec![2, 3], vec![1.5; 6]))]),
            optimizer: BTreeMap::from([("w.row".to_string(), (vec![2], vec![0.25, 0.5]))]),
            state: TrainState {
                format: 1,
                phase: "p1".into(),
                step,
                cursor: Cursor { epoch: 1, index: 2 },
                rng: Rng::new(3),
                early: EarlyStop::default(),
                optimizer_steps: BTreeMap::from([("w".to_string(), step)]),
                log_bytes: 10,
                data_fingerprint: 7,
                losses_since_eval: vec![1.0, 2.0],
                needs_eval: false,
                elapsed_s: 1.0,
                finished: false,
                device: "cpu, f32".into(),
            },
        }
    }

    #[test]
    fn round_trip_prune_and_corruption() {
        let root = std::env::temp_dir().join(format!("w2v-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let run = RunDir::new(&root);
        let dir = run.checkpoints();
        for step in [1, 2, 3, 4] {
            save(&run, &sample(step)).unwrap();
        }
        let back = load(&dir.join("step-3")).unwrap();
        assert_eq!(back.state, sample(3).state);
        assert_eq!(back.params, sample(3).params);
        prune(&run, 2, &[1]).unwrap();
        let steps: Vec<u64> = run.list_checkpoints().iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, vec![1, 3, 4]);
        // Flip one byte of the parameters: the load names the file and says it is corrupt.
        let p = dir.join("step-4/params.safetensors");
        let mut bytes = crate::util::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&p, bytes).unwrap();
        let err = format!("{:#}", load(&dir.join("step-4")).unwrap_err());
        assert!(
            err.contains("params.safetensors is corrupt") && err.contains("CRC-32"),
            "{err}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
