//! Which Services get a health-check node port on this node and what it reports (C12, C13):
//! kube-proxy's `ServicePortMap.HealthCheckNodePorts` and `EndpointsMap.LocalReadyEndpoints`,
//! as pure functions beside [`translate`](super::translate).
//!
//! kube-proxy (`serviceport.go`, `apiservice.NeedsHealthCheck`) keeps `healthCheckNodePort`
//! only for a Service of type LoadBalancer with `externalTrafficPolicy: Local`; the API server
//! allocates it for exactly those and refuses it anywhere else, so a NodePort Service never
//! has one. The Service must also be one this proxy serves at all (not headless, ExternalName
//! or another proxy's; an IPv4 cluster IP; at least one port), since kube-proxy reads it from
//! the Service's ports.
//!
//! The count is the number of distinct *addresses* of this node's *ready* endpoints over all
//! the ports of the Service's slices: kube-proxy squashes `10.0.0.1:80` and `10.0.0.1:443`
//! into one endpoint, and leaves serving-terminating endpoints out on purpose so that a node
//! whose pods are all shutting down fails the load balancer's check while it still serves
//! the connections it has (the terminating fallback of the datapath is not the health check's
//! business).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    Policy, ServiceType, cluster_ipv4, compare_content, compare_names, index_endpoints,
    is_for_this_proxy, is_headless, name, namespace, port_number, skip,
};
use crate::model::{NodeInfo, Skipped};

/// One health-check node port to serve.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// kube-proxy's `localEndpoints`: this node's ready endpoint addresses.
    pub local_endpoints: usize,
}

/// The health checks and the problems found computing them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthChecks {
    /// One per Service, in (namespace, name) order.
    pub checks: Vec<HealthCheck>,
    /// A `healthCheckNodePort` out of range (the API server refuses one): reported like
    /// translate's problems, and that Service gets no health check.
    pub skipped: Vec<Skipped>,
}

/// The health checks of this node's Services, with the local ready endpoint counts. Runs at
/// every sync: only the Services that need a check and their slices are looked at closely
/// (usually none, so that one endpoint change stays cheap at 10000 Services).
pub fn health_checks(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    node: &NodeInfo,
) -> HealthChecks {
    let mut skipped = Vec::new();
    let mut wanted: Vec<(&Service, (String, String, u16))> = services
        .iter()
        .filter(|s| may_need_health_check(s))
        .filter_map(|s| health_check_node_port(s, &mut skipped).map(|check| (s.as_ref(), check)))
        .collect();
    // The order translate uses, so that two Services with the same name (manifests only)
    // resolve the same way here.
    wanted.sort_by(|(a, _), (b, _)| {
        compare_names(&a.metadata, &b.metadata).then_with(|| compare_content(a, b))
    });
    let names: BTreeSet<(&str, &str)> = wanted
        .iter()
        .map(|(_, (namespace, name, _))| (namespace.as_str(), name.as_str()))
        .collect();
    let relevant: Vec<&EndpointSlice> = slices
        .iter()
        .filter(|slice| {
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(super::LABEL_SERVICE_NAME));
            service.is_some_and(|service| {
                names.contains(&(namespace(&slice.metadata), service.as_str()))
            })
        })
        .map(|slice| slice.as_ref())
        .collect();
    // translate reports the slices' problems already.
    let endpoints = index_endpoints(&relevant, node, &mut Vec::new(), &mut Vec::new());

    let mut checks = BTreeMap::new();
    for (_, (namespace, name, port)) in wanted {
        let local_ready: BTreeSet<Ipv4Addr> = endpoints
            .get(&(namespace.clone(), name.clone()))
            .into_iter()
            .flatten()
            .filter(|e| e.endpoint.local && e.endpoint.ready)
            .map(|e| e.endpoint.addr)
            .collect();
        checks
            .entry((namespace.clone(), name.clone()))
            .or_insert(HealthCheck {
                namespace,
                name,
                port,
                local_endpoints: local_ready.len(),
            });
    }
    skipped.sort();
    skipped.dedup();
    HealthChecks {
        checks: checks.into_values().collect(),
        skipped,
    }
}

/// A cheap first look: only a LoadBalancer with a `healthCheckNodePort` can need a check.
fn may_need_health_check(service: &Service) -> bool {
    service.spec.as_ref().is_some_and(|spec| {
        spec.type_.as_deref() == Some("LoadBalancer")
            && spec.health_check_node_port.is_some_and(|p| p != 0)
    })
}

/// (namespace, name, port) when the Service needs a health-check node port.
fn health_check_node_port(
    service: &Service,
    skipped: &mut Vec<Skipped>,
) -> Option<(String, String, u16)> {
    let meta = &service.metadata;
    let spec = service.spec.as_ref()?;
    if !is_for_this_proxy(meta)
        || spec.type_.as_deref() == Some("ExternalName")
        || is_headless(spec)
    {
        return None;
    }
    let namespace = namespace(meta);
    let name = name(meta)?;
    let object = format!("Service {namespace}/{name}");
    // A Service translate skips whole gets no health check either; translate reports why.
    let policy = Policy::read(spec).ok()?;
    if policy.type_ != ServiceType::LoadBalancer || !policy.external_local {
        return None;
    }
    cluster_ipv4(spec, &object, &mut Vec::new())?;
    if spec.ports.as_ref().is_none_or(Vec::is_empty) {
        return None;
    }
    // 0 is Go's "not allocated": kube-proxy logs it and serves no health check.
    let port = match spec.health_check_node_port {
        None | Some(0) => return None,
        Some(number) => port_number(number),
    };
    match port {
        Ok(port) => Some((namespace.to_owned(), name.to_owned(), port)),
        Err(reason) => {
            skipped.push(skip(&object, format!("healthCheckNodePort {reason}")));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ServiceBuilder, SliceBuilder, n1, slice, svc};
    use super::*;

    /// `default/web`: LoadBalancer on 10.96.0.10:80, NodePort 30080, `externalTrafficPolicy`
    /// `policy`, healthCheckNodePort 32000.
    fn lb(policy: &str) -> Service {
        with_hc_port(
            svc("default", "web")
                .type_("LoadBalancer")
                .cluster_ip("10.96.0.10")
                .port("http", 80, "TCP")
                .node_port(30080)
                .external_traffic_policy(policy),
            32000,
        )
    }

    fn with_hc_port(mut service: Service, port: i32) -> Service {
        service
            .spec
            .get_or_insert_with(Default::default)
            .health_check_node_port = Some(port);
        service
    }

    /// Each check as `namespace/name :port n`.
    fn shared<T: Clone>(objects: &[T]) -> Vec<Arc<T>> {
        objects.iter().cloned().map(Arc::new).collect()
    }

    fn rows(services: &[Service], slices: &[EndpointSlice]) -> Vec<String> {
        let checks = health_checks(&shared(services), &shared(slices), &n1());
        assert_eq!(checks.skipped, [], "nothing is reported for valid input");
        checks
            .checks
            .iter()
            .map(|c| {
                format!(
                    "{}/{} :{} {}",
                    c.namespace, c.name, c.port, c.local_endpoints
                )
            })
            .collect()
    }

    fn web_slice() -> EndpointSlice {
        slice("default", "web-1", "web").port("http", 8080, "TCP")
    }

    #[test]
    fn c13_local_load_balancer_counts_its_ready_endpoints_on_this_node() {
        let slices = [web_slice()
            .ready("10.0.0.1")
            .on("n1")
            .ready("10.0.0.2")
            .on("n1")
            .ready("10.0.0.3")
            .on("n2")];
        assert_eq!(rows(&[lb("Local")], &slices), ["default/web :32000 2"]);
    }

    #[test]
    fn c12_no_local_endpoint_reports_zero() {
        let slices = [web_slice().ready("10.0.0.3").on("n2")];
        assert_eq!(rows(&[lb("Local")], &slices), ["default/web :32000 0"]);
        assert_eq!(rows(&[lb("Local")], &[]), ["default/web :32000 0"]);
    }

    #[test]
    fn only_ready_local_endpoints_count_never_terminating_or_not_ready_ones() {
        let slices = [web_slice()
            .ready("10.0.0.1")
            .on("n1")
            .serving_terminating("10.0.0.2")
            .on("n1")
            .terminating_not_serving("10.0.0.3")
            .on("n1")
            .not_ready("10.0.0.4")
            .on("n1")
            // No nodeName: not local.
            .ready("10.0.0.5")];
        assert_eq!(rows(&[lb("Local")], &slices), ["default/web :32000 1"]);
        // Serving-terminating local endpoints still get traffic (fallback), but the check
        // fails so that the load balancer moves new clients away.
        let draining = [web_slice().serving_terminating("10.0.0.2").on("n1")];
        assert_eq!(rows(&[lb("Local")], &draining), ["default/web :32000 0"]);
    }

    #[test]
    fn an_address_on_several_ports_and_slices_counts_once() {
        let service = with_hc_port(
            lb("Local").port("https", 443, "TCP").node_port(30443),
            32000,
        );
        let slices = [
            slice("default", "web-1", "web")
                .port("http", 8080, "TCP")
                .port("https", 8443, "TCP")
                .ready("10.0.0.1")
                .on("n1"),
            slice("default", "web-2", "web")
                .port("http", 8080, "TCP")
                .ready("10.0.0.1")
                .on("n1")
                .ready("10.0.0.2")
                .on("n1"),
            // Another Service's slice does not count.
            slice("default", "other-1", "other")
                .port("http", 8080, "TCP")
                .ready("10.0.0.9")
                .on("n1"),
        ];
        assert_eq!(rows(&[service], &slices), ["default/web :32000 2"]);
    }

    #[test]
    fn slice_ports_count_whatever_service_port_they_match() {
        // kube-proxy counts per Service name over every slice port, matched or not.
        let slices = [slice("default", "web-1", "web")
            .port("metrics", 9090, "TCP")
            .ready("10.0.0.1")
            .on("n1")];
        assert_eq!(rows(&[lb("Local")], &slices), ["default/web :32000 1"]);
        // A slice without ports yields no endpoint at all in kube-proxy's map.
        let portless = [slice("default", "web-1", "web").ready("10.0.0.1").on("n1")];
        assert_eq!(rows(&[lb("Local")], &portless), ["default/web :32000 0"]);
    }

    #[test]
    fn only_local_load_balancers_with_a_port_get_a_health_check() {
        let slices = [web_slice().ready("10.0.0.1").on("n1")];
        let cases: [(&str, Service); 7] = [
            ("Cluster policy", lb("Cluster")),
            ("default policy", lb("")),
            ("no healthCheckNodePort", with_hc_port(lb("Local"), 0)),
            (
                "NodePort with Local (the API server refuses the field there)",
                with_hc_port(lb("Local").type_("NodePort"), 32000),
            ),
            ("headless", lb("Local").cluster_ip("None")),
            (
                "another proxy's",
                lb("Local").label("service.kubernetes.io/service-proxy-name", "other"),
            ),
            ("IPv6 only", lb("Local").cluster_ip("fd00::10")),
        ];
        for (what, service) in cases {
            assert_eq!(rows(&[service], &slices), Vec::<String>::new(), "{what}");
        }
        let mut no_ports = lb("Local");
        no_ports.spec.get_or_insert_with(Default::default).ports = None;
        assert_eq!(rows(&[no_ports], &slices), Vec::<String>::new());
    }

    #[test]
    fn one_check_per_service_in_name_order() {
        let other = with_hc_port(
            svc("apps", "api")
                .type_("LoadBalancer")
                .cluster_ip("10.96.0.20")
                .port("grpc", 9000, "TCP")
                .node_port(30900)
                .external_traffic_policy("Local"),
            32001,
        );
        let slices = [
            web_slice().ready("10.0.0.1").on("n1"),
            slice("apps", "api-1", "api")
                .port("grpc", 9000, "TCP")
                .ready("10.0.1.1")
                .on("n1")
                .ready("10.0.1.2")
                .on("n1")
                .ready("10.0.1.3")
                .on("n1"),
        ];
        assert_eq!(
            rows(&[lb("Local"), other], &slices),
            ["apps/api :32001 3", "default/web :32000 1"]
        );
    }

    #[test]
    fn an_out_of_range_port_is_reported_and_served_by_no_check() {
        let checks = health_checks(&shared(&[with_hc_port(lb("Local"), 70000)]), &[], &n1());
        assert_eq!(checks.checks, []);
        let reports: Vec<String> = checks.skipped.iter().map(ToString::to_string).collect();
        assert_eq!(
            reports,
            ["Service default/web: healthCheckNodePort 70000 is out of range 1-65535"]
        );
    }
}
