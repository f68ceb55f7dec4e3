//! `cargo xtask demo`: the lab node with the live agent, traffic on every path, and what the
//! agent made of it.
use std::{collections::BTreeMap, path::Path, time::Duration};

use tracer_lab::{
    agent::LabAgent,
    build,
    lab::{self, EndpointMode, Lab},
    run,
    scrape::{self, Sample},
    tmux::Tmux,
};

use crate::setup;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// API server endpoint access mode of the lab cluster.
    #[arg(long, default_value = "public-private")]
    mode: EndpointMode,
    /// Leave the lab and the agent running afterwards, for exploration.
    #[arg(long)]
    keep: bool,
}

pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    setup::setup()?;
    let tracer = build::agent()?;
    let mut lab = crate::lab_in(args.mode)?;
    let mut agent = LabAgent::start(&lab, &tracer)?;
    agent.wait_ready(Duration::from_secs(15))?;
    eprintln!(
        "demo: agent ready; driving traffic on every path ({} mode)",
        args.mode
    );
    let sent = lab.run_traffic(&lab::scenarios(args.mode))?;
    // Two polls: one to see the connections, one for those waiting on conntrack.
    std::thread::sleep(Duration::from_millis(800));
    let samples = agent.scrape()?;
    println!("\n=== raw /metrics (tracer_* families) ===");
    for line in agent
        .metrics_text()?
        .lines()
        .filter(|line| line.contains("tracer_"))
    {
        println!("{line}");
    }
    println!(
        "\n=== what the agent saw, per path ({} mode) ===",
        args.mode
    );
    print_paths(&samples, &sent);
    show_explain(&lab, &tracer)?;
    show_top(&lab, &tracer, args.mode)?;
    if args.keep {
        lab.keep();
        agent.keep_running();
        println!(
            "\nLeft running. Explore with:\n  ip netns exec {ns} {tracer} top\n  ip netns exec {ns} curl -s http://{addr}/api/v1/paths\n  cargo xtask lab traffic\n  cargo xtask lab mode private\nTear down with: cargo xtask lab down",
            tracer = tracer.display(),
            ns = lab.ns("node"),
            addr = tracer_lab::agent::METRICS_ADDR
        );
        return Ok(());
    }
    let (took, code) = agent.stop()?;
    eprintln!("demo: agent stopped in {took:?} (exit code {code:?})");
    lab.down()
}

/// `tracer explain` for a pod reaching the API server through the `kubernetes` ClusterIP, with
/// the lab's context flags: the rule and the facts behind the label.
fn show_explain(lab: &Lab, tracer: &Path) -> anyhow::Result<()> {
    let facts = lab.facts();
    let (pod, service) = (facts.pod_ips["pod-a"], facts.kubernetes_service_ip);
    println!("\n=== tracer explain {pod} {service}:443 ===");
    let mut command = lab.command_in("node", &tracer.to_string_lossy());
    command
        .args(["explain", &pod.to_string(), &format!("{service}:443")])
        .args(tracer_lab::agent::context_flags(lab));
    print!("{}", run::command_output(&mut command)?);
    Ok(())
}

/// `tracer top` in a real terminal (tmux) in the node namespace, reading the agent, while a
/// second round of traffic runs; prints the screen once most paths show a rate.
fn show_top(lab: &Lab, tracer: &Path, mode: EndpointMode) -> anyhow::Result<()> {
    let terminal = Tmux::start("demo", 120, 46)?;
    terminal.type_line(&format!(
        "ip netns exec {} {} top --interval 2s",
        lab.ns("node"),
        tracer.display()
    ))?;
    lab.run_traffic(&lab::scenarios(mode))?;
    // Rates are over the last 2 s: the refresh after the traffic shows most paths moving.
    let moving = |screen: &str| {
        screen
            .lines()
            .filter(|line| line.contains("_to_") && line.contains('k'))
            .count()
            >= 8
    };
    let screen = terminal
        .wait_for("paths with rates", Duration::from_secs(5), moving)
        .or_else(|_| terminal.screen())?;
    terminal.press(&["q"])?;
    println!("\n=== tracer top (agent mode, right after a second round of traffic) ===");
    println!("{screen}");
    Ok(())
}

/// One row per classified path: what the scenarios sent next to what the agent counted.
fn print_paths(samples: &[Sample], sent: &[lab::Sent]) {
    let mut sent_by_path: BTreeMap<&str, u64> = BTreeMap::new();
    for scenario in sent {
        *sent_by_path
            .entry(scenario.expected_path.as_str())
            .or_default() += scenario.payload_bytes;
    }
    let mut rows: BTreeMap<(String, String, String), [f64; 4]> = BTreeMap::new();
    for sample in samples {
        let column = match (
            sample.name.as_str(),
            sample.labels.get("direction").map(String::as_str),
        ) {
            ("tracer_path_bytes_total", Some("forward")) => 0,
            ("tracer_path_bytes_total", Some("reply")) => 1,
            ("tracer_path_packets_total", Some("forward")) => 2,
            ("tracer_path_flows_total", None) => 3,
            _ => continue,
        };
        let label = |name: &str| sample.labels.get(name).cloned().unwrap_or_default();
        rows.entry((label("path"), label("nat"), label("endpoint")))
            .or_default()[column] += sample.value;
    }
    println!(
        "{:<24} {:<5} {:<8} {:>12} {:>12} {:>10} {:>9} {:>6}",
        "path", "nat", "endpoint", "sent payload", "fwd bytes", "reply bytes", "fwd pkts", "flows"
    );
    for ((path, nat, endpoint), [fwd_bytes, reply_bytes, fwd_packets, flows]) in &rows {
        let sent = sent_by_path
            .get(path.as_str())
            .map_or("-".to_owned(), u64::to_string);
        println!(
            "{path:<24} {nat:<5} {endpoint:<8} {sent:>12} {fwd_bytes:>12} {reply_bytes:>10} {fwd_packets:>9} {flows:>6}"
        );
    }
    let missing: Vec<&str> = sent_by_path
        .keys()
        .filter(|path| scrape::sum(samples, "tracer_path_flows_total", &[("path", path)]) == 0.0)
        .copied()
        .collect();
    if !missing.is_empty() {
        println!(
            "paths the scenarios used but the agent did not report: {}",
            missing.join(", ")
        );
    }
}
