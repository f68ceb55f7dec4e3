//! What every benchmark shares: its options (`[--check | --guard] [--json PATH]`) and how it
//! ends.
use anyhow::{Context as _, bail};
use serde::Serialize;

pub(crate) struct Options {
    /// A missed goal is an error (exit status 1).
    pub check: bool,
    /// What the goals are multiplied by before they are compared: 1, or `GUARD_SLACK` with
    /// `--guard`.
    slack: f64,
    /// Where to write the results as JSON.
    pub json: Option<String>,
}

/// `--guard`: the goals loosened by a quarter. CI runs the benchmarks as regression guards on
/// shared machines: their noise must not fail a build, a second clock read per packet (+30 ns)
/// or a per-packet event must.
const GUARD_SLACK: f64 = 1.25;

impl Options {
    /// The figure a result is compared with: `goal`, loosened under `--guard`.
    pub(crate) fn goal(&self, goal: f64) -> f64 {
        goal * self.slack
    }
}

/// The benchmark's options: `[--check | --guard] [--json PATH]`.
pub(crate) fn options(bench: &str) -> anyhow::Result<Options> {
    let mut options = Options {
        check: false,
        slack: 1.0,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => options.check = true,
            "--guard" => {
                options.check = true;
                options.slack = GUARD_SLACK;
            }
            "--json" => options.json = Some(args.next().context("--json needs a path")?),
            // What `cargo bench` passes to every benchmark.
            "--bench" => {}
            other => bail!(
                "unknown argument {other:?}; usage: {bench} [--check | --guard] [--json PATH]"
            ),
        }
    }
    Ok(options)
}

/// Writes the report if asked, then fails if goals were missed and `--check` was given.
pub(crate) fn finish(
    options: &Options,
    report: &impl Serialize,
    missed: usize,
) -> anyhow::Result<()> {
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {path}"))?;
    }
    if options.check && missed > 0 {
        bail!("{missed} case(s) missed their goal");
    }
    Ok(())
}
