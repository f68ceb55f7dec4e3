//! The tracer's kernel programs: TC classifiers on pod veths and node ENIs.
//!
//! Per packet they parse the headers, key the connection direction-independently and add the
//! packet to the connection's counters in place. They never drop, modify or redirect a packet:
//! every program returns `TC_NEXT`, handing the packet on to whatever runs after it (the VPC
//! CNI's network-policy agent, Cilium, …). See docs/design.md for the reasoning.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core's Atomic* types offer no read-modify-write
// methods there; the add intrinsic maps straight to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod parse;

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{LruHashMap, PerCpuArray},
    programs::TcContext,
};
use parse::{Packet, ParseError};
use tracer_common::{
    DEFAULT_FLOW_TABLE_SIZE, DatapathCounter, FRAGMENT_TABLE_SIZE, FlowKey, FlowStats, FragmentKey,
    FragmentPorts, Hook, TC_NEXT, TCP_ACK, TCP_SYN,
};

/// One entry per connection, shared by all CPUs: per-CPU values would multiply the memory by
/// the CPU count (docs/design.md, "Counting a packet once per node"). LRU so that a full table
/// evicts instead of failing.
#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowStats> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Ports of fragmented datagrams, learnt from the first fragment, so that later fragments
/// (which carry no L4 header) are added to the right connection.
#[map(name = "FRAGMENTS")]
static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> =
    LruHashMap::with_max_entries(FRAGMENT_TABLE_SIZE, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DatapathCounter::COUNT, 0);

#[classifier]
pub(crate) fn tracer_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, Hook::Ingress);
    TC_NEXT
}

#[classifier]
pub(crate) fn tracer_egress(ctx: TcContext) -> i32 {
    observe(&ctx, Hook::Egress);
    TC_NEXT
}

/// Does nothing but hand the packet on: the baseline the benchmarks subtract.
#[classifier]
pub(crate) fn tracer_baseline(_ctx: TcContext) -> i32 {
    TC_NEXT
}

#[inline(always)]
fn observe(ctx: &TcContext, hook: Hook) {
    match parse::packet(ctx, &FRAGMENTS) {
        Ok(packet) => account(ctx, hook, &packet),
        Err(ParseError::NotIp) => bump(DatapathCounter::NotIp),
        Err(ParseError::Truncated) => bump(DatapathCounter::Truncated),
        Err(ParseError::FragmentUnmatched) => bump(DatapathCounter::FragmentUnmatched),
    }
}

/// What one packet adds to its connection.
struct Sample {
    dir: usize,
    packets: u64,
    bytes: u64,
    tcp_flags: u8,
    /// Clock read only for SYN and SYN-ACK: at most one clock read per packet, none on most.
    now_ns: u64,
}

#[inline(always)]
fn account(ctx: &TcContext, hook: Hook, packet: &Packet) {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (key, dir) = packet.flow_key();
    let sample = Sample {
        dir,
        packets: packet.segments,
        bytes: packet.l3_bytes,
        tcp_flags: packet.tcp_flags,
        now_ns: if packet.tcp_flags & TCP_SYN != 0 {
            // SAFETY: a plain BPF helper with no arguments.
            unsafe { bpf_ktime_get_ns() }
        } else {
            0
        },
    };
    if let Some(stats) = FLOWS.get_ptr_mut(key) {
        add_to_existing(stats, ifindex, &sample);
        return;
    }
    let stats = new_flow(ifindex, hook, &sample);
    match FLOWS.insert(key, stats, BPF_NOEXIST as u64) {
        Ok(()) => {
            bump(DatapathCounter::FlowsCreated);
            bump(DatapathCounter::Counted);
        }
        // Another CPU inserted the same connection between our lookup and insert.
        Err(_) => match FLOWS.get_ptr_mut(key) {
            Some(stats) => add_to_existing(stats, ifindex, &sample),
            None => bump(DatapathCounter::InsertFailed),
        },
    }
}

#[inline(always)]
fn new_flow(ifindex: u32, hook: Hook, sample: &Sample) -> FlowStats {
    let mut stats = FlowStats {
        owner_ifindex: ifindex,
        first_hook: hook as u8,
        first_dir: sample.dir as u8,
        first_tcp_flags: sample.tcp_flags,
        tcp_flags: (sample.tcp_flags as u32) << (8 * sample.dir),
        ..FlowStats::default()
    };
    stats.packets[sample.dir] = sample.packets;
    stats.bytes[sample.dir] = sample.bytes;
    match handshake_slot(sample.tcp_flags) {
        Some(Handshake::Syn) => stats.syn_ns = sample.now_ns,
        Some(Handshake::SynAck) => stats.synack_ns = sample.now_ns,
        None => {}
    }
    stats
}

/// Adds a packet to a connection in place, with atomic adds: no map update per packet.
#[inline(always)]
fn add_to_existing(stats: *mut FlowStats, ifindex: u32, sample: &Sample) {
    // SAFETY: `stats` points into a map value that stays valid for the program run; every
    // field shared between CPUs is only touched through atomics or is set once.
    unsafe {
        if (*stats).owner_ifindex != ifindex {
            // Counted where the connection was first seen: once per node.
            bump(DatapathCounter::Duplicate);
            return;
        }
        atomic_xadd::<u64, u64, { Relaxed }>(&mut (*stats).packets[sample.dir], sample.packets);
        atomic_xadd::<u64, u64, { Relaxed }>(&mut (*stats).bytes[sample.dir], sample.bytes);
        if sample.tcp_flags != 0 {
            let flags = (sample.tcp_flags as u32) << (8 * sample.dir);
            // A plain read-modify-write: new flag bits appear a handful of times per connection,
            // and the generic BPF CPU has no atomic OR. Two CPUs adding different new bits of
            // one connection in the same instant could lose one; that is the accepted cost.
            if (*stats).tcp_flags & flags != flags {
                (*stats).tcp_flags |= flags;
            }
            match handshake_slot(sample.tcp_flags) {
                Some(Handshake::Syn) if (*stats).syn_ns == 0 => (*stats).syn_ns = sample.now_ns,
                Some(Handshake::SynAck) if (*stats).synack_ns == 0 => {
                    (*stats).synack_ns = sample.now_ns;
                }
                _ => {}
            }
        }
    }
    bump(DatapathCounter::Counted);
}

enum Handshake {
    Syn,
    SynAck,
}

#[inline(always)]
fn handshake_slot(tcp_flags: u8) -> Option<Handshake> {
    match tcp_flags & (TCP_SYN | TCP_ACK) {
        TCP_SYN => Some(Handshake::Syn),
        f if f == TCP_SYN | TCP_ACK => Some(Handshake::SynAck),
        _ => None,
    }
}

#[inline(always)]
fn bump(counter: DatapathCounter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *value += 1 }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
