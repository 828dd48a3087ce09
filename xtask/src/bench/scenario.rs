//! The Services of one benchmark point: N Services with two endpoints each. The last one is
//! the measured Service, with a UDP and a TCP port (TCP last), so that it is the last
//! Service rule kube-proxy's iptables mode evaluates: the worst case, as in kube-proxy's
//! own scale tests. It is of type NodePort (`externalTrafficPolicy: Cluster`), so that an
//! external client reaches it too; the N-1 others are ClusterIP Services, whose endpoints
//! are addresses nobody serves (they are never connected to). A NodePort packet still
//! walks every ClusterIP rule of `KUBE-SERVICES` before the `KUBE-NODEPORTS` jump, so its
//! cost grows with N the same way.
//!
//! The external client connects to a TCP port of its own (`external`, to the pods'
//! `EXTERNAL_TARGET_PORT`). kube-proxy masquerades NodePort traffic to the node's address,
//! the address the node's own ClusterIP clients connect from, and the pods' servers close
//! first, keeping TIME_WAIT sockets. With one server port for both, a SYN of one stream
//! could meet the TIME_WAIT socket of the other's connection with the same 4-tuple
//! (unrelated timestamps): the pod did not accept it and the client sent it again, a sample of
//! several milliseconds. That was the bench's own traffic colliding, not what a metric
//! measures. Masqueraded NodePort connections can still meet their own stream's TIME_WAIT
//! sockets (masquerade picks random ports): that is kube-proxy's behaviour, and counted
//! (`syn_retransmits`).
//!
//! Its `remote` port (TCP, a NodePort of its own, before `tcp`) has its endpoints on
//! another node, in an EndpointSlice of their own (kube-proxy merges a Service's slices by
//! port name): the node source-NATs what it forwards to them in every mode (kube-proxy
//! masquerades all NodePort traffic of `externalTrafficPolicy: Cluster`, this project only
//! the traffic to endpoints on other nodes).

use std::net::Ipv4Addr;

/// The namespace of every benchmark Service.
pub const NAMESPACE: &str = "bench";
/// The measured Service's name and ClusterIP (the same at every N).
pub const MEASURED_NAME: &str = "measured";
pub const MEASURED_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 10);
/// Service port and the pods' target port, TCP and UDP alike.
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// The measured Service's NodePort on its `udp` and `tcp` ports (every port of a NodePort
/// Service has one).
pub const NODE_PORT: u16 = 30080;
/// The `external` port (TCP): the one the external client connects to, by its NodePort.
pub const EXTERNAL_SERVICE_PORT: u16 = 81;
pub const EXTERNAL_TARGET_PORT: u16 = 8081;
pub const EXTERNAL_NODE_PORT: u16 = 30081;
/// The `remote` port (TCP), whose endpoints are on another node.
pub const REMOTE_SERVICE_PORT: u16 = 82;
pub const REMOTE_TARGET_PORT: u16 = 8082;
pub const REMOTE_NODE_PORT: u16 = 30082;
/// A TCP port of the pods that no Service exposes: the one the metric without a Service
/// connects to. The `iptables` and `nftables` ClusterIP clients connect to the pods' target
/// port through the Service address, from which their kernel derives a TCP timestamp offset
/// other than the pod address's: on one port, a SYN of one stream met the TIME_WAIT socket
/// of the other's connection with the same 4-tuple, was not accepted and was sent again.
pub const POD_PORT: u16 = 8083;
/// The `remote` port's endpoints: pods of another node, whose pod CIDR (10.244.1.0/24) is
/// inside the cluster CIDR.
pub const REMOTE_ENDPOINTS: [Ipv4Addr; 2] =
    [Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 244, 1, 11)];
/// The cluster (pod) CIDR: kube-proxy's local-traffic detector (`--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The service CIDR the filler ClusterIPs come from (and the route the iptables and
/// nftables clients get for it).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// Lower case, as kube-proxy writes it into rules (`-p tcp`, `meta l4proto tcp`).
    pub fn lower(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// As the Kubernetes API spells it.
    pub fn api(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: &'static str,
    pub proto: Proto,
    pub port: u16,
    pub target: u16,
    /// The NodePort, for a Service of type NodePort.
    pub node_port: Option<u16>,
    /// Served by the Service's endpoints on another node (`remote_endpoints`).
    pub remote: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<Port>,
    /// Ready endpoints on this node, in EndpointSlice order; the target port of every port
    /// but the `remote` ones on each.
    pub endpoints: Vec<Ipv4Addr>,
    /// Ready endpoints on another node, in a slice of their own: the `remote` ports'.
    pub remote_endpoints: Vec<Ipv4Addr>,
}

impl Service {
    /// kube-proxy's `ServicePortName.String()`: `namespace/name:port`.
    pub fn port_name(&self, port: &Port) -> String {
        format!("{}/{}:{}", self.namespace, self.name, port.name)
    }

    /// The endpoints of `port`, in EndpointSlice order.
    pub fn port_endpoints(&self, port: &Port) -> &[Ipv4Addr] {
        if port.remote {
            &self.remote_endpoints
        } else {
            &self.endpoints
        }
    }

    /// The endpoints of `port` in the order kube-proxy writes them: sorted as `ip:port`
    /// strings (its endpoint slice cache's `byEndpoint`), so `.10` comes before `.9`.
    pub fn endpoints_in_order(&self, port: &Port) -> Vec<Ipv4Addr> {
        let mut endpoints = self.port_endpoints(port).to_vec();
        endpoints.sort_by_cached_key(|ip| format!("{ip}:{}", port.target));
        endpoints
    }

    pub fn is_node_port(&self) -> bool {
        self.ports.iter().any(|p| p.node_port.is_some())
    }
}

/// Filler Service `i` (0-based): ClusterIP 10.96.0.0 + i + 1, endpoints in 10.248.0.0/14.
pub fn filler(i: usize) -> Service {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32 + 1);
    let base = u32::from(Ipv4Addr::new(10, 248, 0, 0)) + 2 * i as u32 + 1;
    Service {
        namespace: NAMESPACE.into(),
        name: format!("svc-{i:05}"),
        vip,
        ports: vec![Port {
            name: "http",
            proto: Proto::Tcp,
            port: SERVICE_PORT,
            target: TARGET_PORT,
            node_port: None,
            remote: false,
        }],
        endpoints: vec![Ipv4Addr::from(base), Ipv4Addr::from(base + 1)],
        remote_endpoints: Vec::new(),
    }
}

/// The measured Service with the given endpoints on this node (and `REMOTE_ENDPOINTS` on
/// another).
pub fn measured(endpoints: &[Ipv4Addr]) -> Service {
    Service {
        namespace: NAMESPACE.into(),
        name: MEASURED_NAME.into(),
        vip: MEASURED_VIP,
        ports: vec![
            Port {
                name: "udp",
                proto: Proto::Udp,
                port: SERVICE_PORT,
                target: TARGET_PORT,
                node_port: Some(NODE_PORT),
                remote: false,
            },
            Port {
                name: "external",
                proto: Proto::Tcp,
                port: EXTERNAL_SERVICE_PORT,
                target: EXTERNAL_TARGET_PORT,
                node_port: Some(EXTERNAL_NODE_PORT),
                remote: false,
            },
            Port {
                name: "remote",
                proto: Proto::Tcp,
                port: REMOTE_SERVICE_PORT,
                target: REMOTE_TARGET_PORT,
                node_port: Some(REMOTE_NODE_PORT),
                remote: true,
            },
            Port {
                name: "tcp",
                proto: Proto::Tcp,
                port: SERVICE_PORT,
                target: TARGET_PORT,
                node_port: Some(NODE_PORT),
                remote: false,
            },
        ],
        endpoints: endpoints.to_vec(),
        remote_endpoints: REMOTE_ENDPOINTS.to_vec(),
    }
}

/// N Services: N-1 fillers, then the measured one.
pub fn services(n: usize, measured_endpoints: &[Ipv4Addr]) -> Vec<Service> {
    let mut all: Vec<Service> = (0..n.saturating_sub(1)).map(filler).collect();
    all.push(measured(measured_endpoints));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measured_service_comes_last_and_fillers_do_not_collide() {
        let pods = [Ipv4Addr::new(10, 244, 0, 10), Ipv4Addr::new(10, 244, 0, 11)];
        let all = services(30000, &pods);
        assert_eq!(all.len(), 30000);
        assert_eq!(all.last().map(|s| s.name.as_str()), Some(MEASURED_NAME));
        let vips: std::collections::HashSet<_> = all.iter().map(|s| s.vip).collect();
        assert_eq!(vips.len(), all.len());
        let last_filler = &all[all.len() - 2];
        // Still inside 10.96.0.0/12 and away from the measured ClusterIP.
        assert!(last_filler.vip < Ipv4Addr::new(10, 100, 0, 0));
        assert!(last_filler.endpoints[1] < Ipv4Addr::new(10, 252, 0, 0));
        assert_eq!(services(1, &pods).len(), 1);
    }

    #[test]
    fn endpoints_are_ordered_as_kube_proxy_orders_them() {
        let svc = filler(4);
        assert_eq!(
            svc.endpoints,
            [Ipv4Addr::new(10, 248, 0, 9), Ipv4Addr::new(10, 248, 0, 10)]
        );
        assert_eq!(
            svc.endpoints_in_order(&svc.ports[0]),
            [Ipv4Addr::new(10, 248, 0, 10), Ipv4Addr::new(10, 248, 0, 9)]
        );
    }
}
