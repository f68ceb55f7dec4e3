//! Pod churn on the lab node, as a busy EKS node sees it: pods scheduled and deleted at a
//! steady rate, each talking to the previous one (`pod_to_pod_local`), while an agent runs.
//! Measures how long each new veth waits for the agent's tcx links. Shared by the hot-plug
//! test and `cargo xtask bench attach`.
use std::{
    collections::{HashMap, VecDeque},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};

use crate::{
    agent::linked_ifindexes,
    lab::{Lab, exec},
};

/// Pods alive at once: at 20 per second, each lives about a second.
const ALIVE: usize = 20;
const PORT: u16 = 9000;
pub const DATAGRAMS: usize = 5;
pub const DATAGRAM_BYTES: usize = 1000;

/// What a churn run did and saw.
pub struct Churn {
    pub pods: u32,
    /// Pods per second actually achieved (plumbing a pod takes a dozen `ip` commands).
    pub rate: f64,
    /// Per pod, from `ip link add` of its veth to the agent holding a tcx link on it; sorted.
    pub attach_latencies: Vec<Duration>,
}

impl Churn {
    pub fn percentile(&self, fraction: f64) -> Duration {
        let sorted = &self.attach_latencies;
        sorted[((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1]
    }

    pub fn summary(&self) -> String {
        format!(
            "{} pods at {:.1}/s; attach latency (veth created → tcx link held) p50 {:.1?}, p99 {:.1?}, max {:.1?}",
            self.pods,
            self.rate,
            self.percentile(0.5),
            self.percentile(0.99),
            self.percentile(1.0)
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

/// Schedules `pods` pods one every `every`, each sending `DATAGRAMS` × `DATAGRAM_BYTES` to the
/// previous one, deletes them as they age, and times the attachment of each by the agent
/// `agent_pid`.
pub fn run(lab: &Lab, agent_pid: u32, pods: u32, every: Duration) -> anyhow::Result<Churn> {
    let node_ns = lab.ns("node");
    let watch = AttachWatch::start(agent_pid);
    let started = Instant::now();
    let mut plumbed: Vec<(u64, Instant)> = Vec::new();
    let mut alive: VecDeque<(String, UdpSocket)> = VecDeque::new();
    for n in 0..pods {
        std::thread::sleep((started + every * n).saturating_duration_since(Instant::now()));
        let name = pod_name("hp", n);
        let ip = pod_ip(n);
        let (veth, created) = lab.plug_pod(&name, ip)?;
        plumbed.push((ifindex_in(&node_ns, &veth)?, created));
        let receiver = exec::within(&lab.ns(&name), move || {
            Ok(UdpSocket::bind(SocketAddr::new(ip.into(), PORT))?)
        })?;
        if let Some(previous) = n.checked_sub(1) {
            let to = SocketAddr::new(pod_ip(previous).into(), PORT);
            exec::within(&lab.ns(&name), move || {
                let socket = UdpSocket::bind(SocketAddr::new(ip.into(), 0))?;
                for _ in 0..DATAGRAMS {
                    socket.send_to(&[0x5a; DATAGRAM_BYTES], to)?;
                }
                Ok(())
            })?;
        }
        alive.push_back((name, receiver));
        if alive.len() > ALIVE
            && let Some((gone, _)) = alive.pop_front()
        {
            lab.unplug_pod(&gone)?;
        }
    }
    let rate = f64::from(pods) / started.elapsed().as_secs_f64();
    // Let the agent read the last pods' traffic before they go.
    std::thread::sleep(Duration::from_millis(600));
    for (gone, _) in alive.drain(..) {
        lab.unplug_pod(&gone)?;
    }
    std::thread::sleep(Duration::from_millis(600));
    let first_seen = watch.finish()?;
    let mut attach_latencies = plumbed
        .iter()
        .map(|(index, created)| {
            first_seen
                .get(index)
                .map(|seen| seen.saturating_duration_since(*created))
                .ok_or_else(|| anyhow!("the agent never attached to ifindex {index}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    attach_latencies.sort();
    Ok(Churn {
        pods,
        rate,
        attach_latencies,
    })
}

/// Records, every 2 ms, when each ifindex first gets a tcx link of the agent.
struct AttachWatch {
    first_seen: Arc<Mutex<HashMap<u64, Instant>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl AttachWatch {
    fn start(pid: u32) -> AttachWatch {
        let first_seen = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (first_seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let now = Instant::now();
                let indexes = linked_ifindexes(pid);
                if let Ok(mut seen) = seen.lock() {
                    for index in indexes {
                        seen.entry(index).or_insert(now);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        AttachWatch {
            first_seen,
            stop,
            thread,
        }
    }

    fn finish(self) -> anyhow::Result<HashMap<u64, Instant>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the attach watch panicked"))?;
        let seen = self.first_seen.lock().map_err(|_| anyhow!("poisoned"))?;
        Ok(seen.clone())
    }
}

fn ifindex_in(ns: &str, name: &str) -> anyhow::Result<u64> {
    let name = std::ffi::CString::new(name).context("interface name")?;
    exec::within(ns, move || {
        // SAFETY: if_nametoindex reads the NUL-terminated name and nothing else.
        Ok(u64::from(unsafe { libc::if_nametoindex(name.as_ptr()) }))
    })
}
