//! `wake2vec compare` on two short pipelines of the tiny Llama fixture with different inits:
//! compare.json holds the runs' own records (final and best validation bits per byte from the
//! logs, control.json, summary.json, samples.jsonl), a model directory is shown with its gaps
//! and `--analyze` fills its geometry, and bad input ends in one line with nothing written.

mod common;

use common::{fixture, Scratch};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/");

/// The corpus, lexicon and control text in `dir` and a pipeline file per init scheme; `false`
/// when the shared data is absent.
fn setup(dir: &Path, inits: &[&str]) -> bool {
    let read = |f: &str| std::fs::read_to_string(format!("{SHARED}{f}"));
    let (Ok(text), Ok(lexicon), Ok(control)) = (
        read("finnegans_wake.txt"),
        read("wake_lexicon.txt"),
        read("dubliners.txt"),
    ) else {
        eprintln!("skipping: the shared data is absent");
        return false;
    };
    let head = |t: &str, n: usize| t.chars().take(n).collect::<String>();
    std::fs::write(dir.join("corpus.txt"), head(&text, 30_000)).unwrap();
    std::fs::write(dir.join("control.txt"), head(&control, 8_000)).unwrap();
    let words: Vec<&str> = lexicon.lines().take(800).collect();
    std::fs::write(dir.join("lexicon.txt"), words.join("\n")).unwrap();
    let phase = "seq_len = 32\nsteps = 6\ngrad_accum = 1\neval_every = 3\neval_blocks = 2\nsave_every = 3\nlr = 1e-2\n";
    for init in inits {
        let config = format!(
            "model = \"{model}\"\ncorpus = \"corpus.txt\"\nlexicon = \"lexicon.txt\"\n\
             control = \"control.txt\"\ncontrol_segments = 2\n[inject]\ninit = \"{init}\"\n\
             [p1]\n{phase}snapshot_every = 3\n[p2]\n{phase}\n[p3]\n{phase}\n\
             [finish]\nmax_new_tokens = 8\n",
            model = fixture("tiny-llama").display()
        );
        std::fs::write(dir.join(format!("{init}.toml")), config).unwrap();
    }
    true
}

fn wake2vec(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wake2vec"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The `field` of every eval line of a run's log.
fn evals(run: &Path, field: &str) -> Vec<f64> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "eval")
        .map(|v| v[field].as_f64().unwrap())
        .collect()
}

/// One line on stderr starting `error:` and naming `names`; no `--out` written.
fn refused(out: &Output, names: &str, dest: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains(names), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!dest.exists(), "{} was written", dest.display());
}

#[test]
fn compare_shows_each_runs_own_records_and_refuses_bad_input() {
    let t = Scratch::new("compare");
    let inits = ["mean-noise", "spherical"];
    if !setup(&t.0, &inits) {
        return;
    }
    for init in inits {
        let cfg = format!("{init}.toml");
        let run = wake2vec(&t.0, &["run", &cfg, "--out", init, "--quiet"]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let out = wake2vec(
        &t.0,
        &[
            "compare",
            "mean-noise",
            "spherical",
            "--out",
            "cmp",
            "--label",
            "noise",
            "--label",
            "sphere",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = json(&t.path("cmp/compare.json"));
    assert_eq!(c["format"], 1);
    assert_eq!(
        c["figures"],
        serde_json::json!(["val_loss.svg", "val_loss.png", "val_bpb.svg", "val_bpb.png"])
    );
    for f in ["val_loss.png", "val_bpb.svg", "compare.html"] {
        assert!(t.path("cmp").join(f).is_file(), "{f} missing");
    }
    let entries = c["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for (e, (init, label)) in entries.iter().zip(inits.iter().zip(["noise", "sphere"])) {
        let run = t.path(init);
        assert_eq!(e["label"], label);
        assert_eq!(e["kind"], "run");
        assert_eq!(e["init"], *init);
        assert_eq!(e["missing"], serde_json::json!([]), "{label}");
        // The loss numbers are the logs': the last evaluation of Phase 3, the best of all.
        let p3_bpb = evals(&run.join("p3"), "val_bpb");
        assert_eq!(e["loss"]["final_val_bpb"].as_f64(), p3_bpb.last().copied());
        assert_eq!(
            e["loss"]["final_val"].as_f64(),
            evals(&run.join("p3"), "val_loss").last().copied()
        );
        let all_bpb: Vec<f64> = ["p1", "p2", "p3"]
            .iter()
            .flat_map(|p| evals(&run.join(p), "val_bpb"))
            .collect();
        assert_eq!(
            e["loss"]["best_val_bpb"].as_f64(),
            all_bpb.iter().copied().reduce(f64::min)
        );
        assert_eq!(
            e["curves"]["val_bpb"].as_array().unwrap().len(),
            all_bpb.len()
        );
        assert_eq!(e["curves"]["phases"][2][1], "p3");
        // Control: the base row and the last stage of control.json.
        let control = json(&run.join("control.json"));
        let rows = control["rows"].as_array().unwrap();
        let (base, last) = (&rows[0]["bpb"]["bits_per_byte"], &rows[rows.len() - 1]);
        assert_eq!(&e["control"]["base_bpb"], base);
        assert_eq!(e["control"]["last_stage"], "final");
        assert_eq!(e["control"]["last_bpb"], last["bpb"]["bits_per_byte"]);
        assert_eq!(e["control"]["last_kl"], last["kl"]["kl_base_vocab"]);
        let change = last["bpb"]["bits_per_byte"].as_f64().unwrap() - base.as_f64().unwrap();
        assert_eq!(e["control"]["change_from_base"].as_f64(), Some(change));
        // Geometry: summary.json's numbers.
        let s = json(&run.join("analysis/summary.json"));
        let g = &e["geometry"];
        assert_eq!(g["isoscore_wake"], s["isoscore"]["wake"]);
        assert_eq!(
            g["isotropy_wake"]["mu2018"],
            s["isotropy"]["wake"]["mu2018"]
        );
        assert_eq!(
            g["cohens_d_pooled"],
            s["norms"]["tests"]["cohens_d"]["pooled"]
        );
        assert_eq!(g["pca_dim90_wake"], s["pca"]["wake"]["k90"]);
        assert_eq!(g["collapse_share"], s["collapse"]["share"]);
        assert!(e["geometry_from"]
            .as_str()
            .unwrap()
            .ends_with("analysis/summary.json"));
        // Battery: the mean over samples.jsonl.
        let samples: Vec<Value> = std::fs::read_to_string(run.join("samples.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(e["battery"]["samples"], samples.len());
        let rep = samples
            .iter()
            .map(|s| s["metrics"]["repetition_rate"].as_f64().unwrap())
            .sum::<f64>()
            / samples.len() as f64;
        assert_eq!(e["battery"]["repetition_rate"].as_f64(), Some(rep));
    }
    assert_ne!(
        entries[0]["loss"]["final_val_bpb"], entries[1]["loss"]["final_val_bpb"],
        "different inits train differently"
    );
    let html = std::fs::read_to_string(t.path("cmp/compare.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("sphere"));
    assert!(
        !html.contains("<script") && !html.contains("src=\"http") && !html.contains("href=\"http")
    );

    // A model directory has gaps, not an error; --analyze fills its geometry inside --out.
    let out = wake2vec(
        &t.0,
        &[
            "compare",
            "mean-noise/model",
            "spherical",
            "--out",
            "cmp2",
            "--analyze",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = json(&t.path("cmp2/compare.json"));
    let m = &c["entries"][0];
    assert_eq!(
        (&m["kind"], &m["label"], &m["init"]),
        (&"model".into(), &"model".into(), &"mean-noise".into())
    );
    assert!(m["loss"].is_null() && m["control"].is_null() && m["battery"].is_null());
    let missing = m["missing"].to_string();
    assert!(
        missing.contains("training log") && missing.contains("samples.jsonl"),
        "{missing}"
    );
    assert!(!missing.contains("summary.json"), "{missing}");
    assert_eq!(m["geometry_from"], "analysis/1-model/summary.json");
    let s = json(&t.path("cmp2/analysis/1-model/summary.json"));
    assert_eq!(m["geometry"]["isoscore_wake"], s["isoscore"]["wake"]);
    assert!(
        !t.path("mean-noise/model/analysis").exists(),
        "nothing written into an input"
    );

    // Bad input: one line naming the path and the fix; nothing written.
    std::fs::create_dir_all(t.path("plain")).unwrap();
    let dest = t.path("bad");
    refused(
        &wake2vec(&t.0, &["compare", "mean-noise", "nowhere", "--out", "bad"]),
        "nowhere does not exist",
        &dest,
    );
    refused(
        &wake2vec(&t.0, &["compare", "mean-noise", "plain", "--out", "bad"]),
        "plain is neither a run",
        &dest,
    );
    refused(
        &wake2vec(
            &t.0,
            &[
                "compare",
                "mean-noise",
                "spherical",
                "--out",
                "spherical/cmp",
            ],
        ),
        "inside the input",
        &t.path("spherical/cmp"),
    );
    refused(
        &wake2vec(
            &t.0,
            &["compare", "mean-noise", "spherical", "--out", "cmp"],
        ),
        "not an empty directory",
        &dest,
    );
}
