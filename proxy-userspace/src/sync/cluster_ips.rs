//! The ClusterIPs of the Services served (map `ekp_cip_v1`): the programs refuse traffic to
//! one of them that no frontend takes (a port or protocol its Service does not define), as
//! kube-proxy's nftables mode rejects traffic to its `cluster-ips` set that its
//! `service-ips` map does not take. Without it, such a connection leaves the node for an
//! address nothing serves and hangs until it times out.
//!
//! An address is in the map while a ClusterIP frontend of the internal scope has its slot 0
//! programmed there, and the map follows the frontends: an address is written after the
//! write that made it a ClusterIP, and deleted just before the write that removes its last
//! frontend's slot 0. So no port of a Service is refused while it is served, and none of an
//! address left without frontends. The frontends are counted per address as their writes
//! are mirrored, so a sync's work follows the change, not the number of Services.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::Result;
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
    /// Addresses whose entry may differ from `frontends`: written at the next [`write`].
    ///
    /// [`write`]: ClusterIps::write
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

impl ClusterIps {
    /// The entries the map holds (`written`), to be made those of `programmed`'s ClusterIP
    /// frontends at the next [`ClusterIps::write`].
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

    /// Before `op` is written: the slot 0 of the last ClusterIP frontend on an address
    /// takes the address with it, deleted first through `delete`.
    pub fn before(
        &mut self,
        programmed: &Programmed,
        op: &Op,
        delete: impl FnOnce(Ipv4Addr) -> Result<()>,
    ) -> Result<()> {
        let Op::DeleteFrontend { frontend } = op else {
            return Ok(());
        };
        let last = is_cluster_ip(programmed, frontend)
            && self.frontends.get(&frontend.addr) == Some(&1)
            && self.written.contains(&frontend.addr);
        if last {
            delete(frontend.addr)?;
            self.written.remove(&frontend.addr);
        }
        Ok(())
    }

    /// Writes the entries that differ from the frontends through `write` (address, whether
    /// it is wanted): puts an address that has some, deletes one that has none. An address
    /// whose write fails stays due.
    pub fn write(&mut self, mut write: impl FnMut(Ipv4Addr, bool) -> Result<()>) -> Result<()> {
        while let Some(addr) = self.due.first().copied() {
            let wanted = self.frontends.contains_key(&addr);
            if wanted != self.written.contains(&addr) {
                write(addr, wanted)?;
                if wanted {
                    self.written.insert(addr);
                } else {
                    self.written.remove(&addr);
                }
            }
            self.due.remove(&addr);
        }
        Ok(())
    }

    /// The addresses the map holds.
    #[cfg(test)]
    fn written(&self) -> &BTreeSet<Ipv4Addr> {
        &self.written
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

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

    /// Writes what is due, recording the map's writes in `log`.
    fn write(ips: &mut ClusterIps, log: &RefCell<Vec<String>>) {
        ips.write(|a, wanted| {
            let verb = if wanted { "put" } else { "delete" };
            log.borrow_mut().push(format!("{verb} {a}"));
            Ok(())
        })
        .expect("writes succeed");
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
        let log = RefCell::new(Vec::new());
        write(&mut ips, &log);
        assert_eq!(log.into_inner(), ["put 10.96.0.1"]);
        assert_eq!(
            ips.written().iter().copied().collect::<Vec<_>>(),
            [cip.addr]
        );
    }

    #[test]
    fn adoption_deletes_what_no_frontend_wants_and_keeps_what_one_does() {
        let mut p = Programmed::default();
        let cip = key(1, 80, Protocol::Tcp, Scope::Internal);
        p.frontends.insert(cip, frontend(SVC_FLAG_CLUSTER_IP));
        let gone = Ipv4Addr::new(10, 96, 0, 9);
        let mut ips = ClusterIps::adopt(&p, [cip.addr, gone]);
        let log = RefCell::new(Vec::new());
        write(&mut ips, &log);
        assert_eq!(log.into_inner(), ["delete 10.96.0.9"]);
    }

    #[test]
    fn an_address_goes_with_its_last_port_and_protocol() {
        let mut ips = ClusterIps::adopt(&Programmed::default(), []);
        let tcp = key(1, 53, Protocol::Tcp, Scope::Internal);
        let udp = key(1, 53, Protocol::Udp, Scope::Internal);
        let log = RefCell::new(Vec::new());
        ips.frontend_written(&tcp, false, true);
        ips.frontend_written(&udp, false, true);
        write(&mut ips, &log);
        // Slot writes to a frontend that stays change nothing.
        ips.frontend_written(&tcp, true, true);
        ips.frontend_written(&tcp, true, false);
        write(&mut ips, &log);
        ips.frontend_written(&udp, true, false);
        write(&mut ips, &log);
        assert_eq!(log.into_inner(), ["put 10.96.0.1", "delete 10.96.0.1"]);
        assert!(ips.written().is_empty());
    }

    #[test]
    fn the_last_frontends_slot_0_takes_its_address_first() {
        let mut p = Programmed::default();
        let tcp = key(1, 53, Protocol::Tcp, Scope::Internal);
        let udp = key(1, 53, Protocol::Udp, Scope::Internal);
        p.frontends.insert(tcp, frontend(SVC_FLAG_CLUSTER_IP));
        p.frontends.insert(udp, frontend(SVC_FLAG_CLUSTER_IP));
        let mut ips = ClusterIps::adopt(&p, []);
        let log = RefCell::new(Vec::new());
        write(&mut ips, &log);
        let delete = |p: &Programmed, ips: &mut ClusterIps, k: FrontendKey| {
            let op = Op::DeleteFrontend { frontend: k };
            ips.before(p, &op, |a| {
                log.borrow_mut().push(format!("delete {a} before"));
                Ok(())
            })
            .expect("delete succeeds");
        };
        // Not the last: the address stays.
        delete(&p, &mut ips, tcp);
        p.frontends.remove(&tcp);
        ips.frontend_written(&tcp, true, false);
        write(&mut ips, &log);
        // The last: deleted before its slot 0, and nothing is left to write after it.
        delete(&p, &mut ips, udp);
        p.frontends.remove(&udp);
        ips.frontend_written(&udp, true, false);
        write(&mut ips, &log);
        assert_eq!(
            log.into_inner(),
            ["put 10.96.0.1", "delete 10.96.0.1 before"]
        );
        assert!(ips.written().is_empty());
    }

    #[test]
    fn a_failed_write_is_tried_again_at_the_next() {
        let mut ips = ClusterIps::adopt(&Programmed::default(), []);
        ips.frontend_written(&key(1, 80, Protocol::Tcp, Scope::Internal), false, true);
        let failed = ips.write(|_, _| Err(anyhow::anyhow!("EPERM")));
        assert!(failed.is_err());
        assert!(ips.written().is_empty());
        let log = RefCell::new(Vec::new());
        write(&mut ips, &log);
        assert_eq!(log.into_inner(), ["put 10.96.0.1"]);
    }
}
