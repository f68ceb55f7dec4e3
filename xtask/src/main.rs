//! `cargo xtask …`: everything a developer or CI runs, from a fresh machine to the demo.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Set-up, build, lab, demo, tests and benchmarks of the tracer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what a fresh Debian 12 machine needs (packages, rust-src, bpf-linker); idempotent.
    Setup,
    /// The main job: set-up, build, the lab node with the live agent, traffic on every path,
    /// and what the agent saw.
    Demo(xtask::demo::DemoArgs),
    /// The whole suite: fmt, clippy, unit, kernel-program and lab tests (needs root).
    Test,
    /// Benchmarks, as ratios against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// The EKS-node lab: network namespaces, veths and iptables that reproduce every path.
    Lab(xtask::lab::LabCommand),
}

#[derive(Subcommand)]
enum Bench {
    /// ns/packet the classifier adds over an empty one (BPF_PROG_TEST_RUN).
    Datapath {
        /// Passed on to the benchmark (e.g. --check, --json PATH).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Render time and heap per series of /metrics at 1k, 10k and 100k series.
    Scrape {
        /// Passed on to the benchmark (e.g. --check, --json PATH).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// iperf3 between two lab pods, no program vs the agent attached (tcx), interleaved rounds.
    Veth {
        /// Exit non-zero when the UDP packet-rate loss exceeds the goal (10 %).
        #[arg(long)]
        check: bool,
        /// Also write the results as JSON.
        #[arg(long, value_name = "PATH")]
        json: Option<std::path::PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => xtask::setup::setup(),
        Command::Demo(args) => xtask::demo::demo(args),
        Command::Test => xtask::test::test(),
        Command::Bench {
            which: Bench::Datapath { args },
        } => xtask::bench::datapath(&args),
        Command::Bench {
            which: Bench::Scrape { args },
        } => xtask::bench::scrape(&args),
        Command::Bench {
            which: Bench::Veth { check, json },
        } => xtask::bench::veth(check, json.as_deref()),
        Command::Lab(cmd) => xtask::lab::run(cmd, std::env::current_exe()?),
    }
}
