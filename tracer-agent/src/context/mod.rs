//! What the node knows about itself and its cluster ([`NodeContext`]), and where each fact
//! comes from: the flags (here), the node's routes and addresses (`datapath::discovery`), IMDS
//! (`imds`), the cluster endpoint's DNS answer (`endpoint`) and the Kubernetes API
//! (`kubernetes`). Facts that cannot all be true are [`Contradiction`]s: classifying with them
//! would be a guess.
pub mod cidr;
pub(crate) mod endpoint;
pub(crate) mod imds;
pub mod kubernetes;
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use crate::classify::Endpoint;
use crate::{
    cli::ContextArgs, context::kubernetes::ClusterFacts, datapath::discovery::InterfacePatterns,
};
use cidr::Cidr;

/// Where the instance metadata service lives, on every EC2 instance.
pub const IMDS_ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 254));

/// IMDS's IPv6 address, on Nitro instances (IPv6 clusters' pods and nodes use it).
pub const IMDS_ADDR_V6: IpAddr =
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254));

/// Whether `addr` is the instance metadata service, over IPv4 or IPv6.
pub fn is_imds(addr: IpAddr) -> bool {
    addr == IMDS_ADDR || addr == IMDS_ADDR_V6
}

/// The Amazon-provided VPC resolver's link-local addresses, answering in every VPC (besides
/// the base + 2 address of each IPv4 VPC CIDR block, see [`NodeContext::is_vpc_resolver`]).
pub const VPC_RESOLVER_LINK_LOCAL: [IpAddr; 2] = [
    IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 253)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x253)),
];

/// NodeLocal DNSCache's listener on every node: pods that use it send their queries here
/// instead of to the cluster DNS service.
pub const NODELOCAL_DNS_ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 20, 10));
/// The API server's port, on the NLB and on the EKS-owned ENIs alike.
pub(crate) const APISERVER_PORT: u16 = 443;

/// The context the flags state, or what in them cannot all be true.
pub fn from_flags(args: &ContextArgs) -> Result<NodeContext, Vec<Contradiction>> {
    let context = NodeContext {
        vpc_cidrs: args.vpc_cidrs.clone(),
        service_cidrs: args.service_cidrs.clone(),
        apiserver_ips: args.apiserver_ips.iter().copied().collect(),
        controlplane_ips: args.controlplane_ips.iter().copied().collect(),
        cluster_dns: args.cluster_dns,
        ..NodeContext::default()
    };
    let contradictions = context.contradictions();
    if contradictions.is_empty() {
        Ok(context)
    } else {
        Err(contradictions)
    }
}

/// One line per contradiction, for a configuration error.
pub fn describe(contradictions: &[Contradiction]) -> String {
    contradictions
        .iter()
        .map(Contradiction::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn interface_patterns(args: &ContextArgs) -> InterfacePatterns {
    InterfacePatterns {
        pod: args.pod_ifaces.clone(),
        node: args.node_ifaces.clone(),
    }
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

impl NodeContext {
    pub(crate) fn vpc_cidr_of(&self, addr: IpAddr) -> Option<&Cidr> {
        self.vpc_cidrs.iter().find(|cidr| cidr.contains(addr))
    }

    pub(crate) fn service_cidr_of(&self, addr: IpAddr) -> Option<&Cidr> {
        self.service_cidrs.iter().find(|cidr| cidr.contains(addr))
    }

    /// The `kubernetes` service's ClusterIP: by Kubernetes convention the first address of the
    /// service CIDR, DNATed by kube-proxy to the EKS-owned ENIs.
    pub(crate) fn is_kubernetes_service(&self, end: SocketAddr) -> bool {
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

    pub(crate) fn is_apiserver(&self, end: SocketAddr) -> bool {
        self.apiserver_ips.contains(&end.ip())
            || (end.port() == APISERVER_PORT && self.controlplane_ips.contains(&end.ip()))
    }

    pub(crate) fn side(&self, addr: IpAddr) -> Side {
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

    /// Whether `addr` is the Amazon-provided VPC resolver: the base + 2 address of an IPv4 VPC
    /// CIDR block, 169.254.169.253 or fd00:ec2::253. Its queries have a limit of their own
    /// (1024 packets/s per ENI), so they are a path of their own.
    pub fn is_vpc_resolver(&self, addr: IpAddr) -> bool {
        VPC_RESOLVER_LINK_LOCAL.contains(&addr)
            || (addr.is_ipv4() && self.vpc_cidrs.iter().any(|cidr| cidr.host(2) == addr))
    }

    /// What the context knows about an address, in words: the facts `tracer explain` prints.
    pub fn facts_about(&self, addr: IpAddr) -> Vec<String> {
        let mut facts = Vec::new();
        let mut fact = |text: String| facts.push(format!("{addr} {text}"));
        if is_imds(addr) {
            fact("is the instance metadata service (IMDS)".to_owned());
        }
        match self.side(addr) {
            Side::LocalPod => {
                fact("is a pod of this node (a /32 route leads to a pod interface)".to_owned());
            }
            Side::Node => {
                fact("is an address of this node (an ENI address that is no pod's)".to_owned());
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
        if addr == NODELOCAL_DNS_ADDR {
            fact("is NodeLocal DNSCache's listener on every node".to_owned());
        }
        if self.is_vpc_resolver(addr) {
            fact("is the Amazon-provided VPC resolver (1024 packets/s per ENI)".to_owned());
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

/// Context facts that cannot all be true (docs/taxonomy.md, "EKS networking facts": a VPC's
/// blocks never overlap, EKS keeps the service CIDR apart from the VPC, the EKS-owned ENIs live
/// in the cluster's subnets). Each names the flags that set the facts involved.
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

/// What an address is to this node: the ends a classification looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
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
