//! Privileged: the north-south programs on a device whose name has a dot, as VLAN devices'
//! names do (`eth0.100`). bpffs refuses a dot in a pin name, and the agent pins each
//! device's links under a name made from the device's.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::{Harness, bpftool_json};

/// Attached and pinned at start, adopted by the next start (the same link), and detached
/// when the device leaves `--devices`.
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
    let inode = || {
        fs::metadata(links.join(pins[0]))
            .expect("the pinned link")
            .ino()
    };
    let attached = inode();

    h.stop_agent();
    h.start_agent_in_node(&["--devices", "up7.7"]);
    h.wait_for_ready_starts(2);
    assert_eq!(inode(), attached, "the second start replaced the link");

    h.stop_agent();
    h.start_agent_in_node(&["--devices", ""]);
    h.wait_for_ready_starts(3);
    for pin in pins {
        assert!(!links.join(pin).exists(), "{pin} still pinned");
    }
}
