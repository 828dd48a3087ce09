//! Privileged: north-south traffic across two nodes (issue 4), the seed's NodePort example
//! rebuilt in network namespaces (C08, C10), and the other north-south cases (C06, C09,
//! C11, C12, C22, C23, C31, C32) on LoadBalancer, externalIP and NodePort Services.
//!
//! Topology (every address lives in namespaces made here; none has a default route):
//! a "fabric" namespace with a bridge joins `eth0` of node1 (192.168.77.11) and node2
//! (192.168.77.12) and an external client (192.168.77.100). Each node has a pod bridge
//! (10.244.1.1/24 on node1, 10.244.2.1/24 on node2) with one pod serving HTTP on 8080, and a
//! route to the other node's pod range through the other node's `eth0`. One agent runs
//! inside each node namespace, with its own pins and cgroup, `--devices eth0`, reading the
//! same manifests. Clients that must reach an LB IP or externalIP route it via node1;
//! nothing routes anywhere else, so an untranslated packet dead-ends inside the fabric.

mod common;

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use proxy_common::{NS_FILTER_IN, NS_FILTER_OUT, NS_FILTER_SNAT, NsFilter};
use proxy_userspace::dataplane::Maps;
use serde_json::Value;
use xtask::netns::{self, Cgroup, Netns, Proc};

const AGENT: &str = env!("CARGO_BIN_EXE_ebpf-kube-proxy");
const PEER: &str = env!("CARGO_BIN_EXE_ekp-peer");

/// Waiting for a condition gives up after this long; it is a hang guard, not a timing.
const CONDITION_LIMIT: Duration = Duration::from_secs(20);

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);
const NODE_PORT: u16 = 30080;

/// One node: its namespace, eth0 address, pod and agent.
struct Node {
    name: &'static str,
    eth0: Ipv4Addr,
    pin_path: PathBuf,
    log: PathBuf,
    agent: Option<Proc>,
    /// Flags the agent gets besides the common ones.
    agent_args: Vec<&'static str>,
    _server: Option<Proc>,
    pod: Netns,
    ns: Netns,
    cgroup: Cgroup,
}

/// The two nodes, the client and the fabric; agents stopped, pins removed and namespaces
/// deleted on drop (nodes first: their veths go with them).
struct Cluster {
    prefix: String,
    manifests: PathBuf,
    nodes: Vec<Node>,
    client: Netns,
    /// More external clients, made by [`Cluster::add_client`]; dropped before the fabric.
    extra_clients: Vec<Netns>,
    fabric: Netns,
}

fn ip(ns: &Netns, args: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    ns.ip(&args)
        .unwrap_or_else(|e| panic!("ip -n {} {args:?}: {e:#}", ns.name()));
}

/// Puts a veth between `ns` (as `inner`) and `host` (as `outer`, enslaved to `bridge`).
fn veth(host: &Netns, outer: &str, bridge: &str, ns: &Netns, inner: &str) {
    ip(
        host,
        &format!(
            "link add {outer} type veth peer name {inner} netns {}",
            ns.name()
        ),
    );
    ip(host, &format!("link set {outer} master {bridge} up"));
    ip(ns, &format!("link set {inner} up"));
}

impl Cluster {
    fn new(tag: &str) -> Self {
        if let Err(e) = netns::require_privileges() {
            panic!("privileged test `{tag}` cannot run: {e:#}");
        }
        common::ensure_bpffs();
        let prefix = netns::unique_prefix(&format!("ekpt-{tag}"));
        let fabric = Netns::create(&format!("{prefix}-fab")).expect("fabric namespace");
        ip(&fabric, "link add br0 type bridge");
        ip(&fabric, "link set br0 up");

        let client = Netns::create(&format!("{prefix}-cl")).expect("client namespace");
        ip(&client, "link set lo up");
        veth(&fabric, "p-cl", "br0", &client, "eth0");
        ip(&client, &format!("addr add {CLIENT}/24 dev eth0"));

        let mut nodes = Vec::new();
        for (i, name) in [(1u8, "node-1"), (2, "node-2")] {
            let other = 3 - i;
            let eth0 = Ipv4Addr::new(192, 168, 77, 10 + i);
            let ns = Netns::create(&format!("{prefix}-n{i}")).expect("node namespace");
            ip(&ns, "link set lo up");
            veth(&fabric, &format!("p-n{i}"), "br0", &ns, "eth0");
            ip(&ns, &format!("addr add {eth0}/24 dev eth0"));
            ip(&ns, "link add brpod type bridge");
            ip(&ns, &format!("addr add 10.244.{i}.1/24 dev brpod"));
            ip(&ns, "link set brpod up");
            ip(
                &ns,
                &format!("route add 10.244.{other}.0/24 via 192.168.77.1{other}"),
            );
            ns.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");

            let pod = Netns::create(&format!("{prefix}-p{i}")).expect("pod namespace");
            ip(&pod, "link set lo up");
            veth(&ns, "vpod", "brpod", &pod, "eth0");
            ip(&pod, &format!("addr add 10.244.{i}.10/24 dev eth0"));
            ip(&pod, &format!("route add 10.244.0.0/16 via 10.244.{i}.1"));
            ip(&pod, &format!("route add 192.168.77.0/24 via 10.244.{i}.1"));
            // Port-unreachable errors are tested one per request, not rate-limited.
            pod.sysctl("net.ipv4.icmp_ratelimit", "0")
                .expect("no ICMP rate limit");
            let mut serve = pod.command(PEER, None).expect("server command");
            serve.args([
                "serve",
                "--name",
                &format!("pod-{i}"),
                "--tcp",
                "8080",
                "--udp",
                "5353",
                "--sink",
                "9000",
                "--echo-peer",
            ]);
            let server = Proc::spawn_ready(serve, &format!("pod-{i}"), "ready")
                .unwrap_or_else(|e| panic!("starting pod-{i}: {e:#}"));

            let cgroup = Cgroup::create(&format!("{prefix}-n{i}")).expect("node cgroup");
            nodes.push(Node {
                name,
                eth0,
                pin_path: PathBuf::from("/sys/fs/bpf").join(format!("{prefix}-n{i}")),
                log: std::env::temp_dir().join(format!("{prefix}-n{i}-agent.log")),
                agent: None,
                agent_args: Vec::new(),
                _server: Some(server),
                pod,
                ns,
                cgroup,
            });
        }
        // Last, when nothing that could fail is left: a panic above would leak it (the
        // namespaces, servers and cgroups before it remove themselves).
        let manifests = std::env::temp_dir().join(format!("{prefix}-manifests"));
        fs::create_dir_all(&manifests).expect("creating the manifests directory");
        Cluster {
            prefix,
            manifests,
            nodes,
            client,
            extra_clients: Vec::new(),
            fabric,
        }
    }

    /// Another external client on the fabric, at `addr`; returns its index for
    /// [`Cluster::extra_client`].
    fn add_client(&mut self, addr: Ipv4Addr) -> usize {
        let i = self.extra_clients.len();
        let ns = Netns::create(&format!("{}-x{i}", self.prefix)).expect("client namespace");
        ip(&ns, "link set lo up");
        veth(&self.fabric, &format!("p-x{i}"), "br0", &ns, "eth0");
        ip(&ns, &format!("addr add {addr}/24 dev eth0"));
        self.extra_clients.push(ns);
        i
    }

    fn extra_client(&self, i: usize) -> &Netns {
        &self.extra_clients[i]
    }

    /// Writes a manifest atomically (rename), as a ConfigMap volume update does.
    fn write_manifest(&self, file: &str, yaml: &str) {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).expect("writing manifest");
        fs::rename(&tmp, self.manifests.join(file)).expect("renaming manifest into place");
    }

    /// Each node's Node object, with its eth0 address as InternalIP.
    fn write_node_manifests(&self) {
        for node in &self.nodes {
            self.write_manifest(
                &format!("{}.yaml", node.name),
                &node_manifest(node.name, node.eth0),
            );
        }
    }

    /// Starts one agent inside each node namespace (so `--devices eth0` names that node's
    /// eth0), in the node's own cgroup, with its own pins and no HTTP endpoints.
    fn start_agents(&mut self) {
        for i in 0..self.nodes.len() {
            self.start_agent(i, Some("eth0"));
        }
    }

    /// Starts node `i`'s agent with `--devices <devices>`, or without the flag (detection).
    /// Its log is appended to, so that restarts keep what came before.
    fn start_agent(&mut self, i: usize, devices: Option<&str>) {
        let manifests = self.manifests.clone();
        let node = &mut self.nodes[i];
        let mut command = node
            .ns
            .command(AGENT, Some(&node.cgroup))
            .expect("agent command");
        command
            .arg("--pin-path")
            .arg(&node.pin_path)
            .arg("run")
            .arg("--manifests")
            .arg(&manifests)
            .arg("--cgroup")
            .arg(node.cgroup.path())
            .args([
                "--node-name",
                node.name,
                "--min-sync-period",
                "100ms",
                "--healthz-bind-address",
                "",
                "--metrics-bind-address",
                "",
                // The conntrack collector passes every second, not every 30 s: a test
                // waits for ended flows' entries to go.
                "--conntrack-gc-interval",
                "1s",
            ])
            .args(&node.agent_args)
            .env("EKP_LOG", "info");
        if let Some(devices) = devices {
            command.args(["--devices", devices]);
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("opening the agent log");
        command.stderr(log);
        node.agent = Some(Proc::spawn(command, node.name).expect("starting the agent"));
    }

    /// Waits until node `i`'s agents have said "datapath ready" `n` times in all (its log
    /// is appended to at every start).
    fn wait_for_ready_starts(&self, i: usize, n: usize) {
        let node = &self.nodes[i];
        let deadline = Instant::now() + CONDITION_LIMIT;
        let log = || fs::read_to_string(&node.log).unwrap_or_default();
        while log().matches("datapath ready").count() < n {
            assert!(
                Instant::now() < deadline,
                "{}'s agent never became ready for the {n}th time; log:\n{}",
                node.name,
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until node `i`'s agent shows the external-scope NodePort frontend on its own
    /// eth0 address with exactly `backends`.
    fn wait_for_node_port(&mut self, i: usize, backends: &[&str]) {
        let frontend = format!("{}:{NODE_PORT}", self.nodes[i].eth0);
        self.wait_for(i, &frontend, "external", backends);
    }

    /// Waits until node `i`'s agent shows the TCP `frontend` (`addr:port`) of `scope` with
    /// exactly `backends`.
    fn wait_for(&mut self, i: usize, frontend: &str, scope: &str, backends: &[&str]) {
        self.wait_for_listed(i, (frontend, "TCP", scope), "backends", backends);
    }

    /// Waits until node `i`'s agent lists `frontend` (`addr:port`, protocol, scope) with
    /// exactly `backends` under `field` (`backends` or `lingering`).
    fn wait_for_listed(
        &mut self,
        i: usize,
        (frontend, proto, scope): (&str, &str, &str),
        field: &str,
        backends: &[&str],
    ) {
        let node = &mut self.nodes[i];
        let mut want: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
        want.sort();
        let deadline = Instant::now() + CONDITION_LIMIT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(agent) = node.agent.as_mut()
                && let Ok(Some(status)) = agent.child.try_wait()
            {
                panic!(
                    "{} agent exited early: {status}; log:\n{}",
                    node.name,
                    fs::read_to_string(&node.log).unwrap_or_default()
                );
            }
            match list(&node.pin_path) {
                Ok(frontends) => {
                    let have = frontends
                        .iter()
                        .find(|f| {
                            f["frontend"] == frontend
                                && f["protocol"] == proto
                                && f["scope"] == scope
                        })
                        .map(|f| {
                            let mut b: Vec<String> = f[field]
                                .as_array()
                                .map(|a| {
                                    a.iter()
                                        .filter_map(|b| b["address"].as_str().map(String::from))
                                        .collect()
                                })
                                .unwrap_or_default();
                            b.sort();
                            b
                        });
                    if have.as_ref() == Some(&want) {
                        return;
                    }
                    last = format!("{frontends:?}");
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} never listed {frontend}/{proto} with {field} {want:?}; last list: {last}",
            node.name
        );
    }

    /// `count` HTTP requests from the external client to `to`; answers ("pod-N PEER")
    /// counted.
    fn requests(&self, to: &str, count: u32) -> std::collections::BTreeMap<String, usize> {
        self.requests_from(&self.client, None, to, count)
    }

    /// `count` HTTP requests from a process in `ns` (and in `cgroup`, where the socket
    /// programs of that node's agent apply); every one must succeed.
    fn requests_from(
        &self,
        ns: &Netns,
        cgroup: Option<&Cgroup>,
        to: &str,
        count: u32,
    ) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for line in self.attempts(ns, cgroup, to, count) {
            assert_eq!(
                line["ok"],
                true,
                "request to {to} failed: {line}\n{}",
                self.logs()
            );
            *counts
                .entry(line["answer"].as_str().unwrap_or("").to_owned())
                .or_insert(0) += 1;
        }
        counts
    }

    /// `count` HTTP requests from `ns` (in `cgroup`), one JSON outcome line each.
    fn attempts(&self, ns: &Netns, cgroup: Option<&Cgroup>, to: &str, count: u32) -> Vec<Value> {
        self.peer(ns, cgroup, &["tcp", to, &count.to_string()])
    }

    /// `ekp-peer <args>` as a client in `ns` (in `cgroup`): its JSON outcome lines.
    fn peer(&self, ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> Vec<Value> {
        let mut command = ns.command(PEER, cgroup).expect("client command");
        command.args(args);
        let out = xtask::cmd::output(&mut command).unwrap_or_else(|e| panic!("client: {e:#}"));
        out.lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"))
            })
            .collect()
    }

    /// `ekp-peer <args>` as a client of the external client's namespace, in the background.
    fn spawn_client(&self, name: &str, args: &[&str]) -> common::BackgroundClient {
        let mut command = self.client.command(PEER, None).expect("client command");
        command.args(args);
        let output = std::env::temp_dir().join(format!("{}-{name}.jsonl", self.prefix));
        common::BackgroundClient::spawn(command, output)
    }

    /// The one request from `ns` to `to` fails; returns its outcome line.
    fn fails(&self, ns: &Netns, cgroup: Option<&Cgroup>, to: &str) -> Value {
        let line = self.attempts(ns, cgroup, to, 1).remove(0);
        assert_eq!(line["ok"], false, "{to} answered: {line}\n{}", self.logs());
        line
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "--- {} agent log ---\n{}",
                    n.name,
                    fs::read_to_string(&n.log).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.extra_clients.clear();
        for node in &mut self.nodes {
            if let Some(mut agent) = node.agent.take() {
                agent.terminate();
            }
            common::cleanup_pins(&node.pin_path);
            let _ = fs::remove_file(&node.log);
        }
        let _ = fs::remove_dir_all(&self.manifests);
    }
}

/// `ebpf-kube-proxy list -o json` on one agent's pins.
fn list(pin_path: &Path) -> Result<Vec<Value>, String> {
    let out = Command::new(AGENT)
        .arg("--pin-path")
        .arg(pin_path)
        .args(["list", "-o", "json"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Entries in the north-south conntrack map pinned under `pin_path` (`list --maps`).
fn conntrack_entries(pin_path: &Path) -> u64 {
    let fill = common::map_fill(pin_path, proxy_common::MAP_NAT_CT);
    fill["entries"]
        .as_u64()
        .unwrap_or_else(|| panic!("no entry count in {fill}"))
}

fn service(policy: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalTrafficPolicy: {policy}
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}, protocol: TCP}}]
"
    )
}

const ENDPOINTS: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.244.1.10]
    conditions: {ready: true}
    nodeName: node-1
  - addresses: [10.244.2.10]
    conditions: {ready: true}
    nodeName: node-2
";

/// Both pods answered `counts`' requests and no one else: pod-1, on the node the client
/// reached, with the client's own address (no SNAT to a local endpoint); pod-2, on the
/// other node, with node1's (source-NATed there).
fn assert_both_pods_served(counts: &std::collections::BTreeMap<String, usize>, client: Ipv4Addr) {
    let served: Vec<&str> = counts.keys().map(String::as_str).collect();
    assert_eq!(
        served,
        [format!("pod-1 {client}").as_str(), "pod-2 192.168.77.11"],
        "{counts:?}"
    );
}

fn node_manifest(name: &str, addr: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1
kind: Node
metadata: {{name: {name}}}
status:
  addresses: [{{type: InternalIP, address: {addr}}}]
"
    )
}

#[test]
fn node_port_reaches_both_nodes_pods_local_policy_keeps_the_client_ended_flows_go() {
    let mut cluster = Cluster::new("nodeport");
    cluster.write_manifest("svc.yaml", &service("Cluster"));
    cluster.write_manifest("eps.yaml", ENDPOINTS);
    cluster.write_node_manifests();
    cluster.start_agents();
    cluster.wait_for_node_port(0, &["10.244.1.10:8080", "10.244.2.10:8080"]);
    cluster.wait_for_node_port(1, &["10.244.1.10:8080", "10.244.2.10:8080"]);

    // The seed's example: node1's NodePort reaches both pods. The local pod sees the client
    // (no SNAT to a local backend); the remote one sees node1's address (C08).
    let node1 = format!("192.168.77.11:{NODE_PORT}");
    let counts = cluster.requests(&node1, 40);
    let local = format!("pod-1 {CLIENT}");
    let remote = "pod-2 192.168.77.11".to_owned();
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        [local.clone(), remote],
        "{counts:?}"
    );

    // externalTrafficPolicy: Local: only node1's pod, and it sees the client (C10).
    cluster.write_manifest("svc.yaml", &service("Local"));
    cluster.wait_for_node_port(0, &["10.244.1.10:8080"]);
    let counts = cluster.requests(&node1, 20);
    assert_eq!(
        counts,
        std::collections::BTreeMap::from([(local, 20)]),
        "{counts:?}"
    );

    // Those connections are closed: once their closing lifetime has passed, the agent's
    // conntrack collector deletes their entries (the map is far from full, so its LRU
    // would have kept them).
    let pins = cluster.nodes[0].pin_path.clone();
    let entries = conntrack_entries(&pins);
    assert!(entries >= 2, "the flows' entries: {entries}");
    // `list --conntrack` shows them: the client's connections to the NodePort, rewritten to
    // the local pod, answered and closed.
    let flows = common::list_json(&pins, "--conntrack");
    let to_local_pod = |f: &&Value| {
        f["direction"] == "original"
            && f["tuple"]
                .as_str()
                .is_some_and(|t| t.starts_with(&format!("{CLIENT}:")) && t.ends_with(&node1))
            && f["rewritten"]
                .as_str()
                .is_some_and(|r| r.ends_with(" -> 10.244.1.10:8080"))
    };
    let client_flow = flows
        .iter()
        .find(to_local_pod)
        .unwrap_or_else(|| panic!("no flow from {CLIENT} to pod-1: {flows:#?}"));
    assert_eq!(
        client_flow["flags"],
        serde_json::json!([
            "backend-syn",
            "seen-reply",
            "client-fin",
            "backend-fin",
            "backend-closed-first",
            "closing"
        ]),
        "{client_flow}"
    );
    // The source-NATed flows to pod-2, which pod-2 closed first (HTTP/1.0), keep theirs
    // through its TIME_WAIT (`CT_LIFETIME_SNAT_CLOSING`, 60 s), so that their ports are not
    // given out while pod-2 may still turn a new SYN away; the others go after
    // `CT_LIFETIME_CLOSING`.
    let snat = |f: &Value| {
        f["flags"]
            .as_array()
            .is_some_and(|flags| flags.iter().any(|x| x == "snat"))
    };
    let limit = Duration::from_secs(proxy_common::CT_LIFETIME_CLOSING.into()) + CONDITION_LIMIT;
    let deadline = Instant::now() + limit;
    loop {
        let flows = common::list_json(&pins, "--conntrack");
        if flows.iter().all(snat) {
            assert!(
                !flows.is_empty(),
                "the source-NATed flows' entries went before their backend's TIME_WAIT"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "entries of flows that kept the client address left after {limit:?}: {flows:#?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `--external-clusterip`: a ClusterIP routed to a node from outside (a Service range
/// announced to the network) is served there as kube-proxy serves it, by the Service's
/// endpoints on both nodes (the remote one source-NATed); a node without the flag leaves
/// the packet as addressed, and with no route to the Service range it dead-ends there.
#[test]
fn a_cluster_ip_routed_to_a_node_is_served_with_external_clusterip() {
    let mut cluster = Cluster::new("nsclip");
    let other = cluster.add_client(Ipv4Addr::new(192, 168, 77, 101));
    ip(&cluster.client, "route add 10.96.0.0/16 via 192.168.77.11");
    ip(
        cluster.extra_client(other),
        "route add 10.96.0.0/16 via 192.168.77.12",
    );
    cluster.write_manifest("svc.yaml", &service("Cluster"));
    cluster.write_manifest("eps.yaml", ENDPOINTS);
    cluster.write_node_manifests();
    cluster.nodes[0].agent_args = vec!["--external-clusterip"];
    cluster.start_agents();
    let both = ["10.244.1.10:8080", "10.244.2.10:8080"];
    cluster.wait_for(0, "10.96.0.10:80", "external", &both);
    // Node 2 has no flag: its NodePort frontend shows its sync is done, and no external
    // ClusterIP frontend is listed.
    cluster.wait_for_node_port(1, &both);
    let listed = list(&cluster.nodes[1].pin_path).expect("list");
    assert!(
        listed
            .iter()
            .all(|f| !(f["frontend"] == "10.96.0.10:80" && f["scope"] == "external")),
        "{listed:?}"
    );

    let counts = cluster.requests("10.96.0.10:80", 30);
    assert_both_pods_served(&counts, CLIENT);
    let failed = cluster.fails(cluster.extra_client(other), None, "10.96.0.10:80");
    let errno = failed["errno"].as_i64();
    assert!(
        errno.is_none() || matches!(errno, Some(101 | 113)),
        "want a timeout, ENETUNREACH or EHOSTUNREACH, got {failed}"
    );
}

/// The north-south cases beside the seed's example, on one LoadBalancer Service and two
/// NodePort ones:
/// - C22: the LB IP admits the client inside `loadBalancerSourceRanges` and drops one
///   outside; pods are not filtered (socket layer, docs/decisions.md);
/// - C23: an externalIP that no node owns, routed to node1, is served (no source ranges);
/// - C31: an LB IP with `ipMode: Proxy` is not intercepted, from outside or from a pod;
/// - C06: a NodePort, and an externalIP no node owns, without endpoints are refused at once;
/// - C12: `externalTrafficPolicy: Local` with the only endpoint on node2: node1 drops,
///   node2 serves with the client's address;
/// - C09: the node itself reaches its own NodePort; C11: a pod on node1 reaches the `Local`
///   Service's NodePort on node1 through the cluster endpoints (pod-2);
/// - C32: a host process bound to the NodePort's port does not get the NodePort's traffic;
/// - localhost NodePorts: served to node1's processes, not to its pods, nor on node2, whose
///   agent runs with `--localhost-nodeports=false`;
/// - ICMP port unreachable from local and remote pods reaches the client translated.
#[test]
fn load_balancer_external_ip_and_node_port_cases() {
    let mut cluster = Cluster::new("nscases");
    let outsider = Ipv4Addr::new(192, 168, 77, 101);
    let xb = cluster.add_client(outsider);
    for ns in [&cluster.client, cluster.extra_client(xb)] {
        ip(ns, "route add 203.0.113.0/24 via 192.168.77.11");
        ip(ns, "route add 198.51.100.0/24 via 192.168.77.11");
    }
    cluster.write_manifest("svc.yaml", LOAD_BALANCER);
    cluster.write_manifest("eps.yaml", ENDPOINTS);
    cluster.write_manifest("others.yaml", OTHERS);
    cluster.write_manifest("loopback-lb.yaml", &loopback_load_balancer());
    cluster.write_manifest(
        "local.yaml",
        &local_node_port("local", "10.96.0.12", 30082, "10.244.2.10", "node-2"),
    );
    cluster.write_node_manifests();
    cluster.nodes[1]
        .agent_args
        .push("--localhost-nodeports=false");
    cluster.start_agents();
    let both = ["10.244.1.10:8080", "10.244.2.10:8080"];
    cluster.wait_for(0, "127.0.0.1:30080", "internal", &both);
    cluster.wait_for(0, "127.0.0.1:8080", "internal", &both);
    cluster.wait_for(0, "203.0.113.10:80", "external", &both);
    cluster.wait_for(0, "198.51.100.10:80", "external", &both);
    cluster.wait_for(0, "192.168.77.11:30081", "external", &[]);
    cluster.wait_for(0, "192.168.77.11:30082", "external", &[]);
    cluster.wait_for(0, "192.168.77.11:30082", "internal", &["10.244.2.10:8080"]);
    cluster.wait_for(1, "192.168.77.12:30082", "external", &["10.244.2.10:8080"]);
    let node1 = &cluster.nodes[0];
    let frontends = list(&node1.pin_path).expect("list");
    let lb = frontends
        .iter()
        .find(|f| f["frontend"] == "203.0.113.10:80" && f["scope"] == "external")
        .expect("the LB IP frontend");
    assert_eq!(lb["sourceRanges"], serde_json::json!(["192.168.77.100/32"]));

    // C22: inside the range, served by both pods; outside, dropped (a timeout, not a
    // refusal); a pod on node1 is not filtered.
    let counts = cluster.requests("203.0.113.10:80", 30);
    assert_both_pods_served(&counts, CLIENT);
    let dropped = cluster.fails(cluster.extra_client(xb), None, "203.0.113.10:80");
    assert!(dropped["errno"].is_null(), "not a timeout: {dropped}");
    let from_pod = cluster.requests_from(&node1.pod, Some(&node1.cgroup), "203.0.113.10:80", 10);
    assert_eq!(from_pod.values().sum::<usize>(), 10, "{from_pod:?}");

    // C23: the externalIP is served to the outsider too (source ranges are for LB IPs).
    let counts = cluster.requests_from(cluster.extra_client(xb), None, "198.51.100.10:80", 30);
    assert_both_pods_served(&counts, outsider);

    // C31: ipMode Proxy has no frontend; the packet goes on as addressed and dead-ends at
    // node1 (no route there), and a pod's connect fails in its own namespace.
    assert!(
        frontends.iter().all(|f| f["frontend"] != "203.0.113.11:80"),
        "{frontends:?}"
    );
    for (who, ns, cgroup) in [
        ("external client", &cluster.client, None),
        ("pod on node1", &node1.pod, Some(&node1.cgroup)),
    ] {
        let failed = cluster.fails(ns, cgroup, "203.0.113.11:80");
        let errno = failed["errno"].as_i64();
        assert!(
            matches!(errno, Some(101 | 113)),
            "{who}: want ENETUNREACH or EHOSTUNREACH, got {failed}"
        );
    }

    // ICMP errors about translated flows: both pods answer a UDP datagram to a closed port
    // with "port unreachable" quoting what they got; translated back, the client's
    // connected socket sees ECONNREFUSED (untranslated, it would wait for a timeout).
    for line in cluster.peer(
        &cluster.client,
        None,
        &["udp", "192.168.77.11:30099", "12", "--connected"],
    ) {
        assert_eq!(line["errno"], 111, "{line}\n{}", cluster.logs());
    }

    // C06: refused at once: TCP RST from node1's stack for its NodePort; ICMP port
    // unreachable from the program for an externalIP node1 does not own, TCP and UDP.
    let refused = cluster.fails(&cluster.client, None, "192.168.77.11:30081");
    assert_eq!(refused["errno"], 111, "{refused}");
    let refused = cluster.fails(&cluster.client, None, "198.51.100.20:80");
    assert_eq!(refused["errno"], 111, "{refused}");
    let client = &cluster.client;
    for line in cluster.peer(
        client,
        None,
        &["udp", "198.51.100.20:53", "3", "--connected"],
    ) {
        assert_eq!(line["errno"], 111, "{line}");
    }

    // C12: node1 has no endpoint of the Local Service: dropped; node2 serves, keeping the
    // client's address.
    let dropped = cluster.fails(&cluster.client, None, "192.168.77.11:30082");
    assert!(dropped["errno"].is_null(), "not a timeout: {dropped}");
    let counts = cluster.requests("192.168.77.12:30082", 10);
    assert_eq!(
        counts,
        std::collections::BTreeMap::from([(format!("pod-2 {CLIENT}"), 10)])
    );

    // NodePorts are served on every address of the node's devices, as kube-proxy's
    // `--dst-type LOCAL`: one the Node does not list (a second address on eth0), added
    // while the agent runs.
    ip(&node1.ns, "addr add 192.168.77.111/24 dev eth0");
    cluster.wait_for(0, "192.168.77.111:30080", "external", &both);
    let node1 = &cluster.nodes[0];
    let counts = cluster.requests("192.168.77.111:30080", 30);
    assert_both_pods_served(&counts, CLIENT);

    // C09: node1 itself to its own NodePort: both pods.
    let counts = cluster.requests_from(&node1.ns, Some(&node1.cgroup), "192.168.77.11:30080", 30);
    let pods: std::collections::BTreeSet<&str> =
        counts.keys().filter_map(|a| a.split(' ').next()).collect();
    assert_eq!(pods, ["pod-1", "pod-2"].into(), "{counts:?}");

    // C32: a host process may bind the NodePort's port (neither kube-proxy nor this agent
    // refuses the bind), but traffic to the NodePort keeps going to the Service.
    let mut squatter = node1.ns.command(PEER, None).expect("host process command");
    squatter.args([
        "serve",
        "--name",
        "host-process",
        "--tcp",
        &NODE_PORT.to_string(),
    ]);
    let _squatter = Proc::spawn_ready(squatter, "host process", "ready")
        .unwrap_or_else(|e| panic!("binding the NodePort's port on node1: {e:#}"));
    let counts = cluster.requests("192.168.77.11:30080", 20);
    assert!(
        counts.keys().all(|answer| answer.starts_with("pod-")),
        "{counts:?}"
    );
    let counts = cluster.requests_from(&node1.ns, Some(&node1.cgroup), "192.168.77.11:30080", 20);
    assert!(
        counts.keys().all(|answer| answer.starts_with("pod-")),
        "{counts:?}"
    );

    // C11: a pod on node1 to node1's NodePort of the Local Service: the cluster endpoints.
    let counts = cluster.requests_from(&node1.pod, Some(&node1.cgroup), "192.168.77.11:30082", 10);
    assert_eq!(
        counts,
        std::collections::BTreeMap::from([("pod-2 10.244.1.10".to_owned(), 10)])
    );

    // Localhost NodePorts (kube-proxy's `--iptables-localhost-nodeports`): node1's own
    // processes reach the NodePort on any loopback address, past the host process bound to
    // its port, and see the address they asked for as their peer; the `Local` Service's
    // too, through the cluster endpoints. 0.0.0.0 is 127.0.0.1 to the kernel, the peer
    // too. A pod's loopback is its own: nothing listens on its 127.0.0.1:30080, refused.
    for (to, peer) in [
        ("127.0.0.1:30080", "127.0.0.1:30080"),
        ("127.0.0.2:30080", "127.0.0.2:30080"),
        ("0.0.0.0:30080", "127.0.0.1:30080"),
    ] {
        let lines = cluster.attempts(&node1.ns, Some(&node1.cgroup), to, 30);
        let pods: std::collections::BTreeSet<&str> = lines
            .iter()
            .filter_map(|l| l["answer"].as_str()?.split(' ').next())
            .collect();
        assert_eq!(pods, ["pod-1", "pod-2"].into(), "{to}: {lines:?}");
        for line in &lines {
            assert_eq!(line["peer"], peer, "{line}");
        }
    }
    let counts = cluster.requests_from(&node1.ns, Some(&node1.cgroup), "127.0.0.1:30082", 5);
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["pod-2 192.168.77.11"]);
    // A load balancer's address on loopback is served where it is, as kube-proxy's exact
    // match serves it; the other loopback addresses reach NodePorts only (nothing listens
    // on node1's 8080: refused).
    let counts = cluster.requests_from(&node1.ns, Some(&node1.cgroup), "127.0.0.1:8080", 20);
    assert!(
        counts.keys().all(|answer| answer.starts_with("pod-")),
        "{counts:?}"
    );
    let refused = cluster.fails(&node1.ns, Some(&node1.cgroup), "127.0.0.2:8080");
    assert_eq!(refused["errno"], 111, "{refused}");
    let refused = cluster.fails(&node1.pod, Some(&node1.cgroup), "127.0.0.1:30080");
    assert_eq!(refused["errno"], 111, "{refused}");
    // node2's agent runs with `--localhost-nodeports=false`: its host process answers.
    let node2 = &cluster.nodes[1];
    let listed = list(&node2.pin_path).expect("list");
    assert!(
        listed
            .iter()
            .any(|f| f["frontend"] == "192.168.77.12:30080")
            && listed.iter().all(|f| {
                f["type"] != "NodePort" || !f["frontend"].as_str().unwrap_or("").starts_with("127.")
            }),
        "{listed:?}"
    );
    let mut squatter = node2.ns.command(PEER, None).expect("host process command");
    squatter.args(["serve", "--name", "host-2", "--tcp", &NODE_PORT.to_string()]);
    let _squatter_2 = Proc::spawn_ready(squatter, "host process 2", "ready")
        .unwrap_or_else(|e| panic!("binding the NodePort's port on node2: {e:#}"));
    let counts = cluster.requests_from(&node2.ns, Some(&node2.cgroup), "127.0.0.1:30080", 5);
    assert_eq!(
        counts
            .keys()
            .map(|a| a.split(' ').next())
            .collect::<Vec<_>>(),
        [Some("host-2")]
    );
    // node2 again with `--nodeport-addresses` CIDRs that hold 127.0.0.1: kube-proxy serves
    // the addresses its devices have within them, 127.0.0.1 of `lo`, and not the rest of
    // 127.0.0.0/8 (matched whole only when every address serves NodePorts).
    if let Some(mut agent) = cluster.nodes[1].agent.take() {
        agent.kill();
    }
    cluster.nodes[1].agent_args = vec!["--nodeport-addresses", "192.168.77.0/24,127.0.0.0/8"];
    cluster.start_agent(1, Some("eth0"));
    cluster.wait_for(1, "127.0.0.1:30080", "internal", &both);
    let node2 = &cluster.nodes[1];
    let served = |to: &str| -> Vec<String> {
        let counts = cluster.requests_from(&node2.ns, Some(&node2.cgroup), to, 30);
        counts
            .keys()
            .filter_map(|a| a.split(' ').next().map(str::to_owned))
            .collect()
    };
    assert_eq!(served("127.0.0.1:30080"), ["pod-1", "pod-2"]);
    assert_eq!(served("127.0.0.2:30080"), ["host-2"]);
}

const LOAD_BALANCER: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Cluster
  externalIPs: [198.51.100.10]
  loadBalancerSourceRanges: [192.168.77.100/32]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]
status:
  loadBalancer:
    ingress:
      - {ip: 203.0.113.10}
      - {ip: 203.0.113.11, ipMode: Proxy}
";

/// A LoadBalancer whose ingress IP is the node's loopback address (the API server does not
/// refuse one), on the pods' own port: not a NodePort's address however it looks. Its
/// slice is `web`'s, renamed.
fn loopback_load_balancer() -> String {
    let service = "apiVersion: v1
kind: Service
metadata: {name: loopback-lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.15
  ports: [{name: http, port: 8080, targetPort: 8080, nodePort: 30085, protocol: TCP}]
status:
  loadBalancer:
    ingress:
      - {ip: 127.0.0.1}
";
    let slice = ENDPOINTS
        .replace("name: web-1", "name: loopback-lb-1")
        .replace("service-name: web}", "service-name: loopback-lb}");
    format!("{service}---\n{slice}")
}

/// Beside `web`: `closed` (endpoints on a port nothing listens on), `empty-external` and
/// `empty` (no endpoints).
const OTHERS: &str = "apiVersion: v1
kind: Service
metadata: {name: empty-external, namespace: default}
spec:
  clusterIP: 10.96.0.14
  externalIPs: [198.51.100.20]
  ports:
    - {name: http, port: 80, protocol: TCP}
    - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: closed, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
  ports: [{name: dns, port: 53, targetPort: 5999, nodePort: 30099, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: closed-1
  namespace: default
  labels: {kubernetes.io/service-name: closed}
addressType: IPv4
ports: [{name: dns, port: 5999, protocol: UDP}]
endpoints:
  - addresses: [10.244.1.10]
    conditions: {ready: true}
    nodeName: node-1
  - addresses: [10.244.2.10]
    conditions: {ready: true}
    nodeName: node-2
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081, protocol: TCP}]
";

/// Without `--devices` the agent finds the node's device from the Node's address (these
/// node namespaces have no default route), adopts its pinned TCX links across SIGKILL
/// restarts while an external client opens TCP connections and sends UDP requests to the
/// NodePort without one failing (C33 with a NodePort), applies a Service added while it was
/// down, and detaches from the device when restarted with `--devices ''`.
#[test]
fn node_port_survives_sigkill_restarts_and_devices_follow_the_flag() {
    use std::os::unix::fs::MetadataExt;

    let mut cluster = Cluster::new("nprestart");
    write_web_with_udp(&cluster);
    cluster.start_agent(0, None);
    let both = ["10.244.1.10:8080", "10.244.2.10:8080"];
    cluster.wait_for_node_port(0, &both);
    let pin_path = cluster.nodes[0].pin_path.clone();
    let links = pin_path.join("links");
    assert_eq!(
        tcx_links(&pin_path),
        ["ekp_tcx_in@eth0", "ekp_tcx_out@eth0"]
    );
    let pin_inode = || {
        fs::metadata(links.join("ekp_tcx_in@eth0"))
            .expect("the pinned TCX link")
            .ino()
    };
    let attached = pin_inode();

    let node_port = format!("192.168.77.11:{NODE_PORT}");
    // Clients for as long as the restarts take (stopped at the end of the test).
    let tcp = cluster.spawn_client("tcp", &["tcp", &node_port, "1000000", "--every-ms", "1"]);
    let udp = cluster.spawn_client(
        "udp",
        &["udp", "192.168.77.11:30053", "1000000", "--every-ms", "1"],
    );
    tcp.wait_for_lines(1);
    udp.wait_for_lines(1);

    for round in 0..6 {
        if let Some(mut agent) = cluster.nodes[0].agent.take() {
            agent.kill();
        }
        if round == 2 {
            cluster.write_manifest(
                "later.yaml",
                &local_node_port("later", "10.96.0.20", 30090, "10.244.1.10", "node-1"),
            );
        }
        cluster.start_agent(0, None);
        // Ready again: this start loaded its programs and adopted the pins (once per start
        // in the appended log; the pinned maps alone would list the NodePort at once).
        cluster.wait_for_ready_starts(0, round + 2);
        if round >= 2 {
            cluster.wait_for(0, "192.168.77.11:30090", "external", &["10.244.1.10:8080"]);
        }
        // Both clients were answered through this restart, and after it.
        let (t, u) = (tcp.lines_so_far(), udp.lines_so_far());
        tcp.wait_for_lines(t + 20);
        udp.wait_for_lines(u + 20);
    }
    for (what, client) in [("TCP", &tcp), ("UDP", &udp)] {
        let lines = client.lines_now();
        let failed: Vec<&Value> = lines.iter().filter(|l| l["ok"] != true).collect();
        assert!(
            failed.is_empty(),
            "{what}: {} of {} failed, e.g. {}\n{}",
            failed.len(),
            lines.len(),
            failed[0],
            cluster.logs()
        );
    }
    assert_eq!(
        pin_inode(),
        attached,
        "the link was adopted, never re-pinned"
    );
    let counts = cluster.requests("192.168.77.11:30090", 5);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        [&format!("pod-1 {CLIENT}")]
    );

    // Taken out of north-south service: the links go, and node1's own stack refuses the
    // NodePort nobody listens on.
    if let Some(mut agent) = cluster.nodes[0].agent.take() {
        agent.kill();
    }
    cluster.start_agent(0, Some(""));
    cluster.wait_for(0, &node_port, "external", &both);
    let deadline = Instant::now() + CONDITION_LIMIT;
    while !tcx_links(&pin_path).is_empty() {
        assert!(
            Instant::now() < deadline,
            "TCX links still pinned: {:?}",
            tcx_links(&pin_path)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The kernel releases an unpinned link in deferred work: wait (bounded) for the detach,
    // then it must hold.
    let deadline = Instant::now() + CONDITION_LIMIT;
    while cluster.attempts(&cluster.client, None, &node_port, 1)[0]["ok"] == true {
        assert!(
            Instant::now() < deadline,
            "still translated after the detach"
        );
    }
    for _ in 0..3 {
        let refused = cluster.fails(&cluster.client, None, &node_port);
        assert_eq!(refused["errno"], 111, "{refused}");
    }
}

/// An agent on another pin directory (a changed `bpf.pinPath`) finds the first agent's
/// programs on the node's device as well as on the cgroup: `ekp_tcx_in` and `ekp_tcx_out`
/// on eth0 run before its own, from maps it does not update.
#[test]
fn an_agent_finds_another_pin_directorys_programs_on_its_devices() {
    let mut cluster = Cluster::new("npforeign");
    write_web_with_udp(&cluster);
    cluster.start_agent(0, Some("eth0"));
    cluster.wait_for_ready_starts(0, 1);
    // The second agent logs into a file of its own: the first's full syncs look too.
    let node = &mut cluster.nodes[0];
    let _first = StoppedWithPins(node.agent.take(), node.pin_path.clone(), node.log.clone());
    node.pin_path = PathBuf::from(format!("{}-second", node.pin_path.display()));
    node.log = PathBuf::from(format!("{}-second", node.log.display()));
    cluster.start_agent(0, Some("eth0"));
    let log = || fs::read_to_string(&cluster.nodes[0].log).unwrap_or_default();
    let named = |program: &str, at: &str| {
        log().lines().any(|l| {
            l.contains("another agent's program is attached here")
                && l.contains(&format!("program={program} "))
                && l.contains(&format!("at={at}"))
        })
    };
    let deadline = Instant::now() + CONDITION_LIMIT;
    while !(named("ekp_tcx_in", "eth0 ingress") && named("ekp_tcx_out", "eth0 egress")) {
        assert!(
            Instant::now() < deadline,
            "the second agent never named the first's TCX programs; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(named("ekp_connect4", "cgroup "), "{}", log());
}

/// An agent stopped, its pins removed (its programs detached) and its log removed when
/// dropped.
struct StoppedWithPins(Option<Proc>, PathBuf, PathBuf);

impl Drop for StoppedWithPins {
    fn drop(&mut self) {
        if let Some(mut agent) = self.0.take() {
            agent.terminate();
        }
        common::cleanup_pins(&self.1);
        let _ = fs::remove_file(&self.2);
    }
}

/// The north-south prefilter (`ekp_nsfilt_v1`): `ekp_tcx_in` passes at once a packet
/// whose destination has no bit in it, `ekp_tcx_out` one whose source has none, so every
/// external-scope frontend and every local backend must have its bit before it can be
/// reached: after the first sync (which arms the filter), for a frontend added later over a
/// local backend new to the filter, and after a restart that finds bits missing from the
/// pinned filter (an older agent's writes, which knew no filter) and a stale one: its first
/// sync sets the bits of all that is programmed, and no others. Each time the filter is
/// compared with what `list` shows, and the NodePorts must answer.
#[test]
fn the_prefilter_covers_every_external_frontend_and_local_backend() {
    let mut cluster = Cluster::new("nsfilter");
    write_web_with_udp(&cluster);
    cluster.start_agent(0, None);
    let both = ["10.244.1.10:8080", "10.244.2.10:8080"];
    cluster.wait_for_node_port(0, &both);
    let pin_path = cluster.nodes[0].pin_path.clone();
    let node_port = format!("192.168.77.11:{NODE_PORT}");
    let bits = wait_until_prefilter_covers_what_is_listed(&pin_path, true);
    assert_both_pods_served(&cluster.requests(&node_port, 30), CLIENT);
    // The flows source-NATed to pod-2 marked their SNAT ports, where the replies come
    // back; `list --maps` counts the bits set, of the three entries' 65536.
    let marks = pinned_filter(&pin_path, NS_FILTER_SNAT);
    let marked: u32 = marks.bits.iter().map(|w| w.count_ones()).sum();
    assert!(marked > 0, "no SNAT port marked");
    let fill = common::map_fill(&pin_path, proxy_common::MAP_NS_FILTER);
    assert_eq!(fill["entries"], bits + marked, "{fill}");
    assert_eq!(fill["capacity"], 3 * 65536, "{fill}");

    // Added while the filter is armed, over a local backend new to the filter (pod-1's
    // second address): the frontend's bit comes before its slot 0, the backend's before
    // its entry, or the SYN passes untranslated, or the pod's answer leaves so.
    ip(&cluster.nodes[0].pod, "addr add 10.244.1.11/24 dev eth0");
    cluster.write_manifest(
        "later.yaml",
        &local_node_port("later", "10.96.0.20", 30090, "10.244.1.11", "node-1"),
    );
    cluster.wait_for(0, "192.168.77.11:30090", "external", &["10.244.1.11:8080"]);
    let counts = cluster.requests("192.168.77.11:30090", 3);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        [&format!("pod-1 {CLIENT}")]
    );
    wait_until_prefilter_covers_what_is_listed(&pin_path, true);

    // The pinned filter armed without a bit of what is there, and with the bit of a local
    // backend long gone: the next agent disarms it as it loads and arms it after its first
    // sync with every bit again, and without the stale one (the outgoing bits of flows are
    // those of local backends listed, so nothing else can set it).
    if let Some(mut agent) = cluster.nodes[0].agent.take() {
        agent.kill();
    }
    let gone = (u32::from_ne_bytes([10, 244, 1, 99]), 8080u16.to_be());
    assert!(
        !pinned_filter(&pin_path, NS_FILTER_OUT).has(gone.0, gone.1),
        "the gone backend's bit is one of the listed backends' (a collision): choose another"
    );
    let mut maps = Maps::open_pinned(&pin_path).expect("opening the pinned maps");
    let mut bare = NsFilter::EMPTY;
    bare.armed = 1;
    maps.put_ns_filter(NS_FILTER_IN, &bare)
        .expect("clearing the pinned filter");
    bare.insert(gone.0, gone.1);
    maps.put_ns_filter(NS_FILTER_OUT, &bare)
        .expect("clearing the pinned filter");
    drop(maps);
    cluster.start_agent(0, None);
    cluster.wait_for_node_port(0, &both);
    wait_until_prefilter_covers_what_is_listed(&pin_path, false);
    assert!(
        !pinned_filter(&pin_path, NS_FILTER_OUT).has(gone.0, gone.1),
        "the bit of a backend gone before the restart is still set"
    );
    assert_both_pods_served(&cluster.requests(&node_port, 30), CLIENT);
    cluster.requests("192.168.77.11:30090", 3);
}

/// A Service without selector whose one endpoint is node-1's own address, with no
/// `nodeName`: a daemon on the host, as hand-written slices give them (the API server's
/// endpoints look the same).
const HOST_ENDPOINT: &str = "apiVersion: v1
kind: Service
metadata: {name: host-daemon, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  ports: [{name: https, port: 443, targetPort: 9443, nodePort: 30443, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: host-daemon-1
  namespace: default
  labels: {kubernetes.io/service-name: host-daemon}
addressType: IPv4
ports: [{name: https, port: 9443, protocol: TCP}]
endpoints:
  - addresses: [192.168.77.11]
    conditions: {ready: true}
";

/// An endpoint at a node's own address without `nodeName` is served on that node: its
/// NodePort there keeps the client's address, where source-NAT to the node's own address
/// would make a packet the stack drops (a martian: it arrives from one of the node's
/// addresses). Through the other node it is an endpoint elsewhere, source-NATed.
#[test]
fn an_endpoint_at_a_node_address_without_node_name_answers_through_both_nodes() {
    let mut cluster = Cluster::new("hostep");
    let mut serve = cluster.nodes[0]
        .ns
        .command(PEER, None)
        .expect("server command");
    serve.args(["serve", "--name", "host-1", "--tcp", "9443", "--echo-peer"]);
    let _server = Proc::spawn_ready(serve, "host-1", "ready")
        .unwrap_or_else(|e| panic!("starting the node's server: {e:#}"));
    cluster.write_manifest("svc.yaml", HOST_ENDPOINT);
    cluster.write_node_manifests();
    cluster.start_agents();
    let backend = ["192.168.77.11:9443"];
    cluster.wait_for(0, "192.168.77.11:30443", "external", &backend);
    cluster.wait_for(1, "192.168.77.12:30443", "external", &backend);
    let local = |i: usize| -> Value {
        list(&cluster.nodes[i].pin_path)
            .expect("list")
            .iter()
            .find(|f| f["frontend"] == "10.96.0.30:443")
            .map(|f| f["backends"][0]["local"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        (local(0), local(1)),
        (Value::Bool(true), Value::Bool(false))
    );
    assert_eq!(
        cluster.requests("192.168.77.11:30443", 3),
        [(format!("host-1 {CLIENT}"), 3)].into()
    );
    assert_eq!(
        cluster.requests("192.168.77.12:30443", 3),
        [("host-1 192.168.77.12".to_owned(), 3)].into()
    );
}

/// Entry `entry` of the prefilter pinned under `pin_path`.
fn pinned_filter(pin_path: &Path, entry: u32) -> NsFilter {
    Maps::open_pinned(pin_path)
        .expect("opening the pinned maps")
        .ns_filter(entry)
        .expect("reading the prefilter")
        .expect("the prefilter is pinned")
}

/// Waits (bounded) until the prefilter pinned under `pin_path` is armed with the bits of
/// the external-scope frontends and local backends `list` shows; with `exact`, with those
/// alone (the pins are this test's own, so no earlier bit is in them; an agent that arms
/// the filter with flows in the conntrack map adds theirs). A sync may land between
/// reading the list and reading the filter, and a restarted agent arms the filter only
/// after its first sync: hence the wait. Returns how many bits are set in both.
fn wait_until_prefilter_covers_what_is_listed(pin_path: &Path, exact: bool) -> u32 {
    let endpoint = |text: &str| -> (u32, u16) {
        let (addr, port) = text.rsplit_once(':').expect("addr:port");
        let addr: Ipv4Addr = addr.parse().expect("an IPv4 address");
        let port: u16 = port.parse().expect("a port");
        (u32::from_ne_bytes(addr.octets()), port.to_be())
    };
    // Bits set in `a` and not in `b`.
    let beyond = |a: &NsFilter, b: &NsFilter| -> u32 {
        a.bits
            .iter()
            .zip(b.bits.iter())
            .map(|(x, y)| (x & !y).count_ones())
            .sum()
    };
    let deadline = Instant::now() + CONDITION_LIMIT;
    loop {
        let (mut incoming, mut outgoing) = (NsFilter::EMPTY, NsFilter::EMPTY);
        let listed = list(pin_path).expect("list");
        for frontend in &listed {
            if frontend["scope"] == "external" {
                let (addr, port) = endpoint(frontend["frontend"].as_str().expect("frontend"));
                incoming.insert(addr, port);
            }
            for backend in frontend["backends"].as_array().expect("backends") {
                if backend["local"] == true {
                    let (addr, port) = endpoint(backend["address"].as_str().expect("address"));
                    outgoing.insert(addr, port);
                }
            }
        }
        let maps = Maps::open_pinned(pin_path).expect("opening the pinned maps");
        let mut differences = Vec::new();
        let set = |f: &NsFilter| f.bits.iter().map(|w| w.count_ones()).sum::<u32>();
        let bits = set(&incoming) + set(&outgoing);
        for (entry, want) in [(NS_FILTER_IN, incoming), (NS_FILTER_OUT, outgoing)] {
            let got = maps
                .ns_filter(entry)
                .expect("reading the prefilter")
                .expect("the prefilter is pinned");
            let (missing, extra) = (beyond(&want, &got), beyond(&got, &want));
            if missing != 0 || (exact && extra != 0) || got.armed == 0 {
                differences.push(format!(
                    "entry {entry}: {missing} bits missing, {extra} extra, armed {}",
                    got.armed
                ));
            }
        }
        if differences.is_empty() {
            return bits;
        }
        assert!(
            Instant::now() < deadline,
            "the prefilter differs from what is listed: {differences:?}\n{listed:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A UDP datagram larger than the path's MTU crosses a NodePort as fragments, of which only
/// the first carries the ports, both ways: to the pod on this node (DNAT), and to the pod on
/// the other node (DNAT and SNAT, forwarded past the stack), and back, the answers as large.
/// Each must be put together whole at the far end, so every fragment must have been
/// translated as its first was.
#[test]
fn large_udp_datagrams_cross_a_node_port_in_fragments_both_ways() {
    let mut cluster = Cluster::new("npfrag");
    write_web_with_udp(&cluster);
    cluster.start_agents();
    cluster.wait_for_node_port(0, &["10.244.1.10:8080", "10.244.2.10:8080"]);
    let to = "192.168.77.11:30053";
    // The UDP port comes with the same sync as the TCP one: a small request shows it is in.
    let deadline = Instant::now() + CONDITION_LIMIT;
    while cluster.peer(&cluster.client, None, &["udp", to, "1"])[0]["ok"] != true {
        assert!(
            Instant::now() < deadline,
            "{to} never answered\n{}",
            cluster.logs()
        );
    }

    let lines = cluster.peer(&cluster.client, None, &["udp", to, "20", "--size", "4000"]);
    let mut answered = std::collections::BTreeMap::new();
    for line in &lines {
        assert_eq!(
            line["ok"],
            true,
            "a 4000-byte request failed: {line}\n{}",
            cluster.logs()
        );
        assert_eq!(line["bytes"], 4000, "{line}");
        assert_eq!(line["peer"], to, "{line}");
        *answered
            .entry(line["answer"].as_str().unwrap_or("").to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(
        answered.keys().cloned().collect::<Vec<_>>(),
        ["pod-1", "pod-2"],
        "{answered:?}"
    );
}

/// A source-NATed flow's GSO packets (the client's TCP merges its segments; veths pass
/// them merged) are checked segment by segment against the next hop's MTU, as the kernel's
/// own forwarding checks them: node1 reaches node2's pods over a link of MTU 1000, and the
/// client, whose segments are 1448 bytes, learns that path MTU from an ICMP fragmentation
/// needed and gets its answer. First, as the control, the same request forwarded to the
/// pod's own address by node1's stack. (The length check alone passes a GSO packet whole,
/// and these veths deliver its segments: the client would get its answer, never the MTU.)
/// node1's eth0 fills in checksums itself, as a device without checksum offload: the
/// answer, made of a packet whose checksum was left to the device, must come through that.
#[test]
fn source_nated_gso_segments_too_big_for_the_next_hop_get_fragmentation_needed() {
    const LINK_MTU: u32 = 1000;
    let mut cluster = Cluster::new("npgso");
    assert_eq!(
        ethtool_value(&cluster.client, "eth0", ETHTOOL_GTSO, None),
        1,
        "the client's device merges TCP segments (TSO), or the test proves nothing"
    );
    let (node_1, node_2) = (&cluster.nodes[0].ns, &cluster.nodes[1].ns);
    assert_eq!(
        ethtool_value(node_1, "eth0", ETHTOOL_STXCSUM, Some(0)),
        0,
        "node1's eth0 without checksum offload"
    );
    ip(
        node_1,
        &format!(
            "link add n12 mtu {LINK_MTU} type veth peer name n21 netns {} mtu {LINK_MTU}",
            node_2.name()
        ),
    );
    ip(node_1, "addr add 10.99.0.1/30 dev n12");
    ip(node_1, "link set n12 up");
    ip(node_2, "addr add 10.99.0.2/30 dev n21");
    ip(node_2, "link set n21 up");
    ip(node_1, "route replace 10.244.2.0/24 via 10.99.0.2 dev n12");
    // node2 answers what arrives on n21 out of eth0: no reverse-path filter in the way.
    for key in ["all", "n21"] {
        node_2
            .sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0")
            .expect("rp_filter");
    }
    cluster.write_manifest("svc.yaml", &service("Cluster"));
    cluster.write_manifest("eps.yaml", &web_endpoints(false, Some("{ready: true}")));
    cluster.write_node_manifests();
    cluster.start_agents();
    cluster.wait_for_node_port(0, &["10.244.2.10:8080"]);

    ip(&cluster.client, "route add 10.244.2.0/24 via 192.168.77.11");
    let direct = large_request(&cluster.client, "10.244.2.10:8080");
    assert_eq!(
        direct,
        Ok(("pod-2 192.168.77.100".to_owned(), LINK_MTU)),
        "the control: node1's forwarding tells the client the path MTU"
    );
    let through_node_port = large_request(&cluster.client, "192.168.77.11:30080");
    assert_eq!(
        through_node_port,
        Ok(("pod-2 192.168.77.11".to_owned(), LINK_MTU)),
        "the answer (source-NATed) and the client's path MTU to the NodePort\n{}",
        cluster.logs()
    );
}

/// BIG TCP: a client whose device sends TCP segments merged past 64 KiB (their IPv4 total
/// length 0, as GRO makes them on a NIC whose `gro_ipv4_max_size` allows) uploads 16 MiB
/// through a NodePort to the node's own pod. Its merged packets are translated like any
/// other; read with their total length, they passed untranslated to node1's stack, which
/// has nothing on the NodePort and resets the connection.
#[test]
fn big_tcp_packets_through_a_node_port_are_translated() {
    const BIG: u32 = 185_000;
    const UPLOAD: usize = 16 << 20;
    let mut cluster = Cluster::new("npbig");
    cluster.write_manifest(
        "sink.yaml",
        &local_node_port("sink", "10.96.0.90", 30090, "10.244.1.10", "node-1")
            .replace("8080", "9000"),
    );
    cluster.write_node_manifests();
    cluster.start_agents();
    cluster.wait_for(0, "192.168.77.11:30090", "external", &["10.244.1.10:9000"]);
    // The client's TCP sends packets up to its device's size; the fabric's bridge port to
    // node1 passes them on merged only up to its own.
    set_gso_ipv4_max_size(&cluster.client, "eth0", BIG);
    set_gso_ipv4_max_size(&cluster.fabric, "p-n1", BIG);

    let uploaded = cluster.client.run(|| {
        use std::io::{Read, Write};
        let to: std::net::SocketAddr = "192.168.77.11:30090".parse()?;
        let mut stream = std::net::TcpStream::connect_timeout(&to, CONDITION_LIMIT)?;
        stream.set_read_timeout(Some(CONDITION_LIMIT))?;
        stream.set_write_timeout(Some(CONDITION_LIMIT))?;
        stream.write_all(&vec![b'x'; UPLOAD])?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    });
    assert_eq!(
        uploaded.map_err(|e| format!("{e:#}")),
        Ok(UPLOAD.to_string()),
        "the pod read the whole upload\n{}",
        cluster.logs()
    );
}

/// Sets `device`'s `gso_ipv4_max_size` in `ns` (rtnetlink `IFLA_GSO_IPV4_MAX_SIZE`, Linux
/// 6.3; iproute2 learnt it in 6.3 too, later than some distributions ship) and checks that
/// the device reports it.
fn set_gso_ipv4_max_size(ns: &Netns, device: &str, size: u32) {
    const IFLA_GSO_IPV4_MAX_SIZE: u16 = 63;
    let name = std::ffi::CString::new(device).expect("a device name");
    let reported = ns.run(|| {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // One request and its first answer: nlmsghdr, ifinfomsg (AF_UNSPEC, the device's
        // index), then the attributes.
        let exchange = |kind: u16, flags: u16, attribute: Option<u32>| -> anyhow::Result<Vec<u8>> {
            let mut request = Vec::with_capacity(40);
            let len: u32 = if attribute.is_some() { 40 } else { 32 };
            request.extend_from_slice(&len.to_ne_bytes());
            request.extend_from_slice(&kind.to_ne_bytes());
            request.extend_from_slice(&(libc::NLM_F_REQUEST as u16 | flags).to_ne_bytes());
            request.extend_from_slice(&[0; 8]);
            request.extend_from_slice(&[0; 4]);
            request.extend_from_slice(&(index as i32).to_ne_bytes());
            request.extend_from_slice(&[0; 8]);
            if let Some(value) = attribute {
                request.extend_from_slice(&8u16.to_ne_bytes());
                request.extend_from_slice(&IFLA_GSO_IPV4_MAX_SIZE.to_ne_bytes());
                request.extend_from_slice(&value.to_ne_bytes());
            }
            // SAFETY: sending a buffer of the length passed.
            if unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) } < 0
            {
                return Err(std::io::Error::last_os_error().into());
            }
            let mut answer = vec![0u8; 8192];
            // SAFETY: receiving into a buffer of the length passed.
            let n =
                unsafe { libc::recv(fd.as_raw_fd(), answer.as_mut_ptr().cast(), answer.len(), 0) };
            if n < 20 {
                return Err(anyhow::anyhow!("no answer ({n})"));
            }
            answer.truncate(n as usize);
            let kind = u16::from_ne_bytes([answer[4], answer[5]]);
            // NLMSG_ERROR: the error code (0 or -errno) follows the header.
            if kind == libc::NLMSG_ERROR as u16 {
                let error = i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]);
                if error != 0 {
                    return Err(std::io::Error::from_raw_os_error(-error).into());
                }
            }
            Ok(answer)
        };
        exchange(libc::RTM_NEWLINK, libc::NLM_F_ACK as u16, Some(size))?;
        let link = exchange(libc::RTM_GETLINK, 0, None)?;
        // The attributes, each 4-byte aligned, after the two headers.
        let mut at = 32;
        while at + 4 <= link.len() {
            let len = usize::from(u16::from_ne_bytes([link[at], link[at + 1]]));
            let kind = u16::from_ne_bytes([link[at + 2], link[at + 3]]);
            if len < 4 || at + len > link.len() {
                break;
            }
            if kind == IFLA_GSO_IPV4_MAX_SIZE && len == 8 {
                let value = &link[at + 4..at + 8];
                return Ok(Some(u32::from_ne_bytes([
                    value[0], value[1], value[2], value[3],
                ])));
            }
            at += (len + 3) & !3;
        }
        Ok(None)
    });
    assert_eq!(
        reported.map_err(|e| format!("{e:#}")),
        Ok(Some(size)),
        "{device}'s gso_ipv4_max_size after setting it"
    );
}

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GTSO: u32 = 0x1e;

/// An ethtool value of `device` in `ns` (`SIOCETHTOOL`, no ethtool binary needed): reads it
/// with `cmd`, or sets it to `set` with `cmd` and reads it back (with the matching get).
fn ethtool_value(ns: &Netns, device: &str, cmd: u32, set: Option<u32>) -> u32 {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    #[repr(C)]
    struct Value {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut Value,
        _rest: [u8; 16],
    }
    let call = |cmd: u32, data: u32| -> anyhow::Result<u32> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut value = Value { cmd, data };
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: &mut value,
            _rest: [0; 16],
        };
        request.name[..device.len()].copy_from_slice(device.as_bytes());
        // SAFETY: `request` names a device and points to `value`, both alive for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), SIOCETHTOOL, &mut request) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(value.data)
    };
    ns.run(|| {
        if let Some(data) = set {
            call(cmd, data)?;
            let get = match cmd {
                ETHTOOL_STXCSUM => ETHTOOL_GTXCSUM,
                other => anyhow::bail!("no get known for ethtool command {other:#x}"),
            };
            return call(get, 0);
        }
        call(cmd, 0)
    })
    .unwrap_or_else(|e| panic!("ethtool command {cmd:#x} on {device}: {e:#}"))
}

/// One HTTP request with a 12 KB head from `ns` to `to` (the first flight of a fresh
/// connection: one GSO packet of 1448-byte segments, all in the initial window): the
/// answer's body and the connection's path MTU (`IP_MTU`) once it is read.
fn large_request(ns: &Netns, to: &str) -> Result<(String, u32), String> {
    let to: std::net::SocketAddr = to.parse().expect("an address");
    ns.run(|| {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let mut stream = std::net::TcpStream::connect_timeout(&to, CONDITION_LIMIT)?;
        stream.set_read_timeout(Some(CONDITION_LIMIT))?;
        let head = format!("GET / HTTP/1.0\r\nX-Pad: {}\r\n\r\n", "x".repeat(12 * 1024));
        stream.write_all(head.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let mut mtu: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `mtu` and `len` are this frame's, of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU,
                (&raw mut mtu).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        Ok((body.to_owned(), mtu as u32))
    })
    .map_err(|e| format!("{to}: {e:#}"))
}

/// `web`'s EndpointSlice with its TCP and UDP ports: pod-2 with `pod_2` conditions, after
/// pod-1 (ready) if `pod_1`.
fn web_endpoints(pod_1: bool, pod_2: Option<&str>) -> String {
    let all = endpoints_with_udp();
    let list = all.find("endpoints:\n").expect("ENDPOINTS lists endpoints");
    let mut slice = all[..list + "endpoints:\n".len()].to_owned();
    if pod_1 {
        slice += "  - {addresses: [10.244.1.10], conditions: {ready: true}, nodeName: node-1}\n";
    }
    if let Some(conditions) = pod_2 {
        slice += &format!(
            "  - {{addresses: [10.244.2.10], conditions: {conditions}, nodeName: node-2}}\n"
        );
    }
    slice
}

/// Flows through a NodePort keep their pod while it drains, as kube-proxy leaves their
/// conntrack entries: a TCP connection while its endpoint is listed at all (serving and
/// terminating, then not even serving), a UDP flow while its endpoint serves. New flows go
/// to the ready pod from the first change. pod-2 is on node2: the flows are source-NATed.
#[test]
fn node_port_flows_keep_their_pod_while_it_drains() {
    let mut cluster = Cluster::new("npdrain");
    cluster.write_manifest("svc.yaml", &service_with_udp());
    cluster.write_manifest("eps.yaml", &web_endpoints(false, Some("{ready: true}")));
    cluster.write_node_manifests();
    cluster.start_agents();
    let udp = ("192.168.77.11:30053", "UDP", "external");
    cluster.wait_for_node_port(0, &["10.244.2.10:8080"]);
    cluster.wait_for_listed(0, udp, "backends", &["10.244.2.10:5353"]);

    let node1 = format!("192.168.77.11:{NODE_PORT}");
    let paced = ["100000", "--every-ms", "20"];
    let tcp = cluster.spawn_client(
        "tcp",
        &[&["tcp", &node1][..], &paced, &["--keep-connection"]].concat(),
    );
    let dns = cluster.spawn_client(
        "udp",
        &[&["udp", udp.0][..], &paced, &["--keep-socket"]].concat(),
    );
    tcp.wait_for_lines(10);
    dns.wait_for_lines(10);
    // From the end of a phase on: what each client saw since the phase's change.
    let since = |client: &common::BackgroundClient, from: usize, lines: usize| {
        client.wait_for_lines(from + lines);
        client.lines_now().split_off(from)
    };
    let answers = |lines: &[Value]| -> Vec<String> {
        lines
            .iter()
            .map(|l| match l["ok"] == true {
                true => format!(
                    "{} #{}",
                    l["answer"].as_str().unwrap_or(""),
                    l["connection"]
                ),
                false => format!("error {}", l["error"]),
            })
            .collect()
    };
    let pod_2 = "pod-2 192.168.77.11 #1";

    // pod-2 drains (serving, terminating), pod-1 is ready: new flows go to pod-1, the
    // flows that are there stay on pod-2.
    cluster.write_manifest(
        "eps.yaml",
        &web_endpoints(
            true,
            Some("{ready: false, serving: true, terminating: true}"),
        ),
    );
    cluster.wait_for_node_port(0, &["10.244.1.10:8080"]);
    cluster.wait_for_listed(0, udp, "backends", &["10.244.1.10:5353"]);
    // (Lingering backends are listed under the internal-scope frontends, which keep them in
    // the backends map for every frontend of the Service port.)
    let cluster_ip = |port: &'static str, proto| (port, proto, "internal");
    cluster.wait_for_listed(
        0,
        cluster_ip("10.96.0.10:53", "UDP"),
        "lingering",
        &["10.244.2.10:5353"],
    );
    let (tcp_from, dns_from) = (tcp.lines_so_far(), dns.lines_so_far());
    let fresh = cluster.requests(&node1, 10);
    assert_eq!(
        fresh.keys().collect::<Vec<_>>(),
        [&format!("pod-1 {CLIENT}")]
    );
    let tcp_lines = answers(&since(&tcp, tcp_from, 50));
    assert!(tcp_lines.iter().all(|a| a == pod_2), "{tcp_lines:?}");
    let dns_lines = answers(&since(&dns, dns_from, 50));
    assert!(
        dns_lines.iter().all(|a| a == "pod-2 #null"),
        "{dns_lines:?}"
    );

    // pod-2 stops serving: its TCP connection still goes on, its UDP flow moves to pod-1.
    cluster.write_manifest(
        "eps.yaml",
        &web_endpoints(
            true,
            Some("{ready: false, serving: false, terminating: true}"),
        ),
    );
    cluster.wait_for_listed(0, cluster_ip("10.96.0.10:53", "UDP"), "lingering", &[]);
    let (tcp_from, dns_from) = (tcp.lines_so_far(), dns.lines_so_far());
    let tcp_lines = answers(&since(&tcp, tcp_from, 50));
    assert!(tcp_lines.iter().all(|a| a == pod_2), "{tcp_lines:?}");
    let dns_lines = answers(&since(&dns, dns_from, 50));
    let moved = dns_lines.iter().position(|a| a == "pod-1 #null");
    assert!(
        moved.is_some_and(|i| dns_lines[i..].iter().all(|a| a == "pod-1 #null")),
        "the UDP flow did not move to pod-1 for good: {dns_lines:?}"
    );

    // pod-2 leaves the slice: its TCP connection ends (its next packet starts a flow to
    // pod-1, which knows no such connection), and the client's next one reaches pod-1.
    // (Counted from before the change: the connection may end before the list shows it.)
    let tcp_from = tcp.lines_so_far();
    cluster.write_manifest("eps.yaml", &web_endpoints(true, None));
    cluster.wait_for_listed(0, cluster_ip("10.96.0.10:80", "TCP"), "lingering", &[]);
    let tcp_lines = answers(&since(&tcp, tcp_from, 50));
    let pod_1 = format!("pod-1 {CLIENT} #2");
    let reconnected = tcp_lines.iter().position(|a| *a == pod_1);
    assert!(
        reconnected.is_some_and(|i| i > 0
            && tcp_lines[i - 1].starts_with("error")
            && tcp_lines[..i - 1].iter().all(|a| a == pod_2)
            && tcp_lines[i..].iter().all(|a| *a == pod_1)),
        "{tcp_lines:?}"
    );
}

/// A restart that resizes the conntrack map (`--map-size-nat-ct`) under a source-NATed
/// NodePort connection: its entries are copied into the new map as the programs are
/// swapped, so the connection carries on, one connection throughout (C33 with a resize).
/// Lost, the connection's next packet would start a flow on another SNAT port, which pod-2
/// (on node2) knows nothing of and resets.
#[test]
fn a_node_port_connection_survives_a_restart_that_resizes_the_conntrack_map() {
    let mut cluster = Cluster::new("npresize");
    cluster.write_manifest("svc.yaml", &service_with_udp());
    cluster.write_manifest("eps.yaml", &web_endpoints(false, Some("{ready: true}")));
    cluster.write_node_manifests();
    cluster.start_agents();
    cluster.wait_for_node_port(0, &["10.244.2.10:8080"]);

    let node1 = format!("192.168.77.11:{NODE_PORT}");
    let tcp = cluster.spawn_client(
        "tcp",
        &[
            "tcp",
            &node1,
            "1000000",
            "--every-ms",
            "10",
            "--keep-connection",
        ],
    );
    tcp.wait_for_lines(10);
    if let Some(mut agent) = cluster.nodes[0].agent.take() {
        agent.kill();
    }
    cluster.nodes[0].agent_args = vec!["--map-size-nat-ct", "131072"];
    cluster.start_agent(0, Some("eth0"));
    // The new map takes the pin once the new programs are attached.
    let pin = cluster.nodes[0].pin_path.join("maps/ekp_nat_ct_v1");
    let size = || {
        aya::maps::MapInfo::from_pin(&pin)
            .map(|i| i.max_entries())
            .ok()
    };
    let deadline = Instant::now() + CONDITION_LIMIT;
    while size() != Some(131072) {
        assert!(
            Instant::now() < deadline,
            "the conntrack map was not resized: {:?}\n{}",
            size(),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Requests after the resize, on the connection that began before it.
    let lines = tcp.lines_after(tcp.lines_so_far(), 50);
    let other: Vec<&Value> = lines
        .iter()
        .filter(|l| l["ok"] != true || l["connection"] != 1 || l["answer"] != "pod-2 192.168.77.11")
        .collect();
    assert!(
        other.is_empty(),
        "{} of {} failed or came on another connection, e.g. {}\n{}",
        other.len(),
        lines.len(),
        other[0],
        cluster.logs()
    );
}

/// The manifests of `web` with its UDP port too, on both pods, and the two Nodes.
fn write_web_with_udp(cluster: &Cluster) {
    cluster.write_manifest("svc.yaml", &service_with_udp());
    cluster.write_manifest("eps.yaml", &endpoints_with_udp());
    cluster.write_node_manifests();
}

/// [`ENDPOINTS`] with the UDP port too.
fn endpoints_with_udp() -> String {
    ENDPOINTS.replace(
        "ports: [{name: http, port: 8080, protocol: TCP}]",
        "ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]",
    )
}

fn service_with_udp() -> String {
    service("Cluster").replace(
        "ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]",
        "ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}",
    )
}

/// A NodePort Service `name` with `externalTrafficPolicy: Local` on port 80 -> 8080, and
/// its one endpoint `addr` on `node`.
fn local_node_port(name: &str, cluster_ip: &str, node_port: u16, addr: &str, node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: NodePort
  clusterIP: {cluster_ip}
  externalTrafficPolicy: Local
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {node_port}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
  - addresses: [{addr}]
    conditions: {{ready: true}}
    nodeName: {node}
"
    )
}

/// The TCX link pins (`<program>@<device>`) under an agent's pin path, sorted.
fn tcx_links(pin_path: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(pin_path.join("links"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.contains('@'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Detected devices are followed while the agent runs: with a Node address no device
/// carries (and no default route in the node namespace) nothing is attached; once the Node
/// shows eth0's address, eth0 gets the programs and the NodePort answers.
#[test]
fn detected_devices_follow_the_node_addresses() {
    let mut cluster = Cluster::new("npfollow");
    cluster.write_manifest("svc.yaml", &service("Cluster"));
    cluster.write_manifest("eps.yaml", ENDPOINTS);
    let elsewhere = Ipv4Addr::new(192, 168, 77, 99);
    cluster.write_manifest("node-1.yaml", &node_manifest("node-1", elsewhere));
    cluster.start_agent(0, None);
    let both = ["10.244.1.10:8080", "10.244.2.10:8080"];
    cluster.wait_for(0, &format!("{elsewhere}:{NODE_PORT}"), "external", &both);
    assert!(tcx_links(&cluster.nodes[0].pin_path).is_empty());

    cluster.write_manifest(
        "node-1.yaml",
        &node_manifest("node-1", cluster.nodes[0].eth0),
    );
    cluster.wait_for_node_port(0, &both);
    let deadline = Instant::now() + CONDITION_LIMIT;
    while tcx_links(&cluster.nodes[0].pin_path) != ["ekp_tcx_in@eth0", "ekp_tcx_out@eth0"] {
        assert!(
            Instant::now() < deadline,
            "eth0 never got the programs: {:?}\n{}",
            tcx_links(&cluster.nodes[0].pin_path),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let counts = cluster.requests(&format!("192.168.77.11:{NODE_PORT}"), 20);
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
}
