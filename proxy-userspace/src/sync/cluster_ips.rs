//! The ClusterIPs of the Services served (map `ekp_cip_v1`): the programs refuse traffic to
//! one of them that no frontend takes (a port or protocol its Service does not define), as
//! kube-proxy's nftables mode rejects traffic to its `cluster-ips` set that its
//! `service-ips` map does not take. Without it, such a connection leaves the node for an
//! address nothing serves and hangs until it times out.
//!
//! An address is in the map while a ClusterIP frontend of the internal scope has its slot 0
//! programmed there, and the map follows the frontends: an address is written after the
//! write that made it a ClusterIP, and deleted just before the write that takes its last
//! ClusterIP frontend away (its slot 0 deleted, or rewritten as another kind's). So no
//! port of a Service is refused while it is served, and none of an address left without
//! frontends. The frontends are counted per address as their writes are mirrored, so a
//! sync's work follows the change, not the number of Services.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use proxy_common::SVC_FLAG_CLUSTER_IP;

use super::{Op, Programmed};
use crate::model::{FrontendKey, Scope};

/// The map's entries, and what they should be.
#[derive(Debug, Default)]
pub struct ClusterIps {
    /// Programmed ClusterIP frontends per address (ports and protocols).
    frontends: BTreeMap<Ipv4Addr, usize>,
    /// The addresses the map holds.
    written: BTreeSet<Ipv4Addr>,
    /// Addresses whose entry may differ from `frontends` ([`ClusterIps::due`]).
    due: BTreeSet<Ipv4Addr>,
}

/// Whether `key` is a ClusterIP frontend whose slot 0 is programmed.
pub fn is_cluster_ip(programmed: &Programmed, key: &FrontendKey) -> bool {
    key.scope == Scope::Internal
        && programmed
            .frontends
            .get(key)
            .is_some_and(|f| f.flags & SVC_FLAG_CLUSTER_IP != 0)
}

/// The ClusterIP frontend `op` takes away, if it does: the delete of its slot 0, or a
/// rewrite of it as another kind's. Such an op starts a run of writes of its own, so that
/// [`ClusterIps::before`] sees the frontends as they are just before it.
pub fn takes_away<'a>(programmed: &Programmed, op: &'a Op) -> Option<&'a FrontendKey> {
    let (frontend, stays) = match op {
        Op::DeleteFrontend { frontend } => (frontend, false),
        Op::PutFrontend {
            frontend, flags, ..
        } => (frontend, flags & SVC_FLAG_CLUSTER_IP != 0),
        _ => return None,
    };
    (!stays && is_cluster_ip(programmed, frontend)).then_some(frontend)
}

impl ClusterIps {
    /// The entries the map holds (`written`), to be made those of `programmed`'s ClusterIP
    /// frontends by the next writes [`ClusterIps::due`].
    pub fn adopt(programmed: &Programmed, written: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        let mut frontends = BTreeMap::new();
        for key in programmed.frontends.keys() {
            if is_cluster_ip(programmed, key) {
                *frontends.entry(key.addr).or_insert(0) += 1;
            }
        }
        let written: BTreeSet<Ipv4Addr> = written.into_iter().collect();
        let due = frontends.keys().chain(&written).copied().collect();
        ClusterIps {
            frontends,
            written,
            due,
        }
    }

    /// A write to the frontend `key` was mirrored: it was a programmed ClusterIP frontend
    /// before (`was`), and is one after (`is`).
    pub fn frontend_written(&mut self, key: &FrontendKey, was: bool, is: bool) {
        match (was, is) {
            (false, true) => *self.frontends.entry(key.addr).or_insert(0) += 1,
            (true, false) => {
                if let Some(n) = self.frontends.get_mut(&key.addr) {
                    *n -= 1;
                    if *n == 0 {
                        self.frontends.remove(&key.addr);
                    }
                }
            }
            _ => return,
        }
        self.due.insert(key.addr);
    }

    /// Before `op` is written: the address whose last ClusterIP frontend it takes away
    /// (deleting its slot 0, or rewriting it as another kind's), to be deleted from the map
    /// first. The address stays due, so that it is put back if `op` then fails. `op` must
    /// be written on its own or first in its run of writes ([`takes_away`]): later in a run,
    /// `programmed` would not show the writes before it.
    pub fn before(&mut self, programmed: &Programmed, op: &Op) -> Option<Ipv4Addr> {
        let frontend = takes_away(programmed, op)?;
        let last =
            self.frontends.get(&frontend.addr) == Some(&1) && self.written.contains(&frontend.addr);
        if last {
            self.due.insert(frontend.addr);
        }
        last.then_some(frontend.addr)
    }

    /// The addresses the map holds, counted (the map-fill metric).
    pub fn written_count(&self) -> usize {
        self.written.len()
    }

    /// The writes that make the map hold the addresses of the programmed ClusterIP
    /// frontends: the addresses to put, and those to delete (each recorded by
    /// [`ClusterIps::wrote`] once written; the others stay due).
    pub fn due(&mut self) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
        let ClusterIps {
            frontends,
            written,
            due,
        } = self;
        let (mut puts, mut deletes) = (Vec::new(), Vec::new());
        due.retain(|addr| {
            match (frontends.contains_key(addr), written.contains(addr)) {
                (true, false) => puts.push(*addr),
                (false, true) => deletes.push(*addr),
                _ => return false,
            }
            true
        });
        (puts, deletes)
    }

    /// `addr` was put in the map (`present`) or deleted from it.
    pub fn wrote(&mut self, addr: Ipv4Addr, present: bool) {
        if present {
            self.written.insert(addr);
        } else {
            self.written.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::{SVC_FLAG_EXTERNAL_IP, SVC_FLAG_NODE_PORT};

    use super::*;
    use crate::model::Protocol;
    use crate::sync::ProgrammedFrontend;

    fn key(host: u8, port: u16, proto: Protocol, scope: Scope) -> FrontendKey {
        FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, host),
            port,
            proto,
            scope,
        }
    }

    fn frontend(flags: u16) -> ProgrammedFrontend {
        ProgrammedFrontend {
            rev_nat_id: 1,
            flags,
            affinity_timeout: 0,
            affinity_id: 0,
            count: 0,
            slots: BTreeMap::new(),
        }
    }

    /// The write of `key`'s slot 0 with `flags` (no backends).
    fn put_frontend(key: FrontendKey, flags: u16) -> Op {
        Op::PutFrontend {
            frontend: key,
            count: 0,
            rev_nat_id: 1,
            flags,
            affinity_timeout: 0,
            affinity_id: 0,
        }
    }

    /// One ClusterIP frontend programmed, its address in the map, nothing due.
    fn one_cluster_ip_in_the_map() -> (Programmed, FrontendKey, ClusterIps) {
        let mut p = Programmed::default();
        let cip = key(1, 80, Protocol::Tcp, Scope::Internal);
        p.frontends.insert(cip, frontend(SVC_FLAG_CLUSTER_IP));
        let mut ips = ClusterIps::adopt(&p, [cip.addr]);
        assert_eq!(ips.due(), (vec![], vec![]));
        (p, cip, ips)
    }

    /// Writes what is due, as the syncer does, recording the map's writes in `log`.
    fn write(ips: &mut ClusterIps, log: &mut Vec<String>) {
        let (puts, deletes) = ips.due();
        for addr in puts {
            log.push(format!("put {addr}"));
            ips.wrote(addr, true);
        }
        for addr in deletes {
            log.push(format!("delete {addr}"));
            ips.wrote(addr, false);
        }
    }

    /// `op` written to the frontend `key` of `p`: `before` (its delete recorded in `log`),
    /// then the mirror's change to `is_cluster_ip` (`None`: the write failed).
    fn written(
        ips: &mut ClusterIps,
        p: &mut Programmed,
        op: &Op,
        after: Option<Option<ProgrammedFrontend>>,
        log: &mut Vec<String>,
    ) {
        if let Some(addr) = ips.before(p, op) {
            log.push(format!("delete {addr} before"));
            ips.wrote(addr, false);
        }
        let Some(after) = after else {
            return;
        };
        let key = *op.frontend().expect("a frontend's op");
        let was = is_cluster_ip(p, &key);
        match after {
            Some(f) => p.frontends.insert(key, f),
            None => p.frontends.remove(&key),
        };
        ips.frontend_written(&key, was, is_cluster_ip(p, &key));
    }

    #[test]
    fn only_internal_cluster_ip_frontends_with_a_slot_0_make_an_address_a_cluster_ip() {
        let mut p = Programmed::default();
        let cip = key(1, 80, Protocol::Tcp, Scope::Internal);
        let twin = key(2, 80, Protocol::Tcp, Scope::External);
        let external_ip = key(3, 80, Protocol::Tcp, Scope::Internal);
        let node_port = key(4, 30080, Protocol::Tcp, Scope::Internal);
        let half_deleted = key(5, 80, Protocol::Tcp, Scope::Internal);
        p.frontends.insert(cip, frontend(SVC_FLAG_CLUSTER_IP));
        p.frontends.insert(twin, frontend(SVC_FLAG_CLUSTER_IP));
        p.frontends
            .insert(external_ip, frontend(SVC_FLAG_EXTERNAL_IP));
        p.frontends.insert(node_port, frontend(SVC_FLAG_NODE_PORT));
        let mut slots_only = frontend(0);
        slots_only.slots.insert(1, 7);
        p.frontends.insert(half_deleted, slots_only);
        let mut ips = ClusterIps::adopt(&p, []);
        let mut log = Vec::new();
        write(&mut ips, &mut log);
        assert_eq!(log, ["put 10.96.0.1"]);
        assert_eq!(ips.due(), (vec![], vec![]), "nothing left to write");
    }

    #[test]
    fn adoption_deletes_what_no_frontend_wants_and_keeps_what_one_does() {
        let mut p = Programmed::default();
        let cip = key(1, 80, Protocol::Tcp, Scope::Internal);
        p.frontends.insert(cip, frontend(SVC_FLAG_CLUSTER_IP));
        let gone = Ipv4Addr::new(10, 96, 0, 9);
        let mut ips = ClusterIps::adopt(&p, [cip.addr, gone]);
        let mut log = Vec::new();
        write(&mut ips, &mut log);
        assert_eq!(log, ["delete 10.96.0.9"]);
    }

    #[test]
    fn an_address_goes_with_its_last_port_and_protocol_just_before_its_slot_0() {
        let mut p = Programmed::default();
        let mut ips = ClusterIps::adopt(&p, []);
        let tcp = key(1, 53, Protocol::Tcp, Scope::Internal);
        let udp = key(1, 53, Protocol::Udp, Scope::Internal);
        let mut log = Vec::new();
        for k in [tcp, udp] {
            let put = put_frontend(k, SVC_FLAG_CLUSTER_IP);
            let f = frontend(SVC_FLAG_CLUSTER_IP);
            written(&mut ips, &mut p, &put, Some(Some(f)), &mut log);
        }
        write(&mut ips, &mut log);
        // Another protocol of the address left: the address stays.
        let delete_tcp = Op::DeleteFrontend { frontend: tcp };
        written(&mut ips, &mut p, &delete_tcp, Some(None), &mut log);
        write(&mut ips, &mut log);
        // The last: deleted before its slot 0, nothing left to write after it.
        let delete_udp = Op::DeleteFrontend { frontend: udp };
        written(&mut ips, &mut p, &delete_udp, Some(None), &mut log);
        write(&mut ips, &mut log);
        assert_eq!(log, ["put 10.96.0.1", "delete 10.96.0.1 before"]);
    }

    #[test]
    fn a_last_frontend_rewritten_as_another_kind_takes_its_address_first() {
        let (mut p, cip, mut ips) = one_cluster_ip_in_the_map();
        let mut log = Vec::new();
        let as_external_ip = put_frontend(cip, SVC_FLAG_EXTERNAL_IP);
        let f = frontend(SVC_FLAG_EXTERNAL_IP);
        written(&mut ips, &mut p, &as_external_ip, Some(Some(f)), &mut log);
        write(&mut ips, &mut log);
        assert_eq!(log, ["delete 10.96.0.1 before"]);
    }

    #[test]
    fn an_address_deleted_before_a_slot_0_delete_that_failed_is_put_back() {
        let (mut p, cip, mut ips) = one_cluster_ip_in_the_map();
        let mut log = Vec::new();
        let delete = Op::DeleteFrontend { frontend: cip };
        written(&mut ips, &mut p, &delete, None, &mut log);
        write(&mut ips, &mut log);
        assert_eq!(log, ["delete 10.96.0.1 before", "put 10.96.0.1"]);
    }

    #[test]
    fn a_put_not_recorded_as_written_stays_due() {
        let mut ips = ClusterIps::adopt(&Programmed::default(), []);
        ips.frontend_written(&key(1, 80, Protocol::Tcp, Scope::Internal), false, true);
        let failed = ips.due();
        assert_eq!(failed, (vec![Ipv4Addr::new(10, 96, 0, 1)], vec![]));
        let mut log = Vec::new();
        write(&mut ips, &mut log);
        assert_eq!(log, ["put 10.96.0.1"]);
    }
}
