//! `wake2vec init-study` on the tiny Llama fixture: two schemes, a few Phase 1 steps each.
//! hf-mean's rows start as one point (pairwise cosine ≈ 1) and interpolation's do not; before
//! training, the base distribution on the control text is untouched (KL ≈ 0, all change is
//! moved mass); a rerun finds everything done and writes the same JSON; a bad scheme writes
//! nothing.

mod common;

use common::{fixture, Scratch};
use std::process::Command;

const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/");

#[test]
fn schemes_are_measured_before_and_after_and_a_rerun_changes_nothing() {
    let t = Scratch::new("init-study");
    let (Ok(text), Ok(lexicon)) = (
        std::fs::read_to_string(format!("{SHARED}finnegans_wake.txt")),
        std::fs::read_to_string(format!("{SHARED}wake_lexicon.txt")),
    ) else {
        return eprintln!("skipping: the shared data is absent");
    };
    let end = text
        .char_indices()
        .nth(30_000)
        .map_or(text.len(), |(i, _)| i);
    std::fs::write(t.path("corpus.txt"), &text[..end]).unwrap();
    let words: Vec<&str> = lexicon.lines().take(800).collect();
    std::fs::write(t.path("lexicon.txt"), words.join("\n")).unwrap();
    let study = |schemes: &str, out: &str| {
        Command::new(env!("CARGO_BIN_EXE_wake2vec"))
            .current_dir(&t.0)
            .args([
                "init-study",
                "--model",
                fixture("tiny-llama").to_str().unwrap(),
            ])
            .args(["--lexicon", "lexicon.txt", "--corpus", "corpus.txt"])
            .args(["--control", &format!("{SHARED}dubliners.txt")])
            .args(["--steps", "3", "--seq-len", "32", "--eval-blocks", "3"])
            .args([
                "--control-segments",
                "3",
                "--schemes",
                schemes,
                "--out",
                out,
            ])
            .arg("--quiet")
            .output()
            .unwrap()
    };
    let bad = study("hf-mean,xavier", "bad");
    let no_model = Command::new(env!("CARGO_BIN_EXE_wake2vec"))
        .current_dir(&t.0)
        .args([
            "init-study",
            "--lexicon",
            "lexicon.txt",
            "--corpus",
            "corpus.txt",
        ])
        .args(["--control", "absent.txt", "--out", "bad"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&no_model.stderr);
    assert!(err.contains("--control absent.txt does not exist"), "{err}");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown init scheme 'xavier'"), "{err}");
    assert!(
        !t.path("bad").exists(),
        "a refused study wrote its directory"
    );

    assert!(study("hf-mean,interpolation", "out").status.success());
    let out = t.path("out");
    let json = std::fs::read_to_string(out.join("init_study.json")).unwrap();
    let s: wake2vec::study::InitStudy = serde_json::from_str(&json).unwrap();
    assert_eq!(s.schemes.len(), 2);
    let (hf, interp) = (&s.schemes[0], &s.schemes[1]);
    assert_eq!(
        (hf.scheme.as_str(), hf.start.step, hf.end.step),
        ("hf-mean", 0, 3)
    );
    assert!(hf.start.wake_wake_cos.unwrap() > 0.9999, "{:?}", hf.start);
    assert!(
        interp.start.wake_wake_cos.unwrap() < 0.9,
        "{:?}",
        interp.start
    );
    for r in &s.schemes {
        for m in [&r.start, &r.end] {
            let kl = m.control.kl.as_ref().unwrap();
            assert!(
                kl.kl_base_vocab < 1e-6,
                "{}: Phase 1 moved the base distribution",
                r.scheme
            );
            assert!(kl.moved_mass > 0.0);
            assert!(m.wake_bpb.unwrap() > 0.0 && m.isoscore_wake.is_some());
        }
        assert_ne!(
            r.start.wake_bpb, r.end.wake_bpb,
            "{}: training changed nothing",
            r.scheme
        );
        assert_eq!(r.val_bpb.len(), 2);
    }
    let html = std::fs::read_to_string(out.join("init_study.html")).unwrap();
    assert!(html.contains("<td>interpolation</td>") && html.contains("<svg"));
    assert!(study("hf-mean,interpolation", "out").status.success());
    assert_eq!(
        std::fs::read_to_string(out.join("init_study.json")).unwrap(),
        json
    );
    let leftovers: Vec<String> = std::fs::read_dir(out.join("hf-mean"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
