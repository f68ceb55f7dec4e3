//! `tracer explain SRC DST[:PORT]`: the agent's classifier run on a hypothetical connection,
//! against the context this node gives now, with the facts that decided it and where each fact
//! came from — the answer to "why is this traffic labelled that way?".
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context as _, anyhow};
use serde::Serialize;

use crate::{
    classify::{self, Connection, Nat},
    cli::{ExplainArgs, ProtoArg},
    context,
    context::endpoint,
    context::imds::{self, ImdsClient},
    context::{NodeContext, comma_separated},
    datapath::discovery,
    error::AgentError,
};

/// What `--json` prints; the text form shows the same fields.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub initiator: IpAddr,
    pub responder: String,
    pub proto: &'static str,
    pub path: &'static str,
    pub endpoint: Option<&'static str>,
    pub nat: &'static str,
    /// The rule of the taxonomy that decided the path.
    pub rule: &'static str,
    /// What the context knows about each end.
    pub facts: Vec<String>,
    /// Where the context came from: flags, IMDS, DNS, netlink.
    pub context: Vec<String>,
    /// What the context lacks or gets wrong: the answer may be `unknown` because of it.
    pub warnings: Vec<String>,
}

pub fn run(args: ExplainArgs) -> Result<(), AgentError> {
    let explanation = explain(&args)?;
    if args.json {
        let text = serde_json::to_string_pretty(&explanation)
            .context("encoding the explanation")
            .map_err(AgentError::Runtime)?;
        println!("{text}");
    } else {
        print!("{}", render(&explanation));
    }
    Ok(())
}

fn explain(args: &ExplainArgs) -> Result<Explanation, AgentError> {
    let flags = &args.context;
    let mut node = context::from_flags(flags).map_err(|contradictions| {
        AgentError::Config(anyhow!(context::describe(&contradictions)))
    })?;
    let mut sources = Vec::new();
    let mut warnings = Vec::new();

    let scan = discovery::scan(&context::interface_patterns(flags))
        .context("listing interfaces, addresses and routes over netlink")
        .map_err(AgentError::Runtime)?;
    sources.push(format!(
        "this node: {} address(es), {} local pod(s) (netlink: interfaces matching --node-iface {:?} / --pod-iface {:?})",
        scan.node_ips.len(),
        scan.local_pods.len(),
        flags.node_ifaces,
        flags.pod_ifaces
    ));
    node.node_ips = scan.node_ips;
    node.local_pods = scan.local_pods;

    if flags.vpc_cidrs.is_empty() {
        match ImdsClient::new(flags.imds_addr, imds::DEFAULT_TIMEOUT).fetch() {
            Ok(metadata) => {
                node.vpc_cidrs = metadata.vpc_cidrs;
                sources.push(format!(
                    "VPC CIDRs: {} (IMDS at {})",
                    comma_separated(&node.vpc_cidrs),
                    flags.imds_addr
                ));
            }
            Err(error) => warnings.push(format!(
                "IMDS at {} did not give the VPC CIDRs ({error}) and --vpc-cidr is not set: in-VPC and external addresses cannot be told apart",
                flags.imds_addr
            )),
        }
    } else {
        sources.push(format!(
            "VPC CIDRs: {} (--vpc-cidr)",
            comma_separated(&node.vpc_cidrs)
        ));
    }

    if !flags.apiserver_ips.is_empty() {
        sources.push(format!(
            "API server addresses: {} (--apiserver-ip)",
            comma_separated(&flags.apiserver_ips)
        ));
    }
    match flags.cluster_endpoint.as_deref() {
        Some(host) => match endpoint::resolve(host) {
            Ok(addresses) => {
                sources.push(format!(
                    "API server addresses: {} (the cluster endpoint {host} resolves to them here)",
                    comma_separated(&addresses)
                ));
                node.apiserver_ips.extend(addresses);
            }
            Err(error) => warnings.push(error),
        },
        None if flags.apiserver_ips.is_empty() => warnings.push(
            "neither --cluster-endpoint nor --apiserver-ip is set: only the control-plane ENIs on :443 count as API server".to_owned(),
        ),
        None => {}
    }
    if !flags.controlplane_ips.is_empty() {
        let ips: BTreeSet<&IpAddr> = flags.controlplane_ips.iter().collect();
        sources.push(format!(
            "control-plane ENIs: {} (--controlplane-ip)",
            comma_separated(&ips)
        ));
    }
    if let Some(dns) = flags.cluster_dns {
        sources.push(format!("cluster DNS: {dns} (--cluster-dns)"));
    }
    if !flags.service_cidrs.is_empty() {
        sources.push(format!(
            "service CIDRs: {} (--service-cidr)",
            comma_separated(&flags.service_cidrs)
        ));
    }
    warnings.extend(node.contradictions().iter().map(ToString::to_string));

    let destination = &args.destination;
    if destination.port.is_none() {
        warnings.push(
            "no port given: the rules that depend on it (:443 to a control-plane ENI, :53, :10250) do not apply".to_owned(),
        );
    }
    Ok(explain_connection(args, &node, sources, warnings))
}

/// The pure part: classify, and say why.
fn explain_connection(
    args: &ExplainArgs,
    node: &NodeContext,
    context: Vec<String>,
    warnings: Vec<String>,
) -> Explanation {
    let responder = SocketAddr::new(args.destination.addr, args.destination.port.unwrap_or(0));
    let connection = Connection {
        // The initiator's port decides nothing: no rule reads it.
        initiator: SocketAddr::new(args.source, 0),
        responder,
        nat: Nat::None,
        requested: None,
    };
    let (classification, rule) = classify::decide(&connection, node);
    let mut facts = node.facts_about(args.source);
    facts.extend(node.facts_about(args.destination.addr));
    Explanation {
        initiator: args.source,
        responder: match args.destination.port {
            Some(_) => responder.to_string(),
            None => args.destination.addr.to_string(),
        },
        proto: match args.proto {
            ProtoArg::Tcp => "tcp",
            ProtoArg::Udp => "udp",
        },
        path: classification.path.as_str(),
        endpoint: classification.endpoint.map(|endpoint| endpoint.as_str()),
        nat: classification.nat.as_str(),
        rule: rule.describe(),
        facts,
        context,
        warnings,
    }
}

fn render(explanation: &Explanation) -> String {
    let mut text = format!(
        "{} → {} ({})\n  path      {}\n  endpoint  {}\n  nat       {}\nwhy\n  rule: {}\n",
        explanation.initiator,
        explanation.responder,
        explanation.proto,
        explanation.path,
        explanation.endpoint.unwrap_or("-"),
        explanation.nat,
        explanation.rule
    );
    let indented =
        |lines: &[String]| -> String { lines.iter().map(|line| format!("  {line}\n")).collect() };
    text.push_str(&indented(&explanation.facts));
    for (title, lines) in [
        ("context", &explanation.context),
        ("warnings", &explanation.warnings),
    ] {
        if !lines.is_empty() {
            text.push_str(&format!("{title}\n{}", indented(lines)));
        }
    }
    text
}
