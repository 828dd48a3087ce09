//! From Kubernetes objects to the desired frontends: kube-proxy's semantics as one pure function.
//!
//! This is the only module that knows what a Service *means*. It follows kube-proxy's
//! `pkg/proxy`: which Services and ports are proxied (`servicechangetracker.go`,
//! `serviceport.go`, `util.ShouldSkipService`), how EndpointSlices become endpoints per service
//! port (`endpointslicecache.go`), and which endpoints are usable (`topology.go`,
//! `CategorizeEndpoints`).
//!
//! In scope today: IPv4 ClusterIP frontends with internal traffic policy Cluster. NodePort,
//! externalIPs, LoadBalancer, traffic policy Local, topology hints and session affinity come
//! later; `cluster_endpoints` is where traffic policy and topology plug in.
//!
//! Bad input never aborts the translation: the offending object, port or endpoint is left out
//! and reported in [`Translation::skipped`] with the object's name, and everything else still
//! translates (BEHAVIOUR C34). Normal cases that kube-proxy ignores on purpose (headless and
//! ExternalName Services, another proxy's Services, IPv6 and FQDN slices) are not reported.
//!
//! Decisions where kube-proxy is silent or can't be followed literally:
//! - `metadata.namespace` absent means `default`: manifests for the standalone source often
//!   omit it, and `kubectl apply` would put them there.
//! - The cluster IPs are `spec.clusterIPs` if set, else `spec.clusterIP` (hand-written
//!   manifests may carry either); the first IPv4 one is served, since a Service has one cluster
//!   IP per family. A Service is headless when its primary cluster IP is `None` or empty.
//! - An address listed in several slices is categorized per copy and then de-duplicated, so it
//!   is a backend if any copy is usable. (kube-proxy keeps an arbitrary copy.)
//! - Two Services claiming the same frontend (only possible in manifests, the API server
//!   refuses it): the first in (namespace, name) order keeps it, the other is reported.

use std::cmp::Ordering;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{
    BackendAddr, DesiredState, Frontend, FrontendKey, FrontendKind, Protocol, Scope,
    ServicePortName, Skipped,
};

/// Objects with this label belong to another service proxy (kube-proxy's informers filter them).
const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on slices of headless Services; filtered like the above.
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Names the Service an EndpointSlice belongs to.
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
const DEFAULT_NAMESPACE: &str = "default";

/// Result of one translation: the desired state and the input that was left out.
#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    /// Sorted and de-duplicated, so that a caller can log and count each problem once.
    pub skipped: Vec<Skipped>,
}

/// Translates Services and EndpointSlices into the desired ClusterIP frontends.
///
/// `_node_name` is the local node; it will select local endpoints (traffic policy Local) and
/// topology hints, which are not implemented yet.
pub fn translate(services: &[Service], slices: &[EndpointSlice], _node_name: &str) -> Translation {
    let mut skipped = Vec::new();
    let endpoints = index_endpoints(slices, &mut skipped);

    // Fixed order, so that a conflict between two Services always resolves the same way.
    let mut ordered: Vec<&Service> = services.iter().collect();
    ordered.sort_by(|a, b| compare_names(&a.metadata, &b.metadata));

    let mut state = DesiredState::default();
    for service in ordered {
        add_service(service, &endpoints, &mut state, &mut skipped);
    }

    skipped.sort();
    skipped.dedup();
    Translation { state, skipped }
}

/// An endpoint address on a concrete port, with the conditions kube-proxy reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Endpoint {
    addr: Ipv4Addr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// One endpoint reachable through one slice port. kube-proxy keys endpoints by
/// (service, port name, protocol); the port number comes from the slice, which is how a
/// (named) targetPort gets resolved.
#[derive(Clone, Debug)]
struct PortEndpoint {
    port_name: String,
    proto: Protocol,
    endpoint: Endpoint,
}

/// Endpoints of every Service, keyed by (namespace, Service name).
type EndpointIndex = BTreeMap<(String, String), Vec<PortEndpoint>>;

/// Reads every IPv4 EndpointSlice once, reporting its problems once, and groups its endpoints
/// by the Service named in its `kubernetes.io/service-name` label.
fn index_endpoints(slices: &[EndpointSlice], skipped: &mut Vec<Skipped>) -> EndpointIndex {
    let mut index = EndpointIndex::new();
    for slice in slices {
        // IPv6 slices belong to the IPv6 side of a dual-stack Service; FQDN slices are not
        // proxied by kube-proxy at all.
        if !is_for_this_proxy(&slice.metadata) || slice.address_type != "IPv4" {
            continue;
        }
        let namespace = namespace(&slice.metadata);
        let Some(name) = name(&slice.metadata) else {
            skipped.push(missing_name("EndpointSlice", namespace));
            continue;
        };
        let object = format!("EndpointSlice {namespace}/{name}");
        let Some(service) = label(&slice.metadata, LABEL_SERVICE_NAME) else {
            skipped.push(skip(&object, format!("has no {LABEL_SERVICE_NAME} label")));
            continue;
        };

        let ports = slice_ports(slice, &object, skipped);
        let endpoints = slice_endpoints(slice, &object, skipped);
        let entry = index
            .entry((namespace.to_owned(), service.to_owned()))
            .or_default();
        for (port_name, proto, port) in &ports {
            entry.extend(endpoints.iter().map(|&(addr, conditions)| PortEndpoint {
                port_name: port_name.clone(),
                proto: *proto,
                endpoint: conditions.at(addr, *port),
            }));
        }
    }
    index
}

/// The ports of a slice that can carry traffic: (name, protocol, number).
fn slice_ports(
    slice: &EndpointSlice,
    object: &str,
    skipped: &mut Vec<Skipped>,
) -> Vec<(String, Protocol, u16)> {
    let mut ports = Vec::new();
    for port in slice.ports.iter().flatten() {
        // The API server defaults an absent name to "" and an absent protocol to TCP.
        let name = port.name.clone().unwrap_or_default();
        // Other protocols (SCTP) can only match service ports that are skipped anyway.
        let Ok(proto) = parse_protocol(port.protocol.as_deref()) else {
            continue;
        };
        let what = if name.is_empty() {
            "unnamed port".to_owned()
        } else {
            format!("port {name:?}")
        };
        match port.port.map(port_number) {
            Some(Ok(number)) => ports.push((name, proto, number)),
            Some(Err(reason)) => skipped.push(skip(object, format!("{what}: {reason}"))),
            None => skipped.push(skip(object, format!("{what} has no port number"))),
        }
    }
    ports
}

/// An endpoint's conditions, read as kube-proxy reads them (absent ready and serving mean
/// true, absent terminating means false, as the API documents).
#[derive(Clone, Copy, Debug)]
struct Conditions {
    ready: bool,
    serving: bool,
    terminating: bool,
}

impl Conditions {
    fn at(self, addr: Ipv4Addr, port: u16) -> Endpoint {
        Endpoint {
            addr,
            port,
            ready: self.ready,
            serving: self.serving,
            terminating: self.terminating,
        }
    }
}

/// The usable addresses of a slice's endpoints. Like kube-proxy, only an endpoint's first
/// address is used (the API allows exactly one for IPv4 slices).
fn slice_endpoints(
    slice: &EndpointSlice,
    object: &str,
    skipped: &mut Vec<Skipped>,
) -> Vec<(Ipv4Addr, Conditions)> {
    let mut endpoints = Vec::new();
    for endpoint in slice.endpoints.iter().flatten() {
        let Some(address) = endpoint.addresses.first() else {
            skipped.push(skip(object, "an endpoint has no address".to_owned()));
            continue;
        };
        let addr = match parse_ip_sloppy(address) {
            Some(IpAddr::V4(addr)) => addr,
            Some(IpAddr::V6(_)) => {
                let reason = format!("endpoint address {address:?} is not IPv4");
                skipped.push(skip(object, reason));
                continue;
            }
            None => {
                let reason = format!("invalid endpoint address {address:?}");
                skipped.push(skip(object, reason));
                continue;
            }
        };
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        endpoints.push((
            addr,
            Conditions {
                ready,
                serving,
                terminating,
            },
        ));
    }
    endpoints
}

/// Adds one frontend per service port on the Service's IPv4 cluster IP.
fn add_service(
    service: &Service,
    index: &EndpointIndex,
    state: &mut DesiredState,
    skipped: &mut Vec<Skipped>,
) {
    let meta = &service.metadata;
    // No spec means no cluster IP: nothing to proxy, like a headless Service.
    let Some(spec) = &service.spec else {
        return;
    };
    if !is_for_this_proxy(meta)
        || spec.type_.as_deref() == Some("ExternalName")
        || is_headless(spec)
    {
        return;
    }
    let namespace = namespace(meta);
    let Some(name) = name(meta) else {
        skipped.push(missing_name("Service", namespace));
        return;
    };
    let object = format!("Service {namespace}/{name}");
    let Some(cluster_ip) = cluster_ipv4(spec, &object, skipped) else {
        return;
    };
    let endpoints = index
        .get(&(namespace.to_owned(), name.to_owned()))
        .map_or(&[][..], Vec::as_slice);

    for port in spec.ports.iter().flatten() {
        let port_object = format!("{object} port {}", port_label(port));
        let (number, proto) = match service_port(port) {
            Ok(port) => port,
            Err(reason) => {
                skipped.push(skip(&port_object, reason));
                continue;
            }
        };
        let service = ServicePortName {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port: port.name.clone().unwrap_or_default(),
        };
        let frontend = Frontend {
            key: FrontendKey {
                addr: cluster_ip,
                port: number,
                proto,
                scope: Scope::Internal,
            },
            kind: FrontendKind::ClusterIp,
            backends: backends(endpoints, &service.port, proto),
            service,
        };
        insert_frontend(state, frontend, &port_object, skipped);
    }
}

/// Keeps the first claim on a frontend; a second one is reported instead of overwriting it.
fn insert_frontend(
    state: &mut DesiredState,
    frontend: Frontend,
    object: &str,
    skipped: &mut Vec<Skipped>,
) {
    match state.frontends.entry(frontend.key) {
        Entry::Vacant(slot) => {
            slot.insert(frontend);
        }
        Entry::Occupied(taken) => {
            let reason = format!(
                "{} is already served by {}",
                frontend.key,
                taken.get().service
            );
            skipped.push(skip(object, reason));
        }
    }
}

/// The backends of one service port: the cluster endpoints on the slice ports with the
/// service port's name and protocol, sorted and de-duplicated.
fn backends(endpoints: &[PortEndpoint], port_name: &str, proto: Protocol) -> Vec<BackendAddr> {
    let candidates: Vec<Endpoint> = endpoints
        .iter()
        .filter(|e| e.port_name == port_name && e.proto == proto)
        .map(|e| e.endpoint)
        .collect();
    let unique: BTreeSet<BackendAddr> = cluster_endpoints(&candidates)
        .into_iter()
        .map(|e| BackendAddr {
            addr: e.addr,
            port: e.port,
            proto,
        })
        .collect();
    unique.into_iter().collect()
}

/// kube-proxy's `CategorizeEndpoints` for traffic policy Cluster without topology hints: the
/// ready endpoints; if there are none, the serving-terminating ones, so that connections keep
/// working while the last pods of a rollout drain (C17); never non-serving ones. An empty
/// result makes the datapath refuse connections (C18).
fn cluster_endpoints(endpoints: &[Endpoint]) -> Vec<&Endpoint> {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .filter(|e| e.serving && e.terminating)
        .collect()
}

/// The Service's IPv4 cluster IP. Invalid addresses are reported; IPv6 ones belong to the
/// other family of a dual-stack Service and are ignored; kube-proxy serves one address per
/// family, so further IPv4 ones (refused by the API server) are reported.
fn cluster_ipv4(spec: &ServiceSpec, object: &str, skipped: &mut Vec<Skipped>) -> Option<Ipv4Addr> {
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let mut chosen: Option<Ipv4Addr> = None;
    for ip in listed {
        match (parse_ip_sloppy(ip), chosen) {
            (Some(IpAddr::V4(addr)), None) => chosen = Some(addr),
            (Some(IpAddr::V4(addr)), Some(first)) if addr != first => {
                let reason =
                    format!("second IPv4 clusterIP {ip:?} ignored: a Service has one per family");
                skipped.push(skip(object, reason));
            }
            (Some(_), _) => {}
            (None, _) => skipped.push(skip(object, format!("invalid clusterIP {ip:?}"))),
        }
    }
    chosen
}

/// kube-proxy's `ShouldSkipService` test on the primary cluster IP: `None` or empty means
/// headless (DNS only, nothing to proxy).
fn is_headless(spec: &ServiceSpec) -> bool {
    let primary = spec
        .cluster_ip
        .as_deref()
        .or_else(|| spec.cluster_ips.as_ref()?.first().map(String::as_str));
    matches!(primary, None | Some("" | "None"))
}

/// Port number and protocol of a service port, or why it can't be served.
fn service_port(port: &ServicePort) -> Result<(u16, Protocol), String> {
    let proto = parse_protocol(port.protocol.as_deref())?;
    let number = port_number(port.port).map_err(|reason| format!("port {reason}"))?;
    Ok((number, proto))
}

/// How a service port is named in a report: its name, or its number when it has none.
fn port_label(port: &ServicePort) -> String {
    match port.name.as_deref() {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => port.port.to_string(),
    }
}

/// Absent means TCP (the API default). The values are case-sensitive, as in the API.
fn parse_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    match protocol {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some(other) => Err(format!(
            "protocol {other:?} is not supported (only TCP and UDP)"
        )),
    }
}

fn port_number(port: i32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{port} is out of range 1-65535"))
}

/// Parses an address the way Kubernetes does (`netutils.ParseIPSloppy`, Go's pre-1.17
/// parser): dotted-quad octets may have leading zeros and are read as decimal
/// (`172.30.0.041` is `172.30.0.41`), because the API server accepted such addresses for
/// years and they survive in stored objects. An IPv4-mapped IPv6 address counts as IPv4, as
/// in Go.
fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    if text.contains(':') {
        let v6: Ipv6Addr = text.parse().ok()?;
        return Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4));
    }
    parse_ipv4_sloppy(text).map(IpAddr::V4)
}

fn parse_ipv4_sloppy(text: &str) -> Option<Ipv4Addr> {
    let mut fields = text.split('.');
    let mut octets = [0u8; 4];
    for octet in &mut octets {
        let field = fields.next()?;
        if field.is_empty() {
            return None;
        }
        let value = field.bytes().try_fold(0u8, |value, digit| {
            if !digit.is_ascii_digit() {
                return None;
            }
            value.checked_mul(10)?.checked_add(digit - b'0')
        })?;
        *octet = value;
    }
    match fields.next() {
        Some(_) => None,
        None => Some(Ipv4Addr::from(octets)),
    }
}

/// kube-proxy watches only objects without these labels (its informers' label selector).
fn is_for_this_proxy(meta: &ObjectMeta) -> bool {
    let labels = meta.labels.as_ref();
    !labels
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
}

fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

fn name(meta: &ObjectMeta) -> Option<&str> {
    meta.name.as_deref().filter(|name| !name.is_empty())
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    let value = meta.labels.as_ref()?.get(key)?;
    Some(value.as_str()).filter(|v| !v.is_empty())
}

fn compare_names(a: &ObjectMeta, b: &ObjectMeta) -> Ordering {
    (namespace(a), name(a)).cmp(&(namespace(b), name(b)))
}

fn skip(object: &str, reason: String) -> Skipped {
    Skipped {
        object: object.to_owned(),
        reason,
    }
}

fn missing_name(kind: &str, namespace: &str) -> Skipped {
    skip(
        &format!("{kind} {namespace}/<unnamed>"),
        "metadata.name is missing".to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1 as discovery;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    const NODE: &str = "n1";

    // ---- objects in ------------------------------------------------------------------------

    /// A ClusterIP Service without address or ports yet.
    fn svc(namespace: &str, name: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// An empty string means "field absent" for optional fields.
    fn some(value: &str) -> Option<String> {
        (!value.is_empty()).then(|| value.to_owned())
    }

    trait ServiceBuilder: Sized {
        fn cluster_ip(self, ip: &str) -> Self;
        fn cluster_ips(self, ips: &[&str]) -> Self;
        fn type_(self, type_: &str) -> Self;
        /// A port whose targetPort is the same number (the API default).
        fn port(self, name: &str, port: i32, proto: &str) -> Self;
        /// Sets the targetPort of the last port added.
        fn target_port(self, target: IntOrString) -> Self;
        fn label(self, key: &str, value: &str) -> Self;
    }

    impl ServiceBuilder for Service {
        fn cluster_ip(mut self, ip: &str) -> Self {
            spec(&mut self).cluster_ip = Some(ip.into());
            self
        }
        fn cluster_ips(mut self, ips: &[&str]) -> Self {
            spec(&mut self).cluster_ips = Some(ips.iter().map(|ip| ip.to_string()).collect());
            self
        }
        fn type_(mut self, type_: &str) -> Self {
            spec(&mut self).type_ = some(type_);
            self
        }
        fn port(mut self, name: &str, port: i32, proto: &str) -> Self {
            spec(&mut self)
                .ports
                .get_or_insert_with(Vec::new)
                .push(ServicePort {
                    name: some(name),
                    port,
                    protocol: some(proto),
                    target_port: Some(IntOrString::Int(port)),
                    ..ServicePort::default()
                });
            self
        }
        fn target_port(mut self, target: IntOrString) -> Self {
            if let Some(port) = spec(&mut self).ports.as_mut().and_then(|p| p.last_mut()) {
                port.target_port = Some(target);
            }
            self
        }
        fn label(mut self, key: &str, value: &str) -> Self {
            let labels = self.metadata.labels.get_or_insert_with(BTreeMap::new);
            labels.insert(key.into(), value.into());
            self
        }
    }

    fn spec(service: &mut Service) -> &mut ServiceSpec {
        service.spec.get_or_insert_with(ServiceSpec::default)
    }

    /// An IPv4 EndpointSlice of Service `service`, without ports or endpoints yet.
    fn slice(namespace: &str, name: &str, service: &str) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(
                    LABEL_SERVICE_NAME.into(),
                    service.into(),
                )])),
                ..ObjectMeta::default()
            },
            ..EndpointSlice::default()
        }
    }

    fn conditions(ready: bool, serving: bool, terminating: bool) -> discovery::EndpointConditions {
        discovery::EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }
    }

    trait SliceBuilder: Sized {
        fn address_type(self, address_type: &str) -> Self;
        fn label(self, key: &str, value: &str) -> Self;
        fn raw_port(self, port: discovery::EndpointPort) -> Self;
        fn endpoint(self, addresses: &[&str], conditions: discovery::EndpointConditions) -> Self;

        fn port(self, name: &str, port: i32, proto: &str) -> Self {
            self.raw_port(discovery::EndpointPort {
                name: some(name),
                port: Some(port),
                protocol: some(proto),
                ..discovery::EndpointPort::default()
            })
        }
        fn ready(self, addr: &str) -> Self {
            self.endpoint(&[addr], conditions(true, true, false))
        }
        /// A pod that is shutting down but still passes its readiness probe.
        fn serving_terminating(self, addr: &str) -> Self {
            self.endpoint(&[addr], conditions(false, true, true))
        }
        /// A pod that is shutting down and no longer passes its readiness probe.
        fn terminating_not_serving(self, addr: &str) -> Self {
            self.endpoint(&[addr], conditions(false, false, true))
        }
        fn not_ready(self, addr: &str) -> Self {
            self.endpoint(&[addr], conditions(false, false, false))
        }
    }

    impl SliceBuilder for EndpointSlice {
        fn address_type(mut self, address_type: &str) -> Self {
            self.address_type = address_type.into();
            self
        }
        fn label(mut self, key: &str, value: &str) -> Self {
            let labels = self.metadata.labels.get_or_insert_with(BTreeMap::new);
            labels.insert(key.into(), value.into());
            self
        }
        fn raw_port(mut self, port: discovery::EndpointPort) -> Self {
            self.ports.get_or_insert_with(Vec::new).push(port);
            self
        }
        fn endpoint(
            mut self,
            addresses: &[&str],
            conditions: discovery::EndpointConditions,
        ) -> Self {
            self.endpoints
                .get_or_insert_with(Vec::new)
                .push(discovery::Endpoint {
                    addresses: addresses.iter().map(|a| a.to_string()).collect(),
                    conditions: Some(conditions),
                    ..discovery::Endpoint::default()
                });
            self
        }
    }

    // ---- results out -----------------------------------------------------------------------

    /// Each frontend as one line, `frontend -> backend, backend`, in frontend order.
    fn rows(t: &Translation) -> Vec<String> {
        t.state
            .frontends
            .values()
            .map(|f| {
                let backends: Vec<String> = f.backends.iter().map(ToString::to_string).collect();
                let backends = if backends.is_empty() {
                    "(none)".to_owned()
                } else {
                    backends.join(", ")
                };
                format!("{} -> {backends}", f.key)
            })
            .collect()
    }

    fn skipped(t: &Translation) -> Vec<String> {
        t.skipped.iter().map(ToString::to_string).collect()
    }

    /// Translates and checks that nothing was skipped: the common case of a valid input.
    fn clean(services: &[Service], slices: &[EndpointSlice]) -> Vec<String> {
        let t = translate(services, slices, NODE);
        assert_eq!(skipped(&t), Vec::<String>::new());
        rows(&t)
    }

    fn web() -> Service {
        svc("default", "web")
            .cluster_ip("10.96.0.10")
            .port("http", 80, "TCP")
    }

    // ---- BEHAVIOUR cases -------------------------------------------------------------------

    #[test]
    fn c01_cluster_ip_port_reaches_its_ready_endpoint() {
        let t = translate(
            &[web()],
            &[slice("default", "web-1", "web")
                .port("http", 80, "TCP")
                .ready("10.0.0.1")],
            NODE,
        );
        let key = FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        };
        let want = Frontend {
            key,
            kind: FrontendKind::ClusterIp,
            service: ServicePortName {
                namespace: "default".into(),
                name: "web".into(),
                port: "http".into(),
            },
            backends: vec![BackendAddr {
                addr: Ipv4Addr::new(10, 0, 0, 1),
                port: 80,
                proto: Protocol::Tcp,
            }],
        };
        assert_eq!(t.state.frontends, BTreeMap::from([(key, want)]));
        assert!(t.skipped.is_empty());
    }

    #[test]
    fn c02_every_ready_endpoint_is_a_backend() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.3")
            .ready("10.0.0.1")
            .ready("10.0.0.2");
        assert_eq!(
            clean(&[web()], &[endpoints]),
            ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP, 10.0.0.2:80/TCP, 10.0.0.3:80/TCP"]
        );
    }

    #[test]
    fn c03_numeric_target_port_uses_the_slice_port() {
        let service = svc("default", "web")
            .cluster_ip("10.96.0.10")
            .port("https", 443, "TCP")
            .target_port(IntOrString::Int(8443));
        let endpoints = slice("default", "web-1", "web")
            .port("https", 8443, "TCP")
            .ready("10.0.0.1");
        assert_eq!(
            clean(&[service], &[endpoints]),
            ["10.96.0.10:443/TCP -> 10.0.0.1:8443/TCP"]
        );
    }

    /// The EndpointSlice controller resolves a named targetPort per pod and publishes the
    /// number under the *service port's* name; the proxy only matches names.
    #[test]
    fn c03_named_target_port_resolved_through_slice_ports() {
        let service = svc("default", "web")
            .cluster_ip("10.96.0.10")
            .port("https", 443, "TCP")
            .target_port(IntOrString::String("web-tls".into()));
        let endpoints = [
            slice("default", "web-1", "web")
                .port("https", 8443, "TCP")
                .ready("10.0.0.1"),
            slice("default", "web-2", "web")
                .port("https", 9443, "TCP")
                .ready("10.0.0.2"),
        ];
        assert_eq!(
            clean(&[service], &endpoints),
            ["10.96.0.10:443/TCP -> 10.0.0.1:8443/TCP, 10.0.0.2:9443/TCP"]
        );
    }

    #[test]
    fn c04_tcp_and_udp_on_one_port_reach_their_own_backends() {
        let service = svc("kube-system", "dns")
            .cluster_ip("10.96.0.53")
            .port("dns-tcp", 53, "TCP")
            .target_port(IntOrString::Int(5353))
            .port("dns", 53, "UDP");
        let endpoints = slice("kube-system", "dns-1", "dns")
            .port("dns-tcp", 5353, "TCP")
            .port("dns", 53, "UDP")
            .ready("10.0.0.1");
        assert_eq!(
            clean(&[service], &[endpoints]),
            [
                "10.96.0.53:53/TCP -> 10.0.0.1:5353/TCP",
                "10.96.0.53:53/UDP -> 10.0.0.1:53/UDP",
            ]
        );
    }

    #[test]
    fn c05_tcp_only_port_has_no_udp_frontend() {
        let t = translate(
            &[web()],
            &[slice("default", "web-1", "web")
                .port("http", 80, "TCP")
                .ready("10.0.0.1")],
            NODE,
        );
        let udp = FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: Protocol::Udp,
            scope: Scope::Internal,
        };
        assert!(!t.state.frontends.contains_key(&udp));
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
    }

    #[test]
    fn c16_only_ready_endpoints_when_any_is_ready() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1")
            .serving_terminating("10.0.0.2")
            .terminating_not_serving("10.0.0.3")
            .not_ready("10.0.0.4");
        assert_eq!(
            clean(&[web()], &[endpoints]),
            ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
        );
    }

    #[test]
    fn c17_falls_back_to_serving_terminating() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .serving_terminating("10.0.0.2")
            .terminating_not_serving("10.0.0.3")
            .not_ready("10.0.0.4");
        assert_eq!(
            clean(&[web()], &[endpoints]),
            ["10.96.0.10:80/TCP -> 10.0.0.2:80/TCP"]
        );
    }

    #[test]
    fn c18_no_usable_endpoint_leaves_a_frontend_without_backends() {
        let cases = [
            (
                "all terminating and not serving",
                vec![
                    slice("default", "web-1", "web")
                        .port("http", 80, "TCP")
                        .terminating_not_serving("10.0.0.1")
                        .not_ready("10.0.0.2"),
                ],
            ),
            ("no EndpointSlice at all", vec![]),
            (
                "a slice without endpoints",
                vec![slice("default", "web-1", "web").port("http", 80, "TCP")],
            ),
        ];
        for (case, slices) in cases {
            assert_eq!(
                clean(&[web()], &slices),
                ["10.96.0.10:80/TCP -> (none)"],
                "{case}"
            );
        }
    }

    #[test]
    fn c24_headless_and_external_name_produce_nothing_until_changed_to_cluster_ip() {
        let endpoints = [slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1")];
        let nothing = [
            (
                "clusterIP None",
                svc("default", "web")
                    .cluster_ip("None")
                    .port("http", 80, "TCP"),
            ),
            (
                "clusterIP empty",
                svc("default", "web").cluster_ip("").port("http", 80, "TCP"),
            ),
            (
                "clusterIP absent",
                svc("default", "web").port("http", 80, "TCP"),
            ),
            (
                "clusterIPs None",
                svc("default", "web")
                    .cluster_ips(&["None"])
                    .port("http", 80, "TCP"),
            ),
            (
                "ExternalName",
                svc("default", "web")
                    .type_("ExternalName")
                    .port("http", 80, "TCP"),
            ),
            (
                "ExternalName with a stale clusterIP",
                web().type_("ExternalName"),
            ),
        ];
        for (case, service) in nothing {
            assert_eq!(
                clean(&[service], &endpoints),
                Vec::<String>::new(),
                "{case}"
            );
        }
        let changed = svc("default", "web")
            .type_("ClusterIP")
            .cluster_ip("10.96.0.10")
            .port("http", 80, "TCP");
        assert_eq!(
            clean(&[changed], &endpoints),
            ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
        );
    }

    #[test]
    fn c25_service_proxy_name_label_hides_the_service_until_removed() {
        let endpoints = [slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1")];
        for value in ["other-proxy", ""] {
            let labelled = web().label(LABEL_SERVICE_PROXY_NAME, value);
            assert_eq!(
                clean(&[labelled], &endpoints),
                Vec::<String>::new(),
                "value {value:?}"
            );
        }
        assert_eq!(
            clean(&[web()], &endpoints),
            ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
        );
    }

    // ---- endpoints -------------------------------------------------------------------------

    #[test]
    fn multiple_slices_are_merged_and_deduplicated() {
        let endpoints = [
            slice("default", "web-1", "web")
                .port("http", 8080, "TCP")
                .ready("10.0.0.1")
                .ready("10.0.0.2"),
            slice("default", "web-2", "web")
                .port("http", 8080, "TCP")
                .ready("10.0.0.2")
                .ready("10.0.0.3"),
            // The same address on another port is another backend.
            slice("default", "web-3", "web")
                .port("http", 9090, "TCP")
                .ready("10.0.0.1"),
        ];
        assert_eq!(
            clean(&[web()], &endpoints),
            [
                "10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.1:9090/TCP, 10.0.0.2:8080/TCP, 10.0.0.3:8080/TCP"
            ]
        );
    }

    #[test]
    fn an_address_ready_in_any_slice_is_ready() {
        let endpoints = [
            slice("default", "web-1", "web")
                .port("http", 80, "TCP")
                .not_ready("10.0.0.1"),
            slice("default", "web-2", "web")
                .port("http", 80, "TCP")
                .ready("10.0.0.1"),
        ];
        assert_eq!(
            clean(&[web()], &endpoints),
            ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
        );
    }

    #[test]
    fn slices_of_other_services_and_namespaces_are_ignored() {
        let endpoints = [
            slice("default", "web-1", "web")
                .port("http", 80, "TCP")
                .ready("10.0.0.1"),
            slice("default", "api-1", "api")
                .port("http", 80, "TCP")
                .ready("10.0.0.2"),
            slice("shop", "web-1", "web")
                .port("http", 80, "TCP")
                .ready("10.0.0.3"),
        ];
        assert_eq!(
            clean(&[web()], &endpoints),
            ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
        );
    }

    #[test]
    fn slice_ports_match_by_service_port_name_and_protocol() {
        let service = svc("default", "web")
            .cluster_ip("10.96.0.10")
            .port("", 80, "")
            .port("metrics", 9100, "TCP");
        let endpoints = slice("default", "web-1", "web")
            // absent name and protocol mean "" and TCP: the unnamed service port
            .port("", 8080, "")
            .port("metrics", 9100, "UDP")
            .port("admin", 9100, "TCP")
            .ready("10.0.0.1");
        assert_eq!(
            clean(&[service], &[endpoints]),
            [
                "10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP",
                "10.96.0.10:9100/TCP -> (none)",
            ]
        );
    }

    #[test]
    fn absent_conditions_mean_ready_and_absent_serving_means_serving() {
        let none = discovery::EndpointConditions::default();
        let terminating_serving_unknown = discovery::EndpointConditions {
            ready: Some(false),
            serving: None,
            terminating: Some(true),
        };
        let cases = [
            (
                "no conditions: ready",
                none,
                "10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
            ),
            (
                "terminating, serving absent: serving, used as fallback",
                terminating_serving_unknown,
                "10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
            ),
        ];
        for (case, conditions, want) in cases {
            let endpoints = slice("default", "web-1", "web")
                .port("http", 80, "TCP")
                .endpoint(&["10.0.0.1"], conditions);
            assert_eq!(clean(&[web()], &[endpoints]), [want], "{case}");
        }
    }

    #[test]
    fn only_the_first_address_of_an_endpoint_is_used() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .endpoint(&["10.0.0.1", "10.0.0.2"], conditions(true, true, false));
        assert_eq!(
            clean(&[web()], &[endpoints]),
            ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
        );
    }

    #[test]
    fn slices_of_another_proxy_or_of_headless_services_are_ignored() {
        let endpoints = [
            slice("default", "web-1", "web")
                .port("http", 80, "TCP")
                .ready("10.0.0.1"),
            slice("default", "web-2", "web")
                .label(LABEL_SERVICE_PROXY_NAME, "other")
                .port("http", 80, "TCP")
                .ready("10.0.0.2"),
            slice("default", "web-3", "web")
                .label(LABEL_HEADLESS, "")
                .port("http", 80, "TCP")
                .ready("10.0.0.3"),
        ];
        assert_eq!(
            clean(&[web()], &endpoints),
            ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
        );
    }

    // ---- address families ------------------------------------------------------------------

    #[test]
    fn ipv6_cluster_ip_and_ipv6_slices_are_ignored() {
        let v6_only = svc("default", "web")
            .cluster_ip("fd00:10:96::10")
            .port("http", 80, "TCP");
        let endpoints = [
            slice("default", "web-v6", "web")
                .address_type("IPv6")
                .port("http", 80, "TCP")
                .ready("fd00::1"),
            slice("default", "web-fqdn", "web")
                .address_type("FQDN")
                .port("http", 80, "TCP")
                .ready("web.example.com"),
        ];
        assert_eq!(clean(&[v6_only], &endpoints), Vec::<String>::new());
        assert_eq!(clean(&[web()], &endpoints), ["10.96.0.10:80/TCP -> (none)"]);
    }

    #[test]
    fn dual_stack_serves_the_ipv4_cluster_ip_with_ipv4_endpoints() {
        let endpoints = [
            slice("default", "web-v4", "web")
                .port("http", 80, "TCP")
                .ready("10.0.0.1"),
            slice("default", "web-v6", "web")
                .address_type("IPv6")
                .port("http", 80, "TCP")
                .ready("fd00::1"),
        ];
        for order in [
            ["fd00:10:96::10", "10.96.0.10"],
            ["10.96.0.10", "fd00:10:96::10"],
        ] {
            let service = svc("default", "web")
                .cluster_ip(order[0])
                .cluster_ips(&order)
                .port("http", 80, "TCP");
            assert_eq!(
                clean(&[service], &endpoints),
                ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"],
                "{order:?}"
            );
        }
    }

    #[test]
    fn sloppy_addresses_with_leading_zeros_are_read_as_decimal() {
        let service = svc("default", "web")
            .cluster_ip("172.30.0.041")
            .port("http", 80, "TCP");
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.010");
        assert_eq!(
            clean(&[service], &[endpoints]),
            ["172.30.0.41:80/TCP -> 10.0.0.10:80/TCP"]
        );
    }

    #[test]
    fn parse_ip_sloppy_reads_addresses_like_kubernetes() {
        let v4 = |a, b, c, d| Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
        let cases = [
            ("10.96.0.10", v4(10, 96, 0, 10)),
            ("172.30.0.041", v4(172, 30, 0, 41)),
            ("0010.0.0.0255", v4(10, 0, 0, 255)),
            ("::ffff:10.0.0.1", v4(10, 0, 0, 1)),
            ("fd00::1", "fd00::1".parse().ok()),
            ("256.0.0.1", None),
            ("10.0.0", None),
            ("10.0.0.1.2", None),
            ("10..0.1", None),
            ("10.0.0.1 ", None),
            ("+10.0.0.1", None),
            ("10.0.0.0x1", None),
            ("", None),
            ("None", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_ip_sloppy(text), want, "{text:?}");
        }
    }

    // ---- bad input: reported by name, the rest still translates -----------------------------

    #[test]
    fn invalid_cluster_ip_is_skipped_and_named() {
        let services = [
            svc("default", "broken")
                .cluster_ip("10.96.0.300")
                .port("http", 80, "TCP"),
            web(),
        ];
        let t = translate(&services, &[], NODE);
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> (none)"]);
        assert_eq!(
            skipped(&t),
            [r#"Service default/broken: invalid clusterIP "10.96.0.300""#]
        );
    }

    #[test]
    fn invalid_cluster_ip_beside_a_valid_one_only_loses_that_address() {
        let service = svc("default", "web")
            .cluster_ip("10.96.0.10")
            .cluster_ips(&["10.96.0.10", "fd00::zz"])
            .port("http", 80, "TCP");
        let t = translate(&[service], &[], NODE);
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> (none)"]);
        assert_eq!(
            skipped(&t),
            [r#"Service default/web: invalid clusterIP "fd00::zz""#]
        );
    }

    #[test]
    fn a_second_ipv4_cluster_ip_is_reported_not_served() {
        let service = svc("default", "web")
            .cluster_ip("10.96.0.10")
            .cluster_ips(&["10.96.0.10", "10.96.0.11"])
            .port("http", 80, "TCP");
        let t = translate(&[service], &[], NODE);
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> (none)"]);
        assert_eq!(
            skipped(&t),
            [
                r#"Service default/web: second IPv4 clusterIP "10.96.0.11" ignored: a Service has one per family"#
            ]
        );
    }

    #[test]
    fn out_of_range_service_ports_are_skipped_one_by_one() {
        let service = svc("default", "web")
            .cluster_ip("10.96.0.10")
            .port("zero", 0, "TCP")
            .port("", 70000, "TCP")
            .port("http", 80, "TCP");
        let t = translate(&[service], &[], NODE);
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> (none)"]);
        assert_eq!(
            skipped(&t),
            [
                "Service default/web port 70000: port 70000 is out of range 1-65535",
                "Service default/web port zero: port 0 is out of range 1-65535",
            ]
        );
    }

    #[test]
    fn sctp_and_unknown_protocols_are_skipped_port_by_port() {
        let service = svc("default", "web")
            .cluster_ip("10.96.0.10")
            .port("sctp", 9000, "SCTP")
            .port("", 9001, "tcp")
            .port("http", 80, "TCP");
        let endpoints = slice("default", "web-1", "web")
            .port("sctp", 9000, "SCTP")
            .port("http", 80, "TCP")
            .ready("10.0.0.1");
        let t = translate(&[service], &[endpoints], NODE);
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
        assert_eq!(
            skipped(&t),
            [
                r#"Service default/web port 9001: protocol "tcp" is not supported (only TCP and UDP)"#,
                r#"Service default/web port sctp: protocol "SCTP" is not supported (only TCP and UDP)"#,
            ]
        );
    }

    #[test]
    fn bad_endpoint_address_is_skipped_and_the_others_still_serve() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1")
            .ready("10.0.0.999")
            .ready("fd00::2")
            .endpoint(&[], conditions(true, true, false));
        let t = translate(&[web()], &[endpoints], NODE);
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
        assert_eq!(
            skipped(&t),
            [
                "EndpointSlice default/web-1: an endpoint has no address",
                r#"EndpointSlice default/web-1: endpoint address "fd00::2" is not IPv4"#,
                r#"EndpointSlice default/web-1: invalid endpoint address "10.0.0.999""#,
            ]
        );
    }

    #[test]
    fn bad_slice_ports_are_skipped_and_the_others_still_serve() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .port("", 0, "TCP")
            .port("big", 70000, "TCP")
            .raw_port(discovery::EndpointPort {
                name: Some("admin".into()),
                ..discovery::EndpointPort::default()
            })
            .ready("10.0.0.1");
        let t = translate(&[web()], &[endpoints], NODE);
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
        assert_eq!(
            skipped(&t),
            [
                r#"EndpointSlice default/web-1: port "admin" has no port number"#,
                r#"EndpointSlice default/web-1: port "big": 70000 is out of range 1-65535"#,
                "EndpointSlice default/web-1: unnamed port: 0 is out of range 1-65535",
            ]
        );
    }

    #[test]
    fn each_problem_is_reported_once() {
        // The same manifest loaded twice, and one bad endpoint behind two service ports.
        let broken = svc("default", "broken")
            .cluster_ip("10.96.0.300")
            .port("http", 80, "TCP");
        let service = web().port("admin", 81, "TCP");
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .port("admin", 81, "TCP")
            .ready("bogus")
            .ready("10.0.0.1");
        let t = translate(&[broken.clone(), service, broken], &[endpoints], NODE);
        assert_eq!(
            rows(&t),
            [
                "10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
                "10.96.0.10:81/TCP -> 10.0.0.1:81/TCP",
            ]
        );
        assert_eq!(
            skipped(&t),
            [
                r#"EndpointSlice default/web-1: invalid endpoint address "bogus""#,
                r#"Service default/broken: invalid clusterIP "10.96.0.300""#,
            ]
        );
    }

    #[test]
    fn slice_without_service_name_label_is_reported() {
        let mut orphan = slice("default", "orphan", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1");
        orphan.metadata.labels = None;
        let t = translate(&[web()], &[orphan], NODE);
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> (none)"]);
        assert_eq!(
            skipped(&t),
            ["EndpointSlice default/orphan: has no kubernetes.io/service-name label"]
        );
    }

    #[test]
    fn objects_without_a_name_are_reported() {
        let mut service = svc("default", "x")
            .cluster_ip("10.96.0.11")
            .port("http", 80, "TCP");
        service.metadata.name = None;
        let mut endpoints = slice("default", "x", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1");
        endpoints.metadata.name = Some(String::new());
        let t = translate(&[service, web()], &[endpoints], NODE);
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> (none)"]);
        assert_eq!(
            skipped(&t),
            [
                "EndpointSlice default/<unnamed>: metadata.name is missing",
                "Service default/<unnamed>: metadata.name is missing",
            ]
        );
    }

    #[test]
    fn two_services_on_one_frontend_keep_the_first_and_report_the_second() {
        let services = [
            svc("shop", "web")
                .cluster_ip("10.96.0.10")
                .port("http", 80, "TCP"),
            web(),
        ];
        let endpoints = [
            slice("default", "web-1", "web")
                .port("http", 80, "TCP")
                .ready("10.0.0.1"),
            slice("shop", "web-1", "web")
                .port("http", 80, "TCP")
                .ready("10.0.0.2"),
        ];
        let t = translate(&services, &endpoints, NODE);
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
        assert_eq!(
            skipped(&t),
            ["Service shop/web port http: 10.96.0.10:80/TCP is already served by default/web:http"]
        );
    }

    #[test]
    fn missing_namespace_means_default() {
        let mut service = web();
        service.metadata.namespace = None;
        let mut endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1");
        endpoints.metadata.namespace = None;
        let t = translate(&[service], &[endpoints], NODE);
        assert_eq!(rows(&t), ["10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
        let frontend = t
            .state
            .frontends
            .values()
            .next()
            .map(|f| f.service.to_string());
        assert_eq!(frontend.as_deref(), Some("default/web:http"));
    }

    #[test]
    fn node_port_and_load_balancer_services_get_their_cluster_ip_frontend() {
        for type_ in ["NodePort", "LoadBalancer", ""] {
            let service = web().type_(type_);
            assert_eq!(
                clean(&[service], &[]),
                ["10.96.0.10:80/TCP -> (none)"],
                "type {type_:?}"
            );
        }
    }
}
