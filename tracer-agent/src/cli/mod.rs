//! The command line: `tracer agent`, with every flag documented in `--help`.
pub mod config;

use std::{net::IpAddr, net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{context::cidr::Cidr, datapath::TcxOrder, serve::access::MetricsAuth};

#[derive(Parser, Debug)]
#[command(
    name = "tracer",
    version,
    about = "Packet-path tracer for Kubernetes nodes (Amazon EKS, AWS VPC CNI)",
    long_about = "Tags every connection on pod veths and node ENIs with the path it takes \
                  (pod to pod, to the API server through the public or private endpoint, \
                  SNATed egress, DNS, IMDS, …) and exports per-path metrics."
)]
pub struct Cli {
    /// How the logs on stderr are written: text, for people; json, one object per line
    /// (timestamp, level, target, message and the event's fields), for cluster log shippers.
    /// RUST_LOG says what is logged (default: info).
    #[arg(long, global = true, value_enum, value_name = "FORMAT", env = "TRACER_LOG_FORMAT",
          default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How the logs are written (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to the node's interfaces, classify every connection, serve /metrics and the
    /// JSON API.
    Agent(AgentArgs),
    /// Classify a hypothetical connection against this node's context, and say why.
    ///
    /// Runs the agent's classifier on SRC → DST[:PORT] with the context the agent would use
    /// (local pods and node addresses from netlink, VPC CIDRs from IMDS or --vpc-cidr, API
    /// server addresses from --cluster-endpoint, …) and prints the path, its labels and the
    /// facts that decided it. Example: `tracer explain 10.0.1.101 10.0.1.50:443`.
    Explain(ExplainArgs),
    /// Live terminal view of this node's paths and top flows, from the local agent's JSON API
    /// or, when none answers, from the datapath loaded by tracer top itself.
    Top(TopArgs),
    /// Make the directories of a restart without loss and give them to the agent's user.
    ///
    /// Creates each DIR (and its parents) if missing, with mode 0700, owned by OWNER: the
    /// --pin-path directory on the host's bpffs and the --state-file's directory. Both live in
    /// memory (bpffs, /run) and are gone after every boot of the node, and the agent, running
    /// as a non-root user without CAP_DAC_OVERRIDE, cannot make them; the Helm chart runs this
    /// in an init container as root with CAP_CHOWN alone. Example:
    /// `tracer prepare --owner 65532:65532 /sys/fs/bpf/tracer /var/run/tracer`.
    Prepare(PrepareArgs),
}

#[derive(Args, Debug, Clone)]
pub struct PrepareArgs {
    /// The user (and group) the directories are given to: UID:GID, or UID for both.
    #[arg(long, value_name = "UID:GID", value_parser = parse_owner)]
    pub owner: Owner,

    /// The directories.
    #[arg(value_name = "DIR", required = true)]
    pub dirs: Vec<std::path::PathBuf>,
}

/// A numeric user and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

fn parse_owner(text: &str) -> Result<Owner, String> {
    let number = |part: &str| {
        part.parse::<u32>()
            .map_err(|_| format!("{part:?} is not a numeric id (UID:GID, e.g. 65532:65532)"))
    };
    match text.split_once(':') {
        Some((uid, gid)) => Ok(Owner {
            uid: number(uid)?,
            gid: number(gid)?,
        }),
        None => number(text).map(|uid| Owner { uid, gid: uid }),
    }
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Listen address of /metrics, the JSON API (/api/v1/paths, /api/v1/flows), /healthz and
    /// /readyz.
    #[arg(long, env = "TRACER_METRICS_ADDR", default_value = "0.0.0.0:9477")]
    pub metrics_addr: SocketAddr,

    /// Most series the opt-in families whose label values come from the cluster (workload
    /// names) may hold together; updates beyond are refused and counted in
    /// tracer_series_overflow_total. The taxonomy's families are bounded and not capped.
    #[arg(long, value_name = "SERIES", default_value_t = crate::serve::export::DEFAULT_MAX_SERIES,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_series: u32,

    #[command(flatten)]
    pub access: AccessArgs,

    #[command(flatten)]
    pub restart: RestartArgs,

    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

/// Who may read what the agent serves. Clients on the node's loopback (`tracer top`, `kubectl
/// port-forward`, `kubectl exec`) read everything over plain HTTP; /healthz and /readyz are open
/// to all; everything else is answered to other clients only over HTTPS (same port) with a
/// bearer token the API server authenticates and authorizes (RBAC `get` on the URL).
#[derive(Args, Debug, Clone)]
pub struct AccessArgs {
    /// Who may read /metrics from outside the node's loopback: `token` (HTTPS and a bearer
    /// token allowed to get /metrics: what a Prometheus scraping with its service account
    /// does) or `none` (anyone who reaches the port, over HTTP or HTTPS; /api/v1/* still needs
    /// a token).
    #[arg(long, value_enum, env = "TRACER_METRICS_AUTH", default_value_t = MetricsAuth::Token)]
    pub metrics_auth: MetricsAuth,

    /// The certificate (PEM, chain first to last) of the HTTPS side of --metrics-addr, e.g. a
    /// mounted cert-manager or kubernetes.io/tls secret's tls.crt. Read again every 30 s: a
    /// renewal is served without a restart. Without it, a self-signed certificate is made at
    /// start. Needs --tls-key-file.
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,

    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert-file.
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl AccessArgs {
    /// The certificate files, when both are given (clap requires one with the other).
    pub fn certificate_files(&self) -> Option<crate::serve::tls::CertificateFiles> {
        Some(crate::serve::tls::CertificateFiles {
            cert: self.tls_cert_file.clone()?,
            key: self.tls_key_file.clone()?,
        })
    }
}

/// Surviving a kill: without both flags, a restart is a counter reset (Prometheus' `rate()`
/// copes) and what passes while no agent runs is not counted.
#[derive(Args, Debug, Clone, Default)]
pub struct RestartArgs {
    /// A directory on a bpffs (e.g. /sys/fs/bpf/tracer) where the datapath — its maps and tcx
    /// links — is pinned, so that an agent killed without SIGTERM (crash, OOM kill, kill -9)
    /// leaves it counting and its successor carries on: no packet uncounted, no counter going
    /// back. A clean stop removes it; SIGTERM hands it over instead when the agent's DaemonSet
    /// stays (see --pod-name). Needs --state-file.
    #[arg(long, value_name = "DIR", requires = "state_file")]
    pub pin_path: Option<std::path::PathBuf>,

    /// Where the agent saves, every poll, what a successor needs to carry its counters on
    /// (each connection's counts as last read, the per-path totals), e.g.
    /// /var/run/tracer/state. A clean stop removes it. Needs --pin-path.
    #[arg(long, value_name = "FILE", requires = "pin_path")]
    pub state_file: Option<std::path::PathBuf>,

    /// The agent's own pod (Kubernetes sets it through the downward API). With --pin-path and
    /// the Kubernetes context, SIGTERM asks the API server whether the pod's DaemonSet still
    /// stands: if so (a rolling update) the agent hands over — it exits leaving the datapath
    /// attached and pinned and its state saved, for the next pod to take over in place;
    /// otherwise (uninstall, no answer within 2 s) it detaches and removes them. Needs
    /// --pod-namespace.
    #[arg(
        long,
        env = "POD_NAME",
        value_name = "NAME",
        requires = "pod_namespace"
    )]
    pub pod_name: Option<String>,

    /// The namespace of the agent's pod (POD_NAMESPACE, from the downward API). Needs
    /// --pod-name.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        value_name = "NAMESPACE",
        requires = "pod_name"
    )]
    pub pod_namespace: Option<String>,
}

impl RestartArgs {
    /// The agent's pod, when both flags name it.
    pub fn pod(&self) -> Option<crate::cmd::handover::PodIdentity> {
        Some(crate::cmd::handover::PodIdentity {
            namespace: self.pod_namespace.clone()?,
            name: self.pod_name.clone()?,
        })
    }
}

/// What the datapath and the classification need: shared by `agent` and the standalone mode
/// of `top`, which run the same pipeline.
#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    #[command(flatten)]
    pub context: ContextArgs,

    /// How often the cluster endpoint is resolved again.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub resolve_interval: Duration,

    /// Capacity of the kernel flow table, in connections (about 150 bytes each).
    #[arg(long, value_name = "ENTRIES", default_value_t = tracer_common::DEFAULT_FLOW_TABLE_SIZE,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216),
          allow_negative_numbers = true)]
    pub flow_table_size: u32,

    /// How often the flow table is read, e.g. 1s or 500ms. For `tracer top`, also how often the
    /// view refreshes (from an agent too): rates are computed over it.
    #[arg(long, visible_alias = "interval", value_name = "DURATION", default_value = "1s",
          value_parser = parse_duration, allow_hyphen_values = true)]
    pub poll_interval: Duration,

    /// How long a TCP SYN may wait for its SYN-ACK before the attempt counts as unanswered
    /// (tracer_path_unanswered_syn_total).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub syn_timeout: Duration,

    /// How the programs are attached: tcx links (kernel ≥ 6.6), the clsact qdisc, or the best
    /// the kernel offers.
    #[arg(long, value_enum, default_value_t = AttachModeArg::Auto)]
    pub attach_mode: AttachModeArg,

    /// With tcx links, where the agent's programs go on each hook's chain. Another tcx
    /// program that drops or redirects a packet (a network-policy agent's) hides it from the
    /// programs after it: `first` counts every packet, the dropped ones included; `last`
    /// counts only what the others let through. (In clsact mode the agent is always first.)
    #[arg(long, value_enum, default_value_t = TcxOrder::First)]
    pub tcx_order: TcxOrder,

    /// This node's name, for logs, the JSON API and to select its pods in the Kubernetes API
    /// (Kubernetes sets it through the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
}

/// The Kubernetes context: pod names, control-plane ENIs, cluster DNS, zones.
#[derive(Args, Debug, Clone)]
pub struct KubernetesArgs {
    /// Watch the API server for this node's pods, the control-plane ENIs, kube-dns and the
    /// nodes' zones: with the in-cluster configuration when there is one (auto), always (on:
    /// its absence is an error), or never (off). Needs --node-name.
    #[arg(long = "kubernetes", value_enum, value_name = "MODE", default_value_t = KubernetesMode::Auto)]
    pub mode: KubernetesMode,

    /// Talk to the API server through this kubeconfig file (its current context) instead of the
    /// in-cluster configuration: for an agent run outside a pod, e.g. on a node by hand. Implies
    /// --kubernetes on. The KUBECONFIG variable is not read: pass --kubeconfig "$KUBECONFIG".
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,

    /// Export tracer_workload_bytes_total{namespace,workload,path} for the TOP_K series with
    /// the most bytes, plus one namespace="_other" series per path. Off when absent.
    #[arg(long, value_name = "TOP_K", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub workload_metrics: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KubernetesMode {
    Auto,
    On,
    Off,
}

/// What the node knows about itself and its cluster, as flags: shared by `agent` and `explain`
/// so that both classify against the same context.
#[derive(Args, Debug, Clone)]
pub struct ContextArgs {
    /// A TOML file setting any of these flags by their long name (`vpc-cidr = ["10.0.0.0/16"]`,
    /// `poll-interval = "1s"`); a flag given on the command line replaces the file's value.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// A CIDR block of the VPC (repeatable). Default: asked from IMDS.
    #[arg(long = "vpc-cidr", value_name = "CIDR")]
    pub vpc_cidrs: Vec<Cidr>,

    /// The cluster's service CIDR (repeatable), e.g. 10.100.0.0/16 or 172.20.0.0/16: ClusterIP
    /// traffic that no DNAT rewrote is `pod_to_service`, not mistaken for external.
    #[arg(long = "service-cidr", value_name = "CIDR")]
    pub service_cidrs: Vec<Cidr>,

    /// Name pattern of pod interfaces (repeatable; `*` is a wildcard). VPC CNI: eni* (pods),
    /// vlan* (branch-ENI pods, security groups for pods). A name matching a pod and a node
    /// pattern is what the more specific pattern (more characters besides `*`) says.
    #[arg(long = "pod-iface", value_name = "PATTERN", default_values = ["eni*", "vlan*"],
          value_parser = parse_pattern)]
    pub pod_ifaces: Vec<String>,

    /// Name pattern of the node's ENIs (repeatable). AL2: eth*; AL2023: ens*; security groups
    /// for pods: vlan.eth.* (the trunk ENI's VLAN sub-interfaces, which vlan* would take for
    /// pods').
    #[arg(long = "node-iface", value_name = "PATTERN", default_values = ["eth*", "ens*", "vlan.eth.*"],
          value_parser = parse_pattern)]
    pub node_ifaces: Vec<String>,

    /// The cluster endpoint hostname (e.g. ABC.gr7.us-west-2.eks.amazonaws.com), resolved with
    /// the node's resolver: its answer says which API server addresses are in use, public NLB
    /// or private ENIs.
    #[arg(long, env = "CLUSTER_ENDPOINT", value_name = "HOST")]
    pub cluster_endpoint: Option<String>,

    /// An API server address (repeatable), in addition to the resolved cluster endpoint.
    #[arg(long = "apiserver-ip", value_name = "IP")]
    pub apiserver_ips: Vec<IpAddr>,

    /// An EKS-owned control-plane ENI address (repeatable).
    #[arg(long = "controlplane-ip", value_name = "IP")]
    pub controlplane_ips: Vec<IpAddr>,

    /// The kube-dns ClusterIP (e.g. 10.100.0.10).
    #[arg(long, value_name = "IP")]
    pub cluster_dns: Option<IpAddr>,

    /// Where the instance metadata service answers.
    #[arg(long, value_name = "ADDR", default_value = "169.254.169.254:80")]
    pub imds_addr: SocketAddr,
}

#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    /// The initiator's address (the side that sends the first packet).
    #[arg(value_name = "SRC")]
    pub source: IpAddr,

    /// The responder: an address with an optional port (10.0.1.50:443, [fd00::1]:53, 10.0.2.7).
    #[arg(value_name = "DST[:PORT]", value_parser = parse_destination)]
    pub destination: Destination,

    /// Transport protocol of the connection.
    #[arg(long, value_enum, default_value_t = ProtoArg::Tcp)]
    pub proto: ProtoArg,

    /// Print one JSON object instead of text, for scripts.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub context: ContextArgs,
}

#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    /// The agent to read (its --metrics-addr). When none answers there, tracer top loads the
    /// datapath itself, which needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9477")]
    pub agent: crate::cmd::top::AgentUrl,

    /// Print one snapshot and exit, for scripts (with --json).
    #[arg(long, requires = "json")]
    pub once: bool,

    /// With --once: the snapshot as JSON, {"paths": <GET /api/v1/paths>, "flows": <GET
    /// /api/v1/flows>}.
    #[arg(long, requires = "once")]
    pub json: bool,

    /// How many flows to show (the largest first); the filter works on these.
    #[arg(long, value_name = "N", default_value_t = crate::serve::api::DEFAULT_FLOWS_LIMIT as u32,
          value_parser = clap::value_parser!(u32).range(1..=crate::serve::api::MAX_FLOWS_LIMIT as i64))]
    pub limit: u32,

    /// The datapath tracer top runs itself when no agent answers: the flags of `tracer agent`.
    #[command(
        flatten,
        next_help_heading = "Standalone datapath (when no agent answers)"
    )]
    pub pipeline: PipelineArgs,
}

/// `DST[:PORT]`: the port is optional, since many paths do not depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

fn parse_destination(text: &str) -> Result<Destination, String> {
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(Destination { addr, port: None });
    }
    text.parse::<SocketAddr>()
        .map(|end| Destination {
            addr: end.ip(),
            port: Some(end.port()),
        })
        .map_err(|_| {
            format!(
                "{text:?} is not an address with an optional port (10.0.1.50:443, [fd00::1]:53)"
            )
        })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachModeArg {
    Auto,
    Tcx,
    Clsact,
}

/// Longest interface name Linux allows (IFNAMSIZ less the NUL).
const MAX_INTERFACE_NAME: usize = 15;

/// An interface name pattern: the characters of an interface name, and `*`. Other glob
/// characters would be taken literally and silently match nothing, so they are refused.
fn parse_pattern(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("an empty pattern matches no interface".to_owned());
    }
    if let Some(c) = text
        .chars()
        .find(|c| matches!(c, '?' | '[' | ']' | '{' | '}' | '!'))
    {
        return Err(format!(
            "{text:?}: {c:?} is not a wildcard here; only * is (e.g. eni*)"
        ));
    }
    if let Some(c) = text
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{text:?}: {c:?} cannot appear in an interface name"
        ));
    }
    if text.chars().filter(|c| *c != '*').count() > MAX_INTERFACE_NAME {
        return Err(format!(
            "{text:?} can match no interface: names are at most {MAX_INTERFACE_NAME} characters"
        ));
    }
    Ok(text.to_owned())
}

/// `1s`, `250ms`, `2m`: the forms an operator types.
fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.starts_with('-') {
        return Err(format!("{text:?}: a duration cannot be negative"));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: write e.g. 1s or 500ms"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        _ => return Err(format!("{text:?}: unit must be ms, s or m")),
    };
    if duration < Duration::from_millis(100) || duration > Duration::from_secs(60) {
        return Err(format!("{text:?}: must lie between 100ms and 60s"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("1").is_err());
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("10ms").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn patterns() {
        assert_eq!(parse_pattern("eni*"), Ok("eni*".to_owned()));
        assert_eq!(parse_pattern("vlan.eth.1"), Ok("vlan.eth.1".to_owned()));
        for bad in [
            "",
            "eni?",
            "eth[0-9]",
            "eth 0",
            "eth0:1",
            "a/b",
            "averyverylongname*",
        ] {
            assert!(parse_pattern(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn destinations_take_an_optional_port() {
        let parse = |text| parse_destination(text).map(|d| (d.addr.to_string(), d.port));
        assert_eq!(parse("10.0.1.50:443"), Ok(("10.0.1.50".into(), Some(443))));
        assert_eq!(parse("10.0.1.50"), Ok(("10.0.1.50".into(), None)));
        assert_eq!(parse("[fd00::a]:53"), Ok(("fd00::a".into(), Some(53))));
        assert_eq!(parse("fd00::a"), Ok(("fd00::a".into(), None)));
        assert!(parse("10.0.1.50:99999").is_err());
    }

    #[test]
    fn the_log_format_goes_before_or_after_the_subcommand() {
        for argv in [
            &["tracer", "--log-format", "json", "agent"][..],
            &["tracer", "agent", "--log-format=json"],
            &[
                "tracer",
                "explain",
                "10.0.1.1",
                "10.0.1.2",
                "--log-format",
                "json",
            ],
        ] {
            let cli = Cli::try_parse_from(argv)
                .unwrap_or_else(|error| panic!("{}: {error}", argv.join(" ")));
            assert_eq!(cli.log_format, LogFormat::Json, "{}", argv.join(" "));
        }
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for argv in [
            &["tracer", "agent", "--metrics-addr", "nonsense"][..],
            &["tracer", "agent", "--vpc-cidr", "10.0.0.1/16"],
            &["tracer", "agent", "--flow-table-size", "10"],
            &["tracer", "agent", "--poll-interval", "forever"],
            &["tracer", "agent", "--max-series", "0"],
            &["tracer", "agent", "--max-series", "many"],
            &["tracer", "agent", "--no-such-flag"],
            &["tracer", "agent", "--kubernetes", "maybe"],
            &["tracer", "agent", "--workload-metrics", "0"],
            &["tracer", "agent", "--workload-metrics", "many"],
            &["tracer", "agent", "--service-cidr", "10.100.0.0"],
            &["tracer", "explain", "10.0.1.1", "10.0.1.2:http"],
            &[
                "tracer", "explain", "10.0.1.1", "10.0.1.2", "--proto", "sctp",
            ],
            &["tracer", "explain", "pod-a", "10.0.1.2"],
            &["tracer", "top", "--agent", "127.0.0.1:9477"],
            &["tracer", "top", "--interval", "0s"],
            &["tracer", "top", "--limit", "0"],
            &["tracer", "top", "--once"],
            &["tracer", "top", "--json"],
            &["tracer", "agent", "--log-format", "xml"],
            &[
                "tracer",
                "--log-format",
                "yaml",
                "prepare",
                "--owner",
                "0",
                "/tmp/x",
            ],
        ] {
            let error = Cli::try_parse_from(argv).expect_err(&argv.join(" "));
            assert_eq!(error.exit_code(), 2, "{}", argv.join(" "));
        }
    }
}
