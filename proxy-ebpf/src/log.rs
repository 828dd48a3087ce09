//! Logging that is off unless the agent switches it on (`LOG`, `LOG_LEVEL_*`).
//!
//! `log_error!` / `log_debug!` write a record behind one array lookup: with the switch off
//! (the default) a log point costs that lookup and a branch the program falls through (the
//! record's code is marked cold), and writes nothing. When on, the record (`LogRecord`: an
//! event number, the program, a backend id, four numbers) goes to the object's ring buffer
//! (`LOG_RECORDS`), and the agent that loaded the programs words it; a full buffer (no
//! reader) drops the record, it never blocks or changes a verdict. Records name what the
//! program saw (addresses, ports, ids), never payload.

use proxy_common::LogRecord;

use crate::maps::{LOG, LOG_RECORDS};

/// True when the switch is at `level` or above.
#[inline(always)]
pub fn enabled(level: u8) -> bool {
    match LOG.get_ptr(0) {
        // SAFETY: a one-byte read from a live array value.
        Some(config) => (unsafe { (*config).level }) >= level,
        None => false,
    }
}

/// The first word of a record: `event`, `level`, `hook`, padding and `backend_id`, as
/// [`ekp_log`] takes it.
#[inline(always)]
pub const fn head(level: u8, event: u8, hook: u8, backend_id: u32) -> u64 {
    event as u64 | (level as u64) << 8 | (hook as u64) << 16 | (backend_id as u64) << 32
}

const _: () = assert!(
    core::mem::offset_of!(LogRecord, event) == 0
        && core::mem::offset_of!(LogRecord, level) == 1
        && core::mem::offset_of!(LogRecord, hook) == 2
        && core::mem::offset_of!(LogRecord, backend_id) == 4
        && core::mem::offset_of!(LogRecord, args) == 8
        && core::mem::size_of::<LogRecord>() == 40
        && cfg!(target_endian = "little")
);

/// Writes one record (the caller checked the switch): its first word ([`head`]) and four
/// arguments. A global BPF function (as `lb::ekp_find_backend`): the verifier checks it
/// once, and a log point costs the programs that call it five register moves and a call,
/// nothing on their stack (a record built there would count against the 512 bytes of the
/// north-south programs' call chains). Returns 0, or 1 when the buffer was full and the
/// record dropped.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ekp_log(head: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i32 {
    let Some(mut entry) = LOG_RECORDS.reserve(0) else {
        return 1;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: a reserved, writable `LogRecord`, every word of it written before the submit.
    unsafe {
        *record.cast::<u64>() = head;
        (*record).args = [a0, a1, a2, a3];
    }
    entry.submit(0);
    0
}

/// Writes a record at `$level` if the switch is there: `log_x!(LOG_EVENT_*, LOG_HOOK_*,
/// backend id, [up to four arguments])`, evaluated only then, the missing ones zero.
macro_rules! log_record {
    ($level:expr, $event:expr, $hook:expr, $backend_id:expr, [$($arg:expr),* $(,)?]) => {
        if $crate::log::enabled($level) {
            core::hint::cold_path();
            let [a0, a1, a2, a3] = $crate::log::args([$($arg),*]);
            $crate::log::ekp_log(
                $crate::log::head($level, $event, $hook, $backend_id),
                a0,
                a1,
                a2,
                a3,
            );
        }
    };
}

/// Up to four arguments, padded with zeros.
#[inline(always)]
pub const fn args<const N: usize>(given: [u64; N]) -> [u64; proxy_common::LOG_RECORD_ARGS] {
    const { assert!(N <= proxy_common::LOG_RECORD_ARGS, "too many log arguments") };
    let mut all = [0; proxy_common::LOG_RECORD_ARGS];
    let mut i = 0;
    while i < N {
        all[i] = given[i];
        i += 1;
    }
    all
}

/// Errors and unusual events (`LOG_LEVEL_ERROR`).
macro_rules! log_error {
    ($($record:tt)+) => {
        $crate::log::log_record!(proxy_common::LOG_LEVEL_ERROR, $($record)+)
    };
}

/// Per-connection and per-flow events (`LOG_LEVEL_DEBUG`).
macro_rules! log_debug {
    ($($record:tt)+) => {
        $crate::log::log_record!(proxy_common::LOG_LEVEL_DEBUG, $($record)+)
    };
}

pub(crate) use {log_debug, log_error, log_record};
