//! The sockets' reverse table (`ekp_sk_slot_v1`): where `connect4` and `sendmsg4` remember
//! a translation for `getpeername4`/`recvmsg4`, one slot per value of the socket cookie's
//! low bits.
//!
//! Written per new socket, the socket rev-NAT LRU's insert was most of `connect4`'s time:
//! a hash puts each new socket's entry in a random bucket of a 262144-bucket table, out of
//! the cache, under the LRU's locks. Cookies are handed out in sequence, so consecutive
//! sockets take neighbouring slots here: lines and pages that are already cached, and no
//! lock. A slot holds one backend: a slot still held by another live socket (one 262144
//! cookies older), or by this unconnected socket for another backend, sends the
//! translation to the LRU, so a live socket's translation is never overwritten, and the
//! socket's pin to its own storage (`sock_state`).
//!
//! The cookie word is the slot's lock and its validity: claimed atomically with
//! `SOCK_SLOT_BUSY` set, the rest written, then published with the plain cookie; freed by
//! `sock_release` with an atomic exchange back to 0.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xchg};

use proxy_common::{SOCK_SLOT_BUSY, SockRevNatValue, SockSlot, sock_slot_index};

use crate::maps::SOCK_SLOT_TABLE;

/// The slot of the socket with this cookie.
#[inline(always)]
fn slot_of(cookie: u64) -> Option<*mut SockSlot> {
    SOCK_SLOT_TABLE.get_ptr_mut(sock_slot_index(cookie))
}

// The bpf target has no `AtomicU64::compare_exchange` (its spec claims no CAS), but the
// instructions exist (BPF_ATOMIC, kernel 5.12+): the intrinsics reach them.

/// Sets the slot's cookie word to `new` if it holds `old`; true if it did.
#[inline(always)]
fn swap_cookie(slot: *mut SockSlot, old: u64, new: u64) -> bool {
    // SAFETY: map values live as long as the map, which outlives the program run; the
    // word is 8-byte aligned (the first field of a `repr(C)` array element).
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(
            &raw mut (*slot).cookie,
            old,
            new,
        )
        .1
    }
}

/// The slot's cookie word, read once (an aligned 8-byte load is never torn; the BPF
/// backend has no atomic load at the default CPU level).
#[inline(always)]
fn cookie_of(slot: *mut SockSlot) -> u64 {
    // SAFETY: as in `swap_cookie`.
    unsafe { core::ptr::read_volatile(&raw const (*slot).cookie) }
}

/// What [`remember`] did.
pub enum Remembered {
    /// The slot belongs to another socket, or to this one for another backend: the caller
    /// uses the LRU.
    Refused,
    /// The slot holds the translation.
    Held,
    /// The slot holds the translation in place of this socket's pin for another frontend
    /// (a connect to another frontend, or the same backend behind two frontends): that pin
    /// must be kept elsewhere.
    Displaced(SockRevNatValue, Pin),
}

/// Remembers that the socket `cookie` sends to `backend_addr:backend_port`, chosen from
/// the frontend's slot `backend_slot`, in place of `frontend`. The socket may replace what
/// its slot holds for another backend only if `replace`: it is connected (it can no longer
/// hear from the old one), or its pinned backend is gone (`pinned`).
#[inline(always)]
pub fn remember(
    cookie: u64,
    backend_addr: u32,
    backend_port: u16,
    backend_slot: u16,
    frontend: SockRevNatValue,
    replace: bool,
) -> Remembered {
    let Some(slot) = slot_of(cookie) else {
        return Remembered::Refused;
    };
    let held = cookie_of(slot);
    // SAFETY: only this socket writes a slot that carries its cookie; a racing thread of
    // the same socket loses the exchange below.
    let same_backend =
        || unsafe { (*slot).backend_addr == backend_addr && (*slot).backend_port == backend_port };
    let expected = if held == 0 {
        0
    } else if held == cookie && (replace || same_backend()) {
        cookie
    } else {
        return Remembered::Refused;
    };
    if !swap_cookie(slot, expected, cookie | SOCK_SLOT_BUSY) {
        return Remembered::Refused;
    }
    // SAFETY: the slot is ours while the word carries our busy cookie.
    let before = unsafe { *slot };
    unsafe {
        (*slot).backend_addr = backend_addr;
        (*slot).backend_port = backend_port;
        (*slot).backend_slot = backend_slot;
        (*slot).frontend = frontend;
    }
    // Published by an exchange, a full barrier: a reader that sees the cookie sees the rest.
    // SAFETY: as in `swap_cookie`.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(&raw mut (*slot).cookie, cookie) };
    if expected == cookie && before.frontend != frontend && before.backend_slot != 0 {
        return Remembered::Displaced(
            before.frontend,
            Pin {
                addr: before.backend_addr,
                port: before.backend_port,
                slot: before.backend_slot,
            },
        );
    }
    Remembered::Held
}

/// The frontend the socket `cookie` reached `addr:port` through, if its slot remembers one.
#[inline(always)]
pub fn recall(cookie: u64, addr: u32, port: u16) -> Option<SockRevNatValue> {
    let slot = slot_of(cookie)?;
    if cookie_of(slot) != cookie {
        return None;
    }
    // SAFETY: copied out at once.
    let held = unsafe { core::ptr::read_volatile(slot) };
    // Another thread of this socket (a reconnect, a send) may have rewritten it meanwhile.
    let unchanged = cookie_of(slot) == cookie;
    (unchanged && held.backend_addr == addr && held.backend_port == port).then_some(held.frontend)
}

/// The backend the socket `cookie` last sent to through `frontend`, and the frontend
/// slot it came from, if its slot remembers them.
#[inline(always)]
pub fn pinned(cookie: u64, frontend: SockRevNatValue) -> Option<Pin> {
    let slot = slot_of(cookie)?;
    if cookie_of(slot) != cookie {
        return None;
    }
    // SAFETY: copied out at once.
    let held = unsafe { core::ptr::read_volatile(slot) };
    let unchanged = cookie_of(slot) == cookie;
    (unchanged && held.frontend == frontend && held.backend_slot != 0).then_some(Pin {
        addr: held.backend_addr,
        port: held.backend_port,
        slot: held.backend_slot,
    })
}

/// What `pinned` finds: a backend address and port (network order), and its slot.
#[derive(Clone, Copy)]
pub struct Pin {
    pub addr: u32,
    pub port: u16,
    pub slot: u16,
}

/// Frees the socket's slot if it holds one; true if it did.
#[inline(always)]
pub fn forget(cookie: u64) -> bool {
    slot_of(cookie).is_some_and(|slot| cookie_of(slot) == cookie && swap_cookie(slot, cookie, 0))
}
