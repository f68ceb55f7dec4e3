//! Crafting raw Ethernet frames for `BPF_PROG_TEST_RUN`: the kernel-program tests and the
//! datapath benchmark feed the real classifiers with these instead of needing a network.
//!
//! One builder covers both IP versions; what differs between them (header layout, how a
//! fragment is described) is confined to `Frame::network`. Checksums are left zero: the
//! datapath never verifies them.
//!
//! ```
//! use tracer_common::test_support::craft::{ETH_P_8021Q, Frame};
//! use tracer_common::TCP_SYN;
//!
//! let frame = Frame::tcp("10.0.0.1:40000".parse().unwrap(), "10.0.0.2:80".parse().unwrap(), TCP_SYN)
//!     .vlan(ETH_P_8021Q, 7)
//!     .payload(10)
//!     .build();
//! assert_eq!(frame.l3_len, 20 + 20 + 10);
//! assert_eq!(frame.bytes.len(), 18 + frame.l3_len);
//! ```
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// Tag protocol identifiers: a customer tag, and the service (outer) tag of Q-in-Q.
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

/// Locally administered MAC addresses: the datapath does not look at them.
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;

/// A fragment of an IP datagram.
#[derive(Clone, Copy, Debug)]
pub struct Fragment {
    /// IPv4 identification (low 16 bits used) or IPv6 fragment identification.
    pub id: u32,
    /// Position of the fragment's data in the datagram, in 8-byte units.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
}

/// An IPv6 extension header that only carries options or routing data. Each holds its
/// "Hdr Ext Len": the number of 8-byte units beyond the first 8 bytes (all padding).
#[derive(Clone, Copy, Debug)]
pub enum ExtHeader {
    HopByHop(u8),
    Routing(u8),
    DestinationOptions(u8),
}

/// An ICMP or ICMPv6 message; echo type numbers follow the address family.
#[derive(Clone, Copy, Debug)]
pub enum Icmp {
    EchoRequest {
        id: u16,
        seq: u16,
    },
    EchoReply {
        id: u16,
        seq: u16,
    },
    /// Any other message, with the rest of its 8-byte header zero.
    Other {
        icmp_type: u8,
        code: u8,
    },
}

#[derive(Clone, Debug)]
enum Transport {
    Tcp {
        src: u16,
        dst: u16,
        flags: u8,
        options: Vec<u8>,
    },
    Udp {
        src: u16,
        dst: u16,
    },
    Icmp(Icmp),
}

/// A frame under construction: `Frame::tcp/udp/icmp`, then modifiers, then `build`.
#[derive(Clone, Debug)]
pub struct Frame {
    src: IpAddr,
    dst: IpAddr,
    transport: Transport,
    /// (TPID, VLAN id), outermost first.
    vlans: Vec<(u16, u16)>,
    ipv4_options: Vec<u8>,
    ext_headers: Vec<ExtHeader>,
    fragment: Option<Fragment>,
    payload: usize,
    min_len: usize,
}

/// A built frame and where its headers end.
#[derive(Clone, Debug)]
pub struct Crafted {
    pub bytes: Vec<u8>,
    /// Each header's name and the offset just past it, outermost first: Ethernet, VLAN tags,
    /// IP (options included), IPv6 extension headers, then the L4 header if there is one.
    pub boundaries: Vec<(&'static str, usize)>,
    /// Where the IP header starts.
    pub l3_offset: usize,
    /// The IP datagram's length (IPv4 total length, IPv6 40 + payload length): the L3 bytes
    /// the datapath counts for this frame.
    pub l3_len: usize,
}

impl Crafted {
    /// Length of the IP and L4 headers together: what every GSO segment repeats.
    pub fn header_len(&self) -> usize {
        self.boundaries.last().map_or(0, |&(_, end)| end) - self.l3_offset
    }
}

impl Frame {
    fn new(src: IpAddr, dst: IpAddr, transport: Transport) -> Self {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "both ends of a frame must have the same IP version"
        );
        Self {
            src,
            dst,
            transport,
            vlans: Vec::new(),
            ipv4_options: Vec::new(),
            ext_headers: Vec::new(),
            fragment: None,
            payload: 0,
            min_len: 0,
        }
    }

    /// A TCP segment with the given flag bits (`tracer_common::TCP_*`).
    pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Self {
        let transport = Transport::Tcp {
            src: src.port(),
            dst: dst.port(),
            flags,
            options: Vec::new(),
        };
        Self::new(src.ip(), dst.ip(), transport)
    }

    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        let transport = Transport::Udp {
            src: src.port(),
            dst: dst.port(),
        };
        Self::new(src.ip(), dst.ip(), transport)
    }

    /// ICMP for IPv4 addresses, ICMPv6 for IPv6 ones.
    pub fn icmp(src: IpAddr, dst: IpAddr, message: Icmp) -> Self {
        Self::new(src, dst, Transport::Icmp(message))
    }

    /// Adds a VLAN tag inside those already added (`ETH_P_8021AD` outer, `ETH_P_8021Q` inner).
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push((tpid, vid));
        self
    }

    /// IPv4 options, padded with zeros (end of options) to a multiple of 4 bytes.
    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        assert!(self.src.is_ipv4(), "IPv4 options on an IPv6 frame");
        self.ipv4_options = padded(options);
        self
    }

    /// Appends an IPv6 extension header to the chain (a fragment header, if any, comes last).
    pub fn ext_header(mut self, header: ExtHeader) -> Self {
        assert!(self.src.is_ipv6(), "IPv6 extension header on an IPv4 frame");
        self.ext_headers.push(header);
        self
    }

    /// Makes the frame a fragment: IPv4 header fields, or an IPv6 fragment header. A fragment
    /// with a non-zero offset carries no L4 header, only payload, as on the wire.
    pub fn fragment(mut self, fragment: Fragment) -> Self {
        self.fragment = Some(fragment);
        self
    }

    /// TCP options, padded with zeros to a multiple of 4 bytes (the data offset follows).
    pub fn tcp_options(mut self, new_options: &[u8]) -> Self {
        match &mut self.transport {
            Transport::Tcp { options, .. } => *options = padded(new_options),
            other => panic!("TCP options on {other:?}"),
        }
        self
    }

    /// Bytes of (zero) data after the headers.
    pub fn payload(mut self, len: usize) -> Self {
        self.payload = len;
        self
    }

    /// Pads the frame with zeros after the IP datagram up to `len` bytes, as Ethernet pads
    /// short frames to 60 bytes (the IP length then says how much is real).
    pub fn pad_to(mut self, len: usize) -> Self {
        self.min_len = len;
        self
    }

    pub fn build(&self) -> Crafted {
        let mut bytes = [DST_MAC, SRC_MAC].concat();
        let mut boundaries = Vec::new();
        let ethertype = if self.src.is_ipv4() {
            ETH_P_IP
        } else {
            ETH_P_IPV6
        };
        // The Ethernet header ends with the first type field; each tag is a TCI plus the next.
        let types: Vec<u16> = self
            .vlans
            .iter()
            .map(|&(tpid, _)| tpid)
            .chain([ethertype])
            .collect();
        bytes.extend(types[0].to_be_bytes());
        boundaries.push(("Ethernet", bytes.len()));
        for (&(tpid, vid), next) in self.vlans.iter().zip(&types[1..]) {
            bytes.extend(vid.to_be_bytes());
            bytes.extend(next.to_be_bytes());
            let name = if tpid == ETH_P_8021AD {
                "802.1ad tag"
            } else {
                "802.1Q tag"
            };
            boundaries.push((name, bytes.len()));
        }

        let l3_offset = bytes.len();
        let (proto, transport_name, mut upper) = self.transport_header();
        let transport_len = upper.len();
        upper.resize(transport_len + self.payload, 0);
        for (name, header) in self.network(proto, upper.len()) {
            bytes.extend(header);
            boundaries.push((name, bytes.len()));
        }
        if transport_len > 0 {
            boundaries.push((transport_name, bytes.len() + transport_len));
        }
        bytes.extend(upper);
        let l3_len = bytes.len() - l3_offset;
        if bytes.len() < self.min_len {
            bytes.resize(self.min_len, 0);
        }
        Crafted {
            bytes,
            boundaries,
            l3_offset,
            l3_len,
        }
    }

    /// The IP protocol number, the L4 header's name, and its bytes (none in a later fragment).
    fn transport_header(&self) -> (u8, &'static str, Vec<u8>) {
        let later_fragment = self.fragment.is_some_and(|f| f.offset > 0);
        let (proto, name, header) = match &self.transport {
            Transport::Tcp {
                src,
                dst,
                flags,
                options,
            } => {
                let data_offset = ((20 + options.len()) / 4) as u8;
                let header = [
                    &src.to_be_bytes()[..],
                    &dst.to_be_bytes(),
                    &[0; 8], // sequence and acknowledgement numbers
                    &[data_offset << 4, *flags, 0xff, 0xff, 0, 0, 0, 0],
                    options,
                ]
                .concat();
                (PROTO_TCP, "TCP", header)
            }
            Transport::Udp { src, dst } => {
                let len = (8 + self.payload) as u16;
                let header = [
                    src.to_be_bytes(),
                    dst.to_be_bytes(),
                    len.to_be_bytes(),
                    [0; 2],
                ];
                (PROTO_UDP, "UDP", header.concat())
            }
            Transport::Icmp(message) => {
                let v4 = self.src.is_ipv4();
                let (icmp_type, code, id, seq) = match *message {
                    Icmp::EchoRequest { id, seq } => (if v4 { 8 } else { 128 }, 0, id, seq),
                    Icmp::EchoReply { id, seq } => (if v4 { 0 } else { 129 }, 0, id, seq),
                    Icmp::Other { icmp_type, code } => (icmp_type, code, 0, 0),
                };
                let [id_hi, id_lo] = id.to_be_bytes();
                let [seq_hi, seq_lo] = seq.to_be_bytes();
                let header = vec![icmp_type, code, 0, 0, id_hi, id_lo, seq_hi, seq_lo];
                if v4 {
                    (PROTO_ICMP, "ICMP", header)
                } else {
                    (PROTO_ICMPV6, "ICMPv6", header)
                }
            }
        };
        let header = if later_fragment { Vec::new() } else { header };
        (proto, name, header)
    }

    /// The IP header and, for IPv6, the extension headers, carrying `upper_len` bytes of `proto`.
    fn network(&self, proto: u8, upper_len: usize) -> Vec<(&'static str, Vec<u8>)> {
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                vec![("IPv4", self.ipv4(src, dst, proto, upper_len))]
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut chain: Vec<(&'static str, u8, Vec<u8>)> = self
                    .ext_headers
                    .iter()
                    .map(|header| match *header {
                        ExtHeader::HopByHop(len) => ("hop-by-hop", IPV6_HOP_BY_HOP, len),
                        ExtHeader::Routing(len) => ("routing", IPV6_ROUTING, len),
                        ExtHeader::DestinationOptions(len) => {
                            ("destination options", IPV6_DEST_OPTS, len)
                        }
                    })
                    .map(|(name, number, len)| {
                        let mut header = vec![0; 8 * (len as usize + 1)];
                        header[1] = len;
                        (name, number, header)
                    })
                    .collect();
                if let Some(Fragment { id, offset, more }) = self.fragment {
                    let field = offset << 3 | u16::from(more);
                    let header = [&[0, 0][..], &field.to_be_bytes(), &id.to_be_bytes()].concat();
                    chain.push(("fragment", IPV6_FRAGMENT, header));
                }
                // Each header's first byte names the one after it.
                let next_headers: Vec<u8> = chain
                    .iter()
                    .map(|&(_, number, _)| number)
                    .chain([proto])
                    .collect();
                for ((_, _, header), &next) in chain.iter_mut().zip(&next_headers[1..]) {
                    header[0] = next;
                }
                let payload_len = chain.iter().map(|(_, _, h)| h.len()).sum::<usize>() + upper_len;
                let fixed = [
                    &[0x60, 0, 0, 0][..],
                    &(payload_len as u16).to_be_bytes(),
                    &[next_headers[0], 64],
                    &src.octets(),
                    &dst.octets(),
                ]
                .concat();
                std::iter::once(("IPv6", fixed))
                    .chain(chain.into_iter().map(|(name, _, header)| (name, header)))
                    .collect()
            }
            _ => unreachable!("Frame::new checks that both ends have the same IP version"),
        }
    }

    fn ipv4(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, upper_len: usize) -> Vec<u8> {
        let header_len = 20 + self.ipv4_options.len();
        let total_len = (header_len + upper_len) as u16;
        let (id, flags_offset) = self.fragment.map_or((0, 0), |f| {
            (f.id as u16, f.offset | if f.more { 0x2000 } else { 0 })
        });
        [
            &[0x40 | (header_len / 4) as u8, 0][..],
            &total_len.to_be_bytes(),
            &id.to_be_bytes(),
            &flags_offset.to_be_bytes(),
            &[64, proto, 0, 0],
            &src.octets(),
            &dst.octets(),
            &self.ipv4_options,
        ]
        .concat()
    }
}

/// An ARP request: the datapath's example of a frame that is not IP.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    [
        &[0xff; 6][..],
        &SRC_MAC,
        &ETH_P_ARP.to_be_bytes(),
        // Ethernet, IPv4, address lengths 6 and 4, operation 1 (request).
        &[0, 1, 8, 0, 6, 4, 0, 1],
        &SRC_MAC,
        &sender.octets(),
        &[0; 6],
        &target.octets(),
    ]
    .concat()
}

fn padded(bytes: &[u8]) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(last: u16) -> IpAddr {
        IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last))
    }

    #[test]
    fn ipv4_lengths_and_fields_follow_the_options() {
        let frame = Frame::tcp(
            "10.0.0.1:1000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            0x12,
        )
        .ipv4_options(&[1, 1, 1])
        .tcp_options(&[2, 4, 5, 0xb4])
        .payload(3)
        .build();
        let ip = &frame.bytes[14..];
        assert_eq!(ip[0], 0x46, "version 4, ihl 6");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 24 + 24 + 3);
        assert_eq!(ip[24 + 12], 6 << 4, "TCP data offset 6");
        assert_eq!(ip[24 + 13], 0x12);
        assert_eq!(
            frame.boundaries,
            [("Ethernet", 14), ("IPv4", 38), ("TCP", 62)]
        );
        assert_eq!(
            (frame.l3_offset, frame.l3_len, frame.header_len()),
            (14, 51, 48)
        );
    }

    #[test]
    fn ipv6_extension_chain_links_next_headers() {
        let frame = Frame::udp(SocketAddr::new(v6(1), 53), SocketAddr::new(v6(2), 5353))
            .vlan(ETH_P_8021AD, 1)
            .vlan(ETH_P_8021Q, 2)
            .ext_header(ExtHeader::HopByHop(0))
            .ext_header(ExtHeader::Routing(1))
            .fragment(Fragment {
                id: 7,
                offset: 0,
                more: true,
            })
            .payload(4)
            .build();
        let b = &frame.bytes;
        assert_eq!(&b[12..22], &[0x88, 0xa8, 0, 1, 0x81, 0, 0, 2, 0x86, 0xdd]);
        assert_eq!(
            u16::from_be_bytes([b[22 + 4], b[22 + 5]]),
            8 + 16 + 8 + 8 + 4
        );
        assert_eq!(b[22 + 6], IPV6_HOP_BY_HOP);
        assert_eq!(b[62], IPV6_ROUTING);
        assert_eq!((b[70], b[71]), (IPV6_FRAGMENT, 1));
        assert_eq!(&b[86..94], &[PROTO_UDP, 0, 0, 1, 0, 0, 0, 7]);
        let names: Vec<_> = frame.boundaries.iter().map(|&(name, _)| name).collect();
        assert_eq!(
            names,
            [
                "Ethernet",
                "802.1ad tag",
                "802.1Q tag",
                "IPv6",
                "hop-by-hop",
                "routing",
                "fragment",
                "UDP"
            ]
        );
        assert_eq!(frame.boundaries.last(), Some(&("UDP", 102)));
        assert_eq!(frame.l3_len, b.len() - 22);
    }

    #[test]
    fn later_fragments_carry_no_transport_header_and_padding_is_not_l3() {
        let later = Frame::udp("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap())
            .fragment(Fragment {
                id: 0x1234,
                offset: 3,
                more: false,
            })
            .payload(8)
            .pad_to(60)
            .build();
        assert_eq!(later.l3_len, 28);
        assert_eq!(later.bytes.len(), 60);
        assert_eq!(&later.bytes[18..22], &[0x12, 0x34, 0, 3]);
        assert_eq!(later.boundaries.last(), Some(&("IPv4", 34)));
    }

    #[test]
    fn icmp_echo_types_follow_the_family() {
        let echo = Icmp::EchoReply { id: 9, seq: 1 };
        let v4 = Frame::icmp(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            echo,
        )
        .build();
        let v6 = Frame::icmp(v6(1), v6(2), echo).build();
        assert_eq!(&v4.bytes[34..42], &[0, 0, 0, 0, 0, 9, 0, 1]);
        assert_eq!(
            (v4.bytes[23], v6.bytes[20], v6.bytes[54]),
            (PROTO_ICMP, PROTO_ICMPV6, 129)
        );
    }
}
