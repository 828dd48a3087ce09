//! Logging that is off unless the agent switches it on (`LOG`, `LOG_LEVEL_*`).
//!
//! `log_error!` / `log_debug!` wrap aya-log's macros behind one array lookup: with the
//! switch off (the default) a log point costs that lookup and a branch the program falls
//! through (the record's code is marked cold), and writes nothing.
//! When on, a record goes to aya-log's ring buffer, which the agent that loaded the
//! programs reads; a full buffer (no reader) drops the record, it never blocks or changes
//! a verdict. Log points name what they saw (addresses and ports in the usual notation),
//! never payload.

use crate::maps::LOG;

/// True when the switch is at `level` or above.
#[inline(always)]
pub fn enabled(level: u8) -> bool {
    match LOG.get_ptr(0) {
        // SAFETY: a one-byte read from a live array value.
        Some(config) => (unsafe { (*config).level }) >= level,
        None => false,
    }
}

/// Errors and unusual events (`LOG_LEVEL_ERROR`).
macro_rules! log_error {
    ($ctx:expr, $($arg:tt)+) => {
        if $crate::log::enabled(proxy_common::LOG_LEVEL_ERROR) {
            core::hint::cold_path();
            aya_log_ebpf::error!($ctx, $($arg)+);
        }
    };
}

/// Per-connection and per-flow events (`LOG_LEVEL_DEBUG`).
macro_rules! log_debug {
    ($ctx:expr, $($arg:tt)+) => {
        if $crate::log::enabled(proxy_common::LOG_LEVEL_DEBUG) {
            core::hint::cold_path();
            aya_log_ebpf::debug!($ctx, $($arg)+);
        }
    };
}

pub(crate) use {log_debug, log_error};

/// An address in network order, as aya-log prints it with `{:i}` (a.b.c.d).
#[inline(always)]
pub fn ip(addr: u32) -> [u8; 4] {
    addr.to_ne_bytes()
}

/// A protocol number as a name.
#[inline(always)]
pub fn proto(proto: u8) -> &'static str {
    if proto == proxy_common::PROTO_TCP {
        "TCP"
    } else {
        "UDP"
    }
}
