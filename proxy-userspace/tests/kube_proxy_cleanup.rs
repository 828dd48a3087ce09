//! Privileged: `ebpf-kube-proxy cleanup-iptables` on what kube-proxy leaves behind, in a
//! network namespace of the test's own (iptables and nftables rule sets are per network
//! namespace, so the host's rules are never read or touched; the namespace and everything in
//! it go away on drop, also when an assertion fails).
//!
//! The namespace gets a kube-proxy-shaped iptables rule set (two Services, a NodePort, the
//! jumps from the built-in chains as kube-proxy writes them) in both iptables backends and
//! IPv6, next to the kubelet's chains, Docker's and a user's rules; an nftables
//! `table ip kube-proxy` / `ip6 kube-proxy` next to a user's `table inet filter`; and an
//! interface named `kube-ipvs0` that is not a dummy (this kernel has no dummy devices).
//! Needs root and Debian's `iptables`, `nftables` and `iproute2` (`cargo xtask setup`
//! installs the first two).

use std::io::Write;
use std::process::{Output, Stdio};

use xtask::netns::{self, Netns};

const AGENT: &str = env!("CARGO_BIN_EXE_ebpf-kube-proxy");

const TOOLS: &[&str] = &[
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-legacy-save",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
    "nft",
    "ip",
];

/// Every backend and family the cleanup looks at.
const SAVES: &[&str] = &[
    "iptables-legacy-save",
    "iptables-nft-save",
    "ip6tables-legacy-save",
    "ip6tables-nft-save",
];

/// The kubelet's chains: named KUBE-*, not kube-proxy's, so they stay.
const KUBELET_CHAINS: &[&str] = &["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"];

/// kube-proxy 1.3x in iptables mode with Services `default/web` (TCP 80, NodePort 30080,
/// two endpoints) and `kube-system/dns` (UDP 53, one endpoint) and `default/empty` (no
/// endpoints), plus the kubelet's chains, Docker's chains and a user's SSH rule.
const IPV4_RULES: &str = r#"*mangle
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp -m tcp --dport 22 -m comment --comment "ssh from the admin network" -s 192.0.2.0/24 -j ACCEPT
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-SERVICES -m comment --comment "default/empty:http has no endpoints" -m tcp -p tcp -d 10.96.0.99 --dport 80 -j REJECT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:KUBE-EXT-ULMVA6XW4YAZ7W2T - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-ASQ2MJ7JW3FH4BAF - [0:0]
:KUBE-SEP-GLDR2WUCF7E5FVQK - [0:0]
:KUBE-SEP-OZ4SLMMGCBWIAJN6 - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
:KUBE-SVC-ULMVA6XW4YAZ7W2T - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-NODEPORTS -m comment --comment default/web:http -m tcp -p tcp --dport 30080 -j KUBE-EXT-ULMVA6XW4YAZ7W2T
-A KUBE-SERVICES -m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-ULMVA6XW4YAZ7W2T
-A KUBE-SERVICES -m comment --comment "kube-system/dns:dns cluster IP" -m udp -p udp -d 10.96.0.53 --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-ULMVA6XW4YAZ7W2T -m comment --comment "masquerade traffic for default/web:http external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-ULMVA6XW4YAZ7W2T -j KUBE-SVC-ULMVA6XW4YAZ7W2T
-A KUBE-SVC-ULMVA6XW4YAZ7W2T -m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-SVC-ULMVA6XW4YAZ7W2T -m comment --comment "default/web:http -> 10.244.0.10:8080" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-ASQ2MJ7JW3FH4BAF
-A KUBE-SVC-ULMVA6XW4YAZ7W2T -m comment --comment "default/web:http -> 10.244.0.11:8080" -j KUBE-SEP-GLDR2WUCF7E5FVQK
-A KUBE-SEP-ASQ2MJ7JW3FH4BAF -m comment --comment default/web:http -s 10.244.0.10 -j KUBE-MARK-MASQ
-A KUBE-SEP-ASQ2MJ7JW3FH4BAF -m comment --comment default/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.0.10:8080
-A KUBE-SEP-GLDR2WUCF7E5FVQK -m comment --comment default/web:http -s 10.244.0.11 -j KUBE-MARK-MASQ
-A KUBE-SEP-GLDR2WUCF7E5FVQK -m comment --comment default/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.0.11:8080
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "kube-system/dns:dns cluster IP" -m udp -p udp -d 10.96.0.53 --dport 53 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "kube-system/dns:dns -> 10.244.0.20:5353" -j KUBE-SEP-OZ4SLMMGCBWIAJN6
-A KUBE-SEP-OZ4SLMMGCBWIAJN6 -m comment --comment kube-system/dns:dns -s 10.244.0.20 -j KUBE-MARK-MASQ
-A KUBE-SEP-OZ4SLMMGCBWIAJN6 -m comment --comment kube-system/dns:dns -m udp -p udp -j DNAT --to-destination 10.244.0.20:5353
COMMIT
"#;

/// The IPv6 half of a dual-stack kube-proxy: one Service, one endpoint; a user's rule.
const IPV6_RULES: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-6CNTBZFH3KQ2TMIW - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ULMVA6XW4YAZ7W2T - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d fd00:96::10 --dport 80 -j KUBE-SVC-ULMVA6XW4YAZ7W2T
-A KUBE-SVC-ULMVA6XW4YAZ7W2T -m comment --comment "default/web:http -> [fd00:244::10]:8080" -j KUBE-SEP-6CNTBZFH3KQ2TMIW
-A KUBE-SEP-6CNTBZFH3KQ2TMIW -m comment --comment default/web:http -s fd00:244::10 -j KUBE-MARK-MASQ
-A KUBE-SEP-6CNTBZFH3KQ2TMIW -m comment --comment default/web:http -m tcp -p tcp -j DNAT --to-destination [fd00:244::10]:8080
COMMIT
"#;

/// kube-proxy's nftables mode (`ip` with one Service, an empty `ip6`) and a user's table.
const NFT_RULES: &str = r#"table ip kube-proxy {
	comment "rules for kube-proxy"
	set cluster-ips {
		type ipv4_addr
		comment "Active ClusterIPs"
		elements = { 10.96.0.10 }
	}
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
		elements = { 10.96.0.10 . tcp . 80 : goto service-ULMVA6XW-default/web/tcp/http }
	}
	chain mark-for-masquerade {
		mark set mark or 0x4000
	}
	chain masquerading {
		type nat hook postrouting priority srcnat; policy accept;
		mark and 0x4000 == 0 return
		mark set mark xor 0x4000
		masquerade fully-random
	}
	chain services {
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}
	chain service-ULMVA6XW-default/web/tcp/http {
		ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
		numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-default/web/tcp/http__10.244.0.10/8080 }
	}
	chain endpoint-5OJB2KTY-default/web/tcp/http__10.244.0.10/8080 {
		ip saddr 10.244.0.10 jump mark-for-masquerade
		meta l4proto tcp dnat to 10.244.0.10:8080
	}
}
table ip6 kube-proxy {
	comment "rules for kube-proxy"
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
	}
}
table inet filter {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 22 accept comment "ssh"
	}
}
"#;

/// What the first real run reports, and the dry run announces.
const REMOVED: &str = "43 iptables chains, 30 jump rules, 2 nftables tables, 0 interfaces";

/// Root and the tools, or a panic that says what is missing.
fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test needs root (network namespaces, iptables, nftables): run as root, e.g. `sudo -E cargo xtask test`"
        );
    }
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|tool| {
            !["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .any(|dir| std::path::Path::new(dir).join(tool).exists())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?}: install Debian's iptables, nftables and iproute2 \
         (`cargo xtask setup` installs iptables and nftables)"
    );
}

/// A network namespace holding a node's leftovers; deleted (with every rule) on drop.
struct Node {
    ns: Netns,
}

/// Everything the cleanup may change, as text: each backend's rules (counters and the
/// date comments left out), the nftables table list, the user's nftables table, links.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    saves: Vec<(&'static str, Vec<String>)>,
    nft_tables: String,
    nft_filter: String,
    links: String,
}

impl Node {
    fn new(tag: &str) -> Node {
        require_root_and_tools();
        let name = netns::unique_prefix(&format!("ekpt-{tag}"));
        let ns = Netns::create(&name)
            .unwrap_or_else(|e| panic!("creating network namespace {name}: {e:#}"));
        Node { ns }
    }

    /// Runs `program args` in the namespace, feeding it `stdin`.
    fn exec(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = self
            .ns
            .command(program, None)
            .unwrap_or_else(|e| panic!("preparing {program}: {e:#}"));
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        let mut pipe = child.stdin.take().expect("stdin is piped");
        if let Some(input) = stdin {
            pipe.write_all(input.as_bytes())
                .unwrap_or_else(|e| panic!("feeding {program}: {e}"));
        }
        drop(pipe);
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for {program}: {e}"))
    }

    /// Like `exec`, but the command must succeed; returns its stdout.
    fn ok(&self, program: &str, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.exec(program, args, stdin);
        assert!(
            out.status.success(),
            "`{program} {}` in {} failed ({}): {}",
            args.join(" "),
            self.ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// kube-proxy's leftovers next to everybody else's rules.
    fn load_leftovers(&self) {
        self.ok("iptables-nft-restore", &["-w", "5"], Some(IPV4_RULES));
        self.ok("iptables-legacy-restore", &["-w", "5"], Some(IPV4_RULES));
        self.ok("ip6tables-nft-restore", &["-w", "5"], Some(IPV6_RULES));
        self.ok("nft", &["-f", "-"], Some(NFT_RULES));
        // Not a dummy (this kernel has none): kube-proxy's cleanup leaves such a device alone.
        self.ok("ip", &["link", "add", "kube-ipvs0", "type", "bridge"], None);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            saves: SAVES
                .iter()
                .map(|save| (*save, normalise(&self.ok(save, &[], None))))
                .collect(),
            nft_tables: self.ok("nft", &["list", "tables"], None),
            nft_filter: self.ok("nft", &["list", "table", "inet", "filter"], None),
            links: self.ok("ip", &["-o", "link", "show"], None),
        }
    }

    /// `ebpf-kube-proxy cleanup-iptables --without-agent <args>` in the namespace (no
    /// agent serves it; restart.rs tests the refusal).
    fn cleanup(&self, args: &[&str]) -> Output {
        let mut all = vec!["cleanup-iptables", "--without-agent"];
        all.extend_from_slice(args);
        self.exec(AGENT, &all, None)
    }

    fn cleanup_ok(&self, args: &[&str]) -> String {
        let out = self.cleanup(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "cleanup-iptables {args:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// iptables-save output without comment lines and without the counters of chain lines.
fn normalise(save: &str) -> Vec<String> {
    save.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| match (line.starts_with(':'), line.rfind(" [")) {
            (true, Some(i)) => line[..i].to_owned(),
            _ => line.to_owned(),
        })
        .collect()
}

/// Whether a saved line names one of kube-proxy's chains (any KUBE-* but the kubelet's).
fn mentions_kube_proxy_chain(line: &str) -> bool {
    line.match_indices("KUBE-").any(|(i, _)| {
        let name: String = line[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        !KUBELET_CHAINS.contains(&name.as_str())
    })
}

/// The snapshot with kube-proxy's chains, the jumps to them and its nftables tables gone.
fn without_kube_proxy(before: &Snapshot) -> Snapshot {
    Snapshot {
        saves: before
            .saves
            .iter()
            .map(|(save, lines)| {
                let kept = lines
                    .iter()
                    .filter(|l| !mentions_kube_proxy_chain(l))
                    .cloned()
                    .collect();
                (*save, kept)
            })
            .collect(),
        nft_tables: before
            .nft_tables
            .lines()
            .filter(|l| !l.ends_with(" kube-proxy"))
            .map(|l| format!("{l}\n"))
            .collect(),
        nft_filter: before.nft_filter.clone(),
        links: before.links.clone(),
    }
}

#[test]
fn cleanup_iptables_removes_kube_proxys_chains_jumps_and_tables_and_nothing_else() {
    let node = Node::new("kpclean");
    node.load_leftovers();
    let before = node.snapshot();
    for (save, lines) in &before.saves {
        if *save == "ip6tables-legacy-save" {
            continue; // left empty: a backend with nothing of kube-proxy's
        }
        assert!(
            lines.iter().any(|l| l.starts_with("-A KUBE-SVC-")),
            "{save}: the kube-proxy rule set did not load:\n{}",
            lines.join("\n")
        );
    }
    assert!(before.nft_tables.contains("table ip kube-proxy"));

    let report = node.cleanup_ok(&[]);
    let after = node.snapshot();
    assert_eq!(
        after,
        without_kube_proxy(&before),
        "only kube-proxy's rules may go; report:\n{report}"
    );
    // The kubelet's chains are KUBE-* but not kube-proxy's: they stay, with their jumps.
    let nft_v4 = &after.saves[1].1;
    for kubelet in [
        ":KUBE-FIREWALL -",
        "-A INPUT -j KUBE-FIREWALL",
        ":KUBE-KUBELET-CANARY -",
    ] {
        assert!(
            nft_v4.iter().any(|l| l == kubelet),
            "iptables-nft lost the kubelet's {kubelet:?}:\n{}",
            nft_v4.join("\n")
        );
    }
    assert!(after.nft_filter.contains("tcp dport 22 accept"));
    assert!(after.links.contains("kube-ipvs0"));
    for expected in [
        "iptables-nft (IPv4):",
        "  nat: 3 jump rules (PREROUTING -> KUBE-SERVICES, OUTPUT -> KUBE-SERVICES, POSTROUTING -> KUBE-POSTROUTING)",
        "iptables-legacy (IPv4):",
        "ip6tables-nft (IPv6):",
        "ip6tables-legacy (IPv6): nothing of kube-proxy's",
        "nftables: deleted table ip kube-proxy (7 chains, 2 sets and maps)",
        "nftables: deleted table ip6 kube-proxy (1 chain, 0 sets and maps)",
        "IPVS: kube-ipvs0 is a bridge device, not kube-proxy's dummy: left alone",
        &format!("cleanup-iptables: removed {REMOVED}"),
    ] {
        assert!(
            report.lines().any(|l| l == expected),
            "report lacks {expected:?}:\n{report}"
        );
    }

    // A second run finds nothing and changes nothing.
    let again = node.cleanup_ok(&[]);
    assert_eq!(node.snapshot(), after, "the second run changed something");
    assert!(
        again.lines().any(|l| l
            == "cleanup-iptables: removed 0 iptables chains, 0 jump rules, 0 nftables tables, 0 interfaces"),
        "second run:\n{again}"
    );
}

#[test]
fn dry_run_reports_what_would_go_and_changes_nothing() {
    let node = Node::new("kpdry");
    node.load_leftovers();
    let before = node.snapshot();
    let report = node.cleanup_ok(&["--dry-run"]);
    assert_eq!(node.snapshot(), before, "--dry-run changed something");
    for expected in [
        "iptables-nft (IPv4): would remove",
        "  nat: iptables-restore --noflush input:",
        "    -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "    -X KUBE-SVC-ULMVA6XW4YAZ7W2T",
        "nftables: would delete table ip kube-proxy (7 chains, 2 sets and maps)",
        &format!("cleanup-iptables: would remove {REMOVED}"),
    ] {
        assert!(
            report.lines().any(|l| l == expected),
            "report lacks {expected:?}:\n{report}"
        );
    }
}

#[test]
fn a_failing_removal_exits_non_zero_and_the_other_backends_are_still_cleaned() {
    let node = Node::new("kpfail");
    node.load_leftovers();
    // An iptables-nft-restore that always fails, found first on PATH.
    let dir = std::env::temp_dir().join(format!("{}-bin", node.ns.name()));
    std::fs::create_dir_all(&dir).expect("creating the fake tool directory");
    let _removed = RemovedOnDrop(dir.clone());
    let fake = dir.join("iptables-nft-restore");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'iptables-nft-restore: simulated failure' >&2\nexit 1\n",
    )
    .expect("writing the fake tool");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("making the fake tool executable");
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = node.ns.command(AGENT, None).expect("preparing the agent");
    let out = command
        .args(["cleanup-iptables", "--without-agent"])
        .env("PATH", &path)
        .stdin(Stdio::null())
        .output()
        .expect("running the agent");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failed removal must fail the command:\n{stdout}"
    );
    assert!(
        stderr.contains("iptables-nft (IPv4) table nat") && stderr.contains("simulated failure"),
        "the error names what failed:\n{stderr}"
    );
    // The legacy backend and nftables were cleaned all the same.
    let legacy = normalise(&node.ok("iptables-legacy-save", &[], None));
    assert!(
        !legacy.iter().any(|l| mentions_kube_proxy_chain(l)),
        "iptables-legacy still has kube-proxy's rules:\n{}",
        legacy.join("\n")
    );
    assert!(
        !node
            .ok("nft", &["list", "tables"], None)
            .contains("kube-proxy")
    );
}

/// A directory removed with everything in it on drop, also when the test panics.
struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
