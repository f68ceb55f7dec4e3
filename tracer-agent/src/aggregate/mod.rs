//! From the kernel's per-connection counters to per-path totals.
//!
//! Every poll reads the flow table; each connection is classified once, the first time it is
//! seen, and from then on only the growth of its counters is added to its path. NATed
//! connections appear twice in the flow table — before translation at the pod veth, after it at
//! the ENI — and conntrack says which entry is which: the translated one is an alias and is not
//! counted again. `ena` turns the ENA driver's allowance counts into exported totals.
pub mod conntrack;
pub mod ena;
pub mod workload;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use tracer_common::{FAMILY_IPV4, FlowKey, FlowStats, PROTO_TCP, TCP_ACK, TCP_RST, TCP_SYN};

use crate::{
    aggregate::workload::ConnectionBytes,
    classify::{Classification, Connection, Nat, classify},
    context::NodeContext,
};

/// A classified connection's counters, by direction relative to its initiator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    pub forward_packets: u64,
    pub forward_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub flows: u64,
    /// TCP connection attempts that got no SYN-ACK (nor RST) within the SYN timeout: what a
    /// security group or NACL that drops silently looks like.
    pub unanswered_syns: u64,
    /// TCP connections that saw a RST (a refused attempt, an aborted connection).
    pub resets: u64,
}

impl Totals {
    pub fn add(&mut self, other: &Self) {
        self.forward_packets += other.forward_packets;
        self.forward_bytes += other.forward_bytes;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
        self.flows += other.flows;
        self.unanswered_syns += other.unanswered_syns;
        self.resets += other.resets;
    }
}

/// What the aggregator remembers of a connection between polls.
struct Tracked {
    last: FlowStats,
    view: View,
    idle_polls: u32,
    handshake: Handshake,
    reset_counted: bool,
}

/// How a TCP connection's handshake ended, as far as the datapath saw it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Handshake {
    /// No SYN seen (not TCP, or under way before the agent started), or no answer yet.
    Open,
    Timed(std::time::Duration),
    /// Answered with a RST: not a silent drop.
    Refused,
    /// No SYN-ACK nor RST within the SYN timeout.
    Unanswered,
}

impl Tracked {
    /// Reports, once each, what the connection's TCP flags and SYN times say: a reset (added
    /// to `delta`), and how its handshake ended — timed (returned), refused with a RST, or
    /// unanswered past `syn_timeout_ns` (added to `delta`).
    fn tcp_health(
        &mut self,
        stats: &FlowStats,
        now_ns: u64,
        syn_timeout_ns: u64,
        delta: &mut Totals,
    ) -> Option<std::time::Duration> {
        let reset = stats.tcp_flags & (u32::from(TCP_RST) * 0x101) != 0;
        if reset && !self.reset_counted {
            self.reset_counted = true;
            delta.resets = 1;
        }
        if self.handshake != Handshake::Open || stats.syn_ns == 0 {
            return None;
        }
        if stats.synack_ns >= stats.syn_ns {
            let took = std::time::Duration::from_nanos(stats.synack_ns - stats.syn_ns);
            self.handshake = Handshake::Timed(took);
            return Some(took);
        }
        if reset {
            self.handshake = Handshake::Refused;
        } else if now_ns.saturating_sub(stats.syn_ns) > syn_timeout_ns {
            delta.unanswered_syns = 1;
            self.handshake = Handshake::Unanswered;
        }
        None
    }

    /// The state a listing shows: what went wrong first, else how far the handshake got.
    fn tcp_state(&self) -> TcpState {
        match self.handshake {
            _ if self.reset_counted => TcpState::Reset,
            Handshake::Unanswered => TcpState::Unanswered,
            Handshake::Open if self.last.syn_ns != 0 => TcpState::SynSent,
            _ => TcpState::Established,
        }
    }
}

/// A TCP connection's state as the flow listing shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// Handshake done, or under way before the agent started.
    Established,
    /// A SYN waiting for its SYN-ACK, within the SYN timeout.
    SynSent,
    Unanswered,
    Reset,
}

impl TcpState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::SynSent => "syn_sent",
            Self::Unanswered => "unanswered",
            Self::Reset => "reset",
        }
    }
}

#[derive(Clone)]
enum View {
    /// Not classified yet: waiting (one poll at most) for its conntrack entry.
    Pending { polls: u32 },
    Counted {
        classification: Classification,
        /// Index of the initiator → responder direction in the kernel's counters.
        forward_dir: usize,
        /// What the node's DNAT did, when it did (boxed: most connections have none).
        dnat: Option<Box<Dnat>>,
    },
    /// The post-NAT view of a connection already counted under its pre-NAT key.
    Alias,
}

/// A destination rewrite seen in conntrack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dnat {
    /// The address the initiator asked for (a ClusterIP, a NodePort).
    requested: SocketAddr,
    /// The backend the packets reached.
    responder: SocketAddr,
}

/// A classified connection in the flow table, as the flow listing shows it.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionView<'a> {
    pub proto: u8,
    pub initiator: SocketAddr,
    pub responder: SocketAddr,
    pub requested: Option<SocketAddr>,
    pub classification: Classification,
    /// Counters from the last poll, by direction relative to the initiator.
    pub forward: (u64, u64),
    pub reply: (u64, u64),
    pub handshake: Option<std::time::Duration>,
    /// None for protocols other than TCP.
    pub tcp_state: Option<TcpState>,
    pub key: &'a FlowKey,
}

impl ConnectionView<'_> {
    pub fn total_bytes(&self) -> u64 {
        self.forward.1 + self.reply.1
    }
}

/// The NAT facts conntrack holds about the connections awaiting classification, keyed like
/// the kernel's flow table. Only theirs are kept: a node's conntrack table can be far larger
/// than what one poll needs, and holding it whole made the agent's peak memory.
#[derive(Default)]
pub struct NatTable {
    /// Connections by their original (pre-NAT) tuple.
    original: HashMap<FlowKey, conntrack::Entry>,
    /// NATed connections by their translated (post-NAT) tuple.
    translated: HashMap<FlowKey, conntrack::Entry>,
}

impl NatTable {
    /// An empty table with room for the facts of `pending` connections (most have no NAT):
    /// sized at once, it is never rehashed, which holds two copies for a moment.
    pub fn for_pending(pending: &HashSet<&FlowKey>) -> Self {
        Self {
            original: HashMap::with_capacity(pending.len()),
            translated: HashMap::new(),
        }
    }

    /// Keeps `entry` under each of its views (pre-NAT, post-NAT) that is `pending`; drops it
    /// when it concerns none of them.
    pub fn add(&mut self, entry: conntrack::Entry, pending: &HashSet<&FlowKey>) {
        let original = key_of(&entry.original);
        if let Some(translated) = entry.translated().map(|tuple| key_of(&tuple))
            && pending.contains(&translated)
        {
            self.translated.insert(translated, entry);
        }
        if pending.contains(&original) {
            self.original.insert(original, entry);
        }
    }
}

fn key_of(tuple: &conntrack::Tuple) -> FlowKey {
    let (family, src) = addr_bytes(tuple.src);
    let (_, dst) = addr_bytes(tuple.dst);
    FlowKey::canonical(
        family,
        tuple.proto,
        (src, tuple.src_port),
        (dst, tuple.dst_port),
    )
    .0
}

fn addr_bytes(addr: IpAddr) -> (u8, [u8; 16]) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (FAMILY_IPV4, bytes)
        }
        IpAddr::V6(v6) => (tracer_common::FAMILY_IPV6, v6.octets()),
    }
}

/// The two ends of a flow key, in key order (lo, hi).
fn ends(key: &FlowKey) -> [SocketAddr; 2] {
    let addr = |bytes: &[u8; 16]| -> IpAddr {
        if key.family == FAMILY_IPV4 {
            Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
        } else {
            Ipv6Addr::from(*bytes).into()
        }
    };
    [
        SocketAddr::new(addr(&key.lo_addr), key.lo_port),
        SocketAddr::new(addr(&key.hi_addr), key.hi_port),
    ]
}

/// Which direction of the key goes from initiator to responder, from what the datapath saw
/// first: a SYN comes from the initiator, a SYN-ACK from the responder; for a connection
/// already under way (or without handshake), the first sender is taken as initiator unless it
/// used the lower port, the mark of a server.
fn forward_dir(key: &FlowKey, stats: &FlowStats) -> usize {
    let first = usize::from(stats.first_dir & 1);
    let flags = stats.first_tcp_flags & (TCP_SYN | TCP_ACK);
    if flags == TCP_SYN {
        return first;
    }
    if flags == TCP_SYN | TCP_ACK {
        return 1 - first;
    }
    let ports = [key.lo_port, key.hi_port];
    let (sender_port, receiver_port) = (ports[first], ports[1 - first]);
    if stats.first_tcp_flags != 0 && sender_port < receiver_port {
        1 - first
    } else {
        first
    }
}

/// What a successor needs of a connection to go on counting it (`restart`): its counters as
/// last read and what was already reported of its TCP health. Its classification is made
/// again, from the context and conntrack of then.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Carried {
    pub last: FlowStats,
    pub idle_polls: u32,
    pub handshake: Handshake,
    pub reset_counted: bool,
}

/// How long a connection may stay idle before its entry is removed from the kernel table.
pub const IDLE_POLLS_BEFORE_FORGET: u32 = 120;

/// Per-path totals, keyed by classification.
pub type PathTable = BTreeMap<Classification, Totals>;

pub struct Aggregator {
    tracked: HashMap<FlowKey, Tracked>,
    /// How long a SYN may wait for its SYN-ACK before the attempt counts as unanswered.
    syn_timeout_ns: u64,
    /// Whether `poll` lists each connection's new bytes (off unless asked: it allocates).
    report_connection_bytes: bool,
}

/// The default SYN timeout: Linux retransmits a SYN after 1 s and again after 3 s.
pub const DEFAULT_SYN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

impl Default for Aggregator {
    fn default() -> Self {
        Self::new(DEFAULT_SYN_TIMEOUT)
    }
}

/// What one poll produced.
#[derive(Default)]
pub struct PollResult {
    /// Growth of every path since the previous poll.
    pub deltas: PathTable,
    /// Idle connections whose kernel entries can be removed.
    pub idle: Vec<FlowKey>,
    /// SYN → SYN-ACK times of the handshakes completed since the previous poll.
    pub handshakes: Vec<(Classification, std::time::Duration)>,
    /// Kernel entries read for the first time (new connections, and connections evicted and
    /// created again in between): compared with the kernel's count of entries created, it
    /// tells the connections that came and went between two polls unread.
    pub new_entries: u64,
    /// Each connection's new bytes (both directions), when the aggregator was asked to
    /// report them (`report_connection_bytes`): what per-workload metrics are made of.
    pub connection_bytes: Vec<ConnectionBytes>,
    /// What the hooks saw this poll, for telling blind interfaces (`pipeline::blindness`).
    pub seen: PacketsSeen,
}

/// The packets the connections grew by in one poll, summed by the interface that owns each
/// (`owner_ifindex`) and by each of its ends' addresses: read from the flow table the poll
/// reads anyway, so knowing what each interface's hooks saw costs the datapath nothing.
#[derive(Debug, Default)]
pub struct PacketsSeen {
    pub by_owner: HashMap<u32, u64>,
    pub by_address: HashMap<IpAddr, u64>,
}

impl PacketsSeen {
    fn add(&mut self, key: &FlowKey, owner: u32, packets: u64) {
        *self.by_owner.entry(owner).or_default() += packets;
        let [lo, hi] = ends(key);
        *self.by_address.entry(lo.ip()).or_default() += packets;
        if hi.ip() != lo.ip() {
            *self.by_address.entry(hi.ip()).or_default() += packets;
        }
    }
}

/// Kernel entries created that the agent never read: connections that came and went (the LRU
/// table evicted them) between two polls, their counts and handshakes lost. With no ring
/// buffer, these are the events the agent loses (`tracer_events_lost_total`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Unread {
    read: u64,
    lost: u64,
}

impl Unread {
    /// `created` is the kernel's count of entries created, read before the flow table that
    /// `result` comes from: each of them was read by now, or is lost. Entries created after
    /// that count and already read make the difference an underestimate until the next poll,
    /// never an overestimate; the running maximum keeps it a counter.
    pub fn update(&mut self, created: u64, result: &PollResult) {
        self.read += result.new_entries;
        self.lost = self.lost.max(created.saturating_sub(self.read));
    }

    pub fn lost(&self) -> u64 {
        self.lost
    }
}

impl Aggregator {
    pub fn new(syn_timeout: std::time::Duration) -> Self {
        Self {
            tracked: HashMap::new(),
            syn_timeout_ns: syn_timeout.as_nanos() as u64,
            report_connection_bytes: false,
        }
    }

    /// Every connection as a successor needs it (see `Carried`).
    pub fn carried(&self) -> impl ExactSizeIterator<Item = (&FlowKey, Carried)> {
        self.tracked.iter().map(|(key, tracked)| {
            (
                key,
                Carried {
                    last: tracked.last,
                    idle_polls: tracked.idle_polls,
                    handshake: tracked.handshake,
                    reset_counted: tracked.reset_counted,
                },
            )
        })
    }

    /// Takes over a predecessor's connections: their next poll adds only what they grew since
    /// its last one, under a classification made again.
    pub fn carry_on(&mut self, connections: impl IntoIterator<Item = (FlowKey, Carried)>) {
        self.tracked
            .extend(connections.into_iter().map(|(key, carried)| {
                (
                    key,
                    Tracked {
                        last: carried.last,
                        view: View::Pending { polls: 0 },
                        idle_polls: carried.idle_polls,
                        handshake: carried.handshake,
                        reset_counted: carried.reset_counted,
                    },
                )
            }));
    }

    /// From now on, each poll also lists every connection's new bytes.
    pub fn report_connection_bytes(&mut self) {
        self.report_connection_bytes = true;
    }

    /// The connections in `flows` that still lack a classification: the caller gathers their
    /// conntrack entries ([`NatTable::add`]) before calling `poll`.
    pub fn pending<'a>(&self, flows: &'a [(FlowKey, FlowStats)]) -> HashSet<&'a FlowKey> {
        flows
            .iter()
            .map(|(key, _)| key)
            .filter(|key| {
                !matches!(
                    self.tracked.get(key).map(|tracked| &tracked.view),
                    Some(View::Counted { .. } | View::Alias)
                )
            })
            .collect()
    }

    /// The classified connections in the flow table as of the last poll (pending ones and
    /// post-NAT aliases are not connections of their own).
    pub fn connections(&self) -> impl Iterator<Item = ConnectionView<'_>> {
        self.tracked.iter().filter_map(|(key, tracked)| {
            let View::Counted {
                classification,
                forward_dir,
                dnat,
            } = &tracked.view
            else {
                return None;
            };
            let (fwd, rev) = (*forward_dir, 1 - forward_dir);
            let ends = ends(key);
            let stats = &tracked.last;
            let tcp = key.proto == PROTO_TCP;
            Some(ConnectionView {
                proto: key.proto,
                initiator: ends[fwd],
                responder: dnat.as_ref().map_or(ends[rev], |dnat| dnat.responder),
                requested: dnat.as_ref().map(|dnat| dnat.requested),
                classification: *classification,
                forward: (stats.packets[fwd], stats.bytes[fwd]),
                reply: (stats.packets[rev], stats.bytes[rev]),
                handshake: match tracked.handshake {
                    Handshake::Timed(took) => Some(took),
                    _ => None,
                },
                tcp_state: tcp.then(|| tracked.tcp_state()),
                key,
            })
        })
    }

    pub fn poll(
        &mut self,
        flows: &[(FlowKey, FlowStats)],
        context: &NodeContext,
        nat: &NatTable,
        now_ns: u64,
    ) -> PollResult {
        let mut result = PollResult::default();
        let present: HashSet<&FlowKey> = flows.iter().map(|(key, _)| key).collect();
        // At most this many are new: room for them at once rather than by doublings, each of
        // which holds the old and the new table for a moment.
        self.tracked
            .reserve(flows.len().saturating_sub(self.tracked.len()));
        for (key, stats) in flows {
            let mut new_entry = false;
            let tracked = self.tracked.entry(*key).or_insert_with(|| {
                new_entry = true;
                Tracked {
                    last: FlowStats::default(),
                    view: View::Pending { polls: 0 },
                    idle_polls: 0,
                    handshake: Handshake::Open,
                    reset_counted: false,
                }
            });
            // Counters that went down mean the entry was evicted and re-created in between.
            let restarted = stats.packets[0] < tracked.last.packets[0]
                || stats.packets[1] < tracked.last.packets[1];
            result.new_entries += u64::from(new_entry || restarted);
            let base = if restarted {
                FlowStats::default()
            } else {
                tracked.last
            };
            if let View::Pending { polls } = tracked.view {
                tracked.view = resolve(key, stats, context, nat, &present, polls);
            }
            let grew = stats.packets != base.packets;
            if grew {
                // A pending connection's growth is counted again at the poll that classifies it
                // (its `last` stays at its base): harmless, blindness only asks "any?".
                let packets = (stats.packets[0] + stats.packets[1])
                    .saturating_sub(base.packets[0] + base.packets[1]);
                result.seen.add(key, stats.owner_ifindex, packets);
            }
            tracked.idle_polls = if grew { 0 } else { tracked.idle_polls + 1 };
            if tracked.idle_polls >= IDLE_POLLS_BEFORE_FORGET {
                result.idle.push(*key);
            }
            if let View::Counted {
                classification,
                forward_dir,
                dnat,
            } = &tracked.view
            {
                let (classification, forward_dir) = (*classification, *forward_dir);
                let responder = dnat.as_ref().map(|dnat| dnat.responder);
                let (fwd, rev) = (forward_dir, 1 - forward_dir);
                let mut delta = Totals {
                    forward_packets: stats.packets[fwd] - base.packets[fwd],
                    forward_bytes: stats.bytes[fwd].saturating_sub(base.bytes[fwd]),
                    reply_packets: stats.packets[rev] - base.packets[rev],
                    reply_bytes: stats.bytes[rev].saturating_sub(base.bytes[rev]),
                    flows: u64::from(base.packets == [0, 0]),
                    ..Totals::default()
                };
                if key.proto == PROTO_TCP {
                    let handshake =
                        tracked.tcp_health(stats, now_ns, self.syn_timeout_ns, &mut delta);
                    if let Some(took) = handshake {
                        result.handshakes.push((classification, took));
                    }
                }
                let bytes = delta.forward_bytes + delta.reply_bytes;
                if self.report_connection_bytes && bytes > 0 {
                    let ends = ends(key);
                    result.connection_bytes.push(ConnectionBytes {
                        initiator: ends[fwd].ip(),
                        responder: responder.unwrap_or(ends[rev]).ip(),
                        path: classification.path,
                        bytes,
                    });
                }
                result.deltas.entry(classification).or_default().add(&delta);
            }
            // Pending connections keep `last` at its base so nothing is lost while they wait.
            if !matches!(tracked.view, View::Pending { .. }) {
                tracked.last = *stats;
            }
        }
        // Gone from the kernel table (evicted): a connection seen again starts from zero.
        self.tracked.retain(|key, _| present.contains(key));
        for key in &result.idle {
            self.tracked.remove(key);
        }
        result
    }
}

/// Classifies a connection seen for the first time, or decides it is a NAT alias.
fn resolve(
    key: &FlowKey,
    stats: &FlowStats,
    context: &NodeContext,
    nat: &NatTable,
    present: &HashSet<&FlowKey>,
    polls: u32,
) -> View {
    if let Some(entry) = nat.original.get(key) {
        return counted_from_conntrack(key, entry, &entry.original, context);
    }
    if let Some((entry, translated)) = nat
        .translated
        .get(key)
        .and_then(|entry| Some((entry, entry.translated()?)))
    {
        // Counted under the pre-NAT key when the datapath saw that one too (pod traffic, seen
        // at its veth). Traffic the node itself sends is NATed before any hook sees it: then
        // the translated view is the only one, and it is counted.
        if present.contains(&key_of(&entry.original)) {
            return View::Alias;
        }
        return counted_from_conntrack(key, entry, &translated, context);
    }
    // Conntrack may lag the datapath by a few microseconds, or not track this traffic at all:
    // give it one poll, then classify from what the datapath saw.
    if polls == 0 {
        return View::Pending { polls: 1 };
    }
    let forward_dir = forward_dir(key, stats);
    let ends = ends(key);
    let connection = Connection {
        initiator: ends[forward_dir],
        responder: ends[1 - forward_dir],
        nat: Nat::None,
        requested: None,
    };
    View::Counted {
        classification: classify(&connection, context),
        forward_dir,
        dnat: None,
    }
}

/// Conntrack knows the initiator for sure (its original direction) and what NAT did.
/// `seen_as` is the connection's tuple as the flow key holds it (original or translated),
/// in the original direction.
fn counted_from_conntrack(
    key: &FlowKey,
    entry: &conntrack::Entry,
    seen_as: &conntrack::Tuple,
    context: &NodeContext,
) -> View {
    let original = &entry.original;
    let requested = SocketAddr::new(original.dst, original.dst_port);
    let forward_dir = usize::from(ends(key)[0] != SocketAddr::new(seen_as.src, seen_as.src_port));
    let translated = entry.translated().unwrap_or(*original);
    let responder = SocketAddr::new(translated.dst, translated.dst_port);
    // A new source port alone (SNAT --random-fully of the node's own traffic) is not SNAT in
    // the taxonomy's sense: the address the world sees is unchanged.
    let nat = if responder != requested {
        Nat::Dnat
    } else if translated.src != original.src {
        Nat::Snat
    } else {
        Nat::None
    };
    let connection = Connection {
        initiator: SocketAddr::new(original.src, original.src_port),
        responder,
        nat,
        requested: (nat == Nat::Dnat).then_some(requested),
    };
    View::Counted {
        classification: classify(&connection, context),
        forward_dir,
        dnat: connection.requested.map(|requested| {
            Box::new(Dnat {
                requested,
                responder,
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Path;

    fn tuple(src: &str, dst: &str) -> conntrack::Tuple {
        let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        conntrack::Tuple {
            src: src.ip(),
            dst: dst.ip(),
            proto: PROTO_TCP,
            src_port: src.port(),
            dst_port: dst.port(),
        }
    }

    /// The key and this direction's index of a packet `src → dst`.
    fn key(src: &str, dst: &str) -> (FlowKey, usize) {
        let t = tuple(src, dst);
        let (family, src_bytes) = addr_bytes(t.src);
        FlowKey::canonical(
            family,
            PROTO_TCP,
            (src_bytes, t.src_port),
            (addr_bytes(t.dst).1, t.dst_port),
        )
    }

    /// Stats of a connection whose initiator sent `forward` bytes (one packet per 1000 bytes)
    /// and got `reply` bytes back, first seen as a SYN from the initiator.
    fn stats(forward_dir: usize, forward: u64, reply: u64) -> FlowStats {
        let mut stats = FlowStats {
            first_dir: forward_dir as u8,
            first_tcp_flags: TCP_SYN,
            ..FlowStats::default()
        };
        stats.bytes[forward_dir] = forward;
        stats.bytes[1 - forward_dir] = reply;
        stats.packets[forward_dir] = forward / 1000;
        stats.packets[1 - forward_dir] = reply / 1000;
        stats
    }

    /// The NAT facts a new aggregator gathers from `entries` for its first poll of `flows`.
    fn nat(flows: &[(FlowKey, FlowStats)], entries: &[conntrack::Entry]) -> NatTable {
        let pending = Aggregator::default().pending(flows);
        let mut table = NatTable::for_pending(&pending);
        for entry in entries {
            table.add(*entry, &pending);
        }
        table
    }

    /// A pod's connection to a ClusterIP DNATed to a backend on another node: its pre-NAT view
    /// at the pod veth, its post-NAT view at the ENI, and conntrack's entry.
    fn service_dnat_to_backend() -> ([(FlowKey, FlowStats); 2], NatTable) {
        let entry = conntrack::Entry {
            original: tuple("10.0.1.101:40000", "10.100.20.20:80"),
            reply: tuple("10.0.2.101:8080", "10.0.1.101:40000"),
        };
        let (pod_view, pod_dir) = key("10.0.1.101:40000", "10.100.20.20:80");
        let (eni_view, eni_dir) = key("10.0.1.101:40000", "10.0.2.101:8080");
        let flows = [
            (pod_view, stats(pod_dir, 9_000, 3_000)),
            (eni_view, stats(eni_dir, 9_000, 3_000)),
        ];
        let nat = nat(&flows, &[entry]);
        (flows, nat)
    }

    fn context() -> NodeContext {
        NodeContext {
            vpc_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
            node_ips: ["10.0.1.10".parse().unwrap()].into(),
            local_pods: ["10.0.1.101".parse().unwrap()].into(),
            ..NodeContext::default()
        }
    }

    fn totals(forward_bytes: u64, reply_bytes: u64, flows: u64) -> Totals {
        Totals {
            forward_packets: forward_bytes / 1000,
            forward_bytes,
            reply_packets: reply_bytes / 1000,
            reply_bytes,
            flows,
            ..Totals::default()
        }
    }

    #[test]
    fn snat_is_counted_once_under_the_pod_and_labelled_snat() {
        let entry = conntrack::Entry {
            original: tuple("10.0.1.101:40000", "192.0.2.80:80"),
            reply: tuple("192.0.2.80:80", "10.0.1.10:61000"),
        };
        let (pod_view, pod_dir) = key("10.0.1.101:40000", "192.0.2.80:80");
        let (eni_view, eni_dir) = key("10.0.1.10:61000", "192.0.2.80:80");
        let flows = [
            (pod_view, stats(pod_dir, 50_000, 2_000)),
            (eni_view, stats(eni_dir, 50_000, 2_000)),
        ];
        let mut aggregator = Aggregator::default();
        let result = aggregator.poll(&flows, &context(), &nat(&flows, &[entry]), 0);
        let expected = Classification {
            path: Path::PodToExternal,
            endpoint: None,
            nat: Nat::Snat,
            zone: None,
        };
        assert_eq!(result.deltas, [(expected, totals(50_000, 2_000, 1))].into());
    }

    #[test]
    fn only_the_conntrack_entries_of_pending_connections_are_kept() {
        let snat = conntrack::Entry {
            original: tuple("10.0.1.101:40000", "192.0.2.80:80"),
            reply: tuple("192.0.2.80:80", "10.0.1.10:61000"),
        };
        let node_own = conntrack::Entry {
            original: tuple("10.0.1.10:40001", "192.0.2.80:9000"),
            reply: tuple("192.0.2.80:9000", "10.0.1.10:61001"),
        };
        let elsewhere = conntrack::Entry {
            original: tuple("10.0.1.101:40002", "10.0.2.101:8080"),
            reply: tuple("10.0.2.101:8080", "10.0.1.101:40002"),
        };
        let (pod_view, pod_dir) = key("10.0.1.101:40000", "192.0.2.80:80");
        let (eni_view, eni_dir) = key("10.0.1.10:61000", "192.0.2.80:80");
        let (node_view, node_dir) = key("10.0.1.10:61001", "192.0.2.80:9000");
        let flows = [
            (pod_view, stats(pod_dir, 5_000, 1_000)),
            (eni_view, stats(eni_dir, 5_000, 1_000)),
            (node_view, stats(node_dir, 7_000, 1_000)),
        ];
        let table = nat(&flows, &[snat, node_own, elsewhere]);
        assert_eq!(
            table.original.keys().collect::<HashSet<_>>(),
            [&pod_view].into(),
            "the connection no flow is seen for is dropped"
        );
        assert_eq!(table.translated.get(&eni_view), Some(&snat));
        assert_eq!(table.translated.get(&node_view), Some(&node_own));
        assert_eq!(table.translated.len(), 2);

        // Classified (or found to be an alias), a connection no longer waits for conntrack.
        let mut aggregator = Aggregator::default();
        aggregator.poll(&flows, &context(), &table, 0);
        let (new_view, new_dir) = key("10.0.1.101:40003", "10.0.2.101:8080");
        let mut next = flows.to_vec();
        next.push((new_view, stats(new_dir, 1_000, 0)));
        assert_eq!(aggregator.pending(&next), [&new_view].into());
    }

    #[test]
    fn the_nodes_own_traffic_seen_only_after_a_port_rewrite_is_counted_without_snat() {
        // `--random-fully` gives the node's connection a new source port before any hook.
        let entry = conntrack::Entry {
            original: tuple("10.0.1.10:40000", "192.0.2.80:9000"),
            reply: tuple("192.0.2.80:9000", "10.0.1.10:61000"),
        };
        let (eni_view, eni_dir) = key("10.0.1.10:61000", "192.0.2.80:9000");
        let flows = [(eni_view, stats(eni_dir, 30_000, 1_000))];
        let result = Aggregator::default().poll(&flows, &context(), &nat(&flows, &[entry]), 0);
        let expected = Classification {
            path: Path::NodeToExternal,
            endpoint: None,
            nat: Nat::None,
            zone: None,
        };
        assert_eq!(result.deltas, [(expected, totals(30_000, 1_000, 1))].into());
    }

    #[test]
    fn dnat_is_classified_by_its_backend() {
        let (flows, nat) = service_dnat_to_backend();
        let result = Aggregator::default().poll(&flows, &context(), &nat, 0);
        let expected = Classification {
            path: Path::PodToService,
            endpoint: None,
            nat: Nat::Dnat,
            zone: None,
        };
        assert_eq!(result.deltas, [(expected, totals(9_000, 3_000, 1))].into());
    }

    #[test]
    fn the_listing_shows_the_backend_and_the_address_asked_for_once() {
        let (flows, nat) = service_dnat_to_backend();
        let mut aggregator = Aggregator::default();
        aggregator.poll(&flows, &context(), &nat, 0);
        let listed: Vec<ConnectionView<'_>> = aggregator.connections().collect();
        assert_eq!(
            listed.len(),
            1,
            "the post-NAT alias is not a connection of its own"
        );
        let connection = listed[0];
        assert_eq!(connection.initiator, "10.0.1.101:40000".parse().unwrap());
        assert_eq!(connection.responder, "10.0.2.101:8080".parse().unwrap());
        assert_eq!(
            connection.requested,
            Some("10.100.20.20:80".parse().unwrap())
        );
        assert_eq!(
            (connection.forward, connection.reply),
            ((9, 9_000), (3, 3_000))
        );
        assert_eq!(connection.tcp_state, Some(TcpState::Established));
        assert_eq!(connection.classification.nat, Nat::Dnat);
    }

    #[test]
    fn a_pending_connection_is_not_listed_yet() {
        let (view, dir) = key("10.0.1.101:40000", "10.0.2.101:8080");
        let mut aggregator = Aggregator::default();
        let none = NatTable::default();
        let first = aggregator.poll(&[(view, stats(dir, 4_000, 0))], &context(), &none, 0);
        assert_eq!(first.new_entries, 1);
        assert_eq!(aggregator.connections().count(), 0);
        let second = aggregator.poll(&[(view, stats(dir, 5_000, 0))], &context(), &none, 0);
        assert_eq!(second.new_entries, 0);
        let listed: Vec<ConnectionView<'_>> = aggregator.connections().collect();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].initiator, "10.0.1.101:40000".parse().unwrap());
        assert_eq!(listed[0].requested, None);
    }

    #[test]
    fn tcp_states_follow_the_handshake() {
        let state = |stats_of: &dyn Fn(&mut FlowStats), now_ns: u64| {
            let (view, dir) = key("10.0.1.101:40000", "10.0.2.101:9999");
            let mut flow = stats(dir, 60, 0);
            stats_of(&mut flow);
            let mut aggregator = Aggregator::new(std::time::Duration::from_secs(3));
            let none = NatTable::default();
            aggregator.poll(&[(view, flow)], &context(), &none, now_ns);
            aggregator.poll(&[(view, flow)], &context(), &none, now_ns);
            let connection = aggregator.connections().next().expect("listed");
            (connection.tcp_state, connection.handshake)
        };
        let syn_only = |flow: &mut FlowStats| flow.syn_ns = 10 * SECOND;
        assert_eq!(
            state(&syn_only, 11 * SECOND),
            (Some(TcpState::SynSent), None)
        );
        assert_eq!(
            state(&syn_only, 14 * SECOND),
            (Some(TcpState::Unanswered), None)
        );
        let refused = |flow: &mut FlowStats| {
            flow.syn_ns = 10 * SECOND;
            flow.tcp_flags = u32::from(TCP_SYN) | (u32::from(TCP_RST | TCP_ACK) << 8);
        };
        assert_eq!(state(&refused, 11 * SECOND), (Some(TcpState::Reset), None));
        let timed = |flow: &mut FlowStats| {
            flow.syn_ns = 10 * SECOND;
            flow.synack_ns = 10 * SECOND + 300_000;
        };
        assert_eq!(
            state(&timed, 11 * SECOND),
            (
                Some(TcpState::Established),
                Some(std::time::Duration::from_micros(300))
            )
        );
    }

    #[test]
    fn without_conntrack_a_connection_waits_one_poll_and_loses_nothing() {
        let (view, dir) = key("10.0.1.101:40000", "10.0.2.101:8080");
        let mut aggregator = Aggregator::default();
        let none = NatTable::default();
        let first = aggregator.poll(&[(view, stats(dir, 4_000, 1_000))], &context(), &none, 0);
        assert!(
            first.deltas.is_empty(),
            "classified before conntrack had its chance"
        );
        let second = aggregator.poll(&[(view, stats(dir, 6_000, 2_000))], &context(), &none, 0);
        let expected = Classification {
            path: Path::PodToPodRemote,
            endpoint: None,
            nat: Nat::None,
            zone: None,
        };
        assert_eq!(second.deltas, [(expected, totals(6_000, 2_000, 1))].into());
        let third = aggregator.poll(&[(view, stats(dir, 9_000, 2_000))], &context(), &none, 0);
        assert_eq!(third.deltas, [(expected, totals(3_000, 0, 0))].into());
    }

    #[test]
    fn an_evicted_connection_recreated_starts_from_zero() {
        let (view, dir) = key("10.0.1.101:40000", "10.0.2.101:8080");
        let mut aggregator = Aggregator::default();
        let none = NatTable::default();
        aggregator.poll(&[(view, stats(dir, 4_000, 0))], &context(), &none, 0);
        aggregator.poll(&[(view, stats(dir, 8_000, 0))], &context(), &none, 0);
        aggregator.poll(&[], &context(), &none, 0);
        aggregator.poll(&[(view, stats(dir, 2_000, 0))], &context(), &none, 0);
        let back = aggregator.poll(&[(view, stats(dir, 3_000, 0))], &context(), &none, 0);
        assert_eq!(
            back.deltas.values().map(|t| t.forward_bytes).sum::<u64>(),
            3_000
        );
    }

    #[test]
    fn a_syn_ack_seen_first_makes_its_receiver_the_initiator() {
        let (view, server_dir) = key("10.0.2.101:8080", "10.0.1.101:40000");
        let mut first = stats(1 - server_dir, 5_000, 1_000);
        first.first_dir = server_dir as u8;
        first.first_tcp_flags = TCP_SYN | TCP_ACK;
        assert_eq!(forward_dir(&view, &first), 1 - server_dir);
        // Mid-stream: the sender of the first packet used the lower port, so it is the server.
        first.first_tcp_flags = TCP_ACK;
        assert_eq!(forward_dir(&view, &first), 1 - server_dir);
    }

    #[test]
    fn entries_created_and_never_read_are_lost_once() {
        let read = |new_entries| PollResult {
            new_entries,
            ..PollResult::default()
        };
        let mut unread = Unread::default();
        let mut lost_after = |created, new_entries| {
            unread.update(created, &read(new_entries));
            unread.lost()
        };
        assert_eq!(lost_after(10, 10), 0);
        // Of 5 entries counted, 3 are read and 2 came and went; one created just after the
        // count is read too, hiding one loss until the next count includes it.
        assert_eq!(lost_after(15, 4), 1);
        assert_eq!(lost_after(16, 0), 2);
        assert_eq!(lost_after(20, 4), 2);
        // Again one read before it is counted: the difference dips, the counter does not.
        assert_eq!(lost_after(21, 2), 2);
    }

    #[test]
    fn idle_connections_are_handed_back_for_removal() {
        let (view, dir) = key("10.0.1.101:40000", "10.0.2.101:8080");
        let mut aggregator = Aggregator::default();
        let none = NatTable::default();
        let flows = [(view, stats(dir, 4_000, 0))];
        let mut idle = Vec::new();
        for _ in 0..=IDLE_POLLS_BEFORE_FORGET + 1 {
            idle = aggregator.poll(&flows, &context(), &none, 0).idle;
            if !idle.is_empty() {
                break;
            }
        }
        assert_eq!(idle, vec![view]);
    }

    fn health(stats_of: impl Fn(&mut FlowStats), now_ns: u64) -> (Totals, usize) {
        let (view, dir) = key("10.0.1.101:40000", "10.0.2.101:9999");
        let mut flow = stats(dir, 60, 0);
        stats_of(&mut flow);
        let mut aggregator = Aggregator::new(std::time::Duration::from_secs(3));
        let none = NatTable::default();
        aggregator.poll(&[(view, flow)], &context(), &none, now_ns);
        let result = aggregator.poll(&[(view, flow)], &context(), &none, now_ns);
        let totals = result.deltas.values().copied().next().unwrap_or_default();
        (totals, result.handshakes.len())
    }

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_handshake_is_timed_once() {
        let (view, dir) = key("10.0.1.101:40000", "10.0.2.101:8080");
        let mut flow = stats(dir, 60, 60);
        flow.syn_ns = 10 * SECOND;
        flow.synack_ns = 10 * SECOND + 250_000;
        let mut aggregator = Aggregator::default();
        let none = NatTable::default();
        aggregator.poll(&[(view, flow)], &context(), &none, 11 * SECOND);
        let first = aggregator.poll(&[(view, flow)], &context(), &none, 11 * SECOND);
        assert_eq!(first.handshakes.len(), 1);
        assert_eq!(first.handshakes[0].1, std::time::Duration::from_micros(250));
        let again = aggregator.poll(&[(view, flow)], &context(), &none, 12 * SECOND);
        assert!(again.handshakes.is_empty(), "a handshake is reported once");
    }

    #[test]
    fn a_syn_without_answer_is_unanswered_only_after_the_timeout() {
        let syn_only = |flow: &mut FlowStats| flow.syn_ns = 10 * SECOND;
        assert_eq!(health(syn_only, 12 * SECOND).0.unanswered_syns, 0);
        assert_eq!(health(syn_only, 14 * SECOND).0.unanswered_syns, 1);
    }

    #[test]
    fn a_refused_attempt_is_a_reset_not_an_unanswered_syn() {
        let refused = |flow: &mut FlowStats| {
            flow.syn_ns = 10 * SECOND;
            flow.tcp_flags = u32::from(TCP_SYN) | (u32::from(TCP_RST | TCP_ACK) << 8);
        };
        let (totals, handshakes) = health(refused, 20 * SECOND);
        assert_eq!(
            (totals.resets, totals.unanswered_syns, handshakes),
            (1, 0, 0)
        );
    }
}
