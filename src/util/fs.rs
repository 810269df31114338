//! Crash-safe file writes: write to a temporary name beside the target, sync, then rename.
//! A reader never sees a half-written file under the final name. Also the checks that keep
//! wake2vec's writes inside the directories it was given: no symbolic link is written through,
//! and only regular files are read.

use anyhow::{bail, ensure, Context, Result};
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
    // A fresh file: a leftover of an earlier process with this pid (or a link planted under the
    // temporary name) is removed, never written through.
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, bytes));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    commit(&tmp, path)
}

/// `p` as an absolute path (run.toml and pipeline.toml record absolute paths).
pub fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve the path {}", p.display()))
}

/// The advice given when a path inside a directory wake2vec writes is a link or of the wrong kind.
const NO_LINKS: &str = "wake2vec does not follow links inside the directories it writes";

/// Makes sure `dir` is a real directory, creating it (and its parents) when missing. A symbolic
/// link or a file there is refused: writing through a link would change files elsewhere.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => bail!(
            "{} is a symbolic link; {NO_LINKS}: replace it with a real directory",
            dir.display()
        ),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!(
            "{} exists but is not a directory: move it away and run this again",
            dir.display()
        ),
        Err(_) => std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display())),
    }
}

/// Refuses `path` when it is anything but a regular file or absent: a symbolic link (writing or
/// truncating it would change its target), a directory, a FIFO or a device.
pub fn check_file(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => bail!(
            "{} is a symbolic link; {NO_LINKS}: replace it with the file itself",
            path.display()
        ),
        Ok(m) if !m.is_file() => bail!(
            "{} is not a regular file (a directory, FIFO or device): move it away",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Reads a regular file (following links, as reading changes nothing). A FIFO or device is
/// refused instead of blocking or reading for ever.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    check_regular(path)?;
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: &Path) -> Result<String> {
    check_regular(path)?;
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Refuses `path` unless it is a regular file, or a link to one (reading through a link changes
/// nothing): a FIFO or device would block or never end.
pub fn check_regular(path: &Path) -> Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    ensure!(
        meta.is_file(),
        "cannot read {}: it is not a regular file (a directory, FIFO or device)",
        path.display()
    );
    Ok(())
}

/// Opens the regular file `path` for reading and writing in place (created when missing),
/// never through a symbolic link.
pub fn open_in_place(path: &Path) -> Result<std::fs::File> {
    check_file(path)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    let file = options
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    ensure!(
        file.metadata()?.is_file(),
        "{} is not a regular file: move it away",
        path.display()
    );
    Ok(file)
}

/// Removes the entries of `dir` accepted by `ours` that are temporaries of a process no longer
/// running: `…tmp-<pid>` or `…tmp-<pid>-<n>…`, as [`tmp_path`] and the model cache name them
/// (best effort: one that cannot be removed is left for a later try).
pub fn remove_stale_temporaries(dir: &Path, ours: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| ours(n)) else {
            continue;
        };
        let pid = name
            .split_once("tmp-")
            .map(|(_, rest)| rest.split(['-', '.']).next().unwrap_or(""))
            .and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !process_alive(pid)) {
            let _ = remove_path(&entry.path());
        }
    }
}

/// Whether process `pid` is running: `/proc` where there is one, `ps -p` elsewhere; when neither
/// can tell, assume it is (leaving a temporary behind is harmless, removing a live one is not).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    if proc.join("self").exists() {
        return proc.join(pid.to_string()).exists();
    }
    std::process::Command::new("ps")
        .args(["-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_or(true, |s| s.success())
}

/// Removes a file or a directory tree, never following a link; a path already gone is fine
/// (another process did it).
pub fn remove_path(path: &Path) -> std::io::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Refuses `out` unless it is absent or an empty directory: wake2vec writes a new directory and
/// never mixes its files into another's.
pub fn check_new_dir(out: &Path) -> Result<()> {
    if std::fs::symlink_metadata(out).is_ok() {
        let empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_none());
        ensure!(
            empty,
            "{} already exists and is not an empty directory: remove it or choose another --out",
            out.display()
        );
    }
    Ok(())
}

/// `p` made absolute with its links resolved, as far as it exists (the rest appended as is).
fn resolved(p: &Path) -> PathBuf {
    let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut existing = p.as_path();
    let mut rest = Vec::new();
    while std::fs::canonicalize(existing).is_err() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return p,
        }
    }
    let mut out = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
    out.extend(rest.iter().rev());
    out
}

/// Refuses an output directory `out` that is, lies inside, or holds `input` (`what` names it):
/// writing there would change an input or a later run's source without a word.
pub fn check_apart(out: &Path, input: &Path, what: &str) -> Result<()> {
    let (o, i) = (resolved(out), resolved(input));
    ensure!(
        !o.starts_with(&i) && !i.starts_with(&o),
        "--out {} would write {} {}: choose a directory outside it",
        out.display(),
        match (o == i, o.starts_with(&i)) {
            (true, _) => "into",
            (false, true) => "inside",
            (false, false) => "over",
        },
        format_args!("{what} {}", input.display())
    );
    Ok(())
}

/// Creates the new directory `out` (absent or empty, [`check_new_dir`]) by letting `fill` write
/// a temporary sibling that is renamed into place when it succeeds and removed when it fails,
/// so `out` is never half-written.
pub fn create_dir_atomically<T>(out: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    check_new_dir(out)?;
    let tmp = tmp_path(out);
    if let Some(name) = out.file_name() {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        let prefix = format!(".{}.tmp-", name.to_string_lossy());
        remove_stale_temporaries(parent.unwrap_or(Path::new(".")), |n| n.starts_with(&prefix));
    }
    if std::fs::symlink_metadata(&tmp).is_ok() {
        remove_path(&tmp).with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let filled = fill(&tmp).and_then(|value| {
        if out.exists() {
            std::fs::remove_dir(out).ok();
        }
        std::fs::rename(&tmp, out).with_context(|| {
            format!("cannot move the finished directory into {}", out.display())
        })?;
        Ok(value)
    });
    if filled.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    filled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wake2vec-fs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn outputs_stay_apart_from_inputs_through_links() {
        let dir = scratch("apart");
        let model = dir.join("model");
        std::fs::create_dir_all(&model).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&model, dir.join("alias")).unwrap();
        for out in [model.clone(), model.join("run"), dir.clone()] {
            assert!(check_apart(&out, &model, "the model").is_err(), "{out:?}");
        }
        #[cfg(unix)]
        assert!(check_apart(&dir.join("alias/run"), &model, "the model").is_err());
        assert!(check_apart(&dir.join("run"), &model, "the model").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_directory_appears_whole_or_not_at_all() {
        let dir = scratch("atomic");
        let out = dir.join("out");
        let failed = create_dir_atomically(&out, |tmp| -> Result<()> {
            std::fs::write(tmp.join("half"), b"x")?;
            bail!("disk full")
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing left");
        create_dir_atomically(&out, |tmp| Ok(std::fs::write(tmp.join("whole"), b"x")?)).unwrap();
        assert!(out.join("whole").is_file());
        let again = create_dir_atomically(&out, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(again.contains("not an empty directory"), "{again}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
