//! `cargo xtask bench veth`: what the tracer costs real traffic. iperf3 between two pods of the
//! lab node (pod-a → pod-b: two pod veths, so two hooks per packet), with no program attached
//! and with the agent attached (tcx), in interleaved rounds; the medians are compared.
//!
//! UDP with 64-byte datagrams sent as fast as the client can measures packets per second
//! received (the small-packet worst case); TCP measures bulk throughput, where GRO makes the
//! programs run far less often than once per wire packet.
use std::{process::Command, time::Duration};

use anyhow::{Context as _, bail};
use serde::Serialize;

use tracer_lab::{
    agent::{LabAgent, context_flags},
    build,
    lab::{EndpointMode, Lab},
    run::command_output,
};

/// Rounds per state (odd: the median is one of them).
const ROUNDS: usize = 5;
/// Seconds per iperf3 run.
const SECONDS: u32 = 3;
/// Goal: packets per second lost to the tracer, in percent of the baseline.
const MAX_PPS_LOSS_PERCENT: f64 = 10.0;
const IPERF_PORT: &str = "5201";

#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Round {
    udp_pps: f64,
    tcp_bits_per_second: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    rounds: usize,
    seconds_per_run: u32,
    none: Vec<Round>,
    tracer: Vec<Round>,
    median_udp_pps_none: f64,
    median_udp_pps_tracer: f64,
    udp_pps_loss_percent: f64,
    median_tcp_gbps_none: f64,
    median_tcp_gbps_tracer: f64,
    tcp_change_percent: f64,
    /// The spread (max − min) of the baseline's TCP rounds, in percent of its median: what
    /// "within noise" means for this run.
    tcp_noise_percent: f64,
}

pub fn veth(check: bool, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    // The release agent at its default poll interval: its own CPU competes with iperf3 on a
    // small machine, as it would on a node.
    let tracer = build::agent_release()?;
    let lab = crate::lab_in(EndpointMode::Public)?;
    let server = lab.facts().pod_ips["pod-b"].to_string();
    lab.spawn_in(
        "pod-b",
        "iperf3-server",
        &["iperf3", "--server", "--port", IPERF_PORT],
    )?;
    std::thread::sleep(Duration::from_millis(300));

    let (mut none, mut traced) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        eprintln!("bench veth: round {round}/{ROUNDS}, no program attached");
        none.push(measure(&lab, &server)?);
        eprintln!("bench veth: round {round}/{ROUNDS}, agent attached");
        let mut agent = LabAgent::start_with(&lab, &tracer, context_flags(&lab))?;
        agent.wait_ready(Duration::from_secs(15))?;
        traced.push(measure(&lab, &server)?);
        agent.stop()?;
    }
    let report = summarize(none, traced);
    lab.down()?;
    print(&report);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if check && report.udp_pps_loss_percent > MAX_PPS_LOSS_PERCENT {
        bail!(
            "the tracer costs {:.1} % of UDP packets per second (goal ≤ {MAX_PPS_LOSS_PERCENT} %)",
            report.udp_pps_loss_percent
        );
    }
    Ok(())
}

fn measure(lab: &Lab, server: &str) -> anyhow::Result<Round> {
    let udp = iperf(lab, server, &["--udp", "--bitrate", "0", "--length", "64"])?;
    let sum = &udp["end"]["sum"];
    let (packets, lost, seconds) = (
        sum["packets"].as_f64(),
        sum["lost_packets"].as_f64(),
        sum["seconds"].as_f64(),
    );
    let (Some(packets), Some(lost), Some(seconds)) = (packets, lost, seconds) else {
        bail!("iperf3 UDP report without packets/lost_packets/seconds: {sum}");
    };
    let tcp = iperf(lab, server, &[])?;
    let Some(bits) = tcp["end"]["sum_received"]["bits_per_second"].as_f64() else {
        bail!("iperf3 TCP report without end.sum_received.bits_per_second");
    };
    Ok(Round {
        udp_pps: (packets - lost) / seconds,
        tcp_bits_per_second: bits,
    })
}

fn iperf(lab: &Lab, server: &str, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
    let seconds = SECONDS.to_string();
    let mut command: Command = lab.command_in("pod-a", "iperf3");
    command
        .args(["--client", server, "--port", IPERF_PORT, "--json", "--time"])
        .arg(&seconds)
        .args(extra);
    let output = command_output(&mut command)?;
    serde_json::from_str(&output).context("iperf3 --json output")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn summarize(none: Vec<Round>, tracer: Vec<Round>) -> Report {
    let udp = |rounds: &[Round]| median(rounds.iter().map(|r| r.udp_pps).collect());
    let tcp = |rounds: &[Round]| median(rounds.iter().map(|r| r.tcp_bits_per_second).collect());
    let (udp_none, udp_tracer) = (udp(&none), udp(&tracer));
    let (tcp_none, tcp_tracer) = (tcp(&none), tcp(&tracer));
    let tcp_rounds = none.iter().map(|r| r.tcp_bits_per_second);
    let spread = tcp_rounds.clone().fold(f64::MIN, f64::max) - tcp_rounds.fold(f64::MAX, f64::min);
    Report {
        rounds: none.len(),
        seconds_per_run: SECONDS,
        median_udp_pps_none: udp_none,
        median_udp_pps_tracer: udp_tracer,
        udp_pps_loss_percent: (1.0 - udp_tracer / udp_none) * 100.0,
        median_tcp_gbps_none: tcp_none / 1e9,
        median_tcp_gbps_tracer: tcp_tracer / 1e9,
        tcp_change_percent: (tcp_tracer / tcp_none - 1.0) * 100.0,
        tcp_noise_percent: spread / tcp_none * 100.0,
        none,
        tracer,
    }
}

fn print(report: &Report) {
    println!("| traffic | no program | tracer (tcx) | change | goal |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| UDP 64 B, packets/s received | {:.0} | {:.0} | {:+.1} % | loss ≤ {MAX_PPS_LOSS_PERCENT} % |",
        report.median_udp_pps_none, report.median_udp_pps_tracer, -report.udp_pps_loss_percent
    );
    println!(
        "| TCP bulk, Gbit/s | {:.2} | {:.2} | {:+.1} % | within noise (baseline spread {:.1} %) |",
        report.median_tcp_gbps_none,
        report.median_tcp_gbps_tracer,
        report.tcp_change_percent,
        report.tcp_noise_percent
    );
}
