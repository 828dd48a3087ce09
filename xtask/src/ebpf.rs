//! Building the eBPF object, shared by `cargo xtask build-ebpf` and the userspace build
//! script (which embeds the object in the binary).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cmd, toolchain};

pub const TARGET: &str = "bpfel-unknown-none";

/// The eBPF crate gets its own target directory: the userspace build script runs this
/// while the outer cargo holds the lock on the main one.
pub fn target_dir(workspace: &Path) -> PathBuf {
    workspace.join("target/ebpf")
}

/// Path of the built object for a workspace.
pub fn object_path(workspace: &Path) -> PathBuf {
    target_dir(workspace)
        .join(TARGET)
        .join("release/proxy-ebpf")
}

/// Builds `proxy-ebpf` (release: the verifier rejects debug builds) with BTF kept, so that
/// bpftool shows map field names. Cargo makes this a no-op when nothing changed.
pub fn build(workspace: &Path) -> Result<PathBuf> {
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(workspace)
        .args([
            "build",
            "--package",
            "proxy-ebpf",
            "--release",
            "--target",
            TARGET,
        ])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir(workspace))
        // build-std needs nightly features; stable rustc allows them with this, for this
        // crate only.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", "-Cdebuginfo=2 -Clink-arg=--btf")
        // Settings of an outer cargo (build script, clippy) must not leak into this build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env("PATH", path_with_cargo_bin());
    cmd::run(&mut cargo).context(
        "building the eBPF object failed; `cargo xtask setup` installs rust-src and bpf-linker",
    )?;
    Ok(object_path(workspace))
}

fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths = vec![toolchain::cargo_bin_dir()];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).unwrap_or_default()
}
