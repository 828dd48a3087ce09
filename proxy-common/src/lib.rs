//! The kernel/userspace ABI of ebpf-kube-proxy.
//!
//! Every struct that crosses the boundary lives here, `#[repr(C)]` with explicit padding and
//! a size assertion, so that the eBPF programs and the agent can never disagree on a layout.
//! The byte order of each field is stated in its doc comment: addresses and ports are kept
//! in network order (as the kernel hands them to the socket hooks), everything else in host
//! order. The model is Cilium's `lb4_key` / `lb4_service` / `lb4_backend` (`bpf/lib/lb.h`):
//! a Service is a set of entries in one hash map, slot 0 describing the frontend and slots
//! `1..=count` naming backends by id.
//!
//! Map names carry the `ekp_` prefix and a version suffix (`_v1`, `_v2`): an incompatible
//! layout change raises it, so that it gets new maps (and new pins) instead of misreading
//! old ones. The kernel cuts object names at
//! 15 characters, so they stay short.
#![no_std]

/// IANA protocol numbers as stored in keys and values.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Lookup scope of a frontend (Cilium's `LB_LOOKUP_SCOPE_EXT` / `_INT`): which of a
/// Service's two endpoint views a lookup wants. Traffic arriving from outside the node uses
/// the external view; processes on the node and pods (the socket programs) use the internal
/// view.
pub const SCOPE_EXTERNAL: u8 = 0;
pub const SCOPE_INTERNAL: u8 = 1;

/// Frontend flags (slot 0 `flags`): the kind of address.
pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 0;
pub const SVC_FLAG_NODE_PORT: u16 = 1 << 1;
pub const SVC_FLAG_EXTERNAL_IP: u16 = 1 << 2;
pub const SVC_FLAG_LOAD_BALANCER: u16 = 1 << 3;
/// sessionAffinity ClientIP: a client keeps its backend while it reconnects within
/// slot 0's `affinity_timeout`.
pub const SVC_FLAG_AFFINITY: u16 = 1 << 4;
/// With `count == 0`: the Service has endpoints, but none this traffic may use (a `Local`
/// traffic policy and none on this node): drop, as kube-proxy does, instead of refusing.
pub const SVC_FLAG_DROP_EMPTY: u16 = 1 << 5;
/// `loadBalancerSourceRanges` (external scope, LB IPs only): a new flow is admitted only if
/// its client address matches an entry of `ekp_srcrange_v1` under this frontend's rev-NAT
/// id; others are dropped, as kube-proxy's firewall chain does.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 6;
/// The frontend's address is one of this node's own (an externalIP or LoadBalancer IP the
/// Node object lists; a NodePort's always is, `SVC_FLAG_NODE_PORT`): the node's own connections
/// and those masqueraded to it take source ports from it, so replies to them reach the
/// frontend, and only a TCP connection's first segment may start a flow there.
pub const SVC_FLAG_NODE_ADDRESS: u16 = 1 << 7;

/// Backend flags (`BackendValue::flags`).
///
/// The endpoint runs on this node (its EndpointSlice `nodeName` is this node's name). The
/// north-south programs source-NAT traffic they send to a backend *without* this bit (a pod
/// on another node) so that its replies come back through this node (C08), and leave the
/// client address alone for a local one. `externalTrafficPolicy: Local` frontends only ever
/// have local backends (translate guarantees it), so they never SNAT (C10). The agent sets
/// the bit from the endpoint's `nodeName` (translate's `DesiredState::local_backends`).
pub const BACKEND_FLAG_LOCAL: u8 = 1 << 0;

/// errno the socket programs hand back for a Service without usable backends; kube-proxy
/// REJECTs such traffic, which a client sees as ECONNREFUSED.
pub const ECONNREFUSED: i32 = 111;
/// errno for traffic kube-proxy would DROP (`SVC_FLAG_DROP_EMPTY`). A socket hook cannot
/// drop a packet that was never sent; failing the call with "no route to host" (as Cilium's
/// socket LB does) is the closest a client can see without hanging, and is not a refusal.
pub const EHOSTUNREACH: i32 = 113;

/// Map names (also the pin file names under `<pin dir>/maps/`).
pub const MAP_SERVICES: &str = "ekp_svc_v1";
/// Arrays indexed by id (`_v2`; the hash maps of `_v1` are copied over at an upgrade).
pub const MAP_BACKENDS: &str = "ekp_backend_v2";
pub const MAP_REV_NAT: &str = "ekp_revnat_v2";
pub const MAP_SOCK_REV_NAT: &str = "ekp_sk_rnat_v1";
pub const MAP_SOCK_SLOTS: &str = "ekp_sk_slot_v1";
pub const MAP_SOCK_STATE: &str = "ekp_sk_state_v1";
pub const MAP_AFFINITY: &str = "ekp_affinity_v1";
pub const MAP_NAT_CT: &str = "ekp_nat_ct_v1";
pub const MAP_CONFIG: &str = "ekp_config_v1";
pub const MAP_LOG: &str = "ekp_log_v1";
pub const MAP_SOURCE_RANGES: &str = "ekp_srcrange_v1";
/// `_v2`: the node's namespace cookie always, the host-only mode a flag (`SockConfig`).
pub const MAP_SOCK_CONFIG: &str = "ekp_sockcfg_v2";
pub const MAP_FRAGMENTS: &str = "ekp_frag_v1";
pub const MAP_SNAT_CURSORS: &str = "ekp_snat_cur_v1";
pub const MAP_SNAT_TIME_WAIT: &str = "ekp_snat_tw_v1";
pub const MAP_NS_FILTER: &str = "ekp_nsfilt_v1";
/// The ClusterIPs of the Services served (key: the address, network order; value: 1),
/// whose other ports and protocols are refused (`CLUSTER_IPS_MAX`).
pub const MAP_CLUSTER_IPS: &str = "ekp_cip_v1";
/// The hash maps `MAP_BACKENDS` and `MAP_REV_NAT` replaced: same keys (the id) and values.
/// An agent that finds them pinned copies them into the arrays and unpins them.
pub const MAP_BACKENDS_V1: &str = "ekp_backend_v1";
pub const MAP_REV_NAT_V1: &str = "ekp_revnat_v1";
/// The socket config array `MAP_SOCK_CONFIG` replaced (the cookie alone, 0 when not
/// host-only). It holds nothing to keep: an agent that finds it pinned unpins it.
pub const MAP_SOCK_CONFIG_V1: &str = "ekp_sockcfg_v1";
/// The sockets' storage `MAP_SOCK_STATE` had this name before it held flags beside the
/// pins. No program of this version reads it: an agent that finds it pinned unpins it
/// (its sockets choose a backend again once, for Services beyond the one in their slot).
pub const MAP_SOCK_PINS_V1: &str = "ekp_sk_pin_v1";
/// The programs' log records (`LogRecord`): a ring buffer per loaded object, read by the
/// agent that loaded it, never pinned (so not in `ALL_MAPS`).
pub const MAP_LOG_RECORDS: &str = "ekp_logbuf_v1";

/// Every map the agent pins, for adoption and cleanup.
pub const ALL_MAPS: [&str; 17] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_REV_NAT,
    MAP_SOCK_REV_NAT,
    MAP_SOCK_SLOTS,
    MAP_SOCK_STATE,
    MAP_AFFINITY,
    MAP_NAT_CT,
    MAP_CONFIG,
    MAP_LOG,
    MAP_SOURCE_RANGES,
    MAP_SOCK_CONFIG,
    MAP_FRAGMENTS,
    MAP_SNAT_CURSORS,
    MAP_SNAT_TIME_WAIT,
    MAP_NS_FILTER,
    MAP_CLUSTER_IPS,
];

/// eBPF log levels (`LogConfig::level`): what the programs write to their log ring buffer.
/// Each level includes the ones below it. Off is the default (a zeroed map entry): the
/// programs then only pay one array lookup per log point.
pub const LOG_LEVEL_OFF: u8 = 0;
/// Errors and unusual events: a slot or backend missing under a lookup (a writer race),
/// no free SNAT port for a new north-south flow.
pub const LOG_LEVEL_ERROR: u8 = 1;
/// Per connection / per new flow: frontend hits with the chosen backend, refusals, drops.
pub const LOG_LEVEL_DEBUG: u8 = 2;

/// Bytes of the log ring buffer: 2730 records (40 bytes and the kernel's 8-byte header
/// each) for the agent to read before new ones are dropped.
pub const LOG_RECORDS_BYTES: u32 = 128 * 1024;

// What a log record reports (`LogRecord::event`); the agent words it (`dataplane::logs`).
// The arguments are `LogRecord::args` in order; an endpoint is `log_endpoint`'s.

/// A socket hook found a frontend without a usable backend and failed the call:
/// [frontend, errno].
pub const LOG_EVENT_SOCK_NO_BACKEND: u8 = 1;
/// A slot or the backend it names was missing under a lookup (a writer race), the
/// connection or flow left untranslated: [frontend, slot, count]; the backend id the slot
/// named (0: no slot).
pub const LOG_EVENT_SLOT_MISSING: u8 = 2;
/// A socket was translated: [frontend, backend]; the backend id.
pub const LOG_EVENT_SOCK_TRANSLATED: u8 = 3;
/// A source-NATed packet was larger than the next hop's MTU: [its source, its destination
/// (as it arrived), MTU, 1 if it carried don't-fragment (answered with ICMP), 0 if not
/// (dropped)].
pub const LOG_EVENT_TOO_BIG: u8 = 4;
/// A new flow to a frontend without a usable backend: [client, frontend, `LOG_REFUSAL_*`].
pub const LOG_EVENT_FLOW_NO_BACKEND: u8 = 5;
/// A new flow from outside the frontend's loadBalancerSourceRanges, dropped:
/// [client, frontend].
pub const LOG_EVENT_OUTSIDE_SOURCE_RANGES: u8 = 6;
/// A new flow dropped for want of a conntrack entry: [client, frontend, `LOG_DROP_*`].
pub const LOG_EVENT_FLOW_DROPPED: u8 = 7;
/// A new flow translated: [client, frontend, new source, new destination]; the backend id.
pub const LOG_EVENT_NEW_FLOW: u8 = 8;
/// A connection or datagram to a ClusterIP on a port or protocol its Service does not
/// define, refused: [destination, errno (0 on a pod's device: answered with ICMP)].
pub const LOG_EVENT_UNDEFINED_PORT: u8 = 9;

/// `LOG_EVENT_FLOW_NO_BACKEND`'s verdicts.
pub const LOG_REFUSAL_DROPPED: u64 = 0;
pub const LOG_REFUSAL_PASSED: u64 = 1;
pub const LOG_REFUSAL_ICMP: u64 = 2;
/// `LOG_EVENT_FLOW_DROPPED`'s causes.
pub const LOG_DROP_NO_FREE_PORT: u64 = 0;
pub const LOG_DROP_MAP_FULL: u64 = 1;

/// The program that wrote a log record (`LogRecord::hook`).
pub const LOG_HOOK_CONNECT4: u8 = 1;
pub const LOG_HOOK_SENDMSG4: u8 = 2;
pub const LOG_HOOK_CONNECT6: u8 = 3;
pub const LOG_HOOK_TCX_IN: u8 = 4;
pub const LOG_HOOK_POD_IN: u8 = 5;

/// Arguments a log record carries (besides the backend id).
pub const LOG_RECORD_ARGS: usize = 4;

/// One entry of the log ring buffer (`MAP_LOG_RECORDS`). The programs write numbers only,
/// in a fixed layout, and the agent turns them into the message: a record costs the
/// verifier a few stores, where a formatted one (aya-log's) cost it thousands of
/// instructions per log point.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LogRecord {
    /// `LOG_EVENT_*`.
    pub event: u8,
    /// `LOG_LEVEL_ERROR` or `LOG_LEVEL_DEBUG`.
    pub level: u8,
    /// `LOG_HOOK_*`.
    pub hook: u8,
    pub _pad: u8,
    /// The backend the event names, if any.
    pub backend_id: u32,
    pub args: [u64; LOG_RECORD_ARGS],
}

/// An address and port (network order, as the programs hold them) and a protocol, packed
/// into one log argument.
#[inline(always)]
pub const fn log_endpoint(addr: u32, port: u16, proto: u8) -> u64 {
    addr as u64 | (port as u64) << 32 | (proto as u64) << 48
}

/// Default capacities (max_entries). The agent can override them at load time.
pub const DEFAULT_SERVICES_MAX: u32 = 65536;
pub const DEFAULT_BACKENDS_MAX: u32 = 65536;
pub const DEFAULT_REV_NAT_MAX: u32 = 65536;
pub const DEFAULT_SOCK_REV_NAT_MAX: u32 = 262144;
/// Slots of the sockets' reverse table (`ekp_sk_slot_v1`): a power of two, since
/// a socket's slot is its cookie's low bits. Fixed: the programs mask with it.
pub const SOCK_SLOTS: u32 = 262144;
pub const DEFAULT_AFFINITY_MAX: u32 = 65536;
/// Two entries per north-south flow (one per direction).
pub const DEFAULT_NAT_CT_MAX: u32 = 262144;
/// One entry per (frontend, source range) of LB IPs with `loadBalancerSourceRanges`.
pub const DEFAULT_SOURCE_RANGES_MAX: u32 = 16384;
/// One entry per fragmented datagram in flight through the north-south programs (Cilium's
/// default for its fragments map).
pub const FRAGMENTS_MAX: u32 = 8192;
/// Room for every ClusterIP in `MAP_CLUSTER_IPS`: each has a frontend, and frontends have
/// 16-bit rev-NAT ids. Fixed; the map is not preallocated, so only the entries in use
/// take memory.
pub const CLUSTER_IPS_MAX: u32 = 65536;

/// Which TCX program looks a north-south conntrack entry up (`NatCtKey::dir`): the one on
/// the node's devices' ingress, or the one on their egress.
pub const CT_DIR_IN: u8 = 0;
pub const CT_DIR_OUT: u8 = 1;

/// Conntrack entry flags (`NatCtValue::flags`).
///
/// The entry translates the reply direction of a flow (backend -> client); without it, the
/// entry translates the original direction (client -> frontend).
pub const CT_FLAG_REPLY: u16 = 1 << 0;
/// The flow is source-NATed to the node's address (a remote backend behind an
/// `externalTrafficPolicy: Cluster` frontend); both of its entries are looked up at ingress.
pub const CT_FLAG_SNAT: u16 = 1 << 1;
/// A reply was seen: the backend answered (TCP: the connection got past the handshake: a
/// segment without SYN from the backend, or from the client after the backend's SYN-ACK,
/// as Linux's conntrack calls a connection established at the client's ACK).
pub const CT_FLAG_SEEN_REPLY: u16 = 1 << 2;
/// The TCP flow is closing: a RST was seen, or a FIN in each direction
/// (`CT_FLAG_FIN_CLIENT` and `CT_FLAG_FIN_BACKEND`). Its entries then live
/// `CT_LIFETIME_CLOSING` (source-NATed: `CT_LIFETIME_SNAT_CLOSING`).
pub const CT_FLAG_CLOSING: u16 = 1 << 3;
/// The client sent a FIN. Alone it leaves a half-closed connection, whose other side may
/// still answer for as long as it needs (a request sent, then `shutdown(SHUT_WR)`): the flow
/// keeps its lifetime until the backend's FIN too.
pub const CT_FLAG_FIN_CLIENT: u16 = 1 << 4;
/// The backend sent a FIN (see `CT_FLAG_FIN_CLIENT`).
pub const CT_FLAG_FIN_BACKEND: u16 = 1 << 5;
/// The backend's FIN came before any from the client: the backend closed first, so it is
/// the side that holds the connection in TIME_WAIT afterwards (see
/// `CT_LIFETIME_SNAT_CLOSING`). Of two FINs that cross, the one seen first decides, and two
/// seen at the same instant on two CPUs both count as first: the backend's then sets it.
pub const CT_FLAG_FIN_BACKEND_FIRST: u16 = 1 << 6;
/// Flipped by every claim of an entry for a new flow, with its stamp, in one
/// compare-and-swap: the swap then changes the entry's word also within the second of the
/// stamp it read, so that of two CPUs claiming the entry at that moment only one succeeds.
/// The new flow's insert replaces the whole entry right after.
pub const CT_FLAG_CLAIM: u16 = 1 << 7;
/// The backend answered a TCP flow's SYN (its SYN-ACK), and the handshake is not over: the
/// flow keeps `CT_LIFETIME_TCP_SYN` until a segment without SYN follows. A SYN-ACK alone
/// does not establish a flow: a flood of SYNs from spoofed addresses, which the backend
/// answers and nobody acknowledges, must not hold SNAT ports and conntrack room for hours.
pub const CT_FLAG_BACKEND_SYN: u16 = 1 << 8;

/// Idle lifetimes of a conntrack entry in seconds (Cilium's defaults): after this long
/// without a packet, a new packet with the same tuple starts a new flow (a new backend) and
/// the SNAT port of the flow may be given to another one.
pub const CT_LIFETIME_TCP: u32 = 21600;
/// A TCP flow whose backend has not answered yet (a SYN flood must not hold ports for hours).
pub const CT_LIFETIME_TCP_SYN: u32 = 60;
/// UDP.
pub const CT_LIFETIME_NONTCP: u32 = 60;
/// A TCP flow that saw a RST, or a FIN from each side.
pub const CT_LIFETIME_CLOSING: u32 = 10;
/// Such a flow when source-NATed and closed by the backend first (`CT_FLAG_FIN_BACKEND_FIRST`):
/// its SNAT port is kept for as long as the backend holds the connection in TIME_WAIT
/// (Linux: 60 s, fixed). (A client that closes first keeps the TIME_WAIT itself, on its own
/// tuple; a RST leaves none.) Given to a new flow before, the port
/// leads that flow's SYN into the old socket, which turns it away if its TCP timestamp is
/// older than the last one the socket saw (PAWS): the two come from different clients, or
/// from connections with timestamp offsets of their own, and are unrelated. The client
/// then waits for a retransmission timeout (1 s). The programs give such a port out
/// earlier to a SYN the TIME_WAIT takes (by its record, `SnatTimeWait`), and else only
/// when no try finds a free one, not before `CT_LIFETIME_CLOSING` and not to a SYN its
/// record shows to be turned away.
pub const CT_LIFETIME_SNAT_CLOSING: u32 = 60;

/// Default SNAT source-port range (inclusive): above Linux's default ephemeral range
/// (`net.ipv4.ip_local_port_range` = 32768-60999) and above the NodePort range
/// (30000-32767), so a translated flow never takes a port the host's own connections or a
/// NodePort could use.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 61000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 65535;
/// How many consecutive ports the SNAT allocator tries before it gives up on a new flow
/// (the packet is dropped; the client retransmits).
pub const SNAT_PORT_RETRIES: u32 = 16;
/// Entries of the SNAT port cursors (`ekp_snat_cur_v1`): where the next search for a
/// destination's SNAT port starts, one cursor per hash of the destination. A power of two:
/// the programs mask the hash with it.
pub const SNAT_CURSORS: u32 = 16384;
/// Entries of the SNAT TIME_WAIT records (`ekp_snat_tw_v1`, LRU): one per source-NATed
/// connection its backend closed first, needed for the minute its TIME_WAIT lasts (about
/// a thousand such connections a second).
pub const SNAT_TIME_WAIT_MAX: u32 = 65536;
/// `SnatTimeWait::flags`: the client's FIN carried a TCP timestamp, so the backend's
/// TIME_WAIT socket checks a new SYN's timestamp against it (PAWS).
pub const TIME_WAIT_FLAG_TIMESTAMP: u16 = 1;

/// Key of the services map: one frontend (slot 0) or one of its backend slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network order.
    pub addr: u32,
    /// Frontend port, network order.
    pub port: u16,
    /// 0 for the frontend entry, `1..=count` for backend slots. Host order.
    pub slot: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `SCOPE_EXTERNAL` or `SCOPE_INTERNAL`.
    pub scope: u8,
    pub _pad: [u8; 2],
}

/// Value of the services map. Slot 0 fills `count`, `rev_nat_id`, `flags`; a backend slot
/// fills `backend_id` (and repeats `rev_nat_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Backend slot: id in the backends map. Slot 0: unused (0). Host order.
    pub backend_id: u32,
    /// Slot 0: number of backend slots; 0 means the Service has no usable backend and
    /// connections are refused. Host order.
    pub count: u16,
    /// Id in the rev-NAT map (the frontend to show the application). Host order.
    pub rev_nat_id: u16,
    /// Slot 0: `SVC_FLAG_*` bits. Host order.
    pub flags: u16,
    /// Slot 0 with `SVC_FLAG_AFFINITY`: the id the session-affinity entries are kept under,
    /// the rev-NAT id of the Service port's ClusterIP frontend, which every frontend of the
    /// port shares: a client keeps its endpoint whichever address of the Service it uses,
    /// as with kube-proxy's per-endpoint `recent` lists. 0 (written before this field
    /// existed): the frontend's own rev-NAT id. Host order.
    pub affinity_id: u16,
    /// Slot 0 with `SVC_FLAG_AFFINITY`: the sessionAffinity timeout in seconds. Host order.
    pub affinity_timeout: u32,
}

/// Value of the backends array (index: backend id, `u32`, host order; ids start at 1). An
/// entry whose `addr` is 0 holds no backend: never written, or deleted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendValue {
    /// Backend IPv4 address, network order.
    pub addr: u32,
    /// Backend port, network order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `BACKEND_FLAG_*` bits.
    pub flags: u8,
}

/// Value of the rev-NAT array (index: rev-NAT id, a `u16` as `u32`, host order; ids start
/// at 1): the frontend that a translated socket's application must keep seeing. An entry
/// whose `addr` is 0 holds no frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue {
    /// Frontend IPv4 address, network order.
    pub addr: u32,
    /// Frontend port, network order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Key of the socket rev-NAT LRU map, written by `connect4`/`sendmsg4`, read by
/// `recvmsg4`/`getpeername4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// Socket cookie (`bpf_get_socket_cookie`). Host order.
    pub cookie: u64,
    /// Backend IPv4 address the socket talks to, network order.
    pub addr: u32,
    /// Backend port, network order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Value of the socket rev-NAT LRU map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    /// Frontend IPv4 address, network order.
    pub addr: u32,
    /// Frontend port, network order.
    pub port: u16,
    /// The rev-NAT id that was current at translation time; a reply is only rewritten while
    /// the rev-NAT map still holds this id with the same frontend. Host order.
    pub rev_nat_id: u16,
}

/// How many frontends' pins a socket keeps in `ekp_sk_state_v1`, besides the one its slot in
/// `ekp_sk_slot_v1` holds.
pub const SOCK_PINS_PER_SOCKET: usize = 4;

/// One pin of a UDP socket: the backend its datagrams to a frontend go to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockPin {
    /// The frontend the application sends to, as in the socket rev-NAT LRU's values.
    pub frontend: SockRevNatValue,
    /// Backend IPv4 address, network order.
    pub backend_addr: u32,
    /// Backend port, network order.
    pub backend_port: u16,
    /// The frontend slot (`1..=count`) the backend was chosen from; 0: an unused entry.
    /// Host order.
    pub backend_slot: u16,
}

/// Value of the sockets' own storage (`ekp_sk_state_v1`, socket-local storage, freed with
/// the socket), created only for a socket that needs it: the pins of a UDP socket that
/// talks to more frontends than its slot holds, or whose slot another socket holds; and
/// whether the socket has translations in the socket rev-NAT LRU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockState {
    pub pins: [SockPin; SOCK_PINS_PER_SOCKET],
    /// The entry a new frontend's pin replaces when all are used (taken in turn).
    pub next: u8,
    /// `SOCK_STATE_*` bits.
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// `SockState::flags`: the socket wrote a translation to the socket rev-NAT LRU, so the
/// reverse hooks must look there when its slot does not have it. Sockets without it (every
/// server, most clients) are never looked up in the LRU.
pub const SOCK_STATE_IN_LRU: u8 = 1 << 0;

/// One slot of the sockets' reverse table (`ekp_sk_slot_v1`, an array indexed by
/// `cookie & (SOCK_SLOTS - 1)`): what `connect4`/`sendmsg4` remember for
/// `getpeername4`/`recvmsg4` when the slot is free, instead of an entry in the socket
/// rev-NAT LRU.
///
/// Socket cookies are handed out in sequence, so consecutive sockets write neighbouring
/// slots, which stay in the cache; a hash map's entry lands in a random bucket. A slot holds
/// one backend; one held by another live socket, or by this unconnected socket for another
/// backend, sends the translation to the LRU instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockSlot {
    /// Cookie of the socket that holds the slot; 0 while free; with `SOCK_SLOT_BUSY` set
    /// while the holder writes the rest. Host order.
    pub cookie: u64,
    /// Backend IPv4 address the socket talks to, network order.
    pub backend_addr: u32,
    /// Backend port, network order.
    pub backend_port: u16,
    /// The frontend slot (`1..=count`) the backend was chosen from, so that an unconnected
    /// UDP socket's next datagram to the same frontend goes to the same backend, as
    /// kube-proxy's conntrack keeps a UDP flow's backend; 0: none recorded. Host order.
    pub backend_slot: u16,
    /// The frontend the application asked for, as in the LRU's values.
    pub frontend: SockRevNatValue,
}

/// The slot of the socket with cookie `cookie` in `ekp_sk_slot_v1`: the programs and the
/// agent must agree on it.
#[inline(always)]
pub const fn sock_slot_index(cookie: u64) -> u32 {
    (cookie & (SOCK_SLOTS as u64 - 1)) as u32
}

/// `SockSlot::cookie` bit of a slot being written: readers never match it, other writers
/// leave it alone. Cookies count up from 1 and never come near it.
pub const SOCK_SLOT_BUSY: u64 = 1 << 63;

/// Key of the session-affinity LRU map (Cilium's `lb4_affinity_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Who the client is: the network namespace cookie for the socket programs (one per pod,
    /// so one per pod IP, which is what kube-proxy's ClientIP keys on); for the packet
    /// programs, the client's IPv4 address with `AFFINITY_CLIENT_ADDR` set, so that the two
    /// kinds never meet. Host order.
    pub client: u64,
    /// The frontend's affinity id (`ServiceValue::affinity_id`). Host order.
    pub affinity_id: u16,
    pub _pad: [u8; 6],
}

/// `AffinityKey::client` bit of a client known by its IPv4 address (the packet programs)
/// rather than by its network namespace cookie (the socket programs). Cookies count up from
/// 1 and never come near it.
pub const AFFINITY_CLIENT_ADDR: u64 = 1 << 32;

/// Value of the session-affinity LRU map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// The backend this client sticks to. Host order.
    pub backend_id: u32,
    /// When the client last used it, seconds of `bpf_ktime_get_ns` (monotonic). Host order.
    pub last_used: u32,
}

/// Key of the north-south conntrack/NAT LRU map: a flow's 5-tuple as it arrives at the
/// program that must translate it (Cilium's `ipv4_ct_tuple` + `ipv4_nat_entry` in one map).
///
/// A new flow gets two entries: its original direction (client -> frontend, looked up at
/// ingress) and its reply direction, keyed by the tuple the reply carries *after* the
/// backend answered (backend -> client, looked up at egress, for a local backend; backend ->
/// node address and SNAT port, looked up at ingress, for a source-NATed remote one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatCtKey {
    /// Source IPv4 address, network order.
    pub saddr: u32,
    /// Destination IPv4 address, network order.
    pub daddr: u32,
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `CT_DIR_IN` or `CT_DIR_OUT`: the hook that looks this entry up.
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Key of the fragments LRU map: what the fragments of one IPv4 datagram share (RFC 791),
/// as they arrive at the program. Only the first fragment carries the L4 header; the
/// later ones find its ports under this key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    /// Source IPv4 address, network order.
    pub saddr: u32,
    /// Destination IPv4 address, network order.
    pub daddr: u32,
    /// IP identification, network order.
    pub id: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the fragments map: the L4 ports of the datagram's first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentPorts {
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
}

/// Value of the north-south conntrack/NAT map: the complete rewrite of a matching packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatCtValue {
    /// New source IPv4 address, network order.
    pub saddr: u32,
    /// New destination IPv4 address, network order.
    pub daddr: u32,
    /// New source port, network order.
    pub sport: u16,
    /// New destination port, network order.
    pub dport: u16,
    /// The backend the flow was balanced to; an original-direction entry whose backend left
    /// the backends map (or changed address) is a new flow again. Host order.
    pub backend_id: u32,
    /// The frontend's rev-NAT id. Host order.
    pub rev_nat_id: u16,
    /// `CT_FLAG_*` bits. Host order.
    pub flags: u16,
    /// Last packet of the flow, whole seconds of `bpf_ktime_get_coarse_ns`
    /// (`CLOCK_MONOTONIC_COARSE`, which the agent reads too). Host order.
    pub last_seen: u32,
}

impl NatCtValue {
    /// How long the entry lives without packets (`CT_LIFETIME_*`), for a flow of `proto`.
    #[inline(always)]
    pub const fn lifetime(&self, proto: u8) -> u32 {
        if self.flags & CT_FLAG_CLOSING != 0 {
            let time_wait = CT_FLAG_SNAT | CT_FLAG_FIN_BACKEND_FIRST;
            if self.flags & time_wait == time_wait {
                CT_LIFETIME_SNAT_CLOSING
            } else {
                CT_LIFETIME_CLOSING
            }
        } else if proto != PROTO_TCP {
            CT_LIFETIME_NONTCP
        } else if self.flags & CT_FLAG_SEEN_REPLY != 0 {
            CT_LIFETIME_TCP
        } else {
            CT_LIFETIME_TCP_SYN
        }
    }

    /// Whether the entry outlived its lifetime at `now` (seconds of the same clock as
    /// `last_seen`): the programs start a new flow instead of following it, and the agent's
    /// conntrack collector deletes it. One rule for both.
    #[inline(always)]
    pub const fn expired(&self, proto: u8, now: u32) -> bool {
        seconds_since(self.last_seen, now) > self.lifetime(proto)
    }
}

/// Value of the SNAT TIME_WAIT records (`ekp_snat_tw_v1`), keyed by a source-NATed TCP
/// flow's reply tuple (`NatCtKey` at ingress: backend -> node address and SNAT port),
/// written when the client's FIN passes after the backend's: what the backend's TIME_WAIT
/// socket remembers of the client's side, and so whether it will take a new connection's
/// SYN on the same tuple ([`SnatTimeWait::accepts`]). A port whose record says so is given
/// out again during the TIME_WAIT, as the kernel's NAT reuses a tuple in TIME_WAIT when the
/// new SYN's sequence number has advanced past the old connection's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SnatTimeWait {
    /// The closed flow's client address, network order: the record is used only for the
    /// reply entry of that flow (its destination), never for a later one on the port.
    pub client_addr: u32,
    /// The closed flow's client port, network order.
    pub client_port: u16,
    /// `TIME_WAIT_FLAG_*` bits. Host order.
    pub flags: u16,
    /// The sequence number after the client's FIN: what the backend expects next
    /// (`rcv_nxt`). Host order.
    pub next_seq: u32,
    /// The FIN's TCP timestamp value (the backend's `ts_recent`), with
    /// `TIME_WAIT_FLAG_TIMESTAMP`. Host order.
    pub tsval: u32,
}

impl SnatTimeWait {
    /// Whether the backend's TIME_WAIT socket takes a SYN with sequence number `seq` and
    /// TCP timestamp `tsval` (`None`: the SYN has none) as a new connection, as Linux's
    /// `tcp_timewait_state_process` decides: when both carry timestamps, a SYN whose
    /// timestamp is older than the FIN's is turned away (PAWS; a FIN's timestamp of 0 is
    /// not held against anyone), and one whose timestamp is newer is taken; otherwise its
    /// sequence number must come after the old connection's.
    #[inline(always)]
    pub const fn accepts(&self, seq: u32, tsval: Option<u32>) -> bool {
        let advanced = seq.wrapping_sub(self.next_seq) as i32 > 0;
        match tsval {
            Some(tsval) if self.flags & TIME_WAIT_FLAG_TIMESTAMP != 0 => {
                let behind = self.tsval.wrapping_sub(tsval) as i32;
                let paws_rejects = behind > 0 && self.tsval != 0;
                !paws_rejects && (behind < 0 || advanced)
            }
            _ => advanced,
        }
    }
}

/// Seconds from the stamp `then` to `now`, both whole seconds of the programs' clock in a
/// `u32` (which wraps); 0 when `then` is the later one. A reader's `now` can be a second
/// behind a stamp: another CPU wrote it just after the clock ticked, or after the reader
/// (a program at its start, the conntrack collector at the start of a pass) took `now`.
/// Such an entry was just used, not 136 years ago.
#[inline(always)]
pub const fn seconds_since(then: u32, now: u32) -> u32 {
    let age = now.wrapping_sub(then);
    if age > i32::MAX as u32 { 0 } else { age }
}

/// The only entry (key 0, `u32`) of the north-south config array: what the TCX programs
/// need to know about this node. Written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// The node's IPv4 address that traffic to remote backends is source-NATed to, network
    /// order. 0: not configured; flows that need SNAT are then left untranslated.
    pub snat_addr: u32,
    /// First SNAT source port (inclusive), host order. See `DEFAULT_SNAT_PORT_MIN`.
    pub snat_port_min: u16,
    /// Last SNAT source port (inclusive), host order; `>= snat_port_min`.
    pub snat_port_max: u16,
}

impl NodeConfig {
    /// Where a flow whose source port changes (source-NATed, or its client's port held by
    /// another flow) takes its new port from, host order: the configured range, or the
    /// default one while none is (a zeroed entry).
    #[inline(always)]
    pub fn snat_ports(&self) -> (u16, u16) {
        if self.snat_port_min != 0 {
            (self.snat_port_min, self.snat_port_max)
        } else {
            (DEFAULT_SNAT_PORT_MIN, DEFAULT_SNAT_PORT_MAX)
        }
    }
}

/// Words of a [`NsFilter`]'s bitmap.
pub const NS_FILTER_WORDS: usize = 1024;
/// Bits of a [`NsFilter`]'s bitmap.
pub const NS_FILTER_BITS: u32 = NS_FILTER_WORDS as u32 * 64;
/// The entry of `ekp_nsfilt_v1` that `ekp_tcx_in` consults: the (address, port) of every
/// external-scope frontend.
pub const NS_FILTER_IN: u32 = 0;
/// The entry `ekp_tcx_out` consults: the (address, port) of every local backend.
pub const NS_FILTER_OUT: u32 = 1;
/// The entry `ekp_tcx_in` consults too, written by the programs alone: the SNAT (address,
/// port) of every source-NATed flow they created, where its replies come back. Marked when
/// the flow is created, whatever the SNAT address or range is later (the Node's address
/// moved, another `--snat-port-range`), so its replies are admitted as long as they come.
/// Its `armed` word means nothing.
pub const NS_FILTER_SNAT: u32 = 2;
/// Entries of `ekp_nsfilt_v1`.
pub const NS_FILTER_ENTRIES: u32 = 3;

/// A prefilter of the north-south programs on the node's devices (`NS_FILTER_IN`,
/// `NS_FILTER_OUT`, `NS_FILTER_SNAT`): a packet whose (address, port) has no bit set cannot
/// belong to a Service flow, and passes without the conntrack and frontend lookups, which
/// cost traffic that is not for a Service (most of a node's) two hash misses in large maps.
/// A set bit proves nothing: the lookups decide.
///
/// Bits are only ever added: by the agent (one process per node: its chart's rollout
/// stops the old agent before it starts the new one) to the in and out entries, before the
/// frontends and backends they stand for are written, and by the programs to the SNAT
/// entry, with atomic operations. A flow that outlives its frontend (its conntrack entry
/// still translates it, as the kernel's conntrack keeps a NAT flow after kube-proxy's rules
/// are gone) keeps its bit. The agent copies the whole value while programs read it, so a
/// reader can meet a word half old, half new; as new bits are a superset of old ones, it
/// never misses a bit that was set before the write began.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NsFilter {
    /// Nonzero: the bits are complete and the programs apply the filter. Zero (a new map,
    /// or from an agent's start until its first sync has written every bit): no packet is
    /// filtered. Host order.
    pub armed: u32,
    pub _pad: u32,
    pub bits: [u64; NS_FILTER_WORDS],
}

impl NsFilter {
    pub const EMPTY: NsFilter = NsFilter {
        armed: 0,
        _pad: 0,
        bits: [0; NS_FILTER_WORDS],
    };

    /// Whether the bit of (`addr`, `port`) is set; both as the packet carries them (`addr`
    /// network order as read from memory, `port` as the parsed packet's, the frontend's and
    /// the backend's entries hold it).
    #[inline(always)]
    pub fn has(&self, addr: u32, port: u16) -> bool {
        let (word, mask) = ns_filter_bit(addr, port);
        self.bits[word] & mask != 0
    }

    /// Sets the bit of (`addr`, `port`); whether it was clear.
    pub fn insert(&mut self, addr: u32, port: u16) -> bool {
        let (word, mask) = ns_filter_bit(addr, port);
        let new = self.bits[word] & mask == 0;
        self.bits[word] |= mask;
        new
    }
}

/// The word and bit of (`addr`, `port`) in a [`NsFilter`]: a multiplicative hash of the
/// pair, whose top 16 bits spread the ports of one address (NodePorts) over the bitmap.
#[inline(always)]
pub const fn ns_filter_bit(addr: u32, port: u16) -> (usize, u64) {
    let pair = ((addr as u64) << 16) | port as u64;
    let hash = (pair.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as usize;
    ((hash >> 6) % NS_FILTER_WORDS, 1u64 << (hash & 63))
}

/// The data of a `ekp_srcrange_v1` key (an LPM trie: the kernel's key is this behind a
/// 32-bit prefix length). The prefix covers the rev-NAT id and padding whole
/// ([`SOURCE_RANGE_PREFIX_BASE`] bits) plus the range's own prefix length over `addr`, so
/// that each frontend has its own ranges and a lookup with the client's full address finds
/// the longest range that contains it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    /// The frontend's rev-NAT id. Host order (always matched whole).
    pub rev_nat_id: u16,
    pub _pad: [u8; 2],
    /// The range's network address (lookups: the client's address), network order.
    pub addr: u32,
}

/// Prefix bits of a [`SourceRangeKey`] before `addr`: the rev-NAT id and the padding.
pub const SOURCE_RANGE_PREFIX_BASE: u32 = 32;

/// The only entry (key 0, `u32`) of the socket programs' config array. Written by the agent
/// before it attaches them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockConfig {
    /// The network namespace cookie of the node's own namespace. Host order. Only its
    /// sockets reach NodePorts on loopback addresses (a pod's `127.0.0.1` is its own), and
    /// with `SOCK_FLAG_HOST_ONLY` only its sockets are translated at all. 0 (not written
    /// yet): no namespace is the node's.
    pub host_netns_cookie: u64,
    /// `SOCK_FLAG_*`.
    pub flags: u8,
    pub _pad: [u8; 7],
}

/// Socket config flags (`SockConfig::flags`).
///
/// Host-namespace-only socket LB (for service meshes, whose sidecars must see the Service
/// address): the socket programs translate only the node's own namespace's sockets; pods'
/// traffic is translated per packet on their devices instead.
pub const SOCK_FLAG_HOST_ONLY: u8 = 1 << 0;

/// NodePorts on loopback are served at `127.0.0.1` alone, not at every address of
/// `127.0.0.0/8`: kube-proxy serves the whole range only when `--nodeport-addresses` admits
/// every address (its `--dst-type LOCAL` match), and otherwise the addresses of the node's
/// devices within its CIDRs, of which `lo` has `127.0.0.1`.
pub const SOCK_FLAG_LOOPBACK_EXACT: u8 = 1 << 1;

/// The frontend address of NodePorts on the node's loopback addresses (kube-proxy's
/// `--iptables-localhost-nodeports`): internal-scope frontends at `127.0.0.1`, which the
/// socket programs serve for any destination in `127.0.0.0/8` (unless
/// `SOCK_FLAG_LOOPBACK_EXACT`), to the node's own namespace alone. Network order, as read
/// from memory.
pub const LOOPBACK_FRONTEND_ADDR: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Whether `addr` (network order, as read from memory) is in `127.0.0.0/8`.
#[inline(always)]
pub fn is_loopback(addr: u32) -> bool {
    addr.to_ne_bytes()[0] == 127
}

/// The only entry (key 0, `u32`) of the log switch array: how much the programs log.
/// Written by the agent at start (`run --bpf-log-level`) and by `bpf-log` at any time; read
/// by every program before it logs anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LogConfig {
    /// `LOG_LEVEL_*`.
    pub level: u8,
    pub _pad: [u8; 7],
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);
const _: () = assert!(core::mem::size_of::<BackendValue>() == 8);
const _: () = assert!(core::mem::size_of::<RevNatValue>() == 8);
const _: () = assert!(core::mem::size_of::<SockRevNatKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockRevNatValue>() == 8);
const _: () = assert!(core::mem::size_of::<SockSlot>() == 24);
const _: () = assert!(core::mem::size_of::<SockPin>() == 16);
const _: () = assert!(core::mem::size_of::<SockState>() == 72);
const _: () = assert!(SOCK_SLOTS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<NatCtKey>() == 16);
const _: () = assert!(core::mem::size_of::<NatCtValue>() == 24);
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 8);
const _: () = assert!(core::mem::size_of::<NsFilter>() == 8 + 8 * NS_FILTER_WORDS);
const _: () = assert!(NS_FILTER_BITS == 1 << 16);
const _: () = assert!(core::mem::size_of::<LogConfig>() == 8);
const _: () = assert!(core::mem::size_of::<LogRecord>() == 40);
const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 8);
const _: () = assert!(core::mem::size_of::<SockConfig>() == 16);
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragmentPorts>() == 4);
const _: () = assert!(core::mem::size_of::<SnatTimeWait>() == 16);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are `#[repr(C)]`, made only of integers and explicit padding
    // arrays, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for SockSlot {}
    unsafe impl aya::Pod for SockPin {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for NatCtKey {}
    unsafe impl aya::Pod for NatCtValue {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for NsFilter {}
    unsafe impl aya::Pod for LogConfig {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for SockConfig {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentPorts {}
    unsafe impl aya::Pod for SnatTimeWait {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    /// A filter holds what was inserted, and spreads one address's NodePorts (the default
    /// range) over its bits about as a random choice would (65536 bits: some 58 pairs
    /// expected to share one), so that a set bit rarely stands for a port not in use.
    #[test]
    fn ns_filter_bits_spread_one_addresss_node_ports() {
        let node = u32::from_ne_bytes([192, 168, 77, 2]);
        let mut filter = NsFilter::EMPTY;
        // Ports as packets carry them, network order.
        let fresh = (30000..=32767u16)
            .filter(|port| filter.insert(node, port.to_be()))
            .count();
        assert!(fresh > 2650, "only {fresh} distinct bits for 2768 ports");
        assert!((30000..=32767u16).all(|port| filter.has(node, port.to_be())));
        let set: u32 = filter.bits.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set as usize, fresh);
        // Pods' addresses with one port.
        let mut pods = NsFilter::EMPTY;
        let fresh = (0..=255u8)
            .flat_map(|b| (1..=16u8).map(move |c| u32::from_ne_bytes([10, 244, c, b])))
            .filter(|addr| pods.insert(*addr, 8080u16.to_be()))
            .count();
        assert!(fresh > 4000, "only {fresh} distinct bits for 4096 pods");
        assert!(pods.has(u32::from_ne_bytes([10, 244, 1, 7]), 8080u16.to_be()));
    }

    /// The field offsets are part of the ABI (bpftool users and older pins rely on them).
    #[test]
    fn field_offsets_are_stable() {
        assert_eq!(offset_of!(ServiceKey, addr), 0);
        assert_eq!(offset_of!(ServiceKey, port), 4);
        assert_eq!(offset_of!(ServiceKey, slot), 6);
        assert_eq!(offset_of!(ServiceKey, proto), 8);
        assert_eq!(offset_of!(ServiceKey, scope), 9);
        assert_eq!(offset_of!(ServiceValue, backend_id), 0);
        assert_eq!(offset_of!(ServiceValue, count), 4);
        assert_eq!(offset_of!(ServiceValue, rev_nat_id), 6);
        assert_eq!(offset_of!(ServiceValue, flags), 8);
        assert_eq!(offset_of!(ServiceValue, affinity_timeout), 12);
        assert_eq!(offset_of!(ServiceValue, affinity_id), 10);
        assert_eq!(offset_of!(AffinityKey, affinity_id), 8);
        assert_eq!(offset_of!(AffinityValue, last_used), 4);
        assert_eq!(offset_of!(BackendValue, port), 4);
        assert_eq!(offset_of!(BackendValue, proto), 6);
        assert_eq!(offset_of!(BackendValue, flags), 7);
        assert_eq!(offset_of!(NatCtKey, daddr), 4);
        assert_eq!(offset_of!(NatCtKey, sport), 8);
        assert_eq!(offset_of!(NatCtKey, dport), 10);
        assert_eq!(offset_of!(NatCtKey, proto), 12);
        assert_eq!(offset_of!(NatCtKey, dir), 13);
        assert_eq!(offset_of!(NatCtValue, daddr), 4);
        assert_eq!(offset_of!(NatCtValue, sport), 8);
        assert_eq!(offset_of!(NatCtValue, dport), 10);
        assert_eq!(offset_of!(NatCtValue, backend_id), 12);
        assert_eq!(offset_of!(NatCtValue, rev_nat_id), 16);
        assert_eq!(offset_of!(NatCtValue, flags), 18);
        assert_eq!(offset_of!(NatCtValue, last_seen), 20);
        assert_eq!(offset_of!(NodeConfig, snat_port_min), 4);
        assert_eq!(offset_of!(NodeConfig, snat_port_max), 6);
        assert_eq!(offset_of!(LogConfig, level), 0);
        assert_eq!(offset_of!(SockRevNatKey, addr), 8);
        assert_eq!(offset_of!(SockRevNatValue, rev_nat_id), 6);
        assert_eq!(offset_of!(SockSlot, backend_addr), 8);
        assert_eq!(offset_of!(SockSlot, backend_port), 12);
        assert_eq!(offset_of!(SockSlot, backend_slot), 14);
        assert_eq!(offset_of!(SockSlot, frontend), 16);
        assert_eq!(offset_of!(SockPin, backend_addr), 8);
        assert_eq!(offset_of!(SockPin, backend_port), 12);
        assert_eq!(offset_of!(SockPin, backend_slot), 14);
        assert_eq!(offset_of!(SockState, next), 64);
        assert_eq!(offset_of!(SockState, flags), 65);
        assert_eq!(offset_of!(SourceRangeKey, addr), 4);
        assert_eq!(offset_of!(SnatTimeWait, client_port), 4);
        assert_eq!(offset_of!(SnatTimeWait, flags), 6);
        assert_eq!(offset_of!(SnatTimeWait, next_seq), 8);
        assert_eq!(offset_of!(SnatTimeWait, tsval), 12);
        assert_eq!(offset_of!(SockConfig, flags), 8);
        assert_eq!(offset_of!(NsFilter, armed), 0);
        assert_eq!(offset_of!(NsFilter, bits), 8);
    }

    #[test]
    fn loopback_is_127_slash_8_in_network_order() {
        let addr = |a: [u8; 4]| u32::from_ne_bytes(a);
        assert!(is_loopback(LOOPBACK_FRONTEND_ADDR));
        assert!(is_loopback(addr([127, 255, 3, 4])));
        assert!(!is_loopback(addr([128, 0, 0, 1])));
        assert!(!is_loopback(addr([10, 0, 0, 127])));
    }

    #[test]
    fn a_time_wait_takes_a_syn_past_the_old_connection() {
        let record = |flags, next_seq, tsval| SnatTimeWait {
            flags,
            next_seq,
            tsval,
            ..SnatTimeWait::default()
        };
        let with_ts = record(TIME_WAIT_FLAG_TIMESTAMP, 5000, 1000);
        // A newer timestamp is taken, whatever the sequence number.
        assert!(with_ts.accepts(10, Some(1001)));
        assert!(with_ts.accepts(10, Some(1000 + i32::MAX as u32)));
        // An older one is turned away (PAWS), whatever the sequence number.
        assert!(!with_ts.accepts(6000, Some(998)));
        assert!(!with_ts.accepts(6000, Some(1000 + i32::MAX as u32 + 2)));
        // Equal: the sequence number decides.
        assert!(with_ts.accepts(5001, Some(1000)));
        assert!(!with_ts.accepts(5000, Some(1000)));
        assert!(!with_ts.accepts(5001, Some(999)), "one behind is behind");
        // A FIN's timestamp of 0 turns no one away (some stacks start at 0).
        let zero_ts = record(TIME_WAIT_FLAG_TIMESTAMP, 5000, 0);
        assert!(zero_ts.accepts(5001, Some(u32::MAX)));
        assert!(zero_ts.accepts(10, Some(5)));
        assert!(!zero_ts.accepts(10, Some(0)));
        // A SYN without a timestamp: the sequence number alone, across the wrap too.
        assert!(with_ts.accepts(5001, None));
        assert!(!with_ts.accepts(5000, None));
        let near_wrap = record(0, u32::MAX - 10, 0);
        assert!(near_wrap.accepts(5, Some(7)));
        assert!(!near_wrap.accepts(u32::MAX - 20, Some(u32::MAX)));
        // An old connection without timestamps: no PAWS, the sequence number alone.
        let without_ts = record(0, 5000, 1000);
        assert!(without_ts.accepts(5001, Some(1)));
        assert!(!without_ts.accepts(4999, Some(2000)));
    }

    #[test]
    fn conntrack_lifetimes_follow_the_flows_state() {
        let at = |flags, last_seen| NatCtValue {
            flags,
            last_seen,
            ..NatCtValue::default()
        };
        let established = at(CT_FLAG_SEEN_REPLY, 1000);
        assert_eq!(established.lifetime(PROTO_TCP), CT_LIFETIME_TCP);
        assert!(!established.expired(PROTO_TCP, 1000 + CT_LIFETIME_TCP));
        assert!(established.expired(PROTO_TCP, 1001 + CT_LIFETIME_TCP));
        assert_eq!(at(0, 0).lifetime(PROTO_TCP), CT_LIFETIME_TCP_SYN);
        assert_eq!(
            at(CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING, 0).lifetime(PROTO_TCP),
            CT_LIFETIME_CLOSING
        );
        // Source-NATed and closed by the backend first, the port is kept through the
        // backend's TIME_WAIT; closed by the client first, it is not.
        let closed = CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING | CT_FLAG_SNAT;
        let closed_snat = at(closed | CT_FLAG_FIN_BACKEND_FIRST, 1000);
        assert_eq!(closed_snat.lifetime(PROTO_TCP), CT_LIFETIME_SNAT_CLOSING);
        assert!(!closed_snat.expired(PROTO_TCP, 1060));
        assert!(closed_snat.expired(PROTO_TCP, 1061));
        assert_eq!(at(closed, 1000).lifetime(PROTO_TCP), CT_LIFETIME_CLOSING);
        assert_eq!(
            at(
                CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING | CT_FLAG_FIN_BACKEND_FIRST,
                0
            )
            .lifetime(PROTO_TCP),
            CT_LIFETIME_CLOSING,
            "kept the client's address: no SNAT port to keep"
        );
        assert_eq!(
            at(CT_FLAG_SEEN_REPLY, 0).lifetime(PROTO_UDP),
            CT_LIFETIME_NONTCP
        );
        // The clock is seconds in a u32: an entry seen just before it wraps is fresh after.
        assert!(!at(0, u32::MAX - 5).expired(PROTO_UDP, 10));
        assert!(at(0, u32::MAX - 60).expired(PROTO_UDP, 10));
        // Stamped a second after the reader took its clock (another CPU, or a packet while
        // the collector walks the map): fresh, whatever its lifetime.
        assert!(!at(CT_FLAG_CLOSING, 1001).expired(PROTO_TCP, 1000));
        assert!(!at(0, 0).expired(PROTO_UDP, u32::MAX));
        assert_eq!(seconds_since(1001, 1000), 0);
        assert_eq!(seconds_since(1000, 1060), 60);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in ALL_MAPS {
            assert!(
                name.len() <= 15,
                "{name} is longer than BPF_OBJ_NAME_LEN - 1"
            );
        }
    }
}
