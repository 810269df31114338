//! Phase 1 on the tiny fixtures: exact resume through SIGKILL and Ctrl-C, frozen weights stay
//! bit-identical, faults (kill during a checkpoint write, a full disk, a corrupt checkpoint, a
//! NaN loss), and the end-to-end gradient of the Wake rows against finite differences.
//!
//! The fixtures have no wake2vec.json; each test copies one into a temporary directory and
//! declares its last rows Wake rows.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use wake2vec::train::{TrainConfig, Trainer};

mod common;
use common::{log_values, setup, step_lines, wait_for};

/// A temporary directory removed on drop.
struct Temp(PathBuf);

impl Temp {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("w2v-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Temp(p)
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wake2vec"))
}

/// The settings of the process-level tests: about a second of training on the tiny model.
fn train_args(dir: &Path, out: &str) -> Vec<String> {
    [
        "train",
        "--model",
        dir.join("model").to_str().unwrap(),
        "--corpus",
        dir.join("corpus.txt").to_str().unwrap(),
        "--out",
        dir.join(out).to_str().unwrap(),
        "--steps",
        "240",
        "--seq-len",
        "64",
        "--grad-accum",
        "3",
        "--lr",
        "1e-2",
        "--eval-every",
        "20",
        "--eval-blocks",
        "4",
        "--save-every",
        "15",
        "--snapshot-every",
        "10",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn assert_same_log(a: &Path, b: &Path) {
    let (la, lb) = (log_values(a), log_values(b));
    assert_eq!(la.len(), lb.len(), "log lengths differ");
    for (i, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert_eq!(x, y, "log line {i} differs");
    }
}

#[test]
fn sigkill_at_several_points_then_resume_gives_the_same_log_bit_for_bit() {
    let t = Temp::new("resume-kill");
    if setup(&t.0, "tiny-llama", 300, 100, 60_000).is_none() {
        return;
    }
    run_ok(bin().args(train_args(&t.0, "reference")));
    let run = t.0.join("killed");
    kill_and_resume(&train_args(&t.0, "killed"), &run, &[37, 101, 170]);
    assert_same_log(&t.0.join("reference"), &run);
    assert_same_final_checkpoint(&t.0.join("reference"), &run, 240);
}

/// The same with bf16 frozen weights (the generic kernels on the CPU).
#[test]
fn sigkill_then_resume_gives_the_same_log_bit_for_bit_with_bf16_weights() {
    let t = Temp::new("resume-kill-bf16");
    if setup(&t.0, "tiny-llama", 300, 100, 60_000).is_none() {
        return;
    }
    let args = |out: &str| {
        let mut a = train_args(&t.0, out);
        a.extend(["--dtype".to_string(), "bf16".to_string()]);
        a
    };
    run_ok(bin().args(args("reference")));
    let run = t.0.join("killed");
    kill_and_resume(&args("killed"), &run, &[37, 101, 170]);
    assert_same_log(&t.0.join("reference"), &run);
    assert_same_final_checkpoint(&t.0.join("reference"), &run, 240);
    let toml = std::fs::read_to_string(run.join("run.toml")).unwrap();
    assert!(toml.contains("dtype = \"bf16\""), "{toml}");
}

/// Starts `wake2vec <args>` writing `run`, SIGKILLs it once its log reaches each target step and
/// resumes it, then waits for the last resume to finish successfully.
fn kill_and_resume(args: &[String], run: &Path, targets: &[usize]) {
    let spawn = |args: &[&str]| {
        bin()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    for &target in targets {
        wait_for(&mut child, &format!("step {target}"), || {
            step_lines(run) >= target
        });
        child.kill().unwrap();
        child.wait().unwrap();
        child = spawn(&["train", "--resume", run.to_str().unwrap(), "--quiet"]);
    }
    assert!(child.wait().unwrap().success(), "the last resume failed");
}

/// The final checkpoints of two runs hold the same parameter and optimizer-state bytes.
fn assert_same_final_checkpoint(a: &Path, b: &Path, step: u64) {
    for f in ["params.safetensors", "optimizer.safetensors"] {
        let at = |run: &Path| std::fs::read(run.join(format!("checkpoints/step-{step}/{f}")));
        assert!(
            at(a).unwrap() == at(b).unwrap(),
            "{f} of the final checkpoint differs: {} vs {}",
            a.display(),
            b.display()
        );
    }
}

/// `train_rows = "all"` (the seed's Phase 1 as run): SIGKILL and resume give the same log and
/// final checkpoint bit for bit; the export's base rows moved, every other weight is unchanged;
/// `analyze` of the run reports the base rows' drift from the run's model.
fn every_row_trains_and_resumes_exactly(fixture: &str) {
    let t = Temp::new(&format!("all-rows-{fixture}"));
    if setup(&t.0, fixture, 300, 100, 30_000).is_none() {
        return;
    }
    let args = |out: &str| {
        let mut a = train_args(&t.0, out);
        let steps = a.iter().position(|x| x == "--steps").unwrap() + 1;
        a[steps] = "60".into();
        a.extend(["--set".into(), "train_rows=all".into()]);
        a
    };
    run_ok(bin().args(args("reference")));
    let run = t.0.join("killed");
    kill_and_resume(&args("killed"), &run, &[23, 41]);
    assert_same_log(&t.0.join("reference"), &run);
    assert_same_final_checkpoint(&t.0.join("reference"), &run, 60);
    let out = t.0.join("exported");
    run_ok(bin().args([
        "export",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let cpu = candle_core::Device::Cpu;
    let before = wake2vec::hub::weights::load_dir(&t.0.join("model"), &cpu).unwrap();
    let after = wake2vec::hub::weights::load_dir(&out, &cpu).unwrap();
    let values = |t: &candle_core::Tensor| -> Vec<f32> {
        let t = t.to_dtype(candle_core::DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    for (name, b) in &before {
        let (xb, xa) = (values(b), values(&after[name]));
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            let cols = b.dim(1).unwrap();
            let row = |x: &[f32], i: usize| x[i * cols..(i + 1) * cols].to_vec();
            let moved = |r: std::ops::Range<usize>| {
                let n = r.len();
                (r.filter(|&i| row(&xb, i) != row(&xa, i)).count(), n)
            };
            for (part, range, least) in [("base", 0..300, 50), ("Wake", 300..400, 50)] {
                let (m, n) = moved(range);
                assert!(m > least, "{fixture} {name}: {m} of {n} {part} rows moved");
            }
        } else {
            assert!(xb == xa, "{fixture}: {name} changed");
        }
    }
    let analysis = t.0.join("analysis");
    run_ok(bin().args([
        "analyze",
        run.to_str().unwrap(),
        "--out",
        analysis.to_str().unwrap(),
        "--no-figures",
    ]));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(analysis.join("summary.json")).unwrap()).unwrap();
    let drift = &summary["drift"];
    assert_eq!(drift["base"]["n"], 300, "{fixture}: {drift}");
    let base_cos = drift["base"]["cos"]["mean"].as_f64().unwrap();
    assert!(
        base_cos < 1.0 - 1e-6,
        "{fixture}: base rows' mean cosine to the run's model {base_cos}"
    );
}

#[test]
fn every_row_trains_and_resumes_exactly_untied() {
    every_row_trains_and_resumes_exactly("tiny-llama");
}

#[test]
fn every_row_trains_and_resumes_exactly_tied() {
    every_row_trains_and_resumes_exactly("tiny-qwen2");
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly_and_resume_continues_exactly() {
    let t = Temp::new("resume-sigint");
    if setup(&t.0, "tiny-llama", 300, 100, 60_000).is_none() {
        return;
    }
    run_ok(bin().args(train_args(&t.0, "reference")));
    let run = t.0.join("interrupted");
    let mut child = bin()
        .args(train_args(&t.0, "interrupted"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&mut child, "step 52", || step_lines(&run) >= 52);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit status {} ({stderr})",
        out.status
    );
    assert!(
        stderr.contains("interrupted: checkpoint of step"),
        "{stderr}"
    );
    let saved: u64 = stderr
        .split("checkpoint of step ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.trim_end_matches(';').parse().ok())
        .unwrap();
    assert!((52..240).contains(&saved), "saved step {saved}");
    assert!(run.join(format!("checkpoints/step-{saved}")).is_dir());
    run_ok(bin().args(["train", "--resume", run.to_str().unwrap(), "--quiet"]));
    assert_same_log(&t.0.join("reference"), &run);
    // The finished run exports a loadable model directory.
    let out = t.0.join("exported");
    run_ok(bin().args([
        "export",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--checkpoint",
        "best",
    ]));
    let m = wake2vec::model::LoadedModel::load(&out).unwrap();
    assert_eq!(m.model.embed.dim(0).unwrap(), 400);
    assert!(out.join("wake2vec.json").is_file());
}

#[test]
fn kill_during_a_checkpoint_write_leaves_the_previous_one_loadable() {
    let t = Temp::new("kill-write");
    if setup(&t.0, "tiny-llama", 300, 100, 60_000).is_none() {
        return;
    }
    run_ok(bin().args(train_args(&t.0, "reference")));
    let run = t.0.join("killed");
    let ckpts = run.join("checkpoints");
    let mut child = bin()
        .args(train_args(&t.0, "killed"))
        .env("WAKE2VEC_TEST_CHECKPOINT_DELAY_MS", "400")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a finished checkpoint, then for the next write to be half done.
    let partial = || {
        std::fs::read_dir(&ckpts)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(".step-"))
            .filter(|e| e.path().join("params.safetensors").is_file())
            .map(|e| e.path())
    };
    wait_for(&mut child, "a finished checkpoint", || {
        ckpts.join("step-15").is_dir()
    });
    wait_for(&mut child, "a half-written checkpoint", || {
        partial().is_some()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let half = partial().expect("the half-written checkpoint is there");
    assert!(!half.join("checksums.json").exists());
    // Every finished checkpoint still loads.
    let finished: Vec<_> = std::fs::read_dir(&ckpts)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .collect();
    assert!(!finished.is_empty());
    for e in &finished {
        wake2vec::train::checkpoint::load(&e.path()).unwrap();
    }
    run_ok(bin().args(["train", "--resume", run.to_str().unwrap(), "--quiet"]));
    assert!(!half.exists(), "the partial checkpoint was not cleaned up");
    assert_same_log(&t.0.join("reference"), &run);
}

#[test]
fn a_corrupt_checkpoint_is_detected_on_resume_with_a_clear_message() {
    let t = Temp::new("corrupt");
    if setup(&t.0, "tiny-llama", 300, 100, 60_000).is_none() {
        return;
    }
    let mut args = train_args(&t.0, "run");
    args.extend(["--steps".into(), "30".into()]);
    run_ok(bin().args(&args));
    let p = t.0.join("run/checkpoints/step-30/optimizer.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let out = bin()
        .args(["train", "--resume", t.0.join("run").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("optimizer.safetensors is corrupt") && err.contains("CRC-32"),
        "{err}"
    );
    assert!(
        err.contains("--checkpoint") && err.contains("step-15"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    // The older checkpoint it names works.
    run_ok(bin().args([
        "train",
        "--resume",
        t.0.join("run").to_str().unwrap(),
        "--checkpoint",
        "step-15",
        "--quiet",
    ]));
}

#[test]
fn a_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint() {
    let t = Temp::new("full-disk");
    if setup(&t.0, "tiny-llama", 300, 100, 60_000).is_none() {
        return;
    }
    let mnt = t.0.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=1M",
            "tmpfs",
            mnt.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipping: cannot mount a small tmpfs (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let mut args = train_args(&t.0, "unused");
    let out_at = args.iter().position(|a| a == "--out").unwrap();
    args[out_at + 1] = mnt.join("run").to_str().unwrap().to_string();
    args.extend(
        [
            "--save-every",
            "2",
            "--snapshot-every",
            "0",
            "--set",
            "keep_last=1000",
        ]
        .map(String::from),
    );
    let out = bin().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the run should fail on the full disk"
    );
    assert!(err.contains("No space left on device"), "{err}");
    let last = err.trim().lines().last().unwrap();
    assert!(last.starts_with("error: cannot write checkpoint"), "{err}");
    assert!(last.contains("--resume"), "{err}");
    let run = wake2vec::run::dir::RunDir::new(mnt.join("run"));
    let ckpts = run.checkpoints();
    let list = run.list_checkpoints();
    let (_, newest) = list.last().expect("some checkpoints were written");
    wake2vec::train::checkpoint::load(newest).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&ckpts)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".step-"))
        .collect();
    assert!(leftovers.is_empty(), "a partial checkpoint was left behind");
}

#[test]
fn a_nan_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint() {
    let t = Temp::new("nan");
    if setup(&t.0, "tiny-qwen2", 300, 100, 60_000).is_none() {
        return;
    }
    let mut args = train_args(&t.0, "run");
    // Huge steps blow the Wake rows up until the logits overflow.
    args.extend([
        "--lr".into(),
        "1e36".into(),
        "--warmup-steps".into(),
        "1".into(),
    ]);
    args.extend(["--save-every".into(), "1".into()]);
    let out = bin().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("training loss is NaN") || err.contains("is inf"),
        "{err}"
    );
    assert!(err.contains("last good checkpoint"), "{err}");
    let list = wake2vec::run::dir::RunDir::new(t.0.join("run")).list_checkpoints();
    let (_, newest) = list.last().expect("a checkpoint before the NaN");
    let ckpt = wake2vec::train::checkpoint::load(newest).unwrap();
    assert!(ckpt.params["wake_embed"].1.iter().all(|x| x.is_finite()));
}

/// Trains a few steps in-process and returns the trainer.
fn train_in_process(dir: &Path, steps: u64) -> Trainer {
    let config = TrainConfig::resolve(
        None,
        None,
        &[
            format!("model={:?}", dir.join("model").to_str().unwrap()),
            format!("corpus={:?}", dir.join("corpus.txt").to_str().unwrap()),
            format!("steps={steps}"),
            "seq_len=32".into(),
            "grad_accum=2".into(),
            "lr=1e-2".into(),
            "eval_every=0".into(),
            "eval_blocks=2".into(),
            "snapshot_every=0".into(),
        ],
    )
    .unwrap();
    let mut t = Trainer::start(config, &dir.join("run")).unwrap();
    t.progress = false;
    t.run().unwrap();
    t
}

fn frozen_check(fixture: &str, wake_end_below_rows: bool) {
    let t = Temp::new(&format!("frozen-{fixture}"));
    if setup(&t.0, fixture, 300, 100, 30_000).is_none() {
        return;
    }
    let trainer = train_in_process(&t.0, 8);
    let out = t.0.join("trained");
    wake2vec::train::export::export(trainer.run.root(), trainer.step_done(), &out, false).unwrap();
    let cpu = candle_core::Device::Cpu;
    let before = wake2vec::hub::weights::load_dir(&t.0.join("model"), &cpu).unwrap();
    let after = wake2vec::hub::weights::load_dir(&out, &cpu).unwrap();
    assert_eq!(before.len(), after.len());
    let bits = |t: &candle_core::Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    let mut matrices_with_wake_rows = 0;
    for (name, b) in &before {
        let a = &after[name];
        let (xb, xa) = (bits(b), bits(a));
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            matrices_with_wake_rows += 1;
            let cols = b.dim(1).unwrap();
            let rows = b.dim(0).unwrap();
            assert_eq!(rows > 400, wake_end_below_rows);
            assert_eq!(
                xb[..300 * cols],
                xa[..300 * cols],
                "{name}: base rows changed"
            );
            assert_eq!(
                xb[400 * cols..],
                xa[400 * cols..],
                "{name}: rows after the Wake changed"
            );
            let moved = (300..400)
                .filter(|r| xb[r * cols..(r + 1) * cols] != xa[r * cols..(r + 1) * cols])
                .count();
            assert!(moved > 50, "{name}: only {moved} of 100 Wake rows moved");
        } else {
            assert!(xb == xa, "{name} changed");
        }
    }
    // The tied fixture has one matrix with Wake rows, the untied one two.
    let untied = before.contains_key("lm_head.weight");
    assert_eq!(matrices_with_wake_rows, if untied { 2 } else { 1 });
}

#[test]
fn frozen_is_frozen_tied_head_with_padded_rows() {
    frozen_check("tiny-qwen2", true);
}

#[test]
fn frozen_is_frozen_untied_head() {
    frozen_check("tiny-llama", false);
}

/// The Wake-row gradient of the whole training loss (embedding lookup, 2 blocks, head, fused
/// cross-entropy) against central differences along random directions, tied and untied.
/// `every_row`: the block is the whole embedding (and head), as `train_rows = "all"` trains it.
fn end_to_end_gradient(fixture: &str, every_row: bool) {
    use candle_core::{Tensor, Var};
    use wake2vec::train::wake_rows::WakeRows;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let model = wake2vec::model::Llama::load(&dir, &candle_core::Device::Cpu).unwrap();
    let (start, count) = if every_row {
        (0, model.embed.dim(0).unwrap())
    } else {
        (300usize, 100usize)
    };
    let embed = Var::from_tensor(&model.embed.narrow(0, start, count).unwrap()).unwrap();
    let head = model
        .lm_head
        .as_ref()
        .map(|h| Var::from_tensor(&h.narrow(0, start, count).unwrap()).unwrap());
    // Two blocks mixing base and Wake ids.
    let block: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % 400).collect();
    let block2: Vec<u32> = (0..24u32).map(|i| (i * 53 + 301) % 400).collect();
    assert!(block.iter().chain(&block2).any(|&i| i >= 300));
    let loss = |e: &Tensor, h: Option<&Tensor>| -> f64 {
        let wake = WakeRows {
            start,
            embed: e.clone(),
            head: h.cloned(),
            sink: None,
        };
        wake2vec::train::step::batch_loss(&model, &[&block, &block2], Some(&wake), None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let wake = WakeRows {
        start,
        embed: embed.as_tensor().clone(),
        head: head.as_ref().map(|h| h.as_tensor().clone()),
        sink: None,
    };
    let l =
        wake2vec::train::step::batch_loss(&model, &[&block, &block2], Some(&wake), None).unwrap();
    // The training loss equals the inference forward's on the same (unchanged) weights.
    let reference: f64 = [&block, &block2]
        .iter()
        .map(|b| {
            let lp = wake2vec::infer::score::logprobs(&model, b).unwrap();
            -lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64
        })
        .sum::<f64>()
        / 2.0;
    let l_val = l.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (l_val - reference).abs() < 1e-5,
        "training loss {l_val} vs inference {reference}"
    );
    let grads = l.backward().unwrap();
    // The engine's path (gradients into buffers, bypassing candle's store) gives the same.
    let sink =
        wake2vec::train::wake_rows::GradSink::new(count, model.config.hidden_size, head.is_some());
    let fast = WakeRows {
        sink: Some(sink.clone()),
        ..wake.clone()
    };
    let lf =
        wake2vec::train::step::batch_loss(&model, &[&block, &block2], Some(&fast), None).unwrap();
    assert_eq!(
        lf.to_scalar::<f32>().unwrap(),
        l.to_scalar::<f32>().unwrap()
    );
    let gf = lf.backward().unwrap();
    sink.collect_inputs(&gf).unwrap();
    let mut pairs = vec![(&embed, sink.embed.clone())];
    if let (Some(h), Some(s)) = (&head, &sink.head) {
        pairs.push((h, s.clone()));
    }
    for (var, buf) in pairs {
        let slow: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let fast = buf.lock().unwrap().clone();
        for (a, b) in slow.iter().zip(&fast) {
            assert!(
                (a - b).abs() <= 1e-6 + 1e-5 * a.abs(),
                "{fixture}: store {a} vs sink {b}"
            );
        }
    }
    let mut vars = vec![&embed];
    vars.extend(head.as_ref());
    for (k, var) in vars.iter().enumerate() {
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(g.iter().any(|&x| x != 0.0));
        for seed in 0..3u64 {
            let mut rng = wake2vec::util::rng::Rng::new(100 + seed);
            let u: Vec<f32> = (0..g.len()).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let dir: f64 = g.iter().zip(&u).map(|(g, u)| (g * u) as f64).sum();
            // f32 losses carry ~1e-6 of rounding noise: the head block's small directional
            // derivative needs a larger step; the embedding block's (through the whole network)
            // a smaller one to stay linear.
            let eps = if k == 0 { 2e-3f32 } else { 1e-2 };
            let shifted = |s: f32| {
                let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                let v: Vec<f32> = base.iter().zip(&u).map(|(x, u)| x + s * u).collect();
                Tensor::from_vec(
                    v,
                    (count, model.config.hidden_size),
                    &candle_core::Device::Cpu,
                )
                .unwrap()
            };
            let at = |s: f32| {
                let t = shifted(s);
                match (k, &head) {
                    (0, h) => loss(&t, h.as_ref().map(|h| h.as_tensor())),
                    (_, _) => loss(embed.as_tensor(), Some(&t)),
                }
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let err = (fd - dir).abs() / dir.abs().max(1e-4);
            assert!(
                err < 2e-2,
                "{fixture} param {k}: analytic {dir} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn wake_row_gradient_matches_finite_differences_tied() {
    end_to_end_gradient("tiny-qwen2", false);
}

#[test]
fn every_row_gradient_matches_finite_differences_tied() {
    end_to_end_gradient("tiny-qwen2", true);
}

#[test]
fn every_row_gradient_matches_finite_differences_untied() {
    end_to_end_gradient("tiny-llama", true);
}

#[test]
fn wake_row_gradient_matches_finite_differences_untied() {
    end_to_end_gradient("tiny-llama", false);
}

#[test]
fn early_stopping_state_survives_a_resume() {
    let t = Temp::new("early-stop");
    if setup(&t.0, "tiny-llama", 300, 100, 30_000).is_none() {
        return;
    }
    // A learning rate this large makes the validation loss rise from the first update, so
    // patience 2 stops the run at the second evaluation after step 0.
    let args = |out: &str| {
        let mut a = train_args(&t.0, out);
        a.extend(
            [
                "--seq-len",
                "32",
                "--grad-accum",
                "1",
                "--lr",
                "3.0",
                "--warmup-steps",
                "1",
                "--eval-every",
                "5",
                "--save-every",
                "5",
                "--patience",
                "2",
            ]
            .map(String::from),
        );
        a
    };
    let out = run_ok(bin().args(args("a")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("early stop at step 10"), "{stderr}");
    // Resume a copy from step 5, where one bad evaluation is already counted: it must stop at
    // the same step with the same log (a reset counter would run on).
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.0.join("a/checkpoints/step-5/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["early"]["bad_evals"], 1);
    let b = t.0.join("b");
    std::fs::create_dir_all(b.join("checkpoints")).unwrap();
    for f in ["run.toml", "log.jsonl"] {
        std::fs::copy(t.0.join("a").join(f), b.join(f)).unwrap();
    }
    let src = t.0.join("a/checkpoints/step-5");
    std::fs::create_dir_all(b.join("checkpoints/step-5")).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        std::fs::copy(e.path(), b.join("checkpoints/step-5").join(e.file_name())).unwrap();
    }
    let out = run_ok(bin().args(["train", "--resume", b.to_str().unwrap(), "--quiet"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("early stop at step 10"), "{stderr}");
    assert_same_log(&t.0.join("a"), &b);
}
