//! One benchmark run: for each N, program every mode from empty (timed), measure latency
//! (ClusterIP from each mode's client, NodePort from its external client) in rounds whose
//! clients take turns (`lockstep`), time endpoint changes, read the agent's memory.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xtask::{cmd, netns};

use super::iptables::{self, Sync};
use super::lockstep;
use super::manifests;
use super::nftables;
use super::progstats;
use super::scenario::{
    self, MEASURED_NAME, MEASURED_VIP, POD_PORT, REMOTE_ENDPOINTS, SERVICE_PORT, Service,
    TARGET_PORT,
};
use super::topology::{self, EXTERNAL_DEVICE, PODS, REMOTE_DEVICE, Topology};
use super::{Metric, Mode, check_interrupted};

pub struct Binaries {
    pub agent: PathBuf,
    pub bench: PathBuf,
    /// `iptables-restore`, or the `-legacy` / `-nft` variant asked for.
    pub iptables_restore: String,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub services: Vec<usize>,
    /// Measured operations per mode and N for connect, crr and udp (rr and udp rr, cheaper
    /// per operation, get 2.5 times).
    pub samples: usize,
    pub rounds: usize,
    pub warmup: usize,
    pub changes: usize,
    /// The modes measured (`--modes`); the others' results stay empty.
    pub modes: Vec<Mode>,
    /// The CPU the servers, the latency clients and the change prober are confined to
    /// (`--cpu`); `None`: any.
    pub cpu: Option<usize>,
    /// When the latency rounds must be over (`--budget`); `None`: no limit. See
    /// [`another_round`].
    pub deadline: Option<Instant>,
}

/// The fewest latency rounds an N gets whatever the budget says: enough for the
/// per-round ratios to show a spread.
pub const MIN_ROUNDS: usize = 3;

/// Whether the latency phase at one N starts round `done + 1` of `rounds`: always up to
/// [`MIN_ROUNDS`], then only if that round, at the pace of those before it (`spent` for
/// `done` rounds), and the statistics pass after it (one batch per metric in one of the
/// `modes` measured, so a `modes`-th of a round) end before `deadline` (`left` from now).
/// The rounds are the only part of a run whose length is chosen: programming and endpoint
/// changes are what the modes cost.
pub fn another_round(
    done: usize,
    rounds: usize,
    spent: Duration,
    modes: usize,
    left: Option<Duration>,
) -> bool {
    if done >= rounds {
        return false;
    }
    let Some(left) = left else {
        return true;
    };
    if done < MIN_ROUNDS {
        return true;
    }
    let per_round = spent / done as u32;
    per_round + per_round / modes.max(1) as u32 <= left
}

/// Latency samples of one metric, merged over the batches.
#[derive(Default, Debug, Clone)]
pub struct Latency {
    pub samples_ns: Vec<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// SYNs the client's kernel sent again during the measured operations.
    pub syn_retransmits: u64,
    /// Time spent in the measured loops (for the rate).
    pub busy_s: f64,
    /// Each round's p50 (its one batch), in µs: every mode has one batch per metric and
    /// round, measured in turns with the others' (`lockstep`), so per-round ratios are
    /// paired.
    pub round_p50_us: Vec<f64>,
}

#[derive(Default, Debug)]
pub struct ModeResult {
    pub latency: BTreeMap<Metric, Latency>,
    pub programming_ms: Option<f64>,
    /// For iptables/nftables: how long iptables-restore / nft ran in that programming.
    pub load_ms: Option<f64>,
    pub endpoint_change_ms: Vec<f64>,
    pub agent_rss_kib: Option<u64>,
    pub bpf_maps: Option<(usize, u64)>,
    /// For iptables/nftables: lines and bytes of the full ruleset input.
    pub ruleset: Option<(usize, usize)>,
    /// For ebpf: what the programs cost in the statistics pass, per metric.
    pub program_time: BTreeMap<Metric, ProgramTime>,
}

/// The eBPF programs that ran during one batch of a metric.
#[derive(Debug)]
pub struct ProgramTime {
    /// The batch's operations, warm-up included (they run the programs too).
    pub operations: usize,
    /// Each program that ran: runs, ns per run.
    pub programs: BTreeMap<String, (u64, f64)>,
}

impl ProgramTime {
    pub fn us_per_operation(&self) -> f64 {
        let ns: f64 = self
            .programs
            .values()
            .map(|(runs, ns)| *runs as f64 * ns)
            .sum();
        ns / self.operations.max(1) as f64 / 1000.0
    }
}

#[derive(Debug)]
pub struct PointResult {
    pub services: usize,
    /// Latency rounds measured: `Settings::rounds` unless the budget ran out.
    pub rounds: usize,
    pub modes: BTreeMap<Mode, ModeResult>,
}

/// CLOCK_MONOTONIC in ns, the clock `ekp-bench wait` reports in.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How long a change (programming from empty, an endpoint change) may take to answer once
/// it is made (the agent started, a restore or `nft -f` returned): a hang guard.
const CHANGE_LIMIT: Duration = Duration::from_secs(900);

/// How long the NodePorts, programmed with the ClusterIP, may take to answer before the
/// rounds: a hang guard.
const NODEPORT_CHECK_LIMIT: Duration = Duration::from_secs(10);

/// A child that is killed and reaped on drop.
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `ekp-bench wait`, started and ready.
struct Waiter {
    child: Guarded,
    stdout: BufReader<ChildStdout>,
}

impl Waiter {
    fn spawn(mut command: Command) -> Result<Self> {
        command.stdout(Stdio::piped()).stdin(Stdio::null());
        // Killed with the bench, however it ends (its own limit is a day).
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = Guarded(
            command
                .spawn()
                .with_context(|| format!("starting {}", cmd::display(&command)))?,
        );
        let stdout = child.0.stdout.take().context("stdout was piped")?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("ekp-bench wait did not start: {line:?}");
        }
        Ok(Waiter { child, stdout })
    }

    /// Waits for the answer, at most `limit` from now (a hang guard, started once the
    /// change is made: a restore may take minutes); `alive` is polled meanwhile (the agent
    /// may die).
    fn finish(mut self, limit: Duration, mut alive: impl FnMut() -> Result<()>) -> Result<u64> {
        let give_up = Instant::now() + limit;
        loop {
            check_interrupted()?;
            if let Some(status) = self.child.0.try_wait()? {
                let mut line = String::new();
                self.stdout.read_line(&mut line)?;
                if !status.success() {
                    bail!("the change never took effect (ekp-bench wait: {status})");
                }
                let v: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("ekp-bench wait printed {line:?}"))?;
                return v["seen_ns"].as_u64().context("no seen_ns");
            }
            alive()?;
            if Instant::now() > give_up {
                bail!("the change never took effect: no answer within {limit:?}");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

/// Runs `command` with `input` on stdin; fails with its stderr.
fn run_with_input(command: &mut Command, input: &str) -> Result<()> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", cmd::display(command)))?;
    let mut stdin = child.stdin.take().context("stdin was piped")?;
    // A writer thread: the child may print errors before reading everything.
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let head: String = stderr.lines().take(5).collect::<Vec<_>>().join("\n");
        bail!("`{}` failed: {}: {head}", cmd::display(command), out.status);
    }
    Ok(())
}

/// The agent process, its pins and its manifests directory; all removed on drop.
struct Agent {
    bin: PathBuf,
    pin_path: PathBuf,
    manifests: PathBuf,
    cgroup: PathBuf,
    proc: Option<netns::Proc>,
    /// When the agent last started or was handed a change: it batches what comes within
    /// its --min-sync-period (1 s) of its last sync.
    last_sync: Instant,
}

impl Agent {
    /// Starts the agent with `command` (the agent binary in the eBPF mode's node namespace,
    /// where `ext0` is).
    fn start(&mut self, n: usize, mut command: Command) -> Result<()> {
        let pow2 = |x: usize| x.next_power_of_two().max(65536).to_string();
        command
            .arg("--pin-path")
            .arg(&self.pin_path)
            .arg("run")
            .arg("--manifests")
            .arg(&self.manifests)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--node-name", manifests::NODE_NAME])
            .args(["--healthz-bind-address", ""])
            .args(["--metrics-bind-address", ""])
            // North-south programs on the node's external device and the one to the other
            // node (devices the bench made, in a namespace it made); the socket programs on
            // the bench's cgroup.
            .args(["--devices", &format!("{EXTERNAL_DEVICE},{REMOTE_DEVICE}")])
            // No periodic full re-sync during a run (30 s by default, as kube-proxy's): a
            // change that lands within --min-sync-period (1 s) after one waits for that
            // second to end, as under kube-proxy. The counted changes at 1 Service come
            // about 60 s after the last uncounted one, when the second periodic sync is
            // due: one of them took 232 ms. The iptables and nftables modes have no
            // periodic sync either.
            .args(["--sync-period", "60m"])
            .args(["--map-size-services", &pow2(4 * n + 16)])
            .args(["--map-size-backends", &pow2(2 * n + 16)])
            // Quiet unless asked (`EKP_LOG=debug` shows each sync's phases).
            .env(
                "EKP_LOG",
                std::env::var("EKP_LOG").unwrap_or_else(|_| "warn".into()),
            );
        self.proc = Some(netns::Proc::spawn(command, "ebpf-kube-proxy")?);
        self.last_sync = Instant::now();
        Ok(())
    }

    fn alive(&mut self) -> Result<()> {
        if let Some(proc) = &mut self.proc
            && let Some(status) = proc.child.try_wait()?
        {
            bail!("ebpf-kube-proxy exited: {status}");
        }
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    /// Stops the agent and removes its pins (the next start is from empty).
    fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.terminate();
        }
        let _ = Command::new(&self.bin)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .arg("cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.pin_path);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The BPF maps `pid` holds (from /proc/<pid>/fdinfo): how many, and their `memlock`.
fn bpf_maps(pid: u32) -> Option<(usize, u64)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut memlock = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()? {
        let Ok(text) = std::fs::read_to_string(entry.ok()?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            memlock += bytes;
        }
    }
    Some((seen.len(), memlock))
}

/// Field order is drop order: the agent (and its pins) before the namespaces it runs in.
pub struct Runner<'a> {
    bins: &'a Binaries,
    settings: &'a Settings,
    agent: Agent,
    topo: Topology,
    /// Whether kube-proxy's nfacct counters exist in the `iptables` node (see `Runner::new`).
    counters: iptables::Counters,
}

fn pod(name: &str) -> Ipv4Addr {
    PODS.iter()
        .find(|p| p.name == name)
        .map(|p| p.addr)
        .expect("known pod")
}

/// Where `metric`'s probes (`ekp-bench wait`) send in `mode`: the measured Service's
/// ClusterIP or NodePort, or for `direct` and `hooks` (and in every mode for a metric that
/// is not for a Service) its first endpoint itself (latency batches: `batch_targets`).
fn target(mode: Mode, metric: Metric) -> SocketAddr {
    target_via(mode, metric, 0)
}

/// `target`, with `direct` and `hooks` going to the measured Service's endpoint `direct_to`
/// (0 or 1) of the port `metric` sends to: pod-a or pod-b, or for the `remote` port one of
/// the other node's pods.
fn target_via(mode: Mode, metric: Metric, direct_to: usize) -> SocketAddr {
    if metric.is_remote() {
        return topology::remote_target(mode, REMOTE_ENDPOINTS[direct_to]);
    }
    let pod = pod(["pod-a", "pod-b"][direct_to]);
    if metric.is_node_port() {
        return topology::node_port_target(mode, pod);
    }
    if metric.is_untranslated() {
        SocketAddr::V4(SocketAddrV4::new(pod, POD_PORT))
    } else if mode.is_untranslated() {
        SocketAddr::V4(SocketAddrV4::new(pod, TARGET_PORT))
    } else {
        SocketAddr::V4(SocketAddrV4::new(MEASURED_VIP, SERVICE_PORT))
    }
}

/// Where `metric`'s latency batches send in `mode`, comma-separated: `target`, except that
/// what goes to the pod addresses (`direct` and `hooks`, a metric that is not for a
/// Service) spreads over both of the measured Service's endpoints, as the translating modes
/// do, so that every mode meets the same servers and per-destination state.
fn batch_targets(mode: Mode, metric: Metric) -> String {
    if !mode.is_untranslated() && !metric.is_untranslated() {
        return target(mode, metric).to_string();
    }
    [0, 1]
        .map(|endpoint| target_via(mode, metric, endpoint).to_string())
        .join(",")
}

/// A batch from what `ekp-bench` printed (its summary with `--raw`).
fn parse_latency(out: &str) -> Result<Latency> {
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("ekp-bench printed {out:?}"))?;
    let samples_ns: Vec<u64> = v["samples_ns"]
        .as_array()
        .context("no samples_ns")?
        .iter()
        .filter_map(|s| s.as_u64())
        .collect();
    let rate = v["rate_per_s"].as_f64().unwrap_or(0.0);
    let busy_s = if rate > 0.0 {
        samples_ns.len() as f64 / rate
    } else {
        0.0
    };
    Ok(Latency {
        errors: v["errors"].as_u64().unwrap_or(0),
        first_error: v["first_error"].as_str().map(str::to_owned),
        syn_retransmits: v["syn_retransmits"].as_u64().unwrap_or(0),
        samples_ns,
        busy_s,
        round_p50_us: Vec::new(),
    })
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl<'a> Runner<'a> {
    pub fn new(bins: &'a Binaries, settings: &'a Settings) -> Result<Self> {
        let prefix = netns::unique_prefix("ekp-bench");
        println!(
            "bench: namespaces {prefix}-* (node bridge 10.244.0.1/24, pods .10-.12, one client per mode .2-.6, each the node of an external client on 192.168.1-5.0/24 and joined to the other node {prefix}-remote, pods 10.244.1.10-.11, by rem0), cgroups {prefix}-<mode>"
        );
        let topo = Topology::create(&prefix, &bins.bench, settings.cpu)?;
        let agent = Agent {
            bin: bins.agent.clone(),
            pin_path: PathBuf::from("/sys/fs/bpf").join(&prefix),
            manifests: std::env::temp_dir().join(format!("{prefix}-manifests")),
            cgroup: topo.cgroup(Mode::Ebpf).path().to_path_buf(),
            proc: None,
            last_sync: Instant::now(),
        };
        std::fs::create_dir_all(&agent.manifests)?;
        let mut runner = Runner {
            bins,
            settings,
            topo,
            agent,
            counters: iptables::Counters::None,
        };
        if settings.modes.contains(&Mode::Iptables) {
            runner.counters = runner.create_nfacct_counters();
        }
        Ok(runner)
    }

    /// What kube-proxy's iptables mode does as it starts: create its nfacct counters in the
    /// node, then count through those it could create. A node that cannot (no nfacct in its
    /// kernel) gets the rules without them, with a warning, as kube-proxy logs an error and
    /// goes on.
    fn create_nfacct_counters(&self) -> iptables::Counters {
        let created = self
            .in_client(Mode::Iptables, &self.bins.bench.display().to_string())
            .and_then(|mut command| {
                command.arg("nfacct").args(iptables::NFACCT_COUNTERS);
                cmd::output(&mut command).map(drop)
            });
        match created {
            Ok(()) => iptables::Counters::Nfacct,
            Err(e) => {
                println!(
                    "  warning: kube-proxy's nfacct counters could not be created ({e:#}); the iptables rules go without them"
                );
                iptables::Counters::None
            }
        }
    }

    /// Whether the `iptables` mode's rules count through kube-proxy's nfacct counters.
    pub fn iptables_counters(&self) -> iptables::Counters {
        self.counters
    }

    /// `program` where `metric`'s client runs: the mode's ClusterIP client (see
    /// `Topology::client_command`), or for NodePort the mode's external client namespace
    /// (outside the node: no cgroup); on the servers' CPU.
    fn client(&self, mode: Mode, metric: Metric, program: &Path) -> Result<Command> {
        let mut command = if metric.is_node_port() {
            self.topo.external(mode).command(program, None)?
        } else {
            self.topo.client_command(mode, program)?
        };
        topology::pin(&mut command, self.settings.cpu);
        Ok(command)
    }

    fn in_client(&self, mode: Mode, program: &str) -> Result<Command> {
        self.topo.client(mode).command(program, None)
    }

    fn waiter(&self, mode: Mode, answer: &str) -> Result<Waiter> {
        self.waiter_for(mode, Metric::Crr, answer)
    }

    /// `ekp-bench wait` from `metric`'s client to its target; [`Waiter::finish`] gives up.
    fn waiter_for(&self, mode: Mode, metric: Metric, answer: &str) -> Result<Waiter> {
        let mut command = self.client(mode, metric, &self.bins.bench)?;
        command.args([
            "wait",
            &target(mode, metric).to_string(),
            "--answer",
            answer,
            // Its own limit only guards against an orphan: `finish` gives up first.
            "--limit-ms",
            "86400000",
        ]);
        Waiter::spawn(command)
    }

    pub fn run(&mut self) -> Result<Vec<PointResult>> {
        let mut results = Vec::new();
        let services = self.settings.services.clone();
        for (i, &n) in services.iter().enumerate() {
            check_interrupted()?;
            results.push(self.point(n, services.len() - i - 1)?);
        }
        self.agent.stop();
        Ok(results)
    }

    /// Everything measured at `n` Services, with `later` Ns still to come after it.
    fn point(&mut self, n: usize, later: usize) -> Result<PointResult> {
        let started = Instant::now();
        // This N's share of what is left of the budget, the Ns to come having theirs: the
        // rounds at small Ns leave the large ones (whose programming is long) their time.
        let share_ends = self
            .settings
            .deadline
            .map(|d| started + d.saturating_duration_since(started) / (later as u32 + 1));
        println!("\n== N = {n} Services");
        let measured_pods = [pod("pod-a"), pod("pod-b")];
        let mut services = scenario::services(n, &measured_pods);
        self.topo
            .forget_remote_connections()
            .context("closing the other node's TIME_WAIT sockets")?;
        let mut modes: BTreeMap<Mode, ModeResult> = Mode::ALL
            .iter()
            .map(|&m| (m, ModeResult::default()))
            .collect();

        // Programming from empty, one mode after the other.
        for mode in [Mode::Ebpf, Mode::Iptables, Mode::Nftables] {
            check_interrupted()?;
            if !self.settings.modes.contains(&mode) {
                continue;
            }
            print!("  programming {:<9} ", mode.name());
            let _ = std::io::stdout().flush();
            let result = modes.get_mut(&mode).expect("all modes");
            let ms = self
                .program(mode, &services, result)
                .with_context(|| format!("programming {n} Services in mode {}", mode.name()))?;
            println!("{ms:>10.1} ms");
        }
        self.read_memory(modes.get_mut(&Mode::Ebpf).expect("all modes"));

        // Two uncounted endpoint changes, there and back, before the latency rounds: the
        // first change after programming from empty is each process's first of its kind,
        // and these tell how long the counted changes after the rounds will take, which
        // the rounds leave room for when the run has a budget.
        let longest = self.endpoint_changes(&mut services, 0, 2, None)?;
        let counted_changes = longest * self.settings.changes as u32;
        let rounds = self.latency(n, &mut modes, share_ends, counted_changes)?;
        if self.settings.modes.contains(&Mode::Ebpf) {
            self.program_run_time(modes.get_mut(&Mode::Ebpf).expect("all modes"))?;
        }
        self.endpoint_changes(&mut services, 2, self.settings.changes, Some(&mut modes))?;
        self.read_memory(modes.get_mut(&Mode::Ebpf).expect("all modes"));
        println!("  N = {n} done in {:.1} s", started.elapsed().as_secs_f64());
        Ok(PointResult {
            services: n,
            rounds,
            modes,
        })
    }

    fn read_memory(&self, result: &mut ModeResult) {
        if let Some(pid) = self.agent.pid() {
            let rss = rss_kib(pid);
            result.agent_rss_kib = result.agent_rss_kib.max(rss);
            result.bpf_maps = bpf_maps(pid).or(result.bpf_maps);
        }
    }

    /// From empty to the measured Service answering; returns the time in ms.
    fn program(
        &mut self,
        mode: Mode,
        services: &[Service],
        result: &mut ModeResult,
    ) -> Result<f64> {
        let elapsed = match mode {
            Mode::Ebpf => {
                self.agent.stop();
                manifests::write_all(
                    &self.agent.manifests,
                    services,
                    topology::node_external_addr(Mode::Ebpf),
                )?;
                let command = self.topo.client(mode).command(&self.bins.agent, None)?;
                let waiter = self.waiter(mode, "any")?;
                let t0 = monotonic_ns();
                self.agent.start(services.len(), command)?;
                let agent = &mut self.agent;
                let seen = waiter.finish(CHANGE_LIMIT, || agent.alive())?;
                agent.last_sync = Instant::now();
                seen - t0
            }
            Mode::Iptables => {
                // Empty tables: a restore without --noflush flushes them and deletes our chains.
                run_with_input(
                    &mut self.in_client(mode, &self.bins.iptables_restore)?,
                    "*filter\nCOMMIT\n*nat\nCOMMIT\n",
                )?;
                let text = iptables::restore(services, &Sync::Full { jumps: true }, self.counters);
                result.ruleset = Some((text.lines().count(), text.len()));
                let waiter = self.waiter(mode, "any")?;
                let t0 = monotonic_ns();
                let mut restore = self.in_client(mode, &self.bins.iptables_restore)?;
                // kube-proxy's arguments (its wait flags for iptables 1.6.2 and later).
                restore.args(["-w", "5", "-W", "100000", "--noflush", "--counters"]);
                run_with_input(&mut restore, &text)?;
                result.load_ms = Some(ms(monotonic_ns() - t0));
                waiter.finish(CHANGE_LIMIT, || Ok(()))? - t0
            }
            Mode::Nftables => {
                let mut delete = self.in_client(mode, "nft")?;
                delete.args(["delete", "table", "ip", "kube-proxy"]);
                let _ = cmd::capture(&mut delete);
                let text = nftables::full(services, topology::node_external_addr(mode));
                result.ruleset = Some((text.lines().count(), text.len()));
                let waiter = self.waiter(mode, "any")?;
                let t0 = monotonic_ns();
                let mut load = self.in_client(mode, "nft")?;
                load.args(["-f", "-"]);
                run_with_input(&mut load, &text)?;
                result.load_ms = Some(ms(monotonic_ns() - t0));
                waiter.finish(CHANGE_LIMIT, || Ok(()))? - t0
            }
            Mode::Direct | Mode::Hooks => return Ok(0.0),
        };
        result.programming_ms = Some(ms(elapsed));
        Ok(ms(elapsed))
    }

    /// Rounds; in each, every metric is measured in every mode (in a rotating order), one
    /// batch each. Returns how many rounds ran: fewer than asked when this N's share of the
    /// budget (`share_ends`) ran out (see [`another_round`]), leaving room for what comes
    /// after the rounds besides the statistics pass (`after`).
    fn latency(
        &mut self,
        n: usize,
        modes: &mut BTreeMap<Mode, ModeResult>,
        share_ends: Option<Instant>,
        after: Duration,
    ) -> Result<usize> {
        // Programming waited for the ClusterIP; the NodePorts come from the same sync or
        // restore, but are checked before they are measured (10 s: a hang guard).
        let selected: Vec<Mode> = Mode::ALL
            .into_iter()
            .filter(|m| self.settings.modes.contains(m))
            .collect();
        for &mode in &selected {
            for metric in [Metric::NodePortCrr, Metric::RemoteCrr] {
                let waiter = self.waiter_for(mode, metric, "any")?;
                let agent = &mut self.agent;
                waiter
                    .finish(NODEPORT_CHECK_LIMIT, || agent.alive())
                    .with_context(|| {
                        format!(
                            "N={n} {}: the NodePort {} never answered",
                            mode.name(),
                            target(mode, metric)
                        )
                    })?;
            }
        }
        let s = self.settings;
        let rounds = s.rounds.max(1);
        let t = Instant::now();
        let mut round = 0;
        while another_round(
            round,
            rounds,
            t.elapsed(),
            selected.len(),
            share_ends.map(|d| {
                d.saturating_duration_since(Instant::now())
                    .saturating_sub(after)
            }),
        ) {
            // Metric by metric, every mode's client in turns (`lockstep`); which client
            // starts rotates with the round and the metric.
            for (i, metric) in Metric::ALL.into_iter().enumerate() {
                let mut order = selected.clone();
                let len = order.len().max(1);
                order.rotate_left((round + i) % len);
                check_interrupted()?;
                let batches = self
                    .batches_in_turns(&order, metric, self.per_batch(metric))
                    .with_context(|| format!("N={n} {}", metric.name()))?;
                for (mode, batch) in order.into_iter().zip(batches) {
                    let entry = modes
                        .get_mut(&mode)
                        .expect("all modes")
                        .latency
                        .entry(metric)
                        .or_default();
                    entry
                        .round_p50_us
                        .push(super::report::percentile(&batch.samples_ns, 50.0));
                    entry.samples_ns.extend(batch.samples_ns);
                    entry.errors += batch.errors;
                    entry.syn_retransmits += batch.syn_retransmits;
                    entry.busy_s += batch.busy_s;
                    if entry.first_error.is_none() {
                        entry.first_error = batch.first_error;
                    }
                }
            }
            round += 1;
            print!(
                "\r  latency round {round}/{rounds} ({:.0} s)",
                t.elapsed().as_secs_f64()
            );
            let _ = std::io::stdout().flush();
        }
        println!();
        if round < rounds {
            println!(
                "  the run's time budget (--budget) ends: {round} of {rounds} rounds measured"
            );
        }
        for mode in Mode::ALL {
            let result = &modes[&mode];
            let p50 = |metric: Metric| {
                result
                    .latency
                    .get(&metric)
                    .map(|l| super::report::percentile(&l.samples_ns, 50.0))
                    .unwrap_or(f64::NAN)
            };
            let errors: u64 = result.latency.values().map(|l| l.errors).sum();
            println!(
                "  p50 {:<9} connect {:>7.1} µs  crr {:>7.1} µs  rr {:>7.1} µs  udp {:>7.1} µs  udp rr {:>7.1} µs  pod connect {:>7.1} µs  nodeport connect {:>7.1} µs  crr {:>7.1} µs  remote connect {:>7.1} µs  crr {:>7.1} µs{}",
                mode.name(),
                p50(Metric::Connect),
                p50(Metric::Crr),
                p50(Metric::Rr),
                p50(Metric::Udp),
                p50(Metric::UdpRr),
                p50(Metric::PodConnect),
                p50(Metric::NodePortConnect),
                p50(Metric::NodePortCrr),
                p50(Metric::RemoteConnect),
                p50(Metric::RemoteCrr),
                if errors > 0 {
                    format!("  ({errors} errors)")
                } else {
                    String::new()
                }
            );
        }
        Ok(round)
    }

    /// Operations per batch: a mode's samples of `metric` spread over the rounds.
    fn per_batch(&self, metric: Metric) -> usize {
        let s = self.settings;
        let total = match metric {
            Metric::Rr | Metric::UdpRr => s.samples * 5 / 2,
            _ => s.samples,
        };
        total.div_ceil(s.rounds.max(1)).max(1)
    }

    /// One more batch of every metric in the eBPF mode, with the kernel counting the
    /// programs' run time (see `progstats`); these batches' latencies are not kept. A kernel
    /// that cannot count leaves the figure out, with the reason on the progress line.
    fn program_run_time(&mut self, result: &mut ModeResult) -> Result<()> {
        print!("  eBPF programs per operation (µs):");
        let Some(pid) = self.agent.pid() else {
            println!(" not measured (the agent is not running)");
            return Ok(());
        };
        let counting = match progstats::start() {
            Ok(counting) => counting,
            Err(e) => {
                println!(" not measured ({e:#})");
                return Ok(());
            }
        };
        let bpftool = xtask::toolchain::bpftool();
        for metric in Metric::ALL {
            check_interrupted()?;
            let count = self.per_batch(metric);
            let before = progstats::counters(pid)?;
            self.batch(Mode::Ebpf, metric, count)
                .with_context(|| format!("ebpf {} with BPF statistics", metric.name()))?;
            let after = progstats::counters(pid)?;
            let time = ProgramTime {
                operations: count + self.settings.warmup,
                programs: progstats::per_run(&bpftool, &before, &after)?,
            };
            print!(" {} {:.2}", metric.name(), time.us_per_operation());
            result.program_time.insert(metric, time);
        }
        drop(counting);
        println!();
        Ok(())
    }

    /// `count` operations of `metric` in `mode`, one batch on its own.
    fn batch(&self, mode: Mode, metric: Metric, count: usize) -> Result<Latency> {
        let mut command = self.latency_client(mode, metric, count)?;
        parse_latency(&cmd::output(&mut command)?)
    }

    /// `count` operations of `metric` in each of `modes`, their clients in turns
    /// (`lockstep`), in that order at first; the batches in the same order.
    fn batches_in_turns(
        &self,
        modes: &[Mode],
        metric: Metric,
        count: usize,
    ) -> Result<Vec<Latency>> {
        let mut clients = Vec::with_capacity(modes.len());
        for &mode in modes {
            let mut command = self.latency_client(mode, metric, count)?;
            command.arg("--stepped");
            clients.push(lockstep::Stepped::start(command, mode.name().to_owned())?);
        }
        lockstep::in_turns(&mut clients, count, lockstep::STEP_OPS, check_interrupted)?;
        clients
            .into_iter()
            .map(|client| parse_latency(&client.finish()?))
            .collect()
    }

    /// `ekp-bench` measuring `count` operations of `metric` in `mode`, after the warm-up.
    fn latency_client(&self, mode: Mode, metric: Metric, count: usize) -> Result<Command> {
        let mut command = self.client(mode, metric, &self.bins.bench)?;
        command.args([
            metric.client_mode(),
            &batch_targets(mode, metric),
            "--count",
            &count.to_string(),
            "--warmup",
            &self.settings.warmup.to_string(),
            "--timeout-ms",
            "2000",
            "--raw",
        ]);
        Ok(command)
    }

    /// Swaps the measured Service's second endpoint (pod-b <-> pod-c) `count` times in every
    /// mode, timing until a new connection reaches the new endpoint; the times go into
    /// `record` (`None`: uncounted changes). `first` numbers the first swap of the point, so
    /// that the order of the modes keeps rotating from one call to the next. Returns the
    /// wall time of the longest swap, waits included.
    fn endpoint_changes(
        &mut self,
        services: &mut [Service],
        first: usize,
        count: usize,
        mut record: Option<&mut BTreeMap<Mode, ModeResult>>,
    ) -> Result<Duration> {
        let started = Instant::now();
        let mut longest = Duration::ZERO;
        for rep in first..first + count {
            let swap_started = Instant::now();
            let old = services.last().context("no Services")?.clone();
            let (old_name, new_name) = if old.endpoints[1] == pod("pod-b") {
                ("pod-b", "pod-c")
            } else {
                ("pod-c", "pod-b")
            };
            let new = scenario::measured(&[pod("pod-a"), pod(new_name)]);
            *services.last_mut().context("no Services")? = new.clone();
            let mut order: Vec<Mode> = [Mode::Ebpf, Mode::Iptables, Mode::Nftables]
                .into_iter()
                .filter(|m| self.settings.modes.contains(m))
                .collect();
            let len = order.len().max(1);
            order.rotate_left(rep % len);
            for mode in order {
                check_interrupted()?;
                let elapsed = match mode {
                    Mode::Ebpf => {
                        // The agent batches changes that come within --min-sync-period
                        // (1 s, kube-proxy's default) of its last sync; start after that.
                        let quiet = Duration::from_millis(1200);
                        if let Some(left) = quiet.checked_sub(self.agent.last_sync.elapsed()) {
                            std::thread::sleep(left);
                        }
                        let waiter = self.waiter(mode, new_name)?;
                        let t0 = monotonic_ns();
                        manifests::write_measured_slice(&self.agent.manifests, &new)?;
                        let agent = &mut self.agent;
                        let seen = waiter.finish(CHANGE_LIMIT, || agent.alive())?;
                        agent.last_sync = Instant::now();
                        seen - t0
                    }
                    Mode::Iptables => {
                        let stale = iptables::stale_sep_chains(&old, pod(old_name));
                        let changed = [MEASURED_NAME];
                        let text = iptables::restore(
                            services,
                            &Sync::Partial {
                                changed: &changed,
                                stale_chains: &stale,
                            },
                            self.counters,
                        );
                        let waiter = self.waiter(mode, new_name)?;
                        let t0 = monotonic_ns();
                        let mut restore = self.in_client(mode, &self.bins.iptables_restore)?;
                        restore.args(["-w", "5", "-W", "100000", "--noflush", "--counters"]);
                        run_with_input(&mut restore, &text)?;
                        waiter.finish(CHANGE_LIMIT, || Ok(()))? - t0
                    }
                    Mode::Nftables => {
                        let text = nftables::partial(&old, &new);
                        let waiter = self.waiter(mode, new_name)?;
                        let t0 = monotonic_ns();
                        let mut load = self.in_client(mode, "nft")?;
                        load.args(["-f", "-"]);
                        run_with_input(&mut load, &text)?;
                        waiter.finish(CHANGE_LIMIT, || Ok(()))? - t0
                    }
                    Mode::Direct | Mode::Hooks => continue,
                };
                let Some(modes) = record.as_deref_mut() else {
                    continue;
                };
                modes
                    .get_mut(&mode)
                    .expect("all modes")
                    .endpoint_change_ms
                    .push(ms(elapsed));
            }
            longest = longest.max(swap_started.elapsed());
        }
        let Some(modes) = record else {
            println!(
                "  {count} uncounted endpoint changes in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(longest);
        };
        let show = |mode: Mode| {
            let v = &modes[&mode].endpoint_change_ms;
            v.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  endpoint change (ms): ebpf [{}]  iptables [{}]  nftables [{}]",
            show(Mode::Ebpf),
            show(Mode::Iptables),
            show(Mode::Nftables)
        );
        Ok(longest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_go_on_while_the_next_one_and_the_statistics_pass_fit_the_budget() {
        let s = Duration::from_secs;
        // No budget: every round asked for, and no more.
        assert!(another_round(9, 10, s(90), 5, None));
        assert!(!another_round(10, 10, s(100), 5, None));
        // The first rounds run whatever is left.
        for done in 0..MIN_ROUNDS {
            assert!(another_round(done, 10, s(10 * done as u64), 5, Some(s(0))));
        }
        // 10 s a round with 5 modes: the next round and the statistics pass take 12 s.
        assert!(another_round(4, 10, s(40), 5, Some(s(12))));
        assert!(!another_round(4, 10, s(40), 5, Some(s(11))));
        // With one mode the statistics pass is as long as a round.
        assert!(!another_round(4, 10, s(40), 1, Some(s(19))));
        assert!(another_round(4, 10, s(40), 1, Some(s(20))));
        // Never more than asked, however much is left.
        assert!(!another_round(3, 3, s(3), 5, Some(s(600))));
    }

    /// The translating modes send to the Service, `direct` and `hooks` to both pods, except
    /// for the metric that is not for a Service, which every mode sends to both pods' port
    /// that no Service exposes.
    #[test]
    fn every_mode_sends_the_metric_without_a_service_to_the_pods() {
        let pods = format!(
            "{},{}",
            SocketAddrV4::new(pod("pod-a"), POD_PORT),
            SocketAddrV4::new(pod("pod-b"), POD_PORT)
        );
        let direct = format!(
            "{},{}",
            SocketAddrV4::new(pod("pod-a"), TARGET_PORT),
            SocketAddrV4::new(pod("pod-b"), TARGET_PORT)
        );
        let vip = SocketAddrV4::new(MEASURED_VIP, SERVICE_PORT).to_string();
        for mode in Mode::ALL {
            assert_eq!(batch_targets(mode, Metric::PodConnect), pods, "{mode:?}");
            let connect = if mode.is_untranslated() {
                &direct
            } else {
                &vip
            };
            assert_eq!(&batch_targets(mode, Metric::Connect), connect, "{mode:?}");
        }
    }
}
