//! healthCheckNodePort servers (C12, C13): one HTTP server per LoadBalancer Service with
//! `externalTrafficPolicy: Local`, which the cloud load balancer probes to learn which
//! nodes have endpoints of it. kube-proxy's `pkg/proxy/healthcheck/service_health.go`.
//!
//! After every successful sync the run loop hands over the current [`HealthCheck`]s:
//! servers of Services that are gone, or whose port changed, are closed; new ones are
//! opened; every server's count is updated. Any method and any path answers with
//! `X-Load-Balancing-Endpoint-Weight: <n>` and kube-proxy's JSON body; 200 when this node has
//! a ready endpoint of the Service and the agent is healthy (the same health as `/healthz`,
//! without the node's eligibility), 503 otherwise.
//!
//! Addresses: kube-proxy listens on all addresses unless `--nodeport-addresses` is set, then
//! on the node's addresses in those CIDRs; here those are the addresses NodePorts are served
//! on (the devices' and the Node object's, see `translate::node_info`). When they change,
//! the servers are reopened on the new ones.
//!
//! A port that cannot be bound (taken by another process, or by two Services in a
//! hand-written manifest) does not stop anything: it is logged once while it lasts, counted
//! in `ebpf_kube_proxy_health_check_node_ports{state="failed"}`, and tried again at every
//! sync, like kube-proxy does; with the Kubernetes source it is also recorded, as
//! kube-proxy records it, as a `FailedToStartServiceHealthcheck` warning event on the
//! Service (once per distinct error while it lasts; see `events`). Closing is asynchronous
//! (the server stops accepting and closes its connections, an answer under way first;
//! `http::serve_connections`), so a port handed from one Service to another in the same
//! sync may fail once and be bound at the next sync.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

use crate::events::Events;
use crate::http::{self, ConnectionLimits, Health};
use crate::metrics::{HealthCheckLabel, Metrics};
use crate::model::NodeInfo;
use crate::translate::{HealthCheck, NodePortAddresses};

/// The header GCE's weighted load balancing reads; kube-proxy sets it to the count.
const ENDPOINT_WEIGHT: HeaderName = HeaderName::from_static("x-load-balancing-endpoint-weight");

/// (namespace, name) of a Service.
type ServiceName = (String, String);

/// The addresses health-check servers listen on: all of them (`0.0.0.0`) when
/// `--nodeport-addresses` matches every address (no IPv4 CIDR, or a `/0`, as kube-proxy's
/// `MatchAll`), else the node's NodePort addresses.
pub fn listen_addresses(node_ports: &NodePortAddresses, node: &NodeInfo) -> Vec<Ipv4Addr> {
    if node_ports.match_all() {
        vec![Ipv4Addr::UNSPECIFIED]
    } else {
        node.node_port_addresses.clone()
    }
}

/// The open servers, and the Services whose port could not be bound.
pub struct HealthCheckServers {
    health: Arc<Health>,
    /// Where a failure to serve is recorded as a Kubernetes event (Kubernetes source only).
    events: Option<Events>,
    open: BTreeMap<ServiceName, Server>,
    /// The error of the last attempt, to log each failure once while it lasts.
    failed: BTreeMap<ServiceName, String>,
}

/// One Service's server: a listener per address, all sharing the count.
struct Server {
    port: u16,
    state: Arc<ServiceState>,
    app: Router,
    /// Each address's listener; dropping its sender stops it.
    listeners: BTreeMap<Ipv4Addr, oneshot::Sender<()>>,
}

impl Server {
    fn listens_on(&self, addresses: &[Ipv4Addr]) -> bool {
        self.listeners.len() == addresses.len()
            && addresses.iter().all(|a| self.listeners.contains_key(a))
    }

    /// Listens on `addresses` from now on: binds those it lacks (all or none), then stops
    /// those no longer wanted. A listener it keeps is not bound again: a stopped one closes
    /// its socket only when its task next runs, maybe after this sync, so binding its
    /// address anew here could find it still in use.
    fn move_to(&mut self, addresses: &[Ipv4Addr]) -> Result<()> {
        let new = addresses
            .iter()
            .filter(|a| !self.listeners.contains_key(a))
            .map(|&addr| Ok((addr, bind(SocketAddr::from((addr, self.port)))?)))
            .collect::<Result<Vec<_>>>()?;
        self.listeners.retain(|a, _| addresses.contains(a));
        for (addr, listener) in new {
            let stop = serve(listener, self.app.clone());
            self.listeners.insert(addr, stop);
        }
        Ok(())
    }
}

/// What the handler reads.
struct ServiceState {
    namespace: String,
    name: String,
    local_endpoints: AtomicUsize,
}

#[derive(Clone)]
struct HandlerState {
    service: Arc<ServiceState>,
    health: Arc<Health>,
}

impl HealthCheckServers {
    /// `events`: where failures to serve are recorded, with the Kubernetes source.
    pub fn new(health: Arc<Health>, events: Option<Events>) -> Self {
        HealthCheckServers {
            health,
            events,
            open: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Makes the servers match `checks` on `addresses` (kube-proxy's `SyncServices` then
    /// `SyncEndpoints`). Must run inside the tokio runtime.
    pub fn sync(&mut self, checks: &[HealthCheck], addresses: &[Ipv4Addr], metrics: &Metrics) {
        let wanted: BTreeMap<ServiceName, &HealthCheck> = checks
            .iter()
            .map(|c| ((c.namespace.clone(), c.name.clone()), c))
            .collect();
        self.open.retain(|service, server| {
            let keep = wanted.get(service).is_some_and(|c| c.port == server.port);
            if !keep {
                tracing::info!(
                    service = %format!("{}/{}", service.0, service.1),
                    port = server.port,
                    "closing health check node port"
                );
            }
            keep
        });
        self.failed
            .retain(|service, _| wanted.contains_key(service));

        for (service, check) in wanted {
            if let Some(server) = self.open.get_mut(&service) {
                server
                    .state
                    .local_endpoints
                    .store(check.local_endpoints, Ordering::Relaxed);
                if server.listens_on(addresses) {
                    continue;
                }
                // The node's addresses changed (`--nodeport-addresses` CIDRs or `primary`).
                match server.move_to(addresses) {
                    Ok(()) => {
                        tracing::info!(
                            service = %format!("{}/{}", check.namespace, check.name),
                            port = check.port,
                            addresses = ?addresses,
                            "health check node port follows the node's addresses"
                        );
                        continue;
                    }
                    Err(e) => {
                        // Closed, and opened afresh at the next sync (its listeners close
                        // once their tasks run: binding them again now could fail).
                        self.open.remove(&service);
                        self.record_failure(service, check, &e);
                        continue;
                    }
                }
            }
            match self.open_server(check, addresses) {
                Ok(server) if addresses.is_empty() => {
                    // kube-proxy does the same when no interface address is in the CIDRs.
                    tracing::warn!(
                        service = %format!("{}/{}", check.namespace, check.name),
                        port = check.port,
                        "health check node port listens nowhere: the Node has no address \
                         within --nodeport-addresses"
                    );
                    self.failed.remove(&service);
                    self.open.insert(service, server);
                }
                Ok(server) => {
                    tracing::info!(
                        service = %format!("{}/{}", check.namespace, check.name),
                        port = check.port,
                        addresses = ?addresses,
                        local_endpoints = check.local_endpoints,
                        "serving health check node port"
                    );
                    self.failed.remove(&service);
                    self.open.insert(service, server);
                }
                Err(e) => self.record_failure(service, check, &e),
            }
        }

        for (state, n) in [("open", self.open.len()), ("failed", self.failed.len())] {
            metrics
                .health_check_node_ports
                .get_or_create(&HealthCheckLabel {
                    state: state.into(),
                })
                .set(n as i64);
        }
    }

    /// Records that `check` could not be served: logged, and recorded as an event, once per
    /// distinct error while it lasts; retried at every sync.
    fn record_failure(&mut self, service: ServiceName, check: &HealthCheck, e: &anyhow::Error) {
        let error = format!("{e:#}");
        if self.failed.get(&service) != Some(&error) {
            tracing::error!(
                "Service {}/{}: cannot serve healthCheckNodePort {} (retried at every sync): \
                 {error}",
                check.namespace,
                check.name,
                check.port
            );
            if let Some(events) = &self.events {
                events.health_check_failed(&check.namespace, &check.name, check.port, &error);
            }
        }
        self.failed.insert(service, error);
    }

    /// Binds every address, then serves them all; on any failure nothing stays open, so
    /// that the next attempt starts clean.
    fn open_server(&self, check: &HealthCheck, addresses: &[Ipv4Addr]) -> Result<Server> {
        let listeners = addresses
            .iter()
            .map(|&addr| bind(SocketAddr::from((addr, check.port))))
            .collect::<Result<Vec<_>>>()?;
        let state = Arc::new(ServiceState {
            namespace: check.namespace.clone(),
            name: check.name.clone(),
            local_endpoints: AtomicUsize::new(check.local_endpoints),
        });
        let app = Router::new().fallback(answer).with_state(HandlerState {
            service: state.clone(),
            health: self.health.clone(),
        });
        let listeners = addresses
            .iter()
            .zip(listeners)
            .map(|(&addr, listener)| (addr, serve(listener, app.clone())))
            .collect();
        Ok(Server {
            port: check.port,
            state,
            app,
            listeners,
        })
    }
}

/// Serves `app` on `listener` until the returned sender is dropped (or used).
fn serve(listener: tokio::net::TcpListener, app: Router) -> oneshot::Sender<()> {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let stop = async {
        // A send or a drop of the sender: either means stop.
        let _ = stop_rx.await;
    };
    tokio::spawn(http::serve_connections(
        listener,
        app,
        ConnectionLimits::DEFAULT,
        stop,
    ));
    stop_tx
}

/// Binds now, so that a taken port is known in this sync.
/// A listener on `addr`, bound even when no interface has the address (`IP_FREEBIND`): the
/// Node may list one that no interface carries (a cloud's ExternalIP, translated on its
/// way in), or not yet, and that must not keep the health check closed on the others
/// (kube-proxy binds the interfaces' addresses alone). It answers once the address is
/// there.
fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    use std::os::fd::AsRawFd;
    let binding = || format!("binding {addr}");
    let socket = tokio::net::TcpSocket::new_v4().with_context(binding)?;
    socket.set_reuseaddr(true).with_context(binding)?;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, an int option of the size given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_FREEBIND,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error()).with_context(binding);
    }
    socket.bind(addr).with_context(binding)?;
    socket
        .listen(1024)
        .with_context(|| format!("serving {addr}"))
}

/// kube-proxy's `hcHandler.ServeHTTP`, for any method and path.
async fn answer(State(state): State<HandlerState>) -> Response {
    let count = state.service.local_endpoints.load(Ordering::Relaxed);
    let (healthy, _, _) = state.health.status(Instant::now());
    let code = if count > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = body(
        &state.service.namespace,
        &state.service.name,
        count,
        healthy,
    );
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (ENDPOINT_WEIGHT, count.to_string()),
        ],
        body,
    )
        .into_response()
}

/// kube-proxy's body byte for byte: tab-indented, no final newline.
fn body(namespace: &str, name: &str, count: usize, healthy: bool) -> String {
    // Names are DNS labels; JSON-quoting them keeps any other string valid JSON too.
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\
         \"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        quote(namespace),
        quote(name)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn check(name: &str, port: u16, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            namespace: "default".into(),
            name: name.into(),
            port,
            local_endpoints,
        }
    }

    /// A port free on loopback right now.
    fn free_port() -> u16 {
        let [port] = free_ports();
        port
    }

    /// `N` distinct free ports: each bound until all are known (two binds in turn could
    /// hand out one port twice).
    fn free_ports<const N: usize>() -> [u16; N] {
        let listeners: Vec<std::net::TcpListener> = (0..N)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
            .collect();
        std::array::from_fn(|i| listeners[i].local_addr().expect("its address").port())
    }

    /// `GET path` on 127.0.0.1:port: (status, headers, body), or the connect error.
    async fn get(port: u16, path: &str) -> std::io::Result<(u16, String, String)> {
        get_at(Ipv4Addr::LOCALHOST, port, path).await
    }

    /// [`get`] on `addr`.
    async fn get_at(
        addr: Ipv4Addr,
        port: u16,
        path: &str,
    ) -> std::io::Result<(u16, String, String)> {
        let mut stream = tokio::net::TcpStream::connect((addr, port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or_default();
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((code, head.to_lowercase(), body.to_owned()))
    }

    /// Waits (bounded) until nothing listens on the port any more.
    async fn wait_closed(port: u16) {
        for _ in 0..200 {
            if get(port, "/").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("port {port} still answers");
    }

    fn gauge(metrics: &Metrics, state: &str) -> i64 {
        metrics
            .health_check_node_ports
            .get_or_create(&HealthCheckLabel {
                state: state.into(),
            })
            .get()
    }

    #[test]
    fn the_body_is_kube_proxys_byte_for_byte() {
        assert_eq!(
            body("shop", "web", 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\
             \"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }

    #[test]
    fn listens_everywhere_unless_nodeport_addresses_are_given() {
        let node = NodeInfo {
            node_port_addresses: vec![Ipv4Addr::new(192, 0, 2, 1)],
            ..NodeInfo::default()
        };
        assert_eq!(
            listen_addresses(&NodePortAddresses::All, &node),
            [Ipv4Addr::UNSPECIFIED]
        );
        // A /0 among the CIDRs matches every address, as no CIDR does.
        let everything = NodePortAddresses::parse(&["0.0.0.0/0", "10.0.0.0/8"]).expect("valid");
        assert_eq!(
            listen_addresses(&everything, &node),
            [Ipv4Addr::UNSPECIFIED]
        );
        for node_ports in [
            NodePortAddresses::Within(vec![(Ipv4Addr::new(192, 0, 2, 0), 24)]),
            NodePortAddresses::Primary,
        ] {
            assert_eq!(
                listen_addresses(&node_ports, &node),
                [Ipv4Addr::new(192, 0, 2, 1)]
            );
        }
    }

    /// An address the Node lists but no interface has (here a documentation address no
    /// test namespace holds) does not keep the port from opening.
    #[tokio::test]
    async fn an_address_no_interface_has_is_bound_anyway() {
        let absent = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 251), 0));
        let listener = bind(absent).expect("bound with IP_FREEBIND");
        assert_eq!(
            listener.local_addr().expect("its address").ip(),
            absent.ip()
        );
    }

    #[tokio::test]
    async fn c13_answers_any_path_with_the_count_and_closes_when_the_service_goes() {
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let metrics = Metrics::new();
        let mut servers = HealthCheckServers::new(health.clone(), None);
        let port = free_port();
        let loopback = [Ipv4Addr::LOCALHOST];

        servers.sync(&[check("web", port, 2)], &loopback, &metrics);
        let (code, head, body) = get(port, "/anything").await.expect("served");
        assert_eq!(code, 200, "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        assert!(
            head.contains("x-load-balancing-endpoint-weight: 2"),
            "{head}"
        );
        assert_eq!(body, super::body("default", "web", 2, true));
        assert_eq!(gauge(&metrics, "open"), 1);

        // C12: no local endpoint left: 503, weight 0, same server.
        servers.sync(&[check("web", port, 0)], &loopback, &metrics);
        let (code, head, body) = get(port, "/healthz").await.expect("served");
        assert_eq!(code, 503);
        assert!(
            head.contains("x-load-balancing-endpoint-weight: 0"),
            "{head}"
        );
        assert!(body.contains("\"localEndpoints\": 0"), "{body}");

        // An agent that is not keeping up fails every check, endpoints or not.
        servers.sync(&[check("web", port, 1)], &loopback, &metrics);
        health.queued(Instant::now() - Duration::from_secs(120));
        let (code, _, body) = get(port, "/").await.expect("served");
        assert_eq!(code, 503);
        assert!(body.contains("\"serviceProxyHealthy\": false"), "{body}");
        health.updated(Instant::now(), std::time::SystemTime::now());

        servers.sync(&[], &loopback, &metrics);
        wait_closed(port).await;
        assert_eq!(gauge(&metrics, "open"), 0);
    }

    #[tokio::test]
    async fn a_port_change_moves_the_server() {
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let metrics = Metrics::new();
        let mut servers = HealthCheckServers::new(health, None);
        let [first, second] = free_ports();
        let loopback = [Ipv4Addr::LOCALHOST];
        servers.sync(&[check("web", first, 1)], &loopback, &metrics);
        assert_eq!(get(first, "/").await.expect("served").0, 200);
        servers.sync(&[check("web", second, 1)], &loopback, &metrics);
        wait_closed(first).await;
        assert_eq!(get(second, "/").await.expect("served").0, 200);
    }

    /// `--nodeport-addresses` CIDRs or `primary`: the servers follow the node's addresses,
    /// keeping the listeners of addresses that stay (a stopped listener closes only once its
    /// task runs, so binding its address again in the same sync found it in use, and the
    /// Service went unserved until the next one).
    #[tokio::test]
    async fn the_servers_follow_the_nodes_addresses() {
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let metrics = Metrics::new();
        let mut servers = HealthCheckServers::new(health, None);
        let port = free_port();
        let (one, two) = (Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 2));
        let checks = [check("web", port, 1)];

        servers.sync(&checks, &[one], &metrics);
        servers.sync(&checks, &[one, two], &metrics);
        assert_eq!(gauge(&metrics, "failed"), 0);
        for addr in [one, two] {
            assert_eq!(
                get_at(addr, port, "/").await.expect("served").0,
                200,
                "{addr}"
            );
        }
        servers.sync(&checks, &[two], &metrics);
        assert_eq!(get_at(two, port, "/").await.expect("served").0, 200);
        wait_closed(port).await;
        assert_eq!(gauge(&metrics, "open"), 1);
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_and_retried_at_the_next_sync() {
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let metrics = Metrics::new();
        let mut servers = HealthCheckServers::new(health, None);
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = squatter.local_addr().expect("addr").port();
        let other = free_port();
        let loopback = [Ipv4Addr::LOCALHOST];
        let checks = [check("web", port, 1), check("api", other, 1)];

        servers.sync(&checks, &loopback, &metrics);
        assert_eq!(gauge(&metrics, "failed"), 1);
        assert_eq!(gauge(&metrics, "open"), 1, "the other Service is served");

        drop(squatter);
        servers.sync(&checks, &loopback, &metrics);
        assert_eq!(gauge(&metrics, "failed"), 0);
        assert_eq!(gauge(&metrics, "open"), 2);
        assert_eq!(get(port, "/").await.expect("served").0, 200);
    }
}
