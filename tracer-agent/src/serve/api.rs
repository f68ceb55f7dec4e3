//! The JSON API (v1): the bodies of `GET /api/v1/paths` and `GET /api/v1/flows?limit=N`.
//!
//! One definition for both sides: the agent serializes these, `tracer top` (and any client
//! in Rust) deserializes them. Field names are the contract (`docs/api.md`); counters are
//! cumulative since the agent started, so clients compute rates by differencing two readings.
use serde::{Deserialize, Serialize};

pub const PATHS: &str = "/api/v1/paths";
pub const FLOWS: &str = "/api/v1/flows";
/// Flows listed when `limit` is not given.
pub const DEFAULT_FLOWS_LIMIT: usize = 20;
/// The largest `limit` accepted; also how many flows each snapshot keeps ready.
pub const MAX_FLOWS_LIMIT: usize = 1000;

/// `GET /api/v1/paths`: the per-path table and the agent's state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathsResponse {
    /// `--node-name` / `NODE_NAME`.
    pub node: Option<String>,
    pub version: String,
    /// When this snapshot was taken (the end of the last poll).
    pub time_unix_ms: u64,
    pub poll_interval_ms: u64,
    /// Endpoint kinds (`public`, `private`) of the API server addresses known now; sorted,
    /// unique.
    pub apiserver_endpoints: Vec<String>,
    pub attached_interfaces: AttachedInterfaces,
    /// The traced interfaces by state (`tracer_interfaces{state}`).
    #[serde(default)]
    pub interfaces: InterfaceStates,
    /// Attached interfaces whose traffic the tracer counted nowhere over the last poll, sorted
    /// (`/readyz` names them too; they do not make the agent unready).
    #[serde(default)]
    pub blind_interfaces: Vec<String>,
    pub flow_table: FlowTableStats,
    /// What `/readyz` says: ready, or the problems in the way.
    pub ready: bool,
    pub problems: Vec<String>,
    /// One row per (path, endpoint, nat) seen since the start, sorted by them.
    pub paths: Vec<PathRow>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AttachedInterfaces {
    pub pod: u64,
    pub node: u64,
}

/// Every interface matching `--pod-iface` or `--node-iface` is in exactly one state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStates {
    /// Attached, and the tracer counts their traffic.
    pub attached: u64,
    /// Attached, but their traffic went uncounted over the last poll: a program ahead of the
    /// tracer's hides it.
    pub blind: u64,
    /// The attach failed (`/readyz` says why).
    pub failed: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowTableStats {
    pub entries: u64,
    pub capacity: u64,
    /// Connections the kernel table evicted to make room for new ones (cumulative), whether a
    /// poll had read them or not.
    pub evictions: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathRow {
    pub path: String,
    /// `public` or `private` on API server paths, else null.
    pub endpoint: Option<String>,
    pub nat: String,
    /// `same_zone` or `cross_zone` for connections with another host of the VPC, when the
    /// Kubernetes context knows the nodes' zones; else null.
    #[serde(default)]
    pub zone: Option<String>,
    pub forward_packets: u64,
    pub forward_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Connections seen to start (`tracer_path_flows_total`).
    pub flows: u64,
    /// Connections of this row in the flow table now.
    pub active_flows: u64,
    pub unanswered_syns: u64,
    pub resets: u64,
    pub handshakes: Histogram,
}

/// A latency histogram: a path's TCP SYN → SYN-ACK times (`tracer_path_handshake_seconds`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub count: u64,
    pub sum_seconds: f64,
    /// (upper bound in seconds, cumulative count), ascending; +Inf is `count`.
    pub buckets: Vec<(f64, u64)>,
}

/// `GET /api/v1/flows?limit=N`: the largest connections in the flow table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowsResponse {
    pub time_unix_ms: u64,
    /// Largest (forward + reply bytes) first. Connections still awaiting classification
    /// (one poll at most) and post-NAT views of NATed connections are not listed.
    pub flows: Vec<FlowRow>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowRow {
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
    pub proto: String,
    /// `10.0.1.101:43210`, `[fd00::1]:443`.
    pub initiator: String,
    /// The responder the packets reached, after any DNAT on this node.
    pub responder: String,
    /// The address the initiator asked for, when DNAT rewrote it.
    pub requested: Option<String>,
    pub path: String,
    pub endpoint: Option<String>,
    pub nat: String,
    pub forward_packets: u64,
    pub forward_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// SYN → SYN-ACK, when both were seen.
    pub handshake_seconds: Option<f64>,
    /// `established`, `unanswered`, `reset` or `syn_sent`; null for other protocols.
    pub tcp_state: Option<String>,
    /// `namespace/name`, once the Kubernetes context exists (issue 6); null until then.
    pub initiator_pod: Option<String>,
    pub responder_pod: Option<String>,
}

/// The body of a 400 answer: `{"error": "..."}`, naming the parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}
