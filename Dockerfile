# syntax=docker/dockerfile:1
# The ebpf-kube-proxy image (see README.md, "Container image"): the agent binary, which
# embeds the eBPF object, on a small Debian base.
#
#   docker build -t REGISTRY/ebpf-kube-proxy:0.1.0 .
#
# linux/amd64: `cargo xtask setup` fetches amd64 Debian packages.

# rust-src must match rustc exactly (TOOLCHAIN.md), so the compiler version is pinned.
ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Only what the build reads; target/ in the build context is never sent.
COPY .cargo .cargo
COPY Cargo.toml Cargo.lock ./
COPY proxy-common proxy-common
COPY proxy-ebpf proxy-ebpf
COPY proxy-userspace proxy-userspace
COPY xtask xtask
# rust-src for -Z build-std=core (Debian's package of the same version) and bpf-linker
# built against rustc's own LLVM; idempotent, as on our machines.
RUN cargo xtask setup
# The build script builds the eBPF object (release, BTF kept) and embeds it in the binary.
RUN cargo build --release --locked -p proxy-userspace --bin ebpf-kube-proxy \
 && install -D -m 0755 target/release/ebpf-kube-proxy /out/ebpf-kube-proxy

# bookworm-slim rather than distroless: the chart's init containers use its sh, stat and
# mount; the binary needs only glibc. `cleanup-iptables` runs Debian's iptables, nft and ip.
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ebpf-kube-proxy /usr/local/bin/ebpf-kube-proxy
ENTRYPOINT ["/usr/local/bin/ebpf-kube-proxy"]
