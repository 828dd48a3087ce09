//! Privileged: the real binary against the API stand-in (tests/support/apiserver.rs) through
//! a kubeconfig, with real traffic in network namespaces. No kube-apiserver can be installed
//! on our machines; the stand-in speaks its list/watch protocol (see its module docs).

mod common;
mod support;

use common::{Harness, answers};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use support::apiserver::{ApiResource, ApiServer, Options};

const NS: &str = "default";

fn service(name: &str, cluster_ip: &str, labels: serde_json::Value) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    }))
    .expect("a valid Service")
}

fn slice(name: &str, service: &str, ready: &[&str]) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = ready
        .iter()
        .map(|a| serde_json::json!({"addresses": [a], "conditions": {"ready": true}, "nodeName": "node-1"}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .expect("a valid EndpointSlice")
}

/// The stand-in, a client for it, and the agent started on its kubeconfig.
async fn agent_on_apiserver(h: &mut Harness) -> (ApiServer, kube::Client) {
    agent_on_apiserver_with(h, &[]).await
}

/// [`agent_on_apiserver`], with `extra` arguments for the agent.
async fn agent_on_apiserver_with(h: &mut Harness, extra: &[&str]) -> (ApiServer, kube::Client) {
    let server = ApiServer::start().await.expect("starting the API stand-in");
    let client = server.client().await;
    // Inside the harness's temporary directory, which it removes.
    let kubeconfig = h.manifests.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).expect("writing the kubeconfig");
    let mut args: Vec<&std::ffi::OsStr> = vec!["--kubeconfig".as_ref(), kubeconfig.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    h.start_agent_with(&args);
    (server, client)
}

/// Creates Service `web` (10.96.0.10:80) with slice `web-1` on pod-a, and waits until the
/// agent programs it.
async fn create_web_on_pod_a(
    h: &mut Harness,
    client: &kube::Client,
) -> (Api<Service>, Api<EndpointSlice>) {
    create_web_on_pod_a_within(h, client, common::CONDITION_LIMIT).await
}

/// [`create_web_on_pod_a`], waiting up to `limit`.
async fn create_web_on_pod_a_within(
    h: &mut Harness,
    client: &kube::Client,
    limit: std::time::Duration,
) -> (Api<Service>, Api<EndpointSlice>) {
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let pp = PostParams::default();
    services
        .create(&pp, &service("web", "10.96.0.10", serde_json::json!({})))
        .await
        .expect("create svc");
    slices
        .create(&pp, &slice("web-1", "web", &["10.244.0.10"]))
        .await
        .expect("create slice");
    h.wait_for_frontend_within(limit, "10.96.0.10:80", "TCP", Some(&["10.244.0.10:8080"]));
    (services, slices)
}

async fn replace_slice(api: &Api<EndpointSlice>, name: &str, wanted: EndpointSlice) {
    let mut wanted = wanted;
    let current = api.get(name).await.expect("get slice");
    wanted.metadata.resource_version = current.metadata.resource_version;
    api.replace(name, &PostParams::default(), &wanted)
        .await
        .expect("replace slice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c26_services_and_slices_from_the_api_program_the_vip_and_follow_scaling() {
    let mut h = Harness::new("kube", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    let (server, client) = agent_on_apiserver(&mut h).await;
    let (services, slices) = create_web_on_pod_a(&mut h, &client).await;
    assert_eq!(
        answers(&h.client(&["tcp", "10.96.0.10:80", "10"])).get("pod-a"),
        Some(&10)
    );
    // Its API requests are counted as client-go counts them: the three lists at least.
    let host = server.address().to_string();
    let answered = labelled(
        &h,
        "rest_client_requests_total",
        &[("code", "200"), ("host", &host), ("method", "GET")],
    );
    assert!(answered >= 3.0, "{answered} requests answered");

    // Scale up: both pods.
    replace_slice(
        &slices,
        "web-1",
        slice("web-1", "web", &["10.244.0.10", "10.244.0.11"]),
    )
    .await;
    h.wait_for_frontend(
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    assert_eq!(
        answers(&h.client(&["tcp", "10.96.0.10:80", "100"])).len(),
        2
    );

    // Scale down to pod-b only.
    replace_slice(&slices, "web-1", slice("web-1", "web", &["10.244.0.11"])).await;
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&["10.244.0.11:8080"]));
    let only_b = answers(&h.client(&["tcp", "10.96.0.10:80", "20"]));
    assert_eq!(only_b.keys().collect::<Vec<_>>(), ["pod-b"]);

    // Delete the Service: no frontend any more.
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete svc");
    h.wait_for_frontend("10.96.0.10:80", "TCP", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_relist_converges_without_a_moment_where_the_vip_stops_working() {
    let mut h = Harness::new("relist", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    let (server, client) = agent_on_apiserver(&mut h).await;
    let (_services, slices) = create_web_on_pod_a(&mut h, &client).await;

    // A client keeps connecting through the re-list.
    let client_run = h.spawn_client("tcp", &["tcp", "10.96.0.10:80", "1500", "--every-ms", "1"]);
    let lists_before = server.list_requests(ApiResource::EndpointSlices);
    server.compact();
    // A change made after the compaction must arrive through the re-listed watch.
    replace_slice(
        &slices,
        "web-1",
        slice("web-1", "web", &["10.244.0.10", "10.244.0.11"]),
    )
    .await;
    h.wait_for_frontend(
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    assert!(
        server.list_requests(ApiResource::EndpointSlices) > lists_before,
        "the agent's watcher never re-listed after the 410"
    );

    let lines = client_run.lines();
    let failed: Vec<_> = lines.iter().filter(|l| l["ok"] != true).collect();
    assert!(
        failed.is_empty(),
        "{} connections failed during the re-list, e.g. {}",
        failed.len(),
        failed[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c25_service_proxy_name_label_hides_the_service_until_removed() {
    let mut h = Harness::new("proxyname", &["pod-a"]);
    let _servers = h.serve(&[8080], &[]);
    let (_server, client) = agent_on_apiserver(&mut h).await;
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client, NS);
    let pp = PostParams::default();
    let labelled = service(
        "other",
        "10.96.0.30",
        serde_json::json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
    );
    services.create(&pp, &labelled).await.expect("create svc");
    slices
        .create(&pp, &slice("other-1", "other", &["10.244.0.10"]))
        .await
        .expect("create slice");
    // A second, unlabelled Service proves the agent has synced everything it was sent.
    services
        .create(&pp, &service("marker", "10.96.0.31", serde_json::json!({})))
        .await
        .expect("create marker");
    slices
        .create(&pp, &slice("marker-1", "marker", &["10.244.0.10"]))
        .await
        .expect("create marker slice");
    h.wait_for_frontend("10.96.0.31:80", "TCP", Some(&["10.244.0.10:8080"]));
    let listed = h.list().expect("list");
    assert!(
        !listed.iter().any(|f| f["frontend"] == "10.96.0.30:80"),
        "a Service of another proxy must not be programmed: {listed:?}"
    );

    // Label removed: now it is ours.
    let mut unlabelled = services.get("other").await.expect("get");
    unlabelled.metadata.labels = None;
    services
        .replace("other", &pp, &unlabelled)
        .await
        .expect("replace");
    h.wait_for_frontend("10.96.0.30:80", "TCP", Some(&["10.244.0.10:8080"]));
    assert_eq!(
        answers(&h.client(&["tcp", "10.96.0.30:80", "5"])).get("pod-a"),
        Some(&5)
    );
}

/// One sample of a scraped metric (unlabelled), parsed as Prometheus text.
fn metric(h: &Harness, name: &str) -> f64 {
    labelled(h, name, &[])
}

/// The sample of a scraped metric with exactly `labels`.
fn labelled(h: &Harness, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (code, text) = common::http_get(&h.served_address("metrics"), "/metrics");
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{text}"));
    let sample = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .unwrap_or_else(|| panic!("{name} {labels:?} missing from /metrics:\n{text}"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name} has an unexpected type: {other:?}"),
    }
}

/// kube-proxy's `_changes_pending` gauges: what the watchers saw change and no sync has
/// applied yet, each changed Service once (not a headless one, which kube-proxy does not
/// track) and each EndpointSlice update (here two slices of one Service, one of them
/// written twice), back to 0 once a sync takes them; and its `_changes_total` counters,
/// one per event, before any sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_seen_and_not_yet_synced_show_as_pending() {
    let mut h = Harness::new("pending", &["pod-a", "pod-b"]);
    // Changes that follow a sync wait for the rest of this period: long enough to scrape
    // them pending.
    let (_server, client) = agent_on_apiserver_with(&mut h, &["--min-sync-period", "15s"]).await;
    // The sync after the first may wait out the period.
    let limit = std::time::Duration::from_secs(40);
    let (services, slices) = create_web_on_pod_a_within(&mut h, &client, limit).await;
    let pp = PostParams::default();
    let pending = |h: &Harness| {
        (
            metric(h, "kubeproxy_sync_proxy_rules_service_changes_pending"),
            metric(h, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
        )
    };
    // An event recorded just after the sync that read its object stays pending until the
    // next one.
    let until = |h: &Harness, want: (f64, f64), within: std::time::Duration| {
        let deadline = std::time::Instant::now() + within;
        while pending(h) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "pending (Services, endpoint changes) stayed {:?}, not {want:?}",
                pending(h)
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    until(&h, (0.0, 0.0), limit);
    let totals = |h: &Harness| {
        (
            metric(h, "kubeproxy_sync_proxy_rules_service_changes_total"),
            metric(h, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
        )
    };
    let before = totals(&h);

    services
        .create(&pp, &service("api", "10.96.0.20", serde_json::json!({})))
        .await
        .expect("create svc");
    services
        .create(&pp, &service("headless", "None", serde_json::json!({})))
        .await
        .expect("create svc");
    replace_slice(&slices, "web-1", slice("web-1", "web", &["10.244.0.11"])).await;
    slices
        .create(&pp, &slice("web-2", "web", &["10.244.0.10"]))
        .await
        .expect("create slice");
    services
        .create(&pp, &service("db", "10.96.0.30", serde_json::json!({})))
        .await
        .expect("create svc");
    replace_slice(
        &slices,
        "web-1",
        slice("web-1", "web", &["10.244.0.10", "10.244.0.11"]),
    )
    .await;
    until(&h, (2.0, 3.0), std::time::Duration::from_secs(10));
    // The counters take every event, as kube-proxy's (the headless Service's too), as they
    // come.
    let after = totals(&h);
    assert_eq!((after.0 - before.0, after.1 - before.1), (3.0, 3.0));
    h.wait_for_frontend(
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    assert_eq!(pending(&h), (0.0, 0.0), "the sync took them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_keeps_traffic_and_health_and_catches_up_afterwards() {
    let mut h = Harness::new("outage", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    let (mut server, client) = agent_on_apiserver(&mut h).await;
    create_web_on_pod_a(&mut h, &client).await;
    let healthz = h.served_address("healthz");
    let changes_before = metric(&h, "kubeproxy_sync_proxy_rules_endpoint_changes_total");
    let last_synced = |h: &Harness| {
        labelled(
            h,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            &[("ip_family", "IPv4")],
        )
    };
    let synced_before = last_synced(&h);

    // The agent's API server goes away for 10 s; another instance (same store) takes a
    // change meanwhile. A client keeps connecting across the whole outage.
    let replica = server.replica().await.expect("starting a replica");
    let replica_slices: Api<EndpointSlice> = Api::namespaced(replica.client().await, NS);
    let client_run = h.spawn_client("tcp", &["tcp", "10.96.0.10:80", "6000", "--every-ms", "2"]);
    server.stop().await;
    let outage_end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    replace_slice(
        &replica_slices,
        "web-1",
        slice("web-1", "web", &["10.244.0.10", "10.244.0.11"]),
    )
    .await;
    // Health while the API is away: nothing was queued, so 200 throughout.
    while tokio::time::Instant::now() < outage_end {
        let (code, body) = common::http_get(&healthz, "/healthz");
        assert_eq!(code, 200, "healthz during the outage: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(
        answers(&h.client(&["tcp", "10.96.0.10:80", "10"])).get("pod-a"),
        Some(&10),
        "during the outage the last known state keeps serving"
    );
    server.restart().await.expect("restarting the API stand-in");

    // Back: the change made meanwhile is applied.
    h.wait_for_frontend(
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    let lines = client_run.lines();
    let failed: Vec<_> = lines.iter().filter(|l| l["ok"] != true).collect();
    assert!(
        failed.is_empty(),
        "{} connections failed across the outage, e.g. {}",
        failed.len(),
        failed[0]
    );
    assert!(metric(&h, "kubeproxy_sync_proxy_rules_endpoint_changes_total") > changes_before);
    assert!(last_synced(&h) > synced_before);
    drop(replica);
}

/// The API stand-in, stopped (to be restarted on the same address), a client of it, and a
/// kubeconfig naming it in the test's directory: an API server down when the agent starts.
async fn stand_in_down(h: &Harness) -> (ApiServer, kube::Client, std::path::PathBuf) {
    let mut server = ApiServer::start().await.expect("starting the API stand-in");
    let client = server.client().await;
    server.stop().await;
    let kubeconfig = h.manifests.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).expect("writing the kubeconfig");
    (server, client, kubeconfig)
}

/// With the Kubernetes source, the programs are loaded and verified while the initial lists
/// are awaited, not after them: on a large cluster a start takes the longer of the two, not
/// their sum. The stand-in is down when the agent starts, so no list can be answered until
/// it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_programs_load_while_the_initial_lists_are_awaited() {
    let mut h = Harness::new("listwait", &["pod-a"]);
    let _servers = h.serve(&[8080], &[]);
    let (mut server, client, kubeconfig) = stand_in_down(&h).await;
    h.start_agent_with(&["--kubeconfig".as_ref(), kubeconfig.as_os_str()]);

    h.wait_for_log("programs loaded and verified");
    assert_eq!(
        server.list_requests(ApiResource::Services),
        0,
        "no list was answered yet"
    );
    assert!(
        !h.agent_log().contains("datapath ready"),
        "the datapath waits for the lists:\n{}",
        h.agent_log()
    );

    server.restart().await.expect("restarting the API stand-in");
    create_web_on_pod_a(&mut h, &client).await;
}

/// An API server that cannot be reached when the agent starts fails neither health check,
/// however long it stays away: kube-proxy is healthy while its informers have not synced,
/// and a liveness probe that restarted the agent would bring the lists no closer. The
/// health timeout (twice the sync period: 1 s here) counts once the lists are in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_down_at_start_fails_no_health_check() {
    let mut h = Harness::new("listhealth", &["pod-a"]);
    let _servers = h.serve(&[8080], &[]);
    let (mut server, client, kubeconfig) = stand_in_down(&h).await;
    h.start_agent_with(&[
        "--kubeconfig".as_ref(),
        kubeconfig.as_os_str(),
        "--sync-period".as_ref(),
        "500ms".as_ref(),
    ]);
    let healthz = h.served_address("healthz");
    // Past the health timeout, counted from when the agent serves its health, with
    // nothing listed yet.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        !h.agent_log().contains("datapath ready"),
        "{}",
        h.agent_log()
    );
    for path in ["/livez", "/healthz"] {
        let (code, body) = common::http_get(&healthz, path);
        assert_eq!(code, 200, "{path} while the API server is down: {body}");
    }

    server.restart().await.expect("restarting the API stand-in");
    create_web_on_pod_a(&mut h, &client).await;
}

/// The first event in the `default` namespace with `reason`, within 20 s.
async fn wait_for_event(
    h: &Harness,
    client: &kube::Client,
    reason: &str,
) -> k8s_openapi::api::events::v1::Event {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), NS);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let listed = events.list(&Default::default()).await.expect("list events");
        if let Some(e) = listed
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason))
        {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {reason} event recorded; agent log:\n{}",
            h.agent_log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The agent on node-1 recorded `event`, as controller `ebpf-kube-proxy`.
fn assert_reported_by_node_1(event: &k8s_openapi::api::events::v1::Event) {
    assert_eq!(
        (
            event.reporting_controller.as_deref(),
            event.reporting_instance.as_deref()
        ),
        (Some("ebpf-kube-proxy"), Some("node-1"))
    );
}

/// kube-proxy's "birth cry": once its sources watch, the agent records a `Starting` event
/// on its Node (in `default`, the Node being cluster-scoped), with kube-proxy's reason and
/// action, reported by this node's agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_records_kube_proxys_starting_event_on_its_node() {
    let mut h = Harness::new("startev", &["pod-a"]);
    let (_server, client) = agent_on_apiserver(&mut h).await;
    let event = wait_for_event(&h, &client, "Starting").await;
    assert_eq!(event.type_.as_deref(), Some("Normal"));
    assert_eq!(event.action.as_deref(), Some("StartKubeProxy"));
    assert_reported_by_node_1(&event);
    let regarding = event.regarding.as_ref().expect("regarding");
    assert_eq!(
        (
            regarding.kind.as_deref(),
            regarding.namespace.as_deref(),
            regarding.name.as_deref(),
            regarding.uid.as_deref(),
        ),
        (Some("Node"), None, Some("node-1"), Some("node-1"))
    );
}

/// A healthz port that is taken (and tried again) is recorded as kube-proxy records it: a
/// `FailedToStartProxierHealthcheck` warning on the Node, naming the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_healthz_port_is_recorded_as_an_event_on_the_node() {
    let mut h = Harness::new("hzevent", &["pod-a"]);
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let addr = squatter.local_addr().expect("its address").to_string();
    let server = ApiServer::start().await.expect("starting the API stand-in");
    let client = server.client().await;
    let kubeconfig = h.manifests.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).expect("writing the kubeconfig");
    h.start_agent_with(&[
        "--kubeconfig".as_ref(),
        kubeconfig.as_os_str(),
        "--healthz-bind-address".as_ref(),
        addr.as_ref(),
    ]);
    let event = wait_for_event(&h, &client, "FailedToStartProxierHealthcheck").await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.action.as_deref(), Some("StartKubeProxy"));
    assert_reported_by_node_1(&event);
    let regarding = event.regarding.as_ref().expect("regarding");
    assert_eq!(
        (regarding.kind.as_deref(), regarding.name.as_deref()),
        (Some("Node"), Some("node-1"))
    );
    let note = event.note.as_deref().unwrap_or_default();
    assert!(
        note.starts_with(&format!("failed to start proxier healthz on {addr}: ")),
        "{note}"
    );
}

/// C12 with the API: a healthCheckNodePort this node cannot bind is recorded as kube-proxy
/// records it, a `FailedToStartServiceHealthcheck` warning event on the Service, reported
/// by this node's agent. The port is one of the NodePort range on the host's loopback, held
/// by the test; the Node's only address for NodePorts (and so health checks) is loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_node_port_that_cannot_be_bound_is_recorded_as_an_event() {
    use k8s_openapi::api::core::v1::Node;

    let mut h = Harness::new("hcevent", &["pod-a"]);
    // From the top of the range: the Service's own nodePort is allocated from the bottom.
    let (_squatter, port) = (30000..=32767u16)
        .rev()
        .find_map(|p| {
            std::net::TcpListener::bind(("127.0.0.1", p))
                .ok()
                .map(|l| (l, p))
        })
        .expect("a free port in the NodePort range on loopback");
    let server = ApiServer::start().await.expect("starting the API stand-in");
    let client = server.client().await;
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "node-1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]},
    }))
    .expect("a valid Node");
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    let kubeconfig = h.manifests.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).expect("writing the kubeconfig");
    h.start_agent_with(&[
        "--kubeconfig".as_ref(),
        kubeconfig.as_os_str(),
        "--nodeport-addresses".as_ref(),
        "127.0.0.1/32".as_ref(),
    ]);

    let lb: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": port,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    }))
    .expect("a valid Service");
    Api::<Service>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &lb)
        .await
        .expect("create svc");
    Api::<EndpointSlice>::namespaced(client.clone(), NS)
        .create(
            &PostParams::default(),
            &slice("web-1", "web", &["10.244.0.10"]),
        )
        .await
        .expect("create slice");

    let event = wait_for_event(&h, &client, "FailedToStartServiceHealthcheck").await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.reason.as_deref(),
        Some("FailedToStartServiceHealthcheck")
    );
    assert_eq!(event.action.as_deref(), Some("Listen"));
    assert_reported_by_node_1(&event);
    let regarding = event.regarding.as_ref().expect("regarding");
    assert_eq!(
        (
            regarding.kind.as_deref(),
            regarding.namespace.as_deref(),
            regarding.name.as_deref()
        ),
        (Some("Service"), Some(NS), Some("web"))
    );
    let note = event.note.as_deref().unwrap_or_default();
    assert!(
        note.starts_with(&format!(
            "node node-1 failed to start healthcheck \"default/web\" on port {port}: "
        )),
        "{note}"
    );
}

/// The local ports of process `pid`'s TCP connections to `server`: its sockets
/// (`/proc/<pid>/fd`) found in its namespace's `/proc/<pid>/net/tcp`.
fn connection_ports(pid: u32, server: std::net::SocketAddr) -> Vec<u16> {
    let std::net::SocketAddr::V4(server) = server else {
        panic!("the stand-in listens on IPv4");
    };
    let inodes: std::collections::BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading the agent's descriptors")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    // /proc/net/tcp writes an address as its network-order word in hex, a port in hex.
    let remote = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(server.ip().octets()),
        server.port()
    );
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).expect("reading tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, peer, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
            let port = local.rsplit_once(':')?.1;
            (*peer == remote && inodes.contains(*inode))
                .then(|| u16::from_str_radix(port, 16).ok())
                .flatten()
        })
        .collect()
}

/// Prefix of the nftables tables [`Blackhole`] makes.
const BLACKHOLE_TABLES: &str = "ekpt_deadconn_";

/// An nftables table of the test's own that drops, without a word, every loopback packet
/// between the stand-in's port and these local ports: the connections die as they do
/// behind a failed load balancer. Deleted on drop; tables a killed run left are deleted
/// before a new one is made.
struct Blackhole(String);

impl Blackhole {
    /// The table is named after `h`'s prefix; its rules file goes in `h`'s directory.
    fn between(h: &Harness, server: std::net::SocketAddr, ports: &[u16]) -> Self {
        let table = h.prefix.replace('-', "_");
        assert!(table.starts_with(BLACKHOLE_TABLES), "{table}");
        let listed = std::process::Command::new("nft")
            .args(["list", "tables", "inet"])
            .output()
            .expect("running nft");
        for line in String::from_utf8_lossy(&listed.stdout).lines() {
            // Only a killed run's: another test process running now keeps its own.
            let run_gone = |table: &&str| {
                let pid = table[BLACKHOLE_TABLES.len()..].split('_').next();
                pid.is_some_and(|pid| !std::path::Path::new("/proc").join(pid).exists())
            };
            if let Some(old) = line
                .strip_prefix("table inet ")
                .filter(|t| t.starts_with(BLACKHOLE_TABLES))
                .filter(run_gone)
            {
                let _ = std::process::Command::new("nft")
                    .args(["delete", "table", "inet", old])
                    .status();
            }
        }
        let set = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let port = server.port();
        let rules = format!(
            "table inet {table} {{
  chain out {{
    type filter hook output priority 0;
    oif lo ip saddr 127.0.0.1 ip daddr 127.0.0.1 tcp sport {{ {set} }} tcp dport {port} drop
    oif lo ip saddr 127.0.0.1 ip daddr 127.0.0.1 tcp sport {port} tcp dport {{ {set} }} drop
  }}
}}
"
        );
        let file = h.manifests.join("blackhole.nft");
        std::fs::write(&file, rules).expect("writing the blackhole's rules");
        let blackhole = Blackhole(table);
        let mut nft = std::process::Command::new("nft");
        nft.arg("-f").arg(&file);
        xtask::cmd::run(&mut nft).unwrap_or_else(|e| panic!("loading the blackhole: {e:#}"));
        blackhole
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}

/// Puts pod-b beside pod-a in `web`'s slice `web-1`.
async fn add_pod_b_to_web(client: kube::Client) {
    let slices: Api<EndpointSlice> = Api::namespaced(client, NS);
    replace_slice(
        &slices,
        "web-1",
        slice("web-1", "web", &["10.244.0.10", "10.244.0.11"]),
    )
    .await;
}

/// The agent's connections to the API server die without a word (no FIN, no RST: a load
/// balancer's failover, a lost NAT entry). TCP keepalive fails them within about 30 s and
/// the watchers connect again, so a change made meanwhile is applied; without keepalive
/// an idle watch would wait for its idle timeout (295 s), beyond this test's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_api_connection_is_dropped_and_the_watch_resumed() {
    let mut h = Harness::new("deadconn", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    let (server, client) = agent_on_apiserver(&mut h).await;
    create_web_on_pod_a(&mut h, &client).await;
    let watches_before = server.watch_requests(ApiResource::EndpointSlices);
    let pid = h.agent_pid().expect("the agent runs");
    let ports = connection_ports(pid, server.address());
    assert!(
        !ports.is_empty(),
        "the agent has no connection to the API server"
    );
    let _blackhole = Blackhole::between(&h, server.address(), &ports);

    add_pod_b_to_web(client).await;
    h.wait_for_frontend_within(
        std::time::Duration::from_secs(120),
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    assert!(server.watch_requests(ApiResource::EndpointSlices) > watches_before);
    let now = connection_ports(pid, server.address());
    assert!(
        now.iter().all(|p| !ports.contains(p)),
        "connections {ports:?} outlived the blackhole: {now:?}"
    );
}

/// The API server freezes (a stopped process, a load balancer holding connections to
/// one): its kernel keeps the connections alive, so TCP keepalive finds nothing, but no
/// byte comes. After `--api-read-timeout` the agent gives its connection up and asks
/// again; once the server answers, a change made meanwhile is applied. Without the
/// timeout an idle watch waits for its idle timeout (295 s), beyond this test's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_api_server_is_given_up_after_the_read_timeout() {
    let mut h = Harness::new("frozenapi", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[]);
    // Bookmarks well within the read timeout, as the API server's (a minute) are within
    // the default 2 minutes: a watch that is not frozen is never given up.
    let options = Options {
        bookmark_interval: std::time::Duration::from_millis(500),
    };
    let server = ApiServer::start_with(options)
        .await
        .expect("starting the API stand-in");
    let client = server.client().await;
    let proxy = FreezingProxy::start(server.address()).await;
    let kubeconfig = h.manifests.join("kubeconfig");
    let yaml = server
        .kubeconfig_yaml()
        .replace(&server.url(), &format!("http://{}", proxy.address));
    std::fs::write(&kubeconfig, yaml).expect("writing the kubeconfig");
    h.start_agent_with(&[
        "--kubeconfig".as_ref(),
        kubeconfig.as_os_str(),
        "--api-read-timeout".as_ref(),
        "2s".as_ref(),
    ]);
    create_web_on_pod_a(&mut h, &client).await;

    // Longer than the read timeout, with the bookmarks flowing: nothing given up.
    let quiet = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    server
        .wait_for(ApiResource::EndpointSlices, |a| a.open_watches > 0)
        .await;
    tokio::time::sleep_until(quiet).await;
    let gave_up = h.agent_log().matches("; retrying").count();
    assert_eq!(gave_up, 0, "{}", h.agent_log());

    proxy.freeze();
    add_pod_b_to_web(client).await;
    // The EndpointSlice watch, which brings the change, gives its connection up while the
    // server is still frozen. (Waiting for any watch instead, the slices' own could still
    // be open at the thaw and bring the change on its old connection.)
    let slice_watch_gave_up = || {
        h.agent_log()
            .lines()
            .any(|l| l.contains("watching EndpointSlice") && l.contains("; retrying"))
    };
    let deadline = std::time::Instant::now() + common::CONDITION_LIMIT;
    while !slice_watch_gave_up() {
        assert!(
            std::time::Instant::now() < deadline,
            "the EndpointSlice watch never gave its frozen connection up:\n{}",
            h.agent_log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let accepted = proxy.accepted();
    proxy.thaw();
    h.wait_for_frontend(
        "10.96.0.10:80",
        "TCP",
        Some(&["10.244.0.10:8080", "10.244.0.11:8080"]),
    );
    assert!(
        proxy.accepted() > accepted,
        "the change came without a new connection"
    );
}

/// A TCP proxy in front of the API stand-in that can freeze: while frozen it accepts
/// nothing (the kernel still completes handshakes into its backlog) and moves no byte
/// either way, as a stopped API server process does; every kernel keeps its connections
/// alive. Dropping it closes everything.
struct FreezingProxy {
    address: std::net::SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezingProxy {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let address = listener.local_addr().expect("the proxy's address");
        let (frozen, thawed) = tokio::sync::watch::channel(false);
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            // Dropped with this task: the connections' pumps end with it.
            let mut pumps = tokio::task::JoinSet::new();
            loop {
                wait_thawed(&mut thawed.clone()).await;
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_in, client_out) = client.into_split();
                let (server_in, server_out) = server.into_split();
                pumps.spawn(pump(client_in, server_out, thawed.clone()));
                pumps.spawn(pump(server_in, client_out, thawed.clone()));
            }
        });
        FreezingProxy {
            address,
            frozen,
            accepted,
            task,
        }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Connections accepted so far.
    fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` while the proxy is not frozen; stops at the end of `from`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        wait_thawed(&mut frozen).await;
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            // Frozen while waiting: read nothing more until thawed.
            _ = frozen.changed() => continue,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Returns once the proxy is not frozen.
async fn wait_thawed(frozen: &mut tokio::sync::watch::Receiver<bool>) {
    while *frozen.borrow_and_update() {
        if frozen.changed().await.is_err() {
            return;
        }
    }
}
