//! `tracer`: one binary, one subcommand per way of running; its exit codes are listed in
//! docs/metrics.md.
use anyhow::Context as _;
use clap::Parser;
use tracer_agent::{
    agent::{self, AgentError},
    cli::{Cli, Command},
    config, explain, prepare, top,
};

fn main() {
    unmap_large_blocks_when_freed();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let (argv, config) = match config::expand(std::env::args_os().collect()) {
        Ok(expanded) => expanded,
        Err(error) => {
            eprintln!("tracer: {error}");
            std::process::exit(2);
        }
    };
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            if error.use_stderr() {
                note_config(config.as_deref());
            }
            std::process::exit(error.exit_code());
        }
    };
    let result = match cli.command {
        Command::Agent(args) => block_on(agent::run(args)),
        Command::Explain(args) => explain::run(args),
        Command::Top(args) => block_on(top::run(args)),
        Command::Prepare(args) => prepare::run(args),
    };
    if let Err(error) = result {
        eprintln!("tracer: {error}");
        if error.exit_code() == 2 {
            note_config(config.as_deref());
        }
        std::process::exit(error.exit_code());
    }
}

/// Has glibc map every block of 1 MiB or more on its own and unmap it when freed. By default
/// its threshold rises to the size of the largest block freed so far (up to 32 MiB), after
/// which a poll's large transient copies (the flow table, the NAT facts of new connections)
/// come from the heap and, freed, stay resident: the agent's RSS would stay at its peak.
fn unmap_large_blocks_when_freed() {
    // SAFETY: mallopt only tunes the allocator; it runs before any other thread exists.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
}

/// Points at the configuration file, when there is one, after a usage or configuration error:
/// the flag the message names may have come from it.
fn note_config(config: Option<&std::path::Path>) {
    if let Some(path) = config {
        eprintln!(
            "note: the flags above include those set in --config {}",
            path.display()
        );
    }
}

fn block_on(
    work: impl std::future::Future<Output = Result<(), AgentError>>,
) -> Result<(), AgentError> {
    tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .map_err(AgentError::Runtime)?
        .block_on(work)
}
