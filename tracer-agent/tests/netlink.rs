//! The rtnetlink dumps and link and tc filter notifications against the real kernel, in a
//! fresh network namespace: a veth with addresses and host routes, as the VPC CNI wires a
//! pod. They need root.
use std::net::IpAddr;

use aya::programs::{
    SchedClassifier, TcAttachType,
    tc::{self, NlOptions, TcAttachOptions},
};
use tracer_agent::datapath::{
    Datapath, POLICY_STANDIN_OBJECT, POLICY_STANDIN_PROGRAM,
    netlink::{self, Address, Change, FilterAdded, Protocol, Route, Socket},
};
use tracer_common::test_support::netns::{self, Netns};

fn addr(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

/// `ip ARGS` in the calling thread's namespace; a failure fails the test.
fn ip(args: &[&str]) {
    netns::ip(args).unwrap_or_else(|error| panic!("{error}"));
}

/// Runs `work` in a fresh network namespace.
fn in_fresh_netns(work: impl FnOnce() + Send) {
    netns::run_in(Netns::Fresh, work)
        .unwrap_or_else(|error| panic!("these tests need root: {error}"));
}

#[test]
fn dumps_see_a_pod_veth_its_addresses_and_host_routes() {
    in_fresh_netns(|| {
        ip(&["link", "add", "d0", "type", "veth", "peer", "name", "p0"]);
        // SAFETY: a NUL-terminated name; if_nametoindex reads nothing else.
        let index = unsafe { libc::if_nametoindex(c"d0".as_ptr()) };
        assert_ne!(index, 0, "d0: {}", std::io::Error::last_os_error());
        ip(&["link", "set", "d0", "up"]);
        ip(&["link", "set", "p0", "up"]);
        ip(&["addr", "add", "10.0.9.1/24", "dev", "d0"]);
        ip(&["addr", "add", "2001:db8::1/64", "dev", "d0", "nodad"]);
        ip(&["route", "add", "10.0.9.5/32", "dev", "d0"]);
        ip(&["route", "add", "2001:db8:1::5/128", "dev", "d0"]);
        // Another table than the main one, with an id that only RTA_TABLE can hold.
        ip(&["route", "add", "10.0.8.5/32", "dev", "d0", "table", "1000"]);

        let links = netlink::links().expect("links");
        let d0 = links
            .iter()
            .find(|link| link.index == index && link.name == "d0")
            .unwrap_or_else(|| panic!("d0 at {index}: {links:?}"));
        assert!(links.iter().any(|link| link.name == "lo"), "{links:?}");

        // The kernel's packet counters, which blindness is judged against, move with traffic:
        // a datagram to an unresolved neighbour makes d0 transmit ARP requests.
        let before = d0.packets.expect("IFLA_STATS64 of d0");
        let socket = std::net::UdpSocket::bind("10.0.9.1:0").expect("bind");
        socket.send_to(b"x", "10.0.9.5:9").expect("send");
        let moved = (0..40).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let now = netlink::links().expect("links");
            now.iter()
                .find(|link| link.index == index)
                .and_then(|link| link.packets)
                .is_some_and(|packets| packets > before)
        });
        assert!(moved, "d0's packet count stayed at {before} for 2 s");

        let addresses = netlink::addresses().expect("addresses");
        for text in ["10.0.9.1", "2001:db8::1"] {
            let address = Address {
                index,
                addr: addr(text),
            };
            assert!(addresses.contains(&address), "{text}: {addresses:?}");
        }

        let routes = netlink::routes().expect("routes");
        for (text, prefix_len) in [("10.0.9.5", 32), ("2001:db8:1::5", 128)] {
            let route = Route {
                dst: addr(text),
                prefix_len,
                oif: index,
            };
            assert!(routes.contains(&route), "{text}: {routes:?}");
        }
        // A branch-ENI pod's host route lives in its VLAN's table (security groups for pods).
        let in_table_1000 = Route {
            dst: addr("10.0.8.5"),
            prefix_len: 32,
            oif: index,
        };
        assert!(routes.contains(&in_table_1000), "{routes:?}");
        // The local table's routes (the node's own addresses) are not routes to anywhere.
        assert!(
            !routes.iter().any(|route| route.dst == addr("10.0.9.1")),
            "a route of the local table: {routes:?}"
        );
    });
}

#[test]
fn notifications_announce_a_new_link() {
    in_fresh_netns(|| {
        let mut socket = Socket::open(Protocol::Route).expect("socket");
        socket
            .subscribe(libc::RTMGRP_LINK as u32)
            .expect("subscribe");
        ip(&["link", "add", "eni9", "type", "veth", "peer", "name", "p9"]);
        // A few datagrams (one per new link and change), then silence.
        let mut announced = Vec::new();
        let mut quiet = false;
        for _ in 0..10 {
            let changes = socket.changes().expect("link changes");
            // Once everything is read, a wait ends empty at the receive timeout: it never hangs.
            quiet = changes.is_empty();
            announced.extend(changes);
            if quiet {
                break;
            }
        }
        assert!(quiet, "notifications never stopped: {announced:?}");
        assert!(
            announced
                .iter()
                .any(|change| matches!(change, Change::Link(link) if link.name == "eni9")),
            "eni9 was never announced: {announced:?}"
        );
    });
}

/// What the clsact mode relies on, checked on this kernel: within one priority the filter
/// added last is listed (and runs) first, and its `RTM_NEWTFILTER` names its hook, priority
/// and handle, so that a filter added at priority 1 after the agent's is known to overtake
/// it.
#[test]
fn a_filter_added_later_at_the_same_priority_goes_first_and_is_announced() {
    in_fresh_netns(|| {
        ip(&["link", "add", "eni7", "type", "veth", "peer", "name", "p7"]);
        let mut socket = Socket::open(Protocol::Route).expect("socket");
        socket.subscribe(libc::RTMGRP_TC as u32).expect("subscribe");
        let mut ebpf = aya::Ebpf::load(POLICY_STANDIN_OBJECT).expect("the stand-in loads");
        let program: &mut SchedClassifier = ebpf
            .program_mut(POLICY_STANDIN_PROGRAM)
            .expect("the stand-in's program")
            .try_into()
            .expect("a classifier");
        program.load().expect("load");
        tc::qdisc_add_clsact("eni7").expect("clsact");
        for handle in [1, 2] {
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: 1,
                handle: handle.into(),
                ..NlOptions::default()
            });
            program
                .attach_with_options("eni7", TcAttachType::Ingress, options)
                .expect("attach");
        }
        // From this thread, so in its namespace.
        let shown = std::process::Command::new("tc")
            .args(["filter", "show", "dev", "eni7", "ingress"])
            .output()
            .expect("tc filter show");
        let shown = String::from_utf8_lossy(&shown.stdout);
        let handles: Vec<&str> = shown
            .split_whitespace()
            .skip_while(|word| *word != "handle")
            .filter(|word| word.starts_with("0x"))
            .collect();
        assert_eq!(handles, ["0x2", "0x1"], "newest first:\n{shown}");

        // One datagram per notification, the new filter chain's among them (stepped over).
        let mut announced = Vec::new();
        for _ in 0..10 {
            announced.extend(socket.changes().expect("tc notifications"));
            if announced.len() >= 2 {
                break;
            }
        }
        // SAFETY: a NUL-terminated name; if_nametoindex reads nothing else.
        let index = unsafe { libc::if_nametoindex(c"eni7".as_ptr()) };
        let added = |handle| FilterAdded {
            index,
            hook: TcAttachType::Ingress,
            priority: 1,
            handle,
        };
        assert_eq!(
            announced,
            [Change::Filter(added(1)), Change::Filter(added(2))],
            "the two filters' notifications"
        );
        assert!(Datapath::overtakes(&added(2)));
        let behind = FilterAdded {
            priority: 2,
            ..added(2)
        };
        assert!(!Datapath::overtakes(&behind));
    });
}
