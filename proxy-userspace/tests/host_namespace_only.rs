//! Privileged: the host-namespace-only socket LB for service meshes (issue 7; Cilium's
//! `socketLB.hostNamespaceOnly`).
//!
//! The agent runs inside the harness's node namespace. A "sidecar" in the client pod is an
//! nftables redirect of the Service address to a local listener, as Istio's iptables rules
//! are. With the socket LB translating every namespace, `connect()` already carries the
//! backend's address and the sidecar never sees the connection; in host-namespace-only mode
//! it does, and without the sidecar the pod still reaches the backends, translated per
//! packet on its device (`--pod-devices`), while the socket still shows the Service address.
//! A pod reaching itself through its Service (hairpin) works too. The node's own processes
//! keep the socket LB. Traffic stays on the harness's bridge: the pods route the Service
//! range to the node, nothing routes anywhere else.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, answers};
use serde_json::Value;

const VIP: &str = "10.96.0.10";
const ECONNREFUSED: i64 = 111;
/// Waiting for a condition gives up after this long; it is a hang guard, not a timing.
const CONDITION_LIMIT: Duration = Duration::from_secs(20);

fn run(ns: &xtask::netns::Netns, program: &str, args: &[&str]) {
    let mut command = ns.command(program, None).expect("command");
    command.args(args);
    xtask::cmd::output(&mut command).unwrap_or_else(|e| panic!("{program} {args:?}: {e:#}"));
}

/// `ekp-peer <args>` run in the node namespace and the test cgroup (a process on the node).
fn node_client(h: &Harness, args: &[&str]) -> Vec<Value> {
    let mut command = h
        .topo
        .node
        .command(common::PEER, Some(&h.topo.cgroup))
        .expect("node client");
    command.args(args);
    let out = xtask::cmd::output(&mut command).unwrap_or_else(|e| panic!("node client: {e:#}"));
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Waits until the agent pinned its pod program on `device`.
fn wait_for_pod_link(h: &Harness, device: &str) {
    let pin = h
        .pin_path
        .join("links")
        .join(format!("ekp_pod_in@{device}"));
    let deadline = Instant::now() + CONDITION_LIMIT;
    while !pin.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared; agent log:\n{}",
            pin.display(),
            h.agent_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn host_namespace_only_leaves_pods_to_their_sidecars_and_devices() {
    let mut h = Harness::new("hostonly", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[5353]);
    h.write_web_with_dns(VIP);
    // Pods reach Services through their node, as with any CNI.
    for ns in [&h.topo.client.ns, &h.topo.pods[0].ns] {
        ns.ip(&["route", "add", "10.96.0.0/16", "via", "10.244.0.1"])
            .expect("route to the Service range");
    }
    h.topo
        .node
        .sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding on the node");
    // The sidecar: Service traffic redirected to a local listener, Istio-style.
    let mut sidecar = h
        .topo
        .client
        .ns
        .command(common::PEER, None)
        .expect("sidecar");
    sidecar.args(["serve", "--name", "sidecar", "--tcp", "15001"]);
    let _sidecar = xtask::netns::Proc::spawn_ready(sidecar, "sidecar", "ready")
        .unwrap_or_else(|e| panic!("starting the sidecar: {e:#}"));
    run(&h.topo.client.ns, "nft", &["add", "table", "ip", "mesh"]);
    run(
        &h.topo.client.ns,
        "nft",
        &["add chain ip mesh out { type nat hook output priority -100; }"],
    );
    run(
        &h.topo.client.ns,
        "nft",
        &["add rule ip mesh out ip daddr 10.96.0.10 tcp dport 80 redirect to :15001"],
    );

    // Socket LB everywhere: the pod's connect() is rewritten before the sidecar's rule
    // can see the Service address, so the backends answer: the mesh is bypassed.
    h.start_agent_in_node(&[]);
    let both = ["10.244.0.10:8080", "10.244.0.11:8080"];
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&both));
    let counts = answers(&h.client(&["tcp", "10.96.0.10:80", "10"]));
    assert!(!counts.contains_key("sidecar"), "{counts:?}");

    // Host namespace only: the sidecar gets every connection.
    h.kill_agent();
    h.start_agent_in_node(&["--socket-lb-host-namespace-only", "--pod-devices", "veth*"]);
    for device in ["veth0", "veth1", "veth2"] {
        wait_for_pod_link(&h, device);
    }
    let deadline = Instant::now() + CONDITION_LIMIT;
    loop {
        let counts = answers(&h.client(&["tcp", "10.96.0.10:80", "1"]));
        if counts.contains_key("sidecar") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar never got a connection: {counts:?}"
        );
    }
    let counts = answers(&h.client(&["tcp", "10.96.0.10:80", "10"]));
    assert_eq!(counts.get("sidecar"), Some(&10), "{counts:?}");

    // Without the sidecar the pod reaches both backends, translated on its device; its
    // socket shows the Service address. UDP too.
    run(&h.topo.client.ns, "nft", &["delete", "table", "ip", "mesh"]);
    let lines = h.client(&["tcp", "10.96.0.10:80", "40"]);
    assert!(
        lines.iter().all(|l| l["peer"] == "10.96.0.10:80"),
        "{lines:?}"
    );
    let counts = answers(&lines);
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["pod-a", "pod-b"],
        "{counts:?}\n{}",
        h.agent_log()
    );
    let lines = h.client(&["udp", "10.96.0.10:53", "20", "--connected"]);
    assert!(
        lines
            .iter()
            .all(|l| l["ok"] == true && l["peer"] == "10.96.0.10:53"),
        "{lines:?}"
    );

    // A port or protocol the Service does not define is refused on the pod's device (ICMP
    // port unreachable), as the socket programs refuse it.
    h.wait_for_map_entries(proxy_common::MAP_CLUSTER_IPS, 1);
    for args in [
        &["tcp", "10.96.0.10:81", "3"][..],
        &["udp", "10.96.0.10:80", "3", "--connected"][..],
    ] {
        let lines = h.client(args);
        assert_eq!(lines.len(), 3, "{args:?}: {lines:?}");
        for line in lines {
            assert_eq!(line["errno"], ECONNREFUSED, "{args:?}: {line}");
        }
    }

    // Hairpin: pod-a through its own Service reaches itself too (from the Service address,
    // which its stack accepts, where its own address would be dropped), and pod-b.
    let mut command = h.topo.pods[0]
        .ns
        .command(common::PEER, Some(&h.topo.cgroup))
        .expect("client in pod-a");
    command.args(["tcp", "10.96.0.10:80", "40"]);
    let out = xtask::cmd::output(&mut command).unwrap_or_else(|e| panic!("pod-a client: {e:#}"));
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect();
    let counts = answers(&lines);
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["pod-a", "pod-b"],
        "{lines:?}"
    );

    // A pod that starts while the agent runs is served on its device's link event: the next
    // sync is the 30 s period away, longer than any wait here.
    let late = xtask::netns::attach_to_bridge(
        &h.topo.node,
        &h.prefix,
        "late",
        std::net::Ipv4Addr::new(10, 244, 0, 30),
        9,
    )
    .expect("a pod started later");
    late.ip(&["route", "add", "10.96.0.0/16", "via", "10.244.0.1"])
        .expect("route to the Service range");
    wait_for_pod_link(&h, "veth9");
    let mut command = late
        .command(common::PEER, Some(&h.topo.cgroup))
        .expect("client in the late pod");
    command.args(["tcp", "10.96.0.10:80", "10"]);
    let out = xtask::cmd::output(&mut command).unwrap_or_else(|e| panic!("late client: {e:#}"));
    assert_eq!(
        out.lines().filter(|l| l.contains("\"ok\":true")).count(),
        10,
        "{out}"
    );

    // The node's own processes keep the socket LB.
    let counts = answers(&node_client(&h, &["tcp", "10.96.0.10:80", "20"]));
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");

    // `list --maps` shows the pod flows in the conntrack map (none come from the socket LB).
    assert!(h.map_entries("ekp_nat_ct_v1") > 0);
}
