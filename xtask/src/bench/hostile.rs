//! `cargo xtask bench hostile`: the (release) agent, listening on every node address as the
//! DaemonSet does, under hostile clients from one pod: 10,000 connections sending half a
//! request, then 10,000 sending garbage, then a flood of 10,000 `/metrics` requests (over plain HTTP without a token: each
//! answered 403). Printed:
//! the agent's resident memory (before, peak, after), how long a scrape from the node takes
//! meanwhile (p99, slowest), and how long the agent takes to close the hostile connections.
//! Goals (issue 17): RSS under 64 MiB, every scrape within 1 s, every hostile connection
//! closed within the agent's header timeout (5 s) and a margin.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use serde::Serialize;

use tracer_lab::{
    agent::{LabAgent, METRICS_PORT},
    build,
    hostile::{self, Closing},
    lab::EndpointMode,
};

/// Connections of each hostile kind, and requests of the flood.
const CONNECTIONS: usize = 10_000;
/// Clients sending the flood at once.
const FLOOD_CLIENTS: usize = 8;
/// How long the bench waits for the agent to close a phase's connections.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// The agent's header timeout (`HEADER_READ_TIMEOUT`, 5 s) and a second for a loaded machine.
const CLOSE_GOAL: Duration = Duration::from_secs(6);
const RSS_GOAL_MIB: f64 = 64.0;
const SCRAPE_GOAL: Duration = Duration::from_secs(1);

#[derive(Serialize)]
struct Report {
    rss_before_mib: f64,
    rss_peak_mib: f64,
    rss_after_mib: f64,
    scrapes: usize,
    failed_scrapes: usize,
    scrape_p99_ms: f64,
    scrape_max_ms: f64,
    slow_close_s: f64,
    slow_still_open: usize,
    garbage_close_s: f64,
    garbage_still_open: usize,
    flood_answered: usize,
}

pub fn hostile(check: bool, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    let tracer = build::agent_release()?;
    let lab = crate::lab_in(EndpointMode::Public)?;
    let mut agent = LabAgent::start_on_every_address(&lab, &tracer, Vec::new())?;
    agent.wait_ready(Duration::from_secs(15))?;
    let target = SocketAddr::from((lab.facts().node_ip, METRICS_PORT));
    let pod = lab.ns("pod-a");
    let before = agent.memory_kib()?;
    let ((slow, garbage, flood_answered), watched) = hostile::watching(&agent, || {
        eprintln!("bench hostile: {CONNECTIONS} connections sending half a request");
        let slow = hostile::open_slow(&pod, target, CONNECTIONS)?.wait_closed(CLOSE_WAIT)?;
        eprintln!("bench hostile: {CONNECTIONS} connections sending garbage");
        let garbage = hostile::open_garbage(&pod, target, CONNECTIONS)?.wait_closed(CLOSE_WAIT)?;
        eprintln!("bench hostile: {CONNECTIONS} requests from {FLOOD_CLIENTS} clients");
        let statuses = hostile::flood(&pod, target, FLOOD_CLIENTS, CONNECTIONS)?;
        // A status is an answer (403: a pod has no token); 0 is none.
        let answered = statuses
            .iter()
            .filter(|(status, _)| **status != 0)
            .map(|(_, count)| count)
            .sum::<usize>();
        Ok((slow, garbage, answered))
    })
    .context("hostile clients")?;
    let after = agent.memory_kib()?;
    agent.stop()?;
    lab.down()?;

    let mib = |kib: u64| kib as f64 / 1024.0;
    let millis = |time: Duration| time.as_secs_f64() * 1000.0;
    let report = Report {
        rss_before_mib: mib(before.rss_kib),
        rss_peak_mib: mib(after.peak_kib.max(watched.rss_peak_kib)),
        rss_after_mib: mib(after.rss_kib),
        scrapes: watched.scrape_times.len(),
        failed_scrapes: watched.failed_scrapes.len(),
        scrape_p99_ms: millis(watched.scrape_p99()),
        scrape_max_ms: millis(watched.slowest_scrape()),
        slow_close_s: slow.slowest.as_secs_f64(),
        slow_still_open: slow.still_open,
        garbage_close_s: garbage.slowest.as_secs_f64(),
        garbage_still_open: garbage.still_open,
        flood_answered,
    };
    println!(
        "| RSS before / peak / after MiB | scrapes (failed) | scrape p99 / max ms | half request: closed within s (open) | garbage: closed within s (open) | flood answered |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| {:.1} / {:.1} / {:.1} | {} ({}) | {:.1} / {:.1} | {:.2} ({}) | {:.2} ({}) | {} of {CONNECTIONS} |",
        report.rss_before_mib,
        report.rss_peak_mib,
        report.rss_after_mib,
        report.scrapes,
        report.failed_scrapes,
        report.scrape_p99_ms,
        report.scrape_max_ms,
        report.slow_close_s,
        report.slow_still_open,
        report.garbage_close_s,
        report.garbage_still_open,
        report.flood_answered,
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let closed_in_time =
        |closing: &Closing| closing.still_open == 0 && closing.slowest <= CLOSE_GOAL;
    if check
        && (report.rss_peak_mib > RSS_GOAL_MIB
            || report.failed_scrapes > 0
            || watched.slowest_scrape() > SCRAPE_GOAL
            || !closed_in_time(&slow)
            || !closed_in_time(&garbage))
    {
        bail!(
            "hostile-client goals missed (RSS ≤ 64 MiB, every scrape within 1 s, every hostile connection closed within 6 s)"
        );
    }
    Ok(())
}
