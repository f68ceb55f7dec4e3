//! The node's context failing and coming back, with the real agent in the lab node (issue 7,
//! item 5). IMDS down, answering garbage or too slow, and the cluster endpoint not resolving:
//! the agent keeps counting, says why it is not ready (each cause in `/readyz`, logged once
//! however often it retries), and is ready again within seconds of their return. The Kubernetes context end to end: an API server stand-in served in the node
//! namespace, watched through `--kubeconfig`, down at the start and down again later.
use std::time::{Duration, Instant};

use kube_standin::{
    Kind, StandIn,
    objects::{node, pod, service, slice},
};
use tracer_agent::serve::api::FlowsResponse;
use tracer_common::labels::{Endpoint, Path};
use tracer_lab::{
    agent::{self, LabAgent},
    build,
    lab::{
        CLUSTER_ENDPOINT, ContextHealth, EndpointMode, ImdsHealth, Lab, LabFacts, ResolverHealth,
        Sent,
    },
    scrape::{self, Sample},
    testing,
};

use crate::support;

/// How soon the agent must be ready once its context answers again: it asks IMDS every 5 s
/// (an attempt against a slow IMDS takes 2 s, the token and one GET timing out after 1 s
/// each) and resolves the cluster endpoint every second in the lab.
const RECOVERY: Duration = Duration::from_secs(12);
/// How soon the Kubernetes watches must follow the API server: their backoff starts at 0.8 s
/// and doubles.
const KUBERNETES_RECOVERY: Duration = Duration::from_secs(20);
/// Long enough for the agent to ask IMDS again at least once (every 5 s; an attempt against a
/// slow IMDS takes 2 s): a warning repeated on every retry would show.
const ANOTHER_RETRY: Duration = Duration::from_secs(8);
/// Growth of forward bytes allowed on series a scenario does not use.
const NOISE_BYTES: f64 = 5_000.0;

const MODE: EndpointMode = EndpointMode::Public;
const NODE: &str = "ip-10-0-1-10.lab-1.compute.internal";
const NODE2: &str = "ip-10-0-2-10.lab-1.compute.internal";

/// Polls `check` every 100 ms until it gives a value; fails the test after `timeout`, with the
/// agent's log.
fn wait_for<T>(
    agent: &LabAgent,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}",
            agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The readiness reasons exported as 1, sorted.
fn reasons(samples: &[Sample]) -> Vec<String> {
    let mut reasons: Vec<String> = samples
        .iter()
        .filter(|s| s.name == "tracer_readiness_problems" && s.value == 1.0)
        .filter_map(|s| s.labels.get("reason").cloned())
        .collect();
    reasons.sort();
    reasons
}

/// `/readyz` and `tracer_ready` agree with `reasons`, which are exactly the expected ones.
fn assert_readiness(agent: &LabAgent, expected: &[&str]) {
    let (status, body) = agent.get("/readyz").expect("/readyz");
    let samples = agent.scrape().expect("scrape");
    let ready = scrape::sum(&samples, "tracer_ready", &[]);
    assert_eq!(
        (status, ready, reasons(&samples)),
        (
            if expected.is_empty() { 200 } else { 503 },
            if expected.is_empty() { 1.0 } else { 0.0 },
            expected.iter().map(|r| r.to_string()).collect::<Vec<_>>()
        ),
        "/readyz says: {body}"
    );
}

/// Runs the lab scenario `name` and returns what it sent and how the forward bytes of each of
/// `series` (label filters of `tracer_path_bytes_total`) grew.
fn measure(
    lab: &Lab,
    agent: &LabAgent,
    name: &str,
    series: &[&[(&str, &str)]],
) -> (Sent, Vec<f64>) {
    let forward = || {
        let samples = agent.scrape().expect("scrape");
        series
            .iter()
            .map(|labels| {
                let mut labels = labels.to_vec();
                labels.push(("direction", "forward"));
                scrape::sum(&samples, "tracer_path_bytes_total", &labels)
            })
            .collect::<Vec<_>>()
    };
    let before = forward();
    let scenarios = testing::scenarios(MODE, &[name]);
    let sent = lab.run_traffic(&scenarios).expect("traffic").remove(0);
    assert_eq!(sent.connected, sent.connections, "{name}: {sent:?}");
    // Enough polls (200 ms each) to see the connections and resolve their NAT.
    std::thread::sleep(Duration::from_millis(900));
    let grown = forward()
        .iter()
        .zip(before)
        .map(|(after, before)| after - before)
        .collect();
    (sent, grown)
}

/// Asserts that `counted` bytes account for what `sent` wrote, headers included.
fn assert_counted(agent: &LabAgent, what: &str, sent: &Sent, counted: f64) {
    assert!(
        scrape::counts_payload(counted, sent.payload_bytes),
        "{what}: {counted} B counted for {} B sent\n{}",
        sent.payload_bytes,
        agent.log_tail()
    );
}

/// How often the agent has logged `text` so far.
fn logged(agent: &LabAgent, text: &str) -> usize {
    agent.log().matches(text).count()
}

/// The lines of the agent's log that speak of IMDS and `cause`, whatever their wording and case.
fn imds_lines(agent: &LabAgent, cause: &str) -> Vec<String> {
    let cause = cause.to_lowercase();
    agent
        .log()
        .lines()
        .filter(|line| {
            let line = line.to_lowercase();
            line.contains("imds") && line.contains(&cause)
        })
        .map(str::to_owned)
        .collect()
}

/// Waits for `/readyz` to show the `vpc_cidr` problem with `cause`, then for the agent to ask
/// IMDS again; asserts that the cause was logged once, not on every retry, and that the problem
/// was never logged as resolved on the way. Returns the `/readyz` body.
fn imds_cause_shown_and_logged_once(agent: &LabAgent, cause: &str) -> String {
    let body = wait_for(
        agent,
        &format!("/readyz naming the IMDS failure {cause:?}"),
        Duration::from_secs(10),
        || {
            let (status, body) = agent.get("/readyz").ok()?;
            let line = body
                .lines()
                .find(|line| line.contains("vpc_cidr: IMDS at"))?;
            (status == 503 && line.contains(cause)).then(|| body.clone())
        },
    );
    std::thread::sleep(ANOTHER_RETRY);
    let lines = imds_lines(agent, cause);
    assert_eq!(
        lines.len(),
        1,
        "IMDS {cause:?} logged {} times over {ANOTHER_RETRY:?}, not once:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert_eq!(
        logged(agent, "resolved: vpc_cidr"),
        0,
        "a new cause is not a resolution\n{}",
        agent.log_tail()
    );
    body
}

#[test]
fn context_failures_are_reported_counting_goes_on_and_readiness_returns_with_the_services() {
    let lab = testing::lab(MODE, env!("CARGO_BIN_EXE_tracer-lab"));
    let down = ContextHealth {
        imds: ImdsHealth::Down,
        resolver: ResolverHealth::Down,
    };
    lab.set_context_health(down).expect("context down");
    let agent = LabAgent::start(&lab, &build::tracer_path()).expect("agent start");

    // Not ready, and saying why: both gaps named in /readyz with their causes (the IMDS
    // connection refused by the VPC router, the resolver's error) and exported as reasons.
    let unresolved = format!("apiserver_endpoint: {CLUSTER_ENDPOINT} does not resolve: ");
    wait_for(
        &agent,
        "/readyz naming the resolver's error",
        Duration::from_secs(5),
        || {
            let (status, body) = agent.get("/readyz").ok()?;
            (status == 503 && body.contains(&unresolved)).then_some(())
        },
    );

    // Counting goes on: local traffic exactly; remote traffic as unknown, never guessed.
    let local = [("path", Path::PodToPodLocal.as_str())];
    let (sent, grown) = measure(&lab, &agent, Path::PodToPodLocal.as_str(), &[&local]);
    assert_counted(&agent, "pod_to_pod_local without context", &sent, grown[0]);
    let (remote, unknown) = (
        [("path", Path::PodToPodRemote.as_str())],
        [("path", Path::Unknown.as_str())],
    );
    let (sent, grown) = measure(
        &lab,
        &agent,
        Path::PodToPodRemote.as_str(),
        &[&remote, &unknown],
    );
    assert_eq!(
        grown[0], 0.0,
        "remote traffic classified without a VPC CIDR"
    );
    assert_counted(&agent, "unknown without a VPC CIDR", &sent, grown[1]);

    // IMDS down, answering garbage, then too slowly: each cause in /readyz as the agent sees
    // it, logged once however often the agent asks again; the agent stays not ready.
    let body = imds_cause_shown_and_logged_once(&agent, "connection refused");
    assert!(body.contains(&unresolved), "{body}");
    assert_readiness(&agent, &["apiserver_endpoint", "vpc_cidr"]);
    for (imds, cause) in [
        (ImdsHealth::Garbage, "malformed answer to /latest/api/token"),
        (ImdsHealth::Slow, "timed out after 1 s"),
    ] {
        lab.set_context_health(ContextHealth { imds, ..down })
            .expect("context health");
        imds_cause_shown_and_logged_once(&agent, cause);
        assert_readiness(&agent, &["apiserver_endpoint", "vpc_cidr"]);
    }

    // Both come back: ready within RECOVERY, and remote traffic and node traffic to the public
    // endpoint are classified into their real paths.
    lab.set_context_health(ContextHealth::default())
        .expect("context healthy");
    let healed = Instant::now();
    wait_for(
        &agent,
        "ready after the context came back",
        RECOVERY,
        || matches!(agent.get("/readyz"), Ok((200, _))).then_some(()),
    );
    eprintln!(
        "ready {:.1?} after IMDS and the resolver came back",
        healed.elapsed()
    );
    assert_readiness(&agent, &[]);
    assert_eq!(
        logged(&agent, "resolved: vpc_cidr"),
        1,
        "{}",
        agent.log_tail()
    );
    let (sent, grown) = measure(
        &lab,
        &agent,
        Path::PodToPodRemote.as_str(),
        &[&remote, &unknown],
    );
    assert_counted(&agent, "pod_to_pod_remote after recovery", &sent, grown[0]);
    assert!(grown[1] < NOISE_BYTES, "unknown grew by {} B", grown[1]);
    let public = [
        ("path", Path::NodeToApiserver.as_str()),
        ("endpoint", Endpoint::Public.as_str()),
    ];
    let (sent, grown) = measure(&lab, &agent, Path::NodeToApiserver.as_str(), &[&public]);
    assert_counted(&agent, "node_to_apiserver after recovery", &sent, grown[0]);

    // The resolver fails again, after an answer: as with a Kubernetes API outage, the last
    // answer stays in use and the agent ready; the failure is logged once, not per retry.
    lab.set_context_health(ContextHealth {
        resolver: ResolverHealth::Down,
        ..ContextHealth::default()
    })
    .expect("resolver down");
    let kept = "the last answer stays in use";
    wait_for(
        &agent,
        "the resolver's failure logged",
        Duration::from_secs(5),
        || (logged(&agent, kept) > 0).then_some(()),
    );
    // Several more attempts (every RESOLVE_INTERVAL, 1 s).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(logged(&agent, kept), 1, "{}", agent.log_tail());
    assert!(
        matches!(agent.get("/readyz"), Ok((200, _))),
        "a resolver outage after an answer made the agent unready:\n{}",
        agent.log_tail()
    );
    assert_readiness(&agent, &[]);
    let (_, paths) = agent.get("/api/v1/paths").expect("/api/v1/paths");
    let paths: serde_json::Value = serde_json::from_str(&paths).expect("JSON");
    assert_eq!(
        paths["apiserver_endpoints"],
        serde_json::json!([Endpoint::Public.as_str()]),
        "the last answer's API server addresses are still known"
    );
    drop(agent);
    lab.down().expect("lab down");
}

/// The lab cluster as its API server would list it: both nodes with their zones, the pods
/// with their lab addresses and owners, the EKS-owned ENIs behind `default/kubernetes`, and
/// kube-dns.
fn seed(stand_in: &StandIn, facts: &LabFacts) {
    stand_in.apply(
        Kind::Nodes,
        node(NODE, &facts.node_ip.to_string(), &facts.availability_zone),
    );
    stand_in.apply(
        Kind::Nodes,
        node(NODE2, &facts.node2_ip.to_string(), "lab-1b"),
    );
    let pods = [
        ("default", "pod-a", NODE, ("ReplicaSet", "web-5d9f7c8b6")),
        (
            "default",
            "pod-b",
            NODE,
            ("ReplicaSet", "backend-7c4b9d5f8"),
        ),
        ("default", "pod-c", NODE, ("StatefulSet", "cache")),
        (
            "kube-system",
            "coredns",
            NODE,
            ("ReplicaSet", "coredns-6f8b9c"),
        ),
        ("default", "pod-r", NODE2, ("ReplicaSet", "web-5d9f7c8b6")),
    ];
    for (namespace, name, on, owner) in pods {
        let address = facts.pod_ips[name].to_string();
        stand_in.apply(
            Kind::Pods,
            pod(namespace, name, on, Some(&address), Some(owner)),
        );
    }
    let cluster_dns = facts.cluster_dns.to_string();
    stand_in.apply(
        Kind::Services,
        service("kube-system", "kube-dns", &cluster_dns),
    );
    let enis: Vec<String> = facts
        .controlplane_ips
        .iter()
        .map(ToString::to_string)
        .collect();
    let enis: Vec<&str> = enis.iter().map(String::as_str).collect();
    stand_in.apply(
        Kind::EndpointSlices,
        slice("default", "kubernetes", "kubernetes", &enis),
    );
    let coredns = facts.pod_ips["coredns"].to_string();
    stand_in.apply(
        Kind::EndpointSlices,
        slice("kube-system", "kube-dns-x1", "kube-dns", &[&coredns]),
    );
}

/// The pod the flow from pod-a to pod-b names as its responder.
fn pod_b_named(agent: &LabAgent, facts: &LabFacts) -> Option<String> {
    let (status, body) = agent.get("/api/v1/flows?limit=1000").ok()?;
    assert_eq!(status, 200, "{body}");
    let flows: FlowsResponse = serde_json::from_str(&body).expect("flows JSON");
    let pod_b = format!("{}:", facts.pod_ips["pod-b"]);
    let flow = flows
        .flows
        .into_iter()
        .find(|flow| flow.responder.starts_with(&pod_b))?;
    assert_eq!(flow.initiator_pod.as_deref(), Some("default/pod-a"));
    flow.responder_pod
}

#[test]
fn the_kubernetes_context_names_pods_zones_and_the_control_plane_and_outlives_an_outage() {
    let lab = testing::lab(MODE, env!("CARGO_BIN_EXE_tracer-lab"));
    let facts = lab.facts().clone();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut stand_in = support::stand_in_in(&lab, &runtime);
    seed(&stand_in, &facts);
    // Neither --controlplane-ip nor --cluster-dns: the Kubernetes context brings them.
    let mut flags = agent::quick_flags();
    flags.extend([
        "--service-cidr".into(),
        facts.service_cidr.to_string(),
        "--cluster-endpoint".into(),
        facts.cluster_endpoint.clone(),
        "--kubeconfig".into(),
        support::kubeconfig(&lab, &stand_in),
        "--node-name".into(),
        NODE.into(),
        "--workload-metrics".into(),
        "10".into(),
    ]);

    // The API server is down when the agent starts: not ready, for that reason alone.
    runtime.block_on(stand_in.stop());
    let mut agent = LabAgent::start_with(&lab, &build::tracer_path(), flags).expect("agent");
    wait_for(
        &agent,
        "the kubernetes reason alone",
        Duration::from_secs(10),
        || (reasons(&agent.scrape().ok()?) == ["kubernetes"]).then_some(()),
    );
    assert_readiness(&agent, &["kubernetes"]);
    runtime.block_on(stand_in.restart());
    let back = Instant::now();
    agent
        .wait_ready(KUBERNETES_RECOVERY)
        .expect("ready once the API server answers");
    eprintln!(
        "ready {:.1?} after the API server came back",
        back.elapsed()
    );

    // Pods named, the zone of a cross-node path, the control plane recognised.
    let local = [("path", Path::PodToPodLocal.as_str())];
    let (local_sent, grown) = measure(&lab, &agent, Path::PodToPodLocal.as_str(), &[&local]);
    assert_counted(&agent, Path::PodToPodLocal.as_str(), &local_sent, grown[0]);
    assert_eq!(
        pod_b_named(&agent, &facts).as_deref(),
        Some("default/pod-b")
    );
    let remote = [
        ("path", Path::PodToPodRemote.as_str()),
        ("zone", "cross_zone"),
    ];
    let (sent, grown) = measure(&lab, &agent, Path::PodToPodRemote.as_str(), &[&remote]);
    assert_counted(&agent, "pod_to_pod_remote, cross_zone", &sent, grown[0]);
    let kubelet = [("path", Path::ControlplaneToKubelet.as_str())];
    let (sent, grown) = measure(
        &lab,
        &agent,
        Path::ControlplaneToKubelet.as_str(),
        &[&kubelet],
    );
    assert_counted(
        &agent,
        Path::ControlplaneToKubelet.as_str(),
        &sent,
        grown[0],
    );
    let web = scrape::sum(
        &agent.scrape().expect("scrape"),
        "tracer_workload_bytes_total",
        &[
            ("namespace", "default"),
            ("workload", "web"),
            ("path", Path::PodToPodLocal.as_str()),
        ],
    );
    assert!(
        web >= local_sent.payload_bytes as f64,
        "tracer_workload_bytes_total of default/web (pod-a) on pod_to_pod_local: {web} B for {} B sent",
        local_sent.payload_bytes
    );

    // A later outage: the agent keeps counting with the last facts and stays ready.
    let warned = logged(&agent, "Kubernetes API:");
    runtime.block_on(stand_in.stop());
    wait_for(
        &agent,
        "the agent noticing the outage",
        KUBERNETES_RECOVERY,
        || (logged(&agent, "Kubernetes API:") > warned).then_some(()),
    );
    assert_readiness(&agent, &[]);
    // pod-b is replaced while the agent cannot see it (same address, new name).
    stand_in.delete(Kind::Pods, "default", "pod-b");
    let pod_b = facts.pod_ips["pod-b"].to_string();
    let replacement = ("ReplicaSet", "backend-7c4b9d5f8");
    stand_in.apply(
        Kind::Pods,
        pod("default", "pod-b-2", NODE, Some(&pod_b), Some(replacement)),
    );
    let (sent, grown) = measure(
        &lab,
        &agent,
        Path::ControlplaneToKubelet.as_str(),
        &[&kubelet],
    );
    assert_counted(
        &agent,
        "controlplane_to_kubelet in the outage",
        &sent,
        grown[0],
    );
    let (sent, grown) = measure(&lab, &agent, Path::PodToPodLocal.as_str(), &[&local]);
    assert_counted(&agent, "pod_to_pod_local in the outage", &sent, grown[0]);
    assert_eq!(
        pod_b_named(&agent, &facts).as_deref(),
        Some("default/pod-b"),
        "the last facts stay in use"
    );

    // Back: the watches resume and catch up.
    runtime.block_on(stand_in.restart());
    let back = Instant::now();
    wait_for(
        &agent,
        "the replaced pod named",
        KUBERNETES_RECOVERY,
        || (pod_b_named(&agent, &facts).as_deref() == Some("default/pod-b-2")).then_some(()),
    );
    eprintln!(
        "facts caught up {:.1?} after the API server came back",
        back.elapsed()
    );
    assert_readiness(&agent, &[]);
    drop(agent);
    drop(stand_in);
    drop(runtime);
    lab.down().expect("lab down");
}
