//! The one error every subcommand ends with, and the exit code it maps to (0 ok, 1 runtime
//! failure, 2 bad usage or bad configuration).

/// Why the agent stopped: the exit code tells usage/configuration (2) from runtime (1).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0:#}")]
    Config(anyhow::Error),
    #[error("{0:#}")]
    Runtime(anyhow::Error),
}

impl AgentError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 2,
            Self::Runtime(_) => 1,
        }
    }
}
