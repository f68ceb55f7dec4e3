//! The harness of the kernel-program tests: a fresh node (network namespace, veths, its own
//! datapath) per test, crafted packets run through the real classifiers with
//! `BPF_PROG_TEST_RUN`, and the datapath counters read back.
//!
//! Every test body runs in a thread of its own inside a fresh, anonymous network namespace
//! (gone with the thread, so nothing needs cleaning up, even after a failure), with veth
//! interfaces standing in for pod veths and node ENIs, and loads its own datapath: tests run in
//! parallel without seeing each other's maps, and never touch the root namespace. They need
//! root; without it they fail, they never skip.
use std::{ffi::CString, net::SocketAddr};

use aya::programs::{TestRun as _, TestRunOptions};
use tracer_agent::datapath::{AttachMode, Datapath, TcxOrder};
use tracer_common::{
    DEFAULT_FLOW_TABLE_SIZE, DatapathCounter, FAMILY_IPV4, FAMILY_IPV6, FlowKey, Hook,
    PROGRAM_EGRESS, PROGRAM_INGRESS, TC_NEXT,
    test_support::netns::{self, Netns},
};

const NEED_ROOT: &str = "kernel-program tests need root (CAP_BPF, CAP_NET_ADMIN)";
/// The shortest frames BPF_PROG_TEST_RUN takes (EINVAL otherwise): an Ethernet header, and for
/// an untagged IPv4 or IPv6 frame, an Ethernet and a fixed IP header. Cuts inside the fixed IP
/// header are therefore made on VLAN-tagged frames.
pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const UNTAGGED_IPV4_MIN: usize = ETH_HLEN + 20;
pub(crate) const UNTAGGED_IPV6_MIN: usize = ETH_HLEN + 40;

/// The fields of the `struct __sk_buff` context (uapi linux/bpf.h, 192 bytes) that a test sets.
/// BPF_PROG_TEST_RUN copies them into the skb it builds, and rejects any other non-zero field.
#[derive(Clone, Copy)]
pub(crate) struct Skb {
    /// Interface the packet is seen at, looked up in the caller's network namespace.
    pub ifindex: u32,
    /// GSO: how many wire segments the buffer stands for, and their payload size.
    pub gso_segs: u32,
    pub gso_size: u32,
}

impl Skb {
    const SIZE: usize = 192;
    const IFINDEX_OFFSET: usize = 40;
    const GSO_SEGS_OFFSET: usize = 164;
    const GSO_SIZE_OFFSET: usize = 176;

    pub(crate) fn at(ifindex: u32) -> Self {
        Self {
            ifindex,
            gso_segs: 0,
            gso_size: 0,
        }
    }

    fn bytes(self) -> [u8; Self::SIZE] {
        let mut ctx = [0; Self::SIZE];
        for (offset, value) in [
            (Self::IFINDEX_OFFSET, self.ifindex),
            (Self::GSO_SEGS_OFFSET, self.gso_segs),
            (Self::GSO_SIZE_OFFSET, self.gso_size),
        ] {
            ctx[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        }
        ctx
    }
}

/// One test's node: interfaces in a namespace of its own, and a datapath of its own.
pub(crate) struct Node {
    pub datapath: Datapath,
    /// ifindex of the interfaces `d0`, `d1`, …
    pub ifindex: Vec<u32>,
    /// The counters as of the last `counter_deltas`.
    counters: [u64; DatapathCounter::COUNT as usize],
}

/// Runs `body` on a fresh node with `interfaces` interfaces, in a thread of its own that lives
/// in a new network namespace; a failure in `body` fails the calling test.
pub(crate) fn on_fresh_node(interfaces: usize, body: impl FnOnce(&mut Node) + Send + 'static) {
    on_fresh_node_with_table(interfaces, DEFAULT_FLOW_TABLE_SIZE, body);
}

/// `on_fresh_node` with a flow table of `table_size` entries.
pub(crate) fn on_fresh_node_with_table(
    interfaces: usize,
    table_size: u32,
    body: impl FnOnce(&mut Node) + Send + 'static,
) {
    netns::run_in(Netns::Fresh, move || {
        // veth, like a pod's: this kernel has no dummy interfaces. Only `dN` is used.
        let ifindex = (0..interfaces)
            .map(|n| {
                let (name, peer) = (format!("d{n}"), format!("p{n}"));
                netns::ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer])
                    .unwrap_or_else(|error| panic!("{error}"));
                let c_name = CString::new(name).expect("no NUL in an interface name");
                // SAFETY: a valid NUL-terminated string; this thread's namespace is searched.
                unsafe { libc::if_nametoindex(c_name.as_ptr()) }
            })
            .collect();
        let datapath = Datapath::load(table_size, AttachMode::Tcx(TcxOrder::First))
            .unwrap_or_else(|error| panic!("{NEED_ROOT}: {error}"));
        body(&mut Node {
            datapath,
            ifindex,
            counters: [0; DatapathCounter::COUNT as usize],
        });
    })
    .unwrap_or_else(|error| panic!("{NEED_ROOT}: {error}"));
}

impl Node {
    /// Runs the program of `hook` on `frame`; checks that it hands the packet on, unchanged.
    pub(crate) fn run(&mut self, hook: Hook, skb: Skb, frame: &[u8]) {
        let name = match hook {
            Hook::Ingress => PROGRAM_INGRESS,
            Hook::Egress => PROGRAM_EGRESS,
        };
        let ctx = skb.bytes();
        let mut data_out = vec![0; frame.len()];
        let program = self
            .datapath
            .program(name)
            .unwrap_or_else(|error| panic!("{error}"));
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut data_out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|error| {
                panic!(
                    "BPF_PROG_TEST_RUN of {name} on {} bytes: {error:?}",
                    frame.len()
                )
            });
        assert_eq!(
            result.return_value, TC_NEXT as u32,
            "{name} must hand every packet on"
        );
        assert_eq!(
            &data_out[..result.data_size_out as usize],
            frame,
            "{name} must not alter the packet"
        );
    }

    /// The counters that changed since the last call, by name, in `DatapathCounter` order.
    pub(crate) fn counter_deltas(&mut self) -> Vec<(&'static str, u64)> {
        let now = self.datapath.counters().expect("reading the counters");
        let deltas = DatapathCounter::ALL
            .iter()
            .map(|&counter| {
                (
                    counter.name(),
                    now[counter as usize] - self.counters[counter as usize],
                )
            })
            .filter(|&(_, delta)| delta != 0)
            .collect();
        self.counters = now;
        deltas
    }
}

pub(crate) fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a valid socket address")
}

/// The key of a connection whose canonical low and high endpoints are `lo` and `hi`: spelt out
/// by each test rather than computed by the code under test.
pub(crate) fn key(proto: u8, lo: SocketAddr, hi: SocketAddr) -> FlowKey {
    let octets = |endpoint: SocketAddr| {
        let mut bytes = [0; 16];
        match endpoint {
            SocketAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.ip().octets()),
            SocketAddr::V6(v6) => bytes = v6.ip().octets(),
        }
        bytes
    };
    FlowKey {
        lo_addr: octets(lo),
        hi_addr: octets(hi),
        lo_port: lo.port(),
        hi_port: hi.port(),
        proto,
        family: if lo.is_ipv4() {
            FAMILY_IPV4
        } else {
            FAMILY_IPV6
        },
        _pad: [0; 2],
    }
}
