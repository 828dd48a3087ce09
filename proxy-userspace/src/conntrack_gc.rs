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
//! A thread of its own walks the map every `--conntrack-gc-interval`, sooner while the
//! passes delete a large share of the map (flows end faster than passes that far apart
//! clear them), as Cilium adapts its own interval. An entry is deleted together with a read
//! of what it held at that instant (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`); one a packet
//! refreshed since the walk read it is put back (unless the program already wrote a new one
//! under its key). A packet of that flow arriving in the syscall between finds no entry and
//! starts the flow anew: a window of microseconds, for flows that had been idle past their
//! lifetime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use proxy_common::NatCtKey;

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
    let mut seen = 0;
    // Keys first, deletes after: deleting under the walk would disturb it.
    let mut expired = Vec::new();
    conntrack.scan(|key, value| {
        seen += 1;
        if value.expired(key.proto, now) {
            expired.push(key);
        }
    })?;
    let deleted = delete_expired(conntrack, &expired, now)?;
    Ok(Collected { seen, deleted })
}

/// Deletes the entries under `keys` that are still expired at `now`; returns how many. Each
/// is deleted together with a read of what it held then: one a packet refreshed since it
/// was found expired goes back.
pub fn delete_expired(conntrack: &mut Conntrack, keys: &[NatCtKey], now: u32) -> Result<usize> {
    let mut deleted = 0;
    for key in keys {
        match conntrack.take(key)? {
            Some(value) if value.expired(key.proto, now) => deleted += 1,
            Some(value) => conntrack.restore(key, &value)?,
            None => {}
        }
    }
    Ok(deleted)
}

/// The shortest delay between passes, however much they delete.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The delay before the next pass, after one that deleted `deleted` entries of a map of
/// `capacity`: halved while a pass deletes a quarter of the map or more, lengthened by half
/// while it deletes under 5 %, between `MIN_INTERVAL` and `configured`.
pub fn next_interval(
    current: Duration,
    deleted: usize,
    capacity: u32,
    configured: Duration,
) -> Duration {
    let share = deleted as f64 / f64::from(capacity.max(1));
    let next = if share >= 0.25 {
        current / 2
    } else if share < 0.05 {
        current * 3 / 2
    } else {
        current
    };
    next.clamp(MIN_INTERVAL.min(configured), configured)
}

/// Starts the collector: the first pass after `interval`, the next ones as
/// [`next_interval`] says, forever.
pub fn spawn(mut conntrack: Conntrack, interval: Duration, metrics: Arc<Metrics>) -> Result<()> {
    let capacity = conntrack.capacity()?;
    std::thread::Builder::new()
        .name("conntrack-gc".into())
        .spawn(move || {
            let mut delay = interval;
            loop {
                std::thread::sleep(delay);
                let started = Instant::now();
                match collect(&mut conntrack, now_secs()) {
                    Ok(c) => {
                        metrics.conntrack_gc_runs.inc();
                        metrics.conntrack_gc_deleted.inc_by(c.deleted as u64);
                        metrics
                            .conntrack_entries
                            .set((c.seen - c.deleted).try_into().unwrap_or(i64::MAX));
                        delay = next_interval(delay, c.deleted, capacity, interval);
                        tracing::debug!(
                            seen = c.seen,
                            deleted = c.deleted,
                            took_ms = started.elapsed().as_secs_f64() * 1000.0,
                            next_in_s = delay.as_secs_f64(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_come_sooner_while_they_delete_much_and_never_later_than_configured() {
        let configured = Duration::from_secs(30);
        let capacity = 262144;
        // A quarter of the map deleted: half the delay, down to a second.
        let busy = |d| next_interval(d, 65536, capacity, configured);
        assert_eq!(busy(configured), Duration::from_secs(15));
        assert_eq!(busy(Duration::from_millis(1500)), MIN_INTERVAL);
        // Between 5 % and 25 %: as it was.
        let steady = next_interval(Duration::from_secs(4), 20000, capacity, configured);
        assert_eq!(steady, Duration::from_secs(4));
        // Under 5 %: back towards the configured interval, not beyond.
        let quiet = |d| next_interval(d, 100, capacity, configured);
        assert_eq!(quiet(Duration::from_secs(4)), Duration::from_secs(6));
        assert_eq!(quiet(Duration::from_secs(25)), configured);
        // A configured interval under the minimum is kept (tests use short ones).
        let short = Duration::from_millis(200);
        assert_eq!(next_interval(short, 65536, capacity, short), short);
    }
}
