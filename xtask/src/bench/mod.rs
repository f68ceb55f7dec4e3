//! `cargo xtask bench …`: benchmarks, each measured against a baseline in the same run.
use std::process::Command;

use tracer_lab::{build::workspace_root, run::require_success};

mod attach;
mod footprint;
mod hostile;
mod veth;
pub use attach::attach;
pub use footprint::footprint;
pub use hostile::hostile;
pub use veth::veth;

/// The ns per packet the kernel classifier adds over an empty one (BPF_PROG_TEST_RUN, needs
/// root); `args` go to the benchmark (`--check` to fail on a missed goal, `--json PATH`).
pub fn datapath(args: &[String]) -> anyhow::Result<()> {
    cargo_bench("datapath", "about 10 s of measuring", args)
}

/// Render time and heap per series of `/metrics` at 1k, 10k and 100k series; `args` as for
/// `datapath`.
pub fn scrape(args: &[String]) -> anyhow::Result<()> {
    cargo_bench("scrape", "a few seconds of measuring", args)
}

/// The ns a new connection per packet adds while the flow table fills and once it evicts
/// (BPF_PROG_TEST_RUN, needs root); `args` as for `datapath`.
pub fn churn(args: &[String]) -> anyhow::Result<()> {
    cargo_bench("churn", "a few seconds of measuring", args)
}

/// `cargo bench -p tracer-agent --bench NAME -- ARGS`: one benchmark binary of the agent.
fn cargo_bench(name: &str, takes: &str, args: &[String]) -> anyhow::Result<()> {
    eprintln!(
        "bench: cargo bench -p tracer-agent --bench {name} -- {} (release build, then {takes})",
        args.join(" ")
    );
    require_success(
        Command::new(env!("CARGO"))
            .args(["bench", "-p", "tracer-agent", "--bench", name, "--"])
            .args(args)
            .current_dir(workspace_root()),
    )
}
