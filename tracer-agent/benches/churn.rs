//! What a new connection costs, as the flow table fills and once it must evict:
//! `cargo bench -p tracer-agent --bench churn [-- --check] [--json PATH]` (or `cargo xtask
//! bench churn`), as root.
//!
//! Every packet is a connection never seen before (a 60-byte UDP datagram from a new source
//! address), run once through the real `tracer_ingress` and once through the empty
//! `tracer_baseline` with BPF_PROG_TEST_RUN: the difference of the means is the ns the insert
//! path adds (see `mean` for why not medians). The table (the agent's default 65,536 entries) is filled to 25 % first,
//! then measured a quarter at a time up to full, then for another quarter while every insert
//! evicts the least recently used connection (goal ≤ 450 ns). Every new connection must be
//! inserted: `flows_created` equals the packets run and `insert_failed` stays 0.
//!
//! One run per packet is timed by the kernel alone, so single measurements are coarse; the
//! means over 16,384 packets per quarter are not.
mod report;
mod test_run;

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context as _, bail};
use serde::Serialize;
use test_run::{median, run};
use tracer_agent::datapath::{AttachMode, Datapath, TcxOrder};
use tracer_common::{
    DEFAULT_FLOW_TABLE_SIZE, DatapathCounter, PROGRAM_BASELINE, PROGRAM_INGRESS,
    test_support::craft::Frame,
};

const TABLE_SIZE: u32 = DEFAULT_FLOW_TABLE_SIZE;
/// New connections per measured band: a quarter of the table.
const BAND: u32 = TABLE_SIZE / 4;
/// The ns an insert that evicts may add (issue 7).
const EVICTING_GOAL_NS: f64 = 450.0;

/// The bands, by how full the table is when their inserts start and end.
const BANDS: [&str; 4] = ["25 → 50 %", "50 → 75 %", "75 → 100 %", "full, evicting"];

#[derive(Serialize)]
struct Row {
    band: &'static str,
    new_connections: u32,
    /// Means per packet.
    baseline_ns: f64,
    tracer_ns: f64,
    added_ns: f64,
    tracer_median_ns: f64,
    /// Only the evicting band has a goal.
    goal_ns: Option<f64>,
    pass: bool,
}

#[derive(Serialize)]
struct Report {
    table_size: u32,
    flows_created: u64,
    insert_failed: u64,
    entries_at_end: usize,
    results: Vec<Row>,
}

fn main() -> anyhow::Result<()> {
    let options = report::options("churn")?;
    test_run::in_fresh_netns("churn", move || measure(options))
}

/// Fills the table, measures every band, then prints and reports the results.
fn measure(options: report::Options) -> anyhow::Result<()> {
    let mut datapath = Datapath::load(TABLE_SIZE, AttachMode::Tcx(TcxOrder::First))
        .context("loading the datapath (the benchmark needs root: CAP_BPF, CAP_NET_ADMIN)")?;
    eprintln!(
        "churn benchmark: a new connection per packet, {TABLE_SIZE}-entry table, \
         {BAND} packets per band, one BPF_PROG_TEST_RUN each, means"
    );

    for n in 0..BAND {
        run(&mut datapath, PROGRAM_INGRESS, &new_connection(n), 1)?;
    }
    let mut results = Vec::new();
    for (band, name) in (1..).zip(BANDS) {
        let (mut baseline, mut tracer) = (Vec::new(), Vec::new());
        for n in band * BAND..(band + 1) * BAND {
            let frame = new_connection(n);
            baseline.push(run(&mut datapath, PROGRAM_BASELINE, &frame, 1)?);
            tracer.push(run(&mut datapath, PROGRAM_INGRESS, &frame, 1)?);
        }
        let (baseline_ns, tracer_ns) = (mean(&baseline), mean(&tracer));
        let added_ns = tracer_ns - baseline_ns;
        let tracer_median_ns = median(tracer);
        let goal_ns = (band == 4).then_some(EVICTING_GOAL_NS);
        results.push(Row {
            band: name,
            new_connections: BAND,
            baseline_ns,
            tracer_ns,
            added_ns,
            tracer_median_ns,
            goal_ns,
            pass: goal_ns.is_none_or(|goal| added_ns <= options.goal(goal)),
        });
    }

    let counters = datapath.counters()?;
    let created = counters[DatapathCounter::FlowsCreated as usize];
    let failed = counters[DatapathCounter::InsertFailed as usize];
    let entries = datapath.flows()?.len();
    print_table(&results, created, failed, entries);
    let run_packets = u64::from(BAND) * (1 + BANDS.len() as u64);
    if created != run_packets || failed != 0 || entries > TABLE_SIZE as usize {
        bail!(
            "{run_packets} new connections run: {created} created, {failed} failed inserts, \
             {entries} entries in a {TABLE_SIZE}-entry table"
        );
    }
    let missed = results.iter().filter(|row| !row.pass).count();
    let report = Report {
        table_size: TABLE_SIZE,
        flows_created: created,
        insert_failed: failed,
        entries_at_end: entries,
        results,
    };
    report::finish(&options, &report, missed)
}

/// A 60-byte UDP datagram of connection number `n`: its own source address in 10.128.0.0/9.
fn new_connection(n: u32) -> Vec<u8> {
    let source = SocketAddr::new(Ipv4Addr::from(0x0a80_0000 + n).into(), 40000);
    let server = SocketAddr::new(Ipv4Addr::new(10, 0, 0, 2).into(), 53);
    Frame::udp(source, server).payload(18).build().bytes
}

/// The mean, not the median: the LRU evicts in batches (up to 128 entries at a time), so most
/// evicting inserts are cheap and a few pay for the rest.
fn mean(samples: &[f64]) -> f64 {
    samples.iter().sum::<f64>() / samples.len() as f64
}

fn print_table(rows: &[Row], created: u64, failed: u64, entries: usize) {
    println!(
        "{:<15} {:>8}  {:>8} {:>7} {:>6} {:>5}  {:>13}  result",
        "table", "packets", "baseline", "tracer", "added", "goal", "tracer median"
    );
    for row in rows {
        println!(
            "{:<15} {:>8}  {:>8.0} {:>7.0} {:>6.0} {:>5}  {:>13.0}  {}",
            row.band,
            row.new_connections,
            row.baseline_ns,
            row.tracer_ns,
            row.added_ns,
            row.goal_ns
                .map_or("-".to_owned(), |goal| format!("{goal:.0}")),
            row.tracer_median_ns,
            if row.pass { "pass" } else { "FAIL" }
        );
    }
    println!(
        "(mean ns per new connection; added = tracer − baseline) {created} created, {failed} \
         failed inserts, {entries} entries at the end"
    );
}
