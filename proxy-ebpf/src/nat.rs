//! North-south connection tracking and NAT (Cilium's `lib/conntrack.h` + `lib/nat.h`,
//! folded into one LRU map).
//!
//! A translated flow has two entries in `NAT_CT`, each keyed by the 5-tuple a packet
//! carries when it reaches the program that must translate it, each holding the complete
//! rewrite for that direction:
//!
//! | flow | original direction (ingress) | reply direction |
//! |---|---|---|
//! | local backend | client -> frontend  =>  client -> backend | backend -> client (egress)  =>  frontend -> client |
//! | remote backend, SNAT | client -> frontend  =>  node:port -> backend | backend -> node:port (ingress)  =>  frontend -> client |
//!
//! The two entries of a flow are each other's inverse: the key of one is the value of the
//! other with source and destination swapped, so each can find and refresh its partner.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_or, atomic_xadd};
use core::mem::offset_of;

use aya_ebpf::bindings::{__sk_buff, BPF_ANY, BPF_NOEXIST};
use aya_ebpf::helpers::generated::bpf_get_prandom_u32;
use aya_ebpf::programs::TcContext;
use proxy_common::{
    CT_DIR_IN, CT_DIR_OUT, CT_FLAG_BACKEND_SYN, CT_FLAG_CLAIM, CT_FLAG_CLOSING,
    CT_FLAG_FIN_BACKEND, CT_FLAG_FIN_BACKEND_FIRST, CT_FLAG_FIN_CLIENT, CT_FLAG_REPLY,
    CT_FLAG_SEEN_REPLY, CT_FLAG_SNAT, CT_LIFETIME_CLOSING, NatCtKey, NatCtValue, SNAT_CURSORS,
    SNAT_PORT_RETRIES, seconds_since,
};

use crate::csum::{self, RewriteError};
use crate::maps::{BACKENDS, NAT_CT, SNAT_CURSOR};
use crate::parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN};
use crate::time_wait::{self, Judged, Stamp};

/// The conntrack key of `pkt` as seen by the hook `dir`.
#[inline(always)]
pub fn key_of(pkt: &Packet, dir: u8) -> NatCtKey {
    NatCtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir,
        _pad: [0; 2],
    }
}

/// The key of the other entry of the flow `entry` (stored under `key`) belongs to: the
/// tuple a packet has after `entry`'s rewrite, reversed. Reply entries pair with an
/// original-direction entry at ingress; an original-direction entry's reply comes back at
/// ingress when source-NATed (to the node's address) and leaves at egress otherwise.
#[inline(always)]
pub fn pair_key(key: &NatCtKey, entry: &NatCtValue) -> NatCtKey {
    let dir = if entry.flags & (CT_FLAG_REPLY | CT_FLAG_SNAT) != 0 {
        CT_DIR_IN
    } else {
        CT_DIR_OUT
    };
    NatCtKey {
        saddr: entry.daddr,
        daddr: entry.saddr,
        sport: entry.dport,
        dport: entry.sport,
        proto: key.proto,
        dir,
        _pad: [0; 2],
    }
}

/// The entry that undoes `entry`: what the partner stored under `pair_key` must hold.
#[inline(always)]
fn pair_value(key: &NatCtKey, entry: &NatCtValue) -> NatCtValue {
    NatCtValue {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        backend_id: entry.backend_id,
        rev_nat_id: entry.rev_nat_id,
        flags: entry.flags ^ CT_FLAG_REPLY,
        last_seen: entry.last_seen,
    }
}

/// An original-direction entry is only followed while its backend still exists with the
/// same address: a backend that left the Service gets no new packets (its flows are
/// re-balanced, as kube-proxy flushes conntrack for removed UDP endpoints).
#[inline(always)]
pub fn backend_alive(entry: &NatCtValue) -> bool {
    // Compared in place (a copy would take stack from `ekp_tcx_in`'s 512-byte call chain);
    // an entry of the array that holds no backend has address 0, which matches no flow.
    match BACKENDS.get_ptr(entry.backend_id) {
        // SAFETY: a map value pointer, valid for this program run.
        Some(b) => unsafe { (*b).addr == entry.daddr && (*b).port == entry.dport },
        None => false,
    }
}

// The atomic updates below work on the entry's last 8 bytes, one word: `rev_nat_id` (bits
// 0..16), `flags` (16..32) and `last_seen` (32..64) on this little-endian target. BPF atomics
// at the default CPU level take 64 bits only, and a map value starts 8-byte aligned, so the
// word at offset 16 is aligned.
const _: () = assert!(
    offset_of!(NatCtValue, rev_nat_id) == 16
        && offset_of!(NatCtValue, flags) == 18
        && offset_of!(NatCtValue, last_seen) == 20
        && core::mem::size_of::<NatCtValue>() == 24
        && cfg!(target_endian = "little")
);

/// The word of `rev_nat_id`, `flags` and `last_seen` of the entry at `entry`.
#[inline(always)]
fn tail_word(entry: *mut NatCtValue) -> *mut u64 {
    // SAFETY: only the address is computed.
    unsafe { (&raw mut (*entry).rev_nat_id).cast::<u64>() }
}

/// `held`'s `rev_nat_id`, `flags` and `last_seen` as [`tail_word`] holds them.
#[inline(always)]
fn tail_of(held: &NatCtValue) -> u64 {
    u64::from(held.rev_nat_id) | u64::from(held.flags) << 16 | u64::from(held.last_seen) << 32
}

/// Adds `bits` to the flags of the entry at `entry` in one atomic operation: two CPUs that
/// record each side's FIN at the same moment both land (plain writes of the whole field
/// could lose one, and the flow would never close).
#[inline(always)]
fn add_flags(entry: *mut NatCtValue, bits: u16) {
    if bits == 0 {
        return;
    }
    // SAFETY: a map value pointer, valid for this program run, and an aligned word within
    // the value (see above); only flag bits are set in it.
    unsafe {
        atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(tail_word(entry), u64::from(bits) << 16);
    }
}

/// Moves the stamp of the entry at `entry` from `held`'s (as read) to `now` and flips its
/// `CT_FLAG_CLAIM`, if nothing in its word changed since: of two CPUs that read the same
/// replaceable entry, only one succeeds (the flip makes the word change even when its stamp
/// is already `now`).
#[inline(always)]
fn restamp(entry: *mut NatCtValue, held: &NatCtValue, now: u32) -> bool {
    let seen = tail_of(held);
    let fresh = ((seen & 0xffff_ffff) ^ u64::from(CT_FLAG_CLAIM) << 16) | u64::from(now) << 32;
    // SAFETY: as in `add_flags`.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            tail_word(entry),
            seen,
            fresh,
        )
        .1
    }
}

/// Records that a packet of the flow passed through `entry` (the live entry under `key`,
/// copied in `seen`): last-seen time, reply seen, each side's FIN, TCP closing (a RST, or
/// both FINs: one FIN is a half-close, the other side may still send). At most once a
/// second per flow (or when a flag changes) the partner entry is refreshed too — and
/// recreated if the LRU evicted it — so that both directions expire together.
///
/// False when another flow holds the partner's key: this flow's partner went (evicted,
/// or the client reopened from its port) and a new flow took its tuple. This flow is then
/// over: its entry is deleted, and its packets must not be translated into the other one
/// (Linux's conntrack cannot hold two flows with one tuple either).
#[inline(always)]
pub fn touch(
    key: &NatCtKey,
    entry: *mut NatCtValue,
    seen: &NatCtValue,
    pkt: &Packet,
    now: u32,
) -> bool {
    let from_backend = seen.flags & CT_FLAG_REPLY != 0;
    let mut add = 0;
    // TCP is past its handshake at a segment without SYN from the backend, or from the
    // client once the backend's SYN-ACK came (Linux's ESTABLISHED at the client's ACK).
    // (`tcp_flags` is 0 for other protocols.)
    let syn = pkt.tcp_flags & TCP_SYN != 0;
    if from_backend && syn {
        add |= CT_FLAG_BACKEND_SYN;
    } else if from_backend || (!syn && seen.flags & CT_FLAG_BACKEND_SYN != 0) {
        add |= CT_FLAG_SEEN_REPLY;
    }
    if pkt.tcp_flags & TCP_FIN != 0 {
        add |= if from_backend && seen.flags & CT_FLAG_FIN_CLIENT == 0 {
            CT_FLAG_FIN_BACKEND | CT_FLAG_FIN_BACKEND_FIRST
        } else if from_backend {
            CT_FLAG_FIN_BACKEND
        } else {
            CT_FLAG_FIN_CLIENT
        };
    }
    let both_fins = CT_FLAG_FIN_CLIENT | CT_FLAG_FIN_BACKEND;
    if pkt.tcp_flags & TCP_RST != 0 || (seen.flags | add) & both_fins == both_fins {
        add |= CT_FLAG_CLOSING;
    }
    let flags = seen.flags | add;
    if seen.last_seen == now && flags == seen.flags {
        return true;
    }
    // SAFETY: a map value pointer, valid for this program run; racing writers store the
    // same kind of refresh, and add their flags atomically.
    unsafe { (*entry).last_seen = now };
    add_flags(entry, add);
    let mut updated = *seen;
    updated.last_seen = now;
    updated.flags = flags;
    refresh_partner(key, &updated, add, now)
}

/// `touch`'s refresh of the partner entry of the flow whose entry under `key` is now
/// `updated`; false when a stranger holds the partner's key (our entry is then deleted).
/// A BPF subprogram: inlined into `ekp_tcx_in`, it grew that program's stack past what its
/// deepest call chain may have.
#[inline(never)]
fn refresh_partner(key: &NatCtKey, updated: &NatCtValue, add: u16, now: u32) -> bool {
    let partner_key = pair_key(key, updated);
    let expected = pair_value(key, updated);
    // Whether the entry under the partner's key is this flow's (a stranger's keeps it).
    let ours = |p: &NatCtValue| {
        p.saddr == expected.saddr
            && p.daddr == expected.daddr
            && p.sport == expected.sport
            && p.dport == expected.dport
    };
    let partner = match NAT_CT.get_ptr_mut(&partner_key) {
        Some(partner) => Some(partner),
        None if NAT_CT
            .insert(&partner_key, &expected, u64::from(BPF_NOEXIST))
            .is_ok() =>
        {
            return true;
        }
        // Refused (unless for want of room) when another CPU put an entry there since the
        // lookup: another packet of this flow recreating it too, or a new flow that took
        // the tuple.
        None => NAT_CT.get_ptr_mut(&partner_key),
    };
    match partner {
        // SAFETY: a map value pointer, valid for this program run, read in place.
        Some(partner) if ours(unsafe { &*partner }) => {
            // SAFETY: as above; racing writers store the same kind of refresh.
            unsafe { (*partner).last_seen = now };
            add_flags(partner, add);
        }
        Some(_) => {
            let _ = NAT_CT.remove(key);
            return false;
        }
        // No room: the next refresh tries again.
        None => {}
    }
    true
}

/// Why `create` could not record a flow.
pub enum CreateError {
    /// Every source port tried was held by a live flow (or the range is unusable).
    NoFreePort,
    /// The map refused an entry.
    MapFull,
}

/// Records a new flow: the reply entry first (a reply can never beat its entry), then the
/// original-direction entry. A source-NATed flow takes a source port from `ports`
/// (inclusive, host order), written to `forward.sport`. `opens`: the packet in `ctx` opens
/// a TCP connection; its stamp (`time_wait`) then decides which ports a backend's
/// TIME_WAIT still holds can be given to the flow.
///
/// A flow that keeps the client's address keeps its port too, unless another live flow
/// answers the client there: the same client address and port reaching the same backend
/// through another frontend (two node addresses, a NodePort and an LB IP; on pods'
/// devices, a pod's connections to two Services that share a backend). Then it takes a
/// port from `ports` as well, as the kernel's conntrack gives a clashing flow another
/// source port (its null binding); replaced, the other flow's replies would leave with this
/// flow's frontend as source, and its client would reset them.
#[inline(always)]
pub fn create(
    ctx: &TcContext,
    key: &NatCtKey,
    forward: &mut NatCtValue,
    ports: (u16, u16),
    now: u32,
    opens: bool,
) -> Result<(), CreateError> {
    let reply = pair_value(key, forward);
    let mut reply_key = pair_key(key, forward);
    if forward.flags & CT_FLAG_SNAT != 0 || !claim_reply(&reply_key, &reply, now) {
        let range_now = u64::from(ports.0) | u64::from(ports.1) << 16 | u64::from(now) << 32;
        let taken = ekp_allocate_port(ctx.skb.skb, &mut reply_key, &reply, range_now, opens.into());
        if taken & PORT_TAKEN == 0 {
            return Err(CreateError::NoFreePort);
        }
        forward.sport = taken as u16;
    }
    NAT_CT
        .insert(key, &*forward, u64::from(BPF_ANY))
        .map_err(|_| CreateError::MapFull)
}

/// Inserts the reply entry of a flow under the client's own port, unless another live flow
/// holds it; the same entry (this flow, tracked anew: the same frontend and client port,
/// where a flow that was given another port holds the client's original one), a closed one
/// and an expired one are replaced. True when the entry is in.
///
/// The holder is looked up before inserting: an LRU insert that fails has still taken a
/// free element and given it back under the LRU's locks, which costs more than the lookup,
/// and a client that reuses its port within a closed flow's 10 s (a busy client cycling
/// through its ports) finds its old entry there. A holder is replaced only after its stamp
/// moved from the one read to now in one compare-and-swap (as `try_port` claims a port):
/// of two CPUs that found it replaceable at once, each with a new flow of this client port
/// to the same backend, only one takes it, and the other's flow gets a port of its own.
#[inline(always)]
fn claim_reply(key: &NatCtKey, reply: &NatCtValue, now: u32) -> bool {
    let holder = match NAT_CT.get_ptr_mut(key) {
        Some(holder) => holder,
        None => {
            if NAT_CT.insert(key, reply, u64::from(BPF_NOEXIST)).is_ok() {
                return true;
            }
            // Another CPU's flow took it meanwhile (if it is gone again, the caller
            // gives this flow a port of its own).
            match NAT_CT.get_ptr_mut(key) {
                Some(holder) => holder,
                None => return false,
            }
        }
    };
    // SAFETY: a map value pointer, valid for this program run; read at once.
    let held = unsafe { *holder };
    let replaceable =
        (held.saddr == reply.saddr && held.sport == reply.sport && held.dport == reply.dport)
            || held.flags & CT_FLAG_CLOSING != 0
            || held.expired(key.proto, now);
    replaceable
        && restamp(holder, &held, now)
        && NAT_CT.insert(key, reply, u64::from(BPF_ANY)).is_ok()
}

/// In what [`ekp_allocate_port`] returns, set when it took a port (the low 16 bits).
const PORT_TAKEN: u64 = 1 << 16;

/// [`allocate_port`] for `create`, on its reply key (left with the last port tried).
///
/// A global BPF function (`#[no_mangle] extern "C"`, exported with BTF linkage `global`):
/// the verifier checks it once, on its own. Inlined, the search's 16 tries were walked
/// again for each of the states `ekp_tcx_in` reaches `create` in, a third of what the
/// verifier did for the program. It takes the packet's context, scalars and pointers to
/// memory (`reply_key`, `reply`: the caller's, which the verifier checks are as large as
/// the types), either of which may be null as far as the verifier knows; `range_now`: the
/// first port of `ports`, the last above it, the time above both; `opens`: 1 when the
/// packet opens a TCP connection, whose stamp (`time_wait::Stamp`) the search reads from
/// `skb` the first time a backend's TIME_WAIT record is to judge it by, out of the
/// caller's frame (most searches take their first port free and read nothing). Returns
/// the port (network order) with [`PORT_TAKEN`], 0 when none.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn ekp_allocate_port(
    skb: *mut __sk_buff,
    reply_key: *mut NatCtKey,
    reply: *const NatCtValue,
    range_now: u64,
    opens: u64,
) -> u64 {
    // SAFETY: null or the caller's live structs.
    let (Some(key), Some(reply)) = (unsafe { reply_key.as_mut() }, unsafe { reply.as_ref() })
    else {
        return 0;
    };
    let mut syn = if opens != 0 {
        Stamp::unread()
    } else {
        Stamp::default()
    };
    let ports = (range_now as u16, (range_now >> 16) as u16);
    let now = (range_now >> 32) as u32;
    match allocate_port(skb, key, reply, ports, now, &mut syn) {
        Ok(port) => u64::from(port) | PORT_TAKEN,
        Err(()) => 0,
    }
}

/// Picks a source port (network order) for the reply tuple `reply_key` (backend -> node
/// address, or client address) and claims it by inserting the reply entry. The search
/// starts at the destination's cursor and goes through consecutive ports of `ports`, so a
/// destination's ports come round again only after the whole range (RFC 6056's double-hash
/// selection, as Linux picks ephemeral ports): a port given out at random comes back much
/// sooner, at times while the backend still holds its last connection in TIME_WAIT. A port
/// is taken only if no flow holds the same reply tuple, so two flows can never share one
/// (`BPF_NOEXIST` makes check and claim one atomic step). Taken too: one whose flow
/// expired, and one whose backend holds nothing that would turn away the new flow's SYN
/// (`syn`, its stamp; [`Claim::Reusable`]). Bounded retries. When no try found one, of the
/// ports met whose TCP flows closed more than `CT_LIFETIME_CLOSING` ago (but may still be
/// in the backend's TIME_WAIT) the one closed longest ago is taken, unless a record
/// (`time_wait`) says its TIME_WAIT turns the SYN away. `Err` when none was taken.
#[inline(always)]
fn allocate_port(
    skb: *mut __sk_buff,
    reply_key: &mut NatCtKey,
    reply: &NatCtValue,
    (min, max): (u16, u16),
    now: u32,
    syn: &mut Stamp,
) -> Result<u16, ()> {
    if min == 0 || max < min {
        return Err(());
    }
    let span = u64::from(max - min) + 1;
    let cursor = cursor_of(reply_key).ok_or(())?;
    let start = draw(cursor);
    // (port, seconds since its flow closed). The port, not the try that met it: a try's
    // number is known exactly at each step, and the verifier would walk every fallback
    // it could hold as a path of its own.
    let mut fallback = (0u16, 0u32);
    for i in 0..SNAT_PORT_RETRIES {
        let port = port_at(min, start + u64::from(i), span)?;
        reply_key.dport = port;
        match try_port(skb, reply_key, reply, now, Claim::Reusable, syn) {
            Try::Taken => {
                advance(cursor, i);
                return Ok(port);
            }
            Try::Held { closed_for } if closed_for > fallback.1 => fallback = (port, closed_for),
            Try::Held { .. } => {}
        }
    }
    // Every port tried is held: the next search starts past them all.
    advance(cursor, SNAT_PORT_RETRIES - 1);
    let (port, closed_for) = fallback;
    if closed_for == 0 {
        return Err(());
    }
    reply_key.dport = port;
    match try_port(skb, reply_key, reply, now, Claim::Closed, syn) {
        Try::Taken => Ok(port),
        Try::Held { .. } => Err(()),
    }
}

/// The port (network order) `position` steps into the range that starts at `min` and
/// holds `span` ports.
#[inline(always)]
fn port_at(min: u16, position: u64, span: u64) -> Result<u16, ()> {
    // (`checked_rem`: a panic path would not verify.)
    let offset = position.checked_rem(span).ok_or(())?;
    Ok(((u64::from(min) + offset) as u16).to_be())
}

/// The cursor of the destination in `reply_key`: its slot is a hash of the backend's
/// address, port and protocol and of the address the port is taken on (lowbias32's
/// mixing). Destinations that share a slot share its sequence.
#[inline(always)]
fn cursor_of(reply_key: &NatCtKey) -> Option<*mut u64> {
    let mut h = reply_key.saddr
        ^ reply_key.daddr.rotate_left(16)
        ^ (u32::from(reply_key.sport) << 8 | u32::from(reply_key.proto));
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    SNAT_CURSOR.get_ptr_mut(h & (SNAT_CURSORS - 1))
}

/// Where this search starts: the cursor's position, moved on by one. (Two CPUs that read
/// it at the same instant start at the same port; the claim is atomic, so one of them
/// moves on to the next. At the default CPU level, an atomic add cannot hand back the old
/// value.) A cursor nothing has drawn from yet is first set to a random place: the first
/// ports a node gives out are not the range's first ones on every node.
#[inline(always)]
fn draw(cursor: *mut u64) -> u64 {
    // SAFETY: an array value pointer, valid for this program run, 8-byte aligned; an
    // aligned 8-byte load is never torn.
    if unsafe { core::ptr::read_volatile(cursor) } == 0 {
        // SAFETY: a plain helper call; then as above.
        let seed = u64::from(unsafe { bpf_get_prandom_u32() }) + 1;
        unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(
                cursor, 0, seed,
            )
        };
    }
    // Read again rather than kept from the seeding: the verifier then meets one state
    // after both ways here, instead of walking the rest of the program once for each.
    // SAFETY: as above.
    let drawn = unsafe { core::ptr::read_volatile(cursor) };
    advance(cursor, 1);
    drawn
}

/// Moves the cursor on by `steps` ports: past the one drawn, or past those a search
/// skipped, so the next search does not walk them again.
#[inline(always)]
fn advance(cursor: *mut u64, steps: u32) {
    if steps != 0 {
        // SAFETY: as in `draw`. (The old value is not used: an add without fetch.)
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(cursor, u64::from(steps)) };
    }
}

/// What [`try_port`] found.
enum Try {
    /// The reply entry is in: the port is the new flow's.
    Taken,
    /// Another flow holds the port; `closed_for`: the seconds since its TCP flow closed if
    /// that is more than `CT_LIFETIME_CLOSING`, else 0.
    Held { closed_for: u32 },
}

/// Which held ports [`try_port`] may claim besides free and expired ones.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// One whose TCP flow closed more than `CT_LIFETIME_CLOSING` ago, unless its backend's
    /// TIME_WAIT turns the new flow's SYN away.
    Closed,
    /// One whose backend holds nothing that would turn the new flow's SYN away
    /// ([`Judged::Nothing`]): its TCP flow closed two seconds ago or more without the
    /// backend's TIME_WAIT (the client's FIN first, then the backend's), or the backend's
    /// TIME_WAIT takes the SYN.
    Reusable,
}

/// Claims the port in `reply_key` for the flow whose reply entry is `reply` and whose
/// first packet has the stamp `syn`: free, or held by a flow that expired, or one `claim`
/// allows.
#[inline(always)]
fn try_port(
    skb: *mut __sk_buff,
    reply_key: &NatCtKey,
    reply: &NatCtValue,
    now: u32,
    claim: Claim,
    syn: &mut Stamp,
) -> Try {
    // Looked up first: an LRU insert that fails still takes a free element and gives it
    // back under the LRU's locks, which costs more than the lookup, and when ports run
    // short most tries find theirs held.
    let holder = match NAT_CT.get_ptr_mut(reply_key) {
        Some(holder) => holder,
        None => {
            if NAT_CT
                .insert(reply_key, reply, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                return Try::Taken;
            }
            // Another CPU's flow took it meanwhile.
            match NAT_CT.get_ptr_mut(reply_key) {
                Some(holder) => holder,
                None => return Try::Held { closed_for: 0 },
            }
        }
    };
    // SAFETY: a map value pointer, valid for this program run; read at once.
    let held = unsafe { *holder };
    let age = seconds_since(held.last_seen, now);
    let closed_for = if held.flags & CT_FLAG_CLOSING != 0 && age > CT_LIFETIME_CLOSING {
        age
    } else {
        0
    };
    let free = held.expired(reply_key.proto, now)
        || match claim {
            Claim::Closed => {
                closed_for != 0
                    && time_wait::judge(skb, reply_key, &held, age, syn) != Judged::TurnsAway
            }
            Claim::Reusable => time_wait::judge(skb, reply_key, &held, age, syn) == Judged::Nothing,
        };
    // A held port is claimed by moving its stamp from the one seen to now in one
    // compare-and-swap: of two CPUs that found it free, one gets it and the other tries
    // another port (two plain overwrites would both succeed and two flows would share it).
    if free
        && restamp(holder, &held, now)
        && NAT_CT.insert(reply_key, reply, u64::from(BPF_ANY)).is_ok()
    {
        return Try::Taken;
    }
    Try::Held { closed_for }
}

/// Rewrites `pkt`'s addresses and ports to those of `entry`, checksums included (a later
/// fragment: addresses only; it has no ports, and the L4 checksum is in the first).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, entry: &NatCtValue) -> Result<(), RewriteError> {
    csum::set_tuple(
        ctx,
        pkt,
        (entry.saddr, entry.daddr, entry.sport, entry.dport),
    )
}
