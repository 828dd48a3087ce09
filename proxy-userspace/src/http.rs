//! `/healthz` and `/livez` (kube-proxy's semantics, probed by cloud load balancers and the
//! kubelet) and `/metrics`.
//!
//! Health follows kube-proxy's proxier health server: the agent is unhealthy when an update
//! has been queued and not applied for longer than the health timeout (2 x sync period);
//! `/healthz` is also 503 while this node is being deleted or drained by the cluster
//! autoscaler (`nodeEligible: false`), `/livez` ignores the node.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::metrics::{CodeLabel, Metrics};

/// What the health endpoints report, updated by the sync loop.
#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
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
    pub fn queued(&self, at: SystemTime) {
        let mut s = self.lock();
        s.oldest_pending.get_or_insert(at);
    }

    /// Everything queued so far is applied.
    pub fn updated(&self, at: SystemTime) {
        let mut s = self.lock();
        s.last_updated = Some(at);
        s.oldest_pending = None;
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// (healthy, node eligible, last updated) at `now`.
    pub fn status(&self, now: SystemTime) -> (bool, bool, Option<SystemTime>) {
        let s = self.lock();
        let stale = s
            .oldest_pending
            .and_then(|q| now.duration_since(q).ok())
            .is_some_and(|waited| waited > self.timeout);
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

pub async fn serve_health(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    on_failure: OnBindFailure,
    failed: BindFailed,
) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(AppState { health, metrics });
    serve(addr, app, "healthz", on_failure, failed).await
}

pub async fn serve_metrics(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    on_failure: OnBindFailure,
) -> Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(AppState { health, metrics });
    serve(addr, app, "metrics", on_failure, Box::new(|_| {})).await
}

/// Binds `addr` now (port 0 is resolved and logged), then serves in the background. A taken
/// port is handled as `on_failure` says.
async fn serve(
    addr: SocketAddr,
    app: Router,
    what: &'static str,
    on_failure: OnBindFailure,
    failed: BindFailed,
) -> Result<()> {
    let error = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            tokio::spawn(serve_on(listener, app, what));
            return Ok(());
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
    Ok(())
}

async fn serve_on(listener: tokio::net::TcpListener, app: Router, what: &'static str) {
    match listener.local_addr() {
        Ok(bound) => tracing::info!("serving {what} on http://{bound}"),
        Err(e) => tracing::info!("serving {what} (address unknown: {e})"),
    }
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("{what} server stopped: {e}");
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
    let (healthy, eligible, last) = app.health.status(now);
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
    let (healthy, _, last) = app.health.status(now);
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
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
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
        health.updated(t0 + Duration::from_secs(62));
        assert_eq!(
            health.status(t0 + Duration::from_secs(500)),
            (true, true, Some(t0 + Duration::from_secs(62)))
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
}
