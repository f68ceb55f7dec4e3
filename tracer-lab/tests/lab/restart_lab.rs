//! The agent killed with SIGKILL 20 times in the lab node (10 times attached with tcx, then
//! 10 times with clsact) and started again each time: nothing of a killed agent outlives its
//! successor's start (no program stays loaded, no filter stays attached: a clsact filter
//! outlives its process, so the successor removes it), each successor holds exactly one program
//! per hook, and the last one counts traffic and leaves nothing behind when stopped.
//!
//! There, without `--pin-path`, a restart is a counter reset and what passes while no agent
//! runs is not counted. With `--pin-path` and `--state-file`, the second test kills the agent
//! 20 times in the middle of a stream and of new connections: no byte goes uncounted, no
//! counter of /metrics ever goes back, each successor takes the links over in place and the
//! killed agents' programs are gone.
//!
//! The third runs the agent as the DaemonSet does, knowing its pod, against the Kubernetes API
//! stand-in: SIGTERM while the DaemonSet stands (a rolling update) hands over — the links stay,
//! the successor takes them over in place and carries the counts on — and SIGTERM once it is
//! gone (an uninstall) leaves no pin, no state and no program.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::{Shutdown, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use kube_standin::{
    Kind,
    objects::{daemonset, pod},
};
use tracer_common::labels::Path;
use tracer_lab::{
    agent::{self, LabAgent},
    build,
    lab::{self, Bpffs, EndpointMode, Lab, Target, exec},
    scrape::{self, Sample},
    testing,
};

use crate::support;

const KILLS: usize = 20;
const WORKLOAD_BYTES: &str = "tracer_workload_bytes_total";

fn start(lab: &Lab, mode: &str) -> LabAgent {
    start_with(lab, mode, Vec::new())
}

fn start_with(lab: &Lab, mode: &str, extra: Vec<String>) -> LabAgent {
    let mut flags = agent::quick_flags();
    flags.extend(agent::context_flags(lab));
    flags.extend(["--attach-mode".into(), mode.into()]);
    flags.extend(extra);
    let mut agent = LabAgent::start_with(lab, &build::tracer_path(), flags).expect("agent start");
    agent
        .wait_ready(Duration::from_secs(15))
        .expect("agent ready");
    agent
}

/// Those of `programs` still loaded, once the kernel has had up to a second to free them: a
/// program that only a removed clsact filter held is released by a deferred work item.
fn still_loaded<'a>(programs: impl IntoIterator<Item = &'a u64>) -> Vec<u64> {
    let programs: BTreeSet<u64> = programs.into_iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        // A program freed between the kernel listing its id and our asking for it is gone.
        let loaded: BTreeSet<u64> = aya::programs::loaded_programs()
            .filter_map(|program| match program {
                Ok(program) => Some(u64::from(program.id())),
                Err(aya::programs::ProgramError::SyscallError(error))
                    if error.io_error.kind() == std::io::ErrorKind::NotFound =>
                {
                    None
                }
                Err(error) => panic!("reading a loaded program: {error}"),
            })
            .collect();
        let left: Vec<u64> = programs.intersection(&loaded).copied().collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The node's interfaces but `lo`, as `ip link` lists them.
fn node_interfaces(lab: &Lab) -> Vec<String> {
    let links = Command::new("ip")
        .args(["-n", &lab.ns("node"), "-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| name != "lo")
        .collect()
}

/// The tracer's clsact filters on each of the node's interfaces, as `tc` lists them.
fn clsact_filters(lab: &Lab) -> Vec<String> {
    let names = node_interfaces(lab);
    let mut filters = Vec::new();
    for name in names {
        for hook in ["ingress", "egress"] {
            let listing = lab
                .command_in("node", "tc")
                .args(["filter", "show", "dev", &name, hook])
                .output()
                .expect("tc filter show");
            filters.extend(
                String::from_utf8_lossy(&listing.stdout)
                    .lines()
                    .filter(|line| line.contains(" tracer_"))
                    .map(|line| format!("{name} {hook}: {line}")),
            );
        }
    }
    filters
}

#[test]
fn killed_agents_leave_nothing_behind_once_restarted() {
    testing::require_root();
    let lab = testing::lab(EndpointMode::Public, env!("CARGO_BIN_EXE_tracer-lab"));
    let traced = {
        let agent = start(&lab, "tcx");
        let linked = agent.linked_ifindexes().len();
        agent.stop().expect("stop");
        linked
    };
    assert!(traced >= 2, "the agent attached to no interface");

    let mut killed: BTreeSet<u64> = BTreeSet::new();
    let mut failures = Vec::new();
    for kill in 0..=KILLS {
        // A node keeps its kernel, and so its attach mode, across restarts: half the kills
        // with each.
        let mode = if kill < KILLS / 2 { "tcx" } else { "clsact" };
        let agent = start(&lab, mode);
        let outlived = still_loaded(&killed);
        if !outlived.is_empty() {
            failures.push(format!(
                "start {kill} ({mode}): programs {outlived:?} of killed agents are still loaded"
            ));
        }
        let filters = clsact_filters(&lab);
        let expected = if mode == "clsact" { traced } else { 0 };
        if filters.len() != expected {
            failures.push(format!(
                "start {kill} ({mode}): {} tracer clsact filters, expected {expected}:\n  {}",
                filters.len(),
                filters.join("\n  ")
            ));
        }
        if kill == KILLS {
            // The last one: it counts, and a clean stop leaves nothing.
            let scenario = lab::scenarios(EndpointMode::Public)
                .into_iter()
                .find(|s| s.name == Path::PodToPodLocal.as_str())
                .expect("a pod_to_pod_local scenario");
            let series = [
                ("path", Path::PodToPodLocal.as_str()),
                ("direction", "forward"),
            ];
            let before = scrape::sum(
                &agent.scrape().expect("scrape"),
                "tracer_path_bytes_total",
                &series,
            );
            let sent = lab.run_traffic(&[scenario]).expect("traffic").remove(0);
            std::thread::sleep(Duration::from_millis(900));
            let after = scrape::sum(
                &agent.scrape().expect("scrape"),
                "tracer_path_bytes_total",
                &series,
            );
            let grew = after - before;
            let payload = sent.payload_bytes as f64;
            if !(grew >= payload && grew <= payload * 1.25 + 20_000.0) {
                failures.push(format!(
                    "after {KILLS} kills: pod_to_pod_local grew by {grew} for {payload} bytes sent"
                ));
            }
            let ours = agent.programs();
            let (_, code) = agent.stop().expect("stop");
            assert_eq!(code, Some(0), "SIGTERM ends the agent with 0");
            let left = still_loaded(ours.iter().chain(&killed));
            if !left.is_empty() || !clsact_filters(&lab).is_empty() {
                failures.push(format!(
                    "after the last stop: programs {left:?} loaded, filters {:?}",
                    clsact_filters(&lab)
                ));
            }
        } else {
            killed.extend(agent.programs());
            // Dropping the handle kills the agent with SIGKILL: no chance to detach.
            drop(agent);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    lab.down().expect("lab down");
}

/// The programs tcx runs on each hook of each of the node's interfaces, by id, as the kernel
/// lists them (what `bpftool net` would show with tcx support).
fn tcx_programs(lab: &Lab) -> BTreeMap<String, Vec<u32>> {
    let names = node_interfaces(lab);
    exec::within(&lab.ns("node"), move || {
        let mut programs = BTreeMap::new();
        for name in names {
            for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                let (_, listed) = SchedClassifier::query_tcx(&name, hook)?;
                if !listed.is_empty() {
                    programs.insert(
                        format!("{name} {hook:?}"),
                        listed.iter().map(|program| program.id()).collect(),
                    );
                }
            }
        }
        Ok(programs)
    })
    .expect("listing tcx programs in the node namespace")
}

/// Counters that belong to the agent's process (`process_*`) restart with it by definition.
fn counters(samples: &[Sample]) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter(|sample| !sample.name.starts_with("process_"))
        .filter(|sample| {
            ["_total", "_count", "_sum", "_bucket"]
                .iter()
                .any(|suffix| sample.name.ends_with(suffix))
        })
        .map(|sample| (format!("{}{:?}", sample.name, sample.labels), sample.value))
        .collect()
}

/// The counters of `now` below their value in `seen`, described as seen `when`.
fn went_back(seen: &BTreeMap<String, f64>, now: &BTreeMap<String, f64>, when: &str) -> Vec<String> {
    now.iter()
        .filter_map(|(series, value)| {
            let before = seen.get(series).filter(|before| value < *before)?;
            Some(format!(
                "{when}: {series} went back from {before} to {value}"
            ))
        })
        .collect()
}

/// A TCP stream from pod-a to pod-b's sink that writes 16 KiB every 10 ms until told to stop:
/// one connection that outlives every agent. Returns the bytes written, checked by the sink.
fn stream(
    lab: &Lab,
    to: std::net::SocketAddrV4,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let ns = lab.ns("pod-a");
    std::thread::spawn(move || {
        exec::within(&ns, move || {
            let mut connection = TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))?;
            let chunk = vec![7u8; 16 * 1024];
            let mut written = 0u64;
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                connection.write_all(&chunk)?;
                written += chunk.len() as u64;
                std::thread::sleep(Duration::from_millis(10));
            }
            connection.shutdown(Shutdown::Write)?;
            let mut count = [0u8; 8];
            std::io::Read::read_exact(&mut connection, &mut count)?;
            anyhow::ensure!(
                u64::from_be_bytes(count) == written,
                "the sink counted otherwise"
            );
            Ok(written)
        })
        .expect("the stream")
    })
}

/// One agent per pin directory and state file: a second one started with the same flags (a
/// DaemonSet with maxSurge) exits 2 saying so, before it touches the pins; the first keeps
/// every hook.
fn second_agent_is_refused(lab: &Lab, flags: &[String], first: &LabAgent) {
    let before = tcx_programs(lab);
    let ended = lab
        .command_in("node", &build::tracer_path().to_string_lossy())
        .args(["agent", "--metrics-addr", "127.0.0.1:0"])
        .args(flags)
        .output()
        .expect("run a second agent");
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert_eq!(ended.status.code(), Some(2), "{stderr}");
    let holder = format!("in use by another agent (pid {})", first.pid());
    assert!(stderr.contains(&holder), "{stderr}");
    assert_eq!(
        tcx_programs(lab),
        before,
        "the refused agent changed the hooks"
    );
}

#[test]
fn pinned_agents_killed_mid_traffic_lose_no_byte_and_no_counter_goes_back() {
    testing::require_root();
    let lab = testing::lab(EndpointMode::Public, env!("CARGO_BIN_EXE_tracer-lab"));
    let bpffs = Bpffs::mount(&lab).expect("a bpffs for the pins");
    let pins = bpffs.pin_path();
    let state = agent::state_file(&lab);
    let flags = agent::restart_flags(&lab, &bpffs);
    let burst = testing::scenarios(EndpointMode::Public, &[Path::PodToPodLocal.as_str()]);
    let Target::Addr(pod_b) = burst[0].to else {
        panic!("pod_to_pod_local goes to an address");
    };
    let series = [
        ("path", Path::PodToPodLocal.as_str()),
        ("direction", "forward"),
    ];

    let mut agent = start_with(&lab, "tcx", flags.clone());
    let traced = tcx_programs(&lab).len();
    second_agent_is_refused(&lab, &flags, &agent);
    let stop = Arc::new(AtomicBool::new(false));
    let streaming = stream(&lab, pod_b, Arc::clone(&stop));
    let mut sent_in_bursts = 0u64;
    let mut seen: BTreeMap<String, f64> = BTreeMap::new();
    let mut killed: BTreeSet<u64> = BTreeSet::new();
    let mut failures = Vec::new();
    for kill in 1..=KILLS {
        std::thread::sleep(Duration::from_millis(250));
        let now = counters(&agent.scrape().expect("scrape"));
        failures.extend(went_back(&seen, &now, &format!("before kill {kill}")));
        seen.extend(now);
        killed.extend(agent.programs());
        // Dropping the handle kills the agent with SIGKILL: no chance to detach or save.
        drop(agent);
        if kill % 4 == 0 {
            // New connections while no agent runs: the pinned datapath counts them alone.
            let sent = lab.run_traffic(&burst).expect("traffic").remove(0);
            sent_in_bursts += sent.payload_bytes;
        }
        agent = start_with(&lab, "tcx", flags.clone());
        let outlived = still_loaded(&killed);
        if !outlived.is_empty() {
            failures.push(format!(
                "after kill {kill}: programs {outlived:?} of killed agents still loaded"
            ));
        }
        let ours: BTreeSet<u32> = agent.programs().iter().map(|id| *id as u32).collect();
        let hooks = tcx_programs(&lab);
        let foreign: Vec<_> = hooks
            .iter()
            .filter(|(_, ids)| ids.len() != 1 || !ours.contains(&ids[0]))
            .collect();
        if hooks.len() != traced || !foreign.is_empty() {
            failures.push(format!(
                "after kill {kill}: {} hooks hold programs (expected {traced}, one of ours each): {foreign:?}",
                hooks.len()
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let streamed = streaming.join().expect("stream thread");
    std::thread::sleep(Duration::from_millis(600));
    let samples = agent.scrape().expect("scrape");
    let counted = scrape::sum(&samples, "tracer_path_bytes_total", &series);
    let sent = streamed + sent_in_bursts;
    eprintln!(
        "restart without loss: {KILLS} kills, {sent} payload bytes sent ({streamed} on one stream), {counted} L3 bytes counted"
    );
    if !scrape::counts_payload(counted, sent) {
        failures.push(format!("pod_to_pod_local forward counted {counted} for {sent} payload bytes sent across {KILLS} kills"));
    }
    failures.extend(went_back(&seen, &counters(&samples), "at the end"));
    let ours = agent.programs();
    let (_, code) = agent.stop().expect("stop");
    assert_eq!(code, Some(0), "SIGTERM ends the agent with 0");
    let left = still_loaded(ours.iter().chain(&killed));
    if !left.is_empty() || !tcx_programs(&lab).is_empty() || pins.exists() || state.exists() {
        failures.push(format!(
            "after the clean stop: programs {left:?} loaded, tcx {:?}, pins left: {}, state left: {}",
            tcx_programs(&lab),
            pins.exists(),
            state.exists()
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    drop(bpffs);
    lab.down().expect("lab down");
}

const NODE: &str = "ip-10-0-1-10.lab-1.compute.internal";
const NAMESPACE: &str = "tracer";
const DAEMONSET: &str = "tracer-agent";
const POD: &str = "tracer-agent-x7k2p";

#[test]
fn sigterm_hands_over_while_the_daemonset_stands_and_cleans_up_once_it_is_gone() {
    testing::require_root();
    let lab = testing::lab(EndpointMode::Public, env!("CARGO_BIN_EXE_tracer-lab"));
    let bpffs = Bpffs::mount(&lab).expect("a bpffs for the pins");
    let pins = bpffs.pin_path();
    let state = agent::state_file(&lab);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let stand_in = support::stand_in_in(&lab, &runtime);
    stand_in.apply(
        Kind::Pods,
        pod(NAMESPACE, POD, NODE, None, Some(("DaemonSet", DAEMONSET))),
    );
    stand_in.apply(Kind::DaemonSets, daemonset(NAMESPACE, DAEMONSET));
    // The streaming pod belongs to a workload: its series must go on across the handover too.
    let pod_a = lab.facts().pod_ips["pod-a"].to_string();
    stand_in.apply(
        Kind::Pods,
        pod(
            "default",
            "pod-a",
            NODE,
            Some(&pod_a),
            Some(("ReplicaSet", "web-5d9f7c8b6")),
        ),
    );
    let mut flags = agent::restart_flags(&lab, &bpffs);
    flags.extend([
        "--workload-metrics".into(),
        "10".into(),
        "--kubeconfig".into(),
        support::kubeconfig(&lab, &stand_in),
        "--node-name".into(),
        NODE.into(),
        "--pod-name".into(),
        POD.into(),
        "--pod-namespace".into(),
        NAMESPACE.into(),
    ]);
    let burst = testing::scenarios(EndpointMode::Public, &[Path::PodToPodLocal.as_str()]);
    let Target::Addr(pod_b) = burst[0].to else {
        panic!("pod_to_pod_local goes to an address");
    };
    let series = [
        ("path", Path::PodToPodLocal.as_str()),
        ("direction", "forward"),
    ];

    let first = start_with(&lab, "tcx", flags.clone());
    let traced = tcx_programs(&lab);
    assert!(traced.len() >= 4, "the agent traces no hook: {traced:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let streaming = stream(&lab, pod_b, Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(500));
    let mut seen = counters(&first.scrape().expect("scrape"));
    let web = [
        ("namespace", "default"),
        ("workload", "web"),
        ("path", Path::PodToPodLocal.as_str()),
    ];
    let web_before = scrape::sum(&first.scrape().expect("scrape"), WORKLOAD_BYTES, &web);
    assert!(web_before > 0.0, "the stream is counted for default/web");
    let first_programs = first.programs();

    // A rolling update: the DaemonSet stands.
    let (took, code, log) = first.stop_logged().expect("stop");
    let handed_over = log
        .lines()
        .find(|line| line.contains("handed over"))
        .unwrap_or_else(|| panic!("no handover logged:\n{log}"));
    eprintln!("SIGTERM to exit: {took:?}; {handed_over}");
    assert_eq!(code, Some(0), "a handover exits with 0:\n{log}");
    assert!(took < Duration::from_secs(3), "the handover took {took:?}");
    assert!(
        handed_over.contains(&pins.display().to_string()),
        "{handed_over}"
    );
    assert!(state.exists(), "the state file is gone after a handover");
    let link_pins = std::fs::read_dir(&pins)
        .expect("the pin directory stays")
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("link-"))
        .count();
    assert_eq!(link_pins, traced.len(), "a pinned link per traced hook");
    let held = tcx_programs(&lab);
    let firsts: BTreeSet<u32> = first_programs.iter().map(|id| *id as u32).collect();
    assert!(
        held.keys().eq(traced.keys())
            && held
                .values()
                .all(|ids| ids.len() == 1 && firsts.contains(&ids[0])),
        "between the agents, each traced hook still runs the first agent's program: {held:?}"
    );

    let second = start_with(&lab, "tcx", flags);
    let ours: BTreeSet<u32> = second.programs().iter().map(|id| *id as u32).collect();
    let hooks = tcx_programs(&lab);
    assert!(
        hooks.keys().eq(traced.keys())
            && hooks
                .values()
                .all(|ids| ids.len() == 1 && ours.contains(&ids[0])),
        "after the handover, each hook holds the successor's program alone: {hooks:?} (ours {ours:?})"
    );
    assert!(
        second
            .log()
            .contains("carrying on from the previous agent's counts"),
        "{}",
        second.log_tail()
    );
    let outlived = still_loaded(&first_programs);
    assert!(
        outlived.is_empty(),
        "programs {outlived:?} of the first agent are still loaded"
    );
    std::thread::sleep(Duration::from_millis(500));
    let now = counters(&second.scrape().expect("scrape"));
    let mut failures = went_back(&seen, &now, "after the handover");
    seen.extend(now);
    stop.store(true, Ordering::Relaxed);
    let streamed = streaming.join().expect("stream thread");
    std::thread::sleep(Duration::from_millis(600));
    let samples = second.scrape().expect("scrape");
    let counted = scrape::sum(&samples, "tracer_path_bytes_total", &series);
    eprintln!("handover: {streamed} payload bytes streamed across it, {counted} L3 bytes counted");
    if !scrape::counts_payload(counted, streamed) {
        failures.push(format!(
            "pod_to_pod_local forward counted {counted} for {streamed} payload bytes streamed across the handover"
        ));
    }
    failures.extend(went_back(&seen, &counters(&samples), "at the end"));
    let web_after = scrape::sum(&samples, WORKLOAD_BYTES, &web);
    if !scrape::counts_payload(web_after, streamed) {
        failures.push(format!(
            "{WORKLOAD_BYTES} of default/web counted {web_after} B ({web_before} before the handover) for {streamed} B streamed"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // An uninstall: the DaemonSet is gone.
    stand_in.delete(Kind::DaemonSets, NAMESPACE, DAEMONSET);
    let ours = second.programs();
    let (took, code, log) = second.stop_logged().expect("stop");
    assert_eq!(code, Some(0), "a clean stop exits with 0:\n{log}");
    let reason = format!("DaemonSet {NAMESPACE}/{DAEMONSET} is gone");
    assert!(log.contains(&reason), "no {reason:?} in the log:\n{log}");
    eprintln!("SIGTERM to exit after the uninstall: {took:?}");
    let left = still_loaded(&ours);
    let hooks = tcx_programs(&lab);
    assert!(
        left.is_empty() && hooks.is_empty() && !pins.exists() && !state.exists(),
        "after the uninstall: programs {left:?} loaded, tcx {hooks:?}, pins left: {}, state left: {}",
        pins.exists(),
        state.exists()
    );
    drop(stand_in);
    drop(runtime);
    drop(bpffs);
    lab.down().expect("lab down");
}
