//! The benchmark's confined topology, built from the namespace fixture's pieces: a node
//! namespace with a bridge (10.244.0.1/24), three pods with `ekp-bench serve` (pod-a
//! 10.244.0.10 and pod-b .11 back the measured Service; pod-c .12 is the endpoint an
//! endpoint change swaps in), and one client namespace per mode, so that the iptables
//! rules, the nftables table and the socket programs never see each other's traffic and
//! the modes can be measured interleaved. The eBPF client also runs in a cgroup of its own,
//! where the agent attaches its programs.
//!
//! No namespace has a default route. The iptables and nftables clients route the service
//! CIDR to the node (as a node's default route would), so that connect() reaches the
//! OUTPUT hook where kube-proxy's rules DNAT. The node forwards nothing: it holds the
//! service CIDR as a local route, so an untranslated packet (a client racing the
//! programming) is refused at once (TCP RST, ICMP port unreachable) instead of timing out;
//! forwarding errors would be rate-limited to one ICMP per second. Nothing leaves the
//! namespaces. Everything is removed on drop, in reverse order of creation.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use xtask::cmd;
use xtask::netns::{self, Cgroup, Netns, Proc};

use super::Mode;
use super::scenario::{SERVICE_CIDR, TARGET_PORT};

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

/// Field order is drop order: servers, clients, pods, node, cgroup.
pub struct Topology {
    _servers: Vec<Proc>,
    pub clients: Vec<Client>,
    _pods: Vec<Netns>,
    _node: Netns,
    pub cgroup: Cgroup,
}

fn client_addr(mode: Mode) -> Ipv4Addr {
    let last = match mode {
        Mode::Ebpf => 2,
        Mode::Iptables => 3,
        Mode::Nftables => 4,
        Mode::Direct => 5,
    };
    Ipv4Addr::new(10, 244, 0, last)
}

/// Writes a sysctl inside `ns` (/proc/sys/net is per network namespace).
fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<()> {
    let mut command = ns.command("sysctl", None)?;
    command.args(["-q", "-w", &format!("{key}={value}")]);
    cmd::output(&mut command).map(|_| ())
}

impl Topology {
    pub fn create(prefix: &str, ekp_bench: &Path) -> Result<Self> {
        let cgroup = Cgroup::create(prefix)?;
        let node = Netns::create(&format!("{prefix}-node"))?;
        node.ip(&["link", "set", "lo", "up"])?;
        node.ip(&["link", "add", "br0", "type", "bridge"])?;
        node.ip(&["addr", "add", &format!("{BRIDGE}/24"), "dev", "br0"])?;
        node.ip(&["link", "set", "br0", "up"])?;
        // Refuse untranslated Service traffic at once (see above).
        node.ip(&["route", "add", "local", SERVICE_CIDR, "dev", "lo"])?;
        sysctl(&node, "net.ipv4.icmp_ratelimit", "0")?;
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
        let mut servers = Vec::new();
        for (pod, ns) in PODS.iter().zip(&pods) {
            let mut command = ns.command(ekp_bench, None)?;
            command.args([
                "serve",
                "--name",
                pod.name,
                "--tcp",
                &TARGET_PORT.to_string(),
                "--udp",
                &TARGET_PORT.to_string(),
            ]);
            servers.push(
                Proc::spawn_ready(command, &format!("server in {}", pod.name), "ready")
                    .with_context(|| format!("starting the server in {}", pod.name))?,
            );
        }
        Ok(Topology {
            _servers: servers,
            clients,
            _pods: pods,
            _node: node,
            cgroup,
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

    /// A command in `mode`'s client namespace (and, for eBPF, in the cgroup).
    pub fn client_command(&self, mode: Mode, program: &Path) -> Result<std::process::Command> {
        let cgroup = (mode == Mode::Ebpf).then_some(&self.cgroup);
        self.client(mode).command(program, cgroup)
    }
}
