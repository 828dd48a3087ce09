//! `list`: frontends and their backends as the pinned maps hold them, in the spirit of
//! `cilium-dbg service list`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::dataplane::Maps;
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
    pub backends: Vec<ListedBackend>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedBackend {
    pub slot: u16,
    pub id: u32,
    /// `addr:port`, or `<missing>` if the slot names a backend id that does not exist.
    pub address: String,
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
            backends: (1..=f.count)
                .map(|slot| {
                    let id = f.slots.get(&slot).copied().unwrap_or(0);
                    let address = programmed
                        .backends
                        .get(&id)
                        .map(|b| format!("{}:{}", b.addr, b.port))
                        .unwrap_or_else(|| "<missing>".into());
                    ListedBackend { slot, id, address }
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
        if f.backends.is_empty() {
            let _ = writeln!(out, "{head}(none: connections refused)");
        }
        for (i, b) in f.backends.iter().enumerate() {
            let lead = if i == 0 {
                head.clone()
            } else {
                " ".repeat(head.len())
            };
            let _ = writeln!(out, "{lead}{}: {} => {}", b.slot, b.id, b.address);
        }
    }
    out
}
