//! Privileged: an agent that finds the pins of a version whose backends and rev-NAT maps
//! were hash maps (`ekp_backend_v1`, `ekp_revnat_v1`) copies them into the arrays that
//! replaced them while it loads, before any new program is attached, and unpins them.
//! No traffic: the test loads the object on pins of its own and reads the maps.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use aya::maps::{Array, HashMap, Map, MapData};
use proxy_common::{
    BackendValue, MAP_BACKENDS, MAP_BACKENDS_V1, MAP_REV_NAT, MAP_REV_NAT_V1, PROTO_TCP,
    RevNatValue,
};
use proxy_userspace::dataplane::{self, MapSizes, Maps};
use xtask::netns;

/// The test's pin directory, removed with everything in it when the test ends.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = dataplane::cleanup(&self.0) {
            eprintln!("cleanup of {} failed: {e:#}", self.0.display());
        }
    }
}

/// Small maps: the test needs a few entries, and the arrays' size decides which ids fit.
const SIZES: MapSizes = MapSizes {
    services: 64,
    backends: 64,
    rev_nat: 64,
    sock_rev_nat: 64,
    affinity: 64,
    nat_ct: 64,
    source_ranges: 64,
};

fn load(pins: &Path) {
    dataplane::load(pins, SIZES, 0, false, false)
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

/// Pins a hash map as the older version created it (`bpftool map create`) and opens it.
fn pin_v1_hash_map(pins: &Path, name: &str, key_size: u32, value_size: u32) -> Map {
    let path = pins.join("maps").join(name);
    let status = Command::new(xtask::toolchain::bpftool())
        .arg("map")
        .arg("create")
        .arg(&path)
        .args(["type", "hash", "key", &key_size.to_string()])
        .args(["value", &value_size.to_string(), "entries", "128"])
        .args(["name", name])
        .status()
        .expect("running bpftool");
    assert!(status.success(), "bpftool map create {name}: {status}");
    Map::HashMap(MapData::from_pin(&path).expect("opening the pinned hash map"))
}

#[test]
fn an_older_versions_hash_maps_are_copied_into_the_arrays_before_the_programs_attach() {
    if let Err(e) = netns::require_privileges() {
        panic!("privileged test `upgrade` cannot run: {e:#}");
    }
    common::ensure_bpffs();
    let pins = Pins(PathBuf::from("/sys/fs/bpf").join(netns::unique_prefix("ekpt-upgrade")));

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
    let mut v1: HashMap<_, u32, BackendValue> =
        HashMap::try_from(pin_v1_hash_map(&pins.0, MAP_BACKENDS_V1, 4, 8)).expect("a hash map");
    for (id, value) in kept {
        v1.insert(id, value, 0).expect("writing a v1 backend");
    }
    // Beyond the 64 entries of the new array (index 0 unused): left for the first sync.
    v1.insert(64, backend(Ipv4Addr::new(10, 244, 0, 13), 8080), 0)
        .expect("writing a v1 backend");
    let frontends = [
        (3, frontend(Ipv4Addr::new(10, 96, 0, 10), 80)),
        (4, frontend(Ipv4Addr::new(10, 96, 0, 11), 53)),
    ];
    let mut v1: HashMap<_, u16, RevNatValue> =
        HashMap::try_from(pin_v1_hash_map(&pins.0, MAP_REV_NAT_V1, 2, 8)).expect("a hash map");
    for (id, value) in frontends {
        v1.insert(id, value, 0).expect("writing a v1 rev-NAT entry");
    }

    // The upgrade: load only (what `run` does before it attaches anything).
    load(&pins.0);

    for old in [MAP_BACKENDS_V1, MAP_REV_NAT_V1] {
        assert!(
            !pins.0.join("maps").join(old).exists(),
            "{old} is still pinned"
        );
    }
    let contents = Maps::open_pinned(&pins.0)
        .expect("opening the pinned maps")
        .read()
        .expect("reading the maps");
    assert_eq!(contents.backends, kept.to_vec(), "the backends array");
    assert_eq!(contents.rev_nat, frontends.to_vec(), "the rev-NAT array");
}
