//! What every benchmark shares: its options (`[--check] [--json PATH]`) and how it ends.
use anyhow::{Context as _, bail};
use serde::Serialize;

pub struct Options {
    /// A missed goal is an error (exit status 1).
    pub check: bool,
    /// Where to write the results as JSON.
    pub json: Option<String>,
}

/// The benchmark's options: `[--check] [--json PATH]`.
pub fn options(bench: &str) -> anyhow::Result<Options> {
    let mut options = Options {
        check: false,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => options.check = true,
            "--json" => options.json = Some(args.next().context("--json needs a path")?),
            // What `cargo bench` passes to every benchmark.
            "--bench" => {}
            other => bail!("unknown argument {other:?}; usage: {bench} [--check] [--json PATH]"),
        }
    }
    Ok(options)
}

/// Writes the report if asked, then fails if goals were missed and `--check` was given.
pub fn finish(options: &Options, report: &impl Serialize, missed: usize) -> anyhow::Result<()> {
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {path}"))?;
    }
    if options.check && missed > 0 {
        bail!("{missed} case(s) missed their goal");
    }
    Ok(())
}
