//! Conntrack against the real kernel: real traffic through real SNAT and DNAT between two network
//! namespaces this test creates and removes. Nothing touches the root namespace.
//!
//! node (`trc-ct-X`)                                  peer (`trc-ct-X-peer`)
//!   lo   10.0.1.5 (a "pod" address)                    lo   203.0.113.10 (an "internet" host)
//!   eth0 10.0.0.10/24  <---------- veth ---------->    eth0 10.0.0.1/24
//!   SNAT 10.0.1.5 -> 10.0.0.10 leaving eth0 (as AWS-SNAT-CHAIN-0 does)
//!   DNAT 198.51.100.80:80 -> 10.0.0.1:8080 (as kube-proxy does for a ClusterIP)
use std::{
    collections::hash_map::RandomState,
    hash::BuildHasher as _,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    thread,
    time::Duration,
};

use tracer_agent::aggregate::conntrack::{Conntrack, Entry, Tuple};
use tracer_common::test_support::netns;

const TIMEOUT: Duration = Duration::from_secs(5);
const TCP: u8 = 6;
const UDP: u8 = 17;

/// A named network namespace, deleted on drop so that a failing test cleans up too.
struct Netns {
    name: String,
}

impl Netns {
    fn add(name: String) -> Self {
        run(Command::new("ip").args(["netns", "add", &name]));
        Self { name }
    }

    /// Runs a shell script inside the namespace; panics with its output when it fails.
    fn sh(&self, script: &str) {
        run(Command::new("ip").args(["netns", "exec", &self.name, "sh", "-ec", script]));
    }

    /// Runs `work` on a thread that has entered the namespace; sockets it creates stay there.
    fn enter<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        netns::run_in(netns::Netns::Named(&self.name), work)
            .unwrap_or_else(|error| panic!("{error}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn tuple(src: SocketAddr, dst: SocketAddr, proto: u8) -> Tuple {
    Tuple {
        src: src.ip(),
        dst: dst.ip(),
        proto,
        src_port: src.port(),
        dst_port: dst.port(),
    }
}

fn find(entries: &[Entry], original: Tuple) -> Entry {
    *entries
        .iter()
        .find(|entry| entry.original == original)
        .unwrap_or_else(|| panic!("no entry for {original:?} in {entries:#?}"))
}

/// What the node saw of its connections, and the conntrack table right after.
struct Observed {
    /// The pod's UDP socket, and its address as the peer saw it (after SNAT).
    pod_udp: (SocketAddr, SocketAddr),
    /// The node's TCP socket, and its address as the backend saw it (no SNAT).
    node_tcp: (SocketAddr, SocketAddr),
    ipv6_udp: SocketAddr,
    entries: Vec<Entry>,
}

#[test]
fn dump_shows_real_snat_and_dnat() {
    // SAFETY: geteuid(2) cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root (CAP_NET_ADMIN) to create a network namespace"
    );
    let suffix = format!(
        "{:08x}",
        RandomState::new().hash_one(std::process::id()) as u32
    );
    let node = Netns::add(format!("trc-ct-{suffix}"));
    let peer = Netns::add(format!("trc-ct-{suffix}-peer"));
    node.sh(&format!(
        "ip link set lo up
         ip link add eth0 type veth peer name eth0 netns {peer}
         ip link set eth0 up
         ip addr add 10.0.0.10/24 dev eth0
         ip addr add 10.0.1.5/32 dev lo
         ip route add default via 10.0.0.1
         iptables -t nat -A POSTROUTING -s 10.0.1.5 -o eth0 -j SNAT --to-source 10.0.0.10
         iptables -t nat -A OUTPUT -d 198.51.100.80 -p tcp --dport 80 \
             -j DNAT --to-destination 10.0.0.1:8080
         # Any conntrack user makes the kernel track IPv6 in this namespace too.
         ip6tables -A OUTPUT -m conntrack --ctstate NEW -j ACCEPT",
        peer = peer.name
    ));
    peer.sh("ip link set lo up
         ip link set eth0 up
         ip addr add 10.0.0.1/24 dev eth0
         ip addr add 203.0.113.10/32 dev lo");

    // The peer's servers answer with the address they saw the client at.
    let (echo, backend) = peer.enter(|| {
        (
            UdpSocket::bind("203.0.113.10:7").unwrap(),
            TcpListener::bind("10.0.0.1:8080").unwrap(),
        )
    });
    thread::spawn(move || {
        let mut buffer = [0u8; 64];
        echo.set_read_timeout(Some(TIMEOUT)).unwrap();
        let (_, client) = echo.recv_from(&mut buffer).unwrap();
        echo.send_to(client.to_string().as_bytes(), client).unwrap();
    });
    thread::spawn(move || {
        let (mut stream, client) = backend.accept().unwrap();
        stream.write_all(client.to_string().as_bytes()).unwrap();
    });

    let observed = node.enter(|| {
        let pod = UdpSocket::bind("10.0.1.5:0").unwrap();
        pod.set_read_timeout(Some(TIMEOUT)).unwrap();
        pod.send_to(b"ping", "203.0.113.10:7").unwrap();
        let mut buffer = [0u8; 64];
        let (len, _) = pod.recv_from(&mut buffer).unwrap();
        let seen: SocketAddr = std::str::from_utf8(&buffer[..len])
            .unwrap()
            .parse()
            .unwrap();

        let service: SocketAddr = "198.51.100.80:80".parse().unwrap();
        let mut client = TcpStream::connect_timeout(&service, TIMEOUT).unwrap();
        client.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut seen_by_backend = String::new();
        client.read_to_string(&mut seen_by_backend).unwrap();

        let ipv6 = UdpSocket::bind("[::1]:0").unwrap();
        ipv6.send_to(b"ping", "[::1]:9").unwrap();

        let mut entries = Vec::new();
        Conntrack::open()
            .unwrap()
            .dump_each(|entry| entries.push(entry))
            .unwrap();
        Observed {
            pod_udp: (pod.local_addr().unwrap(), seen),
            node_tcp: (
                client.local_addr().unwrap(),
                seen_by_backend.parse().unwrap(),
            ),
            ipv6_udp: ipv6.local_addr().unwrap(),
            entries,
        }
    });

    // Pod egress: the peer saw the node's address, and conntrack says so.
    let (pod, seen_by_peer) = observed.pod_udp;
    assert_eq!(seen_by_peer.ip(), "10.0.0.10".parse::<IpAddr>().unwrap());
    let internet: SocketAddr = "203.0.113.10:7".parse().unwrap();
    let snat = find(&observed.entries, tuple(pod, internet, UDP));
    assert_eq!(snat.translated(), Some(tuple(seen_by_peer, internet, UDP)));
    assert!(snat.is_snat() && !snat.is_dnat(), "{snat:?}");

    // ClusterIP-like DNAT: the node connected to 198.51.100.80:80, the backend answered.
    let (client, seen_by_backend) = observed.node_tcp;
    assert_eq!(seen_by_backend, client);
    let service: SocketAddr = "198.51.100.80:80".parse().unwrap();
    let backend: SocketAddr = "10.0.0.1:8080".parse().unwrap();
    let dnat = find(&observed.entries, tuple(client, service, TCP));
    assert_eq!(dnat.translated(), Some(tuple(client, backend, TCP)));
    assert!(dnat.is_dnat() && !dnat.is_snat(), "{dnat:?}");

    // The same dump holds IPv6 entries, untranslated.
    let discard: SocketAddr = "[::1]:9".parse().unwrap();
    let plain = find(&observed.entries, tuple(observed.ipv6_udp, discard, UDP));
    assert_eq!(plain.translated(), None);
}
