//! Pod hot-plug: 200 pods scheduled and deleted at ~20/s on the lab node while the agent runs.
//! Each new pod's veth must be attached within 100 ms (p99) — measured from the moment `ip link
//! add` has created it to the moment the agent holds a tcx link on its ifindex —, each
//! pod's traffic counted and classified, and nothing left attached once they are gone.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use xtask::{
    agent::LabAgent,
    build, figures,
    lab::{EndpointMode, Lab, LabOptions, exec},
    scrape,
};

const PODS: u32 = 200;
/// One new pod every 50 ms: 20 per second.
const EVERY: Duration = Duration::from_millis(50);
/// Pods alive at once: each lives about a second.
const ALIVE: usize = 20;
const DATAGRAMS: usize = 5;
const DATAGRAM_BYTES: usize = 1000;
const PORT: u16 = 9000;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab tests need root to create namespaces and load eBPF programs"
    );
}

/// The interfaces (ifindex) the process holds tcx links on, from `/proc/PID/fdinfo`.
fn linked_ifindexes(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter(|info| info.contains("link_type:\ttcx"))
        .filter_map(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("ifindex:"))
                .and_then(|index| index.trim().parse().ok())
        })
        .collect()
}

/// Records when each ifindex first gets a tcx link of the agent, until stopped.
struct AttachWatch {
    first_seen: Arc<Mutex<HashMap<u32, Instant>>>,
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
                let mut seen = seen.lock().unwrap();
                for index in indexes {
                    seen.entry(index).or_insert(now);
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        AttachWatch {
            first_seen,
            stop,
            thread,
        }
    }

    fn finish(self) -> HashMap<u32, Instant> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("watch thread");
        Arc::try_unwrap(self.first_seen)
            .expect("watch thread ended")
            .into_inner()
            .unwrap()
    }
}

fn ifindex_in(ns: &str, name: &str) -> u32 {
    let name = std::ffi::CString::new(name).unwrap();
    exec::within(ns, move || {
        // SAFETY: if_nametoindex reads the NUL-terminated name and nothing else.
        Ok(unsafe { libc::if_nametoindex(name.as_ptr()) })
    })
    .expect("if_nametoindex")
}

fn pod_ip(n: u32) -> Ipv4Addr {
    // 10.0.3.0/24 and 10.0.4.0/24: inside the lab's VPC, away from its other hosts.
    Ipv4Addr::new(10, 0, 3 + (n / 250) as u8, 1 + (n % 250) as u8)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    sorted[((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn pods_churning_at_20_per_second_are_attached_counted_and_forgotten() {
    require_root();
    let lab = Lab::up(&LabOptions {
        mode: EndpointMode::Public,
        external_snat: false,
        helper_exe: env!("CARGO_BIN_EXE_xtask").into(),
    })
    .expect("lab up");
    let mut agent = LabAgent::start(&lab, &build::tracer_path()).expect("agent start");
    agent
        .wait_ready(Duration::from_secs(15))
        .expect("agent ready");
    let node_ns = lab.ns("node");
    let links_before = linked_ifindexes(agent.pid()).len();
    let before = agent.scrape().expect("scrape");
    let local = [("path", "pod_to_pod_local"), ("direction", "forward")];
    let watch = AttachWatch::start(agent.pid());

    let started = Instant::now();
    let mut plumbed: Vec<(u32, Instant)> = Vec::new();
    let mut alive: std::collections::VecDeque<(String, UdpSocket)> = Default::default();
    for n in 0..PODS {
        std::thread::sleep((started + EVERY * n).saturating_duration_since(Instant::now()));
        let name = format!("hp{n}");
        let ip = pod_ip(n);
        let (veth, created) = lab.plug_pod(&name, ip).expect("plug pod");
        plumbed.push((ifindex_in(&node_ns, &veth), created));
        let receiver = exec::within(&lab.ns(&name), move || {
            Ok(UdpSocket::bind(SocketAddr::new(ip.into(), PORT))?)
        })
        .expect("receiver");
        // The new pod talks to the previous one, still alive: pod_to_pod_local.
        if let Some(n_previous) = n.checked_sub(1) {
            let to = SocketAddr::new(pod_ip(n_previous).into(), PORT);
            exec::within(&lab.ns(&name), move || {
                let socket = UdpSocket::bind(SocketAddr::new(ip.into(), 0))?;
                for _ in 0..DATAGRAMS {
                    socket.send_to(&[0x5a; DATAGRAM_BYTES], to)?;
                }
                Ok(())
            })
            .expect("send");
        }
        alive.push_back((name, receiver));
        if alive.len() > ALIVE {
            let (gone, _) = alive.pop_front().unwrap();
            lab.unplug_pod(&gone).expect("unplug pod");
        }
    }
    let rate = f64::from(PODS) / started.elapsed().as_secs_f64();
    // Let the last pods' traffic be read before they go.
    std::thread::sleep(Duration::from_millis(600));
    for (gone, _) in alive.drain(..) {
        lab.unplug_pod(&gone).expect("unplug pod");
    }
    std::thread::sleep(Duration::from_millis(600));
    let first_seen = watch.finish();

    let mut latencies: Vec<Duration> = plumbed
        .iter()
        .map(|(index, created)| {
            let seen = first_seen
                .get(index)
                .unwrap_or_else(|| panic!("ifindex {index} was never attached"));
            seen.saturating_duration_since(*created)
        })
        .collect();
    latencies.sort();
    let (p50, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );
    figures::record(
        "hotplug",
        &format!(
            "hot-plug: {PODS} pods at {rate:.1}/s; attach latency (veth created → tcx link held) p50 {p50:.1?}, p99 {p99:.1?}, max {max:.1?}"
        ),
    )
    .expect("record the figure");
    assert!(
        p99 <= Duration::from_millis(100),
        "attach latency p99 {p99:?} > 100 ms"
    );

    let after = agent.scrape().expect("scrape");
    let grew = |name: &str, labels: &[(&str, &str)]| {
        scrape::sum(&after, name, labels) - scrape::sum(&before, name, labels)
    };
    let sent = f64::from(PODS - 1) * (DATAGRAMS * DATAGRAM_BYTES) as f64;
    let counted = grew("tracer_path_bytes_total", &local);
    assert!(
        counted >= sent && counted <= sent * 1.1 + 20_000.0,
        "pod_to_pod_local forward bytes grew by {counted}, {sent} payload sent"
    );
    let flows = grew("tracer_path_flows_total", &[("path", "pod_to_pod_local")]);
    assert_eq!(flows, f64::from(PODS - 1), "one flow per new pod");
    // A pod not yet known as local would show as remote; one not placed at all, as unknown.
    for path in ["pod_to_pod_remote", "unknown"] {
        let stray = grew("tracer_path_bytes_total", &[("path", path)]);
        assert!(stray < 5_000.0, "{path} grew by {stray} bytes");
    }

    // Nothing leaked: the agent holds links on the lab's own interfaces only.
    assert_eq!(
        scrape::sum(&after, "tracer_attached_interfaces", &[("kind", "pod")]),
        scrape::sum(&before, "tracer_attached_interfaces", &[("kind", "pod")]),
    );
    assert_eq!(linked_ifindexes(agent.pid()).len(), links_before);
    drop(agent);
    lab.down().expect("lab down");
}
