//! Header rewrites with incremental checksum updates (RFC 1624), as Cilium's `lib/csum.h`
//! does: store the new bytes, then let `bpf_l4_csum_replace` patch the L4 checksum; the IP
//! header checksum is updated here and stored with the addresses. The kernel helper also
//! keeps `skb->csum` right for CHECKSUM_COMPLETE packets and only touches the
//! pseudo-header part of a CHECKSUM_PARTIAL (offloaded) one.
//!
//! An address is part of the IP header checksum and of the TCP/UDP pseudo-header; a port
//! only of the L4 checksum. A UDP checksum of 0 means "none" and stays 0
//! (`BPF_F_MARK_MANGLED_0`), and a computed 0 is written as 0xffff, as RFC 768 asks.

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use aya_ebpf::programs::TcContext;

use crate::parse::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IP_TTL_OFF, L4_OFF, Packet};

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

/// The ones'-complement sum of two partial checksums (end-around carry): the kernel's
/// `csum_add`.
#[inline(always)]
fn csum_add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum + u32::from(carry)
}

/// What changing a checksummed field from `old` to `new` adds to a sum (RFC 1624: ~m + m').
/// 16-bit fields are widened first, as the kernel's `inet_proto_csum_replace2` does.
#[inline(always)]
fn change(old: u32, new: u32) -> u32 {
    csum_add(!old, new)
}

/// The checksum field `sum` after a change of the data it covers by `diff`: the kernel's
/// `csum_replace_by_diff`.
#[inline(always)]
fn replaced(sum: u16, diff: u32) -> u16 {
    let s = csum_add(diff, !u32::from(sum));
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The IP header from its checksum on: the checksum, the addresses and, right after a
/// 20-byte header, the ports. Network order.
#[repr(C, packed)]
struct Tuple {
    ip_csum: u16,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

const _: () = assert!(
    IP_CSUM_OFF + 2 == IP_SADDR_OFF
        && IP_SADDR_OFF + 4 == IP_DADDR_OFF
        && IP_DADDR_OFF + 4 == L4_OFF
        && core::mem::size_of::<Tuple>() == 14
);

/// The same without the ports, for a later fragment.
#[repr(C, packed)]
struct Addresses {
    ip_csum: u16,
    saddr: u32,
    daddr: u32,
}

/// Rewrites the packet's addresses and ports (network order) to the given ones. They sit
/// together after the IP header checksum, so one store writes them all with the new IP
/// checksum, computed here; the L4 checksum gets the address change as a pseudo-header
/// change and the port change as a data change (the kernel only applies the first to an
/// offloaded, `CHECKSUM_PARTIAL`, packet), each in one call. Three helper calls at most,
/// where a store and a checksum call per field took up to ten. A later fragment has no
/// ports and its L4 checksum is in the first: addresses and IP checksum only.
#[inline(always)]
pub fn set_tuple(
    ctx: &TcContext,
    pkt: &Packet,
    (saddr, daddr, sport, dport): (u32, u32, u16, u16),
) -> Result<(), RewriteError> {
    let addrs_changed = saddr != pkt.saddr || daddr != pkt.daddr;
    let ports_changed = pkt.has_l4_header() && (sport != pkt.sport || dport != pkt.dport);
    if !addrs_changed && !ports_changed {
        return Ok(());
    }
    let addr_diff = csum_add(change(pkt.saddr, saddr), change(pkt.daddr, daddr));
    let ip_csum = replaced(pkt.ip_csum, addr_diff);
    if !pkt.has_l4_header() {
        let addrs = Addresses {
            ip_csum,
            saddr,
            daddr,
        };
        ctx.store(IP_CSUM_OFF, &addrs, 0)?;
        return Ok(());
    }
    let tuple = Tuple {
        ip_csum,
        saddr,
        daddr,
        sport,
        dport,
    };
    ctx.store(IP_CSUM_OFF, &tuple, 0)?;
    if addrs_changed {
        ctx.l4_csum_replace(
            pkt.l4_csum_off,
            0,
            u64::from(addr_diff),
            l4_flags(pkt, 0) | u64::from(BPF_F_PSEUDO_HDR),
        )?;
    }
    if ports_changed {
        let port_diff = csum_add(
            change(u32::from(pkt.sport), u32::from(sport)),
            change(u32::from(pkt.dport), u32::from(dport)),
        );
        ctx.l4_csum_replace(pkt.l4_csum_off, 0, u64::from(port_diff), l4_flags(pkt, 0))?;
    }
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
