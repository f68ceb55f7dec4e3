//! The clocks of a churn run: when each veth appears (netlink), and when the agent holds both
//! its tcx links (eBPF link ids) or both its clsact filters (tc notifications). None takes the
//! RTNL lock on its timing path, so none waits behind, nor adds to, the attaches it measures.
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
use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{RouteNetlinkMessage, tc::TcHeader};

use crate::{agent::LabAgent, lab::exec};

/// A tc filter added on a hook of a clsact qdisc, as netlink announced it.
#[derive(Clone, Copy, Debug)]
pub struct FilterSeen {
    pub index: u64,
    pub egress: bool,
    pub priority: u16,
    pub handle: u32,
    /// When the watch read the notification.
    pub at: Instant,
}

/// Records when each link of a namespace appears, as netlink announces it: the moment a veth
/// exists, which the `ip link add` that creates it knows only to within its wait for the RTNL
/// lock. With `filters`, also every tc filter added on a clsact hook there: the moment it runs.
pub struct NetlinkWatch {
    appeared: Arc<Mutex<HashMap<u64, Instant>>>,
    filters: Arc<Mutex<Vec<FilterSeen>>>,
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl NetlinkWatch {
    pub fn start(ns: &str, filters: bool) -> anyhow::Result<Self> {
        let appeared: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
        let added: Arc<Mutex<Vec<FilterSeen>>> = Arc::default();
        let lost: Arc<AtomicBool> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let watch = (
            Arc::clone(&appeared),
            Arc::clone(&added),
            Arc::clone(&lost),
            Arc::clone(&stop),
        );
        let (ready, subscribed) = mpsc::channel();
        let ns = ns.to_owned();
        let groups = if filters {
            libc::RTMGRP_LINK | libc::RTMGRP_TC
        } else {
            libc::RTMGRP_LINK
        };
        let thread = std::thread::spawn(move || {
            let socket = exec::enter(&ns).and_then(|()| notifications(groups as u32));
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
                if !readable(&socket) {
                    continue;
                }
                let received = socket.recv(&mut buffer.as_mut_slice(), 0);
                let now = Instant::now();
                let received = match received {
                    Ok(received) => received,
                    Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                    // ENOBUFS: the kernel dropped notifications.
                    Err(_) => {
                        lost.store(true, Ordering::Relaxed);
                        return;
                    }
                };
                let datagram = &buffer[..received];
                let mut appeared = appeared.lock().unwrap_or_else(PoisonError::into_inner);
                for index in new_links(datagram) {
                    appeared.entry(u64::from(index)).or_insert(now);
                }
                drop(appeared);
                added
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(new_filters(datagram, now));
            }
        });
        subscribed
            .recv()
            .map_err(|_| anyhow!("the link watch thread ended"))?
            .context("watching the node's links")?;
        let (appeared, filters, lost, stop) = watch;
        Ok(Self {
            appeared,
            filters,
            lost,
            stop,
            thread,
        })
    }

    /// The filters added so far, in the order they were announced.
    pub fn filters(&self) -> Vec<FilterSeen> {
        self.filters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// When each link first appeared, and every filter added meanwhile.
    pub fn finish(self) -> anyhow::Result<(HashMap<u64, Instant>, Vec<FilterSeen>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the link watch panicked"))?;
        if self.lost.load(Ordering::Relaxed) {
            bail!("netlink notifications were lost: creation and attach times unknown");
        }
        let appeared = self
            .appeared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let filters = self
            .filters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ok((appeared, filters))
    }
}

/// When each interface first had a filter on both clsact hooks. In the lab only the agent
/// adds filters to the pods' veths, so on those, these are the agent's.
pub fn both_hooks(filters: &[FilterSeen]) -> HashMap<u64, Instant> {
    let mut first: HashMap<(u64, bool), Instant> = HashMap::new();
    for filter in filters {
        first
            .entry((filter.index, filter.egress))
            .or_insert(filter.at);
    }
    first
        .iter()
        .filter(|((_, egress), _)| !egress)
        .filter_map(|((index, _), ingress)| {
            let egress = first.get(&(*index, true))?;
            Some((*index, (*ingress).max(*egress)))
        })
        .collect()
}

/// A netlink socket of the calling thread's namespace subscribed to `groups` (`RTMGRP_*`).
fn notifications(groups: u32) -> anyhow::Result<netlink_sys::Socket> {
    let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)
        .context("netlink socket")?;
    // A start-up's burst of notifications (two filters per interface) must not overflow it;
    // root may go past net.core.rmem_max.
    let size: libc::c_int = 8 << 20;
    // SAFETY: the option value is a valid int of the given size.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        bail!(
            "SO_RCVBUFFORCE on the watch's socket: {}",
            std::io::Error::last_os_error()
        );
    }
    socket
        .bind(&netlink_sys::SocketAddr::new(0, groups))
        .context("subscribing to link notifications")?;
    Ok(socket)
}

/// The `tcm_parent` of clsact's ingress and egress hooks.
const CLSACT_INGRESS: u32 = 0xffff_fff2;
const CLSACT_EGRESS: u32 = 0xffff_fff3;

/// The clsact filters the `RTM_NEWTFILTER` messages of a datagram announce, read from their
/// header alone (a filter's options need not parse).
fn new_filters(datagram: &[u8], at: Instant) -> Vec<FilterSeen> {
    let mut filters = Vec::new();
    let mut rest = datagram;
    while let Ok(message) = NetlinkBuffer::new_checked(rest) {
        let length = message.length() as usize;
        if message.message_type() == libc::RTM_NEWTFILTER
            && let Ok(header) = TcHeader::parse(message.payload())
        {
            let parent = u32::from(header.parent);
            if parent == CLSACT_INGRESS || parent == CLSACT_EGRESS {
                filters.push(FilterSeen {
                    index: u64::from(header.index as u32),
                    egress: parent == CLSACT_EGRESS,
                    priority: (header.info >> 16) as u16,
                    handle: u32::from(header.handle),
                    at,
                });
            }
        }
        // Messages are 4-byte aligned within a datagram.
        let length = (length + 3) & !3;
        if length == 0 || length >= rest.len() {
            break;
        }
        rest = &rest[length..];
    }
    filters
}

/// Whether a datagram waits on `socket`, after at most 100 ms: the watch checks for its stop
/// that often.
fn readable(socket: &netlink_sys::Socket) -> bool {
    let mut wait = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&raw mut wait, 1, 100) > 0 }
}

/// The interface indexes of the `RTM_NEWLINK` messages in a datagram of notifications.
fn new_links(datagram: &[u8]) -> Vec<u32> {
    let mut indexes = Vec::new();
    let mut rest = datagram;
    while let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest) {
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = message.payload {
            indexes.push(link.header.index);
        }
        // Messages are 4-byte aligned within a datagram.
        let length = (message.header.length as usize + 3) & !3;
        if length == 0 || length >= rest.len() {
            break;
        }
        rest = &rest[length..];
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
pub(super) struct AttachWatch {
    stop: Arc<AtomicBool>,
    timer: std::thread::JoinHandle<()>,
    resolver: std::thread::JoinHandle<HashMap<u64, Vec<Instant>>>,
}

impl AttachWatch {
    pub(super) fn start(agent: &LabAgent) -> Self {
        let programs: HashSet<u32> = agent.programs().into_iter().map(|id| id as u32).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
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
        Self {
            stop,
            timer,
            resolver,
        }
    }

    /// When each interface had both links.
    pub(super) fn finish(self) -> anyhow::Result<HashMap<u64, Instant>> {
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
