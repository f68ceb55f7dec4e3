//! `cargo xtask lab …`: bring labs up and down, look at them, drive traffic, switch the
//! endpoint mode; and the hidden `serve` / `client` subcommands run inside the namespaces.
use std::{path::PathBuf, time::Instant};

use anyhow::bail;
use clap::Subcommand;
use tracer_common::labels::Endpoint;

use super::{
    CLUSTER_ENDPOINT, EndpointMode, Lab, LabOptions, Sent, scenarios, servers, state,
    traffic::{self, ClientArgs},
};

#[derive(clap::Args, Debug)]
pub struct LabCommand {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a lab and leave it running; prints its id and addresses.
    Up {
        /// API server endpoint access mode (EKS's default is public).
        #[arg(long, default_value = "public")]
        mode: EndpointMode,
        /// The node does not SNAT pod egress (AWS_VPC_K8S_CNI_EXTERNALSNAT=true).
        #[arg(long)]
        external_snat: bool,
    },
    /// Tear down labs: all of them, or the one given with --id.
    Down {
        #[arg(long)]
        id: Option<String>,
        /// Every lab (the default), also those left by a crash.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Labs, their namespaces, processes and endpoint mode.
    Status,
    /// Run the default traffic scenarios and print what was sent on each path.
    Traffic {
        #[arg(long)]
        id: Option<String>,
    },
    /// Switch the endpoint mode of a running lab.
    Mode {
        mode: EndpointMode,
        #[arg(long)]
        id: Option<String>,
    },
    /// Run a lab server (inside a lab namespace).
    #[command(hide = true)]
    Serve(servers::ServeArgs),
    /// Run a traffic client (inside a lab namespace); prints a JSON report.
    #[command(hide = true)]
    Client(ClientArgs),
}

pub fn run(cmd: LabCommand, helper_exe: PathBuf) -> anyhow::Result<()> {
    match cmd.command {
        Command::Up {
            mode,
            external_snat,
        } => {
            let mut lab = Lab::up(&LabOptions {
                mode,
                external_snat,
                helper_exe,
            })?;
            lab.keep();
            print!("{}", summary(&lab, mode));
            Ok(())
        }
        // By id through the state module: a lab left half-built by a crash has no state.json.
        Command::Down { id: Some(id), .. } => {
            state::require_exists(&id)?;
            state::teardown(&id)
        }
        Command::Down { id: None, .. } => {
            let started = Instant::now();
            let count = Lab::down_all()?;
            eprintln!(
                "lab: removed {count} lab(s) in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Status => {
            print!("{}", Lab::status()?);
            Ok(())
        }
        Command::Traffic { id } => traffic(&Lab::open(id.as_deref())?),
        Command::Mode { mode, id } => switch_mode(&Lab::open(id.as_deref())?, mode),
        Command::Serve(args) => servers::serve(args),
        Command::Client(args) => traffic::client(args),
    }
}

fn summary(lab: &Lab, mode: EndpointMode) -> String {
    let facts = lab.facts();
    let pods: Vec<String> = facts
        .pod_ips
        .iter()
        .map(|(name, ip)| format!("{name} {ip} ({})", facts.pod_veths[name]))
        .collect();
    let list = |ips: &[std::net::Ipv4Addr]| {
        ips.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "lab {id} is up: {mode} endpoint, {snat}
  namespaces   {ns_pattern} (ip netns exec {node} bash)
  VPC          {vpc} (subnet A {subnet_a} lab-1a, subnet B {subnet_b} lab-1b), resolver {resolver}, IMDS {imds}
  node         eth0 {node_ip} (primary ENI), eth1 {secondary} (secondary ENI), kubelet :10250
  pods         {pods}
  node2        {node2}
  control plane ENIs {cp}; NLB {nlb}; endpoint {endpoint}
  services     kubernetes {kubernetes}:443, kube-dns {dns}:53, backend {backend}:80, NodePort :{node_port} (service CIDR {services})
  internet     external host {external} (HTTP :80, sink :9000)
run traffic: cargo xtask lab traffic --id {id}; tear down: cargo xtask lab down --id {id}
",
        id = lab.id(),
        snat = if lab.external_snat() { "external SNAT" } else { "AWS SNAT on the node" },
        ns_pattern = lab.ns("*"),
        node = lab.ns("node"),
        vpc = facts.vpc_cidr,
        subnet_a = facts.subnet_a,
        subnet_b = facts.subnet_b,
        resolver = facts.resolver,
        imds = facts.imds,
        node_ip = facts.node_ip,
        secondary = facts.secondary_eni_ip,
        pods = pods.join(", "),
        node2 = facts.node2_ip,
        cp = list(&facts.controlplane_ips),
        nlb = list(&facts.nlb_ips),
        endpoint = facts.cluster_endpoint,
        kubernetes = facts.kubernetes_service_ip,
        dns = facts.cluster_dns,
        backend = facts.backend_service_ip,
        node_port = facts.node_port,
        services = facts.service_cidr,
        external = facts.external_host,
    )
}

/// Runs the default scenarios for the lab's mode, prints a table and fails if any scenario
/// ended otherwise than expected.
fn traffic(lab: &Lab) -> anyhow::Result<()> {
    let mode = lab.mode()?;
    let started = Instant::now();
    let sent = lab.run_traffic(&scenarios(mode))?;
    eprintln!("lab: traffic took {:.1} s", started.elapsed().as_secs_f64());
    println!("lab {} ({mode} endpoint)", lab.id());
    print!("{}", table(&sent));
    let unexpected: Vec<&str> = sent
        .iter()
        .filter(|s| !s.as_expected())
        .map(|s| s.scenario)
        .collect();
    if !unexpected.is_empty() {
        bail!(
            "scenarios that did not end as expected: {}",
            unexpected.join(", ")
        );
    }
    Ok(())
}

fn table(sent: &[Sent]) -> String {
    let row = |cells: [&str; 12]| {
        let [
            scenario,
            path,
            nat,
            endpoint,
            proto,
            conns,
            connected,
            refused,
            timed_out,
            bytes,
            to,
            result,
        ] = cells;
        format!(
            "{scenario:<32} {path:<23} {nat:<5} {endpoint:<8} {proto:<5} {conns:>5} {connected:>9} {refused:>7} {timed_out:>9} {bytes:>9}  {to:<19} {result}\n"
        )
    };
    let mut text = row([
        "scenario",
        "path",
        "nat",
        "endpoint",
        "proto",
        "conns",
        "connected",
        "refused",
        "timed out",
        "bytes",
        "to",
        "result",
    ]);
    for s in sent {
        text += &row([
            s.scenario,
            s.expected_path.as_str(),
            s.expected_nat.as_str(),
            s.expected_endpoint.map_or("-", Endpoint::as_str),
            s.protocol,
            &s.connections.to_string(),
            &s.connected.to_string(),
            &s.refused.to_string(),
            &s.timed_out.to_string(),
            &s.payload_bytes.to_string(),
            &s.to,
            if s.as_expected() { "ok" } else { "UNEXPECTED" },
        ]);
    }
    text
}

/// Switches the mode and shows what the node's resolver answers now.
fn switch_mode(lab: &Lab, mode: EndpointMode) -> anyhow::Result<()> {
    lab.set_mode(mode)?;
    let resolver = std::net::SocketAddrV4::new(lab.facts().resolver, 53);
    let args = ["dns", "--to", &resolver.to_string(), "--connections", "1"].map(String::from);
    let report = traffic::run_client(lab, "node", &args)?;
    let answers: Vec<String> = report.answers.iter().map(ToString::to_string).collect();
    println!(
        "lab {}: {mode} endpoint; from the node, {CLUSTER_ENDPOINT} resolves to {}",
        lab.id(),
        answers.join(", ")
    );
    Ok(())
}

/// How a `ValueEnum` value is written on the command line (for the hidden subcommands' argv).
pub(super) fn arg_name(value: impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .expect("no variant is skipped")
        .get_name()
        .to_owned()
}
