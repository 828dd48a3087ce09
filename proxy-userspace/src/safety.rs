//! What the socket programs may intercept beyond kube-proxy's minimum.
//!
//! CVE-2020-8554: whoever may create a Service may list any address as an externalIP (say,
//! a public DNS server) and kube-proxy then captures every pod's traffic to it. At the socket
//! layer that capture would be silent and node-wide, so by default an externalIP frontend is
//! only served to processes and pods of this node (the internal scope) when the address
//! belongs to this node. Traffic from pods to other externalIPs leaves the node as addressed
//! and is served where it arrives (the north-south path of the node that owns the address).
//! `--socket-lb-external-ips` restores kube-proxy's behaviour.

use std::net::Ipv4Addr;

use crate::model::{DesiredState, Frontend, FrontendKind, Scope};

/// Removes internal-scope externalIP frontends whose address is not one of `node_addresses`.
/// Returns how many were left out.
pub fn keep_external_ips_of_this_node(
    state: &mut DesiredState,
    node_addresses: &[Ipv4Addr],
) -> usize {
    let before = state.frontends.len();
    state.frontends.retain(|_, f| is_served(f, node_addresses));
    before - state.frontends.len()
}

/// Whether `keep_external_ips_of_this_node` keeps `frontend`.
pub fn is_served(frontend: &Frontend, node_addresses: &[Ipv4Addr]) -> bool {
    !(frontend.kind == FrontendKind::ExternalIp
        && frontend.key.scope == Scope::Internal
        && !node_addresses.contains(&frontend.key.addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frontend, FrontendKey, Protocol, ServicePortName, WhenEmpty};

    fn frontend(addr: [u8; 4], kind: FrontendKind, scope: Scope) -> Frontend {
        Frontend {
            key: FrontendKey {
                addr: Ipv4Addr::from(addr),
                port: 53,
                proto: Protocol::Udp,
                scope,
            },
            kind,
            service: ServicePortName {
                namespace: "default".into(),
                name: "dns".into(),
                port: String::new(),
            },
            backends: Vec::new(),
            lingering: Vec::new(),
            when_empty: WhenEmpty::Refuse,
            affinity_timeout: None,
            affinity_group: None,
            source_ranges: Vec::new(),
        }
    }

    #[test]
    fn cve_2020_8554_foreign_external_ips_are_not_captured_at_the_socket_layer() {
        let node = Ipv4Addr::new(192, 0, 2, 1);
        let rows = [
            (
                [8, 8, 8, 8],
                FrontendKind::ExternalIp,
                Scope::Internal,
                false,
            ),
            (
                [8, 8, 8, 8],
                FrontendKind::ExternalIp,
                Scope::External,
                true,
            ),
            (
                [192, 0, 2, 1],
                FrontendKind::ExternalIp,
                Scope::Internal,
                true,
            ),
            (
                [10, 96, 0, 10],
                FrontendKind::ClusterIp,
                Scope::Internal,
                true,
            ),
            (
                [203, 0, 113, 7],
                FrontendKind::LoadBalancer,
                Scope::Internal,
                true,
            ),
        ];
        for (addr, kind, scope, kept) in rows {
            let f = frontend(addr, kind, scope);
            let mut state = DesiredState::default();
            state.frontends.insert(f.key, f);
            let removed = keep_external_ips_of_this_node(&mut state, &[node]);
            assert_eq!(state.frontends.len() == 1, kept, "{addr:?} {kind} {scope}");
            assert_eq!(removed, usize::from(!kept));
        }
    }
}
