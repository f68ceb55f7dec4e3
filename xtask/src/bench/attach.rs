//! `cargo xtask bench attach`: how fast the agent takes hold of a busy node. 250 pods are
//! plumbed on the lab node before the agent starts (goal: all attached within 2 s of the
//! agent's start), then 200 more churn at 20 per second (goal: p99 ≤ 100 ms from a veth's
//! creation to the agent holding both its tcx links).
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::{
    agent::LabAgent,
    build, churn,
    lab::{EndpointMode, Lab, LabOptions, exec},
};

const STARTUP_PODS: u32 = 250;
const CHURNED_PODS: u32 = 200;
const EVERY: Duration = Duration::from_millis(50);
const STARTUP_GOAL: Duration = Duration::from_secs(2);
const CHURN_P99_GOAL: Duration = Duration::from_millis(100);

#[derive(Serialize)]
struct Report {
    startup_pods: u32,
    startup_interfaces: usize,
    startup_seconds: f64,
    churned_pods: u32,
    churn_rate_per_second: f64,
    /// None (null) when that many pods were deleted before the agent attached to them.
    attach_p50_ms: Option<f64>,
    attach_p99_ms: Option<f64>,
    attach_max_ms: Option<f64>,
    never_attached: usize,
}

pub fn attach(check: bool, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    let tracer = build::agent()?;
    let lab = Lab::up(&LabOptions {
        mode: EndpointMode::Public,
        external_snat: false,
        helper_exe: std::env::current_exe()?,
    })?;
    eprintln!("bench attach: plumbing {STARTUP_PODS} pods before the agent starts");
    for n in 0..STARTUP_PODS {
        // Addresses after the churned pods'.
        lab.plug_pod(&churn::pod_name("st", n), churn::pod_ip(CHURNED_PODS + n))?;
    }
    let interfaces = matching_interfaces(&lab)?;
    let started = Instant::now();
    let mut agent = LabAgent::start(&lab, &tracer)?;
    while agent.linked_ifindexes().len() < 2 * interfaces {
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "after 30 s the agent holds {} of {} links:\n{}",
                agent.linked_ifindexes().len(),
                2 * interfaces,
                agent.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let startup = started.elapsed();
    agent.wait_ready(Duration::from_secs(15))?;
    eprintln!("bench attach: churning {CHURNED_PODS} pods at 20/s beside them");
    let churned = churn::run(&lab, &agent, CHURNED_PODS, EVERY)?;
    agent.stop()?;
    lab.down()?;

    let ms = |latency: Option<Duration>| latency.map(|d| d.as_secs_f64() * 1000.0);
    let report = Report {
        startup_pods: STARTUP_PODS,
        startup_interfaces: interfaces,
        startup_seconds: startup.as_secs_f64(),
        churned_pods: CHURNED_PODS,
        churn_rate_per_second: churned.rate,
        attach_p50_ms: ms(churned.percentile(0.5)),
        attach_p99_ms: ms(churned.percentile(0.99)),
        attach_max_ms: ms(churned.percentile(1.0)),
        never_attached: churned.never_attached(),
    };
    println!("| what | measured | goal |");
    println!("| --- | --- | --- |");
    println!(
        "| start-up: {} interfaces ({STARTUP_PODS} pod veths) attached | {:.2} s | ≤ 2 s |",
        report.startup_interfaces, report.startup_seconds
    );
    let show = |ms: Option<f64>| ms.map_or("never".to_owned(), |ms| format!("{ms:.1}"));
    println!(
        "| churn: {CHURNED_PODS} pods at {:.1}/s, attach latency p50 / p99 / max ({} never attached) | {} / {} / {} ms | p99 ≤ 100 ms |",
        report.churn_rate_per_second,
        report.never_attached,
        show(report.attach_p50_ms),
        show(report.attach_p99_ms),
        show(report.attach_max_ms)
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let churn_met = churned
        .percentile(0.99)
        .is_some_and(|p99| p99 <= CHURN_P99_GOAL);
    if check && (startup > STARTUP_GOAL || !churn_met) {
        bail!("attach goals missed: {}", churned.summary());
    }
    Ok(())
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
