//! Privileged: the socket programs' pinned links follow `--cgroup`. A start on another cgroup
//! than the one the pinned links are on moves them there (the old cgroup keeps nothing of
//! ours); a start whose pinned links lost their cgroup (it was removed, which detaches them)
//! attaches anew instead of failing on them.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Pins, SMALL_MAPS, bpftool_json};
use proxy_userspace::dataplane::{self, SOCK_PROGRAMS, SockSettings};
use serde_json::Value;
use xtask::netns::{self, Cgroup};

fn cgroup(tag: &str) -> Cgroup {
    Cgroup::create(&netns::unique_prefix(&format!("ekpt-cgroup-{tag}")))
        .unwrap_or_else(|e| panic!("creating a test cgroup: {e:#}"))
}

/// What `run` does at start, without a source: load, attach to `cgroup`.
fn start(pins: &Pins, cgroup: &Path) {
    let loaded = dataplane::load(&pins.0, SMALL_MAPS, 0, false, false)
        .unwrap_or_else(|e| panic!("loading the object on {}: {e:#}", pins.0.display()));
    dataplane::start(loaded, &pins.0, cgroup, None, SockSettings::default(), &[])
        .unwrap_or_else(|e| panic!("attaching to {}: {e:#}", cgroup.display()));
}

/// The cgroup id of every socket program's pinned link, as bpftool reads it.
fn links_cgroup_ids(pins: &Pins) -> Vec<(&'static str, u64)> {
    SOCK_PROGRAMS
        .iter()
        .map(|name| {
            let pin = pins.0.join("links").join(name);
            let link = bpftool_json(&["link", "show", "pinned", &pin.to_string_lossy()]);
            (*name, link["cgroup_id"].as_u64().unwrap_or(0))
        })
        .collect()
}

fn id_of(cgroup: &Cgroup) -> u64 {
    std::fs::metadata(cgroup.path())
        .expect("reading the cgroup directory")
        .ino()
}

/// The links on `cgroup` (of any program), as bpftool lists every link.
fn links_on(cgroup: &Cgroup) -> Vec<Value> {
    let Value::Array(links) = bpftool_json(&["link", "show"]) else {
        panic!("bpftool link show: not a list");
    };
    links
        .into_iter()
        .filter(|l| l["cgroup_id"].as_u64() == Some(id_of(cgroup)))
        .collect()
}

fn no_moving_pins(pins: &Pins) {
    let left: Vec<_> = std::fs::read_dir(pins.0.join("links"))
        .expect("listing the links")
        .map(|e| e.expect("an entry").file_name())
        .filter(|name| name.to_string_lossy().ends_with("_moving"))
        .collect();
    assert!(left.is_empty(), "links left mid-move: {left:?}");
}

#[test]
fn a_start_on_another_cgroup_moves_the_pinned_links_there() {
    let pins = Pins::new("cgroup-move");
    let (first, second) = (cgroup("first"), cgroup("second"));
    start(&pins, first.path());
    for (name, id) in links_cgroup_ids(&pins) {
        assert_eq!(id, id_of(&first), "{name} on the first cgroup");
    }
    assert_eq!(links_on(&first).len(), SOCK_PROGRAMS.len());

    start(&pins, second.path());
    for (name, id) in links_cgroup_ids(&pins) {
        assert_eq!(id, id_of(&second), "{name} on the second cgroup");
    }
    assert_eq!(links_on(&second).len(), SOCK_PROGRAMS.len());
    assert_eq!(
        links_on(&first),
        Vec::<Value>::new(),
        "left on the first cgroup"
    );
    no_moving_pins(&pins);
}

#[test]
fn a_start_whose_links_lost_their_cgroup_attaches_anew() {
    let pins = Pins::new("cgroup-gone");
    let gone = cgroup("gone");
    start(&pins, gone.path());
    drop(gone);
    // The kernel detaches a removed cgroup's links once its last socket is gone, on a
    // workqueue: wait for that (a guard against a hang, not a timing).
    let deadline = Instant::now() + common::CONDITION_LIMIT;
    while links_cgroup_ids(&pins).iter().any(|(_, id)| *id != 0) {
        assert!(
            Instant::now() < deadline,
            "the removed cgroup's links are still attached: {:?}",
            links_cgroup_ids(&pins)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let next = cgroup("next");
    start(&pins, next.path());
    for (name, id) in links_cgroup_ids(&pins) {
        assert_eq!(id, id_of(&next), "{name} on the new cgroup");
    }
    assert_eq!(links_on(&next).len(), SOCK_PROGRAMS.len());
    no_moving_pins(&pins);
}

/// A start stopped mid-move left a new link pinned as `<program>_moving` beside the old
/// one: the next start drops it, whichever cgroup it asks for.
#[test]
fn a_link_left_mid_move_is_dropped() {
    let (pins, elsewhere) = (Pins::new("cgroup-stale"), Pins::new("cgroup-stale-src"));
    let (first, other) = (cgroup("stale-first"), cgroup("stale-other"));
    start(&pins, first.path());
    // A link of the same program on another cgroup, pinned under the mid-move name.
    start(&elsewhere, other.path());
    let stale = pins
        .0
        .join("links")
        .join(format!("{}_moving", SOCK_PROGRAMS[0]));
    std::fs::rename(elsewhere.0.join("links").join(SOCK_PROGRAMS[0]), &stale)
        .expect("moving a pinned link");

    start(&pins, first.path());
    no_moving_pins(&pins);
    assert_eq!(
        links_on(&other).len(),
        SOCK_PROGRAMS.len() - 1,
        "the stale link is still attached"
    );
    for (name, id) in links_cgroup_ids(&pins) {
        assert_eq!(id, id_of(&first), "{name} on the first cgroup");
    }
}
