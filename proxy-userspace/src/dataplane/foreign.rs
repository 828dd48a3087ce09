//! Programs of ours that this agent did not attach, where its own run: on its cgroup (or
//! an ancestor, whose programs run for the same sockets) and on the devices it serves.
//!
//! Two agents on two pin directories (a release renamed, `bpf.pinPath` changed without the
//! cleanup its comment asks for, a hand-started `run` beside the DaemonSet's) both
//! translate: the pin-directory lock cannot see each other's. Once the other stops, its
//! pinned links keep its programs attached on maps nobody updates, and they translate a
//! socket or a packet before this agent's programs see it: new and removed Services would
//! then look unapplied on the node. Found by name (the kernel keeps 15 bytes of it) among
//! the programs attached there, with an id other than the ones loaded by this process.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result};

use super::{POD_HOOKS, SOCK_PROGRAMS, TCX_PROGRAMS, bpf_sys};

/// `BPF_F_QUERY_EFFECTIVE`: a cgroup's programs with its ancestors'.
const QUERY_EFFECTIVE: u32 = 1;

/// The `bpf_attach_type`s of the socket programs: `BPF_CGROUP_INET4_CONNECT`,
/// `_INET6_CONNECT`, `_UDP4_SENDMSG`, `_UDP4_RECVMSG`, `_UDP6_RECVMSG`,
/// `_INET4_GETPEERNAME`, `_INET6_GETPEERNAME`, `_INET_SOCK_RELEASE`.
const CGROUP_HOOKS: [u32; 8] = [10, 11, 14, 19, 20, 29, 30, 34];

/// `BPF_TCX_INGRESS` and `BPF_TCX_EGRESS`.
const TCX_HOOKS: [(u32, &str); 2] = [(46, "ingress"), (47, "egress")];

/// A program of ours attached by someone else.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Foreign {
    /// Its name as the kernel keeps it.
    pub program: String,
    /// Its id (`bpftool prog show id N`, `bpftool link` names the link holding it).
    pub id: u32,
    /// Where: `cgroup <path>` or `<device> ingress|egress`.
    pub at: String,
}

/// The foreign programs on `cgroup` and `devices` (name, ifindex), given the ids of the
/// programs this process loaded. A device gone meanwhile is skipped.
pub(super) fn find(
    cgroup: &Path,
    devices: &[(String, u32)],
    ours: &BTreeSet<u32>,
) -> Result<Vec<Foreign>> {
    let dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let mut attached: Vec<(u32, String)> = Vec::new();
    for hook in CGROUP_HOOKS {
        let ids = bpf_sys::prog_query(dir.as_raw_fd() as u32, hook, QUERY_EFFECTIVE)
            .with_context(|| format!("listing the programs of cgroup {}", cgroup.display()))?;
        attached.extend(
            ids.into_iter()
                .map(|id| (id, format!("cgroup {}", cgroup.display()))),
        );
    }
    for (device, ifindex) in devices {
        for (hook, direction) in TCX_HOOKS {
            match bpf_sys::prog_query(*ifindex, hook, 0) {
                Ok(ids) => attached.extend(
                    ids.into_iter()
                        .map(|id| (id, format!("{device} {direction}"))),
                ),
                Err(e) if !crate::devices::still_present(device, *ifindex) => {
                    tracing::debug!(device = %device, "device gone while listing its programs ({e:#})");
                }
                Err(e) => return Err(e.context(format!("listing the TCX programs of {device}"))),
            }
        }
    }
    attached.retain(|(id, _)| !ours.contains(id));
    if attached.is_empty() {
        return Ok(Vec::new());
    }
    let names: BTreeSet<&str> = SOCK_PROGRAMS
        .iter()
        .chain(&TCX_PROGRAMS)
        .chain(POD_HOOKS.iter().map(|(name, _)| name))
        .map(|name| kernel_name(name))
        .collect();
    // Every program's name, by id: one walk over the node's programs.
    let by_id: BTreeMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(|info| info.ok())
        .filter_map(|info| Some((info.id(), info.name_as_str()?.to_owned())))
        .collect();
    let mut found: Vec<Foreign> = attached
        .into_iter()
        .filter_map(|(id, at)| {
            let name = by_id.get(&id)?;
            names.contains(name.as_str()).then(|| Foreign {
                program: name.clone(),
                id,
                at,
            })
        })
        .collect();
    found.sort();
    found.dedup();
    Ok(found)
}

/// A program's name as the kernel keeps it (`BPF_OBJ_NAME_LEN`: 15 bytes and a NUL).
fn kernel_name(name: &str) -> &str {
    name.get(..15).unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_keeps_fifteen_bytes_of_a_name() {
        assert_eq!(kernel_name("ekp_sock_release"), "ekp_sock_releas");
        assert_eq!(kernel_name("ekp_connect4"), "ekp_connect4");
    }
}
