//! The desired dataplane state: what `translate` produces and `sync` applies.
//!
//! Plain values with a total order, so that two states can be diffed
//! deterministically and printed the same way every time.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use crate::safety::SocketExternalIps;

/// L4 protocol of a frontend or backend. SCTP is not served (skipped by translate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number, as stored in the maps.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::PROTO_TCP,
            Protocol::Udp => proxy_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::PROTO_TCP => Some(Protocol::Tcp),
            proxy_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Which view of a Service a lookup wants.
///
/// `Internal` is the east-west view used by the socket programs (ClusterIP, and pods or the
/// node reaching NodePorts/LB IPs); `External` is what the TCX programs use for traffic
/// arriving from outside the node. kube-proxy computes the two endpoint sets independently
/// (internal/external traffic policy), so they are separate map entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    External,
    Internal,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Scope::External => proxy_common::SCOPE_EXTERNAL,
            Scope::Internal => proxy_common::SCOPE_INTERNAL,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::SCOPE_EXTERNAL => Some(Scope::External),
            proxy_common::SCOPE_INTERNAL => Some(Scope::Internal),
            _ => None,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::External => "external",
            Scope::Internal => "internal",
        })
    }
}

/// What kind of Service address a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    /// The flag bit stored in the frontend's slot 0.
    pub fn flag(self) -> u16 {
        match self {
            FrontendKind::ClusterIp => proxy_common::SVC_FLAG_CLUSTER_IP,
            FrontendKind::NodePort => proxy_common::SVC_FLAG_NODE_PORT,
            FrontendKind::ExternalIp => proxy_common::SVC_FLAG_EXTERNAL_IP,
            FrontendKind::LoadBalancer => proxy_common::SVC_FLAG_LOAD_BALANCER,
        }
    }

    pub fn from_flags(flags: u16) -> Option<Self> {
        [
            FrontendKind::ClusterIp,
            FrontendKind::NodePort,
            FrontendKind::ExternalIp,
            FrontendKind::LoadBalancer,
        ]
        .into_iter()
        .find(|k| flags & k.flag() != 0)
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        })
    }
}

/// Address, port and protocol a client connects to, in one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
    pub scope: Scope,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// A backend (one endpoint address on one target port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// `namespace/name:port-name`, kube-proxy's ServicePortName.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's `name` (empty for a single unnamed port).
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// What a frontend without backends does with a connection. kube-proxy tells "nothing
/// to reach anywhere" (REJECT) apart from "nothing to reach from this node under a `Local`
/// policy" (DROP), and clients see the difference: an error at once versus a timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WhenEmpty {
    /// No usable endpoint at all: kube-proxy REJECTs, the client gets ECONNREFUSED (a TCP
    /// RST or an ICMP port unreachable on the wire).
    Refuse,
    /// A `Local` traffic policy whose endpoints are all on other nodes: kube-proxy DROPs,
    /// so that a load balancer's health check, not a refusal, steers traffic elsewhere.
    Drop,
}

/// One desired frontend and the backends it balances over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    pub kind: FrontendKind,
    pub service: ServicePortName,
    /// Sorted and de-duplicated. Empty means "no usable endpoint": see `when_empty`.
    pub backends: Vec<BackendAddr>,
    /// Endpoints of the Service port that take no new flow here but keep the flows they
    /// have, as kube-proxy leaves their conntrack entries: for TCP every endpoint still
    /// listed, for UDP every serving one (draining, not ready, or left out by topology or a
    /// `Local` policy), every listed one while none serves. Sorted, de-duplicated, none of them in `backends`; internal scope
    /// only (see `translate`).
    pub lingering: Vec<BackendAddr>,
    /// What to do while `backends` is empty. Always `Refuse` when there are backends, so
    /// that two equal states compare equal.
    pub when_empty: WhenEmpty,
    /// `sessionAffinity: ClientIP` timeout in seconds (1..=86400): a client keeps its
    /// backend while it reconnects within this time. `None` for affinity `None`.
    pub affinity_timeout: Option<u32>,
    /// With affinity: the ClusterIP frontend of the same Service port (itself, for that
    /// one), whose rev-NAT id names the affinity entries all frontends of the port share,
    /// as kube-proxy keeps a client's endpoint per Service port, whichever address it used.
    /// `None` without affinity, or without an IPv4 ClusterIP frontend (the frontend's own
    /// entries then).
    pub affinity_group: Option<FrontendKey>,
    /// `loadBalancerSourceRanges` of an external-scope LB IP frontend, sorted and
    /// de-duplicated: new flows from other clients are dropped (C22). Empty: no filter.
    pub source_ranges: Vec<SourceRange>,
    /// The address is one of the node's own (`SVC_FLAG_NODE_ADDRESS`).
    pub at_node_address: bool,
}

impl Frontend {
    /// What the frontend's slots hold: its backends (slots `1..=count`), then its lingering
    /// ones (the slots after `count`, which the programs never choose from).
    pub fn slotted(&self) -> impl Iterator<Item = &BackendAddr> + Clone {
        self.backends.iter().chain(&self.lingering)
    }
}

/// An IPv4 CIDR of `loadBalancerSourceRanges`, host bits cleared (`10.1.2.3/8` is
/// `10.0.0.0/8`, as Go's `ParseCIDR` reads it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl SourceRange {
    /// The range of `addr/prefix` (`prefix` at most 32).
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        SourceRange {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        }
    }
}

impl fmt::Display for SourceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What translate needs to know about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's name, compared with an endpoint's `nodeName` (traffic policy `Local`) and
    /// with `hints.forNodes` (topology).
    pub name: String,
    /// The Node's `topology.kubernetes.io/zone` label, compared with `hints.forZones`.
    /// `None` when the label is missing or empty: zone hints are then never used.
    pub zone: Option<String>,
    /// The IPv4 addresses NodePorts are served on (kube-proxy's `--nodeport-addresses`
    /// applied to the node's addresses), sorted; one NodePort frontend per address.
    pub node_port_addresses: Vec<Ipv4Addr>,
    /// The Node's own IPv4 addresses, every `InternalIP` and then every `ExternalIP`, in the
    /// Node's order (the first one a device carries is the SNAT address, as Cilium picks
    /// it): an endpoint at one of them is served on this node whatever its `nodeName` says.
    pub own_addresses: Vec<Ipv4Addr>,
    /// ClusterIPs are served to traffic from outside the node too (`--external-clusterip`):
    /// each ClusterIP frontend gets an external-scope twin, as kube-proxy's rules match a
    /// ClusterIP whatever the packet's source.
    pub external_cluster_ips: bool,
    /// Which externalIPs this node's processes and pods reach through the socket programs
    /// (CVE-2020-8554, `safety`).
    pub socket_external_ips: SocketExternalIps,
    /// NodePorts are served on the node's loopback addresses too, to its own processes
    /// (kube-proxy's `--iptables-localhost-nodeports` where `--nodeport-addresses` admits
    /// `127.0.0.1`): an internal-scope frontend at `127.0.0.1` per NodePort.
    pub localhost_node_ports: bool,
}

/// Everything the dataplane should hold, keyed by frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// The backends (among those the frontends use) whose endpoint runs on this node
    /// (`nodeName` is this node's name, or the address is one of the node's own). The
    /// north-south programs source-NAT traffic to the others so that their replies come
    /// back through this node (C08), and keep the client's address for these (C10).
    pub local_backends: BTreeSet<BackendAddr>,
}

/// An input object that was left out of the desired state, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    /// `Service default/web` or `EndpointSlice default/web-abc12`.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}
