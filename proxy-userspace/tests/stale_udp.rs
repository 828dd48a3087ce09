//! Privileged: UDP clients that keep one socket while their backend is replaced (C27).

mod common;

use common::{BackgroundClient, Harness, service, slice, slice_with_conditions};
use serde_json::Value;

/// What a client sees of its destroyed socket: ECONNABORTED if it was waiting in recv,
/// EDESTADDRREQ from its next send (the socket is disconnected).
const ECONNABORTED: i64 = 103;
const EDESTADDRREQ: i64 = 89;
/// What a new socket gets from a `Local` policy without an endpoint on this node.
const EHOSTUNREACH: i64 = 113;

/// The agent container's capabilities with the chart's default values
/// (`securityContext.capabilities`, asserted by the chart checks).
const CHART_CAPABILITIES: [&str; 4] = ["bpf", "net_admin", "perfmon", "sys_admin"];

fn dns_on(h: &Harness, pod: &str) {
    h.write_manifest(
        "eps.yaml",
        &slice("dns-1", "dns", &[("dns", 5353, "UDP")], &[(pod, true)]),
    );
}

/// Answers after the first answer from `to`, and the errors on the way.
fn after_switch<'a>(lines: &'a [Value], to: &str) -> (Vec<&'a Value>, Vec<&'a Value>) {
    let first = lines
        .iter()
        .position(|l| l["answer"] == to)
        .unwrap_or_else(|| panic!("never answered by {to}: {lines:?}"));
    let errors = lines.iter().filter(|l| l["ok"] != true).collect();
    (lines[first..].iter().collect(), errors)
}

/// The DNS Service's address as IPv4 clients use it, and as `AF_INET6` (dual-stack) ones do.
const DNS: &str = "10.96.0.10:53";
const DNS_MAPPED: &str = "[::ffff:10.96.0.10]:53";

/// Two resolvers with one socket each, connected and unconnected (sendto), ask the DNS
/// Service at `target` (`DNS` or `DNS_MAPPED`) every 5 ms while its only endpoint is
/// replaced: pod-a by pod-b. pod-a keeps running (as a terminating pod does), so a socket
/// left pointing at it keeps getting answers from it. Returns each client's lines, once it
/// has made 100 requests on pod-b (100 after the change for a connected socket that is not
/// expected to move: `connected_moves` false).
fn replace_the_backend(
    h: &mut Harness,
    start_agent: impl FnOnce(&mut Harness),
    target: &'static str,
    connected_moves: bool,
) -> [Vec<Value>; 2] {
    h.write_manifest(
        "svc.yaml",
        &service("dns", "10.96.0.10", &[("dns", 53, "UDP")]),
    );
    dns_on(h, "10.244.0.10");
    start_agent(h);
    h.wait_for_frontend("10.96.0.10:53", "UDP", Some(&["10.244.0.10:5353"]));

    let args = |extra: &'static str| {
        // For as long as the test takes (stopped when it ends).
        let mut a = vec!["udp", target, "1000000", "--keep-socket", "--every-ms", "5"];
        if !extra.is_empty() {
            a.push(extra);
        }
        a
    };
    let connected = h.spawn_client("connected", &args("--connected"));
    let unconnected = h.spawn_client("unconnected", &args(""));
    connected.wait_for_lines(50);
    unconnected.wait_for_lines(50);

    dns_on(h, "10.244.0.11");
    h.wait_for_frontend("10.96.0.10:53", "UDP", Some(&["10.244.0.11:5353"]));
    let connected = if connected_moves {
        settled_on(&connected, "pod-b")
    } else {
        connected.lines_after(connected.lines_so_far(), 100)
    };
    [connected, settled_on(&unconnected, "pod-b")]
}

/// Waits (bounded) until `client` has made 100 requests since its first answer from `to`,
/// enough to judge where it went since; returns its requests so far.
fn settled_on(client: &BackgroundClient, to: &str) -> Vec<Value> {
    let deadline = std::time::Instant::now() + common::CONDITION_LIMIT;
    loop {
        let lines = client.lines_now();
        let first = lines.iter().position(|l| l["answer"] == to);
        if first.is_some_and(|first| lines.len() - first >= 100) {
            return lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no 100 requests after a first answer from {to}: {lines:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Both clients end on pod-b and never go back; the connected one's socket was destroyed
/// once; the peer stays the Service address they asked (`target`) throughout.
fn assert_both_moved(h: &Harness, [connected, unconnected]: &[Vec<Value>; 2], target: &str) {
    for (what, lines) in [("connected", connected), ("unconnected", unconnected)] {
        assert_eq!(lines[0]["answer"], "pod-a", "{what} starts on pod-a");
        let (after, errors) = after_switch(lines, "pod-b");
        assert!(
            after
                .iter()
                .all(|l| l["ok"] != true || l["answer"] == "pod-b"),
            "{what}: traffic went back to the removed backend: {after:?}"
        );
        assert!(
            lines
                .iter()
                .filter(|l| l["ok"] == true)
                .all(|l| l["peer"] == target)
        );
        match what {
            // Its socket was destroyed once and replaced by the client.
            "connected" => {
                assert_eq!(errors.len(), 1, "{errors:?}");
                let errno = errors[0]["errno"].as_i64();
                assert!(
                    errno == Some(ECONNABORTED) || errno == Some(EDESTADDRREQ),
                    "{errors:?}"
                );
            }
            // Its next datagram finds its backend gone and chooses again: nothing to
            // destroy, no error.
            _ => assert!(errors.is_empty(), "{errors:?}"),
        }
    }
    assert!(
        h.agent_log()
            .contains("connected UDP sockets of departed backends closed")
    );
}

#[test]
fn c27_a_kept_udp_socket_moves_to_the_live_backend_when_its_backend_is_replaced() {
    let mut h = Harness::new("staleudp", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[], &[5353]);
    let lines = replace_the_backend(&mut h, Harness::start_agent, DNS, true);
    assert_both_moved(&h, &lines, DNS);
    // The destroyed socket was disconnected (no peer) when the client closed it; its slot,
    // found by cookie alone, was freed all the same.
    assert_eq!(
        h.map_entries("ekp_sk_slot_v1"),
        0,
        "slots held after the clients closed"
    );
}

/// The pods' sockets are in the pods' network namespaces, which the agent enters
/// (`setns`): the chart's capabilities must allow it.
#[test]
fn c27_works_with_the_charts_capabilities() {
    let mut h = Harness::new("staleudpcaps", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[], &[5353]);
    let lines = replace_the_backend(
        &mut h,
        |h| h.start_agent_with_capabilities(&CHART_CAPABILITIES),
        DNS,
        true,
    );
    assert_both_moved(&h, &lines, DNS);
}

/// `AF_INET6` sockets asking the IPv4-mapped ClusterIP (Java's and .NET's dual-stack
/// sockets; `connect6`): sock_diag lists them under `AF_INET6` only, and the connected one
/// is closed all the same.
#[test]
fn c27_a_dual_stack_socket_on_the_mapped_cluster_ip_moves_too() {
    let mut h = Harness::new("staleudp6", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[], &[5353]);
    let lines = replace_the_backend(&mut h, Harness::start_agent, DNS_MAPPED, true);
    assert_both_moved(&h, &lines, DNS_MAPPED);
}

/// Without `CAP_SYS_ADMIN` the agent cannot enter the namespaces: it says so, and the
/// connected socket stays on the removed backend (the unconnected one still moves).
#[test]
fn c27_without_sys_admin_the_agent_warns_that_it_cannot_close_the_sockets() {
    let mut h = Harness::new("staleudpnoadm", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[], &[5353]);
    let caps: Vec<&str> = CHART_CAPABILITIES
        .into_iter()
        .filter(|c| *c != "sys_admin")
        .collect();
    let [connected, unconnected] = replace_the_backend(
        &mut h,
        |h| h.start_agent_with_capabilities(&caps),
        DNS,
        false,
    );
    h.wait_for_log("setns needs CAP_SYS_ADMIN");
    let last = connected.last().expect("the connected client answered");
    assert_eq!(last["answer"], "pod-a", "{connected:?}");
    assert!(connected.iter().all(|l| l["ok"] == true), "{connected:?}");
    let (after, _) = after_switch(&unconnected, "pod-b");
    assert!(after.iter().all(|l| l["answer"] == "pod-b"), "{after:?}");
}

/// The DNS Service on pod-a, an agent without `CAP_SYS_ADMIN` (it cannot close sockets in
/// other namespaces), and a resolver asking the Service every 5 ms on one connected socket.
fn connected_client_without_sys_admin(h: &mut Harness, name: &str) -> BackgroundClient {
    h.write_manifest(
        "svc.yaml",
        &service("dns", "10.96.0.10", &[("dns", 53, "UDP")]),
    );
    dns_on(h, "10.244.0.10");
    let caps: Vec<&str> = CHART_CAPABILITIES
        .into_iter()
        .filter(|c| *c != "sys_admin")
        .collect();
    h.start_agent_with_capabilities(&caps);
    h.wait_for_frontend("10.96.0.10:53", "UDP", Some(&["10.244.0.10:5353"]));
    let args = [
        "udp",
        DNS,
        "1000000",
        "--connected",
        "--keep-socket",
        "--every-ms",
        "5",
    ];
    h.spawn_client(name, &args)
}

/// An agent that could not close a connected socket whose backend left (here: no
/// `CAP_SYS_ADMIN`; as well: killed before its worker got there) leaves it sending to the
/// removed backend; the maps it pinned no longer say that backend left. The next agent's
/// first sync sweeps every such socket, and the client moves to the live backend.
#[test]
fn a_restarted_agent_closes_the_sockets_its_predecessor_could_not() {
    let mut h = Harness::new("staleudpsweep", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[], &[5353]);
    let connected = connected_client_without_sys_admin(&mut h, "connected");
    connected.wait_for_lines(20);
    dns_on(&h, "10.244.0.11");
    h.wait_for_frontend("10.96.0.10:53", "UDP", Some(&["10.244.0.11:5353"]));
    h.wait_for_log("setns needs CAP_SYS_ADMIN");
    let stuck = connected.lines_after(connected.lines_so_far(), 20);
    assert!(
        stuck.iter().all(|l| l["answer"] == "pod-a"),
        "the first agent could not close the socket: {stuck:?}"
    );

    h.stop_agent();
    h.start_agent();
    let lines = settled_on(&connected, "pod-b");
    let (after, errors) = after_switch(&lines, "pod-b");
    assert!(
        after
            .iter()
            .all(|l| l["ok"] != true || l["answer"] == "pod-b"),
        "back to the removed backend: {after:?}"
    );
    assert_eq!(errors.len(), 1, "destroyed once: {errors:?}");
    let errno = errors[0]["errno"].as_i64();
    assert!(
        errno == Some(ECONNABORTED) || errno == Some(EDESTADDRREQ),
        "{errors:?}"
    );
    h.wait_for_log("swept the connected UDP sockets");
}

/// A connected socket of a Service that is deleted keeps its translation in its slot until
/// it closes: the agent's closing of such sockets finds them by it. Its answers are no
/// longer relabelled as the deleted Service's (they show the backend). Without
/// `CAP_SYS_ADMIN` the agent cannot close the socket, so it lives on to show both.
#[test]
fn a_deleted_services_translation_stays_in_the_slot_until_the_socket_closes() {
    let mut h = Harness::new("staleudpdel", &["pod-a"]);
    let _servers = h.serve(&[], &[5353]);
    let client = connected_client_without_sys_admin(&mut h, "deleted");
    client.wait_for_lines(5);
    assert_eq!(h.map_entries("ekp_sk_slot_v1"), 1, "the socket's slot");

    h.remove_manifest("svc.yaml");
    h.wait_for_frontend("10.96.0.10:53", "UDP", None);
    let lines = client.lines_after(client.lines_so_far(), 20);
    let last = lines.last().expect("answers");
    assert_eq!(last["answer"], "pod-a", "{last}");
    assert_eq!(last["peer"], "10.244.0.10:5353", "not relabelled: {last}");
    assert_eq!(
        h.map_entries("ekp_sk_slot_v1"),
        1,
        "the slot is kept while the socket lives"
    );
    drop(client);
    assert_eq!(h.map_entries("ekp_sk_slot_v1"), 0, "freed at the close");
}

/// Two resolvers asking the DNS Service every 5 ms, each on one kept socket, connected and
/// unconnected, once both have answers.
fn kept_sockets(h: &Harness) -> [BackgroundClient; 2] {
    let kept = |connected: bool| {
        let mut args = vec!["udp", "10.96.0.10:53", "100000", "--keep-socket"];
        args.extend(["--every-ms", "5"]);
        if connected {
            args.push("--connected");
        }
        args
    };
    let clients = [
        h.spawn_client("connected", &kept(true)),
        h.spawn_client("unconnected", &kept(false)),
    ];
    for client in &clients {
        client.wait_for_lines(50);
    }
    clients
}

/// Kept UDP sockets, connected and not, stay on their backend while it drains (serving and
/// terminating, two other pods ready), and move once it stops serving: kube-proxy deletes a
/// UDP endpoint's conntrack entries only then. The connected socket is closed then, once;
/// the other one's next datagram chooses anew. New sockets go to the ready pods meanwhile.
/// The draining pod moves from slot 1 to slot 3, past the ready ones: the sockets' pin finds
/// it among the lingering slots.
#[test]
fn c27_a_draining_backend_keeps_its_sockets_until_it_stops_serving() {
    let mut h = Harness::new("staleudpdrain", &["pod-a", "pod-b", "pod-c"]);
    let _servers = h.serve(&[], &[5353]);
    h.write_manifest(
        "svc.yaml",
        &service("dns", "10.96.0.10", &[("dns", 53, "UDP")]),
    );
    dns_on(&h, "10.244.0.10");
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:53", "UDP", Some(&["10.244.0.10:5353"]));
    let clients = kept_sockets(&h);
    let pod_a_as = |conditions: &str| {
        let ports = [("dns", 5353, "UDP")];
        let endpoints = [
            ("10.244.0.10", conditions),
            ("10.244.0.11", "{ready: true}"),
            ("10.244.0.12", "{ready: true}"),
        ];
        slice_with_conditions("dns-1", "dns", &ports, &endpoints)
    };

    h.write_manifest(
        "eps.yaml",
        &pod_a_as("{ready: false, serving: true, terminating: true}"),
    );
    h.wait_for_frontend(
        "10.96.0.10:53",
        "UDP",
        Some(&["10.244.0.11:5353", "10.244.0.12:5353"]),
    );
    let from = clients.each_ref().map(|c| c.lines_so_far());
    let fresh = h.client(&["udp", "10.96.0.10:53", "20"]);
    assert!(
        fresh
            .iter()
            .all(|l| l["answer"] == "pod-b" || l["answer"] == "pod-c"),
        "{fresh:?}"
    );
    for (client, from) in clients.iter().zip(from) {
        client.wait_for_lines(from + 100);
        let draining = client.lines_now().split_off(from);
        assert!(
            draining.iter().all(|l| l["answer"] == "pod-a"),
            "a socket left its draining backend: {draining:?}"
        );
    }
    let closing = "connected UDP sockets of departed backends closed";
    assert!(!h.agent_log().contains(closing), "{}", h.agent_log());

    h.write_manifest(
        "eps.yaml",
        &pod_a_as("{ready: false, serving: false, terminating: true}"),
    );
    h.wait_for_log(closing);
    // Where each client's lines left pod-a: after its last answer from there.
    let moved_at = |lines: &[Value]| {
        lines
            .iter()
            .rposition(|l| l["answer"] == "pod-a")
            .map_or(0, |i| i + 1)
    };
    for (i, client) in clients.iter().enumerate() {
        // 100 answers after the move, counted from there (an answer from pod-a may still
        // have been on its way when the agent logged the close), and the close's error.
        client.wait_for_lines(moved_at(&client.lines_now()) + 110);
        let lines = client.lines_now();
        let moved = moved_at(&lines);
        let (after, errors): (Vec<&Value>, Vec<&Value>) =
            lines[moved..].iter().partition(|l| l["ok"] == true);
        assert!(
            after.len() >= 100
                && after
                    .iter()
                    .all(|l| l["answer"] == "pod-b" || l["answer"] == "pod-c"),
            "{after:?}"
        );
        // The connected socket was closed once, when its backend stopped serving; the
        // unconnected one just sent elsewhere.
        assert_eq!(errors.len(), 1 - i, "{lines:?}");
        assert!(lines[..moved].iter().all(|l| l["ok"] == true), "{lines:?}");
    }
}

/// A traffic policy change leaves existing flows alone, as kube-proxy's conntrack cleanup
/// does not look at policies and its DROP sees new flows only: with `internalTrafficPolicy:
/// Local` and no endpoint on this node, a new socket's datagram fails (EHOSTUNREACH), and
/// the kept sockets, connected and not, go on with their backend, which lingers.
#[test]
fn a_policy_change_leaves_kept_udp_sockets_on_their_backend() {
    let mut h = Harness::new("staleudppolicy", &["pod-a"]);
    let _servers = h.serve(&[], &[5353]);
    let dns = service("dns", "10.96.0.10", &[("dns", 53, "UDP")]);
    h.write_manifest("svc.yaml", &dns);
    dns_on(&h, "10.244.0.10");
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:53", "UDP", Some(&["10.244.0.10:5353"]));
    let clients = kept_sockets(&h);

    // pod-a has no nodeName: it is not on this node.
    h.write_manifest("svc.yaml", &(dns + "  internalTrafficPolicy: Local\n"));
    h.wait_for_frontend("10.96.0.10:53", "UDP", Some(&[]));
    let from = clients.each_ref().map(|c| c.lines_so_far());
    for line in h.client(&["udp", "10.96.0.10:53", "3"]) {
        assert_eq!(line["errno"], EHOSTUNREACH, "{line}");
    }
    for (client, from) in clients.iter().zip(from) {
        client.wait_for_lines(from + 100);
        let lines = client.lines_now();
        assert!(
            lines
                .iter()
                .all(|l| l["ok"] == true && l["answer"] == "pod-a"),
            "a kept socket lost its backend: {lines:?}"
        );
    }
    assert!(!h.agent_log().contains("departed backends closed"));
}
