//! The versioned store behind the stand-in, in etcd's shape: one revision counter shared by
//! every resource (so a Service watch can see its resourceVersion jump past other kinds'
//! writes, as on a real cluster), the current objects, and a log of every change since the
//! last compaction. A watch resumes from any revision still in the log; older revisions are
//! gone, which is what a 410 means.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{Activity, ApiResource};

/// Where an object lives: etcd's `/registry/<resource>/<namespace>/<name>`. Cluster-scoped
/// objects have an empty namespace. The derived order is the order lists come out in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct ObjectKey {
    pub(super) resource: ApiResource,
    pub(super) namespace: String,
    pub(super) name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One write, as the watch cache keeps it: the new state and the previous one, so that each
/// watcher can decide with its own selectors whether the write is an ADDED, MODIFIED or
/// DELETED for it.
#[derive(Clone, Debug)]
pub(super) struct Change {
    pub(super) revision: u64,
    pub(super) key: ObjectKey,
    pub(super) kind: ChangeKind,
    /// The object after the write; for a delete, the last state stamped with the delete's
    /// revision.
    pub(super) object: Value,
    pub(super) previous: Option<Value>,
}

/// Counters bumped by the test controls. An open watch remembers the values it started with
/// and reacts when one moves; counters rather than flags so that no watch misses a control
/// that happened while it was busy writing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Epochs {
    pub(super) compactions: u64,
    pub(super) disconnects: u64,
    pub(super) bookmarks: u64,
}

pub(super) struct Store {
    revision: u64,
    /// The oldest revision a watch may start from; anything older gets 410 Expired.
    compacted_at: u64,
    objects: BTreeMap<ObjectKey, Value>,
    /// The objects as they were at `compacted_at`: with the log, any revision in the window
    /// can be rebuilt for an `Exact` list.
    base: BTreeMap<ObjectKey, Value>,
    log: Vec<Change>,
    pub(super) epochs: Epochs,
    /// Set while the server is being stopped: watches that open in the meantime end at
    /// once instead of holding the graceful shutdown open.
    pub(super) stopping: bool,
    activity: [Activity; ApiResource::ALL.len()],
    uid_seed: u64,
    uids_issued: u64,
}

impl Store {
    pub(super) fn new() -> Self {
        let uid_seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        // Revision 1 rather than 0: "0" means "any version" to the API, so an empty store
        // must not advertise it as its resourceVersion.
        Store {
            revision: 1,
            compacted_at: 1,
            objects: BTreeMap::new(),
            base: BTreeMap::new(),
            log: Vec::new(),
            epochs: Epochs::default(),
            stopping: false,
            activity: Default::default(),
            uid_seed,
            uids_issued: 0,
        }
    }

    pub(super) fn revision(&self) -> u64 {
        self.revision
    }

    pub(super) fn compacted_at(&self) -> u64 {
        self.compacted_at
    }

    pub(super) fn get(&self, key: &ObjectKey) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Current objects of one resource, in one namespace or all, in key order.
    pub(super) fn objects<'a>(
        &'a self,
        resource: ApiResource,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .iter()
            .filter(move |(key, _)| in_scope(key, resource, namespace))
            .map(|(_, object)| object)
    }

    /// The objects as they were at `revision`, which must be in
    /// `compacted_at..=revision()`.
    pub(super) fn objects_at(
        &self,
        revision: u64,
        resource: ApiResource,
        namespace: Option<&str>,
    ) -> Vec<Value> {
        let mut state = self.base.clone();
        for change in self.log.iter().take_while(|c| c.revision <= revision) {
            match change.kind {
                ChangeKind::Deleted => state.remove(&change.key),
                ChangeKind::Added | ChangeKind::Modified => {
                    state.insert(change.key.clone(), change.object.clone())
                }
            };
        }
        state
            .into_iter()
            .filter(|(key, _)| in_scope(key, resource, namespace))
            .map(|(_, object)| object)
            .collect()
    }

    /// Every change with a revision after `revision`, oldest first.
    pub(super) fn changes_after(&self, revision: u64) -> &[Change] {
        let start = self.log.partition_point(|c| c.revision <= revision);
        &self.log[start..]
    }

    /// Stores a new object under the next revision and returns it as stored.
    pub(super) fn create(&mut self, key: ObjectKey, object: Value) -> Value {
        self.write(key, object, ChangeKind::Added)
    }

    pub(super) fn update(&mut self, key: ObjectKey, object: Value) -> Value {
        self.write(key, object, ChangeKind::Modified)
    }

    fn write(&mut self, key: ObjectKey, mut object: Value, kind: ChangeKind) -> Value {
        self.revision += 1;
        set_resource_version(&mut object, self.revision);
        let previous = self.objects.insert(key.clone(), object.clone());
        self.log.push(Change {
            revision: self.revision,
            key,
            kind,
            object: object.clone(),
            previous,
        });
        object
    }

    /// Removes an object; returns its last state stamped with the delete's revision, which
    /// is what DELETED watch events carry.
    pub(super) fn delete(&mut self, key: &ObjectKey) -> Option<Value> {
        let previous = self.objects.remove(key)?;
        self.revision += 1;
        let mut object = previous.clone();
        set_resource_version(&mut object, self.revision);
        self.log.push(Change {
            revision: self.revision,
            key: key.clone(),
            kind: ChangeKind::Deleted,
            object: object.clone(),
            previous: Some(previous),
        });
        Some(object)
    }

    /// Forgets the history: every revision up to now becomes too old. The revision moves on
    /// by one (as etcd's would with writes to other keys) so that the resourceVersion a
    /// re-list returns is inside the new window and a watch from it is accepted.
    pub(super) fn compact(&mut self) {
        self.revision += 1;
        self.compacted_at = self.revision;
        self.base = self.objects.clone();
        self.log.clear();
        self.epochs.compactions += 1;
    }

    pub(super) fn activity(&self, resource: ApiResource) -> Activity {
        self.activity[resource.index()]
    }

    pub(super) fn activity_mut(&mut self, resource: ApiResource) -> &mut Activity {
        &mut self.activity[resource.index()]
    }

    /// A UUID-shaped uid, unique per object and per server.
    pub(super) fn next_uid(&mut self) -> String {
        self.uids_issued += 1;
        let (seed, n) = (self.uid_seed, self.uids_issued);
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            (seed >> 32) as u32,
            (seed >> 16) as u16,
            seed & 0xfff,
            (n >> 48) & 0xfff,
            n & 0xffff_ffff_ffff
        )
    }

    /// A `generateName` suffix in the apiserver's alphabet (no vowels, no lookalikes).
    pub(super) fn name_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        self.uids_issued += 1;
        let mut n =
            self.uid_seed.rotate_left(17) ^ self.uids_issued.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (0..5)
            .map(|_| {
                let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
                n /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }
}

fn in_scope(key: &ObjectKey, resource: ApiResource, namespace: Option<&str>) -> bool {
    key.resource == resource && namespace.is_none_or(|ns| key.namespace == ns)
}

/// `metadata.resourceVersion` is a decimal string on the wire.
pub(super) fn set_resource_version(object: &mut Value, revision: u64) {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
}
