//! Traffic with known sizes on every path of the taxonomy (docs/taxonomy.md): the scenarios,
//! the `lab client` subcommand that runs one inside a namespace, and what it reports.
use std::{
    fmt, io,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tracer_common::labels::{Endpoint, Nat, Path};

use super::{
    EndpointMode, Lab, cli, dns,
    facts::{
        BACKEND_SERVICE_IP, CLOSED_PORT, CLUSTER_DNS, CLUSTER_ENDPOINT, EXTERNAL_HOST, IMDS,
        KUBERNETES_SERVICE_IP, NODE_IP, NODE_PORT, NODE2_IP, RESOLVER, SECURITY_GROUP_DENIED_PORT,
        pod_ip,
    },
    http, imds, sink,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the initiator speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// The sink protocol (TCP): N bytes out, their count back as proof of delivery.
    Sink,
    /// HTTP `POST /upload` of N bytes to the external host.
    Http,
    /// UDP A queries for the cluster endpoint, one per "connection".
    Dns,
    /// IMDSv2: a token, then GETs, one request per connection.
    Imds,
}

impl ClientKind {
    pub fn protocol(self) -> &'static str {
        if self == Self::Dns { "udp" } else { "tcp" }
    }

    /// The name on the `lab client` command line.
    fn arg(self) -> String {
        cli::arg_name(self)
    }
}

/// Where the initiator goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddrV4),
    /// The cluster endpoint hostname, resolved through the VPC resolver; the first answer, on
    /// this port.
    ClusterEndpoint(u16),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(address) => write!(f, "{address}"),
            Self::ClusterEndpoint(port) => write!(f, "{CLUSTER_ENDPOINT}:{port}"),
        }
    }
}

/// How every connection of a scenario is expected to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Connected,
    /// RST (TCP) or ICMP port unreachable (UDP).
    Refused,
    /// No answer within the connect timeout (2 s): a silent drop.
    TimedOut,
}

/// One traffic scenario: a known amount of traffic on one path of the taxonomy.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub expected_path: Path,
    /// `Nat::Snat` is the VPC CNI's SNAT of pod egress: on a lab with external SNAT,
    /// [`Lab::run_traffic`] reports it as `Nat::None`.
    pub expected_nat: Nat,
    /// On API server paths only (which one depends on the endpoint mode).
    pub expected_endpoint: Option<Endpoint>,
    pub expected_outcome: Outcome,
    /// The role (namespace) of the initiator.
    pub from: &'static str,
    pub to: Target,
    pub client: ClientKind,
    /// Connections (DNS: queries; IMDS: requests).
    pub connections: u32,
    /// Payload bytes per connection (sink and HTTP; DNS and IMDS send what they send).
    pub bytes_per_connection: u64,
}

/// What a scenario's initiator actually did.
#[derive(Clone, Debug, Serialize)]
pub struct Sent {
    pub scenario: &'static str,
    pub expected_path: Path,
    pub expected_nat: Nat,
    pub expected_endpoint: Option<Endpoint>,
    pub expected_outcome: Outcome,
    pub protocol: &'static str,
    /// Where the initiator connected (the cluster endpoint resolved).
    pub to: String,
    pub connections: u32,
    pub connected: u32,
    pub refused: u32,
    pub timed_out: u32,
    /// Bytes written by the initiator above L4 (sink payload, HTTP request, DNS queries).
    pub payload_bytes: u64,
}

impl Sent {
    /// Whether every connection ended as the scenario expects.
    pub fn as_expected(&self) -> bool {
        let matching = match self.expected_outcome {
            Outcome::Connected => self.connected,
            Outcome::Refused => self.refused,
            Outcome::TimedOut => self.timed_out,
        };
        matching == self.connections
    }
}

impl Scenario {
    /// A scenario named after its path, with no NAT, every connection made.
    fn new(
        path: Path,
        client: ClientKind,
        from: &'static str,
        to: Target,
        connections: u32,
        bytes_per_connection: u64,
    ) -> Self {
        Self {
            name: path.as_str(),
            expected_path: path,
            expected_nat: Nat::None,
            expected_endpoint: None,
            expected_outcome: Outcome::Connected,
            from,
            to,
            client,
            connections,
            bytes_per_connection,
        }
    }

    /// Another scenario on the same path, told apart by its name.
    fn named(self, name: &'static str) -> Self {
        Self { name, ..self }
    }

    fn nat(self, expected_nat: Nat) -> Self {
        Self {
            expected_nat,
            ..self
        }
    }

    fn endpoint(self, endpoint: Endpoint) -> Self {
        Self {
            expected_endpoint: Some(endpoint),
            ..self
        }
    }

    fn outcome(self, expected_outcome: Outcome) -> Self {
        Self {
            expected_outcome,
            ..self
        }
    }
}

/// The default set: every path once, with distinct sizes so that a mix-up shows, plus a
/// silently dropped and a refused attempt.
pub fn scenarios(mode: EndpointMode) -> Vec<Scenario> {
    use ClientKind::{Dns, Http, Imds, Sink};
    let to = |ip, port| Target::Addr(SocketAddrV4::new(ip, port));
    let (pod_b, pod_r) = (pod_ip("pod-b"), pod_ip("pod-r"));
    let node_endpoint = if mode == EndpointMode::Public {
        Endpoint::Public
    } else {
        Endpoint::Private
    };
    // One scenario per line: a table reads better than rustfmt's one argument per line.
    #[rustfmt::skip]
    let all = vec![
        Scenario::new(Path::PodToPodLocal, Sink, "pod-a", to(pod_b, 8080), 3, 210_000),
        Scenario::new(Path::PodToPodRemote, Sink, "pod-a", to(pod_r, 8080), 3, 220_000),
        Scenario::new(Path::PodToPodRemote, Sink, "pod-c", to(pod_r, 8080), 2, 230_000)
            .named("pod_to_pod_remote_secondary_eni"),
        Scenario::new(Path::NodeToPod, Sink, "node", to(pod_b, 8080), 2, 335_000),
        Scenario::new(Path::PodToNode, Sink, "pod-a", to(NODE_IP, 8081), 2, 340_000),
        Scenario::new(Path::PodToService, Sink, "pod-a", to(BACKEND_SERVICE_IP, 80), 3, 240_000)
            .nat(Nat::Dnat),
        Scenario::new(Path::PodToApiserver, Sink, "pod-a", to(KUBERNETES_SERVICE_IP, 443), 2, 250_000)
            .nat(Nat::Dnat).endpoint(Endpoint::Private),
        Scenario::new(Path::NodeToApiserver, Sink, "node", Target::ClusterEndpoint(443), 2, 260_000)
            .endpoint(node_endpoint),
        Scenario::new(Path::ControlplaneToKubelet, Sink, "cp", to(NODE_IP, 10250), 2, 270_000),
        Scenario::new(Path::PodToDns, Dns, "pod-a", to(CLUSTER_DNS, 53), 20, 0).nat(Nat::Dnat),
        Scenario::new(Path::NodeToDns, Dns, "node", to(CLUSTER_DNS, 53), 18, 0).nat(Nat::Dnat),
        Scenario::new(Path::PodToVpcDns, Dns, "pod-a", to(RESOLVER, 53), 16, 0),
        Scenario::new(Path::NodeToVpcDns, Dns, "node", to(RESOLVER, 53), 14, 0),
        Scenario::new(Path::PodToExternal, Http, "pod-a", to(EXTERNAL_HOST, 80), 3, 280_000)
            .nat(Nat::Snat),
        Scenario::new(Path::NodeToExternal, Sink, "node", to(EXTERNAL_HOST, 9000), 2, 290_000),
        Scenario::new(Path::PodToImds, Imds, "pod-a", to(IMDS, 80), 4, 0).nat(Nat::Snat),
        Scenario::new(Path::NodeToImds, Imds, "node", to(IMDS, 80), 4, 0),
        Scenario::new(Path::NodeToNode, Sink, "node", to(NODE2_IP, 8080), 2, 300_000),
        Scenario::new(Path::ExternalToPod, Sink, "inet", to(NODE_IP, NODE_PORT), 2, 310_000)
            .nat(Nat::Dnat),
        Scenario::new(Path::ExternalToNode, Sink, "inet", to(NODE_IP, 8081), 2, 320_000),
        Scenario::new(Path::PodToPodRemote, Sink, "pod-a", to(pod_r, SECURITY_GROUP_DENIED_PORT), 1, 1000)
            .named("dropped_syn").outcome(Outcome::TimedOut),
        Scenario::new(Path::PodToPodRemote, Sink, "pod-a", to(pod_r, CLOSED_PORT), 1, 1000)
            .named("refused").outcome(Outcome::Refused),
    ];
    all
}

/// Runs the scenarios one after the other (so that each one's traffic can be told apart).
/// Fails, after running them all, if a transfer went wrong in a way no outcome explains (a
/// short count, a reset mid-stream, a client that could not run).
pub(super) fn run(lab: &Lab, scenarios: &[Scenario]) -> anyhow::Result<Vec<Sent>> {
    let mut sent = Vec::new();
    let mut failures = Vec::new();
    for scenario in scenarios {
        eprintln!(
            "lab: traffic {}: {} → {} ({} × {})",
            scenario.name,
            scenario.from,
            scenario.to,
            scenario.connections,
            scenario.client.arg()
        );
        match run_client(lab, scenario.from, &client_args(scenario)) {
            Ok(report) => {
                failures.extend(
                    report
                        .errors
                        .iter()
                        .map(|error| format!("{}: {error}", scenario.name)),
                );
                sent.push(report.into_sent(scenario, lab.external_snat()));
            }
            Err(error) => failures.push(format!("{}: {error:#}", scenario.name)),
        }
    }
    if !failures.is_empty() {
        bail!("traffic failed:\n  {}", failures.join("\n  "));
    }
    Ok(sent)
}

fn client_args(scenario: &Scenario) -> Vec<String> {
    let mut args = vec![
        scenario.client.arg(),
        "--to".to_owned(),
        scenario.to.to_string(),
    ];
    if let Target::ClusterEndpoint(_) = scenario.to {
        args.extend([
            "--resolver".to_owned(),
            SocketAddrV4::new(RESOLVER, 53).to_string(),
        ]);
    }
    args.extend([
        "--connections".to_owned(),
        scenario.connections.to_string(),
        "--bytes".to_owned(),
        scenario.bytes_per_connection.to_string(),
    ]);
    args
}

/// Runs `lab client <args>` in `role`'s namespace and reads its report.
pub(super) fn run_client(lab: &Lab, role: &str, args: &[String]) -> anyhow::Result<Report> {
    let mut command = lab.command_in(role, &lab.saved.helper_exe.to_string_lossy());
    command.args(["lab", "client"]).args(args);
    let stdout = crate::run::command_output(&mut command)?;
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("reading the client's report {line:?}"))
}

/// What a client did, printed as one line of JSON on its standard output.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Report {
    /// Where it connected.
    pub to: String,
    pub connections: u32,
    pub connected: u32,
    pub refused: u32,
    pub timed_out: u32,
    pub payload_bytes: u64,
    /// Failures no outcome explains.
    pub errors: Vec<String>,
    /// DNS: the addresses in the last answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<Ipv4Addr>,
}

impl Report {
    pub(crate) fn new(to: SocketAddrV4) -> Self {
        Self {
            to: to.to_string(),
            ..Self::default()
        }
    }

    /// Opens a TCP connection (connect timeout 2 s, read/write timeouts 5 s) and counts how the
    /// attempt ended.
    pub(crate) fn connect(&mut self, attempt: u32, to: SocketAddrV4) -> Option<TcpStream> {
        self.connections += 1;
        let connected =
            TcpStream::connect_timeout(&to.into(), CONNECT_TIMEOUT).and_then(|stream| {
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                stream.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(stream)
            });
        match connected {
            Ok(stream) => {
                self.connected += 1;
                Some(stream)
            }
            Err(error) => {
                self.unanswered(attempt, error.into());
                None
            }
        }
    }

    /// Counts an attempt that got no connection or answer: refused, timed out, or (for any
    /// other reason) an error.
    pub(crate) fn unanswered(&mut self, attempt: u32, error: anyhow::Error) {
        match error.downcast_ref::<io::Error>().map(io::Error::kind) {
            Some(io::ErrorKind::ConnectionRefused) => self.refused += 1,
            Some(io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => self.timed_out += 1,
            _ => self.transfer_failed(attempt, error),
        }
    }

    /// Records a failure after the connection was made.
    pub(crate) fn transfer_failed(&mut self, attempt: u32, error: impl fmt::Display) {
        self.errors
            .push(format!("connection {attempt} to {}: {error:#}", self.to));
    }

    fn into_sent(self, scenario: &Scenario, external_snat: bool) -> Sent {
        let expected_nat = match scenario.expected_nat {
            Nat::Snat if external_snat => Nat::None,
            nat => nat,
        };
        Sent {
            scenario: scenario.name,
            expected_path: scenario.expected_path,
            expected_nat,
            expected_endpoint: scenario.expected_endpoint,
            expected_outcome: scenario.expected_outcome,
            protocol: scenario.client.protocol(),
            to: self.to,
            connections: self.connections,
            connected: self.connected,
            refused: self.refused,
            timed_out: self.timed_out,
            payload_bytes: self.payload_bytes,
        }
    }
}

/// `lab client`: one scenario's initiator, run inside a namespace by [`run`].
#[derive(clap::Args, Debug)]
pub(super) struct ClientArgs {
    kind: ClientKind,
    /// `ip:port`, or `hostname:port` resolved through --resolver.
    #[arg(long)]
    to: String,
    #[arg(long)]
    resolver: Option<SocketAddrV4>,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connections: u32,
    /// Payload bytes per connection (sink, http).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=64 << 20))]
    bytes: u64,
}

/// Runs a client and prints its report as one line of JSON.
pub(super) fn client(args: ClientArgs) -> anyhow::Result<()> {
    let to = match args.to.parse::<SocketAddrV4>() {
        Ok(to) => to,
        Err(_) => resolve_target(&args)?,
    };
    let report = match args.kind {
        ClientKind::Sink => sink::client(to, args.connections, args.bytes),
        ClientKind::Http => http::upload_client(to, args.connections, args.bytes),
        ClientKind::Dns => dns::client(to, args.connections, CLUSTER_ENDPOINT),
        ClientKind::Imds => imds::client(to, args.connections),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// `hostname:port` → the first address the resolver gives.
fn resolve_target(args: &ClientArgs) -> anyhow::Result<SocketAddrV4> {
    let (name, port) = args
        .to
        .rsplit_once(':')
        .and_then(|(name, port)| Some((name, port.parse().ok()?)))
        .with_context(|| format!("--to {}: expected ip:port or hostname:port", args.to))?;
    let resolver = args
        .resolver
        .with_context(|| format!("--to {}: a hostname needs --resolver", args.to))?;
    let addresses = dns::resolve(resolver, name)?;
    Ok(SocketAddrV4::new(addresses[0], port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_cover_every_path_with_distinct_sizes() {
        let all = scenarios(EndpointMode::Public);
        let mut names: Vec<_> = all.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len(), "scenario names must be unique");
        let mut totals: Vec<u64> = all
            .iter()
            .filter(|s| s.client != ClientKind::Dns && s.client != ClientKind::Imds)
            .filter(|s| s.expected_outcome == Outcome::Connected)
            .map(|s| u64::from(s.connections) * s.bytes_per_connection)
            .collect();
        assert!(
            totals
                .iter()
                .all(|total| (100_000..=2_000_000).contains(total))
        );
        totals.sort_unstable();
        totals.dedup();
        assert_eq!(totals.len(), 14, "sizes must differ between scenarios");
        // Every path but `Unknown`, which no traffic is meant to take.
        for path in Path::ALL.into_iter().filter(|path| *path != Path::Unknown) {
            assert!(
                all.iter().any(|s| s.expected_path == path),
                "no scenario for {path}"
            );
        }
    }

    #[test]
    fn the_node_reaches_the_api_server_as_the_mode_says() {
        let endpoint = |mode| {
            scenarios(mode)
                .into_iter()
                .find(|s| s.name == Path::NodeToApiserver.as_str())
                .unwrap()
                .expected_endpoint
        };
        assert_eq!(endpoint(EndpointMode::Public), Some(Endpoint::Public));
        assert_eq!(
            endpoint(EndpointMode::PublicPrivate),
            Some(Endpoint::Private)
        );
        assert_eq!(endpoint(EndpointMode::Private), Some(Endpoint::Private));
    }

    #[test]
    fn external_snat_turns_expected_snat_into_none() {
        let scenario = scenarios(EndpointMode::Public)
            .into_iter()
            .find(|s| s.name == Path::PodToExternal.as_str())
            .unwrap();
        assert_eq!(
            Report::default().into_sent(&scenario, false).expected_nat,
            Nat::Snat
        );
        assert_eq!(
            Report::default().into_sent(&scenario, true).expected_nat,
            Nat::None
        );
    }
}
