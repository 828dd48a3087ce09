//! eBPF programs of ebpf-kube-proxy.
//!
//! - `sock`: socket-level load balancing for east-west traffic (cgroup `connect4`,
//!   `sendmsg4`, `recvmsg4`, `getpeername4`): a Service address is rewritten to a backend
//!   once per connection (per datagram for unconnected UDP), and back for the application.
//! - `lb`: backend selection (random, session affinity), shared by both.
//! - `maps`: every map, declared once.
#![no_std]
#![no_main]

mod lb;
mod maps;
mod sock;

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
