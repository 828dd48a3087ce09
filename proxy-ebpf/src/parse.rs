//! Bounds-checked access to Ethernet / IPv4 / TCP / UDP headers for the TCX programs.
//!
//! The headers are read in place (direct packet access) after the bounds check the
//! verifier demands; headers that are not in the linear part of the packet are pulled in
//! first. The programs write only through the helpers (`csum`), so no packet pointer is
//! kept across a rewrite (which invalidates them) and the verifier adds no unclone step
//! to packets that are only read. Only the packets the north-south datapath can translate
//! are parsed: anything else — not IPv4 over Ethernet, IP options, truncated headers, other
//! protocols — yields `None`, and the programs pass it on untouched. A fragment after the
//! first carries no L4 header: it is parsed without ports (`Fragment::Later`), which
//! `fragments` supplies from the first.

use core::ptr::read_unaligned;

use aya_ebpf::programs::TcContext;
use proxy_common::{PROTO_TCP, PROTO_UDP};

/// Ethernet header length: the programs run on Ethernet devices (no VLAN tag in the frame;
/// hardware-accelerated tags are outside the packet data).
pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offsets of the fields the programs rewrite.
pub const ETH_DST_OFF: usize = 0;
pub const ETH_SRC_OFF: usize = 6;
pub const IP_OFF: usize = ETH_HLEN;
pub const IP_TTL_OFF: usize = IP_OFF + 8;
pub const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SADDR_OFF: usize = IP_OFF + 12;
pub const IP_DADDR_OFF: usize = IP_OFF + 16;
/// The L4 header follows a 20-byte IPv4 header: packets with options are not translated.
pub const L4_OFF: usize = IP_OFF + IPV4_HLEN;
const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_FLAGS_OFF: usize = L4_OFF + 13;
const TCP_CSUM_OFF: usize = L4_OFF + 16;
const UDP_CSUM_OFF: usize = L4_OFF + 6;
/// Version 4, header length 5 words: the only first byte accepted.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// Don't-fragment and more-fragments flags, fragment offset mask (host order).
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The IPv4 header as on the wire (multi-byte fields in network order).
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// Where a packet stands in its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// The first fragment: it carries the L4 header.
    First,
    /// A later fragment: no L4 header, so no ports of its own.
    Later,
}

/// What the programs need from a translatable packet. Addresses and ports in network order.
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    pub ttl: u8,
    /// The IP header checksum as read (network order).
    pub ip_csum: u16,
    /// Offset of the L4 checksum field (in the first fragment only, for a fragmented
    /// datagram).
    pub l4_csum_off: usize,
    /// IP identification, network order: what ties fragments together.
    pub id: u16,
    pub fragment: Fragment,
    /// The sender asked that the packet not be fragmented (path MTU discovery).
    pub dont_fragment: bool,
}

impl Packet {
    pub fn is_udp(&self) -> bool {
        self.proto == PROTO_UDP
    }

    /// The packet carries the L4 header (ports, checksum): not a later fragment.
    pub fn has_l4_header(&self) -> bool {
        self.fragment != Fragment::Later
    }

    /// A TCP SYN without ACK: the first packet of a connection (0 flags for UDP).
    pub fn opens_connection(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// The address of the packet's first byte, once its first `len` bytes are in the linear
/// data, pulled in if need be; `None` when the packet is shorter. Callers read only below
/// `len` from it, before any helper that may move the data.
#[inline(always)]
fn linear(ctx: &TcContext, len: usize) -> Option<usize> {
    if ctx.data() + len > ctx.data_end() {
        ctx.pull_data(len as u32).ok()?;
        if ctx.data() + len > ctx.data_end() {
            return None;
        }
    }
    Some(ctx.data())
}

/// The length of the IPv4 datagram in `ctx` whose header says `tot_len` (network order)
/// and `proto`. A BIG TCP packet (TCP segments merged past 64 KiB, by GRO where the device's
/// `gro_ipv4_max_size` allows, or by a local sender's TSO) says 0: its length is the
/// packet's, as the kernel reads it (`iph_totlen`).
#[inline(always)]
pub fn datagram_len(ctx: &TcContext, tot_len: u16, proto: u8) -> usize {
    let tot_len = usize::from(u16::from_be(tot_len));
    // SAFETY: the context is a valid __sk_buff.
    if tot_len == 0 && proto == PROTO_TCP && unsafe { (*ctx.skb.skb).gso_size } != 0 {
        return (ctx.len() as usize).saturating_sub(IP_OFF);
    }
    tot_len
}

/// Parses an IPv4 TCP or UDP packet without IP options whose headers are all within the
/// packet and within the IP total length; `None` for anything else. A later fragment has
/// ports 0 (see `Fragment::Later`).
#[inline(always)]
pub fn ipv4_l4(ctx: &TcContext) -> Option<Packet> {
    let data = linear(ctx, L4_OFF)?;
    // SAFETY (every read below): within the `linear` bytes just checked.
    let ethertype: u16 = unsafe { read_unaligned((data + 12) as *const u16) };
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    let ip: Ipv4Hdr = unsafe { read_unaligned((data + IP_OFF) as *const Ipv4Hdr) };
    if ip.ver_ihl != IPV4_NO_OPTIONS {
        return None;
    }
    let tot_len = datagram_len(ctx, ip.tot_len, ip.proto);
    // The IP datagram must be in the frame (trailing Ethernet padding is fine).
    if IP_OFF + tot_len > ctx.len() as usize {
        return None;
    }
    let frag_off = u16::from_be(ip.frag_off);
    let fragment = if frag_off & IP_OFFSET != 0 {
        Fragment::Later
    } else if frag_off & IP_MF != 0 {
        Fragment::First
    } else {
        Fragment::Whole
    };
    if fragment == Fragment::Later {
        if tot_len < IPV4_HLEN {
            return None;
        }
        let l4_csum_off = match ip.proto {
            PROTO_TCP => TCP_CSUM_OFF,
            PROTO_UDP => UDP_CSUM_OFF,
            _ => return None,
        };
        return Some(Packet {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: 0,
            dport: 0,
            proto: ip.proto,
            tcp_flags: 0,
            ttl: ip.ttl,
            ip_csum: ip.check,
            l4_csum_off,
            id: ip.id,
            fragment,
            dont_fragment: frag_off & IP_DF != 0,
        });
    }
    // Each protocol with its own constant bound, which the verifier can follow.
    let (ports, tcp_flags, l4_hlen, l4_csum_off) = match ip.proto {
        PROTO_TCP => {
            let data = linear(ctx, TCP_FLAGS_OFF + 1)?;
            let ports: [u16; 2] = unsafe { read_unaligned((data + L4_OFF) as *const [u16; 2]) };
            let flags = unsafe { *((data + TCP_FLAGS_OFF) as *const u8) };
            (ports, flags, TCP_HLEN, TCP_CSUM_OFF)
        }
        PROTO_UDP => {
            let data = linear(ctx, L4_OFF + 4)?;
            let ports: [u16; 2] = unsafe { read_unaligned((data + L4_OFF) as *const [u16; 2]) };
            (ports, 0, UDP_HLEN, UDP_CSUM_OFF)
        }
        _ => return None,
    };
    if tot_len < IPV4_HLEN + l4_hlen {
        return None;
    }
    Some(Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports[0],
        dport: ports[1],
        proto: ip.proto,
        tcp_flags,
        ttl: ip.ttl,
        ip_csum: ip.check,
        l4_csum_off,
        id: ip.id,
        fragment,
        dont_fragment: frag_off & IP_DF != 0,
    })
}
