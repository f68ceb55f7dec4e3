//! Header parsing: Ethernet (with up to two 802.1Q/802.1ad tags), IPv4 (with options and
//! fragments), IPv6 (with extension headers and fragments), TCP, UDP, ICMP, ICMPv6.
//!
//! Reads are direct packet accesses, bounds-checked against `data_end`, when the header lies in
//! the linear part of the buffer (almost always), and `bpf_skb_load_bytes` otherwise, so
//! non-linear packets parse too. A truncated packet is an error, never a read past its end.
//! A packet either yields its connection or is not attributed at all: there is no guess.

use aya_ebpf::{maps::LruHashMap, programs::TcContext};
use tracer_common::{
    FAMILY_IPV4, FAMILY_IPV6, FlowKey, FragmentKey, FragmentPorts, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
/// Q-in-Q is the most a node sees (branch ENIs add one tag); more is not parsed.
const MAX_VLAN_TAGS: usize = 2;
/// Longest IPv6 extension-header chain walked; real traffic has zero or one.
const MAX_IPV6_EXT_HEADERS: usize = 6;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

pub(crate) enum ParseError {
    NotIp,
    Truncated,
    FragmentUnmatched,
}

/// What the datapath needs of one packet.
pub(crate) struct Packet {
    pub family: u8,
    pub proto: u8,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    /// Wire packets this buffer stands for (GSO/GRO aggregates count their segments).
    pub segments: u64,
    /// L3 bytes of all those wire packets, headers included.
    pub l3_bytes: u64,
}

impl Packet {
    /// The connection key (endpoints in canonical order) and this packet's direction in it.
    #[inline(always)]
    pub(crate) fn flow_key(&self) -> (FlowKey, usize) {
        FlowKey::canonical(
            self.family,
            self.proto,
            (self.src_addr, self.src_port),
            (self.dst_addr, self.dst_port),
        )
    }
}

/// Headers further into the packet than this are read with the helper only: a small constant
/// bound keeps the verifier's range tracking of direct accesses simple.
const MAX_DIRECT_OFFSET: usize = 512;

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, ParseError> {
    let start = ctx.data();
    if offset <= MAX_DIRECT_OFFSET && start + offset + size_of::<T>() <= ctx.data_end() {
        // SAFETY: the whole `T` lies before data_end, checked just above.
        return Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    ctx.load::<T>(offset).map_err(|_| ParseError::Truncated)
}

/// Fails unless the packet holds `len` bytes from `offset`: for headers whose variable part
/// (IPv4 options, TCP options) is not read but must be there.
#[inline(always)]
fn require(ctx: &TcContext, offset: usize, len: usize) -> Result<(), ParseError> {
    if offset + len <= ctx.len() as usize {
        Ok(())
    } else {
        Err(ParseError::Truncated)
    }
}

#[inline(always)]
fn load_be16(ctx: &TcContext, offset: usize) -> Result<u16, ParseError> {
    load::<[u8; 2]>(ctx, offset).map(u16::from_be_bytes)
}

/// Where the L3 header starts and which protocol it is, after any VLAN tags.
#[inline(always)]
fn ethernet(ctx: &TcContext) -> Result<(usize, u16), ParseError> {
    let mut offset = ETH_HLEN;
    let mut ethertype = load_be16(ctx, offset - 2)?;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = load_be16(ctx, offset + 2)?;
        offset += VLAN_HLEN;
    }
    Ok((offset, ethertype))
}

/// L3 facts shared by both IP versions.
struct Network {
    family: u8,
    proto: u8,
    src_addr: [u8; 16],
    dst_addr: [u8; 16],
    /// Start of the L4 header (or of the fragment payload).
    l4_offset: usize,
    /// IP header(s) length, repeated in every segment of a GSO packet.
    header_len: usize,
    /// L3 length this buffer carries according to the IP header (0: unknown, use skb->len).
    l3_len: usize,
    fragment: Fragment,
}

enum Fragment {
    None,
    First { id: u32 },
    Later { id: u32, last: bool },
}

#[inline(always)]
pub(crate) fn packet(
    ctx: &TcContext,
    fragments: &LruHashMap<FragmentKey, FragmentPorts>,
) -> Result<Packet, ParseError> {
    let (l3_offset, ethertype) = ethernet(ctx)?;
    let net = match ethertype {
        ETH_P_IP => ipv4(ctx, l3_offset)?,
        ETH_P_IPV6 => ipv6(ctx, l3_offset)?,
        _ => return Err(ParseError::NotIp),
    };
    // A datagram longer than the buffer was cut on the way (or lies about its length): the
    // stack drops it, and its announced length would count bytes that never came.
    let skb_l3_len = (ctx.len() as usize).saturating_sub(l3_offset);
    if net.l3_len > skb_l3_len {
        return Err(ParseError::Truncated);
    }
    let transport = match net.fragment {
        Fragment::Later { id, last } => {
            let key = fragment_key(&net, id);
            // SAFETY: the value is copied out at once.
            let ports = unsafe { fragments.get(key) }
                .copied()
                .ok_or(ParseError::FragmentUnmatched)?;
            if last {
                let _ = fragments.remove(key);
            }
            Transport {
                src_port: ports.src_port,
                dst_port: ports.dst_port,
                tcp_flags: 0,
                header_len: 0,
            }
        }
        Fragment::First { id } => {
            let transport = transport(ctx, net.proto, net.l4_offset)?;
            let ports = FragmentPorts {
                src_port: transport.src_port,
                dst_port: transport.dst_port,
            };
            // Best effort: if the map refuses, later fragments are reported unmatched.
            let _ = fragments.insert(fragment_key(&net, id), ports, 0);
            transport
        }
        Fragment::None => transport(ctx, net.proto, net.l4_offset)?,
    };
    // Headers past the datagram's announced end are not part of it: the stack drops it too.
    if net.l3_len != 0 && net.l4_offset + transport.header_len > l3_offset + net.l3_len {
        return Err(ParseError::Truncated);
    }

    // SAFETY: the context pointer is valid for the whole program run.
    let gso_segs = unsafe { (*ctx.skb.skb).gso_segs } as u64;
    let (segments, l3_bytes) = if gso_segs > 1 {
        // One buffer, many wire packets: each of them carries its own headers.
        let per_segment_headers = (net.header_len + transport.header_len) as u64;
        (
            gso_segs,
            skb_l3_len as u64 + (gso_segs - 1) * per_segment_headers,
        )
    } else if net.l3_len != 0 {
        // The IP length, not skb->len: ingress frames may still carry Ethernet padding.
        (1, net.l3_len as u64)
    } else {
        (1, skb_l3_len as u64)
    };

    Ok(Packet {
        family: net.family,
        proto: net.proto,
        src_addr: net.src_addr,
        dst_addr: net.dst_addr,
        src_port: transport.src_port,
        dst_port: transport.dst_port,
        tcp_flags: transport.tcp_flags,
        segments,
        l3_bytes,
    })
}

#[inline(always)]
fn fragment_key(net: &Network, id: u32) -> FragmentKey {
    FragmentKey {
        src_addr: net.src_addr,
        dst_addr: net.dst_addr,
        id,
        proto: net.proto,
        family: net.family,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, offset: usize) -> Result<Network, ParseError> {
    let header: [u8; 20] = load(ctx, offset)?;
    let version = header[0] >> 4;
    let header_len = ((header[0] & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([header[2], header[3]]) as usize;
    if version != 4 || header_len < 20 {
        return Err(ParseError::Truncated);
    }
    // Options: the header may be longer than 20 bytes; make sure it is all there.
    require(ctx, offset, header_len)?;
    let frag = u16::from_be_bytes([header[6], header[7]]);
    let more_fragments = frag & 0x2000 != 0;
    let fragment_offset = frag & 0x1fff;
    let id = u16::from_be_bytes([header[4], header[5]]) as u32;
    let fragment = match (fragment_offset, more_fragments) {
        (0, false) => Fragment::None,
        (0, true) => Fragment::First { id },
        (_, more) => Fragment::Later { id, last: !more },
    };
    let mut src_addr = [0u8; 16];
    let mut dst_addr = [0u8; 16];
    src_addr[..4].copy_from_slice(&header[12..16]);
    dst_addr[..4].copy_from_slice(&header[16..20]);
    Ok(Network {
        family: FAMILY_IPV4,
        proto: header[9],
        src_addr,
        dst_addr,
        l4_offset: offset + header_len,
        header_len,
        // total_len 0 is what large GSO (BIG TCP) packets carry: fall back to skb->len.
        l3_len: if total_len >= header_len {
            total_len
        } else {
            0
        },
        fragment,
    })
}

#[inline(always)]
fn ipv6(ctx: &TcContext, offset: usize) -> Result<Network, ParseError> {
    let header: [u8; 40] = load(ctx, offset)?;
    if header[0] >> 4 != 6 {
        return Err(ParseError::Truncated);
    }
    let payload_len = u16::from_be_bytes([header[4], header[5]]) as usize;
    let mut next = header[6];
    let mut l4_offset = offset + 40;
    let mut fragment = Fragment::None;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let ext: [u8; 2] = load(ctx, l4_offset)?;
                next = ext[0];
                l4_offset += (ext[1] as usize + 1) * 8;
            }
            IPV6_AUTH => {
                let ext: [u8; 2] = load(ctx, l4_offset)?;
                next = ext[0];
                l4_offset += (ext[1] as usize + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let ext: [u8; 8] = load(ctx, l4_offset)?;
                next = ext[0];
                let frag = u16::from_be_bytes([ext[2], ext[3]]);
                let id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                let more_fragments = frag & 1 != 0;
                fragment = match (frag >> 3, more_fragments) {
                    (0, false) => Fragment::None,
                    (0, true) => Fragment::First { id },
                    (_, more) => Fragment::Later { id, last: !more },
                };
                l4_offset += 8;
            }
            _ => break,
        }
    }
    if is_extension_header(next) {
        // A chain longer than we walk: its transport header is unknown, so no guess is made.
        return Err(ParseError::Truncated);
    }
    let mut src_addr = [0u8; 16];
    let mut dst_addr = [0u8; 16];
    src_addr.copy_from_slice(&header[8..24]);
    dst_addr.copy_from_slice(&header[24..40]);
    Ok(Network {
        family: FAMILY_IPV6,
        proto: next,
        src_addr,
        dst_addr,
        l4_offset,
        header_len: l4_offset - offset,
        // payload_len 0 means a jumbogram / BIG TCP: fall back to skb->len.
        l3_len: if payload_len != 0 {
            40 + payload_len
        } else {
            0
        },
        fragment,
    })
}

#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AUTH | IPV6_DEST_OPTS
    )
}

struct Transport {
    src_port: u16,
    dst_port: u16,
    tcp_flags: u8,
    header_len: usize,
}

#[inline(always)]
fn transport(ctx: &TcContext, proto: u8, offset: usize) -> Result<Transport, ParseError> {
    match proto {
        PROTO_TCP => {
            let tcp: [u8; 14] = load(ctx, offset)?;
            let header_len = ((tcp[12] >> 4) as usize) * 4;
            if header_len < 20 {
                return Err(ParseError::Truncated);
            }
            // The options must be there too, or the packet was cut inside the TCP header.
            require(ctx, offset, header_len)?;
            Ok(Transport {
                src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
                dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
                tcp_flags: tcp[13],
                header_len,
            })
        }
        PROTO_UDP => {
            let udp: [u8; 8] = load(ctx, offset)?;
            Ok(Transport {
                src_port: u16::from_be_bytes([udp[0], udp[1]]),
                dst_port: u16::from_be_bytes([udp[2], udp[3]]),
                tcp_flags: 0,
                header_len: 8,
            })
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let icmp: [u8; 8] = load(ctx, offset)?;
            let echo = matches!(
                (proto, icmp[0]),
                (PROTO_ICMP, ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY)
                    | (PROTO_ICMPV6, ICMPV6_ECHO_REQUEST | ICMPV6_ECHO_REPLY)
            );
            // Echo request and reply share the identifier: both directions, one connection.
            let id = if echo {
                u16::from_be_bytes([icmp[4], icmp[5]])
            } else {
                0
            };
            Ok(Transport {
                src_port: id,
                dst_port: id,
                tcp_flags: 0,
                header_len: 8,
            })
        }
        _ => Ok(Transport {
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
            header_len: 0,
        }),
    }
}
