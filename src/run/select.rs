//! Checkpoint selection between phases: which step of a finished phase the next one starts from.
//!
//! A [`Rule`] is applied to the evaluations of a run's `log.jsonl` ([`read_evals`]):
//!
//! - `best-val`: the step of the lowest validation loss;
//! - `min-gap`: the step of the smallest |val_loss − train_loss| among the evaluations that have a
//!   train loss: the seed's rule, which picked its Phase 2 step 1400 (train 0.6388, val 0.6393,
//!   gap 0.0005) although the lowest validation loss (0.6172) was at step 800;
//! - `final`: the last step done;
//! - `step-N` (or a bare `N`): step N itself.
//!
//! Choices, so that every selected step names a checkpoint the run can have:
//!
//! - Step 0 never qualifies: its evaluation measures the phase's input, and the engine keeps no
//!   checkpoint of it. `best-val` therefore picks the best *trained* step even when training made
//!   the validation loss worse than at step 0.
//! - An evaluation whose validation loss is not finite (logged as `null`: JSON has no NaN) never
//!   qualifies; for `min-gap` neither does one whose train loss is missing or not finite.
//! - Ties go to the earliest step.
//! - `step-N` is accepted when an evaluation exists at step N (N > 0) or N is the last step done
//!   (a run always checkpoints its end); otherwise it is an error that lists the evaluated steps.
//!   Whether that checkpoint was kept from pruning is for the caller to check when it loads it;
//!   [`current_picks`] tells the engine which ones `best-val` and `min-gap` would choose so it
//!   can keep them.

use super::dir::{step_names, RunDir};
use super::log::load_log;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// How to choose the checkpoint a phase hands to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// The lowest validation loss.
    BestVal,
    /// The smallest |val_loss − train_loss| (the seed's rule).
    MinGap,
    /// The last step done.
    Final,
    /// This step.
    Step(u64),
}

const ACCEPTED: &str = "expected best-val, min-gap, final, step-N or a step number N";

impl FromStr for Rule {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let step = |n: &str| n.parse::<u64>().ok();
        Ok(match t.to_ascii_lowercase().as_str() {
            "best-val" => Rule::BestVal,
            "min-gap" => Rule::MinGap,
            "final" => Rule::Final,
            other => match other.strip_prefix("step-").map_or(step(other), step) {
                Some(n) => Rule::Step(n),
                None => bail!("unknown checkpoint selection rule '{s}': {ACCEPTED}"),
            },
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::BestVal => f.write_str("best-val"),
            Rule::MinGap => f.write_str("min-gap"),
            Rule::Final => f.write_str("final"),
            Rule::Step(n) => write!(f, "step-{n}"),
        }
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rule {
    /// The string forms, and a bare integer (`select = 1400` in TOML) as `step-1400`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Rule;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(ACCEPTED)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Rule, E> {
                v.parse().map_err(|e: anyhow::Error| E::custom(e))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Rule, E> {
                Ok(Rule::Step(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Rule, E> {
                u64::try_from(v)
                    .map(Rule::Step)
                    .map_err(|_| E::custom(format!("step {v} is negative: {ACCEPTED}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// One `"kind":"eval"` line of `log.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalRecord {
    pub phase: String,
    pub step: u64,
    /// NaN when the log has `null` (a non-finite loss).
    pub val_loss: f64,
    /// The mean step loss since the previous evaluation; `None` at step 0.
    pub train_loss: Option<f64>,
}

impl EvalRecord {
    /// |val_loss − train_loss| when both are finite.
    pub fn gap(&self) -> Option<f64> {
        let t = self.train_loss.filter(|t| t.is_finite())?;
        self.val_loss.is_finite().then(|| (self.val_loss - t).abs())
    }
}

/// The evaluations of a run's `log.jsonl`, in log order. Other kinds of line are ignored; a torn
/// last line (a run killed while writing it) is skipped; any other malformed line is an error
/// naming its line number.
pub fn read_evals(log: &Path) -> Result<Vec<EvalRecord>> {
    Ok(load_log(log)?
        .into_iter()
        .filter(|l| l.kind == "eval")
        .map(|l| EvalRecord {
            phase: l.phase.unwrap_or_default(),
            step: l.step,
            val_loss: l.val_loss.unwrap_or(f64::NAN),
            train_loss: l.train_loss,
        })
        .collect())
}

/// The evaluation with the smallest `key` among those where it is defined; ties → earliest step.
fn arg_min(evals: &[EvalRecord], key: impl Fn(&EvalRecord) -> Option<f64>) -> Option<&EvalRecord> {
    evals
        .iter()
        .filter(|e| e.step > 0)
        .filter_map(|e| key(e).filter(|k| k.is_finite()).map(|k| (k, e)))
        .min_by(|(a, ea), (b, eb)| a.total_cmp(b).then(ea.step.cmp(&eb.step)))
        .map(|(_, e)| e)
}

fn best_val(evals: &[EvalRecord]) -> Option<u64> {
    arg_min(evals, |e| Some(e.val_loss)).map(|e| e.step)
}

fn min_gap(evals: &[EvalRecord]) -> Option<u64> {
    arg_min(evals, EvalRecord::gap).map(|e| e.step)
}

/// The step `rule` selects, given the run's evaluations and the last step it did.
pub fn select(evals: &[EvalRecord], rule: Rule, last_step: u64) -> Result<u64> {
    match rule {
        Rule::BestVal => best_val(evals).ok_or_else(|| {
            anyhow::anyhow!(
                "best-val: no evaluation after step 0 has a finite validation loss ({} evaluations logged)",
                evals.len()
            )
        }),
        Rule::MinGap => min_gap(evals).ok_or_else(|| {
            anyhow::anyhow!(
                "min-gap: no evaluation after step 0 has both a finite validation and train loss ({} evaluations logged); use best-val or final",
                evals.len()
            )
        }),
        Rule::Final => {
            ensure!(last_step > 0, "final: the run has done no step yet");
            Ok(last_step)
        }
        Rule::Step(0) => {
            bail!("step-0 is the phase's input, not a checkpoint of the run: choose a step > 0")
        }
        Rule::Step(n) => {
            if n == last_step || evals.iter().any(|e| e.step == n) {
                return Ok(n);
            }
            let steps: Vec<String> = evals
                .iter()
                .filter(|e| e.step > 0)
                .map(|e| e.step.to_string())
                .collect();
            bail!(
                "step-{n}: the run has no evaluation at step {n} and its last step is {last_step}; evaluated steps: {}",
                if steps.is_empty() {
                    "none".to_string()
                } else {
                    steps.join(", ")
                }
            )
        }
    }
}

/// The steps `best-val` and `min-gap` would choose now: the engine keeps their checkpoints from
/// pruning.
pub fn current_picks(evals: &[EvalRecord]) -> (Option<u64>, Option<u64>) {
    (best_val(evals), min_gap(evals))
}

/// The step of the checkpoint of `run` that `which` names: `last` (the newest checkpoint), a
/// selection rule (`best-val` or `best`, `min-gap`, `final`) or `step-N`. Step 0 is the run's
/// starting state (no checkpoint needed).
pub fn checkpoint_step(run: &RunDir, which: &str) -> Result<u64> {
    let all = run.list_checkpoints();
    let newest = all.last().map(|(s, _)| *s);
    let step = match which {
        "last" => {
            newest.with_context(|| format!("{} has no checkpoints yet", run.root().display()))?
        }
        _ => {
            let rule: Rule = match which {
                "best" => Rule::BestVal,
                w => w.parse()?,
            };
            let evals = read_evals(&run.log())?;
            let last = newest
                .with_context(|| format!("{} has no checkpoints yet", run.root().display()))?;
            select(&evals, rule, last)?
        }
    };
    ensure!(
        step == 0 || all.iter().any(|(s, _)| *s == step),
        "{which} chose step {step} of {}, but its checkpoint was not kept (available: {}); keep_best = true keeps the best-val and min-gap checkpoints",
        run.root().display(),
        step_names(&all)
    );
    Ok(step)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ev(step: u64, val: f64, train: Option<f64>) -> EvalRecord {
        EvalRecord {
            phase: "p2".into(),
            step,
            val_loss: val,
            train_loss: train,
        }
    }

    /// Writes log lines as the engine does (serde_json: NaN becomes null).
    fn eval_line(step: u64, val: f64, train: Option<f64>) -> String {
        serde_json::json!({"kind": "eval", "phase": "p2", "step": step, "val_loss": val,
                           "val_bpb": val / std::f64::consts::LN_2 / 4.0, "train_loss": train})
        .to_string()
    }

    fn step_line(step: u64, loss: f64) -> String {
        serde_json::json!({"kind": "step", "phase": "p2", "step": step, "loss": loss, "lr": 2e-5,
                           "grad_norm": 0.5, "tokens_per_s": 900.0, "elapsed_s": step as f64})
        .to_string()
    }

    struct TempLog(std::path::PathBuf);
    impl TempLog {
        fn new(name: &str, text: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "wake2vec-select-{}-{name}.jsonl",
                std::process::id()
            ));
            std::fs::File::create(&p)
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            TempLog(p)
        }
    }
    impl Drop for TempLog {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A Phase 2 log shaped like the seed's: validation lowest at step 800 (0.6172), the
    /// train/validation gap smallest at 1400 (train 0.6388, val 0.6393 at the log's precision:
    /// gap 0.0005, "0.001" at the seed's three decimals), with step lines in between.
    fn seed_log() -> String {
        let evals: [(u64, f64, Option<f64>); 9] = [
            (0, 0.9000, None),
            (200, 0.7400, Some(0.8600)),
            (400, 0.6700, Some(0.7400)),
            (600, 0.6300, Some(0.6900)),
            (800, 0.6172, Some(0.6600)),
            (1000, 0.6250, Some(0.6500)),
            (1200, 0.6330, Some(0.6450)),
            (1400, 0.6393, Some(0.6388)),
            (1600, 0.6480, Some(0.6300)),
        ];
        let mut lines = vec![];
        for (step, val, train) in evals {
            if step > 0 {
                for s in step - 2..=step {
                    lines.push(step_line(s, train.unwrap()));
                }
            }
            lines.push(eval_line(step, val, train));
        }
        lines.join("\n") + "\n"
    }

    #[test]
    fn seed_numbers_best_val_800_min_gap_1400() {
        let log = TempLog::new("seed", &seed_log());
        let evals = read_evals(&log.0).unwrap();
        assert_eq!(evals.len(), 9, "step lines are not evaluations");
        assert_eq!(evals[0].train_loss, None);
        assert_eq!(select(&evals, Rule::BestVal, 1600).unwrap(), 800);
        assert_eq!(select(&evals, Rule::MinGap, 1600).unwrap(), 1400);
        assert_eq!(select(&evals, Rule::Final, 1600).unwrap(), 1600);
        let e1400 = evals.iter().find(|e| e.step == 1400).unwrap();
        assert!((e1400.gap().unwrap() - 0.0005).abs() < 1e-9);
        assert_eq!(current_picks(&evals), (Some(800), Some(1400)));
    }

    #[test]
    fn ties_go_to_the_earliest_step() {
        let evals = vec![
            ev(0, 0.5, None),
            ev(100, 0.7, Some(0.6)),
            ev(200, 0.6, Some(0.8)),
            ev(300, 0.6, Some(0.7)),
            ev(400, 0.8, Some(0.9)),
        ];
        assert_eq!(select(&evals, Rule::BestVal, 400).unwrap(), 200);
        // Exact ties need equal floating-point differences: gaps of exactly 0.25 each.
        let tied = vec![
            ev(100, 1.25, Some(1.0)),
            ev(200, 0.75, Some(1.0)),
            ev(300, 1.0, Some(1.25)),
        ];
        assert_eq!(select(&tied, Rule::MinGap, 300).unwrap(), 100);
        // Log order does not matter, the step does.
        let reversed: Vec<EvalRecord> = tied.iter().rev().cloned().collect();
        assert_eq!(select(&reversed, Rule::MinGap, 300).unwrap(), 100);
    }

    #[test]
    fn step_zero_never_selected() {
        // The best validation loss is the untrained one: best-val still names a trained step.
        let evals = vec![
            ev(0, 0.1, None),
            ev(100, 0.9, Some(1.0)),
            ev(200, 0.8, Some(0.5)),
        ];
        assert_eq!(select(&evals, Rule::BestVal, 200).unwrap(), 200);
        assert_eq!(select(&evals, Rule::MinGap, 200).unwrap(), 100);
        let e = select(&evals, Rule::Step(0), 200).unwrap_err().to_string();
        assert!(e.contains("step-0") && e.contains("> 0"), "{e}");
    }

    #[test]
    fn nan_val_loss_excluded() {
        let text = [
            eval_line(0, 1.0, None),
            eval_line(100, f64::NAN, Some(0.9)),
            eval_line(200, 0.95, Some(0.7)),
            eval_line(300, 0.97, Some(f64::NAN)),
        ]
        .join("\n")
            + "\n";
        assert!(
            text.contains("\"val_loss\":null"),
            "serde_json writes NaN as null"
        );
        let log = TempLog::new("nan", &text);
        let evals = read_evals(&log.0).unwrap();
        assert!(evals[1].val_loss.is_nan());
        assert_eq!(select(&evals, Rule::BestVal, 300).unwrap(), 200);
        assert_eq!(select(&evals, Rule::MinGap, 300).unwrap(), 200);
        let only_nan = vec![ev(0, 1.0, None), ev(100, f64::NAN, Some(0.9))];
        let e = select(&only_nan, Rule::BestVal, 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("best-val") && e.contains("finite"), "{e}");
        assert_eq!(current_picks(&only_nan), (None, None));
    }

    #[test]
    fn missing_train_loss_only_stops_min_gap() {
        let evals = vec![ev(0, 1.0, None), ev(100, 0.8, None), ev(200, 0.9, None)];
        assert_eq!(select(&evals, Rule::BestVal, 200).unwrap(), 100);
        let e = select(&evals, Rule::MinGap, 200).unwrap_err().to_string();
        assert!(e.contains("min-gap") && e.contains("train loss"), "{e}");
        assert_eq!(current_picks(&evals), (Some(100), None));
    }

    #[test]
    fn empty_log() {
        let log = TempLog::new("empty", "");
        let evals = read_evals(&log.0).unwrap();
        assert!(evals.is_empty());
        for rule in [Rule::BestVal, Rule::MinGap, Rule::Step(5)] {
            assert!(select(&evals, rule, 0).is_err(), "{rule}");
        }
        assert!(select(&evals, Rule::Final, 0).is_err());
        // A log of step lines only (eval_every = 0 mid-run): final still works.
        assert_eq!(select(&evals, Rule::Final, 7).unwrap(), 7);
        assert_eq!(current_picks(&evals), (None, None));
    }

    #[test]
    fn truncated_last_line_ignored_other_bad_lines_named() {
        let good = seed_log();
        let torn = format!("{good}{}", &eval_line(1800, 0.5, Some(0.5))[..30]);
        let log = TempLog::new("torn", &torn);
        let evals = read_evals(&log.0).unwrap();
        assert_eq!(evals.len(), 9);
        assert_eq!(select(&evals, Rule::BestVal, 1600).unwrap(), 800);

        // The same damage in the middle of the log is an error with its line number.
        let mut lines: Vec<String> = good.lines().map(String::from).collect();
        lines[4].truncate(20);
        let log = TempLog::new("bad", &(lines.join("\n") + "\n"));
        let e = format!("{:#}", read_evals(&log.0).unwrap_err());
        assert!(e.contains("line 5"), "{e}");
        // A complete last line that is not JSON is damage too, not a torn write.
        let log = TempLog::new("badlast", &format!("{good}not json\n"));
        assert!(read_evals(&log.0).is_err());
    }

    #[test]
    fn explicit_step_present_or_absent() {
        let evals = vec![
            ev(0, 1.0, None),
            ev(200, 0.8, Some(0.9)),
            ev(400, 0.7, Some(0.8)),
        ];
        assert_eq!(select(&evals, Rule::Step(200), 450).unwrap(), 200);
        // The last step always has a checkpoint, evaluated or not.
        assert_eq!(select(&evals, Rule::Step(450), 450).unwrap(), 450);
        let e = select(&evals, Rule::Step(300), 450)
            .unwrap_err()
            .to_string();
        assert!(e.contains("step-300") && e.contains("200, 400"), "{e}");
        let e = select(&evals, Rule::Step(900), 450)
            .unwrap_err()
            .to_string();
        assert!(e.contains("last step is 450"), "{e}");
    }

    #[test]
    fn rule_parse_display_serde() {
        for (s, r) in [
            ("best-val", Rule::BestVal),
            ("min-gap", Rule::MinGap),
            ("final", Rule::Final),
            ("step-1400", Rule::Step(1400)),
        ] {
            assert_eq!(s.parse::<Rule>().unwrap(), r);
            assert_eq!(r.to_string(), s);
        }
        assert_eq!("1400".parse::<Rule>().unwrap(), Rule::Step(1400));
        assert_eq!(" Min-Gap ".parse::<Rule>().unwrap(), Rule::MinGap);
        for bad in ["best", "step-", "step--3", "-3", "step-1.5", ""] {
            let e = bad.parse::<Rule>().unwrap_err().to_string();
            assert!(
                e.contains("best-val, min-gap, final, step-N") && !e.contains('\n'),
                "{bad}: {e}"
            );
        }

        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Cfg {
            select: Rule,
        }
        let text = toml::to_string(&Cfg {
            select: Rule::Step(7),
        })
        .unwrap();
        assert_eq!(text.trim(), "select = \"step-7\"");
        let back: Cfg = toml::from_str(&text).unwrap();
        assert_eq!(back.select, Rule::Step(7));
        let n: Cfg = toml::from_str("select = 1400").unwrap();
        assert_eq!(n.select, Rule::Step(1400));
        let m: Cfg = toml::from_str("select = \"min-gap\"").unwrap();
        assert_eq!(m.select, Rule::MinGap);
        let e = toml::from_str::<Cfg>("select = \"lowest\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("best-val, min-gap"), "{e}");
        assert!(toml::from_str::<Cfg>("select = -2").is_err());
        assert_eq!(
            serde_json::to_string(&Rule::BestVal).unwrap(),
            "\"best-val\""
        );
    }
}
