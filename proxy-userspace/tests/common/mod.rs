//! Harness for the privileged tests: a namespace topology (xtask's fixture), a manifests
//! directory, the real `ebpf-kube-proxy run` with its own cgroup and pins, and helpers to
//! wait for the datapath and to drive `ekp-peer` clients. Everything is removed on drop.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::netns::{self, Proc, Topology};

pub const AGENT: &str = env!("CARGO_BIN_EXE_ebpf-kube-proxy");
pub const PEER: &str = env!("CARGO_BIN_EXE_ekp-peer");

/// Waiting for a condition gives up after this long; it is a hang guard, not a timing.
pub const CONDITION_LIMIT: Duration = Duration::from_secs(20);

pub struct Harness {
    pub prefix: String,
    pub manifests: PathBuf,
    pub pin_path: PathBuf,
    agent: Option<Proc>,
    pub topo: Topology,
}

impl Harness {
    /// Root and kernel checks, then the topology with the given pods and an empty manifests
    /// directory. The agent is not started yet.
    pub fn new(tag: &str, pods: &[&str]) -> Self {
        if let Err(e) = netns::require_privileges() {
            panic!("privileged test `{tag}` cannot run: {e:#}");
        }
        ensure_bpffs();
        let prefix = netns::unique_prefix(&format!("ekpt-{tag}"));
        let topo = Topology::create(&prefix, pods)
            .unwrap_or_else(|e| panic!("building the namespace topology: {e:#}"));
        let manifests = std::env::temp_dir().join(format!("{prefix}-manifests"));
        fs::create_dir_all(&manifests).expect("creating the manifests directory");
        Harness {
            pin_path: PathBuf::from("/sys/fs/bpf").join(&prefix),
            prefix,
            manifests,
            agent: None,
            topo,
        }
    }

    /// Starts `ebpf-kube-proxy run` on the manifests directory, attached to the test cgroup.
    pub fn start_agent(&mut self) {
        let manifests = self.manifests.clone();
        self.start_agent_with(&["--manifests".as_ref(), manifests.as_os_str()]);
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.child.id())
    }

    /// Starts `ebpf-kube-proxy run <source_args>` (e.g. `--kubeconfig FILE`), attached to the
    /// test cgroup, with this test's pins and loopback-only HTTP endpoints.
    pub fn start_agent_with(&mut self, source_args: &[&std::ffi::OsStr]) {
        self.spawn_agent(Command::new(AGENT), source_args);
    }

    /// [`Harness::start_agent`] with only the capabilities `caps` (as `setpriv` names them,
    /// e.g. `net_admin`): the bounding set a container runtime would give it. Root in the
    /// host's user namespace, as in the chart.
    pub fn start_agent_with_capabilities(&mut self, caps: &[&str]) {
        let manifests = self.manifests.clone();
        self.spawn_agent(
            agent_with_capabilities(caps),
            &["--manifests".as_ref(), manifests.as_os_str()],
        );
    }

    /// Starts the agent on the manifests directory inside the node namespace (whose bridge
    /// has `netns::BRIDGE_ADDR`), with `extra` arguments: for tests of servers the agent
    /// opens itself, such as health-check node ports, which must not touch the host's
    /// namespace. Its `/healthz` and `/metrics` are then in that namespace too.
    pub fn start_agent_in_node(&mut self, extra: &[&str]) {
        let command = self
            .topo
            .node
            .command(AGENT, None)
            .expect("agent command in the node namespace");
        let manifests = self.manifests.clone();
        let mut args: Vec<&std::ffi::OsStr> = vec!["--manifests".as_ref(), manifests.as_os_str()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        self.spawn_agent(command, &args);
    }

    /// The test's own arguments come last: the agent takes the last value of a repeated
    /// flag (as kube-proxy does), so a test may replace a default below.
    fn spawn_agent(&mut self, command: Command, source_args: &[&std::ffi::OsStr]) {
        let log = self.agent_log_path();
        let pins = self.pin_path.clone();
        self.agent = Some(self.spawn_agent_logging_to(command, &pins, source_args, &log));
    }

    /// A second agent beside the harness's own, on the same manifests, pins and cgroup,
    /// logging into the same log: killed when the returned process is dropped.
    pub fn spawn_second_agent(&self) -> Proc {
        let log = self.agent_log_path();
        self.spawn_agent_on(Command::new(AGENT), &self.pin_path, &log, &[])
    }

    /// An agent (`command`: [`AGENT`], or [`agent_with_capabilities`]) beside the
    /// harness's own, on the same manifests and cgroup, with the pins under `pin_path`,
    /// logging into `log`, with `extra` arguments: killed when the returned process is
    /// dropped.
    pub fn spawn_agent_on(
        &self,
        command: Command,
        pin_path: &Path,
        log: &Path,
        extra: &[&str],
    ) -> Proc {
        let manifests = self.manifests.clone();
        let mut args: Vec<&std::ffi::OsStr> = vec!["--manifests".as_ref(), manifests.as_os_str()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        self.spawn_agent_logging_to(command, pin_path, &args, log)
    }

    fn spawn_agent_logging_to(
        &self,
        mut command: Command,
        pin_path: &Path,
        source_args: &[&std::ffi::OsStr],
        log: &Path,
    ) -> Proc {
        command
            .arg("--pin-path")
            .arg(pin_path)
            .arg("run")
            .arg("--cgroup")
            .arg(self.topo.cgroup.path())
            .args([
                "--node-name",
                "node-1",
                "--min-sync-period",
                "100ms",
                // Loopback, any free port: tests run in parallel on one host.
                "--healthz-bind-address",
                "127.0.0.1:0",
                "--metrics-bind-address",
                "127.0.0.1:0",
                // No north-south programs: the agent may run in the host's namespace, whose
                // devices a test must never touch.
                "--devices",
                "",
            ])
            .args(source_args)
            .env("EKP_LOG", "info");
        // The agent's log goes to a file the test can read (and that is shown on failure).
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("creating the agent log");
        command.stderr(log);
        Proc::spawn(command, "ebpf-kube-proxy").expect("starting the agent")
    }

    fn agent_log_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}-agent.log", self.prefix))
    }

    /// Everything the agent logged so far (all runs).
    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.agent_log_path()).unwrap_or_default()
    }

    /// Waits until the agent's log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + CONDITION_LIMIT;
        while Instant::now() < deadline {
            if self.agent_log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "the agent never logged {needle:?}; log:\n{}",
            self.agent_log()
        );
    }

    /// Waits until the agent's log says "datapath ready" `n` times (once per start).
    pub fn wait_for_ready_starts(&self, n: usize) {
        self.wait_for_log_times("datapath ready", n);
    }

    /// Waits until the agent's log (appended to at every start) contains `needle` `n`
    /// times.
    pub fn wait_for_log_times(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + CONDITION_LIMIT;
        while self.agent_log().matches(needle).count() < n {
            assert!(
                Instant::now() < deadline,
                "the agent never logged {needle:?} for the {n}th time; log:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes the Service `web` on `vip` (`http` 80/TCP, `dns` 53/UDP) and its slice: pods
    /// 10.244.0.10 and .11, ready, serving 8080/TCP and 5353/UDP (`serve(&[8080], &[5353])`).
    pub fn write_web_with_dns(&self, vip: &str) {
        self.write_manifest(
            "svc.yaml",
            &service("web", vip, &[("http", 80, "TCP"), ("dns", 53, "UDP")]),
        );
        self.write_manifest(
            "eps.yaml",
            &slice(
                "web-1",
                "web",
                &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
                &[("10.244.0.10", true), ("10.244.0.11", true)],
            ),
        );
    }

    /// Waits until the agent exits on its own, and returns how; `None` if it still runs
    /// after the harness's time limit.
    pub fn wait_for_agent_exit(&mut self) -> Option<std::process::ExitStatus> {
        let agent = self.agent.as_mut()?;
        let deadline = Instant::now() + CONDITION_LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL, as a crash or an OOM kill would end it.
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }

    /// Starts `ekp-peer <args>` as a client in the background (client namespace, test
    /// cgroup). Its JSON lines go to a file (a pipe nobody reads would block it), read by
    /// `BackgroundClient::lines` once it is done.
    pub fn spawn_client(&self, name: &str, args: &[&str]) -> BackgroundClient {
        let mut command = self
            .topo
            .client
            .ns
            .command(PEER, Some(&self.topo.cgroup))
            .expect("client command");
        command.args(args);
        let output = std::env::temp_dir().join(format!("{}-{name}.jsonl", self.prefix));
        BackgroundClient::spawn(command, output)
    }

    /// The address the agent logged for one of its HTTP servers ("serving healthz on
    /// http://127.0.0.1:PORT"), once it did.
    pub fn served_address(&self, what: &str) -> String {
        let needle = format!("serving {what} on http://");
        self.wait_for_log(&needle);
        address_after(&self.agent_log(), &needle)
    }

    pub fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.terminate();
        }
    }

    /// Writes a manifest atomically (rename), as a ConfigMap volume update does.
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).expect("writing manifest");
        fs::rename(&tmp, self.manifests.join(file)).expect("renaming manifest into place");
    }

    pub fn remove_manifest(&self, file: &str) {
        fs::remove_file(self.manifests.join(file)).expect("removing manifest");
    }

    /// `ebpf-kube-proxy list -o json` on this test's pins.
    pub fn list(&self) -> Result<Vec<Value>, String> {
        let out = Command::new(AGENT)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .args(["list", "-o", "json"])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// The pinned map `map`'s line of `ebpf-kube-proxy list --maps -o json` (`entries`,
    /// `capacity`).
    pub fn map_fill(&self, map: &str) -> Value {
        map_fill(&self.pin_path, map)
    }

    /// Entries in the pinned map `map`.
    pub fn map_entries(&self, map: &str) -> u64 {
        self.map_fill(map)["entries"]
            .as_u64()
            .unwrap_or_else(|| panic!("{map}: no entry count"))
    }

    /// Waits until the pinned map `map` holds `n` entries.
    pub fn wait_for_map_entries(&self, map: &str, n: u64) {
        let deadline = Instant::now() + CONDITION_LIMIT;
        let mut entries = self.map_entries(map);
        while entries != n {
            assert!(
                Instant::now() < deadline,
                "{map} never held {n} entries; it holds {entries}"
            );
            std::thread::sleep(Duration::from_millis(20));
            entries = self.map_entries(map);
        }
    }

    /// Waits until `list` shows `frontend` (e.g. "10.96.0.10:80", "TCP") with exactly
    /// `backends` (addr:port, any order); an empty slice waits for "no backends", and
    /// `None` waits for the frontend to be gone.
    pub fn wait_for_frontend(&mut self, frontend: &str, proto: &str, backends: Option<&[&str]>) {
        self.wait_for_frontend_within(CONDITION_LIMIT, frontend, proto, backends);
    }

    /// [`Harness::wait_for_frontend`], giving up after `limit`.
    pub fn wait_for_frontend_within(
        &mut self,
        limit: Duration,
        frontend: &str,
        proto: &str,
        backends: Option<&[&str]>,
    ) {
        let mut want: Option<Vec<String>> =
            backends.map(|b| b.iter().map(|s| s.to_string()).collect());
        if let Some(w) = want.as_mut() {
            w.sort();
        }
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        while Instant::now() < deadline {
            // A dead agent will never converge; fail at once with its status.
            if let Some(agent) = self.agent.as_mut()
                && let Ok(Some(status)) = agent.child.try_wait()
            {
                panic!("ebpf-kube-proxy exited early: {status}");
            }
            match self.list() {
                Ok(frontends) => {
                    let found = frontends.iter().find(|f| {
                        f["frontend"] == frontend
                            && f["protocol"] == proto
                            && f["scope"] == "internal"
                    });
                    let have = found.map(|f| {
                        let mut b: Vec<String> = f["backends"]
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
                    if have == want {
                        return;
                    }
                    last = format!("{frontends:?}");
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("frontend {frontend}/{proto} never reached backends {want:?}; last list: {last}");
    }

    /// Runs `ekp-peer <args>` as a client in the client namespace and test cgroup and
    /// parses its JSON lines.
    pub fn client(&self, args: &[&str]) -> Vec<Value> {
        let out = self
            .topo
            .client_run(Path::new(PEER), args)
            .unwrap_or_else(|e| panic!("client {args:?}: {e:#}"));
        out.lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad client line {l:?}: {e}"))
            })
            .collect()
    }

    pub fn serve(&self, tcp: &[u16], udp: &[u16]) -> Vec<Proc> {
        self.topo
            .serve(Path::new(PEER), tcp, udp)
            .unwrap_or_else(|e| panic!("starting servers: {e:#}"))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop_agent();
        cleanup_pins(&self.pin_path);
        let _ = fs::remove_dir_all(&self.manifests);
        if std::thread::panicking() {
            eprintln!("--- agent log of {} ---\n{}", self.prefix, self.agent_log());
        }
        let _ = fs::remove_file(self.agent_log_path());
        // The topology (namespaces, cgroup) drops after this.
    }
}

/// The agent's command with only the capabilities `caps` (as `setpriv` names them, e.g.
/// `net_admin`) in its bounding set: what a container runtime would give it.
pub fn agent_with_capabilities(caps: &[&str]) -> Command {
    let bounding: String = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut command = Command::new("setpriv");
    command.args(["--bounding-set", &bounding, AGENT]);
    command
}

/// What follows the first `needle` in `log`, up to the next space: the address in a line
/// such as "serving metrics on http://127.0.0.1:PORT".
pub fn address_after(log: &str, needle: &str) -> String {
    let start = log.find(needle).map(|i| i + needle.len()).unwrap_or(0);
    log[start..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// `ebpf-kube-proxy list <view> -o json` on the pins under `pin_path` (`view`: `--maps`,
/// `--conntrack`).
pub fn list_json(pin_path: &Path, view: &str) -> Vec<Value> {
    let out = Command::new(AGENT)
        .arg("--pin-path")
        .arg(pin_path)
        .args(["list", view, "-o", "json"])
        .output()
        .unwrap_or_else(|e| panic!("list {view}: {e}"));
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The line of the map `map` pinned under `pin_path` in `ebpf-kube-proxy list --maps -o
/// json` (`entries`, `capacity`).
pub fn map_fill(pin_path: &Path, map: &str) -> Value {
    list_json(pin_path, "--maps")
        .into_iter()
        .find(|f| f["map"] == map)
        .unwrap_or_else(|| panic!("{map} missing from `list --maps`"))
}

/// `ebpf-kube-proxy cleanup` on a test's pins (detaches its programs); failures are
/// reported, not raised, since this runs in Drop.
pub fn cleanup_pins(pin_path: &Path) {
    let cleanup = Command::new(AGENT)
        .arg("--pin-path")
        .arg(pin_path)
        .arg("cleanup")
        .output();
    match cleanup {
        Ok(out) if out.status.success() => {}
        other => eprintln!("cleanup of {} failed: {other:?}", pin_path.display()),
    }
}

/// A plain HTTP/1.0 GET on loopback: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("sending request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading response");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// A test's pin directory (not created yet), removed with everything in it when the test
/// ends.
pub struct Pins(pub PathBuf);

impl Pins {
    /// Root and kernel checks, then a pin directory named after `tag`.
    pub fn new(tag: &str) -> Self {
        if let Err(e) = netns::require_privileges() {
            panic!("privileged test `{tag}` cannot run: {e:#}");
        }
        ensure_bpffs();
        Pins(PathBuf::from("/sys/fs/bpf").join(netns::unique_prefix(&format!("ekpt-{tag}"))))
    }

    /// The pin of the map `name`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.0.join("maps").join(name)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = proxy_userspace::dataplane::cleanup(&self.0) {
            eprintln!("cleanup of {} failed: {e:#}", self.0.display());
        }
    }
}

/// Mounts bpffs at /sys/fs/bpf once per test process, so that parallel agents never race
/// to mount it themselves.
pub fn ensure_bpffs() {
    static ONCE: Mutex<bool> = Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return;
    }
    let fs_type = Command::new("stat")
        .args(["-f", "-c", "%T", "/sys/fs/bpf"])
        .output()
        .expect("stat /sys/fs/bpf");
    if String::from_utf8_lossy(&fs_type.stdout).trim() != "bpf_fs" {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting bpffs at /sys/fs/bpf failed");
    }
    *done = true;
}

/// The traffic of a restart test: a TCP connection to the `web` Service of
/// [`Harness::write_web_with_dns`] every millisecond, and one connected UDP socket sending a
/// request to its DNS port every 10 ms, until the test ends.
pub struct ClientsUnderLoad {
    tcp: BackgroundClient,
    udp: BackgroundClient,
}

impl ClientsUnderLoad {
    /// A harness with two pods serving `web` (10.96.0.10) and its agent up, and the clients
    /// started and answered a few times. The servers live as long as the returned `Proc`s.
    pub fn start(tag: &str) -> (Harness, Vec<Proc>, Self) {
        let mut h = Harness::new(tag, &["pod-a", "pod-b"]);
        let servers = h.serve(&[8080], &[5353]);
        h.write_web_with_dns("10.96.0.10");
        h.start_agent();
        let both = ["10.244.0.10:8080", "10.244.0.11:8080"];
        h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&both));
        // For as long as the test takes (stopped when it ends).
        let tcp = h.spawn_client(
            "tcp",
            &["tcp", "10.96.0.10:80", "1000000", "--every-ms", "1"],
        );
        let udp_args = [
            "udp",
            "10.96.0.10:53",
            "1000000",
            "--connected",
            "--keep-socket",
            "--every-ms",
            "10",
        ];
        let udp = h.spawn_client("udp", &udp_args);
        tcp.wait_for_lines(50);
        udp.wait_for_lines(5);
        (h, servers, ClientsUnderLoad { tcp, udp })
    }

    /// How many requests each client made so far (TCP, UDP).
    pub fn so_far(&self) -> (usize, usize) {
        (self.tcp.lines_so_far(), self.udp.lines_so_far())
    }

    /// Waits until both clients have made 300 (TCP) and 30 (UDP) requests since `mark`
    /// (`so_far` at the event the test is about), then fails unless every request so far
    /// reached the Service and saw it as its peer.
    pub fn assert_all_answered(self, mark: (usize, usize)) {
        for (what, client, before, after, peer) in [
            ("TCP", &self.tcp, mark.0, 300, "10.96.0.10:80"),
            ("UDP", &self.udp, mark.1, 30, "10.96.0.10:53"),
        ] {
            client.wait_for_lines(before + after);
            let lines = client.lines_now();
            let failed: Vec<_> = lines
                .iter()
                .filter(|l| l["ok"] != true || l["peer"] != peer)
                .collect();
            assert!(
                failed.is_empty(),
                "{what}: {} failed or saw another peer than {peer}, e.g. {}",
                failed.len(),
                failed[0]
            );
        }
    }
}

/// Runs `bpftool -j args` and parses what it printed (`link show pinned` prints the link,
/// then exits with 255 on the bpftool these tests use: the exit status is not looked at).
pub fn bpftool_json(args: &[&str]) -> Value {
    let out = Command::new(xtask::toolchain::bpftool())
        .arg("-j")
        .args(args)
        .output()
        .expect("running bpftool");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool {args:?}: {e}: {out:?}"))
}

/// Map sizes for tests that load the object with a few entries at most.
pub const SMALL_MAPS: proxy_userspace::dataplane::MapSizes = proxy_userspace::dataplane::MapSizes {
    services: 64,
    backends: 64,
    rev_nat: 64,
    sock_rev_nat: 64,
    affinity: 64,
    nat_ct: 64,
    source_ranges: 64,
};

/// A client running beside the test; killed and its output removed on drop.
pub struct BackgroundClient {
    child: std::process::Child,
    output: PathBuf,
}

impl BackgroundClient {
    /// Starts `command` (an `ekp-peer` client) with its JSON lines going to `output`.
    pub fn spawn(mut command: Command, output: PathBuf) -> Self {
        let file = fs::File::create(&output).expect("creating the client output file");
        command.stdout(file);
        let child = command.spawn().expect("starting the client");
        BackgroundClient { child, output }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How many requests it has reported so far (complete lines, as `lines_now` reads).
    pub fn lines_so_far(&self) -> usize {
        fs::read_to_string(&self.output).map_or(0, |s| s.matches('\n').count())
    }

    /// Waits (bounded) until it has reported `more` requests after the first `mark`, then
    /// returns every request reported so far: for a client that runs until the test stops
    /// it, judged on what it did after an event.
    pub fn lines_after(&self, mark: usize, more: usize) -> Vec<Value> {
        self.wait_for_lines(mark + more);
        self.lines_now()
    }

    /// Waits (bounded) until it has reported `n` requests.
    pub fn wait_for_lines(&self, n: usize) {
        let deadline = Instant::now() + CONDITION_LIMIT;
        while self.lines_so_far() < n {
            assert!(
                Instant::now() < deadline,
                "the client never reported {n} requests"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The requests it has reported so far, parsed (a line still being written is left
    /// for the next call).
    pub fn lines_now(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.output).unwrap_or_default();
        let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
        complete
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad client line {l:?}: {e}"))
            })
            .collect()
    }

    /// Waits for the client to finish and parses its JSON lines.
    pub fn lines(mut self) -> Vec<Value> {
        let status = self.child.wait().expect("waiting for the client");
        assert!(status.success(), "client failed: {status}");
        fs::read_to_string(&self.output)
            .expect("reading the client output")
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad client line {l:?}: {e}"))
            })
            .collect()
    }
}

impl Drop for BackgroundClient {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(&self.output);
    }
}

/// Counts answers per responder among successful requests; panics on any failure.
pub fn answers(lines: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in lines {
        assert_eq!(line["ok"], true, "request failed: {line}");
        *counts
            .entry(line["answer"].as_str().unwrap_or("").to_owned())
            .or_insert(0) += 1;
    }
    counts
}

/// A ClusterIP Service manifest. `ports`: (name, port, protocol); the port is a u32 so that
/// tests can write out-of-range ports.
pub fn service(name: &str, cluster_ip: &str, ports: &[(&str, u32, &str)]) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, p, proto)| format!("  - {{name: {n}, port: {p}, protocol: {proto}}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: ClusterIP\n  clusterIP: {cluster_ip}\n  ports:\n{ports}"
    )
}

/// An EndpointSlice for Service `service`. `ports`: (name, port, protocol); `endpoints`:
/// (address, ready).
pub fn slice(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(&str, bool)],
) -> String {
    let endpoints: Vec<(&str, &str)> = endpoints
        .iter()
        .map(|(addr, ready)| {
            (
                *addr,
                if *ready {
                    "{ready: true}"
                } else {
                    "{ready: false}"
                },
            )
        })
        .collect();
    slice_with_conditions(name, service, ports, &endpoints)
}

/// An EndpointSlice whose endpoints each come with their conditions, a YAML map such as
/// `{ready: false, serving: true, terminating: true}`.
pub fn slice_with_conditions(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(&str, &str)],
) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, p, proto)| format!("  - {{name: {n}, port: {p}, protocol: {proto}}}\n"))
        .collect();
    let endpoints: String = endpoints
        .iter()
        .map(|(addr, conditions)| {
            format!("  - addresses: [\"{addr}\"]\n    conditions: {conditions}\n")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n{ports}endpoints:\n{endpoints}"
    )
}
