//! Privileged: healthCheckNodePort servers (BEHAVIOUR C12, C13) of a running agent.
//!
//! The agent runs inside the harness's node namespace with `--nodeport-addresses
//! 10.244.0.0/24`, and the Node object gives it the bridge address 10.244.0.1, so it opens
//! its health-check servers there and nowhere in the host's namespace. The probe is a plain
//! HTTP GET from the client namespace (10.244.0.2 on the same bridge), as a cloud load
//! balancer probes a node. Endpoints need no pods: only their count is served.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::Harness;
use serde_json::Value;
use xtask::netns::BRIDGE_ADDR;

const HC_PORT: u16 = 32000;
/// Waiting for a condition gives up after this long; it is a hang guard, not a timing.
const CONDITION_LIMIT: Duration = Duration::from_secs(20);

/// `default/web`: LoadBalancer with `externalTrafficPolicy: {policy}` and healthCheckNodePort
/// `hc_port` (the API server allocates one for `Local` only, and keeps it when the policy
/// changes until it is cleared, so a `Cluster` Service may carry it too).
fn service(policy: &str, hc_port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalTrafficPolicy: {policy}
  healthCheckNodePort: {hc_port}
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}]
"
    )
}

/// The slice of `default/web`: `endpoints` are (address, ready, serving, terminating, node).
fn endpoints(endpoints: &[(&str, bool, bool, bool, &str)]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(addr, ready, serving, terminating, node)| {
            format!(
                "  - addresses: [{addr}]\n    nodeName: {node}\n    conditions: \
                 {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n"
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{endpoints}"
    )
}

const NODE: &str = "apiVersion: v1
kind: Node
metadata: {name: node-1}
status:
  addresses: [{type: InternalIP, address: 10.244.0.1}]
";

/// An HTTP answer: status, lower-cased header block, body.
#[derive(Debug)]
struct Answer {
    code: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// `GET path` on the node's health-check port, sent from the client namespace (a thread
/// enters it, so that the connection never starts in the host's namespace).
fn probe(h: &Harness, port: u16, path: &str) -> std::io::Result<Answer> {
    let netns = std::fs::File::open(format!("/run/netns/{}", h.topo.client.ns.name()))?;
    let path = path.to_owned();
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace file we hold open; it moves only this thread.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let addr = SocketAddr::from((BRIDGE_ADDR, port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or_default();
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok(Answer {
            code,
            head: head.to_lowercase(),
            body: body.to_owned(),
        })
    })
    .join()
    .unwrap_or_else(|_| panic!("the probe thread panicked"))
}

/// Probes until the answer has status `code` and `localEndpoints` `count`.
fn wait_for(h: &Harness, code: u16, count: u64) -> Answer {
    let deadline = Instant::now() + CONDITION_LIMIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match probe(h, HC_PORT, "/") {
            Ok(a) if a.code == code && a.json()["localEndpoints"] == count => return a,
            Ok(a) => last = format!("{a:?}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("health check never answered {code} with {count} endpoints; last: {last}");
}

/// Probes until nothing listens on `port` any more (connection refused).
fn wait_for_refused(h: &Harness, port: u16) {
    let deadline = Instant::now() + CONDITION_LIMIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match probe(h, port, "/") {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return,
            other => last = format!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("port {port} was never closed; last: {last}");
}

#[test]
fn c12_c13_health_check_node_port_follows_local_endpoints_and_the_service() {
    let mut h = Harness::new("hcnp", &[]);
    h.write_manifest("node.yaml", NODE);
    h.write_manifest("svc.yaml", &service("Local", HC_PORT));
    // Two ready endpoints here, one on another node, and local ones that do not count.
    h.write_manifest(
        "eps.yaml",
        &endpoints(&[
            ("10.244.0.10", true, true, false, "node-1"),
            ("10.244.0.11", true, true, false, "node-1"),
            ("10.244.0.12", false, true, true, "node-1"),
            ("10.244.0.13", false, false, false, "node-1"),
            ("10.244.1.10", true, true, false, "node-2"),
        ]),
    );
    h.start_agent_in_node(&["--nodeport-addresses", "10.244.0.0/24"]);

    // C13: 200 on any path, kube-proxy's headers and body.
    let answer = wait_for(&h, 200, 2);
    assert!(
        answer.head.contains("content-type: application/json"),
        "{answer:?}"
    );
    assert!(
        answer.head.contains("x-content-type-options: nosniff"),
        "{answer:?}"
    );
    assert!(
        answer.head.contains("x-load-balancing-endpoint-weight: 2"),
        "{answer:?}"
    );
    assert_eq!(
        answer.json(),
        serde_json::json!({
            "service": {"namespace": "default", "name": "web"},
            "localEndpoints": 2,
            "serviceProxyHealthy": true,
        })
    );
    let other_path = probe(&h, HC_PORT, "/some/other/path").expect("probe");
    assert_eq!(other_path.code, 200, "{other_path:?}");
    let log = h.agent_log();
    assert!(
        log.contains("serving health check node port") && log.contains("10.244.0.1"),
        "the server should be on the node's address only:\n{log}"
    );

    // C12: the local endpoints go (one only terminating, still serving): 503, weight 0.
    h.write_manifest(
        "eps.yaml",
        &endpoints(&[
            ("10.244.0.10", false, true, true, "node-1"),
            ("10.244.1.10", true, true, false, "node-2"),
        ]),
    );
    let answer = wait_for(&h, 503, 0);
    assert!(
        answer.head.contains("x-load-balancing-endpoint-weight: 0"),
        "{answer:?}"
    );
    assert_eq!(answer.json()["serviceProxyHealthy"], true);

    // Back to one local endpoint, then the policy becomes Cluster: the port closes.
    h.write_manifest(
        "eps.yaml",
        &endpoints(&[("10.244.0.10", true, true, false, "node-1")]),
    );
    wait_for(&h, 200, 1);
    h.write_manifest("svc.yaml", &service("Cluster", HC_PORT));
    wait_for_refused(&h, HC_PORT);

    // Local again, then the Service is deleted: the port closes.
    h.write_manifest("svc.yaml", &service("Local", HC_PORT));
    wait_for(&h, 200, 1);
    h.remove_manifest("svc.yaml");
    wait_for_refused(&h, HC_PORT);
}

#[test]
fn a_taken_health_check_port_is_reported_and_served_once_free() {
    let mut h = Harness::new("hcbusy", &[]);
    // Something else in the node's namespace holds the port first.
    let mut holder = {
        let mut command = h
            .topo
            .node
            .command(common::PEER, None)
            .expect("holder command");
        command.args(["serve", "--name", "holder", "--tcp", &HC_PORT.to_string()]);
        xtask::netns::Proc::spawn_ready(command, "port holder", "ready").expect("port holder")
    };
    h.write_manifest("node.yaml", NODE);
    h.write_manifest("svc.yaml", &service("Local", HC_PORT));
    h.write_manifest(
        "eps.yaml",
        &endpoints(&[("10.244.0.10", true, true, false, "node-1")]),
    );
    h.start_agent_in_node(&["--nodeport-addresses", "10.244.0.0/24"]);
    h.wait_for_log("Service default/web: cannot serve healthCheckNodePort 32000");

    // The port frees up; the next sync (any change) opens the server.
    holder.kill();
    h.write_manifest(
        "eps.yaml",
        &endpoints(&[
            ("10.244.0.10", true, true, false, "node-1"),
            ("10.244.0.11", true, true, false, "node-1"),
        ]),
    );
    wait_for(&h, 200, 2);
}

/// `--nodeport-addresses primary` (kube-proxy's nftables-mode default): only the node's
/// primary address, its first `InternalIP`, serves NodePorts and health-check NodePorts,
/// not its `ExternalIP`. A Node object that goes missing is reported (no address serves
/// NodePorts then), and so is its return.
#[test]
fn the_primary_address_alone_serves_node_ports_and_a_missing_node_is_reported() {
    let mut h = Harness::new("hcprim", &[]);
    // The ExternalIP is on no device: a health-check server there could not even bind.
    let node = "apiVersion: v1
kind: Node
metadata: {name: node-1}
status:
  addresses:
  - {type: ExternalIP, address: 10.244.0.99}
  - {type: InternalIP, address: 10.244.0.1}
";
    h.write_manifest("node.yaml", node);
    h.write_manifest("svc.yaml", &service("Local", HC_PORT));
    h.write_manifest(
        "eps.yaml",
        &endpoints(&[("10.244.0.10", true, true, false, "node-1")]),
    );
    h.start_agent_in_node(&["--nodeport-addresses", "primary"]);
    wait_for(&h, 200, 1);
    let node_ports = || -> Vec<String> {
        let mut found: Vec<String> = h
            .list()
            .expect("list")
            .iter()
            .filter(|f| f["type"] == "NodePort" && f["scope"] == "external")
            .filter_map(|f| f["frontend"].as_str().map(String::from))
            .collect();
        found.sort();
        found
    };
    assert_eq!(node_ports(), ["10.244.0.1:30080"]);
    let log = h.agent_log();
    assert!(
        !log.contains("10.244.0.99") && !log.contains("no Node object"),
        "only the primary address is served:\n{log}"
    );

    h.remove_manifest("node.yaml");
    h.wait_for_log("no Node object named \"node-1\"");
    wait_for_refused(&h, HC_PORT);
    assert_eq!(node_ports(), Vec::<String>::new());

    h.write_manifest("node.yaml", node);
    h.wait_for_log("the Node object \"node-1\" appeared");
    wait_for(&h, 200, 1);
    assert_eq!(node_ports(), ["10.244.0.1:30080"]);
}
