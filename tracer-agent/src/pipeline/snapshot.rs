//! What the exporters show, built once per poll: every path's totals since the start, the
//! largest connections, the agent's health. `/metrics`, the JSON API and `tracer top` all read
//! the same `Snapshot`; a request only serializes it.
use std::{
    cmp::{Ordering, Reverse},
    collections::{BTreeMap, BinaryHeap, HashMap},
    net::IpAddr,
    time::Duration,
};

use tracer_common::{DatapathCounter, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use crate::{
    aggregate::ena::EnaSeries,
    aggregate::workload::WorkloadSeries,
    aggregate::{ConnectionView, PollResult, Totals},
    classify::Classification,
    context::kubernetes::PodRef,
    pipeline::readiness::Problem,
    serve::api::{self, FlowRow, FlowsResponse, PathRow, PathsResponse},
};

/// How many latency buckets there are.
pub const LATENCY_BUCKET_COUNT: usize = 21;

/// Upper bounds (seconds) of the latency buckets: 12.5 µs (a pod on the same node answers a
/// SYN within tens of µs) to ~13 s (a SYN retransmitted), doubling.
/// `tracer_path_handshake_seconds`, `tracer_attach_duration_seconds` and the JSON API share
/// them.
pub const LATENCY_BUCKETS: [f64; LATENCY_BUCKET_COUNT] = {
    let mut bounds = [0.0; LATENCY_BUCKET_COUNT];
    let mut bound = 0.0000125;
    let mut index = 0;
    while index < LATENCY_BUCKET_COUNT {
        bounds[index] = bound;
        bound *= 2.0;
        index += 1;
    }
    bounds
};

/// Latencies (a path's handshake times, the agent's attach times): counts per bucket (not
/// cumulative), their number and sum.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencyHistogram {
    /// Observations per bucket; those above the last bound are only in `count`.
    in_bucket: [u64; LATENCY_BUCKET_COUNT],
    count: u64,
    /// In whole nanoseconds: an integer sum is exact, whatever the order of its terms, and
    /// survives being saved for a successor (`restart`) bit for bit.
    sum_nanos: u64,
}

impl LatencyHistogram {
    pub fn observe(&mut self, took: Duration) {
        let seconds = took.as_secs_f64();
        if let Some(bucket) = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.in_bucket[bucket] += 1;
        }
        self.count += 1;
        self.sum_nanos += took.as_nanos() as u64;
    }

    /// Cumulative counts per upper bound, as Prometheus histograms have them.
    pub fn to_api(&self) -> api::Histogram {
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(self.in_bucket)
            .map(|(bound, count)| {
                cumulative += count;
                (*bound, cumulative)
            })
            .collect();
        api::Histogram {
            count: self.count,
            sum_seconds: self.sum_nanos as f64 / 1e9,
            buckets,
        }
    }
}

/// What a path accumulated since the agent started.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct PathHistory {
    totals: Totals,
    handshakes: LatencyHistogram,
}

/// Every path's history: the sum of the aggregator's per-poll growth. Saved for a successor
/// as a list of pairs (a JSON map needs string keys).
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct History(
    #[serde(with = "crate::pipeline::restart::pairs")] BTreeMap<Classification, PathHistory>,
);

impl History {
    pub fn record(&mut self, result: &PollResult) {
        for (classification, delta) in &result.deltas {
            self.0.entry(*classification).or_default().totals.add(delta);
        }
        for (classification, took) in &result.handshakes {
            self.0
                .entry(*classification)
                .or_default()
                .handshakes
                .observe(*took);
        }
    }

    /// One row per classification seen, sorted by path, endpoint, nat and zone as they are spelt,
    /// with its connections in the flow table now.
    pub fn rows<'a>(&self, connections: impl Iterator<Item = ConnectionView<'a>>) -> Vec<PathRow> {
        let mut active: BTreeMap<Classification, u64> = BTreeMap::new();
        for connection in connections {
            *active.entry(connection.classification).or_default() += 1;
        }
        let mut rows: Vec<PathRow> = self
            .0
            .iter()
            .map(|(classification, history)| {
                let totals = &history.totals;
                PathRow {
                    path: classification.path.as_str().to_owned(),
                    endpoint: classification.endpoint.map(|e| e.as_str().to_owned()),
                    nat: classification.nat.as_str().to_owned(),
                    zone: classification.zone.map(|z| z.as_str().to_owned()),
                    forward_packets: totals.forward_packets,
                    forward_bytes: totals.forward_bytes,
                    reply_packets: totals.reply_packets,
                    reply_bytes: totals.reply_bytes,
                    flows: totals.flows,
                    active_flows: active.get(classification).copied().unwrap_or(0),
                    unanswered_syns: totals.unanswered_syns,
                    resets: totals.resets,
                    handshakes: history.handshakes.to_api(),
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            (&a.path, &a.endpoint, &a.nat, &a.zone).cmp(&(&b.path, &b.endpoint, &b.nat, &b.zone))
        });
        rows
    }
}

/// The agent's own state beyond the JSON API's: what `/metrics` adds.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// The datapath's counters (totals since load), indexed by `DatapathCounter`.
    pub datapath: [u64; DatapathCounter::COUNT as usize],
    /// Connections the datapath recorded that the agent never read (`tracer_events_lost_total`).
    pub events_lost: u64,
    /// Why the agent is not ready, with reasons (`paths.problems` has the messages).
    pub problems: Vec<Problem>,
    /// How long attaching to each new interface took (`tracer_attach_duration_seconds`).
    pub attach_times: api::Histogram,
    /// Times the agent moved its clsact filter back in front of another program's
    /// (`tracer_attach_reorders_total`).
    pub attach_reorders: u64,
}

/// One poll's view of everything, shared read-only with the exporters.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The body of `GET /api/v1/paths`.
    pub paths: PathsResponse,
    /// The largest connections in the flow table, at most `api::MAX_FLOWS_LIMIT`, largest
    /// first: `GET /api/v1/flows` serves the first `limit`.
    pub largest_flows: Vec<FlowRow>,
    pub health: Health,
    /// Bytes by workload and path since the start (`--workload-metrics`), capped to the top K
    /// plus one `_other` series per path.
    pub workloads: Vec<(WorkloadSeries, u64)>,
    /// The VPC allowances of the node's ENA interfaces, by interface name.
    pub ena: BTreeMap<String, EnaSeries>,
}

impl Snapshot {
    /// The body of `GET /api/v1/flows?limit=N`.
    pub fn flows(&self, limit: usize) -> FlowsResponse {
        FlowsResponse {
            time_unix_ms: self.paths.time_unix_ms,
            flows: self.largest_flows.iter().take(limit).cloned().collect(),
        }
    }
}

/// The `count` largest connections (forward + reply bytes), largest first, as listed rows,
/// with the names of the pods at their ends that `pods` knows. Keeps `count` of them at a time
/// whatever the table holds: no sort of every connection.
pub fn top_flows<'a>(
    connections: impl Iterator<Item = ConnectionView<'a>>,
    count: usize,
    pods: &HashMap<IpAddr, PodRef>,
) -> Vec<FlowRow> {
    largest(connections.map(BySize), count)
        .into_iter()
        .map(|BySize(connection)| flow_row(&connection, pods))
        .collect()
}

/// Orders connections by size, then by key (smaller first) so that equal sizes list stably.
struct BySize<'a>(ConnectionView<'a>);

impl Ord for BySize<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .total_bytes()
            .cmp(&other.0.total_bytes())
            .then_with(|| other.0.key.cmp(self.0.key))
    }
}

impl PartialOrd for BySize<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for BySize<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for BySize<'_> {}

/// The `count` greatest items, greatest first, holding at most `count` of them at a time (a
/// min-heap of the best so far): O(n log count) time, O(count) memory.
fn largest<T: Ord>(items: impl Iterator<Item = T>, count: usize) -> Vec<T> {
    if count == 0 {
        return Vec::new();
    }
    let mut best: BinaryHeap<Reverse<T>> = BinaryHeap::with_capacity(count + 1);
    for item in items {
        if best.len() < count {
            best.push(Reverse(item));
        } else if let Some(mut smallest) = best.peek_mut()
            && item > smallest.0
        {
            *smallest = Reverse(item);
        }
    }
    // Ascending order of `Reverse` is descending order of the items.
    best.into_sorted_vec()
        .into_iter()
        .map(|Reverse(item)| item)
        .collect()
}

fn flow_row(connection: &ConnectionView<'_>, pods: &HashMap<IpAddr, PodRef>) -> FlowRow {
    let pod = |end: std::net::SocketAddr| pods.get(&end.ip()).map(ToString::to_string);
    let classification = connection.classification;
    FlowRow {
        proto: proto_name(connection.proto),
        initiator: connection.initiator.to_string(),
        responder: connection.responder.to_string(),
        requested: connection.requested.map(|addr| addr.to_string()),
        path: classification.path.as_str().to_owned(),
        endpoint: classification.endpoint.map(|e| e.as_str().to_owned()),
        nat: classification.nat.as_str().to_owned(),
        forward_packets: connection.forward.0,
        forward_bytes: connection.forward.1,
        reply_packets: connection.reply.0,
        reply_bytes: connection.reply.1,
        handshake_seconds: connection.handshake.map(|took| took.as_secs_f64()),
        tcp_state: connection.tcp_state.map(|state| state.as_str().to_owned()),
        initiator_pod: pod(connection.initiator),
        responder_pod: pod(connection.responder),
    }
}

fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".to_owned(),
        PROTO_UDP => "udp".to_owned(),
        PROTO_ICMP => "icmp".to_owned(),
        PROTO_ICMPV6 => "icmpv6".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Endpoint, Nat, Path};

    #[test]
    fn largest_keeps_the_greatest_in_order() {
        let items = [5, 1, 9, 3, 9, 7, 2, 8];
        assert_eq!(largest(items.into_iter(), 3), vec![9, 9, 8]);
        assert_eq!(largest(items.into_iter(), 0), Vec::<i32>::new());
        assert_eq!(
            largest(items.into_iter(), 100),
            vec![9, 9, 8, 7, 5, 3, 2, 1]
        );
        assert_eq!(largest(std::iter::empty::<i32>(), 5), Vec::<i32>::new());
    }

    #[test]
    fn largest_matches_a_full_sort_on_many_items() {
        // A deterministic scramble of 0..10_000 with many ties.
        let items: Vec<u64> = (0..10_000u64).map(|i| (i * 7919) % 1_000).collect();
        let mut sorted = items.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        for count in [1, 20, 1000] {
            assert_eq!(largest(items.iter().copied(), count), sorted[..count]);
        }
    }

    #[test]
    fn top_flows_lists_the_largest_connections_first_as_rows() {
        use crate::aggregate::{Aggregator, NatTable};
        use tracer_common::{FAMILY_IPV4, FlowKey, FlowStats, TCP_SYN};
        let context = crate::context::NodeContext {
            vpc_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
            local_pods: ["10.0.1.101".parse().unwrap()].into(),
            ..Default::default()
        };
        // 50 connections from a local pod, connection i sending 1000 × (i * 37 % 50) bytes.
        let flows: Vec<(FlowKey, FlowStats)> = (0..50u16)
            .map(|i| {
                let mut pod = [0u8; 16];
                pod[..4].copy_from_slice(&[10, 0, 1, 101]);
                let mut remote = [0u8; 16];
                remote[..4].copy_from_slice(&[10, 0, 2, 7]);
                let (key, dir) =
                    FlowKey::canonical(FAMILY_IPV4, PROTO_TCP, (pod, 40_000 + i), (remote, 8080));
                let mut stats = FlowStats {
                    first_dir: dir as u8,
                    first_tcp_flags: TCP_SYN,
                    ..FlowStats::default()
                };
                stats.packets[dir] = 1;
                stats.bytes[dir] = 1_000 * u64::from(i * 37 % 50);
                (key, stats)
            })
            .collect();
        let mut aggregator = Aggregator::default();
        let none = NatTable::default();
        aggregator.poll(&flows, &context, &none, 0);
        aggregator.poll(&flows, &context, &none, 0);
        let rows = top_flows(aggregator.connections(), 5, &HashMap::new());
        let sizes: Vec<u64> = rows
            .iter()
            .map(|row| row.forward_bytes + row.reply_bytes)
            .collect();
        assert_eq!(sizes, [49_000, 48_000, 47_000, 46_000, 45_000]);
        let first = &rows[0];
        // 37 × i ≡ 49 (mod 50) for i = 27.
        assert_eq!(first.initiator, "10.0.1.101:40027");
        assert_eq!(first.responder, "10.0.2.7:8080");
        assert_eq!(
            (first.proto.as_str(), first.path.as_str()),
            ("tcp", "pod_to_pod_remote")
        );
        assert_eq!(
            (first.nat.as_str(), first.endpoint.as_deref()),
            ("none", None)
        );
        assert_eq!(first.tcp_state.as_deref(), Some("established"));
        assert_eq!(
            (first.requested.as_deref(), first.handshake_seconds),
            (None, None)
        );
        // The Kubernetes context names the pods at either end it knows.
        let pods: HashMap<IpAddr, PodRef> = [(
            "10.0.1.101".parse().unwrap(),
            PodRef {
                namespace: "shop".into(),
                name: "cart-7d9f".into(),
                workload: crate::context::kubernetes::Workload {
                    kind: "Deployment".into(),
                    name: "cart".into(),
                },
            },
        )]
        .into();
        let named = &top_flows(aggregator.connections(), 1, &pods)[0];
        assert_eq!(
            (
                named.initiator_pod.as_deref(),
                named.responder_pod.as_deref()
            ),
            (Some("shop/cart-7d9f"), None)
        );
        assert_eq!(
            top_flows(aggregator.connections(), 1000, &HashMap::new()).len(),
            50
        );
        let snapshot = Snapshot {
            largest_flows: rows,
            ..Snapshot::default()
        };
        assert_eq!(snapshot.flows(2).flows.len(), 2);
        assert_eq!(snapshot.flows(20).flows.len(), 5);
        let active = History::default().rows(aggregator.connections());
        assert!(
            active.is_empty(),
            "rows come from the history, not the table"
        );
    }

    #[test]
    fn handshake_buckets_double_from_12_5_microseconds() {
        assert_eq!(LATENCY_BUCKETS[0], 0.0000125);
        assert_eq!(LATENCY_BUCKETS[1], 0.0000125 * 2.0);
        assert_eq!(LATENCY_BUCKETS[20], 0.0000125 * f64::from(1 << 20));
    }

    #[test]
    fn histograms_are_cumulative_and_count_what_no_bucket_holds() {
        let mut histogram = LatencyHistogram::default();
        for micros in [50, 150, 150, 1_000_000, 60_000_000] {
            histogram.observe(Duration::from_micros(micros));
        }
        let api = histogram.to_api();
        assert_eq!(api.count, 5);
        assert!(
            (api.sum_seconds - 61.00035).abs() < 1e-9,
            "{}",
            api.sum_seconds
        );
        // 50 µs is the third bound (12.5, 25, 50 µs); 150 µs falls in the 200 µs bucket.
        assert_eq!(api.buckets[1], (0.0000125 * 2.0, 0));
        assert_eq!(api.buckets[2], (0.0000125 * 4.0, 1));
        assert_eq!(api.buckets[4], (0.0000125 * 16.0, 3));
        // 1 s falls in the 1.6384 s bucket; 60 s in none (only +Inf, i.e. `count`).
        let one_second = api.buckets.iter().find(|(bound, _)| *bound >= 1.0).unwrap();
        assert_eq!(one_second, &(0.0000125 * f64::from(1 << 17), 4));
        assert_eq!(api.buckets.last().unwrap().1, 4);
    }

    #[test]
    fn history_sums_polls_and_rows_come_sorted_with_active_counts() {
        let api_server = Classification {
            path: Path::PodToApiserver,
            endpoint: Some(Endpoint::Private),
            nat: Nat::Dnat,
            zone: None,
        };
        let local = Classification {
            path: Path::PodToPodLocal,
            endpoint: None,
            nat: Nat::None,
            zone: None,
        };
        let poll = |bytes: u64| PollResult {
            deltas: [
                (
                    local,
                    Totals {
                        forward_bytes: bytes,
                        flows: 1,
                        ..Totals::default()
                    },
                ),
                (
                    api_server,
                    Totals {
                        reply_bytes: 2 * bytes,
                        resets: 1,
                        ..Totals::default()
                    },
                ),
            ]
            .into(),
            handshakes: vec![(local, Duration::from_micros(150))],
            ..PollResult::default()
        };
        let mut history = History::default();
        history.record(&poll(100));
        history.record(&poll(50));
        let rows = history.rows(std::iter::empty());
        let names: Vec<&str> = rows.iter().map(|row| row.path.as_str()).collect();
        assert_eq!(names, ["pod_to_apiserver", "pod_to_pod_local"]);
        let (api_server, local) = (&rows[0], &rows[1]);
        assert_eq!(
            (local.forward_bytes, local.flows, local.handshakes.count),
            (150, 2, 2)
        );
        assert_eq!((api_server.reply_bytes, api_server.resets), (300, 2));
        assert_eq!(api_server.endpoint.as_deref(), Some("private"));
        assert_eq!(api_server.nat, "dnat");
        assert_eq!(local.active_flows, 0);
    }
}
