//! Conversions between the model's values and the map ABI of `proxy-common`
//! (addresses and ports in network order, as the socket hooks see them).

use std::net::Ipv4Addr;

use proxy_common::{BACKEND_FLAG_LOCAL, BackendValue, RevNatValue, ServiceKey};

use crate::model::{BackendAddr, FrontendKey, Protocol, Scope};

/// An IPv4 address as the kernel stores it: the four octets in memory order.
pub fn addr_to_net(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn addr_from_net(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

pub fn port_to_net(port: u16) -> u16 {
    port.to_be()
}

pub fn port_from_net(raw: u16) -> u16 {
    u16::from_be(raw)
}

pub fn service_key(frontend: &FrontendKey, slot: u16) -> ServiceKey {
    ServiceKey {
        addr: addr_to_net(frontend.addr),
        port: port_to_net(frontend.port),
        slot,
        proto: frontend.proto.number(),
        scope: frontend.scope.number(),
        _pad: [0; 2],
    }
}

/// The frontend a services-map key belongs to; `None` for keys this version cannot read.
pub fn frontend_of(key: &ServiceKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        addr: addr_from_net(key.addr),
        port: port_from_net(key.port),
        proto: Protocol::from_number(key.proto)?,
        scope: Scope::from_number(key.scope)?,
    })
}

/// The backends-map value of `backend`; `local` (its endpoint runs on this node) sets
/// `BACKEND_FLAG_LOCAL`, which spares its north-south traffic the SNAT.
pub fn backend_value(backend: &BackendAddr, local: bool) -> BackendValue {
    BackendValue {
        addr: addr_to_net(backend.addr),
        port: port_to_net(backend.port),
        proto: backend.proto.number(),
        flags: if local { BACKEND_FLAG_LOCAL } else { 0 },
    }
}

/// Whether a backends-map value carries `BACKEND_FLAG_LOCAL`.
pub fn backend_is_local(value: &BackendValue) -> bool {
    value.flags & BACKEND_FLAG_LOCAL != 0
}

/// The backend a backends-map value names; its `flags` are not part of the identity.
pub fn backend_of(value: &BackendValue) -> Option<BackendAddr> {
    Some(BackendAddr {
        addr: addr_from_net(value.addr),
        port: port_from_net(value.port),
        proto: Protocol::from_number(value.proto)?,
    })
}

pub fn rev_nat_value(frontend: &FrontendKey) -> RevNatValue {
    RevNatValue {
        addr: addr_to_net(frontend.addr),
        port: port_to_net(frontend.port),
        _pad: [0; 2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_ports_are_stored_in_network_order() {
        let key = service_key(
            &FrontendKey {
                addr: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                proto: Protocol::Tcp,
                scope: Scope::Internal,
            },
            3,
        );
        // The bytes in memory must read as on the wire: 10.96.0.10, then 0x0050.
        assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(key.slot, 3);
        assert_eq!(
            frontend_of(&key).map(|f| (f.addr, f.port)),
            Some((Ipv4Addr::new(10, 96, 0, 10), 80))
        );
    }

    #[test]
    fn unknown_protocol_or_scope_is_not_misread() {
        let mut key = ServiceKey {
            proto: 132,
            ..Default::default()
        };
        assert_eq!(frontend_of(&key), None);
        key.proto = proxy_common::PROTO_TCP;
        key.scope = 9;
        assert_eq!(frontend_of(&key), None);
    }
}
