//! Privileged: the bad-input table of BEHAVIOUR C34 (issue 7) through both sources, the
//! manifests directory and the Kubernetes API (the stand-in of tests/support/apiserver.rs),
//! with the real agent and real traffic. Each bad object is named in exactly one error line
//! of the agent's log with its reason, even after later syncs; the agent stays up; the good
//! Services beside the bad ones are programmed and answer; what kube-proxy serves on purpose
//! (sloppy addresses, a slice over the API's 1000 endpoints, identical endpoints, names at
//! their length limit, a slice that waits for its Service) is served, and what it ignores
//! (IPv6-only objects) is not an error.
//!
//! Needs root, network namespaces, cgroup v2 and BPF (the harness checks and says so).

mod common;
mod support;

use std::collections::BTreeSet;

use common::{Harness, answers};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use support::apiserver::ApiServer;

const NS: &str = "default";
const POD_A: &str = "10.244.0.10";
const POD_B: &str = "10.244.0.11";

/// A ClusterIP Service `name` on `vip` with `ports`: (name, port, protocol).
fn service(name: &str, vip: &str, ports: &[(&str, i64, &str)]) -> Service {
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|(port_name, port, proto)| json!({"name": port_name, "port": port, "protocol": proto}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "ports": ports},
    }))
    .expect("a Service the types accept")
}

/// An `address_type` EndpointSlice of Service `service`, `port_names` on 8080/TCP, with
/// ready endpoints on `addresses`.
fn slice_of(
    name: &str,
    service: &str,
    address_type: &str,
    port_names: &[&str],
    addresses: &[&str],
) -> EndpointSlice {
    let ports: Vec<serde_json::Value> = port_names
        .iter()
        .map(|port_name| json!({"name": port_name, "port": 8080, "protocol": "TCP"}))
        .collect();
    let endpoints: Vec<serde_json::Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .expect("an EndpointSlice the types accept")
}

fn slice(name: &str, service: &str, addresses: &[&str]) -> EndpointSlice {
    slice_of(name, service, "IPv4", &["http"], addresses)
}

fn http(name: &str, vip: &str) -> Service {
    service(name, vip, &[("http", 80, "TCP")])
}

/// 1001 distinct addresses that no pod has: one more than the API allows in a slice.
fn over_the_slice_limit() -> Vec<String> {
    (0..1001)
        .map(|i| format!("10.245.{}.{}", i / 256, i % 256))
        .collect()
}

/// A Service name (DNS-1035 label) and a port name (DNS-1123 label) at 63 characters.
fn long_service() -> String {
    format!("s{}", "x".repeat(62))
}

fn long_port() -> String {
    format!("p{}", "z".repeat(62))
}

/// A slice name (DNS-1123 subdomain) at 253 characters.
fn long_slice_name() -> String {
    format!("e{}", "y".repeat(252))
}

/// The rows of the table that both sources can carry, and the good Services beside them.
fn table() -> (Vec<Service>, Vec<EndpointSlice>) {
    let (long_service, long_port) = (long_service(), long_port());
    assert_eq!(
        (long_service.len(), long_port.len(), long_slice_name().len()),
        (63, 63, 253)
    );
    let mut v6_only = service("v6-only", "fd00:10:96::20", &[("http", 80, "TCP")]);
    if let Some(spec) = v6_only.spec.as_mut() {
        spec.ip_families = Some(vec!["IPv6".into()]);
    }
    let mut ext_octet = http("ext-octet", "10.96.0.42");
    let mut ext_word = http("ext-word", "10.96.0.43");
    for (service, ip) in [(&mut ext_octet, "10.96.0.300"), (&mut ext_word, "abc")] {
        if let Some(spec) = service.spec.as_mut() {
            spec.external_ips = Some(vec![ip.into()]);
        }
    }
    let services = vec![
        http("good", "10.96.0.10"),
        // Invalid endpoint addresses and externalIPs.
        http("eps", "10.96.0.21"),
        ext_octet,
        ext_word,
        // Non-canonical endpoint address, read like ParseIPSloppy.
        http("sloppy-endpoint", "10.96.0.41"),
        // Ports 0 and 70000; SCTP and a protocol that does not exist.
        service("port-zero", "10.96.0.22", &[("http", 0, "TCP")]),
        service("port-big", "10.96.0.23", &[("http", 70000, "TCP")]),
        service("proto-sctp", "10.96.0.24", &[("http", 80, "SCTP")]),
        service("proto-junk", "10.96.0.25", &[("http", 80, "QUIC")]),
        v6_only,
        http("big", "10.96.0.30"),
        // Two ports with the same port and protocol.
        service(
            "dup-port",
            "10.96.0.28",
            &[("http", 80, "TCP"), ("web", 80, "TCP")],
        ),
        http("twice", "10.96.0.29"),
        service(&long_service, "10.96.0.33", &[(&long_port, 80, "TCP")]),
    ];
    let big = over_the_slice_limit();
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    let slices = vec![
        slice("good-1", "good", &[POD_A, POD_B]),
        slice("eps-octet", "eps", &["10.244.0.300", POD_B]),
        slice("eps-word", "eps", &["abc"]),
        slice("sloppy-endpoint-1", "sloppy-endpoint", &["10.244.0.010"]),
        slice_of("v6-only-1", "v6-only", "IPv6", &["http"], &["fd00:244::10"]),
        slice("big-1", "big", &big),
        slice_of("dup-port-1", "dup-port", "IPv4", &["http", "web"], &[POD_A]),
        slice("twice-1", "twice", &[POD_B, POD_B]),
        slice_of(
            &long_slice_name(),
            &long_service,
            "IPv4",
            &[&long_port],
            &[POD_A],
        ),
        // Its Service "late" comes later.
        slice("late-1", "late", &[POD_B]),
    ];
    (services, slices)
}

/// (object as logged, a piece of its reason): each in exactly one error line.
const REPORTED: [(&str, &str); 9] = [
    (
        "EndpointSlice default/eps-octet",
        r#"invalid endpoint address "10.244.0.300""#,
    ),
    (
        "EndpointSlice default/eps-word",
        r#"invalid endpoint address "abc""#,
    ),
    (
        "Service default/ext-octet",
        r#"invalid externalIP "10.96.0.300""#,
    ),
    ("Service default/ext-word", r#"invalid externalIP "abc""#),
    (
        "Service default/port-zero",
        "port 0 is out of range 1-65535",
    ),
    (
        "Service default/port-big",
        "port 70000 is out of range 1-65535",
    ),
    (
        "Service default/proto-sctp",
        r#"protocol "SCTP" is not supported"#,
    ),
    (
        "Service default/proto-junk",
        r#"protocol "QUIC" is not supported"#,
    ),
    (
        "Service default/dup-port port web",
        "10.96.0.28:80/TCP is already served by default/dup-port:http",
    ),
];

/// Names that must not appear in any error line: served, or ignored on purpose.
fn silent() -> Vec<String> {
    ["good", "sloppy", "v6-only", "default/big", "twice", "late"]
        .into_iter()
        .map(String::from)
        .chain([long_service(), long_slice_name()])
        .collect()
}

/// The good Services of the table and who answers on each.
const ANSWERING: [(&str, &[&str]); 6] = [
    ("10.96.0.10:80", &["pod-a", "pod-b"]),
    ("10.96.0.21:80", &["pod-b"]),
    ("10.96.0.41:80", &["pod-a"]),
    ("10.96.0.28:80", &["pod-a"]),
    ("10.96.0.29:80", &["pod-b"]),
    ("10.96.0.33:80", &["pod-a"]),
];

/// Waits for the Services of the table, then checks them with real connections.
fn the_good_services_are_programmed_and_answer(h: &mut Harness) {
    let (a, b) = (format!("{POD_A}:8080"), format!("{POD_B}:8080"));
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&[&a, &b]));
    h.wait_for_frontend("10.96.0.21:80", "TCP", Some(&[&b]));
    h.wait_for_frontend("10.96.0.41:80", "TCP", Some(&[&a]));
    h.wait_for_frontend("10.96.0.28:80", "TCP", Some(&[&a]));
    h.wait_for_frontend("10.96.0.29:80", "TCP", Some(&[&b]));
    h.wait_for_frontend("10.96.0.33:80", "TCP", Some(&[&a]));
    let big: Vec<String> = over_the_slice_limit()
        .iter()
        .map(|addr| format!("{addr}:8080"))
        .collect();
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    h.wait_for_frontend("10.96.0.30:80", "TCP", Some(&big));
    for (vip, responders) in ANSWERING {
        let seen = answers(&h.client(&["tcp", vip, "20"]));
        let seen: Vec<&str> = seen.keys().map(String::as_str).collect();
        assert_eq!(seen, responders, "answers on {vip}");
    }
}

/// The orphan slice waited silently; its Service appears and is served at once with it.
fn the_late_service_is_served_with_its_waiting_slice(h: &mut Harness) {
    h.wait_for_frontend("10.96.0.34:80", "TCP", Some(&[&format!("{POD_B}:8080")]));
    let seen = answers(&h.client(&["tcp", "10.96.0.34:80", "10"]));
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["pod-b"]);
}

/// Every internal-scope frontend programmed, as `address:port/protocol`.
fn programmed(h: &Harness) -> BTreeSet<String> {
    h.list()
        .expect("list")
        .iter()
        .filter(|f| f["scope"] == "internal")
        .map(|f| {
            format!(
                "{}/{}",
                f["frontend"].as_str().unwrap_or(""),
                f["protocol"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// Each reported object in exactly one error line with its reason, the silent ones in none,
/// and no other error at all (no failed sync).
fn each_problem_is_logged_once(h: &Harness, reported: &[(String, &str)]) {
    let log = h.agent_log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    for (object, reason) in reported {
        let lines: Vec<&&str> = errors
            .iter()
            .filter(|l| l.contains(object.as_str()))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{object} must be in exactly one error line:\n{log}"
        );
        assert!(lines[0].contains(reason), "{object}: {}", lines[0]);
    }
    for name in silent() {
        assert!(
            !errors.iter().any(|l| l.contains(&name)),
            "{name} is no error:\n{log}"
        );
    }
    assert_eq!(
        errors.len(),
        reported.len(),
        "only the bad objects are errors:\n{log}"
    );
}

#[test]
fn c34_bad_manifests_are_reported_once_each_and_the_good_services_keep_working() {
    let mut h = Harness::new("badmani", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    let (services, slices) = table();
    for (i, service) in services.iter().enumerate() {
        let yaml = serde_yaml_ng::to_string(service).expect("Service as YAML");
        h.write_manifest(&format!("svc-{i:02}.yaml"), &yaml);
    }
    for (i, slice) in slices.iter().enumerate() {
        let yaml = serde_yaml_ng::to_string(slice).expect("EndpointSlice as YAML");
        h.write_manifest(&format!("eps-{i:02}.yaml"), &yaml);
    }
    // What only a manifest can hold: text that is no YAML, other kinds, and cluster IPs the
    // API server refuses (and 172.30.0.041, which older API servers stored and kube-proxy
    // reads as 172.30.0.41).
    h.write_manifest(
        "bad-yaml.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: default\nspec: {}\n",
    );
    h.write_manifest(
        "unknown-kind.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: unknown-kind}\n",
    );
    for (name, vip) in [
        ("bad-octet", "10.96.0.300"),
        ("bad-word", "abc"),
        ("sloppy-cluster-ip", "172.30.0.041"),
    ] {
        let yaml = serde_yaml_ng::to_string(&http(name, vip)).expect("Service as YAML");
        h.write_manifest(&format!("{name}.yaml"), &yaml);
    }
    h.write_manifest(
        "sloppy-cluster-ip-eps.yaml",
        &serde_yaml_ng::to_string(&slice("sloppy-cluster-ip-1", "sloppy-cluster-ip", &[POD_A]))
            .expect("EndpointSlice as YAML"),
    );
    h.start_agent();

    the_good_services_are_programmed_and_answer(&mut h);
    h.wait_for_frontend("172.30.0.41:80", "TCP", Some(&[&format!("{POD_A}:8080")]));
    let seen = answers(&h.client(&["tcp", "172.30.0.41:80", "10"]));
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["pod-a"]);

    // A change after the bad input was seen: another sync runs with it still there.
    h.write_manifest(
        "late.yaml",
        &serde_yaml_ng::to_string(&http("late", "10.96.0.34")).expect("Service as YAML"),
    );
    the_late_service_is_served_with_its_waiting_slice(&mut h);

    let mut reported: Vec<(String, &str)> = REPORTED
        .iter()
        .map(|(object, reason)| (object.to_string(), *reason))
        .collect();
    reported.extend([
        ("bad-yaml.yaml document 1".to_string(), "not valid YAML"),
        (
            "Deployment unknown-kind".to_string(),
            "unsupported apiVersion/kind apps/v1/Deployment",
        ),
        (
            "Service default/bad-octet".to_string(),
            r#"invalid clusterIP "10.96.0.300""#,
        ),
        (
            "Service default/bad-word".to_string(),
            r#"invalid clusterIP "abc""#,
        ),
    ]);
    each_problem_is_logged_once(&h, &reported);
    assert_eq!(
        programmed(&h),
        [
            "10.96.0.10:80/TCP",
            "10.96.0.21:80/TCP",
            "10.96.0.28:80/TCP",
            "10.96.0.29:80/TCP",
            "10.96.0.30:80/TCP",
            "10.96.0.33:80/TCP",
            "10.96.0.34:80/TCP",
            "10.96.0.41:80/TCP",
            "10.96.0.42:80/TCP",
            "10.96.0.43:80/TCP",
            "172.30.0.41:80/TCP",
        ]
        .into_iter()
        .map(String::from)
        .collect::<BTreeSet<_>>(),
        "only the good Services (and the cluster IPs of those with bad externalIPs)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c34_bad_objects_from_the_api_are_reported_once_each_and_the_good_services_keep_working() {
    let mut h = Harness::new("badkube", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    let server = ApiServer::start().await.expect("starting the API stand-in");
    let client = server.client().await;
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client, NS);
    let pp = PostParams::default();
    // The API takes whatever the types can carry, except what its validation refuses: the
    // stand-in, like a current API server, refuses the cluster IPs "10.96.0.300", "abc" and
    // "172.30.0.041", so those rows are in the manifests test only.
    let (table_services, table_slices) = table();
    for service in &table_services {
        services.create(&pp, service).await.expect("create Service");
    }
    for slice in &table_slices {
        slices
            .create(&pp, slice)
            .await
            .expect("create EndpointSlice");
    }

    let kubeconfig = h.manifests.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).expect("writing the kubeconfig");
    h.start_agent_with(&["--kubeconfig".as_ref(), kubeconfig.as_os_str()]);
    the_good_services_are_programmed_and_answer(&mut h);

    // The orphan slice's Service appears: served at once, and another sync has run with
    // the bad objects still there.
    services
        .create(&pp, &http("late", "10.96.0.34"))
        .await
        .expect("create Service late");
    the_late_service_is_served_with_its_waiting_slice(&mut h);

    let reported: Vec<(String, &str)> = REPORTED
        .iter()
        .map(|(object, reason)| (object.to_string(), *reason))
        .collect();
    each_problem_is_logged_once(&h, &reported);
    assert_eq!(
        programmed(&h),
        [
            "10.96.0.10:80/TCP",
            "10.96.0.21:80/TCP",
            "10.96.0.28:80/TCP",
            "10.96.0.29:80/TCP",
            "10.96.0.30:80/TCP",
            "10.96.0.33:80/TCP",
            "10.96.0.34:80/TCP",
            "10.96.0.41:80/TCP",
            "10.96.0.42:80/TCP",
            "10.96.0.43:80/TCP",
        ]
        .into_iter()
        .map(String::from)
        .collect::<BTreeSet<_>>(),
        "only the good Services (and the cluster IPs of those with bad externalIPs)"
    );
}
