//! The agent's work, whoever shows it: load the datapath, attach to the node's interfaces as
//! they come and go, gather the node's context (netlink, IMDS, the cluster endpoint's DNS
//! answer, conntrack) and, every poll, turn the kernel's flow table into a [`Snapshot`].
//! `tracer agent` serves the snapshots over HTTP; `tracer top` shows them.
//!
//! ```no_run
//! use tracer_agent::{error::AgentError, cli::PipelineArgs, pipeline::Pipeline};
//!
//! fn show(args: &PipelineArgs) -> Result<(), AgentError> {
//!     let mut pipeline = Pipeline::start(args)?;
//!     for _ in 0..10 {
//!         std::thread::sleep(pipeline.poll_interval());
//!         let snapshot = pipeline.poll();
//!         // The bodies of GET /api/v1/paths and GET /api/v1/flows?limit=20.
//!         println!("{} paths", snapshot.paths.paths.len());
//!         println!("{} flows", snapshot.flows(20).flows.len());
//!     }
//!     pipeline.shutdown();
//!     Ok(())
//! }
//! ```
pub(crate) mod blindness;
mod feed;
pub mod readiness;
pub(crate) mod restart;
pub mod snapshot;
use std::{
    collections::{BTreeSet, HashSet},
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow};
use tokio::sync::watch;
use tracer_common::{DatapathCounter, FlowKey, FlowStats};
use tracing::{debug, info, warn};

use crate::{
    aggregate::conntrack::Conntrack,
    aggregate::ena::EnaAllowances,
    aggregate::workload::WorkloadBytes,
    aggregate::workload::WorkloadTallies,
    aggregate::{Aggregator, NatTable, Unread},
    cli::{AttachModeArg, PipelineArgs, RestartArgs},
    context,
    context::endpoint,
    context::imds::{self, ImdsClient},
    context::kubernetes::ClusterFacts,
    datapath::discovery::{self, Changes, Interface, InterfaceKind, InterfacePatterns, Scan},
    datapath::ethtool::Ethtool,
    datapath::privileges,
    datapath::{AttachMode, Datapath, DatapathError, Evictions, Pins},
    error::AgentError,
    pipeline::blindness::Blindness,
    pipeline::feed::ContextFeed,
    pipeline::readiness::{Change, Problem, Reason},
    pipeline::restart::{Saved, StateFile, Totals},
    pipeline::snapshot::{Health, History, LatencyHistogram, Snapshot},
    serve::api::{self, AttachedInterfaces, FlowTableStats, InterfaceStates, PathsResponse},
};

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// The loaded datapath and everything the agent remembers between polls.
pub struct Pipeline {
    args: PipelineArgs,
    patterns: InterfacePatterns,
    /// Shared with the change watch in clsact mode, which moves the filters back in front
    /// without waiting for a poll (`discovery::watch_changes`).
    datapath: Arc<Mutex<Datapath>>,
    /// The node's context and the sources that keep it current.
    feed: ContextFeed,
    aggregator: Aggregator,
    history: History,
    conntrack: Option<Conntrack>,
    /// Bytes per workload, with `--workload-metrics`.
    workloads: Option<WorkloadBytes>,
    /// A predecessor's per-workload tallies, until the Kubernetes context starts them.
    carried_workloads: Option<WorkloadTallies>,
    /// How long each attach to an interface took (both hooks).
    attach_times: LatencyHistogram,
    attached: AttachedInterfaces,
    /// The interfaces the latest scan found attached, with the kernel's packet counts.
    traced: Vec<Interface>,
    /// How many interfaces the latest scan failed to attach to.
    failed: u64,
    blindness: Blindness,
    /// The blind interfaces last published: only changes are logged.
    published_blind: BTreeSet<String>,
    /// The socket the drivers are asked on, opened at the first poll.
    ethtool: Option<Ethtool>,
    ena: EnaAllowances,
    flow_table: FlowTableStats,
    /// The datapath's counters as last read.
    datapath_counters: [u64; DatapathCounter::COUNT as usize],
    unread: Unread,
    evictions: Evictions,
    /// Where each poll is saved for a successor (`--state-file`).
    state: Option<StateFile>,
    problems: BTreeSet<Problem>,
    /// The problems last published: only changes are logged.
    published: BTreeSet<Problem>,
    latest: Arc<Snapshot>,
}

impl Pipeline {
    /// Checks the configuration, finds the interfaces to trace and loads the datapath; the
    /// first [`poll`](Self::poll) attaches to them. A bad flag or no matching interface is a
    /// configuration error (exit 2); a kernel that cannot load the programs a runtime error.
    pub fn start(args: &PipelineArgs) -> Result<Self, AgentError> {
        Self::start_resumable(args, &RestartArgs::default())
    }

    /// [`start`](Self::start), taking over a killed predecessor's datapath and counts when
    /// `restart` says where they are (see `restart`).
    pub fn start_resumable(args: &PipelineArgs, restart: &RestartArgs) -> Result<Self, AgentError> {
        if !Path::new(BTF_PATH).exists() {
            return Err(AgentError::Runtime(anyhow!(
                "this kernel has no BTF ({BTF_PATH} is missing): run on a kernel built with CONFIG_DEBUG_INFO_BTF=y (EKS AMIs have it)"
            )));
        }
        let context = context::from_flags(&args.context).map_err(|contradictions| {
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
        let mode = match args.attach_mode {
            AttachModeArg::Auto => AttachMode::for_running_kernel(args.tcx_order),
            AttachModeArg::Tcx => AttachMode::Tcx(args.tcx_order),
            AttachModeArg::Clsact => AttachMode::Clsact,
        };
        let pins = restart
            .pin_path
            .as_deref()
            .map(Pins::new)
            .transpose()
            .context("--pin-path")
            .map_err(AgentError::Config)?;
        let state = restart
            .state_file
            .as_deref()
            .map(StateFile::open)
            .transpose()
            .context("--state-file")
            .map_err(AgentError::Config)?;
        let saved = state.as_ref().and_then(load_saved);
        let datapath = Datapath::load_pinned(
            args.flow_table_size,
            mode,
            pins,
            saved.as_ref().map(|saved| saved.flow_table_id),
        )
        .context("loading the datapath")
        .map_err(|error| AgentError::Runtime(privileges.explain(error)))?;
        if let Some(path) = &args.context.config {
            info!(config = %path.display(), "configuration from --config and the command line");
        }
        info!(
            entries = args.flow_table_size,
            attach = %mode.as_str(),
            node = %args.node_name.as_deref().unwrap_or("(NODE_NAME unset)"),
            "datapath loaded"
        );
        let vpc_from_imds = args.context.vpc_cidrs.is_empty().then(|| {
            imds::spawn_vpc_lookup(ImdsClient::new(
                args.context.imds_addr,
                imds::DEFAULT_TIMEOUT,
            ))
        });
        let apiserver_from_dns = args
            .context
            .cluster_endpoint
            .clone()
            .map(|host| endpoint::spawn_resolver(host, args.resolve_interval));
        let feed = ContextFeed::new(
            args.context.clone(),
            context,
            vpc_from_imds,
            apiserver_from_dns,
        );
        let mut pipeline = Self {
            args: args.clone(),
            patterns,
            datapath: Arc::new(Mutex::new(datapath)),
            feed,
            aggregator: Aggregator::new(args.syn_timeout),
            history: History::default(),
            conntrack: None,
            workloads: None,
            carried_workloads: None,
            attach_times: LatencyHistogram::default(),
            attached: AttachedInterfaces::default(),
            traced: Vec::new(),
            failed: 0,
            blindness: Blindness::default(),
            published_blind: BTreeSet::new(),
            ethtool: None,
            ena: EnaAllowances::default(),
            flow_table: FlowTableStats {
                capacity: u64::from(args.flow_table_size),
                ..FlowTableStats::default()
            },
            datapath_counters: [0; DatapathCounter::COUNT as usize],
            unread: Unread::default(),
            evictions: Evictions::default(),
            state,
            problems: BTreeSet::new(),
            published: BTreeSet::new(),
            latest: Arc::default(),
        };
        match saved {
            Some(saved) if pipeline.datapath().resumed() => pipeline.carry_on(saved),
            Some(_) => warn!("the saved state is another flow table's: counting from zero"),
            None => {}
        }
        pipeline.problem(Reason::Starting, "starting".to_owned());
        pipeline.publish();
        Ok(pipeline)
    }

    /// Takes over what a killed predecessor counted: its totals, and its connections from
    /// where it last read them.
    fn carry_on(&mut self, saved: Saved) {
        info!(
            connections = saved.connections.len(),
            "carrying on from the previous agent's counts"
        );
        self.history = saved.history;
        self.unread = saved.unread;
        self.evictions = saved.evictions;
        self.carried_workloads = saved.workloads;
        self.attach_times = saved.attach_times.unwrap_or_default();
        self.ena = saved.ena.unwrap_or_default();
        self.aggregator.carry_on(saved.connections);
    }

    /// Takes pod names, control-plane ENIs, the cluster DNS and the nodes' zones from the
    /// Kubernetes context (`kubernetes::start`) from the next poll on.
    pub fn follow_cluster(&mut self, facts: watch::Receiver<ClusterFacts>) {
        self.feed.follow_cluster(facts);
        if let Some(top_k) = self.args.kubernetes.workload_metrics {
            self.aggregator.report_connection_bytes();
            let carried = self.carried_workloads.take().unwrap_or_default();
            self.workloads = Some(WorkloadBytes::resume(usize::from(top_k), carried));
        }
    }

    /// The latest snapshot; before the first poll, an empty one that is not ready.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.latest)
    }

    fn datapath(&self) -> MutexGuard<'_, Datapath> {
        self.datapath.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The datapath, for the change watch to keep its filters first, in clsact mode.
    pub fn clsact_datapath(&self) -> Option<Arc<Mutex<Datapath>>> {
        (self.datapath().mode() == AttachMode::Clsact).then(|| Arc::clone(&self.datapath))
    }

    /// How often `poll` is meant to run (`--poll-interval`).
    pub fn poll_interval(&self) -> Duration {
        self.args.poll_interval
    }

    /// One round: rescan and attach, read the flow table, classify, sum per path; returns the
    /// new snapshot. Problems along the way do not stop it: they make the snapshot not ready.
    pub fn poll(&mut self) -> Arc<Snapshot> {
        self.problems.clear();
        // Counters before the flow table, so that every entry the count includes is either in
        // the table read next or gone unread; the table before the context, so that a pod
        // whose first packets are in it is known as a pod (its route came before them).
        let counters = self.datapath().counters();
        match counters {
            Ok(counters) => self.datapath_counters = counters,
            Err(error) => self.problem(
                Reason::FlowTable,
                format!("reading datapath counters: {error}"),
            ),
        }
        let flows = self.datapath().flows();
        self.rescan();
        self.read_allowances();
        self.problems.extend(self.feed.refresh());
        match flows {
            Ok(flows) => self.aggregate(&flows),
            Err(error) => self.problem(
                Reason::FlowTable,
                format!("reading the flow table: {error}"),
            ),
        }
        // Saved before published: no total a successor starts from is below one published.
        self.save_state();
        self.publish()
    }

    fn save_state(&mut self) {
        let Some(state) = &self.state else {
            return;
        };
        let totals = Totals {
            history: &self.history,
            unread: &self.unread,
            evictions: &self.evictions,
            workloads: self.workloads.as_ref().map(WorkloadBytes::tallies),
            attach_times: &self.attach_times,
            ena: &self.ena,
        };
        let saved = state.save(
            self.datapath().flow_table_id(),
            totals,
            self.aggregator.carried(),
        );
        if let Err(error) = saved {
            self.problem(
                Reason::StateFile,
                format!("saving the state for a restart failed: {error}; a restart would reset the counters"),
            );
        }
    }

    /// Attaches to the new links netlink announced, at once rather than at the next poll (a
    /// new pod's first packets must be counted); after lost notifications, scans again.
    /// Failures are left to the next poll, whose scan tries again and reports them.
    pub fn apply_changes(&mut self, changes: Changes) {
        if changes.lost {
            self.rescan();
            return;
        }
        for (index, name) in changes.links {
            if self.patterns.kind_of(&name).is_some()
                && let Err(error) = self.attach(&name, index)
            {
                debug!("{error}; the next poll tries again");
            }
        }
    }

    /// Attaches to an interface (nothing when it already is), timing the attach.
    fn attach(&mut self, name: &str, index: u32) -> Result<(), DatapathError> {
        let took = self.datapath().attach(name, index)?;
        if let Some(took) = took {
            self.attach_times.observe(took);
        }
        Ok(())
    }

    /// Reads the VPC allowances the ENA driver counts on each node ENI. A failure costs only
    /// these series (logged): the paths do not depend on them.
    fn read_allowances(&mut self) {
        if self.ethtool.is_none() {
            match Ethtool::open() {
                Ok(ethtool) => self.ethtool = Some(ethtool),
                Err(error) => {
                    warn!("{error}; ENA allowances not read");
                    return;
                }
            }
        }
        if let Some(ethtool) = &self.ethtool {
            // The node ENIs attached by the last scan: their drivers are asked for the VPC's
            // allowances.
            let node_interfaces = self
                .traced
                .iter()
                .filter(|interface| interface.kind == InterfaceKind::Node)
                .map(|interface| interface.name.as_str());
            self.ena.poll(ethtool, node_interfaces);
        }
    }

    /// Lists interfaces, addresses and routes again and applies what changed.
    fn rescan(&mut self) {
        match discovery::scan(&self.patterns) {
            Ok(scan) => self.apply_scan(scan),
            Err(error) => self.problem(Reason::Interfaces, format!("netlink scan failed: {error}")),
        }
    }

    /// Detaches from every interface and removes what a successor would have carried on:
    /// a clean stop leaves nothing behind. (Dropping the pipeline detaches, but leaves the
    /// pins and the state file.)
    pub fn shutdown(self) {
        info!(
            interfaces = self.datapath().attached().count(),
            "detaching from the interfaces"
        );
        self.datapath().detach_all();
        if let Some(state) = &self.state {
            state.remove();
        }
    }

    /// Leaves the datapath attached and pinned for the next agent, after one last poll has
    /// saved the counts (see `kubernetes::handover`). `daemonset` is the successor's owner.
    pub fn hand_over(mut self, daemonset: &str) {
        self.poll();
        match self.datapath().pinned() {
            Some((dir, linked)) => info!(
                daemonset = %daemonset,
                interfaces = linked,
                pin_path = %dir.display(),
                "handed over: the DaemonSet stays; the interfaces stay attached and pinned, for its next pod to take over"
            ),
            None => warn!("nothing pinned to hand over: the datapath goes with this agent"),
        }
    }

    fn aggregate(&mut self, flows: &[(FlowKey, FlowStats)]) {
        let nat = {
            let pending = self.aggregator.pending(flows);
            if pending.is_empty() {
                NatTable::default()
            } else {
                self.nat_table(&pending)
            }
        };
        let result = self
            .aggregator
            .poll(flows, self.feed.context(), &nat, monotonic_ns());
        self.history.record(&result);
        let context = self.feed.context();
        self.blindness.update(
            &self.traced,
            &result.seen,
            blindness::on_node(&context.node_ips, &context.local_pods),
        );
        // Before the first listing no pod is known: recording would forget every workload
        // (carried ones included) as gone from the node.
        if let Some(workloads) = self.workloads.as_mut() {
            let polled = result.connection_bytes.iter().copied();
            if self.feed.context().cluster.synced {
                workloads.record(polled, &self.feed.context().cluster.pods);
            } else {
                workloads.hold(polled);
            }
        }
        let created = self.datapath_counters[DatapathCounter::FlowsCreated as usize];
        self.flow_table.entries = flows.len() as u64;
        self.flow_table.evictions = self.evictions.update(created, flows.len());
        self.unread.update(created, &result);
        let forgotten = self.datapath().forget(&result.idle);
        match forgotten {
            Ok(removed) => self.evictions.removed(removed),
            Err(error) => self.problem(
                Reason::FlowTable,
                format!("removing idle connections: {error}"),
            ),
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
            .datapath()
            .attached()
            .filter(|name| !present.contains(name))
            .map(str::to_owned)
            .collect();
        for name in vanished {
            info!(interface = %name, "interface gone");
            self.datapath().detach(&name);
        }
        let mut attached = AttachedInterfaces::default();
        let mut traced = Vec::with_capacity(interfaces.len());
        let mut failed = 0;
        for interface in interfaces {
            match self.attach(&interface.name, interface.index) {
                Ok(()) => {
                    match interface.kind {
                        InterfaceKind::Pod => attached.pod += 1,
                        InterfaceKind::Node => attached.node += 1,
                    }
                    traced.push(interface);
                }
                Err(error) => {
                    failed += 1;
                    self.problem(Reason::Interfaces, format!("{error}"));
                }
            }
        }
        self.datapath().forget_stale_pins();
        if attached.pod + attached.node == 0 {
            self.problem(Reason::Interfaces, "attached to no interface".to_owned());
        }
        self.attached = attached;
        self.traced = traced;
        self.failed = failed;
        self.feed.set_addresses(node_ips, local_pods);
    }

    /// The conntrack entries of the `pending` connections. A dump that fails half-way keeps
    /// what it read: the others wait for the next poll.
    fn nat_table(&mut self, pending: &HashSet<&FlowKey>) -> NatTable {
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
        let mut nat = NatTable::for_pending(pending);
        if let Err(error) = conntrack.dump_each(|entry| nat.add(entry, pending)) {
            self.conntrack = None;
            self.problem(
                Reason::Conntrack,
                format!("conntrack dump failed, NAT not observed: {error}"),
            );
        }
        nat
    }

    fn problem(&mut self, reason: Reason, message: String) {
        self.problems.insert(Problem { reason, message });
    }

    /// Builds the snapshot of this poll; logs the problems that appeared, changed cause or
    /// went away since the previous one.
    fn publish(&mut self) -> Arc<Snapshot> {
        for change in readiness::changes(&self.published, &self.problems) {
            match change {
                Change::Appeared(problem) => warn!(reason = %problem.reason.as_str(), "{problem}"),
                Change::Resolved(problem) => {
                    info!(reason = %problem.reason.as_str(), "resolved: {problem}");
                }
            }
        }
        self.published = self.problems.clone();
        let blind = self.blindness.blind();
        for name in blind.difference(&self.published_blind) {
            warn!(interface = %name, "{}", blindness::describe(name));
        }
        for name in self.published_blind.difference(blind) {
            info!(interface = %name, "the tracer sees this interface's traffic again");
        }
        self.published_blind = blind.clone();
        let interfaces = InterfaceStates {
            attached: self.traced.len().saturating_sub(blind.len()) as u64,
            blind: blind.len() as u64,
            failed: self.failed,
        };
        let problems: Vec<Problem> = self.problems.iter().cloned().collect();
        let context = self.feed.context();
        let apiserver_endpoints: BTreeSet<&str> = context
            .apiserver_ips
            .iter()
            .map(|addr| context.endpoint_of(*addr).as_str())
            .collect();
        let snapshot = Snapshot {
            paths: PathsResponse {
                node: self.args.node_name.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                time_unix_ms: unix_ms(),
                poll_interval_ms: self.args.poll_interval.as_millis() as u64,
                apiserver_endpoints: apiserver_endpoints.into_iter().map(Into::into).collect(),
                attached_interfaces: self.attached.clone(),
                interfaces,
                blind_interfaces: self.published_blind.iter().cloned().collect(),
                flow_table: self.flow_table.clone(),
                ready: problems.is_empty(),
                problems: problems.iter().map(Problem::to_string).collect(),
                paths: self.history.rows(self.aggregator.connections()),
            },
            largest_flows: snapshot::top_flows(
                self.aggregator.connections(),
                api::MAX_FLOWS_LIMIT,
                &self.feed.context().cluster.pods,
            ),
            health: Health {
                datapath: self.datapath_counters,
                events_lost: self.unread.lost(),
                problems,
                attach_times: self.attach_times.to_api(),
                attach_reorders: self.datapath().reorders(),
            },
            workloads: self
                .workloads
                .as_ref()
                .map(WorkloadBytes::series)
                .unwrap_or_default(),
            ena: self.ena.series(),
        };
        self.latest = Arc::new(snapshot);
        Arc::clone(&self.latest)
    }
}

/// What a predecessor saved; an unreadable state is logged and counting starts from zero.
fn load_saved(state: &StateFile) -> Option<Saved> {
    state.load().unwrap_or_else(|error| {
        warn!("{error}: counting from zero");
        None
    })
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

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<Pipeline>();
        send::<Arc<Snapshot>>();
    }
}
