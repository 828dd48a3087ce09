//! A stand-in for kube-apiserver, in process, for the resources the agent watches: core/v1
//! `services`, discovery.k8s.io/v1 `endpointslices` and core/v1 `nodes`; and the one it
//! writes, events.k8s.io/v1 `events`.
//!
//! No kube-apiserver can be installed on the machines these tests run on, so the Kubernetes
//! path is tested against this server instead. It speaks the real wire protocol to a real
//! `kube::Client` (or to the agent in another process, through [`ApiServer::kubeconfig_yaml`]):
//!
//! - LIST with `labelSelector`, `fieldSelector`, `resourceVersion` and
//!   `resourceVersionMatch` semantics (`""` most recent, `"0"`/`NotOlderThan` current state,
//!   `Exact` the state at that revision or 410 Expired once compacted). `limit` is accepted
//!   but never cuts a list: every list is one page without a continue token, which is a
//!   valid answer to a paged request (kube-rs and client-go stop paging there). As no token
//!   is ever issued, a `continue` parameter is refused with 400.
//! - WATCH (`watch=true`) from a resourceVersion, with `allowWatchBookmarks`, `timeoutSeconds`
//!   and `sendInitialEvents`: ADDED/MODIFIED/DELETED/BOOKMARK lines, selector transitions as
//!   ADDED/DELETED, and a 410 ERROR event for a resourceVersion older than the compaction
//!   point.
//! - GET, POST, PUT, PATCH (JSON merge patch only), DELETE, and `/status` for Services and
//!   Nodes, with the apiserver's defaults, allocations and `Status` errors; the same for
//!   Events (no `/status`), with the events.k8s.io/v1 validation of required and immutable
//!   fields (what an event recorder's create and series patches go through).
//!
//! The test controls are methods on [`ApiServer`], not HTTP endpoints: [`ApiServer::compact`]
//! (force the 410 path), [`ApiServer::disconnect_watches`] (an apiserver restart, as seen by
//! watches), [`ApiServer::bookmark`], [`ApiServer::stop`]/[`ApiServer::restart`] (an outage
//! on the same address), and per-resource request counters to assert on.
//!
//! Not modelled: namespaces as objects (every namespace exists), finalizers and graceful
//! deletion, `managedFields`, strategic-merge and server-side-apply patches (415), `dryRun`
//! (400), authentication, discovery, and protobuf or table output.

mod registry;
mod selector;
mod status;
mod store;
mod strategy;
mod watch;

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::DeleteOptions;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch as signal};
use tokio::task::JoinHandle;

use self::selector::{FieldSelector, LabelSelector};
use self::status::ApiError;
use self::store::{ObjectKey, Store};
use self::strategy::{StoredKind, WithStatus};

/// The resources the stand-in serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ApiResource {
    Services,
    EndpointSlices,
    Nodes,
    Events,
}

impl ApiResource {
    pub const ALL: [ApiResource; 4] = [
        ApiResource::Services,
        ApiResource::EndpointSlices,
        ApiResource::Nodes,
        ApiResource::Events,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The resource name in URLs and in `Status` details.
    pub fn plural(self) -> &'static str {
        match self {
            ApiResource::Services => "services",
            ApiResource::EndpointSlices => "endpointslices",
            ApiResource::Nodes => "nodes",
            ApiResource::Events => "events",
        }
    }

    fn group(self) -> &'static str {
        match self {
            ApiResource::EndpointSlices => "discovery.k8s.io",
            ApiResource::Events => "events.k8s.io",
            ApiResource::Services | ApiResource::Nodes => "",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            ApiResource::EndpointSlices => "discovery.k8s.io/v1",
            ApiResource::Events => "events.k8s.io/v1",
            ApiResource::Services | ApiResource::Nodes => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            ApiResource::Services => "Service",
            ApiResource::EndpointSlices => "EndpointSlice",
            ApiResource::Nodes => "Node",
            ApiResource::Events => "Event",
        }
    }

    fn namespaced(self) -> bool {
        self != ApiResource::Nodes
    }

    /// `services`, `endpointslices.discovery.k8s.io`: how error messages name the resource.
    fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            group => format!("{}.{group}", self.plural()),
        }
    }
}

/// What clients have asked of one resource so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// LIST requests (GET on the collection without `watch`).
    pub list_requests: u64,
    /// WATCH requests, including those answered with a 410 ERROR event.
    pub watch_requests: u64,
    /// Watch streams being served right now.
    pub open_watches: u64,
}

/// Settings of a stand-in.
#[derive(Clone, Debug)]
pub struct Options {
    /// How often an open watch that asked for bookmarks gets one unprompted. The apiserver
    /// sends them about once a minute; tests that want one now call [`ApiServer::bookmark`].
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bookmark_interval: Duration::from_secs(60),
        }
    }
}

/// State shared by the handle and every request.
struct Shared {
    store: Mutex<Store>,
    /// Ticks on every change to the store or its counters: watches and waiters re-read.
    changes: signal::Sender<u64>,
    options: Options,
    requests: Mutex<Vec<String>>,
}

impl Shared {
    /// A panicking request must not take the whole stand-in down with a poisoned lock.
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changes.send_modify(|tick| *tick += 1);
    }

    fn subscribe(&self) -> signal::Receiver<u64> {
        self.changes.subscribe()
    }

    fn write<R>(&self, change: impl FnOnce(&mut Store) -> R) -> R {
        let result = change(&mut self.lock());
        self.notify();
        result
    }
}

/// A running stand-in, listening on `127.0.0.1` on a port of its own. Dropping it ends the
/// open watches and shuts the server down.
pub struct ApiServer {
    shared: Arc<Shared>,
    address: SocketAddr,
    serving: Option<Serving>,
    /// While stopped, a socket bound to `address` and not listening: connections are
    /// refused, and no other socket (another test's client) can take the port before
    /// [`ApiServer::restart`] listens on it again.
    held: Option<TcpSocket>,
}

struct Serving {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ApiServer {
    pub async fn start() -> io::Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> io::Result<Self> {
        let (changes, _) = signal::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            changes,
            options,
            requests: Mutex::new(Vec::new()),
        });
        // Loopback only: the stand-in has no authentication.
        let socket = port_socket((Ipv4Addr::LOCALHOST, 0).into())?;
        let address = socket.local_addr()?;
        let serving = Some(serve(socket.listen(1024)?, shared.clone()));
        Ok(ApiServer {
            shared,
            address,
            serving,
            held: None,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A kubeconfig for this server (plain HTTP, no credentials), for
    /// `kube::Config::from_custom_kubeconfig` or for the agent's `--kubeconfig`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: standin
  cluster:
    server: {url}
users:
- name: standin
  user: {{}}
contexts:
- name: standin
  context:
    cluster: standin
    user: standin
    namespace: default
current-context: standin
preferences: {{}}
",
            url = self.url()
        )
    }

    /// A `kube::Client` configured from [`ApiServer::kubeconfig_yaml`], the path the agent
    /// takes. Panics if kube rejects the kubeconfig, which would be a bug here.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml())
            .expect("the stand-in's kubeconfig parses");
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("kube accepts the stand-in's kubeconfig");
        kube::Client::try_from(config).expect("a client for the stand-in")
    }

    /// Makes every resourceVersion up to now too old, as an etcd compaction (or a watch
    /// cache that has moved on) does: open watches get a 410 Expired ERROR event and end;
    /// later watches and `Exact` lists from those versions get 410 too.
    pub fn compact(&self) {
        self.shared.write(Store::compact);
    }

    /// Ends every open watch stream cleanly, without an error event, as an apiserver
    /// restart does. Clients watch again from their last resourceVersion.
    pub fn disconnect_watches(&self) {
        self.shared.write(|store| store.epochs.disconnects += 1);
    }

    /// Sends a BOOKMARK with the current resourceVersion on every open watch that asked for
    /// bookmarks (after any events still to be sent).
    pub fn bookmark(&self) {
        self.shared.write(|store| store.epochs.bookmarks += 1);
    }

    /// The store's current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().revision()
    }

    pub fn activity(&self, resource: ApiResource) -> Activity {
        self.shared.lock().activity(resource)
    }

    pub fn list_requests(&self, resource: ApiResource) -> u64 {
        self.activity(resource).list_requests
    }

    pub fn watch_requests(&self, resource: ApiResource) -> u64 {
        self.activity(resource).watch_requests
    }

    /// Waits until the resource's activity satisfies `condition` (for instance "a watch is
    /// open"). Callers bound it with `tokio::time::timeout`.
    pub async fn wait_for(&self, resource: ApiResource, condition: impl Fn(&Activity) -> bool) {
        let mut changes = self.shared.subscribe();
        while !condition(&self.activity(resource)) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Every request received so far, as `METHOD path?query`, oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// An outage: ends the open watches, stops accepting connections and waits until the
    /// server has closed them all. The objects and resourceVersions are kept, as etcd keeps
    /// them while the apiserver is away.
    pub async fn stop(&mut self) {
        self.shared.write(|store| store.stopping = true);
        if self.serving.is_some() && self.held.is_none() {
            // Bound beside the listener (SO_REUSEPORT), it keeps the port once that closes.
            self.held = Some(port_socket(self.address).expect("holding the stand-in's port"));
        }
        if let Some(Serving { stop, task }) = self.serving.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    /// A second apiserver on the same store, like another instance of an HA control plane:
    /// writes made through it while this one is stopped are what a watcher of this one must
    /// catch up on when it returns. Keep it alive until the end of the test (dropping any
    /// instance ends the open watches of all).
    pub async fn replica(&self) -> io::Result<ApiServer> {
        let socket = port_socket(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let address = socket.local_addr()?;
        Ok(ApiServer {
            shared: self.shared.clone(),
            address,
            serving: Some(serve(socket.listen(1024)?, self.shared.clone())),
            held: None,
        })
    }

    /// Serves again on the same address after [`ApiServer::stop`].
    pub async fn restart(&mut self) -> io::Result<()> {
        if self.serving.is_none() {
            let socket = match self.held.take() {
                Some(socket) => socket,
                None => port_socket(self.address)?,
            };
            let listener = socket.listen(1024)?;
            self.shared.write(|store| store.stopping = false);
            self.serving = Some(serve(listener, self.shared.clone()));
        }
        Ok(())
    }
}

/// A TCP socket bound to `address` with SO_REUSEPORT, so that a second one can hold the
/// port while the first still listens.
fn port_socket(address: SocketAddr) -> io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    Ok(socket)
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.write(|store| store.stopping = true);
        if let Some(Serving { stop, .. }) = self.serving.take() {
            let _ = stop.send(());
        }
    }
}

fn serve(listener: TcpListener, shared: Arc<Shared>) -> Serving {
    let (stop, stopped) = oneshot::channel::<()>();
    let app = router(shared);
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            eprintln!("API stand-in stopped serving: {e}");
        }
    });
    Serving { stop, task }
}

fn router(shared: Arc<Shared>) -> Router {
    let services = "/api/v1/namespaces/{namespace}/services";
    let slices = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices";
    let events = "/apis/events.k8s.io/v1/namespaces/{namespace}/events";
    Router::new()
        .route("/api/v1/services", get(collection::<Service>))
        .route(services, get(collection::<Service>).post(create::<Service>))
        .route(&format!("{services}/{{name}}"), object_routes::<Service>())
        .route(
            &format!("{services}/{{name}}/status"),
            status_routes::<Service>(),
        )
        .route(
            "/apis/discovery.k8s.io/v1/endpointslices",
            get(collection::<EndpointSlice>),
        )
        .route(
            slices,
            get(collection::<EndpointSlice>).post(create::<EndpointSlice>),
        )
        .route(
            &format!("{slices}/{{name}}"),
            object_routes::<EndpointSlice>(),
        )
        .route(
            "/api/v1/nodes",
            get(collection::<Node>).post(create::<Node>),
        )
        .route("/api/v1/nodes/{name}", object_routes::<Node>())
        .route("/api/v1/nodes/{name}/status", status_routes::<Node>())
        .route("/apis/events.k8s.io/v1/events", get(collection::<Event>))
        .route(events, get(collection::<Event>).post(create::<Event>))
        .route(&format!("{events}/{{name}}"), object_routes::<Event>())
        .route("/version", get(version))
        .route("/healthz", get(healthy))
        .route("/livez", get(healthy))
        .route("/readyz", get(healthy))
        .fallback(|| async { ApiError::no_such_path() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            record_request,
        ))
        .with_state(shared)
}

fn object_routes<K: StoredKind>() -> axum::routing::MethodRouter<Arc<Shared>> {
    get(read::<K>)
        .put(replace::<K>)
        .patch(patch::<K>)
        .delete(delete::<K>)
}

fn status_routes<K: WithStatus>() -> axum::routing::MethodRouter<Arc<Shared>> {
    get(read::<K>)
        .put(replace_status::<K>)
        .patch(patch_status::<K>)
}

async fn record_request(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let line = format!("{} {}", request.method(), request.uri());
    shared
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(line);
    next.run(request).await
}

async fn healthy() -> &'static str {
    "ok"
}

/// `/version`, so `kube::Client::apiserver_version` works as a connectivity check.
async fn version() -> Json<Value> {
    Json(json!({
        "major": "1",
        "minor": "37",
        "gitVersion": "v1.37.0-standin",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "none",
        "compiler": "rustc",
        "platform": "linux/amd64",
    }))
}

/// The `{namespace}` and `{name}` of the matched route, if it has them.
struct Target {
    namespace: Option<String>,
    name: Option<String>,
}

impl Target {
    fn key(&self, resource: ApiResource) -> Result<ObjectKey, ApiError> {
        let name = self.name.clone().ok_or_else(ApiError::no_such_path)?;
        Ok(ObjectKey {
            resource,
            namespace: self.namespace.clone().unwrap_or_default(),
            name,
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(mut params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        Ok(Target {
            namespace: params.remove("namespace"),
            name: params.remove("name"),
        })
    }
}

/// The query string, decoded; a malformed one is a 400 `Status`.
struct Params(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let Query(params) = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        Ok(Params(params))
    }
}

impl Params {
    fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Booleans as Go's `strconv.ParseBool` reads them.
    fn flag(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.text(name) {
            None => Ok(None),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid value for {name}: {other:?}"
            ))),
        }
    }

    fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.text(name)
            .map(|text| {
                text.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid value for {name}: {text:?}"))
                })
            })
            .transpose()
    }

    /// Writes here are real; a client asking for a dry run must not get one silently.
    fn refuse_dry_run(&self) -> Result<(), ApiError> {
        match self.text("dryRun") {
            Some(_) => Err(ApiError::bad_request(
                "dryRun is not implemented by the API stand-in",
            )),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VersionMatch {
    NotOlderThan,
    Exact,
}

/// The query of a GET on a collection.
struct ListOptions {
    labels: LabelSelector,
    fields: FieldSelector,
    resource_version: String,
    version_match: Option<VersionMatch>,
    limit: Option<u64>,
    watch: bool,
    bookmarks: bool,
    timeout: Option<u64>,
    send_initial_events: Option<bool>,
}

impl ListOptions {
    fn parse(params: &Params, resource: ApiResource) -> Result<Self, ApiError> {
        let version_match = match params.text("resourceVersionMatch").unwrap_or("") {
            "" => None,
            "NotOlderThan" => Some(VersionMatch::NotOlderThan),
            "Exact" => Some(VersionMatch::Exact),
            other => {
                return Err(ApiError::invalid_list_options(
                    "resourceVersionMatch",
                    &format!(
                        "Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\""
                    ),
                ));
            }
        };
        if params.text("continue").is_some_and(|c| !c.is_empty()) {
            // Lists are never cut into pages, so no client holds a token of ours.
            return Err(ApiError::bad_request(
                "continue key is not valid: the API stand-in never issues continue tokens",
            ));
        }
        Ok(ListOptions {
            labels: LabelSelector::parse(params.text("labelSelector").unwrap_or(""))?,
            fields: FieldSelector::parse(params.text("fieldSelector").unwrap_or(""), resource)?,
            resource_version: params.text("resourceVersion").unwrap_or("").to_string(),
            version_match,
            limit: params.number("limit")?,
            watch: params.flag("watch")?.unwrap_or(false),
            bookmarks: params.flag("allowWatchBookmarks")?.unwrap_or(false),
            timeout: params.number("timeoutSeconds")?,
            send_initial_events: params.flag("sendInitialEvents")?,
        })
    }

    /// The explicit resourceVersion, if one other than "" or "0" was given.
    fn revision(&self) -> Result<Option<u64>, ApiError> {
        match self.resource_version.as_str() {
            "" | "0" => Ok(None),
            text => text
                .parse::<u64>()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {text:?}"))),
        }
    }
}

/// GET on a collection: a LIST, or a WATCH with `watch=true`.
async fn collection<K: StoredKind>(
    State(shared): State<Arc<Shared>>,
    target: Target,
    params: Params,
) -> Result<Response, ApiError> {
    let options = ListOptions::parse(&params, K::RESOURCE)?;
    if options.watch {
        start_watch(shared, K::RESOURCE, target.namespace, options)
    } else {
        list(&shared, K::RESOURCE, target.namespace, &options)
    }
}

/// A whole collection in one page. `resourceVersion` semantics as documented for LIST: unset
/// is a consistent read of the current state, "0" and `NotOlderThan` may be served from the
/// current state (so an old version never fails), `Exact` (or the legacy "a version and a
/// limit") is the state at exactly that revision, 410 Expired once compacted.
fn list(
    shared: &Shared,
    resource: ApiResource,
    namespace: Option<String>,
    options: &ListOptions,
) -> Result<Response, ApiError> {
    if options.version_match.is_some() && options.resource_version.is_empty() {
        return Err(ApiError::invalid_list_options(
            "resourceVersionMatch",
            "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
        ));
    }
    if options.version_match == Some(VersionMatch::Exact) && options.resource_version == "0" {
        return Err(ApiError::invalid_list_options(
            "resourceVersionMatch",
            "Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
        ));
    }
    let requested = options.revision()?;
    let (revision, items) = shared.write(|store| {
        store.activity_mut(resource).list_requests += 1;
        let current = store.revision();
        let exact = options.version_match == Some(VersionMatch::Exact)
            || (options.version_match.is_none() && options.limit.is_some_and(|l| l > 0));
        let (revision, objects) = match requested {
            Some(n) if n > current => return Err(ApiError::too_large_resource_version(n, current)),
            Some(n) if exact && n < store.compacted_at() => {
                return Err(ApiError::expired(n, store.compacted_at()));
            }
            Some(n) if exact => (n, store.objects_at(n, resource, namespace.as_deref())),
            _ => (
                current,
                store
                    .objects(resource, namespace.as_deref())
                    .cloned()
                    .collect(),
            ),
        };
        let items: Vec<Value> = objects
            .into_iter()
            .filter(|o| options.labels.matches(o) && options.fields.matches(o))
            .map(strip_type_meta)
            .collect();
        Ok((revision, items))
    })?;
    Ok(Json(json!({
        "kind": format!("{}List", resource.kind()),
        "apiVersion": resource.api_version(),
        "metadata": {"resourceVersion": revision.to_string()},
        "items": items,
    }))
    .into_response())
}

/// List items carry no kind or apiVersion on the wire: the list says what they are.
fn strip_type_meta(mut object: Value) -> Value {
    if let Some(fields) = object.as_object_mut() {
        fields.remove("kind");
        fields.remove("apiVersion");
    }
    object
}

fn start_watch(
    shared: Arc<Shared>,
    resource: ApiResource,
    namespace: Option<String>,
    options: ListOptions,
) -> Result<Response, ApiError> {
    match (options.send_initial_events, options.version_match) {
        (Some(_), match_) if match_ != Some(VersionMatch::NotOlderThan) => {
            return Err(ApiError::invalid_list_options(
                "resourceVersionMatch",
                "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        (Some(true), _) if !options.bookmarks => {
            return Err(ApiError::invalid_list_options(
                "allowWatchBookmarks",
                "Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
            ));
        }
        (None, Some(_)) => {
            return Err(ApiError::invalid_list_options(
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        _ => {}
    }
    let start = match (options.send_initial_events, options.revision()?) {
        (Some(true), _) => watch::Start::CurrentState { end_bookmark: true },
        (None, None) => watch::Start::CurrentState {
            end_bookmark: false,
        },
        (Some(false), None) => watch::Start::After(shared.lock().revision()),
        (_, Some(n)) => watch::Start::After(n),
    };
    // Without timeoutSeconds the apiserver picks 30-60 minutes.
    let timeout = Duration::from_secs(options.timeout.unwrap_or(1800));
    let selection = watch::Selection {
        resource,
        namespace,
        labels: options.labels,
        fields: options.fields,
    };
    let options = watch::WatchOptions {
        start,
        bookmarks: options.bookmarks,
        timeout,
    };
    Ok(watch::respond(shared, selection, options))
}

async fn read<K: StoredKind>(
    State(shared): State<Arc<Shared>>,
    target: Target,
) -> Result<Json<Value>, ApiError> {
    let key = target.key(K::RESOURCE)?;
    let object = shared.lock().get(&key).cloned();
    object
        .map(Json)
        .ok_or_else(|| ApiError::not_found(K::RESOURCE, &key.name))
}

async fn create<K: StoredKind>(
    State(shared): State<Arc<Shared>>,
    target: Target,
    params: Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    params.refuse_dry_run()?;
    let object = registry::decode::<K>(&body)?;
    let namespace = target.namespace.unwrap_or_default();
    let created = shared.write(|store| registry::create(store, &namespace, object))?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn replace<K: StoredKind>(
    State(shared): State<Arc<Shared>>,
    target: Target,
    params: Params,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    replace_with(
        &shared,
        &target,
        &params,
        &body,
        registry::prepare_main::<K>,
    )
}

async fn replace_status<K: WithStatus>(
    State(shared): State<Arc<Shared>>,
    target: Target,
    params: Params,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    replace_with(&shared, &target, &params, &body, prepare_status::<K>)
}

fn prepare_status<K: WithStatus>(new: K, old: &K, _: &Store, _: &ObjectKey) -> Result<K, ApiError> {
    Ok(K::status_update(old, new))
}

fn replace_with<K: StoredKind>(
    shared: &Shared,
    target: &Target,
    params: &Params,
    body: &[u8],
    prepare: registry::Prepare<K>,
) -> Result<Json<Value>, ApiError> {
    params.refuse_dry_run()?;
    let key = target.key(K::RESOURCE)?;
    let replacement = registry::decode::<K>(body)?;
    shared
        .write(|store| registry::update(store, key, prepare, |_| Ok(replacement)))
        .map(Json)
}

async fn patch<K: StoredKind>(
    State(shared): State<Arc<Shared>>,
    target: Target,
    params: Params,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    patch_with(
        &shared,
        &target,
        &params,
        &headers,
        &body,
        registry::prepare_main::<K>,
    )
}

async fn patch_status<K: WithStatus>(
    State(shared): State<Arc<Shared>>,
    target: Target,
    params: Params,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    patch_with(
        &shared,
        &target,
        &params,
        &headers,
        &body,
        prepare_status::<K>,
    )
}

/// PATCH with `application/merge-patch+json`, applied to the stored object under the same
/// lock as the write, so a patch never fails on a concurrent change the way a PUT can.
fn patch_with<K: StoredKind>(
    shared: &Shared,
    target: &Target,
    params: &Params,
    headers: &HeaderMap,
    body: &[u8],
    prepare: registry::Prepare<K>,
) -> Result<Json<Value>, ApiError> {
    params.refuse_dry_run()?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.split(';').next().map(str::trim) != Some("application/merge-patch+json") {
        return Err(ApiError::unsupported_media_type(content_type));
    }
    let key = target.key(K::RESOURCE)?;
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    shared
        .write(|store| {
            registry::update(store, key, prepare, |stored| {
                let mut patched = stored.clone();
                registry::merge_patch(&mut patched, &patch);
                registry::decode_value::<K>(patched)
            })
        })
        .map(Json)
}

/// DELETE. Services answer with the deleted object (their registry sets
/// `ReturnDeletedObject`), the other kinds with a `Status` of success.
async fn delete<K: StoredKind>(
    State(shared): State<Arc<Shared>>,
    target: Target,
    params: Params,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    params.refuse_dry_run()?;
    let key = target.key(K::RESOURCE)?;
    let options = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let options: DeleteOptions = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("DeleteOptions cannot be decoded: {e}")))?;
        if options.dry_run.as_ref().is_some_and(|d| !d.is_empty()) {
            return Err(ApiError::bad_request(
                "dryRun is not implemented by the API stand-in",
            ));
        }
        Some(options)
    };
    let deleted = shared.write(|store| registry::delete(store, &key, options))?;
    if K::RESOURCE == ApiResource::Services {
        return Ok(Json(deleted));
    }
    let uid = deleted
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    Ok(Json(status::deleted(K::RESOURCE, &key.name, uid)))
}
