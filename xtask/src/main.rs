//! `cargo xtask <task>`: setup, build-ebpf, demo, test, chart-test, bench.

mod bench;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use xtask::{chart, cmd, demo, ebpf, toolchain};

const USAGE: &str = "usage: cargo xtask <setup | build-ebpf | demo | test | chart-test | bench>
  setup       install rust-src, bpf-linker and bpftool if missing (idempotent)
  build-ebpf  build the eBPF object (release, BTF kept)
  demo        set up, build, and run the ClusterIP demo in throwaway network namespaces (root)
  test        set up, then fmt check, clippy, chart checks, and every test (root for the privileged ones)
  chart-test  install helm and kubernetes-validate if missing, then the Helm chart checks
  bench       latency and programming time against kube-proxy's iptables and nftables rules (root;
              --quick, --services 1,5000,30000, --out DIR; see xtask/src/bench/mod.rs)";

fn workspace() -> PathBuf {
    // xtask lives one level below the workspace root.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        bail!("{USAGE}");
    };
    let root = workspace();
    match task.as_str() {
        "setup" => toolchain::setup(),
        "build-ebpf" => {
            toolchain::setup()?;
            let obj = ebpf::build(&root)?;
            println!("eBPF object: {}", obj.display());
            Ok(())
        }
        "demo" => {
            toolchain::setup()?;
            let bins = build_binaries(&root)?;
            demo::run(&root, &bins)
        }
        "test" => {
            toolchain::setup()?;
            test(&root)
        }
        "chart-test" => {
            chart::setup()?;
            chart::chart_tests(&root)
        }
        "bench" => {
            if bench::help_asked(&args[1..]) {
                println!("{}", bench::HELP);
                return Ok(());
            }
            toolchain::setup()?;
            bench::run(&root, &args[1..])
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task `{other}`\n{USAGE}"),
    }
}

/// Builds the agent and the peer (debug, the same artifacts the tests use).
fn build_binaries(root: &Path) -> Result<demo::Binaries> {
    cmd::run(
        cmd::new(
            "cargo",
            &["build", "--package", "proxy-userspace", "--bins"],
        )
        .current_dir(root),
    )?;
    let dir = root.join("target/debug");
    Ok(demo::Binaries {
        agent: dir.join("ebpf-kube-proxy"),
        peer: dir.join("ekp-peer"),
        bpftool: toolchain::bpftool(),
    })
}

/// Formatting, lints, then every test of the default members (unit tests, and the
/// privileged namespace tests, which fail loudly when not run as root).
fn test(root: &Path) -> Result<()> {
    let cargo = |args: &[&str]| cmd::run(cmd::new("cargo", args).current_dir(root));
    println!("== cargo fmt --check");
    cargo(&["fmt", "--all", "--check"])?;
    println!("== cargo clippy");
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    println!("== chart checks");
    chart::setup()?;
    chart::chart_tests(root)?;
    println!("== cargo xtask bench --quick (outputs checked, numbers not judged)");
    bench::smoke(root)?;
    println!("== cargo test");
    let (passed, failed) = cargo_test(root)?;
    // One closing line for the whole run, so that CI reads the total and not the count of
    // whichever test binary happened to run last.
    println!("tests: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} tests failed");
    }
    Ok(())
}

/// `cargo test`, echoing its output and adding up its `test result:` lines.
fn cargo_test(root: &Path) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = cmd::new("cargo", &["test"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some((p, f)) = parse_test_result(&line) {
                passed += p;
                failed += f;
            }
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("cargo test failed: {status}");
    }
    Ok((passed, failed))
}

/// "test result: ok. 8 passed; 0 failed; 0 ignored; ..." -> (8, 0).
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_result_lines_are_added_up() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 8 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.84s"
            ),
            Some((8, 0))
        );
        assert_eq!(
            parse_test_result(
                "test result: FAILED. 7 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((7, 1))
        );
        assert_eq!(parse_test_result("running 8 tests"), None);
    }
}
