//! Deleting the north-south conntrack entries of flows that ended (Cilium's conntrack GC;
//! the kernel's conntrack expires its own entries the same way under kube-proxy).
//!
//! `ekp_nat_ct_v1` is an LRU: when it is full, every new flow evicts the entries used least
//! recently. Left alone, the entries of closed and idle-expired flows stay until then, and
//! a connection that is alive but quiet for a while (a database connection through a
//! NodePort) is evicted before the dead flows of a busy Service that ended after its last
//! packet: its next packet starts a new flow, to any backend, and the connection breaks.
//! Deleting what expired (`NatCtValue::expired`, the rule the programs follow) keeps room
//! for the live flows, and an insert that finds free room costs less than one that evicts.
//!
//! A thread of its own walks the map every `--conntrack-gc-interval`. A packet that
//! refreshes an entry between the walk's read and its delete loses it (its flow then starts
//! anew): the entry is read again just before the delete, which leaves that window at a
//! syscall's length for flows that were idle past their lifetime anyway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::dataplane::Conntrack;
use crate::metrics::Metrics;

/// What one pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Entries read.
    pub seen: usize,
    /// Entries deleted (expired).
    pub deleted: usize,
}

/// Seconds of `CLOCK_MONOTONIC_COARSE`: the clock the programs stamp entries with
/// (`bpf_ktime_get_coarse_ns`).
pub fn now_secs() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// One pass: deletes every entry expired at `now`. Entries that vanish meanwhile (the LRU
/// evicted them, a program replaced them) are not errors.
pub fn collect(conntrack: &mut Conntrack, now: u32) -> Result<Collected> {
    let mut collected = Collected::default();
    // Keys first, deletes after: deleting under the walk would restart it.
    let mut expired = Vec::new();
    for (key, value) in conntrack.entries() {
        collected.seen += 1;
        if value.expired(key.proto, now) {
            expired.push(key);
        }
    }
    for key in expired {
        // Read again: a packet may have refreshed it since.
        let still_expired = conntrack
            .get(&key)?
            .is_some_and(|value| value.expired(key.proto, now));
        if still_expired && conntrack.remove(&key)? {
            collected.deleted += 1;
        }
    }
    Ok(collected)
}

/// Starts the collector: a pass every `interval`, forever.
pub fn spawn(
    mut conntrack: Conntrack,
    interval: Duration,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("conntrack-gc".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                let started = Instant::now();
                match collect(&mut conntrack, now_secs()) {
                    Ok(c) => {
                        metrics.conntrack_gc_runs.inc();
                        metrics.conntrack_gc_deleted.inc_by(c.deleted as u64);
                        metrics
                            .conntrack_entries
                            .set((c.seen - c.deleted).try_into().unwrap_or(i64::MAX));
                        tracing::debug!(
                            seen = c.seen,
                            deleted = c.deleted,
                            took_ms = started.elapsed().as_secs_f64() * 1000.0,
                            "conntrack entries of ended flows deleted"
                        );
                    }
                    Err(e) => {
                        tracing::warn!("conntrack collection failed ({e:#}); next pass later")
                    }
                }
            }
        })?;
    Ok(())
}
