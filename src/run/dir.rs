//! [`RunDir`]: every path of a training run's directory (docs/formats.md), named in one place.
//!
//! ```text
//! RUN/run.toml                    the resolved configuration; its presence marks a run
//! RUN/log.jsonl                   one JSON line per optimizer step and per evaluation
//! RUN/start.safetensors           a later phase's starting state (Wake rows, adapters)
//! RUN/checkpoints/step-N/         complete checkpoints (written under a temporary name, renamed)
//! RUN/snapshots/step-N.safetensors  the Wake rows at each evaluation
//! ```

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// A training run's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

/// `step-N`: the name of a checkpoint directory (and the stem of a snapshot file).
pub fn step_name(step: u64) -> String {
    format!("step-{step}")
}

/// The `N` of a `step-N` name.
pub fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

impl RunDir {
    /// The run directory at `root` (which need not exist yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `run.toml`, the resolved configuration.
    pub fn config(&self) -> PathBuf {
        self.root.join("run.toml")
    }

    /// True when the directory holds a run (its `run.toml` exists).
    pub fn is_run(&self) -> bool {
        self.config().exists()
    }

    /// `log.jsonl`, the training log.
    pub fn log(&self) -> PathBuf {
        self.root.join("log.jsonl")
    }

    /// `start.safetensors`: the state a later phase starts from (the source's Wake rows; for
    /// Phase 3 also its adapters). Phase 1 starts from the model itself.
    pub fn start_state(&self) -> PathBuf {
        self.root.join("start.safetensors")
    }

    /// `checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// `checkpoints/step-N/`.
    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.checkpoints().join(step_name(step))
    }

    /// The checkpoint directories `(step, path)`, sorted by step (none when there are none).
    pub fn list_checkpoints(&self) -> Vec<(u64, PathBuf)> {
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(self.checkpoints())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let step = step_of(&e.file_name().to_string_lossy())?;
                e.path().is_dir().then(|| (step, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    /// `snapshots/`.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// `snapshots/step-N.safetensors`.
    pub fn snapshot(&self, step: u64) -> PathBuf {
        self.snapshots()
            .join(format!("{}.safetensors", step_name(step)))
    }

    /// The snapshot files `(step, path)`, sorted by step (none when there is no `snapshots/`).
    pub fn list_snapshots(&self) -> Result<Vec<(u64, PathBuf)>> {
        let dir = self.snapshots();
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(".safetensors").and_then(step_of) {
                out.push((n, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// `step-A, step-B, …` of checkpoints or snapshots, or `none`.
pub fn step_names(list: &[(u64, PathBuf)]) -> String {
    if list.is_empty() {
        return "none".into();
    }
    list.iter()
        .map(|(s, _)| step_name(*s))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_steps_in_numeric_order_and_ignores_other_entries() {
        let root = std::env::temp_dir().join(format!("w2v-rundir-{}", std::process::id()));
        let run = RunDir::new(&root);
        for s in [10, 2, 100] {
            std::fs::create_dir_all(run.checkpoint(s)).unwrap();
        }
        std::fs::create_dir_all(run.checkpoints().join(".step-5.tmp-1")).unwrap();
        std::fs::write(
            run.checkpoints().join("step-7"),
            b"a file, not a checkpoint",
        )
        .unwrap();
        std::fs::create_dir_all(run.snapshots()).unwrap();
        for s in [40, 0] {
            std::fs::write(run.snapshot(s), b"").unwrap();
        }
        std::fs::write(run.snapshots().join("notes.txt"), b"").unwrap();
        let steps: Vec<u64> = run.list_checkpoints().iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [2, 10, 100]);
        let snaps = run.list_snapshots().unwrap();
        assert_eq!(snaps.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [0, 40]);
        assert_eq!(step_names(&snaps), "step-0, step-40");
        assert_eq!(step_names(&[]), "none");
        assert_eq!(step_of("step-12"), Some(12));
        assert_eq!(step_of("step-x"), None);
        assert!(!run.is_run());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
