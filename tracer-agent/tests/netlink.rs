//! The rtnetlink dumps and link notifications against the real kernel, in a fresh network
//! namespace: a veth with addresses and host routes, as the VPC CNI wires a pod. They need root.
// The harness serves the datapath tests too; this file uses its namespace and `ip` only.
#[allow(dead_code)]
mod common;

use std::net::IpAddr;

use common::{ip, on_fresh_node};
use tracer_agent::datapath::netlink::{self, Address, Link, LinkChange, Protocol, Route, Socket};

fn addr(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

#[test]
fn dumps_see_a_pod_veth_its_addresses_and_host_routes() {
    on_fresh_node(1, |node| {
        let index = node.ifindex[0];
        ip(&["link", "set", "d0", "up"]);
        ip(&["link", "set", "p0", "up"]);
        ip(&["addr", "add", "10.0.9.1/24", "dev", "d0"]);
        ip(&["addr", "add", "2001:db8::1/64", "dev", "d0", "nodad"]);
        ip(&["route", "add", "10.0.9.5/32", "dev", "d0"]);
        ip(&["route", "add", "2001:db8:1::5/128", "dev", "d0"]);
        // Another table than the main one, with an id that only RTA_TABLE can hold.
        ip(&["route", "add", "10.0.8.5/32", "dev", "d0", "table", "1000"]);

        let links = netlink::links().expect("links");
        let d0 = Link {
            index,
            name: "d0".into(),
        };
        assert!(links.contains(&d0), "{links:?}");
        assert!(links.iter().any(|link| link.name == "lo"), "{links:?}");

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
    on_fresh_node(0, |_| {
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
