//! The agent killed with SIGKILL 20 times in the lab node (10 times attached with tcx, then
//! 10 times with clsact) and started again each time: nothing of a killed agent outlives its
//! successor's start (no program stays loaded, no filter stays attached: a clsact filter
//! outlives its process, so the successor removes it), each successor holds exactly one program
//! per hook, and the last one counts traffic and leaves nothing behind when stopped.
//!
//! What this does not prove: that no packet goes uncounted across a restart. Counters live in
//! the agent's process; a restart is a counter reset (which Prometheus' `rate()` and
//! `increase()` take in their stride), and traffic between the kill and the new start is not
//! counted. See docs/design.md, "Restarts".
use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use xtask::{
    agent::{self, LabAgent},
    build,
    lab::{self, EndpointMode, Lab},
    scrape, testing,
};

const KILLS: usize = 20;

fn start(lab: &Lab, mode: &str) -> LabAgent {
    let mut flags = agent::quick_flags();
    flags.extend(agent::context_flags(lab));
    flags.extend(["--attach-mode".into(), mode.into()]);
    let mut agent = LabAgent::start_with(lab, &build::tracer_path(), flags).expect("agent start");
    agent
        .wait_ready(Duration::from_secs(15))
        .expect("agent ready");
    agent
}

/// Those of `programs` still loaded, once the kernel has had up to a second to free them: a
/// program that only a removed clsact filter held is released by a deferred work item.
fn still_loaded<'a>(programs: impl IntoIterator<Item = &'a u64>) -> Vec<u64> {
    let programs: BTreeSet<u64> = programs.into_iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let loaded: BTreeSet<u64> = aya::programs::loaded_programs()
            .map(|program| u64::from(program.expect("reading a loaded program").id()))
            .collect();
        let left: Vec<u64> = programs.intersection(&loaded).copied().collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The tracer's clsact filters on each of the node's interfaces, as `tc` lists them.
fn clsact_filters(lab: &Lab) -> Vec<String> {
    let links = Command::new("ip")
        .args(["-n", &lab.ns("node"), "-o", "link", "show"])
        .output()
        .expect("ip link");
    let names: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| name != "lo")
        .collect();
    let mut filters = Vec::new();
    for name in names {
        for hook in ["ingress", "egress"] {
            let listing = lab
                .command_in("node", "tc")
                .args(["filter", "show", "dev", &name, hook])
                .output()
                .expect("tc filter show");
            filters.extend(
                String::from_utf8_lossy(&listing.stdout)
                    .lines()
                    .filter(|line| line.contains(" tracer_"))
                    .map(|line| format!("{name} {hook}: {line}")),
            );
        }
    }
    filters
}

#[test]
fn killed_agents_leave_nothing_behind_once_restarted() {
    testing::require_root();
    let lab = testing::lab(EndpointMode::Public, env!("CARGO_BIN_EXE_xtask"));
    let traced = {
        let agent = start(&lab, "tcx");
        let linked = agent.linked_ifindexes().len();
        agent.stop().expect("stop");
        linked
    };
    assert!(traced >= 2, "the agent attached to no interface");

    let mut killed: BTreeSet<u64> = BTreeSet::new();
    let mut failures = Vec::new();
    for kill in 0..=KILLS {
        // A node keeps its kernel, and so its attach mode, across restarts: half the kills
        // with each.
        let mode = if kill < KILLS / 2 { "tcx" } else { "clsact" };
        let agent = start(&lab, mode);
        let outlived = still_loaded(&killed);
        if !outlived.is_empty() {
            failures.push(format!(
                "start {kill} ({mode}): programs {outlived:?} of killed agents are still loaded"
            ));
        }
        let filters = clsact_filters(&lab);
        let expected = if mode == "clsact" { traced } else { 0 };
        if filters.len() != expected {
            failures.push(format!(
                "start {kill} ({mode}): {} tracer clsact filters, expected {expected}:\n  {}",
                filters.len(),
                filters.join("\n  ")
            ));
        }
        if kill == KILLS {
            // The last one: it counts, and a clean stop leaves nothing.
            let scenario = lab::scenarios(EndpointMode::Public)
                .into_iter()
                .find(|s| s.name == "pod_to_pod_local")
                .expect("a pod_to_pod_local scenario");
            let series = [("path", "pod_to_pod_local"), ("direction", "forward")];
            let before = scrape::sum(
                &agent.scrape().expect("scrape"),
                "tracer_path_bytes_total",
                &series,
            );
            let sent = lab.run_traffic(&[scenario]).expect("traffic").remove(0);
            std::thread::sleep(Duration::from_millis(900));
            let after = scrape::sum(
                &agent.scrape().expect("scrape"),
                "tracer_path_bytes_total",
                &series,
            );
            let grew = after - before;
            let payload = sent.payload_bytes as f64;
            if !(grew >= payload && grew <= payload * 1.25 + 20_000.0) {
                failures.push(format!(
                    "after {KILLS} kills: pod_to_pod_local grew by {grew} for {payload} bytes sent"
                ));
            }
            let ours = agent.programs();
            let (_, code) = agent.stop().expect("stop");
            assert_eq!(code, Some(0), "SIGTERM ends the agent with 0");
            let left = still_loaded(ours.iter().chain(&killed));
            if !left.is_empty() || !clsact_filters(&lab).is_empty() {
                failures.push(format!(
                    "after the last stop: programs {left:?} loaded, filters {:?}",
                    clsact_filters(&lab)
                ));
            }
        } else {
            killed.extend(agent.programs());
            // Dropping the handle kills the agent with SIGKILL: no chance to detach.
            drop(agent);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    lab.down().expect("lab down");
}
