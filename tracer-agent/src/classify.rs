//! The path taxonomy (DESIGN §3) as a pure function: a connection and the node's context in,
//! a path with its labels out. No I/O, no clock: every rule is unit-tested on its own.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use crate::{
    cidr::Cidr,
    kubernetes::{ClusterFacts, ZoneLabel},
};

pub use tracer_common::labels::{Endpoint, Nat, Path};

/// Where the instance metadata service lives, on every EC2 instance.
pub const IMDS_ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 254));
const KUBELET_PORT: u16 = 10250;
const APISERVER_PORT: u16 = 443;
const DNS_PORT: u16 = 53;

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
    /// The cluster's service CIDRs (ClusterIPs).
    pub service_cidrs: Vec<Cidr>,
    /// What the Kubernetes API says (pods, zones), when the agent watches it.
    pub cluster: std::sync::Arc<ClusterFacts>,
}

/// A classified connection.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Classification {
    pub path: Path,
    pub endpoint: Option<Endpoint>,
    pub nat: Nat,
    /// Whether a connection with another host of the VPC stays in this node's availability
    /// zone (cross-AZ bytes cost money); unknown without the nodes' zones.
    pub zone: Option<ZoneLabel>,
}

impl NodeContext {
    fn vpc_cidr_of(&self, addr: IpAddr) -> Option<&Cidr> {
        self.vpc_cidrs.iter().find(|cidr| cidr.contains(addr))
    }

    fn service_cidr_of(&self, addr: IpAddr) -> Option<&Cidr> {
        self.service_cidrs.iter().find(|cidr| cidr.contains(addr))
    }

    /// The `kubernetes` service's ClusterIP: by Kubernetes convention the first address of the
    /// service CIDR, DNATed by kube-proxy to the EKS-owned ENIs.
    fn is_kubernetes_service(&self, end: SocketAddr) -> bool {
        end.port() == APISERVER_PORT
            && self
                .service_cidrs
                .iter()
                .any(|cidr| cidr.first_host() == end.ip())
    }

    /// Which API server endpoint an address is: private inside a VPC CIDR (the EKS-owned
    /// ENIs), public outside (the NLB).
    pub fn endpoint_of(&self, addr: IpAddr) -> Endpoint {
        if self.vpc_cidr_of(addr).is_some() {
            Endpoint::Private
        } else {
            Endpoint::Public
        }
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
        } else if self.service_cidr_of(addr).is_some() {
            Side::Service
        } else if self.vpc_cidrs.is_empty() {
            // Without the VPC's blocks, "remote" and "external" cannot be told apart.
            Side::Unclear
        } else if self.vpc_cidr_of(addr).is_some() {
            Side::Vpc
        } else {
            Side::External
        }
    }

    /// What the context knows about an address, in words: the facts `tracer explain` prints.
    pub fn facts_about(&self, addr: IpAddr) -> Vec<String> {
        let mut facts = Vec::new();
        let mut fact = |text: String| facts.push(format!("{addr} {text}"));
        if addr == IMDS_ADDR {
            fact("is the instance metadata service (IMDS)".to_owned());
        }
        match self.side(addr) {
            Side::LocalPod => {
                fact("is a pod of this node (a /32 route leads to a pod interface)".to_owned())
            }
            Side::Node => {
                fact("is an address of this node (an ENI address that is no pod's)".to_owned())
            }
            Side::LinkLocal => fact("is loopback or link-local".to_owned()),
            Side::Service | Side::Unclear | Side::Vpc | Side::External => {}
        }
        if self.apiserver_ips.contains(&addr) {
            fact("is an API server address".to_owned());
        }
        if self.controlplane_ips.contains(&addr) {
            fact("is an EKS-owned control-plane ENI (serves the API server on :443, calls kubelet on :10250)".to_owned());
        }
        if self.cluster_dns == Some(addr) {
            fact("is the cluster DNS service (kube-dns)".to_owned());
        }
        if let Some(cidr) = self.service_cidr_of(addr) {
            fact(format!("is a ClusterIP (service CIDR {cidr})"));
            if cidr.first_host() == addr {
                fact("is the `kubernetes` service (first address of the service CIDR)".to_owned());
            }
        }
        match self.vpc_cidr_of(addr) {
            Some(cidr) => fact(format!("is inside VPC CIDR {cidr}")),
            None if self.vpc_cidrs.is_empty() => fact(
                "cannot be placed: no VPC CIDR is known, so in-VPC and external are not told apart"
                    .to_owned(),
            ),
            None => fact(format!(
                "is outside every VPC CIDR ({})",
                comma_separated(&self.vpc_cidrs)
            )),
        }
        facts
    }

    /// Facts that contradict each other, so that classifying with them would be a guess.
    pub fn contradictions(&self) -> Vec<Contradiction> {
        let mut found = Vec::new();
        for (index, vpc) in self.vpc_cidrs.iter().enumerate() {
            for other in &self.vpc_cidrs[index + 1..] {
                if vpc.overlaps(other) {
                    found.push(Contradiction::VpcOverlap(*vpc, *other));
                }
            }
            for service in &self.service_cidrs {
                if vpc.overlaps(service) {
                    found.push(Contradiction::ServiceOverlapsVpc(*service, *vpc));
                }
            }
        }
        if let Some(dns) = self.cluster_dns
            && !self.service_cidrs.is_empty()
            && self.service_cidr_of(dns).is_none()
        {
            found.push(Contradiction::DnsOutsideServices(
                dns,
                comma_separated(&self.service_cidrs),
            ));
        }
        if !self.vpc_cidrs.is_empty() {
            let mut strays: Vec<&IpAddr> = self
                .controlplane_ips
                .iter()
                .filter(|ip| self.vpc_cidr_of(**ip).is_none())
                .collect();
            strays.sort();
            found.extend(strays.into_iter().map(|ip| {
                Contradiction::ControlplaneOutsideVpc(*ip, comma_separated(&self.vpc_cidrs))
            }));
        }
        found
    }
}

/// `a, b, c`: how lists of addresses and blocks are written in messages.
pub fn comma_separated<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|item| item.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Context facts that cannot all be true (DESIGN §2: a VPC's blocks never overlap, EKS keeps the
/// service CIDR apart from the VPC, the EKS-owned ENIs live in the cluster's subnets). Each names
/// the flags that set the facts involved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Contradiction {
    #[error("VPC CIDRs {0} and {1} overlap (--vpc-cidr): a VPC's blocks never do")]
    VpcOverlap(Cidr, Cidr),
    #[error(
        "service CIDR {0} (--service-cidr) overlaps VPC CIDR {1} (--vpc-cidr): EKS requires them apart"
    )]
    ServiceOverlapsVpc(Cidr, Cidr),
    #[error(
        "cluster DNS {0} (--cluster-dns) lies outside every service CIDR ({1}, --service-cidr)"
    )]
    DnsOutsideServices(IpAddr, String),
    #[error(
        "control-plane ENI {0} (--controlplane-ip) lies outside every VPC CIDR ({1}): the EKS-owned ENIs are in the cluster's subnets"
    )]
    ControlplaneOutsideVpc(IpAddr, String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    LocalPod,
    Node,
    Service,
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

/// The rule of the taxonomy that decided a classification: what `tracer explain` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    Imds,
    Kubelet,
    ApiServer,
    Dns,
    Dnat,
    UntranslatedClusterIp,
    KubernetesService,
    Ends,
    NoneFits,
}

impl Rule {
    pub fn describe(self) -> &'static str {
        match self {
            Rule::Imds => "the responder is the instance metadata service",
            Rule::Kubelet => {
                "an EKS-owned control-plane ENI calling this node's kubelet port 10250 is controlplane_to_kubelet"
            }
            Rule::ApiServer => {
                "an API server address is the responder: endpoint private if it lies in a VPC CIDR, public otherwise"
            }
            Rule::Dns => {
                "port 53 of the cluster DNS service, or of a pod or VPC address asked directly, is pod_to_dns"
            }
            Rule::Dnat => {
                "the node's DNAT (a ClusterIP or NodePort) rewrote the destination to a backend of no more specific class"
            }
            Rule::UntranslatedClusterIp => {
                "a ClusterIP that no DNAT rewrote (no ready backend, or a hypothetical flow): pod_to_service; live connections take the class of their backend"
            }
            Rule::KubernetesService => {
                "the `kubernetes` ClusterIP on :443 is DNATed to the EKS-owned ENIs: pod_to_apiserver through the private endpoint"
            }
            Rule::Ends => "decided by what the two ends are",
            Rule::NoneFits => "no rule of the taxonomy fits these two ends",
        }
    }
}

/// Classifies a connection from its initiator, most specific rule first.
pub fn classify(connection: &Connection, context: &NodeContext) -> Classification {
    decide(connection, context).0
}

/// The classification and the rule that decided it.
pub fn decide(connection: &Connection, context: &NodeContext) -> (Classification, Rule) {
    use Side::*;
    let Connection {
        initiator,
        responder,
        nat,
        requested,
    } = *connection;
    let from = context.side(initiator.ip());
    let to = context.side(responder.ip());
    let endpoint = |addr| Some(context.endpoint_of(addr));
    let by_ends = |path| (path, None, Rule::Ends);
    let asked_dns = |end: SocketAddr| Some(end.ip()) == context.cluster_dns;
    let (path, endpoint, rule) = match (from, to) {
        (LocalPod, _) if responder.ip() == IMDS_ADDR => (Path::PodToImds, None, Rule::Imds),
        (Node, _) if responder.ip() == IMDS_ADDR => (Path::NodeToImds, None, Rule::Imds),
        (Vpc, Node)
            if responder.port() == KUBELET_PORT
                && context.controlplane_ips.contains(&initiator.ip()) =>
        {
            (Path::ControlplaneToKubelet, None, Rule::Kubelet)
        }
        (LocalPod, _) if context.is_apiserver(responder) => (
            Path::PodToApiserver,
            endpoint(responder.ip()),
            Rule::ApiServer,
        ),
        (Node, _) if context.is_apiserver(responder) => (
            Path::NodeToApiserver,
            endpoint(responder.ip()),
            Rule::ApiServer,
        ),
        (LocalPod, LocalPod | Vpc | Service)
            if responder.port() == DNS_PORT
                && (requested.is_none_or(asked_dns) || asked_dns(responder)) =>
        {
            (Path::PodToDns, None, Rule::Dns)
        }
        (LocalPod, _) if nat == Nat::Dnat => (Path::PodToService, None, Rule::Dnat),
        (LocalPod, Service) if context.is_kubernetes_service(responder) => (
            Path::PodToApiserver,
            Some(Endpoint::Private),
            Rule::KubernetesService,
        ),
        (LocalPod, Service) => (Path::PodToService, None, Rule::UntranslatedClusterIp),
        (LocalPod, LocalPod) => by_ends(Path::PodToPodLocal),
        (LocalPod, Vpc) => by_ends(Path::PodToPodRemote),
        (LocalPod, External) => by_ends(Path::PodToExternal),
        (Node, External) => by_ends(Path::NodeToExternal),
        (Node, Vpc) => by_ends(Path::NodeToNode),
        (Vpc, LocalPod) => by_ends(Path::PodToPodRemote),
        (Vpc, Node) => by_ends(Path::NodeToNode),
        (External, LocalPod) => by_ends(Path::ExternalToPod),
        (External, Node) => by_ends(Path::ExternalToNode),
        _ => (Path::Unknown, None, Rule::NoneFits),
    };
    // The other end, seen from this node: the zone label is about it.
    let (peer, peer_side) = match from {
        LocalPod | Node => (responder, to),
        _ => (initiator, from),
    };
    let zone = (peer_side == Vpc)
        .then(|| context.cluster.zone_of(peer.ip()))
        .flatten();
    (
        Classification {
            path,
            endpoint,
            nat,
            zone,
        },
        rule,
    )
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
            service_cidrs: vec!["10.100.0.0/16".parse().unwrap()],
            cluster: Default::default(),
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
            // A ClusterIP no DNAT rewrote (no ready backend): a service, not the internet.
            (
                "10.0.1.101:40000",
                "10.100.20.20:80",
                Nat::None,
                None,
                (PodToService, None),
            ),
            (
                "10.0.1.101:40000",
                "10.100.0.10:53",
                Nat::None,
                None,
                (PodToDns, None),
            ),
            (
                "10.0.1.101:40000",
                "10.100.0.1:443",
                Nat::None,
                None,
                (PodToApiserver, Some(Private)),
            ),
            // Pod → the VPC resolver directly (dnsPolicy: Default).
            (
                "10.0.1.101:40000",
                "10.0.0.2:53",
                Nat::None,
                None,
                (PodToDns, None),
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
    fn connections_with_other_vpc_hosts_carry_their_zone() {
        let mut context = context();
        context.cluster = std::sync::Arc::new(ClusterFacts {
            own_zone: Some("us-west-2a".into()),
            node_zones: [
                (ip("10.0.1.10"), "us-west-2a".to_owned()),
                (ip("10.0.2.10"), "us-west-2b".to_owned()),
            ]
            .into(),
            ..ClusterFacts::default()
        });
        let zone_in = |context: &NodeContext, from: &str, to: &str| {
            let connection = Connection {
                initiator: end(from),
                responder: end(to),
                nat: Nat::None,
                requested: None,
            };
            classify(&connection, context).zone
        };
        let zone = |from: &str, to: &str| zone_in(&context, from, to);
        use ZoneLabel::{CrossZone, SameZone};
        assert_eq!(zone("10.0.1.101:40000", "10.0.2.101:80"), Some(CrossZone));
        assert_eq!(zone("10.0.1.101:40000", "10.0.1.77:80"), Some(SameZone));
        assert_eq!(zone("10.0.2.101:40000", "10.0.1.101:80"), Some(CrossZone));
        assert_eq!(zone("10.0.1.10:40000", "10.0.2.10:22"), Some(CrossZone));
        // Local and external ends have no zone to compare.
        assert_eq!(zone("10.0.1.101:40000", "10.0.1.102:80"), None);
        assert_eq!(zone("10.0.1.101:40000", "192.0.2.80:80"), None);
        // Without the nodes' zones, no guess.
        let unzoned = NodeContext {
            cluster: Default::default(),
            ..context.clone()
        };
        assert_eq!(zone_in(&unzoned, "10.0.1.101:40000", "10.0.2.101:80"), None);
    }

    #[test]
    fn contradictions_name_the_flags_involved() {
        assert_eq!(context().contradictions(), Vec::new());
        let mut wrong = context();
        wrong.vpc_cidrs.push("10.0.3.0/24".parse().unwrap());
        wrong.service_cidrs = vec!["10.0.128.0/17".parse().unwrap()];
        wrong.controlplane_ips.insert(ip("172.31.0.5"));
        // An IPv6 cluster DNS with IPv4 service CIDRs: a family mismatch.
        wrong.cluster_dns = Some(ip("fd00::a"));
        let messages: Vec<String> = wrong
            .contradictions()
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(messages.len(), 4, "{messages:#?}");
        for (message, flags) in messages.iter().zip([
            &["--vpc-cidr"][..],
            &["--service-cidr", "--vpc-cidr"],
            &["--cluster-dns", "--service-cidr"],
            &["--controlplane-ip"],
        ]) {
            for flag in flags {
                assert!(message.contains(flag), "{flag} not in {message}");
            }
        }
    }

    #[test]
    fn decisions_carry_their_rule_and_facts() {
        let context = context();
        let connection = Connection {
            initiator: end("10.0.1.101:0"),
            responder: end("10.0.2.50:443"),
            nat: Nat::None,
            requested: None,
        };
        let (classification, rule) = decide(&connection, &context);
        assert_eq!(classification.path, Path::PodToApiserver);
        assert_eq!(classification.endpoint, Some(Endpoint::Private));
        assert_eq!(rule, Rule::ApiServer);
        let facts = context.facts_about(ip("10.0.2.50")).join("\n");
        assert!(facts.contains("control-plane ENI"), "{facts}");
        assert!(facts.contains("inside VPC CIDR 10.0.0.0/16"), "{facts}");
        let facts = context.facts_about(ip("10.0.1.101")).join("\n");
        assert!(facts.contains("pod of this node"), "{facts}");
        let facts = context.facts_about(ip("10.100.0.10")).join("\n");
        assert!(
            facts.contains("cluster DNS") && facts.contains("service CIDR"),
            "{facts}"
        );
        let unplaced = NodeContext {
            vpc_cidrs: Vec::new(),
            ..context
        };
        let facts = unplaced.facts_about(ip("192.0.2.80")).join("\n");
        assert!(facts.contains("no VPC CIDR is known"), "{facts}");
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
