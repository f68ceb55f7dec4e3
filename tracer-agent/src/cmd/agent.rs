//! `tracer agent`: run the pipeline and serve its snapshots — until SIGINT or SIGTERM, then
//! stop cleanly or hand the pinned datapath over ([`handover`](crate::cmd::handover)).
use std::{sync::Arc, time::Instant};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{info, warn};

use crate::{
    cli::AgentArgs,
    cmd::handover::{Asker, CleanStop, Stop},
    context::kubernetes,
    datapath::discovery::{self, ChangeWatch, Changes},
    error::AgentError,
    pipeline::Pipeline,
    pipeline::snapshot::Snapshot,
    serve,
    serve::export::Metrics,
};

pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    // The Kubernetes configuration is checked before the datapath loads: a mistake in it is
    // reported at once, whatever the privileges.
    let kubernetes = kubernetes::connection(
        &args.pipeline.kubernetes,
        args.pipeline.node_name.as_deref(),
    )
    .await
    .map_err(|error| AgentError::Config(error.into()))?;
    let handover = Asker::new(
        args.restart.pin_path.is_some(),
        kubernetes.as_ref().map(|connection| &connection.config),
        args.restart.pod(),
    );
    let mut pipeline = Pipeline::start_resumable(&args.pipeline, &args.restart)?;
    if let Some(connection) = kubernetes {
        let facts = kubernetes::start(connection)
            .context("connecting to the Kubernetes API")
            .map_err(AgentError::Runtime)?;
        pipeline.follow_cluster(facts);
    }
    let listener = serve::listener::bind(args.metrics_addr)
        .with_context(|| format!("cannot listen on --metrics-addr {}", args.metrics_addr))
        .map_err(AgentError::Config)?;
    let (snapshots, latest) = watch::channel(pipeline.snapshot());
    let metrics = Metrics::new(args.max_series as usize);
    let app = serve::router(latest, metrics.clone());
    tokio::spawn(serve::listener::serve(
        listener,
        app,
        metrics.rejected_connections().clone(),
    ));
    info!(
        address = %args.metrics_addr,
        "serving /metrics, /api/v1/paths, /api/v1/flows, /healthz, /readyz"
    );
    let signal = poll_until_signal(&mut pipeline, &snapshots, &metrics)
        .await
        .map_err(AgentError::Runtime)?;
    info!(signal = %signal.name(), "stop signal received");
    let stop = match (handover, signal) {
        (Err(reason), _) => Stop::Clean(reason),
        (Ok(_), Signal::Interrupt) => Stop::Clean(CleanStop::Interrupted),
        (Ok(asker), Signal::Terminate) => asker.ask().await,
    };
    match stop {
        Stop::HandOver { daemonset } => pipeline.hand_over(&daemonset),
        Stop::Clean(reason) => {
            info!("stopping cleanly: {reason}");
            pipeline.shutdown();
        }
    }
    Ok(())
}

/// The signal that ends the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    /// SIGTERM: the kubelet's (rolling update, uninstall, eviction).
    Terminate,
    /// SIGINT: Ctrl-C at a terminal.
    Interrupt,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
        }
    }
}

/// Polls every `--poll-interval` and publishes each snapshot to the server; attaches to a new
/// interface as soon as netlink announces it, so that a new pod's veth is attached within
/// milliseconds.
async fn poll_until_signal(
    pipeline: &mut Pipeline,
    snapshots: &watch::Sender<Arc<Snapshot>>,
    metrics: &Metrics,
) -> anyhow::Result<Signal> {
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut ticker = tokio::time::interval(pipeline.poll_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let changes = match discovery::watch_changes(pipeline.clsact_datapath()) {
        Ok(changes) => Some(changes),
        Err(error) => {
            warn!("{error}: new interfaces are found at each poll instead");
            None
        }
    };
    let mut last_poll = Instant::now();
    loop {
        // A flood of new interfaces must not stop the counting.
        let polls_behind = last_poll.elapsed() > 2 * pipeline.poll_interval();
        tokio::select! {
            // A new interface first: attaching it must not wait behind a poll that is due.
            biased;
            changes = changed(changes.as_deref()), if !polls_behind => {
                pipeline.apply_changes(changes);
            }
            _ = ticker.tick() => {
                last_poll = Instant::now();
                let snapshot = pipeline.poll();
                metrics.record_workloads(&snapshot.workloads);
                snapshots.send_replace(snapshot);
            }
            _ = terminate.recv() => return Ok(Signal::Terminate),
            _ = interrupt.recv() => return Ok(Signal::Interrupt),
        }
    }
}

/// The next changes netlink reports; never, without a watch.
async fn changed(watch: Option<&ChangeWatch>) -> Changes {
    match watch {
        Some(watch) => watch.changes().await,
        None => std::future::pending().await,
    }
}
