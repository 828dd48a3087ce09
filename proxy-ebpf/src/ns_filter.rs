//! The north-south prefilter (`proxy_common::NsFilter`): most of what crosses the node's
//! devices is not Service traffic, and without it each such packet pays `ekp_tcx_in` a
//! conntrack miss and a frontend miss (`ekp_tcx_out` a conntrack miss), hash lookups in
//! maps too large to stay in the caches. One bit per (address, port) that a Service flow can
//! use, in an array the verifier indexes directly, sends the rest on at once.

use core::intrinsics::{AtomicOrdering, atomic_or};

use proxy_common::{NS_FILTER_IN, NS_FILTER_OUT, NS_FILTER_SNAT, NsFilter, ns_filter_bit};

use crate::maps::NS_FILTER;
use crate::parse::Packet;

/// Whether `pkt`, arriving on a node's device, may belong to a north-south flow: its
/// destination is an external-scope frontend's (address, port) (a new flow, or the original
/// direction of a tracked one), or the SNAT (address, port) of a flow these programs
/// source-NATed (its reply, [`mark_snat`]). An unarmed filter admits everything.
#[inline(always)]
pub fn admits_in(pkt: &Packet) -> bool {
    if admits(NS_FILTER_IN, pkt.daddr, pkt.dport) {
        return true;
    }
    // SAFETY: a pointer to an entry of an array map, valid for the program's run; one word
    // of it is read in place (the entry is 8 KiB).
    NS_FILTER
        .get_ptr(NS_FILTER_SNAT)
        .is_some_and(|marks| unsafe { &*marks }.has(pkt.daddr, pkt.dport))
}

/// Whether `pkt`, leaving by a node's device, may be the reply of a north-south flow to a
/// local backend: its source is a local backend's (address, port).
#[inline(always)]
pub fn admits_out(pkt: &Packet) -> bool {
    admits(NS_FILTER_OUT, pkt.saddr, pkt.sport)
}

/// Marks the SNAT (address, port) of a new source-NATed flow, before its first packet goes
/// out, so that the replies to it are admitted whatever the SNAT address and range are by
/// then. Atomic: two CPUs marking ports of one word at once both land.
#[inline(always)]
pub fn mark_snat(addr: u32, port: u16) {
    let Some(marks) = NS_FILTER.get_ptr_mut(NS_FILTER_SNAT) else {
        return;
    };
    let (word, mask) = ns_filter_bit(addr, port);
    // SAFETY: a pointer to an entry of an array map, valid for the program's run, and an
    // aligned word within it (map values start 8-byte aligned, `bits` at offset 8, `word`
    // below `NS_FILTER_WORDS`); only the address is computed before the atomic update.
    unsafe {
        let word = (&raw mut (*marks).bits).cast::<u64>().add(word);
        atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(word, mask);
    }
}

#[inline(always)]
fn admits(entry: u32, addr: u32, port: u16) -> bool {
    let Some(filter) = NS_FILTER.get_ptr(entry) else {
        return true;
    };
    // SAFETY: a pointer to an entry of an array map, valid for the program's run; `armed`
    // and one word of the bits are read in place (the entry is 8 KiB).
    let filter: &NsFilter = unsafe { &*filter };
    filter.armed == 0 || filter.has(addr, port)
}
