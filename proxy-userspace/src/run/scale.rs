//! Where a sync's time goes at the benchmark's scale (issue 6): the phases of `sync_once`
//! without the maps, over the bench's manifests (N ClusterIP Services, two endpoints each).
//! Ignored by default; run in release mode:
//! `cargo test --release -p proxy-userspace --lib scale -- --ignored --nocapture`.

use std::fs;
use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use super::*;
use crate::sync::{Programmed, plan};

fn service(i: usize) -> Value {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32 + 1);
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i:05}"), "namespace": "bench"},
        "spec": {"type": "ClusterIP", "clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    })
}

fn slice(i: usize, second: u32) -> Value {
    let base = u32::from(Ipv4Addr::new(10, 248, 0, 0)) + 2 * i as u32 + 1;
    let endpoints: Vec<Value> = [base, base + second]
        .iter()
        .map(|a| {
            json!({
                "addresses": [Ipv4Addr::from(*a).to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "bench-node"})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i:05}-bench"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i:05}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

fn write(dir: &Path, name: &str, value: &Value) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, serde_json::to_string(value).expect("json")).expect("write");
    fs::rename(&tmp, dir.join(name)).expect("rename");
}

fn time<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let v = f();
    println!("{what:>28}: {:8.2} ms", t.elapsed().as_secs_f64() * 1e3);
    v
}

#[test]
#[ignore = "a measurement, not a check: run in release mode with --nocapture"]
fn scale_phases_of_a_sync() {
    let n: usize = std::env::var("EKP_SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10000);
    let dir = std::env::temp_dir().join(format!("ekp-scale-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("dir");
    let list = |items: Vec<Value>| json!({"apiVersion": "v1", "kind": "List", "items": items});
    write(&dir, "services.json", &list((0..n).map(service).collect()));
    write(
        &dir,
        "endpointslices.json",
        &list((0..n - 1).map(|i| slice(i, 1)).collect()),
    );
    write(&dir, "measured.json", &slice(n - 1, 1));

    let sizes = MapSizes::default();
    let mut cache = manifests::Cache::default();
    let mut state = LoopState::default();
    let mut programmed = Programmed::default();
    for round in 0..3 {
        println!("round {round}");
        if round > 0 {
            write(&dir, "measured.json", &slice(n - 1, 1 + round));
        }
        let snapshot = time("snapshot", || {
            manifests::snapshot(&mut cache, &dir, "bench-node")
        });
        time("count_changes", || {
            count_changes(&mut state.services, &snapshot.services);
            count_changes(&mut state.slices, &snapshot.slices);
        });
        let node = node_info("bench-node", snapshot.node.as_ref(), &[]);
        let translation = time("translate", || {
            translate(&snapshot.services, &snapshot.slices, &node)
        });
        let (fitted, _) = time("fit", || {
            capacity::fit(&programmed, &translation.state, &Capacity::from(&sizes))
        });
        let ops = time("plan", || plan(&programmed, &fitted).expect("plan"));
        time("stale_affinity+departed", || {
            crate::sync::stale_affinity(&programmed, &fitted);
            crate::sync::departed(&programmed, &fitted, |_, _| true)
        });
        time("apply", || ops.iter().for_each(|op| programmed.apply(op)));
        println!("{:>28}: {}", "ops", ops.len());
        time("drop snapshot", || drop(snapshot));
    }
    let _ = fs::remove_dir_all(&dir);
}
