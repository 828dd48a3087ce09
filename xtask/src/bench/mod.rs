//! `cargo xtask bench`: latency and programming time of this project against the rules
//! kube-proxy's iptables and nftables modes write, on the same topology, in the same run.
//!
//! ```text
//! cargo xtask bench [--services 1,1000,10000] [--quick] [--out DIR] [--samples K]
//!                   [--rounds R] [--changes C] [--iptables system|legacy|nft]
//!                   [--modes ebpf,direct]   # only these modes (the others' results empty)
//!                   [--cpu N | --cpu any]   # the servers' and clients' CPU (default: the last)
//!                   [--budget SECS]         # the run's time limit (default 600; 0: none)
//!                   [--debug | --release]
//! cargo xtask bench --dump-rules N --out DIR   # the iptables/nftables input, for review
//! cargo xtask bench --render [--out DIR]       # redraw latest.md and the charts from latest.json
//! ```
//!
//! For each N: N Services with 2 endpoints each, the measured one evaluated last by
//! iptables and of type NodePort (see `scenario`); every mode programmed from empty and
//! timed (see `runner`); latency measured with `ekp-bench` in rounds where the modes'
//! clients take turns of a few operations (see `lockstep`), so that machine noise hits them
//! alike: to the ClusterIP from a process on the node, and to the NodePort from an external
//! client through the node (see `topology`);
//! endpoint changes timed; the agent's memory read. The servers, the latency clients and
//! the endpoint-change prober share one CPU (`--cpu`; `topology::pin` says why). Results go to
//! `<out>/latest.json` (everything), `latest.md` (tables and ratios), `latency.png` and
//! `programming.png`. The iptables and nftables rules come from `iptables` and `nftables`,
//! which write what kube-proxy writes (unit-tested against kube-proxy's own test data).
//!
//! Everything lives in network namespaces that are deleted at the end, also on error or
//! Ctrl-C (SIGINT stops the loops; the guards' `Drop` removes namespaces, the cgroup, the
//! agent's pins and the manifests directory). Not a pass/fail test: no number is asserted.
//!
//! The agent and `ekp-bench` are built in release mode by default (the numbers a node
//! would see); `--quick` (N = 1 and 100, few samples) uses the debug build the tests use.

mod hash;
mod iptables;
mod lockstep;
mod manifests;
mod nftables;
mod plot;
mod progstats;
mod report;
mod runner;
mod scenario;
mod topology;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use xtask::{cmd, netns};

/// The ways the client reaches the measured Service: translated by this project, by
/// kube-proxy's iptables or nftables rules, or not at all (`direct`: the pod addresses);
/// `hooks` is `direct` through programs that do nothing at the hooks `ebpf` uses, the
/// hooks' own cost, which no translation at those hooks can take away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Ebpf,
    Iptables,
    Nftables,
    Direct,
    Hooks,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Ebpf,
        Mode::Iptables,
        Mode::Nftables,
        Mode::Direct,
        Mode::Hooks,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Direct => "direct",
            Mode::Hooks => "hooks",
        }
    }

    /// Sends to the pod addresses itself (nothing translates).
    pub fn is_untranslated(self) -> bool {
        matches!(self, Mode::Direct | Mode::Hooks)
    }
}

/// The latency measurements: ekp-bench's client modes from the mode's client to the
/// ClusterIP; new TCP connections from the same client to the pod addresses themselves, on
/// a port no Service exposes, which every mode's hooks or rules still see; and new TCP
/// connections from the external client to the NodePort, of a port whose endpoints are on
/// the node and of one whose endpoints are on another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    Connect,
    Crr,
    Rr,
    Udp,
    UdpRr,
    PodConnect,
    NodePortConnect,
    NodePortCrr,
    RemoteConnect,
    RemoteCrr,
}

impl Metric {
    pub const ALL: [Metric; 10] = [
        Metric::Connect,
        Metric::Crr,
        Metric::Rr,
        Metric::Udp,
        Metric::UdpRr,
        Metric::PodConnect,
        Metric::NodePortConnect,
        Metric::NodePortCrr,
        Metric::RemoteConnect,
        Metric::RemoteCrr,
    ];

    /// The key in the results JSON.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Connect => "connect",
            Metric::Crr => "crr",
            Metric::Rr => "rr",
            Metric::Udp => "udp",
            Metric::UdpRr => "udp_rr",
            Metric::PodConnect => "pod_connect",
            Metric::NodePortConnect => "nodeport_connect",
            Metric::NodePortCrr => "nodeport_crr",
            Metric::RemoteConnect => "remote_connect",
            Metric::RemoteCrr => "remote_crr",
        }
    }

    /// How the results page names it.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Connect => "TCP connect",
            Metric::Crr => "TCP connect+request+response+close",
            Metric::Rr => "TCP request/response, established",
            Metric::Udp => "UDP request/response, new socket",
            Metric::UdpRr => "UDP request/response, one socket",
            Metric::PodConnect => "TCP connect to a pod address, no Service",
            Metric::NodePortConnect => "NodePort TCP connect, external client",
            Metric::NodePortCrr => "NodePort connect+request+response+close, external client",
            Metric::RemoteConnect => "NodePort TCP connect, endpoint on another node",
            Metric::RemoteCrr => {
                "NodePort connect+request+response+close, endpoint on another node"
            }
        }
    }

    /// The `ekp-bench` client mode that measures it.
    pub fn client_mode(self) -> &'static str {
        match self {
            Metric::Connect
            | Metric::PodConnect
            | Metric::NodePortConnect
            | Metric::RemoteConnect => "connect",
            Metric::Crr | Metric::NodePortCrr | Metric::RemoteCrr => "crr",
            Metric::Rr => "rr",
            Metric::Udp => "udp",
            Metric::UdpRr => "udprr",
        }
    }

    /// Sent by the external client to a NodePort (north-south), not to the ClusterIP.
    pub fn is_node_port(self) -> bool {
        matches!(
            self,
            Metric::NodePortConnect
                | Metric::NodePortCrr
                | Metric::RemoteConnect
                | Metric::RemoteCrr
        )
    }

    /// Sent to the pods' `POD_PORT` in every mode: traffic that is not for a Service (in
    /// `iptables` mode it still walks `KUBE-SERVICES`, whose rules match the Services'
    /// addresses one after the other, before it leaves untranslated).
    pub fn is_untranslated(self) -> bool {
        self == Metric::PodConnect
    }

    /// Sent to the NodePort whose endpoints are on another node (source-NATed).
    pub fn is_remote(self) -> bool {
        matches!(self, Metric::RemoteConnect | Metric::RemoteCrr)
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM (a timeout's `kill`) and SIGHUP (a closed terminal) set a flag instead of
/// killing us while this lives, so that the loops stop and `Drop` removes the namespaces,
/// cgroups and pins and stops the agent and servers. A signal ignored before (SIGHUP under
/// `nohup`) stays ignored; dropped, each gets back what it had (`cargo xtask test` goes on
/// after its `--quick` run).
struct StopSignals {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl StopSignals {
    fn catch() -> Self {
        let handler: extern "C" fn(libc::c_int) = on_stop_signal;
        let mut previous = Vec::new();
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: sigaction on zeroed structs; the handler only stores to an atomic,
            // which is async-signal-safe.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, std::ptr::null(), &mut old) != 0
                    || old.sa_sigaction == libc::SIG_IGN
                {
                    continue;
                }
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = handler as libc::sighandler_t;
                // As `signal` set it: system calls the signal interrupts go on.
                new.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut new.sa_mask);
                if libc::sigaction(signal, &new, std::ptr::null_mut()) == 0 {
                    previous.push((signal, old));
                }
            }
        }
        StopSignals { previous }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for (signal, old) in &self.previous {
            // SAFETY: restores the disposition read in `catch`.
            unsafe { libc::sigaction(*signal, old, std::ptr::null_mut()) };
        }
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub struct Options {
    pub settings: runner::Settings,
    /// How long the run may take, from the end of the build to the results (`--budget`);
    /// `None`: no limit.
    pub budget: Option<Duration>,
    /// "system" (`iptables-restore` as installed), "legacy" or "nft".
    pub iptables: String,
    pub out: PathBuf,
    pub release: bool,
    pub quick: bool,
}

const USAGE: &str = "usage: cargo xtask bench [--services N,N,...] [--quick] [--out DIR] [--samples K] [--rounds R] [--changes C] [--modes ebpf,iptables,nftables,direct,hooks] [--cpu N|any] [--iptables system|legacy|nft] [--budget SECS] [--debug | --release] (--help: what each does)";

/// `cargo xtask bench --help`.
pub const HELP: &str = "usage: cargo xtask bench [OPTIONS]   (root; network namespaces of its own)

Latency and programming time of ebpf-kube-proxy against the rules kube-proxy's iptables and
nftables modes write for the same Services, in the same run. Results in <out>: latest.json,
latest.md, latency.png, programming.png. Not a pass/fail test.

  --services N,N,...   Service counts to measure (default 1,1000,10000; each 1 to 60000)
  --quick              N = 1 and 100, 300 samples, 3 rounds, 1 change, debug build
  --out DIR            where results go (default bench/results)
  --samples K          samples per metric, mode and N (default 10000)
  --rounds R           rounds the samples are spread over (default 10)
  --changes C          counted endpoint changes per N (default 5)
  --modes M,M,...      of ebpf, iptables, nftables, direct, hooks (default all)
  --cpu N|any          the CPU the servers and clients share (default the last)
  --iptables system|legacy|nft
                       which iptables-restore loads kube-proxy's rules (default system)
  --budget SECS        time limit after the build (default 600; 0: none)
  --debug | --release  build of the agent and the client (default release; --quick: debug)
  --dump-rules N       only write the iptables and nftables input for N Services to <out>
  --render             only redraw latest.md and the charts from <out>/latest.json

More in xtask/src/bench/mod.rs and the README's benchmark section.";

/// Whether `args` ask for [`HELP`].
pub fn help_asked(args: &[String]) -> bool {
    args.iter().any(|a| a == "-h" || a == "--help")
}

/// The default `--budget`: the issue's 10 minutes for a default run on 2 cores.
const DEFAULT_BUDGET: Duration = Duration::from_secs(600);

/// What a run does after its last latency round besides the statistics pass (the agent
/// stopped, rules flushed, namespaces deleted, memory probed, results written): the
/// budget's deadline for the rounds comes this much before its end.
const AFTER_THE_ROUNDS: Duration = Duration::from_secs(20);

pub fn parse_options(root: &Path, args: &[String]) -> Result<Options> {
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Options {
        settings: if quick {
            runner::Settings {
                services: vec![1, 100],
                samples: 300,
                rounds: 3,
                warmup: 20,
                changes: 1,
                modes: Mode::ALL.to_vec(),
                cpu: Some(last_cpu()),
                deadline: None,
            }
        } else {
            runner::Settings {
                services: vec![1, 1000, 10000],
                samples: 10000,
                rounds: 10,
                warmup: 50,
                changes: 5,
                modes: Mode::ALL.to_vec(),
                cpu: Some(last_cpu()),
                deadline: None,
            }
        },
        budget: Some(DEFAULT_BUDGET),
        out: root.join("bench/results"),
        iptables: "system".into(),
        release: !quick,
        quick,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
                .cloned()
        };
        match arg.as_str() {
            "--quick" => {}
            "--debug" => o.release = false,
            "--release" => o.release = true,
            "--services" => {
                o.settings.services = value("--services")?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--services takes numbers, e.g. 1,5000,30000")?;
                if o.settings.services.iter().any(|&n| n == 0 || n > 60000) {
                    bail!("--services: each N must be between 1 and 60000");
                }
            }
            "--out" => o.out = PathBuf::from(value("--out")?),
            "--iptables" => {
                o.iptables = value("--iptables")?;
                if !["system", "legacy", "nft"].contains(&o.iptables.as_str()) {
                    bail!("--iptables takes system, legacy or nft");
                }
            }
            "--cpu" => {
                o.settings.cpu = match value("--cpu")?.as_str() {
                    "any" => None,
                    n => {
                        let cpu: usize = n.parse().context("--cpu takes a CPU number or `any`")?;
                        if cpu > last_cpu() {
                            bail!(
                                "--cpu {cpu}: this process may run on CPUs up to {}",
                                last_cpu()
                            );
                        }
                        Some(cpu)
                    }
                }
            }
            "--samples" => o.settings.samples = value("--samples")?.parse()?,
            "--rounds" => o.settings.rounds = value("--rounds")?.parse()?,
            "--budget" => {
                let secs: u64 = value("--budget")?
                    .parse()
                    .context("--budget takes seconds (0: no limit)")?;
                o.budget = (secs > 0).then(|| Duration::from_secs(secs));
            }
            "--changes" => o.settings.changes = value("--changes")?.parse()?,
            "--modes" => {
                let names = value("--modes")?;
                o.settings.modes = names
                    .split(',')
                    .map(|name| {
                        Mode::ALL
                            .into_iter()
                            .find(|m| m.name() == name.trim())
                            .with_context(|| format!("--modes: unknown mode {name:?}\n{USAGE}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "-h" | "--help" => bail!("{HELP}"),
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    Ok(o)
}

/// The highest-numbered CPU this process may run on (0 if that cannot be read): the
/// default `--cpu`.
fn last_cpu() -> usize {
    // SAFETY: sched_getaffinity fills the zeroed set it is given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 0;
        }
        (0..libc::CPU_SETSIZE as usize)
            .rev()
            .find(|&cpu| libc::CPU_ISSET(cpu, &set))
            .unwrap_or(0)
    }
}

fn first_line(program: &str, args: &[&str]) -> Option<String> {
    cmd::output(&mut cmd::new(program, args))
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
}

fn iptables_binaries(choice: &str) -> (&'static str, &'static str) {
    match choice {
        "legacy" => ("iptables-legacy", "iptables-legacy-restore"),
        "nft" => ("iptables-nft", "iptables-nft-restore"),
        _ => ("iptables", "iptables-restore"),
    }
}

fn machine(iptables: &str) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": cores,
        "kernel": kernel,
        "iptables": first_line(iptables, &["--version"]),
        "nft": first_line("nft", &["--version"]),
        "loadavg_at_start": load,
    })
}

/// `ekp-bench idle-memory`: what touching memory left alone for the pause between
/// endpoint changes costs on this machine (see the report's notes).
fn idle_memory(ekp_bench: &std::path::Path) -> Result<Value> {
    let out = cmd::output(&mut cmd::new(
        &ekp_bench.display().to_string(),
        &["idle-memory"],
    ))?;
    serde_json::from_str(out.trim())
        .with_context(|| format!("ekp-bench idle-memory printed {out:?}"))
}

/// Fails with what to install when iptables-restore or nft is missing.
fn require_tools(iptables_restore: &str) -> Result<()> {
    for (tool, package) in [(iptables_restore, "iptables"), ("nft", "nftables")] {
        if cmd::capture(&mut cmd::new(tool, &["--version"])).is_err() {
            bail!(
                "`{tool}` is missing: install the Debian package `{package}` (apt-get install {package})"
            );
        }
    }
    Ok(())
}

/// Builds the agent and ekp-bench (release unless `release` is false).
fn build(root: &Path, release: bool, iptables_restore: &str) -> Result<runner::Binaries> {
    let mut args = vec!["build", "--package", "proxy-userspace", "--bins"];
    if release {
        args.push("--release");
    }
    cmd::run(cmd::new("cargo", &args).current_dir(root))?;
    let dir = root.join(if release {
        "target/release"
    } else {
        "target/debug"
    });
    Ok(runner::Binaries {
        agent: dir.join("ebpf-kube-proxy"),
        bench: dir.join("ekp-bench"),
        iptables_restore: iptables_restore.to_owned(),
    })
}

/// `--dump-rules N`: writes what the iptables and nftables modes load for N Services (full
/// and endpoint-change syncs) to `--out`, for review against kube-proxy; runs nothing.
fn dump_rules(out: &Path, n: usize) -> Result<()> {
    let pods = [topology::PODS[0].addr, topology::PODS[1].addr];
    let mut services = scenario::services(n, &pods);
    let old = services.last().context("no Services")?.clone();
    let new = scenario::measured(&[topology::PODS[0].addr, topology::PODS[2].addr]);
    *services.last_mut().context("no Services")? = new.clone();
    let stale_ipt = iptables::stale_sep_chains(&old, pods[1]);
    let before = scenario::services(n, &pods);
    std::fs::create_dir_all(out)?;
    let files = [
        (
            "iptables-full.txt",
            iptables::restore(
                &before,
                &iptables::Sync::Full { jumps: true },
                iptables::Counters::Nfacct,
            ),
        ),
        (
            "iptables-endpoint-change.txt",
            iptables::restore(
                &services,
                &iptables::Sync::Partial {
                    changed: &[scenario::MEASURED_NAME],
                    stale_chains: &stale_ipt,
                },
                iptables::Counters::Nfacct,
            ),
        ),
        (
            "nftables-full.nft",
            nftables::full(&before, topology::node_external_addr(Mode::Nftables)),
        ),
        (
            "nftables-endpoint-change.nft",
            nftables::partial(&old, &new),
        ),
    ];
    for (name, text) in files {
        std::fs::write(out.join(name), text)?;
        println!("{}", out.join(name).display());
    }
    println!(
        "the iptables files count through kube-proxy's nfacct counters, which must exist before \
         iptables-restore takes them: `ekp-bench nfacct {}` (or `nfacct add NAME`) first",
        iptables::NFACCT_COUNTERS.join(" ")
    );
    Ok(())
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    if let Some(i) = args.iter().position(|a| a == "--render") {
        // Redraw latest.md and the charts from latest.json (after a change to the report).
        let options = parse_options(root, &[&args[..i], &args[i + 1..]].concat())?;
        let path = options.out.join("latest.json");
        let results: Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?;
        return write_outputs(&options.out, &results);
    }
    if let Some(i) = args.iter().position(|a| a == "--dump-rules") {
        let n = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .context("--dump-rules needs a number of Services")?;
        let options = parse_options(root, &[&args[..i], &args[i + 2..]].concat())?;
        return dump_rules(&options.out, n);
    }
    let mut options = parse_options(root, args)?;
    netns::require_privileges()?;
    let (iptables, iptables_restore) = iptables_binaries(&options.iptables);
    require_tools(iptables_restore)?;
    let _stop_signals = StopSignals::catch();
    let bins = build(root, options.release, iptables_restore)?;
    // The budget is the run's: the build before it depends on what was built already.
    let started = Instant::now();
    options.settings.deadline = options
        .budget
        .map(|budget| started + budget.saturating_sub(AFTER_THE_ROUNDS));
    let profile = if options.release { "release" } else { "debug" };
    let mut machine = machine(iptables);
    machine["idle_memory"] = idle_memory(&bins.bench)?;
    println!(
        "bench: N = {:?}, {} samples per metric and mode, {} rounds; {}",
        options.settings.services,
        options.settings.samples,
        options.settings.rounds,
        report::machine_line(&machine)
    );
    let points = {
        let mut runner = runner::Runner::new(&bins, &options.settings)?;
        // Only a run with the iptables mode tries to create them.
        if options.settings.modes.contains(&Mode::Iptables) {
            machine["iptables_nfacct_counters"] =
                json!(runner.iptables_counters() == iptables::Counters::Nfacct);
        }
        runner.run()?
        // The runner drops here: agent stopped, pins, namespaces and cgroup removed.
    };
    // Again at the end: the machine may have changed during the run.
    machine["idle_memory_end"] = idle_memory(&bins.bench)?;
    let results = report::to_json(
        &points,
        &options.settings,
        options.budget,
        machine,
        profile,
        options.quick,
    );
    write_outputs(&options.out, &results)?;
    println!(
        "\nbench: done in {:.0} s after the build; results in {}",
        started.elapsed().as_secs_f64(),
        options.out.display()
    );
    Ok(())
}

fn write_outputs(out: &Path, results: &Value) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("latest.json"),
        serde_json::to_string_pretty(results)? + "\n",
    )?;
    std::fs::write(out.join("latest.md"), report::markdown(results))?;
    plot::latency_chart(&out.join("latency.png"), results)?;
    plot::programming_chart(&out.join("programming.png"), results)?;
    Ok(())
}

/// The test suite's check that the benchmark still runs: `bench --quick` into a
/// temporary directory, then the outputs exist and parse. No number is judged.
pub fn smoke(root: &Path) -> Result<()> {
    let out = std::env::temp_dir().join(format!("ekp-bench-smoke-{}", std::process::id()));
    let result = (|| {
        run(
            root,
            &["--quick".into(), "--out".into(), out.display().to_string()],
        )?;
        check_outputs(&out)
    })();
    let _ = std::fs::remove_dir_all(&out);
    result
}

fn check_outputs(out: &Path) -> Result<()> {
    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("latest.json"))?)
        .context("latest.json does not parse")?;
    let points = json["points"]
        .as_array()
        .context("latest.json has no points")?;
    if points.is_empty() {
        bail!("latest.json has no points");
    }
    for point in points {
        for mode in report::MODES {
            for metric in ["crr", "nodeport_crr", "remote_crr"] {
                let latency = &point["modes"][mode][metric];
                if latency["samples"].as_u64().unwrap_or(0) == 0 {
                    bail!(
                        "latest.json: no {metric} samples for {mode} at N={}: {}",
                        point["services"],
                        latency["first_error"]
                    );
                }
            }
        }
    }
    let md = std::fs::read_to_string(out.join("latest.md"))?;
    if !md.contains("| ebpf | iptables | nftables | direct | hooks |") {
        bail!("latest.md has no results table");
    }
    if !md.contains("| NodePort TCP connect") {
        bail!("latest.md has no NodePort rows");
    }
    for png in ["latency.png", "programming.png"] {
        let bytes = std::fs::read(out.join(png))?;
        if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            bail!("{png} is not a PNG");
        }
    }
    println!("bench --quick: outputs present and parseable");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_default_quick_and_explicit() {
        let root = Path::new("/repo");
        let o = parse_options(root, &[]).unwrap();
        assert_eq!(o.settings.services, vec![1, 1000, 10000]);
        assert!(o.release);
        assert_eq!(o.budget, Some(Duration::from_secs(600)));
        let o = parse_options(root, &["--quick".into()]).unwrap();
        assert_eq!(o.settings.services, vec![1, 100]);
        assert!(!o.release);
        let o = parse_options(
            root,
            &[
                "--services".into(),
                "1,5000,30000".into(),
                "--out".into(),
                "/tmp/x".into(),
            ],
        )
        .unwrap();
        assert_eq!(o.settings.services, vec![1, 5000, 30000]);
        assert_eq!(o.out, PathBuf::from("/tmp/x"));
        assert!(parse_options(root, &["--services".into(), "0".into()]).is_err());
        let budget =
            |v: &str| parse_options(root, &["--budget".into(), v.into()]).map(|o| o.budget);
        assert_eq!(budget("90").unwrap(), Some(Duration::from_secs(90)));
        assert_eq!(budget("0").unwrap(), None);
        assert!(budget("ten").is_err());
        assert!(parse_options(root, &["--bogus".into()]).is_err());
    }
}
