//! iptables as the VPC CNI and kube-proxy (iptables mode) write them on an EKS node, the VPC's
//! security group stand-in, and the NLB's listeners.
use std::net::SocketAddrV4;

use super::{
    ContextHealth, EndpointMode, ImdsHealth, Lab, ResolverHealth, exec,
    facts::{
        BACKEND_SERVICE_IP, CLUSTER_DNS, CONTROLPLANE_IPS, IMDS, KUBERNETES_SERVICE_IP, NLB_IPS,
        NODE_IP, NODE_PORT, RESOLVER, SECURITY_GROUP_DENIED_PORT, VPC_CIDR, WEB_SERVICE_IP, pod_ip,
    },
};

/// Installs every lab namespace's rules.
pub(super) fn apply(lab: &Lab, mode: EndpointMode) -> anyhow::Result<()> {
    eprintln!(
        "lab: writing the VPC CNI's and kube-proxy's iptables rules in {}",
        lab.ns("node")
    );
    exec::iptables_restore(&lab.ns("node"), &node_rules(lab.external_snat()))?;
    eprintln!(
        "lab: writing the security group stand-in in {}",
        lab.ns("vpc")
    );
    apply_vpc(lab, ContextHealth::default())?;
    apply_nlb(lab, mode)
}

/// The VPC router's filter table: the security group stand-in, and the context services that
/// are down refusing their clients.
pub(super) fn apply_vpc(lab: &Lab, health: ContextHealth) -> anyhow::Result<()> {
    exec::iptables_restore(&lab.ns("vpc"), &vpc_rules(health))
}

/// Opens or closes the NLB's :443 for the internet namespace's outside world.
pub(super) fn apply_nlb(lab: &Lab, mode: EndpointMode) -> anyhow::Result<()> {
    let state = if mode == EndpointMode::Private {
        "closed (private endpoint)"
    } else {
        "open"
    };
    eprintln!("lab: NLB :443 {state} in {}", lab.ns("inet"));
    exec::iptables_restore(&lab.ns("inet"), &inet_rules(mode))
}

/// The security group of pod-r's node does not allow tcp/9999: the VPC drops it silently. IMDS
/// down refuses connections (a reset); the resolver down is unreachable (ICMP), as a closed
/// port would be. A VPC carries no multicast: the IGMP reports the router namespace's kernel
/// sends for its bridges in the seconds after they come up are not let onto the subnets, where
/// the agent would see traffic no real node sees.
fn vpc_rules(health: ContextHealth) -> String {
    let mut rules = format!(
        "*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p igmp -m comment --comment \"a VPC carries no multicast\" -j DROP
-A FORWARD -d {}/32 -p tcp -m tcp --dport {SECURITY_GROUP_DENIED_PORT} -m comment --comment \"security group: tcp/{SECURITY_GROUP_DENIED_PORT} not allowed (silent drop)\" -j DROP
",
        pod_ip("pod-r")
    );
    if health.imds == ImdsHealth::Down {
        rules += &format!(
            "-A INPUT -d {IMDS}/32 -p tcp -m tcp --dport 80 -m comment --comment \"IMDS down\" -j REJECT --reject-with tcp-reset\n"
        );
    }
    if health.resolver == ResolverHealth::Down {
        for protocol in ["udp", "tcp"] {
            rules += &format!(
                "-A INPUT -d {RESOLVER}/32 -p {protocol} -m {protocol} --dport 53 -m comment --comment \"VPC resolver down\" -j REJECT\n"
            );
        }
    }
    rules + "COMMIT\n"
}

/// In private mode there is no public path: the NLB's listeners do not answer from outside.
fn inet_rules(mode: EndpointMode) -> String {
    let mut rules =
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n".to_owned();
    if mode == EndpointMode::Private {
        for nlb in NLB_IPS {
            rules += &format!(
                "-A INPUT -i eth0 -d {nlb}/32 -p tcp -m tcp --dport 443 -m comment --comment \"private endpoint: no public path\" -j DROP\n"
            );
        }
    }
    rules + "COMMIT\n"
}

/// A Kubernetes service port as kube-proxy sees it.
struct Service {
    /// `namespace/name:port`, kube-proxy's "service port name".
    port_name: &'static str,
    protocol: &'static str,
    cluster_ip: SocketAddrV4,
    /// kube-proxy's chain suffix: base32(sha256(port name + protocol))[:16].
    hash: &'static str,
    /// (endpoint, KUBE-SEP suffix: base32(sha256(port name + protocol + endpoint))[:16]).
    endpoints: Vec<(SocketAddrV4, &'static str)>,
    /// A NodePort with externalTrafficPolicy: Local (client addresses preserved, no SNAT).
    node_port: Option<u16>,
}

/// The cluster's services. The chain names are kube-proxy's own, computed with
/// `python3 -c 'import hashlib,base64,sys; print(base64.b32encode(hashlib.sha256(sys.argv[1].encode()).digest())[:16].decode())' default/kubernetes:httpstcp`
/// (append the endpoint, e.g. `…tcp10.0.1.50:443`, for a KUBE-SEP chain).
fn services() -> Vec<Service> {
    let [cp_a, cp_b] = CONTROLPLANE_IPS;
    vec![
        Service {
            port_name: "default/kubernetes:https",
            protocol: "tcp",
            cluster_ip: SocketAddrV4::new(KUBERNETES_SERVICE_IP, 443),
            hash: "NPX46M4PTMTKRN6Y",
            endpoints: vec![
                (SocketAddrV4::new(cp_a, 443), "HTCZLQYJWYWRHYRD"),
                (SocketAddrV4::new(cp_b, 443), "NNDXKMMNDUKJPKLB"),
            ],
            node_port: None,
        },
        Service {
            port_name: "kube-system/kube-dns:dns",
            protocol: "udp",
            cluster_ip: SocketAddrV4::new(CLUSTER_DNS, 53),
            hash: "TCOU7JCQXEZGVUNU",
            endpoints: vec![(SocketAddrV4::new(pod_ip("coredns"), 53), "MYOFMTIVN6RK6DJY")],
            node_port: None,
        },
        Service {
            port_name: "kube-system/kube-dns:dns-tcp",
            protocol: "tcp",
            cluster_ip: SocketAddrV4::new(CLUSTER_DNS, 53),
            hash: "ERIFXISQEP7F7OF4",
            endpoints: vec![(SocketAddrV4::new(pod_ip("coredns"), 53), "WXBN3F4XT4ZCR6GH")],
            node_port: None,
        },
        Service {
            port_name: "default/backend:http",
            protocol: "tcp",
            cluster_ip: SocketAddrV4::new(BACKEND_SERVICE_IP, 80),
            hash: "POOGYJBNEVT3HFAO",
            endpoints: vec![(SocketAddrV4::new(pod_ip("pod-b"), 8080), "ODE3UVTH4EQQQPC3")],
            node_port: None,
        },
        Service {
            port_name: "default/web:http",
            protocol: "tcp",
            cluster_ip: SocketAddrV4::new(WEB_SERVICE_IP, 80),
            hash: "CDGGSHYLG3RE2FKL",
            endpoints: vec![(SocketAddrV4::new(pod_ip("pod-a"), 8080), "CWAQFDD4DEW4TUKA")],
            node_port: Some(NODE_PORT),
        },
    ]
}

/// The node's mangle and nat tables: the VPC CNI's connmark and SNAT chains, kube-proxy's
/// service chains. `external_snat` leaves out the CNI's SNAT rule.
fn node_rules(external_snat: bool) -> String {
    let vpc = VPC_CIDR;
    let mut chains = vec![
        "AWS-CONNMARK-CHAIN-0".to_owned(),
        "AWS-SNAT-CHAIN-0".to_owned(),
        "KUBE-MARK-MASQ".to_owned(),
        "KUBE-POSTROUTING".to_owned(),
        "KUBE-SERVICES".to_owned(),
        "KUBE-NODEPORTS".to_owned(),
    ];
    let mut rules = format!(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -i eni+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0
-A PREROUTING -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0
-A AWS-CONNMARK-CHAIN-0 -d {vpc} -m comment --comment \"AWS CONNMARK CHAIN, VPC CIDR\" -j RETURN
-A AWS-CONNMARK-CHAIN-0 -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark 0x80/0x80
-A AWS-SNAT-CHAIN-0 -d {vpc} -m comment --comment \"AWS SNAT CHAIN\" -j RETURN
"
    );
    if !external_snat {
        rules += &format!(
            "-A AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source {NODE_IP} --random-fully\n"
        );
    }
    rules += "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
";
    for service in services() {
        service.write_rules(&mut chains, &mut rules);
    }
    rules += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

    let declarations: String = chains
        .iter()
        .map(|chain| format!(":{chain} - [0:0]\n"))
        .collect();
    format!(
        "*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -i eth0 -m comment --comment \"AWS, primary ENI\" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80
-A PREROUTING -i eni+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
{declarations}{rules}COMMIT
"
    )
}

impl Service {
    /// kube-proxy's chains for this service port: KUBE-SERVICES → KUBE-SVC (random choice of
    /// endpoint) → KUBE-SEP (hairpin masquerade, DNAT); for a NodePort with
    /// externalTrafficPolicy: Local, KUBE-NODEPORTS → KUBE-EXT → KUBE-SVL.
    fn write_rules(&self, chains: &mut Vec<String>, rules: &mut String) {
        let (name, protocol) = (self.port_name, self.protocol);
        let svc = format!("KUBE-SVC-{}", self.hash);
        let match_protocol = format!("-p {protocol} -m {protocol}");
        let cluster_ip = self.cluster_ip;
        let mut line = |text: String| {
            rules.push_str(&text);
            rules.push('\n');
        };
        line(format!(
            "-A KUBE-SERVICES -d {}/32 {match_protocol} --dport {} -m comment --comment \"{name} cluster IP\" -j {svc}",
            cluster_ip.ip(),
            cluster_ip.port()
        ));
        chains.push(svc.clone());
        let count = self.endpoints.len();
        for (index, (endpoint, hash)) in self.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{hash}");
            let remaining = count - index;
            let choice = if remaining > 1 {
                format!(
                    "-m statistic --mode random --probability {:.10} ",
                    1.0 / remaining as f64
                )
            } else {
                String::new()
            };
            line(format!(
                "-A {svc} -m comment --comment \"{name} -> {endpoint}\" {choice}-j {sep}"
            ));
            line(format!(
                "-A {sep} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ",
                endpoint.ip()
            ));
            line(format!(
                "-A {sep} {match_protocol} -m comment --comment \"{name}\" -j DNAT --to-destination {endpoint}"
            ));
            chains.push(sep);
        }
        if let Some(node_port) = self.node_port {
            let ext = format!("KUBE-EXT-{}", self.hash);
            let svl = format!("KUBE-SVL-{}", self.hash);
            line(format!(
                "-A KUBE-NODEPORTS {match_protocol} --dport {node_port} -m comment --comment \"{name}\" -j {ext}"
            ));
            line(format!(
                "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
            ));
            line(format!(
                "-A {ext} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {svc}"
            ));
            line(format!("-A {ext} -j {svl}"));
            for (endpoint, hash) in &self.endpoints {
                line(format!(
                    "-A {svl} -m comment --comment \"{name} -> {endpoint}\" -j KUBE-SEP-{hash}"
                ));
            }
            chains.extend([ext, svl]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_snat_leaves_out_only_the_snat_rule() {
        let with = node_rules(false);
        let without = node_rules(true);
        assert!(with.contains("-j SNAT --to-source 10.0.1.10 --random-fully"));
        assert!(!without.contains("-j SNAT"));
        assert_eq!(with.lines().count(), without.lines().count() + 1);
    }

    #[test]
    fn kubernetes_service_spreads_over_both_controlplane_enis() {
        let rules = node_rules(false);
        assert!(rules.contains(
            "-A KUBE-SERVICES -d 10.100.0.1/32 -p tcp -m tcp --dport 443 -m comment --comment \"default/kubernetes:https cluster IP\" -j KUBE-SVC-NPX46M4PTMTKRN6Y"
        ));
        assert!(rules.contains("--probability 0.5000000000 -j KUBE-SEP-HTCZLQYJWYWRHYRD"));
        assert!(rules.contains("-j DNAT --to-destination 10.0.2.50:443"));
        // Every chain jumped to is declared once.
        for chain in rules
            .split_whitespace()
            .filter(|word| word.starts_with("KUBE-") || word.starts_with("AWS-"))
        {
            let chain = chain.trim_matches('"');
            if rules.contains(&format!("-j {chain}")) {
                assert_eq!(
                    rules.matches(&format!(":{chain} - [0:0]")).count(),
                    1,
                    "{chain}"
                );
            }
        }
    }

    #[test]
    fn only_what_is_down_is_refused() {
        let healthy = vpc_rules(ContextHealth::default());
        assert!(!healthy.contains("REJECT"));
        let down = vpc_rules(ContextHealth {
            imds: ImdsHealth::Down,
            resolver: ResolverHealth::Down,
        });
        assert_eq!(down.matches("REJECT").count(), 3);
        let slow = vpc_rules(ContextHealth {
            imds: ImdsHealth::Slow,
            ..ContextHealth::default()
        });
        assert_eq!(slow, healthy, "a slow IMDS is the server's doing");
    }

    #[test]
    fn only_private_mode_closes_the_nlb() {
        assert!(!inet_rules(EndpointMode::PublicPrivate).contains("DROP"));
        assert_eq!(inet_rules(EndpointMode::Private).matches("DROP").count(), 2);
    }
}
