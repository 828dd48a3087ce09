//! Installs what building and testing the project needs, idempotently.
//!
//! The machines reach crates.io and Debian's archive only, and rustup cannot add components,
//! so (see TOOLCHAIN.md):
//! - `rust-src` for `-Z build-std=core` comes from Debian's `rust-src` package of the exact
//!   rustc version, fetched with a private apt configuration (the machine's apt sources are
//!   never edited) and linked into the rustup sysroot;
//! - `bpf-linker` is built from crates.io against rustc's own shared LLVM;
//! - a TCX-aware `bpftool` (>= 7.5) is unpacked from bookworm-backports into our tools
//!   directory;
//! - Debian's `iptables` and `nftables` (the `cleanup-iptables` tests load kube-proxy rule
//!   sets with them) are installed with apt-get when missing: the base image has neither.
//!
//! A second run finds everything in place and only checks versions.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFTOOL_MIN: (u32, u32) = (7, 5);

/// Suites searched for `rust-src`, in order. Backports carry the versions rustup's stable
/// is most likely to match; the others are tried when the archive has moved on.
const RUST_SRC_SUITES: &[&str] = &["trixie-backports", "trixie", "forky", "sid"];
const BPFTOOL_SUITES: &[&str] = &["bookworm-backports", "trixie"];

/// Where downloaded tools live: outside the work tree, so clones and `cargo clean` keep them.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EKP_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/ebpf-kube-proxy")
}

/// The `bpftool` the project uses (ours if installed, else the system's).
pub fn bpftool() -> PathBuf {
    let ours = tools_dir().join("bin/bpftool");
    if ours.exists() {
        ours
    } else {
        PathBuf::from("bpftool")
    }
}

/// `$CARGO_HOME/bin`, where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home).join("bin"),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cargo/bin")
        }
    }
}

/// Everything `setup` installs, checked or installed in order.
pub fn setup() -> Result<()> {
    ensure_rust_src().context("setting up rust-src (needed for -Z build-std=core)")?;
    ensure_bpf_linker().context("setting up bpf-linker")?;
    ensure_bpftool().context("setting up bpftool >= 7.5")?;
    ensure_netfilter_tools().context("installing iptables and nftables")?;
    Ok(())
}

fn rustc_version() -> Result<String> {
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let out = cmd::output(&mut cmd::new("rustc", &["--version"]))?;
    out.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .context("unexpected `rustc --version` output")
}

fn sysroot() -> Result<PathBuf> {
    let out = cmd::output(&mut cmd::new("rustc", &["--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

fn ensure_rust_src() -> Result<()> {
    let version = rustc_version()?;
    let link = sysroot()?.join("lib/rustlib/src/rust/library");
    if link.join("core/Cargo.toml").exists() {
        println!("setup: rust-src for rustc {version}: present");
        return Ok(());
    }
    let extract = tools_dir().join(format!("rust-src-{version}"));
    let library = extract.join(format!("usr/src/rustc-{version}/library"));
    if !library.join("core/Cargo.toml").exists() {
        println!("setup: rust-src for rustc {version}: fetching Debian's rust-src {version}");
        let deb = apt_download("rust-src", RUST_SRC_SUITES, |v| {
            v.split('+').next() == Some(version.as_str())
        })
        .with_context(|| {
            format!(
                "no Debian rust-src package matches rustc {version} in {RUST_SRC_SUITES:?}; \
                 the archive has moved past this compiler (see TOOLCHAIN.md, 'Archive churn')"
            )
        })?;
        if extract.exists() {
            fs::remove_dir_all(&extract)?;
        }
        fs::create_dir_all(&extract)?;
        cmd::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&extract))?;
    }
    if let Some(parent) = link.parent() {
        fs::create_dir_all(parent)?;
    }
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link).with_context(|| format!("removing stale {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&library, &link)
        .with_context(|| format!("linking {} -> {}", link.display(), library.display()))?;
    println!("setup: rust-src linked at {}", link.display());
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    let bin = cargo_bin_dir().join("bpf-linker");
    if let Ok(out) = cmd::output(Command::new(&bin).arg("--version"))
        && out.contains(BPF_LINKER_VERSION)
    {
        println!("setup: bpf-linker {BPF_LINKER_VERSION}: present");
        return Ok(());
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM (~1 min)");
    let sysroot = sysroot()?;
    let lib_dir = sysroot.join("lib");
    let llvm = fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .find_map(|name| {
            let stem = name.strip_prefix("lib")?.strip_suffix(".so")?;
            stem.starts_with("LLVM-").then(|| stem.to_owned())
        })
        .with_context(|| format!("no libLLVM-*.so in {}", lib_dir.display()))?;
    // "LLVM-22-rust-1.95.0-stable" -> feature "llvm-22"
    let major = llvm
        .split('-')
        .nth(1)
        .context("unexpected LLVM library name")?;
    let rustflags = format!(
        "-C link-arg=-L{lib} -C link-arg=-l{llvm} -C link-arg=-Wl,-rpath,{lib}",
        lib = lib_dir.display()
    );
    let mut install = cmd::new(
        "cargo",
        &[
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{major},no-llvm-linking"),
        ],
    );
    install
        .env("RUSTFLAGS", rustflags)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR");
    cmd::run(&mut install)
}

fn ensure_bpftool() -> Result<()> {
    for candidate in [bpftool(), PathBuf::from("bpftool")] {
        if let Some(v) = bpftool_version(&candidate)
            && v >= BPFTOOL_MIN
        {
            println!(
                "setup: bpftool {}.{} ({}): present",
                v.0,
                v.1,
                candidate.display()
            );
            return Ok(());
        }
    }
    println!("setup: fetching bpftool from {BPFTOOL_SUITES:?}");
    let deb = apt_download("bpftool", BPFTOOL_SUITES, |v| {
        parse_major_minor(v).is_some_and(|mm| mm >= BPFTOOL_MIN)
    })?;
    let extract = tools_dir().join("bpftool-pkg");
    if extract.exists() {
        fs::remove_dir_all(&extract)?;
    }
    fs::create_dir_all(&extract)?;
    cmd::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&extract))?;
    let bin_dir = tools_dir().join("bin");
    fs::create_dir_all(&bin_dir)?;
    let target = extract.join("usr/sbin/bpftool");
    let link = bin_dir.join("bpftool");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link)?;
    match bpftool_version(&link) {
        Some(v) if v >= BPFTOOL_MIN => {
            println!("setup: bpftool {}.{} at {}", v.0, v.1, link.display());
            Ok(())
        }
        _ => bail!(
            "the unpacked bpftool at {} does not run (missing libelf1, libcap2 or zlib1g?)",
            link.display()
        ),
    }
}

/// Programs of Debian's `iptables` and `nftables` packages the privileged tests run.
const NETFILTER_TOOLS: &[&str] = &[
    "iptables-legacy-restore",
    "iptables-nft-restore",
    "ip6tables-nft-restore",
    "nft",
];

fn ensure_netfilter_tools() -> Result<()> {
    let present = |tool: &str| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|dir| Path::new(dir).join(tool).exists())
    };
    if NETFILTER_TOOLS.iter().all(|tool| present(tool)) {
        println!("setup: iptables and nftables: present");
        return Ok(());
    }
    println!("setup: installing Debian's iptables and nftables");
    let apt = |args: &[&str]| {
        let mut c = cmd::new("apt-get", args);
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    cmd::output(&mut apt(&["update", "-q"]))?;
    cmd::output(&mut apt(&[
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "iptables",
        "nftables",
    ]))?;
    if let Some(tool) = NETFILTER_TOOLS.iter().find(|tool| !present(tool)) {
        bail!("{tool} is still missing after installing iptables and nftables");
    }
    Ok(())
}

fn bpftool_version(bin: &Path) -> Option<(u32, u32)> {
    // "bpftool v7.5.0\nusing libbpf v1.5\n..."
    let out = cmd::output(Command::new(bin).arg("version")).ok()?;
    let first = out.lines().next()?;
    parse_major_minor(first.split_whitespace().nth(1)?.trim_start_matches('v'))
}

fn parse_major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split(['.', '+', '-', '~']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Downloads the newest version of `package` that `accept` likes from the given Debian
/// suites, with an apt configuration of our own (own sources list, lists and cache), so
/// the machine's apt setup is neither read nor changed. Returns the .deb path.
fn apt_download(package: &str, suites: &[&str], accept: impl Fn(&str) -> bool) -> Result<PathBuf> {
    let root = tools_dir().join(format!("apt-{package}"));
    for dir in ["lists/partial", "cache/archives/partial", "etc", "debs"] {
        fs::create_dir_all(root.join(dir))?;
    }
    let sources: String = suites
        .iter()
        .map(|s| format!("deb [arch=amd64] http://deb.debian.org/debian {s} main\n"))
        .collect();
    fs::write(root.join("etc/sources.list"), sources)?;
    let conf = root.join("apt.conf");
    fs::write(
        &conf,
        format!(
            "Dir::Etc::SourceList \"{r}/etc/sources.list\";\n\
             Dir::Etc::SourceParts \"{r}/etc/none\";\n\
             Dir::State::Lists \"{r}/lists\";\n\
             Dir::Cache \"{r}/cache\";\n\
             APT::Architecture \"amd64\";\n\
             Acquire::Languages \"none\";\n\
             APT::Sandbox::User \"root\";\n",
            r = root.display()
        ),
    )?;
    let apt = |program: &str, args: &[&str]| {
        let mut c = cmd::new(program, args);
        c.env("APT_CONFIG", &conf).current_dir(root.join("debs"));
        c
    };
    cmd::output(&mut apt("apt-get", &["update", "-q"]))
        .with_context(|| format!("apt-get update for {suites:?}"))?;
    let madison = cmd::output(&mut apt("apt-cache", &["madison", package]))?;
    // "  rust-src | 1.95.0+dfsg1-2~bpo13+1 | http://deb.debian.org/debian trixie-backports/main amd64 Packages"
    // Suites are tried in the caller's order: an older suite's build fits this machine's libc.
    let offers: Vec<(&str, &str)> = madison
        .lines()
        .filter_map(|l| {
            let mut cols = l.split('|').skip(1).map(str::trim);
            Some((cols.next()?, cols.next()?))
        })
        .collect();
    let version = suites
        .iter()
        .find_map(|suite| {
            offers
                .iter()
                .find(|(v, origin)| origin.contains(&format!(" {suite}/")) && accept(v))
        })
        .map(|(v, _)| v.to_string())
        .with_context(|| format!("no acceptable {package} version; apt offers:\n{madison}"))?;
    cmd::output(&mut apt(
        "apt-get",
        &["download", "-q", &format!("{package}={version}")],
    ))?;
    let deb = fs::read_dir(root.join("debs"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
                && p.to_string_lossy().contains(&version.replace(':', "%3a"))
        })
        .with_context(|| format!("apt-get download {package}={version} left no .deb"))?;
    println!("setup: downloaded {}", deb.display());
    Ok(deb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_and_bpftool_versions() {
        assert_eq!(parse_major_minor("7.5.0+6.12.95-1~bpo12+1"), Some((7, 5)));
        assert_eq!(parse_major_minor("7.1.0"), Some((7, 1)));
        assert_eq!(parse_major_minor("garbage"), None);
    }
}
