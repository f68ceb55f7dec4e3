//! Who may read the agent from a pod of the lab, the agent listening on every node address as
//! the DaemonSet does, with the Kubernetes API stand-in answering TokenReview and
//! SubjectAccessReview: a pod with no token, a bad token, a token without the right and one
//! with it, over HTTP and HTTPS (curl, verifying the agent's certificate from files); the node
//! itself over loopback; and the real Prometheus scraping over TLS with its token. Then
//! `--metrics-auth none` without the Kubernetes context: /metrics open, the API still closed.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracer_lab::{
    agent::{LabAgent, METRICS_PORT},
    build,
    lab::{EndpointMode, Lab},
    prometheus::{Config, Prometheus, ScrapeTarget, SecureScrape},
    testing,
};

use crate::support;

const MODE: EndpointMode = EndpointMode::PublicPrivate;
const NODE: &str = "ip-10-0-1-10.lab-1.compute.internal";
const PROMETHEUS_USER: &str = "system:serviceaccount:monitoring:prometheus";
const PROMETHEUS_TOKEN: &str = "prometheus-token";
const APP_USER: &str = "system:serviceaccount:default:app";
const APP_TOKEN: &str = "app-token";
/// The pod the clients run in.
const POD: &str = "pod-a";
const READY_WITHIN: Duration = Duration::from_secs(30);
/// Prometheus scrapes every 500 ms; a loaded machine.
const SCRAPED_WITHIN: Duration = Duration::from_secs(20);

/// A certificate for the node's IP address and its key, written into the lab's directory.
fn certificate(lab: &Lab) -> (PathBuf, PathBuf) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec![lab.facts().node_ip.to_string()])
            .expect("a certificate");
    let cert_file = lab.state_dir().join("tls.crt");
    let key_file = lab.state_dir().join("tls.key");
    std::fs::write(&cert_file, cert.pem()).expect("write tls.crt");
    std::fs::write(&key_file, signing_key.serialize_pem()).expect("write tls.key");
    (cert_file, key_file)
}

/// The status and body of a GET from the pod, trusting `ca` for HTTPS.
fn get_from_pod(lab: &Lab, url: &str, token: Option<&str>, ca: &Path) -> (u16, String) {
    let mut curl = lab.command_in(POD, "curl");
    curl.args(["--silent", "--show-error", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(["--write-out", "\n%{http_code}", url]);
    if let Some(token) = token {
        curl.args(["--header", &format!("Authorization: Bearer {token}")]);
    }
    let output = curl.output().expect("running curl in the pod");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = status.trim().parse().unwrap_or(0);
    let stderr = String::from_utf8_lossy(&output.stderr);
    (status, format!("{body}{stderr}"))
}

/// Each request from the pod and the status it must get; the failures, described.
fn check(lab: &Lab, ca: &Path, cases: &[(&str, &str, Option<&str>, u16)]) -> Vec<String> {
    let node = lab.facts().node_ip;
    let mut failures = Vec::new();
    for (scheme, path, token, expected) in cases {
        let url = format!("{scheme}://{node}:{METRICS_PORT}{path}");
        let (status, body) = get_from_pod(lab, &url, *token, ca);
        let first_line = body.lines().next().unwrap_or_default();
        eprintln!("auth: {url} token={token:?}: {status} {first_line}");
        if status != *expected {
            failures.push(format!(
                "{url} with token {token:?}: {status} ({first_line}), not {expected}"
            ));
        } else if status == 200 && *path == "/api/v1/flows" && !body.contains("\"flows\"") {
            failures.push(format!("{url}: 200 without the flows: {first_line}"));
        }
    }
    failures
}

/// Waits until Prometheus in the pod has scraped the agent (`up` 1) and holds its series.
fn scraped_by_prometheus(lab: &Lab, ca: &Path) -> Result<(), String> {
    let token_file = lab.state_dir().join("prometheus-token");
    std::fs::write(&token_file, PROMETHEUS_TOKEN).expect("write the token");
    let address = format!("{}:{METRICS_PORT}", lab.facts().node_ip);
    let config = Config {
        interval: Duration::from_millis(500),
        target: ScrapeTarget {
            job: "tracer",
            address: &address,
            labels: &[("cluster", "lab")],
            secure: Some(SecureScrape {
                ca_file: ca,
                token_file: &token_file,
            }),
        },
        rule_files: &[],
    };
    let mut prometheus = Prometheus::start(lab, POD, &config).expect("prometheus");
    prometheus
        .wait_ready(Duration::from_secs(30))
        .expect("prometheus ready");
    let deadline = Instant::now() + SCRAPED_WITHIN;
    let mut last = String::new();
    while Instant::now() < deadline {
        let up = prometheus.query("up{job=\"tracer\"}");
        let ready = prometheus.query("tracer_ready{job=\"tracer\"}");
        match (up, ready) {
            (Ok(up), Ok(ready))
                if up.first().map(|s| s.values[0]) == Some(1.0) && !ready.is_empty() =>
            {
                eprintln!("auth: prometheus scraped the agent over HTTPS with its token");
                return Ok(());
            }
            (up, ready) => last = format!("up {up:?}, tracer_ready {ready:?}"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(format!(
        "prometheus did not scrape the agent within {SCRAPED_WITHIN:?}: {last}\n{}",
        prometheus.log_tail()
    ))
}

#[test]
fn only_the_node_and_holders_of_a_token_with_the_right_read_the_agent() {
    let lab = testing::lab(MODE, env!("CARGO_BIN_EXE_tracer-lab"));
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let stand_in = support::stand_in_in(&lab, &runtime);
    stand_in.add_token(PROMETHEUS_TOKEN, PROMETHEUS_USER);
    stand_in.grant(PROMETHEUS_USER, "/metrics");
    stand_in.grant(PROMETHEUS_USER, "/api/v1/*");
    stand_in.add_token(APP_TOKEN, APP_USER);
    let (cert, key) = certificate(&lab);
    let path = |file: &Path| file.display().to_string();
    let flags = vec![
        "--kubeconfig".into(),
        support::kubeconfig(&lab, &stand_in),
        "--node-name".into(),
        NODE.into(),
        "--tls-cert-file".into(),
        path(&cert),
        "--tls-key-file".into(),
        path(&key),
    ];
    let mut agent =
        LabAgent::start_on_every_address(&lab, &build::tracer_path(), flags).expect("agent start");
    agent.wait_ready(READY_WITHIN).expect("agent ready");

    let mut failures = check(
        &lab,
        &cert,
        &[
            // The kubelet's probes: open, over plain HTTP.
            ("http", "/healthz", None, 200),
            ("http", "/readyz", None, 200),
            // Plain HTTP from a pod reads nothing else, even with a good token (it would
            // cross the network in clear).
            ("http", "/api/v1/flows", None, 403),
            ("http", "/metrics", Some(PROMETHEUS_TOKEN), 403),
            // HTTPS: no token, a token the API server does not know, one without the right.
            ("https", "/api/v1/flows", None, 401),
            ("https", "/metrics", Some("invented"), 401),
            ("https", "/api/v1/flows", Some(APP_TOKEN), 403),
            ("https", "/metrics", Some(APP_TOKEN), 403),
            // The right token.
            ("https", "/api/v1/flows", Some(PROMETHEUS_TOKEN), 200),
            ("https", "/metrics", Some(PROMETHEUS_TOKEN), 200),
            ("https", "/healthz", None, 200),
        ],
    );
    // The node itself, on loopback, without credentials (tracer top, a port-forward).
    match agent.get("/api/v1/flows") {
        Ok((200, body)) if body.contains("\"flows\"") => {}
        other => failures.push(format!("loopback /api/v1/flows: {other:?}")),
    }
    failures.extend(scraped_by_prometheus(&lab, &cert).err());
    eprintln!(
        "auth: {} reviews asked of the API server",
        stand_in.reviews()
    );
    agent.stop().expect("agent stop");

    // /metrics open by choice, and no API server to check tokens: the API stays closed.
    let flags = vec![
        "--metrics-auth".into(),
        "none".into(),
        "--tls-cert-file".into(),
        path(&cert),
        "--tls-key-file".into(),
        path(&key),
    ];
    let mut agent =
        LabAgent::start_on_every_address(&lab, &build::tracer_path(), flags).expect("agent start");
    agent.wait_ready(READY_WITHIN).expect("agent ready");
    failures.extend(check(
        &lab,
        &cert,
        &[
            ("http", "/metrics", None, 200),
            ("http", "/api/v1/flows", None, 403),
            ("https", "/metrics", None, 200),
            ("https", "/api/v1/flows", Some(PROMETHEUS_TOKEN), 403),
        ],
    ));
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        agent.log_tail()
    );
}
