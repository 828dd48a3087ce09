//! Backend selection shared by the socket programs and the north-south programs (Cilium's
//! `lib/lb.h`): a random slot of the frontend, or the slot a sessionAffinity ClientIP client
//! used last within the timeout.

use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns};
use proxy_common::{
    AffinityKey, AffinityValue, BackendValue, SVC_FLAG_AFFINITY, ServiceKey, ServiceValue,
    seconds_since,
};

use crate::maps::{AFFINITY, BACKENDS, SERVICES};

/// Seconds of the monotonic clock, the unit of every `last_used` / `last_seen` field.
///
/// The coarse clock (the time of the last tick) is precise enough for seconds and reads no
/// clock source: in a profile of the NodePort path, the precise clock's read was a sixth
/// of `ekp_tcx_out`'s time.
#[inline(always)]
pub fn now_secs() -> u32 {
    // SAFETY: a plain helper call.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// The backend id for a new connection to the frontend `key` (slot 0) describes. `client`
/// identifies the client for session affinity; it is only used with `SVC_FLAG_AFFINITY`.
/// `None` when a slot is missing even after slot 0 is read again (`random_backend`): callers
/// then leave the connection untranslated.
#[inline(always)]
pub fn select_backend(
    client: impl FnOnce() -> u64,
    key: &mut ServiceKey,
    frontend: &ServiceValue,
) -> Option<u32> {
    if frontend.flags & SVC_FLAG_AFFINITY != 0 {
        sticky_backend(client(), key, frontend)
    } else {
        random_backend(key, frontend)
    }
}

/// How many slots after `count` (the lingering ones) a pinned socket's backend is looked
/// for in.
const LINGERING_PROBES: u16 = 16;

/// Halvings that narrow any count of live slots (at most 65535) down to one, and one more.
const SEARCH_STEPS: u32 = 17;

/// The backend at `addr:port` (network order) if the frontend `key` (slot 0) describes
/// still has it: in `slot`, where it was chosen from; anywhere in the live slots, which
/// hold the backends sorted by address and port (a backend added or removed before it
/// moves it), found by halving; or among the first [`LINGERING_PROBES`] slots after
/// `count`, where a backend that takes no new flow but still serves (a draining pod) keeps
/// its flows (all of them: while the agent rewrites the slots, those between may be
/// missing). Sets `key.slot` to where it was found. `None` when it left the frontend: the
/// caller chooses anew, as kube-proxy deletes the UDP flows of an endpoint that no longer
/// serves.
#[inline(always)]
pub fn pinned_backend(
    key: &mut ServiceKey,
    frontend: &ServiceValue,
    addr: u32,
    port: u16,
    slot: u16,
) -> Option<(u32, BackendValue)> {
    if slot != 0
        && let Some(found) = backend_in(key, slot, addr, port)
    {
        return Some(found);
    }
    let found = find_slot(key, frontend.count, addr, port, true);
    if found == 0 {
        return None;
    }
    // Read again, as found (the agent may have moved it since: then it is chosen anew).
    backend_in(key, found, addr, port)
}

/// [`ekp_find_backend`] for the frontend `key` and the backend at `addr:port`.
#[inline(always)]
fn find_slot(key: &ServiceKey, count: u16, addr: u32, port: u16, lingering: bool) -> u16 {
    let frontend = u64::from(key.addr)
        | u64::from(key.port) << 32
        | u64::from(key.proto) << 48
        | u64::from(key.scope) << 56;
    let wanted = u64::from(addr) | u64::from(port) << 32;
    ekp_find_backend(frontend, count.into(), wanted, lingering.into()) as u16
}

/// Where [`pinned_backend`] searches when the backend left its slot: the live slots, then,
/// if `lingering` is not 0, the lingering ones; and where [`sticky_backend`] checks that a
/// remembered backend is still live. Returns the slot, 0 when not found.
///
/// A global BPF function (`#[no_mangle] extern "C"`, exported with BTF linkage `global`):
/// the verifier checks it once, on its own. Inlined, its two loops (17 halvings, 16
/// probes) were walked again for each of the states the socket programs reach it in, most
/// of what the verifier did for `ekp_connect4`, `ekp_sendmsg4` and `ekp_connect6` (and
/// `sticky_backend`, a subprogram walked for each state it is called in, likewise). Its
/// arguments are scalars (a global function takes five at most): the frontend's address,
/// port, protocol and scope in `frontend`, the backend's address and port in `wanted`.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn ekp_find_backend(frontend: u64, count: u64, wanted: u64, lingering: u64) -> u64 {
    let mut key = ServiceKey {
        addr: frontend as u32,
        port: (frontend >> 32) as u16,
        slot: 0,
        proto: (frontend >> 48) as u8,
        scope: (frontend >> 56) as u8,
        _pad: [0; 2],
    };
    let (addr, port, count) = (wanted as u32, (wanted >> 32) as u16, count as u16);
    if live_backend(&mut key, count, addr, port).is_some() {
        return key.slot.into();
    }
    if lingering == 0 {
        return 0;
    }
    for i in 1..=LINGERING_PROBES {
        if backend_in(&mut key, count.saturating_add(i), addr, port).is_some() {
            return key.slot.into();
        }
    }
    0
}

/// The backend id in the slot `key` names (where `select_backend` looked last), 0 when the
/// slot is missing: what a log record says when no backend came of it. (Read again rather
/// than taken from the selection's `None`: LLVM may copy the payload of a `None`, a
/// register no path wrote, and the verifier rejects reading one.)
#[inline(always)]
pub fn slot_backend_id(key: &ServiceKey) -> u32 {
    // SAFETY: copied out at once.
    SERVICES
        .get_ptr(key)
        .map_or(0, |s| unsafe { (*s).backend_id })
}

/// The backend slot `slot` of the frontend `key` holds, with its id.
#[inline(always)]
fn slot_backend(key: &mut ServiceKey, slot: u16) -> Option<(u32, BackendValue)> {
    key.slot = slot;
    // SAFETY: copied out at once.
    let id = SERVICES
        .get_ptr(&*key)
        .map(|s| unsafe { (*s).backend_id })?;
    Some((id, backend(id)?))
}

/// The backend under `id`; `None` for an entry of the array that holds none (address 0:
/// never written, or deleted), which must never become a destination (0.0.0.0 is this
/// host).
#[inline(always)]
pub fn backend(id: u32) -> Option<BackendValue> {
    // SAFETY: copied out at once.
    backend_ptr(id).map(|b| unsafe { *b })
}

/// [`backend`], in place.
#[inline(always)]
pub fn backend_ptr(id: u32) -> Option<*const BackendValue> {
    // SAFETY: a map value pointer, valid for this program run.
    BACKENDS.get_ptr(id).filter(|b| unsafe { (**b).addr } != 0)
}

/// The backend slot `slot` of the frontend `key` holds, if it is the one at `addr:port`.
#[inline(always)]
fn backend_in(
    key: &mut ServiceKey,
    slot: u16,
    addr: u32,
    port: u16,
) -> Option<(u32, BackendValue)> {
    slot_backend(key, slot).filter(|(_, b)| b.addr == addr && b.port == port)
}

/// The backend at `addr:port` among the live slots `1..=count`, by halving: the agent
/// writes them in the order of address, then port (host order). A missing slot or backend
/// (the agent rewriting them) ends the search.
#[inline(always)]
fn live_backend(
    key: &mut ServiceKey,
    count: u16,
    addr: u32,
    port: u16,
) -> Option<(u32, BackendValue)> {
    let wanted = (u32::from_be(addr), u16::from_be(port));
    let (mut low, mut high) = (1u32, u32::from(count));
    for _ in 0..SEARCH_STEPS {
        if low > high {
            return None;
        }
        let middle = low + (high - low) / 2;
        let (id, backend) = slot_backend(key, middle as u16)?;
        match (u32::from_be(backend.addr), u16::from_be(backend.port)).cmp(&wanted) {
            core::cmp::Ordering::Equal => return Some((id, backend)),
            core::cmp::Ordering::Less => low = middle + 1,
            core::cmp::Ordering::Greater => high = middle - 1,
        }
    }
    None
}

/// A uniformly random backend slot of the frontend `key` (slot 0) describes.
///
/// A slot found missing means the agent shrank the frontend after `frontend` was read: it
/// lowers the count in slot 0 before it deletes the slots above it. Slot 0 is read again
/// and a slot picked under the count it holds now, whose slots all exist; only a second
/// rewrite within that instant, or the frontend's last backend going then (count 0),
/// leaves the caller without a backend (it then leaves the connection untranslated, as
/// Cilium does at a missing slot; docs/decisions.md).
#[inline(always)]
fn random_backend(key: &mut ServiceKey, frontend: &ServiceValue) -> Option<u32> {
    if let Some(id) = random_slot(key, frontend.count) {
        return Some(id);
    }
    key.slot = 0;
    // SAFETY: copied out at once.
    let count = unsafe { (*SERVICES.get_ptr(&*key)?).count };
    random_slot(key, count)
}

/// The backend id in a uniformly random slot of `1..=count` of the frontend `key`.
#[inline(always)]
fn random_slot(key: &mut ServiceKey, count: u16) -> Option<u32> {
    // SAFETY: a plain helper call. Callers handle `count == 0`; `checked_rem` keeps a
    // panic path (which the verifier rejects) out of the program regardless.
    let pick = unsafe { bpf_get_prandom_u32() }.checked_rem(u32::from(count))?;
    key.slot = pick as u16 + 1;
    // SAFETY: copied out at once.
    let slot = unsafe { *SERVICES.get_ptr(&*key)? };
    Some(slot.backend_id)
}

/// sessionAffinity ClientIP: the backend this client used within the timeout, else a new
/// random one that is remembered. `client` is the socket's network namespace cookie for
/// the socket programs (one per pod, hence one per pod IP) and the client's IPv4 address
/// (with `AFFINITY_CLIENT_ADDR`) for the packet programs. The entry is the Service port's
/// (`affinity_id`), not the frontend's: the client keeps its backend through any address
/// of the Service whose live slots hold it.
///
/// A BPF subprogram, not inlined: inlined into `ekp_pod_in`, LLVM gave the affinity entry's
/// spilled pointer a stack slot that the hairpin path then reads as a 32-bit address, and
/// the verifier rejected the program ("invalid size of register spill").
#[inline(never)]
fn sticky_backend(client: u64, key: &mut ServiceKey, frontend: &ServiceValue) -> Option<u32> {
    let affinity_key = AffinityKey {
        client,
        affinity_id: if frontend.affinity_id != 0 {
            frontend.affinity_id
        } else {
            frontend.rev_nat_id
        },
        _pad: [0; 6],
    };
    let now = now_secs();
    if let Some(entry) = AFFINITY.get_ptr_mut(&affinity_key) {
        // SAFETY: the entry stays valid for this program run; a racing update of
        // `last_used` from another CPU is harmless.
        let remembered = unsafe { *entry };
        let fresh = seconds_since(remembered.last_used, now) <= frontend.affinity_timeout;
        // Only a backend the frontend still has, among its live slots, as kube-proxy's
        // `recent` lists exist only for the Service's current endpoints. The agent deletes
        // the entries of a backend that left, but not those a failed sync, or a restart
        // between its writes and that deletion, left behind: their id may since name
        // another Service's backend.
        let mut still_ours = || {
            let Some(backend) = backend(remembered.backend_id) else {
                return false;
            };
            let slot = find_slot(key, frontend.count, backend.addr, backend.port, false);
            // The search matched the slot's backend by address (one id per address); the
            // slot read again still names the remembered id unless the agent rewrote it
            // in between.
            key.slot = slot;
            slot != 0 && slot_backend_id(key) == remembered.backend_id
        };
        if fresh && still_ours() {
            unsafe { (*entry).last_used = now };
            return Some(remembered.backend_id);
        }
    }
    let backend_id = random_backend(key, frontend)?;
    let value = AffinityValue {
        backend_id,
        last_used: now,
    };
    // Without room in the LRU the connection still works, only without stickiness.
    let _ = AFFINITY.insert(&affinity_key, &value, 0);
    Some(backend_id)
}
