//! The loaders under mutation: a valid GGUF, safetensors file, config.json, tokenizer.json,
//! run.toml, wake2vec.json and pipeline.toml, with every header field and length overwritten or bit-flipped
//! (seeded, so every run tries the same inputs), each mutated input through its loader
//! in-process. Each input must end in an error or a success, never a panic; a success that
//! scores must give finite log-probs; and no single allocation may exceed [`BOUND`] (the
//! counting allocator below refuses it, which aborts the test and names the input). wake2vec's
//! own memory bound is lowered to [`LIMIT`] with `WAKE2VEC_MAX_MEMORY`, so that the outcome does
//! not depend on the machine. `cargo test --release --test mutation -- --nocapture` prints the
//! summary (inputs, errors, successes, panics, peak heap).

mod common;

use common::gguf::write_gguf;
use common::{fixture, Scratch};
use serde_json::Value;
use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use anyhow::{ensure, Result};
use candle_core::quantized::GgmlDType;
use wake2vec::model::LoadedModel;
use wake2vec::train::{TrainConfig, Trainer};

/// wake2vec's memory bound during the test.
const LIMIT: &str = "512M";
/// The largest single allocation allowed (equal to [`LIMIT`]: a size checked against the bound
/// can never need more).
const BOUND: usize = 512 << 20;
/// The seed of every random choice.
const SEED: u64 = 0x5EED_1212;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The inputs' names, and the index of the one being loaded, for the message on a refused
/// allocation (written without allocating).
static NAMES: OnceLock<Vec<String>> = OnceLock::new();
static CURRENT: AtomicUsize = AtomicUsize::new(usize::MAX);

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

/// Says which input asked for too much; the null returned next aborts the process.
fn refuse(size: usize) {
    let say = |bytes: &[u8]| {
        // SAFETY: writes a valid buffer to stderr.
        unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
    };
    say(b"\nmutation: an allocation above the bound, of bytes: ");
    let mut digits = [0u8; 20];
    let mut n = size;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    say(&digits[i..]);
    say(b"; input: ");
    let current = CURRENT.load(Ordering::Relaxed);
    if let Some(name) = NAMES.get().and_then(|n| n.get(current)) {
        say(name.as_bytes());
    }
    say(b"\n");
}

// SAFETY: forwards to the system allocator, only counting, or refusing an oversized request.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > BOUND {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > BOUND {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > BOUND {
            refuse(new_size);
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// SplitMix64: small, seeded, the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `cases` in a seeded order, at most `cap` of them.
    fn sample<T>(&mut self, mut cases: Vec<T>, cap: usize) -> Vec<T> {
        for i in (1..cases.len()).rev() {
            cases.swap(i, self.below(i + 1));
        }
        cases.truncate(cap);
        cases
    }
}

/// One mutated input: its name and its bytes.
struct Case {
    name: String,
    bytes: Vec<u8>,
}

/// A fixed-width field of a binary header: what it is, where, how wide.
struct Field {
    what: String,
    at: usize,
    width: usize,
}

/// Values to write into a field of `width` bytes: the edges, powers that overflow products, and
/// a seeded random value and bit flip of the original.
fn field_values(original: &[u8], rng: &mut Rng) -> Vec<(String, Vec<u8>)> {
    let width = original.len();
    let mut out: Vec<(String, u64)> = vec![
        ("0".into(), 0),
        ("1".into(), 1),
        ("max".into(), u64::MAX),
        ("top bit".into(), 1 << (8 * width - 1)),
    ];
    if width == 8 {
        out.push(("2^32".into(), 1 << 32));
        out.push(("2^40".into(), 1 << 40));
    }
    out.push(("random".into(), rng.next()));
    let mut old = [0u8; 8];
    old[..width].copy_from_slice(original);
    let bit = rng.below(8 * width);
    out.push((
        format!("bit {bit} flipped"),
        u64::from_le_bytes(old) ^ (1 << bit),
    ));
    out.into_iter()
        .map(|(name, v)| (name, v.to_le_bytes()[..width].to_vec()))
        .collect()
}

/// Every field of a candle-written GGUF (v2/v3: 64-bit lengths): the header counts, each
/// metadata key's length and type, each scalar value, each string or array length (the
/// elements of a long array only at its ends), and each tensor's name length, rank, dimensions,
/// type and offset.
fn gguf_fields(b: &[u8]) -> Vec<Field> {
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let mut fields = Vec::new();
    let mut field = |what: String, at: usize, width: usize| {
        fields.push(Field { what, at, width });
        at + width
    };
    field("magic".into(), 0, 4);
    field("version".into(), 4, 4);
    let tensors = u64_at(8);
    field("tensor count".into(), 8, 8);
    let kvs = u64_at(16);
    let mut at = field("metadata count".into(), 16, 8);
    let width = |ty: u32| match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        _ => 8,
    };
    for _ in 0..kvs {
        let len = u64_at(at);
        let key = String::from_utf8_lossy(&b[at + 8..at + 8 + len]).into_owned();
        at = field(format!("length of key {key}"), at, 8) + len;
        let ty = u32_at(at);
        at = field(format!("type of {key}"), at, 4);
        match ty {
            8 => {
                let len = u64_at(at);
                at = field(format!("string length of {key}"), at, 8) + len;
            }
            9 => {
                let inner = u32_at(at);
                at = field(format!("element type of {key}"), at, 4);
                let n = u64_at(at);
                at = field(format!("length of {key}"), at, 8);
                for i in 0..n {
                    let ends = i < 2 || i + 1 == n;
                    if inner == 8 {
                        let len = u64_at(at);
                        if ends {
                            field(format!("length of {key}[{i}]"), at, 8);
                        }
                        at += 8 + len;
                    } else {
                        if ends {
                            field(format!("{key}[{i}]"), at, width(inner));
                        }
                        at += width(inner);
                    }
                }
            }
            ty => at = field(format!("value of {key}"), at, width(ty)),
        }
    }
    for _ in 0..tensors {
        let len = u64_at(at);
        let name = String::from_utf8_lossy(&b[at + 8..at + 8 + len]).into_owned();
        at = field(format!("name length of {name}"), at, 8) + len;
        let rank = u32_at(at) as usize;
        at = field(format!("rank of {name}"), at, 4);
        for d in 0..rank {
            at = field(format!("dimension {d} of {name}"), at, 8);
        }
        at = field(format!("type of {name}"), at, 4);
        field(format!("offset of {name}"), at, 8);
        at += 8;
    }
    fields
}

/// Binary cases: each field of `fields` overwritten with each of [`field_values`], and the
/// file cut at a few seeded places.
fn binary_cases(kind: &str, original: &[u8], fields: &[Field], rng: &mut Rng) -> Vec<Case> {
    let mut cases = Vec::new();
    for f in fields {
        for (value, bytes) in field_values(&original[f.at..f.at + f.width], rng) {
            let mut b = original.to_vec();
            b[f.at..f.at + f.width].copy_from_slice(&bytes);
            if b != original {
                cases.push(Case {
                    name: format!("{kind}: {} = {value}", f.what),
                    bytes: b,
                });
            }
        }
    }
    for _ in 0..8 {
        let cut = rng.below(original.len());
        cases.push(Case {
            name: format!("{kind}: cut to {cut} bytes"),
            bytes: original[..cut].to_vec(),
        });
    }
    cases
}

/// A path into a JSON document.
#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

/// The paths of `v`'s nodes (of a long array or a large object only the ends).
fn json_paths(v: &Value, path: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(path.clone());
    match v {
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                if i < 2 || i + 1 == a.len() {
                    path.push(Step::Index(i));
                    json_paths(x, path, out);
                    path.pop();
                }
            }
        }
        Value::Object(o) => {
            let n = o.len();
            for (i, (k, x)) in o.iter().enumerate() {
                if n <= 40 || i < 3 || i + 1 == n {
                    path.push(Step::Key(k.clone()));
                    json_paths(x, path, out);
                    path.pop();
                }
            }
        }
        _ => {}
    }
}

fn node<'a>(v: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        Step::Key(k) => &mut v[k.as_str()],
        Step::Index(i) => &mut v[*i],
    })
}

fn path_name(path: &[Step]) -> String {
    let parts: Vec<String> = path
        .iter()
        .map(|s| match s {
            Step::Key(k) => k.clone(),
            Step::Index(i) => format!("[{i}]"),
        })
        .collect();
    if parts.is_empty() {
        "(root)".into()
    } else {
        parts.join(".")
    }
}

/// Replacements for a node: other values of its kind at the edges (zero, negative, lengths and
/// counts that overflow, empty and huge strings, empty and doubled arrays) and other kinds.
fn replacements(v: &Value) -> Vec<(String, Value)> {
    let long = "w".repeat(100_000);
    let mut out: Vec<(String, Value)> = match v {
        Value::Number(_) => vec![
            ("0".into(), 0.into()),
            ("-1".into(), (-1).into()),
            ("2^32".into(), (1u64 << 32).into()),
            ("1e12".into(), 1_000_000_000_000u64.into()),
            ("u64::MAX".into(), u64::MAX.into()),
            ("1e300".into(), 1e300.into()),
            ("0.5".into(), 0.5.into()),
            ("a string".into(), "7".into()),
        ],
        Value::String(s) => vec![
            ("empty".into(), "".into()),
            ("100000 chars".into(), long.into()),
            (
                "reversed".into(),
                s.chars().rev().collect::<String>().into(),
            ),
            ("a number".into(), 1.into()),
        ],
        Value::Bool(b) => vec![
            ("negated".into(), (!b).into()),
            ("a number".into(), 1.into()),
        ],
        Value::Array(a) => {
            let mut doubled = a.clone();
            doubled.extend(a.iter().cloned());
            vec![
                ("empty".into(), Value::Array(vec![])),
                (
                    "first only".into(),
                    Value::Array(a.iter().take(1).cloned().collect()),
                ),
                ("doubled".into(), Value::Array(doubled)),
                ("a number".into(), 0.into()),
            ]
        }
        Value::Object(_) => vec![
            ("empty".into(), Value::Object(Default::default())),
            ("an array".into(), Value::Array(vec![])),
        ],
        Value::Null => vec![("0".into(), 0.into()), ("a string".into(), "x".into())],
    };
    if !v.is_null() {
        out.push(("null".into(), Value::Null));
    }
    out
}

/// Every node of `original` replaced ([`replacements`]) or removed, as documents; at most `cap`
/// of them, a seeded sample.
fn json_cases(original: &Value, cap: usize, rng: &mut Rng) -> Vec<(String, Value)> {
    let mut paths = Vec::new();
    json_paths(original, &mut Vec::new(), &mut paths);
    let mut cases = Vec::new();
    for path in paths {
        let name = path_name(&path);
        for (what, value) in replacements(&node(&mut original.clone(), &path).clone()) {
            let mut doc = original.clone();
            *node(&mut doc, &path) = value;
            cases.push((format!("{name} = {what}"), doc));
        }
        if let Some((Step::Key(k), parent)) = path.split_last() {
            let mut doc = original.clone();
            if let Some(o) = node(&mut doc, parent).as_object_mut() {
                o.remove(k);
                cases.push((format!("{name} removed"), doc));
            }
        }
    }
    rng.sample(cases, cap)
}

fn text_cases(kind: &str, original: &str, cap: usize, rng: &mut Rng) -> Vec<Case> {
    let doc: Value = serde_json::from_str(original).unwrap();
    json_cases(&doc, cap, rng)
        .into_iter()
        .map(|(name, doc)| Case {
            name: format!("{kind}: {name}"),
            bytes: doc.to_string().into_bytes(),
        })
        .collect()
}

/// Training-log cases: one line at a time (the first, an evaluation, the last) mutated as JSON,
/// the rest unchanged; and the log cut at a seeded byte.
fn log_cases(original: &str, cap: usize, rng: &mut Rng) -> Vec<Case> {
    let lines: Vec<&str> = original.lines().collect();
    let eval = lines
        .iter()
        .position(|l| l.contains("val_loss"))
        .unwrap_or(0);
    let mut cases = Vec::new();
    for at in [0, eval, lines.len() - 1] {
        for c in text_cases("log.jsonl", lines[at], usize::MAX, rng) {
            let mut all: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            all[at] = String::from_utf8(c.bytes).unwrap();
            cases.push(Case {
                name: format!("{} (line {at})", c.name),
                bytes: (all.join("\n") + "\n").into_bytes(),
            });
        }
    }
    let mut cases = rng.sample(cases, cap);
    let cut = rng.below(original.len());
    cases.push(Case {
        name: format!("log.jsonl: cut to {cut} bytes"),
        bytes: original.as_bytes()[..cut].to_vec(),
    });
    cases
}

/// TOML cases: the JSON mutations that TOML can express (no null, integers within i64),
/// and each float also as nan and inf.
fn toml_cases(kind: &str, original: &str, cap: usize, rng: &mut Rng) -> Vec<Case> {
    let table: toml::Table = original.parse().unwrap();
    let doc = serde_json::to_value(&table).unwrap();
    let mut cases: Vec<Case> = json_cases(&doc, usize::MAX, rng)
        .into_iter()
        .filter_map(|(name, doc)| {
            let table: toml::Table = serde_json::from_value(doc).ok()?;
            Some(Case {
                name: format!("{kind}: {name}"),
                bytes: toml::to_string(&table).ok()?.into_bytes(),
            })
        })
        .collect();
    for (key, value) in &table {
        if value.is_float() {
            for special in ["nan", "inf", "-inf"] {
                let mut t = table.clone();
                t.remove(key);
                let text = format!("{key} = {special}\n{}", toml::to_string(&t).unwrap());
                cases.push(Case {
                    name: format!("{kind}: {key} = {special}"),
                    bytes: text.into_bytes(),
                });
            }
        }
    }
    rng.sample(cases, cap)
}

/// Safetensors cases: the header length field overwritten, and the header's JSON mutated
/// (dtypes, shapes, offsets, the metadata) with the length rewritten to match.
fn safetensors_cases(kind: &str, original: &[u8], cap: usize, rng: &mut Rng) -> Vec<Case> {
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let header = &original[8..8 + header_len];
    let data = &original[8 + header_len..];
    let length = Field {
        what: "header length".into(),
        at: 0,
        width: 8,
    };
    let mut cases = binary_cases(kind, original, &[length], rng);
    let text = std::str::from_utf8(header).unwrap();
    for c in text_cases(&format!("{kind} header"), text, cap, rng) {
        let mut b = (c.bytes.len() as u64).to_le_bytes().to_vec();
        b.extend(&c.bytes);
        b.extend(data);
        cases.push(Case {
            name: c.name,
            bytes: b,
        });
    }
    cases
}

/// Writes `bytes` as `file` of the checkpoint `dir` and records them in its checksums.json, so
/// that the checkpoint's own integrity check passes and the loader behind it is what is tried.
fn rewrite_in_checkpoint(dir: &Path, file: &str, bytes: &[u8]) {
    std::fs::write(dir.join(file), bytes).unwrap();
    let sums = dir.join("checksums.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&sums).unwrap()).unwrap();
    json[file] = serde_json::json!({
        "bytes": bytes.len(),
        "crc32": format!("{:08x}", crc32fast::hash(bytes)),
    });
    std::fs::write(&sums, json.to_string()).unwrap();
}

/// Log-probs of a short text under a loaded model, which must be finite.
fn scores_finitely(loaded: &LoadedModel) -> Result<()> {
    let enc = loaded
        .tokenizer
        .encode("riverrun, past Eve and Adam's", false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ids: Vec<u32> = enc.get_ids().iter().take(8).copied().collect();
    if ids.len() < 2 {
        return Ok(());
    }
    let lp = wake2vec::infer::score::logprobs(&loaded.model, &ids)?;
    ensure!(
        lp.iter().all(|x| x.is_finite()),
        "QUIET: a loaded model scores non-finite log-probs {lp:?}"
    );
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// An injected copy of tiny-llama (rows 300..400 as Wake rows) and a finished four-step Phase 1
/// run on it.
fn base_run(tmp: &Scratch) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = tmp.path("run-model");
    copy_tree(&fixture("tiny-llama"), &model);
    std::fs::write(
        model.join("wake2vec.json"),
        r#"{"format":1,"base_vocab":300,"base_tokenizer_size":300,"wake_start":300,"wake_count":100}"#,
    )
    .unwrap();
    let corpus = tmp.path("corpus.txt");
    let text = "riverrun, past Eve and Adam's, from swerve of shore to bend of bay, brings us \
                by a commodius vicus of recirculation back to Howth Castle and Environs. ";
    std::fs::write(&corpus, text.repeat(40)).unwrap();
    let overrides: Vec<String> = [
        "steps=4",
        "seq_len=16",
        "save_every=2",
        "eval_every=2",
        "eval_blocks=2",
        "snapshot_every=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut config = TrainConfig::resolve(None, None, &overrides).unwrap();
    config.model = model.clone();
    config.corpus = corpus;
    let run = tmp.path("run");
    Trainer::start(config, &run).unwrap().run().unwrap();
    (model, run)
}

#[derive(Default)]
struct Tally {
    inputs: usize,
    errors: usize,
    successes: usize,
    panics: Vec<String>,
    quiet: Vec<String>,
}

#[test]
fn mutated_inputs_end_in_an_error_or_a_success_never_a_panic() {
    std::env::set_var(wake2vec::util::mem::LIMIT_VAR, LIMIT);
    let tmp = Scratch::new("mutation");
    let mut rng = Rng(SEED);

    // The valid originals.
    let qwen = fixture("tiny-qwen2");
    let gguf_path = tmp.path("original.gguf");
    write_gguf(&qwen, GgmlDType::Q8_0, &gguf_path);
    let gguf = std::fs::read(&gguf_path).unwrap();
    let weights = std::fs::read(qwen.join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(qwen.join("config.json")).unwrap();
    let tokenizer = std::fs::read_to_string(qwen.join("tokenizer.json")).unwrap();
    let (run_model, run) = base_run(&tmp);
    let run_toml = std::fs::read_to_string(run.join("run.toml")).unwrap();
    let manifest = std::fs::read_to_string(run_model.join("wake2vec.json")).unwrap();
    let lexicon = tmp.path("lexicon.txt");
    std::fs::write(&lexicon, "riverrun\ncommodius\nrecirculation\n").unwrap();
    let overrides = [
        format!("corpus={:?}", tmp.path("corpus.txt")),
        format!("lexicon={lexicon:?}"),
    ];
    let pipeline = wake2vec::pipeline::PipelineConfig::resolve(Some("demo"), None, &overrides)
        .and_then(|c| Ok(toml::to_string(&c)?))
        .unwrap();

    type Loader<'a> = Box<dyn Fn(&[u8], usize) -> Result<()> + 'a>;
    let model_dir = tmp.path("model");
    let fresh_model = |file: &str, bytes: &[u8]| {
        let _ = std::fs::remove_dir_all(&model_dir);
        copy_tree(&qwen, &model_dir);
        std::fs::write(model_dir.join(file), bytes).unwrap();
    };
    // A copy of the base run, changed by `edit`, read by `status` and resumed; with `train`, the
    // resumed run also trains to its end (run.toml unchanged: at most the base run's 4 steps).
    let resume_edited = |i: usize, edit: &dyn Fn(&Path), train: bool| -> Result<()> {
        let copy = tmp.path(&format!("run-{i}"));
        copy_tree(&run, &copy);
        edit(&copy);
        let status = wake2vec::run::status::status(&copy).map(|st| {
            wake2vec::run::status::render(&st);
        });
        let evals = wake2vec::run::select::read_evals(&copy.join("log.jsonl")).map(drop);
        let result = Trainer::resume(&copy, None).and_then(|mut t| match train {
            true => t.run().map(drop),
            false => Ok(()),
        });
        let _ = std::fs::remove_dir_all(&copy);
        status.and(evals).and(result)
    };
    let resume = |i: usize| resume_edited(i, &|_| {}, false);
    let newest = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .max_by_key(|n| n.trim_start_matches("step-").parse::<u64>().unwrap_or(0))
        .unwrap();
    let checkpoint = run.join("checkpoints").join(&newest);
    let state = std::fs::read_to_string(checkpoint.join("state.json")).unwrap();
    let params = std::fs::read(checkpoint.join("params.safetensors")).unwrap();
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let morphemes = r#"{"prefixes": {"un": ["undone", "unborn"], "re": ["rerun", "recirculation"]},
        "suffixes": {"ing": ["riverrunning", "bending"], "ation": ["recirculation", "nation"]}}"#;
    let gguf_cases = binary_cases("gguf", &gguf, &gguf_fields(&gguf), &mut rng);
    let formats: Vec<(Vec<Case>, Loader)> = vec![
        (
            rng.sample(gguf_cases, 2000),
            Box::new(|bytes, i| {
                let file = tmp.path("in.gguf");
                std::fs::write(&file, bytes)?;
                let out = tmp.path(&format!("imported-{i}"));
                let imported = wake2vec::hub::gguf::import(&file, &out);
                let result = imported.and_then(|summary| match summary.config {
                    Some(_) => scores_finitely(&LoadedModel::load(&out)?),
                    None => Ok(()),
                });
                let _ = std::fs::remove_dir_all(&out);
                result
            }),
        ),
        (
            safetensors_cases("model.safetensors", &weights, 400, &mut rng),
            Box::new(|bytes, _| {
                fresh_model("model.safetensors", bytes);
                scores_finitely(&LoadedModel::load(&model_dir)?)
            }),
        ),
        (
            text_cases("config.json", &config, 400, &mut rng),
            Box::new(|bytes, _| {
                fresh_model("config.json", bytes);
                scores_finitely(&LoadedModel::load(&model_dir)?)
            }),
        ),
        (
            text_cases("tokenizer.json", &tokenizer, 400, &mut rng),
            Box::new(|bytes, _| {
                fresh_model("tokenizer.json", bytes);
                wake2vec::vocab::BaseTokenizer::from_file(&model_dir.join("tokenizer.json"))?;
                scores_finitely(&LoadedModel::load(&model_dir)?)
            }),
        ),
        (
            toml_cases("run.toml", &run_toml, 400, &mut rng),
            Box::new(|bytes, i| {
                std::fs::write(run.join("run.toml"), bytes)?;
                let result = resume(i);
                std::fs::write(run.join("run.toml"), &run_toml)?;
                result
            }),
        ),
        (
            text_cases("wake2vec.json", &manifest, 100, &mut rng),
            Box::new(|bytes, i| {
                std::fs::write(run_model.join("wake2vec.json"), bytes)?;
                let result = resume(i);
                std::fs::write(run_model.join("wake2vec.json"), &manifest)?;
                result
            }),
        ),
        (
            toml_cases("pipeline.toml", &pipeline, 400, &mut rng),
            Box::new(|bytes, _| {
                let file = tmp.path("pipeline.toml");
                std::fs::write(&file, bytes)?;
                wake2vec::pipeline::read_config(&file)?.validate()
            }),
        ),
        (
            text_cases("state.json", &state, 300, &mut rng),
            Box::new(|bytes, i| {
                let edit = |copy: &Path| {
                    rewrite_in_checkpoint(
                        &copy.join("checkpoints").join(&newest),
                        "state.json",
                        bytes,
                    )
                };
                resume_edited(i, &edit, true)
            }),
        ),
        (
            safetensors_cases("params.safetensors", &params, 200, &mut rng),
            Box::new(|bytes, i| {
                let edit = |copy: &Path| {
                    let dir = copy.join("checkpoints").join(&newest);
                    rewrite_in_checkpoint(&dir, "params.safetensors", bytes)
                };
                resume_edited(i, &edit, true)
            }),
        ),
        (
            log_cases(&log, 300, &mut rng),
            Box::new(|bytes, i| {
                let edit = |copy: &Path| std::fs::write(copy.join("log.jsonl"), bytes).unwrap();
                resume_edited(i, &edit, true)
            }),
        ),
        (
            text_cases("morpheme_data.json", morphemes, 200, &mut rng),
            Box::new(|bytes, _| {
                let file = tmp.path("morpheme_data.json");
                std::fs::write(&file, bytes)?;
                wake2vec::lexicon::morphemes::MorphemeData::load(&file).map(drop)
            }),
        ),
    ];
    NAMES
        .set(
            formats
                .iter()
                .flat_map(|(cases, _)| cases.iter().map(|c| c.name.clone()))
                .collect(),
        )
        .unwrap();

    // Each loader accepts its unchanged original, so that the errors below are the mutations'.
    let originals: [&[u8]; 11] = [
        &gguf,
        &weights,
        config.as_bytes(),
        tokenizer.as_bytes(),
        run_toml.as_bytes(),
        manifest.as_bytes(),
        pipeline.as_bytes(),
        state.as_bytes(),
        &params,
        log.as_bytes(),
        morphemes.as_bytes(),
    ];
    for ((cases, load), original) in formats.iter().zip(originals) {
        let kind = cases[0].name.split(':').next().unwrap_or("");
        if let Err(e) = load(original, usize::MAX) {
            panic!("the unchanged {kind} does not load: {e:#}");
        }
    }

    let mut tally = Tally::default();
    let mut index = 0;
    for (cases, load) in &formats {
        for case in cases {
            CURRENT.store(index, Ordering::Relaxed);
            tally.inputs += 1;
            match catch_unwind(AssertUnwindSafe(|| load(&case.bytes, index))) {
                Ok(Ok(())) => tally.successes += 1,
                Ok(Err(e)) if format!("{e:#}").starts_with("QUIET") => {
                    tally.quiet.push(format!("{}: {e:#}", case.name))
                }
                Ok(Err(_)) => tally.errors += 1,
                Err(_) => tally.panics.push(case.name.clone()),
            }
            index += 1;
        }
    }
    CURRENT.store(usize::MAX, Ordering::Relaxed);
    let per_format: Vec<String> = formats
        .iter()
        .map(|(cases, _)| {
            let kind = cases[0].name.split(':').next().unwrap_or("");
            format!("{kind} {}", cases.len())
        })
        .collect();
    eprintln!(
        "mutation: {} inputs ({}), {} errors, {} successes, {} panics, {} non-finite successes; \
         peak heap {:.1} MiB, allocation bound {} MiB",
        tally.inputs,
        per_format.join(", "),
        tally.errors,
        tally.successes,
        tally.panics.len(),
        tally.quiet.len(),
        PEAK.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
        BOUND >> 20
    );
    assert!(tally.inputs >= 500, "only {} inputs", tally.inputs);
    assert!(tally.panics.is_empty(), "panics on: {:#?}", tally.panics);
    assert!(
        tally.quiet.is_empty(),
        "wrong but quiet: {:#?}",
        tally.quiet
    );
}
