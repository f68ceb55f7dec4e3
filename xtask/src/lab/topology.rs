//! Namespaces, links, addresses, routes and neighbours: the VPC fabric, the node as the VPC
//! CNI sets it up, its pods, the EKS-owned ENIs, a second node and the internet.
//!
//! Interfaces are created directly inside lab namespaces (`ip -n NS link add … peer … netns
//! OTHER`), so nothing ever appears in the root namespace.
use super::{
    LabFacts, exec,
    facts::{
        CONTROLPLANE_IPS, EXTERNAL_HOST, GATEWAY_A, GATEWAY_B, IGW_INET_SIDE, IGW_VPC_SIDE, IMDS,
        NLB_IPS, NODE_IP, NODE2_IP, POD_GATEWAY, PODS, PodSpec, RESOLVER, ROLES,
        SECONDARY_ENI_IP, SUBNET_A, SUBNET_B, VPC_CIDR, lab_mac,
    },
    state,
};

/// The routing table the VPC CNI gives the secondary ENI (device number + 1), and the one the
/// control plane uses for replies from its subnet-B ENI.
const SECONDARY_TABLE: u32 = 2;
/// The VPC CNI's connmark for connections that must return through the primary ENI.
const MAIN_ENI_MARK: &str = "0x80/0x80";

/// Builds the whole topology of lab `id`.
pub fn build(id: &str, facts: &LabFacts) -> anyhow::Result<()> {
    let lab = Builder { id, facts };
    for role in ROLES {
        lab.namespace(role)?;
    }
    lab.vpc()?;
    lab.internet()?;
    lab.node()?;
    lab.controlplane()?;
    lab.node2()?;
    for pod in &PODS {
        lab.pod(pod)?;
    }
    lab.fabric_neighbours()
}

struct Builder<'a> {
    id: &'a str,
    facts: &'a LabFacts,
}

impl Builder<'_> {
    fn ns(&self, role: &str) -> String {
        state::ns_name(self.id, role)
    }

    fn ip(&self, role: &str, args: &str) -> anyhow::Result<()> {
        exec::ip(&self.ns(role), args).map(drop)
    }

    fn sysctl(&self, role: &str, settings: &str) -> anyhow::Result<()> {
        exec::sysctl(&self.ns(role), settings)
    }

    fn mac(&self, owner: &str) -> String {
        lab_mac(self.id, owner)
    }

    /// A namespace with loopback up and IPv6 off (no router solicitations or DAD on the lab's
    /// links: only the traffic the scenarios send).
    fn namespace(&self, role: &str) -> anyhow::Result<()> {
        let ns = self.ns(role);
        eprintln!("lab: creating namespace {ns}");
        exec::output(std::process::Command::new("ip").args(["netns", "add", &ns]))?;
        self.ip(role, "link set lo up")?;
        self.sysctl(
            role,
            "net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
        )
    }

    /// A veth from `dev` in `role` to port `port` of the VPC bridge `bridge`, with the MAC the
    /// VPC assigned to `dev`.
    fn link_to_fabric(&self, role: &str, dev: &str, bridge: &str, port: &str) -> anyhow::Result<()> {
        eprintln!("lab: linking {role} {dev} to the VPC's {bridge}");
        let mac = self.mac(&format!("{role}/{dev}"));
        let vpc = self.ns("vpc");
        self.ip(role, &format!("link add {dev} address {mac} type veth peer name {port} netns {vpc}"))?;
        self.ip("vpc", &format!("link set {port} master {bridge} up"))?;
        self.ip(role, &format!("link set {dev} up"))
    }

    /// The VPC router: one bridge per subnet, the resolver and IMDS on loopback, a default
    /// route to the internet gateway.
    fn vpc(&self) -> anyhow::Result<()> {
        eprintln!("lab: building the VPC router ({VPC_CIDR}) in {}", self.ns("vpc"));
        for (bridge, gateway, subnet) in [("br-a", GATEWAY_A, SUBNET_A), ("br-b", GATEWAY_B, SUBNET_B)] {
            let mac = self.mac(&format!("vpc/{bridge}"));
            self.ip("vpc", &format!("link add {bridge} address {mac} type bridge"))?;
            self.ip("vpc", &format!("addr add {gateway}/{} dev {bridge}", subnet.prefix_len))?;
            self.ip("vpc", &format!("link set {bridge} up"))?;
        }
        self.ip("vpc", &format!("addr add {RESOLVER}/32 dev lo"))?;
        self.ip("vpc", &format!("addr add {IMDS}/32 dev lo"))?;
        self.sysctl("vpc", "net.ipv4.ip_forward=1")
    }

    /// The internet behind the internet gateway: the NLB and an external host.
    fn internet(&self) -> anyhow::Result<()> {
        eprintln!("lab: building the internet gateway and the internet in {}", self.ns("inet"));
        let inet = self.ns("inet");
        self.ip("vpc", &format!("link add igw type veth peer name eth0 netns {inet}"))?;
        self.ip("vpc", &format!("addr add {IGW_VPC_SIDE}/30 dev igw"))?;
        self.ip("vpc", "link set igw up")?;
        self.ip("vpc", &format!("route add default via {IGW_INET_SIDE}"))?;
        self.ip("inet", &format!("addr add {IGW_INET_SIDE}/30 dev eth0"))?;
        self.ip("inet", "link set eth0 up")?;
        for address in NLB_IPS.iter().chain([&EXTERNAL_HOST]) {
            self.ip("inet", &format!("addr add {address}/32 dev lo"))?;
        }
        // Connections the internet opens into the VPC come from the external host.
        self.ip(
            "inet",
            &format!("route add {VPC_CIDR} via {IGW_VPC_SIDE} src {EXTERNAL_HOST}"),
        )
    }

    /// The worker node: primary and secondary ENIs on subnet A, set up as the VPC CNI does.
    fn node(&self) -> anyhow::Result<()> {
        eprintln!("lab: building the node (primary ENI eth0, secondary ENI eth1) in {}", self.ns("node"));
        self.link_to_fabric("node", "eth0", "br-a", "node-eth0")?;
        self.link_to_fabric("node", "eth1", "br-a", "node-eth1")?;
        let prefix = SUBNET_A.prefix_len;
        self.ip("node", &format!("addr add {NODE_IP}/{prefix} dev eth0"))?;
        self.ip("node", &format!("addr add {SECONDARY_ENI_IP}/{prefix} dev eth1"))?;
        self.ip("node", &format!("route add default via {GATEWAY_A} dev eth0"))?;
        // The CNI removes the secondary ENI's subnet route from the main table and gives the
        // ENI a table of its own, used by the pods whose IPs it holds.
        self.ip("node", &format!("route del {SUBNET_A} dev eth1"))?;
        self.ip(
            "node",
            &format!("route add {GATEWAY_A} dev eth1 scope link table {SECONDARY_TABLE}"),
        )?;
        self.ip(
            "node",
            &format!("route add default via {GATEWAY_A} dev eth1 table {SECONDARY_TABLE}"),
        )?;
        // Connections marked by the CNI's connmark rules return through the primary ENI.
        self.ip("node", &format!("rule add fwmark {MAIN_ENI_MARK} lookup main prio 1024"))?;
        self.sysctl(
            "node",
            "net.ipv4.ip_forward=1 \
             net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.default.rp_filter=2 \
             net.ipv4.conf.eth0.rp_filter=2 net.ipv4.conf.eth1.rp_filter=2 \
             net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
        )
    }

    /// The EKS-owned ENIs, one per subnet; replies leave through the ENI of their source.
    fn controlplane(&self) -> anyhow::Result<()> {
        eprintln!("lab: building the EKS-owned ENIs in {}", self.ns("cp"));
        let [eni_a, eni_b] = CONTROLPLANE_IPS;
        self.link_to_fabric("cp", "eni-a", "br-a", "cp-eni-a")?;
        self.link_to_fabric("cp", "eni-b", "br-b", "cp-eni-b")?;
        self.ip("cp", &format!("addr add {eni_a}/{} dev eni-a", SUBNET_A.prefix_len))?;
        self.ip("cp", &format!("addr add {eni_b}/{} dev eni-b", SUBNET_B.prefix_len))?;
        self.ip("cp", &format!("route add default via {GATEWAY_A} dev eni-a"))?;
        self.ip(
            "cp",
            &format!("route add {SUBNET_B} dev eni-b src {eni_b} table {SECONDARY_TABLE}"),
        )?;
        self.ip(
            "cp",
            &format!("route add default via {GATEWAY_B} dev eni-b table {SECONDARY_TABLE}"),
        )?;
        self.ip("cp", &format!("rule add from {eni_b} lookup {SECONDARY_TABLE} prio 100"))
    }

    /// The other worker node, in subnet B; it holds pod-r.
    fn node2(&self) -> anyhow::Result<()> {
        eprintln!("lab: building the second node in {}", self.ns("node2"));
        self.link_to_fabric("node2", "eth0", "br-b", "node2-eth0")?;
        self.ip("node2", &format!("addr add {NODE2_IP}/{} dev eth0", SUBNET_B.prefix_len))?;
        self.ip("node2", &format!("route add default via {GATEWAY_B} dev eth0"))?;
        self.sysctl(
            "node2",
            "net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.default.rp_filter=2",
        )
    }

    /// A pod exactly as the VPC CNI plumbs it: a veth `eni<hash>` (no address) on the node with
    /// a /32 route to the pod; in the pod `eth0` with the /32, a default route through
    /// 169.254.1.1 and a permanent ARP entry for it. Pods whose IP belongs to a secondary ENI
    /// get the CNI's policy rules, so that their traffic leaves through that ENI.
    fn pod(&self, pod: &PodSpec) -> anyhow::Result<()> {
        let host_veth = &self.facts.pod_veths[pod.name];
        eprintln!(
            "lab: plumbing {} {} behind {host_veth} on {} (IP of {})",
            pod.name, pod.ip, pod.node, pod.eni
        );
        let host_mac = self.mac(&format!("{}/{host_veth}", pod.node));
        let pod_ns = self.ns(pod.name);
        self.ip(
            pod.node,
            &format!("link add {host_veth} address {host_mac} type veth peer name eth0 netns {pod_ns}"),
        )?;
        self.ip(pod.node, &format!("link set {host_veth} up"))?;
        self.ip(pod.node, &format!("route add {}/32 dev {host_veth} scope link", pod.ip))?;
        self.ip(pod.node, &format!("rule add to {} lookup main prio 512", pod.ip))?;
        if pod.eni != "eth0" {
            self.ip(
                pod.node,
                &format!("rule add from {} lookup {SECONDARY_TABLE} prio 1536", pod.ip),
            )?;
        }
        self.ip(pod.name, &format!("addr add {}/32 dev eth0", pod.ip))?;
        self.ip(pod.name, "link set eth0 up")?;
        self.ip(pod.name, &format!("route add {POD_GATEWAY} dev eth0 scope link"))?;
        self.ip(pod.name, &format!("route add default via {POD_GATEWAY} dev eth0"))?;
        self.ip(
            pod.name,
            &format!("neigh add {POD_GATEWAY} lladdr {host_mac} dev eth0 nud permanent"),
        )
    }

    /// The VPC fabric knows which ENI holds each secondary IP: the router and the EKS-owned
    /// ENIs deliver pod traffic straight to the owning ENI's MAC (the node does not answer ARP
    /// for its pods).
    fn fabric_neighbours(&self) -> anyhow::Result<()> {
        eprintln!("lab: teaching the VPC fabric which ENI holds each pod IP");
        for pod in &PODS {
            let mac = self.mac(&format!("{}/{}", pod.node, pod.eni));
            let (bridge, cp_eni) = if SUBNET_A.contains(pod.ip) { ("br-a", "eni-a") } else { ("br-b", "eni-b") };
            for (role, dev) in [("vpc", bridge), ("cp", cp_eni)] {
                self.ip(role, &format!("neigh replace {} lladdr {mac} dev {dev} nud permanent", pod.ip))?;
            }
        }
        Ok(())
    }
}
