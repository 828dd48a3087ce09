//! `/healthz` and `/livez` (kube-proxy's semantics, probed by cloud load balancers and the
//! kubelet), `/readyz` (the first sync done) and the metrics server: `/metrics`, and beside
//! it what kube-proxy's metrics port also answers, `/healthz` (the process is up) and
//! `/proxyMode`.
//!
//! Health follows kube-proxy's proxier health server: the agent is unhealthy when an update
//! has been queued and not applied for longer than the health timeout (2 x sync period);
//! `/healthz` is also 503 while this node is being deleted or drained by the cluster
//! autoscaler (`nodeEligible: false`), `/livez` ignores the node.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use crate::metrics::{CodeLabel, Metrics};

/// What the health endpoints report, updated by the sync loop. How long an update has
/// waited is measured on the monotonic clock (as Go's `time.Sub` does for kube-proxy): a
/// step of the wall clock (NTP at boot) must neither fail the probes nor hide a stuck
/// loop. The wall clock only dates the last update in the bodies.
#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<Instant>,
    node_eligible: bool,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Health {
            timeout,
            state: Mutex::new(HealthState {
                node_eligible: true,
                ..Default::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change is waiting to be applied (only the oldest pending one counts).
    pub fn queued(&self, at: Instant) {
        let mut s = self.lock();
        s.oldest_pending.get_or_insert(at);
    }

    /// What was queued up to `read` (when the sync read its source) is applied, at `at`. A
    /// change queued since is still waiting: the sync did not see it.
    pub fn updated(&self, read: Instant, at: SystemTime) {
        let mut s = self.lock();
        s.last_updated = Some(at);
        if s.oldest_pending.is_some_and(|q| q <= read) {
            s.oldest_pending = None;
        }
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// (healthy, node eligible, last updated) at `now`.
    pub fn status(&self, now: Instant) -> (bool, bool, Option<SystemTime>) {
        let s = self.lock();
        let stale = s
            .oldest_pending
            .is_some_and(|q| now.saturating_duration_since(q) > self.timeout);
        (!stale, s.node_eligible, s.last_updated)
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// What a server does when its port is taken: kube-proxy's `--bind-address-hard-fail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBindFailure {
    /// The error is returned and the agent exits (`--bind-address-hard-fail`).
    Exit,
    /// The error is logged, and the bind tried again every `BIND_RETRY` in the background
    /// while the agent works: kube-proxy's default. The datapath does not need these
    /// servers, and a port still held by the kube-proxy being replaced is freed soon.
    Retry,
}

/// How often a taken port is tried again (kube-proxy's period).
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Called with the error of every failed bind (the first included).
pub type BindFailed = Box<dyn Fn(&str) + Send + 'static>;

/// Serves `/healthz` and `/livez` on `addr` (see [`serve`]).
pub async fn serve_health(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    on_failure: OnBindFailure,
    failed: BindFailed,
) -> Result<Option<SocketAddr>> {
    serve(
        addr,
        health_router(health, metrics),
        "healthz",
        on_failure,
        failed,
    )
    .await
}

/// The health server's routes. Any method is answered, as kube-proxy's handlers do.
fn health_router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", any(healthz))
        .route("/livez", any(livez))
        .route("/readyz", any(readyz))
        .with_state(AppState { health, metrics })
}

/// Serves `/metrics` and its neighbours on `addr` (see [`serve`]).
pub async fn serve_metrics(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    on_failure: OnBindFailure,
) -> Result<Option<SocketAddr>> {
    let app = metrics_router(health, metrics);
    serve(addr, app, "metrics", on_failure, Box::new(|_| {})).await
}

/// What `/proxyMode` answers: kube-proxy's says `iptables`, `ipvs`, `nftables` (or
/// `kernelspace`); tools read it to tell which proxy serves a node.
pub const PROXY_MODE: &str = "ebpf";

/// The metrics server's routes (any method, as kube-proxy's): `/metrics`, and what
/// kube-proxy's metrics port serves beside it for tools that look there: `/healthz` (the
/// plain check every Kubernetes component has: the process answers; the proxy's own
/// health is on the health server) and `/proxyMode`.
fn metrics_router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", any(metrics_text))
        .route("/healthz", any(process_healthz))
        .route("/healthz/ping", any(ping))
        .route("/proxyMode", any(proxy_mode))
        .with_state(AppState { health, metrics })
}

/// Binds `addr` now (port 0 is resolved and logged), then serves in the background; the
/// address bound, `None` while a taken port is tried again. A taken port is handled as
/// `on_failure` says.
async fn serve(
    addr: SocketAddr,
    app: Router,
    what: &'static str,
    on_failure: OnBindFailure,
    failed: BindFailed,
) -> Result<Option<SocketAddr>> {
    let error = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            let bound = listener.local_addr().ok();
            tokio::spawn(serve_on(listener, app, what));
            return Ok(bound);
        }
        Err(e) if on_failure == OnBindFailure::Exit => {
            return Err(e).with_context(|| format!("binding the {what} server to {addr}"));
        }
        Err(e) => e.to_string(),
    };
    tracing::error!(
        "binding the {what} server to {addr} failed: {error}; trying again every {}s",
        BIND_RETRY.as_secs()
    );
    failed(&error);
    tokio::spawn(async move {
        let mut last = error;
        loop {
            tokio::time::sleep(BIND_RETRY).await;
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => return serve_on(listener, app, what).await,
                Err(e) => {
                    let error = e.to_string();
                    if error != last {
                        tracing::error!("binding the {what} server to {addr} failed: {error}");
                    }
                    failed(&error);
                    last = error;
                }
            }
        }
    });
    Ok(None)
}

async fn serve_on(listener: tokio::net::TcpListener, app: Router, what: &'static str) {
    match listener.local_addr() {
        Ok(bound) => tracing::info!("serving {what} on http://{bound}"),
        Err(e) => tracing::info!("serving {what} (address unknown: {e})"),
    }
    serve_connections(
        listener,
        app,
        ConnectionLimits::DEFAULT,
        std::future::pending(),
    )
    .await;
}

/// How long the health, metrics and health-check-NodePort servers give a client.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// To send a request's headers.
    pub header_read: Duration,
    /// To stay connected at all, requests and idle time together.
    pub lifetime: Duration,
}

impl ConnectionLimits {
    /// Probes (kubelet, cloud load balancers, Prometheus) send one small request at once,
    /// most on a new connection each time.
    pub const DEFAULT: Self = ConnectionLimits {
        header_read: Duration::from_secs(10),
        lifetime: Duration::from_secs(60),
    };
}

/// Serves `app` on `listener` until `stop` completes, each connection on a task of its
/// own and within `limits`: without them (axum's `serve` sets none) a client that opens
/// connections and never finishes a request (the health ports listen on every address,
/// reachable like a NodePort) keeps each open for good, until the agent runs out of file
/// descriptors and with them its watches and binds. An accept that fails (EMFILE) is
/// tried again shortly, as axum does. At `stop` the open connections end too, as Go's
/// `Server.Close` ends kube-proxy's, but an answer under way is finished first: a
/// health-check server whose Service went must not answer for it on a kept-alive
/// connection.
pub async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnectionLimits,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    // Dropped when this returns: every connection's `stopped` then completes.
    let (_stopping, stopped) = tokio::sync::watch::channel(());
    loop {
        let accepted = tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // Dropped at the end of its lifetime: the socket closes.
            let _ = tokio::time::timeout(limits.lifetime, async move {
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = stopped.changed() => connection.as_mut().graceful_shutdown(),
                }
                let _ = connection.await;
            })
            .await;
        });
    }
}

fn rfc3339(t: Option<SystemTime>) -> String {
    // kube-proxy prints Go's zero time when it never synced.
    t.and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map(|ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "0001-01-01T00:00:00Z".into())
}

/// kube-proxy's `/healthz` (with `eligible`) and `/livez` bodies. While `ok` it reports the
/// current time as `lastUpdated` (its older releases' meaning, "the sync loop ran
/// recently"); the metrics tell the last sync.
fn health_body(
    ok: bool,
    last: Option<SystemTime>,
    now: SystemTime,
    eligible: Option<bool>,
) -> String {
    let last = if ok { Some(now) } else { last };
    let eligible = eligible
        .map(|e| format!(", \"nodeEligible\": {e}"))
        .unwrap_or_default();
    format!(
        "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"{eligible}}}",
        rfc3339(last),
        rfc3339(Some(now))
    )
}

async fn healthz(State(app): State<AppState>) -> Response {
    let now = SystemTime::now();
    let (healthy, eligible, last) = app.health.status(Instant::now());
    let code = if healthy && eligible {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    app.metrics
        .healthz
        .get_or_create(&CodeLabel {
            code: code.as_u16().to_string(),
        })
        .inc();
    let body = health_body(code == StatusCode::OK, last, now, Some(eligible));
    json(code, body)
}

async fn livez(State(app): State<AppState>) -> Response {
    let now = SystemTime::now();
    let (healthy, _, last) = app.health.status(Instant::now());
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    app.metrics
        .livez
        .get_or_create(&CodeLabel {
            code: code.as_u16().to_string(),
        })
        .inc();
    json(code, health_body(healthy, last, now, None))
}

/// `/readyz` (this agent's; kube-proxy has none, and its DaemonSets no readiness probe):
/// `/livez` once a sync has succeeded. Healthy while starting, `/livez` is 200 while the
/// agent cannot reach the API server or load its programs, and so is a readiness probe on
/// it: a broken install or upgrade would look Ready and roll on to every node.
async fn readyz(State(app): State<AppState>) -> Response {
    let now = SystemTime::now();
    let (healthy, _, last) = app.health.status(Instant::now());
    let ready = healthy && last.is_some();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, health_body(ready, last, now, None))
}

/// The generic `/healthz` of Kubernetes components (k8s.io/apiserver's root handler) with
/// its one check, `ping`: `ok`; with `?verbose`, each check (`?exclude=ping` marks it
/// excluded, other names are reported as matching nothing) and `healthz check passed`.
async fn process_healthz(Query(params): Query<Vec<(String, String)>>) -> Response {
    let mut excluded: BTreeSet<&str> = params
        .iter()
        .filter(|(k, _)| k == "exclude")
        .map(|(_, v)| v.as_str())
        .collect();
    if !params.iter().any(|(k, _)| k == "verbose") {
        return text("ok".to_owned());
    }
    let mut body = if excluded.remove("ping") {
        "[+]ping excluded: ok\n".to_owned()
    } else {
        "[+]ping ok\n".to_owned()
    };
    if !excluded.is_empty() {
        let names: Vec<String> = excluded.iter().map(|n| format!("{n:?}")).collect();
        body += &format!(
            "warn: some health checks cannot be excluded: no matches for {}\n",
            names.join(",")
        );
    }
    body += "healthz check passed\n";
    text(body)
}

/// `/healthz/ping`: the one check on its own, always `ok`.
async fn ping() -> Response {
    text("ok".to_owned())
}

async fn proxy_mode() -> Response {
    text(PROXY_MODE.to_owned())
}

fn text(body: String) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

fn json(code: StatusCode, body: String) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn metrics_text(State(app): State<AppState>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c30_unhealthy_only_when_an_update_waits_longer_than_the_timeout() {
        let t0 = Instant::now();
        let synced = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let health = Health::new(Duration::from_secs(60));
        assert!(health.status(t0).0, "nothing queued: healthy");
        health.queued(t0);
        assert!(
            health.status(t0 + Duration::from_secs(60)).0,
            "queued for exactly the timeout"
        );
        assert!(
            !health.status(t0 + Duration::from_secs(61)).0,
            "queued longer than the timeout"
        );
        // A later queueing does not reset the oldest pending time.
        health.queued(t0 + Duration::from_secs(30));
        assert!(!health.status(t0 + Duration::from_secs(61)).0);
        // A sync that read its source before the first change did not apply it.
        health.updated(t0 - Duration::from_secs(1), synced);
        assert!(
            !health.status(t0 + Duration::from_secs(61)).0,
            "still waiting"
        );
        health.updated(t0 + Duration::from_secs(62), synced);
        assert_eq!(
            health.status(t0 + Duration::from_secs(500)),
            (true, true, Some(synced))
        );
        health.set_node_eligible(false);
        assert!(!health.status(t0 + Duration::from_secs(500)).1);
    }

    #[test]
    fn healthy_bodies_report_the_current_time_as_last_updated() {
        let synced = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_564_800);
        let now = synced + Duration::from_secs(3_723);
        assert_eq!(
            health_body(true, Some(synced), now, Some(true)),
            r#"{"lastUpdated": "2026-11-25T01:02:03Z","currentTime": "2026-11-25T01:02:03Z", "nodeEligible": true}"#
        );
        assert_eq!(
            health_body(false, Some(synced), now, Some(false)),
            r#"{"lastUpdated": "2026-11-25T00:00:00Z","currentTime": "2026-11-25T01:02:03Z", "nodeEligible": false}"#
        );
        assert_eq!(
            health_body(false, None, now, None),
            r#"{"lastUpdated": "0001-01-01T00:00:00Z","currentTime": "2026-11-25T01:02:03Z"}"#
        );
    }

    /// `method path` answered by `router`: status, content type, body.
    async fn ask(router: Router, method: &str, path: &str) -> (u16, String, String) {
        use tower::ServiceExt;
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .body(axum::body::Body::empty())
            .expect("a request");
        let response = router.oneshot(request).await.expect("an answer");
        let kind = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("a body");
        (status, kind, String::from_utf8_lossy(&body).into_owned())
    }

    /// `/readyz` waits for the first successful sync (`/livez` is 200 before it), and
    /// fails with `/livez` when an update waits too long.
    #[tokio::test]
    async fn readyz_is_200_only_after_a_sync_and_while_healthy() {
        let (health, metrics) = state();
        let router = health_router(health.clone(), metrics);
        assert_eq!(ask(router.clone(), "GET", "/livez").await.0, 200);
        assert_eq!(ask(router.clone(), "GET", "/readyz").await.0, 503);
        health.updated(Instant::now(), SystemTime::now());
        assert_eq!(ask(router.clone(), "GET", "/readyz").await.0, 200);
        health.queued(Instant::now() - Duration::from_secs(61));
        assert_eq!(ask(router.clone(), "GET", "/readyz").await.0, 503);
        assert_eq!(ask(router, "GET", "/livez").await.0, 503);
    }

    fn state() -> (Arc<Health>, Arc<Metrics>) {
        (
            Arc::new(Health::new(Duration::from_secs(60))),
            Arc::new(Metrics::new()),
        )
    }

    #[tokio::test]
    async fn the_metrics_port_answers_healthz_and_proxy_mode_as_kube_proxys_does() {
        let (health, metrics) = state();
        let router = metrics_router(health, metrics);
        let plain = "text/plain; charset=utf-8";
        for (method, path, body) in [
            ("GET", "/healthz", "ok"),
            ("GET", "/healthz?exclude=ping", "ok"),
            ("GET", "/healthz/ping", "ok"),
            ("GET", "/healthz/ping?verbose", "ok"),
            (
                "GET",
                "/healthz?verbose",
                "[+]ping ok\nhealthz check passed\n",
            ),
            (
                "GET",
                "/healthz?exclude=ping&verbose=1",
                "[+]ping excluded: ok\nhealthz check passed\n",
            ),
            (
                "GET",
                "/healthz?exclude=y&exclude=x&verbose",
                "[+]ping ok\nwarn: some health checks cannot be excluded: no matches for \"x\",\"y\"\nhealthz check passed\n",
            ),
            ("GET", "/proxyMode", PROXY_MODE),
            ("POST", "/proxyMode", PROXY_MODE),
        ] {
            assert_eq!(
                ask(router.clone(), method, path).await,
                (200, plain.to_owned(), body.to_owned()),
                "{method} {path}"
            );
        }
        for method in ["GET", "POST"] {
            let (status, _, text) = ask(router.clone(), method, "/metrics").await;
            assert_eq!(status, 200, "{method} /metrics");
            assert!(text.contains("kubeproxy_sync_proxy_rules_endpoint_changes_pending"));
        }
        assert_eq!(ask(router, "GET", "/livez").await.0, 404);
    }

    #[tokio::test]
    async fn health_answers_any_method_as_kube_proxys_does() {
        let (health, metrics) = state();
        let router = health_router(health, metrics.clone());
        for method in ["GET", "HEAD", "POST", "PUT", "DELETE"] {
            for path in ["/healthz", "/livez"] {
                let (status, kind, _) = ask(router.clone(), method, path).await;
                assert_eq!(
                    (status, kind.as_str()),
                    (200, "application/json"),
                    "{method} {path}"
                );
            }
        }
        let counted = metrics
            .healthz
            .get_or_create(&CodeLabel { code: "200".into() })
            .get();
        assert_eq!(counted, 5);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(
            rfc3339(Some(SystemTime::UNIX_EPOCH)),
            "1970-01-01T00:00:00Z"
        );
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_564_800 + 3_723);
        assert_eq!(rfc3339(Some(t)), "2026-11-25T01:02:03Z");
        assert_eq!(rfc3339(None), "0001-01-01T00:00:00Z");
    }

    /// A client that never finishes its request's headers, or keeps its connection open,
    /// is cut off within the limits; a whole request is answered.
    #[test]
    fn slow_and_idle_clients_are_cut_off_and_a_whole_request_is_answered() {
        use std::io::{Read, Write};
        let runtime = crate::run::runtime().expect("the agent's runtime");
        let hour = Duration::from_secs(3600);
        // A server with these limits; its address.
        let serve = |limits: ConnectionLimits| {
            let (health, metrics) = state();
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                    .await
                    .expect("binding");
                let addr = listener.local_addr().expect("its address");
                let app = health_router(health, metrics);
                tokio::spawn(serve_connections(
                    listener,
                    app,
                    limits,
                    std::future::pending(),
                ));
                addr
            })
        };
        // Waits (bounded, far beyond the limit under test, far below the other) for the
        // server to close the connection; what it sent before.
        let until_closed = |stream: &mut std::net::TcpStream| -> String {
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("a read timeout");
            let mut text = Vec::new();
            stream
                .read_to_end(&mut text)
                .expect("the server closes the connection within 30 s");
            String::from_utf8_lossy(&text).into_owned()
        };
        // The header limit alone closes a request never finished.
        let addr = serve(ConnectionLimits {
            header_read: Duration::from_millis(300),
            lifetime: hour,
        });
        let mut slow = std::net::TcpStream::connect(addr).expect("connecting");
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .expect("half a request");
        let sent = until_closed(&mut slow);
        assert!(!sent.contains("200 OK"), "{sent}");

        // The lifetime alone closes a kept-alive connection, after its answer.
        let addr = serve(ConnectionLimits {
            header_read: hour,
            lifetime: Duration::from_secs(2),
        });
        let mut idle = std::net::TcpStream::connect(addr).expect("connecting");
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("a request, then nothing (keep-alive)");
        let sent = until_closed(&mut idle);
        assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");
    }

    /// A server that stops closes its kept-alive connections too: a health-check server
    /// whose Service went must not go on answering for it.
    #[test]
    fn a_stopped_server_closes_its_open_connections() {
        use std::io::{Read, Write};
        let runtime = crate::run::runtime().expect("the agent's runtime");
        let (health, metrics) = state();
        let hour = Duration::from_secs(3600);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let addr = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .expect("binding");
            let addr = listener.local_addr().expect("its address");
            let limits = ConnectionLimits {
                header_read: hour,
                lifetime: hour,
            };
            let stop = async {
                let _ = stopped.await;
            };
            tokio::spawn(serve_connections(
                listener,
                health_router(health, metrics),
                limits,
                stop,
            ));
            addr
        });
        let mut client = std::net::TcpStream::connect(addr).expect("connecting");
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("a read timeout");
        // One whole answer on the connection, which stays open (keep-alive).
        client
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("a request");
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        let whole = |answer: &[u8]| {
            let text = String::from_utf8_lossy(answer);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return false;
            };
            head.lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.trim().parse::<usize>().ok())
                .is_some_and(|n| body.len() >= n)
        };
        while !whole(&answer) {
            let n = client.read(&mut buf).expect("the answer");
            assert!(n > 0, "closed before the answer");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        stop.send(()).expect("stopping the server");
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .expect("the stopped server closes the connection within 30 s");
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }

    /// A sync does not yield to the runtime until it is done. On the agent's runtime the
    /// health server answers meanwhile: this test blocks the `block_on` thread the way a
    /// sync does until a client on another thread has its answer. On a runtime whose tasks
    /// share that thread, the answer never comes.
    #[test]
    fn the_health_server_answers_while_a_sync_holds_the_run_loop() {
        use std::io::{Read, Write};
        let runtime = crate::run::runtime().expect("the agent's runtime");
        let (health, metrics) = state();
        runtime.block_on(async {
            let addr = serve_health(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                health,
                metrics,
                OnBindFailure::Exit,
                Box::new(|_| {}),
            )
            .await
            .expect("serving healthz")
            .expect("a bound address");
            let (answered, answer) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let ask = || -> std::io::Result<String> {
                    let mut stream = std::net::TcpStream::connect(addr)?;
                    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
                    stream.write_all(
                        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    )?;
                    let mut text = String::new();
                    stream.read_to_string(&mut text)?;
                    Ok(text)
                };
                let _ = answered.send(ask());
            });
            // Blocks this thread without yielding, as `sync_once` does.
            let text = answer
                .recv_timeout(Duration::from_secs(30))
                .expect("no answer from /healthz in 30 s while the run loop's thread was busy")
                .expect("asking /healthz");
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert!(text.contains("\"nodeEligible\": true"), "{text}");
        });
    }
}
