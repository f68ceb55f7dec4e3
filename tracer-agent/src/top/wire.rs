//! TEMPORARY: the JSON API's bodies as the v1 contract describes them, until the agent's own
//! `api` module (which serves them) is merged; then `tracer top` uses those types and this file
//! goes.
use serde::{Deserialize, Serialize};

/// `GET /api/v1/paths`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathsResponse {
    pub node: Option<String>,
    pub version: String,
    pub time_unix_ms: u64,
    pub poll_interval_ms: u64,
    pub apiserver_endpoints: Vec<String>,
    pub attached_interfaces: AttachedInterfaces,
    pub flow_table: FlowTableStats,
    pub ready: bool,
    pub problems: Vec<String>,
    pub paths: Vec<PathRow>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AttachedInterfaces {
    pub pod: u64,
    pub node: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowTableStats {
    pub entries: u64,
    pub capacity: u64,
    pub evictions: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathRow {
    pub path: String,
    pub endpoint: Option<String>,
    pub nat: String,
    pub forward_packets: u64,
    pub forward_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub flows: u64,
    pub active_flows: u64,
    pub unanswered_syns: u64,
    pub resets: u64,
    pub handshakes: Handshakes,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Handshakes {
    pub count: u64,
    pub sum_seconds: f64,
    /// (upper bound in seconds, cumulative count), ascending; +Inf is `count`.
    pub buckets: Vec<(f64, u64)>,
}

/// `GET /api/v1/flows?limit=N`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowsResponse {
    pub time_unix_ms: u64,
    pub flows: Vec<FlowRow>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowRow {
    pub proto: String,
    pub initiator: String,
    pub responder: String,
    pub requested: Option<String>,
    pub path: String,
    pub endpoint: Option<String>,
    pub nat: String,
    pub forward_packets: u64,
    pub forward_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub handshake_seconds: Option<f64>,
    pub tcp_state: Option<String>,
    pub initiator_pod: Option<String>,
    pub responder_pod: Option<String>,
}
