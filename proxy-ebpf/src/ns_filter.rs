//! The north-south prefilter (`proxy_common::NsFilter`): most of what crosses the node's
//! devices is not Service traffic, and without it each such packet pays `ekp_tcx_in` a
//! conntrack miss and a frontend miss (`ekp_tcx_out` a conntrack miss), hash lookups in
//! maps too large to stay in the caches. One bit per (address, port) that a Service flow can
//! use, in an array the verifier indexes directly, sends the rest on at once.

use proxy_common::{NS_FILTER_IN, NS_FILTER_OUT, NsFilter};

use crate::maps::{CONFIG, NS_FILTER};
use crate::parse::Packet;

/// Whether `pkt`, arriving on a node's device, may belong to a north-south flow: its
/// destination is an external-scope frontend's (address, port) (a new flow, or the original
/// direction of a tracked one), or a port of the SNAT range at the SNAT address (the reply
/// of a flow source-NATed to a remote backend: the range `nodeport` takes its ports from).
/// An unarmed filter admits everything.
#[inline(always)]
pub fn admits_in(pkt: &Packet) -> bool {
    if admits(NS_FILTER_IN, pkt.daddr, pkt.dport) {
        return true;
    }
    // SAFETY: copied out at once.
    let Some(config) = CONFIG.get_ptr(0).map(|c| unsafe { *c }) else {
        return false;
    };
    let (min, max) = config.snat_ports();
    let port = u16::from_be(pkt.dport);
    config.snat_addr != 0 && config.snat_addr == pkt.daddr && port >= min && port <= max
}

/// Whether `pkt`, leaving by a node's device, may be the reply of a north-south flow to a
/// local backend: its source is a local backend's (address, port).
#[inline(always)]
pub fn admits_out(pkt: &Packet) -> bool {
    admits(NS_FILTER_OUT, pkt.saddr, pkt.sport)
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
