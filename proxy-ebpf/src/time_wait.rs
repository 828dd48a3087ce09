//! The backend's TIME_WAIT of source-NATed TCP connections (`SNAT_TIME_WAIT`).
//!
//! A backend that closes a connection first keeps it in TIME_WAIT for a minute, and the
//! connection's SNAT port leads any new flow given it meanwhile into that socket. Linux
//! takes such a SYN as a new connection only if its timestamp is newer than the last one
//! the socket saw from the client, or, without timestamps, its sequence number is past the
//! old connection's (`proxy_common::SnatTimeWait::accepts`); otherwise it answers with the
//! old connection's ACK and the new client waits a retransmission timeout. Recent Linux
//! draws a timestamp offset per connection, so that is a coin toss for an unrelated SYN.
//!
//! When the client's FIN passes after the backend's, the record of what the backend's
//! socket will remember (the sequence number after the FIN, its timestamp) is written
//! under the flow's reply tuple; the SNAT port search reads it to give such a port to a SYN
//! the socket will take, and to keep it from one it would turn away (`nat::allocate_port`).
//! The kernel's NAT does the same from its conntrack entries (a tuple in TIME_WAIT is
//! reused when the new SYN's sequence number has advanced), without the timestamps. A port
//! whose flow closed without the backend's TIME_WAIT (the client's FIN first) goes again
//! [`REUSE_AFTER`] seconds after the close ([`judge`]); one closed by a RST when its flow
//! expires.

use core::ffi::c_void;

use aya_ebpf::bindings::{__sk_buff, BPF_ANY};
use aya_ebpf::helpers::generated::{bpf_loop, bpf_skb_load_bytes};
use aya_ebpf::programs::TcContext;
use proxy_common::{
    CT_FLAG_CLOSING, CT_FLAG_FIN_BACKEND, CT_FLAG_FIN_BACKEND_FIRST, CT_FLAG_FIN_CLIENT,
    CT_FLAG_REPLY, CT_FLAG_SNAT, NatCtKey, NatCtValue, PROTO_TCP, SnatTimeWait,
    TIME_WAIT_FLAG_TIMESTAMP,
};

use crate::maps::SNAT_TIME_WAIT;
use crate::nat;
use crate::parse::{self, IP_OFF, L4_OFF, Packet, TCP_FIN};

/// What a TCP segment tells a TIME_WAIT socket ([`read_stamp`]). The SNAT port search
/// starts with an unread one ([`Stamp::unread`]), which [`judge`] reads the first time the
/// search meets a port held by a flow in its backend's TIME_WAIT.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Stamp {
    /// The segment's sequence number, host order.
    pub seq: u32,
    /// The sequence number after it (its payload, SYN and FIN counted), host order.
    pub next_seq: u32,
    /// Its TCP timestamp value, host order, with [`STAMP_TIMESTAMP`].
    pub tsval: u32,
    /// `STAMP_*` bits; 0 when no segment was read and none is to be.
    pub flags: u32,
}

/// [`Stamp::flags`]: the stamp was read from a TCP segment.
const STAMP_READ: u32 = 1;
/// [`Stamp::flags`]: the segment carried a TCP timestamp option.
const STAMP_TIMESTAMP: u32 = 2;
/// [`Stamp::flags`]: not read yet, to be read from the segment when needed (one that opens
/// a TCP connection). Cleared by the read, also when it fails.
const STAMP_UNREAD: u32 = 4;

impl Stamp {
    /// The stamp of the segment a search runs for, read only if a judgement needs it:
    /// reading it was about a fifth of a source-NATed SYN's time in `ekp_tcx_in`
    /// (`BPF_PROG_TEST_RUN`, a Linux SYN's options), and most SYNs take the first port
    /// tried, free.
    #[inline(always)]
    pub fn unread() -> Self {
        Stamp {
            flags: STAMP_UNREAD,
            ..Stamp::default()
        }
    }

    /// Whether a TIME_WAIT socket that holds `record` takes the SYN this stamp was read
    /// from; `None` when there is no stamp to judge by.
    #[inline(always)]
    pub fn taken_by(&self, record: &SnatTimeWait) -> Option<bool> {
        if self.flags & STAMP_READ == 0 {
            return None;
        }
        let tsval = (self.flags & STAMP_TIMESTAMP != 0).then_some(self.tsval);
        Some(record.accepts(self.seq, tsval))
    }
}

/// What the backend of a flow that holds a SNAT port keeps against a new flow's SYN there
/// ([`judge`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    /// Nothing: the flow closed (both FINs, the client's first) [`REUSE_AFTER`] seconds ago
    /// or more, or the backend's TIME_WAIT takes the SYN (by its record).
    Nothing,
    /// Its TIME_WAIT turns the SYN away (by its record).
    TurnsAway,
    /// Not known, or a live flow.
    Unknown,
}

/// Whole seconds of the programs' clock after which a port whose TCP flow closed without
/// the backend's TIME_WAIT may go to a new flow, before the flow's entries expire
/// (`CT_LIFETIME_CLOSING`): 2, so that the close is at least a second old (the backend
/// has had the last ACK of a close the client began). The kernel's NAT reuses a closed
/// tuple too, at its last tries for a port.
const REUSE_AFTER: u32 = 2;

/// The flags of a flow that closed with its backend's FIN first (of those two): its backend
/// holds it in TIME_WAIT.
const IN_TIME_WAIT: u16 = CT_FLAG_CLOSING | CT_FLAG_FIN_BACKEND_FIRST;

/// What the backend of the flow `held` (a reply entry under `reply_key`, last seen `age`
/// seconds ago) keeps against the SYN in `skb`, stamped `syn` (read here, if still
/// [`Stamp::unread`], when `held` is in its backend's TIME_WAIT). Calls of global
/// functions whose answer the SNAT port search branches on once at each try: judged
/// inline, each try's ways through the judgement were paths of their own for the verifier.
#[inline(always)]
pub fn judge(
    skb: *mut __sk_buff,
    reply_key: &NatCtKey,
    held: &NatCtValue,
    age: u32,
    syn: &mut Stamp,
) -> Judged {
    // Only a flow its backend closed first leaves a TIME_WAIT, whose record needs a stamp.
    if held.flags & IN_TIME_WAIT == IN_TIME_WAIT && syn.flags & STAMP_UNREAD != 0 {
        ekp_read_stamp(skb, syn);
    }
    let flags_age = u64::from(held.flags) | u64::from(age) << 32;
    let client = u64::from(held.daddr) | u64::from(held.dport) << 32;
    match ekp_judge_port(reply_key, flags_age, client, syn) {
        JUDGED_NOTHING => Judged::Nothing,
        JUDGED_TURNS_AWAY => Judged::TurnsAway,
        _ => Judged::Unknown,
    }
}

/// What [`ekp_judge_port`] answers.
const JUDGED_UNKNOWN: u64 = 0;
const JUDGED_NOTHING: u64 = 1;
const JUDGED_TURNS_AWAY: u64 = 2;

/// [`judge`] on its arguments packed: the held flow's flags and age (`flags_age`: flags,
/// age << 32) and client (address, port << 32). A global BPF function: the verifier checks
/// it once, and the record it copies stays out of the search's frame.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn ekp_judge_port(
    reply_key: *const NatCtKey,
    flags_age: u64,
    client: u64,
    syn: *const Stamp,
) -> u64 {
    let (flags, age) = (flags_age as u16, (flags_age >> 32) as u32);
    let closed = flags & IN_TIME_WAIT;
    if closed == CT_FLAG_CLOSING {
        // Only a close both sides made (a FIN each, the client's first). A RST's sequence
        // number is not checked here: a stray or forged one that the peers ignore leaves
        // the connection alive, and its port must not go to another flow while it may
        // still send; such a port goes when the flow expires, as Linux's NAT keeps a
        // reset tuple for its conntrack entry's 10 s.
        let both_fins = CT_FLAG_FIN_CLIENT | CT_FLAG_FIN_BACKEND;
        return if flags & both_fins == both_fins && age >= REUSE_AFTER {
            JUDGED_NOTHING
        } else {
            JUDGED_UNKNOWN
        };
    }
    // SAFETY: null or the caller's live structs.
    let (Some(reply_key), Some(syn)) = (unsafe { reply_key.as_ref() }, unsafe { syn.as_ref() })
    else {
        return JUDGED_UNKNOWN;
    };
    if closed != IN_TIME_WAIT {
        return JUDGED_UNKNOWN;
    }
    // SAFETY: copied out at once.
    let Some(record) = SNAT_TIME_WAIT.get_ptr(reply_key).map(|r| unsafe { *r }) else {
        return JUDGED_UNKNOWN;
    };
    if record.client_addr != client as u32 || record.client_port != (client >> 32) as u16 {
        return JUDGED_UNKNOWN;
    }
    match syn.taken_by(&record) {
        Some(true) => JUDGED_NOTHING,
        Some(false) => JUDGED_TURNS_AWAY,
        None => JUDGED_UNKNOWN,
    }
}

/// Reads the stamp of the segment in `skb` into `syn` ([`read_stamp`]; nothing for a null
/// `syn`; returns 0). A global BPF function of its own, for [`judge`] to call only when the
/// stamp may be needed: the verifier checks the walk of the options once, and the walk's
/// state stays out of the search's frame, which shares the 512 bytes of `ekp_tcx_in`'s
/// call chain with `ekp_tcx_in` and this function.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn ekp_read_stamp(skb: *mut __sk_buff, syn: *mut Stamp) -> u64 {
    // SAFETY: null or the caller's live struct.
    if let Some(syn) = unsafe { syn.as_mut() } {
        read_stamp(&TcContext::new(skb), syn);
    }
    0
}

const TCP_HLEN: usize = 20;
const TCP_SYN: u8 = 0x02;
/// TCP option kinds and the timestamp option's length (RFC 9293, RFC 7323).
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_TIMESTAMP: u8 = 8;
const TCPOLEN_TIMESTAMP: u8 = 10;
/// Options a header can hold at most (40 bytes, one NOP each).
const MAX_OPTIONS: u32 = 40;

/// Records the client's FIN of a source-NATed flow the backend closed first (`entry`, the
/// flow's original-direction entry under `key`); anything else is left alone.
#[inline(always)]
pub fn remember_fin(ctx: &TcContext, pkt: &Packet, key: &NatCtKey, entry: &NatCtValue) {
    let wanted = CT_FLAG_SNAT | CT_FLAG_FIN_BACKEND_FIRST;
    if pkt.tcp_flags & TCP_FIN != 0
        && pkt.proto == PROTO_TCP
        && entry.flags & (wanted | CT_FLAG_REPLY) == wanted
    {
        ekp_remember_fin(
            ctx.skb.skb,
            u64::from(key.saddr) | u64::from(key.sport) << 32,
            u64::from(entry.saddr) | u64::from(entry.daddr) << 32,
            u64::from(entry.sport) | u64::from(entry.dport) << 16,
        );
    }
}

/// Writes the record of the FIN `skb` carries, under the reply tuple of the flow whose
/// client is `client` (address, port << 32) and whose source-NATed packets go from
/// `addrs` (source, destination << 32) and `ports` (source, destination << 16). Returns 0,
/// or 1 when nothing was written.
///
/// A global BPF function (as `lb::ekp_find_backend`): the verifier checks it, and the walk
/// of the options in it, once.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn ekp_remember_fin(skb: *mut __sk_buff, client: u64, addrs: u64, ports: u64) -> i32 {
    let mut stamp = Stamp::default();
    read_stamp(&TcContext::new(skb), &mut stamp);
    if stamp.flags & STAMP_READ == 0 {
        return 1;
    }
    let record = SnatTimeWait {
        client_addr: client as u32,
        client_port: (client >> 32) as u16,
        flags: if stamp.flags & STAMP_TIMESTAMP != 0 {
            TIME_WAIT_FLAG_TIMESTAMP
        } else {
            0
        },
        next_seq: stamp.next_seq,
        tsval: stamp.tsval,
    };
    let forward = NatCtValue {
        saddr: addrs as u32,
        daddr: (addrs >> 32) as u32,
        sport: ports as u16,
        dport: (ports >> 16) as u16,
        flags: CT_FLAG_SNAT,
        ..NatCtValue::default()
    };
    let key = NatCtKey {
        proto: PROTO_TCP,
        ..NatCtKey::default()
    };
    // Without room the port waits out the TIME_WAIT, as without records.
    i32::from(
        SNAT_TIME_WAIT
            .insert(&nat::pair_key(&key, &forward), &record, u64::from(BPF_ANY))
            .is_err(),
    )
}

/// Reads the stamp of the IPv4 TCP segment in `ctx` (a 20-byte IP header, as `parse`
/// accepts) into `stamp`; an empty one (flags 0) when it cannot be read. Called by the
/// global functions that need it only (`ekp_read_stamp`, `ekp_remember_fin`): its walk of
/// the options is then verified with them, once. The fields go to `stamp` as they are
/// read, so that only its address waits during the walk, not a copy in the frame of
/// [`ekp_read_stamp`] (the call chain `ekp_tcx_in`, `nat::ekp_allocate_port`,
/// `ekp_read_stamp`, [`option_step`] fills the 512 bytes it may have).
#[inline(always)]
pub fn read_stamp(ctx: &TcContext, stamp: &mut Stamp) {
    stamp.flags = 0;
    let _ = read(ctx, stamp);
}

#[inline(always)]
fn read(ctx: &TcContext, stamp: &mut Stamp) -> Option<()> {
    // Only the fields used, each loaded on its own.
    let tot_len = parse::datagram_len(ctx, ctx.load::<u16>(IP_OFF + 2).ok()?, PROTO_TCP);
    let seq = u32::from_be(ctx.load::<u32>(L4_OFF + 4).ok()?);
    let [offset, flags] = ctx.load::<[u8; 2]>(L4_OFF + 12).ok()?;
    let words = offset >> 4;
    let header_len = usize::from(words) * 4;
    if header_len < TCP_HLEN {
        return None;
    }
    let payload = tot_len.checked_sub(L4_OFF - IP_OFF + header_len)?;
    let control = u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
    stamp.seq = seq;
    stamp.next_seq = seq.wrapping_add(payload as u32).wrapping_add(control);
    let tsval = timestamp(ctx, words)?;
    stamp.tsval = tsval.unwrap_or(0);
    stamp.flags = STAMP_READ | if tsval.is_some() { STAMP_TIMESTAMP } else { 0 };
    Some(())
}

/// The timestamp value among the TCP options of a header of `words` 32-bit words
/// (`Some(None)`: it has none; `None`: the options could not be read to their end).
///
/// The options are walked by `bpf_loop` ([`option_step`]): the verifier checks one step of
/// the walk, where a loop written out would have it follow every sequence of option sizes
/// the steps can meet (hundreds of thousands of instructions for 40 bytes of options).
#[inline(always)]
fn timestamp(ctx: &TcContext, words: u8) -> Option<Option<u32>> {
    let mut walk = Walk {
        skb: ctx.skb.skb,
        at: (L4_OFF + TCP_HLEN) as u32,
        end: (L4_OFF + usize::from(words & 0x0f) * 4) as u32,
        tsval: 0,
        state: WALKING,
        option: [0; 2],
    };
    // SAFETY: `option_step` is a callback of the type `bpf_loop` calls, and `walk` lives
    // through the call.
    unsafe {
        bpf_loop(
            MAX_OPTIONS,
            option_step as *mut c_void,
            (&raw mut walk).cast(),
            0,
        )
    };
    match walk.state {
        FOUND => Some(Some(walk.tsval)),
        // (Forty steps are forty options: only NOPs, no timestamp.)
        WALKING | NO_TIMESTAMP => Some(None),
        _ => None,
    }
}

/// Where a walk of a segment's TCP options stands: `bpf_loop`'s context for
/// [`option_step`].
#[repr(C)]
struct Walk {
    /// The packet.
    skb: *mut __sk_buff,
    /// Offset of the next option in the packet.
    at: u32,
    /// Offset of the end of the options.
    end: u32,
    /// The timestamp value, once `FOUND`.
    tsval: u32,
    /// `WALKING`, or how the walk ended.
    state: u32,
    /// Where a step loads an option's kind and size: here rather than in the step's own
    /// frame, so that the step takes no stack (it ends the call chain of [`read_stamp`],
    /// whose 512 bytes are all taken).
    option: [u8; 2],
}

const WALKING: u32 = 0;
const NO_TIMESTAMP: u32 = 1;
const FOUND: u32 = 2;
const UNREADABLE: u32 = 3;

/// One option of the walk `walk` (a [`Walk`]): the timestamp found, the end met, or the
/// next option's offset. Returns 1 to end the walk, 0 to go on.
extern "C" fn option_step(_index: u64, walk: *mut c_void) -> i64 {
    // SAFETY: `bpf_loop` passes the `Walk` that `timestamp` gave it.
    let Some(walk) = (unsafe { walk.cast::<Walk>().as_mut() }) else {
        return 1;
    };
    walk.state = step(walk);
    i64::from(walk.state != WALKING)
}

#[inline(always)]
fn step(walk: &mut Walk) -> u32 {
    if walk.at >= walk.end {
        return NO_TIMESTAMP;
    }
    let at = walk.at;
    if !load_into(walk.skb, at, (&raw mut walk.option[0]).cast(), 1) {
        return UNREADABLE;
    }
    let kind = walk.option[0];
    match kind {
        TCPOPT_EOL => return NO_TIMESTAMP,
        TCPOPT_NOP => {
            walk.at += 1;
            return WALKING;
        }
        _ => {}
    }
    if !load_into(walk.skb, at + 1, (&raw mut walk.option[1]).cast(), 1) {
        return UNREADABLE;
    }
    let size = walk.option[1];
    if kind == TCPOPT_TIMESTAMP && size == TCPOLEN_TIMESTAMP {
        if walk.at + u32::from(TCPOLEN_TIMESTAMP) > walk.end {
            return UNREADABLE;
        }
        if !load_into(walk.skb, at + 2, (&raw mut walk.tsval).cast(), 4) {
            return UNREADABLE;
        }
        // Loaded as the bytes are on the wire.
        walk.tsval = u32::from_be(walk.tsval);
        return FOUND;
    }
    if size < 2 {
        return UNREADABLE;
    }
    walk.at += u32::from(size);
    WALKING
}

/// Copies `len` bytes of the packet `skb` at `offset` to `to` (memory of the walk's,
/// in the caller's frame); false when the packet has none there.
#[inline(always)]
fn load_into(skb: *mut __sk_buff, offset: u32, to: *mut c_void, len: u32) -> bool {
    // SAFETY: `to` points at `len` bytes of the walk; the helper checks the packet side.
    unsafe { bpf_skb_load_bytes(skb.cast(), offset, to, len) == 0 }
}
