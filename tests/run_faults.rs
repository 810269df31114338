//! A run directory under hostile changes, through the real binary (issue 12): links inside the
//! run are never written through, one writer at a time, the log is never padded, a run resumes
//! only from its own checkpoints, failures leave nothing behind. Each case asserts the one line
//! the tool prints and that no byte outside the run changed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod common;
use common::{log_values, setup, step_lines, wait_for, Scratch};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wake2vec"))
}

/// A 40-step Phase 1 run on the tiny model in `dir/run`: checkpoints every 10 steps (all kept),
/// snapshots every 10. `None` when the corpus is absent.
fn trained_run(dir: &Path, steps: u64) -> Option<PathBuf> {
    setup(dir, "tiny-llama", 300, 100, 30_000)?;
    let run = dir.join("run");
    let out = bin().args(train_args(dir, &run, steps)).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    Some(run)
}

fn train_args(dir: &Path, run: &Path, steps: u64) -> Vec<String> {
    let steps = steps.to_string();
    let (model, corpus) = (dir.join("model"), dir.join("corpus.txt"));
    let args = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        &steps,
        "--seq-len",
        "32",
        "--eval-every",
        "10",
        "--eval-blocks",
        "2",
        "--save-every",
        "10",
        "--snapshot-every",
        "10",
        "--set",
        "keep_last=100",
        "--quiet",
    ];
    args.iter().map(|s| s.to_string()).collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `args`, expects failure without a panic, returns stderr.
fn fails(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    err
}

fn resume(run: &Path, checkpoint: Option<&str>) -> Output {
    let mut cmd = bin();
    cmd.args(["train", "--resume", run.to_str().unwrap(), "--quiet"]);
    if let Some(c) = checkpoint {
        cmd.args(["--checkpoint", c]);
    }
    cmd.output().unwrap()
}

/// Every file under `dir` with its bytes (links recorded as their targets), for before/after.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.push((p, target.to_string_lossy().as_bytes().to_vec()));
            } else if meta.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

/// `train --resume RUN --checkpoint NAME` fails with `expect` and changes nothing in `outside`.
fn refused_resume(run: &Path, checkpoint: &str, outside: &Path, expect: &str) {
    let before = tree(outside);
    let err = fails(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--checkpoint",
        checkpoint,
    ]);
    assert!(err.contains(expect), "{err}");
    assert_eq!(tree(outside), before, "{expect}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn links_inside_a_run_are_refused_and_their_targets_untouched() {
    let t = Scratch::new("faults-links");
    let Some(run) = trained_run(&t.0, 40) else {
        return;
    };
    let outside = t.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let log = std::fs::read(run.join("log.jsonl")).unwrap();
    let values = log_values(&run);

    // The log replaced by a link to a file outside (with the same bytes, so only the link is
    // wrong): resuming would truncate the target.
    let precious = outside.join("precious.txt");
    std::fs::write(&precious, &log).unwrap();
    std::fs::remove_file(run.join("log.jsonl")).unwrap();
    std::os::unix::fs::symlink(&precious, run.join("log.jsonl")).unwrap();
    refused_resume(&run, "step-20", &outside, "log.jsonl is a symbolic link");
    std::fs::remove_file(run.join("log.jsonl")).unwrap();
    std::fs::write(run.join("log.jsonl"), &log).unwrap();

    // checkpoints/ and snapshots/ moved outside and linked back: pruning and snapshots would
    // delete and write there.
    for sub in ["checkpoints", "snapshots"] {
        let moved = outside.join(sub);
        std::fs::rename(run.join(sub), &moved).unwrap();
        std::os::unix::fs::symlink(&moved, run.join(sub)).unwrap();
        refused_resume(
            &run,
            "step-20",
            &outside,
            &format!("{sub} is a symbolic link"),
        );
        std::fs::remove_file(run.join(sub)).unwrap();
        std::fs::rename(&moved, run.join(sub)).unwrap();
    }

    // A checkpoint that is a link to a directory outside is not a checkpoint of the run.
    copy_dir(&run.join("checkpoints/step-40"), &outside.join("step-40"));
    std::fs::remove_dir_all(run.join("checkpoints/step-40")).unwrap();
    std::os::unix::fs::symlink(outside.join("step-40"), run.join("checkpoints/step-40")).unwrap();
    refused_resume(&run, "step-40", &outside, "no checkpoint step-40");
    std::fs::remove_file(run.join("checkpoints/step-40")).unwrap();

    // analysis/ linked outside: analyze refuses instead of overwriting summary.json there.
    let target = outside.join("analysis");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("summary.json"), b"mine").unwrap();
    std::os::unix::fs::symlink(&target, run.join("analysis")).unwrap();
    let before = tree(&outside);
    let err = fails(&["analyze", run.to_str().unwrap(), "--no-figures"]);
    assert!(err.contains("analysis is a symbolic link"), "{err}");
    assert_eq!(tree(&outside), before);

    // With the links gone the run resumes (from step 20, rewriting step 40).
    std::fs::remove_file(run.join("analysis")).unwrap();
    let out = resume(&run, Some("step-20"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(log_values(&run), values);
}

#[test]
fn a_second_writer_is_refused_with_the_holders_pid() {
    let t = Scratch::new("faults-lock");
    if setup(&t.0, "tiny-llama", 300, 100, 30_000).is_none() {
        return;
    }
    let run = t.path("run");
    let mut first = bin()
        .args(train_args(&t.0, &run, 100_000))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&mut first, "step 3", || step_lines(&run) >= 3);
    let err = fails(&["train", "--resume", run.to_str().unwrap(), "--quiet"]);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        err.contains(&format!(
            "in use by another wake2vec process (pid {})",
            first.id()
        )),
        "{err}"
    );
    // The lock died with its holder: the run resumes.
    let mut second = bin()
        .args(["train", "--resume", run.to_str().unwrap(), "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let done = step_lines(&run);
    wait_for(&mut second, "a resumed step", || step_lines(&run) > done);
    second.kill().unwrap();
    second.wait().unwrap();
}

#[test]
fn a_cut_log_is_refused_not_padded() {
    let t = Scratch::new("faults-log");
    let Some(run) = trained_run(&t.0, 40) else {
        return;
    };
    let log = run.join("log.jsonl");
    let full = std::fs::read(&log).unwrap();
    let cut = &full[..full.len() / 2];
    std::fs::write(&log, cut).unwrap();
    let err = fails(&["train", "--resume", run.to_str().unwrap()]);
    assert!(err.contains("shorter than the"), "{err}");
    assert_eq!(std::fs::read(&log).unwrap(), cut, "the log was changed");
    // A log that no longer ends a line where the checkpoint says is refused too.
    let mut changed = full.clone();
    let n = changed.len();
    changed[n - 1] = b' ';
    std::fs::write(&log, &changed).unwrap();
    let err = fails(&["train", "--resume", run.to_str().unwrap()]);
    assert!(err.contains("does not end a line"), "{err}");
    assert_eq!(std::fs::read(&log).unwrap(), changed);
}

#[test]
fn a_run_resumes_only_from_its_own_checkpoints() {
    let t = Scratch::new("faults-other");
    let Some(run) = trained_run(&t.0, 20) else {
        return;
    };
    let other = t.path("other");
    copy_dir(&run, &other);
    let foreign = other.join("checkpoints/step-20");
    let log = std::fs::read(run.join("log.jsonl")).unwrap();
    let err = fails(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--checkpoint",
        foreign.to_str().unwrap(),
    ]);
    assert!(err.contains("is not a checkpoint of the run"), "{err}");
    assert_eq!(std::fs::read(run.join("log.jsonl")).unwrap(), log);
    // Its own checkpoint by path is accepted.
    let own = run.join("checkpoints/step-10");
    let out = resume(&run, Some(own.to_str().unwrap()));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn failures_leave_nothing_behind_and_damage_is_repaired() {
    let t = Scratch::new("faults-leftovers");
    let Some(run) = trained_run(&t.0, 20) else {
        return;
    };
    // A run that fails its set-up (a context longer than the model's) leaves no directory, so
    // the same command with a valid value works.
    let fresh = t.path("fresh");
    let mut args = train_args(&t.0, &fresh, 10);
    let seq = args.iter().position(|a| a == "--seq-len").unwrap();
    args[seq + 1] = "1024".into();
    let out = bin().args(&args).output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("exceeds the model's context"),
        "{}",
        stderr(&out)
    );
    assert!(!fresh.exists(), "a failed start left {}", fresh.display());
    let out = bin().args(train_args(&t.0, &fresh, 10)).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // A temporary snapshot left by a kill is removed on resume; a damaged later checkpoint is
    // rewritten when training passes it again.
    let leftover = run.join("snapshots/.step-20.safetensors.tmp-4000000");
    std::fs::write(&leftover, b"half").unwrap();
    let params = run.join("checkpoints/step-20/params.safetensors");
    let good = std::fs::read(&params).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 0x40;
    std::fs::write(&params, &bad).unwrap();
    let out = resume(&run, Some("step-10"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!leftover.exists(), "the temporary snapshot stayed");
    assert_eq!(std::fs::read(&params).unwrap(), good);
}

#[test]
fn status_refuses_a_fifo_and_analyze_another_vocabulary() {
    let t = Scratch::new("faults-fifo");
    let Some(run) = trained_run(&t.0, 10) else {
        return;
    };
    // The run's base has 300 rows; the tiny Qwen2's 408 are another vocabulary.
    let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2");
    let err = fails(&[
        "analyze",
        run.to_str().unwrap(),
        "--pre",
        other.to_str().unwrap(),
        "--no-figures",
    ]);
    assert!(
        err.contains("--pre must be the base model or the injected model"),
        "{err}"
    );
    let log = run.join("log.jsonl");
    std::fs::remove_file(&log).unwrap();
    let c = std::ffi::CString::new(log.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; mkfifo has no other preconditions.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let mut child = bin()
        .args(["status", run.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("status hangs on a FIFO");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(err.contains("not a regular file"), "{err}");
    std::fs::remove_file(&log).unwrap();
}
