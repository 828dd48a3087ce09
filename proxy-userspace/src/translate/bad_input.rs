//! The bad-input table of BEHAVIOUR C34 (issue 7), at translate level: each bad object beside
//! a good Service. Every problem is one `Skipped` naming the object (so the run loop logs it
//! once), the good Service translates as if the bad object were not there, and what kube-proxy
//! serves on purpose (sloppy addresses, slices over the API's size limit, names at their
//! length limit, slices that wait for their Service) is served. Unparsable YAML and unknown
//! kinds never reach translate: `source::manifests` reports them.

use super::tests::{ServiceBuilder, SliceBuilder, conditions, n1, rows, skipped, slice, svc, web};
use super::*;
use k8s_openapi::api::discovery::v1 as discovery;
use std::slice;

/// What the good Service `default/web` translates to, whatever is beside it.
const GOOD: &str = "int 10.96.0.10:80/TCP -> 10.0.0.1:80/TCP";

fn good_slice() -> EndpointSlice {
    slice("default", "web-1", "web")
        .port("http", 80, "TCP")
        .ready("10.0.0.1")
}

/// Translates `services` and `slices` beside the good Service and its slice.
fn beside_web(services: &[Service], slices: &[EndpointSlice]) -> Translation {
    let services: Vec<Service> = [web()].into_iter().chain(services.to_vec()).collect();
    let slices: Vec<EndpointSlice> = [good_slice()].into_iter().chain(slices.to_vec()).collect();
    translate(&services, &slices, &n1())
}

fn ignored(t: &Translation) -> Vec<String> {
    t.ignored.iter().map(ToString::to_string).collect()
}

/// A ClusterIP Service `default/name` on `vip`:80/TCP, port `http`.
fn http(name: &str, vip: &str) -> Service {
    svc("default", name).cluster_ip(vip).port("http", 80, "TCP")
}

/// A row of the table: what it is, the objects beside the good Service, every frontend out,
/// every report out.
type Case = (
    &'static str,
    Vec<Service>,
    Vec<EndpointSlice>,
    Vec<&'static str>,
    Vec<&'static str>,
);

#[test]
fn c34_each_bad_object_is_reported_once_by_name_and_the_good_service_still_translates() {
    let cases: Vec<Case> = vec![
        (
            "a clusterIP with an octet over 255",
            vec![http("bad-octet", "10.96.0.300")],
            vec![],
            vec![GOOD],
            vec![r#"Service default/bad-octet: invalid clusterIP "10.96.0.300""#],
        ),
        (
            "a clusterIP that is no address at all",
            vec![http("bad-word", "abc")],
            vec![],
            vec![GOOD],
            vec![r#"Service default/bad-word: invalid clusterIP "abc""#],
        ),
        (
            "invalid externalIPs: the cluster IP is still served",
            vec![http("bad-external", "10.96.0.20").external_ips(&["10.96.0.300", "abc"])],
            vec![],
            vec![GOOD, "int 10.96.0.20:80/TCP -> (refuse)"],
            vec![
                r#"Service default/bad-external: invalid externalIP "10.96.0.300""#,
                r#"Service default/bad-external: invalid externalIP "abc""#,
            ],
        ),
        (
            "invalid endpoint addresses: the valid endpoint of the same slice still serves",
            vec![http("eps", "10.96.0.21")],
            vec![
                slice("default", "eps-1", "eps")
                    .port("http", 80, "TCP")
                    .ready("10.0.0.300")
                    .ready("abc")
                    .ready("10.0.0.2"),
            ],
            vec![GOOD, "int 10.96.0.21:80/TCP -> 10.0.0.2:80/TCP"],
            vec![
                r#"EndpointSlice default/eps-1: invalid endpoint address "10.0.0.300""#,
                r#"EndpointSlice default/eps-1: invalid endpoint address "abc""#,
            ],
        ),
        (
            "externalIPs the API server refuses: the cluster IP and the valid one are served",
            vec![http("special-external", "10.96.0.23").external_ips(&[
                "0.0.0.0",
                "127.0.0.1",
                "169.254.1.1",
                "203.0.113.7",
            ])],
            vec![],
            vec![
                GOOD,
                "int 10.96.0.23:80/TCP -> (refuse)",
                "ext 203.0.113.7:80/TCP -> (refuse)",
                "int 203.0.113.7:80/TCP -> (refuse)",
            ],
            vec![
                r#"Service default/special-external: externalIP "0.0.0.0" may not be unspecified (0.0.0.0)"#,
                r#"Service default/special-external: externalIP "127.0.0.1" may not be in the loopback range (127.0.0.0/8)"#,
                r#"Service default/special-external: externalIP "169.254.1.1" may not be in the link-local range (169.254.0.0/16)"#,
            ],
        ),
        (
            "cluster and LB IPs at 0.0.0.0: not served (they would take every \
             connect(0.0.0.0)); the valid LB IP is",
            vec![
                http("special-cluster", "0.0.0.0"),
                http("special-lb", "10.96.0.24")
                    .type_("LoadBalancer")
                    .allocate_load_balancer_node_ports(false)
                    .ingress("0.0.0.0", "")
                    .ingress("203.0.113.8", ""),
            ],
            vec![],
            vec![
                GOOD,
                "int 10.96.0.24:80/TCP -> (refuse)",
                "ext 203.0.113.8:80/TCP -> (refuse)",
                "int 203.0.113.8:80/TCP -> (refuse)",
            ],
            vec![
                r#"Service default/special-cluster: clusterIP "0.0.0.0" may not be 0.0.0.0"#,
                r#"Service default/special-lb: loadBalancer ingress IP "0.0.0.0" may not be 0.0.0.0"#,
            ],
        ),
        (
            "endpoint addresses the API server refuses: the valid endpoint still serves",
            vec![http("eps", "10.96.0.21")],
            vec![
                slice("default", "eps-1", "eps")
                    .port("http", 80, "TCP")
                    .ready("0.0.0.0")
                    .ready("127.0.0.1")
                    .ready("169.254.169.254")
                    .ready("224.0.0.251")
                    .ready("224.0.1.1")
                    .ready("10.0.0.2"),
            ],
            // (224.0.1.1 is multicast beyond the link-local block: the API server takes it.)
            vec![
                GOOD,
                "int 10.96.0.21:80/TCP -> 10.0.0.2:80/TCP, 224.0.1.1:80/TCP",
            ],
            vec![
                r#"EndpointSlice default/eps-1: endpoint address "0.0.0.0" may not be unspecified (0.0.0.0)"#,
                r#"EndpointSlice default/eps-1: endpoint address "127.0.0.1" may not be in the loopback range (127.0.0.0/8)"#,
                r#"EndpointSlice default/eps-1: endpoint address "169.254.169.254" may not be in the link-local range (169.254.0.0/16)"#,
                r#"EndpointSlice default/eps-1: endpoint address "224.0.0.251" may not be in the link-local multicast range (224.0.0.0/24)"#,
            ],
        ),
        (
            "service port 0",
            vec![
                svc("default", "port-zero")
                    .cluster_ip("10.96.0.22")
                    .port("http", 0, "TCP"),
            ],
            vec![],
            vec![GOOD],
            vec!["Service default/port-zero port http: port 0 is out of range 1-65535"],
        ),
        (
            "service port 70000",
            vec![
                svc("default", "port-big")
                    .cluster_ip("10.96.0.23")
                    .port("http", 70000, "TCP"),
            ],
            vec![],
            vec![GOOD],
            vec!["Service default/port-big port http: port 70000 is out of range 1-65535"],
        ),
        (
            "nodePort 70000: the cluster IP is still served",
            vec![
                http("node-port-big", "10.96.0.24")
                    .type_("NodePort")
                    .node_port(70000),
            ],
            vec![],
            vec![GOOD, "int 10.96.0.24:80/TCP -> (refuse)"],
            vec!["Service default/node-port-big port http: nodePort 70000 is out of range 1-65535"],
        ),
        (
            "slice ports 0 and 70000: the slice's valid port still serves",
            vec![
                http("slice-ports", "10.96.0.25")
                    .port("zero", 81, "TCP")
                    .port("big", 82, "TCP"),
            ],
            vec![
                slice("default", "slice-ports-1", "slice-ports")
                    .port("http", 80, "TCP")
                    .port("zero", 0, "TCP")
                    .port("big", 70000, "TCP")
                    .ready("10.0.0.2"),
            ],
            vec![
                GOOD,
                "int 10.96.0.25:80/TCP -> 10.0.0.2:80/TCP",
                "int 10.96.0.25:81/TCP -> (refuse)",
                "int 10.96.0.25:82/TCP -> (refuse)",
            ],
            vec![
                r#"EndpointSlice default/slice-ports-1: port "big": 70000 is out of range 1-65535"#,
                r#"EndpointSlice default/slice-ports-1: port "zero": 0 is out of range 1-65535"#,
            ],
        ),
        (
            "an SCTP port: the Service's TCP port is still served",
            vec![http("sctp", "10.96.0.26").port("assoc", 9000, "SCTP")],
            vec![],
            vec![GOOD, "int 10.96.0.26:80/TCP -> (refuse)"],
            vec![
                r#"Service default/sctp port assoc: protocol "SCTP" is not supported (only TCP and UDP)"#,
            ],
        ),
        (
            "a protocol that does not exist (protocols are case-sensitive)",
            vec![
                svc("default", "junk-proto")
                    .cluster_ip("10.96.0.27")
                    .port("http", 80, "HTTP")
                    .port("", 81, "tcp"),
            ],
            vec![],
            vec![GOOD],
            vec![
                r#"Service default/junk-proto port 81: protocol "tcp" is not supported (only TCP and UDP)"#,
                r#"Service default/junk-proto port http: protocol "HTTP" is not supported (only TCP and UDP)"#,
            ],
        ),
        (
            "two ports with the same port and protocol: the first is served, the second reported",
            vec![http("dup-port", "10.96.0.28").port("web", 80, "TCP")],
            vec![
                slice("default", "dup-port-1", "dup-port")
                    .port("http", 80, "TCP")
                    .port("web", 80, "TCP")
                    .ready("10.0.0.2"),
            ],
            vec![GOOD, "int 10.96.0.28:80/TCP -> 10.0.0.2:80/TCP"],
            vec![
                "Service default/dup-port port web: 10.96.0.28:80/TCP is already served by default/dup-port:http",
            ],
        ),
        (
            "an addressType the API server refuses",
            vec![],
            vec![
                slice("default", "web-ipv5", "web")
                    .address_type("IPv5")
                    .port("http", 80, "TCP")
                    .ready("10.0.0.9"),
            ],
            vec![GOOD],
            vec![
                r#"EndpointSlice default/web-ipv5: addressType "IPv5" is not supported (IPv4, IPv6 or FQDN)"#,
            ],
        ),
    ];
    for (case, services, slices, want_rows, want_skipped) in cases {
        let t = beside_web(&services, &slices);
        assert_eq!(rows(&t), want_rows, "{case}");
        assert_eq!(skipped(&t), want_skipped, "{case}");
        assert_eq!(ignored(&t), Vec::<String>::new(), "{case}");
    }
}

/// `netutils.ParseIPSloppy`: leading zeros are decimal, so kube-proxy serves 172.30.0.41.
#[test]
fn c34_non_canonical_172_30_0_041_is_served_as_172_30_0_41_like_kube_proxys_parse_ip_sloppy() {
    let t = beside_web(
        &[http("sloppy", "172.30.0.041")],
        &[slice("default", "sloppy-1", "sloppy")
            .port("http", 80, "TCP")
            .ready("10.0.0.010")
            .ready("010.000.000.011")],
    );
    assert_eq!(
        rows(&t),
        [
            GOOD,
            "int 172.30.0.41:80/TCP -> 10.0.0.10:80/TCP, 10.0.0.11:80/TCP",
        ]
    );
    assert_eq!(skipped(&t), Vec::<String>::new());
}

/// kube-proxy's IPv4 proxier finds no cluster IP of its family in a single-stack IPv6
/// Service and ignores IPv6 slices: not errors. They are listed as ignored (debug level).
#[test]
fn c34_ipv6_only_service_and_ipv6_slice_are_not_served_and_not_reported_as_errors() {
    let t = beside_web(
        &[svc("default", "v6")
            .cluster_ip("fd00:10:96::20")
            .cluster_ips(&["fd00:10:96::20"])
            .port("http", 80, "TCP")],
        &[
            slice("default", "v6-1", "v6")
                .address_type("IPv6")
                .port("http", 80, "TCP")
                .ready("fd00:244::10"),
            // An IPv6 slice of the good Service (dual-stack) changes nothing either.
            slice("default", "web-v6", "web")
                .address_type("IPv6")
                .port("http", 80, "TCP")
                .ready("fd00:244::11"),
            slice("default", "web-fqdn", "web")
                .address_type("FQDN")
                .port("http", 80, "TCP")
                .ready("web.example.com"),
        ],
    );
    assert_eq!(rows(&t), [GOOD]);
    assert_eq!(skipped(&t), Vec::<String>::new());
    assert_eq!(
        ignored(&t),
        [
            "EndpointSlice default/v6-1: addressType IPv6: this proxy serves IPv4 only",
            "EndpointSlice default/web-fqdn: addressType FQDN: this proxy serves IPv4 only",
            "EndpointSlice default/web-v6: addressType IPv6: this proxy serves IPv4 only",
            r#"Service default/v6: IPv6 only (clusterIPs ["fd00:10:96::20"]): this proxy serves IPv4 only"#,
        ]
    );
}

/// 10.1.x.y for i = 256 * x + y, all distinct up to 65536.
fn many_addresses(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256))
        .collect()
}

fn slice_with(name: &str, service: &str, addresses: &[String]) -> EndpointSlice {
    addresses.iter().fold(
        slice("default", name, service).port("http", 8080, "TCP"),
        |slice, addr| slice.ready(addr),
    )
}

/// The API allows at most 1000 endpoints in a slice; kube-proxy takes whatever it is given,
/// and so does translate. The map sizes are the capacity module's concern.
#[test]
fn c34_a_slice_over_the_api_limit_of_1000_endpoints_is_served_whole() {
    let addresses = many_addresses(1001);
    let t = beside_web(
        &[http("big", "10.96.0.30")],
        &[slice_with("big-1", "big", &addresses)],
    );
    assert_eq!(skipped(&t), Vec::<String>::new());
    let big = t
        .state
        .frontends
        .values()
        .find(|f| f.service.name == "big")
        .expect("the big Service is served");
    assert_eq!(big.backends.len(), 1001);
    assert!(big.backends.windows(2).all(|w| w[0] < w[1]));
}

/// A frontend counts its slots in 16 bits: 70000 backends across slices are reported on the
/// service port and the first 65535 (address order) are served, never a wrapped count, and
/// the other Services are untouched.
#[test]
fn c34_more_than_65535_backends_across_slices_are_reported_not_wrapped() {
    let addresses = many_addresses(70_000);
    let slices: Vec<EndpointSlice> = addresses
        .chunks(1000)
        .enumerate()
        .map(|(i, chunk)| slice_with(&format!("huge-{i}"), "huge", chunk))
        .collect();
    let huge = http("huge", "10.96.0.31")
        .type_("NodePort")
        .node_port(30080)
        .external_traffic_policy("Local");
    let t = beside_web(&[huge], &slices);
    assert_eq!(
        skipped(&t),
        [
            "Service default/huge port http: 70000 backends, more than a frontend holds \
             (65535); serving the first 65535 in address order"
        ]
    );
    let frontends: Vec<&Frontend> = t
        .state
        .frontends
        .values()
        .filter(|f| f.service.name == "huge")
        .collect();
    assert_eq!(frontends.len(), 3, "cluster IP and the NodePort pair");
    for f in frontends {
        match (f.key.scope, f.kind) {
            // Policy Local with no endpoint on this node: nothing, so nothing to cut.
            (Scope::External, FrontendKind::NodePort) => {
                assert!(f.backends.is_empty());
                assert_eq!(f.when_empty, WhenEmpty::Drop);
            }
            _ => {
                assert_eq!(f.backends.len(), 65535, "{}", f.key);
                assert_eq!(f.backends[0].addr, Ipv4Addr::new(10, 1, 0, 0));
                assert!(f.backends.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }
    assert!(rows(&t).contains(&GOOD.to_owned()));
}

/// The API server refuses neither an address listed twice in a slice nor in two slices;
/// kube-proxy keys endpoints by address, and so does translate: one backend, nothing to report.
#[test]
fn c34_identical_endpoints_are_one_backend_and_not_a_problem() {
    let twice = slice("default", "twice-1", "twice")
        .port("http", 80, "TCP")
        .ready("10.0.0.2")
        .ready("10.0.0.2");
    let again = slice("default", "twice-2", "twice")
        .port("http", 80, "TCP")
        .ready("10.0.0.2");
    let t = beside_web(&[http("twice", "10.96.0.32")], &[twice, again]);
    assert_eq!(rows(&t), [GOOD, "int 10.96.0.32:80/TCP -> 10.0.0.2:80/TCP"]);
    assert_eq!(skipped(&t), Vec::<String>::new());
}

/// The API's limits: a Service name is a DNS-1035 label (63), a slice name a DNS-1123
/// subdomain (253), a port name a DNS-1123 label (63). Nothing in translate cares.
#[test]
fn c34_names_at_their_length_limit_are_served_normally() {
    let service_name = format!("s{}", "x".repeat(62));
    let slice_name = format!("e{}", "y".repeat(252));
    let port_name = format!("p{}", "z".repeat(62));
    assert_eq!(
        (service_name.len(), slice_name.len(), port_name.len()),
        (63, 253, 63)
    );
    let service = svc("default", &service_name)
        .cluster_ip("10.96.0.33")
        .port(&port_name, 80, "TCP");
    let endpoints = slice("default", &slice_name, &service_name)
        .port(&port_name, 80, "TCP")
        .ready("10.0.0.2");
    let t = beside_web(&[service], &[endpoints]);
    assert_eq!(rows(&t), [GOOD, "int 10.96.0.33:80/TCP -> 10.0.0.2:80/TCP"]);
    assert_eq!(skipped(&t), Vec::<String>::new());
    let served = t
        .state
        .frontends
        .values()
        .find(|f| f.key.addr == Ipv4Addr::new(10, 96, 0, 33))
        .map(|f| f.service.to_string());
    assert_eq!(served, Some(format!("default/{service_name}:{port_name}")));
}

/// kube-proxy keeps a slice whose Service does not exist (yet) in its cache and says nothing;
/// the Service is served with it as soon as it appears.
#[test]
fn c34_a_slice_without_its_service_waits_silently_and_serves_when_the_service_appears() {
    let orphan = slice("default", "late-1", "late")
        .port("http", 80, "TCP")
        .ready("10.0.0.2");
    let before = beside_web(&[], slice::from_ref(&orphan));
    assert_eq!(rows(&before), [GOOD]);
    assert_eq!(skipped(&before), Vec::<String>::new());
    assert_eq!(ignored(&before), Vec::<String>::new());

    let after = beside_web(&[http("late", "10.96.0.34")], &[orphan]);
    assert_eq!(
        rows(&after),
        [GOOD, "int 10.96.0.34:80/TCP -> 10.0.0.2:80/TCP"]
    );
    assert_eq!(skipped(&after), Vec::<String>::new());
}

/// Manifests can hold the same Service twice under one name (one without `namespace`, one
/// in `default`); the API server cannot. Whichever order they come in, one result.
#[test]
fn services_with_the_same_name_translate_the_same_in_any_order() {
    let mut unnamespaced = svc("default", "web")
        .cluster_ip("10.96.0.10")
        .port("web", 80, "TCP");
    unnamespaced.metadata.namespace = None;
    let services = [web(), unnamespaced];
    let reversed = [services[1].clone(), services[0].clone()];
    let slices = [good_slice()];
    let forward = translate(&services, &slices, &n1());
    let backward = translate(&reversed, &slices, &n1());
    assert_eq!(forward.state, backward.state);
    assert_eq!(forward.skipped, backward.skipped);
    assert_eq!(forward.skipped.len(), 1, "{:?}", skipped(&forward));
}

/// One endpoint without conditions, one without an address, one with two: each as the API
/// documents, and only the empty one is reported.
#[test]
fn c34_endpoints_with_missing_fields_are_read_as_the_api_documents() {
    let endpoints = slice("default", "odd-1", "odd")
        .port("http", 80, "TCP")
        .endpoint(&["10.0.0.2"], discovery::EndpointConditions::default())
        .endpoint(&[], conditions(true, true, false))
        .endpoint(&["10.0.0.3", "10.0.0.4"], conditions(true, true, false));
    let t = beside_web(&[http("odd", "10.96.0.35")], &[endpoints]);
    assert_eq!(
        rows(&t),
        [
            GOOD,
            "int 10.96.0.35:80/TCP -> 10.0.0.2:80/TCP, 10.0.0.3:80/TCP"
        ]
    );
    assert_eq!(
        skipped(&t),
        ["EndpointSlice default/odd-1: an endpoint has no address"]
    );
}
