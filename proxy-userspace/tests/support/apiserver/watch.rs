//! Watch streams: a chunked HTTP body of JSON lines, one `{"type": ..., "object": ...}` per
//! event, as the apiserver writes them for `?watch=true`.
//!
//! Each stream keeps its own position in the store's change log and reads on whenever the
//! store signals a change, so events arrive in revision order and none is lost between the
//! list and the watch. Its selectors are applied to the new and the previous state of every
//! change, which turns "stopped matching" into DELETED (with the previous content and the
//! new resourceVersion) and "started matching" into ADDED, as the watch cache does.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{Change, ChangeKind, Epochs};
use super::{ApiResource, Shared};

/// What a watch request selects.
pub(super) struct Selection {
    pub(super) resource: ApiResource,
    pub(super) namespace: Option<String>,
    pub(super) labels: LabelSelector,
    pub(super) fields: FieldSelector,
}

impl Selection {
    fn matches(&self, object: &Value) -> bool {
        let namespace_ok = self.namespace.as_deref().is_none_or(|ns| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(ns)
        });
        namespace_ok && self.labels.matches(object) && self.fields.matches(object)
    }

    /// The event this change is for a watcher with these selectors, if any.
    fn event_for(&self, change: &Change) -> Option<(&'static str, Value)> {
        if change.key.resource != self.resource {
            return None;
        }
        let now = change.kind != ChangeKind::Deleted && self.matches(&change.object);
        let before = change.previous.as_ref().is_some_and(|p| self.matches(p));
        match (before, now) {
            (false, true) => Some(("ADDED", change.object.clone())),
            (true, true) => Some(("MODIFIED", change.object.clone())),
            (true, false) => {
                // The previous content, at the revision where it stopped being visible.
                let mut object = change.previous.clone().unwrap_or_default();
                super::store::set_resource_version(&mut object, change.revision);
                Some(("DELETED", object))
            }
            (false, false) => None,
        }
    }
}

/// Where the stream starts.
pub(super) enum Start {
    /// After this revision (`resourceVersion=N`).
    After(u64),
    /// Synthetic ADDED events for the current state first: the legacy behaviour for a watch
    /// without resourceVersion or with "0", and `sendInitialEvents=true` (streaming lists),
    /// which also ends the initial state with a bookmark annotated
    /// `k8s.io/initial-events-end`.
    CurrentState { end_bookmark: bool },
}

pub(super) struct WatchOptions {
    pub(super) start: Start,
    pub(super) bookmarks: bool,
    pub(super) timeout: Duration,
}

/// Opens a watch and returns the streaming response. A start older than the compaction
/// point is not an HTTP error: like the apiserver, the stream opens and carries one ERROR
/// event with the 410 Expired Status, then ends.
pub(super) fn respond(
    shared: Arc<Shared>,
    selection: Selection,
    options: WatchOptions,
) -> Response {
    let session = Session::open(shared, selection, options);
    let stream = futures::stream::unfold(session, |mut session| async move {
        let chunk = session.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), session))
    });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

struct Session {
    shared: Arc<Shared>,
    selection: Selection,
    bookmarks: bool,
    /// Every change up to this revision has been looked at.
    position: u64,
    epochs: Epochs,
    /// Already-rendered lines to send first (the initial state, or the 410).
    pending: Option<Bytes>,
    finished: bool,
    bookmark_due: bool,
    next_periodic_bookmark: Instant,
    deadline: Instant,
    changes: watch::Receiver<u64>,
    _open: OpenWatch,
}

impl Session {
    fn open(shared: Arc<Shared>, selection: Selection, options: WatchOptions) -> Self {
        let mut changes = shared.subscribe();
        changes.borrow_and_update();
        let now = Instant::now();
        let (position, epochs, pending, finished) = {
            let mut store = shared.lock();
            let activity = store.activity_mut(selection.resource);
            activity.watch_requests += 1;
            activity.open_watches += 1;
            let revision = store.revision();
            let epochs = store.epochs;
            match options.start {
                Start::After(from) if from < store.compacted_at() => {
                    let status = ApiError::expired(from, store.compacted_at()).status();
                    (from, epochs, Some(Bytes::from(line("ERROR", status))), true)
                }
                Start::After(from) => (from, epochs, None, false),
                Start::CurrentState { end_bookmark } => {
                    let mut out = String::new();
                    for object in store.objects(selection.resource, selection.namespace.as_deref())
                    {
                        if selection.matches(object) {
                            out.push_str(&line("ADDED", object.clone()));
                        }
                    }
                    if end_bookmark {
                        let mut bookmark = bookmark_object(selection.resource, revision);
                        bookmark["metadata"]["annotations"] =
                            json!({"k8s.io/initial-events-end": "true"});
                        out.push_str(&line("BOOKMARK", bookmark));
                    }
                    let pending = (!out.is_empty()).then(|| Bytes::from(out));
                    (revision, epochs, pending, false)
                }
            }
        };
        shared.notify();
        let interval = shared.options.bookmark_interval;
        Session {
            _open: OpenWatch {
                shared: shared.clone(),
                resource: selection.resource,
            },
            shared,
            selection,
            bookmarks: options.bookmarks,
            position,
            epochs,
            pending,
            finished,
            bookmark_due: false,
            next_periodic_bookmark: now + interval,
            deadline: now + options.timeout,
            changes,
        }
    }

    /// The next piece of the body, or `None` to end the stream cleanly (the client sees EOF
    /// and, like after `timeoutSeconds`, watches again from its last resourceVersion).
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(pending) = self.pending.take() {
            return Some(pending);
        }
        loop {
            if self.finished {
                return None;
            }
            let chunk = self.read_store();
            if chunk.is_some() || self.finished {
                return chunk;
            }
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = sleep_until(self.deadline) => return None,
                () = sleep_until(self.next_periodic_bookmark) => {
                    self.next_periodic_bookmark += self.shared.options.bookmark_interval;
                    self.bookmark_due = true;
                }
            }
        }
    }

    /// Reacts to the test controls, then renders the changes after `position`, then a
    /// bookmark if one is due: a bookmark never claims a revision whose events have not been
    /// sent.
    fn read_store(&mut self) -> Option<Bytes> {
        let store = self.shared.lock();
        if store.epochs.compactions != self.epochs.compactions {
            self.finished = true;
            let status = ApiError::expired(self.position, store.compacted_at()).status();
            return Some(Bytes::from(line("ERROR", status)));
        }
        if store.epochs.disconnects != self.epochs.disconnects || store.stopping {
            self.finished = true;
            return None;
        }
        let mut out = String::new();
        for change in store.changes_after(self.position) {
            if let Some((kind, object)) = self.selection.event_for(change) {
                out.push_str(&line(kind, object));
            }
        }
        // A start in the future keeps its place until the store gets there.
        self.position = self.position.max(store.revision());
        if store.epochs.bookmarks != self.epochs.bookmarks {
            self.epochs.bookmarks = store.epochs.bookmarks;
            self.bookmark_due = true;
        }
        if std::mem::take(&mut self.bookmark_due) && self.bookmarks {
            out.push_str(&line(
                "BOOKMARK",
                bookmark_object(self.selection.resource, self.position),
            ));
        }
        (!out.is_empty()).then(|| Bytes::from(out))
    }
}

/// Counts a watch as open for as long as its body exists (hyper drops it when the stream
/// ends or the client goes away).
struct OpenWatch {
    shared: Arc<Shared>,
    resource: ApiResource,
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        {
            let mut store = self.shared.lock();
            let activity = store.activity_mut(self.resource);
            activity.open_watches = activity.open_watches.saturating_sub(1);
        }
        self.shared.notify();
    }
}

/// A bookmark carries only the type and the resourceVersion the watcher may resume from.
fn bookmark_object(resource: ApiResource, revision: u64) -> Value {
    json!({
        "kind": resource.kind(),
        "apiVersion": resource.api_version(),
        "metadata": {"resourceVersion": revision.to_string()},
    })
}

/// One event: a JSON object on a line of its own (the full object, with its kind).
fn line(kind: &str, object: Value) -> String {
    let mut text = json!({"type": kind, "object": object}).to_string();
    text.push('\n');
    text
}
