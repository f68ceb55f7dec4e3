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
    /// Install what a fresh Debian 12 machine needs (packages, rust-src, bpf-linker, the
    /// manifest tools); idempotent.
    Setup {
        /// Only what building the agent needs (LLVM 22, nightly rust-src, bpf-linker), as in
        /// the container image's builder stage.
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Build the `tracer` binary, kernel programs included; prints its path.
    Build {
        /// Optimised, as the container image ships it.
        #[arg(long)]
        release: bool,
    },
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
    /// Regenerate the kustomize manifests under deploy/kubernetes from the Helm chart.
    Manifests,
    /// The EKS-node lab: network namespaces, veths and iptables that reproduce every path.
    Lab(tracer_lab::lab::LabCommand),
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
    /// 256 pod veths attached at start-up with tcx, again after a kill over the pins, 200 pods
    /// churned at 10/s; then with clsact: start-up, 200 pods at 20/s, and the filter moved back
    /// in front of 200 foreign ones. Attach times against the RCU grace period.
    Attach {
        /// Exit non-zero when a goal is missed (tcx: start-up ≤ 1.3 × links × grace period,
        /// restart ≤ 2 s, hot-plug p99 ≤ 100 ms at 10/s; clsact: start-up ≤ 1 s, hot-plug p99
        /// ≤ 50 ms at 20/s, back in front p99 ≤ 10 ms).
        #[arg(long)]
        check: bool,
        /// Also write the results as JSON.
        #[arg(long, value_name = "PATH")]
        json: Option<std::path::PathBuf>,
    },
    /// Agent CPU and memory at 0/1k/10k/100k active flows, and its kernel maps' memory.
    Footprint {
        /// Exit non-zero when a goal is missed.
        #[arg(long)]
        check: bool,
        /// Also write the results as JSON.
        #[arg(long, value_name = "PATH")]
        json: Option<std::path::PathBuf>,
        /// Measure only these states (active flows: 0, 1000, 10000, 100000), e.g.
        /// `--flows 100000` or `--flows 10000,100000`; all of them by default.
        #[arg(long, value_name = "N,…", value_delimiter = ',')]
        flows: Vec<u32>,
        /// Run the agent as for restarts without loss (`--pin-path`, `--state-file`): the cost
        /// of saving every connection each poll.
        #[arg(long)]
        pinned: bool,
    },
    /// ns a new connection per packet adds as the flow table fills and evicts
    /// (BPF_PROG_TEST_RUN).
    Churn {
        /// Passed on to the benchmark (e.g. --check, --json PATH).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// 10,000 slow, then 10,000 garbage connections, then 10,000 requests from a lab pod: the
    /// agent's RSS, scrape latency and time to close hostile connections.
    Hostile {
        /// Exit non-zero when a goal is missed (RSS ≤ 64 MiB, scrapes within 1 s, hostile
        /// connections closed within 6 s).
        #[arg(long)]
        check: bool,
        /// Also write the results as JSON.
        #[arg(long, value_name = "PATH")]
        json: Option<std::path::PathBuf>,
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
        Command::Setup {
            toolchain_only: false,
        } => xtask::setup::setup(),
        Command::Setup {
            toolchain_only: true,
        } => xtask::setup::toolchain(),
        Command::Build { release } => {
            let tracer = if release {
                tracer_lab::build::agent_release()?
            } else {
                tracer_lab::build::agent()?
            };
            println!("{}", tracer.display());
            Ok(())
        }
        Command::Demo(args) => xtask::demo::demo(args),
        Command::Test => xtask::test::test(),
        Command::Bench {
            which: Bench::Datapath { args },
        } => xtask::bench::datapath(&args),
        Command::Bench {
            which: Bench::Scrape { args },
        } => xtask::bench::scrape(&args),
        Command::Bench {
            which: Bench::Attach { check, json },
        } => xtask::bench::attach(check, json.as_deref()),
        Command::Bench {
            which:
                Bench::Footprint {
                    check,
                    json,
                    flows,
                    pinned,
                },
        } => xtask::bench::footprint(check, json.as_deref(), &flows, pinned),
        Command::Bench {
            which: Bench::Churn { args },
        } => xtask::bench::churn(&args),
        Command::Bench {
            which: Bench::Hostile { check, json },
        } => xtask::bench::hostile(check, json.as_deref()),
        Command::Bench {
            which: Bench::Veth { check, json },
        } => xtask::bench::veth(check, json.as_deref()),
        Command::Manifests => tracer_lab::deploy::write_generated(),
        Command::Lab(cmd) => tracer_lab::lab::run(cmd, std::env::current_exe()?),
    }
}
