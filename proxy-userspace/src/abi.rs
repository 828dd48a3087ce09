//! Conversions between the model's values and the map ABI of `proxy-common`
//! (addresses and ports in network order, as the socket hooks see them).

use std::net::Ipv4Addr;

use proxy_common::{
    BACKEND_FLAG_LOCAL, BackendValue, RevNatValue, SOURCE_RANGE_PREFIX_BASE, ServiceKey,
    SourceRangeKey,
};

use crate::model::{BackendAddr, FrontendKey, Protocol, Scope, SourceRange};

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

/// The `ekp_srcrange_v1` key (prefix length, data) of one source range of the frontend
/// with `rev_nat_id`.
pub fn source_range_key(rev_nat_id: u16, range: &SourceRange) -> (u32, SourceRangeKey) {
    (
        SOURCE_RANGE_PREFIX_BASE + u32::from(range.prefix),
        SourceRangeKey {
            rev_nat_id,
            _pad: [0; 2],
            addr: addr_to_net(range.addr),
        },
    )
}

/// (rev-NAT id, range) of an `ekp_srcrange_v1` key; `None` for a prefix this version
/// never writes.
pub fn source_range_of(prefix_len: u32, data: SourceRangeKey) -> Option<(u16, SourceRange)> {
    let prefix = prefix_len.checked_sub(SOURCE_RANGE_PREFIX_BASE)?;
    let prefix = u8::try_from(prefix).ok().filter(|p| *p <= 32)?;
    Some((
        data.rev_nat_id,
        SourceRange::new(addr_from_net(data.addr), prefix),
    ))
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

    #[test]
    fn source_range_keys_round_trip() {
        let range = SourceRange::new(Ipv4Addr::new(10, 1, 0, 0), 16);
        let (prefix_len, data) = source_range_key(7, &range);
        assert_eq!(prefix_len, 48);
        assert_eq!(data.addr.to_ne_bytes(), [10, 1, 0, 0]);
        assert_eq!(source_range_of(prefix_len, data), Some((7, range)));
        assert_eq!(source_range_of(20, data), None);
        assert_eq!(source_range_of(65, data), None);
    }
}
