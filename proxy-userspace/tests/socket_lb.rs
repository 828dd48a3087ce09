//! Privileged: the real binary on manifests, real sockets in network namespaces, the
//! socket programs attached to a cgroup of the test's own.

mod common;

use std::collections::BTreeMap;

use common::{BackgroundClient, Harness, answers, service, slice, slice_with_conditions};
use xtask::netns::Proc;

const VIP: &str = "10.96.0.10";
/// A second Service's address.
const VIP2: &str = "10.96.0.11";
/// A client whose one socket asks the UDP Service at `VIP` 600 times, every 5 ms.
const KEPT_SOCKET: [&str; 6] = [
    "udp",
    "10.96.0.10:53",
    "1000000",
    "--keep-socket",
    "--every-ms",
    "5",
];
/// ENETUNREACH: the client namespace has no route for an untranslated Service address.
const ENETUNREACH: i64 = 101;
const ECONNREFUSED: i64 = 111;

fn web(h: &Harness, endpoints: &[(&str, bool)]) {
    h.write_manifest("web-svc.yaml", &service("web", VIP, &[("http", 80, "TCP")]));
    h.write_manifest(
        "web-eps.yaml",
        &slice("web-1", "web", &[("http", 8080, "TCP")], endpoints),
    );
}

/// A UDP Service on the VIP's port 53 with both pods' port 5353 as endpoints.
fn dns(h: &Harness) {
    h.write_manifest("dns-svc.yaml", &service("dns", VIP, &[("dns", 53, "UDP")]));
    h.write_manifest(
        "dns-eps.yaml",
        &slice(
            "dns-1",
            "dns",
            &[("dns", 5353, "UDP")],
            &[("10.244.0.10", true), ("10.244.0.11", true)],
        ),
    );
}

/// The agent running with `web` and `dns` on both pods, both frontends programmed, and the
/// pods' servers (kept alive by the caller).
fn web_and_dns_running(tag: &str) -> (Harness, Vec<Proc>) {
    let mut h = Harness::new(tag, &["pod-a", "pod-b"]);
    let servers = h.serve(&[8080], &[5353]);
    web(&h, &[("10.244.0.10", true), ("10.244.0.11", true)]);
    dns(&h);
    h.start_agent();
    h.wait_for_frontend(
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    h.wait_for_frontend(
        "10.96.0.10:53",
        "UDP",
        Some(&["10.244.0.10:5353", "10.244.0.11:5353"]),
    );
    (h, servers)
}

#[test]
fn c02_tcp_connections_reach_every_backend_and_getpeername_shows_the_vip() {
    let mut h = Harness::new("tcp", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    web(&h, &[("10.244.0.10", true), ("10.244.0.11", true)]);
    h.start_agent();
    h.wait_for_frontend(
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );

    let lines = h.client(&["tcp", "10.96.0.10:80", "200"]);
    let counts = answers(&lines);
    assert_eq!(counts.values().sum::<usize>(), 200);
    for pod in ["pod-a", "pod-b"] {
        let n = counts.get(pod).copied().unwrap_or(0);
        assert!(
            n >= 40,
            "{pod} answered {n} of 200 connections (want >= 20%): {counts:?}"
        );
    }
    for line in &lines {
        assert_eq!(
            line["peer"], "10.96.0.10:80",
            "getpeername must show the Service address"
        );
    }
}

#[test]
fn udp_sendto_replies_come_from_the_vip_and_connected_udp_works() {
    let mut h = Harness::new("udp", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[], &[5353]);
    dns(&h);
    h.start_agent();
    h.wait_for_frontend(
        "10.96.0.10:53",
        "UDP",
        Some(&["10.244.0.10:5353", "10.244.0.11:5353"]),
    );

    let unconnected = h.client(&["udp", "10.96.0.10:53", "100"]);
    let counts = answers(&unconnected);
    assert_eq!(
        counts.len(),
        2,
        "both backends answer unconnected sendto: {counts:?}"
    );
    for line in &unconnected {
        assert_eq!(
            line["peer"], "10.96.0.10:53",
            "recvfrom must show the Service address"
        );
    }

    let connected = h.client(&["udp", "10.96.0.10:53", "50", "--connected"]);
    let counts = answers(&connected);
    assert_eq!(counts.values().sum::<usize>(), 50, "{counts:?}");
    for line in &connected {
        assert_eq!(
            line["peer"], "10.96.0.10:53",
            "getpeername on a connected UDP socket"
        );
    }
}

/// The reverse entry of a translated socket (what `getpeername` and `recvfrom` need) is
/// deleted when the socket closes. Each socket's backend is in its slot (see the next
/// test), freed by the socket's cookie.
#[test]
fn closed_sockets_take_their_reverse_entries_with_them() {
    let (h, _servers) = web_and_dns_running("release");
    const MAP: &str = "ekp_sk_rnat_v1";
    assert_eq!(h.map_entries(MAP), 0);

    // Each answer proves its socket was translated and reverse-translated while open.
    for (args, what, vip) in [
        (&["tcp", "10.96.0.10:80", "50"][..], "TCP", "10.96.0.10:80"),
        (
            &["udp", "10.96.0.10:53", "50", "--connected"][..],
            "connected UDP",
            "10.96.0.10:53",
        ),
    ] {
        assert_answered_through(&h.client(args), 50, vip);
        assert_eq!(h.map_entries(MAP), 0, "{what}: entries left after close");
        assert_eq!(
            h.map_entries("ekp_sk_slot_v1"),
            0,
            "{what}: slots held after close"
        );
    }

    // Unconnected, a new socket per request: one backend each, in the socket's slot.
    let lines = h.client(&["udp", "10.96.0.10:53", "20"]);
    assert_answered_through(&lines, 20, "10.96.0.10:53");
    assert_eq!(h.map_entries(MAP), 0);
    assert_eq!(h.map_entries("ekp_sk_slot_v1"), 0);

    // Unconnected, one socket for every request: its backend (the same for every
    // datagram) is in its slot.
    let lines = h.client(&["udp", "10.96.0.10:53", "40", "--keep-socket"]);
    assert_answered_through(&lines, 40, "10.96.0.10:53");
    assert_eq!(h.map_entries(MAP), 0);
    assert_eq!(h.map_entries("ekp_sk_slot_v1"), 0);
}

/// An `AF_INET6` socket reaches a ClusterIP through its IPv4-mapped address, as Java's and
/// .NET's dual-stack sockets do (the kernel runs the IPv6 hooks for them): TCP, unconnected
/// and connected UDP are translated to both backends, the application sees the mapped
/// Service address as its peer, and closed sockets free what they held.
#[test]
fn dual_stack_sockets_reach_the_vip_through_its_ipv4_mapped_address() {
    let (h, _servers) = web_and_dns_running("mapped");
    for (args, what, frontend) in [
        (
            &["tcp", "[::ffff:10.96.0.10]:80", "50"][..],
            "TCP",
            "[::ffff:10.96.0.10]:80",
        ),
        (
            &["udp", "[::ffff:10.96.0.10]:53", "50"][..],
            "unconnected UDP",
            "[::ffff:10.96.0.10]:53",
        ),
        (
            &["udp", "[::ffff:10.96.0.10]:53", "50", "--connected"][..],
            "connected UDP",
            "[::ffff:10.96.0.10]:53",
        ),
    ] {
        let lines = h.client(args);
        assert_answered_through(&lines, 50, frontend);
        let counts = answers(&lines);
        assert_eq!(counts.len(), 2, "{what}: both backends answer: {counts:?}");
        assert_eq!(
            h.map_entries("ekp_sk_slot_v1"),
            0,
            "{what}: slots held after close"
        );
        assert_eq!(
            h.map_entries("ekp_sk_rnat_v1"),
            0,
            "{what}: entries left after close"
        );
    }
}

/// A UDP socket that connects to the Service again before each request keeps its backend,
/// as kube-proxy's conntrack keeps the flow of its unchanged source port.
#[test]
fn a_udp_socket_that_connects_again_keeps_its_backend() {
    let (h, _servers) = web_and_dns_running("udpreconnect");
    let lines = h.client(&[
        "udp",
        "10.96.0.10:53",
        "40",
        "--connected",
        "--keep-socket",
        "--reconnect",
    ]);
    assert_answered_through(&lines, 40, "10.96.0.10:53");
    let counts = answers(&lines);
    assert_eq!(counts.len(), 1, "more than one backend: {counts:?}");
}

/// An unconnected UDP socket's datagrams to a Service all go to one backend, as
/// kube-proxy's conntrack keeps a UDP flow on the endpoint its first datagram went to;
/// they stay there when backends are added before it in the Service's sorted list (two
/// here, which move it two slots up), and move when it leaves (`stale_udp.rs`).
#[test]
fn an_unconnected_udp_socket_keeps_its_backend() {
    let mut h = Harness::new("udppin", &["pod-a", "pod-b", "pod-c", "pod-d"]);
    let _servers = h.serve(&[], &[5353]);
    let endpoints = |pods: &[&str]| {
        let list: Vec<(&str, bool)> = pods.iter().map(|p| (*p, true)).collect();
        slice("dns-1", "dns", &[("dns", 5353, "UDP")], &list)
    };
    h.write_manifest("dns-svc.yaml", &service("dns", VIP, &[("dns", 53, "UDP")]));
    h.write_manifest("dns-eps.yaml", &endpoints(&["10.244.0.12", "10.244.0.13"]));
    h.start_agent();
    h.wait_for_frontend(
        "10.96.0.10:53",
        "UDP",
        Some(&["10.244.0.12:5353", "10.244.0.13:5353"]),
    );

    // Four sockets, each asking every 5 ms; pod-a (.10) and pod-b (.11) join while they do,
    // taking slots 1 and 2 and moving both backends two slots up.
    let clients = spawn_clients(&h, "pin", 4, &KEPT_SOCKET);
    for client in &clients {
        client.wait_for_lines(40);
    }
    let all = ["10.244.0.10", "10.244.0.11", "10.244.0.12", "10.244.0.13"];
    h.write_manifest("dns-eps.yaml", &endpoints(&all));
    h.wait_for_frontend(
        "10.96.0.10:53",
        "UDP",
        Some(
            &all.map(|a| format!("{a}:5353"))
                .each_ref()
                .map(String::as_str),
        ),
    );
    let after_change: Vec<usize> = clients.iter().map(|c| c.lines_so_far()).collect();
    for (i, client) in clients.iter().enumerate() {
        let lines = client.lines_after(after_change[i], 100);
        assert_answered_through(&lines, lines.len(), "10.96.0.10:53");
        assert_one_backend(i, "10.96.0.10:53", &answers(&lines));
    }
}

/// With session affinity too, an unconnected UDP socket's datagrams stay on the backend
/// its first one went to while that backend terminates (still serving: it lingers, and its
/// affinity entries go), as kube-proxy's conntrack keeps a UDP flow on its endpoint until
/// it stops serving.
#[test]
fn an_unconnected_udp_socket_of_an_affinity_service_keeps_its_lingering_backend() {
    let mut h = Harness::new("udpaff", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[], &[5353]);
    h.write_manifest(
        "dns-svc.yaml",
        &(service("dns", VIP, &[("dns", 53, "UDP")]) + "  sessionAffinity: ClientIP\n"),
    );
    const READY: &str = "{ready: true}";
    const TERMINATING: &str = "{ready: false, serving: true, terminating: true}";
    let pods = ["10.244.0.10", "10.244.0.11"];
    let endpoints = |conditions: [&str; 2]| {
        let list = [(pods[0], conditions[0]), (pods[1], conditions[1])];
        slice_with_conditions("dns-1", "dns", &[("dns", 5353, "UDP")], &list)
    };
    h.write_manifest("dns-eps.yaml", &endpoints([READY, READY]));
    h.start_agent();
    wait_for_udp_frontend(&mut h, VIP, &pods);

    let client = h.spawn_client("aff", &KEPT_SOCKET);
    client.wait_for_lines(40);
    let first = answers(&client.lines_now());
    assert_one_backend(0, "10.96.0.10:53", &first);
    let on_b = first.keys().all(|answer| answer.starts_with("pod-b"));
    let (kept, other) = if on_b { (1, 0) } else { (0, 1) };
    let mut conditions = [READY; 2];
    conditions[kept] = TERMINATING;
    h.write_manifest("dns-eps.yaml", &endpoints(conditions));
    wait_for_udp_frontend(&mut h, VIP, &[pods[other]]);
    let lines = client.lines_after(client.lines_so_far(), 100);
    assert_answered_through(&lines, lines.len(), "10.96.0.10:53");
    assert_eq!(
        answers(&lines).keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>()
    );
}

/// A UDP Service `name` on `vip`:53 with `pods`' port 5353 as endpoints.
fn udp_service(h: &Harness, name: &str, vip: &str, pods: &[&str]) {
    h.write_manifest(
        &format!("{name}-svc.yaml"),
        &service(name, vip, &[("dns", 53, "UDP")]),
    );
    let endpoints: Vec<(&str, bool)> = pods.iter().map(|p| (*p, true)).collect();
    h.write_manifest(
        &format!("{name}-eps.yaml"),
        &slice(
            &format!("{name}-1"),
            name,
            &[("dns", 5353, "UDP")],
            &endpoints,
        ),
    );
}

/// Waits until the UDP frontend `vip`:53 has exactly `pods`' port 5353.
fn wait_for_udp_frontend(h: &mut Harness, vip: &str, pods: &[&str]) {
    let backends: Vec<String> = pods.iter().map(|p| format!("{p}:5353")).collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    h.wait_for_frontend(&format!("{vip}:53"), "UDP", Some(&backends));
}

/// The answers of one kept socket that asked `targets` in turn, per target: every request
/// answered, each through the address it asked.
fn answers_per_target(
    lines: &[serde_json::Value],
    targets: &[&str],
) -> Vec<BTreeMap<String, usize>> {
    targets
        .iter()
        .enumerate()
        .map(|(i, target)| {
            let asked: Vec<serde_json::Value> = lines
                .iter()
                .skip(i)
                .step_by(targets.len())
                .cloned()
                .collect();
            for line in &asked {
                assert_eq!(
                    line["peer"], *target,
                    "recvfrom must show the Service asked"
                );
            }
            answers(&asked)
        })
        .collect()
}

/// `n` clients running `args` in the background, named `tag0`, `tag1`, ...
fn spawn_clients(h: &Harness, tag: &str, n: usize, args: &[&str]) -> Vec<BackgroundClient> {
    (0..n)
        .map(|i| h.spawn_client(&format!("{tag}{i}"), args))
        .collect()
}

/// Socket `socket`'s datagrams to `target` all went to one backend.
fn assert_one_backend(socket: usize, target: &str, counts: &BTreeMap<String, usize>) {
    assert_eq!(
        counts.len(),
        1,
        "socket {socket}: its datagrams to {target} went to more than one backend: {counts:?}"
    );
}

/// Two UDP Services of three pods each, two pods in common, programmed.
fn two_udp_services(tag: &str) -> (Harness, Vec<Proc>) {
    let mut h = Harness::new(tag, &["pod-a", "pod-b", "pod-c", "pod-d"]);
    let servers = h.serve(&[], &[5353]);
    let first = ["10.244.0.10", "10.244.0.11", "10.244.0.12"];
    let second = ["10.244.0.11", "10.244.0.12", "10.244.0.13"];
    udp_service(&h, "dns", VIP, &first);
    udp_service(&h, "dns2", VIP2, &second);
    h.start_agent();
    wait_for_udp_frontend(&mut h, VIP, &first);
    wait_for_udp_frontend(&mut h, VIP2, &second);
    (h, servers)
}

/// Four kept sockets asking both Services of `two_udp_services` in turn (`how`: extra
/// client flags), 300 requests each: every Service's datagrams went to one backend per
/// socket, and each answer came through the Service asked.
fn assert_a_backend_per_service(h: &Harness, tag: &str, how: &[&str]) {
    let targets = ["10.96.0.10:53", "10.96.0.11:53"];
    let joined = targets.join(",");
    let mut args = vec![
        "udp",
        joined.as_str(),
        "300",
        "--keep-socket",
        "--every-ms",
        "1",
    ];
    args.extend_from_slice(how);
    for (i, client) in spawn_clients(h, tag, 4, &args).into_iter().enumerate() {
        let lines = client.lines();
        assert_eq!(lines.len(), 300, "socket {i}");
        for (target, counts) in targets.iter().zip(answers_per_target(&lines, &targets)) {
            assert_one_backend(i, target, &counts);
        }
    }
}

/// kube-proxy's conntrack keeps each of a socket's UDP flows, one per Service, on its
/// endpoint. A socket that asks two Services in turn keeps one backend for each: the first
/// Service's pin is in the socket's slot, the second's in its storage.
#[test]
fn a_udp_socket_keeps_a_backend_for_each_service_it_asks() {
    let (h, _servers) = two_udp_services("udp2svc");
    assert_a_backend_per_service(&h, "two", &[]);
}

/// The same for a socket connected to each Service in turn (its source port stays, so
/// kube-proxy's conntrack flow for each Service does too): a connect to the other Service
/// takes the slot, and the pin it held moves to the socket's storage.
#[test]
fn a_udp_socket_connected_to_services_in_turn_keeps_a_backend_for_each() {
    let (h, _servers) = two_udp_services("udp2conn");
    assert_a_backend_per_service(&h, "conn", &["--connected", "--reconnect"]);
}

/// Sockets whose slot in the socket slot table another live socket holds (one cookie a
/// table size apart) keep their backend too: their pins are in their own storage, their
/// reverse entries in the socket rev-NAT LRU.
#[test]
fn udp_sockets_whose_slot_another_holds_keep_their_backend() {
    let mut h = Harness::new("udptaken", &["pod-a", "pod-b", "pod-c"]);
    let _servers = h.serve(&[], &[5353]);
    let pods = ["10.244.0.10", "10.244.0.11", "10.244.0.12"];
    udp_service(&h, "dns", VIP, &pods);
    h.start_agent();
    wait_for_udp_frontend(&mut h, VIP, &pods);
    hold_every_slot(&h);

    let args = [
        "udp",
        "10.96.0.10:53",
        "400",
        "--keep-socket",
        "--every-ms",
        "5",
    ];
    let clients = spawn_clients(&h, "taken", 4, &args);
    for client in &clients {
        client.wait_for_lines(1);
    }
    // One entry per socket and backend it sent to: at least one each.
    let in_lru = h.map_entries("ekp_sk_rnat_v1");
    assert!(
        in_lru >= 4,
        "every socket's reverse entry is in the LRU, their slots taken: {in_lru} entries"
    );
    for (i, client) in clients.into_iter().enumerate() {
        let lines = client.lines();
        assert_answered_through(&lines, 400, "10.96.0.10:53");
        assert_one_backend(i, "10.96.0.10:53", &answers(&lines));
    }
}

/// The same pod behind two Services: the socket's slot follows the Service it asked last,
/// so that recvfrom shows the right one, and the other Service's pin moves to the socket's
/// storage instead of being lost. The first Service then gains pods (its pin's backend
/// moves to another slot): its datagrams stay on their pod.
#[test]
fn a_pin_the_slot_gives_up_to_another_service_is_kept() {
    let mut h = Harness::new("udpdisp", &["pod-a", "pod-b", "pod-c"]);
    let _servers = h.serve(&[], &[5353]);
    udp_service(&h, "dns", VIP, &["10.244.0.11"]);
    udp_service(&h, "dns2", VIP2, &["10.244.0.11"]);
    h.start_agent();
    wait_for_udp_frontend(&mut h, VIP, &["10.244.0.11"]);
    wait_for_udp_frontend(&mut h, VIP2, &["10.244.0.11"]);

    let targets = ["10.96.0.10:53", "10.96.0.11:53"];
    let joined = targets.join(",");
    let args = [
        "udp",
        joined.as_str(),
        "1000000",
        "--keep-socket",
        "--every-ms",
        "5",
    ];
    let clients = spawn_clients(&h, "disp", 2, &args);
    for client in &clients {
        client.wait_for_lines(40);
    }
    let grown = ["10.244.0.10", "10.244.0.11", "10.244.0.12"];
    udp_service(&h, "dns", VIP, &grown);
    wait_for_udp_frontend(&mut h, VIP, &grown);
    let after_change: Vec<usize> = clients.iter().map(|c| c.lines_so_far()).collect();
    for (i, client) in clients.iter().enumerate() {
        let lines = client.lines_after(after_change[i], 100);
        let counts = answers_per_target(&lines, &targets);
        assert_eq!(
            counts[0].keys().collect::<Vec<_>>(),
            ["pod-b"],
            "socket {i}: its datagrams to {VIP} left their pod: {:?}",
            counts[0]
        );
    }
}

/// A connected socket's translation lives in its slot while the socket is open, and the
/// slot is free again after the close; when the slot is held by another socket, the
/// socket rev-NAT LRU takes the translation instead, and the application sees the same.
#[test]
fn connected_sockets_use_their_slot_or_else_the_lru() {
    let (h, _servers) = web_and_dns_running("slots");
    const SLOTS: &str = "ekp_sk_slot_v1";
    const LRU: &str = "ekp_sk_rnat_v1";

    // One connected socket, kept open across requests (recvfrom's source each time).
    let kept = [
        "udp",
        "10.96.0.10:53",
        "3",
        "--connected",
        "--keep-socket",
        "--every-ms",
        "400",
    ];
    let client = h.spawn_client("slot", &kept);
    client.wait_for_lines(1);
    assert_eq!(
        (h.map_entries(SLOTS), h.map_entries(LRU)),
        (1, 0),
        "an open connected socket: its slot, no LRU entry"
    );
    let lines = client.lines();
    assert_answered_through(&lines, 3, "10.96.0.10:53");
    assert_eq!(h.map_entries(SLOTS), 0, "the slot is freed at close");

    // Every slot held by a socket that is not this client's.
    let held = hold_every_slot(&h);
    assert_eq!(h.map_entries(SLOTS), u64::from(held));
    let client = h.spawn_client("lru", &kept);
    client.wait_for_lines(1);
    assert_eq!(
        h.map_entries(LRU),
        1,
        "a taken slot sends the socket to the LRU"
    );
    let lines = client.lines();
    assert_answered_through(&lines, 3, "10.96.0.10:53");
    let lines = h.client(&["tcp", "10.96.0.10:80", "20"]);
    assert_answered_through(&lines, 20, "10.96.0.10:80");
    assert_eq!(
        h.map_entries(LRU),
        0,
        "LRU entries are deleted at close too"
    );
    assert_eq!(
        h.map_entries(SLOTS),
        u64::from(held),
        "others' slots are left alone"
    );
}

/// An agent that adopts the pins of a version whose programs did not mark the sockets that
/// have translations in the socket rev-NAT LRU looks every socket up there until its next
/// start. Simulated: the sockets' storage is unpinned before the restart, so the new
/// programs get an empty one, while a connected socket (whose slot another socket holds)
/// keeps its translation in the LRU; it must still see the Service as its peer.
#[test]
fn a_connected_socket_keeps_its_peer_across_an_upgrade_that_finds_unmarked_lru_entries() {
    let (mut h, _servers, client, _state) = unmarked_lru_entry_left("unmarked");
    h.start_agent();
    h.wait_for_log("from an older version");
    h.wait_for_ready_starts(2);
    let lines = client.lines_after(client.lines_so_far(), 20);
    assert_answered_through(&lines, lines.len(), "10.96.0.10:53");
    // The socket closes with its process.
    drop(client);
    assert_eq!(
        h.map_entries("ekp_sk_rnat_v1"),
        0,
        "the closed socket's LRU entry is deleted, unmarked as it is"
    );
}

/// The same when the first start after the upgrade stops before it attaches its programs
/// (here: stopped while it waits for an API server that never answers, its programs
/// loaded): the sockets' storage it created is not pinned, so the start after it still
/// finds the LRU's entries unmarked, and the socket keeps its peer.
#[test]
fn an_upgrade_whose_first_start_stops_before_attaching_still_finds_unmarked_lru_entries() {
    const UNMARKED: &str = "from an older version";
    let (mut h, _servers, client, state) = unmarked_lru_entry_left("unmarked-stop");
    // Nothing listens on port 1 of the loopback: the lists never come.
    let kubeconfig = h.manifests.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n\
         users: [{name: u, user: {}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n\
         current-context: x\n",
    )
    .expect("writing the kubeconfig");
    h.start_agent_with(&["--kubeconfig".as_ref(), kubeconfig.as_os_str()]);
    // The first start's line, then this one's.
    h.wait_for_log_times("programs loaded and verified", 2);
    h.stop_agent();
    assert_eq!(
        h.agent_log().matches("adopted pinned link").count(),
        0,
        "the start meant to stop took over the pinned links:\n{}",
        h.agent_log()
    );
    assert!(
        !state.exists(),
        "a start that attached nothing pinned the sockets' storage"
    );

    h.start_agent();
    h.wait_for_ready_starts(2);
    assert_eq!(
        h.agent_log().matches(UNMARKED).count(),
        2,
        "the stopped start and the one after it both look every socket up:\n{}",
        h.agent_log()
    );
    assert!(
        state.exists(),
        "a start that attached its programs pins the storage"
    );
    let lines = client.lines_after(client.lines_so_far(), 20);
    assert_answered_through(&lines, lines.len(), "10.96.0.10:53");
}

/// A connected UDP socket (whose slot another socket holds) with its translation in the
/// socket rev-NAT LRU, then the agent stopped and the sockets' storage unpinned: what an
/// agent of a version before the storage leaves. Returns the socket's client and the
/// storage's pin path.
fn unmarked_lru_entry_left(
    tag: &str,
) -> (Harness, Vec<Proc>, BackgroundClient, std::path::PathBuf) {
    let (mut h, servers) = web_and_dns_running(tag);
    hold_every_slot(&h);
    let args = [
        "udp",
        "10.96.0.10:53",
        "1000000",
        "--connected",
        "--keep-socket",
        "--every-ms",
        "100",
    ];
    let client = h.spawn_client("kept", &args);
    client.wait_for_lines(3);
    assert_eq!(
        h.map_entries("ekp_sk_rnat_v1"),
        1,
        "the translation is in the LRU"
    );
    h.stop_agent();
    let state = h.pin_path.join("maps/ekp_sk_state_v1");
    std::fs::remove_file(&state).expect("unpinning the sockets' storage");
    (h, servers, client, state)
}

/// All `n` requests were answered, and the application saw `frontend` as their peer.
fn assert_answered_through(lines: &[serde_json::Value], n: usize, frontend: &str) {
    assert_eq!(answers(lines).values().sum::<usize>(), n, "{lines:?}");
    assert!(lines.iter().all(|l| l["peer"] == frontend), "{lines:?}");
}

/// Writes every slot of the test's socket slot table as held by a cookie no socket has.
fn hold_every_slot(h: &Harness) -> u32 {
    use aya::maps::{Array, Map, MapData};
    use proxy_common::{SOCK_SLOTS, SockSlot};

    let pin = h.pin_path.join("maps/ekp_sk_slot_v1");
    let data = MapData::from_pin(&pin).expect("opening the pinned slot table");
    let mut slots: Array<MapData, SockSlot> =
        Array::try_from(Map::Array(data)).expect("an array of slots");
    let foreign = SockSlot {
        // Cookies count up from 1; this one is far beyond any the kernel hands out.
        cookie: 1 << 62,
        ..SockSlot::default()
    };
    for index in 0..SOCK_SLOTS {
        slots.set(index, foreign, 0).expect("writing a slot");
    }
    SOCK_SLOTS
}

#[test]
fn c18_no_endpoints_means_econnrefused_for_tcp_and_udp() {
    let mut h = Harness::new("refuse", &["pod-a"]);
    h.write_manifest(
        "svc.yaml",
        &service("empty", VIP, &[("http", 80, "TCP"), ("dns", 53, "UDP")]),
    );
    // Only a terminating, non-serving endpoint: nothing usable.
    h.write_manifest(
        "eps.yaml",
        &slice(
            "empty-1",
            "empty",
            &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            &[("10.244.0.10", false)],
        ),
    );
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&[]));
    h.wait_for_frontend("10.96.0.10:53", "UDP", Some(&[]));

    for args in [
        &["tcp", "10.96.0.10:80", "5"][..],
        &["udp", "10.96.0.10:53", "5"][..],
        &["udp", "10.96.0.10:53", "5", "--connected"][..],
    ] {
        for line in h.client(args) {
            assert_eq!(line["ok"], false, "{args:?}: {line}");
            assert_eq!(
                line["errno"], ECONNREFUSED,
                "{args:?} must be refused: {line}"
            );
        }
    }
}

/// kube-proxy's nftables mode rejects traffic to a ClusterIP that no port of its Service
/// takes (its `cluster-ips` set), where it would otherwise leave the node for an address
/// nothing serves: refused at once here too, TCP and UDP, while the Service is served, and
/// the address nobody's again once it is gone.
#[test]
fn a_cluster_ips_undefined_ports_are_refused_while_its_service_is_served() {
    let mut h = Harness::new("undef", &["pod-a"]);
    let _servers = h.serve(&[8080], &[]);
    web(&h, &[("10.244.0.10", true)]);
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.10:8080"]));
    h.wait_for_map_entries(proxy_common::MAP_CLUSTER_IPS, 1);

    let served = answers(&h.client(&["tcp", "10.96.0.10:80", "3"]));
    assert_eq!(served.keys().collect::<Vec<_>>(), ["pod-a"], "{served:?}");
    for args in [
        &["tcp", "10.96.0.10:81", "3"][..],
        // The Service's port for another protocol (C05).
        &["udp", "10.96.0.10:80", "3"][..],
        &["udp", "10.96.0.10:80", "3", "--connected"][..],
    ] {
        let lines = h.client(args);
        assert_eq!(lines.len(), 3, "{args:?}: {lines:?}");
        for line in lines {
            assert_eq!(line["ok"], false, "{args:?}: {line}");
            assert_eq!(line["errno"], ECONNREFUSED, "{args:?}: {line}");
        }
    }
    // Another address is none of the programs' business.
    let lines = h.client(&["tcp", "10.96.0.11:81", "1"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["errno"], ENETUNREACH, "{}", lines[0]);

    h.remove_manifest("web-svc.yaml");
    h.wait_for_frontend("10.96.0.10:80", "TCP", None);
    let lines = h.client(&["tcp", "10.96.0.10:81", "3"]);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in lines {
        assert_eq!(line["errno"], ENETUNREACH, "{line}");
    }
    assert_eq!(h.map_entries(proxy_common::MAP_CLUSTER_IPS), 0);
}

#[test]
fn c04_tcp_and_udp_on_one_port_reach_their_own_backends() {
    let mut h = Harness::new("proto", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[5353], &[5353]);
    h.write_manifest(
        "svc.yaml",
        &service("dns", VIP, &[("dns-tcp", 53, "TCP"), ("dns", 53, "UDP")]),
    );
    // TCP endpoints are pod-a only, UDP endpoints pod-b only.
    h.write_manifest(
        "eps-tcp.yaml",
        &slice(
            "dns-tcp",
            "dns",
            &[("dns-tcp", 5353, "TCP")],
            &[("10.244.0.10", true)],
        ),
    );
    h.write_manifest(
        "eps-udp.yaml",
        &slice(
            "dns-udp",
            "dns",
            &[("dns", 5353, "UDP")],
            &[("10.244.0.11", true)],
        ),
    );
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:53", "TCP", Some(&["10.244.0.10:5353"]));
    h.wait_for_frontend("10.96.0.10:53", "UDP", Some(&["10.244.0.11:5353"]));

    let tcp = answers(&h.client(&["tcp", "10.96.0.10:53", "20"]));
    assert_eq!(tcp.keys().collect::<Vec<_>>(), ["pod-a"], "{tcp:?}");
    let udp = answers(&h.client(&["udp", "10.96.0.10:53", "20"]));
    assert_eq!(udp.keys().collect::<Vec<_>>(), ["pod-b"], "{udp:?}");
}

#[test]
fn c26_endpoint_changes_and_service_deletion_follow_the_manifests() {
    let mut h = Harness::new("change", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    web(&h, &[("10.244.0.10", true), ("10.244.0.11", true)]);
    h.start_agent();
    h.wait_for_frontend(
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );

    // pod-b removed from the slice: no new connection reaches it.
    web(&h, &[("10.244.0.10", true)]);
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.10:8080"]));
    let only_a = answers(&h.client(&["tcp", "10.96.0.10:80", "50"]));
    assert_eq!(only_a.keys().collect::<Vec<_>>(), ["pod-a"], "{only_a:?}");

    // Added back: both again.
    web(&h, &[("10.244.0.10", true), ("10.244.0.11", true)]);
    h.wait_for_frontend(
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    let both = answers(&h.client(&["tcp", "10.96.0.10:80", "100"]));
    assert_eq!(both.len(), 2, "{both:?}");

    // Service deleted: the address is no longer translated and dead-ends in the client's
    // namespace (no route), exactly like an address no Service ever had.
    h.remove_manifest("web-svc.yaml");
    h.wait_for_frontend("10.96.0.10:80", "TCP", None);
    for line in h.client(&["tcp", "10.96.0.10:80", "3"]) {
        assert_eq!(line["errno"], ENETUNREACH, "{line}");
    }
    // Backends of the deleted Service are gone from the maps too.
    assert_eq!(h.list().expect("list"), Vec::<serde_json::Value>::new());
}

#[test]
fn a_second_run_adopts_the_pins_and_keeps_serving() {
    let mut h = Harness::new("adopt", &["pod-a"]);
    let _servers = h.serve(&[8080], &[]);
    web(&h, &[("10.244.0.10", true)]);
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.10:8080"]));
    let before = h.list().expect("list");

    // Stopped: pinned programs and maps keep translating.
    h.stop_agent();
    assert_eq!(
        answers(&h.client(&["tcp", "10.96.0.10:80", "10"])).get("pod-a"),
        Some(&10)
    );

    // Restarted: the same ids (rev-NAT, backend) are adopted, not re-created. The pinned
    // maps list `web` before the new run has done anything: the check waits for its start,
    // then for a Service added after it, so that its first sync is behind.
    h.start_agent();
    h.wait_for_ready_starts(2);
    h.write_manifest(
        "marker.yaml",
        &service("marker", "10.96.0.12", &[("http", 80, "TCP")]),
    );
    h.wait_for_frontend("10.96.0.12:80", "TCP", Some(&[]));
    let web_entries = |list: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        list.into_iter()
            .filter(|f| f["frontend"] != "10.96.0.12:80")
            .collect()
    };
    assert_eq!(web_entries(h.list().expect("list")), web_entries(before));
    assert_eq!(
        answers(&h.client(&["tcp", "10.96.0.10:80", "10"])).get("pod-a"),
        Some(&10)
    );
}

#[test]
fn c34_bad_manifests_are_named_and_the_good_service_keeps_working() {
    let mut h = Harness::new("badinput", &["pod-a"]);
    let _servers = h.serve(&[8080], &[]);
    web(&h, &[("10.244.0.10", true)]);
    h.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n",
    );
    h.write_manifest(
        "bad-ip.yaml",
        &service("bad-ip", "10.96.0.300", &[("http", 80, "TCP")]),
    );
    h.write_manifest(
        "bad-port.yaml",
        &service("bad-port", "10.96.0.11", &[("http", 70000, "TCP")]),
    );
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.10:8080"]));
    h.wait_for_log("broken.yaml document 1");
    h.wait_for_log("Service default/bad-ip");
    h.wait_for_log("bad-port");

    assert_eq!(
        answers(&h.client(&["tcp", "10.96.0.10:80", "10"])).get("pod-a"),
        Some(&10)
    );
    let listed: Vec<String> = h
        .list()
        .expect("list")
        .iter()
        .map(|f| f["frontend"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        listed,
        ["10.96.0.10:80"],
        "only the good Service is programmed"
    );
    // Each problem is reported once, not at every sync: a later sync (a Service added)
    // says nothing of it again.
    h.write_manifest(
        "later.yaml",
        &service("later", "10.96.0.12", &[("http", 80, "TCP")]),
    );
    h.wait_for_frontend("10.96.0.12:80", "TCP", Some(&[]));
    let log = h.agent_log();
    assert_eq!(log.matches("Service default/bad-ip").count(), 1, "{log}");
}

#[test]
fn cleanup_detaches_the_programs_and_removes_the_pins() {
    let mut h = Harness::new("cleanup", &["pod-a"]);
    let _servers = h.serve(&[8080], &[]);
    web(&h, &[("10.244.0.10", true)]);
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.10:8080"]));
    h.stop_agent();
    assert_eq!(
        answers(&h.client(&["tcp", "10.96.0.10:80", "3"])).get("pod-a"),
        Some(&3)
    );

    let out = std::process::Command::new(common::AGENT)
        .arg("--pin-path")
        .arg(&h.pin_path)
        .arg("cleanup")
        .output()
        .expect("running cleanup");
    assert!(out.status.success(), "cleanup failed: {out:?}");
    assert!(
        !h.pin_path.exists(),
        "{} still exists",
        h.pin_path.display()
    );
    // No program translates any more: the Service address dead-ends in the namespace. The
    // kernel releases an unpinned link in deferred work, so the detach is waited for
    // (bounded), then must hold.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.client(&["tcp", "10.96.0.10:80", "1"])[0]["errno"] != ENETUNREACH {
        assert!(
            std::time::Instant::now() < deadline,
            "the programs still translate after cleanup"
        );
    }
    for line in h.client(&["tcp", "10.96.0.10:80", "3"]) {
        assert_eq!(line["errno"], ENETUNREACH, "{line}");
    }
}
