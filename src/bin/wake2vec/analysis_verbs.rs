//! The verbs of measurement: analyze, report.

use crate::args::{AnalyzeArgs, ReportArgs};
use anyhow::Result;
use wake2vec::infer::battery;
use wake2vec::report;

/// `wake2vec analyze`: summary.json and the figures, and the summary printed.
pub fn analyze(args: AnalyzeArgs) -> Result<()> {
    let out = report::analyze_path(&args.request())?;
    wake2vec::out!("{}", report::print_summary(&out.summary));
    wake2vec::outln!("wrote {}", out.dir.join("summary.json").display());
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
