//! The objects the stand-in serves, as the API server sends them: built as JSON, checked and
//! normalised through their k8s-openapi types.
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

/// The object as its k8s-openapi type serializes it: the shape the API server sends.
pub fn typed<K: Serialize + DeserializeOwned>(value: Value) -> Value {
    let object: K = serde_json::from_value(value).expect("a valid object");
    serde_json::to_value(object).expect("serializable")
}

/// A node with its InternalIP and its zone label.
pub fn node(name: &str, address: &str, zone: &str) -> Value {
    typed::<Node>(json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": address},
            {"type": "Hostname", "address": name}]}
    }))
}

/// A pod on `node`, running with `address` (pending without one), owned by a controller
/// (`kind`, `owner`) when given; a ReplicaSet owner's suffix is its `pod-template-hash`.
pub fn pod(
    namespace: &str,
    name: &str,
    node: &str,
    address: Option<&str>,
    owner: Option<(&str, &str)>,
) -> Value {
    let mut pod = json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "example"}]},
        "status": {"phase": if address.is_some() { "Running" } else { "Pending" }},
    });
    if let Some(address) = address {
        pod["status"]["podIP"] = json!(address);
        pod["status"]["podIPs"] = json!([{"ip": address}]);
    }
    if let Some((kind, owner)) = owner {
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind,
            "name": owner, "uid": format!("uid-{owner}"), "controller": true}]);
        if let Some((_, hash)) = owner.rsplit_once('-').filter(|_| kind == "ReplicaSet") {
            pod["metadata"]["labels"] = json!({"pod-template-hash": hash});
        }
    }
    typed::<Pod>(pod)
}

/// A ClusterIP Service serving DNS.
pub fn service(namespace: &str, name: &str, cluster_ip: &str) -> Value {
    typed::<Service>(json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ports": [{"port": 53, "protocol": "UDP"}]}
    }))
}

/// An EndpointSlice of `service` with ready endpoints at `addresses`.
pub fn slice(namespace: &str, name: &str, service: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|address| json!({"addresses": [address], "conditions": {"ready": true}}))
        .collect();
    typed::<EndpointSlice>(json!({
        "metadata": {"name": name, "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
    }))
}

/// A DaemonSet selecting pods labelled `app: NAME`.
pub fn daemonset(namespace: &str, name: &str) -> Value {
    typed::<DaemonSet>(json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}")},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": "example"}]}
            }
        }
    }))
}
