//! `tracer explain` in the lab's node namespace, against the context the node really has: pods
//! from its routes, the VPC CIDR from the lab's IMDS, the API server from the lab's resolver —
//! which answers differently in each endpoint mode.
use std::process::Output;

use serde_json::Value;
use tracer_lab::{
    agent::context_flags,
    build,
    lab::{EndpointMode, Lab},
    testing,
};

fn explain(lab: &Lab, argv: &[String]) -> Output {
    let tracer = build::tracer_path();
    assert!(
        tracer.exists(),
        "{} not built (cargo build -p tracer-agent)",
        tracer.display()
    );
    lab.command_in("node", &tracer.to_string_lossy())
        .arg("explain")
        .args(argv)
        .output()
        .expect("tracer explain runs")
}

/// `tracer explain SRC DST --json` with the lab's context flags: (path, endpoint, nat).
fn classify(lab: &Lab, source: String, destination: String, proto: &str) -> (String, Value) {
    let mut argv = vec![
        source.clone(),
        destination.clone(),
        "--proto".into(),
        proto.into(),
    ];
    argv.push("--json".into());
    argv.extend(context_flags(lab));
    let output = explain(lab, &argv);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{source} → {destination}: {stderr}"
    );
    let json: Value = serde_json::from_slice(&output.stdout).expect("explain --json prints JSON");
    let label = |name: &str| json[name].as_str().unwrap_or("-").to_owned();
    (
        format!("{} {} {}", label("path"), label("endpoint"), label("nat")),
        json,
    )
}

#[test]
fn explain_uses_the_live_context_of_the_node() {
    testing::require_root();
    let lab = testing::lab(
        EndpointMode::PublicPrivate,
        env!("CARGO_BIN_EXE_tracer-lab"),
    );
    let facts = lab.facts().clone();
    let pod = |name: &str| facts.pod_ips[name].to_string();
    let (pod_a, pod_b, pod_r) = (pod("pod-a"), pod("pod-b"), pod("pod-r"));
    let node = facts.node_ip.to_string();
    let (eni_a, eni_b) = (facts.controlplane_ips[0], facts.controlplane_ips[1]);
    let nlb = facts.nlb_ips[0];
    let cases = [
        (
            pod_a.clone(),
            format!("{pod_b}:8080"),
            "tcp",
            "pod_to_pod_local - none",
        ),
        (
            pod_a.clone(),
            format!("{pod_r}:8080"),
            "tcp",
            "pod_to_pod_remote - none",
        ),
        (
            pod_a.clone(),
            format!("{eni_a}:443"),
            "tcp",
            "pod_to_apiserver private none",
        ),
        (
            eni_b.to_string(),
            format!("{node}:10250"),
            "tcp",
            "controlplane_to_kubelet - none",
        ),
        (
            pod_a.clone(),
            format!("{}:53", facts.cluster_dns),
            "udp",
            "pod_to_dns - none",
        ),
        (
            pod_a.clone(),
            format!("{}:80", facts.backend_service_ip),
            "tcp",
            "pod_to_service - none",
        ),
        (
            pod_a.clone(),
            format!("{}:80", facts.external_host),
            "tcp",
            "pod_to_external - none",
        ),
        (
            node.clone(),
            format!("{}:80", facts.imds),
            "tcp",
            "node_to_imds - none",
        ),
        (
            facts.external_host.to_string(),
            format!("{pod_a}:8080"),
            "tcp",
            "external_to_pod - none",
        ),
        // In public-private mode the node's resolver answers with the private ENIs: the NLB is
        // just an address on the internet.
        (
            node.clone(),
            format!("{nlb}:443"),
            "tcp",
            "node_to_external - none",
        ),
        (
            node.clone(),
            format!("{eni_a}:443"),
            "tcp",
            "node_to_apiserver private none",
        ),
        // The node and its own pods, both ways (kubelet probes, host-network daemons).
        (
            node.clone(),
            format!("{pod_b}:8080"),
            "tcp",
            "node_to_pod - none",
        ),
        (
            pod_a.clone(),
            format!("{node}:10256"),
            "tcp",
            "pod_to_node - none",
        ),
        // DNS from the node, and at the Amazon-provided resolver (VPC base + 2).
        (
            node.clone(),
            format!("{}:53", facts.cluster_dns),
            "udp",
            "node_to_dns - none",
        ),
        (
            pod_a.clone(),
            format!("{}:53", facts.resolver),
            "udp",
            "pod_to_vpc_dns - none",
        ),
        (
            node.clone(),
            format!("{}:53", facts.resolver),
            "udp",
            "node_to_vpc_dns - none",
        ),
    ];
    for (source, destination, proto, expected) in &cases {
        let (got, json) = classify(&lab, source.clone(), destination.clone(), proto);
        assert_eq!(&got, expected, "{source} → {destination}: {json:#}");
    }
    // The fact that decided the resolver's class is said.
    let (_, json) = classify(&lab, pod_a.clone(), format!("{}:53", facts.resolver), "udp");
    assert!(
        json["rule"]
            .to_string()
            .contains("Amazon-provided VPC resolver"),
        "{json:#}"
    );
    assert!(
        json["facts"]
            .to_string()
            .contains("is the Amazon-provided VPC resolver"),
        "{json:#}"
    );

    // The same question in public mode: the cluster endpoint now resolves to the NLB.
    lab.set_mode(EndpointMode::Public)
        .expect("switch to public");
    let (got, json) = classify(&lab, node, format!("{nlb}:443"), "tcp");
    assert_eq!(got, "node_to_apiserver public none", "{json:#}");
    let facts_text = json["facts"].to_string();
    assert!(facts_text.contains("is an API server address"), "{json:#}");
    assert!(facts_text.contains("is outside every VPC CIDR"), "{json:#}");
    let context_text = json["context"].to_string();
    assert!(
        context_text.contains("(IMDS at"),
        "VPC CIDR from IMDS: {json:#}"
    );
    assert!(context_text.contains(&facts.cluster_endpoint), "{json:#}");

    // The text form says the same, with the reasons.
    let mut argv = vec![pod_a.clone(), format!("{pod_r}:8080")];
    argv.extend(context_flags(&lab));
    let output = explain(&lab, &argv);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("path      pod_to_pod_remote"), "{text}");
    assert!(
        text.contains(&format!("{pod_a} is a pod of this node")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{pod_r} is inside VPC CIDR {}", facts.vpc_cidr)),
        "{text}"
    );

    // Contradictory flags are a configuration error naming them.
    let argv = vec![
        pod_a,
        pod_r,
        "--vpc-cidr".into(),
        facts.vpc_cidr.to_string(),
        "--service-cidr".into(),
        facts.vpc_cidr.to_string(),
    ];
    let output = explain(&lab, &argv);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--service-cidr") && stderr.contains("overlaps"),
        "{stderr}"
    );
    lab.down().expect("lab down");
}
