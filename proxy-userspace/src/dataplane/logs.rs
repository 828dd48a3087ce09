//! The programs' logging: the switch they read (`ekp_log_v1`, `LOG_LEVEL_*`), the reader of
//! their records (`ekp_logbuf_v1`) and the words for them, forwarded to `tracing` under the
//! target `ebpf`.
//!
//! Each loaded object has its own ring buffer (not pinned): the programs write to the
//! buffer of the object they came from. `start` swaps the newly loaded programs into the
//! pinned links, so the running agent's buffer is the one that fills. While no agent reads
//! (between a crash and the restart), the old buffer fills and the programs' reservations
//! fail: records are dropped, nothing blocks and no verdict changes.
//!
//! A record is numbers in a fixed layout (`LogRecord`: event, program, backend id, four
//! arguments); the messages are made here, so that a log point costs the programs a few
//! instructions and the verifier next to nothing.

use std::fmt;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use anyhow::{Context, Result};
use aya::Ebpf;
use aya::maps::{Array, MapData, RingBuf};
use proxy_common::{
    LOG_DROP_MAP_FULL, LOG_DROP_NO_FREE_PORT, LOG_EVENT_FLOW_DROPPED, LOG_EVENT_FLOW_NO_BACKEND,
    LOG_EVENT_NEW_FLOW, LOG_EVENT_OUTSIDE_SOURCE_RANGES, LOG_EVENT_SLOT_MISSING,
    LOG_EVENT_SOCK_NO_BACKEND, LOG_EVENT_SOCK_TRANSLATED, LOG_EVENT_TOO_BIG,
    LOG_EVENT_UNDEFINED_PORT, LOG_HOOK_CONNECT4, LOG_HOOK_CONNECT6, LOG_HOOK_POD_IN,
    LOG_HOOK_SENDMSG4, LOG_HOOK_TCX_IN, LOG_LEVEL_ERROR, LOG_REFUSAL_DROPPED, LOG_REFUSAL_PASSED,
    LogConfig, LogRecord, MAP_LOG, MAP_LOG_RECORDS, PROTO_TCP, PROTO_UDP,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::maps_dir;

/// Sets the level in the loaded object's (pinned) switch map, before the programs attach.
pub(super) fn set_loaded_level(ebpf: &mut Ebpf, level: u8) -> Result<()> {
    let map = ebpf
        .map_mut(MAP_LOG)
        .with_context(|| format!("map {MAP_LOG} missing from the eBPF object"))?;
    let mut array: Array<_, LogConfig> = Array::try_from(map)?;
    array
        .set(0, config(level), 0)
        .with_context(|| format!("writing {MAP_LOG}"))
}

/// Sets the level in the switch map pinned under `pin_dir`: the running programs see it
/// with their next log point.
pub fn set_pinned_level(pin_dir: &Path, level: u8) -> Result<()> {
    let mut array = open_pinned(pin_dir)?;
    array
        .set(0, config(level), 0)
        .with_context(|| format!("writing {MAP_LOG}"))
}

/// The level in the switch map pinned under `pin_dir`.
pub fn pinned_level(pin_dir: &Path) -> Result<u8> {
    let array = open_pinned(pin_dir)?;
    Ok(array
        .get(&0, 0)
        .with_context(|| format!("reading {MAP_LOG}"))?
        .level)
}

fn open_pinned(pin_dir: &Path) -> Result<Array<MapData, LogConfig>> {
    let path = maps_dir(pin_dir).join(MAP_LOG);
    let map = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is ebpf-kube-proxy running with this --pin-path?)",
            path.display()
        )
    })?;
    Ok(Array::try_from(aya::maps::Map::Array(map))?)
}

fn config(level: u8) -> LogConfig {
    LogConfig {
        level,
        _pad: [0; 7],
    }
}

/// How loud a record is: the level its log point wrote it at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Error,
    Debug,
}

/// A record in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub level: Level,
    pub text: String,
}

/// The records of a loaded object's ring buffer, in the order the programs wrote them.
pub struct LogReader {
    ring: RingBuf<MapData>,
}

impl LogReader {
    /// Takes the object's ring buffer (there is one reader per object).
    pub fn new(ebpf: &mut Ebpf) -> Result<Self> {
        let map = ebpf
            .take_map(MAP_LOG_RECORDS)
            .with_context(|| format!("map {MAP_LOG_RECORDS} missing from the eBPF object"))?;
        let ring = RingBuf::try_from(map)
            .with_context(|| format!("{MAP_LOG_RECORDS} is not a ring buffer"))?;
        Ok(Self { ring })
    }

    /// Every record written so far and not read yet, in words.
    pub fn read(&mut self) -> Vec<Message> {
        let mut messages = Vec::new();
        while let Some(item) = self.ring.next() {
            messages.push(message(&item));
        }
        messages
    }
}

impl AsRawFd for LogReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// Reads the object's log ring buffer for as long as it lives (the task stops with it).
pub(super) struct Forwarder {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes the object's ring buffer and forwards its records on the current tokio runtime.
/// Logging is not worth failing the datapath for: without a runtime or a buffer, it warns
/// and the programs' records are dropped as with nobody reading.
pub(super) fn forward(ebpf: &mut Ebpf) -> Option<Forwarder> {
    let runtime = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::warn!("eBPF log records will not be read: {e}");
            return None;
        }
    };
    let registered = LogReader::new(ebpf).and_then(|reader| {
        // SAFETY: the reader owns the ring buffer's file descriptor (an `OwnedFd` in its
        // `MapData`), keeps it open while it lives and always returns that one.
        Ok(unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) }?)
    });
    let mut reader = match registered {
        Ok(reader) => reader,
        Err(e) => {
            tracing::warn!("eBPF log records will not be read: {e:#}");
            return None;
        }
    };
    let task = runtime.spawn(async move {
        loop {
            let Ok(mut ready) = reader.readable_mut().await else {
                return;
            };
            // Cleared before reading: a record written after the read wakes the task
            // again, where clearing after it could swallow that wake-up.
            ready.clear_ready();
            for message in ready.get_inner_mut().read() {
                emit(&message);
            }
        }
    });
    Some(Forwarder { task })
}

/// Re-emits a record as a `tracing` event with the target `ebpf`, so `EKP_LOG` filters
/// them (`ebpf=off` hides them) and `--logging-format json` formats them like every other
/// line.
///
/// The switch map is the filter that matters: a record exists only because someone chose
/// its level with `bpf-log` or `--bpf-log-level`. Debug records are therefore shown at
/// `info`, so that switching to `debug` at run time shows them under the default filter
/// (`EKP_LOG=info`, the chart's default) without restarting the agent with another filter.
fn emit(message: &Message) {
    let text = &message.text;
    match message.level {
        Level::Error => tracing::error!(target: "ebpf", "{text}"),
        Level::Debug => tracing::info!(target: "ebpf", "{text}"),
    }
}

/// The message for the record in `bytes` (a ring buffer entry).
fn message(bytes: &[u8]) -> Message {
    if bytes.len() < size_of::<LogRecord>() {
        return Message {
            level: Level::Error,
            text: format!("a log record of {} bytes, too short to read", bytes.len()),
        };
    }
    // SAFETY: `bytes` holds at least a `LogRecord`, plain integers, read unaligned.
    let record: LogRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    Message {
        level: if record.level == LOG_LEVEL_ERROR {
            Level::Error
        } else {
            Level::Debug
        },
        text: words(&record),
    }
}

/// What the record says, as the log point would have put it.
fn words(record: &LogRecord) -> String {
    let hook = match record.hook {
        LOG_HOOK_CONNECT4 => "connect4",
        LOG_HOOK_SENDMSG4 => "sendmsg4",
        LOG_HOOK_CONNECT6 => "connect6",
        LOG_HOOK_TCX_IN => "tcx_in",
        LOG_HOOK_POD_IN => "pod_in",
        _ => "an unknown program",
    };
    let [a0, a1, a2, a3] = record.args;
    let backend = record.backend_id;
    match record.event {
        LOG_EVENT_SOCK_NO_BACKEND => format!(
            "{hook}: {} has no usable backend: failed with errno {a1}",
            Endpoint(a0)
        ),
        LOG_EVENT_SLOT_MISSING => format!(
            "{hook}: {}: slot {a1} of {a2} -> backend {backend} missing (0: no slot), left \
             untranslated",
            Endpoint(a0)
        ),
        LOG_EVENT_SOCK_TRANSLATED => {
            format!(
                "{hook}: {} -> {} (backend {backend})",
                Endpoint(a0),
                Address(a1)
            )
        }
        LOG_EVENT_TOO_BIG => format!(
            "{hook}: {} -> {} is larger than the next hop's MTU {a2}: {}",
            Address(a0),
            Endpoint(a1),
            if a3 != 0 {
                "answered with ICMP fragmentation needed"
            } else {
                "dropped (no don't-fragment: it cannot be fragmented here)"
            }
        ),
        LOG_EVENT_FLOW_NO_BACKEND => format!(
            "{hook}: {} -> {} has no usable backend: {}",
            Address(a0),
            Endpoint(a1),
            match a2 {
                LOG_REFUSAL_DROPPED => "dropped",
                LOG_REFUSAL_PASSED => "passed on to be refused",
                _ => "refused with ICMP port unreachable",
            }
        ),
        LOG_EVENT_OUTSIDE_SOURCE_RANGES => format!(
            "{hook}: {} -> {} is outside loadBalancerSourceRanges: dropped",
            Address(a0),
            Endpoint(a1)
        ),
        LOG_EVENT_FLOW_DROPPED => format!(
            "{hook}: {} -> {}: {}, new flow dropped",
            Address(a0),
            Endpoint(a1),
            match a2 {
                LOG_DROP_NO_FREE_PORT => "no free source port",
                LOG_DROP_MAP_FULL => "conntrack map refused the entry",
                _ => "an unknown cause",
            }
        ),
        LOG_EVENT_NEW_FLOW => format!(
            "{hook}: new flow {} -> {} => {} -> {} (backend {backend})",
            Address(a0),
            Endpoint(a1),
            Address(a2),
            Address(a3)
        ),
        LOG_EVENT_UNDEFINED_PORT => format!(
            "{hook}: {} is not a port of the ClusterIP's Service: {}",
            Endpoint(a0),
            match a1 {
                0 => "refused (ICMP port unreachable, where it can be answered)".to_string(),
                errno => format!("failed with errno {errno}"),
            }
        ),
        other => format!("{hook}: a log record of an unknown kind ({other})"),
    }
}

/// A log argument made with `log_endpoint`, shown as `address:port`.
struct Address(u64);

/// The same with its protocol: `address:port/TCP`.
struct Endpoint(u64);

impl Address {
    fn parts(self) -> (Ipv4Addr, u16, u8) {
        let v = self.0;
        // The address and port as the programs hold them: network order in memory.
        let addr = Ipv4Addr::from((v as u32).to_ne_bytes());
        (addr, u16::from_be((v >> 32) as u16), (v >> 48) as u8)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (addr, port, _) = Address(self.0).parts();
        write!(f, "{addr}:{port}")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (addr, port, proto) = Address(self.0).parts();
        match proto {
            PROTO_TCP => write!(f, "{addr}:{port}/TCP"),
            PROTO_UDP => write!(f, "{addr}:{port}/UDP"),
            other => write!(f, "{addr}:{port}/{other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{LOG_EVENT_FLOW_DROPPED, LOG_LEVEL_DEBUG, LOG_REFUSAL_ICMP, log_endpoint};

    /// `a.b.c.d:port` with `proto`, packed as the programs pack it (network order).
    fn at(addr: [u8; 4], port: u16, proto: u8) -> u64 {
        log_endpoint(u32::from_ne_bytes(addr), port.to_be(), proto)
    }

    fn record(event: u8, hook: u8, backend_id: u32, args: [u64; 4]) -> Vec<u8> {
        let record = LogRecord {
            event,
            level: LOG_LEVEL_DEBUG,
            hook,
            _pad: 0,
            backend_id,
            args,
        };
        // SAFETY: a plain-integer struct viewed as its bytes, as the ring buffer holds it.
        unsafe {
            std::slice::from_raw_parts((&raw const record).cast::<u8>(), size_of::<LogRecord>())
        }
        .to_vec()
    }

    fn text(event: u8, hook: u8, backend_id: u32, args: [u64; 4]) -> String {
        message(&record(event, hook, backend_id, args)).text
    }

    #[test]
    fn each_event_reads_as_its_log_point_put_it() {
        let frontend = at([10, 96, 0, 10], 80, PROTO_TCP);
        let dns = at([10, 96, 0, 20], 53, PROTO_UDP);
        let backend = at([10, 244, 0, 11], 8080, PROTO_TCP);
        let client = at([198, 51, 100, 7], 40000, PROTO_TCP);
        let node_port = at([192, 0, 2, 1], 30081, PROTO_TCP);
        let cases = [
            (
                text(
                    LOG_EVENT_SOCK_NO_BACKEND,
                    LOG_HOOK_CONNECT4,
                    0,
                    [frontend, 111, 0, 0],
                ),
                "connect4: 10.96.0.10:80/TCP has no usable backend: failed with errno 111",
            ),
            (
                text(
                    LOG_EVENT_UNDEFINED_PORT,
                    LOG_HOOK_SENDMSG4,
                    0,
                    [dns, 111, 0, 0],
                ),
                "sendmsg4: 10.96.0.20:53/UDP is not a port of the ClusterIP's Service: failed \
                 with errno 111",
            ),
            (
                text(
                    LOG_EVENT_UNDEFINED_PORT,
                    LOG_HOOK_POD_IN,
                    0,
                    [frontend, 0, 0, 0],
                ),
                "pod_in: 10.96.0.10:80/TCP is not a port of the ClusterIP's Service: refused \
                 (ICMP port unreachable, where it can be answered)",
            ),
            (
                text(LOG_EVENT_SLOT_MISSING, LOG_HOOK_SENDMSG4, 7, [dns, 2, 3, 0]),
                "sendmsg4: 10.96.0.20:53/UDP: slot 2 of 3 -> backend 7 missing (0: no slot), \
                 left untranslated",
            ),
            (
                text(
                    LOG_EVENT_SOCK_TRANSLATED,
                    LOG_HOOK_CONNECT6,
                    4,
                    [frontend, backend, 0, 0],
                ),
                "connect6: 10.96.0.10:80/TCP -> 10.244.0.11:8080 (backend 4)",
            ),
            (
                text(
                    LOG_EVENT_TOO_BIG,
                    LOG_HOOK_TCX_IN,
                    0,
                    [client, node_port, 1400, 1],
                ),
                "tcx_in: 198.51.100.7:40000 -> 192.0.2.1:30081/TCP is larger than the next \
                 hop's MTU 1400: answered with ICMP fragmentation needed",
            ),
            (
                text(
                    LOG_EVENT_TOO_BIG,
                    LOG_HOOK_POD_IN,
                    0,
                    [client, node_port, 1400, 0],
                ),
                "pod_in: 198.51.100.7:40000 -> 192.0.2.1:30081/TCP is larger than the next \
                 hop's MTU 1400: dropped (no don't-fragment: it cannot be fragmented here)",
            ),
            (
                text(
                    LOG_EVENT_FLOW_NO_BACKEND,
                    LOG_HOOK_TCX_IN,
                    0,
                    [client, node_port, LOG_REFUSAL_ICMP, 0],
                ),
                "tcx_in: 198.51.100.7:40000 -> 192.0.2.1:30081/TCP has no usable backend: \
                 refused with ICMP port unreachable",
            ),
            (
                text(
                    LOG_EVENT_OUTSIDE_SOURCE_RANGES,
                    LOG_HOOK_TCX_IN,
                    0,
                    [client, node_port, 0, 0],
                ),
                "tcx_in: 198.51.100.7:40000 -> 192.0.2.1:30081/TCP is outside \
                 loadBalancerSourceRanges: dropped",
            ),
            (
                text(
                    LOG_EVENT_FLOW_DROPPED,
                    LOG_HOOK_TCX_IN,
                    0,
                    [client, node_port, LOG_DROP_MAP_FULL, 0],
                ),
                "tcx_in: 198.51.100.7:40000 -> 192.0.2.1:30081/TCP: conntrack map refused the \
                 entry, new flow dropped",
            ),
            (
                text(
                    LOG_EVENT_NEW_FLOW,
                    LOG_HOOK_TCX_IN,
                    2,
                    [
                        client,
                        node_port,
                        at([192, 0, 2, 1], 61000, PROTO_TCP),
                        backend,
                    ],
                ),
                "tcx_in: new flow 198.51.100.7:40000 -> 192.0.2.1:30081/TCP => \
                 192.0.2.1:61000 -> 10.244.0.11:8080 (backend 2)",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn the_level_is_the_log_points_and_odd_records_still_read() {
        let mut error = record(LOG_EVENT_FLOW_DROPPED, LOG_HOOK_TCX_IN, 0, [0; 4]);
        error[1] = LOG_LEVEL_ERROR;
        assert_eq!(message(&error).level, Level::Error);
        let debug = record(LOG_EVENT_NEW_FLOW, LOG_HOOK_TCX_IN, 0, [0; 4]);
        assert_eq!(message(&debug).level, Level::Debug);
        assert_eq!(
            message(&debug[..10]),
            Message {
                level: Level::Error,
                text: "a log record of 10 bytes, too short to read".to_owned()
            }
        );
        assert_eq!(
            text(99, 42, 0, [0; 4]),
            "an unknown program: a log record of an unknown kind (99)"
        );
    }
}
