//! The standalone source's view of the Services: JSON manifests (`kind: List`) that
//! `ebpf-kube-proxy run --manifests` reads. The measured Service's slice of the endpoints on
//! this node has a file of its own, rewritten atomically (write beside the directory,
//! rename into it) for an endpoint change; its slice of those on another node goes with
//! the other Services' slices. The Node gives the agent the address NodePorts are served
//! on.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::scenario::Service;

pub const MEASURED_SLICE_FILE: &str = "measured-endpointslice.json";
/// The agent's `--node-name`, and the node every endpoint is on but the `remote` ports'.
pub const NODE_NAME: &str = "bench-node";
/// The node of the `remote` ports' endpoints.
pub const REMOTE_NODE_NAME: &str = "bench-node-2";

fn service(svc: &Service) -> Value {
    let ports: Vec<Value> = svc
        .ports
        .iter()
        .map(|p| {
            let mut port = json!({"name": p.name, "port": p.port, "protocol": p.proto.api(), "targetPort": p.target});
            if let Some(node_port) = p.node_port {
                port["nodePort"] = json!(node_port);
            }
            port
        })
        .collect();
    let mut spec = json!({
        "type": "ClusterIP",
        "clusterIP": svc.vip.to_string(),
        "clusterIPs": [svc.vip.to_string()],
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "ports": ports,
    });
    if svc.is_node_port() {
        spec["type"] = json!("NodePort");
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": svc.name, "namespace": svc.namespace},
        "spec": spec,
    })
}

fn node(address: Ipv4Addr) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE_NAME},
        "status": {"addresses": [{"type": "InternalIP", "address": address.to_string()}]},
    })
}

/// The Service's slice of the endpoints on this node: its ports but the `remote` ones.
fn slice(svc: &Service) -> Value {
    endpoint_slice(svc, "bench", false, &svc.endpoints, NODE_NAME)
}

/// The Service's slice of the endpoints on the other node, for its `remote` ports; `None`
/// for a Service without such ports.
fn remote_slice(svc: &Service) -> Option<Value> {
    svc.ports
        .iter()
        .any(|p| p.remote)
        .then(|| endpoint_slice(svc, "remote", true, &svc.remote_endpoints, REMOTE_NODE_NAME))
}

/// An EndpointSlice `<service>-<suffix>` of `svc`'s ports whose `remote` is `remote`, with
/// ready `endpoints` on `node`.
fn endpoint_slice(
    svc: &Service,
    suffix: &str,
    remote: bool,
    endpoints: &[Ipv4Addr],
    node: &str,
) -> Value {
    let ports: Vec<Value> = svc
        .ports
        .iter()
        .filter(|p| p.remote == remote)
        .map(|p| json!({"name": p.name, "port": p.target, "protocol": p.proto.api()}))
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|ip| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": node,
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-{suffix}", svc.name),
            "namespace": svc.namespace,
            "labels": {
                "kubernetes.io/service-name": svc.name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// Writes `dir/name` through a temporary file beside `dir` (same filesystem) and a rename,
/// so that the agent's watcher sees one event, the rename, and never a half-written file.
fn write_atomically(dir: &Path, name: &str, value: &Value) -> Result<()> {
    let dir_name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("manifests");
    let tmp = dir
        .parent()
        .context("the manifests directory has a parent")?
        .join(format!(".{dir_name}-{name}.tmp"));
    let text = serde_json::to_string(value)?;
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming {}", tmp.display()))
}

/// The whole directory for `services` (the measured Service last) on a node whose
/// InternalIP is `node_address`.
pub fn write_all(dir: &Path, services: &[Service], node_address: Ipv4Addr) -> Result<()> {
    let (measured, fillers) = services.split_last().context("no Services")?;
    write_atomically(dir, "node.json", &node(node_address))?;
    write_atomically(
        dir,
        "services.json",
        &list(services.iter().map(service).collect()),
    )?;
    // The measured Service's remote slice never changes: it goes with the fillers'.
    let slices = fillers
        .iter()
        .map(slice)
        .chain(remote_slice(measured))
        .collect();
    write_atomically(dir, "endpointslices.json", &list(slices))?;
    write_measured_slice(dir, measured)
}

pub fn write_measured_slice(dir: &Path, measured: &Service) -> Result<()> {
    write_atomically(dir, MEASURED_SLICE_FILE, &slice(measured))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::scenario;
    use super::*;

    #[test]
    fn the_measured_slice_names_both_ports_and_every_endpoint() {
        let svc =
            scenario::measured(&[Ipv4Addr::new(10, 244, 0, 10), Ipv4Addr::new(10, 244, 0, 11)]);
        let v = slice(&svc);
        assert_eq!(
            v["metadata"]["labels"]["kubernetes.io/service-name"],
            "measured"
        );
        assert_eq!(v["ports"][0]["protocol"], "UDP");
        assert_eq!(v["ports"][1]["port"], 8081);
        assert_eq!(v["ports"][2]["port"], 8080);
        assert_eq!(v["ports"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["endpoints"][1]["addresses"][0], "10.244.0.11");
        assert_eq!(v["endpoints"][1]["nodeName"], NODE_NAME);
        let s = service(&svc);
        assert_eq!(s["spec"]["clusterIP"], "10.100.0.10");
        assert_eq!(s["spec"]["ports"][3]["targetPort"], 8080);
        assert_eq!(s["spec"]["type"], "NodePort");
        assert_eq!(
            s["spec"]["ports"][1]["nodePort"],
            scenario::EXTERNAL_NODE_PORT
        );
        assert_eq!(
            s["spec"]["ports"][2]["nodePort"],
            scenario::REMOTE_NODE_PORT
        );
        assert_eq!(s["spec"]["ports"][3]["nodePort"], scenario::NODE_PORT);
        let filler = service(&scenario::filler(0));
        assert_eq!(filler["spec"]["type"], "ClusterIP");
        assert!(filler["spec"]["ports"][0].get("nodePort").is_none());
        assert!(remote_slice(&scenario::filler(0)).is_none());
    }

    #[test]
    fn the_remote_port_has_a_slice_of_its_own_on_the_other_node() {
        let svc = scenario::measured(&[Ipv4Addr::new(10, 244, 0, 10)]);
        let v = remote_slice(&svc).expect("the measured Service has a remote port");
        assert_eq!(v["metadata"]["name"], "measured-remote");
        assert_eq!(
            v["metadata"]["labels"]["kubernetes.io/service-name"],
            "measured"
        );
        assert_eq!(
            v["ports"],
            json!([{"name": "remote", "port": scenario::REMOTE_TARGET_PORT, "protocol": "TCP"}])
        );
        let endpoints: Vec<_> = v["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| (e["addresses"][0].clone(), e["nodeName"].clone()))
            .collect();
        assert_eq!(
            endpoints,
            scenario::REMOTE_ENDPOINTS.map(|ip| (json!(ip.to_string()), json!(REMOTE_NODE_NAME)))
        );
    }
}
