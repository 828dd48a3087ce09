//! From desired state to map writes: diff against what is programmed, in an order that
//! lock-free readers can never observe half-done.
//!
//! `Programmed` mirrors the maps in model terms. It is built once from the pinned maps
//! (a restart adopts, never flushes) and then kept exact by applying every operation to it
//! as it is written, so each sync only diffs in memory and writes the difference.
//!
//! Order (DESIGN.md section 3): backends, backend slots, rev-NAT, slot 0 (the new `count`
//! makes the new slots visible), slots above the new count; removed frontends go slot 0
//! first, then their slots, then their rev-NAT entry; unreferenced backends last.
//! `loadBalancerSourceRanges` entries are added before the slot 0 whose flag turns them on
//! and removed last, so no allowed client is ever dropped in between.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};
use aya::maps::lpm_trie::Key;
use proxy_common::{
    BackendValue, MAP_BACKENDS, MAP_REV_NAT, MAP_SERVICES, RevNatValue, SVC_FLAG_AFFINITY,
    SVC_FLAG_DROP_EMPTY, SVC_FLAG_NODE_ADDRESS, SVC_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue,
    SourceRangeKey,
};

use crate::abi;
use crate::dataplane::{MapContents, Maps};
use crate::model::{BackendAddr, DesiredState, Frontend, FrontendKey, SourceRange, WhenEmpty};
use crate::stale_udp::StaleUdp;

mod cluster_ips;
mod ns_filter;
pub mod touched;

/// One frontend as programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedFrontend {
    pub rev_nat_id: u16,
    pub flags: u16,
    /// Slot 0's sessionAffinity timeout (seconds; 0 without `SVC_FLAG_AFFINITY`).
    pub affinity_timeout: u32,
    /// Slot 0's affinity id (0 without `SVC_FLAG_AFFINITY`, or written before it existed).
    pub affinity_id: u16,
    /// Slot 0's `count`: slots `1..=count` are live.
    pub count: u16,
    /// Backend id per slot number. Slots above `count` hold the lingering backends (the
    /// programs never read them; they keep the backends in the backends map for the flows
    /// they have), or are leftovers of an interrupted sync.
    pub slots: BTreeMap<u16, u32>,
}

/// The maps' contents in model terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub frontends: BTreeMap<FrontendKey, ProgrammedFrontend>,
    pub backends: BTreeMap<u32, BackendAddr>,
    /// Ids of the backends written with `BACKEND_FLAG_LOCAL`: a backend whose endpoint moves
    /// to or from this node keeps its id but must be rewritten.
    pub local_backends: BTreeSet<u32>,
    /// Rev-NAT ids present in the rev-NAT map (some may be orphans of an interrupted sync).
    pub rev_nat_ids: BTreeSet<u16>,
    /// `loadBalancerSourceRanges` entries by the rev-NAT id of their frontend.
    pub source_ranges: BTreeSet<(u16, SourceRange)>,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend {
        id: u32,
        backend: BackendAddr,
        /// The endpoint runs on this node (`BACKEND_FLAG_LOCAL`).
        local: bool,
    },
    PutSlot {
        frontend: FrontendKey,
        slot: u16,
        backend_id: u32,
        rev_nat_id: u16,
    },
    PutRevNat {
        id: u16,
        frontend: FrontendKey,
    },
    PutFrontend {
        frontend: FrontendKey,
        count: u16,
        rev_nat_id: u16,
        flags: u16,
        affinity_timeout: u32,
        affinity_id: u16,
    },
    DeleteSlot {
        frontend: FrontendKey,
        slot: u16,
    },
    DeleteFrontend {
        frontend: FrontendKey,
    },
    DeleteRevNat {
        id: u16,
    },
    DeleteBackend {
        id: u32,
    },
    PutSourceRange {
        rev_nat_id: u16,
        range: SourceRange,
    },
    DeleteSourceRange {
        rev_nat_id: u16,
        range: SourceRange,
    },
}

/// One operation in the map ABI's terms: which entry of which map gets which bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapWrite {
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    PutBackend(u32, BackendValue),
    DeleteBackend(u32),
    PutRevNat(u16, RevNatValue),
    DeleteRevNat(u16),
    /// (prefix length, key data) of the LPM trie.
    PutSourceRange(u32, SourceRangeKey),
    DeleteSourceRange(u32, SourceRangeKey),
}

impl Op {
    /// The frontend whose entries this operation writes or deletes.
    pub fn frontend(&self) -> Option<&FrontendKey> {
        match self {
            Op::PutSlot { frontend, .. }
            | Op::PutFrontend { frontend, .. }
            | Op::DeleteSlot { frontend, .. }
            | Op::DeleteFrontend { frontend } => Some(frontend),
            Op::PutBackend { .. }
            | Op::PutRevNat { .. }
            | Op::DeleteRevNat { .. }
            | Op::DeleteBackend { .. }
            | Op::PutSourceRange { .. }
            | Op::DeleteSourceRange { .. } => None,
        }
    }

    /// The map entry this operation writes or deletes.
    pub fn encode(&self) -> MapWrite {
        match self {
            Op::PutBackend { id, backend, local } => {
                MapWrite::PutBackend(*id, abi::backend_value(backend, *local))
            }
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
                rev_nat_id,
            } => MapWrite::PutService(
                abi::service_key(frontend, *slot),
                ServiceValue {
                    backend_id: *backend_id,
                    rev_nat_id: *rev_nat_id,
                    ..Default::default()
                },
            ),
            Op::PutRevNat { id, frontend } => {
                MapWrite::PutRevNat(*id, abi::rev_nat_value(frontend))
            }
            Op::PutFrontend {
                frontend,
                count,
                rev_nat_id,
                flags,
                affinity_timeout,
                affinity_id,
            } => MapWrite::PutService(
                abi::service_key(frontend, 0),
                ServiceValue {
                    count: *count,
                    rev_nat_id: *rev_nat_id,
                    flags: *flags,
                    affinity_timeout: *affinity_timeout,
                    affinity_id: *affinity_id,
                    ..Default::default()
                },
            ),
            Op::DeleteSlot { frontend, slot } => {
                MapWrite::DeleteService(abi::service_key(frontend, *slot))
            }
            Op::DeleteFrontend { frontend } => {
                MapWrite::DeleteService(abi::service_key(frontend, 0))
            }
            Op::DeleteRevNat { id } => MapWrite::DeleteRevNat(*id),
            Op::DeleteBackend { id } => MapWrite::DeleteBackend(*id),
            Op::PutSourceRange { rev_nat_id, range } => {
                let (prefix_len, data) = abi::source_range_key(*rev_nat_id, range);
                MapWrite::PutSourceRange(prefix_len, data)
            }
            Op::DeleteSourceRange { rev_nat_id, range } => {
                let (prefix_len, data) = abi::source_range_key(*rev_nat_id, range);
                MapWrite::DeleteSourceRange(prefix_len, data)
            }
        }
    }
}

impl Programmed {
    /// Rebuilds the mirror from map contents. Entries this version cannot interpret
    /// (unknown protocol or scope) are ignored.
    pub fn from_maps(contents: &MapContents) -> Self {
        let mut p = Programmed::default();
        let mut slot_entries = Vec::new();
        for (key, value) in &contents.services {
            let Some(frontend) = abi::frontend_of(key) else {
                continue;
            };
            if key.slot == 0 {
                let f = p
                    .frontends
                    .entry(frontend)
                    .or_insert_with(|| empty_frontend(value));
                // An id the rev-NAT array has no room for (it was made smaller than the
                // ids in use, `--map-size-rev-nat`) is taken for none: the next plan gives
                // the frontend one it has room for.
                f.rev_nat_id = if u32::from(value.rev_nat_id) < contents.rev_nat_room {
                    value.rev_nat_id
                } else {
                    0
                };
                f.flags = value.flags;
                f.affinity_timeout = value.affinity_timeout;
                f.affinity_id = value.affinity_id;
                f.count = value.count;
            } else {
                slot_entries.push((frontend, key.slot, value.backend_id));
            }
        }
        for (frontend, slot, backend_id) in slot_entries {
            // Slots without a slot 0 are leftovers of a half-deleted frontend; keep them
            // under a zero-count frontend so the next plan deletes them.
            p.frontends
                .entry(frontend)
                .or_insert_with(|| empty_frontend(&ServiceValue::default()))
                .slots
                .insert(slot, backend_id);
        }
        for (id, value) in &contents.backends {
            if let Some(backend) = abi::backend_of(value) {
                p.backends.insert(*id, backend);
                if abi::backend_is_local(value) {
                    p.local_backends.insert(*id);
                }
            }
        }
        p.rev_nat_ids = contents.rev_nat.iter().map(|(id, _)| *id).collect();
        p.source_ranges = contents.source_ranges.iter().copied().collect();
        // As `apply` keeps it: a frontend with neither slot 0 nor slots is not there.
        p.frontends
            .retain(|_, f| f.flags != 0 || !f.slots.is_empty());
        p
    }

    /// Keeps the mirror exact after `op` was written.
    pub fn apply(&mut self, op: &Op) {
        let touched = op.frontend().copied();
        match op {
            Op::PutBackend { id, backend, local } => {
                self.backends.insert(*id, *backend);
                if *local {
                    self.local_backends.insert(*id);
                } else {
                    self.local_backends.remove(id);
                }
            }
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
                ..
            } => {
                self.frontend_mut(frontend).slots.insert(*slot, *backend_id);
            }
            Op::PutRevNat { id, .. } => {
                self.rev_nat_ids.insert(*id);
            }
            Op::PutFrontend {
                frontend,
                count,
                rev_nat_id,
                flags,
                affinity_timeout,
                affinity_id,
            } => {
                let f = self.frontend_mut(frontend);
                f.count = *count;
                f.rev_nat_id = *rev_nat_id;
                f.flags = *flags;
                f.affinity_timeout = *affinity_timeout;
                f.affinity_id = *affinity_id;
            }
            Op::DeleteSlot { frontend, slot } => {
                if let Some(f) = self.frontends.get_mut(frontend) {
                    f.slots.remove(slot);
                }
            }
            Op::DeleteFrontend { frontend } => {
                // Slot 0 is gone: reset all its fields, as `from_maps` would see them.
                if let Some(f) = self.frontends.get_mut(frontend) {
                    f.count = 0;
                    f.flags = 0;
                    f.rev_nat_id = 0;
                    f.affinity_timeout = 0;
                    f.affinity_id = 0;
                }
            }
            Op::DeleteRevNat { id } => {
                self.rev_nat_ids.remove(id);
            }
            Op::DeleteBackend { id } => {
                self.backends.remove(id);
                self.local_backends.remove(id);
            }
            Op::PutSourceRange { rev_nat_id, range } => {
                self.source_ranges.insert((*rev_nat_id, *range));
            }
            Op::DeleteSourceRange { rev_nat_id, range } => {
                self.source_ranges.remove(&(*rev_nat_id, *range));
            }
        }
        // A frontend with neither slot 0 nor slots is gone. Only the one written can have
        // become so: looking at all of them per write made a large first sync quadratic.
        if let Some(key) = touched
            && self
                .frontends
                .get(&key)
                .is_some_and(|f| f.flags == 0 && f.slots.is_empty())
        {
            self.frontends.remove(&key);
        }
    }

    fn frontend_mut(&mut self, key: &FrontendKey) -> &mut ProgrammedFrontend {
        self.frontends
            .entry(*key)
            .or_insert_with(|| empty_frontend(&ServiceValue::default()))
    }
}

fn empty_frontend(value: &ServiceValue) -> ProgrammedFrontend {
    ProgrammedFrontend {
        rev_nat_id: value.rev_nat_id,
        flags: 0,
        affinity_timeout: 0,
        affinity_id: 0,
        count: 0,
        slots: BTreeMap::new(),
    }
}

impl ProgrammedFrontend {
    /// The id its session-affinity entries are kept under.
    pub fn affinity_key(&self) -> u16 {
        if self.affinity_id != 0 {
            self.affinity_id
        } else {
            self.rev_nat_id
        }
    }
}

/// Computes the ordered writes that turn `programmed` into `desired`.
///
/// Fails without writing anything when ids run out (more than 65535 frontends).
pub fn plan(programmed: &Programmed, desired: &DesiredState) -> Result<Vec<Op>> {
    let mut ops = Vec::new();

    // Backend ids: keep the id of every backend that is already programmed; rewrite it in
    // place when its locality changed (one map update, atomic for readers).
    let mut backend_ids: BTreeMap<BackendAddr, u32> = programmed
        .backends
        .iter()
        .map(|(id, b)| (*b, *id))
        .collect();
    let mut used_backend_ids: BTreeSet<u32> = programmed.backends.keys().copied().collect();
    let mut backend_cursor = 1;
    let wanted_backends: BTreeSet<BackendAddr> = desired
        .frontends
        .values()
        .flat_map(|f| f.slotted().copied())
        .collect();
    for backend in &wanted_backends {
        let local = desired.local_backends.contains(backend);
        if let Some(id) = backend_ids.get(backend) {
            if programmed.local_backends.contains(id) != local {
                ops.push(Op::PutBackend {
                    id: *id,
                    backend: *backend,
                    local,
                });
            }
            continue;
        }
        let Some(id) = next_free_u32(&used_backend_ids, backend_cursor) else {
            bail!("no free backend id for {backend}");
        };
        used_backend_ids.insert(id);
        backend_cursor = id.saturating_add(1);
        backend_ids.insert(*backend, id);
        ops.push(Op::PutBackend {
            id,
            backend: *backend,
            local,
        });
    }

    // Rev-NAT ids: keep each live frontend's id; allocate for new ones.
    let mut used_rev_nat: BTreeSet<u16> = programmed.rev_nat_ids.clone();
    let mut rev_nat_cursor = 1;
    used_rev_nat.extend(programmed.frontends.values().map(|f| f.rev_nat_id));
    // Ranges a sync that failed midway left under a deleted frontend's id: given to a new
    // frontend, the id would let their clients through its filter until they are deleted.
    used_rev_nat.extend(programmed.source_ranges.iter().map(|(id, _)| *id));
    let mut assigned = Vec::with_capacity(desired.frontends.len());
    for (key, frontend) in &desired.frontends {
        let current = programmed.frontends.get(key).filter(|f| f.flags != 0);
        let rev_nat_id = match current {
            Some(f) if f.rev_nat_id != 0 => f.rev_nat_id,
            _ => {
                let Some(id) = next_free_u16(&used_rev_nat, rev_nat_cursor) else {
                    bail!(
                        "no free rev-NAT id for frontend {key} ({})",
                        frontend.service
                    );
                };
                used_rev_nat.insert(id);
                rev_nat_cursor = id.saturating_add(1);
                id
            }
        };
        assigned.push((key, frontend, current, rev_nat_id));
    }
    let groups = affinity_groups(&assigned);
    let phases = Phases::of(
        programmed,
        desired,
        assigned,
        |g| groups.get(g).copied(),
        |b| backend_ids.get(b).copied(),
    )?;
    let wanted_ranges = phases.emit(programmed, &mut ops);

    // Frontends that are no longer wanted: slot 0, slots, rev-NAT.
    let mut live_rev_nat: BTreeSet<u16> = BTreeSet::new();
    for (key, f) in &programmed.frontends {
        if desired.frontends.contains_key(key) {
            live_rev_nat.insert(f.rev_nat_id);
            continue;
        }
        if f.flags != 0 {
            ops.push(Op::DeleteFrontend { frontend: *key });
        }
        ops.extend(f.slots.keys().map(|slot| Op::DeleteSlot {
            frontend: *key,
            slot: *slot,
        }));
    }
    for op in &ops {
        if let Op::PutRevNat { id, .. } = op {
            live_rev_nat.insert(*id);
        }
    }
    ops.extend(
        programmed
            .rev_nat_ids
            .iter()
            .filter(|id| !live_rev_nat.contains(id))
            .map(|id| Op::DeleteRevNat { id: *id }),
    );

    // Backends nobody references any more.
    ops.extend(
        programmed
            .backends
            .iter()
            .filter(|(_, b)| !wanted_backends.contains(b))
            .map(|(id, _)| Op::DeleteBackend { id: *id }),
    );

    // Source ranges no frontend wants: after the slot 0 that stopped using them.
    ops.extend(
        programmed
            .source_ranges
            .difference(&wanted_ranges)
            .map(|(rev_nat_id, range)| Op::DeleteSourceRange {
                rev_nat_id: *rev_nat_id,
                range: *range,
            }),
    );
    Ok(ops)
}

/// A frontend whose rev-NAT id is known, as the plans assign them.
type Assigned<'a> = (
    &'a FrontendKey,
    &'a Frontend,
    Option<&'a ProgrammedFrontend>,
    u16,
);

/// The rev-NAT ids of the frontends that name an affinity group (ClusterIP frontends with
/// affinity), by key: only those, so that the plan of many Services builds a small map.
fn affinity_groups(assigned: &[Assigned<'_>]) -> BTreeMap<FrontendKey, u16> {
    assigned
        .iter()
        .filter(|(key, frontend, _, _)| frontend.affinity_group.as_ref() == Some(*key))
        .map(|(key, _, _, rev_nat_id)| (**key, *rev_nat_id))
        .collect()
}

/// Slot 0's affinity id for `frontend`, whose rev-NAT id is `own`: the rev-NAT id
/// (`rev_nat_of`) of its Service port's ClusterIP frontend while that one is wanted for the
/// same port, else its own; 0 without affinity (slot 0 of frontends without affinity never
/// changes for it).
fn affinity_id(
    frontend: &Frontend,
    own: u16,
    desired: &DesiredState,
    rev_nat_of: impl Fn(&FrontendKey) -> Option<u16>,
) -> u16 {
    if frontend.affinity_timeout.is_none() {
        return 0;
    }
    frontend
        .affinity_group
        .filter(|group| {
            desired
                .frontends
                .get(group)
                .is_some_and(|g| g.service == frontend.service)
        })
        .and_then(|group| rev_nat_of(&group))
        .unwrap_or(own)
}

/// (affinity id, backend id) pairs that session-affinity entries must no longer use: the
/// backend left the live slots of an affinity frontend and no other frontend of its group
/// offers it, or affinity was switched off. The datapath follows an entry only to a backend
/// in the frontend's live slots; the agent removes these so that a backend that comes back
/// starts afresh (kube-proxy's `recent` lists go with their endpoint chains) and the LRU
/// holds live entries.
pub fn stale_affinity(programmed: &Programmed, desired: &DesiredState) -> BTreeSet<(u16, u32)> {
    let ids: BTreeMap<&BackendAddr, u32> =
        programmed.backends.iter().map(|(id, b)| (b, *id)).collect();
    stale_affinity_among(
        programmed.frontends.iter(),
        |b| ids.get(b).copied(),
        desired,
    )
}

/// [`stale_affinity`] among some of the programmed frontends. A touched sync passes the
/// frontends that changed only: an entry whose backend an unchanged frontend of its group
/// still offers may go too, which costs that client its endpoint once (a backend that
/// leaves one frontend of a Service port and stays in another: the ClusterIP and the
/// NodePort of an `internalTrafficPolicy: Local` Service see different endpoints).
fn stale_affinity_among<'a>(
    frontends: impl Iterator<Item = (&'a FrontendKey, &'a ProgrammedFrontend)> + Clone,
    id_of: impl Fn(&BackendAddr) -> Option<u32>,
    desired: &DesiredState,
) -> BTreeSet<(u16, u32)> {
    let keeps_affinity = |key: &FrontendKey, f: &ProgrammedFrontend| {
        let wanted = desired.frontends.get(key);
        (f.flags & SVC_FLAG_AFFINITY != 0)
            .then(|| wanted.filter(|d| d.affinity_timeout.is_some()))
            .flatten()
    };
    // What the group's frontends that keep affinity still offer new flows.
    let offered: BTreeSet<(u16, u32)> = frontends
        .clone()
        .filter_map(|(key, f)| keeps_affinity(key, f).map(|d| (f, d)))
        .flat_map(|(f, d)| {
            d.backends
                .iter()
                .filter_map(&id_of)
                .map(move |id| (f.affinity_key(), id))
        })
        .collect();
    let consider = |f: &ProgrammedFrontend, d: Option<&Frontend>| {
        f.flags & SVC_FLAG_AFFINITY != 0 && d.is_none_or(|d| d.affinity_timeout.is_some())
    };
    let left = departed_among(
        frontends.clone(),
        &id_of,
        desired,
        Leaving::Live,
        consider,
        ProgrammedFrontend::affinity_key,
    )
    .into_iter()
    .filter(|pair| !offered.contains(pair));
    // Affinity switched off (for the whole Service): every entry of the group goes.
    let switched_off = frontends.flat_map(|(key, f)| {
        let off = f.flags & SVC_FLAG_AFFINITY != 0
            && desired
                .frontends
                .get(key)
                .is_some_and(|d| d.affinity_timeout.is_none());
        f.slots
            .values()
            .filter(move |_| off)
            .map(move |id| (f.affinity_key(), *id))
    });
    left.chain(switched_off).collect()
}

/// What a backend leaves when it departs from a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaving {
    /// The live slots (`1..=count`): no new flow goes to it. It may linger.
    Live,
    /// Every slot, lingering ones included: its existing flows end too.
    Every,
}

/// (rev-NAT id, backend id) pairs whose backend left its frontend, or whose frontend went
/// away, among the frontends `consider(programmed, desired)` selects. A backend that only
/// went from the live slots to the lingering ones has not left: its flows go on.
pub fn departed(
    programmed: &Programmed,
    desired: &DesiredState,
    consider: impl Fn(&ProgrammedFrontend, Option<&Frontend>) -> bool,
) -> BTreeSet<(u16, u32)> {
    let ids: BTreeMap<&BackendAddr, u32> =
        programmed.backends.iter().map(|(id, b)| (b, *id)).collect();
    departed_among(
        programmed.frontends.iter(),
        |b| ids.get(b).copied(),
        desired,
        Leaving::Every,
        consider,
        |f| f.rev_nat_id,
    )
}

/// [`departed`] (or, with [`Leaving::Live`], the pairs no new flow may use) among some of
/// the programmed frontends, each pair under the frontend's `pair_id` (its rev-NAT id, or
/// its affinity key).
fn departed_among<'a>(
    frontends: impl Iterator<Item = (&'a FrontendKey, &'a ProgrammedFrontend)>,
    id_of: impl Fn(&BackendAddr) -> Option<u32>,
    desired: &DesiredState,
    leaving: Leaving,
    consider: impl Fn(&ProgrammedFrontend, Option<&Frontend>) -> bool,
    pair_id: impl Fn(&ProgrammedFrontend) -> u16,
) -> BTreeSet<(u16, u32)> {
    let mut gone = BTreeSet::new();
    for (key, f) in frontends {
        let wanted = desired.frontends.get(key);
        if !consider(f, wanted) {
            continue;
        }
        let keep: BTreeSet<u32> = match (wanted, leaving) {
            (None, _) => BTreeSet::new(),
            (Some(d), Leaving::Live) => d.backends.iter().filter_map(&id_of).collect(),
            (Some(d), Leaving::Every) => d.slotted().filter_map(&id_of).collect(),
        };
        gone.extend(
            f.slots
                .iter()
                .filter(|(slot, _)| leaving == Leaving::Every || (1..=f.count).contains(*slot))
                .filter(|(_, id)| !keep.contains(id))
                .map(|(_, id)| (pair_id(f), *id)),
        );
    }
    gone
}

/// The UDP ones among (rev-NAT id, backend id) pairs, with their backends' addresses.
fn udp_pairs(
    programmed: &Programmed,
    pairs: impl IntoIterator<Item = (u16, u32)>,
) -> Vec<((u16, u32), BackendAddr)> {
    pairs
        .into_iter()
        .filter_map(|pair| programmed.backends.get(&pair.1).map(|b| (pair, *b)))
        .filter(|(_, b)| b.proto == crate::model::Protocol::Udp)
        .collect()
}

/// Of session-affinity pairs (affinity id, backend id) left over from a sync that failed,
/// those whose backend no frontend of `programmed` with session affinity offers under
/// that id (in a live slot): their entries can go. The others' backend is offered again
/// (or still: the writes that took it out did not happen).
fn affinity_not_offered(
    programmed: &Programmed,
    pairs: &BTreeSet<(u16, u32)>,
) -> BTreeSet<(u16, u32)> {
    let ids: BTreeSet<u16> = pairs.iter().map(|(id, _)| *id).collect();
    let offered: BTreeSet<(u16, u32)> = programmed
        .frontends
        .values()
        .filter(|f| f.flags & SVC_FLAG_AFFINITY != 0 && ids.contains(&f.affinity_key()))
        .flat_map(|f| {
            f.slots
                .iter()
                .filter(|(slot, _)| (1..=f.count).contains(*slot))
                .map(move |(_, id)| (f.affinity_key(), *id))
        })
        .collect();
    pairs.difference(&offered).copied().collect()
}

/// After a sync that failed partway: the pairs of `departed` that `programmed` (the maps
/// after the writes that were made) no longer serves in a live slot (`1..=count`). The
/// next sync starts from the maps, so it will not see these depart again; the others it
/// will, once it gets to them.
fn departed_so_far(
    programmed: &Programmed,
    mut departed: Vec<((u16, u32), BackendAddr)>,
) -> Vec<((u16, u32), BackendAddr)> {
    let ids: BTreeSet<u16> = departed
        .iter()
        .map(|((rev_nat_id, _), _)| *rev_nat_id)
        .collect();
    let served: BTreeSet<(u16, u32)> = programmed
        .frontends
        .values()
        .filter(|f| ids.contains(&f.rev_nat_id))
        .flat_map(|f| {
            // Not `range(1..=count)`: it panics when `count` is 0.
            f.slots
                .iter()
                .filter(|(slot, _)| (1..=f.count).contains(*slot))
                .map(move |(_, id)| (f.rev_nat_id, *id))
        })
        .collect();
    departed.retain(|(pair, _)| !served.contains(pair));
    departed
}

/// The writes of desired frontends beyond their backends, in the plan's phases: shared by
/// the full plan and the touched one, so that both keep the same write order.
#[derive(Default)]
struct Phases {
    slots: Vec<Op>,
    rev_nat: Vec<Op>,
    frontends: Vec<Op>,
    /// Lingering backends' slots past the current count: first of all, so that a socket
    /// pinned to a backend that starts to linger finds it there (`pinned_backend`) before
    /// the live slots stop holding it.
    lingering_early: Vec<Op>,
    /// Lingering backends' slots that are live until slot 0 lowers the count: after slot 0,
    /// so that no new flow is offered a lingering backend.
    lingering: Vec<Op>,
    shrink: Vec<Op>,
    /// The source ranges the planned frontends want.
    ranges: BTreeSet<(u16, SourceRange)>,
}

impl Phases {
    /// The writes of the `assigned` frontends, each with its affinity id (`group_rev_nat`
    /// names the rev-NAT id of an affinity group's ClusterIP frontend).
    fn of(
        programmed: &Programmed,
        desired: &DesiredState,
        assigned: Vec<Assigned<'_>>,
        group_rev_nat: impl Fn(&FrontendKey) -> Option<u16> + Copy,
        backend_id: impl Fn(&BackendAddr) -> Option<u32> + Copy,
    ) -> Result<Self> {
        let mut phases = Phases::default();
        for (key, frontend, current, rev_nat_id) in assigned {
            let affinity_id = affinity_id(frontend, rev_nat_id, desired, group_rev_nat);
            phases.frontend(
                programmed,
                key,
                frontend,
                current,
                (rev_nat_id, affinity_id),
                backend_id,
            )?;
        }
        Ok(phases)
    }

    /// The writes `frontend` needs once its rev-NAT id and affinity id are known
    /// (`current`: its slot 0 as programmed, if any). `backend_id` names the id each
    /// backend has or gets.
    fn frontend(
        &mut self,
        programmed: &Programmed,
        key: &FrontendKey,
        frontend: &Frontend,
        current: Option<&ProgrammedFrontend>,
        (rev_nat_id, affinity_id): (u16, u16),
        backend_id: impl Fn(&BackendAddr) -> Option<u32>,
    ) -> Result<()> {
        if !programmed.rev_nat_ids.contains(&rev_nat_id) || current.is_none() {
            self.rev_nat.push(Op::PutRevNat {
                id: rev_nat_id,
                frontend: *key,
            });
        }
        let Ok(count) = u16::try_from(frontend.backends.len()) else {
            bail!(
                "frontend {key} ({}) has more than 65535 backends",
                frontend.service
            );
        };
        let Ok(slotted) = u16::try_from(count as usize + frontend.lingering.len()) else {
            bail!(
                "frontend {key} ({}) has more than 65535 backends, lingering ones included",
                frontend.service
            );
        };
        let existing_slots = programmed.frontends.get(key).map(|f| &f.slots);
        let live_now = programmed.frontends.get(key).map_or(0, |f| f.count);
        // Live slots that no reader searches yet (past the current count, or empty) first;
        // then those whose backend moves to a higher slot (one was added before it), from
        // the top down, and those whose backend moves lower (one before it left), from the
        // bottom up: a backend that stays is written to its new slot before its old one is
        // overwritten, so that a socket pinned to it keeps finding it where the programs
        // look (`lb::pinned_backend`: halving over the live slots, then the 16 after the
        // count) for changes of up to 16 backends each way (the tests check that, after
        // every write); in slot order, an insertion lost each shifted backend for a write.
        let (mut fresh, mut moving_up, mut moving_down) = (Vec::new(), Vec::new(), Vec::new());
        // The same for the lingering slots past the current count, which the programs
        // search one by one: a lingering backend inserted before another one moves that one
        // up a slot, written there first.
        let (mut early_fresh, mut early_up, mut early_down) = (Vec::new(), Vec::new(), Vec::new());
        for (i, backend) in frontend.slotted().enumerate() {
            let slot = i as u16 + 1;
            let Some(backend_id) = backend_id(backend) else {
                bail!("backend {backend} of frontend {key} has no id");
            };
            let held = existing_slots.and_then(|s| s.get(&slot));
            if held == Some(&backend_id) {
                continue;
            }
            let write = Op::PutSlot {
                frontend: *key,
                slot,
                backend_id,
                rev_nat_id,
            };
            if slot <= count {
                let overwritten = held
                    .filter(|_| slot <= live_now)
                    .and_then(|id| programmed.backends.get(id));
                match overwritten {
                    None => fresh.push(write),
                    Some(old) if backend > old => moving_down.push(write),
                    Some(_) => moving_up.push(write),
                }
            } else if slot > live_now {
                match held.and_then(|id| programmed.backends.get(id)) {
                    None => early_fresh.push(write),
                    Some(old) if backend > old => early_down.push(write),
                    Some(_) => early_up.push(write),
                }
            } else {
                self.lingering.push(write);
            }
        }
        self.lingering_early.extend(early_fresh);
        self.lingering_early.extend(early_up.into_iter().rev());
        self.lingering_early.extend(early_down);
        self.slots.extend(fresh);
        self.slots.extend(moving_up.into_iter().rev());
        self.slots.extend(moving_down);
        self.ranges
            .extend(frontend.source_ranges.iter().map(|r| (rev_nat_id, *r)));
        let (flags, affinity_timeout) = slot0_settings(frontend);
        let unchanged = current.is_some_and(|f| {
            f.count == count
                && f.rev_nat_id == rev_nat_id
                && f.flags == flags
                && f.affinity_timeout == affinity_timeout
                && f.affinity_id == affinity_id
        });
        if !unchanged {
            self.frontends.push(Op::PutFrontend {
                frontend: *key,
                count,
                rev_nat_id,
                flags,
                affinity_timeout,
                affinity_id,
            });
        }
        if let Some(slots) = existing_slots {
            for slot in slots.keys().filter(|s| **s > slotted) {
                self.shrink.push(Op::DeleteSlot {
                    frontend: *key,
                    slot: *slot,
                });
            }
        }
        Ok(())
    }

    /// Appends the writes in order: lingering slots past the current count, live slots,
    /// rev-NAT, new source ranges, slot 0, the other lingering slots, surplus slots. Returns
    /// the wanted source ranges (the caller deletes the others last).
    fn emit(self, programmed: &Programmed, ops: &mut Vec<Op>) -> BTreeSet<(u16, SourceRange)> {
        ops.extend(self.lingering_early);
        ops.extend(self.slots);
        ops.extend(self.rev_nat);
        ops.extend(
            self.ranges
                .difference(&programmed.source_ranges)
                .map(|(rev_nat_id, range)| Op::PutSourceRange {
                    rev_nat_id: *rev_nat_id,
                    range: *range,
                }),
        );
        ops.extend(self.frontends);
        ops.extend(self.lingering);
        ops.extend(self.shrink);
        self.ranges
    }
}

/// Slot 0's flags and affinity timeout for a desired frontend: its kind, ClientIP affinity,
/// and whether an empty backend set drops (a `Local` policy) instead of refusing.
fn slot0_settings(frontend: &Frontend) -> (u16, u32) {
    let mut flags = frontend.kind.flag();
    if frontend.affinity_timeout.is_some() {
        flags |= SVC_FLAG_AFFINITY;
    }
    if frontend.backends.is_empty() && frontend.when_empty == WhenEmpty::Drop {
        flags |= SVC_FLAG_DROP_EMPTY;
    }
    if !frontend.source_ranges.is_empty() {
        flags |= SVC_FLAG_SOURCE_RANGES;
    }
    if frontend.at_node_address {
        flags |= SVC_FLAG_NODE_ADDRESS;
    }
    (flags, frontend.affinity_timeout.unwrap_or(0))
}

fn next_free_u32(used: &BTreeSet<u32>, from: u32) -> Option<u32> {
    let used = used.range(from..).map(|v| u64::from(*v));
    next_free_id(used, u64::from(from), u64::from(u32::MAX)).map(|v| v as u32)
}

fn next_free_u16(used: &BTreeSet<u16>, from: u16) -> Option<u16> {
    let used = used.range(from..).map(|v| u64::from(*v));
    next_free_id(used, u64::from(from), u64::from(u16::MAX)).map(|v| v as u16)
}

/// Smallest id in `from..=max` absent from the sorted `used` ids (all >= `from`).
///
/// Within one plan ids are only taken, never freed, so the smallest free id only grows:
/// callers continue from just after the last id they took, which keeps a large first sync
/// linear instead of rescanning from 1 for every new id.
fn next_free_id(used: impl Iterator<Item = u64>, from: u64, max: u64) -> Option<u64> {
    let mut candidate = from.max(1);
    for id in used {
        if id < candidate {
            continue;
        }
        if id > candidate {
            break;
        }
        candidate += 1;
    }
    (candidate <= max).then_some(candidate)
}

/// What one sync did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub writes: usize,
    pub frontends: usize,
    pub backends: usize,
}

/// Entries of the services map: each frontend's slot 0 (while it has one) and slots.
pub fn service_entries(programmed: &Programmed) -> usize {
    programmed.frontends.values().map(frontend_entries).sum()
}

fn frontend_entries(f: &ProgrammedFrontend) -> usize {
    usize::from(f.flags != 0) + f.slots.len()
}

/// Owns the maps and the mirror of their contents.
pub struct Syncer {
    maps: Maps,
    programmed: Programmed,
    index: touched::BackendIndex,
    /// `service_entries(programmed)`, kept as ops are applied.
    service_entries: usize,
    /// Closes connected UDP sockets of departed backends, beside the sync (C27).
    stale_udp: StaleUdp,
    /// Session-affinity pairs (affinity id, backend id) whose entries a sync that failed
    /// (in its writes, or in deleting them) did not delete: the next sync starts from the
    /// maps and would not find them stale again. Deleted by the next complete sync, unless
    /// a frontend offers the backend again by then.
    affinity_pending: BTreeSet<(u16, u32)>,
    /// The north-south prefilter's bits, written ahead of what they stand for.
    ns_filters: ns_filter::NsFilters,
    /// The served ClusterIPs, written after the frontends that make them so.
    cluster_ips: cluster_ips::ClusterIps,
    /// No sync has completed since the start: the first that does asks the stale-UDP worker
    /// for a sweep (`stale_udp`). On maps new to this node it finds no socket translated.
    sweep_due: bool,
}

impl Syncer {
    /// Adopts whatever the (possibly pinned, pre-existing) maps hold.
    pub fn adopt(maps: Maps) -> Result<Self> {
        let programmed = Programmed::from_maps(&maps.read()?);
        let index = touched::BackendIndex::of(&programmed);
        let stale_udp = StaleUdp::spawn(maps.sock_reverse()?)
            .context("starting the thread that closes stale UDP sockets")?;
        let ns_filters = ns_filter::NsFilters::unarmed();
        let cluster_ips = cluster_ips::ClusterIps::adopt(&programmed, maps.cluster_ips()?);
        Ok(Syncer {
            cluster_ips,
            // Also when no frontend is left: the last UDP Service may have gone.
            sweep_due: true,
            ns_filters,
            maps,
            service_entries: service_entries(&programmed),
            programmed,
            index,
            stale_udp,
            affinity_pending: BTreeSet::new(),
        })
    }

    /// Entries of the services map.
    pub fn service_entries(&self) -> usize {
        self.service_entries
    }

    pub fn programmed(&self) -> &Programmed {
        &self.programmed
    }

    /// Whether `backend` is in the maps.
    pub fn has_backend(&self, backend: &BackendAddr) -> bool {
        self.index.id(backend).is_some()
    }

    /// Writes the difference between what is programmed and `desired`.
    pub fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats> {
        let ops = plan(&self.programmed, desired)?;
        let stale_affinity = stale_affinity(&self.programmed, desired);
        let departed = departed(&self.programmed, desired, |_, _| true);
        self.execute(&ops, departed, stale_affinity)
    }

    /// [`Syncer::sync`] when the maps hold exactly the state of the previous sync (it
    /// succeeded and was given all it wanted) and `desired` differs from it only where
    /// `touched` says: the work follows the change, not the number of Services.
    pub fn sync_touched(
        &mut self,
        desired: &DesiredState,
        touched: touched::Touched<'_>,
    ) -> Result<SyncStats> {
        let ops = touched::plan(&self.programmed, &self.index, desired, touched)?;
        let among = touched
            .frontends
            .iter()
            .filter_map(|k| self.programmed.frontends.get_key_value(k));
        let index = &self.index;
        let stale_affinity = stale_affinity_among(among.clone(), |b| index.id(b), desired);
        let departed = departed_among(
            among,
            |b| index.id(b),
            desired,
            Leaving::Every,
            |_, _| true,
            |f| f.rev_nat_id,
        );
        self.execute(&ops, departed, stale_affinity)
    }

    fn execute(
        &mut self,
        ops: &[Op],
        departed: BTreeSet<(u16, u32)>,
        stale_affinity: BTreeSet<(u16, u32)>,
    ) -> Result<SyncStats> {
        let maps = &mut self.maps;
        if let Err(e) = self
            .ns_filters
            .before(ops, |entry, filter| maps.put_ns_filter(entry, filter))
        {
            self.affinity_pending.extend(stale_affinity);
            return Err(e);
        }
        // Connected UDP sockets pointed at a departed backend must reconnect (C27). The ids
        // are resolved before the writes, which may delete the backends.
        let departed_udp = udp_pairs(&self.programmed, departed);
        // A sweep under way must not close a socket that a slot written now serves: it
        // counts these pairs as present before the programs can offer them.
        let added: BTreeMap<u32, BackendAddr> = ops
            .iter()
            .filter_map(|op| match op {
                Op::PutBackend { id, backend, .. } => Some((*id, *backend)),
                _ => None,
            })
            .collect();
        self.stale_udp.present_ahead(ops.iter().filter_map(|op| {
            match op {
                Op::PutSlot {
                    backend_id,
                    rev_nat_id,
                    ..
                } => added
                    .get(backend_id)
                    .or_else(|| self.programmed.backends.get(backend_id))
                    .filter(|b| b.proto == crate::model::Protocol::Udp)
                    .map(|b| (*rev_nat_id, *b)),
                _ => None,
            }
        }));
        let writes: Vec<MapWrite> = ops.iter().map(Op::encode).collect();
        let mut applied = 0;
        let mut failed = None;
        while applied < ops.len() {
            if let Some(addr) = self.cluster_ips.before(&self.programmed, &ops[applied]) {
                if let Err(e) = self.maps.delete_cluster_ip(addr) {
                    failed = Some(e);
                    break;
                }
                self.cluster_ips.wrote(addr, false);
            }
            let len = run_len(&self.programmed, &ops[applied..], &writes[applied..]);
            let run = applied..applied + len;
            let (written, error) = self.write_run(&writes[run]);
            for op in &ops[applied..applied + written] {
                self.mirror(op);
            }
            applied += written;
            if let Some(e) = error {
                failed = Some(e);
                break;
            }
        }
        // After the frontends they follow, also those of a sync that failed halfway.
        let marked = self.write_cluster_ips();
        let present = ops[..applied].iter().filter_map(|op| match op {
            Op::PutSlot {
                backend_id,
                rev_nat_id,
                ..
            } => Some((*rev_nat_id, *backend_id)),
            _ => None,
        });
        let present_udp = udp_pairs(&self.programmed, present);
        let departed_udp = match failed {
            Some(_) => departed_so_far(&self.programmed, departed_udp),
            None => departed_udp,
        };
        let without_ids = |pairs: Vec<((u16, u32), BackendAddr)>| {
            pairs
                .into_iter()
                .map(|((rev_nat_id, _), backend)| (rev_nat_id, backend))
        };
        self.stale_udp
            .record(without_ids(departed_udp), without_ids(present_udp));
        let failed = match (failed, marked) {
            (Some(e), Err(also)) => {
                tracing::warn!("writing the served ClusterIPs also failed: {also:#}");
                Some(e)
            }
            (failed, marked) => failed.or(marked.err()),
        };
        if let Some(e) = failed {
            self.affinity_pending.extend(stale_affinity);
            return Err(e);
        }
        if self.sweep_due {
            self.sweep_due = false;
            let slotted = self
                .programmed
                .frontends
                .values()
                .flat_map(|f| f.slots.values().map(|id| (f.rev_nat_id, *id)));
            self.stale_udp
                .sweep(without_ids(udp_pairs(&self.programmed, slotted)).collect());
        }
        if !self.ns_filters.armed() {
            let maps = &mut self.maps;
            let armed = maps.conntrack_keys().and_then(|flows| {
                self.ns_filters
                    .arm(&self.programmed, &flows, |entry, filter| {
                        maps.put_ns_filter(entry, filter)
                    })
            });
            if let Err(e) = armed {
                self.affinity_pending.extend(stale_affinity);
                return Err(e);
            }
        }
        let mut stale_affinity = stale_affinity;
        if !self.affinity_pending.is_empty() {
            let pending = std::mem::take(&mut self.affinity_pending);
            stale_affinity.extend(affinity_not_offered(&self.programmed, &pending));
        }
        if !stale_affinity.is_empty() {
            match self.maps.forget_affinity(&stale_affinity) {
                Ok(forgotten) => tracing::debug!(
                    forgotten,
                    "session-affinity entries of removed backends deleted"
                ),
                Err(e) => {
                    self.affinity_pending = stale_affinity;
                    return Err(e);
                }
            }
        }
        Ok(SyncStats {
            writes: ops.len(),
            frontends: self.programmed.frontends.len(),
            backends: self.programmed.backends.len(),
        })
    }

    /// Makes the served ClusterIPs those of the programmed frontends: the ones gone one by
    /// one (first: a put that keeps failing must not keep them), the new ones in one syscall.
    fn write_cluster_ips(&mut self) -> Result<()> {
        let (puts, deletes) = self.cluster_ips.due();
        for addr in deletes {
            self.maps.delete_cluster_ip(addr)?;
            self.cluster_ips.wrote(addr, false);
        }
        if !puts.is_empty() {
            let batch = self.maps.put_cluster_ips(&puts);
            let done = batch
                .as_ref()
                .map_or_else(|(done, _)| *done, |()| puts.len());
            for addr in &puts[..done] {
                self.cluster_ips.wrote(*addr, true);
            }
            batch.map_err(|(_, e)| e)?;
        }
        Ok(())
    }

    /// Entries of the served ClusterIPs' map.
    pub fn cluster_ip_entries(&self) -> usize {
        self.cluster_ips.written_count()
    }

    /// Records a written op in the mirror, the backend index and the entry count.
    fn mirror(&mut self, op: &Op) {
        self.index.apply(&self.programmed, op);
        let entries = |p: &Programmed| {
            op.frontend()
                .and_then(|k| p.frontends.get(k))
                .map_or(0, frontend_entries)
        };
        let cluster_ip = |p: &Programmed| {
            op.frontend()
                .is_some_and(|k| cluster_ips::is_cluster_ip(p, k))
        };
        let was = cluster_ip(&self.programmed);
        self.service_entries -= entries(&self.programmed);
        self.programmed.apply(op);
        self.service_entries += entries(&self.programmed);
        if let Some(key) = op.frontend() {
            let is = cluster_ip(&self.programmed);
            self.cluster_ips.frontend_written(key, was, is);
        }
    }

    /// Writes `run` (see [`batch_len`]): several puts to one map in one syscall, which
    /// writes them one after the other as separate writes would, at a fraction of the
    /// cost (programming 10000 Services writes 60000 entries). Returns how many were
    /// written, and the error that stopped the rest.
    fn write_run(&mut self, run: &[MapWrite]) -> (usize, Option<anyhow::Error>) {
        let outcome = match run {
            [one] => self.write(one).map_err(|e| (0, e)),
            [MapWrite::PutService(..), ..] => {
                let (keys, values) = puts(run, |w| match *w {
                    MapWrite::PutService(k, v) => Some((k, v)),
                    _ => None,
                });
                self.maps.put_services(&keys, &values)
            }
            [MapWrite::PutBackend(..), ..] => {
                let (ids, values) = puts(run, |w| match *w {
                    MapWrite::PutBackend(id, v) => Some((id, v)),
                    _ => None,
                });
                self.maps.put_backends(&ids, &values)
            }
            [MapWrite::PutRevNat(..), ..] => {
                let (ids, values) = puts(run, |w| match *w {
                    MapWrite::PutRevNat(id, v) => Some((id, v)),
                    _ => None,
                });
                self.maps.put_rev_nats(&ids, &values)
            }
            _ => Err((0, anyhow::anyhow!("{} writes no batch takes", run.len()))),
        };
        match outcome {
            Ok(()) => (run.len(), None),
            Err((written, e)) => (written, Some(e)),
        }
    }

    fn write(&mut self, write: &MapWrite) -> Result<()> {
        match *write {
            MapWrite::PutService(key, value) => self.maps.put_service(key, value),
            MapWrite::DeleteService(key) => self.maps.delete_service(key),
            MapWrite::PutBackend(id, value) => self.maps.put_backend(id, value),
            MapWrite::DeleteBackend(id) => self.maps.delete_backend(id),
            MapWrite::PutRevNat(id, value) => self.maps.put_rev_nat(id, value),
            MapWrite::DeleteRevNat(id) => self.maps.delete_rev_nat(id),
            MapWrite::PutSourceRange(prefix_len, data) => {
                self.maps.put_source_range(Key::new(prefix_len, data))
            }
            MapWrite::DeleteSourceRange(prefix_len, data) => {
                self.maps.delete_source_range(Key::new(prefix_len, data))
            }
        }
    }
}

/// The keys and values of a run of puts, as `put` takes them apart.
fn puts<K, V>(run: &[MapWrite], put: impl Fn(&MapWrite) -> Option<(K, V)>) -> (Vec<K>, Vec<V>) {
    run.iter().filter_map(put).unzip()
}

/// How many of `ops` (encoded as `writes`), from the first, one write takes: a batch
/// (`batch_len`), cut before an op that takes a ClusterIP frontend away, since
/// `ClusterIps::before` must see the frontends as they are just before that op.
fn run_len(programmed: &Programmed, ops: &[Op], writes: &[MapWrite]) -> usize {
    let len = batch_len(writes);
    (1..len)
        .find(|&i| cluster_ips::takes_away(programmed, &ops[i]).is_some())
        .unwrap_or(len)
}

/// How many of `writes`, from the first, one syscall writes: a run of puts to the services,
/// backends or rev-NAT map, else one write (deletions and source ranges go one by one).
fn batch_len(writes: &[MapWrite]) -> usize {
    let map = |w: &MapWrite| match w {
        MapWrite::PutService(..) => Some(MAP_SERVICES),
        MapWrite::PutBackend(..) => Some(MAP_BACKENDS),
        MapWrite::PutRevNat(..) => Some(MAP_REV_NAT),
        _ => None,
    };
    match writes.first().map(map) {
        None => 0,
        Some(None) => 1,
        Some(first) => writes.iter().take_while(|w| map(w) == first).count(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    use proxy_common::{
        BackendValue, RevNatValue, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_IP, ServiceKey,
    };

    use super::*;
    use crate::model::{Frontend, FrontendKind, Protocol, Scope, ServicePortName};

    // ---- objects in ------------------------------------------------------------------------

    /// The internal-scope TCP frontend 10.96.0.<host>:80.
    fn fkey(host: u8) -> FrontendKey {
        FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, host),
            port: 80,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        }
    }

    /// The TCP backend 10.244.0.<host>:8080.
    fn backend(host: u8) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::new(10, 244, 0, host),
            port: 8080,
            proto: Protocol::Tcp,
        }
    }

    /// The ClusterIP frontend `fkey(host)` of Service `default/svc-<host>`, over the
    /// backends with the given hosts.
    fn frontend(host: u8, backends: &[u8]) -> Frontend {
        let mut backends: Vec<BackendAddr> = backends.iter().map(|h| backend(*h)).collect();
        backends.sort();
        backends.dedup();
        Frontend {
            key: fkey(host),
            kind: FrontendKind::ClusterIp,
            service: ServicePortName {
                namespace: "default".into(),
                name: format!("svc-{host}"),
                port: String::new(),
            },
            backends,
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

    // ---- ops out ---------------------------------------------------------------------------

    fn put_backend(id: u32, host: u8) -> Op {
        Op::PutBackend {
            id,
            backend: backend(host),
            local: false,
        }
    }

    fn put_slot(frontend: u8, slot: u16, backend_id: u32, rev_nat_id: u16) -> Op {
        Op::PutSlot {
            frontend: fkey(frontend),
            slot,
            backend_id,
            rev_nat_id,
        }
    }

    fn put_rev_nat(id: u16, frontend: u8) -> Op {
        Op::PutRevNat {
            id,
            frontend: fkey(frontend),
        }
    }

    /// Slot 0 of a ClusterIP frontend.
    fn put_frontend(frontend: u8, count: u16, rev_nat_id: u16) -> Op {
        Op::PutFrontend {
            frontend: fkey(frontend),
            count,
            rev_nat_id,
            flags: SVC_FLAG_CLUSTER_IP,
            affinity_timeout: 0,
            affinity_id: 0,
        }
    }

    fn delete_slot(frontend: u8, slot: u16) -> Op {
        Op::DeleteSlot {
            frontend: fkey(frontend),
            slot,
        }
    }

    fn delete_frontend(frontend: u8) -> Op {
        Op::DeleteFrontend {
            frontend: fkey(frontend),
        }
    }

    fn delete_rev_nat(id: u16) -> Op {
        Op::DeleteRevNat { id }
    }

    fn delete_backend(id: u32) -> Op {
        Op::DeleteBackend { id }
    }

    // ---- running plans ---------------------------------------------------------------------

    /// Plans `desired`, applies every op to the mirror, and returns the ops.
    fn sync(mirror: &mut Programmed, desired: &DesiredState) -> Vec<Op> {
        let ops = plan(mirror, desired).expect("plan");
        for op in &ops {
            mirror.apply(op);
        }
        ops
    }

    fn index_of(ops: &[Op], op: &Op) -> usize {
        ops.iter()
            .position(|o| o == op)
            .unwrap_or_else(|| panic!("{op:?} missing from {ops:#?}"))
    }

    fn rev_nat_id_of(mirror: &Programmed, frontend: u8) -> u16 {
        mirror.frontends[&fkey(frontend)].rev_nat_id
    }

    fn backend_id_of(mirror: &Programmed, host: u8) -> u32 {
        let wanted = backend(host);
        let ids: Vec<u32> = mirror
            .backends
            .iter()
            .filter(|(_, b)| **b == wanted)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(ids.len(), 1, "backend {wanted} has ids {ids:?}");
        ids[0]
    }

    /// Backend id per live slot (`1..=count`) of a frontend.
    fn live_slots(mirror: &Programmed, frontend: u8) -> Vec<u32> {
        let f = &mirror.frontends[&fkey(frontend)];
        (1..=f.count).map(|slot| f.slots[&slot]).collect()
    }

    /// The three maps, written with the same encoding as `Syncer::write`, so that
    /// `Programmed::from_maps` can be compared with the mirror, and what a lock-free reader
    /// sees can be checked after every single write.
    #[derive(Default)]
    struct FakeMaps {
        services: HashMap<ServiceKey, ServiceValue>,
        backends: HashMap<u32, BackendValue>,
        rev_nat: HashMap<u16, RevNatValue>,
        source_ranges: HashMap<(u32, SourceRangeKey), ()>,
    }

    impl FakeMaps {
        fn write(&mut self, op: &Op) {
            match op.encode() {
                MapWrite::PutService(key, value) => {
                    self.services.insert(key, value);
                }
                MapWrite::DeleteService(key) => {
                    self.services.remove(&key);
                }
                MapWrite::PutBackend(id, value) => {
                    self.backends.insert(id, value);
                }
                MapWrite::DeleteBackend(id) => {
                    self.backends.remove(&id);
                }
                MapWrite::PutRevNat(id, value) => {
                    self.rev_nat.insert(id, value);
                }
                MapWrite::DeleteRevNat(id) => {
                    self.rev_nat.remove(&id);
                }
                MapWrite::PutSourceRange(prefix_len, data) => {
                    self.source_ranges.insert((prefix_len, data), ());
                }
                MapWrite::DeleteSourceRange(prefix_len, data) => {
                    self.source_ranges.remove(&(prefix_len, data));
                }
            }
        }

        fn dump(&self) -> MapContents {
            MapContents {
                services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
                backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
                rev_nat: self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect(),
                source_ranges: self
                    .source_ranges
                    .keys()
                    .filter_map(|(prefix_len, data)| abi::source_range_of(*prefix_len, *data))
                    .collect(),
                rev_nat_room: u32::from(u16::MAX) + 1,
            }
        }

        /// What the socket programs rely on: every slot 0 has its slots `1..=count`, each
        /// naming an existing backend, and its rev-NAT id names this frontend.
        fn assert_readers_see_whole_services(&self, after: &Op) {
            for (key, value) in self.services.iter().filter(|(k, _)| k.slot == 0) {
                for slot in 1..=value.count {
                    let Some(entry) = self.services.get(&ServiceKey { slot, ..*key }) else {
                        panic!(
                            "after {after:?}: {key:?} has count {} but no slot {slot}",
                            value.count
                        );
                    };
                    assert!(
                        self.backends.contains_key(&entry.backend_id),
                        "after {after:?}: slot {slot} of {key:?} names missing backend {}",
                        entry.backend_id
                    );
                }
                let own = RevNatValue {
                    addr: key.addr,
                    port: key.port,
                    _pad: [0; 2],
                };
                assert_eq!(
                    self.rev_nat.get(&value.rev_nat_id),
                    Some(&own),
                    "after {after:?}: rev-NAT {} of {key:?}",
                    value.rev_nat_id
                );
                // A source-range filter with no range would drop every client.
                if value.flags & SVC_FLAG_SOURCE_RANGES != 0 {
                    assert!(
                        self.source_ranges
                            .keys()
                            .any(|(_, data)| data.rev_nat_id == value.rev_nat_id),
                        "after {after:?}: {key:?} filters sources but has no range"
                    );
                }
            }
        }
    }

    // ---- write order -----------------------------------------------------------------------

    #[test]
    fn an_op_that_takes_a_cluster_ip_frontend_away_starts_a_run() {
        let mut programmed = Programmed::default();
        programmed.apply(&put_frontend(1, 0, 1));
        programmed.apply(&put_frontend(2, 0, 2));
        let as_external_ip = Op::PutFrontend {
            frontend: fkey(1),
            count: 0,
            rev_nat_id: 1,
            flags: SVC_FLAG_EXTERNAL_IP,
            affinity_timeout: 0,
            affinity_id: 0,
        };
        let ops = [
            put_slot(2, 1, 1, 2),
            put_frontend(2, 1, 2),
            as_external_ip,
            put_frontend(2, 1, 2),
        ];
        let writes: Vec<MapWrite> = ops.iter().map(Op::encode).collect();
        assert_eq!(batch_len(&writes), 4, "one batch of services puts");
        assert_eq!(run_len(&programmed, &ops, &writes), 2);
        assert_eq!(run_len(&programmed, &ops[2..], &writes[2..]), 2);
    }

    #[test]
    fn a_batch_is_a_run_of_puts_to_one_map() {
        let writes: Vec<MapWrite> = [
            put_backend(1, 1),
            put_backend(2, 2),
            put_slot(1, 1, 1, 1),
            put_slot(1, 2, 2, 1),
            put_frontend(1, 2, 1),
            put_rev_nat(1, 1),
            delete_slot(1, 3),
            delete_slot(1, 4),
            put_rev_nat(2, 2),
        ]
        .iter()
        .map(Op::encode)
        .collect();
        let mut runs = Vec::new();
        let mut at = 0;
        while at < writes.len() {
            let n = batch_len(&writes[at..]);
            runs.push(n);
            at += n;
        }
        // Slots and slot 0 share the services map; deletions go one by one.
        assert_eq!(runs, [2, 3, 1, 1, 1, 1]);
        assert_eq!(batch_len(&[]), 0);
    }

    #[test]
    fn a_new_frontend_is_written_backends_then_slots_then_rev_nat_then_slot_0() {
        let ops = plan(&Programmed::default(), &desired(&[frontend(1, &[1, 2])])).unwrap();
        assert_eq!(
            ops,
            [
                put_backend(1, 1),
                put_backend(2, 2),
                put_slot(1, 1, 1, 1),
                put_slot(1, 2, 2, 1),
                put_rev_nat(1, 1),
                put_frontend(1, 2, 1),
            ]
        );
    }

    #[test]
    fn a_frontend_without_backends_gets_slot_0_with_count_0_and_no_slots() {
        let mut mirror = Programmed::default();
        let ops = sync(&mut mirror, &desired(&[frontend(1, &[])]));
        assert_eq!(ops, [put_rev_nat(1, 1), put_frontend(1, 0, 1)]);
        let f = &mirror.frontends[&fkey(1)];
        assert_eq!((f.count, f.slots.len()), (0, 0));
        assert!(mirror.backends.is_empty());
    }

    #[test]
    fn removing_a_backend_rewrites_slots_then_lowers_count_then_deletes_slots_then_the_backend() {
        let mut mirror = Programmed::default();
        sync(&mut mirror, &desired(&[frontend(1, &[1, 2, 3])]));
        let ops = plan(&mirror, &desired(&[frontend(1, &[1, 3])])).unwrap();
        // Backend 2 sat in slot 2: backend 3 moves down from slot 3 to slot 2.
        assert_eq!(
            ops,
            [
                put_slot(1, 2, 3, 1),
                put_frontend(1, 2, 1),
                delete_slot(1, 3),
                delete_backend(2),
            ]
        );
        assert!(index_of(&ops, &delete_backend(2)) > index_of(&ops, &put_frontend(1, 2, 1)));
    }

    #[test]
    fn a_deleted_frontend_goes_slot_0_then_slots_then_rev_nat_then_its_unshared_backends() {
        let mut mirror = Programmed::default();
        sync(
            &mut mirror,
            &desired(&[frontend(1, &[1, 2]), frontend(2, &[2, 3])]),
        );
        let (a, b, c) = (
            backend_id_of(&mirror, 1),
            backend_id_of(&mirror, 2),
            backend_id_of(&mirror, 3),
        );
        let rev_nat = rev_nat_id_of(&mirror, 1);
        let ops = plan(&mirror, &desired(&[frontend(2, &[2, 3])])).unwrap();
        // Backend 2 is still used by frontend 2: it stays.
        assert_eq!(
            ops,
            [
                delete_frontend(1),
                delete_slot(1, 1),
                delete_slot(1, 2),
                delete_rev_nat(rev_nat),
                delete_backend(a),
            ]
        );
        assert!(!ops.contains(&delete_backend(b)) && !ops.contains(&delete_backend(c)));
    }

    // ---- mirror and idempotence ------------------------------------------------------------

    /// Syncs `desired` into both the mirror and the fake maps, checking readers after every
    /// write; then the mirror must be what a restart would adopt, and nothing is left to do.
    fn step(maps: &mut FakeMaps, mirror: &mut Programmed, desired: &DesiredState) -> Vec<Op> {
        let ops = plan(mirror, desired).expect("plan");
        for op in &ops {
            maps.write(op);
            mirror.apply(op);
            maps.assert_readers_see_whole_services(op);
        }
        assert_eq!(*mirror, Programmed::from_maps(&maps.dump()));
        assert_eq!(
            plan(mirror, desired).unwrap(),
            [],
            "after applying {ops:#?}"
        );
        ops
    }

    #[test]
    fn planning_again_after_applying_a_plan_writes_nothing() {
        let mut maps = FakeMaps::default();
        let mut mirror = Programmed::default();
        let steps = [
            ("add a frontend", vec![frontend(1, &[1, 2])]),
            ("add a backend", vec![frontend(1, &[1, 2, 3])]),
            ("remove a backend", vec![frontend(1, &[1, 3])]),
            ("drop to zero backends", vec![frontend(1, &[])]),
            ("remove the frontend", vec![]),
        ];
        for (what, frontends) in steps {
            let ops = step(&mut maps, &mut mirror, &desired(&frontends));
            assert!(!ops.is_empty(), "{what}: nothing written");
        }
        assert_eq!(mirror, Programmed::default());
        assert!(maps.services.is_empty() && maps.backends.is_empty() && maps.rev_nat.is_empty());
    }

    #[test]
    fn the_mirror_equals_a_fresh_adoption_after_every_single_write() {
        // A sync can stop at any write (a failed syscall); the next sync plans from the
        // mirror, a restart from the maps: both must agree at every point.
        let mut node_port = frontend(5, &[1]);
        node_port.kind = FrontendKind::NodePort;
        let states = [
            desired(&[frontend(1, &[1, 2]), frontend(2, &[2, 3]), frontend(5, &[])]),
            desired(&[
                frontend(1, &[1, 2, 4]),
                frontend(2, &[3]),
                frontend(5, &[1]),
            ]),
            desired(&[frontend(1, &[4]), frontend(3, &[3, 5]), node_port.clone()]),
            desired(&[frontend(3, &[]), node_port]),
            desired(&[]),
        ];
        let mut maps = FakeMaps::default();
        let mut mirror = Programmed::default();
        for state in &states {
            for op in plan(&mirror, state).unwrap() {
                maps.write(&op);
                mirror.apply(&op);
                maps.assert_readers_see_whole_services(&op);
                assert_eq!(mirror, Programmed::from_maps(&maps.dump()), "after {op:?}");
            }
            assert_eq!(plan(&mirror, state).unwrap(), []);
        }
    }

    #[test]
    fn a_frontend_wanted_again_after_an_interrupted_delete_leaves_no_orphan_rev_nat() {
        let wanted = desired(&[frontend(1, &[1, 2])]);
        let mut mirror = Programmed::default();
        sync(&mut mirror, &wanted);
        // The delete stops after its first write (slot 0): the slots are still there.
        let ops = plan(&mirror, &desired(&[])).unwrap();
        assert_eq!(ops[0], delete_frontend(1));
        mirror.apply(&ops[0]);
        // The frontend comes back: one sync completes it and drops the old rev-NAT entry.
        sync(&mut mirror, &wanted);
        assert_eq!(plan(&mirror, &wanted).unwrap(), []);
        assert_eq!(
            mirror.rev_nat_ids,
            BTreeSet::from([rev_nat_id_of(&mirror, 1)])
        );
    }

    // ---- ids -------------------------------------------------------------------------------

    /// A sync that failed after deleting a frontend's rev-NAT entry, before its source
    /// ranges, leaves them under the id; a new frontend does not get it.
    #[test]
    fn a_rev_nat_id_only_left_source_ranges_name_is_not_given_out() {
        let mut mirror = Programmed::default();
        let range = SourceRange::new(Ipv4Addr::new(203, 0, 113, 0), 24);
        mirror.source_ranges.insert((1, range));
        sync(&mut mirror, &desired(&[frontend(1, &[1])]));
        assert_eq!(mirror.frontends[&fkey(1)].rev_nat_id, 2);
        assert!(
            mirror.source_ranges.is_empty(),
            "the orphans are deleted: {:?}",
            mirror.source_ranges
        );
    }

    #[test]
    fn ids_stay_put_and_new_ids_fill_the_smallest_hole() {
        let mut mirror = Programmed::default();
        sync(
            &mut mirror,
            &desired(&[frontend(1, &[1, 2]), frontend(2, &[3]), frontend(3, &[4])]),
        );
        let rev_nat_ids =
            |m: &Programmed| [1, 2, 3, 4].map(|f| m.frontends.get(&fkey(f)).map(|f| f.rev_nat_id));
        let backend_ids = |m: &Programmed| {
            m.backends
                .iter()
                .map(|(id, b)| (*b, *id))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(rev_nat_ids(&mirror), [Some(1), Some(2), Some(3), None]);
        assert_eq!(
            backend_ids(&mirror),
            BTreeMap::from([
                (backend(1), 1),
                (backend(2), 2),
                (backend(3), 3),
                (backend(4), 4)
            ])
        );

        // Frontend 2 and its backend 3 go: nobody else's id moves.
        sync(
            &mut mirror,
            &desired(&[frontend(1, &[1, 2]), frontend(3, &[4])]),
        );
        assert_eq!(rev_nat_ids(&mirror), [Some(1), None, Some(3), None]);
        assert_eq!(
            backend_ids(&mirror),
            BTreeMap::from([(backend(1), 1), (backend(2), 2), (backend(4), 4)])
        );

        // Frontend 4 takes the free rev-NAT id 2; its backend 5 the free backend id 3, and
        // backend 6 (added to frontend 1) the next free one, 5.
        sync(
            &mut mirror,
            &desired(&[
                frontend(1, &[1, 2, 6]),
                frontend(3, &[4]),
                frontend(4, &[5]),
            ]),
        );
        assert_eq!(rev_nat_ids(&mirror), [Some(1), None, Some(3), Some(2)]);
        assert_eq!(
            backend_ids(&mirror),
            BTreeMap::from([
                (backend(1), 1),
                (backend(2), 2),
                (backend(5), 3),
                (backend(4), 4),
                (backend(6), 5),
            ])
        );
    }

    #[test]
    fn ids_freed_by_a_plan_are_not_handed_out_in_the_same_plan() {
        // Until the old frontend's slot 0 and slots are deleted (later in the same plan),
        // its rev-NAT id and backend ids are still read by the datapath.
        let mut mirror = Programmed::default();
        sync(
            &mut mirror,
            &desired(&[frontend(1, &[1]), frontend(2, &[2])]),
        );
        assert_eq!(
            (rev_nat_id_of(&mirror, 2), backend_id_of(&mirror, 2)),
            (2, 2)
        );

        let ops = sync(
            &mut mirror,
            &desired(&[frontend(1, &[1]), frontend(3, &[3])]),
        );
        assert!(ops.contains(&put_backend(3, 3)), "{ops:#?}");
        assert!(ops.contains(&put_rev_nat(3, 3)), "{ops:#?}");
        assert!(ops.contains(&delete_rev_nat(2)) && ops.contains(&delete_backend(2)));

        // The next plan may reuse them.
        sync(
            &mut mirror,
            &desired(&[frontend(1, &[1]), frontend(3, &[3]), frontend(4, &[4])]),
        );
        assert_eq!(
            (rev_nat_id_of(&mirror, 4), backend_id_of(&mirror, 4)),
            (2, 2)
        );
    }

    #[test]
    fn a_backend_shared_by_two_frontends_gets_one_backend_id() {
        let mut mirror = Programmed::default();
        let ops = sync(
            &mut mirror,
            &desired(&[frontend(1, &[1, 2]), frontend(2, &[2, 3])]),
        );
        let puts = ops
            .iter()
            .filter(|op| matches!(op, Op::PutBackend { .. }))
            .count();
        assert_eq!(puts, 3, "{ops:#?}");
        let shared = backend_id_of(&mirror, 2);
        assert_eq!(live_slots(&mirror, 1), [backend_id_of(&mirror, 1), shared]);
        assert_eq!(live_slots(&mirror, 2), [shared, backend_id_of(&mirror, 3)]);
    }

    #[test]
    fn the_next_free_id_is_the_smallest_unused_one_from_1() {
        let rows: [(&str, Vec<u16>, Option<u16>); 6] = [
            ("nothing used: 1", vec![], Some(1)),
            ("0 is never handed out", vec![0], Some(1)),
            ("after a run", vec![1, 2, 3], Some(4)),
            ("the first hole", vec![1, 2, 4, 6], Some(3)),
            ("the last id", (1..u16::MAX).collect(), Some(u16::MAX)),
            ("all taken", (1..=u16::MAX).collect(), None),
        ];
        for (what, used, want) in rows {
            let used: BTreeSet<u16> = used.into_iter().collect();
            assert_eq!(next_free_u16(&used, 1), want, "{what}");
            // Backend ids are u32: where u16 ids run out, 65536 is still free.
            let used: BTreeSet<u32> = used.iter().map(|v| u32::from(*v)).collect();
            let want = want.map(u32::from).unwrap_or(65536);
            assert_eq!(next_free_u32(&used, 1), Some(want), "{what} (u32)");
        }
    }

    #[test]
    fn a_new_frontend_beyond_65535_fails_naming_the_frontend() {
        let mut programmed = Programmed::default();
        let mut wanted = DesiredState::default();
        for id in 1..=u16::MAX {
            let key = FrontendKey {
                addr: Ipv4Addr::from(0x0a60_0000 + u32::from(id)),
                port: 8000,
                ..fkey(0)
            };
            programmed.frontends.insert(
                key,
                ProgrammedFrontend {
                    rev_nat_id: id,
                    flags: SVC_FLAG_CLUSTER_IP,
                    affinity_timeout: 0,
                    affinity_id: 0,
                    count: 0,
                    slots: BTreeMap::new(),
                },
            );
            programmed.rev_nat_ids.insert(id);
            wanted.frontends.insert(
                key,
                Frontend {
                    key,
                    ..frontend(0, &[])
                },
            );
        }
        assert_eq!(plan(&programmed, &wanted).unwrap(), []);

        let mut late = frontend(1, &[1]);
        late.service.name = "late".into();
        wanted.frontends.insert(late.key, late);
        let err = plan(&programmed, &wanted).unwrap_err().to_string();
        assert!(err.contains("10.96.0.1:80/TCP"), "{err}");
        assert!(err.contains("default/late"), "{err}");
    }

    // ---- adoption --------------------------------------------------------------------------

    fn slot_0(frontend: &FrontendKey, count: u16, rev_nat_id: u16) -> (ServiceKey, ServiceValue) {
        (
            abi::service_key(frontend, 0),
            ServiceValue {
                count,
                rev_nat_id,
                flags: SVC_FLAG_CLUSTER_IP,
                ..Default::default()
            },
        )
    }

    fn slot(
        frontend: &FrontendKey,
        slot: u16,
        backend_id: u32,
        rev_nat_id: u16,
    ) -> (ServiceKey, ServiceValue) {
        (
            abi::service_key(frontend, slot),
            ServiceValue {
                backend_id,
                rev_nat_id,
                ..Default::default()
            },
        )
    }

    #[test]
    fn adoption_cleans_up_what_an_interrupted_sync_left() {
        let sctp = ServiceKey {
            proto: 132,
            ..abi::service_key(&fkey(9), 0)
        };
        let contents = MapContents {
            services: vec![
                // Frontend 1 was shrunk to 2 backends; slot 3 was not deleted yet.
                slot_0(&fkey(1), 2, 1),
                slot(&fkey(1), 1, 1, 1),
                slot(&fkey(1), 2, 2, 1),
                slot(&fkey(1), 3, 3, 1),
                // Frontend 2 was being deleted: slot 0 and slot 1 are gone.
                slot(&fkey(2), 2, 2, 2),
                // An SCTP Service written by some other version.
                (sctp, slot_0(&fkey(9), 1, 1).1),
                (ServiceKey { slot: 1, ..sctp }, slot(&fkey(9), 1, 9, 1).1),
            ],
            backends: vec![
                (1, abi::backend_value(&backend(1), false)),
                (2, abi::backend_value(&backend(2), false)),
                (3, abi::backend_value(&backend(3), false)),
                (
                    9,
                    BackendValue {
                        proto: 132,
                        ..abi::backend_value(&backend(9), false)
                    },
                ),
            ],
            rev_nat: vec![
                (1, abi::rev_nat_value(&fkey(1))),
                (2, abi::rev_nat_value(&fkey(2))),
                // No frontend uses rev-NAT 7.
                (7, abi::rev_nat_value(&fkey(7))),
            ],
            source_ranges: Vec::new(),
            rev_nat_room: 1024,
        };
        let adopted = Programmed::from_maps(&contents);
        assert_eq!(
            adopted,
            Programmed {
                frontends: BTreeMap::from([
                    (
                        fkey(1),
                        ProgrammedFrontend {
                            rev_nat_id: 1,
                            flags: SVC_FLAG_CLUSTER_IP,
                            affinity_timeout: 0,
                            affinity_id: 0,
                            count: 2,
                            slots: BTreeMap::from([(1, 1), (2, 2), (3, 3)]),
                        }
                    ),
                    (
                        fkey(2),
                        ProgrammedFrontend {
                            rev_nat_id: 0,
                            flags: 0,
                            affinity_timeout: 0,
                            affinity_id: 0,
                            count: 0,
                            slots: BTreeMap::from([(2, 2)]),
                        }
                    ),
                ]),
                backends: BTreeMap::from([(1, backend(1)), (2, backend(2)), (3, backend(3))]),
                local_backends: BTreeSet::new(),
                rev_nat_ids: BTreeSet::from([1, 2, 7]),
                source_ranges: BTreeSet::new(),
            }
        );

        // Frontend 1 still wants backends 1 and 2; frontend 2 is gone.
        let ops = plan(&adopted, &desired(&[frontend(1, &[1, 2])])).unwrap();
        assert_eq!(
            ops,
            [
                delete_slot(1, 3),
                delete_slot(2, 2),
                delete_rev_nat(2),
                delete_rev_nat(7),
                delete_backend(3),
            ]
        );
    }

    /// A restart with a smaller rev-NAT array (`--map-size-rev-nat`): a frontend whose id
    /// it has no room for gets a new one, rather than every sync failing at its write.
    #[test]
    fn a_rev_nat_id_the_array_has_no_room_for_is_replaced() {
        let contents = MapContents {
            services: vec![slot_0(&fkey(1), 1, 40), slot(&fkey(1), 1, 1, 40)],
            backends: vec![(1, abi::backend_value(&backend(1), false))],
            rev_nat: Vec::new(),
            source_ranges: Vec::new(),
            rev_nat_room: 32,
        };
        let adopted = Programmed::from_maps(&contents);
        let ops = plan(&adopted, &desired(&[frontend(1, &[1])])).expect("plan");
        let ids: Vec<u16> = ops
            .iter()
            .filter_map(|op| match op {
                Op::PutRevNat { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [1], "{ops:?}");
        let mut mirror = adopted;
        for op in &ops {
            mirror.apply(op);
        }
        assert_eq!(mirror.frontends[&fkey(1)].rev_nat_id, 1);
    }

    #[test]
    fn adoption_completes_a_half_written_frontend_that_is_still_wanted() {
        // The sync that created frontend 1 stopped before slot 0.
        let contents = MapContents {
            services: vec![slot(&fkey(1), 1, 1, 5)],
            backends: vec![(1, abi::backend_value(&backend(1), false))],
            rev_nat: vec![(5, abi::rev_nat_value(&fkey(1)))],
            source_ranges: Vec::new(),
            rev_nat_room: 1024,
        };
        let mut maps = FakeMaps {
            services: contents.services.iter().copied().collect(),
            backends: contents.backends.iter().copied().collect(),
            rev_nat: contents.rev_nat.iter().copied().collect(),
            source_ranges: HashMap::new(),
        };
        let mut mirror = Programmed::from_maps(&contents);
        let ops = step(&mut maps, &mut mirror, &desired(&[frontend(1, &[1])]));
        let rev_nat = rev_nat_id_of(&mirror, 1);
        assert!(
            index_of(&ops, &put_rev_nat(rev_nat, 1)) < index_of(&ops, &put_frontend(1, 1, rev_nat))
        );
        assert_eq!(live_slots(&mirror, 1), [1]);
        assert_eq!(mirror.rev_nat_ids, BTreeSet::from([rev_nat]));
    }

    /// Frontend `host` with ClientIP affinity (timeout 10800 s) over `backends`.
    fn sticky(host: u8, backends: &[u8]) -> Frontend {
        Frontend {
            affinity_timeout: Some(10800),
            affinity_group: Some(fkey(host)),
            ..frontend(host, backends)
        }
    }

    #[test]
    fn slot_0_carries_the_affinity_timeout_and_the_drop_flag() {
        let dropping = Frontend {
            when_empty: WhenEmpty::Drop,
            ..frontend(1, &[])
        };
        assert_eq!(
            slot0_settings(&dropping),
            (SVC_FLAG_CLUSTER_IP | SVC_FLAG_DROP_EMPTY, 0)
        );
        // With backends, "drop when empty" has nothing to say.
        let served = Frontend {
            when_empty: WhenEmpty::Drop,
            ..sticky(1, &[2])
        };
        assert_eq!(
            slot0_settings(&served),
            (SVC_FLAG_CLUSTER_IP | SVC_FLAG_AFFINITY, 10800)
        );
        let at_node = Frontend {
            kind: FrontendKind::ExternalIp,
            at_node_address: true,
            ..frontend(1, &[2])
        };
        assert_eq!(
            slot0_settings(&at_node),
            (SVC_FLAG_EXTERNAL_IP | SVC_FLAG_NODE_ADDRESS, 0)
        );
    }

    #[test]
    fn c21_switching_affinity_rewrites_slot_0_only() {
        let mut mirror = Programmed::default();
        sync(&mut mirror, &desired(&[frontend(1, &[2, 3])]));
        let rev_nat_id = rev_nat_id_of(&mirror, 1);
        let ops = sync(&mut mirror, &desired(&[sticky(1, &[2, 3])]));
        assert_eq!(
            ops,
            [Op::PutFrontend {
                frontend: fkey(1),
                count: 2,
                rev_nat_id,
                flags: SVC_FLAG_CLUSTER_IP | SVC_FLAG_AFFINITY,
                affinity_timeout: 10800,
                affinity_id: rev_nat_id,
            }]
        );
        let ops = sync(&mut mirror, &desired(&[frontend(1, &[2, 3])]));
        assert_eq!(ops, [put_frontend(1, 2, rev_nat_id)]);
    }

    #[test]
    fn affinity_entries_are_stale_once_their_backend_leaves_the_frontend() {
        let mut mirror = Programmed::default();
        sync(
            &mut mirror,
            &desired(&[sticky(1, &[2, 3]), frontend(4, &[2, 3])]),
        );
        let rev = rev_nat_id_of(&mirror, 1);
        let (b2, b3) = (backend_id_of(&mirror, 2), backend_id_of(&mirror, 3));

        type Row = (&'static str, DesiredState, BTreeSet<(u16, u32)>);
        let rows: [Row; 5] = [
            ("unchanged", desired(&[sticky(1, &[2, 3])]), BTreeSet::new()),
            (
                "backend 3 removed",
                desired(&[sticky(1, &[2])]),
                BTreeSet::from([(rev, b3)]),
            ),
            (
                "backend 3 replaced by 5",
                desired(&[sticky(1, &[2, 5])]),
                BTreeSet::from([(rev, b3)]),
            ),
            (
                "affinity switched off",
                desired(&[frontend(1, &[2, 3])]),
                BTreeSet::from([(rev, b2), (rev, b3)]),
            ),
            (
                "frontend deleted",
                desired(&[]),
                BTreeSet::from([(rev, b2), (rev, b3)]),
            ),
        ];
        for (what, wanted, stale) in rows {
            // Frontend 4 has no affinity: its backends never make entries stale.
            assert_eq!(stale_affinity(&mirror, &wanted), stale, "{what}");
        }
    }

    /// Service `svc-1`'s sticky ClusterIP frontend over `cluster`, and its NodePort on
    /// 192.0.2.1:30080 (external scope) over `node_port` (a `Local` policy's subset).
    fn sticky_node_port(cluster: &[u8], node_port: &[u8]) -> [Frontend; 2] {
        let key = FrontendKey {
            addr: Ipv4Addr::new(192, 0, 2, 1),
            port: 30080,
            proto: Protocol::Tcp,
            scope: Scope::External,
        };
        let node_port = Frontend {
            key,
            kind: FrontendKind::NodePort,
            ..sticky(1, node_port)
        };
        [sticky(1, cluster), node_port]
    }

    #[test]
    fn the_frontends_of_a_service_port_share_its_cluster_ips_affinity_entries() {
        let mut mirror = Programmed::default();
        let both = sticky_node_port(&[2, 3], &[2]);
        let node_port_key = both[1].key;
        sync(&mut mirror, &desired(&both));
        let cluster = rev_nat_id_of(&mirror, 1);
        let node_port = &mirror.frontends[&node_port_key];
        assert_ne!(node_port.rev_nat_id, cluster);
        assert_eq!(
            (
                mirror.frontends[&fkey(1)].affinity_id,
                node_port.affinity_id
            ),
            (cluster, cluster),
            "both slot 0s name the ClusterIP frontend's rev-NAT id"
        );

        // A touched sync of the NodePort alone finds the group among the programmed ones.
        let moved = sticky_node_port(&[2, 3], &[3]);
        let wanted = desired(&moved);
        let index = touched::BackendIndex::of(&mirror);
        let touched_keys = BTreeSet::from([node_port_key]);
        let ops = touched::plan(
            &mirror,
            &index,
            &wanted,
            touched::Touched {
                frontends: &touched_keys,
                local_backends: &BTreeSet::new(),
            },
        )
        .expect("touched plan");
        assert_eq!(ops, plan(&mirror, &wanted).expect("plan"));
        assert!(
            ops.iter().all(|op| !matches!(op, Op::PutFrontend { .. })),
            "slot 0 unchanged: {ops:?}"
        );

        // Without its ClusterIP frontend for the port, a frontend keeps its own entries.
        let alone = desired(&both[1..]);
        sync(&mut mirror, &alone);
        let node_port = &mirror.frontends[&node_port_key];
        assert_eq!(node_port.affinity_id, node_port.rev_nat_id);
    }

    /// Another Service's frontend takes the key of a sticky Service's ClusterIP frontend (an
    /// externalIP equal to it, sorted first) and gives it back: the sticky Service's other
    /// frontends keep their values, yet their affinity id follows the group's owner. A touched
    /// plan given the group's members too plans what a full one does.
    #[test]
    fn a_touched_plan_follows_the_affinity_group_key_changing_hands() {
        let mut mirror = Programmed::default();
        let both = sticky_node_port(&[2, 3], &[2]);
        let node_port_key = both[1].key;
        sync(&mut mirror, &desired(&both));
        let taken = Frontend {
            service: ServicePortName {
                namespace: "default".into(),
                name: "svc-0".into(),
                port: String::new(),
            },
            ..frontend(1, &[4])
        };
        for wanted in [desired(&[taken, both[1].clone()]), desired(&both)] {
            let full = plan(&mirror, &wanted).expect("plan");
            let index = touched::BackendIndex::of(&mirror);
            let keys = BTreeSet::from([fkey(1)]);
            let touched_plan = |keys: &BTreeSet<FrontendKey>| {
                touched::plan(
                    &mirror,
                    &index,
                    &wanted,
                    touched::Touched {
                        frontends: keys,
                        local_backends: &BTreeSet::new(),
                    },
                )
                .expect("touched plan")
            };
            assert_ne!(
                touched_plan(&keys),
                full,
                "the group key alone misses the member"
            );
            let with_members = BTreeSet::from([fkey(1), node_port_key]);
            assert_eq!(touched_plan(&with_members), full);
            for op in &full {
                mirror.apply(op);
            }
        }
    }

    #[test]
    fn an_affinity_entry_is_stale_once_no_frontend_of_its_group_offers_the_backend() {
        let mut mirror = Programmed::default();
        sync(&mut mirror, &desired(&sticky_node_port(&[2, 3], &[2, 3])));
        let group = rev_nat_id_of(&mirror, 1);
        let (b2, b3) = (backend_id_of(&mirror, 2), backend_id_of(&mirror, 3));
        // Backend 3 leaves the NodePort (its pod moved away from this node) but not the
        // ClusterIP: pods keep it; the datapath stops external clients from following it.
        let moved = desired(&sticky_node_port(&[2, 3], &[2]));
        assert_eq!(stale_affinity(&mirror, &moved), BTreeSet::new());
        // Backend 3 leaves both.
        let gone = desired(&sticky_node_port(&[2], &[2]));
        assert_eq!(
            stale_affinity(&mirror, &gone),
            BTreeSet::from([(group, b3)])
        );
        // Affinity switched off for the Service: every entry of the group.
        let off = desired(&[frontend(1, &[2, 3])]);
        assert_eq!(
            stale_affinity(&mirror, &off),
            BTreeSet::from([(group, b2), (group, b3)])
        );
    }

    /// `frontend` with the given hosts' backends lingering.
    fn lingering(frontend: Frontend, hosts: &[u8]) -> Frontend {
        Frontend {
            lingering: hosts.iter().map(|h| backend(*h)).collect(),
            ..frontend
        }
    }

    /// A backend that stops taking new flows leaves the live slots at once and moves to a
    /// slot after them once slot 0 has lowered the count, so no reader finds it among the
    /// live slots; it keeps its id (the north-south programs follow its flows while it
    /// exists) and departs, for its flows too, only when it stops lingering.
    #[test]
    fn a_lingering_backend_leaves_the_live_slots_first_and_departs_last() {
        let mut maps = FakeMaps::default();
        let mut mirror = Programmed::default();
        step(&mut maps, &mut mirror, &desired(&[sticky(1, &[1, 2, 3])]));
        let rev = rev_nat_id_of(&mirror, 1);
        let [b1, b2, b3] = [1, 2, 3].map(|h| backend_id_of(&mirror, h));

        let draining = desired(&[lingering(sticky(1, &[2, 3]), &[1])]);
        assert_eq!(departed(&mirror, &draining, |_, _| true), BTreeSet::new());
        // New connections must not reach it through its clients' affinity either.
        assert_eq!(
            stale_affinity(&mirror, &draining),
            BTreeSet::from([(rev, b1)])
        );
        let ops = step(&mut maps, &mut mirror, &draining);
        let put_sticky = Op::PutFrontend {
            frontend: fkey(1),
            count: 2,
            rev_nat_id: rev,
            flags: slot0_settings(&draining.frontends[&fkey(1)]).0,
            affinity_timeout: 10800,
            affinity_id: rev,
        };
        assert_eq!(
            ops,
            [
                put_slot(1, 1, b2, rev),
                put_slot(1, 2, b3, rev),
                put_sticky,
                put_slot(1, 3, b1, rev),
            ]
        );
        assert_eq!(mirror.backends.get(&b1), Some(&backend(1)));
        assert_eq!(stale_affinity(&mirror, &draining), BTreeSet::new());

        // It stops lingering (its pod is gone): now it departs, and goes.
        let gone = desired(&[sticky(1, &[2, 3])]);
        assert_eq!(
            departed(&mirror, &gone, |_, _| true),
            BTreeSet::from([(rev, b1)])
        );
        assert_eq!(stale_affinity(&mirror, &gone), BTreeSet::new());
        let ops = step(&mut maps, &mut mirror, &gone);
        assert_eq!(ops, [delete_slot(1, 3), delete_backend(b1)]);
    }

    /// A backend that starts to linger in a slot past the current count is written there
    /// before the live slots are rewritten, so that a UDP socket pinned to it keeps finding
    /// it (`pinned_backend` looks past the count) while they are.
    #[test]
    fn a_lingering_slot_past_the_count_is_written_before_the_live_slots() {
        let mut mirror = Programmed::default();
        sync(&mut mirror, &desired(&[frontend(1, &[1])]));
        let rev = rev_nat_id_of(&mirror, 1);
        let b1 = backend_id_of(&mirror, 1);
        let ops = plan(&mirror, &desired(&[lingering(frontend(1, &[2, 3]), &[1])])).unwrap();
        let id = |host: u8| {
            ops.iter()
                .find_map(|op| match op {
                    Op::PutBackend { id, backend: b, .. } if *b == backend(host) => Some(*id),
                    _ => None,
                })
                .expect("a new backend")
        };
        // (Slot 2 is past the count and read by no one yet: before slot 1.)
        assert_eq!(
            ops[2..],
            [
                put_slot(1, 3, b1, rev),
                put_slot(1, 2, id(3), rev),
                put_slot(1, 1, id(2), rev),
                put_frontend(1, 2, rev),
            ]
        );
    }

    /// What `lb::pinned_backend` does when a socket's slot no longer names its backend: a
    /// halving search of the live slots `1..=count` by address and port, then the 16 slots
    /// after the count. True if it finds `wanted`.
    fn programs_find(mirror: &Programmed, frontend: u8, wanted: &BackendAddr) -> bool {
        let f = &mirror.frontends[&fkey(frontend)];
        let at = |slot: u16| f.slots.get(&slot).map(|id| mirror.backends[id]);
        let key = |b: &BackendAddr| (b.addr, b.port);
        let (mut low, mut high) = (1u32, u32::from(f.count));
        while low <= high {
            let middle = low + (high - low) / 2;
            let Some(found) = at(middle as u16) else {
                break;
            };
            match key(&found).cmp(&key(wanted)) {
                std::cmp::Ordering::Equal => return true,
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle - 1,
            }
        }
        (1..=16).any(|i| at(f.count + i) == Some(*wanted))
    }

    /// Backends added and removed in the middle of a frontend shift the others between
    /// slots. After every write, a backend the frontend has before and after the change is
    /// still found where the programs look for a pinned UDP socket's backend: written in
    /// slot order, a backend inserted before others overwrote the next one before that one
    /// had its new slot, and a socket pinned to it lost its backend for that moment.
    #[test]
    fn a_backend_that_stays_is_found_by_its_pinned_sockets_after_every_write() {
        let states = [
            desired(&[frontend(1, &[20, 40, 60, 80])]),
            desired(&[frontend(1, &[10, 20, 30, 40, 60, 80])]),
            desired(&[frontend(1, &[20, 30, 40, 50, 60, 70, 80])]),
            desired(&[frontend(1, &[30, 50, 80])]),
            desired(&[frontend(1, &[10, 30, 35, 50, 90])]),
            desired(&[frontend(1, &[5, 50, 60, 70, 90, 95])]),
            desired(&[lingering(frontend(1, &[1, 50, 60, 95]), &[5, 70, 90])]),
            desired(&[frontend(1, &[1, 2, 50, 60, 95])]),
        ];
        let live = |state: &DesiredState| state.frontends[&fkey(1)].backends.clone();
        let mut maps = FakeMaps::default();
        let mut mirror = Programmed::default();
        sync(&mut mirror, &states[0]);
        for op in plan(&Programmed::default(), &states[0]).unwrap() {
            maps.write(&op);
        }
        for pair in states.windows(2) {
            let staying: Vec<BackendAddr> = live(&pair[0])
                .into_iter()
                .filter(|b| live(&pair[1]).contains(b))
                .collect();
            for op in plan(&mirror, &pair[1]).unwrap() {
                maps.write(&op);
                mirror.apply(&op);
                maps.assert_readers_see_whole_services(&op);
                for b in &staying {
                    assert!(
                        programs_find(&mirror, 1, b),
                        "after {op:?} (towards {:?}): {b} is not found",
                        live(&pair[1])
                    );
                }
            }
        }
    }

    /// Lingering backends past the count are searched slot by slot: one inserted before
    /// another moves that one up a slot, which is written first (in slot order, the
    /// insertion overwrote it, and a socket pinned to it lost it for a write); one removed
    /// moves the next down, written bottom up.
    #[test]
    fn a_lingering_backend_that_stays_is_found_after_every_write() {
        let states = [
            desired(&[lingering(frontend(1, &[10, 20]), &[40, 60])]),
            desired(&[lingering(frontend(1, &[10, 20]), &[30, 40, 50, 60])]),
            desired(&[lingering(frontend(1, &[10, 20]), &[50, 60])]),
        ];
        let lingering_of = |state: &DesiredState| state.frontends[&fkey(1)].lingering.clone();
        let mut mirror = Programmed::default();
        sync(&mut mirror, &states[0]);
        for pair in states.windows(2) {
            let staying: Vec<BackendAddr> = lingering_of(&pair[0])
                .into_iter()
                .filter(|b| lingering_of(&pair[1]).contains(b))
                .collect();
            assert!(!staying.is_empty());
            for op in plan(&mirror, &pair[1]).unwrap() {
                mirror.apply(&op);
                for b in &staying {
                    assert!(
                        programs_find(&mirror, 1, b),
                        "after {op:?} (towards {:?}): {b} is not found",
                        lingering_of(&pair[1])
                    );
                }
            }
        }
    }

    /// The same over random changes: frontends of up to 200 backends, each change removing
    /// up to 16 and adding up to 16 (more would push a backend past the 16 slots the programs
    /// look at after the count). Written in slot order, about half of such changes lost a
    /// backend that stays for some writes.
    #[test]
    fn random_changes_of_up_to_16_backends_each_way_keep_staying_backends_found() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut failures = Vec::new();
        for _ in 0..300 {
            let size = (next() % 200) as usize;
            let mut a: Vec<u8> = (0..size).map(|_| (next() % 250 + 1) as u8).collect();
            a.sort();
            a.dedup();
            let mut b = a.clone();
            for _ in 0..next() % 17 {
                if !b.is_empty() {
                    let i = (next() % b.len() as u64) as usize;
                    b.remove(i);
                }
            }
            for _ in 0..next() % 17 {
                b.push((next() % 250 + 1) as u8);
            }
            b.sort();
            b.dedup();
            let states = [desired(&[frontend(1, &a)]), desired(&[frontend(1, &b)])];
            let mut mirror = Programmed::default();
            sync(&mut mirror, &states[0]);
            let live = |state: &DesiredState| state.frontends[&fkey(1)].backends.clone();
            let staying: Vec<BackendAddr> = live(&states[0])
                .into_iter()
                .filter(|x| live(&states[1]).contains(x))
                .collect();
            for op in plan(&mirror, &states[1]).unwrap() {
                mirror.apply(&op);
                if let Some(missing) = staying.iter().find(|x| !programs_find(&mirror, 1, x)) {
                    failures.push(format!(
                        "{a:?} -> {b:?}: after {op:?}, {missing} is not found"
                    ));
                    break;
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// Through lingering and back: after every write, the live slots hold only backends
    /// that take new flows before or after the change, never one that only lingers.
    #[test]
    fn live_slots_never_offer_a_backend_that_only_lingers() {
        let states = [
            desired(&[frontend(1, &[1, 2, 3])]),
            desired(&[lingering(frontend(1, &[2, 3]), &[1])]),
            desired(&[lingering(frontend(1, &[2]), &[1, 3])]),
            desired(&[lingering(frontend(1, &[1, 2]), &[3])]),
            desired(&[lingering(frontend(1, &[4]), &[1, 2, 3])]),
            desired(&[lingering(frontend(1, &[]), &[1, 4])]),
            desired(&[frontend(1, &[1, 2, 3, 4])]),
        ];
        let live = |state: &DesiredState| -> Vec<BackendAddr> {
            state
                .frontends
                .values()
                .flat_map(|f| f.backends.clone())
                .collect()
        };
        let mut maps = FakeMaps::default();
        let mut mirror = Programmed::default();
        let mut before = DesiredState::default();
        for state in &states {
            let may_offer: Vec<BackendAddr> =
                live(&before).into_iter().chain(live(state)).collect();
            for op in plan(&mirror, state).unwrap() {
                maps.write(&op);
                mirror.apply(&op);
                maps.assert_readers_see_whole_services(&op);
                let Some(f) = mirror.frontends.get(&fkey(1)) else {
                    continue; // not written yet
                };
                for slot in 1..=f.count {
                    let b = mirror.backends[&f.slots[&slot]];
                    assert!(
                        may_offer.contains(&b),
                        "after {op:?}: slot {slot} offers {b}"
                    );
                }
            }
            let f = &mirror.frontends[&fkey(1)];
            let slotted: Vec<BackendAddr> =
                f.slots.values().map(|id| mirror.backends[id]).collect();
            let wanted: Vec<BackendAddr> = state.frontends[&fkey(1)].slotted().copied().collect();
            assert_eq!(slotted, wanted);
            assert_eq!(plan(&mirror, state).unwrap(), []);
            before = state.clone();
        }
    }

    // ---- locality --------------------------------------------------------------------------

    #[test]
    fn a_locality_change_rewrites_the_backend_under_its_id() {
        let local_2 = |frontends: &[Frontend]| DesiredState {
            local_backends: BTreeSet::from([backend(2)]),
            ..desired(frontends)
        };
        let mut maps = FakeMaps::default();
        let mut mirror = Programmed::default();
        let ops = step(&mut maps, &mut mirror, &local_2(&[frontend(1, &[1, 2])]));
        let b2 = backend_id_of(&mirror, 2);
        assert!(
            ops.contains(&Op::PutBackend {
                id: b2,
                backend: backend(2),
                local: true,
            }),
            "{ops:#?}"
        );
        assert_eq!(maps.backends[&b2].flags, proxy_common::BACKEND_FLAG_LOCAL);
        assert_eq!(maps.backends[&backend_id_of(&mirror, 1)].flags, 0);
        assert_eq!(mirror.local_backends, BTreeSet::from([b2]));
        // A restart reads the flag back: nothing to write.
        assert_eq!(Programmed::from_maps(&maps.dump()), mirror);
        assert_eq!(
            plan(&mirror, &local_2(&[frontend(1, &[1, 2])])).unwrap(),
            []
        );

        // The pod of backend 2 is now on another node: same id, flag cleared, no slot moves.
        let ops = step(&mut maps, &mut mirror, &desired(&[frontend(1, &[1, 2])]));
        assert_eq!(
            ops,
            [Op::PutBackend {
                id: b2,
                backend: backend(2),
                local: false,
            }]
        );
        assert_eq!(maps.backends[&b2].flags, 0);
        assert!(mirror.local_backends.is_empty());
    }

    fn ranged(host: u8, ranges: &[(u8, u8)]) -> Frontend {
        Frontend {
            source_ranges: ranges
                .iter()
                .map(|(a, prefix)| SourceRange::new(Ipv4Addr::new(*a, 0, 0, 0), *prefix))
                .collect(),
            ..frontend(host, &[1])
        }
    }

    #[test]
    fn source_ranges_come_before_the_flag_and_go_after_it() {
        let mut maps = FakeMaps::default();
        let mut mirror = Programmed::default();
        // `step` checks after every write that a flagged slot 0 has its ranges.
        let ops = step(&mut maps, &mut mirror, &desired(&[ranged(1, &[(10, 8)])]));
        let id = rev_nat_id_of(&mirror, 1);
        let range = |a: u8, prefix| SourceRange::new(Ipv4Addr::new(a, 0, 0, 0), prefix);
        let put_range = Op::PutSourceRange {
            rev_nat_id: id,
            range: range(10, 8),
        };
        let flagged = Op::PutFrontend {
            frontend: fkey(1),
            count: 1,
            rev_nat_id: id,
            flags: SVC_FLAG_CLUSTER_IP | SVC_FLAG_SOURCE_RANGES,
            affinity_timeout: 0,
            affinity_id: 0,
        };
        assert!(index_of(&ops, &put_range) < index_of(&ops, &flagged));
        assert_ne!(mirror.frontends[&fkey(1)].flags & SVC_FLAG_SOURCE_RANGES, 0);

        // Another range replaces the first: added first, the old one deleted last.
        let ops = step(&mut maps, &mut mirror, &desired(&[ranged(1, &[(172, 12)])]));
        assert_eq!(
            ops,
            [
                Op::PutSourceRange {
                    rev_nat_id: id,
                    range: range(172, 12),
                },
                Op::DeleteSourceRange {
                    rev_nat_id: id,
                    range: range(10, 8),
                },
            ]
        );

        // The filter goes: slot 0 loses the flag before the range is deleted.
        let ops = step(&mut maps, &mut mirror, &desired(&[frontend(1, &[1])]));
        let unflagged = Op::PutFrontend {
            frontend: fkey(1),
            count: 1,
            rev_nat_id: id,
            flags: SVC_FLAG_CLUSTER_IP,
            affinity_timeout: 0,
            affinity_id: 0,
        };
        assert_eq!(
            ops,
            [
                unflagged,
                Op::DeleteSourceRange {
                    rev_nat_id: id,
                    range: range(172, 12),
                },
            ]
        );

        // A deleted frontend takes its ranges along; a restart adopts the ranges.
        step(&mut maps, &mut mirror, &desired(&[ranged(1, &[(10, 8)])]));
        assert_eq!(Programmed::from_maps(&maps.dump()), mirror);
        step(&mut maps, &mut mirror, &desired(&[]));
        assert!(maps.source_ranges.is_empty() && mirror.source_ranges.is_empty());
    }

    /// Affinity pairs a failed sync left over go at the next complete one, unless a
    /// frontend with session affinity offers the backend under that id again.
    #[test]
    fn affinity_pairs_left_by_a_failed_sync_go_unless_offered_again() {
        let with_affinity =
            |affinity_id: u16, count: u16, slots: &[(u16, u32)]| ProgrammedFrontend {
                rev_nat_id: 40 + affinity_id,
                flags: SVC_FLAG_CLUSTER_IP | SVC_FLAG_AFFINITY,
                affinity_timeout: 10800,
                affinity_id,
                count,
                slots: slots.iter().copied().collect(),
            };
        let mut programmed = Programmed::default();
        // Affinity id 1: backend 11 live again, 12 only above the count.
        programmed
            .frontends
            .insert(fkey(1), with_affinity(1, 1, &[(1, 11), (2, 12)]));
        // Affinity id 3: switched off, backend 14 still in its slots.
        let mut off = with_affinity(3, 1, &[(1, 14)]);
        off.flags = SVC_FLAG_CLUSTER_IP;
        programmed.frontends.insert(fkey(3), off);
        let pending = BTreeSet::from([(1, 11), (1, 12), (2, 13), (3, 14)]);
        assert_eq!(
            affinity_not_offered(&programmed, &pending),
            BTreeSet::from([(1, 12), (2, 13), (3, 14)])
        );
    }

    /// A sync that fails partway hands the C27 worker the departures its writes made, and
    /// not those it did not get to: the next sync, starting from the maps, finds only the
    /// latter.
    #[test]
    fn a_failed_sync_hands_over_the_departures_its_writes_made() {
        let udp = |host: u8| BackendAddr {
            proto: Protocol::Udp,
            ..backend(host)
        };
        // After the failed writes: rev-NAT 1's count is down to 1, so backend 12 is left
        // only above it; backend 11 is still live (its removal was not reached). Rev-NAT 2's
        // frontend is gone; rev-NAT 3's has no live slot left (count 0).
        let mut programmed = Programmed::default();
        programmed.frontends.insert(
            fkey(1),
            ProgrammedFrontend {
                rev_nat_id: 1,
                flags: SVC_FLAG_CLUSTER_IP,
                affinity_timeout: 0,
                affinity_id: 0,
                count: 1,
                slots: BTreeMap::from([(1, 11), (2, 12)]),
            },
        );
        programmed.frontends.insert(
            fkey(3),
            ProgrammedFrontend {
                rev_nat_id: 3,
                flags: SVC_FLAG_CLUSTER_IP,
                affinity_timeout: 0,
                affinity_id: 0,
                count: 0,
                slots: BTreeMap::from([(1, 14)]),
            },
        );
        let departed = vec![
            ((1, 11), udp(11)),
            ((1, 12), udp(12)),
            ((2, 13), udp(13)),
            ((3, 14), udp(14)),
        ];
        assert_eq!(
            departed_so_far(&programmed, departed),
            vec![((1, 12), udp(12)), ((2, 13), udp(13)), ((3, 14), udp(14))]
        );
    }
}
