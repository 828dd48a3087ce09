//! Privileged: the north-south TCX programs run with `BPF_PROG_TEST_RUN` on crafted
//! packets (issue 4 item 9). Exact bytes out, checksums recomputed from the output, and the
//! packets that are none of our business must come out byte-identical with `TCX_NEXT`
//! (`TC_ACT_UNSPEC`: a pass that leaves the decision to later programs and the stack).
//! Needs root and the BPF syscall; each test runs in a network namespace of its own and
//! loads the object without pins, so nothing is left on the host and nothing is sent.

#[path = "support/prog_test_run.rs"]
mod prog_test_run;

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use aya::maps::IterableMap;
use proxy_userspace::{conntrack_gc, dataplane};

use prog_test_run::{
    Datapath, Frame, Frontend, Outcome, TC_ACT_REDIRECT, TC_ACT_SHOT, TCP_ACK, TCP_FIN, TCP_RST,
    TCP_SYN, TCX_NEXT, answer_to, assert_checksum_fill_keeps, checksum, forwarding_device, hex,
    icmp_error, icmp_error_quoting, icmp_tuples, ifindex, in_private_netns, ip, mac_of, parse_mac,
    segment_options, syn_options, tuple_of, verify_checksums, verify_icmp_checksums,
};
use proxy_common::{
    BACKEND_FLAG_LOCAL, CT_DIR_IN, CT_FLAG_BACKEND_SYN, CT_FLAG_CLOSING, CT_FLAG_FIN_BACKEND,
    CT_FLAG_FIN_BACKEND_FIRST, CT_FLAG_FIN_CLIENT, CT_FLAG_REPLY, CT_FLAG_SEEN_REPLY, CT_FLAG_SNAT,
    CT_LIFETIME_CLOSING, CT_LIFETIME_NONTCP, CT_LIFETIME_SNAT_CLOSING, CT_LIFETIME_TCP,
    CT_LIFETIME_TCP_SYN, MAP_NS_FILTER, NS_FILTER_IN, NS_FILTER_OUT, NatCtKey, NatCtValue,
    NsFilter, PROTO_TCP, PROTO_UDP, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXTERNAL_IP,
    SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_ADDRESS, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
    SnatTimeWait, TIME_WAIT_FLAG_TIMESTAMP,
};

/// This node's address: NodePorts are served on it, remote backends see it as source.
const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const NODE_PORT: u16 = 30080;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT_PORT: u16 = 40000;
/// A pod on this node and one on another node.
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 20);
const POD_PORT: u16 = 8080;
/// An externalIP no node owns.
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

const LOCAL_ID: u32 = 1;
const REMOTE_ID: u32 = 2;

fn node_port(proto: u8, flags: u16) -> Frontend {
    Frontend {
        addr: NODE,
        port: NODE_PORT,
        proto,
        rev_nat_id: 7,
        flags: SVC_FLAG_NODE_PORT | flags,
        affinity_timeout: 0,
        affinity_id: 0,
    }
}

/// NodePort 30080/TCP with one backend, local or remote; SNAT to the node's address.
fn datapath_with(proto: u8, backend_id: u32) -> Datapath {
    let mut dp = Datapath::load();
    dp.backend(LOCAL_ID, LOCAL_POD, POD_PORT, proto, BACKEND_FLAG_LOCAL);
    dp.backend(REMOTE_ID, REMOTE_POD, POD_PORT, proto, 0);
    dp.frontend(node_port(proto, 0), &[backend_id]);
    dp.snat(NODE, 61000, 65535);
    dp
}

fn assert_frame(got: &[u8], want: &Frame, what: &str) {
    let want = want.bytes();
    assert!(
        got == want,
        "{what}: wrong bytes\n got:\n{}\nwant:\n{}",
        hex(got),
        hex(&want)
    );
    verify_checksums(got);
}

fn ct_key(
    saddr: Ipv4Addr,
    sport: u16,
    daddr: Ipv4Addr,
    dport: u16,
    proto: u8,
    dir: u8,
) -> NatCtKey {
    NatCtKey {
        saddr: u32::from_ne_bytes(saddr.octets()),
        daddr: u32::from_ne_bytes(daddr.octets()),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        dir,
        _pad: [0; 2],
    }
}

#[test]
fn dnat_to_a_local_backend_keeps_the_client_address_and_egress_restores_the_frontend() {
    in_private_netns(|| {
        let dp = datapath_with(PROTO_TCP, LOCAL_ID);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.ingress(&syn.bytes());
        assert_eq!(out.verdict, TCX_NEXT, "DNATed packets go on to the stack");
        assert_frame(
            &out.packet,
            &syn.with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT),
            "client -> NodePort, DNAT to the local pod (C10: the client address stays)",
        );

        // The rest of the flow follows the same translation.
        let ack = Frame {
            tcp_flags: TCP_ACK,
            payload: b"more data".to_vec(),
            ..syn.clone()
        };
        let out = dp.ingress(&ack.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        assert_frame(
            &out.packet,
            &ack.with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT),
            "second packet of the flow",
        );

        // The pod answers the client directly; leaving the node, its source becomes the
        // frontend again.
        let reply = syn
            .with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT)
            .reply();
        let out = dp.egress(&reply.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        assert_frame(
            &out.packet,
            &reply.with_tuple(NODE, NODE_PORT, CLIENT, CLIENT_PORT),
            "local pod -> client, reverse NAT on egress",
        );
        // Not on ingress: the reply entry belongs to the egress hook.
        let out = dp.ingress(&reply.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        assert_eq!(out.packet, reply.bytes(), "ingress leaves the reply alone");
        assert_eq!(dp.ct_entries().len(), 2, "one entry per direction");
    });
}

/// The node's own connections and those masqueraded to its address may take a NodePort's
/// port as their source: their replies (a SYN-ACK, data, a RST) reach the NodePort with no
/// flow of ours, and go on untouched to the kernel's conntrack, which takes them back.
/// Only a connection's first segment, a SYN without ACK, starts a flow there.
#[test]
fn only_a_connections_first_segment_starts_a_flow_at_a_node_port() {
    in_private_netns(|| {
        let dp = datapath_with(PROTO_TCP, REMOTE_ID);
        let server = Ipv4Addr::new(203, 0, 113, 50);
        let syn_ack = Frame {
            tcp_flags: TCP_SYN | TCP_ACK,
            ..Frame::tcp(server, 443, NODE, NODE_PORT)
        };
        let data = Frame {
            tcp_flags: TCP_ACK,
            ..syn_ack.clone()
        };
        let reset = Frame {
            tcp_flags: TCP_RST,
            ..syn_ack.clone()
        };
        for (what, frame) in [("SYN-ACK", &syn_ack), ("data", &data), ("RST", &reset)] {
            let out = dp.ingress(&frame.bytes());
            assert_eq!(
                (out.verdict, out.packet),
                (TCX_NEXT, frame.bytes()),
                "a {what} to the NodePort without a flow"
            );
        }
        assert!(dp.ct_entries().is_empty(), "{:?}", dp.ct_entries());
        let syn = Frame::tcp(server, 443, NODE, NODE_PORT);
        let out = dp.ingress(&syn.bytes());
        assert_eq!(
            tuple_of(&out.packet).2,
            REMOTE_POD,
            "a SYN starts a flow, to the backend"
        );
        assert_eq!(dp.ct_entries().len(), 2);
    });
}

/// An externalIP or LoadBalancer IP that is one of the node's addresses is as much a source
/// of the node's connections as a NodePort: replies to them pass, a SYN starts a flow.
/// One the node does not carry keeps picking a flow up mid-stream.
#[test]
fn only_a_connections_first_segment_starts_a_flow_at_a_node_address() {
    in_private_netns(|| {
        let server = Ipv4Addr::new(203, 0, 113, 50);
        for kind in [SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER] {
            for (addr, flags) in [(NODE, kind | SVC_FLAG_NODE_ADDRESS), (EXTERNAL_IP, kind)] {
                let mut dp = Datapath::load();
                dp.backend(REMOTE_ID, REMOTE_POD, POD_PORT, PROTO_TCP, 0);
                let frontend = Frontend {
                    addr,
                    port: 50051,
                    proto: PROTO_TCP,
                    rev_nat_id: 7,
                    flags,
                    affinity_timeout: 0,
                    affinity_id: 0,
                };
                dp.frontend(frontend, &[REMOTE_ID]);
                dp.snat(NODE, 61000, 65535);
                let syn_ack = Frame {
                    tcp_flags: TCP_SYN | TCP_ACK,
                    ..Frame::tcp(server, 443, addr, 50051)
                };
                let out = dp.ingress(&syn_ack.bytes());
                if addr == NODE {
                    assert_eq!(
                        (out.verdict, out.packet),
                        (TCX_NEXT, syn_ack.bytes()),
                        "a SYN-ACK to the node's address, flags {flags:#x}"
                    );
                    assert!(dp.ct_entries().is_empty(), "{:?}", dp.ct_entries());
                    let syn = Frame::tcp(server, 443, addr, 50051);
                    let out = dp.ingress(&syn.bytes());
                    assert_eq!(tuple_of(&out.packet).2, REMOTE_POD, "a SYN starts a flow");
                } else {
                    assert_eq!(
                        tuple_of(&out.packet).2,
                        REMOTE_POD,
                        "mid-stream at an address no node carries, flags {flags:#x}"
                    );
                }
                assert_eq!(dp.ct_entries().len(), 2);
            }
        }
    });
}

/// A flow whose reply entry the LRU evicted, and whose source port a new flow took since,
/// is over: its next segment must not land in the new flow's tuple at the backend (two
/// connections sharing it), and the new flow keeps working.
#[test]
fn a_flow_whose_tuple_another_took_is_not_translated_into_it() {
    in_private_netns(|| {
        let mut dp = datapath_with(PROTO_TCP, REMOTE_ID);
        dp.snat(NODE, 61000, 61000);
        let a_syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.ingress(&a_syn.bytes());
        assert_eq!(tuple_of(&out.packet), (NODE, 61000, REMOTE_POD, POD_PORT));
        // The LRU evicts entries one by one: A's reply entry goes.
        let reply_key = ct_key(REMOTE_POD, POD_PORT, NODE, 61000, PROTO_TCP, CT_DIR_IN);
        dp.nat_ct.remove(&reply_key).expect("A's reply entry");
        let other = Ipv4Addr::new(198, 51, 100, 8);
        let c2_syn = Frame::tcp(other, 40001, NODE, NODE_PORT);
        let out = dp.ingress(&c2_syn.bytes());
        assert_eq!(
            tuple_of(&out.packet),
            (NODE, 61000, REMOTE_POD, POD_PORT),
            "a new flow takes the port"
        );

        // A's next segment, a second after its entry was last refreshed (the partner is
        // looked at once a second).
        let a_key = ct_key(CLIENT, CLIENT_PORT, NODE, NODE_PORT, PROTO_TCP, CT_DIR_IN);
        let mut a = dp.nat_ct.get(&a_key, 0).expect("A's entry");
        a.last_seen -= 1;
        dp.nat_ct.insert(a_key, a, 0).expect("ageing A's entry");
        let ack = Frame {
            tcp_flags: TCP_ACK,
            payload: b"late".to_vec(),
            ..a_syn.clone()
        };
        let out = dp.ingress(&ack.bytes());
        assert_eq!(
            (out.verdict, out.packet),
            (TCX_NEXT, ack.bytes()),
            "A's segment goes on untouched (the node resets it)"
        );
        assert!(dp.nat_ct.get(&a_key, 0).is_err(), "A's entry is gone");

        // The new flow's reply still reaches its client.
        let reply = Frame {
            tcp_flags: TCP_SYN | TCP_ACK,
            ..Frame::tcp(REMOTE_POD, POD_PORT, NODE, 61000)
        };
        let out = dp.ingress(&reply.bytes());
        assert_eq!(tuple_of(&out.packet), (NODE, NODE_PORT, other, 40001));
    });
}

/// Writes the prefilter's `entry`, armed, with the bits of `pairs` (address, port).
fn prefilter(dp: &mut Datapath, entry: u32, pairs: &[(Ipv4Addr, u16)]) {
    let mut filter = NsFilter {
        armed: 1,
        ..NsFilter::EMPTY
    };
    for (addr, port) in pairs {
        filter.insert(u32::from_ne_bytes(addr.octets()), port.to_be());
    }
    let map = dp.ebpf_mut().map_mut(MAP_NS_FILTER).expect("the prefilter");
    let mut map: aya::maps::Array<_, NsFilter> = aya::maps::Array::try_from(map).expect("array");
    map.set(entry, filter, 0).expect("writing the prefilter");
}

/// Armed, the prefilter decides before any lookup: a packet to a frontend whose bit is
/// missing passes untouched and starts no flow, a local backend's reply without its bit
/// leaves untranslated. With the bits, the flows are translated, and the reply of a
/// source-NATed flow is admitted by the mark its first packet left on its SNAT port, also
/// once the node's SNAT address has moved on (its replies still come to the old one).
#[test]
fn an_armed_prefilter_passes_what_has_no_bit_and_admits_replies_to_marked_snat_ports() {
    in_private_netns(|| {
        let mut dp = datapath_with(PROTO_TCP, REMOTE_ID);
        prefilter(&mut dp, NS_FILTER_IN, &[]);
        prefilter(&mut dp, NS_FILTER_OUT, &[]);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.ingress(&syn.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        assert_eq!(
            out.packet,
            syn.bytes(),
            "no bit: the NodePort is not looked at"
        );
        assert!(dp.ct_entries().is_empty(), "no flow started");

        prefilter(&mut dp, NS_FILTER_IN, &[(NODE, NODE_PORT)]);
        let out = dp.ingress(&syn.bytes());
        let (saddr, snat_port, daddr, dport) = tuple_of(&out.packet);
        assert_eq!((saddr, daddr, dport), (NODE, REMOTE_POD, POD_PORT));
        dp.snat(Ipv4Addr::new(192, 0, 2, 99), 61000, 65535);
        let reply = syn
            .with_tuple(NODE, snat_port, REMOTE_POD, POD_PORT)
            .reply();
        let out = dp.ingress(&reply.bytes());
        assert_frame(
            &out.packet,
            &reply.with_tuple(NODE, NODE_PORT, CLIENT, CLIENT_PORT),
            "the reply to the marked SNAT port, after the SNAT address moved",
        );
    });
    in_private_netns(|| {
        let mut dp = datapath_with(PROTO_TCP, LOCAL_ID);
        prefilter(&mut dp, NS_FILTER_IN, &[(NODE, NODE_PORT)]);
        prefilter(&mut dp, NS_FILTER_OUT, &[]);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.ingress(&syn.bytes());
        assert_frame(
            &out.packet,
            &syn.with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT),
            "client -> NodePort, DNAT to the local pod",
        );
        let reply = syn
            .with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT)
            .reply();
        let out = dp.egress(&reply.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        assert_eq!(
            out.packet,
            reply.bytes(),
            "no bit: the reply is not looked at"
        );
        prefilter(&mut dp, NS_FILTER_OUT, &[(LOCAL_POD, POD_PORT)]);
        let out = dp.egress(&reply.bytes());
        assert_frame(
            &out.packet,
            &reply.with_tuple(NODE, NODE_PORT, CLIENT, CLIENT_PORT),
            "local pod -> client, with the backend's bit",
        );
    });
}

#[test]
fn c08_dnat_and_snat_to_a_remote_backend_and_the_reply_goes_back_to_the_client() {
    for proto in [PROTO_TCP, PROTO_UDP] {
        in_private_netns(move || {
            let dp = datapath_with(proto, REMOTE_ID);
            let first = if proto == PROTO_TCP {
                Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT)
            } else {
                Frame::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT)
            };
            let out = dp.ingress(&first.bytes());
            // No route in this namespace: the program hands the packet to the stack.
            assert_eq!(out.verdict, TCX_NEXT);
            let (saddr, snat_port, daddr, dport) = tuple_of(&out.packet);
            assert_eq!((saddr, daddr, dport), (NODE, REMOTE_POD, POD_PORT));
            assert!(
                (61000..=65535).contains(&snat_port),
                "SNAT port {snat_port} outside the configured range"
            );
            assert_frame(
                &out.packet,
                &first.with_tuple(NODE, snat_port, REMOTE_POD, POD_PORT),
                "client -> NodePort, DNAT to the remote pod + SNAT to the node",
            );

            // The remote pod answers the node; the reply goes back to the client from the
            // frontend.
            let reply = first
                .with_tuple(NODE, snat_port, REMOTE_POD, POD_PORT)
                .reply();
            let out = dp.ingress(&reply.bytes());
            assert_eq!(out.verdict, TCX_NEXT);
            assert_frame(
                &out.packet,
                &reply.with_tuple(NODE, NODE_PORT, CLIENT, CLIENT_PORT),
                "remote pod -> node, reverse SNAT + DNAT back to the client",
            );

            // Both entries are at ingress and point at each other.
            let entries = dp.ct_entries();
            assert_eq!(entries.len(), 2, "{entries:?}");
            let forward = ct_key(CLIENT, CLIENT_PORT, NODE, NODE_PORT, proto, CT_DIR_IN);
            let backward = ct_key(REMOTE_POD, POD_PORT, NODE, snat_port, proto, CT_DIR_IN);
            let get = |k: &NatCtKey| -> NatCtValue {
                entries
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| *v)
                    .unwrap_or_else(|| panic!("no entry {k:?} in {entries:?}"))
            };
            assert_eq!(get(&forward).flags & CT_FLAG_SNAT, CT_FLAG_SNAT);
            // The backend answered: a SYN-ACK, which does not end TCP's handshake yet.
            let answered = if proto == PROTO_TCP {
                CT_FLAG_BACKEND_SYN
            } else {
                CT_FLAG_SEEN_REPLY
            };
            let recorded = CT_FLAG_SNAT | CT_FLAG_REPLY | CT_FLAG_SEEN_REPLY | CT_FLAG_BACKEND_SYN;
            assert_eq!(
                get(&backward).flags & recorded,
                CT_FLAG_SNAT | CT_FLAG_REPLY | answered
            );
        });
    }
}

/// A device `ekp0` towards the pod network (10.244.2.1/24) in the test's namespace, with
/// forwarding on; its ifindex.
fn pod_network_device() -> u32 {
    forwarding_device(&["10.244.2.1/24"], &[])
}

#[test]
fn snat_forwarding_redirects_to_the_next_hop_with_its_mac_and_the_ttl_decremented() {
    in_private_netns(|| {
        // With a neighbour entry for the remote pod.
        let dev = pod_network_device();
        ip(&[
            "neigh",
            "add",
            "10.244.2.20",
            "lladdr",
            "02:00:00:00:02:20",
            "dev",
            "ekp0",
            "nud",
            "permanent",
        ]);

        let dp = datapath_with(PROTO_TCP, REMOTE_ID);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.run("ekp_tcx_in", &syn.bytes(), dev);
        assert_eq!(
            out.verdict, TC_ACT_REDIRECT,
            "a SNATed packet is forwarded past the stack (its source is a node address)"
        );
        let (_, snat_port, _, _) = tuple_of(&out.packet);
        let want = Frame {
            dst_mac: parse_mac("02:00:00:00:02:20"),
            src_mac: mac_of("ekp0"),
            ttl: syn.ttl - 1,
            ..syn.with_tuple(NODE, snat_port, REMOTE_POD, POD_PORT)
        };
        assert_frame(&out.packet, &want, "forwarded to the remote pod's next hop");
    });
}

/// A source-NATed packet whose TTL ends at this node is answered with ICMP time exceeded
/// from the address it was sent to, quoting it as it came, as kube-proxy's path (DNAT, then
/// the kernel's forwarding) answers a traceroute's probe; the next one, with a TTL to
/// spare, is forwarded. A RST is not answered (nor is a later fragment, by the fuzzer).
#[test]
fn a_source_nated_packet_whose_ttl_ends_here_gets_time_exceeded() {
    in_private_netns(|| {
        let (dp, dev) = (datapath_with(PROTO_TCP, REMOTE_ID), pod_network_device());

        let probe = Frame {
            ttl: 1,
            ..Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT)
        };
        let out = dp.run("ekp_tcx_in", &probe.bytes(), dev);
        assert_eq!(
            out.verdict, TC_ACT_REDIRECT,
            "the answer goes back out of the device the packet came in on"
        );
        assert_eq!(
            out.packet,
            answer_to(NODE, CLIENT, (11, 0), [0; 4], &probe.bytes()),
            "ICMP time exceeded quoting the untranslated packet:\n{}",
            hex(&out.packet)
        );
        verify_icmp_checksums(&out.packet);
        assert_checksum_fill_keeps(&out.packet);

        let next = Frame {
            ttl: 2,
            ..probe.clone()
        };
        let out = dp.run("ekp_tcx_in", &next.bytes(), dev);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "forwarded");
        let (_, snat_port, _, _) = tuple_of(&out.packet);
        assert_eq!(
            (tuple_of(&out.packet), out.packet[14 + 8]),
            ((NODE, snat_port, REMOTE_POD, POD_PORT), 1),
            "source-NATed, its TTL decremented"
        );

        let rst = Frame {
            tcp_flags: TCP_RST,
            ..probe.clone()
        };
        let out = dp.run("ekp_tcx_in", &rst.bytes(), dev);
        assert_eq!(
            out.verdict, TC_ACT_SHOT,
            "a RST whose TTL ends here: dropped"
        );
    });
}

/// A frontend whose count names a slot the agent has deleted: the agent lowers the count
/// before it deletes slots, so a program meets this only between its read of slot 0 and its
/// read of the slot. It reads slot 0 again and picks once more, instead of leaving the
/// connection untranslated at once. Here slot 0 stays stale, so the second pick misses as
/// often as the first: 400 new flows tell one pick (half of them untranslated) from two (a
/// quarter).
#[test]
fn a_slot_gone_since_the_count_was_read_gets_a_second_pick() {
    in_private_netns(|| {
        let mut dp = datapath_with(PROTO_TCP, LOCAL_ID);
        let frontend = node_port(PROTO_TCP, 0);
        dp.frontend(frontend, &[LOCAL_ID, LOCAL_ID]);
        dp.services
            .remove(&frontend.key(2))
            .expect("deleting slot 2");
        let mut untranslated = 0;
        for port in 20000..20400 {
            let syn = Frame::tcp(CLIENT, port, NODE, NODE_PORT);
            let out = dp.ingress(&syn.bytes());
            assert_eq!(out.verdict, TCX_NEXT);
            let (_, _, daddr, _) = tuple_of(&out.packet);
            if daddr == NODE {
                untranslated += 1;
            } else {
                assert_eq!(daddr, LOCAL_POD, "the one backend left");
            }
        }
        assert!(
            (50..150).contains(&untranslated),
            "{untranslated} of 400 flows left untranslated: about 100 with a second pick (200 \
             with one)"
        );
    });
}

/// A slot that names an id whose entry in the backends array holds nothing (never written,
/// or emptied: the agent rewriting a Service meanwhile) is no backend: the packet passes as
/// it came, never towards address 0 (this host), and no flow is recorded.
#[test]
fn a_slot_naming_an_empty_backend_entry_leaves_the_packet_untranslated() {
    in_private_netns(|| {
        for (what, id) in [("emptied", LOCAL_ID), ("never written", 9)] {
            let mut dp = datapath_with(PROTO_TCP, LOCAL_ID);
            dp.frontend(node_port(PROTO_TCP, 0), &[id]);
            dp.remove_backend(LOCAL_ID);
            let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
            let out = dp.ingress(&syn.bytes());
            assert_eq!(out.verdict, TCX_NEXT, "{what}");
            assert_frame(&out.packet, &syn, what);
            assert!(dp.ct_entries().is_empty(), "{what}: no flow recorded");
        }
    });
}

/// `frame` (IPv4 without options) with don't-fragment cleared, IP checksum redone.
fn without_dont_fragment(frame: &[u8]) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[20] &= !0x40;
    redo_ip_checksum(&mut frame);
    frame
}

/// `frame` (IPv4 without options) as a later fragment at `offset` (8-byte units), IP
/// checksum redone: the bytes after its header stay, as if they were data.
fn as_later_fragment(frame: &[u8], offset: u16) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[20..22].copy_from_slice(&offset.to_be_bytes());
    redo_ip_checksum(&mut frame);
    frame
}

fn redo_ip_checksum(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let csum = checksum(0, &frame[14..34]);
    frame[24..26].copy_from_slice(&csum.to_be_bytes());
}

#[test]
fn a_source_nated_packet_too_big_for_the_next_hop_gets_fragmentation_needed() {
    in_private_netns(|| {
        // Both ways out have a 1000-byte MTU (an overlay's, say): the pod network's device
        // towards the remote pod, and the external one towards the client.
        for (dev, peer, addr, neighbour, mac) in [
            (
                "ekp0",
                "ekp1",
                "10.244.2.1/24",
                "10.244.2.20",
                "02:00:00:00:02:20",
            ),
            (
                "ekp2",
                "ekp3",
                "198.51.100.1/24",
                "198.51.100.7",
                "02:00:00:00:00:07",
            ),
        ] {
            ip(&["link", "add", dev, "type", "veth", "peer", "name", peer]);
            ip(&["link", "set", dev, "mtu", "1000", "up"]);
            ip(&["link", "set", peer, "up"]);
            ip(&["addr", "add", addr, "dev", dev]);
            ip(&[
                "neigh",
                "add",
                neighbour,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1")
            .expect("enabling forwarding in the test namespace");
        let (pod_side, client_side) = (ifindex("ekp0"), ifindex("ekp2"));
        let mtu = [0, 0, (1000u16 >> 8) as u8, 1000u16 as u8];

        let dp = datapath_with(PROTO_TCP, REMOTE_ID);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.run("ekp_tcx_in", &syn.bytes(), client_side);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "a small SYN is forwarded");
        let (_, snat_port, _, _) = tuple_of(&out.packet);

        // A full-sized segment with don't-fragment set (TCP's path MTU discovery): the
        // client is told the MTU, from the address it sent to, about its packet as sent.
        let big = Frame {
            tcp_flags: TCP_ACK,
            payload: vec![0x61; 1200],
            ..syn.clone()
        };
        let out = dp.run("ekp_tcx_in", &big.bytes(), client_side);
        assert_eq!(
            out.verdict, TC_ACT_REDIRECT,
            "the answer goes back out of the device the packet came in on"
        );
        assert_eq!(
            out.packet,
            answer_to(NODE, CLIENT, (3, 4), mtu, &big.bytes()),
            "ICMP fragmentation needed (MTU 1000) quoting the untranslated packet:\n{}",
            hex(&out.packet)
        );
        verify_icmp_checksums(&out.packet);
        assert_checksum_fill_keeps(&out.packet);

        // Without don't-fragment it would have to be fragmented, which a program cannot do.
        let out = dp.run(
            "ekp_tcx_in",
            &without_dont_fragment(&big.bytes()),
            client_side,
        );
        assert_eq!(out.verdict, TC_ACT_SHOT, "too big, no DF: dropped");

        // The flow itself goes on: a packet that fits is forwarded.
        let fits = Frame {
            payload: vec![0x61; 900],
            ..big.clone()
        };
        let out = dp.run("ekp_tcx_in", &fits.bytes(), client_side);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            tuple_of(&out.packet),
            (NODE, snat_port, REMOTE_POD, POD_PORT)
        );

        // The same for the backend's replies on their way back to the client: the backend
        // is told, from the node address it sent to, about its reply as it sent it; a reply
        // that fits goes to the client. Also for a client whose MAC the node has not
        // resolved yet (the FIB lookup checks no size then).
        let replies_to = |client: Ipv4Addr, snat_port: u16| {
            let big = Frame {
                tcp_flags: TCP_ACK,
                payload: vec![0x62; 1200],
                ..Frame::tcp(REMOTE_POD, POD_PORT, NODE, snat_port)
            };
            let out = dp.run("ekp_tcx_in", &big.bytes(), pod_side);
            assert_eq!(out.verdict, TC_ACT_REDIRECT);
            assert_eq!(
                out.packet,
                answer_to(NODE, REMOTE_POD, (3, 4), mtu, &big.bytes()),
                "ICMP fragmentation needed to the backend of {client}'s flow:\n{}",
                hex(&out.packet)
            );
            verify_icmp_checksums(&out.packet);
            assert_checksum_fill_keeps(&out.packet);
            let fits = Frame {
                payload: vec![0x62; 900],
                ..big.clone()
            };
            let out = dp.run("ekp_tcx_in", &fits.bytes(), pod_side);
            assert_eq!(out.verdict, TC_ACT_REDIRECT);
            assert_eq!(
                tuple_of(&out.packet),
                (NODE, NODE_PORT, client, CLIENT_PORT)
            );
        };
        replies_to(CLIENT, snat_port);
        let unresolved = Ipv4Addr::new(198, 51, 100, 9);
        let syn = Frame::tcp(unresolved, CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.run("ekp_tcx_in", &syn.bytes(), client_side);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let (_, snat_port, _, _) = tuple_of(&out.packet);
        replies_to(unresolved, snat_port);
    });
}

#[test]
fn udp_checksums_stay_valid_and_a_zero_udp_checksum_stays_zero() {
    in_private_netns(|| {
        let dp = datapath_with(PROTO_UDP, LOCAL_ID);
        let with_sum = Frame::udp(CLIENT, 5353, NODE, NODE_PORT);
        let out = dp.ingress(&with_sum.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        assert_frame(
            &out.packet,
            &with_sum.with_tuple(CLIENT, 5353, LOCAL_POD, POD_PORT),
            "UDP with a checksum",
        );

        let without = Frame {
            udp_no_checksum: true,
            ..Frame::udp(CLIENT, 5454, NODE, NODE_PORT)
        };
        let out = dp.ingress(&without.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        assert_frame(
            &out.packet,
            &without.with_tuple(CLIENT, 5454, LOCAL_POD, POD_PORT),
            "UDP without a checksum keeps none",
        );
        assert_eq!(&out.packet[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
    });
}

/// Packets that are not translatable or not addressed to a Service: both programs must hand
/// them on byte-identical with TCX_NEXT.
#[test]
fn packets_that_are_not_ours_pass_unchanged() {
    in_private_netns(|| {
        let dp = datapath_with(PROTO_TCP, LOCAL_ID);
        let to_frontend = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).bytes();

        let with_ip_options = {
            // IHL 6: one word of options (4 x NOP) after the fixed header.
            let mut f = to_frontend.clone();
            f[14] = 0x46;
            f.splice(34..34, [1, 1, 1, 1]);
            let tot = u16::from_be_bytes([f[16], f[17]]) + 4;
            f[16..18].copy_from_slice(&tot.to_be_bytes());
            fix_ip_checksum(&mut f);
            f
        };
        let fragment = |flags_offset: u16| {
            let mut f = to_frontend.clone();
            f[20..22].copy_from_slice(&flags_offset.to_be_bytes());
            fix_ip_checksum(&mut f);
            f
        };
        let with_ethertype = |ethertype: u16| {
            let mut f = to_frontend.clone();
            f[12..14].copy_from_slice(&ethertype.to_be_bytes());
            f
        };
        let with_total_length = |tot_len: u16| {
            let mut f = to_frontend.clone();
            f[16..18].copy_from_slice(&tot_len.to_be_bytes());
            fix_ip_checksum(&mut f);
            f
        };
        let with_protocol = |proto: u8| {
            let mut f = to_frontend.clone();
            f[23] = proto;
            fix_ip_checksum(&mut f);
            f
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            // BPF_PROG_TEST_RUN (kernel 6.18) refuses an IPv4 frame shorter than Ethernet +
            // a 20-byte IPv4 header, so a cut inside the IPv4 header cannot be fed in; the
            // program reads every header with bpf_skb_load_bytes, which fails there too.
            ("truncated TCP header", to_frontend[..14 + 20 + 10].to_vec()),
            (
                "truncated UDP header",
                Frame::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).bytes()[..14 + 20 + 6].to_vec(),
            ),
            (
                "IP total length beyond the frame",
                to_frontend[..to_frontend.len() - 4].to_vec(),
            ),
            (
                "IP total length shorter than IP + TCP headers",
                with_total_length(30),
            ),
            (
                "IP total length shorter than the IP header",
                with_total_length(12),
            ),
            ("IP version 6 behind the IPv4 ethertype", {
                let mut f = to_frontend.clone();
                f[14] = 0x65;
                fix_ip_checksum(&mut f);
                f
            }),
            ("IP options (IHL 6)", with_ip_options),
            // (A first fragment to the frontend is translated: see the fragments test.)
            (
                "a later fragment whose first was never seen (offset 8)",
                fragment(0x2001),
            ),
            (
                "a last fragment whose first was never seen (offset, no MF)",
                fragment(0x00b9),
            ),
            ("IPv6 ethertype", with_ethertype(0x86dd)),
            ("ARP ethertype", with_ethertype(0x0806)),
            ("VLAN-tagged frame", with_ethertype(0x8100)),
            ("ICMP to the frontend address", with_protocol(1)),
            ("SCTP to the frontend address", with_protocol(132)),
            (
                "UDP to a TCP-only frontend (C05)",
                Frame::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).bytes(),
            ),
            (
                "another port on the node",
                Frame::tcp(CLIENT, CLIENT_PORT, NODE, 22).bytes(),
            ),
            (
                "an unrelated address",
                Frame::tcp(CLIENT, CLIENT_PORT, Ipv4Addr::new(192, 0, 2, 99), NODE_PORT).bytes(),
            ),
            (
                "a pod's own traffic",
                Frame::tcp(LOCAL_POD, POD_PORT, CLIENT, CLIENT_PORT).bytes(),
            ),
        ];
        for (what, packet) in &cases {
            for program in ["ekp_tcx_in", "ekp_tcx_out"] {
                let out = dp.run(program, packet, 0);
                assert_eq!(out.verdict, TCX_NEXT, "{what} through {program}: verdict");
                assert!(
                    &out.packet == packet,
                    "{what} through {program}: the packet changed\n got:\n{}\nwant:\n{}",
                    hex(&out.packet),
                    hex(packet)
                );
            }
        }
        assert!(
            dp.ct_entries().is_empty(),
            "no flow may be created for any of them"
        );
    });
}

/// `frame` (Ethernet + IPv4 without options + L4) cut into two IPv4 fragments after `cut`
/// bytes of its L4 part (a multiple of 8, the header included), as a router would.
fn fragments_of(frame: &[u8], cut: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(cut % 8, 0, "fragment offsets count 8-byte units");
    let (head, l4) = frame.split_at(34);
    let piece = |data: &[u8], frag_off: u16| {
        let mut f = head.to_vec();
        f[16..18].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        f[20..22].copy_from_slice(&frag_off.to_be_bytes());
        f.extend_from_slice(data);
        fix_ip_checksum(&mut f);
        f
    };
    (
        piece(&l4[..cut], 0x2000),
        piece(&l4[cut..], (cut / 8) as u16),
    )
}

/// Checks two translated fragments against `want`, the translated datagram unfragmented:
/// each header has `want`'s addresses and a valid checksum and keeps its fragment fields,
/// the later fragment's data is untouched, and the L4 parts put together are `want`'s (so
/// the first fragment's L4 checksum is right for the whole datagram).
fn assert_fragments(sent: (&[u8], &[u8]), got: (&[u8], &[u8]), want: &Frame, what: &str) {
    let want = want.bytes();
    for (sent, got, which) in [(sent.0, got.0, "first"), (sent.1, got.1, "later")] {
        assert_eq!(got.len(), sent.len(), "{what}: {which} fragment length");
        assert_eq!(
            &got[26..34],
            &want[26..34],
            "{what}: {which} fragment's addresses"
        );
        assert_eq!(
            prog_test_run::checksum(0, &got[14..34]),
            0,
            "{what}: {which} fragment's IP header checksum"
        );
        assert_eq!(
            &got[16..22],
            &sent[16..22],
            "{what}: {which} fragment's length, id and fragment fields"
        );
    }
    assert_eq!(
        &got.1[34..],
        &sent.1[34..],
        "{what}: the later fragment's data changed"
    );
    let l4 = [&got.0[34..], &got.1[34..]].concat();
    assert!(
        l4 == want[34..],
        "{what}: the datagram's L4 part\n got:\n{}\nwant:\n{}",
        hex(&l4),
        hex(&want[34..])
    );
}

/// A datagram fragmented on its way (here UDP to a NodePort, larger than a hop's MTU):
/// only its first fragment carries the ports. The later fragments follow the first
/// fragment's translation, in both directions, and the first fragment's UDP checksum is
/// right for the whole datagram with its new addresses and ports.
#[test]
fn later_fragments_follow_their_first_fragments_translation_both_ways() {
    in_private_netns(|| {
        let mut dp = datapath_with(PROTO_UDP, LOCAL_ID);
        let request = Frame {
            id: 0x4242,
            payload: (0..100u8).collect(),
            ..Frame::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT)
        };
        let (first, later) = fragments_of(&request.bytes(), 48);
        let out_first = dp.ingress(&first);
        let out_later = dp.ingress(&later);
        assert_eq!((out_first.verdict, out_later.verdict), (TCX_NEXT, TCX_NEXT));
        assert_fragments(
            (&first, &later),
            (&out_first.packet, &out_later.packet),
            &request.with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT),
            "client -> NodePort, DNAT to the local pod",
        );

        let reply = Frame {
            id: 0x0707,
            payload: (0..200u8).rev().collect(),
            ..Frame::udp(LOCAL_POD, POD_PORT, CLIENT, CLIENT_PORT)
        };
        let (first, later) = fragments_of(&reply.bytes(), 96);
        let out_first = dp.egress(&first);
        let out_later = dp.egress(&later);
        assert_eq!((out_first.verdict, out_later.verdict), (TCX_NEXT, TCX_NEXT));
        assert_fragments(
            (&first, &later),
            (&out_first.packet, &out_later.packet),
            &reply.with_tuple(NODE, NODE_PORT, CLIENT, CLIENT_PORT),
            "the pod's reply, the frontend restored",
        );

        // A later fragment of another datagram (another IP id) finds no ports: untouched.
        let other = Frame {
            id: 0x4243,
            ..request.clone()
        };
        let (_, stray) = fragments_of(&other.bytes(), 48);
        let out = dp.ingress(&stray);
        assert_eq!(out.verdict, TCX_NEXT);
        assert!(out.packet == stray, "a stray later fragment changed");

        // Nor does a later fragment whose ports are known start a flow once the flow is
        // gone: it has no L4 header to translate.
        let (first, later) = fragments_of(&request.bytes(), 48);
        dp.ingress(&first);
        for (key, _) in dp.ct_entries() {
            dp.nat_ct.remove(&key).expect("deleting a flow entry");
        }
        let out = dp.ingress(&later);
        assert_eq!(out.verdict, TCX_NEXT);
        assert!(
            out.packet == later,
            "a later fragment without its flow changed"
        );
        assert!(
            dp.ct_entries().is_empty(),
            "a later fragment started a flow"
        );
    });
    // A datagram of the same client to a port of no Service, whose IP id comes round to
    // one translated before (ids count per address pair and wrap): its later fragment is
    // not given the old datagram's ports, and passes untouched with its first.
    in_private_netns(|| {
        let dp = datapath_with(PROTO_UDP, LOCAL_ID);
        let request = Frame {
            id: 0x4242,
            payload: (0..100u8).collect(),
            ..Frame::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT)
        };
        let (first, later) = fragments_of(&request.bytes(), 48);
        dp.ingress(&first);
        let out = dp.ingress(&later);
        assert!(
            out.packet != later,
            "the NodePort datagram's later fragment was translated (its ports remembered)"
        );
        let to_the_host = Frame {
            payload: (100..200u8).collect(),
            ..Frame::udp(CLIENT, CLIENT_PORT, NODE, 5353)
        };
        let to_the_host = Frame {
            id: 0x4242,
            ..to_the_host
        };
        let (first, later) = fragments_of(&to_the_host.bytes(), 48);
        for (fragment, which) in [(&first, "first"), (&later, "later")] {
            let out = dp.ingress(fragment);
            assert_eq!(out.verdict, TCX_NEXT, "{which}");
            assert!(
                out.packet == *fragment,
                "the {which} fragment of a datagram to the host changed"
            );
        }
    });
}

fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let csum = prog_test_run::checksum(0, &frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&csum.to_be_bytes());
}

#[test]
fn c12_local_policy_without_local_endpoints_drops() {
    in_private_netns(|| {
        let mut dp = Datapath::load();
        dp.frontend(node_port(PROTO_TCP, SVC_FLAG_DROP_EMPTY), &[]);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).bytes();
        let out = dp.ingress(&syn);
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert!(dp.ct_entries().is_empty());
    });
}

/// C06: nothing listens on the NodePort, so the kernel answers the packet it is handed with
/// a TCP RST / ICMP port unreachable; an address the node does not own is answered by the
/// program itself with ICMP port unreachable from that address, sent back where the packet
/// came from (kube-proxy's REJECT); a RST is never answered.
#[test]
fn c06_frontend_without_endpoints_is_refused() {
    in_private_netns(|| {
        let mut dp = Datapath::load();
        dp.snat(NODE, 61000, 65535);
        dp.frontend(node_port(PROTO_TCP, 0), &[]);
        let on_node_ip = Frontend {
            port: 80,
            flags: SVC_FLAG_EXTERNAL_IP,
            ..node_port(PROTO_TCP, 0)
        };
        dp.frontend(on_node_ip, &[]);
        let elsewhere = Frontend {
            addr: EXTERNAL_IP,
            port: 80,
            flags: SVC_FLAG_EXTERNAL_IP,
            ..node_port(PROTO_TCP, 0)
        };
        dp.frontend(elsewhere, &[]);

        for (what, frame) in [
            ("NodePort", Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT)),
            (
                "externalIP that is the node's address",
                Frame::tcp(CLIENT, CLIENT_PORT, NODE, 80),
            ),
            (
                "UDP NodePort without endpoints",
                Frame::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT),
            ),
        ] {
            if frame.proto == PROTO_UDP {
                dp.frontend(node_port(PROTO_UDP, 0), &[]);
            }
            let out = dp.ingress(&frame.bytes());
            assert_eq!(out.verdict, TCX_NEXT, "{what}");
            assert_eq!(out.packet, frame.bytes(), "{what}: passed on unchanged");
        }
        let udp_elsewhere = Frontend {
            proto: PROTO_UDP,
            ..elsewhere
        };
        dp.frontend(udp_elsewhere, &[]);
        for syn in [
            Frame::tcp(CLIENT, CLIENT_PORT, EXTERNAL_IP, 80),
            Frame {
                payload: Vec::new(),
                ..Frame::udp(CLIENT, CLIENT_PORT, EXTERNAL_IP, 80)
            },
        ] {
            let out = dp.ingress(&syn.bytes());
            assert_eq!(
                out.verdict, TC_ACT_REDIRECT,
                "an externalIP the node does not own, protocol {}",
                syn.proto
            );
            let want = answer_to(EXTERNAL_IP, CLIENT, (3, 3), [0; 4], &syn.bytes());
            assert!(
                out.packet == want,
                "port unreachable, protocol {}\n got:\n{}\nwant:\n{}",
                syn.proto,
                hex(&out.packet),
                hex(&want)
            );
            verify_icmp_checksums(&out.packet);
            // UDP: 0 in the unused field, which a fill turns into 0xffff.
            assert_checksum_fill_keeps(&out.packet);
        }
        let rst = Frame {
            tcp_flags: 0x04,
            ..Frame::tcp(CLIENT, CLIENT_PORT, EXTERNAL_IP, 80)
        };
        assert_eq!(
            dp.ingress(&rst.bytes()).verdict,
            TC_ACT_SHOT,
            "a RST is not answered"
        );
        assert!(dp.ct_entries().is_empty());
    });
}

/// C22: an LB IP with `loadBalancerSourceRanges` admits new flows from inside a range
/// (longest prefix within the frontend's own ranges) and drops the others untouched; the
/// ranges of another frontend do not count.
#[test]
fn c22_source_ranges_admit_clients_inside_and_drop_the_rest() {
    in_private_netns(|| {
        let mut dp = Datapath::load();
        dp.backend(LOCAL_ID, LOCAL_POD, POD_PORT, PROTO_TCP, BACKEND_FLAG_LOCAL);
        let lb = Frontend {
            addr: EXTERNAL_IP,
            port: 80,
            rev_nat_id: 9,
            flags: SVC_FLAG_LOAD_BALANCER | SVC_FLAG_SOURCE_RANGES,
            ..node_port(PROTO_TCP, 0)
        };
        dp.frontend(lb, &[LOCAL_ID]);
        dp.source_range(9, Ipv4Addr::new(198, 51, 100, 0), 28);
        dp.source_range(9, Ipv4Addr::new(10, 0, 0, 0), 8);
        // Another frontend's range: not this one's business.
        dp.source_range(7, Ipv4Addr::new(192, 0, 2, 0), 24);

        for (client, admitted) in [
            (CLIENT, true),                           // 198.51.100.7 in /28
            (Ipv4Addr::new(10, 9, 8, 7), true),       // in 10/8
            (Ipv4Addr::new(198, 51, 100, 77), false), // beyond the /28
            (Ipv4Addr::new(192, 0, 2, 50), false),    // only in frontend 7's range
            (Ipv4Addr::new(11, 0, 0, 1), false),
        ] {
            let frame = Frame::tcp(client, CLIENT_PORT, EXTERNAL_IP, 80);
            let out = dp.ingress(&frame.bytes());
            if admitted {
                assert_eq!(out.verdict, TCX_NEXT, "{client}");
                assert_eq!(
                    tuple_of(&out.packet).2,
                    LOCAL_POD,
                    "{client} reaches the backend"
                );
                verify_checksums(&out.packet);
            } else {
                assert_eq!(out.verdict, TC_ACT_SHOT, "{client} is outside every range");
                assert_eq!(out.packet, frame.bytes(), "{client}: dropped untouched");
            }
        }
        assert_eq!(
            dp.ct_entries().len(),
            4,
            "two admitted flows, two entries each"
        );
    });
}

/// A second local pod, backend 3 of [`sticky_node_port`].
const SECOND_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

/// A NodePort with ClientIP affinity (10800 s) over two local backends: `LOCAL_ID` and 3.
fn sticky_node_port() -> (Datapath, Frontend) {
    let mut dp = Datapath::load();
    dp.backend(LOCAL_ID, LOCAL_POD, POD_PORT, PROTO_TCP, BACKEND_FLAG_LOCAL);
    dp.backend(3, SECOND_LOCAL, POD_PORT, PROTO_TCP, BACKEND_FLAG_LOCAL);
    let sticky = Frontend {
        flags: SVC_FLAG_NODE_PORT | SVC_FLAG_AFFINITY,
        affinity_timeout: 10800,
        ..node_port(PROTO_TCP, 0)
    };
    dp.frontend(sticky, &[LOCAL_ID, 3]);
    (dp, sticky)
}

#[test]
fn c19_session_affinity_keeps_a_client_address_on_one_backend() {
    in_private_netns(|| {
        let (dp, _) = sticky_node_port();

        let backend_of = |client: Ipv4Addr, port: u16| {
            let out = dp.ingress(&Frame::tcp(client, port, NODE, NODE_PORT).bytes());
            assert_eq!(out.verdict, TCX_NEXT);
            tuple_of(&out.packet).2
        };
        let same_client: BTreeSet<Ipv4Addr> =
            (0..30).map(|i| backend_of(CLIENT, 41000 + i)).collect();
        assert_eq!(
            same_client.len(),
            1,
            "one client, one backend: {same_client:?}"
        );
        let many_clients: BTreeSet<Ipv4Addr> = (0..30)
            .map(|i| backend_of(Ipv4Addr::new(198, 51, 100, 100 + i), 42000))
            .collect();
        assert_eq!(
            many_clients.len(),
            2,
            "different clients spread over both backends"
        );
    });
}

/// ClientIP affinity belongs to the Service port, not to the address a client uses: a
/// client that reached a backend through the NodePort keeps it through the Service's LB IP
/// (the frontends share the affinity id the agent gives them), as kube-proxy's per-endpoint
/// `recent` lists do. Four backends and eight clients: a datapath that kept the frontends'
/// entries apart would match all eight by chance once in 65536 runs.
#[test]
fn affinity_is_shared_by_the_frontends_of_a_service_port() {
    in_private_netns(|| {
        let mut dp = Datapath::load();
        let pods: Vec<(u32, Ipv4Addr)> = (0..4)
            .map(|i| (10 + i, Ipv4Addr::new(10, 244, 1, 20 + i as u8)))
            .collect();
        for (id, addr) in &pods {
            dp.backend(*id, *addr, POD_PORT, PROTO_TCP, BACKEND_FLAG_LOCAL);
        }
        let ids: Vec<u32> = pods.iter().map(|(id, _)| *id).collect();
        let node_port = Frontend {
            flags: SVC_FLAG_NODE_PORT | SVC_FLAG_AFFINITY,
            affinity_timeout: 10800,
            affinity_id: 5,
            ..node_port(PROTO_TCP, 0)
        };
        let lb_ip = Frontend {
            addr: EXTERNAL_IP,
            port: 80,
            rev_nat_id: 8,
            flags: SVC_FLAG_LOAD_BALANCER | SVC_FLAG_AFFINITY,
            ..node_port
        };
        dp.frontend(node_port, &ids);
        dp.frontend(lb_ip, &ids);
        // Each frontend from a port of its own: two flows with one client port to one
        // local backend would share a reply tuple, and the second would be refused.
        let backend_of = |client: Ipv4Addr, frontend: &Frontend| {
            let port = 41000 + frontend.rev_nat_id;
            let syn = Frame::tcp(client, port, frontend.addr, frontend.port);
            let out = dp.ingress(&syn.bytes());
            assert_eq!(out.verdict, TCX_NEXT);
            tuple_of(&out.packet).2
        };
        let mut seen = BTreeSet::new();
        for i in 0..8 {
            let client = Ipv4Addr::new(198, 51, 100, 100 + i);
            let first = backend_of(client, &node_port);
            assert_eq!(
                backend_of(client, &lb_ip),
                first,
                "{client} went to {first} through the NodePort"
            );
            seen.insert(first);
        }
        assert!(seen.len() > 1, "the clients were spread: {seen:?}");
    });
}

/// A client's affinity entry is followed only while its backend is one of the frontend's
/// live backends: an entry the agent did not delete (a sync that failed half-way, a
/// restart in between) must not keep a client on a backend that left the Service, even
/// when that backend still exists for another Service.
#[test]
fn an_affinity_entry_whose_backend_left_the_frontend_is_not_followed() {
    in_private_netns(|| {
        let (mut dp, sticky) = sticky_node_port();
        let backend_of = |dp: &Datapath, port: u16| {
            let out = dp.ingress(&Frame::tcp(CLIENT, port, NODE, NODE_PORT).bytes());
            assert_eq!(out.verdict, TCX_NEXT);
            tuple_of(&out.packet).2
        };
        let first = backend_of(&dp, 41000);
        let (kept_id, kept) = if first == LOCAL_POD {
            (3, SECOND_LOCAL)
        } else {
            (LOCAL_ID, LOCAL_POD)
        };
        // The client's backend leaves the frontend (its backend entry stays), and nothing
        // deletes the client's affinity entry.
        dp.frontend(sticky, &[kept_id]);
        let after: BTreeSet<Ipv4Addr> = (1..=10).map(|i| backend_of(&dp, 41000 + i)).collect();
        assert_eq!(
            after,
            BTreeSet::from([kept]),
            "{first} left the frontend; the client must move to {kept}"
        );
    });
}

#[test]
fn snat_ports_never_collide_and_exhaustion_drops_only_the_new_flow() {
    in_private_netns(|| {
        let mut dp = datapath_with(PROTO_TCP, REMOTE_ID);
        // Two ports for everyone.
        dp.snat(NODE, 61000, 61001);
        let mut ports = BTreeSet::new();
        for client in [
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(198, 51, 100, 2),
        ] {
            let out = dp.ingress(&Frame::tcp(client, CLIENT_PORT, NODE, NODE_PORT).bytes());
            assert_eq!(out.verdict, TCX_NEXT);
            ports.insert(tuple_of(&out.packet).1);
        }
        assert_eq!(
            ports,
            BTreeSet::from([61000, 61001]),
            "two live flows to one backend never share a SNAT port"
        );
        let third = Frame::tcp(Ipv4Addr::new(198, 51, 100, 3), CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.ingress(&third.bytes());
        assert_eq!(
            out.verdict, TC_ACT_SHOT,
            "no free port: the new flow's packet is dropped"
        );
        // The established flows keep working.
        let again = Frame::tcp(Ipv4Addr::new(198, 51, 100, 1), CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.ingress(&again.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        assert_eq!(tuple_of(&out.packet).2, REMOTE_POD);
    });
}

/// SYNs from spoofed addresses, which the backend answers and no one acknowledges, hold
/// their SNAT ports for the SYN lifetime only, as Linux's conntrack keeps SYN_RECV entries
/// for 60 s: a SYN-ACK alone does not make the flow an established one (6 h).
#[test]
fn a_handshake_the_client_never_completes_frees_its_snat_port_after_the_syn_lifetime() {
    in_private_netns(|| {
        let mut dp = snat_datapath(PROTO_TCP, 61000, 61001);
        for client in [
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(198, 51, 100, 2),
        ] {
            let syn = Frame::tcp(client, CLIENT_PORT, NODE, NODE_PORT);
            let out = dp.ingress(&syn.bytes());
            assert_eq!(out.verdict, TCX_NEXT);
            let (_, port, _, _) = tuple_of(&out.packet);
            let syn_ack = syn.with_tuple(NODE, port, REMOTE_POD, POD_PORT).reply();
            assert_eq!(dp.ingress(&syn_ack.bytes()).verdict, TCX_NEXT);
        }
        let entries = dp.ct_entries();
        assert_eq!(entries.len(), 4, "{entries:?}");
        assert!(
            entries
                .iter()
                .all(|(_, v)| v.lifetime(PROTO_TCP) == CT_LIFETIME_TCP_SYN),
            "{entries:?}"
        );
        // Meanwhile they hold both ports: a third client's SYN finds none.
        let third = Frame::tcp(Ipv4Addr::new(198, 51, 100, 4), CLIENT_PORT, NODE, NODE_PORT);
        assert_eq!(dp.ingress(&third.bytes()).verdict, TC_ACT_SHOT);
        // A minute and a bit later, the half-open flows have expired: a new client gets a
        // port.
        for (key, mut value) in entries {
            value.last_seen -= CT_LIFETIME_TCP_SYN + 2;
            dp.nat_ct.insert(key, value, 0).expect("ageing an entry");
        }
        let newcomer = Frame::tcp(Ipv4Addr::new(198, 51, 100, 3), CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.ingress(&newcomer.bytes());
        assert_eq!(out.verdict, TCX_NEXT, "the newcomer's SYN is not dropped");
        assert_eq!(tuple_of(&out.packet).2, REMOTE_POD);
    });
}

#[test]
fn an_expired_flow_gives_its_snat_port_back() {
    in_private_netns(|| {
        let mut dp = snat_datapath(PROTO_UDP, 61000, 61000);
        // A UDP flow that held port 61000 and was last seen at boot.
        let (stale_key, stale) = snat_reply(PROTO_UDP, 61000, 0, 0);
        dp.nat_ct
            .insert(stale_key, stale, 0)
            .expect("writing a stale entry");

        let fresh = Frame::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.ingress(&fresh.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        assert_eq!(tuple_of(&out.packet), (NODE, 61000, REMOTE_POD, POD_PORT));
        let reply = dp
            .nat_ct
            .get(&stale_key, 0)
            .expect("the reply entry of the new flow");
        assert_eq!(
            reply.daddr,
            u32::from_ne_bytes(CLIENT.octets()),
            "the port now answers to the new client"
        );
    });
}

/// [`datapath_with`] to the remote pod, its SNAT ports `min..=max`, on a machine up long
/// enough for entries stamped at boot to have expired.
fn snat_datapath(proto: u8, min: u16, max: u16) -> Datapath {
    let mut dp = datapath_with(proto, REMOTE_ID);
    dp.snat(NODE, min, max);
    assert!(
        conntrack_gc::now_secs() > 120,
        "the test needs a machine up for more than two minutes"
    );
    dp
}

/// The reply entry of another client's source-NATed flow to the remote pod on SNAT port
/// `port`, with `flags` besides reply and SNAT, last seen at `last_seen`.
fn snat_reply(proto: u8, port: u16, flags: u16, last_seen: u32) -> (NatCtKey, NatCtValue) {
    let key = ct_key(REMOTE_POD, POD_PORT, NODE, port, proto, CT_DIR_IN);
    let value = NatCtValue {
        saddr: u32::from_ne_bytes(NODE.octets()),
        daddr: u32::from_ne_bytes(Ipv4Addr::new(198, 51, 100, 50).octets()),
        sport: NODE_PORT.to_be(),
        dport: 1234u16.to_be(),
        backend_id: REMOTE_ID,
        rev_nat_id: 7,
        flags: CT_FLAG_REPLY | CT_FLAG_SNAT | flags,
        last_seen,
    };
    (key, value)
}

/// A TCP flow's [`snat_reply`] that the backend closed first, last seen `age` seconds ago.
fn closed_snat_reply(port: u16, age: u32) -> (NatCtKey, NatCtValue) {
    snat_reply(
        PROTO_TCP,
        port,
        CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING | CT_FLAG_FIN_BACKEND_FIRST,
        conntrack_gc::now_secs() - age,
    )
}

/// A backend that closed a connection first holds it in TIME_WAIT for 60 s, and a new flow
/// given its port then has its SYN turned away (PAWS) and waits a retransmission timeout:
/// such a port is given out only when no try finds a free one (the one closed longest ago),
/// and never within 10 s of the close. A connection the client closed first leaves no
/// TIME_WAIT at the backend: its port is free 10 s after the close.
#[test]
fn a_closed_source_nated_flows_port_waits_out_the_backends_time_wait() {
    in_private_netns(|| {
        let mut dp = snat_datapath(PROTO_TCP, 61000, 61001);
        let (closed_key, closed) = closed_snat_reply(61000, 30);
        dp.nat_ct
            .insert(closed_key, closed, 0)
            .expect("writing a closed flow's entry");
        let syn = |client: Ipv4Addr| Frame::tcp(client, CLIENT_PORT, NODE, NODE_PORT).bytes();

        // 61001 is free: taken, whichever of the two ports the search starts at.
        let out = dp.ingress(&syn(CLIENT));
        assert_eq!(out.verdict, TCX_NEXT);
        assert_eq!(
            tuple_of(&out.packet),
            (NODE, 61001, REMOTE_POD, POD_PORT),
            "the free port, not the one closed 30 s ago"
        );
        assert_eq!(
            dp.nat_ct.get(&closed_key, 0).ok(),
            Some(closed),
            "the closed flow keeps its entry"
        );

        // Now only the closed flow's port is left: taken, as no port is free.
        let second = Ipv4Addr::new(198, 51, 100, 8);
        let out = dp.ingress(&syn(second));
        assert_eq!(out.verdict, TCX_NEXT);
        assert_eq!(tuple_of(&out.packet), (NODE, 61000, REMOTE_POD, POD_PORT));
        let reply = dp
            .nat_ct
            .get(&closed_key, 0)
            .expect("the new flow's reply entry");
        assert_eq!(reply.daddr, u32::from_ne_bytes(second.octets()));

        // Of two such ports, the one closed longer ago (the tries meet both).
        let (_, out) = syn_among(
            61001,
            &[closed_snat_reply(61000, 20), closed_snat_reply(61001, 50)],
        );
        assert_eq!(out.verdict, TCX_NEXT);
        assert_eq!(tuple_of(&out.packet), (NODE, 61001, REMOTE_POD, POD_PORT));

        // Closed by the client first 20 s ago: free, where the backend's TIME_WAIT would
        // make the port closed 50 s ago by the backend the one to take.
        let client_closed = snat_reply(
            PROTO_TCP,
            61000,
            CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING,
            conntrack_gc::now_secs() - 20,
        );
        let (_, out) = syn_among(61001, &[client_closed, closed_snat_reply(61001, 50)]);
        assert_eq!(out.verdict, TCX_NEXT);
        assert_eq!(tuple_of(&out.packet), (NODE, 61000, REMOTE_POD, POD_PORT));

        // A flow closed 5 s ago keeps its port even then.
        let (recent_key, recent) = closed_snat_reply(61000, 5);
        let (dp, out) = syn_among(61000, &[(recent_key, recent)]);
        assert_eq!(
            out.verdict, TC_ACT_SHOT,
            "no port: the new flow's SYN is dropped"
        );
        assert_eq!(dp.nat_ct.get(&recent_key, 0).ok(), Some(recent));
    });
}

/// The client's FIN of a source-NATed flow its backend closed first leaves the record of
/// what the backend's TIME_WAIT socket remembers (the sequence number after the FIN, its
/// timestamp) under the flow's reply tuple; a client's FIN before the backend's leaves none
/// (the backend holds no TIME_WAIT then).
#[test]
fn the_clients_last_fin_is_recorded_for_the_backends_time_wait() {
    in_private_netns(|| {
        let dp = snat_datapath(PROTO_TCP, 61000, 61000);
        let syn = Frame {
            tcp_options: syn_options(7),
            payload: Vec::new(),
            ..Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT)
        };
        assert_eq!(dp.ingress(&syn.bytes()).verdict, TCX_NEXT);
        let reply_key = ct_key(REMOTE_POD, POD_PORT, NODE, 61000, PROTO_TCP, CT_DIR_IN);
        let from_backend = Frame::tcp(REMOTE_POD, POD_PORT, NODE, 61000);
        dp.ingress(
            &Frame {
                tcp_flags: TCP_FIN | TCP_ACK,
                ..from_backend.clone()
            }
            .bytes(),
        );
        assert!(
            dp.snat_time_wait.get(&reply_key, 0).is_err(),
            "the backend's FIN alone records nothing"
        );
        // The client's FIN, with 16 bytes of data before it, and its timestamp.
        let fin = Frame {
            tcp_flags: TCP_FIN | TCP_ACK,
            seq: 5000,
            tcp_options: segment_options(900),
            payload: vec![b'x'; 16],
            ..syn.clone()
        };
        assert_eq!(dp.ingress(&fin.bytes()).verdict, TCX_NEXT);
        assert_eq!(
            dp.snat_time_wait.get(&reply_key, 0).ok(),
            Some(SnatTimeWait {
                client_addr: u32::from_ne_bytes(CLIENT.octets()),
                client_port: CLIENT_PORT.to_be(),
                flags: TIME_WAIT_FLAG_TIMESTAMP,
                next_seq: 5000 + 16 + 1,
                tsval: 900,
            })
        );
        // Sent again (the backend's ACK was lost): the record follows, a segment without
        // timestamps records none.
        let again = Frame {
            tcp_options: Vec::new(),
            payload: Vec::new(),
            ..fin.clone()
        };
        dp.ingress(&again.bytes());
        let record = dp.snat_time_wait.get(&reply_key, 0).expect("the record");
        assert_eq!((record.flags, record.next_seq), (0, 5001));
    });
    in_private_netns(|| {
        let dp = snat_datapath(PROTO_TCP, 61000, 61000);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        dp.ingress(&syn.bytes());
        dp.ingress(
            &Frame {
                tcp_flags: TCP_FIN | TCP_ACK,
                tcp_options: segment_options(900),
                ..syn.clone()
            }
            .bytes(),
        );
        dp.ingress(
            &Frame {
                tcp_flags: TCP_FIN | TCP_ACK,
                ..Frame::tcp(REMOTE_POD, POD_PORT, NODE, 61000)
            }
            .bytes(),
        );
        let reply_key = ct_key(REMOTE_POD, POD_PORT, NODE, 61000, PROTO_TCP, CT_DIR_IN);
        assert!(
            dp.snat_time_wait.get(&reply_key, 0).is_err(),
            "closed by the client first: no record"
        );
    });
}

/// A port whose backend still holds its last connection in TIME_WAIT goes to a new flow's
/// SYN before the 10 s a closed port otherwise waits, when the record of that socket says
/// it takes the SYN: a newer timestamp, or without timestamps a sequence number past the
/// old connection's. A record that says the socket turns the SYN away keeps the port from
/// it even when no other port is left; a record of another client is not used. A port
/// whose connection both sides closed without the backend's TIME_WAIT goes after two
/// seconds; one reset, when its flow expires.
#[test]
fn a_port_in_the_backends_time_wait_goes_to_a_syn_it_takes() {
    let record = |flags, next_seq, tsval| SnatTimeWait {
        client_addr: u32::from_ne_bytes(Ipv4Addr::new(198, 51, 100, 50).octets()),
        client_port: 1234u16.to_be(),
        flags,
        next_seq,
        tsval,
    };
    // (closed how long ago, the record, the SYN's sequence number and options, taken?)
    type Case = (u32, Option<SnatTimeWait>, u32, Vec<u8>, bool);
    let cases: [Case; 7] = [
        (
            5,
            Some(record(TIME_WAIT_FLAG_TIMESTAMP, 5000, 1000)),
            10,
            syn_options(1001),
            true,
        ),
        (
            5,
            Some(record(TIME_WAIT_FLAG_TIMESTAMP, 5000, 1000)),
            9000,
            syn_options(999),
            false,
        ),
        (5, Some(record(0, 5000, 0)), 5001, Vec::new(), true),
        (5, Some(record(0, 5000, 0)), 4999, syn_options(1), false),
        (5, None, 9000, syn_options(2000), false),
        // Closed 30 s ago: given out without a record (the existing fallback), not with
        // one that says the SYN is turned away.
        (30, None, 10, syn_options(999), true),
        (
            30,
            Some(record(TIME_WAIT_FLAG_TIMESTAMP, 5000, 1000)),
            10,
            syn_options(999),
            false,
        ),
    ];
    for (i, (age, record, seq, options, taken)) in cases.into_iter().enumerate() {
        in_private_netns(move || {
            let mut dp = snat_datapath(PROTO_TCP, 61000, 61000);
            let (closed_key, closed) = closed_snat_reply(61000, age);
            dp.nat_ct
                .insert(closed_key, closed, 0)
                .expect("writing a closed flow's entry");
            if let Some(record) = record {
                dp.snat_time_wait
                    .insert(closed_key, record, 0)
                    .expect("writing the TIME_WAIT record");
            }
            let syn = Frame {
                seq,
                tcp_options: options,
                payload: Vec::new(),
                ..Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT)
            };
            let out = dp.ingress(&syn.bytes());
            if taken {
                assert_eq!(out.verdict, TCX_NEXT, "case {i}");
                assert_eq!(
                    tuple_of(&out.packet),
                    (NODE, 61000, REMOTE_POD, POD_PORT),
                    "case {i}"
                );
                let reply = dp.nat_ct.get(&closed_key, 0).expect("the reply entry");
                assert_eq!(reply.daddr, u32::from_ne_bytes(CLIENT.octets()), "case {i}");
            } else {
                assert_eq!(out.verdict, TC_ACT_SHOT, "case {i}: no port for the SYN");
                assert_eq!(dp.nat_ct.get(&closed_key, 0).ok(), Some(closed), "case {i}");
            }
        });
    }
    // Closed without the backend's TIME_WAIT by both FINs, the client's first: the
    // backend holds nothing a SYN could meet, and the port goes again once the close is
    // two seconds of the clock old, before the 10 s its entries live. Closed by a RST,
    // whose sequence number nothing checked (a forged one the peers ignored leaves the
    // connection alive): only once its entries expired.
    let fins = CT_FLAG_FIN_CLIENT | CT_FLAG_FIN_BACKEND;
    for (how, flags, age, taken) in [
        ("both FINs", fins, 2, true),
        // (Ages two seconds off any threshold: the program reads its clock after the
        // test, and a second may tick between.)
        ("both FINs", fins, 0, false),
        ("a RST", 0, 2, false),
        ("a RST", 0, CT_LIFETIME_CLOSING - 2, false),
        ("a RST", 0, CT_LIFETIME_CLOSING + 2, true),
    ] {
        in_private_netns(move || {
            let mut dp = snat_datapath(PROTO_TCP, 61000, 61000);
            let (key, closed) = snat_reply(
                PROTO_TCP,
                61000,
                CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING | flags,
                conntrack_gc::now_secs() - age,
            );
            dp.nat_ct.insert(key, closed, 0).expect("writing");
            let out = dp.ingress(&Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).bytes());
            let want = if taken { TCX_NEXT } else { TC_ACT_SHOT };
            assert_eq!(out.verdict, want, "closed by {how} {age} s ago");
        });
    }
    // A record of another client on that port is not this flow's.
    in_private_netns(|| {
        let mut dp = snat_datapath(PROTO_TCP, 61000, 61000);
        let (closed_key, closed) = closed_snat_reply(61000, 5);
        dp.nat_ct.insert(closed_key, closed, 0).expect("writing");
        let stranger = SnatTimeWait {
            client_addr: u32::from_ne_bytes(CLIENT.octets()),
            client_port: CLIENT_PORT.to_be(),
            flags: 0,
            next_seq: 0,
            tsval: 0,
        };
        dp.snat_time_wait
            .insert(closed_key, stranger, 0)
            .expect("writing the record");
        let syn = Frame {
            seq: 10,
            payload: Vec::new(),
            ..Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT)
        };
        assert_eq!(dp.ingress(&syn.bytes()).verdict, TC_ACT_SHOT);
    });
}

/// A SYN from `CLIENT` to the remote NodePort, with SNAT ports 61000..=`last` and `entries`
/// in the conntrack map first; the datapath too, for what a test checks after.
fn syn_among(last: u16, entries: &[(NatCtKey, NatCtValue)]) -> (Datapath, Outcome) {
    let mut dp = snat_datapath(PROTO_TCP, 61000, last);
    for (key, value) in entries {
        dp.nat_ct
            .insert(key, value, 0)
            .expect("writing a flow's entry");
    }
    let out = dp.ingress(&Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).bytes());
    (dp, out)
}

/// A destination's SNAT ports come round again only after the whole range: each new flow
/// to it takes the port after the previous flow's, past any a live flow holds, so a port's
/// last connection has had as long as the range allows to leave the backend's TIME_WAIT.
/// Given out at random, ports come back much sooner (and this order has a chance of 8^-19).
#[test]
fn a_destinations_snat_ports_come_round_again_only_after_the_whole_range() {
    in_private_netns(|| {
        let mut dp = snat_datapath(PROTO_UDP, 61000, 61007);
        let next = |port: u16| if port == 61007 { 61000 } else { port + 1 };
        let mut ports = Vec::new();
        let mut held = None;
        for i in 0..20u8 {
            let client = Ipv4Addr::new(198, 51, 100, 1 + i);
            let out = dp.ingress(&Frame::udp(client, CLIENT_PORT, NODE, NODE_PORT).bytes());
            assert_eq!(out.verdict, TCX_NEXT);
            let port = tuple_of(&out.packet).1;
            ports.push(port);
            // The flow ends at once (its reply entry expired): its port is free again, and
            // only the order of the search decides.
            let key = ct_key(REMOTE_POD, POD_PORT, NODE, port, PROTO_UDP, CT_DIR_IN);
            let mut reply = dp.nat_ct.get(&key, 0).expect("the flow's reply entry");
            reply.last_seen = 0;
            dp.nat_ct
                .insert(key, reply, 0)
                .expect("expiring the flow's reply entry");
            // Then a live flow holds the port after the next one: skipped from then on.
            if i == 9 {
                let (key, value) =
                    snat_reply(PROTO_UDP, next(next(port)), 0, conntrack_gc::now_secs());
                dp.nat_ct
                    .insert(key, value, 0)
                    .expect("writing a live flow's entry");
                held = Some(next(next(port)));
            }
        }
        let mut expected = vec![ports[0]];
        for i in 1..ports.len() {
            let mut port = next(expected[i - 1]);
            if i >= 10 && Some(port) == held {
                port = next(port);
            }
            expected.push(port);
        }
        assert_eq!(
            ports, expected,
            "consecutive ports, the one a live flow holds (from the 11th flow on) skipped"
        );
    });
}

/// A UDP flow whose backend left goes on to a live one (kube-proxy deletes a removed
/// endpoint's UDP conntrack entries, and the next datagram is balanced again). A TCP
/// segment of such a flow is no connection's first: at a NodePort it goes on untouched.
#[test]
fn a_flow_whose_backend_left_is_balanced_again() {
    in_private_netns(|| {
        let mut dp = datapath_with(PROTO_UDP, LOCAL_ID);
        let query = Frame::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        assert_eq!(tuple_of(&dp.ingress(&query.bytes()).packet).2, LOCAL_POD);

        // The agent replaces the backend (slots first, then the backend goes).
        let replacement = Ipv4Addr::new(10, 244, 1, 12);
        dp.backend(4, replacement, POD_PORT, PROTO_UDP, BACKEND_FLAG_LOCAL);
        dp.frontend(node_port(PROTO_UDP, 0), &[4]);
        dp.remove_backend(LOCAL_ID);

        let out = dp.ingress(&query.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        assert_frame(
            &out.packet,
            &query.with_tuple(CLIENT, CLIENT_PORT, replacement, POD_PORT),
            "the flow moves to the live backend",
        );
    });
}

/// Both entries of a flow record that the backend answered and each side's FIN; the flow
/// is closing (`CT_LIFETIME_CLOSING`) once both sides sent a FIN, or at a RST. One FIN is a
/// half-close: the other side may still send for as long as it needs.
#[test]
fn conntrack_records_replies_each_sides_fin_and_closing_on_both_entries() {
    in_private_netns(|| {
        let dp = datapath_with(PROTO_TCP, LOCAL_ID);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        dp.ingress(&syn.bytes());
        let flags = || -> Vec<u16> {
            let mut f: Vec<u16> = dp.ct_entries().iter().map(|(_, v)| v.flags).collect();
            f.sort();
            f
        };
        assert_eq!(flags(), [0, CT_FLAG_REPLY], "a new flow");

        let reply = syn
            .with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT)
            .reply();
        dp.egress(&reply.bytes());
        // The backend's SYN-ACK does not end the handshake (a spoofed client's SYN is
        // answered too, and never acknowledged): the flow keeps its SYN lifetime.
        let all = flags();
        assert!(
            all.contains(&(CT_FLAG_REPLY | CT_FLAG_BACKEND_SYN)),
            "{all:?}"
        );
        assert!(
            all.iter().all(|f| f & CT_FLAG_SEEN_REPLY == 0),
            "a SYN-ACK alone establishes nothing: {all:?}"
        );
        // The client's ACK does, on both entries (a flag that changes refreshes the
        // partner at once).
        let ack = Frame {
            tcp_flags: TCP_ACK,
            ..syn.clone()
        };
        dp.ingress(&ack.bytes());
        let all = flags();
        assert!(
            all.len() == 2 && all.iter().all(|f| f & CT_FLAG_SEEN_REPLY != 0),
            "established at the client's ACK: {all:?}"
        );
        assert!(
            dp.ct_entries()
                .iter()
                .all(|(_, v)| v.lifetime(PROTO_TCP) == CT_LIFETIME_TCP),
            "{all:?}"
        );

        let fin = Frame {
            tcp_flags: TCP_FIN | TCP_ACK,
            ..syn.clone()
        };
        dp.ingress(&fin.bytes());
        let all = flags();
        assert!(
            all.iter()
                .all(|f| f & CT_FLAG_FIN_CLIENT != 0 && f & CT_FLAG_CLOSING == 0),
            "the client's FIN is on both entries, and the flow is only half-closed: {all:?}"
        );

        let backend_fin = Frame {
            tcp_flags: TCP_FIN | TCP_ACK,
            ..reply.clone()
        };
        dp.egress(&backend_fin.bytes());
        let all = flags();
        let closed = CT_FLAG_FIN_CLIENT | CT_FLAG_FIN_BACKEND | CT_FLAG_CLOSING;
        assert!(
            all.iter()
                .all(|f| f & closed == closed && f & CT_FLAG_FIN_BACKEND_FIRST == 0),
            "both FINs, the client's first: both entries closing: {all:?}"
        );
    });
    in_private_netns(|| {
        let dp = datapath_with(PROTO_TCP, LOCAL_ID);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        dp.ingress(&syn.bytes());
        let reply = syn
            .with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT)
            .reply();
        dp.egress(&reply.bytes());
        let fin = TCP_FIN | TCP_ACK;
        dp.egress(
            &Frame {
                tcp_flags: fin,
                ..reply
            }
            .bytes(),
        );
        dp.ingress(
            &Frame {
                tcp_flags: fin,
                ..syn
            }
            .bytes(),
        );
        let all: Vec<u16> = dp.ct_entries().iter().map(|(_, v)| v.flags).collect();
        let closed =
            CT_FLAG_FIN_CLIENT | CT_FLAG_FIN_BACKEND | CT_FLAG_FIN_BACKEND_FIRST | CT_FLAG_CLOSING;
        assert!(
            all.len() == 2 && all.iter().all(|f| f & closed == closed),
            "both FINs, the backend's first: recorded on both entries: {all:?}"
        );
    });
    in_private_netns(|| {
        let dp = datapath_with(PROTO_TCP, LOCAL_ID);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        dp.ingress(&syn.bytes());
        let rst = Frame {
            tcp_flags: TCP_RST,
            ..syn.clone()
        };
        dp.ingress(&rst.bytes());
        let all: Vec<u16> = dp.ct_entries().iter().map(|(_, v)| v.flags).collect();
        assert!(
            all.len() == 2 && all.iter().all(|f| f & CT_FLAG_CLOSING != 0),
            "a RST closes the flow at once, on both entries: {all:?}"
        );
    });
}

/// A SYN on the tuple of a closed flow (the client reused its port within the closing
/// lifetime) opens a new connection: a new flow, balanced and tracked afresh, as the
/// kernel's conntrack kills a closed entry at a new SYN and kube-proxy's NAT rules run
/// again. Kept, the closing flags would give the new connection 10 s of idleness before it
/// is re-balanced (and reset) mid-stream. A SYN on a live flow is followed as before.
#[test]
fn a_syn_on_a_closed_flows_tuple_starts_a_new_flow() {
    // A local backend: the new flow's entries replace the closed ones under the same keys.
    in_private_netns(|| {
        let dp = datapath_with(PROTO_TCP, LOCAL_ID);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let flags = || -> Vec<u16> {
            let mut f: Vec<u16> = dp.ct_entries().iter().map(|(_, v)| v.flags).collect();
            f.sort();
            f
        };
        dp.ingress(&syn.bytes());
        let reply = syn
            .with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT)
            .reply();
        dp.egress(&reply.bytes());
        // A retransmitted SYN of the live flow stays on it.
        dp.ingress(&syn.bytes());
        assert!(
            flags().contains(&(CT_FLAG_REPLY | CT_FLAG_BACKEND_SYN)),
            "the flow is still the answered one: {:?}",
            flags()
        );
        for (frame, to_backend) in [(&syn, true), (&reply, false)] {
            let fin = Frame {
                tcp_flags: TCP_FIN | TCP_ACK,
                ..frame.clone()
            };
            if to_backend {
                dp.ingress(&fin.bytes());
            } else {
                dp.egress(&fin.bytes());
            }
        }
        assert!(
            flags().iter().all(|f| f & CT_FLAG_CLOSING != 0),
            "closed: {:?}",
            flags()
        );

        let out = dp.ingress(&syn.bytes());
        assert_frame(
            &out.packet,
            &syn.with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT),
            "the new connection's SYN",
        );
        assert_eq!(
            flags(),
            [0, CT_FLAG_REPLY],
            "a new flow, without the closed one's flags"
        );
    });
    // A remote backend: the new flow takes a new SNAT port; the closed flow's reply entry
    // keeps the old one until it expires.
    in_private_netns(|| {
        let dp = datapath_with(PROTO_TCP, REMOTE_ID);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let (_, old_port, _, _) = tuple_of(&dp.ingress(&syn.bytes()).packet);
        let rst = Frame {
            tcp_flags: TCP_RST,
            ..syn.clone()
        };
        dp.ingress(&rst.bytes());

        let (saddr, new_port, daddr, _) = tuple_of(&dp.ingress(&syn.bytes()).packet);
        assert_eq!((saddr, daddr), (NODE, REMOTE_POD));
        assert_ne!(new_port, old_port, "the closed flow's port is still held");
        let entries = dp.ct_entries();
        assert_eq!(entries.len(), 3, "{entries:?}");
        let forward = ct_key(CLIENT, CLIENT_PORT, NODE, NODE_PORT, PROTO_TCP, CT_DIR_IN);
        let get = |k: &NatCtKey| {
            entries
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("no entry {k:?} in {entries:?}"))
        };
        let fresh = get(&forward);
        assert_eq!(
            (fresh.flags, u16::from_be(fresh.sport)),
            (CT_FLAG_SNAT, new_port),
            "the client's tuple now names the new flow"
        );
        let old_reply = ct_key(REMOTE_POD, POD_PORT, NODE, old_port, PROTO_TCP, CT_DIR_IN);
        let new_reply = ct_key(REMOTE_POD, POD_PORT, NODE, new_port, PROTO_TCP, CT_DIR_IN);
        assert_ne!(get(&old_reply).flags & CT_FLAG_CLOSING, 0);
        assert_eq!(get(&new_reply).flags, CT_FLAG_SNAT | CT_FLAG_REPLY);
    });
}

/// Two flows from one client address and port to one local backend through two frontends
/// (the NodePort and an LB IP) would share the reply tuple (backend -> client). The live
/// flow keeps it and the newcomer gets another source port, as the kernel's conntrack gives
/// a clashing flow (its null binding picks a free port); replaced, the first flow's replies
/// would leave with the LB IP as source. Each flow's replies go back to the client's own
/// port from its own frontend.
#[test]
fn a_reply_tuple_held_by_a_live_flow_gives_a_newcomer_another_source_port() {
    in_private_netns(|| {
        let mut dp = datapath_with(PROTO_TCP, LOCAL_ID);
        let lb_ip = Frontend {
            addr: EXTERNAL_IP,
            port: 80,
            rev_nat_id: 8,
            flags: SVC_FLAG_LOAD_BALANCER,
            ..node_port(PROTO_TCP, 0)
        };
        dp.frontend(lb_ip, &[LOCAL_ID]);
        let to_node_port = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let to_lb_ip = Frame::tcp(CLIENT, CLIENT_PORT, EXTERNAL_IP, 80);
        let reply_to = |port: u16| {
            let reply = to_node_port
                .with_tuple(CLIENT, port, LOCAL_POD, POD_PORT)
                .reply();
            let out = dp.egress(&reply.bytes());
            assert_eq!(out.verdict, TCX_NEXT);
            let (saddr, sport, _, _) = tuple_of(&out.packet);
            assert_frame(
                &out.packet,
                &reply.with_tuple(saddr, sport, CLIENT, CLIENT_PORT),
                "a reply, back to the client's own port",
            );
            (saddr, sport)
        };

        let out = dp.ingress(&to_node_port.bytes());
        assert_frame(
            &out.packet,
            &to_node_port.with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT),
            "the first flow keeps the client's port",
        );
        let out = dp.ingress(&to_lb_ip.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        let (saddr, port, daddr, dport) = tuple_of(&out.packet);
        assert_eq!((saddr, daddr, dport), (CLIENT, LOCAL_POD, POD_PORT));
        assert!(
            (61000..=65535).contains(&port),
            "the second flow's source port {port}: not the client's, one of the SNAT range"
        );
        assert_frame(
            &out.packet,
            &to_lb_ip.with_tuple(CLIENT, port, LOCAL_POD, POD_PORT),
            "the second flow, DNATed from another source port",
        );
        assert_eq!(dp.ct_entries().len(), 4, "{:?}", dp.ct_entries());
        assert_eq!(
            reply_to(CLIENT_PORT),
            (NODE, NODE_PORT),
            "the first flow's replies"
        );
        assert_eq!(
            reply_to(port),
            (EXTERNAL_IP, 80),
            "the second flow's replies"
        );

        // The second flow's next packets follow it.
        let ack = Frame {
            tcp_flags: TCP_ACK,
            ..to_lb_ip.clone()
        };
        let out = dp.ingress(&ack.bytes());
        assert_eq!(tuple_of(&out.packet), (CLIENT, port, LOCAL_POD, POD_PORT));

        // A flow that really comes from the port the second one was given, through the
        // same frontend, is another flow: it gets a port of its own, and the second flow's
        // replies still go to the client's original port.
        let from_that_port = Frame::tcp(CLIENT, port, EXTERNAL_IP, 80);
        let (_, third, _, _) = tuple_of(&dp.ingress(&from_that_port.bytes()).packet);
        assert!(third != port && third != CLIENT_PORT, "{third}");
        assert_eq!(
            reply_to(port),
            (EXTERNAL_IP, 80),
            "the second flow's replies"
        );

        // The first flow's entry evicted, its reply entry left: its next segment is no
        // connection's first and goes on untouched (at a NodePort only a SYN starts a
        // flow); a SYN from that port tracks it anew under the client's own port, which its
        // own reply entry holds.
        let first = ct_key(CLIENT, CLIENT_PORT, NODE, NODE_PORT, PROTO_TCP, CT_DIR_IN);
        dp.nat_ct
            .remove(&first)
            .expect("evicting the first flow's entry");
        let ack = Frame {
            tcp_flags: TCP_ACK,
            ..to_node_port.clone()
        };
        let out = dp.ingress(&ack.bytes());
        assert_eq!((out.verdict, out.packet), (TCX_NEXT, ack.bytes()));
        let out = dp.ingress(&to_node_port.bytes());
        assert_eq!(
            tuple_of(&out.packet),
            (CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT)
        );
    });
}

/// The agent's conntrack collector (`conntrack_gc`) against entries the programs wrote:
/// both read one clock, and a pass deletes exactly the entries the programs would no longer
/// follow (`NatCtValue::expired`), leaving live flows, idle established ones included.
#[test]
fn the_conntrack_collector_deletes_the_entries_of_ended_flows_only() {
    in_private_netns(|| {
        let mut dp = datapath_with(PROTO_TCP, LOCAL_ID);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        dp.ingress(&syn.bytes());
        let now = conntrack_gc::now_secs();
        let live: HashSet<NatCtKey> = dp.ct_entries().iter().map(|(k, _)| *k).collect();
        assert_eq!(live.len(), 2, "a flow's two entries");
        for (key, value) in dp.ct_entries() {
            assert!(
                now.wrapping_sub(value.last_seen) <= 1,
                "{key:?} stamped {} by the program, {now} by the collector's clock",
                value.last_seen
            );
        }
        let client = |i: u8| Ipv4Addr::new(198, 51, 100, 100 + i);
        let entry = |flags, idle: u32| NatCtValue {
            saddr: u32::from_ne_bytes(NODE.octets()),
            daddr: u32::from_ne_bytes(LOCAL_POD.octets()),
            sport: NODE_PORT.to_be(),
            dport: POD_PORT.to_be(),
            backend_id: LOCAL_ID,
            rev_nat_id: 7,
            flags,
            // Seconds wrap (u32), in the programs and the collector alike: a machine up for
            // less than `idle` still has entries that old.
            last_seen: now.wrapping_sub(idle),
        };
        let others = [
            // (protocol, entry, deleted by the pass)
            (PROTO_UDP, entry(0, CT_LIFETIME_NONTCP + 1), true),
            (PROTO_UDP, entry(0, CT_LIFETIME_NONTCP - 5), false),
            (
                PROTO_TCP,
                entry(
                    CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING,
                    CT_LIFETIME_CLOSING + 1,
                ),
                true,
            ),
            (PROTO_TCP, entry(0, CT_LIFETIME_TCP_SYN + 1), true),
            // Source-NATed and closed by the backend first: kept through the backend's
            // TIME_WAIT.
            (
                PROTO_TCP,
                entry(
                    CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING | CT_FLAG_SNAT | CT_FLAG_FIN_BACKEND_FIRST,
                    CT_LIFETIME_CLOSING + 1,
                ),
                false,
            ),
            (
                PROTO_TCP,
                entry(
                    CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING | CT_FLAG_SNAT | CT_FLAG_FIN_BACKEND_FIRST,
                    CT_LIFETIME_SNAT_CLOSING + 1,
                ),
                true,
            ),
            // Closed by the client first: no TIME_WAIT at the backend.
            (
                PROTO_TCP,
                entry(
                    CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING | CT_FLAG_SNAT,
                    CT_LIFETIME_CLOSING + 1,
                ),
                true,
            ),
            // Established and quiet for an hour: alive.
            (PROTO_TCP, entry(CT_FLAG_SEEN_REPLY, 3600), false),
            (
                PROTO_TCP,
                entry(CT_FLAG_SEEN_REPLY, CT_LIFETIME_TCP + 1),
                true,
            ),
        ];
        let mut kept = live.clone();
        for (i, (proto, value, deleted)) in others.iter().enumerate() {
            let key = ct_key(
                client(i as u8),
                CLIENT_PORT,
                NODE,
                NODE_PORT,
                *proto,
                CT_DIR_IN,
            );
            dp.nat_ct.insert(key, *value, 0).expect("writing an entry");
            if !deleted {
                kept.insert(key);
            }
        }

        let mut conntrack =
            dataplane::Conntrack::duplicate(dp.nat_ct.map()).expect("a handle on the map");
        let collected = conntrack_gc::collect(&mut conntrack, now).expect("a collector pass");
        let left: HashSet<NatCtKey> = dp.ct_entries().iter().map(|(k, _)| *k).collect();
        assert_eq!(left, kept);
        assert_eq!(
            collected,
            conntrack_gc::Collected {
                seen: 11,
                deleted: 6
            }
        );
        // The live flow still translates.
        let ack = Frame {
            tcp_flags: TCP_ACK,
            ..syn.clone()
        };
        assert_frame(
            &dp.ingress(&ack.bytes()).packet,
            &ack.with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT),
            "the live flow after a pass",
        );
    });
}

/// The original-direction entry of a UDP flow from `client` to the NodePort, to the local
/// pod, last seen at `last_seen`.
fn udp_flow_to_local_pod(client: Ipv4Addr, last_seen: u32) -> (NatCtKey, NatCtValue) {
    let key = ct_key(client, CLIENT_PORT, NODE, NODE_PORT, PROTO_UDP, CT_DIR_IN);
    let value = NatCtValue {
        saddr: u32::from_ne_bytes(client.octets()),
        daddr: u32::from_ne_bytes(LOCAL_POD.octets()),
        sport: CLIENT_PORT.to_be(),
        dport: POD_PORT.to_be(),
        backend_id: LOCAL_ID,
        rev_nat_id: 7,
        flags: 0,
        last_seen,
    };
    (key, value)
}

/// An entry a packet refreshed after the walk found it expired is put back as it was, not
/// deleted; the still expired one goes.
#[test]
fn an_entry_refreshed_after_the_walk_is_put_back() {
    in_private_netns(|| {
        let mut dp = datapath_with(PROTO_UDP, LOCAL_ID);
        let now = conntrack_gc::now_secs();
        let client = |i: u8| Ipv4Addr::new(198, 51, 100, i);
        let (key, refreshed) = udp_flow_to_local_pod(client(1), now);
        dp.nat_ct
            .insert(key, refreshed, 0)
            .expect("writing an entry");
        let (stale_key, stale) =
            udp_flow_to_local_pod(client(2), now.wrapping_sub(CT_LIFETIME_NONTCP + 1));
        dp.nat_ct
            .insert(stale_key, stale, 0)
            .expect("writing an entry");

        let mut conntrack =
            dataplane::Conntrack::duplicate(dp.nat_ct.map()).expect("a handle on the map");
        // Both were expired when the walk read them; only the second still is.
        let deleted =
            conntrack_gc::delete_expired(&mut conntrack, &[key, stale_key], now).expect("deleting");
        assert_eq!(deleted, 1);
        let left = dp.ct_entries();
        assert_eq!(left, [(key, refreshed)]);
    });
}

/// A map of more entries than one batched read returns (`Conntrack::scan` reads a few
/// thousand per syscall and goes on from where the kernel stopped): the pass sees each
/// entry once and deletes exactly the expired ones.
#[test]
fn the_collector_reads_the_map_in_batches_and_misses_none() {
    in_private_netns(|| {
        const ENTRIES: u32 = 20_000;
        // Room to spare: a full LRU would evict some of them as they are written.
        let mut dp = Datapath::load_with_conntrack(2 * ENTRIES);
        let now = conntrack_gc::now_secs();
        let mut kept = HashSet::new();
        for i in 0..ENTRIES {
            let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i);
            // Every third one is past its lifetime.
            let expired = i % 3 == 0;
            let idle = if expired { CT_LIFETIME_NONTCP + 1 } else { 0 };
            let (key, value) = udp_flow_to_local_pod(client, now.wrapping_sub(idle));
            dp.nat_ct.insert(key, value, 0).expect("writing an entry");
            if !expired {
                kept.insert(key);
            }
        }
        let conntrack =
            dataplane::Conntrack::duplicate(dp.nat_ct.map()).expect("a handle on the map");
        let mut seen = HashSet::new();
        conntrack
            .scan(|key, _| assert!(seen.insert(key), "{key:?} read twice"))
            .expect("a scan");
        assert_eq!(seen.len(), ENTRIES as usize);

        let mut conntrack = conntrack;
        let collected = conntrack_gc::collect(&mut conntrack, now).expect("a collector pass");
        assert_eq!(
            collected,
            conntrack_gc::Collected {
                seen: ENTRIES as usize,
                deleted: (ENTRIES as usize).div_ceil(3),
            }
        );
        let left: HashSet<NatCtKey> = dp.ct_entries().iter().map(|(k, _)| *k).collect();
        assert_eq!(left, kept);
    });
}

/// `got` is `input` with the outer addresses and the quoted 4-tuple replaced, checksums
/// (outer IPv4, ICMP, quoted IPv4) recomputed correctly, and not one other byte changed.
fn assert_icmp_rewritten(
    got: &[u8],
    input: &[u8],
    outer: (Ipv4Addr, Ipv4Addr),
    quoted: (Ipv4Addr, u16, Ipv4Addr, u16),
    what: &str,
) {
    assert_eq!(icmp_tuples(got), (outer, quoted), "{what}");
    verify_icmp_checksums(got);
    let mut want = input.to_vec();
    want[26..30].copy_from_slice(&outer.0.octets());
    want[30..34].copy_from_slice(&outer.1.octets());
    want[54..58].copy_from_slice(&quoted.0.octets());
    want[58..62].copy_from_slice(&quoted.2.octets());
    want[62..64].copy_from_slice(&quoted.1.to_be_bytes());
    want[64..66].copy_from_slice(&quoted.3.to_be_bytes());
    // The three checksums were verified above.
    for off in [24, 25, 36, 37, 52, 53] {
        want[off] = got[off];
    }
    assert!(
        got == want.as_slice(),
        "{what}: other bytes changed\n got:\n{}\nwant:\n{}",
        hex(got),
        hex(&want)
    );
}

/// ICMP errors about translated flows reach the other end in its own terms: a local pod's
/// port unreachable leaves from the frontend, quoting what the client sent; a remote
/// backend's "fragmentation needed" (or a router's on its way) to the SNAT address goes
/// back to the client; errors about untracked flows pass untouched.
#[test]
fn icmp_errors_about_translated_flows_are_translated_back() {
    in_private_netns(|| {
        // Local backend, UDP: the pod has nothing on the port and says so.
        let dp = datapath_with(PROTO_UDP, LOCAL_ID);
        let query = Frame::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.ingress(&query.bytes());
        assert_eq!(out.verdict, TCX_NEXT);
        let delivered = query.with_tuple(CLIENT, CLIENT_PORT, LOCAL_POD, POD_PORT);
        let unreachable = icmp_error(LOCAL_POD, CLIENT, 3, 3, [0; 4], &delivered, 8 + 9);
        let out = dp.egress(&unreachable);
        assert_eq!(out.verdict, TCX_NEXT);
        assert_icmp_rewritten(
            &out.packet,
            &unreachable,
            (NODE, CLIENT),
            (CLIENT, CLIENT_PORT, NODE, NODE_PORT),
            "port unreachable from the local pod",
        );
        // At ingress the same bytes are nobody's business.
        let out = dp.ingress(&unreachable);
        assert_eq!((out.verdict, out.packet), (TCX_NEXT, unreachable.clone()));

        // Remote backend, TCP with SNAT: errors arrive at the node's SNAT address.
        let dp = datapath_with(PROTO_TCP, REMOTE_ID);
        let syn = Frame::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        let out = dp.ingress(&syn.bytes());
        let (_, snat_port, _, _) = tuple_of(&out.packet);
        let sent = syn.with_tuple(NODE, snat_port, REMOTE_POD, POD_PORT);
        let router = Ipv4Addr::new(10, 244, 0, 254);
        for (from, outer_source) in [(REMOTE_POD, NODE), (router, router)] {
            // Fragmentation needed, next-hop MTU 1400, quoting the whole TCP header.
            let mtu = [0, 0, 0x05, 0x78];
            let too_big = icmp_error(from, NODE, 3, 4, mtu, &sent, 20);
            let out = dp.ingress(&too_big);
            // No route to the client in this namespace: handed to the stack.
            assert_eq!(out.verdict, TCX_NEXT, "from {from}");
            assert_icmp_rewritten(
                &out.packet,
                &too_big,
                (outer_source, CLIENT),
                (CLIENT, CLIENT_PORT, NODE, NODE_PORT),
                &format!("fragmentation needed from {from}"),
            );
        }

        // Errors quoting a flow nobody tracks, and an echo request, pass untouched. So do
        // errors that quote the tracked flow but cannot be about it: one sent elsewhere
        // than to the quoted packet's source (someone who learnt the flow's tuple), and
        // one quoting a later fragment, whose bytes where the ports would be are data
        // (here the ports themselves, so that they would match).
        let stranger = Frame::tcp(NODE, 40001, REMOTE_POD, POD_PORT);
        let untracked = icmp_error(REMOTE_POD, NODE, 3, 3, [0; 4], &stranger, 8);
        let echo = icmp_error(CLIENT, NODE, 8, 0, [0, 1, 0, 1], &syn, 8);
        let elsewhere = icmp_error(
            REMOTE_POD,
            Ipv4Addr::new(192, 0, 2, 99),
            3,
            3,
            [0; 4],
            &sent,
            8,
        );
        let later = as_later_fragment(&sent.bytes(), 185);
        let later_fragment = icmp_error_quoting(REMOTE_POD, NODE, 3, 3, [0; 4], &later, 8);
        for (what, frame) in [
            ("untracked", untracked),
            ("echo", echo),
            ("sent elsewhere", elsewhere),
            ("quoting a later fragment", later_fragment),
        ] {
            let out = dp.ingress(&frame);
            assert_eq!((out.verdict, &out.packet), (TCX_NEXT, &frame), "{what}");
            let out = dp.egress(&frame);
            assert_eq!((out.verdict, &out.packet), (TCX_NEXT, &frame), "{what}");
        }
    });
}
