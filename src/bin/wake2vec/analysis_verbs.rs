//! The verbs of measurement: analyze, report, export-projector.

use crate::args::{AnalyzeArgs, ExportProjectorArgs, ReportArgs};
use anyhow::Result;
use wake2vec::infer::battery;
use wake2vec::report;

/// `wake2vec analyze`: summary.json and the figures, and the summary printed.
pub fn analyze(args: AnalyzeArgs) -> Result<()> {
    let out = report::analyze_path(&args.request())?;
    wake2vec::out!("{}", report::print_summary(&out.summary));
    wake2vec::outln!("wrote {}", out.dir.join("summary.json").display());
    search_line(&out.dir);
    Ok(())
}

/// Says where search.json went and how big it is, when analyze wrote one.
fn search_line(dir: &std::path::Path) {
    let path = dir.join(report::SEARCH_JSON);
    if let Ok(m) = std::fs::metadata(&path) {
        wake2vec::outln!("wrote {} ({} KiB)", path.display(), m.len() / 1024);
    }
}

/// `wake2vec export-projector`: the Embedding Projector files.
pub fn export_projector(args: ExportProjectorArgs) -> Result<()> {
    let out = report::projector::export(&report::projector::ProjectorRequest {
        path: args.path,
        out: args.out.clone(),
        tsv: args.tsv,
        base: args.base.0,
        corpus: args.corpus,
        morphemes: args.morphemes,
        seed: args.seed,
    })?;
    wake2vec::outln!(
        "wrote {}: {} rows × {} ({} Wake, {} base) in {}, metadata.tsv{}, projector_config.pbtxt, \
         projector_config.json",
        args.out.display(),
        out.rows,
        out.dim,
        out.wake_rows,
        out.base_rows,
        out.tensor_file,
        out.corpus
            .map(|c| format!(" (corpus_freq from {})", c.display()))
            .unwrap_or_default()
    );
    Ok(())
}

/// `wake2vec report`: the analysis, then report.html.
pub fn report(args: ReportArgs) -> Result<()> {
    let ReportArgs {
        analyze,
        samples,
        html,
    } = args;
    let out = report::analyze_path(&analyze.request())?;
    let samples = samples.or_else(|| battery::existing(&analyze.path));
    let dest = html.unwrap_or_else(|| analyze.path.join("report.html"));
    let page = report::html::write_page(
        &out.summary,
        &out.dir,
        &wake2vec::run::dir::RunDir::new(&analyze.path).config(),
        samples.as_deref(),
        &dest,
    )?;
    wake2vec::outln!(
        "wrote {} ({} KiB, {} samples)",
        dest.display(),
        page.bytes / 1024,
        page.samples
    );
    Ok(())
}
