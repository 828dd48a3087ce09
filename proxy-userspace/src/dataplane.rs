//! The only module that touches aya: loads the eBPF object, pins maps and links, attaches
//! the socket programs, and reads and writes the maps.
//!
//! Layout under the pin directory (default `/sys/fs/bpf/ebpf-kube-proxy`):
//! `maps/<map name>`, `links/<program name>` for the socket programs and
//! `links/<program name>@<device>` for the TCX programs. A restart adopts both: the loader
//! reuses pinned maps (no flush; one of another size is replaced, its entries copied:
//! `resize`), and a pinned link gets the newly loaded program swapped in with
//! `BPF_LINK_UPDATE`, so neither sockets nor packets see a moment without the programs.

use std::collections::BTreeSet;
use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, IterableMap, Map, MapData};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{
    CgroupAttachMode, LinkOrder, Program, SchedClassifier, TcAttachType, links::FdLink,
};
use aya::{Ebpf, EbpfLoader};

use crate::model::SourceRange;
use crate::{abi, devices};
use proxy_common::{
    ALL_MAPS, AffinityKey, AffinityValue, BackendValue, MAP_AFFINITY, MAP_BACKENDS,
    MAP_BACKENDS_V1, MAP_CLUSTER_IPS, MAP_CONFIG, MAP_NAT_CT, MAP_NS_FILTER, MAP_REV_NAT,
    MAP_REV_NAT_V1, MAP_SERVICES, MAP_SOCK_CONFIG, MAP_SOCK_CONFIG_V1, MAP_SOCK_PINS_V1,
    MAP_SOCK_REV_NAT, MAP_SOCK_SLOTS, MAP_SOCK_STATE, MAP_SOURCE_RANGES, NS_FILTER_BITS,
    NS_FILTER_ENTRIES, NS_FILTER_IN, NS_FILTER_OUT, NatCtKey, NatCtValue, NodeConfig, NsFilter,
    RevNatValue, SOCK_FLAG_HOST_ONLY, SOCK_FLAG_LOOPBACK_EXACT, ServiceKey, ServiceValue,
    SockConfig, SockRevNatKey, SockRevNatValue, SockSlot, SourceRangeKey, sock_slot_index,
};

mod foreign;
mod logs;
mod resize;
pub use foreign::Foreign;
pub use logs::{
    Level as LogLevel, LogReader, Message as LogMessage, pinned_level as pinned_bpf_log_level,
    set_pinned_level as set_bpf_log_level,
};

/// The eBPF object, built by `build.rs` (see xtask's `ebpf` module) and embedded.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

/// The embedded eBPF object (for the packet-level tests, which load it without pins).
pub fn object() -> &'static [u8] {
    OBJECT
}

/// The socket programs, by their names in the object: the `sock_addr` hooks (the IPv6
/// ones for `AF_INET6` sockets that reach IPv4 Services through IPv4-mapped addresses),
/// then `ekp_sock_release` (a `sock` hook), which frees a closing socket's reverse entry.
pub const SOCK_PROGRAMS: [&str; 8] = [
    "ekp_connect4",
    "ekp_sendmsg4",
    "ekp_recvmsg4",
    "ekp_getpeer4",
    "ekp_connect6",
    "ekp_recvmsg6",
    "ekp_getpeer6",
    "ekp_sock_release",
];

/// The north-south TCX programs (`ekp_tcx_in` on the devices' ingress, `ekp_tcx_out` on
/// their egress), attached by `start` to the `--devices`.
pub const TCX_PROGRAMS: [&str; 2] = ["ekp_tcx_in", "ekp_tcx_out"];

/// The hook of each TCX program.
const TCX_HOOKS: [(&str, TcAttachType); 2] = [
    ("ekp_tcx_in", TcAttachType::Ingress),
    ("ekp_tcx_out", TcAttachType::Egress),
];

/// The pod-device programs of the host-namespace-only socket LB and their hooks: a pod's
/// packets leave it through the ingress of its device's host side.
const POD_HOOKS: [(&str, TcAttachType); 2] = [
    ("ekp_pod_in", TcAttachType::Ingress),
    ("ekp_pod_out", TcAttachType::Egress),
];

/// What the north-south programs serve: the devices they attach to and what they need to
/// know about the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NorthSouth {
    pub devices: Vec<String>,
    pub node_config: NodeConfig,
}

/// Pin file name of a TCX program's link on one device: `ekp_tcx_in@eth0`. bpffs refuses a
/// name with a dot, which VLAN devices' names have (`eth0.100`); a device name never holds a
/// colon (the kernel's `dev_valid_name`), so a dot is written as one: `ekp_tcx_in@eth0:100`.
fn tcx_link_name(program: &str, device: &str) -> String {
    format!("{program}@{}", device.replace('.', ":"))
}

/// The program and device a link pin's file name names ([`tcx_link_name`]'s inverse).
fn tcx_link_of(file: &str) -> Option<(&str, String)> {
    let (program, device) = file.split_once('@')?;
    Some((program, device.replace(':', ".")))
}

/// A batch of writes: done, or how many were written before the error.
pub type Batch = std::result::Result<(), (usize, anyhow::Error)>;

/// Writes `keys[i]` = `values[i]` to `map`, in order, in one syscall.
fn put_batch<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    keys: &[K],
    values: &[V],
    what: &str,
) -> Batch {
    bpf_sys::update_batch(map.map().fd().as_fd(), keys, values)
        .map_err(|(done, e)| (done, e.context(format!("writing {what}"))))
}

/// What the socket programs remember of translated sockets, read the way `recvmsg4` and
/// `getpeername4` read it: the socket's slot, else the socket rev-NAT LRU.
pub struct SockReverse {
    slots: Array<MapData, SockSlot>,
    lru: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
}

impl SockReverse {
    /// The frontend the socket `cookie`, talking to `addr:port` (network order), was
    /// translated from; `None` if the socket programs did not translate it.
    pub fn frontend_of(&self, cookie: u64, addr: u32, port: u16) -> Option<SockRevNatValue> {
        let slot = self.slots.get(&sock_slot_index(cookie), 0).ok();
        if let Some(slot) =
            slot.filter(|s| s.cookie == cookie && s.backend_addr == addr && s.backend_port == port)
        {
            return Some(slot.frontend);
        }
        let key = SockRevNatKey {
            cookie,
            addr,
            port,
            _pad: [0; 2],
        };
        self.lru.get(&key, 0).ok()
    }
}

/// bpf(2)'s "only if the key is new" update flag.
const BPF_NOEXIST: u64 = 1;

/// Entries per `BPF_MAP_LOOKUP_BATCH` call in `Conntrack::scan` (160 KB of buffers).
const CONNTRACK_BATCH: usize = 4096;

/// A handle on the north-south conntrack map, for deleting ended flows' entries
/// (`conntrack_gc`); the programs write it.
pub struct Conntrack {
    map: HashMap<MapData, NatCtKey, NatCtValue>,
}

impl Conntrack {
    /// A handle of its own on `map` (the conntrack map, from the agent's object or a test's).
    pub fn duplicate(map: &MapData) -> Result<Self> {
        let fd = map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the conntrack map's descriptor")?;
        Ok(Conntrack {
            map: HashMap::try_from(Map::LruHashMap(MapData::from_fd(fd)?))?,
        })
    }

    /// The conntrack map pinned under `pin_dir` (for `list --conntrack`).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        let path = maps_dir(pin_dir).join(MAP_NAT_CT);
        let map = MapData::from_pin(&path).with_context(|| {
            format!(
                "opening pinned map {} (is ebpf-kube-proxy running with this --pin-path?)",
                path.display()
            )
        })?;
        Ok(Conntrack {
            map: HashMap::try_from(Map::LruHashMap(map))?,
        })
    }

    /// The map's `max_entries` (set when it was created, maybe by an earlier run).
    pub fn capacity(&self) -> Result<u32> {
        Ok(self
            .map
            .map()
            .info()
            .context("reading the conntrack map's info")?
            .max_entries())
    }

    /// Hands every entry to `f`, read a few thousand per syscall (`BPF_MAP_LOOKUP_BATCH`; a
    /// full map of 262144 in 0.05 s, where a walk key by key took 0.25 s). Entries that come
    /// and go meanwhile may be seen or not, as in any dump.
    pub fn scan(&self, f: impl FnMut(NatCtKey, NatCtValue)) -> Result<()> {
        bpf_sys::lookup_batch(self.map.map().fd().as_fd(), CONNTRACK_BATCH, f)
            .context("reading the conntrack map")
    }

    /// Deletes the entry under `key` and returns what it held at that instant
    /// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, one syscall); `None` if it was already gone.
    pub fn take(&mut self, key: &NatCtKey) -> Result<Option<NatCtValue>> {
        bpf_sys::lookup_and_delete(self.map.map().fd().as_fd(), key)
            .context("deleting a conntrack entry")
    }

    /// Puts back an entry `take` should have left, unless a program wrote a new one under
    /// its key meanwhile.
    pub fn restore(&mut self, key: &NatCtKey, value: &NatCtValue) -> Result<()> {
        match self.map.insert(key, value, BPF_NOEXIST) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            Err(e) => Err(e).context("restoring a conntrack entry"),
        }
    }
}

/// Map capacities (`max_entries`), set when the maps are first created.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub rev_nat: u32,
    pub sock_rev_nat: u32,
    pub affinity: u32,
    pub nat_ct: u32,
    pub source_ranges: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: proxy_common::DEFAULT_SERVICES_MAX,
            backends: proxy_common::DEFAULT_BACKENDS_MAX,
            rev_nat: proxy_common::DEFAULT_REV_NAT_MAX,
            sock_rev_nat: proxy_common::DEFAULT_SOCK_REV_NAT_MAX,
            affinity: proxy_common::DEFAULT_AFFINITY_MAX,
            nat_ct: proxy_common::DEFAULT_NAT_CT_MAX,
            source_ranges: proxy_common::DEFAULT_SOURCE_RANGES_MAX,
        }
    }
}

fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// Everything the maps hold, as read back from the kernel.
#[derive(Debug, Default)]
pub struct MapContents {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<(u32, BackendValue)>,
    pub rev_nat: Vec<(u16, RevNatValue)>,
    /// (rev-NAT id, range) of every `loadBalancerSourceRanges` entry.
    pub source_ranges: Vec<(u16, SourceRange)>,
    /// The rev-NAT array's size: it has room for ids below it.
    pub rev_nat_room: u32,
}

/// Typed handles on the maps the agent writes or cleans.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Indexed by backend id; an entry with address 0 holds none.
    backends: Array<MapData, BackendValue>,
    /// Indexed by rev-NAT id; an entry with address 0 holds none.
    rev_nat: Array<MapData, RevNatValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    sock_rev_nat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    sock_slots: Array<MapData, SockSlot>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    /// Written by the north-south programs only; the agent deletes expired entries.
    nat_ct: HashMap<MapData, NatCtKey, NatCtValue>,
    /// The north-south prefilter; `None` in pins of a version without it (`list` of them).
    ns_filter: Option<Array<MapData, NsFilter>>,
    /// The served ClusterIPs (`sync::cluster_ips`); `None` in pins of a version without it.
    cluster_ips: Option<HashMap<MapData, u32, u8>>,
}

impl Maps {
    /// Opens the maps pinned under `pin_dir` (for `list`, or a second process).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<MapData> {
            let path = maps_dir(pin_dir).join(name);
            MapData::from_pin(&path).with_context(|| {
                format!(
                    "opening pinned map {} (is ebpf-kube-proxy running with this --pin-path?)",
                    path.display()
                )
            })
        };
        Ok(Maps {
            services: HashMap::try_from(Map::HashMap(open(MAP_SERVICES)?))?,
            backends: Array::try_from(Map::Array(open(MAP_BACKENDS)?))?,
            rev_nat: Array::try_from(Map::Array(open(MAP_REV_NAT)?))?,
            affinity: HashMap::try_from(Map::LruHashMap(open(MAP_AFFINITY)?))?,
            sock_rev_nat: HashMap::try_from(Map::LruHashMap(open(MAP_SOCK_REV_NAT)?))?,
            sock_slots: Array::try_from(Map::Array(open(MAP_SOCK_SLOTS)?))?,
            source_ranges: LpmTrie::try_from(Map::LpmTrie(open(MAP_SOURCE_RANGES)?))?,
            nat_ct: HashMap::try_from(Map::LruHashMap(open(MAP_NAT_CT)?))?,
            ns_filter: match maps_dir(pin_dir).join(MAP_NS_FILTER).exists() {
                true => Some(Array::try_from(Map::Array(open(MAP_NS_FILTER)?))?),
                false => None,
            },
            cluster_ips: match maps_dir(pin_dir).join(MAP_CLUSTER_IPS).exists() {
                true => Some(HashMap::try_from(Map::HashMap(open(MAP_CLUSTER_IPS)?))?),
                false => None,
            },
        })
    }

    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        Ok(Maps {
            services: HashMap::try_from(take(MAP_SERVICES)?)?,
            backends: Array::try_from(take(MAP_BACKENDS)?)?,
            rev_nat: Array::try_from(take(MAP_REV_NAT)?)?,
            affinity: HashMap::try_from(take(MAP_AFFINITY)?)?,
            sock_rev_nat: HashMap::try_from(take(MAP_SOCK_REV_NAT)?)?,
            sock_slots: Array::try_from(take(MAP_SOCK_SLOTS)?)?,
            source_ranges: LpmTrie::try_from(take(MAP_SOURCE_RANGES)?)?,
            nat_ct: HashMap::try_from(take(MAP_NAT_CT)?)?,
            ns_filter: Some(Array::try_from(take(MAP_NS_FILTER)?)?),
            cluster_ips: Some(HashMap::try_from(take(MAP_CLUSTER_IPS)?)?),
        })
    }

    /// The prefilter's entry `entry` (`NS_FILTER_IN`, `NS_FILTER_OUT`); `None` without the
    /// map.
    pub fn ns_filter(&self, entry: u32) -> Result<Option<NsFilter>> {
        self.ns_filter
            .as_ref()
            .map(|map| map.get(&entry, 0))
            .transpose()
            .with_context(|| format!("reading {MAP_NS_FILTER} entry {entry}"))
    }

    /// The keys of the north-south conntrack map, as the agent arms the prefilter: read in
    /// batches, as `Conntrack::scan` reads (bucket by bucket, so a walk that entries come
    /// and go under still ends; a full map in about 0.05 s).
    pub fn conntrack_keys(&self) -> Result<Vec<NatCtKey>> {
        let mut keys = Vec::new();
        bpf_sys::lookup_batch(
            self.nat_ct.map().fd().as_fd(),
            CONNTRACK_BATCH,
            |key: NatCtKey, _: NatCtValue| keys.push(key),
        )
        .context("reading the conntrack map")?;
        Ok(keys)
    }

    pub fn put_ns_filter(&mut self, entry: u32, filter: &NsFilter) -> Result<()> {
        self.ns_filter
            .as_mut()
            .with_context(|| format!("map {MAP_NS_FILTER} is not pinned"))?
            .set(entry, filter, 0)
            .with_context(|| format!("writing {MAP_NS_FILTER} entry {entry}"))
    }

    /// The served ClusterIPs the map holds (none without the map).
    pub fn cluster_ips(&self) -> Result<Vec<Ipv4Addr>> {
        let Some(map) = &self.cluster_ips else {
            return Ok(Vec::new());
        };
        map.keys()
            .map(|k| k.map(abi::addr_from_net))
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {MAP_CLUSTER_IPS}"))
    }

    /// Writes served ClusterIPs in order, in one syscall (as `put_services`).
    pub fn put_cluster_ips(&mut self, addrs: &[Ipv4Addr]) -> Batch {
        let Some(map) = &self.cluster_ips else {
            return Err((0, anyhow!("map {MAP_CLUSTER_IPS} is not pinned")));
        };
        let keys: Vec<u32> = addrs.iter().copied().map(abi::addr_to_net).collect();
        put_batch(map, &keys, &vec![1u8; keys.len()], "served ClusterIPs")
    }

    pub fn delete_cluster_ip(&mut self, addr: Ipv4Addr) -> Result<()> {
        let Some(map) = self.cluster_ips.as_mut() else {
            return Ok(());
        };
        ignore_missing(map.remove(&abi::addr_to_net(addr)))
            .with_context(|| format!("deleting ClusterIP {addr} from {MAP_CLUSTER_IPS}"))
    }

    /// Reads every entry. Entries that vanish mid-iteration are skipped, not errors; a
    /// failed read of the id-indexed arrays (one batch syscall each) is one.
    pub fn read(&self) -> Result<MapContents> {
        Ok(MapContents {
            services: self.services.iter().filter_map(|r| r.ok()).collect(),
            backends: held_entries(self.backends.map(), |b: &BackendValue| b.addr != 0)
                .context("reading the backends")?,
            rev_nat: held_entries(self.rev_nat.map(), |f: &RevNatValue| f.addr != 0)
                .context("reading the rev-NAT entries")?
                .into_iter()
                .filter_map(|(id, f)| Some((u16::try_from(id).ok()?, f)))
                .collect(),
            source_ranges: self
                .source_ranges
                .keys()
                .filter_map(|r| r.ok())
                .filter_map(|key| abi::source_range_of(key.prefix_len(), key.data()))
                .collect(),
            rev_nat_room: self.rev_nat.len(),
        })
    }

    pub fn put_source_range(&mut self, key: Key<SourceRangeKey>) -> Result<()> {
        self.source_ranges
            .insert(&key, 1, 0)
            .context("writing a loadBalancerSourceRanges entry")
    }

    pub fn delete_source_range(&mut self, key: Key<SourceRangeKey>) -> Result<()> {
        ignore_missing(self.source_ranges.remove(&key))
            .context("deleting a loadBalancerSourceRanges entry")
    }

    pub fn put_backend(&mut self, id: u32, value: BackendValue) -> Result<()> {
        self.backends
            .set(id, value, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    /// Empties the backend's entry (an array's entries cannot be removed).
    pub fn delete_backend(&mut self, id: u32) -> Result<()> {
        ignore_out_of_bounds(self.backends.set(id, BackendValue::default(), 0))
            .with_context(|| format!("deleting backend {id}"))
    }

    pub fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        self.services
            .insert(key, value, 0)
            .with_context(|| format!("writing services entry slot {}", key.slot))
    }

    pub fn delete_service(&mut self, key: ServiceKey) -> Result<()> {
        ignore_missing(self.services.remove(&key))
            .with_context(|| format!("deleting services entry slot {}", key.slot))
    }

    /// Writes services entries in order, in one syscall; on an error, how many were
    /// written before it.
    pub fn put_services(&mut self, keys: &[ServiceKey], values: &[ServiceValue]) -> Batch {
        put_batch(&self.services, keys, values, "services entries")
    }

    /// Writes backends in order, in one syscall (as `put_services`).
    pub fn put_backends(&mut self, ids: &[u32], values: &[BackendValue]) -> Batch {
        put_array_batch(self.backends.map(), ids, values, "backends")
    }

    /// Writes rev-NAT entries in order, in one syscall (as `put_services`).
    pub fn put_rev_nats(&mut self, ids: &[u16], values: &[RevNatValue]) -> Batch {
        let ids: Vec<u32> = ids.iter().copied().map(u32::from).collect();
        put_array_batch(self.rev_nat.map(), &ids, values, "rev-NAT entries")
    }

    pub fn put_rev_nat(&mut self, id: u16, value: RevNatValue) -> Result<()> {
        self.rev_nat
            .set(u32::from(id), value, 0)
            .with_context(|| format!("writing rev-NAT {id}"))
    }

    /// Deletes the session-affinity entries that stick a client of rev-NAT id `.0` to
    /// backend `.1`: that backend left the frontend. Returns how many went.
    pub fn forget_affinity(&mut self, stale: &BTreeSet<(u16, u32)>) -> Result<usize> {
        let doomed: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, v)| stale.contains(&(k.affinity_id, v.backend_id)))
            .map(|(k, _)| k)
            .collect();
        for key in &doomed {
            ignore_missing(self.affinity.remove(key)).context("deleting an affinity entry")?;
        }
        Ok(doomed.len())
    }

    /// Second handles on the socket programs' reverse maps, for a thread of its own.
    pub fn sock_reverse(&self) -> Result<SockReverse> {
        let dup = |map: &MapData| {
            map.fd()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating a socket reverse map's descriptor")
        };
        Ok(SockReverse {
            slots: Array::try_from(Map::Array(MapData::from_fd(dup(self.sock_slots.map())?)?))?,
            lru: HashMap::try_from(Map::LruHashMap(MapData::from_fd(dup(self
                .sock_rev_nat
                .map())?)?))?,
        })
    }

    /// A second handle on the north-south conntrack map, for the collector's thread.
    pub fn conntrack(&self) -> Result<Conntrack> {
        Conntrack::duplicate(self.nat_ct.map())
    }

    /// Empties the rev-NAT entry (as `delete_backend`).
    pub fn delete_rev_nat(&mut self, id: u16) -> Result<()> {
        ignore_out_of_bounds(self.rev_nat.set(u32::from(id), RevNatValue::default(), 0))
            .with_context(|| format!("deleting rev-NAT {id}"))
    }
}

/// Deleting what is already gone is success: the goal state is reached. aya reports a
/// hash map's or trie's missing key as the delete syscall's ENOENT (an LRU entry evicted
/// since it was listed, a key deleted by hand with bpftool).
fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Emptying an entry beyond an array's end is success: no entry is there to empty.
fn ignore_out_of_bounds(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::OutOfBounds { .. }) => Ok(()),
        other => other,
    }
}

/// Entries per `BPF_MAP_LOOKUP_BATCH` call when the id-indexed arrays are read.
const ARRAY_BATCH: usize = 8192;

/// The entries of an id-indexed array (backends, rev-NAT) that hold something (`held`),
/// read a few thousand per syscall: a read per index would take 65536 syscalls.
fn held_entries<V: aya::Pod>(map: &MapData, held: impl Fn(&V) -> bool) -> Result<Vec<(u32, V)>> {
    check_sizes::<u32, V>(map)?;
    let mut entries = Vec::new();
    bpf_sys::lookup_batch(map.fd().as_fd(), ARRAY_BATCH, |id: u32, value: V| {
        if held(&value) {
            entries.push((id, value));
        }
    })?;
    Ok(entries)
}

/// Fails unless `map`'s keys and values are the size of `K` and `V`: a batch read writes
/// whole entries of the map's sizes into buffers sized by the types.
fn check_sizes<K, V>(map: &MapData) -> Result<()> {
    let info = map.info().context("reading a map's info")?;
    let want = (size_of::<K>() as u32, size_of::<V>() as u32);
    if (info.key_size(), info.value_size()) != want {
        bail!(
            "map {:?} has {}-byte keys and {}-byte values, not {} and {}",
            info.name_as_str(),
            info.key_size(),
            info.value_size(),
            want.0,
            want.1
        );
    }
    Ok(())
}

/// Writes `values[i]` at index `ids[i]` of an array, in order, in one syscall.
fn put_array_batch<V: aya::Pod>(map: &MapData, ids: &[u32], values: &[V], what: &str) -> Batch {
    bpf_sys::update_batch(map.fd().as_fd(), ids, values)
        .map_err(|(done, e)| (done, e.context(format!("writing {what}"))))
}

/// The loaded programs; dropping this only closes file descriptors (the pinned links keep
/// the programs attached).
pub struct Programs {
    _logs: Option<logs::Forwarder>,
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// `--pod-devices` patterns (host-namespace-only socket LB); empty: no pod programs.
    pod_devices: Vec<String>,
    /// The ifindex of each pod device as attached by this process.
    pod_ifindex: std::collections::BTreeMap<String, u32>,
    /// What the north-south programs serve now (`None`: not attached).
    north_south: Option<NorthSouth>,
    /// The ifindex of each north-south device as attached.
    node_ifindex: std::collections::BTreeMap<String, u32>,
    tcx_loaded: bool,
}

impl Programs {
    /// What the north-south programs serve now.
    pub fn north_south(&self) -> Option<&NorthSouth> {
        self.north_south.as_ref()
    }

    /// Serves `wanted` with the north-south programs when it differs from what they serve
    /// (devices detected again: one appeared or went, was recreated, or the Node's address
    /// moved): attaches to new or recreated devices, detaches from the others, rewrites the
    /// node config. Returns whether anything changed.
    pub fn serve_north_south(&mut self, wanted: Option<&NorthSouth>) -> Result<bool> {
        let devices = wanted.map_or(&[][..], |ns| ns.devices.as_slice());
        let links: Vec<(String, u32)> = devices::links()?
            .into_iter()
            .filter(|(d, _)| devices.contains(d))
            .collect();
        let recreated = |(d, index): &&(String, u32)| self.node_ifindex.get(d) != Some(index);
        if self.north_south.as_ref() == wanted && !links.iter().any(|l| recreated(&l)) {
            return Ok(false);
        }
        let stale: Vec<(String, u32)> = links.iter().filter(recreated).cloned().collect();
        detach_other_devices(&self.pin_dir, &TCX_PROGRAMS, devices)?;
        self.node_ifindex.retain(|d, _| devices.contains(d));
        if let Some(ns) = wanted {
            write_node_config(&mut self.ebpf, ns.node_config)?;
            if !self.tcx_loaded {
                load_tc(&mut self.ebpf, &TCX_HOOKS)?;
                self.tcx_loaded = true;
            }
            let names: Vec<String> = stale.iter().map(|(d, _)| d.clone()).collect();
            detach_pins(&self.pin_dir, &TCX_PROGRAMS, &names)?;
            // Recorded again only if attached (a device may go while it is).
            for device in &names {
                self.node_ifindex.remove(device);
            }
            let attached = attach_tc(&mut self.ebpf, &self.pin_dir, &TCX_HOOKS, &stale)?;
            self.node_ifindex.extend(attached);
        }
        self.north_south = wanted.cloned();
        Ok(true)
    }

    /// Programs of ours that this process did not attach, on `cgroup` (the one it attached
    /// to) and the devices it serves: another agent's (see `foreign`).
    pub fn foreign(&self, cgroup: &Path) -> Result<Vec<Foreign>> {
        let ours: BTreeSet<u32> = SOCK_PROGRAMS
            .iter()
            .chain(&TCX_PROGRAMS)
            .chain(POD_HOOKS.iter().map(|(name, _)| name))
            .filter_map(|name| self.ebpf.program(name)?.info().ok())
            .map(|info| info.id())
            .collect();
        let devices: Vec<(String, u32)> = self
            .node_ifindex
            .iter()
            .chain(&self.pod_ifindex)
            .map(|(d, i)| (d.clone(), *i))
            .collect();
        foreign::find(cgroup, &devices, &ours)
    }

    /// Attaches the pod programs to every device matching `--pod-devices` that does not
    /// have them yet (pods come and go: called at every sync), re-attaches where a device
    /// was recreated under the same name (the kernel detached its link), and unpins the
    /// links of devices that went away or no longer match. Returns the devices served.
    pub fn attach_pod_devices(&mut self) -> Result<Vec<String>> {
        if self.pod_devices.is_empty() {
            return Ok(Vec::new());
        }
        let links: Vec<(String, u32)> = devices::links()?
            .into_iter()
            .filter(|(d, _)| devices::matches(&self.pod_devices, d))
            .collect();
        let names: Vec<String> = links.iter().map(|(d, _)| d.clone()).collect();
        let programs = POD_HOOKS.map(|(name, _)| name);
        detach_other_devices(&self.pin_dir, &programs, &names)?;
        self.pod_ifindex.retain(|d, _| names.contains(d));
        let stale: Vec<(String, u32)> = links
            .iter()
            .filter(|(d, index)| self.pod_ifindex.get(d) != Some(index))
            .cloned()
            .collect();
        if !stale.is_empty() {
            // A pin for a device we did not attach in this run (or that was recreated):
            // attach anew rather than adopt a link the kernel may have detached.
            let stale_names: Vec<String> = stale.iter().map(|(d, _)| d.clone()).collect();
            detach_pins(&self.pin_dir, &programs, &stale_names)?;
            // Recorded again only if attached (a device may go while it is).
            for device in &stale_names {
                self.pod_ifindex.remove(device);
            }
            let attached = attach_tc(&mut self.ebpf, &self.pin_dir, &POD_HOOKS, &stale)?;
            self.pod_ifindex.extend(attached);
        }
        // Less those gone while attaching.
        Ok(names
            .into_iter()
            .filter(|d| self.pod_ifindex.contains_key(d))
            .collect())
    }
}

/// The programs' switch (a global set at load time) for a socket rev-NAT LRU whose entries'
/// sockets are not marked in their storage (see `proxy-ebpf/src/sock_state.rs`).
const UNMARKED_LRU: &str = "EKP_UNMARKED_LRU";

/// Whether the pinned socket rev-NAT LRU holds entries that programs without the sockets'
/// storage wrote (an upgrade from a version before `ekp_sk_state_v1`): their sockets carry
/// no mark, so the reverse hooks must look every socket up, as those programs did.
fn unmarked_lru(pin_dir: &Path) -> Result<bool> {
    let lru = maps_dir(pin_dir).join(MAP_SOCK_REV_NAT);
    if !lru.exists() || maps_dir(pin_dir).join(MAP_SOCK_STATE).exists() {
        return Ok(false);
    }
    let info = aya::maps::MapInfo::from_pin(&lru)
        .with_context(|| format!("reading map info of {}", lru.display()))?;
    let fd = info.fd()?;
    let entries = bpf_sys::count_keys(fd.as_fd(), info.key_size(), 1)
        .with_context(|| format!("counting the entries of {}", lru.display()))?;
    Ok(entries > 0)
}

/// Copies what the backends and rev-NAT hash maps of an older version (`_v1`) hold into the
/// arrays that replaced them: when the new programs are attached (`start`), they find every
/// id the attached ones knew, so that no connection sees a moment without its backend
/// (C33), and the agent adopts the same ids. The old programs keep their maps until their
/// links are swapped; no one writes those meanwhile (the agent is this process). Returns
/// their pins, which `start` removes once the new programs are attached: a start that
/// fails before leaves them to the version rolled back to (or to the next try, which copies
/// them again). A `_v1` map is the truth when it is there: arrays pinned beside it (left by
/// a newer agent before a downgrade) are overwritten whole.
fn adopt_v1_hash_maps(pin_dir: &Path, ebpf: &Ebpf) -> Result<Vec<PathBuf>> {
    let backends = adopt_v1_hash_map::<u32, BackendValue>(
        pin_dir,
        ebpf,
        MAP_BACKENDS_V1,
        MAP_BACKENDS,
        u32::from,
    )?;
    let rev_nat = adopt_v1_hash_map::<u16, RevNatValue>(
        pin_dir,
        ebpf,
        MAP_REV_NAT_V1,
        MAP_REV_NAT,
        u32::from,
    )?;
    Ok(backends.into_iter().chain(rev_nat).collect())
}

/// The pin of the `_v1` map copied, if there was one.
fn adopt_v1_hash_map<K: aya::Pod, V: aya::Pod + Default>(
    pin_dir: &Path,
    ebpf: &Ebpf,
    old_name: &str,
    new_name: &str,
    index: impl Fn(K) -> u32,
) -> Result<Option<PathBuf>> {
    let old_pin = maps_dir(pin_dir).join(old_name);
    if !old_pin.exists() {
        return Ok(None);
    }
    let old = MapData::from_pin(&old_pin)
        .with_context(|| format!("opening pinned map {}", old_pin.display()))?;
    check_sizes::<K, V>(&old)?;
    let Some(Map::Array(new)) = ebpf.map(new_name) else {
        bail!("map {new_name} missing from the eBPF object, or not an array");
    };
    let size = new.info()?.max_entries();
    let mut values = vec![V::default(); size as usize];
    let (mut copied, mut beyond) = (0usize, Vec::new());
    bpf_sys::lookup_batch(
        old.fd().as_fd(),
        ARRAY_BATCH,
        |key: K, value: V| match values.get_mut(index(key) as usize) {
            Some(slot) => {
                *slot = value;
                copied += 1;
            }
            None => beyond.push(index(key)),
        },
    )
    .with_context(|| format!("reading {}", old_pin.display()))?;
    if !beyond.is_empty() {
        // Their Services' slots then name no backend (or frontend) until the first sync
        // gives them ids within the array.
        tracing::warn!(
            map = old_name,
            ids = ?beyond,
            size,
            "ids beyond the array that replaces this map are not copied"
        );
    }
    let indexes: Vec<u32> = (0..size).collect();
    put_array_batch(new, &indexes, &values, new_name).map_err(|(_, e)| e)?;
    tracing::info!(
        from = old_name,
        to = new_name,
        entries = copied,
        "copied the entries of an older version's map into the array that replaces it"
    );
    Ok(Some(old_pin))
}

/// The socket programs' settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct SockSettings {
    /// The node's network namespace cookie (`devices::own_netns_cookie`): the only
    /// namespace served NodePorts on loopback addresses.
    pub host_netns_cookie: u64,
    /// Host-namespace-only socket LB: no other namespace is translated.
    pub host_only: bool,
    /// NodePorts on loopback at `127.0.0.1` alone, not on all of `127.0.0.0/8`.
    pub loopback_exact: bool,
}

/// The eBPF object with its programs verified and none attached: the slow part of a start
/// (the kernel's verifier: about 0.4 s on a 2-core VM), which needs nothing from the
/// source, so `run` does it on a thread of its own while it reads and translates the
/// Services.
pub struct Loaded {
    ebpf: Ebpf,
    tcx_loaded: bool,
    pod_loaded: bool,
    /// Pinned maps of another size than asked: copied into the new ones and replaced by
    /// them as the programs are attached.
    resizes: resize::Resizes,
    /// An older version's maps, copied into their replacements: unpinned once the programs
    /// are attached.
    adopted_v1: Vec<PathBuf>,
    /// Where the sockets' storage this load created goes: pinned once the socket programs
    /// are attached, so that a start that stops before leaves its absence to tell the
    /// next start that the LRU's entries are unmarked (`unmarked_lru`).
    sock_state_pin: Option<PathBuf>,
}

/// Loads the object, reusing pinned maps of the sizes asked (`resize` plans the others), and
/// verifies the socket programs, the north-south ones with `north_south` (whether
/// north-south is on at all: the devices are known only later) and the pod-device ones
/// with `pod_programs`. `bpf_log_level` (`LOG_LEVEL_*`) is written to the log switch,
/// before any program can attach.
pub fn load(
    pin_dir: &Path,
    sizes: MapSizes,
    bpf_log_level: u8,
    north_south: bool,
    pod_programs: bool,
) -> Result<Loaded> {
    ensure_bpffs(pin_dir)?;
    fs::create_dir_all(maps_dir(pin_dir))
        .with_context(|| format!("creating {}", maps_dir(pin_dir).display()))?;
    fs::create_dir_all(links_dir(pin_dir))?;

    let pin_paths: Vec<(&str, PathBuf)> = ALL_MAPS
        .iter()
        .map(|name| (*name, maps_dir(pin_dir).join(name)))
        .collect();
    let resizes = resize::plan(pin_dir, &sizes)?;
    let unmarked = u8::from(unmarked_lru(pin_dir)?);
    if unmarked != 0 {
        tracing::info!(
            "the socket rev-NAT LRU holds entries from an older version, which did not mark \
             their sockets: the reverse hooks look every socket up there until the agent \
             starts again after this start"
        );
    }
    let sock_state_pin = Some(maps_dir(pin_dir).join(MAP_SOCK_STATE)).filter(|p| !p.exists());
    let mut loader = EbpfLoader::new();
    for (name, path) in &pin_paths {
        let created_here = *name == MAP_SOCK_STATE && sock_state_pin.is_some();
        if !resizes.replaces(name) && !created_here {
            loader.map_pin_path(name, path.as_path());
        }
    }
    loader
        .override_global(UNMARKED_LRU, &unmarked, true)
        .map_max_entries(MAP_SERVICES, sizes.services)
        .map_max_entries(MAP_BACKENDS, sizes.backends)
        .map_max_entries(MAP_REV_NAT, sizes.rev_nat)
        .map_max_entries(MAP_SOCK_REV_NAT, sizes.sock_rev_nat)
        .map_max_entries(MAP_AFFINITY, sizes.affinity)
        .map_max_entries(MAP_NAT_CT, sizes.nat_ct)
        .map_max_entries(MAP_SOURCE_RANGES, sizes.source_ranges);
    let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
    let adopted_v1 = adopt_v1_hash_maps(pin_dir, &ebpf)?;
    disarm_ns_filter(&mut ebpf)?;
    logs::set_loaded_level(&mut ebpf, bpf_log_level)?;
    // The north-south programs first: `ekp_tcx_in` is the largest (see `verify`).
    let mut wanted: Vec<&str> = Vec::new();
    if north_south {
        wanted.extend(TCX_HOOKS.iter().map(|(name, _)| *name));
    }
    if pod_programs {
        wanted.extend(POD_HOOKS.iter().map(|(name, _)| *name));
    }
    wanted.extend(SOCK_PROGRAMS);
    verify(&mut ebpf, &wanted)?;
    Ok(Loaded {
        ebpf,
        tcx_loaded: north_south,
        pod_loaded: pod_programs,
        resizes,
        adopted_v1,
        sock_state_pin,
    })
}

/// Puts `loaded` to work: attaches (or re-targets pinned) links on `cgroup`, and, with
/// `north_south`, on its devices (after writing the node config, so that no packet meets
/// the programs before they know the SNAT address). The programs' log records are
/// forwarded to `tracing` (target `ebpf`) on the current tokio runtime.
pub fn start(
    loaded: Loaded,
    pin_dir: &Path,
    cgroup: &Path,
    north_south: Option<&NorthSouth>,
    sock: SockSettings,
    pod_devices: &[String],
) -> Result<(Maps, Programs)> {
    let Loaded {
        mut ebpf,
        mut tcx_loaded,
        pod_loaded,
        resizes,
        adopted_v1,
        sock_state_pin,
    } = loaded;
    let log_forwarder = logs::forward(&mut ebpf);
    write_sock_config(&mut ebpf, pin_dir, sock)?;
    // As late as possible: the old programs record flows until their links are swapped.
    resizes.copy(&mut ebpf)?;

    let cgroup_dir =
        fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    // A cgroup v2 directory's inode number is the cgroup's id.
    let cgroup_id = std::os::unix::fs::MetadataExt::ino(&cgroup_dir.metadata()?);
    for name in SOCK_PROGRAMS {
        let program = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?;
        let fd = program.fd()?.try_clone()?;
        let link_pin = links_dir(pin_dir).join(name);
        adopt_or_attach_cgroup(name, &link_pin, fd.as_fd(), cgroup_id, || {
            // A BPF link on a cgroup always coexists with other programs; the kernel
            // rejects the ALLOW_MULTI flag there, so "Single" (no flag) is the right mode.
            let mode = CgroupAttachMode::Single;
            let attached = || format!("attaching {name} to {}", cgroup.display());
            Ok(match program {
                Program::CgroupSockAddr(p) => {
                    let id = p.attach(&cgroup_dir, mode).with_context(attached)?;
                    p.take_link(id)?.try_into()?
                }
                Program::CgroupSock(p) => {
                    let id = p.attach(&cgroup_dir, mode).with_context(attached)?;
                    p.take_link(id)?.try_into()?
                }
                _ => bail!("program {name} is not a cgroup socket program"),
            })
        })?;
    }
    // The socket programs, the storage's only users, are attached: from here a failed
    // start leaves the next one the storage they mark the sockets in.
    if let Some(pin) = sock_state_pin {
        ebpf.map(MAP_SOCK_STATE)
            .with_context(|| format!("map {MAP_SOCK_STATE} missing from the eBPF object"))?
            .pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
    }
    let devices = north_south.map_or(&[][..], |ns| ns.devices.as_slice());
    detach_other_devices(pin_dir, &TCX_PROGRAMS, devices)?;
    // The devices there are: one named that is not (created later at boot, being created
    // again) gets the programs when it appears (`Programs::serve_north_south`), as while
    // running, instead of failing the start. Listed before attaching: a device created
    // again in between has another ifindex, and is served again at the next look.
    let mut present: Vec<(String, u32)> = devices::links()?
        .into_iter()
        .filter(|(d, _)| devices.contains(d))
        .collect();
    for missing in devices
        .iter()
        .filter(|d| !present.iter().any(|(p, _)| p == *d))
    {
        tracing::warn!(
            device = %missing,
            "no such device: its north-south programs are attached when it appears"
        );
    }
    if let Some(north_south) = north_south {
        write_node_config(&mut ebpf, north_south.node_config)?;
        if !tcx_loaded {
            load_tc(&mut ebpf, &TCX_HOOKS)?;
            tcx_loaded = true;
        }
        present = attach_tc(&mut ebpf, pin_dir, &TCX_HOOKS, &present)?;
    }
    let node_ifindex = present.into_iter().collect();
    // Pod links of a previous run are swapped to the new programs like the others
    // (`Programs::attach_pod_devices` then serves the pods that came since).
    let pod_programs = POD_HOOKS.map(|(name, _)| name);
    let mut pod_ifindex = std::collections::BTreeMap::new();
    if pod_devices.is_empty() {
        detach_other_devices(pin_dir, &pod_programs, &[])?;
    } else {
        if !pod_loaded {
            load_tc(&mut ebpf, &POD_HOOKS)?;
        }
        let pinned = pinned_devices(pin_dir, POD_HOOKS[0].0)?;
        let present: Vec<(String, u32)> = devices::links()?
            .into_iter()
            .filter(|(d, _)| pinned.contains(d) && devices::matches(pod_devices, d))
            .collect();
        pod_ifindex.extend(attach_tc(&mut ebpf, pin_dir, &POD_HOOKS, &present)?);
    }
    resizes.commit(&mut ebpf, pin_dir)?;
    for old_pin in adopted_v1 {
        fs::remove_file(&old_pin).with_context(|| format!("unpinning {}", old_pin.display()))?;
    }
    let maps = Maps::take(&mut ebpf)?;
    Ok((
        maps,
        Programs {
            _logs: log_forwarder,
            ebpf,
            pin_dir: pin_dir.to_owned(),
            pod_devices: pod_devices.to_vec(),
            pod_ifindex,
            north_south: north_south.cloned(),
            node_ifindex,
            tcx_loaded,
        },
    ))
}

/// Writes the only entry of the socket programs' config array, and unpins the array it
/// replaced (`_v1`) and the sockets' storage under its older name.
fn write_sock_config(ebpf: &mut Ebpf, pin_dir: &Path, sock: SockSettings) -> Result<()> {
    let map = ebpf
        .map_mut(MAP_SOCK_CONFIG)
        .with_context(|| format!("map {MAP_SOCK_CONFIG} missing from the eBPF object"))?;
    let mut array: Array<_, SockConfig> = Array::try_from(map)?;
    let config = SockConfig {
        host_netns_cookie: sock.host_netns_cookie,
        flags: if sock.host_only {
            SOCK_FLAG_HOST_ONLY
        } else {
            0
        } | if sock.loopback_exact {
            SOCK_FLAG_LOOPBACK_EXACT
        } else {
            0
        },
        _pad: [0; 7],
    };
    array
        .set(0, config, 0)
        .with_context(|| format!("writing {MAP_SOCK_CONFIG}"))?;
    // The older versions' maps hold nothing to keep; their programs keep their reference
    // until their links are swapped.
    for old in [MAP_SOCK_CONFIG_V1, MAP_SOCK_PINS_V1] {
        let old_pin = maps_dir(pin_dir).join(old);
        match fs::remove_file(&old_pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("unpinning {}", old_pin.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Unpins the links of `programs` on `devices`.
fn detach_pins(pin_dir: &Path, programs: &[&str], devices: &[String]) -> Result<()> {
    for program in programs {
        for device in devices {
            let path = links_dir(pin_dir).join(tcx_link_name(program, device));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("unpinning {}", path.display()));
                }
            }
        }
    }
    Ok(())
}

/// The devices that have a pinned link of `program`.
fn pinned_devices(pin_dir: &Path, program: &str) -> Result<Vec<String>> {
    let Ok(entries) = fs::read_dir(links_dir(pin_dir)) else {
        return Ok(Vec::new());
    };
    let mut devices = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some((p, device)) = name.to_str().and_then(tcx_link_of)
            && p == program
        {
            devices.push(device);
        }
    }
    Ok(devices)
}

/// Turns the north-south prefilter off until the first sync has written every bit it needs
/// (`sync`'s `NsFilters`, whose bits then replace these): the pinned filter may lack
/// frontends that an older agent, which did not know it, wrote since it was last armed. Only
/// the flag changes here.
fn disarm_ns_filter(ebpf: &mut Ebpf) -> Result<()> {
    let mut filter: Array<&mut MapData, NsFilter> = ebpf
        .map_mut(MAP_NS_FILTER)
        .with_context(|| format!("map {MAP_NS_FILTER} missing from the eBPF object"))?
        .try_into()?;
    for entry in [NS_FILTER_IN, NS_FILTER_OUT] {
        let mut value = filter
            .get(&entry, 0)
            .with_context(|| format!("reading {MAP_NS_FILTER} entry {entry}"))?;
        if value.armed != 0 {
            value.armed = 0;
            filter
                .set(entry, value, 0)
                .with_context(|| format!("disarming {MAP_NS_FILTER} entry {entry}"))?;
        }
    }
    Ok(())
}

/// Writes the only entry of the north-south config array.
fn write_node_config(ebpf: &mut Ebpf, config: NodeConfig) -> Result<()> {
    let map = ebpf
        .map_mut(MAP_CONFIG)
        .with_context(|| format!("map {MAP_CONFIG} missing from the eBPF object"))?;
    let mut array: Array<_, NodeConfig> = Array::try_from(map)?;
    array
        .set(0, config, 0)
        .with_context(|| format!("writing {MAP_CONFIG}"))
}

/// Loads (verifies) the programs `names`, on two threads: verifying is most of a start's
/// work when the Services are few, and about as long as reading and translating 10000 of
/// them (which the caller does meanwhile). Each thread takes the next program in `names`
/// when it is done with one, so that both finish at about the same time.
fn verify(ebpf: &mut Ebpf, names: &[&str]) -> Result<()> {
    let mut found: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(name, _)| names.contains(name))
        .collect();
    if let Some(missing) = names
        .iter()
        .find(|n| !found.iter().any(|(name, _)| name == *n))
    {
        bail!("program {missing} missing from the eBPF object");
    }
    found.sort_by_key(|(name, _)| names.iter().position(|n| n == name));
    let queue = std::sync::Mutex::new(found.into_iter());
    let load_next = || -> Result<()> {
        loop {
            let next = queue
                .lock()
                .map_err(|_| anyhow!("a loading thread panicked"))?
                .next();
            let Some((name, program)) = next else {
                return Ok(());
            };
            match program {
                Program::CgroupSockAddr(p) => p.load(),
                Program::CgroupSock(p) => p.load(),
                Program::SchedClassifier(p) => p.load(),
                _ => bail!("program {name} is not a cgroup socket or TC program"),
            }
            .with_context(|| format!("loading program {name} (verifier)"))?;
        }
    };
    std::thread::scope(|scope| {
        let other = scope.spawn(load_next);
        let here = load_next();
        let there = other
            .join()
            .map_err(|_| anyhow!("a thread loading programs panicked"))?;
        here.and(there)
    })
}

/// Loads (verifies) the TC programs of `hooks`.
fn load_tc(ebpf: &mut Ebpf, hooks: &[(&str, TcAttachType)]) -> Result<()> {
    for (name, _) in hooks {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("loading program {name} (verifier)"))?;
    }
    Ok(())
}

/// Swaps the loaded program `fd` into the socket program's link pinned at `link_pin` (a
/// restart), or attaches it to the cgroup `cgroup_id` with `attach` and pins the new link.
///
/// A pinned link on another cgroup (`--cgroup` changed), or on none (its cgroup was
/// removed, which detaches it), is not adopted: the new link is attached first, then takes
/// the pin (renamed over it, which drops the old link), so that a process under both
/// cgroups is never without the program. For that moment it may run both, which the
/// programs' logic makes harmless (not tested): the second sees an address the first
/// already translated, which is no frontend (nor, on the way back, a backend its socket
/// remembers).
fn adopt_or_attach_cgroup(
    name: &str,
    link_pin: &Path,
    fd: std::os::fd::BorrowedFd<'_>,
    cgroup_id: u64,
    attach: impl FnOnce() -> Result<FdLink>,
) -> Result<()> {
    // (bpffs names cannot hold a dot.) One left by a start stopped mid-move goes first.
    let moving = link_pin.with_file_name(format!("{name}_moving"));
    if moving.exists() {
        fs::remove_file(&moving).with_context(|| format!("unpinning {}", moving.display()))?;
    }
    if link_pin.exists() {
        let link = bpf_sys::obj_get(link_pin)?;
        let pinned_on = bpf_sys::link_cgroup_id(link.as_fd())
            .with_context(|| format!("reading pinned link {}", link_pin.display()))?;
        if pinned_on == cgroup_id {
            bpf_sys::link_update(link.as_fd(), fd)
                .with_context(|| format!("updating pinned link {}", link_pin.display()))?;
            tracing::info!(program = name, link = %link_pin.display(), "adopted pinned link");
            return Ok(());
        }
        attach()?
            .pin(&moving)
            .with_context(|| format!("pinning link {}", moving.display()))?;
        fs::rename(&moving, link_pin).with_context(|| {
            format!("renaming {} over {}", moving.display(), link_pin.display())
        })?;
        tracing::info!(
            program = name,
            link = %link_pin.display(),
            old_cgroup_id = pinned_on,
            cgroup_id,
            "the pinned link was on another cgroup (0: a removed one): attached to this one \
             instead"
        );
    } else {
        attach()?
            .pin(link_pin)
            .with_context(|| format!("pinning link {}", link_pin.display()))?;
        tracing::info!(program = name, link = %link_pin.display(), "attached");
    }
    Ok(())
}

/// Attaches the loaded programs of `hooks` to each device, at the end of the TCX chain
/// (`LinkOrder::default()`: after what is already there, so that a firewall attached
/// before us still sees the untranslated packets). A pinned link is adopted with
/// `BPF_LINK_UPDATE`, as the cgroup links are; one the kernel detached (its device went
/// away and came back) is replaced by a new one.
///
/// Returns the devices that got every program. One that went away since it was listed (a
/// pod deleted meanwhile) is left out with a warning rather than failing the rest: its
/// links are gone with it, and a device created again under its name is served at the
/// next look, as one that appears is.
fn attach_tc(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    hooks: &[(&str, TcAttachType)],
    devices: &[(String, u32)],
) -> Result<Vec<(String, u32)>> {
    let mut gone = BTreeSet::new();
    for &(name, hook) in hooks {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()?;
        for (device, ifindex) in devices {
            if gone.contains(device) {
                continue;
            }
            let link_pin = links_dir(pin_dir).join(tcx_link_name(name, device));
            if link_pin.exists() {
                let link = bpf_sys::obj_get(&link_pin)?;
                // The pin names a device, the link holds one: the device may have been
                // renamed while no agent ran, and another have taken its name.
                let on = bpf_sys::link_tcx_ifindex(link.as_fd());
                let adopted = match on {
                    Ok(on) if on == *ifindex => {
                        bpf_sys::link_update(link.as_fd(), program.fd()?.as_fd())
                    }
                    Ok(on) => Err(anyhow::anyhow!(
                        "it is on the device of ifindex {on}, {device} is {ifindex}"
                    )),
                    Err(e) => Err(e),
                };
                match adopted {
                    Ok(()) => {
                        tracing::info!(program = name, device = %device, link = %link_pin.display(), "adopted pinned link");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(program = name, device = %device, "pinned link not adopted ({e:#}); attaching anew");
                        fs::remove_file(&link_pin)
                            .with_context(|| format!("unpinning {}", link_pin.display()))?;
                    }
                }
            }
            let attached = program.attach_with_options(
                device,
                hook,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            );
            let id = match attached {
                Ok(id) => id,
                Err(e) if devices::gone(device, *ifindex) => {
                    tracing::warn!(program = name, device = %device, "device gone while attaching ({e}): left out");
                    gone.insert(device.clone());
                    continue;
                }
                Err(e) => {
                    let e = anyhow::Error::new(e)
                        .context(format!("attaching {name} to device {device} (TCX)"));
                    return Err(explain_tcx(e));
                }
            };
            let link: FdLink = program.take_link(id)?.try_into()?;
            link.pin(&link_pin)
                .with_context(|| format!("pinning link {}", link_pin.display()))?;
            tracing::info!(program = name, device = %device, "attached");
        }
    }
    Ok(devices
        .iter()
        .filter(|(d, _)| !gone.contains(d))
        .cloned()
        .collect())
}

/// Adds to a failed TCX attach what a kernel before 6.6 lacks (the `tcx` link) and what
/// serves without it.
fn explain_tcx(error: anyhow::Error) -> anyhow::Error {
    const TCX: aya::util::KernelVersion = aya::util::KernelVersion::new(6, 6, 0);
    match aya::util::KernelVersion::current() {
        Ok(kernel) if kernel < TCX => error.context(format!(
            "the programs of the node's and pods' devices attach as TCX links, which Linux \
             has since 6.6; this kernel is {kernel}. With `--devices=` (empty) and no \
             `--pod-devices`, the socket programs alone serve ClusterIPs"
        )),
        _ => error,
    }
}

/// Unpins (and so detaches) the links of `programs` on devices not in `devices`: the
/// operator took them out of north-south service, or the pod went away.
fn detach_other_devices(pin_dir: &Path, programs: &[&str], devices: &[String]) -> Result<()> {
    let Ok(entries) = fs::read_dir(links_dir(pin_dir)) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        let Some((program, device)) = tcx_link_of(file) else {
            continue;
        };
        if programs.contains(&program) && !devices.contains(&device) {
            fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            tracing::info!(program, device, "detached from a device no longer served");
        }
    }
    Ok(())
}

/// How full one pinned map is.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MapFill {
    pub map: String,
    pub entries: u64,
    pub capacity: u32,
}

/// Entries and capacity of every pinned map under `pin_dir`: arrays count as full, except
/// the socket slot table, whose entries are the slots sockets hold, the id-indexed
/// arrays, whose entries are the ids in use, and the north-south prefilter, whose entries
/// are its bits set, of the bits of all its entries (how much traffic it cannot send on
/// at once). The socket pin storage is left out: socket-local storage has neither a
/// capacity nor keys to count.
pub fn map_fill(pin_dir: &Path) -> Result<Vec<MapFill>> {
    let mut fills = Vec::new();
    for name in ALL_MAPS {
        let path = maps_dir(pin_dir).join(name);
        if !path.exists() || name == MAP_SOCK_STATE {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("reading map info of {}", path.display()))?;
        let is_array = matches!(
            info.map_type(),
            Ok(aya::maps::MapType::Array | aya::maps::MapType::PerCpuArray)
        );
        let entries = if name == MAP_SOCK_SLOTS {
            let slots: Array<MapData, SockSlot> =
                Array::try_from(Map::Array(MapData::from_pin(&path)?))?;
            held_slots(&slots)
        } else if name == MAP_BACKENDS {
            let map = MapData::from_pin(&path)?;
            held_entries(&map, |b: &BackendValue| b.addr != 0)?.len() as u64
        } else if name == MAP_REV_NAT {
            let map = MapData::from_pin(&path)?;
            held_entries(&map, |f: &RevNatValue| f.addr != 0)?.len() as u64
        } else if name == MAP_NS_FILTER {
            let filter: Array<MapData, NsFilter> =
                Array::try_from(Map::Array(MapData::from_pin(&path)?))?;
            let mut bits = 0;
            for entry in 0..NS_FILTER_ENTRIES {
                let value = filter
                    .get(&entry, 0)
                    .with_context(|| format!("reading {name} entry {entry}"))?;
                bits += value
                    .bits
                    .iter()
                    .map(|w| u64::from(w.count_ones()))
                    .sum::<u64>();
            }
            bits
        } else if is_array {
            u64::from(info.max_entries())
        } else {
            let fd = info.fd()?;
            bpf_sys::count_keys(fd.as_fd(), info.key_size(), info.max_entries().into())
                .with_context(|| format!("counting the entries of {name}"))?
        };
        let capacity = match name {
            MAP_NS_FILTER => info.max_entries() * NS_FILTER_BITS,
            _ => info.max_entries(),
        };
        fills.push(MapFill {
            map: name.to_owned(),
            entries,
            capacity,
        });
    }
    Ok(fills)
}

/// Slots of the table that a socket holds (or is writing). One read per slot: this is for
/// `list --maps`, not a hot path.
fn held_slots(slots: &Array<MapData, SockSlot>) -> u64 {
    slots
        .iter()
        .filter(|slot| slot.as_ref().is_ok_and(|s| s.cookie != 0))
        .count() as u64
}

/// Removes every pin the agent made: links first (which detaches the programs once no
/// process holds them), then maps. Returns what was removed.
pub fn cleanup(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for dir in [links_dir(pin_dir), maps_dir(pin_dir)] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            removed.push(path);
        }
        fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if pin_dir.exists() {
        fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    Ok(removed)
}

/// Whether a mount made at `target` would be seen outside this mount namespace: the mount
/// `target` is on (the longest mount point that holds it, in `mountinfo`'s text) is a
/// shared one (`shared:N` among its optional fields). A slave (`master:N` alone, a
/// container's HostToContainer) or private one keeps it to itself.
fn mount_is_shared(mountinfo: &str, target: &Path) -> bool {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "<id> <parent> <major:minor> <root> <mount point> <options> [optional...] - ..."
            let (left, _) = line.split_once(" - ")?;
            let mut fields = left.split_whitespace();
            let point = Path::new(fields.nth(4)?);
            let shared = fields.skip(1).any(|f| f.starts_with("shared:"));
            target.starts_with(point).then_some((point, shared))
        })
        .max_by_key(|(point, _)| point.components().count())
        .is_some_and(|(_, shared)| shared)
}

/// The cgroup v2 mount point (from /proc/self/mountinfo), the default attach point.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            // "... <mount point> <options> - cgroup2 <source> <super options>"
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 filesystem is mounted")
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory, locked (`flock`) for one agent while it runs: two agents writing
/// one set of maps would hand out backend and rev-NAT ids from two mirrors of them, each
/// overwriting what the other wrote, until a restart (a renamed release's DaemonSet
/// starting while the old one's pods still run). The lock goes with the process.
pub struct PinDirLock {
    _dir: Option<fs::File>,
}

/// Locks `pin_dir` if no agent holds it; `None` when one does. A missing directory gives a
/// lock of nothing: there is nothing to guard.
pub fn try_lock_pin_dir(pin_dir: &Path) -> Result<Option<PinDirLock>> {
    let dir = match fs::File::open(pin_dir) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some(PinDirLock { _dir: None }));
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", pin_dir.display())),
    };
    // SAFETY: a plain syscall on an open descriptor.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(PinDirLock { _dir: Some(dir) }));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(e).context("locking the pin directory")
}

/// Whether an agent serves this node from `pin_dir`: one runs (it holds the directory's
/// lock), and the socket programs are attached (their links pinned: by this agent's start,
/// once the source's first lists are in, just before its first sync; or by an earlier
/// run, serving from the pinned maps meanwhile). Reads files only: no BPF capability
/// needed. `Err` says what is missing.
pub fn agent_serves(pin_dir: &Path) -> std::result::Result<(), String> {
    match try_lock_pin_dir(pin_dir) {
        Ok(None) => {}
        Ok(Some(_)) => {
            return Err(format!(
                "no ebpf-kube-proxy agent runs on {} (nothing holds its lock)",
                pin_dir.display()
            ));
        }
        Err(e) => return Err(format!("{e:#}")),
    }
    let link = links_dir(pin_dir).join(SOCK_PROGRAMS[0]);
    if !link.exists() {
        return Err(format!(
            "the agent on {} has not attached its programs yet (no {})",
            pin_dir.display(),
            link.display()
        ));
    }
    Ok(())
}

/// Locks `pin_dir` (made first, on a bpf filesystem mounted if needed); when another
/// agent holds it, `waiting` is called (once) and the lock waited for.
pub fn lock_pin_dir(pin_dir: &Path, waiting: impl FnOnce()) -> Result<PinDirLock> {
    use std::os::unix::fs::MetadataExt;
    let mut waiting = Some(waiting);
    loop {
        ensure_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
        let dir =
            fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
        let lock = |operation| {
            // SAFETY: a plain syscall on an open descriptor.
            if unsafe { libc::flock(dir.as_raw_fd(), operation) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        match lock(libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                if let Some(waiting) = waiting.take() {
                    waiting();
                }
                loop {
                    match lock(libc::LOCK_EX) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e).context("locking the pin directory"),
                    }
                }
            }
            Err(e) => return Err(e).context("locking the pin directory"),
        }
        // The lock is the directory's, not its path's: one removed meanwhile (by hand, or by
        // an older version's `cleanup`) is no longer what a third agent would lock.
        let held = dir.metadata()?;
        match fs::metadata(pin_dir) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                return Ok(PinDirLock { _dir: Some(dir) });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", pin_dir.display())),
        }
    }
}

/// Pins need a bpf filesystem. Like Cilium, mount one at /sys/fs/bpf when it is missing.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let bpffs = Path::new("/sys/fs/bpf");
    let mut probe = pin_dir;
    while !probe.exists() {
        probe = probe.parent().context("pin path has no existing parent")?;
    }
    if fs_magic(probe)? == BPF_FS_MAGIC {
        return Ok(());
    }
    if pin_dir.starts_with(bpffs) && probe.starts_with(bpffs) && probe == bpffs {
        // In a container whose /sys/fs/bpf is not shared with the host (no Bidirectional
        // propagation), the mount stays the container's: the pins, and with them the
        // links, go when it stops, and every restart leaves the node untranslated until
        // the new agent attaches (Cilium warns likewise).
        let shared = fs::read_to_string("/proc/self/mountinfo")
            .map(|m| mount_is_shared(&m, bpffs))
            .unwrap_or(true);
        if !shared {
            tracing::warn!(
                "/sys/fs/bpf is not a bpf filesystem, and one mounted here would not reach \
                 the host (its mount is not shared: a container without Bidirectional \
                 mount propagation): the pinned programs and maps will not outlive this \
                 process. Mount bpffs at /sys/fs/bpf on the host (the chart's \
                 bpf.autoMount does)."
            );
        }
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
        }
        tracing::info!("mounted bpffs at /sys/fs/bpf");
        return Ok(());
    }
    bail!(
        "pin path {} is not on a bpf filesystem (mount -t bpf bpf <dir>)",
        pin_dir.display()
    )
}

fn fs_magic(path: &Path) -> Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type)
}

/// The bpf(2) commands aya 0.14 does not expose: for pinned links, batched reads, and
/// deletes that return what they deleted.
mod bpf_sys {
    use super::*;

    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    const BPF_LINK_UPDATE: libc::c_long = 29;

    /// `union bpf_attr`, large enough for these commands (the kernel ignores zeroed tails).
    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
        // SAFETY: attr is a valid, fully initialised bpf_attr buffer of the given size.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut Attr,
                std::mem::size_of::<Attr>() as libc::c_uint,
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// The ids of the programs attached at `target` (a cgroup's descriptor, or an ifindex
    /// for TCX) for `attach_type` (`BPF_PROG_QUERY`); `flags` may ask for the effective
    /// ones, a cgroup's ancestors' included.
    pub fn prog_query(target: u32, attach_type: u32, flags: u32) -> Result<Vec<u32>> {
        const BPF_PROG_QUERY: libc::c_long = 16;
        let mut ids = vec![0u32; 64];
        loop {
            let mut attr = Attr([0; 128]);
            // struct { __u32 target_fd (or target_ifindex), attach_type, query_flags,
            //          attach_flags; __aligned_u64 prog_ids; __u32 prog_cnt; ... }
            attr.0[..4].copy_from_slice(&target.to_ne_bytes());
            attr.0[4..8].copy_from_slice(&attach_type.to_ne_bytes());
            attr.0[8..12].copy_from_slice(&flags.to_ne_bytes());
            attr.0[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
            attr.0[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
            let result = bpf(BPF_PROG_QUERY, &mut attr);
            let count = u32::from_ne_bytes([attr.0[24], attr.0[25], attr.0[26], attr.0[27]]);
            match result {
                Ok(_) => {
                    ids.truncate(count as usize);
                    return Ok(ids);
                }
                // More than room for: `prog_cnt` says how many; attached meanwhile, more.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    ids = vec![0u32; count as usize + 64];
                }
                Err(e) => return Err(e).context("BPF_PROG_QUERY"),
            }
        }
    }

    /// The name of the program `id` as the kernel keeps it; `None` if it is gone. Opening
    /// a program by id (`BPF_PROG_GET_FD_BY_ID`) needs `CAP_SYS_ADMIN`.
    pub fn prog_name(id: u32) -> Result<Option<String>> {
        const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
        let mut attr = Attr([0; 128]);
        // struct { __u32 prog_id; __u32 next_id; __u32 open_flags; }
        attr.0[..4].copy_from_slice(&id.to_ne_bytes());
        let fd = match bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) {
            // SAFETY: the kernel returned a new file descriptor that we now own.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as i32) },
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e).context("BPF_PROG_GET_FD_BY_ID"),
        };
        // struct bpf_prog_info up to `name` (char[16] at byte 64).
        let info = obj_info::<80>(fd.as_fd())?;
        let name = &info[64..80];
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        Ok(Some(String::from_utf8_lossy(&name[..len]).into_owned()))
    }

    /// Opens a pinned object.
    pub fn obj_get(path: &Path) -> Result<OwnedFd> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
        let mut attr = Attr([0; 128]);
        // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; ... }
        attr.0[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
        let fd = bpf(BPF_OBJ_GET, &mut attr)
            .with_context(|| format!("BPF_OBJ_GET {}", path.display()))?;
        // SAFETY: the kernel returned a new file descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Counts a hash map's keys by walking them with `BPF_MAP_GET_NEXT_KEY`, up to `limit`.
    /// Entries that come and go meanwhile (LRU maps in use) make this an estimate, as any
    /// dump is: when the key the walk stands on goes, the kernel starts it again from the
    /// first bucket, and the count could pass the map's capacity and the walk go on while
    /// entries churn. `limit` (the capacity, or 1 for "any?") ends it.
    pub fn count_keys(map: std::os::fd::BorrowedFd<'_>, key_size: u32, limit: u64) -> Result<u64> {
        let mut key = vec![0u8; key_size as usize];
        let mut next = vec![0u8; key_size as usize];
        let mut count = 0u64;
        let mut first = true;
        while count < limit {
            let mut attr = Attr([0; 128]);
            // struct { __u32 map_fd; __u32 pad; __aligned_u64 key; __aligned_u64 next_key; }
            attr.0[..4].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
            let key_ptr = if first { 0 } else { key.as_ptr() as u64 };
            attr.0[8..16].copy_from_slice(&key_ptr.to_ne_bytes());
            attr.0[16..24].copy_from_slice(&(next.as_mut_ptr() as u64).to_ne_bytes());
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {
                    count += 1;
                    std::mem::swap(&mut key, &mut next);
                    first = false;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
                Err(e) => return Err(e).context("BPF_MAP_GET_NEXT_KEY"),
            }
        }
        Ok(count)
    }

    /// Deletes `key` from a hash map and returns the value it held (kernel 5.14+ for hash
    /// maps); `None` if there was none.
    pub fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
        map: std::os::fd::BorrowedFd<'_>,
        key: &K,
    ) -> Result<Option<V>> {
        let mut value = std::mem::MaybeUninit::<V>::zeroed();
        let mut attr = Attr([0; 128]);
        // struct { __u32 map_fd; __u32 pad; __aligned_u64 key; __aligned_u64 value;
        //          __u64 flags; }
        attr.0[..4].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
        attr.0[8..16].copy_from_slice(&(std::ptr::from_ref(key) as u64).to_ne_bytes());
        attr.0[16..24].copy_from_slice(&(value.as_mut_ptr() as u64).to_ne_bytes());
        match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
            // SAFETY: the kernel wrote the whole value; Pod types are valid for any bytes.
            Ok(_) => Ok(Some(unsafe { value.assume_init() })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e).context("BPF_MAP_LOOKUP_AND_DELETE_ELEM"),
        }
    }

    /// Reads every entry of a hash map or an array, up to `per_call` per syscall
    /// (`BPF_MAP_LOOKUP_BATCH`), and hands each to `f`.
    pub fn lookup_batch<K: aya::Pod, V: aya::Pod>(
        map: std::os::fd::BorrowedFd<'_>,
        mut per_call: usize,
        mut f: impl FnMut(K, V),
    ) -> Result<()> {
        let (key_size, value_size) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
        let mut keys = vec![0u8; per_call * key_size];
        let mut values = vec![0u8; per_call * value_size];
        // The batch position (a hash map's bucket, an array's index) is a u32, which the
        // kernel reads and writes through these.
        let (mut position, mut next) = (0u32, 0u32);
        let mut first = true;
        loop {
            let mut attr = Attr([0; 128]);
            // struct { __aligned_u64 in_batch, out_batch, keys, values; __u32 count, map_fd;
            //          __u64 elem_flags, flags; }
            let in_batch = if first { 0 } else { &raw const position as u64 };
            attr.0[..8].copy_from_slice(&in_batch.to_ne_bytes());
            attr.0[8..16].copy_from_slice(&(&raw mut next as u64).to_ne_bytes());
            attr.0[16..24].copy_from_slice(&(keys.as_mut_ptr() as u64).to_ne_bytes());
            attr.0[24..32].copy_from_slice(&(values.as_mut_ptr() as u64).to_ne_bytes());
            attr.0[32..36].copy_from_slice(&(per_call as u32).to_ne_bytes());
            attr.0[36..40].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
            let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let filled = u32::from_ne_bytes([attr.0[32], attr.0[33], attr.0[34], attr.0[35]]);
            let last = match result {
                Ok(_) => false,
                // The walk is over; `count` says what this last call filled.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                // One bucket holds more entries than fit: again, with room for more.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && per_call < 1 << 20 => {
                    per_call *= 2;
                    keys.resize(per_call * key_size, 0);
                    values.resize(per_call * value_size, 0);
                    continue;
                }
                Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
            };
            for i in 0..(filled as usize).min(per_call) {
                // SAFETY: the kernel wrote `filled` whole keys and values; Pod types are
                // valid for any bytes; the reads are unaligned-safe.
                let (key, value) = unsafe {
                    (
                        std::ptr::read_unaligned(keys.as_ptr().add(i * key_size).cast::<K>()),
                        std::ptr::read_unaligned(values.as_ptr().add(i * value_size).cast::<V>()),
                    )
                };
                f(key, value);
            }
            if last {
                return Ok(());
            }
            position = next;
            first = false;
        }
    }

    /// Writes `keys[i]` = `values[i]` in order, in one syscall (`BPF_MAP_UPDATE_BATCH`,
    /// which the kernel runs as one update per element: each visible as soon as written).
    /// On an error, how many were written before it.
    pub fn update_batch<K: aya::Pod, V: aya::Pod>(
        map: std::os::fd::BorrowedFd<'_>,
        keys: &[K],
        values: &[V],
    ) -> Batch {
        assert_eq!(keys.len(), values.len(), "a value for every key");
        let Ok(count) = u32::try_from(keys.len()) else {
            return Err((0, anyhow::anyhow!("{} entries in one batch", keys.len())));
        };
        let mut attr = Attr([0; 128]);
        // struct { __aligned_u64 in_batch, out_batch, keys, values; __u32 count, map_fd;
        //          __u64 elem_flags, flags; }
        attr.0[16..24].copy_from_slice(&(keys.as_ptr() as u64).to_ne_bytes());
        attr.0[24..32].copy_from_slice(&(values.as_ptr() as u64).to_ne_bytes());
        attr.0[32..36].copy_from_slice(&count.to_ne_bytes());
        attr.0[36..40].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
        match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(_) => Ok(()),
            Err(e) => {
                // The kernel sets `count` to the elements written before the failing one,
                // fewer than all. An error before its loop (no write permission, an LSM)
                // leaves `count` as given: none were written. (So does a failure to copy
                // `count` back after all were: counted as none, they are written again.)
                let done = u32::from_ne_bytes([attr.0[32], attr.0[33], attr.0[34], attr.0[35]]);
                let done = if done >= count { 0 } else { done };
                Err((
                    done as usize,
                    anyhow::Error::new(e).context("BPF_MAP_UPDATE_BATCH"),
                ))
            }
        }
    }

    /// The id of the cgroup a cgroup link is attached to (0: its cgroup was removed), from
    /// `BPF_OBJ_GET_INFO_BY_FD`.
    pub fn link_cgroup_id(link: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
        // union member: struct { __u64 cgroup_id; __u32 attach_type; } cgroup;
        const BPF_LINK_TYPE_CGROUP: u32 = 3;
        let info = link_info(link, BPF_LINK_TYPE_CGROUP, "cgroup")?;
        let mut cgroup_id = [0u8; 8];
        cgroup_id.copy_from_slice(&info[16..24]);
        Ok(u64::from_ne_bytes(cgroup_id))
    }

    /// The ifindex of the device a TCX link is attached to (0: the device is gone).
    pub fn link_tcx_ifindex(link: std::os::fd::BorrowedFd<'_>) -> Result<u32> {
        // union member: struct { __u32 ifindex; __u32 attach_type; } tcx;
        const BPF_LINK_TYPE_TCX: u32 = 11;
        let info = link_info(link, BPF_LINK_TYPE_TCX, "TCX")?;
        Ok(u32::from_ne_bytes([info[16], info[17], info[18], info[19]]))
    }

    /// A link's `struct bpf_link_info` (`BPF_OBJ_GET_INFO_BY_FD`), checked to be of
    /// `wanted` type: { __u32 type, id, prog_id; union { ... } } (the union at byte 16).
    fn link_info(link: std::os::fd::BorrowedFd<'_>, wanted: u32, kind: &str) -> Result<[u8; 64]> {
        let info = obj_info::<64>(link)?;
        let link_type = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        if link_type != wanted {
            bail!("not a {kind} link (type {link_type})");
        }
        Ok(info)
    }

    /// The first `N` bytes of an object's info struct (`BPF_OBJ_GET_INFO_BY_FD`; the
    /// kernel fills what `info_len` asks for).
    fn obj_info<const N: usize>(fd: std::os::fd::BorrowedFd<'_>) -> Result<[u8; N]> {
        #[repr(C, align(8))]
        struct Info<const N: usize>([u8; N]);
        let mut info = Info([0; N]);
        let mut attr = Attr([0; 128]);
        // struct { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
        attr.0[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
        attr.0[4..8].copy_from_slice(&(N as u32).to_ne_bytes());
        attr.0[8..16].copy_from_slice(&(info.0.as_mut_ptr() as u64).to_ne_bytes());
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
        Ok(info.0)
    }

    /// Atomically replaces the program behind a link.
    pub fn link_update(
        link: std::os::fd::BorrowedFd<'_>,
        program: std::os::fd::BorrowedFd<'_>,
    ) -> Result<()> {
        let mut attr = Attr([0; 128]);
        // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
        attr.0[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
        attr.0[4..8].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
        bpf(BPF_LINK_UPDATE, &mut attr).context("BPF_LINK_UPDATE")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_hold_no_dot_and_give_the_device_back() {
        for device in ["eth0", "eth0.100", "bond0.42.7", "ens5"] {
            let name = tcx_link_name("ekp_tcx_in", device);
            assert!(!name.contains('.'), "{name}");
            assert_eq!(tcx_link_of(&name), Some(("ekp_tcx_in", device.to_owned())));
        }
        assert_eq!(
            tcx_link_name("ekp_tcx_out", "eth0.100"),
            "ekp_tcx_out@eth0:100"
        );
        assert_eq!(tcx_link_of("ekp_connect4"), None);
    }

    /// A hash map of `max_entries` u32 -> u64 entries, created with `BPF_MAP_CREATE`.
    fn hash_map(max_entries: u32) -> OwnedFd {
        hash_map_with(max_entries, 0)
    }

    /// [`hash_map`] with `map_flags`.
    fn hash_map_with(max_entries: u32, map_flags: u32) -> OwnedFd {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test creates a BPF map, which needs root (CAP_BPF): run it as root");
        }
        // struct { __u32 map_type, key_size, value_size, max_entries, map_flags; ... }
        let mut attr = [0u32; 32];
        attr[..5].copy_from_slice(&[1 /* BPF_MAP_TYPE_HASH */, 4, 8, max_entries, map_flags]);
        // SAFETY: attr is a zeroed bpf_attr with the map_create fields set.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0 as libc::c_long, // BPF_MAP_CREATE
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr) as libc::c_uint,
            )
        };
        assert!(
            fd >= 0,
            "BPF_MAP_CREATE: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the kernel returned a new file descriptor that we now own.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    fn contents(map: &OwnedFd) -> Vec<(u32, u64)> {
        let mut all = Vec::new();
        bpf_sys::lookup_batch(map.as_fd(), 16, |k: u32, v: u64| all.push((k, v)))
            .expect("reading the map");
        all.sort_unstable();
        all
    }

    #[test]
    fn a_batch_writes_every_entry_and_a_failed_one_says_how_many_it_wrote() {
        let map = hash_map(3);
        bpf_sys::update_batch(map.as_fd(), &[7u32, 8], &[70u64, 80]).expect("a batch that fits");
        assert_eq!(contents(&map), [(7, 70), (8, 80)]);
        // An update of an existing key takes no room; the third new key is one too many.
        let (written, error) =
            bpf_sys::update_batch(map.as_fd(), &[8u32, 9, 10, 11], &[81u64, 90, 100, 110])
                .expect_err("a full map refuses the fourth key");
        assert_eq!(written, 2, "{error:#}");
        assert_eq!(contents(&map), [(7, 70), (8, 81), (9, 90)]);
        // Refused before the kernel's loop (a descriptor without write permission: a
        // read-only map's, BPF_F_RDONLY): none written, whatever `count` still says.
        let read_only = hash_map_with(3, 1 << 3);
        let (written, error) = bpf_sys::update_batch(read_only.as_fd(), &[7u32, 8], &[70u64, 80])
            .expect_err("a read-only descriptor refuses writes");
        assert_eq!(written, 0, "{error:#}");
    }

    /// A mount at /sys/fs/bpf reaches the host only from a shared mount: in a container
    /// with HostToContainer propagation (a slave) it would stay the container's.
    #[test]
    fn a_mount_is_shared_only_under_a_shared_mount() {
        let host = "22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                    1 0 8:1 / / rw shared:1 - ext4 /dev/sda1 rw\n";
        assert!(mount_is_shared(host, Path::new("/sys/fs/bpf")));
        let container = "500 400 0:21 / /sys ro,nosuid master:7 - sysfs sysfs rw\n\
                         510 500 0:21 /fs/bpf /sys/fs/bpf rw master:7 - sysfs sysfs rw\n\
                         400 300 0:50 / / rw shared:90 - overlay overlay rw\n";
        assert!(!mount_is_shared(container, Path::new("/sys/fs/bpf")));
        let bidirectional = "510 500 0:21 /fs/bpf /sys/fs/bpf rw shared:7 master:7 - sysfs sysfs rw\n\
                             500 400 0:21 / /sys ro master:7 - sysfs sysfs rw\n";
        assert!(mount_is_shared(bidirectional, Path::new("/sys/fs/bpf")));
        assert!(!mount_is_shared("", Path::new("/sys/fs/bpf")));
    }

    /// The count of a map's keys stops at its limit (the capacity, or 1 to ask "any?").
    #[test]
    fn a_key_count_stops_at_its_limit() {
        let fd = hash_map(8);
        bpf_sys::update_batch(fd.as_fd(), &[1u32, 2, 3, 4, 5], &[0u64; 5]).expect("writing");
        let count = |limit| bpf_sys::count_keys(fd.as_fd(), 4, limit).expect("counting");
        assert_eq!((count(100), count(3), count(1), count(0)), (5, 3, 1, 0));
    }

    /// A delete of a key that is gone (an LRU entry evicted since it was listed) reaches
    /// the goal: it must not fail the sync. Other errors still do.
    #[test]
    fn deleting_a_missing_key_is_success() {
        let fd = hash_map(4);
        let mut map: HashMap<MapData, u32, u64> =
            HashMap::try_from(Map::HashMap(MapData::from_fd(fd).expect("the map")))
                .expect("a hash map");
        map.insert(7, 70, 0).expect("inserting");
        ignore_missing(map.remove(&7)).expect("deleting a key that is there");
        ignore_missing(map.remove(&7)).expect("deleting it again");
        let other = aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_delete_elem",
            io_error: std::io::Error::from_raw_os_error(libc::EPERM),
        });
        assert!(ignore_missing(Err(other)).is_err());
    }

    /// A device that goes away between the listing and the attach (a pod deleted meanwhile)
    /// is left out, and the others are still served. Run in a network namespace of the
    /// test thread's own, whose loopback stands in for a device that is there.
    #[test]
    fn a_device_gone_while_attaching_is_left_out() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test loads and attaches BPF programs, which needs root: run it as root");
        }
        let pin_dir = Path::new("/sys/fs/bpf").join(format!("ekpt-gone-{}", std::process::id()));
        struct Remove<'a>(&'a Path);
        impl Drop for Remove<'_> {
            fn drop(&mut self) {
                let _ = fs::remove_dir_all(self.0);
            }
        }
        ensure_bpffs(&pin_dir).expect("bpffs");
        fs::create_dir_all(links_dir(&pin_dir)).expect("creating the pin directory");
        let _remove = Remove(&pin_dir);
        let attached = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: unshare affects this thread only, which ends with the test.
                    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                        panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
                    }
                    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("loading the object");
                    load_tc(&mut ebpf, &TCX_HOOKS).expect("loading the TCX programs");
                    let lo = devices::links()
                        .expect("listing links")
                        .into_iter()
                        .find(|(d, _)| d == "lo")
                        .expect("a namespace has its loopback");
                    let gone = ("ekpt-gone0".to_owned(), lo.1 + 100);
                    let attached = attach_tc(&mut ebpf, &pin_dir, &TCX_HOOKS, &[gone, lo.clone()])
                        .expect("a gone device must not fail the attach");
                    (attached, lo)
                })
                .join()
                .expect("the attaching thread")
        });
        let (attached, lo) = attached;
        assert_eq!(attached, [lo]);
        let mut pins: Vec<String> = fs::read_dir(links_dir(&pin_dir))
            .expect("reading the links directory")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        pins.sort();
        assert_eq!(pins, ["ekp_tcx_in@lo", "ekp_tcx_out@lo"]);
    }
}
