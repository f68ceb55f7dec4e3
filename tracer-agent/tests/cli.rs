//! The `tracer` binary's answers to bad usage, bad configuration and bad environments: a short
//! message naming the flag (and the file, for `--config`) and what is wrong, exit code 2 for
//! usage/configuration, 1 for the runtime; never a panic.
//!
//! Each case runs the real binary from a thread that has moved to a fresh network namespace
//! (gone with the thread), so the host's interfaces are never seen, let alone attached to.
use std::{
    net::TcpListener,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tracer_common::test_support::netns::{self, Netns};

const NEED_ROOT: &str = "these tests need root to create network namespaces";

/// Longer than any failing start takes; a case still running then did not fail at all.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What the namespace holds when the binary starts.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    /// Only loopback.
    Empty,
    /// A pod-like veth `eni0` and a node-like `eth0`, so that interface discovery succeeds.
    Interfaces,
    /// Interfaces, and a listener on 127.0.0.1:9477, the address the case asks the agent for.
    PortTaken,
}

/// How a run ended.
struct Ended {
    /// `None` when it was still running after `TIMEOUT` (and was killed).
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `tracer args` in a fresh namespace prepared as `setup`.
fn run_in_fresh_netns(setup: Setup, args: Vec<String>) -> Ended {
    run_in_fresh_netns_with_env(setup, args, &[])
}

/// Runs `tracer args` with the environment variables `env` in a fresh namespace prepared as
/// `setup`.
fn run_in_fresh_netns_with_env(
    setup: Setup,
    args: Vec<String>,
    env: &'static [(&'static str, &'static str)],
) -> Ended {
    netns::run_in(Netns::Fresh, move || {
        if setup != Setup::Empty {
            add_interfaces();
        }
        // Held until the run ends.
        let _listener = (setup == Setup::PortTaken)
            .then(|| TcpListener::bind("127.0.0.1:9477").expect("binding 127.0.0.1:9477"));
        run_bounded(
            Command::new(env!("CARGO_BIN_EXE_tracer"))
                .args(&args)
                .envs(env.iter().copied()),
        )
    })
    .unwrap_or_else(|error| panic!("{NEED_ROOT}: {error}"))
}

/// Adds the veth pair of `Setup::Interfaces` to the calling thread's namespace.
fn add_interfaces() {
    netns::ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eni0",
    ])
    .unwrap_or_else(|error| panic!("{error}"));
}

/// Runs `command` (from the calling thread, so in its namespace) for at most `TIMEOUT`.
/// Its output is small: the pipes never fill while it runs.
fn run_bounded(command: &mut Command) -> Ended {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tracer binary starts");
    let started = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("waiting for tracer") {
            break status.code();
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |pipe: &mut dyn std::io::Read| {
        let mut text = String::new();
        pipe.read_to_string(&mut text).expect("reading the output");
        text
    };
    let stdout = read(child.stdout.as_mut().expect("stdout is piped"));
    let stderr = read(child.stderr.as_mut().expect("stderr is piped"));
    Ended {
        code,
        stdout,
        stderr,
    }
}

/// One bad invocation and the words its message must contain.
struct Case {
    args: &'static str,
    /// A `--config` file's content, appended to the arguments as `--config PATH`.
    config: Option<&'static str>,
    setup: Setup,
    expected: &'static [&'static str],
}

const fn flags(args: &'static str, expected: &'static [&'static str]) -> Case {
    Case {
        args,
        config: None,
        setup: Setup::Empty,
        expected,
    }
}

const fn file(args: &'static str, config: &'static str, expected: &'static [&'static str]) -> Case {
    Case {
        args,
        config: Some(config),
        setup: Setup::Empty,
        expected,
    }
}

/// Every way to get the configuration wrong that the binary must refuse with exit code 2.
const BAD_CONFIGURATION: &[Case] = &[
    // Address blocks.
    flags(
        "agent --vpc-cidr banana",
        &["--vpc-cidr", "not a CIDR block"],
    ),
    flags(
        "agent --vpc-cidr 10.0.0.0",
        &["--vpc-cidr", "not a CIDR block"],
    ),
    flags(
        "agent --vpc-cidr 10.0.1.7/16",
        &["--vpc-cidr", "host bits set", "10.0.0.0/16"],
    ),
    flags(
        "agent --vpc-cidr 10.0.0.0/33",
        &["--vpc-cidr", "prefix length larger"],
    ),
    flags(
        "agent --vpc-cidr fd00::/129",
        &["--vpc-cidr", "prefix length larger"],
    ),
    flags(
        "agent --service-cidr 10.100.0.0/-1",
        &["--service-cidr", "not a CIDR block"],
    ),
    // Addresses. No flag is IPv4-only; an address of the wrong family shows as a contradiction.
    flags(
        "agent --cluster-dns 10.100.0",
        &["--cluster-dns", "invalid"],
    ),
    flags(
        "agent --apiserver-ip api.example",
        &["--apiserver-ip", "invalid"],
    ),
    flags(
        "agent --controlplane-ip 10.0.1.300",
        &["--controlplane-ip", "invalid"],
    ),
    flags("agent --metrics-addr 9477", &["--metrics-addr", "invalid"]),
    // Who may read the agent, and its certificate.
    flags(
        "agent --metrics-auth maybe",
        &["--metrics-auth", "token", "none"],
    ),
    flags(
        "agent --tls-cert-file /nonexistent/tls.crt",
        &["--tls-key-file"],
    ),
    flags(
        "agent --tls-cert-file /nonexistent/tls.crt --tls-key-file /nonexistent/tls.key",
        &["--tls-cert-file", "/nonexistent/tls.crt", "No such file"],
    ),
    flags(
        "agent --metrics-addr 127.0.0.1:99999",
        &["--metrics-addr", "invalid"],
    ),
    flags(
        "agent --imds-addr 169.254.169.254",
        &["--imds-addr", "invalid"],
    ),
    flags(
        "agent --service-cidr 10.100.0.0/16 --cluster-dns fd00::a",
        &[
            "--cluster-dns",
            "--service-cidr",
            "outside every service CIDR",
        ],
    ),
    // Facts that cannot all be true.
    flags(
        "agent --vpc-cidr 10.0.0.0/16 --vpc-cidr 10.0.0.0/8",
        &["--vpc-cidr", "overlap"],
    ),
    flags(
        "agent --vpc-cidr 10.0.0.0/16 --service-cidr 10.0.128.0/20",
        &["--service-cidr", "--vpc-cidr"],
    ),
    flags(
        "agent --vpc-cidr 10.0.0.0/16 --controlplane-ip 192.0.2.50",
        &["--controlplane-ip", "outside every VPC CIDR"],
    ),
    // Durations.
    flags(
        "agent --poll-interval 0s",
        &["--poll-interval", "between 100ms and 60s"],
    ),
    flags(
        "agent --poll-interval -1s",
        &["--poll-interval", "negative"],
    ),
    flags(
        "agent --poll-interval=-500ms",
        &["--poll-interval", "negative"],
    ),
    flags("agent --poll-interval 1", &["--poll-interval", "no unit"]),
    flags(
        "agent --poll-interval 1h",
        &["--poll-interval", "unit must be ms, s or m"],
    ),
    flags(
        "agent --poll-interval soon",
        &["--poll-interval", "whole number"],
    ),
    flags(
        "agent --syn-timeout 10ms",
        &["--syn-timeout", "between 100ms and 60s"],
    ),
    flags("agent --syn-timeout -3s", &["--syn-timeout", "negative"]),
    flags(
        "agent --resolve-interval 2m",
        &["--resolve-interval", "between 100ms and 60s"],
    ),
    // Table size.
    flags(
        "agent --flow-table-size 0",
        &["--flow-table-size", "1024..=16777216"],
    ),
    flags(
        "agent --flow-table-size 1023",
        &["--flow-table-size", "1024..=16777216"],
    ),
    flags(
        "agent --flow-table-size 16777217",
        &["--flow-table-size", "1024..=16777216"],
    ),
    flags("agent --flow-table-size -5", &["--flow-table-size", "-5"]),
    flags(
        "agent --flow-table-size lots",
        &["--flow-table-size", "lots"],
    ),
    // Exposition and the Kubernetes API.
    flags("agent --max-series 0", &["--max-series", "1..=10000000"]),
    flags(
        "agent --workload-metrics 0",
        &["--workload-metrics", "1..=1000"],
    ),
    flags(
        "agent --workload-metrics 5000",
        &["--workload-metrics", "1..=1000"],
    ),
    flags(
        "agent --kubernetes maybe",
        &["--kubernetes", "possible values: auto, on, off"],
    ),
    flags(
        "agent --kubeconfig /nonexistent/kubeconfig --node-name ip-10-0-1-10",
        &["--kubeconfig /nonexistent/kubeconfig", "No such file"],
    ),
    flags(
        "agent --kubeconfig /proc/version --node-name ip-10-0-1-10",
        &["--kubeconfig /proc/version", "parse"],
    ),
    flags(
        "agent --kubeconfig /proc/version --kubernetes off",
        &["--kubeconfig", "--kubernetes off"],
    ),
    flags(
        "agent --kubeconfig",
        &["--kubeconfig", "a value is required"],
    ),
    // Attach mode.
    flags(
        "agent --attach-mode xdp",
        &["--attach-mode", "possible values: auto, tcx, clsact"],
    ),
    // Interface patterns.
    flags("agent --pod-iface eni?", &["--pod-iface", "only * is"]),
    flags(
        "agent --node-iface eth[0-9]",
        &["--node-iface", "only * is"],
    ),
    flags(
        "agent --pod-iface eni0:1",
        &["--pod-iface", "cannot appear in an interface name"],
    ),
    flags("agent --pod-iface ", &["--pod-iface", "empty pattern"]),
    flags(
        "agent --node-iface ens-with-a-long-name*",
        &["--node-iface", "at most 15"],
    ),
    // tracer top.
    flags(
        "top --agent ftp://node:9477",
        &["--agent", "must start with http://"],
    ),
    flags("top --limit 0", &["--limit", "1..=1000"]),
    flags("top --interval -1s", &["--poll-interval", "negative"]),
    flags("top --once", &["--json"]),
    // Usage.
    flags("agent --no-such-flag", &["--no-such-flag"]),
    flags("agent --vpc-cidr", &["--vpc-cidr", "a value is required"]),
    flags("frobnicate", &["frobnicate"]),
    // Configuration files: the flag a key stands for and the file are named.
    file(
        "agent",
        "vpc-cidr = [\"10.0.1.7/16\"]",
        &["--vpc-cidr", "host bits set", "--config"],
    ),
    file(
        "agent",
        "poll-interval = \"0s\"",
        &["--poll-interval", "--config"],
    ),
    file(
        "agent",
        "flow-table-size = 12",
        &["--flow-table-size", "--config"],
    ),
    file(
        "agent",
        "flow-table-size = \"big\"",
        &["--flow-table-size", "--config"],
    ),
    file(
        "agent",
        "attach-mode = \"xdp\"",
        &["--attach-mode", "--config"],
    ),
    file(
        "agent",
        "pod-iface = [\"eni?\"]",
        &["--pod-iface", "only * is", "--config"],
    ),
    file(
        "agent",
        "metrics_addr = \"127.0.0.1:1\"",
        &["--metrics_addr", "--config"],
    ),
    file(
        "agent",
        "kubeconfig = \"/nonexistent/kubeconfig\"\nnode-name = \"ip-10-0-1-10\"",
        &["--kubeconfig /nonexistent/kubeconfig", "--config"],
    ),
    file("agent", "vpc-cidr = [", &["--config", "not valid TOML"]),
    file(
        "agent",
        "[agent]\nvpc-cidr = \"10.0.0.0/16\"",
        &["--config", "key \"agent\""],
    ),
    file(
        "agent",
        "vpc-cidr = [\"10.0.0.0/16\", \"10.0.0.0/8\"]",
        &["--vpc-cidr", "overlap", "--config"],
    ),
    flags(
        "agent --config /nonexistent/tracer.toml",
        &["cannot read --config", "/nonexistent/tracer.toml"],
    ),
    flags("agent --config", &["--config needs a file name"]),
    // The environment contradicts the flags.
    flags(
        "agent --metrics-addr 127.0.0.1:0",
        &["no interface matches --pod-iface"],
    ),
    Case {
        args: "agent --metrics-addr 127.0.0.1:9477",
        config: None,
        setup: Setup::PortTaken,
        expected: &["cannot listen on --metrics-addr 127.0.0.1:9477"],
    },
    // Restarts without loss: both flags or neither, and the pins on a bpffs.
    flags("agent --pin-path /sys/fs/bpf/tracer", &["--state-file"]),
    flags("agent --state-file /tmp/tracer-state", &["--pin-path"]),
    // The agent's pod, for the handover at SIGTERM: both or neither.
    flags("agent --pod-name tracer-agent-x7k2p", &["--pod-namespace"]),
    flags("agent --pod-namespace tracer", &["--pod-name"]),
    Case {
        args: "agent --metrics-addr 127.0.0.1:0 --pin-path /tmp --state-file /tmp/tracer-cli-state",
        config: None,
        setup: Setup::Interfaces,
        expected: &["--pin-path", "/tmp", "not on a bpffs"],
    },
    Case {
        args: "agent --metrics-addr 127.0.0.1:0 --pod-iface vlan* --node-iface ens*",
        config: None,
        setup: Setup::Interfaces,
        expected: &["no interface matches --pod-iface [\"vlan*\"]"],
    },
    // `tracer prepare`.
    flags(
        "prepare --owner nobody /tmp/tracer-cli-prepare",
        &["--owner", "not a numeric id"],
    ),
    flags(
        "prepare --owner 65532:x /tmp/tracer-cli-prepare",
        &["--owner", "\"x\" is not a numeric id"],
    ),
    flags("prepare --owner 65532", &["<DIR>"]),
    // The logs' format, global to every subcommand.
    flags(
        "agent --log-format xml",
        &["--log-format", "'xml'", "text", "json"],
    ),
    flags(
        "--log-format yaml prepare --owner 0 /tmp/tracer-cli-prepare",
        &["--log-format", "'yaml'"],
    ),
    file(
        "agent",
        "log-format = \"logfmt\"",
        &["--log-format", "'logfmt'"],
    ),
];

/// Splits a case's arguments on spaces; a trailing space stands for an empty last argument.
fn argv(args: &str) -> Vec<String> {
    args.split(' ').map(str::to_owned).collect()
}

fn config_dir() -> PathBuf {
    std::env::temp_dir().join(format!("tracer-cli-{}", std::process::id()))
}

/// Writes a case's configuration file; returns its path.
fn write_config(n: usize, text: &str) -> PathBuf {
    let path = config_dir().join(format!("case-{n}.toml"));
    std::fs::create_dir_all(config_dir()).expect("temp dir");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn bad_configuration_is_refused_with_exit_code_2_naming_the_flag() {
    let started = Instant::now();
    let mut failures = Vec::new();
    for (n, case) in BAD_CONFIGURATION.iter().enumerate() {
        let mut args = argv(case.args);
        if let Some(text) = case.config {
            args.push("--config".into());
            args.push(write_config(n, text).display().to_string());
        }
        let shown = format!("tracer {}", args.join(" "));
        let ended = run_in_fresh_netns(case.setup, args);
        let stderr = ended.stderr.trim_end();
        let missing: Vec<&str> = case
            .expected
            .iter()
            .copied()
            .filter(|word| !stderr.contains(word))
            .collect();
        if ended.code != Some(2) || !missing.is_empty() || stderr.contains("panicked") {
            let how = match ended.code {
                Some(code) => format!("exit code {code}"),
                None => format!("still running after {TIMEOUT:?}"),
            };
            failures.push(format!(
                "{shown}\n  {how}, missing {missing:?} in:\n  {}",
                stderr.replace('\n', "\n  ")
            ));
        }
    }
    let _ = std::fs::remove_dir_all(config_dir());
    eprintln!(
        "{} bad configurations checked in {:.1?}",
        BAD_CONFIGURATION.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} bad configurations were not refused as they should be:\n{}",
        failures.len(),
        BAD_CONFIGURATION.len(),
        failures.join("\n")
    );
}

#[test]
fn prepare_makes_the_directories_and_gives_them_away() {
    let root = std::env::temp_dir().join(format!("tracer-cli-prepare-{}", std::process::id()));
    let (pins, state) = (root.join("bpf/tracer"), root.join("run/tracer"));
    let run = |owner: &str| {
        Command::new(env!("CARGO_BIN_EXE_tracer"))
            .args(["prepare", "--owner", owner])
            .args([&pins, &state])
            .output()
            .expect("run tracer prepare")
    };
    let first = run("65532:65533");
    let second = run("65532:65533");
    let owned = |dir: &std::path::Path| {
        let metadata = std::fs::metadata(dir).expect("prepared");
        (metadata.uid(), metadata.gid(), metadata.mode() & 0o7777)
    };
    let found = [owned(&pins), owned(&state)];
    let _ = std::fs::remove_dir_all(&root);
    for output in [first, second] {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(found, [(65532, 65533, 0o700); 2], "uid, gid and mode");
}

#[test]
fn missing_privileges_are_a_runtime_error_that_says_what_is_needed() {
    let drop_everything = "--reuid 65534 --regid 65534 --clear-groups --inh-caps=-all";
    let ended = netns::run_in(Netns::Fresh, move || {
        add_interfaces();
        run_bounded(
            Command::new("setpriv")
                .args(drop_everything.split(' '))
                .args([env!("CARGO_BIN_EXE_tracer"), "agent"])
                .args(["--metrics-addr", "127.0.0.1:0"]),
        )
    })
    .unwrap_or_else(|error| panic!("{NEED_ROOT}: {error}"));
    assert_eq!(ended.code, Some(1), "stderr: {}", ended.stderr);
    assert!(ended.stderr.contains("CAP_BPF"), "{}", ended.stderr);
}

#[test]
fn a_config_file_sets_flags() {
    let path = write_config(
        BAD_CONFIGURATION.len(),
        "vpc-cidr = [\"10.0.0.0/16\"]\nservice-cidr = \"10.100.0.0/16\"\njson = true\n",
    );
    let args = ["explain", "10.0.1.7", "10.100.0.1:443", "--config"]
        .map(String::from)
        .into_iter()
        .chain([path.display().to_string()])
        .collect();
    let ended = run_in_fresh_netns(Setup::Empty, args);
    let _ = std::fs::remove_dir_all(config_dir());
    assert_eq!(ended.code, Some(0), "{}", ended.stderr);
    assert!(
        ended.stdout.contains("10.0.0.0/16 (--vpc-cidr)"),
        "{}",
        ended.stdout
    );
    assert!(
        ended.stdout.contains("\"path\": \"unknown\""),
        "{}",
        ended.stdout
    );
}

#[test]
fn json_logs_are_one_object_per_line_with_level_message_and_fields() {
    // The agent gets as far as loading the datapath, then fails to listen: every record on the
    // way, aya's too (through the `log` bridge, at debug), and the failure itself are JSON.
    let ended = run_in_fresh_netns_with_env(
        Setup::PortTaken,
        argv("--log-format json agent --metrics-addr 127.0.0.1:9477"),
        &[("RUST_LOG", "debug")],
    );
    assert_eq!(ended.code, Some(2), "{}", ended.stderr);
    let records: Vec<serde_json::Value> = ended
        .stderr
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|error| panic!("{error} in {line:?}"))
        })
        .collect();
    for record in &records {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(record[key].is_string(), "no {key} in {record}");
        }
    }
    let loaded = records
        .iter()
        .find(|record| record["message"] == "datapath loaded")
        .unwrap_or_else(|| panic!("no \"datapath loaded\" in:\n{}", ended.stderr));
    assert_eq!(loaded["level"], "INFO", "{loaded}");
    assert!(
        loaded["entries"].is_u64(),
        "the values are fields: {loaded}"
    );
    assert!(
        records.iter().any(|record| record["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("aya"))),
        "no record of aya's (it logs through `log`):\n{}",
        ended.stderr
    );
    let last = records.last().expect("some records");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|message| message.contains("cannot listen on --metrics-addr")),
        "{last}"
    );
}
