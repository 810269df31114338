//! The lexicon / morphemes / inject verbs through the binary: bad input gives one clear line
//! and writes nothing (issue 3, item 6); a good run writes a directory that `score` and
//! `generate` load.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wake2vec"))
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn data(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(name)
        .display()
        .to_string()
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wake2vec-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// The command failed with exactly one `error: ...` line containing `expected`.
fn assert_error(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(expected),
        "expected {expected:?} in: {stderr}"
    );
}

/// Only the inputs are left in `dir`: no output directory, no temporary.
fn assert_nothing_written(dir: &Path, inputs: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = inputs.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(names, expected);
}

#[test]
fn bad_input_is_one_clear_line_and_writes_nothing() {
    let dir = scratch("bad");
    let p = |name: &str| dir.join(name).display().to_string();
    std::fs::write(p("empty.txt"), "# nothing here\n\n   \n").unwrap();
    std::fs::write(p("latin1.txt"), b"riverrun\ncaf\xe9\n").unwrap();
    // Words the tiny tokenizer already has as one word-start token.
    std::fs::write(p("present.txt"), "the\nand\nhis\n").unwrap();
    std::fs::write(p("words.txt"), "riverrun\nbababadal\n").unwrap();
    std::fs::write(
        p("bad.json"),
        r#"{"prefixes": {"un": "undo"}, "suffixes": {}}"#,
    )
    .unwrap();
    let inputs = [
        "empty.txt",
        "latin1.txt",
        "present.txt",
        "words.txt",
        "bad.json",
    ];
    let model = fixture("tiny-llama");
    let out = p("out");
    let inject = |lexicon: &str, extra: &[&str]| {
        let mut args = vec![
            "inject",
            "--model",
            &model,
            "--lexicon",
            lexicon,
            "--out",
            &out,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let cases: Vec<(Output, &str)> = vec![
        (
            inject(&p("empty.txt"), &[]),
            "has no usable entries (2 blank, 1 comment",
        ),
        (
            inject(&p("latin1.txt"), &[]),
            "latin1.txt is not UTF-8 text (invalid byte at offset 12)",
        ),
        (
            inject(&p("present.txt"), &[]),
            "nothing to inject: of the 3 words",
        ),
        (
            inject(
                &p("words.txt"),
                &["--init", "compositional", "--morphemes", &p("bad.json")],
            ),
            "bad.json is not valid morpheme data",
        ),
        (
            inject(&p("words.txt"), &["--init", "xavier"]),
            "unknown init scheme 'xavier'",
        ),
        (
            inject(
                &p("words.txt"),
                &["--init", "mean-noise", "--radius-factor", "2"],
            ),
            "--radius-factor does not apply to --init mean-noise",
        ),
        (inject(&p("missing.txt"), &[]), "cannot read"),
        (
            run(&[
                "morphemes",
                "decompose",
                "--morphemes",
                &p("bad.json"),
                "word",
            ]),
            "is not valid morpheme data",
        ),
        (
            run(&[
                "morphemes",
                "mine",
                "--lexicon",
                &p("empty.txt"),
                "--out",
                &out,
            ]),
            "has no usable entries",
        ),
        (
            run(&[
                "lexicon",
                "mine",
                "--corpus",
                &p("latin1.txt"),
                "--model",
                &model,
                "--out",
                &out,
            ]),
            "is not UTF-8 text",
        ),
    ];
    for (output, expected) in &cases {
        assert_error(output, expected);
        assert_nothing_written(&dir, &inputs);
    }
    // An --out that exists and is not empty is refused and left alone.
    std::fs::create_dir_all(p("out")).unwrap();
    std::fs::write(p("out/keep.txt"), "mine").unwrap();
    assert_error(
        &inject(&p("words.txt"), &[]),
        "already exists and is not an empty directory",
    );
    assert_eq!(std::fs::read_to_string(p("out/keep.txt")).unwrap(), "mine");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inject_then_score_and_generate() {
    let dir = scratch("good");
    let lexicon = dir.join("lexicon.txt");
    let words =
        "riverrun\nbababadalgharaghtakamminarronnkonnbronntonner\ncommodius\nrecirculation\n\
                 # a comment\nriverrun\npenisolate\nwielderfight\n";
    std::fs::write(&lexicon, words).unwrap();
    let out = dir.join("model");
    let o = run(&[
        "inject",
        "--model",
        &fixture("tiny-llama"),
        "--lexicon",
        &lexicon.display().to_string(),
        "--init",
        "compositional",
        "--corpus",
        &data("finnegans_wake.txt"),
        "--out",
        &out.display().to_string(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("6 entries (2 skipped: 0 blank, 1 comment, 1 duplicate"),
        "{stdout}"
    );
    assert!(
        stdout.contains("round trip decode(encode(text)) == text: yes"),
        "{stdout}"
    );
    assert!(
        stdout.contains("new entries matched inside a longer word: 0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("identical to the base tokenizer: yes"),
        "{stdout}"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("wake2vec.json")).unwrap()).unwrap();
    assert_eq!(manifest["wake_start"], 400);
    assert_eq!(manifest["init"]["scheme"], "compositional");
    assert_eq!(manifest["init"]["seed"], 42);
    assert_eq!(manifest["lexicon"]["skipped"]["duplicate"], 1);
    assert_eq!(manifest["words"][0], "riverrun");

    let model = out.display().to_string();
    let o = run(&[
        "score",
        "--model",
        &model,
        "--text",
        " riverrun riverrun, past Eve",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let score: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The first token (unscored) and the second are the new word `riverrun`, id 400.
    assert_eq!(score["per_token"][0]["id"], 400);
    assert_eq!(score["per_token"][0]["token"], "Ġriverrun");
    assert_eq!(score["per_token"][1]["token"], ",");
    let o = run(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "riverrun",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sample: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(sample["ids"].as_array().unwrap().len(), 8);
    // Several samples are decoded together; sample i is the text of seed 5 + i drawn alone.
    let sampled = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", &model, "--prompt", "riverrun"];
        args.extend(["--max-new-tokens", "12", "--temperature", "1.3", "--json"]);
        let o = run(&[args.as_slice(), extra].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let lines = String::from_utf8(o.stdout).unwrap();
        lines
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["ids"].clone())
            .collect::<Vec<_>>()
    };
    let together = sampled(&["--num-samples", "3", "--seed", "5"]);
    assert_eq!(together.len(), 3);
    for (i, ids) in together.iter().enumerate() {
        let seed = (5 + i).to_string();
        assert_eq!(
            sampled(&["--seed", &seed]),
            std::slice::from_ref(ids),
            "sample {i}"
        );
    }
    assert_ne!(together[0], together[1], "seeds 5 and 6 drew the same text");

    let o = run(&[
        "eval",
        "--model",
        &model,
        "--corpus",
        &data("finnegans_wake.txt"),
        "--block",
        "64",
        "--val-fraction",
        "0.01",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("mean loss"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lexicon_and_morpheme_mining() {
    let dir = scratch("mine");
    let corpus = dir.join("corpus.txt");
    std::fs::write(
        &corpus,
        "Preface\n\nriverrun, past Eve and Adam's, from swerve of shore to bend of bay, brings us by a \
         commodius vicus of recirculation back to Howth Castle and Environs. Riverrun again.\n",
    )
    .unwrap();
    let words = dir.join("words.txt");
    let o = run(&[
        "lexicon",
        "mine",
        "--corpus",
        &corpus.display().to_string(),
        "--model",
        &fixture("tiny-llama"),
        "--anchor",
        "riverrun",
        "--out",
        &words.display().to_string(),
        "--compare",
        &data("wake_lexicon.txt"),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list = std::fs::read_to_string(&words).unwrap();
    let mined: Vec<&str> = list.lines().collect();
    assert!(
        mined.contains(&"riverrun") && mined.contains(&"recirculation"),
        "{mined:?}"
    );
    assert!(
        !mined.contains(&"preface"),
        "text before the anchor is cut: {mined:?}"
    );
    assert!(
        !mined.contains(&"the") && !mined.contains(&"us"),
        "{mined:?}"
    );
    let csv = std::fs::read_to_string(dir.join("words.csv")).unwrap();
    assert!(csv.starts_with("word,freq,pieces,length,nonascii,score\n"));
    assert!(csv.contains("\nriverrun,2,"), "{csv}");
    assert!(stdout.contains("overlap with"), "{stdout}");

    let morph = dir.join("morpheme_data.json");
    let o = run(&[
        "morphemes",
        "mine",
        "--lexicon",
        &data("wake_lexicon.txt"),
        "--count",
        "5",
        "--examples",
        "4",
        "--out",
        &morph.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&morph).unwrap()).unwrap();
    assert_eq!(m["prefixes"].as_object().unwrap().len(), 5);
    assert_eq!(m["suffixes"].as_object().unwrap().len(), 5);
    assert!(m["prefixes"]
        .as_object()
        .unwrap()
        .values()
        .all(|v| v.as_array().unwrap().len() == 4));
    let o = run(&[
        "morphemes",
        "decompose",
        "--morphemes",
        &morph.display().to_string(),
        "unthinkable",
        "riverrun",
    ]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2);
    for (line, word) in lines.iter().zip(["unthinkable", "riverrun"]) {
        let (w, split) = line.split_once('\t').unwrap();
        assert_eq!(w, word);
        let parts: Vec<&str> = split.split('|').collect();
        assert_eq!(parts.len(), 3);
        assert!(!parts[1].is_empty());
        assert_eq!(parts.concat(), word);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
