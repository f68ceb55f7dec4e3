//! The real agent in the lab node, listening on every node address as the DaemonSet does,
//! under hostile clients from a pod: connections sending half a request, connections sending
//! garbage, then a flood of requests. The agent closes every hostile connection within its
//! header timeout, its resident memory stays under 64 MiB, a scrape from the node answers
//! within a second throughout, and a scenario sent before, during and after is counted.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tracer_agent::serve::listener::HEADER_READ_TIMEOUT;
use tracer_common::labels::Path;
use tracer_lab::{
    agent::{LabAgent, METRICS_PORT},
    build,
    hostile::{self, Closing},
    lab::{EndpointMode, Lab, Scenario},
    scrape, testing,
};

const MODE: EndpointMode = EndpointMode::PublicPrivate;
/// Connections of each hostile kind: well beyond what the agent serves at once from one
/// client, and bounded so that the test stays short.
const HOSTILE_CONNECTIONS: usize = 2_000;
/// Requests of the flood, and the clients sending them at once.
const FLOOD_REQUESTS: usize = 2_000;
const FLOOD_CLIENTS: usize = 4;
/// The goals of issue 17.
const RSS_LIMIT_KIB: u64 = 64 * 1024;
const SCRAPE_LIMIT: Duration = Duration::from_secs(1);
/// Room beyond the header timeout for a loaded machine to close and for the client to see it.
const CLOSE_MARGIN: Duration = Duration::from_secs(10);
/// How long a scenario's counts may take to show (polls every 200 ms; a loaded machine).
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// Forward bytes counted on the scenario's path.
fn forward_bytes(agent: &LabAgent, scenario: &Scenario) -> f64 {
    let samples = agent.scrape().expect("scrape");
    scrape::sum(
        &samples,
        "tracer_path_bytes_total",
        &[
            ("path", scenario.expected_path.as_str()),
            ("direction", "forward"),
        ],
    )
}

/// Sends `scenario` and waits for its bytes to be counted: a failure if they are not.
fn check_counted(lab: &Lab, agent: &LabAgent, scenario: &Scenario, when: &str) -> Option<String> {
    let before = forward_bytes(agent, scenario);
    let sent = lab
        .run_traffic(std::slice::from_ref(scenario))
        .expect("traffic")
        .remove(0);
    let deadline = Instant::now() + SETTLE_LIMIT;
    let mut counted = forward_bytes(agent, scenario) - before;
    while counted < sent.payload_bytes as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        counted = forward_bytes(agent, scenario) - before;
    }
    eprintln!(
        "listener: {when}: {} sent {} B, counted {counted} B",
        sent.scenario, sent.payload_bytes
    );
    let counts =
        sent.connected == sent.connections && scrape::counts_payload(counted, sent.payload_bytes);
    (!counts).then(|| {
        format!(
            "{when}: {}/{} connections, {counted} B counted for {} B sent",
            sent.connected, sent.connections, sent.payload_bytes
        )
    })
}

fn check_closed(kind: &str, closing: Closing, failures: &mut Vec<String>) {
    eprintln!(
        "listener: {kind}: {} connections, the last closed {:?} after it sent, {} still open",
        closing.connections, closing.slowest, closing.still_open
    );
    if closing.still_open > 0 || closing.slowest > HEADER_READ_TIMEOUT + CLOSE_MARGIN {
        failures.push(format!(
            "{kind}: {} of {} still open, slowest closed after {:?}",
            closing.still_open, closing.connections, closing.slowest
        ));
    }
}

#[test]
fn hostile_clients_from_a_pod_cannot_exhaust_the_agent() {
    let lab = testing::lab(MODE, env!("CARGO_BIN_EXE_tracer-lab"));
    let mut agent = LabAgent::start_on_every_address(&lab, &build::tracer_path(), Vec::new())
        .expect("agent start");
    agent
        .wait_ready(Duration::from_secs(15))
        .expect("agent ready");
    let target = SocketAddr::from((lab.facts().node_ip, METRICS_PORT));
    let hostile_pod = lab.ns("pod-b");
    let scenario = testing::scenarios(MODE, &[Path::PodToPodRemote.as_str()]).remove(0);
    let mut failures = Vec::new();

    failures.extend(check_counted(&lab, &agent, &scenario, "before"));
    let (during, watched) = hostile::watching(&agent, || {
        let slow = hostile::open_slow(&hostile_pod, target, HOSTILE_CONNECTIONS)?;
        let during = check_counted(&lab, &agent, &scenario, "during");
        let slow = slow.wait_closed(HEADER_READ_TIMEOUT + CLOSE_MARGIN)?;
        let garbage = hostile::open_garbage(&hostile_pod, target, HOSTILE_CONNECTIONS)?
            .wait_closed(HEADER_READ_TIMEOUT + CLOSE_MARGIN)?;
        let answered = hostile::flood(&hostile_pod, target, FLOOD_CLIENTS, FLOOD_REQUESTS)?;
        Ok((during, slow, garbage, answered))
    })
    .expect("hostile clients");
    let (counted_during, slow, garbage, answered) = during;
    failures.extend(counted_during);
    check_closed("half a request", slow, &mut failures);
    check_closed("garbage", garbage, &mut failures);
    // Every request answered, and refused: a pod without a token does not read /metrics.
    eprintln!("listener: flood: {FLOOD_REQUESTS} requests answered, by status: {answered:?}");
    if answered.get(&403) != Some(&FLOOD_REQUESTS) {
        failures.push(format!(
            "flood: {FLOOD_REQUESTS} requests, by status: {answered:?} (all 403 expected)"
        ));
    }
    failures.extend(check_counted(&lab, &agent, &scenario, "after"));

    let memory = agent.memory_kib().expect("memory");
    eprintln!(
        "listener: {} scrapes, slowest {:?}; RSS peak {} KiB (seen {} KiB), now {} KiB",
        watched.scrape_times.len(),
        watched.slowest_scrape(),
        memory.peak_kib,
        watched.rss_peak_kib,
        memory.rss_kib
    );
    if watched.slowest_scrape() > SCRAPE_LIMIT || !watched.failed_scrapes.is_empty() {
        failures.push(format!(
            "scrapes: slowest {:?}, failed: {:?}",
            watched.slowest_scrape(),
            watched.failed_scrapes
        ));
    }
    if memory.peak_kib > RSS_LIMIT_KIB {
        failures.push(format!("RSS peaked at {} KiB", memory.peak_kib));
    }
    let samples = agent.scrape().expect("scrape");
    for reason in ["client_limit", "header_timeout", "malformed"] {
        let rejected = scrape::sum(
            &samples,
            "tracer_http_connections_rejected_total",
            &[("reason", reason)],
        );
        eprintln!("listener: tracer_http_connections_rejected_total{{reason={reason}}} {rejected}");
        if rejected == 0.0 {
            failures.push(format!("no connection counted as rejected for {reason}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        agent.log_tail()
    );
}
