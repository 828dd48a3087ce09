//! `list`: frontends and their backends as the pinned maps hold them, in the spirit of
//! `cilium-dbg service list`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use proxy_common::{SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY};

use crate::dataplane::{MapFill, Maps};
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
    let programmed = Programmed::from_maps(&maps.read());
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
                .map(|slot| {
                    let id = f.slots.get(&slot).copied().unwrap_or(0);
                    let address = programmed
                        .backends
                        .get(&id)
                        .map(|b| format!("{}:{}", b.addr, b.port))
                        .unwrap_or_else(|| "<missing>".into());
                    let local = programmed.local_backends.contains(&id);
                    ListedBackend {
                        slot,
                        id,
                        address,
                        local,
                    }
                })
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
        for (i, b) in f.backends.iter().enumerate() {
            let lead = if i == 0 {
                head.clone()
            } else {
                " ".repeat(head.len())
            };
            let tail = if i == 0 { notes.as_str() } else { "" };
            let local = if b.local { " (local)" } else { "" };
            let _ = writeln!(
                out,
                "{lead}{}: {} => {}{local}{tail}",
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
