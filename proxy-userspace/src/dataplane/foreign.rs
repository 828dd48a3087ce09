//! Programs of ours that this agent did not attach, where its own run: on its cgroup or an
//! ancestor (whose programs run for the same sockets) and on the devices it serves.
//!
//! Two agents on two pin directories (a release renamed, `bpf.pinPath` changed without the
//! cleanup its comment asks for, a hand-started `run` beside the DaemonSet's) both
//! translate: the pin-directory lock cannot see each other's. Once the other stops, its
//! pinned links keep its programs attached on maps nobody updates: they translate sockets
//! and packets before this agent's programs (on the same cgroup or device, attached
//! earlier) or after them (on an ancestor cgroup, what ours leave alone: Services since
//! removed). Found by name (the kernel keeps 15 bytes of it) among the programs attached
//! there, with an id other than the ones this process loaded. Naming a program by its id
//! needs `CAP_SYS_ADMIN`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{POD_HOOKS, TCX_PROGRAMS, bpf_sys};

/// The socket programs (`SOCK_PROGRAMS`) and their `bpf_attach_type`s.
const SOCK_HOOKS: [(&str, u32); 8] = [
    ("ekp_connect4", 10),     // BPF_CGROUP_INET4_CONNECT
    ("ekp_sendmsg4", 14),     // BPF_CGROUP_UDP4_SENDMSG
    ("ekp_recvmsg4", 19),     // BPF_CGROUP_UDP4_RECVMSG
    ("ekp_getpeer4", 29),     // BPF_CGROUP_INET4_GETPEERNAME
    ("ekp_connect6", 11),     // BPF_CGROUP_INET6_CONNECT
    ("ekp_recvmsg6", 20),     // BPF_CGROUP_UDP6_RECVMSG
    ("ekp_getpeer6", 30),     // BPF_CGROUP_INET6_GETPEERNAME
    ("ekp_sock_release", 34), // BPF_CGROUP_INET_SOCK_RELEASE
];

/// `BPF_TCX_INGRESS` and `BPF_TCX_EGRESS`.
const TCX_HOOKS: [(u32, &str); 2] = [(46, "ingress"), (47, "egress")];

/// A program of ours attached by someone else.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Foreign {
    /// Its name as the kernel keeps it.
    pub program: String,
    /// Its id (`bpftool prog show id N`; `bpftool link` shows the link that holds it).
    pub id: u32,
    /// Where: `cgroup <path>`, `<device> ingress|egress`.
    pub at: Vec<String>,
}

/// The foreign programs on `cgroup` (and its ancestors) and `devices` (name, ifindex),
/// given the ids of the programs this process loaded. A device gone meanwhile is skipped.
pub(super) fn find(
    cgroup: &Path,
    devices: &[(String, u32)],
    ours: &BTreeSet<u32>,
) -> Result<Vec<Foreign>> {
    let mut attached: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for level in cgroup_and_ancestors(cgroup) {
        let dir = std::fs::File::open(&level)
            .with_context(|| format!("opening cgroup {}", level.display()))?;
        for (_, hook) in SOCK_HOOKS {
            let ids = bpf_sys::prog_query(dir.as_raw_fd() as u32, hook, 0)
                .with_context(|| format!("listing the programs of cgroup {}", level.display()))?;
            for id in ids {
                let at = attached.entry(id).or_default();
                at.push(format!("cgroup {}", level.display()));
            }
        }
    }
    for (device, ifindex) in devices {
        for (hook, direction) in TCX_HOOKS {
            match bpf_sys::prog_query(*ifindex, hook, 0) {
                Ok(ids) => {
                    for id in ids {
                        attached
                            .entry(id)
                            .or_default()
                            .push(format!("{device} {direction}"));
                    }
                }
                Err(e) if crate::devices::gone(device, *ifindex) => {
                    tracing::debug!(device = %device, "device gone while listing its programs ({e:#})");
                }
                Err(e) => return Err(e.context(format!("listing the TCX programs of {device}"))),
            }
        }
    }
    attached.retain(|id, _| !ours.contains(id));
    let names: BTreeSet<&str> = SOCK_HOOKS
        .iter()
        .map(|(name, _)| *name)
        .chain(TCX_PROGRAMS)
        .chain(POD_HOOKS.iter().map(|(name, _)| *name))
        .map(kernel_name)
        .collect();
    let mut found = Vec::new();
    for (id, mut at) in attached {
        let name = bpf_sys::prog_name(id).with_context(|| {
            format!("naming program {id}, attached where this agent's are (needs CAP_SYS_ADMIN)")
        })?;
        // None: detached and freed since it was listed.
        if let Some(program) = name.filter(|n| names.contains(n.as_str())) {
            at.dedup();
            found.push(Foreign { program, id, at });
        }
    }
    Ok(found)
}

/// `cgroup` and the cgroups above it, up to the hierarchy's root.
fn cgroup_and_ancestors(cgroup: &Path) -> Vec<PathBuf> {
    let mut levels = vec![cgroup.to_owned()];
    let mut dir = cgroup;
    while let Some(parent) = dir.parent() {
        if !parent.join("cgroup.procs").exists() {
            break;
        }
        levels.push(parent.to_owned());
        dir = parent;
    }
    levels
}

/// A program's name as the kernel keeps it (`BPF_OBJ_NAME_LEN`: 15 bytes and a NUL).
fn kernel_name(name: &str) -> &str {
    name.get(..15).unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every socket program is looked for at its own hook: a program added to
    /// `SOCK_PROGRAMS` needs its attach type here.
    #[test]
    fn every_socket_program_has_its_hook() {
        let hooked: BTreeSet<&str> = SOCK_HOOKS.iter().map(|(name, _)| *name).collect();
        let programs: BTreeSet<&str> = super::super::SOCK_PROGRAMS.into_iter().collect();
        assert_eq!(hooked, programs);
    }

    #[test]
    fn the_kernel_keeps_fifteen_bytes_of_a_name() {
        assert_eq!(kernel_name("ekp_sock_release"), "ekp_sock_releas");
        assert_eq!(kernel_name("ekp_connect4"), "ekp_connect4");
    }

    #[test]
    fn a_cgroups_ancestors_end_at_the_hierarchys_root() {
        let root = std::env::temp_dir().join(format!("ekpt-cgroups-{}", std::process::id()));
        let leaf = root.join("a/b");
        std::fs::create_dir_all(&leaf).expect("creating directories");
        for level in [&root, &root.join("a"), &leaf] {
            std::fs::write(level.join("cgroup.procs"), "").expect("writing cgroup.procs");
        }
        let levels = cgroup_and_ancestors(&leaf);
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(levels, [leaf.clone(), root.join("a"), root]);
    }
}
