//! A socket's own storage (`ekp_sk_state_v1`, socket-local: created for a socket that needs
//! it, freed by the kernel with the socket, so nothing ages out and no cookie collides).
//! A socket without any costs one helper call that finds none. It holds:
//!
//! - the pins of a UDP socket that its slot in the sockets' reverse table cannot hold:
//!   those of the frontends after the first it sends to, and all of them when another live
//!   socket holds its slot. kube-proxy's conntrack keeps each of a socket's UDP flows (one
//!   per Service) on its endpoint; with one pin per socket, a client that alternates
//!   between two Services (a resolver asking two DNS Services, QUIC connections to two
//!   Services over one socket) had the second one's datagrams spread over its backends;
//! - whether the socket has translations in the socket rev-NAT LRU. The reverse hooks run
//!   for every datagram any UDP socket in the cgroup receives, servers included; a lookup
//!   in the LRU that finds nothing (a random bucket of 262144) cost them about 0.45 µs per
//!   datagram, and deleting a closing server connection's entry that was never there
//!   0.66-0.68 µs. Only marked sockets are looked up there now.

use aya_ebpf::Global;
use aya_ebpf::bindings::bpf_sock;
use aya_ebpf::helpers::generated::bpf_sk_storage_get;
use aya_ebpf::programs::SockAddrContext;
use proxy_common::{SOCK_PINS_PER_SOCKET, SOCK_STATE_IN_LRU, SockPin, SockRevNatValue, SockState};

use crate::maps::SOCK_STATE;
use crate::sock_slot::Pin;

/// The backend the socket sends to through `frontend`, if its storage holds a pin for it.
#[inline(always)]
pub fn pinned(ctx: &SockAddrContext, frontend: SockRevNatValue) -> Option<Pin> {
    // SAFETY: the helper takes the socket from the context and returns a pointer to this
    // socket's storage, valid for this run, or null.
    let pins = unsafe { SOCK_STATE.get_ptr_mut(ctx) };
    if pins.is_null() {
        return None;
    }
    for i in 0..SOCK_PINS_PER_SOCKET {
        // SAFETY: as above; copied out at once (another thread of the socket may write it:
        // a torn pin names a backend that `lb::pinned_backend` then fails to find).
        let pin: SockPin = unsafe { core::ptr::read_volatile(&raw const (*pins).pins[i]) };
        if pin.backend_slot != 0 && pin.frontend == frontend {
            return Some(Pin {
                addr: pin.backend_addr,
                port: pin.backend_port,
                slot: pin.backend_slot,
            });
        }
    }
    None
}

/// Non-zero when the agent adopted a socket rev-NAT LRU that an older version of the programs
/// filled without marking its sockets (set at load time, `EKP_UNMARKED_LRU`): until the
/// agent loads the programs again, every socket may have translations there.
#[unsafe(no_mangle)]
static EKP_UNMARKED_LRU: Global<u8> = Global::new(0);

/// Whether the socket may have translations in the socket rev-NAT LRU.
#[inline(always)]
pub fn in_lru(ctx: &SockAddrContext) -> bool {
    if EKP_UNMARKED_LRU.load() != 0 {
        return true;
    }
    // SAFETY: as in `pinned`.
    let state = unsafe { SOCK_STATE.get_ptr_mut(ctx) };
    // SAFETY: as above; a single byte.
    !state.is_null() && unsafe { (*state).flags } & SOCK_STATE_IN_LRU != 0
}

/// [`in_lru`] for `sock_release`, a cgroup sock program: its context is the socket itself,
/// which aya's `SkStorage` does not take, so the helper is called with the map's address.
#[inline(always)]
pub fn released_in_lru(sk: *mut bpf_sock) -> bool {
    if EKP_UNMARKED_LRU.load() != 0 {
        return true;
    }
    // SAFETY: the map's address is what the loader relocates a map reference to; `sk` is
    // the program's context, which the cgroup sock variant of the helper takes.
    let state = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCK_STATE).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockState>();
    // SAFETY: a single byte of this socket's storage, valid for this run.
    !state.is_null() && unsafe { (*state).flags } & SOCK_STATE_IN_LRU != 0
}

/// Marks the socket as having translations in the socket rev-NAT LRU, before it writes
/// one there. Without memory for the storage, the reverse hooks will not find them: the
/// application then sees the backend's address.
#[inline(always)]
pub fn mark_in_lru(ctx: &SockAddrContext) {
    // SAFETY: as in `pinned`; a new storage is zeroed.
    let state = unsafe { SOCK_STATE.get_or_insert_ptr_mut(ctx, None) };
    if state.is_null() {
        return;
    }
    // SAFETY: as above.
    unsafe {
        if (*state).flags & SOCK_STATE_IN_LRU == 0 {
            (*state).flags |= SOCK_STATE_IN_LRU;
        }
    }
}

/// Keeps `pin` as the socket's pin for `frontend`: in its entry for that frontend, else in
/// a free one, else in place of the next in turn. Without memory for the storage, the
/// datagrams to `frontend` choose a backend each.
#[inline(always)]
pub fn remember_pin(ctx: &SockAddrContext, frontend: SockRevNatValue, pin: Pin) {
    // SAFETY: as in `pinned`; a new storage is zeroed.
    let pins = unsafe { SOCK_STATE.get_or_insert_ptr_mut(ctx, None) };
    if pins.is_null() {
        return;
    }
    let mut entry = None;
    let mut free = None;
    for i in 0..SOCK_PINS_PER_SOCKET {
        // SAFETY: as above.
        let held: SockPin = unsafe { core::ptr::read_volatile(&raw const (*pins).pins[i]) };
        if held.backend_slot != 0 && held.frontend == frontend {
            entry = Some(i);
            break;
        }
        if held.backend_slot == 0 && free.is_none() {
            free = Some(i);
        }
    }
    let i = match entry.or(free) {
        Some(i) => i,
        None => {
            // SAFETY: as above.
            let next = usize::from(unsafe { (*pins).next }) % SOCK_PINS_PER_SOCKET;
            unsafe { (*pins).next = ((next + 1) % SOCK_PINS_PER_SOCKET) as u8 };
            next
        }
    };
    // SAFETY: as above.
    unsafe {
        (*pins).pins[i % SOCK_PINS_PER_SOCKET] = SockPin {
            frontend,
            backend_addr: pin.addr,
            backend_port: pin.port,
            backend_slot: pin.slot,
        };
    }
}
