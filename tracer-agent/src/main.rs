//! `tracer`: one binary, one subcommand per way of running; its exit codes are listed in
//! docs/metrics.md.
use anyhow::Context as _;
use clap::Parser as _;
use tracer_agent::{
    cli::config,
    cli::{Cli, Command, LogFormat},
    cmd::agent,
    cmd::explain,
    cmd::prepare,
    cmd::top,
    error::AgentError,
    logging,
};

fn main() {
    unmap_large_blocks_when_freed();
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
    let log_format = cli.log_format;
    if let Err(error) = logging::init(log_format) {
        eprintln!("tracer: {error}");
        std::process::exit(1);
    }
    let result = match cli.command {
        Command::Agent(args) => block_on(agent::run(args)),
        Command::Explain(args) => explain::run(args),
        Command::Top(args) => block_on(top::run(args)),
        Command::Prepare(args) => prepare::run(args),
    };
    if let Err(error) = result {
        report(&error, log_format, config.as_deref());
        std::process::exit(error.exit_code());
    }
}

/// Says why the run failed, naming the configuration file when the flag the message names may
/// come from it: in JSON, as the last log record, so that log shippers see it as an error.
fn report(error: &AgentError, format: LogFormat, config: Option<&std::path::Path>) {
    let config = config.filter(|_| error.exit_code() == 2);
    match format {
        LogFormat::Text => {
            eprintln!("tracer: {error}");
            note_config(config);
        }
        LogFormat::Json => tracing::error!(
            config = config.map(|path| tracing::field::display(path.display())),
            exit_code = error.exit_code(),
            "{error}"
        ),
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

fn block_on(work: impl Future<Output = Result<(), AgentError>>) -> Result<(), AgentError> {
    tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .map_err(AgentError::Runtime)?
        .block_on(work)
}
