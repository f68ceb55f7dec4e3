//! The path taxonomy (docs/taxonomy.md) as a pure function: a connection and the node's context
//! in, a path with its labels out. No I/O, no clock: every rule is unit-tested on its own.
use std::net::SocketAddr;

use tracer_common::label_enum;
pub use tracer_common::labels::{Endpoint, Nat, Path};

use crate::context::{NODELOCAL_DNS_ADDR, NodeContext, Side, is_imds, kubernetes::ZoneLabel};

const KUBELET_PORT: u16 = 10250;
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

label_enum!(
    /// The rule of the taxonomy that decided a classification: what `tracer explain` reports.
    Rule {
        Imds => "imds",
        Kubelet => "kubelet",
        ApiServer => "apiserver",
        Dns => "dns",
        VpcDns => "vpc_dns",
        Dnat => "dnat",
        UntranslatedClusterIp => "untranslated_cluster_ip",
        KubernetesService => "kubernetes_service",
        Ends => "ends",
        NoneFits => "none_fits",
    }
);

impl Rule {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Imds => {
                "the responder is the instance metadata service (169.254.169.254, fd00:ec2::254)"
            }
            Self::Kubelet => {
                "an EKS-owned control-plane ENI calling this node's kubelet port 10250 is controlplane_to_kubelet"
            }
            Self::ApiServer => {
                "an API server address is the responder: endpoint private if it lies in a VPC CIDR, public otherwise"
            }
            Self::Dns => {
                "port 53 of a service (kube-dns, or the kube-dns-upstream NodeLocal DNSCache forwards to), of NodeLocal DNSCache (169.254.20.10), or of a pod or VPC address asked directly, is pod_to_dns from a pod and node_to_dns from the node"
            }
            Self::VpcDns => {
                "port 53 of the Amazon-provided VPC resolver (base + 2 of a VPC CIDR block, 169.254.169.253, fd00:ec2::253) is pod_to_vpc_dns or node_to_vpc_dns: its own limit, 1024 packets/s per ENI"
            }
            Self::Dnat => {
                "the node's DNAT (a ClusterIP or NodePort) rewrote the destination to a backend of no more specific class"
            }
            Self::UntranslatedClusterIp => {
                "a ClusterIP that no DNAT rewrote (no ready backend, or a hypothetical flow): pod_to_service; live connections take the class of their backend"
            }
            Self::KubernetesService => {
                "the `kubernetes` ClusterIP on :443 is DNATed to the EKS-owned ENIs: pod_to_apiserver through the private endpoint"
            }
            Self::Ends => "decided by what the two ends are",
            Self::NoneFits => "no rule of the taxonomy fits these two ends",
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
    // Port 53 asked directly, or through a service on port 53 (kube-dns, or the
    // kube-dns-upstream service NodeLocal DNSCache forwards to); of link-local addresses only
    // NodeLocal DNSCache's listener.
    let dns = responder.port() == DNS_PORT
        && requested.is_none_or(|asked| asked.port() == DNS_PORT)
        && (to != LinkLocal || responder.ip() == NODELOCAL_DNS_ADDR);
    let vpc_dns = responder.port() == DNS_PORT && context.is_vpc_resolver(responder.ip());
    let (path, endpoint, rule) = match (from, to) {
        (LocalPod, _) if is_imds(responder.ip()) => (Path::PodToImds, None, Rule::Imds),
        (Node, _) if is_imds(responder.ip()) => (Path::NodeToImds, None, Rule::Imds),
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
        (LocalPod, _) if vpc_dns => (Path::PodToVpcDns, None, Rule::VpcDns),
        (Node, _) if vpc_dns => (Path::NodeToVpcDns, None, Rule::VpcDns),
        (LocalPod, LocalPod | Vpc | Service | LinkLocal) if dns => {
            (Path::PodToDns, None, Rule::Dns)
        }
        (Node, LocalPod | Vpc | Service | LinkLocal) if dns => (Path::NodeToDns, None, Rule::Dns),
        (LocalPod, _) if nat == Nat::Dnat => (Path::PodToService, None, Rule::Dnat),
        (LocalPod, Service) if context.is_kubernetes_service(responder) => (
            Path::PodToApiserver,
            Some(Endpoint::Private),
            Rule::KubernetesService,
        ),
        (LocalPod, Service) => (Path::PodToService, None, Rule::UntranslatedClusterIp),
        (LocalPod, LocalPod) => by_ends(Path::PodToPodLocal),
        (LocalPod, Node) => by_ends(Path::PodToNode),
        (Node, LocalPod) => by_ends(Path::NodeToPod),
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
    use std::net::IpAddr;

    use super::*;
    use crate::context::kubernetes::ClusterFacts;

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

    /// initiator, responder, NAT, requested address, expected (path, endpoint), and the rule
    /// that decides it.
    type Case = (
        &'static str,
        &'static str,
        Nat,
        Option<&'static str>,
        (Path, Option<Endpoint>),
        Rule,
    );

    fn check(
        from: &str,
        to: &str,
        nat: Nat,
        requested: Option<&str>,
        expected: (Path, Option<Endpoint>),
        rule: Rule,
    ) {
        let connection = Connection {
            initiator: end(from),
            responder: end(to),
            nat,
            requested: requested.map(end),
        };
        let (got, decided_by) = decide(&connection, &context());
        assert_eq!(
            (got.path, got.endpoint, got.nat, decided_by),
            (expected.0, expected.1, nat, rule),
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
                Rule::Ends,
            ),
            (
                "10.0.1.101:40000",
                "10.0.2.101:8080",
                Nat::None,
                None,
                (PodToPodRemote, None),
                Rule::Ends,
            ),
            // Secondary VPC CIDR (custom networking): still a remote pod.
            (
                "100.64.0.7:40000",
                "100.64.9.9:8080",
                Nat::None,
                None,
                (PodToPodRemote, None),
                Rule::Ends,
            ),
            (
                "10.0.2.101:40000",
                "10.0.1.101:8080",
                Nat::None,
                None,
                (PodToPodRemote, None),
                Rule::Ends,
            ),
            (
                "10.0.1.101:40000",
                "10.0.1.102:8080",
                Dnat,
                Some("10.100.20.20:80"),
                (PodToService, None),
                Rule::Dnat,
            ),
            // Hairpin: a pod reaching its own service lands on itself.
            (
                "10.0.1.101:40000",
                "10.0.1.101:8080",
                Dnat,
                Some("10.100.20.21:80"),
                (PodToService, None),
                Rule::Dnat,
            ),
            (
                "10.0.1.101:40000",
                "10.0.2.50:443",
                Dnat,
                Some("10.100.0.1:443"),
                (PodToApiserver, Some(Private)),
                Rule::ApiServer,
            ),
            (
                "10.0.1.101:40000",
                "203.0.113.10:443",
                Snat,
                None,
                (PodToApiserver, Some(Public)),
                Rule::ApiServer,
            ),
            (
                "10.0.1.10:40000",
                "203.0.113.10:443",
                Nat::None,
                None,
                (NodeToApiserver, Some(Public)),
                Rule::ApiServer,
            ),
            (
                "10.0.1.10:40000",
                "10.0.1.50:443",
                Nat::None,
                None,
                (NodeToApiserver, Some(Private)),
                Rule::ApiServer,
            ),
            (
                "10.0.2.50:40000",
                "10.0.1.10:10250",
                Nat::None,
                None,
                (ControlplaneToKubelet, None),
                Rule::Kubelet,
            ),
            (
                "10.0.1.101:40000",
                "10.0.1.103:53",
                Dnat,
                Some("10.100.0.10:53"),
                (PodToDns, None),
                Rule::Dns,
            ),
            (
                "10.0.1.101:40000",
                "10.0.1.103:53",
                Nat::None,
                None,
                (PodToDns, None),
                Rule::Dns,
            ),
            (
                "10.0.1.101:40000",
                "192.0.2.80:80",
                Snat,
                None,
                (PodToExternal, None),
                Rule::Ends,
            ),
            // External SNAT (a NAT gateway does it): the node leaves the source alone.
            (
                "10.0.1.101:40000",
                "192.0.2.80:80",
                Nat::None,
                None,
                (PodToExternal, None),
                Rule::Ends,
            ),
            (
                "10.0.1.10:40000",
                "192.0.2.80:9000",
                Nat::None,
                None,
                (NodeToExternal, None),
                Rule::Ends,
            ),
            (
                "10.0.1.101:40000",
                "169.254.169.254:80",
                Snat,
                None,
                (PodToImds, None),
                Rule::Imds,
            ),
            (
                "10.0.1.10:40000",
                "169.254.169.254:80",
                Nat::None,
                None,
                (NodeToImds, None),
                Rule::Imds,
            ),
            (
                "10.0.1.10:40000",
                "10.0.2.10:8080",
                Nat::None,
                None,
                (NodeToNode, None),
                Rule::Ends,
            ),
            (
                "10.0.2.10:40000",
                "10.0.1.20:22",
                Nat::None,
                None,
                (NodeToNode, None),
                Rule::Ends,
            ),
            (
                "192.0.2.80:40000",
                "10.0.1.101:8080",
                Dnat,
                Some("10.0.1.10:30080"),
                (ExternalToPod, None),
                Rule::Ends,
            ),
            (
                "192.0.2.80:40000",
                "10.0.1.10:8081",
                Nat::None,
                None,
                (ExternalToNode, None),
                Rule::Ends,
            ),
            // A host-network pod uses the node's address: it is the node.
            (
                "10.0.1.20:40000",
                "192.0.2.80:80",
                Nat::None,
                None,
                (NodeToExternal, None),
                Rule::Ends,
            ),
            (
                "[2600:1f14::1]:40000",
                "[2600:1f14::2]:80",
                Nat::None,
                None,
                (Unknown, None),
                Rule::NoneFits,
            ),
            (
                "127.0.0.1:40000",
                "127.0.0.1:9477",
                Nat::None,
                None,
                (Unknown, None),
                Rule::NoneFits,
            ),
            // A ClusterIP no DNAT rewrote (no ready backend): a service, not the internet.
            (
                "10.0.1.101:40000",
                "10.100.20.20:80",
                Nat::None,
                None,
                (PodToService, None),
                Rule::UntranslatedClusterIp,
            ),
            (
                "10.0.1.101:40000",
                "10.100.0.10:53",
                Nat::None,
                None,
                (PodToDns, None),
                Rule::Dns,
            ),
            (
                "10.0.1.101:40000",
                "10.100.0.1:443",
                Nat::None,
                None,
                (PodToApiserver, Some(Private)),
                Rule::KubernetesService,
            ),
            // A pod → the VPC resolver directly (dnsPolicy: Default, or CoreDNS forwarding).
            (
                "10.0.1.101:40000",
                "10.0.0.2:53",
                Nat::None,
                None,
                (PodToVpcDns, None),
                Rule::VpcDns,
            ),
            // … at base + 2 of the secondary CIDR block, and at its link-local addresses.
            (
                "10.0.1.101:40000",
                "100.64.0.2:53",
                Nat::None,
                None,
                (PodToVpcDns, None),
                Rule::VpcDns,
            ),
            (
                "10.0.1.10:40000",
                "169.254.169.253:53",
                Nat::None,
                None,
                (NodeToVpcDns, None),
                Rule::VpcDns,
            ),
            (
                "10.0.1.10:40000",
                "10.0.0.2:53",
                Nat::None,
                None,
                (NodeToVpcDns, None),
                Rule::VpcDns,
            ),
            // NodeLocal DNSCache (host network: the node) forwarding through the
            // kube-dns-upstream service to a CoreDNS pod of another node.
            (
                "10.0.1.10:40000",
                "10.0.2.103:53",
                Dnat,
                Some("10.100.0.11:53"),
                (NodeToDns, None),
                Rule::Dns,
            ),
            // The node (kubelet, NodeLocal DNSCache) → the cluster DNS, DNATed to CoreDNS.
            (
                "10.0.1.10:40000",
                "10.0.2.103:53",
                Dnat,
                Some("10.100.0.10:53"),
                (NodeToDns, None),
                Rule::Dns,
            ),
            // A pod → NodeLocal DNSCache's link-local listener.
            (
                "10.0.1.101:40000",
                "169.254.20.10:53",
                Nat::None,
                None,
                (PodToDns, None),
                Rule::Dns,
            ),
            // The kubelet probing a pod of its node; a host-network pod calling one.
            (
                "10.0.1.10:40000",
                "10.0.1.101:8080",
                Nat::None,
                None,
                (NodeToPod, None),
                Rule::Ends,
            ),
            // A pod calling a host-network daemon of its node (node-exporter, kube-proxy).
            (
                "10.0.1.101:40000",
                "10.0.1.10:10256",
                Nat::None,
                None,
                (PodToNode, None),
                Rule::Ends,
            ),
        ];
        for (from, to, nat, requested, expected, rule) in cases {
            check(from, to, *nat, *requested, *expected, *rule);
        }
        // One row per case of the taxonomy: every path and every rule has one.
        for path in Path::ALL {
            assert!(
                cases.iter().any(|case| case.4.0 == path),
                "no row of the taxonomy table is {path}"
            );
        }
        for rule in Rule::ALL {
            assert!(
                cases.iter().any(|case| case.5 == rule),
                "no row of the taxonomy table is decided by {rule:?}"
            );
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
        // IMDS and the VPC resolver at their IPv6 addresses, outside every VPC block.
        for (responder, path) in [
            ("[fd00:ec2::254]:80", Path::PodToImds),
            ("[fd00:ec2::253]:53", Path::PodToVpcDns),
        ] {
            let asked = Connection {
                responder: end(responder),
                ..connection
            };
            assert_eq!(classify(&asked, &context).path, path, "{responder}");
        }
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
