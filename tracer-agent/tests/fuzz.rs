//! Malformed packets through the real classifiers (`BPF_PROG_TEST_RUN`): 120,000 random and
//! mutated frames — truncated, with bogus lengths, flipped bytes, nested VLAN tags, IPv6
//! extension-header chains, random bytes — against a table holding real connections.
//!
//! The oracle needs no second parser. Each frame is made from one real connection (or from
//! none) and says what it may do to it:
//! - a well-formed variant (options, extension headers, VLAN tags, payloads full of the other
//!   connections' headers as decoys) counts to its connection exactly: one packet, its IP length;
//! - a damaged one may count to its connection (one packet, no more bytes than the frame holds)
//!   or go anywhere else, but never to another real connection;
//! - random bytes touch no real connection.
//!
//! A frame seen at an interface that does not own the connection must change nothing. At the
//! end, the outcome counters add up to the number of runs, the packets in the table (real and
//! fuzz connections) to the `counted` outcome, the connections created to those found.
//!
//! The seed is printed; `TRACER_FUZZ_SEED=N` replays a run.
mod common;

use std::{net::SocketAddr, time::Instant};

use common::{Node, Skb, UNTAGGED_IPV4_MIN, UNTAGGED_IPV6_MIN, addr, key, on_fresh_node};
use tracer_common::{
    DIR_HI_TO_LO, DIR_LO_TO_HI, DatapathCounter, FlowKey, FlowStats, Hook, PROTO_ICMP, PROTO_TCP,
    PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    test_support::craft::{ETH_P_8021AD, ETH_P_8021Q, ExtHeader, Fragment, Frame, Icmp},
};

const RUNS: usize = 120_000;
const SEED_VARIABLE: &str = "TRACER_FUZZ_SEED";
const DEFAULT_SEED: u64 = 0x7261_6365_7221;
/// Fuzz connections are removed this often, so that the table never fills: an LRU eviction of
/// a real connection would look like a miscount.
const FORGET_EVERY: usize = 4096;
/// Failures reported in detail; the run goes on to count the rest.
const REPORTED: usize = 8;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HEADER: usize = 40;
/// IPv6 extension headers the datapath walks, and the most it walks (its documented limit).
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTH: u8 = 51;
const DEST_OPTS: u8 = 60;
const WALKED_EXT_HEADERS: usize = 6;

/// SplitMix64: tiny, fast and the same on every machine, so a seed replays a run exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, chance: usize) -> bool {
        self.below(100) < chance
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// A connection in the table before the fuzzing starts: endpoints in canonical order.
struct Real {
    name: &'static str,
    proto: u8,
    lo: SocketAddr,
    hi: SocketAddr,
}

impl Real {
    fn key(&self) -> FlowKey {
        key(self.proto, self.lo, self.hi)
    }

    /// A packet from `from` to the other end, and its direction in the connection.
    fn ends(&self, from_hi: bool) -> (SocketAddr, SocketAddr, usize) {
        if from_hi {
            (self.hi, self.lo, DIR_HI_TO_LO)
        } else {
            (self.lo, self.hi, DIR_LO_TO_HI)
        }
    }
}

/// The connections the frames are made from (IPv4 TCP, IPv6 UDP) and decoys that share their
/// addresses or ports, differing in at least three bytes from them so that a few flipped bytes
/// cannot honestly turn one into another.
const A: usize = 0;
const C: usize = 4;
fn real_connections() -> [Real; 6] {
    let real = |name, proto, lo: &str, hi: &str| Real {
        name,
        proto,
        lo: addr(lo),
        hi: addr(hi),
    };
    [
        real("A", PROTO_TCP, "10.0.0.1:40000", "10.0.0.2:80"),
        real("B", PROTO_TCP, "10.0.0.1:31339", "10.0.0.2:15965"),
        real("E", PROTO_TCP, "10.0.0.2:80", "10.7.9.1:40000"),
        real("F", PROTO_ICMP, "10.0.0.1:31339", "10.0.0.2:31339"),
        real("C", PROTO_UDP, "[fd00::1]:5353", "[fd00::2]:53"),
        real("D", PROTO_UDP, "[fd00::1]:31339", "[fd00::2]:15965"),
    ]
}

/// The frame that creates a real connection (sent from its low end).
fn opening_frame(real: &Real) -> Vec<u8> {
    let frame = match real.proto {
        PROTO_TCP => Frame::tcp(real.lo, real.hi, TCP_SYN),
        PROTO_UDP => Frame::udp(real.lo, real.hi),
        _ => Frame::icmp(
            real.lo.ip(),
            real.hi.ip(),
            Icmp::EchoRequest {
                id: real.lo.port(),
                seq: 1,
            },
        ),
    };
    frame.payload(8).build().bytes
}

/// What a frame may do to the real connection it was made from.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Count to it exactly: one packet in `dir`, `bytes` L3 bytes.
    Exact { dir: usize, bytes: u64 },
    /// Count to it at most one packet of at most `bytes`, or not at all.
    AtMost { bytes: u64 },
}

struct Fuzzed {
    kind: &'static str,
    frame: Vec<u8>,
    /// The real connection the frame was made from, if any.
    origin: Option<(usize, Expect)>,
}

/// What fills the variable parts of a frame (options, extension headers, payload).
#[derive(Clone, Copy, PartialEq)]
enum Filling {
    /// The other real connections' headers, at every alignment: a parser that loses its place
    /// reads them and misattributes the packet.
    Decoys,
    Random,
}

struct Generator {
    rng: Rng,
    reals: [Real; 6],
    decoys: Vec<u8>,
}

impl Generator {
    fn new(seed: u64) -> Self {
        let reals = real_connections();
        let decoys = reals
            .iter()
            .filter(|real| !matches!(real.name, "A" | "C"))
            .flat_map(|real| {
                let frame = opening_frame(real);
                let start = ETH_HLEN;
                frame[start..].to_vec()
            })
            .collect();
        Self {
            rng: Rng(seed),
            reals,
            decoys,
        }
    }

    fn next(&mut self) -> Fuzzed {
        let mut fuzzed = match self.rng.below(100) {
            0..25 => self.well_formed(),
            25..37 => self.truncated(),
            37..49 => self.bogus_lengths(),
            49..61 => self.flipped(),
            61..70 => self.vlan_storm(),
            70..90 => self.ipv6_chain(),
            _ => self.random_bytes(),
        };
        self.make_runnable(&mut fuzzed.frame);
        fuzzed
    }

    /// A legitimate packet of A or C with everything variable randomised and `filling` in it.
    fn variant(&mut self, filling: Filling, tags: usize) -> (usize, Vec<u8>, usize, usize) {
        let origin = if self.rng.percent(50) { A } else { C };
        let (src, dst, dir) = self.reals[origin].ends(self.rng.percent(50));
        let mut frame = if origin == A {
            let flags = self.rng.pick(&[
                TCP_SYN,
                TCP_SYN | TCP_ACK,
                TCP_ACK,
                TCP_FIN | TCP_ACK,
                TCP_RST | TCP_ACK,
            ]);
            Frame::tcp(src, dst, flags)
                .ipv4_options(&vec![0; 4 * self.rng.below(11)])
                .tcp_options(&vec![0; 4 * self.rng.below(11)])
        } else {
            let mut frame = Frame::udp(src, dst);
            for _ in 0..self.rng.below(4) {
                let len = self.rng.below(4) as u8;
                frame = frame.ext_header(match self.rng.below(3) {
                    0 => ExtHeader::HopByHop(len),
                    1 => ExtHeader::Routing(len),
                    _ => ExtHeader::DestinationOptions(len),
                });
            }
            if self.rng.percent(30) {
                // Offset 0: a whole datagram or a first fragment, both carry the UDP header.
                frame = frame.fragment(Fragment {
                    id: self.rng.next() as u32,
                    offset: 0,
                    more: self.rng.percent(50),
                });
            }
            frame
        };
        for n in 0..tags {
            let tpid = if n + 1 < tags {
                ETH_P_8021AD
            } else {
                ETH_P_8021Q
            };
            frame = frame.vlan(tpid, self.rng.below(4096) as u16);
        }
        let crafted = frame.payload(self.rng.below(200)).build();
        let mut bytes = crafted.bytes;
        // The variable parts: options after the fixed IPv4 and TCP headers, extension headers
        // after their first two bytes (next header, length), and the payload.
        let mut start = 0;
        let mut regions = Vec::new();
        for &(name, end) in &crafted.boundaries {
            let fixed = match name {
                "IPv4" | "TCP" => Some(20),
                "hop-by-hop" | "routing" | "destination options" => Some(2),
                _ => None,
            };
            if let Some(fixed) = fixed {
                regions.push(start + fixed..end);
            }
            start = end;
        }
        regions.push(start..crafted.l3_offset + crafted.l3_len);
        for region in regions {
            self.fill(&mut bytes[region], filling);
        }
        (origin, bytes, dir, crafted.l3_len)
    }

    fn fill(&mut self, bytes: &mut [u8], filling: Filling) {
        match filling {
            Filling::Decoys => {
                let phase = self.rng.below(self.decoys.len());
                for (n, byte) in bytes.iter_mut().enumerate() {
                    *byte = self.decoys[(phase + n) % self.decoys.len()];
                }
            }
            Filling::Random => bytes.iter_mut().for_each(|byte| *byte = self.rng.byte()),
        }
    }

    fn tags(&mut self) -> usize {
        self.rng.below(3)
    }

    fn well_formed(&mut self) -> Fuzzed {
        let tags = self.tags();
        let (origin, frame, dir, l3_len) = self.variant(Filling::Decoys, tags);
        Fuzzed {
            kind: "well-formed",
            frame,
            origin: Some((
                origin,
                Expect::Exact {
                    dir,
                    bytes: l3_len as u64,
                },
            )),
        }
    }

    /// A damaged variant of A or C: it may count to its connection.
    fn damaged(&mut self, kind: &'static str, frame: Vec<u8>, origin: usize) -> Fuzzed {
        let bytes = frame.len().saturating_sub(ETH_HLEN) as u64;
        Fuzzed {
            kind,
            frame,
            origin: Some((origin, Expect::AtMost { bytes })),
        }
    }

    fn truncated(&mut self) -> Fuzzed {
        let tags = self.tags();
        let (origin, mut frame, _, _) = self.variant(Filling::Random, tags);
        frame.truncate(ETH_HLEN + self.rng.below(frame.len() - ETH_HLEN));
        self.damaged("truncated", frame, origin)
    }

    /// Random values in the length fields: IHL, total length, data offset, UDP length, IPv6
    /// payload length, extension header lengths.
    fn bogus_lengths(&mut self) -> Fuzzed {
        let tags = self.tags();
        let (origin, mut frame, _, _) = self.variant(Filling::Random, tags);
        let l3 = ETH_HLEN + 4 * tags;
        let fields: Vec<(usize, u8)> = if origin == A {
            let l4 = l3 + 4 * usize::from(frame[l3] & 0x0f);
            vec![(l3, 0x0f), (l3 + 2, 0xff), (l3 + 3, 0xff), (l4 + 12, 0xf0)]
        } else {
            // The payload length, and the length byte of a first extension header if any.
            vec![(l3 + 4, 0xff), (l3 + 5, 0xff), (l3 + IPV6_HEADER + 1, 0xff)]
        };
        for _ in 0..1 + self.rng.below(3) {
            let (offset, mask) = self.rng.pick(&fields);
            if let Some(byte) = frame.get_mut(offset) {
                *byte = (*byte & !mask) | (self.rng.byte() & mask);
            }
        }
        self.damaged("bogus lengths", frame, origin)
    }

    fn flipped(&mut self) -> Fuzzed {
        let tags = self.tags();
        let (origin, mut frame, _, _) = self.variant(Filling::Random, tags);
        for _ in 0..1 + self.rng.below(4) {
            let at = self.rng.below(frame.len());
            frame[at] = self.rng.byte();
        }
        self.damaged("flipped bytes", frame, origin)
    }

    /// Up to six tags of well-known and unknown tag protocols: the datapath parses two.
    fn vlan_storm(&mut self) -> Fuzzed {
        let (origin, untagged, _, _) = self.variant(Filling::Random, 0);
        let mut frame = untagged[..12].to_vec();
        for _ in 0..self.rng.below(7) {
            let unknown = self.rng.next() as u16;
            let tpid = self.rng.pick(&[ETH_P_8021Q, ETH_P_8021AD, 0x9100, unknown]);
            frame.extend(tpid.to_be_bytes());
            frame.extend((self.rng.below(4096) as u16).to_be_bytes());
        }
        frame.extend(&untagged[12..]);
        self.damaged("nested VLANs", frame, origin)
    }

    /// C's datagram behind a chain of extension headers written here byte by byte: a clean
    /// chain (known headers, at most six, no later fragment) must count to C exactly; any other
    /// (unknown or too many headers, later fragments, lengths past the end) may not.
    fn ipv6_chain(&mut self) -> Fuzzed {
        let clean = self.rng.percent(50);
        let count = if clean {
            self.rng.below(WALKED_EXT_HEADERS + 1)
        } else {
            self.rng.below(10)
        };
        let kinds: Vec<u8> = (0..count)
            .map(|_| {
                if clean || self.rng.percent(80) {
                    self.rng
                        .pick(&[HOP_BY_HOP, ROUTING, FRAGMENT, AUTH, DEST_OPTS])
                } else {
                    self.rng.byte()
                }
            })
            .collect();
        let filling = if clean {
            Filling::Decoys
        } else {
            Filling::Random
        };
        let mut chain = Vec::new();
        for (n, &kind) in kinds.iter().enumerate() {
            let next = kinds.get(n + 1).copied().unwrap_or(PROTO_UDP);
            let units = self.rng.below(4);
            let mut header = match kind {
                AUTH => vec![0; (units + 2) * 4],
                FRAGMENT => {
                    let offset = if clean { 0 } else { self.rng.below(8) as u16 };
                    let field = offset << 3 | self.rng.below(2) as u16;
                    let mut header = vec![0; 8];
                    header[2..4].copy_from_slice(&field.to_be_bytes());
                    header[4..].copy_from_slice(&(self.rng.next() as u32).to_be_bytes());
                    header
                }
                _ => vec![0; (units + 1) * 8],
            };
            if kind != FRAGMENT {
                self.fill(&mut header[2..], filling);
                header[1] = units as u8;
            }
            header[0] = next;
            chain.extend(header);
        }
        let (src, dst, dir) = self.reals[C].ends(self.rng.percent(50));
        let datagram = Frame::udp(src, dst).payload(self.rng.below(100)).build();
        let fixed_end = datagram.l3_offset + IPV6_HEADER;
        let mut frame = datagram.bytes[..fixed_end].to_vec();
        frame.extend(&chain);
        frame.extend(&datagram.bytes[fixed_end..]);
        let payload_len = (datagram.l3_len - IPV6_HEADER + chain.len()) as u16;
        let l3 = datagram.l3_offset;
        frame[l3 + 4..l3 + 6].copy_from_slice(&payload_len.to_be_bytes());
        frame[l3 + 6] = kinds.first().copied().unwrap_or(PROTO_UDP);
        let expect = if clean {
            Expect::Exact {
                dir,
                bytes: (IPV6_HEADER + payload_len as usize) as u64,
            }
        } else {
            Expect::AtMost {
                bytes: (frame.len() - ETH_HLEN) as u64,
            }
        };
        Fuzzed {
            kind: if clean {
                "IPv6 extension chain"
            } else {
                "IPv6 broken chain"
            },
            frame,
            origin: Some((C, expect)),
        }
    }

    /// Random bytes, often behind an IP or VLAN ethertype so that the parser goes deeper.
    fn random_bytes(&mut self) -> Fuzzed {
        let mut frame: Vec<u8> = (0..ETH_HLEN + self.rng.below(300))
            .map(|_| self.rng.byte())
            .collect();
        if self.rng.percent(70) {
            let ethertype = self
                .rng
                .pick(&[ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD]);
            frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
            if let Some(version) = frame.get_mut(ETH_HLEN) {
                *version = if ethertype == ETH_P_IPV6 { 0x60 } else { 0x45 };
            }
        }
        Fuzzed {
            kind: "random bytes",
            frame,
            origin: None,
        }
    }

    /// Pads a frame that BPF_PROG_TEST_RUN would refuse (shorter than the fixed IP header its
    /// ethertype announces) with random bytes.
    fn make_runnable(&mut self, frame: &mut Vec<u8>) {
        let shortest = match u16::from_be_bytes([frame[12], frame[13]]) {
            ETH_P_IP => UNTAGGED_IPV4_MIN,
            ETH_P_IPV6 => UNTAGGED_IPV6_MIN,
            _ => ETH_HLEN,
        };
        while frame.len() < shortest {
            frame.push(self.rng.byte());
        }
    }
}

/// Why a real connection's entry must not look the way it does after a frame.
fn violation(
    before: &FlowStats,
    after: Option<&FlowStats>,
    allowed: Option<Expect>,
) -> Option<String> {
    let Some(after) = after else {
        return Some("the entry vanished".to_owned());
    };
    if after == before {
        return match allowed {
            Some(Expect::Exact { .. }) => Some("not counted".to_owned()),
            _ => None,
        };
    }
    let packets = [0, 1].map(|dir| after.packets[dir].wrapping_sub(before.packets[dir]));
    let bytes = [0, 1].map(|dir| after.bytes[dir].wrapping_sub(before.bytes[dir]));
    let fixed = |stats: &FlowStats| {
        (
            stats.owner_ifindex,
            stats.first_hook,
            stats.first_dir,
            stats.first_tcp_flags,
        )
    };
    let one_packet_in =
        |dir: usize| packets[dir] == 1 && packets[1 - dir] == 0 && bytes[1 - dir] == 0;
    let fits = match allowed {
        None => false,
        Some(Expect::Exact { dir, bytes: len }) => one_packet_in(dir) && bytes[dir] == len,
        Some(Expect::AtMost { bytes: most }) => {
            (one_packet_in(0) && bytes[0] <= most) || (one_packet_in(1) && bytes[1] <= most)
        }
    };
    if fits && fixed(after) == fixed(before) {
        None
    } else {
        Some(format!(
            "packets grew by {packets:?}, bytes by {bytes:?}, (owner, hook, first dir, first flags) {:?} → {:?}; allowed: {allowed:?}",
            fixed(before),
            fixed(after)
        ))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Removes every connection but the real ones; returns how many there were and their packets.
fn forget_fuzz_flows(node: &mut Node, real_keys: &[FlowKey]) -> (u64, u64) {
    let flows = node.datapath.flows().expect("reading the flow table");
    let fuzz: Vec<(FlowKey, FlowStats)> = flows
        .into_iter()
        .filter(|(key, _)| !real_keys.contains(key))
        .collect();
    let keys: Vec<FlowKey> = fuzz.iter().map(|&(key, _)| key).collect();
    node.datapath.forget(&keys).expect("forgetting flows");
    let packets = fuzz
        .iter()
        .map(|(_, stats)| stats.packets[0] + stats.packets[1]);
    (fuzz.len() as u64, packets.sum())
}

#[test]
fn malformed_packets_never_touch_another_real_connection() {
    let seed = std::env::var(SEED_VARIABLE)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    eprintln!("fuzz: {RUNS} frames, seed {seed} (replay with {SEED_VARIABLE}={seed})");
    on_fresh_node(2, move |node| {
        let started = Instant::now();
        let (owner, other) = (node.ifindex[0], node.ifindex[1]);
        let mut generator = Generator::new(seed);
        let keys: Vec<FlowKey> = generator.reals.iter().map(Real::key).collect();
        for real in &generator.reals {
            node.run(Hook::Ingress, Skb::at(owner), &opening_frame(real));
        }
        let mut found: Vec<FlowKey> = node.datapath.flows().unwrap().iter().map(|f| f.0).collect();
        found.sort();
        let mut expected_keys = keys.clone();
        expected_keys.sort();
        assert_eq!(found, expected_keys, "the real connections' keys");
        node.counter_deltas();
        let lookup = |node: &Node| -> Vec<Option<FlowStats>> {
            keys.iter()
                .map(|key| node.datapath.flow(key).expect("looking up a flow"))
                .collect()
        };
        let initial = lookup(node);
        let mut current = initial.clone();

        let mut failures = Vec::new();
        let mut failed = 0;
        let (mut fuzz_flows, mut fuzz_packets) = (0, 0);
        for run in 0..RUNS {
            let fuzzed = generator.next();
            let at_owner = generator.rng.percent(75);
            let hook = generator.rng.pick(&[Hook::Ingress, Hook::Egress]);
            let ifindex = if at_owner { owner } else { other };
            node.run(hook, Skb::at(ifindex), &fuzzed.frame);
            let after = lookup(node);
            for (n, real) in generator.reals.iter().enumerate() {
                let before = current[n].expect("a real connection is in the table");
                let allowed = fuzzed
                    .origin
                    .filter(|&(origin, _)| origin == n && at_owner)
                    .map(|(_, expect)| expect);
                if let Some(why) = violation(&before, after[n].as_ref(), allowed) {
                    failed += 1;
                    if failures.len() < REPORTED {
                        failures.push(format!(
                            "run {run}: {} frame ({} bytes, {hook:?} at {}) and connection {}: {why}\n  {}",
                            fuzzed.kind,
                            fuzzed.frame.len(),
                            if at_owner { "its owner" } else { "another interface" },
                            real.name,
                            hex(&fuzzed.frame)
                        ));
                    }
                }
            }
            current = after;
            if (run + 1) % FORGET_EVERY == 0 {
                let (flows, packets) = forget_fuzz_flows(node, &keys);
                fuzz_flows += flows;
                fuzz_packets += packets;
            }
        }
        let (flows, packets) = forget_fuzz_flows(node, &keys);
        fuzz_flows += flows;
        fuzz_packets += packets;

        let deltas = node.counter_deltas();
        let delta = |counter: DatapathCounter| {
            deltas
                .iter()
                .find(|(name, _)| *name == counter.name())
                .map_or(0, |&(_, value)| value)
        };
        let real_packets: u64 = current
            .iter()
            .zip(&initial)
            .map(|(now, then)| {
                let (now, then) = (now.unwrap(), then.unwrap());
                now.packets[0] + now.packets[1] - then.packets[0] - then.packets[1]
            })
            .sum();
        eprintln!(
            "fuzz: {RUNS} frames in {:.1?}; outcomes {deltas:?}; {fuzz_flows} fuzz connections \
             ({fuzz_packets} packets), {real_packets} packets to the real ones",
            started.elapsed()
        );
        assert!(
            failures.is_empty(),
            "seed {seed}: {failed} violations, the first ones:\n{}",
            failures.join("\n")
        );
        assert_eq!(
            delta(DatapathCounter::Seen),
            RUNS as u64,
            "the outcome counters add up to the runs"
        );
        assert_eq!(
            delta(DatapathCounter::Counted),
            fuzz_packets + real_packets,
            "counted packets are all in the table"
        );
        assert_eq!(
            delta(DatapathCounter::FlowsCreated),
            fuzz_flows,
            "created connections are all in the table"
        );
        assert_eq!(delta(DatapathCounter::InsertFailed), 0);
        for outcome in [
            DatapathCounter::Counted,
            DatapathCounter::Duplicate,
            DatapathCounter::NotIp,
            DatapathCounter::Truncated,
            DatapathCounter::FragmentUnmatched,
        ] {
            assert!(
                delta(outcome) > 0,
                "no frame ended as {}: the generator no longer reaches it",
                outcome.name()
            );
        }
    });
}
