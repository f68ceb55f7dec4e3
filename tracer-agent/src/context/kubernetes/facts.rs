//! What the agent learns from the Kubernetes API, as plain data, and the pure functions that
//! project API objects onto it. No I/O here: every rule is unit-tested on its own.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};

/// The node label that names its availability zone.
pub(super) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The label the cronjob controller's Jobs do not carry: their names end in `-<minutes>`.
const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// The cluster as seen from this node, as of the latest watch events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterFacts {
    /// This node's pods by address (hostNetwork pods share the node's address and are left out).
    pub pods: HashMap<IpAddr, PodRef>,
    /// The EKS-owned control-plane ENIs: the `default/kubernetes` EndpointSlices.
    pub controlplane_ips: BTreeSet<IpAddr>,
    /// The `kube-system/kube-dns` Service's ClusterIP.
    pub cluster_dns: Option<IpAddr>,
    /// The CoreDNS pods behind it: the `kube-dns` EndpointSlices.
    pub coredns_ips: BTreeSet<IpAddr>,
    /// Every node's InternalIP with its zone label.
    pub node_zones: BTreeMap<IpAddr, String>,
    /// This node's zone.
    pub own_zone: Option<String>,
    /// Every watch has listed its objects at least once.
    pub synced: bool,
    /// Why a watch is failing now; the facts above are then its last good state.
    pub last_error: Option<String>,
}

/// A pod, by name and by the workload that owns it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub workload: Workload,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The controller a pod belongs to, named as an operator knows it: the Deployment rather than
/// its current ReplicaSet, the CronJob rather than tonight's Job.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload {
    /// `Deployment`, `ReplicaSet`, `DaemonSet`, `StatefulSet`, `Job`, `CronJob`, `Pod` for a
    /// bare pod, or the owner's kind as the API spells it (`Node` for static pods, custom kinds).
    pub kind: String,
    pub name: String,
}

/// Whether a connection to another node stays in this node's availability zone.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum ZoneLabel {
    SameZone,
    CrossZone,
}

impl ZoneLabel {
    /// The label value, as dashboards and alerts spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SameZone => "same_zone",
            Self::CrossZone => "cross_zone",
        }
    }
}

impl fmt::Display for ZoneLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ClusterFacts {
    /// The `zone` label of a connection between this node and `peer`, an address on another
    /// node; `None` while either zone is unknown.
    pub fn zone_of(&self, peer: IpAddr) -> Option<ZoneLabel> {
        let own = self.own_zone.as_deref()?;
        let peer_zone = self.zone_of_address(peer)?;
        Some(if peer_zone == own {
            ZoneLabel::SameZone
        } else {
            ZoneLabel::CrossZone
        })
    }

    /// A node's zone for its own address; for any other address (a pod on another node), the
    /// zone of the node address sharing the longest prefix with it. Subnets are per zone, and
    /// the VPC CNI gives pods addresses from their node's subnets, so an address shares at
    /// least its subnet's prefix with every node of that subnet and less with any other node:
    /// the longest match is a node of the same subnet whenever the subnet holds a node. (With
    /// custom networking, pod subnets hold no node and the answer is a guess.) In address
    /// order the longest match is one of the two neighbours, and never both: they first differ
    /// from the address at different bits.
    fn zone_of_address(&self, addr: IpAddr) -> Option<&str> {
        let below = self.node_zones.range(..addr).next_back();
        let at_or_above = self.node_zones.range(addr..).next();
        [below, at_or_above]
            .into_iter()
            .flatten()
            .filter(|(node, _)| node.is_ipv4() == addr.is_ipv4())
            .max_by_key(|(node, _)| shared_prefix(**node, addr))
            .map(|(_, zone)| zone.as_str())
    }
}

/// How many leading bits two addresses share.
fn shared_prefix(a: IpAddr, b: IpAddr) -> u32 {
    let bits = |addr: IpAddr| match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().to_bits(),
        IpAddr::V6(v6) => v6.to_bits(),
    };
    (bits(a) ^ bits(b)).leading_zeros()
}

/// A pod's addresses with who it is. Empty for hostNetwork pods (their address is the
/// node's), for pods without an address yet, and for finished pods, whose address the CNI
/// may already have given to another pod.
pub(super) fn pod_addresses(pod: &Pod) -> Vec<(IpAddr, PodRef)> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let host_network = spec.and_then(|spec| spec.host_network) == Some(true);
    let finished = matches!(
        status.and_then(|status| status.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    if host_network || finished {
        return Vec::new();
    }
    let listed = status
        .and_then(|status| status.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|pod_ip| pod_ip.ip.as_str());
    let primary = status.and_then(|status| status.pod_ip.as_deref());
    let addresses: BTreeSet<IpAddr> = listed
        .chain(primary)
        .filter_map(|text| text.parse().ok())
        .collect();
    let pod_ref = PodRef {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        workload: workload_of(pod),
    };
    addresses
        .into_iter()
        .map(|ip| (ip, pod_ref.clone()))
        .collect()
}

/// The workload a pod belongs to, from its controlling owner reference.
pub(super) fn workload_of(pod: &Pod) -> Workload {
    let metadata = &pod.metadata;
    let owner = metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true));
    let Some(owner) = owner else {
        return Workload {
            kind: "Pod".into(),
            name: metadata.name.clone().unwrap_or_default(),
        };
    };
    let named = |kind: &str, name: &str| Workload {
        kind: kind.into(),
        name: name.into(),
    };
    match owner.kind.as_str() {
        // The deployment controller names its ReplicaSets `<deployment>-<pod-template-hash>`.
        "ReplicaSet" => {
            let hash = metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(POD_TEMPLATE_HASH_LABEL));
            match hash.and_then(|hash| owner.name.strip_suffix(hash.as_str())?.strip_suffix('-')) {
                Some(deployment) => named("Deployment", deployment),
                None => named("ReplicaSet", &owner.name),
            }
        }
        // The cronjob controller names its Jobs `<cronjob>-<scheduled time in minutes>`.
        "Job" => match cronjob_of(&owner.name) {
            Some(cronjob) => named("CronJob", cronjob),
            None => named("Job", &owner.name),
        },
        kind => named(kind, &owner.name),
    }
}

/// The CronJob a Job name stands for, when it ends like the cronjob controller's: a dash and
/// the scheduled time in minutes since 1970 (eight digits until the year 2160).
fn cronjob_of(job: &str) -> Option<&str> {
    let (cronjob, minutes) = job.rsplit_once('-')?;
    let scheduled = minutes.len() >= 8 && minutes.bytes().all(|byte| byte.is_ascii_digit());
    (scheduled && !cronjob.is_empty()).then_some(cronjob)
}

/// Every address an EndpointSlice lists, ready or not: a terminating CoreDNS pod is still the
/// cluster DNS for the connections it serves.
pub(super) fn slice_addresses(slice: &EndpointSlice) -> BTreeSet<IpAddr> {
    slice
        .endpoints
        .iter()
        .flat_map(|endpoint| &endpoint.addresses)
        .filter_map(|text| text.parse().ok())
        .collect()
}

/// A Service's ClusterIP (the first of its families); `None` for headless services.
pub(super) fn cluster_ip(service: &Service) -> Option<IpAddr> {
    let spec = service.spec.as_ref()?;
    let listed = spec.cluster_ips.iter().flatten();
    listed
        .chain(&spec.cluster_ip)
        .find_map(|text| text.parse().ok())
}

/// A node's name, InternalIP addresses and zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct NodeInfo {
    pub name: String,
    pub addresses: BTreeSet<IpAddr>,
    pub zone: Option<String>,
}

pub(super) fn node_info(node: &Node) -> NodeInfo {
    let addresses = node
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|address| address.type_ == "InternalIP")
        .filter_map(|address| address.address.parse().ok())
        .collect();
    NodeInfo {
        name: node.metadata.name.clone().unwrap_or_default(),
        addresses,
        zone: node
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(ZONE_LABEL))
            .cloned(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use serde_json::json;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("a valid Pod")
    }

    fn owned_pod(kind: &str, owner: &str, labels: serde_json::Value) -> Pod {
        pod(json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": kind, "name": owner,
                    "uid": "u", "controller": true}]},
            "status": {"podIP": "10.0.1.5"}
        }))
    }

    fn workload(kind: &str, name: &str) -> Workload {
        Workload {
            kind: kind.into(),
            name: name.into(),
        }
    }

    #[test]
    fn workloads_are_named_as_operators_know_them() {
        let hashed = json!({"pod-template-hash": "5d9f7c8b6"});
        assert_eq!(
            workload_of(&owned_pod("ReplicaSet", "web-5d9f7c8b6", hashed.clone())),
            workload("Deployment", "web")
        );
        // A ReplicaSet of its own: no template hash in its name.
        assert_eq!(
            workload_of(&owned_pod("ReplicaSet", "web", json!({}))),
            workload("ReplicaSet", "web")
        );
        assert_eq!(
            workload_of(&owned_pod("ReplicaSet", "other-abc", hashed)),
            workload("ReplicaSet", "other-abc")
        );
        assert_eq!(
            workload_of(&owned_pod("DaemonSet", "aws-node", json!({}))),
            workload("DaemonSet", "aws-node")
        );
        assert_eq!(
            workload_of(&owned_pod("StatefulSet", "db", json!({}))),
            workload("StatefulSet", "db")
        );
        assert_eq!(
            workload_of(&owned_pod("Job", "backup-29412345", json!({}))),
            workload("CronJob", "backup")
        );
        assert_eq!(
            workload_of(&owned_pod("Job", "migrate-2024", json!({}))),
            workload("Job", "migrate-2024")
        );
        assert_eq!(
            workload_of(&owned_pod("Node", "ip-10-0-1-1", json!({}))),
            workload("Node", "ip-10-0-1-1")
        );
        let bare = pod(json!({"metadata": {"name": "debug", "namespace": "ns"}}));
        assert_eq!(workload_of(&bare), workload("Pod", "debug"));
        // An owner that does not control the pod is not its workload.
        let mut adopted = owned_pod("DaemonSet", "x", json!({}));
        adopted.metadata = ObjectMeta {
            owner_references: Some(vec![OwnerReference {
                controller: Some(false),
                ..adopted.metadata.owner_references.unwrap()[0].clone()
            }]),
            ..adopted.metadata
        };
        assert_eq!(workload_of(&adopted), workload("Pod", "p"));
    }

    #[test]
    fn pod_addresses_leave_out_host_network_and_finished_pods() {
        let dual = pod(json!({
            "metadata": {"name": "a", "namespace": "ns"},
            "status": {"phase": "Running", "podIP": "10.0.1.5",
                "podIPs": [{"ip": "10.0.1.5"}, {"ip": "2001:db8::5"}]}
        }));
        let found: Vec<IpAddr> = pod_addresses(&dual).into_iter().map(|(ip, _)| ip).collect();
        assert_eq!(found, [ip("10.0.1.5"), ip("2001:db8::5")]);
        assert_eq!(pod_addresses(&dual)[0].1.to_string(), "ns/a");

        let host = pod(json!({
            "metadata": {"name": "aws-node-x", "namespace": "kube-system"},
            "spec": {"hostNetwork": true, "containers": []},
            "status": {"podIP": "10.0.1.1"}
        }));
        assert!(pod_addresses(&host).is_empty());
        let done = pod(
            json!({"metadata": {"name": "j"}, "status": {"phase": "Succeeded", "podIP": "10.0.1.6"}}),
        );
        assert!(pod_addresses(&done).is_empty());
        let pending = pod(json!({"metadata": {"name": "q"}, "status": {"phase": "Pending"}}));
        assert!(pod_addresses(&pending).is_empty());
    }

    #[test]
    fn slices_services_and_nodes() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "kubernetes"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.10"]},
                {"addresses": ["10.0.32.10"], "conditions": {"ready": false}},
                {"addresses": ["not-an-ip"]}]
        }))
        .unwrap();
        assert_eq!(
            slice_addresses(&slice),
            BTreeSet::from([ip("10.0.0.10"), ip("10.0.32.10")])
        );

        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "kube-dns"},
            "spec": {"clusterIP": "10.100.0.10", "clusterIPs": ["10.100.0.10"]}
        }))
        .unwrap();
        assert_eq!(cluster_ip(&service), Some(ip("10.100.0.10")));
        let headless: Service = serde_json::from_value(json!({
            "metadata": {"name": "h"}, "spec": {"clusterIP": "None"}
        }))
        .unwrap();
        assert_eq!(cluster_ip(&headless), None);

        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": {ZONE_LABEL: "us-west-2a"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.1"},
                {"type": "Hostname", "address": "ip-10-0-1-1"},
                {"type": "ExternalIP", "address": "198.51.100.7"}]}
        }))
        .unwrap();
        assert_eq!(
            node_info(&node),
            NodeInfo {
                name: "n1".into(),
                addresses: BTreeSet::from([ip("10.0.1.1")]),
                zone: Some("us-west-2a".into()),
            }
        );
    }

    fn facts_with_nodes(nodes: &[(&str, &str)], own: Option<&str>) -> ClusterFacts {
        ClusterFacts {
            node_zones: nodes
                .iter()
                .map(|(address, zone)| (ip(address), zone.to_string()))
                .collect(),
            own_zone: own.map(String::from),
            ..ClusterFacts::default()
        }
    }

    #[test]
    fn zones_of_nodes_and_of_pods_in_their_subnets() {
        // Subnets 10.0.0.0/19 (zone a) and 10.0.32.0/19 (zone b).
        let facts = facts_with_nodes(
            &[("10.0.0.20", "a"), ("10.0.1.30", "a"), ("10.0.32.40", "b")],
            Some("a"),
        );
        use ZoneLabel::*;
        assert_eq!(facts.zone_of(ip("10.0.1.30")), Some(SameZone));
        assert_eq!(facts.zone_of(ip("10.0.32.40")), Some(CrossZone));
        // Pods: below every node, between nodes, at the top of a subnet, above every node.
        assert_eq!(facts.zone_of(ip("10.0.0.5")), Some(SameZone));
        assert_eq!(facts.zone_of(ip("10.0.1.2")), Some(SameZone));
        assert_eq!(facts.zone_of(ip("10.0.31.250")), Some(SameZone));
        assert_eq!(facts.zone_of(ip("10.0.32.7")), Some(CrossZone));
        assert_eq!(facts.zone_of(ip("10.0.60.1")), Some(CrossZone));
        // No node of the other family.
        assert_eq!(facts.zone_of(ip("2001:db8::1")), None);
        let dual = facts_with_nodes(&[("10.0.0.20", "a"), ("2001:db8:0:2::9", "b")], Some("a"));
        assert_eq!(dual.zone_of(ip("2001:db8:0:2::77")), Some(CrossZone));
        assert_eq!(dual.zone_of(ip("10.0.0.99")), Some(SameZone));
        // Own zone unknown: nothing to compare with.
        let unplaced = facts_with_nodes(&[("10.0.0.1", "a")], None);
        assert_eq!(unplaced.zone_of(ip("10.0.0.1")), None);
    }
}
