//! `wake2vec run` on the tiny Llama fixture: the whole pipeline (inject, Phases 1–3, export,
//! analysis, samples, report), killed with SIGKILL inside Phase 1 and again across the boundary
//! into Phase 2, resumed each time, ends with the same logs, final weights and samples as an
//! uninterrupted run. Also Phase 2's first evaluation equals the Phase 1 checkpoint it starts
//! from, and Phase 2 leaves the Wake rows bit-identical.

mod common;

use common::{fixture, log_values, step_lines, wait_for, Scratch};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/");

/// A pipeline file for the tiny model with a 1,500-word lexicon and 40,000 characters of the
/// Wake; `None` when the data is absent.
fn setup(dir: &Path) -> Option<PathBuf> {
    let (Ok(text), Ok(lexicon)) = (
        std::fs::read_to_string(format!("{SHARED}finnegans_wake.txt")),
        std::fs::read_to_string(format!("{SHARED}wake_lexicon.txt")),
    ) else {
        eprintln!("skipping: the shared data is absent");
        return None;
    };
    let end = text
        .char_indices()
        .nth(40_000)
        .map_or(text.len(), |(i, _)| i);
    std::fs::write(dir.join("corpus.txt"), &text[..end]).unwrap();
    let words: Vec<&str> = lexicon.lines().take(1500).collect();
    std::fs::write(dir.join("lexicon.txt"), words.join("\n")).unwrap();
    let phase = "seq_len = 32\nsteps = 12\ngrad_accum = 2\neval_every = 4\neval_blocks = 3\nsave_every = 4\nkeep_last = 2\n";
    let config = format!(
        r#"model = "{model}"
corpus = "corpus.txt"
lexicon = "lexicon.txt"
[inject]
init = "mean-noise"
[p1]
{phase}lr = 1e-2
snapshot_every = 4
[p2]
{phase}batch_size = 2
lr = 1e-3
source = {{ select = "best-val" }}
[p3]
{phase}batch_size = 2
lr = 1e-3
source = {{ select = "min-gap" }}
[finish]
max_new_tokens = 12
"#,
        model = fixture("tiny-llama").display()
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, config).unwrap();
    Some(path)
}

fn bin(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wake2vec"));
    c.current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

#[test]
fn pipeline_killed_across_a_phase_boundary_resumes_to_the_same_results() {
    let t = Scratch::new("pipeline");
    let Some(config) = setup(&t.0) else { return };
    let config = config.to_str().unwrap();
    let status = bin(&t.0)
        .args(["run", config, "--out", "reference", "--quiet"])
        .status()
        .unwrap();
    assert!(status.success());
    let reference = t.path("reference");
    for f in [
        "final/model.safetensors",
        "analysis/summary.json",
        "samples.jsonl",
        "report.html",
    ] {
        assert!(reference.join(f).is_file(), "{f} missing");
    }

    // Checkpoint writes slowed down so the kills land inside the phases.
    let killed = t.path("killed");
    let spawn = |args: &[&str]| {
        bin(&t.0)
            .args(args)
            .env("WAKE2VEC_TEST_CHECKPOINT_DELAY_MS", "30")
            .spawn()
            .unwrap()
    };
    let mut child = spawn(&["run", config, "--out", "killed", "--quiet"]);
    wait_for(&mut child, "phase 1 step 6", || {
        step_lines(&killed.join("p1")) >= 6
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let resume = ["run", "--resume", "killed", "--quiet"];
    let mut child = spawn(&resume);
    wait_for(&mut child, "phase 2 step 1", || {
        step_lines(&killed.join("p2")) >= 1
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(spawn(&resume).wait().unwrap().success());

    for phase in ["p1", "p2", "p3"] {
        let (a, b) = (
            log_values(&reference.join(phase)),
            log_values(&killed.join(phase)),
        );
        assert_eq!(a.len(), b.len(), "{phase}: log lengths differ");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x, y, "{phase}: log line {i} differs");
        }
    }
    for f in ["final/model.safetensors", "samples.jsonl"] {
        let (a, b) = (
            std::fs::read(reference.join(f)).unwrap(),
            std::fs::read(killed.join(f)).unwrap(),
        );
        assert!(a == b, "{f} differs");
    }

    // Phase 2 starts where its Phase 1 checkpoint ended: same validation loss at step 0.
    let p2 = wake2vec::train::TrainConfig::load(&reference.join("p2/run.toml")).unwrap();
    let chosen = p2.source.step.unwrap();
    let val = |phase: &str, step: u64| {
        log_values(&reference.join(phase))
            .into_iter()
            .find(|v| v["kind"] == "eval" && v["step"] == step)
            .map(|v| v["val_loss"].as_f64().unwrap())
            .unwrap()
    };
    assert_eq!(val("p1", chosen), val("p2", 0));
    // Phase 3's log has every component at every step, and its evaluation stays LM-only.
    let p3 = log_values(&reference.join("p3"));
    let step = p3.iter().find(|v| v["kind"] == "step").unwrap();
    for k in ["morph", "rep", "norm", "device"] {
        assert!(
            step["aux"][k].is_number(),
            "p3 step line lacks aux.{k}: {step}"
        );
    }
    let p3_chosen = wake2vec::train::TrainConfig::load(&reference.join("p3/run.toml"))
        .unwrap()
        .source
        .step
        .unwrap();
    assert_eq!(val("p2", p3_chosen), val("p3", 0));
}

#[test]
fn phase_2_keeps_the_wake_rows_and_exports_peft_and_merged_models() {
    let t = Scratch::new("pipeline-export");
    let Some(config) = setup(&t.0) else { return };
    let status = bin(&t.0)
        .args(["run", config.to_str().unwrap(), "--out", "out", "--quiet"])
        .args([
            "--set",
            "finish.samples=false",
            "--set",
            "finish.report=false",
        ])
        .args(["--set", "finish.analysis=false"])
        .args(["--set", &format!("control={SHARED}dubliners.txt")])
        .args(["--set", "control_segments=3"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = t.path("out");
    // Forgetting on the control text: Phase 1 leaves the base distribution alone (all its
    // change is mass moved onto the new rows); the adapters of Phases 2 and 3 move it.
    let control = wake2vec::infer::control::ControlReport::load(&out.join("control.json")).unwrap();
    let stages: Vec<&str> = control.rows.iter().map(|r| r.stage.as_str()).collect();
    assert_eq!(stages, ["base", "injected", "p1", "p2", "final"]);
    assert!(control.rows[0].kl.is_none() && control.segments == 3);
    for r in &control.rows {
        assert!(r.bpb.bits_per_byte.is_finite() && r.bpb.bits_per_byte > 0.0);
        assert!(r.bpb.bytes > 500, "{r:?}");
    }
    for r in &control.rows[1..3] {
        let kl = r.kl.as_ref().unwrap();
        assert!(
            kl.kl_base_vocab < 1e-6,
            "{}: KL {}",
            r.stage,
            kl.kl_base_vocab
        );
        assert!(kl.moved_mass > 0.0);
    }
    for r in &control.rows[3..] {
        let kl = r.kl.as_ref().unwrap();
        assert!(
            kl.kl_base_vocab > 1e-6,
            "{}: KL {}",
            r.stage,
            kl.kl_base_vocab
        );
    }
    assert_ne!(
        control.rows[0].bpb, control.rows[1].bpb,
        "injection changed nothing"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".export"))
        .collect();
    assert!(leftovers.is_empty(), "temporary exports left behind");
    let export = |run: &str, checkpoint: &str, dest: &str, merge: bool| {
        let mut c = bin(&t.0);
        c.args(["export", out.join(run).to_str().unwrap(), "--out", dest]);
        c.args(["--checkpoint", checkpoint]);
        if merge {
            c.arg("--merge");
        }
        assert!(c.status().unwrap().success(), "export {checkpoint} failed");
        t.path(dest)
    };
    let cpu = candle_core::Device::Cpu;
    let load = |d: &Path| wake2vec::hub::weights::load_dir(d, &cpu).unwrap();
    let bits = |t: &candle_core::Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    // The unmerged Phase 2 export: the Phase 1 rows it started from, the adapters apart.
    let p2 = wake2vec::train::TrainConfig::load(&out.join("p2/run.toml")).unwrap();
    let p1 = export(
        "p1",
        &format!("step-{}", p2.source.step.unwrap()),
        "p1",
        false,
    );
    let plain = export("p2", "last", "p2-plain", false);
    let merged = export("p2", "last", "p2-merged", true);
    assert!(plain.join("adapter/adapter_config.json").is_file());
    assert!(plain.join("adapter/adapter_model.safetensors").is_file());
    assert!(!merged.join("adapter").exists());
    let (a, b) = (load(&plain), load(&merged));
    let key = "model.embed_tokens.weight";
    assert_eq!(
        bits(&load(&p1)[key]),
        bits(&a[key]),
        "phase 2 moved the Wake rows"
    );
    assert_eq!(
        bits(&a[key]),
        bits(&b[key]),
        "merging touched the embedding"
    );
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_ne!(bits(&a[q]), bits(&b[q]), "the merged q_proj did not change");
    let o = "model.layers.0.self_attn.o_proj.weight";
    assert_eq!(
        bits(&a[o]),
        bits(&b[o]),
        "o_proj is not a target but changed"
    );
}
