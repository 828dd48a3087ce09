//! The benchmark's confined topology, built from the namespace fixture's pieces: a node
//! namespace with a bridge (10.244.0.1/24), three pods with `ekp-bench serve` (pod-a
//! 10.244.0.10 and pod-b .11 back the measured Service; pod-c .12 is the endpoint an
//! endpoint change swaps in), and one client namespace per mode, so that the iptables
//! rules, the nftables table and the socket programs never see each other's traffic and
//! the modes can be measured interleaved. Each mode's client also runs in a cgroup of its
//! own, as a pod's processes do: the agent attaches its socket programs to `ebpf`'s, and
//! `ekp-bench hooks` attaches programs that do nothing to `hooks`'s (and to its node's
//! `ext0`).
//!
//! For NodePort, each client namespace is also the node that an external client reaches:
//! one external namespace per mode, joined to its mode's client namespace by a veth pair
//! (`ext0` at 192.168.k.1/24 there, the client's `eth0` at 192.168.k.2/24), so that the
//! external client's packets enter a namespace that forwards them to the pods (PREROUTING,
//! FORWARD, POSTROUTING) and holds that mode's rules, or, for eBPF, the TCX programs on
//! `ext0` (the agent runs in that namespace). The pods route the eBPF and `direct`
//! external subnets back through their nodes, for the flows no one source-NATs (eBPF keeps
//! the client address for a local endpoint; `direct` translates nothing); the iptables and
//! nftables ones get no route back, since kube-proxy masquerades them.
//!
//! For the `remote` port, whose endpoints are on another node, every mode's node is joined
//! by a veth pair of its own (`rem0` at 172.16.k.1/24 there, 172.16.k.2/24 on the other
//! side) to one more namespace, the other node, which holds the two remote pods' addresses
//! (10.244.1.10 and .11, its pod CIDR 10.244.1.0/24) with one `ekp-bench serve` for both;
//! each node routes 10.244.1.0/24 there. The other node routes back only what reaches it
//! without masquerade: the eBPF node's SNAT address (its `ext0` address, 192.168.1.1) and
//! the `direct` and `hooks` external subnets; the iptables and nftables nodes masquerade to
//! their `rem0` addresses. The agent's TCX programs are on `rem0` too, where the
//! source-NATed flows' replies come in (`hooks` attaches its empty ones there as well).
//!
//! No namespace has a default route. The iptables and nftables clients route the service
//! CIDR to the node (as a node's default route would), so that connect() reaches the
//! OUTPUT hook where kube-proxy's rules DNAT. The node forwards nothing: it holds the
//! service CIDR as a local route, so an untranslated packet (a client racing the
//! programming) is refused at once (TCP RST, ICMP port unreachable) instead of timing out;
//! forwarding errors would be rate-limited to one ICMP per second. The `direct` external
//! client routes the pod subnet through its node. Nothing leaves the namespaces. Everything
//! is removed on drop, in reverse order of creation.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::Path;

use anyhow::{Context, Result};
use xtask::cmd;
use xtask::netns::{self, Cgroup, Netns, Proc};

use super::Mode;
use super::scenario::{
    EXTERNAL_NODE_PORT, EXTERNAL_TARGET_PORT, POD_PORT, REMOTE_ENDPOINTS, REMOTE_NODE_PORT,
    REMOTE_TARGET_PORT, SERVICE_CIDR, TARGET_PORT,
};

pub const BRIDGE: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

pub struct PodSpec {
    pub name: &'static str,
    pub addr: Ipv4Addr,
}

pub const PODS: [PodSpec; 3] = [
    PodSpec {
        name: "pod-a",
        addr: Ipv4Addr::new(10, 244, 0, 10),
    },
    PodSpec {
        name: "pod-b",
        addr: Ipv4Addr::new(10, 244, 0, 11),
    },
    PodSpec {
        name: "pod-c",
        addr: Ipv4Addr::new(10, 244, 0, 12),
    },
];

pub struct Client {
    pub mode: Mode,
    pub ns: Netns,
}

/// The device of a mode's node (its client namespace) that external clients come in on.
pub const EXTERNAL_DEVICE: &str = "ext0";
/// The device of a mode's node towards the other node, where the `remote` endpoints are.
pub const REMOTE_DEVICE: &str = "rem0";
/// The other node's pod CIDR.
const REMOTE_POD_CIDR: &str = "10.244.1.0/24";

/// Field order is drop order: the empty programs, servers, external clients, the other
/// node, clients, pods, node, cgroups.
pub struct Topology {
    _empty_programs: Proc,
    _servers: Vec<Proc>,
    externals: Vec<Client>,
    remote_node: Netns,
    pub clients: Vec<Client>,
    _pods: Vec<Netns>,
    _node: Netns,
    /// One per mode, in `Mode::ALL` order.
    cgroups: Vec<Cgroup>,
}

fn client_addr(mode: Mode) -> Ipv4Addr {
    let last = match mode {
        Mode::Ebpf => 2,
        Mode::Iptables => 3,
        Mode::Nftables => 4,
        Mode::Direct => 5,
        Mode::Hooks => 6,
    };
    Ipv4Addr::new(10, 244, 0, last)
}

/// The /24 between a mode's node and its external client: 192.168.k.0/24.
fn external_subnet(mode: Mode) -> u8 {
    match mode {
        Mode::Ebpf => 1,
        Mode::Iptables => 2,
        Mode::Nftables => 3,
        Mode::Direct => 4,
        Mode::Hooks => 5,
    }
}

/// The address of `mode`'s node on its external device: where NodePorts are served.
pub fn node_external_addr(mode: Mode) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, external_subnet(mode), 1)
}

fn external_client_addr(mode: Mode) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, external_subnet(mode), 2)
}

/// Where `mode`'s external client sends: the NodePort of the measured Service's `external`
/// port on its node, or for `direct` and `hooks` that port's target on the pod itself
/// (routed through the node).
pub fn node_port_target(mode: Mode, pod: Ipv4Addr) -> std::net::SocketAddr {
    if mode.is_untranslated() {
        (pod, EXTERNAL_TARGET_PORT).into()
    } else {
        (node_external_addr(mode), EXTERNAL_NODE_PORT).into()
    }
}

/// Where `mode`'s external client sends for the `remote` port: its NodePort on the node, or
/// for `direct` and `hooks` its target on the other node's pod `pod` (routed through both
/// nodes).
pub fn remote_target(mode: Mode, pod: Ipv4Addr) -> std::net::SocketAddr {
    if mode.is_untranslated() {
        (pod, REMOTE_TARGET_PORT).into()
    } else {
        (node_external_addr(mode), REMOTE_NODE_PORT).into()
    }
}

impl Topology {
    pub fn create(prefix: &str, ekp_bench: &Path, cpu: Option<usize>) -> Result<Self> {
        let cgroups = Mode::ALL
            .iter()
            .map(|mode| Cgroup::create(&format!("{prefix}-{}", mode.name())))
            .collect::<Result<Vec<_>>>()?;
        let node = Netns::create(&format!("{prefix}-node"))?;
        node.ip(&["link", "set", "lo", "up"])?;
        node.ip(&["link", "add", "br0", "type", "bridge"])?;
        node.ip(&["addr", "add", &format!("{BRIDGE}/24"), "dev", "br0"])?;
        node.ip(&["link", "set", "br0", "up"])?;
        // Refuse untranslated Service traffic at once (see above).
        node.ip(&["route", "add", "local", SERVICE_CIDR, "dev", "lo"])?;
        node.sysctl("net.ipv4.icmp_ratelimit", "0")?;
        let mut index = 0;
        let mut pods = Vec::new();
        for pod in &PODS {
            index += 1;
            pods.push(netns::attach_to_bridge(
                &node, prefix, pod.name, pod.addr, index,
            )?);
        }
        let mut clients = Vec::new();
        for mode in Mode::ALL {
            index += 1;
            let ns = netns::attach_to_bridge(
                &node,
                prefix,
                &format!("c-{}", mode.name()),
                client_addr(mode),
                index,
            )?;
            if matches!(mode, Mode::Iptables | Mode::Nftables) {
                ns.ip(&["route", "add", SERVICE_CIDR, "via", &BRIDGE.to_string()])?;
            }
            clients.push(Client { mode, ns });
        }
        let mut externals = Vec::new();
        for client in &clients {
            externals.push(Client {
                mode: client.mode,
                ns: attach_external(prefix, client)?,
            });
            // iptables and nftables masquerade NodePort traffic (externalTrafficPolicy:
            // Cluster): no route back, so that a missing masquerade fails loudly.
            if matches!(client.mode, Mode::Iptables | Mode::Nftables) {
                continue;
            }
            let subnet = format!("192.168.{}.0/24", external_subnet(client.mode));
            for pod in &pods {
                pod.ip(&[
                    "route",
                    "add",
                    &subnet,
                    "via",
                    &client_addr(client.mode).to_string(),
                ])?;
            }
        }
        let remote_node = attach_remote_node(prefix, &clients)?;
        let mut servers = Vec::new();
        for (pod, ns) in PODS.iter().zip(&pods) {
            let mut command = ns.command(ekp_bench, None)?;
            pin(&mut command, cpu);
            command.args([
                "serve",
                "--name",
                pod.name,
                "--tcp",
                &TARGET_PORT.to_string(),
                "--tcp",
                &EXTERNAL_TARGET_PORT.to_string(),
                "--tcp",
                &POD_PORT.to_string(),
                "--udp",
                &TARGET_PORT.to_string(),
            ]);
            servers.push(
                Proc::spawn_ready(command, &format!("server in {}", pod.name), "ready")
                    .with_context(|| format!("starting the server in {}", pod.name))?,
            );
        }
        let mut command = remote_node.command(ekp_bench, None)?;
        pin(&mut command, cpu);
        command.args([
            "serve",
            "--name",
            "remote",
            "--tcp",
            &REMOTE_TARGET_PORT.to_string(),
        ]);
        servers.push(
            Proc::spawn_ready(command, "server in the other node", "ready")
                .context("starting the server in the other node")?,
        );
        let hooks_node = &clients
            .iter()
            .find(|c| c.mode == Mode::Hooks)
            .context("every mode has a client")?
            .ns;
        let mut command = hooks_node.command(ekp_bench, None)?;
        command
            .arg("hooks")
            .arg("--cgroup")
            .arg(cgroup_of(&cgroups, Mode::Hooks).path());
        command.args(["--device", EXTERNAL_DEVICE, "--device", REMOTE_DEVICE]);
        let empty_programs = Proc::spawn_ready(command, "ekp-bench hooks", "ready")
            .context("attaching the hooks mode's empty programs")?;
        Ok(Topology {
            _empty_programs: empty_programs,
            _servers: servers,
            externals,
            remote_node,
            clients,
            _pods: pods,
            _node: node,
            cgroups,
        })
    }

    pub fn client(&self, mode: Mode) -> &Netns {
        &self
            .clients
            .iter()
            .find(|c| c.mode == mode)
            .expect("every mode has a client")
            .ns
    }

    /// `mode`'s external client namespace (outside the node, in front of `ext0`).
    pub fn external(&self, mode: Mode) -> &Netns {
        &self
            .externals
            .iter()
            .find(|c| c.mode == mode)
            .expect("every mode has an external client")
            .ns
    }

    /// Closes the other node's TIME_WAIT sockets (`ss -K`): those of connections measured at
    /// an earlier N. The agent starts every N from empty, its record of the source ports it
    /// gave out gone, while the iptables and nftables nodes keep theirs in the kernel's
    /// conntrack. A port given out again then met the server's TIME_WAIT socket of an
    /// earlier connection, which turns the new SYN away if its timestamp is the older one
    /// (PAWS; this kernel draws each connection's timestamp offset anew): the client sent it
    /// again after a retransmission timeout. Forgotten on both sides, as at a first start.
    pub fn forget_remote_connections(&self) -> Result<()> {
        let mut command = self.remote_node.command("ss", None)?;
        command.args(["-K", "-t", "-n", "state", "time-wait"]);
        cmd::output(&mut command).map(drop)
    }

    /// `mode`'s cgroup.
    pub fn cgroup(&self, mode: Mode) -> &Cgroup {
        cgroup_of(&self.cgroups, mode)
    }

    /// A command where `mode`'s ClusterIP client runs: in its cgroup, and for `ebpf`,
    /// `direct` and `hooks` in the eBPF client's namespace, so that these three differ only
    /// in the programs attached to their cgroups (the agent's, programs that do nothing,
    /// none). A client in the root cgroup was up to 1 % faster at p50 than one in a cgroup
    /// of its own, also on an established connection, where no program runs: as much as
    /// the difference measured. `iptables` and `nftables` need namespaces of their own for
    /// their rules.
    pub fn client_command(&self, mode: Mode, program: &Path) -> Result<std::process::Command> {
        let ns = match mode {
            Mode::Ebpf | Mode::Direct | Mode::Hooks => Mode::Ebpf,
            Mode::Iptables | Mode::Nftables => mode,
        };
        let cgroup = Some(self.cgroup(mode));
        self.client(ns).command(program, cgroup)
    }
}

fn cgroup_of(cgroups: &[Cgroup], mode: Mode) -> &Cgroup {
    let index = Mode::ALL
        .iter()
        .position(|&m| m == mode)
        .expect("Mode::ALL has every mode");
    &cgroups[index]
}

/// Confines the process `command` starts to `cpu` (`None`: leaves it free).
///
/// The bench runs its servers and its latency clients on one CPU. The path of a request
/// between namespaces is then run by the sender's CPU from end to end (veth hands packets to
/// the CPU that sent them), and every wake-up is a local one. Across CPUs, each wake-up of
/// an idle CPU is an interrupt between virtual CPUs, whose cost on a virtual machine moves
/// from run to run: on the machine of the results, request/response on one connection
/// took 5.6-6.0 µs at p50 on one CPU and 63-69 µs across two, in every mode alike, which
/// hid the differences between the modes. On one CPU the latency is also the smallest, so the
/// same per-connection cost of a mode weighs more in its ratio to `direct`, not less.
pub fn pin(command: &mut std::process::Command, cpu: Option<usize>) {
    let Some(cpu) = cpu else {
        return;
    };
    // SAFETY: sched_setaffinity is a plain syscall, async-signal-safe; the set is built
    // on the child's stack.
    unsafe {
        command.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The external client of `client`'s mode: a namespace `<prefix>-x-<mode>` whose `eth0` is
/// the peer of the node's `ext0`; the node forwards between `ext0` and the pod bridge.
fn attach_external(prefix: &str, client: &Client) -> Result<Netns> {
    let node = &client.ns;
    let ns = Netns::create(&format!("{prefix}-x-{}", client.mode.name()))?;
    node.ip(&[
        "link",
        "add",
        EXTERNAL_DEVICE,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    let node_addr = node_external_addr(client.mode);
    node.ip(&[
        "addr",
        "add",
        &format!("{node_addr}/24"),
        "dev",
        EXTERNAL_DEVICE,
    ])?;
    node.ip(&["link", "set", EXTERNAL_DEVICE, "up"])?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    ns.ip(&["link", "set", "lo", "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", external_client_addr(client.mode)),
        "dev",
        "eth0",
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    if client.mode.is_untranslated() {
        for pods in ["10.244.0.0/24", REMOTE_POD_CIDR] {
            ns.ip(&["route", "add", pods, "via", &node_addr.to_string()])?;
        }
    }
    Ok(ns)
}

/// The other node: a namespace `<prefix>-remote` with the remote pods' addresses, joined to
/// each mode's node by a veth pair (`rem0` there, `to-<mode>` here; see the module doc).
fn attach_remote_node(prefix: &str, clients: &[Client]) -> Result<Netns> {
    let remote = Netns::create(&format!("{prefix}-remote"))?;
    remote.ip(&["link", "set", "lo", "up"])?;
    for pod in REMOTE_ENDPOINTS {
        remote.ip(&["addr", "add", &format!("{pod}/32"), "dev", "lo"])?;
    }
    for client in clients {
        let node = &client.ns;
        let peer = format!("to-{}", client.mode.name());
        node.ip(&[
            "link",
            "add",
            REMOTE_DEVICE,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            remote.name(),
        ])?;
        let k = external_subnet(client.mode);
        let (node_addr, remote_addr) = (format!("172.16.{k}.1"), format!("172.16.{k}.2"));
        node.ip(&[
            "addr",
            "add",
            &format!("{node_addr}/24"),
            "dev",
            REMOTE_DEVICE,
        ])?;
        node.ip(&["link", "set", REMOTE_DEVICE, "up"])?;
        node.ip(&["route", "add", REMOTE_POD_CIDR, "via", &remote_addr])?;
        remote.ip(&["addr", "add", &format!("{remote_addr}/24"), "dev", &peer])?;
        remote.ip(&["link", "set", &peer, "up"])?;
        // What comes back without masquerade (see the module doc).
        let back = match client.mode {
            Mode::Ebpf => Some(format!("{}/32", node_external_addr(client.mode))),
            Mode::Direct | Mode::Hooks => {
                Some(format!("192.168.{}.0/24", external_subnet(client.mode)))
            }
            Mode::Iptables | Mode::Nftables => None,
        };
        if let Some(back) = back {
            remote.ip(&["route", "add", &back, "via", &node_addr])?;
        }
    }
    Ok(remote)
}
