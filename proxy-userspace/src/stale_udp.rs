//! Closing the connected UDP sockets of departed backends (BEHAVIOUR C27), beside the sync
//! rather than inside it.
//!
//! Finding those sockets means visiting every network namespace on the node (a `/proc` walk
//! and a thread per namespace, see [`sockdiag`]). Inside the sync, that delayed the next
//! Service change by as long. Here the sync only records which (frontend, backend) pairs
//! departed, and a worker thread closes their sockets.
//!
//! A backend may come back to its frontend before the worker gets to it (a pod flapping
//! between ready and not ready). Its sockets then point at a live backend again and must be
//! left alone, as if the departure had never happened: the sync cancels the departure when
//! it writes the backend into the frontend's slots again. Each departure carries a
//! generation, so a pair that departs, returns and departs again while the worker scans is
//! scanned once more rather than marked done.
//!
//! Departures live in memory. An agent that stopped before its worker got to them (killed
//! mid-rollout, or without the privilege to enter namespaces) leaves sockets on backends
//! that left; the maps it pinned no longer say which. So at every start, once the first
//! sync is written, one sweep closes every connected UDP socket the programs translated to
//! a backend its frontend no longer has, as kube-proxy's conntrack cleanup looks at every
//! UDP flow at its first sync.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::abi;
use crate::dataplane::SockReverse;
use crate::model::{BackendAddr, Protocol};
use crate::sockdiag;

/// A (rev-NAT id, UDP backend) pair: the backend left the frontend with that rev-NAT id.
pub type Departure = (u16, BackendAddr);

/// The departures not yet handled, each with the generation it was recorded in.
#[derive(Debug, Default)]
struct Pending {
    departures: BTreeMap<Departure, u64>,
    generation: u64,
    /// A sweep to make: every (rev-NAT id, UDP backend) pair the slots hold, kept up to
    /// date by later syncs until the sweep is done.
    sweep: Option<BTreeSet<Departure>>,
}

impl Pending {
    fn depart(&mut self, departure: Departure) {
        if let Some(present) = &mut self.sweep {
            present.remove(&departure);
        }
        self.generation += 1;
        self.departures.insert(departure, self.generation);
    }

    fn cancel(&mut self, departure: &Departure) {
        if let Some(present) = &mut self.sweep {
            present.insert(*departure);
        }
        self.departures.remove(departure);
    }

    /// Whether a sweep closes a socket translated to `pair`: one is under way and the
    /// slots do not hold the pair.
    fn swept(&self, pair: &Departure) -> bool {
        self.sweep
            .as_ref()
            .is_some_and(|present| !present.contains(pair))
    }

    /// Whether `departure` is still pending as recorded in `generation`.
    fn holds(&self, departure: &Departure, generation: u64) -> bool {
        self.departures.get(departure) == Some(&generation)
    }

    /// Forgets what a scan of `scanned` handled; a departure recorded again meanwhile stays.
    fn done(&mut self, scanned: &BTreeMap<Departure, u64>) {
        self.departures
            .retain(|departure, generation| scanned.get(departure) != Some(generation));
    }
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Shared {
    /// The pending departures; a panic elsewhere while holding the lock leaves them usable.
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sync's handle on the worker.
pub struct StaleUdp {
    shared: Arc<Shared>,
}

impl StaleUdp {
    /// Starts the worker. `reverse` is its own handle on the socket programs' reverse maps,
    /// which tell whether they translated a socket, and for which frontend.
    pub fn spawn(reverse: SockReverse) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("stale-udp".into())
            .spawn(move || run(&worker, &reverse))?;
        Ok(StaleUdp { shared })
    }

    /// Records what one sync did: UDP backends that left frontends, and backends written
    /// into frontends' slots (which cancel any pending departure of the same pair).
    pub fn record(
        &self,
        departed: impl IntoIterator<Item = Departure>,
        present: impl IntoIterator<Item = Departure>,
    ) {
        let mut pending = self.shared.pending();
        for departure in present {
            pending.cancel(&departure);
        }
        let before = pending.generation;
        for departure in departed {
            pending.depart(departure);
        }
        if pending.generation != before {
            self.shared.wake.notify_one();
        }
    }

    /// Counts `pairs`, about to be written into slots, as present for a sweep under way (none
    /// otherwise): written and offered before the sync records them, they must not have a
    /// socket connected through them meanwhile closed.
    pub fn present_ahead(&self, pairs: impl IntoIterator<Item = Departure>) {
        let mut pending = self.shared.pending();
        if let Some(present) = &mut pending.sweep {
            present.extend(pairs);
        }
    }

    /// Asks for one sweep ([module docs](self)): `present` is every (rev-NAT id, UDP
    /// backend) pair the frontends' slots hold, lingering ones included.
    pub fn sweep(&self, present: BTreeSet<Departure>) {
        self.shared.pending().sweep = Some(present);
        self.shared.wake.notify_one();
    }
}

/// The worker: waits for departures, closes their sockets, forever.
fn run(shared: &Shared, reverse: &SockReverse) {
    let (mut warned_denied, mut warned_unsupported) = (false, false);
    loop {
        let (scanned, sweeping) = {
            let mut pending = shared.pending();
            while pending.departures.is_empty() && pending.sweep.is_none() {
                pending = shared
                    .wake
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            (pending.departures.clone(), pending.sweep.is_some())
        };
        // A sweep looks at every connected UDP socket; departures at those of their peers.
        let peers: Option<BTreeSet<_>> =
            (!sweeping).then(|| scanned.keys().map(|(_, b)| (b.addr, b.port)).collect());
        let still_departed = |socket: &sockdiag::UdpSocket| {
            let Some(entry) = reverse.frontend_of(
                socket.cookie,
                abi::addr_to_net(socket.peer.0),
                abi::port_to_net(socket.peer.1),
            ) else {
                return false; // not translated by the socket programs
            };
            let departure = (
                entry.rev_nat_id,
                BackendAddr {
                    addr: socket.peer.0,
                    port: socket.peer.1,
                    proto: Protocol::Udp,
                },
            );
            let pending = shared.pending();
            pending.swept(&departure)
                || scanned
                    .get(&departure)
                    .is_some_and(|generation| pending.holds(&departure, *generation))
        };
        let pass = sockdiag::destroy_udp_sockets(peers.as_ref(), &still_departed);
        {
            let mut pending = shared.pending();
            pending.done(&scanned);
            if sweeping {
                pending.sweep = None;
                let swept = "swept the connected UDP sockets of backends that left while no \
                             agent ran";
                if pass.destroyed > 0 {
                    tracing::info!(destroyed = pass.destroyed, "{swept}");
                } else {
                    tracing::debug!("{swept}: none");
                }
            }
        }
        if !scanned.is_empty() {
            tracing::info!(
                destroyed = pass.destroyed,
                departures = scanned.len(),
                "connected UDP sockets of departed backends closed"
            );
        }
        if pass.denied > 0 && !warned_denied {
            warned_denied = true;
            tracing::warn!(
                namespaces = pass.denied,
                "not allowed to enter network namespaces (setns needs CAP_SYS_ADMIN): \
                 connected UDP sockets in them keep sending to removed backends until \
                 they reconnect"
            );
        }
        if pass.unsupported > 0 && !warned_unsupported {
            warned_unsupported = true;
            tracing::warn!(
                namespaces = pass.unsupported,
                "the kernel cannot destroy sockets (SOCK_DESTROY needs \
                 CONFIG_INET_DIAG_DESTROY): connected UDP sockets keep sending to removed \
                 backends until they reconnect"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn departure(rev_nat_id: u16, host: u8) -> Departure {
        let backend = BackendAddr {
            addr: Ipv4Addr::new(10, 244, 0, host),
            port: 53,
            proto: Protocol::Udp,
        };
        (rev_nat_id, backend)
    }

    fn recorded(pending: &Pending) -> Vec<Departure> {
        pending.departures.keys().copied().collect()
    }

    #[test]
    fn a_backend_back_in_its_frontend_is_no_longer_departed() {
        let mut pending = Pending::default();
        pending.depart(departure(1, 10));
        pending.depart(departure(2, 10));
        pending.cancel(&departure(1, 10));
        // Only the pair that came back: the same backend is still gone from frontend 2.
        assert_eq!(recorded(&pending), [departure(2, 10)]);
    }

    #[test]
    fn a_scan_forgets_only_the_departures_it_saw() {
        let mut pending = Pending::default();
        pending.depart(departure(1, 10));
        pending.depart(departure(1, 11));
        let scanned = pending.departures.clone();
        // During the scan: .10 returns and departs again, .12 departs for the first time.
        pending.cancel(&departure(1, 10));
        pending.depart(departure(1, 10));
        pending.depart(departure(1, 12));
        let first = scanned[&departure(1, 10)];
        assert!(!pending.holds(&departure(1, 10), first));
        assert!(pending.holds(&departure(1, 11), scanned[&departure(1, 11)]));
        pending.done(&scanned);
        assert_eq!(recorded(&pending), [departure(1, 10), departure(1, 12)]);
    }

    /// A sweep closes what the slots do not hold, as later syncs change them: a pair written
    /// again is kept, one that departs is closed (and recorded).
    #[test]
    fn a_sweep_follows_the_syncs_after_it() {
        let mut pending = Pending::default();
        assert!(!pending.swept(&departure(1, 10)), "no sweep asked");
        pending.sweep = Some([departure(1, 10), departure(1, 11)].into());
        assert!(!pending.swept(&departure(1, 10)));
        assert!(pending.swept(&departure(1, 12)), "not in the slots");
        pending.cancel(&departure(1, 12));
        assert!(!pending.swept(&departure(1, 12)), "written by a later sync");
        pending.depart(departure(1, 11));
        assert!(pending.swept(&departure(1, 11)), "departed since");
    }

    /// Pairs a sync is about to write count as present for a sweep under way, before the
    /// sync records them (a socket may connect through them in between).
    #[test]
    fn pairs_about_to_be_written_are_present_for_a_sweep() {
        let stale = StaleUdp {
            shared: Arc::new(Shared::default()),
        };
        stale.present_ahead([departure(1, 10)]);
        assert!(stale.shared.pending().sweep.is_none(), "no sweep asked");
        stale.sweep([departure(1, 11)].into());
        stale.present_ahead([departure(1, 10)]);
        let pending = stale.shared.pending();
        assert!(!pending.swept(&departure(1, 10)));
        assert!(!pending.swept(&departure(1, 11)));
        assert!(pending.swept(&departure(1, 12)));
    }

    #[test]
    fn a_later_sync_cancels_what_an_earlier_one_recorded() {
        let shared = Arc::new(Shared::default());
        let stale = StaleUdp {
            shared: Arc::clone(&shared),
        };
        // A sync that moves .10 out of frontend 1 and into frontend 2.
        stale.record([departure(1, 10)], [departure(2, 10)]);
        // The next sync brings it back to frontend 1 and takes it from frontend 2.
        stale.record([departure(2, 10)], [departure(1, 10)]);
        assert_eq!(recorded(&shared.pending()), [departure(2, 10)]);
    }
}
