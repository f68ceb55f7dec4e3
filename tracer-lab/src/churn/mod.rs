//! Pod churn on the lab node, as a busy EKS node sees it: pods scheduled and deleted at a
//! steady rate, each talking to the previous one (`pod_to_pod_local`), while an agent runs.
//! Measures how long each new veth waits for the agent's tcx links or clsact filters. Shared
//! by the hot-plug test and `cargo xtask bench attach`.
mod watch;
pub use watch::{FilterSeen, NetlinkWatch, both_hooks, newest_link_id, settled_links_after};

use std::{
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};

use crate::{
    agent::LabAgent,
    lab::{Lab, exec},
};
use watch::AttachWatch;

/// What the agent holds on an interface once it is attached, as the agent's `--attach-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Both tcx links (ingress and egress).
    TcxLinks,
    /// A clsact filter on both hooks.
    ClsactFilters,
}

/// Pods alive at once: at 20 per second, each lives about a second.
const ALIVE: usize = 20;
/// How long the agent may take to read the last traffic, and to let go of the deleted pods.
const SETTLE: Duration = Duration::from_secs(10);
const PORT: u16 = 9000;
pub const DATAGRAMS: usize = 5;
pub const DATAGRAM_BYTES: usize = 1000;

/// What a churn run did and saw.
pub struct Churn {
    pub pods: u32,
    /// Pods per second actually scheduled.
    pub rate: f64,
    /// Per pod, from its veth's appearance to the agent holding both hooks of it; sorted, with
    /// None (last) for a pod deleted before the agent attached to it.
    pub attach_latencies: Vec<Option<Duration>>,
}

impl Churn {
    /// None when that many pods were never attached.
    pub fn percentile(&self, fraction: f64) -> Option<Duration> {
        let sorted = &self.attach_latencies;
        sorted[((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1]
    }

    pub fn never_attached(&self) -> usize {
        self.attach_latencies.iter().filter(|l| l.is_none()).count()
    }

    pub fn summary(&self) -> String {
        let show = |fraction| {
            self.percentile(fraction)
                .map_or("never".to_owned(), |latency| format!("{latency:.1?}"))
        };
        format!(
            "{} pods at {:.1}/s; attach latency (veth created → both hooks held) p50 {}, p99 {}, max {}; {} never attached",
            self.pods,
            self.rate,
            show(0.5),
            show(0.99),
            show(1.0),
            self.never_attached()
        )
    }
}

/// An address for churned pod `n`: 10.0.3.0/24 onwards, inside the lab's VPC, away from its
/// other hosts.
pub fn pod_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 3 + (n / 250) as u8, 1 + (n % 250) as u8)
}

/// Pod names are `<prefix><n>`, so that two runs in one lab do not collide.
pub fn pod_name(prefix: &str, n: u32) -> String {
    format!("{prefix}{n}")
}

/// Schedules `pods` pods (numbered from `first`, so that runs in one lab do not collide) one
/// every `every`, each sending `DATAGRAMS` × `DATAGRAM_BYTES` to the previous one, deletes them
/// as they age, and times the attachment of each by `agent`, which holds them as `hold` says.
///
/// Each pod is plumbed on a thread of its own, started on schedule: as on a node, where the
/// CNI sets up several pods at once, a pod's plumbing does not wait for the previous one's
/// (which waits for the RTNL lock, held by every attach for a grace period). One thread takes
/// the plumbed pods in order, sends their traffic and deletes the oldest.
pub fn run(
    lab: &Lab,
    agent: &LabAgent,
    first: u32,
    pods: u32,
    every: Duration,
    hold: Hold,
) -> anyhow::Result<Churn> {
    let creations = NetlinkWatch::start(&lab.ns("node"), hold == Hold::ClsactFilters)?;
    let watch = (hold == Hold::TcxLinks).then(|| AttachWatch::start(agent));
    let started = Instant::now();
    let (plumbed, alive) = std::thread::scope(|scope| {
        let (plugging, plugs) = mpsc::channel();
        let traffic = scope.spawn(move || talk_and_delete(lab, plugs));
        for n in 0..pods {
            std::thread::sleep((started + every * n).saturating_duration_since(Instant::now()));
            // A closed channel means the traffic thread stopped: its error is reported below.
            if plugging
                .send(scope.spawn(move || plug(lab, first + n)))
                .is_err()
            {
                break;
            }
        }
        drop(plugging);
        traffic
            .join()
            .map_err(|_| anyhow!("the churn's traffic thread panicked"))?
    })?;
    let rate = f64::from(pods) / started.elapsed().as_secs_f64();
    // Let the agent read the last pods' traffic before they go, and see them go.
    agent.wait_whole_poll(SETTLE)?;
    for pod in alive {
        lab.unplug_pod(&pod.name)?;
    }
    wait_detached(agent, &plumbed);
    agent.wait_whole_poll(SETTLE)?;
    let (created, filters) = creations.finish()?;
    let attached = match watch {
        Some(watch) => watch.finish()?,
        None => both_hooks(&filters),
    };
    let mut attach_latencies = plumbed
        .iter()
        .map(|index| {
            let created = created
                .get(index)
                .ok_or_else(|| anyhow!("netlink never announced ifindex {index}"))?;
            Ok(attached
                .get(index)
                .map(|seen| seen.saturating_duration_since(*created)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    attach_latencies.sort_by_key(|latency| (latency.is_none(), *latency));
    Ok(Churn {
        pods,
        rate,
        attach_latencies,
    })
}

/// Waits, `SETTLE` at most, until the agent holds no link on any of the veths `plumbed`: a
/// deleted namespace's veth disappears later, when the kernel's cleanup worker gets the RTNL
/// lock, and the agent detaches at its next poll. What is still attached after that is a leak.
fn wait_detached(agent: &LabAgent, plumbed: &[u64]) {
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline
        && agent
            .linked_ifindexes()
            .iter()
            .any(|index| plumbed.contains(index))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A churned pod, plumbed and listening.
struct Pod {
    name: String,
    ip: Ipv4Addr,
    /// Its host-side veth's.
    ifindex: u64,
    _receiver: UdpSocket,
}

fn plug(lab: &Lab, n: u32) -> anyhow::Result<Pod> {
    let (name, ip) = (pod_name("hp", n), pod_ip(n));
    let veth = lab.plug_pod(&name, ip)?;
    let ifindex = ifindex_in(&lab.ns("node"), &veth)?;
    let receiver = exec::within(&lab.ns(&name), move || {
        Ok(UdpSocket::bind(SocketAddr::new(ip.into(), PORT))?)
    })?;
    Ok(Pod {
        name,
        ip,
        ifindex,
        _receiver: receiver,
    })
}

type Plugging<'scope> = std::thread::ScopedJoinHandle<'scope, anyhow::Result<Pod>>;

/// Takes the pods in the order they were scheduled: each sends to the one before it, and the
/// oldest goes once more than `ALIVE` live. Returns the pods' veths (ifindex) and the pods
/// still alive.
fn talk_and_delete(
    lab: &Lab,
    plugs: mpsc::Receiver<Plugging<'_>>,
) -> anyhow::Result<(Vec<u64>, VecDeque<Pod>)> {
    let mut plumbed = Vec::new();
    let mut alive: VecDeque<Pod> = VecDeque::new();
    for plugging in plugs {
        let pod = plugging
            .join()
            .map_err(|_| anyhow!("a pod's plumbing thread panicked"))??;
        plumbed.push(pod.ifindex);
        if let Some(previous) = alive.back() {
            let (from, to) = (pod.ip, SocketAddr::new(previous.ip.into(), PORT));
            exec::within(&lab.ns(&pod.name), move || {
                let socket = UdpSocket::bind(SocketAddr::new(from.into(), 0))?;
                for _ in 0..DATAGRAMS {
                    socket.send_to(&[0x5a; DATAGRAM_BYTES], to)?;
                }
                Ok(())
            })?;
        }
        alive.push_back(pod);
        if alive.len() > ALIVE
            && let Some(gone) = alive.pop_front()
        {
            lab.unplug_pod(&gone.name)?;
        }
    }
    Ok((plumbed, alive))
}

fn ifindex_in(ns: &str, name: &str) -> anyhow::Result<u64> {
    let name = std::ffi::CString::new(name).context("interface name")?;
    exec::within(ns, move || {
        // SAFETY: if_nametoindex reads the NUL-terminated name and nothing else.
        Ok(u64::from(unsafe { libc::if_nametoindex(name.as_ptr()) }))
    })
}
