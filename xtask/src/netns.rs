//! Throwaway network namespaces, a test cgroup and processes inside them, for the demo and
//! the privileged tests. Everything is named after a caller-chosen unique prefix and removed
//! on drop, also when a test panics.
//!
//! Topology: a "node" namespace holding a bridge (10.244.0.1/24) and, attached to it by veth
//! pairs, one namespace per pod (10.244.0.10, .11, ...) and a client namespace (10.244.0.2).
//! No namespace has a default route: a packet for an address outside 10.244.0.0/24 (an
//! untranslated Service address) fails with ENETUNREACH inside its namespace.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Fails with a clear message unless we are root with the kernel features the privileged
/// tests need (network namespaces, veth/bridge come with `ip`, cgroup v2, BTF, Linux 6.6
/// for TCX links, a bpf(2) that works).
pub fn require_privileges() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "this needs root (network namespaces, cgroups, BPF): run as root, e.g. `sudo -E cargo xtask test`"
        );
    }
    if !Path::new("/proc/self/ns/net").exists() {
        bail!("kernel without network namespaces");
    }
    cgroup2_root().context("cgroup v2 is required for the socket programs")?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("kernel without BTF (/sys/kernel/btf/vmlinux): the eBPF programs need it");
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < (6, 6) {
        bail!(
            "Linux {} is older than 6.6: the north-south programs attach as TCX links",
            release.trim()
        );
    }
    probe_bpf().context("the bpf(2) syscall is not usable (seccomp, lockdown, or no CAP_BPF?)")
}

/// Creates (and closes) a one-element array map: whether bpf(2) works here at all.
fn probe_bpf() -> Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    // `union bpf_attr` for BPF_MAP_CREATE: type, key size, value size, entries; the rest 0.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_ARRAY, 4, 4, 1]);
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of `attr`, which lives through the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a descriptor this call just got and nothing else holds.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 filesystem is mounted")
}

/// A network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
    file: File,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        cmd::output(&mut cmd::new("ip", &["netns", "add", name]))?;
        let path = format!("/run/netns/{name}");
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = cmd::output(&mut cmd::new("ip", &["netns", "del", name]));
                return Err(e).with_context(|| format!("opening {path}"));
            }
        };
        Ok(Netns {
            name: name.to_owned(),
            file,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        cmd::output(&mut cmd::new("ip", &all)).map(|_| ())
    }

    /// A command that runs inside this namespace (and `cgroup`, if given). `nsenter`-style,
    /// but without remounting /sys the way `ip netns exec` does.
    pub fn command(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        cgroup: Option<&Cgroup>,
    ) -> Result<Command> {
        let ns_fd = self.file.try_clone()?;
        let procs = cgroup.map(Cgroup::procs_file).transpose()?;
        let mut command = Command::new(program);
        // SAFETY: the closure only makes async-signal-safe syscalls (write, setns) on file
        // descriptors opened before fork.
        unsafe {
            command.pre_exec(move || {
                if let Some(procs) = &procs {
                    // "0" moves the writing process itself.
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(ns_fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Sets the sysctl `key` (e.g. `net.ipv4.ip_forward`) in this namespace, from a thread
    /// that joins it: `/proc/sys/net` shows the opening thread's namespace. No `sysctl`
    /// binary (procps) needed.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        self.run(|| fs::write(&path, value).with_context(|| format!("writing {}", path.display())))
            .with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }

    /// Runs `f` on a thread of its own that joins this namespace and ends with `f`: the
    /// sockets `f` opens, and what it reads of `/proc/sys/net`, are this namespace's.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let ns_fd = self.file.try_clone()?;
        let ran = std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<T> {
                    // SAFETY: a plain syscall on an open descriptor; it moves only this
                    // thread, which ends after `f`.
                    if unsafe { libc::setns(ns_fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error()).context("setns");
                    }
                    f()
                })
                .join()
        });
        match ran {
            Ok(result) => result,
            Err(_) => bail!("a thread in namespace {} panicked", self.name),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = cmd::output(&mut cmd::new("ip", &["netns", "del", &self.name])) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// A cgroup v2 directory for the socket programs to attach to; its processes are killed
/// and the directory removed on drop.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create(name: &str) -> Result<Self> {
        let path = cgroup2_root()?.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn procs_file(&self) -> Result<File> {
        let path = self.path.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    fn is_empty(&self) -> bool {
        fs::read_to_string(self.path.join("cgroup.procs")).is_ok_and(|s| s.trim().is_empty())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        // Killed processes leave the cgroup asynchronously; wait for that, bounded.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("cleanup: removing cgroup {}: {e}", self.path.display());
        }
    }
}

/// How long [`Proc::spawn_ready`] waits for a child's ready line: far more than any server
/// here takes to bind (milliseconds), so that only a hung child meets it.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process that is killed and reaped on drop.
pub struct Proc {
    pub child: Child,
    label: String,
}

impl Proc {
    /// Spawns `command` with stdout piped and waits until its first line is `ready_line`,
    /// for at most [`READY_TIMEOUT`]: a child that hangs before it is ready is killed (on
    /// drop) and named, rather than hanging the test run.
    pub fn spawn_ready(command: Command, label: &str, ready_line: &str) -> Result<Self> {
        Self::spawn_ready_within(command, label, ready_line, READY_TIMEOUT)
    }

    /// [`Proc::spawn_ready`] with another bound.
    fn spawn_ready_within(
        mut command: Command,
        label: &str,
        ready_line: &str,
        timeout: Duration,
    ) -> Result<Self> {
        command.stdout(Stdio::piped()).stdin(Stdio::null());
        let child = command
            .spawn()
            .with_context(|| format!("starting {label}: {}", cmd::display(&command)))?;
        let mut proc = Proc {
            child,
            label: label.to_owned(),
        };
        let stdout: ChildStdout = proc.child.stdout.take().context("stdout was piped")?;
        // The read blocks; on a thread of its own, it ends when the child prints a line or
        // closes its stdout (killed on the way out of here when it timed out).
        let (sender, first_line) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(BufReader::new(stdout).lines().next());
        });
        match first_line.recv_timeout(timeout) {
            Ok(Some(Ok(line))) if line.trim() == ready_line => Ok(proc),
            Ok(other) => {
                let status = proc.child.try_wait().ok().flatten();
                bail!("{label} did not become ready (first line {other:?}, exit {status:?})")
            }
            Err(_) => bail!(
                "{label} printed no line within {timeout:?}: {}",
                cmd::display(&command)
            ),
        }
    }

    /// Spawns `command` with inherited stdout/stderr.
    pub fn spawn(mut command: Command, label: &str) -> Result<Self> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {label}: {}", cmd::display(&command)))?;
        Ok(Proc {
            child,
            label: label.to_owned(),
        })
    }

    /// Kills with SIGKILL and reaps.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop with SIGTERM and waits (bounded), then kills.
    pub fn terminate(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{} ignored SIGTERM; killing it", self.label);
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// One pod: a namespace with `eth0` on the node bridge.
pub struct Pod {
    pub name: String,
    pub addr: Ipv4Addr,
    pub ns: Netns,
}

/// The node namespace with its bridge, pods, a client and a cgroup for the socket
/// programs. Drop order: pods and client, then the node, then the cgroup (fields drop in
/// declaration order).
pub struct Topology {
    pub pods: Vec<Pod>,
    pub client: Pod,
    pub node: Netns,
    pub cgroup: Cgroup,
}

pub const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);

/// Pod `i` gets 10.244.0.(10 + i).
pub fn pod_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 10 + i as u8)
}

impl Topology {
    /// Builds the namespaces `<prefix>-node`, `<prefix>-client`, `<prefix>-<pod name>` and
    /// the cgroup `<prefix>`. `prefix` must be unique on the machine.
    pub fn create(prefix: &str, pod_names: &[&str]) -> Result<Self> {
        let cgroup = Cgroup::create(prefix)?;
        let node = Netns::create(&format!("{prefix}-node"))?;
        node.ip(&["link", "set", "lo", "up"])?;
        node.ip(&["link", "add", "br0", "type", "bridge"])?;
        node.ip(&["addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", "br0"])?;
        node.ip(&["link", "set", "br0", "up"])?;
        let client = attach_pod(&node, prefix, "client", CLIENT_ADDR, 0)?;
        let mut pods = Vec::new();
        for (i, name) in pod_names.iter().enumerate() {
            pods.push(attach_pod(&node, prefix, name, pod_addr(i), i + 1)?);
        }
        Ok(Topology {
            pods,
            client,
            node,
            cgroup,
        })
    }

    /// Starts `ekp-peer serve` in every pod, answering with the pod's name on the given
    /// TCP and UDP ports; returns once each one is listening.
    pub fn serve(&self, peer: &Path, tcp: &[u16], udp: &[u16]) -> Result<Vec<Proc>> {
        self.pods
            .iter()
            .map(|pod| {
                let mut command = pod.ns.command(peer, None)?;
                command.args(["serve", "--name", &pod.name]);
                for port in tcp {
                    command.args(["--tcp", &port.to_string()]);
                }
                for port in udp {
                    command.args(["--udp", &port.to_string()]);
                }
                Proc::spawn_ready(command, &format!("server in {}", pod.name), "ready")
            })
            .collect()
    }

    /// Runs `ekp-peer <args>` in the client namespace and the test cgroup (where the
    /// socket programs apply) and returns its stdout.
    pub fn client_run(&self, peer: &Path, args: &[&str]) -> Result<String> {
        let mut command = self.client.ns.command(peer, Some(&self.cgroup))?;
        command.args(args);
        cmd::output(&mut command)
    }
}

/// Creates the namespace `<prefix>-<name>` with `eth0` at `addr/24`, its peer `veth<index>`
/// enslaved to `br0` of `node`.
pub fn attach_to_bridge(
    node: &Netns,
    prefix: &str,
    name: &str,
    addr: Ipv4Addr,
    index: usize,
) -> Result<Netns> {
    let ns = Netns::create(&format!("{prefix}-{name}"))?;
    let host_side = format!("veth{index}");
    node.ip(&[
        "link",
        "add",
        &host_side,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    node.ip(&["link", "set", &host_side, "master", "br0", "up"])?;
    ns.ip(&["link", "set", "lo", "up"])?;
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(ns)
}

fn attach_pod(node: &Netns, prefix: &str, name: &str, addr: Ipv4Addr, index: usize) -> Result<Pod> {
    let ns = attach_to_bridge(node, prefix, name, addr, index)?;
    Ok(Pod {
        name: name.to_owned(),
        addr,
        ns,
    })
}

/// A name prefix unique on this machine for this process: `<tag>-<pid>-<n>`, short enough
/// for namespace and cgroup names.
pub fn unique_prefix(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that never prints its ready line fails the start within the bound, and is
    /// killed, instead of hanging the test that started it.
    #[test]
    fn a_child_that_never_gets_ready_fails_within_the_bound() {
        let mut command = Command::new("sh");
        command.args(["-c", "sleep 60"]);
        let error =
            Proc::spawn_ready_within(command, "sleeper", "ready", Duration::from_millis(200))
                .err()
                .expect("a silent child must not count as ready");
        assert!(
            error.to_string().contains("sleeper printed no line within"),
            "{error:#}"
        );
    }

    #[test]
    fn a_child_that_prints_its_ready_line_is_ready() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo ready; sleep 60"]);
        let proc = Proc::spawn_ready_within(command, "server", "ready", Duration::from_secs(30))
            .expect("ready");
        drop(proc);
    }
}
