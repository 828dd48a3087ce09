//! The standalone source: Service and EndpointSlice objects from a directory of YAML or
//! JSON manifests (several documents per file, `kind: List` too), deserialized with the
//! real Kubernetes types. Running without a cluster is the embedded default.
//!
//! A document that does not parse is reported by file and position and skipped; the rest
//! of the directory still loads.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use super::Snapshot;
use crate::model::Skipped;

/// The objects found in a manifests directory.
#[derive(Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

/// One object and where it came from, before duplicates are resolved.
enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Node(Box<Node>),
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file in `dir` (not recursive; hidden entries,
/// such as a ConfigMap volume's `..data`, are skipped), in name order.
pub fn load_dir(dir: &Path) -> (Objects, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_manifest(p))
            .collect(),
        Err(e) => {
            skipped.push(Skipped {
                object: format!("directory {}", dir.display()),
                reason: format!("cannot be read: {e}"),
            });
            Vec::new()
        }
    };
    files.sort();

    // Keyed by kind/namespace/name: a later file overrides an earlier one, reported.
    let mut found: BTreeMap<(u8, String, String), (Object, String)> = BTreeMap::new();
    for file in &files {
        let text = match fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                skipped.push(Skipped {
                    object: format!("file {}", file.display()),
                    reason: format!("cannot be read: {e}"),
                });
                continue;
            }
        };
        for (index, doc) in parse_documents(&text, &file.display().to_string(), &mut skipped) {
            let origin = format!("{} document {}", file.display(), index + 1);
            for object in into_objects(doc, &origin, &mut skipped) {
                let key = object_key(&object);
                let name = describe(&object);
                if let Some((_, earlier)) = found.insert(key, (object, origin.clone())) {
                    skipped.push(Skipped {
                        object: name,
                        reason: format!(
                            "defined in {earlier} and again in {origin}; using {origin}"
                        ),
                    });
                }
            }
        }
    }

    let mut objects = Objects::default();
    for (object, _) in found.into_values() {
        match object {
            Object::Service(s) => objects.services.push(*s),
            Object::Slice(s) => objects.slices.push(*s),
            Object::Node(n) => objects.nodes.push(*n),
        }
    }
    (objects, skipped)
}

/// The directory as a snapshot; the Node is the one named `node_name`, if present.
pub fn snapshot(dir: &Path, node_name: &str) -> Snapshot {
    let (objects, skipped) = load_dir(dir);
    let node = objects
        .nodes
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name));
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
    let what = format!("{kind} {name} ({origin})");
    let typed = |skipped: &mut Vec<Skipped>| -> Option<Object> {
        let result = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => serde_yaml_ng::from_value::<Service>(doc.clone())
                .map(|s| Object::Service(Box::new(s))),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                serde_yaml_ng::from_value::<EndpointSlice>(doc.clone())
                    .map(|s| Object::Slice(Box::new(s)))
            }
            ("v1", "Node") => {
                serde_yaml_ng::from_value::<Node>(doc.clone()).map(|n| Object::Node(Box::new(n)))
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
    if api_version == "v1" && kind == "List" {
        let items = doc
            .get("items")
            .and_then(|i| i.as_sequence())
            .cloned()
            .unwrap_or_default();
        return items
            .into_iter()
            .enumerate()
            .flat_map(|(i, item)| into_objects(item, &format!("{origin} item {}", i + 1), skipped))
            .collect();
    }
    typed(skipped).into_iter().collect()
}

fn object_key(object: &Object) -> (u8, String, String) {
    let (kind, meta) = match object {
        Object::Service(s) => (0, &s.metadata),
        Object::Slice(s) => (1, &s.metadata),
        Object::Node(n) => (2, &n.metadata),
    };
    (
        kind,
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
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
    fn missing_directory_is_reported_not_fatal() {
        let (objects, skipped) = load_dir(Path::new("/nonexistent/ekp-manifests"));
        assert!(objects.services.is_empty());
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].object.starts_with("directory "));
    }
}
