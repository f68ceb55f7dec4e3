//! `cargo xtask bench …`: benchmarks, each measured against a baseline in the same run.
use std::process::Command;

use crate::{build::workspace_root, run::require_success};

mod attach;
mod footprint;
mod veth;
pub use attach::attach;
pub use footprint::footprint;
pub use veth::veth;

/// The ns per packet the kernel classifier adds over an empty one (BPF_PROG_TEST_RUN, needs
/// root); `args` go to the benchmark (`--check` to fail on a missed goal, `--json PATH`).
pub fn datapath(args: &[String]) -> anyhow::Result<()> {
    eprintln!(
        "bench: cargo bench -p tracer-agent --bench datapath -- {} (release build, then about 10 s of measuring)",
        args.join(" ")
    );
    require_success(
        Command::new(env!("CARGO"))
            .args(["bench", "-p", "tracer-agent", "--bench", "datapath", "--"])
            .args(args)
            .current_dir(workspace_root()),
    )
}
