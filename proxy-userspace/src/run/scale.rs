//! Where a sync's time goes at the benchmark's scale (issue 6): the phases of `sync_once`
//! without the maps, over the bench's manifests (N ClusterIP Services, two endpoints each).
//! Ignored by default; run in release mode:
//! `cargo test --release -p proxy-userspace --lib scale -- --ignored --nocapture`.

use std::fs;
use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use super::*;
use crate::sync::touched::{self, BackendIndex};
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
    // Idle time before each change (the bench waits 1.2 s between changes).
    let idle_ms: u64 = std::env::var("EKP_SCALE_IDLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
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

    let capacity = Capacity::from(&MapSizes::default());
    let mut cache = manifests::Cache::default();
    let mut translation = Incremental::default();
    let mut programmed = Programmed::default();
    let mut index = BackendIndex::default();
    for round in 0..6 {
        println!("round {round}");
        if round > 0 {
            std::thread::sleep(std::time::Duration::from_millis(idle_ms));
            write(&dir, "measured.json", &slice(n - 1, 1 + round as u32));
        }
        let started = Instant::now();
        // As the agent: everything first, then what changed.
        let changes = if round == 0 {
            let snapshot = time("snapshot", || {
                manifests::snapshot(&mut cache, &dir, "bench-node")
            });
            let node = node_info(
                "bench-node",
                snapshot.node.as_deref(),
                &NodePortAddresses::All,
                &[],
            );
            time("translate (whole)", || {
                translation.update(&snapshot.services, &snapshot.slices, &node)
            })
        } else {
            let delta = time("delta", || {
                cache.delta(&dir, "bench-node").expect("patched")
            });
            let node = node_info(
                "bench-node",
                delta.node.as_deref(),
                &NodePortAddresses::All,
                &[],
            );
            time("translate (delta)", || translation.apply(&delta, &node))
        };
        let desired = translation.state();
        let ops = if changes.all {
            let (fitted, _) = time("fit", || capacity::fit(&programmed, desired, &capacity));
            time("plan", || plan(&programmed, &fitted).expect("plan"))
        } else {
            let touched = Touched {
                frontends: &changes.frontends,
                local_backends: &changes.local_backends,
            };
            // The agent keeps this count as it writes.
            let entries = crate::sync::service_entries(&programmed);
            let fits = time("fits_whole", || {
                capacity::fits_whole(
                    &programmed,
                    entries,
                    desired,
                    touched.frontends,
                    |b| index.id(b).is_some(),
                    &capacity,
                )
            });
            assert!(fits);
            time("plan (touched)", || {
                touched::plan(&programmed, &index, desired, touched).expect("plan")
            })
        };
        time("apply", || {
            for op in &ops {
                index.apply(&programmed, op);
                programmed.apply(op);
            }
        });
        println!(
            "{:>28}: {:8.2} ms, {} ops",
            "sync",
            started.elapsed().as_secs_f64() * 1e3,
            ops.len()
        );
    }
    let _ = fs::remove_dir_all(&dir);
}
