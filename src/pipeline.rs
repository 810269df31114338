//! `wake2vec run`: the whole study as one resumable job. Inject the lexicon, train Phase 1, 2 and
//! 3 (each later phase starting from the checkpoint its selection rule picks), export the final
//! model with the adapters merged, analyze it, sample the generation battery and write the
//! report. Every stage writes its output atomically and is skipped when its output exists, and
//! a phase in progress resumes from its newest checkpoint, so running the same command again
//! after a kill or Ctrl-C continues where it stopped.
//!
//! The output directory:
//!
//! ```text
//! OUT/pipeline.toml   the resolved settings (preset, then file, then --set)
//! OUT/model/          the injected model (wake2vec inject)
//! OUT/morphemes.json  affixes mined from the lexicon, when no morpheme file is given
//! OUT/p1 p2 p3/       the phase runs (run directories, see docs/formats.md)
//! OUT/final/          Phase 3's selected checkpoint, adapters merged (an HF directory)
//! OUT/analysis/       summary.json and figures of the final model (drift against OUT/model)
//! OUT/samples.jsonl   the generation battery on the final model (and samples.md)
//! OUT/report.html     everything above on one page
//! ```

use crate::hub::cache;
use crate::infer::battery;
use crate::infer::control::{self, ControlReport, ControlRow, ControlText};
use crate::infer::text_metrics::KnownWords;
use crate::lexicon::morphemes::MorphemeData;
use crate::lexicon::{Case, Lexicon};
use crate::nn::device::{Compute, DeviceSpec, WeightDtype};
use crate::run::dir::RunDir;
use crate::run::select::Rule;
use crate::train::{self, Outcome, Phase, TrainConfig, Trainer};
use crate::util::fs::{self, absolute};
use crate::{report, vocab};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The presets shipped with the tool: name, TOML text.
pub const PRESETS: &[(&str, &str)] = &[
    ("demo", include_str!("../presets/demo.toml")),
    ("seed", include_str!("../presets/seed.toml")),
];

/// Every setting of a pipeline (`pipeline.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// The preset the settings started from (informational).
    pub preset: String,
    /// The base model: `smollm2-135m`, an HF directory or a .gguf file.
    pub model: String,
    pub corpus: PathBuf,
    pub lexicon: PathBuf,
    pub inject: InjectSettings,
    /// Morpheme data for Phase 3 (morpheme_data.json or wake_embedding_groups.jsonl); empty:
    /// affixes mined from the lexicon into OUT/morphemes.json.
    pub morphemes: PathBuf,
    /// Where every phase trains and the samples are drawn (`cpu`, `cuda`, `cuda:N`, `auto`);
    /// a phase's own `device` wins.
    pub device: DeviceSpec,
    /// The frozen weights' precision of every phase (`f32`, `bf16`, `f16`); a phase's own
    /// `dtype` wins.
    pub dtype: WeightDtype,
    /// Training settings of each phase (the keys of run.toml; the phase's seed defaults fill
    /// the rest; model, corpus and source are set by the pipeline).
    pub p1: toml::Table,
    pub p2: toml::Table,
    pub p3: toml::Table,
    /// A control text the study never trains on (ordinary prose): bits per byte and the KL
    /// divergence from the base model on it, for the base, the injected model and the end of
    /// each phase (OUT/control.json). Empty: not measured.
    pub control: PathBuf,
    /// Control segments of about 1,000 bytes scored per model.
    pub control_segments: usize,
    pub finish: FinishSettings,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            preset: String::new(),
            model: cache::DEFAULT_MODEL.into(),
            corpus: PathBuf::new(),
            lexicon: PathBuf::new(),
            inject: InjectSettings::default(),
            morphemes: PathBuf::new(),
            device: DeviceSpec::Cpu,
            dtype: WeightDtype::F32,
            p1: toml::Table::new(),
            p2: toml::Table::new(),
            p3: toml::Table::new(),
            control: PathBuf::new(),
            control_segments: 16,
            finish: FinishSettings::default(),
        }
    }
}

/// How the lexicon is injected (`wake2vec inject`'s options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InjectSettings {
    /// mean-noise, spherical, subword-mean or compositional (with its default parameters).
    pub init: String,
    pub case: Case,
    pub seed: u64,
}

impl Default for InjectSettings {
    fn default() -> Self {
        Self {
            init: "mean-noise".into(),
            case: Case::Lower,
            seed: 42,
        }
    }
}

/// What follows the training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinishSettings {
    /// Which Phase 3 checkpoint becomes the final model.
    pub select: Rule,
    pub analysis: bool,
    /// Run the generation battery (10 samples).
    pub samples: bool,
    pub max_new_tokens: usize,
    pub report: bool,
}

impl Default for FinishSettings {
    fn default() -> Self {
        Self {
            select: Rule::BestVal,
            analysis: true,
            samples: true,
            max_new_tokens: 200,
            report: true,
        }
    }
}

impl PipelineConfig {
    /// A preset (by name), overlaid with `file` if given, then with `overrides` (`key=value`).
    pub fn resolve(
        preset: Option<&str>,
        file: Option<&Path>,
        overrides: &[String],
    ) -> Result<Self> {
        const LAYERS: train::config::Layers = train::config::Layers {
            presets: PRESETS,
            preset_kind: "preset",
            file_kind: "pipeline file",
        };
        let mut table = LAYERS.resolve(preset, file, overrides)?;
        if let Some(name) = preset {
            // The preset's name, unless the file or an override set one (no preset sets it).
            table.entry("preset").or_insert(name.into());
        }
        let config: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|e| anyhow::anyhow!("invalid pipeline configuration: {e}"))?;
        Ok(config)
    }

    /// Checks the inputs exist and every phase's settings parse, before anything is written.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.corpus.is_file(),
            "the corpus {} does not exist: set corpus = \"PATH\" (or --set corpus=PATH)",
            self.corpus.display()
        );
        ensure!(
            self.lexicon.is_file(),
            "the lexicon {} does not exist: set lexicon = \"PATH\" (or --set lexicon=PATH)",
            self.lexicon.display()
        );
        if !self.morphemes.as_os_str().is_empty() {
            MorphemeData::load(&self.morphemes)?;
        }
        ensure!(
            self.control.as_os_str().is_empty() || self.control.is_file(),
            "the control text {} does not exist: set control = \"PATH\" (or --set control=PATH), or control = \"\" to skip it",
            self.control.display()
        );
        ensure!(
            self.control_segments >= 1,
            "control_segments = 0: give 1 or more (16 is the default)"
        );
        vocab::InitScheme::named(&self.inject.init)?;
        for phase in [Phase::P1, Phase::P2, Phase::P3] {
            let mut c = self.phase_config(phase, Path::new("OUT"))?;
            // The paths are placeholders here; the rest must be valid as written.
            c.corpus = self.corpus.clone();
            c.model = "OUT/model".into();
            if phase != Phase::P1 {
                c.source.run = "OUT/previous".into();
            }
            c.validate()
                .with_context(|| format!("in [{}] of the pipeline", phase.name()))?;
        }
        // Phase 3's files are read hours after the start: check them now.
        let p3 = self.phase_config(Phase::P3, Path::new("OUT"))?;
        for (key, path) in [
            ("morphemes", &p3.aux.morphemes),
            ("devices", &p3.aux.devices),
        ] {
            let placeholder = path.starts_with("OUT");
            ensure!(
                placeholder || path.as_os_str().is_empty() || path.is_file(),
                "[p3] aux.{key} = {} does not exist",
                path.display()
            );
        }
        Ok(())
    }

    /// The training configuration of `phase` inside the pipeline directory `out`.
    pub fn phase_config(&self, phase: Phase, out: &Path) -> Result<TrainConfig> {
        let mut table = match phase {
            Phase::P1 => self.p1.clone(),
            Phase::P2 => self.p2.clone(),
            Phase::P3 => self.p3.clone(),
        };
        for key in ["phase", "model", "corpus"] {
            ensure!(
                !table.contains_key(key),
                "[{}] sets '{key}', which the pipeline sets itself",
                phase.name()
            );
        }
        table.insert("phase".into(), phase.name().into());
        table
            .entry("device")
            .or_insert_with(|| self.device.to_string().into());
        table
            .entry("dtype")
            .or_insert_with(|| self.dtype.name().into());
        let path = |p: &Path| toml::Value::String(p.display().to_string());
        table.insert("model".into(), path(&out.join("model")));
        table.insert("corpus".into(), path(&self.corpus));
        if phase != Phase::P1 {
            let previous = if phase == Phase::P2 { "p1" } else { "p2" };
            let source = table
                .entry("source")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .with_context(|| format!("[{}] source must be a table", phase.name()))?;
            source.insert("run".into(), path(&out.join(previous)));
        }
        if phase == Phase::P3 {
            let aux = table
                .entry("aux")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .context("[p3] aux must be a table")?;
            if !aux.contains_key("morphemes") {
                aux.insert("morphemes".into(), path(&self.morphemes_path(out)));
            }
        }
        TrainConfig::from_table(table).with_context(|| format!("in [{}]", phase.name()))
    }

    /// The morpheme file when it is a group file (`wake_embedding_groups.jsonl`), which the
    /// analysis's direction statistics need.
    fn groups(&self) -> Option<PathBuf> {
        let jsonl = self
            .morphemes
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
        jsonl.then(|| self.morphemes.clone())
    }

    fn morphemes_path(&self, out: &Path) -> PathBuf {
        if self.morphemes.as_os_str().is_empty() {
            out.join("morphemes.json")
        } else {
            self.morphemes.clone()
        }
    }
}

/// How a call to [`run`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    /// Every stage is done.
    Done,
    /// Ctrl-C during a phase: its checkpoint is saved; run again to continue.
    Interrupted { phase: Phase, step: u64 },
}

/// Runs (or continues) the pipeline in `out`. A new `out` gets `config` as its pipeline.toml;
/// an existing one must hold the same settings (`config` `None`: continue with what it holds).
pub fn run(config: Option<PipelineConfig>, out: &Path, progress: bool) -> Result<Finished> {
    let stored = out.join("pipeline.toml");
    let config = match (config, stored.is_file()) {
        (None, false) => bail!(
            "{} is not a pipeline directory (no pipeline.toml): start one with `wake2vec run --preset demo --out {}`",
            out.display(),
            out.display()
        ),
        (None, true) => {
            let c = read_config(&stored)?;
            c.validate()
                .with_context(|| format!("in {}", stored.display()))?;
            c
        }
        (Some(mut c), exists) => {
            // A device this build or machine lacks is refused before anything is written.
            Compute::open(c.device, c.dtype)?;
            for phase in [Phase::P1, Phase::P2, Phase::P3] {
                let t = c.phase_config(phase, out)?;
                Compute::open(t.device, t.dtype).with_context(|| format!("in [{}]", phase.name()))?;
            }
            c.corpus = absolute(&c.corpus)?;
            c.lexicon = absolute(&c.lexicon)?;
            if !c.morphemes.as_os_str().is_empty() {
                c.morphemes = absolute(&c.morphemes)?;
            }
            if !c.control.as_os_str().is_empty() {
                c.control = absolute(&c.control)?;
            }
            if exists {
                let old = read_config(&stored)?;
                ensure!(
                    old == c,
                    "{} holds a pipeline with other settings: continue it with `wake2vec run --resume {}`, or choose another --out",
                    out.display(),
                    out.display()
                );
            } else {
                c.validate()?;
                let model = Path::new(&c.model);
                if model.is_dir() {
                    fs::check_apart(out, model, "the model directory")?;
                }
                std::fs::create_dir_all(out)
                    .with_context(|| format!("cannot create {}", out.display()))?;
                fs::write(&stored, toml::to_string(&c)?.as_bytes())?;
            }
            c
        }
    };
    // One pipeline writes the directory at a time (each phase's trainer also locks its own).
    let _lock = RunDir::new(out).lock()?;
    let say = |s: String| {
        if progress {
            eprintln!("{s}");
        }
    };
    inject(&config, out, &say)?;
    if config.morphemes.as_os_str().is_empty() {
        mine_morphemes(&config, out, &say)?;
    }
    for phase in [Phase::P1, Phase::P2, Phase::P3] {
        let dir = out.join(phase.name());
        fs::ensure_dir(&dir)?;
        let mut trainer = if RunDir::new(&dir).config().is_file() {
            Trainer::resume(&dir, None)?
        } else {
            say(format!("{}: starting {}", phase.name(), dir.display()));
            Trainer::start(config.phase_config(phase, out)?, &dir)?
        };
        if trainer.is_finished() {
            continue;
        }
        trainer.progress = progress;
        match trainer.run()? {
            Outcome::Interrupted { step } => return Ok(Finished::Interrupted { phase, step }),
            Outcome::Finished { step } => say(format!("{}: finished at step {step}", phase.name())),
            Outcome::EarlyStopped { step, best_step } => say(format!(
                "{}: early stop at step {step} (best validation loss at step {best_step})",
                phase.name()
            )),
        }
    }
    finish(&config, out, &say)?;
    Ok(Finished::Done)
}

/// The pipeline settings stored in a pipeline directory.
pub fn read_config(path: &Path) -> Result<PipelineConfig> {
    let text = fs::read_to_string(path)?;
    toml::from_str(&text)
        .with_context(|| format!("{} is not a valid pipeline.toml", path.display()))
}

pub(crate) fn inject(config: &PipelineConfig, out: &Path, say: &dyn Fn(String)) -> Result<()> {
    let dest = out.join("model");
    if dest.join("wake2vec.json").is_file() {
        return Ok(());
    }
    let spec: cache::ModelSpec = config.model.parse()?;
    let base = cache::resolve(&spec, true)?;
    let lexicon = Lexicon::load(&config.lexicon)?;
    let options = vocab::InjectOptions {
        case: config.inject.case,
        scheme: vocab::InitScheme::named(&config.inject.init)?,
        seed: config.inject.seed,
        morphemes: None,
    };
    let injected = vocab::inject(
        &base,
        &config.model,
        &lexicon,
        &config.lexicon.display().to_string(),
        &options,
    )?;
    say(format!(
        "injected {} Wake words into {} ({} init)",
        injected.manifest.wake.count, config.model, config.inject.init
    ));
    vocab::write(&injected, &base, &dest)
}

fn mine_morphemes(config: &PipelineConfig, out: &Path, say: &dyn Fn(String)) -> Result<()> {
    let dest = out.join("morphemes.json");
    if dest.is_file() {
        return Ok(());
    }
    let lexicon = Lexicon::load(&config.lexicon)?;
    let base = cache::resolve(&config.model.parse()?, true)?;
    let base = vocab::BaseTokenizer::from_file(&base.join("tokenizer.json"))?;
    let data = vocab::mine_morphemes(&lexicon, Some(&base));
    data.validate()
        .with_context(|| format!("mining affixes from {}", config.lexicon.display()))?;
    data.save(&dest)?;
    say(format!(
        "mined {} prefixes and {} suffixes into {}",
        data.prefixes.len(),
        data.suffixes.len(),
        dest.display()
    ));
    Ok(())
}

/// Export, analysis, samples, report: each skipped when its output exists.
fn finish(config: &PipelineConfig, out: &Path, say: &dyn Fn(String)) -> Result<()> {
    let f = &config.finish;
    let final_dir = out.join("final");
    if !final_dir.join("model.safetensors").is_file() {
        let p3 = out.join("p3");
        let step = crate::run::select::checkpoint_step(&RunDir::new(&p3), &f.select.to_string())?;
        let tmp = fs::tmp_path(&final_dir);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot remove {}", tmp.display()))?;
        }
        train::export::export(&p3, step, &tmp, true)?;
        fs::commit(&tmp, &final_dir)?;
        say(format!(
            "final model: phase 3 step {step} ({}), adapters merged: {}",
            f.select,
            final_dir.display()
        ));
    }
    if !config.control.as_os_str().is_empty() && !out.join("control.json").is_file() {
        measure_control(config, out, say)?;
    }
    let analysis_dir = out.join("analysis");
    fs::ensure_dir(&analysis_dir)?;
    let summary_path = analysis_dir.join("summary.json");
    let report_path = out.join("report.html");
    let report_due = f.report && !report_path.is_file();
    // The report is built from the analysis in memory, so a due report runs it (once) too.
    let summary = if (f.analysis && !summary_path.is_file()) || report_due {
        let req = report::AnalyzeRequest {
            path: final_dir.clone(),
            pre: Some(out.join("model")),
            out: Some(analysis_dir.clone()),
            morphemes: config.groups(),
            trajectory_tokens: 0,
            logs: phase_logs(out),
            control: Some(out.join("control.json")).filter(|p| p.is_file()),
            search: Some(Default::default()),
            ..Default::default()
        };
        let summary = report::analyze_path(&req)?.summary;
        say(format!("analysis: {}", summary_path.display()));
        Some(summary)
    } else {
        None
    };
    let samples_path = out.join("samples.jsonl");
    if f.samples && !samples_path.is_file() {
        let compute = Compute::open(config.device, config.dtype)?;
        let m = crate::model::LoadedModel::load_with(&final_dir, &compute)?;
        let wake = vocab::Manifest::load(&final_dir)?.wake;
        let known = KnownWords::load(&m.tokenizer, wake.start, Some(&config.corpus), None)?;
        let samples = battery::run(
            &m,
            &battery::Settings::original(f.max_new_tokens),
            &known,
            Some(wake.range()),
            &mut |s| say(format!("sample [{}]: {} tokens", s.label, s.tokens)),
        )?;
        battery::write(out, &samples, "final")?;
    }
    if let (true, Some(summary)) = (report_due, &summary) {
        report::html::write_page(
            summary,
            &analysis_dir,
            &out.join("pipeline.toml"),
            battery::existing(out).as_deref(),
            &report_path,
        )?;
        say(format!("report: {}", report_path.display()));
    }
    Ok(())
}

/// What a control measurement compares against: the base model and the control segments.
pub(crate) struct ControlBase {
    model: crate::model::LoadedModel,
    /// The base model's output rows.
    vocab: usize,
    pub segments: ControlText,
    compute: Compute,
}

impl ControlBase {
    /// The base model of `config` and the segments of its control text.
    pub(crate) fn load(config: &PipelineConfig) -> Result<Self> {
        let text = crate::corpus::read_text(&config.control)?;
        let segments = ControlText::new(&text, config.control_segments)
            .with_context(|| format!("control text {}", config.control.display()))?;
        let compute = Compute::open(config.device, config.dtype)?;
        let base_dir = cache::resolve(&config.model.parse()?, true)?;
        let model = crate::model::LoadedModel::load_with(&base_dir, &compute)?;
        let vocab = model.model.head().dim(0)?;
        Ok(Self {
            model,
            vocab,
            segments,
            compute,
        })
    }

    /// Bits per byte of the model in `dir` (the base itself when `None`) and its KL from the
    /// base, as the row `stage` naming the model `shown`.
    pub(crate) fn measure(
        &self,
        stage: &str,
        dir: Option<&Path>,
        shown: &str,
    ) -> Result<ControlRow> {
        let (bpb, kl) = match dir {
            None => (
                control::bits_per_byte(&self.model.model, &self.model.tokenizer, &self.segments)?,
                None,
            ),
            Some(dir) => {
                let m = crate::model::LoadedModel::load_with(dir, &self.compute)?;
                let bpb = control::bits_per_byte(&m.model, &m.tokenizer, &self.segments)?;
                let kl = control::kl_from_base(
                    &self.model.model,
                    &self.model.tokenizer,
                    &m.model,
                    self.vocab,
                    &self.segments,
                )?;
                (bpb, Some(kl))
            }
        };
        Ok(ControlRow {
            stage: stage.into(),
            model: shown.into(),
            bpb,
            kl,
        })
    }
}

/// One line of a control measurement for the terminal.
pub(crate) fn control_line(r: &ControlRow) -> String {
    format!(
        "control [{}]: {:.4} bits/byte{}",
        r.stage,
        r.bpb.bits_per_byte,
        r.kl.as_ref()
            .map(|k| format!(
                ", KL {:.2e} nats, moved mass {:.4}",
                k.kl_base_vocab, k.moved_mass
            ))
            .unwrap_or_default()
    )
}

/// Runs `f` on the last checkpoint of the run `run` exported (adapters merged) to a temporary
/// directory beside it, which is removed afterwards.
pub(crate) fn with_last_export<R>(
    run: &Path,
    f: impl FnOnce(&Path, u64) -> Result<R>,
) -> Result<R> {
    let step = crate::run::select::checkpoint_step(&RunDir::new(run), "last")?;
    let tmp = fs::tmp_path(&run.with_extension("export"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    train::export::export(run, step, &tmp, true)?;
    let result = f(&tmp, step);
    std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    result
}

/// OUT/control.json: the control text's bits per byte and KL from the base model for the base,
/// the injected model, the end of Phases 1 and 2 (their last checkpoints) and the final model.
fn measure_control(config: &PipelineConfig, out: &Path, say: &dyn Fn(String)) -> Result<()> {
    let base = ControlBase::load(config)?;
    let mut rows = Vec::new();
    let mut keep = |r: ControlRow| {
        say(control_line(&r));
        rows.push(r);
    };
    keep(base.measure("base", None, &config.model)?);
    keep(base.measure("injected", Some(&out.join("model")), "model")?);
    for phase in ["p1", "p2"] {
        keep(with_last_export(&out.join(phase), |dir, step| {
            base.measure(phase, Some(dir), &format!("{phase} step {step}"))
        })?);
    }
    keep(base.measure("final", Some(&out.join("final")), "final (p3)")?);
    let report = ControlReport {
        file: config.control.display().to_string(),
        segments: base.segments.segments.len(),
        text_bytes: base.segments.text_bytes,
        rows,
    };
    fs::write(
        &out.join("control.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )
}

/// The phases' logs in order, for one loss figure of the whole pipeline.
fn phase_logs(out: &Path) -> Vec<PathBuf> {
    ["p1", "p2", "p3"]
        .iter()
        .map(|p| RunDir::new(out.join(p)).log())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_set_every_phase() {
        for (name, _) in PRESETS {
            let c = PipelineConfig::resolve(Some(name), None, &[]).unwrap();
            assert_eq!(c.preset, *name);
            for phase in [Phase::P1, Phase::P2, Phase::P3] {
                let t = c.phase_config(phase, Path::new("/tmp/out")).unwrap();
                assert_eq!(t.phase, phase);
                assert_eq!(t.model, Path::new("/tmp/out/model"));
                if phase != Phase::P1 {
                    assert!(t
                        .source
                        .run
                        .ends_with(if phase == Phase::P2 { "p1" } else { "p2" }));
                }
            }
        }
        let seed = PipelineConfig::resolve(Some("seed"), None, &[]).unwrap();
        let p3 = seed.phase_config(Phase::P3, Path::new("o")).unwrap();
        assert_eq!((p3.steps, p3.patience, p3.lr), (3000, 5, 5e-5));
        assert_eq!(p3.source.select, Rule::MinGap);
    }

    #[test]
    fn typos_and_reserved_keys_are_refused() {
        let err = PipelineConfig::resolve(Some("demo"), None, &["p1.stepz=3".into()])
            .and_then(|c| c.phase_config(Phase::P1, Path::new("o")))
            .unwrap_err();
        assert!(format!("{err:#}").contains("stepz"), "{err:#}");
        let err = PipelineConfig::resolve(Some("demo"), None, &["p2.model=x".into()])
            .and_then(|c| c.phase_config(Phase::P2, Path::new("o")))
            .unwrap_err();
        assert!(format!("{err:#}").contains("'model'"), "{err:#}");
        let files = ["corpus=Cargo.toml".to_string(), "lexicon=Cargo.toml".into()];
        let with = |extra: &str| {
            let mut o = files.to_vec();
            o.push(extra.into());
            PipelineConfig::resolve(Some("demo"), None, &o)
                .unwrap()
                .validate()
        };
        let err = with("p3.aux.devices=/nonexistent/devices.jsonl").unwrap_err();
        assert!(format!("{err:#}").contains("aux.devices"), "{err:#}");
        let err = with("p2.lora.r=0").unwrap_err();
        assert!(format!("{err:#}").contains("[p2]"), "{err:#}");
        let err = with("corpus=/nonexistent/wake.txt").unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
        let err = PipelineConfig::resolve(Some("nope"), None, &[]).unwrap_err();
        assert!(format!("{err:#}").contains("demo, seed"), "{err:#}");
    }
}
