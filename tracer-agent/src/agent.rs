//! `tracer agent`: attach, poll, classify, serve — until SIGINT or SIGTERM.
use std::{collections::BTreeSet, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow};
use log::{info, warn};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::{Notify, oneshot, watch},
};

use crate::{
    aggregate::{Aggregator, NatTable},
    cidr::Cidr,
    classify::NodeContext,
    cli::{AgentArgs, AttachModeArg},
    conntrack::Conntrack,
    context,
    datapath::{AttachMode, Datapath},
    discovery::{self, InterfaceKind, InterfacePatterns, Scan},
    endpoint::{self, Resolution},
    export::{self, Metrics, Problem, Readiness, Reason},
    imds::{self, ImdsClient},
    privileges,
};

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
            AgentError::Config(_) => 2,
            AgentError::Runtime(_) => 1,
        }
    }
}

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const IMDS_RETRY: Duration = Duration::from_secs(5);

pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    if !Path::new(BTF_PATH).exists() {
        return Err(AgentError::Runtime(anyhow!(
            "this kernel has no BTF ({BTF_PATH} is missing): run on a kernel built with CONFIG_DEBUG_INFO_BTF=y (EKS AMIs have it)"
        )));
    }
    let node_context = context::from_flags(&args.context).map_err(|contradictions| {
        AgentError::Config(anyhow!(context::describe(&contradictions)))
    })?;
    let privileges = privileges::acquire().map_err(AgentError::Runtime)?;
    let patterns = context::interface_patterns(&args.context);
    let scan = discovery::scan(&patterns)
        .context("listing interfaces over netlink")
        .map_err(AgentError::Runtime)?;
    if scan.interfaces.is_empty() {
        return Err(AgentError::Config(anyhow!(
            "no interface matches --pod-iface {:?} or --node-iface {:?}: list them with `ip link` and set the patterns",
            args.context.pod_ifaces,
            args.context.node_ifaces
        )));
    }
    let listener = TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {}", args.metrics_addr))
        .map_err(AgentError::Config)?;
    let mode = match args.attach_mode {
        AttachModeArg::Auto => AttachMode::for_running_kernel(),
        AttachModeArg::Tcx => AttachMode::Tcx,
        AttachModeArg::Clsact => AttachMode::Clsact,
    };
    let datapath = Datapath::load(args.flow_table_size, mode)
        .context("loading the datapath")
        .map_err(|error| AgentError::Runtime(privileges.explain(error)))?;
    if let Some(path) = &args.context.config {
        info!("configuration from {} and the command line", path.display());
    }
    info!(
        "datapath loaded ({} entries, {} attach) on node {}",
        args.flow_table_size,
        mode.as_str(),
        args.node_name.as_deref().unwrap_or("(NODE_NAME unset)")
    );

    let metrics = Metrics::new();
    let readiness = Readiness::default();
    readiness.set(&[Problem {
        reason: Reason::Starting,
        message: "starting".to_owned(),
    }]);
    let app = export::router(metrics.clone(), readiness.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            warn!("metrics server stopped: {error}");
        }
    });
    info!(
        "serving /metrics, /healthz, /readyz on {}",
        args.metrics_addr
    );

    let mut agent = Agent::new(args, node_context, patterns, datapath, metrics, readiness);
    agent.apply_scan(scan);
    agent.run_until_signal().await.map_err(AgentError::Runtime)
}

struct Agent {
    args: AgentArgs,
    patterns: InterfacePatterns,
    datapath: Datapath,
    metrics: Metrics,
    readiness: Readiness,
    context: NodeContext,
    aggregator: Aggregator,
    conntrack: Option<Conntrack>,
    /// IMDS answer still to come, when the VPC CIDRs were not given on the command line.
    vpc_from_imds: Option<oneshot::Receiver<Vec<Cidr>>>,
    /// Answers about the cluster endpoint, when one was given.
    apiserver_from_dns: Option<watch::Receiver<Resolution>>,
    problems: BTreeSet<Problem>,
    /// The problems last published: only changes are logged.
    published: BTreeSet<Problem>,
    /// Woken by netlink on every link, address or route change (hot-plug).
    changes: Option<Arc<Notify>>,
}

impl Agent {
    fn new(
        args: AgentArgs,
        context: NodeContext,
        patterns: InterfacePatterns,
        datapath: Datapath,
        metrics: Metrics,
        readiness: Readiness,
    ) -> Agent {
        let aggregator = Aggregator::new(args.syn_timeout);
        let vpc_from_imds = args.context.vpc_cidrs.is_empty().then(|| {
            spawn_imds_lookup(ImdsClient::new(
                args.context.imds_addr,
                imds::DEFAULT_TIMEOUT,
            ))
        });
        let apiserver_from_dns = args
            .context
            .cluster_endpoint
            .clone()
            .map(|host| endpoint::spawn_resolver(host, args.resolve_interval));
        Agent {
            args,
            patterns,
            datapath,
            metrics,
            readiness,
            context,
            aggregator,
            conntrack: None,
            vpc_from_imds,
            apiserver_from_dns,
            problems: BTreeSet::new(),
            published: BTreeSet::new(),
            changes: None,
        }
    }

    async fn run_until_signal(&mut self) -> anyhow::Result<()> {
        let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut ticker = tokio::time::interval(self.args.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.changes = match discovery::watch_changes() {
            Ok(changes) => Some(changes),
            Err(error) => {
                warn!("{error}: new interfaces are found at each poll instead");
                None
            }
        };
        let changes = self.changes.clone();
        loop {
            tokio::select! {
                _ = ticker.tick() => self.poll(),
                _ = changed(changes.as_deref()) => self.rescan(),
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        info!(
            "signal received: detaching from {} interfaces",
            self.datapath.attached().count()
        );
        self.datapath.detach_all();
        Ok(())
    }

    /// One round: rescan interfaces, read the flow table, classify, publish.
    fn poll(&mut self) {
        self.problems.clear();
        self.rescan();
        self.receive_imds();
        self.receive_apiserver_addresses();
        if self.context.vpc_cidrs.is_empty() {
            self.problem(Reason::VpcCidr, format!(
                "VPC CIDR unknown: IMDS ({}) has not answered yet and --vpc-cidr is not set; remote and external traffic is labelled unknown",
                self.args.context.imds_addr
            ));
        }
        for contradiction in self.context.contradictions() {
            self.problem(
                Reason::Contradiction,
                format!(
                    "{contradiction}; classification of the addresses involved cannot be trusted"
                ),
            );
        }
        let flows = match self.datapath.flows() {
            Ok(flows) => flows,
            Err(error) => {
                self.problem(
                    Reason::FlowTable,
                    format!("reading the flow table: {error}"),
                );
                return self.publish_readiness();
            }
        };
        let nat = if self.aggregator.needs_nat_table(&flows) {
            self.nat_table()
        } else {
            NatTable::default()
        };
        let result = self
            .aggregator
            .poll(&flows, &self.context, &nat, monotonic_ns());
        self.metrics.record_paths(&result.deltas);
        self.metrics.record_handshakes(&result.handshakes);
        self.metrics.set_flow_table(flows.len(), result.evicted);
        if let Err(error) = self.datapath.forget(&result.idle) {
            self.problem(
                Reason::FlowTable,
                format!("removing idle connections: {error}"),
            );
        }
        match self.datapath.counters() {
            Ok(counters) => self.metrics.record_datapath(&counters),
            Err(error) => self.problem(
                Reason::FlowTable,
                format!("reading datapath counters: {error}"),
            ),
        }
        self.publish_readiness();
    }

    /// Lists interfaces, addresses and routes again and applies what changed.
    fn rescan(&mut self) {
        match discovery::scan(&self.patterns) {
            Ok(scan) => self.apply_scan(scan),
            Err(error) => self.problem(Reason::Interfaces, format!("netlink scan failed: {error}")),
        }
    }

    /// Attaches to new interfaces, forgets vanished ones, refreshes node addresses and pods.
    fn apply_scan(&mut self, scan: Scan) {
        let Scan {
            interfaces,
            node_ips,
            local_pods,
        } = scan;
        let present: BTreeSet<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
        let vanished: Vec<String> = self
            .datapath
            .attached()
            .filter(|name| !present.contains(name))
            .map(str::to_owned)
            .collect();
        for name in vanished {
            info!("interface {name} is gone");
            self.datapath.detach(&name);
        }
        let mut counts = [(InterfaceKind::Pod, 0), (InterfaceKind::Node, 0)];
        for interface in &interfaces {
            match self.datapath.attach(&interface.name, interface.index) {
                Ok(()) => {
                    if let Some(count) = counts.iter_mut().find(|(kind, _)| *kind == interface.kind)
                    {
                        count.1 += 1;
                    }
                }
                Err(error) => self.problem(Reason::Interfaces, format!("{error}")),
            }
        }
        for (kind, count) in counts {
            self.metrics.set_attached(kind, count);
        }
        if counts.iter().all(|(_, count)| *count == 0) {
            self.problem(Reason::Interfaces, "attached to no interface".to_owned());
        }
        self.context.node_ips = node_ips;
        self.context.local_pods = local_pods;
    }

    fn receive_imds(&mut self) {
        let Some(receiver) = self.vpc_from_imds.as_mut() else {
            return;
        };
        if let Ok(cidrs) = receiver.try_recv() {
            info!("VPC CIDR blocks from IMDS: {cidrs:?}");
            self.context.vpc_cidrs = cidrs;
            self.vpc_from_imds = None;
        }
    }

    /// The API server addresses: those given by flag and the cluster endpoint's latest answer.
    fn receive_apiserver_addresses(&mut self) {
        let Some(receiver) = self.apiserver_from_dns.as_mut() else {
            return;
        };
        let changed = receiver.has_changed().unwrap_or(false);
        let resolution = receiver.borrow_and_update().clone();
        match resolution {
            Ok(addresses) => {
                if changed {
                    info!("cluster endpoint resolves to {addresses:?}");
                    self.context.apiserver_ips = self
                        .args
                        .context
                        .apiserver_ips
                        .iter()
                        .copied()
                        .chain(addresses)
                        .collect();
                }
            }
            // The last good answer stays in use; only never having had one is a gap.
            Err(error) => self.problem(Reason::ApiServer, format!(
                "{error}; API server traffic to addresses not given by --apiserver-ip is not recognised"
            )),
        }
    }

    fn nat_table(&mut self) -> NatTable {
        if self.conntrack.is_none() {
            match Conntrack::open() {
                Ok(conntrack) => self.conntrack = Some(conntrack),
                Err(error) => {
                    self.problem(
                        Reason::Conntrack,
                        format!("conntrack unavailable, NAT not observed: {error}"),
                    );
                    return NatTable::default();
                }
            }
        }
        let Some(conntrack) = self.conntrack.as_mut() else {
            return NatTable::default();
        };
        match conntrack.dump() {
            Ok(entries) => NatTable::new(entries),
            Err(error) => {
                self.conntrack = None;
                self.problem(
                    Reason::Conntrack,
                    format!("conntrack dump failed, NAT not observed: {error}"),
                );
                NatTable::default()
            }
        }
    }

    fn problem(&mut self, reason: Reason, message: String) {
        self.problems.insert(Problem { reason, message });
    }

    /// Publishes this poll's problems to /readyz and the metrics; logs those that appeared or
    /// went away since the previous poll.
    fn publish_readiness(&mut self) {
        for appeared in self.problems.difference(&self.published) {
            warn!("{}", appeared.message);
        }
        for resolved in self.published.difference(&self.problems) {
            info!("resolved: {}", resolved.message);
        }
        let problems: Vec<Problem> = self.problems.iter().cloned().collect();
        self.readiness.set(&problems);
        self.metrics.record_readiness(&problems);
        self.published = self.problems.clone();
    }
}

/// Resolves when netlink reports a change; never, without a watch.
async fn changed(changes: Option<&Notify>) {
    match changes {
        Some(changes) => changes.notified().await,
        None => std::future::pending().await,
    }
}

/// CLOCK_MONOTONIC, the clock `bpf_ktime_get_ns` reads: comparable with the kernel's SYN times.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Asks IMDS for the VPC's CIDR blocks in the background, retrying until it answers.
fn spawn_imds_lookup(client: ImdsClient) -> oneshot::Receiver<Vec<Cidr>> {
    let (sender, receiver) = oneshot::channel();
    tokio::task::spawn_blocking(move || {
        loop {
            match client.fetch() {
                Ok(metadata) => {
                    let cidrs = metadata.vpc_cidrs;
                    let _ = sender.send(cidrs);
                    return;
                }
                Err(error) => {
                    warn!("IMDS: {error}; retrying in {}s", IMDS_RETRY.as_secs());
                    std::thread::sleep(IMDS_RETRY);
                }
            }
            if sender.is_closed() {
                return;
            }
        }
    });
    receiver
}
