//! The Kubernetes source: kube-runtime watchers into reflector stores, with kube-proxy's
//! server-side selection (`!service.kubernetes.io/service-proxy-name,
//! !service.kubernetes.io/headless` on Services and EndpointSlices, `metadata.name` on
//! Nodes).
//!
//! The stores swap in a re-list atomically (a 410 Gone, a reconnect after an outage), so a
//! snapshot is never a half-listed world: the agent diffs against it and converges without
//! flushing anything. Between re-lists, the watch events name the objects that changed,
//! and a delta hands over just those.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::client::ConfigExt;
use kube::client::retry::RetryPolicy;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use prometheus_client::metrics::counter::Counter;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder};

use super::{Delta, ObjectKey, Snapshot, object_key, proxy_label_selector};
use crate::metrics::{RestClientMetrics, SourceChanges};

/// How to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// A kubeconfig file; otherwise `KUBECONFIG`, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Overrides the server address (kube-proxy's `--master`): with kube-proxy replaced, the
    /// `kubernetes` Service is served by this agent, so it must not depend on it.
    pub master: Option<String>,
    /// How long a connection may bring nothing (`--api-read-timeout`) when the kubeconfig
    /// sets no read timeout; `None`: forever.
    pub read_timeout: Option<Duration>,
}

/// Builds a client from the connection settings; its requests are counted in `rest`.
pub async fn client(conn: &Connection, rest: RestClientMetrics) -> Result<Client> {
    let mut config = match &conn.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig (--kubeconfig, KUBECONFIG) and not running in a cluster")?,
    };
    if config.read_timeout.is_none() {
        config.read_timeout = conn.read_timeout;
        // Counted from the request, not from when its pooled connection went idle.
        config.reset_reader_on_write = true;
    }
    if let Some(master) = &conn.master {
        config.cluster_url = master
            .parse()
            .with_context(|| format!("invalid API server address {master:?}"))?;
    }
    if config.proxy_url.is_some() {
        // Proxies are kube's own stack's business (this build has no proxy support: it
        // refuses them with its own error).
        return Client::try_from(config).context("creating the Kubernetes client");
    }
    client_with_keepalive(config, rest).context("creating the Kubernetes client")
}

/// TCP keepalive on the API server connections, so that one that dies without a word (a
/// load balancer's failover, a lost NAT entry, a partition) fails within about 30 s and the
/// watchers connect again, as client-go's HTTP/2 health check (a ping after 30 s without a
/// frame, 15 s for its answer) notices one within 45 s. Without it a watch that carries no
/// events waits for its idle timeout: the server's 290 s and kube-runtime's margin, stale
/// Services meanwhile.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;
/// Data sent into a dead connection (a request) goes unacknowledged this long at most.
const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// kube's client stack as `Client::try_from` builds it (TLS from the config; the config's
/// connect timeout over the TCP and TLS handshakes, its write and read timeouts; the API
/// server's base URI, authentication with token refresh, extra headers, retries of 429 /
/// 503 / 504), with [`KEEPALIVE_IDLE`] on its TCP connector, which `try_from` offers no way
/// to set: the custom-client idiom of kube's `ConfigExt`. Left out: kube's debug-level HTTP
/// spans, and the expiry an exec plugin's client certificate gives the client. Each
/// request sent (each try of a retried one, as client-go counts them) goes to `rest`.
fn client_with_keepalive(config: kube::Config, rest: RestClientMetrics) -> Result<Client> {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_keepalive(Some(KEEPALIVE_IDLE));
    tcp.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
    tcp.set_keepalive_retries(Some(KEEPALIVE_PROBES));
    tcp.set_tcp_user_timeout(Some(USER_TIMEOUT));
    let https = config.rustls_https_connector_with_connector(tcp)?;
    // An API server that takes the connection but never answers the TLS handshake (frozen,
    // or behind a load balancer) is left after the connect timeout, for another one.
    let mut timed = hyper_timeout::TimeoutConnector::new(https);
    timed.set_connect_timeout(config.connect_timeout);
    timed.set_read_timeout(config.read_timeout);
    timed.set_write_timeout(config.write_timeout);
    timed.set_reset_reader_on_write(config.reset_reader_on_write);
    let http: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(timed);
    let host = config
        .cluster_url
        .authority()
        .map(ToString::to_string)
        .unwrap_or_default();
    let metered = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let (http, rest, host) = (http.clone(), rest.clone(), host.clone());
        async move {
            let method = request.method().to_string();
            let started = std::time::Instant::now();
            let response = http.request(request).await;
            let code = response.as_ref().ok().map(|r| r.status().as_u16());
            rest.observe(&method, &host, code, started.elapsed());
            response
        }
    });
    let retry = config
        .default_retry
        .then(|| RetryLayer::new(RetryPolicy::server_retry()));
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(metered);
    Ok(Client::new(service, config.default_namespace))
}

/// Reflector stores of the three resources, kept up to date by background tasks.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    pending: Arc<Mutex<Pending>>,
    counted: SourceChanges,
}

/// What the watchers saw since the agent last read the stores.
#[derive(Debug, Default)]
struct Pending {
    services: BTreeSet<ObjectKey>,
    slices: BTreeSet<ObjectKey>,
    /// The changed Services kube-proxy's IPv4 tracker would hold (`proxied`): its pending
    /// Service changes.
    proxied_services: BTreeSet<ObjectKey>,
    /// Updates of IPv4 and IPv6 slices (`tracked_slice`), each counted: its pending endpoint
    /// changes.
    slice_events: u64,
    /// A store swapped in a re-list: only a snapshot tells what changed.
    relisted: bool,
}

impl Pending {
    fn service_changed(&mut self, service: &Service) {
        let key = object_key(&service.metadata);
        if proxied(service) {
            self.proxied_services.insert(key.clone());
        }
        self.services.insert(key);
    }

    fn slice_changed(&mut self, slice: &EndpointSlice) {
        self.slices.insert(object_key(&slice.metadata));
        if tracked_slice(slice) {
            self.slice_events += 1;
        }
    }

    /// kube-proxy's pending-change gauges for what is recorded now.
    fn show(&self, counted: &SourceChanges) {
        counted
            .services_pending
            .set(i64::try_from(self.proxied_services.len()).unwrap_or(i64::MAX));
        counted
            .endpoints_pending
            .set(i64::try_from(self.slice_events).unwrap_or(i64::MAX));
    }
}

/// Whether kube-proxy's endpoint change tracker takes `slice` at all: IPv4 and IPv6 ones,
/// not FQDN ones.
fn tracked_slice(slice: &EndpointSlice) -> bool {
    slice.address_type != "FQDN"
}

/// Whether kube-proxy's IPv4 proxier proxies `service` at all: not ExternalName, not
/// headless, with an IPv4 cluster IP. Its change tracker drops the changes of any other
/// (their port maps are empty before and after), so they are never pending there.
fn proxied(service: &Service) -> bool {
    let Some(spec) = &service.spec else {
        return false;
    };
    let mut ips = spec.cluster_ips.iter().flatten().chain(&spec.cluster_ip);
    spec.type_.as_deref() != Some("ExternalName")
        && ips.any(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
}

impl KubeSource {
    /// Starts the watchers; every change (and every completed re-list) sends on `changed`,
    /// and the changes are counted in `counted`.
    pub fn start(
        client: Client,
        node_name: &str,
        changed: mpsc::Sender<()>,
        counted: SourceChanges,
    ) -> Self {
        let selector = proxy_label_selector();
        let pending = Arc::new(Mutex::new(Pending::default()));
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(&selector),
            changed.clone(),
            Some(Track {
                pending: pending.clone(),
                record: Pending::service_changed,
                tracked: |_| true,
                total: counted.services_total.clone(),
                counted: counted.clone(),
            }),
        );
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&selector),
            changed.clone(),
            Some(Track {
                pending: pending.clone(),
                record: Pending::slice_changed,
                tracked: tracked_slice,
                total: counted.endpoints_total.clone(),
                counted: counted.clone(),
            }),
        );
        // The Node is read whole at every sync.
        let nodes = spawn_reflector(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            changed,
            None,
        );
        KubeSource {
            services,
            slices,
            nodes,
            pending,
            counted,
        }
    }

    /// Waits until every store has completed its first list: syncing before that would
    /// take an empty store for "no Services" and delete what an earlier run programmed.
    pub async fn wait_until_ready(&self) -> Result<()> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        Ok(())
    }

    /// What the watchers saw since the last read, which this read covers. Taken before the
    /// stores are read: a watcher records an event after its store applied it, so an event
    /// not taken now is either in what is read now or recorded for the next read.
    fn take_pending(&self) -> Pending {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let taken = std::mem::take(&mut *pending);
        pending.show(&self.counted);
        taken
    }

    pub fn snapshot(&self) -> Snapshot {
        self.take_pending();
        Snapshot {
            services: Arc::new(self.services.state()),
            slices: Arc::new(self.slices.state()),
            node: self.nodes.state().first().cloned(),
            skipped: Vec::new(),
        }
    }

    /// The objects the watchers saw change since the last snapshot or delta, as the stores
    /// hold them now; `None` after a re-list, which only a snapshot can tell.
    pub fn delta(&self) -> Option<Delta> {
        let pending = self.take_pending();
        if pending.relisted {
            return None;
        }
        Some(Delta {
            services: current(&self.services, pending.services),
            slices: current(&self.slices, pending.slices),
            node: self.nodes.state().first().cloned(),
            skipped: Vec::new(),
        })
    }
}

/// Each key with its object in `store` now (`None`: deleted).
fn current<K>(store: &Store<K>, keys: BTreeSet<ObjectKey>) -> Vec<(ObjectKey, Option<Arc<K>>)>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    keys.into_iter()
        .map(|key| {
            let object = store.get(&ObjectRef::new(&key.1).within(&key.0));
            (key, object)
        })
        .collect()
}

/// `kubectl apply`'s copy of the whole object, as JSON, in every object it applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what the API server sends with every object and the agent never reads, before it
/// reaches the store: the field managers' records and `kubectl apply`'s copy of the object.
/// Both grow with the object and would otherwise be held for every Service and
/// EndpointSlice of the cluster.
fn trim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// Where and how a watcher records the objects it saw change.
struct Track<K> {
    pending: Arc<Mutex<Pending>>,
    record: fn(&mut Pending, &K),
    /// Whether kube-proxy's tracker counts the object's events in `total`.
    tracked: fn(&K) -> bool,
    total: Counter,
    counted: SourceChanges,
}

/// One watcher into one store, in a task of its own. Errors (the API server away, a 410)
/// are logged and retried with backoff by the watcher; the store keeps its last state.
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: mpsc::Sender<()>,
    track: Option<Track<K>>,
) -> Store<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&Default::default()).into_owned();
    let stream = reflector::reflector(
        writer,
        watcher(api, config).default_backoff().modify(trim::<K>),
    );
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let object = match &event {
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => Some(o),
                Ok(watcher::Event::InitDone) => None,
                // A (re-)list's objects: kube-proxy's informer hands each to its tracker
                // too. Only the snapshot a re-list forces tells what changed.
                Ok(watcher::Event::InitApply(o)) => {
                    if let Some(track) = track.as_ref().filter(|t| (t.tracked)(o)) {
                        track.total.inc();
                    }
                    continue;
                }
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!("watching {kind}: {e}; retrying");
                    continue;
                }
            };
            if let Some(track) = &track {
                let mut pending = track.pending.lock().unwrap_or_else(|p| p.into_inner());
                match object {
                    Some(object) => {
                        (track.record)(&mut pending, object);
                        pending.show(&track.counted);
                        if (track.tracked)(object) {
                            track.total.inc();
                        }
                    }
                    None => pending.relisted = true,
                }
            }
            // A full channel already holds a pending "changed".
            let _ = changed.try_send(());
        }
    });
    store
}

#[cfg(test)]
mod trim_tests {
    use super::*;

    #[test]
    fn managed_fields_and_the_last_applied_copy_are_dropped_other_metadata_kept() {
        let mut slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
                "annotations": {
                    "endpoints.kubernetes.io/last-change-trigger-time": "2026-11-27T05:00:00Z",
                    LAST_APPLIED: "{\"apiVersion\":\"discovery.k8s.io/v1\"}",
                },
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}],
            },
            "addressType": "IPv4",
            "endpoints": [],
        }))
        .expect("a valid EndpointSlice");
        trim(&mut slice);
        let meta = &slice.metadata;
        assert_eq!(meta.managed_fields, None);
        let annotations = meta.annotations.as_ref().expect("annotations");
        assert!(!annotations.contains_key(LAST_APPLIED));
        // What translate and the metrics read stays.
        assert!(annotations.contains_key("endpoints.kubernetes.io/last-change-trigger-time"));
        assert_eq!(
            meta.labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name")),
            Some(&"web".to_owned())
        );
    }
}

#[cfg(test)]
mod pending_tests {
    use super::*;

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "default"},
            "spec": spec,
        }))
        .expect("a valid Service")
    }

    fn slice(address_type: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s-1", "namespace": "default"},
            "addressType": address_type,
            "endpoints": [],
        }))
        .expect("a valid EndpointSlice")
    }

    /// As kube-proxy's IPv4 change trackers: Services it does not proxy are never pending;
    /// FQDN slices are not endpoint changes; every other slice update is one.
    #[test]
    fn pending_changes_count_what_kube_proxys_trackers_count() {
        let mut pending = Pending::default();
        for spec in [
            serde_json::json!({"clusterIP": "None"}),
            serde_json::json!({"type": "ExternalName", "externalName": "db.example.com"}),
            serde_json::json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10"]}),
        ] {
            pending.service_changed(&service(spec));
        }
        pending.slice_changed(&slice("FQDN"));
        assert_eq!(
            (pending.proxied_services.len(), pending.slice_events),
            (0, 0)
        );
        // ...but the delta still reads them.
        assert_eq!((pending.services.len(), pending.slices.len()), (1, 1));

        let dual =
            serde_json::json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.10"]});
        pending.service_changed(&service(dual));
        pending.service_changed(&service(serde_json::json!({"clusterIP": "10.96.0.10"})));
        pending.slice_changed(&slice("IPv4"));
        pending.slice_changed(&slice("IPv4"));
        pending.slice_changed(&slice("IPv6"));
        assert_eq!(
            (pending.proxied_services.len(), pending.slice_events),
            (1, 3)
        );

        let counted = SourceChanges::default();
        pending.show(&counted);
        assert_eq!(
            (
                counted.services_pending.get(),
                counted.endpoints_pending.get()
            ),
            (1, 3)
        );
    }
}
