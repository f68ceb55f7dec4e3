//! `cargo xtask bench attach`: how fast the agent takes hold of a busy node, in each attach
//! mode, against the goals of issue 16. 256 pods are plumbed on the lab node first.
//!
//! - tcx: the agent starts (goal: ≤ 1.3 × links × one RCU grace period), is killed and started
//!   again over its pins (goal: ≤ 2 s), holds 200 new pods at 10 per second (goal: p99 ≤ 100 ms
//!   from a veth's creation to the agent holding both its links), and stops (SIGTERM detaches).
//! - clsact: the agent starts (goal: ≤ 1 s), holds 200 new pods at 20 per second (goal: p99
//!   ≤ 50 ms), and moves its filter back in front of 200 foreign filters added at priority 1,
//!   handle 1, as the VPC CNI's network-policy agent adds its own (goal: p99 ≤ 10 ms from the
//!   foreign filter's notification to the agent's).
//!
//! The baseline, measured in the same run, is the kernel's RCU grace period: each tcx attach
//! waits for one while holding the RTNL lock, so attaches are serial and `links × grace
//! period` is a floor no user space can go under. For each churn, the agent's own time in its
//! attaches per new pod (`tracer_attach_duration_seconds`: an upper bound of its RTNL time, the
//! wait for the lock included).
use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use tracer_lab::{
    agent::{self, LabAgent},
    build,
    churn::{self, Churn, FilterSeen, Hold, NetlinkWatch},
    lab::{Bpffs, EndpointMode, Lab, exec},
    scrape,
};

const STARTUP_PODS: u32 = 256;
const CHURNED_PODS: u32 = 200;
const TCX_CHURN_EVERY: Duration = Duration::from_millis(100);
const CLSACT_CHURN_EVERY: Duration = Duration::from_millis(50);
/// Foreign filters added, spread over this many pod veths and both hooks.
const REORDERS: usize = 200;
const REORDER_VETHS: usize = 10;
/// Goals: tcx start-up in grace periods per link, restart, churn p99s, clsact start-up,
/// reorder p99.
const TCX_STARTUP_GOAL: f64 = 1.3;
const RESTART_GOAL: Duration = Duration::from_secs(2);
const TCX_CHURN_P99_GOAL: Duration = Duration::from_millis(100);
const CLSACT_STARTUP_GOAL: Duration = Duration::from_secs(1);
const CLSACT_CHURN_P99_GOAL: Duration = Duration::from_millis(50);
const REORDER_P99_GOAL: Duration = Duration::from_millis(10);
/// Back to back, as the attaches wait for them: one varies from 2 to 5 ticks (HZ=250).
const GRACE_PERIODS: u32 = 100;
/// The foreign filter's place: the VPC CNI's network-policy agent's.
const FOREIGN_HANDLE: u32 = 1;

#[derive(Serialize)]
struct Report {
    /// Mean of `membarrier(MEMBARRIER_CMD_GLOBAL)` back to back, each one `synchronize_rcu()`.
    grace_period_ms: f64,
    startup_pods: u32,
    startup_links: usize,
    tcx_startup_seconds: f64,
    /// `startup_links × grace_period_ms`: the serial attaches' floor.
    startup_floor_seconds: f64,
    /// From the successor's start to every pinned link running its program.
    restart_seconds: f64,
    tcx_churn: ChurnReport,
    /// SIGTERM to exit, detaching the start-up links (each release waits a grace period too).
    tcx_stop_seconds: f64,
    /// To the last of the agent's filters on both hooks of every interface.
    clsact_startup_seconds: f64,
    clsact_churn: ChurnReport,
    reorder_p50_ms: Option<f64>,
    reorder_p99_ms: Option<f64>,
    reorder_max_ms: Option<f64>,
    /// `tracer_attach_reorders_total` at the end: one per foreign filter.
    reorders_counted: f64,
    clsact_stop_seconds: f64,
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
    /// The agent's own time in its attaches per new pod, both hooks.
    agent_attach_ms_per_pod: f64,
}

fn ms(latency: Option<Duration>) -> Option<f64> {
    latency.map(|d| d.as_secs_f64() * 1000.0)
}

pub fn attach(check: bool, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    let tracer = build::agent()?;
    let lab = crate::lab_in(EndpointMode::Public)?;
    let bpffs = Bpffs::mount(&lab)?;
    eprintln!("bench attach: plumbing {STARTUP_PODS} pods before the agent starts");
    let mut startup_veths = Vec::new();
    for n in 0..STARTUP_PODS {
        // Addresses after the churned pods'.
        let first = 2 * CHURNED_PODS;
        startup_veths.push(lab.plug_pod(&churn::pod_name("st", n), churn::pod_ip(first + n))?);
    }
    let interfaces = matching_interfaces(&lab)?;
    let links = 2 * interfaces;
    let grace_period = grace_period()?;
    let mut flags = agent::quick_flags();
    flags.extend(agent::context_flags(&lab));

    eprintln!("bench attach: tcx");
    let mut tcx_flags = flags.clone();
    tcx_flags.extend(agent::restart_flags(&lab, &bpffs));
    tcx_flags.extend(["--attach-mode".into(), "tcx".into()]);
    let newest = churn::newest_link_id();
    let started = Instant::now();
    let mut agent = LabAgent::start_with(&lab, &tracer, tcx_flags.clone())?;
    let tcx_startup = until(&agent, started, "new links settled", links, || {
        churn::settled_links_after(newest)
    })?;
    agent.wait_ready(Duration::from_secs(15))?;
    eprintln!("bench attach: killing the agent and starting it again over its pins");
    let killed: BTreeSet<u64> = agent.programs().into_iter().collect();
    // Dropping the handle kills the agent with SIGKILL: its links stay, pinned.
    drop(agent);
    let restarted = Instant::now();
    agent = LabAgent::start_with(&lab, &tracer, tcx_flags)?;
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
    let tcx_churn = churn_timed(&lab, &agent, 0, TCX_CHURN_EVERY, Hold::TcxLinks)?;
    eprintln!("bench attach: stopping the agent (SIGTERM detaches every link)");
    let (tcx_stop, _) = agent.stop()?;

    eprintln!("bench attach: clsact");
    let mut clsact_flags = flags;
    clsact_flags.extend(["--attach-mode".into(), "clsact".into()]);
    let watch = NetlinkWatch::start(&lab.ns("node"), true)?;
    let started = Instant::now();
    let mut agent = LabAgent::start_with(&lab, &tracer, clsact_flags)?;
    let clsact_startup = until(&agent, started, "interfaces held", interfaces, || {
        churn::both_hooks(&watch.filters()).len()
    })?;
    watch.finish()?;
    agent.wait_ready(Duration::from_secs(15))?;
    let clsact_churn = churn_timed(
        &lab,
        &agent,
        CHURNED_PODS,
        CLSACT_CHURN_EVERY,
        Hold::ClsactFilters,
    )?;
    eprintln!("bench attach: {REORDERS} foreign filters added ahead of the agent's");
    let mut reorders = reorder_latencies(&lab, &startup_veths[..REORDER_VETHS])?;
    reorders.sort();
    let reorders_counted = scrape::sum(&agent.scrape()?, "tracer_attach_reorders_total", &[]);
    let (clsact_stop, _) = agent.stop()?;
    drop(bpffs);
    lab.down()?;

    let percentile = |fraction: f64| {
        let at = ((reorders.len() as f64 * fraction).ceil() as usize).clamp(1, reorders.len());
        reorders.get(at - 1).copied()
    };
    let report = Report {
        grace_period_ms: grace_period.as_secs_f64() * 1000.0,
        startup_pods: STARTUP_PODS,
        startup_links: links,
        tcx_startup_seconds: tcx_startup.as_secs_f64(),
        startup_floor_seconds: links as f64 * grace_period.as_secs_f64(),
        restart_seconds: restart.as_secs_f64(),
        tcx_churn: tcx_churn.report(),
        tcx_stop_seconds: tcx_stop.as_secs_f64(),
        clsact_startup_seconds: clsact_startup.as_secs_f64(),
        clsact_churn: clsact_churn.report(),
        reorder_p50_ms: ms(percentile(0.5)),
        reorder_p99_ms: ms(percentile(0.99)),
        reorder_max_ms: ms(percentile(1.0)),
        reorders_counted,
        clsact_stop_seconds: clsact_stop.as_secs_f64(),
    };
    print_table(&report);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let within = |measured: Option<Duration>, goal: Duration| measured.is_some_and(|m| m <= goal);
    let missed: Vec<&str> = [
        (
            report.tcx_startup_seconds <= TCX_STARTUP_GOAL * report.startup_floor_seconds,
            "tcx start-up",
        ),
        (restart <= RESTART_GOAL, "restart over the pins"),
        (
            within(tcx_churn.churn.percentile(0.99), TCX_CHURN_P99_GOAL),
            "tcx hot-plug p99",
        ),
        (clsact_startup <= CLSACT_STARTUP_GOAL, "clsact start-up"),
        (
            within(clsact_churn.churn.percentile(0.99), CLSACT_CHURN_P99_GOAL),
            "clsact hot-plug p99",
        ),
        (
            within(percentile(0.99), REORDER_P99_GOAL) && reorders.len() == REORDERS,
            "reorder p99",
        ),
    ]
    .into_iter()
    .filter(|(met, _)| !met)
    .map(|(_, goal)| goal)
    .collect();
    if check && !missed.is_empty() {
        bail!("attach goals missed: {}", missed.join(", "));
    }
    Ok(())
}

/// A churn and the agent's own attach time over it.
struct TimedChurn {
    churn: Churn,
    agent_attach_per_pod: Duration,
}

impl TimedChurn {
    fn report(&self) -> ChurnReport {
        ChurnReport {
            pods: self.churn.pods,
            rate_per_second: self.churn.rate,
            attach_p50_ms: ms(self.churn.percentile(0.5)),
            attach_p99_ms: ms(self.churn.percentile(0.99)),
            attach_max_ms: ms(self.churn.percentile(1.0)),
            never_attached: self.churn.never_attached(),
            agent_attach_ms_per_pod: self.agent_attach_per_pod.as_secs_f64() * 1000.0,
        }
    }
}

/// `CHURNED_PODS` pods at one every `every` (numbered from `first`), with the agent's own
/// attach time per pod from `tracer_attach_duration_seconds`.
fn churn_timed(
    lab: &Lab,
    agent: &LabAgent,
    first: u32,
    every: Duration,
    hold: Hold,
) -> anyhow::Result<TimedChurn> {
    let rate = 1.0 / every.as_secs_f64();
    eprintln!("bench attach: churning {CHURNED_PODS} pods at {rate:.0}/s beside them");
    let attach_time = |samples: &[scrape::Sample]| {
        (
            scrape::sum(samples, "tracer_attach_duration_seconds_sum", &[]),
            scrape::sum(samples, "tracer_attach_duration_seconds_count", &[]),
        )
    };
    let (took_before, count_before) = attach_time(&agent.scrape()?);
    let churn = churn::run(lab, agent, first, CHURNED_PODS, every, hold)?;
    let (took_after, count_after) = attach_time(&agent.scrape()?);
    let attaches = (count_after - count_before).max(1.0);
    Ok(TimedChurn {
        churn,
        agent_attach_per_pod: Duration::from_secs_f64((took_after - took_before) / attaches),
    })
}

/// Adds a foreign filter at priority 1, handle 1 (a classic BPF one returning 0, of the
/// `bpf` kind as the policy agent's, so that it shares the agent's priority) on each of
/// `veths` and hooks in turn, waits for the agent's filter to come back in front, and removes
/// the foreign one again. Returns, per foreign filter, the time from its notification to the
/// agent's.
fn reorder_latencies(lab: &Lab, veths: &[String]) -> anyhow::Result<Vec<Duration>> {
    let node = lab.ns("node");
    let watch = NetlinkWatch::start(&node, true)?;
    let tc = |args: &[&str]| -> anyhow::Result<()> {
        let status = exec::in_ns(&node, "tc").args(args).status()?;
        if !status.success() {
            bail!("tc {}: {status}", args.join(" "));
        }
        Ok(())
    };
    let handle = FOREIGN_HANDLE.to_string();
    for n in 0..REORDERS {
        let veth = veths[n % veths.len()].as_str();
        let hook = if (n / veths.len()).is_multiple_of(2) {
            "ingress"
        } else {
            "egress"
        };
        let place = [
            "dev", veth, hook, "prio", "1", "handle", &handle, "protocol", "all",
        ];
        let seen_before = watch.filters().len();
        tc(&[
            ["filter", "add"].as_slice(),
            &place,
            &["bpf", "bytecode", "1,6 0 0 0,"],
        ]
        .concat())?;
        // The foreign filter's notification, then the agent's: a second one past those before.
        let waited = Instant::now();
        while watch.filters().len() < seen_before + 2 && waited.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(1));
        }
        tc(&[["filter", "del"].as_slice(), &place, &["bpf"]].concat())?;
    }
    let (_, filters) = watch.finish()?;
    Ok(front_again(&filters))
}

/// For each foreign filter (priority 1, `FOREIGN_HANDLE`), the time until the next filter on
/// the same hook under another handle: the agent's, back in front.
fn front_again(filters: &[FilterSeen]) -> Vec<Duration> {
    let mut pending: HashMap<(u64, bool), Instant> = HashMap::new();
    let mut latencies = Vec::new();
    for filter in filters {
        let hook = (filter.index, filter.egress);
        if filter.priority == 1 && filter.handle == FOREIGN_HANDLE {
            pending.insert(hook, filter.at);
        } else if let Some(added) = pending.remove(&hook) {
            latencies.push(filter.at.saturating_duration_since(added));
        }
    }
    latencies
}

fn print_table(report: &Report) {
    let show = |ms: Option<f64>| ms.map_or("never".to_owned(), |ms| format!("{ms:.1}"));
    let churn_row = |mode: &str, run: &ChurnReport, goal: Duration| {
        println!(
            "| {mode} hot-plug: {} pods at {:.1}/s, p50 / p99 / max ({} never attached) | {} / {} / {} ms | p99 ≤ {} ms |",
            run.pods,
            run.rate_per_second,
            run.never_attached,
            show(run.attach_p50_ms),
            show(run.attach_p99_ms),
            show(run.attach_max_ms),
            goal.as_millis()
        );
        println!(
            "| {mode}: the agent's own attach time per new pod (both hooks; its RTNL time, the wait for the lock included) | {:.2} ms | reported |",
            run.agent_attach_ms_per_pod
        );
    };
    println!("| what | measured | goal |");
    println!("| --- | --- | --- |");
    println!(
        "| baseline: one RCU grace period (mean of {GRACE_PERIODS} back to back) | {:.1} ms | |",
        report.grace_period_ms
    );
    println!(
        "| tcx start-up: {} links ({} pod veths and the ENIs) | {:.2} s = {:.2} × links × grace period | ≤ {TCX_STARTUP_GOAL} × links × grace period |",
        report.startup_links,
        report.startup_pods,
        report.tcx_startup_seconds,
        report.tcx_startup_seconds / report.startup_floor_seconds
    );
    println!(
        "| tcx restart over the pins (SIGKILL, then a new agent), {} pods | {:.2} s | ≤ {} s |",
        report.startup_pods,
        report.restart_seconds,
        RESTART_GOAL.as_secs()
    );
    churn_row("tcx", &report.tcx_churn, TCX_CHURN_P99_GOAL);
    println!(
        "| tcx stop: SIGTERM to exit, {} links detached | {:.2} s | |",
        report.startup_links, report.tcx_stop_seconds
    );
    println!(
        "| clsact start-up: {} links | {:.2} s | ≤ {} s |",
        report.startup_links,
        report.clsact_startup_seconds,
        CLSACT_STARTUP_GOAL.as_secs()
    );
    churn_row("clsact", &report.clsact_churn, CLSACT_CHURN_P99_GOAL);
    println!(
        "| clsact: back in front of a foreign priority-1 filter, p50 / p99 / max ({REORDERS} added; {} counted in tracer_attach_reorders_total) | {} / {} / {} ms | p99 ≤ {} ms |",
        report.reorders_counted,
        show(report.reorder_p50_ms),
        show(report.reorder_p99_ms),
        show(report.reorder_max_ms),
        REORDER_P99_GOAL.as_millis()
    );
    println!(
        "| clsact stop: SIGTERM to exit | {:.2} s | |",
        report.clsact_stop_seconds
    );
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
