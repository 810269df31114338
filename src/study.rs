//! `wake2vec init-study`: which initialisation of the new rows? Each scheme is injected, measured
//! (control-text bits per byte and KL from the base, Wake validation bits per byte, geometry),
//! trained for N Phase 1 steps and measured again; one `init_study.json` and one page compare
//! them. Resumable like the pipeline: every stage writes its output once, atomically, and is
//! skipped when the output exists; a Phase 1 run in progress resumes from its checkpoint.
//!
//! ```text
//! OUT/init_study.toml         the settings (a rerun with other settings is refused)
//! OUT/SCHEME/model/           the injected model
//! OUT/SCHEME/p1/              its Phase 1 run (a run directory)
//! OUT/SCHEME/start.json       the measurements at step 0, end.json at step N
//! OUT/init_study.json         every scheme's measurements
//! OUT/init_study.html         the table and the validation curves
//! ```

use crate::infer::control::ControlRow;
use crate::pipeline::{self, ControlBase, PipelineConfig};
use crate::run::dir::RunDir;
use crate::train::{Outcome, Phase, Trainer};
use crate::util::fs::{self, absolute};
use crate::vocab::InitScheme;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The settings of a study (`init_study.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    pub model: String,
    pub lexicon: PathBuf,
    pub corpus: PathBuf,
    pub control: PathBuf,
    pub schemes: Vec<String>,
    /// Phase 1 optimizer steps per scheme.
    pub steps: u64,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub lr: f64,
    /// Validation blocks per evaluation (at step 0 and N).
    pub eval_blocks: usize,
    pub control_segments: usize,
    /// Seed of the injection draws and of training.
    pub seed: u64,
}

impl StudyConfig {
    /// Checks the inputs before anything is written.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.schemes.is_empty(),
            "--schemes: give at least one scheme"
        );
        for s in &self.schemes {
            InitScheme::named(s).with_context(|| "--schemes".to_string())?;
        }
        let mut sorted = self.schemes.clone();
        sorted.sort();
        sorted.dedup();
        ensure!(
            sorted.len() == self.schemes.len(),
            "--schemes names a scheme twice"
        );
        for (flag, p) in [
            ("--lexicon", &self.lexicon),
            ("--corpus", &self.corpus),
            ("--control", &self.control),
        ] {
            ensure!(p.is_file(), "{flag} {} does not exist", p.display());
        }
        ensure!(self.steps >= 1, "--steps must be at least 1");
        Ok(())
    }

    /// The pipeline settings of one scheme: its injection and its Phase 1.
    fn pipeline(&self, scheme: &str) -> PipelineConfig {
        let mut p1 = toml::Table::new();
        p1.insert("steps".into(), (self.steps as i64).into());
        p1.insert("seq_len".into(), (self.seq_len as i64).into());
        p1.insert("grad_accum".into(), (self.grad_accum as i64).into());
        p1.insert("lr".into(), self.lr.into());
        p1.insert("eval_every".into(), (self.steps as i64).into());
        p1.insert("eval_blocks".into(), (self.eval_blocks as i64).into());
        p1.insert("save_every".into(), (self.steps as i64).into());
        p1.insert("seed".into(), (self.seed as i64).into());
        let mut c = PipelineConfig {
            model: self.model.clone(),
            corpus: self.corpus.clone(),
            lexicon: self.lexicon.clone(),
            control: self.control.clone(),
            control_segments: self.control_segments,
            p1,
            ..PipelineConfig::default()
        };
        c.inject.init = scheme.to_string();
        c.inject.seed = self.seed;
        c
    }
}

/// A model measured at one step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measure {
    pub step: u64,
    pub control: ControlRow,
    /// Validation bits per byte on the Wake (the Phase 1 run's evaluation at this step).
    pub wake_bpb: Option<f64>,
    pub wake_loss: Option<f64>,
    pub isoscore_wake: Option<f64>,
    pub isoscore_all: Option<f64>,
    /// Share of Wake rows collapsed onto byte tokens (cosine > 0.9).
    pub collapse_share: Option<f64>,
    /// Mean cosine of sampled Wake–Wake pairs.
    pub wake_wake_cos: Option<f64>,
    /// Cohen's d (pooled) of the Wake norms against the base norms.
    pub norm_d: Option<f64>,
}

/// One scheme: before and after its Phase 1 steps, and its validation curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchemeResult {
    pub scheme: String,
    pub start: Measure,
    pub end: Measure,
    /// `(step, validation bits per byte)` of every evaluation.
    pub val_bpb: Vec<(u64, f64)>,
}

/// `init_study.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitStudy {
    pub settings: StudyConfig,
    /// The base model on the control text.
    pub base_control: ControlRow,
    pub schemes: Vec<SchemeResult>,
}

/// How a study run ended.
pub enum StudyEnd {
    Done(Box<InitStudy>),
    /// Ctrl-C inside a scheme's Phase 1; rerun to continue.
    Interrupted {
        scheme: String,
        step: u64,
    },
}

/// Runs (or continues) the study in `out`; `config` is `None` to continue a stored one.
pub fn run(config: Option<StudyConfig>, out: &Path, progress: bool) -> Result<StudyEnd> {
    let stored = out.join("init_study.toml");
    let config = match (config, stored.is_file()) {
        (None, false) => bail!(
            "{} is not an init study (no init_study.toml): start one with `wake2vec init-study --out {}`",
            out.display(),
            out.display()
        ),
        (None, true) => read_config(&stored)?,
        (Some(mut c), exists) => {
            c.validate()?;
            for p in [&mut c.lexicon, &mut c.corpus, &mut c.control] {
                *p = absolute(p)?;
            }
            if exists {
                ensure!(
                    read_config(&stored)? == c,
                    "{} holds a study with other settings: continue it with `wake2vec init-study --resume {}`, or choose another --out",
                    out.display(),
                    out.display()
                );
            } else {
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
    let _lock = RunDir::new(out).lock()?;
    let say = |s: String| {
        if progress {
            eprintln!("{s}");
        }
    };
    let base = ControlBase::load(&config.pipeline(&config.schemes[0]))?;
    let base_control = base.measure("base", None, &config.model)?;
    say(pipeline::control_line(&base_control));
    let mut schemes = Vec::new();
    for scheme in &config.schemes {
        let dir = out.join(scheme);
        fs::ensure_dir(&dir)?;
        let pc = config.pipeline(scheme);
        pipeline::inject(&pc, &dir, &say)?;
        let run = dir.join("p1");
        fs::ensure_dir(&run)?;
        let mut trainer = if RunDir::new(&run).config().is_file() {
            Trainer::resume(&run, None)?
        } else {
            say(format!("{scheme}: Phase 1, {} steps", config.steps));
            Trainer::start(pc.phase_config(Phase::P1, &dir)?, &run)?
        };
        if !trainer.is_finished() {
            trainer.progress = progress;
            if let Outcome::Interrupted { step } = trainer.run()? {
                return Ok(StudyEnd::Interrupted {
                    scheme: scheme.clone(),
                    step,
                });
            }
        }
        drop(trainer);
        // The injected model is what the run started from: measured with its step-0 evaluation.
        let start = measured(&dir.join("start.json"), || {
            measure(&base, &dir.join("model"), &run, 0, scheme)
        })?;
        let end = measured(&dir.join("end.json"), || {
            pipeline::with_last_export(&run, |model, step| {
                measure(&base, model, &run, step, scheme)
            })
        })?;
        say(format!(
            "{scheme}: control {:.4} → {:.4} bits/byte, Wake {} → {} bits/byte",
            start.control.bpb.bits_per_byte,
            end.control.bpb.bits_per_byte,
            opt(start.wake_bpb),
            opt(end.wake_bpb)
        ));
        let val_bpb = crate::run::log::load_log(&RunDir::new(&run).log())?
            .into_iter()
            .filter(|l| l.kind == "eval")
            .filter_map(|l| Some((l.step, l.val_bpb?)))
            .collect();
        schemes.push(SchemeResult {
            scheme: scheme.clone(),
            start,
            end,
            val_bpb,
        });
    }
    let study = InitStudy {
        settings: config,
        base_control,
        schemes,
    };
    fs::write(
        &out.join("init_study.json"),
        serde_json::to_string_pretty(&study)?.as_bytes(),
    )?;
    fs::write(&out.join("init_study.html"), page(&study)?.as_bytes())?;
    Ok(StudyEnd::Done(Box::new(study)))
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.4}"))
}

/// The settings stored in a study directory.
pub fn read_config(path: &Path) -> Result<StudyConfig> {
    toml::from_str(&fs::read_to_string(path)?)
        .with_context(|| format!("{} is not a valid init_study.toml", path.display()))
}

/// The measurement stored at `path`, else `make`'s, stored there.
fn measured(path: &Path, make: impl FnOnce() -> Result<Measure>) -> Result<Measure> {
    if path.is_file() {
        return serde_json::from_str(&fs::read_to_string(path)?)
            .with_context(|| format!("{} is not a measurement; delete it", path.display()));
    }
    let m = make()?;
    fs::write(path, serde_json::to_string_pretty(&m)?.as_bytes())?;
    Ok(m)
}

/// The model in `model` at `step` of the Phase 1 run `run`: control text, the run's Wake
/// evaluation at that step, and the geometry.
fn measure(
    base: &ControlBase,
    model: &Path,
    run: &Path,
    step: u64,
    scheme: &str,
) -> Result<Measure> {
    let control = base.measure(scheme, Some(model), &format!("{scheme} step {step}"))?;
    let eval = crate::run::log::load_log(&RunDir::new(run).log())?
        .into_iter()
        .find(|l| l.kind == "eval" && l.step == step);
    let req = crate::report::AnalyzeRequest {
        path: model.to_path_buf(),
        out: Some(fs::tmp_path(&run.with_extension("analysis"))),
        no_figures: true,
        ..Default::default()
    };
    let analysis = crate::report::analyze_path(&req);
    let _ = std::fs::remove_dir_all(req.out.as_ref().expect("set above"));
    let g = analysis?.summary.geometry;
    Ok(Measure {
        step,
        control,
        wake_bpb: eval.as_ref().and_then(|e| e.val_bpb),
        wake_loss: eval.as_ref().and_then(|e| e.val_loss),
        isoscore_wake: g.isoscore.wake,
        isoscore_all: g.isoscore.all,
        collapse_share: g.collapse.map(|c| c.share),
        wake_wake_cos: g.pairwise_cosine.map(|p| p.wake_wake.mean),
        norm_d: g.norms.tests.map(|t| t.cohens_d.pooled),
    })
}

/// `init_study.html`: one self-contained page, the table and the validation curves.
pub fn page(study: &InitStudy) -> Result<String> {
    use crate::report::html::escape;
    use std::fmt::Write;
    let s = &study.settings;
    let mut h = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Wake2Vec init study</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:1300px}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px}}td.n{{text-align:right;font-variant-numeric:tabular-nums}}\
         .muted{{color:#666}}svg{{max-width:100%;height:auto}}</style></head><body>\n\
         <h1>Wake2Vec init study — {}</h1>\n<p class=\"muted\">{} Phase 1 steps per scheme (seq {}, \
         grad accum {}, lr {}), seed {}; lexicon <code>{}</code>, Wake <code>{}</code>, control \
         <code>{}</code> ({} segments). Base model on the control text: {:.4} bits/byte.</p>\n",
        escape(&s.model),
        s.steps,
        s.seq_len,
        s.grad_accum,
        s.lr,
        s.seed,
        escape(&s.lexicon.display().to_string()),
        escape(&s.corpus.display().to_string()),
        escape(&s.control.display().to_string()),
        s.control_segments,
        study.base_control.bpb.bits_per_byte
    );
    h.push_str(
        "<table><tr><th>scheme</th><th>step</th><th>control bits/byte</th><th>KL (nats)</th>\
         <th>moved mass</th><th>Wake bits/byte</th><th>IsoScore Wake</th><th>IsoScore all</th>\
         <th>collapse share</th><th>Wake–Wake cos</th><th>norm d</th></tr>\n",
    );
    let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.4}"));
    for r in &study.schemes {
        for m in [&r.start, &r.end] {
            let kl = m.control.kl.as_ref();
            let cells = [
                format!("{:.4}", m.control.bpb.bits_per_byte),
                kl.map_or("–".into(), |k| format!("{:.2e}", k.kl_base_vocab)),
                kl.map_or("–".into(), |k| format!("{:.4}", k.moved_mass)),
                f(m.wake_bpb),
                f(m.isoscore_wake),
                f(m.isoscore_all),
                f(m.collapse_share),
                format!("{:.6}", m.wake_wake_cos.unwrap_or(f64::NAN)),
                f(m.norm_d),
            ];
            let cells: String = cells
                .iter()
                .map(|c| format!("<td class=\"n\">{c}</td>"))
                .collect();
            writeln!(
                h,
                "<tr><td>{}</td><td class=\"n\">{}</td>{cells}</tr>",
                escape(&r.scheme),
                m.step
            )?;
        }
    }
    h.push_str("</table>\n");
    let series: Vec<(String, Vec<(f64, f64)>)> = study
        .schemes
        .iter()
        .map(|r| {
            let pts = r.val_bpb.iter().map(|&(s, v)| (s as f64, v)).collect();
            (r.scheme.clone(), pts)
        })
        .collect();
    let fig = crate::report::figures::curves_figure(
        &series,
        "Wake validation bits per byte",
        ("Phase 1 step", "bits / byte"),
        (1200, 700),
    )?;
    writeln!(h, "<figure>{}</figure>\n</body></html>", fig.svg)?;
    Ok(h)
}
