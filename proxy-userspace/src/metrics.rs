//! Prometheus metrics: kube-proxy's names where the meaning is the same (so existing
//! dashboards keep working), the `process_*` ones of every Prometheus client (`process`),
//! `ebpf_kube_proxy_*` for what is ours. Counters get the `_total` suffix from the
//! OpenMetrics encoder.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

mod process;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub traffic_policy: String,
}

/// client-go's `rest_client_requests_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestRequestLabels {
    /// The HTTP status, or `<error>` when no response came.
    pub code: String,
    pub host: String,
    pub method: String,
}

/// client-go's `rest_client_request_duration_seconds` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestVerbLabels {
    pub host: String,
    pub verb: String,
}

/// The API client's requests, as client-go's REST client counts them (kube-proxy exports
/// these, and dashboards show the proxy's API traffic from them). Cheap to clone: the
/// source's client records into the agent's registry.
#[derive(Clone, Debug)]
pub struct RestClientMetrics {
    requests: Family<RestRequestLabels, Counter>,
    duration: Family<RestVerbLabels, Histogram, fn() -> Histogram>,
}

impl RestClientMetrics {
    fn new() -> Self {
        // client-go's buckets.
        let histogram: fn() -> Histogram = || {
            Histogram::new([
                0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
            ])
        };
        RestClientMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
        }
    }

    /// One request to `host` answered with `code` (`None`: no response) after `elapsed`
    /// (to its headers: a watch counts until its stream starts, as in client-go).
    pub fn observe(&self, method: &str, host: &str, code: Option<u16>, elapsed: Duration) {
        let code = code.map_or_else(|| "<error>".to_owned(), |c| c.to_string());
        self.requests
            .get_or_create(&RestRequestLabels {
                code,
                host: host.to_owned(),
                method: method.to_owned(),
            })
            .inc();
        self.duration
            .get_or_create(&RestVerbLabels {
                host: host.to_owned(),
                verb: method.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// kube-proxy's change metrics, counted as its IPv4 change trackers count them.
///
/// The Kubernetes source counts at each watch event: every Service event and every event
/// of an IPv4 or IPv6 EndpointSlice (FQDN slices are ignored, as kube-proxy ignores them)
/// in the `_total` counters; the Services it would proxy that changed since the last sync
/// read them (each once, however often it changed; not headless or ExternalName ones), and
/// the slice updates since then, in the `_pending` gauges, which a sync zeroes. The
/// manifests source learns what changed only when a sync reads the directory: the sync
/// then adds the changed objects to the counters, and the gauges stay 0. Cheap to clone:
/// the source records into the agent's metrics.
#[derive(Clone, Debug, Default)]
pub struct SourceChanges {
    pub services_total: Counter,
    pub endpoints_total: Counter,
    pub services_pending: Gauge,
    pub endpoints_pending: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthCheckLabel {
    /// "open" (listening) or "failed" (the port could not be bound; retried at every sync).
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct SkipLabel {
    /// "Service", "EndpointSlice", "Node", or "file" for a document that did not parse.
    pub kind: String,
    /// "invalid" (bad input) or "capacity" (a map is full).
    pub reason: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    pub registry: Registry,
    pub sync_duration: Histogram,
    /// Syncs that diffed everything (the first, periodic, retried, degraded ones).
    pub sync_full_duration: Histogram,
    /// Syncs that looked at what changed only.
    pub sync_partial_duration: Histogram,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub last_queued_timestamp: Gauge<f64, AtomicU64>,
    pub network_programming_duration: Histogram,
    /// What the source has seen change, and what no sync has applied yet.
    pub changes: SourceChanges,
    pub no_local_endpoints: Family<PolicyLabel, Gauge>,
    pub healthz: Family<CodeLabel, Counter>,
    pub livez: Family<CodeLabel, Counter>,
    pub sync_failures: Counter,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    pub skipped_objects: Family<SkipLabel, Gauge>,
    pub health_check_node_ports: Family<HealthCheckLabel, Gauge>,
    pub conntrack_gc_runs: Counter,
    pub conntrack_gc_deleted: Counter,
    pub conntrack_entries: Gauge,
    /// Programs of ours that another agent attached where this one's run
    /// (`dataplane::Foreign`).
    pub foreign_programs: Gauge,
    pub rest_client: RestClientMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // kube-proxy's buckets: 1 ms .. ~16 s.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        // kube-proxy's buckets (`NetworkProgrammingLatency`): 0.25 and 0.5 s, every second
        // to 59 s, every 5 s to 115 s, every 30 s to 5 minutes.
        let network_programming_duration = Histogram::new(
            [0.25, 0.5]
                .into_iter()
                .chain((1..=59).map(f64::from))
                .chain((0..12).map(|i| f64::from(60 + 5 * i)))
                .chain((0..7).map(|i| f64::from(120 + 30 * i))),
        );
        let mut m = Metrics {
            sync_duration,
            sync_full_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            sync_partial_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            last_sync_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            network_programming_duration,
            changes: SourceChanges::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            sync_failures: Counter::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            skipped_objects: Family::default(),
            health_check_node_ports: Family::default(),
            conntrack_gc_runs: Counter::default(),
            conntrack_gc_deleted: Counter::default(),
            conntrack_entries: Gauge::default(),
            foreign_programs: Gauge::default(),
            rest_client: RestClientMetrics::new(),
            registry: Registry::default(),
        };
        // kube-proxy's newer releases label their per-proxier metrics with the IP family
        // (its metrics reference lists these); this agent proxies IPv4.
        let ipv4 = m
            .registry
            .sub_registry_with_label(("ip_family".into(), "IPv4".into()));
        ipv4.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        ipv4.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full_duration.clone(),
        );
        ipv4.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial_duration.clone(),
        );
        ipv4.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync_timestamp.clone(),
        );
        ipv4.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued_timestamp.clone(),
        );
        ipv4.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming_duration.clone(),
        );
        ipv4.register(
            // A gauge whose name ends in `_total`, as kube-proxy's does.
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        m.registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules EndpointSlice changes",
            m.changes.endpoints_total.clone(),
        );
        m.registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.changes.services_total.clone(),
        );
        m.registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.changes.endpoints_pending.clone(),
        );
        m.registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.changes.services_pending.clone(),
        );
        m.registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz.clone(),
        );
        m.registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez.clone(),
        );
        m.registry.register(
            "ebpf_kube_proxy_sync_failures",
            "Syncs that failed to write the maps (retried)",
            m.sync_failures.clone(),
        );
        m.registry.register(
            "ebpf_kube_proxy_map_entries",
            "Entries in use per BPF map, as the agent programmed them",
            m.map_entries.clone(),
        );
        m.registry.register(
            "ebpf_kube_proxy_map_capacity",
            "max_entries per BPF map",
            m.map_capacity.clone(),
        );
        m.registry.register(
            "ebpf_kube_proxy_skipped_objects",
            "Input objects currently skipped, by kind of object and reason",
            m.skipped_objects.clone(),
        );
        m.registry.register(
            "ebpf_kube_proxy_health_check_node_ports",
            "healthCheckNodePort servers of Services with externalTrafficPolicy Local, by state",
            m.health_check_node_ports.clone(),
        );
        m.registry.register(
            "ebpf_kube_proxy_conntrack_gc_runs",
            "Passes of the north-south conntrack collector",
            m.conntrack_gc_runs.clone(),
        );
        m.registry.register(
            "ebpf_kube_proxy_conntrack_gc_deleted",
            "North-south conntrack entries deleted because their flow ended or expired",
            m.conntrack_gc_deleted.clone(),
        );
        m.registry.register(
            "ebpf_kube_proxy_conntrack_entries",
            "North-south conntrack entries left after the collector's last pass",
            m.conntrack_entries.clone(),
        );
        m.registry.register(
            "ebpf_kube_proxy_foreign_programs",
            "Programs of ebpf-kube-proxy that another agent or pin directory attached to this \
             agent's cgroup, its ancestors or its devices, at the last look that succeeded",
            m.foreign_programs.clone(),
        );
        m.registry.register(
            "rest_client_requests",
            "Number of HTTP requests, partitioned by status code, method, and host.",
            m.rest_client.requests.clone(),
        );
        m.registry.register(
            "rest_client_request_duration_seconds",
            "Request latency in seconds. Broken down by verb, and host.",
            m.rest_client.duration.clone(),
        );
        m.registry
            .register_collector(Box::new(process::ProcessCollector));
        m
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_kube_proxys_metric_names() {
        let m = Metrics::new();
        m.changes.endpoints_total.inc();
        m.healthz
            .get_or_create(&CodeLabel { code: "200".into() })
            .inc();
        m.sync_duration.observe(0.002);
        m.rest_client
            .observe("GET", "10.0.0.1:6443", Some(200), Duration::from_millis(3));
        m.rest_client
            .observe("GET", "10.0.0.1:6443", None, Duration::from_secs(30));
        m.no_local_endpoints
            .get_or_create(&PolicyLabel {
                traffic_policy: "external".into(),
            })
            .set(2);
        let text = m.encode();
        for name in [
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 2",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"45.0\"}",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"115.0\"}",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"300.0\"}",
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.001\"}",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.001\"}",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "kubeproxy_network_programming_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
            "kubeproxy_sync_proxy_rules_service_changes_total 0",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
            "kubeproxy_sync_proxy_rules_service_changes_pending 0",
            "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
            "rest_client_requests_total{code=\"200\",host=\"10.0.0.1:6443\",method=\"GET\"} 1",
            "rest_client_requests_total{code=\"<error>\",host=\"10.0.0.1:6443\",method=\"GET\"} 1",
            "rest_client_request_duration_seconds_bucket{le=\"0.005\",host=\"10.0.0.1:6443\",verb=\"GET\"} 1",
            "rest_client_request_duration_seconds_count{host=\"10.0.0.1:6443\",verb=\"GET\"} 2",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_start_time_seconds ",
            "process_open_fds ",
            "process_max_fds ",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        // kube-proxy's first programming bucket is 0.25 s.
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.25\"}")
                && !text.contains("kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.0\"}"),
            "{text}"
        );
    }

    #[test]
    fn exposes_the_conntrack_collectors_metrics() {
        let m = Metrics::new();
        m.conntrack_gc_runs.inc();
        m.conntrack_gc_deleted.inc_by(4);
        m.conntrack_entries.set(2);
        let text = m.encode();
        for line in [
            "ebpf_kube_proxy_conntrack_gc_runs_total 1",
            "ebpf_kube_proxy_conntrack_gc_deleted_total 4",
            "ebpf_kube_proxy_conntrack_entries 2",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
