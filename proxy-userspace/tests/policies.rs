//! Privileged: session affinity (C19-C21) and internalTrafficPolicy Local (C14, C15) through
//! the socket programs, with real connections.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Harness, answers, service, slice};

const VIP: &str = "10.96.0.10";
const EHOSTUNREACH: i64 = 113;

/// `service()` plus extra `spec` fields (two-space indented YAML lines).
fn service_with(extra_spec: &str) -> String {
    service("web", VIP, &[("http", 80, "TCP")]) + extra_spec
}

/// An EndpointSlice whose endpoints sit on named nodes: (address, node).
fn slice_on_nodes(endpoints: &[(&str, &str)]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(addr, node)| {
            format!("  - addresses: [\"{addr}\"]\n    conditions: {{ready: true}}\n    nodeName: {node}\n")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n  - {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n{endpoints}"
    )
}

fn two_pods(h: &Harness) {
    h.write_manifest(
        "eps.yaml",
        &slice(
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.244.0.10", true), ("10.244.0.11", true)],
        ),
    );
}

/// Which pods answered `n` new connections.
fn responders(h: &Harness, n: usize) -> BTreeSet<String> {
    answers(&h.client(&["tcp", "10.96.0.10:80", &n.to_string()]))
        .into_keys()
        .collect()
}

fn wait_for_both(h: &mut Harness) {
    h.wait_for_frontend(
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
}

#[test]
fn c19_client_ip_affinity_sends_one_client_to_one_backend() {
    let mut h = Harness::new("affinity", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    h.write_manifest("svc.yaml", &service_with("  sessionAffinity: ClientIP\n"));
    two_pods(&h);
    h.start_agent();
    wait_for_both(&mut h);
    let sticky = responders(&h, 100);
    assert_eq!(
        sticky.len(),
        1,
        "100 connections of one client must reach one backend: {sticky:?}"
    );
    // A new client process in the same pod is the same client (same pod, same address).
    assert_eq!(responders(&h, 20), sticky);
}

#[test]
fn c20_affinity_expires_after_its_timeout() {
    let mut h = Harness::new("affttl", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    h.write_manifest(
        "svc.yaml",
        &service_with("  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 1\n"),
    );
    two_pods(&h);
    h.start_agent();
    wait_for_both(&mut h);
    let first = responders(&h, 20);
    assert_eq!(first.len(), 1, "sticky within the timeout: {first:?}");
    // After more than the timeout without traffic, the choice is made anew (at random, so
    // it may land on the same pod: try until it moves; 12 tries fail only with p = 1/4096).
    let mut moved = false;
    for _ in 0..12 {
        // Time itself is what is tested here: idle for longer than the 1 s timeout.
        std::thread::sleep(Duration::from_millis(2500));
        let now = responders(&h, 1);
        if now != first {
            moved = true;
            break;
        }
    }
    assert!(
        moved,
        "the backend never changed after the affinity timeout expired"
    );
}

#[test]
fn c21_switching_affinity_on_and_off_on_a_live_service() {
    let mut h = Harness::new("affswitch", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    h.write_manifest("svc.yaml", &service_with(""));
    two_pods(&h);
    h.start_agent();
    wait_for_both(&mut h);
    assert_eq!(responders(&h, 100).len(), 2, "spread without affinity");

    let log_mark = h.agent_log().matches("synced").count();
    h.write_manifest("svc.yaml", &service_with("  sessionAffinity: ClientIP\n"));
    wait_for_sync_after(&h, log_mark);
    assert_eq!(responders(&h, 100).len(), 1, "sticky with affinity");

    let log_mark = h.agent_log().matches("synced").count();
    h.write_manifest("svc.yaml", &service_with("  sessionAffinity: None\n"));
    wait_for_sync_after(&h, log_mark);
    assert_eq!(responders(&h, 100).len(), 2, "spread again");
}

/// Waits until the agent logged another write-sync than the `count` seen before.
fn wait_for_sync_after(h: &Harness, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while h.agent_log().matches("synced").count() <= count {
        assert!(
            std::time::Instant::now() < deadline,
            "no sync after the change:\n{}",
            h.agent_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn c14_internal_traffic_policy_local_uses_local_endpoints_only() {
    let mut h = Harness::new("itplocal", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    h.write_manifest(
        "svc.yaml",
        &service_with("  internalTrafficPolicy: Local\n"),
    );
    // pod-a runs on this node (the agent is node-1), pod-b elsewhere.
    h.write_manifest(
        "eps.yaml",
        &slice_on_nodes(&[("10.244.0.10", "node-1"), ("10.244.0.11", "node-2")]),
    );
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.10:8080"]));
    assert_eq!(responders(&h, 50), BTreeSet::from(["pod-a".to_owned()]));
}

#[test]
fn c15_internal_traffic_policy_local_without_local_endpoint_drops_not_refuses() {
    let mut h = Harness::new("itpnone", &["pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    h.write_manifest(
        "svc.yaml",
        &service_with("  internalTrafficPolicy: Local\n"),
    );
    h.write_manifest("eps.yaml", &slice_on_nodes(&[("10.244.0.10", "node-2")]));
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&[]));
    for line in h.client(&["tcp", "10.96.0.10:80", "3"]) {
        assert_eq!(line["ok"], false, "{line}");
        assert_eq!(
            line["errno"], EHOSTUNREACH,
            "dropped (no route to a local endpoint), not refused: {line}"
        );
    }
}
