//! The verb that sets runs side by side: compare.

use crate::args::CompareArgs;
use anyhow::Result;
use wake2vec::compare::{self, Request};

/// `wake2vec compare`: compare.json, the figures and compare.html in a new directory, and one
/// line per entry saying what it lacks.
pub fn compare(args: CompareArgs) -> Result<()> {
    let c = compare::compare(&Request {
        inputs: args.inputs,
        labels: args.labels,
        out: args.out.clone(),
        analyze: args.analyze,
    })?;
    for e in &c.entries {
        let bpb = e.loss.as_ref().and_then(|l| l.final_val_bpb);
        wake2vec::outln!(
            "{}: final val bits/byte {}{}",
            e.label,
            bpb.map_or("–".into(), |v| format!("{v:.4}")),
            if e.missing.is_empty() {
                String::new()
            } else {
                format!("; missing {}", e.missing.join(", "))
            }
        );
    }
    wake2vec::outln!("wrote {}", args.out.join("compare.html").display());
    Ok(())
}
