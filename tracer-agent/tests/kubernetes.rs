//! The Kubernetes context against an in-process API server stand-in (`kube-standin`): the published
//! facts follow list and watch — adds, changes, deletes, zone labels — and survive what a real
//! API server does to its clients: bookmarks, cut watch connections, 410 Gone, garbage answers,
//! an outage.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use kube_standin::{
    Kind, StandIn,
    objects::{node, pod, service, slice},
};
use serde_json::json;
use tokio::sync::watch;
use tracer_agent::context::kubernetes::{
    self, ClusterFacts, Connection, PodRef, Workload, ZoneLabel,
};

/// How long the facts may take to follow a change: the watcher's backoff after an error
/// starts at 0.8 s and doubles.
const CONVERGENCE: Duration = Duration::from_secs(15);
const NODE: &str = "ip-10-0-0-20";
const ZONE_A: &str = "us-west-2a";
const ZONE_B: &str = "us-west-2b";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn pod_ref(namespace: &str, name: &str, kind: &str, workload: &str) -> PodRef {
    PodRef {
        namespace: namespace.into(),
        name: name.into(),
        workload: Workload {
            kind: kind.into(),
            name: workload.into(),
        },
    }
}

/// A cluster of two nodes in two zones, with objects the watches must see and objects their
/// selectors must leave out; and the facts it should produce.
fn seed(stand_in: &StandIn) -> ClusterFacts {
    stand_in.apply(Kind::Nodes, node(NODE, "10.0.0.20", ZONE_A));
    stand_in.apply(Kind::Nodes, node("ip-10-0-32-40", "10.0.32.40", ZONE_B));
    let web = pod(
        "shop",
        "web-5d9f7c8b6-abcde",
        NODE,
        Some("10.0.1.10"),
        Some(("ReplicaSet", "web-5d9f7c8b6")),
    );
    stand_in.apply(Kind::Pods, web);
    let coredns = pod(
        "kube-system",
        "coredns-6f8b9c-xyz",
        NODE,
        Some("10.0.1.53"),
        Some(("ReplicaSet", "coredns-6f8b9c")),
    );
    stand_in.apply(Kind::Pods, coredns);
    let mut aws_node = pod(
        "kube-system",
        "aws-node-q",
        NODE,
        Some("10.0.0.20"),
        Some(("DaemonSet", "aws-node")),
    );
    aws_node["spec"]["hostNetwork"] = json!(true);
    stand_in.apply(Kind::Pods, aws_node);
    let elsewhere = pod(
        "shop",
        "web-5d9f7c8b6-fghij",
        "ip-10-0-32-40",
        Some("10.0.33.10"),
        Some(("ReplicaSet", "web-5d9f7c8b6")),
    );
    stand_in.apply(Kind::Pods, elsewhere);
    stand_in.apply(
        Kind::Services,
        service("kube-system", "kube-dns", "10.100.0.10"),
    );
    stand_in.apply(
        Kind::Services,
        service("kube-system", "metrics-server", "10.100.0.77"),
    );
    stand_in.apply(
        Kind::EndpointSlices,
        slice(
            "default",
            "kubernetes",
            "kubernetes",
            &["10.0.0.200", "10.0.32.200"],
        ),
    );
    stand_in.apply(
        Kind::EndpointSlices,
        slice(
            "kube-system",
            "kube-dns-x1",
            "kube-dns",
            &["10.0.1.53", "10.0.33.53"],
        ),
    );
    stand_in.apply(
        Kind::EndpointSlices,
        slice("default", "shop-y2", "shop", &["10.0.1.10"]),
    );

    ClusterFacts {
        pods: [
            (
                ip("10.0.1.10"),
                pod_ref("shop", "web-5d9f7c8b6-abcde", "Deployment", "web"),
            ),
            (
                ip("10.0.1.53"),
                pod_ref("kube-system", "coredns-6f8b9c-xyz", "Deployment", "coredns"),
            ),
        ]
        .into(),
        controlplane_ips: BTreeSet::from([ip("10.0.0.200"), ip("10.0.32.200")]),
        cluster_dns: Some(ip("10.100.0.10")),
        coredns_ips: BTreeSet::from([ip("10.0.1.53"), ip("10.0.33.53")]),
        node_zones: BTreeMap::from([
            (ip("10.0.0.20"), ZONE_A.into()),
            (ip("10.0.32.40"), ZONE_B.into()),
        ]),
        own_zone: Some(ZONE_A.into()),
        synced: true,
        last_error: None,
    }
}

/// A seeded stand-in, and the facts once the watches have listed it.
async fn started() -> (StandIn, watch::Receiver<ClusterFacts>, ClusterFacts) {
    let stand_in = StandIn::start().await;
    let expected = seed(&stand_in);
    let connection = Connection {
        config: kube::Config::new(stand_in.url().parse().unwrap()),
        node_name: NODE.into(),
    };
    let mut facts = kubernetes::start(connection).expect("a client for the stand-in");
    converge(&mut facts, "the first list", |facts| *facts == expected).await;
    (stand_in, facts, expected)
}

/// Waits, at most `CONVERGENCE`, for the published facts to satisfy `wanted`.
async fn converge(
    facts: &mut watch::Receiver<ClusterFacts>,
    what: &str,
    wanted: impl Fn(&ClusterFacts) -> bool,
) -> ClusterFacts {
    let waited = tokio::time::timeout(CONVERGENCE, facts.wait_for(|facts| wanted(facts)))
        .await
        .map(|reached| reached.map(|facts| facts.clone()));
    match waited {
        Ok(Ok(facts)) => facts,
        Ok(Err(_)) => panic!("{what}: the watches stopped"),
        Err(_) => panic!(
            "{what}: not reached within {CONVERGENCE:?}; the facts are {:#?}",
            *facts.borrow()
        ),
    }
}

#[tokio::test]
async fn facts_follow_adds_changes_and_deletes() {
    let (stand_in, mut facts, mut expected) = started().await;
    let same = |expected: &ClusterFacts| {
        let expected = expected.clone();
        move |facts: &ClusterFacts| *facts == expected
    };

    stand_in.apply(
        Kind::Pods,
        pod(
            "shop",
            "api-0",
            NODE,
            Some("10.0.1.11"),
            Some(("StatefulSet", "api")),
        ),
    );
    expected.pods.insert(
        ip("10.0.1.11"),
        pod_ref("shop", "api-0", "StatefulSet", "api"),
    );
    converge(&mut facts, "a pod added", same(&expected)).await;

    // A pod is scheduled, then gets its address, then finishes.
    let job = ("Job", "report-29412345");
    stand_in.apply(
        Kind::Pods,
        pod("shop", "report-29412345-k", NODE, None, Some(job)),
    );
    stand_in.apply(
        Kind::Pods,
        pod(
            "shop",
            "report-29412345-k",
            NODE,
            Some("10.0.1.12"),
            Some(job),
        ),
    );
    expected.pods.insert(
        ip("10.0.1.12"),
        pod_ref("shop", "report-29412345-k", "CronJob", "report"),
    );
    converge(&mut facts, "a pod given its address", same(&expected)).await;
    let mut finished = pod(
        "shop",
        "report-29412345-k",
        NODE,
        Some("10.0.1.12"),
        Some(job),
    );
    finished["status"]["phase"] = json!("Succeeded");
    stand_in.apply(Kind::Pods, finished);
    expected.pods.remove(&ip("10.0.1.12"));
    converge(&mut facts, "a pod finished", same(&expected)).await;

    stand_in.delete(Kind::Pods, "shop", "api-0");
    expected.pods.remove(&ip("10.0.1.11"));
    converge(&mut facts, "a pod deleted", same(&expected)).await;

    // The control plane moves an ENI; CoreDNS scales up; kube-dns is recreated elsewhere.
    stand_in.apply(
        Kind::EndpointSlices,
        slice(
            "default",
            "kubernetes",
            "kubernetes",
            &["10.0.0.201", "10.0.32.200"],
        ),
    );
    stand_in.apply(
        Kind::EndpointSlices,
        slice("kube-system", "kube-dns-x2", "kube-dns", &["10.0.65.53"]),
    );
    stand_in.delete(Kind::Services, "kube-system", "kube-dns");
    stand_in.apply(
        Kind::Services,
        service("kube-system", "kube-dns", "10.100.0.53"),
    );
    expected.controlplane_ips = BTreeSet::from([ip("10.0.0.201"), ip("10.0.32.200")]);
    expected.coredns_ips.insert(ip("10.0.65.53"));
    expected.cluster_dns = Some(ip("10.100.0.53"));
    converge(
        &mut facts,
        "EndpointSlices and the Service changed",
        same(&expected),
    )
    .await;

    // Zones: a pod on the other node is cross-zone until that node is relabelled.
    let current = facts.borrow().clone();
    assert_eq!(
        current.zone_of(ip("10.0.33.10")),
        Some(ZoneLabel::CrossZone)
    );
    assert_eq!(current.zone_of(ip("10.0.1.99")), Some(ZoneLabel::SameZone));
    stand_in.apply(Kind::Nodes, node("ip-10-0-32-40", "10.0.32.40", ZONE_A));
    stand_in.apply(Kind::Nodes, node("ip-10-0-64-9", "10.0.64.9", "us-west-2c"));
    expected.node_zones.insert(ip("10.0.32.40"), ZONE_A.into());
    expected
        .node_zones
        .insert(ip("10.0.64.9"), "us-west-2c".into());
    let current = converge(&mut facts, "zone labels changed", same(&expected)).await;
    assert_eq!(current.zone_of(ip("10.0.33.10")), Some(ZoneLabel::SameZone));
    assert_eq!(
        current.zone_of(ip("10.0.65.53")),
        Some(ZoneLabel::CrossZone)
    );
}

#[tokio::test]
async fn a_cut_watch_resumes_from_the_last_bookmark() {
    let (stand_in, mut facts, mut expected) = started().await;
    // A change the pods watch does not select still moves its resourceVersion on, by bookmark.
    stand_in.apply(
        Kind::Pods,
        pod(
            "shop",
            "other-node-pod",
            "ip-10-0-32-40",
            Some("10.0.33.11"),
            None,
        ),
    );
    let moved_to = stand_in.resource_version();
    tokio::time::timeout(CONVERGENCE, async {
        while !stand_in.bookmarks(Kind::Pods).contains(&moved_to) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a bookmark at the latest resourceVersion on the pods watch");

    stand_in.cut_watches();
    stand_in.apply(
        Kind::Pods,
        pod("shop", "late", NODE, Some("10.0.1.13"), None),
    );
    expected
        .pods
        .insert(ip("10.0.1.13"), pod_ref("shop", "late", "Pod", "late"));
    converge(&mut facts, "a pod added after the cut", |facts| {
        *facts == expected
    })
    .await;

    let pods: Vec<_> = stand_in
        .requests()
        .into_iter()
        .filter(|request| request.kind == Kind::Pods)
        .collect();
    assert_eq!(
        pods.iter().filter(|request| !request.watch).count(),
        1,
        "a cut watch resumes, it does not list again: {pods:#?}"
    );
    let resumed = pods.last().expect("pods requests");
    assert!(resumed.watch, "{pods:#?}");
    assert_eq!(resumed.resource_version, moved_to.to_string(), "{pods:#?}");
}

#[tokio::test]
async fn gone_forces_a_relist_that_catches_up() {
    let (stand_in, mut facts, mut expected) = started().await;
    let before = expected.clone();
    // Changes whose events the client never sees, as when it was away past compaction.
    stand_in.silence(true);
    stand_in.delete(Kind::Pods, "shop", "web-5d9f7c8b6-abcde");
    stand_in.apply(
        Kind::Pods,
        pod(
            "shop",
            "web-5d9f7c8b6-zzzzz",
            NODE,
            Some("10.0.1.20"),
            Some(("ReplicaSet", "web-5d9f7c8b6")),
        ),
    );
    stand_in.apply(
        Kind::EndpointSlices,
        slice("default", "kubernetes", "kubernetes", &["10.0.0.202"]),
    );
    stand_in.apply(Kind::Nodes, node("ip-10-0-32-40", "10.0.32.41", ZONE_B));
    stand_in.silence(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        *facts.borrow(),
        before,
        "the watches saw changes that sent no event"
    );

    stand_in.expire();
    expected.pods.remove(&ip("10.0.1.10"));
    expected.pods.insert(
        ip("10.0.1.20"),
        pod_ref("shop", "web-5d9f7c8b6-zzzzz", "Deployment", "web"),
    );
    expected.controlplane_ips = BTreeSet::from([ip("10.0.0.202")]);
    expected.node_zones.remove(&ip("10.0.32.40"));
    expected.node_zones.insert(ip("10.0.32.41"), ZONE_B.into());
    converge(&mut facts, "the re-list after 410 Gone", |facts| {
        *facts == expected
    })
    .await;
    let lists = |kind| {
        let requests = stand_in.requests();
        requests
            .iter()
            .filter(|request| request.kind == kind && !request.watch)
            .count()
    };
    assert_eq!(lists(Kind::Pods), 2);
    assert_eq!(lists(Kind::Nodes), 2);
}

/// While the API server misbehaves, the facts stay at the last good state, with the error.
async fn keep_last_good_state(facts: &mut watch::Receiver<ClusterFacts>, good: &ClusterFacts) {
    let failing = converge(facts, "the error reported", |facts| {
        facts.last_error.is_some()
    })
    .await;
    assert_eq!(
        ClusterFacts {
            last_error: None,
            ..failing.clone()
        },
        *good,
        "the facts moved away from the last good state: {:?}",
        failing.last_error
    );
}

// Once the API server answers again, the error goes without waiting for a change, and
// changes flow again.

#[tokio::test]
async fn garbage_answers_keep_the_last_good_state() {
    let (stand_in, mut facts, mut expected) = started().await;
    stand_in.garbage(true);
    keep_last_good_state(&mut facts, &expected).await;
    stand_in.garbage(false);
    converge(&mut facts, "the error cleared", |facts| *facts == expected).await;
    stand_in.delete(Kind::Pods, "shop", "web-5d9f7c8b6-abcde");
    expected.pods.remove(&ip("10.0.1.10"));
    converge(&mut facts, "a pod deleted after recovery", |facts| {
        *facts == expected
    })
    .await;
}

#[tokio::test]
async fn an_outage_keeps_the_last_good_state() {
    let (mut stand_in, mut facts, mut expected) = started().await;
    stand_in.stop().await;
    keep_last_good_state(&mut facts, &expected).await;
    stand_in.restart().await;
    converge(&mut facts, "the error cleared", |facts| *facts == expected).await;
    stand_in.apply(
        Kind::Pods,
        pod("shop", "after", NODE, Some("10.0.1.14"), None),
    );
    expected
        .pods
        .insert(ip("10.0.1.14"), pod_ref("shop", "after", "Pod", "after"));
    converge(&mut facts, "a pod added after recovery", |facts| {
        *facts == expected
    })
    .await;
}
