//! The `ebpf-kube-proxy` command line (clap derive; kube-proxy's flag names where the
//! meaning is the same).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::translate::NodePortAddresses;
use crate::{dataplane, kube_proxy_cleanup, list, run};

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/ebpf-kube-proxy";

#[derive(Parser, Debug)]
#[command(
    name = "ebpf-kube-proxy",
    version,
    about = "kube-proxy's job, done with BPF maps"
)]
struct Cli {
    /// Where maps and links are pinned (bpffs).
    #[arg(long, global = true, default_value = DEFAULT_PIN_PATH)]
    pin_path: PathBuf,

    /// Log format on stderr: `text`, or `json` (one object per line, for log collectors).
    /// The level comes from `EKP_LOG` (a tracing filter, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    logging_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Program the datapath and keep it in sync with the source of Services.
    Run(Box<RunArgs>),
    /// Show frontends and their backends, read from the pinned maps.
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
        output: Format,
        /// Show how full each map is (conntrack, affinity, socket rev-NAT included) instead.
        #[arg(long, conflicts_with = "conntrack")]
        maps: bool,
        /// Show the north-south conntrack entries (NodePort, externalIP and LoadBalancer
        /// flows: each tuple and its rewrite) instead.
        #[arg(long)]
        conntrack: bool,
    },
    /// Detach and unpin everything ebpf-kube-proxy created under --pin-path (refused while
    /// an agent runs on it).
    Cleanup,
    /// Remove what kube-proxy left in the kernel (its iptables chains and the jumps to them,
    /// its nftables tables, the IPVS dummy interface), as `kube-proxy --cleanup` does; IPVS
    /// virtual servers left are counted, not removed (`ipvsadm --clear`).
    CleanupIptables {
        /// Print what would be removed and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Clean up even though no agent serves this node from --pin-path (kube-proxy's
        /// rules may be all that serves its Services).
        #[arg(long)]
        without_agent: bool,
    },
    /// Switch the eBPF programs' logging at run time, in the pinned `ekp_log_v1` map: `off`,
    /// `error` (unusual events), `debug` (every translated connection and new flow). The
    /// records appear in the running agent's log (target `ebpf`). Without a level, show it.
    BpfLog {
        #[arg(value_enum)]
        level: Option<BpfLogLevel>,
    },
}

/// A flag given twice takes its last value (list flags add up), as kube-proxy's flags do.
#[derive(Parser, Debug)]
#[command(args_override_self = true)]
struct RunArgs {
    /// Standalone source: a directory of Service, EndpointSlice and Node manifests
    /// (YAML/JSON), followed for creation, edits and deletion. Write files atomically
    /// (rename). Without it, the Kubernetes API is the source.
    #[arg(long, conflicts_with_all = ["kubeconfig", "master"])]
    manifests: Option<PathBuf>,

    /// kubeconfig file [default: $KUBECONFIG, else the in-cluster service account].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,

    /// API server address, overriding the kubeconfig (kube-proxy's --master). Needed in
    /// clusters where the `kubernetes` Service is only reachable through this agent.
    #[arg(long)]
    master: Option<String>,

    /// An API server connection that brings nothing for this long is given up and the
    /// request made again: a list or a watch's start that is never answered, a watch with
    /// neither events nor the bookmarks the API server sends about every minute (a frozen
    /// API server, a load balancer holding connections to one). kube-proxy's client finds
    /// those with HTTP/2 pings; this one speaks HTTP/1.1. 0: never.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    api_read_timeout: Duration,

    /// NodePorts are served on this node's addresses (its devices' and its Node object's)
    /// within these CIDRs, comma-separated, or on its primary address only with `primary`
    /// (kube-proxy's flag) [default: every IPv4 address of the devices and the Node].
    #[arg(long, value_delimiter = ',', value_parser = parse_nodeport_address)]
    nodeport_addresses: Vec<String>,

    /// Serve NodePorts on `127.0.0.0/8` to the node's own processes (kube-proxy's
    /// `--iptables-localhost-nodeports`), where `--nodeport-addresses` admits `127.0.0.1`:
    /// by default, not with `primary`; with CIDRs (none of length 0) at 127.0.0.1 alone.
    /// Pods' loopback addresses are their own.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    localhost_nodeports: bool,

    /// Also intercept, at the socket layer, externalIPs this node does not own (kube-proxy's
    /// behaviour, which lets a Service capture traffic to any address: CVE-2020-8554).
    #[arg(long)]
    socket_lb_external_ips: bool,

    /// Also serve ClusterIPs to traffic arriving from outside the node (a Service range
    /// routed to the nodes), on the north-south devices, as kube-proxy does (Cilium's
    /// `--bpf-lb-external-clusterip`). Off by default: ClusterIPs are for the cluster.
    #[arg(long)]
    external_clusterip: bool,

    /// Capacity (max_entries) of the services map: one entry per frontend plus one per
    /// backend slot; a NodePort has two frontends (both scopes) on each node address (the
    /// devices' and the Node's). A map pinned with another size (any of these) is replaced
    /// at start by one of the new size holding its entries, as the new programs attach.
    #[arg(long, default_value_t = proxy_common::DEFAULT_SERVICES_MAX, value_parser = clap::value_parser!(u32).range(1..))]
    map_size_services: u32,

    /// Capacity of the backends array (distinct endpoint address:port/protocol): ids index
    /// it from 1, so it holds one fewer.
    #[arg(long, default_value_t = proxy_common::DEFAULT_BACKENDS_MAX, value_parser = clap::value_parser!(u32).range(2..))]
    map_size_backends: u32,

    /// Capacity of the rev-NAT array (one per frontend): ids index it from 1 and are 16-bit,
    /// so it holds one fewer, at most 65535.
    #[arg(long, default_value_t = proxy_common::DEFAULT_REV_NAT_MAX, value_parser = clap::value_parser!(u32).range(2..))]
    map_size_rev_nat: u32,

    /// Capacity of the socket rev-NAT LRU: the socket translations the socket slots cannot
    /// hold (a slot another live socket holds, an unconnected UDP socket's earlier backends).
    #[arg(long, default_value_t = proxy_common::DEFAULT_SOCK_REV_NAT_MAX, value_parser = clap::value_parser!(u32).range(1..))]
    map_size_sock_rev_nat: u32,

    /// Capacity of the session-affinity LRU (one per client and affinity frontend).
    #[arg(long, default_value_t = proxy_common::DEFAULT_AFFINITY_MAX, value_parser = clap::value_parser!(u32).range(1..))]
    map_size_affinity: u32,

    /// Capacity of the north-south conntrack/NAT LRU (two entries per NodePort, externalIP
    /// or LoadBalancer flow).
    #[arg(long, default_value_t = proxy_common::DEFAULT_NAT_CT_MAX, value_parser = clap::value_parser!(u32).range(1..))]
    map_size_nat_ct: u32,

    /// Capacity of the loadBalancerSourceRanges LPM trie (one entry per LB IP frontend and
    /// source range).
    #[arg(long, default_value_t = proxy_common::DEFAULT_SOURCE_RANGES_MAX, value_parser = clap::value_parser!(u32).range(1..))]
    map_size_source_ranges: u32,

    /// `/healthz`, `/livez` and `/readyz` address; empty disables (kube-proxy's flag).
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_bind)]
    healthz_bind_address: BindAddress,

    /// `/metrics` address; empty disables (kube-proxy's flag).
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_bind)]
    metrics_bind_address: BindAddress,

    /// Exit when the healthz or metrics port is taken, instead of logging it and trying
    /// again every 5 s while the datapath works (kube-proxy's flag and default).
    #[arg(long)]
    bind_address_hard_fail: bool,

    /// cgroup v2 directory the socket programs attach to [default: the cgroup v2 root].
    #[arg(long)]
    cgroup: Option<PathBuf>,

    /// This node's name [default: $NODE_NAME, else the hostname], trimmed and lower-cased
    /// as kube-proxy does. `--hostname-override` is kube-proxy's name for it.
    #[arg(long = "node-name", alias = "hostname-override")]
    node_name: Option<String>,

    /// Changes are batched; syncs are at least this far apart (kube-proxy's
    /// --min-sync-period), at most --sync-period. Go's form, e.g. 250ms, 1m30s.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    min_sync_period: Duration,

    /// Everything is read, translated and diffed again at least this often, whether changes
    /// come or not (kube-proxy's --sync-period).
    #[arg(long, default_value = "30s", value_parser = parse_sync_period)]
    sync_period: Duration,

    /// How often the north-south conntrack entries of ended or expired flows are deleted
    /// (Cilium's --conntrack-gc-interval); 0 leaves them to the map's LRU eviction.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    conntrack_gc_interval: Duration,

    /// Network devices, comma-separated, whose traffic to NodePorts, externalIPs and
    /// LoadBalancer IPs is translated by the north-south TCX programs (Cilium's flag;
    /// kube-proxy has none). Default: the devices carrying the Node's InternalIP/ExternalIP
    /// addresses and those with an IPv4 default route. Empty (`--devices ''`): none, only
    /// the node's processes and pods reach Services.
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,

    /// Address that traffic to backends on other nodes is source-NATed to, so that their
    /// replies come back through this node [default: with detected devices, the Node's first
    /// address found on one; else the first IPv4 address of the first device].
    #[arg(long)]
    snat_address: Option<std::net::Ipv4Addr>,

    /// Socket-level load balancing only for the node's own network namespace, as service
    /// meshes need (their sidecars must see the Service address; Cilium's
    /// socketLB.hostNamespaceOnly). Pods' traffic is then translated per packet on their
    /// devices, named by --pod-devices.
    #[arg(long)]
    socket_lb_host_namespace_only: bool,

    /// Pods' devices (host side), comma-separated names or prefixes ending in `*` (e.g.
    /// `lxc*,cali*`), that get the per-packet programs of --socket-lb-host-namespace-only.
    /// Devices that appear later are attached when the kernel announces them.
    #[arg(
        long,
        value_delimiter = ',',
        requires = "socket_lb_host_namespace_only"
    )]
    pod_devices: Vec<String>,

    /// Source ports for that SNAT (inclusive). Keep it clear of
    /// net.ipv4.ip_local_port_range, or reserve the ports it shares with it in
    /// net.ipv4.ip_local_reserved_ports, and clear of the NodePort range (a warning says
    /// when it is not). An endpoint on another node takes new connections only as fast as
    /// the range lasts: a port goes again 2 s after its connection closed (10 s after a RST),
    /// through the endpoint's TIME_WAIT only to a SYN it takes: some 2000 a second with the
    /// default (a UDP flow, or a SYN never answered, holds its port for 60 s).
    #[arg(long, default_value = "61000-65535", value_parser = crate::devices::parse_port_range)]
    snat_port_range: (u16, u16),

    /// The cluster's NodePort range (the API server's --service-node-port-range), e.g.
    /// 30000-32767: a warning says when the SNAT ports overlap it.
    #[arg(long, value_parser = crate::devices::parse_port_range)]
    nodeport_range: Option<(u16, u16)>,

    /// eBPF programs' logging, applied at start (`bpf-log` changes it while running).
    #[arg(long, value_enum, default_value_t = BpfLogLevel::Off)]
    bpf_log_level: BpfLogLevel,
}

/// `--devices` absent: detect; empty: no north-south programs; else the devices named.
fn north_south(
    devices: Option<Vec<String>>,
    snat_address: Option<std::net::Ipv4Addr>,
    snat_ports: (u16, u16),
) -> Option<run::NorthSouthConfig> {
    let devices = match devices {
        None => None,
        Some(list) => {
            let named: Vec<String> = list.into_iter().filter(|d| !d.is_empty()).collect();
            if named.is_empty() {
                return None;
            }
            Some(named)
        }
    };
    Some(run::NorthSouthConfig {
        devices,
        snat_address,
        snat_ports,
        node_port_range: None,
    })
}

/// One value of `--nodeport-addresses` (a CIDR of either family, or `primary`); whether
/// the values go together is checked on the whole list.
fn parse_nodeport_address(s: &str) -> Result<String, String> {
    NodePortAddresses::parse(&[s]).map(|_| s.to_owned())
}

/// A bind address, or none (the flag given as "").
#[derive(Clone, Copy, Debug)]
struct BindAddress(Option<std::net::SocketAddr>);

fn parse_bind(s: &str) -> Result<BindAddress, String> {
    if s.is_empty() {
        return Ok(BindAddress(None));
    }
    s.parse()
        .map(|a| BindAddress(Some(a)))
        .map_err(|e| format!("invalid address {s:?}: {e} (use IP:PORT, or \"\" to disable)"))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// What the eBPF programs log (`LOG_LEVEL_*` in the `ekp_log_v1` map).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BpfLogLevel {
    Off,
    Error,
    Debug,
}

impl BpfLogLevel {
    const ALL: [BpfLogLevel; 3] = [BpfLogLevel::Off, BpfLogLevel::Error, BpfLogLevel::Debug];

    fn raw(self) -> u8 {
        match self {
            BpfLogLevel::Off => proxy_common::LOG_LEVEL_OFF,
            BpfLogLevel::Error => proxy_common::LOG_LEVEL_ERROR,
            BpfLogLevel::Debug => proxy_common::LOG_LEVEL_DEBUG,
        }
    }

    fn name(self) -> &'static str {
        match self {
            BpfLogLevel::Off => "off",
            BpfLogLevel::Error => "error",
            BpfLogLevel::Debug => "debug",
        }
    }
}

/// `--sync-period`: more than 0, as kube-proxy validates it. A full sync queued again as
/// soon as one ends would keep the agent busy, and its health timeout (twice the period)
/// would be 0.
fn parse_sync_period(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err("must be greater than 0".into()),
        period => Ok(period),
    }
}

/// kube-proxy's validation: a minimum sync period above the sync period would hold every
/// change longer than the health timeout (twice the period) allows.
fn check_sync_periods(min_sync_period: Duration, sync_period: Duration) -> Result<()> {
    if min_sync_period > sync_period {
        bail!(
            "--min-sync-period ({min_sync_period:?}) must not exceed --sync-period \
             ({sync_period:?})"
        );
    }
    Ok(())
}

/// The longest duration a flag takes: beyond it, the periods' sums would overflow the
/// clock's arithmetic, and no period means anything.
const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration as Go writes one, the form of kube-proxy's flags and of its configuration
/// file (`1m0s`, `1h30m`, `1.5s`, `250ms`; units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`),
/// or a bare number of seconds; not negative, at most [`LONGEST`].
fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?} (e.g. 1m30s, 250ms, 1.5s)");
    // (Go takes a sign; a negative duration is no period.)
    let s = text.strip_prefix('+').unwrap_or(text);
    if let Ok(seconds) = s.parse::<u64>() {
        return Some(Duration::from_secs(seconds))
            .filter(|d| *d <= LONGEST)
            .ok_or_else(|| format!("duration {s:?} is longer than a year"));
    }
    let is_number = |c: char| c.is_ascii_digit() || c == '.';
    let (mut rest, mut nanos) = (s, 0u128);
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let unit_at = rest.find(|c: char| !is_number(c)).ok_or_else(invalid)?;
        let (number, tail) = rest.split_at(unit_at);
        let next_at = tail.find(is_number).unwrap_or(tail.len());
        let (unit, next) = tail.split_at(next_at);
        let per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(invalid()),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(invalid());
        }
        let digits = |d: &str| -> Result<u128, String> {
            if d.is_empty() {
                Ok(0)
            } else {
                d.parse::<u128>().map_err(|_| invalid())
            }
        };
        // Go keeps the fraction's digits down to a nanosecond.
        let fraction = &fraction[..fraction.len().min(18)];
        let scale = 10u128.pow(fraction.len() as u32);
        let fraction = digits(fraction)? * per_unit / scale;
        nanos = digits(whole)?
            .checked_mul(per_unit)
            .and_then(|n| n.checked_add(fraction))
            .and_then(|n| n.checked_add(nanos))
            .filter(|n| *n <= LONGEST.as_nanos())
            .ok_or_else(|| format!("duration {s:?} is longer than a year"))?;
        rest = next;
    }
    Ok(Duration::from_nanos(nanos as u64))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.logging_format);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EKP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let config = run_config(
                *args,
                cli.pin_path,
                std::env::var("NODE_NAME").ok().as_deref(),
                || {
                    std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .context("reading the hostname for the node name (use --hostname-override)")
                },
            )?;
            run::raise_open_files_limit();
            run::runtime()
                .context("starting the async runtime")?
                .block_on(run::run(config))
        }
        Command::List {
            output,
            maps,
            conntrack,
        } => {
            let text = if conntrack {
                let flows = list::read_conntrack(&cli.pin_path)?;
                match output {
                    Format::Text => list::render_conntrack_text(&flows),
                    Format::Json => list::render_conntrack_json(&flows)?,
                }
            } else if maps {
                let fills = dataplane::map_fill(&cli.pin_path)?;
                match output {
                    Format::Text => list::render_maps_text(&fills),
                    Format::Json => list::render_maps_json(&fills)?,
                }
            } else {
                let frontends = list::read(&cli.pin_path)?;
                match output {
                    Format::Text => list::render_text(&frontends),
                    Format::Json => list::render_json(&frontends)?,
                }
            };
            print!("{text}");
            Ok(())
        }
        Command::Cleanup => {
            // Under a running agent, the maps it writes would be unpinned, and its programs
            // would detach when it stops (its links no longer pinned), leaving the node
            // untranslated until the next start.
            let Some(_lock) = dataplane::try_lock_pin_dir(&cli.pin_path)? else {
                bail!(
                    "an agent runs on {} (it holds the pin directory's lock): stop it first",
                    cli.pin_path.display()
                );
            };
            let removed = dataplane::cleanup(&cli.pin_path)?;
            for path in &removed {
                println!("removed {}", path.display());
            }
            println!(
                "cleanup: {} pins removed under {}",
                removed.len(),
                cli.pin_path.display()
            );
            Ok(())
        }
        Command::CleanupIptables {
            dry_run,
            without_agent,
        } => {
            // Until an agent serves the node, kube-proxy's rules are what serves its
            // Services (a node the chart leaves out, an agent that cannot start there).
            if !without_agent {
                dataplane::agent_serves(&cli.pin_path).map_err(|why| {
                    anyhow!(
                        "{why}: kube-proxy's rules may be all that serves this node's \
                         Services, so they stay (--without-agent removes them anyway)"
                    )
                })?;
            }
            kube_proxy_cleanup::run(dry_run)
        }
        Command::BpfLog { level } => {
            if let Some(level) = level {
                dataplane::set_bpf_log_level(&cli.pin_path, level.raw())?;
            }
            let raw = dataplane::pinned_bpf_log_level(&cli.pin_path)?;
            let name = BpfLogLevel::ALL
                .into_iter()
                .find(|l| l.raw() == raw)
                .map_or_else(|| format!("unknown ({raw})"), |l| l.name().to_owned());
            println!("eBPF log level: {name}");
            Ok(())
        }
    }
}

/// What `ebpf-kube-proxy <argv>` (the program's name first) would run with: every flag of
/// `run` parsed and checked as at its start, nothing started. `node_env` stands for
/// `$NODE_NAME`. The chart's checks put the agent's rendered arguments through it, so that a
/// flag the chart writes and the agent refuses fails a test, not a rollout.
pub fn run_config_from<I, T>(argv: I, node_env: Option<&str>) -> Result<run::Config>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::try_parse_from(argv)?;
    let Command::Run(args) = cli.command else {
        bail!("not a `run` command line");
    };
    run_config(*args, cli.pin_path, node_env, || {
        bail!("no node name: give NODE_NAME or --hostname-override")
    })
}

/// `run`'s flags as the agent's configuration; `hostname` is read only when neither
/// `--hostname-override` nor `node_env` names the node.
fn run_config(
    args: RunArgs,
    pin_dir: PathBuf,
    node_env: Option<&str>,
    hostname: impl FnOnce() -> Result<String>,
) -> Result<run::Config> {
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => dataplane::cgroup2_root()?,
    };
    let node_name = node_name(args.node_name.as_deref(), node_env, hostname)?;
    check_sync_periods(args.min_sync_period, args.sync_period)?;
    let source = match args.manifests {
        Some(dir) => run::SourceConfig::Manifests(dir),
        None => run::SourceConfig::Kube(crate::source::kube::Connection {
            kubeconfig: args.kubeconfig,
            master: args.master,
            read_timeout: Some(args.api_read_timeout).filter(|t| !t.is_zero()),
        }),
    };
    Ok(run::Config {
        source,
        cgroup,
        pin_dir,
        node_name,
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        conntrack_gc_interval: args.conntrack_gc_interval,
        map_sizes: dataplane::MapSizes {
            services: args.map_size_services,
            backends: args.map_size_backends,
            rev_nat: args.map_size_rev_nat,
            sock_rev_nat: args.map_size_sock_rev_nat,
            affinity: args.map_size_affinity,
            nat_ct: args.map_size_nat_ct,
            source_ranges: args.map_size_source_ranges,
        },
        node_ports: NodePortAddresses::parse(&args.nodeport_addresses)
            .map_err(|e| anyhow!("--nodeport-addresses: {e}"))?,
        socket_lb_external_ips: args.socket_lb_external_ips,
        external_cluster_ips: args.external_clusterip,
        localhost_node_ports: args.localhost_nodeports,
        healthz_bind: args.healthz_bind_address.0,
        metrics_bind: args.metrics_bind_address.0,
        bind_address_hard_fail: args.bind_address_hard_fail,
        bpf_log_level: args.bpf_log_level.raw(),
        north_south: north_south(args.devices, args.snat_address, args.snat_port_range).map(|ns| {
            run::NorthSouthConfig {
                node_port_range: args.nodeport_range,
                ..ns
            }
        }),
        socket_lb_host_namespace_only: args.socket_lb_host_namespace_only,
        pod_devices: args.pod_devices,
    })
}

/// This node's name as kube-proxy's `GetHostname` makes it: the flag, else `$NODE_NAME`,
/// else the hostname (an empty one counts as not given), trimmed and lower-cased as Node
/// names are; never empty, since an empty name would match endpoints that name no node.
fn node_name(
    flag: Option<&str>,
    env: Option<&str>,
    hostname: impl FnOnce() -> Result<String>,
) -> Result<String> {
    let given = [flag, env]
        .into_iter()
        .flatten()
        .find(|name| !name.trim().is_empty());
    let raw = match given {
        Some(name) => name.to_owned(),
        None => hostname()?,
    };
    let name = raw.trim().to_lowercase();
    if name.is_empty() {
        bail!("the node name is empty: set --hostname-override (or NODE_NAME)");
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kube-proxy's `GetHostname`: trimmed, lower-cased, empty refused; here the flag, then
    /// `NODE_NAME`, then the hostname, an empty one counting as not given.
    #[test]
    fn node_names_are_normalised_like_kube_proxys_hostname() {
        let hostname = || Ok("Host-A\n".to_owned());
        let cases: [(Option<&str>, Option<&str>, &str); 6] = [
            (Some(" Worker-1 "), Some("env"), "worker-1"),
            (Some(""), Some("Node-2"), "node-2"),
            (None, Some("node-2"), "node-2"),
            (Some("  "), Some(""), "host-a"),
            (None, None, "host-a"),
            (Some("\tN3"), None, "n3"),
        ];
        for (flag, env, want) in cases {
            assert_eq!(
                node_name(flag, env, hostname).expect("a name"),
                want,
                "{flag:?} {env:?}"
            );
        }
        let error = node_name(Some(" "), None, || Ok(" \n".to_owned()))
            .expect_err("an empty name is refused");
        assert!(error.to_string().contains("node name is empty"), "{error}");
    }

    #[test]
    fn durations_parse_like_kube_proxy_flags() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        // Go's form, as kube-proxy's configuration file writes durations.
        for (text, want) in [
            ("1m0s", Duration::from_secs(60)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            ("2h45m30.25s", Duration::from_millis(9_930_250)),
            ("100us", Duration::from_micros(100)),
            ("100µs", Duration::from_micros(100)),
            ("7ns", Duration::from_nanos(7)),
            ("0", Duration::ZERO),
            ("8760h", Duration::from_secs(365 * 24 * 3600)),
            ("+1s", Duration::from_secs(1)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "s",
            "1x",
            "-1s",
            "1.s.",
            ".s",
            "1 s",
            "1s ",
            "1d",
            "8761h",
            "99999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_sync_period("0s").is_err());
        assert_eq!(parse_sync_period("1m"), Ok(Duration::from_secs(60)));
    }

    /// kube-proxy refuses a minimum sync period above the sync period.
    #[test]
    fn a_min_sync_period_above_the_sync_period_is_refused() {
        let secs = Duration::from_secs;
        let error = check_sync_periods(secs(300), secs(30)).expect_err("refused");
        assert!(
            error.to_string().contains("must not exceed --sync-period"),
            "{error:#}"
        );
        check_sync_periods(secs(30), secs(30)).expect("equal periods are valid");
        check_sync_periods(Duration::ZERO, secs(30)).expect("no minimum is valid");
    }

    #[test]
    fn nodeport_addresses_take_cidrs_of_both_families_or_primary() {
        use clap::Parser;
        let parse = |value: &str| {
            let argv = ["ebpf-kube-proxy", "run", "--nodeport-addresses", value];
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Run(args) => args.nodeport_addresses,
                _ => panic!("not run"),
            })
        };
        assert_eq!(
            parse("10.0.0.0/8,2001:db8::/32").expect("CIDRs"),
            ["10.0.0.0/8", "2001:db8::/32"]
        );
        assert_eq!(parse("primary").expect("primary"), ["primary"]);
        for bad in ["10.0.0.0", "10.0.0.0/33", "eth0"] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn devices_are_detected_unless_named_and_empty_turns_them_off() {
        use clap::Parser;
        let devices = |extra: &[&str]| {
            let argv = ["ebpf-kube-proxy", "run", "--manifests", "/m"];
            let cli = Cli::try_parse_from(argv.iter().chain(extra)).expect("parsing");
            let Command::Run(args) = cli.command else {
                panic!("not run");
            };
            north_south(args.devices, None, (61000, 65535)).map(|ns| ns.devices)
        };
        assert_eq!(devices(&[]), Some(None), "absent: detect");
        assert_eq!(devices(&["--devices", ""]), None, "empty: off");
        assert_eq!(
            devices(&["--devices", "eth0,ens5"]),
            Some(Some(vec!["eth0".into(), "ens5".into()]))
        );
    }

    /// A map of no entries fails the kernel's map creation, and ids index the backends and
    /// rev-NAT arrays from 1: such sizes are refused with the flag's name, not at load.
    #[test]
    fn map_sizes_that_hold_nothing_are_refused() {
        let parse = |flag: &str, value: &str| {
            let argv = ["ebpf-kube-proxy", "run", "--manifests", "/m", flag, value];
            Cli::try_parse_from(argv).map_err(|e| e.to_string())
        };
        for flag in [
            "--map-size-services",
            "--map-size-sock-rev-nat",
            "--map-size-affinity",
            "--map-size-nat-ct",
            "--map-size-source-ranges",
        ] {
            let refused = parse(flag, "0").expect_err(flag);
            assert!(refused.contains(flag), "{refused}");
            assert!(parse(flag, "1").is_ok(), "{flag} 1");
        }
        for flag in ["--map-size-backends", "--map-size-rev-nat"] {
            let refused = parse(flag, "1").expect_err(flag);
            assert!(refused.contains(flag), "{refused}");
            assert!(parse(flag, "2").is_ok(), "{flag} 2");
        }
    }

    #[test]
    fn an_empty_bind_address_disables_the_server() {
        assert!(parse_bind("").is_ok_and(|b| b.0.is_none()));
        assert!(parse_bind("127.0.0.1:0").is_ok_and(|b| b.0.is_some()));
        assert!(parse_bind("10256").is_err());
    }
}
