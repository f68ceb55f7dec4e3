//! Blind interfaces: traffic crossed an attached interface and the tracer counted none of it.
//!
//! A program ahead of the tracer's on a hook that ends the chain (a network-policy agent's
//! clsact filter returning `TC_ACT_OK` at a higher priority, a tcx program that drops or
//! redirects) hides the interface's packets from the tracer. Each poll compares the kernel's
//! own packet counters of every attached interface (`IFLA_STATS64`, from the link dump the
//! poll makes anyway) with the packets the flow table says the tracer counted for it (also read
//! anyway): an interface whose counters moved while nothing was counted for it is blind. The
//! datapath does no more work per packet for it.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use crate::{
    aggregate::PacketsSeen, datapath::discovery::Interface, datapath::discovery::InterfaceKind,
};

/// Fewer packets than this through an interface between two polls do not make it blind: ARP
/// and neighbour discovery move the counters without making a connection.
pub(crate) const MIN_PACKETS: u64 = 8;

/// One interface at the end of a poll: the kernel's count of its packets, and the packets the
/// tracer counted for it since it was first judged. Both only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reading {
    pub(crate) kernel_packets: u64,
    pub(crate) seen_packets: u64,
}

/// The decision: blind when the kernel counted at least [`MIN_PACKETS`] packets through the
/// interface between the two readings and the tracer counted none for it. A kernel count that
/// went down (a counter reset) judges nothing.
pub(crate) fn is_blind(before: Reading, after: Reading) -> bool {
    let moved = after.kernel_packets.saturating_sub(before.kernel_packets);
    moved >= MIN_PACKETS && after.seen_packets == before.seen_packets
}

/// The interfaces' last readings and the blind ones, from poll to poll.
#[derive(Debug, Default)]
pub(crate) struct Blindness {
    readings: HashMap<u32, Reading>,
    blind: BTreeSet<String>,
}

impl Blindness {
    /// Judges each of the `attached` interfaces over the time since the previous poll, with
    /// what this poll's flow table says was `seen`. `on_node` tells an address of this node (a
    /// node address, a local pod). An interface judged for the first time is never blind.
    pub(crate) fn update(
        &mut self,
        attached: &[Interface],
        seen: &PacketsSeen,
        on_node: impl Fn(&IpAddr) -> bool,
    ) {
        let leaving_node = packets_leaving_node(seen, on_node);
        let mut readings = HashMap::with_capacity(attached.len());
        let mut blind = BTreeSet::new();
        for interface in attached {
            let Some(kernel_packets) = interface.packets else {
                continue;
            };
            let before = self.readings.get(&interface.index).copied();
            let after = Reading {
                kernel_packets,
                seen_packets: before.map_or(0, |before| before.seen_packets)
                    + seen_for(interface, seen, leaving_node),
            };
            if before.is_some_and(|before| is_blind(before, after)) {
                blind.insert(interface.name.clone());
            }
            readings.insert(interface.index, after);
        }
        self.readings = readings;
        self.blind = blind;
    }

    /// The blind interfaces' names, sorted.
    pub(crate) fn blind(&self) -> &BTreeSet<String> {
        &self.blind
    }
}

/// The packets counted for `interface` this poll: those of the connections it owns (its hooks
/// saw them first), and those the connections it carries counted on another hook (a packet is
/// counted once per node, at the first hook it crosses; on the second it is a duplicate, not
/// lost). A pod veth carries its pod's connections; a node ENI carries every connection with an
/// end off the node, since which ENI one leaves by is policy routing's choice.
fn seen_for(interface: &Interface, seen: &PacketsSeen, leaving_node: u64) -> u64 {
    let owned = seen.by_owner.get(&interface.index).copied().unwrap_or(0);
    let carried = match interface.kind {
        InterfaceKind::Pod => interface
            .pod_addresses
            .iter()
            .map(|address| seen.by_address.get(address).copied().unwrap_or(0))
            .sum(),
        InterfaceKind::Node => leaving_node,
    };
    owned + carried
}

/// The packets of the connections with an end off the node. Link-local and multicast ends
/// (neighbour discovery) never leave a link, so they are not off the node.
fn packets_leaving_node(seen: &PacketsSeen, on_node: impl Fn(&IpAddr) -> bool) -> u64 {
    let stays_on_link = |address: &IpAddr| match address {
        IpAddr::V4(v4) => v4.is_multicast() || v4.is_broadcast() || v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_multicast() || v6.is_unicast_link_local() || v6.is_loopback(),
    };
    seen.by_address
        .iter()
        .filter(|(address, _)| !on_node(address) && !stays_on_link(address))
        .map(|(_, packets)| packets)
        .sum()
}

/// The `/readyz` line and log message naming a blind interface: what it means and where to look.
pub(crate) fn describe(name: &str) -> String {
    format!(
        "blind: {name} carried traffic the tracer counted nowhere since the previous poll: a program ahead of the tracer's on its hooks ends the chain (list them with `bpftool net show dev {name}`; docs/deploy.md, \"A blind interface\")"
    )
}

/// The addresses of this node, for [`Blindness::update`].
pub(crate) fn on_node<'a>(
    node_ips: &'a HashSet<IpAddr>,
    local_pods: &'a HashSet<IpAddr>,
) -> impl Fn(&IpAddr) -> bool + 'a {
    |address| node_ips.contains(address) || local_pods.contains(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(kernel_packets: u64, seen_packets: u64) -> Reading {
        Reading {
            kernel_packets,
            seen_packets,
        }
    }

    #[test]
    fn blind_when_the_kernel_counts_packets_and_the_tracer_none() {
        assert!(is_blind(reading(100, 40), reading(150, 40)));
        assert!(is_blind(reading(100, 40), reading(100 + MIN_PACKETS, 40)));
        assert!(!is_blind(reading(100, 40), reading(150, 41)), "one seen");
        assert!(
            !is_blind(reading(100, 40), reading(100 + MIN_PACKETS - 1, 40)),
            "ARP alone"
        );
        assert!(!is_blind(reading(100, 40), reading(100, 40)), "quiet");
        assert!(!is_blind(reading(100, 40), reading(3, 40)), "counter reset");
    }

    fn interface(index: u32, kind: InterfaceKind, packets: u64, pods: &[&str]) -> Interface {
        Interface {
            name: format!("if{index}"),
            index,
            kind,
            packets: Some(packets),
            pod_addresses: pods.iter().map(|pod| pod.parse().unwrap()).collect(),
        }
    }

    fn seen(owners: &[(u32, u64)], addresses: &[(&str, u64)]) -> PacketsSeen {
        PacketsSeen {
            by_owner: owners.iter().copied().collect(),
            by_address: addresses
                .iter()
                .map(|(address, packets)| (address.parse().unwrap(), *packets))
                .collect(),
        }
    }

    const NODE: &str = "10.0.1.10";
    const POD_A: &str = "10.0.1.101";
    const POD_B: &str = "10.0.1.102";

    /// Polls the eni (2), pod A's veth (3) and pod B's veth (4) with these kernel counts.
    fn poll(blindness: &mut Blindness, kernel: [u64; 3], seen: &PacketsSeen) -> Vec<String> {
        let attached = [
            interface(2, InterfaceKind::Node, kernel[0], &[]),
            interface(3, InterfaceKind::Pod, kernel[1], &[POD_A]),
            interface(4, InterfaceKind::Pod, kernel[2], &[POD_B]),
        ];
        let node: HashSet<IpAddr> = [NODE.parse().unwrap()].into();
        let pods: HashSet<IpAddr> = [POD_A.parse().unwrap(), POD_B.parse().unwrap()].into();
        blindness.update(&attached, seen, on_node(&node, &pods));
        blindness.blind().iter().cloned().collect()
    }

    #[test]
    fn an_interface_is_blind_while_its_traffic_is_counted_nowhere() {
        let mut blindness = Blindness::default();
        let nothing = seen(&[], &[]);
        assert!(
            poll(&mut blindness, [1000, 1000, 1000], &nothing).is_empty(),
            "first judged: never blind"
        );
        // Pod B talks to the internet; its veth is hidden, the ENI counts the SNATed view.
        let hidden_b = seen(&[(2, 50)], &[(NODE, 50), ("203.0.113.7", 50)]);
        assert_eq!(poll(&mut blindness, [1050, 1000, 1050], &hidden_b), ["if4"]);
        // Pod A to pod B on the node: counted at A's veth, a duplicate at B's, not lost.
        let a_to_b = seen(&[(3, 30)], &[(POD_A, 30), (POD_B, 30)]);
        assert!(poll(&mut blindness, [1050, 1030, 1080], &a_to_b).is_empty());
        // Pod A to a remote host: counted at A's veth, a duplicate at the ENI.
        let a_out = seen(&[(3, 20)], &[(POD_A, 20), ("10.0.2.20", 20)]);
        assert!(poll(&mut blindness, [1070, 1050, 1080], &a_out).is_empty());
        // The ENI hidden: the node's own traffic counted nowhere.
        assert_eq!(poll(&mut blindness, [1170, 1050, 1080], &nothing), ["if2"]);
        // Recovered: counted again.
        let node_traffic = seen(&[(2, 90)], &[(NODE, 90), ("10.0.2.20", 90)]);
        assert!(poll(&mut blindness, [1260, 1050, 1080], &node_traffic).is_empty());
    }

    #[test]
    fn neighbour_discovery_is_not_traffic_leaving_the_node() {
        let mut blindness = Blindness::default();
        poll(&mut blindness, [0, 0, 0], &seen(&[], &[]));
        // An ND exchange owned by pod A's veth moves the ENI's counters too (a coincidence of
        // the window): it does not count for the ENI.
        let neighbours = seen(&[(3, 4)], &[("fe80::1", 4), ("ff02::1", 4)]);
        assert_eq!(poll(&mut blindness, [20, 4, 0], &neighbours), ["if2"]);
    }
}
