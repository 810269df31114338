//! `wake2vec compare`: two or more runs or models side by side. An entry is a pipeline directory
//! (`wake2vec run`), a run directory (`wake2vec train`) or a model directory; compare reads what
//! each already records — the training logs, `control.json`, the analysis's `summary.json`, the
//! generation battery's `samples.jsonl` — and writes a new directory:
//!
//! ```text
//! OUT/compare.json          every entry's figures, and what it lacks (`missing`)
//! OUT/val_loss.{png,svg}    validation loss of every entry on one axis
//! OUT/val_bpb.{png,svg}     validation bits per byte
//! OUT/compare.html          one self-contained page: the tables and the figures inlined
//! OUT/analysis/N-LABEL/     with --analyze: the geometry of an entry that had no summary.json
//! ```
//!
//! What an entry lacks is listed, never an error; a path that is no entry is, before anything
//! is written. The directory appears whole or not at all ([`fs::create_dir_atomically`]).

use crate::infer::battery;
use crate::infer::control::ControlReport;
use crate::report::{self, figures};
use crate::run::dir::RunDir;
use crate::run::log::{self, LossSummary};
use crate::run::status::PIPELINE_PHASES;
use crate::util::fs;
use crate::vocab::Manifest;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// What `wake2vec compare` is asked.
#[derive(Debug, Clone)]
pub struct Request {
    /// Pipeline, run or model directories, two or more.
    pub inputs: Vec<PathBuf>,
    /// One name per input (default: each directory's name).
    pub labels: Vec<String>,
    /// The new directory to write.
    pub out: PathBuf,
    /// Compute the geometry of entries without `analysis/summary.json`.
    pub analyze: bool,
}

/// `compare.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub format: u32,
    pub wake2vec_version: &'static str,
    pub entries: Vec<Entry>,
    /// Files written beside compare.json.
    pub figures: Vec<String>,
}

/// What an entry is: something trained (`run`: a pipeline or a run directory) or a `model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Run,
    Model,
}

/// How an entry's directory is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `wake2vec run`: pipeline.toml, model/, p1/ p2/ p3/, final/.
    Pipeline,
    /// `wake2vec train`: run.toml, log.jsonl, checkpoints/.
    Run,
    /// An HF model directory (config.json).
    Model,
}

/// One compared run or model.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub label: String,
    pub path: PathBuf,
    pub kind: Kind,
    /// The init scheme of the Wake rows (wake2vec.json).
    pub init: Option<String>,
    pub base_model: Option<String>,
    /// Final and best validation loss and bits per byte, from the training log(s).
    pub loss: Option<LossSummary>,
    pub curves: Option<Curves>,
    pub control: Option<Control>,
    pub geometry: Option<Geometry>,
    /// The summary.json the geometry was read from.
    pub geometry_from: Option<PathBuf>,
    pub battery: Option<Battery>,
    /// What this entry lacks (a model directory has no log; an unfinished run no final model).
    pub missing: Vec<String>,
}

/// Validation curves on one step axis (a pipeline's phases one after the other).
#[derive(Debug, Clone, Serialize)]
pub struct Curves {
    /// `(first step, name)` of each phase.
    pub phases: Vec<(u64, String)>,
    /// `(step, value)` of every evaluation.
    pub val_loss: Vec<(u64, f64)>,
    pub val_bpb: Vec<(u64, f64)>,
}

/// Forgetting on the control text (`control.json`): the last stage measured against the base.
#[derive(Debug, Clone, Serialize)]
pub struct Control {
    pub file: String,
    pub segments: usize,
    pub base_bpb: Option<f64>,
    /// The last stage measured (`final` for a finished pipeline).
    pub last_stage: String,
    pub last_bpb: f64,
    /// `last_bpb − base_bpb`.
    pub change_from_base: Option<f64>,
    pub last_kl: Option<f64>,
    pub last_moved_mass: Option<f64>,
    /// `(stage, bits per byte)` of every stage.
    pub stages: Vec<(String, f64)>,
}

/// Isotropy of one group of rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Isotropy {
    pub mu2018: Option<f64>,
    pub partition_ratio: Option<f64>,
    pub mean_cos: Option<f64>,
}

/// The geometry table's numbers, from a summary.json (docs/analysis.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Geometry {
    /// What the analysis was given (a pipeline's `final/`, a run directory, a model).
    pub analyzed: Option<PathBuf>,
    /// The run checkpoint analyzed, when it was one.
    pub checkpoint: Option<String>,
    pub wake_count: Option<u64>,
    pub norm_base_mean: Option<f64>,
    pub norm_wake_mean: Option<f64>,
    /// `norm_wake_mean − norm_base_mean`.
    pub norm_gap: Option<f64>,
    pub cohens_d_pooled: Option<f64>,
    pub cohens_d_unweighted: Option<f64>,
    pub isotropy_wake: Isotropy,
    pub isotropy_all: Isotropy,
    pub isoscore_wake: Option<f64>,
    pub isoscore_all: Option<f64>,
    pub collapse_share: Option<f64>,
    /// Principal components reaching 90% of the variance.
    pub pca_dim90_wake: Option<u64>,
    pub pca_dim90_base: Option<u64>,
}

/// The generation battery's text metrics, averaged over its samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Battery {
    pub samples: usize,
    pub mean_tokens: f64,
    /// Over the samples that know it (the model has wake2vec.json).
    pub wake_token_share: Option<f64>,
    pub coinage_rate: f64,
    pub fused_rate: f64,
    pub distinct_1: f64,
    pub distinct_2: f64,
    pub distinct_3: f64,
    pub repetition_rate: f64,
}

/// An input checked to be an entry.
struct Input {
    label: String,
    path: PathBuf,
    layout: Layout,
}

/// Runs `wake2vec compare`: checks every input, then writes `req.out`.
pub fn compare(req: &Request) -> Result<Comparison> {
    let inputs = check_inputs(req)?;
    let mut entries = inputs.iter().map(read_entry).collect::<Result<Vec<_>>>()?;
    fs::create_dir_atomically(&req.out, |tmp| {
        if req.analyze {
            for (i, (input, entry)) in inputs.iter().zip(&mut entries).enumerate() {
                if entry.geometry.is_none() {
                    analyze_entry(
                        input,
                        entry,
                        tmp,
                        &format!("{}-{}", i + 1, slug(&input.label)),
                    )?;
                }
            }
        }
        let figures = write_figures(tmp, &entries)?;
        let comparison = Comparison {
            format: 1,
            wake2vec_version: env!("CARGO_PKG_VERSION"),
            entries,
            figures,
        };
        let json = serde_json::to_string_pretty(&comparison)?;
        fs::write(&tmp.join("compare.json"), json.as_bytes())?;
        fs::write(
            &tmp.join("compare.html"),
            page(&comparison, tmp)?.as_bytes(),
        )?;
        Ok(comparison)
    })
}

/// Every input an entry, the labels one per input and distinct, `out` apart from them all and new.
fn check_inputs(req: &Request) -> Result<Vec<Input>> {
    ensure!(
        req.inputs.len() >= 2,
        "compare needs two or more runs or models, {} given",
        req.inputs.len()
    );
    ensure!(
        req.labels.is_empty() || req.labels.len() == req.inputs.len(),
        "--label given {} times for {} inputs: give one per input, in order",
        req.labels.len(),
        req.inputs.len()
    );
    let mut inputs = Vec::new();
    for (i, path) in req.inputs.iter().enumerate() {
        let layout = classify(path)?;
        let path = fs::absolute(path)?;
        if let Some(earlier) = inputs.iter().find(|e: &&Input| same_dir(&e.path, &path)) {
            bail!(
                "{} is given twice (also as {}): give each run or model once",
                req.inputs[i].display(),
                earlier.path.display()
            );
        }
        fs::check_apart(&req.out, &path, "the input")?;
        let label = match req.labels.get(i) {
            Some(l) => l.trim().to_string(),
            None => dir_name(&path),
        };
        ensure!(
            !label.is_empty(),
            "--label number {} is empty: give each input a name",
            i + 1
        );
        inputs.push(Input {
            label,
            path,
            layout,
        });
    }
    if req.labels.is_empty() {
        disambiguate(&mut inputs);
    } else if let Some(dup) = duplicate(inputs.iter().map(|i| i.label.as_str())) {
        bail!("--label {dup:?} is given twice: give each input its own label");
    }
    fs::check_new_dir(&req.out)?;
    Ok(inputs)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn dir_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
}

fn duplicate<'a>(labels: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = std::collections::HashSet::new();
    labels.into_iter().find(|l| !seen.insert(*l))
}

/// Default labels that repeat (two `runs/demo`) get their parent's name in front.
fn disambiguate(inputs: &mut [Input]) {
    let names: Vec<String> = inputs.iter().map(|i| i.label.clone()).collect();
    for input in inputs.iter_mut() {
        if names.iter().filter(|n| **n == input.label).count() > 1 {
            if let Some(parent) = input.path.parent() {
                input.label = format!("{}/{}", dir_name(parent), input.label);
            }
        }
    }
}

/// A label as a file name.
fn slug(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Which kind of entry `path` is, or why it is none.
fn classify(path: &Path) -> Result<Layout> {
    const WHAT: &str = "give a directory made by `wake2vec run` or `wake2vec train`, or a model directory (config.json)";
    match std::fs::metadata(path) {
        Err(_) => bail!("{} does not exist: {WHAT}", path.display()),
        Ok(m) if !m.is_dir() => bail!("{} is not a directory: {WHAT}", path.display()),
        Ok(_) => {}
    }
    Ok(if path.join("pipeline.toml").is_file() {
        Layout::Pipeline
    } else if RunDir::new(path).is_run() {
        Layout::Run
    } else if path.join("config.json").is_file() {
        Layout::Model
    } else {
        bail!(
            "{} is neither a run (pipeline.toml, run.toml) nor a model directory (config.json): {WHAT}",
            path.display()
        )
    })
}

/// Everything recorded for `input`.
fn read_entry(input: &Input) -> Result<Entry> {
    let dir = &input.path;
    let mut missing = Vec::new();
    let manifest = match model_dir(input)? {
        Some(m) => Manifest::load_if_present(&m)?,
        None => None,
    };
    if manifest.is_none() {
        missing.push("wake2vec.json (init, base model)".into());
    }
    let logs = logs(input, &mut missing);
    let (loss, curves) = if logs.is_empty() {
        (None, None)
    } else {
        let (lines, phases) = log::chain_logs(&logs)?;
        let evals = |f: fn(&log::LogLine) -> Option<f64>| -> Vec<(u64, f64)> {
            let evals = lines.iter().filter(|l| l.kind == "eval");
            evals.filter_map(|l| f(l).map(|v| (l.step, v))).collect()
        };
        let curves = Curves {
            phases: if input.layout == Layout::Pipeline {
                phases
            } else {
                Vec::new()
            },
            val_loss: evals(|l| l.val_loss),
            val_bpb: evals(|l| l.val_bpb),
        };
        (Some(log::summarize_log(&lines)), Some(curves))
    };
    let control = read_control(&dir.join("control.json"), &mut missing)?;
    let summary = dir.join("analysis").join("summary.json");
    let geometry = if summary.is_file() {
        let text = fs::read_to_string(&summary)?;
        let v: Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a summary.json: run `wake2vec analyze` again",
                summary.display()
            )
        })?;
        Some(geometry_of(&v, &summary)?)
    } else {
        missing.push("analysis/summary.json (geometry; --analyze computes it)".into());
        None
    };
    let battery = match battery::existing(dir) {
        Some(p) => Some(battery_of(&battery::read(&p)?)),
        None => {
            missing.push("samples.jsonl (generation battery)".into());
            None
        }
    };
    Ok(Entry {
        label: input.label.clone(),
        path: dir.clone(),
        kind: match input.layout {
            Layout::Model => Kind::Model,
            _ => Kind::Run,
        },
        init: manifest
            .as_ref()
            .and_then(|m| m.init.as_ref())
            .map(|i| i.scheme.name().to_string()),
        base_model: manifest.and_then(|m| m.base_model),
        loss,
        curves,
        control,
        geometry_from: geometry.is_some().then_some(summary),
        geometry,
        battery,
        missing,
    })
}

/// The model directory whose wake2vec.json describes the entry: a pipeline's final model (else
/// its injected model), a run's `model = "..."`, the model itself.
fn model_dir(input: &Input) -> Result<Option<PathBuf>> {
    let dir = &input.path;
    Ok(match input.layout {
        Layout::Model => Some(dir.clone()),
        Layout::Pipeline => Some(
            [dir.join("final"), dir.join("model")]
                .into_iter()
                .find(|d| d.join(crate::vocab::manifest::MANIFEST).is_file())
                .unwrap_or_else(|| dir.join("model")),
        ),
        Layout::Run => {
            let path = RunDir::new(dir).config();
            let table: toml::Table = fs::read_to_string(&path)?
                .parse()
                .with_context(|| format!("{} is not valid TOML", path.display()))?;
            table.get("model").and_then(|m| m.as_str()).map(|m| {
                let m = PathBuf::from(m);
                if m.is_absolute() {
                    m
                } else {
                    dir.join(m)
                }
            })
        }
    })
}

/// The entry's training logs in order (a pipeline's phases that have one).
fn logs(input: &Input, missing: &mut Vec<String>) -> Vec<PathBuf> {
    let runs: Vec<PathBuf> = match input.layout {
        Layout::Model => {
            missing.push("training log (a model directory)".into());
            return Vec::new();
        }
        Layout::Run => vec![input.path.clone()],
        Layout::Pipeline => PIPELINE_PHASES.iter().map(|p| input.path.join(p)).collect(),
    };
    let mut out = Vec::new();
    for run in runs {
        let log = RunDir::new(&run).log();
        if log.is_file() {
            out.push(log);
        } else {
            missing.push(format!("{} (not started)", log.display()));
        }
    }
    out
}

fn read_control(path: &Path, missing: &mut Vec<String>) -> Result<Option<Control>> {
    if !path.is_file() {
        missing.push("control.json (control text)".into());
        return Ok(None);
    }
    Ok(control_of(&ControlReport::load(path)?))
}

/// The last stage of `c` against its base stage; `None` when it has no rows.
fn control_of(c: &ControlReport) -> Option<Control> {
    let last = c.rows.last()?;
    let base = c.rows.iter().find(|r| r.stage == "base");
    let base_bpb = base.map(|r| r.bpb.bits_per_byte);
    Some(Control {
        file: c.file.clone(),
        segments: c.segments,
        base_bpb,
        last_stage: last.stage.clone(),
        last_bpb: last.bpb.bits_per_byte,
        change_from_base: base_bpb.map(|b| last.bpb.bits_per_byte - b),
        last_kl: last.kl.as_ref().map(|k| k.kl_base_vocab),
        last_moved_mass: last.kl.as_ref().map(|k| k.moved_mass),
        stages: c
            .rows
            .iter()
            .map(|r| (r.stage.clone(), r.bpb.bits_per_byte))
            .collect(),
    })
}

/// The geometry numbers of a summary.json (read from `from`).
fn geometry_of(v: &Value, from: &Path) -> Result<Geometry> {
    let format = v.get("format").and_then(Value::as_u64);
    ensure!(
        format == Some(1),
        "{} has summary format {}, this wake2vec reads format 1: run `wake2vec analyze` again",
        from.display(),
        format.map_or("none".into(), |f| f.to_string())
    );
    let f = |p: &str| v.pointer(p).and_then(Value::as_f64);
    let u = |p: &str| v.pointer(p).and_then(Value::as_u64);
    let iso = |g: &str| Isotropy {
        mu2018: f(&format!("/isotropy/{g}/mu2018")),
        partition_ratio: f(&format!("/isotropy/{g}/partition_ratio")),
        mean_cos: f(&format!("/isotropy/{g}/mean_cos")),
    };
    let (base, wake) = (f("/norms/base/mean"), f("/norms/wake/mean"));
    Ok(Geometry {
        analyzed: v
            .pointer("/source/input")
            .and_then(Value::as_str)
            .map(PathBuf::from),
        checkpoint: v
            .pointer("/source/checkpoint")
            .and_then(Value::as_str)
            .map(String::from),
        wake_count: u("/wake_count"),
        norm_base_mean: base,
        norm_wake_mean: wake,
        norm_gap: base.zip(wake).map(|(b, w)| w - b),
        cohens_d_pooled: f("/norms/tests/cohens_d/pooled"),
        cohens_d_unweighted: f("/norms/tests/cohens_d/unweighted"),
        isotropy_wake: iso("wake"),
        isotropy_all: iso("all"),
        isoscore_wake: f("/isoscore/wake"),
        isoscore_all: f("/isoscore/all"),
        collapse_share: f("/collapse/share"),
        pca_dim90_wake: u("/pca/wake/k90"),
        pca_dim90_base: u("/pca/base/k90"),
    })
}

/// The battery's metrics averaged over its samples.
fn battery_of(samples: &[crate::infer::text_metrics::BatterySample]) -> Battery {
    let n = samples.len().max(1) as f64;
    let mean = |f: fn(&crate::infer::text_metrics::TextMetrics) -> f64| {
        samples.iter().map(|s| f(&s.metrics)).sum::<f64>() / n
    };
    let shares: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.metrics.wake_token_share)
        .collect();
    Battery {
        samples: samples.len(),
        mean_tokens: samples.iter().map(|s| s.tokens as f64).sum::<f64>() / n,
        wake_token_share: (!shares.is_empty())
            .then(|| shares.iter().sum::<f64>() / shares.len() as f64),
        coinage_rate: mean(|m| m.coinage_rate),
        fused_rate: mean(|m| m.fused_rate),
        distinct_1: mean(|m| m.distinct_1),
        distinct_2: mean(|m| m.distinct_2),
        distinct_3: mean(|m| m.distinct_3),
        repetition_rate: mean(|m| m.repetition_rate),
    }
}

/// `--analyze`: the geometry of what the entry ends with, written to `tmp/analysis/name`: a
/// pipeline's final model (drift against its injected model), else its newest phase with a
/// checkpoint, else its injected model; a run's newest checkpoint; a model itself.
fn analyze_entry(input: &Input, entry: &mut Entry, tmp: &Path, name: &str) -> Result<()> {
    let dir = &input.path;
    let (path, pre) = match input.layout {
        Layout::Pipeline if dir.join("final").join("config.json").is_file() => {
            (dir.join("final"), Some(dir.join("model")))
        }
        Layout::Pipeline => {
            let newest = PIPELINE_PHASES
                .iter()
                .rev()
                .map(|p| dir.join(p))
                .find(|p| !RunDir::new(p).list_checkpoints().is_empty());
            (newest.unwrap_or_else(|| dir.join("model")), None)
        }
        Layout::Run | Layout::Model => (dir.clone(), None),
    };
    let out = tmp.join("analysis").join(name);
    let req = report::AnalyzeRequest {
        path,
        pre,
        out: Some(out.clone()),
        no_figures: true,
        ..Default::default()
    };
    let summary = report::analyze_path(&req)
        .with_context(|| format!("--analyze {}", input.path.display()))?
        .summary;
    let summary_path = out.join("summary.json");
    entry.geometry = Some(geometry_of(
        &serde_json::to_value(&summary)?,
        &summary_path,
    )?);
    entry
        .missing
        .retain(|m| !m.starts_with("analysis/summary.json"));
    // Recorded relative to the comparison's directory, which is renamed when it is done.
    entry.geometry_from = Some(Path::new("analysis").join(name).join("summary.json"));
    Ok(())
}

/// One curve of an entry's [`Curves`].
type Pick = fn(&Curves) -> &[(u64, f64)];

/// The overlaid validation loss and bits-per-byte figures, when an entry has curves.
fn write_figures(dir: &Path, entries: &[Entry]) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let plots: [(&str, &str, &str, Pick); 2] = [
        ("val_loss", "Validation loss", "loss (nats/token)", |c| {
            &c.val_loss
        }),
        ("val_bpb", "Validation bits per byte", "bits / byte", |c| {
            &c.val_bpb
        }),
    ];
    for (stem, title, y, values) in plots {
        let series: Vec<(String, Vec<(f64, f64)>)> = entries
            .iter()
            .filter_map(|e| {
                let pts = values(e.curves.as_ref()?);
                let pts = pts.iter().map(|&(s, v)| (s as f64, v)).collect::<Vec<_>>();
                (!pts.is_empty()).then(|| (e.label.clone(), pts))
            })
            .collect();
        if series.is_empty() {
            continue;
        }
        let fig = figures::curves_figure(&series, title, ("optimizer step", y), (800, 520))?;
        for (ext, bytes) in [("svg", fig.svg.as_bytes()), ("png", &fig.png[..])] {
            let name = format!("{stem}.{ext}");
            fs::write(&dir.join(&name), bytes)?;
            names.push(name);
        }
    }
    Ok(names)
}

fn num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() && v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) => {
            format!("{v:.3e}")
        }
        Some(v) if v.is_finite() => format!("{v:.4}"),
        _ => "–".into(),
    }
}

fn int(v: Option<u64>) -> String {
    v.map_or("–".into(), |v| v.to_string())
}

const STYLE: &str = "body{font-family:\"DejaVu Sans\",Arial,sans-serif;margin:0 auto;max-width:1500px;\
padding:1.5em 2em;color:#1d1d1f}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}\
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #d0d0d0;\
padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}\
td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#666}\
.figs{display:flex;gap:1em}.figs figure{flex:1;min-width:0}figure{margin:1em 0}figure svg{max-width:100%;height:auto;border:1px solid #eee}\
figcaption{color:#555;font-size:.9em}";

/// One table: a header row, then one row per entry (label first, then `cells`, numeric).
fn table(h: &mut String, heads: &[&str], entries: &[Entry], cells: impl Fn(&Entry) -> Vec<String>) {
    use report::html::escape;
    h.push_str("<table><tr><th>entry</th>");
    for head in heads {
        let _ = write!(h, "<th>{head}</th>");
    }
    h.push_str("</tr>\n");
    for e in entries {
        let _ = write!(h, "<tr><td>{}</td>", escape(&e.label));
        for c in cells(e) {
            let _ = write!(h, "<td class=\"n\">{}</td>", escape(&c));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
}

/// `compare.html`: the entries, their training, control, geometry and battery tables, and the
/// figures in `dir` inlined.
fn page(c: &Comparison, dir: &Path) -> Result<String> {
    use report::html::escape;
    let mut h = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Wake2Vec comparison</title><style>{STYLE}</style></head><body>\n\
         <h1>Wake2Vec comparison — {} entries</h1>\n<p class=\"muted\">wake2vec {}; – marks \
         what an entry does not record (listed under each entry).</p>\n<h2>Entries</h2>\n\
         <table><tr><th>entry</th><th>kind</th><th>init</th><th>base model</th><th>path</th>\
         <th>missing</th></tr>\n",
        c.entries.len(),
        c.wake2vec_version
    );
    for e in &c.entries {
        let kind = match e.kind {
            Kind::Run => "run",
            Kind::Model => "model",
        };
        writeln!(
            h,
            "<tr><td>{}</td><td>{kind}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            escape(&e.label),
            escape(e.init.as_deref().unwrap_or("–")),
            escape(e.base_model.as_deref().unwrap_or("–")),
            escape(&e.path.display().to_string()),
            escape(&if e.missing.is_empty() {
                "nothing".into()
            } else {
                e.missing.join("; ")
            }),
        )?;
    }
    h.push_str("</table>\n<h2>Training (validation)</h2>\n");
    let heads = [
        "final step",
        "final val loss",
        "best val loss",
        "best at step",
        "final val bits/byte",
        "best val bits/byte",
    ];
    table(&mut h, &heads, &c.entries, |e| {
        let l = e.loss.clone().unwrap_or_default();
        vec![
            int(l.final_step),
            num(l.final_val),
            num(l.best_val),
            int(l.best_val_step),
            num(l.final_val_bpb),
            num(l.best_val_bpb),
        ]
    });
    h.push_str("<div class=\"figs\">\n");
    for (stem, caption) in [
        ("val_loss", "Validation loss (nats/token)."),
        ("val_bpb", "Validation bits per byte."),
    ] {
        let path = dir.join(format!("{stem}.svg"));
        if path.is_file() {
            let svg = fs::read_to_string(&path)?;
            let svg = &svg[svg.find("<svg").unwrap_or(0)..];
            writeln!(
                h,
                "<figure>{svg}<figcaption>{caption}</figcaption></figure>"
            )?;
        }
    }
    h.push_str("</div>\n");
    // Where each phase starts, once for the entries whose phases start alike.
    let mut notes: Vec<(String, Vec<&str>)> = Vec::new();
    for e in &c.entries {
        let Some(curves) = e.curves.as_ref().filter(|c| c.phases.len() > 1) else {
            continue;
        };
        let starts: Vec<String> = curves
            .phases
            .iter()
            .map(|(step, name)| format!("{name} at step {step}"))
            .collect();
        let starts = starts.join(", ");
        match notes.iter_mut().find(|n| n.0 == starts) {
            Some(n) => n.1.push(&e.label),
            None => notes.push((starts, vec![&e.label])),
        }
    }
    for (starts, labels) in notes {
        writeln!(
            h,
            "<p class=\"muted\">{}: phases one after the other on the step axis, {starts}.</p>",
            escape(&labels.join(", "))
        )?;
    }
    h.push_str("<h2>Control text (forgetting)</h2>\n");
    let heads = [
        "file",
        "base bits/byte",
        "last stage",
        "bits/byte",
        "change from base",
        "KL from base (nats)",
        "moved mass",
    ];
    table(&mut h, &heads, &c.entries, |e| match &e.control {
        None => vec!["–".into(); 7],
        Some(k) => vec![
            dir_name(Path::new(&k.file)),
            num(k.base_bpb),
            k.last_stage.clone(),
            num(Some(k.last_bpb)),
            k.change_from_base
                .map_or("–".into(), |d| format!("{d:+.4}")),
            num(k.last_kl),
            num(k.last_moved_mass),
        ],
    });
    h.push_str(
        "<h2>Embedding geometry (Wake rows)</h2>\n<p class=\"muted\">Norm gap = mean Wake norm − \
         mean base norm; Cohen's d pooled / unweighted; isotropy of the Wake rows: Mu et al. 2018, \
         the original's partition ratio, mean cosine; IsoScore; collapse share onto byte tokens; \
         PCA components reaching 90% of the variance (docs/analysis.md).</p>\n",
    );
    let heads = [
        "analyzed",
        "norm gap",
        "d pooled",
        "d unweighted",
        "Mu 2018",
        "partition ratio",
        "mean cos",
        "IsoScore Wake",
        "IsoScore all",
        "collapse share",
        "PCA dim90 Wake",
        "PCA dim90 base",
    ];
    table(&mut h, &heads, &c.entries, |e| match &e.geometry {
        None => vec!["–".into(); 12],
        Some(g) => vec![
            [g.analyzed.as_deref().map(dir_name), g.checkpoint.clone()]
                .into_iter()
                .flatten()
                .reduce(|a, b| format!("{a} {b}"))
                .unwrap_or_else(|| "–".into()),
            num(g.norm_gap),
            num(g.cohens_d_pooled),
            num(g.cohens_d_unweighted),
            num(g.isotropy_wake.mu2018),
            num(g.isotropy_wake.partition_ratio),
            num(g.isotropy_wake.mean_cos),
            num(g.isoscore_wake),
            num(g.isoscore_all),
            num(g.collapse_share),
            int(g.pca_dim90_wake),
            int(g.pca_dim90_base),
        ],
    });
    h.push_str("<h2>Generation battery (means over the samples)</h2>\n");
    let heads = [
        "samples",
        "tokens",
        "Wake-token share",
        "coinage rate",
        "fused-word rate",
        "distinct-1",
        "distinct-2",
        "distinct-3",
        "repetition rate",
    ];
    table(&mut h, &heads, &c.entries, |e| match &e.battery {
        None => vec!["–".into(); 9],
        Some(b) => vec![
            b.samples.to_string(),
            format!("{:.1}", b.mean_tokens),
            num(b.wake_token_share),
            num(Some(b.coinage_rate)),
            num(Some(b.fused_rate)),
            num(Some(b.distinct_1)),
            num(Some(b.distinct_2)),
            num(Some(b.distinct_3)),
            num(Some(b.repetition_rate)),
        ],
    });
    h.push_str("</body></html>\n");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::control::{ControlBpb, ControlKl, ControlRow};
    use crate::infer::text_metrics::{BatterySample, TextMetrics};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("w2v-compare-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn inputs_are_classified_or_refused_in_one_line() {
        let d = scratch("classify");
        for (sub, file) in [
            ("pipe", "pipeline.toml"),
            ("run", "run.toml"),
            ("model", "config.json"),
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
            std::fs::write(d.join(sub).join(file), "").unwrap();
        }
        assert_eq!(classify(&d.join("pipe")).unwrap(), Layout::Pipeline);
        assert_eq!(classify(&d.join("run")).unwrap(), Layout::Run);
        assert_eq!(classify(&d.join("model")).unwrap(), Layout::Model);
        std::fs::create_dir_all(d.join("empty")).unwrap();
        for (p, says) in [
            ("empty", "neither a run"),
            ("nowhere", "does not exist"),
            ("run/run.toml", "not a directory"),
        ] {
            let e = format!("{:#}", classify(&d.join(p)).unwrap_err());
            assert!(e.contains(says) && !e.contains('\n'), "{e}");
        }
        let req = |inputs: &[&str], labels: &[&str], out: &str| Request {
            inputs: inputs.iter().map(|i| d.join(i)).collect(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            out: d.join(out),
            analyze: false,
        };
        let err = |r: Request| format!("{:#}", check_inputs(&r).err().unwrap());
        assert!(err(req(&["run"], &[], "o")).contains("two or more"));
        assert!(err(req(&["run", "model"], &["a"], "o")).contains("one per input"));
        assert!(err(req(&["run", "model"], &["a", "a"], "o")).contains("given twice"));
        assert!(err(req(&["run", "run/"], &[], "o")).contains("given twice"));
        assert!(err(req(&["run", "model"], &[], "run/cmp")).contains("inside the input"));
        let ok = check_inputs(&req(&["run", "model"], &[], "o")).unwrap();
        assert_eq!(ok[0].label, "run");
        assert_eq!(slug("a b/c"), "a_b_c");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn geometry_control_and_battery_are_read_as_recorded() {
        let v = serde_json::json!({
            "format": 1, "source": {"input": "/r/p1", "checkpoint": "step-40"}, "wake_count": 3,
            "norms": {"base": {"mean": 1.0}, "wake": {"mean": 1.5},
                      "tests": {"cohens_d": {"pooled": 2.0, "unweighted": 2.1}}},
            "isotropy": {"wake": {"mu2018": 0.5, "partition_ratio": 0.4, "mean_cos": 0.3},
                         "all": {"mu2018": 0.2}},
            "isoscore": {"wake": 0.1, "all": null},
            "collapse": {"share": 0.25},
            "pca": {"base": {"k90": 100}, "wake": {"k90": 7}}
        });
        let g = geometry_of(&v, Path::new("s.json")).unwrap();
        assert_eq!(g.norm_gap, Some(0.5));
        assert_eq!(g.checkpoint.as_deref(), Some("step-40"));
        assert_eq!(g.analyzed.as_deref(), Some(Path::new("/r/p1")));
        assert_eq!(g.isotropy_wake.partition_ratio, Some(0.4));
        assert_eq!(g.isotropy_all.mean_cos, None);
        assert_eq!((g.isoscore_wake, g.isoscore_all), (Some(0.1), None));
        assert_eq!((g.pca_dim90_wake, g.pca_dim90_base), (Some(7), Some(100)));
        let old = serde_json::json!({"format": 0});
        assert!(geometry_of(&old, Path::new("s.json")).is_err());

        let bpb = |b: f64| ControlBpb {
            segments: 1,
            tokens: 10,
            bytes: 40,
            bits_per_byte: b,
            mean_loss: 1.0,
        };
        let row = |stage: &str, b: f64, kl: Option<f64>| ControlRow {
            stage: stage.into(),
            model: stage.into(),
            bpb: bpb(b),
            kl: kl.map(|k| ControlKl {
                positions: 9,
                kl_base_vocab: k,
                moved_mass: 0.5,
                moved_mass_max: 0.9,
            }),
        };
        let report = ControlReport {
            file: "/data/dubliners.txt".into(),
            segments: 1,
            text_bytes: 40,
            rows: vec![row("base", 1.25, None), row("final", 1.5, Some(0.01))],
        };
        let c = control_of(&report).unwrap();
        assert_eq!((c.last_stage.as_str(), c.last_bpb), ("final", 1.5));
        assert_eq!(c.change_from_base, Some(0.25));
        assert_eq!((c.last_kl, c.last_moved_mass), (Some(0.01), Some(0.5)));

        let sample = |share: Option<f64>, d1: f64| BatterySample {
            label: "s".into(),
            temperature: 0.9,
            top_p: 0.92,
            top_k: 50,
            repetition_penalty: 1.15,
            seed: 42,
            prompt: "p".into(),
            text: "t".into(),
            tokens: 10,
            metrics: TextMetrics {
                words: 5,
                wake_token_share: share,
                coinage_rate: 0.1,
                fused_rate: 0.0,
                distinct_1: d1,
                distinct_2: 1.0,
                distinct_3: 1.0,
                repetition_rate: 0.0,
                fused_examples: vec![],
            },
        };
        let b = battery_of(&[sample(Some(0.2), 0.5), sample(None, 1.0)]);
        assert_eq!((b.samples, b.mean_tokens), (2, 10.0));
        assert_eq!(
            b.wake_token_share,
            Some(0.2),
            "over the samples that know it"
        );
        assert_eq!(b.distinct_1, 0.75);
    }
}
