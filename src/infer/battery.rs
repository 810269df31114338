//! The original's generation battery (docs/origin/original-system.md §7.1): one sample at temperature 0.9,
//! one at 1.1, three at 0.9, and the sweep 0.5 / 0.7 / 0.9 / 1.0 / 1.2, all with top-p 0.92,
//! top-k 50, repetition penalty 1.15; each sample with its text metrics, written to
//! `samples.md` (for reading) and `samples.jsonl` (for the report).

use crate::infer::generate::{self, Limits};
use crate::infer::sampling::{Sampler, SamplingParams};
use crate::infer::text_metrics::{self, BatterySample, KnownWords};
use crate::model::LoadedModel;
use crate::util::fs;
use anyhow::Result;
use std::fmt::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// `(label, temperature)` of every sample of the battery, in order.
pub fn plan() -> Vec<(String, f32)> {
    let mut p = vec![
        ("single sample, temperature 0.9".to_string(), 0.9),
        ("single sample, temperature 1.1".to_string(), 1.1),
    ];
    for i in 1..=3 {
        p.push((format!("three samples at 0.9: {i} of 3"), 0.9));
    }
    for t in [0.5f32, 0.7, 0.9, 1.0, 1.2] {
        p.push((format!("temperature sweep: {t}"), t));
    }
    p
}

/// What the battery samples: the prompt, the sampling parameters (each sample sets its own
/// temperature), the length of each sample and the seed of the first.
#[derive(Debug, Clone)]
pub struct Settings {
    pub prompt: String,
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl Settings {
    /// The original's battery: the default prompt and sampling parameters, seed 42.
    pub fn original(max_new_tokens: usize) -> Self {
        Self {
            prompt: generate::DEFAULT_PROMPT.to_string(),
            params: SamplingParams::default(),
            max_new_tokens,
            seed: 42,
        }
    }

    /// Each sample's sampling parameters: the settings' with the plan's temperature.
    pub fn params(&self) -> Vec<SamplingParams> {
        plan()
            .iter()
            .map(|&(_, temperature)| SamplingParams {
                temperature,
                ..self.params
            })
            .collect()
    }

    /// A fresh sampler for each sample, sample `i` seeded `seed + i`.
    pub fn samplers(&self) -> Result<Vec<Sampler>> {
        self.params()
            .into_iter()
            .enumerate()
            .map(|(i, p)| Sampler::new(p, self.seed + i as u64))
            .collect()
    }
}

/// Runs the battery, its samples decoded together ([`generate::generate_batch`]);
/// `on_sample` sees each sample once all are finished. Sample `i` uses seed `seed + i`, so any
/// one can be regenerated alone. `wake` is the model's Wake rows, when known.
pub fn run(
    m: &LoadedModel,
    settings: &Settings,
    known: &KnownWords,
    wake: Option<Range<usize>>,
    on_sample: &mut dyn FnMut(&BatterySample),
) -> Result<Vec<BatterySample>> {
    let weights = generate::Decoder::new(&m.model)?;
    let limits = Limits {
        max_new_tokens: settings.max_new_tokens,
        stop_at_eos: true,
    };
    let params = settings.params();
    let mut samplers = settings.samplers()?;
    let samples = generate::generate_batch(
        &weights,
        &m.model,
        &m.tokenizer,
        &settings.prompt,
        limits,
        &mut samplers,
    )?;
    let mut out = Vec::new();
    for (i, ((label, temperature), s)) in plan().into_iter().zip(samples).enumerate() {
        let metrics = text_metrics::metrics(&s.text, known, &s.ids, wake.clone());
        let sample = BatterySample {
            label,
            temperature,
            top_p: params[i].top_p,
            top_k: params[i].top_k,
            repetition_penalty: params[i].repetition_penalty,
            seed: settings.seed + i as u64,
            prompt: settings.prompt.clone(),
            text: s.text,
            tokens: s.ids.len(),
            metrics,
        };
        on_sample(&sample);
        out.push(sample);
    }
    Ok(out)
}

/// `samples.md`: prompt, parameters, the raw text block-quoted, and the metrics.
pub fn markdown(samples: &[BatterySample], model: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Generation battery — {model}\n");
    if let Some(s) = samples.first() {
        let _ = writeln!(md, "Prompt: `{}`  ", s.prompt);
        let _ = writeln!(
            md,
            "Params: top-p {}, top-k {}, repetition penalty {}; raw output, no cherry-picking.\n",
            s.top_p, s.top_k, s.repetition_penalty
        );
    }
    for s in samples {
        let m = &s.metrics;
        let _ = writeln!(md, "## {}\n", s.label);
        let _ = writeln!(
            md,
            "temperature {} · seed {} · {} tokens\n",
            s.temperature, s.seed, s.tokens
        );
        for line in format!("{}{}", s.prompt, s.text).lines() {
            let _ = writeln!(md, "> {line}");
        }
        let _ = writeln!(md);
        let _ = writeln!(
            md,
            "| Wake-token share | coinage rate | fused-word rate | distinct-1 | distinct-2 | distinct-3 | repetition rate |\n|---|---|---|---|---|---|---|"
        );
        let _ = writeln!(
            md,
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            m.wake_token_share
                .map_or("–".to_string(), |v| format!("{v:.3}")),
            m.coinage_rate,
            m.fused_rate,
            m.distinct_1,
            m.distinct_2,
            m.distinct_3,
            m.repetition_rate
        );
        if !m.fused_examples.is_empty() {
            let _ = writeln!(md, "\nFused: {}", m.fused_examples.join(", "));
        }
        let _ = writeln!(md);
    }
    md
}

/// Writes `samples.md` and `samples.jsonl` into `dir`.
pub fn write(dir: &Path, samples: &[BatterySample], model: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    fs::write(&dir.join("samples.md"), markdown(samples, model).as_bytes())?;
    let mut jsonl = String::new();
    for s in samples {
        jsonl.push_str(&serde_json::to_string(s)?);
        jsonl.push('\n');
    }
    fs::write(&dir.join("samples.jsonl"), jsonl.as_bytes())
}

/// The `samples.jsonl` in `dir`, when there is one.
pub fn existing(dir: &Path) -> Option<PathBuf> {
    let p = dir.join("samples.jsonl");
    p.is_file().then_some(p)
}

/// Reads `samples.jsonl`.
pub fn read(path: &Path) -> Result<Vec<BatterySample>> {
    let text = crate::util::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_battery_is_the_originals() {
        let temps: Vec<f32> = plan().into_iter().map(|p| p.1).collect();
        assert_eq!(
            temps,
            vec![0.9, 1.1, 0.9, 0.9, 0.9, 0.5, 0.7, 0.9, 1.0, 1.2]
        );
    }
}
