//! Privileged: `/healthz`, `/livez` and `/metrics` of a running agent (manifests source).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{Harness, service, slice};

/// The address the agent logged for a server ("serving healthz on http://127.0.0.1:PORT").
fn served_address(h: &Harness, what: &str) -> String {
    let needle = format!("serving {what} on http://");
    h.wait_for_log(&needle);
    let log = h.agent_log();
    let start = log.find(&needle).map(|i| i + needle.len()).unwrap_or(0);
    log[start..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// A plain HTTP/1.0 GET on loopback: (status code, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut stream =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("sending request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading response");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn c30_healthz_and_livez_are_200_once_synced_and_metrics_use_kube_proxy_names() {
    let mut h = Harness::new("http", &["pod-a"]);
    h.write_manifest(
        "svc.yaml",
        &service("web", "10.96.0.10", &[("http", 80, "TCP")]),
    );
    h.write_manifest(
        "eps.yaml",
        &slice(
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.244.0.10", true)],
        ),
    );
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.10:8080"]));

    let healthz = served_address(&h, "healthz");
    let (code, body) = get(&healthz, "/healthz");
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("healthz body is JSON");
    assert_eq!(json["nodeEligible"], true);
    assert!(
        json["lastUpdated"]
            .as_str()
            .is_some_and(|t| !t.starts_with("0001")),
        "{body}"
    );
    let (code, body) = get(&healthz, "/livez");
    assert_eq!(code, 200, "{body}");

    let metrics = served_address(&h, "metrics");
    let (code, text) = get(&metrics, "/metrics");
    assert_eq!(code, 200);
    for line in [
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
        "kubeproxy_sync_proxy_rules_service_changes_total 1",
        "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
        "ebpf_kube_proxy_map_entries{map=\"ekp_backend_v1\"} 1",
        "ebpf_kube_proxy_map_entries{map=\"ekp_svc_v1\"} 2",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert!(text.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds "));
}
