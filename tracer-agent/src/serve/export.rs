//! The Prometheus endpoint (its families: docs/metrics.md) in the text exposition format 0.0.4,
//! rendered at scrape time from the latest `Snapshot`: path counters, agent health, the
//! process's CPU and memory, build info — and the capped families, whose label values the
//! taxonomy does not bound.
use std::{
    collections::BTreeMap,
    fmt::{Display, Write as _},
    marker::PhantomData,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
};

use indexmap::IndexMap;
use tracer_common::DatapathCounter;

use crate::{
    aggregate::ena::EnaSeries,
    aggregate::workload::WorkloadSeries,
    pipeline::readiness::Reason,
    pipeline::snapshot::Snapshot,
    serve::api::{Histogram, PathRow},
    serve::listener::RejectedConnections,
    serve::process,
};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Default of `--max-series`.
pub const DEFAULT_MAX_SERIES: u32 = 10_000;

/// The metric state a snapshot does not hold: the opt-in families with label values from the
/// cluster (workload names), under the series cap. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    workload_bytes: CappedCounters<WorkloadSeries>,
    rejected_connections: RejectedConnections,
    /// Length of the last exposition: the next one reserves about as much at once rather than
    /// growing (and copying) its buffer step by step.
    last_length: Arc<AtomicUsize>,
}

impl Metrics {
    /// `max_series` caps the series of the capped families (`--max-series`).
    pub fn new(max_series: usize) -> Self {
        Self {
            workload_bytes: CappedCounters::new(max_series),
            rejected_connections: RejectedConnections::default(),
            last_length: Arc::default(),
        }
    }

    /// `tracer_workload_bytes_total{namespace,workload,path}`: opt-in (`--workload-metrics`),
    /// fed from each poll's snapshot.
    pub fn workload_bytes(&self) -> &CappedCounters<WorkloadSeries> {
        &self.workload_bytes
    }

    /// `tracer_http_connections_rejected_total{reason}`, counted by the server's accept loop.
    pub fn rejected_connections(&self) -> &RejectedConnections {
        &self.rejected_connections
    }

    /// Takes the per-workload totals of a poll (counters: they only grow).
    pub fn record_workloads(&self, totals: &[(WorkloadSeries, u64)]) {
        for (series, total) in totals {
            self.workload_bytes.set(series, *total);
        }
    }

    /// The exposition: every family of `snapshot`, the capped families, the process.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let workloads = self.workload_bytes.lock();
        let last_length = self.last_length.load(Ordering::Relaxed);
        let mut out = Exposition::with_capacity(last_length + last_length / 8 + 4096);
        render_paths(&mut out, &snapshot.paths.paths);
        render_health(&mut out, snapshot);
        render_ena(&mut out, &snapshot.ena);
        out.family(
            "tracer_series_overflow_total",
            "counter",
            "Updates refused because a capped family (tracer_workload_bytes_total) had --max-series series",
        );
        out.sample("tracer_series_overflow_total", &[], workloads.refused);
        workloads.render(
            &mut out,
            "tracer_workload_bytes_total",
            "L3 bytes by workload and path (opt-in; at most --max-series series)",
        );
        drop(workloads);
        out.family(
            "tracer_http_connections_rejected_total",
            "counter",
            "Connections to this endpoint the agent refused (too many open) or closed before the client did (too slow, malformed, too large, too old)",
        );
        for (reason, count) in self.rejected_connections.totals() {
            out.sample(
                "tracer_http_connections_rejected_total",
                &[("reason", reason.as_str())],
                count,
            );
        }
        out.family(
            "tracer_build_info",
            "gauge",
            "Build information of the running agent",
        );
        out.sample(
            "tracer_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        render_process(&mut out);
        self.last_length.store(out.text.len(), Ordering::Relaxed);
        out.text
    }
}

fn path_labels(row: &PathRow) -> [(&'static str, &str); 4] {
    [
        ("path", row.path.as_str()),
        ("endpoint", row.endpoint.as_deref().unwrap_or("")),
        ("nat", row.nat.as_str()),
        ("zone", row.zone.as_deref().unwrap_or("")),
    ]
}

/// TCP health of a (path, endpoint): its metrics have no `nat` label, so rows add up.
#[derive(Default)]
struct TcpHealth {
    unanswered_syns: u64,
    resets: u64,
    handshakes: Histogram,
}

fn render_paths(out: &mut Exposition, rows: &[PathRow]) {
    render_directed(
        out,
        rows,
        "tracer_path_packets_total",
        "Packets by path of the EKS taxonomy, counted once per node",
        |row| (row.forward_packets, row.reply_packets),
    );
    render_directed(
        out,
        rows,
        "tracer_path_bytes_total",
        "L3 bytes (IP header included) by path, counted once per node",
        |row| (row.forward_bytes, row.reply_bytes),
    );
    out.family(
        "tracer_path_flows_total",
        "counter",
        "Connections seen to start, by path",
    );
    for row in rows {
        out.sample("tracer_path_flows_total", &path_labels(row), row.flows);
    }

    let mut health: BTreeMap<(&str, &str), TcpHealth> = BTreeMap::new();
    for row in rows {
        let key = (row.path.as_str(), row.endpoint.as_deref().unwrap_or(""));
        let sum = health.entry(key).or_default();
        sum.unanswered_syns += row.unanswered_syns;
        sum.resets += row.resets;
        add_handshakes(&mut sum.handshakes, &row.handshakes);
    }
    out.family(
        "tracer_path_handshake_seconds",
        "histogram",
        "TCP SYN to SYN-ACK time seen at the node, by path",
    );
    for (key, sum) in &health {
        if sum.handshakes.count > 0 {
            out.histogram(
                "tracer_path_handshake_seconds",
                &health_labels(*key),
                &sum.handshakes,
            );
        }
    }
    out.family(
        "tracer_path_unanswered_syn_total",
        "counter",
        "TCP connection attempts with no SYN-ACK within the SYN timeout (silent drops)",
    );
    for (key, sum) in &health {
        out.sample(
            "tracer_path_unanswered_syn_total",
            &health_labels(*key),
            sum.unanswered_syns,
        );
    }
    out.family(
        "tracer_path_resets_total",
        "counter",
        "TCP connections that saw a RST (refused or aborted)",
    );
    for (key, sum) in &health {
        out.sample("tracer_path_resets_total", &health_labels(*key), sum.resets);
    }
}

/// A counter per row and direction (`forward`, `reply`).
fn render_directed(
    out: &mut Exposition,
    rows: &[PathRow],
    name: &str,
    help: &str,
    values: impl Fn(&PathRow) -> (u64, u64),
) {
    out.family(name, "counter", help);
    for row in rows {
        let [path, endpoint, nat, zone] = path_labels(row);
        let (forward, reply) = values(row);
        for (direction, value) in [("forward", forward), ("reply", reply)] {
            out.sample(
                name,
                &[path, endpoint, nat, zone, ("direction", direction)],
                value,
            );
        }
    }
}

fn health_labels<'a>((path, endpoint): (&'a str, &'a str)) -> [(&'static str, &'a str); 2] {
    [("path", path), ("endpoint", endpoint)]
}

/// Adds `other`'s observations to `sum` (same buckets, cumulative counts add up).
fn add_handshakes(sum: &mut Histogram, other: &Histogram) {
    if sum.buckets.is_empty() {
        sum.buckets = other.buckets.iter().map(|(bound, _)| (*bound, 0)).collect();
    }
    for ((_, total), (_, count)) in sum.buckets.iter_mut().zip(&other.buckets) {
        *total += count;
    }
    sum.count += other.count;
    sum.sum_seconds += other.sum_seconds;
}

fn render_health(out: &mut Exposition, snapshot: &Snapshot) {
    let paths = &snapshot.paths;
    let health = &snapshot.health;
    out.family(
        "tracer_attached_interfaces",
        "gauge",
        "Interfaces the datapath is attached to, by kind (pod veth or node ENI)",
    );
    for (kind, count) in [
        ("pod", paths.attached_interfaces.pod),
        ("node", paths.attached_interfaces.node),
    ] {
        out.sample("tracer_attached_interfaces", &[("kind", kind)], count);
    }
    out.family(
        "tracer_interfaces",
        "gauge",
        "Traced interfaces by state: attached (counted), blind (attached, but their traffic counted nowhere over the last poll), failed (attach failed)",
    );
    let states = &paths.interfaces;
    for (state, count) in [
        ("attached", states.attached),
        ("blind", states.blind),
        ("failed", states.failed),
    ] {
        out.sample("tracer_interfaces", &[("state", state)], count);
    }
    let table = &paths.flow_table;
    for (name, kind, help, value) in [
        (
            "tracer_flow_table_entries",
            "gauge",
            "Connections in the kernel flow table",
            table.entries,
        ),
        (
            "tracer_flow_table_capacity",
            "gauge",
            "Connections the kernel flow table can hold (--flow-table-size)",
            table.capacity,
        ),
        (
            "tracer_flow_table_evictions_total",
            "counter",
            "Connections the kernel flow table evicted to make room for new ones (full table)",
            table.evictions,
        ),
        (
            "tracer_events_lost_total",
            "counter",
            "Connections the datapath recorded that the agent never read (created and evicted between two polls)",
            health.events_lost,
        ),
        (
            "tracer_attach_reorders_total",
            "counter",
            "Times the agent moved its clsact filter back in front of a filter another program added ahead of it",
            health.attach_reorders,
        ),
    ] {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
    out.family(
        "tracer_attach_duration_seconds",
        "histogram",
        "Time to attach the datapath to a new interface, both hooks (a tcx attach waits for an RCU grace period under the RTNL lock)",
    );
    out.histogram("tracer_attach_duration_seconds", &[], &health.attach_times);
    out.family(
        "tracer_datapath_packets_total",
        "counter",
        "What the datapath did with the packets it saw (counted, duplicate, truncated, …)",
    );
    for counter in DatapathCounter::ALL {
        out.sample(
            "tracer_datapath_packets_total",
            &[("outcome", counter.name())],
            health.datapath[counter as usize],
        );
    }
    out.family(
        "tracer_ready",
        "gauge",
        "1 when the agent has every fact it needs to classify (what /readyz answers 200 to), else 0",
    );
    out.sample("tracer_ready", &[], u64::from(health.problems.is_empty()));
    out.family(
        "tracer_readiness_problems",
        "gauge",
        "Problems keeping the agent from being ready, by reason (details in /readyz and the log)",
    );
    for reason in Reason::ALL {
        let count = health
            .problems
            .iter()
            .filter(|p| p.reason == reason)
            .count();
        out.sample(
            "tracer_readiness_problems",
            &[("reason", reason.as_str())],
            count as u64,
        );
    }
}

/// The VPC allowances of the node's ENA interfaces; nothing on a node without one (or whose
/// driver is too old to count them).
fn render_ena(out: &mut Exposition, interfaces: &BTreeMap<String, EnaSeries>) {
    if interfaces.is_empty() {
        return;
    }
    out.family(
        "tracer_ena_allowance_exceeded_total",
        "counter",
        "Packets the VPC dropped or queued because the instance went over an allowance, by ENA interface and allowance (the driver's *_allowance_exceeded statistics)",
    );
    for (interface, series) in interfaces {
        for (allowance, total) in &series.exceeded {
            out.sample(
                "tracer_ena_allowance_exceeded_total",
                &[("interface", interface), ("allowance", allowance.as_str())],
                total,
            );
        }
    }
    out.family(
        "tracer_ena_conntrack_allowance_available",
        "gauge",
        "Connections the instance can still have tracked before reaching its conntrack allowance, by ENA interface (ENA driver 2.8.1 and later)",
    );
    for (interface, series) in interfaces {
        if let Some(available) = series.conntrack_available {
            out.sample(
                "tracer_ena_conntrack_allowance_available",
                &[("interface", interface)],
                available,
            );
        }
    }
}

/// The process metrics every Prometheus client exports, under their conventional names.
fn render_process(out: &mut Exposition) {
    let Ok(usage) = process::Usage::read() else {
        return;
    };
    out.family(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, in seconds",
    );
    out.sample("process_cpu_seconds_total", &[], usage.cpu_seconds);
    out.family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size, in bytes",
    );
    out.sample("process_resident_memory_bytes", &[], usage.resident_bytes);
    out.family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch, in seconds",
    );
    out.sample("process_start_time_seconds", &[], usage.start_time_seconds);
}

/// Writes the text format: `# HELP`/`# TYPE` lines, then `name{label="value",…} value`.
struct Exposition {
    text: String,
}

impl Exposition {
    fn with_capacity(bytes: usize) -> Self {
        Self {
            text: String::with_capacity(bytes),
        }
    }

    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.text.push_str("# HELP ");
        self.text.push_str(name);
        self.text.push(' ');
        escape(&mut self.text, help, false);
        self.text.push_str("\n# TYPE ");
        self.text.push_str(name);
        self.text.push(' ');
        self.text.push_str(kind);
        self.text.push('\n');
    }

    /// `value`: integers exactly, floats in Rust's shortest round-trip form (never an
    /// exponent), both as the text format reads them.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                write_label(&mut self.text, label, value);
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], handshakes: &Histogram) {
        let bucket = format!("{name}_bucket");
        let bounds = handshakes
            .buckets
            .iter()
            .map(|(bound, count)| (bound.to_string(), *count))
            .chain([("+Inf".to_owned(), handshakes.count)]);
        for (bound, count) in bounds {
            let mut with_bound = labels.to_vec();
            with_bound.push(("le", &bound));
            self.sample(&bucket, &with_bound, count);
        }
        self.sample(&format!("{name}_sum"), labels, handshakes.sum_seconds);
        self.sample(&format!("{name}_count"), labels, handshakes.count);
    }
}

fn write_label(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push_str("=\"");
    escape(out, value, true);
    out.push('"');
}

/// Escapes `\` and newlines (and `"` in label values), as the text format requires.
fn escape(out: &mut String, text: &str, quote: bool) {
    // A byte scan: the common case (nothing to escape) is a plain copy.
    if !text
        .bytes()
        .any(|byte| matches!(byte, b'\\' | b'\n' | b'"'))
    {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// The label values of a series in a capped family.
pub trait LabelSet {
    /// Writes `name="value",…` (without braces).
    fn write_labels(&self, out: &mut String);
}

/// `{namespace, workload, path}`: bytes of a workload (Deployment, DaemonSet, …) by path.
impl LabelSet for WorkloadSeries {
    fn write_labels(&self, out: &mut String) {
        write_label(out, "namespace", &self.namespace);
        out.push(',');
        write_label(out, "workload", &self.workload);
        out.push(',');
        write_label(out, "path", self.path.as_str());
    }
}

/// A counter family whose label values are not bounded by the taxonomy: it holds at most
/// `max_series` series, and an update that would create one more is refused and counted
/// (`tracer_series_overflow_total`), so memory and scrape size stay bounded whatever the
/// cluster runs. Cheap to clone (a shared handle).
pub struct CappedCounters<L> {
    inner: Arc<Mutex<Capped>>,
    labels: PhantomData<fn(&L)>,
}

impl<L> Clone for CappedCounters<L> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            labels: PhantomData,
        }
    }
}

struct Capped {
    /// Series keyed by their labels as the exposition writes them (escaped), in the order
    /// they were created: a render copies each line's labels as they are, walking memory in
    /// order rather than chasing label strings in hash order.
    series: IndexMap<Box<str>, u64>,
    max_series: usize,
    refused: u64,
    /// Where an update writes its labels to look them up.
    scratch: String,
}

impl<L: LabelSet> CappedCounters<L> {
    pub fn new(max_series: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Capped {
                series: IndexMap::new(),
                max_series,
                refused: 0,
                scratch: String::new(),
            })),
            labels: PhantomData,
        }
    }

    /// Adds `by` to the series `labels`; refused (and counted) when that series would be one
    /// more than the cap.
    pub fn add(&self, labels: &L, by: u64) {
        self.update(labels, |total| *total += by);
    }

    /// Sets the series `labels` to `total`, a count kept elsewhere that only grows; refused
    /// (and counted) like `add`.
    pub fn set(&self, labels: &L, total: u64) {
        self.update(labels, |value| *value = total);
    }

    fn update(&self, labels: &L, change: impl FnOnce(&mut u64)) {
        let mut guard = self.lock();
        let capped = &mut *guard;
        capped.scratch.clear();
        labels.write_labels(&mut capped.scratch);
        let has_room = capped.series.len() < capped.max_series;
        match capped.series.get_mut(capped.scratch.as_str()) {
            Some(value) => change(value),
            None if has_room => {
                let mut value = 0;
                change(&mut value);
                capped.series.insert(capped.scratch.as_str().into(), value);
            }
            None => capped.refused += 1,
        }
    }

    /// How many series the family holds.
    pub fn len(&self) -> usize {
        self.lock().series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Updates refused since the start because the family was full.
    pub fn refused(&self) -> u64 {
        self.lock().refused
    }

    fn lock(&self) -> MutexGuard<'_, Capped> {
        // A panic while holding the lock leaves counters that are still valid numbers.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Capped {
    /// HELP and TYPE, then one line per series; nothing while the family is empty.
    fn render(&self, out: &mut Exposition, name: &str, help: &str) {
        if self.series.is_empty() {
            return;
        }
        out.family(name, "counter", help);
        for (labels, total) in &self.series {
            let _ = writeln!(out.text, "{name}{{{labels}}} {total}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        pipeline::readiness::Problem,
        pipeline::snapshot::{Health, LATENCY_BUCKETS, LatencyHistogram},
        serve::api::{AttachedInterfaces, FlowTableStats, InterfaceStates, PathsResponse},
    };

    fn row(path: &str, endpoint: Option<&str>, nat: &str) -> PathRow {
        PathRow {
            path: path.into(),
            endpoint: endpoint.map(Into::into),
            nat: nat.into(),
            zone: None,
            forward_packets: 10,
            forward_bytes: 1000,
            reply_packets: 9,
            reply_bytes: 900,
            flows: 2,
            active_flows: 1,
            unanswered_syns: 1,
            resets: 0,
            handshakes: Histogram {
                count: 2,
                sum_seconds: 0.0005,
                buckets: LATENCY_BUCKETS
                    .iter()
                    .enumerate()
                    .map(|(index, bound)| (*bound, if index == 0 { 0 } else { 2 }))
                    .collect(),
            },
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            paths: PathsResponse {
                attached_interfaces: AttachedInterfaces { pod: 4, node: 2 },
                interfaces: InterfaceStates {
                    attached: 5,
                    blind: 1,
                    failed: 0,
                },
                flow_table: FlowTableStats {
                    entries: 3,
                    capacity: 65536,
                    evictions: 1,
                },
                paths: vec![
                    row("node_to_apiserver", Some("private"), "none"),
                    row("pod_to_external", None, "snat"),
                    row("pod_to_external", None, "none"),
                ],
                ..PathsResponse::default()
            },
            health: Health {
                problems: vec![Problem {
                    reason: Reason::VpcCidr,
                    message: "VPC CIDR unknown".into(),
                }],
                attach_times: {
                    let mut times = LatencyHistogram::default();
                    times.observe(Duration::from_millis(9));
                    times.observe(Duration::from_millis(30));
                    times.to_api()
                },
                ..Health::default()
            },
            ..Snapshot::default()
        }
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|value| value.parse().unwrap())
    }

    #[test]
    fn every_family_has_help_and_type_and_the_rows_their_series() {
        let text = Metrics::new(10).render(&snapshot());
        let series = |s| value(&text, s);
        assert_eq!(
            series(
                r#"tracer_path_bytes_total{path="pod_to_external",endpoint="",nat="snat",zone="",direction="reply"}"#
            ),
            Some(900.0)
        );
        assert_eq!(
            series(
                r#"tracer_path_flows_total{path="node_to_apiserver",endpoint="private",nat="none",zone=""}"#
            ),
            Some(2.0)
        );
        // Health is by path and endpoint: the two NAT rows of pod_to_external add up.
        assert_eq!(
            series(r#"tracer_path_unanswered_syn_total{path="pod_to_external",endpoint=""}"#),
            Some(2.0)
        );
        assert_eq!(
            series(
                r#"tracer_path_handshake_seconds_bucket{path="pod_to_external",endpoint="",le="0.0002"}"#
            ),
            Some(4.0)
        );
        assert_eq!(
            series(r#"tracer_path_handshake_seconds_count{path="pod_to_external",endpoint=""}"#),
            Some(4.0)
        );
        assert_eq!(series("tracer_flow_table_capacity"), Some(65536.0));
        assert_eq!(series(r#"tracer_interfaces{state="blind"}"#), Some(1.0));
        assert_eq!(series(r#"tracer_interfaces{state="failed"}"#), Some(0.0));
        // 9 ms is under the 12.8 ms bound, 30 ms is not.
        assert_eq!(
            series(r#"tracer_attach_duration_seconds_bucket{le="0.0128"}"#),
            Some(1.0)
        );
        assert_eq!(series("tracer_attach_duration_seconds_count"), Some(2.0));
        assert_eq!(series("tracer_attach_duration_seconds_sum"), Some(0.039));
        assert_eq!(series("tracer_ready"), Some(0.0));
        assert_eq!(
            series(r#"tracer_readiness_problems{reason="vpc_cidr"}"#),
            Some(1.0)
        );
        assert_eq!(series("tracer_series_overflow_total"), Some(0.0));
        assert!(series("process_resident_memory_bytes").unwrap() > 0.0);
        let mut typed = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = typed.last().expect("a sample before any TYPE");
                assert!(name.starts_with(family.as_str()), "{name} under {family}");
            }
        }
        let unique: std::collections::BTreeSet<_> = typed.iter().collect();
        assert_eq!(unique.len(), typed.len(), "a family declared twice");
        assert!(text.contains("# HELP tracer_path_packets_total "));
    }

    #[test]
    fn the_ena_allowances_of_a_reading_are_exported_and_nothing_without_ena() {
        use crate::aggregate::ena::{Allowance, EnaSeries};

        let without = Metrics::new(10).render(&snapshot());
        assert!(
            !without.contains("tracer_ena_"),
            "no ENA interface, no family"
        );
        let mut with_ena = snapshot();
        with_ena.ena = BTreeMap::from([
            (
                "eth0".to_owned(),
                EnaSeries {
                    exceeded: Allowance::ALL
                        .into_iter()
                        .zip([11, 12, 13, 14, 15])
                        .collect(),
                    conntrack_available: Some(27_000),
                },
            ),
            (
                "eth1".to_owned(),
                EnaSeries {
                    exceeded: BTreeMap::from([(Allowance::Linklocal, 3)]),
                    conntrack_available: None,
                },
            ),
        ]);
        let text = Metrics::new(10).render(&with_ena);
        let series = |s: &str| value(&text, s);
        for (allowance, expected) in [
            ("bw_in", 11.0),
            ("bw_out", 12.0),
            ("pps", 13.0),
            ("conntrack", 14.0),
            ("linklocal", 15.0),
        ] {
            assert_eq!(
                series(&format!(
                    r#"tracer_ena_allowance_exceeded_total{{interface="eth0",allowance="{allowance}"}}"#
                )),
                Some(expected),
                "{allowance}"
            );
        }
        assert_eq!(
            series(
                r#"tracer_ena_allowance_exceeded_total{interface="eth1",allowance="linklocal"}"#
            ),
            Some(3.0)
        );
        assert_eq!(
            series(r#"tracer_ena_conntrack_allowance_available{interface="eth0"}"#),
            Some(27_000.0)
        );
        assert_eq!(
            text.matches("tracer_ena_conntrack_allowance_available{")
                .count(),
            1,
            "eth1's driver reports no available count"
        );
        assert!(text.contains("# TYPE tracer_ena_allowance_exceeded_total counter\n"));
        assert!(text.contains("# TYPE tracer_ena_conntrack_allowance_available gauge\n"));
    }

    #[test]
    fn the_cap_refuses_new_series_and_counts_them() {
        let metrics = Metrics::new(2);
        let workload = |name: &str| WorkloadSeries {
            namespace: "shop".into(),
            workload: name.into(),
            path: crate::classify::Path::PodToExternal,
        };
        let family = metrics.workload_bytes();
        family.add(&workload("cart"), 10);
        family.add(&workload("web"), 5);
        family.add(&workload("ledger"), 7);
        family.add(&workload("cart"), 1);
        assert_eq!((family.len(), family.refused()), (2, 1));
        metrics.record_workloads(&[(workload("web"), 9), (workload("ledger"), 3)]);
        assert_eq!((family.len(), family.refused()), (2, 2));
        let text = metrics.render(&Snapshot::default());
        assert_eq!(
            value(
                &text,
                r#"tracer_workload_bytes_total{namespace="shop",workload="cart",path="pod_to_external"}"#
            ),
            Some(11.0)
        );
        // Totals kept elsewhere are set, not added.
        assert_eq!(
            value(
                &text,
                r#"tracer_workload_bytes_total{namespace="shop",workload="web",path="pod_to_external"}"#
            ),
            Some(9.0)
        );
        assert!(!text.contains("ledger"));
        assert_eq!(value(&text, "tracer_series_overflow_total"), Some(2.0));
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut out = String::new();
        write_label(&mut out, "workload", "a\"b\\c\nd");
        assert_eq!(out, r#"workload="a\"b\\c\nd""#);
        let mut help = String::new();
        escape(&mut help, "say \"hi\"\\", false);
        assert_eq!(help, r#"say "hi"\\"#);
    }
}
