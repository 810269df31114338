//! `report.html`: one self-contained page (figures inlined as SVG, no external resources) with
//! the configuration, loss curves, analysis figures and tables, neighbour tables, the neighbour
//! search box (the analysis's `search.json` inlined as a JSON script element, with a small
//! inline script) and the generated samples with their metrics.

use super::Summary;
use crate::analysis::{
    collapse::{Collapse, Hubness},
    drift::Drift,
    isoscore::IsoScores,
    isotropy::IsotropyGroups,
    morph::{DeviceReport, MorphemeReport},
    neighbours::NeighbourQuery,
    norms::Norms,
    pairwise::Pairwise,
    pca::PcaGroups,
    trajectory::Trajectory,
};
use crate::infer::battery;
use crate::infer::control::ControlReport;
use crate::infer::text_metrics::BatterySample;
use crate::run::log::LossSummary;
use anyhow::Result;
use std::fmt::Write;
use std::path::Path;

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// An SVG file's markup ready to inline (any XML prolog removed).
fn inline_svg(path: &Path) -> Result<Option<String>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = crate::util::fs::read_to_string(path)?;
    let start = text.find("<svg").unwrap_or(0);
    Ok(Some(text[start..].to_string()))
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// A p-value; an exact 0 is an underflow of f64, shown as such.
fn pval(v: f64) -> String {
    if v == 0.0 {
        "< 1e-300".into()
    } else {
        num(v)
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), num)
}

const STYLE: &str = r#"
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; margin: 0 auto; max-width: 1500px; padding: 1.5em 2em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.7em; margin-bottom: .2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #d0d0d0; padding: .3em .7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
blockquote { margin: .6em 0; padding: .6em 1em; background: #fafafa; border-left: 4px solid #009688; white-space: pre-wrap; }
.muted { color: #666; } .sample { margin-bottom: 1.6em; }
"#;

/// Builds the page for a run (or model) directory from its `analysis/summary.json`, the
/// figures beside it, `run.toml`, and `samples.jsonl`.
pub fn build(
    summary: &Summary,
    analysis_dir: &Path,
    run_toml: Option<&str>,
    samples: &[BatterySample],
) -> Result<String> {
    let g = &summary.geometry;
    let sections = [
        head(summary)?,
        configuration(summary, run_toml)?,
        training(summary.loss.as_ref(), analysis_dir)?,
        control(summary.control.as_ref())?,
        geometry_figure(analysis_dir)?,
        norms(&g.norms)?,
        isotropy(&g.isotropy, &g.isoscore)?,
        pca(&g.pca)?,
        crowding(g.collapse.as_ref(), g.hubness.as_ref())?,
        pairwise(g.pairwise_cosine.as_ref())?,
        drift(g.drift.as_ref())?,
        neighbours(&g.neighbours)?,
        search_box(analysis_dir)?,
        trajectories(summary.trajectory.as_ref(), analysis_dir)?,
        morphemes(g.morphemes.as_ref())?,
        devices(g.devices.as_ref())?,
        samples_section(samples)?,
        "</body></html>\n".to_string(),
    ];
    Ok(sections.concat())
}

/// Right-aligned table cells, one per value.
fn num_cells<const N: usize>(values: [String; N]) -> String {
    values
        .iter()
        .map(|v| format!("<td class=\"n\">{v}</td>"))
        .collect()
}

/// A figure with its caption, when the SVG file exists.
fn figure(path: &Path, caption: &str) -> Result<String> {
    Ok(match inline_svg(path)? {
        Some(svg) => format!("<figure>{svg}<figcaption>{caption}</figcaption></figure>\n"),
        None => String::new(),
    })
}

/// The document head, the title (the run or the analyzed model, named by its directory) and
/// the source line.
fn head(summary: &Summary) -> Result<String> {
    let source = &summary.source;
    let model_name = source
        .run_dir
        .as_deref()
        .unwrap_or(&source.model_dir)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| source.input.display().to_string());
    let title = escape(&format!("Wake2Vec report — {model_name}"));
    let mut h = String::new();
    write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n"
    )?;
    writeln!(
        h,
        "<p class=\"muted\">Source <code>{}</code>{} · model <code>{}</code> · wake2vec {}</p>",
        escape(&source.input.display().to_string()),
        source
            .checkpoint
            .as_ref()
            .map(|c| format!(" ({})", escape(c)))
            .unwrap_or_default(),
        escape(&source.model_dir.display().to_string()),
        summary.wake2vec_version
    )?;
    Ok(h)
}

/// The matrix, its row layout and seed, and `run.toml` folded.
fn configuration(summary: &Summary, run_toml: Option<&str>) -> Result<String> {
    let g = &summary.geometry;
    let mut h = String::from("<h2>Configuration</h2>\n<table>");
    for (k, v) in [
        ("matrix", format!("{} × {}", g.shape[0], g.shape[1])),
        ("base rows", g.base_vocab.to_string()),
        (
            "Wake rows",
            format!(
                "{} (rows {}–{}, from {})",
                g.wake_count,
                g.wake_start,
                g.wake_start + g.wake_count,
                summary.layout_from
            ),
        ),
        ("seed", g.seed.to_string()),
    ] {
        writeln!(h, "<tr><th>{k}</th><td>{}</td></tr>", escape(&v))?;
    }
    h.push_str("</table>\n");
    if let Some(t) = run_toml {
        writeln!(
            h,
            "<details><summary>run.toml</summary><pre>{}</pre></details>",
            escape(t)
        )?;
    }
    Ok(h)
}

/// The loss figure and the loss numbers, when there is a training log.
fn training(loss: Option<&LossSummary>, dir: &Path) -> Result<String> {
    let Some(l) = loss else {
        return Ok(String::new());
    };
    let mut h = String::from("<h2>Training</h2>\n");
    h += &figure(
        &dir.join("loss.svg"),
        "Training loss per optimizer step and validation loss \
         (nats/token); validation bits per byte compare across tokenizers.",
    )?;
    h.push_str("<table><tr><th>final train</th><th>loss at init</th><th>final val</th><th>best val</th><th>best val step</th><th>final val bits/byte</th><th>best val bits/byte</th></tr><tr>");
    h += &num_cells([
        opt(l.final_train),
        opt(l.init_val),
        opt(l.final_val),
        opt(l.best_val),
        l.best_val_step.map_or("–".into(), |s| s.to_string()),
        opt(l.final_val_bpb),
        opt(l.best_val_bpb),
    ]);
    h.push_str("</tr></table>\n");
    Ok(h)
}

/// The geometry heading and the six-panel figure.
fn geometry_figure(dir: &Path) -> Result<String> {
    Ok("<h2>Embedding geometry</h2>\n".to_string()
        + &figure(
            &dir.join("embedding_analysis.svg"),
            "Row norms; pairwise cosines of 2,000 sampled rows per group; \
             cumulative PCA on the full spectrum; drift against the reference; norm by token id; \
             top-20 component shares.",
        )?)
}

/// Row norms by group, and the tests of Wake norms against base norms.
fn norms(n: &Norms) -> Result<String> {
    let mut h = String::from("<h3>Norms</h3><table><tr><th>rows</th><th>n</th><th>mean</th><th>sd (pop.)</th><th>min</th><th>max</th></tr>");
    for (name, d) in [
        ("all", Some(&n.all)),
        ("base", Some(&n.base)),
        ("Wake", n.wake.as_ref()),
    ] {
        if let Some(d) = d {
            writeln!(
                h,
                "<tr><td>{name}</td>{}</tr>",
                num_cells([
                    d.n.to_string(),
                    num(d.mean),
                    num(d.sd_population),
                    num(d.min),
                    num(d.max)
                ])
            )?;
        }
    }
    h.push_str("</table>\n");
    if let Some(t) = &n.tests {
        writeln!(
            h,
            "<table><tr><th colspan=\"2\">Wake norms against base norms (positive: Wake larger)</th></tr>\
             <tr><td>Welch's t (two-sided)</td><td class=\"n\">t = {}, df = {}, p = {}</td></tr>\
             <tr><td>Mann-Whitney U ({})</td><td class=\"n\">U = {}, p = {}</td></tr>\
             <tr><td>Cohen's d, unweighted variances (the original's)</td><td class=\"n\">{}</td></tr>\
             <tr><td>Cohen's d, pooled SD</td><td class=\"n\">{}</td></tr>\
             <tr><td>Wake coefficient of variation</td><td class=\"n\">{}</td></tr></table>",
            num(t.welch.t),
            num(t.welch.df),
            pval(t.welch.p),
            t.mann_whitney.method,
            num(t.mann_whitney.u),
            pval(t.mann_whitney.p),
            num(t.cohens_d.unweighted),
            num(t.cohens_d.pooled),
            num(t.wake_cv)
        )?;
    }
    Ok(h)
}

/// Isotropy of each group under both definitions.
fn isotropy(iso: &IsotropyGroups, scores: &IsoScores) -> Result<String> {
    let mut h = String::from("<h3>Isotropy</h3><table><tr><th>rows</th><th>n</th><th>Mu et al. 2018 (±c)</th><th>original partition ratio</th><th>mean cosine</th><th>mean cosine, centred</th><th>IsoScore (every row of the group)</th></tr>");
    for (name, i, score) in [
        ("all", Some(&iso.all), scores.all),
        ("base", Some(&iso.base), scores.base),
        ("Wake", iso.wake.as_ref(), scores.wake),
    ] {
        if let Some(i) = i {
            writeln!(
                h,
                "<tr><td>{name}</td>{}</tr>",
                num_cells([
                    i.n.to_string(),
                    num(i.mu2018),
                    num(i.partition_ratio),
                    num(i.mean_cos),
                    num(i.mean_cos_centred),
                    score.map_or("–".into(), num)
                ])
            )?;
        }
    }
    h.push_str("</table>\n");
    Ok(h)
}

/// Forgetting: bits per byte and KL from the base on the control text, model by model.
fn control(c: Option<&ControlReport>) -> Result<String> {
    let Some(c) = c else {
        return Ok(String::new());
    };
    let mut h = format!(
        "<h2>Control text</h2><p class=\"muted\"><code>{}</code>: {} segments of about 1,000 \
         bytes. Bits per byte under each model's own tokenizer; KL from the base model's \
         next-token distribution on the base tokenization, over the base vocabulary \
         (renormalized), and the probability mass moved onto the new rows.</p>\n\
         <table><tr><th>model</th><th>bits/byte</th><th>Δ vs base</th><th>KL (nats/token)</th>\
         <th>moved mass</th></tr>",
        escape(&c.file),
        c.segments
    );
    let base = c.rows.first().map(|r| r.bpb.bits_per_byte);
    for r in &c.rows {
        let delta = base.map_or("–".into(), |b| format!("{:+.4}", r.bpb.bits_per_byte - b));
        let (kl, moved) = r.kl.as_ref().map_or(("–".into(), "–".into()), |k| {
            (
                format!("{:.2e}", k.kl_base_vocab),
                format!("{:.4}", k.moved_mass),
            )
        });
        writeln!(
            h,
            "<tr><td>{} <span class=\"muted\">{}</span></td>{}</tr>",
            escape(&r.stage),
            escape(&r.model),
            num_cells([format!("{:.4}", r.bpb.bits_per_byte), delta, kl, moved])
        )?;
    }
    h.push_str("</table>\n");
    Ok(h)
}

/// Wake rows collapsed onto byte tokens, and the hubs among their neighbours.
fn crowding(c: Option<&Collapse>, hub: Option<&Hubness>) -> Result<String> {
    let mut h = String::new();
    if let Some(c) = c {
        writeln!(
            h,
            "<h3>Collapse onto byte tokens</h3><p>{} of {} Wake rows ({:.1}%) have a byte token \
             (one of {} in the base vocabulary) as their nearest base row at cosine &gt; {}; \
             {} have one as nearest at any cosine. Every collapsed row is listed in \
             <code>collapse.tsv</code>.</p>",
            c.collapsed,
            c.wake_rows,
            100.0 * c.share,
            c.byte_tokens,
            c.threshold,
            c.nearest_is_byte
        )?;
        if !c.top.is_empty() {
            h.push_str("<table><tr><th>Wake word</th><th>byte token</th><th>cosine</th></tr>");
            for r in &c.top {
                writeln!(
                    h,
                    "<tr><td>{}</td><td><code>{}</code></td>{}</tr>",
                    escape(&r.word),
                    escape(&r.byte_piece),
                    num_cells([num(r.cos)])
                )?;
            }
            h.push_str("</table>\n");
        }
    }
    if let Some(hb) = hub {
        writeln!(
            h,
            "<h3>Hubness</h3><p>k-occurrence of the base rows among the {} nearest base rows \
             of every Wake row: skewness {}, mean {}, largest {}; {:.1}% of base rows are \
             nobody's neighbour.</p>",
            hb.k,
            num(hb.skewness),
            num(hb.mean),
            hb.max,
            100.0 * hb.never_share
        )?;
        h.push_str("<table><tr><th>base token</th><th>id</th><th>k-occurrence</th></tr>");
        for t in hb.top.iter().take(10) {
            writeln!(
                h,
                "<tr><td><code>{}</code></td>{}</tr>",
                escape(&t.word),
                num_cells([t.id.to_string(), t.count.to_string()])
            )?;
        }
        h.push_str("</table>\n");
    }
    Ok(h)
}

/// Components needed for 90% and 95% of the variance, by group.
fn pca(p: &PcaGroups) -> Result<String> {
    let mut h = String::from("<h3>PCA (full spectrum)</h3><table><tr><th>rows</th><th>n</th><th>components for 90%</th><th>for 95%</th><th>top-1 share</th></tr>");
    for (name, p) in [("base", Some(&p.base)), ("Wake", p.wake.as_ref())] {
        if let Some(p) = p {
            writeln!(
                h,
                "<tr><td>{name}</td>{}</tr>",
                num_cells([
                    p.n_rows.to_string(),
                    p.k90.to_string(),
                    p.k95.to_string(),
                    num(p.top1_share)
                ])
            )?;
        }
    }
    h.push_str("</table>\n");
    Ok(h)
}

/// Pairwise cosine statistics and the KS test, when there are Wake rows.
fn pairwise(p: Option<&Pairwise>) -> Result<String> {
    let Some(p) = p else {
        return Ok(String::new());
    };
    let mut h = String::from(
        "<h3>Pairwise cosines</h3><table><tr><th>pairs</th><th>n</th><th>mean</th><th>sd</th></tr>",
    );
    for (name, s) in [
        ("base–base", &p.base_base),
        ("Wake–Wake", &p.wake_wake),
        ("base–Wake", &p.base_wake),
    ] {
        write!(
            h,
            "<tr><td>{name}</td>{}</tr>",
            num_cells([s.n_pairs.to_string(), num(s.mean), num(s.sd_sample)])
        )?;
    }
    let ks = &p.ks_base_base_vs_wake_wake;
    writeln!(
        h,
        "</table><p>Kolmogorov-Smirnov, base–base against Wake–Wake ({}): D = {}, p = {}</p>",
        ks.method,
        num(ks.d),
        pval(ks.p)
    )?;
    Ok(h)
}

/// Drift against the reference by group, and the most moved Wake tokens.
fn drift(d: Option<&Drift>) -> Result<String> {
    let Some(d) = d else {
        return Ok(String::new());
    };
    let mut h = String::new();
    writeln!(
        h,
        "<h3>Drift</h3><p class=\"muted\">against {}</p><table><tr><th>rows</th><th>n</th><th>cosine mean</th><th>cosine sd</th><th>cosine min</th><th>L2 mean</th><th>L2 max</th></tr>",
        escape(&d.reference)
    )?;
    for (name, s) in [("base", d.base.as_ref()), ("Wake", d.wake.as_ref())] {
        if let Some(s) = s {
            writeln!(
                h,
                "<tr><td>{name}</td>{}</tr>",
                num_cells([
                    s.n.to_string(),
                    num(s.cos.mean),
                    num(s.cos.sd_population),
                    num(s.cos.min),
                    num(s.l2.mean),
                    num(s.l2.max)
                ])
            )?;
        }
    }
    h.push_str("</table>\n");
    if !d.most_moved_wake.is_empty() {
        h.push_str("<table><tr><th colspan=\"4\">Most moved Wake tokens</th></tr><tr><th>id</th><th>word</th><th>cosine</th><th>L2</th></tr>");
        for m in &d.most_moved_wake {
            writeln!(
                h,
                "<tr><td class=\"n\">{}</td><td>{}</td>{}</tr>",
                m.id,
                escape(m.word.trim()),
                num_cells([num(m.cos), num(m.l2)])
            )?;
        }
        h.push_str("</table>\n");
    }
    Ok(h)
}

/// The nearest base neighbours of each query token.
fn neighbours(queries: &[NeighbourQuery]) -> Result<String> {
    if queries.is_empty() {
        return Ok(String::new());
    }
    let mut h = String::from("<h2>Nearest base neighbours</h2>\n<table><tr><th>id</th><th>token</th><th>query</th><th>top 5 base tokens by cosine</th></tr>");
    for q in queries {
        let nb: Vec<String> = q
            .neighbours
            .iter()
            .map(|n| {
                format!(
                    "{} <span class=\"muted\">{:.3}</span>",
                    escape(n.word.trim()),
                    n.cos
                )
            })
            .collect();
        writeln!(
            h,
            "<tr><td class=\"n\">{}</td><td><b>{}</b></td><td>{}</td><td>{}</td></tr>",
            q.id,
            escape(q.word.trim()),
            q.source,
            nb.join(" · ")
        )?;
    }
    h.push_str("</table>\n");
    Ok(h)
}

/// The trajectory figure and the most mobile tokens, when the run has snapshots.
fn trajectories(t: Option<&Trajectory>, dir: &Path) -> Result<String> {
    let Some(t) = t else {
        return Ok(String::new());
    };
    let mut h = String::from("<h2>Trajectories</h2>\n");
    h += &figure(
        &dir.join("trajectory.svg"),
        &format!(
            "{} sampled Wake tokens across {} snapshots, projected on \
             the first two principal components of the last snapshot ({:.1}% + {:.1}% of its \
             variance).",
            t.n_tokens,
            t.steps.len(),
            100.0 * t.pca_variance_explained[0],
            100.0 * t.pca_variance_explained[1]
        ),
    )?;
    let mobile: Vec<String> = t
        .most_mobile
        .iter()
        .map(|(w, d)| format!("{} ({:.3})", escape(w.trim()), d))
        .collect();
    writeln!(h, "<p>Most mobile: {}</p>", mobile.join(", "))?;
    Ok(h)
}

/// Morpheme direction consistency: the first 15 and the last 10 groups.
fn morphemes(m: Option<&MorphemeReport>) -> Result<String> {
    let Some(m) = m else {
        return Ok(String::new());
    };
    let mut h = String::new();
    writeln!(
        h,
        "<h2>Morpheme directions</h2><p>{} of {} groups used ({} pairs).</p>\
         <table><tr><th>morpheme</th><th>pairs</th><th>consistency</th><th>sd</th><th>magnitude</th></tr>",
        m.groups_used, m.groups_in_file, m.pairs_used
    )?;
    let n = m.groups.len();
    for (i, s) in m.groups.iter().enumerate() {
        if i < 15 || i + 10 >= n {
            writeln!(
                h,
                "<tr><td>{}</td>{}</tr>",
                escape(&s.morpheme),
                num_cells([
                    s.n_pairs.to_string(),
                    num(s.consistency_mean),
                    num(s.consistency_sd),
                    num(s.magnitude_mean)
                ])
            )?;
        } else if i == 15 {
            h.push_str("<tr><td colspan=\"5\" class=\"muted\">…</td></tr>");
        }
    }
    h.push_str("</table>\n");
    Ok(h)
}

/// Mean intra-group cosine of each device group.
fn devices(d: Option<&DeviceReport>) -> Result<String> {
    let Some(d) = d else {
        return Ok(String::new());
    };
    let mut h = String::from("<h2>Device cohesion</h2><table><tr><th>device</th><th>words</th><th>found</th><th>mean intra-group cosine</th></tr>");
    for s in &d.groups {
        writeln!(
            h,
            "<tr><td>{}</td>{}</tr>",
            escape(&s.device),
            num_cells([
                s.n_words.to_string(),
                s.n_found.to_string(),
                num(s.intra_mean_cos)
            ])
        )?;
    }
    h.push_str("</table>\n");
    Ok(h)
}

/// The search box's script: finds the typed word among the queries of the inlined
/// `search.json` (exactly, else trimmed and lower-cased; Wake rows first) and lists its
/// neighbours as table rows (word, group, cosine).
const SEARCH_JS: &str = r##"(function () {
  var d = JSON.parse(document.getElementById("w2v-search").textContent);
  var exact = new Map(), loose = new Map();
  d.queries.forEach(function (w, i) {
    var word = d.words[w], key = word.trim().toLowerCase();
    if (!exact.has(word)) exact.set(word, i);
    if (!loose.has(key)) loose.set(key, i);
  });
  var box = document.getElementById("w2v-q"), status = document.getElementById("w2v-status");
  var body = document.querySelector("#w2v-results tbody");
  var group = function (w) { return w < d.n_base ? "base" : "wake"; };
  function show() {
    var v = box.value;
    var i = exact.has(v) ? exact.get(v) : loose.get(v.trim().toLowerCase());
    body.textContent = "";
    if (v.trim() === "") { status.textContent = ""; return; }
    if (i === undefined) {
      var key = v.trim().toLowerCase(), near = [];
      for (var [k, j] of loose) {
        if (k.startsWith(key)) near.push(d.words[d.queries[j]].trim());
        if (near.length === 8) break;
      }
      status.textContent = "\u201c" + v + "\u201d is not among the " + d.queries.length +
        " words searched (every Wake word and a sample of base tokens)." +
        (near.length ? " Words starting so: " + near.join(", ") : "");
      return;
    }
    var q = d.queries[i];
    status.textContent = "Nearest " + d.neighbours[i].length + " rows of \u201c" + d.words[q] +
      "\u201d (" + group(q) + "), by cosine:";
    d.neighbours[i].forEach(function (w, j) {
      var tr = document.createElement("tr");
      [String(j + 1), d.words[w], group(w), (d.cos_milli[i][j] / 1000).toFixed(3)].forEach(
        function (t, c) {
          var td = document.createElement("td");
          td.textContent = t;
          if (c === 0 || c === 3) td.className = "n";
          tr.appendChild(td);
        });
      tr.setAttribute("data-word", d.words[w]);
      body.appendChild(tr);
    });
  }
  box.addEventListener("input", show);
  show();
})();"##;

/// The neighbour search box, when the analysis wrote `search.json`: its lists inlined as a JSON
/// script element (`<` written `\u003c`, so no text can close the element) and [`SEARCH_JS`].
fn search_box(analysis_dir: &Path) -> Result<String> {
    let path = analysis_dir.join(super::SEARCH_JSON);
    if !path.is_file() {
        return Ok(String::new());
    }
    let json = crate::util::fs::read_to_string(&path)?;
    let index: crate::analysis::search::SearchIndex = serde_json::from_str(&json).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a search list file ({e}): rerun `wake2vec analyze`",
            path.display()
        )
    })?;
    let mut h = String::new();
    writeln!(
        h,
        "<h2>Neighbour search</h2>\n<p class=\"muted\">Type a Wake word or a base token: its {} \
         nearest rows by cosine among the base and Wake rows. Searchable: every Wake word and {} \
         sampled base tokens ({} words).</p>\n<p><input id=\"w2v-q\" type=\"search\" size=\"40\" \
         placeholder=\"riverrun\" autocomplete=\"off\" aria-label=\"word\"></p>\n\
         <p id=\"w2v-status\" class=\"muted\"></p>\n<table id=\"w2v-results\"><thead><tr><th>#</th>\
         <th>word</th><th>group</th><th>cosine</th></tr></thead><tbody></tbody></table>",
        index.k,
        index.queries.iter().filter(|&&q| q < index.n_base).count(),
        index.queries.len()
    )?;
    writeln!(
        h,
        "<script type=\"application/json\" id=\"w2v-search\">{}</script>\n<script>{SEARCH_JS}</script>",
        json.trim().replace('<', "\\u003c")
    )?;
    Ok(h)
}

/// Every generated sample with its settings and text metrics.
fn samples_section(samples: &[BatterySample]) -> Result<String> {
    if samples.is_empty() {
        return Ok(String::new());
    }
    let mut h =
        String::from("<h2>Samples</h2>\n<p class=\"muted\">Raw output, no cherry-picking.</p>\n");
    for s in samples {
        let m = &s.metrics;
        writeln!(
            h,
            "<div class=\"sample\"><h3>{}</h3><p class=\"muted\">temperature {} · top-p {} · top-k {} · \
             repetition penalty {} · seed {} · {} tokens</p><blockquote><b>{}</b>{}</blockquote>\
             <table><tr><th>Wake-token share</th><th>coinage rate</th><th>fused-word rate</th><th>distinct-1</th><th>distinct-2</th><th>distinct-3</th><th>repetition rate</th></tr>\
             <tr>{}</tr></table></div>",
            escape(&s.label),
            s.temperature,
            s.top_p,
            s.top_k,
            s.repetition_penalty,
            s.seed,
            s.tokens,
            escape(&s.prompt),
            escape(&s.text),
            num_cells([
                opt(m.wake_token_share),
                num(m.coinage_rate),
                num(m.fused_rate),
                num(m.distinct_1),
                num(m.distinct_2),
                num(m.distinct_3),
                num(m.repetition_rate)
            ])
        )?;
    }
    Ok(h)
}

/// What [`write_page`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// Size of the page in bytes.
    pub bytes: usize,
    /// Samples shown.
    pub samples: usize,
}

/// Builds the page of `summary` (its figures in `analysis_dir`) and writes it to `dest`, with
/// the text of the settings file `settings` (run.toml, pipeline.toml) when it can be read and
/// the samples of `samples` (a samples.jsonl) when given.
pub fn write_page(
    summary: &Summary,
    analysis_dir: &Path,
    settings: &Path,
    samples: Option<&Path>,
    dest: &Path,
) -> Result<Page> {
    let samples = match samples {
        Some(p) => battery::read(p)?,
        None => Vec::new(),
    };
    let settings = crate::util::fs::read_to_string(settings).ok();
    let page = build(summary, analysis_dir, settings.as_deref(), &samples)?;
    crate::util::fs::write(dest, page.as_bytes())?;
    Ok(Page {
        bytes: page.len(),
        samples: samples.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup() {
        assert_eq!(
            escape(r#"<a href="x">Tom & 'Jerry'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
    }
}
