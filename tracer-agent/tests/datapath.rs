//! The real kernel classifiers under `BPF_PROG_TEST_RUN`: crafted packets in, the exact flow
//! table and datapath counters out. The harness (a fresh node per test) is in `common`.
mod common;

use std::net::SocketAddr;

use common::{
    ETH_HLEN, Node, Skb, UNTAGGED_IPV4_MIN, UNTAGGED_IPV6_MIN, addr, key, on_fresh_node,
    on_fresh_node_with_table,
};
use tracer_agent::{
    aggregate::{Aggregator, NatTable, Unread},
    context::NodeContext,
};
use tracer_common::{
    DIR_HI_TO_LO, DIR_LO_TO_HI,
    DatapathCounter::{self, *},
    FlowKey, FlowStats, Hook, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN,
    test_support::craft::{
        ETH_P_8021AD, ETH_P_8021Q, ExtHeader, Fragment, Frame, Icmp, arp_request,
    },
};

/// What `Node::flows` puts in place of a handshake timestamp that was set.
const SEEN: u64 = 1;

impl Node {
    /// The flow table, sorted, with each handshake timestamp that is set replaced by `SEEN`,
    /// so that whole entries compare exactly.
    fn flows(&self) -> Vec<(FlowKey, FlowStats)> {
        let mut flows = self.datapath.flows().expect("reading the flow table");
        for (_, stats) in &mut flows {
            stats.syn_ns = stats.syn_ns.min(SEEN);
            stats.synack_ns = stats.synack_ns.min(SEEN);
        }
        flows.sort_by_key(|&(key, _)| key);
        flows
    }

    fn assert_flows(&self, mut expected: Vec<(FlowKey, FlowStats)>) {
        expected.sort_by_key(|&(key, _)| key);
        assert_eq!(self.flows(), expected);
    }
}

/// Expected counter deltas in the shape `Node::counter_deltas` returns them.
fn counts(expected: &[(DatapathCounter, u64)]) -> Vec<(&'static str, u64)> {
    DatapathCounter::ALL
        .iter()
        .filter_map(|&counter| {
            let (_, delta) = expected.iter().find(|&&(c, _)| c == counter)?;
            Some((counter.name(), *delta))
        })
        .collect()
}

/// An entry's fields fixed by the first packet: the interface and hook that saw it, its direction.
fn first_seen(owner_ifindex: u32, hook: Hook, dir: usize) -> FlowStats {
    FlowStats {
        owner_ifindex,
        first_hook: hook as u8,
        first_dir: dir as u8,
        ..FlowStats::default()
    }
}

/// `FlowStats::tcp_flags` from the flags seen in each direction.
fn flags(lo_to_hi: u8, hi_to_lo: u8) -> u32 {
    u32::from(lo_to_hi) | u32::from(hi_to_lo) << 8
}

/// SYN and ACK from the client at a pod veth's ingress, SYN-ACK from the server at its egress:
/// one flow, both directions, both handshake timestamps. `client` must sort below `server`.
fn tcp_handshake(client: &str, server: &str) {
    let (client, server) = (addr(client), addr(server));
    on_fresh_node(1, move |node| {
        let pod = node.ifindex[0];
        let syn = Frame::tcp(client, server, TCP_SYN).build();
        let syn_ack = Frame::tcp(server, client, TCP_SYN | TCP_ACK).build();
        let ack = Frame::tcp(client, server, TCP_ACK).payload(100).build();
        node.run(Hook::Ingress, Skb::at(pod), &syn.bytes);
        node.run(Hook::Egress, Skb::at(pod), &syn_ack.bytes);
        node.run(Hook::Ingress, Skb::at(pod), &ack.bytes);

        let stats = FlowStats {
            packets: [2, 1],
            bytes: [(syn.l3_len + ack.l3_len) as u64, syn_ack.l3_len as u64],
            syn_ns: SEEN,
            synack_ns: SEEN,
            tcp_flags: flags(TCP_SYN | TCP_ACK, TCP_SYN | TCP_ACK),
            first_tcp_flags: TCP_SYN,
            ..first_seen(pod, Hook::Ingress, DIR_LO_TO_HI)
        };
        node.assert_flows(vec![(key(PROTO_TCP, client, server), stats)]);
        let raw = node.datapath.flows().expect("reading the flow table")[0].1;
        assert!(raw.syn_ns <= raw.synack_ns, "SYN after SYN-ACK: {raw:?}");
        assert_eq!(
            node.counter_deltas(),
            counts(&[(Seen, 3), (Counted, 3), (FlowsCreated, 1)])
        );
    });
}

/// Two requests leaving at an interface's egress and a reply arriving at its ingress: the reply
/// counts in the reverse direction. `server` must sort below `client`, so the first packet
/// goes from the high endpoint to the low one.
fn udp_exchange(client: &str, server: &str) {
    let (client, server) = (addr(client), addr(server));
    on_fresh_node(1, move |node| {
        let eni = node.ifindex[0];
        let request = Frame::udp(client, server).payload(30).build();
        let reply = Frame::udp(server, client).payload(200).build();
        node.run(Hook::Egress, Skb::at(eni), &request.bytes);
        node.run(Hook::Egress, Skb::at(eni), &request.bytes);
        node.run(Hook::Ingress, Skb::at(eni), &reply.bytes);

        let stats = FlowStats {
            packets: [1, 2],
            bytes: [reply.l3_len as u64, 2 * request.l3_len as u64],
            ..first_seen(eni, Hook::Egress, DIR_HI_TO_LO)
        };
        node.assert_flows(vec![(key(PROTO_UDP, server, client), stats)]);
        assert_eq!(
            node.counter_deltas(),
            counts(&[(Seen, 3), (Counted, 3), (FlowsCreated, 1)])
        );
    });
}

/// First, middle and last fragment of one UDP datagram add up in one flow; the last fragment
/// ends the datagram, so one more fragment with its id is no longer attributed.
fn fragments_add_up(client: &str, server: &str, id: u32) {
    let (client, server) = (addr(client), addr(server));
    on_fresh_node(1, move |node| {
        let eni = node.ifindex[0];
        let part = |offset, more, payload| {
            let fragment = Fragment { id, offset, more };
            Frame::udp(client, server)
                .fragment(fragment)
                .payload(payload)
                .build()
        };
        // 8 bytes of UDP header and 16 of data: the next fragment starts at 3 × 8 bytes.
        let fragments = [part(0, true, 16), part(3, true, 24), part(6, false, 10)];
        for fragment in &fragments {
            node.run(Hook::Ingress, Skb::at(eni), &fragment.bytes);
        }
        let l3_bytes = fragments.iter().map(|f| f.l3_len as u64).sum();
        let expected = vec![(
            key(PROTO_UDP, client, server),
            FlowStats {
                packets: [3, 0],
                bytes: [l3_bytes, 0],
                ..first_seen(eni, Hook::Ingress, DIR_LO_TO_HI)
            },
        )];
        node.assert_flows(expected.clone());
        assert_eq!(
            node.counter_deltas(),
            counts(&[(Seen, 3), (Counted, 3), (FlowsCreated, 1)])
        );

        node.run(Hook::Ingress, Skb::at(eni), &fragments[2].bytes);
        node.assert_flows(expected);
        assert_eq!(
            node.counter_deltas(),
            counts(&[(Seen, 1), (FragmentUnmatched, 1)])
        );
    });
}

#[test]
fn ipv4_tcp_handshake_is_one_flow_with_both_directions() {
    tcp_handshake("10.0.0.1:40000", "10.0.0.2:80");
}

#[test]
fn ipv6_tcp_handshake_is_one_flow_with_both_directions() {
    tcp_handshake("[fd00::1]:40000", "[fd00::2]:443");
}

#[test]
fn ipv4_udp_reply_at_the_other_hook_counts_in_reverse() {
    // Same address: the port decides the order.
    udp_exchange("10.0.0.2:5353", "10.0.0.2:53");
}

#[test]
fn ipv6_udp_reply_at_the_other_hook_counts_in_reverse() {
    // fd00::1:0 sorts above fd00::2: the low 64 bits decide the order.
    udp_exchange("[fd00::1:0]:5353", "[fd00::2]:53");
}

#[test]
fn ipv4_fragments_add_up_in_one_flow() {
    fragments_add_up("10.0.0.1:4000", "10.0.0.2:4789", 0xbeef);
}

#[test]
fn ipv6_fragments_add_up_in_one_flow() {
    fragments_add_up("[fd00::1]:4000", "[fd00::2]:4789", 0x1234_5678);
}

#[test]
fn later_fragment_without_its_first_is_not_attributed() {
    on_fresh_node(1, |node| {
        let eni = node.ifindex[0];
        let mut expected = Vec::new();
        for (client, server) in [
            ("10.0.0.1:4000", "10.0.0.2:53"),
            ("[fd00::1]:4000", "[fd00::2]:53"),
        ] {
            let (client, server) = (addr(client), addr(server));
            // A flow of the same endpoints exists: the fragment still must not guess it.
            let datagram = Frame::udp(client, server).build();
            node.run(Hook::Ingress, Skb::at(eni), &datagram.bytes);
            let later = Frame::udp(client, server)
                .fragment(Fragment {
                    id: 9,
                    offset: 3,
                    more: true,
                })
                .payload(24)
                .build();
            node.run(Hook::Ingress, Skb::at(eni), &later.bytes);
            let stats = FlowStats {
                packets: [1, 0],
                bytes: [datagram.l3_len as u64, 0],
                ..first_seen(eni, Hook::Ingress, DIR_LO_TO_HI)
            };
            expected.push((key(PROTO_UDP, client, server), stats));
        }
        node.assert_flows(expected);
        assert_eq!(
            node.counter_deltas(),
            counts(&[
                (Seen, 4),
                (Counted, 2),
                (FragmentUnmatched, 2),
                (FlowsCreated, 2)
            ])
        );
    });
}

#[test]
fn vlan_tagged_ipv4_single_and_qinq() {
    on_fresh_node(1, |node| {
        let branch_eni = node.ifindex[0];
        let server = addr("10.0.0.2:443");
        let mut expected = Vec::new();
        for (port, tags) in [
            (1001, &[(ETH_P_8021Q, 7)][..]),
            (1002, &[(ETH_P_8021AD, 100), (ETH_P_8021Q, 7)]),
        ] {
            let client = addr(&format!("10.0.0.1:{port}"));
            let frame = tags
                .iter()
                .fold(Frame::udp(client, server), |frame, &(tpid, vid)| {
                    frame.vlan(tpid, vid)
                })
                .payload(10)
                .build();
            node.run(Hook::Ingress, Skb::at(branch_eni), &frame.bytes);
            let stats = FlowStats {
                packets: [1, 0],
                bytes: [frame.l3_len as u64, 0],
                ..first_seen(branch_eni, Hook::Ingress, DIR_LO_TO_HI)
            };
            expected.push((key(PROTO_UDP, client, server), stats));
        }
        node.assert_flows(expected);
        assert_eq!(
            node.counter_deltas(),
            counts(&[(Seen, 2), (Counted, 2), (FlowsCreated, 2)])
        );
    });
}

#[test]
fn ipv4_options_do_not_shift_the_ports() {
    on_fresh_node(1, |node| {
        let pod = node.ifindex[0];
        let server = addr("10.0.0.2:8080");
        let mut expected = Vec::new();
        // No-operation options (0x01): ports read at offset 20 would come out as 0x0101.
        for (port, options) in [(2001, vec![1; 4]), (2002, vec![1; 40])] {
            let client = addr(&format!("10.0.0.1:{port}"));
            let frame = Frame::tcp(client, server, TCP_ACK)
                .ipv4_options(&options)
                .payload(5)
                .build();
            node.run(Hook::Ingress, Skb::at(pod), &frame.bytes);
            let stats = FlowStats {
                packets: [1, 0],
                bytes: [frame.l3_len as u64, 0],
                tcp_flags: flags(TCP_ACK, 0),
                first_tcp_flags: TCP_ACK,
                ..first_seen(pod, Hook::Ingress, DIR_LO_TO_HI)
            };
            expected.push((key(PROTO_TCP, client, server), stats));
        }
        node.assert_flows(expected);
        assert_eq!(
            node.counter_deltas(),
            counts(&[(Seen, 2), (Counted, 2), (FlowsCreated, 2)])
        );
    });
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_transport_header() {
    on_fresh_node(1, |node| {
        let pod = node.ifindex[0];
        let (client, server) = (addr("[fd00::1]:40000"), addr("[fd00::2]:443"));
        let syn = Frame::tcp(client, server, TCP_SYN)
            .ext_header(ExtHeader::HopByHop(0))
            .ext_header(ExtHeader::DestinationOptions(1))
            .ext_header(ExtHeader::Routing(2))
            .build();
        node.run(Hook::Ingress, Skb::at(pod), &syn.bytes);
        let stats = FlowStats {
            packets: [1, 0],
            bytes: [syn.l3_len as u64, 0],
            syn_ns: SEEN,
            tcp_flags: flags(TCP_SYN, 0),
            first_tcp_flags: TCP_SYN,
            ..first_seen(pod, Hook::Ingress, DIR_LO_TO_HI)
        };
        node.assert_flows(vec![(key(PROTO_TCP, client, server), stats)]);
        assert_eq!(
            node.counter_deltas(),
            counts(&[(Seen, 1), (Counted, 1), (FlowsCreated, 1)])
        );
    });
}

#[test]
fn an_extension_chain_longer_than_walked_is_not_guessed() {
    on_fresh_node(1, |node| {
        let pod = node.ifindex[0];
        let (client, server) = (addr("[fd00::1]:40000"), addr("[fd00::2]:443"));
        let frame = (0..7)
            .fold(Frame::tcp(client, server, TCP_SYN), |frame, _| {
                frame.ext_header(ExtHeader::DestinationOptions(0))
            })
            .build();
        node.run(Hook::Ingress, Skb::at(pod), &frame.bytes);
        node.assert_flows(vec![]);
        assert_eq!(node.counter_deltas(), counts(&[(Seen, 1), (Truncated, 1)]));
    });
}

#[test]
fn truncated_at_every_header_boundary_is_never_attributed() {
    on_fresh_node(1, |node| {
        let eni = node.ifindex[0];
        let (client4, server4) = (addr("10.0.0.1:40000"), addr("10.0.0.2:80"));
        let (client6, server6) = (addr("[fd00::1]:40000"), addr("[fd00::2]:80"));
        let echo = Icmp::EchoRequest { id: 5, seq: 1 };
        // Each frame with the shortest cut the kernel lets us run.
        let frames = [
            (
                "IPv4 TCP, 802.1Q tag, IP and TCP options",
                Frame::tcp(client4, server4, TCP_ACK)
                    .vlan(ETH_P_8021Q, 5)
                    .ipv4_options(&[1; 8])
                    .tcp_options(&[1; 12]),
                ETH_HLEN,
            ),
            (
                "IPv4 UDP, Q-in-Q",
                Frame::udp(client4, server4)
                    .vlan(ETH_P_8021AD, 1)
                    .vlan(ETH_P_8021Q, 2),
                ETH_HLEN,
            ),
            (
                "IPv4 ICMP echo",
                Frame::icmp(client4.ip(), server4.ip(), echo),
                UNTAGGED_IPV4_MIN,
            ),
            (
                "IPv6 UDP first fragment, 802.1Q tag",
                Frame::udp(client6, server6)
                    .vlan(ETH_P_8021Q, 5)
                    .fragment(Fragment {
                        id: 1,
                        offset: 0,
                        more: true,
                    }),
                ETH_HLEN,
            ),
            (
                "IPv6 TCP, hop-by-hop, destination options, routing",
                Frame::tcp(client6, server6, TCP_SYN)
                    .ext_header(ExtHeader::HopByHop(0))
                    .ext_header(ExtHeader::DestinationOptions(1))
                    .ext_header(ExtHeader::Routing(0)),
                UNTAGGED_IPV6_MIN,
            ),
            (
                "IPv6 ICMPv6 echo",
                Frame::icmp(client6.ip(), server6.ip(), echo),
                UNTAGGED_IPV6_MIN,
            ),
        ];
        let mut failures = Vec::new();
        for (name, frame, shortest) in frames {
            let frame = frame.payload(20).build();
            let (_, headers_end) = *frame.boundaries.last().expect("a frame has headers");
            for len in shortest..headers_end {
                node.run(Hook::Ingress, Skb::at(eni), &frame.bytes[..len]);
                let deltas = node.counter_deltas();
                let flows = node.flows();
                if deltas != counts(&[(Seen, 1), (Truncated, 1)]) || !flows.is_empty() {
                    let (header, _) = frame
                        .boundaries
                        .iter()
                        .find(|&&(_, end)| len < end)
                        .expect("the cut is inside the headers");
                    failures.push(format!(
                        "{name}: cut to {len} of {} bytes, inside the {header} header: \
                         counters {deltas:?}, {} flows",
                        frame.bytes.len(),
                        flows.len()
                    ));
                    let keys: Vec<FlowKey> = flows.iter().map(|&(key, _)| key).collect();
                    node.datapath
                        .forget(&keys)
                        .expect("emptying the flow table");
                }
            }
        }
        assert!(
            failures.is_empty(),
            "truncated packets were attributed or miscounted:\n{}",
            failures.join("\n")
        );
    });
}

#[test]
fn a_length_field_that_disagrees_with_the_packet_is_never_believed() {
    on_fresh_node(1, |node| {
        let eni = node.ifindex[0];
        let ipv4 = Frame::tcp(addr("10.0.0.1:40000"), addr("10.0.0.2:80"), TCP_ACK)
            .payload(20)
            .build();
        let ipv6 = Frame::udp(addr("[fd00::1]:4000"), addr("[fd00::2]:53"))
            .payload(20)
            .build();
        // (frame, offset of the length field, the length written there)
        let lies = [
            // More than the buffer holds: the datagram was cut, or lies.
            (&ipv4, ipv4.l3_offset + 2, ipv4.l3_len + 100),
            (&ipv6, ipv6.l3_offset + 4, ipv6.l3_len),
            // Less than the IP and TCP headers: the TCP header is not part of the datagram.
            (&ipv4, ipv4.l3_offset + 2, 30),
        ];
        for (frame, offset, length) in lies {
            let mut bytes = frame.bytes.clone();
            bytes[offset..offset + 2].copy_from_slice(&(length as u16).to_be_bytes());
            node.run(Hook::Ingress, Skb::at(eni), &bytes);
        }
        node.assert_flows(Vec::new());
        assert_eq!(node.counter_deltas(), counts(&[(Seen, 3), (Truncated, 3)]));
    });
}

#[test]
fn non_ip_frames_are_counted_as_not_ip() {
    on_fresh_node(1, |node| {
        let eni = node.ifindex[0];
        let arp = arp_request("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        // More than two tags is not something a node sees; the datapath does not look inside.
        let triple_tagged = Frame::udp(addr("10.0.0.1:1"), addr("10.0.0.2:2"))
            .vlan(ETH_P_8021AD, 1)
            .vlan(ETH_P_8021Q, 2)
            .vlan(ETH_P_8021Q, 3)
            .build();
        node.run(Hook::Ingress, Skb::at(eni), &arp);
        node.run(Hook::Ingress, Skb::at(eni), &triple_tagged.bytes);
        node.assert_flows(Vec::new());
        assert_eq!(node.counter_deltas(), counts(&[(Seen, 2), (NotIp, 2)]));
    });
}

#[test]
fn icmp_echo_request_and_reply_are_one_flow() {
    on_fresh_node(1, |node| {
        let pod = node.ifindex[0];
        let mut expected = Vec::new();
        for (proto, client, server) in [
            (PROTO_ICMP, "10.0.0.1:77", "10.0.0.2:77"),
            (PROTO_ICMPV6, "[fd00::1]:77", "[fd00::2]:77"),
        ] {
            // The echo identifier stands in for both ports.
            let (client, server) = (addr(client), addr(server));
            let request = Icmp::EchoRequest { id: 77, seq: 1 };
            let reply = Icmp::EchoReply { id: 77, seq: 1 };
            let request = Frame::icmp(client.ip(), server.ip(), request)
                .payload(56)
                .build();
            let reply = Frame::icmp(server.ip(), client.ip(), reply)
                .payload(56)
                .build();
            node.run(Hook::Ingress, Skb::at(pod), &request.bytes);
            node.run(Hook::Egress, Skb::at(pod), &reply.bytes);
            let stats = FlowStats {
                packets: [1, 1],
                bytes: [request.l3_len as u64, reply.l3_len as u64],
                ..first_seen(pod, Hook::Ingress, DIR_LO_TO_HI)
            };
            expected.push((key(proto, client, server), stats));
        }
        // Other ICMP messages have no identifier: ports 0.
        let (client, server) = (addr("10.0.0.1:0"), addr("10.0.0.2:0"));
        let unreachable = Icmp::Other {
            icmp_type: 3,
            code: 3,
        };
        let unreachable = Frame::icmp(server.ip(), client.ip(), unreachable)
            .payload(28)
            .build();
        node.run(Hook::Egress, Skb::at(pod), &unreachable.bytes);
        let stats = FlowStats {
            packets: [0, 1],
            bytes: [0, unreachable.l3_len as u64],
            ..first_seen(pod, Hook::Egress, DIR_HI_TO_LO)
        };
        expected.push((key(PROTO_ICMP, client, server), stats));
        node.assert_flows(expected);
        assert_eq!(
            node.counter_deltas(),
            counts(&[(Seen, 5), (Counted, 5), (FlowsCreated, 3)])
        );
    });
}

#[test]
fn a_packet_crossing_two_interfaces_is_counted_once() {
    on_fresh_node(2, |node| {
        let (pod, eni) = (node.ifindex[0], node.ifindex[1]);
        let (client, server) = (addr("10.0.0.1:40000"), addr("10.0.0.2:443"));
        let syn = Frame::tcp(client, server, TCP_SYN).build();
        let syn_ack = Frame::tcp(server, client, TCP_SYN | TCP_ACK).build();
        // Out of the pod: its veth's ingress, then the ENI's egress; the reply the other way.
        node.run(Hook::Ingress, Skb::at(pod), &syn.bytes);
        node.run(Hook::Egress, Skb::at(eni), &syn.bytes);
        node.run(Hook::Ingress, Skb::at(eni), &syn_ack.bytes);
        node.run(Hook::Egress, Skb::at(pod), &syn_ack.bytes);
        let stats = FlowStats {
            packets: [1, 1],
            bytes: [syn.l3_len as u64, syn_ack.l3_len as u64],
            syn_ns: SEEN,
            synack_ns: SEEN,
            tcp_flags: flags(TCP_SYN, TCP_SYN | TCP_ACK),
            first_tcp_flags: TCP_SYN,
            ..first_seen(pod, Hook::Ingress, DIR_LO_TO_HI)
        };
        node.assert_flows(vec![(key(PROTO_TCP, client, server), stats)]);
        assert_eq!(
            node.counter_deltas(),
            counts(&[(Seen, 4), (Counted, 2), (Duplicate, 2), (FlowsCreated, 1)])
        );
    });
}

#[test]
fn gso_packet_counts_every_segment_with_its_headers() {
    on_fresh_node(1, |node| {
        let pod = node.ifindex[0];
        let mut expected = Vec::new();
        for (client, server) in [
            ("10.0.0.1:40000", "10.0.0.2:80"),
            ("[fd00::1]:40000", "[fd00::2]:80"),
        ] {
            let (client, server) = (addr(client), addr(server));
            // With the timestamps option: 32-byte TCP headers, known only from the data offset.
            let timestamps = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
            let frame = Frame::tcp(client, server, TCP_ACK)
                .tcp_options(&timestamps)
                .payload(4 * 500)
                .build();
            let gso = Skb {
                ifindex: pod,
                gso_segs: 4,
                gso_size: 500,
            };
            node.run(Hook::Ingress, gso, &frame.bytes);
            let skb_l3_len = frame.bytes.len() - frame.l3_offset;
            let stats = FlowStats {
                packets: [4, 0],
                bytes: [(skb_l3_len + 3 * frame.header_len()) as u64, 0],
                tcp_flags: flags(TCP_ACK, 0),
                first_tcp_flags: TCP_ACK,
                ..first_seen(pod, Hook::Ingress, DIR_LO_TO_HI)
            };
            expected.push((key(PROTO_TCP, client, server), stats));
        }
        node.assert_flows(expected);
        assert_eq!(
            node.counter_deltas(),
            counts(&[(Seen, 2), (Counted, 2), (FlowsCreated, 2)])
        );
    });
}

#[test]
fn ethernet_padding_is_not_counted_as_l3_bytes() {
    on_fresh_node(1, |node| {
        let eni = node.ifindex[0];
        let (client, server) = (addr("10.0.0.1:40000"), addr("10.0.0.2:53"));
        // 42 bytes of headers, padded to the 60-byte Ethernet minimum.
        let frame = Frame::udp(client, server).pad_to(60).build();
        assert_eq!((frame.bytes.len(), frame.l3_len), (60, 28));
        node.run(Hook::Ingress, Skb::at(eni), &frame.bytes);
        let stats = FlowStats {
            packets: [1, 0],
            bytes: [28, 0],
            ..first_seen(eni, Hook::Ingress, DIR_LO_TO_HI)
        };
        node.assert_flows(vec![(key(PROTO_UDP, client, server), stats)]);
        assert_eq!(
            node.counter_deltas(),
            counts(&[(Seen, 1), (Counted, 1), (FlowsCreated, 1)])
        );
    });
}

#[test]
fn connections_evicted_before_a_poll_are_counted_as_lost() {
    const TABLE: u32 = 1024;
    on_fresh_node_with_table(1, TABLE, |node| {
        let eni = node.ifindex[0];
        let mut aggregator = Aggregator::default();
        let mut unread = Unread::default();
        let mut poll = |node: &mut Node, aggregator: &mut Aggregator| {
            let created = node.datapath.counters().expect("counters")[FlowsCreated as usize];
            let flows = node.datapath.flows().expect("flow table");
            let result = aggregator.poll(&flows, &NodeContext::default(), &NatTable::default(), 0);
            unread.update(created, &result);
            (created, result.new_entries, unread.lost())
        };
        let send = |node: &mut Node, flows: std::ops::Range<u32>| {
            for n in flows {
                let client =
                    SocketAddr::new(std::net::Ipv4Addr::from(0x0a80_0000 + n).into(), 40000);
                let frame = Frame::udp(client, addr("10.0.0.2:53")).payload(18).build();
                node.run(Hook::Ingress, Skb::at(eni), &frame.bytes);
            }
        };
        // Fewer connections than the table holds between two polls: every one is read.
        send(node, 0..500);
        assert_eq!(poll(node, &mut aggregator), (500, 500, 0));
        // Three times the table between two polls: the LRU table evicts what no poll read.
        send(node, 500..3_500);
        let (created, read, lost) = poll(node, &mut aggregator);
        assert_eq!(created, 3_500, "the kernel counts every entry it created");
        assert!(
            read <= u64::from(TABLE),
            "{read} entries in a {TABLE}-entry table"
        );
        assert_eq!(
            lost,
            3_500 - 500 - read,
            "created, minus read at either poll"
        );
    });
}
