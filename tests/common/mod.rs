//! Helpers shared by the integration tests: fixture paths, self-removing scratch directories,
//! random adapters, training-log readers. Each test crate uses a part of them.
#![allow(dead_code)]

pub mod gguf;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A committed fixture under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty directory, unique to this process and call.
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("wake2vec-test-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Adapters on `model` with PEFT's initialisation for `A` and, unlike PEFT's, a random non-zero
/// `B` (uniform in `±b_bound`), so that they change the model's output.
pub fn random_lora(
    model: &wake2vec::model::Llama,
    config: wake2vec::model::LoraConfig,
    seed: u64,
    b_bound: f64,
) -> wake2vec::model::Lora {
    let lora = wake2vec::model::Lora::new(model, config, seed).unwrap();
    let mut rng = wake2vec::util::rng::Rng::new(seed ^ 0xB);
    for (name, var) in lora.params() {
        if name.contains("lora_B") {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|_| ((2.0 * rng.next_f64() - 1.0) * b_bound) as f32)
                .collect();
            var.set(&candle_core::Tensor::from_vec(v, var.shape(), var.device()).unwrap())
                .unwrap();
        }
    }
    lora
}

/// A run's `log.jsonl` lines without the timing fields, which differ between runs.
pub fn log_values(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("elapsed_s");
            o.remove("tokens_per_s");
            v
        })
        .collect()
}

/// How many optimizer steps a run's `log.jsonl` records (0 before it exists).
pub fn step_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("log.jsonl"))
        .map(|t| t.lines().filter(|l| l.contains(r#""kind":"step""#)).count())
        .unwrap_or(0)
}

/// Waits (up to two minutes, polling every millisecond) until `cond` holds; panics if `child`
/// exits first.
pub fn wait_for(child: &mut std::process::Child, what: &str, cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the process exited ({status}) before {what}");
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The Wake text in `../shared` (tests that need it skip when it is absent).
pub const WAKE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/finnegans_wake.txt"
);

/// Copies a fixture model into `dir/model` with rows `start .. start + count` as Wake rows, and
/// the first `chars` characters of the Wake into `dir/corpus.txt`. `None` when the corpus is
/// absent.
pub fn setup(dir: &Path, fixture: &str, start: usize, count: usize, chars: usize) -> Option<()> {
    let text = match std::fs::read_to_string(WAKE) {
        Ok(t) => t,
        Err(_) => {
            eprintln!("skipping: {WAKE} is absent");
            return None;
        }
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    std::fs::write(
        model.join("wake2vec.json"),
        format!(
            r#"{{"format":1,"base_vocab":{start},"base_tokenizer_size":{start},"wake_start":{start},"wake_count":{count}}}"#
        ),
    )
    .unwrap();
    let end = text
        .char_indices()
        .nth(chars)
        .map_or(text.len(), |(i, _)| i);
    std::fs::write(dir.join("corpus.txt"), &text[..end]).unwrap();
    Some(())
}
