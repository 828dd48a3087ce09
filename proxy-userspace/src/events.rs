//! Kubernetes events the agent records, as kube-proxy does: `events.k8s.io/v1`, reported
//! by controller `ebpf-kube-proxy` from the instance named after the node. Only with the
//! Kubernetes source; the standalone manifests have no API to record to.
//!
//! Publishing runs in the background: a sync never waits on the API server, and an event
//! that cannot be recorded is logged, not retried (the log line of the failure itself is
//! always written).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// The API server caps an event's note at 1 KiB.
const NOTE_MAX: usize = 1024;

/// Where the agent's events go.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
    node: String,
}

impl Events {
    pub fn new(client: kube::Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: "ebpf-kube-proxy".into(),
            instance: Some(node.into()),
        };
        Events {
            recorder: Recorder::new(client, reporter),
            node: node.into(),
        }
    }

    /// kube-proxy's "birth cry": a `Starting` event on this node once the sources are
    /// watching, which `kubectl describe node` lists beside the kubelet's own. Reason and
    /// action are kube-proxy's (`Starting`, `StartKubeProxy`), as the metric names are, so
    /// that what looks for them finds them; the reporting controller tells the two apart.
    /// The Node is cluster-scoped: the event goes to the `default` namespace, as
    /// kube-proxy's does. Needs a Tokio runtime.
    pub fn starting(&self) {
        let event = Event {
            type_: EventType::Normal,
            reason: "Starting".into(),
            note: None,
            action: "StartKubeProxy".into(),
            secondary: None,
        };
        self.publish(event, self.node_ref(), "start");
    }

    /// kube-proxy's `FailedToStartProxierHealthcheck` warning on the node: the healthz
    /// port `addr` could not be bound (it is tried again). Needs a Tokio runtime.
    pub fn healthz_failed(&self, addr: std::net::SocketAddr, error: &str) {
        let note = format!("failed to start proxier healthz on {addr}: {error}");
        let event = Event {
            type_: EventType::Warning,
            reason: "FailedToStartProxierHealthcheck".into(),
            note: Some(truncated(note, NOTE_MAX)),
            action: "StartKubeProxy".into(),
            secondary: None,
        };
        self.publish(event, self.node_ref(), "healthz failure");
    }

    /// This node, as kube-proxy refers to it: its name also stands as the UID.
    fn node_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node.clone()),
            uid: Some(self.node.clone()),
            ..ObjectReference::default()
        }
    }

    /// kube-proxy's `FailedToStartServiceHealthcheck` warning on the Service: its
    /// healthCheckNodePort could not be served on this node. Needs a Tokio runtime.
    pub fn health_check_failed(&self, namespace: &str, name: &str, port: u16, error: &str) {
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            ..ObjectReference::default()
        };
        let note = format!(
            "node {} failed to start healthcheck \"{namespace}/{name}\" on port {port}: {error}",
            self.node
        );
        let event = Event {
            type_: EventType::Warning,
            reason: "FailedToStartServiceHealthcheck".into(),
            note: Some(truncated(note, NOTE_MAX)),
            action: "Listen".into(),
            secondary: None,
        };
        self.publish(event, regarding, "health check failure");
    }

    /// Publishes in the background; a failure is logged with `what` the event was.
    fn publish(&self, event: Event, regarding: ObjectReference, what: &'static str) {
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &regarding).await {
                let object = format!(
                    "{}/{}",
                    regarding.namespace.as_deref().unwrap_or(""),
                    regarding.name.as_deref().unwrap_or("")
                );
                tracing::warn!(%object, "recording the {what} event failed: {e}");
            }
        });
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::truncated;

    #[test]
    fn notes_are_cut_to_the_api_limit_on_a_character_boundary() {
        assert_eq!(truncated("short".into(), 1024), "short");
        // "é" is two bytes: a cut through it backs off to before it.
        assert_eq!(truncated("abé".into(), 3), "ab");
        assert_eq!(truncated("x".repeat(2000), 1024).len(), 1024);
    }
}
