//! The `nft -f` transactions kube-proxy's nftables mode runs for our Services, written as
//! kube-proxy writes them through knftables (pkg/proxy/nftables/proxier.go, Kubernetes
//! 1.31-1.33; see the report's notes for what 1.34 and 1.36 changed): `table ip kube-proxy`; base chains hooked at prerouting/input/forward/output
//! /postrouting; the `service-ips` verdict map keyed `ipv4_addr . inet_proto .
//! inet_service`, looked up once from the `services` chain; one `service-<hash>-ns/name/
//! proto/port` chain per service port with the masquerade rule and `numgen random mod n
//! vmap`; one `endpoint-<hash>-...` chain per endpoint with the hairpin masquerade rule and
//! `dnat to`; for a NodePort, an element of the `service-nodeports` verdict map (looked up
//! when `fib daddr type local`) going to an `external-<hash>-...` chain, which marks for
//! masquerade (`externalTrafficPolicy: Cluster`) and goes to the service chain.
//!
//! A full sync (first sync, or from empty) writes everything; a partial sync (kube-proxy's
//! normal case) writes only the chains of the changed Services and the map elements that
//! changed, and flushes the chains that went stale (kube-proxy deletes them a second
//! later).

use std::fmt::Write;

use super::hash::hash_base32;
use super::iptables::MASQUERADE_MARK;
use super::scenario::{CLUSTER_CIDR, Port, SERVICE_CIDR, Service};

const T: &str = "ip kube-proxy";

/// kube-proxy's `hashAndTruncate` (our names never reach the length limit).
fn hashed(name: &str) -> String {
    format!("{}-{name}", &hash_base32(name)[..8])
}

pub fn service_chain(svc: &Service, port: &Port) -> String {
    let base = format!(
        "{}/{}/{}/{}",
        svc.namespace,
        svc.name,
        port.proto.lower(),
        port.name
    );
    format!("service-{}", hashed(&base))
}

/// The chain a NodePort (and externalIPs, LB IPs) of the service port goes to.
pub fn external_chain(svc: &Service, port: &Port) -> String {
    let base = format!(
        "{}/{}/{}/{}",
        svc.namespace,
        svc.name,
        port.proto.lower(),
        port.name
    );
    format!("external-{}", hashed(&base))
}

pub fn endpoint_chain(svc: &Service, port: &Port, ip: &str) -> String {
    let base = format!(
        "{}/{}/{}/{}__{ip}/{}",
        svc.namespace,
        svc.name,
        port.proto.lower(),
        port.name,
        port.target
    );
    format!("endpoint-{}", hashed(&base))
}

/// `setupNFTables` on kube-proxy's first sync (`flushed` still false): base chains
/// recreated, jump chains, masquerading, the sets and maps, the dispatch rules; then every
/// set and map flushed.
fn setup(out: &mut String) {
    let _ = writeln!(
        out,
        "add table {T} {{ comment \"rules for kube-proxy\" ; }}"
    );
    let base = [
        ("filter-prerouting", "filter", "prerouting", -110),
        ("filter-input", "filter", "input", -110),
        ("filter-forward", "filter", "forward", -110),
        ("filter-output", "filter", "output", -110),
        ("filter-output-post-dnat", "filter", "output", -90),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ];
    for (name, ..) in base {
        let _ = writeln!(out, "add chain {T} {name}");
        let _ = writeln!(out, "delete chain {T} {name}");
    }
    for (name, kind, hook, priority) in base {
        let _ = writeln!(
            out,
            "add chain {T} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        );
        let _ = writeln!(out, "flush chain {T} {name}");
    }
    let mut created: Vec<&str> = Vec::new();
    let mut ensure = |out: &mut String, chain: &'static str| {
        if !created.contains(&chain) {
            created.push(chain);
            let _ = writeln!(out, "add chain {T} {chain}");
            let _ = writeln!(out, "flush chain {T} {chain}");
        }
    };
    for (dst, src, extra) in [
        ("nodeport-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-forward", "ct state new "),
        ("service-endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        (
            "cluster-ips-check",
            "filter-output-post-dnat",
            "ct state new ",
        ),
    ] {
        ensure(out, dst);
        let _ = writeln!(out, "add rule {T} {src} {extra}jump {dst}");
    }
    for chain in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        ensure(out, chain);
    }
    let _ = writeln!(
        out,
        "add rule {T} mark-for-masquerade mark set mark or {MASQUERADE_MARK}"
    );
    let _ = writeln!(
        out,
        "add rule {T} masquerading mark and {MASQUERADE_MARK} == 0 return"
    );
    let _ = writeln!(
        out,
        "add rule {T} masquerading mark set mark xor {MASQUERADE_MARK}"
    );
    let _ = writeln!(out, "add rule {T} masquerading masquerade fully-random");
    let _ = writeln!(
        out,
        "add set {T} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {T} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    let _ = writeln!(
        out,
        "add rule {T} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
    );
    let _ = writeln!(
        out,
        "add set {T} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    let _ = writeln!(out, "delete set {T} nodeport-ips");
    let _ = writeln!(
        out,
        "add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add chain {T} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    let _ = writeln!(out, "flush chain {T} reject-chain");
    let _ = writeln!(out, "add rule {T} reject-chain reject");
    let _ = writeln!(
        out,
        "add rule {T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    let _ = writeln!(
        out,
        "add rule {T} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"
    );
    let _ = writeln!(
        out,
        "add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    ensure(out, "firewall-check");
    let _ = writeln!(
        out,
        "add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(
        out,
        "add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        out,
        "add rule {T} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
    );
    let _ = writeln!(out, "flush set {T} cluster-ips");
    for map in [
        "service-ips",
        "firewall-ips",
        "no-endpoint-services",
        "no-endpoint-nodeports",
        "service-nodeports",
    ] {
        let _ = writeln!(out, "flush map {T} {map}");
    }
}

/// One service port's chains, elements and rules (kube-proxy's loop body, for a ClusterIP
/// Service with Cluster traffic policy and ready endpoints).
fn service_port(out: &mut String, svc: &Service, port: &Port, elements: bool, first_port: bool) {
    let proto = port.proto.lower();
    let chain = service_chain(svc, port);
    let endpoints: Vec<(String, String)> = svc
        .endpoints_in_order(port)
        .iter()
        .map(|ip| (endpoint_chain(svc, port, &ip.to_string()), ip.to_string()))
        .collect();
    for (ep, _) in &endpoints {
        let _ = writeln!(out, "add chain {T} {ep}");
        let _ = writeln!(out, "flush chain {T} {ep}");
    }
    let _ = writeln!(out, "add chain {T} {chain}");
    let _ = writeln!(out, "flush chain {T} {chain}");
    let external = port
        .node_port
        .map(|node_port| (external_chain(svc, port), node_port));
    if let Some((external, _)) = &external {
        let _ = writeln!(out, "add chain {T} {external}");
        let _ = writeln!(out, "flush chain {T} {external}");
    }
    if elements {
        // The cluster-ips set holds each ClusterIP once.
        if first_port {
            let _ = writeln!(out, "add element {T} cluster-ips {{ {} }}", svc.vip);
        }
        let _ = writeln!(
            out,
            "add element {T} service-ips {{ {} . {proto} . {} : goto {chain} }}",
            svc.vip, port.port
        );
        if let Some((external, node_port)) = &external {
            let _ = writeln!(
                out,
                "add element {T} service-nodeports {{ {proto} . {node_port} : goto {external} }}"
            );
        }
    }
    if let Some((external, _)) = &external {
        // externalTrafficPolicy: Cluster: masquerade (the endpoint may be on another node),
        // then the cluster-wide endpoints.
        let _ = writeln!(out, "add rule {T} {external} jump mark-for-masquerade");
        let _ = writeln!(out, "add rule {T} {external} goto {chain}");
    }
    let _ = writeln!(
        out,
        "add rule {T} {chain} ip daddr {} {proto} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        svc.vip, port.port
    );
    let vmap: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (ep, _))| format!("{i} : goto {ep}"))
        .collect();
    let _ = writeln!(
        out,
        "add rule {T} {chain} numgen random mod {} vmap {{ {} }}",
        endpoints.len(),
        vmap.join(" , ")
    );
    for (ep, ip) in &endpoints {
        let _ = writeln!(
            out,
            "add rule {T} {ep} ip saddr {ip} jump mark-for-masquerade"
        );
        let _ = writeln!(
            out,
            "add rule {T} {ep} meta l4proto {proto} dnat to {ip}:{}",
            port.target
        );
    }
}

/// kube-proxy's first (full) sync of `services`.
pub fn full(services: &[Service]) -> String {
    let mut out = String::with_capacity(8192 + services.len() * 1400);
    setup(&mut out);
    for svc in services {
        for (i, port) in svc.ports.iter().enumerate() {
            service_port(&mut out, svc, port, true, i == 0);
        }
    }
    out
}

/// A partial sync after the endpoints of `changed` changed (same ClusterIPs and ports, so
/// no map element changes): its chains rewritten, `stale_chains` flushed.
pub fn partial(changed: &Service, stale_chains: &[String]) -> String {
    let mut out = String::new();
    for port in &changed.ports {
        service_port(&mut out, changed, port, false, false);
    }
    for chain in stale_chains {
        let _ = writeln!(out, "flush chain {T} {chain}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::scenario::{self, Proto};
    use super::*;

    fn ns1_svc1() -> Service {
        Service {
            namespace: "ns1".into(),
            name: "svc1".into(),
            vip: Ipv4Addr::new(172, 30, 0, 41),
            ports: vec![Port {
                name: "p80",
                proto: Proto::Tcp,
                port: 80,
                target: 80,
                node_port: None,
            }],
            endpoints: vec![Ipv4Addr::new(10, 180, 0, 1)],
        }
    }

    #[test]
    fn chain_names_are_kube_proxys() {
        let svc = ns1_svc1();
        assert_eq!(
            service_chain(&svc, &svc.ports[0]),
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            endpoint_chain(&svc, &svc.ports[0], "10.180.0.1"),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }

    /// The per-Service part of the transaction for two Services, as knftables renders
    /// kube-proxy's objects.
    #[test]
    fn two_services_full_sync() {
        let two = scenario::filler(0);
        let text = full(&[ns1_svc1(), two.clone()]);
        let (head, services) = text
            .split_once("flush map ip kube-proxy service-nodeports\n")
            .expect("setup ends with the last map flush");
        assert!(
            head.starts_with("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n")
        );
        assert!(head.contains(
            "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n"
        ));
        assert!(head.contains("add rule ip kube-proxy nat-output jump services\n"));
        assert!(head.contains("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n"));
        assert!(head.contains(
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n"
        ));
        let s2 = service_chain(&two, &two.ports[0]);
        let e2a = endpoint_chain(&two, &two.ports[0], "10.248.0.1");
        let e2b = endpoint_chain(&two, &two.ports[0], "10.248.0.2");
        let expected = format!(
            "add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
flush chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
flush chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add element ip kube-proxy cluster-ips {{ 172.30.0.41 }}
add element ip kube-proxy service-ips {{ 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }}
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap {{ 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }}
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
add chain ip kube-proxy {e2a}
flush chain ip kube-proxy {e2a}
add chain ip kube-proxy {e2b}
flush chain ip kube-proxy {e2b}
add chain ip kube-proxy {s2}
flush chain ip kube-proxy {s2}
add element ip kube-proxy cluster-ips {{ 10.96.0.1 }}
add element ip kube-proxy service-ips {{ 10.96.0.1 . tcp . 80 : goto {s2} }}
add rule ip kube-proxy {s2} ip daddr 10.96.0.1 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
add rule ip kube-proxy {s2} numgen random mod 2 vmap {{ 0 : goto {e2a} , 1 : goto {e2b} }}
add rule ip kube-proxy {e2a} ip saddr 10.248.0.1 jump mark-for-masquerade
add rule ip kube-proxy {e2a} meta l4proto tcp dnat to 10.248.0.1:8080
add rule ip kube-proxy {e2b} ip saddr 10.248.0.2 jump mark-for-masquerade
add rule ip kube-proxy {e2b} meta l4proto tcp dnat to 10.248.0.2:8080
"
        );
        assert_eq!(services, expected);
    }

    #[test]
    fn a_node_port_is_a_service_nodeports_element_going_to_the_external_chain() {
        let mut svc = ns1_svc1();
        svc.ports[0].node_port = Some(3001);
        let text = full(std::slice::from_ref(&svc));
        let external = external_chain(&svc, &svc.ports[0]);
        assert_eq!(external, "external-ULMVA6XW-ns1/svc1/tcp/p80");
        for line in [
            format!("add chain ip kube-proxy {external}"),
            format!(
                "add element ip kube-proxy service-nodeports {{ tcp . 3001 : goto {external} }}"
            ),
            format!("add rule ip kube-proxy {external} jump mark-for-masquerade"),
            format!("add rule ip kube-proxy {external} goto service-ULMVA6XW-ns1/svc1/tcp/p80"),
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "no {line:?} in\n{text}"
            );
        }
        // A partial sync rewrites the external chain but adds no element.
        let text = partial(&svc, &[]);
        assert!(text.contains(&format!("add rule ip kube-proxy {external} goto ")));
        assert!(!text.contains("add element"));
    }

    #[test]
    fn a_partial_sync_touches_only_the_changed_service() {
        let pods = [Ipv4Addr::new(10, 244, 0, 10), Ipv4Addr::new(10, 244, 0, 12)];
        let svc = scenario::measured(&pods);
        let stale = vec![endpoint_chain(&svc, &svc.ports[1], "10.244.0.11")];
        let text = partial(&svc, &stale);
        assert!(!text.contains("add element"));
        assert!(!text.contains("add table"));
        assert!(text.contains("dnat to 10.244.0.12:8080"));
        assert!(text.ends_with(&format!("flush chain ip kube-proxy {}\n", stale[0])));
    }
}
