//! The verbs of measurement: analyze, report.

use crate::args::{AnalyzeArgs, ReportArgs};
use anyhow::Result;
use wake2vec::infer::battery;
use wake2vec::report;

/// `wake2vec analyze`: summary.json and the figures, and the summary printed.
pub fn analyze(args: AnalyzeArgs) -> Result<()> {
    let out = report::analyze_path(&args.request())?;
    print!("{}", report::print_summary(&out.summary));
    println!("wrote {}", out.dir.join("summary.json").display());
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
    let samples_path = samples.or_else(|| {
        let p = analyze.path.join("samples.jsonl");
        p.is_file().then_some(p)
    });
    let samples = match &samples_path {
        Some(p) => battery::read(p)?,
        None => Vec::new(),
    };
    let run_toml = std::fs::read_to_string(analyze.path.join("run.toml")).ok();
    let page = report::html::build(&out.summary, &out.dir, run_toml.as_deref(), &samples)?;
    let dest = html.unwrap_or_else(|| analyze.path.join("report.html"));
    wake2vec::util::fs::write(&dest, page.as_bytes())?;
    println!(
        "wrote {} ({} KiB, {} samples)",
        dest.display(),
        page.len() / 1024,
        samples.len()
    );
    Ok(())
}
