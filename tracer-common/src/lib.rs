//! Types shared by the kernel programs (`tracer-ebpf`) and the agent (`tracer-agent`).
//!
//! Every type here is `#[repr(C)]` with explicit padding so that both sides agree on the
//! layout byte for byte: the kernel writes these into BPF maps, user space reads them back.
#![cfg_attr(not(feature = "test-support"), no_std)]

#[cfg(feature = "test-support")]
pub mod test_support;

#[cfg(feature = "labels")]
pub mod labels;

/// Name of the flow table map: `FlowKey` → `FlowStats`.
pub const FLOWS_MAP: &str = "FLOWS";
/// Name of the fragment map: `FragmentKey` → `FragmentPorts`.
pub const FRAGMENTS_MAP: &str = "FRAGMENTS";
/// Name of the per-CPU datapath counter array, indexed by `DatapathCounter`.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Default capacity of the flow table (entries); `tracer agent --flow-table-size` overrides it.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 65_536;
/// Capacity of the fragment map: only in-flight fragmented datagrams live there.
pub const FRAGMENT_TABLE_SIZE: u32 = 4_096;

/// Names of the programs in the object file.
pub const PROGRAM_INGRESS: &str = "tracer_ingress";
pub const PROGRAM_EGRESS: &str = "tracer_egress";
/// An empty classifier with the same hand-off verdict: the baseline of `cargo xtask bench datapath`.
pub const PROGRAM_BASELINE: &str = "tracer_baseline";

/// `TC_ACT_UNSPEC` / `TCX_NEXT`: "no opinion, run the next program". The tracer never returns
/// anything else, so it cannot drop, redirect or cut short another program's verdict.
pub const TC_NEXT: i32 = -1;

/// IP address family of a flow.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol numbers the datapath understands beyond "some protocol".
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// TCP flag bits as they appear in the 13th byte of the TCP header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A connection, independent of the direction of the packet that carried it.
///
/// The two endpoints are stored in a canonical order (`lo` ≤ `hi`, comparing address then
/// port), so both directions of a connection share one entry. IPv4 addresses occupy the first
/// four bytes of the address fields, the rest is zero. Ports are in host byte order; for ICMP
/// echo both ports hold the echo identifier, for other ICMP messages and port-less protocols
/// they are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub lo_addr: [u8; 16],
    pub hi_addr: [u8; 16],
    pub lo_port: u16,
    pub hi_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Index into the per-direction arrays of `FlowStats`.
pub const DIR_LO_TO_HI: usize = 0;
pub const DIR_HI_TO_LO: usize = 1;

impl FlowKey {
    /// The key of the connection a packet `src → dst` belongs to, and the packet's direction
    /// in it (`DIR_*`). The kernel keys packets with it and user space keys conntrack tuples
    /// with it, so both sides always agree on the order of the endpoints.
    #[inline(always)]
    pub fn canonical(
        family: u8,
        proto: u8,
        src: ([u8; 16], u16),
        dst: ([u8; 16], u16),
    ) -> (Self, usize) {
        let (lo, hi, dir) = if endpoint_order(&src) <= endpoint_order(&dst) {
            (src, dst, DIR_LO_TO_HI)
        } else {
            (dst, src, DIR_HI_TO_LO)
        };
        let key = Self {
            lo_addr: lo.0,
            hi_addr: hi.0,
            lo_port: lo.1,
            hi_port: hi.1,
            proto,
            family,
            _pad: [0; 2],
        };
        (key, dir)
    }
}

/// A total order on endpoints that is cheap in BPF: two 64-bit words, then the port.
#[inline(always)]
fn endpoint_order((addr, port): &([u8; 16], u16)) -> (u64, u64, u16) {
    let mut high = [0u8; 8];
    let mut low = [0u8; 8];
    high.copy_from_slice(&addr[..8]);
    low.copy_from_slice(&addr[8..]);
    (u64::from_be_bytes(high), u64::from_be_bytes(low), *port)
}

/// Counters of one connection, updated in place with atomic adds.
///
/// Only the hook that saw the connection first (`owner_ifindex`) updates it, so a packet that
/// crosses a pod veth and a node ENI is counted once per node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Packets per direction (`DIR_LO_TO_HI`, `DIR_HI_TO_LO`); a GSO packet counts its segments.
    pub packets: [u64; 2],
    /// L3 bytes (IP header included) per direction, as they would be on the wire.
    pub bytes: [u64; 2],
    /// `bpf_ktime_get_ns()` of the first SYN (without ACK), 0 if none was seen.
    pub syn_ns: u64,
    /// `bpf_ktime_get_ns()` of the first SYN-ACK, 0 if none was seen.
    pub synack_ns: u64,
    /// Interface that counts this connection: the first hook that saw it.
    pub owner_ifindex: u32,
    /// TCP flags seen: bits 0–7 for `DIR_LO_TO_HI`, bits 8–15 for `DIR_HI_TO_LO`.
    pub tcp_flags: u32,
    /// `Hook` of the first packet at the owner interface.
    pub first_hook: u8,
    /// Direction (`DIR_*`) of the first packet seen.
    pub first_dir: u8,
    /// TCP flags of the first packet seen (0 for other protocols): tells a SYN from a
    /// connection already under way when the agent started.
    pub first_tcp_flags: u8,
    pub _pad: [u8; 5],
}

/// Where on an interface a program runs.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Packets the interface receives (for a pod's host-side veth: packets the pod sends).
    Ingress = 0,
    /// Packets the interface transmits (for a pod's host-side veth: packets to the pod).
    Egress = 1,
}

/// Identifies the datagram a non-first IP fragment belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// IPv4 identification or IPv6 fragment identification.
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Ports of a fragmented datagram, learnt from its first fragment (host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    pub src_port: u16,
    pub dst_port: u16,
}

/// Per-CPU counters of what the datapath did with the packets it saw.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatapathCounter {
    /// Every packet the programs ran on. Not written by the kernel (one map update less per
    /// packet): every packet ends in exactly one of the outcomes below but `FlowsCreated`, so
    /// user space sums them.
    Seen = 0,
    /// Packets added to a flow (at the flow's owner interface).
    Counted = 1,
    /// Packets of a known flow seen again at another interface: counted there, skipped here.
    Duplicate = 2,
    /// Not IPv4 or IPv6 (ARP, LLDP, …).
    NotIp = 3,
    /// Too short for the headers or the length they announce (or announcing a length too short
    /// for their own headers), or with headers the parser does not walk (an IPv6 extension
    /// chain longer than six): never attributed to a flow.
    Truncated = 4,
    /// Non-first fragments whose first fragment was not seen: not attributed to a flow.
    FragmentUnmatched = 5,
    /// New flows that could not be inserted into the flow table.
    InsertFailed = 6,
    /// New flows inserted.
    FlowsCreated = 7,
}

impl DatapathCounter {
    pub const COUNT: u32 = 8;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::Seen,
        Self::Counted,
        Self::Duplicate,
        Self::NotIp,
        Self::Truncated,
        Self::FragmentUnmatched,
        Self::InsertFailed,
        Self::FlowsCreated,
    ];

    /// True for the counters that say what became of a packet: each packet ends in exactly one.
    pub const fn is_outcome(self) -> bool {
        !matches!(self, Self::Seen | Self::FlowsCreated)
    }

    /// The `outcome` label value used in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Seen => "seen",
            Self::Counted => "counted",
            Self::Duplicate => "duplicate",
            Self::NotIp => "not_ip",
            Self::Truncated => "truncated",
            Self::FragmentUnmatched => "fragment_unmatched",
            Self::InsertFailed => "insert_failed",
            Self::FlowsCreated => "flows_created",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `repr(C)`, `Copy`, made only of integers and byte arrays, with
    // explicit padding fields: every bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentPorts {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowStats>(), 64);
        assert_eq!(size_of::<FragmentKey>(), 40);
        assert_eq!(size_of::<FragmentPorts>(), 4);
    }
}
