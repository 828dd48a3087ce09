//! What the apiserver does to each kind on the way into storage, after decoding and before
//! the write: the API defaults (`SetDefaults_Service`, `SetDefaults_EndpointPort`), the
//! registry strategies (`PrepareForCreate`/`PrepareForUpdate`: status reset, generation),
//! and the Service allocators (cluster IP, node ports, health-check node port). A proxy reads
//! exactly these fields, so a Service created with only `port: 80` must come back with
//! `protocol: TCP`, `targetPort: 80` and a cluster IP, as it would from a real cluster.
//!
//! Validation is the small subset that catches test mistakes (names, addressType, IPs,
//! node-port range and reuse, immutable clusterIP/addressType); the stand-in is an IPv4
//! single-stack cluster with the default ranges (`10.96.0.0/12`, ports `30000-32767`), except
//! that a requested cluster IP outside the range is accepted so tests can choose addresses.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerStatus, Node, Service, ServiceSpec, ServiceStatus,
    SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiResource;
use super::status::ApiError;
use super::store::{ObjectKey, Store};

/// A kind the stand-in stores, with its registry strategy.
pub(super) trait StoredKind:
    k8s_openapi::Resource
    + k8s_openapi::Metadata<Ty = ObjectMeta>
    + Serialize
    + DeserializeOwned
    + Clone
    + Send
    + Sync
    + 'static
{
    const RESOURCE: ApiResource;

    /// Defaults, server-owned fields and allocations for a new object. `store` holds the
    /// other objects (for allocation); `key` is where this one will live.
    fn prepare_for_create(&mut self, store: &Store, key: &ObjectKey) -> Result<(), ApiError>;

    /// The same for a replacement of `old` through the main resource.
    fn prepare_for_update(
        &mut self,
        old: &Self,
        store: &Store,
        key: &ObjectKey,
    ) -> Result<(), ApiError>;
}

/// A kind with a `/status` subresource: through it only the status changes, through the main
/// resource everything but the status.
pub(super) trait WithStatus: StoredKind {
    fn status_update(old: &Self, new: Self) -> Self;
}

/// `metadata.name` rules per kind: Services are DNS-1035 labels (they become DNS names),
/// the others DNS-1123 subdomains.
pub(super) fn validate_name(resource: ApiResource, name: &str) -> Result<(), ApiError> {
    let ok = match resource {
        ApiResource::Services => {
            name.len() <= 63
                && name.starts_with(|c: char| c.is_ascii_lowercase())
                && name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        }
        ApiResource::EndpointSlices | ApiResource::Nodes | ApiResource::Events => {
            name.len() <= 253
                && name.split('.').all(|part| {
                    part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                        && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                        && part
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                })
        }
    };
    if ok {
        return Ok(());
    }
    let rule = match resource {
        ApiResource::Services => {
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character"
        }
        _ => {
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        }
    };
    Err(ApiError::invalid(
        resource,
        name,
        "metadata.name",
        &format!("Invalid value: {name:?}: {rule}"),
    ))
}

impl StoredKind for Service {
    const RESOURCE: ApiResource = ApiResource::Services;

    fn prepare_for_create(&mut self, store: &Store, key: &ObjectKey) -> Result<(), ApiError> {
        // Status is written by load-balancer controllers through /status only.
        self.status = Some(empty_service_status());
        let spec = self.spec.get_or_insert_with(Default::default);
        default_service_spec(spec);
        allocate(spec, store, key)
    }

    fn prepare_for_update(
        &mut self,
        old: &Self,
        store: &Store,
        key: &ObjectKey,
    ) -> Result<(), ApiError> {
        self.status = old.status.clone();
        let old_spec = old.spec.clone().unwrap_or_default();
        let spec = self.spec.get_or_insert_with(Default::default);
        default_service_spec(spec);
        keep_allocated_values(spec, &old_spec);
        if needs_cluster_ip(spec) && needs_cluster_ip(&old_spec) {
            let (new_ip, old_ip) = (text(&spec.cluster_ip), text(&old_spec.cluster_ip));
            if !old_ip.is_empty() && new_ip != old_ip {
                return Err(ApiError::invalid(
                    ApiResource::Services,
                    &key.name,
                    "spec.clusterIPs[0]",
                    &format!("Invalid value: {new_ip:?}: may not change once set"),
                ));
            }
        }
        allocate(spec, store, key)
    }
}

impl WithStatus for Service {
    fn status_update(old: &Self, new: Self) -> Self {
        Service {
            status: new.status,
            ..old.clone()
        }
    }
}

fn empty_service_status() -> ServiceStatus {
    ServiceStatus {
        load_balancer: Some(LoadBalancerStatus::default()),
        ..Default::default()
    }
}

fn text(field: &Option<String>) -> &str {
    field.as_deref().unwrap_or("")
}

/// `SetDefaults_Service` for the fields a proxy reads.
fn default_service_spec(spec: &mut ServiceSpec) {
    if text(&spec.type_).is_empty() {
        spec.type_ = Some("ClusterIP".into());
    }
    let service_type = text(&spec.type_).to_string();
    if text(&spec.session_affinity).is_empty() {
        spec.session_affinity = Some("None".into());
    }
    if text(&spec.session_affinity) == "ClientIP" {
        let config = spec
            .session_affinity_config
            .get_or_insert_with(SessionAffinityConfig::default);
        let client_ip = config.client_ip.get_or_insert_with(ClientIPConfig::default);
        client_ip.timeout_seconds.get_or_insert(10800);
    }
    for port in spec.ports.iter_mut().flatten() {
        if text(&port.protocol).is_empty() {
            port.protocol = Some("TCP".into());
        }
        let unset = match &port.target_port {
            None => true,
            Some(IntOrString::Int(n)) => *n == 0,
            Some(IntOrString::String(s)) => s.is_empty(),
        };
        if unset {
            port.target_port = Some(IntOrString::Int(port.port));
        }
    }
    if service_type != "ExternalName" && spec.internal_traffic_policy.is_none() {
        spec.internal_traffic_policy = Some("Cluster".into());
    }
    if (service_type == "NodePort" || service_type == "LoadBalancer")
        && text(&spec.external_traffic_policy).is_empty()
    {
        spec.external_traffic_policy = Some("Cluster".into());
    }
    if service_type == "LoadBalancer" && spec.allocate_load_balancer_node_ports.is_none() {
        spec.allocate_load_balancer_node_ports = Some(true);
    }
}

fn needs_cluster_ip(spec: &ServiceSpec) -> bool {
    text(&spec.type_) != "ExternalName"
}

fn needs_node_ports(spec: &ServiceSpec) -> bool {
    match text(&spec.type_) {
        "NodePort" => true,
        "LoadBalancer" => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    }
}

fn needs_health_check_node_port(spec: &ServiceSpec) -> bool {
    text(&spec.type_) == "LoadBalancer" && text(&spec.external_traffic_policy) == "Local"
}

/// The registry's `patchAllocatedValues`: a replacement that leaves out what the server
/// allocated (cluster IPs, node ports by port name, the health-check port) keeps it, so a
/// client that PUTs its own manifest again does not change the Service's addresses.
fn keep_allocated_values(spec: &mut ServiceSpec, old: &ServiceSpec) {
    if needs_cluster_ip(spec) && needs_cluster_ip(old) {
        if text(&spec.cluster_ip).is_empty() && spec.cluster_ips.as_ref().is_none_or(Vec::is_empty)
        {
            spec.cluster_ip = old.cluster_ip.clone();
            spec.cluster_ips = old.cluster_ips.clone();
        }
        if spec.ip_families.as_ref().is_none_or(Vec::is_empty) {
            spec.ip_families = old.ip_families.clone();
        }
        if spec.ip_family_policy.is_none() {
            spec.ip_family_policy = old.ip_family_policy.clone();
        }
    }
    if needs_node_ports(spec) && needs_node_ports(old) {
        let in_use: BTreeSet<i32> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.node_port)
            .collect();
        for port in spec.ports.iter_mut().flatten() {
            if port.node_port.unwrap_or(0) != 0 {
                continue;
            }
            let previous = old
                .ports
                .iter()
                .flatten()
                .find(|p| p.name == port.name)
                .and_then(|p| p.node_port)
                .filter(|n| !in_use.contains(n));
            if previous.is_some() {
                port.node_port = previous;
            }
        }
    }
    if needs_health_check_node_port(spec)
        && needs_health_check_node_port(old)
        && spec.health_check_node_port.unwrap_or(0) == 0
    {
        spec.health_check_node_port = old.health_check_node_port;
    }
}

const SERVICE_CIDR_FIRST: u32 = u32::from_be_bytes([10, 96, 0, 1]);
const SERVICE_CIDR_LAST: u32 = u32::from_be_bytes([10, 111, 255, 254]);
const NODE_PORTS: std::ops::RangeInclusive<i32> = 30000..=32767;

/// Cluster IPs, IP families and node ports: what the user asked for if no other Service holds
/// it, the next free value otherwise.
fn allocate(spec: &mut ServiceSpec, store: &Store, key: &ObjectKey) -> Result<(), ApiError> {
    let invalid = |field: &str, detail: String| {
        ApiError::invalid(ApiResource::Services, &key.name, field, &detail)
    };
    let others: Vec<&Value> = store
        .objects(ApiResource::Services, None)
        .filter(|s| {
            s.pointer("/metadata/namespace").and_then(Value::as_str) != Some(key.namespace.as_str())
                || s.pointer("/metadata/name").and_then(Value::as_str) != Some(key.name.as_str())
        })
        .collect();

    if needs_cluster_ip(spec) {
        let mut ips = spec.cluster_ips.clone().unwrap_or_default();
        let ip = text(&spec.cluster_ip).to_string();
        if ips.is_empty() && !ip.is_empty() {
            ips.push(ip.clone());
        }
        if !ip.is_empty() && ips.first() != Some(&ip) {
            return Err(invalid(
                "spec.clusterIPs[0]",
                format!("Invalid value: {ips:?}: must match `clusterIP` when set"),
            ));
        }
        let taken: BTreeSet<String> = others
            .iter()
            .filter_map(|s| s.pointer("/spec/clusterIPs").and_then(Value::as_array))
            .flatten()
            .filter_map(|ip| ip.as_str().map(String::from))
            .collect();
        if ips.is_empty() {
            let free = (SERVICE_CIDR_FIRST..=SERVICE_CIDR_LAST)
                .map(|n| Ipv4Addr::from(n).to_string())
                .find(|candidate| !taken.contains(candidate))
                .ok_or_else(|| {
                    invalid("spec.clusterIPs", "Internal error: range is full".into())
                })?;
            ips.push(free);
        } else if ips[0] != "None" {
            for (index, ip) in ips.iter().enumerate() {
                if ip.parse::<IpAddr>().is_err() {
                    return Err(invalid(
                        &format!("spec.clusterIPs[{index}]"),
                        format!("Invalid value: {ip:?}: must be a valid IP address"),
                    ));
                }
                if taken.contains(ip) {
                    return Err(invalid(
                        "spec.clusterIPs",
                        format!(
                            "Invalid value: {ips:?}: failed to allocate IP {ip}: provided IP is already allocated"
                        ),
                    ));
                }
            }
        }
        if spec.ip_families.as_ref().is_none_or(Vec::is_empty) {
            let families = ips
                .iter()
                .map(|ip| match ip.parse::<IpAddr>() {
                    Ok(IpAddr::V6(_)) => "IPv6".to_string(),
                    _ => "IPv4".to_string(),
                })
                .collect();
            spec.ip_families = Some(families);
        }
        if spec.ip_family_policy.is_none() {
            let policy = if ips.len() > 1 {
                "RequireDualStack"
            } else {
                "SingleStack"
            };
            spec.ip_family_policy = Some(policy.into());
        }
        spec.cluster_ip = ips.first().cloned();
        spec.cluster_ips = Some(ips);
    }

    let mut taken_ports: BTreeSet<i32> = others
        .iter()
        .flat_map(|s| {
            let node_ports = s
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("nodePort").and_then(Value::as_i64));
            let health = s
                .pointer("/spec/healthCheckNodePort")
                .and_then(Value::as_i64);
            node_ports.chain(health).collect::<Vec<_>>()
        })
        .filter_map(|n| i32::try_from(n).ok())
        .collect();
    let mut take = |requested: Option<i32>, field: String| -> Result<i32, ApiError> {
        match requested.filter(|n| *n != 0) {
            Some(n) if !NODE_PORTS.contains(&n) => Err(invalid(
                &field,
                format!(
                    "Invalid value: {n}: provided port is not in the valid range. The range of valid ports is 30000-32767"
                ),
            )),
            Some(n) if taken_ports.contains(&n) => Err(invalid(
                &field,
                format!("Invalid value: {n}: provided port is already allocated"),
            )),
            Some(n) => {
                taken_ports.insert(n);
                Ok(n)
            }
            None => {
                let free = NODE_PORTS
                    .clone()
                    .find(|n| !taken_ports.contains(n))
                    .ok_or_else(|| invalid(&field, "Internal error: range is full".into()))?;
                taken_ports.insert(free);
                Ok(free)
            }
        }
    };
    if needs_node_ports(spec) {
        for (index, port) in spec.ports.iter_mut().flatten().enumerate() {
            port.node_port = Some(take(
                port.node_port,
                format!("spec.ports[{index}].nodePort"),
            )?);
        }
    }
    if needs_health_check_node_port(spec) {
        spec.health_check_node_port = Some(take(
            spec.health_check_node_port,
            "spec.healthCheckNodePort".into(),
        )?);
    }
    Ok(())
}

impl StoredKind for EndpointSlice {
    const RESOURCE: ApiResource = ApiResource::EndpointSlices;

    fn prepare_for_create(&mut self, _store: &Store, key: &ObjectKey) -> Result<(), ApiError> {
        self.metadata.generation = Some(1);
        default_endpoint_ports(self);
        validate_address_type(self, key)
    }

    fn prepare_for_update(
        &mut self,
        old: &Self,
        _store: &Store,
        key: &ObjectKey,
    ) -> Result<(), ApiError> {
        default_endpoint_ports(self);
        validate_address_type(self, key)?;
        if self.address_type != old.address_type {
            return Err(ApiError::invalid(
                ApiResource::EndpointSlices,
                &key.name,
                "addressType",
                &format!("Invalid value: {:?}: field is immutable", self.address_type),
            ));
        }
        // The endpointslice strategy bumps the generation when anything but metadata, or
        // the labels, changed.
        let content_changed = (&self.endpoints, &self.ports) != (&old.endpoints, &old.ports)
            || self.metadata.labels != old.metadata.labels;
        let generation = old.metadata.generation.unwrap_or(1);
        self.metadata.generation = Some(if content_changed {
            generation + 1
        } else {
            generation
        });
        Ok(())
    }
}

/// `SetDefaults_EndpointPort`.
fn default_endpoint_ports(slice: &mut EndpointSlice) {
    for port in slice.ports.iter_mut().flatten() {
        port.name.get_or_insert_with(String::new);
        port.protocol.get_or_insert_with(|| "TCP".into());
    }
}

fn validate_address_type(slice: &EndpointSlice, key: &ObjectKey) -> Result<(), ApiError> {
    if ["IPv4", "IPv6", "FQDN"].contains(&slice.address_type.as_str()) {
        return Ok(());
    }
    Err(ApiError::invalid(
        ApiResource::EndpointSlices,
        &key.name,
        "addressType",
        &format!(
            "Unsupported value: {:?}: supported values: \"FQDN\", \"IPv4\", \"IPv6\"",
            slice.address_type
        ),
    ))
}

impl StoredKind for Node {
    const RESOURCE: ApiResource = ApiResource::Nodes;

    /// A kubelet registers its Node with the status filled in, so create keeps it.
    fn prepare_for_create(&mut self, _store: &Store, _key: &ObjectKey) -> Result<(), ApiError> {
        Ok(())
    }

    fn prepare_for_update(
        &mut self,
        old: &Self,
        _store: &Store,
        _key: &ObjectKey,
    ) -> Result<(), ApiError> {
        self.status = old.status.clone();
        Ok(())
    }
}

impl WithStatus for Node {
    fn status_update(old: &Self, new: Self) -> Self {
        Node {
            status: new.status,
            ..old.clone()
        }
    }
}

/// The events.k8s.io/v1 registry's validation (`ValidateEventCreate` / `ValidateEventUpdate`
/// for that group): the fields a v1 event must carry, the deprecated core/v1 ones it must
/// not, and, on update, only the series (and metadata) may change.
impl StoredKind for Event {
    const RESOURCE: ApiResource = ApiResource::Events;

    fn prepare_for_create(&mut self, _store: &Store, key: &ObjectKey) -> Result<(), ApiError> {
        let invalid = |field: &str, detail: &str| {
            Err(ApiError::invalid(
                ApiResource::Events,
                &key.name,
                field,
                detail,
            ))
        };
        if self.event_time.is_none() {
            return invalid("eventTime", "Required value");
        }
        match self.type_.as_deref() {
            Some("Normal" | "Warning") => {}
            other => {
                return invalid(
                    "type",
                    &format!("Invalid value: {other:?}: has invalid value"),
                );
            }
        }
        for (field, value) in [
            ("reportingController", &self.reporting_controller),
            ("reportingInstance", &self.reporting_instance),
            ("action", &self.action),
            ("reason", &self.reason),
        ] {
            match value.as_deref() {
                None | Some("") => return invalid(field, "Required value"),
                Some(v) if v.len() > 128 => {
                    return invalid(field, "Too long: may not be more than 128 bytes");
                }
                Some(_) => {}
            }
        }
        if self.note.as_deref().is_some_and(|n| n.len() > 1024) {
            return invalid("note", "Too long: may not be more than 1024 bytes");
        }
        let regarding_namespace = self.regarding.as_ref().and_then(|r| r.namespace.as_deref());
        if regarding_namespace.is_some_and(|ns| ns != key.namespace) {
            return invalid("regarding.namespace", "does not match event.namespace");
        }
        for (field, set) in [
            ("deprecatedCount", self.deprecated_count.is_some()),
            (
                "deprecatedFirstTimestamp",
                self.deprecated_first_timestamp.is_some(),
            ),
            (
                "deprecatedLastTimestamp",
                self.deprecated_last_timestamp.is_some(),
            ),
            ("deprecatedSource", self.deprecated_source.is_some()),
        ] {
            if set {
                return invalid(field, "needs to be unset");
            }
        }
        Ok(())
    }

    fn prepare_for_update(
        &mut self,
        old: &Self,
        _store: &Store,
        key: &ObjectKey,
    ) -> Result<(), ApiError> {
        let unchanged = Event {
            metadata: old.metadata.clone(),
            series: old.series.clone(),
            ..self.clone()
        };
        if &unchanged != old {
            return Err(ApiError::invalid(
                ApiResource::Events,
                &key.name,
                "",
                "field is immutable: only the series may change",
            ));
        }
        Ok(())
    }
}
