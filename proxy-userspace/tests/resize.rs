//! Privileged: maps pinned with other sizes than the agent now asks for (`--map-size-*`, the
//! chart's `mapSizes`) are replaced at start by maps of the new sizes holding their entries,
//! and the programs attached from then on use those; what does not fit a smaller map is left
//! out (the agent's warning naming it is not checked here). Clients see nothing of it
//! (BEHAVIOUR C33, as for any restart).

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, Map, MapData, MapInfo};
use common::{ClientsUnderLoad, Pins, SMALL_MAPS, bpftool_json};
use proxy_common::{
    AffinityKey, AffinityValue, BackendValue, MAP_AFFINITY, MAP_BACKENDS, MAP_NAT_CT, MAP_REV_NAT,
    MAP_SERVICES, MAP_SOCK_REV_NAT, MAP_SOURCE_RANGES, NatCtKey, NatCtValue, PROTO_TCP,
    RevNatValue, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue,
};
use proxy_userspace::abi;
use proxy_userspace::dataplane::{self, MapContents, MapSizes, Maps, SockSettings};
use proxy_userspace::model::SourceRange;
use serde_json::Value;
use xtask::netns::{self, Cgroup};

const BEFORE: MapSizes = SMALL_MAPS;

/// Some smaller (services, backends, source ranges), some larger.
const AFTER: MapSizes = MapSizes {
    services: 32,
    backends: 16,
    rev_nat: 128,
    sock_rev_nat: 256,
    affinity: 128,
    nat_ct: 1024,
    source_ranges: 2,
};

/// A cgroup of the test's own for the socket programs.
fn cgroup() -> Cgroup {
    Cgroup::create(&netns::unique_prefix("ekpt-resize"))
        .unwrap_or_else(|e| panic!("creating the test cgroup: {e:#}"))
}

/// What `run` does at start, without a source: load (maps of `sizes`), attach.
fn start(pins: &Pins, cgroup: &Cgroup, sizes: MapSizes) -> Maps {
    let loaded = dataplane::load(&pins.0, sizes, 0, false, false)
        .unwrap_or_else(|e| panic!("loading the object on {}: {e:#}", pins.0.display()));
    let (maps, _programs) = dataplane::start(
        loaded,
        &pins.0,
        cgroup.path(),
        None,
        SockSettings::default(),
        &[],
    )
    .unwrap_or_else(|e| panic!("attaching: {e:#}"));
    maps
}

fn lru<K: aya::Pod, V: aya::Pod>(pins: &Pins, name: &str) -> HashMap<MapData, K, V> {
    let map = MapData::from_pin(pins.map(name)).expect("opening a pinned LRU map");
    HashMap::try_from(Map::LruHashMap(map)).expect("an LRU hash map")
}

/// Fails unless the pinned LRU map `name` holds exactly `entries`.
fn assert_holds<K: aya::Pod + std::fmt::Debug, V: aya::Pod + PartialEq + std::fmt::Debug>(
    pins: &Pins,
    name: &str,
    entries: &[(K, V)],
) {
    let map: HashMap<MapData, K, V> = lru(pins, name);
    assert_eq!(map.keys().count(), entries.len(), "{name}'s entries");
    for (key, value) in entries {
        assert_eq!(
            map.get(key, 0).ok().as_ref(),
            Some(value),
            "{name}: {key:?}"
        );
    }
}

fn max_entries(pins: &Pins, name: &str) -> u32 {
    MapInfo::from_pin(pins.map(name))
        .expect("reading map info")
        .max_entries()
}

fn service(i: u32) -> (ServiceKey, ServiceValue) {
    let key = ServiceKey {
        addr: u32::from_ne_bytes(Ipv4Addr::new(10, 96, 1, i as u8).octets()),
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        ..ServiceKey::default()
    };
    let value = ServiceValue {
        backend_id: i,
        count: 1,
        rev_nat_id: i as u16,
        ..ServiceValue::default()
    };
    (key, value)
}

fn backend(i: u32) -> BackendValue {
    BackendValue {
        addr: u32::from_ne_bytes(Ipv4Addr::new(10, 244, 0, i as u8).octets()),
        port: 8080u16.to_be(),
        proto: PROTO_TCP,
        flags: 0,
    }
}

fn frontend(i: u16) -> RevNatValue {
    RevNatValue {
        addr: u32::from_ne_bytes(Ipv4Addr::new(10, 96, 1, i as u8).octets()),
        port: 80u16.to_be(),
        _pad: [0; 2],
    }
}

fn flow(i: u16) -> (NatCtKey, NatCtValue) {
    let key = NatCtKey {
        saddr: u32::from_ne_bytes([198, 51, 100, 7]),
        daddr: u32::from_ne_bytes([192, 0, 2, 1]),
        sport: (40000 + i).to_be(),
        dport: 30080u16.to_be(),
        proto: PROTO_TCP,
        dir: 0,
        _pad: [0; 2],
    };
    let value = NatCtValue {
        saddr: key.saddr,
        daddr: u32::from_ne_bytes([10, 244, 0, 10]),
        sport: key.sport,
        dport: 8080u16.to_be(),
        backend_id: 1,
        rev_nat_id: 1,
        flags: 0,
        last_seen: 100 + u32::from(i),
    };
    (key, value)
}

fn socket(i: u64) -> (SockRevNatKey, SockRevNatValue) {
    let key = SockRevNatKey {
        cookie: 1000 + i,
        addr: u32::from_ne_bytes([10, 244, 0, 11]),
        port: 5353u16.to_be(),
        _pad: [0; 2],
    };
    let value = SockRevNatValue {
        addr: u32::from_ne_bytes([10, 96, 0, 10]),
        port: 53u16.to_be(),
        rev_nat_id: 2,
    };
    (key, value)
}

fn affinity(i: u64) -> (AffinityKey, AffinityValue) {
    let key = AffinityKey {
        client: 2000 + i,
        affinity_id: 3,
        _pad: [0; 6],
    };
    let value = AffinityValue {
        backend_id: 1,
        last_used: 7,
    };
    (key, value)
}

fn range(rev_nat_id: u16, third: u8) -> Key<proxy_common::SourceRangeKey> {
    let (prefix, key) = abi::source_range_key(
        rev_nat_id,
        &SourceRange::new(Ipv4Addr::new(203, 0, third, 0), 24),
    );
    Key::new(prefix, key)
}

/// The maps a previous start left, filled.
struct Written {
    services: Vec<(ServiceKey, ServiceValue)>,
    flows: Vec<(NatCtKey, NatCtValue)>,
    sockets: Vec<(SockRevNatKey, SockRevNatValue)>,
    affinities: Vec<(AffinityKey, AffinityValue)>,
}

fn fill(pins: &Pins, maps: &mut Maps) -> Written {
    // 40 Services for a map of 32 after the resize.
    let services: Vec<_> = (1..=40).map(service).collect();
    for (key, value) in &services {
        maps.put_service(*key, *value).expect("writing a Service");
    }
    // Id 40 lies beyond the 16 entries of the smaller array.
    for id in [1, 15, 40] {
        maps.put_backend(id, backend(id))
            .expect("writing a backend");
    }
    for id in [3, 60] {
        maps.put_rev_nat(id, frontend(id))
            .expect("writing a frontend");
    }
    // Three ranges for a trie of two.
    for third in [1, 2, 3] {
        maps.put_source_range(range(4, third))
            .expect("writing a source range");
    }
    let flows: Vec<_> = (0..10).map(flow).collect();
    let sockets: Vec<_> = (0..5).map(socket).collect();
    let affinities: Vec<_> = (0..5).map(affinity).collect();
    let mut map = lru::<NatCtKey, NatCtValue>(pins, MAP_NAT_CT);
    for (k, v) in &flows {
        map.insert(k, v, 0).expect("writing a flow");
    }
    let mut map = lru::<SockRevNatKey, SockRevNatValue>(pins, MAP_SOCK_REV_NAT);
    for (k, v) in &sockets {
        map.insert(k, v, 0).expect("writing a socket's entry");
    }
    let mut map = lru::<AffinityKey, AffinityValue>(pins, MAP_AFFINITY);
    for (k, v) in &affinities {
        map.insert(k, v, 0).expect("writing an affinity");
    }
    Written {
        services,
        flows,
        sockets,
        affinities,
    }
}

fn contents(pins: &Pins) -> MapContents {
    Maps::open_pinned(&pins.0)
        .expect("opening the pinned maps")
        .read()
        .expect("reading the maps")
}

fn no_pending_pins(pins: &Pins) {
    let left: Vec<_> = std::fs::read_dir(pins.0.join("maps"))
        .expect("listing the maps")
        .map(|e| e.expect("an entry").file_name())
        .filter(|name| name.to_string_lossy().ends_with("_pending"))
        .collect();
    assert!(left.is_empty(), "pending pins left: {left:?}");
}

/// The ids of the maps the program behind the pinned link `link` uses.
fn maps_of_link(link: &Path) -> Vec<u64> {
    let link = bpftool_json(&["link", "show", "pinned", &link.to_string_lossy()]);
    let prog = link["prog_id"].as_u64().expect("the link's program id");
    let prog = bpftool_json(&["prog", "show", "id", &prog.to_string()]);
    prog["map_ids"]
        .as_array()
        .expect("the program's map ids")
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

#[test]
fn maps_pinned_with_other_sizes_are_replaced_with_their_entries_as_the_programs_are_swapped() {
    let pins = Pins::new("resize");
    let cgroup = cgroup();
    let mut maps = start(&pins, &cgroup, BEFORE);
    let written = fill(&pins, &mut maps);
    let before = contents(&pins);
    drop(maps);

    start(&pins, &cgroup, AFTER);

    for (name, size) in [
        (MAP_SERVICES, AFTER.services),
        (MAP_BACKENDS, AFTER.backends),
        (MAP_REV_NAT, AFTER.rev_nat),
        (MAP_SOCK_REV_NAT, AFTER.sock_rev_nat),
        (MAP_AFFINITY, AFTER.affinity),
        (MAP_NAT_CT, AFTER.nat_ct),
        (MAP_SOURCE_RANGES, AFTER.source_ranges),
    ] {
        assert_eq!(max_entries(&pins, name), size, "{name}'s size");
    }
    no_pending_pins(&pins);

    let after = contents(&pins);
    assert_eq!(after.services.len(), 32, "a full map of 32 Services");
    for entry in &after.services {
        assert!(
            written.services.contains(entry),
            "{entry:?} was never written"
        );
    }
    assert_eq!(after.backends, vec![(1, backend(1)), (15, backend(15))]);
    assert_eq!(after.rev_nat, before.rev_nat, "the rev-NAT entries");
    assert_eq!(after.source_ranges.len(), 2, "a full trie of two ranges");
    for entry in &after.source_ranges {
        assert!(before.source_ranges.contains(entry), "{entry:?}");
    }
    assert_holds(&pins, MAP_NAT_CT, &written.flows);
    assert_holds(&pins, MAP_SOCK_REV_NAT, &written.sockets);
    assert_holds(&pins, MAP_AFFINITY, &written.affinities);

    // The attached programs use the new maps.
    let services = MapInfo::from_pin(pins.map(MAP_SERVICES))
        .expect("reading map info")
        .id();
    let used = maps_of_link(&pins.0.join("links").join("ekp_connect4"));
    assert!(
        used.contains(&u64::from(services)),
        "ekp_connect4 uses maps {used:?}, not the new services map {services}"
    );
}

/// A start that stops before attaching (here: loaded, never started) leaves the pinned
/// maps as they were, sizes and entries; the next start resizes them.
#[test]
fn a_start_that_stops_before_attaching_leaves_the_maps_as_they_were() {
    let pins = Pins::new("resize-stopped");
    let cgroup = cgroup();
    let mut maps = start(&pins, &cgroup, BEFORE);
    let written = fill(&pins, &mut maps);
    let before = contents(&pins);
    drop(maps);

    drop(dataplane::load(&pins.0, AFTER, 0, false, false).expect("loading"));
    assert_eq!(max_entries(&pins, MAP_BACKENDS), BEFORE.backends);
    assert_eq!(max_entries(&pins, MAP_NAT_CT), BEFORE.nat_ct);
    let kept = contents(&pins);
    assert_eq!(kept.services.len(), before.services.len());
    assert_eq!(kept.backends, before.backends);
    assert_holds(&pins, MAP_NAT_CT, &written.flows);

    start(&pins, &cgroup, AFTER);
    no_pending_pins(&pins);
    assert_eq!(max_entries(&pins, MAP_NAT_CT), AFTER.nat_ct);
    assert_eq!(
        contents(&pins).backends,
        vec![(1, backend(1)), (15, backend(15))]
    );
    assert_holds(&pins, MAP_NAT_CT, &written.flows);
}

/// A start that stopped between pinning a resized map as `_pending` and renaming it over
/// the old pin: the pending map is the one its attached programs use, so it takes the pin.
#[test]
fn a_pending_pin_takes_the_maps_place() {
    let pins = Pins::new("resize-pending");
    let cgroup = cgroup();
    let mut maps = start(&pins, &cgroup, BEFORE);
    fill(&pins, &mut maps);
    drop(maps);

    let pending = pins.map(&format!("{MAP_NAT_CT}_pending"));
    let status = Command::new(xtask::toolchain::bpftool())
        .args(["map", "create"])
        .arg(&pending)
        .args(["type", "lru_hash", "key", "16", "value", "24", "entries"])
        .arg(AFTER.nat_ct.to_string())
        .args(["name", "ekpt_pending"])
        .status()
        .expect("running bpftool");
    assert!(status.success(), "bpftool map create: {status}");
    let theirs = flow(77);
    let mut map: HashMap<_, NatCtKey, NatCtValue> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(&pending).expect("opening"),
    ))
    .expect("an LRU map");
    map.insert(theirs.0, theirs.1, 0).expect("writing a flow");

    start(&pins, &cgroup, AFTER);
    no_pending_pins(&pins);
    assert_eq!(max_entries(&pins, MAP_NAT_CT), AFTER.nat_ct);
    assert_holds(&pins, MAP_NAT_CT, &[theirs]);
}

/// The agent restarted with other map sizes under load: TCP connections made every
/// millisecond and a connected UDP socket that sends throughout all reach the Service, and
/// the socket keeps seeing the Service as its peer (its reverse entry moved to the new LRU).
#[test]
fn c33_a_restart_with_other_map_sizes_loses_no_connection() {
    let (mut h, _servers, clients) = ClientsUnderLoad::start("resize-live");

    h.stop_agent();
    let manifests = h.manifests.clone();
    let args = [
        "--map-size-services",
        "1024",
        "--map-size-backends",
        "512",
        "--map-size-rev-nat",
        "512",
        "--map-size-sock-rev-nat",
        "2048",
    ];
    let mut source: Vec<&std::ffi::OsStr> = vec!["--manifests".as_ref(), manifests.as_os_str()];
    source.extend(args.iter().map(std::ffi::OsStr::new));
    h.start_agent_with(&source);
    h.wait_for_log("copied a resized map's entries");
    h.wait_for_ready_starts(2);
    let mark = clients.so_far();
    let pins = &h.pin_path;
    for (name, size) in [
        (MAP_SERVICES, 1024),
        (MAP_BACKENDS, 512),
        (MAP_REV_NAT, 512),
        (MAP_SOCK_REV_NAT, 2048),
    ] {
        let info = MapInfo::from_pin(pins.join("maps").join(name)).expect("reading map info");
        assert_eq!(info.max_entries(), size, "{name}'s size");
    }

    clients.assert_all_answered(mark);
}
