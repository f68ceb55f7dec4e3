//! The logs, on stderr: one `tracing` subscriber for the agent's events, those of the crates
//! that already log through `tracing` (kube, tower, hyper) and, through the `log` bridge, those
//! of the crates that still use `log` (aya), so that all land in the same output and format.
//!
//! `RUST_LOG` says what is logged (`debug`, `info,kube=debug`, …); by default `info`, for every
//! crate.
use std::{io::IsTerminal as _, sync::OnceLock};

use tracing_subscriber::{
    EnvFilter, Layer as _, Registry, filter::LevelFilter, layer::SubscriberExt as _, reload,
    util::SubscriberInitExt as _,
};

use crate::cli::LogFormat;

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the logs: {0}")]
pub struct LoggingError(#[from] tracing_subscriber::util::TryInitError);

/// The filter in force, kept so that `silence` can replace it.
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Sends the logs to stderr in `format`, filtered by `RUST_LOG`. Once per process.
pub fn init(format: LogFormat) -> Result<(), LoggingError> {
    // A directive RUST_LOG gets wrong is skipped: a typo in it must not stop the agent.
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let (filter, handle) = reload::Layer::new(filter);
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colours_wanted())
            .boxed(),
        // One object per line, message and fields at the top level beside timestamp, level
        // and target: what cluster log shippers parse without configuration.
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()?;
    // Set only here, after the one successful initialisation.
    let _ = FILTER.set(handle);
    Ok(())
}

/// Holds every log record back while it lives: `tracer top` draws on the terminal, where a log
/// line would land in the middle of the screen.
pub struct Silence {
    /// The filter in force before, put back at the end.
    previous: Option<EnvFilter>,
}

/// Holds the logs back until the returned guard is dropped.
pub fn silence() -> Silence {
    let mut previous = None;
    if let Some(filter) = FILTER.get() {
        // Fails only once the subscriber is gone, when nothing is logged anyway.
        let _ = filter.modify(|filter| {
            previous = Some(std::mem::replace(filter, EnvFilter::new("off")));
        });
    }
    Silence { previous }
}

impl Drop for Silence {
    fn drop(&mut self) {
        if let (Some(filter), Some(previous)) = (FILTER.get(), self.previous.take()) {
            let _ = filter.reload(previous);
        }
    }
}

/// Colours on a terminal only, and not when NO_COLOR asks for none (https://no-color.org).
fn colours_wanted() -> bool {
    std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}
