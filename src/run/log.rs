//! `log.jsonl`, the training log (docs/formats.md): one JSON object per line, a `step` line per
//! optimizer step and an `eval` line per evaluation. The writer's line types and the reader.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A `log.jsonl` line of an optimizer step (docs/formats.md). `loss` is the language-model loss
/// in every phase; Phase 3 adds its auxiliary components (`A`) and the total.
#[derive(Serialize)]
pub struct StepLine<'a, A> {
    pub kind: &'static str,
    pub phase: &'a str,
    pub step: u64,
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux: Option<A>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// A `log.jsonl` line of an evaluation: the language-model loss alone in every phase, so phases
/// compare; `train_loss` is the mean step loss since the previous evaluation (null at step 0).
#[derive(Serialize)]
pub struct EvalLine<'a> {
    pub kind: &'static str,
    pub phase: &'a str,
    pub step: u64,
    pub val_loss: f64,
    pub val_bpb: f64,
    pub train_loss: Option<f64>,
}

/// One line of `log.jsonl` (docs/formats.md); unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct LogLine {
    pub kind: String,
    #[serde(default)]
    pub phase: Option<String>,
    pub step: u64,
    #[serde(default)]
    pub loss: Option<f64>,
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub val_loss: Option<f64>,
    #[serde(default)]
    pub val_bpb: Option<f64>,
    #[serde(default)]
    pub train_loss: Option<f64>,
    /// Training time of all sessions so far (step lines).
    #[serde(default)]
    pub elapsed_s: Option<f64>,
}

/// Where each of chained logs starts on the shared step axis, with its name.
pub type PhaseStarts = Vec<(u64, String)>;

/// Several training logs as one: each log's steps are shifted to continue after the previous
/// log's last step (a pipeline's phases in order). Also where each log starts on the shared
/// step axis, named by its directory (`p1`, `p2`, …).
pub fn chain_logs(paths: &[PathBuf]) -> Result<(Vec<LogLine>, PhaseStarts)> {
    let mut out: Vec<LogLine> = Vec::new();
    let mut starts = Vec::new();
    for p in paths {
        let offset = out.iter().map(|l| l.step).max().unwrap_or(0);
        let name = p
            .parent()
            .and_then(|d| d.file_name())
            .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into());
        starts.push((offset, name));
        out.extend(load_log(p)?.into_iter().map(|mut l| {
            l.step += offset;
            l
        }));
    }
    Ok((out, starts))
}

/// Reads `log.jsonl`; a torn last line (a run killed mid-write) is skipped, any other bad line
/// is an error.
pub fn load_log(path: &Path) -> Result<Vec<LogLine>> {
    let text = crate::util::fs::read_to_string(path)?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<LogLine>(line) {
            Ok(l) => out.push(l),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => bail!("{} line {}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Loss numbers for the summary, from the log.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LossSummary {
    pub steps_logged: usize,
    pub final_step: Option<u64>,
    pub final_train: Option<f64>,
    pub init_val: Option<f64>,
    pub final_val: Option<f64>,
    pub best_val: Option<f64>,
    pub best_val_step: Option<u64>,
    /// Validation bits per byte: comparable across tokenizers.
    pub final_val_bpb: Option<f64>,
    pub best_val_bpb: Option<f64>,
}

/// The loss figures of a log: final and best evaluations, the final training loss.
pub fn summarize_log(log: &[LogLine]) -> LossSummary {
    let steps: Vec<&LogLine> = log.iter().filter(|l| l.kind == "step").collect();
    let evals: Vec<&LogLine> = log
        .iter()
        .filter(|l| l.kind == "eval" && l.val_loss.is_some())
        .collect();
    let best = evals
        .iter()
        .min_by(|a, b| a.val_loss.unwrap().total_cmp(&b.val_loss.unwrap()));
    LossSummary {
        steps_logged: steps.len(),
        final_step: log.iter().map(|l| l.step).max(),
        final_train: steps.iter().rev().find_map(|l| l.loss),
        init_val: evals.iter().find(|l| l.step == 0).and_then(|l| l.val_loss),
        final_val: evals.last().and_then(|l| l.val_loss),
        best_val: best.and_then(|l| l.val_loss),
        best_val_step: best.map(|l| l.step),
        final_val_bpb: evals.last().and_then(|l| l.val_bpb),
        best_val_bpb: evals.iter().filter_map(|l| l.val_bpb).reduce(f64::min),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_summary_takes_final_and_best() {
        let text = r#"{"kind":"eval","phase":"p1","step":0,"val_loss":9.0,"val_bpb":3.0,"train_loss":9.1}
{"kind":"step","phase":"p1","step":1,"loss":8.0,"lr":0.001,"grad_norm":1.0,"tokens_per_s":100.0,"elapsed_s":1.0}
{"kind":"step","phase":"p1","step":2,"loss":7.0,"lr":0.001,"grad_norm":1.0,"tokens_per_s":100.0,"elapsed_s":2.0}
{"kind":"eval","phase":"p1","step":2,"val_loss":6.5,"val_bpb":2.1,"train_loss":7.0}
{"kind":"eval","phase":"p1","step":4,"val_loss":6.7,"val_bpb":2.2,"train_loss":6.9}
{"kind":"step","phase":"p1","step":5,"lo"#;
        let dir = std::env::temp_dir().join(format!("w2v-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log.jsonl");
        std::fs::write(&p, text).unwrap();
        let log = load_log(&p).unwrap();
        assert_eq!(log.len(), 5, "the torn last line is skipped");
        let s = summarize_log(&log);
        assert_eq!(s.final_train, Some(7.0));
        assert_eq!(s.init_val, Some(9.0));
        assert_eq!(s.final_val, Some(6.7));
        assert_eq!(s.best_val, Some(6.5));
        assert_eq!(s.best_val_step, Some(2));
        assert_eq!(s.best_val_bpb, Some(2.1));
        // a bad line in the middle is an error
        std::fs::write(&p, "{\"kind\":\"step\"}\n{\"kind\":\"step\",\"step\":1}\n").unwrap();
        assert!(load_log(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
