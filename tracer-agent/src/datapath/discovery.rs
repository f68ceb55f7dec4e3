//! Which interfaces to attach to, and what the node's routes and addresses say about it.
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::Notify;

use crate::datapath::netlink::{self, LinkChange, NetlinkError, Protocol, Socket};

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
    /// The kind of interface `name` is, pod patterns first (they are the more specific).
    pub fn kind_of(&self, name: &str) -> Option<InterfaceKind> {
        if self.pod.iter().any(|pattern| glob_match(pattern, name)) {
            Some(InterfaceKind::Pod)
        } else if self.node.iter().any(|pattern| glob_match(pattern, name)) {
            Some(InterfaceKind::Node)
        } else {
            None
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
    fn add(&mut self, change: LinkChange) {
        match change {
            LinkChange::New(link) => {
                self.links.insert(link.index, link.name);
            }
            LinkChange::Lost => self.lost = true,
        }
    }
}

/// New links as netlink announces them, gathered by a thread of its own until the agent takes
/// them: a burst of pods is attached in one pass, and no netlink dump (which waits for the
/// RTNL lock, as attaching does) stands between a new veth and its attachment.
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
pub fn watch_changes() -> Result<Arc<ChangeWatch>, NetlinkError> {
    let mut socket = Socket::open(Protocol::Route)?;
    socket.subscribe(libc::RTMGRP_LINK as u32)?;
    let watch = Arc::new(ChangeWatch {
        pending: Mutex::new(Changes::default()),
        wake: Notify::new(),
    });
    let weak = Arc::downgrade(&watch);
    std::thread::spawn(move || {
        loop {
            let result = socket.link_changes();
            let Some(watch) = weak.upgrade() else {
                return;
            };
            match result {
                Ok(changes) if changes.is_empty() => {}
                Ok(changes) => {
                    let mut pending = watch.pending.lock().unwrap_or_else(PoisonError::into_inner);
                    changes.into_iter().for_each(|change| pending.add(change));
                    drop(pending);
                    watch.wake.notify_one();
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
    fn pod_patterns_win_over_node_patterns() {
        let patterns = InterfacePatterns {
            pod: vec!["eni*".into(), "vlan*".into()],
            node: vec!["e*".into()],
        };
        assert_eq!(patterns.kind_of("eni123"), Some(InterfaceKind::Pod));
        assert_eq!(patterns.kind_of("eth0"), Some(InterfaceKind::Node));
        assert_eq!(patterns.kind_of("lo"), None);
    }
}
