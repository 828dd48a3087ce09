//! Privileged: `/healthz`, `/livez` and `/metrics` of a running agent (manifests source).

mod common;

use common::{Harness, answers, http_get as get, service, slice};

/// Service `web` (10.96.0.10:80) on pod-a, and the agent running with it programmed.
fn start_with_web(h: &mut Harness) {
    start_with_web_and(h, &[]);
}

/// [`start_with_web`], with `extra` arguments for the agent.
fn start_with_web_and(h: &mut Harness, extra: &[&str]) {
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
    let manifests = h.manifests.clone();
    let mut args: Vec<&std::ffi::OsStr> = vec!["--manifests".as_ref(), manifests.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    h.start_agent_with(&args);
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.10:8080"]));
}

/// kube-proxy's default: a taken healthz port (the kube-proxy being replaced may still
/// hold it) is logged and bound again every 5 s, and the datapath works meanwhile.
#[test]
fn a_taken_healthz_port_is_bound_once_free_and_the_datapath_works_meanwhile() {
    let mut h = Harness::new("bindretry", &["pod-a"]);
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let addr = squatter.local_addr().expect("its address").to_string();
    start_with_web_and(&mut h, &["--healthz-bind-address", &addr]);
    h.wait_for_log(&format!("binding the healthz server to {addr} failed"));
    let _servers = h.serve(&[8080], &[]);
    let answered = answers(&h.client(&["tcp", "10.96.0.10:80", "20"]));
    assert_eq!(answered.get("pod-a"), Some(&20), "{answered:?}");

    drop(squatter);
    h.wait_for_log(&format!("serving healthz on http://{addr}"));
    let (code, body) = get(&addr, "/livez");
    assert_eq!(code, 200, "{body}");
}

/// `--bind-address-hard-fail`: a taken port stops the agent with an error naming it.
#[test]
fn with_bind_address_hard_fail_a_taken_metrics_port_stops_the_agent() {
    let mut h = Harness::new("bindfail", &["pod-a"]);
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let addr = squatter.local_addr().expect("its address").to_string();
    let manifests = h.manifests.clone();
    h.start_agent_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--metrics-bind-address".as_ref(),
        addr.as_ref(),
        "--bind-address-hard-fail".as_ref(),
    ]);
    let status = h.wait_for_agent_exit();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the agent did not fail ({status:?}); log:\n{}",
        h.agent_log()
    );
    assert!(
        h.agent_log()
            .contains(&format!("binding the metrics server to {addr}")),
        "{}",
        h.agent_log()
    );
}

#[test]
fn c30_healthz_and_livez_are_200_once_synced_and_metrics_use_kube_proxy_names() {
    let mut h = Harness::new("http", &["pod-a"]);
    start_with_web(&mut h);

    let healthz = h.served_address("healthz");
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
    let (code, body) = get(&healthz, "/readyz");
    assert_eq!(code, 200, "synced: ready: {body}");

    let metrics = h.served_address("metrics");
    let (code, text) = get(&metrics, "/metrics");
    assert_eq!(code, 200);
    for line in [
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
        "kubeproxy_sync_proxy_rules_service_changes_total 1",
        "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
        "ebpf_kube_proxy_map_entries{map=\"ekp_backend_v2\"} 1",
        "ebpf_kube_proxy_map_entries{map=\"ekp_svc_v1\"} 2",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert!(
        text.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} ")
    );
}

/// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds` of a scrape.
fn last_queued(metrics_addr: &str) -> String {
    let (_, text) = get(metrics_addr, "/metrics");
    text.lines()
        .find(|l| {
            l.starts_with(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"} ",
            )
        })
        .unwrap_or_else(|| panic!("no last-queued metric in:\n{text}"))
        .to_owned()
}

#[test]
fn an_idle_agent_queues_no_sync_and_an_edit_queues_one() {
    let mut h = Harness::new("idle", &["pod-a"]);
    start_with_web_and(&mut h, &["--sync-period", "500ms"]);
    let metrics = h.served_address("metrics");
    let before = last_queued(&metrics);
    // Nothing changes for 15 minimum sync periods, in which the agent reads the directory
    // again at three periodic syncs: neither is a queued update, as in kube-proxy.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(last_queued(&metrics), before, "an idle agent queued a sync");
    h.write_manifest(
        "eps.yaml",
        &slice(
            "web-1",
            "web",
            &[("http", 8081, "TCP")],
            &[("10.244.0.10", true)],
        ),
    );
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.10:8081"]));
    assert_ne!(last_queued(&metrics), before, "the edit was not queued");
    // The start diffed everything; the edit only what changed: each in its histogram.
    for kind in ["full", "partial"] {
        let count = format!("kubeproxy_sync_{kind}_proxy_rules_duration_seconds_count");
        wait_for_sample(&metrics, &format!("{count}{{ip_family=\"IPv4\"}} "), 1.0);
    }
}

/// Changes that come more often than `--sync-period` do not put the periodic full sync off:
/// one runs while they keep coming, as kube-proxy's full sync runs by the time since the
/// last one.
#[test]
fn a_full_sync_runs_every_sync_period_while_changes_keep_coming() {
    let mut h = Harness::new("fullsync", &["pod-a"]);
    start_with_web_and(&mut h, &["--sync-period", "2s"]);
    let metrics = h.served_address("metrics");
    let full_syncs = || {
        let count = "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} ";
        sample(&metrics, count).unwrap_or(0.0)
    };
    let at_start = full_syncs();
    // A change every 200 ms, each well within the 2 s a sync waits for the next idle
    // full one; the agent batches them at its 100 ms minimum period. 30 of them are 6 s:
    // three sync periods.
    for i in 0..30u16 {
        if full_syncs() > at_start {
            return;
        }
        h.write_manifest(
            "eps.yaml",
            &slice(
                "web-1",
                "web",
                &[("http", 8080 + i % 2, "TCP")],
                &[("10.244.0.10", true)],
            ),
        );
        // The pace of the changes, which is what this test is about.
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!(
        "no full sync in 6 s of changes every 200 ms with --sync-period 2s; log:\n{}",
        h.agent_log()
    );
}

/// The value of the scraped sample whose line starts with `prefix`.
fn sample(metrics_addr: &str, prefix: &str) -> Option<f64> {
    let (_, text) = get(metrics_addr, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// Waits until the scraped sample whose line starts with `prefix` is at least `least`.
fn wait_for_sample(metrics_addr: &str, prefix: &str, least: f64) {
    let deadline = std::time::Instant::now() + common::CONDITION_LIMIT;
    loop {
        let value = sample(metrics_addr, prefix);
        if value.is_some_and(|v| v >= least) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{prefix} never reached {least}: {value:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The conntrack collector runs in the agent and reports each pass on `/metrics`.
#[test]
fn the_conntrack_collectors_passes_show_on_metrics() {
    let mut h = Harness::new("ctgc", &["pod-a"]);
    start_with_web_and(&mut h, &["--conntrack-gc-interval", "200ms"]);
    let metrics = h.served_address("metrics");
    let passes = || sample(&metrics, "ebpf_kube_proxy_conntrack_gc_runs_total ").unwrap_or(0.0);
    let deadline = std::time::Instant::now() + common::CONDITION_LIMIT;
    while passes() < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no two collector passes within {:?}; log:\n{}",
            common::CONDITION_LIMIT,
            h.agent_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (_, text) = get(&metrics, "/metrics");
    assert!(
        text.contains("ebpf_kube_proxy_conntrack_entries 0"),
        "no flow, no entry:\n{text}"
    );
}
