//! The pins of a UDP socket that its slot in the sockets' reverse table cannot hold
//! (`ekp_sk_pin_v1`): those of the frontends after the first it sends to, and all of them
//! when another live socket holds its slot. kube-proxy's conntrack keeps each of a socket's
//! UDP flows (one per Service) on its endpoint; with one pin per socket, a client that
//! alternates between two Services (a resolver asking two DNS Services, QUIC connections to
//! two Services over one socket) had the second one's datagrams spread over its backends.
//!
//! Socket-local storage: created for such a socket only, freed by the kernel with it, so
//! nothing ages out and no cookie collides. A socket without any costs one helper call
//! that finds none.

use aya_ebpf::programs::SockAddrContext;
use proxy_common::{SOCK_PINS_PER_SOCKET, SockPin, SockRevNatValue};

use crate::maps::SOCK_PINS;
use crate::sock_slot::Pin;

/// The backend the socket sends to through `frontend`, if its storage holds a pin for it.
#[inline(always)]
pub fn pinned(ctx: &SockAddrContext, frontend: SockRevNatValue) -> Option<Pin> {
    // SAFETY: the helper takes the socket from the context and returns a pointer to this
    // socket's storage, valid for this run, or null.
    let pins = unsafe { SOCK_PINS.get_ptr_mut(ctx) };
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

/// Keeps `pin` as the socket's pin for `frontend`: in its entry for that frontend, else in
/// a free one, else in place of the next in turn. Without memory for the storage, the
/// datagrams to `frontend` choose a backend each.
#[inline(always)]
pub fn remember(ctx: &SockAddrContext, frontend: SockRevNatValue, pin: Pin) {
    // SAFETY: as in `pinned`; a new storage is zeroed.
    let pins = unsafe { SOCK_PINS.get_or_insert_ptr_mut(ctx, None) };
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
