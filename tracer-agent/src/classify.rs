//! The path taxonomy (DESIGN §3) as a pure function: a connection and the node's context in,
//! a path with its labels out. No I/O, no clock: every rule is unit-tested on its own.
use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
};

use crate::cidr::Cidr;

/// Where the instance metadata service lives, on every EC2 instance.
pub const IMDS_ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 254));
const KUBELET_PORT: u16 = 10250;
const APISERVER_PORT: u16 = 443;
const DNS_PORT: u16 = 53;

macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// The label value, as dashboards and alerts spell it.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_enum!(
    /// Which way a connection goes through the node and the VPC.
    Path {
        PodToPodLocal => "pod_to_pod_local",
        PodToPodRemote => "pod_to_pod_remote",
        PodToService => "pod_to_service",
        PodToApiserver => "pod_to_apiserver",
        NodeToApiserver => "node_to_apiserver",
        ControlplaneToKubelet => "controlplane_to_kubelet",
        PodToDns => "pod_to_dns",
        PodToExternal => "pod_to_external",
        NodeToExternal => "node_to_external",
        PodToImds => "pod_to_imds",
        NodeToImds => "node_to_imds",
        NodeToNode => "node_to_node",
        ExternalToPod => "external_to_pod",
        ExternalToNode => "external_to_node",
        Unknown => "unknown",
    }
);

label_enum!(
    /// Which API server endpoint a connection used.
    Endpoint {
        Public => "public",
        Private => "private",
    }
);

label_enum!(
    /// Address translation the node applied to a connection, as observed in conntrack.
    Nat {
        None => "none",
        Snat => "snat",
        Dnat => "dnat",
    }
);

/// A connection as the classifier needs it: who started it, who answered, after NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    pub initiator: SocketAddr,
    /// The responder the packets really reached (after any DNAT on this node).
    pub responder: SocketAddr,
    pub nat: Nat,
    /// The address the initiator asked for, when DNAT rewrote it (a ClusterIP, a NodePort).
    pub requested: Option<SocketAddr>,
}

/// What the node knows about itself and its cluster.
#[derive(Clone, Debug, Default)]
pub struct NodeContext {
    pub vpc_cidrs: Vec<Cidr>,
    /// The node's own addresses (its ENIs' primary and secondary IPs that are not pods').
    pub node_ips: HashSet<IpAddr>,
    /// Pods of this node (host routes to pod interfaces).
    pub local_pods: HashSet<IpAddr>,
    /// Addresses the cluster endpoint resolves to, public NLB or private ENIs.
    pub apiserver_ips: HashSet<IpAddr>,
    /// The EKS-owned ENIs of the control plane.
    pub controlplane_ips: HashSet<IpAddr>,
    /// The kube-dns ClusterIP.
    pub cluster_dns: Option<IpAddr>,
}

/// A classified connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Classification {
    pub path: Path,
    pub endpoint: Option<Endpoint>,
    pub nat: Nat,
}

impl NodeContext {
    fn in_vpc(&self, addr: IpAddr) -> bool {
        self.vpc_cidrs.iter().any(|cidr| cidr.contains(addr))
    }

    fn is_apiserver(&self, end: SocketAddr) -> bool {
        self.apiserver_ips.contains(&end.ip())
            || (end.port() == APISERVER_PORT && self.controlplane_ips.contains(&end.ip()))
    }

    fn side(&self, addr: IpAddr) -> Side {
        if self.local_pods.contains(&addr) {
            Side::LocalPod
        } else if self.node_ips.contains(&addr) {
            Side::Node
        } else if addr.is_loopback() || is_link_local(addr) {
            Side::LinkLocal
        } else if self.vpc_cidrs.is_empty() {
            // Without the VPC's blocks, "remote" and "external" cannot be told apart.
            Side::Unclear
        } else if self.in_vpc(addr) {
            Side::Vpc
        } else {
            Side::External
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    LocalPod,
    Node,
    Vpc,
    External,
    LinkLocal,
    Unclear,
}

fn is_link_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// Classifies a connection from its initiator, most specific rule first.
pub fn classify(connection: &Connection, context: &NodeContext) -> Classification {
    use Side::*;
    let Connection {
        initiator,
        responder,
        nat,
        requested,
    } = *connection;
    let from = context.side(initiator.ip());
    let to = context.side(responder.ip());
    let endpoint = |addr| {
        Some(if context.in_vpc(addr) {
            Endpoint::Private
        } else {
            Endpoint::Public
        })
    };
    let (path, endpoint) = match (from, to) {
        (LocalPod, _) if responder.ip() == IMDS_ADDR => (Path::PodToImds, None),
        (Node, _) if responder.ip() == IMDS_ADDR => (Path::NodeToImds, None),
        (Vpc, Node)
            if responder.port() == KUBELET_PORT
                && context.controlplane_ips.contains(&initiator.ip()) =>
        {
            (Path::ControlplaneToKubelet, None)
        }
        (LocalPod, _) if context.is_apiserver(responder) => {
            (Path::PodToApiserver, endpoint(responder.ip()))
        }
        (Node, _) if context.is_apiserver(responder) => {
            (Path::NodeToApiserver, endpoint(responder.ip()))
        }
        (LocalPod, LocalPod | Vpc)
            if responder.port() == DNS_PORT
                && (requested.is_some_and(|r| Some(r.ip()) == context.cluster_dns)
                    || requested.is_none()) =>
        {
            (Path::PodToDns, None)
        }
        (LocalPod, _) if nat == Nat::Dnat => (Path::PodToService, None),
        (LocalPod, LocalPod) => (Path::PodToPodLocal, None),
        (LocalPod, Vpc) => (Path::PodToPodRemote, None),
        (LocalPod, External) => (Path::PodToExternal, None),
        (Node, External) => (Path::NodeToExternal, None),
        (Node, Vpc) => (Path::NodeToNode, None),
        (Vpc, LocalPod) => (Path::PodToPodRemote, None),
        (Vpc, Node) => (Path::NodeToNode, None),
        (External, LocalPod) => (Path::ExternalToPod, None),
        (External, Node) => (Path::ExternalToNode, None),
        _ => (Path::Unknown, None),
    };
    Classification {
        path,
        endpoint,
        nat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn end(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// The lab's node: VPC 10.0.0.0/16 plus a secondary CIDR 100.64.0.0/16 for pods.
    fn context() -> NodeContext {
        NodeContext {
            vpc_cidrs: vec![
                "10.0.0.0/16".parse().unwrap(),
                "100.64.0.0/16".parse().unwrap(),
            ],
            node_ips: [ip("10.0.1.10"), ip("10.0.1.20")].into(),
            local_pods: [
                ip("10.0.1.101"),
                ip("10.0.1.102"),
                ip("10.0.1.103"),
                ip("100.64.0.7"),
            ]
            .into(),
            apiserver_ips: [ip("203.0.113.10"), ip("10.0.1.50")].into(),
            controlplane_ips: [ip("10.0.1.50"), ip("10.0.2.50")].into(),
            cluster_dns: Some(ip("10.100.0.10")),
        }
    }

    /// initiator, responder, NAT, requested address, expected (path, endpoint).
    type Case = (
        &'static str,
        &'static str,
        Nat,
        Option<&'static str>,
        (Path, Option<Endpoint>),
    );

    fn check(
        from: &str,
        to: &str,
        nat: Nat,
        requested: Option<&str>,
        expected: (Path, Option<Endpoint>),
    ) {
        let connection = Connection {
            initiator: end(from),
            responder: end(to),
            nat,
            requested: requested.map(end),
        };
        let got = classify(&connection, &context());
        assert_eq!(
            (got.path, got.endpoint, got.nat),
            (expected.0, expected.1, nat),
            "{from} → {to} ({nat}, requested {requested:?})"
        );
    }

    #[test]
    fn every_path_of_the_taxonomy() {
        use Endpoint::*;
        use Nat::{Dnat, Snat};
        use Path::*;
        let cases: &[Case] = &[
            (
                "10.0.1.101:40000",
                "10.0.1.102:8080",
                Nat::None,
                None,
                (PodToPodLocal, None),
            ),
            (
                "10.0.1.101:40000",
                "10.0.2.101:8080",
                Nat::None,
                None,
                (PodToPodRemote, None),
            ),
            // Secondary VPC CIDR (custom networking): still a remote pod.
            (
                "100.64.0.7:40000",
                "100.64.9.9:8080",
                Nat::None,
                None,
                (PodToPodRemote, None),
            ),
            (
                "10.0.2.101:40000",
                "10.0.1.101:8080",
                Nat::None,
                None,
                (PodToPodRemote, None),
            ),
            (
                "10.0.1.101:40000",
                "10.0.1.102:8080",
                Dnat,
                Some("10.100.20.20:80"),
                (PodToService, None),
            ),
            // Hairpin: a pod reaching its own service lands on itself.
            (
                "10.0.1.101:40000",
                "10.0.1.101:8080",
                Dnat,
                Some("10.100.20.21:80"),
                (PodToService, None),
            ),
            (
                "10.0.1.101:40000",
                "10.0.2.50:443",
                Dnat,
                Some("10.100.0.1:443"),
                (PodToApiserver, Some(Private)),
            ),
            (
                "10.0.1.101:40000",
                "203.0.113.10:443",
                Snat,
                None,
                (PodToApiserver, Some(Public)),
            ),
            (
                "10.0.1.10:40000",
                "203.0.113.10:443",
                Nat::None,
                None,
                (NodeToApiserver, Some(Public)),
            ),
            (
                "10.0.1.10:40000",
                "10.0.1.50:443",
                Nat::None,
                None,
                (NodeToApiserver, Some(Private)),
            ),
            (
                "10.0.2.50:40000",
                "10.0.1.10:10250",
                Nat::None,
                None,
                (ControlplaneToKubelet, None),
            ),
            (
                "10.0.1.101:40000",
                "10.0.1.103:53",
                Dnat,
                Some("10.100.0.10:53"),
                (PodToDns, None),
            ),
            (
                "10.0.1.101:40000",
                "10.0.1.103:53",
                Nat::None,
                None,
                (PodToDns, None),
            ),
            (
                "10.0.1.101:40000",
                "192.0.2.80:80",
                Snat,
                None,
                (PodToExternal, None),
            ),
            // External SNAT (a NAT gateway does it): the node leaves the source alone.
            (
                "10.0.1.101:40000",
                "192.0.2.80:80",
                Nat::None,
                None,
                (PodToExternal, None),
            ),
            (
                "10.0.1.10:40000",
                "192.0.2.80:9000",
                Nat::None,
                None,
                (NodeToExternal, None),
            ),
            (
                "10.0.1.101:40000",
                "169.254.169.254:80",
                Snat,
                None,
                (PodToImds, None),
            ),
            (
                "10.0.1.10:40000",
                "169.254.169.254:80",
                Nat::None,
                None,
                (NodeToImds, None),
            ),
            (
                "10.0.1.10:40000",
                "10.0.2.10:8080",
                Nat::None,
                None,
                (NodeToNode, None),
            ),
            (
                "10.0.2.10:40000",
                "10.0.1.20:22",
                Nat::None,
                None,
                (NodeToNode, None),
            ),
            (
                "192.0.2.80:40000",
                "10.0.1.101:8080",
                Dnat,
                Some("10.0.1.10:30080"),
                (ExternalToPod, None),
            ),
            (
                "192.0.2.80:40000",
                "10.0.1.10:8081",
                Nat::None,
                None,
                (ExternalToNode, None),
            ),
            // A host-network pod uses the node's address: it is the node.
            (
                "10.0.1.20:40000",
                "192.0.2.80:80",
                Nat::None,
                None,
                (NodeToExternal, None),
            ),
            (
                "[2600:1f14::1]:40000",
                "[2600:1f14::2]:80",
                Nat::None,
                None,
                (Unknown, None),
            ),
            (
                "127.0.0.1:40000",
                "127.0.0.1:9477",
                Nat::None,
                None,
                (Unknown, None),
            ),
        ];
        for (from, to, nat, requested, expected) in cases {
            check(from, to, *nat, *requested, *expected);
        }
    }

    #[test]
    fn ipv6_pods_classify_like_ipv4() {
        let mut context = context();
        context.vpc_cidrs.push("2600:1f14::/56".parse().unwrap());
        context.local_pods.insert(ip("2600:1f14::101"));
        let connection = Connection {
            initiator: end("[2600:1f14::101]:40000"),
            responder: end("[2600:1f14:0:2::9]:8080"),
            nat: Nat::None,
            requested: None,
        };
        assert_eq!(classify(&connection, &context).path, Path::PodToPodRemote);
        let outside = Connection {
            responder: end("[2001:db8::1]:443"),
            ..connection
        };
        assert_eq!(classify(&outside, &context).path, Path::PodToExternal);
    }

    #[test]
    fn without_a_vpc_cidr_nothing_is_guessed_remote() {
        let context = NodeContext {
            vpc_cidrs: Vec::new(),
            ..context()
        };
        let connection = Connection {
            initiator: end("10.0.1.101:40000"),
            responder: end("10.0.2.101:8080"),
            nat: Nat::None,
            requested: None,
        };
        // Unknown VPC: remote and external cannot be told apart, so no guess is made.
        assert_eq!(classify(&connection, &context).path, Path::Unknown);
    }
}
