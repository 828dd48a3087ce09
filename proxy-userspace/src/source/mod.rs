//! Where Services, EndpointSlices and this Node come from: a manifests directory
//! (standalone) or the Kubernetes API (watchers and reflector stores). Either way the rest
//! of the agent sees a "something changed" signal, then either a `Snapshot` (everything) or
//! a `Delta` (what changed since it last looked); no business logic lives here.

pub mod kube;
pub mod manifests;

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::Skipped;

/// A list of objects, shared (see [`Snapshot`]).
pub type Shared<T> = Arc<Vec<Arc<T>>>;

/// The objects the agent translates, at one instant. Shared with the source, which keeps
/// an unchanged object in the same allocation from one snapshot to the next: taking one
/// copies no object, and an unchanged group is recognised at a pointer comparison
/// (`translate::incremental`).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub services: Shared<Service>,
    pub slices: Shared<EndpointSlice>,
    /// This node's Node object, if the source has it.
    pub node: Option<Arc<Node>>,
    /// Input the source could not read (unparsable documents and the like).
    pub skipped: Vec<Skipped>,
}

/// What changed since the source was last read (by a snapshot or a delta): each Service
/// and EndpointSlice added, changed or removed, as it is now (`None`: removed). As in
/// kube-proxy's change trackers, the latest state of an object is all that counts.
///
/// A change to one object among 10000 costs the agent that one object: memory left idle
/// for a second is slow to touch again on virtual machines, so a sync that walks every
/// object pays for all of them (issue 6).
#[derive(Debug, Default)]
pub struct Delta {
    pub services: Vec<(ObjectKey, Option<Arc<Service>>)>,
    pub slices: Vec<(ObjectKey, Option<Arc<EndpointSlice>>)>,
    /// This node's Node object as it is now, changed or not.
    pub node: Option<Arc<Node>>,
    /// Input the source cannot read, all of it (as in a snapshot).
    pub skipped: Vec<Skipped>,
}

/// An object's namespace and name; no namespace reads as `default`, as `kubectl apply`
/// reads it. Both sources and the translation name an object this way.
pub type ObjectKey = (String, String);

pub fn object_key(meta: &ObjectMeta) -> ObjectKey {
    let namespace = match meta.namespace.as_deref() {
        None | Some("") => "default",
        Some(namespace) => namespace,
    };
    (namespace.to_owned(), meta.name.clone().unwrap_or_default())
}

/// Labels kube-proxy selects on, server-side for the API and client-side for manifests:
/// objects of another proxy implementation, and headless Services' slices, are not ours.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// kube-proxy's label selector for Services and EndpointSlices.
pub fn proxy_label_selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}
