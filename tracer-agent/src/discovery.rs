//! Which interfaces to attach to, and what the node's routes and addresses say about it.
use std::{collections::HashSet, net::IpAddr, sync::Arc};

use tokio::sync::Notify;

use crate::netlink::{self, NetlinkError, Protocol, Socket};

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
            InterfaceKind::Pod => "pod",
            InterfaceKind::Node => "node",
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
    let local_pods = netlink::routes()?
        .into_iter()
        .filter(|route| {
            pod_indexes.contains(&route.oif)
                && route.prefix_len == if route.dst.is_ipv4() { 32 } else { 128 }
        })
        .map(|route| route.dst)
        .collect();
    Ok(Scan {
        interfaces,
        node_ips,
        local_pods,
    })
}

/// Links coming and going, addresses, and routes (a pod's /32 route is added after its veth).
const CHANGE_GROUPS: u32 = (libc::RTMGRP_LINK
    | libc::RTMGRP_IPV4_IFADDR
    | libc::RTMGRP_IPV6_IFADDR
    | libc::RTMGRP_IPV4_ROUTE
    | libc::RTMGRP_IPV6_ROUTE) as u32;

/// Watches this namespace's links, addresses and routes over netlink, in a thread of its own,
/// and wakes the returned `Notify` on every change: the agent scans again at once instead of
/// waiting for its next poll, so a new pod's veth is attached within milliseconds. The thread
/// ends when the agent drops the `Notify`.
pub fn watch_changes() -> Result<Arc<Notify>, NetlinkError> {
    let mut socket = Socket::open(Protocol::Route)?;
    socket.subscribe(CHANGE_GROUPS)?;
    let changed = Arc::new(Notify::new());
    let notify = Arc::downgrade(&changed);
    std::thread::spawn(move || {
        loop {
            let result = socket.wait_change();
            let Some(notify) = notify.upgrade() else {
                return;
            };
            match result {
                Ok(true) => notify.notify_one(),
                Ok(false) => {}
                Err(error) => {
                    log::warn!(
                        "netlink change notifications stopped ({error}); new interfaces are found at the next poll"
                    );
                    return;
                }
            }
        }
    });
    Ok(changed)
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
