//! `wake2vec status` through the real binary: on a run the engine itself wrote (tiny model),
//! inside a pipeline directory; on a hand-made run; and the error for a directory that is not a
//! run.

mod common;
use common::{fixture, Scratch};
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_wake2vec");
const WAKE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/finnegans_wake.txt"
);

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run wake2vec")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn status_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["status", dir.to_str().unwrap(), "--json"])).unwrap()
}

#[test]
fn status_of_a_pipeline_whose_p1_the_engine_trained() {
    let Ok(text) = std::fs::read_to_string(WAKE) else {
        eprintln!("skipping: {WAKE} is absent");
        return;
    };
    let tmp = Scratch::new("status-engine");
    let model = tmp.path("model");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    // The last 40 rows of the 400-token fixture are the Wake rows.
    std::fs::write(
        model.join("wake2vec.json"),
        r#"{"format":1,"base_vocab":360,"base_tokenizer_size":360,"wake_start":360,"wake_count":40}"#,
    )
    .unwrap();
    let end = text
        .char_indices()
        .nth(20_000)
        .map_or(text.len(), |(i, _)| i);
    std::fs::write(tmp.path("corpus.txt"), &text[..end]).unwrap();
    let pipe = tmp.path("pipe");
    let p1 = pipe.join("p1");
    ok(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        tmp.path("corpus.txt").to_str().unwrap(),
        "--out",
        p1.to_str().unwrap(),
        "--steps",
        "30",
        "--seq-len",
        "64",
        "--eval-every",
        "10",
        "--eval-blocks",
        "2",
        "--save-every",
        "10",
        "--grad-accum",
        "1",
        "--quiet",
    ]);

    let v = status_json(&pipe);
    assert_eq!(v["kind"], "pipeline");
    assert_eq!(v["current"], serde_json::Value::Null, "{v}");
    let phases = v["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 1);
    let p = &phases[0];
    assert_eq!(p["name"], "p1");
    assert_eq!(p["phase"], "p1");
    assert_eq!(p["configured_steps"], 30);
    assert_eq!(p["eval_every"], 10);
    assert_eq!(p["steps_done"], 30);
    assert_eq!(p["state"], "finished");
    assert_eq!(p["newest_checkpoint"], "step-30");
    assert_eq!(p["last_eval"]["step"], 30);
    assert_eq!(p["eta_s"], 0.0);
    assert!(p["elapsed_s"].as_f64().unwrap() > 0.0);
    assert!(p["s_per_step"].as_f64().unwrap() > 0.0);
    // The picks are evaluated, trained steps, and agree with the log.
    let log = std::fs::read_to_string(p1.join("log.jsonl")).unwrap();
    let evals: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["kind"] == "eval" && l["step"] != 0)
        .collect();
    assert_eq!(evals.len(), 3);
    let best = evals
        .iter()
        .min_by(|a, b| {
            a["val_loss"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["val_loss"].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(p["best_val"]["step"], best["step"]);
    assert_eq!(p["best_val"]["val_loss"], best["val_loss"]);
    let gap_step = p["min_gap"]["step"].as_u64().unwrap();
    assert!([10, 20, 30].contains(&gap_step), "{p}");

    // The run directory on its own, as a table.
    let table = ok(&["status", p1.to_str().unwrap()]);
    assert!(table.contains("(run)"), "{table}");
    assert!(
        table.contains("30/30") && table.contains("finished"),
        "{table}"
    );
    assert!(table.contains("step-30"), "{table}");
}

#[test]
fn status_of_a_hand_made_run_in_progress() {
    let tmp = Scratch::new("status-hand");
    let dir = tmp.path("run");
    std::fs::create_dir_all(dir.join("checkpoints/step-4")).unwrap();
    std::fs::write(
        dir.join("run.toml"),
        "phase = \"p2\"\nsteps = 20\neval_every = 4\n",
    )
    .unwrap();
    let mut log = String::from(
        r#"{"kind":"eval","phase":"p2","step":0,"val_loss":3.5,"val_bpb":1.2,"train_loss":null}"#,
    );
    log.push('\n');
    for s in 1..=5u64 {
        log += &format!(
            "{{\"kind\":\"step\",\"phase\":\"p2\",\"step\":{s},\"loss\":{},\"lr\":0.0001,\"grad_norm\":0.5,\"tokens_per_s\":100.0,\"elapsed_s\":{}}}\n",
            3.0 - s as f64 * 0.1,
            s as f64 * 6.0
        );
        if s == 4 {
            log += "{\"kind\":\"eval\",\"phase\":\"p2\",\"step\":4,\"val_loss\":3.0,\"val_bpb\":1.0,\"train_loss\":2.75}\n";
        }
    }
    std::fs::write(dir.join("log.jsonl"), log).unwrap();
    std::fs::write(
        dir.join("checkpoints/step-4/state.json"),
        r#"{"step":4,"finished":false,"elapsed_s":24.0}"#,
    )
    .unwrap();
    let table = ok(&["status", dir.to_str().unwrap()]);
    for want in [
        "p2 *",
        "in progress",
        "5/20",
        "2.5000",
        "4: 3.0000",
        "4: 0.2500 (3.0000/2.7500)",
        "step-4",
        "30s",
        "1m30s",
        "current: p2",
    ] {
        assert!(table.contains(want), "no {want:?} in\n{table}");
    }
}

#[test]
fn status_of_a_directory_that_is_not_a_run() {
    let tmp = Scratch::new("status-not-run");
    std::fs::write(tmp.path("notes.txt"), "hello").unwrap();
    let out = run(&["status", tmp.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    for want in [
        tmp.0.to_str().unwrap(),
        "is not a run directory",
        "run.toml",
        "p1/",
    ] {
        assert!(line.contains(want), "{line:?} does not say {want:?}");
    }
    assert!(out.stdout.is_empty());

    // A log damaged in the middle is named with its line.
    let dir = tmp.path("run");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("run.toml"), "steps = 10\n").unwrap();
    std::fs::write(
        dir.join("log.jsonl"),
        "{\"kind\":\n{\"kind\":\"step\",\"step\":1}\n",
    )
    .unwrap();
    let out = run(&["status", dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unreadable training log") && stderr.contains("log.jsonl line 1"),
        "{stderr}"
    );
}
