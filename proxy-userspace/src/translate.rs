//! From Kubernetes objects to the desired frontends: kube-proxy's semantics as one pure function.
//!
//! This is the only module that knows what a Service *means*. It follows kube-proxy's
//! `pkg/proxy`: which Services and ports are proxied (`servicechangetracker.go`,
//! `serviceport.go`, `util.ShouldSkipService`), how EndpointSlices become endpoints per service
//! port (`endpointslicecache.go`), which endpoints are usable (`topology.go`,
//! `CategorizeEndpoints`), and which address gets which endpoint set (the iptables proxier's
//! `syncProxyRules`).
//!
//! Frontends (one per IPv4 address, port and protocol; scope = who asks, docs/decisions.md):
//! - the cluster IP: internal scope only, with the endpoints of `internalTrafficPolicy`;
//! - each externalIP, each LoadBalancer ingress IP (`ipMode` VIP or unset) and, for NodePort
//!   and LoadBalancer Services, the `nodePort` on each of [`NodeInfo::node_port_addresses`]:
//!   an external-scope frontend with the endpoints of `externalTrafficPolicy`, and an
//!   internal-scope one with the cluster endpoints. kube-proxy's "EXT" chain sends traffic
//!   from local pods and from the node itself to the cluster endpoints even under
//!   `externalTrafficPolicy: Local` (it "simulates going up-and-out to an external
//!   load-balancer and coming back in"), so pods reach every endpoint (C11);
//! - with [`NodeInfo::localhost_node_ports`], each `nodePort` on `127.0.0.1` too: internal
//!   scope only, with the cluster endpoints (the socket programs serve it for all of
//!   `127.0.0.0/8`, or 127.0.0.1 alone with `--nodeport-addresses` CIDRs, to the node's own
//!   network namespace alone).
//!
//! Bad input never aborts the translation: the offending object, port or endpoint is left out
//! and reported in [`Translation::skipped`] with the object's name, and everything else still
//! translates (BEHAVIOUR C34). Normal cases that kube-proxy ignores on purpose (headless and
//! ExternalName Services, another proxy's Services, IPv6 addresses, FQDN slices, `ipMode:
//! Proxy` and hostname-only load balancer ingress) are not reported as problems; the objects
//! this IPv4 proxy leaves out whole for their address family (single-stack IPv6 Services,
//! IPv6 and FQDN slices) are listed in [`Translation::ignored`], for a debug-level note, never
//! an error: kube-proxy's IPv4 proxier leaves them out without one.
//!
//! Decisions where kube-proxy is silent or can't be followed literally:
//! - `metadata.namespace` absent means `default`: manifests for the standalone source often
//!   omit it, and `kubectl apply` would put them there.
//! - The cluster IPs are `spec.clusterIPs` if set, else `spec.clusterIP` (hand-written
//!   manifests may carry either); the first IPv4 one is served, since a Service has one cluster
//!   IP per family. A Service is headless when its primary cluster IP is `None` or empty.
//! - An address listed twice for a service port (in one slice or in several) is one endpoint:
//!   a copy that is not terminating wins over one that is, as in kube-proxy; between copies
//!   alike in that, where kube-proxy's choice is undefined, the more usable one (see
//!   `one_copy_each`).
//! - Two Services with the same namespace and name (only possible in manifests, e.g. one
//!   without `namespace` and one in `default`) are taken in the order of their content, so
//!   that the result never depends on the order of the input.
//! - A frontend holds at most 65535 backends (slots `1..=count`, a 16-bit count): beyond that
//!   the first 65535 in address order are served and the service port is reported. The API
//!   limits a slice to 1000 endpoints, not a Service; a slice over that limit is served whole,
//!   like kube-proxy takes what it is given (the map sizes are `capacity`'s business).
//! - Two Services claiming the same frontend (only possible in manifests, the API server
//!   refuses it): the first in (namespace, name) order keeps it, the other is reported. One
//!   service port claiming a frontend twice (an externalIP listed twice, or also being the
//!   LB IP) keeps the first claim silently, in kube-proxy's rule order: cluster IP,
//!   externalIPs, LB IPs, NodePorts.
//! - Enum fields the API server would have refused (`type`, the traffic policies,
//!   `sessionAffinity`, its timeout) skip the whole Service with the reason, rather than
//!   guessing: kube-proxy never sees such values and would silently read them as the default.
//!   Likewise an `addressType` other than IPv4, IPv6 or FQDN skips its slice with the reason.
//! - A `nodePort` on a Service of type ClusterIP is ignored (the API server clears it when the
//!   type changes; kube-proxy would serve it). LoadBalancer ingress IPs are served whatever the
//!   type, as kube-proxy does (the API server clears the status when the type changes).
//! - The local-traffic detector is assumed configured (kube-proxy's default with a cluster
//!   CIDR): the socket programs see every local pod, so all pod traffic is "internal".

use std::cmp::Ordering;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{
    BackendAddr, DesiredState, Frontend, FrontendKey, FrontendKind, NodeInfo, Protocol, Scope,
    ServicePortName, Skipped, WhenEmpty,
};

/// A frontend's backends sit in slots `1..=count` and `count` is 16 bits (proxy-common's
/// service value), so this is the most one frontend can hold.
const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;
/// Objects with this label belong to another service proxy (kube-proxy's informers filter them).
const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on slices of headless Services; filtered like the above.
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Names the Service an EndpointSlice belongs to.
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The Node label topology hints (`hints.forZones`) are matched against.
const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
const DEFAULT_NAMESPACE: &str = "default";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when absent and its upper bound
/// (the API's `DefaultClientIPServiceAffinitySeconds` / `MaxClientIPServiceAffinitySeconds`).
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
const MAX_AFFINITY_TIMEOUT: u32 = 86400;

/// Result of one translation: the desired state and the input that was left out.
#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    /// Sorted and de-duplicated, so that a caller can log and count each problem once.
    pub skipped: Vec<Skipped>,
    /// Objects left out whole on purpose because of their address family (single-stack IPv6
    /// Services, IPv6 and FQDN slices): not problems, worth a debug-level note. Sorted and
    /// de-duplicated like `skipped`.
    pub ignored: Vec<Skipped>,
}

/// kube-proxy's `--nodeport-addresses`, as it applies to IPv4: which of the node's
/// addresses serve NodePorts (and health-check NodePorts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The flag names no IPv4 CIDR (not given, or IPv6 CIDRs only): every address, as
    /// kube-proxy's IPv4 proxier does (its iptables-mode default).
    #[default]
    All,
    /// `primary` (kube-proxy's nftables-mode default): the node's primary IPv4 address only.
    Primary,
    /// The node's addresses within these IPv4 CIDRs.
    Within(Vec<(Ipv4Addr, u8)>),
}

impl NodePortAddresses {
    /// Whether NodePorts are served on loopback addresses, with kube-proxy's
    /// `--iptables-localhost-nodeports` (`localhost`): when every address serves them, or a
    /// CIDR holds `127.0.0.1` (kube-proxy's iptables mode; its nftables mode never does).
    pub fn serve_loopback(&self, localhost: bool) -> bool {
        localhost
            && match self {
                Self::All => true,
                Self::Primary => false,
                Self::Within(cidrs) => cidrs
                    .iter()
                    .any(|&(network, prefix)| cidr_contains(network, prefix, Ipv4Addr::LOCALHOST)),
            }
    }

    /// Whether every address of the node serves NodePorts: no IPv4 CIDR, or one of length 0.
    /// kube-proxy then matches any local destination, all of `127.0.0.0/8` too; otherwise
    /// only the addresses its devices have within the CIDRs (on `lo`, `127.0.0.1`).
    pub fn match_all(&self) -> bool {
        match self {
            Self::All => true,
            Self::Primary => false,
            Self::Within(cidrs) => cidrs.iter().any(|&(_, prefix)| prefix == 0),
        }
    }

    /// From the flag's values: CIDRs of either family, or `primary` alone (kube-proxy's
    /// validation refuses it beside CIDRs). IPv6 CIDRs are valid and concern no IPv4 address.
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<Self, String> {
        let mut within = Vec::new();
        for value in values {
            let value = value.as_ref();
            if value == "primary" {
                if values.len() != 1 {
                    return Err("`primary` cannot be combined with CIDRs".into());
                }
                return Ok(Self::Primary);
            }
            let (addr, prefix) = value
                .split_once('/')
                .ok_or_else(|| format!("{value:?} is not a CIDR such as 10.0.0.0/8"))?;
            let prefix: u8 = prefix.parse().map_err(|e| format!("{value:?}: {e}"))?;
            match addr
                .parse::<IpAddr>()
                .map_err(|e| format!("{value:?}: {e}"))?
            {
                IpAddr::V4(_) if prefix > 32 => {
                    return Err(format!("{value:?}: prefix length above 32"));
                }
                IpAddr::V4(addr) => within.push((addr, prefix)),
                IpAddr::V6(_) if prefix > 128 => {
                    return Err(format!("{value:?}: prefix length above 128"));
                }
                IpAddr::V6(_) => {}
            }
        }
        Ok(if within.is_empty() {
            Self::All
        } else {
            Self::Within(within)
        })
    }
}

/// What translate needs from this node's Node object (`None` when it is not known yet: no
/// zone, so no zone hints, and NodePorts on the devices' addresses only).
///
/// The NodePort addresses are those `--nodeport-addresses` admits among the host's IPv4
/// addresses and the Node's `InternalIP` and `ExternalIP` ones: all, those within its
/// CIDRs, or the primary one (kube-proxy's `GetNodeHostIPs`: the Node's first `InternalIP`
/// of the family, else its first `ExternalIP`). kube-proxy matches the host's interface addresses
/// (`--dst-type LOCAL` without CIDRs, the devices' addresses within them), so
/// `host_addresses` (the devices' IPv4 addresses, loopback ones aside: read by the caller,
/// so that translate stays pure) count as much as the Node's; the Node's count even where
/// no device carries them (a cloud's ExternalIP, translated on its way in). The primary
/// address follows the Node's changes (kube-proxy takes it once, at start). Addresses that
/// are not parsable IPv4 ones are left out. Sorted and de-duplicated.
pub fn node_info(
    name: &str,
    node: Option<&Node>,
    node_ports: &NodePortAddresses,
    host_addresses: &[Ipv4Addr],
) -> NodeInfo {
    let within = |addr: &Ipv4Addr| match node_ports {
        NodePortAddresses::All => true,
        NodePortAddresses::Primary => false,
        NodePortAddresses::Within(cidrs) => cidrs
            .iter()
            .any(|&(network, prefix)| cidr_contains(network, prefix, *addr)),
    };
    let on_devices = host_addresses.iter().copied().filter(within);
    let Some(node) = node else {
        return NodeInfo {
            name: name.to_owned(),
            node_port_addresses: on_devices.collect::<BTreeSet<_>>().into_iter().collect(),
            ..NodeInfo::default()
        };
    };
    let of_type = |wanted: &'static str| {
        node.status
            .iter()
            .flat_map(|status| status.addresses.iter().flatten())
            .filter(move |a| a.type_ == wanted)
            .filter_map(|a| match parse_ip_sloppy(&a.address) {
                Some(IpAddr::V4(addr)) => Some(addr),
                _ => None,
            })
    };
    let all = of_type("InternalIP").chain(of_type("ExternalIP"));
    let mut own: Vec<Ipv4Addr> = Vec::new();
    for addr in all.clone() {
        if !own.contains(&addr) {
            own.push(addr);
        }
    }
    let addresses: BTreeSet<Ipv4Addr> = match node_ports {
        NodePortAddresses::Primary => all.take(1).collect(),
        _ => all.filter(within).chain(on_devices).collect(),
    };
    NodeInfo {
        name: name.to_owned(),
        zone: label(&node.metadata, LABEL_TOPOLOGY_ZONE).map(str::to_owned),
        node_port_addresses: addresses.into_iter().collect(),
        own_addresses: own,
        ..NodeInfo::default()
    }
}

/// Whether `addr` is in `network/prefix` (host bits of `network` ignored, like Go's
/// `ParseCIDR`). A prefix above 32 is no IPv4 CIDR and contains nothing.
fn cidr_contains(network: Ipv4Addr, prefix: u8, addr: Ipv4Addr) -> bool {
    if prefix > 32 {
        return false;
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    (u32::from(network) ^ u32::from(addr)) & mask == 0
}

/// Translates Services and EndpointSlices into the desired frontends of this node.
pub fn translate(services: &[Service], slices: &[EndpointSlice], node: &NodeInfo) -> Translation {
    let mut skipped = Vec::new();
    let mut ignored = Vec::new();
    let endpoints = index_endpoints(slices, node, &mut skipped, &mut ignored);

    // Fixed order, so that a conflict between two Services always resolves the same way,
    // whatever order they came in (two with the same name: by content).
    let mut ordered: Vec<&Service> = services.iter().collect();
    ordered.sort_by(|a, b| {
        compare_names(&a.metadata, &b.metadata).then_with(|| compare_content(a, b))
    });

    let mut state = DesiredState::default();
    let mut node_ports = Vec::new();
    for service in ordered {
        add_service(
            service,
            &endpoints,
            node,
            &mut state,
            &mut node_ports,
            &mut skipped,
            &mut ignored,
        );
    }
    claim_node_ports(&mut state, node_ports, &mut skipped);

    state.local_backends = local_backends(&state, &endpoints);

    skipped.sort();
    skipped.dedup();
    ignored.sort();
    ignored.dedup();
    Translation {
        state,
        skipped,
        ignored,
    }
}

/// The backends in use (lingering ones included) whose endpoint is served on this node
/// (`Endpoint::on_node`): the north-south programs keep the client's address for these and
/// source-NAT traffic to the others (C08, C10).
fn local_backends(state: &DesiredState, endpoints: &EndpointIndex) -> BTreeSet<BackendAddr> {
    let in_use: BTreeSet<BackendAddr> = state
        .frontends
        .values()
        .flat_map(|f| f.slotted().copied())
        .collect();
    served_here(endpoints)
        .into_iter()
        .filter(|b| in_use.contains(b))
        .collect()
}

/// The endpoints served on this node, as backends. Of an address listed twice for a service
/// port, the copy that port keeps (`one_copy_each`) says where it is, as for the frontends.
fn served_here(endpoints: &EndpointIndex) -> BTreeSet<BackendAddr> {
    endpoints
        .values()
        .flat_map(|list| {
            let ports: BTreeSet<(&str, Protocol)> = list
                .iter()
                .map(|e| (e.port_name.as_str(), e.proto))
                .collect();
            ports.into_iter().flat_map(move |(name, proto)| {
                let copies = list
                    .iter()
                    .filter(move |e| e.port_name == name && e.proto == proto)
                    .map(|e| e.endpoint);
                one_copy_each(copies).into_iter().map(move |e| (e, proto))
            })
        })
        .filter(|(e, _)| e.on_node)
        .map(|(e, proto)| BackendAddr {
            addr: e.addr,
            port: e.port,
            proto,
        })
        .collect()
}

/// An endpoint address on a concrete port, with what kube-proxy reads of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Endpoint {
    addr: Ipv4Addr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// `nodeName` is this node: a candidate for traffic policy `Local`.
    local: bool,
    /// Served on this node: `local`, or at one of the node's own addresses without saying
    /// so (the API server's endpoints, a hand-written slice's). Traffic to it must not be
    /// source-NATed to the node's address: the stack drops a packet that arrives from one
    /// of its own addresses.
    on_node: bool,
    /// `hints.forZones` seen from this node's zone.
    zone_hint: Hint,
    /// `hints.forNodes` seen from this node.
    node_hint: Hint,
}

/// One kind of topology hint of an endpoint, seen from this node.
/// Ordered only so that copies of an endpoint are chosen from the same way every time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Hint {
    /// The endpoint carries no hint of this kind.
    Absent,
    /// Hinted, but for other zones (nodes) only.
    Elsewhere,
    /// Hinted for this node's zone (this node).
    Here,
}

impl Hint {
    /// Like kube-proxy's `Has` on the hint set: any listed name counts as "hinted".
    fn read<'a>(names: impl Iterator<Item = &'a str>, ours: &str) -> Self {
        let mut hint = Hint::Absent;
        for name in names {
            if name == ours {
                return Hint::Here;
            }
            hint = Hint::Elsewhere;
        }
        hint
    }
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
/// by the Service named in its `kubernetes.io/service-name` label. A slice whose Service does
/// not exist is indexed all the same and simply never looked up, as in kube-proxy: it is
/// served as soon as its Service appears.
fn index_endpoints<S: std::borrow::Borrow<EndpointSlice>>(
    slices: &[S],
    node: &NodeInfo,
    skipped: &mut Vec<Skipped>,
    ignored: &mut Vec<Skipped>,
) -> EndpointIndex {
    let mut index = EndpointIndex::new();
    for slice in slices {
        let slice: &EndpointSlice = slice.borrow();
        if !is_for_this_proxy(&slice.metadata) {
            continue;
        }
        let namespace = namespace(&slice.metadata);
        let object = format!(
            "EndpointSlice {namespace}/{}",
            name(&slice.metadata).unwrap_or("<unnamed>")
        );
        // IPv6 slices belong to the IPv6 side of a dual-stack Service; FQDN slices are not
        // proxied by kube-proxy at all. Other values the API server refuses.
        match slice.address_type.as_str() {
            "IPv4" => {}
            family @ ("IPv6" | "FQDN") => {
                let reason = format!("addressType {family}: this proxy serves IPv4 only");
                ignored.push(skip(&object, reason));
                continue;
            }
            other => {
                let reason = format!("addressType {other:?} is not supported (IPv4, IPv6 or FQDN)");
                skipped.push(skip(&object, reason));
                continue;
            }
        }
        if name(&slice.metadata).is_none() {
            skipped.push(missing_name("EndpointSlice", namespace));
            continue;
        }
        let Some(service) = label(&slice.metadata, LABEL_SERVICE_NAME) else {
            skipped.push(skip(&object, format!("has no {LABEL_SERVICE_NAME} label")));
            continue;
        };

        let ports = slice_ports(slice, &object, skipped);
        let endpoints = slice_endpoints(slice, node, &object, skipped);
        let entry = index
            .entry((namespace.to_owned(), service.to_owned()))
            .or_default();
        for (port_name, proto, port) in &ports {
            entry.extend(endpoints.iter().map(|&endpoint| PortEndpoint {
                port_name: port_name.clone(),
                proto: *proto,
                endpoint: Endpoint {
                    port: *port,
                    ..endpoint
                },
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

/// The usable endpoints of a slice, port still 0. Like kube-proxy, only an endpoint's first
/// address is used (the API allows exactly one for IPv4 slices), absent `ready` and `serving`
/// mean true and absent `terminating` means false, as the API documents. `ready` is taken as
/// published: for a Service with `publishNotReadyAddresses` the EndpointSlice controller
/// already publishes every endpoint as ready, and kube-proxy does nothing more (C28).
fn slice_endpoints(
    slice: &EndpointSlice,
    node: &NodeInfo,
    object: &str,
    skipped: &mut Vec<Skipped>,
) -> Vec<Endpoint> {
    // A missing zone label compares like Go's missing map entry: as "".
    let zone = node.zone.as_deref().unwrap_or_default();
    let mut endpoints = Vec::new();
    for endpoint in slice.endpoints.iter().flatten() {
        let Some(address) = endpoint.addresses.first() else {
            skipped.push(skip(object, "an endpoint has no address".to_owned()));
            continue;
        };
        let addr = match parse_ip_sloppy(address) {
            Some(IpAddr::V4(addr)) => match special_address(addr) {
                None => addr,
                Some(range) => {
                    let reason = format!("endpoint address {address:?} may not be {range}");
                    skipped.push(skip(object, reason));
                    continue;
                }
            },
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
        let hints = endpoint.hints.as_ref();
        let local = endpoint.node_name.as_deref() == Some(node.name.as_str());
        endpoints.push(Endpoint {
            addr,
            port: 0,
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            local,
            on_node: local || node.own_addresses.contains(&addr),
            zone_hint: Hint::read(
                hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.as_str()),
                zone,
            ),
            node_hint: Hint::read(
                hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.as_str()),
                &node.name,
            ),
        });
    }
    endpoints
}

/// The Service type, as far as frontends are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// The Service-wide settings that shape every port's frontends (kube-proxy's
/// `newBaseServiceInfo`).
#[derive(Clone, Copy, Debug)]
struct Policy {
    type_: ServiceType,
    /// `internalTrafficPolicy: Local`: the cluster IP reaches local endpoints only.
    internal_local: bool,
    /// `externalTrafficPolicy: Local` on an externally reachable Service (kube-proxy's
    /// `apiservice.ExternalPolicyLocal`): traffic from outside reaches local endpoints only.
    external_local: bool,
    /// `allocateLoadBalancerNodePorts` (default true): a LoadBalancer without NodePorts is
    /// normal when false.
    allocates_node_ports: bool,
    affinity_timeout: Option<u32>,
}

impl Policy {
    /// Reads the Service-wide settings, or every reason the Service can't be served.
    fn read(spec: &ServiceSpec) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let type_ = match spec.type_.as_deref() {
            None | Some("" | "ClusterIP") => ServiceType::ClusterIp,
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some(other) => {
                problems.push(format!(
                    "type {other:?} is not supported (ClusterIP, NodePort, LoadBalancer or ExternalName)"
                ));
                ServiceType::ClusterIp
            }
        };
        let internal_local = read_traffic_policy(
            "internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
            &mut problems,
        );
        let external_local = read_traffic_policy(
            "externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
            &mut problems,
        );
        // kube-proxy's apiservice.ExternallyAccessible: the policy only applies where there
        // is external traffic at all.
        let externally_accessible = match type_ {
            ServiceType::NodePort | ServiceType::LoadBalancer => true,
            ServiceType::ClusterIp => spec
                .external_ips
                .as_ref()
                .is_some_and(|ips| !ips.is_empty()),
        };
        let affinity_timeout = match read_affinity(spec) {
            Ok(timeout) => timeout,
            Err(problem) => {
                problems.push(problem);
                None
            }
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Policy {
            type_,
            internal_local,
            external_local: external_local && externally_accessible,
            allocates_node_ports: spec.allocate_load_balancer_node_ports.unwrap_or(true),
            affinity_timeout,
        })
    }

    /// The port's `nodePort` when its Service has NodePorts: `Ok(None)` when it has none on
    /// purpose, `Err` when one is missing or out of range.
    fn node_port(&self, port: &ServicePort) -> Result<Option<u16>, String> {
        if self.type_ == ServiceType::ClusterIp {
            return Ok(None);
        }
        match port.node_port {
            // 0 is Go's "not allocated".
            None | Some(0) => {
                if self.type_ == ServiceType::LoadBalancer && !self.allocates_node_ports {
                    Ok(None)
                } else {
                    Err("nodePort is missing".to_owned())
                }
            }
            Some(number) => port_number(number)
                .map(Some)
                .map_err(|reason| format!("nodePort {reason}")),
        }
    }
}

/// `true` for `Local`; absent or empty is the API default `Cluster`.
fn read_traffic_policy(field: &str, value: Option<&str>, problems: &mut Vec<String>) -> bool {
    match value {
        None | Some("" | "Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            problems.push(format!(
                "{field} {other:?} is not supported (Cluster or Local)"
            ));
            false
        }
    }
}

/// The ClientIP affinity timeout, defaulted like the API server does (10800 s).
fn read_affinity(spec: &ServiceSpec) -> Result<Option<u32>, String> {
    match spec.session_affinity.as_deref() {
        None | Some("" | "None") => Ok(None),
        Some("ClientIP") => {
            let seconds = spec
                .session_affinity_config
                .as_ref()
                .and_then(|config| config.client_ip.as_ref())
                .and_then(|client_ip| client_ip.timeout_seconds);
            match seconds {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT)),
                Some(seconds) => u32::try_from(seconds)
                    .ok()
                    .filter(|s| (1..=MAX_AFFINITY_TIMEOUT).contains(s))
                    .map(Some)
                    .ok_or_else(|| {
                        format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is out of range 1-{MAX_AFFINITY_TIMEOUT}"
                        )
                    }),
            }
        }
        Some(other) => Err(format!(
            "sessionAffinity {other:?} is not supported (None or ClientIP)"
        )),
    }
}

/// Adds the frontends of every service port of one Service.
fn add_service(
    service: &Service,
    index: &EndpointIndex,
    node: &NodeInfo,
    state: &mut DesiredState,
    node_ports: &mut Vec<(Frontend, String)>,
    skipped: &mut Vec<Skipped>,
    ignored: &mut Vec<Skipped>,
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
    let policy = match Policy::read(spec) {
        Ok(policy) => policy,
        Err(problems) => {
            skipped.extend(problems.into_iter().map(|reason| skip(&object, reason)));
            return;
        }
    };
    let Some(cluster_ip) = cluster_ipv4(spec, &object, skipped) else {
        // kube-proxy's IPv4 proxier finds no cluster IP of its family and says nothing.
        let listed = listed_cluster_ips(spec);
        if listed
            .iter()
            .any(|ip| matches!(parse_ip_sloppy(ip), Some(IpAddr::V6(_))))
        {
            let reason = format!("IPv6 only (clusterIPs {listed:?}): this proxy serves IPv4 only");
            ignored.push(skip(&object, reason));
        }
        return;
    };
    let external_ips = external_ipv4s(spec, &object, skipped);
    let load_balancer_ips = load_balancer_ipv4s(service, &object, skipped);
    let lb_source_ranges = source_ranges::of(spec, &object, skipped);
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
        let node_port = policy.node_port(port).unwrap_or_else(|reason| {
            skipped.push(skip(&port_object, reason));
            None
        });
        let service = ServicePortName {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port: port.name.clone().unwrap_or_default(),
        };
        let mut views = Views::of(endpoints, &service.port, proto);
        views.cluster.limit(&port_object, skipped);
        views.local.limit(&port_object, skipped);
        let internal = if policy.internal_local {
            &views.local
        } else {
            &views.cluster
        };
        let external = if policy.external_local {
            &views.local
        } else {
            &views.cluster
        };
        let frontend = |addr, port, scope, kind, backends: &Backends| Frontend {
            key: FrontendKey {
                addr,
                port,
                proto,
                scope,
            },
            kind,
            service: service.clone(),
            backends: backends.list.clone(),
            lingering: match scope {
                Scope::Internal => views.lingering(&backends.list),
                Scope::External => Vec::new(),
            },
            when_empty: backends.when_empty,
            affinity_timeout: policy.affinity_timeout,
            affinity_group: policy.affinity_timeout.map(|_| FrontendKey {
                addr: cluster_ip,
                port: number,
                proto,
                scope: Scope::Internal,
            }),
            source_ranges: Vec::new(),
            at_node_address: node.own_addresses.contains(&addr),
        };

        let cluster_ip_frontend = frontend(
            cluster_ip,
            number,
            Scope::Internal,
            FrontendKind::ClusterIp,
            internal,
        );
        insert_frontend(state, cluster_ip_frontend, &port_object, skipped);
        // A packet from outside the node to the ClusterIP (a Service range routed to the
        // nodes): kube-proxy sends it to the same endpoints as the node's own traffic (its
        // internal traffic policy), from any source.
        if node.external_cluster_ips {
            let from_outside = frontend(
                cluster_ip,
                number,
                Scope::External,
                FrontendKind::ClusterIp,
                internal,
            );
            insert_frontend(state, from_outside, &port_object, skipped);
        }

        // kube-proxy's rule order: externalIPs, LB IPs, then NodePorts.
        let external_addresses = external_ips
            .iter()
            .map(|&addr| (addr, number, FrontendKind::ExternalIp))
            .chain(
                load_balancer_ips
                    .iter()
                    .map(|&addr| (addr, number, FrontendKind::LoadBalancer)),
            )
            .chain(node_port.into_iter().flat_map(|node_port| {
                node.node_port_addresses
                    .iter()
                    .map(move |&addr| (addr, node_port, FrontendKind::NodePort))
            }));
        for (addr, port, kind) in external_addresses {
            let mut from_outside = frontend(addr, port, Scope::External, kind, external);
            if kind == FrontendKind::LoadBalancer {
                from_outside.source_ranges = lb_source_ranges.clone();
            }
            // A packet from outside to a loopback address (a LoadBalancer ingress IP of
            // 127.0.0.0/8, which the API server lets through) is a martian the node drops;
            // translated, it would reach the Service from any neighbour (CVE-2020-8558's
            // kind). The node's own processes still reach it.
            if !addr.is_loopback() {
                claim(state, node_ports, from_outside, &port_object, skipped);
            }
            // Pods and the node itself: kube-proxy's EXT chain short-circuits them to the
            // cluster endpoints whatever the policies (C11). An externalIP they are not
            // served (`safety`) claims no key either.
            if kind == FrontendKind::ExternalIp && !node.socket_external_ips.serves(addr) {
                continue;
            }
            let from_inside = frontend(addr, port, Scope::Internal, kind, &views.cluster);
            claim(state, node_ports, from_inside, &port_object, skipped);
        }
        // The node's own processes reaching a NodePort on a loopback address: kube-proxy
        // sends them to the cluster endpoints like the rest of the node's traffic (C11).
        // Internal scope only: no packet from outside carries a loopback address.
        if let Some(node_port) = node_port.filter(|_| node.localhost_node_ports) {
            let from_node = frontend(
                Ipv4Addr::LOCALHOST,
                node_port,
                Scope::Internal,
                FrontendKind::NodePort,
                &views.cluster,
            );
            claim(state, node_ports, from_node, &port_object, skipped);
        }
    }
}

/// [`insert_frontend`], except that a NodePort's frontend waits in `node_ports` until every
/// Service's addresses have claimed theirs ([`claim_node_ports`]): a Service address
/// (ClusterIP, externalIP, LB IP) beats a NodePort on a node address whatever the order, as
/// kube-proxy matches those before it looks at NodePorts (KUBE-NODEPORTS is the last rule
/// of KUBE-SERVICES; nftables's `service-ips` map comes before `service-nodeports`).
fn claim(
    state: &mut DesiredState,
    node_ports: &mut Vec<(Frontend, String)>,
    frontend: Frontend,
    object: &str,
    skipped: &mut Vec<Skipped>,
) {
    if frontend.kind == FrontendKind::NodePort {
        node_ports.push((frontend, object.to_owned()));
    } else {
        insert_frontend(state, frontend, object, skipped);
    }
}

/// The NodePort frontends [`claim`] kept back, claimed in the order they came.
fn claim_node_ports(
    state: &mut DesiredState,
    node_ports: Vec<(Frontend, String)>,
    skipped: &mut Vec<Skipped>,
) {
    for (frontend, object) in node_ports {
        insert_frontend(state, frontend, &object, skipped);
    }
}

/// Keeps the first claim on a frontend; a second one by another service port is reported
/// instead of overwriting it, a repeated one by the same service port is redundant.
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
        Entry::Occupied(taken) if taken.get().service == frontend.service => {}
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

/// The backends of one endpoint view and what to do while there are none.
#[derive(Clone, Debug)]
struct Backends {
    /// Sorted and de-duplicated.
    list: Vec<BackendAddr>,
    when_empty: WhenEmpty,
}

impl Backends {
    /// Keeps the first [`MAX_BACKENDS_PER_FRONTEND`] backends (address order) and reports the
    /// service port when there are more: a count that does not fit in 16 bits must never
    /// wrap, nor fail the sync of every other Service.
    fn limit(&mut self, object: &str, skipped: &mut Vec<Skipped>) {
        if self.list.len() > MAX_BACKENDS_PER_FRONTEND {
            let reason = format!(
                "{} backends, more than a frontend holds ({MAX_BACKENDS_PER_FRONTEND}); \
                 serving the first {MAX_BACKENDS_PER_FRONTEND} in address order",
                self.list.len()
            );
            skipped.push(skip(object, reason));
            self.list.truncate(MAX_BACKENDS_PER_FRONTEND);
        }
    }
}

/// The two endpoint sets kube-proxy's `CategorizeEndpoints` computes for a service port.
struct Views {
    /// For traffic policy `Cluster`: topology applies. Empty only when the service port has
    /// no usable endpoint anywhere, which kube-proxy REJECTs.
    cluster: Backends,
    /// For traffic policy `Local`: this node's endpoints, no topology. Empty while the
    /// service port has usable endpoints elsewhere is a DROP; with none anywhere, a REJECT
    /// (the iptables proxier's `hasEndpoints` test comes first).
    local: Backends,
    /// The endpoints whose existing flows keep going to them, sorted: kube-proxy never
    /// deletes a TCP conntrack entry, and deletes a UDP one only once its endpoint is no
    /// longer serving while another of the service port is (a port without a serving
    /// endpoint keeps all its flows), whatever the topology, policies or terminating state
    /// say (`CleanStaleEntries`). The endpoint's removal from the slice ends both here.
    kept: Vec<BackendAddr>,
}

impl Views {
    /// The views of the endpoints on the slice ports with this service port's name and
    /// protocol.
    fn of(endpoints: &[PortEndpoint], port_name: &str, proto: Protocol) -> Self {
        let candidates = one_copy_each(
            endpoints
                .iter()
                .filter(|e| e.port_name == port_name && e.proto == proto)
                .map(|e| e.endpoint),
        );
        let usable_anywhere = candidates
            .iter()
            .any(|e| e.ready || (e.serving && e.terminating));
        let local = backend_list(local_endpoints(&candidates), proto);
        let local_when_empty = if usable_anywhere && local.is_empty() {
            WhenEmpty::Drop
        } else {
            WhenEmpty::Refuse
        };
        let serving_anywhere = candidates.iter().any(|e| e.serving);
        let kept = candidates
            .iter()
            .filter(|e| proto == Protocol::Tcp || e.serving || !serving_anywhere)
            .collect();
        Views {
            cluster: Backends {
                list: backend_list(cluster_endpoints(&candidates), proto),
                when_empty: WhenEmpty::Refuse,
            },
            local: Backends {
                list: local,
                when_empty: local_when_empty,
            },
            kept: backend_list(kept, proto),
        }
    }

    /// The kept endpoints a frontend balancing over `backends` does not choose from, as
    /// many as its slots have room for after them (65535 in all).
    ///
    /// Only internal-scope frontends (the socket programs') have them: the north-south
    /// programs follow a flow while its backend is in the backends map at all, where the
    /// cluster IP's frontend already keeps every kept endpoint (as a backend or lingering),
    /// so external ones would only repeat them, once per node of a `Local` policy's
    /// Service on every node.
    fn lingering(&self, backends: &[BackendAddr]) -> Vec<BackendAddr> {
        let room = MAX_BACKENDS_PER_FRONTEND.saturating_sub(backends.len());
        self.kept
            .iter()
            .filter(|b| backends.binary_search(b).is_err())
            .take(room)
            .copied()
            .collect()
    }
}

/// One copy of each address and port, as kube-proxy's `EndpointSliceCache` keeps one. An
/// address is listed twice while the EndpointSlice controller moves it from one slice to
/// another, or when the pod network has given a terminating pod's address to a new pod
/// before the old Pod object is gone. A copy that is not terminating wins over one that is
/// (the new pod, not the old one: kube-proxy since kubernetes#135593). Between copies alike
/// in that, kube-proxy's choice is undefined; here the more usable one wins, whatever the
/// order of the slices.
fn one_copy_each(endpoints: impl Iterator<Item = Endpoint>) -> Vec<Endpoint> {
    let preference = |e: &Endpoint| {
        (
            !e.terminating,
            e.ready,
            e.serving,
            e.local,
            e.on_node,
            e.zone_hint,
            e.node_hint,
        )
    };
    let mut chosen: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    for endpoint in endpoints {
        chosen
            .entry((endpoint.addr, endpoint.port))
            .and_modify(|kept| {
                if preference(&endpoint) > preference(kept) {
                    *kept = endpoint;
                }
            })
            .or_insert(endpoint);
    }
    chosen.into_values().collect()
}

fn backend_list(endpoints: Vec<&Endpoint>, proto: Protocol) -> Vec<BackendAddr> {
    let unique: BTreeSet<BackendAddr> = endpoints
        .into_iter()
        .map(|e| BackendAddr {
            addr: e.addr,
            port: e.port,
            proto,
        })
        .collect();
    unique.into_iter().collect()
}

/// kube-proxy's cluster endpoints: the ready endpoints the topology admits; if there are
/// none, the serving-terminating ones (topology ignored), so that connections keep working
/// while the last pods of a rollout drain (C17); never non-serving ones (C18).
fn cluster_endpoints(endpoints: &[Endpoint]) -> Vec<&Endpoint> {
    let topology = Topology::of(endpoints);
    let ready: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| e.ready && topology.admits(e))
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .filter(|e| e.serving && e.terminating)
        .collect()
}

/// kube-proxy's local endpoints: this node's ready endpoints; if there are none, this node's
/// serving-terminating ones, even while other nodes have ready ones. Hints don't apply.
fn local_endpoints(endpoints: &[Endpoint]) -> Vec<&Endpoint> {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.local && e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .filter(|e| e.local && e.serving && e.terminating)
        .collect()
}

/// Which ready endpoints the cluster view keeps (kube-proxy's `topologyModeFromHints` and
/// `availableForTopology`, 1.35, where the `PreferSameTrafficDistribution` gate is GA).
///
/// Only the hints count: kube-proxy reads neither `trafficDistribution` nor the
/// `topology-mode` annotation, which tell the EndpointSlice controller to write hints.
/// Looking at ready endpoints only:
/// 1. every one has a `forNodes` hint and at least one names this node: those named for it;
/// 2. else every one has a `forZones` hint and at least one names this node's zone (a node
///    without the zone label matches no zone): those hinted for it;
/// 3. else all of them.
///
/// Hints never restrict the local view, so `Local` traffic policies ignore them, and the
/// serving-terminating fallback ignores them too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    All,
    SameNode,
    SameZone,
}

impl Topology {
    fn of(endpoints: &[Endpoint]) -> Self {
        let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
        let decides = |hint: fn(&Endpoint) -> Hint| {
            !ready.is_empty()
                && ready.iter().all(|e| hint(e) != Hint::Absent)
                && ready.iter().any(|e| hint(e) == Hint::Here)
        };
        if decides(|e| e.node_hint) {
            Topology::SameNode
        } else if decides(|e| e.zone_hint) {
            Topology::SameZone
        } else {
            Topology::All
        }
    }

    fn admits(self, endpoint: &Endpoint) -> bool {
        match self {
            Topology::All => true,
            Topology::SameNode => endpoint.node_hint == Hint::Here,
            Topology::SameZone => endpoint.zone_hint == Hint::Here,
        }
    }
}

/// The Service's IPv4 cluster IP. Invalid addresses are reported; IPv6 ones belong to the
/// other family of a dual-stack Service and are ignored; kube-proxy serves one address per
/// family, so further IPv4 ones (refused by the API server) are reported.
fn cluster_ipv4(spec: &ServiceSpec, object: &str, skipped: &mut Vec<Skipped>) -> Option<Ipv4Addr> {
    let mut chosen: Option<Ipv4Addr> = None;
    for ip in listed_cluster_ips(spec) {
        match (parse_ip_sloppy(ip), chosen) {
            // The API server allocates from the Service CIDR; a manifest may say anything,
            // and a frontend at 0.0.0.0 would take every `connect(0.0.0.0)` (this host).
            (Some(IpAddr::V4(addr)), _) if addr.is_unspecified() => {
                skipped.push(skip(object, format!("clusterIP {ip:?} may not be 0.0.0.0")));
            }
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

/// `spec.clusterIPs` if set, else `spec.clusterIP`.
fn listed_cluster_ips(spec: &ServiceSpec) -> Vec<&str> {
    match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    }
}

/// The Service's IPv4 externalIPs (any type may have them). IPv6 ones belong to the other
/// family; invalid ones are reported and left out.
fn external_ipv4s(spec: &ServiceSpec, object: &str, skipped: &mut Vec<Skipped>) -> Vec<Ipv4Addr> {
    let mut addresses = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        match parse_ip_sloppy(ip) {
            Some(IpAddr::V4(addr)) => match special_address(addr) {
                None => addresses.push(addr),
                Some(range) => skipped.push(skip(
                    object,
                    format!("externalIP {ip:?} may not be {range}"),
                )),
            },
            Some(IpAddr::V6(_)) => {}
            None => skipped.push(skip(object, format!("invalid externalIP {ip:?}"))),
        }
    }
    addresses
}

/// The IPv4 LoadBalancer ingress IPs to intercept (kube-proxy's `IsVIPMode`): `ipMode` `VIP`
/// or unset. With `Proxy` the load balancer itself forwards to the nodes or pods, so its
/// address must stay the real one, e.g. for the PROXY protocol or TLS termination (C31).
/// Hostname-only entries (DNS-based load balancers) have nothing to intercept.
fn load_balancer_ipv4s(
    service: &Service,
    object: &str,
    skipped: &mut Vec<Skipped>,
) -> Vec<Ipv4Addr> {
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_ref());
    let mut addresses = Vec::new();
    for entry in ingress.into_iter().flatten() {
        let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        match entry.ip_mode.as_deref() {
            None | Some("VIP") => {}
            Some("Proxy") => continue,
            Some(other) => {
                let reason = format!(
                    "loadBalancer ingress {ip:?}: ipMode {other:?} is not supported (VIP or Proxy)"
                );
                skipped.push(skip(object, reason));
                continue;
            }
        }
        // (One on loopback is served to the node's processes, as kube-proxy's OUTPUT rules
        // do; one at 0.0.0.0 would take every `connect(0.0.0.0)`.)
        match parse_ip_sloppy(ip) {
            Some(IpAddr::V4(addr)) if addr.is_unspecified() => skipped.push(skip(
                object,
                format!("loadBalancer ingress IP {ip:?} may not be 0.0.0.0"),
            )),
            Some(IpAddr::V4(addr)) => addresses.push(addr),
            Some(IpAddr::V6(_)) => {}
            None => skipped.push(skip(
                object,
                format!("invalid loadBalancer ingress IP {ip:?}"),
            )),
        }
    }
    addresses
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

/// The range an address is in that the API server refuses for endpoints and externalIPs
/// (`ValidateNonSpecialIP`): unspecified, loopback, link-local, link-local multicast. The
/// manifests source has no API server to refuse them, and a backend at 0.0.0.0 or 127.0.0.1
/// would send Service traffic to the node itself (address 0 is also what marks an empty
/// entry of the backends array), an externalIP of 127.0.0.1 take the node's own local
/// connections to that port.
fn special_address(addr: Ipv4Addr) -> Option<&'static str> {
    if addr.is_unspecified() {
        Some("unspecified (0.0.0.0)")
    } else if addr.is_loopback() {
        Some("in the loopback range (127.0.0.0/8)")
    } else if addr.is_link_local() {
        Some("in the link-local range (169.254.0.0/16)")
    } else if addr.octets()[..3] == [224, 0, 0] {
        Some("in the link-local multicast range (224.0.0.0/24)")
    } else {
        None
    }
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

/// A total order on the content of two Services, for the rare tie of equal names. JSON with
/// sorted maps is a canonical form of a k8s-openapi object.
fn compare_content(a: &Service, b: &Service) -> Ordering {
    serde_json::to_string(a)
        .ok()
        .cmp(&serde_json::to_string(b).ok())
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

// Health-check node ports (C12, C13): the same objects, read for the health-check servers.
mod health;
pub use health::{HealthCheck, HealthChecks, health_checks};

pub mod incremental;
mod source_ranges;

// The bad-input table of BEHAVIOUR C34 and the property tests, beside the table tests.

#[cfg(test)]
mod bad_input;
#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safety::SocketExternalIps;
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::discovery::v1 as discovery;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use std::slice;

    /// The local node N1 of BEHAVIOUR.md: zone-a, NodePorts on 192.0.2.1.
    pub(super) fn n1() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            zone: Some("zone-a".into()),
            node_port_addresses: vec![Ipv4Addr::new(192, 0, 2, 1)],
            own_addresses: vec![Ipv4Addr::new(192, 0, 2, 1)],
            external_cluster_ips: false,
            socket_external_ips: SocketExternalIps::All,
            localhost_node_ports: false,
        }
    }

    // ---- objects in ------------------------------------------------------------------------

    /// A ClusterIP Service without address or ports yet.
    pub(super) fn svc(namespace: &str, name: &str) -> Service {
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

    pub(super) trait ServiceBuilder: Sized {
        fn cluster_ip(self, ip: &str) -> Self;
        fn cluster_ips(self, ips: &[&str]) -> Self;
        fn type_(self, type_: &str) -> Self;
        /// A port whose targetPort is the same number (the API default).
        fn port(self, name: &str, port: i32, proto: &str) -> Self;
        /// Sets the targetPort of the last port added.
        fn target_port(self, target: IntOrString) -> Self;
        fn label(self, key: &str, value: &str) -> Self;
        /// Sets the nodePort of the last port added.
        fn node_port(self, node_port: i32) -> Self;
        fn external_ips(self, ips: &[&str]) -> Self;
        fn external_traffic_policy(self, policy: &str) -> Self;
        fn internal_traffic_policy(self, policy: &str) -> Self;
        /// `sessionAffinity`, and `sessionAffinityConfig.clientIP.timeoutSeconds` if given.
        fn affinity(self, affinity: &str, timeout: Option<i32>) -> Self;
        /// A `status.loadBalancer.ingress` entry; an empty `ip_mode` means absent.
        fn ingress(self, ip: &str, ip_mode: &str) -> Self;
        fn raw_ingress(self, ingress: core::LoadBalancerIngress) -> Self;
        fn allocate_load_balancer_node_ports(self, allocate: bool) -> Self;
        fn publish_not_ready_addresses(self) -> Self;
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
        fn node_port(mut self, node_port: i32) -> Self {
            if let Some(port) = spec(&mut self).ports.as_mut().and_then(|p| p.last_mut()) {
                port.node_port = Some(node_port);
            }
            self
        }
        fn external_ips(mut self, ips: &[&str]) -> Self {
            spec(&mut self).external_ips = Some(ips.iter().map(|ip| ip.to_string()).collect());
            self
        }
        fn external_traffic_policy(mut self, policy: &str) -> Self {
            spec(&mut self).external_traffic_policy = some(policy);
            self
        }
        fn internal_traffic_policy(mut self, policy: &str) -> Self {
            spec(&mut self).internal_traffic_policy = some(policy);
            self
        }
        fn affinity(mut self, affinity: &str, timeout: Option<i32>) -> Self {
            let spec = spec(&mut self);
            spec.session_affinity = some(affinity);
            spec.session_affinity_config = timeout.map(|seconds| core::SessionAffinityConfig {
                client_ip: Some(core::ClientIPConfig {
                    timeout_seconds: Some(seconds),
                }),
            });
            self
        }
        fn ingress(self, ip: &str, ip_mode: &str) -> Self {
            self.raw_ingress(core::LoadBalancerIngress {
                ip: some(ip),
                ip_mode: some(ip_mode),
                ..core::LoadBalancerIngress::default()
            })
        }
        fn raw_ingress(mut self, ingress: core::LoadBalancerIngress) -> Self {
            self.status
                .get_or_insert_with(core::ServiceStatus::default)
                .load_balancer
                .get_or_insert_with(core::LoadBalancerStatus::default)
                .ingress
                .get_or_insert_with(Vec::new)
                .push(ingress);
            self
        }
        fn allocate_load_balancer_node_ports(mut self, allocate: bool) -> Self {
            spec(&mut self).allocate_load_balancer_node_ports = Some(allocate);
            self
        }
        fn publish_not_ready_addresses(mut self) -> Self {
            spec(&mut self).publish_not_ready_addresses = Some(true);
            self
        }
    }

    fn spec(service: &mut Service) -> &mut ServiceSpec {
        service.spec.get_or_insert_with(ServiceSpec::default)
    }

    /// An IPv4 EndpointSlice of Service `service`, without ports or endpoints yet.
    pub(super) fn slice(namespace: &str, name: &str, service: &str) -> EndpointSlice {
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

    pub(super) fn conditions(
        ready: bool,
        serving: bool,
        terminating: bool,
    ) -> discovery::EndpointConditions {
        discovery::EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }
    }

    pub(super) trait SliceBuilder: Sized {
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
        /// Puts the last endpoint added on node `node`.
        fn on(self, node: &str) -> Self {
            self.last_endpoint(|e| e.node_name = Some(node.into()))
        }
        /// Gives the last endpoint added `hints.forZones`.
        fn for_zones(self, zones: &[&str]) -> Self {
            self.last_endpoint(|e| {
                e.hints.get_or_insert_with(Default::default).for_zones = Some(
                    zones
                        .iter()
                        .map(|&name| discovery::ForZone { name: name.into() })
                        .collect(),
                );
            })
        }
        /// Gives the last endpoint added `hints.forNodes`.
        fn for_nodes(self, nodes: &[&str]) -> Self {
            self.last_endpoint(|e| {
                e.hints.get_or_insert_with(Default::default).for_nodes = Some(
                    nodes
                        .iter()
                        .map(|&name| discovery::ForNode { name: name.into() })
                        .collect(),
                );
            })
        }
        fn last_endpoint(self, change: impl FnOnce(&mut discovery::Endpoint)) -> Self;
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
        fn last_endpoint(mut self, change: impl FnOnce(&mut discovery::Endpoint)) -> Self {
            if let Some(endpoint) = self.endpoints.as_mut().and_then(|e| e.last_mut()) {
                change(endpoint);
            }
            self
        }
    }

    // ---- results out -----------------------------------------------------------------------

    /// Each frontend as one line in frontend order: `int|ext frontend -> backend, backend`,
    /// `(refuse)` or `(drop)` when there is no backend, then the affinity timeout if any.
    pub(super) fn rows(t: &Translation) -> Vec<String> {
        t.state.frontends.values().map(row).collect()
    }

    fn row(f: &Frontend) -> String {
        let scope = match f.key.scope {
            Scope::Internal => "int",
            Scope::External => "ext",
        };
        let backends = match (f.backends.is_empty(), f.when_empty) {
            (true, WhenEmpty::Refuse) => "(refuse)".to_owned(),
            (true, WhenEmpty::Drop) => "(drop)".to_owned(),
            (false, _) => {
                let backends: Vec<String> = f.backends.iter().map(ToString::to_string).collect();
                backends.join(", ")
            }
        };
        let affinity = f
            .affinity_timeout
            .map(|seconds| format!(" (affinity {seconds}s)"))
            .unwrap_or_default();
        format!("{scope} {} -> {backends}{affinity}", f.key)
    }

    /// Each frontend with its kind: `int|ext frontend kind`.
    fn kinds(t: &Translation) -> Vec<String> {
        t.state
            .frontends
            .values()
            .map(|f| {
                let scope = &row(f)[..3];
                format!("{scope} {} {}", f.key, f.kind)
            })
            .collect()
    }

    pub(super) fn skipped(t: &Translation) -> Vec<String> {
        t.skipped.iter().map(ToString::to_string).collect()
    }

    /// Translates and checks that nothing was skipped: the common case of a valid input.
    fn clean(services: &[Service], slices: &[EndpointSlice]) -> Vec<String> {
        clean_on(&n1(), services, slices)
    }

    fn clean_on(node: &NodeInfo, services: &[Service], slices: &[EndpointSlice]) -> Vec<String> {
        let t = translate(services, slices, node);
        assert_eq!(skipped(&t), Vec::<String>::new());
        rows(&t)
    }

    pub(super) fn web() -> Service {
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
            &n1(),
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
            lingering: Vec::new(),
            when_empty: WhenEmpty::Refuse,
            affinity_timeout: None,
            affinity_group: None,
            source_ranges: Vec::new(),
            at_node_address: false,
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
            ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP, 10.0.0.2:80/TCP, 10.0.0.3:80/TCP"]
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
            ["int 10.96.0.10:443/TCP -> 10.0.0.1:8443/TCP"]
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
            ["int 10.96.0.10:443/TCP -> 10.0.0.1:8443/TCP, 10.0.0.2:9443/TCP"]
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
                "int 10.96.0.53:53/TCP -> 10.0.0.1:5353/TCP",
                "int 10.96.0.53:53/UDP -> 10.0.0.1:53/UDP",
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
            &n1(),
        );
        let udp = FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: Protocol::Udp,
            scope: Scope::Internal,
        };
        assert!(!t.state.frontends.contains_key(&udp));
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
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
            ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
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
            ["int 10.96.0.10:80/TCP -> 10.0.0.2:80/TCP"]
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
                ["int 10.96.0.10:80/TCP -> (refuse)"],
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
            ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
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
            ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
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
                "int 10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.1:9090/TCP, 10.0.0.2:8080/TCP, 10.0.0.3:8080/TCP"
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
            ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
        );
    }

    /// The pod network gave a terminating pod's address to a new pod that is not ready
    /// yet (kubernetes#135266): the address is the new pod's, so the old pod's serving
    /// copy must not make it a backend. kube-proxy keeps the copy that is not terminating.
    #[test]
    fn an_address_reused_while_its_old_pod_terminates_is_the_new_pods() {
        let endpoints = [
            slice("default", "web-1", "web")
                .port("http", 80, "TCP")
                .serving_terminating("10.0.0.5"),
            slice("default", "web-2", "web")
                .port("http", 80, "TCP")
                .not_ready("10.0.0.5"),
        ];
        assert_eq!(
            clean(&[web()], &endpoints),
            ["int 10.96.0.10:80/TCP -> (refuse)"]
        );
        // The order of the slices does not matter.
        let reversed = [endpoints[1].clone(), endpoints[0].clone()];
        assert_eq!(
            clean(&[web()], &reversed),
            ["int 10.96.0.10:80/TCP -> (refuse)"]
        );
    }

    /// The same with `internalTrafficPolicy: Local`: the old pod was on this node, the new
    /// one is ready on another, so this node has no local endpoint (a DROP).
    #[test]
    fn a_reused_address_is_not_local_because_its_old_pod_was() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .serving_terminating("10.0.0.5")
            .on("n1")
            .ready("10.0.0.5")
            .on("n2");
        let local = web().internal_traffic_policy("Local");
        assert_eq!(
            clean(&[local], std::slice::from_ref(&endpoints)),
            ["int 10.96.0.10:80/TCP -> (drop)"]
        );
        // Nor is it a local backend of a `Cluster` frontend (north-south traffic to it is
        // source-NATed, so that the new pod's replies come back through this node).
        let t = translate(&[web()], &[endpoints], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> 10.0.0.5:80/TCP"]);
        assert!(
            t.state.local_backends.is_empty(),
            "{:?}",
            t.state.local_backends
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
            ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
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
                "int 10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP",
                "int 10.96.0.10:9100/TCP -> (refuse)",
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
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
            ),
            (
                "terminating, serving absent: serving, used as fallback",
                terminating_serving_unknown,
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
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
            ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
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
            ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
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
        assert_eq!(
            clean(&[web()], &endpoints),
            ["int 10.96.0.10:80/TCP -> (refuse)"]
        );
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
                ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"],
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
            ["int 172.30.0.41:80/TCP -> 10.0.0.10:80/TCP"]
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
        let t = translate(&services, &[], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> (refuse)"]);
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
        let t = translate(&[service], &[], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> (refuse)"]);
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
        let t = translate(&[service], &[], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> (refuse)"]);
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
        let t = translate(&[service], &[], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> (refuse)"]);
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
        let t = translate(&[service], &[endpoints], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
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
        let t = translate(&[web()], &[endpoints], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
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
        let t = translate(&[web()], &[endpoints], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
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
        let t = translate(&[broken.clone(), service, broken], &[endpoints], &n1());
        assert_eq!(
            rows(&t),
            [
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
                "int 10.96.0.10:81/TCP -> 10.0.0.1:81/TCP",
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
        let t = translate(&[web()], &[orphan], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> (refuse)"]);
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
        let t = translate(&[service, web()], &[endpoints], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> (refuse)"]);
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
        let t = translate(&services, &endpoints, &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
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
        let t = translate(&[service], &[endpoints], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]);
        let frontend = t
            .state
            .frontends
            .values()
            .next()
            .map(|f| f.service.to_string());
        assert_eq!(frontend.as_deref(), Some("default/web:http"));
    }

    #[test]
    fn node_port_and_load_balancer_services_keep_their_cluster_ip_frontend() {
        let cases = [
            ("type absent", web().type_(""), vec![]),
            (
                "NodePort without nodePort",
                web().type_("NodePort"),
                vec!["Service default/web port http: nodePort is missing"],
            ),
            (
                "LoadBalancer without nodePort",
                web().type_("LoadBalancer"),
                vec!["Service default/web port http: nodePort is missing"],
            ),
        ];
        for (case, service, want_skipped) in cases {
            let t = translate(&[service], &[], &n1());
            assert_eq!(rows(&t), ["int 10.96.0.10:80/TCP -> (refuse)"], "{case}");
            assert_eq!(skipped(&t), want_skipped, "{case}");
        }
    }

    // ---- external frontends and traffic policies --------------------------------------------

    /// Endpoint A on the other node N2, B on this node N1 (BEHAVIOUR C10).
    fn a_on_n2_b_on_n1() -> EndpointSlice {
        slice("default", "web-1", "web")
            .port("http", 8080, "TCP")
            .ready("10.0.0.1")
            .on("n2")
            .ready("10.0.0.2")
            .on("n1")
    }

    /// Port 80 reachable as NodePort 30080, externalIP 198.51.100.10 and LB IP 203.0.113.10.
    fn exposed(external_traffic_policy: &str) -> Service {
        svc("default", "web")
            .type_("LoadBalancer")
            .cluster_ip("10.96.0.10")
            .port("http", 80, "TCP")
            .target_port(IntOrString::Int(8080))
            .node_port(30080)
            .external_ips(&["198.51.100.10"])
            .ingress("203.0.113.10", "")
            .external_traffic_policy(external_traffic_policy)
    }

    /// An externalIP or LB IP that is one of the node's addresses is marked so (its port
    /// is also a source of the node's connections); a NodePort always is one.
    #[test]
    fn frontends_at_the_nodes_own_addresses_are_marked() {
        let service = svc("default", "web")
            .type_("LoadBalancer")
            .cluster_ip("10.96.0.10")
            .port("http", 80, "TCP")
            .node_port(30080)
            .external_ips(&["192.0.2.1", "198.51.100.10"])
            .ingress("192.0.2.1", "")
            .ingress("203.0.113.10", "");
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1");
        let t = translate(&[service], &[endpoints], &n1());
        let mut marked: Vec<String> = t
            .state
            .frontends
            .values()
            .filter(|f| f.key.scope == Scope::External)
            .map(|f| {
                format!(
                    "{} {}:{} {}",
                    f.kind, f.key.addr, f.key.port, f.at_node_address
                )
            })
            .collect();
        marked.sort();
        assert_eq!(
            marked,
            [
                "ExternalIP 192.0.2.1:80 true",
                "ExternalIP 198.51.100.10:80 false",
                "LoadBalancer 203.0.113.10:80 false",
                "NodePort 192.0.2.1:30080 true",
            ]
        );
    }

    fn only(scope: &str, rows: Vec<String>) -> Vec<String> {
        rows.into_iter().filter(|r| r.starts_with(scope)).collect()
    }

    #[test]
    fn c08_node_port_with_policy_cluster_reaches_every_endpoint() {
        let service = web()
            .type_("NodePort")
            .target_port(IntOrString::Int(8080))
            .node_port(30080);
        assert_eq!(
            clean(&[service], &[a_on_n2_b_on_n1()]),
            [
                "int 10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "ext 192.0.2.1:30080/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "int 192.0.2.1:30080/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
            ]
        );
    }

    #[test]
    fn c08_one_node_port_frontend_pair_per_node_port_address() {
        let service = web().type_("NodePort").node_port(30080);
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1");
        let two_addresses = NodeInfo {
            node_port_addresses: vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)],
            ..n1()
        };
        assert_eq!(
            clean_on(
                &two_addresses,
                slice::from_ref(&service),
                slice::from_ref(&endpoints)
            ),
            [
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
                "ext 192.0.2.1:30080/TCP -> 10.0.0.1:80/TCP",
                "int 192.0.2.1:30080/TCP -> 10.0.0.1:80/TCP",
                "ext 192.0.2.2:30080/TCP -> 10.0.0.1:80/TCP",
                "int 192.0.2.2:30080/TCP -> 10.0.0.1:80/TCP",
            ]
        );
        let no_addresses = NodeInfo {
            node_port_addresses: vec![],
            ..n1()
        };
        assert_eq!(
            clean_on(&no_addresses, &[service], &[endpoints]),
            ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
        );
    }

    /// kube-proxy's `--iptables-localhost-nodeports`: the node's processes reach each
    /// NodePort on 127.0.0.1 too, with the cluster endpoints whatever the external policy
    /// (its EXT chain sends `--src-type LOCAL` to the cluster chain), and nothing from
    /// outside does (no external frontend).
    #[test]
    fn localhost_node_ports_are_internal_with_the_cluster_endpoints() {
        let localhost = NodeInfo {
            localhost_node_ports: true,
            ..n1()
        };
        let node_port = web()
            .type_("NodePort")
            .target_port(IntOrString::Int(8080))
            .node_port(30080);
        let local = node_port.clone().external_traffic_policy("Local");
        assert_eq!(
            clean_on(&localhost, &[local], &[a_on_n2_b_on_n1()]),
            [
                "int 10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "int 127.0.0.1:30080/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "ext 192.0.2.1:30080/TCP -> 10.0.0.2:8080/TCP",
                "int 192.0.2.1:30080/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
            ]
        );
        let t = translate(
            slice::from_ref(&node_port),
            &[a_on_n2_b_on_n1()],
            &localhost,
        );
        assert!(kinds(&t).contains(&"int 127.0.0.1:30080/TCP NodePort".to_owned()));
        assert!(!kinds(&t).iter().any(|k| k.starts_with("ext 127.")));
        // No endpoints: refused, as on the node's addresses.
        assert!(
            clean_on(&localhost, slice::from_ref(&node_port), &[])
                .contains(&"int 127.0.0.1:30080/TCP -> (refuse)".to_owned())
        );
        // A LoadBalancer's NodePort too; none without the flag, or without a nodePort.
        let lb = web().type_("LoadBalancer").node_port(30081);
        assert!(
            clean_on(&localhost, &[lb], &[a_on_n2_b_on_n1()])
                .iter()
                .any(|r| r.starts_with("int 127.0.0.1:30081/TCP"))
        );
        let loopback = |rows: Vec<String>| rows.into_iter().any(|r| r.contains(" 127."));
        assert!(!loopback(clean_on(
            &n1(),
            slice::from_ref(&node_port),
            &[a_on_n2_b_on_n1()]
        )));
        let cluster_ip_with_node_port = web().node_port(30080);
        assert!(!loopback(clean_on(
            &localhost,
            &[cluster_ip_with_node_port],
            &[a_on_n2_b_on_n1()]
        )));
    }

    /// A LoadBalancer ingress IP on loopback: served to the node's own processes (kube-proxy
    /// DNATs it in OUTPUT), never to packets from outside.
    #[test]
    fn a_load_balancer_ip_on_loopback_is_internal_only() {
        let service = web()
            .type_("LoadBalancer")
            .target_port(IntOrString::Int(8080))
            .node_port(30080)
            .ingress("127.0.0.5", "");
        let t = translate(&[service], &[a_on_n2_b_on_n1()], &n1());
        let loopback: Vec<String> = kinds(&t)
            .into_iter()
            .filter(|k| k.contains(" 127."))
            .collect();
        assert_eq!(loopback, ["int 127.0.0.5:80/TCP LoadBalancer"]);
    }

    /// Which `--nodeport-addresses` admit loopback NodePorts: kube-proxy's iptables mode
    /// serves them with no CIDR given or one holding 127.0.0.1, never with `primary`.
    #[test]
    fn loopback_node_ports_follow_the_nodeport_addresses() {
        let within = |cidrs: &[&str]| NodePortAddresses::parse(cidrs).expect("valid");
        assert!(NodePortAddresses::All.serve_loopback(true));
        assert!(!NodePortAddresses::All.serve_loopback(false));
        assert!(!NodePortAddresses::Primary.serve_loopback(true));
        assert!(within(&["10.0.0.0/8", "127.0.0.0/8"]).serve_loopback(true));
        assert!(within(&["127.0.0.1/32"]).serve_loopback(true));
        assert!(!within(&["127.0.0.2/32"]).serve_loopback(true));
        assert!(!within(&["10.0.0.0/8"]).serve_loopback(true));
        assert!(within(&["0.0.0.0/0"]).serve_loopback(true));
        // All of 127.0.0.0/8, or 127.0.0.1 alone.
        assert!(NodePortAddresses::All.match_all());
        assert!(within(&["10.0.0.0/8", "0.0.0.0/0"]).match_all());
        assert!(!within(&["127.0.0.0/8"]).match_all());
        assert!(within(&["::/0"]).match_all(), "no IPv4 CIDR");
        assert!(!NodePortAddresses::Primary.match_all());
    }

    /// `--external-clusterip`: a packet from outside the node to a ClusterIP (a Service
    /// range routed to the nodes) goes where kube-proxy's ClusterIP rule sends every
    /// source: to the internal traffic policy's endpoints, refused or dropped as the
    /// ClusterIP is. Without the flag (the default) no external frontend is made for it.
    #[test]
    fn external_cluster_ips_get_an_external_twin_with_the_internal_policy() {
        let routed = NodeInfo {
            external_cluster_ips: true,
            ..n1()
        };
        let service = web().target_port(IntOrString::Int(8080));
        let t = translate(slice::from_ref(&service), &[a_on_n2_b_on_n1()], &routed);
        assert_eq!(
            kinds(&t),
            [
                "ext 10.96.0.10:80/TCP ClusterIP",
                "int 10.96.0.10:80/TCP ClusterIP"
            ]
        );
        assert_eq!(
            rows(&t),
            [
                "ext 10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "int 10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
            ]
        );
        let local = service.clone().internal_traffic_policy("Local");
        assert_eq!(
            clean_on(&routed, slice::from_ref(&local), &[a_on_n2_b_on_n1()]),
            [
                "ext 10.96.0.10:80/TCP -> 10.0.0.2:8080/TCP",
                "int 10.96.0.10:80/TCP -> 10.0.0.2:8080/TCP",
            ]
        );
        let only_on_n2 = slice("default", "web-1", "web")
            .port("http", 8080, "TCP")
            .ready("10.0.0.1")
            .on("n2");
        assert_eq!(
            clean_on(&routed, &[local], slice::from_ref(&only_on_n2)),
            [
                "ext 10.96.0.10:80/TCP -> (drop)",
                "int 10.96.0.10:80/TCP -> (drop)"
            ]
        );
        assert_eq!(
            clean_on(&routed, slice::from_ref(&service), &[]),
            [
                "ext 10.96.0.10:80/TCP -> (refuse)",
                "int 10.96.0.10:80/TCP -> (refuse)"
            ]
        );
        assert_eq!(
            clean_on(&n1(), &[service], &[only_on_n2]),
            ["int 10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP"]
        );
    }

    /// The node reaching its own IP:nodePort goes through the socket programs: internal scope.
    #[test]
    fn c09_the_node_itself_reaches_its_node_port_through_the_internal_frontend() {
        for policy in ["Cluster", "Local"] {
            let service = web()
                .type_("NodePort")
                .target_port(IntOrString::Int(8080))
                .node_port(30080)
                .external_traffic_policy(policy);
            let t = translate(&[service], &[a_on_n2_b_on_n1()], &n1());
            let key = FrontendKey {
                addr: Ipv4Addr::new(192, 0, 2, 1),
                port: 30080,
                proto: Protocol::Tcp,
                scope: Scope::Internal,
            };
            assert_eq!(
                t.state.frontends.get(&key).map(row).as_deref(),
                Some("int 192.0.2.1:30080/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP"),
                "{policy}"
            );
        }
    }

    #[test]
    fn c10_policy_local_sends_outside_traffic_to_local_endpoints_only() {
        assert_eq!(
            only("ext", clean(&[exposed("Local")], &[a_on_n2_b_on_n1()])),
            [
                "ext 192.0.2.1:30080/TCP -> 10.0.0.2:8080/TCP",
                "ext 198.51.100.10:80/TCP -> 10.0.0.2:8080/TCP",
                "ext 203.0.113.10:80/TCP -> 10.0.0.2:8080/TCP",
            ]
        );
        assert_eq!(
            only("ext", clean(&[exposed("Cluster")], &[a_on_n2_b_on_n1()])),
            [
                "ext 192.0.2.1:30080/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "ext 198.51.100.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "ext 203.0.113.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
            ]
        );
    }

    /// kube-proxy falls back to local serving-terminating endpoints on its own, even while
    /// other nodes have ready ones.
    #[test]
    fn c10_policy_local_falls_back_to_local_serving_terminating() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 8080, "TCP")
            .ready("10.0.0.1")
            .on("n2")
            .serving_terminating("10.0.0.2")
            .on("n1")
            .terminating_not_serving("10.0.0.3")
            .on("n1");
        assert_eq!(
            clean(&[exposed("Local")], &[endpoints]),
            [
                "int 10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP",
                "ext 192.0.2.1:30080/TCP -> 10.0.0.2:8080/TCP",
                "int 192.0.2.1:30080/TCP -> 10.0.0.1:8080/TCP",
                "ext 198.51.100.10:80/TCP -> 10.0.0.2:8080/TCP",
                "int 198.51.100.10:80/TCP -> 10.0.0.1:8080/TCP",
                "ext 203.0.113.10:80/TCP -> 10.0.0.2:8080/TCP",
                "int 203.0.113.10:80/TCP -> 10.0.0.1:8080/TCP",
            ]
        );
    }

    /// Each frontend's lingering backends, `scope frontend ~ backends`, for the frontends
    /// that have some.
    fn lingering_rows(t: &Translation) -> Vec<String> {
        let rows = t
            .state
            .frontends
            .values()
            .filter(|f| !f.lingering.is_empty());
        rows.map(|f| {
            let scope = &row(f)[..3];
            let lingering: Vec<String> = f.lingering.iter().map(ToString::to_string).collect();
            format!("{scope} {} ~ {}", f.key, lingering.join(", "))
        })
        .collect()
    }

    /// Endpoints that take no new flow keep the flows they have, as kube-proxy leaves their
    /// conntrack entries (its `CleanStaleEntries` looks at neither the terminating state,
    /// nor the policies, nor the topology): a TCP endpoint while it is listed at all, a UDP
    /// one while it is serving, or while no endpoint of its port is.
    #[test]
    fn endpoints_without_new_flows_linger_for_the_flows_they_have() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 8080, "TCP")
            .ready("10.0.0.1")
            .on("n2")
            .serving_terminating("10.0.0.2")
            .on("n1")
            .terminating_not_serving("10.0.0.3")
            .on("n1")
            .not_ready("10.0.0.4")
            .on("n2");
        let service = exposed("Local").internal_traffic_policy("Local");
        let t = translate(&[service], &[endpoints], &n1());
        assert_eq!(
            lingering_rows(&t),
            [
                // The local view falls back to n1's draining endpoint; the ready one on n2
                // lingers too, for flows from before the policy was `Local`.
                "int 10.96.0.10:80/TCP ~ 10.0.0.1:8080/TCP, 10.0.0.3:8080/TCP, \
                 10.0.0.4:8080/TCP",
                // Pods and the node reach the others through the cluster view, which has
                // the ready endpoint.
                "int 192.0.2.1:30080/TCP ~ 10.0.0.2:8080/TCP, 10.0.0.3:8080/TCP, \
                 10.0.0.4:8080/TCP",
                "int 198.51.100.10:80/TCP ~ 10.0.0.2:8080/TCP, 10.0.0.3:8080/TCP, \
                 10.0.0.4:8080/TCP",
                "int 203.0.113.10:80/TCP ~ 10.0.0.2:8080/TCP, 10.0.0.3:8080/TCP, \
                 10.0.0.4:8080/TCP",
                // External frontends have none: the cluster IP's frontend keeps every one
                // in the backends map, which is all the north-south programs look at.
            ]
        );
        // Lingering backends on this node are local, like the backends in use.
        let local: Vec<String> = t
            .state
            .local_backends
            .iter()
            .map(|b| b.to_string())
            .collect();
        assert_eq!(local, ["10.0.0.2:8080/TCP", "10.0.0.3:8080/TCP"]);

        // UDP: only serving endpoints linger; topology hints leave the others out of new
        // flows only.
        let dns = svc("default", "dns")
            .cluster_ip("10.96.0.53")
            .port("dns", 53, "UDP");
        let endpoints = slice("default", "dns-1", "dns")
            .port("dns", 5353, "UDP")
            .ready("10.0.1.1")
            .for_zones(&["zone-a"])
            .ready("10.0.1.2")
            .for_zones(&["zone-b"])
            .serving_terminating("10.0.1.3")
            .terminating_not_serving("10.0.1.4")
            .not_ready("10.0.1.5");
        let t = translate(std::slice::from_ref(&dns), &[endpoints], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.53:53/UDP -> 10.0.1.1:5353/UDP"]);
        assert_eq!(
            lingering_rows(&t),
            ["int 10.96.0.53:53/UDP ~ 10.0.1.2:5353/UDP, 10.0.1.3:5353/UDP"]
        );

        // A UDP port without a serving endpoint (a single pod whose readiness fails): new
        // flows are refused, and every listed endpoint keeps its flows, as kube-proxy
        // clears no conntrack entry of a Service without serving endpoints.
        let endpoints = slice("default", "dns-1", "dns")
            .port("dns", 5353, "UDP")
            .not_ready("10.0.1.5")
            .terminating_not_serving("10.0.1.4");
        let t = translate(&[dns], &[endpoints], &n1());
        assert_eq!(rows(&t), ["int 10.96.0.53:53/UDP -> (refuse)"]);
        assert_eq!(
            lingering_rows(&t),
            ["int 10.96.0.53:53/UDP ~ 10.0.1.4:5353/UDP, 10.0.1.5:5353/UDP"]
        );
    }

    #[test]
    fn c11_pods_and_the_node_reach_external_addresses_through_cluster_endpoints() {
        for policy in ["Local", "Cluster"] {
            assert_eq!(
                only("int", clean(&[exposed(policy)], &[a_on_n2_b_on_n1()])),
                [
                    "int 10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                    "int 192.0.2.1:30080/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                    "int 198.51.100.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                    "int 203.0.113.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                ],
                "{policy}"
            );
        }
    }

    /// Even with `internalTrafficPolicy: Local`, kube-proxy's EXT chain uses the cluster
    /// endpoints for pods; only the cluster IP follows the internal policy.
    #[test]
    fn c11_internal_policy_local_does_not_restrict_external_addresses() {
        let service = exposed("Cluster").internal_traffic_policy("Local");
        assert_eq!(
            clean(&[service], &[a_on_n2_b_on_n1()]),
            [
                "int 10.96.0.10:80/TCP -> 10.0.0.2:8080/TCP",
                "ext 192.0.2.1:30080/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "int 192.0.2.1:30080/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "ext 198.51.100.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "int 198.51.100.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "ext 203.0.113.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "int 203.0.113.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
            ]
        );
    }

    #[test]
    fn c12_policy_local_without_local_endpoint_drops_outside_traffic() {
        let remote_only = slice("default", "web-1", "web")
            .port("http", 8080, "TCP")
            .ready("10.0.0.1")
            .on("n2");
        assert_eq!(
            clean(&[exposed("Local")], &[remote_only]),
            [
                "int 10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP",
                "ext 192.0.2.1:30080/TCP -> (drop)",
                "int 192.0.2.1:30080/TCP -> 10.0.0.1:8080/TCP",
                "ext 198.51.100.10:80/TCP -> (drop)",
                "int 198.51.100.10:80/TCP -> 10.0.0.1:8080/TCP",
                "ext 203.0.113.10:80/TCP -> (drop)",
                "int 203.0.113.10:80/TCP -> 10.0.0.1:8080/TCP",
            ]
        );
    }

    /// kube-proxy's `hasEndpoints` test comes before the traffic policy: REJECT everywhere.
    #[test]
    fn c06_no_usable_endpoint_anywhere_refuses_on_every_frontend() {
        let cases = [
            ("no EndpointSlice", vec![]),
            (
                "only a local endpoint that is not serving",
                vec![
                    slice("default", "web-1", "web")
                        .port("http", 8080, "TCP")
                        .terminating_not_serving("10.0.0.2")
                        .on("n1"),
                ],
            ),
        ];
        for (case, slices) in cases {
            for policy in ["Local", "Cluster"] {
                let service = exposed(policy).internal_traffic_policy(policy);
                assert_eq!(
                    clean(&[service], &slices),
                    [
                        "int 10.96.0.10:80/TCP -> (refuse)",
                        "ext 192.0.2.1:30080/TCP -> (refuse)",
                        "int 192.0.2.1:30080/TCP -> (refuse)",
                        "ext 198.51.100.10:80/TCP -> (refuse)",
                        "int 198.51.100.10:80/TCP -> (refuse)",
                        "ext 203.0.113.10:80/TCP -> (refuse)",
                        "int 203.0.113.10:80/TCP -> (refuse)",
                    ],
                    "{case}, policies {policy}"
                );
            }
        }
    }

    #[test]
    fn c14_internal_policy_local_uses_only_local_endpoints() {
        let service = web()
            .target_port(IntOrString::Int(8080))
            .internal_traffic_policy("Local");
        let cases = [
            (
                "local and remote ready",
                a_on_n2_b_on_n1(),
                "int 10.96.0.10:80/TCP -> 10.0.0.2:8080/TCP",
            ),
            (
                "local serving-terminating, remote ready: the local fallback",
                slice("default", "web-1", "web")
                    .port("http", 8080, "TCP")
                    .ready("10.0.0.1")
                    .on("n2")
                    .serving_terminating("10.0.0.2")
                    .on("n1"),
                "int 10.96.0.10:80/TCP -> 10.0.0.2:8080/TCP",
            ),
            (
                "an endpoint without nodeName is not local",
                slice("default", "web-1", "web")
                    .port("http", 8080, "TCP")
                    .ready("10.0.0.1")
                    .ready("10.0.0.2")
                    .on("n1"),
                "int 10.96.0.10:80/TCP -> 10.0.0.2:8080/TCP",
            ),
        ];
        for (case, endpoints, want) in cases {
            assert_eq!(
                clean(slice::from_ref(&service), &[endpoints]),
                [want],
                "{case}"
            );
        }
    }

    #[test]
    fn local_backends_are_the_backends_in_use_whose_endpoint_is_on_this_node() {
        let service = web().target_port(IntOrString::Int(8080));
        let b = |host: u8| BackendAddr {
            addr: Ipv4Addr::new(10, 0, 0, host),
            port: 8080,
            proto: Protocol::Tcp,
        };
        let cases = [
            (
                "one endpoint here, one on n2",
                slice("default", "web-1", "web")
                    .port("http", 8080, "TCP")
                    .ready("10.0.0.1")
                    .on("n2")
                    .ready("10.0.0.2")
                    .on("n1"),
                BTreeSet::from([b(2)]),
            ),
            (
                "an endpoint without nodeName is not local",
                slice("default", "web-1", "web")
                    .port("http", 8080, "TCP")
                    .ready("10.0.0.1"),
                BTreeSet::new(),
            ),
            (
                "a local endpoint that lingers (not ready, others are) is local too",
                slice("default", "web-1", "web")
                    .port("http", 8080, "TCP")
                    .ready("10.0.0.1")
                    .on("n2")
                    .not_ready("10.0.0.2")
                    .on("n1"),
                BTreeSet::from([b(2)]),
            ),
            (
                "a local endpoint on a port no Service port names is left out",
                slice("default", "web-1", "web")
                    .port("metrics", 9090, "TCP")
                    .ready("10.0.0.2")
                    .on("n1"),
                BTreeSet::new(),
            ),
            (
                "an endpoint at the node's own address is local, whatever its nodeName says",
                slice("default", "web-1", "web")
                    .port("http", 8080, "TCP")
                    .ready("192.0.2.1")
                    .ready("10.0.0.1")
                    .on("n2"),
                BTreeSet::from([BackendAddr {
                    addr: Ipv4Addr::new(192, 0, 2, 1),
                    port: 8080,
                    proto: Protocol::Tcp,
                }]),
            ),
        ];
        for (case, endpoints, want) in cases {
            let t = translate(slice::from_ref(&service), &[endpoints], &n1());
            assert_eq!(t.state.local_backends, want, "{case}");
        }
    }

    /// An endpoint at the node's own address without `nodeName` (the API server's, a
    /// hand-written slice's) is served on this node, so its traffic is not source-NATed;
    /// but traffic policy `Local` goes by `nodeName` alone, as kube-proxy's does.
    #[test]
    fn an_endpoint_at_the_node_address_is_no_local_policy_endpoint_without_its_node_name() {
        let service = web()
            .type_("NodePort")
            .target_port(IntOrString::Int(6443))
            .node_port(30443)
            .external_traffic_policy("Local");
        let endpoints = slice("default", "web-1", "web")
            .port("http", 6443, "TCP")
            .ready("192.0.2.1");
        assert_eq!(
            clean(slice::from_ref(&service), slice::from_ref(&endpoints)),
            [
                "int 10.96.0.10:80/TCP -> 192.0.2.1:6443/TCP",
                "ext 192.0.2.1:30443/TCP -> (drop)",
                "int 192.0.2.1:30443/TCP -> 192.0.2.1:6443/TCP",
            ]
        );
    }

    #[test]
    fn c15_internal_policy_local_without_local_endpoint_drops() {
        let service = web()
            .target_port(IntOrString::Int(8080))
            .internal_traffic_policy("Local");
        let cases = [
            (
                "ready endpoints on other nodes only",
                vec![
                    slice("default", "web-1", "web")
                        .port("http", 8080, "TCP")
                        .ready("10.0.0.1")
                        .on("n2"),
                ],
                "int 10.96.0.10:80/TCP -> (drop)",
            ),
            (
                "remote serving-terminating, local not serving",
                vec![
                    slice("default", "web-1", "web")
                        .port("http", 8080, "TCP")
                        .serving_terminating("10.0.0.1")
                        .on("n2")
                        .terminating_not_serving("10.0.0.2")
                        .on("n1"),
                ],
                "int 10.96.0.10:80/TCP -> (drop)",
            ),
            (
                "no usable endpoint anywhere: refused like any Service",
                vec![
                    slice("default", "web-1", "web")
                        .port("http", 8080, "TCP")
                        .not_ready("10.0.0.1")
                        .on("n2"),
                ],
                "int 10.96.0.10:80/TCP -> (refuse)",
            ),
            (
                "no EndpointSlice",
                vec![],
                "int 10.96.0.10:80/TCP -> (refuse)",
            ),
        ];
        for (case, slices, want) in cases {
            assert_eq!(clean(slice::from_ref(&service), &slices), [want], "{case}");
        }
    }

    /// CVE-2020-8554 (`safety`): pods and the node reach an externalIP through the socket
    /// programs only when it is an address of this node, and one they are not served claims
    /// no key. An externalIP on another Service's ClusterIP and port, earlier in order, once
    /// won that key and was then left out, so the ClusterIP was served to no one.
    #[test]
    fn an_external_ip_pods_are_not_served_leaves_its_key_to_the_cluster_ip_there() {
        let shadowing = svc("app", "other")
            .cluster_ip("10.96.0.99")
            .port("http", 80, "TCP")
            .external_ips(&["10.96.0.10", "192.0.2.1"]);
        let endpoints = [
            slice("app", "other-1", "other")
                .port("http", 80, "TCP")
                .ready("10.0.0.9"),
            slice("default", "web-1", "web")
                .port("http", 80, "TCP")
                .ready("10.0.0.1"),
        ];
        let own_only = NodeInfo {
            socket_external_ips: SocketExternalIps::OwnAddresses(vec![Ipv4Addr::new(192, 0, 2, 1)]),
            ..n1()
        };
        let services = [shadowing, web()];
        assert_eq!(
            clean_on(&own_only, &services, &endpoints),
            [
                "ext 10.96.0.10:80/TCP -> 10.0.0.9:80/TCP",
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
                "int 10.96.0.99:80/TCP -> 10.0.0.9:80/TCP",
                "ext 192.0.2.1:80/TCP -> 10.0.0.9:80/TCP",
                "int 192.0.2.1:80/TCP -> 10.0.0.9:80/TCP",
            ]
        );
        // Every externalIP served to pods (`--socket-lb-external-ips`): the first claim wins.
        let all = NodeInfo {
            socket_external_ips: SocketExternalIps::All,
            ..n1()
        };
        let t = translate(&services, &endpoints, &all);
        assert_eq!(rows(&t)[1], "int 10.96.0.10:80/TCP -> 10.0.0.9:80/TCP");
        assert_eq!(
            skipped(&t),
            [
                "Service default/web port http: 10.96.0.10:80/TCP is already served by app/other:http"
            ]
        );
    }

    /// `apiservice.ExternallyAccessible`: a ClusterIP Service with externalIPs has external
    /// traffic, so its externalTrafficPolicy counts.
    #[test]
    fn c10_policy_local_applies_to_external_ips_of_a_cluster_ip_service() {
        let service = web()
            .target_port(IntOrString::Int(8080))
            .external_ips(&["198.51.100.10"])
            .external_traffic_policy("Local");
        assert_eq!(
            clean(&[service], &[a_on_n2_b_on_n1()]),
            [
                "int 10.96.0.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
                "ext 198.51.100.10:80/TCP -> 10.0.0.2:8080/TCP",
                "int 198.51.100.10:80/TCP -> 10.0.0.1:8080/TCP, 10.0.0.2:8080/TCP",
            ]
        );
    }

    #[test]
    fn c23_external_ips_are_translated_for_any_type() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1");
        for type_ in ["ClusterIP", ""] {
            let service = web().type_(type_).external_ips(&[
                "198.51.100.10",
                "fd00::10",
                "198.51.100.010",
                "bogus",
            ]);
            let t = translate(&[service], slice::from_ref(&endpoints), &n1());
            assert_eq!(
                rows(&t),
                [
                    "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
                    "ext 198.51.100.10:80/TCP -> 10.0.0.1:80/TCP",
                    "int 198.51.100.10:80/TCP -> 10.0.0.1:80/TCP",
                ],
                "type {type_:?}"
            );
            assert_eq!(
                kinds(&t),
                [
                    "int 10.96.0.10:80/TCP ClusterIP",
                    "ext 198.51.100.10:80/TCP ExternalIP",
                    "int 198.51.100.10:80/TCP ExternalIP",
                ]
            );
            assert_eq!(
                skipped(&t),
                [r#"Service default/web: invalid externalIP "bogus""#]
            );
        }
    }

    #[test]
    fn c31_load_balancer_ip_mode_proxy_is_not_intercepted() {
        let service = web()
            .type_("LoadBalancer")
            .node_port(30080)
            .ingress("203.0.113.1", "Proxy")
            .ingress("203.0.113.2", "VIP")
            .ingress("203.0.113.3", "")
            .ingress("fd00::3", "VIP")
            .raw_ingress(core::LoadBalancerIngress {
                hostname: Some("lb.example.com".into()),
                ..core::LoadBalancerIngress::default()
            });
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1");
        let t = translate(&[service], &[endpoints], &n1());
        assert_eq!(
            kinds(&t),
            [
                "int 10.96.0.10:80/TCP ClusterIP",
                "ext 192.0.2.1:30080/TCP NodePort",
                "int 192.0.2.1:30080/TCP NodePort",
                "ext 203.0.113.2:80/TCP LoadBalancer",
                "int 203.0.113.2:80/TCP LoadBalancer",
                "ext 203.0.113.3:80/TCP LoadBalancer",
                "int 203.0.113.3:80/TCP LoadBalancer",
            ]
        );
        assert!(t.skipped.is_empty(), "{:?}", skipped(&t));
    }

    #[test]
    fn c22_source_ranges_filter_only_the_external_view_of_lb_ips() {
        let mut service = web()
            .type_("LoadBalancer")
            .node_port(30080)
            .external_ips(&["198.51.100.10"])
            .ingress("203.0.113.2", "");
        spec(&mut service).load_balancer_source_ranges = Some(vec![
            "10.1.0.0/16".into(),
            " 192.168.0.7/24".into(),
            "bad".into(),
        ]);
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1");
        let t = translate(&[service], &[endpoints], &n1());
        let filtered: Vec<String> = t
            .state
            .frontends
            .values()
            .filter(|f| !f.source_ranges.is_empty())
            .map(|f| {
                let ranges: Vec<String> = f.source_ranges.iter().map(|r| r.to_string()).collect();
                format!("{} {} {}", f.key.scope, f.key, ranges.join(","))
            })
            .collect();
        assert_eq!(
            filtered,
            ["external 203.0.113.2:80/TCP 10.1.0.0/16,192.168.0.0/24"]
        );
        assert_eq!(
            skipped(&t),
            [r#"Service default/web: loadBalancerSourceRanges entry "bad" is not a CIDR: ignored"#]
        );
    }

    #[test]
    fn bad_load_balancer_ingress_is_reported_and_left_out() {
        let service = web()
            .type_("LoadBalancer")
            .allocate_load_balancer_node_ports(false)
            .ingress("203.0.113.999", "")
            .ingress("203.0.113.4", "Passthrough")
            .ingress("203.0.113.5", "VIP");
        let t = translate(&[service], &[], &n1());
        assert_eq!(
            rows(&t),
            [
                "int 10.96.0.10:80/TCP -> (refuse)",
                "ext 203.0.113.5:80/TCP -> (refuse)",
                "int 203.0.113.5:80/TCP -> (refuse)",
            ]
        );
        assert_eq!(
            skipped(&t),
            [
                r#"Service default/web: invalid loadBalancer ingress IP "203.0.113.999""#,
                r#"Service default/web: loadBalancer ingress "203.0.113.4": ipMode "Passthrough" is not supported (VIP or Proxy)"#,
            ]
        );
    }

    #[test]
    fn cluster_ip_type_never_gets_node_port_frontends() {
        let service = web().type_("ClusterIP").node_port(30080);
        assert_eq!(
            clean(&[service], &[]),
            ["int 10.96.0.10:80/TCP -> (refuse)"]
        );
    }

    #[test]
    fn missing_or_out_of_range_node_port_is_skipped_for_that_port_only() {
        let service = svc("default", "web")
            .type_("NodePort")
            .cluster_ip("10.96.0.10")
            .port("http", 80, "TCP")
            .port("admin", 81, "TCP")
            .node_port(70000)
            .port("metrics", 82, "TCP")
            .node_port(30082);
        let t = translate(&[service], &[], &n1());
        assert_eq!(
            rows(&t),
            [
                "int 10.96.0.10:80/TCP -> (refuse)",
                "int 10.96.0.10:81/TCP -> (refuse)",
                "int 10.96.0.10:82/TCP -> (refuse)",
                "ext 192.0.2.1:30082/TCP -> (refuse)",
                "int 192.0.2.1:30082/TCP -> (refuse)",
            ]
        );
        assert_eq!(
            skipped(&t),
            [
                "Service default/web port admin: nodePort 70000 is out of range 1-65535",
                "Service default/web port http: nodePort is missing",
            ]
        );
    }

    #[test]
    fn load_balancer_without_node_port_allocation_has_no_node_port_frontend() {
        let without = web()
            .type_("LoadBalancer")
            .allocate_load_balancer_node_ports(false)
            .ingress("203.0.113.10", "");
        assert_eq!(
            clean(slice::from_ref(&without), &[]),
            [
                "int 10.96.0.10:80/TCP -> (refuse)",
                "ext 203.0.113.10:80/TCP -> (refuse)",
                "int 203.0.113.10:80/TCP -> (refuse)",
            ]
        );
        // A nodePort set by hand is still served.
        assert_eq!(
            clean(&[without.node_port(30080)], &[]),
            [
                "int 10.96.0.10:80/TCP -> (refuse)",
                "ext 192.0.2.1:30080/TCP -> (refuse)",
                "int 192.0.2.1:30080/TCP -> (refuse)",
                "ext 203.0.113.10:80/TCP -> (refuse)",
                "int 203.0.113.10:80/TCP -> (refuse)",
            ]
        );
    }

    #[test]
    fn node_port_protocols_are_separate_frontends() {
        let service = svc("kube-system", "dns")
            .type_("NodePort")
            .cluster_ip("10.96.0.53")
            .port("dns-tcp", 53, "TCP")
            .node_port(30053)
            .port("dns", 53, "UDP")
            .node_port(30053);
        let endpoints = slice("kube-system", "dns-1", "dns")
            .port("dns-tcp", 53, "TCP")
            .port("dns", 53, "UDP")
            .ready("10.0.0.1");
        assert_eq!(
            clean(&[service], &[endpoints]),
            [
                "int 10.96.0.53:53/TCP -> 10.0.0.1:53/TCP",
                "int 10.96.0.53:53/UDP -> 10.0.0.1:53/UDP",
                "ext 192.0.2.1:30053/TCP -> 10.0.0.1:53/TCP",
                "int 192.0.2.1:30053/TCP -> 10.0.0.1:53/TCP",
                "ext 192.0.2.1:30053/UDP -> 10.0.0.1:53/UDP",
                "int 192.0.2.1:30053/UDP -> 10.0.0.1:53/UDP",
            ]
        );
    }

    #[test]
    fn two_services_on_one_node_port_keep_the_first_and_report_the_second() {
        let services = [
            svc("shop", "web")
                .type_("NodePort")
                .cluster_ip("10.96.0.11")
                .port("http", 80, "TCP")
                .node_port(30080),
            web().type_("NodePort").node_port(30080),
        ];
        let t = translate(&services, &[], &n1());
        assert_eq!(
            rows(&t),
            [
                "int 10.96.0.10:80/TCP -> (refuse)",
                "int 10.96.0.11:80/TCP -> (refuse)",
                "ext 192.0.2.1:30080/TCP -> (refuse)",
                "int 192.0.2.1:30080/TCP -> (refuse)",
            ]
        );
        assert_eq!(
            t.state
                .frontends
                .values()
                .map(|f| f.service.to_string())
                .collect::<Vec<_>>(),
            [
                "default/web:http",
                "shop/web:http",
                "default/web:http",
                "default/web:http"
            ]
        );
        assert_eq!(
            skipped(&t),
            [
                "Service shop/web port http: 192.0.2.1:30080/TCP is already served by default/web:http"
            ]
        );
    }

    /// A Service address on a node address, on a port some NodePort has (k3s's ServiceLB
    /// writes node addresses as LB IPs), is served as that address, whichever Service's
    /// name sorts first: kube-proxy matches Service addresses before NodePorts. The
    /// incremental translation picks the same winner.
    #[test]
    fn a_service_address_beats_a_node_port_on_the_same_key() {
        let services = [
            web().type_("NodePort").node_port(30080),
            svc("default", "dns")
                .type_("NodePort")
                .cluster_ip("10.96.0.12")
                .port("", 53, "UDP")
                .node_port(30053),
            svc("shop", "ext")
                .cluster_ip("10.96.0.11")
                .port("http", 30080, "TCP")
                .port("", 30053, "UDP")
                .external_ips(&["192.0.2.1"]),
        ];
        let t = translate(&services, &[], &n1());
        assert_eq!(
            kinds(&t),
            [
                "int 10.96.0.10:80/TCP ClusterIP",
                "int 10.96.0.11:30053/UDP ClusterIP",
                "int 10.96.0.11:30080/TCP ClusterIP",
                "int 10.96.0.12:53/UDP ClusterIP",
                "ext 192.0.2.1:30053/UDP ExternalIP",
                "int 192.0.2.1:30053/UDP ExternalIP",
                "ext 192.0.2.1:30080/TCP ExternalIP",
                "int 192.0.2.1:30080/TCP ExternalIP",
            ]
        );
        let arcs: Vec<std::sync::Arc<Service>> =
            services.iter().cloned().map(std::sync::Arc::new).collect();
        let mut incremental = incremental::Incremental::default();
        incremental.update(&arcs, &[], &n1());
        assert_eq!(incremental.state(), &t.state);
        let incremental_skipped: Vec<String> =
            incremental.skipped().map(ToString::to_string).collect();
        assert_eq!(
            skipped(&t),
            [
                "Service default/dns port 53: 192.0.2.1:30053/UDP is already served by shop/ext",
                "Service default/web port http: 192.0.2.1:30080/TCP is already served by shop/ext:http",
            ]
        );
        assert_eq!(incremental_skipped, skipped(&t));
    }

    #[test]
    fn one_address_claimed_twice_by_one_service_port_is_served_once() {
        let service = web()
            .type_("LoadBalancer")
            .allocate_load_balancer_node_ports(false)
            .external_ips(&["203.0.113.10", "203.0.113.10"])
            .ingress("203.0.113.10", "");
        let t = translate(&[service], &[], &n1());
        assert_eq!(
            kinds(&t),
            [
                "int 10.96.0.10:80/TCP ClusterIP",
                "ext 203.0.113.10:80/TCP ExternalIP",
                "int 203.0.113.10:80/TCP ExternalIP",
            ]
        );
        assert!(t.skipped.is_empty(), "{:?}", skipped(&t));
    }

    #[test]
    fn values_the_api_server_refuses_skip_the_whole_service() {
        let cases = [
            (
                web().type_("Nodeport"),
                r#"type "Nodeport" is not supported (ClusterIP, NodePort, LoadBalancer or ExternalName)"#,
            ),
            (
                web().internal_traffic_policy("local"),
                r#"internalTrafficPolicy "local" is not supported (Cluster or Local)"#,
            ),
            (
                web().external_traffic_policy("Global"),
                r#"externalTrafficPolicy "Global" is not supported (Cluster or Local)"#,
            ),
            (
                web().affinity("Cookie", None),
                r#"sessionAffinity "Cookie" is not supported (None or ClientIP)"#,
            ),
        ];
        let other = svc("default", "other")
            .cluster_ip("10.96.0.11")
            .port("http", 80, "TCP");
        for (service, reason) in cases {
            let t = translate(&[service, other.clone()], &[], &n1());
            assert_eq!(rows(&t), ["int 10.96.0.11:80/TCP -> (refuse)"], "{reason}");
            assert_eq!(skipped(&t), [format!("Service default/web: {reason}")]);
        }
    }

    // ---- session affinity ------------------------------------------------------------------

    #[test]
    fn c19_client_ip_affinity_defaults_to_10800_seconds_on_every_frontend() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1");
        let service = web()
            .type_("NodePort")
            .node_port(30080)
            .affinity("ClientIP", None);
        let t = translate(&[service], &[endpoints], &n1());
        assert_eq!(
            rows(&t),
            [
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP (affinity 10800s)",
                "ext 192.0.2.1:30080/TCP -> 10.0.0.1:80/TCP (affinity 10800s)",
                "int 192.0.2.1:30080/TCP -> 10.0.0.1:80/TCP (affinity 10800s)",
            ]
        );
        // One client, one endpoint, whichever address it uses: the frontends share the
        // ClusterIP frontend's entries.
        let cluster_ip = FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        };
        for f in t.state.frontends.values() {
            assert_eq!(f.affinity_group, Some(cluster_ip), "{}", f.key);
        }
        assert!(t.skipped.is_empty());
    }

    #[test]
    fn c20_client_ip_affinity_keeps_its_timeout() {
        for seconds in [2, 1, 86400] {
            let service = web().affinity("ClientIP", Some(seconds));
            assert_eq!(
                clean(&[service], &[]),
                [format!(
                    "int 10.96.0.10:80/TCP -> (refuse) (affinity {seconds}s)"
                )]
            );
        }
        // An empty sessionAffinityConfig gets the default, as the API server would default it.
        let mut service = web().affinity("ClientIP", None);
        spec(&mut service).session_affinity_config = Some(core::SessionAffinityConfig::default());
        assert_eq!(
            clean(&[service], &[]),
            ["int 10.96.0.10:80/TCP -> (refuse) (affinity 10800s)"]
        );
    }

    #[test]
    fn c20_affinity_timeout_out_of_range_skips_the_service() {
        for seconds in [0, -1, 86401] {
            let t = translate(&[web().affinity("ClientIP", Some(seconds))], &[], &n1());
            assert_eq!(rows(&t), Vec::<String>::new());
            assert_eq!(
                skipped(&t),
                [format!(
                    "Service default/web: sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is out of range 1-86400"
                )]
            );
        }
    }

    #[test]
    fn c21_switching_affinity_changes_only_the_timeout() {
        let endpoints = [slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1")];
        let states = [
            (web(), "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"),
            (
                web().affinity("None", Some(60)),
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
            ),
            (
                web().affinity("ClientIP", Some(60)),
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP (affinity 60s)",
            ),
            (
                web().affinity("None", None),
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
            ),
        ];
        for (service, want) in states {
            assert_eq!(clean(&[service], &endpoints), [want]);
        }
    }

    // ---- publishNotReadyAddresses ----------------------------------------------------------

    /// The EndpointSlice controller publishes every endpoint of such a Service as ready
    /// (serving still follows the pod); kube-proxy reads only the slice.
    #[test]
    fn c28_publish_not_ready_addresses_serves_what_the_slice_marks_ready() {
        let service = web().publish_not_ready_addresses();
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .endpoint(&["10.0.0.1"], conditions(true, false, false))
            .not_ready("10.0.0.2");
        assert_eq!(
            clean(&[service], &[endpoints]),
            ["int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP"]
        );
    }

    // ---- topology hints --------------------------------------------------------------------

    #[test]
    fn c29_topology_hints_as_kube_proxy_reads_them() {
        let zone = |hinted: &[(&str, &[&str])]| {
            hinted.iter().fold(
                slice("default", "web-1", "web").port("http", 80, "TCP"),
                |slice, (addr, zones)| {
                    let slice = slice.ready(addr);
                    if zones.is_empty() {
                        slice
                    } else {
                        slice.for_zones(zones)
                    }
                },
            )
        };
        let unknown_zone = NodeInfo { zone: None, ..n1() };
        let cases = [
            (
                "every ready endpoint hinted, some for our zone: only those",
                n1(),
                zone(&[
                    ("10.0.0.1", &["zone-a"]),
                    ("10.0.0.2", &["zone-b"]),
                    ("10.0.0.3", &["zone-b", "zone-a"]),
                ]),
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP, 10.0.0.3:80/TCP",
            ),
            (
                "one ready endpoint without hints: all",
                n1(),
                zone(&[("10.0.0.1", &["zone-a"]), ("10.0.0.2", &[])]),
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP, 10.0.0.2:80/TCP",
            ),
            (
                "no endpoint hinted for our zone: all",
                n1(),
                zone(&[("10.0.0.1", &["zone-b"]), ("10.0.0.2", &["zone-c"])]),
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP, 10.0.0.2:80/TCP",
            ),
            (
                "our zone unknown: all",
                unknown_zone,
                zone(&[("10.0.0.1", &["zone-a"]), ("10.0.0.2", &["zone-b"])]),
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP, 10.0.0.2:80/TCP",
            ),
            (
                "endpoints that are not ready need no hints",
                n1(),
                zone(&[("10.0.0.1", &["zone-a"]), ("10.0.0.2", &["zone-b"])])
                    .serving_terminating("10.0.0.3")
                    .not_ready("10.0.0.4"),
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
            ),
            (
                "a node hint for us on one ready endpoint only: zone hints decide",
                n1(),
                zone(&[("10.0.0.1", &["zone-a"]), ("10.0.0.2", &["zone-b"])]).for_nodes(&["n1"]),
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
            ),
            (
                "node hints on every ready endpoint, none for us: zone hints decide",
                n1(),
                slice("default", "web-1", "web")
                    .port("http", 80, "TCP")
                    .ready("10.0.0.1")
                    .for_zones(&["zone-a"])
                    .for_nodes(&["n2"])
                    .ready("10.0.0.2")
                    .for_zones(&["zone-b"])
                    .for_nodes(&["n3"]),
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
            ),
            (
                "only serving-terminating endpoints: the fallback ignores hints",
                n1(),
                slice("default", "web-1", "web")
                    .port("http", 80, "TCP")
                    .serving_terminating("10.0.0.1")
                    .for_zones(&["zone-b"])
                    .serving_terminating("10.0.0.2")
                    .for_zones(&["zone-a"]),
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP, 10.0.0.2:80/TCP",
            ),
        ];
        for (case, node, endpoints, want) in cases {
            assert_eq!(clean_on(&node, &[web()], &[endpoints]), [want], "{case}");
        }
    }

    #[test]
    fn c29_node_hints_for_this_node_select_its_endpoints() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1")
            .for_nodes(&["n2"])
            .for_zones(&["zone-a"])
            .ready("10.0.0.2")
            .for_nodes(&["n1"])
            .for_zones(&["zone-b"]);
        assert_eq!(
            clean(&[web()], &[endpoints]),
            ["int 10.96.0.10:80/TCP -> 10.0.0.2:80/TCP"]
        );
    }

    /// Hints shape the cluster view wherever it is used (ClusterIP, and external traffic under
    /// policy Cluster), never the local view.
    #[test]
    fn c29_hints_do_not_apply_to_local_traffic_policies() {
        let endpoints = slice("default", "web-1", "web")
            .port("http", 80, "TCP")
            .ready("10.0.0.1")
            .on("n2")
            .for_zones(&["zone-a"])
            .ready("10.0.0.2")
            .on("n1")
            .for_zones(&["zone-b"]);
        let service = web()
            .type_("NodePort")
            .node_port(30080)
            .internal_traffic_policy("Local");
        assert_eq!(
            clean(slice::from_ref(&service), slice::from_ref(&endpoints)),
            [
                "int 10.96.0.10:80/TCP -> 10.0.0.2:80/TCP",
                "ext 192.0.2.1:30080/TCP -> 10.0.0.1:80/TCP",
                "int 192.0.2.1:30080/TCP -> 10.0.0.1:80/TCP",
            ]
        );
        let external_local = service
            .internal_traffic_policy("Cluster")
            .external_traffic_policy("Local");
        assert_eq!(
            clean(&[external_local], &[endpoints]),
            [
                "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP",
                "ext 192.0.2.1:30080/TCP -> 10.0.0.2:80/TCP",
                "int 192.0.2.1:30080/TCP -> 10.0.0.1:80/TCP",
            ]
        );
    }

    // ---- node info -------------------------------------------------------------------------

    fn node_object(addresses: &[(&str, &str)], zone: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                labels: zone
                    .map(|zone| BTreeMap::from([(LABEL_TOPOLOGY_ZONE.into(), zone.into())])),
                ..ObjectMeta::default()
            },
            status: Some(core::NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|&(type_, address)| core::NodeAddress {
                            type_: type_.into(),
                            address: address.into(),
                        })
                        .collect(),
                ),
                ..core::NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    fn typical_node() -> Node {
        node_object(
            &[
                ("InternalIP", "10.1.0.5"),
                ("ExternalIP", "192.0.2.1"),
                ("InternalIP", "fd00::5"),
                ("Hostname", "n1"),
                ("InternalDNS", "n1.internal"),
                ("InternalIP", "10.1.0.05"),
                ("ExternalIP", "not-an-ip"),
            ],
            Some("zone-a"),
        )
    }

    #[test]
    fn node_info_reads_the_ipv4_node_addresses_and_the_zone() {
        assert_eq!(
            node_info("n1", Some(&typical_node()), &NodePortAddresses::All, &[]),
            NodeInfo {
                name: "n1".into(),
                zone: Some("zone-a".into()),
                node_port_addresses: vec![Ipv4Addr::new(10, 1, 0, 5), Ipv4Addr::new(192, 0, 2, 1)],
                own_addresses: vec![Ipv4Addr::new(10, 1, 0, 5), Ipv4Addr::new(192, 0, 2, 1)],
                external_cluster_ips: false,
                socket_external_ips: SocketExternalIps::default(),
                localhost_node_ports: false,
            }
        );
    }

    /// The node's own addresses keep the Node's order, InternalIPs first (the first one a
    /// device carries is the SNAT address), whatever sorts first; each once.
    #[test]
    fn node_info_keeps_the_own_addresses_internal_first() {
        let node = node_object(
            &[
                ("ExternalIP", "5.6.7.8"),
                ("InternalIP", "10.0.0.5"),
                ("Hostname", "n1"),
                ("InternalIP", "10.0.0.4"),
                ("ExternalIP", "10.0.0.5"),
            ],
            None,
        );
        assert_eq!(
            node_info("n1", Some(&node), &NodePortAddresses::All, &[]).own_addresses,
            [
                Ipv4Addr::new(10, 0, 0, 5),
                Ipv4Addr::new(10, 0, 0, 4),
                Ipv4Addr::new(5, 6, 7, 8),
            ]
        );
    }

    #[test]
    fn node_info_keeps_the_addresses_the_nodeport_addresses_admit() {
        let internal = Ipv4Addr::new(10, 1, 0, 5);
        let external = Ipv4Addr::new(192, 0, 2, 1);
        let within = |cidrs: &[&str]| NodePortAddresses::parse(cidrs).expect("valid");
        let cases: [(&str, NodePortAddresses, Vec<Ipv4Addr>); 8] = [
            ("no CIDR: all", within(&[]), vec![internal, external]),
            (
                "0.0.0.0/0: all",
                within(&["0.0.0.0/0"]),
                vec![internal, external],
            ),
            (
                "IPv6 CIDRs only: all IPv4 addresses, as kube-proxy's IPv4 proxier",
                within(&["fd00::/8"]),
                vec![internal, external],
            ),
            (
                "one /8",
                within(&["10.0.0.0/8", "fd00::/8"]),
                vec![internal],
            ),
            ("a /32", within(&["192.0.2.1/32"]), vec![external]),
            (
                "host bits are ignored",
                within(&["192.0.2.77/24"]),
                vec![external],
            ),
            ("no address inside", within(&["172.16.0.0/12"]), vec![]),
            (
                "primary: the first InternalIP",
                NodePortAddresses::Primary,
                vec![internal],
            ),
        ];
        for (case, node_ports, want) in cases {
            assert_eq!(
                node_info("n1", Some(&typical_node()), &node_ports, &[]).node_port_addresses,
                want,
                "{case}"
            );
        }
        // Without an IPv4 InternalIP, the primary address is the first IPv4 ExternalIP.
        let external_only = node_object(
            &[
                ("ExternalIP", "fd00::9"),
                ("ExternalIP", "203.0.113.9"),
                ("ExternalIP", "203.0.113.1"),
                ("InternalIP", "fd00::5"),
            ],
            None,
        );
        assert_eq!(
            node_info("n1", Some(&external_only), &NodePortAddresses::Primary, &[])
                .node_port_addresses,
            [Ipv4Addr::new(203, 0, 113, 9)]
        );
    }

    /// kube-proxy serves NodePorts on the host's interface addresses (`--dst-type LOCAL`,
    /// or those within `--nodeport-addresses`): a second NIC's address or a kube-vip
    /// address that the Node does not list serves them too, also before the Node is read;
    /// `primary` stays the Node's.
    #[test]
    fn node_info_serves_nodeports_on_the_hosts_addresses_too() {
        let internal = Ipv4Addr::new(10, 1, 0, 5);
        let external = Ipv4Addr::new(192, 0, 2, 1);
        let second_nic = Ipv4Addr::new(172, 16, 3, 4);
        let host = [internal, second_nic];
        let within = |cidrs: &[&str]| NodePortAddresses::parse(cidrs).expect("valid");
        let cases: [(&str, NodePortAddresses, Vec<Ipv4Addr>); 4] = [
            ("all", within(&[]), vec![internal, second_nic, external]),
            (
                "a CIDR holding only the NIC",
                within(&["172.16.0.0/12"]),
                vec![second_nic],
            ),
            (
                "a CIDR holding only the Node's",
                within(&["10.0.0.0/8"]),
                vec![internal],
            ),
            ("primary", NodePortAddresses::Primary, vec![internal]),
        ];
        for (case, node_ports, want) in cases {
            assert_eq!(
                node_info("n1", Some(&typical_node()), &node_ports, &host).node_port_addresses,
                want,
                "{case}"
            );
        }
        assert_eq!(
            node_info("n1", None, &within(&["172.16.0.0/12"]), &host).node_port_addresses,
            [second_nic],
            "without a Node object"
        );
        assert_eq!(
            node_info("n1", None, &NodePortAddresses::Primary, &host).node_port_addresses,
            Vec::<Ipv4Addr>::new()
        );
        // The Node's own addresses (SNAT, devices) are still the Node's alone.
        assert_eq!(
            node_info("n1", Some(&typical_node()), &within(&[]), &host).own_addresses,
            [internal, external]
        );
    }

    #[test]
    fn nodeport_addresses_parse_like_kube_proxys_flag() {
        let parse = |values: &[&str]| NodePortAddresses::parse(values);
        assert_eq!(parse(&[]), Ok(NodePortAddresses::All));
        assert_eq!(parse(&["primary"]), Ok(NodePortAddresses::Primary));
        assert_eq!(
            parse(&["10.0.0.0/8", "2001:db8::/32"]),
            Ok(NodePortAddresses::Within(vec![(
                Ipv4Addr::new(10, 0, 0, 0),
                8
            )]))
        );
        assert_eq!(parse(&["2001:db8::/32"]), Ok(NodePortAddresses::All));
        for bad in [
            &["primary", "10.0.0.0/8"][..],
            &["10.0.0.0/8", "primary"],
            &["10.0.0.0"],
            &["10.0.0.0/33"],
            &["2001:db8::/129"],
            &["primary/8"],
            &["0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn node_info_without_zone_label_or_node_object() {
        let unlabelled = node_object(&[("InternalIP", "10.1.0.5")], None);
        assert_eq!(
            node_info("n1", Some(&unlabelled), &NodePortAddresses::All, &[]).zone,
            None
        );
        let empty_label = node_object(&[("InternalIP", "10.1.0.5")], Some(""));
        assert_eq!(
            node_info("n1", Some(&empty_label), &NodePortAddresses::All, &[]).zone,
            None
        );
        assert_eq!(
            node_info("n1", None, &NodePortAddresses::All, &[]),
            NodeInfo {
                name: "n1".into(),
                zone: None,
                node_port_addresses: vec![],
                own_addresses: vec![],
                external_cluster_ips: false,
                socket_external_ips: SocketExternalIps::default(),
                localhost_node_ports: false,
            }
        );
    }
}
