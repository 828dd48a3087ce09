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

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};
use proxy_common::ServiceValue;

use crate::abi;
use crate::dataplane::{MapContents, Maps};
use crate::model::{BackendAddr, DesiredState, FrontendKey};

/// One frontend as programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedFrontend {
    pub rev_nat_id: u16,
    pub flags: u16,
    /// Slot 0's `count`: slots `1..=count` are live.
    pub count: u16,
    /// Backend id per slot number (may hold slots above `count` left by an interrupted sync).
    pub slots: BTreeMap<u16, u32>,
}

/// The maps' contents in model terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub frontends: BTreeMap<FrontendKey, ProgrammedFrontend>,
    pub backends: BTreeMap<u32, BackendAddr>,
    /// Rev-NAT ids present in the rev-NAT map (some may be orphans of an interrupted sync).
    pub rev_nat_ids: BTreeSet<u16>,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend {
        id: u32,
        backend: BackendAddr,
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
                f.rev_nat_id = value.rev_nat_id;
                f.flags = value.flags;
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
            }
        }
        p.rev_nat_ids = contents.rev_nat.iter().map(|(id, _)| *id).collect();
        p
    }

    /// Keeps the mirror exact after `op` was written.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutBackend { id, backend } => {
                self.backends.insert(*id, *backend);
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
            } => {
                let f = self.frontend_mut(frontend);
                f.count = *count;
                f.rev_nat_id = *rev_nat_id;
                f.flags = *flags;
            }
            Op::DeleteSlot { frontend, slot } => {
                if let Some(f) = self.frontends.get_mut(frontend) {
                    f.slots.remove(slot);
                }
            }
            Op::DeleteFrontend { frontend } => {
                if let Some(f) = self.frontends.get_mut(frontend) {
                    f.count = 0;
                    f.flags = 0;
                }
            }
            Op::DeleteRevNat { id } => {
                self.rev_nat_ids.remove(id);
            }
            Op::DeleteBackend { id } => {
                self.backends.remove(id);
            }
        }
        // A frontend with neither slot 0 nor slots is gone.
        self.frontends
            .retain(|_, f| f.flags != 0 || !f.slots.is_empty());
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
        count: 0,
        slots: BTreeMap::new(),
    }
}

/// Computes the ordered writes that turn `programmed` into `desired`.
///
/// Fails without writing anything when ids run out (more than 65535 frontends).
pub fn plan(programmed: &Programmed, desired: &DesiredState) -> Result<Vec<Op>> {
    let mut ops = Vec::new();

    // Backend ids: keep the id of every backend that is already programmed.
    let mut backend_ids: BTreeMap<BackendAddr, u32> = programmed
        .backends
        .iter()
        .map(|(id, b)| (*b, *id))
        .collect();
    let mut used_backend_ids: BTreeSet<u32> = programmed.backends.keys().copied().collect();
    let wanted_backends: BTreeSet<BackendAddr> = desired
        .frontends
        .values()
        .flat_map(|f| f.backends.iter().copied())
        .collect();
    for backend in &wanted_backends {
        if backend_ids.contains_key(backend) {
            continue;
        }
        let Some(id) = next_free_u32(&used_backend_ids) else {
            bail!("no free backend id for {backend}");
        };
        used_backend_ids.insert(id);
        backend_ids.insert(*backend, id);
        ops.push(Op::PutBackend {
            id,
            backend: *backend,
        });
    }

    // Rev-NAT ids: keep each live frontend's id; allocate for new ones.
    let mut used_rev_nat: BTreeSet<u16> = programmed.rev_nat_ids.clone();
    used_rev_nat.extend(programmed.frontends.values().map(|f| f.rev_nat_id));
    let mut slot_ops = Vec::new();
    let mut rev_nat_ops = Vec::new();
    let mut frontend_ops = Vec::new();
    let mut shrink_ops = Vec::new();
    for (key, frontend) in &desired.frontends {
        let current = programmed.frontends.get(key).filter(|f| f.flags != 0);
        let rev_nat_id = match current {
            Some(f) if f.rev_nat_id != 0 => f.rev_nat_id,
            _ => {
                let Some(id) = next_free_u16(&used_rev_nat) else {
                    bail!(
                        "no free rev-NAT id for frontend {key} ({})",
                        frontend.service
                    );
                };
                used_rev_nat.insert(id);
                id
            }
        };
        if !programmed.rev_nat_ids.contains(&rev_nat_id) || current.is_none() {
            rev_nat_ops.push(Op::PutRevNat {
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
        let existing_slots = programmed.frontends.get(key).map(|f| &f.slots);
        for (i, backend) in frontend.backends.iter().enumerate() {
            let slot = i as u16 + 1;
            let backend_id = backend_ids[backend];
            if existing_slots.and_then(|s| s.get(&slot)) != Some(&backend_id) {
                slot_ops.push(Op::PutSlot {
                    frontend: *key,
                    slot,
                    backend_id,
                    rev_nat_id,
                });
            }
        }
        let flags = frontend.kind.flag();
        let unchanged = current
            .is_some_and(|f| f.count == count && f.rev_nat_id == rev_nat_id && f.flags == flags);
        if !unchanged {
            frontend_ops.push(Op::PutFrontend {
                frontend: *key,
                count,
                rev_nat_id,
                flags,
            });
        }
        if let Some(slots) = existing_slots {
            for slot in slots.keys().filter(|s| **s > count) {
                shrink_ops.push(Op::DeleteSlot {
                    frontend: *key,
                    slot: *slot,
                });
            }
        }
    }
    ops.extend(slot_ops);
    ops.extend(rev_nat_ops);
    ops.extend(frontend_ops);
    ops.extend(shrink_ops);

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
    Ok(ops)
}

fn next_free_u32(used: &BTreeSet<u32>) -> Option<u32> {
    next_free_id(used.iter().map(|v| u64::from(*v)), u64::from(u32::MAX)).map(|v| v as u32)
}

fn next_free_u16(used: &BTreeSet<u16>) -> Option<u16> {
    next_free_id(used.iter().map(|v| u64::from(*v)), u64::from(u16::MAX)).map(|v| v as u16)
}

/// Smallest id in `1..=max` absent from the sorted `used` ids.
fn next_free_id(used: impl Iterator<Item = u64>, max: u64) -> Option<u64> {
    let mut candidate = 1;
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

/// Owns the maps and the mirror of their contents.
pub struct Syncer {
    maps: Maps,
    programmed: Programmed,
}

impl Syncer {
    /// Adopts whatever the (possibly pinned, pre-existing) maps hold.
    pub fn adopt(maps: Maps) -> Self {
        let programmed = Programmed::from_maps(&maps.read());
        Syncer { maps, programmed }
    }

    pub fn programmed(&self) -> &Programmed {
        &self.programmed
    }

    /// Writes the difference between what is programmed and `desired`.
    pub fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats> {
        let ops = plan(&self.programmed, desired)?;
        for op in &ops {
            self.write(op)?;
            self.programmed.apply(op);
        }
        Ok(SyncStats {
            writes: ops.len(),
            frontends: self.programmed.frontends.len(),
            backends: self.programmed.backends.len(),
        })
    }

    fn write(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::PutBackend { id, backend } => {
                self.maps.put_backend(*id, abi::backend_value(backend))
            }
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
                rev_nat_id,
            } => self.maps.put_service(
                abi::service_key(frontend, *slot),
                ServiceValue {
                    backend_id: *backend_id,
                    rev_nat_id: *rev_nat_id,
                    ..Default::default()
                },
            ),
            Op::PutRevNat { id, frontend } => {
                self.maps.put_rev_nat(*id, abi::rev_nat_value(frontend))
            }
            Op::PutFrontend {
                frontend,
                count,
                rev_nat_id,
                flags,
            } => self.maps.put_service(
                abi::service_key(frontend, 0),
                ServiceValue {
                    count: *count,
                    rev_nat_id: *rev_nat_id,
                    flags: *flags,
                    ..Default::default()
                },
            ),
            Op::DeleteSlot { frontend, slot } => {
                self.maps.delete_service(abi::service_key(frontend, *slot))
            }
            Op::DeleteFrontend { frontend } => {
                self.maps.delete_service(abi::service_key(frontend, 0))
            }
            Op::DeleteRevNat { id } => self.maps.delete_rev_nat(*id),
            Op::DeleteBackend { id } => self.maps.delete_backend(*id),
        }
    }
}
