//! Where Services, EndpointSlices and this Node come from: a manifests directory
//! (standalone) or the Kubernetes API (watchers and reflector stores). Either way the rest
//! of the agent sees a `Snapshot` and a "something changed" signal; no business logic lives
//! here.

pub mod kube;
pub mod manifests;

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::Skipped;

/// A list of objects, shared (see [`Snapshot`]).
pub type Shared<T> = Arc<Vec<Arc<T>>>;

/// The objects the agent translates, at one instant. Shared with the source, which keeps
/// an unchanged object in the same allocation from one snapshot to the next: taking one
/// copies no object, and a change is found by place (`translate::incremental`).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub services: Shared<Service>,
    pub slices: Shared<EndpointSlice>,
    /// This node's Node object, if the source has it.
    pub node: Option<Arc<Node>>,
    /// Input the source could not read (unparsable documents and the like).
    pub skipped: Vec<Skipped>,
}

/// Labels kube-proxy selects on, server-side for the API and client-side for manifests:
/// objects of another proxy implementation, and headless Services' slices, are not ours.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// kube-proxy's label selector for Services and EndpointSlices.
pub fn proxy_label_selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}
