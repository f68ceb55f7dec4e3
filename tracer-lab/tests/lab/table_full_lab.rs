//! A flow table too small for the traffic: the real agent with `--flow-table-size 1024` in the
//! lab node while pod-a opens about 3,600 UDP connections, 20 of them long-lived ("survivors")
//! among a churn of one-datagram ones.
//! - every eviction is counted in `tracer_flow_table_evictions_total`: connections created by
//!   the datapath are either still in the table or were evicted; those no poll read are a part
//!   of them (`tracer_events_lost_total`);
//! - no insert fails silently (`tracer_datapath_packets_total{outcome="insert_failed"}`);
//! - the survivors, kept warm, are counted exactly and classified right; nothing is `unknown`;
//! - the agent stays within its memory bound (VmHWM, VmRSS).
use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use tracer_common::labels::Path;
use tracer_lab::{
    agent::{self, LabAgent},
    build, figures,
    lab::{EndpointMode, Lab, exec},
    scrape::{self, Sample},
    testing,
};

const TABLE_SIZE: u32 = 1024;
/// Connections that fill most of the table first; the churn after them must evict them all.
const EARLY: u16 = 600;
const ROUNDS: u16 = 10;
/// New one-datagram connections per round.
const CHURN_PER_ROUND: u16 = 300;
/// Connections that send a datagram every round.
const SURVIVORS: u16 = 20;
const SURVIVOR_PAYLOAD: usize = 1000;
const CHURN_PAYLOAD: usize = 100;
/// IPv4 and UDP headers.
const HEADERS: usize = 28;
/// Source ports in pod-a of each kind of connection, and where they go.
const EARLY_PORTS: u16 = 20_000;
const SURVIVOR_PORTS: u16 = 25_000;
const CHURN_PORTS: u16 = 30_000;
const REMOTE_SINK: u16 = 9500;
const LOCAL_SINK: u16 = 9501;
/// The footprint goal for the agent (issue 7): RSS ≤ 64 MiB.
const MEMORY_BOUND_KIB: u64 = 64 * 1024;
/// Connections the lab's own background (the agent's DNS and IMDS lookups) may open or close
/// between two reads of the table and the counters.
const SLACK: f64 = 5.0;

/// A UDP socket in `ns` bound to `addr`: a sink, or a connection's source port.
fn udp_in(lab: &Lab, role: &str, addr: SocketAddr) -> UdpSocket {
    exec::within(&lab.ns(role), move || Ok(UdpSocket::bind(addr)?))
        .unwrap_or_else(|error| panic!("binding {addr} in {role}: {error:#}"))
}

/// One datagram of `payload` bytes from each of `ports` of pod-a to `to`, each from a socket
/// of its own that is closed at once: a new connection per port.
fn one_datagram_each(lab: &Lab, ports: std::ops::Range<u16>, to: SocketAddr, payload: usize) {
    let pod_a = lab.facts().pod_ips["pod-a"];
    exec::within(&lab.ns("pod-a"), move || {
        for port in ports {
            UdpSocket::bind((pod_a, port))?.send_to(&vec![0x5a; payload], to)?;
        }
        Ok(())
    })
    .expect("sending from pod-a");
}

fn grew(before: &[Sample], after: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape::sum(after, name, labels) - scrape::sum(before, name, labels)
}

#[test]
fn a_full_flow_table_evicts_counts_it_and_keeps_classifying() {
    testing::require_root();
    let started = Instant::now();
    let lab = testing::lab(EndpointMode::Public, env!("CARGO_BIN_EXE_tracer-lab"));
    let mut flags = agent::quick_flags();
    flags.extend(agent::context_flags(&lab));
    flags.extend(["--flow-table-size".into(), TABLE_SIZE.to_string()]);
    let mut agent = LabAgent::start_with(&lab, &build::tracer_path(), flags).expect("agent");
    agent
        .wait_ready(Duration::from_secs(15))
        .expect("agent ready");

    let facts = lab.facts();
    let (pod_a, pod_b, pod_r) = (
        facts.pod_ips["pod-a"],
        facts.pod_ips["pod-b"],
        facts.pod_ips["pod-r"],
    );
    let remote = SocketAddr::from((pod_r, REMOTE_SINK));
    let local = SocketAddr::from((pod_b, LOCAL_SINK));
    // Sinks, so that no datagram is answered with an ICMP error (a connection of its own).
    let _sinks = [udp_in(&lab, "pod-r", remote), udp_in(&lab, "pod-b", local)];
    let survivors: Vec<UdpSocket> = (0..SURVIVORS)
        .map(|n| {
            let from = SocketAddr::from((pod_a, SURVIVOR_PORTS + n));
            udp_in(&lab, "pod-a", from)
        })
        .collect();
    let settle = || std::thread::sleep(Duration::from_millis(800));
    let before = agent.scrape().expect("scrape");

    // Most of the table, seen by the agent before anything is evicted.
    one_datagram_each(
        &lab,
        EARLY_PORTS..EARLY_PORTS + EARLY,
        remote,
        CHURN_PAYLOAD,
    );
    settle();
    let filled = agent.scrape().expect("scrape");
    let remote_flows = [("path", Path::PodToPodRemote.as_str())];
    assert_eq!(
        grew(&before, &filled, "tracer_path_flows_total", &remote_flows),
        f64::from(EARLY),
        "every early connection is seen and classified\n{}",
        agent.log_tail()
    );

    // Three times the table's size in new connections, the survivors sending between them.
    for round in 0..ROUNDS {
        for socket in &survivors {
            socket
                .send_to(&[0xa5; SURVIVOR_PAYLOAD], local)
                .expect("a survivor sends");
        }
        let first = CHURN_PORTS + round * CHURN_PER_ROUND;
        one_datagram_each(&lab, first..first + CHURN_PER_ROUND, remote, CHURN_PAYLOAD);
        std::thread::sleep(Duration::from_millis(50));
    }
    settle();
    let after = agent.scrape().expect("scrape");
    let memory = agent.memory_kib().expect("the agent's memory");
    let (peak_kib, rss_kib) = (memory.peak_kib, memory.rss_kib);

    let metric = |name: &str, labels: &[(&str, &str)]| grew(&before, &after, name, labels);
    let outcome =
        |name: &'static str| metric("tracer_datapath_packets_total", &[("outcome", name)]);
    let created = outcome("flows_created");
    let evicted = metric("tracer_flow_table_evictions_total", &[]);
    let lost = metric("tracer_events_lost_total", &[]);
    let entries = scrape::sum(&after, "tracer_flow_table_entries", &[]);
    let entries_growth = metric("tracer_flow_table_entries", &[]);
    let local_packets = metric(
        "tracer_path_packets_total",
        &[
            ("path", Path::PodToPodLocal.as_str()),
            ("direction", "forward"),
        ],
    );
    let local_bytes = metric(
        "tracer_path_bytes_total",
        &[
            ("path", Path::PodToPodLocal.as_str()),
            ("direction", "forward"),
        ],
    );
    let local_flows = metric(
        "tracer_path_flows_total",
        &[("path", Path::PodToPodLocal.as_str())],
    );
    let unknown = metric(
        "tracer_path_bytes_total",
        &[("path", Path::Unknown.as_str())],
    );
    let offered = u32::from(EARLY) + u32::from(ROUNDS) * u32::from(CHURN_PER_ROUND);
    figures::record(
        "table_full",
        &format!(
            "table full: {offered} + {SURVIVORS} connections through a {TABLE_SIZE}-entry table: \
             {created} created, {evicted} evicted ({lost} of them unread), {entries} left; agent VmHWM {} MiB, VmRSS {} MiB; {:.1?}",
            peak_kib / 1024,
            rss_kib / 1024,
            started.elapsed()
        ),
    )
    .expect("record the figure");

    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    check(
        created >= f64::from(offered + u32::from(SURVIVORS)),
        format!("only {created} connections created for {offered} + {SURVIVORS} opened"),
    );
    check(
        (evicted - (created - entries_growth)).abs() <= SLACK,
        format!(
            "{evicted} evictions counted, but {created} connections were created and the table \
             grew by {entries_growth}: {} left it",
            created - entries_growth
        ),
    );
    check(
        lost <= evicted,
        format!("{lost} connections lost unread, more than the {evicted} evicted"),
    );
    check(
        evicted >= f64::from(EARLY),
        format!("{evicted} evictions: the {EARLY} early connections must all have gone"),
    );
    check(
        entries <= f64::from(TABLE_SIZE),
        format!("{entries} entries in a {TABLE_SIZE}-entry table"),
    );
    check(
        outcome("insert_failed") == 0.0,
        format!("{} inserts failed", outcome("insert_failed")),
    );
    let sent = u64::from(SURVIVORS) * u64::from(ROUNDS);
    check(
        (local_packets, local_bytes, local_flows)
            == (
                sent as f64,
                (sent * (SURVIVOR_PAYLOAD + HEADERS) as u64) as f64,
                f64::from(SURVIVORS),
            ),
        format!(
            "survivors: pod_to_pod_local forward packets, bytes, flows grew by \
             {local_packets}, {local_bytes}, {local_flows}; sent {sent} datagrams of {} bytes on {SURVIVORS} connections",
            SURVIVOR_PAYLOAD + HEADERS
        ),
    );
    check(
        unknown == 0.0,
        format!("{unknown} bytes classified unknown"),
    );
    check(
        peak_kib <= MEMORY_BOUND_KIB,
        format!("the agent peaked at {peak_kib} KiB (VmHWM), bound {MEMORY_BOUND_KIB} KiB"),
    );
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        agent.log_tail()
    );
    drop(agent);
    lab.down().expect("lab down");
}
