//! Never blind without saying so: a foreign program ahead of the tracer's on pod-b's veth that
//! ends the chain (the policy stand-in, a tcx link placed first, passing everything with
//! `TC_ACT_OK`) hides pod-b's traffic to the node from the real agent. The veth is named blind
//! within two polls in `/api/v1/paths`, `/readyz` (still 200) and `/metrics`
//! (`tracer_interfaces{state="blind"} 1`), and no other interface is; once the program goes,
//! blind is 0 again within two polls. `tracer top`, in a real terminal (tmux), names it in its
//! header meanwhile.
use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracer_agent::serve::api::{self, PathsResponse};
use tracer_lab::{
    agent::{self, LabAgent},
    build,
    lab::{EndpointMode, Lab, exec},
    scrape, testing,
    tmux::Tmux,
};

use crate::{
    support::{Placement, PolicyStandin},
    top_lab::{AGENT_URL, top_command},
};

/// The node's port pod-b sends its datagrams to.
const NODE_PORT: u16 = 9310;
/// One datagram this often: ~40 per 200 ms poll, well above the agent's threshold.
const SEND_EVERY: Duration = Duration::from_millis(5);
/// The sender stops after this long whatever happens.
const SEND_AT_MOST: Duration = Duration::from_secs(90);
/// How many polls the agent may take to say it (the first poll after a change may still
/// cover traffic from before it).
const POLLS_TO_TELL: usize = 2;

/// pod-b sending datagrams to a socket of the node, until dropped: traffic that crosses
/// pod-b's veth and no other traced interface.
struct Datagrams {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _receiver: UdpSocket,
}

impl Datagrams {
    fn start(lab: &Lab) -> Self {
        let to = SocketAddr::from((lab.facts().node_ip, NODE_PORT));
        let receiver =
            exec::within(&lab.ns("node"), move || Ok(UdpSocket::bind(to)?)).expect("bind in node");
        let sender = exec::within(&lab.ns("pod-b"), || Ok(UdpSocket::bind("0.0.0.0:0")?))
            .expect("bind in pod-b");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            while !stopped.load(Ordering::Relaxed) && started.elapsed() < SEND_AT_MOST {
                // The node's socket is not read: datagrams it cannot hold are dropped there,
                // after crossing the veth, which is all this needs.
                let _ = sender.send_to(&[0x5a; 64], to);
                std::thread::sleep(SEND_EVERY);
            }
        });
        Self {
            stop,
            thread: Some(thread),
            _receiver: receiver,
        }
    }
}

impl Drop for Datagrams {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn paths(agent: &LabAgent) -> Result<PathsResponse, String> {
    let (status, body) = agent.get(api::PATHS).map_err(|e| format!("{e:#}"))?;
    if status != 200 {
        return Err(format!("{} answered {status}: {body}", api::PATHS));
    }
    serde_json::from_str(&body).map_err(|e| format!("{}: {e}: {body}", api::PATHS))
}

/// Reads the API until `expected` is the list of blind interfaces, in one of the next
/// [`POLLS_TO_TELL`] snapshots taken after now; returns how many snapshots it took.
fn told_within_two_polls(agent: &LabAgent, expected: &[String]) -> Result<usize, String> {
    let since = paths(agent)?.time_unix_ms;
    let mut polls = 0;
    let mut last = since;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(40));
        let now = paths(agent)?;
        if now.time_unix_ms == last {
            continue;
        }
        last = now.time_unix_ms;
        polls += 1;
        if now.blind_interfaces == expected {
            return Ok(polls);
        }
        if polls >= POLLS_TO_TELL {
            return Err(format!(
                "after {polls} polls the blind interfaces are {:?}, expected {expected:?}",
                now.blind_interfaces
            ));
        }
    }
    Err(format!("fewer than {POLLS_TO_TELL} polls in 10 s"))
}

/// What `/metrics`, `/readyz` and the JSON say now: all must agree with `blind`.
fn everywhere_agrees(agent: &LabAgent, blind: &[String]) -> Result<(), String> {
    let samples = agent.scrape().map_err(|e| format!("{e:#}"))?;
    let state = |state| scrape::sum(&samples, "tracer_interfaces", &[("state", state)]);
    if state("blind") != blind.len() as f64 || state("failed") != 0.0 || state("attached") < 1.0 {
        return Err(format!(
            "tracer_interfaces: attached {}, blind {}, failed {}; expected blind {}",
            state("attached"),
            state("blind"),
            state("failed"),
            blind.len()
        ));
    }
    let (status, body) = agent.get("/readyz").map_err(|e| format!("{e:#}"))?;
    let named = body
        .lines()
        .filter(|line| line.starts_with("- blind: "))
        .count();
    if status != 200 || named != blind.len() || !blind.iter().all(|name| body.contains(name)) {
        return Err(format!("/readyz answered {status}: {body}"));
    }
    let json = paths(agent)?;
    if json.blind_interfaces != blind || json.interfaces.blind != blind.len() as u64 || !json.ready
    {
        return Err(format!(
            "{}: ready {}, blind {:?}, {:?}",
            api::PATHS,
            json.ready,
            json.blind_interfaces,
            json.interfaces
        ));
    }
    Ok(())
}

/// Waits until `tracer top`'s first line names exactly `blind` (nothing when empty).
fn top_header_names(tmux: &Tmux, blind: &[String]) -> Result<(), String> {
    let expected = if blind.is_empty() {
        "· ready · tracer v".to_owned()
    } else {
        format!("· ready · blind: {} · tracer v", blind.join(", "))
    };
    tmux.wait_for(
        "the blind interfaces in top's header",
        Duration::from_secs(10),
        |screen| {
            screen
                .lines()
                .next()
                .is_some_and(|first| first.contains(&expected))
        },
    )
    .map(drop)
    .map_err(|e| format!("tracer top's header: {e:#}"))
}

fn hidden_and_recovered(lab: &Lab, agent: &LabAgent, tmux: &Tmux) -> Result<(), String> {
    let veth = lab.facts().pod_veths["pod-b"].clone();
    let _datagrams = Datagrams::start(lab);
    tmux.type_line(&top_command(lab, &["--agent".into(), AGENT_URL.into()]))
        .map_err(|e| format!("{e:#}"))?;
    top_header_names(tmux, &[])?;
    // Seen while nothing hides it: never blind, nor any other interface.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        everywhere_agrees(agent, &[]).map_err(|e| format!("before the foreign program: {e}"))?;
    }
    // Denying no port: it passes everything, with a final verdict.
    let foreign = PolicyStandin::attach(lab.ns("node"), veth.clone(), Placement::TcxFirst, 0);
    let blind = [veth];
    let polls = told_within_two_polls(agent, &blind)?;
    eprintln!("blind: {} named blind after {polls} poll(s)", blind[0]);
    everywhere_agrees(agent, &blind).map_err(|e| format!("while hidden: {e}"))?;
    top_header_names(tmux, &blind)?;
    foreign.detach();
    let polls = told_within_two_polls(agent, &[])?;
    eprintln!("blind: {} seen again after {polls} poll(s)", blind[0]);
    everywhere_agrees(agent, &[]).map_err(|e| format!("after the foreign program: {e}"))?;
    top_header_names(tmux, &[])?;
    tmux.press(&["q"]).map_err(|e| format!("{e:#}"))
}

#[test]
fn a_foreign_program_that_ends_the_chain_first_makes_its_interface_blind_until_it_goes() {
    let lab = testing::lab(EndpointMode::Public, env!("CARGO_BIN_EXE_tracer-lab"));
    let mut flags = agent::quick_flags();
    flags.extend(agent::context_flags(&lab));
    // The foreign link is placed first after the agent attached, so it runs ahead of the
    // agent's whatever order the agent asks for. If the agent learns to move itself back to
    // the front (an option like `--tcx-order first` that re-orders on tc changes), pass the
    // option that turns that off here (`--tcx-order last`), or the agent would win the race.
    flags.extend(["--attach-mode".into(), "tcx".into()]);
    let mut agent = LabAgent::start_with(&lab, &build::tracer_path(), flags).expect("agent start");
    agent
        .wait_ready(Duration::from_secs(15))
        .expect("agent ready");
    let tmux = Tmux::start("top-blind", 110, 30).expect("tmux");
    let outcome = hidden_and_recovered(&lab, &agent, &tmux);
    let log = agent.log();
    let (_, code) = agent.stop().expect("agent stop");
    if let Err(error) = outcome {
        panic!("{error}\n{log}");
    }
    assert_eq!(code, Some(0), "the agent's exit code\n{log}");
    assert!(
        log.contains("blind: ") && log.contains("sees this interface's traffic again"),
        "the log tells when it went blind and when it recovered:\n{log}"
    );
    lab.down().expect("lab down");
}
