//! Builds the eBPF object and hands it to `include_bytes_aligned!` through OUT_DIR.
//!
//! `EKP_EBPF_OBJECT=/path/to/proxy-ebpf` embeds a prebuilt object instead (container
//! builds); otherwise xtask's builder runs cargo for `bpfel-unknown-none`, which is a no-op
//! when the eBPF sources did not change.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=EKP_EBPF_OBJECT");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("proxy-ebpf.o");
    let object = match std::env::var_os("EKP_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(
                std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
            );
            let workspace = manifest
                .parent()
                .expect("proxy-userspace sits in the workspace")
                .to_path_buf();
            for input in [
                "proxy-ebpf/src",
                "proxy-ebpf/Cargo.toml",
                "proxy-common/src",
                "proxy-common/Cargo.toml",
            ] {
                println!("cargo:rerun-if-changed={}", workspace.join(input).display());
            }
            match xtask::ebpf::build(&workspace) {
                Ok(path) => path,
                Err(e) => panic!("{e:#}"),
            }
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if let Err(e) = std::fs::copy(&object, &out) {
        panic!(
            "copying the eBPF object {} to {}: {e}",
            object.display(),
            out.display()
        );
    }
}
