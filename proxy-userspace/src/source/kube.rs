//! The Kubernetes source: kube-runtime watchers into reflector stores, with kube-proxy's
//! server-side selection (`!service.kubernetes.io/service-proxy-name,
//! !service.kubernetes.io/headless` on Services and EndpointSlices, `metadata.name` on
//! Nodes).
//!
//! The stores swap in a re-list atomically (a 410 Gone, a reconnect after an outage), so a
//! snapshot is never a half-listed world: the agent diffs against it and converges without
//! flushing anything.

use std::fmt::Debug;
use std::hash::Hash;
use std::path::PathBuf;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::{Snapshot, proxy_label_selector};

/// How to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// A kubeconfig file; otherwise `KUBECONFIG`, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Overrides the server address (kube-proxy's `--master`): with kube-proxy replaced, the
    /// `kubernetes` Service is served by this agent, so it must not depend on it.
    pub master: Option<String>,
}

/// Builds a client from the connection settings.
pub async fn client(conn: &Connection) -> Result<Client> {
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
    if let Some(master) = &conn.master {
        config.cluster_url = master
            .parse()
            .with_context(|| format!("invalid API server address {master:?}"))?;
    }
    Client::try_from(config).context("creating the Kubernetes client")
}

/// Reflector stores of the three resources, kept up to date by background tasks.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
}

impl KubeSource {
    /// Starts the watchers; every change (and every completed re-list) sends on `changed`.
    pub fn start(client: Client, node_name: &str, changed: mpsc::Sender<()>) -> Self {
        let selector = proxy_label_selector();
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(&selector),
            changed.clone(),
        );
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&selector),
            changed.clone(),
        );
        let nodes = spawn_reflector(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            changed,
        );
        KubeSource {
            services,
            slices,
            nodes,
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

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: std::sync::Arc::new(self.services.state()),
            slices: std::sync::Arc::new(self.slices.state()),
            node: self.nodes.state().first().cloned(),
            skipped: Vec::new(),
        }
    }
}

/// One watcher into one store, in a task of its own. Errors (the API server away, a 410)
/// are logged and retried with backoff by the watcher; the store keeps its last state.
fn spawn_reflector<K>(api: Api<K>, config: watcher::Config, changed: mpsc::Sender<()>) -> Store<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&Default::default()).into_owned();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
                ) => {
                    // A full channel already holds a pending "changed".
                    let _ = changed.try_send(());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("watching {kind}: {e}; retrying"),
            }
        }
    });
    store
}
