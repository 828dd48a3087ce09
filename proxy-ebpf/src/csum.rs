//! Header rewrites with incremental checksum updates (RFC 1624), as Cilium's `lib/csum.h`
//! does: store the new bytes, then let `bpf_l3_csum_replace` / `bpf_l4_csum_replace` patch
//! the checksums. The kernel helpers also keep `skb->csum` right for CHECKSUM_COMPLETE
//! packets and only touch the pseudo-header part of a CHECKSUM_PARTIAL (offloaded) one.
//!
//! An address is part of the IP header checksum and of the TCP/UDP pseudo-header; a port
//! only of the L4 checksum. A UDP checksum of 0 means "none" and stays 0
//! (`BPF_F_MARK_MANGLED_0`), and a computed 0 is written as 0xffff, as RFC 768 asks.

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use aya_ebpf::programs::TcContext;

use crate::parse::{IP_CSUM_OFF, IP_TTL_OFF, Packet};

/// Error of a store or checksum helper (the packet may be half rewritten: drop it).
pub struct RewriteError;

impl From<i64> for RewriteError {
    fn from(_: i64) -> Self {
        RewriteError
    }
}

#[inline(always)]
fn l4_flags(pkt: &Packet, size: u64) -> u64 {
    if pkt.is_udp() {
        size | u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        size
    }
}

/// Writes the IPv4 address `new` (network order) at `off`, where `old` was. In a later
/// fragment only the IP header checksum changes: the L4 one is in the first fragment.
#[inline(always)]
pub fn set_addr(
    ctx: &TcContext,
    pkt: &Packet,
    off: usize,
    old: u32,
    new: u32,
) -> Result<(), RewriteError> {
    ctx.store(off, &new, 0)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)?;
    if !pkt.has_l4_header() {
        return Ok(());
    }
    ctx.l4_csum_replace(
        pkt.l4_csum_off,
        u64::from(old),
        u64::from(new),
        l4_flags(pkt, 4) | u64::from(BPF_F_PSEUDO_HDR),
    )?;
    Ok(())
}

/// Writes the port `new` (network order) at `off`, where `old` was.
#[inline(always)]
pub fn set_port(
    ctx: &TcContext,
    pkt: &Packet,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), RewriteError> {
    ctx.store(off, &new, 0)?;
    ctx.l4_csum_replace(
        pkt.l4_csum_off,
        u64::from(old),
        u64::from(new),
        l4_flags(pkt, 2),
    )?;
    Ok(())
}

/// Decrements the TTL (the packet is forwarded without the stack, which would do it).
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext) -> Result<(), RewriteError> {
    // TTL and protocol form one 16-bit word of the header checksum.
    let old: [u8; 2] = ctx.load(IP_TTL_OFF)?;
    let new = [old[0].wrapping_sub(1), old[1]];
    ctx.store(IP_TTL_OFF, &new, 0)?;
    ctx.l3_csum_replace(
        IP_CSUM_OFF,
        u64::from(u16::from_ne_bytes(old)),
        u64::from(u16::from_ne_bytes(new)),
        2,
    )?;
    Ok(())
}
