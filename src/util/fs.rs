//! Crash-safe file writes: write to a temporary name beside the target, sync, then rename.
//! A reader never sees a half-written file under the final name.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The temporary name used while `path` is being written (same directory, so rename is atomic).
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Syncs the finished temporary file and renames it to `path`.
pub fn commit(tmp: &Path, path: &Path) -> Result<()> {
    let result = std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .and_then(|()| std::fs::rename(tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    commit(&tmp, path)
}

/// `p` as an absolute path (run.toml and pipeline.toml record absolute paths).
pub fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve the path {}", p.display()))
}
