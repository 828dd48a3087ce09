//! Pins down the API stand-in (tests/support/apiserver.rs) with the real `kube::Client`: if
//! these pass, the stand-in answers kube-rs the way kube-apiserver does for everything the
//! agent relies on (CRUD with optimistic concurrency, selection, list-then-watch, 410 and
//! re-list, reconnects, bookmarks).
//!
//! Waiting is on stream events and on the stand-in's own counters, each bounded by
//! [`PATIENCE`] as a hang guard; nothing sleeps in place of a condition.

mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use axum::http;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, PostParams, VersionMatch, WatchEvent, WatchParams};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::Value;
use tokio::sync::mpsc;

use support::apiserver::{ApiResource, ApiServer, Options};

/// Hang guard for every wait: far longer than any step takes, short enough to fail fast.
const PATIENCE: Duration = Duration::from_secs(10);

/// kube-proxy's server-side selection on Services and EndpointSlices.
const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

async fn standin() -> (ApiServer, Client) {
    let server = ApiServer::start().await.expect("starting the API stand-in");
    let client = server.client().await;
    (server, client)
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {PATIENCE:?}"))
}

fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

/// A Service as a user writes it: selector and one port, nothing the server fills in.
fn service(name: &str, labels: &[(&str, &str)]) -> Service {
    Service {
        metadata: meta(name, labels),
        spec: Some(ServiceSpec {
            selector: Some([("app".to_string(), name.to_string())].into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn endpoint_slice(name: &str, service: &str, addresses: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(name, &[("kubernetes.io/service-name", service)]),
        address_type: "IPv4".into(),
        endpoints: Some(
            addresses
                .iter()
                .map(|a| Endpoint {
                    addresses: vec![a.to_string()],
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            port: Some(8080),
            ..Default::default()
        }]),
    }
}

fn node(name: &str) -> Node {
    Node {
        metadata: meta(name, &[("topology.kubernetes.io/zone", "zone-a")]),
        ..Default::default()
    }
}

fn api_status(error: kube::Error) -> (u16, String, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason, status.message),
        other => panic!("expected an API Status error, got {other:?}"),
    }
}

fn names<K: Resource>(objects: impl IntoIterator<Item = K>) -> Vec<String> {
    objects.into_iter().map(|o| o.name_any()).collect()
}

/// What a watcher reported, reduced to what the tests assert on.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String),
    Delete(String),
    /// An ERROR event from the server, with its code.
    WatchError(u16),
    /// The request itself failed (server away).
    RequestFailed,
}

fn seen<K: Resource>(event: Result<Event<K>, watcher::Error>) -> Seen {
    match event {
        Ok(Event::Init) => Seen::Init,
        Ok(Event::InitApply(o)) => Seen::InitApply(o.name_any()),
        Ok(Event::InitDone) => Seen::InitDone,
        Ok(Event::Apply(o)) => Seen::Apply(o.name_any()),
        Ok(Event::Delete(o)) => Seen::Delete(o.name_any()),
        Err(watcher::Error::WatchError(status)) => Seen::WatchError(status.code),
        Err(_) => Seen::RequestFailed,
    }
}

/// Drives a watcher stream in a task of its own, as the agent does, so the watch stays open
/// while the test acts on the server.
fn forward<K, S>(stream: S) -> mpsc::UnboundedReceiver<Seen>
where
    K: Resource + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if tx.send(seen(event)).is_err() {
                return;
            }
        }
    });
    rx
}

async fn next(events: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    within("next watcher event", events.recv())
        .await
        .expect("the watcher stream ended")
}

/// Expects `Init`, `InitApply` per object, `InitDone`; returns the names listed.
async fn initial_list(events: &mut mpsc::UnboundedReceiver<Seen>) -> BTreeSet<String> {
    assert_eq!(next(events).await, Seen::Init);
    let mut listed = BTreeSet::new();
    loop {
        match next(events).await {
            Seen::InitApply(name) => {
                listed.insert(name);
            }
            Seen::InitDone => return listed,
            other => panic!("expected InitApply or InitDone, got {other:?}"),
        }
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

async fn watch_open(server: &ApiServer, resource: ApiResource) {
    within(
        "a watch to open",
        server.wait_for(resource, |a| a.open_watches >= 1),
    )
    .await;
}

#[tokio::test]
async fn create_fills_in_what_the_apiserver_owns() {
    let (server, client) = standin().await;
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");

    let web = services
        .create(&PostParams::default(), &service("web", &[]))
        .await
        .unwrap();
    let meta = &web.metadata;
    assert_eq!(
        meta.namespace.as_deref(),
        Some("shop"),
        "namespace comes from the path"
    );
    assert_eq!(
        meta.resource_version,
        Some(server.resource_version().to_string())
    );
    assert!(
        meta.uid.as_deref().is_some_and(|u| u.len() == 36),
        "uid {:?}",
        meta.uid
    );
    assert!(meta.creation_timestamp.is_some());
    let spec = web.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
    let cluster_ip = spec.cluster_ip.clone().unwrap();
    let address: Ipv4Addr = cluster_ip.parse().unwrap();
    assert_eq!(
        u32::from(address) >> 20,
        u32::from(Ipv4Addr::new(10, 96, 0, 0)) >> 20,
        "in 10.96.0.0/12"
    );
    assert_eq!(spec.cluster_ips, Some(vec![cluster_ip]));
    assert_eq!(spec.ip_families, Some(vec!["IPv4".to_string()]));
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(port.target_port, Some(IntOrString::Int(80)));
    assert!(web.status.is_some_and(|s| s.load_balancer.is_some()));

    let mut exposed = service("exposed", &[]);
    exposed.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    let exposed = services
        .create(&PostParams::default(), &exposed)
        .await
        .unwrap();
    let spec = exposed.spec.unwrap();
    let node_port = spec.ports.unwrap()[0].node_port.unwrap();
    assert!((30000..=32767).contains(&node_port), "{node_port}");
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
    assert_ne!(
        spec.cluster_ip,
        web.spec.unwrap().cluster_ip,
        "cluster IPs are unique"
    );

    let slices: Api<EndpointSlice> = Api::namespaced(client, "shop");
    let slice = slices
        .create(
            &PostParams::default(),
            &endpoint_slice("web-1", "web", &["10.1.0.1"]),
        )
        .await
        .unwrap();
    assert_eq!(slice.metadata.generation, Some(1));
    assert_eq!(slice.ports.unwrap()[0].protocol.as_deref(), Some("TCP"));
}

#[tokio::test]
async fn create_of_an_existing_name_is_409_already_exists() {
    let (_server, client) = standin().await;
    let services: Api<Service> = Api::namespaced(client, "shop");
    services
        .create(&PostParams::default(), &service("web", &[]))
        .await
        .unwrap();

    let error = services
        .create(&PostParams::default(), &service("web", &[]))
        .await
        .unwrap_err();
    let (code, reason, message) = api_status(error);
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(message, r#"services "web" already exists"#);
}

#[tokio::test]
async fn get_and_delete_of_a_missing_object_are_404_not_found() {
    let (_server, client) = standin().await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");

    let (code, reason, message) = api_status(slices.get("gone").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    assert_eq!(
        message,
        r#"endpointslices.discovery.k8s.io "gone" not found"#
    );
    let (code, reason, _) = api_status(
        slices
            .delete("gone", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    assert_eq!(slices.get_opt("gone").await.unwrap(), None);
    let nodes: Api<Node> = Api::all(client);
    let (code, _, _) = api_status(nodes.get("node-x").await.unwrap_err());
    assert_eq!(code, 404);
}

#[tokio::test]
async fn replace_with_a_stale_resource_version_is_409_conflict() {
    let (server, client) = standin().await;
    let services: Api<Service> = Api::namespaced(client, "shop");
    let created = services
        .create(&PostParams::default(), &service("web", &[]))
        .await
        .unwrap();

    let mut changed = created.clone();
    changed.labels_mut().insert("tier".into(), "front".into());
    let replaced = services
        .replace("web", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_eq!(
        replaced.labels().get("tier").map(String::as_str),
        Some("front")
    );
    assert_eq!(replaced.metadata.uid, created.metadata.uid);
    assert_eq!(
        replaced.spec.as_ref().unwrap().cluster_ip,
        created.spec.as_ref().unwrap().cluster_ip
    );
    assert_eq!(
        replaced.metadata.resource_version,
        Some(server.resource_version().to_string())
    );
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );

    // `changed` still carries the resourceVersion from before the replace.
    let error = services
        .replace("web", &PostParams::default(), &changed)
        .await
        .unwrap_err();
    let (code, reason, message) = api_status(error);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        message,
        r#"Operation cannot be fulfilled on services "web": the object has been modified; please apply your changes to the latest version and try again"#
    );

    // Without a resourceVersion the update is unconditional; without changes it writes nothing.
    let mut unconditional = replaced.clone();
    unconditional.metadata.resource_version = None;
    let again = services
        .replace("web", &PostParams::default(), &unconditional)
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        replaced.metadata.resource_version
    );
}

#[tokio::test]
async fn status_changes_only_through_the_status_subresource() {
    let (_server, client) = standin().await;
    let services: Api<Service> = Api::namespaced(client, "shop");
    let mut lb = service("lb", &[]);
    lb.spec.as_mut().unwrap().type_ = Some("LoadBalancer".into());
    let created = services.create(&PostParams::default(), &lb).await.unwrap();
    let ingress = LoadBalancerStatus {
        ingress: Some(vec![LoadBalancerIngress {
            ip: Some("192.0.2.10".into()),
            ..Default::default()
        }]),
    };

    let mut through_main = created.clone();
    through_main.status.as_mut().unwrap().load_balancer = Some(ingress.clone());
    let ignored = services
        .replace("lb", &PostParams::default(), &through_main)
        .await
        .unwrap();
    assert_eq!(
        ignored.status.clone().unwrap().load_balancer,
        Some(LoadBalancerStatus::default())
    );

    let mut through_status = ignored.clone();
    through_status.status = Some(k8s_openapi::api::core::v1::ServiceStatus {
        load_balancer: Some(ingress.clone()),
        ..Default::default()
    });
    through_status.metadata.resource_version = None;
    let updated = services
        .replace_status("lb", &PostParams::default(), &through_status)
        .await
        .unwrap();
    assert_eq!(updated.status.unwrap().load_balancer, Some(ingress));
}

#[tokio::test]
async fn delete_answers_like_the_apiserver() {
    let (_server, client) = standin().await;
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "shop");
    services
        .create(&PostParams::default(), &service("web", &[]))
        .await
        .unwrap();
    let slice = slices
        .create(
            &PostParams::default(),
            &endpoint_slice("web-1", "web", &["10.1.0.1"]),
        )
        .await
        .unwrap();

    // The Service registry returns the deleted object; the generic registry a Status.
    let deleted = services
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        deleted.left().map(|s| s.name_any()),
        Some("web".to_string())
    );
    let deleted = slices
        .delete("web-1", &DeleteParams::default())
        .await
        .unwrap();
    let status = deleted
        .right()
        .expect("a Status for an EndpointSlice delete");
    assert_eq!(
        status.details.as_ref().map(|d| d.uid.clone()),
        Some(slice.uid().unwrap())
    );
    assert!(services.get_opt("web").await.unwrap().is_none());
}

#[tokio::test]
async fn list_selects_with_kube_proxys_label_selector() {
    let (server, client) = standin().await;
    let shop: Api<Service> = Api::namespaced(client.clone(), "shop");
    let pp = PostParams::default();
    shop.create(&pp, &service("web", &[])).await.unwrap();
    shop.create(
        &pp,
        &service(
            "mesh",
            &[("service.kubernetes.io/service-proxy-name", "other")],
        ),
    )
    .await
    .unwrap();
    shop.create(
        &pp,
        &service("headless", &[("service.kubernetes.io/headless", "")]),
    )
    .await
    .unwrap();
    let backoffice: Api<Service> = Api::namespaced(client.clone(), "backoffice");
    backoffice
        .create(&pp, &service("api", &[("tier", "back")]))
        .await
        .unwrap();

    let all: Api<Service> = Api::all(client.clone());
    let selected = all
        .list(&ListParams::default().labels(PROXY_SELECTOR))
        .await
        .unwrap();
    assert_eq!(
        names(selected.items),
        ["api", "web"],
        "namespace/name order, both namespaces"
    );
    assert_eq!(
        selected.metadata.resource_version,
        Some(server.resource_version().to_string())
    );
    let in_shop = shop
        .list(&ListParams::default().labels(PROXY_SELECTOR))
        .await
        .unwrap();
    assert_eq!(names(in_shop.items), ["web"]);
    let set_based = all
        .list(&ListParams::default().labels("tier in (back,front)"))
        .await
        .unwrap();
    assert_eq!(names(set_based.items), ["api"]);
    let by_field = all
        .list(&ListParams::default().fields("metadata.namespace=shop"))
        .await
        .unwrap();
    assert_eq!(names(by_field.items), ["headless", "mesh", "web"]);

    let nodes: Api<Node> = Api::all(client.clone());
    nodes.create(&pp, &node("node-a")).await.unwrap();
    nodes.create(&pp, &node("node-b")).await.unwrap();
    let mine = nodes
        .list(&ListParams::default().fields("metadata.name=node-b"))
        .await
        .unwrap();
    assert_eq!(names(mine.items), ["node-b"]);

    // On the wire, list items carry no kind or apiVersion; the list does.
    let request = http::Request::get("/api/v1/nodes")
        .body(Vec::new())
        .unwrap();
    let raw: Value = serde_json::from_str(&client.request_text(request).await.unwrap()).unwrap();
    assert_eq!(raw["kind"], "NodeList");
    assert_eq!(raw["items"][0]["metadata"]["name"], "node-a");
    assert!(raw["items"][0].get("kind").is_none());
}

#[tokio::test]
async fn bad_requests_are_answered_with_a_status() {
    let (_server, client) = standin().await;
    let services: Api<Service> = Api::all(client.clone());

    let error = services
        .list(&ListParams::default().labels("a in b"))
        .await
        .unwrap_err();
    let (code, reason, _) = api_status(error);
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));
    let error = services
        .list(&ListParams::default().fields("spec.selector=x"))
        .await
        .unwrap_err();
    let (code, _, message) = api_status(error);
    assert_eq!(
        (code, message.as_str()),
        (400, "field label not supported: spec.selector")
    );

    let garbage = http::Request::post("/api/v1/namespaces/shop/services")
        .header("content-type", "application/json")
        .body(b"{\"metadata\": ".to_vec())
        .unwrap();
    let (code, reason, _) = api_status(client.request_text(garbage).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));
    let wrong_schema = http::Request::post("/api/v1/namespaces/shop/services")
        .header("content-type", "application/json")
        .body(br#"{"metadata": {"name": "web"}, "spec": {"ports": "eighty"}}"#.to_vec())
        .unwrap();
    let (code, _, message) = api_status(client.request_text(wrong_schema).await.unwrap_err());
    assert_eq!(code, 400);
    assert!(
        message.starts_with(r#"Service in version "v1" cannot be handled as a Service"#),
        "{message}"
    );
    let bad_name = Api::<Service>::namespaced(client, "shop")
        .create(&PostParams::default(), &service("Web_1", &[]))
        .await
        .unwrap_err();
    let (code, reason, _) = api_status(bad_name);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
}

#[tokio::test]
async fn watcher_lists_then_applies_and_deletes() {
    let (server, client) = standin().await;
    let shop: Api<Service> = Api::namespaced(client.clone(), "shop");
    let pp = PostParams::default();
    shop.create(&pp, &service("web", &[])).await.unwrap();

    let all: Api<Service> = Api::all(client);
    let mut events = forward(watcher(
        all,
        watcher::Config::default().labels(PROXY_SELECTOR),
    ));
    assert_eq!(initial_list(&mut events).await, set(&["web"]));

    shop.create(&pp, &service("api", &[])).await.unwrap();
    assert_eq!(next(&mut events).await, Seen::Apply("api".into()));
    let mut web = shop.get("web").await.unwrap();
    web.labels_mut().insert("tier".into(), "front".into());
    shop.replace("web", &pp, &web).await.unwrap();
    assert_eq!(next(&mut events).await, Seen::Apply("web".into()));
    // Not selected: no event, so the next one is the delete.
    shop.create(
        &pp,
        &service(
            "mesh",
            &[("service.kubernetes.io/service-proxy-name", "other")],
        ),
    )
    .await
    .unwrap();
    shop.delete("api", &DeleteParams::default()).await.unwrap();
    assert_eq!(next(&mut events).await, Seen::Delete("api".into()));

    assert_eq!(server.list_requests(ApiResource::Services), 1);
    assert_eq!(server.watch_requests(ApiResource::Services), 1);
}

/// Pins the requests kube-rs 5's default watcher makes, which are the ones the stand-in
/// has to get right: a paged LIST with the selector, then a WATCH from the list's version.
#[tokio::test]
async fn watcher_requests_are_a_list_then_a_watch_from_its_version() {
    let (server, client) = standin().await;
    let slices: Api<EndpointSlice> = Api::all(client);
    let mut events = forward(watcher(
        slices,
        watcher::Config::default().labels(PROXY_SELECTOR),
    ));
    initial_list(&mut events).await;
    watch_open(&server, ApiResource::EndpointSlices).await;

    let selector = "labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless";
    let version = server.resource_version();
    assert_eq!(
        server.requests(),
        [
            format!("GET /apis/discovery.k8s.io/v1/endpointslices?&{selector}&limit=500"),
            format!(
                "GET /apis/discovery.k8s.io/v1/endpointslices?&watch=true&timeoutSeconds=290&{selector}&allowWatchBookmarks=true&resourceVersion={version}"
            ),
        ]
    );
}

#[tokio::test]
async fn object_leaving_the_selector_arrives_as_delete() {
    let (_server, client) = standin().await;
    let shop: Api<Service> = Api::namespaced(client.clone(), "shop");
    let pp = PostParams::default();
    shop.create(&pp, &service("web", &[])).await.unwrap();
    let mut events = forward(watcher(
        Api::<Service>::all(client),
        watcher::Config::default().labels(PROXY_SELECTOR),
    ));
    assert_eq!(initial_list(&mut events).await, set(&["web"]));

    let mut web = shop.get("web").await.unwrap();
    web.labels_mut()
        .insert("service.kubernetes.io/headless".into(), String::new());
    let hidden = shop.replace("web", &pp, &web).await.unwrap();
    assert_eq!(next(&mut events).await, Seen::Delete("web".into()));

    let mut web = hidden;
    web.labels_mut().remove("service.kubernetes.io/headless");
    shop.replace("web", &pp, &web).await.unwrap();
    assert_eq!(next(&mut events).await, Seen::Apply("web".into()));
}

#[tokio::test]
async fn watcher_relists_after_compaction_and_converges() {
    let (server, client) = standin().await;
    let shop: Api<Service> = Api::namespaced(client.clone(), "shop");
    let pp = PostParams::default();
    shop.create(&pp, &service("web", &[])).await.unwrap();
    shop.create(&pp, &service("api", &[])).await.unwrap();
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<Service>::all(client),
            watcher::Config::default().labels(PROXY_SELECTOR),
        ),
    );
    let mut events = forward(stream);
    assert_eq!(initial_list(&mut events).await, set(&["api", "web"]));
    watch_open(&server, ApiResource::Services).await;

    // The open watch gets the 410 ERROR event; the watcher lists again.
    server.compact();
    assert_eq!(next(&mut events).await, Seen::WatchError(410));
    assert_eq!(initial_list(&mut events).await, set(&["api", "web"]));
    assert_eq!(server.list_requests(ApiResource::Services), 2);
    within(
        "the watch after the re-list",
        server.wait_for(ApiResource::Services, |a| {
            a.watch_requests == 2 && a.open_watches == 1
        }),
    )
    .await;
    let lists = server.list_requests(ApiResource::Services);

    // Changes the open watch may or may not deliver before the compaction cuts it off.
    shop.delete("api", &DeleteParams::default()).await.unwrap();
    shop.create(&pp, &service("db", &[])).await.unwrap();
    server.compact();
    loop {
        match next(&mut events).await {
            Seen::WatchError(410) => break,
            Seen::Apply(_) | Seen::Delete(_) => {}
            other => panic!("expected events then the 410, got {other:?}"),
        }
    }
    assert_eq!(initial_list(&mut events).await, set(&["db", "web"]));
    assert_eq!(server.list_requests(ApiResource::Services), lists + 1);
    let mut stored = names(reader.state().iter().map(|s| Service::clone(s)));
    stored.sort();
    assert_eq!(stored, ["db", "web"]);

    // The watch from the re-list's version is inside the new window.
    shop.create(&pp, &service("cache", &[])).await.unwrap();
    assert_eq!(next(&mut events).await, Seen::Apply("cache".into()));
    assert_eq!(server.list_requests(ApiResource::Services), lists + 1);
}

#[tokio::test]
async fn watcher_rewatches_without_relisting_after_disconnect() {
    let (server, client) = standin().await;
    let pp = PostParams::default();
    let nodes: Api<Node> = Api::all(client);
    nodes.create(&pp, &node("node-a")).await.unwrap();
    let mut events = forward(watcher(
        nodes.clone(),
        watcher::Config::default().fields("metadata.name=node-a"),
    ));
    assert_eq!(initial_list(&mut events).await, set(&["node-a"]));
    watch_open(&server, ApiResource::Nodes).await;
    let before = server.activity(ApiResource::Nodes);

    server.disconnect_watches();
    // Nothing else happens on the server: the disconnect alone makes the watcher come back.
    within(
        "the watcher to watch again",
        server.wait_for(ApiResource::Nodes, |a| {
            a.watch_requests > before.watch_requests
        }),
    )
    .await;
    let mut node_a = nodes.get("node-a").await.unwrap();
    node_a.labels_mut().insert("rack".into(), "r1".into());
    nodes.replace("node-a", &pp, &node_a).await.unwrap();
    nodes.create(&pp, &node("node-b")).await.unwrap();

    assert_eq!(next(&mut events).await, Seen::Apply("node-a".into()));
    let after = server.activity(ApiResource::Nodes);
    assert_eq!(after.list_requests, before.list_requests, "no re-list");
    assert_eq!(
        after.watch_requests,
        before.watch_requests + 1,
        "one new watch"
    );
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_a_410_error_event() {
    let (server, client) = standin().await;
    let shop: Api<Service> = Api::namespaced(client, "shop");
    let created = shop
        .create(&PostParams::default(), &service("web", &[]))
        .await
        .unwrap();
    let old = created.resource_version().unwrap();
    server.compact();
    let oldest = server.resource_version();

    let mut stream = shop
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match within("the ERROR event", stream.next()).await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert_eq!(
                status.message,
                format!("too old resource version: {old} ({oldest})")
            );
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    assert!(
        within("the end of the stream", stream.next())
            .await
            .is_none()
    );

    // A watch from the current version is accepted.
    let mut stream = shop
        .watch(&WatchParams::default(), &oldest.to_string())
        .await
        .unwrap()
        .boxed();
    shop.delete("web", &DeleteParams::default()).await.unwrap();
    match within("the DELETED event", stream.next()).await {
        Some(Ok(WatchEvent::Deleted(deleted))) => {
            assert_eq!(
                deleted.resource_version(),
                Some(server.resource_version().to_string())
            );
        }
        other => panic!("expected DELETED, got {other:?}"),
    }
}

#[tokio::test]
async fn exact_list_from_a_compacted_version_is_410_gone() {
    let (server, client) = standin().await;
    let shop: Api<Service> = Api::namespaced(client, "shop");
    shop.create(&PostParams::default(), &service("web", &[]))
        .await
        .unwrap();
    let before_api = server.resource_version().to_string();
    shop.create(&PostParams::default(), &service("api", &[]))
        .await
        .unwrap();

    let exact = ListParams::default()
        .at(&before_api)
        .matching(VersionMatch::Exact);
    let then = shop.list(&exact).await.unwrap();
    assert_eq!(names(then.items), ["web"], "the state at that version");
    assert_eq!(then.metadata.resource_version, Some(before_api.clone()));

    server.compact();
    let (code, reason, message) = api_status(shop.list(&exact).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (410, "Expired"));
    assert_eq!(
        message,
        format!(
            "too old resource version: {before_api} ({})",
            server.resource_version()
        )
    );
    // "Not older than" an old version is always satisfiable by the current state.
    let recent = ListParams::default()
        .at(&before_api)
        .matching(VersionMatch::NotOlderThan);
    let now = shop.list(&recent).await.unwrap();
    assert_eq!(names(now.items), ["api", "web"]);
    assert_eq!(
        now.metadata.resource_version,
        Some(server.resource_version().to_string())
    );
}

#[tokio::test]
async fn bookmarks_carry_only_the_resource_version() {
    let (server, client) = standin().await;
    let slices: Api<EndpointSlice> = Api::namespaced(client, "shop");
    let version = server.resource_version().to_string();
    let mut stream = slices
        .watch(&WatchParams::default(), &version)
        .await
        .unwrap()
        .boxed();
    watch_open(&server, ApiResource::EndpointSlices).await;
    slices
        .create(
            &PostParams::default(),
            &endpoint_slice("web-1", "web", &["10.1.0.1"]),
        )
        .await
        .unwrap();
    server.bookmark();

    match within("the ADDED event", stream.next()).await {
        Some(Ok(WatchEvent::Added(slice))) => assert_eq!(slice.name_any(), "web-1"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    match within("the BOOKMARK", stream.next()).await {
        Some(Ok(WatchEvent::Bookmark(bookmark))) => {
            assert_eq!(bookmark.types.kind, "EndpointSlice");
            assert_eq!(bookmark.types.api_version, "discovery.k8s.io/v1");
            assert_eq!(
                bookmark.metadata.resource_version,
                server.resource_version().to_string()
            );
        }
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
}

#[tokio::test]
async fn periodic_bookmarks_arrive_unprompted() {
    let options = Options {
        bookmark_interval: Duration::from_millis(200),
    };
    let server = ApiServer::start_with(options)
        .await
        .expect("starting the API stand-in");
    let nodes: Api<Node> = Api::all(server.client().await);
    let version = server.resource_version().to_string();
    let mut stream = nodes
        .watch(&WatchParams::default(), &version)
        .await
        .unwrap()
        .boxed();
    match within("a periodic BOOKMARK", stream.next()).await {
        Some(Ok(WatchEvent::Bookmark(bookmark))) => {
            assert_eq!(bookmark.metadata.resource_version, version)
        }
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
    let mut quiet = nodes
        .watch(
            &WatchParams::default().disable_bookmarks().timeout(1),
            &version,
        )
        .await
        .unwrap()
        .boxed();
    assert!(
        within("the end of a watch without bookmarks", quiet.next())
            .await
            .is_none(),
        "no bookmark unless asked for, and the stream ends at timeoutSeconds"
    );
}

#[tokio::test]
async fn streaming_list_watcher_ends_initial_events_with_a_bookmark() {
    let (server, client) = standin().await;
    let shop: Api<Service> = Api::namespaced(client.clone(), "shop");
    shop.create(&PostParams::default(), &service("web", &[]))
        .await
        .unwrap();
    let config = watcher::Config::default()
        .labels(PROXY_SELECTOR)
        .streaming_lists();
    let mut events = forward(watcher(Api::<Service>::all(client), config));
    assert_eq!(initial_list(&mut events).await, set(&["web"]));
    shop.create(&PostParams::default(), &service("api", &[]))
        .await
        .unwrap();
    assert_eq!(next(&mut events).await, Seen::Apply("api".into()));
    assert_eq!(
        server.list_requests(ApiResource::Services),
        0,
        "no LIST at all"
    );
    assert!(
        server.requests()[1].contains(
            "&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0"
        ),
        "{:?}",
        server.requests()
    );
}

#[tokio::test]
async fn outage_then_restart_resumes_the_watch_without_relisting() {
    let (mut server, client) = standin().await;
    let shop: Api<Service> = Api::namespaced(client.clone(), "shop");
    shop.create(&PostParams::default(), &service("web", &[]))
        .await
        .unwrap();
    let stream = watcher(Api::<Service>::all(client), watcher::Config::default()).default_backoff();
    let mut events = forward(stream);
    assert_eq!(initial_list(&mut events).await, set(&["web"]));
    watch_open(&server, ApiResource::Services).await;

    within("the server to stop", server.stop()).await;
    assert_eq!(
        next(&mut events).await,
        Seen::RequestFailed,
        "the watch cannot reconnect"
    );
    server
        .restart()
        .await
        .expect("serving again on the same address");
    shop.create(&PostParams::default(), &service("api", &[]))
        .await
        .unwrap();
    loop {
        match next(&mut events).await {
            Seen::RequestFailed => {}
            event => {
                assert_eq!(event, Seen::Apply("api".into()));
                break;
            }
        }
    }
    assert_eq!(
        server.list_requests(ApiResource::Services),
        1,
        "resumed from its version"
    );
}

/// A stopped stand-in refuses connections and keeps its port: a socket of another test
/// cannot take it before the restart, which would then fail.
#[tokio::test]
async fn a_stopped_stand_in_refuses_connections_and_keeps_its_port() {
    let (mut server, _client) = standin().await;
    within("the server to stop", server.stop()).await;
    let refused = tokio::net::TcpStream::connect(server.address())
        .await
        .expect_err("nothing listens while stopped");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let taken = std::net::TcpListener::bind(server.address()).expect_err("the port is held");
    assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
    server
        .restart()
        .await
        .expect("serving again on the same address");
    tokio::net::TcpStream::connect(server.address())
        .await
        .expect("answered after the restart");
}

/// events.k8s.io/v1 as an event recorder uses it: a create with every required field, then
/// merge patches that only move the series; a v1 event missing a required field, or a
/// patch that changes anything else, is refused as the apiserver refuses it.
#[tokio::test]
async fn events_take_a_recorders_create_and_series_patches_and_refuse_the_rest() {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::api::{Patch, PatchParams};

    let (_server, client) = standin().await;
    let events: Api<K8sEvent> = Api::namespaced(client, "shop");
    let event = |fields: Value| -> K8sEvent {
        let mut json = serde_json::json!({
            "metadata": {"name": "web.17", "namespace": "shop"},
            "eventTime": "2026-11-27T00:00:00.000000Z",
            "type": "Warning",
            "reason": "FailedToStartServiceHealthcheck",
            "action": "Listen",
            "note": "port taken",
            "reportingController": "ebpf-kube-proxy",
            "reportingInstance": "node-1",
            "regarding": {"apiVersion": "v1", "kind": "Service", "namespace": "shop", "name": "web"},
        });
        for (k, v) in fields.as_object().expect("an object") {
            if v.is_null() {
                json.as_object_mut().expect("an object").remove(k);
            } else {
                json[k] = v.clone();
            }
        }
        serde_json::from_value(json).expect("a valid Event")
    };
    let pp = PostParams::default();
    for (missing, field) in [
        (
            serde_json::json!({"reportingController": null}),
            "reportingController",
        ),
        (serde_json::json!({"eventTime": null}), "eventTime"),
        (serde_json::json!({"type": "Fatal"}), "type"),
    ] {
        let refused = events.create(&pp, &event(missing)).await.unwrap_err();
        let (code, reason, message) = api_status(refused);
        assert_eq!((code, reason.as_str()), (422, "Invalid"), "{message}");
        assert!(message.contains(field), "{message}");
    }

    let created = events
        .create(&pp, &event(serde_json::json!({})))
        .await
        .expect("create");
    let series = serde_json::json!({
        "series": {"count": 2, "lastObservedTime": "2026-11-27T00:00:05.000000Z"},
    });
    let patched = events
        .patch("web.17", &PatchParams::default(), &Patch::Merge(&series))
        .await
        .expect("a series patch");
    assert_eq!(patched.series.map(|s| s.count), Some(2));
    assert_ne!(
        patched.metadata.resource_version,
        created.metadata.resource_version
    );
    let reworded = serde_json::json!({"note": "another note"});
    let refused = events
        .patch("web.17", &PatchParams::default(), &Patch::Merge(&reworded))
        .await
        .unwrap_err();
    assert_eq!(api_status(refused).0, 422);
}
