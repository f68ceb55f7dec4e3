//! Namespaces, links, addresses, routes and neighbours: the VPC fabric, the node as the VPC
//! CNI sets it up, its pods, the EKS-owned ENIs, a second node and the internet.
//!
//! Interfaces are created directly inside lab namespaces (`ip -n NS link add … peer … netns
//! OTHER`), so nothing ever appears in the root namespace.
use std::fmt;

use anyhow::Context as _;

use super::{
    exec,
    facts::{
        CONTROLPLANE_IPS, EXTERNAL_HOST, GATEWAY_A, GATEWAY_B, IGW_INET_SIDE, IGW_VPC_SIDE, IMDS,
        NLB_IPS, NODE_IP, NODE2_IP, POD_GATEWAY, PODS, PodSpec, RESOLVER, ROLES, SECONDARY_ENI_IP,
        SUBNET_A, SUBNET_B, VPC_CIDR, host_veth_name, lab_mac,
    },
    state,
};

/// The routing table the VPC CNI gives the secondary ENI (device number + 1), and the one the
/// control plane uses for replies from its subnet-B ENI.
const SECONDARY_TABLE: u32 = 2;
/// The VPC CNI's connmark for connections that must return through the primary ENI.
const MAIN_ENI_MARK: &str = "0x80/0x80";

/// Builds the whole topology of lab `id`.
pub(super) fn build(id: &str) -> anyhow::Result<()> {
    let lab = Builder { id };
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

/// Adds pod `name` with address `ip` to the node of lab `id`, behind a veth named like the
/// VPC CNI's, as a new pod gets when it is scheduled; returns the host-side veth's name.
/// Deleting the pod's namespace (`trc-<id>-<name>`) removes the veth with it.
pub(super) fn plug_pod(id: &str, name: &str, ip: std::net::Ipv4Addr) -> anyhow::Result<String> {
    let lab = Builder { id };
    lab.namespace(name)?;
    let pod = PodSpec {
        name,
        ip,
        node: "node",
        eni: "eth0",
    };
    lab.pod(&pod)?;
    Ok(host_veth_name(id, name))
}

/// One lab namespace, to run `ip` and `sysctl` in.
struct Ns(String);

impl Ns {
    /// `ip -n <ns> <args>`, the arguments written as on a shell line.
    fn ip(&self, args: impl AsRef<str>) -> anyhow::Result<()> {
        exec::ip(&self.0, args.as_ref()).map(drop)
    }

    fn sysctl(&self, settings: &str) -> anyhow::Result<()> {
        exec::sysctl(&self.0, settings)
    }

    /// Several `ip` command lines in one `ip -batch` process.
    fn ip_batch(&self, commands: &[String]) -> anyhow::Result<()> {
        exec::ip_batch(&self.0, commands)
    }
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

struct Builder<'a> {
    id: &'a str,
}

impl Builder<'_> {
    fn ns(&self, role: &str) -> Ns {
        Ns(state::ns_name(self.id, role))
    }

    /// The MAC the VPC assigns to `owner` ("node/eth0").
    fn mac(&self, owner: &str) -> String {
        lab_mac(self.id, owner)
    }

    /// A namespace with loopback up and IPv6 off (no router solicitations or DAD on the lab's
    /// links: only the traffic the scenarios send).
    fn namespace(&self, role: &str) -> anyhow::Result<()> {
        let ns = self.ns(role);
        eprintln!("lab: creating namespace {ns}");
        exec::netns(&format!("add {ns}"))?;
        ns.ip("link set lo up")?;
        ns.sysctl("net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
    }

    /// A veth from `dev` in `role` to port `port` of the VPC bridge `bridge`, with the MAC the
    /// VPC assigned to `dev`.
    fn link_to_fabric(
        &self,
        role: &str,
        dev: &str,
        bridge: &str,
        port: &str,
    ) -> anyhow::Result<()> {
        eprintln!("lab: linking {role} {dev} to the VPC's {bridge}");
        let (ns, vpc) = (self.ns(role), self.ns("vpc"));
        let mac = self.mac(&format!("{role}/{dev}"));
        ns.ip(format!(
            "link add {dev} address {mac} type veth peer name {port} netns {vpc}"
        ))?;
        vpc.ip(format!("link set {port} master {bridge} up"))?;
        ns.ip(format!("link set {dev} up"))
    }

    /// The VPC router: one bridge per subnet, the resolver and IMDS on loopback, a default
    /// route to the internet gateway.
    fn vpc(&self) -> anyhow::Result<()> {
        let vpc = self.ns("vpc");
        eprintln!("lab: building the VPC router ({VPC_CIDR}) in {vpc}");
        for (bridge, gateway, subnet) in
            [("br-a", GATEWAY_A, SUBNET_A), ("br-b", GATEWAY_B, SUBNET_B)]
        {
            let mac = self.mac(&format!("vpc/{bridge}"));
            vpc.ip(format!("link add {bridge} address {mac} type bridge"))?;
            vpc.ip(format!(
                "addr add {gateway}/{} dev {bridge}",
                subnet.prefix_len
            ))?;
            vpc.ip(format!("link set {bridge} up"))?;
        }
        vpc.ip(format!("addr add {RESOLVER}/32 dev lo"))?;
        vpc.ip(format!("addr add {IMDS}/32 dev lo"))?;
        vpc.sysctl("net.ipv4.ip_forward=1")
    }

    /// The internet behind the internet gateway: the NLB and an external host.
    fn internet(&self) -> anyhow::Result<()> {
        let (vpc, inet) = (self.ns("vpc"), self.ns("inet"));
        eprintln!("lab: building the internet gateway and the internet in {inet}");
        vpc.ip(format!(
            "link add igw type veth peer name eth0 netns {inet}"
        ))?;
        vpc.ip(format!("addr add {IGW_VPC_SIDE}/30 dev igw"))?;
        vpc.ip("link set igw up")?;
        vpc.ip(format!("route add default via {IGW_INET_SIDE}"))?;
        inet.ip(format!("addr add {IGW_INET_SIDE}/30 dev eth0"))?;
        inet.ip("link set eth0 up")?;
        for address in NLB_IPS.iter().chain([&EXTERNAL_HOST]) {
            inet.ip(format!("addr add {address}/32 dev lo"))?;
        }
        // Connections the internet opens into the VPC come from the external host.
        inet.ip(format!(
            "route add {VPC_CIDR} via {IGW_VPC_SIDE} src {EXTERNAL_HOST}"
        ))
    }

    /// The worker node: primary and secondary ENIs on subnet A, set up as the VPC CNI does.
    fn node(&self) -> anyhow::Result<()> {
        let node = self.ns("node");
        eprintln!("lab: building the node (primary ENI eth0, secondary ENI eth1) in {node}");
        self.link_to_fabric("node", "eth0", "br-a", "node-eth0")?;
        self.link_to_fabric("node", "eth1", "br-a", "node-eth1")?;
        let prefix = SUBNET_A.prefix_len;
        node.ip(format!("addr add {NODE_IP}/{prefix} dev eth0"))?;
        node.ip(format!("addr add {SECONDARY_ENI_IP}/{prefix} dev eth1"))?;
        node.ip(format!("route add default via {GATEWAY_A} dev eth0"))?;
        // As on EC2, the node's stub resolver is the VPC resolver; `ip netns exec` bind-mounts
        // this file over /etc/resolv.conf for the node's processes (the agent included).
        let etc = state::netns_etc(&node.0);
        std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
        std::fs::write(etc.join("resolv.conf"), format!("nameserver {RESOLVER}\n"))
            .with_context(|| format!("writing {}/resolv.conf", etc.display()))?;
        // The CNI removes the secondary ENI's subnet route from the main table and gives the
        // ENI a table of its own, used by the pods whose IPs it holds.
        node.ip(format!("route del {SUBNET_A} dev eth1"))?;
        node.ip(format!(
            "route add {GATEWAY_A} dev eth1 scope link table {SECONDARY_TABLE}"
        ))?;
        node.ip(format!(
            "route add default via {GATEWAY_A} dev eth1 table {SECONDARY_TABLE}"
        ))?;
        // Connections marked by the CNI's connmark rules return through the primary ENI.
        node.ip(format!(
            "rule add fwmark {MAIN_ENI_MARK} lookup main prio 1024"
        ))?;
        node.sysctl(
            "net.ipv4.ip_forward=1 \
             net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.default.rp_filter=2 \
             net.ipv4.conf.eth0.rp_filter=2 net.ipv4.conf.eth1.rp_filter=2 \
             net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
        )
    }

    /// The EKS-owned ENIs, one per subnet; replies leave through the ENI of their source.
    fn controlplane(&self) -> anyhow::Result<()> {
        let cp = self.ns("cp");
        eprintln!("lab: building the EKS-owned ENIs in {cp}");
        let [eni_a, eni_b] = CONTROLPLANE_IPS;
        self.link_to_fabric("cp", "eni-a", "br-a", "cp-eni-a")?;
        self.link_to_fabric("cp", "eni-b", "br-b", "cp-eni-b")?;
        cp.ip(format!(
            "addr add {eni_a}/{} dev eni-a",
            SUBNET_A.prefix_len
        ))?;
        cp.ip(format!(
            "addr add {eni_b}/{} dev eni-b",
            SUBNET_B.prefix_len
        ))?;
        cp.ip(format!("route add default via {GATEWAY_A} dev eni-a"))?;
        cp.ip(format!(
            "route add {SUBNET_B} dev eni-b src {eni_b} table {SECONDARY_TABLE}"
        ))?;
        cp.ip(format!(
            "route add default via {GATEWAY_B} dev eni-b table {SECONDARY_TABLE}"
        ))?;
        cp.ip(format!(
            "rule add from {eni_b} lookup {SECONDARY_TABLE} prio 100"
        ))
    }

    /// The other worker node, in subnet B; it holds pod-r.
    fn node2(&self) -> anyhow::Result<()> {
        let node2 = self.ns("node2");
        eprintln!("lab: building the second node in {node2}");
        self.link_to_fabric("node2", "eth0", "br-b", "node2-eth0")?;
        node2.ip(format!(
            "addr add {NODE2_IP}/{} dev eth0",
            SUBNET_B.prefix_len
        ))?;
        node2.ip(format!("route add default via {GATEWAY_B} dev eth0"))?;
        node2.sysctl(
            "net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.default.rp_filter=2",
        )
    }

    /// A pod exactly as the VPC CNI plumbs it: a veth `eni<hash>` (no address) on the node with
    /// a /32 route to the pod; in the pod `eth0` with the /32, a default route through
    /// 169.254.1.1 and a permanent ARP entry for it. Pods whose IP belongs to a secondary ENI
    /// get the CNI's policy rules, so that their traffic leaves through that ENI.
    fn pod(&self, pod: &PodSpec<'_>) -> anyhow::Result<()> {
        let (node, ns, ip) = (self.ns(pod.node), self.ns(pod.name), pod.ip);
        let veth = &host_veth_name(self.id, pod.name);
        eprintln!(
            "lab: plumbing {} {ip} behind {veth} on {} (IP of {})",
            pod.name, pod.node, pod.eni
        );
        let mac = self.mac(&format!("{}/{veth}", pod.node));
        let mut on_node = vec![
            format!("link add {veth} address {mac} type veth peer name eth0 netns {ns}"),
            format!("link set {veth} up"),
            format!("route add {ip}/32 dev {veth} scope link"),
            format!("rule add to {ip} lookup main prio 512"),
        ];
        if pod.eni != "eth0" {
            on_node.push(format!(
                "rule add from {ip} lookup {SECONDARY_TABLE} prio 1536"
            ));
        }
        node.ip_batch(&on_node)?;
        ns.ip_batch(&[
            format!("addr add {ip}/32 dev eth0"),
            "link set eth0 up".to_owned(),
            format!("route add {POD_GATEWAY} dev eth0 scope link"),
            format!("route add default via {POD_GATEWAY} dev eth0"),
            format!("neigh add {POD_GATEWAY} lladdr {mac} dev eth0 nud permanent"),
        ])
    }

    /// The VPC fabric knows which ENI holds each secondary IP: the router and the EKS-owned
    /// ENIs deliver pod traffic straight to the owning ENI's MAC (the node does not answer ARP
    /// for its pods).
    fn fabric_neighbours(&self) -> anyhow::Result<()> {
        eprintln!("lab: teaching the VPC fabric which ENI holds each pod IP");
        let (vpc, cp) = (self.ns("vpc"), self.ns("cp"));
        for pod in &PODS {
            let mac = self.mac(&format!("{}/{}", pod.node, pod.eni));
            let (bridge, cp_eni) = if SUBNET_A.contains(pod.ip) {
                ("br-a", "eni-a")
            } else {
                ("br-b", "eni-b")
            };
            for (ns, dev) in [(&vpc, bridge), (&cp, cp_eni)] {
                ns.ip(format!(
                    "neigh replace {} lladdr {mac} dev {dev} nud permanent",
                    pod.ip
                ))?;
            }
        }
        Ok(())
    }
}
