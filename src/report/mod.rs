//! Everything a person reads: `summary.json`, the figures (PNG + SVG) and `report.html`.
//!
//! [`analyze_path`] is `wake2vec analyze`: it resolves a model or run directory, runs the
//! geometry suite, reads the training log and snapshots when there are some, and writes the
//! summary and figures into the output directory.

pub mod figures;
pub mod html;
pub mod projector;

use crate::analysis::{
    self,
    collapse::{Collapse, Hubness},
    drift::Drift,
    isoscore::IsoScores,
    isotropy::IsotropyGroups,
    load::{self, Source},
    morph,
    neighbours::NeighbourQuery,
    norms::Norms,
    pairwise::Pairwise,
    pca::PcaGroups,
    trajectory, DriftReference, Embeddings, Geometry, Layout, Options, Vocabulary,
};
use crate::infer::control::ControlReport;
use crate::run::dir::RunDir;
use crate::run::log::{self, LogLine, LossSummary};
use crate::util::fs;
use crate::vocab::Manifest;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// The search lists' file in the analysis directory (docs/analysis.md, "Search lists").
pub const SEARCH_JSON: &str = "search.json";

/// Inputs of `wake2vec analyze`.
#[derive(Debug, Clone, Default)]
pub struct AnalyzeRequest {
    /// A model directory or a run directory.
    pub path: PathBuf,
    /// Drift reference: a model dir, a full-matrix safetensors or a Wake-rows snapshot.
    pub pre: Option<PathBuf>,
    /// Output directory (default `PATH/analysis`).
    pub out: Option<PathBuf>,
    /// Treat rows `N..` as the new rows instead of reading `wake2vec.json`.
    pub base_vocab: Option<usize>,
    pub morphemes: Option<PathBuf>,
    pub devices: Option<PathBuf>,
    pub options: Options,
    /// Wake tokens drawn in the trajectory figure.
    pub trajectory_tokens: usize,
    /// Skip the figures (summary only).
    pub no_figures: bool,
    /// Training logs to show instead of the run's own, one after the other (a pipeline's
    /// phases: each log's steps continue from the previous one's last).
    pub logs: Vec<PathBuf>,
    /// A `control.json` (forgetting on a control text) to include.
    pub control: Option<PathBuf>,
    /// Neighbour lists for the report's search box (`search.json`); `None`: none written.
    pub search: Option<analysis::search::SearchOptions>,
}

/// `summary.json` (schema: docs/analysis.md).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub format: u32,
    pub wake2vec_version: &'static str,
    pub source: Source,
    pub base_model: Option<String>,
    /// `"wake2vec.json"` or `"--base-vocab"`.
    pub layout_from: &'static str,
    #[serde(flatten)]
    pub geometry: Geometry,
    pub loss: Option<LossSummary>,
    pub trajectory: Option<trajectory::Trajectory>,
    /// Bits per byte and KL on the control text through the study (a pipeline's control.json).
    pub control: Option<ControlReport>,
    /// Files written beside summary.json.
    pub figures: Vec<String>,
}

/// Where [`analyze_path`] wrote its outputs.
pub struct AnalyzeOutput {
    pub dir: PathBuf,
    pub summary: Summary,
}

fn write_figure(
    dir: &Path,
    stem: &str,
    f: &figures::Figure,
    names: &mut Vec<String>,
) -> Result<()> {
    fs::write(&dir.join(format!("{stem}.svg")), f.svg.as_bytes())?;
    fs::write(&dir.join(format!("{stem}.png")), &f.png)?;
    names.push(format!("{stem}.svg"));
    names.push(format!("{stem}.png"));
    Ok(())
}

/// Runs `wake2vec analyze`.
pub fn analyze_path(req: &AnalyzeRequest) -> Result<AnalyzeOutput> {
    let source = load::resolve(&req.path)?;
    let (emb, layout, wake_json, applied) = load_matrix(&source, req.base_vocab)?;
    let tokenizer = load_tokenizer(&source.model_dir)?;
    let vocab = Vocabulary {
        layout: &layout,
        tokenizer: tokenizer.as_ref(),
    };
    let snapshots = match &source.run_dir {
        Some(r) => RunDir::new(r).list_snapshots()?,
        None => Vec::new(),
    };
    // A checkpoint that trained every row drifts from its run's model, base rows included.
    let trained_all = (applied == load::Applied::All).then_some(source.model_dir.as_path());
    let reference = drift_reference(req.pre.as_deref(), trained_all, snapshots.first(), &layout)?;
    let groups = load_groups(req)?;
    let mut result = analysis::analyze(
        &emb,
        &layout,
        &vocab,
        &req.options,
        reference.as_ref().map(|(n, r)| (n.as_str(), r)),
        &groups,
    )?;
    let (clock, cpu) = (std::time::Instant::now(), analysis::process_cpu_seconds());
    let search = match req.search {
        Some(o) if o.k > 0 => Some(analysis::search::build(&emb, &layout, &vocab, o)?),
        _ => None,
    };
    if search.is_some() {
        result.geometry.timings_s.push(analysis::Timing {
            stage: "search".into(),
            seconds: clock.elapsed().as_secs_f64(),
            cpu_seconds: analysis::process_cpu_seconds() - cpu,
        });
    }
    drop(emb);

    let out = match &req.out {
        Some(out) => {
            std::fs::create_dir_all(out)
                .with_context(|| format!("cannot create the output directory {}", out.display()))?;
            out.clone()
        }
        // Inside the analyzed directory: never written through a link.
        None => {
            let out = req.path.join("analysis");
            crate::util::fs::ensure_dir(&out)?;
            out
        }
    };
    let base_model = wake_json.and_then(|w| w.base_model);
    let label = figure_label(&source, base_model.as_deref());
    let (log, phases) = match training_log(req, source.run_dir.as_deref())? {
        Some((l, p)) => (Some(l), p),
        None => (None, Vec::new()),
    };
    let traj = trajectories(&snapshots, &vocab, req)?;
    let names = if req.no_figures {
        Vec::new()
    } else {
        let (figs, log) = (&result.figures, log.as_deref());
        write_figures(&out, &label, figs, log, &phases, traj.as_ref())?
    };
    let summary = Summary {
        format: 1,
        wake2vec_version: env!("CARGO_PKG_VERSION"),
        source,
        base_model,
        layout_from: if req.base_vocab.is_some() {
            "--base-vocab"
        } else {
            "wake2vec.json"
        },
        geometry: result.geometry,
        loss: log.as_deref().map(log::summarize_log),
        trajectory: traj.map(|t| t.0),
        control: req
            .control
            .as_deref()
            .map(ControlReport::load)
            .transpose()?,
        figures: names,
    };
    if summary.geometry.collapse.is_some() {
        let tsv = analysis::collapse::tsv(&result.figures.collapsed);
        fs::write(&out.join("collapse.tsv"), tsv.as_bytes())?;
    }
    let search_path = out.join(SEARCH_JSON);
    match &search {
        Some(s) => fs::write(&search_path, serde_json::to_string(s)?.as_bytes())?,
        // a search.json of an earlier analysis would not match this one
        None if search_path.is_file() => std::fs::remove_file(&search_path)
            .with_context(|| format!("cannot remove the stale {}", search_path.display()))?,
        None => {}
    }
    let json = serde_json::to_string_pretty(&summary)?;
    fs::write(&out.join("summary.json"), json.as_bytes())?;
    Ok(AnalyzeOutput { dir: out, summary })
}

/// The embedding matrix with the checkpoint's trained rows in place, its row layout
/// (`base_vocab` overrides `wake2vec.json`), `wake2vec.json` when it was read, and which rows
/// the checkpoint replaced.
pub(crate) fn load_matrix(
    source: &Source,
    base_vocab: Option<usize>,
) -> Result<(Embeddings, Layout, Option<Manifest>, load::Applied)> {
    let mut emb = load::load_embeddings(&source.model_dir)?;
    let (layout, wake_json) = load::load_layout(source, emb.rows, base_vocab)?;
    let mut applied = load::Applied::Nothing;
    if let Some(p) = &source.params {
        applied = load::apply_params(&mut emb, &layout, p)?;
        if applied == load::Applied::Nothing {
            eprintln!(
                "note: {} holds no trained embedding rows; the model's own Wake rows are analyzed",
                p.display()
            );
        }
    }
    Ok((emb, layout, wake_json, applied))
}

/// The model directory's `tokenizer.json`, when it has one (token ids are named `#ID` without).
pub(crate) fn load_tokenizer(model_dir: &Path) -> Result<Option<tokenizers::Tokenizer>> {
    let path = model_dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(None);
    }
    let t = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot load the tokenizer {}", path.display()))?;
    Ok(Some(t))
}

/// What drift is measured against, with its name: `--pre`, else the run's model when the
/// checkpoint trained every row (`trained_all`), else the run's first snapshot (when there are
/// Wake rows), else nothing.
fn drift_reference(
    pre: Option<&Path>,
    trained_all: Option<&Path>,
    first_snapshot: Option<&(u64, PathBuf)>,
    layout: &Layout,
) -> Result<Option<(String, DriftReference)>> {
    Ok(match (pre.or(trained_all), first_snapshot) {
        (Some(p), _) => Some((p.display().to_string(), load::load_reference(p)?)),
        (None, Some((step, p))) if layout.wake_count > 0 => Some((
            format!("snapshot step {step} ({})", p.display()),
            DriftReference::WakeOnly(load::load_snapshot(p)?),
        )),
        _ => None,
    })
}

/// The morpheme and device groups of `--morphemes` and `--devices`.
fn load_groups(req: &AnalyzeRequest) -> Result<morph::Groups> {
    Ok(morph::Groups {
        morphemes: req
            .morphemes
            .as_deref()
            .map(morph::load_morphemes)
            .transpose()?,
        devices: req
            .devices
            .as_deref()
            .map(morph::load_devices)
            .transpose()?,
    })
}

/// The model's name in figure titles: the base model (a path named by its directory), else
/// the model directory's name; followed by the checkpoint when there is one.
fn figure_label(source: &Source, base_model: Option<&str>) -> String {
    let name = match base_model {
        Some(m) => Path::new(m)
            .file_name()
            .map_or(m.to_string(), |n| n.to_string_lossy().into_owned()),
        None => source
            .model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    match &source.checkpoint {
        Some(c) => format!("{name} {c}"),
        None => name,
    }
}

/// The training log: the `logs` chained (with where each starts), else the run's `log.jsonl`
/// when it exists.
fn training_log(
    req: &AnalyzeRequest,
    run_dir: Option<&Path>,
) -> Result<Option<(Vec<LogLine>, log::PhaseStarts)>> {
    let log_path = run_dir.map(|r| RunDir::new(r).log());
    Ok(match &log_path {
        _ if !req.logs.is_empty() => Some(log::chain_logs(&req.logs)?),
        Some(p) if p.is_file() => Some((log::load_log(p)?, Vec::new())),
        _ => None,
    })
}

/// Trajectories of sampled Wake tokens, when the run has two snapshots or more and there are
/// at least three Wake rows.
fn trajectories(
    snapshots: &[(u64, PathBuf)],
    vocab: &Vocabulary,
    req: &AnalyzeRequest,
) -> Result<Option<(trajectory::Trajectory, trajectory::TrajectoryPlot)>> {
    if snapshots.len() < 2 || vocab.layout.wake_count < 3 {
        return Ok(None);
    }
    let frames = snapshots
        .iter()
        .map(|(s, p)| Ok((*s, load::load_snapshot(p)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(trajectory::trajectory(
        &frames,
        vocab.layout.wake_start,
        vocab,
        req.trajectory_tokens,
        req.options.seed,
    )?))
}

/// Writes the embedding figure, the loss figure (when the log has lines; chained logs with
/// their phases marked) and the trajectory
/// figure (when there is one); returns the names of the files written.
fn write_figures(
    out: &Path,
    label: &str,
    data: &analysis::FigureData,
    log: Option<&[LogLine]>,
    phases: &[(u64, String)],
    traj: Option<&(trajectory::Trajectory, trajectory::TrajectoryPlot)>,
) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let f = figures::embedding_figure(data, &format!("Wake2Vec {label} — Embedding Analysis"))?;
    write_figure(out, "embedding_analysis", &f, &mut names)?;
    if let Some(log) = log.filter(|l| !l.is_empty()) {
        let f = figures::loss_figure(log, phases, &format!("Wake2Vec {label} — Training"))?;
        write_figure(out, "loss", &f, &mut names)?;
    }
    if let Some((t, plot)) = traj {
        let f = figures::trajectory_figure(
            plot,
            &t.mean_displacement_by_step,
            &format!("Wake2Vec {label} — Wake-token trajectories"),
        )?;
        write_figure(out, "trajectory", &f, &mut names)?;
    }
    Ok(names)
}

/// A short text summary for the terminal.
pub fn print_summary(s: &Summary) -> String {
    let g = &s.geometry;
    [
        format!(
            "matrix {} × {}: base rows {}, Wake rows {} (from {})\n",
            g.shape[0], g.shape[1], g.base_vocab, g.wake_count, s.layout_from
        ),
        norm_lines(&g.norms),
        isotropy_lines(&g.isotropy),
        isoscore_line(&g.isoscore),
        pca_line(&g.pca),
        crowding_lines(g.collapse.as_ref(), g.hubness.as_ref()),
        pairwise_line(g.pairwise_cosine.as_ref()),
        drift_lines(g.drift.as_ref()),
        neighbour_lines(&g.neighbours),
        loss_line(s.loss.as_ref()),
    ]
    .concat()
}

fn norm_lines(n: &Norms) -> String {
    let mut o = format!(
        "norms: base {:.4} ± {:.4}{}\n",
        n.base.mean,
        n.base.sd_population,
        n.wake
            .as_ref()
            .map(|w| format!(", Wake {:.4} ± {:.4}", w.mean, w.sd_population))
            .unwrap_or_default()
    );
    if let Some(t) = &n.tests {
        let _ = writeln!(
            o,
            "Wake vs base: Welch t = {:.2} (p = {:.3e}), Mann-Whitney U = {:.4e} (p = {:.3e}), \
             Cohen's d = {:.3} unweighted / {:.3} pooled",
            t.welch.t,
            t.welch.p,
            t.mann_whitney.u,
            t.mann_whitney.p,
            t.cohens_d.unweighted,
            t.cohens_d.pooled
        );
    }
    o
}

fn isotropy_lines(iso: &IsotropyGroups) -> String {
    let mut o = String::new();
    for (name, i) in [
        ("all", Some(&iso.all)),
        ("base", Some(&iso.base)),
        ("Wake", iso.wake.as_ref()),
    ] {
        if let Some(i) = i {
            let _ = writeln!(
                o,
                "isotropy {name:>4}: Mu 2018 {:.4}, original partition ratio {:.4}, mean cos {:.4} (n {})",
                i.mu2018, i.partition_ratio, i.mean_cos, i.n
            );
        }
    }
    o
}

fn isoscore_line(s: &IsoScores) -> String {
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    format!(
        "IsoScore: all {}, base {}, Wake {}\n",
        f(s.all),
        f(s.base),
        f(s.wake)
    )
}

fn crowding_lines(c: Option<&Collapse>, h: Option<&Hubness>) -> String {
    let mut o = String::new();
    if let Some(c) = c {
        let _ = writeln!(
            o,
            "collapse: {} of {} Wake rows ({:.1}%) have a byte token ({} in the base) as nearest base row at cos > {}; {} at any cosine",
            c.collapsed,
            c.wake_rows,
            100.0 * c.share,
            c.byte_tokens,
            c.threshold,
            c.nearest_is_byte
        );
    }
    if let Some(h) = h {
        let _ = writeln!(
            o,
            "hubness (k = {}): k-occurrence skewness {:.3}, max {} (mean {:.2}), {:.1}% of base rows never a neighbour",
            h.k,
            h.skewness,
            h.max,
            h.mean,
            100.0 * h.never_share
        );
    }
    o
}

fn pca_line(p: &PcaGroups) -> String {
    format!(
        "PCA base: 90% at {}, 95% at {}, top-1 {:.4}{}\n",
        p.base.k90,
        p.base.k95,
        p.base.top1_share,
        p.wake
            .as_ref()
            .map(|w| format!(
                "; Wake: 90% at {}, 95% at {}, top-1 {:.4}",
                w.k90, w.k95, w.top1_share
            ))
            .unwrap_or_default()
    )
}

fn pairwise_line(p: Option<&Pairwise>) -> String {
    p.map(|p| {
        format!(
            "pairwise cosine: base–base {:.4}, Wake–Wake {:.4}, base–Wake {:.4}; KS D = {:.4} (p = {:.3e})\n",
            p.base_base.mean,
            p.wake_wake.mean,
            p.base_wake.mean,
            p.ks_base_base_vs_wake_wake.d,
            p.ks_base_base_vs_wake_wake.p
        )
    })
    .unwrap_or_default()
}

fn drift_lines(d: Option<&Drift>) -> String {
    let mut o = String::new();
    let Some(d) = d else {
        return o;
    };
    if let Some(w) = &d.wake {
        let _ = writeln!(
            o,
            "drift (Wake rows) vs {}: cos {:.5} ± {:.5}, L2 {:.4}",
            d.reference, w.cos.mean, w.cos.sd_population, w.l2.mean
        );
    }
    if let Some(b) = &d.base {
        let _ = writeln!(
            o,
            "drift (base rows): cos {:.6} ± {:.6}, L2 {:.5}",
            b.cos.mean, b.cos.sd_population, b.l2.mean
        );
    }
    o
}

/// The neighbours of the first six queries.
fn neighbour_lines(queries: &[NeighbourQuery]) -> String {
    let mut o = String::new();
    for q in queries.iter().take(6) {
        let nb: Vec<String> = q
            .neighbours
            .iter()
            .map(|n| format!("{:?} {:.3}", n.word, n.cos))
            .collect();
        let _ = writeln!(o, "  {:?} → {}", q.word, nb.join(", "));
    }
    o
}

fn loss_line(l: Option<&LossSummary>) -> String {
    let Some(l) = l else {
        return String::new();
    };
    let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.4}"));
    format!(
        "loss: final train {}, final val {}, best val {} (val bits/byte {})\n",
        f(l.final_train),
        f(l.final_val),
        f(l.best_val),
        f(l.final_val_bpb)
    )
}
