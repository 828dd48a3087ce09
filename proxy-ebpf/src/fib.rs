//! Forwarding a rewritten packet past the stack (Cilium's `lib/fib.h`).
//!
//! A source-NATed packet carries one of this node's addresses as its source (the SNAT
//! address towards the backend, the frontend towards the client when the frontend is a
//! node address), yet arrives on an ingress hook: handed to the stack, the routing code
//! would drop it as a martian source (`fib_validate_source`: a local source on input,
//! unless `accept_local`). So these packets are routed here with `bpf_fib_lookup` and
//! redirected to the egress of the device it names, TTL decremented as a router does.
//! When the lookup cannot give a next hop (forwarding disabled, no route, a local
//! destination) the packet goes to the stack as it is, which then does whatever it would
//! do (an ICMP error, or the martian drop). A packet whose TTL ends here, or larger than
//! the egress MTU, is the caller's to answer (`Route::Expired`, `Route::TooBig`): the
//! stack would drop it as a martian too, without telling its sender. The lookup checks the
//! size only when it found the next hop's MAC; towards one not resolved yet,
//! `bpf_check_mtu` does. Neither looks into a GSO packet (merged segments, from GRO or a
//! local sender's TSO) unless asked (`BPF_MTU_CHK_SEGS`): its segments must each fit the
//! egress MTU, as the kernel's own forwarding checks (`ip_exceeds_mtu`), or they are
//! dropped further on unanswered.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::bpf_check_mtu_flags::BPF_MTU_CHK_SEGS;
use aya_ebpf::bindings::bpf_check_mtu_ret::{
    BPF_MTU_CHK_RET_FRAG_NEEDED, BPF_MTU_CHK_RET_SEGS_TOOBIG,
};
use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    bpf_fib_lookup, bpf_redir_neigh,
};
use aya_ebpf::helpers::generated::{
    bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_vlan_pop,
};
use aya_ebpf::programs::TcContext;

use crate::csum::{self, RewriteError};
use crate::parse::{ETH_DST_OFF, ETH_HLEN, ETH_SRC_OFF};

const AF_INET: u8 = 2;
const VLAN_HLEN: u32 = 4;

/// The bit of `skb->tc_index` that marks a packet an ingress program sends to a device's
/// egress itself ([`send`], and `icmp`'s answers): translated already, it passes the egress
/// program at once ([`take_forwarded`]), where its conntrack lookup could only miss (the
/// egress entries are those of local backends' replies, which come from the stack). Cilium
/// passes such facts between its programs in `tc_index` bits too (`TC_INDEX_F_*`, the low
/// bits); this one is the highest of the field's 16.
const TC_INDEX_FORWARDED: u32 = 0x8000;

/// Marks the packet in `ctx` as forwarded by this program ([`TC_INDEX_FORWARDED`]).
#[inline(always)]
pub fn mark_forwarded(ctx: &TcContext) {
    // SAFETY: the context is a valid __sk_buff, whose tc_index a tc program may write.
    unsafe { (*ctx.skb.skb).tc_index |= TC_INDEX_FORWARDED };
}

/// Whether an ingress program forwarded the packet in `ctx` ([`mark_forwarded`]); the mark
/// is removed, so that it goes no further than the egress program it is meant for.
#[inline(always)]
pub fn take_forwarded(ctx: &TcContext) -> bool {
    // SAFETY: as in `mark_forwarded`.
    let tc_index = unsafe { (*ctx.skb.skb).tc_index };
    if tc_index & TC_INDEX_FORWARDED == 0 {
        return false;
    }
    // SAFETY: as in `mark_forwarded`.
    unsafe { (*ctx.skb.skb).tc_index = tc_index & !TC_INDEX_FORWARDED };
    true
}

/// Where [`route`] found a packet should go. (What the lookup found is kept, not the
/// lookup's 64 bytes: the caller holds it across the rewrite, on a 512-byte stack.)
pub enum Route {
    /// Out of device `ifindex`, from `smac` to the next hop's `dmac`.
    Resolved {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Out of device `ifindex`, once the kernel has resolved the next hop `nh`.
    Unresolved { ifindex: u32, nh: u32 },
    /// Larger than the egress device's MTU (this value), or, for a GSO packet, one of its
    /// segments is.
    TooBig(u16),
    /// Routed, but its TTL ends here: no router forwards it (`ip_forward` checks the TTL
    /// before the MTU, and so does `route`).
    Expired,
    /// To the stack as it is: no route, forwarding disabled, or a local destination (the
    /// stack then sends its own ICMP error, or drops).
    Stack,
}

/// Looks up where a packet with this tuple (network order) and TTL goes. It depends on
/// the tuple, the TTL and the packet's length only, so it may run before the rewrite: a
/// packet the caller answers is then still as its sender sent it.
#[inline(always)]
pub fn route(ctx: &TcContext, proto: u8, tuple: (u32, u32, u16, u16), ttl: u8) -> Route {
    match lookup(ctx, proto, tuple) {
        Route::Stack => Route::Stack,
        _ if ttl <= 1 => Route::Expired,
        routed => routed,
    }
}

/// [`route`] but for the TTL.
#[inline(always)]
fn lookup(ctx: &TcContext, proto: u8, (saddr, daddr, sport, dport): (u32, u32, u16, u16)) -> Route {
    let mut lookup = MaybeUninit::<bpf_fib_lookup>::uninit();
    let params = lookup.as_mut_ptr();
    // SAFETY: `params` points to this function's own, properly aligned `bpf_fib_lookup`,
    // zeroed before anything reads it (all-zero is a valid one: plain integers and unions
    // of them); the helper gets its size.
    let rc = unsafe {
        zero(params);
        (*params).family = AF_INET;
        (*params).l4_protocol = proto;
        (*params).sport = sport;
        (*params).dport = dport;
        // tot_len 0: the kernel checks the skb's length against the egress MTU itself
        // (a GSO packet's passes whole: see `too_big_for`).
        (*params).__bindgen_anon_3.ipv4_src = saddr;
        (*params).__bindgen_anon_4.ipv4_dst = daddr;
        (*params).ifindex = (*ctx.skb.skb).ifindex;
        fib_lookup(ctx.as_ptr(), params, size_of::<bpf_fib_lookup>() as i32, 0)
    };
    // SAFETY: zeroed and filled above.
    let params = unsafe { &*params };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // The lookup checked the whole packet's length, which passes any GSO packet.
            // SAFETY: the context is a valid __sk_buff.
            if unsafe { (*ctx.skb.skb).gso_size } != 0
                && let Some(mtu) = too_big_for(ctx, params.ifindex)
            {
                return Route::TooBig(mtu);
            }
            Route::Resolved {
                ifindex: params.ifindex,
                smac: params.smac,
                dmac: params.dmac,
            }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // The kernel checks the size only once the next hop's MAC is known.
            if let Some(mtu) = too_big_for(ctx, params.ifindex) {
                return Route::TooBig(mtu);
            }
            Route::Unresolved {
                ifindex: params.ifindex,
                // SAFETY: the lookup left the next hop in the IPv4 member.
                nh: unsafe { params.__bindgen_anon_4.ipv4_dst },
            }
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // SAFETY: the lookup wrote the union's output member.
            let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
            // The kernel also says so for a device that is down (`is_skb_forwardable`), and
            // for a GSO packet only then: it passes the length check whole.
            // SAFETY: the context is a valid __sk_buff.
            let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
            if !gso && exceeds(ctx, u32::from(mtu)) {
                Route::TooBig(mtu)
            } else {
                Route::Stack
            }
        }
        _ => Route::Stack,
    }
}

/// Zeroes `*params` in place with sixteen 4-byte stores. (`mem::zeroed`, and any store
/// of zeros LLVM can see through, becomes a memset, which the BPF target leaves to a call
/// of compiler-builtins' byte loop: 64 turns for every source-NATed packet.)
///
/// # Safety
///
/// `params` must point to a writable `bpf_fib_lookup`.
#[inline(always)]
unsafe fn zero(params: *mut bpf_fib_lookup) {
    const WORDS: usize = size_of::<bpf_fib_lookup>() / 4;
    const _: () = assert!(WORDS * 4 == size_of::<bpf_fib_lookup>());
    let first = params.cast::<u32>();
    for i in 0..WORDS {
        // SAFETY: within `*params`, whose alignment is 4. Volatile: not folded into a
        // memset again.
        unsafe { core::ptr::write_volatile(first.add(i), 0) };
    }
}

/// The MTU of device `ifindex` if the packet, or one of its segments if it is a GSO
/// packet, does not fit it.
#[inline(always)]
fn too_big_for(ctx: &TcContext, ifindex: u32) -> Option<u16> {
    let mut mtu = 0u32;
    // SAFETY: `mtu` lives on the stack; a plain helper call on this program's skb. (An
    // error, such as a GSO packet whose transport header the kernel has not set, is no
    // answer: the packet goes on as before.)
    let rc = unsafe {
        bpf_check_mtu(
            ctx.as_ptr(),
            ifindex,
            &mut mtu,
            0,
            u64::from(BPF_MTU_CHK_SEGS),
        )
    };
    let too_big = (rc == i64::from(BPF_MTU_CHK_RET_FRAG_NEEDED) && exceeds(ctx, mtu))
        || rc == i64::from(BPF_MTU_CHK_RET_SEGS_TOOBIG);
    too_big.then_some(mtu as u16)
}

/// Whether the packet is larger than `mtu` allows, its Ethernet header and a VLAN tag
/// beside, as the kernel counts for a forwarded packet (`is_skb_forwardable`).
#[inline(always)]
fn exceeds(ctx: &TcContext, mtu: u32) -> bool {
    ctx.len() > mtu + ETH_HLEN as u32 + VLAN_HLEN
}

/// Sends the already rewritten packet where `route` says, TTL decremented as a router does:
/// `Ok(Some(verdict))`; `Ok(None)` hands it to the stack instead.
#[inline(always)]
pub fn send(ctx: &TcContext, route: &Route) -> Result<Option<i32>, RewriteError> {
    match route {
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } => {
            csum::decrement_ttl(ctx)?;
            ctx.store(ETH_DST_OFF, dmac, 0)?;
            ctx.store(ETH_SRC_OFF, smac, 0)?;
            untag(ctx);
            mark_forwarded(ctx);
            // SAFETY: a plain helper call; returns TC_ACT_REDIRECT.
            Ok(Some(unsafe { bpf_redirect(*ifindex, 0) } as i32))
        }
        Route::Unresolved {
            ifindex,
            nh: next_hop,
        } => {
            // A route but no neighbour entry yet: let the kernel resolve the next hop and
            // fill in the Ethernet header.
            csum::decrement_ttl(ctx)?;
            // SAFETY: all-zero is a valid bpf_redir_neigh.
            let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            nh.nh_family = u32::from(AF_INET);
            nh.__bindgen_anon_1.ipv4_nh = *next_hop;
            untag(ctx);
            mark_forwarded(ctx);
            // SAFETY: nh lives on the stack and has the size passed.
            Ok(Some(unsafe {
                bpf_redirect_neigh(*ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0)
            } as i32))
        }
        Route::TooBig(_) | Route::Expired | Route::Stack => Ok(None),
    }
}

/// Drops the VLAN tag a forwarded packet came in with. The kernel moves a received frame's
/// tag into the skb before tc runs, so a packet of a VLAN device's network arrives at the
/// parent device's program looking untagged, and a redirect keeps the tag: it would leave
/// the egress device on that VLAN. Routed, it leaves as the route says (a VLAN device
/// adds its own tag). Packet pointers are void after it; nothing reads the packet since.
#[inline(always)]
fn untag(ctx: &TcContext) {
    // SAFETY: the context is a valid __sk_buff; `vlan_present` is readable by tc programs,
    // and the helper takes the skb.
    unsafe {
        if (*ctx.skb.skb).vlan_present != 0 {
            bpf_skb_vlan_pop(ctx.skb.skb);
        }
    }
}
