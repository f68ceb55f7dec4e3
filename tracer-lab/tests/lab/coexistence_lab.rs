//! Coexistence with the VPC CNI's network-policy agent: a stand-in policy program (real BPF,
//! `policy_standin` from tracer-ebpf, dropping TCP to one port of pod-b) on pod-b's veth, beside
//! the real agent, attached before and after it, with tcx links and with clsact filters, the
//! agent itself attached with tcx and with clsact. In every combination:
//! - the policy's verdicts hold: the denied port times out, the allowed one connects;
//! - the agent counts the allowed traffic (`/metrics`);
//! - taking either away leaves the other working: with the policy gone the agent still counts
//!   (and the port opens), with the agent gone the policy still drops.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracer_common::labels::Path;
use tracer_lab::{
    agent::{self, LabAgent},
    build,
    lab::{EndpointMode, Lab, exec},
    scrape, testing,
};

use crate::support::{Placement, PolicyStandin};

/// The port the policy denies on pod-b, and one it allows; pod-b listens on both.
const DENIED_PORT: u16 = 9300;
const ALLOWED_PORT: u16 = 9301;
/// A connection in the lab is made in well under a millisecond: one that takes longer than
/// this was dropped.
const DROPPED_AFTER: Duration = Duration::from_millis(500);
/// What the allowed traffic sends per check: connections × bytes.
const CONNECTIONS: usize = 3;
const BYTES: usize = 100_000;

/// How a program is attached to a hook.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mechanism {
    /// A tcx link, appended after what is there.
    Tcx,
    /// A direct-action filter on the clsact qdisc, priority chosen by the kernel.
    Clsact,
}

impl Mechanism {
    fn flag(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        }
    }

    /// Where the policy stand-in goes when attached this way: a tcx link after what is there.
    fn placement(self) -> Placement {
        match self {
            Self::Tcx => Placement::TcxLast,
            Self::Clsact => Placement::Clsact,
        }
    }
}

/// Listeners on pod-b's two ports that read what they are sent and close, until dropped.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(lab: &Lab, ip: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [DENIED_PORT, ALLOWED_PORT]
            .into_iter()
            .map(|port| {
                let listener = exec::within(&lab.ns("pod-b"), move || {
                    let listener = TcpListener::bind((ip, port))?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })
                .expect("listening in pod-b");
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut stream, _)) => {
                                let _ = stream.set_nonblocking(false);
                                let _ = std::io::copy(&mut stream, &mut std::io::sink());
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What pod-a can reach on pod-b: (denied port connects, allowed port connects).
fn reachable(lab: &Lab, pod_b: Ipv4Addr) -> (bool, bool) {
    let connects = |port| {
        let to = SocketAddr::from((pod_b, port));
        exec::within(&lab.ns("pod-a"), move || {
            Ok(TcpStream::connect_timeout(&to, DROPPED_AFTER).is_ok())
        })
        .expect("connecting from pod-a")
    };
    (connects(DENIED_PORT), connects(ALLOWED_PORT))
}

/// Sends the allowed traffic, each connection delivered in full (the server reads to EOF
/// before it closes); returns the payload bytes sent.
fn send_allowed(lab: &Lab, pod_b: Ipv4Addr) -> u64 {
    let to = SocketAddr::from((pod_b, ALLOWED_PORT));
    exec::within(&lab.ns("pod-a"), move || {
        for _ in 0..CONNECTIONS {
            let mut stream = TcpStream::connect_timeout(&to, DROPPED_AFTER)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(&[0x5a; BYTES])?;
            stream.shutdown(Shutdown::Write)?;
            stream.read_to_end(&mut Vec::new())?;
        }
        Ok((CONNECTIONS * BYTES) as u64)
    })
    .expect("sending the allowed traffic")
}

fn local_forward_bytes(agent: &LabAgent) -> f64 {
    let samples = agent.scrape().expect("scrape");
    scrape::sum(
        &samples,
        "tracer_path_bytes_total",
        &[
            ("path", Path::PodToPodLocal.as_str()),
            ("direction", "forward"),
        ],
    )
}

/// Sends allowed traffic and checks that the agent counts it (payload plus headers).
fn counted(lab: &Lab, agent: &LabAgent, pod_b: Ipv4Addr) -> Result<(), String> {
    let before = local_forward_bytes(agent);
    let sent = send_allowed(lab, pod_b) as f64;
    // A few of the agent's 200 ms polls.
    std::thread::sleep(Duration::from_millis(700));
    let grew = local_forward_bytes(agent) - before;
    if grew >= sent && grew <= sent * 1.25 + 20_000.0 {
        Ok(())
    } else {
        Err(format!(
            "pod_to_pod_local forward bytes grew by {grew} for {sent} payload bytes sent"
        ))
    }
}

/// One combination: who comes first, how each is attached, which one leaves first.
#[derive(Debug)]
struct Combination {
    agent: Mechanism,
    policy: Mechanism,
    policy_first: bool,
    policy_leaves_first: bool,
}

fn exercise(lab: &Lab, combination: &Combination) -> Result<(), String> {
    let pod_b = lab.facts().pod_ips["pod-b"];
    let veth = lab.facts().pod_veths["pod-b"].clone();
    let attach_policy = || {
        PolicyStandin::attach(
            lab.ns("node"),
            veth.clone(),
            combination.policy.placement(),
            DENIED_PORT,
        )
    };
    let expect = |what: &str, denied: bool| {
        let seen = reachable(lab, pod_b);
        if seen == (denied, true) {
            Ok(())
        } else {
            Err(format!(
                "{what}: (denied port connects, allowed port connects) = {seen:?}, expected ({denied}, true)"
            ))
        }
    };

    let early_policy = combination.policy_first.then(&attach_policy);
    let mut flags = agent::quick_flags();
    flags.extend(agent::context_flags(lab));
    flags.extend(["--attach-mode".into(), combination.agent.flag().into()]);
    let mut agent =
        LabAgent::start_with(lab, &build::tracer_path(), flags).map_err(|e| format!("{e:#}"))?;
    agent
        .wait_ready(Duration::from_secs(15))
        .map_err(|e| format!("{e:#}"))?;
    let policy = early_policy.unwrap_or_else(&attach_policy);
    let with_log = |error: String| format!("{error}\n{}", agent.log_tail());

    expect("both attached", false).map_err(with_log)?;
    counted(lab, &agent, pod_b).map_err(|e| with_log(format!("both attached: {e}")))?;
    if combination.policy_leaves_first {
        policy.detach();
        expect("policy detached", true).map_err(with_log)?;
        counted(lab, &agent, pod_b).map_err(|e| with_log(format!("policy detached: {e}")))?;
        let (_, code) = agent.stop().map_err(|e| format!("{e:#}"))?;
        if code != Some(0) {
            return Err(format!("the agent exited with {code:?}"));
        }
    } else {
        let (_, code) = agent.stop().map_err(|e| format!("{e:#}"))?;
        if code != Some(0) {
            return Err(format!("the agent exited with {code:?}"));
        }
        expect("agent stopped", false)?;
        policy.detach();
        expect("both detached", true)?;
    }
    Ok(())
}

/// Every order and mechanism of the policy against the agent attached with `agent`.
fn coexists(agent: Mechanism) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab tests need root to create namespaces and load eBPF programs"
    );
    let lab = testing::lab(EndpointMode::Public, env!("CARGO_BIN_EXE_tracer-lab"));
    let _servers = Servers::start(&lab, lab.facts().pod_ips["pod-b"]);
    let mut failures = Vec::new();
    for policy in [Mechanism::Tcx, Mechanism::Clsact] {
        for policy_first in [true, false] {
            for policy_leaves_first in [true, false] {
                let combination = Combination {
                    agent,
                    policy,
                    policy_first,
                    policy_leaves_first,
                };
                let started = Instant::now();
                let outcome = exercise(&lab, &combination);
                eprintln!(
                    "coexistence: {combination:?}: {} in {:.1?}",
                    if outcome.is_ok() { "ok" } else { "FAILED" },
                    started.elapsed()
                );
                if let Err(error) = outcome {
                    failures.push(format!("{combination:?}: {error}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    lab.down().expect("lab down");
}

#[test]
fn a_network_policy_program_and_the_agent_with_tcx_keep_each_other_working() {
    coexists(Mechanism::Tcx);
}

#[test]
fn a_network_policy_program_and_the_agent_with_clsact_keep_each_other_working() {
    coexists(Mechanism::Clsact);
}
