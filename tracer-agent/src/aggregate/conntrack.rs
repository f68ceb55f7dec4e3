//! The kernel's conntrack table, dumped over ctnetlink (`NETLINK_NETFILTER`).
//!
//! When the node NATs a connection (SNAT of pod egress by `AWS-SNAT-CHAIN-0`, DNAT of a
//! ClusterIP by kube-proxy) the datapath sees two 5-tuples for one connection: the pre-NAT one at
//! the pod veth and the post-NAT one at the node ENI. Conntrack holds both, so user space joins
//! them here instead of guessing.
//!
//! The rust-netlink crates have no parser for the conntrack attributes this needs (ICMP echo
//! identifiers and types among them), so the messages are parsed here, on the framing and
//! attribute iterator of `netlink-packet-core`; see "Netlink" in docs/design.md.
use std::net::IpAddr;

use netlink_packet_core::{
    DecodeError, ErrorContext as _, NetlinkDeserializable, NetlinkHeader, NetlinkSerializable,
    NlasIterator, parse_ip, parse_u8, parse_u16_be,
};

use crate::datapath::netlink::{NetlinkError, Protocol, Socket};

/// One direction of a connection. Ports are in host byte order; for ICMP and ICMPv6 echo both
/// ports hold the echo identifier, for other ICMP messages they are 0 (as the datapath keys them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Tuple {
    /// The same flow seen from the other end.
    pub fn inverse(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// A conntrack entry: the tuple of the initiator's first packet and the tuple replies carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub original: Tuple,
    pub reply: Tuple,
}

impl Entry {
    /// The tuple the connection has after NAT, seen in the original direction (the inverse of the
    /// reply tuple); None when the entry is not NATed.
    pub fn translated(&self) -> Option<Tuple> {
        let translated = self.reply.inverse();
        (translated != self.original).then_some(translated)
    }

    /// The source (address or port) was rewritten: pod egress SNATed to the node.
    pub fn is_snat(&self) -> bool {
        let translated = self.reply.inverse();
        (translated.src, translated.src_port) != (self.original.src, self.original.src_port)
    }

    /// The destination (address or port) was rewritten: a ClusterIP or NodePort DNATed.
    pub fn is_dnat(&self) -> bool {
        let translated = self.reply.inverse();
        // An ICMP echo's "ports" are its identifier, which NAT only remaps to keep the source
        // side unique: that is not a new destination.
        let icmp = matches!(self.original.proto, PROTO_ICMP | PROTO_ICMPV6);
        translated.dst != self.original.dst
            || (!icmp && translated.dst_port != self.original.dst_port)
    }
}

/// Why the table could not be read: the netlink error names the step (socket, send, receive,
/// kernel refusal, sequence, byte offset of a malformed message).
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack: {0}")]
    Netlink(#[from] NetlinkError),
}

// From linux/netfilter/nfnetlink.h and nfnetlink_conntrack.h.
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NFNETLINK_V0: u8 = 0;
const NFGENMSG_LEN: usize = 4;
const DUMP_TYPE: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET;
/// `nfgenmsg` of the dump request: family (AF_UNSPEC dumps both), version, res_id (big
/// endian, 0).
const DUMP_NFGENMSG: [u8; NFGENMSG_LEN] = [libc::AF_UNSPEC as u8, NFNETLINK_V0, 0, 0];

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

/// A `NETLINK_NETFILTER` socket of the current network namespace.
pub struct Conntrack {
    socket: Socket,
}

impl Conntrack {
    pub fn open() -> Result<Self, ConntrackError> {
        Ok(Self {
            socket: Socket::open(Protocol::Netfilter)?,
        })
    }

    /// Dumps the whole table of the current network namespace, IPv4 and IPv6, handing each
    /// entry to `each` as it is parsed: a node's table can hold hundreds of thousands of
    /// entries, of which a poll needs a few, so the caller keeps what it needs and the table
    /// is never held whole. After an error `each` has seen part of the table.
    ///
    /// After an error the socket may still hold the rest of the aborted dump: open a new one.
    pub fn dump_each(&mut self, each: impl FnMut(Entry)) -> Result<(), ConntrackError> {
        Ok(self.socket.dump_each(DumpRequest, each_entry(each))?)
    }
}

/// The request of a dump of the whole table (`IPCTNL_MSG_CT_GET` with an `nfgenmsg` only).
struct DumpRequest;

impl NetlinkSerializable for DumpRequest {
    fn message_type(&self) -> u16 {
        DUMP_TYPE
    }

    fn buffer_len(&self) -> usize {
        NFGENMSG_LEN
    }

    fn serialize(&self, buffer: &mut [u8]) {
        buffer.copy_from_slice(&DUMP_NFGENMSG);
    }
}

/// One message of the dump's answer: the entry it holds, None when it lacks a tuple.
struct EntryMessage(Option<Entry>);

impl NetlinkDeserializable for EntryMessage {
    type Error = DecodeError;

    fn deserialize(_: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        parse_entry(payload).map(EntryMessage)
    }
}

/// The dump's message handler: hands the entry each message holds to `each`.
fn each_entry(mut each: impl FnMut(Entry)) -> impl FnMut(EntryMessage) -> Result<(), NetlinkError> {
    move |EntryMessage(entry)| {
        entry.map(&mut each);
        Ok(())
    }
}

/// Parses one ctnetlink message (`nfgenmsg` + attributes); None when it lacks a tuple.
fn parse_entry(payload: &[u8]) -> Result<Option<Entry>, DecodeError> {
    let attributes = payload
        .get(NFGENMSG_LEN..)
        .ok_or_else(|| DecodeError::buffer_too_small(payload.len(), NFGENMSG_LEN))
        .context("nfgenmsg")?;
    let (mut original, mut reply) = (None, None);
    for attr in NlasIterator::new(attributes) {
        let attr = attr?;
        match attr.kind() {
            CTA_TUPLE_ORIG => original = parse_tuple(attr.value()).context("CTA_TUPLE_ORIG")?,
            CTA_TUPLE_REPLY => reply = parse_tuple(attr.value()).context("CTA_TUPLE_REPLY")?,
            _ => {}
        }
    }
    Ok(original
        .zip(reply)
        .map(|(original, reply)| Entry { original, reply }))
}

/// Parses the attributes nested in a `CTA_TUPLE_*`; None when a part of it is missing.
fn parse_tuple(tuple: &[u8]) -> Result<Option<Tuple>, DecodeError> {
    let (mut src, mut dst, mut l4) = (None, None, None);
    for attr in NlasIterator::new(tuple) {
        let attr = attr?;
        match attr.kind() {
            CTA_TUPLE_IP => {
                for ip in NlasIterator::new(attr.value()) {
                    let ip = ip?;
                    match ip.kind() {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(parse_ip(ip.value())?),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = Some(parse_ip(ip.value())?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => l4 = parse_proto(attr.value())?,
            _ => {}
        }
    }
    Ok(match (src, dst, l4) {
        (Some(src), Some(dst), Some((proto, src_port, dst_port))) => Some(Tuple {
            src,
            dst,
            proto,
            src_port,
            dst_port,
        }),
        _ => None,
    })
}

/// Parses the attributes nested in `CTA_TUPLE_PROTO` into (protocol, source port, destination
/// port), keyed like the datapath keys flows; None without a protocol number.
fn parse_proto(proto: &[u8]) -> Result<Option<(u8, u16, u16)>, DecodeError> {
    let (mut num, mut ports, mut icmp_id, mut icmp_type) = (None, (0, 0), 0, None);
    for attr in NlasIterator::new(proto) {
        let attr = attr?;
        let value = attr.value();
        match attr.kind() {
            CTA_PROTO_NUM => num = Some(parse_u8(value)?),
            CTA_PROTO_SRC_PORT => ports.0 = parse_u16_be(value)?,
            CTA_PROTO_DST_PORT => ports.1 = parse_u16_be(value)?,
            CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => icmp_id = parse_u16_be(value)?,
            CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => icmp_type = Some(parse_u8(value)?),
            _ => {}
        }
    }
    Ok(num.map(|num| {
        let ports = match (num, icmp_type) {
            // Echo request/reply: ICMP 8/0, ICMPv6 128/129.
            (PROTO_ICMP, Some(8 | 0)) | (PROTO_ICMPV6, Some(128 | 129)) => (icmp_id, icmp_id),
            (PROTO_ICMP | PROTO_ICMPV6, _) => (0, 0),
            _ => ports,
        };
        (num, ports.0, ports.1)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::netlink::{bytes::*, dump_request, parse_datagram};
    use std::net::{Ipv4Addr, Ipv6Addr};

    const NLMSG_HDRLEN: usize = 16;

    const CTA_PROTO_ICMP_CODE: u16 = 6;
    const CTA_STATUS: u16 = 3;

    fn ip_attrs(src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let (src_kind, src) = match src {
            IpAddr::V4(v4) => (CTA_IP_V4_SRC, v4.octets().to_vec()),
            IpAddr::V6(v6) => (CTA_IP_V6_SRC, v6.octets().to_vec()),
        };
        let (dst_kind, dst) = match dst {
            IpAddr::V4(v4) => (CTA_IP_V4_DST, v4.octets().to_vec()),
            IpAddr::V6(v6) => (CTA_IP_V6_DST, v6.octets().to_vec()),
        };
        nested(CTA_TUPLE_IP, &[attr(src_kind, &src), attr(dst_kind, &dst)])
    }

    /// A TCP/UDP tuple as ctnetlink encodes it.
    fn port_tuple(kind: u16, tuple: &Tuple) -> Vec<u8> {
        let proto = nested(
            CTA_TUPLE_PROTO,
            &[
                attr(CTA_PROTO_NUM, &[tuple.proto]),
                attr(CTA_PROTO_SRC_PORT, &tuple.src_port.to_be_bytes()),
                attr(CTA_PROTO_DST_PORT, &tuple.dst_port.to_be_bytes()),
            ],
        );
        nested(kind, &[ip_attrs(tuple.src, tuple.dst), proto])
    }

    /// An ICMP tuple as ctnetlink encodes it: id, type and code instead of ports.
    fn icmp_tuple(kind: u16, src: IpAddr, dst: IpAddr, id: u16, icmp_type: u8) -> Vec<u8> {
        let proto = nested(
            CTA_TUPLE_PROTO,
            &[
                attr(CTA_PROTO_NUM, &[PROTO_ICMP]),
                attr(CTA_PROTO_ICMP_ID, &id.to_be_bytes()),
                attr(CTA_PROTO_ICMP_TYPE, &[icmp_type]),
                attr(CTA_PROTO_ICMP_CODE, &[0]),
            ],
        );
        nested(kind, &[ip_attrs(src, dst), proto])
    }

    /// A ctnetlink entry message (IPCTNL_MSG_CT_NEW) with the given attributes.
    fn ct_message(family: i32, attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut payload = vec![family as u8, NFNETLINK_V0, 0, 0];
        payload.extend(attributes.concat());
        // Entries carry more attributes than tuples; the parser must step over them.
        payload.extend(attr(CTA_STATUS, &0x18eu32.to_be_bytes()));
        message(NFNL_SUBSYS_CTNETLINK << 8, &payload)
    }

    fn entry_message(entry: &Entry) -> Vec<u8> {
        let family = match entry.original.src {
            IpAddr::V4(_) => libc::AF_INET,
            IpAddr::V6(_) => libc::AF_INET6,
        };
        ct_message(
            family,
            &[
                port_tuple(CTA_TUPLE_ORIG, &entry.original),
                port_tuple(CTA_TUPLE_REPLY, &entry.reply),
            ],
        )
    }

    /// Parses one datagram of a dump answer as `Conntrack::dump_each` does: true when it
    /// ended the dump.
    fn parse(data: &[u8]) -> Result<(bool, Vec<Entry>), ConntrackError> {
        let mut entries = Vec::new();
        let done = parse_datagram(data, Some(SEQ), each_entry(|entry| entries.push(entry)))?;
        Ok((done, entries))
    }

    fn tuple(src: &str, src_port: u16, dst: &str, dst_port: u16, proto: u8) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            src_port,
            dst_port,
        }
    }

    /// Pod 10.0.1.5 to the internet, SNATed to the node's 10.0.0.10.
    fn tcp_snat() -> Entry {
        Entry {
            original: tuple("10.0.1.5", 40000, "203.0.113.10", 443, 6),
            reply: tuple("203.0.113.10", 443, "10.0.0.10", 40000, 6),
        }
    }

    /// Pod to the kube-dns ClusterIP, DNATed to a CoreDNS pod.
    fn udp_dnat() -> Entry {
        Entry {
            original: tuple("10.0.1.5", 5353, "10.100.0.10", 53, 17),
            reply: tuple("10.0.1.7", 53, "10.0.1.5", 5353, 17),
        }
    }

    fn ipv6_plain() -> Entry {
        Entry {
            original: tuple("2001:db8::5", 33000, "2001:db8:1::9", 80, 6),
            reply: tuple("2001:db8:1::9", 80, "2001:db8::5", 33000, 6),
        }
    }

    /// A dump answer split like the kernel splits it: entries, then NLMSG_DONE.
    fn dump_bytes() -> Vec<u8> {
        [
            entry_message(&tcp_snat()),
            entry_message(&udp_dnat()),
            entry_message(&ipv6_plain()),
            done(),
        ]
        .concat()
    }

    #[test]
    fn ipv4_tcp_snat() {
        let (done, entries) = parse(&[entry_message(&tcp_snat()), done()].concat()).unwrap();
        assert!(done);
        assert_eq!(entries, vec![tcp_snat()]);
        let entry = entries[0];
        assert_eq!(
            entry.translated(),
            Some(tuple("10.0.0.10", 40000, "203.0.113.10", 443, 6))
        );
        assert!(entry.is_snat() && !entry.is_dnat());
    }

    #[test]
    fn ipv4_udp_dnat() {
        let (_, entries) = parse(&entry_message(&udp_dnat())).unwrap();
        let entry = entries[0];
        assert_eq!(entry, udp_dnat());
        assert_eq!(
            entry.translated(),
            Some(tuple("10.0.1.5", 5353, "10.0.1.7", 53, 17))
        );
        assert!(entry.is_dnat() && !entry.is_snat());
    }

    #[test]
    fn ipv6_without_nat() {
        let (_, entries) = parse(&entry_message(&ipv6_plain())).unwrap();
        let entry = entries[0];
        assert_eq!(
            entry.original.src,
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 5))
        );
        assert_eq!(entry.translated(), None);
        assert!(!entry.is_snat() && !entry.is_dnat());
    }

    #[test]
    fn icmp_echo_keys_both_ports_by_the_id() {
        let (pod, host) = (
            IpAddr::V4(Ipv4Addr::new(10, 0, 1, 5)),
            IpAddr::V4(Ipv4Addr::new(10, 0, 2, 8)),
        );
        let bytes = ct_message(
            libc::AF_INET,
            &[
                icmp_tuple(CTA_TUPLE_ORIG, pod, host, 0x1234, 8),
                icmp_tuple(CTA_TUPLE_REPLY, host, pod, 0x1234, 0),
            ],
        );
        let (_, entries) = parse(&bytes).unwrap();
        assert_eq!(
            entries[0].original,
            tuple("10.0.1.5", 0x1234, "10.0.2.8", 0x1234, PROTO_ICMP)
        );
        assert_eq!(entries[0].translated(), None);

        // SNAT to the node, which also remapped the identifier.
        let node = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10));
        let bytes = ct_message(
            libc::AF_INET,
            &[
                icmp_tuple(CTA_TUPLE_ORIG, pod, host, 0x1234, 8),
                icmp_tuple(CTA_TUPLE_REPLY, host, node, 0x0001, 0),
            ],
        );
        let entry = parse(&bytes).unwrap().1[0];
        assert_eq!(
            entry.translated(),
            Some(tuple("10.0.0.10", 1, "10.0.2.8", 1, PROTO_ICMP))
        );
        assert!(entry.is_snat() && !entry.is_dnat(), "{entry:?}");
    }

    #[test]
    fn whole_dump_and_entries_without_tuples() {
        let no_reply = ct_message(
            libc::AF_INET,
            &[port_tuple(CTA_TUPLE_ORIG, &tcp_snat().original)],
        );
        let no_proto = ct_message(
            libc::AF_INET,
            &[
                nested(
                    CTA_TUPLE_ORIG,
                    &[ip_attrs(tcp_snat().original.src, tcp_snat().original.dst)],
                ),
                port_tuple(CTA_TUPLE_REPLY, &tcp_snat().reply),
            ],
        );
        let (done, entries) = parse(&[no_reply, no_proto, dump_bytes()].concat()).unwrap();
        assert!(done);
        assert_eq!(entries, vec![tcp_snat(), udp_dnat(), ipv6_plain()]);
    }

    #[test]
    fn more_datagrams_to_come_without_done() {
        assert!(!parse(&entry_message(&tcp_snat())).unwrap().0);
    }

    #[test]
    fn kernel_error_carries_the_errno() {
        let mut payload = (-libc::EPERM).to_ne_bytes().to_vec();
        // nlmsgerr echoes the request.
        payload.extend_from_slice(&dump_request(DumpRequest, SEQ));
        let error = parse(&message(libc::NLMSG_ERROR as u16, &payload)).unwrap_err();
        assert!(matches!(
            error,
            ConntrackError::Netlink(NetlinkError::Kernel {
                code: libc::EPERM,
                ..
            })
        ));
        assert!(
            error.to_string().contains("Operation not permitted"),
            "{error}"
        );
    }

    #[test]
    fn foreign_sequence_number_is_an_error() {
        let error: ConntrackError =
            parse_datagram::<EntryMessage>(&done(), Some(SEQ + 1), |_| Ok(()))
                .unwrap_err()
                .into();
        assert!(matches!(
            error,
            ConntrackError::Netlink(NetlinkError::Sequence {
                expected: 8,
                got: SEQ
            })
        ));
    }

    #[test]
    fn truncated_at_every_offset() {
        let bytes = dump_bytes();
        let boundaries: Vec<usize> = {
            let mut offsets = vec![0];
            for message in [tcp_snat(), udp_dnat(), ipv6_plain()] {
                offsets.push(offsets.last().unwrap() + entry_message(&message).len());
            }
            offsets
        };
        for cut in 0..bytes.len() {
            match parse(&bytes[..cut]) {
                Ok((false, _)) if boundaries.contains(&cut) => {}
                Err(ConntrackError::Netlink(NetlinkError::Malformed { .. }))
                    if !boundaries.contains(&cut) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn entries_before_a_malformed_message_are_handed_over_then_the_error() {
        let cut = entry_message(&tcp_snat()).len() + NLMSG_HDRLEN + 6;
        let mut seen = Vec::new();
        let error = parse_datagram(
            &dump_bytes()[..cut],
            Some(SEQ),
            each_entry(|entry| seen.push(entry)),
        )
        .unwrap_err();
        assert!(matches!(error, NetlinkError::Malformed { .. }), "{error}");
        assert_eq!(seen, vec![tcp_snat()]);
    }

    #[test]
    fn bad_attribute_lengths_are_malformed() {
        let good = entry_message(&tcp_snat());
        // Byte offsets of attribute headers: the CTA_TUPLE_ORIG header, the nested CTA_TUPLE_IP
        // header inside it, and its first address attribute.
        let orig = NLMSG_HDRLEN + NFGENMSG_LEN;
        for (at, len) in [
            (orig, 3u16),      // shorter than its header
            (orig, 0xfff0),    // longer than the message
            (orig + 4, 0x100), // nested: longer than its parent
            (orig + 8, 7),     // an IPv4 address of 3 bytes
            (orig + 8, 4 + 5), // an address of 5 bytes
        ] {
            let mut bytes = good.clone();
            bytes[at..at + 2].copy_from_slice(&len.to_ne_bytes());
            assert!(
                matches!(
                    parse(&bytes),
                    Err(ConntrackError::Netlink(NetlinkError::Malformed { .. }))
                ),
                "length {len} at {at}: {:?}",
                parse(&bytes)
            );
        }
    }

    #[test]
    fn trailing_garbage_is_malformed() {
        let mut payload = vec![libc::AF_INET as u8, NFNETLINK_V0, 0, 0];
        payload.extend(port_tuple(CTA_TUPLE_ORIG, &tcp_snat().original));
        payload.extend([0xff, 0xff]);
        let error = parse(&message(NFNL_SUBSYS_CTNETLINK << 8, &payload)).unwrap_err();
        assert!(
            matches!(
                error,
                ConntrackError::Netlink(NetlinkError::Malformed { offset: 0, .. })
            ),
            "{error}"
        );
        let error = parse(&message(NFNL_SUBSYS_CTNETLINK << 8, &[2, 0])).unwrap_err();
        assert!(
            matches!(
                error,
                ConntrackError::Netlink(NetlinkError::Malformed { offset: 0, .. })
            ),
            "{error}"
        );
        assert!(error.to_string().contains("nfgenmsg"), "{error}");
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let bytes = dump_bytes();
        for at in 0..bytes.len() {
            for value in [0x00, 0x03, 0x7f, 0xff] {
                let mut corrupted = bytes.clone();
                corrupted[at] = value;
                let _ = parse(&corrupted);
            }
        }
        // And noise: a xorshift stream cut at every length.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..512)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        for len in 0..noise.len() {
            let _ = parse(&noise[..len]);
        }
    }
}
