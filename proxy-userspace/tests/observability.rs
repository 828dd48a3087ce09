//! Privileged: what an operator sees: `list` with affinity and drop semantics, `list --maps`
//! fill levels, and JSON logs.

mod common;

use common::{Harness, answers, service, slice};

#[test]
fn list_shows_affinity_map_fill_levels_and_logs_can_be_json() {
    let mut h = Harness::new("observe", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    h.write_manifest(
        "svc.yaml",
        &(service("web", "10.96.0.10", &[("http", 80, "TCP")]) + "  sessionAffinity: ClientIP\n"),
    );
    h.write_manifest(
        "eps.yaml",
        &slice(
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.244.0.10", true), ("10.244.0.11", true)],
        ),
    );
    let manifests = h.manifests.clone();
    h.start_agent_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--logging-format".as_ref(),
        "json".as_ref(),
    ]);
    h.wait_for_frontend(
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    assert_eq!(
        answers(&h.client(&["tcp", "10.96.0.10:80", "10"])).len(),
        1,
        "sticky"
    );

    let listed = h.list().expect("list");
    assert_eq!(listed[0]["affinityTimeout"], 10800, "{listed:?}");
    assert_eq!(listed[0]["whenEmpty"], "refuse");

    let fill = |map: &str| h.map_fill(map);
    // Slot 0 and two backend slots.
    assert_eq!(fill("ekp_svc_v1")["entries"], 3);
    assert_eq!(fill("ekp_svc_v1")["capacity"], 65536);
    assert_eq!(fill("ekp_backend_v2")["entries"], 2);
    // One client namespace with affinity to one frontend; the ten translated sockets are
    // closed, and their reverse entries went with them.
    assert_eq!(fill("ekp_affinity_v1")["entries"], 1);
    assert_eq!(fill("ekp_sk_rnat_v1")["entries"], 0);
    assert_eq!(fill("ekp_sk_rnat_v1")["capacity"], 262144);

    // Every log line of the agent is a JSON object.
    h.wait_for_log("synced");
    for line in h.agent_log().lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
    }
}
