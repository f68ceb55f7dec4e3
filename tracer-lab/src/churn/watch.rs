//! The two clocks of a churn run: when each veth appears (netlink) and when the agent holds
//! both its tcx links (eBPF link ids). Neither takes the RTNL lock on its timing path, so
//! neither waits behind, nor adds to, the attaches it measures.
use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::{agent::LabAgent, lab::exec};

/// Records when each link of a namespace appears, as netlink announces it: the moment a veth
/// exists, which the `ip link add` that creates it knows only to within its wait for the RTNL
/// lock.
pub struct CreationWatch {
    appeared: Arc<Mutex<HashMap<u64, Instant>>>,
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl CreationWatch {
    pub fn start(ns: &str) -> anyhow::Result<CreationWatch> {
        let appeared: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
        let lost: Arc<AtomicBool> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let watch = (appeared.clone(), lost.clone(), stop.clone());
        let (ready, subscribed) = mpsc::channel();
        let ns = ns.to_owned();
        let thread = std::thread::spawn(move || {
            let socket = exec::enter(&ns).and_then(|()| link_notifications());
            let socket = match socket {
                Ok(socket) => {
                    let _ = ready.send(Ok(()));
                    socket
                }
                Err(error) => {
                    let _ = ready.send(Err(error));
                    return;
                }
            };
            let mut buffer = vec![0u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: recv writes at most `buffer.len()` bytes into the buffer.
                let received = unsafe {
                    libc::recv(
                        socket.as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                        0,
                    )
                };
                let now = Instant::now();
                if received < 0 {
                    let error = std::io::Error::last_os_error();
                    match error.raw_os_error() {
                        Some(libc::EAGAIN | libc::EINTR) => continue,
                        // ENOBUFS: the kernel dropped notifications.
                        _ => {
                            lost.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
                let mut appeared = appeared.lock().unwrap_or_else(PoisonError::into_inner);
                for index in new_links(&buffer[..received as usize]) {
                    appeared.entry(u64::from(index)).or_insert(now);
                }
            }
        });
        subscribed
            .recv()
            .map_err(|_| anyhow!("the link watch thread ended"))?
            .context("watching the node's links")?;
        let (appeared, lost, stop) = watch;
        Ok(CreationWatch {
            appeared,
            lost,
            stop,
            thread,
        })
    }

    /// When each link first appeared.
    pub fn finish(self) -> anyhow::Result<HashMap<u64, Instant>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the link watch panicked"))?;
        if self.lost.load(Ordering::Relaxed) {
            bail!("link notifications were lost: creation times unknown");
        }
        Ok(self
            .appeared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone())
    }
}

/// A netlink socket of the calling thread's namespace subscribed to its link changes, with a
/// receive timeout of 100 ms.
fn link_notifications() -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        bail!("netlink socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a zeroed sockaddr_nl with family and groups set is a valid address; the option
    // value is a valid timeval of the given size.
    let failed = unsafe {
        let mut local: libc::sockaddr_nl = std::mem::zeroed();
        local.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        local.nl_groups = libc::RTMGRP_LINK as u32;
        libc::bind(
            socket.as_raw_fd(),
            (&raw const local).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        ) != 0
            || libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            ) != 0
    };
    if failed {
        bail!(
            "subscribing to link notifications: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(socket)
}

/// The interface indexes of the `RTM_NEWLINK` messages in a datagram of notifications.
fn new_links(datagram: &[u8]) -> Vec<u32> {
    const RTM_NEWLINK: u16 = 16;
    // nlmsghdr (16 bytes), then ifinfomsg: family, pad, type (u16), index (i32)…
    let u32_at = |at: usize| {
        datagram
            .get(at..at + 4)
            .map(|bytes| u32::from_ne_bytes(bytes.try_into().expect("4 bytes")))
    };
    let mut indexes = Vec::new();
    let mut offset = 0;
    while let Some(len) = u32_at(offset).map(|len| len as usize) {
        let kind = datagram
            .get(offset + 4..offset + 6)
            .map(|bytes| u16::from_ne_bytes([bytes[0], bytes[1]]));
        if kind == Some(RTM_NEWLINK)
            && let Some(index) = u32_at(offset + 20)
        {
            indexes.push(index);
        }
        if len < 16 {
            break;
        }
        offset += (len + 3) & !3;
    }
    indexes
}

/// Records when each interface gets both tcx links (ingress and egress) of the agent.
///
/// The kernel numbers every eBPF link (ids are not reused) and makes a link fetchable by id
/// once its attach is done (`bpf_link_settle()`), so one thread looks for new ids every
/// millisecond and times each when it becomes fetchable; a second one finds out whose link
/// it is (program) and on which interface. Two threads because reading a tcx link's interface
/// takes the RTNL lock, which every attach and every veth deletion holds for an RCU grace
/// period: timed that way, the watch would measure its own waits (and add them to the
/// agent's). Descriptors in `/proc/PID/fd` would do without the lock, but their numbers are
/// reused: a watch thread kept off the CPU for a grace period misses a link.
pub struct AttachWatch {
    stop: Arc<AtomicBool>,
    timer: std::thread::JoinHandle<()>,
    resolver: std::thread::JoinHandle<HashMap<u64, Vec<Instant>>>,
}

impl AttachWatch {
    pub fn start(agent: &LabAgent) -> AttachWatch {
        let programs: HashSet<u32> = agent.programs().into_iter().map(|id| id as u32).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let (settled, links) = mpsc::channel::<(u32, Instant)>();
        let timer = std::thread::spawn(move || {
            // Links made before the watch are not timed.
            let mut newest = newest_link_id();
            let mut pending = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                let now = Instant::now();
                while let Some(id) = next_link_id(newest) {
                    pending.push(id);
                    newest = id;
                }
                pending.retain(|id| match link_fd(*id) {
                    Some(_fd) => {
                        let _ = settled.send((*id, now));
                        false
                    }
                    // Not settled yet, or gone (an attach that failed).
                    None => next_link_id(id - 1) == Some(*id),
                });
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let resolver = std::thread::spawn(move || {
            let mut seen: HashMap<u64, Vec<Instant>> = HashMap::new();
            for (id, at) in links {
                if let Some(index) = tcx_link_ifindex(id, &programs) {
                    seen.entry(u64::from(index)).or_default().push(at);
                }
            }
            seen
        });
        AttachWatch {
            stop,
            timer,
            resolver,
        }
    }

    /// When each interface had both links.
    pub fn finish(self) -> anyhow::Result<HashMap<u64, Instant>> {
        self.stop.store(true, Ordering::Relaxed);
        let panicked = |_| anyhow!("the attach watch panicked");
        self.timer.join().map_err(panicked)?;
        let seen = self.resolver.join().map_err(panicked)?;
        Ok(seen
            .into_iter()
            .filter_map(|(index, mut times)| {
                times.sort();
                Some((index, *times.get(1)?))
            })
            .collect())
    }
}

// bpf(2) commands and the link type this watch uses, from linux/bpf.h.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// `bpf(cmd, attr)`: the descriptor or value it returns, None on error.
fn bpf(cmd: libc::c_long, attr: &mut [u32]) -> Option<i32> {
    // SAFETY: `attr` is a valid, writable `union bpf_attr` prefix of the given size for `cmd`.
    let result = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    (result >= 0).then_some(result as i32)
}

/// The newest eBPF link id the kernel has handed out (0 when none).
pub fn newest_link_id() -> u32 {
    std::iter::successors(next_link_id(0), |id| next_link_id(*id))
        .last()
        .unwrap_or(0)
}

/// How many eBPF links newer than `id` are settled (their attach done), without the RTNL lock.
pub fn settled_links_after(id: u32) -> usize {
    std::iter::successors(next_link_id(id), |id| next_link_id(*id))
        .filter(|id| link_fd(*id).is_some())
        .count()
}

/// The id of the next eBPF link after `id`, settled or not.
fn next_link_id(id: u32) -> Option<u32> {
    // start_id, next_id, open_flags
    let mut attr = [id, 0, 0];
    bpf(BPF_LINK_GET_NEXT_ID, &mut attr).map(|_| attr[1])
}

/// A descriptor of link `id`, once its attach is done.
fn link_fd(id: u32) -> Option<OwnedFd> {
    let mut attr = [id, 0, 0];
    // SAFETY: a descriptor the kernel just returned, owned by nothing else.
    bpf(BPF_LINK_GET_FD_BY_ID, &mut attr).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The interface of link `id` when it is a tcx link of one of `programs`.
fn tcx_link_ifindex(id: u32, programs: &HashSet<u32>) -> Option<u32> {
    let fd = link_fd(id)?;
    // struct bpf_link_info: type, id, prog_id, then (8-byte aligned) tcx.ifindex.
    let mut info = [0u32; 16];
    let address = info.as_mut_ptr() as u64;
    let mut attr = [
        fd.as_raw_fd() as u32,
        size_of_val(&info) as u32,
        address as u32,
        (address >> 32) as u32,
    ];
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    (info[0] == BPF_LINK_TYPE_TCX && programs.contains(&info[2])).then_some(info[4])
}
