//! `cargo xtask demo`: the nginx example end to end, in throwaway network namespaces.
//!
//! Two "pods" answer HTTP with their names; `ebpf-kube-proxy run` reads
//! `examples/nginx/` (copied to a temporary directory) inside the node's namespace, with
//! its north-south programs on the node's `ext0`; a client pod (own namespace, in the
//! cgroup) connects to the ClusterIP many times, and an external client to the NodePort
//! (`curl http://<NodeIP>:30080`, the seed's example); then `ebpf-kube-proxy list`,
//! bpftool's view of the services map and of the TCX attachments are printed. Everything
//! is removed at the end, also on error.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd;
use crate::netns::{self, Proc, Topology};

pub struct Binaries {
    pub agent: PathBuf,
    pub peer: PathBuf,
    pub bpftool: PathBuf,
}

const CLUSTER_IP: &str = "10.96.0.80:80";
/// A port of the ClusterIP that its Service does not define.
const UNDEFINED_PORT: &str = "10.96.0.80:81";
/// The node's address towards the external client (the Node's InternalIP in the example).
const NODE_IP: &str = "192.168.200.1";
const EXTERNAL_CLIENT: &str = "192.168.200.2";
const NODE_PORT: &str = "192.168.200.1:30080";
const PODS: [&str; 2] = ["my-nginx-5b56ccd65f-4xq2v", "my-nginx-5b56ccd65f-9tkfz"];
const CONNECTIONS: usize = 20;

/// Removes the demo's pins and manifests copy when dropped (after the agent stopped).
struct Leftovers<'a> {
    agent: &'a Path,
    pin_path: PathBuf,
    manifests: PathBuf,
}

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.agent)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .arg("cleanup")
            .output();
        let _ = fs::remove_dir_all(&self.manifests);
    }
}

pub fn run(root: &Path, bins: &Binaries) -> Result<()> {
    netns::require_privileges()?;
    let prefix = netns::unique_prefix("ekp-demo");
    step(&format!(
        "creating namespaces {prefix}-*: node bridge 10.244.0.1/24, client 10.244.0.2, pods 10.244.0.10 and .11"
    ));
    let topo = Topology::create(&prefix, &PODS)?;
    let _servers = topo.serve(&bins.peer, &[80], &[])?;
    step(&format!(
        "external client {prefix}-ext at {EXTERNAL_CLIENT}, on the node's ext0 ({NODE_IP}); no other route"
    ));
    let external = netns::Netns::create(&format!("{prefix}-ext"))?;
    topo.node.ip(&[
        "link",
        "add",
        "ext0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        external.name(),
    ])?;
    topo.node
        .ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "ext0"])?;
    topo.node.ip(&["link", "set", "ext0", "up"])?;
    external.ip(&["link", "set", "lo", "up"])?;
    external.ip(&[
        "addr",
        "add",
        &format!("{EXTERNAL_CLIENT}/24"),
        "dev",
        "eth0",
    ])?;
    external.ip(&["link", "set", "eth0", "up"])?;
    // The node forwards between ext0 and the pods' bridge, and the pods answer external
    // clients through their node, as pods do through their default route.
    topo.node.sysctl("net.ipv4.ip_forward", "1")?;
    for pod in &topo.pods {
        pod.ns.ip(&[
            "route",
            "add",
            "192.168.200.0/24",
            "via",
            &netns::BRIDGE_ADDR.to_string(),
        ])?;
    }

    let leftovers = Leftovers {
        agent: &bins.agent,
        pin_path: PathBuf::from("/sys/fs/bpf").join(&prefix),
        manifests: std::env::temp_dir().join(format!("{prefix}-manifests")),
    };
    fs::create_dir_all(&leftovers.manifests)?;
    for entry in fs::read_dir(root.join("examples/nginx"))? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            fs::copy(&path, leftovers.manifests.join(name))?;
        }
    }

    step(
        "starting ebpf-kube-proxy run --manifests <copy of examples/nginx>, in the node's namespace",
    );
    let mut agent_cmd = topo.node.command(&bins.agent, None)?;
    agent_cmd
        .arg("--pin-path")
        .arg(&leftovers.pin_path)
        .arg("run")
        .arg("--manifests")
        .arg(&leftovers.manifests)
        .arg("--cgroup")
        .arg(topo.cgroup.path())
        .args(["--node-name", "node-1"])
        .args(["--healthz-bind-address", "127.0.0.1:0"])
        .args(["--metrics-bind-address", "127.0.0.1:0"])
        // The default would find ext0 too (it carries the Node's address); named here so
        // that the demo shows the flag.
        .args(["--devices", "ext0"]);
    println!("  {}", cmd::display(&agent_cmd));
    let mut agent = Proc::spawn(agent_cmd, "ebpf-kube-proxy")?;
    wait_until_listed(&bins.agent, &leftovers.pin_path, &mut agent)?;

    step(&format!(
        "{CONNECTIONS} new TCP connections from the client pod to http://{CLUSTER_IP}/"
    ));
    let mut client = topo.client.ns.command(&bins.peer, Some(&topo.cgroup))?;
    client.args(["tcp", CLUSTER_IP, &CONNECTIONS.to_string()]);
    let out = cmd::output(&mut client)?;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for (i, line) in out.lines().enumerate() {
        let answer = json_field(line, "answer").unwrap_or_else(|| format!("failed: {line}"));
        let peer = json_field(line, "peer").unwrap_or_default();
        println!(
            "  connection {:>2}: peer {peer}, answered by {answer}",
            i + 1
        );
        *tally.entry(answer).or_default() += 1;
    }
    println!("  answers per pod: {tally:?}");
    if PODS.iter().any(|pod| !tally.contains_key(*pod)) {
        bail!("not every pod answered: {tally:?}");
    }

    step(&format!(
        "{CONNECTIONS} new TCP connections from the external client to http://{NODE_PORT}/ (NodePort)"
    ));
    let mut client = external.command(&bins.peer, None)?;
    client.args(["tcp", NODE_PORT, &CONNECTIONS.to_string()]);
    let out = cmd::output(&mut client)?;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for line in out.lines() {
        let answer = json_field(line, "answer").unwrap_or_else(|| format!("failed: {line}"));
        *tally.entry(answer).or_default() += 1;
    }
    println!("  answers per pod: {tally:?}");
    if PODS.iter().any(|pod| !tally.contains_key(*pod)) {
        bail!("not every pod answered through the NodePort: {tally:?}");
    }

    step(&format!(
        "a TCP connection from the client pod to {UNDEFINED_PORT}, a port the Service does not \
         define: refused at once, as kube-proxy's nftables mode rejects it"
    ));
    let mut client = topo.client.ns.command(&bins.peer, Some(&topo.cgroup))?;
    client.args(["tcp", UNDEFINED_PORT, "1"]);
    let out = cmd::output(&mut client)?;
    print!("  {out}");
    let refused = out.lines().all(|line| {
        serde_json::from_str::<serde_json::Value>(line)
            .is_ok_and(|v| v["errno"] == libc::ECONNREFUSED)
    });
    if out.lines().count() != 1 || !refused {
        bail!("a connection to {UNDEFINED_PORT} was not refused: {out}");
    }

    step("ebpf-kube-proxy list");
    let list = cmd::output(
        Command::new(&bins.agent)
            .arg("--pin-path")
            .arg(&leftovers.pin_path)
            .arg("list"),
    )?;
    print!("{list}");

    step("ebpf-kube-proxy list --conntrack: the NodePort connections' conntrack entries");
    let conntrack = cmd::output(
        Command::new(&bins.agent)
            .arg("--pin-path")
            .arg(&leftovers.pin_path)
            .args(["list", "--conntrack"]),
    )?;
    print!("{conntrack}");

    let services_map = leftovers.pin_path.join("maps/ekp_svc_v1");
    step(&format!(
        "bpftool map dump pinned {}",
        services_map.display()
    ));
    print!(
        "{}",
        cmd::output(
            Command::new(&bins.bpftool)
                .args(["map", "dump", "pinned"])
                .arg(&services_map)
        )?
    );

    step("bpftool net show (in the node's namespace): the TCX programs on ext0");
    let mut net = topo.node.command(&bins.bpftool, None)?;
    net.args(["net", "show", "dev", "ext0"]);
    print!("{}", cmd::output(&mut net)?);

    step("stopping the agent and removing namespaces, cgroup and pins");
    agent.terminate();
    drop(leftovers);
    drop(external);
    drop(topo);
    println!(
        "demo finished: both pods answered through the ClusterIP and the NodePort, and the \
         undefined port was refused"
    );
    Ok(())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

/// Waits (bounded) until `list` shows the Service with both backends, and `list --maps`
/// its ClusterIP among the served ones (written just after the frontend).
fn wait_until_listed(agent_bin: &Path, pin_path: &Path, agent: &mut Proc) -> Result<()> {
    wait_for_list(agent_bin, pin_path, agent, &[], |text| {
        text.contains("\"10.96.0.80:80\"")
            && text.contains("10.244.0.10:80")
            && text.contains("10.244.0.11:80")
    })?;
    wait_for_list(agent_bin, pin_path, agent, &["--maps"], |text| {
        serde_json::from_str::<serde_json::Value>(text).is_ok_and(|maps| {
            maps.as_array()
                .into_iter()
                .flatten()
                .any(|m| m["map"] == "ekp_cip_v1" && m["entries"] == 1)
        })
    })
}

/// Waits (bounded) until `list <view> -o json` prints what `done` looks for.
fn wait_for_list(
    agent_bin: &Path,
    pin_path: &Path,
    agent: &mut Proc,
    view: &[&str],
    done: impl Fn(&str) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = agent.child.try_wait()? {
            bail!("ebpf-kube-proxy exited: {status}");
        }
        let out = Command::new(agent_bin)
            .arg("--pin-path")
            .arg(pin_path)
            .arg("list")
            .args(view)
            .args(["-o", "json"])
            .output()
            .context("running ebpf-kube-proxy list")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if done(&text) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("`list {}` never showed the Service: {text}", view.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The string field `key` of one of ekp-peer's JSON lines.
fn json_field(line: &str, key: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    value.get(key)?.as_str().map(str::to_owned)
}
