//! The configuration of a training run: defaults (the seed's Phase 1), then a TOML file, then
//! command-line overrides (`key=value`, dotted keys for tables). The resolved value is written to
//! `RUN/run.toml` with every default spelled out, and read back on resume.

use super::aux_loss::AuxConfig;
use super::optim::{AdamWConfig, OptimizerConfig};
use super::schedule::ScheduleKind;
use crate::model::lora::LoraConfig;
use crate::nn::device::{DeviceSpec, WeightDtype};
use crate::run::select::Rule;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Training presets (`wake2vec train --preset NAME`): name, TOML text.
pub const PRESETS: &[(&str, &str)] = &[("p3b", include_str!("../../presets/p3b.toml"))];

/// Which training phase: what trains and what stays frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Only the Wake rows of the embedding (and of an untied head) train.
    P1,
    /// LoRA adapters train; the Wake rows of the source run are loaded and frozen.
    P2,
    /// The Wake rows and the LoRA adapters of the source run train, under the language-model
    /// loss plus the auxiliary geometric losses.
    P3,
}

impl Phase {
    /// The name used in logs and file names.
    pub fn name(self) -> &'static str {
        match self {
            Phase::P1 => "p1",
            Phase::P2 => "p2",
            Phase::P3 => "p3",
        }
    }

    /// Whether the Wake rows train.
    pub fn trains_wake_rows(self) -> bool {
        matches!(self, Phase::P1 | Phase::P3)
    }

    /// Whether the phase has LoRA adapters.
    pub fn has_lora(self) -> bool {
        matches!(self, Phase::P2 | Phase::P3)
    }
}

/// Which embedding rows Phase 1 trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainRows {
    /// The Wake rows only (the base rows stay as the model has them).
    #[default]
    Wake,
    /// The whole embedding (and the untied head), as the seed's Phase 1 was run: its tied
    /// matrix had every row trainable.
    All,
}

/// Where a phase after the first starts: a checkpoint of an earlier run, chosen by a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Source {
    /// The earlier run directory (Phase 1 for Phase 2, Phase 2 for Phase 3).
    pub run: PathBuf,
    /// `best-val`, `min-gap`, `final` or `step-N` (run::select).
    pub select: Rule,
    /// The step the rule chose; filled in when the run starts and recorded in run.toml.
    pub step: Option<u64>,
}

impl Default for Source {
    fn default() -> Self {
        Self {
            run: PathBuf::new(),
            select: Rule::BestVal,
            step: None,
        }
    }
}

/// Every setting of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub phase: Phase,
    /// Where it trains: `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: DeviceSpec,
    /// The frozen weights' precision: `f32`, `bf16` or `f16` (anything but f32 runs the
    /// generic kernels).
    pub dtype: WeightDtype,
    /// The model directory (HF layout with wake2vec.json).
    pub model: PathBuf,
    /// The training text.
    pub corpus: PathBuf,
    /// A lexicon file whose text is appended to the corpus (`corpus + "\n" + lexicon`), as some
    /// original runs did; empty for none.
    pub append_lexicon: PathBuf,
    /// Phase 1: `wake` trains the Wake rows, `all` the whole embedding (and untied head).
    pub train_rows: TrainRows,
    /// Tokens per block.
    pub seq_len: usize,
    /// Fraction of blocks that train; the rest validate.
    pub split: f64,
    /// Seeds the split and the per-epoch order.
    pub seed: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Blocks per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    pub schedule: ScheduleKind,
    /// Warmup as a fraction of `steps` (rounded up), unless `warmup_steps > 0`.
    pub warmup_ratio: f64,
    pub warmup_steps: u64,
    /// Gradient-norm clipping; 0 disables it.
    pub max_grad_norm: f64,
    /// Evaluate every N optimizer steps (and at step 0 and at the end); 0 only at the ends.
    pub eval_every: u64,
    /// Validation blocks per evaluation (the first N of the validation set); 0 for all.
    pub eval_blocks: usize,
    /// Checkpoint every N steps (and at the end); 0 only at the end.
    pub save_every: u64,
    /// Checkpoints kept besides the best one.
    pub keep_last: usize,
    /// Keep the checkpoint of the best validation loss (saving one at each new best).
    pub keep_best: bool,
    /// Save the Wake rows every N steps (and at step 0); 0 disables snapshots.
    pub snapshot_every: u64,
    /// Stop after this many evaluations without an improvement of more than `min_delta`; 0 off.
    pub patience: u64,
    pub min_delta: f64,
    pub optimizer: OptimizerConfig,
    /// Phases 2 and 3: the run and checkpoint they start from.
    pub source: Source,
    /// Phases 2 and 3: the adapters (Phase 3 takes them from its source).
    pub lora: LoraConfig,
    /// Phase 3: the auxiliary losses.
    pub aux: AuxConfig,
}

impl Default for TrainConfig {
    /// The seed's Phase 1 (docs/origin/original-system.md §3.3, TinyLlama P1 as run).
    fn default() -> Self {
        Self {
            phase: Phase::P1,
            device: DeviceSpec::Cpu,
            dtype: WeightDtype::F32,
            model: PathBuf::new(),
            corpus: PathBuf::new(),
            append_lexicon: PathBuf::new(),
            train_rows: TrainRows::Wake,
            seq_len: 256,
            split: 0.9,
            seed: 42,
            steps: 3000,
            batch_size: 1,
            grad_accum: 16,
            lr: 3e-4,
            schedule: ScheduleKind::Linear,
            warmup_ratio: 0.1,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            eval_every: 100,
            eval_blocks: 0,
            save_every: 100,
            keep_last: 3,
            keep_best: true,
            snapshot_every: 50,
            patience: 0,
            min_delta: 0.0,
            optimizer: OptimizerConfig::default(),
            source: Source::default(),
            lora: LoraConfig::default(),
            aux: AuxConfig::default(),
        }
    }
}

impl TrainConfig {
    /// The seed's settings for `phase` (docs/origin/original-system.md §3.3, §4.3, §5.2, TinyLlama).
    pub fn for_phase(phase: Phase) -> Self {
        let p1 = Self::default();
        let adamw = |weight_decay| {
            OptimizerConfig::Adamw(AdamWConfig {
                weight_decay,
                ..AdamWConfig::default()
            })
        };
        // Phases 2 and 3 share the Trainer-default AdamW, cosine schedule, 8 × 2 and eval 200.
        let later = Self {
            optimizer: adamw(0.01),
            schedule: ScheduleKind::Cosine,
            batch_size: 8,
            grad_accum: 2,
            eval_every: 200,
            save_every: 200,
            ..p1.clone()
        };
        match phase {
            Phase::P1 => p1,
            Phase::P2 => Self {
                phase,
                lr: 2e-5,
                snapshot_every: 0,
                ..later
            },
            Phase::P3 => Self {
                phase,
                lr: 5e-5,
                patience: 5,
                source: Source {
                    select: Rule::MinGap,
                    ..Source::default()
                },
                ..later
            },
        }
    }
}

impl TrainConfig {
    /// Defaults, overlaid with the preset, `file` (TOML) and `overrides` (`key=value`), each if
    /// given ([`Layers`]). The defaults are those of the phase the preset, the file or the
    /// overrides name (Phase 1 if none).
    pub fn resolve(
        preset: Option<&str>,
        file: Option<&Path>,
        overrides: &[String],
    ) -> Result<Self> {
        const LAYERS: Layers = Layers {
            presets: PRESETS,
            preset_kind: "training preset",
            file_kind: "config file",
        };
        let user = LAYERS.resolve(preset, file, overrides)?;
        Self::from_table(user)
    }

    /// The phase's defaults overlaid with `user`.
    pub fn from_table(user: toml::Table) -> Result<Self> {
        let phase: Phase = match user.get("phase") {
            Some(v) => v
                .clone()
                .try_into()
                .map_err(|_| anyhow::anyhow!("phase must be \"p1\", \"p2\" or \"p3\", got {v}"))?,
            None => Phase::P1,
        };
        let mut table = toml::Table::try_from(Self::for_phase(phase))?;
        merge(&mut table, user);
        let config: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|e| anyhow::anyhow!("invalid training configuration: {e}"))?;
        Ok(config)
    }

    /// Reads a resolved `run.toml`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::util::fs::read_to_string(path)?;
        toml::from_str(&text).with_context(|| format!("{} is not a valid run.toml", path.display()))
    }

    /// The TOML text of the resolved configuration.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.model.as_os_str().is_empty(),
            "no model: pass --model DIR (an injected model directory)"
        );
        ensure!(
            !self.corpus.as_os_str().is_empty(),
            "no corpus: pass --corpus FILE"
        );
        ensure!(
            self.seq_len >= 2,
            "seq_len must be at least 2, got {}",
            self.seq_len
        );
        ensure!(
            self.split > 0.0 && self.split < 1.0,
            "split must be in (0, 1), got {}",
            self.split
        );
        ensure!(self.steps >= 1, "steps must be at least 1");
        ensure!(self.batch_size >= 1, "batch_size must be at least 1");
        ensure!(self.grad_accum >= 1, "grad_accum must be at least 1");
        ensure!(
            self.lr.is_finite() && self.lr >= 0.0,
            "lr must be a finite number >= 0, got {}",
            self.lr
        );
        ensure!(
            self.max_grad_norm >= 0.0,
            "max_grad_norm must be >= 0 (0 disables clipping)"
        );
        ensure!(
            self.min_delta.is_finite() && self.min_delta >= 0.0,
            "min_delta must be a finite number >= 0, got {}",
            self.min_delta
        );
        ensure!(
            (0.0..=1.0).contains(&self.warmup_ratio),
            "warmup_ratio must be in [0, 1], got {}",
            self.warmup_ratio
        );
        match self.phase {
            Phase::P1 => ensure!(
                self.source.run.as_os_str().is_empty(),
                "phase p1 starts from the injected model, not from a run: remove source.run"
            ),
            Phase::P2 | Phase::P3 => ensure!(
                !self.source.run.as_os_str().is_empty(),
                "phase {} starts from a checkpoint of an earlier run: set source.run (a phase {} run directory) and source.select",
                self.phase.name(),
                if self.phase == Phase::P2 { "p1" } else { "p2" }
            ),
        }
        ensure!(
            self.phase == Phase::P1 || self.train_rows == TrainRows::Wake,
            "train_rows = \"all\" applies to phase p1 only: remove it from this phase {} run",
            self.phase.name()
        );
        if self.phase.has_lora() {
            self.lora.validate()?;
        }
        if self.phase == Phase::P3 {
            self.aux.validate()?;
        }
        self.optimizer.validate()
    }

    /// Refuses a micro-batch whose activations alone cannot fit in this machine's memory: a
    /// lower bound per token of the logits and their gradient, and per layer of what the
    /// backward pass keeps (norm inputs, projections, the MLP's hidden width, attention rows).
    pub fn check_memory(&self, model: &crate::hub::config::ModelConfig) -> Result<()> {
        let n = |x: usize| x as u128;
        let per_layer = n(model.hidden_size) * 6
            + n(model.intermediate_size) * 3
            + n(model.num_heads).saturating_mul(n(self.seq_len));
        let per_token = (n(model.vocab_size) * 2).saturating_add(n(model.num_layers) * per_layer);
        let bytes = n(self.batch_size)
            .saturating_mul(n(self.seq_len))
            .saturating_mul(per_token)
            .saturating_mul(4);
        crate::util::mem::check_fits(
            bytes,
            &format!(
                "a micro-batch of batch_size {} × seq_len {} (its activations, at least)",
                self.batch_size, self.seq_len
            ),
            "lower batch_size (grad_accum gives the same effective batch in smaller steps)",
        )
    }

    /// Warmup steps as HF resolves them.
    pub fn warmup(&self) -> u64 {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * self.steps as f64).ceil() as u64
        }
    }
}

/// The layers of a configuration, named as its errors name them: a preset, then a TOML file,
/// then `key=value` overrides, each overlaid on the ones before by [`merge`].
pub struct Layers<'a> {
    /// The shipped presets: name, TOML text.
    pub presets: &'a [(&'a str, &'a str)],
    /// What a preset is called in errors ("training preset").
    pub preset_kind: &'a str,
    /// What the file is called in errors ("config file").
    pub file_kind: &'a str,
}

impl Layers<'_> {
    /// The table of preset `preset` overlaid with `file`, then with each of `overrides`; a
    /// layer not given is empty.
    pub fn resolve(
        &self,
        preset: Option<&str>,
        file: Option<&Path>,
        overrides: &[String],
    ) -> Result<toml::Table> {
        let mut table = match preset {
            Some(name) => self.preset(name)?,
            None => toml::Table::new(),
        };
        if let Some(path) = file {
            let text = crate::util::fs::read_to_string(path).with_context(|| {
                format!("cannot read the {} {}", self.file_kind, path.display())
            })?;
            let user: toml::Table = text
                .parse()
                .with_context(|| format!("{} is not valid TOML", path.display()))?;
            merge(&mut table, user);
        }
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        Ok(table)
    }

    fn preset(&self, name: &str) -> Result<toml::Table> {
        let text = self
            .presets
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .with_context(|| {
                let names: Vec<&str> = self.presets.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown {} '{name}': expected one of {}",
                    self.preset_kind,
                    names.join(", ")
                )
            })?;
        Ok(text.parse().expect("presets are valid TOML"))
    }
}

/// Overlays `user` onto `base`, table by table.
fn merge(base: &mut toml::Table, user: toml::Table) {
    for (k, v) in user {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) if k != "optimizer" => merge(b, u),
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => {
                // A different optimizer replaces the table (its fields differ); the same one
                // overlays it.
                if u.get("name").is_some() && u.get("name") != b.get("name") {
                    *b = u;
                } else {
                    merge(b, u);
                }
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Applies one `key=value` override; `value` is read as TOML (`3e-4`, `true`, `"cosine"`), or as
/// a string when it is not valid TOML (`schedule=cosine`).
fn apply_override(table: &mut toml::Table, o: &str) -> Result<()> {
    let Some((key, value)) = o.split_once('=') else {
        bail!("override '{o}' is not key=value (e.g. --set lr=5e-4)");
    };
    if value.trim().parse::<i128>().is_ok() && value.trim().parse::<i64>().is_err() {
        bail!("override '{o}': {value} is out of range (values reach 9223372036854775807)");
    }
    let value: toml::Value = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let path: Vec<&str> = key.trim().split('.').collect();
    let mut user = toml::Table::new();
    let mut cur = &mut user;
    for (i, part) in path.iter().enumerate() {
        if i + 1 == path.len() {
            cur.insert(part.to_string(), value.clone());
        } else {
            cur = cur
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("just inserted a table");
        }
    }
    merge(table, user);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::AdafactorConfig;

    #[test]
    fn defaults_are_the_seeds_phase_1_and_round_trip() {
        let c = TrainConfig::default();
        assert_eq!(c.warmup(), 300);
        assert_eq!(
            c.optimizer,
            OptimizerConfig::Adafactor(AdafactorConfig::default())
        );
        let back: TrainConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn train_rows_all_is_phase_1_only() {
        let all = |phase: &str| {
            let mut c = TrainConfig::resolve(
                None,
                None,
                &[format!("phase={phase}"), "train_rows=all".into()],
            )
            .unwrap();
            c.source.run = PathBuf::from(if phase == "p1" { "" } else { "p1" });
            (c.model, c.corpus) = ("model".into(), "corpus.txt".into());
            c
        };
        assert_eq!(all("p1").train_rows, TrainRows::All);
        all("p1").validate().unwrap();
        let err = all("p2").validate().unwrap_err();
        assert!(format!("{err}").contains("phase p1 only"), "{err}");
        let err = TrainConfig::resolve(None, None, &["train_rows=some".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("train_rows"), "{err:#}");
    }

    #[test]
    fn phase_defaults_and_the_p3b_preset() {
        let p2 = TrainConfig::resolve(None, None, &["phase=p2".into()]).unwrap();
        assert_eq!((p2.lr, p2.batch_size, p2.grad_accum), (2e-5, 8, 2));
        assert_eq!(p2.optimizer.weight_decay(), 0.01);
        assert_eq!(p2.schedule, ScheduleKind::Cosine);
        let p3 = TrainConfig::resolve(Some("p3b"), None, &["steps=10".into()]).unwrap();
        assert_eq!(p3.phase, Phase::P3);
        assert_eq!((p3.lr, p3.steps, p3.patience), (2e-5, 10, 3));
        assert_eq!((p3.aux.lambda_morph, p3.aux.lambda_device), (50.0, 2.0));
        assert_eq!(p3.source.select, Rule::MinGap);
        let err = TrainConfig::resolve(Some("p4"), None, &[]).unwrap_err();
        assert!(format!("{err:#}").contains("p3b"), "{err:#}");
        let err = TrainConfig::resolve(None, None, &["phase=p9".into()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("\"p1\", \"p2\" or \"p3\""),
            "{err:#}"
        );
    }

    #[test]
    fn preset_then_file_then_overrides() {
        let dir = std::env::temp_dir().join(format!("w2v-layers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "lr = 1e-3\npatience = 4\n").unwrap();
        let c = TrainConfig::resolve(Some("p3b"), Some(&f), &["patience=5".into()]).unwrap();
        assert_eq!((c.phase, c.lr, c.patience), (Phase::P3, 1e-3, 5));
        assert_eq!(c.aux.lambda_morph, 50.0);
        let err = TrainConfig::resolve(None, Some(&dir.join("none.toml")), &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read the config file"),
            "{err:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_then_overrides() {
        let dir = std::env::temp_dir().join(format!("w2v-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "lr = 1e-3\nsteps = 50\n[optimizer]\nname = \"adamw\"\nweight_decay = 0.01\n",
        )
        .unwrap();
        let c = TrainConfig::resolve(
            None,
            Some(&f),
            &[
                "steps=60".into(),
                "schedule=cosine".into(),
                "optimizer.beta2=0.99".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (c.lr, c.steps, c.schedule),
            (1e-3, 60, ScheduleKind::Cosine)
        );
        match c.optimizer {
            OptimizerConfig::Adamw(a) => assert_eq!((a.weight_decay, a.beta2), (0.01, 0.99)),
            other => panic!("expected adamw, got {other:?}"),
        }
        let err = TrainConfig::resolve(None, None, &["learning_rate=1".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("learning_rate"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
