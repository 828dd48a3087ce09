//! Privileged: the north-south programs on devices named with `--devices`: one whose name
//! has a dot, as VLAN devices' names do (`eth0.100`; bpffs refuses a dot in a pin name, and
//! the agent pins each device's links under a name made from the device's), and one that
//! is deleted and created again while the agent runs.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::{CONDITION_LIMIT, Harness, bpftool_json};
use serde_json::Value;

/// Attached and pinned at start, adopted by the next start (the same link, now running that
/// start's program), and detached when the device leaves `--devices`.
#[test]
fn a_device_named_like_a_vlan_is_served_adopted_and_released() {
    let mut h = Harness::new("dotdev", &["pod-a"]);
    h.topo
        .node
        .ip(&[
            "link", "add", "up7.7", "type", "veth", "peer", "name", "up7p",
        ])
        .expect("a device with a dot in its name");
    let links = h.pin_path.join("links");
    let pins = ["ekp_tcx_in@up7:7", "ekp_tcx_out@up7:7"];

    h.start_agent_in_node(&["--devices", "up7.7"]);
    h.wait_for_ready_starts(1);
    for pin in pins {
        let path = links.join(pin);
        let link = bpftool_json(&["link", "show", "pinned", path.to_str().expect("utf-8")]);
        assert_eq!(link["type"], "tcx", "{pin}: {link}");
    }
    // The pin's inode, the link's id and the id of the program it runs.
    let pinned = || {
        let path = links.join(pins[0]);
        let link = bpftool_json(&["link", "show", "pinned", path.to_str().expect("utf-8")]);
        let inode = fs::metadata(&path).expect("the pinned link").ino();
        (inode, link["id"].clone(), link["prog_id"].clone())
    };
    let (inode, link, program) = pinned();

    h.stop_agent();
    h.start_agent_in_node(&["--devices", "up7.7"]);
    h.wait_for_ready_starts(2);
    let (inode_after, link_after, program_after) = pinned();
    assert_eq!(
        (inode_after, link_after),
        (inode, link),
        "the second start replaced the link"
    );
    assert_ne!(
        program_after, program,
        "the second start left its predecessor's program on the link"
    );

    h.stop_agent();
    h.start_agent_in_node(&["--devices", ""]);
    h.wait_for_ready_starts(3);
    for pin in pins {
        assert!(!links.join(pin).exists(), "{pin} still pinned");
    }
}

/// The ifindex of `device` in the node namespace.
fn ifindex(h: &Harness, device: &str) -> u64 {
    let out = xtask::cmd::output(&mut xtask::cmd::new(
        "ip",
        &["-n", h.topo.node.name(), "-j", "link", "show", device],
    ))
    .unwrap_or_else(|e| panic!("ip link show {device}: {e:#}"));
    let links: Value = serde_json::from_str(&out).expect("ip's JSON");
    links[0]["ifindex"].as_u64().expect("an ifindex")
}

/// A veth `up8` in the node namespace.
fn add(h: &Harness) {
    h.topo
        .node
        .ip(&["link", "add", "up8", "type", "veth", "peer", "name", "up8p"])
        .expect("the device");
}

/// The ifindex of the device `ekp_tcx_in`'s link pinned for `up8` is on; `None` when no
/// link is pinned.
fn up8_link_on(h: &Harness) -> Option<u64> {
    let pin = h.pin_path.join("links").join("ekp_tcx_in@up8");
    pin.exists()
        .then(|| {
            bpftool_json(&["link", "show", "pinned", pin.to_str().expect("utf-8")])["ifindex"]
                .as_u64()
        })
        .flatten()
}

/// Waits (bounded) until `ekp_tcx_in`'s link for `up8` is on the device of `ifindex`.
fn wait_until_up8_served(h: &Harness, ifindex: u64) {
    let deadline = Instant::now() + CONDITION_LIMIT;
    while up8_link_on(h) != Some(ifindex) {
        assert!(
            Instant::now() < deadline,
            "up8 (ifindex {ifindex}) never got ekp_tcx_in; log:\n{}",
            h.agent_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kernel detaches a device's TCX links when the device is deleted; a named device
/// created again under its name gets the programs again, without a restart.
#[test]
fn a_named_device_created_again_gets_its_programs_again() {
    let mut h = Harness::new("recreate", &["pod-a"]);
    add(&h);
    h.start_agent_in_node(&["--devices", "up8"]);
    h.wait_for_ready_starts(1);
    assert_eq!(up8_link_on(&h), Some(ifindex(&h, "up8")));

    h.topo
        .node
        .ip(&["link", "del", "up8"])
        .expect("deleting the device");
    add(&h);
    wait_until_up8_served(&h, ifindex(&h, "up8"));
}

/// A named device that does not exist when the agent starts (created later at boot) does
/// not stop the start: the agent serves the rest and attaches the programs to the device
/// when it appears.
#[test]
fn a_named_device_missing_at_start_gets_its_programs_when_it_appears() {
    let mut h = Harness::new("latedev", &["pod-a"]);
    h.start_agent_in_node(&["--devices", "up8"]);
    h.wait_for_ready_starts(1);
    assert_eq!(
        up8_link_on(&h),
        None,
        "a link pinned for a device that is not there"
    );
    add(&h);
    wait_until_up8_served(&h, ifindex(&h, "up8"));
}

/// A named device renamed while no agent runs, and its name taken by another device: the
/// next agent finds the pinned link on the renamed one, and attaches the programs to the
/// device that has the name now instead of adopting it.
#[test]
fn a_pinned_link_on_a_device_renamed_meanwhile_is_not_adopted() {
    let mut h = Harness::new("renamed", &["pod-a"]);
    add(&h);
    h.start_agent_in_node(&["--devices", "up8"]);
    h.wait_for_ready_starts(1);
    let first = ifindex(&h, "up8");
    assert_eq!(up8_link_on(&h), Some(first));

    h.stop_agent();
    h.topo
        .node
        .ip(&["link", "set", "up8", "name", "up8x"])
        .expect("renaming the device");
    h.topo
        .node
        .ip(&["link", "add", "up8", "type", "veth", "peer", "name", "up8q"])
        .expect("another device under the name");
    let second = ifindex(&h, "up8");
    assert_ne!(first, second);
    h.start_agent_in_node(&["--devices", "up8"]);
    h.wait_for_ready_starts(2);
    assert_eq!(
        up8_link_on(&h),
        Some(second),
        "the programs stayed on the renamed device; log:\n{}",
        h.agent_log()
    );
}
