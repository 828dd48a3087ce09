//! The chart's agent command line, rendered by helm, put through the agent's own parser
//! and checks (`cli::run_config_from`): a flag the chart writes that the agent refuses, or
//! reads otherwise than the values mean, fails here rather than in a rollout. Needs the
//! helm that `cargo xtask chart-test` installs (`cargo xtask test` runs it first).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proxy_userspace::cli::run_config_from;
use proxy_userspace::run::{Config, SourceConfig};
use proxy_userspace::translate::NodePortAddresses;

/// The node name the chart hands the agent through `NODE_NAME` (the downward API).
const NODE: &str = "node-a";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds the crate")
        .to_path_buf()
}

/// The agent's configuration from the chart rendered with the required values and `set`.
fn agent_config(set: &[&str]) -> Config {
    let helm = xtask::chart::helm();
    assert!(
        helm.exists(),
        "{} is missing: `cargo xtask chart-test` installs helm",
        helm.display()
    );
    let args: Vec<&str> = xtask::chart::REQUIRED.iter().chain(set).copied().collect();
    let argv = xtask::chart::agent_command_line(&workspace(), &args)
        .unwrap_or_else(|e| panic!("rendering the chart with {args:?}: {e:#}"));
    run_config_from(&argv, Some(NODE))
        .unwrap_or_else(|e| panic!("the agent refuses the chart's command line {argv:?}: {e:#}"))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn bind(addr: &str) -> Option<SocketAddr> {
    Some(addr.parse().expect("a socket address"))
}

#[test]
fn the_default_values_give_the_agent_kube_proxys_defaults() {
    let config = agent_config(&[]);
    let SourceConfig::Kube(connection) = &config.source else {
        panic!("the chart's agent reads manifests");
    };
    // The master is the API server the values name, not the `kubernetes` Service this
    // agent serves.
    assert_eq!(
        connection.master.as_deref(),
        Some("https://0123456789ABCDEF0123456789ABCDEF.gr7.us-west-2.eks.amazonaws.com:443")
    );
    assert_eq!(connection.kubeconfig, None);
    assert_eq!(config.node_name, NODE);
    assert_eq!(config.pin_dir, Path::new("/sys/fs/bpf/ebpf-kube-proxy"));
    assert_eq!(config.cgroup, Path::new("/run/ebpf-kube-proxy/cgroupv2"));
    assert_eq!(
        (config.min_sync_period, config.sync_period),
        (secs(1), secs(30))
    );
    assert_eq!(config.conntrack_gc_interval, secs(30));
    assert_eq!(config.healthz_bind, bind("0.0.0.0:10256"));
    assert_eq!(config.metrics_bind, bind("127.0.0.1:10249"));
    assert_eq!(config.node_ports, NodePortAddresses::All);
    assert!(config.localhost_node_ports);
    assert!(!config.external_cluster_ips && !config.socket_lb_host_namespace_only);
    assert!(!config.bind_address_hard_fail);
    let north_south = config.north_south.expect("north-south programs on");
    assert_eq!(north_south.devices, None, "devices detected");
    assert_eq!(north_south.snat_ports, (61000, 65535));
    assert_eq!(north_south.node_port_range, None);
    assert_eq!(config.bpf_log_level, proxy_common::LOG_LEVEL_OFF);
}

/// kubeadm's kube-proxy ConfigMap writes zero periods (`0s`), meaning the defaults.
#[test]
fn zero_sync_periods_leave_the_agents_defaults() {
    let config = agent_config(&[
        "--set",
        "config.minSyncPeriod=0s",
        "--set",
        "config.syncPeriod=0m0s",
    ]);
    assert_eq!(
        (config.min_sync_period, config.sync_period),
        (secs(1), secs(30))
    );
}

#[test]
fn every_value_that_writes_a_flag_reaches_the_agent() {
    let config = agent_config(&[
        "--set",
        "config.minSyncPeriod=500ms",
        "--set",
        "config.syncPeriod=1m30s",
        "--set",
        "config.conntrackGCInterval=1m0s",
        "--set-json",
        r#"config.mapSizes={"services":70001,"backends":30002,"revNat":20003,"sockRevNat":90004,"affinity":40005,"natCt":300006,"sourceRanges":5007}"#,
        "--set-json",
        r#"config.nodePortAddresses=["10.0.0.0/8","192.168.0.0/16"]"#,
        "--set",
        "config.nodePortRange=30000-32767",
        "--set",
        "config.snatPortRange=40000-45000",
        "--set-json",
        r#"config.devices=["eth0","ens5"]"#,
        "--set",
        "config.externalClusterIP=true",
        "--set",
        "config.localhostNodePorts=false",
        "--set",
        "config.bpfLogLevel=debug",
        "--set",
        "config.socketLB.hostNamespaceOnly=true",
        "--set-json",
        r#"config.socketLB.podDevices=["lxc*","cali*"]"#,
        "--set",
        "healthz.bindAddress=127.0.0.1",
        "--set",
        "healthz.port=10266",
        "--set",
        "metrics.enabled=false",
        "--set",
        "bpf.pinPath=/sys/fs/bpf/ekp-chart-flags",
        "--set-json",
        r#"extraArgs=["--bind-address-hard-fail"]"#,
    ]);
    assert_eq!(
        (config.min_sync_period, config.sync_period),
        (Duration::from_millis(500), secs(90))
    );
    assert_eq!(config.conntrack_gc_interval, secs(60));
    let sizes = config.map_sizes;
    assert_eq!(
        [
            sizes.services,
            sizes.backends,
            sizes.rev_nat,
            sizes.sock_rev_nat,
            sizes.affinity,
            sizes.nat_ct,
            sizes.source_ranges,
        ],
        [70001, 30002, 20003, 90004, 40005, 300006, 5007]
    );
    assert_eq!(
        config.node_ports,
        NodePortAddresses::Within(vec![
            (Ipv4Addr::new(10, 0, 0, 0), 8),
            (Ipv4Addr::new(192, 168, 0, 0), 16)
        ])
    );
    let north_south = config.north_south.expect("north-south programs on");
    assert_eq!(
        north_south.devices,
        Some(vec!["eth0".to_owned(), "ens5".to_owned()])
    );
    assert_eq!(north_south.snat_ports, (40000, 45000));
    assert_eq!(north_south.node_port_range, Some((30000, 32767)));
    assert!(config.external_cluster_ips);
    assert!(!config.localhost_node_ports);
    assert_eq!(config.bpf_log_level, proxy_common::LOG_LEVEL_DEBUG);
    assert!(config.socket_lb_host_namespace_only);
    assert_eq!(config.pod_devices, ["lxc*", "cali*"]);
    assert_eq!(config.healthz_bind, bind("127.0.0.1:10266"));
    assert_eq!(config.metrics_bind, None, "metrics disabled");
    assert_eq!(config.pin_dir, Path::new("/sys/fs/bpf/ekp-chart-flags"));
    assert!(config.bind_address_hard_fail);
}
