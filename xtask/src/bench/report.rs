//! Results as JSON (the source of truth), and the markdown table drawn from it.

use std::fmt::Write;
use std::time::Duration;

use serde_json::{Value, json};

use super::Metric;
use super::runner::{Latency, PointResult, Settings};

/// Nearest-rank percentile of unsorted samples, in µs.
pub fn percentile(samples_ns: &[u64], p: f64) -> f64 {
    if samples_ns.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples_ns.to_vec();
    sorted.sort_unstable();
    percentile_sorted(&sorted, p)
}

fn percentile_sorted(sorted: &[u64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn round(x: f64, digits: i32) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    let f = 10f64.powi(digits);
    json!((x * f).round() / f)
}

fn latency_json(l: &Latency) -> Value {
    let mut sorted = l.samples_ns.clone();
    sorted.sort_unstable();
    let (p50, p90, p99, mean) = if sorted.is_empty() {
        (f64::NAN, f64::NAN, f64::NAN, f64::NAN)
    } else {
        (
            percentile_sorted(&sorted, 50.0),
            percentile_sorted(&sorted, 90.0),
            percentile_sorted(&sorted, 99.0),
            sorted.iter().sum::<u64>() as f64 / sorted.len() as f64 / 1000.0,
        )
    };
    json!({
        "samples": sorted.len(),
        "errors": l.errors,
        "first_error": l.first_error,
        "syn_retransmits": l.syn_retransmits,
        // To 10 ns: the ratios and gaps are computed from these, and 0.1 µs would be 1.7 %
        // of a 6 µs request/response, near the 2 % they are compared with.
        "p50_us": round(p50, 2),
        "p90_us": round(p90, 2),
        "p99_us": round(p99, 2),
        "mean_us": round(mean, 2),
        "round_p50_us": l.round_p50_us.iter().map(|x| round(*x, 2)).collect::<Vec<_>>(),
        "rate_per_s": round(if l.busy_s > 0.0 { sorted.len() as f64 / l.busy_s } else { f64::NAN }, 0),
    })
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

pub fn to_json(
    points: &[PointResult],
    settings: &Settings,
    budget: Option<Duration>,
    machine: Value,
    profile: &str,
    quick: bool,
) -> Value {
    let points: Vec<Value> = points
        .iter()
        .map(|point| {
            let mut modes = serde_json::Map::new();
            for (mode, r) in &point.modes {
                let mut m = serde_json::Map::new();
                for (metric, l) in &r.latency {
                    m.insert(metric.name().into(), latency_json(l));
                }
                m.insert(
                    "programming_ms".into(),
                    r.programming_ms.map_or(Value::Null, |x| round(x, 2)),
                );
                m.insert(
                    "load_ms".into(),
                    r.load_ms.map_or(Value::Null, |x| round(x, 2)),
                );
                m.insert(
                    "endpoint_change_ms".into(),
                    json!(
                        r.endpoint_change_ms
                            .iter()
                            .map(|x| round(*x, 2))
                            .collect::<Vec<_>>()
                    ),
                );
                m.insert(
                    "endpoint_change_median_ms".into(),
                    round(median(&r.endpoint_change_ms), 2),
                );
                m.insert("agent_rss_kib".into(), json!(r.agent_rss_kib));
                m.insert(
                    "bpf_maps".into(),
                    r.bpf_maps.map_or(
                        Value::Null,
                        |(count, bytes)| json!({"count": count, "memlock_bytes": bytes}),
                    ),
                );
                m.insert(
                    "ruleset".into(),
                    r.ruleset.map_or(
                        Value::Null,
                        |(lines, bytes)| json!({"lines": lines, "bytes": bytes}),
                    ),
                );
                if !r.program_time.is_empty() {
                    let per_metric: serde_json::Map<String, Value> = r
                        .program_time
                        .iter()
                        .map(|(metric, time)| {
                            let programs: serde_json::Map<String, Value> = time
                                .programs
                                .iter()
                                .map(|(name, (runs, ns))| {
                                    (
                                        name.clone(),
                                        json!({"runs": runs, "ns_per_run": round(*ns, 0)}),
                                    )
                                })
                                .collect();
                            (
                                metric.name().to_owned(),
                                json!({
                                    "operations": time.operations,
                                    "us_per_operation": round(time.us_per_operation(), 3),
                                    "programs": programs,
                                }),
                            )
                        })
                        .collect();
                    m.insert("program_time".into(), Value::Object(per_metric));
                }
                modes.insert(mode.name().into(), Value::Object(m));
            }
            let modes = Value::Object(modes);
            json!({
                "services": point.services,
                "rounds": point.rounds,
                "ratios": ratios(&modes),
                "modes": modes,
            })
        })
        .collect();
    json!({
        "schema": 8,
        "generated_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "machine": machine,
        "settings": {
            "services": settings.services,
            "samples_per_metric_and_mode": settings.samples,
            "rounds": settings.rounds,
            "budget_s": budget.map(|b| b.as_secs()),
            "warmup_per_batch": settings.warmup,
            "ops_per_turn": super::lockstep::STEP_OPS,
            "endpoint_changes": settings.changes,
            "cpu": settings.cpu,
            "agent_build": profile,
            "quick": quick,
        },
        "points": points,
    })
}

/// The pairs of modes compared, numerator first.
const PAIRS: [(&str, &str); 7] = [
    ("ebpf", "direct"),
    ("ebpf", "hooks"),
    ("hooks", "direct"),
    ("ebpf", "iptables"),
    ("nftables", "direct"),
    ("nftables", "iptables"),
    ("iptables", "direct"),
];

/// Ratios of p50 and p99 latencies between modes (`<metric>_p50`, `<metric>_p99`), and of
/// each round's p50s (`<metric>_p50_rounds`: median, min, max over the rounds).
///
/// A round's batches of one metric run side by side, their clients taking turns (before
/// schema 8: one after the other), so a per-round ratio compares two modes under the same
/// machine conditions; their spread is how far a ratio of all samples can be trusted, e.g.
/// against a 2 % goal.
fn ratios(modes: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for metric in Metric::ALL {
        for p in ["p50_us", "p99_us"] {
            let get = |mode: &str| modes[mode][metric.name()][p].as_f64();
            let mut r = serde_json::Map::new();
            for (a, b) in PAIRS {
                if let (Some(x), Some(y)) = (get(a), get(b))
                    && y > 0.0
                {
                    r.insert(format!("{a}/{b}"), round(x / y, 3));
                }
            }
            out.insert(
                format!("{}_{}", metric.name(), p.trim_end_matches("_us")),
                Value::Object(r),
            );
        }
        // Round by round, a round without a p50 (a batch with no answer: null) kept in its
        // place, so that the pairs below are of one round.
        let rounds = |mode: &str| -> Vec<Option<f64>> {
            modes[mode][metric.name()]["round_p50_us"]
                .as_array()
                .map(|a| a.iter().map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        let mut r = serde_json::Map::new();
        for (a, b) in PAIRS {
            let (x, y) = (rounds(a), rounds(b));
            if x.len() != y.len() {
                continue;
            }
            let per_round: Vec<f64> = x
                .iter()
                .zip(&y)
                .filter_map(|(x, y)| Some((*x)?).zip(*y))
                .filter(|(_, y)| *y > 0.0)
                .map(|(x, y)| x / y)
                .collect();
            if per_round.is_empty() {
                continue;
            }
            let min = per_round.iter().copied().fold(f64::INFINITY, f64::min);
            let max = per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            r.insert(
                format!("{a}/{b}"),
                json!({
                    "median": round(median(&per_round), 3),
                    "min": round(min, 3),
                    "max": round(max, 3),
                    "rounds": per_round.len(),
                }),
            );
        }
        out.insert(format!("{}_p50_rounds", metric.name()), Value::Object(r));
    }
    Value::Object(out)
}

/// The per-round ratio cells: "median (min-max)".
fn round_ratio_table(md: &mut String, ratios: &Value) {
    const COLUMNS: [&str; 3] = ["ebpf/direct", "ebpf/hooks", "hooks/direct"];
    let count = Metric::ALL
        .iter()
        .find_map(|m| ratios[format!("{}_p50_rounds", m.name())]["ebpf/direct"]["rounds"].as_u64());
    let Some(count) = count else {
        return;
    };
    let _ = writeln!(
        md,
        "| p50 ratio per round: median (min-max) of {count} rounds | {} |",
        COLUMNS.join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|".repeat(COLUMNS.len()));
    for metric in Metric::ALL {
        let r = &ratios[format!("{}_p50_rounds", metric.name())];
        let cells: Vec<String> = COLUMNS
            .iter()
            .map(|k| {
                let c = &r[*k];
                if c.is_null() {
                    "n/a".to_owned()
                } else {
                    format!(
                        "{} ({}-{})",
                        num(&c["median"], 2),
                        num(&c["min"], 2),
                        num(&c["max"], 2)
                    )
                }
            })
            .collect();
        let _ = writeln!(md, "| {} | {} |", metric.name(), cells.join(" | "));
    }
    let _ = writeln!(md);
}

fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "n/a".into(),
    }
}

fn pcts(v: &Value) -> String {
    if v.is_null() {
        return "n/a".into();
    }
    let errors = v["errors"].as_u64().unwrap_or(0);
    let mut s = format!(
        "{} / {} / {}",
        num(&v["p50_us"], 1),
        num(&v["p90_us"], 1),
        num(&v["p99_us"], 1)
    );
    if errors > 0 {
        let _ = write!(s, " ({errors} err)");
    }
    let resent = v["syn_retransmits"].as_u64().unwrap_or(0);
    if resent > 0 {
        let _ = write!(s, " ({resent} SYNs resent)");
    }
    s
}

pub const MODES: [&str; 5] = ["ebpf", "iptables", "nftables", "direct", "hooks"];

/// The machine line shown with every table.
pub fn machine_line(machine: &Value) -> String {
    let mut line = format!(
        "{}, {} cores, Linux {}; {}; {}",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["iptables"].as_str().unwrap_or("iptables ?"),
        machine["nft"].as_str().unwrap_or("nft ?"),
    );
    let idle = &machine["idle_memory"];
    if let (Some(after), Some(warm)) = (
        idle["idle_us_per_page"].as_f64(),
        idle["warm_us_per_page"].as_f64(),
    ) {
        let _ = write!(
            line,
            "; a 4 KiB page left alone for {} ms costs {after:.1} µs to touch again ({warm:.2} µs at once)",
            idle["idle_ms"]
        );
        if let Some(end) = machine["idle_memory_end"]["idle_us_per_page"].as_f64() {
            let _ = write!(line, " at the start, {end:.1} µs at the end");
        }
    }
    if machine["iptables_nfacct_counters"] == json!(false) {
        line.push_str("; kube-proxy's nfacct counters could not be created here, so the iptables rules go without them");
    }
    line
}

/// The results page: one table per N, then the ratios.
pub fn markdown(results: &Value) -> String {
    let mut md = String::new();
    let settings = &results["settings"];
    let _ = writeln!(md, "# ebpf-kube-proxy benchmark\n");
    let _ = writeln!(md, "Machine: {}.\n", machine_line(&results["machine"]));
    let _ = writeln!(
        md,
        "Settings: {} samples per latency metric and mode (request/response on one connection or one UDP socket: 2.5x), \
         in {} rounds{}, {} warm-up operations per batch excluded; {} endpoint changes per mode after the latency rounds, two uncounted ones (there and back) before them; \
         servers and clients {}; agent build `{}`{}. Produced by `cargo xtask bench`; method in `xtask/src/bench/mod.rs`.\n",
        settings["samples_per_metric_and_mode"],
        settings["rounds"],
        match settings["ops_per_turn"].as_u64() {
            Some(ops) =>
                format!(" (in each, every mode's client of a metric in turns of {ops} operations)"),
            None => " (in each, every mode's batch of a metric after the other)".to_owned(),
        },
        settings["warmup_per_batch"],
        settings["endpoint_changes"],
        match settings["cpu"].as_u64() {
            Some(cpu) => format!("on CPU {cpu}"),
            None => "on any CPU".to_owned(),
        },
        settings["agent_build"].as_str().unwrap_or("?"),
        if settings["quick"].as_bool() == Some(true) {
            " (--quick: too few samples for stable percentiles)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "Latencies in µs as p50 / p90 / p99. ClusterIP, from a process on the node: `ebpf`: \
         socket-level translation by this project; `iptables`, `nftables`: the rules kube-proxy \
         writes, DNAT at the client's OUTPUT hook; `direct`: the client connects to the pod \
         addresses (the floor; each connection to one of the measured Service's two endpoints \
         at random, as the Service's translation spreads them). TCP connect to a pod address, \
         no Service: the same client in every mode connects to the pod addresses, on a port no \
         Service exposes: what each \
         mode costs traffic that is not for a Service (its first packet still passes the \
         rules, which in `iptables` mode match the Services' addresses one after the other). \
         NodePort, from an external client through the node: `ebpf`: this \
         project's TCX programs on the node's device; `iptables`, `nftables`: the same rules, \
         DNAT at PREROUTING and masquerade (`externalTrafficPolicy: Cluster`); `direct`: the \
         external client connects to the pod addresses, routed by the node. `hooks`: as `direct`, \
         through programs that do nothing at every hook `ebpf` uses (the socket hooks on its \
         client's cgroup, TCX on its node's device): what the hooks cost on their own.\n"
    );
    for point in results["points"].as_array().into_iter().flatten() {
        let n = &point["services"];
        let m = &point["modes"];
        let _ = writeln!(md, "## {n} Services\n");
        if let (Some(done), Some(asked)) = (point["rounds"].as_u64(), settings["rounds"].as_u64())
            && done < asked
        {
            let _ = writeln!(
                md,
                "Latency measured in {done} of {asked} rounds: the run's time budget ({} s) ran out.\n",
                settings["budget_s"]
            );
        }
        let _ = writeln!(md, "| | {} |", MODES.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(MODES.len()));
        let row = |md: &mut String, label: &str, cell: &dyn Fn(&Value) -> String| {
            let cells: Vec<String> = MODES.iter().map(|mode| cell(&m[*mode])).collect();
            let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
        };
        for metric in Metric::ALL {
            row(&mut md, &format!("{} (µs)", metric.label()), &|v| {
                pcts(&v[metric.name()])
            });
        }
        row(&mut md, "new connections/s (one client)", &|v| {
            num(&v["crr"]["rate_per_s"], 0)
        });
        row(&mut md, "NodePort new connections/s (one client)", &|v| {
            num(&v["nodeport_crr"]["rate_per_s"], 0)
        });
        row(&mut md, "programming from empty (ms)", &|v| {
            let mut s = num(&v["programming_ms"], 1);
            if v["load_ms"].is_number() {
                let _ = write!(s, " (load {})", num(&v["load_ms"], 1));
            }
            s
        });
        row(&mut md, "one endpoint change (ms, median)", &|v| {
            num(&v["endpoint_change_median_ms"], 1)
        });
        row(
            &mut md,
            "controller RSS (MiB)",
            &|v| match v["agent_rss_kib"].as_f64() {
                Some(kib) => format!("{:.1}", kib / 1024.0),
                None => "n/a".into(),
            },
        );
        row(
            &mut md,
            "BPF maps memlock (MiB)",
            &|v| match v["bpf_maps"]["memlock_bytes"].as_f64() {
                Some(b) => format!("{:.1} ({} maps)", b / 1048576.0, v["bpf_maps"]["count"]),
                None => "n/a".into(),
            },
        );
        row(
            &mut md,
            "ruleset input (lines / KiB)",
            &|v| match v["ruleset"]["lines"].as_u64() {
                Some(lines) => format!(
                    "{lines} / {:.0}",
                    v["ruleset"]["bytes"].as_f64().unwrap_or(0.0) / 1024.0
                ),
                None => "n/a".into(),
            },
        );
        let _ = writeln!(md);
        program_table(&mut md, m);
        let r = &point["ratios"];
        let columns = [
            "ebpf/direct",
            "ebpf/hooks",
            "hooks/direct",
            "ebpf/iptables",
            "nftables/direct",
            "nftables/iptables",
            "iptables/direct",
        ];
        let _ = writeln!(md, "| ratio, p50 / p99 | {} |", columns.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(columns.len()));
        for metric in Metric::ALL {
            let cells: Vec<String> = columns
                .iter()
                .map(|k| {
                    format!(
                        "{} / {}",
                        num(&r[format!("{}_p50", metric.name())][*k], 2),
                        num(&r[format!("{}_p99", metric.name())][*k], 2)
                    )
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", metric.name(), cells.join(" | "));
        }
        let _ = writeln!(md);
        round_ratio_table(&mut md, r);
    }
    md.push_str(NOTES);
    md
}

/// The eBPF programs' time per operation of each metric, beside the gap it explains and the
/// part of that gap the hooks take on their own (`hooks` - `direct`).
fn program_table(md: &mut String, modes: &Value) {
    let time = &modes["ebpf"]["program_time"];
    if !time.is_object() {
        return;
    }
    let _ = writeln!(
        md,
        "| eBPF programs per operation (kernel BPF statistics) | µs | ebpf - direct at p50 (µs) | hooks - direct at p50 (µs) |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    for metric in Metric::ALL {
        let t = &time[metric.name()];
        let Some(operations) = t["operations"].as_f64().filter(|n| *n > 0.0) else {
            continue;
        };
        let programs: Vec<String> = t["programs"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, p)| {
                let runs = p["runs"].as_f64().unwrap_or(0.0);
                let name = name.trim_start_matches("ekp_");
                let ns = num(&p["ns_per_run"], 0);
                // A program that ran only around the batch (the one connect of `rr`, the one
                // close of `udp rr`) is counted, not shown as 0.00 per operation.
                if runs / operations < 0.05 {
                    let plural = if runs == 1.0 { "" } else { "s" };
                    format!("`{name}` {runs} run{plural} in all × {ns} ns")
                } else {
                    format!("`{name}` {:.2} × {ns} ns", runs / operations)
                }
            })
            .collect();
        let p50 = |mode: &str| modes[mode][metric.name()]["p50_us"].as_f64();
        let gap = |mode: &str| match (p50(mode), p50("direct")) {
            (Some(e), Some(d)) => format!("{:.2}", e - d),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            md,
            "| {}: {} | {} | {} | {} |",
            metric.label(),
            if programs.is_empty() {
                "none ran".to_owned()
            } else {
                programs.join(", ")
            },
            num(&t["us_per_operation"], 2),
            gap("ebpf"),
            gap("hooks")
        );
    }
    let _ = writeln!(md);
}

pub const NOTES: &str = "## How it is measured\n\n\
- Topology: network namespaces only (a node with a bridge, three pods running `ekp-bench serve`, one client namespace per mode), no default route, nothing leaves the machine. Every ClusterIP client runs in a cgroup of its own, as a pod's processes do. The `ebpf`, `direct` and `hooks` ClusterIP clients run in the same namespace (`ebpf`'s) and differ only in the programs attached to their cgroups; `iptables` and `nftables` have their own namespaces for their rules. Request/response on an established connection, where no program runs per operation, shows what is left of the difference between two modes alike: its `ebpf/direct` and `hooks/direct` ratios. `pod_connect` (TCP connect to a pod address, no Service) goes from each mode's ClusterIP client to a port of the pods' servers that no Service exposes (8083): in `iptables` mode its first packet walks `KUBE-SERVICES` to the end, in `nftables` mode it misses the verdict maps, in `ebpf` mode `connect4` finds no frontend; `direct` and `hooks` are as for the other metrics. Its own port, because the `iptables` and `nftables` clients' kernels give connections to the Service address a TCP timestamp offset other than those to the pod address: on the Service's target port, a SYN of one stream met the pod's TIME_WAIT socket of the other's connection with the same 4-tuple and was sent again.\n\
- NodePort: each mode's client namespace is also a node for an external client namespace joined to it by a veth pair (`ext0` on the node); the external client connects to the NodePort of the measured Service's `external` port on the node's `ext0` address. That port has a target port of its own on the pods: kube-proxy masquerades NodePort connections to the node's address, from which the node's own ClusterIP clients connect too, and the pods' servers close first and keep TIME_WAIT sockets; on one shared server port, one stream's SYNs met the other's TIME_WAIT sockets and were sent again. `ebpf`: the agent runs in that node namespace with `--devices ext0` (TCX programs; the endpoints are on this node, so no SNAT, the pods route the external subnet back through the node); `iptables`, `nftables`: the same ruleset as for ClusterIP, reached at PREROUTING (`KUBE-SERVICES`, every ClusterIP rule first, then `KUBE-NODEPORTS` -> `KUBE-EXT-*` with masquerade; nftables: the `service-nodeports` map); `direct`: the node routes the external client to the pod. Only the measured Service is of type NodePort. The `remote` rows: the measured Service's `remote` port, whose two endpoints are on another node (a namespace joined to each mode's node by a veth pair of its own, `rem0` on the node, holding both pods' addresses and one server), reached by its own NodePort: `ebpf` source-NATs to the node's `ext0` address and forwards past the node's stack (its TCX programs are on `rem0` too, where the replies come in); `iptables` and `nftables` masquerade as for the other NodePort; `direct` and `hooks`: the node routes the external client to the other node's pods.\n\
- N Services with 2 endpoints each; the measured Service is the last one (its TCP port is the last Service rule of `KUBE-SERVICES`, the worst case for iptables), the others point at addresses nobody serves. kube-proxy itself writes the Services in no fixed order (a Go map's, drawn again at every sync), so on a real node a Service's rule is on average halfway down `KUBE-SERVICES`; the iptables figures here are its worst case, as kube-proxy's own scale tests measure it.\n\
- Latency: `ekp-bench` measures in-process with the monotonic clock, one operation after the other from a single client; a new socket per operation except for `rr` (one TCP connection) and `udp rr` (one unconnected UDP socket, each datagram sent with `sendto` to the Service or, in `direct`, to the pod chosen for the socket: a Service keeps an unconnected socket's datagrams on one backend, as kube-proxy's conntrack keeps a UDP flow on one). Modes are interleaved in rounds: in each round every metric is measured in every mode, the modes' clients of the metric side by side, each started and warmed up, then handed a few operations in turn (`ops_per_turn` in `latest.json`; the order rotates from turn to turn, and the first client with the round and the metric), so that what slows the machine for a while (on a virtual machine, the host) slows every mode alike; results of schema 7 and before measured batch after batch instead. Each client's warm-up operations are excluded. Percentiles are nearest-rank over all samples; the tables show them to 0.1 µs, `latest.json` keeps them to 0.01 µs, and the ratios and gaps are computed from those.\n\
- Per-round ratios: each round has one batch of every metric in every mode, measured in turns, so the ratio of two modes' p50s in one round compares them under the same machine conditions. The last table under each N gives the median and the range of these per-round ratios: a ratio of all samples that differs from 1 by less than that range is at the measurement's resolution, and request/response on an established connection (`rr`, where no program runs per operation) shows the range two alike modes have.\n\
- Order at each N: programming from empty, two uncounted endpoint changes (there and back), the latency rounds, the statistics pass, the counted endpoint changes. A run has a time budget (`--budget`, 600 s by default, from the end of the build to the results written): after an N's first 3 rounds, a round starts only if it, the statistics pass and the counted endpoint changes after it (at the pace of that N's rounds so far, and each counted change as long as the longer of the two uncounted ones) end before this N's share of the budget does: what is left of it when the N starts, less 20 s (the time the run needs after its last N), divided equally among this N and those still to come, so that the rounds at small Ns leave the large ones time for their programming. Programming and endpoint changes are never cut short: they are what the modes cost. An N measured in fewer rounds says so above its table.\n\
- `(N SYNs resent)` beside a metric: the client's kernel sent a SYN again N times during the measured operations (`TCPSynRetrans` of its network namespace): the pod or the node did not answer the first, and that sample waited for the retransmission (several ms). In `iptables` and `nftables` NodePort runs this is masquerade at work: it picks a random source port, and a SYN that meets a pod's TIME_WAIT socket of an earlier connection from that port (with unrelated timestamps) is taken for a stray segment of that connection and not accepted; `ebpf` does not source-NAT traffic to local endpoints.\n\
- Programming from empty: `ebpf` from starting the agent (standalone manifests source, maps and programs created and attached: the socket programs to the clients' cgroup, the TCX programs to the node's `ext0` and `rem0`; first sync) until a new connection to the measured ClusterIP is answered; `iptables` from starting `iptables-restore --noflush` on empty tables (kube-proxy's full input plus its jumps from the built-in chains) until answered, `nftables` the same with `nft -f` of kube-proxy's first transaction. Rule generation is not included (kube-proxy builds the same text in Go), nor is what kube-proxy runs around its first restore (an `iptables` call per jump from a built-in chain, which the bench writes into the restore instead, and `iptables-save`) or its first transaction (`nft list` of chains and sets): the iptables and nftables figures are the kernel's load alone.\n\
- One endpoint change: the measured Service's second endpoint is swapped (pod-b <-> pod-c); time until a new connection is answered by the new pod (the prober waits 0.2 ms between tries, so as not to take the cores the change is programmed with; once the change is in, a try reaches the new pod or the Service's other endpoint, half the time each, so a figure runs on average one try, some 0.3 ms, past the moment the change took effect, in every mode alike). Each mode makes two uncounted changes first, there and back, before the latency rounds (the first change after programming from empty is each process's first of its kind); the counted ones come after the rounds. `ebpf`: the EndpointSlice manifest is rewritten (rename) and the agent re-reads its manifests directory, translates, diffs and writes the maps (it batches within `--min-sync-period` 1 s of its last sync, so each change starts more than 1 s after the previous one; it runs with `--sync-period 60m`, so that no periodic full re-sync, due every 30 s by default, holds a change up for the rest of its second); `iptables`: kube-proxy's partial sync (all of `KUBE-SERVICES`, the changed Service's chains) with `iptables-restore --noflush`; `nftables`: kube-proxy's partial transaction (the changed Service's chains rewritten, the new endpoint's hairpin elements added, the old one's deleted). kube-proxy's own bookkeeping around the restore (`iptables-save`, `nft list`) is not included, nor its deletion of the conntrack entries of UDP flows to the removed endpoint, which follows the restore and does not hold up a new connection.\n\
- Memory left alone: `ekp-bench idle-memory` (in the machine line) touches 256 scattered pages of its own memory at once and again after the pause between endpoint changes. On some virtual machines the second touch costs tens of µs per page; a process that wakes up for a change pays it for every page of code and data it touches (the agent, `iptables-restore` and `nft` alike), which sets a floor under one endpoint change whatever the number of Services.\n\
- iptables: the machine's `iptables-restore` (the backend is in the machine line; kube-proxy's image picks the host's backend the same way); `--iptables legacy|nft` chooses one. The text is the same either way. It is what kube-proxy's iptables mode writes since 1.31 (1.30 wrote it without the counters' rules), with its nfacct counters (`ct_state_invalid_dropped_pkts` on the conntrack-INVALID drop, `localhost_nps_accepted_pkts` on a rule for localhost NodePorts before each NodePort's rule), which the bench creates in the node as kube-proxy does at start; where they cannot be created, the machine line says so and the rules go without them, as kube-proxy's do.\n\
- nftables: kube-proxy's nftables mode as of 1.36 (its sources and the expected rules of its unit tests): filter base chains before DNAT at priority -110 and the others at 0, a service chain per port with one `dnat ip addr . port to numgen random mod N map` rule (no endpoint chains), hairpin traffic masqueraded through the `hairpin-connections` set, NodePorts on the node's primary IP through the `nodeport-ips` set (the mode's default `--nodeport-addresses primary`). Left out, being later than 1.36: a one-endpoint service's plain `dnat to` and the localhost NodePort objects.\n\
- eBPF program run time: after the latency rounds, one more batch of each metric in the `ebpf` mode runs with the kernel's BPF run-time statistics on (`BPF_ENABLE_STATS`, only for that pass: it adds two clock reads to every program run); the counters of the agent's program descriptors are read before and after each metric's batch. The table under each N gives, per metric, each program's runs per operation and nanoseconds per run, their sum per operation, and beside it the `ebpf` - `direct` gap at p50, to set it against, and the `hooks` - `direct` gap: what the hooks cost with programs that do nothing. It is the translation's own cost, without the latency percentiles' noise: `connect4` runs once per `connect()` of a process in the cgroup, `sock_release` once per socket closed there, `sendmsg4`/`recvmsg4` once per unconnected UDP send and receive, `tcx_in`/`tcx_out` once per packet through the node's `ext0`.\n\
- `hooks`: `ekp-bench hooks` loads programs of two instructions (return \"allow\" for the cgroup hooks, \"next\" for TCX) and attaches them with links where the agent attaches its own: `connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`, `connect6`, `recvmsg6`, `getpeername6` (which the clients' IPv4 sockets never enter) and `sock_release` on the `hooks` client's cgroup, TCX ingress and egress on its node's `ext0` and `rem0`. Its clients send to the pod addresses, as `direct`'s do, so nothing is translated: `hooks` - `direct` is what entering the hooks costs (for the socket hooks: finding the cgroup's programs, setting up their context and running them), which no program at these hooks can avoid, and `ebpf` - `hooks` is what this project's programs add to it.\n\
- Memory: the agent's VmRSS, and the `memlock` of every BPF map it holds (from /proc/<pid>/fdinfo; hash maps are preallocated, so this is their capacity, sized to the Services). kube-proxy itself is not run, so iptables/nftables have no controller figure; the size of their ruleset input is shown instead.\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile(&samples, 50.0), 50.0);
        assert_eq!(percentile(&samples, 99.0), 99.0);
        assert_eq!(percentile(&samples, 100.0), 100.0);
        assert_eq!(percentile(&[7000], 90.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn a_cell_names_its_errors_and_resent_syns() {
        let cell = json!({"p50_us": 20.04, "p90_us": 25.0, "p99_us": 9000.0, "errors": 1, "syn_retransmits": 130});
        assert_eq!(
            pcts(&cell),
            "20.0 / 25.0 / 9000.0 (1 err) (130 SYNs resent)"
        );
        let clean = json!({"p50_us": 20.0, "p90_us": 25.0, "p99_us": 40.0, "errors": 0, "syn_retransmits": 0});
        assert_eq!(pcts(&clean), "20.0 / 25.0 / 40.0");
        // Results written before the count existed.
        assert_eq!(
            pcts(&json!({"p50_us": 1.0, "p90_us": 2.0, "p99_us": 3.0})),
            "1.0 / 2.0 / 3.0"
        );
        assert_eq!(pcts(&Value::Null), "n/a");
    }

    #[test]
    fn the_machine_line_gives_the_memory_probe_at_both_ends_of_the_run() {
        let mut machine = json!({
            "cpu": "CPU", "cores": 2, "kernel": "6.18", "iptables": "iptables v1.8.9", "nft": "nftables v1.0.6",
            "idle_memory": {"idle_ms": 1200, "idle_us_per_page": 7.7, "warm_us_per_page": 0.01},
        });
        let start = machine_line(&machine);
        assert!(
            start.ends_with("costs 7.7 µs to touch again (0.01 µs at once)"),
            "{start}"
        );
        machine["idle_memory_end"] = json!({"idle_us_per_page": 0.1});
        assert_eq!(
            machine_line(&machine),
            format!("{start} at the start, 0.1 µs at the end")
        );
        machine["iptables_nfacct_counters"] = json!(false);
        assert!(machine_line(&machine).ends_with("so the iptables rules go without them"));
    }

    #[test]
    fn per_round_ratios_pair_each_rounds_p50s() {
        let modes = json!({
            "ebpf": {"connect": {"p50_us": 20.0, "round_p50_us": [20.0, 22.0, 21.0]}},
            "direct": {"connect": {"p50_us": 19.0, "round_p50_us": [19.0, 20.0, 21.0]}},
            // Rounds that do not pair up (a mode measured in fewer rounds): not compared.
            "hooks": {"connect": {"p50_us": 19.5, "round_p50_us": [19.5]}},
        });
        let r = ratios(&modes);
        let rounds = &r["connect_p50_rounds"];
        assert_eq!(
            rounds["ebpf/direct"],
            json!({"median": 1.053, "min": 1.0, "max": 1.1, "rounds": 3})
        );
        assert!(rounds["ebpf/hooks"].is_null());
        assert_eq!(r["connect_p50"]["ebpf/direct"], json!(1.053));
        let mut md = String::new();
        round_ratio_table(&mut md, &r);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(
            lines[0],
            "| p50 ratio per round: median (min-max) of 3 rounds | ebpf/direct | ebpf/hooks | hooks/direct |"
        );
        assert_eq!(lines[2], "| connect | 1.05 (1.00-1.10) | n/a | n/a |");
        // Results written before per-round p50s were kept: no table.
        let mut md = String::new();
        round_ratio_table(&mut md, &ratios(&json!({"ebpf": {}, "direct": {}})));
        assert!(md.is_empty());
    }

    /// A round in which a mode's batch had no answer has no p50 (null); the other rounds
    /// still pair with their own.
    #[test]
    fn a_round_without_a_p50_leaves_the_other_rounds_paired() {
        let modes = json!({
            "ebpf": {"connect": {"p50_us": 20.0, "round_p50_us": [20.0, null, 30.0]}},
            "direct": {"connect": {"p50_us": 19.0, "round_p50_us": [10.0, 20.0, null]}},
        });
        assert_eq!(
            ratios(&modes)["connect_p50_rounds"]["ebpf/direct"],
            json!({"median": 2.0, "min": 2.0, "max": 2.0, "rounds": 1})
        );
    }

    #[test]
    fn program_time_is_shown_per_operation_beside_the_gap() {
        let modes = json!({
            "ebpf": {
                "connect": {"p50_us": 17.25},
                "rr": {"p50_us": 6.0},
                "program_time": {
                    "connect": {"operations": 200, "us_per_operation": 0.6, "programs": {
                        "ekp_connect4": {"runs": 200, "ns_per_run": 500},
                        "ekp_sock_release": {"runs": 200, "ns_per_run": 100},
                    }},
                    "rr": {"operations": 500, "us_per_operation": 0.004, "programs": {
                        "ekp_connect4": {"runs": 1, "ns_per_run": 2000},
                    }},
                },
            },
            "direct": {"connect": {"p50_us": 16.5}, "rr": {"p50_us": 6.0}},
            "hooks": {"connect": {"p50_us": 16.75}},
        });
        let mut md = String::new();
        program_table(&mut md, &modes);
        let rows: Vec<&str> = md.lines().skip(2).filter(|l| !l.is_empty()).collect();
        assert_eq!(
            rows,
            [
                "| TCP connect: `connect4` 1.00 × 500 ns, `sock_release` 1.00 × 100 ns | 0.60 | 0.75 | 0.25 |",
                "| TCP request/response, established: `connect4` 1 run in all × 2000 ns | 0.00 | 0.00 | n/a |",
            ]
        );
        // Without a statistics pass (a kernel that cannot count), no table at all.
        let mut md = String::new();
        program_table(&mut md, &json!({"ebpf": {}, "direct": {}}));
        assert!(md.is_empty());
    }

    #[test]
    fn an_n_whose_rounds_the_budget_cut_says_so() {
        let results = json!({
            "settings": {"rounds": 10, "budget_s": 600},
            "points": [
                {"services": 1, "rounds": 10, "modes": {}},
                {"services": 10000, "rounds": 4, "modes": {}},
            ],
        });
        let md = markdown(&results);
        let notes: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with("Latency measured"))
            .collect();
        assert_eq!(
            notes,
            ["Latency measured in 4 of 10 rounds: the run's time budget (600 s) ran out."]
        );
        let cut = md.find(notes[0]).unwrap();
        assert!(md[..cut].contains("## 10000 Services"), "{md}");
    }

    #[test]
    fn the_settings_say_whether_the_modes_took_turns_or_batches() {
        let settings = |extra: Value| {
            let mut settings = json!({"rounds": 10, "warmup_per_batch": 50});
            if let Some(ops) = extra.as_u64() {
                settings["ops_per_turn"] = json!(ops);
            }
            let md = markdown(&json!({"settings": settings, "points": []}));
            md.lines()
                .find(|l| l.starts_with("Settings:"))
                .map(str::to_owned)
                .unwrap_or_default()
        };
        let turns = settings(json!(10));
        assert!(
            turns.contains(
                "in 10 rounds (in each, every mode's client of a metric in turns of 10 operations)"
            ),
            "{turns}"
        );
        let batches = settings(Value::Null);
        assert!(
            batches
                .contains("in 10 rounds (in each, every mode's batch of a metric after the other)"),
            "{batches}"
        );
    }
}
