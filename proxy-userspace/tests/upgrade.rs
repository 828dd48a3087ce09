//! Privileged: an agent that finds the pins of a version whose backends and rev-NAT maps
//! were hash maps (`ekp_backend_v1`, `ekp_revnat_v1`) copies them into the arrays that
//! replaced them while it loads, before any new program is attached, and unpins them once
//! its programs are attached (a start that fails before leaves them to a rollback); its
//! clients never notice (BEHAVIOUR C33). The socket config array of that version
//! (`ekp_sockcfg_v1`) holds nothing to keep: it is unpinned. A pinned north-south
//! prefilter is turned off as the object loads, since an older agent may have written
//! frontends it lacks.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use aya::maps::{Array, HashMap, Map, MapData};
use common::{ClientsUnderLoad, Pins, SMALL_MAPS};
use proxy_common::{
    BackendValue, MAP_BACKENDS, MAP_BACKENDS_V1, MAP_REV_NAT, MAP_REV_NAT_V1, MAP_SOCK_CONFIG,
    MAP_SOCK_CONFIG_V1, MAP_SOCK_PINS_V1, NS_FILTER_IN, NS_FILTER_OUT, NsFilter, PROTO_TCP,
    RevNatValue,
};
use proxy_userspace::dataplane::{self, Maps};

fn load(pins: &Path) {
    dataplane::load(pins, SMALL_MAPS, 0, false, false)
        .unwrap_or_else(|e| panic!("loading the object on {}: {e:#}", pins.display()));
}

fn backend(addr: Ipv4Addr, port: u16) -> BackendValue {
    BackendValue {
        addr: u32::from_ne_bytes(addr.octets()),
        port: port.to_be(),
        proto: PROTO_TCP,
        flags: 0,
    }
}

fn frontend(addr: Ipv4Addr, port: u16) -> RevNatValue {
    RevNatValue {
        addr: u32::from_ne_bytes(addr.octets()),
        port: port.to_be(),
        _pad: [0; 2],
    }
}

/// Pins a map as the older version created it (`bpftool map create`), of `kind` (`hash`,
/// `array`), and opens it.
fn pin_v1_map(pins: &Path, name: &str, kind: &str, sizes: (u32, u32), entries: u32) -> MapData {
    let path = pins.join("maps").join(name);
    let status = Command::new(xtask::toolchain::bpftool())
        .arg("map")
        .arg("create")
        .arg(&path)
        .args(["type", kind, "key", &sizes.0.to_string()])
        .args(["value", &sizes.1.to_string()])
        .args(["entries", &entries.to_string(), "name", name])
        .status()
        .expect("running bpftool");
    assert!(status.success(), "bpftool map create {name}: {status}");
    MapData::from_pin(&path).expect("opening the pinned map")
}

/// [`pin_v1_map`] of a hash map as the older version's backends and rev-NAT maps were.
fn pin_v1_hash_map(pins: &Path, name: &str, key_size: u32, value_size: u32) -> Map {
    Map::HashMap(pin_v1_map(
        pins,
        name,
        "hash",
        (key_size, value_size),
        65536,
    ))
}

/// [`pin_v1_hash_map`] of `K` -> `V`, holding `entries`.
fn pin_v1_entries<K: aya::Pod, V: aya::Pod>(pins: &Path, name: &str, entries: &[(K, V)]) {
    let (key_size, value_size) = (size_of::<K>() as u32, size_of::<V>() as u32);
    let mut map: HashMap<_, K, V> =
        HashMap::try_from(pin_v1_hash_map(pins, name, key_size, value_size)).expect("a hash map");
    for (key, value) in entries {
        map.insert(key, value, 0).expect("writing a v1 entry");
    }
}

#[test]
fn an_older_versions_hash_maps_are_copied_into_the_arrays_before_the_programs_attach() {
    let pins = Pins::new("upgrade");

    // A newer agent ran here once (its arrays stay pinned, one entry in each), then an older
    // one: after that downgrade its hash maps hold the truth.
    load(&pins.0);
    let open_array = |name: &str| {
        MapData::from_pin(pins.0.join("maps").join(name)).expect("opening a pinned array")
    };
    let mut stale: Array<_, BackendValue> =
        Array::try_from(Map::Array(open_array(MAP_BACKENDS))).expect("an array");
    stale
        .set(2, backend(Ipv4Addr::new(10, 244, 9, 9), 9), 0)
        .expect("writing a stale backend");
    let mut stale: Array<_, RevNatValue> =
        Array::try_from(Map::Array(open_array(MAP_REV_NAT))).expect("an array");
    stale
        .set(2, frontend(Ipv4Addr::new(10, 96, 9, 9), 9), 0)
        .expect("writing a stale frontend");

    let kept = [
        (1, backend(Ipv4Addr::new(10, 244, 0, 10), 8080)),
        (7, backend(Ipv4Addr::new(10, 244, 0, 11), 8080)),
        (63, backend(Ipv4Addr::new(10, 244, 0, 12), 8080)),
    ];
    // And one beyond the 64 entries of the new array (index 0 unused): left for the first
    // sync.
    let beyond = (64, backend(Ipv4Addr::new(10, 244, 0, 13), 8080));
    let v1: Vec<(u32, BackendValue)> = kept.iter().copied().chain([beyond]).collect();
    pin_v1_entries(&pins.0, MAP_BACKENDS_V1, &v1);
    let frontends = [
        (3, frontend(Ipv4Addr::new(10, 96, 0, 10), 80)),
        (4, frontend(Ipv4Addr::new(10, 96, 0, 11), 53)),
    ];
    pin_v1_entries::<u16, RevNatValue>(&pins.0, MAP_REV_NAT_V1, &frontends);

    // The upgrade: load only (what `run` does before it attaches anything). The old maps
    // stay pinned until the new programs are attached (C33 below): a start that fails
    // here leaves them to the version rolled back to.
    load(&pins.0);

    for old in [MAP_BACKENDS_V1, MAP_REV_NAT_V1] {
        assert!(
            pins.0.join("maps").join(old).exists(),
            "{old} was unpinned before any program was attached"
        );
    }
    let contents = Maps::open_pinned(&pins.0)
        .expect("opening the pinned maps")
        .read()
        .expect("reading the maps");
    assert_eq!(contents.backends, kept.to_vec(), "the backends array");
    assert_eq!(contents.rev_nat, frontends.to_vec(), "the rev-NAT array");
}

/// The prefilter's bits are only complete for what the agent that set them wrote: after a
/// downgrade, the older agent (which does not know the filter) may have added frontends
/// without bits, which the armed filter would pass untranslated until the newer agent's
/// first sync. So loading the object disarms it, before any program is attached, and
/// changes nothing else; the first sync arms it with bits of its own.
#[test]
fn a_pinned_prefilter_is_disarmed_as_the_object_loads_its_bits_kept() {
    let pins = Pins::new("nsfilter");
    load(&pins.0);
    let node = u32::from_ne_bytes([192, 168, 77, 11]);
    let pod = u32::from_ne_bytes([10, 244, 1, 10]);
    let mut armed = [NsFilter::EMPTY, NsFilter::EMPTY];
    armed[0].insert(node, 30080u16.to_be());
    armed[1].insert(pod, 8080u16.to_be());
    let mut maps = Maps::open_pinned(&pins.0).expect("opening the pinned maps");
    for (entry, filter) in [NS_FILTER_IN, NS_FILTER_OUT].into_iter().zip(&mut armed) {
        filter.armed = 1;
        maps.put_ns_filter(entry, filter)
            .expect("arming the pinned filter");
    }
    drop(maps);

    load(&pins.0);

    let maps = Maps::open_pinned(&pins.0).expect("opening the pinned maps");
    for (entry, before) in [NS_FILTER_IN, NS_FILTER_OUT].into_iter().zip(&armed) {
        let after = maps
            .ns_filter(entry)
            .expect("reading the filter")
            .expect("the filter is pinned");
        assert_eq!(after.armed, 0, "entry {entry} still armed");
        assert_eq!(after.bits, before.bits, "entry {entry} lost bits");
    }
}

/// A pin under an old name whose entries are not the old layout is not read (a batch read
/// would write entries of its sizes into buffers sized for the old ones): the load fails,
/// naming the sizes, and leaves it pinned for whoever made it.
#[test]
fn a_v1_map_of_another_layout_fails_the_load_and_stays() {
    let pins = Pins::new("upgrade");
    std::fs::create_dir_all(pins.0.join("maps")).expect("creating the maps directory");
    pin_v1_hash_map(&pins.0, MAP_BACKENDS_V1, 4, 16);
    let Err(e) = dataplane::load(&pins.0, SMALL_MAPS, 0, false, false) else {
        panic!("the load read a map of another layout");
    };
    let message = format!("{e:#}");
    assert!(message.contains("16-byte values, not 4 and 8"), "{message}");
    assert!(pins.0.join("maps").join(MAP_BACKENDS_V1).exists());
}

/// The upgrade under load. The agent is stopped and its arrays turned into the hash maps the
/// older version would have left (the same entries under the old names; the arrays unpinned,
/// as that version had none: the attached programs keep theirs), then the agent is started
/// again. TCP connections made every millisecond and a connected UDP socket that sends
/// throughout all reach the Service, and the socket keeps seeing the Service as its peer
/// (its reverse view needs the rev-NAT entry of its frontend from the first packet on).
#[test]
fn c33_an_upgrade_from_the_hash_maps_loses_no_connection() {
    let (mut h, _servers, clients) = ClientsUnderLoad::start("upgrade-live");

    h.stop_agent();
    let contents = Maps::open_pinned(&h.pin_path)
        .expect("opening the pinned maps")
        .read()
        .expect("reading the maps");
    assert!(!contents.backends.is_empty() && !contents.rev_nat.is_empty());
    pin_v1_entries(&h.pin_path, MAP_BACKENDS_V1, &contents.backends);
    pin_v1_entries(&h.pin_path, MAP_REV_NAT_V1, &contents.rev_nat);
    // The socket config of that version: the cookie alone; and a map under the sockets'
    // storage's older name (an array here: only its name matters).
    pin_v1_map(&h.pin_path, MAP_SOCK_CONFIG_V1, "array", (4, 8), 1);
    pin_v1_map(&h.pin_path, MAP_SOCK_PINS_V1, "array", (4, 8), 1);
    for new in [MAP_BACKENDS, MAP_REV_NAT, MAP_SOCK_CONFIG] {
        std::fs::remove_file(h.pin_path.join("maps").join(new)).expect("unpinning an array");
    }

    h.start_agent();
    h.wait_for_log("copied the entries of an older version's map");
    h.wait_for_ready_starts(2);
    let mark = clients.so_far();
    for old in [
        MAP_BACKENDS_V1,
        MAP_REV_NAT_V1,
        MAP_SOCK_CONFIG_V1,
        MAP_SOCK_PINS_V1,
    ] {
        assert!(
            !h.pin_path.join("maps").join(old).exists(),
            "{old} is still pinned"
        );
    }
    clients.assert_all_answered(mark);
}
