//! The eBPF programs' own run time, from the kernel's BPF statistics: what the translation
//! itself costs per call. Latency percentiles carry the machine's noise (on the reference
//! VM, the connect p50 ratio to `direct` moved by 0.2 between runs); this figure does not,
//! so it says how much of an `ebpf`/`direct` gap the programs can account for.
//!
//! Counting is on only while a `Counting` lives: `BPF_ENABLE_STATS` hands out a
//! descriptor, and the kernel stops counting when the last one closes, also when the bench
//! dies. It adds two clock reads to every run of every BPF program on the machine, so the
//! bench turns it on for a separate pass, never during the latency rounds.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;

use anyhow::{Context, Result, bail};
use xtask::cmd;

/// `BPF_ENABLE_STATS` and its only type, `BPF_STATS_RUN_TIME` (uapi/linux/bpf.h).
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics are being counted while this lives.
pub struct Counting {
    _fd: OwnedFd,
}

pub fn start() -> Result<Counting> {
    // `union bpf_attr` for this command is one u32; the kernel requires the rest be zero.
    let mut attr = [0u8; 8];
    attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
    // SAFETY: the attribute buffer is valid for the size passed; the kernel returns a new
    // descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned to us, owned by nobody else.
    Ok(Counting {
        _fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
    })
}

/// Runs and nanoseconds of one program so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counter {
    pub runs: u64,
    pub ns: u64,
}

/// The counters of every BPF program `pid` holds a descriptor for, by program id (from
/// /proc/<pid>/fdinfo, which the kernel fills in for program descriptors).
pub fn counters(pid: u32) -> Result<BTreeMap<u32, Counter>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some((id, counter)) = parse_fdinfo(&text) {
            out.insert(id, counter);
        }
    }
    Ok(out)
}

fn parse_fdinfo(text: &str) -> Option<(u32, Counter)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let id = u32::try_from(field("prog_id:")?).ok()?;
    Some((
        id,
        Counter {
            runs: field("run_cnt:")?,
            ns: field("run_time_ns:")?,
        },
    ))
}

/// What each program that ran between `before` and `after` cost: name -> runs, ns per run.
pub fn per_run(
    bpftool: &std::path::Path,
    before: &BTreeMap<u32, Counter>,
    after: &BTreeMap<u32, Counter>,
) -> Result<BTreeMap<String, (u64, f64)>> {
    let mut out = BTreeMap::new();
    for (id, end) in after {
        let start = before.get(id).copied().unwrap_or_default();
        let runs = end.runs.saturating_sub(start.runs);
        if runs == 0 {
            continue;
        }
        let ns = end.ns.saturating_sub(start.ns) as f64 / runs as f64;
        out.insert(name(bpftool, *id)?, (runs, ns));
    }
    Ok(out)
}

fn name(bpftool: &std::path::Path, id: u32) -> Result<String> {
    let mut show = Command::new(bpftool);
    show.args(["-j", "prog", "show", "id", &id.to_string()]);
    let out = cmd::output(&mut show)?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("bpftool printed {out:?}"))?;
    v["name"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("program {id} has no name in {out:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_program_fdinfo_and_skips_others() {
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nprog_type:\t18\n\
                    prog_jited:\t1\nprog_tag:\t9d29e885c2de6f80\nmemlock:\t20480\nprog_id:\t16421\n\
                    run_time_ns:\t23144547\nrun_cnt:\t41177\nrecursion_misses:\t0\n";
        assert_eq!(
            parse_fdinfo(prog),
            Some((
                16421,
                Counter {
                    runs: 41177,
                    ns: 23144547
                }
            ))
        );
        let map = "pos:\t0\nmap_type:\t1\nkey_size:\t12\nmemlock:\t4096\nmap_id:\t30957\n";
        assert_eq!(parse_fdinfo(map), None);
    }
}
