//! The `nft -f` transactions kube-proxy's nftables mode runs for our Services, written as
//! kube-proxy 1.36 writes them through knftables (pkg/proxy/nftables/proxier.go):
//! `table ip kube-proxy`; base chains hooked at prerouting/input/forward/output/postrouting
//! (the firewall check before DNAT at priority -110, the other filter chains at 0); the
//! `service-ips` verdict map keyed `ipv4_addr . inet_proto . inet_service`, looked up once
//! from the `services` chain, whose first rule marks traffic from outside the cluster CIDR to
//! a ClusterIP for masquerade; one `service-<hash>-ns/name/proto/port` chain per service port
//! holding a single `dnat ip addr . port to numgen random mod n map { ... }` rule (no
//! endpoint chains: those are only for ClientIP affinity, which we do not use); hairpin
//! traffic (a pod reaching itself through a Service) masqueraded by the `masquerading` chain
//! through the `hairpin-connections` set, one element per local endpoint and port; for a
//! NodePort, an element of the `service-nodeports` verdict map, looked up for the addresses
//! in `nodeport-ips`, going to an `external-<hash>-...` chain, which marks for masquerade
//! (`externalTrafficPolicy: Cluster`) and goes to the service chain.
//!
//! `nodeport-ips` holds the node's primary IP: the nftables mode defaults
//! `--nodeport-addresses` to `primary` (cmd/kube-proxy/app/server_linux.go), which
//! kube-proxy turns into `<node IP>/32`. The masquerade mark is written as kube-proxy
//! formats it at run time (`%#08x`: `0x00004000`); its unit tests set `0x4000` instead.
//!
//! Left out, being later than 1.36 (merged in 1.37's cycle; 1.37.0 is out, its release
//! branch was not read here): a one-endpoint service chain's `dnat to ADDR:PORT` without a
//! map (kubernetes#140723, #140960), which the bench's Services (two endpoints each, also
//! after an endpoint change) never have; and the
//! `KubeProxyNFTablesLocalhostNodePorts` objects (`localhost-nodeport-reject-*` map, chains
//! and counters), which a full sync adds and deletes again with the feature off: a few
//! lines of the first transaction, none of a partial sync (their text changed on master
//! between the versions read). 1.37 also turns its `NFTablesNetlink` gate on (beta): its
//! pull request (kubernetes#137536) reads the rules back over netlink instead of parsing
//! `nft`'s output; release summaries say the `nft` binary is not run at all, which was not
//! checked in its sources. If the writes went to netlink too, kube-proxy no longer pays
//! `nft`'s parse of the text, which the times of `nft -f` here include.
//!
//! A full sync (first sync, from no table) writes everything; a partial sync (kube-proxy's
//! normal case) rewrites only the chains of the changed Services, adds the set and map
//! elements that are new and, at its end, deletes those that went stale (kube-proxy keeps
//! the elements it wrote and compares; no set or map is flushed).

use std::collections::{HashMap, HashSet};
use std::fmt::Write;
use std::net::Ipv4Addr;

use super::hash::hash_base32;
use super::scenario::{CLUSTER_CIDR, Port, SERVICE_CIDR, Service};

const T: &str = "ip kube-proxy";

/// kube-proxy's `fmt.Sprintf("%#08x", 1<<14)` (Go pads the digits, not the `0x`, to 8).
const MASQUERADE_MARK: &str = "0x00004000";

/// kube-proxy's `hashAndTruncate` (our names never reach the length limit).
fn hashed(name: &str) -> String {
    format!("{}-{name}", &hash_base32(name)[..8])
}

fn chain_base(svc: &Service, port: &Port) -> String {
    hashed(&format!(
        "{}/{}/{}/{}",
        svc.namespace,
        svc.name,
        port.proto.lower(),
        port.name
    ))
}

pub fn service_chain(svc: &Service, port: &Port) -> String {
    format!("service-{}", chain_base(svc, port))
}

/// The chain a NodePort (and externalIPs, LB IPs) of the service port goes to.
pub fn external_chain(svc: &Service, port: &Port) -> String {
    format!("external-{}", chain_base(svc, port))
}

/// kube-proxy's `nftElementStorage`, for all our sets and maps at once: what they hold, so
/// that a sync writes only the elements that are new or changed (`ensureElem`) and deletes
/// those it did not ensure (`cleanupLeftoverKeys`).
#[derive(Default)]
struct Elements {
    /// `(set or map, key)` to the map value ("" in a set), as last written.
    held: HashMap<(&'static str, String), String>,
    /// `held`'s keys in the order they were first written.
    order: Vec<(&'static str, String)>,
    /// The keys this sync wrote or found held.
    ensured: HashSet<(&'static str, String)>,
}

impl Elements {
    fn ensure(&mut self, out: &mut String, container: &'static str, key: String, value: &str) {
        let id = (container, key);
        let held = self.held.get(&id).map(String::as_str);
        if held != Some(value) {
            // A changed value is deleted and added again.
            if held.is_some() {
                let _ = writeln!(out, "delete element {T} {container} {{ {} }}", id.1);
            } else {
                self.order.push(id.clone());
            }
            if value.is_empty() {
                let _ = writeln!(out, "add element {T} {container} {{ {} }}", id.1);
            } else {
                let _ = writeln!(out, "add element {T} {container} {{ {} : {value} }}", id.1);
            }
            self.held.insert(id.clone(), value.to_owned());
        }
        self.ensured.insert(id);
    }
}

/// kube-proxy's `ensureChain`: the chain created and emptied.
fn ensure_chain(out: &mut String, chain: &str) {
    let _ = writeln!(out, "add chain {T} {chain}");
    let _ = writeln!(out, "flush chain {T} {chain}");
}

/// `setupNFTables` on kube-proxy's first sync (`flushed` still false), from no table (so
/// listing the sets' and maps' elements finds none and none is flushed): base chains
/// recreated, jump chains, masquerading, the sets and maps, the dispatch rules. `node_ip`
/// is the node's primary IP, the one NodePorts are served on.
fn setup(out: &mut String, node_ip: Ipv4Addr) {
    let _ = writeln!(
        out,
        "add table {T} {{ comment \"rules for kube-proxy\" ; }}"
    );
    let base = [
        ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
        ("filter-output-pre-dnat", "filter", "output", -110),
        ("filter-input", "filter", "input", 0),
        ("filter-forward", "filter", "forward", 0),
        ("filter-output", "filter", "output", 0),
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
    for (dst, src, extra) in [
        ("nodeport-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-forward", "ct state new "),
        ("service-endpoints-check", "filter-output", "ct state new "),
        (
            "firewall-check",
            "filter-prerouting-pre-dnat",
            "ct state new ",
        ),
        ("firewall-check", "filter-output-pre-dnat", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        ("cluster-ips-check", "filter-output", "ct state new "),
    ] {
        if !created.contains(&dst) {
            created.push(dst);
            ensure_chain(out, dst);
        }
        let _ = writeln!(out, "add rule {T} {src} {extra}jump {dst}");
    }
    // (`services`, `cluster-ips-check`, `masquerading` and later `firewall-check` are
    // ensured again; all exist by now, so kube-proxy writes nothing for them.)
    let _ = writeln!(
        out,
        "add set {T} hairpin-connections {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service ; comment \"service hairpin connections\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {T} masquerading mark and {MASQUERADE_MARK} != 0 mark set mark xor {MASQUERADE_MARK} masquerade fully-random"
    );
    let _ = writeln!(
        out,
        "add rule {T} masquerading ct status dnat ip saddr . ip daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random"
    );
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
    let _ = writeln!(out, "flush set {T} nodeport-ips");
    let _ = writeln!(out, "add element {T} nodeport-ips {{ {node_ip} }}");
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
        "add rule {T} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
    );
    let _ = writeln!(
        out,
        "add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
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
        "add rule {T} services ip daddr @cluster-ips ip saddr != {CLUSTER_CIDR} mark set mark or {MASQUERADE_MARK} comment \"masquerade clusterIP traffic from outside cluster\""
    );
    let _ = writeln!(
        out,
        "add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        out,
        "add rule {T} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    );
}

/// One service port's elements, chains and rules (kube-proxy's loop body, for a Service
/// with Cluster traffic policies, no session affinity and ready endpoints, which are then
/// the same rules whichever node the endpoints are on).
fn service_port(out: &mut String, svc: &Service, port: &Port, elements: &mut Elements) {
    let proto = port.proto.lower();
    let chain = service_chain(svc, port);
    let endpoints = svc.endpoints_in_order(port);
    // Local endpoints only (`ep.IsLocal()`): a pod on another node does not reach itself
    // through this one.
    for ip in endpoints.iter().filter(|_| !port.remote) {
        elements.ensure(
            out,
            "hairpin-connections",
            format!("{ip} . {ip} . {proto} . {}", port.target),
            "",
        );
    }
    ensure_chain(out, &chain);
    let external = port
        .node_port
        .map(|node_port| (external_chain(svc, port), node_port));
    if let Some((external, _)) = &external {
        ensure_chain(out, external);
    }
    // The cluster-ips set holds each ClusterIP once, for all the ports.
    elements.ensure(out, "cluster-ips", svc.vip.to_string(), "");
    elements.ensure(
        out,
        "service-ips",
        format!("{} . {proto} . {}", svc.vip, port.port),
        &format!("goto {chain}"),
    );
    if let Some((external, node_port)) = &external {
        elements.ensure(
            out,
            "service-nodeports",
            format!("{proto} . {node_port}"),
            &format!("goto {external}"),
        );
        // externalTrafficPolicy: Cluster: masquerade (the endpoint may be on another node),
        // then the cluster-wide endpoints.
        let _ = writeln!(
            out,
            "add rule {T} {external} mark set mark or {MASQUERADE_MARK} comment \"masquerade\""
        );
        let _ = writeln!(out, "add rule {T} {external} goto {chain}");
    }
    let map: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, ip)| format!("{i} : {ip} . {}", port.target))
        .collect();
    let _ = writeln!(
        out,
        "add rule {T} {chain} meta l4proto {proto} dnat ip addr . port to numgen random mod {} map {{ {} }}",
        endpoints.len(),
        map.join(" , ")
    );
}

/// kube-proxy's first (full) sync of `services` on the node whose primary IP is `node_ip`.
pub fn full(services: &[Service], node_ip: Ipv4Addr) -> String {
    let mut out = String::with_capacity(8192 + services.len() * 1000);
    setup(&mut out, node_ip);
    let mut elements = Elements::default();
    for svc in services {
        for port in &svc.ports {
            service_port(&mut out, svc, port, &mut elements);
        }
    }
    out
}

/// A partial sync after the endpoints of a Service changed from `old`'s to `new`'s (same
/// ClusterIP and ports): its chains rewritten, the hairpin elements of its new endpoints
/// added and, at the end, those of the endpoints it lost deleted.
pub fn partial(old: &Service, new: &Service) -> String {
    // What the sets and maps hold for the Service before this sync.
    let mut before = Elements::default();
    let mut discarded = String::new();
    for port in &old.ports {
        service_port(&mut discarded, old, port, &mut before);
    }
    let mut elements = Elements {
        held: before.held,
        ..Elements::default()
    };
    let mut out = String::new();
    for port in &new.ports {
        service_port(&mut out, new, port, &mut elements);
    }
    for id in before.order {
        if !elements.ensured.contains(&id) {
            let _ = writeln!(out, "delete element {T} {} {{ {} }}", id.0, id.1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::scenario::{self, Proto};
    use super::*;

    /// The node IP of kube-proxy's test proxier (`testNodeIP`), so that its lines need no
    /// change for it.
    const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);

    /// kube-proxy's `nftablesBaseChains`, in order.
    const BASE_CHAINS: [&str; 8] = [
        "filter-prerouting-pre-dnat",
        "filter-output-pre-dnat",
        "filter-input",
        "filter-forward",
        "filter-output",
        "nat-prerouting",
        "nat-output",
        "nat-postrouting",
    ];

    /// kube-proxy 1.36's `baseRules` (pkg/proxy/nftables/proxier_test.go at
    /// edca5633aa54f69d9fa50f526fe3a8cabda69c91), blank lines left out: what its first sync
    /// leaves in the table (the knftables fake's dump: sorted, without the flushes).
    const BASE_RULES_1_36: &str = r#"add table ip kube-proxy { comment "rules for kube-proxy" ; }
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
add set ip kube-proxy hairpin-connections { type ipv4_addr . ipv4_addr . inet_proto . inet_service ; comment "service hairpin connections" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy masquerading mark and 0x4000 != 0 mark set mark xor 0x4000 masquerade fully-random
add rule ip kube-proxy masquerading ct status dnat ip saddr . ip daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr @cluster-ips ip saddr != 10.0.0.0/8 mark set mark or 0x4000 comment "masquerade clusterIP traffic from outside cluster"
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add element ip kube-proxy nodeport-ips { 192.168.0.2 }
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
"#;

    /// kube-proxy's lines with its test proxier's pod CIDR, service CIDR and mark replaced
    /// by ours.
    fn ours(text: &str) -> String {
        text.replace("10.0.0.0/8", CLUSTER_CIDR)
            .replace("172.30.0.0/16", SERVICE_CIDR)
            .replace("0x4000", MASQUERADE_MARK)
    }

    /// A Service of kube-proxy's tests: port `p80`, TCP 80 to 80.
    fn service(
        namespace: &str,
        name: &str,
        vip: Ipv4Addr,
        node_port: Option<u16>,
        endpoints: &[Ipv4Addr],
    ) -> Service {
        Service {
            namespace: namespace.into(),
            name: name.into(),
            vip,
            ports: vec![Port {
                name: "p80",
                proto: Proto::Tcp,
                port: 80,
                target: 80,
                node_port,
                remote: false,
            }],
            endpoints: endpoints.to_vec(),
            remote_endpoints: Vec::new(),
        }
    }

    /// `full` without the setup part.
    fn services_part(services: &[Service]) -> String {
        let setup = full(&[], NODE_IP);
        full(services, NODE_IP)
            .strip_prefix(&setup)
            .expect("setup comes first")
            .to_owned()
    }

    #[test]
    fn setup_is_kube_proxy_1_36s() {
        let text = full(&[], NODE_IP);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }"
        );
        // Added and deleted first, so that they are created again with their current hooks
        // and priorities.
        for (pair, name) in lines[1..17].chunks(2).zip(BASE_CHAINS) {
            assert_eq!(pair[0], format!("add chain ip kube-proxy {name}"));
            assert_eq!(pair[1], format!("delete chain ip kube-proxy {name}"));
        }
        let base = ours(BASE_RULES_1_36);
        let expected: HashSet<&str> = base.lines().collect();
        for line in &expected {
            assert!(lines.contains(line), "no {line:?} in\n{text}");
        }
        // The rest is kube-proxy's, or empties what was just created.
        for line in &lines[17..] {
            assert!(
                expected.contains(line)
                    || line.starts_with("flush chain ")
                    || line.starts_with("flush set "),
                "{line:?} is not kube-proxy's"
            );
        }
        assert!(text.contains(
            "add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }\n\
             flush set ip kube-proxy nodeport-ips\n\
             add element ip kube-proxy nodeport-ips { 192.168.0.2 }\n"
        ));
        assert!(text.ends_with(
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n"
        ));
    }

    /// kube-proxy 1.36's lines for `svc1` (ClusterIP) and `svc3` (NodePort) in
    /// `TestOverallNFTablesRules` (same file and commit), each endpoint on the node.
    const SVC1_SVC3_1_36: &str = r#"add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 meta l4proto tcp dnat ip addr . port to numgen random mod 1 map { 0 : 10.180.0.1 . 80 }
add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy hairpin-connections { 10.180.0.1 . 10.180.0.1 . tcp . 80 }
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 meta l4proto tcp dnat ip addr . port to numgen random mod 1 map { 0 : 10.180.0.3 . 80 }
add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 mark set mark or 0x4000 comment "masquerade"
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
add element ip kube-proxy cluster-ips { 172.30.0.43 }
add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }
add element ip kube-proxy hairpin-connections { 10.180.0.3 . 10.180.0.3 . tcp . 80 }
"#;

    /// The per-Service part of the transaction, in kube-proxy's order.
    #[test]
    fn services_are_kube_proxy_1_36s() {
        let svc1 = service(
            "ns1",
            "svc1",
            Ipv4Addr::new(172, 30, 0, 41),
            None,
            &[Ipv4Addr::new(10, 180, 0, 1)],
        );
        let svc3 = service(
            "ns3",
            "svc3",
            Ipv4Addr::new(172, 30, 0, 43),
            Some(3003),
            &[Ipv4Addr::new(10, 180, 0, 3)],
        );
        let text = services_part(&[svc1, svc3]);
        let kube_proxys = ours(SVC1_SVC3_1_36);
        let mut expected: Vec<&str> = kube_proxys.lines().collect();
        expected.sort_unstable();
        let mut written: Vec<&str> = text
            .lines()
            .filter(|line| !line.starts_with("flush chain "))
            .collect();
        written.sort_unstable();
        assert_eq!(written, expected);
        assert_eq!(
            text,
            r#"add element ip kube-proxy hairpin-connections { 10.180.0.1 . 10.180.0.1 . tcp . 80 }
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
flush chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 meta l4proto tcp dnat ip addr . port to numgen random mod 1 map { 0 : 10.180.0.1 . 80 }
add element ip kube-proxy hairpin-connections { 10.180.0.3 . 10.180.0.3 . tcp . 80 }
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
flush chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
flush chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
add element ip kube-proxy cluster-ips { 172.30.0.43 }
add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 mark set mark or 0x00004000 comment "masquerade"
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 meta l4proto tcp dnat ip addr . port to numgen random mod 1 map { 0 : 10.180.0.3 . 80 }
"#
        );
    }

    #[test]
    fn the_dnat_map_has_the_endpoints_in_kube_proxys_order() {
        let svc = scenario::filler(4);
        let text = services_part(std::slice::from_ref(&svc));
        let chain = service_chain(&svc, &svc.ports[0]);
        assert!(text.contains(&format!(
            "add rule ip kube-proxy {chain} meta l4proto tcp dnat ip addr . port to numgen random mod 2 map {{ 0 : 10.248.0.10 . 8080 , 1 : 10.248.0.9 . 8080 }}\n"
        )));
    }

    #[test]
    fn a_clusterip_is_written_once_for_all_its_ports() {
        let pods = [Ipv4Addr::new(10, 244, 0, 10), Ipv4Addr::new(10, 244, 0, 11)];
        let svc = scenario::measured(&pods);
        let text = services_part(std::slice::from_ref(&svc));
        assert_eq!(
            text.matches("add element ip kube-proxy cluster-ips { 10.100.0.10 }\n")
                .count(),
            1
        );
        let external = &svc.ports[1];
        assert!(text.contains(&format!(
            "add element ip kube-proxy service-nodeports {{ tcp . 30081 : goto {} }}\n",
            external_chain(&svc, external)
        )));
        assert!(text.contains(
            "add element ip kube-proxy hairpin-connections { 10.244.0.11 . 10.244.0.11 . tcp . 8081 }\n"
        ));
    }

    /// kube-proxy 1.36's `TestSyncProxyRulesRepeated` (same file and commit): changing the
    /// endpoint of `svc3` from 10.0.3.1 to 10.0.3.2 takes "2, // remove 1 old element from
    /// hairpin-connections, add 1 new one" and "3, // add+flush service chain, add 1 rule"
    /// operations; adding 10.0.3.3 then takes 1 and 3.
    #[test]
    fn a_partial_sync_is_kube_proxy_1_36s() {
        let vip = Ipv4Addr::new(172, 30, 0, 43);
        let one = service("ns3", "svc3", vip, None, &[Ipv4Addr::new(10, 0, 3, 1)]);
        let two = service("ns3", "svc3", vip, None, &[Ipv4Addr::new(10, 0, 3, 2)]);
        let three = service(
            "ns3",
            "svc3",
            vip,
            None,
            &[Ipv4Addr::new(10, 0, 3, 2), Ipv4Addr::new(10, 0, 3, 3)],
        );
        assert_eq!(
            partial(&one, &two),
            "add element ip kube-proxy hairpin-connections { 10.0.3.2 . 10.0.3.2 . tcp . 80 }
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
flush chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 meta l4proto tcp dnat ip addr . port to numgen random mod 1 map { 0 : 10.0.3.2 . 80 }
delete element ip kube-proxy hairpin-connections { 10.0.3.1 . 10.0.3.1 . tcp . 80 }
"
        );
        assert_eq!(
            partial(&two, &three),
            "add element ip kube-proxy hairpin-connections { 10.0.3.3 . 10.0.3.3 . tcp . 80 }
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
flush chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 meta l4proto tcp dnat ip addr . port to numgen random mod 2 map { 0 : 10.0.3.2 . 80 , 1 : 10.0.3.3 . 80 }
"
        );
    }

    /// kube-proxy adds hairpin elements for this node's endpoints only: none for the
    /// `remote` port, whose endpoints are on the other node.
    #[test]
    fn hairpin_elements_are_those_of_local_endpoints() {
        let svc =
            scenario::measured(&[Ipv4Addr::new(10, 244, 0, 10), Ipv4Addr::new(10, 244, 0, 11)]);
        let text = full(std::slice::from_ref(&svc), NODE_IP);
        let hairpins: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("add element ip kube-proxy hairpin-connections"))
            .collect();
        assert!(!hairpins.is_empty());
        for remote in &svc.remote_endpoints {
            assert!(
                hairpins
                    .iter()
                    .all(|l| !l.contains(&format!("{{ {remote} . "))),
                "{remote}: {hairpins:?}"
            );
        }
        for local in &svc.endpoints {
            assert!(
                hairpins
                    .iter()
                    .any(|l| l.contains(&format!("{{ {local} . "))),
                "{local}: {hairpins:?}"
            );
        }
    }

    #[test]
    fn a_partial_sync_touches_only_the_changed_service() {
        let before =
            scenario::measured(&[Ipv4Addr::new(10, 244, 0, 10), Ipv4Addr::new(10, 244, 0, 11)]);
        let after =
            scenario::measured(&[Ipv4Addr::new(10, 244, 0, 10), Ipv4Addr::new(10, 244, 0, 12)]);
        let text = partial(&before, &after);
        assert!(!text.contains("add table"));
        assert!(!text.contains("10.244.0.10 . 10.244.0.10"));
        for line in text.lines().filter(|l| l.starts_with("add element")) {
            assert!(
                line.contains("hairpin-connections { 10.244.0.12 . "),
                "{line}"
            );
        }
        assert!(text.contains(
            "add element ip kube-proxy hairpin-connections { 10.244.0.12 . 10.244.0.12 . udp . 8080 }\n"
        ));
        let external = external_chain(&after, &after.ports[1]);
        assert!(text.contains(&format!(
            "add rule ip kube-proxy {external} goto {}\n",
            service_chain(&after, &after.ports[1])
        )));
        assert!(text.contains("map { 0 : 10.244.0.10 . 8081 , 1 : 10.244.0.12 . 8081 }\n"));
        assert!(text.ends_with(
            "delete element ip kube-proxy hairpin-connections { 10.244.0.11 . 10.244.0.11 . udp . 8080 }
delete element ip kube-proxy hairpin-connections { 10.244.0.11 . 10.244.0.11 . tcp . 8081 }
delete element ip kube-proxy hairpin-connections { 10.244.0.11 . 10.244.0.11 . tcp . 8080 }
"
        ));
    }
}
