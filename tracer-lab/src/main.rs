//! `tracer-lab lab …`: the same lab commands as `cargo xtask lab …`, for the lab tests. The lab
//! runs its servers and clients as a binary's hidden `lab serve` / `lab client` subcommands,
//! and a test can only name a binary of its own package (`CARGO_BIN_EXE_tracer-lab`).
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tracer-lab", about = "The EKS-node lab of the tracer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The EKS-node lab: network namespaces, veths and iptables that reproduce every path.
    Lab(tracer_lab::lab::LabCommand),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Lab(cmd) => tracer_lab::lab::run(cmd, std::env::current_exe()?),
    }
}
