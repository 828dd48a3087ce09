//! `cargo xtask <task>`: setup, build-ebpf, demo, test.

use std::path::PathBuf;

use anyhow::{Result, bail};
use xtask::{ebpf, toolchain};

const USAGE: &str = "usage: cargo xtask <setup | build-ebpf | demo | test>
  setup       install rust-src, bpf-linker and bpftool if missing (idempotent)
  build-ebpf  build the eBPF object (release, BTF kept)
  demo        set up, build, and run the ClusterIP demo in throwaway network namespaces (root)
  test        set up, build, and run every test, fmt and clippy (root for the privileged tests)";

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
    match task.as_str() {
        "setup" => toolchain::setup(),
        "build-ebpf" => {
            toolchain::setup()?;
            let obj = ebpf::build(&workspace())?;
            println!("eBPF object: {}", obj.display());
            Ok(())
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task `{other}`\n{USAGE}"),
    }
}
