//! Bad input to the real binary: each case must end with a non-zero exit and exactly one line on
//! stderr, `error: ...`, naming the file or value at fault and saying what to do; never a panic.

mod common;
use common::{fixture, Scratch};
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_wake2vec");

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The binary with `WAKE2VEC_CACHE` set to `cache`, so nothing touches the user's cache, and
/// RUST_BACKTRACE on, as many developers have it: errors must stay one line even then.
fn wake2vec(cache: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("WAKE2VEC_CACHE", cache)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE");
    cmd
}

fn run<S: AsRef<OsStr>>(cache: &Path, args: &[S]) -> Output {
    wake2vec(cache).args(args).output().expect("run wake2vec")
}

/// `wake2vec score --model MODEL --text TEXT`.
fn score_text(cache: &Path, model: &Path, text: &str) -> Output {
    run(
        cache,
        &[
            OsStr::new("score"),
            OsStr::new("--model"),
            model.as_os_str(),
            OsStr::new("--text"),
            OsStr::new(text),
        ],
    )
}

/// Asserts the failure shape every case shares and that the message contains each of `says`;
/// returns the message.
fn one_line_error(out: &Output, says: &[&str]) -> String {
    error_after_progress(out, 0, says)
}

/// As [`one_line_error`], after exactly `progress` lines of `wake2vec: ...` progress (a slow
/// step logs its start when stderr is not a terminal; on a terminal it is a spinner that is
/// cleared, leaving the error line alone).
fn error_after_progress(out: &Output, progress: usize, says: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stderr.contains("panicked") && !stdout.contains("panicked"),
        "panic: {stderr}"
    );
    let code = out.status.code().expect("exited, not killed by a signal");
    assert_ne!(code, 0, "succeeded on bad input; stdout: {stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        progress + 1,
        "stderr is not {progress} progress line(s) and one error line: {stderr:?}"
    );
    for line in &lines[..progress] {
        assert!(line.starts_with("wake2vec: "), "{line}");
    }
    let line = lines[progress];
    assert!(line.starts_with("error: "), "{line}");
    for phrase in says {
        assert!(line.contains(phrase), "{line:?} does not say {phrase:?}");
    }
    line.to_string()
}

#[test]
fn missing_model_directory() {
    let tmp = Scratch::new("missing");
    let out = run(
        &tmp.path("cache"),
        &["score", "--model", "/nonexistent/dir", "--text", "hi"],
    );
    one_line_error(
        &out,
        &[
            "'/nonexistent/dir'",
            "no such file or directory",
            "a directory with config.json",
        ],
    );
}

#[test]
fn unknown_model_name() {
    let tmp = Scratch::new("unknown");
    // Run where no file of that name can exist.
    let out = wake2vec(&tmp.path("cache"))
        .args(["score", "--model", "llama-9000b", "--text", "hi"])
        .current_dir(&tmp.0)
        .output()
        .unwrap();
    one_line_error(
        &out,
        &["'llama-9000b'", "known name (smollm2-135m)", ".gguf"],
    );
    assert!(!tmp.path("cache").exists(), "nothing is fetched for a typo");
}

#[test]
fn unsupported_architecture() {
    let tmp = Scratch::new("gpt2");
    let dir = tmp.path("gpt2");
    copy_dir(&fixture("tiny-qwen2"), &dir);
    // GPT-2's own config.json keys: no hidden_size / num_hidden_layers at all.
    std::fs::write(
        dir.join("config.json"),
        r#"{"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
            "bos_token_id": 0, "eos_token_id": 0, "layer_norm_epsilon": 1e-05,
            "model_type": "gpt2", "n_ctx": 256, "n_embd": 64, "n_head": 4, "n_layer": 2,
            "n_positions": 256, "vocab_size": 400}"#,
    )
    .unwrap();
    let out = score_text(&tmp.path("cache"), &dir, "hello there");
    let config = dir.join("config.json");
    one_line_error(
        &out,
        &[
            config.to_str().unwrap(),
            "GPT2LMHeadModel",
            "not supported",
            "LlamaForCausalLM",
        ],
    );
}

#[test]
fn truncated_safetensors() {
    let tmp = Scratch::new("truncated");
    let dir = tmp.path("model");
    copy_dir(&fixture("tiny-qwen2"), &dir);
    let weights = dir.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = score_text(&tmp.path("cache"), &dir, "hello there");
    one_line_error(
        &out,
        &[weights.to_str().unwrap(), "truncated", "re-download"],
    );
}

/// GGUF v3 by hand: a llama header whose one tensor is IQ2_XXS (ggml type 16), which candle
/// cannot dequantize.
fn gguf_with_iq2_xxs(path: &Path) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    const STRING: u32 = 8;
    const U32: u32 = 4;
    const F32: u32 = 6;
    const IQ2_XXS: u32 = 16;
    const IQ2_XXS_BLOCK: usize = 256; // weights per block
    const IQ2_XXS_BYTES: usize = 66; // bytes per block: f16 scale + 32 u16
    let (rows, cols) = (4usize, 256usize);

    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(5u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend(STRING.to_le_bytes());
    string(&mut b, "llama");
    string(&mut b, "general.alignment");
    b.extend(U32.to_le_bytes());
    b.extend(32u32.to_le_bytes());
    string(&mut b, "llama.block_count");
    b.extend(U32.to_le_bytes());
    b.extend(1u32.to_le_bytes());
    string(&mut b, "llama.embedding_length");
    b.extend(U32.to_le_bytes());
    b.extend((cols as u32).to_le_bytes());
    string(&mut b, "llama.attention.layer_norm_rms_epsilon");
    b.extend(F32.to_le_bytes());
    b.extend(1e-5f32.to_le_bytes());
    // Tensor info: name, n_dims, dims innermost first, type, offset into the data section.
    string(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend((cols as u64).to_le_bytes());
    b.extend((rows as u64).to_le_bytes());
    b.extend(IQ2_XXS.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().next_multiple_of(32), 0);
    b.resize(b.len() + rows * cols / IQ2_XXS_BLOCK * IQ2_XXS_BYTES, 0);
    std::fs::write(path, b).unwrap();
}

#[test]
fn gguf_with_unsupported_quantization() {
    let tmp = Scratch::new("iq2");
    let gguf = tmp.path("tiny.IQ2_XXS.gguf");
    gguf_with_iq2_xxs(&gguf);
    let cache = tmp.path("cache");
    let says = [
        gguf.to_str().unwrap(),
        "ggml type 16 (IQ2_XXS)",
        "cannot dequantize",
        "re-quantize",
    ];

    let out_dir = tmp.path("imported");
    let out = run(
        &cache,
        &[
            OsStr::new("import-gguf"),
            gguf.as_os_str(),
            OsStr::new("--out"),
            out_dir.as_os_str(),
        ],
    );
    one_line_error(&out, &says);
    let left: Vec<_> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![gguf.file_name().unwrap()], "import left files");

    let out = score_text(&cache, &gguf, "hi");
    let line = error_after_progress(&out, 1, &says);
    assert!(line.starts_with("error: cannot import "), "{line}");
    // The failed import leaves nothing in the cache that a later run could take for a model.
    let imported = cache.join("imported");
    let entries = std::fs::read_dir(&imported).map(|d| d.count()).unwrap_or(0);
    assert_eq!(entries, 0, "{} is not empty", imported.display());
}

/// The golden prompt of tiny-llama and its token count.
fn golden_prompt() -> (String, usize) {
    let path = fixture("tiny-llama/golden.json");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let prompt = golden["prompt"].as_str().unwrap().to_string();
    let tokens = golden["ids"].as_array().unwrap().len();
    (prompt, tokens)
}

#[test]
fn prompt_longer_than_the_context() {
    let tmp = Scratch::new("long-prompt");
    let model = fixture("tiny-llama");
    let (prompt, tokens) = golden_prompt();
    // max_position_embeddings is 256: four copies (joined by a space) are well past it.
    let long = [prompt.as_str(); 4].join(" ");
    assert!(4 * tokens > 256);
    let out = run(
        &tmp.path("cache"),
        &[
            OsStr::new("generate"),
            OsStr::new("--model"),
            model.as_os_str(),
            OsStr::new("--prompt"),
            OsStr::new(&long),
            OsStr::new("--max-new-tokens"),
            OsStr::new("1"),
        ],
    );
    one_line_error(
        &out,
        &[
            "the prompt has",
            "context is 256 tokens",
            "shorten the prompt",
        ],
    );
    assert!(
        out.stdout.is_empty(),
        "the prompt was echoed before failing"
    );
}

#[test]
fn max_new_tokens_past_the_context() {
    let tmp = Scratch::new("long-generation");
    let model = fixture("tiny-llama");
    let (prompt, tokens) = golden_prompt();
    let out = run(
        &tmp.path("cache"),
        &[
            OsStr::new("generate"),
            OsStr::new("--model"),
            model.as_os_str(),
            OsStr::new("--prompt"),
            OsStr::new(&prompt),
            OsStr::new("--max-new-tokens"),
            OsStr::new("200"),
        ],
    );
    let room = format!("--max-new-tokens to at most {}", 256 - tokens);
    one_line_error(
        &out,
        &[
            &format!("the prompt ({tokens} tokens)"),
            "--max-new-tokens 200",
            "context of 256 tokens",
            &room,
        ],
    );
    assert!(
        out.stdout.is_empty(),
        "the prompt was echoed before failing"
    );
}

#[test]
fn score_file_that_is_not_utf8() {
    let tmp = Scratch::new("latin1");
    let file = tmp.path("wake-latin1.txt");
    // "riverrun, past Ève" in Latin-1: 0xC8 starts no valid UTF-8 sequence here.
    std::fs::write(&file, b"riverrun, past \xC8ve and Adam's").unwrap();
    let out = run(
        &tmp.path("cache"),
        &[
            OsStr::new("score"),
            OsStr::new("--model"),
            fixture("tiny-qwen2").as_os_str(),
            OsStr::new("--file"),
            file.as_os_str(),
        ],
    );
    one_line_error(
        &out,
        &[
            file.to_str().unwrap(),
            "not UTF-8",
            "offset 15",
            "convert it",
        ],
    );
}

#[test]
fn score_empty_text() {
    let tmp = Scratch::new("empty");
    let model = fixture("tiny-qwen2");
    for text in ["", "  \n"] {
        let out = score_text(&tmp.path("cache"), &model, text);
        one_line_error(&out, &["text to score is empty", "--text or --file"]);
    }
}

/// `score` on a copy of tiny-qwen2 whose config.json has `from` replaced by `to`.
fn score_with_config(tmp: &Scratch, name: &str, from: &str, to: &str) -> (Output, String) {
    let dir = tmp.path(name);
    copy_dir(&fixture("tiny-qwen2"), &dir);
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(from), "{from}");
    std::fs::write(&config, text.replace(from, to)).unwrap();
    let out = score_text(&tmp.path("cache"), &dir, "hello there");
    (out, config.display().to_string())
}

/// Sizes no machine can hold, and numbers that gave NaN scores or misleading messages, are each
/// one line naming the key and the model.
#[test]
fn impossible_model_configs() {
    let tmp = Scratch::new("configs");
    for (i, (from, to, says)) in [
        (r#""num_hidden_layers": 2"#, r#""num_hidden_layers": 1000000000000"#, "more than this machine's"),
        (r#""max_position_embeddings": 256"#, r#""max_position_embeddings": 100000000000"#, "more than this machine's"),
        (r#""rms_norm_eps": 1e-06"#, r#""rms_norm_eps": -1e-06"#, "rms_norm_eps = -1e-6 must be a finite positive number"),
        (r#""rope_theta": 1000000.0"#, r#""rope_theta": 0"#, "rope_theta = 0 must be"),
        (r#""rope_type": "default""#, r#""rope_type": "llama3", "factor": 0, "low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 64"#, "rope scaling factor = 0"),
        (r#""vocab_size": 408"#, r#""vocab_size": 0"#, "vocab_size is 0"),
        (r#""num_hidden_layers": 2"#, r#""num_hidden_layers": 0"#, "num_hidden_layers is 0"),
        (r#""eos_token_id": 0"#, r#""eos_token_id": 5000"#, "eos_token_id 5000 is outside the vocabulary of 408"),
        (r#""num_attention_heads": 4"#, r#""num_attention_heads": 3"#, "hidden_size 64 is not a multiple of num_attention_heads 3"),
        (r#""intermediate_size": 160"#, r#""intermediate_size": 128"#, "model.layers.0.mlp.gate_proj.weight is 160×64, but the configuration implies 128×64"),
    ]
    .into_iter()
    .enumerate()
    {
        let (out, config) = score_with_config(&tmp, &format!("m{i}"), from, to);
        // Shape mismatches name the model directory, the rest its config.json.
        let named = config.strip_suffix("/config.json").unwrap();
        one_line_error(&out, &[named, says]);
    }
}

/// A `--set` value beyond TOML's integers, and a config file with a syntax error: one line each.
#[test]
fn out_of_range_override_and_bad_toml_file() {
    let tmp = Scratch::new("overrides");
    let file = tmp.path("bad.toml");
    std::fs::write(&file, "lr = 3e-4x\n").unwrap();
    for (args, says) in [
        (
            vec!["--set", "warmup_steps=18446744073709551615"],
            vec!["warmup_steps=18446744073709551615", "out of range"],
        ),
        (
            vec!["--config", file.to_str().unwrap()],
            vec![file.to_str().unwrap(), "line 1, column"],
        ),
    ] {
        let model = fixture("tiny-qwen2");
        let corpus = tmp.path("corpus.txt");
        std::fs::write(&corpus, "riverrun, past Eve and Adam's").unwrap();
        let out_dir = tmp.path("out");
        let mut all = vec!["train", "--model", model.to_str().unwrap(), "--corpus"];
        all.extend([corpus.to_str().unwrap(), "--out", out_dir.to_str().unwrap()]);
        all.extend(args);
        let out = run(&tmp.path("cache"), &all);
        one_line_error(&out, &says);
        assert!(!out_dir.exists());
    }
}

/// Runs the binary with its standard output closed before it writes (`| head -0`), returning
/// its exit code and stderr.
fn with_stdout_closed(cache: &Path, args: &[&OsStr]) -> (Option<i32>, String) {
    let mut child = wake2vec(cache)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wake2vec");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A reader that goes away (`| head`) ends the printing, not the work: inject still writes its
/// model, status exits as it would have, neither panics.
#[test]
fn closed_stdout_ends_printing_not_the_work() {
    let tmp = Scratch::new("pipe");
    let lexicon = tmp.path("lexicon.txt");
    std::fs::write(&lexicon, "riverrun\ncommodius\nrecirculation\n").unwrap();
    let out = tmp.path("injected");
    let model = fixture("tiny-llama");
    let (code, stderr) = with_stdout_closed(
        &tmp.path("cache"),
        &[
            OsStr::new("inject"),
            OsStr::new("--model"),
            model.as_os_str(),
            OsStr::new("--lexicon"),
            lexicon.as_os_str(),
            OsStr::new("--out"),
            out.as_os_str(),
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    wake2vec::model::LoadedModel::load(&out).expect("the injected model is whole");
    assert!(out.join("wake2vec.json").is_file());

    let (code, stderr) =
        with_stdout_closed(&tmp.path("cache"), &[OsStr::new("status"), out.as_os_str()]);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        code,
        Some(1),
        "not a run: the same error as with an open stdout"
    );
}
