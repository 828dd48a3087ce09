//! Privileged: the eBPF programs' logging (issue 5 item 4). Off by default; `ebpf-kube-proxy
//! bpf-log <off|error|debug>` flips the pinned switch map while the agent runs, and the
//! records reach the agent's log (target `ebpf`); `run --bpf-log-level` sets it at start.
//! The TCX half runs the north-south program with `BPF_PROG_TEST_RUN` and reads the ring
//! buffer directly: logging must not change a verdict or a byte.
//!
//! Absence is proven without sleeping: the programs' ring buffer is read in order, so once a
//! record written *after* some connections has reached the log, any record those
//! connections had written would be there too.

mod common;
#[allow(dead_code)] // the TCX half uses only part of the packet-test support
#[path = "support/prog_test_run.rs"]
mod prog_test_run;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{AGENT, Harness, answers, service, slice};
use prog_test_run::{
    Datapath, Frame, Frontend, Outcome, TC_ACT_SHOT, TCX_NEXT, hex, in_private_netns,
};
use proxy_common::{
    BACKEND_FLAG_LOCAL, LOG_LEVEL_DEBUG, LOG_LEVEL_ERROR, LOG_LEVEL_OFF, LogConfig, MAP_LOG,
    PROTO_TCP, SCOPE_INTERNAL, SVC_FLAG_DROP_EMPTY, SVC_FLAG_NODE_PORT,
};
use proxy_userspace::dataplane::{LogLevel, LogMessage, LogReader};

const ECONNREFUSED: i64 = 111;

/// `ebpf-kube-proxy --pin-path <pins> bpf-log [level]`, the real binary; its output.
fn bpf_log(h: &Harness, level: Option<&str>) -> String {
    let out = Command::new(AGENT)
        .arg("--pin-path")
        .arg(&h.pin_path)
        .arg("bpf-log")
        .args(level)
        .output()
        .expect("running ebpf-kube-proxy bpf-log");
    assert!(
        out.status.success(),
        "bpf-log {level:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ekp-peer <args>`; how many requests were answered (all must be).
fn served(h: &Harness, args: &[&str]) -> usize {
    answers(&h.client(args)).values().sum()
}

/// The agent's log lines that came from the programs.
fn ebpf_lines(h: &Harness) -> Vec<String> {
    h.agent_log()
        .lines()
        .filter(|l| l.contains(" ebpf: "))
        .map(String::from)
        .collect()
}

/// Waits until `n` program log lines contain `needle`; returns them.
fn wait_for_ebpf_lines(h: &Harness, needle: &str, n: usize) -> Vec<String> {
    wait_for_lines(h, needle, n, ebpf_lines)
}

/// Waits until the agent's log holds `n` lines containing `needle` (`n` runs of the agent
/// reached a point, for example), among the lines `select` picks.
fn wait_for_lines(
    h: &Harness,
    needle: &str,
    n: usize,
    select: fn(&Harness) -> Vec<String>,
) -> Vec<String> {
    // The harness's own bounded wait for the first one, then the same polling for the rest.
    h.wait_for_log(needle);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines: Vec<String> = select(h)
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} log lines contain {needle:?}; log:\n{}",
            lines.len(),
            h.agent_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the `n`th run of the agent has set up the datapath (the pinned maps list
/// the frontends before a restarted agent has loaded anything).
fn wait_for_run(h: &Harness, n: usize) {
    wait_for_lines(h, "datapath ready", n, |h| {
        h.agent_log().lines().map(String::from).collect()
    });
}

#[test]
fn socket_lb_logs_nothing_by_default_and_bpf_log_switches_it_at_run_time() {
    let mut h = Harness::new("bpflog", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[5353]);
    // web: the Service under test. marker: one backend, connected to after each phase as
    // the barrier that proves what the phase did not log. empty: no usable endpoint.
    h.write_manifest(
        "web.yaml",
        &service("web", "10.96.0.10", &[("http", 80, "TCP")]),
    );
    h.write_manifest(
        "web-eps.yaml",
        &slice(
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[("10.244.0.10", true), ("10.244.0.11", true)],
        ),
    );
    h.write_manifest(
        "marker.yaml",
        &service(
            "marker",
            "10.96.0.20",
            &[("http", 80, "TCP"), ("dns", 53, "UDP")],
        ),
    );
    h.write_manifest(
        "marker-eps.yaml",
        &slice(
            "marker-1",
            "marker",
            &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            &[("10.244.0.11", true)],
        ),
    );
    h.write_manifest(
        "empty.yaml",
        &service("empty", "10.96.0.30", &[("http", 80, "TCP")]),
    );
    h.start_agent();
    let web = ["10.244.0.10:8080", "10.244.0.11:8080"];
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&web));
    h.wait_for_frontend("10.96.0.20:80", "TCP", Some(&["10.244.0.11:8080"]));
    h.wait_for_frontend("10.96.0.30:80", "TCP", Some(&[]));
    assert_eq!(bpf_log(&h, None), "eBPF log level: off\n");

    // Off (the default): connections are served and nothing is logged.
    assert_eq!(served(&h, &["tcp", "10.96.0.10:80", "5"]), 5);
    assert_eq!(bpf_log(&h, Some("debug")), "eBPF log level: debug\n");
    let marker = "connect4: 10.96.0.20:80/TCP -> 10.244.0.11:8080";
    assert_eq!(served(&h, &["tcp", "10.96.0.20:80", "1"]), 1);
    wait_for_ebpf_lines(&h, marker, 1);
    let web_lines = |h: &Harness| -> Vec<String> {
        ebpf_lines(h)
            .into_iter()
            .filter(|l| l.contains("10.96.0.10:80/TCP"))
            .collect()
    };
    assert_eq!(
        web_lines(&h),
        Vec::<String>::new(),
        "connections made while logging was off were logged"
    );

    // Debug: one line per connection, naming the frontend and the backend it got, and
    // one per refusal; unconnected UDP through sendmsg4.
    let answered = answers(&h.client(&["tcp", "10.96.0.10:80", "6"]));
    let lines = wait_for_ebpf_lines(&h, "connect4: 10.96.0.10:80/TCP -> ", 6);
    assert_eq!(lines.len(), 6, "one line per connection: {lines:#?}");
    for line in &lines {
        assert!(
            web.iter()
                .any(|b| line.contains(&format!("-> {b} (backend "))),
            "the line names one of the backends: {line}"
        );
    }
    for (pod, backend) in [("pod-a", web[0]), ("pod-b", web[1])] {
        let logged = lines.iter().filter(|l| l.contains(backend)).count();
        assert_eq!(
            logged,
            answered.get(pod).copied().unwrap_or(0),
            "{backend}: the log agrees with who answered {answered:?}"
        );
    }
    for line in h.client(&["tcp", "10.96.0.30:80", "1"]) {
        assert_eq!(line["errno"], ECONNREFUSED, "{line}");
    }
    wait_for_ebpf_lines(
        &h,
        "connect4: 10.96.0.30:80/TCP has no usable backend: failed with errno 111",
        1,
    );
    assert_eq!(served(&h, &["udp", "10.96.0.20:53", "1"]), 1);
    wait_for_ebpf_lines(&h, "sendmsg4: 10.96.0.20:53/UDP -> 10.244.0.11:5353", 1);

    // Off again: nothing more from web, proven by the marker logged after switching back.
    assert_eq!(bpf_log(&h, Some("off")), "eBPF log level: off\n");
    assert_eq!(served(&h, &["tcp", "10.96.0.10:80", "5"]), 5);
    bpf_log(&h, Some("debug"));
    assert_eq!(served(&h, &["tcp", "10.96.0.20:80", "1"]), 1);
    wait_for_ebpf_lines(&h, marker, 2);
    assert_eq!(web_lines(&h).len(), 6, "logged while switched off");

    // A restart applies `run --bpf-log-level` (default off) ...
    h.kill_agent();
    h.start_agent();
    wait_for_run(&h, 2);
    assert_eq!(bpf_log(&h, None), "eBPF log level: off\n");
    // ... and the programs swapped into the pinned links write to the new agent's buffer:
    // with the old agent gone, a line can only come from the new one.
    h.kill_agent();
    let manifests = h.manifests.clone();
    h.start_agent_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--bpf-log-level".as_ref(),
        "debug".as_ref(),
    ]);
    wait_for_run(&h, 3);
    assert_eq!(bpf_log(&h, None), "eBPF log level: debug\n");
    assert_eq!(served(&h, &["tcp", "10.96.0.20:80", "1"]), 1);
    wait_for_ebpf_lines(&h, marker, 3);
}

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 20);

/// The embedded object loaded for packet tests, with its log switch at `level`, and the
/// agent's reader on its ring buffer.
fn datapath_logging(level: u8) -> (Datapath, LogReader) {
    let mut dp = Datapath::load();
    let reader = LogReader::new(dp.ebpf_mut()).expect("the object carries its log ring buffer");
    let mut switch: aya::maps::Array<_, LogConfig> =
        aya::maps::Array::try_from(dp.ebpf_mut().map_mut(MAP_LOG).expect("the log switch"))
            .expect("an array");
    switch
        .set(
            0,
            LogConfig {
                level,
                _pad: [0; 7],
            },
            0,
        )
        .expect("setting the level");
    (dp, reader)
}

/// A TCP frontend without session affinity.
fn tcp_frontend(addr: Ipv4Addr, port: u16, rev_nat_id: u16, flags: u16) -> Frontend {
    Frontend {
        addr,
        port,
        proto: PROTO_TCP,
        rev_nat_id,
        flags,
        affinity_timeout: 0,
        affinity_id: 0,
    }
}

/// Runs the TCX cases with the given log level; the outcomes and the records logged.
fn tcx_cases(level: u8) -> (Vec<Outcome>, Vec<LogMessage>) {
    let (mut dp, mut reader) = datapath_logging(level);
    dp.backend(1, LOCAL_POD, 8080, PROTO_TCP, BACKEND_FLAG_LOCAL);
    dp.backend(2, REMOTE_POD, 8080, PROTO_TCP, 0);
    let node_port =
        |port, rev_nat_id, flags| tcp_frontend(NODE, port, rev_nat_id, SVC_FLAG_NODE_PORT | flags);
    dp.frontend(node_port(30081, 1, 0), &[1]);
    dp.frontend(node_port(30082, 2, 0), &[2]);
    dp.frontend(node_port(30083, 3, SVC_FLAG_DROP_EMPTY), &[]);
    // One SNAT port: the second remote flow finds none free.
    dp.snat(NODE, 61000, 61000);
    let outcomes = [
        Frame::tcp(CLIENT, 40000, NODE, 30081),
        Frame::tcp(CLIENT, 40000, NODE, 30082),
        Frame::tcp(OTHER_CLIENT, 40000, NODE, 30082),
        Frame::tcp(CLIENT, 40000, NODE, 30083),
    ]
    .iter()
    .map(|f| dp.ingress(&f.bytes()))
    .collect();
    (outcomes, reader.read())
}

#[test]
fn tcx_logging_names_new_flows_and_drops_and_changes_no_verdict_or_byte() {
    in_private_netns(|| {
        let (quiet, none) = tcx_cases(LOG_LEVEL_OFF);
        assert_eq!(none, Vec::new(), "logging is off");
        let (_, errors) = tcx_cases(LOG_LEVEL_ERROR);
        assert_eq!(
            errors.iter().map(|r| r.level).collect::<Vec<_>>(),
            [LogLevel::Error],
            "at the error level only the SNAT exhaustion is logged: {errors:?}"
        );
        let (logged, records) = tcx_cases(LOG_LEVEL_DEBUG);
        let verdicts: Vec<i32> = quiet.iter().map(|o| o.verdict).collect();
        assert_eq!(verdicts, [TCX_NEXT, TCX_NEXT, TC_ACT_SHOT, TC_ACT_SHOT]);
        for (i, (q, l)) in quiet.iter().zip(&logged).enumerate() {
            assert_eq!(q.verdict, l.verdict, "case {i}: verdict");
            assert!(
                q.packet == l.packet,
                "case {i}: bytes differ\n off:\n{}\n debug:\n{}",
                hex(&q.packet),
                hex(&l.packet)
            );
        }
        use LogLevel::{Debug, Error};
        let message = |level, text: &str| LogMessage {
            level,
            text: text.to_owned(),
        };
        assert_eq!(
            records,
            vec![
                message(
                    Debug,
                    "tcx_in: new flow 198.51.100.7:40000 -> 192.0.2.1:30081/TCP => \
                     198.51.100.7:40000 -> 10.244.1.10:8080 (backend 1)"
                ),
                message(
                    Debug,
                    "tcx_in: new flow 198.51.100.7:40000 -> 192.0.2.1:30082/TCP => \
                     192.0.2.1:61000 -> 10.244.2.20:8080 (backend 2)"
                ),
                message(
                    Error,
                    "tcx_in: 198.51.100.8:40000 -> 192.0.2.1:30082/TCP: no free source port, \
                     new flow dropped"
                ),
                message(
                    Debug,
                    "tcx_in: 198.51.100.7:40000 -> 192.0.2.1:30083/TCP has no usable backend: \
                     dropped"
                ),
            ]
        );
    });
}

/// The pod programs (host-namespace-only socket LB) share `ekp_tcx_in`'s code; their
/// records name them.
#[test]
fn pod_in_records_name_pod_in() {
    in_private_netns(|| {
        let (mut dp, mut reader) = datapath_logging(LOG_LEVEL_DEBUG);
        let cluster_ip = Ipv4Addr::new(10, 96, 0, 10);
        let client_pod = Ipv4Addr::new(10, 244, 1, 20);
        dp.backend(1, LOCAL_POD, 8080, PROTO_TCP, BACKEND_FLAG_LOCAL);
        dp.frontend_in(SCOPE_INTERNAL, tcp_frontend(cluster_ip, 80, 1, 0), &[1]);
        let out = dp.run(
            "ekp_pod_in",
            &Frame::tcp(client_pod, 40000, cluster_ip, 80).bytes(),
            0,
        );
        assert_eq!(out.verdict, TCX_NEXT);
        assert_eq!(
            prog_test_run::tuple_of(&out.packet),
            (client_pod, 40000, LOCAL_POD, 8080),
            "translated"
        );
        assert_eq!(
            reader.read(),
            vec![LogMessage {
                level: LogLevel::Debug,
                text: "pod_in: new flow 10.244.1.20:40000 -> 10.96.0.10:80/TCP => \
                       10.244.1.20:40000 -> 10.244.1.10:8080 (backend 1)"
                    .to_owned()
            }]
        );
    });
}

/// Nobody reads the buffer (an agent between a crash and its restart): once it is full the
/// programs' records are dropped, and every packet is still translated.
#[test]
fn a_full_log_buffer_drops_records_and_nothing_else() {
    in_private_netns(|| {
        let (mut dp, mut reader) = datapath_logging(LOG_LEVEL_DEBUG);
        dp.backend(1, LOCAL_POD, 8080, PROTO_TCP, BACKEND_FLAG_LOCAL);
        dp.frontend(tcp_frontend(NODE, 30081, 1, SVC_FLAG_NODE_PORT), &[1]);
        // Each new flow logs one record of 48 bytes with the ring buffer's header; 128 KiB
        // hold 2730.
        let flows: u16 = 4000;
        for port in 0..flows {
            let out = dp.ingress(&Frame::tcp(CLIENT, 20000 + port, NODE, 30081).bytes());
            assert_eq!(out.verdict, TCX_NEXT, "flow {port}");
            let (_, _, daddr, dport) = prog_test_run::tuple_of(&out.packet);
            assert_eq!(
                (daddr, dport),
                (LOCAL_POD, 8080),
                "flow {port} is translated"
            );
        }
        let logged = reader.read().len();
        assert!(
            logged > 0 && logged < usize::from(flows),
            "{logged} of {flows} records: the full buffer must have dropped some"
        );
    });
}
