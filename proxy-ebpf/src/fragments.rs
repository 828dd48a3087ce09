//! IPv4 fragments of translated flows (Cilium's fragment tracking). Only a datagram's first
//! fragment carries its ports; when the programs translate it, they remember the ports under
//! what all its fragments share (addresses, IP id, protocol), and the later fragments take
//! them from there to find the first one's flow. Those are rewritten at L3 only: the L4
//! checksum, in the first fragment, already accounts for their new addresses.
//!
//! A later fragment that finds nothing (it overtook its first, or its datagram is not ours)
//! passes untouched, as every fragment did before. A first fragment clears what an earlier
//! datagram with the same key left.

use proxy_common::{FragmentKey, FragmentPorts};

use crate::maps::FRAGMENTS;
use crate::parse::{Fragment, Packet};

#[inline(always)]
fn key(pkt: &Packet) -> FragmentKey {
    FragmentKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        id: pkt.id,
        proto: pkt.proto,
        _pad: 0,
    }
}

/// `pkt` with its ports: for a later fragment, those its first fragment left; `None` when
/// it left none. A first fragment forgets what an earlier datagram with the same key left
/// (IP ids count per address pair and come round): its later fragments are its own, and
/// must not take another datagram's ports when it is not translated (Cilium records every
/// first fragment for the same reason).
#[inline(always)]
pub fn with_ports(pkt: Packet) -> Option<Packet> {
    if pkt.fragment == Fragment::First {
        let _ = FRAGMENTS.remove(&key(&pkt));
    }
    if pkt.fragment != Fragment::Later {
        return Some(pkt);
    }
    // SAFETY: copied out at once.
    let ports = unsafe { *FRAGMENTS.get_ptr(&key(&pkt))? };
    Some(Packet {
        sport: ports.sport,
        dport: ports.dport,
        ..pkt
    })
}

/// Called for a packet about to be translated: a first fragment leaves its ports (as it
/// arrived) for the later ones.
#[inline(always)]
pub fn remember(pkt: &Packet) {
    if pkt.fragment == Fragment::First {
        let ports = FragmentPorts {
            sport: pkt.sport,
            dport: pkt.dport,
        };
        // Without room, the later fragments pass untranslated, as without this map.
        let _ = FRAGMENTS.insert(&key(pkt), &ports, 0);
    }
}
