//! Map sizes changed since the maps were pinned (`--map-size-*`, the chart's `mapSizes`).
//!
//! The loader reuses a pinned map whatever its size, so a new size would never take effect
//! (and the agent would admit Services by a size the map does not have). Instead, a pinned
//! map of another size than asked is opened before the object is loaded ([`plan`]) and not
//! handed to the loader, which creates one of the asked size, unpinned. Just before the new
//! programs are attached ([`Resizes::copy`]), the old map's entries are copied into the new
//! one; once they are attached ([`Resizes::commit`]), the new map takes the old one's pin
//! (pinned as `<name>_pending`, then renamed over it), and the LRU maps the programs write
//! (north-south flows, UDP sockets' reverse entries, session affinity) get, without
//! overwriting, what the old programs recorded between the copy and the swap. The old
//! programs keep their maps until their links are swapped, so no packet meets an empty map.
//! This is Cilium's order (a fresh map for an incompatible pin, the pin replaced after the
//! programs attach, `pkg/bpf/pinning.go`), plus the copy.
//!
//! Until the commit the old pin stays in place: a start that stops before it leaves the
//! maps as they were (but for what its programs wrote if it stopped halfway through
//! attaching), and the next one resizes again. A `_pending` pin found at start was left by
//! a start stopped between the two steps of its commit: its map is the one the attached
//! programs use, and it takes the pin.
//!
//! A smaller map takes what fits: arrays their ids below the new size, the services hash
//! map whole frontends while they fit, the source-range trie until it is full, LRU maps their most
//! recently copied entries. What did not fit is named in a warning; the first sync fits
//! the Services to the new size (and reports those left out), and the flows and sockets
//! left out are treated as new.

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap, Map, MapData, MapError};
use proxy_common::{
    AffinityKey, AffinityValue, BackendValue, MAP_AFFINITY, MAP_BACKENDS, MAP_BACKENDS_V1,
    MAP_NAT_CT, MAP_REV_NAT, MAP_REV_NAT_V1, MAP_SERVICES, MAP_SOCK_REV_NAT, MAP_SOURCE_RANGES,
    NatCtKey, NatCtValue, RevNatValue, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue,
    SourceRangeKey,
};

use super::{BPF_NOEXIST, CONNTRACK_BATCH, MapSizes, bpf_sys, check_sizes, maps_dir};

/// Where a resized map is pinned before it is renamed over the old pin (bpffs names cannot
/// hold a dot).
pub(super) fn pending_pin(pin_dir: &Path, name: &str) -> PathBuf {
    maps_dir(pin_dir).join(format!("{name}_pending"))
}

/// The maps whose size is configurable, with the size asked for.
fn sized(sizes: &MapSizes) -> [(&'static str, u32); 7] {
    [
        (MAP_SERVICES, sizes.services),
        (MAP_BACKENDS, sizes.backends),
        (MAP_REV_NAT, sizes.rev_nat),
        (MAP_SOCK_REV_NAT, sizes.sock_rev_nat),
        (MAP_AFFINITY, sizes.affinity),
        (MAP_NAT_CT, sizes.nat_ct),
        (MAP_SOURCE_RANGES, sizes.source_ranges),
    ]
}

/// One map being resized: the old one, open (its pin stays until the commit).
struct Resize {
    name: &'static str,
    old: MapData,
    pin: PathBuf,
}

/// The maps being resized by this start (usually none).
#[derive(Default)]
pub(super) struct Resizes(Vec<Resize>);

/// Finds the pinned maps whose size is not the one asked for, before the loader would reuse
/// them. A backends or rev-NAT array beside its older version's hash map (`_v1`) is unpinned
/// instead: the hash map is the truth, and `adopt_v1_hash_maps` copies it whole into the
/// array the loader creates.
pub(super) fn plan(pin_dir: &Path, sizes: &MapSizes) -> Result<Resizes> {
    let mut resizes = Vec::new();
    for (name, wanted) in sized(sizes) {
        let pin = maps_dir(pin_dir).join(name);
        let pending = pending_pin(pin_dir, name);
        if pending.exists() {
            // The map the attached programs use.
            fs::rename(&pending, &pin).with_context(|| {
                format!("renaming {} over {}", pending.display(), pin.display())
            })?;
        }
        let superseded = match name {
            MAP_BACKENDS => Some(MAP_BACKENDS_V1),
            MAP_REV_NAT => Some(MAP_REV_NAT_V1),
            _ => None,
        };
        if superseded.is_some_and(|v1| maps_dir(pin_dir).join(v1).exists()) {
            remove_pin(&pin)?;
            continue;
        }
        if !pin.exists() {
            continue;
        }
        let old = MapData::from_pin(&pin)
            .with_context(|| format!("opening pinned map {}", pin.display()))?;
        let size = old.info()?.max_entries();
        if size == wanted {
            continue;
        }
        tracing::info!(
            map = name,
            from = size,
            to = wanted,
            "resizing a pinned map: its entries are copied into one of the new size as the \
             programs are swapped"
        );
        resizes.push(Resize { name, old, pin });
    }
    Ok(Resizes(resizes))
}

fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("unpinning {}", path.display())),
    }
}

impl Resizes {
    /// Whether the loader must create `name` afresh rather than reuse its pin.
    pub(super) fn replaces(&self, name: &str) -> bool {
        self.0.iter().any(|r| r.name == name)
    }

    /// Copies each old map's entries into the new one `ebpf` holds: called just before the
    /// new programs are attached.
    pub(super) fn copy(&self, ebpf: &mut Ebpf) -> Result<()> {
        for resize in &self.0 {
            let new = ebpf
                .map_mut(resize.name)
                .with_context(|| format!("map {} missing from the eBPF object", resize.name))?;
            let (copied, left_out) = copy_entries(resize.name, &resize.old, &resize.pin, new)
                .with_context(|| format!("copying {} into its new size", resize.name))?;
            if left_out > 0 {
                tracing::warn!(
                    map = resize.name,
                    copied,
                    left_out,
                    "the map's new size does not hold all its entries: those left out are \
                     served anew (Services at the first sync, flows and sockets as new ones)"
                );
            } else {
                tracing::info!(map = resize.name, copied, "copied a resized map's entries");
            }
        }
        Ok(())
    }

    /// Once the new programs are attached: each new map takes its old one's pin, then the
    /// LRU maps get what the old programs added since [`Resizes::copy`], keeping what the new
    /// ones wrote meanwhile (a failure there is only logged: the programs serve already).
    pub(super) fn commit(self, ebpf: &mut Ebpf, pin_dir: &Path) -> Result<()> {
        for resize in &self.0 {
            let new = ebpf
                .map(resize.name)
                .with_context(|| format!("map {} missing from the eBPF object", resize.name))?;
            let pending = pending_pin(pin_dir, resize.name);
            remove_pin(&pending)?;
            new.pin(&pending)
                .with_context(|| format!("pinning {}", pending.display()))?;
            // Atomic: whoever opens the pin finds one map or the other.
            fs::rename(&pending, &resize.pin).with_context(|| {
                format!(
                    "renaming {} over {}",
                    pending.display(),
                    resize.pin.display()
                )
            })?;
        }
        for resize in &self.0 {
            let Some(new) = ebpf.map_mut(resize.name) else {
                continue;
            };
            let added = match resize.name {
                MAP_NAT_CT => add_missing::<NatCtKey, NatCtValue>(&resize.old, new),
                MAP_SOCK_REV_NAT => add_missing::<SockRevNatKey, SockRevNatValue>(&resize.old, new),
                MAP_AFFINITY => add_missing::<AffinityKey, AffinityValue>(&resize.old, new),
                _ => continue,
            };
            match added {
                Ok(0) => {}
                Ok(added) => tracing::info!(
                    map = resize.name,
                    added,
                    "copied what the old programs recorded while the new ones were attached"
                ),
                Err(e) => tracing::warn!(
                    map = resize.name,
                    "copying the old programs' last entries failed: {e:#}; the flows or \
                     sockets they belong to are treated as new"
                ),
            }
        }
        Ok(())
    }
}

/// Copies `old`'s entries into the fresh map `new` of the same kind: (copied, left out).
fn copy_entries(name: &str, old: &MapData, pin: &Path, new: &mut Map) -> Result<(usize, usize)> {
    match (name, new) {
        (MAP_SERVICES, Map::HashMap(new)) => copy_services(old, new),
        (MAP_SOCK_REV_NAT, Map::LruHashMap(new)) => {
            copy_hash::<SockRevNatKey, SockRevNatValue>(old, new)
        }
        (MAP_AFFINITY, Map::LruHashMap(new)) => copy_hash::<AffinityKey, AffinityValue>(old, new),
        (MAP_NAT_CT, Map::LruHashMap(new)) => copy_hash::<NatCtKey, NatCtValue>(old, new),
        (MAP_BACKENDS, Map::Array(new)) => copy_array::<BackendValue>(old, new, |b| b.addr != 0),
        (MAP_REV_NAT, Map::Array(new)) => copy_array::<RevNatValue>(old, new, |f| f.addr != 0),
        (MAP_SOURCE_RANGES, new @ Map::LpmTrie(_)) => copy_source_ranges(pin, new),
        (name, _) => bail!("map {name} is not of the kind its resize expects"),
    }
}

/// Every entry of a hash map (or an LRU one), read in batches.
fn entries<K: aya::Pod, V: aya::Pod>(map: &MapData) -> Result<(Vec<K>, Vec<V>)> {
    check_sizes::<K, V>(map)?;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    bpf_sys::lookup_batch(map.fd().as_fd(), CONNTRACK_BATCH, |key: K, value: V| {
        keys.push(key);
        values.push(value);
    })?;
    Ok((keys, values))
}

/// A hash map's entries into a fresh one. A full hash map refuses the rest (`E2BIG`); an
/// LRU one makes room by evicting the entries copied first.
fn copy_hash<K: aya::Pod, V: aya::Pod>(old: &MapData, new: &MapData) -> Result<(usize, usize)> {
    check_sizes::<K, V>(new)?;
    let (keys, values) = entries::<K, V>(old)?;
    let capacity = new.info()?.max_entries() as usize;
    match bpf_sys::update_batch(new.fd().as_fd(), &keys, &values) {
        Ok(()) => Ok((
            keys.len().min(capacity),
            keys.len().saturating_sub(capacity),
        )),
        Err((done, e)) if is_full(&e) => Ok((done, keys.len() - done)),
        Err((_, e)) => Err(e),
    }
}

/// The services map's entries into a fresh one, whole frontends only (slot 0 and all its
/// slots, in frontend order, while they fit): a half-copied one would leave a connection
/// without a backend at a missing slot, and its holes would make the first sync write new
/// keys into the full map.
fn copy_services(old: &MapData, new: &MapData) -> Result<(usize, usize)> {
    check_sizes::<ServiceKey, ServiceValue>(new)?;
    let (keys, values) = entries::<ServiceKey, ServiceValue>(old)?;
    let capacity = new.info()?.max_entries() as usize;
    let (keys, values, left_out) = whole_frontends(keys, values, capacity);
    bpf_sys::update_batch(new.fd().as_fd(), &keys, &values).map_err(|(_, e)| e)?;
    Ok((keys.len(), left_out))
}

/// The entries of the frontends that fit in `capacity`, whole, in frontend order; and how
/// many entries were left out.
fn whole_frontends(
    keys: Vec<ServiceKey>,
    values: Vec<ServiceValue>,
    capacity: usize,
) -> (Vec<ServiceKey>, Vec<ServiceValue>, usize) {
    let frontend = |k: &ServiceKey| (k.addr, k.port, k.proto, k.scope);
    let mut entries: Vec<(ServiceKey, ServiceValue)> = keys.into_iter().zip(values).collect();
    entries.sort_by_key(|(k, _)| (frontend(k), k.slot));
    let (mut kept_keys, mut kept_values, mut left_out) = (Vec::new(), Vec::new(), 0);
    for group in entries.chunk_by(|a, b| frontend(&a.0) == frontend(&b.0)) {
        if kept_keys.len() + group.len() <= capacity {
            kept_keys.extend(group.iter().map(|(k, _)| *k));
            kept_values.extend(group.iter().map(|(_, v)| *v));
        } else {
            left_out += group.len();
        }
    }
    (kept_keys, kept_values, left_out)
}

fn is_full(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.raw_os_error() == Some(libc::E2BIG))
}

/// An array's entries that hold something (`held`) into a fresh one, at the same indexes
/// (ids): those beyond its size are left out.
fn copy_array<V: aya::Pod>(
    old: &MapData,
    new: &MapData,
    held: impl Fn(&V) -> bool,
) -> Result<(usize, usize)> {
    check_sizes::<u32, V>(new)?;
    let size = new.info()?.max_entries();
    let (mut ids, mut values, mut beyond) = (Vec::new(), Vec::new(), Vec::new());
    for (id, value) in super::held_entries(old, held)? {
        if id < size {
            ids.push(id);
            values.push(value);
        } else {
            beyond.push(id);
        }
    }
    if !beyond.is_empty() {
        // Their Services' slots name no backend (or frontend) until the first sync gives
        // them ids within the array.
        tracing::warn!(ids = ?beyond, size, "ids beyond the resized array are not copied");
    }
    bpf_sys::update_batch(new.fd().as_fd(), &ids, &values).map_err(|(_, e)| e)?;
    Ok((ids.len(), beyond.len()))
}

/// The source ranges (an LPM trie: no batch reads) one by one, from the old trie's pin; a
/// full trie refuses the rest.
fn copy_source_ranges(pin: &Path, new: &mut Map) -> Result<(usize, usize)> {
    let old = MapData::from_pin(pin)?;
    check_sizes::<aya::maps::lpm_trie::Key<SourceRangeKey>, u8>(&old)?;
    let old: LpmTrie<MapData, SourceRangeKey, u8> = LpmTrie::try_from(Map::LpmTrie(old))?;
    let mut new: LpmTrie<&mut MapData, SourceRangeKey, u8> = LpmTrie::try_from(new)?;
    let (mut copied, mut left_out) = (0, 0);
    for entry in old.iter() {
        let (key, value) = entry.context("reading a source range")?;
        match new.insert(&key, value, 0) {
            Ok(()) => copied += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOSPC) => {
                left_out += 1;
            }
            Err(e) => return Err(e).context("writing a source range"),
        }
    }
    Ok((copied, left_out))
}

/// Inserts `old`'s entries that `new` lacks (`BPF_NOEXIST`): how many.
fn add_missing<K: aya::Pod, V: aya::Pod>(old: &MapData, new: &mut Map) -> Result<usize> {
    let (keys, values) = entries::<K, V>(old)?;
    let mut new: HashMap<&mut MapData, K, V> = HashMap::try_from(new)?;
    let mut added = 0;
    for (key, value) in keys.iter().zip(&values) {
        match new.insert(key, value, BPF_NOEXIST) {
            Ok(()) => added += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).context("adding an entry"),
        }
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frontends of a services map that shrinks are copied whole or not at all.
    #[test]
    fn a_smaller_services_map_takes_whole_frontends() {
        let entry = |frontend: u8, slot: u16| {
            (
                ServiceKey {
                    addr: u32::from(frontend),
                    port: 80,
                    slot,
                    proto: 6,
                    scope: 1,
                    _pad: [0; 2],
                },
                ServiceValue {
                    count: 2,
                    ..ServiceValue::default()
                },
            )
        };
        // Three frontends of three entries each (slot 0 and two slots), shuffled.
        let all: Vec<_> = [
            (2, 1),
            (1, 0),
            (3, 2),
            (1, 2),
            (2, 0),
            (3, 0),
            (1, 1),
            (3, 1),
            (2, 2),
        ]
        .into_iter()
        .map(|(f, slot)| entry(f, slot))
        .collect();
        let (keys, values): (Vec<_>, Vec<_>) = all.into_iter().unzip();
        let (kept, _, left_out) = whole_frontends(keys, values, 7);
        let kept: Vec<(u32, u16)> = kept.iter().map(|k| (k.addr, k.slot)).collect();
        assert_eq!(kept, [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]);
        assert_eq!(left_out, 3);
    }

    /// A pin directory of this test's own, removed on drop.
    struct PinDir(PathBuf);

    impl Drop for PinDir {
        fn drop(&mut self) {
            if let Err(e) = super::super::cleanup(&self.0) {
                eprintln!("cleanup of {} failed: {e:#}", self.0.display());
            }
        }
    }

    fn flow(port: u16, last_seen: u32) -> (NatCtKey, NatCtValue) {
        let key = NatCtKey {
            saddr: 1,
            daddr: 2,
            sport: port,
            dport: 80,
            proto: 6,
            ..NatCtKey::default()
        };
        let value = NatCtValue {
            daddr: 3,
            last_seen,
            ..NatCtValue::default()
        };
        (key, value)
    }

    /// What the old programs record between the copy and the swap reaches the new map,
    /// without overwriting what the new programs wrote meanwhile.
    #[test]
    fn commit_adds_what_the_old_programs_recorded_after_the_copy() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test pins BPF maps, which needs root (CAP_BPF): run it as root");
        }
        let pins = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/ekpt-unit-resize-{}",
            std::process::id()
        )));
        let small = MapSizes {
            nat_ct: 64,
            ..MapSizes::default()
        };
        let large = MapSizes {
            nat_ct: 128,
            ..small
        };
        drop(super::super::load(&pins.0, small, 0, false, false).expect("loading"));
        let old_pin = maps_dir(&pins.0).join(MAP_NAT_CT);
        let mut old: HashMap<MapData, NatCtKey, NatCtValue> = HashMap::try_from(Map::LruHashMap(
            MapData::from_pin(&old_pin).expect("opening the map"),
        ))
        .expect("an LRU map");
        let copied = flow(1, 10);
        old.insert(copied.0, copied.1, 0).expect("writing");

        let mut loaded = super::super::load(&pins.0, large, 0, false, false).expect("loading");
        assert_eq!(
            aya::maps::MapInfo::from_pin(&old_pin)
                .expect("reading map info")
                .max_entries(),
            64,
            "the old map keeps its pin until the commit"
        );
        loaded.resizes.copy(&mut loaded.ebpf).expect("copying");
        // The old programs go on: a new flow, and one the new programs also saw.
        let late = flow(2, 20);
        let both = flow(3, 30);
        for (key, value) in [late, both] {
            old.insert(key, value, 0).expect("writing");
        }
        let mut new: HashMap<&mut MapData, NatCtKey, NatCtValue> =
            HashMap::try_from(loaded.ebpf.map_mut(MAP_NAT_CT).expect("the map"))
                .expect("an LRU map");
        let (key, mut theirs) = both;
        theirs.last_seen = 31;
        new.insert(key, theirs, 0).expect("writing");

        loaded
            .resizes
            .commit(&mut loaded.ebpf, &pins.0)
            .expect("committing");
        assert!(!pending_pin(&pins.0, MAP_NAT_CT).exists());
        let pinned = aya::maps::MapInfo::from_pin(&old_pin).expect("reading map info");
        assert_eq!(pinned.max_entries(), 128, "the new map took the pin");
        let new: HashMap<&MapData, NatCtKey, NatCtValue> =
            HashMap::try_from(loaded.ebpf.map(MAP_NAT_CT).expect("the map")).expect("an LRU map");
        for (key, value) in [copied, late, (key, theirs)] {
            assert_eq!(new.get(&key, 0).ok(), Some(value), "{key:?}");
        }
        assert_eq!(new.keys().count(), 3);
    }
}
