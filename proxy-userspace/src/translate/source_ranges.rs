//! `spec.loadBalancerSourceRanges` as kube-proxy reads them (`newBaseServiceInfo`): each
//! entry trimmed (validation lets whitespace padding through), parsed sloppily like an
//! address (leading zeros allowed), host bits cleared; IPv6 ranges belong to the other
//! family's proxier and are left out silently; an entry that is not a CIDR is ignored with
//! an error naming the Service, the others still apply.
//!
//! They filter only the LoadBalancer ingress IPs (kube-proxy's firewall chain, BEHAVIOUR
//! C22), not NodePorts or externalIPs, and only traffic from outside the node: the socket
//! programs see no source address at `connect()`, so pods and the node itself reach the LB
//! IP unfiltered, as with Cilium's socket LB (docs/decisions.md).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::ServiceSpec;

use super::{parse_ip_sloppy, skip};
use crate::model::{Skipped, SourceRange};

/// The IPv4 source ranges of `spec`, sorted and de-duplicated. Empty: no filter.
pub(super) fn of(spec: &ServiceSpec, object: &str, skipped: &mut Vec<Skipped>) -> Vec<SourceRange> {
    let mut ranges = Vec::new();
    for entry in spec.load_balancer_source_ranges.iter().flatten() {
        let text = entry.trim();
        if text.is_empty() {
            continue;
        }
        match parse_cidr(text) {
            Some((IpAddr::V4(addr), prefix)) if prefix <= 32 => {
                ranges.push(SourceRange::new(addr, prefix))
            }
            Some((IpAddr::V6(_), prefix)) if prefix <= 128 => {}
            _ => skipped.push(skip(
                object,
                format!("loadBalancerSourceRanges entry {entry:?} is not a CIDR: ignored"),
            )),
        }
    }
    ranges.sort();
    ranges.dedup();
    ranges
}

/// `address/prefix` with the address read like Kubernetes reads addresses.
fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (address, prefix) = text.split_once('/')?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 3 {
        return None;
    }
    let prefix: u8 = prefix.parse().ok()?;
    let address = match parse_ip_sloppy(address)? {
        // An IPv4-mapped IPv6 CIDR is an IPv6 range to Go's ParseCIDR.
        IpAddr::V4(_) if address.contains(':') => IpAddr::V6(address.parse().ok()?),
        other => other,
    };
    Some((address, prefix))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ranges(entries: &[&str]) -> (Vec<String>, Vec<Skipped>) {
        let spec = ServiceSpec {
            load_balancer_source_ranges: Some(entries.iter().map(|e| e.to_string()).collect()),
            ..ServiceSpec::default()
        };
        let mut skipped = Vec::new();
        let got = of(&spec, "Service default/lb", &mut skipped);
        (got.iter().map(ToString::to_string).collect(), skipped)
    }

    #[test]
    fn reads_ranges_like_kube_proxy() {
        let (got, skipped) = ranges(&[
            " 10.1.0.0/16 ",
            "192.168.7.9/24",
            "172.016.0.0/12",
            "203.0.113.5/32",
            "10.1.0.0/16",
            "fd00::/8",
            "0.0.0.0/0",
        ]);
        assert_eq!(
            got,
            [
                "0.0.0.0/0",
                "10.1.0.0/16",
                "172.16.0.0/12",
                "192.168.7.0/24",
                "203.0.113.5/32"
            ]
        );
        assert!(skipped.is_empty(), "{skipped:?}");
    }

    #[test]
    fn invalid_entries_are_named_and_the_rest_apply() {
        let (got, skipped) = ranges(&["10.0.0.0/33", "10.0.0.0", "nonsense/8", "10.2.0.0/16", ""]);
        assert_eq!(got, ["10.2.0.0/16"]);
        let reasons: Vec<&str> = skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(skipped.iter().all(|s| s.object == "Service default/lb"));
        assert!(reasons[0].contains("\"10.0.0.0/33\""), "{reasons:?}");
    }

    #[test]
    fn ipv4_mapped_ranges_are_ipv6() {
        let (got, skipped) = ranges(&["::ffff:10.0.0.0/104"]);
        assert!(got.is_empty() && skipped.is_empty(), "{got:?} {skipped:?}");
    }

    #[test]
    fn host_bits_are_cleared() {
        assert_eq!(
            SourceRange::new(Ipv4Addr::new(10, 1, 2, 3), 8),
            SourceRange::new(Ipv4Addr::new(10, 0, 0, 0), 8)
        );
        assert_eq!(
            SourceRange::new(Ipv4Addr::new(10, 1, 2, 3), 0).addr,
            Ipv4Addr::UNSPECIFIED
        );
    }
}
