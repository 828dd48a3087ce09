//! Failures as the API server reports them: a `meta/v1` `Status` body with the HTTP code,
//! `reason` and `details` that client-go and kube-rs branch on (`is_not_found`, 409 conflicts,
//! 410 Expired). Every rejected request gets one of these, never a bare HTTP error.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::ApiResource;

/// A failed request, rendered as a `Status` object.
#[derive(Clone, Debug)]
pub(super) struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: String) -> Self {
        ApiError {
            code,
            reason,
            message,
            details: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// `services "web" not found`, with the details kube's `is_not_found` and kubectl use.
    pub(super) fn not_found(resource: ApiResource, name: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} {name:?} not found", resource.qualified()),
        )
        .with_details(object_details(resource, name))
    }

    /// A path the server does not serve (an unknown resource or a typo in a test).
    pub(super) fn no_such_path() -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        )
        .with_details(json!({}))
    }

    pub(super) fn already_exists(resource: ApiResource, name: &str) -> Self {
        ApiError::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} {name:?} already exists", resource.qualified()),
        )
        .with_details(object_details(resource, name))
    }

    /// An optimistic-concurrency failure: the caller's precondition or `resourceVersion` is
    /// not the stored one. The wording is the apiserver's, which operators grep logs for.
    pub(super) fn conflict(resource: ApiResource, name: &str, why: &str) -> Self {
        ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: {why}",
                resource.qualified()
            ),
        )
        .with_details(object_details(resource, name))
    }

    pub(super) fn stale_resource_version(resource: ApiResource, name: &str) -> Self {
        ApiError::conflict(
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message.into())
    }

    /// A field-level validation failure (HTTP 422), like `Service "web" is invalid: ...`.
    pub(super) fn invalid(resource: ApiResource, name: &str, field: &str, detail: &str) -> Self {
        let kind = resource.kind();
        let message = format!("{kind} {name:?} is invalid: {field}: {detail}");
        let mut details = json!({
            "name": name,
            "kind": kind,
            "causes": [{"reason": "FieldValueInvalid", "message": detail, "field": field}],
        });
        if !resource.group().is_empty() {
            details["group"] = json!(resource.group());
        }
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message).with_details(details)
    }

    /// Invalid list or watch options: the apiserver validates them as a `ListOptions` object.
    pub(super) fn invalid_list_options(field: &str, detail: &str) -> Self {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("ListOptions.meta.k8s.io \"\" is invalid: {field}: {detail}"),
        )
        .with_details(json!({
            "group": "meta.k8s.io",
            "kind": "ListOptions",
            "causes": [{"reason": "FieldValueForbidden", "message": detail, "field": field}],
        }))
    }

    /// A resourceVersion older than the compaction point: 410 Gone, reason `Expired`, which
    /// is what makes a watcher throw its state away and list again.
    pub(super) fn expired(requested: u64, oldest: u64) -> Self {
        ApiError::new(
            StatusCode::GONE,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// A resourceVersion the store has not reached yet. The real server waits a few seconds
    /// for its cache to catch up, then answers this; the stand-in's store is never behind,
    /// so it answers at once.
    pub(super) fn too_large_resource_version(requested: u64, current: u64) -> Self {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            format!("Too large resource version: {requested}, current: {current}"),
        )
        .with_details(json!({
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1,
        }))
    }

    pub(super) fn method_not_allowed() -> Self {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".into(),
        )
        .with_details(json!({}))
    }

    pub(super) fn unsupported_media_type(content_type: &str) -> Self {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type}) - accepted media types include: application/merge-patch+json (the stand-in implements JSON merge patch only)"
            ),
        )
    }

    pub(super) fn internal(message: impl std::fmt::Display) -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("Internal error occurred: {message}"),
        )
    }

    /// The `Status` object itself, also sent inside a watch `ERROR` event.
    pub(super) fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code, Json(self.status())).into_response()
    }
}

/// The `Status` a delete answers with when the registry does not return the deleted object
/// (everything here but Services). `kind` holds the resource, not the Kind: the apiserver
/// does the same.
pub(super) fn deleted(resource: ApiResource, name: &str, uid: &str) -> Value {
    let mut details = object_details(resource, name);
    details["uid"] = json!(uid);
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    })
}

fn object_details(resource: ApiResource, name: &str) -> Value {
    let mut details = json!({"name": name, "kind": resource.plural()});
    if !resource.group().is_empty() {
        details["group"] = json!(resource.group());
    }
    details
}
