//! eBPF programs of ebpf-kube-proxy.
//!
//! - `sock`: socket-level load balancing for east-west traffic (cgroup `connect4`,
//!   `sendmsg4`, `recvmsg4`, `getpeername4`): a Service address is rewritten to a backend
//!   once per connection (for unconnected UDP: per socket, checked at every datagram), and
//!   back for the application;
//!   `sock_release` forgets a closing socket's translation.
//! - `nodeport`: north-south load balancing (TCX `ekp_tcx_in` / `ekp_tcx_out` on the node's
//!   devices): NodePort, externalIP and LoadBalancer traffic from outside the node is DNATed
//!   to a backend (and SNATed to the node for a remote one), replies are translated back.
//!   Its parts: `nat` (conntrack/NAT entries, SNAT ports, rewrites), `csum` (checksum
//!   updates), `parse` (bounds-checked header access), `fib` (forwarding past the stack),
//!   `icmp` (ICMP errors about translated flows), `time_wait` (which SNAT ports a backend's
//!   TIME_WAIT will let a new flow have).
//! - `lb`: backend selection (random, session affinity), shared by both.
//! - `maps`: every map, declared once.
//! - `log`: logging behind the agent's switch (off by default).
#![no_std]
#![no_main]
// BPF atomics (`sock_slot`); the build already runs with RUSTC_BOOTSTRAP for build-std.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod csum;
mod fib;
mod fragments;
mod icmp;
mod lb;
mod log;
mod maps;
mod nat;
mod nodeport;
mod ns_filter;
mod parse;
mod sock;
mod sock_slot;
mod sock_state;
mod time_wait;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The helpers used are not GPL-only, but the kernel's GPL-compatible license string keeps
/// every helper available to later programs.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
