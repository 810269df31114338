//! [`RunDir`]: every path of a training run's directory (docs/formats.md), named in one place.
//!
//! ```text
//! RUN/run.toml                    the resolved configuration; its presence marks a run
//! RUN/log.jsonl                   one JSON line per optimizer step and per evaluation
//! RUN/start.safetensors           a later phase's starting state (Wake rows, adapters)
//! RUN/checkpoints/step-N/         complete checkpoints (written under a temporary name, renamed)
//! RUN/snapshots/step-N.safetensors  the Wake rows at each evaluation
//! RUN/lock                        held (advisory lock) by the process writing the run
//! ```
//!
//! Nothing inside a run is written through a symbolic link: the subdirectories are checked
//! ([`crate::util::fs::ensure_dir`]), links among the checkpoints are not checkpoints, and the
//! log is opened without following links.

use crate::util::fs::{check_file, ensure_dir, open_in_place};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
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
    /// A symbolic link named `step-N` is not a checkpoint, nor is anything under a linked
    /// `checkpoints/`.
    pub fn list_checkpoints(&self) -> Vec<(u64, PathBuf)> {
        if !is_real_dir(&self.checkpoints()) {
            return Vec::new();
        }
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(self.checkpoints())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let step = step_of(&e.file_name().to_string_lossy())?;
                e.file_type().ok()?.is_dir().then(|| (step, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    /// The checkpoint `which` names: `step-N`, or a path to one of this run's checkpoints.
    /// Another run's checkpoint is refused: resuming from it would mix two runs' states.
    pub fn find_checkpoint(&self, which: &str) -> Result<PathBuf> {
        let available = self.list_checkpoints();
        let is_name = !which.contains(['/', '\\']);
        let found = if is_name {
            step_of(which).and_then(|s| available.iter().find(|(t, _)| *t == s))
        } else {
            let given = Path::new(which).canonicalize().ok();
            available
                .iter()
                .find(|(_, p)| given.is_some() && p.canonicalize().ok() == given)
        };
        match found {
            Some((_, p)) => Ok(p.clone()),
            None if is_name => bail!(
                "no checkpoint {which} in {} (available: {})",
                self.checkpoints().display(),
                step_names(&available)
            ),
            None => bail!(
                "--checkpoint {which} is not a checkpoint of the run {}: a run resumes only from its own checkpoints (available: {}); to continue another run, resume that run",
                self.root.display(),
                step_names(&available)
            ),
        }
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
        ensure_dir(&dir)?;
        let mut out = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_suffix(".safetensors").and_then(step_of) else {
                continue;
            };
            if entry.file_type()?.is_file() {
                out.push((n, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Refuses a run whose files or subdirectories are symbolic links or of the wrong kind:
    /// continuing it would write, truncate or delete outside the run. Call before writing.
    pub fn check_layout(&self) -> Result<()> {
        for file in [
            self.config(),
            self.log(),
            self.start_state(),
            self.lock_file(),
        ] {
            check_file(&file)?;
        }
        for dir in [self.checkpoints(), self.snapshots()] {
            if std::fs::symlink_metadata(&dir).is_ok() {
                ensure_dir(&dir)?;
            }
        }
        Ok(())
    }

    /// `lock`, the file the writer of the run holds locked.
    fn lock_file(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// Takes the run's advisory lock for writing (created with the directory when missing);
    /// held until the returned [`RunLock`] is dropped, released by the system if the process
    /// dies. A second writer is refused with the holder's pid.
    pub fn lock(&self) -> Result<RunLock> {
        if !self.root.is_dir() {
            std::fs::create_dir_all(&self.root)
                .with_context(|| format!("cannot create the directory {}", self.root.display()))?;
        }
        let path = self.lock_file();
        let mut file = open_in_place(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let pid = if holder.is_empty() { "unknown" } else { holder };
                bail!(
                    "{} is in use by another wake2vec process (pid {pid}) writing to it; wait for it to finish or stop it, then run this again",
                    self.root.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        file.set_len(0)
            .and_then(|()| write!(file, "{}", std::process::id()))
            .and_then(|()| file.flush())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(RunLock { _file: file })
    }

    /// Removes the temporary files that interrupted atomic writes left in the run and its
    /// `snapshots/` (call with the lock held: no other writer can own them); returns their names.
    pub fn remove_temporaries(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for dir in [self.root.clone(), self.snapshots()] {
            if !is_real_dir(&dir) {
                continue;
            }
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_file = e.file_type().is_ok_and(|t| t.is_file());
                if is_file
                    && name.starts_with('.')
                    && name.contains(".tmp-")
                    && std::fs::remove_file(e.path()).is_ok()
                {
                    removed.push(name);
                }
            }
        }
        removed
    }
}

/// A run's write lock; dropping it releases the lock.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

/// True when `dir` is a directory and not a symbolic link.
fn is_real_dir(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir())
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

    #[test]
    fn one_writer_at_a_time_and_its_pid_named() {
        let root = std::env::temp_dir().join(format!("w2v-rundir-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let run = RunDir::new(&root);
        let held = run.lock().unwrap();
        let err = run.lock().unwrap_err().to_string();
        assert!(
            err.contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
        drop(held);
        run.lock().unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
