//! What the `BPF_PROG_TEST_RUN` benchmarks share: a network namespace of their own, timed runs
//! of a loaded program, medians.
use anyhow::Context as _;
use aya::programs::{TestRun as _, TestRunOptions};
use tracer_agent::datapath::Datapath;
use tracer_common::test_support::netns::{self, Netns};

/// Runs the benchmark `bench` in a fresh network namespace, so that it never touches the root
/// one.
pub(crate) fn in_fresh_netns(
    bench: &str,
    work: impl FnOnce() -> anyhow::Result<()> + Send,
) -> anyhow::Result<()> {
    netns::run_in(Netns::Fresh, work).with_context(|| {
        format!("the {bench} benchmark needs root (CAP_SYS_ADMIN, CAP_BPF, CAP_NET_ADMIN)")
    })?
}

/// Runs `program` `repeat` times on `frame`; the kernel's mean ns per run.
pub(crate) fn run(
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

pub(crate) fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}
