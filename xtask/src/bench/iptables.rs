//! The `iptables-restore` input kube-proxy's iptables mode writes for our Services, built
//! as kube-proxy builds it (pkg/proxy/iptables/proxier.go, `syncProxyRules`, Kubernetes
//! 1.31 and later, whose nfacct counters came in 1.31 (#122812, #125015): 1.30 wrote these
//! rules without them, as [`Counters::None`] does; checked against its sources and `TestOverallIPTablesRules` of about
//! 1.33-1.34, and again against commit 531be812, of 1.34-1.35, the newest copy of the
//! iptables proxier in the reference index): a `*filter` and a `*nat` table; `KUBE-SERVICES` a linear list with one
//! `cluster IP` rule per service port, then the `KUBE-NODEPORTS` rule last;
//! `KUBE-SVC-<hash>` with the masquerade rule for sources outside the cluster CIDR, then
//! `-m statistic --mode random --probability 1/n` jumps and an unconditional last jump;
//! `KUBE-SEP-<hash>` with the hairpin masquerade rule and `DNAT --to-destination`; for a
//! NodePort, a `KUBE-NODEPORTS` rule to `KUBE-EXT-<hash>`, which marks for masquerade
//! (`externalTrafficPolicy: Cluster`) and jumps to `KUBE-SVC-<hash>`;
//! `KUBE-MARK-MASQ`, `KUBE-POSTROUTING`. Comments are dropped from the per-endpoint rules
//! above 1000 endpoints (kube-proxy's "large cluster mode").
//!
//! The settings are kube-proxy's defaults: masquerade bit 14, `--cluster-cidr` local
//! detection, NodePorts on every local address with localhost NodePorts allowed,
//! `--random-fully` where iptables has it. Where kube-proxy could create its two nfacct
//! counters at start (1.31 and later; see `Counters`), its rules count through them.
//!
//! Pure string building: 30000 Services take milliseconds.

use std::fmt::Write;
use std::net::Ipv4Addr;

use super::hash::hash_base32;
use super::scenario::{CLUSTER_CIDR, Port, Service};

/// kube-proxy's `fmt.Sprintf("%#08x", 1<<14)`.
pub const MASQUERADE_MARK: &str = "0x00004000";
/// kube-proxy's nfacct counters (`metrics.IPTablesCTStateInvalidDroppedNFAcctCounter`,
/// `LocalhostNodePortAcceptedNFAcctCounter`).
pub const NFACCT_COUNTERS: [&str; 2] = [
    "ct_state_invalid_dropped_pkts",
    "localhost_nps_accepted_pkts",
];

/// Whether kube-proxy's nfacct counters exist on the node. kube-proxy creates them at start
/// and, for each one it could create, adds `-m nfacct` to the rule it counts: the
/// conntrack-INVALID drop in `KUBE-FORWARD`, and a rule for NodePorts reached on a
/// localhost address before each NodePort's own rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counters {
    Nfacct,
    None,
}

/// kube-proxy's `largeClusterEndpointsThreshold`.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

pub fn svc_chain(svc: &Service, port: &Port) -> String {
    let hash = hash_base32(&format!("{}{}", svc.port_name(port), port.proto.lower()));
    format!("KUBE-SVC-{}", &hash[..16])
}

/// The chain a NodePort (and externalIPs, LB IPs) of the service port jumps to.
pub fn ext_chain(svc: &Service, port: &Port) -> String {
    let hash = hash_base32(&format!("{}{}", svc.port_name(port), port.proto.lower()));
    format!("KUBE-EXT-{}", &hash[..16])
}

pub fn sep_chain(svc: &Service, port: &Port, endpoint: &str) -> String {
    let hash = hash_base32(&format!(
        "{}{}{endpoint}",
        svc.port_name(port),
        port.proto.lower()
    ));
    format!("KUBE-SEP-{}", &hash[..16])
}

/// The endpoint chains that go when `gone` stops being an endpoint of `svc`: one per port
/// it serves. The `remote` port's endpoints are on another node and stay.
pub fn stale_sep_chains(svc: &Service, gone: Ipv4Addr) -> Vec<String> {
    svc.ports
        .iter()
        .filter(|p| !p.remote)
        .map(|p| sep_chain(svc, p, &format!("{gone}:{}", p.target)))
        .collect()
}

fn large_cluster_mode(services: &[Service]) -> bool {
    let endpoints: usize = services
        .iter()
        .map(|s| {
            s.ports
                .iter()
                .map(|p| s.port_endpoints(p).len())
                .sum::<usize>()
        })
        .sum();
    endpoints > LARGE_CLUSTER_ENDPOINTS
}

/// kube-proxy's `computeProbability`: `%0.10f` of 1/n.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// The fixed part of the `*filter` table and the `*nat` table's first lines.
fn filter_table(out: &mut String, jumps: bool, counters: Counters) {
    out.push_str("*filter\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
    );
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID");
    if counters == Counters::Nfacct {
        let _ = write!(out, " -m nfacct --nfacct-name {}", NFACCT_COUNTERS[0]);
    }
    out.push_str(" -j DROP\n");
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j ACCEPT"
    );
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    if jumps {
        out.push_str(FILTER_JUMPS);
    }
    out.push_str("COMMIT\n");
}

/// The jumps from the built-in chains that kube-proxy installs with `iptables -I` before
/// its first restore (`iptablesJumpChains`, `iptablesKubeletJumpChains`), in the order the
/// repeated prepending leaves them. Only written into a restore that starts from empty
/// tables.
const FILTER_JUMPS: &str = "\
-A INPUT -j KUBE-FIREWALL
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
";

const NAT_JUMPS: &str = "\
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
";

/// The rules of one service port: its `KUBE-SERVICES` rule into `services`, and (unless
/// skipped, as in a partial sync of an unchanged Service) its chains and their rules.
fn service_port(
    svc: &Service,
    port: &Port,
    large: bool,
    counters: Counters,
    services_rules: &mut String,
    chains: Option<(&mut String, &mut String)>,
) {
    let name = svc.port_name(port);
    let proto = port.proto.lower();
    let svc_chain = svc_chain(svc, port);
    let _ = writeln!(
        services_rules,
        "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {} --dport {} -j {svc_chain}",
        svc.vip, port.port
    );
    let ext_chain = port.node_port.map(|node_port| {
        let chain = ext_chain(svc, port);
        if counters == Counters::Nfacct {
            let _ = writeln!(
                services_rules,
                "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} -d 127.0.0.0/8 --dport {node_port} -m nfacct --nfacct-name {} -j {chain}",
                NFACCT_COUNTERS[1]
            );
        }
        let _ = writeln!(
            services_rules,
            "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {node_port} -j {chain}"
        );
        chain
    });
    let Some((chains, rules)) = chains else {
        return;
    };
    let comment = |rule: &mut String, text: &str| {
        if !large {
            let _ = write!(rule, " -m comment --comment {text}");
        }
    };
    let endpoints: Vec<(String, String)> = svc
        .endpoints_in_order(port)
        .iter()
        .map(|ip| {
            let endpoint = format!("{ip}:{}", port.target);
            (sep_chain(svc, port, &endpoint), endpoint)
        })
        .collect();
    if let Some(ext) = &ext_chain {
        let _ = writeln!(chains, ":{ext} - [0:0]");
    }
    let _ = writeln!(chains, ":{svc_chain} - [0:0]");
    for (sep, _) in &endpoints {
        let _ = writeln!(chains, ":{sep} - [0:0]");
    }
    let _ = writeln!(
        rules,
        "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {} --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        svc.vip, port.port
    );
    if let Some(ext) = &ext_chain {
        // externalTrafficPolicy: Cluster: masquerade, since the endpoint may be on another
        // node, then the cluster-wide endpoints.
        let _ = writeln!(
            rules,
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(rules, "-A {ext} -j {svc_chain}");
    }
    let n = endpoints.len();
    for (i, (sep, endpoint)) in endpoints.iter().enumerate() {
        rules.push_str("-A ");
        rules.push_str(&svc_chain);
        comment(rules, &format!("\"{name} -> {endpoint}\""));
        if i < n - 1 {
            let _ = write!(
                rules,
                " -m statistic --mode random --probability {}",
                probability(n - i)
            );
        }
        let _ = writeln!(rules, " -j {sep}");
    }
    for (sep, endpoint) in &endpoints {
        let ip = endpoint.split(':').next().unwrap_or_default();
        rules.push_str("-A ");
        rules.push_str(sep);
        comment(rules, &name);
        let _ = writeln!(rules, " -s {ip} -j KUBE-MARK-MASQ");
        rules.push_str("-A ");
        rules.push_str(sep);
        comment(rules, &name);
        let _ = writeln!(
            rules,
            " -m {proto} -p {proto} -j DNAT --to-destination {endpoint}"
        );
    }
}

/// What to rewrite in a sync: everything, or (a partial sync, kube-proxy's default since
/// 1.28) only the chains of the Services that changed, plus the chains that went stale.
pub enum Sync<'a> {
    Full {
        /// Also write the jumps from the built-in chains (for a restore into empty tables).
        jumps: bool,
    },
    Partial {
        changed: &'a [&'a str],
        stale_chains: &'a [String],
    },
}

/// The `iptables-restore --noflush` input for `services`.
pub fn restore(services: &[Service], sync: &Sync, counters: Counters) -> String {
    let large = large_cluster_mode(services);
    // About 700 bytes per Service without comments.
    let mut out = String::with_capacity(1024 + services.len() * 900);
    filter_table(
        &mut out,
        matches!(sync, Sync::Full { jumps: true }),
        counters,
    );
    out.push_str("*nat\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    let mut chains = String::new();
    let mut rules = String::with_capacity(services.len() * 800);
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN"
    );
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}"
    );
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let _ = writeln!(
        rules,
        "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}"
    );
    // kube-proxy writes each Service's KUBE-SERVICES rule and its chains' rules into one
    // buffer, in one pass; a skipped Service only contributes the former.
    for svc in services {
        let rewrite = match sync {
            Sync::Full { .. } => true,
            Sync::Partial { changed, .. } => changed.contains(&svc.name.as_str()),
        };
        for port in &svc.ports {
            let mut svc_rules = String::new();
            service_port(
                svc,
                port,
                large,
                counters,
                &mut rules,
                rewrite.then_some((&mut chains, &mut svc_rules)),
            );
            rules.push_str(&svc_rules);
        }
    }
    if let Sync::Partial { stale_chains, .. } = sync {
        // Stale chains are deleted right away only outside large cluster mode. There,
        // kube-proxy deletes them (after an iptables-save of the nat table) only once
        // `--sync-period`, 30 s by default, has passed since its last cleanup, which its
        // first sync does. The bench's endpoint changes come seconds apart; only the first
        // one after a load that took longer than that (10000 Services) would carry the
        // `-X` lines, and the iptables-save before it is not timed either.
        if !large {
            for chain in *stale_chains {
                let _ = writeln!(chains, ":{chain} - [0:0]");
                let _ = writeln!(rules, "-X {chain}");
            }
        }
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    if matches!(sync, Sync::Full { jumps: true }) {
        rules.push_str(NAT_JUMPS);
    }
    out.push_str(&chains);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::scenario::{self, Proto};
    use super::*;

    /// kube-proxy's test Service: ns1/svc1 port p80, ClusterIP 172.30.0.41, one endpoint.
    fn ns1_svc1(endpoints: &[Ipv4Addr]) -> Service {
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
                remote: false,
            }],
            endpoints: endpoints.to_vec(),
            remote_endpoints: Vec::new(),
        }
    }

    #[test]
    fn chain_names_are_kube_proxys() {
        let svc = ns1_svc1(&[]);
        assert_eq!(svc_chain(&svc, &svc.ports[0]), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            sep_chain(&svc, &svc.ports[0], "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
    }

    /// Two Services, the second with two endpoints: the text kube-proxy's syncProxyRules
    /// writes for them (the same lines as in its own tests, with the real mark, the
    /// cluster CIDR detector and `--random-fully`).
    #[test]
    fn two_services_full_sync() {
        let one = ns1_svc1(&[Ipv4Addr::new(10, 180, 0, 1)]);
        let two = scenario::filler(0);
        let text = restore(
            &[one, two.clone()],
            &Sync::Full { jumps: false },
            Counters::Nfacct,
        );
        let svc2 = svc_chain(&two, &two.ports[0]);
        let sep2a = sep_chain(&two, &two.ports[0], "10.248.0.1:8080");
        let sep2b = sep_chain(&two, &two.ports[0], "10.248.0.2:8080");
        let expected = format!(
            r#"*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x00004000/0x00004000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:{svc2} - [0:0]
:{sep2a} - [0:0]
:{sep2b} - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SERVICES -m comment --comment "bench/svc-00000:http cluster IP" -m tcp -p tcp -d 10.96.0.1 --dport 80 -j {svc2}
-A {svc2} -m comment --comment "bench/svc-00000:http cluster IP" -m tcp -p tcp -d 10.96.0.1 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ
-A {svc2} -m comment --comment "bench/svc-00000:http -> 10.248.0.1:8080" -m statistic --mode random --probability 0.5000000000 -j {sep2a}
-A {svc2} -m comment --comment "bench/svc-00000:http -> 10.248.0.2:8080" -j {sep2b}
-A {sep2a} -m comment --comment bench/svc-00000:http -s 10.248.0.1 -j KUBE-MARK-MASQ
-A {sep2a} -m comment --comment bench/svc-00000:http -m tcp -p tcp -j DNAT --to-destination 10.248.0.1:8080
-A {sep2b} -m comment --comment bench/svc-00000:http -s 10.248.0.2 -j KUBE-MARK-MASQ
-A {sep2b} -m comment --comment bench/svc-00000:http -m tcp -p tcp -j DNAT --to-destination 10.248.0.2:8080
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
"#
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn endpoints_go_in_kube_proxys_string_order() {
        let svc = scenario::filler(4);
        let text = restore(&[svc], &Sync::Full { jumps: false }, Counters::None);
        assert!(text.contains(
            "-> 10.248.0.10:8080\" -m statistic --mode random --probability 0.5000000000 -j"
        ));
        let first = text.find("-> 10.248.0.10:8080");
        let second = text.find("-> 10.248.0.9:8080");
        assert!(first.is_some() && first < second);
    }

    #[test]
    fn large_clusters_lose_the_endpoint_comments_but_keep_the_cluster_ip_ones() {
        let pods = [Ipv4Addr::new(10, 244, 0, 10), Ipv4Addr::new(10, 244, 0, 11)];
        let all = scenario::services(600, &pods);
        let text = restore(&all, &Sync::Full { jumps: false }, Counters::Nfacct);
        assert!(text.contains("\"bench/measured:tcp cluster IP\""));
        assert!(!text.contains(" -> 10.244.0.10:8080"));
        // The measured Service's TCP port is the last Service rule, before KUBE-NODEPORTS.
        let services: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .collect();
        assert_eq!(services.len(), 599 + 4 + 1);
        assert!(services[services.len() - 2].contains("-d 10.100.0.10 --dport 80"));
        assert!(services[services.len() - 2].contains("-p tcp"));
        assert!(services[services.len() - 1].contains("KUBE-NODEPORTS"));
    }

    /// kube-proxy's test NodePort Service (ns1/svc1 p80, NodePort 3001): the rules of its
    /// `TestNodePorts` case for `externalTrafficPolicy: Cluster`, with its nfacct counters
    /// (as in `TestOverallIPTablesRules`).
    #[test]
    fn a_node_port_goes_through_kube_nodeports_and_the_external_chain() {
        let mut svc = ns1_svc1(&[Ipv4Addr::new(10, 180, 0, 1)]);
        svc.ports[0].node_port = Some(3001);
        let text = restore(
            std::slice::from_ref(&svc),
            &Sync::Full { jumps: false },
            Counters::Nfacct,
        );
        let lines: Vec<&str> = text.lines().collect();
        let at = |line: &str| {
            lines
                .iter()
                .position(|l| *l == line)
                .unwrap_or_else(|| panic!("no {line:?} in\n{text}"))
        };
        let cluster_ip = at(
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
        );
        let localhost = at(
            "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-XPGD46QRK7WJZT7O",
        );
        let node_port = at(
            "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-XPGD46QRK7WJZT7O",
        );
        let masq = at(
            "-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment \"masquerade traffic for ns1/svc1:p80 external destinations\" -j KUBE-MARK-MASQ",
        );
        let jump = at("-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVC-XPGD46QRK7WJZT7O");
        assert!(cluster_ip < localhost && localhost < node_port && masq < jump);
        assert!(
            at(":KUBE-EXT-XPGD46QRK7WJZT7O - [0:0]") < at(":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]")
        );
        // Still the last rule of KUBE-SERVICES.
        assert!(
            lines
                .iter()
                .rfind(|l| l.starts_with("-A KUBE-SERVICES "))
                .is_some_and(|l| l.ends_with("-j KUBE-NODEPORTS"))
        );
        // Without the counters (kube-proxy could not create them): neither nfacct rule.
        let text = restore(&[svc], &Sync::Full { jumps: false }, Counters::None);
        assert!(!text.contains("nfacct"));
        assert!(!text.contains("127.0.0.0/8 --dport 3001"));
        assert!(text.contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"));
    }

    #[test]
    fn a_partial_sync_rewrites_every_service_rule_but_only_the_changed_chains() {
        let pods = [Ipv4Addr::new(10, 244, 0, 10), Ipv4Addr::new(10, 244, 0, 11)];
        let mut all = scenario::services(3, &pods);
        let old = all[2].clone();
        all[2].endpoints[1] = Ipv4Addr::new(10, 244, 0, 12);
        let stale = stale_sep_chains(&old, pods[1]);
        // Only chains the full sync made are deleted (the `remote` port's endpoints are
        // other pods, on another node).
        let before = restore(
            &scenario::services(3, &pods),
            &Sync::Full { jumps: true },
            Counters::Nfacct,
        );
        for chain in &stale {
            assert!(before.contains(&format!(":{chain} ")), "{chain} never made");
        }
        let text = restore(
            &all,
            &Sync::Partial {
                changed: &["measured"],
                stale_chains: &stale,
            },
            Counters::Nfacct,
        );
        assert_eq!(text.matches("-A KUBE-SERVICES ").count(), 2 + 4 + 1);
        assert!(!text.contains(&format!(":{} ", svc_chain(&all[0], &all[0].ports[0]))));
        assert!(text.contains("--to-destination 10.244.0.12:8080"));
        // The `remote` port's chains are the Service's too, rewritten with the same
        // endpoints on the other node.
        assert!(text.contains("--to-destination 10.244.1.10:8082"));
        assert_eq!(text.matches("\n-X ").count(), stale.len());
        for chain in &stale {
            assert!(text.contains(&format!("-X {chain}\n")));
        }
        assert!(!text.contains("-A OUTPUT"));
    }

    #[test]
    fn a_restore_into_empty_tables_carries_the_jumps_from_the_built_in_chains() {
        let text = restore(
            &[ns1_svc1(&[Ipv4Addr::new(10, 180, 0, 1)])],
            &Sync::Full { jumps: true },
            Counters::Nfacct,
        );
        assert!(text.contains(
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
        ));
        assert!(text.contains("-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"));
    }
}
