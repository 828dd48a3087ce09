//! What the socket programs may intercept beyond kube-proxy's minimum.
//!
//! CVE-2020-8554: whoever may create a Service may list any address as an externalIP (say,
//! a public DNS server) and kube-proxy then captures every pod's traffic to it. At the socket
//! layer that capture would be silent and node-wide, so by default an externalIP frontend is
//! only served to processes and pods of this node (the internal scope) when the address
//! belongs to this node (the Node lists it, or a device of the node carries it). Traffic
//! from pods to other externalIPs leaves the node as addressed
//! and is served where it arrives (the north-south path of the node that owns the address).
//! `--socket-lb-external-ips` restores kube-proxy's behaviour.

use std::net::Ipv4Addr;

/// Which externalIP frontends the socket programs serve to this node's processes and pods.
/// Translate asks before a frontend claims its key: a frontend left out must not keep a key
/// from another Service (an externalIP on a ClusterIP's address and port would otherwise
/// win it and then be dropped, leaving the ClusterIP served by no one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketExternalIps {
    /// Only those on one of these addresses of this node (the Node's and its devices'):
    /// the agent's default.
    OwnAddresses(Vec<Ipv4Addr>),
    /// Every one, as kube-proxy does (`--socket-lb-external-ips`).
    All,
}

/// None until the node's addresses are known.
impl Default for SocketExternalIps {
    fn default() -> Self {
        SocketExternalIps::OwnAddresses(Vec::new())
    }
}

impl SocketExternalIps {
    /// Whether an internal-scope externalIP frontend on `addr` is served.
    pub fn serves(&self, addr: Ipv4Addr) -> bool {
        match self {
            SocketExternalIps::OwnAddresses(own) => own.contains(&addr),
            SocketExternalIps::All => true,
        }
    }
}
