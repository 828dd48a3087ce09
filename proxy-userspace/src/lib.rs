//! ebpf-kube-proxy: the node agent.
//!
//! Data flows one way (DESIGN.md section 4):
//! `source` (manifests dir | Kubernetes API) -> `translate` (pure: kube-proxy semantics) -> `sync` (diff, safe
//! order) -> `dataplane` (aya). `cli` wires them; `list` reads the pinned maps back.

pub mod abi;
pub mod capacity;
pub mod cli;
pub mod conntrack_gc;
pub mod dataplane;
pub mod devices;
pub mod events;
pub mod file_events;
pub mod healthcheck;
pub mod http;
pub mod kube_proxy_cleanup;
pub mod link_events;
pub mod list;
pub mod metrics;
pub mod model;
pub mod run;
pub mod safety;
pub mod sockdiag;
pub mod source;
pub mod stale_udp;
pub mod sync;
pub mod translate;
