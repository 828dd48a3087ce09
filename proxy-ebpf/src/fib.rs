//! Forwarding a rewritten packet past the stack (Cilium's `lib/fib.h`).
//!
//! A source-NATed packet carries one of this node's addresses as its source (the SNAT
//! address towards the backend, the frontend towards the client when the frontend is a
//! node address), yet arrives on an ingress hook: handed to the stack, the routing code
//! would drop it as a martian source (`fib_validate_source`: a local source on input,
//! unless `accept_local`). So these packets are routed here with `bpf_fib_lookup` and
//! redirected to the egress of the device it names, TTL decremented as a router does.
//! When the lookup cannot give a next hop (forwarding disabled, no route, a local
//! destination, MTU exceeded, TTL expiring) the packet goes to the stack as it is, which
//! then does whatever it would do (an ICMP error, or the martian drop).

use core::mem::size_of;

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, bpf_redir_neigh,
};
use aya_ebpf::helpers::generated::{
    bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh,
};
use aya_ebpf::programs::TcContext;

use crate::csum::{self, RewriteError};
use crate::parse::{ETH_DST_OFF, ETH_SRC_OFF};

const AF_INET: u8 = 2;

/// Redirects the already rewritten packet (new tuple in `saddr`..`dport`, network order)
/// towards its destination: `Ok(Some(verdict))`; `Ok(None)` hands it to the stack instead.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn redirect(
    ctx: &TcContext,
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    ttl: u8,
) -> Result<Option<i32>, RewriteError> {
    if ttl <= 1 {
        // The stack sends the ICMP time exceeded.
        return Ok(None);
    }
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.sport = sport;
    params.dport = dport;
    // tot_len 0: the kernel checks the skb against the egress MTU itself (GSO-aware).
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: the context is a valid __sk_buff.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: params lives on the stack and has the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        csum::decrement_ttl(ctx)?;
        ctx.store(ETH_DST_OFF, &params.dmac, 0)?;
        ctx.store(ETH_SRC_OFF, &params.smac, 0)?;
        // SAFETY: a plain helper call; returns TC_ACT_REDIRECT.
        return Ok(Some(unsafe { bpf_redirect(params.ifindex, 0) } as i32));
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // A route but no neighbour entry yet: let the kernel resolve the next hop (which
        // the lookup left in ipv4_dst) and fill in the Ethernet header.
        csum::decrement_ttl(ctx)?;
        // SAFETY: as above.
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = u32::from(AF_INET);
        nh.__bindgen_anon_1.ipv4_nh = unsafe { params.__bindgen_anon_4.ipv4_dst };
        // SAFETY: nh lives on the stack and has the size passed.
        return Ok(Some(unsafe {
            bpf_redirect_neigh(
                params.ifindex,
                &mut nh,
                size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        } as i32));
    }
    Ok(None)
}
