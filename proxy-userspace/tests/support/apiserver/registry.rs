//! The generic registry (the apiserver's `genericregistry.Store`): decoding a body into the
//! k8s-openapi type, the object-metadata rules every kind shares (namespace from the path,
//! name or generateName, uid, creationTimestamp, resourceVersion preconditions, no-op
//! updates that write nothing), and the write into the store. Kind-specific work is the
//! strategy's.

use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{DeleteOptions, Time};
use serde_json::{Map, Value};

use super::status::ApiError;
use super::store::{ObjectKey, Store, set_resource_version};
use super::strategy::{StoredKind, validate_name};

/// Parses a request body as `K`, as the apiserver's decoder would: JSON, the right
/// apiVersion and kind (filled in when absent), then the typed schema (unknown fields are
/// dropped, as the apiserver prunes them).
pub(super) fn decode<K: StoredKind>(body: &[u8]) -> Result<K, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })?;
    decode_value(value)
}

pub(super) fn decode_value<K: StoredKind>(mut value: Value) -> Result<K, ApiError> {
    let Some(fields) = value.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    };
    for (field, expected) in [("apiVersion", K::API_VERSION), ("kind", K::KIND)] {
        match fields.get(field) {
            None => {
                fields.insert(field.into(), Value::String(expected.into()));
            }
            Some(Value::String(given)) if given == expected => {}
            Some(given) => {
                return Err(ApiError::bad_request(format!(
                    "the {field} in the data ({given}) does not match the expected {field} ({expected})"
                )));
            }
        }
    }
    serde_json::from_value(value).map_err(|e| {
        ApiError::bad_request(format!(
            "{kind} in version {version:?} cannot be handled as a {kind}: {e}",
            kind = K::KIND,
            version = K::API_VERSION
        ))
    })
}

/// The object as stored and served: the typed value serialized back to JSON.
fn encode<K: StoredKind>(object: &K) -> Result<Value, ApiError> {
    serde_json::to_value(object).map_err(ApiError::internal)
}

fn now() -> Time {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap_or_default())
}

/// POST: a new object in `namespace` ("" for cluster-scoped kinds).
pub(super) fn create<K: StoredKind>(
    store: &mut Store,
    namespace: &str,
    mut object: K,
) -> Result<Value, ApiError> {
    let resource = K::RESOURCE;
    let meta = object.metadata_mut();
    if resource.namespaced() {
        match meta.namespace.as_deref() {
            Some(given) if !given.is_empty() && given != namespace => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => meta.namespace = Some(namespace.to_string()),
        }
    } else {
        meta.namespace = None;
    }
    if meta
        .resource_version
        .as_deref()
        .is_some_and(|rv| !rv.is_empty())
    {
        // etcd3 storage refuses this; the apiserver surfaces it as an internal error.
        return Err(ApiError::internal(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let mut name = meta.name.clone().unwrap_or_default();
    if name.is_empty() {
        let prefix = meta.generate_name.clone().unwrap_or_default();
        if prefix.is_empty() {
            return Err(ApiError::invalid(
                resource,
                "",
                "metadata.name",
                "Required value: name or generateName is required",
            ));
        }
        name = loop {
            let candidate = format!("{prefix}{}", store.name_suffix());
            let key = ObjectKey {
                resource,
                namespace: namespace.to_string(),
                name: candidate.clone(),
            };
            if store.get(&key).is_none() {
                break candidate;
            }
        };
    }
    validate_name(resource, &name)?;
    let key = ObjectKey {
        resource,
        namespace: namespace.to_string(),
        name: name.clone(),
    };
    if store.get(&key).is_some() {
        return Err(ApiError::already_exists(resource, &name));
    }
    let uid = store.next_uid();
    let meta = object.metadata_mut();
    meta.name = Some(name);
    meta.uid = Some(uid);
    meta.creation_timestamp = Some(now());
    meta.generation = None;
    meta.deletion_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    meta.managed_fields = None;
    object.prepare_for_create(store, &key)?;
    let value = encode(&object)?;
    Ok(store.create(key, value))
}

/// How a replacement is turned into the stored object: the kind's update strategy for the
/// main resource, or "keep everything but the status" for `/status`.
pub(super) type Prepare<K> = fn(K, &K, &Store, &ObjectKey) -> Result<K, ApiError>;

pub(super) fn prepare_main<K: StoredKind>(
    mut new: K,
    old: &K,
    store: &Store,
    key: &ObjectKey,
) -> Result<K, ApiError> {
    new.prepare_for_update(old, store, key)?;
    Ok(new)
}

/// PUT (and PATCH, which computes the replacement from the stored object): `replacement`
/// receives the stored JSON. The write is refused if `metadata.resourceVersion` is given and
/// is not the stored one; without it the update is unconditional, as for these kinds on a
/// real server. An update that changes nothing writes nothing: no new resourceVersion, no
/// watch event.
pub(super) fn update<K: StoredKind>(
    store: &mut Store,
    key: ObjectKey,
    prepare: Prepare<K>,
    replacement: impl FnOnce(&Value) -> Result<K, ApiError>,
) -> Result<Value, ApiError> {
    let resource = K::RESOURCE;
    let Some(stored) = store.get(&key).cloned() else {
        return Err(ApiError::not_found(resource, &key.name));
    };
    let old: K = serde_json::from_value(stored.clone()).map_err(ApiError::internal)?;
    let mut new = replacement(&stored)?;
    let old_meta = old.metadata();
    let meta = new.metadata_mut();
    let name = meta.name.clone().unwrap_or_default();
    if name != key.name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            key.name
        )));
    }
    if resource.namespaced() {
        match meta.namespace.as_deref() {
            Some(given) if !given.is_empty() && given != key.namespace => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => meta.namespace = Some(key.namespace.clone()),
        }
    } else {
        meta.namespace = None;
    }
    let stored_version = old_meta.resource_version.clone().unwrap_or_default();
    if let Some(given) = meta.resource_version.as_deref().filter(|rv| !rv.is_empty())
        && given != stored_version
    {
        return Err(ApiError::stale_resource_version(resource, &key.name));
    }
    let stored_uid = old_meta.uid.clone().unwrap_or_default();
    if let Some(given) = meta.uid.as_deref().filter(|uid| !uid.is_empty())
        && given != stored_uid
    {
        return Err(ApiError::conflict(
            resource,
            &key.name,
            &format!(
                "Precondition failed: UID in precondition: {given}, UID in object meta: {stored_uid}"
            ),
        ));
    }
    meta.uid = old_meta.uid.clone();
    meta.creation_timestamp = old_meta.creation_timestamp.clone();
    meta.generation = old_meta.generation;
    meta.deletion_timestamp = old_meta.deletion_timestamp.clone();
    meta.deletion_grace_period_seconds = old_meta.deletion_grace_period_seconds;
    meta.managed_fields = None;
    let new = prepare(new, &old, store, &key)?;
    let mut value = encode(&new)?;
    set_resource_version(&mut value, stored_version.parse().unwrap_or_default());
    if value == stored {
        return Ok(stored);
    }
    Ok(store.update(key, value))
}

/// DELETE, honouring `DeleteOptions.preconditions`. Returns the deleted object stamped with
/// the delete's resourceVersion. Finalizers and grace periods are not modelled: the object
/// goes at once.
pub(super) fn delete(
    store: &mut Store,
    key: &ObjectKey,
    options: Option<DeleteOptions>,
) -> Result<Value, ApiError> {
    let Some(stored) = store.get(key) else {
        return Err(ApiError::not_found(key.resource, &key.name));
    };
    let field = |name: &str| {
        stored
            .pointer(&format!("/metadata/{name}"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    if let Some(preconditions) = options.and_then(|o| o.preconditions) {
        let checks = [
            ("UID", preconditions.uid, field("uid")),
            (
                "ResourceVersion",
                preconditions.resource_version,
                field("resourceVersion"),
            ),
        ];
        for (what, wanted, actual) in checks {
            if let Some(wanted) = wanted
                && wanted != actual
            {
                return Err(ApiError::conflict(
                    key.resource,
                    &key.name,
                    &format!(
                        "Precondition failed: {what} in precondition: {wanted}, {what} in object meta: {actual}"
                    ),
                ));
            }
        }
    }
    store
        .delete(key)
        .ok_or_else(|| ApiError::not_found(key.resource, &key.name))
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else
/// (lists included) replaces.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}
