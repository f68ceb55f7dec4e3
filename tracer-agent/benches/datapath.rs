//! What the tracer's classifier costs per packet: `cargo bench -p tracer-agent --bench datapath
//! [-- --check] [--json PATH]` (or `cargo xtask bench datapath`), as root.
//!
//! Each case runs the real `tracer_ingress` and the empty `tracer_baseline` on the same
//! 64-byte-class packet with BPF_PROG_TEST_RUN, `REPEAT` runs per measurement, in `ROUNDS`
//! interleaved rounds, and reports the medians and their difference: the ns the tracer adds
//! to a packet, against the goals in docs/performance.md. The packet's flow is already in the
//! table (the steady state: lookup and in-place adds), with the table holding one flow per case
//! ("hot"), 64k flows (half of a 131,072-entry table), or 64k flows in a table 75 % full.
//! A repeated run keeps its one flow in the CPU cache, so the fuller states measure the hash
//! table's load, not the cache misses of a real mix of flows.
//!
//! `--check` makes a missed goal an error (exit status 1); `--json PATH` writes the results.
mod report;
mod test_run;

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context as _, bail};
use serde::Serialize;
use test_run::{median, run};
use tracer_agent::datapath::{AttachMode, Datapath, TcxOrder};
use tracer_common::{
    DatapathCounter, PROGRAM_BASELINE, PROGRAM_INGRESS, TCP_ACK, test_support::craft::Frame,
};

/// Runs per measurement: about 0.1 s, so that timer and scheduling noise average out.
const REPEAT: u32 = 1_000_000;
/// Interleaved rounds per case (odd, so the median is one of them).
const ROUNDS: usize = 7;
/// Flows put in the table before measuring the "64k flows" states.
const FILL_FLOWS: u32 = 65_536;

/// A state of the flow table, and the goal for the added cost in it.
struct State {
    name: &'static str,
    table_size: u32,
    fill: u32,
    goal_ns: f64,
}

const STATES: [State; 3] = [
    State {
        name: "hot",
        table_size: 2 * FILL_FLOWS,
        fill: 0,
        goal_ns: 75.0,
    },
    State {
        name: "64k flows",
        table_size: 2 * FILL_FLOWS,
        fill: FILL_FLOWS,
        goal_ns: 100.0,
    },
    State {
        name: "75 % full",
        // 65,536 is 75 % of 87,382.
        table_size: FILL_FLOWS * 4 / 3 + 1,
        fill: FILL_FLOWS,
        goal_ns: 175.0,
    },
];

#[derive(Serialize)]
struct Row {
    state: &'static str,
    flows: usize,
    table_size: u32,
    packet: &'static str,
    frame_bytes: usize,
    baseline_ns: f64,
    tracer_ns: f64,
    added_ns: f64,
    goal_ns: f64,
    pass: bool,
}

#[derive(Serialize)]
struct Report {
    repeat: u32,
    rounds: usize,
    results: Vec<Row>,
}

fn main() -> anyhow::Result<()> {
    let options = report::options("datapath")?;
    test_run::in_fresh_netns("datapath", move || measure(options))
}

/// Measures every packet in every state, then prints and reports the results.
fn measure(options: report::Options) -> anyhow::Result<()> {
    let (client, server) = (addr("10.0.0.1:40000"), addr("10.0.0.2:443"));
    let (client6, server6) = (addr("[fd00::1]:40000"), addr("[fd00::2]:443"));
    let packets = [
        ("IPv4 TCP", Frame::tcp(client, server, TCP_ACK).pad_to(60)),
        ("IPv4 UDP", Frame::udp(client, server).payload(18)),
        ("IPv6 TCP", Frame::tcp(client6, server6, TCP_ACK)),
    ]
    .map(|(name, frame)| (name, frame.build().bytes));

    eprintln!(
        "datapath benchmark: BPF_PROG_TEST_RUN, {REPEAT} runs × {ROUNDS} rounds per case, medians"
    );
    let mut results = Vec::new();
    for state in &STATES {
        results.extend(measure_state(state, &packets, &options)?);
    }
    print_table(&results);

    let missed = results.iter().filter(|row| !row.pass).count();
    let report = Report {
        repeat: REPEAT,
        rounds: ROUNDS,
        results,
    };
    report::finish(&options, &report, missed)
}

/// Loads a datapath with the state's table, fills it, and measures every packet in it.
fn measure_state(
    state: &State,
    packets: &[(&'static str, Vec<u8>)],
    options: &report::Options,
) -> anyhow::Result<Vec<Row>> {
    let mut datapath = Datapath::load(state.table_size, AttachMode::Tcx(TcxOrder::First))
        .context("loading the datapath (the benchmark needs root: CAP_BPF, CAP_NET_ADMIN)")?;
    for n in 0..state.fill {
        let source = SocketAddr::new(Ipv4Addr::from(0x0a80_0000 + n).into(), 40000);
        let frame = Frame::udp(source, addr("10.0.0.2:53")).payload(18).build();
        run(&mut datapath, PROGRAM_INGRESS, &frame.bytes, 1)?;
    }
    // Create the measured flows: from here on, every measured run is a hit.
    for (_, frame) in packets {
        run(&mut datapath, PROGRAM_INGRESS, frame, 1)?;
    }
    let flows = datapath.flows()?.len();
    let failed = datapath.counters()?[DatapathCounter::InsertFailed as usize];
    let expected = state.fill as usize + packets.len();
    if flows != expected || failed != 0 {
        bail!(
            "{}: {flows} flows in the table instead of {expected} ({failed} failed inserts)",
            state.name
        );
    }

    let mut samples = vec![(Vec::new(), Vec::new()); packets.len()];
    for _ in 0..ROUNDS {
        for ((_, frame), (baseline, tracer)) in packets.iter().zip(&mut samples) {
            baseline.push(run(&mut datapath, PROGRAM_BASELINE, frame, REPEAT)?);
            tracer.push(run(&mut datapath, PROGRAM_INGRESS, frame, REPEAT)?);
        }
    }
    Ok(packets
        .iter()
        .zip(samples)
        .map(|((packet, frame), (baseline, tracer))| {
            let (baseline_ns, tracer_ns) = (median(baseline), median(tracer));
            let added_ns = tracer_ns - baseline_ns;
            Row {
                state: state.name,
                flows,
                table_size: state.table_size,
                packet,
                frame_bytes: frame.len(),
                baseline_ns,
                tracer_ns,
                added_ns,
                goal_ns: state.goal_ns,
                pass: added_ns <= options.goal(state.goal_ns),
            }
        })
        .collect())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<10} {:>6} {:>7}  {:<9} {:>5}  {:>8} {:>7} {:>6} {:>5}  result",
        "state", "flows", "table", "packet", "bytes", "baseline", "tracer", "added", "goal"
    );
    for row in rows {
        println!(
            "{:<10} {:>6} {:>7}  {:<9} {:>5}  {:>8.0} {:>7.0} {:>6.0} {:>5.0}  {}",
            row.state,
            row.flows,
            row.table_size,
            row.packet,
            row.frame_bytes,
            row.baseline_ns,
            row.tracer_ns,
            row.added_ns,
            row.goal_ns,
            if row.pass { "pass" } else { "FAIL" }
        );
    }
    println!("(ns per packet; added = tracer − baseline, goal = the most it may add)");
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a valid socket address")
}
