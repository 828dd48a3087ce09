//! Server-side selection: `labelSelector` with the apiserver's grammar (equality, set-based
//! and existence requirements, comma = AND) and `fieldSelector` over the fields each resource
//! declares selectable. kube-proxy's own selection,
//! `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`, and the agent's
//! `metadata.name=<node>` on Nodes are the cases that matter; the rest is there so a typo in a
//! test is a 400 like on a real cluster instead of a silent match-all.

use serde_json::{Map, Value};

use super::ApiResource;
use super::status::ApiError;

/// A parsed `labelSelector`; empty selects everything.
#[derive(Clone, Debug, Default)]
pub(super) struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

#[derive(Clone, Debug)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

impl LabelSelector {
    pub(super) fn parse(text: &str) -> Result<Self, ApiError> {
        if text.trim().is_empty() {
            return Ok(LabelSelector::default());
        }
        let requirements = split_outside_parentheses(text)
            .into_iter()
            .map(parse_label_requirement)
            .collect::<Result<_, _>>()
            .map_err(|why| ApiError::bad_request(format!("unable to parse requirement: {why}")))?;
        Ok(LabelSelector { requirements })
    }

    /// Whether an object's `metadata` (a JSON object, possibly without `labels`) is selected.
    pub(super) fn matches(&self, object: &Value) -> bool {
        let empty = Map::new();
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                LabelRequirement::Equals(key, value) => label(key) == Some(value.as_str()),
                // `!=` and `notin` select objects without the label too, as in Kubernetes.
                LabelRequirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
                LabelRequirement::In(key, values) => {
                    label(key).is_some_and(|v| values.iter().any(|x| x == v))
                }
                LabelRequirement::NotIn(key, values) => {
                    !label(key).is_some_and(|v| values.iter().any(|x| x == v))
                }
                LabelRequirement::Exists(key) => label(key).is_some(),
                LabelRequirement::DoesNotExist(key) => label(key).is_none(),
                LabelRequirement::GreaterThan(key, bound) => label(key)
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *bound),
                LabelRequirement::LessThan(key, bound) => label(key)
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *bound),
            })
    }
}

/// Commas separate requirements except inside the value set of `in (a,b)`.
fn split_outside_parentheses(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (at, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_label_requirement(text: &str) -> Result<LabelRequirement, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("found '', expected: identifier".into());
    }
    if let Some(key) = text.strip_prefix('!') {
        let key = key.trim();
        validate_label_key(key)?;
        return Ok(LabelRequirement::DoesNotExist(key.to_string()));
    }
    let key_end = text
        .find(|c: char| c.is_whitespace() || "=!<>(".contains(c))
        .unwrap_or(text.len());
    let (key, rest) = (&text[..key_end], text[key_end..].trim_start());
    validate_label_key(key)?;
    let key = key.to_string();
    if rest.is_empty() {
        return Ok(LabelRequirement::Exists(key));
    }
    let single_value = |value: &str| -> Result<String, String> {
        let value = value.trim();
        validate_label_value(value)?;
        Ok(value.to_string())
    };
    let integer = |value: &str| -> Result<i64, String> {
        value.trim().parse::<i64>().map_err(|_| {
            format!("for 'Gt', 'Lt' operators, the value must be an integer: {value:?}")
        })
    };
    if let Some(value) = rest.strip_prefix("==") {
        Ok(LabelRequirement::Equals(key, single_value(value)?))
    } else if let Some(value) = rest.strip_prefix("!=") {
        Ok(LabelRequirement::NotEquals(key, single_value(value)?))
    } else if let Some(value) = rest.strip_prefix('=') {
        Ok(LabelRequirement::Equals(key, single_value(value)?))
    } else if let Some(value) = rest.strip_prefix('>') {
        Ok(LabelRequirement::GreaterThan(key, integer(value)?))
    } else if let Some(value) = rest.strip_prefix('<') {
        Ok(LabelRequirement::LessThan(key, integer(value)?))
    } else if let Some(set) = rest.strip_prefix("notin") {
        Ok(LabelRequirement::NotIn(key, value_set(set)?))
    } else if let Some(set) = rest.strip_prefix("in") {
        Ok(LabelRequirement::In(key, value_set(set)?))
    } else {
        Err(format!(
            "found {rest:?}, expected: in, notin, =, ==, !=, gt, lt"
        ))
    }
}

fn value_set(text: &str) -> Result<Vec<String>, String> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("found {text:?}, expected: '(' values ')'"))?;
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    if values.iter().all(String::is_empty) {
        return Err("for 'in', 'notin' operators, values set can't be empty".into());
    }
    for value in &values {
        validate_label_value(value)?;
    }
    Ok(values)
}

/// A qualified name: an optional DNS-subdomain prefix and `/`, then 1-63 characters of
/// `[-_.A-Za-z0-9]` beginning and ending alphanumeric.
fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(format!(
                "key: Invalid value: {key:?}: prefix part must be a DNS subdomain"
            ));
        }
    }
    if name.is_empty() || !is_qualified_name_part(name) {
        return Err(format!(
            "key: Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        ));
    }
    Ok(())
}

fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_qualified_name_part(value) {
        Ok(())
    } else {
        Err(format!(
            "values[0]: Invalid value: {value:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        ))
    }
}

fn is_qualified_name_part(text: &str) -> bool {
    text.len() <= 63
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text.ends_with(|c: char| c.is_ascii_alphanumeric())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`, comma = AND.
#[derive(Clone, Debug, Default)]
pub(super) struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

#[derive(Clone, Debug)]
struct FieldRequirement {
    field: String,
    equal: bool,
    value: String,
}

impl FieldSelector {
    /// Only the fields the resource declares selectable are accepted (the registry's
    /// `GetAttrs`), so `spec.foo=x` is a 400 as on a real cluster.
    pub(super) fn parse(text: &str, resource: ApiResource) -> Result<Self, ApiError> {
        if text.trim().is_empty() {
            return Ok(FieldSelector::default());
        }
        let mut requirements = Vec::new();
        for term in split_unescaped(text, ',') {
            let (field, equal, value) = split_field_term(&term).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "invalid selector: '{text}'; can't understand '{term}'"
                ))
            })?;
            let field = field.trim().to_string();
            if !selectable_fields(resource).contains(&field.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            requirements.push(FieldRequirement {
                field,
                equal,
                value: unescape(value.trim()),
            });
        }
        Ok(FieldSelector { requirements })
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        self.requirements
            .iter()
            .all(|r| (field_value(object, &r.field) == r.value) == r.equal)
    }
}

fn selectable_fields(resource: ApiResource) -> &'static [&'static str] {
    match resource {
        ApiResource::Services => &[
            "metadata.name",
            "metadata.namespace",
            "spec.clusterIP",
            "spec.type",
        ],
        ApiResource::EndpointSlices | ApiResource::Events => {
            &["metadata.name", "metadata.namespace"]
        }
        // Cluster-scoped: no metadata.namespace.
        ApiResource::Nodes => &["metadata.name", "spec.unschedulable"],
    }
}

/// The value the registry would index for a selectable field; absent fields are the Go zero
/// value (`""`, `false`).
fn field_value(object: &Value, field: &str) -> String {
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    match field {
        "metadata.name" => text("/metadata/name"),
        "metadata.namespace" => text("/metadata/namespace"),
        "spec.clusterIP" => text("/spec/clusterIP"),
        "spec.type" => text("/spec/type"),
        "spec.unschedulable" => object
            .pointer("/spec/unschedulable")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            .to_string(),
        _ => String::new(),
    }
}

/// Splits on `separator` unless it is escaped with a backslash (escapes are kept for
/// [`unescape`]).
fn split_unescaped(text: &str, separator: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            current.push('\\');
            current.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == separator {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
}

/// `field!=value`, `field==value` or `field=value`, at the first unescaped operator.
fn split_field_term(term: &str) -> Option<(&str, bool, &str)> {
    let bytes = term.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'\\' => at += 2,
            b'!' if bytes.get(at + 1) == Some(&b'=') => {
                return Some((&term[..at], false, &term[at + 2..]));
            }
            b'=' if bytes.get(at + 1) == Some(&b'=') => {
                return Some((&term[..at], true, &term[at + 2..]));
            }
            b'=' => return Some((&term[..at], true, &term[at + 1..])),
            _ => at += 1,
        }
    }
    None
}

fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}
