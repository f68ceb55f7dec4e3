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
    serve::{
        self,
        access::{Access, MetricsAuth},
        export::Metrics,
        review::Reviewer,
        tls::ServerTls,
    },
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
    let tls = ServerTls::load(args.access.certificate_files(), &certificate_names(&args))
        .context("the HTTPS certificate (--tls-cert-file, --tls-key-file)")
        .map_err(AgentError::Config)?;
    let mut pipeline = Pipeline::start_resumable(&args.pipeline, &args.restart)?;
    let reviewer = match &kubernetes {
        Some(connection) => Some(
            kube::Client::try_from(connection.config.clone())
                .map(Reviewer::new)
                .context("a Kubernetes client to check bearer tokens")
                .map_err(AgentError::Runtime)?,
        ),
        None => None,
    };
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
    log_access(&args, &tls, reviewer.is_some());
    let access = Arc::new(Access {
        metrics_auth: args.access.metrics_auth,
        reviewer,
    });
    let app = serve::router(latest, metrics.clone(), access);
    let acceptor = tls
        .acceptor()
        .context("the HTTPS configuration")
        .map_err(AgentError::Config)?;
    tokio::spawn(serve::listener::serve(
        listener,
        app,
        acceptor,
        metrics.rejected_connections().clone(),
    ));
    tokio::spawn(tls.follow_files(serve::tls::RELOAD_PERIOD));
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

/// The names the self-signed certificate carries: loopback, the node's name and the listen
/// address when it is a single one. Scrapers of a self-signed certificate skip verification
/// anyway; the names make it readable in a TLS client's output.
fn certificate_names(args: &AgentArgs) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.extend(args.pipeline.node_name.clone());
    let ip = args.metrics_addr.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        names.push(ip.to_string());
    }
    names
}

/// Says at start who may read what, and what a scraper needs.
fn log_access(args: &AgentArgs, tls: &ServerTls, can_review: bool) {
    let metrics = match args.access.metrics_auth {
        MetricsAuth::Token => "/metrics and /api/v1/* need HTTPS and a bearer token",
        MetricsAuth::None => "/metrics is open, /api/v1/* needs HTTPS and a bearer token",
    };
    info!(
        address = %args.metrics_addr,
        "serving /metrics, /api/v1/paths, /api/v1/flows, /healthz, /readyz: everything to the \
         node's loopback, /healthz and /readyz to all; from elsewhere {metrics}"
    );
    if tls.is_self_signed() {
        info!(
            fingerprint = %tls.fingerprint(),
            "no --tls-cert-file: HTTPS serves a self-signed certificate made at start; scrapers \
             skip verification (insecure_skip_verify) or are given a certificate to trust"
        );
    }
    if !can_review {
        warn!(
            "no Kubernetes context: bearer tokens cannot be checked, so what needs one is \
             answered on the node's loopback only (--metrics-auth none opens /metrics)"
        );
    }
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
