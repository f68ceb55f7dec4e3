//! The rtnetlink dumps and link notifications against the real kernel, in a fresh network
//! namespace: a veth with addresses and host routes, as the VPC CNI wires a pod. They need root.
use std::net::IpAddr;

use tracer_agent::datapath::netlink::{self, Address, LinkChange, Protocol, Route, Socket};
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
        assert!(
            !routes.iter().any(|route| route.dst == addr("10.0.8.5")),
            "a route of table 1000: {routes:?}"
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
            let changes = socket.link_changes().expect("link changes");
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
                .any(|change| matches!(change, LinkChange::New(link) if link.name == "eni9")),
            "eni9 was never announced: {announced:?}"
        );
    });
}
