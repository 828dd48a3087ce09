//! Privileged: packet fuzzing of the north-south TCX programs (issue 7 item 4, the packet
//! half). Random frames, mutations of valid ones, and valid flows with their replies go
//! through `BPF_PROG_TEST_RUN` on `ekp_tcx_in` and `ekp_tcx_out`, with maps holding a few
//! frontends of each kind. For every packet an oracle decides from the setup and the
//! conntrack map what the program may have done:
//!
//! - a frame the programs cannot translate (`parse.rs`: not IPv4 over Ethernet, IP options,
//!   not TCP/UDP, headers or IP total length beyond the frame, a later fragment whose first
//!   fragment left no ports in the fragments map) comes out byte-identical with `TCX_NEXT`;
//! - a later fragment with its first fragment's ports: rewritten at L3 only, as the
//!   conntrack entry under its key says (the IPv4 checksum patched exactly, nothing else
//!   changed but MACs and TTL when redirected), or byte-identical with `TCX_NEXT` when there
//!   is no live entry (it never starts a flow). A first fragment is translated as a whole
//!   packet is, and leaves its ports in the fragments map;
//! - a translatable frame neither tracked (no conntrack entry under its key before the run)
//!   nor to a frontend: byte-identical, `TCX_NEXT`, and no conntrack entry created; so is an
//!   untracked TCP segment to a NodePort other than a connection's first (a SYN without
//!   ACK): it may be a reply to a connection masqueraded to the node's address;
//! - to a frontend without backends: byte-identical and dropped (`SVC_FLAG_DROP_EMPTY`),
//!   byte-identical and `TCX_NEXT` (a node address: the kernel refuses it), or, on an
//!   address the node does not own, turned into exactly the ICMP port unreachable that
//!   refuses it and redirected (dropped unchanged when it cannot be answered: a TCP RST, a
//!   source that is no unicast address); no conntrack entry in any case;
//! - tracked, or to a frontend with backends: rewritten exactly as the conntrack entry under
//!   its key says after the run, and that entry agrees with the setup (a backend of the
//!   frontend as destination, the client or the SNAT address and a port of the range as
//!   source; for a reply, the frontend as source). Only addresses, ports and checksums differ
//!   (and MACs and TTL - 1 when redirected). The IPv4 and TCP/UDP checksums are patched
//!   exactly: a valid one stays valid, a wrong one stays wrong by the same amount (nothing
//!   launders corruption), a zero UDP checksum stays zero. A flow to a local backend keeps
//!   the client's port, or takes one of the range when another flow holds its reply tuple;
//! - but a source-NATed packet at ingress that the FIB sends out of the pod network's veth
//!   whose TTL ends here: turned into exactly the ICMP time exceeded that answers it as it
//!   came (with the fill word the programs' answers end with), and redirected, if it can be
//!   answered (not a later fragment, a RST, or from a source that is no unicast address);
//!   else byte-identical and dropped; and one with TTL to spare that is larger than the
//!   veth's MTU: the same with ICMP fragmentation needed (MTU 1500), if it also has
//!   don't-fragment set;
//! - the verdict is `TCX_NEXT`, `TC_ACT_SHOT`, or `TC_ACT_REDIRECT` for a source-NATed
//!   packet at ingress; `BPF_PROG_TEST_RUN` fails only with `EINVAL`, and only for a frame
//!   shorter than its network header (counted as rejected by the kernel).
//!
//! Both programs go through the verifier first (a rejection fails the test). The test runs
//! in a network namespace of its own with a veth towards the "pod network", so part of the
//! source-NATed packets take the FIB lookup and redirect path. Nothing is sent anywhere.
//!
//! The default run is 100000 packets with a random seed (a few seconds). Longer, or again
//! with the seed a run printed:
//!
//! ```text
//! EKP_FUZZ_PACKETS=5000000 EKP_FUZZ_SEED=1234 \
//!     cargo test -p proxy-userspace --test tcx_fuzz -- --nocapture
//! ```
//!
//! The seed reproduces the packet stream. Backend and SNAT port choices are the kernel's
//! (`bpf_get_prandom_u32`), so the replies built from them can differ between runs; a
//! failure prints the seed, the packet index and both frames in hex, which is what a
//! regression case in `tcx_packets.rs` needs.

#[path = "support/prog_test_run.rs"]
#[allow(dead_code)] // this test uses part of the support code
mod prog_test_run;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use prog_test_run::{
    Datapath, Frame, Frontend, Outcome, TC_ACT_REDIRECT, TC_ACT_SHOT, TCP_ACK, TCP_FIN, TCP_SYN,
    TCX_NEXT, answer_to, checksum, forwarding_device, hex, in_private_netns, pseudo_header_sum,
};
use proxy_common::{
    BACKEND_FLAG_LOCAL, CT_DIR_IN, CT_DIR_OUT, CT_FLAG_CLOSING, CT_FLAG_FIN_BACKEND_FIRST,
    CT_FLAG_REPLY, CT_FLAG_SEEN_REPLY, CT_FLAG_SNAT, CT_LIFETIME_CLOSING, CT_LIFETIME_NONTCP,
    CT_LIFETIME_SNAT_CLOSING, CT_LIFETIME_TCP, CT_LIFETIME_TCP_SYN, FragmentKey, NatCtKey,
    NatCtValue, PROTO_TCP, PROTO_UDP, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXTERNAL_IP,
    SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_ADDRESS, SVC_FLAG_NODE_PORT,
};
use proxy_userspace::conntrack_gc;

const DEFAULT_PACKETS: u64 = 100_000;

/// This node's address: NodePorts are served on it and it is the SNAT address.
const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const SNAT_PORT_MIN: u16 = 61000;
const SNAT_PORT_MAX: u16 = 65535;
/// An externalIP no node owns, with a TCP and a UDP frontend.
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// An externalIP no node owns whose Service has no endpoints (dropped, C06).
const EMPTY_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
/// A LoadBalancer ingress IP with sessionAffinity ClientIP.
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// External clients: one with a neighbour entry on the veth (FIB success), two routed
/// without one (redirect through the neighbour subsystem), one without a route.
const CLIENTS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 51, 100, 7),
    Ipv4Addr::new(198, 51, 100, 8),
    Ipv4Addr::new(198, 51, 100, 9),
    Ipv4Addr::new(100, 64, 1, 1),
];

struct Backend {
    id: u32,
    addr: Ipv4Addr,
    port: u16,
    proto: u8,
    local: bool,
}

/// Pods on this node (10.244.1.0/24) and on another (10.244.2.0/24, behind the veth).
const BACKENDS: [Backend; 7] = [
    Backend::new(1, [10, 244, 1, 10], 8080, PROTO_TCP, true),
    Backend::new(2, [10, 244, 1, 11], 8080, PROTO_TCP, true),
    Backend::new(3, [10, 244, 2, 20], 8080, PROTO_TCP, false),
    Backend::new(4, [10, 244, 2, 21], 8080, PROTO_TCP, false),
    Backend::new(5, [10, 244, 1, 10], 5353, PROTO_UDP, true),
    Backend::new(6, [10, 244, 2, 20], 5353, PROTO_UDP, false),
    Backend::new(7, [10, 244, 1, 11], 5353, PROTO_UDP, true),
];

impl Backend {
    const fn new(id: u32, a: [u8; 4], port: u16, proto: u8, local: bool) -> Self {
        Backend {
            id,
            addr: Ipv4Addr::new(a[0], a[1], a[2], a[3]),
            port,
            proto,
            local,
        }
    }

    fn by_id(id: u32) -> Option<&'static Backend> {
        BACKENDS.iter().find(|b| b.id == id)
    }
}

/// The external-scope frontends and their backend ids, as the agent would write them.
fn frontends() -> Vec<(Frontend, Vec<u32>)> {
    let fe = |addr, port, proto, rev_nat_id, flags| Frontend {
        addr,
        port,
        proto,
        rev_nat_id,
        flags,
        affinity_timeout: 0,
        affinity_id: 0,
    };
    vec![
        // NodePorts with a local and a remote backend.
        (
            fe(NODE, 30080, PROTO_TCP, 1, SVC_FLAG_NODE_PORT),
            vec![1, 3],
        ),
        (
            fe(NODE, 30053, PROTO_UDP, 2, SVC_FLAG_NODE_PORT),
            vec![5, 6],
        ),
        // externalIPs: remote backends only (always SNAT), a local one only (never).
        (
            fe(EXTERNAL_IP, 80, PROTO_TCP, 3, SVC_FLAG_EXTERNAL_IP),
            vec![3, 4],
        ),
        (
            fe(EXTERNAL_IP, 53, PROTO_UDP, 4, SVC_FLAG_EXTERNAL_IP),
            vec![7],
        ),
        // `Local` policy without a local endpoint (C12): dropped.
        (
            fe(
                NODE,
                30090,
                PROTO_TCP,
                5,
                SVC_FLAG_NODE_PORT | SVC_FLAG_DROP_EMPTY,
            ),
            vec![],
        ),
        // No endpoints on node addresses (C06): passed on for the kernel to refuse.
        (fe(NODE, 30091, PROTO_UDP, 6, SVC_FLAG_NODE_PORT), vec![]),
        (
            fe(
                NODE,
                8081,
                PROTO_TCP,
                9,
                SVC_FLAG_EXTERNAL_IP | SVC_FLAG_NODE_ADDRESS,
            ),
            vec![],
        ),
        // No endpoints on an address the node does not own: dropped.
        (
            fe(EMPTY_EXTERNAL_IP, 443, PROTO_TCP, 7, SVC_FLAG_EXTERNAL_IP),
            vec![],
        ),
        // sessionAffinity ClientIP over two local backends and a remote one.
        (
            Frontend {
                affinity_timeout: 10800,
                ..fe(
                    LB_IP,
                    8443,
                    PROTO_TCP,
                    8,
                    SVC_FLAG_LOAD_BALANCER | SVC_FLAG_AFFINITY,
                )
            },
            vec![1, 2, 3],
        ),
    ]
}

/// Whether a TCP frame (IPv4 without options, as translatable ones are) is a connection's
/// first segment: SYN without ACK.
fn opens_connection(frame: &[u8]) -> bool {
    frame
        .get(14 + 20 + 13)
        .is_some_and(|f| f & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

/// What a frontend without backends does with a packet (docs/decisions.md, C06/C12).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `SVC_FLAG_DROP_EMPTY`.
    Drop,
    /// On one of this node's addresses: the kernel refuses it.
    Pass,
    /// Elsewhere: the program answers with ICMP port unreachable.
    Answer,
}

fn refusal(fe: &Frontend) -> Refusal {
    if fe.flags & SVC_FLAG_DROP_EMPTY != 0 {
        Refusal::Drop
    } else if fe.flags & SVC_FLAG_NODE_PORT != 0 || fe.addr == NODE {
        Refusal::Pass
    } else {
        Refusal::Answer
    }
}

/// Whether the program may answer `input` (from `tuple`'s source) with an ICMP error: not a
/// TCP RST, and from a unicast address.
fn answerable(input: &[u8], tuple: &Tuple) -> bool {
    let source = u32::from(tuple.saddr);
    let rst = tuple.proto == PROTO_TCP && input[L4_OFF + 13] & 0x04 != 0;
    !(rst || source == 0 || source == u32::MAX || source >> 28 == 0xe)
}

/// xorshift64*: tiny, seedable, good enough to pick bytes and mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that small seeds start from a well-mixed state.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn u8(&mut self) -> u8 {
        self.next() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }

    /// An address the setup knows (frontends, backends, clients) or a random one.
    fn addr(&mut self) -> Ipv4Addr {
        match self.below(6) {
            0 => NODE,
            1 => *self.pick(&[EXTERNAL_IP, EMPTY_EXTERNAL_IP, LB_IP]),
            2 => self.pick(&BACKENDS).addr,
            3 => *self.pick(&CLIENTS),
            4 => Ipv4Addr::from(self.next() as u32),
            _ => Ipv4Addr::new(10, 244, self.u8() % 4, self.u8()),
        }
    }

    /// A port of a frontend, a backend, a client, the SNAT range, an edge, or random.
    fn port(&mut self) -> u16 {
        match self.below(7) {
            0 => *self.pick(&[30080, 30053, 80, 53, 30090, 30091, 8081, 443, 8443]),
            1 => *self.pick(&[8080, 5353]),
            2 => 40000 + self.below(1024) as u16,
            3 => SNAT_PORT_MIN + self.below(usize::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1) as u16,
            4 => *self.pick(&[0, 1, 65535]),
            _ => self.u16(),
        }
    }
}

fn be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

/// Writes `bytes` at `off`, as far as the frame reaches.
fn put(f: &mut [u8], off: usize, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        if let Some(slot) = f.get_mut(off + i) {
            *slot = *b;
        }
    }
}

const ETH_HLEN: usize = 14;
const IP_OFF: usize = ETH_HLEN;
const L4_OFF: usize = IP_OFF + 20;
const TCP_PSH: u8 = 0x08;
const TCP_RST: u8 = 0x04;

/// The tuple of a frame the programs translate when it is ours, or `None` when they must
/// leave it alone: exactly what `proxy-ebpf/src/parse.rs` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tuple {
    saddr: Ipv4Addr,
    sport: u16,
    daddr: Ipv4Addr,
    dport: u16,
    proto: u8,
}

/// Where a frame stands in its datagram (`parse.rs`'s `Fragment`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Whole,
    First,
    Later,
}

/// `translatable`'s tuple for a frame, and its part of the datagram. A later fragment takes
/// its ports from `ports` (the fragments map), and is not translatable without them.
fn translatable(
    f: &[u8],
    ports: impl FnOnce(FragmentKey) -> Option<(u16, u16)>,
) -> Option<(Tuple, Part)> {
    if f.len() < L4_OFF || be16(f, 12) != 0x0800 || f[IP_OFF] != 0x45 {
        return None;
    }
    let tot_len = usize::from(be16(f, IP_OFF + 2));
    if IP_OFF + tot_len > f.len() {
        return None;
    }
    let proto = f[IP_OFF + 9];
    let l4_hlen = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return None,
    };
    let frag_off = be16(f, IP_OFF + 6);
    if frag_off & 0x1fff != 0 {
        if tot_len < 20 {
            return None;
        }
        let (sport, dport) = ports(fragment_key(f))?;
        // (It may end with its IPv4 header: no bytes where a first fragment has ports.)
        let addr = |off: usize| Ipv4Addr::new(f[off], f[off + 1], f[off + 2], f[off + 3]);
        let tuple = Tuple {
            saddr: addr(IP_OFF + 12),
            daddr: addr(IP_OFF + 16),
            sport,
            dport,
            proto,
        };
        return Some((tuple, Part::Later));
    }
    if tot_len < 20 + l4_hlen {
        return None;
    }
    let part = if frag_off & 0x2000 != 0 {
        Part::First
    } else {
        Part::Whole
    };
    Some((tuple_at(f), part))
}

/// What the fragments of the frame's datagram share (the fragments map's key).
fn fragment_key(f: &[u8]) -> FragmentKey {
    let word = |off: usize| u32::from_ne_bytes([f[off], f[off + 1], f[off + 2], f[off + 3]]);
    FragmentKey {
        saddr: word(IP_OFF + 12),
        daddr: word(IP_OFF + 16),
        id: u16::from_ne_bytes([f[IP_OFF + 4], f[IP_OFF + 5]]),
        proto: f[IP_OFF + 9],
        _pad: 0,
    }
}

/// The tuple in the fixed positions of an option-less IPv4 frame.
fn tuple_at(f: &[u8]) -> Tuple {
    let addr = |off: usize| Ipv4Addr::new(f[off], f[off + 1], f[off + 2], f[off + 3]);
    Tuple {
        saddr: addr(IP_OFF + 12),
        daddr: addr(IP_OFF + 16),
        sport: be16(f, L4_OFF),
        dport: be16(f, L4_OFF + 2),
        proto: f[IP_OFF + 9],
    }
}

impl Tuple {
    fn ct_key(&self, dir: u8) -> NatCtKey {
        NatCtKey {
            saddr: u32::from_ne_bytes(self.saddr.octets()),
            daddr: u32::from_ne_bytes(self.daddr.octets()),
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: self.proto,
            dir,
            _pad: [0; 2],
        }
    }

    fn of_key(key: &NatCtKey) -> Self {
        Tuple {
            saddr: Ipv4Addr::from(key.saddr.to_ne_bytes()),
            daddr: Ipv4Addr::from(key.daddr.to_ne_bytes()),
            sport: u16::from_be(key.sport),
            dport: u16::from_be(key.dport),
            proto: key.proto,
        }
    }

    /// The tuple a packet has after `entry`'s rewrite.
    fn rewritten(&self, entry: &NatCtValue) -> Self {
        Tuple {
            saddr: Ipv4Addr::from(entry.saddr.to_ne_bytes()),
            daddr: Ipv4Addr::from(entry.daddr.to_ne_bytes()),
            sport: u16::from_be(entry.sport),
            dport: u16::from_be(entry.dport),
            proto: self.proto,
        }
    }
}

/// A conntrack entry as a reader wants it: the rewrite and where it comes from.
fn describe(entry: Option<&NatCtValue>) -> String {
    let Some(e) = entry else {
        return "none".to_string();
    };
    let addr = |a: u32| Ipv4Addr::from(a.to_ne_bytes());
    format!(
        "rewrite to {}:{} -> {}:{}, backend {}, rev-NAT {}, flags {:#x}, last seen {}",
        addr(e.saddr),
        u16::from_be(e.sport),
        addr(e.daddr),
        u16::from_be(e.dport),
        e.backend_id,
        e.rev_nat_id,
        e.flags,
        e.last_seen
    )
}

/// Whether BPF_PROG_TEST_RUN may refuse the frame: shorter than Ethernet, or than the
/// fixed header of the network protocol its ethertype names.
fn shorter_than_network_header(f: &[u8]) -> bool {
    f.len() < ETH_HLEN
        || match be16(f, 12) {
            0x0800 => f.len() < ETH_HLEN + 20,
            0x86dd => f.len() < ETH_HLEN + 40,
            _ => false,
        }
}

/// RFC 1071 residue of the IPv4 header of an option-less frame: 0 when the checksum is
/// right, and unchanged by a correct incremental update when it is not.
fn ip_residue(f: &[u8]) -> u16 {
    checksum(0, &f[IP_OFF..L4_OFF])
}

/// The same for the TCP/UDP checksum over the IP payload, pseudo-header included; `None`
/// for a UDP packet without checksum (0).
fn l4_residue(f: &[u8]) -> Option<u16> {
    let proto = f[IP_OFF + 9];
    let csum_off = l4_csum_off(proto);
    if proto == PROTO_UDP && be16(f, csum_off) == 0 {
        return None;
    }
    let tot_len = usize::from(be16(f, IP_OFF + 2));
    let l4 = &f[L4_OFF..IP_OFF + tot_len];
    let addr = |off: usize| [f[off], f[off + 1], f[off + 2], f[off + 3]];
    let sum = pseudo_header_sum(addr(IP_OFF + 12), addr(IP_OFF + 16), proto, l4.len());
    Some(checksum(sum, l4))
}

fn l4_csum_off(proto: u8) -> usize {
    L4_OFF + if proto == PROTO_TCP { 16 } else { 6 }
}

/// TCP data offset or UDP length that a receiver would reject; the programs do not look at
/// them (they rewrite only the fixed header fields, all within the IP total length).
fn malformed_l4(f: &[u8]) -> bool {
    let l4_len = usize::from(be16(f, IP_OFF + 2)) - 20;
    if f[IP_OFF + 9] == PROTO_TCP {
        let doff = usize::from(f[L4_OFF + 12] >> 4) * 4;
        doff < 20 || doff > l4_len
    } else {
        usize::from(be16(f, L4_OFF + 4)) != l4_len
    }
}

/// Recomputes what checksums the frame's headers allow: the IPv4 header checksum when the
/// header is within the frame, the TCP/UDP one when the IP total length is too (a zero UDP
/// checksum stays zero).
fn fix_checksums(f: &mut [u8]) {
    if f.len() < L4_OFF || be16(f, 12) != 0x0800 {
        return;
    }
    let ihl = usize::from(f[IP_OFF] & 0x0f) * 4;
    if ihl < 20 || IP_OFF + ihl > f.len() {
        return;
    }
    put(f, IP_OFF + 10, &[0, 0]);
    let csum = checksum(0, &f[IP_OFF..IP_OFF + ihl]);
    put(f, IP_OFF + 10, &csum.to_be_bytes());
    let tot_len = usize::from(be16(f, IP_OFF + 2));
    let proto = f[IP_OFF + 9];
    let hlen = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return,
    };
    if tot_len < ihl + hlen || IP_OFF + tot_len > f.len() {
        return;
    }
    let l4 = IP_OFF + ihl;
    let off = l4 + if proto == PROTO_TCP { 16 } else { 6 };
    if proto == PROTO_UDP && be16(f, off) == 0 {
        return;
    }
    put(f, off, &[0, 0]);
    let addr = |off: usize| [f[off], f[off + 1], f[off + 2], f[off + 3]];
    let sum = pseudo_header_sum(addr(IP_OFF + 12), addr(IP_OFF + 16), proto, tot_len - ihl);
    let mut csum = checksum(sum, &f[l4..IP_OFF + tot_len]);
    if csum == 0 && proto == PROTO_UDP {
        csum = 0xffff;
    }
    put(f, off, &csum.to_be_bytes());
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Hook {
    In,
    Out,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::In => "ekp_tcx_in",
            Hook::Out => "ekp_tcx_out",
        }
    }

    fn dir(self) -> u8 {
        match self {
            Hook::In => CT_DIR_IN,
            Hook::Out => CT_DIR_OUT,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Class {
    Random,
    Mutated,
    Valid,
}

/// What happened to a packet, as the oracle classified it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Seen {
    RejectedByKernel,
    NotTranslatable,
    NotOurs,
    NotFirstSegment,
    RefusedDropped,
    RefusedPassed,
    RefusedAnswered,
    NewFlow,
    TrackedFlow,
    FragmentFollowed,
    FragmentWithoutFlow,
    TooBigAnswered,
    TooBigDropped,
    ExpiredAnswered,
    ExpiredDropped,
    PartnerTaken,
}

impl Seen {
    fn describe(self) -> &'static str {
        match self {
            Seen::RejectedByKernel => "rejected by BPF_PROG_TEST_RUN (too short)",
            Seen::NotTranslatable => "not translatable: unchanged",
            Seen::NotOurs => "no frontend, no flow: unchanged",
            Seen::NotFirstSegment => {
                "to a NodePort or node address, no flow, not a first segment: unchanged"
            }
            Seen::RefusedDropped => "frontend without backends: dropped",
            Seen::RefusedPassed => "frontend without backends: passed on",
            Seen::RefusedAnswered => "frontend without backends: answered with ICMP",
            Seen::NewFlow => "new flow: translated",
            Seen::TrackedFlow => "tracked flow: translated",
            Seen::FragmentFollowed => "later fragment: translated as its first",
            Seen::FragmentWithoutFlow => "later fragment, no live flow: unchanged",
            Seen::TooBigAnswered => "source-NATed, too big for the next hop: answered with ICMP",
            Seen::TooBigDropped => "source-NATed, too big for the next hop: dropped",
            Seen::ExpiredAnswered => "source-NATed, TTL ends here: answered with ICMP",
            Seen::ExpiredDropped => "source-NATed, TTL ends here: dropped",
            Seen::PartnerTaken => {
                "tracked, but another flow holds its partner's key: unchanged, flow ended"
            }
        }
    }
}

#[derive(Default)]
struct Stats {
    outcomes: BTreeMap<(Class, Hook, Seen), u64>,
    redirected: u64,
    translated_bad_checksum: u64,
    translated_malformed_l4: u64,
    translated_zero_udp_checksum: u64,
    replies_to_client: u64,
    replies_elsewhere: u64,
}

impl Stats {
    fn count(&self, seen: Seen) -> u64 {
        self.outcomes
            .iter()
            .filter(|((_, _, s), _)| *s == seen)
            .map(|(_, n)| n)
            .sum()
    }
}

struct Fuzzer {
    dp: Datapath,
    rng: Rng,
    seed: u64,
    /// ifindex of the veth towards the pod network (FIB lookups succeed from there).
    veth: u32,
    frontends: Vec<(Frontend, Vec<u32>)>,
    /// Packets to mutate: valid ones sent so far and their replies, with their hook.
    corpus: Vec<(Vec<u8>, Hook)>,
    packets: u64,
    stats: Stats,
}

/// A violation of the oracle, with what the program gave back when it ran.
struct Violation {
    why: String,
    output: Option<Outcome>,
}

impl From<String> for Violation {
    fn from(why: String) -> Self {
        Violation { why, output: None }
    }
}

impl Fuzzer {
    fn ct(&self, key: &NatCtKey) -> Option<NatCtValue> {
        self.dp.nat_ct.get(key, 0).ok()
    }

    /// Whether another flow holds the key of the partner of `entry` (stored under `key`):
    /// the programs then end the flow instead of translating into the other one (when they
    /// look at the partner, at most once a second: `nat::touch`).
    fn partner_taken(&self, key: &NatCtKey, entry: &NatCtValue) -> bool {
        let dir = if entry.flags & (CT_FLAG_REPLY | CT_FLAG_SNAT) != 0 {
            CT_DIR_IN
        } else {
            CT_DIR_OUT
        };
        let partner = NatCtKey {
            saddr: entry.daddr,
            daddr: entry.saddr,
            sport: entry.dport,
            dport: entry.sport,
            proto: key.proto,
            dir,
            _pad: [0; 2],
        };
        self.ct(&partner).is_some_and(|p| {
            (p.saddr, p.daddr, p.sport, p.dport) != (key.daddr, key.saddr, key.dport, key.sport)
        })
    }

    fn frontend(&self, daddr: Ipv4Addr, dport: u16, proto: u8) -> Option<&(Frontend, Vec<u32>)> {
        self.frontends
            .iter()
            .find(|(f, _)| f.addr == daddr && f.port == dport && f.proto == proto)
    }

    /// Runs one packet through `hook` and checks it; panics with everything needed to
    /// reproduce on a violation. `None` when the kernel refused to run it.
    fn send(&mut self, class: Class, hook: Hook, ifindex: u32, input: &[u8]) -> Option<Outcome> {
        let index = self.packets;
        self.packets += 1;
        let fragments = &self.dp.fragments;
        let parsed = translatable(input, |key| {
            let ports = fragments.get(&key, 0).ok()?;
            Some((u16::from_be(ports.sport), u16::from_be(ports.dport)))
        });
        let tuple = parsed.map(|(t, _)| t);
        let before = tuple.and_then(|t| self.ct(&t.ct_key(hook.dir())));
        let partner_taken = tuple
            .zip(before)
            .is_some_and(|(t, e)| self.partner_taken(&t.ct_key(hook.dir()), &e));
        match self.check(hook, ifindex, input, parsed, before, partner_taken) {
            Ok((seen, outcome)) => {
                *self.stats.outcomes.entry((class, hook, seen)).or_default() += 1;
                outcome
            }
            Err(Violation { why, output }) => {
                let after = tuple.and_then(|t| self.ct(&t.ct_key(hook.dir())));
                let output = match output {
                    Some(o) => format!(
                        "output (verdict {}, {} bytes):\n{}",
                        o.verdict,
                        o.packet.len(),
                        hex(&o.packet)
                    ),
                    None => "no output".to_string(),
                };
                panic!(
                    "tcx_fuzz: packet {index} ({class:?}, {program} on ifindex {ifindex}, seed \
                     {seed}): {why}\nreproduce: EKP_FUZZ_SEED={seed} EKP_FUZZ_PACKETS={n} \
                     cargo test -p proxy-userspace --test tcx_fuzz\ninput ({len} bytes, \
                     tuple {tuple:?}):\n{input}\n{output}\nconntrack entry under its key \
                     before the run: {before}\nafter: {after}",
                    program = hook.program(),
                    seed = self.seed,
                    n = index + 1,
                    len = input.len(),
                    input = hex(input),
                    before = describe(before.as_ref()),
                    after = describe(after.as_ref()),
                );
            }
        }
    }

    fn check(
        &mut self,
        hook: Hook,
        ifindex: u32,
        input: &[u8],
        parsed: Option<(Tuple, Part)>,
        before: Option<NatCtValue>,
        partner_taken: bool,
    ) -> Result<(Seen, Option<Outcome>), Violation> {
        let out = match self.dp.try_run(hook.program(), input, ifindex) {
            Ok(out) => out,
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL) && shorter_than_network_header(input) =>
            {
                return Ok((Seen::RejectedByKernel, None));
            }
            Err(e) => return Err(format!("BPF_PROG_TEST_RUN failed: {e}").into()),
        };
        let fail = |why: String, out: &Outcome| Violation {
            why,
            output: Some(Outcome {
                verdict: out.verdict,
                packet: out.packet.clone(),
            }),
        };
        let allowed: &[i32] = match hook {
            Hook::In => &[TCX_NEXT, TC_ACT_SHOT, TC_ACT_REDIRECT],
            Hook::Out => &[TCX_NEXT, TC_ACT_SHOT],
        };
        if !allowed.contains(&out.verdict) {
            return Err(fail(
                format!("verdict {} is not allowed", out.verdict),
                &out,
            ));
        }
        let unchanged = |verdict: i32, what: &str| -> Result<(), Violation> {
            if out.verdict != verdict {
                return Err(fail(
                    format!("{what}: verdict {} where {verdict} was due", out.verdict),
                    &out,
                ));
            }
            if out.packet != input {
                return Err(fail(format!("{what}: the packet changed"), &out));
            }
            Ok(())
        };
        let Some((tuple, part)) = parsed else {
            unchanged(TCX_NEXT, "not a translatable packet")?;
            return Ok((Seen::NotTranslatable, Some(out)));
        };
        let key = tuple.ct_key(hook.dir());
        // Its flow ended for the flow that holds its partner's key: passed on untouched.
        if partner_taken && self.ct(&key).is_none() {
            unchanged(TCX_NEXT, "a flow whose partner's key another flow holds")?;
            return Ok((Seen::PartnerTaken, Some(out)));
        }
        if part == Part::Later {
            let follows = before.map_or(Some(false), |e| follows(hook, &tuple, &e));
            let followed = match follows {
                Some(false) => false,
                Some(true) => true,
                // At the boundary of its lifetime: either is right.
                None => out.packet != input,
            };
            if !followed {
                unchanged(TCX_NEXT, "a later fragment without a live flow")?;
                if before.is_none() && self.ct(&key).is_some() {
                    return Err(fail("a later fragment started a flow".into(), &out));
                }
                return Ok((Seen::FragmentWithoutFlow, Some(out)));
            }
            let entry = before.expect("followed: an entry");
            if expires(hook, input, &entry) {
                let seen =
                    check_expired(input, &tuple, false, &out).map_err(|why| fail(why, &out))?;
                return Ok((seen, Some(out)));
            }
            if self.too_big(hook, input, &entry) {
                let seen =
                    check_too_big(input, &tuple, false, &out).map_err(|why| fail(why, &out))?;
                return Ok((seen, Some(out)));
            }
            check_fragment_rewrite(hook, input, &entry, &out).map_err(|why| fail(why, &out))?;
            return Ok((Seen::FragmentFollowed, Some(out)));
        }
        if before.is_none() {
            let frontend = match hook {
                Hook::In => self.frontend(tuple.daddr, tuple.dport, tuple.proto),
                Hook::Out => None,
            };
            let seen = match frontend {
                None => {
                    unchanged(TCX_NEXT, "no frontend and no flow")?;
                    Some(Seen::NotOurs)
                }
                Some((fe, _))
                    if tuple.proto == PROTO_TCP
                        && fe.flags & (SVC_FLAG_NODE_PORT | SVC_FLAG_NODE_ADDRESS) != 0
                        && !opens_connection(input) =>
                {
                    unchanged(
                        TCX_NEXT,
                        "a TCP segment to a NodePort other than a connection's first",
                    )?;
                    Some(Seen::NotFirstSegment)
                }
                Some((fe, backends)) if backends.is_empty() => match refusal(fe) {
                    Refusal::Pass => {
                        unchanged(TCX_NEXT, "a frontend without backends on a node address")?;
                        Some(Seen::RefusedPassed)
                    }
                    Refusal::Answer if answerable(input, &tuple) => {
                        let want = answer_to(tuple.daddr, tuple.saddr, (3, 3), [0; 4], input);
                        if out.verdict != TC_ACT_REDIRECT || out.packet != want {
                            return Err(fail(
                                format!(
                                    "a frontend without backends elsewhere: not answered with \
                                     port unreachable (verdict {}); want:\n{}",
                                    out.verdict,
                                    hex(&want)
                                ),
                                &out,
                            ));
                        }
                        Some(Seen::RefusedAnswered)
                    }
                    _ => {
                        unchanged(TC_ACT_SHOT, "a frontend without backends, dropped")?;
                        Some(Seen::RefusedDropped)
                    }
                },
                Some(_) => None,
            };
            if let Some(seen) = seen {
                if self.ct(&key).is_some() {
                    return Err(fail(
                        "a conntrack entry was created for a packet that is not translated".into(),
                        &out,
                    ));
                }
                return Ok((seen, Some(out)));
            }
        }
        let Some(entry) = self.ct(&key) else {
            return Err(fail(
                "tracked or to a frontend with backends, but no conntrack entry under its key \
                 after the run"
                    .into(),
                &out,
            ));
        };
        check_entry(&self.frontends, hook, &tuple, &entry).map_err(|why| fail(why, &out))?;
        if expires(hook, input, &entry) {
            let seen = check_expired(input, &tuple, true, &out).map_err(|why| fail(why, &out))?;
            return Ok((seen, Some(out)));
        }
        if self.too_big(hook, input, &entry) {
            let seen = check_too_big(input, &tuple, true, &out).map_err(|why| fail(why, &out))?;
            return Ok((seen, Some(out)));
        }
        self.check_rewrite(hook, input, &tuple, &entry, &out)
            .map_err(|why| fail(why, &out))?;
        if part == Part::First {
            let recorded = self.dp.fragments.get(&fragment_key(input), 0).ok();
            let want = (tuple.sport.to_be(), tuple.dport.to_be());
            if recorded.map(|p| (p.sport, p.dport)) != Some(want) {
                return Err(fail(
                    format!(
                        "a translated first fragment left {recorded:?} in the fragments map, \
                         not its ports"
                    ),
                    &out,
                ));
            }
        }
        let seen = if before.is_some() {
            Seen::TrackedFlow
        } else {
            Seen::NewFlow
        };
        Ok((seen, Some(out)))
    }

    /// Whether `input`, of the flow `entry`, is a source-NATed packet the FIB forwards
    /// ([`routed`]) with a TTL above 1 but that is larger than the pod network veth's
    /// 1500-byte MTU allows (Ethernet header and a VLAN tag beside: the kernel's
    /// `is_skb_forwardable`).
    fn too_big(&self, hook: Hook, input: &[u8], entry: &NatCtValue) -> bool {
        routed(hook, entry) && input[IP_OFF + 8] > 1 && input.len() > 1500 + 14 + 4
    }

    /// `out` is `input` rewritten as `entry` says, and nothing else changed.
    fn check_rewrite(
        &mut self,
        hook: Hook,
        input: &[u8],
        tuple: &Tuple,
        entry: &NatCtValue,
        out: &Outcome,
    ) -> Result<(), String> {
        let got = &out.packet;
        let csum_off = l4_csum_off(tuple.proto);
        let redirected = check_forwarded(hook, input, entry, out, |i| {
            (IP_OFF + 10..L4_OFF + 4).contains(&i) || (csum_off..csum_off + 2).contains(&i)
        })?;
        let want = tuple.rewritten(entry);
        if tuple_at(got) != want {
            return Err(format!(
                "rewritten to {:?}, the conntrack entry says {want:?}",
                tuple_at(got)
            ));
        }
        let (ip_in, ip_out) = (ip_residue(input), ip_residue(got));
        if ip_in != ip_out {
            return Err(if ip_in == 0 {
                "the IPv4 header checksum is wrong after the rewrite".to_string()
            } else {
                format!("a wrong IPv4 header checksum (residue {ip_in:#06x}) became {ip_out:#06x}")
            });
        }
        match (l4_residue(input), l4_residue(got)) {
            (None, None) => self.stats.translated_zero_udp_checksum += 1,
            (None, Some(_)) => return Err("a zero UDP checksum was filled in".into()),
            (Some(_), None) => return Err("the UDP checksum became zero".into()),
            (Some(a), Some(b)) if a != b => {
                return Err(if a == 0 {
                    "the TCP/UDP checksum is wrong after the rewrite".to_string()
                } else {
                    format!("a wrong TCP/UDP checksum (residue {a:#06x}) became {b:#06x}")
                });
            }
            _ => {}
        }
        if ip_in != 0 || l4_residue(input).is_some_and(|r| r != 0) {
            self.stats.translated_bad_checksum += 1;
        }
        if redirected {
            self.stats.redirected += 1;
        }
        if malformed_l4(input) {
            self.stats.translated_malformed_l4 += 1;
        }
        Ok(())
    }
}

/// Whether `entry`'s packets at this hook are source-NATed ones the FIB sends out of the
/// pod network's veth (a destination in one of its subnets; from any device, forwarding is
/// on; the next hop's MAC known or not).
fn routed(hook: Hook, entry: &NatCtValue) -> bool {
    let [a, b, c, _] = entry.daddr.to_ne_bytes();
    hook == Hook::In
        && entry.flags & CT_FLAG_SNAT != 0
        && ([a, b, c] == [10, 244, 2] || [a, b, c] == [198, 51, 100])
}

/// Whether `input`, of the flow `entry`, is a source-NATed packet the FIB forwards
/// ([`routed`]) whose TTL ends here.
fn expires(hook: Hook, input: &[u8], entry: &NatCtValue) -> bool {
    routed(hook, entry) && input[IP_OFF + 8] <= 1
}

/// Whether the program may answer `input` with an ICMP error: it carries its L4 header
/// (`has_l4`: a first fragment or a whole packet, RFC 1122 3.2.2), is no RST, and comes
/// from an address that can be answered.
fn answerable_error(input: &[u8], tuple: &Tuple, has_l4: bool) -> bool {
    has_l4 && answerable(input, tuple)
}

/// A packet whose TTL ends here (`expires`): answered with ICMP time exceeded from the
/// address it was sent to, quoting it as it came, if it is answerable; else dropped
/// unchanged.
fn check_expired(input: &[u8], tuple: &Tuple, has_l4: bool, out: &Outcome) -> Result<Seen, String> {
    if answerable_error(input, tuple, has_l4) {
        let want = answer_to(tuple.daddr, tuple.saddr, (11, 0), [0; 4], input);
        if out.verdict != TC_ACT_REDIRECT || out.packet != want {
            return Err(format!(
                "TTL ends here: not answered with time exceeded (verdict {}); want:\n{}",
                out.verdict,
                hex(&want)
            ));
        }
        return Ok(Seen::ExpiredAnswered);
    }
    if out.verdict != TC_ACT_SHOT || out.packet != input {
        return Err(format!(
            "TTL ends here, not answerable: verdict {} where a drop was due, or the packet \
             changed",
            out.verdict
        ));
    }
    Ok(Seen::ExpiredDropped)
}

/// A packet too big for the next hop (`Fuzzer::too_big`): with don't-fragment, if it is
/// answerable, answered with ICMP fragmentation needed (next-hop MTU 1500) from the address
/// it was sent to, quoting it as it came; else dropped unchanged.
fn check_too_big(input: &[u8], tuple: &Tuple, has_l4: bool, out: &Outcome) -> Result<Seen, String> {
    let dont_fragment = input[IP_OFF + 6] & 0x40 != 0;
    if dont_fragment && answerable_error(input, tuple, has_l4) {
        let want = answer_to(tuple.daddr, tuple.saddr, (3, 4), [0, 0, 0x05, 0xdc], input);
        if out.verdict != TC_ACT_REDIRECT || out.packet != want {
            return Err(format!(
                "too big for the next hop, don't-fragment set: not answered with fragmentation \
                 needed (verdict {}); want:\n{}",
                out.verdict,
                hex(&want)
            ));
        }
        return Ok(Seen::TooBigAnswered);
    }
    if out.verdict != TC_ACT_SHOT || out.packet != input {
        return Err(format!(
            "too big for the next hop, not answerable: verdict {} where a drop was due, or the \
             packet changed",
            out.verdict
        ));
    }
    Ok(Seen::TooBigDropped)
}

/// Whether a later fragment follows `entry` (the live entry under its key): always at
/// egress and for a reply; at ingress only while an original-direction entry is not
/// expired (`nat.rs`: `expired`, `lifetime`; the backends never change here). `None` within
/// a second of the lifetime, where the program's clock may read either way.
fn follows(hook: Hook, tuple: &Tuple, entry: &NatCtValue) -> Option<bool> {
    if hook == Hook::Out || entry.flags & CT_FLAG_REPLY != 0 {
        return Some(true);
    }
    let time_wait = CT_FLAG_SNAT | CT_FLAG_FIN_BACKEND_FIRST;
    let lifetime = if entry.flags & CT_FLAG_CLOSING != 0 && entry.flags & time_wait == time_wait {
        CT_LIFETIME_SNAT_CLOSING
    } else if entry.flags & CT_FLAG_CLOSING != 0 {
        CT_LIFETIME_CLOSING
    } else if tuple.proto != PROTO_TCP {
        CT_LIFETIME_NONTCP
    } else if entry.flags & CT_FLAG_SEEN_REPLY != 0 {
        CT_LIFETIME_TCP
    } else {
        CT_LIFETIME_TCP_SYN
    };
    let age = conntrack_gc::now_secs().wrapping_sub(entry.last_seen);
    if age + 1 < lifetime {
        Some(true)
    } else if age > lifetime + 1 {
        Some(false)
    } else {
        None
    }
}

/// What every translated packet must show beside its rewrite: its length; a redirect only
/// for a source-NATed flow at ingress, with the TTL decremented (MACs and TTL may change
/// then); no drop (a rewrite helper failed); and no byte changed but those `rewritable`
/// allows. Returns whether it was redirected.
fn check_forwarded(
    hook: Hook,
    input: &[u8],
    entry: &NatCtValue,
    out: &Outcome,
    rewritable: impl Fn(usize) -> bool,
) -> Result<bool, String> {
    let got = &out.packet;
    if got.len() != input.len() {
        return Err(format!(
            "translated packet has {} bytes instead of {}",
            got.len(),
            input.len()
        ));
    }
    let redirected = out.verdict == TC_ACT_REDIRECT;
    let snat_at_ingress = hook == Hook::In && entry.flags & CT_FLAG_SNAT != 0;
    if redirected && !snat_at_ingress {
        return Err("redirected, but only source-NATed packets at ingress may be".into());
    }
    if out.verdict == TC_ACT_SHOT {
        return Err("translated, then dropped (a rewrite helper failed)".into());
    }
    for (i, (a, b)) in input.iter().zip(got).enumerate() {
        if a != b && !rewritable(i) && !(redirected && (i < 12 || i == IP_OFF + 8)) {
            return Err(format!("byte {i} changed ({a:#04x} -> {b:#04x})"));
        }
    }
    let (ttl_in, ttl_out) = (input[IP_OFF + 8], got[IP_OFF + 8]);
    if redirected && (ttl_in <= 1 || ttl_out != ttl_in - 1) {
        return Err(format!("redirected with TTL {ttl_in} -> {ttl_out}"));
    }
    Ok(redirected)
}

/// `out` is the later fragment `input` with `entry`'s addresses and its IPv4 checksum
/// patched exactly (`check_forwarded` besides); the L4 data it carries is untouched.
fn check_fragment_rewrite(
    hook: Hook,
    input: &[u8],
    entry: &NatCtValue,
    out: &Outcome,
) -> Result<(), String> {
    check_forwarded(hook, input, entry, out, |i| {
        (IP_OFF + 10..IP_OFF + 20).contains(&i)
    })?;
    let mut want = [0u8; 8];
    want[..4].copy_from_slice(&entry.saddr.to_ne_bytes());
    want[4..].copy_from_slice(&entry.daddr.to_ne_bytes());
    let got = &out.packet[IP_OFF + 12..IP_OFF + 20];
    if got != want {
        return Err(format!(
            "fragment's addresses {got:?}, the conntrack entry says {want:?}"
        ));
    }
    if ip_residue(input) != ip_residue(&out.packet) {
        return Err("the IPv4 header checksum of a later fragment was not patched exactly".into());
    }
    Ok(())
}

/// A conntrack entry that translated `tuple` at `hook` agrees with the setup: its frontend
/// and backend exist and belong together; a flow's first direction goes from the client
/// (or the SNAT address and a port of the range, for a remote backend) to that backend; a
/// reply comes from the backend and leaves with the frontend as source.
fn check_entry(
    frontends: &[(Frontend, Vec<u32>)],
    hook: Hook,
    tuple: &Tuple,
    e: &NatCtValue,
) -> Result<(), String> {
    let Some((fe, backends)) = frontends.iter().find(|(f, _)| f.rev_nat_id == e.rev_nat_id) else {
        return Err(format!(
            "conntrack entry with an unknown rev-NAT id: {}",
            describe(Some(e))
        ));
    };
    let Some(be) = Backend::by_id(e.backend_id).filter(|b| backends.contains(&b.id)) else {
        return Err(format!(
            "conntrack entry with a backend not of {fe:?}: {}",
            describe(Some(e))
        ));
    };
    let rewritten = tuple.rewritten(e);
    let snat = e.flags & CT_FLAG_SNAT != 0;
    let snat_port = |p: u16| (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&p);
    let consistent = snat != be.local
        && tuple.proto == fe.proto
        && be.proto == fe.proto
        && if e.flags & CT_FLAG_REPLY == 0 {
            hook == Hook::In
                && (tuple.daddr, tuple.dport) == (fe.addr, fe.port)
                && (rewritten.daddr, rewritten.dport) == (be.addr, be.port)
                && if snat {
                    rewritten.saddr == NODE && snat_port(rewritten.sport)
                } else {
                    rewritten.saddr == tuple.saddr
                        && (rewritten.sport == tuple.sport || snat_port(rewritten.sport))
                }
        } else {
            (tuple.saddr, tuple.sport) == (be.addr, be.port)
                && (rewritten.saddr, rewritten.sport) == (fe.addr, fe.port)
                && if snat {
                    hook == Hook::In && tuple.daddr == NODE && snat_port(tuple.dport)
                } else {
                    hook == Hook::Out
                        && rewritten.daddr == tuple.daddr
                        && (rewritten.dport == tuple.dport || snat_port(tuple.dport))
                }
        };
    if consistent {
        Ok(())
    } else {
        Err(format!(
            "conntrack entry for {tuple:?} at {hook:?} does not fit frontend {fe:?} and \
             backend {}:{} (local {}): {}",
            be.addr,
            be.port,
            be.local,
            describe(Some(e))
        ))
    }
}

impl Fuzzer {
    fn remember(&mut self, packet: Vec<u8>, hook: Hook) {
        if self.corpus.len() < 512 {
            self.corpus.push((packet, hook));
        } else {
            let i = self.rng.below(self.corpus.len());
            self.corpus[i] = (packet, hook);
        }
    }

    /// Ingress runs on `lo` or, for a share, on the veth where FIB lookups succeed.
    fn ingress_device(&mut self) -> u32 {
        if self.rng.chance(30) { self.veth } else { 0 }
    }

    /// A well-formed frame with correct checksums and random flags, TTL and payload.
    fn valid_frame(&mut self, t: Tuple) -> Vec<u8> {
        let rng = &mut self.rng;
        let mut frame = if t.proto == PROTO_TCP {
            Frame::tcp(t.saddr, t.sport, t.daddr, t.dport)
        } else {
            Frame::udp(t.saddr, t.sport, t.daddr, t.dport)
        };
        frame.tcp_flags = *rng.pick(&[
            TCP_SYN,
            TCP_ACK,
            TCP_SYN | TCP_ACK,
            TCP_ACK | TCP_PSH,
            TCP_FIN | TCP_ACK,
            TCP_RST,
        ]);
        frame.udp_no_checksum = rng.chance(20);
        frame.ttl = *rng.pick(&[64, 64, 64, 64, 1, 2, 255]);
        frame.id = rng.u16();
        // Now and then larger than the pod network veth's MTU (`Fuzzer::too_big`).
        let max = if rng.chance(10) { 1600 } else { 120 };
        let len = rng.below(max);
        frame.payload = rng.bytes(len);
        let mut bytes = frame.bytes();
        if rng.chance(10) {
            // Trailing Ethernet padding beyond the IP total length.
            let pad = 1 + rng.below(20);
            bytes.extend(rng.bytes(pad));
        }
        bytes
    }

    /// Now and then (one in six) `frame` as the first fragment of a larger datagram, with a
    /// later fragment of it (random data at a random offset, the last one or not) to send
    /// after it; otherwise `frame` alone.
    fn maybe_fragmented(&mut self, mut frame: Vec<u8>) -> (Vec<u8>, Option<Vec<u8>>) {
        if !self.rng.chance(16) {
            return (frame, None);
        }
        let rng = &mut self.rng;
        let fix_ip_checksum = |f: &mut [u8]| {
            put(f, IP_OFF + 10, &[0, 0]);
            let csum = checksum(0, &f[IP_OFF..L4_OFF]);
            put(f, IP_OFF + 10, &csum.to_be_bytes());
        };
        put(&mut frame, IP_OFF + 6, &0x2000u16.to_be_bytes());
        fix_ip_checksum(&mut frame);
        let mut later = frame[..L4_OFF].to_vec();
        let len = 8 + rng.below(200);
        let data = rng.bytes(len);
        let offset = 1 + rng.below(180) as u16;
        let more = if rng.chance(50) { 0x2000 } else { 0 };
        put(
            &mut later,
            IP_OFF + 2,
            &((20 + data.len()) as u16).to_be_bytes(),
        );
        put(&mut later, IP_OFF + 6, &(more | offset).to_be_bytes());
        later.extend(data);
        fix_ip_checksum(&mut later);
        (frame, Some(later))
    }

    /// A client's packet to a frontend (now and then to something else) and, when it was
    /// translated, the backend's answer through the hook that must translate it back.
    fn valid_flow(&mut self) {
        let index = self.rng.below(self.frontends.len());
        let fe = self.frontends[index].0;
        let client = *self.rng.pick(&CLIENTS);
        // Each frontend has client ports of its own, so that the flows of the same client
        // to two frontends never share a backend-side tuple.
        let sport = 40000 + 64 * index as u16 + self.rng.below(16) as u16;
        let (daddr, dport, proto) = if self.rng.chance(10) {
            let proto = *self.rng.pick(&[PROTO_TCP, PROTO_UDP]);
            (self.rng.addr(), self.rng.port(), proto)
        } else {
            (fe.addr, fe.port, fe.proto)
        };
        let first = Tuple {
            saddr: client,
            sport,
            daddr,
            dport,
            proto,
        };
        let frame = self.valid_frame(first);
        let (packet, later) = self.maybe_fragmented(frame);
        let device = self.ingress_device();
        let out = self.send(Class::Valid, Hook::In, device, &packet);
        if let Some(later) = later {
            self.send(Class::Valid, Hook::In, device, &later);
        }
        self.remember(packet, Hook::In);
        // (Nor is an ICMP answer to a packet too big for the next hop answered.)
        let is_icmp = |o: &Outcome| o.packet.get(IP_OFF + 9) == Some(&1);
        let Some(out) = out.filter(|o| o.verdict != TC_ACT_SHOT && !is_icmp(o)) else {
            return;
        };
        let sent = tuple_at(&out.packet);
        if sent == first {
            return;
        }
        // The backend answers what it received; a source-NATed flow comes back to the node
        // at ingress, a local backend's reply leaves through egress.
        let reply = Tuple {
            saddr: sent.daddr,
            sport: sent.dport,
            daddr: sent.saddr,
            dport: sent.sport,
            proto,
        };
        let (hook, device) = if sent.saddr == NODE {
            (Hook::In, self.ingress_device())
        } else {
            (Hook::Out, 0)
        };
        let frame = self.valid_frame(reply);
        let (packet, later) = self.maybe_fragmented(frame);
        let back = self.send(Class::Valid, hook, device, &packet);
        if let Some(later) = later {
            self.send(Class::Valid, hook, device, &later);
        }
        if let Some(back) = back {
            let back = tuple_at(&back.packet);
            if (back.saddr, back.sport, back.daddr, back.dport) == (daddr, dport, client, sport) {
                self.stats.replies_to_client += 1;
            } else {
                // Its flow was replaced meanwhile (a mutated packet from the same client
                // port, an LRU eviction): allowed, and the oracle checked the rewrite.
                self.stats.replies_elsewhere += 1;
            }
        }
        self.remember(packet, hook);
    }

    /// Random bytes, random bytes behind an IPv4 ethertype, or random header fields drawn
    /// from the setup's addresses and ports; lengths 0..=1600.
    fn random_packet(&mut self) {
        let rng = &mut self.rng;
        let len = rng.below(1601);
        let mut f = rng.bytes(len);
        match rng.below(3) {
            0 => {}
            1 => {
                put(&mut f, 12, &[0x08, 0x00]);
                if rng.chance(50) {
                    put(&mut f, IP_OFF, &[0x45]);
                }
            }
            _ => {
                put(&mut f, 12, &[0x08, 0x00]);
                let ver_ihl = if rng.chance(90) { 0x45 } else { rng.u8() };
                put(&mut f, IP_OFF, &[ver_ihl]);
                let tot_len = if rng.chance(70) {
                    len.saturating_sub(ETH_HLEN) as u16
                } else {
                    rng.u16() % 1700
                };
                put(&mut f, IP_OFF + 2, &tot_len.to_be_bytes());
                let frag: u16 = if rng.chance(80) { 0x4000 } else { rng.u16() };
                put(&mut f, IP_OFF + 6, &frag.to_be_bytes());
                let proto = if rng.chance(90) {
                    *rng.pick(&[PROTO_TCP, PROTO_UDP])
                } else {
                    rng.u8()
                };
                put(&mut f, IP_OFF + 9, &[proto]);
                let (saddr, daddr) = (rng.addr(), rng.addr());
                put(&mut f, IP_OFF + 12, &saddr.octets());
                put(&mut f, IP_OFF + 16, &daddr.octets());
                let (sport, dport) = (rng.port(), rng.port());
                put(&mut f, L4_OFF, &sport.to_be_bytes());
                put(&mut f, L4_OFF + 2, &dport.to_be_bytes());
                if rng.chance(50) {
                    fix_checksums(&mut f);
                }
            }
        }
        let (hook, device) = if self.rng.chance(25) {
            (Hook::Out, 0)
        } else {
            (Hook::In, self.ingress_device())
        };
        self.send(Class::Random, hook, device, &f);
    }

    /// A packet of the corpus with one to four mutations, checksums fixed half of the time.
    fn mutated_packet(&mut self) {
        let (base, base_hook) = self.corpus[self.rng.below(self.corpus.len())].clone();
        let mut f = base;
        for _ in 0..1 + self.rng.below(4) {
            self.mutate(&mut f);
        }
        if self.rng.chance(50) {
            fix_checksums(&mut f);
        }
        let hook = if self.rng.chance(75) {
            base_hook
        } else if base_hook == Hook::In {
            Hook::Out
        } else {
            Hook::In
        };
        let device = match hook {
            Hook::In => self.ingress_device(),
            Hook::Out => 0,
        };
        self.send(Class::Mutated, hook, device, &f);
    }

    fn mutate(&mut self, f: &mut Vec<u8>) {
        let rng = &mut self.rng;
        let proto = f.get(IP_OFF + 9).copied().unwrap_or(PROTO_TCP);
        match rng.below(22) {
            0 if !f.is_empty() => {
                let i = rng.below(f.len());
                f[i] ^= 1 << rng.below(8);
            }
            1 if !f.is_empty() => {
                let i = rng.below(f.len());
                f[i] = rng.u8();
            }
            2 => f.truncate(rng.below(f.len() + 1)),
            3 => f.truncate(f.len().saturating_sub(1 + rng.below(8))),
            4 => {
                let n = 1 + rng.below(64);
                f.extend(rng.bytes(n));
            }
            5 => {
                let ethertype = *rng.pick(&[0x0800, 0x86dd, 0x0806, 0x8100, 0x88a8, 0x0600]);
                let ethertype = if rng.chance(20) { rng.u16() } else { ethertype };
                put(f, 12, &u16::to_be_bytes(ethertype));
            }
            6 => {
                let v = *rng.pick(&[0x45, 0x46, 0x4f, 0x44, 0x40, 0x55, 0x65, 0x05]);
                put(f, IP_OFF, &[if rng.chance(20) { rng.u8() } else { v }]);
            }
            7 => {
                let tot = usize::from(f.get(IP_OFF + 2..IP_OFF + 4).map_or(0, |b| be16(b, 0)));
                let frame = f.len().saturating_sub(ETH_HLEN);
                let candidates = [
                    rng.u16() as usize,
                    tot + 1 + rng.below(4),
                    tot.saturating_sub(1 + rng.below(4)),
                    frame,
                    frame + 1,
                    0,
                    19,
                    20,
                    27,
                    28,
                    39,
                    40,
                    65535,
                ];
                let v = *rng.pick(&candidates) as u16;
                put(f, IP_OFF + 2, &v.to_be_bytes());
            }
            8 => {
                let v: u16 = *rng.pick(&[0x4000, 0x2000, 0x0001, 0x1fff, 0x8000, 0x6000, 0]);
                let v = if rng.chance(20) { rng.u16() } else { v };
                put(f, IP_OFF + 6, &v.to_be_bytes());
            }
            9 => {
                let p = *rng.pick(&[PROTO_TCP, PROTO_UDP, 1, 132, 0, 255]);
                put(f, IP_OFF + 9, &[if rng.chance(20) { rng.u8() } else { p }]);
            }
            10 => put(f, L4_OFF, &rng.port().to_be_bytes()),
            11 => put(f, L4_OFF + 2, &rng.port().to_be_bytes()),
            12 => put(f, IP_OFF + 12, &rng.addr().octets()),
            13 => put(f, IP_OFF + 16, &rng.addr().octets()),
            14 => {
                let doff = rng.below(16) as u8;
                let low = f.get(L4_OFF + 12).map_or(0, |b| b & 0x0f);
                put(f, L4_OFF + 12, &[doff << 4 | low]);
            }
            15 => {
                let len = usize::from(f.get(IP_OFF + 2..IP_OFF + 4).map_or(0, |b| be16(b, 0)));
                let random = rng.u16() as usize;
                let v = *rng.pick(&[0, 7, 8, len.saturating_sub(20) + 1, random]);
                put(f, L4_OFF + 4, &(v as u16).to_be_bytes());
            }
            16 => {
                let v = if rng.chance(30) { 0 } else { rng.u16() };
                put(f, IP_OFF + 10, &v.to_be_bytes());
            }
            17 => {
                let v = if rng.chance(30) { 0 } else { rng.u16() };
                put(f, l4_csum_off(proto), &v.to_be_bytes());
            }
            18 => {
                let ttl = *rng.pick(&[0, 1, 2, 255]);
                put(f, IP_OFF + 8, &[ttl]);
            }
            19 => {
                let random = rng.u8();
                let flags = *rng.pick(&[TCP_FIN, TCP_RST, TCP_SYN, TCP_ACK, random]);
                put(f, L4_OFF + 13, &[flags]);
            }
            20 if f.len() >= L4_OFF + 4 => {
                // Turn it around, as a reply (or a spoofed one) would be.
                let (s, d) = (
                    f[IP_OFF + 12..IP_OFF + 16].to_vec(),
                    f[IP_OFF + 16..L4_OFF].to_vec(),
                );
                put(f, IP_OFF + 12, &d);
                put(f, IP_OFF + 16, &s);
                let (sp, dp) = (
                    f[L4_OFF..L4_OFF + 2].to_vec(),
                    f[L4_OFF + 2..L4_OFF + 4].to_vec(),
                );
                put(f, L4_OFF, &dp);
                put(f, L4_OFF + 2, &sp);
            }
            _ => {
                // A run of random bytes somewhere in the headers.
                let at = rng.below(L4_OFF + 20);
                let n = 1 + rng.below(6);
                let bytes = rng.bytes(n);
                put(f, at, &bytes);
            }
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// Veth towards the pod network: the remote pods and the clients are routed through it,
/// with a neighbour entry for one pod and one client (FIB success: redirect with MACs) and
/// none for the others (`bpf_redirect_neigh`); forwarding on.
fn pod_network_device() -> u32 {
    forwarding_device(
        &["10.244.2.1/24", "198.51.100.1/24"],
        &[
            ("10.244.2.20", "02:00:00:00:02:20"),
            ("198.51.100.7", "02:00:00:00:00:07"),
        ],
    )
}

#[test]
fn random_and_mutated_packets_change_only_service_traffic_and_keep_checksums_valid() {
    in_private_netns(|| {
        let packets = env_u64("EKP_FUZZ_PACKETS").unwrap_or(DEFAULT_PACKETS);
        let seed = env_u64("EKP_FUZZ_SEED").unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970");
            t.as_nanos() as u64 ^ u64::from(std::process::id())
        });
        println!(
            "tcx_fuzz: seed {seed}, {packets} packets (EKP_FUZZ_SEED={seed} to run them again)"
        );

        let veth = pod_network_device();
        // The verifier runs on both programs here.
        let mut dp = Datapath::load();
        for b in &BACKENDS {
            let flags = if b.local { BACKEND_FLAG_LOCAL } else { 0 };
            dp.backend(b.id, b.addr, b.port, b.proto, flags);
        }
        let frontends = frontends();
        for (fe, backends) in &frontends {
            dp.frontend(*fe, backends);
        }
        dp.snat(NODE, SNAT_PORT_MIN, SNAT_PORT_MAX);

        let mut fuzz = Fuzzer {
            dp,
            rng: Rng::new(seed),
            seed,
            veth,
            frontends,
            corpus: Vec::new(),
            packets: 0,
            stats: Stats::default(),
        };
        let started = Instant::now();
        while fuzz.packets < packets {
            let class = fuzz.rng.below(100);
            if fuzz.corpus.is_empty() || class < 30 {
                fuzz.valid_flow();
            } else if class < 70 {
                fuzz.mutated_packet();
            } else {
                fuzz.random_packet();
            }
        }
        let elapsed = started.elapsed();

        // Every entry left in the map still fits the setup.
        let entries = fuzz.dp.ct_entries();
        for (key, value) in &entries {
            let hook = if key.dir == CT_DIR_IN {
                Hook::In
            } else {
                Hook::Out
            };
            if let Err(why) = check_entry(&fuzz.frontends, hook, &Tuple::of_key(key), value) {
                panic!("tcx_fuzz (seed {seed}): after the run: {why}");
            }
        }

        let stats = &fuzz.stats;
        println!(
            "tcx_fuzz: {} packets in {:.1} s (seed {seed}), {} conntrack entries left",
            fuzz.packets,
            elapsed.as_secs_f64(),
            entries.len()
        );
        for ((class, hook, seen), n) in &stats.outcomes {
            println!(
                "  {:<8} {:<12} {:<45} {n:>7}",
                format!("{class:?}"),
                hook.program(),
                seen.describe()
            );
        }
        println!(
            "  translated packets: {} redirected (FIB), {} with a wrong checksum kept wrong, \
             {} with a zero UDP checksum kept zero, {} with a TCP data offset or UDP length \
             a receiver rejects",
            stats.redirected,
            stats.translated_bad_checksum,
            stats.translated_zero_udp_checksum,
            stats.translated_malformed_l4
        );
        println!(
            "  valid replies: {} back to their client from the frontend, {} to a flow that \
             replaced theirs",
            stats.replies_to_client, stats.replies_elsewhere
        );

        // A run long enough to mean something went down every path.
        if packets >= DEFAULT_PACKETS / 10 {
            for seen in [
                Seen::RejectedByKernel,
                Seen::NotTranslatable,
                Seen::NotOurs,
                Seen::NotFirstSegment,
                Seen::RefusedDropped,
                Seen::RefusedPassed,
                Seen::RefusedAnswered,
                Seen::NewFlow,
                Seen::TrackedFlow,
                Seen::FragmentFollowed,
                Seen::ExpiredAnswered,
            ] {
                assert!(
                    stats.count(seen) > 0,
                    "seed {seed}: no packet was {}",
                    seen.describe()
                );
            }
            assert!(stats.redirected > 0, "seed {seed}: nothing was redirected");
            assert!(
                stats.replies_to_client > 0,
                "seed {seed}: no reply made it back"
            );
        }
    });
}
