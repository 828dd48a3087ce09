//! `list`: frontends and their backends as the pinned maps hold them, in the spirit of
//! `cilium-dbg service list`; `list --maps`, how full the maps are; `list --conntrack`, the
//! north-south flows (`cilium-dbg bpf ct list global`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use proxy_common::{
    CT_DIR_OUT, CT_FLAG_BACKEND_SYN, CT_FLAG_CLOSING, CT_FLAG_FIN_BACKEND,
    CT_FLAG_FIN_BACKEND_FIRST, CT_FLAG_FIN_CLIENT, CT_FLAG_REPLY, CT_FLAG_SEEN_REPLY, CT_FLAG_SNAT,
    NatCtKey, NatCtValue, PROTO_TCP, PROTO_UDP, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY,
    seconds_since,
};

use crate::abi;
use crate::conntrack_gc;
use crate::dataplane::{Conntrack, MapFill, Maps};
use crate::model::FrontendKind;
use crate::sync::Programmed;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedFrontend {
    /// The rev-NAT id, stable for the life of the frontend.
    pub id: u16,
    pub frontend: String,
    pub protocol: String,
    pub scope: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// sessionAffinity ClientIP timeout in seconds, if set.
    pub affinity_timeout: Option<u32>,
    /// What happens without backends: "refuse" (no endpoint at all) or "drop" (a `Local`
    /// traffic policy with none on this node).
    pub when_empty: String,
    /// `loadBalancerSourceRanges` admitted by an LB IP frontend (empty: anyone).
    pub source_ranges: Vec<String>,
    pub backends: Vec<ListedBackend>,
    /// Backends that take no new flow but keep the ones they have (a draining pod, one
    /// that is not ready, or left out by topology or a `Local` policy): the slots after
    /// the live ones.
    pub lingering: Vec<ListedBackend>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedBackend {
    pub slot: u16,
    pub id: u32,
    /// `addr:port`, or `<missing>` if the slot names a backend id that does not exist.
    pub address: String,
    /// The endpoint runs on this node: north-south traffic to it keeps the client address
    /// (others are source-NATed to the node).
    pub local: bool,
}

/// Reads the pinned maps under `pin_dir`.
pub fn read(pin_dir: &Path) -> Result<Vec<ListedFrontend>> {
    let maps = Maps::open_pinned(pin_dir)?;
    let programmed = Programmed::from_maps(&maps.read()?);
    let listed = |slot: u16, id: u32| ListedBackend {
        slot,
        id,
        address: programmed
            .backends
            .get(&id)
            .map(|b| format!("{}:{}", b.addr, b.port))
            .unwrap_or_else(|| "<missing>".into()),
        local: programmed.local_backends.contains(&id),
    };
    Ok(programmed
        .frontends
        .iter()
        .filter(|(_, f)| f.flags != 0)
        .map(|(key, f)| ListedFrontend {
            id: f.rev_nat_id,
            frontend: format!("{}:{}", key.addr, key.port),
            protocol: key.proto.to_string(),
            scope: key.scope.to_string(),
            kind: FrontendKind::from_flags(f.flags)
                .map(|k| k.to_string())
                .unwrap_or_else(|| format!("flags={:#x}", f.flags)),
            affinity_timeout: (f.flags & SVC_FLAG_AFFINITY != 0).then_some(f.affinity_timeout),
            when_empty: if f.flags & SVC_FLAG_DROP_EMPTY != 0 {
                "drop"
            } else {
                "refuse"
            }
            .into(),
            source_ranges: programmed
                .source_ranges
                .iter()
                .filter(|(id, _)| *id == f.rev_nat_id)
                .map(|(_, range)| range.to_string())
                .collect(),
            backends: (1..=f.count)
                .map(|slot| listed(slot, f.slots.get(&slot).copied().unwrap_or(0)))
                .collect(),
            lingering: f
                .slots
                .range(f.count.saturating_add(1)..)
                .map(|(slot, id)| listed(*slot, *id))
                .collect(),
        })
        .collect())
}

pub fn render_json(frontends: &[ListedFrontend]) -> Result<String> {
    Ok(serde_json::to_string_pretty(frontends)? + "\n")
}

pub fn render_text(frontends: &[ListedFrontend]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<24} {:<9} {:<12} BACKENDS (slot: id => address)",
        "ID", "FRONTEND", "SCOPE", "TYPE"
    );
    for f in frontends {
        let frontend = format!("{}/{}", f.frontend, f.protocol);
        let head = format!(
            "{:<5} {:<24} {:<9} {:<12} ",
            f.id, frontend, f.scope, f.kind
        );
        let mut notes = f
            .affinity_timeout
            .map(|t| format!(" (affinity {t}s)"))
            .unwrap_or_default();
        if !f.source_ranges.is_empty() {
            let _ = write!(notes, " (from {})", f.source_ranges.join(", "));
        }
        if f.backends.is_empty() {
            let what = if f.when_empty == "drop" {
                "none here: traffic dropped (Local policy)"
            } else {
                "none: connections refused"
            };
            let _ = writeln!(out, "{head}({what}){notes}");
        }
        // Without backends, the line above took the head and the notes.
        let lingering = f.lingering.iter().map(|b| (b, " (lingering)"));
        for (i, (b, state)) in f
            .backends
            .iter()
            .map(|b| (b, ""))
            .chain(lingering)
            .enumerate()
        {
            let first = i == 0 && !f.backends.is_empty();
            let lead = if first {
                head.clone()
            } else {
                " ".repeat(head.len())
            };
            let tail = if first { notes.as_str() } else { "" };
            let local = if b.local { " (local)" } else { "" };
            let _ = writeln!(
                out,
                "{lead}{}: {} => {}{local}{state}{tail}",
                b.slot, b.id, b.address
            );
        }
    }
    out
}

/// `list --maps`: how full each pinned map is.
pub fn render_maps_text(fills: &[MapFill]) -> String {
    let mut out = format!(
        "{:<18} {:>10} {:>10} {:>6}\n",
        "MAP", "ENTRIES", "CAPACITY", "USED"
    );
    for f in fills {
        let used = if f.capacity == 0 {
            0.0
        } else {
            f.entries as f64 * 100.0 / f64::from(f.capacity)
        };
        let _ = writeln!(
            out,
            "{:<18} {:>10} {:>10} {:>5.1}%",
            f.map, f.entries, f.capacity, used
        );
    }
    out
}

pub fn render_maps_json(fills: &[MapFill]) -> Result<String> {
    Ok(serde_json::to_string_pretty(fills)? + "\n")
}

/// One entry of the north-south conntrack map (`list --conntrack`), as Cilium's
/// `bpf ct list global` shows its own: the tuple a packet carries at the hook that looks
/// it up, and what that packet is rewritten to.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ListedFlow {
    pub protocol: String,
    /// The TCX hook on the node's devices: "ingress" or "egress".
    pub hook: String,
    /// "original" (client -> frontend) or "reply" (backend -> client, or -> the SNAT port).
    pub direction: String,
    /// `addr:port -> addr:port` as the packet arrives.
    pub tuple: String,
    /// `addr:port -> addr:port` after the rewrite.
    pub rewritten: String,
    pub backend_id: u32,
    /// The frontend's id (rev-NAT id, as in `list`).
    pub frontend_id: u16,
    /// `snat`, `seen-reply` (the backend answered), `closing` (a FIN or RST passed).
    pub flags: Vec<String>,
    pub idle_seconds: u32,
    /// Seconds left before the programs stop following it and the collector deletes it;
    /// 0: expired, or in its last second.
    pub expires_in_seconds: u32,
}

/// Reads the pinned conntrack map under `pin_dir`.
pub fn read_conntrack(pin_dir: &Path) -> Result<Vec<ListedFlow>> {
    let conntrack = Conntrack::open_pinned(pin_dir)?;
    let now = conntrack_gc::now_secs();
    let mut flows = Vec::new();
    conntrack.scan(|key, value| flows.push(listed_flow(&key, &value, now)))?;
    flows.sort_by(|a, b| {
        (&a.protocol, &a.direction, &a.tuple).cmp(&(&b.protocol, &b.direction, &b.tuple))
    });
    Ok(flows)
}

fn listed_flow(key: &NatCtKey, value: &NatCtValue, now: u32) -> ListedFlow {
    let endpoint =
        |addr: u32, port: u16| format!("{}:{}", abi::addr_from_net(addr), abi::port_from_net(port));
    let idle = seconds_since(value.last_seen, now);
    let flags = [
        (CT_FLAG_SNAT, "snat"),
        (CT_FLAG_BACKEND_SYN, "backend-syn"),
        (CT_FLAG_SEEN_REPLY, "seen-reply"),
        (CT_FLAG_FIN_CLIENT, "client-fin"),
        (CT_FLAG_FIN_BACKEND, "backend-fin"),
        (CT_FLAG_FIN_BACKEND_FIRST, "backend-closed-first"),
        (CT_FLAG_CLOSING, "closing"),
    ]
    .into_iter()
    .filter(|(bit, _)| value.flags & bit != 0)
    .map(|(_, name)| name.to_owned())
    .collect();
    ListedFlow {
        protocol: match key.proto {
            PROTO_TCP => "TCP".into(),
            PROTO_UDP => "UDP".into(),
            other => format!("proto {other}"),
        },
        hook: if key.dir == CT_DIR_OUT {
            "egress"
        } else {
            "ingress"
        }
        .into(),
        direction: if value.flags & CT_FLAG_REPLY != 0 {
            "reply"
        } else {
            "original"
        }
        .into(),
        tuple: format!(
            "{} -> {}",
            endpoint(key.saddr, key.sport),
            endpoint(key.daddr, key.dport)
        ),
        rewritten: format!(
            "{} -> {}",
            endpoint(value.saddr, value.sport),
            endpoint(value.daddr, value.dport)
        ),
        backend_id: value.backend_id,
        frontend_id: value.rev_nat_id,
        flags,
        idle_seconds: idle,
        expires_in_seconds: value.lifetime(key.proto).saturating_sub(idle),
    }
}

pub fn render_conntrack_text(flows: &[ListedFlow]) -> String {
    let mut out = format!(
        "{:<5} {:<8} {:<9} {:<44} {:<44} {:>7} {:>5} {:<24} {:>6} {:>8}\n",
        "PROTO",
        "HOOK",
        "DIRECTION",
        "TUPLE",
        "REWRITTEN",
        "BACKEND",
        "ID",
        "FLAGS",
        "IDLE",
        "EXPIRES"
    );
    for f in flows {
        let flags = if f.flags.is_empty() {
            "-".to_owned()
        } else {
            f.flags.join(",")
        };
        let _ = writeln!(
            out,
            "{:<5} {:<8} {:<9} {:<44} {:<44} {:>7} {:>5} {:<24} {:>5}s {:>7}s",
            f.protocol,
            f.hook,
            f.direction,
            f.tuple,
            f.rewritten,
            f.backend_id,
            f.frontend_id,
            flags,
            f.idle_seconds,
            f.expires_in_seconds
        );
    }
    out
}

pub fn render_conntrack_json(flows: &[ListedFlow]) -> Result<String> {
    Ok(serde_json::to_string_pretty(flows)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::CT_DIR_IN;

    fn listed(slot: u16, address: &str) -> ListedBackend {
        ListedBackend {
            slot,
            id: u32::from(slot) + 10,
            address: address.into(),
            local: slot == 1,
        }
    }

    fn frontend(backends: Vec<ListedBackend>, lingering: Vec<ListedBackend>) -> ListedFrontend {
        ListedFrontend {
            id: 3,
            frontend: "10.96.0.10:53".into(),
            protocol: "UDP".into(),
            scope: "internal".into(),
            kind: "ClusterIP".into(),
            affinity_timeout: None,
            when_empty: "refuse".into(),
            source_ranges: vec!["10.0.0.0/8".into()],
            backends,
            lingering,
        }
    }

    /// Lingering backends come after the live ones, marked; the head and the notes go on
    /// the first line, which is the "none" line when no backend is live.
    #[test]
    fn lingering_backends_are_listed_after_the_live_ones() {
        let both = frontend(
            vec![listed(1, "10.244.0.11:5353")],
            vec![listed(2, "10.244.0.10:5353")],
        );
        let only_lingering = frontend(Vec::new(), vec![listed(1, "10.244.0.10:5353")]);
        let text = render_text(&[both, only_lingering]);
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        let pad = " ".repeat(54);
        assert_eq!(
            lines[1..],
            [
                "3     10.96.0.10:53/UDP        internal  ClusterIP    \
                 1: 11 => 10.244.0.11:5353 (local) (from 10.0.0.0/8)"
                    .to_owned(),
                format!("{pad}2: 12 => 10.244.0.10:5353 (lingering)"),
                "3     10.96.0.10:53/UDP        internal  ClusterIP    \
                 (none: connections refused) (from 10.0.0.0/8)"
                    .to_owned(),
                format!("{pad}1: 11 => 10.244.0.10:5353 (local) (lingering)"),
            ]
        );
    }

    #[test]
    fn conntrack_entries_read_as_tuples_and_rewrites() {
        let net = |a: [u8; 4]| abi::addr_to_net(std::net::Ipv4Addr::from(a));
        let key = NatCtKey {
            saddr: net([198, 51, 100, 7]),
            daddr: net([192, 0, 2, 1]),
            sport: abi::port_to_net(40000),
            dport: abi::port_to_net(30080),
            proto: PROTO_TCP,
            dir: CT_DIR_IN,
            _pad: [0; 2],
        };
        let value = NatCtValue {
            saddr: net([192, 0, 2, 1]),
            daddr: net([10, 244, 2, 20]),
            sport: abi::port_to_net(61000),
            dport: abi::port_to_net(8080),
            backend_id: 2,
            rev_nat_id: 7,
            flags: CT_FLAG_SNAT | CT_FLAG_SEEN_REPLY,
            last_seen: 1000,
        };
        let flow = listed_flow(&key, &value, 1030);
        assert_eq!(
            flow,
            ListedFlow {
                protocol: "TCP".into(),
                hook: "ingress".into(),
                direction: "original".into(),
                tuple: "198.51.100.7:40000 -> 192.0.2.1:30080".into(),
                rewritten: "192.0.2.1:61000 -> 10.244.2.20:8080".into(),
                backend_id: 2,
                frontend_id: 7,
                flags: vec!["snat".into(), "seen-reply".into()],
                idle_seconds: 30,
                expires_in_seconds: proxy_common::CT_LIFETIME_TCP - 30,
            }
        );
        let closing = NatCtValue {
            flags: CT_FLAG_REPLY | CT_FLAG_CLOSING,
            ..value
        };
        let reply = listed_flow(
            &NatCtKey {
                dir: CT_DIR_OUT,
                ..key
            },
            &closing,
            1030,
        );
        assert_eq!(reply.hook, "egress");
        assert_eq!(reply.direction, "reply");
        assert_eq!(reply.flags, ["closing"]);
        assert_eq!(reply.expires_in_seconds, 0, "closed 30 s ago: expired");
        let text = render_conntrack_text(&[flow, reply]);
        assert!(
            text.lines()
                .nth(1)
                .is_some_and(|l| l.contains("198.51.100.7:40000 -> 192.0.2.1:30080")
                    && l.contains("snat,seen-reply")),
            "{text}"
        );
    }
}
