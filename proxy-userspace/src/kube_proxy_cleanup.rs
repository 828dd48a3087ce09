//! `ebpf-kube-proxy cleanup-iptables`: removes what kube-proxy left in the kernel once it
//! has been replaced, as `kube-proxy --cleanup` does, and nothing else.
//!
//! What counts as kube-proxy's is taken from kube-proxy's own cleanup code
//! (`pkg/proxy/iptables/cleanup.go`, the IPVS proxier's `iptablesCleanupChains`,
//! `pkg/proxy/nftables/cleanup.go`):
//!
//! - iptables, both backends (`iptables-legacy`, `iptables-nft`) and both families
//!   (`ip6tables-*`): the chains in [`NAT_CHAINS`], [`FILTER_CHAINS`], [`MANGLE_CHAINS`] and
//!   the per-Service/per-endpoint chains of the nat table ([`SERVICE_CHAIN_PREFIXES`]) are
//!   flushed and deleted, and the rules of built-in chains that jump to them are deleted.
//!   The kubelet's chains (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`, `KUBE-IPTABLES-HINT`, and
//!   `KUBE-MARK-DROP` from older kubelets) are not kube-proxy's and stay, with their jumps.
//! - nftables: the tables `ip kube-proxy` and `ip6 kube-proxy`.
//! - IPVS: the `kube-ipvs0` dummy interface. IPVS virtual servers and kube-proxy's ipsets
//!   are not removed (`kube-proxy --cleanup` removes them; here there is no `ipvsadm` or
//!   `ipset`, and no kernel with IPVS to test against): the virtual servers left are
//!   counted and named as what to run.
//!
//! How, like kube-proxy: one `iptables-save` per backend and family (all existing tables; a
//! per-table save would create a missing legacy table), the deletions computed by the pure
//! functions below, and `iptables-restore --noflush` fed only those deletions, one table at a
//! time. Nothing else is written, so every other rule (Docker's, a CNI's, the user's) stays
//! byte-identical. A kube-proxy chain that a chain which is not kube-proxy's still jumps to is
//! kept (and reported), so the restore never fails on a reference and no foreign rule is cut.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// kube-proxy's fixed nat chains: iptables mode (`KUBE-SERVICES` .. `KUBE-PROXY-CANARY`),
/// then IPVS mode (`KUBE-NODE-PORT`, `KUBE-LOAD-BALANCER`, and the nat `KUBE-FIREWALL` of
/// its older releases, which listed it in their cleanup; the kubelet's `KUBE-FIREWALL` is
/// in the filter table).
pub const NAT_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-PROXY-CANARY",
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-FIREWALL",
];

/// kube-proxy's filter chains: iptables mode, then IPVS mode.
pub const FILTER_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    "KUBE-NODE-PORT",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
];

/// kube-proxy's mangle chain (the canary it watches for rule flushes).
pub const MANGLE_CHAINS: &[&str] = &["KUBE-PROXY-CANARY"];

/// Per-Service and per-endpoint chains of the nat table (kube-proxy's `isServiceChainName`,
/// with the `KUBE-XLB-` chains of releases up to 1.23, which its cleanup removed until 1.26).
pub const SERVICE_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
    "KUBE-XLB-",
];

/// The nftables table kube-proxy's nftables mode owns, in families `ip` and `ip6`.
pub const NFT_TABLE: &str = "kube-proxy";
const NFT_FAMILIES: &[&str] = &["ip", "ip6"];

/// The dummy interface kube-proxy's IPVS mode binds Service addresses to.
pub const IPVS_DUMMY: &str = "kube-ipvs0";

/// Whether `chain` of `table` is one kube-proxy creates (and its cleanup removes).
pub fn is_kube_proxy_chain(table: &str, chain: &str) -> bool {
    match table {
        "nat" => {
            NAT_CHAINS.contains(&chain)
                || SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
        }
        "filter" => FILTER_CHAINS.contains(&chain),
        "mangle" => MANGLE_CHAINS.contains(&chain),
        _ => false,
    }
}

/// One table of an `iptables-save` dump.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    /// Chains in the order they were printed, with their policy (`-` for user-defined ones).
    pub chains: Vec<(String, String)>,
    pub rules: Vec<SavedRule>,
}

/// One `-A CHAIN ...` line.
#[derive(Debug, PartialEq, Eq)]
pub struct SavedRule {
    pub chain: String,
    /// Everything after `-A CHAIN`, as printed (quoting kept): `-D CHAIN <spec>` deletes
    /// exactly this rule.
    pub spec: String,
    /// The `-j`/`-g` target, if any.
    pub target: Option<String>,
}

/// Parses `iptables-save` output (with or without `-c` counters). Comment and blank lines
/// are skipped; anything else that is not a table, chain, rule or `COMMIT` line is an error,
/// so that nothing is removed on the strength of output that was not understood. So is
/// the comment older `iptables-nft` prints for a table it cannot decode instead of the
/// table (``# Table `nat' is incompatible, use 'nft' tool.``): that table was not read.
pub fn parse_save(text: &str) -> Result<Vec<SavedTable>> {
    let mut tables = Vec::new();
    let mut current: Option<SavedTable> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let at = || format!("iptables-save line {}: {raw:?}", i + 1);
        if line.starts_with("# Table") && line.contains("is incompatible") {
            bail!("{}: a table this iptables cannot read", at());
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            if current.is_some() {
                bail!("{}: table started before COMMIT", at());
            }
            current = Some(SavedTable {
                name: name.trim().to_owned(),
                ..SavedTable::default()
            });
            continue;
        }
        let Some(table) = current.as_mut() else {
            bail!("{}: outside of a table", at());
        };
        if line == "COMMIT" {
            tables.extend(current.take());
        } else if let Some(decl) = line.strip_prefix(':') {
            let mut words = decl.split_whitespace();
            let (Some(name), Some(policy)) = (words.next(), words.next()) else {
                bail!("{}: chain line without a policy", at());
            };
            table.chains.push((name.to_owned(), policy.to_owned()));
        } else {
            let rule = strip_counters(line);
            let Some(rest) = rule.strip_prefix("-A ") else {
                bail!("{}: not a rule", at());
            };
            let rest = rest.trim_start();
            let (chain, spec) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let spec = spec.trim();
            let target = rule_target(&tokenize(spec).with_context(at)?);
            table.rules.push(SavedRule {
                chain: chain.to_owned(),
                spec: spec.to_owned(),
                target,
            });
        }
    }
    if let Some(table) = current {
        bail!(
            "iptables-save output ends inside table {} (no COMMIT)",
            table.name
        );
    }
    Ok(tables)
}

/// `[12:3456] -A ...` (iptables-save -c) -> `-A ...`.
fn strip_counters(line: &str) -> &str {
    if line.starts_with('[')
        && let Some((counters, rest)) = line.split_once(']')
        && counters[1..]
            .split(':')
            .all(|n| n.bytes().all(|b| b.is_ascii_digit()))
    {
        return rest.trim_start();
    }
    line
}

/// Splits a rule spec into words as iptables-restore does: double quotes group, and inside
/// them a backslash escapes the next character.
fn tokenize(spec: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                word.extend(chars.next());
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        bail!("unterminated quote");
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The chain or target a rule jumps (`-j`) or goes (`-g`) to. A comment's text is skipped,
/// so `--comment -j` is not mistaken for a jump.
fn rule_target(words: &[String]) -> Option<String> {
    let mut it = words.iter();
    while let Some(w) = it.next() {
        match w.as_str() {
            "--comment" => {
                it.next();
            }
            "-j" | "--jump" | "-g" | "--goto" => return it.next().cloned(),
            _ => {}
        }
    }
    None
}

/// A rule of a chain that stays (a built-in chain) jumping to a chain that goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Jump {
    pub chain: String,
    pub spec: String,
    pub target: String,
}

/// What to remove from one table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TablePlan {
    pub table: String,
    /// Rules of built-in chains that jump to a removed chain, in saved order.
    pub jumps: Vec<Jump>,
    /// Removed chains in saved order, with the number of rules they held.
    pub chains: Vec<(String, usize)>,
    /// kube-proxy chains kept because a chain that is not kube-proxy's jumps to them:
    /// (kept chain, referring chain).
    pub kept: Vec<(String, String)>,
}

/// The deletions for one table: kube-proxy's chains, minus those still referenced from a
/// user-defined chain that is not kube-proxy's (and, in turn, what those reference), plus
/// the rules of built-in chains that jump to a removed chain.
pub fn plan_table(table: &SavedTable) -> TablePlan {
    // Built-in chains have a policy; user-defined ones print `-`.
    let builtin: BTreeSet<&str> = table
        .chains
        .iter()
        .filter(|(_, policy)| policy != "-")
        .map(|(name, _)| name.as_str())
        .collect();
    let mut remove: BTreeSet<&str> = table
        .chains
        .iter()
        .filter(|(name, policy)| policy == "-" && is_kube_proxy_chain(&table.name, name))
        .map(|(name, _)| name.as_str())
        .collect();
    let mut kept = Vec::new();
    // A surviving user-defined chain keeps what it jumps to; repeat until nothing changes,
    // since a kept chain survives too.
    loop {
        let found = table.rules.iter().find_map(|rule| {
            let target = rule.target.as_deref()?;
            (remove.contains(target)
                && !remove.contains(rule.chain.as_str())
                && !builtin.contains(rule.chain.as_str()))
            .then_some((target, rule.chain.as_str()))
        });
        let Some((target, referrer)) = found else {
            break;
        };
        remove.remove(target);
        kept.push((target.to_owned(), referrer.to_owned()));
    }
    let jumps = table
        .rules
        .iter()
        .filter(|rule| builtin.contains(rule.chain.as_str()))
        .filter_map(|rule| {
            let target = rule.target.as_deref()?;
            remove.contains(target).then(|| Jump {
                chain: rule.chain.clone(),
                spec: rule.spec.clone(),
                target: target.to_owned(),
            })
        })
        .collect();
    let chains = table
        .chains
        .iter()
        .filter(|(name, _)| remove.contains(name.as_str()))
        .map(|(name, _)| {
            let rules = table.rules.iter().filter(|r| &r.chain == name).count();
            (name.clone(), rules)
        })
        .collect();
    TablePlan {
        table: table.name.clone(),
        jumps,
        chains,
        kept,
    }
}

impl TablePlan {
    pub fn is_empty(&self) -> bool {
        self.jumps.is_empty() && self.chains.is_empty()
    }

    /// Input for `iptables-restore --noflush`: flush the removed chains (a chain line of an
    /// existing chain flushes it), delete the jumps to them, delete them. Empty plan: `None`.
    pub fn restore_input(&self) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let mut out = format!("*{}\n", self.table);
        for (chain, _) in &self.chains {
            out.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for jump in &self.jumps {
            out.push_str(&format!("-D {} {}\n", jump.chain, jump.spec));
        }
        for (chain, _) in &self.chains {
            out.push_str(&format!("-X {chain}\n"));
        }
        out.push_str("COMMIT\n");
        Some(out)
    }

    /// Report lines, e.g. `nat: 3 jump rules (PREROUTING -> KUBE-SERVICES, ...)`.
    fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.jumps.is_empty() {
            let list: Vec<String> = self
                .jumps
                .iter()
                .map(|j| format!("{} -> {}", j.chain, j.target))
                .collect();
            lines.push(format!(
                "{}: {} jump rule{} ({})",
                self.table,
                self.jumps.len(),
                plural(self.jumps.len()),
                list.join(", ")
            ));
        }
        if !self.chains.is_empty() {
            let rules: usize = self.chains.iter().map(|(_, n)| n).sum();
            let names: Vec<&str> = self.chains.iter().map(|(c, _)| c.as_str()).collect();
            lines.push(format!(
                "{}: {} chain{} flushed and deleted ({rules} rule{}): {}",
                self.table,
                self.chains.len(),
                plural(self.chains.len()),
                plural(rules),
                names.join(", ")
            ));
        }
        for (chain, referrer) in &self.kept {
            lines.push(format!(
                "{}: {chain} kept: chain {referrer}, which is not kube-proxy's, jumps to it",
                self.table
            ));
        }
        lines
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `nft list tables` output -> the families that hold a `kube-proxy` table kube-proxy owns.
pub fn kube_proxy_nft_families(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("table"), Some(family), Some(NFT_TABLE), None)
                    if NFT_FAMILIES.contains(&family) =>
                {
                    Some(family.to_owned())
                }
                _ => None,
            }
        })
        .collect()
}

/// `ip -j -d link show dev X` output -> the link kind (`dummy`, `bridge`, ...), if any.
pub fn link_kind(json: &str) -> Option<String> {
    let links: serde_json::Value = serde_json::from_str(json).ok()?;
    links
        .get(0)?
        .get("linkinfo")?
        .get("info_kind")?
        .as_str()
        .map(str::to_owned)
}

/// Counts for the closing line.
#[derive(Default)]
struct Totals {
    chains: usize,
    jumps: usize,
    nft_tables: usize,
    links: usize,
    failures: Vec<String>,
}

/// Virtual servers in `/proc/net/ip_vs`: the lines that start one (`TCP`, `UDP`, `SCTP`
/// or `FWM` and its address), not the header nor their real servers (`  -> `).
fn ipvs_virtual_servers(table: &str) -> usize {
    table
        .lines()
        .filter(|l| {
            ["TCP ", "UDP ", "SCTP ", "FWM "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .count()
}

/// Runs the cleanup (or, with `dry_run`, reports what it would remove). Fails only when a
/// command that reads or removes rules fails; missing tools are skipped with a note.
pub fn run(dry_run: bool) -> Result<()> {
    let mut totals = Totals::default();
    for backend in iptables_backends() {
        backend.clean(dry_run, &mut totals);
    }
    clean_nftables(dry_run, &mut totals);
    clean_ipvs(dry_run, &mut totals);
    println!(
        "cleanup-iptables: {} {} iptables chain{}, {} jump rule{}, {} nftables table{}, {} interface{}",
        if dry_run { "would remove" } else { "removed" },
        totals.chains,
        plural(totals.chains),
        totals.jumps,
        plural(totals.jumps),
        totals.nft_tables,
        plural(totals.nft_tables),
        totals.links,
        plural(totals.links),
    );
    if !totals.failures.is_empty() {
        bail!(
            "{} step{} failed:\n  {}",
            totals.failures.len(),
            plural(totals.failures.len()),
            totals.failures.join("\n  ")
        );
    }
    Ok(())
}

/// One iptables backend for one family: a save and a restore binary.
struct Backend {
    /// `iptables-nft`, `ip6tables-legacy`, ... (or `iptables` when no variant is installed).
    label: String,
    family: &'static str,
    save: PathBuf,
    restore: PathBuf,
}

/// The installed backends; missing ones are reported and skipped.
fn iptables_backends() -> Vec<Backend> {
    let mut found = Vec::new();
    for (prefix, family) in [("iptables", "IPv4"), ("ip6tables", "IPv6")] {
        let mut any = false;
        for variant in ["legacy", "nft"] {
            let label = format!("{prefix}-{variant}");
            match (
                find_binary(&format!("{label}-save")),
                find_binary(&format!("{label}-restore")),
            ) {
                (Some(save), Some(restore)) => {
                    any = true;
                    found.push(Backend {
                        label,
                        family,
                        save,
                        restore,
                    });
                }
                _ => println!("{label} ({family}): not installed, skipped"),
            }
        }
        if !any {
            // Old distributions ship only the unsuffixed tools.
            if let (Some(save), Some(restore)) = (
                find_binary(&format!("{prefix}-save")),
                find_binary(&format!("{prefix}-restore")),
            ) {
                found.push(Backend {
                    label: prefix.to_owned(),
                    family,
                    save,
                    restore,
                });
            }
        }
    }
    found
}

impl Backend {
    fn clean(&self, dry_run: bool, totals: &mut Totals) {
        let name = format!("{} ({})", self.label, self.family);
        let tables = match run_tool(&self.save, &[], None).and_then(|dump| parse_save(&dump)) {
            Ok(tables) => tables,
            Err(e) => {
                println!("{name}: reading the rules failed: {e:#}");
                totals.failures.push(format!("{name}: {e:#}"));
                return;
            }
        };
        let plans: Vec<TablePlan> = tables
            .iter()
            .map(plan_table)
            .filter(|p| !p.is_empty() || !p.kept.is_empty())
            .collect();
        if plans.is_empty() {
            println!("{name}: nothing of kube-proxy's");
            return;
        }
        println!("{name}:{}", if dry_run { " would remove" } else { "" });
        for plan in &plans {
            for line in plan.describe() {
                println!("  {line}");
            }
            let Some(input) = plan.restore_input() else {
                continue;
            };
            if dry_run {
                println!("  {}: iptables-restore --noflush input:", plan.table);
                for line in input.lines() {
                    println!("    {line}");
                }
            } else if let Err(e) = run_tool(&self.restore, &["--noflush", "-w", "5"], Some(&input))
            {
                println!("  {}: removal failed: {e:#}", plan.table);
                totals
                    .failures
                    .push(format!("{name} table {}: {e:#}", plan.table));
                continue;
            }
            totals.chains += plan.chains.len();
            totals.jumps += plan.jumps.len();
        }
    }
}

fn clean_nftables(dry_run: bool, totals: &mut Totals) {
    let Some(nft) = find_binary("nft") else {
        println!("nftables: nft not installed, skipped");
        return;
    };
    let families = match run_tool(&nft, &["list", "tables"], None) {
        Ok(listing) => kube_proxy_nft_families(&listing),
        Err(e) => {
            println!("nftables: listing tables failed: {e:#}");
            totals.failures.push(format!("nftables: {e:#}"));
            return;
        }
    };
    if families.is_empty() {
        println!("nftables: no {NFT_TABLE} table");
    }
    for family in families {
        // Terse: sets and maps without their elements.
        let contents = run_tool(&nft, &["-t", "list", "table", &family, NFT_TABLE], None)
            .map(|text| {
                let count = |kind: &str| {
                    text.lines()
                        .filter(|l| l.trim_start().starts_with(kind))
                        .count()
                };
                let chains = count("chain ");
                format!(
                    " ({chains} chain{}, {} sets and maps)",
                    plural(chains),
                    count("set ") + count("map ")
                )
            })
            .unwrap_or_default();
        let table = format!("table {family} {NFT_TABLE}{contents}");
        if dry_run {
            println!("nftables: would delete {table}");
        } else if let Err(e) = run_tool(&nft, &["delete", "table", &family, NFT_TABLE], None) {
            println!("nftables: deleting {table} failed: {e:#}");
            totals.failures.push(format!("nftables {family}: {e:#}"));
            continue;
        } else {
            println!("nftables: deleted {table}");
        }
        totals.nft_tables += 1;
    }
}

fn clean_ipvs(dry_run: bool, totals: &mut Totals) {
    // /proc/net follows the network namespace of the reader.
    match std::fs::read_to_string("/proc/net/ip_vs") {
        Ok(table) => match ipvs_virtual_servers(&table) {
            0 => println!("IPVS: loaded, no virtual servers"),
            n => println!(
                "IPVS: {n} virtual server{} left, not removed here (no ipvsadm in this                  program): they still balance what reaches this node's stack for their                  addresses; run `ipvsadm --clear` (and `ipset destroy` for kube-proxy's                  KUBE-* sets) if kube-proxy ran in IPVS mode",
                plural(n)
            ),
        },
        Err(_) => println!("IPVS: not loaded, no virtual servers to remove"),
    }
    if !interface_exists(IPVS_DUMMY) {
        println!("IPVS: no {IPVS_DUMMY} interface");
        return;
    }
    let Some(ip) = find_binary("ip") else {
        println!("IPVS: {IPVS_DUMMY} exists but ip (iproute2) is not installed, skipped");
        return;
    };
    let kind = match run_tool(&ip, &["-j", "-d", "link", "show", "dev", IPVS_DUMMY], None) {
        Ok(json) => link_kind(&json),
        Err(e) => {
            println!("IPVS: reading {IPVS_DUMMY} failed: {e:#}");
            totals.failures.push(format!("{IPVS_DUMMY}: {e:#}"));
            return;
        }
    };
    // kube-proxy deletes it only if it is a dummy device; so do we.
    if kind.as_deref() != Some("dummy") {
        println!(
            "IPVS: {IPVS_DUMMY} is a {} device, not kube-proxy's dummy: left alone",
            kind.as_deref().unwrap_or("plain")
        );
        return;
    }
    if dry_run {
        println!("IPVS: would delete the dummy interface {IPVS_DUMMY}");
    } else if let Err(e) = run_tool(&ip, &["link", "delete", "dev", IPVS_DUMMY], None) {
        println!("IPVS: deleting {IPVS_DUMMY} failed: {e:#}");
        totals.failures.push(format!("{IPVS_DUMMY}: {e:#}"));
        return;
    } else {
        println!("IPVS: deleted the dummy interface {IPVS_DUMMY}");
    }
    totals.links += 1;
}

/// Whether a network interface of this network namespace has this name.
fn interface_exists(name: &str) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// `name` in `$PATH`, or in the sbin directories a minimal `$PATH` may lack.
fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs a tool, optionally feeding it `stdin`, and returns its stdout; the error names the
/// command and carries its stderr.
fn run_tool(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let shown = shown.trim_end();
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().context("stdin was piped")?;
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing to `{shown}`"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node after kube-proxy (iptables mode) ran next to the kubelet, Docker and a user's
    /// rule, as `iptables-save` prints it.
    const NODE: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables) on Thu Nov 26 14:00:00 2026
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
# Completed on Thu Nov 26 14:00:00 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
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
-A INPUT -p tcp -m tcp --dport 22 -m comment --comment "ssh; not -j KUBE-SERVICES" -j ACCEPT
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -o docker0 -j DOCKER
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-SERVICES -d 10.96.0.99/32 -p tcp -m comment --comment "default/empty:http has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
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
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ULMVA6XW4YAZ7W2T - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A KUBE-EXT-ULMVA6XW4YAZ7W2T -m comment --comment "masquerade traffic for default/web:http external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-ULMVA6XW4YAZ7W2T -j KUBE-SVC-ULMVA6XW4YAZ7W2T
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j KUBE-EXT-ULMVA6XW4YAZ7W2T
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-ASQ2MJ7JW3FH4BAF -s 10.244.0.10/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-ASQ2MJ7JW3FH4BAF -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.244.0.10:8080
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-ULMVA6XW4YAZ7W2T
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-ULMVA6XW4YAZ7W2T ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-ULMVA6XW4YAZ7W2T -m comment --comment "default/web:http -> 10.244.0.10:8080" -j KUBE-SEP-ASQ2MJ7JW3FH4BAF
COMMIT
"#;

    fn restore_inputs(dump: &str) -> Vec<String> {
        parse_save(dump)
            .expect("the dump parses")
            .iter()
            .filter_map(|t| plan_table(t).restore_input())
            .collect()
    }

    #[test]
    fn a_kube_proxy_node_gives_exactly_the_deletions_kube_proxy_cleanup_makes() {
        assert_eq!(
            restore_inputs(NODE),
            [
                "*mangle\n\
                 :KUBE-PROXY-CANARY - [0:0]\n\
                 -X KUBE-PROXY-CANARY\n\
                 COMMIT\n",
                "*filter\n\
                 :KUBE-EXTERNAL-SERVICES - [0:0]\n\
                 :KUBE-FORWARD - [0:0]\n\
                 :KUBE-NODEPORTS - [0:0]\n\
                 :KUBE-PROXY-CANARY - [0:0]\n\
                 :KUBE-PROXY-FIREWALL - [0:0]\n\
                 :KUBE-SERVICES - [0:0]\n\
                 -D INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
                 -D INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
                 -D INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
                 -D FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
                 -D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
                 -D FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                 -D FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
                 -D OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
                 -D OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                 -X KUBE-EXTERNAL-SERVICES\n\
                 -X KUBE-FORWARD\n\
                 -X KUBE-NODEPORTS\n\
                 -X KUBE-PROXY-CANARY\n\
                 -X KUBE-PROXY-FIREWALL\n\
                 -X KUBE-SERVICES\n\
                 COMMIT\n",
                "*nat\n\
                 :KUBE-EXT-ULMVA6XW4YAZ7W2T - [0:0]\n\
                 :KUBE-MARK-MASQ - [0:0]\n\
                 :KUBE-NODEPORTS - [0:0]\n\
                 :KUBE-POSTROUTING - [0:0]\n\
                 :KUBE-PROXY-CANARY - [0:0]\n\
                 :KUBE-SEP-ASQ2MJ7JW3FH4BAF - [0:0]\n\
                 :KUBE-SERVICES - [0:0]\n\
                 :KUBE-SVC-ULMVA6XW4YAZ7W2T - [0:0]\n\
                 -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                 -D OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                 -D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
                 -X KUBE-EXT-ULMVA6XW4YAZ7W2T\n\
                 -X KUBE-MARK-MASQ\n\
                 -X KUBE-NODEPORTS\n\
                 -X KUBE-POSTROUTING\n\
                 -X KUBE-PROXY-CANARY\n\
                 -X KUBE-SEP-ASQ2MJ7JW3FH4BAF\n\
                 -X KUBE-SERVICES\n\
                 -X KUBE-SVC-ULMVA6XW4YAZ7W2T\n\
                 COMMIT\n",
            ]
        );
    }

    #[test]
    fn the_kubelets_chains_and_their_jumps_stay() {
        for table in parse_save(NODE).unwrap() {
            let plan = plan_table(&table);
            for (chain, _) in &plan.chains {
                assert!(
                    !["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"]
                        .contains(&chain.as_str()),
                    "{} {chain} is the kubelet's",
                    table.name
                );
            }
            assert!(plan.jumps.iter().all(|j| j.target != "KUBE-FIREWALL"));
        }
    }

    #[test]
    fn counts_per_table_name_jumps_chains_and_their_rules() {
        let tables = parse_save(NODE).unwrap();
        let nat = plan_table(&tables[2]);
        assert_eq!(
            nat.describe(),
            [
                "nat: 3 jump rules (PREROUTING -> KUBE-SERVICES, OUTPUT -> KUBE-SERVICES, POSTROUTING -> KUBE-POSTROUTING)",
                "nat: 8 chains flushed and deleted (13 rules): KUBE-EXT-ULMVA6XW4YAZ7W2T, KUBE-MARK-MASQ, KUBE-NODEPORTS, KUBE-POSTROUTING, KUBE-PROXY-CANARY, KUBE-SEP-ASQ2MJ7JW3FH4BAF, KUBE-SERVICES, KUBE-SVC-ULMVA6XW4YAZ7W2T",
            ]
        );
        let mangle = plan_table(&tables[0]);
        assert_eq!(
            mangle.describe(),
            ["mangle: 1 chain flushed and deleted (0 rules): KUBE-PROXY-CANARY"]
        );
    }

    #[test]
    fn a_kube_proxy_chain_another_chain_still_jumps_to_is_kept_with_what_it_reaches() {
        // An old kubelet's hostport chain uses KUBE-MARK-MASQ: deleting it would cut that
        // rule (and make the restore fail), so it stays; the rest goes.
        let dump = "*nat\n\
            :PREROUTING ACCEPT [0:0]\n\
            :KUBE-HOSTPORTS - [0:0]\n\
            :KUBE-MARK-MASQ - [0:0]\n\
            :KUBE-SERVICES - [0:0]\n\
            :KUBE-SVC-AAAA - [0:0]\n\
            -A PREROUTING -j KUBE-HOSTPORTS\n\
            -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
            -A KUBE-HOSTPORTS -p tcp -m tcp --dport 8443 -j KUBE-SVC-AAAA\n\
            -A KUBE-SVC-AAAA -j KUBE-MARK-MASQ\n\
            -A KUBE-SERVICES -j KUBE-SVC-AAAA\n\
            COMMIT\n";
        let tables = parse_save(dump).unwrap();
        let plan = plan_table(&tables[0]);
        assert_eq!(
            plan.kept,
            [
                ("KUBE-SVC-AAAA".to_owned(), "KUBE-HOSTPORTS".to_owned()),
                ("KUBE-MARK-MASQ".to_owned(), "KUBE-SVC-AAAA".to_owned()),
            ]
        );
        assert_eq!(
            plan.restore_input().as_deref(),
            Some(
                "*nat\n\
                 :KUBE-SERVICES - [0:0]\n\
                 -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                 -X KUBE-SERVICES\n\
                 COMMIT\n"
            )
        );
    }

    #[test]
    fn ipvs_mode_chains_go_too() {
        let dump = "*filter\n\
            :INPUT ACCEPT [0:0]\n\
            :OUTPUT ACCEPT [0:0]\n\
            :KUBE-IPVS-FILTER - [0:0]\n\
            :KUBE-IPVS-OUT-FILTER - [0:0]\n\
            :KUBE-NODE-PORT - [0:0]\n\
            :KUBE-SOURCE-RANGES-FIREWALL - [0:0]\n\
            -A INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER\n\
            -A INPUT -m comment --comment \"kubernetes health check rules\" -j KUBE-NODE-PORT\n\
            -A OUTPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-OUT-FILTER\n\
            -A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN\n\
            COMMIT\n";
        let plan = plan_table(&parse_save(dump).unwrap()[0]);
        assert_eq!(plan.jumps.len(), 3);
        assert_eq!(
            plan.chains,
            [
                ("KUBE-IPVS-FILTER".to_owned(), 1),
                ("KUBE-IPVS-OUT-FILTER".to_owned(), 0),
                ("KUBE-NODE-PORT".to_owned(), 0),
                ("KUBE-SOURCE-RANGES-FIREWALL".to_owned(), 0),
            ]
        );
    }

    #[test]
    fn service_chain_prefixes_count_only_in_nat() {
        assert!(is_kube_proxy_chain("nat", "KUBE-SEP-ASQ2MJ7JW3FH4BAF"));
        assert!(is_kube_proxy_chain("nat", "KUBE-FW-ULMVA6XW4YAZ7W2T"));
        assert!(!is_kube_proxy_chain("filter", "KUBE-SEP-ASQ2MJ7JW3FH4BAF"));
        assert!(is_kube_proxy_chain("nat", "KUBE-XLB-ULMVA6XW4YAZ7W2T"));
        assert!(!is_kube_proxy_chain("nat", "KUBE-MARK-DROP"));
        assert!(!is_kube_proxy_chain("filter", "KUBE-FIREWALL"));
        assert!(
            is_kube_proxy_chain("nat", "KUBE-FIREWALL"),
            "older IPVS mode's"
        );
        assert!(!is_kube_proxy_chain("raw", "KUBE-SERVICES"));
    }

    #[test]
    fn a_node_without_kube_proxy_needs_no_restore() {
        let dump = "*filter\n:INPUT ACCEPT [0:0]\n:DOCKER - [0:0]\n-A INPUT -j DOCKER\nCOMMIT\n";
        assert!(restore_inputs(dump).is_empty());
        assert!(restore_inputs("").is_empty());
    }

    #[test]
    fn counters_from_save_dash_c_are_ignored_and_specs_kept_verbatim() {
        let dump = "*nat\n\
            :PREROUTING ACCEPT [12:720]\n\
            :KUBE-SERVICES - [0:0]\n\
            [12:720] -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
            COMMIT\n";
        let tables = parse_save(dump).unwrap();
        assert_eq!(
            tables[0].rules,
            [SavedRule {
                chain: "PREROUTING".to_owned(),
                spec: "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
                    .to_owned(),
                target: Some("KUBE-SERVICES".to_owned()),
            }]
        );
    }

    #[test]
    fn words_follow_iptables_quoting_and_comments_never_count_as_jumps() {
        assert_eq!(
            tokenize(r#"-m comment --comment "a \"quoted\" -j X" -j  KUBE-SVC-A"#).unwrap(),
            [
                "-m",
                "comment",
                "--comment",
                r#"a "quoted" -j X"#,
                "-j",
                "KUBE-SVC-A"
            ]
        );
        let target = |spec: &str| rule_target(&tokenize(spec).unwrap());
        assert_eq!(target("--comment -j -j ACCEPT").as_deref(), Some("ACCEPT"));
        assert_eq!(target("-g KUBE-SEP-B").as_deref(), Some("KUBE-SEP-B"));
        assert_eq!(target("-p tcp --dport 22"), None);
        assert!(tokenize("--comment \"open").is_err());
    }

    #[test]
    fn output_that_is_not_iptables_save_is_refused() {
        assert!(parse_save("-A INPUT -j ACCEPT\n").is_err());
        assert!(parse_save("*nat\n:PREROUTING ACCEPT [0:0]\n").is_err());
        assert!(parse_save("*nat\nChain PREROUTING (policy ACCEPT)\nCOMMIT\n").is_err());
        assert!(parse_save("*nat\n:KUBE-SERVICES\nCOMMIT\n").is_err());
        // iptables-nft before 1.8.9 on a table holding native nft expressions.
        assert!(parse_save("# Table `nat' is incompatible, use 'nft' tool.\n").is_err());
    }

    #[test]
    fn only_ip_and_ip6_kube_proxy_tables_are_kube_proxys() {
        let listing = "table ip nat\ntable ip kube-proxy\ntable inet filter\n\
                       table inet kube-proxy\ntable ip6 kube-proxy\ntable ip kube-proxy-extra\n";
        assert_eq!(kube_proxy_nft_families(listing), ["ip", "ip6"]);
        assert!(kube_proxy_nft_families("").is_empty());
    }

    #[test]
    fn ipvs_virtual_servers_are_counted_without_their_real_servers() {
        let table = "IP Virtual Server version 1.2.1 (size=4096)\n\
            Prot LocalAddress:Port Scheduler Flags\n\
              -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n\
            TCP  0A600001:01BB rr\n\
              -> C0A80002:192B      Masq    1      0          0\n\
            UDP  0A60000A:0035 rr\n\
              -> 0AF40003:0035      Masq    1      0          0\n\
              -> 0AF40004:0035      Masq    1      0          0\n";
        assert_eq!(ipvs_virtual_servers(table), 2);
        assert_eq!(
            ipvs_virtual_servers("IP Virtual Server version 1.2.1 (size=4096)\n"),
            0
        );
    }

    #[test]
    fn only_a_dummy_kube_ipvs0_is_recognised() {
        let dummy = r#"[{"ifindex":5,"ifname":"kube-ipvs0","linkinfo":{"info_kind":"dummy"}}]"#;
        let bridge = r#"[{"ifindex":5,"ifname":"kube-ipvs0","linkinfo":{"info_kind":"bridge","info_data":{}}}]"#;
        assert_eq!(link_kind(dummy).as_deref(), Some("dummy"));
        assert_eq!(link_kind(bridge).as_deref(), Some("bridge"));
        assert_eq!(link_kind(r#"[{"ifname":"kube-ipvs0"}]"#), None);
        assert_eq!(link_kind("not json"), None);
    }
}
