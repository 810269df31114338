//! Everything a person reads: `summary.json`, the figures (PNG + SVG) and `report.html`.
//!
//! [`analyze_path`] is `wake2vec analyze`: it resolves a model or run directory, runs the
//! geometry suite, reads the training log and snapshots when there are some, and writes the
//! summary and figures into the output directory.

pub mod figures;
pub mod html;

use crate::analysis::{
    self,
    load::{self, Source},
    morph, trajectory, DriftReference, Geometry, Options, Vocabulary,
};
use crate::run::dir::RunDir;
use crate::run::log::{self, LossSummary};
use crate::util::fs;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

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
    let mut emb = load::load_embeddings(&source.model_dir)?;
    let (layout, wake_json) = load::load_layout(&source, emb.rows, req.base_vocab)?;
    if let Some(p) = &source.params {
        if !load::apply_params(&mut emb, &layout, p)? {
            eprintln!(
                "note: {} holds no wake_embed; the model's own Wake rows are analyzed",
                p.display()
            );
        }
    }
    let tok_path = source.model_dir.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() {
        Some(
            tokenizers::Tokenizer::from_file(&tok_path)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("cannot load the tokenizer {}", tok_path.display()))?,
        )
    } else {
        None
    };
    let vocab = Vocabulary {
        layout: &layout,
        tokenizer: tokenizer.as_ref(),
    };
    let snapshots = match &source.run_dir {
        Some(r) => RunDir::new(r).list_snapshots()?,
        None => Vec::new(),
    };
    // drift: --pre, else the run's first snapshot
    let reference: Option<(String, DriftReference)> = match (&req.pre, snapshots.first()) {
        (Some(p), _) => Some((p.display().to_string(), load::load_reference(p)?)),
        (None, Some((step, p))) if layout.wake_count > 0 => Some((
            format!("snapshot step {step} ({})", p.display()),
            DriftReference::WakeOnly(load::load_snapshot(p)?),
        )),
        _ => None,
    };
    let groups = morph::Groups {
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
    };
    let result = analysis::analyze(
        &emb,
        &layout,
        &vocab,
        &req.options,
        reference.as_ref().map(|(n, r)| (n.as_str(), r)),
        &groups,
    )?;
    drop(emb);

    let out = req.out.clone().unwrap_or_else(|| req.path.join("analysis"));
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create the output directory {}", out.display()))?;
    let name = wake_json
        .as_ref()
        .and_then(|w| w.base_model.clone())
        .map(|m| {
            // a path names the model by its directory
            Path::new(&m)
                .file_name()
                .map_or(m.clone(), |n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| {
            source
                .model_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    let label = match &source.checkpoint {
        Some(c) => format!("{name} {c}"),
        None => name.clone(),
    };
    let mut names = Vec::new();

    // loss curves
    let log_path = source.run_dir.as_ref().map(|r| r.join("log.jsonl"));
    let log = match &log_path {
        _ if !req.logs.is_empty() => Some(log::chain_logs(&req.logs)?),
        Some(p) if p.is_file() => Some(log::load_log(p)?),
        _ => None,
    };
    // trajectories
    let traj = if snapshots.len() >= 2 && layout.wake_count >= 3 {
        let frames = snapshots
            .iter()
            .map(|(s, p)| Ok((*s, load::load_snapshot(p)?)))
            .collect::<Result<Vec<_>>>()?;
        Some(trajectory::trajectory(
            &frames,
            layout.wake_start,
            &vocab,
            req.trajectory_tokens,
            req.options.seed,
        )?)
    } else {
        None
    };
    if !req.no_figures {
        let f = figures::embedding_figure(
            &result.figures,
            &format!("Wake2Vec {label} — Embedding Analysis"),
        )?;
        write_figure(&out, "embedding_analysis", &f, &mut names)?;
        if let Some(log) = log.as_ref().filter(|l| !l.is_empty()) {
            let f = figures::loss_figure(log, &format!("Wake2Vec {label} — Training"))?;
            write_figure(&out, "loss", &f, &mut names)?;
        }
        if let Some((t, plot)) = &traj {
            let f = figures::trajectory_figure(
                plot,
                &t.mean_displacement_by_step,
                &format!("Wake2Vec {label} — Wake-token trajectories"),
            )?;
            write_figure(&out, "trajectory", &f, &mut names)?;
        }
    }
    let summary = Summary {
        format: 1,
        wake2vec_version: env!("CARGO_PKG_VERSION"),
        source,
        base_model: wake_json.and_then(|w| w.base_model),
        layout_from: if req.base_vocab.is_some() {
            "--base-vocab"
        } else {
            "wake2vec.json"
        },
        geometry: result.geometry,
        loss: log.as_deref().map(log::summarize_log),
        trajectory: traj.map(|t| t.0),
        figures: names,
    };
    let json = serde_json::to_string_pretty(&summary)?;
    fs::write(&out.join("summary.json"), json.as_bytes())?;
    Ok(AnalyzeOutput { dir: out, summary })
}

/// A short text summary for the terminal.
pub fn print_summary(s: &Summary) -> String {
    let g = &s.geometry;
    let mut o = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        o,
        "matrix {} × {}: base rows {}, Wake rows {} (from {})",
        g.shape[0], g.shape[1], g.base_vocab, g.wake_count, s.layout_from
    );
    let n = &g.norms;
    let _ = writeln!(
        o,
        "norms: base {:.4} ± {:.4}{}",
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
    for (name, i) in [
        ("all", Some(&g.isotropy.all)),
        ("base", Some(&g.isotropy.base)),
        ("Wake", g.isotropy.wake.as_ref()),
    ] {
        if let Some(i) = i {
            let _ = writeln!(
                o,
                "isotropy {name:>4}: Mu 2018 {:.4}, original partition ratio {:.4}, mean cos {:.4} (n {})",
                i.mu2018, i.partition_ratio, i.mean_cos, i.n
            );
        }
    }
    let _ = writeln!(
        o,
        "PCA base: 90% at {}, 95% at {}, top-1 {:.4}{}",
        g.pca.base.k90,
        g.pca.base.k95,
        g.pca.base.top1_share,
        g.pca
            .wake
            .as_ref()
            .map(|p| format!(
                "; Wake: 90% at {}, 95% at {}, top-1 {:.4}",
                p.k90, p.k95, p.top1_share
            ))
            .unwrap_or_default()
    );
    if let Some(p) = &g.pairwise_cosine {
        let _ = writeln!(
            o,
            "pairwise cosine: base–base {:.4}, Wake–Wake {:.4}, base–Wake {:.4}; KS D = {:.4} (p = {:.3e})",
            p.base_base.mean,
            p.wake_wake.mean,
            p.base_wake.mean,
            p.ks_base_base_vs_wake_wake.d,
            p.ks_base_base_vs_wake_wake.p
        );
    }
    if let Some(d) = &g.drift {
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
    }
    for q in g.neighbours.iter().take(6) {
        let nb: Vec<String> = q
            .neighbours
            .iter()
            .map(|n| format!("{:?} {:.3}", n.word, n.cos))
            .collect();
        let _ = writeln!(o, "  {:?} → {}", q.word, nb.join(", "));
    }
    if let Some(l) = &s.loss {
        let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.4}"));
        let _ = writeln!(
            o,
            "loss: final train {}, final val {}, best val {} (val bits/byte {})",
            f(l.final_train),
            f(l.final_val),
            f(l.best_val),
            f(l.final_val_bpb)
        );
    }
    o
}
