//! A stand-in for the VPC CNI's network-policy agent, for the coexistence tests only (the
//! agent never loads it): a TC classifier that drops IPv4 TCP segments to one port and passes
//! everything else with a final verdict (`TC_ACT_OK`), as a policy agent's programs do.
//!
//! The port is a global the loader sets (`EbpfLoader::override_global("DENIED_TCP_PORT", …)`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;

/// Host byte order; 0 denies nothing.
#[unsafe(no_mangle)]
static DENIED_TCP_PORT: u16 = 0;

#[classifier]
pub(crate) fn policy_standin(ctx: TcContext) -> i32 {
    // SAFETY: a plain read of a global; volatile so that the loader's value is used, not 0.
    let denied = unsafe { core::ptr::read_volatile(&DENIED_TCP_PORT) };
    if tcp_destination_port(&ctx) == Some(denied) {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

fn tcp_destination_port(ctx: &TcContext) -> Option<u16> {
    let ethertype: [u8; 2] = ctx.load(ETH_HLEN - 2).ok()?;
    if u16::from_be_bytes(ethertype) != ETH_P_IP {
        return None;
    }
    let ip: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
    if ip[9] != IPPROTO_TCP {
        return None;
    }
    let ports: [u8; 4] = ctx.load(ETH_HLEN + usize::from(ip[0] & 0x0f) * 4).ok()?;
    Some(u16::from_be_bytes([ports[2], ports[3]]))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
