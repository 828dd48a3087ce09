//! The bits of the north-south prefilter (`proxy_common::NsFilter`, map `ekp_nsfilt_v1`),
//! written before the frontends and backends they stand for.
//!
//! `ekp_tcx_in` passes at once a packet whose destination (address, port) has no bit in
//! the incoming filter (nor in the SNAT marks the programs keep themselves), `ekp_tcx_out`
//! one whose source has none in the outgoing filter. So the incoming filter holds every
//! external-scope frontend, the outgoing one every local backend, each set before the write
//! that makes it reachable, armed or not. An agent finds the filter off (`dataplane::load`
//! turns it off) and arms it once its first complete sync has written everything, with the
//! bits of all that is programmed and of every flow in the conntrack map, and no other: a
//! flow whose frontend or backend went keeps being translated from its conntrack entries
//! (as the kernel's conntrack keeps NAT flows after kube-proxy's rules are gone), flows of
//! an agent that kept no filter (an older version) are served too, and the bits of what
//! went and of flows that ended are gone. While it runs, the agent only adds bits (a stale
//! bit only costs its packets the lookups; which are stale is known only from a walk of the
//! conntrack map): they are cleared when the next agent starts.

use anyhow::Result;
use proxy_common::{CT_DIR_OUT, NS_FILTER_IN, NS_FILTER_OUT, NatCtKey, NsFilter, SCOPE_EXTERNAL};

use super::{Op, Programmed};
use crate::abi;
use crate::model::{BackendAddr, FrontendKey};

/// The filters, and whether they are armed.
pub struct NsFilters {
    incoming: Box<NsFilter>,
    outgoing: Box<NsFilter>,
    armed: bool,
    /// Whether the incoming, the outgoing filter has bits its map entry lacks (a write
    /// failed): written at the next sync, grown or not.
    unwritten: (bool, bool),
}

impl NsFilters {
    /// No bit, not armed. The pinned bits are not adopted: they may stand for frontends,
    /// backends and flows long gone, and the filter is off until [`NsFilters::arm`] sets
    /// the bits of what is there.
    pub fn unarmed() -> Self {
        NsFilters {
            incoming: Box::new(NsFilter::EMPTY),
            outgoing: Box::new(NsFilter::EMPTY),
            armed: false,
            unwritten: (false, false),
        }
    }

    pub fn armed(&self) -> bool {
        self.armed
    }

    /// Before `ops` are written: the bits they need go first, through `write` (entry,
    /// value). Armed or not: a failed arming may have left an entry armed in the map.
    pub fn before(
        &mut self,
        ops: &[Op],
        mut write: impl FnMut(u32, &NsFilter) -> Result<()>,
    ) -> Result<()> {
        let (grew_in, grew_out) = self.grow(ops);
        self.unwritten.0 |= grew_in;
        self.unwritten.1 |= grew_out;
        if self.unwritten.0 {
            write(NS_FILTER_IN, &self.incoming)?;
            self.unwritten.0 = false;
        }
        if self.unwritten.1 {
            write(NS_FILTER_OUT, &self.outgoing)?;
            self.unwritten.1 = false;
        }
        Ok(())
    }

    /// After a sync wrote all it wanted, a filter not armed yet: sets the bits of all that
    /// is `programmed` and of the conntrack map's `flows`, then arms it. Two writes per
    /// entry, so that no reader sees it armed with bits half copied.
    pub fn arm(
        &mut self,
        programmed: &Programmed,
        flows: &[NatCtKey],
        mut write: impl FnMut(u32, &NsFilter) -> Result<()>,
    ) -> Result<()> {
        self.cover(programmed, flows);
        for armed in [0, 1] {
            self.incoming.armed = armed;
            self.outgoing.armed = armed;
            write(NS_FILTER_IN, &self.incoming)?;
            write(NS_FILTER_OUT, &self.outgoing)?;
        }
        self.armed = true;
        self.unwritten = (false, false);
        tracing::debug!(flows = flows.len(), "north-south prefilter armed");
        Ok(())
    }

    /// Sets the bits of the frontends and local backends `ops` write; whether each filter
    /// grew.
    fn grow(&mut self, ops: &[Op]) -> (bool, bool) {
        let (mut grew_in, mut grew_out) = (false, false);
        for op in ops {
            match op {
                Op::PutFrontend { frontend, .. } => grew_in |= self.add_frontend(frontend),
                Op::PutBackend {
                    backend,
                    local: true,
                    ..
                } => grew_out |= self.add_backend(backend),
                _ => {}
            }
        }
        (grew_in, grew_out)
    }

    /// Sets the bits of every programmed frontend and local backend, and of every flow's
    /// entry as its hook looks it up: the destination at ingress, the source at egress.
    fn cover(&mut self, programmed: &Programmed, flows: &[NatCtKey]) {
        for frontend in programmed.frontends.keys() {
            self.add_frontend(frontend);
        }
        for id in &programmed.local_backends {
            if let Some(backend) = programmed.backends.get(id) {
                self.add_backend(backend);
            }
        }
        for key in flows {
            if key.dir == CT_DIR_OUT {
                self.outgoing.insert(key.saddr, key.sport);
            } else {
                self.incoming.insert(key.daddr, key.dport);
            }
        }
    }

    fn add_frontend(&mut self, frontend: &FrontendKey) -> bool {
        let key = abi::service_key(frontend, 0);
        key.scope == SCOPE_EXTERNAL && self.incoming.insert(key.addr, key.port)
    }

    fn add_backend(&mut self, backend: &BackendAddr) -> bool {
        let value = abi::backend_value(backend, true);
        self.outgoing.insert(value.addr, value.port)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Protocol, Scope};
    use crate::sync::empty_frontend;
    use proxy_common::ServiceValue;

    /// Armed filters with no bit, as the map holds them.
    fn filters() -> NsFilters {
        let armed = NsFilter {
            armed: 1,
            ..NsFilter::EMPTY
        };
        NsFilters {
            incoming: Box::new(armed),
            outgoing: Box::new(armed),
            armed: true,
            unwritten: (false, false),
        }
    }

    fn frontend(addr: [u8; 4], port: u16, scope: Scope) -> FrontendKey {
        FrontendKey {
            addr: Ipv4Addr::from(addr),
            port,
            proto: Protocol::Tcp,
            scope,
        }
    }

    fn backend(addr: [u8; 4], port: u16) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::from(addr),
            port,
            proto: Protocol::Tcp,
        }
    }

    /// The (address, port) a packet carries, as the programs see it.
    fn wire(addr: [u8; 4], port: u16) -> (u32, u16) {
        (u32::from_ne_bytes(addr), port.to_be())
    }

    fn has(filter: &NsFilter, (addr, port): (u32, u16)) -> bool {
        filter.has(addr, port)
    }

    fn bits(filter: &NsFilter) -> u32 {
        filter.bits.iter().map(|w| w.count_ones()).sum()
    }

    /// A mirror holding `frontends` and `backends` (id, address, local).
    fn programmed(frontends: &[FrontendKey], backends: &[(u32, BackendAddr, bool)]) -> Programmed {
        let mut programmed = Programmed::default();
        for key in frontends {
            programmed
                .frontends
                .insert(*key, empty_frontend(&ServiceValue::default()));
        }
        for (id, backend, local) in backends {
            programmed.backends.insert(*id, *backend);
            if *local {
                programmed.local_backends.insert(*id);
            }
        }
        programmed
    }

    fn put_frontend(frontend: FrontendKey) -> Op {
        Op::PutFrontend {
            frontend,
            count: 1,
            rev_nat_id: 1,
            flags: 1,
            affinity_timeout: 0,
            affinity_id: 0,
        }
    }

    /// A plan's external frontends get incoming bits, its local backends outgoing ones;
    /// internal frontends (the socket programs' business) and remote backends (whose
    /// replies come in, to the SNAT address) none. The bits are the packet's view.
    #[test]
    fn a_plan_sets_the_bits_of_external_frontends_and_local_backends() {
        let node_port = frontend([192, 168, 77, 11], 30080, Scope::External);
        let cluster_ip = frontend([10, 96, 0, 10], 80, Scope::Internal);
        let ops = [
            Op::PutBackend {
                id: 1,
                backend: backend([10, 244, 1, 10], 8080),
                local: true,
            },
            Op::PutBackend {
                id: 2,
                backend: backend([10, 244, 2, 10], 8080),
                local: false,
            },
            put_frontend(cluster_ip),
            put_frontend(node_port),
        ];
        let mut f = filters();
        assert_eq!(f.grow(&ops), (true, true));
        assert!(has(&f.incoming, wire([192, 168, 77, 11], 30080)));
        assert!(has(&f.outgoing, wire([10, 244, 1, 10], 8080)));
        assert_eq!((bits(&f.incoming), bits(&f.outgoing)), (1, 1));
        // The same plan again adds nothing, and deletions clear nothing.
        assert_eq!(f.grow(&ops), (false, false));
        let deletions = [
            Op::DeleteFrontend {
                frontend: node_port,
            },
            Op::DeleteBackend { id: 1 },
        ];
        assert_eq!(f.grow(&deletions), (false, false));
        assert_eq!((bits(&f.incoming), bits(&f.outgoing)), (1, 1));
    }

    /// Arming covers what is programmed, whatever the plan that came before wrote.
    #[test]
    fn arming_covers_every_programmed_external_frontend_and_local_backend() {
        let programmed = programmed(
            &[
                frontend([192, 168, 77, 11], 30080, Scope::External),
                frontend([203, 0, 113, 7], 443, Scope::External),
                frontend([10, 96, 0, 10], 80, Scope::Internal),
            ],
            &[
                (1, backend([10, 244, 1, 10], 8080), true),
                (2, backend([10, 244, 2, 10], 8080), false),
            ],
        );
        let mut f = filters();
        f.cover(&programmed, &[]);
        assert!(has(&f.incoming, wire([192, 168, 77, 11], 30080)));
        assert!(has(&f.incoming, wire([203, 0, 113, 7], 443)));
        assert!(has(&f.outgoing, wire([10, 244, 1, 10], 8080)));
        assert_eq!((bits(&f.incoming), bits(&f.outgoing)), (2, 1));
    }

    /// Arming writes each entry twice: its bits with the filter off, then on, so that no
    /// program sees it on with bits half copied. Once armed, arming writes nothing.
    #[test]
    fn arming_writes_the_bits_before_it_turns_the_filter_on() {
        let programmed = programmed(
            &[frontend([192, 168, 77, 11], 30080, Scope::External)],
            &[(1, backend([10, 244, 1, 10], 8080), true)],
        );
        // Flows the conntrack map holds, of frontends and backends no longer programmed
        // (an older agent's): the client -> frontend entry is looked up at ingress by its
        // destination, the local backend's reply entry at egress by its source.
        let flow = |(saddr, sport): (u32, u16), (daddr, dport): (u32, u16), dir| NatCtKey {
            saddr,
            daddr,
            sport,
            dport,
            proto: proxy_common::PROTO_TCP,
            dir,
            _pad: [0; 2],
        };
        let client = wire([198, 51, 100, 7], 40000);
        let flows = [
            flow(client, wire([203, 0, 113, 9], 443), proxy_common::CT_DIR_IN),
            flow(wire([10, 244, 1, 11], 9090), client, CT_DIR_OUT),
        ];
        let mut f = NsFilters::unarmed();
        let mut writes = Vec::new();
        f.arm(&programmed, &flows, |entry: u32, filter: &NsFilter| {
            writes.push((entry, filter.armed, bits(filter)));
            Ok(())
        })
        .expect("arming");
        assert!(f.armed());
        assert_eq!(
            writes,
            [
                (NS_FILTER_IN, 0, 2),
                (NS_FILTER_OUT, 0, 2),
                (NS_FILTER_IN, 1, 2),
                (NS_FILTER_OUT, 1, 2)
            ]
        );
        assert!(has(&f.incoming, wire([203, 0, 113, 9], 443)));
        assert!(has(&f.outgoing, wire([10, 244, 1, 11], 9090)));
        assert!(!has(&f.incoming, client) && !has(&f.outgoing, client));
    }

    /// A plan's new bits are written before it; bits a failed write left out are written
    /// at the next sync, even one that adds none. Unarmed too: a failed arming may have
    /// left an entry armed in the map.
    #[test]
    fn new_bits_go_out_before_the_plan_and_a_failed_write_is_made_again() {
        let ops = [put_frontend(frontend(
            [192, 168, 77, 11],
            30080,
            Scope::External,
        ))];
        let mut f = filters();
        let failed = f.before(&ops, |_, _| Err(anyhow::anyhow!("the map refused")));
        assert!(failed.is_err());
        let mut writes = Vec::new();
        let mut record = |entry: u32, filter: &NsFilter| {
            writes.push((entry, filter.armed, bits(filter)));
            Ok(())
        };
        f.before(&[], &mut record).expect("the retry");
        f.before(&ops, &mut record).expect("nothing new");
        NsFilters::unarmed()
            .before(&ops, &mut record)
            .expect("unarmed");
        assert_eq!(writes, [(NS_FILTER_IN, 1, 1), (NS_FILTER_IN, 0, 1)]);
    }
}
