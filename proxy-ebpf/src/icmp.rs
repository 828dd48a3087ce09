//! ICMP for the north-south programs: the errors they send themselves, and the errors
//! about translated flows they translate.
//!
//! **Refusal** (C06): a frontend without backends on an address this node does not own (an
//! externalIP or LB IP routed here) is answered with ICMP port unreachable from that
//! address, as kube-proxy's `REJECT` answers (for TCP too: the client's connect fails with
//! ECONNREFUSED). The packet itself becomes the answer and goes back out of the device it
//! came in on (Cilium's `tail_no_service_ipv4`); the node's stack cannot answer for an
//! address it does not have.
//!
//! **Too big** (`too_big`), **time exceeded** (`time_exceeded`): a source-NATed packet
//! that does not fit the next hop's MTU, or whose TTL ends here, cannot go to the stack
//! (see `fib`), so the sender is answered with "fragmentation needed" or "time exceeded"
//! the same way, as the router the node is for that flow would answer.
//!
//! **Errors about translated flows** (Cilium's ICMP handling in `lib/nat.h`): a
//! "destination unreachable" (port unreachable, fragmentation needed, ...) or "time
//! exceeded" quotes the header of the packet that caused it, and that packet was
//! translated. The error must reach the flow's other end in that end's terms, or the
//! client never learns its path MTU, nor that the port is closed.
//!
//! An error is about a flow only if it goes to the quoted packet's source (every error does,
//! RFC 792) and quotes a first fragment (a later one has data where the ports would be):
//! others pass untouched, as Linux's conntrack ignores them.
//!
//! The quoted packet travelled opposite to the error, so the quoted 5-tuple, reversed, is the
//! tuple a normal packet of the error's direction carries: its conntrack entry at this hook
//! holds the rewrite. The error gets it inside out: its outer destination becomes the
//! entry's destination (the end that sent the quoted packet, as that end knows itself), its
//! outer source the entry's source if the flow's endpoint sent the error itself (a router
//! on the way keeps its address), and the quoted header the entry's rewrite reversed.
//!
//! Checksums: the outer IPv4 header is patched for its addresses; the quoted IPv4 header
//! for its own, which leaves its one's-complement sum, and so the ICMP checksum, unchanged;
//! the quoted ports are patched into the ICMP checksum. The quoted transport checksum is
//! left as it was: it covers data the error does not carry, and receivers match ICMP errors
//! to sockets by addresses and ports only.

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::__sk_buff;
use aya_ebpf::helpers::generated::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes};
use aya_ebpf::programs::TcContext;
use proxy_common::{CT_FLAG_SNAT, NatCtKey, NatCtValue, PROTO_TCP, PROTO_UDP};

use crate::csum::RewriteError;
use crate::fib::{self, Route};
use crate::maps::NAT_CT;
use crate::parse::{IP_CSUM_OFF, IP_DADDR_OFF, IP_OFF, IP_SADDR_OFF, L4_OFF, Packet, TCP_RST};

pub const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// What an error quotes of the packet it is about: its IPv4 header and 8 bytes (RFC 792).
const QUOTE_LEN: usize = 28;
/// An answer (`answer`): Ethernet, IPv4, ICMP header, the quote; then, past the IPv4
/// datagram, the fill word (`fill_word`).
const ANSWER_LEN: usize = IP_OFF + 20 + ICMP_HLEN + QUOTE_LEN;
const FILL_LEN: usize = 2;
/// Where a TCP and a UDP header keep their checksum: the skb's `csum_offset` when the
/// kernel left the checksum to a device (`CHECKSUM_PARTIAL`).
const TCP_CHECK_OFF: usize = 16;
const UDP_CHECK_OFF: usize = 6;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Time exceeded: the TTL ran out in transit.
const ICMP_EXC_TTL: u8 = 0;
/// ICMP header: type, code, checksum, 4 bytes that depend on the type.
const ICMP_HLEN: usize = 8;
const ICMP_CSUM_OFF: usize = L4_OFF + 2;
/// The quoted IPv4 header (without options: others are not ours) and its first 8 bytes of
/// transport header, which hold the ports.
const INNER_IP_OFF: usize = L4_OFF + ICMP_HLEN;
const INNER_CSUM_OFF: usize = INNER_IP_OFF + 10;
const INNER_SADDR_OFF: usize = INNER_IP_OFF + 12;
const INNER_DADDR_OFF: usize = INNER_IP_OFF + 16;
const INNER_SPORT_OFF: usize = INNER_IP_OFF + 20;
const INNER_DPORT_OFF: usize = INNER_IP_OFF + 22;
const INNER_END: usize = INNER_IP_OFF + 28;
const IPV4_NO_OPTIONS: u8 = 0x45;
const ETH_P_IP: u16 = 0x0800;
/// More-fragments flag and fragment offset (host order).
const IP_MF_OFFSET: u16 = 0x3fff;
/// Fragment offset alone (host order).
const IP_OFFSET: u16 = 0x1fff;

/// An ICMP error about a TCP or UDP packet. Addresses and ports in network order.
struct IcmpError {
    saddr: u32,
    daddr: u32,
    ttl: u8,
    /// The quoted packet's tuple.
    inner_saddr: u32,
    inner_daddr: u32,
    inner_sport: u16,
    inner_dport: u16,
    inner_proto: u8,
}

/// Translates an ICMP error about a flow tracked at hook `dir`; `None` when the packet is
/// no such error (the caller passes it on untouched), else the program's verdict.
#[inline(always)]
pub fn translate_error(ctx: &TcContext, dir: u8, pass: i32, drop: i32) -> Option<i32> {
    let error = parse(ctx)?;
    // The quoted packet reversed: the tuple of a normal packet of this direction.
    let key = NatCtKey {
        saddr: error.inner_daddr,
        daddr: error.inner_saddr,
        sport: error.inner_dport,
        dport: error.inner_sport,
        proto: error.inner_proto,
        dir,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    let entry: NatCtValue = unsafe { *NAT_CT.get_ptr(&key)? };
    if rewrite(ctx, &error, &key, &entry).is_err() {
        return Some(drop);
    }
    if entry.flags & CT_FLAG_SNAT == 0 {
        return Some(pass);
    }
    // Its source may be a node address now: forwarded past the stack, like the flow's own
    // packets (see `fib`).
    let saddr = if error.saddr == key.saddr {
        entry.saddr
    } else {
        error.saddr
    };
    let route = fib::route(ctx, PROTO_ICMP, (saddr, entry.daddr, 0, 0), error.ttl);
    // Its TTL ends here: dropped, as the kernel's forwarding drops it (no ICMP error answers
    // an ICMP error, RFC 1122 3.2.2). One too big goes to the stack, which drops it as a
    // martian if its source is a node address, and otherwise forwards it as the kernel
    // would (fragmented unless it has don't-fragment set, which Linux's errors leave clear).
    if let Route::Expired = route {
        return Some(drop);
    }
    match fib::send(ctx, &route) {
        Ok(verdict) => Some(verdict.unwrap_or(pass)),
        Err(_) => Some(drop),
    }
}

/// An unfragmented IPv4 ICMP destination-unreachable or time-exceeded message without IP
/// options, quoting an IPv4 TCP or UDP header without options, of a packet that was not a
/// later fragment (whose bytes where ports would be are data), and sent to that packet's
/// source, as every error is (RFC 792; Linux's conntrack ignores one sent elsewhere, which
/// only someone who learnt a flow's tuple would send); `None` for anything else.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<IcmpError> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    let outer: [u8; 20] = ctx.load(IP_OFF).ok()?;
    let frag_off = u16::from_be_bytes([outer[6], outer[7]]);
    if outer[0] != IPV4_NO_OPTIONS || outer[9] != PROTO_ICMP || frag_off & IP_MF_OFFSET != 0 {
        return None;
    }
    let tot_len = usize::from(u16::from_be_bytes([outer[2], outer[3]]));
    if IP_OFF + tot_len > ctx.len() as usize || IP_OFF + tot_len < INNER_END {
        return None;
    }
    let icmp_type: u8 = ctx.load(L4_OFF).ok()?;
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner: [u8; 20] = ctx.load(INNER_IP_OFF).ok()?;
    let inner_proto = inner[9];
    let inner_frag_off = u16::from_be_bytes([inner[6], inner[7]]);
    if inner[0] != IPV4_NO_OPTIONS
        || (inner_proto != PROTO_TCP && inner_proto != PROTO_UDP)
        || inner_frag_off & IP_OFFSET != 0
    {
        return None;
    }
    let word = |b: &[u8; 20], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if word(&outer, 16) != word(&inner, 12) {
        return None;
    }
    let ports: [u16; 2] = ctx.load(INNER_SPORT_OFF).ok()?;
    Some(IcmpError {
        saddr: word(&outer, 12),
        daddr: word(&outer, 16),
        ttl: outer[8],
        inner_saddr: word(&inner, 12),
        inner_daddr: word(&inner, 16),
        inner_sport: ports[0],
        inner_dport: ports[1],
        inner_proto,
    })
}

/// Applies `entry` (stored under `key`) to the error inside out.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    error: &IcmpError,
    key: &NatCtKey,
    entry: &NatCtValue,
) -> Result<(), RewriteError> {
    // Outer header: to the end that sent the quoted packet; from the flow's other end if
    // that end is who complained.
    if entry.daddr != error.daddr {
        set_outer_addr(ctx, IP_DADDR_OFF, error.daddr, entry.daddr)?;
    }
    if error.saddr == key.saddr && entry.saddr != error.saddr {
        set_outer_addr(ctx, IP_SADDR_OFF, error.saddr, entry.saddr)?;
    }
    // The quoted packet, as its sender sent it: the entry's rewrite reversed.
    if entry.daddr != error.inner_saddr {
        set_inner_addr(ctx, INNER_SADDR_OFF, error.inner_saddr, entry.daddr)?;
    }
    if entry.saddr != error.inner_daddr {
        set_inner_addr(ctx, INNER_DADDR_OFF, error.inner_daddr, entry.saddr)?;
    }
    if entry.dport != error.inner_sport {
        set_inner_port(ctx, INNER_SPORT_OFF, error.inner_sport, entry.dport)?;
    }
    if entry.sport != error.inner_dport {
        set_inner_port(ctx, INNER_DPORT_OFF, error.inner_dport, entry.sport)?;
    }
    Ok(())
}

#[inline(always)]
fn set_outer_addr(ctx: &TcContext, off: usize, old: u32, new: u32) -> Result<(), RewriteError> {
    ctx.store(off, &new, 0)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)?;
    Ok(())
}

/// A quoted address, with the quoted header's checksum: their sum, and the ICMP checksum
/// over them, stay as they were.
#[inline(always)]
fn set_inner_addr(ctx: &TcContext, off: usize, old: u32, new: u32) -> Result<(), RewriteError> {
    ctx.store(off, &new, 0)?;
    ctx.l3_csum_replace(INNER_CSUM_OFF, u64::from(old), u64::from(new), 4)?;
    Ok(())
}

/// A quoted port, patched into the ICMP checksum (no pseudo-header).
#[inline(always)]
fn set_inner_port(ctx: &TcContext, off: usize, old: u16, new: u16) -> Result<(), RewriteError> {
    ctx.store(off, &new, 0)?;
    ctx.l4_csum_replace(ICMP_CSUM_OFF, u64::from(old), u64::from(new), 2)?;
    Ok(())
}

/// Turns `pkt` into an ICMP port unreachable from its destination to its source and sends
/// it back out of the device it arrived on (see [`answer`]).
#[inline(always)]
pub fn reject(ctx: &TcContext, pkt: &Packet, drop: i32) -> Result<i32, RewriteError> {
    answer(ctx, pkt, (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH), 0, drop)
}

/// Turns `pkt`, too big for the next hop's `mtu`, into an ICMP "fragmentation needed"
/// carrying that MTU (RFC 1191), from the address it was sent to, back to its sender: what
/// a router on its way would answer, so that path MTU discovery works through the
/// translation. `pkt` must not be rewritten yet: its sender matches the quote to its flow.
#[inline(always)]
pub fn too_big(ctx: &TcContext, pkt: &Packet, mtu: u16, drop: i32) -> Result<i32, RewriteError> {
    answer(ctx, pkt, (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED), mtu, drop)
}

/// Turns `pkt`, whose TTL ends at this node on its way to be forwarded, into an ICMP time
/// exceeded from the address it was sent to, back to its sender, as a router's forwarding
/// answers (a traceroute's probe). `pkt` must not be rewritten yet (see [`too_big`]).
#[inline(always)]
pub fn time_exceeded(ctx: &TcContext, pkt: &Packet, drop: i32) -> Result<i32, RewriteError> {
    answer(ctx, pkt, (ICMP_TIME_EXCEEDED, ICMP_EXC_TTL), 0, drop)
}

/// Turns `pkt` into an ICMP error (`kind`: type and code; `mtu` for fragmentation needed,
/// else 0) from its destination to its source, quoting its IPv4 header and 8 bytes, and
/// sends it back out of the device it arrived on. RSTs, fragments after the first (RFC
/// 1122 3.2.2, as the kernel's `icmp_send`) and packets from addresses that cannot be
/// answered (0.0.0.0, broadcast, multicast) are dropped instead.
#[inline(always)]
fn answer(
    ctx: &TcContext,
    pkt: &Packet,
    (icmp_type, code): (u8, u8),
    mtu: u16,
    drop: i32,
) -> Result<i32, RewriteError> {
    let source = u32::from_be(pkt.saddr);
    let unanswerable = source == 0 || source == u32::MAX || source >> 28 == 0xe;
    if unanswerable || pkt.tcp_flags & TCP_RST != 0 || !pkt.has_l4_header() {
        return Ok(drop);
    }
    let mut frame = [0u8; ANSWER_LEN + FILL_LEN];
    // Back to the sender: the Ethernet addresses swapped. Read straight into the frame (as
    // the quote below), not into copies beside it: this runs on the stack of the caller's
    // call chain, 512 bytes in all.
    load_into(ctx, 6, &mut frame[..6])?;
    load_into(ctx, 0, &mut frame[6..12])?;
    frame[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    let ip = IP_OFF;
    frame[ip] = IPV4_NO_OPTIONS;
    // Precedence "internetwork control", as the kernel's own ICMP errors.
    frame[ip + 1] = 0xc0;
    frame[ip + 2..ip + 4].copy_from_slice(&((ANSWER_LEN - IP_OFF) as u16).to_be_bytes());
    frame[ip + 8] = 64;
    frame[ip + 9] = PROTO_ICMP;
    frame[ip + 12..ip + 16].copy_from_slice(&pkt.daddr.to_ne_bytes());
    frame[ip + 16..ip + 20].copy_from_slice(&pkt.saddr.to_ne_bytes());
    let ip_csum = checksum(&frame[ip..ip + 20]);
    frame[ip + 10..ip + 12].copy_from_slice(&ip_csum.to_be_bytes());
    let icmp = L4_OFF;
    frame[icmp] = icmp_type;
    frame[icmp + 1] = code;
    // Unused but for fragmentation needed: the next-hop MTU in the last two of the four.
    frame[icmp + 6..icmp + 8].copy_from_slice(&mtu.to_be_bytes());
    load_into(ctx, IP_OFF, &mut frame[INNER_IP_OFF..ANSWER_LEN])?;
    let icmp_csum = checksum(&frame[icmp..ANSWER_LEN]);
    frame[icmp + 2..icmp + 4].copy_from_slice(&icmp_csum.to_be_bytes());
    let fill = fill_word(&frame, pkt.proto);
    frame[ANSWER_LEN..].copy_from_slice(&fill.to_be_bytes());

    // SAFETY: the context is a valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain helper call on this program's skb.
    let len = (ANSWER_LEN + FILL_LEN) as u32;
    if unsafe { bpf_skb_change_tail(ctx.as_ptr() as *mut __sk_buff, len, 0) } != 0 {
        return Ok(drop);
    }
    ctx.store(0, &frame, 0)?;
    fib::mark_forwarded(ctx);
    // SAFETY: a plain helper call; returns TC_ACT_REDIRECT.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// The word an answer ends with, past its IPv4 datagram (which a receiver trims off), so
/// that a checksum fill cannot spoil it. The packet the answer is made of keeps its
/// checksum state: where it was `CHECKSUM_PARTIAL` (segments merged by GRO, a local
/// sender's packet across a veth or from virtio-net), a device that fills in checksums, or
/// `skb_checksum_help`, sums everything from the old L4 header's start (the ICMP header's
/// now) to the end and writes the result at its old checksum offset: into the quoted
/// header's TTL and protocol (TCP) or the ICMP header's MTU field (UDP). The answer's ICMP
/// message sums to zero, so with the one's complement of the word there as the last word,
/// the result written is that word itself, unchanged (or 0xffff for 0, which
/// `skb_checksum_help` never writes: the same in the checksum's arithmetic, and only in an
/// unused field). No BPF helper can clear the state. A Linux router that trims the word
/// off before a fill defeats it (`docs/decisions.md`, north-south).
#[inline(always)]
fn fill_word(frame: &[u8; ANSWER_LEN + FILL_LEN], proto: u8) -> u16 {
    let at = L4_OFF
        + if proto == PROTO_TCP {
            TCP_CHECK_OFF
        } else {
            UDP_CHECK_OFF
        };
    !u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// Copies `dst.len()` bytes of the packet from `offset` into `dst` (a length the compiler
/// knows, as the verifier needs it).
#[inline(always)]
fn load_into(ctx: &TcContext, offset: usize, dst: &mut [u8]) -> Result<(), RewriteError> {
    // SAFETY: `dst` is writable for its length; a plain helper call on this program's skb.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            offset as u32,
            dst.as_mut_ptr().cast(),
            dst.len() as u32,
        )
    };
    if rc == 0 { Ok(()) } else { Err(RewriteError) }
}

/// The Internet checksum (RFC 1071) of `bytes` (an even length), in host order.
#[inline(always)]
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
