//! North-south load balancing on the node's devices (Cilium's `lib/nodeport.h` model):
//! packets from outside the node to a NodePort on a node address, an externalIP or a
//! LoadBalancer ingress IP are DNATed to a backend, source-NATed to the node when that
//! backend is on another node, and their replies are translated back through `NAT_CT`.
//!
//! - `ekp_tcx_in` (TCX ingress): tracked flows first (the original direction of a flow, and
//!   replies from remote backends to the SNAT address); then new flows to a frontend of the
//!   external scope.
//! - `ekp_tcx_out` (TCX egress): replies of local backends to external clients, whose source
//!   goes back to the frontend. What `ekp_tcx_in` forwarded there itself is translated
//!   already and passes at once (`fib::take_forwarded`).
//!
//! Both pass at once what the prefilter (`ns_filter`) says no Service flow can use, and
//! translate ICMP errors about a tracked flow too (`icmp`), and the later fragments of a
//! datagram whose first fragment they translated (`fragments`).
//!
//! `ekp_pod_in` / `ekp_pod_out` are the same on pods' devices, for the host-namespace-only
//! socket LB: a pod's packets to frontends of the *internal* scope are DNATed (never
//! SNATed) as they leave the pod, and the backends' replies translated back as they enter
//! it.
//!
//! What is not a translatable packet (not IPv4, IP options, truncated headers, other
//! protocols, a later fragment of no datagram of ours) or not ours (no flow, no frontend)
//! passes unchanged with no verdict of its own (`PASS`): these programs never drop traffic
//! that is not addressed to a Service.

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use aya_ebpf::btf_maps::lpm_trie::Key;
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use proxy_common::{
    AFFINITY_CLIENT_ADDR, BACKEND_FLAG_LOCAL, BackendValue, CT_DIR_IN, CT_DIR_OUT, CT_FLAG_CLOSING,
    CT_FLAG_REPLY, CT_FLAG_SNAT, LOG_DROP_MAP_FULL, LOG_DROP_NO_FREE_PORT, LOG_EVENT_FLOW_DROPPED,
    LOG_EVENT_FLOW_NO_BACKEND, LOG_EVENT_NEW_FLOW, LOG_EVENT_OUTSIDE_SOURCE_RANGES,
    LOG_EVENT_SLOT_MISSING, LOG_EVENT_TOO_BIG, LOG_EVENT_UNDEFINED_PORT, LOG_HOOK_POD_IN,
    LOG_HOOK_TCX_IN, LOG_REFUSAL_DROPPED, LOG_REFUSAL_ICMP, LOG_REFUSAL_PASSED, NatCtValue,
    NodeConfig, PROTO_TCP, SCOPE_EXTERNAL, SCOPE_INTERNAL, SOURCE_RANGE_PREFIX_BASE,
    SVC_FLAG_DROP_EMPTY, SVC_FLAG_NODE_ADDRESS, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
    ServiceKey, SourceRangeKey, log_endpoint,
};

use crate::fib::{self, Route};
use crate::fragments;
use crate::icmp;
use crate::lb::{self, now_secs};
use crate::log::{log_debug, log_error};
use crate::maps::{CLUSTER_IPS, CONFIG, NAT_CT, SERVICES, SOURCE_RANGES};
use crate::nat::{self, CreateError};
use crate::ns_filter;
use crate::parse::{self, Packet};
use crate::time_wait;

/// "Not decided here": `TC_ACT_UNSPEC`, which TCX calls `TCX_NEXT`. The packet goes on to
/// the next program on the hook, then to the stack, exactly like a pass when ours is the
/// only one. `TC_ACT_OK` (`TCX_PASS`) would end the chain: a host firewall or a monitor
/// attached after these programs would never see the node's traffic.
const PASS: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT as i32;

#[classifier]
pub fn ekp_tcx_in(ctx: TcContext) -> i32 {
    match try_tcx_in::<SCOPE_EXTERNAL>(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[classifier]
pub fn ekp_tcx_out(ctx: TcContext) -> i32 {
    match try_tcx_out::<SCOPE_EXTERNAL>(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// `ekp_tcx_in` for pods' devices (host-namespace-only socket LB): what a pod sends is
/// looked up in the internal scope, like the socket programs would, and never source-NATed
/// (pod addresses are routable in the cluster).
#[classifier]
pub fn ekp_pod_in(ctx: TcContext) -> i32 {
    match try_tcx_in::<SCOPE_INTERNAL>(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// `ekp_tcx_out` for pods' devices: replies of backends to a pod get the frontend back.
#[classifier]
pub fn ekp_pod_out(ctx: TcContext) -> i32 {
    match try_tcx_out::<SCOPE_INTERNAL>(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_tcx_in<const SCOPE: u8>(ctx: &TcContext) -> Result<i32, i32> {
    let Some(pkt) = parse::ipv4_l4(ctx).and_then(fragments::with_ports) else {
        return Ok(icmp::translate_error(ctx, CT_DIR_IN, PASS, DROP).unwrap_or(PASS));
    };
    // Pods' devices carry Service traffic of every kind and are not filtered.
    if SCOPE == SCOPE_EXTERNAL && !ns_filter::admits_in(&pkt) {
        return Ok(PASS);
    }
    let now = now_secs();
    let key = nat::key_of(&pkt, CT_DIR_IN);
    if let Some(entry) = NAT_CT.get_ptr_mut(&key) {
        // SAFETY: copied out at once.
        let seen = unsafe { *entry };
        // An original-direction entry that expired, or whose backend is gone, is a new
        // flow; so is a closed one (RST, or both FINs) that a SYN reuses: the client
        // opened a new connection from the same port (the kernel's conntrack kills such an
        // entry and NAT runs again). A reply entry is followed as long as it exists (its
        // tuple names our SNAT port, nothing else can own it).
        let is_reply = seen.flags & CT_FLAG_REPLY != 0;
        let reopened = seen.flags & CT_FLAG_CLOSING != 0 && pkt.opens_connection();
        let followed = !reopened && !seen.expired(pkt.proto, now) && nat::backend_alive(&seen);
        if is_reply || followed {
            if nat::touch(&key, entry, &seen, &pkt, now) {
                time_wait::remember_fin(ctx, &pkt, &key, &seen);
                return translate::<SCOPE>(ctx, &pkt, &seen);
            }
            // Another flow holds its partner's key, and this entry is gone. A reply, to
            // the node's SNAT port, goes on untouched (the node resets it); a client's
            // packet is looked at as a new flow's (a SYN starts one).
            if is_reply {
                return Ok(PASS);
            }
        }
    }
    // A later fragment only follows its first fragment's flow: it has no L4 header to
    // start one with.
    if !pkt.has_l4_header() {
        return Ok(PASS);
    }
    new_flow::<SCOPE>(ctx, &pkt, now)
}

#[inline(always)]
fn try_tcx_out<const SCOPE: u8>(ctx: &TcContext) -> Result<i32, i32> {
    if fib::take_forwarded(ctx) {
        return Ok(PASS);
    }
    let Some(pkt) = parse::ipv4_l4(ctx).and_then(fragments::with_ports) else {
        return Ok(icmp::translate_error(ctx, CT_DIR_OUT, PASS, DROP).unwrap_or(PASS));
    };
    if SCOPE == SCOPE_EXTERNAL && !ns_filter::admits_out(&pkt) {
        return Ok(PASS);
    }
    let key = nat::key_of(&pkt, CT_DIR_OUT);
    let entry = NAT_CT.get_ptr_mut(&key).ok_or(PASS)?;
    // SAFETY: copied out at once.
    let seen = unsafe { *entry };
    // Another flow holds its partner's key: on untouched (see `nat::touch`).
    if !nat::touch(&key, entry, &seen, &pkt, now_secs()) {
        return Ok(PASS);
    }
    fragments::remember(&pkt);
    nat::rewrite(ctx, &pkt, &seen).map_err(|_| DROP)?;
    Ok(PASS)
}

/// Applies a flow's rewrite; a source-NATed packet is forwarded past the stack.
///
/// A BPF subprogram, not inlined: its stack (the route lookup's parameters, an ICMP
/// error's frame) then stays out of `try_tcx_in`'s, which the calls into
/// `lb::sticky_backend` and `nat::ekp_allocate_port` add to, all within the 512 bytes of
/// a call chain (inlined: 432 bytes for `try_tcx_in` alone). The verifier walks it once
/// for each state it is called in, a few.
#[inline(never)]
fn translate<const SCOPE: u8>(
    ctx: &TcContext,
    pkt: &Packet,
    entry: &NatCtValue,
) -> Result<i32, i32> {
    fragments::remember(pkt);
    if entry.flags & CT_FLAG_SNAT == 0 {
        nat::rewrite(ctx, pkt, entry).map_err(|_| DROP)?;
        return Ok(PASS);
    }
    // Routed before the rewrite, so that a packet too big for the way out, or whose TTL
    // ends here, is answered about as its sender sent it.
    let tuple = (entry.saddr, entry.daddr, entry.sport, entry.dport);
    let route = fib::route(ctx, pkt.proto, tuple, pkt.ttl);
    match route {
        Route::TooBig(mtu) => return Err(too_big::<SCOPE>(ctx, pkt, mtu)),
        Route::Expired => return Err(icmp::time_exceeded(ctx, pkt, DROP).unwrap_or(DROP)),
        _ => {}
    }
    nat::rewrite(ctx, pkt, entry).map_err(|_| DROP)?;
    let redirected = fib::send(ctx, &route).map_err(|_| DROP)?;
    Ok(redirected.unwrap_or(PASS))
}

/// A source-NATed packet larger than the next hop's MTU (an overlay's pod network, say,
/// behind a 1500-byte external one). The stack would drop it once rewritten (its source is
/// a node address, see `fib`) and a program cannot fragment it, so: with don't-fragment
/// set (path MTU discovery: TCP, QUIC), the sender gets "fragmentation needed" with the
/// MTU and sends smaller packets; without, it is dropped (kube-proxy's path, through the
/// stack, would fragment it).
#[inline(always)]
fn too_big<const SCOPE: u8>(ctx: &TcContext, pkt: &Packet, mtu: u16) -> i32 {
    log_debug!(
        LOG_EVENT_TOO_BIG,
        hook::<SCOPE>(),
        0,
        [
            source(pkt),
            destination(pkt),
            u64::from(mtu),
            u64::from(pkt.dont_fragment)
        ]
    );
    if !pkt.dont_fragment {
        return DROP;
    }
    icmp::too_big(ctx, pkt, mtu, DROP).unwrap_or(DROP)
}

/// A packet that belongs to no tracked flow: to a frontend of `SCOPE`, a new flow;
/// otherwise none of our business.
#[inline(always)]
fn new_flow<const SCOPE: u8>(ctx: &TcContext, pkt: &Packet, now: u32) -> Result<i32, i32> {
    let mut key = ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        slot: 0,
        proto: pkt.proto,
        scope: SCOPE,
        _pad: [0; 2],
    };
    let Some(frontend) = SERVICES.get_ptr(&key) else {
        return Err(undefined_port::<SCOPE>(ctx, pkt));
    };
    // SAFETY: copied out at once.
    let frontend = unsafe { *frontend };
    // A NodePort's (node address, port), or an externalIP's or LB IP's that is a node
    // address, is also a source the node's own connections and those masqueraded to its
    // address may take (masquerade draws from 1024-65535): their replies come here, and the
    // kernel's conntrack, behind these programs, takes them back. kube-proxy's rules see
    // only a connection's first packet (NEW), never those replies; so only a TCP
    // connection's first segment starts a flow here.
    if pkt.proto == PROTO_TCP
        && frontend.flags & (SVC_FLAG_NODE_PORT | SVC_FLAG_NODE_ADDRESS) != 0
        && !pkt.opens_connection()
    {
        return Ok(PASS);
    }
    // SAFETY: copied out at once.
    let config: Option<NodeConfig> = CONFIG.get_ptr(0).map(|c| unsafe { *c });
    if frontend.count == 0 {
        let verdict = refuse(ctx, pkt, frontend.flags, config.as_ref());
        log_debug!(
            LOG_EVENT_FLOW_NO_BACKEND,
            hook::<SCOPE>(),
            0,
            [
                source(pkt),
                destination(pkt),
                match verdict {
                    DROP => LOG_REFUSAL_DROPPED,
                    PASS => LOG_REFUSAL_PASSED,
                    _ => LOG_REFUSAL_ICMP,
                }
            ]
        );
        return Err(verdict);
    }
    if frontend.flags & SVC_FLAG_SOURCE_RANGES != 0 && !source_allowed(pkt, frontend.rev_nat_id) {
        log_debug!(
            LOG_EVENT_OUTSIDE_SOURCE_RANGES,
            hook::<SCOPE>(),
            0,
            [source(pkt), destination(pkt)]
        );
        return Err(DROP);
    }
    let client = || u64::from(pkt.saddr) | AFFINITY_CLIENT_ADDR;
    let selected = lb::select_backend(client, &mut key, &frontend);
    let Some((backend_id, backend)) = selected.and_then(|id| lb::backend_ptr(id).map(|b| (id, b)))
    else {
        log_error!(
            LOG_EVENT_SLOT_MISSING,
            hook::<SCOPE>(),
            lb::slot_backend_id(&key),
            [
                destination(pkt),
                u64::from(key.slot),
                u64::from(frontend.count),
            ]
        );
        return Err(PASS);
    };
    // SAFETY: copied out at once.
    let backend: BackendValue = unsafe { *backend };

    // A backend on another node is reached with the node's address as source, so that its
    // replies come back here to be translated (C08). `Local` frontends only have local
    // backends and keep the client's address (C10); so does `Cluster` traffic to a local
    // backend (see docs/decisions.md). A pod that reaches itself through its Service
    // (hairpin, C07, on pods' devices) would receive a packet from its own address, which
    // its stack drops: it gets the Service address as source instead.
    let hairpin = SCOPE == SCOPE_INTERNAL && backend.addr == pkt.saddr;
    let snat = hairpin || (SCOPE == SCOPE_EXTERNAL && backend.flags & BACKEND_FLAG_LOCAL == 0);
    let snat_addr = match config {
        _ if hairpin => Some(pkt.daddr),
        Some(c) if snat && c.snat_addr != 0 => Some(c.snat_addr),
        // Needs SNAT but the agent has not configured an address: not translatable yet.
        _ if snat => return Ok(PASS),
        _ => None,
    };
    // The node's SNAT ports if north-south is configured (the array's entry is zero
    // otherwise), else the default range.
    let ports = config.unwrap_or_default().snat_ports();
    let mut forward = NatCtValue {
        saddr: snat_addr.unwrap_or(pkt.saddr),
        daddr: backend.addr,
        // A SNAT port is chosen by `nat::create`.
        sport: if snat { 0 } else { pkt.sport },
        dport: backend.port,
        backend_id,
        rev_nat_id: frontend.rev_nat_id,
        flags: if snat { CT_FLAG_SNAT } else { 0 },
        last_seen: now,
    };
    let ct_key = nat::key_of(pkt, CT_DIR_IN);
    let opens = pkt.proto == PROTO_TCP && pkt.opens_connection();
    // No free source port (or no room in the map): drop this packet of a new flow; the
    // client retransmits.
    if let Err(e) = nat::create(ctx, &ct_key, &mut forward, ports, now, opens) {
        log_error!(
            LOG_EVENT_FLOW_DROPPED,
            hook::<SCOPE>(),
            0,
            [
                source(pkt),
                destination(pkt),
                match e {
                    CreateError::NoFreePort => LOG_DROP_NO_FREE_PORT,
                    CreateError::MapFull => LOG_DROP_MAP_FULL,
                }
            ]
        );
        return Err(DROP);
    }
    if snat && SCOPE == SCOPE_EXTERNAL {
        ns_filter::mark_snat(forward.saddr, forward.sport);
    }
    log_debug!(
        LOG_EVENT_NEW_FLOW,
        hook::<SCOPE>(),
        backend_id,
        [
            source(pkt),
            destination(pkt),
            log_endpoint(forward.saddr, forward.sport, pkt.proto),
            log_endpoint(forward.daddr, forward.dport, pkt.proto),
        ]
    );
    translate::<SCOPE>(ctx, pkt, &forward)
}

/// The program a log record of `try_tcx_in::<SCOPE>` comes from.
#[inline(always)]
const fn hook<const SCOPE: u8>() -> u8 {
    if SCOPE == SCOPE_INTERNAL {
        LOG_HOOK_POD_IN
    } else {
        LOG_HOOK_TCX_IN
    }
}

/// A packet's source (the client of a new flow), as log records carry it.
#[inline(always)]
fn source(pkt: &Packet) -> u64 {
    log_endpoint(pkt.saddr, pkt.sport, pkt.proto)
}

/// A packet's destination (the frontend of a new flow), as log records carry it.
#[inline(always)]
fn destination(pkt: &Packet) -> u64 {
    log_endpoint(pkt.daddr, pkt.dport, pkt.proto)
}

/// Whether the client is inside one of the frontend's `loadBalancerSourceRanges` (C22):
/// the longest-prefix match of (rev-NAT id, client address) finds an entry.
#[inline(always)]
fn source_allowed(pkt: &Packet, rev_nat_id: u16) -> bool {
    let key = Key::new(
        SOURCE_RANGE_PREFIX_BASE + 32,
        SourceRangeKey {
            rev_nat_id,
            _pad: [0; 2],
            addr: pkt.saddr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// A packet no frontend takes. On a pod's device, one to a ClusterIP on a port or
/// protocol its Service does not define is refused with ICMP port unreachable, as the
/// socket programs refuse it (`sock::undefined_port`) and kube-proxy's nftables mode
/// rejects it; anything else passes. On the node's devices such a packet comes from
/// outside (`--external-clusterip`) and is passed, not looked up: the prefilter sends most
/// of it on before this point anyway, and a lookup here would cost the rest.
#[inline(always)]
fn undefined_port<const SCOPE: u8>(ctx: &TcContext, pkt: &Packet) -> i32 {
    if SCOPE != SCOPE_INTERNAL || CLUSTER_IPS.get_ptr(&pkt.daddr).is_none() {
        return PASS;
    }
    log_debug!(
        LOG_EVENT_UNDEFINED_PORT,
        hook::<SCOPE>(),
        0,
        [destination(pkt), 0]
    );
    icmp::reject(ctx, pkt, DROP).unwrap_or(DROP)
}

/// A frontend without usable backends. `SVC_FLAG_DROP_EMPTY` (a `Local` policy with no
/// endpoint on this node, C12): drop, as kube-proxy does. Otherwise the client must be
/// refused at once (C06), as kube-proxy's REJECT does. A packet to one of this node's own
/// addresses gets that from the kernel when it is passed on unchanged, since nothing
/// listens on a NodePort (TCP RST / ICMP port unreachable). An externalIP or LB IP the node
/// does not own would instead be forwarded (or looped) by the stack, so the program
/// answers it with ICMP port unreachable itself (`icmp::reject`).
#[inline(always)]
fn refuse(ctx: &TcContext, pkt: &Packet, flags: u16, config: Option<&NodeConfig>) -> i32 {
    if flags & SVC_FLAG_DROP_EMPTY != 0 {
        return DROP;
    }
    // NodePort frontends exist only on the node's NodePort addresses (translate builds
    // them from the node's own addresses); another frontend may sit on the SNAT address.
    let node_address = flags & SVC_FLAG_NODE_PORT != 0
        || config.is_some_and(|c| c.snat_addr != 0 && c.snat_addr == pkt.daddr);
    if node_address {
        return PASS;
    }
    icmp::reject(ctx, pkt, DROP).unwrap_or(DROP)
}
