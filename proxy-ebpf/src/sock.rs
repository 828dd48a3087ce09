//! Socket-level load balancing (Cilium's `bpf_sock.c` model).
//!
//! `connect4` (TCP, connected UDP) and `sendmsg4` (unconnected UDP) replace a frontend
//! address with a backend address before the kernel routes anything, and remember the
//! translation per socket; `recvmsg4` and `getpeername4` show the application the frontend
//! again. Lookups use the internal scope: these are processes on the node or in its pods.
//! In host-namespace-only mode (`SockConfig`) only the node's own namespace is translated
//! here; pods' packets are translated on their devices (`nodeport`'s pod programs).
//! NodePorts on loopback addresses are served here alone, to the node's own namespace.
//! A socket's translation goes to its slot in the slot table (`sock_slot`) when the slot is
//! free or already its own, else to the socket rev-NAT LRU (a slot held by another socket,
//! or an unconnected UDP socket's second backend).
//! The slot also pins a UDP socket to its backend: its next datagrams (unconnected) or
//! connects to the same frontend go there while the frontend has it (`lb::pinned_backend`);
//! the pins of the other frontends the socket sends to, or all of them when another socket
//! holds its slot, go to the socket's own storage (`sock_state`), which also marks the
//! sockets that have translations in the LRU: the reverse hooks look only those up there.
//! `sock_release` drops a closing socket's reverse entry, so that both hold the live
//! sockets' entries instead of evicting them behind closed ones.
//!
//! An `AF_INET6` socket reaches IPv4 through IPv4-mapped addresses (`::ffff:a.b.c.d`): Java's
//! and .NET's dual-stack sockets connect to a ClusterIP that way. The kernel runs the IPv6
//! hooks for them (`connect6`, `recvmsg6`, `getpeername6`), which translate the mapped
//! address as the IPv4 ones translate theirs; an unconnected send goes through `udp_sendmsg`
//! and its `sendmsg4` hook already. Real IPv6 addresses are left alone.

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval};
use aya_ebpf::macros::{cgroup_sock, cgroup_sock_addr};
use aya_ebpf::programs::{SockAddrContext, SockContext};
use proxy_common::{
    ECONNREFUSED, EHOSTUNREACH, LOG_EVENT_SLOT_MISSING, LOG_EVENT_SOCK_NO_BACKEND,
    LOG_EVENT_SOCK_TRANSLATED, LOG_EVENT_UNDEFINED_PORT, LOG_HOOK_CONNECT4, LOG_HOOK_CONNECT6,
    LOG_HOOK_SENDMSG4, LOOPBACK_FRONTEND_ADDR, PROTO_TCP, PROTO_UDP, SCOPE_INTERNAL,
    SOCK_FLAG_HOST_ONLY, SOCK_FLAG_LOOPBACK_EXACT, SVC_FLAG_DROP_EMPTY, SVC_FLAG_NODE_PORT,
    ServiceKey, SockRevNatKey, SockRevNatValue, is_loopback, log_endpoint,
};

use crate::log::{log_debug, log_error};
use crate::maps::{CLUSTER_IPS, REV_NAT, SERVICES, SOCK_CONFIG, SOCK_REV_NAT};
use crate::sock_slot::{Pin, Remembered};
use crate::{lb, sock_slot, sock_state};

/// sock_addr verdicts: 1 lets the call proceed; 0 fails it (EPERM unless a retval is set).
const PROCEED: i32 = 1;
const FAIL: i32 = 0;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as read from memory.
const V4_MAPPED: u32 = 0xffff_u32.to_be();

#[cgroup_sock_addr(connect4)]
pub fn ekp_connect4(ctx: SockAddrContext) -> i32 {
    match translate_forward::<false, false>(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ekp_sendmsg4(ctx: SockAddrContext) -> i32 {
    match translate_forward::<true, false>(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ekp_recvmsg4(ctx: SockAddrContext) -> i32 {
    translate_reverse::<false>(&ctx);
    // recvmsg hooks may only return 1.
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn ekp_getpeer4(ctx: SockAddrContext) -> i32 {
    translate_reverse::<false>(&ctx);
    // getpeername hooks may only return 1.
    PROCEED
}

/// `connect` of an `AF_INET6` socket (TCP, or UDP connected) to an IPv4-mapped address.
#[cgroup_sock_addr(connect6)]
pub fn ekp_connect6(ctx: SockAddrContext) -> i32 {
    match translate_forward::<false, true>(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// `recvmsg` of an `AF_INET6` UDP socket: a datagram from an IPv4 backend.
#[cgroup_sock_addr(recvmsg6)]
pub fn ekp_recvmsg6(ctx: SockAddrContext) -> i32 {
    translate_reverse::<true>(&ctx);
    PROCEED
}

/// `getpeername` of an `AF_INET6` socket connected to an IPv4-mapped address.
#[cgroup_sock_addr(getpeername6)]
pub fn ekp_getpeer6(ctx: SockAddrContext) -> i32 {
    translate_reverse::<true>(&ctx);
    PROCEED
}

/// The IPv4 address in the context: `user_ip4` in the IPv4 hooks; in the IPv6 ones, the
/// last word of an IPv4-mapped address, `None` for any other IPv6 address. Network order.
#[inline(always)]
fn user_addr<const V6: bool>(sa: *mut bpf_sock_addr) -> Option<u32> {
    // SAFETY: the kernel hands every sock_addr program a valid context; the IPv4 hooks may
    // read `user_ip4`, the IPv6 ones `user_ip6`.
    unsafe {
        if V6 {
            let ip6 = (*sa).user_ip6;
            (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED).then_some(ip6[3])
        } else {
            Some((*sa).user_ip4)
        }
    }
}

/// Writes `addr` (network order) where [`user_addr`] read it; a mapped address keeps its
/// `::ffff:` prefix.
#[inline(always)]
fn set_user_addr<const V6: bool>(sa: *mut bpf_sock_addr, addr: u32) {
    // SAFETY: every hook that calls this may write the address fields of its family.
    unsafe {
        if V6 {
            (*sa).user_ip6[3] = addr;
        } else {
            (*sa).user_ip4 = addr;
        }
    }
}

/// A socket is closing: its reverse entry, if `translate_forward` wrote one, goes with it.
///
/// A held slot would send every later socket with the same low cookie bits to the LRU. Left
/// to the LRU, closed sockets' entries would fill the map, and a live connection's entry
/// would be evicted once enough newer connections came (its `getpeername` would then show
/// the backend). Freed here, both hold the live sockets.
///
/// It runs at the close of every IPv4 TCP and UDP socket in the cgroup, also those never
/// translated: a read of the slot of a cookie just handed out (a cached line), and, for a
/// connected socket, an LRU lookup that finds nothing. The slot goes by cookie alone, so it
/// is freed also after a disconnect (`connect(AF_UNSPEC)`, or the C27 worker destroying a
/// UDP socket, which clears its peer) and for unconnected sockets. LRU entries need the
/// current peer: those of an unconnected UDP socket (`sendmsg4`, one per backend beyond
/// the slot's) and of a disconnected socket that fell back to the LRU are left to its
/// eviction.
#[cgroup_sock(sock_release)]
pub fn ekp_sock_release(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: the kernel hands every cgroup sock program a valid socket; these fields are
    // readable at sock_release.
    let (family, proto, addr, port) =
        unsafe { ((*sk).family, (*sk).protocol, (*sk).dst_ip4, (*sk).dst_port) };
    // An `AF_INET6` socket holds a slot if it reached a frontend through an IPv4-mapped
    // address; its `dst_ip4` is then the IPv4 peer.
    let inet = family == AF_INET || family == AF_INET6;
    if inet && (proto == u32::from(PROTO_TCP) || proto == u32::from(PROTO_UDP)) {
        // SAFETY: bpf_get_socket_cookie accepts a cgroup sock context.
        let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
        // Only a marked socket has entries in the LRU (`sock_state`): not the connections
        // a server accepted.
        if !sock_slot::forget(cookie) && addr != 0 && sock_state::released_in_lru(sk) {
            let key = SockRevNatKey {
                cookie,
                addr,
                port,
                _pad: [0; 2],
            };
            let _ = SOCK_REV_NAT.remove(&key);
        }
    }
    // sock_release hooks may only return 1.
    PROCEED
}

/// A destination no frontend takes: a ClusterIP on a port or protocol its Service does not
/// define is refused, as kube-proxy's nftables mode rejects it (its `cluster-ips` set),
/// rather than sent off the node to an address nothing serves; anything else proceeds.
/// A BPF subprogram: inlined, LLVM's reuse of registers across the frontend's lookup made
/// code the verifier refused.
#[inline(never)]
fn undefined_port(hook: u8, addr: u32, port: u16, proto: u8) -> i32 {
    if CLUSTER_IPS.get_ptr(&addr).is_none() {
        return PROCEED;
    }
    // SAFETY: bpf_set_retval is allowed in sock_addr programs.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    log_debug!(
        LOG_EVENT_UNDEFINED_PORT,
        hook,
        0,
        [log_endpoint(addr, port, proto), ECONNREFUSED as u64]
    );
    FAIL
}

/// Frontend -> backend. A ClusterIP's undefined port is refused (`undefined_port`);
/// anything else that is not a known frontend proceeds untouched.
///
/// `SENDMSG`: the `sendmsg4` hook (unconnected UDP: a datagram may move a socket's pin);
/// `V6`: the `connect6` hook, whose IPv4 address is a mapped one.
#[inline(always)]
fn translate_forward<const SENDMSG: bool, const V6: bool>(
    ctx: &SockAddrContext,
) -> Result<i32, i32> {
    let hook = match (SENDMSG, V6) {
        (true, _) => LOG_HOOK_SENDMSG4,
        (false, false) => LOG_HOOK_CONNECT4,
        (false, true) => LOG_HOOK_CONNECT6,
    };
    let sa = ctx.sock_addr;
    // 0.0.0.0 is the node's loopback to the kernel (`ip_route_output` takes 127.0.0.1 for
    // it before any hook sees a packet): kube-proxy's DNAT finds a localhost NodePort
    // there, and the socket's peer is 127.0.0.1.
    let addr = match user_addr::<V6>(sa).ok_or(PROCEED)? {
        0 => LOOPBACK_FRONTEND_ADDR,
        addr => addr,
    };
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let (proto, port) = unsafe { ((*sa).protocol, (*sa).user_port) };
    let proto = proto as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(PROCEED);
    }
    // SAFETY: copied out at once.
    let config = SOCK_CONFIG
        .get_ptr(0)
        .map(|c| unsafe { *c })
        .unwrap_or_default();
    // SAFETY: bpf_get_netns_cookie accepts a sock_addr context.
    let in_host_netns =
        || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == config.host_netns_cookie;
    // A loopback address is served (a NodePort there, a LoadBalancer IP on loopback) to the
    // node's own processes only: a pod's 127.0.0.1 is its own, as kube-proxy's DNAT on the
    // node's OUTPUT chain never sees it.
    let loopback = is_loopback(addr);
    if (loopback || config.flags & SOCK_FLAG_HOST_ONLY != 0) && !in_host_netns() {
        return Ok(PROCEED);
    }
    // user_port holds the network-order port in its low 16 bits.
    let port = port as u16;
    let mut key = ServiceKey {
        addr,
        port,
        slot: 0,
        proto,
        scope: SCOPE_INTERNAL,
        _pad: [0; 2],
    };
    // SAFETY: map value pointers, copied out at once. (The copy may be of another key's
    // entry if the agent's updates reuse the element meanwhile: docs/decisions.md.)
    let frontend = match SERVICES.get_ptr(&key) {
        Some(f) => unsafe { *f },
        // Every loopback address reaches the NodePorts kept at 127.0.0.1, as kube-proxy's
        // `--dst-type LOCAL` match takes all of 127.0.0.0/8 (unless its
        // `--nodeport-addresses` CIDRs name the addresses); nothing else found there.
        None if loopback && config.flags & SOCK_FLAG_LOOPBACK_EXACT == 0 => {
            key.addr = LOOPBACK_FRONTEND_ADDR;
            let found = unsafe { *SERVICES.get_ptr(&key).ok_or(PROCEED)? };
            if found.flags & SVC_FLAG_NODE_PORT == 0 {
                return Err(PROCEED);
            }
            found
        }
        None => return Err(undefined_port(hook, addr, port, proto)),
    };
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_value = SockRevNatValue {
        addr,
        port,
        rev_nat_id: frontend.rev_nat_id,
    };
    // An unconnected UDP socket's datagrams to a frontend keep going to the backend its
    // earlier ones went to, while the frontend still has it: kube-proxy's conntrack keeps a
    // UDP flow (a socket's source port) on its backend, and a protocol with state across
    // datagrams (QUIC, SIP) needs one server. So does a UDP socket that connects again to
    // the same frontend. With session affinity too: affinity chooses a new flow's backend
    // (the socket's first datagram), the flow keeps it, also while it lingers (its affinity
    // entries gone) and past the affinity timeout, as the conntrack entry outlives both.
    // The socket's slot holds the pin of one frontend; its storage those of the others.
    let pinning = proto == PROTO_UDP;
    let slot_pin = if pinning {
        sock_slot::pinned(cookie, rev_value)
    } else {
        None
    };
    let stored_pin = if pinning && slot_pin.is_none() {
        sock_state::pinned(ctx, rev_value)
    } else {
        None
    };
    let pin = slot_pin.or(stored_pin);
    let kept = pin.and_then(|p| lb::pinned_backend(&mut key, &frontend, p.addr, p.port, p.slot));
    // kube-proxy REJECTs a Service without usable endpoints, and DROPs traffic whose
    // `Local` policy finds none on this node; both see new flows only, so a socket whose
    // backend lingers keeps it.
    if frontend.count == 0 && kept.is_none() {
        let errno = if frontend.flags & SVC_FLAG_DROP_EMPTY != 0 {
            EHOSTUNREACH
        } else {
            ECONNREFUSED
        };
        unsafe { bpf_set_retval(-errno) };
        log_debug!(
            LOG_EVENT_SOCK_NO_BACKEND,
            hook,
            0,
            [log_endpoint(addr, port, proto), errno as u64]
        );
        return Err(FAIL);
    }
    // The affinity client is the socket's network namespace: one per pod, hence one per
    // pod IP, which is what kube-proxy's ClientIP keys on.
    // SAFETY: bpf_get_netns_cookie accepts a sock_addr context.
    let client = || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The agent writes slots before raising `count`, so a missing slot is a transient race:
    // proceed untranslated rather than fail the call.
    let selected = match kept {
        Some((id, _)) => Some(id),
        None => lb::select_backend(client, &mut key, &frontend),
    };
    let chosen = kept.or_else(|| selected.and_then(|id| lb::backend(id).map(|b| (id, b))));
    let Some((backend_id, backend)) = chosen else {
        log_error!(
            LOG_EVENT_SLOT_MISSING,
            hook,
            lb::slot_backend_id(&key),
            [
                log_endpoint(addr, port, proto),
                u64::from(key.slot),
                u64::from(frontend.count),
            ]
        );
        return Err(PROCEED);
    };
    let rev_key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 2],
    };
    // A pinned backend that left the frontend: the socket's slot takes the new one if it
    // held the old (the old translation goes to the LRU, for replies still on their way).
    // One found in another slot is written again with its new slot.
    let repin = pin.is_some() && kept.is_none();
    let moved = pin.is_some_and(|p| p.slot != key.slot);
    // (A connected socket hears from its new peer only.)
    if let Some(p) = pin.filter(|_| SENDMSG && repin) {
        let old = SockRevNatKey {
            cookie,
            addr: p.addr,
            port: p.port,
            _pad: [0; 2],
        };
        sock_state::mark_in_lru(ctx);
        let _ = SOCK_REV_NAT.insert(&old, &rev_value, 0);
    }
    // The socket's slot if it is free or already the socket's own for this backend (any
    // backend, once connected: it talks to no other). A socket that keeps sending to a
    // Service finds what an earlier datagram left there or in the LRU: a lookup, which
    // also marks an LRU entry used, leaves the LRU's locks and lists alone.
    let remembered = if SENDMSG
        && !moved
        && sock_slot::recall(cookie, backend.addr, backend.port) == Some(rev_value)
    {
        Remembered::Held
    } else {
        sock_slot::remember(
            cookie,
            backend.addr,
            backend.port,
            key.slot,
            rev_value,
            !SENDMSG || (repin && slot_pin.is_some()),
        )
    };
    let in_slot = !matches!(remembered, Remembered::Refused);
    if !in_slot {
        // The reverse hooks look only marked sockets up in the LRU. (Marked again when the
        // entry is there already: the agent may have adopted it from a version that did not
        // mark.)
        sock_state::mark_in_lru(ctx);
        // SAFETY: copied out at once.
        let known = SENDMSG
            && SOCK_REV_NAT
                .get_ptr(&rev_key)
                .is_some_and(|v| unsafe { *v } == rev_value);
        if !known {
            // If the LRU cannot take the entry the connection still works; only the reverse
            // view (getpeername, recvfrom's source) shows the backend.
            let _ = SOCK_REV_NAT.insert(&rev_key, &rev_value, 0);
        }
    }
    // (Only UDP sockets have pins to keep.)
    if let Remembered::Displaced(other, other_pin) = remembered
        && proto == PROTO_UDP
    {
        sock_state::remember_pin(ctx, other, other_pin);
    }
    // A pin the slot does not hold goes to the socket's storage, unless it is there as is.
    let stored_as_is = stored_pin.is_some() && kept.is_some() && !moved;
    if pinning && !in_slot && !stored_as_is {
        sock_state::remember_pin(
            ctx,
            rev_value,
            Pin {
                addr: backend.addr,
                port: backend.port,
                slot: key.slot,
            },
        );
    }

    set_user_addr::<V6>(sa, backend.addr);
    // SAFETY: the port is writable in connect4/6 and sendmsg4.
    unsafe { (*sa).user_port = u32::from(backend.port) };
    log_debug!(
        LOG_EVENT_SOCK_TRANSLATED,
        hook,
        backend_id,
        [
            log_endpoint(addr, port, proto),
            log_endpoint(backend.addr, backend.port, proto),
        ]
    );
    Ok(PROCEED)
}

/// Backend -> frontend, for sockets that `translate_forward` rewrote.
#[inline(always)]
fn translate_reverse<const V6: bool>(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let Some(addr) = user_addr::<V6>(sa) else {
        return;
    };
    let key = SockRevNatKey {
        // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr,
        // SAFETY: valid context; the port is readable in every reverse hook.
        port: unsafe { (*sa).user_port } as u16,
        _pad: [0; 2],
    };
    // Only while the frontend still exists: a deleted Service's old translation must not
    // keep relabelling traffic. The socket may have reached a loopback NodePort, kept at
    // 127.0.0.1, at any address of 127.0.0.0/8 (`translate_forward`). A dead one is left
    // where it is, for `sock_release` to free: the agent's closing of connected UDP
    // sockets of departed backends finds the socket's translation there.
    // (An entry of the array that holds no frontend has address 0, which matches none.)
    let live = |entry: &SockRevNatValue| {
        // SAFETY: copied out at once.
        REV_NAT
            .get_ptr(u32::from(entry.rev_nat_id))
            .map(|f| unsafe { *f })
            .is_some_and(|f| {
                f.port == entry.port
                    && (f.addr == entry.addr
                        || (f.addr == LOOPBACK_FRONTEND_ADDR && is_loopback(entry.addr)))
            })
    };
    // The socket's slot first: `translate_forward` writes the LRU only when the slot was
    // not available. Then the LRU, for a socket that wrote there (`sock_state`): not for
    // the sockets that never had a translation, every server among them. A dead
    // translation in the slot does not hide a live one in the LRU.
    let slotted = sock_slot::recall(key.cookie, key.addr, key.port).filter(|e| live(e));
    let Some(entry) = slotted.or_else(|| {
        // SAFETY: copied out at once.
        sock_state::in_lru(ctx)
            .then(|| SOCK_REV_NAT.get_ptr(&key).map(|e| unsafe { *e }))
            .flatten()
            .filter(|e| live(e))
    }) else {
        return;
    };
    set_user_addr::<V6>(sa, entry.addr);
    // SAFETY: the port is writable in every reverse hook.
    unsafe { (*sa).user_port = u32::from(entry.port) };
}
