//! `run`: the agent's main loop, kube-proxy's bounded-frequency runner in small.
//!
//! A change from the source queues a sync; syncs are at least `min_sync_period` apart (so
//! bursts are batched), a full re-sync runs every `sync_period` even without changes, and a
//! failed sync is retried after `min_sync_period` (at least a second). A sync for a change
//! reads only the objects that changed from the source (a `Delta`), and translates, fits
//! and plans only what they touch (`translate::incremental`, `sync::touched`), so one
//! endpoint change costs about the same at 10000 Services as at 10. The first sync, the
//! periodic one and a retry read a snapshot of everything and translate it all; any sync
//! after a failed or partial one (something did not fit) diffs everything. Input problems
//! are logged once each, naming the object, and never stop the loop.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use proxy_common::NodeConfig;

use crate::capacity::{self, Capacity};
use crate::conntrack_gc;
use crate::dataplane::{self, MapSizes};
use crate::events::Events;
use crate::file_events::FileEvents;
use crate::healthcheck::{self, HealthCheckServers};
use crate::http::{self, Health, OnBindFailure};
use crate::link_events::LinkEvents;
use crate::metrics::{MapLabel, Metrics, PolicyLabel, SkipLabel};
use crate::model::Skipped;
use crate::model::{FrontendKey, NodeInfo, ServicePortName};
use crate::safety::SocketExternalIps;
use crate::source::kube::{self as kube_source, KubeSource};
use crate::source::{Delta, Snapshot, manifests};
use crate::sync::Syncer;
use crate::sync::touched::Touched;
use crate::translate::incremental::{Changes, Incremental};
use crate::translate::{HealthCheck, HealthChecks, NodePortAddresses, health_checks, node_info};
use crate::{abi, devices};

/// Where Services and EndpointSlices come from.
pub enum SourceConfig {
    /// A directory of manifests (standalone mode).
    Manifests(PathBuf),
    /// The Kubernetes API.
    Kube(kube_source::Connection),
}

pub struct Config {
    pub source: SourceConfig,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub node_name: String,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    /// How often expired north-south conntrack entries are deleted; zero: never (the LRU
    /// evicts them when it is full).
    pub conntrack_gc_interval: Duration,
    pub map_sizes: MapSizes,
    /// kube-proxy's `--nodeport-addresses`: which of the node's addresses serve NodePorts.
    pub node_ports: NodePortAddresses,
    /// Serve externalIPs that are not this node's to its own processes and pods too, as
    /// kube-proxy does (see `safety`: CVE-2020-8554).
    pub socket_lb_external_ips: bool,
    /// Serve ClusterIPs to traffic from outside the node too (`--external-clusterip`).
    pub external_cluster_ips: bool,
    /// Serve NodePorts on loopback addresses to the node's own processes where `node_ports`
    /// admits them (`--localhost-nodeports`, kube-proxy's `--iptables-localhost-nodeports`).
    pub localhost_node_ports: bool,
    /// `/healthz` and `/livez`; `None` disables them.
    pub healthz_bind: Option<SocketAddr>,
    /// `/metrics`; `None` disables it.
    pub metrics_bind: Option<SocketAddr>,
    /// A taken healthz or metrics port stops the agent instead of being tried again
    /// (kube-proxy's `--bind-address-hard-fail`).
    pub bind_address_hard_fail: bool,
    /// What the eBPF programs log (`LOG_LEVEL_*`), written to the log switch at start.
    pub bpf_log_level: u8,
    /// The north-south programs (NodePort, externalIPs, LoadBalancer IPs from outside the
    /// node); `None` (`--devices ''`) serves only the socket programs.
    pub north_south: Option<NorthSouthConfig>,
    /// Socket LB for the node's own namespace only (service meshes): pods are translated
    /// per packet on the devices matching `pod_devices`.
    pub socket_lb_host_namespace_only: bool,
    /// `--pod-devices`: names, or prefixes ending in `*`.
    pub pod_devices: Vec<String>,
}

/// `--devices` and the SNAT settings, as given.
#[derive(Clone, Debug)]
pub struct NorthSouthConfig {
    /// `None`: detect them from the Node's addresses and the default route.
    pub devices: Option<Vec<String>>,
    /// `--snat-address`; default: the Node's first address on a device, else the first
    /// IPv4 address of the first device.
    pub snat_address: Option<Ipv4Addr>,
    /// `--snat-port-range`, inclusive.
    pub snat_ports: (u16, u16),
    /// `--nodeport-range`: the cluster's NodePort range, if given, checked against the SNAT
    /// ports.
    pub node_port_range: Option<(u16, u16)>,
}

impl NorthSouthConfig {
    /// The devices and the node config the programs read; `None` when detection finds no
    /// device. A missing SNAT address is not an error (a device may carry only LoadBalancer
    /// traffic to local pods); flows that need SNAT are then left untranslated, which the
    /// warning says.
    fn resolve(&self, node_addresses: &[Ipv4Addr]) -> Result<Option<dataplane::NorthSouth>> {
        let Some(north_south) = self.compose(node_addresses)? else {
            tracing::warn!(
                node_addresses = ?node_addresses,
                "no device carries the Node's addresses or a default route: no north-south \
                 programs until one does (or name them with --devices)"
            );
            return Ok(None);
        };
        if self.devices.is_none() {
            tracing::info!(devices = ?north_south.devices, "north-south devices detected");
        }
        let first = &north_south.devices[0];
        if north_south.node_config.snat_addr == 0 {
            tracing::warn!(
                device = %first,
                "no SNAT address (the device has no IPv4 address, and no --snat-address): \
                 NodePort traffic to backends on other nodes will not be translated"
            );
        }
        // The SNAT ports must not be ports the host's own connections may pick: a flow of
        // the host and a translated flow with the same tuple would steal each other's
        // replies. Reserved ports (`ip_local_reserved_ports`) are never picked: a range
        // widened into the ephemeral one is fine where it is reserved.
        match devices::ephemeral_ports().and_then(|e| Ok((e, devices::reserved_ports()?))) {
            Ok((ephemeral, reserved))
                if devices::collides_with_host(ephemeral, &reserved, self.snat_ports) =>
            {
                tracing::warn!(
                    snat_ports = ?self.snat_ports,
                    ephemeral_ports = ?ephemeral,
                    reserved_ports = ?reserved,
                    "the SNAT port range overlaps net.ipv4.ip_local_port_range where \
                     net.ipv4.ip_local_reserved_ports does not cover it: host connections \
                     and translated flows may collide; narrow one of them or reserve the ports"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot check the SNAT port range: {e:#}"),
        }
        // A NodePort in the SNAT range would have its replies taken for a translated
        // flow's (the reply entry of a flow to node:port looks the same).
        if let Some(node_ports) = self.node_port_range
            && devices::overlap(node_ports, self.snat_ports)
        {
            tracing::warn!(
                snat_ports = ?self.snat_ports,
                node_ports = ?node_ports,
                "the SNAT port range overlaps the NodePort range: narrow one of them"
            );
        }
        Ok(Some(north_south))
    }

    /// Whether the devices are detected (no `--devices`), and so followed while running.
    fn detected(&self) -> bool {
        self.devices.is_none()
    }

    /// The devices (named, or detected from `node_addresses` and the default route) and the
    /// node config; `None` when detection finds no device.
    fn compose(&self, node_addresses: &[Ipv4Addr]) -> Result<Option<dataplane::NorthSouth>> {
        let (devices, node_snat) = match &self.devices {
            Some(listed) => (listed.clone(), None),
            None => devices::detect(node_addresses)
                .context("detecting the devices for north-south traffic")?,
        };
        let Some(first) = devices.first() else {
            return Ok(None);
        };
        let snat_addr = match self.snat_address.or(node_snat) {
            Some(addr) => Some(addr),
            None => devices::first_ipv4(first)
                .with_context(|| format!("reading the addresses of {first}"))?,
        };
        Ok(Some(dataplane::NorthSouth {
            devices,
            node_config: NodeConfig {
                snat_addr: snat_addr.map_or(0, abi::addr_to_net),
                snat_port_min: self.snat_ports.0,
                snat_port_max: self.snat_ports.1,
            },
        }))
    }
}

/// Detects the north-south devices again (no `--devices`) from the Node's current
/// addresses and serves what changed; named devices keep what the start composed, and one
/// recreated under its name (the kernel detached its links) gets the programs again.
/// Failures are logged and retried at the next sync.
fn follow_devices(
    config: &Config,
    node_addresses: &[Ipv4Addr],
    programs: &mut dataplane::Programs,
) {
    let Some(ns) = config.north_south.as_ref() else {
        return;
    };
    let wanted = if ns.detected() {
        ns.compose(node_addresses)
    } else {
        Ok(programs.north_south().cloned())
    };
    let served =
        wanted.and_then(|wanted| Ok((programs.serve_north_south(wanted.as_ref())?, wanted)));
    match served {
        Ok((true, wanted)) => tracing::info!(
            devices = ?wanted.as_ref().map(|w| &w.devices),
            snat_address = ?wanted.as_ref().map(|w| abi::addr_from_net(w.node_config.snat_addr)),
            "north-south devices changed"
        ),
        Ok((false, _)) => {}
        Err(e) => tracing::error!("following the north-south devices failed, retrying: {e:#}"),
    }
}

enum Source {
    Manifests {
        dir: PathBuf,
        /// Parsed files, re-parsed only when they change.
        cache: std::sync::Mutex<manifests::Cache>,
    },
    Kube(KubeSource),
}

impl Source {
    fn snapshot(&self, node_name: &str) -> Snapshot {
        match self {
            Source::Manifests { dir, cache, .. } => {
                let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
                manifests::snapshot(&mut cache, dir, node_name)
            }
            Source::Kube(kube) => kube.snapshot(),
        }
    }

    /// What changed since the last snapshot or delta; `None` when only a snapshot can tell.
    fn delta(&self, node_name: &str) -> Option<Delta> {
        match self {
            Source::Manifests { dir, cache, .. } => {
                let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
                cache.delta(dir, node_name)
            }
            Source::Kube(kube) => kube.delta(),
        }
    }
}

/// What a sync reads from the source: everything, or what changed.
enum Input {
    Whole(Snapshot),
    Delta(Delta),
}

impl Input {
    fn node(&self) -> Option<&Node> {
        match self {
            Input::Whole(s) => s.node.as_deref(),
            Input::Delta(d) => d.node.as_deref(),
        }
    }

    fn skipped(self) -> Vec<Skipped> {
        match self {
            Input::Whole(s) => s.skipped,
            Input::Delta(d) => d.skipped,
        }
    }
}

/// The runtime `run` runs on. A sync runs on the thread that calls `block_on` and does not
/// yield until it is done (programming 30000 Services from empty took 0.89 s in the
/// benchmark); the tasks it spawns (the health and metrics servers, the healthCheckNodePort
/// servers, the watchers) run on a worker thread of their own, so that the kubelet's probes
/// and the load balancers' health checks are answered during a sync as kube-proxy's
/// goroutines answer them.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ekp-serve")
        .enable_all()
        .build()
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does for
/// kube-proxy: a soft limit of 1024 (a common default) is soon met by the health-check
/// servers' clients, and every watch, map and bind shares it.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: an out pointer to a live rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let Some(raised) = raised(limit) else {
        return;
    };
    // SAFETY: a pointer to a live rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(
            "raising the open files limit to {}: {}",
            raised.rlim_cur,
            std::io::Error::last_os_error()
        );
    }
}

/// `limit` with its soft limit raised to the hard one; `None` when it is there already.
fn raised(limit: libc::rlimit) -> Option<libc::rlimit> {
    (limit.rlim_cur < limit.rlim_max).then_some(libc::rlimit {
        rlim_cur: limit.rlim_max,
        ..limit
    })
}

pub async fn run(config: Config) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    for (map, capacity) in map_capacities(&config.map_sizes) {
        metrics
            .map_capacity
            .get_or_create(&MapLabel { map: map.into() })
            .set(capacity);
    }
    // kube-proxy's health timeout is twice its sync period. Healthy while starting, as
    // kube-proxy is until its informers have synced: an API server that cannot be reached
    // yet must not fail the liveness probe (a restart brings it no closer). The wait
    // starts once the source has delivered its objects.
    let health = Arc::new(Health::new(config.sync_period * 2));
    let on_bind_failure = if config.bind_address_hard_fail {
        OnBindFailure::Exit
    } else {
        OnBindFailure::Retry
    };
    // Set once the Kubernetes source has a client: a healthz port still taken then is
    // recorded as kube-proxy records it.
    let node_events: Arc<OnceLock<Events>> = Arc::default();
    if let Some(addr) = config.healthz_bind {
        http::serve_health(
            addr,
            health.clone(),
            metrics.clone(),
            on_bind_failure,
            healthz_bind_failed(addr, node_events.clone()),
        )
        .await?;
    }
    if let Some(addr) = config.metrics_bind {
        http::serve_metrics(addr, health.clone(), metrics.clone(), on_bind_failure).await?;
    }

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (changed_tx, mut changed_rx) =
        queue_changes(health.clone(), metrics.clone(), listening.clone());
    // A source that cannot be opened (no such directory, no usable kubeconfig) stops the
    // start before anything is pinned.
    let opened = open_source(&config, &metrics).await?;

    // One agent per pin directory. The wait is on a thread of its own (left behind if a
    // signal stops this agent first), so that a waiting agent still stops when told to.
    let _pin_lock = {
        let pin_dir = config.pin_dir.clone();
        let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("ekp-pin-lock".into())
            .spawn(move || {
                let locked = dataplane::lock_pin_dir(&pin_dir, || {
                    tracing::warn!(
                        pin_path = %pin_dir.display(),
                        "another ebpf-kube-proxy holds the pin directory: waiting for it to \
                         stop (two agents must not share one)"
                    );
                });
                let _ = locked_tx.send(locked);
            })
            .context("starting the thread that locks the pin directory")?;
        tokio::select! {
            locked = locked_rx => locked.context("the pin directory's lock thread ended")??,
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        }
    };

    // The kernel verifies the programs on a thread of its own while this one waits for the
    // Kubernetes source's initial lists, or reads the manifests, and translates the
    // Services (two cores: a start at 10000 Services takes the longer of the two, not
    // their sum). The programs of a previous run keep serving from the pinned maps until
    // the new ones are swapped in. A start stopped from here on leaves the maps pinned, as
    // every stop does.
    let loading = {
        let pin_dir = config.pin_dir.clone();
        let (sizes, level) = (config.map_sizes, config.bpf_log_level);
        let (north_south, pods) = (config.north_south.is_some(), !config.pod_devices.is_empty());
        std::thread::Builder::new()
            .name("ekp-load".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let loaded = dataplane::load(&pin_dir, sizes, level, north_south, pods);
                if loaded.is_ok() {
                    tracing::info!(took = ?started.elapsed(), "programs loaded and verified");
                }
                loaded
            })
            .context("starting the thread that loads the programs")?
    };
    let (source, events) = tokio::select! {
        source = start_source(opened, &config.node_name, changed_tx, &metrics) => source?,
        _ = sigterm.recv() => return Ok(()),
        _ = sigint.recv() => return Ok(()),
    };
    health.queued(std::time::Instant::now());
    listening.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(events) = &events {
        events.starting();
        let _ = node_events.set(events.clone());
    }
    // Detecting devices needs the Node's addresses, hence the source before attaching.
    let mut state = LoopState {
        started: Some(SystemTime::now()),
        ..LoopState::default()
    };
    let read_at = std::time::Instant::now();
    let (snapshot, read) = timed(|| source.snapshot(&config.node_name));
    let node_addresses = node_info(
        &config.node_name,
        snapshot.node.as_deref(),
        &NodePortAddresses::All,
        &[],
    )
    .own_addresses;
    // The first sync starts from this translation.
    state.full = true;
    let input = Input::Whole(snapshot);
    let (changes, translate) = timed(|| translate_input(&config, &mut state, &input));
    state.primed = Some(Primed {
        input,
        changes,
        read_at,
        read,
        translate,
    });
    let north_south = match &config.north_south {
        Some(ns) => ns.resolve(&node_addresses)?,
        None => None,
    };
    let sock = dataplane::SockSettings {
        host_netns_cookie: devices::own_netns_cookie()?,
        host_only: config.socket_lb_host_namespace_only,
        loopback_exact: !config.node_ports.match_all(),
    };
    if config.socket_lb_host_namespace_only && config.pod_devices.is_empty() {
        tracing::warn!(
            "--socket-lb-host-namespace-only without --pod-devices: pods' traffic to Services \
             is not translated"
        );
    }
    let loaded = loading
        .join()
        .map_err(|_| anyhow::anyhow!("the thread that loads the programs panicked"))??;
    let (maps, mut programs) = dataplane::start(
        loaded,
        &config.pin_dir,
        &config.cgroup,
        north_south.as_ref(),
        sock,
        &config.pod_devices,
    )?;
    let mut pod_devices = serve_pod_devices(&mut programs, &[]);
    if let Some(ns) = &north_south {
        tracing::info!(
            devices = ?ns.devices,
            snat_address = %abi::addr_from_net(ns.node_config.snat_addr),
            snat_ports = ?(ns.node_config.snat_port_min, ns.node_config.snat_port_max),
            "north-south programs attached"
        );
    }
    if !config.conntrack_gc_interval.is_zero() {
        conntrack_gc::spawn(
            maps.conntrack()?,
            config.conntrack_gc_interval,
            metrics.clone(),
        )
        .context("starting the conntrack collector")?;
    }
    let mut syncer = Syncer::adopt(maps)?;
    tracing::info!(
        frontends = syncer.programmed().frontends.len(),
        backends = syncer.programmed().backends.len(),
        pin_path = %config.pin_dir.display(),
        cgroup = %config.cgroup.display(),
        node = %config.node_name,
        "datapath ready; adopted what was pinned"
    );

    let mut health_check_servers = HealthCheckServers::new(health.clone(), events);
    // Devices are looked at in every sync, and between syncs whenever a link or an IPv4
    // address changes.
    let mut link_events = match LinkEvents::subscribe() {
        Ok(events) => Some(events),
        Err(e) => {
            tracing::warn!(
                "not subscribed to link events ({e}): new devices are served at the next sync"
            );
            None
        }
    };
    // The first sync, the periodic one and a retry translate and diff everything; a change
    // only what it touched, unless the last full sync is a sync period ago: changes that
    // come more often than that must not put off the periodic one for good.
    let mut last_full = Instant::now();
    // Whether the source stopped reporting changes (the manifests watcher ended): the
    // periodic syncs then read everything.
    let mut source_ended = false;
    let mut failed_in_a_row = 0u32;
    let mut foreign = ForeignSeen::default();
    loop {
        let started = Instant::now();
        if state.full {
            last_full = started;
            look_for_foreign(&programs, &config.cgroup, &metrics, &mut foreign);
        }
        pod_devices = serve_pod_devices(&mut programs, &pod_devices);
        let synced = sync_once(
            &config,
            &source,
            &mut syncer,
            &mut state,
            &metrics,
            &health,
            &mut health_check_servers,
        );
        follow_devices(&config, &state.node_addresses, &mut programs);
        failed_in_a_row = match synced {
            Synced::Failed => failed_in_a_row.saturating_add(1),
            Synced::Done | Synced::RoomMade => 0,
        };
        let wait = match synced {
            Synced::Done => config.sync_period,
            Synced::RoomMade => retry_after(config.min_sync_period, config.sync_period, 1),
            Synced::Failed => {
                retry_after(config.min_sync_period, config.sync_period, failed_in_a_row)
            }
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut link_events_failed = false;
        // A change the source reports is queued when it comes (`queue_changes`); a periodic
        // or retried sync is no queued update, as in kube-proxy; an address that moved is.
        let mut addresses_moved = false;
        let stop = loop {
            if link_events_failed {
                link_events = None;
            }
            tokio::select! {
                changed = changed_rx.recv(), if !source_ended => {
                    if changed.is_none() {
                        tracing::error!(
                            "the source stopped reporting changes: everything is read again \
                             at every --sync-period only"
                        );
                        source_ended = true;
                        continue;
                    }
                    state.full = last_full.elapsed() >= config.sync_period;
                    break false;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    state.full = true;
                    break false;
                }
                // A new pod's device is served before its containers start: they may call a
                // Service (DNS first) at once.
                changed = link_changed(link_events.as_ref()) => {
                    if let Err(e) = changed {
                        tracing::warn!(
                            "reading link events failed ({e}): new devices are served at \
                             the next sync"
                        );
                        link_events_failed = true;
                    }
                    pod_devices = serve_pod_devices(&mut programs, &pod_devices);
                    follow_devices(&config, &state.node_addresses, &mut programs);
                    // An address that moved here or away (a keepalived or kube-vip
                    // failover, a second NIC) changes where NodePorts are served, and
                    // which externalIPs the node's pods are.
                    if devices::local_ipv4().is_ok_and(|now| now != state.device_addresses) {
                        state.full = last_full.elapsed() >= config.sync_period;
                        addresses_moved = true;
                        break false;
                    }
                }
                _ = sigterm.recv() => break true,
                _ = sigint.recv() => break true,
            }
        };
        if stop {
            break;
        }
        if addresses_moved {
            health.queued(std::time::Instant::now());
            metrics
                .last_queued_timestamp
                .set(unix_seconds(SystemTime::now()));
        }
        // Bounded frequency: batch whatever else changes until the minimum period is over.
        sleep_until(started + config.min_sync_period).await;
        while changed_rx.try_recv().is_ok() {}
    }
    tracing::info!("stopping; programs and maps stay pinned and keep serving");
    Ok(())
}

/// kube-proxy records a healthz port it cannot bind as a `FailedToStartProxierHealthcheck`
/// event on the node at every attempt (its recorder folds repeats into a series); this
/// records each distinct error once, when there is an API to record it to.
fn healthz_bind_failed(addr: SocketAddr, events: Arc<OnceLock<Events>>) -> http::BindFailed {
    let recorded = std::sync::Mutex::new(None::<String>);
    Box::new(move |error: &str| {
        let Some(events) = events.get() else {
            return;
        };
        let mut recorded = recorded.lock().unwrap_or_else(|p| p.into_inner());
        if recorded.as_deref() != Some(error) {
            events.healthz_failed(addr, error);
            *recorded = Some(error.to_owned());
        }
    })
}

/// A source opened but not yet read from: the manifests directory being watched, or a
/// Kubernetes client.
enum Opened {
    Manifests { dir: PathBuf, events: FileEvents },
    Kube(kube::Client),
}

/// Checks that the source can be used at all: the manifests directory exists and is
/// watched (from here on no change to it is missed), or the Kubernetes client is
/// configured.
async fn open_source(config: &Config, metrics: &Metrics) -> Result<Opened> {
    match &config.source {
        SourceConfig::Manifests(dir) => {
            if !dir.is_dir() {
                anyhow::bail!("--manifests {} is not a directory", dir.display());
            }
            let events =
                FileEvents::watch(dir).with_context(|| format!("watching {}", dir.display()))?;
            Ok(Opened::Manifests {
                dir: dir.clone(),
                events,
            })
        }
        SourceConfig::Kube(conn) => Ok(Opened::Kube(
            kube_source::client(conn, metrics.rest_client.clone()).await?,
        )),
    }
}

/// How long after its `failures`-th failure in a row a sync is tried again (a full one):
/// the minimum period (at least a second), doubled at each failure up to the sync period.
/// A write the kernel keeps refusing (EPERM, ENOMEM) would otherwise have the agent read,
/// translate and fit every Service every second, a core's worth at 30000 Services;
/// kube-proxy waits a sync period after a failed restore. Changes still wake the loop.
fn retry_after(min_sync_period: Duration, sync_period: Duration, failures: u32) -> Duration {
    let first = min_sync_period.max(Duration::from_secs(1));
    first
        .saturating_mul(
            1u32.checked_shl(failures.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .min(sync_period.max(first))
}

/// The source's "something changed" signals, each marked as a queued update (`/livez`'s
/// wait, `last_queued_timestamp`) when it comes, once `listening` (the initial lists are
/// in: until then an API server that cannot be reached fails no probe), and passed on to
/// the loop. This runs on the runtime's worker thread, as the watchers do, and so marks
/// while a sync holds the loop's thread: a sync that never ends shows in `/livez`, as with
/// kube-proxy, whose event handlers queue the update.
fn queue_changes(
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    listening: Arc<std::sync::atomic::AtomicBool>,
) -> (mpsc::Sender<()>, mpsc::Receiver<()>) {
    let (source_tx, mut source_rx) = mpsc::channel::<()>(1);
    let (loop_tx, loop_rx) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        while source_rx.recv().await.is_some() {
            if listening.load(std::sync::atomic::Ordering::Relaxed) {
                health.queued(std::time::Instant::now());
                metrics
                    .last_queued_timestamp
                    .set(unix_seconds(SystemTime::now()));
            }
            // A full channel already holds a pending "changed".
            let _ = loop_tx.try_send(());
        }
    });
    (source_tx, loop_rx)
}

/// Starts following the opened source; returns once it has a first state to read (the
/// Kubernetes source: its initial lists), with where events are recorded (the Kubernetes
/// source only).
async fn start_source(
    opened: Opened,
    node_name: &str,
    changed: mpsc::Sender<()>,
    metrics: &Metrics,
) -> Result<(Source, Option<Events>)> {
    match opened {
        Opened::Manifests { dir, mut events } => {
            // File events only say "something changed": the directory is read again (the
            // cache parses only the files that changed).
            tokio::spawn(async move {
                loop {
                    if let Err(e) = events.changed().await {
                        tracing::warn!(
                            "reading file events failed ({e}): changes are read at the \
                             periodic sync"
                        );
                        return;
                    }
                    // A full channel already holds a pending "changed".
                    let _ = changed.try_send(());
                }
            });
            let source = Source::Manifests {
                cache: std::sync::Mutex::new(manifests::Cache::default()),
                dir,
            };
            Ok((source, None))
        }
        Opened::Kube(client) => {
            let events = Events::new(client.clone(), node_name);
            let kube = KubeSource::start(client, node_name, changed, metrics.changes.clone());
            tracing::info!("waiting for the initial lists of Services, EndpointSlices and Node");
            kube.wait_until_ready().await?;
            Ok((Source::Kube(kube), Some(events)))
        }
    }
}

/// The next batch of link events; never, without a subscription.
async fn link_changed(events: Option<&LinkEvents>) -> std::io::Result<()> {
    match events {
        Some(events) => events.changed().await,
        None => std::future::pending().await,
    }
}

/// What the looks for other agents' programs found (`look_for_foreign`).
#[derive(Default)]
struct ForeignSeen {
    /// The programs found at the last look that succeeded.
    ids: BTreeSet<u32>,
    /// Why the last look failed, if it did.
    failed: Option<String>,
}

/// Looks for programs of ours that another agent attached where this one's run (see
/// `dataplane::Foreign`), at the first sync and the full ones after it: counted in a
/// metric, each logged when first found, a failure logged when it is new.
fn look_for_foreign(
    programs: &dataplane::Programs,
    cgroup: &Path,
    metrics: &Metrics,
    seen: &mut ForeignSeen,
) {
    let found = match programs.foreign(cgroup) {
        Ok(found) => found,
        Err(e) => {
            let e = format!("{e:#}");
            if seen.failed.as_ref() != Some(&e) {
                tracing::warn!(
                    "looking for other agents' programs failed (ebpf_kube_proxy_foreign_programs \
                     keeps the last count): {e}"
                );
            }
            seen.failed = Some(e);
            return;
        }
    };
    seen.failed = None;
    metrics.foreign_programs.set(found.len() as i64);
    for f in found.iter().filter(|f| !seen.ids.contains(&f.id)) {
        tracing::warn!(
            program = %f.program,
            id = f.id,
            at = %places(&f.at),
            "another agent's program is attached here (another pin directory): it translates \
             from maps this agent does not update. Once that agent has stopped, remove it \
             with `ebpf-kube-proxy --pin-path <its directory> cleanup`, or detach its links \
             (`bpftool link`)"
        );
    }
    if found.is_empty() && !seen.ids.is_empty() {
        tracing::info!("no other agent's programs are attached here any more");
    }
    seen.ids = found.iter().map(|f| f.id).collect();
}

/// The first few of `at`, and how many more (a program on every pod's device).
fn places(at: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut s = at
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if at.len() > SHOWN {
        s.push_str(&format!(" and {} more", at.len() - SHOWN));
    }
    s
}

/// Attaches the pod programs to pods' devices that appeared since `before` (logged), and
/// returns the devices served now. A failure is logged and retried at the next sync.
fn serve_pod_devices(programs: &mut dataplane::Programs, before: &[String]) -> Vec<String> {
    match programs.attach_pod_devices() {
        Ok(now) => {
            if now.as_slice() != before {
                tracing::info!(devices = ?now, "pod devices served");
            }
            now
        }
        Err(e) => {
            tracing::error!("attaching to pod devices failed, retrying: {e:#}");
            before.to_vec()
        }
    }
}

/// What the loop remembers between syncs.
#[derive(Default)]
struct LoopState {
    /// What is skipped, with the metric series it counts in.
    reported: BTreeMap<Skipped, SkipLabel>,
    /// Objects left out on purpose (IPv6 only), already noted at debug level.
    ignored: BTreeSet<Skipped>,
    /// The translation, kept up to date change by change.
    translation: Incremental,
    /// The maps hold exactly `translation`'s state: the last sync succeeded and everything
    /// fitted, so the next one may look at what changed only.
    whole: bool,
    /// The frontends that drop for want of a local endpoint, and their service port.
    drops: BTreeMap<FrontendKey, ServicePortName>,
    /// The Node's IPv4 addresses at the last sync, for device detection.
    node_addresses: Vec<Ipv4Addr>,
    /// This node's devices' IPv4 addresses at the last sync (`socket_external_ips`): a
    /// change is synced at once.
    device_addresses: Vec<Ipv4Addr>,
    /// Whether the last sync had this node's Node object (`None` before the first).
    node_known: Option<bool>,
    /// Whether any sync had it: its disappearance is then its deletion.
    node_seen: bool,
    /// When the agent started: EndpointSlice changes triggered before then were applied by
    /// someone else (a previous agent, kube-proxy), not by this one's syncs.
    started: Option<SystemTime>,
    /// The next sync translates and diffs everything, not only what changed.
    full: bool,
    /// Health checks per (namespace, Service name) group that has any (or a problem),
    /// kept up to date with the groups that changed.
    health_checks: BTreeMap<(String, String), HealthChecks>,
    /// What the first sync reads and how it translated, done while the programs loaded.
    primed: Option<Primed>,
}

/// A sync's input, already translated into `LoopState::translation`.
struct Primed {
    input: Input,
    changes: Changes,
    /// When the source was read: a change queued later is not in `input`.
    read_at: std::time::Instant,
    read: Duration,
    translate: Duration,
}

/// Recomputes the health checks of the groups that changed (every group on a full sync).
fn update_health_checks(
    checks: &mut BTreeMap<(String, String), HealthChecks>,
    translation: &Incremental,
    changes: &Changes,
    node: &NodeInfo,
) {
    for key in &changes.groups {
        let computed = translation
            .group(key)
            .map(|(services, slices)| health_checks(services, slices, node))
            .filter(|h| *h != HealthChecks::default());
        match computed {
            Some(h) => checks.insert(key.clone(), h),
            None => checks.remove(key),
        };
    }
}

/// How a sync ended, and so when the next one comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Synced {
    /// Everything fits: the next sync at the next change or `--sync-period`.
    Done,
    /// Something did not fit and this sync's deletions may have made room: again after the
    /// minimum period (at least a second).
    RoomMade,
    /// Writing the maps failed: again after a wait that grows ([`retry_after`]).
    Failed,
}

/// One sync.
fn sync_once(
    config: &Config,
    source: &Source,
    syncer: &mut Syncer,
    state: &mut LoopState,
    metrics: &Metrics,
    health: &Health,
    health_check_servers: &mut HealthCheckServers,
) -> Synced {
    let started = std::time::Instant::now();
    // A primed sync's reading and translating came before it; they count in its duration.
    let mut ahead = Duration::ZERO;
    let Primed {
        input,
        changes,
        read_at,
        read,
        translate,
    } = match state.primed.take() {
        Some(primed) => {
            ahead = primed.read + primed.translate;
            primed
        }
        None => {
            // A change reads only what changed; the first, periodic and retried syncs read
            // all.
            let (input, read) = timed(|| {
                match (!state.full)
                    .then(|| source.delta(&config.node_name))
                    .flatten()
                {
                    Some(delta) => Input::Delta(delta),
                    None => Input::Whole(source.snapshot(&config.node_name)),
                }
            });
            let (changes, translate) = timed(|| translate_input(config, state, &input));
            Primed {
                input,
                changes,
                read_at: started,
                read,
                translate,
            }
        }
    };
    let prepare_started = std::time::Instant::now();
    state.node_seen |= input.node().is_some();
    health.set_node_eligible(node_eligible(input.node(), state.node_seen));
    let node = node_info(
        &config.node_name,
        input.node(),
        &config.node_ports,
        &state.device_addresses,
    );
    // The Kubernetes source counts its watch events itself (`SourceChanges`).
    if matches!(source, Source::Manifests { .. }) {
        let counted = &metrics.changes;
        counted.services_total.inc_by(changes.services.len() as u64);
        counted.endpoints_total.inc_by(changes.slices.len() as u64);
    }
    let desired = state.translation.state();
    if changes.all {
        state.drops.clear();
    }
    record_no_local_endpoints(&mut state.drops, desired, &changes, metrics);
    let ignored: BTreeSet<Skipped> = state.translation.ignored().cloned().collect();
    for s in ignored.difference(&state.ignored) {
        tracing::debug!("not served: {}: {}", s.object, s.reason);
    }
    state.ignored = ignored;

    let capacity = Capacity::from(&config.map_sizes);
    // The affinity groups' members beside the frontends that changed (rare: then a copy).
    let touched_frontends: Cow<'_, BTreeSet<FrontendKey>> = if changes.affinity_members.is_empty() {
        Cow::Borrowed(&changes.frontends)
    } else {
        Cow::Owned(
            changes
                .frontends
                .union(&changes.affinity_members)
                .copied()
                .collect(),
        )
    };
    let touched = (state.whole && !changes.all)
        .then_some(Touched {
            frontends: &touched_frontends,
            local_backends: &changes.local_backends,
        })
        .filter(|t| {
            capacity::fits_whole(
                syncer.programmed(),
                syncer.service_entries(),
                desired,
                t.frontends,
                |b| syncer.has_backend(b),
                &capacity,
            )
        });
    let (fitted, over_capacity) = match touched {
        Some(_) => (None, Vec::new()),
        None => {
            let (fitted, over) = capacity::fit(syncer.programmed(), desired, &capacity);
            (Some(fitted), over)
        }
    };
    let whole_input = matches!(input, Input::Whole(_));
    let mut skipped: BTreeSet<Skipped> = input.skipped().into_iter().collect();
    skipped.extend(state.translation.skipped().cloned());
    update_health_checks(
        &mut state.health_checks,
        &state.translation,
        &changes,
        &node,
    );
    skipped.extend(
        state
            .health_checks
            .values()
            .flat_map(|h| h.skipped.iter().cloned()),
    );
    let over_capacity: BTreeSet<Skipped> = over_capacity.into_iter().collect();
    skipped.extend(over_capacity.iter().cloned());
    report_skipped(&mut state.reported, skipped, &over_capacity, metrics);

    let prepared = prepare_started.elapsed();
    let write_started = std::time::Instant::now();
    let partial = fitted.is_none() && touched.is_some();
    let result = match (&fitted, touched) {
        (None, Some(touched)) => syncer.sync_touched(desired, touched),
        _ => syncer.sync(fitted.as_ref().unwrap_or(desired)),
    };
    state.whole = result.is_ok() && over_capacity.is_empty();
    tracing::debug!(
        read = ?read,
        whole_input,
        translate = ?translate,
        prepare = ?prepared,
        write = ?write_started.elapsed(),
        touched = touched.is_some(),
        "sync phases"
    );
    // Failed syncs count too, as kube-proxy observes every run of its sync.
    let took = (started.elapsed() + ahead).as_secs_f64();
    metrics.sync_duration.observe(took);
    if partial {
        metrics.sync_partial_duration.observe(took);
    } else {
        metrics.sync_full_duration.observe(took);
    }
    match result {
        Ok(stats) => {
            let now = SystemTime::now();
            health.updated(read_at, now);
            metrics.last_sync_timestamp.set(unix_seconds(now));
            observe_programming_latency(&changes.new_slices, state.started, now, metrics);
            // Like kube-proxy, after the rules are in place.
            let addresses = healthcheck::listen_addresses(&config.node_ports, &node);
            let checks: Vec<HealthCheck> = state
                .health_checks
                .values()
                .flat_map(|h| h.checks.iter().cloned())
                .collect();
            health_check_servers.sync(&checks, &addresses, metrics);
            let programmed = syncer.programmed();
            for (map, n) in [
                (proxy_common::MAP_SERVICES, syncer.service_entries()),
                (proxy_common::MAP_BACKENDS, programmed.backends.len()),
                (proxy_common::MAP_REV_NAT, programmed.rev_nat_ids.len()),
                (
                    proxy_common::MAP_SOURCE_RANGES,
                    programmed.source_ranges.len(),
                ),
                (proxy_common::MAP_CLUSTER_IPS, syncer.cluster_ip_entries()),
            ] {
                metrics
                    .map_entries
                    .get_or_create(&MapLabel { map: map.into() })
                    .set(n as i64);
            }
            // Deletions may have made room for what did not fit: look again soon.
            let room_made = !over_capacity.is_empty() && stats.writes > 0;
            if stats.writes > 0 {
                tracing::info!(
                    writes = stats.writes,
                    frontends = stats.frontends,
                    backends = stats.backends,
                    "synced"
                );
            } else {
                tracing::debug!("in sync");
            }
            if room_made {
                Synced::RoomMade
            } else {
                Synced::Done
            }
        }
        Err(e) => {
            metrics.sync_failures.inc();
            tracing::error!("sync failed, retrying: {e:#}");
            Synced::Failed
        }
    }
}

/// The addresses externalIPs are served on to this node's processes and pods: the Node's
/// own, and those its devices carry that the Node does not list (a keepalived or kube-vip
/// address, a second interface the kubelet does not report). Traffic to any of them ends on
/// this node, where nothing else would serve the Service (`safety`).
fn socket_external_ips(
    node_addresses: &[Ipv4Addr],
    device_addresses: &[Ipv4Addr],
) -> Vec<Ipv4Addr> {
    let mut addresses = node_addresses.to_vec();
    addresses.extend(
        device_addresses
            .iter()
            .filter(|a| !node_addresses.contains(a)),
    );
    addresses
}

/// Translates `input` into `state.translation`: everything afresh on a full sync, else
/// only what changed.
fn translate_input(config: &Config, state: &mut LoopState, input: &Input) -> Changes {
    note_node(&config.node_name, input.node(), &mut state.node_known);
    // A failed read (EMFILE, say) keeps the last one: an empty list would withdraw the
    // NodePorts and externalIPs on the devices' addresses until the next sync.
    match devices::local_ipv4() {
        Ok(addresses) => state.device_addresses = addresses,
        Err(e) => tracing::warn!(
            "reading this node's addresses: {e:#}; the last ones read are kept ({})",
            state.device_addresses.len()
        ),
    }
    let base = node_info(
        &config.node_name,
        input.node(),
        &config.node_ports,
        &state.device_addresses,
    );
    let addresses = base.own_addresses.clone();
    let node = NodeInfo {
        external_cluster_ips: config.external_cluster_ips,
        socket_external_ips: if config.socket_lb_external_ips {
            SocketExternalIps::All
        } else {
            SocketExternalIps::OwnAddresses(socket_external_ips(
                &addresses,
                &state.device_addresses,
            ))
        },
        localhost_node_ports: config
            .node_ports
            .serve_loopback(config.localhost_node_ports),
        ..base
    };
    state.node_addresses = addresses;
    if state.full {
        state.translation.forget();
    }
    match input {
        Input::Whole(snapshot) => {
            state
                .translation
                .update(&snapshot.services, &snapshot.slices, &node)
        }
        Input::Delta(delta) => state.translation.apply(delta, &node),
    }
}

/// `f`'s result and how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = std::time::Instant::now();
    let value = f();
    (value, started.elapsed())
}

/// kube-proxy's network programming latency: from the EndpointSlice controller's
/// `endpoints.kubernetes.io/last-change-trigger-time` to the sync that applied it. Only
/// changes triggered after the agent `started` count, as kube-proxy's endpoints tracker
/// keeps only those: at a start every slice is new to the agent, and its trigger time may
/// be days old.
fn observe_programming_latency(
    changed: &[Arc<k8s_openapi::api::discovery::v1::EndpointSlice>],
    started: Option<SystemTime>,
    now: SystemTime,
    metrics: &Metrics,
) {
    for seconds in programming_latencies(changed, started, now) {
        metrics.network_programming_duration.observe(seconds);
    }
}

/// The latencies [`observe_programming_latency`] observes, in seconds.
fn programming_latencies(
    changed: &[Arc<k8s_openapi::api::discovery::v1::EndpointSlice>],
    started: Option<SystemTime>,
    now: SystemTime,
) -> Vec<f64> {
    let (Ok(now), Some(Ok(started))) = (
        jiff::Timestamp::try_from(now),
        started.map(jiff::Timestamp::try_from),
    ) else {
        return Vec::new();
    };
    changed
        .iter()
        .filter_map(|slice| {
            let trigger = slice
                .metadata
                .annotations
                .as_ref()?
                .get("endpoints.kubernetes.io/last-change-trigger-time")?
                .parse::<jiff::Timestamp>()
                .ok()?;
            (trigger > started).then(|| now.duration_since(trigger).as_secs_f64())
        })
        .filter(|seconds| *seconds >= 0.0)
        .collect()
}

/// kube-proxy's `sync_proxy_rules_no_local_endpoints_total`: Services whose `Local` traffic
/// policy finds no endpoint on this node (their frontends drop), per policy. `drops` is
/// kept up to date with the changed frontends (all of them when `changes.all`).
fn record_no_local_endpoints(
    drops: &mut BTreeMap<FrontendKey, ServicePortName>,
    state: &crate::model::DesiredState,
    changes: &Changes,
    metrics: &Metrics,
) {
    use crate::model::{FrontendKind, Scope, WhenEmpty};
    // A ClusterIP's external twin (`--external-clusterip`) drops by the internal policy,
    // which its internal frontend counts already.
    let drops_now = |f: &&crate::model::Frontend| {
        f.backends.is_empty()
            && f.when_empty == WhenEmpty::Drop
            && !(f.key.scope == Scope::External && f.kind == FrontendKind::ClusterIp)
    };
    if changes.all {
        drops.extend(
            state
                .frontends
                .values()
                .filter(drops_now)
                .map(|f| (f.key, f.service.clone())),
        );
    } else {
        for key in &changes.frontends {
            drops.remove(key);
            if let Some(f) = state.frontends.get(key).filter(drops_now) {
                drops.insert(*key, f.service.clone());
            }
        }
    }
    let mut services: [BTreeSet<&ServicePortName>; 2] = Default::default();
    for (key, service) in drops.iter() {
        let i = usize::from(key.scope == Scope::External);
        services[i].insert(service);
    }
    for (policy, set) in ["internal", "external"].into_iter().zip(services) {
        let label = PolicyLabel {
            traffic_policy: policy.into(),
        };
        metrics
            .no_local_endpoints
            .get_or_create(&label)
            .set(set.len() as i64);
    }
}

/// Says when this node's Node object is missing, and when it appears after that: without
/// it no address serves NodePorts and topology hints are not followed, which a wrong
/// `--node-name` would otherwise cause silently. (kube-proxy waits for it at its start,
/// then carries on without node addresses.)
fn note_node(name: &str, node: Option<&Node>, known: &mut Option<bool>) {
    let now = node.is_some();
    if *known == Some(now) {
        return;
    }
    match (*known, now) {
        (_, false) => tracing::warn!(
            node = name,
            "no Node object named {name:?}: NodePorts are served on the devices' addresses \
             only (on none with --nodeport-addresses primary) and topology hints are not \
             followed until it appears (is --node-name right?)"
        ),
        (Some(false), true) => tracing::info!(node = name, "the Node object {name:?} appeared"),
        (_, true) => {}
    }
    *known = Some(now);
}

/// kube-proxy reports `nodeEligible: false` while the node is being deleted or the cluster
/// autoscaler is removing it, so that load balancers stop sending traffic first. A Node
/// object that was `seen` and is gone was deleted: ineligible too (kube-proxy marks it so,
/// or exits, depending on its release). Before it is first seen the node is eligible, as
/// kube-proxy's is while it starts.
fn node_eligible(node: Option<&Node>, seen: bool) -> bool {
    let Some(node) = node else {
        return !seen;
    };
    let deleting = node.metadata.deletion_timestamp.is_some();
    let autoscaler_taint = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| {
            taints
                .iter()
                .any(|t| t.key == "ToBeDeletedByClusterAutoscaler")
        });
    !deleting && !autoscaler_taint
}

/// Logs each problem once while it lasts, and says when it is gone.
fn report_skipped(
    reported: &mut BTreeMap<Skipped, SkipLabel>,
    current: BTreeSet<Skipped>,
    over_capacity: &BTreeSet<Skipped>,
    metrics: &Metrics,
) {
    for s in current.iter().filter(|s| !reported.contains_key(s)) {
        tracing::error!("skipped {}: {}", s.object, s.reason);
    }
    for s in reported.keys().filter(|s| !current.contains(s)) {
        tracing::info!("no longer skipped: {}", s.object);
    }
    let current: BTreeMap<Skipped, SkipLabel> = current
        .into_iter()
        .map(|s| {
            let label = SkipLabel {
                kind: object_kind(&s.object),
                reason: if over_capacity.contains(&s) {
                    "capacity"
                } else {
                    "invalid"
                }
                .into(),
            };
            (s, label)
        })
        .collect();
    // Series that drop to zero are set to zero, not left at their last value: the series
    // each object was counted in before (a capacity skip is no longer in `over_capacity`
    // once room is made).
    let mut counts: BTreeMap<&SkipLabel, i64> = reported.values().map(|l| (l, 0)).collect();
    for label in current.values() {
        *counts.entry(label).or_default() += 1;
    }
    for (label, n) in counts {
        metrics.skipped_objects.get_or_create(label).set(n);
    }
    *reported = current;
}

/// "Service default/web" -> "Service"; a file path -> "file".
fn object_kind(object: &str) -> String {
    match object.split_once(' ') {
        Some((kind, _)) if kind.chars().next().is_some_and(char::is_uppercase) => kind.to_owned(),
        _ => "file".to_owned(),
    }
}

fn map_capacities(sizes: &MapSizes) -> [(&'static str, i64); 11] {
    [
        (proxy_common::MAP_SERVICES, i64::from(sizes.services)),
        (proxy_common::MAP_BACKENDS, i64::from(sizes.backends)),
        (proxy_common::MAP_REV_NAT, i64::from(sizes.rev_nat)),
        (
            proxy_common::MAP_SOCK_REV_NAT,
            i64::from(sizes.sock_rev_nat),
        ),
        (
            proxy_common::MAP_SOCK_SLOTS,
            i64::from(proxy_common::SOCK_SLOTS),
        ),
        (proxy_common::MAP_AFFINITY, i64::from(sizes.affinity)),
        (proxy_common::MAP_NAT_CT, i64::from(sizes.nat_ct)),
        (
            proxy_common::MAP_SOURCE_RANGES,
            i64::from(sizes.source_ranges),
        ),
        (
            proxy_common::MAP_FRAGMENTS,
            i64::from(proxy_common::FRAGMENTS_MAX),
        ),
        (
            proxy_common::MAP_SNAT_CURSORS,
            i64::from(proxy_common::SNAT_CURSORS),
        ),
        (
            proxy_common::MAP_SNAT_TIME_WAIT,
            i64::from(proxy_common::SNAT_TIME_WAIT_MAX),
        ),
    ]
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod scale;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DesiredState, Frontend, FrontendKind, Protocol, Scope, WhenEmpty};

    /// The soft limit on open files is raised to the hard one, and left alone there.
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_one() {
        let limit = |soft, hard| libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        let soft_and_hard = |l: Option<libc::rlimit>| l.map(|l| (l.rlim_cur, l.rlim_max));
        assert_eq!(
            soft_and_hard(raised(limit(1024, 524_288))),
            Some((524_288, 524_288))
        );
        assert_eq!(soft_and_hard(raised(limit(4096, 4096))), None);
        assert_eq!(
            soft_and_hard(raised(limit(1024, libc::RLIM_INFINITY))),
            Some((libc::RLIM_INFINITY, libc::RLIM_INFINITY))
        );
    }

    /// Failed syncs are tried again after the minimum period (at least a second), doubled
    /// at each failure in a row up to the sync period.
    #[test]
    fn failed_syncs_back_off_up_to_the_sync_period() {
        let secs = Duration::from_secs;
        let waits: Vec<Duration> = (1..=7)
            .map(|n| retry_after(Duration::from_millis(100), secs(30), n))
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30].map(secs));
        assert_eq!(retry_after(secs(5), secs(30), 1), secs(5));
        assert_eq!(retry_after(secs(1), secs(30), 40), secs(30));
        assert_eq!(retry_after(secs(1), secs(30), u32::MAX), secs(30));
    }

    /// A change counts as queued when it comes, whatever the loop does (here: nothing),
    /// once the initial lists are in; the source's end reaches the loop.
    #[tokio::test]
    async fn a_change_is_queued_when_it_comes() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let listening = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = queue_changes(health.clone(), Arc::default(), listening.clone());
        let later = || std::time::Instant::now() + Duration::from_secs(61);
        tx.send(()).await.expect("sending");
        rx.recv().await.expect("passed on");
        assert!(
            health.status(later()).0,
            "before the initial lists: not counted"
        );
        listening.store(true, Ordering::Relaxed);
        tx.send(()).await.expect("sending");
        rx.recv().await.expect("passed on");
        assert!(!health.status(later()).0, "queued when it came");
        drop(tx);
        assert!(
            rx.recv().await.is_none(),
            "the source's end reaches the loop"
        );
    }

    /// A slice whose last change the EndpointSlice controller stamped at `trigger`.
    fn triggered_at(trigger: &str) -> Arc<k8s_openapi::api::discovery::v1::EndpointSlice> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": "web-1",
                    "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": trigger},
                },
                "addressType": "IPv4",
                "endpoints": [],
            }))
            .expect("a valid EndpointSlice"),
        )
    }

    /// As kube-proxy's endpoints tracker: a change triggered before the agent started is
    /// not this agent's programming latency (at a start every slice is new to it).
    #[test]
    fn programming_latency_counts_changes_triggered_since_the_start() {
        let at = |t: &str| {
            let ts: jiff::Timestamp = t.parse().expect("a timestamp");
            SystemTime::from(ts)
        };
        let started = Some(at("2026-11-29T10:00:00Z"));
        let now = at("2026-11-29T10:00:10Z");
        let slices = [
            triggered_at("2026-11-20T08:00:00Z"),
            triggered_at("2026-11-29T10:00:00Z"),
            triggered_at("2026-11-29T10:00:07.5Z"),
            triggered_at("not a time"),
        ];
        assert_eq!(programming_latencies(&slices, started, now), [2.5]);
    }

    #[test]
    fn a_node_that_was_seen_and_is_gone_is_not_eligible() {
        assert!(node_eligible(None, false), "not seen yet: starting up");
        assert!(!node_eligible(None, true), "seen, then gone: deleted");
        let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "n1"}}))
            .expect("a valid Node");
        assert!(node_eligible(Some(&node), true));
        let deleting: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "deletionTimestamp": "2026-11-29T10:00:00Z"},
        }))
        .expect("a valid Node");
        assert!(!node_eligible(Some(&deleting), true));
    }

    fn dropping(
        addr: [u8; 4],
        port: u16,
        scope: Scope,
        kind: FrontendKind,
        name: &str,
    ) -> Frontend {
        Frontend {
            key: FrontendKey {
                addr: Ipv4Addr::from(addr),
                port,
                proto: Protocol::Tcp,
                scope,
            },
            kind,
            service: ServicePortName {
                namespace: "default".into(),
                name: name.into(),
                port: String::new(),
            },
            backends: Vec::new(),
            lingering: Vec::new(),
            when_empty: WhenEmpty::Drop,
            affinity_timeout: None,
            affinity_group: None,
            source_ranges: Vec::new(),
            at_node_address: false,
        }
    }

    fn gauge(metrics: &Metrics, policy: &str) -> i64 {
        let label = PolicyLabel {
            traffic_policy: policy.into(),
        };
        metrics.no_local_endpoints.get_or_create(&label).get()
    }

    /// A ClusterIP's external twin (`--external-clusterip`) drops by the internal traffic
    /// policy: its Service counts under `internal` (once), not under `external`, which
    /// only `externalTrafficPolicy: Local` frontends count.
    #[test]
    fn a_cluster_ips_external_twin_counts_under_the_internal_policy() {
        let internal_local = [
            dropping(
                [10, 96, 0, 10],
                80,
                Scope::Internal,
                FrontendKind::ClusterIp,
                "a",
            ),
            dropping(
                [10, 96, 0, 10],
                80,
                Scope::External,
                FrontendKind::ClusterIp,
                "a",
            ),
        ];
        let external_local = dropping(
            [192, 0, 2, 1],
            30080,
            Scope::External,
            FrontendKind::NodePort,
            "b",
        );
        let mut state = DesiredState::default();
        for f in internal_local.into_iter().chain([external_local]) {
            state.frontends.insert(f.key, f);
        }
        let metrics = Metrics::new();
        let mut drops = BTreeMap::new();
        let all = Changes {
            all: true,
            ..Changes::default()
        };
        record_no_local_endpoints(&mut drops, &state, &all, &metrics);
        assert_eq!(
            (gauge(&metrics, "internal"), gauge(&metrics, "external")),
            (1, 1)
        );

        // The same through a partial sync that names only the changed frontends.
        let mut drops = BTreeMap::new();
        let changed = Changes {
            frontends: state.frontends.keys().copied().collect(),
            ..Changes::default()
        };
        let metrics = Metrics::new();
        record_no_local_endpoints(&mut drops, &state, &changed, &metrics);
        assert_eq!(
            (gauge(&metrics, "internal"), gauge(&metrics, "external")),
            (1, 1)
        );
    }

    /// An object skipped for want of room counts under `capacity`; once room is made, that
    /// series drops to 0 (the object is no longer among the over-capacity ones, which once
    /// made it zero the `invalid` series instead).
    #[test]
    fn a_capacity_skip_that_ends_zeroes_its_own_series() {
        let metrics = Metrics::new();
        let series = |reason: &str| {
            metrics
                .skipped_objects
                .get_or_create(&SkipLabel {
                    kind: "Service".into(),
                    reason: reason.into(),
                })
                .get()
        };
        let web = Skipped {
            object: "Service default/web".into(),
            reason: "the services map is full".into(),
        };
        let mut reported = BTreeMap::new();
        let full = BTreeSet::from([web]);
        report_skipped(&mut reported, full.clone(), &full, &metrics);
        assert_eq!((series("capacity"), series("invalid")), (1, 0));
        report_skipped(&mut reported, BTreeSet::new(), &BTreeSet::new(), &metrics);
        assert_eq!((series("capacity"), series("invalid")), (0, 0));
        assert!(reported.is_empty());
    }
}
