//! `cargo xtask bench attach`: how fast the agent takes hold of a busy node. 250 pods are
//! plumbed on the lab node before the agent starts (goal: all attached within 2 s of the
//! agent's start); the agent is killed and started again over its pins (a DaemonSet update or
//! a crash with `--pin-path`; same goal); then 200 more pods churn at 20 per second, and 200
//! at 10 per second (goal: p99 ≤ 100 ms from a veth's creation to the agent holding both its
//! tcx links); last, SIGTERM detaches everything (goal: within 2 s).
//!
//! The baseline, measured in the same run, is the kernel's RCU grace period: each tcx attach
//! waits for one while holding the RTNL lock, so attaches are serial and `links × grace
//! period` is a floor no user space can go under.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use tracer_lab::{
    agent::{self, LabAgent},
    build, churn,
    lab::{Bpffs, EndpointMode, Lab, exec},
};

const STARTUP_PODS: u32 = 250;
const CHURNED_PODS: u32 = 200;
/// The goal's rate, and the rate the suite's hot-plug test holds.
const CHURN_EVERY: [Duration; 2] = [Duration::from_millis(50), Duration::from_millis(100)];
const STARTUP_GOAL: Duration = Duration::from_secs(2);
const CHURN_P99_GOAL: Duration = Duration::from_millis(100);
const STOP_GOAL: Duration = Duration::from_secs(2);
/// Back to back, as the attaches wait for them: one varies from 2 to 5 ticks (HZ=250).
const GRACE_PERIODS: u32 = 100;

#[derive(Serialize)]
struct Report {
    /// Mean of `membarrier(MEMBARRIER_CMD_GLOBAL)` back to back, each one `synchronize_rcu()`.
    grace_period_ms: f64,
    startup_pods: u32,
    startup_links: usize,
    startup_seconds: f64,
    /// `startup_links × grace_period_ms`: the serial attaches' floor.
    startup_floor_seconds: f64,
    /// From the successor's start to every pinned link running its program.
    restart_seconds: f64,
    churn: Vec<ChurnReport>,
    /// SIGTERM to exit, detaching the start-up links (each release waits a grace period too).
    stop_seconds: f64,
}

#[derive(Serialize)]
struct ChurnReport {
    pods: u32,
    rate_per_second: f64,
    /// None (null) when that many pods were deleted before the agent attached to them.
    attach_p50_ms: Option<f64>,
    attach_p99_ms: Option<f64>,
    attach_max_ms: Option<f64>,
    never_attached: usize,
}

pub fn attach(check: bool, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    let tracer = build::agent()?;
    let lab = crate::lab_in(EndpointMode::Public)?;
    let bpffs = Bpffs::mount(&lab)?;
    eprintln!("bench attach: plumbing {STARTUP_PODS} pods before the agent starts");
    for n in 0..STARTUP_PODS {
        // Addresses after the churned pods'.
        let first = CHURN_EVERY.len() as u32 * CHURNED_PODS;
        lab.plug_pod(&churn::pod_name("st", n), churn::pod_ip(first + n))?;
    }
    let links = 2 * matching_interfaces(&lab)?;
    let grace_period = grace_period()?;
    let mut flags = agent::quick_flags();
    flags.extend(agent::context_flags(&lab));
    flags.extend(agent::restart_flags(&lab, &bpffs));

    let newest = churn::newest_link_id();
    let started = Instant::now();
    let mut agent = LabAgent::start_with(&lab, &tracer, flags.clone())?;
    let startup = until(&agent, started, "new links settled", links, || {
        churn::settled_links_after(newest)
    })?;
    agent.wait_ready(Duration::from_secs(15))?;
    eprintln!("bench attach: killing the agent and starting it again over its pins");
    let killed: BTreeSet<u64> = agent.programs().into_iter().collect();
    // Dropping the handle kills the agent with SIGKILL: its links stay, pinned.
    drop(agent);
    let restarted = Instant::now();
    agent = LabAgent::start_with(&lab, &tracer, flags)?;
    let restart = until(
        &agent,
        restarted,
        "links moved to its programs",
        links,
        || {
            agent
                .linked_programs()
                .iter()
                .filter(|program| !killed.contains(program))
                .count()
        },
    )?;
    agent.wait_ready(Duration::from_secs(15))?;

    let mut churned = Vec::new();
    for (round, every) in CHURN_EVERY.into_iter().enumerate() {
        let rate = 1.0 / every.as_secs_f64();
        eprintln!("bench attach: churning {CHURNED_PODS} pods at {rate:.0}/s beside them");
        let first = round as u32 * CHURNED_PODS;
        churned.push(churn::run(&lab, &agent, first, CHURNED_PODS, every)?);
    }
    eprintln!("bench attach: stopping the agent (SIGTERM detaches every link)");
    let (stop, _) = agent.stop()?;
    drop(bpffs);
    lab.down()?;

    let ms = |latency: Option<Duration>| latency.map(|d| d.as_secs_f64() * 1000.0);
    let report = Report {
        grace_period_ms: grace_period.as_secs_f64() * 1000.0,
        startup_pods: STARTUP_PODS,
        startup_links: links,
        startup_seconds: startup.as_secs_f64(),
        startup_floor_seconds: links as f64 * grace_period.as_secs_f64(),
        restart_seconds: restart.as_secs_f64(),
        churn: churned
            .iter()
            .map(|run| ChurnReport {
                pods: run.pods,
                rate_per_second: run.rate,
                attach_p50_ms: ms(run.percentile(0.5)),
                attach_p99_ms: ms(run.percentile(0.99)),
                attach_max_ms: ms(run.percentile(1.0)),
                never_attached: run.never_attached(),
            })
            .collect(),
        stop_seconds: stop.as_secs_f64(),
    };
    println!("| what | measured | goal |");
    println!("| --- | --- | --- |");
    println!(
        "| baseline: one RCU grace period (mean of {GRACE_PERIODS} back to back) | {:.1} ms | |",
        report.grace_period_ms
    );
    println!(
        "| start-up: {} tcx links ({STARTUP_PODS} pod veths and the ENIs) | {:.2} s = {:.2} × links × grace period | ≤ 2 s |",
        report.startup_links,
        report.startup_seconds,
        report.startup_seconds / report.startup_floor_seconds
    );
    println!(
        "| restart over the pins (SIGKILL, then a new agent) | {:.2} s | ≤ 2 s |",
        report.restart_seconds
    );
    let show = |ms: Option<f64>| ms.map_or("never".to_owned(), |ms| format!("{ms:.1}"));
    for run in &report.churn {
        println!(
            "| churn: {} pods at {:.1}/s, attach latency p50 / p99 / max ({} never attached) | {} / {} / {} ms | p99 ≤ 100 ms |",
            run.pods,
            run.rate_per_second,
            run.never_attached,
            show(run.attach_p50_ms),
            show(run.attach_p99_ms),
            show(run.attach_max_ms)
        );
    }
    println!(
        "| stop: SIGTERM to exit, {} links detached | {:.2} s | ≤ 2 s (hardening: shutdown) |",
        report.startup_links, report.stop_seconds
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let goal_rate = &churned[0];
    let churn_met = goal_rate
        .percentile(0.99)
        .is_some_and(|p99| p99 <= CHURN_P99_GOAL);
    if check && (startup > STARTUP_GOAL || restart > STARTUP_GOAL || stop > STOP_GOAL || !churn_met)
    {
        bail!("attach goals missed: {}", goal_rate.summary());
    }
    Ok(())
}

/// Waits until `count` reaches `wanted`; returns the time since `since`. Counting is slow
/// on purpose (every 20 ms): a tcx link's `fdinfo` takes the RTNL lock, which the attaches
/// being timed wait for.
fn until(
    agent: &LabAgent,
    since: Instant,
    what: &str,
    wanted: usize,
    count: impl Fn() -> usize,
) -> anyhow::Result<Duration> {
    loop {
        let counted = count();
        if counted >= wanted {
            return Ok(since.elapsed());
        }
        if since.elapsed() > Duration::from_secs(30) {
            bail!(
                "after 30 s, {counted} of {wanted} {what}:\n{}",
                agent.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One RCU grace period on this machine, now: `membarrier(MEMBARRIER_CMD_GLOBAL)` is
/// `synchronize_rcu()` on a machine with more than one CPU, the wait every tcx attach makes.
fn grace_period() -> anyhow::Result<Duration> {
    /// From `linux/membarrier.h` (the libc crate does not export it).
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    let started = Instant::now();
    for _ in 0..GRACE_PERIODS {
        // SAFETY: membarrier takes two integers and touches no memory of ours.
        let result = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
        if result != 0 {
            bail!(
                "membarrier(MEMBARRIER_CMD_GLOBAL) failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(started.elapsed() / GRACE_PERIODS)
}

/// Interfaces of the lab node that the agent's default patterns select (eni*, vlan*, eth*,
/// ens*).
fn matching_interfaces(lab: &Lab) -> anyhow::Result<usize> {
    let listing = exec::ip(&lab.ns("node"), "-o link show")?;
    Ok(listing
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name))
        .filter(|name| {
            ["eni", "vlan", "eth", "ens"]
                .iter()
                .any(|p| name.starts_with(p))
        })
        .count())
}
