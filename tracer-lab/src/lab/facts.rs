//! The lab's fixed addresses and names, and the facts a lab publishes about itself.
//!
//! Addresses are fixed (faithful to a typical EKS cluster); only interface names and MACs
//! depend on the lab id, so that two labs side by side never share one.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

/// The cluster endpoint hostname EKS gives the cluster.
pub const CLUSTER_ENDPOINT: &str = "EXAMPLED0C5A1A7E7D0.gr7.lab-1.eks.amazonaws.com";

pub(crate) const VPC_CIDR: Ipv4Net = Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 16);
pub(crate) const SUBNET_A: Ipv4Net = Ipv4Net::new(Ipv4Addr::new(10, 0, 1, 0), 24);
pub(crate) const SUBNET_B: Ipv4Net = Ipv4Net::new(Ipv4Addr::new(10, 0, 2, 0), 24);
pub(crate) const SERVICE_CIDR: Ipv4Net = Ipv4Net::new(Ipv4Addr::new(10, 100, 0, 0), 16);
/// The region (as in the cluster endpoint name) and this node's availability zone.
pub(crate) const REGION: &str = "lab-1";
pub(crate) const AZ_A: &str = "lab-1a";

/// The VPC router's address in each subnet (the first host address, as in AWS).
pub(crate) const GATEWAY_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
pub(crate) const GATEWAY_B: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// The VPC resolver (the VPC base address + 2, as in AWS).
pub(crate) const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub(crate) const IMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

pub(crate) const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
pub(crate) const SECONDARY_ENI_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
pub(crate) const NODE2_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 10);
/// The EKS-owned ENIs, one per subnet.
pub(crate) const CONTROLPLANE_IPS: [Ipv4Addr; 2] =
    [Ipv4Addr::new(10, 0, 1, 50), Ipv4Addr::new(10, 0, 2, 50)];
/// The public NLB in front of the API server.
pub(crate) const NLB_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 10),
    Ipv4Addr::new(203, 0, 113, 11),
];
pub(crate) const EXTERNAL_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);
/// The link between the VPC router and the internet gateway.
pub(crate) const IGW_VPC_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub(crate) const IGW_INET_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The VPC CNI's fake gateway every pod routes through.
pub(crate) const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

pub(crate) const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub(crate) const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 10);
/// A plain ClusterIP service in front of pod-b.
pub(crate) const BACKEND_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 20, 20);
/// The NodePort service in front of pod-a.
pub(crate) const WEB_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 30, 30);
pub(crate) const NODE_PORT: u16 = 30080;
/// The port pod-r's security group does not allow (the VPC drops it silently), and one where
/// nothing listens on pod-r (refused with RST).
pub(crate) const SECURITY_GROUP_DENIED_PORT: u16 = 9999;
pub(crate) const CLOSED_PORT: u16 = 9998;

/// Every namespace of a lab, by role.
pub(crate) const ROLES: [&str; 10] = [
    "vpc", "inet", "cp", "node", "pod-a", "pod-b", "coredns", "pod-c", "node2", "pod-r",
];

/// A pod behind a VPC-CNI-style veth: its IP is a secondary IP of `eni` on `node`.
pub(crate) struct PodSpec<'a> {
    pub name: &'a str,
    pub ip: Ipv4Addr,
    /// The role of the node namespace the pod runs on.
    pub node: &'a str,
    pub eni: &'a str,
}

pub(crate) const PODS: [PodSpec<'static>; 5] = [
    PodSpec {
        name: "pod-a",
        ip: Ipv4Addr::new(10, 0, 1, 101),
        node: "node",
        eni: "eth0",
    },
    PodSpec {
        name: "pod-b",
        ip: Ipv4Addr::new(10, 0, 1, 102),
        node: "node",
        eni: "eth0",
    },
    PodSpec {
        name: "coredns",
        ip: Ipv4Addr::new(10, 0, 1, 103),
        node: "node",
        eni: "eth0",
    },
    PodSpec {
        name: "pod-c",
        ip: Ipv4Addr::new(10, 0, 1, 121),
        node: "node",
        eni: "eth1",
    },
    PodSpec {
        name: "pod-r",
        ip: Ipv4Addr::new(10, 0, 2, 101),
        node: "node2",
        eni: "eth0",
    },
];

/// The IP of one of [`PODS`].
pub(crate) fn pod_ip(name: &str) -> Ipv4Addr {
    PODS.iter()
        .find(|pod| pod.name == name)
        .unwrap_or_else(|| panic!("no pod {name} in the lab"))
        .ip
}

/// An IPv4 prefix such as 10.0.0.0/16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Net {
    pub const fn new(addr: Ipv4Addr, prefix_len: u8) -> Self {
        Self { addr, prefix_len }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One of the node's ENIs as IMDS describes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Eni {
    /// The interface in the node namespace (eth0, eth1).
    pub device: String,
    pub device_number: u32,
    pub interface_id: String,
    pub mac: String,
    pub primary_ip: Ipv4Addr,
    /// The pod IPs the ENI holds.
    pub secondary_ips: Vec<Ipv4Addr>,
}

/// What a lab is: the addresses and names agents, tests and the demo need.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabFacts {
    pub vpc_cidr: Ipv4Net,
    /// This node's subnet (AZ lab-1a) and the other node's (lab-1b).
    pub subnet_a: Ipv4Net,
    pub subnet_b: Ipv4Net,
    pub availability_zone: String,
    pub service_cidr: Ipv4Net,
    /// The node's primary ENI address, and its secondary ENI's.
    pub node_ip: Ipv4Addr,
    pub secondary_eni_ip: Ipv4Addr,
    /// The other worker node, in subnet B.
    pub node2_ip: Ipv4Addr,
    /// Every pod by name: this node's (pod-a, pod-b, coredns, pod-c) and pod-r on node2.
    pub pod_ips: BTreeMap<String, Ipv4Addr>,
    /// The host side of each pod's veth (`eni` + hash), on its node.
    pub pod_veths: BTreeMap<String, String>,
    /// The EKS-owned ENIs (private endpoint), one per subnet.
    pub controlplane_ips: Vec<Ipv4Addr>,
    /// The API server's public NLB.
    pub nlb_ips: Vec<Ipv4Addr>,
    pub cluster_endpoint: String,
    /// kube-dns's ClusterIP.
    pub cluster_dns: Ipv4Addr,
    /// The `kubernetes` service's ClusterIP.
    pub kubernetes_service_ip: Ipv4Addr,
    pub backend_service_ip: Ipv4Addr,
    pub node_port: u16,
    /// The host on the internet (HTTP :80, sink :9000).
    pub external_host: Ipv4Addr,
    /// The VPC resolver.
    pub resolver: Ipv4Addr,
    pub imds: Ipv4Addr,
    pub instance_id: String,
    /// The node's ENIs, primary first.
    pub enis: Vec<Eni>,
}

impl LabFacts {
    pub fn new(id: &str) -> Self {
        let eni = |device: &str, device_number: u32, primary_ip| Eni {
            device: device.to_owned(),
            device_number,
            interface_id: format!("eni-0{id}{device_number:012x}"),
            mac: lab_mac(id, &format!("node/{device}")),
            primary_ip,
            secondary_ips: PODS
                .iter()
                .filter(|pod| pod.node == "node" && pod.eni == device)
                .map(|pod| pod.ip)
                .collect(),
        };
        Self {
            vpc_cidr: VPC_CIDR,
            subnet_a: SUBNET_A,
            subnet_b: SUBNET_B,
            availability_zone: AZ_A.to_owned(),
            service_cidr: SERVICE_CIDR,
            node_ip: NODE_IP,
            secondary_eni_ip: SECONDARY_ENI_IP,
            node2_ip: NODE2_IP,
            pod_ips: PODS
                .iter()
                .map(|pod| (pod.name.to_owned(), pod.ip))
                .collect(),
            pod_veths: PODS
                .iter()
                .map(|pod| (pod.name.to_owned(), host_veth_name(id, pod.name)))
                .collect(),
            controlplane_ips: CONTROLPLANE_IPS.to_vec(),
            nlb_ips: NLB_IPS.to_vec(),
            cluster_endpoint: CLUSTER_ENDPOINT.to_owned(),
            cluster_dns: CLUSTER_DNS,
            kubernetes_service_ip: KUBERNETES_SERVICE_IP,
            backend_service_ip: BACKEND_SERVICE_IP,
            node_port: NODE_PORT,
            external_host: EXTERNAL_HOST,
            resolver: RESOLVER,
            imds: IMDS,
            instance_id: format!("i-0lab{id}"),
            enis: vec![eni("eth0", 0, NODE_IP), eni("eth1", 1, SECONDARY_ENI_IP)],
        }
    }
}

/// The host-side veth name of a pod, made like the VPC CNI makes it: `eni` + the first 11 hex
/// digits of a hash of the pod's identity (here the lab id, namespace and name).
pub(crate) fn host_veth_name(id: &str, pod: &str) -> String {
    format!("eni{:016x}", stable_hash(&format!("{id}/default.{pod}")))[..14].to_owned()
}

/// A stable, locally administered MAC for `owner` (e.g. "node/eth0") in lab `id`. ENI MACs are
/// assigned by the VPC, not by the instance, so the lab assigns them too.
pub(crate) fn lab_mac(id: &str, owner: &str) -> String {
    let bytes = stable_hash(&format!("{id}/{owner}")).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4]
    )
}

/// FNV-1a with MurmurHash3's finalizer (so that names differing in one character hash far
/// apart): stable across Rust versions, unlike `DefaultHasher`.
fn stable_hash(text: &str) -> u64 {
    let mut hash = text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    for multiplier in [0xff51_afd7_ed55_8ccd, 0xc4ce_b9fe_1a85_ec53] {
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(multiplier);
    }
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_contain_their_addresses_only() {
        assert!(VPC_CIDR.contains(Ipv4Addr::new(10, 0, 255, 1)));
        assert!(!VPC_CIDR.contains(Ipv4Addr::new(10, 1, 0, 1)));
        assert!(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).contains(EXTERNAL_HOST));
        assert_eq!(SERVICE_CIDR.to_string(), "10.100.0.0/16");
    }

    #[test]
    fn veth_names_look_like_the_cni_s_and_differ_between_labs_and_pods() {
        let name = host_veth_name("1a2b", "pod-a");
        assert_eq!(name.len(), 14);
        assert!(name.starts_with("eni") && name[3..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(name, host_veth_name("1a2b", "pod-a"));
        assert_ne!(name, host_veth_name("1a2c", "pod-a"));
        assert_ne!(name, host_veth_name("1a2b", "pod-b"));
    }

    #[test]
    fn enis_hold_their_pods_ips() {
        let facts = LabFacts::new("1a2b");
        assert_eq!(facts.enis[0].secondary_ips.len(), 3);
        assert_eq!(facts.enis[1].secondary_ips, [pod_ip("pod-c")]);
        assert!(facts.enis[0].mac.starts_with("02:"));
        assert_ne!(facts.enis[0].mac, facts.enis[1].mac);
    }
}
