//! Privileged: externalIPs at the socket layer (issue 7's CVE-2020-8554 safety).

mod common;

use common::{Harness, answers, slice};

const ENETUNREACH: i64 = 101;

/// A ClusterIP Service with two externalIPs: a foreign one (TEST-NET-2, never routed
/// anywhere from the client namespace) and this node's own address.
const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.7, 10.244.0.1]
  ports: [{name: http, port: 80, protocol: TCP}]
";

/// This node, owning 10.244.0.1 (the node namespace's bridge address).
const NODE: &str = "apiVersion: v1
kind: Node
metadata: {name: node-1}
status:
  addresses: [{type: InternalIP, address: 10.244.0.1}]
";

fn setup(h: &Harness) {
    h.write_manifest("svc.yaml", SERVICE);
    h.write_manifest("node.yaml", NODE);
    h.write_manifest(
        "eps.yaml",
        &slice(
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.244.0.10", true)],
        ),
    );
}

#[test]
fn cve_2020_8554_foreign_external_ips_are_not_hijacked_by_default() {
    let mut h = Harness::new("extip", &["pod-a"]);
    let _servers = h.serve(&[8080], &[]);
    setup(&h);
    h.start_agent();
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.10:8080"]));
    // The node's own externalIP is served to its pods, like kube-proxy.
    h.wait_for_frontend("10.244.0.1:80", "TCP", Some(&["10.244.0.10:8080"]));
    assert_eq!(
        answers(&h.client(&["tcp", "10.244.0.1:80", "5"])).get("pod-a"),
        Some(&5)
    );
    // The foreign one is left alone by the socket programs (its external-scope entry stays,
    // for traffic arriving from outside): the connection goes where it was addressed (here:
    // nowhere, the client namespace has no route to it).
    let listed = h.list().expect("list");
    assert!(
        !listed
            .iter()
            .any(|f| f["frontend"] == "198.51.100.7:80" && f["scope"] == "internal"),
        "{listed:?}"
    );
    for line in h.client(&["tcp", "198.51.100.7:80", "2"]) {
        assert_eq!(line["errno"], ENETUNREACH, "{line}");
    }
}

#[test]
fn socket_lb_external_ips_opt_in_serves_foreign_external_ips_as_kube_proxy_does() {
    let mut h = Harness::new("extipon", &["pod-a"]);
    let _servers = h.serve(&[8080], &[]);
    setup(&h);
    let manifests = h.manifests.clone();
    h.start_agent_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--socket-lb-external-ips".as_ref(),
    ]);
    h.wait_for_frontend("198.51.100.7:80", "TCP", Some(&["10.244.0.10:8080"]));
    assert_eq!(
        answers(&h.client(&["tcp", "198.51.100.7:80", "5"])).get("pod-a"),
        Some(&5)
    );
}

/// Another Service whose externalIP is `web`'s ClusterIP and port, and whose name sorts
/// first (so its claim on that address and port came first). Not this node's address, so
/// the socket programs leave it alone; `web`'s ClusterIP must still be served. (It was
/// served to no one: the externalIP won the key, then was left out.)
#[test]
fn an_external_ip_on_another_services_cluster_ip_leaves_that_cluster_ip_served() {
    let mut h = Harness::new("extipcl", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    setup(&h);
    h.write_manifest(
        "other.yaml",
        "apiVersion: v1
kind: Service
metadata: {name: other, namespace: app}
spec:
  clusterIP: 10.96.0.99
  externalIPs: [10.96.0.10]
  ports: [{name: http, port: 80, protocol: TCP}]
",
    );
    h.write_manifest(
        "other-eps.yaml",
        &slice(
            "other-1",
            "other",
            &[("http", 8080, "TCP")],
            &[("10.244.0.11", true)],
        )
        .replace("namespace: default", "namespace: app"),
    );
    h.start_agent();
    h.wait_for_frontend("10.96.0.99:80", "TCP", Some(&["10.244.0.11:8080"]));
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.10:8080"]));
    let answered = answers(&h.client(&["tcp", "10.96.0.10:80", "5"]));
    assert_eq!(answered.get("pod-a"), Some(&5), "{answered:?}");
}

/// An externalIP on an address this node's devices carry but its Node object does not list
/// (a keepalived or kube-vip address): traffic to it ends on this node anyway, so its pods
/// are served there, as kube-proxy serves them.
#[test]
fn an_external_ip_on_an_address_the_node_carries_unlisted_is_served_to_its_pods() {
    let mut h = Harness::new("extiplocal", &["pod-a"]);
    let _servers = h.serve(&[8080], &[]);
    setup(&h);
    h.topo
        .node
        .ip(&["addr", "add", "198.51.100.7/32", "dev", "lo"])
        .expect("adding an address to the node");
    // No periodic sync within the test: only the address change itself can sync it.
    h.start_agent_in_node(&["--sync-period", "10m"]);
    h.wait_for_frontend("198.51.100.7:80", "TCP", Some(&["10.244.0.10:8080"]));
    assert_eq!(
        answers(&h.client(&["tcp", "198.51.100.7:80", "5"])).get("pod-a"),
        Some(&5)
    );
    // The address moves away (a failover): the node's pods are no longer served there.
    h.topo
        .node
        .ip(&["addr", "del", "198.51.100.7/32", "dev", "lo"])
        .expect("removing the address");
    h.wait_for_frontend("198.51.100.7:80", "TCP", None);
}
