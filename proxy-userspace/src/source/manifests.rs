//! The standalone source: Service and EndpointSlice objects from a directory of YAML or
//! JSON manifests (several documents per file, `kind: List` too), deserialized with the
//! real Kubernetes types. Running without a cluster is the embedded default.
//!
//! A document that does not parse is reported by file and position and skipped; the rest
//! of the directory still loads. A YAML syntax error ends its file (the stream cannot be
//! resumed), so the documents after it in that file are not read; other files are. Documents
//! of other kinds are reported by kind and name. Nothing in a file can make loading panic
//! (property tests below: arbitrary bytes and mutated manifests).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use super::{Delta, Shared, Snapshot, object_key as named};
use crate::model::Skipped;

/// The objects found in a manifests directory, in kind/namespace/name order, shared with
/// the cache.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Shared<Service>,
    pub slices: Shared<EndpointSlice>,
    pub nodes: Shared<Node>,
}

/// One object and where it came from, before duplicates are resolved.
#[derive(Clone)]
enum Object {
    Service(Arc<Service>),
    Slice(Arc<EndpointSlice>),
    Node(Arc<Node>),
}

/// What one file holds: its objects (with their origin, `<file> document N`) and what in it
/// could not be read.
#[derive(Clone, Default)]
struct FileContents {
    objects: Vec<(Object, String)>,
    skipped: Vec<Skipped>,
}

/// A file's identity and version as the filesystem reports them. An atomic replacement
/// (rename) changes the inode, an edit in place the modification time or size.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// Parsed files kept between reads of the directory: a file is parsed again only when it
/// changed, so a sync after one edit in a directory of thousands of Services costs one parse
/// (and the in-memory merge), not thousands.
#[derive(Default)]
pub struct Cache {
    files: std::collections::HashMap<PathBuf, (FileStamp, FileContents)>,
    /// The last merge of the files' objects, patched in place when files change.
    merged: Option<Merged>,
    /// Files parsed so far (tests check that unchanged files are not parsed again).
    #[cfg(test)]
    parses: usize,
}

/// Kind (0 Service, 1 EndpointSlice, 2 Node), namespace and name.
type Key = (u8, String, String);

/// All files' objects by kind/namespace/name, a later file overriding an earlier one.
struct Merged {
    /// Hashed, not ordered: finding one object among 10000 then touches one or two places
    /// in memory instead of a dozen names along a tree's path (see [`Delta`]).
    found: HashMap<Key, (Object, String)>,
    /// Objects defined more than once, reported.
    duplicates: Vec<Skipped>,
}

impl Cache {
    /// Reads every `*.yaml`, `*.yml` and `*.json` file in `dir` (not recursive; hidden
    /// entries, such as a ConfigMap volume's `..data`, are skipped), in name order.
    pub fn load(&mut self, dir: &Path) -> (Objects, Vec<Skipped>) {
        let (_, skipped) = self.read(dir);
        let objects = self
            .merged
            .as_ref()
            .map(Merged::objects)
            .unwrap_or_default();
        (objects, skipped)
    }

    /// Reads `dir` as [`Cache::load`] does, but returns only the Services and EndpointSlices
    /// that changed since the last read, as they are now, with the Node named `node_name`;
    /// `None` when that cannot be told (the first read, or a file change that made the
    /// objects merge again from scratch).
    pub fn delta(&mut self, dir: &Path, node_name: &str) -> Option<Delta> {
        let (changed, skipped) = self.read(dir);
        let merged = self.merged.as_ref()?;
        let mut out = Delta {
            node: self.node(node_name),
            skipped,
            ..Delta::default()
        };
        for key in changed? {
            let now = merged.found.get(&key).map(|(object, _)| object);
            let (kind, namespace, name) = key;
            match kind {
                0 => out.services.push((
                    (namespace, name),
                    match now {
                        Some(Object::Service(s)) => Some(s.clone()),
                        _ => None,
                    },
                )),
                1 => out.slices.push((
                    (namespace, name),
                    match now {
                        Some(Object::Slice(s)) => Some(s.clone()),
                        _ => None,
                    },
                )),
                // The Node is read whole at every sync.
                _ => {}
            }
        }
        Some(out)
    }

    /// The Node named `name`, as last read.
    fn node(&self, name: &str) -> Option<Arc<Node>> {
        let key = (2, String::new(), name.to_owned());
        match self.merged.as_ref()?.found.get(&key) {
            Some((Object::Node(n), _)) => Some(n.clone()),
            _ => None,
        }
    }

    /// Brings the parsed files and their merge up to date with `dir`. Returns the keys of
    /// the objects that changed since the last read (`None`: unknown), and what could not
    /// be read.
    ///
    /// A directory that cannot be read changes nothing: what was read last stays (as a
    /// failed list leaves kube-proxy's caches alone), so that a directory swapped for a
    /// new one, or a moment without file descriptors, does not take every Service away.
    fn read(&mut self, dir: &Path) -> (Option<BTreeSet<Key>>, Vec<Skipped>) {
        let mut skipped = Vec::new();
        let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_manifest(p))
                .collect(),
            Err(e) => {
                skipped.push(Skipped {
                    object: format!("directory {}", dir.display()),
                    reason: format!("cannot be read: {e}; what was read last is kept"),
                });
                let Some(merged) = &self.merged else {
                    // Nothing read yet: there is nothing to keep.
                    self.merged = Some(self.merge(&[]));
                    return (None, skipped);
                };
                skipped.extend(self.files.values().flat_map(|(_, c)| c.skipped.clone()));
                skipped.extend(merged.duplicates.iter().cloned());
                return (Some(BTreeSet::new()), skipped);
            }
        };
        files.sort();
        // Removed files' objects go, as an edit to nothing would take them.
        let mut gone = Vec::new();
        self.files.retain(|path, (_, contents)| {
            let keep = files.binary_search(path).is_ok();
            if !keep {
                gone.push(std::mem::take(contents));
            }
            keep
        });

        let mut replaced = Vec::new();
        for file in &files {
            if let Some(old) = self.refresh(file) {
                replaced.push((file, old));
            }
            if let Some((_, contents)) = self.files.get(file) {
                skipped.extend(contents.skipped.iter().cloned());
            }
        }
        // A change of one file among thousands of objects patches the merge (a new file is
        // a change from nothing); anything that could involve an object defined twice
        // merges again from scratch.
        let mut changed = BTreeSet::new();
        let none = FileContents::default();
        let patched = match self.merged.take() {
            Some(mut merged) if merged.duplicates.is_empty() => {
                let ok = gone
                    .iter()
                    .all(|old| merged.patch(old, &none, &mut changed))
                    && replaced.iter().all(|(file, old)| {
                        let new = self.files.get(*file).map(|(_, c)| c);
                        new.is_some_and(|new| merged.patch(old, new, &mut changed))
                    });
                ok.then_some(merged)
            }
            _ => None,
        };
        let (merged, changed) = match patched {
            Some(merged) => (merged, Some(changed)),
            None => (self.merge(&files), None),
        };
        skipped.extend(merged.duplicates.iter().cloned());
        self.merged = Some(merged);
        (changed, skipped)
    }

    /// Merges all files' objects, in file order.
    fn merge(&self, files: &[PathBuf]) -> Merged {
        // Keyed by kind/namespace/name: a later file overrides an earlier one, reported.
        let mut found: HashMap<Key, (Object, String)> = HashMap::new();
        let mut duplicates = Vec::new();
        for file in files {
            let Some((_, contents)) = self.files.get(file) else {
                continue;
            };
            for (object, origin) in &contents.objects {
                let key = object_key(object);
                if let Some((_, earlier)) = found.insert(key, (object.clone(), origin.clone())) {
                    duplicates.push(Skipped {
                        object: describe(object),
                        reason: format!(
                            "defined in {earlier} and again in {origin}; using {origin}"
                        ),
                    });
                }
            }
        }
        Merged { found, duplicates }
    }

    /// Parses `file` again if it changed; returns what it held before then.
    fn refresh(&mut self, file: &Path) -> Option<FileContents> {
        // A file that cannot be stat'ed gets the unknown stamp, which never matches: it is
        // parsed (and its error reported) every time.
        let stamp = FileStamp::of(file).unwrap_or_else(FileStamp::unknown);
        let entry = self
            .files
            .entry(file.to_path_buf())
            .or_insert_with(|| (FileStamp::unknown(), FileContents::default()));
        if entry.0 == stamp && stamp != FileStamp::unknown() {
            return None;
        }
        #[cfg(test)]
        {
            self.parses += 1;
        }
        match parse_file(file) {
            Ok(contents) => Some(std::mem::replace(entry, (stamp, contents)).1),
            // Listed but not readable (removed meanwhile, or its permissions changing):
            // its objects as last read stay until it reads again or is gone from the
            // directory, reported meanwhile; the unknown stamp has it read again next time.
            Err(error) => {
                entry.0 = FileStamp::unknown();
                entry.1.skipped = vec![error];
                None
            }
        }
    }
}

impl Merged {
    /// Swaps a file's old objects for its new ones in a merge without duplicates, adding
    /// the keys of the objects that differ to `changed`; false when that would define an
    /// object twice (the caller merges again, which reports it).
    fn patch(
        &mut self,
        old: &FileContents,
        new: &FileContents,
        changed: &mut BTreeSet<Key>,
    ) -> bool {
        let mut before = BTreeMap::new();
        for (object, _) in &old.objects {
            let key = object_key(object);
            if let Some((object, _)) = self.found.remove(&key) {
                before.insert(key, object);
            }
        }
        for (object, origin) in &new.objects {
            let key = object_key(object);
            // A file parsed again after an edit elsewhere in it: its other objects are
            // new allocations of the same content, not changes.
            if before.remove(&key).is_none_or(|b| !b.same(object)) {
                changed.insert(key.clone());
            }
            if self
                .found
                .insert(key, (object.clone(), origin.clone()))
                .is_some()
            {
                return false;
            }
        }
        changed.extend(before.into_keys());
        true
    }

    /// The objects by kind, in key order.
    fn objects(&self) -> Objects {
        let mut objects = (Vec::new(), Vec::new(), Vec::new());
        let mut found: Vec<_> = self.found.iter().collect();
        found.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (_, (object, _)) in found {
            match object {
                Object::Service(s) => objects.0.push(s.clone()),
                Object::Slice(s) => objects.1.push(s.clone()),
                Object::Node(n) => objects.2.push(n.clone()),
            }
        }
        Objects {
            services: Arc::new(objects.0),
            slices: Arc::new(objects.1),
            nodes: Arc::new(objects.2),
        }
    }
}

impl Object {
    /// The same object: the same allocation or equal content.
    fn same(&self, other: &Object) -> bool {
        match (self, other) {
            (Object::Service(a), Object::Service(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::Slice(a), Object::Slice(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::Node(a), Object::Node(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        }
    }
}

impl FileStamp {
    /// A stamp no real file has.
    fn unknown() -> Self {
        FileStamp {
            dev: u64::MAX,
            ino: u64::MAX,
            len: u64::MAX,
            mtime_ns: i128::MIN,
            ctime_ns: i128::MIN,
        }
    }
}

/// Parses one manifest file; `Err`: it cannot be read at all (a file read whole whose
/// bytes are not UTF-8 can: its content is the problem, as with a YAML syntax error).
fn parse_file(file: &Path) -> Result<FileContents, Skipped> {
    let mut contents = FileContents::default();
    let unreadable = |e: std::io::Error| Skipped {
        object: format!("file {}", file.display()),
        reason: format!("cannot be read: {e}"),
    };
    let text = match fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            contents.skipped.push(unreadable(e));
            return Ok(contents);
        }
        Err(e) => return Err(unreadable(e)),
    };
    let name = file.display().to_string();
    let origin = format!("{name} document 1");
    if file.extension().is_some_and(|e| e == "json")
        && let Some(objects) = json_objects(&text, &origin)
    {
        contents.objects = objects;
        return Ok(contents);
    }
    for (index, doc) in parse_documents(&text, &name, &mut contents.skipped) {
        let origin = format!("{name} document {}", index + 1);
        for object in into_objects(doc, &origin, &mut contents.skipped) {
            contents.objects.push((object, origin.clone()));
        }
    }
    Ok(contents)
}

/// A JSON file whose objects all read cleanly (one object or a `kind: List` of them).
///
/// JSON is YAML, but going through the YAML parser takes several times longer, which a
/// directory of 10000 Services feels at every start. Anything else (an error, an unknown
/// kind) is `None`: the file then goes the YAML way, which reports it the same as always.
fn json_objects(text: &str, origin: &str) -> Option<Vec<(Object, String)>> {
    use std::borrow::Cow;

    use serde_json::value::RawValue;

    /// What a document is, read without building the rest of it.
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(rename = "apiVersion", borrow)]
        api_version: Option<Cow<'a, str>>,
        #[serde(borrow)]
        kind: Option<Cow<'a, str>>,
    }
    /// A `kind: List`'s items, each left as its text.
    #[derive(Deserialize)]
    struct Items<'a> {
        #[serde(borrow)]
        items: Option<Vec<&'a RawValue>>,
    }
    // Each object is deserialized straight from its text into its type: no intermediate
    // tree, which is most of the time 10000 objects take.
    let typed = |text: &str, origin: String| {
        let head: Head = serde_json::from_str(text).ok()?;
        let object = match (head.api_version?.as_ref(), head.kind?.as_ref()) {
            ("v1", "Service") => Object::Service(Arc::new(serde_json::from_str(text).ok()?)),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                Object::Slice(Arc::new(serde_json::from_str(text).ok()?))
            }
            ("v1", "Node") => Object::Node(Arc::new(serde_json::from_str(text).ok()?)),
            _ => return None,
        };
        Some((object, origin))
    };
    let head: Head = serde_json::from_str(text).ok()?;
    let is_list = head.api_version.as_deref() == Some("v1") && head.kind.as_deref() == Some("List");
    if !is_list {
        return Some(vec![typed(text, origin.to_owned())?]);
    }
    let list: Items = serde_json::from_str(text).ok()?;
    list.items
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, item)| typed(item.get(), format!("{origin} item {}", i + 1)))
        .collect()
}

/// Reads a manifests directory once (no cache); see [`Cache::load`].
pub fn load_dir(dir: &Path) -> (Objects, Vec<Skipped>) {
    Cache::default().load(dir)
}

/// The directory as a snapshot; the Node is the one named `node_name`, if present.
pub fn snapshot(cache: &mut Cache, dir: &Path, node_name: &str) -> Snapshot {
    let (objects, skipped) = cache.load(dir);
    let node = objects
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
        .cloned();
    Snapshot {
        services: objects.services,
        slices: objects.slices,
        node,
        skipped,
    }
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str());
    !hidden && path.is_file() && matches!(ext, Some("yaml" | "yml" | "json"))
}

/// Splits a file into YAML documents (JSON is YAML). Empty documents are dropped; a
/// document that is not valid YAML is reported and dropped. Returns (index, value).
fn parse_documents(
    text: &str,
    file: &str,
    skipped: &mut Vec<Skipped>,
) -> Vec<(usize, serde_yaml_ng::Value)> {
    let mut docs = Vec::new();
    for (index, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        match serde_yaml_ng::Value::deserialize(de) {
            Ok(serde_yaml_ng::Value::Null) => {}
            Ok(value) => docs.push((index, value)),
            Err(e) => {
                skipped.push(Skipped {
                    object: format!("{file} document {}", index + 1),
                    reason: format!("not valid YAML: {e}"),
                });
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        }
    }
    docs
}

/// Turns one document into objects (`kind: List` holds several).
fn into_objects(
    doc: serde_yaml_ng::Value,
    origin: &str,
    skipped: &mut Vec<Skipped>,
) -> Vec<Object> {
    let field = |name: &str| {
        doc.get(name)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or("<unnamed>")
        .to_owned();
    let what = if kind.is_empty() {
        format!("document without kind ({origin})")
    } else {
        format!("{kind} {name} ({origin})")
    };
    if api_version == "v1" && kind == "List" {
        // Taken, not copied: a list of 10000 Services is most of a large directory.
        let items = match doc {
            serde_yaml_ng::Value::Mapping(mut map) => match map.remove("items") {
                Some(serde_yaml_ng::Value::Sequence(items)) => items,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        return items
            .into_iter()
            .enumerate()
            .flat_map(|(i, item)| into_objects(item, &format!("{origin} item {}", i + 1), skipped))
            .collect();
    }
    let typed = |skipped: &mut Vec<Skipped>| -> Option<Object> {
        let result = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => {
                serde_yaml_ng::from_value::<Service>(doc).map(|s| Object::Service(Arc::new(s)))
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                serde_yaml_ng::from_value::<EndpointSlice>(doc).map(|s| Object::Slice(Arc::new(s)))
            }
            ("v1", "Node") => {
                serde_yaml_ng::from_value::<Node>(doc).map(|n| Object::Node(Arc::new(n)))
            }
            _ => {
                skipped.push(Skipped {
                    object: what.clone(),
                    reason: format!(
                        "unsupported apiVersion/kind {api_version}/{kind} (only v1 Service, \
                         discovery.k8s.io/v1 EndpointSlice, v1 Node and v1 List are read)"
                    ),
                });
                return None;
            }
        };
        match result {
            Ok(object) => Some(object),
            Err(e) => {
                skipped.push(Skipped {
                    object: what.clone(),
                    reason: format!("does not match the {kind} schema: {e}"),
                });
                None
            }
        }
    };
    typed(skipped).into_iter().collect()
}

/// Kind, namespace and name (see [`named`]), so the same object written with and without
/// its namespace is one object defined twice (reported), not two. Nodes have no namespace.
fn object_key(object: &Object) -> Key {
    let (kind, meta) = match object {
        Object::Service(s) => (0, &s.metadata),
        Object::Slice(s) => (1, &s.metadata),
        Object::Node(n) => {
            return (
                2,
                String::new(),
                n.metadata.name.clone().unwrap_or_default(),
            );
        }
    };
    let (namespace, name) = named(meta);
    (kind, namespace, name)
}

fn describe(object: &Object) -> String {
    let (kind, meta) = match object {
        Object::Service(s) => ("Service", &s.metadata),
        Object::Slice(s) => ("EndpointSlice", &s.metadata),
        Object::Node(n) => ("Node", &n.metadata),
    };
    let name = meta.name.as_deref().unwrap_or("<unnamed>");
    match &meta.namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempdir::TempDir {
        let dir = tempdir::TempDir::new();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).expect("write test manifest");
        }
        dir
    }

    /// A tiny self-cleaning temporary directory (std only).
    mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct TempDir(PathBuf);
        static NEXT: AtomicU32 = AtomicU32::new(0);

        impl TempDir {
            pub fn new() -> Self {
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let path =
                    std::env::temp_dir().join(format!("ekp-manifests-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&path).expect("create temp dir");
                TempDir(path)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.244.0.10]
    conditions: {ready: true}
";

    #[test]
    fn reads_several_documents_per_file() {
        let dir = dir_with(&[("web.yaml", &format!("{SERVICE}---\n{SLICE}---\n"))]);
        let (objects, skipped) = load_dir(dir.path());
        assert_eq!(skipped, vec![]);
        assert_eq!(objects.services.len(), 1);
        assert_eq!(objects.slices.len(), 1);
        let endpoints = objects.slices[0].endpoints.as_deref().unwrap_or_default();
        assert_eq!(endpoints[0].addresses, vec!["10.244.0.10"]);
    }

    #[test]
    fn a_bad_document_is_named_and_the_others_still_load() {
        let dir = dir_with(&[
            (
                "a-bad.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec:\n  ports: [{port: \"eighty\"}]\n",
            ),
            ("b-syntax.yaml", "kind: [unclosed\n"),
            (
                "c-unknown.yaml",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: nginx}\n",
            ),
            ("d-good.yaml", SERVICE),
            ("notes.txt", "not a manifest"),
        ]);
        let (objects, skipped) = load_dir(dir.path());
        assert_eq!(objects.services.len(), 1, "the good Service still loads");
        let named: Vec<&str> = skipped.iter().map(|s| s.object.as_str()).collect();
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(named[0].starts_with("Service broken ("), "{named:?}");
        assert!(
            skipped[0]
                .reason
                .contains("does not match the Service schema")
        );
        assert!(named[1].contains("b-syntax.yaml document 1"), "{named:?}");
        assert!(named[2].starts_with("Deployment nginx"), "{named:?}");
        assert!(skipped[2].reason.contains("unsupported"));
    }

    /// The JSON fast path reads what the YAML parser reads (JSON is YAML: the same text in
    /// a `.yaml` file goes the YAML way), and falls back to it for anything it cannot read.
    #[test]
    fn json_is_read_as_the_yaml_parser_reads_it() {
        let json = |yaml: &str| {
            serde_json::to_string(
                &serde_yaml_ng::from_str::<serde_json::Value>(yaml).expect("yaml"),
            )
            .expect("json")
        };
        let (service, slice) = (json(SERVICE), json(SLICE));
        let list = |items: &[&str]| {
            format!(
                r#"{{"apiVersion":"v1","kind":"List","items":[{}]}}"#,
                items.join(",")
            )
        };
        let deployment = r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d"}}"#;
        let texts = [
            service.clone(),
            list(&[&service, &slice]),
            list(&[&slice, deployment]),
            r#"{"apiVersion":"v1","kind":"List","items":null}"#.to_owned(),
            // Escapes where the kind is read, and in the object.
            r#"{"apiVersion":"v1","kind":"Serv\u0069ce","metadata":{"name":"esc","labels":{"n":"a \"q\""}},"spec":{"clusterIP":"10.96.0.20","ports":[{"port":80}]}}"#.to_owned(),
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"x"},"spec":{"ports":"bad"}}"#.to_owned(),
            r#"{"kind":"Service","kind":"Service","apiVersion":"v1","metadata":{"name":"twice"}}"#.to_owned(),
            r#"{"apiVersion":"v1","kind":"List","items":{"not":"a list"}}"#.to_owned(),
        ];
        // The clean ones take the fast path, escapes included.
        for text in [&texts[0], &texts[1], &texts[3], &texts[4]] {
            assert!(json_objects(text, "m").is_some(), "{text}");
        }
        // Reports with the file's path left out.
        let reports = |skipped: Vec<Skipped>, file: &Path| -> Vec<(String, String)> {
            let file = file.display().to_string();
            skipped
                .into_iter()
                .map(|s| (s.object.replace(&file, "m"), s.reason.replace(&file, "m")))
                .collect()
        };
        for text in texts {
            let json_dir = dir_with(&[("m.json", &text)]);
            let yaml_dir = dir_with(&[("m.yaml", &text)]);
            let (from_json, json_skipped) = load_dir(json_dir.path());
            let (from_yaml, yaml_skipped) = load_dir(yaml_dir.path());
            assert_eq!(from_json.services, from_yaml.services, "{text}");
            assert_eq!(from_json.slices, from_yaml.slices, "{text}");
            assert_eq!(
                reports(json_skipped, &json_dir.path().join("m.json")),
                reports(yaml_skipped, &yaml_dir.path().join("m.yaml")),
                "{text}"
            );
        }
    }

    #[test]
    fn list_items_are_read_and_duplicates_reported() {
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n{}",
            SERVICE
                .lines()
                .enumerate()
                .map(|(i, l)| if i == 0 {
                    format!("- {l}\n")
                } else {
                    format!("  {l}\n")
                })
                .collect::<String>()
        );
        let dir = dir_with(&[
            ("1-list.yaml", &list),
            (
                "2-again.json",
                &serde_json::to_string(
                    &serde_yaml_ng::from_str::<serde_json::Value>(SERVICE).expect("valid yaml"),
                )
                .expect("json"),
            ),
        ]);
        let (objects, skipped) = load_dir(dir.path());
        assert_eq!(objects.services.len(), 1);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].object, "Service default/web");
        assert!(skipped[0].reason.contains("2-again.json"));
    }

    #[test]
    fn the_cache_parses_only_files_that_changed_and_forgets_removed_ones() {
        let dir = dir_with(&[("a.yaml", SERVICE), ("b.yaml", SLICE)]);
        let mut cache = Cache::default();
        let (objects, _) = cache.load(dir.path());
        assert_eq!((objects.services.len(), objects.slices.len()), (1, 1));
        assert_eq!(cache.parses, 2);

        // Nothing changed: nothing parsed, same objects.
        let (again, _) = cache.load(dir.path());
        assert_eq!(cache.parses, 2);
        assert_eq!(again.services, objects.services);

        // A file replaced by rename (new inode) is parsed again, and only that one.
        let tmp = dir.path().join(".b.tmp");
        fs::write(&tmp, SLICE.replace("10.244.0.10", "10.244.0.99")).expect("write");
        fs::rename(&tmp, dir.path().join("b.yaml")).expect("rename");
        let (changed, _) = cache.load(dir.path());
        assert_eq!(cache.parses, 3);
        let endpoints = changed.slices[0].endpoints.as_deref().unwrap_or_default();
        assert_eq!(endpoints[0].addresses, vec!["10.244.0.99"]);

        // A removed file's objects are gone.
        fs::remove_file(dir.path().join("a.yaml")).expect("remove");
        let (fewer, _) = cache.load(dir.path());
        assert!(fewer.services.is_empty());
        assert_eq!(cache.files.len(), 1);
    }

    #[test]
    fn a_patched_merge_equals_a_fresh_load() {
        let other = SERVICE.replace("name: web", "name: api");
        let dir = dir_with(&[("a.yaml", SERVICE), ("b.yaml", SLICE), ("c.yaml", &other)]);
        let mut cache = Cache::default();
        let edits = [
            ("b.yaml", SLICE.replace("10.244.0.10", "10.244.0.11")),
            // Now defined twice, then once again.
            ("b.yaml", format!("{SLICE}---\n{SERVICE}")),
            ("b.yaml", SLICE.to_owned()),
            ("c.yaml", other.replace("10.96.0.10", "10.96.0.11")),
            ("c.yaml", "kind: [".to_owned()),
            ("c.yaml", format!("{other}---\n{other}")),
            ("c.yaml", other.clone()),
        ];
        for (file, text) in edits {
            let tmp = dir.path().join(".tmp");
            fs::write(&tmp, text).expect("write");
            fs::rename(&tmp, dir.path().join(file)).expect("rename");
            same_as_fresh(&mut cache, dir.path());
        }
        // A file added, one removed.
        fs::write(
            dir.path().join("d.yaml"),
            SERVICE.replace("name: web", "name: new"),
        )
        .expect("write");
        same_as_fresh(&mut cache, dir.path());
        fs::remove_file(dir.path().join("b.yaml")).expect("remove");
        same_as_fresh(&mut cache, dir.path());
    }

    fn same_as_fresh(cache: &mut Cache, dir: &Path) {
        let (objects, mut skipped) = cache.load(dir);
        let (fresh, mut fresh_skipped) = load_dir(dir);
        assert_eq!(objects.services, fresh.services);
        assert_eq!(objects.slices, fresh.slices);
        skipped.sort();
        fresh_skipped.sort();
        assert_eq!(skipped, fresh_skipped);
    }

    #[test]
    fn changes_name_only_the_objects_that_differ_since_the_last_read() {
        let other = SERVICE.replace("name: web", "name: api");
        let dir = dir_with(&[
            ("a.yaml", &format!("{SERVICE}---\n{other}")),
            ("b.yaml", SLICE),
        ]);
        let mut cache = Cache::default();
        let keys = |c: &Delta| {
            let mut k: Vec<(crate::source::ObjectKey, bool)> = c
                .services
                .iter()
                .map(|(k, o)| (k.clone(), o.is_some()))
                .collect();
            k.extend(c.slices.iter().map(|(k, o)| (k.clone(), o.is_some())));
            k
        };
        // The first read cannot tell.
        assert!(cache.delta(dir.path(), "node").is_none());
        let none = cache.delta(dir.path(), "node");
        assert_eq!(keys(&none.expect("patched")), vec![]);

        // One of two Services in a file edited: that one only.
        let tmp = dir.path().join(".tmp");
        fs::write(
            &tmp,
            format!(
                "{SERVICE}---\n{}",
                other.replace("10.96.0.10", "10.96.0.11")
            ),
        )
        .expect("write");
        fs::rename(&tmp, dir.path().join("a.yaml")).expect("rename");
        let changed = cache.delta(dir.path(), "node");
        let changed = changed.expect("patched");
        assert_eq!(
            keys(&changed),
            vec![(("default".into(), "api".into()), true)]
        );
        let api = changed.services[0].1.as_ref().expect("present");
        assert_eq!(
            api.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
            Some("10.96.0.11")
        );

        // A removed file: its objects, gone (the merge is patched, not made again).
        fs::remove_file(dir.path().join("b.yaml")).expect("remove");
        let changed = cache.delta(dir.path(), "node");
        assert_eq!(
            keys(&changed.expect("patched")),
            vec![(("default".into(), "web-abc".into()), false)]
        );
    }

    /// A directory swapped for a new one (`mv`, as deploy tools do it), or read while it
    /// cannot be, changes nothing: the Services stay until it reads again.
    #[test]
    fn a_directory_that_cannot_be_read_keeps_what_was_read_last() {
        let parent = tempdir::TempDir::new();
        let dir = parent.path().join("manifests");
        fs::create_dir(&dir).expect("create the manifests directory");
        fs::write(dir.join("a.yaml"), SERVICE).expect("write");
        fs::write(dir.join("b.yaml"), SLICE).expect("write");
        let mut cache = Cache::default();
        assert!(cache.delta(&dir, "node").is_none());

        let away = parent.path().join("away");
        fs::rename(&dir, &away).expect("move the directory away");
        let delta = cache.delta(&dir, "node").expect("nothing changed");
        assert!(delta.services.is_empty(), "{:?}", delta.services);
        assert!(delta.slices.is_empty(), "{:?}", delta.slices);
        assert_eq!(delta.skipped.len(), 1, "{:?}", delta.skipped);
        assert!(delta.skipped[0].object.starts_with("directory "));
        let (objects, _) = cache.load(&dir);
        assert_eq!((objects.services.len(), objects.slices.len()), (1, 1));

        fs::rename(&away, &dir).expect("move it back");
        let delta = cache.delta(&dir, "node").expect("patched");
        assert!(delta.services.is_empty() && delta.slices.is_empty());
        assert!(delta.skipped.is_empty(), "{:?}", delta.skipped);
    }

    /// A file listed but then not readable (removed in between, out of descriptors) keeps
    /// its objects as last read, reported, until it is gone from the listing. Reading it
    /// is called here as `read` calls it after a listing, which no test can time.
    #[test]
    fn a_listed_file_that_cannot_be_read_keeps_its_objects_until_it_is_gone() {
        let dir = dir_with(&[("a.yaml", SERVICE), ("b.yaml", SLICE)]);
        let mut cache = Cache::default();
        let (objects, skipped) = cache.load(dir.path());
        assert_eq!((objects.services.len(), skipped.len()), (1, 0));

        let file = dir.path().join("a.yaml");
        fs::remove_file(&file).expect("remove");
        assert!(cache.refresh(&file).is_none(), "its objects did not change");
        let (_, contents) = &cache.files[&file];
        assert_eq!(contents.objects.len(), 1);
        assert_eq!(contents.skipped.len(), 1, "{:?}", contents.skipped);
        assert!(contents.skipped[0].reason.starts_with("cannot be read"));

        // The next listing no longer has it: its objects go.
        let (objects, skipped) = cache.load(dir.path());
        assert_eq!((objects.services.len(), objects.slices.len()), (0, 1));
        assert!(skipped.is_empty(), "{skipped:?}");
    }

    #[test]
    fn missing_directory_is_reported_not_fatal() {
        let (objects, skipped) = load_dir(Path::new("/nonexistent/ekp-manifests"));
        assert!(objects.services.is_empty());
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].object.starts_with("directory "));
    }

    /// The bad-input rows that stop at the manifests source (BEHAVIOUR C34): each is one
    /// report naming its file or object, and the good Service beside them loads.
    #[test]
    fn c34_unparsable_yaml_and_unknown_kinds_are_reported_once_each() {
        let dir = dir_with(&[
            (
                "a-tab.yaml",
                "apiVersion: v1\nkind: Service\n\tmetadata: {name: x}\n",
            ),
            ("b-unclosed.yaml", "{kind: Service, metadata: {name: y}\n"),
            (
                "c-second-doc.yaml",
                &format!("{SERVICE}---\nkind: [\n---\n{SLICE}"),
            ),
            ("d-scalar.yaml", "just a sentence\n"),
            (
                "e-ingress.yaml",
                "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: shop}\n",
            ),
            (
                "f-old-slice.yaml",
                "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: old}\naddressType: IPv4\nendpoints: []\n",
            ),
            ("g-binary.json", "\u{0}\u{1}{\"kind\""),
        ]);
        fs::write(
            dir.path().join("h-latin1.yaml"),
            b"kind: Service\nname: caf\xe9\n",
        )
        .expect("write test manifest");
        let (objects, skipped) = load_dir(dir.path());
        // The first document of c-second-doc.yaml is read; the syntax error ends that file.
        assert_eq!(objects.services.len(), 1);
        assert!(objects.slices.is_empty());
        let reports: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        let want = [
            ("a-tab.yaml document 1: not valid YAML", 1),
            ("b-unclosed.yaml document 1: not valid YAML", 1),
            ("c-second-doc.yaml document 2: not valid YAML", 1),
            ("document without kind (", 1),
            ("Ingress shop (", 1),
            ("apiVersion/kind networking.k8s.io/v1/Ingress", 1),
            ("EndpointSlice old (", 1),
            ("g-binary.json document 1: not valid YAML", 1),
            ("h-latin1.yaml: cannot be read", 1),
        ];
        for (needle, times) in want {
            let found = reports.iter().filter(|r| r.contains(needle)).count();
            assert_eq!(found, times, "{needle:?} in {reports:#?}");
        }
        assert_eq!(skipped.len(), 8, "{reports:#?}");
    }

    #[test]
    fn one_object_with_and_without_its_namespace_is_defined_twice() {
        let without = SERVICE.replace("namespace: default", "namespace: \"\"");
        let dir = dir_with(&[("1.yaml", &without), ("2.yaml", SERVICE)]);
        let (objects, skipped) = load_dir(dir.path());
        assert_eq!(objects.services.len(), 1);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].reason.contains("and again in"), "{skipped:?}");
    }

    /// Property tests (issue 7): nothing in a manifests directory makes loading panic, and a
    /// bad file never costs a good one. 256 cases each by default; longer:
    /// `PROPTEST_CASES=100000 cargo test -p proxy-userspace --lib proptests`.
    mod proptests {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;
        use proptest::sample::{Index, select};

        /// A Service in a file of its own, loaded last (file names are read in order).
        const GOOD: &str = "apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec:
  clusterIP: 10.96.0.99
  ports: [{name: http, port: 80}]
";

        /// What `load_dir` does with one file's text, without the file.
        fn load_text(text: &str) -> Vec<Skipped> {
            let mut skipped = Vec::new();
            for (index, doc) in parse_documents(text, "t.yaml", &mut skipped) {
                let origin = format!("t.yaml document {}", index + 1);
                let objects = into_objects(doc, &origin, &mut skipped);
                for object in &objects {
                    let _ = (object_key(object), describe(object));
                }
            }
            skipped
        }

        /// One edit of a document: characters and lines, with a bias to YAML's own syntax.
        #[derive(Clone, Debug)]
        enum Mutation {
            Replace(Index, char),
            Insert(Index, char),
            Delete(Index),
            DeleteLine(Index),
            DuplicateLine(Index),
            Indent(Index),
        }

        fn yaml_char() -> impl Strategy<Value = char> {
            prop_oneof![
                3 => select(&[
                    ':', '-', ' ', '\n', '\t', '{', '}', '[', ']', '\'', '"', '&', '*', '!',
                    '#', '|', '>', '%', '@', '`', ',', '?', '0', 'a',
                ][..]),
                1 => any::<char>(),
            ]
        }

        fn mutation() -> impl Strategy<Value = Mutation> {
            prop_oneof![
                (any::<Index>(), yaml_char()).prop_map(|(i, c)| Mutation::Replace(i, c)),
                (any::<Index>(), yaml_char()).prop_map(|(i, c)| Mutation::Insert(i, c)),
                any::<Index>().prop_map(Mutation::Delete),
                any::<Index>().prop_map(Mutation::DeleteLine),
                any::<Index>().prop_map(Mutation::DuplicateLine),
                any::<Index>().prop_map(Mutation::Indent),
            ]
        }

        fn mutate(text: &str, mutations: &[Mutation]) -> String {
            let mut chars: Vec<char> = text.chars().collect();
            for mutation in mutations {
                let mut lines: Vec<String> = chars
                    .split(|c| *c == '\n')
                    .map(|l| l.iter().collect())
                    .collect();
                match mutation {
                    Mutation::Replace(i, c) if !chars.is_empty() => {
                        let at = i.index(chars.len());
                        chars[at] = *c;
                    }
                    Mutation::Insert(i, c) => {
                        let at = i.index(chars.len() + 1);
                        chars.insert(at, *c);
                    }
                    Mutation::Delete(i) if !chars.is_empty() => {
                        chars.remove(i.index(chars.len()));
                    }
                    Mutation::DeleteLine(i) => {
                        lines.remove(i.index(lines.len()));
                        chars = lines.join("\n").chars().collect();
                    }
                    Mutation::DuplicateLine(i) => {
                        let at = i.index(lines.len());
                        lines.insert(at, lines[at].clone());
                        chars = lines.join("\n").chars().collect();
                    }
                    Mutation::Indent(i) => {
                        let at = i.index(lines.len());
                        lines[at].insert_str(0, "  ");
                        chars = lines.join("\n").chars().collect();
                    }
                    _ => {}
                }
            }
            chars.into_iter().collect()
        }

        proptest! {
            #[test]
            fn parsing_never_panics_on_arbitrary_text(text in any::<String>()) {
                load_text(&text);
            }

            #[test]
            fn parsing_never_panics_on_yaml_shaped_text(
                text in "([a-zA-Z0-9:{}\\[\\],'\"&*!|>#?.-]| |\n|  ){0,300}"
            ) {
                load_text(&text);
            }

            #[test]
            fn loading_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..1024)) {
                let dir = dir_with(&[]);
                fs::write(dir.path().join("bytes.yaml"), &bytes).expect("write test manifest");
                load_dir(dir.path());
            }

            #[test]
            fn mutated_manifests_never_panic_and_never_cost_the_good_file(
                mutations in vec(mutation(), 1..10)
            ) {
                let mutated = mutate(&format!("{SERVICE}---\n{SLICE}"), &mutations);
                let dir = dir_with(&[("a-mutated.yaml", &mutated), ("z-good.yaml", GOOD)]);
                let (objects, skipped) = load_dir(dir.path());
                let good: Service = serde_yaml_ng::from_str(GOOD).expect("GOOD is valid");
                prop_assert!(
                    objects.services.iter().any(|s| **s == good),
                    "the good Service is lost beside {:?}: {:?}", mutated, skipped
                );
                for report in &skipped {
                    prop_assert!(
                        !report.object.contains("z-good.yaml"),
                        "the good file is blamed: {}", report
                    );
                    prop_assert!(!report.reason.is_empty());
                }
            }
        }
    }
}
