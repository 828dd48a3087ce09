//! Fitting the desired state into the maps' capacities, before anything is written.
//!
//! BPF maps have a fixed `max_entries`; a write into a full map, or beyond an array's end,
//! fails. Writing blindly would stop a sync halfway at whatever object happened to come
//! first, every time. So frontends are admitted up front, with the peak usage of a sync in
//! mind (new entries are written before old ones are deleted): frontends that are already
//! programmed come first and keep what they have of what they still want, new ones are
//! admitted in key order while they fit, and each one that does not is named with the map
//! that is full.
//! Deletions in the same sync free room for the next one, which then admits what was left
//! out.

use std::collections::BTreeSet;

use proxy_common::SVC_FLAG_SOURCE_RANGES;

use crate::dataplane::MapSizes;
use crate::model::{BackendAddr, DesiredState, Frontend, FrontendKey, Skipped, SourceRange};
use crate::sync::{Programmed, ProgrammedFrontend};

/// Usable entries per map the agent writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: usize,
    pub backends: usize,
    pub rev_nat: usize,
    pub source_ranges: usize,
}

impl From<&MapSizes> for Capacity {
    fn from(sizes: &MapSizes) -> Self {
        Capacity {
            services: sizes.services as usize,
            // The backends and rev-NAT arrays are indexed by id, and ids start at 1: index
            // 0 holds nothing. Ids are handed out smallest free first, so no id exceeds
            // the number in use at once, which this bounds.
            backends: (sizes.backends as usize).saturating_sub(1),
            // Rev-NAT ids are 16-bit as well.
            rev_nat: (sizes.rev_nat as usize)
                .saturating_sub(1)
                .min(usize::from(u16::MAX)),
            source_ranges: sizes.source_ranges as usize,
        }
    }
}

/// What a sync would add to the maps, tallied as frontends are admitted.
struct Peak {
    services: usize,
    backends: BTreeSet<BackendAddr>,
    rev_nat: usize,
    source_ranges: usize,
}

/// The part of `desired` that fits, and the frontends that do not (named).
pub fn fit(
    programmed: &Programmed,
    desired: &DesiredState,
    capacity: &Capacity,
) -> (DesiredState, Vec<Skipped>) {
    let mut peak = Peak {
        services: programmed
            .frontends
            .values()
            .map(|f| usize::from(f.flags != 0) + f.slots.len())
            .sum(),
        backends: programmed.backends.values().copied().collect(),
        rev_nat: rev_nat_ids_taken(programmed),
        source_ranges: programmed.source_ranges.len(),
    };
    let is_programmed = |f: &&Frontend| {
        programmed
            .frontends
            .get(&f.key)
            .is_some_and(|p| p.flags != 0)
    };
    let existing = desired.frontends.values().filter(is_programmed);
    // New frontends in key order, those on loopback (the node's own processes' NodePorts)
    // after the rest: with room for one, the node's addresses get it.
    let new = desired.frontends.values().filter(|f| !is_programmed(f));
    let new = new
        .clone()
        .filter(|f| !f.key.addr.is_loopback())
        .chain(new.filter(|f| f.key.addr.is_loopback()));

    let mut fitted = DesiredState {
        local_backends: desired.local_backends.clone(),
        ..DesiredState::default()
    };
    let mut skipped = Vec::new();
    for frontend in existing.chain(new) {
        let current = programmed
            .frontends
            .get(&frontend.key)
            .filter(|p| p.flags != 0);
        let current_slots = current.map_or(0, |p| p.slots.len());
        let new_backends: BTreeSet<BackendAddr> = frontend
            .slotted()
            .filter(|b| !peak.backends.contains(b))
            .copied()
            .collect();
        let services_growth = usize::from(current.is_none())
            + frontend.slotted().count().saturating_sub(current_slots);
        let rev_nat_growth = usize::from(needs_rev_nat_id(current));
        let source_ranges_growth = new_ranges(programmed, current, frontend);
        let full = if peak.services + services_growth > capacity.services {
            Some(("services", capacity.services))
        } else if peak.backends.len() + new_backends.len() > capacity.backends {
            Some(("backends", capacity.backends))
        } else if peak.rev_nat + rev_nat_growth > capacity.rev_nat {
            Some(("rev-NAT", capacity.rev_nat))
        } else if peak.source_ranges + source_ranges_growth > capacity.source_ranges {
            Some(("source ranges", capacity.source_ranges))
        } else {
            None
        };
        let Some((map, entries)) = full else {
            peak.services += services_growth;
            peak.backends.extend(new_backends);
            peak.rev_nat += rev_nat_growth;
            peak.source_ranges += source_ranges_growth;
            fitted.frontends.insert(frontend.key, frontend.clone());
            continue;
        };
        let object = format!(
            "Service {}/{}",
            frontend.service.namespace, frontend.service.name
        );
        let not_programmed = Skipped {
            object: object.clone(),
            reason: format!(
                "frontend {} ({}) not programmed: the {map} map is full ({entries} entries)",
                frontend.key, frontend.kind
            ),
        };
        let (kept, kept_lingering, p) = match current {
            // Already programmed, but with an id the rev-NAT array has no room for (it was
            // made smaller), and none left to give it: it cannot stay.
            Some(_) if rev_nat_growth == 1 && peak.rev_nat + 1 > capacity.rev_nat => {
                skipped.push(not_programmed);
                continue;
            }
            // Already programmed, and only its new source ranges do not fit (the maps
            // before that one have room): it takes its backends, and keeps the ranges it
            // has (below).
            Some(p) if map == "source ranges" => {
                (frontend.backends.clone(), frontend.lingering.clone(), p)
            }
            // Already programmed: it keeps the backends it has and still wants rather than
            // lose service. Those that left go (their endpoints may be gone, their address
            // given to another pod): that takes no room, and frees their entries for the
            // next sync, which then has room for the new ones.
            Some(p) => {
                // Any slot counts, a lingering one too: a backend live again (a pod ready
                // again) fills the slot it has. Sorted and once each, as the slots must be
                // (a failed sync may have left them otherwise).
                let kept: Vec<BackendAddr> = p
                    .slots
                    .values()
                    .filter_map(|id| programmed.backends.get(id))
                    .filter(|b| frontend.backends.binary_search(b).is_ok())
                    .copied()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                // Those it has that linger now (a draining pod among them, live until
                // now): they fill slots it has, nothing new is written.
                let kept_lingering: Vec<BackendAddr> = p
                    .slots
                    .values()
                    .filter_map(|id| programmed.backends.get(id))
                    .filter(|b| frontend.lingering.contains(b) && !kept.contains(b))
                    .copied()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                (kept, kept_lingering, p)
            }
            None => {
                skipped.push(not_programmed);
                continue;
            }
        };
        // Its source ranges: all it lists when the trie has room for the new ones (another
        // map is the full one); else those it has and still lists, the new ones being what
        // did not fit. A range the Service no longer lists goes (a revoked range must not
        // stay open), which also makes room for the new ones at the next sync.
        let ranges_fit = map != "source ranges"
            && peak.source_ranges + source_ranges_growth <= capacity.source_ranges;
        let kept_ranges: Vec<SourceRange> = if ranges_fit {
            frontend.source_ranges.clone()
        } else {
            programmed
                .source_ranges
                .iter()
                .filter(|(id, range)| *id == p.rev_nat_id && frontend.source_ranges.contains(range))
                .map(|(_, range)| *range)
                .collect()
        };
        // A frontend that filters its clients must not open up because its ranges are
        // gone (a smaller trie at a restart copies what it has room for): it is left out,
        // named, until they fit, as one that is not programmed.
        if kept_ranges.is_empty()
            && !frontend.source_ranges.is_empty()
            && p.flags & SVC_FLAG_SOURCE_RANGES != 0
        {
            skipped.push(Skipped {
                object,
                reason: format!(
                    "frontend {} ({}) not programmed: none of the source ranges it lists is \
                     in the trie, and the {map} map is full ({entries} entries)",
                    frontend.key, frontend.kind
                ),
            });
            continue;
        }
        if map == "source ranges" {
            peak.services += services_growth;
            peak.backends.extend(new_backends);
        }
        if ranges_fit {
            peak.source_ranges += source_ranges_growth;
        }
        peak.rev_nat += rev_nat_growth;
        let (what, wanted, has) = if map == "source ranges" {
            (
                "source ranges",
                frontend.source_ranges.len(),
                kept_ranges.len(),
            )
        } else {
            ("backends", frontend.backends.len(), kept.len())
        };
        skipped.push(Skipped {
            object,
            reason: format!(
                "frontend {} ({}): {wanted} {what} do not fit, the {map} map is full \
                 ({entries} entries); keeping the {has} it has",
                frontend.key, frontend.kind,
            ),
        });
        fitted.frontends.insert(
            frontend.key,
            Frontend {
                backends: kept,
                lingering: kept_lingering,
                source_ranges: kept_ranges,
                ..frontend.clone()
            },
        );
    }
    (fitted, skipped)
}

/// Whether `fit` would admit all of `desired`, when it differs from what is programmed (and
/// programmed whole) only in the `touched` frontends: the most a sync could add, counted
/// over those alone, fits. `service_entries` is what the services map holds (slot 0s and
/// slots), `is_programmed` says whether a backend is in the maps. A `false` only means "ask
/// `fit`".
pub fn fits_whole(
    programmed: &Programmed,
    service_entries: usize,
    desired: &DesiredState,
    touched: &BTreeSet<FrontendKey>,
    is_programmed: impl Fn(&BackendAddr) -> bool,
    capacity: &Capacity,
) -> bool {
    let mut services = service_entries;
    let mut rev_nat = rev_nat_ids_taken(programmed);
    let mut source_ranges = programmed.source_ranges.len();
    let mut new_backends: BTreeSet<&BackendAddr> = BTreeSet::new();
    for frontend in touched.iter().filter_map(|k| desired.frontends.get(k)) {
        let current = programmed
            .frontends
            .get(&frontend.key)
            .filter(|p| p.flags != 0);
        services += usize::from(current.is_none())
            + frontend
                .slotted()
                .count()
                .saturating_sub(current.map_or(0, |p| p.slots.len()));
        rev_nat += usize::from(needs_rev_nat_id(current));
        source_ranges += new_ranges(programmed, current, frontend);
        new_backends.extend(frontend.slotted().filter(|b| !is_programmed(b)));
    }
    services <= capacity.services
        && programmed.backends.len() + new_backends.len() <= capacity.backends
        && rev_nat <= capacity.rev_nat
        && source_ranges <= capacity.source_ranges
}

/// The rev-NAT ids a plan will not give out (`sync::plan`): those of the entries, of the
/// frontends, and of source ranges a failed sync left.
fn rev_nat_ids_taken(programmed: &Programmed) -> usize {
    let mut ids = programmed.rev_nat_ids.clone();
    ids.extend(programmed.frontends.values().map(|f| f.rev_nat_id));
    ids.extend(programmed.source_ranges.iter().map(|(id, _)| *id));
    ids.remove(&0);
    ids.len()
}

/// Whether a plan gives the frontend programmed as `current` a new rev-NAT id: a new
/// frontend, or one whose id the rev-NAT array has no room for (`Programmed::from_maps`).
fn needs_rev_nat_id(current: Option<&ProgrammedFrontend>) -> bool {
    current.is_none_or(|p| p.rev_nat_id == 0)
}

/// How many of `frontend`'s source ranges a sync writes: those the trie does not hold
/// under its rev-NAT id yet (all of them for a frontend not programmed), before the ones it
/// stops using go. Those it holds already are not written again, and take no more room.
fn new_ranges(
    programmed: &Programmed,
    current: Option<&ProgrammedFrontend>,
    frontend: &Frontend,
) -> usize {
    match current.map(|p| p.rev_nat_id).filter(|id| *id != 0) {
        Some(id) => frontend
            .source_ranges
            .iter()
            .filter(|range| !programmed.source_ranges.contains(&(id, **range)))
            .count(),
        None => frontend.source_ranges.len(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{
        FrontendKey, FrontendKind, Protocol, Scope, ServicePortName, SourceRange, WhenEmpty,
    };
    use crate::sync::plan;

    fn frontend(host: u8, backends: &[u8]) -> Frontend {
        Frontend {
            key: FrontendKey {
                addr: Ipv4Addr::new(10, 96, 0, host),
                port: 80,
                proto: Protocol::Tcp,
                scope: Scope::Internal,
            },
            kind: FrontendKind::ClusterIp,
            service: ServicePortName {
                namespace: "default".into(),
                name: format!("svc-{host}"),
                port: String::new(),
            },
            backends: backends
                .iter()
                .map(|h| BackendAddr {
                    addr: Ipv4Addr::new(10, 244, 0, *h),
                    port: 8080,
                    proto: Protocol::Tcp,
                })
                .collect(),
            lingering: Vec::new(),
            when_empty: WhenEmpty::Refuse,
            affinity_timeout: None,
            affinity_group: None,
            source_ranges: Vec::new(),
            at_node_address: false,
        }
    }

    fn desired(frontends: &[Frontend]) -> DesiredState {
        DesiredState {
            frontends: frontends.iter().map(|f| (f.key, f.clone())).collect(),
            ..DesiredState::default()
        }
    }

    /// Programs `state` into an empty mirror (as if a sync had written it).
    fn programmed(state: &DesiredState) -> Programmed {
        let mut mirror = Programmed::default();
        for op in plan(&mirror, state).expect("plan") {
            mirror.apply(&op);
        }
        mirror
    }

    const ROOMY: Capacity = Capacity {
        services: 100,
        backends: 100,
        rev_nat: 100,
        source_ranges: 100,
    };

    #[test]
    fn fits_whole_only_when_fit_would_admit_everything() {
        let before = desired(&[frontend(1, &[1, 2]), frontend(2, &[3]), frontend(4, &[6])]);
        let mirror = programmed(&before);
        let after = desired(&[
            frontend(1, &[1, 2, 4]),
            frontend(2, &[3]),
            frontend(3, &[5, 3]),
        ]);
        let touched: BTreeSet<FrontendKey> = [1, 3, 4].map(|host| frontend(host, &[]).key).into();
        let known = |b: &BackendAddr| mirror.backends.values().any(|x| x == b);
        let entries = crate::sync::service_entries(&mirror);
        let mut admitted = 0;
        for services in 0..14 {
            for backends in 0..8 {
                for rev_nat in 2..5 {
                    let cap = Capacity {
                        services,
                        backends,
                        rev_nat,
                        source_ranges: 100,
                    };
                    if fits_whole(&mirror, entries, &after, &touched, known, &cap) {
                        admitted += 1;
                        assert_eq!(fit(&mirror, &after, &cap), (after.clone(), vec![]));
                    }
                }
            }
        }
        assert!(admitted > 0);
        assert!(fits_whole(
            &mirror, entries, &after, &touched, known, &ROOMY
        ));
    }

    /// A plan writes only the ranges the trie lacks: with the trie over half full,
    /// frontends that keep their ranges still take new backends; a frontend that adds
    /// ranges beyond the room left keeps what it has.
    #[test]
    fn source_ranges_in_the_trie_already_take_no_more_room() {
        let range = |a: u8, b: u8| SourceRange {
            addr: Ipv4Addr::new(203, 0, a, b),
            prefix: 32,
        };
        let ranged = |host: u8, backends: &[u8], ranges: &[u8]| Frontend {
            source_ranges: ranges.iter().map(|r| range(*r, host)).collect(),
            ..frontend(host, backends)
        };
        let mirror = programmed(&desired(&[
            ranged(1, &[1], &[1, 2]),
            ranged(2, &[2], &[1, 2]),
        ]));
        assert_eq!(mirror.source_ranges.len(), 4);
        let cap = Capacity {
            source_ranges: 5,
            ..ROOMY
        };
        let after = desired(&[ranged(1, &[1], &[1, 2]), ranged(2, &[3], &[1, 2])]);
        assert_eq!(fit(&mirror, &after, &cap), (after.clone(), vec![]));
        let touched: BTreeSet<FrontendKey> = [frontend(2, &[]).key].into();
        let known = |b: &BackendAddr| mirror.backends.values().any(|x| x == b);
        let entries = crate::sync::service_entries(&mirror);
        assert!(fits_whole(&mirror, entries, &after, &touched, known, &cap));

        // Two new ranges where one is left: frontend 2 keeps its two, and takes its new
        // backend (the backend and services maps have room).
        let grown = desired(&[ranged(1, &[1], &[1, 2]), ranged(2, &[3], &[1, 2, 3, 4])]);
        assert!(!fits_whole(&mirror, entries, &grown, &touched, known, &cap));
        let (fitted, skipped) = fit(&mirror, &grown, &cap);
        assert_eq!(
            fitted,
            desired(&[ranged(1, &[1], &[1, 2]), ranged(2, &[3], &[1, 2])])
        );
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            skipped[0].reason.contains("4 source ranges do not fit"),
            "{}",
            skipped[0].reason
        );
    }

    #[test]
    fn everything_fits_in_roomy_maps() {
        let want = desired(&[frontend(1, &[1, 2]), frontend(2, &[3])]);
        let (fitted, skipped) = fit(&Programmed::default(), &want, &ROOMY);
        assert_eq!(fitted, want);
        assert!(skipped.is_empty());
    }

    #[test]
    fn a_new_frontend_that_does_not_fit_is_named_and_the_others_are_untouched() {
        let cap = Capacity {
            services: 8,
            ..ROOMY
        };
        let before = desired(&[frontend(1, &[1, 2]), frontend(2, &[3, 4])]); // 3 + 3 entries
        let mirror = programmed(&before);
        let mut want = before.clone();
        let late = frontend(3, &[5, 6]); // 3 more: 9 > 8
        want.frontends.insert(late.key, late);
        let (fitted, skipped) = fit(&mirror, &want, &cap);
        assert_eq!(
            fitted, before,
            "existing frontends unchanged, the new one left out"
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].object, "Service default/svc-3");
        assert!(
            skipped[0]
                .reason
                .contains("the services map is full (8 entries)"),
            "{}",
            skipped[0].reason
        );
    }

    #[test]
    fn new_loopback_frontends_are_admitted_after_the_others() {
        let cap = Capacity {
            services: 3,
            ..ROOMY
        };
        let at = |addr: Ipv4Addr| {
            let mut f = frontend(1, &[1, 2]); // 3 entries each
            f.key.addr = addr;
            f.kind = FrontendKind::NodePort;
            f
        };
        let loopback = at(Ipv4Addr::LOCALHOST);
        let node = at(Ipv4Addr::new(192, 0, 2, 1));
        let (fitted, skipped) = fit(
            &Programmed::default(),
            &desired(&[loopback.clone(), node.clone()]),
            &cap,
        );
        assert_eq!(fitted, desired(&[node]));
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].reason.contains("127.0.0.1"),
            "{}",
            skipped[0].reason
        );
    }

    #[test]
    fn room_freed_by_a_deletion_admits_the_waiting_frontend_at_the_next_sync() {
        let cap = Capacity {
            services: 6,
            ..ROOMY
        };
        let mirror = programmed(&desired(&[frontend(1, &[1, 2]), frontend(2, &[3, 4])]));
        // Frontend 1 goes, frontend 3 arrives in the same sync: writes come before deletes,
        // so 3 waits for one sync.
        let want = desired(&[frontend(2, &[3, 4]), frontend(3, &[5, 6])]);
        let (fitted, skipped) = fit(&mirror, &want, &cap);
        assert_eq!(fitted, desired(&[frontend(2, &[3, 4])]));
        assert_eq!(skipped.len(), 1);
        // That sync deletes frontend 1; the next one has room.
        let mirror = programmed(&fitted);
        let (fitted, skipped) = fit(&mirror, &want, &cap);
        assert_eq!(fitted, want);
        assert!(skipped.is_empty());
    }

    #[test]
    fn a_programmed_frontend_that_cannot_grow_keeps_its_backends() {
        let cap = Capacity {
            services: 4,
            ..ROOMY
        };
        let mirror = programmed(&desired(&[frontend(1, &[1, 2])])); // 3 entries
        let want = desired(&[frontend(1, &[1, 2, 3, 4])]); // would need 5
        let (fitted, skipped) = fit(&mirror, &want, &cap);
        assert_eq!(fitted, desired(&[frontend(1, &[1, 2])]));
        assert!(
            skipped[0].reason.contains("4 backends do not fit"),
            "{}",
            skipped[0].reason
        );
        assert!(skipped[0].reason.contains("keeping the 2 it has"));
    }

    /// With the backends map full, a rollout that replaces endpoints must not leave the
    /// frontend on the ones that left for good.
    #[test]
    fn a_frontend_that_cannot_grow_drops_the_backends_that_left_and_grows_at_the_next_sync() {
        let cap = Capacity {
            backends: 3,
            ..ROOMY
        };
        let mut mirror = programmed(&desired(&[frontend(1, &[1, 2, 3])]));
        let want = desired(&[frontend(1, &[2, 4, 5])]);
        let (fitted, skipped) = fit(&mirror, &want, &cap);
        assert_eq!(fitted, desired(&[frontend(1, &[2])]));
        assert!(
            skipped[0].reason.contains("keeping the 1 it has"),
            "{skipped:?}"
        );
        for op in plan(&mirror, &fitted).expect("plan") {
            mirror.apply(&op);
        }
        let (fitted, skipped) = fit(&mirror, &want, &cap);
        assert_eq!(fitted, want);
        assert!(skipped.is_empty(), "{skipped:?}");
    }

    /// A backend that moves from live to lingering (its pod drains) keeps its slot when
    /// the frontend cannot grow: it takes no new room.
    #[test]
    fn a_frontend_that_cannot_grow_keeps_a_backend_that_now_lingers() {
        let cap = Capacity {
            backends: 3,
            ..ROOMY
        };
        let mirror = programmed(&desired(&[frontend(1, &[1, 2, 3])]));
        let draining = |backends: &[u8], lingering: &[u8]| Frontend {
            lingering: frontend(0, lingering).backends,
            ..frontend(1, backends)
        };
        let (fitted, skipped) = fit(&mirror, &desired(&[draining(&[1, 2, 4], &[3])]), &cap);
        assert_eq!(fitted, desired(&[draining(&[1, 2], &[3])]));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
    }

    /// ... and one that lingered and is live again (its pod ready again) stays too, in the
    /// slot it has: dropped, its flows would be cut and its UDP sockets closed.
    #[test]
    fn a_frontend_that_cannot_grow_keeps_a_backend_live_again() {
        let cap = Capacity {
            backends: 3,
            ..ROOMY
        };
        let draining = |backends: &[u8], lingering: &[u8]| Frontend {
            lingering: frontend(0, lingering).backends,
            ..frontend(1, backends)
        };
        let mirror = programmed(&desired(&[draining(&[1, 3], &[2])]));
        let (fitted, skipped) = fit(&mirror, &desired(&[frontend(1, &[1, 2, 3, 4])]), &cap);
        assert_eq!(fitted, desired(&[frontend(1, &[1, 2, 3])]));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            !plan(&mirror, &fitted)
                .expect("plan")
                .iter()
                .any(|op| matches!(op, crate::sync::Op::DeleteBackend { .. })),
            "no backend departs"
        );
    }

    /// Rev-NAT ids a plan does not give out count as used: those only a failed sync's
    /// leftover source ranges name, and none is left for a frontend whose id the array (made
    /// smaller) has no room for.
    #[test]
    fn rev_nat_ids_a_plan_will_not_give_out_count_as_used() {
        let cap = Capacity {
            rev_nat: 2,
            ..ROOMY
        };
        let mut mirror = programmed(&desired(&[frontend(1, &[1])]));
        let range = SourceRange::new(Ipv4Addr::new(203, 0, 113, 0), 24);
        mirror.source_ranges.insert((2, range));
        let both = desired(&[frontend(1, &[1]), frontend(2, &[2])]);
        let (fitted, skipped) = fit(&mirror, &both, &cap);
        assert_eq!(fitted, desired(&[frontend(1, &[1])]));
        assert!(
            skipped[0].reason.contains("the rev-NAT map is full"),
            "{skipped:?}"
        );

        // Three frontends programmed, restarted with room for two ids: the one whose id the
        // array lost and that finds none free goes (named), and the plan writes only ids
        // the array has.
        let mut mirror = programmed(&desired(&[
            frontend(1, &[1]),
            frontend(2, &[2]),
            frontend(3, &[3]),
        ]));
        for key in [frontend(2, &[]).key, frontend(3, &[]).key] {
            let f = mirror.frontends.get_mut(&key).expect("programmed");
            mirror.rev_nat_ids.remove(&f.rev_nat_id);
            f.rev_nat_id = 0;
        }
        let all = desired(&[frontend(1, &[1]), frontend(2, &[2]), frontend(3, &[3])]);
        let (fitted, skipped) = fit(&mirror, &all, &cap);
        assert_eq!(fitted, desired(&[frontend(1, &[1]), frontend(2, &[2])]));
        assert!(skipped[0].object.contains("svc-3"), "{skipped:?}");
        let ops = plan(&mirror, &fitted).expect("plan");
        let ids: Vec<u16> = ops
            .iter()
            .filter_map(|op| match op {
                crate::sync::Op::PutRevNat { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [2], "{ops:?}");
    }

    /// The range 203.0.`b`.0/24.
    fn range(b: u8) -> SourceRange {
        SourceRange::new(Ipv4Addr::new(203, 0, b, 0), 24)
    }

    /// Frontend `host` (backend `host`) filtering its clients to the [`range`]s `ranges`.
    fn ranged(host: u8, ranges: &[u8]) -> Frontend {
        Frontend {
            source_ranges: ranges.iter().map(|r| range(*r)).collect(),
            ..frontend(host, &[host])
        }
    }

    /// A restart with a smaller source-range trie copies what it has room for: an LB
    /// frontend whose ranges all stayed behind is left out rather than opened to every
    /// client.
    #[test]
    fn a_filtered_frontend_whose_ranges_are_gone_is_not_opened() {
        let want = desired(&[ranged(1, &[1]), ranged(2, &[2])]);
        let mut mirror = programmed(&want);
        // Frontend 2's range was not copied into the smaller trie, which is full.
        let id = mirror.frontends[&frontend(2, &[]).key].rev_nat_id;
        mirror.source_ranges.remove(&(id, range(2)));
        let cap = Capacity {
            source_ranges: 1,
            ..ROOMY
        };
        let (fitted, skipped) = fit(&mirror, &want, &cap);
        assert_eq!(fitted, desired(&[ranged(1, &[1])]));
        assert!(skipped[0].reason.contains("not programmed"), "{skipped:?}");
    }

    /// A Service's ranges changed while the trie is full: the frontend keeps only the
    /// ranges it still lists (the new ones wait for the room the revoked ones free), so a
    /// revoked range never stays open; with none left, it is left out until they fit. When
    /// another map is the full one, it takes the ranges it lists now.
    #[test]
    fn a_full_trie_never_keeps_a_range_the_service_revoked() {
        let mirror = programmed(&desired(&[ranged(1, &[1, 2])]));
        let cap = Capacity {
            source_ranges: 2,
            ..ROOMY
        };
        let (fitted, skipped) = fit(&mirror, &desired(&[ranged(1, &[1, 3])]), &cap);
        assert_eq!(fitted, desired(&[ranged(1, &[1])]));
        assert!(skipped[0].reason.contains("keeping the 1"), "{skipped:?}");
        // What that sync writes frees the room the next one needs.
        let mut next = mirror.clone();
        for op in plan(&next, &fitted).expect("plan") {
            next.apply(&op);
        }
        let want = desired(&[ranged(1, &[1, 3])]);
        assert_eq!(fit(&next, &want, &cap), (want.clone(), vec![]));

        let (fitted, skipped) = fit(&mirror, &desired(&[ranged(1, &[3, 4])]), &cap);
        assert_eq!(fitted, desired(&[]));
        assert!(skipped[0].reason.contains("not programmed"), "{skipped:?}");

        // The services map full (a new backend does not fit) while the trie has room: the
        // frontend keeps its backends and takes the ranges it lists now.
        let mirror = programmed(&desired(&[ranged(1, &[1])]));
        let cap = Capacity {
            services: 2,
            source_ranges: 2,
            ..ROOMY
        };
        let grown = Frontend {
            backends: frontend(1, &[1, 2]).backends,
            ..ranged(1, &[2])
        };
        let (fitted, skipped) = fit(&mirror, &desired(&[grown]), &cap);
        assert_eq!(fitted, desired(&[ranged(1, &[2])]));
        assert!(skipped[0].reason.contains("keeping the 1"), "{skipped:?}");
    }

    #[test]
    fn the_backends_and_rev_nat_maps_are_limits_too() {
        let want = desired(&[frontend(1, &[1, 2]), frontend(2, &[3, 4])]);
        let (fitted, skipped) = fit(
            &Programmed::default(),
            &want,
            &Capacity {
                backends: 3,
                ..ROOMY
            },
        );
        assert_eq!(fitted, desired(&[frontend(1, &[1, 2])]));
        assert!(
            skipped[0]
                .reason
                .contains("the backends map is full (3 entries)")
        );
        let (fitted, skipped) = fit(
            &Programmed::default(),
            &want,
            &Capacity {
                rev_nat: 1,
                ..ROOMY
            },
        );
        assert_eq!(fitted, desired(&[frontend(1, &[1, 2])]));
        assert!(
            skipped[0]
                .reason
                .contains("the rev-NAT map is full (1 entries)")
        );
    }

    #[test]
    fn rev_nat_ids_are_16_bit() {
        let sizes = MapSizes {
            rev_nat: 1 << 20,
            ..MapSizes::default()
        };
        assert_eq!(Capacity::from(&sizes).rev_nat, 65535);
    }

    #[test]
    fn index_0_of_the_id_arrays_holds_nothing() {
        let sizes = MapSizes {
            backends: 100,
            rev_nat: 10,
            ..MapSizes::default()
        };
        let capacity = Capacity::from(&sizes);
        assert_eq!((capacity.backends, capacity.rev_nat), (99, 9));
        // The default rev-NAT array (65536 entries) holds every 16-bit id from 1.
        assert_eq!(Capacity::from(&MapSizes::default()).rev_nat, 65535);
    }
}
