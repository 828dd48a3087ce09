//! The programs' logging: the switch they read (`ekp_log_v1`, `LOG_LEVEL_*`) and the reader
//! that forwards their records to `tracing` under the target `ebpf`.
//!
//! Each loaded object has its own aya-log ring buffer (`AYA_LOGS`, not pinned): the programs
//! write to the buffer of the object they came from. `start` swaps the newly loaded
//! programs into the pinned links, so the running agent's buffer is the one that fills.
//! While no agent reads (between a crash and the restart), the old buffer fills and the
//! programs' reservations fail: records are dropped, nothing blocks and no verdict changes.

use std::path::Path;

use anyhow::{Context, Result};
use aya::Ebpf;
use aya::maps::{Array, MapData};
use aya_log::EbpfLogger;
use proxy_common::{LogConfig, MAP_LOG};
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
    let logger = match EbpfLogger::init_with_logger(ebpf, ToTracing) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!("eBPF log records will not be read: {e}");
            return None;
        }
    };
    // SAFETY: the logger owns the ring buffer's file descriptor (an `OwnedFd` in its
    // `MapData`), keeps it open while it lives and always returns that one.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!("eBPF log records will not be read: {e}");
            return None;
        }
    };
    let task = runtime.spawn(async move {
        loop {
            let Ok(mut ready) = logger.readable_mut().await else {
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
    Some(Forwarder { task })
}

/// aya-log hands records to a `log::Log`; this one re-emits them as `tracing` events with
/// the target `ebpf`, so `EKP_LOG` filters them (`ebpf=off` hides them) and
/// `--logging-format json` formats them like every other line.
///
/// The switch map is the filter that matters: a record exists only because someone chose
/// its level with `bpf-log` or `--bpf-log-level`. Debug records are therefore shown at
/// `info`, so that switching to `debug` at run time shows them under the default filter
/// (`EKP_LOG=info`, the chart's default) without restarting the agent with another filter.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "ebpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "ebpf", "{message}"),
            log::Level::Info | log::Level::Debug | log::Level::Trace => {
                tracing::info!(target: "ebpf", "{message}")
            }
        }
    }

    fn flush(&self) {}
}
