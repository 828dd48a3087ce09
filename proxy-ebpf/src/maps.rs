//! Every map of the datapath. Layouts and names come from `proxy-common`; the names here
//! must equal its `MAP_*` constants (the agent opens the maps by those names). Capacities are
//! defaults: the agent sets the real `max_entries` at load time.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::btf_maps::{Array, HashMap, LpmTrie, LruHashMap, RingBuf, SkStorage};
use aya_ebpf::macros::btf_map;
use proxy_common::{
    AffinityKey, AffinityValue, BackendValue, CLUSTER_IPS_MAX, DEFAULT_AFFINITY_MAX,
    DEFAULT_BACKENDS_MAX, DEFAULT_NAT_CT_MAX, DEFAULT_REV_NAT_MAX, DEFAULT_SERVICES_MAX,
    DEFAULT_SOCK_REV_NAT_MAX, DEFAULT_SOURCE_RANGES_MAX, FRAGMENTS_MAX, FragmentKey, FragmentPorts,
    LOG_RECORDS_BYTES, LogConfig, LogRecord, NS_FILTER_ENTRIES, NatCtKey, NatCtValue, NodeConfig,
    NsFilter, RevNatValue, SNAT_CURSORS, SNAT_TIME_WAIT_MAX, SOCK_SLOTS, ServiceKey, ServiceValue,
    SnatTimeWait, SockConfig, SockRevNatKey, SockRevNatValue, SockSlot, SockState, SourceRangeKey,
};

/// Frontends (slot 0) and their backend slots. Written by the agent, read by all programs.
#[btf_map(name = "ekp_svc_v1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { DEFAULT_SERVICES_MAX as usize }> =
    HashMap::new();

/// ClusterIP -> 1, for every Service served: a connection or datagram to one of them that
/// no frontend takes (another port or protocol) is refused, as kube-proxy's nftables mode
/// rejects it, instead of leaving the node for an address nothing serves. Written by the
/// agent after the frontends, read by the socket programs and `ekp_pod_in` on a miss.
#[btf_map(name = "ekp_cip_v1")]
pub static CLUSTER_IPS: HashMap<
    u32,
    u8,
    { CLUSTER_IPS_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Backend id -> backend address (an entry with address 0 is none: `lb::backend`).
/// Written by the agent, read by all programs. An array, not a hash map: the agent hands
/// out ids from 1 up, smallest free first, so they are dense, and the verifier inlines an
/// array lookup as an index computation where a hash lookup hashes the key and walks a
/// bucket (about 40 ns of `sendmsg4`'s time each in a profile; see docs/decisions.md).
#[btf_map(name = "ekp_backend_v2")]
pub static BACKENDS: Array<BackendValue, { DEFAULT_BACKENDS_MAX as usize }> = Array::new();

/// Rev-NAT id -> frontend address (address 0: none). Written by the agent; read by the
/// reverse programs to check that a remembered translation still belongs to a live
/// frontend. An array for the reason `BACKENDS` is.
#[btf_map(name = "ekp_revnat_v2")]
pub static REV_NAT: Array<RevNatValue, { DEFAULT_REV_NAT_MAX as usize }> = Array::new();

/// (socket cookie, backend) -> frontend, for `recvmsg4`/`getpeername4`. Written by
/// `connect4`/`sendmsg4` when the socket's slot in `SOCK_SLOT_TABLE` is not available; LRU
/// because unconnected sockets' entries cannot be found at close.
#[btf_map(name = "ekp_sk_rnat_v1")]
pub static SOCK_REV_NAT: LruHashMap<
    SockRevNatKey,
    SockRevNatValue,
    { DEFAULT_SOCK_REV_NAT_MAX as usize },
> = LruHashMap::new();

/// Sockets' translations, one slot per cookie's low bits (`sock_slot`). Written by
/// `connect4`/`sendmsg4`, read by `recvmsg4`/`getpeername4`, freed by `sock_release`.
#[btf_map(name = "ekp_sk_slot_v1")]
pub static SOCK_SLOT_TABLE: Array<SockSlot, { SOCK_SLOTS as usize }> = Array::new();

/// A socket's own state (`sock_state`): the pins of a UDP socket that its slot in
/// `SOCK_SLOT_TABLE` cannot hold (those of further frontends it sends to, or all of them when
/// another socket holds its slot), and whether it has translations in `SOCK_REV_NAT`.
/// Socket-local storage: created by `connect4`/`sendmsg4` for such a socket only, read by
/// the reverse hooks, freed with the socket.
#[btf_map(name = "ekp_sk_state_v1")]
pub static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

/// (client, rev-NAT id) -> the backend a sessionAffinity ClientIP client sticks to.
/// Written by the programs on selection; the agent deletes entries whose backend left the
/// Service. LRU: idle clients age out.
#[btf_map(name = "ekp_affinity_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { DEFAULT_AFFINITY_MAX as usize }> =
    LruHashMap::new();

/// North-south flows: 5-tuple as it reaches the translating hook -> the rewrite (two entries
/// per flow, one per direction). Written and read by `ekp_tcx_in`/`ekp_tcx_out`; the agent
/// deletes expired entries (`CT_LIFETIME_*`). LRU so that a full map still takes new flows.
#[btf_map(name = "ekp_nat_ct_v1")]
pub static NAT_CT: LruHashMap<NatCtKey, NatCtValue, { DEFAULT_NAT_CT_MAX as usize }> =
    LruHashMap::new();

/// This node's north-south settings (one entry, key 0): the SNAT address and port range.
/// Written by the agent, read by `ekp_tcx_in`.
#[btf_map(name = "ekp_config_v1")]
pub static CONFIG: Array<NodeConfig, 1> = Array::new();

/// The north-south prefilter (`ns_filter`): entries `NS_FILTER_IN` and `NS_FILTER_SNAT`
/// for `ekp_tcx_in`, `NS_FILTER_OUT` for `ekp_tcx_out`, read by them at every packet. The
/// agent writes the first two, `ekp_tcx_in` marks the third.
#[btf_map(name = "ekp_nsfilt_v1")]
pub static NS_FILTER: Array<NsFilter, { NS_FILTER_ENTRIES as usize }> = Array::new();

/// The log switch (one entry, key 0): how much the programs log (`LOG_LEVEL_*`, off when
/// zero). Written by the agent (`run --bpf-log-level`, `bpf-log`), read by every program
/// before a log point.
#[btf_map(name = "ekp_log_v1")]
pub static LOG: Array<LogConfig, 1> = Array::new();

/// The records the programs log (`log`): one ring buffer per loaded object, not pinned, read
/// by the agent that loaded it.
#[btf_map(name = "ekp_logbuf_v1")]
pub static LOG_RECORDS: RingBuf<LogRecord, { LOG_RECORDS_BYTES as usize }> = RingBuf::new();

/// (rev-NAT id, client range) -> 1: the `loadBalancerSourceRanges` of LB IP frontends that
/// carry `SVC_FLAG_SOURCE_RANGES`. Written by the agent, read by `ekp_tcx_in` for new flows.
#[btf_map(name = "ekp_srcrange_v1")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8, { DEFAULT_SOURCE_RANGES_MAX as usize }> =
    LpmTrie::new();

/// The socket programs' settings (one entry, key 0): the node's network namespace and the
/// host-namespace-only mode. Written by the agent, read by `connect4`/`sendmsg4`.
#[btf_map(name = "ekp_sockcfg_v2")]
pub static SOCK_CONFIG: Array<SockConfig, 1> = Array::new();

/// (source, destination, IP id, protocol) of a fragmented datagram -> the ports its first
/// fragment carried, for its later fragments, which carry none (Cilium's fragments map).
/// Written and read by the north-south programs; LRU because nothing says when the last
/// fragment has passed.
#[btf_map(name = "ekp_frag_v1")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts, { FRAGMENTS_MAX as usize }> =
    LruHashMap::new();

/// Where the search for a destination's next SNAT port starts (RFC 6056's double-hash port
/// selection, as Linux picks its ephemeral ports): one cursor per hash of the reply tuple's
/// backend and node address, advanced past each port it gives out. Written and read by
/// `ekp_tcx_in` (`nat::allocate_port`).
#[btf_map(name = "ekp_snat_cur_v1")]
pub static SNAT_CURSOR: Array<u64, { SNAT_CURSORS as usize }> = Array::new();

/// Reply tuple of a source-NATed TCP flow its backend closed first -> what the backend's
/// TIME_WAIT socket remembers of the client (`time_wait`). Written by `ekp_tcx_in` at the
/// client's FIN, read by the SNAT port search; LRU: a record is of use for a minute.
#[btf_map(name = "ekp_snat_tw_v1")]
pub static SNAT_TIME_WAIT: LruHashMap<NatCtKey, SnatTimeWait, { SNAT_TIME_WAIT_MAX as usize }> =
    LruHashMap::new();
