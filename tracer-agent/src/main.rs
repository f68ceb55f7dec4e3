//! `tracer`: one binary, one subcommand per way of running (DESIGN §5).
use clap::Parser;
use tracer_agent::{
    agent,
    cli::{Cli, Command},
};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tracer: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Agent(args) => agent::run(args).await,
        }
    });
    if let Err(error) = result {
        eprintln!("tracer: {error}");
        std::process::exit(error.exit_code());
    }
}
