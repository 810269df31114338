//! `wake2vec analyze` and `report` end to end on a run directory built around the tiny Llama
//! fixture (sharded bf16 weights): wake2vec.json, log.jsonl, snapshots, summary.json, figures
//! and report.html.

use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wake2vec::analysis::{load, Options};
use wake2vec::infer::text_metrics::{BatterySample, TextMetrics};
use wake2vec::report::{self, html, AnalyzeRequest};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
const BASE: usize = 300;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("w2v-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// RUN/ with checkpoints/step-4 (the tiny model + wake2vec.json: rows 300.. are Wake rows),
/// log.jsonl, and snapshots at steps 0, 2, 4 whose Wake rows move toward the final ones.
fn make_run(root: &Path) -> (usize, usize) {
    let ck = root.join("checkpoints/step-4");
    copy_dir(Path::new(TINY), &ck);
    let e = load::load_embeddings(&ck).unwrap();
    let (rows, dim) = (e.rows, e.dim);
    let wake = rows - BASE;
    let words: Vec<String> = (0..wake).map(|i| format!("wakeword{i}")).collect();
    let wj = serde_json::json!({
        "format": 1, "base_model": "tiny-llama", "base_vocab": BASE, "base_tokenizer_size": rows,
        "wake_start": BASE, "wake_count": wake, "words": words, "existing": {},
        "init": {"scheme": "spherical", "seed": 1, "radius_factor": 1.5}, "case": "lower",
    });
    std::fs::write(ck.join("wake2vec.json"), wj.to_string()).unwrap();
    std::fs::create_dir_all(root.join("snapshots")).unwrap();
    let final_rows = &e.data[BASE * dim..];
    for step in [0u64, 2, 4] {
        let a = step as f32 / 4.0;
        let rows: Vec<f32> = final_rows
            .iter()
            .enumerate()
            .map(|(i, &v)| a * v + (1.0 - a) * (((i * 37) % 101) as f32 / 101.0 - 0.5) * 0.1)
            .collect();
        let t = Tensor::from_vec(rows, (wake, dim), &Device::Cpu).unwrap();
        wake2vec::hub::weights::save_file(
            &BTreeMap::from([("wake_rows".to_string(), t)]),
            &root.join(format!("snapshots/step-{step}.safetensors")),
        )
        .unwrap();
    }
    let mut log = String::new();
    log.push_str(
        r#"{"kind":"eval","phase":"p1","step":0,"val_loss":9.5,"val_bpb":3.2,"train_loss":9.6}"#,
    );
    log.push('\n');
    for (s, l) in [(1, 9.0), (2, 8.1), (3, 7.7), (4, 7.2)] {
        log.push_str(&format!(
            "{{\"kind\":\"step\",\"phase\":\"p1\",\"step\":{s},\"loss\":{l},\"lr\":0.001,\"grad_norm\":1.0,\"tokens_per_s\":50.0,\"elapsed_s\":{s}.0}}\n"
        ));
    }
    log.push_str(
        r#"{"kind":"eval","phase":"p1","step":2,"val_loss":8.0,"val_bpb":2.7,"train_loss":8.1}"#,
    );
    log.push('\n');
    log.push_str(
        r#"{"kind":"eval","phase":"p1","step":4,"val_loss":8.2,"val_bpb":2.8,"train_loss":7.2}"#,
    );
    log.push('\n');
    std::fs::write(root.join("log.jsonl"), log).unwrap();
    std::fs::write(root.join("run.toml"), "phase = \"p1\" # <test & check>\n").unwrap();
    (rows, dim)
}

#[test]
fn analyze_a_run_directory_and_write_its_report() {
    let root = tmpdir("run");
    let (rows, dim) = make_run(&root);
    let morph = root.join("groups.jsonl");
    std::fs::write(
        &morph,
        concat!(
            r#"{"morpheme":"-ing","morpheme_type":"suffix","examples":["wakeword1","wakeword2","nosuchword"],"bases":["wakeword11","wakeword12","wakeword13"],"n_examples":3}"#,
            "\n",
            r#"{"morpheme":"un-","morpheme_type":"prefix","examples":["wakeword3"],"bases":["wakeword4"],"n_examples":1}"#,
            "\n"
        ),
    )
    .unwrap();
    let devices = root.join("devices.jsonl");
    std::fs::write(
        &devices,
        "{\"device\":\"pun\",\"examples\":[\"wakeword5\",\"wakeword6\",\"wakeword7\"]}\n{\"device\":\"nonce\",\"examples\":[\"wakeword8\",\"nosuchword\"]}\n",
    )
    .unwrap();
    let req = AnalyzeRequest {
        path: root.clone(),
        morphemes: Some(morph),
        devices: Some(devices),
        options: Options {
            query_words: vec!["wakeword7".into()],
            ..Options::default()
        },
        trajectory_tokens: 30,
        ..Default::default()
    };
    let out = report::analyze_path(&req).unwrap();
    assert_eq!(out.dir, root.join("analysis"));
    let s = &out.summary;
    assert_eq!(s.source.checkpoint.as_deref(), Some("step-4"));
    assert_eq!(s.base_model.as_deref(), Some("tiny-llama"));
    assert_eq!(s.geometry.shape, [rows, dim]);
    assert_eq!(s.geometry.wake_count, rows - BASE);

    // drift defaults to the first snapshot; Wake rows moved, base rows are not compared
    let drift = s.geometry.drift.as_ref().unwrap();
    assert!(drift.reference.contains("step 0"));
    assert!(drift.base.is_none());
    let w = drift.wake.as_ref().unwrap();
    assert_eq!(w.n, rows - BASE);
    assert!(w.cos.mean < 0.99 && w.l2.mean > 0.0);
    assert_eq!(drift.most_moved_wake.len(), 20);
    assert!(drift.most_moved_wake[0].word.starts_with("wakeword"));
    assert!(drift
        .most_moved_wake
        .windows(2)
        .all(|p| p[0].cos <= p[1].cos));

    // neighbours: the original's 10 + 5 sample (100 Wake rows) and the user's word, by name
    let nb = &s.geometry.neighbours;
    assert_eq!(nb.iter().filter(|q| q.source == "sample").count(), 10);
    let user = nb.iter().find(|q| q.source == "user").unwrap();
    assert_eq!((user.id, user.word.as_str()), (BASE + 7, "wakeword7"));
    assert!(user
        .neighbours
        .iter()
        .all(|n| n.id < BASE && n.cos <= 1.0 + 1e-9));
    assert_eq!(user.neighbours.len(), 5);

    // morphemes: "-ing" has 3 usable pairs (a word outside the lexicon is the mean of its
    // tokens), "un-" has 1 and is not used
    let m = s.geometry.morphemes.as_ref().unwrap();
    assert_eq!((m.groups_in_file, m.groups_used, m.pairs_used), (2, 1, 3));
    assert_eq!(m.groups[0].morpheme, "-ing");
    assert!(m.groups[0].consistency_mean > 0.0 && m.groups[0].consistency_mean <= 1.0 + 1e-12);
    let d = s.geometry.devices.as_ref().unwrap();
    assert_eq!((d.groups[0].n_found, d.groups[1].n_found), (3, 2));
    assert!(d
        .groups
        .iter()
        .all(|g| g.intra_mean_cos.abs() <= 1.0 + 1e-12));
    assert!((d.centroid_cos[0][0] - 1.0).abs() < 1e-12);

    // loss and trajectory
    let loss = s.loss.as_ref().unwrap();
    assert_eq!(loss.final_train, Some(7.2));
    assert_eq!((loss.best_val, loss.best_val_step), (Some(8.0), Some(2)));
    assert_eq!(loss.final_val_bpb, Some(2.8));
    let t = s.trajectory.as_ref().unwrap();
    assert_eq!(t.steps, vec![0, 2, 4]);
    assert_eq!(t.n_tokens, 30);
    assert_eq!(t.mean_displacement_by_step[0].1, 0.0);
    assert!(t.mean_displacement_by_step[2].1 > t.mean_displacement_by_step[1].1);

    // files: summary.json parses and carries the documented top-level keys; figures exist
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.dir.join("summary.json")).unwrap())
            .unwrap();
    for key in [
        "format",
        "source",
        "shape",
        "base_vocab",
        "wake_start",
        "wake_count",
        "norms",
        "isotropy",
        "neighbours",
        "pca",
        "pairwise_cosine",
        "drift",
        "loss",
        "trajectory",
        "figures",
        "timings_s",
    ] {
        assert!(json.get(key).is_some(), "summary.json lacks {key}");
    }
    assert!(json["norms"]["tests"]["welch"]["p"].is_number());
    assert!(json["isotropy"]["wake"]["mu2018"].is_number());
    assert!(json["pairwise_cosine"]["ks_base_base_vs_wake_wake"]["D"].is_number());
    for f in ["embedding_analysis", "loss", "trajectory"] {
        let png = std::fs::read(out.dir.join(format!("{f}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{f}.png");
        let svg = std::fs::read_to_string(out.dir.join(format!("{f}.svg"))).unwrap();
        assert!(svg.contains("<svg"), "{f}.svg");
    }

    // the report inlines the three figures, escapes text, and shows the samples
    let sample = BatterySample {
        label: "single sample, temperature 0.9".into(),
        temperature: 0.9,
        top_p: 0.92,
        top_k: 50,
        repetition_penalty: 1.15,
        seed: 42,
        prompt: "riverrun, past Eve and Adam's,".into(),
        text: " <b>haveheard</b> the river".into(),
        tokens: 6,
        metrics: TextMetrics {
            words: 4,
            wake_token_share: Some(0.25),
            coinage_rate: 0.25,
            fused_rate: 0.25,
            distinct_1: 1.0,
            distinct_2: 1.0,
            distinct_3: 1.0,
            repetition_rate: 0.0,
            fused_examples: vec!["have+heard".into()],
        },
    };
    let run_toml = std::fs::read_to_string(root.join("run.toml")).unwrap();
    let page = html::build(s, &out.dir, Some(&run_toml), &[sample]).unwrap();
    assert_eq!(page.matches("<svg").count(), 3);
    assert!(page.contains("&lt;b&gt;haveheard&lt;/b&gt;"));
    assert!(page.contains("&lt;test &amp; check&gt;"));
    assert!(page.contains("wakeword7"));
    assert!(!page.contains("<script"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn analyze_a_model_directory_with_base_vocab_and_a_full_reference() {
    let root = tmpdir("model");
    let out_dir = root.join("out");
    let req = AnalyzeRequest {
        path: PathBuf::from(TINY),
        out: Some(out_dir.clone()),
        base_vocab: Some(380),
        pre: Some(PathBuf::from(TINY)),
        no_figures: true,
        ..Default::default()
    };
    let out = report::analyze_path(&req).unwrap();
    let g = &out.summary.geometry;
    assert_eq!(out.summary.layout_from, "--base-vocab");
    assert_eq!((g.base_vocab, g.wake_count), (380, 20));
    // the same model as reference: no drift at all
    let d = g.drift.as_ref().unwrap();
    assert!((d.base.as_ref().unwrap().cos.mean - 1.0).abs() < 1e-12);
    assert_eq!(d.wake.as_ref().unwrap().l2.max, 0.0);
    assert!(out.summary.figures.is_empty());
    assert!(out_dir.join("summary.json").is_file());
    assert!(!out_dir.join("embedding_analysis.png").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn errors_name_the_file_and_the_fix() {
    let root = tmpdir("errors");
    // a model directory without wake2vec.json and without --base-vocab
    let e = report::analyze_path(&AnalyzeRequest {
        path: PathBuf::from(TINY),
        out: Some(root.join("o")),
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("wake2vec.json") && e.contains("--base-vocab"),
        "{e}"
    );
    // neither a model nor a run directory
    let e = report::analyze_path(&AnalyzeRequest {
        path: root.clone(),
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("neither a model directory"), "{e}");
    // a snapshot of the wrong shape as --pre
    let snap = root.join("bad.safetensors");
    let t = Tensor::zeros((3, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    wake2vec::hub::weights::save_file(&BTreeMap::from([("wake_rows".to_string(), t)]), &snap)
        .unwrap();
    let e = report::analyze_path(&AnalyzeRequest {
        path: PathBuf::from(TINY),
        out: Some(root.join("o")),
        base_vocab: Some(380),
        pre: Some(snap),
        no_figures: true,
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("does not match"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_checkpoint_of_trained_wake_rows_replaces_the_models_rows() {
    // the training engine's P1 checkpoint: params.safetensors holds `wake_embed` only, and
    // run.toml names the injected model
    let root = tmpdir("params");
    let model = root.join("model");
    copy_dir(Path::new(TINY), &model);
    let e = load::load_embeddings(&model).unwrap();
    let wake = e.rows - BASE;
    std::fs::write(
        model.join("wake2vec.json"),
        serde_json::json!({"format": 1, "base_model": "tiny-llama", "base_vocab": BASE,
            "wake_start": BASE, "wake_count": wake, "words": []})
        .to_string(),
    )
    .unwrap();
    let run = root.join("run");
    std::fs::create_dir_all(run.join("checkpoints/step-3")).unwrap();
    std::fs::write(
        run.join("run.toml"),
        "phase = \"p1\"\nmodel = \"../model\"\n",
    )
    .unwrap();
    let save = |rows: usize, value: f32| {
        let t = Tensor::full(value, (rows, e.dim), &Device::Cpu).unwrap();
        wake2vec::hub::weights::save_file(
            &BTreeMap::from([("wake_embed".to_string(), t)]),
            &run.join("checkpoints/step-3/params.safetensors"),
        )
        .unwrap();
    };
    save(wake, 0.5);
    let out = report::analyze_path(&AnalyzeRequest {
        path: run.clone(),
        out: Some(root.join("out")),
        no_figures: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(out.summary.source.checkpoint.as_deref(), Some("step-3"));
    assert!(out.summary.source.params.is_some());
    let w = out.summary.geometry.norms.wake.as_ref().unwrap();
    let want = 0.5 * (e.dim as f64).sqrt();
    assert!((w.mean - want).abs() < 1e-9 && (w.max - w.min).abs() < 1e-9);
    // base rows are the model's own
    let b = &out.summary.geometry.norms.base;
    let base_norm0 = e
        .row(0)
        .iter()
        .map(|&v| (v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(b.min <= base_norm0 && base_norm0 <= b.max);
    // a checkpoint of another shape is refused with the reason
    save(wake - 1, 0.5);
    let err = report::analyze_path(&AnalyzeRequest {
        path: run,
        out: Some(root.join("out")),
        no_figures: true,
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("does not belong to this model"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
