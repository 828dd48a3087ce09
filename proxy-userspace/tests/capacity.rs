//! Privileged: small maps. What does not fit is named (log and metric), what is programmed
//! keeps working, and the waiting Service is programmed once room frees up.

mod common;

use common::{Harness, answers, http_get, service, slice};

fn web(h: &Harness, name: &str, vip: &str, pods: &[(&str, bool)]) {
    h.write_manifest(
        &format!("{name}.yaml"),
        &service(name, vip, &[("http", 80, "TCP")]),
    );
    h.write_manifest(
        &format!("{name}-eps.yaml"),
        &slice(&format!("{name}-1"), name, &[("http", 8080, "TCP")], pods),
    );
}

#[test]
fn a_full_services_map_names_the_service_that_waits_and_programs_it_when_room_frees_up() {
    let mut h = Harness::new("capacity", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    let both = [("10.244.0.10", true), ("10.244.0.11", true)];
    // Two Services of 1 + 2 entries each fit in 6; the third one does not.
    web(&h, "one", "10.96.0.1", &both);
    web(&h, "two", "10.96.0.2", &both);
    web(&h, "three", "10.96.0.3", &both);
    let manifests = h.manifests.clone();
    h.start_agent_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--map-size-services".as_ref(),
        "6".as_ref(),
    ]);
    h.wait_for_frontend(
        "10.96.0.1:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    h.wait_for_frontend(
        "10.96.0.2:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    h.wait_for_log("skipped Service default/three");
    assert!(
        h.agent_log()
            .contains("the services map is full (6 entries)"),
        "{}",
        h.agent_log()
    );
    let (_, metrics) = http_get(&h.served_address("metrics"), "/metrics");
    assert!(
        metrics.contains("ebpf_kube_proxy_skipped_objects{kind=\"Service\",reason=\"capacity\"} 1"),
        "{metrics}"
    );
    // The programmed Services are untouched and serve.
    assert_eq!(answers(&h.client(&["tcp", "10.96.0.1:80", "20"])).len(), 2);
    assert_eq!(answers(&h.client(&["tcp", "10.96.0.2:80", "20"])).len(), 2);

    // Room frees up: "one" is deleted, "three" gets programmed without any other change.
    h.remove_manifest("one.yaml");
    h.wait_for_frontend("10.96.0.1:80", "TCP", None);
    h.wait_for_frontend(
        "10.96.0.3:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    assert_eq!(answers(&h.client(&["tcp", "10.96.0.3:80", "20"])).len(), 2);
}
