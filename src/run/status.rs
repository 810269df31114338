//! `wake2vec status RUN_DIR`: where a training run or a pipeline stands, read from its files
//! alone (a running process is never contacted, so status is safe at any moment).
//!
//! A run directory (docs/formats.md) has `run.toml`, `log.jsonl` and `checkpoints/step-N/`; a
//! pipeline directory holds phase runs in `p1/`, `p2/`, `p3/` (and `pipeline.toml`). Per phase:
//! the configured steps (`steps` of run.toml), the steps done (the last step line of the log),
//! whether it finished (the newest checkpoint's `state.json` says `finished`; finished before
//! its configured steps means early stopping), the last train loss, the last evaluation, the
//! picks of the `best-val` and `min-gap` rules ([`super::select`]), the newest checkpoint, the
//! elapsed training time and an ETA: the mean seconds per step over the last ≤ 50 step lines
//! (evaluations and checkpoints included, as they are part of the run) × the steps left.
//!
//! run.toml is read as a plain TOML table (`steps`, `phase`, `eval_every`), so status keeps
//! working on runs whose other settings changed between versions.

use super::dir::{step_name, RunDir};
use super::log::{load_log, LogLine};
use super::select::{self, EvalRecord};
use crate::infer::control::ControlReport;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The phase subdirectories of a pipeline directory, in order.
pub const PIPELINE_PHASES: [&str; 3] = ["p1", "p2", "p3"];

/// Step lines the ETA averages over.
const ETA_WINDOW: usize = 50;

/// Where a phase stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseState {
    /// No step done yet.
    NotStarted,
    /// Started, not finished: running now, or interrupted (resume it).
    InProgress,
    /// All configured steps done.
    Finished,
    /// Ended by early stopping before its configured steps.
    EarlyStopped,
}

impl PhaseState {
    pub fn label(self) -> &'static str {
        match self {
            PhaseState::NotStarted => "not started",
            PhaseState::InProgress => "in progress",
            PhaseState::Finished => "finished",
            PhaseState::EarlyStopped => "early-stopped",
        }
    }

    /// Finished one way or the other.
    pub fn done(self) -> bool {
        matches!(self, PhaseState::Finished | PhaseState::EarlyStopped)
    }
}

/// An evaluation as status reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalPoint {
    pub step: u64,
    pub val_loss: f64,
    pub train_loss: Option<f64>,
    /// |val_loss − train_loss| when both are known.
    pub gap: Option<f64>,
}

impl From<&EvalRecord> for EvalPoint {
    fn from(e: &EvalRecord) -> Self {
        EvalPoint {
            step: e.step,
            val_loss: e.val_loss,
            train_loss: e.train_loss,
            gap: e.gap(),
        }
    }
}

/// One phase (one run directory).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseStatus {
    /// The subdirectory name in a pipeline, else run.toml's `phase`.
    pub name: String,
    pub dir: PathBuf,
    /// run.toml's `phase`.
    pub phase: Option<String>,
    /// run.toml's `steps`.
    pub configured_steps: Option<u64>,
    /// run.toml's `eval_every`.
    pub eval_every: Option<u64>,
    /// The step of the last step line of log.jsonl (0 before the first).
    pub steps_done: u64,
    pub state: PhaseState,
    /// The loss of the last step line.
    pub last_train_loss: Option<f64>,
    pub last_eval: Option<EvalPoint>,
    /// What the `best-val` rule picks now (the lowest validation loss after step 0).
    pub best_val: Option<EvalPoint>,
    /// What the `min-gap` rule picks now.
    pub min_gap: Option<EvalPoint>,
    /// The newest checkpoint directory's name (`step-N`).
    pub newest_checkpoint: Option<String>,
    /// Training time so far, seconds.
    pub elapsed_s: Option<f64>,
    /// Mean seconds per step over the last ≤ 50 step lines.
    pub s_per_step: Option<f64>,
    /// Seconds left at that pace (0 when done; `None` when unknown).
    pub eta_s: Option<f64>,
    /// The phase a pipeline is at (the first one not done).
    pub current: bool,
}

/// A whole run directory or pipeline directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunStatus {
    pub dir: PathBuf,
    /// `run` (one training run) or `pipeline` (phase runs in p1/ p2/ p3/).
    pub kind: &'static str,
    pub phases: Vec<PhaseStatus>,
    /// The name of the current phase, or of a pipeline's stage after the phases (export,
    /// analysis, samples, report); `None` when everything present is done.
    pub current: Option<String>,
    /// A pipeline's forgetting measurements (`control.json`), once written.
    pub control: Option<ControlReport>,
}

/// Reads where the run or pipeline in `dir` stands.
pub fn status(dir: &Path) -> Result<RunStatus> {
    if !dir.is_dir() {
        bail!(
            "{} is not a directory: give a run directory (run.toml, log.jsonl, checkpoints/) or a pipeline directory (p1/, p2/, p3/)",
            dir.display()
        );
    }
    let (kind, mut phases) = if RunDir::new(dir).config().is_file() {
        ("run", vec![phase_status(dir, None)?])
    } else {
        // With pipeline.toml every phase is listed (those not set up yet as not started).
        let has_config = dir.join("pipeline.toml").is_file();
        let subs: Vec<&str> = PIPELINE_PHASES
            .into_iter()
            .filter(|p| has_config || dir.join(p).is_dir())
            .collect();
        let is_pipeline = has_config
            || subs
                .iter()
                .any(|p| RunDir::new(dir.join(p)).config().is_file());
        if !is_pipeline {
            bail!(
                "{} is not a run directory: expected run.toml and log.jsonl (a training run) or phase runs in p1/, p2/, p3/ (a pipeline directory, with pipeline.toml)",
                dir.display()
            );
        }
        let phases = subs
            .into_iter()
            .map(|p| phase_status(&dir.join(p), Some(p)))
            .collect::<Result<Vec<_>>>()?;
        ("pipeline", phases)
    };
    let current = phases.iter().position(|p| !p.state.done());
    if let Some(i) = current {
        phases[i].current = true;
    }
    // After the phases, a pipeline exports, analyzes, samples and reports (pipeline.rs).
    let after = [
        ("export", "final/model.safetensors"),
        ("analysis", "analysis/summary.json"),
        ("samples", "samples.jsonl"),
        ("report", "report.html"),
    ];
    let finishing = (dir.join("pipeline.toml").is_file() && current.is_none())
        .then(|| {
            after
                .iter()
                .find(|(_, f)| !dir.join(f).is_file())
                .map(|(s, _)| *s)
        })
        .flatten();
    let control = dir.join("control.json");
    let control = control
        .is_file()
        .then(|| ControlReport::load(&control))
        .transpose()?;
    Ok(RunStatus {
        dir: dir.to_path_buf(),
        kind,
        control,
        current: current
            .map(|i| phases[i].name.clone())
            .or(finishing.map(String::from)),
        phases,
    })
}

/// The status of one run directory; `name` is its pipeline subdirectory name. A pipeline phase
/// without run.toml (created, not yet set up) is reported as not started.
fn phase_status(dir: &Path, name: Option<&str>) -> Result<PhaseStatus> {
    let mut st = PhaseStatus::not_started(dir, name);
    let toml_path = RunDir::new(dir).config();
    if !toml_path.is_file() {
        return Ok(st);
    }
    read_run_toml(&mut st, &toml_path, name)?;
    read_log(&mut st, dir)?;
    let finished = read_newest_checkpoint(&mut st, dir)?;
    settle_state(&mut st, finished);
    Ok(st)
}

impl PhaseStatus {
    /// A phase with nothing read yet: not started, no steps, nothing known.
    fn not_started(dir: &Path, name: Option<&str>) -> Self {
        PhaseStatus {
            name: name.unwrap_or("run").to_string(),
            dir: dir.to_path_buf(),
            phase: None,
            configured_steps: None,
            eval_every: None,
            steps_done: 0,
            state: PhaseState::NotStarted,
            last_train_loss: None,
            last_eval: None,
            best_val: None,
            min_gap: None,
            newest_checkpoint: None,
            elapsed_s: None,
            s_per_step: None,
            eta_s: None,
            current: false,
        }
    }
}

/// Fills `st` from run.toml: `steps`, `eval_every`, `phase`, and the name from `phase` when
/// the phase has no pipeline `name`.
fn read_run_toml(st: &mut PhaseStatus, toml_path: &Path, name: Option<&str>) -> Result<()> {
    let text = crate::util::fs::read_to_string(toml_path)?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", toml_path.display()))?;
    let uint = |key: &str| -> Result<Option<u64>> {
        match table.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_integer()
                .and_then(|i| u64::try_from(i).ok())
                .map(Some)
                .with_context(|| {
                    format!(
                        "{}: `{key}` is {v}, expected a non-negative integer",
                        toml_path.display()
                    )
                }),
        }
    };
    st.configured_steps = uint("steps")?;
    st.eval_every = uint("eval_every")?;
    st.phase = table
        .get("phase")
        .and_then(|v| v.as_str())
        .map(String::from);
    if name.is_none() {
        if let Some(p) = &st.phase {
            st.name = p.clone();
        }
    }
    Ok(())
}

/// Fills `st` from log.jsonl: the last step line, the pace, the last evaluation and what the
/// selection rules pick now.
fn read_log(st: &mut PhaseStatus, dir: &Path) -> Result<()> {
    // The engine writes run.toml, then an empty log.jsonl: no log yet is no step yet.
    let log_path = RunDir::new(dir).log();
    let log = if log_path.exists() {
        load_log(&log_path).context("unreadable training log")?
    } else {
        vec![]
    };
    let steps: Vec<&LogLine> = log.iter().filter(|l| l.kind == "step").collect();
    if let Some(last) = steps.last() {
        st.steps_done = last.step;
        st.last_train_loss = last.loss;
        st.elapsed_s = last.elapsed_s;
    }
    st.s_per_step = seconds_per_step(&steps);
    let evals: Vec<EvalRecord> = log
        .iter()
        .filter(|l| l.kind == "eval")
        .map(|l| EvalRecord {
            phase: l.phase.clone().unwrap_or_default(),
            step: l.step,
            val_loss: l.val_loss.unwrap_or(f64::NAN),
            train_loss: l.train_loss,
        })
        .collect();
    st.last_eval = evals.last().map(EvalPoint::from);
    let (best, gap) = select::current_picks(&evals);
    let point = |step: Option<u64>| {
        step.and_then(|s| evals.iter().find(|e| e.step == s))
            .map(EvalPoint::from)
    };
    st.best_val = point(best);
    st.min_gap = point(gap);
    Ok(())
}

/// Fills `st` from the newest checkpoint's state.json (its name, and the elapsed time and step
/// where the log lacks them); returns whether it marks the run finished.
fn read_newest_checkpoint(st: &mut PhaseStatus, dir: &Path) -> Result<bool> {
    let Some((step, path)) = RunDir::new(dir).list_checkpoints().pop() else {
        return Ok(false);
    };
    st.newest_checkpoint = Some(step_name(step));
    let state_path = path.join("state.json");
    let state: serde_json::Value = crate::util::fs::read(&state_path).and_then(|b| {
        serde_json::from_slice(&b)
            .with_context(|| format!("{} is not valid JSON", state_path.display()))
    })?;
    if st.elapsed_s.is_none() {
        st.elapsed_s = state["elapsed_s"].as_f64();
    }
    // A log cut short by a crash after the checkpoint still shows what the checkpoint has.
    st.steps_done = st.steps_done.max(state["step"].as_u64().unwrap_or(0));
    Ok(state["finished"].as_bool().unwrap_or(false))
}

/// Sets the phase's state from what was read, and the time left at the measured pace.
fn settle_state(st: &mut PhaseStatus, finished: bool) {
    st.state = if finished {
        match st.configured_steps {
            Some(n) if st.steps_done < n => PhaseState::EarlyStopped,
            _ => PhaseState::Finished,
        }
    } else if st.steps_done > 0 {
        PhaseState::InProgress
    } else {
        PhaseState::NotStarted
    };
    st.eta_s = if st.state.done() {
        Some(0.0)
    } else {
        st.configured_steps
            .zip(st.s_per_step)
            .map(|(n, r)| n.saturating_sub(st.steps_done) as f64 * r)
    };
}

/// Mean seconds per step over the last ≤ 50 step lines: the growth of `elapsed_s` across them,
/// the first measured from the line before it (or from step 0 at 0 s).
fn seconds_per_step(steps: &[&LogLine]) -> Option<f64> {
    let points: Vec<(u64, f64)> = std::iter::once((0, 0.0))
        .chain(steps.iter().filter_map(|l| Some((l.step, l.elapsed_s?))))
        .collect();
    let window = &points[points.len().saturating_sub(ETA_WINDOW + 1)..];
    let (s0, e0) = window.first()?;
    let (s1, e1) = window.last()?;
    let (ds, de) = (s1.checked_sub(*s0)?, e1 - e0);
    (ds > 0 && de > 0.0 && de.is_finite()).then(|| de / ds as f64)
}

/// `1h02m`, `4m05s`, `12s`.
pub fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// The human-readable table.
pub fn render(st: &RunStatus) -> String {
    const DASH: &str = "—";
    let loss = |v: Option<f64>| v.map_or(DASH.to_string(), |v| format!("{v:.4}"));
    let at = |e: &Option<EvalPoint>| {
        e.as_ref().map_or(DASH.to_string(), |e| {
            format!("{}: {:.4}", e.step, e.val_loss)
        })
    };
    let header = [
        "phase",
        "state",
        "steps",
        "train loss",
        "last eval",
        "best val",
        "min gap (val/train)",
        "checkpoint",
        "elapsed",
        "ETA",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for p in &st.phases {
        let gap = p.min_gap.as_ref().map_or(DASH.to_string(), |e| {
            format!(
                "{}: {:.4} ({:.4}/{:.4})",
                e.step,
                e.gap.unwrap_or(f64::NAN),
                e.val_loss,
                e.train_loss.unwrap_or(f64::NAN)
            )
        });
        rows.push(vec![
            format!("{}{}", p.name, if p.current { " *" } else { "" }),
            p.state.label().to_string(),
            format!(
                "{}/{}",
                p.steps_done,
                p.configured_steps
                    .map_or("?".to_string(), |n| n.to_string())
            ),
            loss(p.last_train_loss),
            at(&p.last_eval),
            at(&p.best_val),
            gap,
            p.newest_checkpoint.clone().unwrap_or(DASH.to_string()),
            p.elapsed_s.map_or(DASH.to_string(), duration),
            match p.eta_s {
                _ if p.state.done() => "done".to_string(),
                Some(s) => duration(s),
                None => DASH.to_string(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = format!("{} ({})\n", st.dir.display(), st.kind);
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell}{}", " ".repeat(w - cell.chars().count())))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    if let Some(c) = &st.control {
        let _ = writeln!(out, "{}", c.summary_line());
    }
    match &st.current {
        Some(c) => {
            let _ = writeln!(out, "current: {c}");
        }
        None if st.phases.is_empty() => out.push_str("current: no phase has started\n"),
        None if st.dir.join("report.html").is_file() => {
            let _ = writeln!(out, "done: {}", st.dir.join("report.html").display());
        }
        None => out.push_str("current: none (every phase present is done)\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A scratch directory removed on drop.
    struct Tmp(PathBuf);
    impl Tmp {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("wake2vec-status-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Builds a run directory as the engine leaves it: run.toml, log lines shaped like
    /// StepLine/EvalLine, checkpoints with state.json.
    struct RunBuilder {
        dir: PathBuf,
        phase: String,
        log: String,
    }

    impl RunBuilder {
        fn new(dir: PathBuf, phase: &str, steps: u64, eval_every: u64) -> Self {
            std::fs::create_dir_all(&dir).unwrap();
            // Settings status does not read are there too, as in a real run.toml.
            std::fs::write(
                dir.join("run.toml"),
                format!(
                    "phase = \"{phase}\"\nmodel = \"/m\"\nsteps = {steps}\neval_every = {eval_every}\nlr = 0.0003\n\n[optimizer]\nkind = \"adafactor\"\n"
                ),
            )
            .unwrap();
            RunBuilder {
                dir,
                phase: phase.into(),
                log: String::new(),
            }
        }

        /// Steps `from..=to`, each taking `secs` seconds, loss falling linearly.
        fn steps(&mut self, from: u64, to: u64, secs: f64, elapsed0: f64) -> &mut Self {
            for s in from..=to {
                let line = json!({"kind": "step", "phase": self.phase, "step": s,
                    "loss": 2.0 - s as f64 * 1e-3, "lr": 1e-4, "grad_norm": 0.7,
                    "tokens_per_s": 1000.0, "elapsed_s": elapsed0 + (s - from + 1) as f64 * secs});
                self.log += &format!("{line}\n");
            }
            self
        }

        fn eval(&mut self, step: u64, val: f64, train: Option<f64>) -> &mut Self {
            let line = json!({"kind": "eval", "phase": self.phase, "step": step,
                "val_loss": val, "val_bpb": val * 0.4, "train_loss": train});
            self.log += &format!("{line}\n");
            self
        }

        fn checkpoint(&mut self, step: u64, finished: bool, elapsed: f64) -> &mut Self {
            let d = self.dir.join("checkpoints").join(format!("step-{step}"));
            std::fs::create_dir_all(&d).unwrap();
            let state = json!({"format": 1, "phase": self.phase, "step": step,
                "early": {"best": 1.0, "best_step": step, "bad_evals": 0},
                "elapsed_s": elapsed, "finished": finished, "needs_eval": false});
            std::fs::write(d.join("state.json"), state.to_string()).unwrap();
            self
        }

        fn write(&self) {
            std::fs::write(self.dir.join("log.jsonl"), &self.log).unwrap();
        }
    }

    #[test]
    fn single_run_in_progress() {
        let t = Tmp::new("single");
        let mut r = RunBuilder::new(t.0.clone(), "p1", 1000, 100);
        r.eval(0, 3.0, None)
            .steps(1, 100, 2.0, 10.0)
            .eval(100, 2.5, Some(2.6))
            .steps(101, 200, 3.0, 210.0)
            .eval(200, 2.4, Some(2.41))
            .checkpoint(100, false, 210.0)
            .checkpoint(200, false, 510.0)
            .steps(201, 230, 3.0, 510.0);
        r.write();
        let st = status(&t.0).unwrap();
        assert_eq!(st.kind, "run");
        assert_eq!(st.phases.len(), 1);
        let p = &st.phases[0];
        assert_eq!(p.name, "p1");
        assert_eq!(p.configured_steps, Some(1000));
        assert_eq!(p.eval_every, Some(100));
        assert_eq!(p.steps_done, 230);
        assert_eq!(p.state, PhaseState::InProgress);
        assert!((p.last_train_loss.unwrap() - (2.0 - 0.230)).abs() < 1e-12);
        assert_eq!(p.last_eval.as_ref().unwrap().step, 200);
        assert_eq!(p.best_val.as_ref().unwrap().step, 200);
        assert_eq!(p.min_gap.as_ref().unwrap().step, 200);
        assert_eq!(p.newest_checkpoint.as_deref(), Some("step-200"));
        assert!((p.elapsed_s.unwrap() - 600.0).abs() < 1e-9);
        // The last 50 step lines (181..=230) took 3 s each: 770 steps left × 3 s.
        assert!((p.s_per_step.unwrap() - 3.0).abs() < 1e-9);
        assert!((p.eta_s.unwrap() - 770.0 * 3.0).abs() < 1e-6);
        assert!(p.current);
        assert_eq!(st.current.as_deref(), Some("p1"));

        let text = render(&st);
        assert!(
            text.contains("p1 *") && text.contains("in progress"),
            "{text}"
        );
        assert!(
            text.contains("230/1000") && text.contains("step-200"),
            "{text}"
        );
        assert!(text.contains("38m30s"), "ETA 2310 s: {text}");
        assert!(text.contains("current: p1"), "{text}");
        let v: serde_json::Value = serde_json::to_value(&st).unwrap();
        assert_eq!(v["phases"][0]["state"], "in-progress");
        assert_eq!(v["phases"][0]["best_val"]["step"], 200);
    }

    #[test]
    fn eta_from_few_steps_and_unknown() {
        let t = Tmp::new("few");
        let mut r = RunBuilder::new(t.0.clone(), "p1", 10, 5);
        r.eval(0, 3.0, None).steps(1, 2, 4.0, 0.0);
        r.write();
        let p = &status(&t.0).unwrap().phases[0];
        // Fewer than 50 lines: measured from step 0 at 0 s.
        assert!((p.s_per_step.unwrap() - 4.0).abs() < 1e-9);
        assert!((p.eta_s.unwrap() - 32.0).abs() < 1e-9);
        assert_eq!(p.newest_checkpoint, None);
        assert_eq!(p.best_val, None, "step 0 is never a pick");
        assert_eq!(p.last_eval.as_ref().unwrap().step, 0);

        // Only the step-0 evaluation: no pace, no ETA.
        let t2 = Tmp::new("fresh");
        let mut r = RunBuilder::new(t2.0.clone(), "p1", 10, 5);
        r.eval(0, 3.0, None);
        r.write();
        let st = status(&t2.0).unwrap();
        let p = &st.phases[0];
        assert_eq!(p.state, PhaseState::NotStarted);
        assert_eq!((p.s_per_step, p.eta_s), (None, None));
        let text = render(&st);
        assert!(
            text.contains("not started") && text.contains("0/10"),
            "{text}"
        );
    }

    #[test]
    fn finished_and_early_stopped() {
        let t = Tmp::new("early");
        let mut r = RunBuilder::new(t.0.clone(), "p3", 3000, 100);
        r.eval(0, 3.0, None)
            .steps(1, 100, 1.0, 0.0)
            .eval(100, 2.0, Some(2.2))
            .steps(101, 200, 1.0, 100.0)
            .eval(200, 2.1, Some(2.05))
            .checkpoint(100, false, 100.0)
            .checkpoint(200, true, 200.0);
        r.write();
        let st = status(&t.0).unwrap();
        let p = &st.phases[0];
        assert_eq!(p.state, PhaseState::EarlyStopped);
        assert_eq!(p.eta_s, Some(0.0));
        assert_eq!(p.best_val.as_ref().unwrap().step, 100);
        assert_eq!(p.min_gap.as_ref().unwrap().step, 200);
        assert!(!p.current);
        assert_eq!(st.current, None);
        let text = render(&st);
        assert!(
            text.contains("early-stopped") && text.contains("done"),
            "{text}"
        );
        assert!(text.contains("every phase present is done"), "{text}");

        let t2 = Tmp::new("finished");
        let mut r = RunBuilder::new(t2.0.clone(), "p1", 100, 50);
        r.eval(0, 3.0, None)
            .steps(1, 100, 1.0, 0.0)
            .eval(100, 2.0, Some(2.2))
            .checkpoint(100, true, 100.0);
        r.write();
        assert_eq!(status(&t2.0).unwrap().phases[0].state, PhaseState::Finished);
    }

    #[test]
    fn pipeline_current_phase() {
        let t = Tmp::new("pipeline");
        std::fs::write(t.0.join("pipeline.toml"), "preset = \"demo\"\n").unwrap();
        let mut p1 = RunBuilder::new(t.0.join("p1"), "p1", 100, 50);
        p1.eval(0, 3.0, None)
            .steps(1, 100, 1.0, 0.0)
            .eval(50, 2.5, Some(2.7))
            .eval(100, 2.6, Some(2.59))
            .checkpoint(100, true, 100.0);
        p1.write();
        let mut p2 = RunBuilder::new(t.0.join("p2"), "p2", 200, 50);
        p2.eval(0, 2.6, None).steps(1, 10, 2.0, 0.0);
        p2.write();
        // p3 created by the pipeline but not set up yet.
        std::fs::create_dir_all(t.0.join("p3")).unwrap();
        let st = status(&t.0).unwrap();
        assert_eq!(st.kind, "pipeline");
        let names: Vec<&str> = st.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["p1", "p2", "p3"]);
        let states: Vec<PhaseState> = st.phases.iter().map(|p| p.state).collect();
        assert_eq!(
            states,
            [
                PhaseState::Finished,
                PhaseState::InProgress,
                PhaseState::NotStarted
            ]
        );
        assert_eq!(st.current.as_deref(), Some("p2"));
        assert_eq!(
            st.phases.iter().map(|p| p.current).collect::<Vec<_>>(),
            [false, true, false]
        );
        assert_eq!(st.phases[0].best_val.as_ref().unwrap().step, 50);
        assert_eq!(st.phases[0].min_gap.as_ref().unwrap().step, 100);
        assert!((st.phases[1].eta_s.unwrap() - 190.0 * 2.0).abs() < 1e-9);
        let text = render(&st);
        assert!(
            text.contains("(pipeline)") && text.contains("p2 *"),
            "{text}"
        );
        assert!(text.contains("current: p2"), "{text}");
        assert!(
            st.control.is_none() && !text.contains("control text"),
            "{text}"
        );

        // Forgetting, once measured, is shown under the table.
        let row = |stage: &str, bpb: f64, moved: Option<f64>| {
            json!({"stage": stage, "model": "m",
                   "bpb": {"segments": 2, "tokens": 9, "bytes": 40, "bits_per_byte": bpb, "mean_loss": 1.0},
                   "kl": moved.map(|m| json!({"positions": 9, "kl_base_vocab": 0.0, "moved_mass": m, "moved_mass_max": m}))})
        };
        let control = json!({"file": "/data/dubliners.txt", "segments": 2, "text_bytes": 40,
                             "rows": [row("base", 1.25, None), row("injected", 7.5, Some(0.99))]});
        std::fs::write(t.0.join("control.json"), control.to_string()).unwrap();
        let text = render(&status(&t.0).unwrap());
        assert!(
            text.contains("control text dubliners.txt (2 segments), bits/byte: base 1.2500 · injected 7.5000 (moved 0.9900)"),
            "{text}"
        );

        // Without pipeline.toml, phase runs in p1/ still make a pipeline directory.
        std::fs::remove_file(t.0.join("pipeline.toml")).unwrap();
        assert_eq!(status(&t.0).unwrap().kind, "pipeline");
    }

    #[test]
    fn torn_last_line_is_tolerated() {
        let t = Tmp::new("torn");
        let mut r = RunBuilder::new(t.0.clone(), "p1", 100, 50);
        r.eval(0, 3.0, None).steps(1, 5, 1.0, 0.0);
        r.log += "{\"kind\":\"step\",\"phase\":\"p1\",\"st";
        r.write();
        assert_eq!(status(&t.0).unwrap().phases[0].steps_done, 5);
    }

    #[test]
    fn errors_name_the_problem() {
        let t = Tmp::new("errors");
        let e = format!("{:#}", status(&t.0).unwrap_err());
        assert!(
            e.contains("is not a run directory") && e.contains("run.toml") && e.contains("p1/"),
            "{e}"
        );
        let e = format!("{:#}", status(&t.0.join("nowhere")).unwrap_err());
        assert!(e.contains("is not a directory"), "{e}");

        let mut r = RunBuilder::new(t.0.join("run"), "p1", 100, 50);
        r.eval(0, 3.0, None).steps(1, 5, 1.0, 0.0);
        r.log += "garbage\n";
        r.steps(6, 7, 1.0, 5.0);
        r.write();
        let e = format!("{:#}", status(&t.0.join("run")).unwrap_err());
        assert!(
            e.contains("unreadable training log") && e.contains("log.jsonl line 7"),
            "{e}"
        );

        std::fs::write(t.0.join("run/run.toml"), "steps = -3\n").unwrap();
        let e = format!("{:#}", status(&t.0.join("run")).unwrap_err());
        assert!(e.contains("`steps` is -3"), "{e}");
        std::fs::write(t.0.join("run/run.toml"), "steps = [\n").unwrap();
        let e = format!("{:#}", status(&t.0.join("run")).unwrap_err());
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(59.6), "1m00s");
        assert_eq!(duration(245.0), "4m05s");
        assert_eq!(duration(3720.0), "1h02m");
        assert_eq!(duration(90000.0), "25h00m");
    }
}
