//! Coexistence with the VPC CNI's network-policy agent: a stand-in policy program (real BPF,
//! `policy_standin` from tracer-ebpf, dropping TCP to one port of pod-b) on pod-b's veth, beside
//! the real agent, attached before and after it, with tcx links and with clsact filters, the
//! agent itself attached with tcx and with clsact. In every combination:
//! - the policy's verdicts hold: the denied port times out, the allowed one connects;
//! - the agent counts the allowed traffic (`/metrics`);
//! - taking either away leaves the other working: with the policy gone the agent still counts
//!   (and the port opens), with the agent gone the policy still drops.
//!
//! And the agent goes first on every hook whoever came first: in clsact mode ahead of the
//! policy filter on every pod veth, as the VPC CNI's agent attaches it (priority 1, handle
//! 1, ending the chain with `TC_ACT_OK`), re-attached (deleted and added) included, every
//! byte counted and the policy filter left where it is; in tcx mode ahead of a tcx policy
//! program that drops, with `--tcx-order first` (the denied SYNs are counted) and behind it
//! with `last` (they are not).
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

use tracer_agent::datapath::POLICY_STANDIN_PROGRAM;
use tracer_common::labels::Path;

use crate::support::{POLICY_HANDLE, POLICY_PRIORITY, Placement, PolicyStandin};
use tracer_lab::{
    agent::{self, LabAgent},
    build,
    lab::{EndpointMode, Lab, exec},
    scrape, testing,
};

/// The port the policy denies on pod-b, and one it allows; pod-b listens on both.
const DENIED_PORT: u16 = 9300;
const ALLOWED_PORT: u16 = 9301;
/// A connection in the lab is made in well under a millisecond: one that takes longer than
/// this was dropped.
const DROPPED_AFTER: Duration = Duration::from_millis(500);
/// Where the VPC CNI's network-policy agent attaches its clsact filter, and the handle by
/// which it finds it again.
/// What the allowed traffic sends per check: connections × bytes.
const CONNECTIONS: usize = 3;
const BYTES: usize = 100_000;

/// How a program is attached to a hook.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mechanism {
    /// A tcx link, appended after what is there.
    Tcx,
    /// A direct-action filter on the clsact qdisc; the policy stand-in's is where the VPC
    /// CNI's network-policy agent puts its own: priority 1, handle 1.
    Clsact,
}

impl Mechanism {
    /// Where the policy stand-in goes when attached this way (clsact: priority 1, handle 1).
    fn placement(self) -> Placement {
        match self {
            Self::Tcx => Placement::TcxLast,
            Self::Clsact => Placement::Clsact,
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
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

/// Whether pod-a connects to `port` of pod-b.
fn connects(lab: &Lab, pod_b: Ipv4Addr, port: u16) -> bool {
    let to = SocketAddr::from((pod_b, port));
    exec::within(&lab.ns("pod-a"), move || {
        Ok(TcpStream::connect_timeout(&to, DROPPED_AFTER).is_ok())
    })
    .expect("connecting from pod-a")
}

/// What pod-a can reach on pod-b: (denied port connects, allowed port connects).
fn reachable(lab: &Lab, pod_b: Ipv4Addr) -> (bool, bool) {
    (
        connects(lab, pod_b, DENIED_PORT),
        connects(lab, pod_b, ALLOWED_PORT),
    )
}

/// Sends the allowed traffic from the pod `from`, each connection delivered in full (the
/// server reads to EOF before it closes); returns the payload bytes sent.
fn send_allowed(lab: &Lab, from: &str, pod_b: Ipv4Addr) -> u64 {
    let to = SocketAddr::from((pod_b, ALLOWED_PORT));
    exec::within(&lab.ns(from), move || {
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

/// Sends allowed traffic from pod-a and checks that the agent counts it (payload plus
/// headers).
fn counted(lab: &Lab, agent: &LabAgent, pod_b: Ipv4Addr) -> Result<(), String> {
    counted_from(lab, agent, "pod-a", pod_b)
}

/// Sends allowed traffic from the pod `from` and checks that the agent counts it.
fn counted_from(lab: &Lab, agent: &LabAgent, from: &str, pod_b: Ipv4Addr) -> Result<(), String> {
    let before = local_forward_bytes(agent);
    let sent = send_allowed(lab, from, pod_b) as f64;
    // A few of the agent's 200 ms polls.
    std::thread::sleep(Duration::from_millis(700));
    let grew = local_forward_bytes(agent) - before;
    if grew >= sent && grew <= sent * 1.25 + 20_000.0 {
        Ok(())
    } else {
        Err(format!(
            "pod_to_pod_local forward bytes grew by {grew} for {sent} payload bytes sent from {from}"
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

/// The lab, up; fails saying why when not run as root.
fn lab_as_root() -> Lab {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab tests need root to create namespaces and load eBPF programs"
    );
    testing::lab(EndpointMode::Public, env!("CARGO_BIN_EXE_tracer-lab"))
}

/// Every order and mechanism of the policy against the agent attached with `agent`.
fn coexists(agent: Mechanism) {
    let lab = lab_as_root();
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

/// One filter of a clsact hook as `tc filter show` lists it, in the order they run.
#[derive(Debug, PartialEq)]
struct Filter {
    priority: u16,
    handle: u32,
    program: String,
}

/// The filters on `hook` ("ingress" or "egress") of the node's interface `veth`, first first.
fn filters(lab: &Lab, veth: &str, hook: &str) -> Vec<Filter> {
    let output = exec::in_ns(&lab.ns("node"), "tc")
        .args(["filter", "show", "dev", veth, hook])
        .output()
        .expect("tc filter show");
    let listing = String::from_utf8_lossy(&output.stdout);
    listing
        .lines()
        .filter_map(|line| {
            let after = |word: &str| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let at = words.iter().position(|w| *w == word)?;
                words.get(at + 1).map(|value| (*value).to_owned())
            };
            Some(Filter {
                priority: after("pref")?.parse().ok()?,
                handle: u32::from_str_radix(after("handle")?.trim_start_matches("0x"), 16).ok()?,
                program: after("name")?,
            })
        })
        .collect()
}

/// On both hooks of `veth`: the agent's filter runs first, and the policy's is still there at
/// priority 1 with handle 1.
fn agent_first_policy_in_place(lab: &Lab, veth: &str) -> Result<(), String> {
    for (hook, program) in [("ingress", "tracer_ingress"), ("egress", "tracer_egress")] {
        let listed = filters(lab, veth, hook);
        let first = listed.first().map(|filter| filter.program.as_str());
        let policy = Filter {
            priority: POLICY_PRIORITY,
            handle: POLICY_HANDLE,
            program: POLICY_STANDIN_PROGRAM.to_owned(),
        };
        if first != Some(program) || !listed.contains(&policy) {
            return Err(format!(
                "{veth} {hook}: expected {program} first and {policy:?} present, found {listed:?}"
            ));
        }
    }
    Ok(())
}

fn reorders(agent: &LabAgent) -> f64 {
    let samples = agent.scrape().expect("scrape");
    scrape::sum(&samples, "tracer_attach_reorders_total", &[])
}

/// The VPC CNI's policy agent on every pod veth of the node, in clsact at priority 1 handle
/// 1, some attached before the agent, some after, one deleted and added again: the agent is
/// first on every hook, counts every byte between two pods whose veths both carry the
/// policy, moved once per hook overtaken, and never removes or moves the policy's filter.
#[test]
fn the_agent_with_clsact_stays_ahead_of_a_policy_filter_on_every_pod_veth() {
    let lab = lab_as_root();
    let pod_b = lab.facts().pod_ips["pod-b"];
    let _servers = Servers::start(&lab, pod_b);
    let veth = |pod: &str| lab.facts().pod_veths[pod].clone();
    let attach_policy = |pod: &str| {
        PolicyStandin::attach(lab.ns("node"), veth(pod), Placement::Clsact, DENIED_PORT)
    };
    let before = ["pod-a", "coredns"];
    let after = ["pod-b", "pod-c"];
    let pods = [before, after].concat();

    let mut policies: Vec<PolicyStandin> = before.iter().map(|pod| attach_policy(pod)).collect();
    let mut flags = agent::quick_flags();
    flags.extend(agent::context_flags(&lab));
    flags.extend(["--attach-mode".into(), "clsact".into()]);
    let mut agent = LabAgent::start_with(&lab, &build::tracer_path(), flags).expect("agent starts");
    agent
        .wait_ready(Duration::from_secs(15))
        .expect("agent ready");
    policies.extend(after.iter().map(|pod| attach_policy(pod)));
    // The policy agent re-attaching pod-a's filter: deleted, then added.
    policies.remove(0).detach();
    policies.push(attach_policy("pod-a"));

    let outcome = (|| {
        // Two hooks for each filter added while the agent ran: pod-b's, pod-c's, pod-a's again.
        let expected = 2.0 * (after.len() + 1) as f64;
        let waited = Instant::now();
        while reorders(&agent) < expected && waited.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let moved = reorders(&agent);
        if moved != expected {
            return Err(format!(
                "tracer_attach_reorders_total is {moved}, expected {expected}"
            ));
        }
        for pod in &pods {
            agent_first_policy_in_place(&lab, &veth(pod))?;
        }
        let seen = reachable(&lab, pod_b);
        if seen != (false, true) {
            return Err(format!(
                "(denied port connects, allowed port connects) = {seen:?}"
            ));
        }
        counted_from(&lab, &agent, "pod-a", pod_b)?;
        counted_from(&lab, &agent, "pod-c", pod_b)?;
        Ok(())
    })()
    .map_err(|error| format!("{error}\n{}", agent.log_tail()));
    let (_, code) = agent.stop().expect("agent stops");
    let left = pods
        .iter()
        .map(|pod| {
            filters(&lab, &veth(pod), "ingress").len() + filters(&lab, &veth(pod), "egress").len()
        })
        .sum::<usize>();
    let denied_after_stop = reachable(&lab, pod_b);
    for policy in policies {
        policy.detach();
    }
    outcome.unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(code, Some(0), "the agent's exit code");
    assert_eq!(
        left,
        2 * pods.len(),
        "after the agent stopped, only the policy's filters stay"
    );
    assert_eq!(
        denied_after_stop,
        (false, true),
        "the policy's verdicts after the agent stopped"
    );
    lab.down().expect("lab down");
}

/// The payload-and-header bytes the agent counts on pod_to_pod_local for one attempt to
/// connect to the denied port (one SYN, dropped by the policy).
fn denied_syn_bytes(lab: &Lab, agent: &LabAgent, pod_b: Ipv4Addr) -> f64 {
    let before = local_forward_bytes(agent);
    assert!(
        !connects(lab, pod_b, DENIED_PORT),
        "the denied port connected"
    );
    // A few of the agent's 200 ms polls.
    std::thread::sleep(Duration::from_millis(700));
    local_forward_bytes(agent) - before
}

/// A tcx policy program that drops the denied port on pod-a's and pod-b's veths (pod-a's
/// attached before the agent, pod-b's after): with `--tcx-order first` the agent is ahead of
/// it and counts the denied SYNs' bytes, with `last` it is behind and does not see them;
/// the allowed traffic is counted and the verdicts hold either way.
#[test]
fn the_agent_with_tcx_sees_what_a_policy_program_drops_only_when_first() {
    let lab = lab_as_root();
    let pod_b = lab.facts().pod_ips["pod-b"];
    let _servers = Servers::start(&lab, pod_b);
    let attach_policy = |pod: &str| {
        PolicyStandin::attach(
            lab.ns("node"),
            lab.facts().pod_veths[pod].clone(),
            Placement::TcxLast,
            DENIED_PORT,
        )
    };
    let mut failures = Vec::new();
    for order in ["first", "last"] {
        let pod_a_policy = attach_policy("pod-a");
        let mut flags = agent::quick_flags();
        flags.extend(agent::context_flags(&lab));
        flags.extend(["--attach-mode", "tcx", "--tcx-order", order].map(String::from));
        let mut agent =
            LabAgent::start_with(&lab, &build::tracer_path(), flags).expect("agent starts");
        agent
            .wait_ready(Duration::from_secs(15))
            .expect("agent ready");
        let pod_b_policy = attach_policy("pod-b");
        let syn_bytes = denied_syn_bytes(&lab, &agent, pod_b);
        let allowed = counted(&lab, &agent, pod_b);
        let log = agent.log_tail();
        let (_, code) = agent.stop().expect("agent stops");
        let denied_after_stop = reachable(&lab, pod_b);
        pod_a_policy.detach();
        pod_b_policy.detach();
        eprintln!("coexistence: --tcx-order {order}: {syn_bytes} bytes of denied SYNs counted");
        // An IPv4 SYN with its options is 60 bytes.
        let seen_as_expected = match order {
            "first" => syn_bytes >= 40.0,
            _ => syn_bytes == 0.0,
        };
        if !seen_as_expected {
            failures.push(format!(
                "--tcx-order {order}: {syn_bytes} bytes of the denied SYN counted (first: ≥ 40, as the agent runs before the drop; last: 0, as the policy drops it before the agent sees it)"
            ));
        }
        if let Err(error) = allowed {
            failures.push(format!("--tcx-order {order}: {error}\n{log}"));
        }
        if code != Some(0) {
            failures.push(format!(
                "--tcx-order {order}: the agent exited with {code:?}"
            ));
        }
        if denied_after_stop != (false, true) {
            failures.push(format!(
                "--tcx-order {order}: after the agent stopped, (denied, allowed) connect = {denied_after_stop:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    lab.down().expect("lab down");
}
