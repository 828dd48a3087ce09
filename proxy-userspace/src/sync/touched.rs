//! Planning only what changed (issue 6): when the maps hold exactly the previous desired
//! state, the frontends that differ from it and the backends whose locality changed are all
//! a plan needs to look at. The ops are the full plan's, in its order (property test below),
//! for a cost that follows the change rather than the number of Services.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{Result, bail};

use super::{Op, Programmed};
use crate::model::{BackendAddr, DesiredState, FrontendKey, SourceRange};

/// What may differ between the programmed state and the desired one; everything else is
/// equal to it.
#[derive(Clone, Copy, Debug)]
pub struct Touched<'a> {
    pub frontends: &'a BTreeSet<FrontendKey>,
    /// Backends whose membership of `DesiredState::local_backends` changed.
    pub local_backends: &'a BTreeSet<BackendAddr>,
}

/// Backend ids by address, how many slots refer to each id, and the free ids: the lookups
/// a full plan gets by scanning every backend (a walk over 20000 ids is milliseconds of
/// cache misses at 10000 Services).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendIndex {
    ids: HashMap<BackendAddr, u32>,
    refs: HashMap<u32, usize>,
    /// The highest id in use (0: none).
    max_id: u32,
    /// The unused ids below `max_id`, from 1.
    holes: BTreeSet<u32>,
}

impl BackendIndex {
    pub fn of(programmed: &Programmed) -> Self {
        let mut index = BackendIndex {
            ids: programmed
                .backends
                .iter()
                .map(|(id, b)| (*b, *id))
                .collect(),
            refs: HashMap::new(),
            max_id: 0,
            holes: BTreeSet::new(),
        };
        for id in programmed.backends.keys() {
            index.take_id(*id);
        }
        for f in programmed.frontends.values() {
            for id in f.slots.values() {
                *index.refs.entry(*id).or_default() += 1;
            }
        }
        index
    }

    pub fn id(&self, backend: &BackendAddr) -> Option<u32> {
        self.ids.get(backend).copied()
    }

    /// The smallest id from `from` (at least 1) that no backend uses: what
    /// `next_free_id` finds by walking every id in use.
    pub fn next_free(&self, from: u32) -> Option<u32> {
        let from = from.max(1);
        match self.holes.range(from..).next() {
            Some(id) => Some(*id),
            None => self.max_id.max(from - 1).checked_add(1),
        }
    }

    /// (Id 0 is never one: index 0 of the array holds nothing. A value there, written by
    /// something else, must not underflow the count when it is deleted.)
    fn take_id(&mut self, id: u32) {
        if id == 0 {
            return;
        }
        if id > self.max_id {
            self.holes.extend(self.max_id + 1..id);
            self.max_id = id;
        } else {
            self.holes.remove(&id);
        }
    }

    fn free_id(&mut self, id: u32) {
        if id == 0 {
            return;
        }
        if id < self.max_id {
            self.holes.insert(id);
        } else if id == self.max_id {
            self.max_id -= 1;
            while self.max_id > 0 && self.holes.remove(&self.max_id) {
                self.max_id -= 1;
            }
        }
    }

    /// Keeps the index exact for `op`, written to `programmed` (not yet applied to it).
    pub fn apply(&mut self, programmed: &Programmed, op: &Op) {
        let slot_of = |frontend: &FrontendKey, slot: &u16| {
            programmed
                .frontends
                .get(frontend)
                .and_then(|f| f.slots.get(slot))
                .copied()
        };
        let unref = |refs: &mut HashMap<u32, usize>, id: u32| {
            if let Some(n) = refs.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    refs.remove(&id);
                }
            }
        };
        match op {
            Op::PutBackend { id, backend, .. } => {
                if let Some(old) = programmed.backends.get(id) {
                    self.ids.remove(old);
                }
                self.ids.insert(*backend, *id);
                self.take_id(*id);
            }
            Op::DeleteBackend { id } => {
                if let Some(old) = programmed.backends.get(id) {
                    self.ids.remove(old);
                    self.free_id(*id);
                }
            }
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
                ..
            } => {
                if let Some(old) = slot_of(frontend, slot) {
                    unref(&mut self.refs, old);
                }
                *self.refs.entry(*backend_id).or_default() += 1;
            }
            Op::DeleteSlot { frontend, slot } => {
                if let Some(old) = slot_of(frontend, slot) {
                    unref(&mut self.refs, old);
                }
            }
            Op::PutRevNat { .. }
            | Op::PutFrontend { .. }
            | Op::DeleteFrontend { .. }
            | Op::DeleteRevNat { .. }
            | Op::PutSourceRange { .. }
            | Op::DeleteSourceRange { .. } => {}
        }
    }
}

/// `plan(programmed, desired)` when `programmed` holds exactly a previous desired state
/// that differs from `desired` only where `touched` says (and has no leftovers of an
/// interrupted sync: orphan slots, rev-NAT entries or backends).
pub fn plan(
    programmed: &Programmed,
    index: &BackendIndex,
    desired: &DesiredState,
    touched: Touched<'_>,
) -> Result<Vec<Op>> {
    let mut ops = Vec::new();
    let wanted_here: BTreeSet<BackendAddr> = touched
        .frontends
        .iter()
        .filter_map(|k| desired.frontends.get(k))
        .flat_map(|f| f.slotted().copied())
        .collect();
    // Slots of the touched frontends as programmed, per backend id.
    let mut refs_here: BTreeMap<u32, usize> = BTreeMap::new();
    for f in touched
        .frontends
        .iter()
        .filter_map(|k| programmed.frontends.get(k))
    {
        for id in f.slots.values() {
            *refs_here.entry(*id).or_default() += 1;
        }
    }
    // Still used by a frontend that did not change.
    let used_elsewhere = |id: u32| {
        index.refs.get(&id).copied().unwrap_or(0) > refs_here.get(&id).copied().unwrap_or(0)
    };
    let wanted =
        |b: &BackendAddr| wanted_here.contains(b) || index.id(b).is_some_and(&used_elsewhere);

    // Backends, in the full plan's order: the new ones and those whose locality changed.
    let mut backend_ids: HashMap<BackendAddr, u32> = HashMap::new();
    let mut backend_cursor = 1;
    let candidates: BTreeSet<BackendAddr> = wanted_here
        .iter()
        .copied()
        .chain(touched.local_backends.iter().copied().filter(wanted))
        .collect();
    for backend in &candidates {
        let local = desired.local_backends.contains(backend);
        if let Some(id) = index.id(backend) {
            if programmed.local_backends.contains(&id) != local {
                ops.push(Op::PutBackend {
                    id,
                    backend: *backend,
                    local,
                });
            }
            continue;
        }
        let Some(id) = index.next_free(backend_cursor) else {
            bail!("no free backend id for {backend}");
        };
        backend_cursor = id.saturating_add(1);
        backend_ids.insert(*backend, id);
        ops.push(Op::PutBackend {
            id,
            backend: *backend,
            local,
        });
    }
    let id_of = |b: &BackendAddr| backend_ids.get(b).copied().or_else(|| index.id(b));

    let mut rev_nat_cursor = 1;
    let mut assigned = Vec::new();
    for (key, frontend) in touched
        .frontends
        .iter()
        .filter_map(|k| desired.frontends.get_key_value(k))
    {
        let current = programmed.frontends.get(key).filter(|f| f.flags != 0);
        let rev_nat_id = match current {
            Some(f) if f.rev_nat_id != 0 => f.rev_nat_id,
            _ => {
                let used = programmed.rev_nat_ids.range(rev_nat_cursor..).copied();
                let Some(id) = super::next_free_id(
                    used.map(u64::from),
                    u64::from(rev_nat_cursor),
                    u64::from(u16::MAX),
                )
                .map(|id| id as u16) else {
                    bail!(
                        "no free rev-NAT id for frontend {key} ({})",
                        frontend.service
                    );
                };
                rev_nat_cursor = id.saturating_add(1);
                id
            }
        };
        assigned.push((key, frontend, current, rev_nat_id));
    }
    // An affinity group's ClusterIP frontend is among the touched ones if it changed, else
    // programmed as it stays.
    let groups = super::affinity_groups(&assigned);
    let group_rev_nat = |group: &FrontendKey| {
        groups.get(group).copied().or_else(|| {
            programmed
                .frontends
                .get(group)
                .filter(|f| f.flags != 0)
                .map(|f| f.rev_nat_id)
        })
    };
    let phases = super::Phases::of(programmed, desired, assigned, group_rev_nat, id_of)?;
    // Source ranges belong to their frontend's rev-NAT id: those of the touched frontends
    // are all that may change.
    let rev_nat_here: BTreeSet<u16> = touched
        .frontends
        .iter()
        .filter_map(|k| programmed.frontends.get(k))
        .map(|f| f.rev_nat_id)
        .collect();
    let programmed_ranges: BTreeSet<(u16, SourceRange)> = programmed
        .source_ranges
        .iter()
        .filter(|(id, _)| rev_nat_here.contains(id))
        .copied()
        .collect();
    let wanted_ranges = phases.emit(programmed, &mut ops);

    // Frontends no longer wanted: slot 0, slots, then their rev-NAT entries.
    let mut dead_rev_nat = BTreeSet::new();
    for (key, f) in touched
        .frontends
        .iter()
        .filter(|k| !desired.frontends.contains_key(*k))
        .filter_map(|k| programmed.frontends.get_key_value(k))
    {
        if f.flags != 0 {
            ops.push(Op::DeleteFrontend { frontend: *key });
        }
        ops.extend(f.slots.keys().map(|slot| Op::DeleteSlot {
            frontend: *key,
            slot: *slot,
        }));
        if programmed.rev_nat_ids.contains(&f.rev_nat_id) {
            dead_rev_nat.insert(f.rev_nat_id);
        }
    }
    ops.extend(dead_rev_nat.into_iter().map(|id| Op::DeleteRevNat { id }));

    // Backends the touched frontends used and nobody uses any more.
    ops.extend(
        refs_here
            .keys()
            .filter(|id| {
                programmed
                    .backends
                    .get(id)
                    .is_some_and(|b| !wanted_here.contains(b) && !used_elsewhere(**id))
            })
            .map(|id| Op::DeleteBackend { id: *id }),
    );

    // Source ranges no touched frontend wants: after the slot 0 that stopped using them.
    ops.extend(
        programmed_ranges
            .difference(&wanted_ranges)
            .map(|(rev_nat_id, range)| Op::DeleteSourceRange {
                rev_nat_id: *rev_nat_id,
                range: *range,
            }),
    );
    Ok(ops)
}

/// `departed(programmed, desired, consider)` when only the `touched` frontends differ.
pub fn departed(
    programmed: &Programmed,
    index: &BackendIndex,
    desired: &DesiredState,
    touched: &BTreeSet<FrontendKey>,
    consider: impl Fn(&super::ProgrammedFrontend, Option<&crate::model::Frontend>) -> bool,
) -> BTreeSet<(u16, u32)> {
    super::departed_among(
        touched
            .iter()
            .filter_map(|k| programmed.frontends.get_key_value(k)),
        |b| index.id(b),
        desired,
        super::Leaving::Every,
        consider,
        |f| f.rev_nat_id,
    )
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::collection::{btree_set, vec};
    use proptest::prelude::*;

    use super::*;
    use crate::model::{Frontend, FrontendKind, Protocol, Scope, ServicePortName, WhenEmpty};

    /// Index 0 of the backends array is never an id: a value found there (a foreign write)
    /// and then deleted leaves the free ids as they were.
    #[test]
    fn id_0_is_never_counted() {
        let mut index = BackendIndex {
            ids: HashMap::new(),
            refs: HashMap::new(),
            max_id: 0,
            holes: BTreeSet::new(),
        };
        index.take_id(0);
        index.take_id(1);
        index.free_id(0);
        assert_eq!(index.next_free(1), Some(2));
        index.free_id(1);
        index.free_id(0);
        assert_eq!(index.next_free(1), Some(1));
    }

    fn backend(n: u8) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::new(10, 244, 0, n),
            port: 8080,
            proto: if n.is_multiple_of(3) {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
        }
    }

    fn frontend(n: u8, backends: &[u8], lingering: &[u8], affinity: bool, drop: bool) -> Frontend {
        let mut backends: Vec<BackendAddr> = backends.iter().map(|b| backend(*b)).collect();
        backends.sort();
        backends.dedup();
        let lingering: BTreeSet<BackendAddr> = lingering
            .iter()
            .map(|b| backend(*b))
            .filter(|b| !backends.contains(b))
            .collect();
        let key = FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, n),
            port: 80,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        };
        Frontend {
            key,
            kind: FrontendKind::ClusterIp,
            service: ServicePortName {
                namespace: "default".into(),
                name: format!("svc-{n}"),
                port: String::new(),
            },
            when_empty: if drop && backends.is_empty() {
                WhenEmpty::Drop
            } else {
                WhenEmpty::Refuse
            },
            // Frontends with affinity also filter sources, with a range that moves with
            // their backend count (so ranges are added, replaced and removed too).
            source_ranges: if affinity {
                vec![SourceRange::new(
                    Ipv4Addr::new(10, n, 0, 0),
                    8 + backends.len() as u8,
                )]
            } else {
                Vec::new()
            },
            backends,
            lingering: lingering.into_iter().collect(),
            affinity_timeout: affinity.then_some(60),
            affinity_group: affinity.then_some(key),
            at_node_address: false,
        }
    }

    /// One step: frontends put or removed, backends that become or stop being local.
    type Step = (Vec<(u8, Option<Edit>)>, BTreeSet<u8>);
    /// A frontend's backends, lingering backends, affinity and drop-when-empty.
    type Edit = (Vec<u8>, Vec<u8>, bool, bool);

    fn step() -> impl Strategy<Value = Step> {
        (
            vec(
                (
                    0..12u8,
                    proptest::option::weighted(
                        0.8,
                        (
                            vec(0..16u8, 0..5),
                            vec(0..16u8, 0..3),
                            any::<bool>(),
                            any::<bool>(),
                        ),
                    ),
                ),
                0..4,
            ),
            btree_set(0..16u8, 0..3),
        )
    }

    /// The next state: the step's edits, and locality toggled for the step's backends
    /// (among those in use, as translate keeps it).
    fn next(previous: &DesiredState, (edits, toggled): &Step) -> DesiredState {
        let mut state = previous.clone();
        for (n, edit) in edits {
            let f = frontend(*n, &[], &[], false, false);
            match edit {
                Some((backends, lingering, affinity, drop)) => {
                    let f = frontend(*n, backends, lingering, *affinity, *drop);
                    state.frontends.insert(f.key, f);
                }
                None => {
                    state.frontends.remove(&f.key);
                }
            }
        }
        let in_use: BTreeSet<BackendAddr> = state
            .frontends
            .values()
            .flat_map(|f| f.slotted().copied())
            .collect();
        for b in toggled.iter().map(|n| backend(*n)) {
            if !state.local_backends.remove(&b) {
                state.local_backends.insert(b);
            }
        }
        state.local_backends.retain(|b| in_use.contains(b));
        state
    }

    fn apply(mirror: &mut Programmed, index: &mut BackendIndex, ops: &[Op]) {
        for op in ops {
            index.apply(mirror, op);
            mirror.apply(op);
        }
    }

    proptest! {
        /// The touched plan is the full plan, op for op, and the index stays what a scan of
        /// the maps gives, over a sequence of states.
        #[test]
        fn the_touched_plan_is_the_full_plan(steps in vec(step(), 1..10)) {
            let mut mirror = Programmed::default();
            let mut index = BackendIndex::default();
            let mut previous = DesiredState::default();
            for step in &steps {
                let desired = &next(&previous, step);
                let frontends: BTreeSet<FrontendKey> = desired
                    .frontends
                    .keys()
                    .chain(previous.frontends.keys())
                    .filter(|k| desired.frontends.get(k) != previous.frontends.get(k))
                    .copied()
                    .collect();
                let local_backends: BTreeSet<BackendAddr> = desired
                    .local_backends
                    .symmetric_difference(&previous.local_backends)
                    .copied()
                    .collect();
                let touched = Touched {
                    frontends: &frontends,
                    local_backends: &local_backends,
                };
                let full = super::super::plan(&mirror, desired).expect("full plan");
                let ops = plan(&mirror, &index, desired, touched).expect("touched plan");
                prop_assert_eq!(&ops, &full);
                prop_assert_eq!(
                    departed(&mirror, &index, desired, &frontends, |_, _| true),
                    super::super::departed(&mirror, desired, |_, _| true)
                );
                let among = frontends.iter().filter_map(|k| mirror.frontends.get_key_value(k));
                prop_assert_eq!(
                    super::super::stale_affinity_among(among, |b| index.id(b), desired),
                    super::super::stale_affinity(&mirror, desired)
                );
                apply(&mut mirror, &mut index, &ops);
                prop_assert_eq!(&index, &BackendIndex::of(&mirror));
                previous = desired.clone();
            }
        }
    }
}
