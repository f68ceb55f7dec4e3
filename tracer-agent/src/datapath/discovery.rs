//! Which interfaces to attach to, and what the node's routes and addresses say about it.
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::Notify;

use crate::datapath::{
    Datapath,
    netlink::{self, Change, FilterAdded, NetlinkError, Protocol, Socket},
};

/// The role an interface plays on an EKS node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InterfaceKind {
    /// A pod's host-side veth (`eni…`) or a branch-ENI pod's (`vlan…`).
    Pod,
    /// One of the node's ENIs.
    Node,
}

impl InterfaceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::Node => "node",
        }
    }
}

/// Name patterns (`*` matches any run of characters) that pick the interfaces to trace.
#[derive(Clone, Debug)]
pub struct InterfacePatterns {
    pub pod: Vec<String>,
    pub node: Vec<String>,
}

impl InterfacePatterns {
    /// The kind of interface `name` is. When it matches a pod and a node pattern, the more
    /// specific pattern (more characters besides `*`) decides, and a tie makes it a pod's:
    /// with security groups for pods, `vlan.eth.*` (the trunk ENI's VLAN sub-interfaces, the
    /// node's) wins over `vlan*` (branch-ENI pods' veths).
    pub fn kind_of(&self, name: &str) -> Option<InterfaceKind> {
        let specificity = |patterns: &[String]| {
            patterns
                .iter()
                .filter(|pattern| glob_match(pattern, name))
                .map(|pattern| pattern.chars().filter(|c| *c != '*').count())
                .max()
        };
        match (specificity(&self.pod), specificity(&self.node)) {
            (Some(pod), Some(node)) if node > pod => Some(InterfaceKind::Node),
            (Some(_), _) => Some(InterfaceKind::Pod),
            (None, Some(_)) => Some(InterfaceKind::Node),
            (None, None) => None,
        }
    }
}

/// A traced interface.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub kind: InterfaceKind,
    /// The kernel's count of packets received and transmitted, when the dump gave one.
    pub packets: Option<u64>,
    /// For a pod interface, the addresses its host routes lead to: the pod's.
    pub pod_addresses: Vec<IpAddr>,
}

/// What one netlink scan tells: the interfaces to trace, the node's own addresses (those on
/// its ENIs) and the local pods (host routes pointing at pod interfaces, as the VPC CNI
/// installs one per pod).
#[derive(Clone, Debug, Default)]
pub struct Scan {
    pub interfaces: Vec<Interface>,
    pub node_ips: HashSet<IpAddr>,
    pub local_pods: HashSet<IpAddr>,
}

pub fn scan(patterns: &InterfacePatterns) -> Result<Scan, NetlinkError> {
    let mut interfaces: Vec<Interface> = netlink::links()?
        .into_iter()
        .filter_map(|link| {
            patterns.kind_of(&link.name).map(|kind| Interface {
                name: link.name,
                index: link.index,
                kind,
                packets: link.packets,
                pod_addresses: Vec::new(),
            })
        })
        .collect();
    // Node ENIs first: every packet that enters or leaves the node crosses one, so counting
    // starts there while the (many) pod veths are still being attached.
    interfaces.sort_by(|a, b| {
        (a.kind != InterfaceKind::Node, &a.name).cmp(&(b.kind != InterfaceKind::Node, &b.name))
    });
    let indexes_of = |kind| -> HashSet<u32> {
        interfaces
            .iter()
            .filter(|interface| interface.kind == kind)
            .map(|interface| interface.index)
            .collect()
    };
    let (pod_indexes, node_indexes) = (
        indexes_of(InterfaceKind::Pod),
        indexes_of(InterfaceKind::Node),
    );
    let node_ips = netlink::addresses()?
        .into_iter()
        .filter(|address| node_indexes.contains(&address.index))
        .map(|address| address.addr)
        .collect();
    let mut local_pods = HashSet::new();
    for route in netlink::routes()? {
        let host_route = route.prefix_len == if route.dst.is_ipv4() { 32 } else { 128 };
        if !host_route || !pod_indexes.contains(&route.oif) {
            continue;
        }
        local_pods.insert(route.dst);
        if let Some(interface) = interfaces.iter_mut().find(|i| i.index == route.oif) {
            interface.pod_addresses.push(route.dst);
        }
    }
    Ok(Scan {
        interfaces,
        node_ips,
        local_pods,
    })
}

/// Links announced by netlink since the agent last took them.
#[derive(Debug, Default)]
pub struct Changes {
    /// New or changed links: index → latest name.
    pub links: BTreeMap<u32, String>,
    /// Notifications were lost: only a full scan tells what changed.
    pub lost: bool,
}

impl Changes {
    /// Whether there is anything for the agent to do.
    fn is_empty(&self) -> bool {
        self.links.is_empty() && !self.lost
    }
}

/// New links as netlink announces them, gathered by a thread of its own until the agent
/// takes them: a burst of pods is attached in one pass, and no netlink dump (which waits for
/// the RTNL lock, as attaching does) stands between a new veth and its attachment.
pub struct ChangeWatch {
    pending: Mutex<Changes>,
    wake: Notify,
}

impl ChangeWatch {
    /// Waits for changes, then takes all those reported meanwhile.
    pub async fn changes(&self) -> Changes {
        self.wake.notified().await;
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Watches this namespace's links over netlink (`RTMGRP_LINK`), in a thread of its own that
/// ends when the agent drops the returned watch. Links that vanish, addresses and routes are
/// left to the next poll's scan: until then they change nothing the agent shows.
///
/// With `keep_first` (a datapath in clsact mode, where a filter added later at the agent's
/// priority runs before the agent's), it watches the tc filters too (`RTMGRP_TC`) and moves
/// the agent's filter back in front itself, at once: the agent's loop would do it only after
/// a poll under way, tens of milliseconds on a busy node, while the other filter hides the
/// packets.
pub fn watch_changes(
    keep_first: Option<Arc<Mutex<Datapath>>>,
) -> Result<Arc<ChangeWatch>, NetlinkError> {
    let mut socket = Socket::open(Protocol::Route)?;
    let groups = if keep_first.is_some() {
        libc::RTMGRP_LINK | libc::RTMGRP_TC
    } else {
        libc::RTMGRP_LINK
    };
    socket.subscribe(groups as u32)?;
    let watch = Arc::new(ChangeWatch {
        pending: Mutex::new(Changes::default()),
        wake: Notify::new(),
    });
    let weak = Arc::downgrade(&watch);
    std::thread::spawn(move || {
        loop {
            let result = socket.changes();
            let Some(watch) = weak.upgrade() else {
                return;
            };
            match result {
                Ok(changes) => {
                    let mut pending = watch.pending.lock().unwrap_or_else(PoisonError::into_inner);
                    for change in changes {
                        match change {
                            Change::Link(link) => {
                                pending.links.insert(link.index, link.name);
                            }
                            Change::Lost => pending.lost = true,
                            Change::Filter(filter) => {
                                if let Some(datapath) = &keep_first {
                                    keep_in_front(datapath, &filter);
                                }
                            }
                        }
                    }
                    // The agent's own filters wake nobody.
                    let wake = !pending.is_empty();
                    drop(pending);
                    if wake {
                        watch.wake.notify_one();
                    }
                }
                Err(error) => {
                    tracing::warn!(
                        "netlink change notifications stopped ({error}); new interfaces are found at the next poll"
                    );
                    return;
                }
            }
        }
    });
    Ok(watch)
}

/// Moves the agent's filter back in front when `filter` was added ahead of it.
fn keep_in_front(datapath: &Mutex<Datapath>, filter: &FilterAdded) {
    if !Datapath::overtakes(filter) {
        return;
    }
    let moved = datapath
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .move_to_front(filter.index, filter.hook);
    if let Err(error) = moved {
        tracing::warn!("{error}: another program's filter runs before the agent's there");
    }
}

/// Shell-style matching with `*` only: what interface patterns need, nothing more.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&at| tail.is_char_boundary(at))
                .any(|at| glob_match(rest, &tail[at..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("eni*", "eni3fa1b2c4d5e"));
        assert!(glob_match("vlan*", "vlan.eth.1"));
        assert!(glob_match("eth*", "eth0"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("e*h*", "eth1"));
        assert!(!glob_match("eni*", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
    }

    #[test]
    fn the_more_specific_pattern_decides() {
        let patterns = InterfacePatterns {
            pod: vec!["eni*".into(), "vlan*".into()],
            node: vec!["e*".into(), "vlan.eth.*".into()],
        };
        assert_eq!(patterns.kind_of("eni123"), Some(InterfaceKind::Pod));
        assert_eq!(patterns.kind_of("eth0"), Some(InterfaceKind::Node));
        assert_eq!(patterns.kind_of("lo"), None);
        // Security groups for pods: a branch-ENI pod's veth, and the trunk's VLAN 3.
        assert_eq!(
            patterns.kind_of("vlan0a1b2c3d4e5"),
            Some(InterfaceKind::Pod)
        );
        assert_eq!(patterns.kind_of("vlan.eth.3"), Some(InterfaceKind::Node));
        // A tie is a pod's: the more common mistake to survive is a pod counted as the node.
        let tie = InterfacePatterns {
            pod: vec!["x*".into()],
            node: vec!["*x".into()],
        };
        assert_eq!(tie.kind_of("xx"), Some(InterfaceKind::Pod));
    }
}
