//! The real agent in the lab node, real traffic on every path in every endpoint mode: each
//! class counts what was sent (within header overhead) under the right labels, nothing else
//! moves, a packet crossing a veth and an ENI is counted
//! once, and SIGTERM detaches everything within 2 s.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracer_common::labels::{Endpoint, Nat, Path};
use tracer_lab::{
    agent::LabAgent,
    lab::{self, EndpointMode, Lab, Scenario},
    scrape::{self, Sample},
    testing,
};

/// Growth of forward bytes allowed on series a scenario does not use (and on `unknown`).
const NOISE_BYTES: f64 = 5_000.0;
/// How long a scenario's counts may take to settle before they are read as they are.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// Forward bytes by series, keyed `path nat=… endpoint=…`.
type Growth = BTreeMap<String, f64>;

fn series(path: &str, nat: &str, endpoint: &str) -> String {
    format!("{path} nat={nat} endpoint={endpoint}")
}

fn forward_bytes(samples: &[Sample]) -> Growth {
    let mut by_series = Growth::new();
    for sample in samples.iter().filter(|s| {
        s.name == "tracer_path_bytes_total"
            && s.labels.get("direction").is_some_and(|d| d == "forward")
    }) {
        let label = |name: &str| sample.labels.get(name).map_or("", String::as_str);
        let key = series(label("path"), label("nat"), label("endpoint"));
        *by_series.entry(key).or_insert(0.0) += sample.value;
    }
    by_series
}

fn start(mode: EndpointMode) -> (Lab, LabAgent) {
    testing::lab_with_agent(mode, env!("CARGO_BIN_EXE_tracer-lab"))
}

/// Runs one scenario and returns what was sent and the growth it caused, by series: read once
/// the scenario's own series has counted what was sent and nothing has moved for two scrapes,
/// so that no byte of it is left to land in the next scenario (a loaded machine delays polls).
fn run_one(lab: &Lab, agent: &LabAgent, scenario: Scenario) -> (lab::Sent, Growth) {
    let before = forward_bytes(&agent.scrape().expect("scrape"));
    let sent = lab.run_traffic(&[scenario]).expect("traffic").remove(0);
    let expected = expected_series(&sent);
    let growth_now = || -> Growth {
        forward_bytes(&agent.scrape().expect("scrape"))
            .iter()
            .map(|(key, value)| (key.clone(), value - before.get(key).copied().unwrap_or(0.0)))
            .collect()
    };
    let deadline = Instant::now() + SETTLE_LIMIT;
    let mut growth = growth_now();
    loop {
        // Several polls (200 ms each): the connections seen and their NAT resolved.
        std::thread::sleep(Duration::from_millis(600));
        let next = growth_now();
        let counted = next.get(&expected).copied().unwrap_or(0.0);
        let settled = next == growth && counted >= sent.payload_bytes as f64;
        growth = next;
        if settled || Instant::now() >= deadline {
            return (sent, growth);
        }
    }
}

fn expected_series(sent: &lab::Sent) -> String {
    series(
        sent.expected_path.as_str(),
        sent.expected_nat.as_str(),
        sent.expected_endpoint.map_or("", Endpoint::as_str),
    )
}

/// Every scenario that completes connections, one at a time: its series (path, NAT and
/// endpoint labels) counts what was sent, and no other series — `unknown` included — moves.
fn every_scenario_counts_what_was_sent(mode: EndpointMode) {
    let (lab, agent) = start(mode);
    let scenarios: Vec<Scenario> = lab::scenarios(mode)
        .into_iter()
        .filter(|s| s.name != "dropped_syn" && s.name != "refused")
        .collect();
    let mut failures = Vec::new();
    for scenario in scenarios {
        let (sent, growth) = run_one(&lab, &agent, scenario);
        let expected = expected_series(&sent);
        let counted = growth.get(&expected).copied().unwrap_or(0.0);
        eprintln!(
            "{mode}: {:<32} {expected:<50} sent {:>9} B, counted {:>9} B",
            sent.scenario, sent.payload_bytes, counted
        );
        if sent.connected != sent.connections {
            failures.push(format!(
                "{}: only {}/{} connections made",
                sent.scenario, sent.connected, sent.connections
            ));
        }
        if !scrape::counts_payload(counted, sent.payload_bytes) {
            failures.push(format!(
                "{}: {expected} forward bytes {counted} outside [{}, {} × 1.25 + 20 kB]",
                sent.scenario, sent.payload_bytes, sent.payload_bytes
            ));
        }
        for (other, grew) in &growth {
            if *other != expected && *grew > NOISE_BYTES {
                failures.push(format!(
                    "{}: {other} grew by {grew} B as well",
                    sent.scenario
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{mode} mode:\n{}\n{}",
        failures.join("\n"),
        agent.log_tail()
    );
    drop(agent);
    lab.down().expect("lab down");
}

#[test]
fn every_class_counts_what_was_sent_in_public_mode() {
    every_scenario_counts_what_was_sent(EndpointMode::Public);
}

#[test]
fn every_class_counts_what_was_sent_in_public_private_mode() {
    every_scenario_counts_what_was_sent(EndpointMode::PublicPrivate);
}

#[test]
fn every_class_counts_what_was_sent_in_private_mode() {
    every_scenario_counts_what_was_sent(EndpointMode::Private);
}

#[test]
fn a_flow_across_a_veth_and_an_eni_is_counted_once() {
    let (lab, agent) = start(EndpointMode::PublicPrivate);
    let scenario = lab::scenarios(EndpointMode::PublicPrivate)
        .into_iter()
        .find(|s| {
            s.expected_path == Path::PodToPodRemote
                && s.name != "dropped_syn"
                && s.name != "refused"
        })
        .expect("a pod_to_pod_remote scenario");
    let duplicates = |samples: &[Sample]| {
        scrape::sum(
            samples,
            "tracer_datapath_packets_total",
            &[("outcome", "duplicate")],
        )
    };
    let before = duplicates(&agent.scrape().expect("scrape"));
    let (sent, growth) = run_one(&lab, &agent, scenario);
    let after = duplicates(&agent.scrape().expect("scrape"));
    let counted = growth
        .get(&series(
            Path::PodToPodRemote.as_str(),
            Nat::None.as_str(),
            "",
        ))
        .copied()
        .unwrap_or(0.0);
    // The pod's veth and the ENI both see every packet: the ENI's sightings are duplicates.
    assert!(
        after > before,
        "no packet was seen at a second interface: the flow did not cross the veth and the ENI"
    );
    assert!(
        scrape::counts_payload(counted, sent.payload_bytes),
        "counted {counted} B for {} B sent: a double count would be about twice the payload\n{}",
        sent.payload_bytes,
        agent.log_tail()
    );
    drop(agent);
    lab.down().expect("lab down");
}

#[test]
fn silent_drops_and_refusals_are_told_apart_and_handshakes_are_timed() {
    let (lab, agent) = start(EndpointMode::PublicPrivate);
    let wanted = ["dropped_syn", "refused", Path::PodToPodLocal.as_str()];
    let scenarios = testing::scenarios(EndpointMode::PublicPrivate, &wanted);
    let sent = lab.run_traffic(&scenarios).expect("traffic");
    // The SYN timeout (1 s) plus a few polls.
    std::thread::sleep(Duration::from_millis(1_800));
    let samples = agent.scrape().expect("scrape");
    let remote = [("path", Path::PodToPodRemote.as_str())];
    let unanswered = scrape::sum(&samples, "tracer_path_unanswered_syn_total", &remote);
    let resets = scrape::sum(&samples, "tracer_path_resets_total", &remote);
    assert_eq!(
        (unanswered, resets),
        (1.0, 1.0),
        "one silently dropped attempt and one refused one on pod_to_pod_remote\n{}",
        agent.log_tail()
    );
    let local = sent
        .iter()
        .find(|s| s.scenario == Path::PodToPodLocal.as_str())
        .expect("pod_to_pod_local sent");
    let timed = scrape::sum(
        &samples,
        "tracer_path_handshake_seconds_count",
        &[("path", Path::PodToPodLocal.as_str())],
    );
    assert_eq!(
        timed,
        f64::from(local.connected),
        "one handshake time per connection made"
    );
    drop(agent);
    lab.down().expect("lab down");
}

#[test]
fn switching_the_endpoint_mode_moves_node_traffic_between_public_and_private() {
    let (lab, agent) = start(EndpointMode::Public);
    let apiserver_bytes = |endpoint: Endpoint| {
        let samples = agent.scrape().expect("scrape");
        scrape::sum(
            &samples,
            "tracer_path_bytes_total",
            &[
                ("path", Path::NodeToApiserver.as_str()),
                ("endpoint", endpoint.as_str()),
                ("direction", "forward"),
            ],
        )
    };
    let mut seen = Vec::new();
    for mode in [
        EndpointMode::Public,
        EndpointMode::Private,
        EndpointMode::Public,
    ] {
        lab.set_mode(mode).expect("set mode");
        // The agent re-resolves the cluster endpoint every second.
        std::thread::sleep(Duration::from_millis(1_500));
        let before = (
            apiserver_bytes(Endpoint::Public),
            apiserver_bytes(Endpoint::Private),
        );
        let scenario = lab::scenarios(mode)
            .into_iter()
            .find(|s| s.name == Path::NodeToApiserver.as_str())
            .expect("a node_to_apiserver scenario");
        let sent = lab.run_traffic(&[scenario]).expect("traffic").remove(0);
        std::thread::sleep(Duration::from_millis(900));
        let after = (
            apiserver_bytes(Endpoint::Public),
            apiserver_bytes(Endpoint::Private),
        );
        let grew = (after.0 - before.0, after.1 - before.1);
        seen.push(format!(
            "{mode}: sent {} B to {}, grew {grew:?}",
            sent.payload_bytes, sent.to
        ));
        let (on, off) = match mode {
            EndpointMode::Public => (grew.0, grew.1),
            _ => (grew.1, grew.0),
        };
        assert!(
            scrape::counts_payload(on, sent.payload_bytes) && off == 0.0,
            "{}\n{}",
            seen.join("\n"),
            agent.log_tail()
        );
    }
    drop(agent);
    lab.down().expect("lab down");
}

#[test]
fn sigterm_detaches_everything_within_two_seconds() {
    let (lab, agent) = start(EndpointMode::Public);
    let ours = agent.programs();
    assert!(
        ours.len() >= 2,
        "the running agent holds no tracer programs: {ours:?}"
    );
    let (took, code) = agent.stop().expect("stop");
    assert_eq!(code, Some(0), "the agent must exit 0 on SIGTERM");
    assert!(
        took < Duration::from_secs(2),
        "the agent took {took:?} to exit after SIGTERM"
    );
    // Nothing is pinned, so once the agent's links are gone its programs are unloaded: one of
    // its programs still loaded means a link (tcx or clsact filter) still holds it.
    let left: Vec<u64> = loaded_tracer_programs()
        .into_iter()
        .filter(|id| ours.contains(id))
        .collect();
    assert!(
        left.is_empty(),
        "programs {left:?} of the stopped agent are still loaded"
    );
    lab.down().expect("lab down");
}

/// The ids of the loaded `tracer_*` programs.
fn loaded_tracer_programs() -> Vec<u64> {
    let listing = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool prog show");
    assert!(
        listing.status.success(),
        "bpftool failed: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let programs: serde_json::Value =
        serde_json::from_slice(&listing.stdout).expect("bpftool -j prints JSON");
    programs
        .as_array()
        .expect("a list of programs")
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("tracer_")))
        .map(|p| p["id"].as_u64().expect("program id"))
        .collect()
}
