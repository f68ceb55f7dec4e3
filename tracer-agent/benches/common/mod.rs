//! What the `BPF_PROG_TEST_RUN` benchmarks share: their options, a network namespace of their
//! own, timed runs of a loaded program, medians, and how they end.
use anyhow::{Context as _, bail};
use aya::programs::{TestRun, TestRunOptions};
use serde::Serialize;
use tracer_agent::datapath::Datapath;

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

/// Moves the whole process to a new network namespace, so that it never touches the root one.
/// Call it while the process has a single thread.
pub fn enter_fresh_netns(bench: &str) -> anyhow::Result<()> {
    // SAFETY: unshare takes no pointers.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!(
            "the {bench} benchmark needs root (CAP_SYS_ADMIN, CAP_BPF, CAP_NET_ADMIN): \
             cannot create a network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Runs `program` `repeat` times on `frame`; the kernel's mean ns per run.
pub fn run(
    datapath: &mut Datapath,
    program: &'static str,
    frame: &[u8],
    repeat: u32,
) -> anyhow::Result<f64> {
    let result = datapath
        .program(program)?
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN of {program}"))?;
    Ok(result.duration.as_nanos() as f64)
}

pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
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
