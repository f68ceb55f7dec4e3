//! Where readings come from: the local agent when one answers, else the same pipeline the agent
//! runs, loaded by `tracer top` itself.
use std::time::Duration;

use anyhow::anyhow;

use super::{
    Reading,
    client::{AgentClient, FetchError},
};
use crate::{
    cli::TopArgs,
    datapath::privileges::{self, Capability},
    error::AgentError,
    pipeline::Pipeline,
};

pub(super) enum Source {
    Agent(AgentClient),
    /// The datapath, attached and polled by this process; dropping it detaches everything.
    Standalone {
        pipeline: Box<Pipeline>,
        limit: usize,
    },
}

impl Source {
    /// The agent at `--agent` when it answers; otherwise the pipeline, started here. Returns
    /// the first reading too (standalone: the poll that attaches, with nothing counted yet).
    pub(super) async fn open(args: &TopArgs) -> Result<(Self, Reading), AgentError> {
        let client = AgentClient::new(args.agent.clone(), args.limit);
        let unreachable = match client.read().await {
            Ok(reading) => return Ok((Self::Agent(client), reading)),
            Err(error @ FetchError::Unreachable { .. }) => error,
            // Something answered, and not as an agent: no second datapath next to it.
            Err(error) => return Err(error.into()),
        };
        let missing = privileges::acquire()
            .map_err(AgentError::Runtime)?
            .missing();
        if !missing.is_empty() {
            return Err(AgentError::Runtime(lacking_privileges(
                &unreachable,
                &missing,
            )));
        }
        let standalone = |error: anyhow::Error| error.context(format!("{unreachable}; standalone"));
        let pipeline = Pipeline::start(&args.pipeline).map_err(|error| match error {
            AgentError::Config(error) => AgentError::Config(standalone(error)),
            AgentError::Runtime(error) => AgentError::Runtime(standalone(error)),
        })?;
        let mut source = Self::Standalone {
            pipeline: Box::new(pipeline),
            limit: args.limit as usize,
        };
        let first = source.read().await?;
        Ok((source, first))
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Self::Agent(client) => format!("agent at {}", client.url()),
            Self::Standalone { .. } => "standalone datapath (no agent answered)".to_owned(),
        }
    }

    pub(super) async fn read(&mut self) -> Result<Reading, FetchError> {
        match self {
            Self::Agent(client) => client.read().await,
            Self::Standalone { pipeline, limit } => {
                let snapshot = pipeline.poll();
                Ok(Reading {
                    paths: snapshot.paths.clone(),
                    flows: snapshot.flows(*limit),
                })
            }
        }
    }

    /// A reading that covers some traffic: an agent's at once; standalone, one `interval`
    /// after the first poll (which only attached).
    pub(super) async fn settled(
        &mut self,
        first: Reading,
        interval: Duration,
    ) -> Result<Reading, FetchError> {
        match self {
            Self::Agent(_) => Ok(first),
            Self::Standalone { .. } => {
                tokio::time::sleep(interval).await;
                self.read().await
            }
        }
    }
}

/// No agent, and not allowed to run the datapath here: what is needed, and the ways out.
fn lacking_privileges(unreachable: &FetchError, missing: &[Capability]) -> anyhow::Error {
    let names = |caps: &[Capability]| -> String {
        caps.iter()
            .map(|cap| cap.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    anyhow!(
        "{unreachable}; running the datapath here instead needs root or {} (this process lacks \
         {}): start `tracer agent`, point --agent at one, or run tracer top as root",
        names(&privileges::REQUIRED),
        names(missing)
    )
}
