//! The Prometheus endpoint (DESIGN §5): path counters, agent health, build info.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};
use tracer_common::DatapathCounter;

use crate::{aggregate::PathTable, classify::Classification, discovery::InterfaceKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    path: &'static str,
    endpoint: &'static str,
    nat: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    path: &'static str,
    endpoint: &'static str,
    nat: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    path: &'static str,
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// What keeps the agent from being ready, as a bounded label value: every reason is exported,
/// 0 or 1, so that an alert can name it and a dashboard can show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Starting,
    Interfaces,
    VpcCidr,
    ApiServer,
    Contradiction,
    Conntrack,
    FlowTable,
}

impl Reason {
    const ALL: [Reason; 7] = [
        Reason::Starting,
        Reason::Interfaces,
        Reason::VpcCidr,
        Reason::ApiServer,
        Reason::Contradiction,
        Reason::Conntrack,
        Reason::FlowTable,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Starting => "starting",
            Reason::Interfaces => "interfaces",
            Reason::VpcCidr => "vpc_cidr",
            Reason::ApiServer => "apiserver_endpoint",
            Reason::Contradiction => "contradiction",
            Reason::Conntrack => "conntrack",
            Reason::FlowTable => "flow_table",
        }
    }
}

/// A reason the agent is not ready, with the sentence that tells an operator what to do.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub reason: Reason,
    pub message: String,
}

/// Every metric the agent exports; cheap to clone (the families are shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    packets: Family<PacketLabels, Counter>,
    bytes: Family<PacketLabels, Counter>,
    flows: Family<FlowLabels, Counter>,
    handshakes: Family<HealthLabels, Histogram>,
    unanswered_syns: Family<HealthLabels, Counter>,
    resets: Family<HealthLabels, Counter>,
    attached: Family<KindLabels, Gauge>,
    flow_table_entries: Gauge,
    evictions: Counter,
    datapath_packets: Family<OutcomeLabels, Counter>,
    ready: Gauge,
    problems: Family<ReasonLabels, Gauge>,
    /// Last value read from each per-CPU datapath counter, to turn totals into increments.
    datapath_last: Arc<[AtomicU64; DatapathCounter::COUNT as usize]>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tracer");
        let packets = Family::<PacketLabels, Counter>::default();
        let bytes = Family::<PacketLabels, Counter>::default();
        let flows = Family::<FlowLabels, Counter>::default();
        // 100 µs (same node) to ~13 s (SYN retransmitted): doubling buckets.
        let handshakes = Family::<HealthLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0001, 2.0, 18))) as fn() -> Histogram,
        );
        let unanswered_syns = Family::<HealthLabels, Counter>::default();
        let resets = Family::<HealthLabels, Counter>::default();
        let attached = Family::<KindLabels, Gauge>::default();
        let flow_table_entries = Gauge::default();
        let evictions = Counter::default();
        let datapath_packets = Family::<OutcomeLabels, Counter>::default();
        let ready = Gauge::default();
        let problems = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "path_packets",
            "Packets by path of the EKS taxonomy, counted once per node",
            packets.clone(),
        );
        registry.register(
            "path_bytes",
            "L3 bytes (IP header included) by path, counted once per node",
            bytes.clone(),
        );
        registry.register(
            "path_flows",
            "Connections seen to start, by path",
            flows.clone(),
        );
        registry.register(
            "path_handshake_seconds",
            "TCP SYN to SYN-ACK time seen at the node, by path",
            handshakes.clone(),
        );
        registry.register(
            "path_unanswered_syn",
            "TCP connection attempts with no SYN-ACK within the SYN timeout (silent drops)",
            unanswered_syns.clone(),
        );
        registry.register(
            "path_resets",
            "TCP connections that saw a RST (refused or aborted)",
            resets.clone(),
        );
        registry.register(
            "attached_interfaces",
            "Interfaces the datapath is attached to, by kind (pod veth or node ENI)",
            attached.clone(),
        );
        registry.register(
            "flow_table_entries",
            "Connections in the kernel flow table",
            flow_table_entries.clone(),
        );
        registry.register(
            "flow_table_evictions",
            "Connections the kernel flow table evicted before the agent read them out",
            evictions.clone(),
        );
        registry.register(
            "datapath_packets",
            "What the datapath did with the packets it saw (counted, duplicate, truncated, …)",
            datapath_packets.clone(),
        );
        registry.register(
            "ready",
            "1 when the agent has every fact it needs to classify (what /readyz answers 200 to), else 0",
            ready.clone(),
        );
        registry.register(
            "readiness_problems",
            "Problems keeping the agent from being ready, by reason (details in /readyz and the log)",
            problems.clone(),
        );
        registry.register(
            "build",
            "Build information of the running agent",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Metrics {
            registry: Arc::new(registry),
            packets,
            bytes,
            flows,
            handshakes,
            unanswered_syns,
            resets,
            attached,
            flow_table_entries,
            evictions,
            datapath_packets,
            ready,
            problems,
            datapath_last: Arc::new(std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }

    /// Adds one poll's growth of every path.
    pub fn record_paths(&self, deltas: &PathTable) {
        for (classification, totals) in deltas {
            let labels = |direction| packet_labels(classification, direction);
            let forward = labels("forward");
            let reply = labels("reply");
            self.packets
                .get_or_create(&forward)
                .inc_by(totals.forward_packets);
            self.bytes
                .get_or_create(&forward)
                .inc_by(totals.forward_bytes);
            self.packets
                .get_or_create(&reply)
                .inc_by(totals.reply_packets);
            self.bytes.get_or_create(&reply).inc_by(totals.reply_bytes);
            let flow_labels = FlowLabels {
                path: forward.path,
                endpoint: forward.endpoint,
                nat: forward.nat,
            };
            self.flows.get_or_create(&flow_labels).inc_by(totals.flows);
            let health = health_labels(classification);
            self.unanswered_syns
                .get_or_create(&health)
                .inc_by(totals.unanswered_syns);
            self.resets.get_or_create(&health).inc_by(totals.resets);
        }
    }

    /// Adds the handshakes completed since the previous poll to the histogram.
    pub fn record_handshakes(&self, handshakes: &[(Classification, std::time::Duration)]) {
        for (classification, took) in handshakes {
            self.handshakes
                .get_or_create(&health_labels(classification))
                .observe(took.as_secs_f64());
        }
    }

    pub fn set_attached(&self, kind: InterfaceKind, count: usize) {
        self.attached
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .set(count as i64);
    }

    pub fn set_flow_table(&self, entries: usize, evicted: u64) {
        self.flow_table_entries.set(entries as i64);
        self.evictions.inc_by(evicted);
    }

    /// Publishes the datapath's own counters (totals since load).
    pub fn record_datapath(&self, totals: &[u64; DatapathCounter::COUNT as usize]) {
        for counter in DatapathCounter::ALL {
            let index = counter as usize;
            let previous = self.datapath_last[index].swap(totals[index], Ordering::Relaxed);
            self.datapath_packets
                .get_or_create(&OutcomeLabels {
                    outcome: counter.name(),
                })
                .inc_by(totals[index].saturating_sub(previous));
        }
    }

    pub fn record_readiness(&self, problems: &[Problem]) {
        self.ready.set(i64::from(problems.is_empty()));
        for reason in Reason::ALL {
            let count = problems.iter().filter(|p| p.reason == reason).count();
            self.problems
                .get_or_create(&ReasonLabels {
                    reason: reason.as_str(),
                })
                .set(count as i64);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn packet_labels(classification: &Classification, direction: &'static str) -> PacketLabels {
    PacketLabels {
        path: classification.path.as_str(),
        endpoint: classification
            .endpoint
            .map_or("", |endpoint| endpoint.as_str()),
        nat: classification.nat.as_str(),
        direction,
    }
}

fn health_labels(classification: &Classification) -> HealthLabels {
    HealthLabels {
        path: classification.path.as_str(),
        endpoint: classification
            .endpoint
            .map_or("", |endpoint| endpoint.as_str()),
    }
}

/// Why the agent is not ready yet; empty when it is.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<Vec<String>>>);

impl Readiness {
    pub fn set(&self, problems: &[Problem]) {
        if let Ok(mut current) = self.0.lock() {
            *current = problems.iter().map(|p| p.message.clone()).collect();
        }
    }

    fn problems(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|problems| problems.clone())
            .unwrap_or_default()
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    readiness: Readiness,
}

/// The HTTP routes: `/metrics`, `/healthz`, `/readyz`.
pub fn router(metrics: Metrics, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz_handler))
        .with_state(AppState { metrics, readiness })
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn readyz_handler(State(state): State<AppState>) -> impl IntoResponse {
    let problems = state.readiness.problems();
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n- {}\n", problems.join("\n- ")),
        )
    }
}
