//! The agent's HTTP answers in the lab, read from outside as a client would: the JSON API
//! against the same agent's /metrics, the largest flows with the lab's known 5-tuples, bad
//! parameters answered 400, and a real scrape that `promtool check metrics` finds nothing to
//! say about.
use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tracer_common::labels::{Endpoint, Nat, Path};
use tracer_lab::{
    agent::LabAgent,
    lab::{self, EndpointMode, Lab},
    scrape::{self, Sample},
    testing,
};

fn start(mode: EndpointMode) -> (Lab, LabAgent) {
    testing::lab_with_agent(mode, env!("CARGO_BIN_EXE_tracer-lab"))
}

fn get_json(agent: &LabAgent, path: &str) -> (u16, Value) {
    let (status, body) = agent.get(path).expect("the agent answers");
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|error| panic!("{path} answered {status} with no JSON ({error}): {body}"));
    (status, json)
}

fn paths(agent: &LabAgent) -> Value {
    let (status, json) = get_json(agent, "/api/v1/paths");
    assert_eq!(status, 200, "{json}");
    json
}

fn text<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {value}"))
}

fn number(value: &Value, field: &str) -> f64 {
    value[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {value}"))
}

/// A row's value of `field`, found by its labels; 0 when the row is not there yet.
fn row_value(paths: &Value, row: &Value, field: &str) -> f64 {
    paths["paths"]
        .as_array()
        .expect("paths is a list")
        .iter()
        .find(|other| {
            ["path", "endpoint", "nat"]
                .iter()
                .all(|label| other[label] == row[label])
        })
        .map_or(0.0, |found| number(found, field))
}

/// The metric series a path row's field is exported as: (name, labels).
fn series_of(row: &Value, field: &str) -> (&'static str, Vec<(&'static str, String)>) {
    let label = |name: &'static str| {
        (
            name,
            row[name].as_str().unwrap_or_default().to_owned(), // null endpoint → ""
        )
    };
    let (path, endpoint, nat) = (label("path"), label("endpoint"), label("nat"));
    let directed = |name, direction: &str| {
        (
            name,
            vec![
                path.clone(),
                endpoint.clone(),
                nat.clone(),
                ("direction", direction.to_owned()),
            ],
        )
    };
    match field {
        "forward_packets" => directed("tracer_path_packets_total", "forward"),
        "reply_packets" => directed("tracer_path_packets_total", "reply"),
        "forward_bytes" => directed("tracer_path_bytes_total", "forward"),
        "reply_bytes" => directed("tracer_path_bytes_total", "reply"),
        "flows" => ("tracer_path_flows_total", vec![path, endpoint, nat]),
        other => panic!("no series for {other}"),
    }
}

fn metric(samples: &[Sample], name: &str, labels: &[(&str, String)]) -> f64 {
    let matching: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    scrape::sum(samples, name, &matching)
}

fn ip_of(end: &str) -> Ipv4Addr {
    end.parse::<SocketAddr>()
        .map(|addr| match addr.ip() {
            std::net::IpAddr::V4(v4) => v4,
            other => panic!("the lab is IPv4, got {other}"),
        })
        .unwrap_or_else(|error| panic!("{end:?} is not an address: {error}"))
}

#[test]
fn the_json_api_agrees_with_metrics_and_lists_the_largest_flows() {
    let mode = EndpointMode::PublicPrivate;
    let (lab, agent) = start(mode);
    let facts = lab.facts();
    // The two largest scenarios: 2 × 320 kB inbound to the node, 3 × 240 kB to a ClusterIP.
    let sent = lab
        .run_traffic(&testing::scenarios(
            mode,
            &[Path::ExternalToNode.as_str(), Path::PodToService.as_str()],
        ))
        .expect("traffic");
    assert!(sent.iter().all(|s| s.as_expected()), "{sent:#?}");
    // Traffic has stopped: a few polls (200 ms) see the last packets and resolve the NAT.
    std::thread::sleep(Duration::from_millis(1_000));

    // Every counter of every row matches its series in /metrics. The agent's own DNS queries
    // keep a little traffic going, so /metrics is read between two readings of the API: each
    // value lies between them, and equals them when they agree.
    let before = paths(&agent);
    let samples = agent.scrape().expect("scrape");
    let after = paths(&agent);
    let rows = after["paths"].as_array().expect("paths is a list");
    assert!(!rows.is_empty(), "{after}");
    let mut checked = 0;
    for row in rows {
        for field in [
            "forward_packets",
            "reply_packets",
            "forward_bytes",
            "reply_bytes",
            "flows",
        ] {
            let (low, high) = (row_value(&before, row, field), number(row, field));
            let (name, labels) = series_of(row, field);
            let exported = metric(&samples, name, &labels);
            assert!(
                low <= exported && exported <= high,
                "{name}{labels:?} = {exported}, the API said {low} then {high}\n{}",
                agent.log_tail()
            );
            checked += 1;
        }
    }
    // Every path series in /metrics is a row of the API.
    let series = samples
        .iter()
        .filter(|s| s.name == "tracer_path_bytes_total")
        .count();
    assert_eq!(series, 2 * rows.len(), "one series per row and direction");
    eprintln!(
        "{checked} counters of {} rows agree with /metrics",
        rows.len()
    );

    let row = |path: &str| {
        rows.iter()
            .find(|row| row["path"] == path)
            .unwrap_or_else(|| panic!("no {path} row in {after}"))
    };
    for sent in &sent {
        let counted = row(sent.expected_path.as_str());
        assert_eq!(text(counted, "nat"), sent.expected_nat.as_str());
        assert!(number(counted, "forward_bytes") >= sent.payload_bytes as f64);
        assert_eq!(number(counted, "flows"), f64::from(sent.connections));
        let handshakes = &counted["handshakes"];
        assert_eq!(number(handshakes, "count"), f64::from(sent.connected));
        let buckets = handshakes["buckets"].as_array().expect("buckets");
        assert_eq!(buckets.len(), 21, "{handshakes}");
        let last = buckets
            .last()
            .and_then(|b| b[1].as_f64())
            .expect("[bound, count]");
        assert!(last <= number(handshakes, "count"), "{handshakes}");
    }
    assert_eq!(after["ready"], true, "{after}");
    assert_eq!(after["problems"], serde_json::json!([]));
    assert_eq!(after["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(after["poll_interval_ms"], 200);
    assert_eq!(after["node"], Value::Null);
    // Inside the VPC, public-private mode resolves the cluster endpoint to the private ENIs.
    assert_eq!(
        after["apiserver_endpoints"],
        serde_json::json!([Endpoint::Private.as_str()])
    );
    let attached = &after["attached_interfaces"];
    assert!(
        number(attached, "pod") >= 4.0 && number(attached, "node") >= 2.0,
        "{attached}"
    );
    assert_eq!(after["flow_table"]["capacity"], 65536);
    assert!(number(&after["flow_table"], "entries") >= 5.0);
    assert!(number(&after, "time_unix_ms") >= number(&before, "time_unix_ms"));

    // The five largest connections: the two inbound ones, then the three to the ClusterIP.
    let (status, top) = get_json(&agent, "/api/v1/flows?limit=5");
    assert_eq!(status, 200, "{top}");
    let flows = top["flows"].as_array().expect("flows is a list");
    assert_eq!(flows.len(), 5, "{top}");
    let total = |flow: &Value| number(flow, "forward_bytes") + number(flow, "reply_bytes");
    assert!(
        flows
            .windows(2)
            .all(|pair| total(&pair[0]) >= total(&pair[1])),
        "not largest first: {top}"
    );
    for flow in &flows[..2] {
        assert_eq!(text(flow, "path"), Path::ExternalToNode.as_str(), "{flow}");
        assert_eq!(text(flow, "responder"), format!("{}:8081", facts.node_ip));
        assert!(
            !facts.vpc_cidr.contains(ip_of(text(flow, "initiator"))),
            "{flow}"
        );
        assert_eq!(flow["requested"], Value::Null);
    }
    for flow in &flows[2..] {
        assert_eq!(text(flow, "path"), Path::PodToService.as_str(), "{flow}");
        assert_eq!(text(flow, "nat"), Nat::Dnat.as_str());
        assert_eq!(ip_of(text(flow, "initiator")), facts.pod_ips["pod-a"]);
        assert_eq!(
            text(flow, "responder"),
            format!("{}:8080", facts.pod_ips["pod-b"])
        );
        assert_eq!(
            text(flow, "requested"),
            format!("{}:80", facts.backend_service_ip)
        );
    }
    for flow in flows {
        assert_eq!(text(flow, "proto"), "tcp");
        assert_eq!(text(flow, "tcp_state"), "established", "{flow}");
        assert!(number(flow, "handshake_seconds") > 0.0, "{flow}");
        assert!(number(flow, "forward_bytes") >= 240_000.0, "{flow}");
        assert_eq!(flow["endpoint"], Value::Null);
        assert_eq!(flow["initiator_pod"], Value::Null);
    }
    let (status, default) = get_json(&agent, "/api/v1/flows");
    assert_eq!(status, 200);
    let listed = default["flows"].as_array().expect("flows").len();
    assert!((5..=20).contains(&listed), "{default}");

    for bad in ["limit=0", "limit=1001", "limit=five", "limit="] {
        let (status, error) = get_json(&agent, &format!("/api/v1/flows?{bad}"));
        assert_eq!(status, 400, "{bad}: {error}");
        assert!(text(&error, "error").contains("limit"), "{bad}: {error}");
    }
    drop(agent);
    lab.down().expect("lab down");
}

#[test]
fn promtool_finds_nothing_to_lint_in_a_real_scrape() {
    let mode = EndpointMode::PublicPrivate;
    let (lab, agent) = start(mode);
    // Every family with samples: every path, a silently dropped and a refused attempt.
    let sent = lab.run_traffic(&lab::scenarios(mode)).expect("traffic");
    assert!(sent.iter().all(|s| s.as_expected()), "{sent:#?}");
    // The SYN timeout (1 s) and a few polls.
    std::thread::sleep(Duration::from_millis(1_800));
    let exposition = agent.metrics_text().expect("scrape");
    let samples = scrape::parse(&exposition).expect("parse");
    for family in [
        "tracer_path_packets_total",
        "tracer_path_bytes_total",
        "tracer_path_flows_total",
        "tracer_path_handshake_seconds_bucket",
        "tracer_path_unanswered_syn_total",
        "tracer_path_resets_total",
        "tracer_attached_interfaces",
        "tracer_flow_table_entries",
        "tracer_flow_table_capacity",
        "tracer_flow_table_evictions_total",
        "tracer_events_lost_total",
        "tracer_datapath_packets_total",
        "tracer_ready",
        "tracer_readiness_problems",
        "tracer_series_overflow_total",
        "tracer_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
    ] {
        assert!(
            samples.iter().any(|s| s.name == family),
            "{family} is missing from the scrape:\n{exposition}"
        );
    }
    assert_eq!(
        scrape::sum(&samples, "tracer_path_unanswered_syn_total", &[]),
        1.0
    );
    assert_eq!(
        scrape::sum(&samples, "tracer_flow_table_capacity", &[]),
        65536.0
    );
    let rss = scrape::sum(&samples, "process_resident_memory_bytes", &[]);
    assert!(rss > 1e6 && rss < 1e9, "resident memory {rss} B");
    let started = scrape::sum(&samples, "process_start_time_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    assert!(
        now - started > 0.0 && now - started < 600.0,
        "started {started}, now {now}"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian package prometheus; `cargo xtask setup` installs it)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("feeding promtool");
    let output = promtool.wait_with_output().expect("promtool ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics ({}): {said}\n--- scrape ---\n{exposition}",
        output.status
    );
    drop(agent);
    lab.down().expect("lab down");
}
