//! Packet-level tests of the TCX programs with `BPF_PROG_TEST_RUN`: the kernel runs a
//! program on a packet we build, without any device, and hands back the verdict and the
//! packet as the program left it. Nothing is sent anywhere.
//!
//! - [`Datapath`] loads the agent's embedded eBPF object with aya 0.14 (`TestRun` on
//!   `SchedClassifier`), verifier included, *without pins* (nothing appears under
//!   /sys/fs/bpf), and fills the maps directly.
//! - [`in_private_netns`] runs a test in a network namespace of its own (one thread
//!   unshares it), so that the FIB lookups of the programs see only what the test set up.
//! - [`Frame`] builds Ethernet/IPv4/TCP/UDP packets with correct checksums, and
//!   [`verify_checksums`] recomputes them (RFC 1071) from a program's output.

use std::net::Ipv4Addr;
use std::process::Command;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData};
use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions};
use aya::sys::SyscallError;
use aya::{Ebpf, EbpfLoader};
use proxy_common::{
    BackendValue, FragmentKey, FragmentPorts, MAP_AFFINITY, MAP_BACKENDS, MAP_CONFIG,
    MAP_FRAGMENTS, MAP_NAT_CT, MAP_REV_NAT, MAP_SERVICES, MAP_SNAT_TIME_WAIT, MAP_SOCK_REV_NAT,
    MAP_SOURCE_RANGES, NatCtKey, NatCtValue, NodeConfig, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL,
    SOURCE_RANGE_PREFIX_BASE, ServiceKey, ServiceValue, SnatTimeWait, SourceRangeKey,
};
use proxy_userspace::dataplane;

/// tc verdicts. `TCX_NEXT` is `TC_ACT_UNSPEC`: no verdict, the packet continues to the next
/// program on the hook and then to the stack (a pass that does not end the TCX chain).
pub const TCX_NEXT: i32 = -1;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// Fails the test with a clear message unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "these tests load eBPF programs and run them with BPF_PROG_TEST_RUN, which needs \
             root (CAP_BPF + CAP_NET_ADMIN); run them as root"
        );
    }
}

/// Runs `test` on a thread in a fresh network namespace (only `lo`, down), so that the
/// programs' FIB lookups and any device the test creates concern nobody else. The
/// namespace goes away with the thread.
pub fn in_private_netns<F: FnOnce() + Send + 'static>(test: F) {
    require_root();
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!(
                "unshare(CLONE_NEWNET) failed: {} (the tests need network namespaces)",
                std::io::Error::last_os_error()
            );
        }
        test();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `ip ARGS` in the calling thread's network namespace (a child inherits it).
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A veth `ekp0` (peer `ekp1`) in the test's namespace with `addrs` (`a.b.c.d/len`) and
/// permanent `neighbours` (address, MAC) on it, and forwarding on: the way to a pod network
/// for the programs' route lookups. Its ifindex.
pub fn forwarding_device(addrs: &[&str], neighbours: &[(&str, &str)]) -> u32 {
    ip(&[
        "link", "add", "ekp0", "type", "veth", "peer", "name", "ekp1",
    ]);
    ip(&["link", "set", "ekp0", "up"]);
    ip(&["link", "set", "ekp1", "up"]);
    for addr in addrs {
        ip(&["addr", "add", addr, "dev", "ekp0"]);
    }
    for (addr, mac) in neighbours {
        let neigh = [
            "neigh",
            "add",
            addr,
            "lladdr",
            mac,
            "dev",
            "ekp0",
            "nud",
            "permanent",
        ];
        ip(&neigh);
    }
    std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1")
        .expect("enabling forwarding in the test namespace");
    ifindex("ekp0")
}

/// ifindex of a device in the calling thread's network namespace.
pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("no NUL in a device name");
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "no device {name}");
    index
}

/// The MAC address of a device in the calling thread's network namespace (asked of `ip`:
/// sysfs shows the namespace it was mounted in).
pub fn mac_of(name: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "dev", name])
        .output()
        .expect("running ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {name} in {text:?}"));
    parse_mac(mac)
}

pub fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0; 6];
    for (byte, part) in mac.iter_mut().zip(s.split(':')) {
        *byte = u8::from_str_radix(part, 16).expect("hex MAC byte");
    }
    mac
}

/// What a program did with a packet.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: i32,
    pub packet: Vec<u8>,
}

/// The loaded object: the two TCX programs and typed handles on the maps they use.
pub struct Datapath {
    ebpf: Ebpf,
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Indexed by backend id; address 0: no backend.
    pub backends: Array<MapData, BackendValue>,
    pub config: Array<MapData, NodeConfig>,
    pub nat_ct: HashMap<MapData, NatCtKey, NatCtValue>,
    /// The first fragments' ports, for their later fragments.
    #[allow(dead_code)] // used by tcx_fuzz.rs only
    pub fragments: HashMap<MapData, FragmentKey, FragmentPorts>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    /// What the backends' TIME_WAIT sockets remember of source-NATed clients.
    pub snat_time_wait: HashMap<MapData, NatCtKey, SnatTimeWait>,
}

impl Datapath {
    /// Loads the embedded object, without pins and with small maps (the LRU maps are
    /// preallocated), and runs the verifier on both TCX programs.
    pub fn load() -> Self {
        Self::load_with_conntrack(1024)
    }

    /// `load`, with room for `entries` in the conntrack map.
    pub fn load_with_conntrack(entries: u32) -> Self {
        require_root();
        let mut loader = EbpfLoader::new();
        for map in [
            MAP_SERVICES,
            MAP_BACKENDS,
            MAP_REV_NAT,
            MAP_SOCK_REV_NAT,
            MAP_AFFINITY,
            MAP_SOURCE_RANGES,
            MAP_SNAT_TIME_WAIT,
        ] {
            loader.map_max_entries(map, 1024);
        }
        loader.map_max_entries(MAP_NAT_CT, entries);
        let mut ebpf = loader
            .load(dataplane::object())
            .expect("loading the embedded eBPF object (maps, BTF)");
        // The pods' devices' variants too: they are other code paths for the verifier.
        for name in dataplane::TCX_PROGRAMS
            .into_iter()
            .chain(["ekp_pod_in", "ekp_pod_out"])
        {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing from the object"))
                .try_into()
                .expect("a classifier");
            if let Err(e) = program.load() {
                match e {
                    ProgramError::LoadError {
                        io_error,
                        verifier_log,
                    } => panic!("the verifier rejected {name}: {io_error}\n{verifier_log}"),
                    other => panic!("loading {name}: {other}"),
                }
            }
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .unwrap_or_else(|| panic!("map {name} missing from the object"))
        };
        let services = HashMap::try_from(take(MAP_SERVICES)).expect("services map type");
        let backends = Array::try_from(take(MAP_BACKENDS)).expect("backends map type");
        let config = Array::try_from(take(MAP_CONFIG)).expect("config map type");
        let nat_ct = HashMap::try_from(take(MAP_NAT_CT)).expect("nat ct map type");
        let fragments = HashMap::try_from(take(MAP_FRAGMENTS)).expect("fragments map type");
        let source_ranges =
            LpmTrie::try_from(take(MAP_SOURCE_RANGES)).expect("source ranges map type");
        let snat_time_wait =
            HashMap::try_from(take(MAP_SNAT_TIME_WAIT)).expect("SNAT TIME_WAIT map type");
        Datapath {
            ebpf,
            services,
            backends,
            config,
            nat_ct,
            fragments,
            source_ranges,
            snat_time_wait,
        }
    }

    /// Runs `program` on `packet`; `ifindex` is the device the packet is on (0: `lo`).
    pub fn run(&self, program: &str, packet: &[u8], ifindex: u32) -> Outcome {
        self.try_run(program, packet, ifindex).unwrap_or_else(|e| {
            panic!(
                "BPF_PROG_TEST_RUN on a {}-byte packet failed: {e}",
                packet.len()
            )
        })
    }

    /// [`Datapath::run`], with the kernel's refusal to run the program on `packet` as an
    /// error instead of a panic (`EINVAL` for a frame shorter than its network header).
    pub fn try_run(
        &self,
        program: &str,
        packet: &[u8],
        ifindex: u32,
    ) -> Result<Outcome, std::io::Error> {
        let program: &SchedClassifier = self
            .ebpf
            .program(program)
            .unwrap_or_else(|| panic!("program {program} missing"))
            .try_into()
            .expect("a classifier");
        // struct __sk_buff, zeroed but for ingress_ifindex and ifindex (the only fields
        // besides a few others that BPF_PROG_TEST_RUN accepts).
        let mut skb = [0u32; 48];
        skb[9] = ifindex;
        skb[10] = ifindex;
        let ctx: Vec<u8> = skb.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: (ifindex != 0).then_some(&ctx[..]),
            ..TestRunOptions::default()
        };
        let result = program.test_run(opts).map_err(|e| match e {
            ProgramError::SyscallError(SyscallError { io_error, .. }) => io_error,
            other => std::io::Error::other(other),
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(Outcome {
            verdict: result.return_value as i32,
            packet: out,
        })
    }

    pub fn ingress(&self, packet: &[u8]) -> Outcome {
        self.run("ekp_tcx_in", packet, 0)
    }

    pub fn egress(&self, packet: &[u8]) -> Outcome {
        self.run("ekp_tcx_out", packet, 0)
    }

    /// An external-scope frontend (slot 0) and its backend slots, in the agent's order.
    pub fn frontend(&mut self, frontend: Frontend, backend_ids: &[u32]) {
        self.frontend_in(SCOPE_EXTERNAL, frontend, backend_ids);
    }

    /// A frontend of `scope` (`SCOPE_INTERNAL`: what the pod programs look up) and its
    /// backend slots.
    pub fn frontend_in(&mut self, scope: u8, frontend: Frontend, backend_ids: &[u32]) {
        for (i, id) in backend_ids.iter().enumerate() {
            let slot = ServiceValue {
                backend_id: *id,
                rev_nat_id: frontend.rev_nat_id,
                ..Default::default()
            };
            self.services
                .insert(frontend.key_in(scope, i as u16 + 1), slot, 0)
                .expect("writing a backend slot");
        }
        let master = ServiceValue {
            count: backend_ids.len() as u16,
            rev_nat_id: frontend.rev_nat_id,
            flags: frontend.flags,
            affinity_timeout: frontend.affinity_timeout,
            affinity_id: frontend.affinity_id,
            ..Default::default()
        };
        self.services
            .insert(frontend.key_in(scope, 0), master, 0)
            .expect("writing a frontend");
    }

    pub fn backend(&mut self, id: u32, addr: Ipv4Addr, port: u16, proto: u8, flags: u8) {
        let value = BackendValue {
            addr: u32::from_ne_bytes(addr.octets()),
            port: port.to_be(),
            proto,
            flags,
        };
        self.backends.set(id, value, 0).expect("writing a backend");
    }

    pub fn remove_backend(&mut self, id: u32) {
        // As the agent deletes one: the entry emptied.
        self.backends
            .set(id, BackendValue::default(), 0)
            .expect("deleting a backend");
    }

    pub fn snat(&mut self, addr: Ipv4Addr, port_min: u16, port_max: u16) {
        let value = NodeConfig {
            snat_addr: u32::from_ne_bytes(addr.octets()),
            snat_port_min: port_min,
            snat_port_max: port_max,
        };
        self.config.set(0, value, 0).expect("writing the config");
    }

    /// Admits clients in `addr/prefix` to the frontend with `rev_nat_id` (which must carry
    /// `SVC_FLAG_SOURCE_RANGES` for the range to matter).
    #[allow(dead_code)] // used by tcx_packets.rs only
    pub fn source_range(&mut self, rev_nat_id: u16, addr: Ipv4Addr, prefix: u8) {
        let key = Key::new(
            SOURCE_RANGE_PREFIX_BASE + u32::from(prefix),
            SourceRangeKey {
                rev_nat_id,
                _pad: [0; 2],
                addr: u32::from_ne_bytes(addr.octets()),
            },
        );
        self.source_ranges
            .insert(&key, 1, 0)
            .expect("writing a source range");
    }

    pub fn ct_entries(&self) -> Vec<(NatCtKey, NatCtValue)> {
        self.nat_ct.iter().filter_map(|r| r.ok()).collect()
    }

    /// The loaded object, for the maps the helpers above leave in it (bpf_log.rs: the log
    /// switch and aya-log's ring buffer; tcx_packets.rs: the prefilter).
    #[allow(dead_code)] // used by bpf_log.rs and tcx_packets.rs only
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// An external-scope frontend as the agent writes it.
#[derive(Clone, Copy, Debug)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub rev_nat_id: u16,
    pub flags: u16,
    pub affinity_timeout: u32,
    /// The affinity entries' id (0: `rev_nat_id`).
    pub affinity_id: u16,
}

impl Frontend {
    pub fn key(&self, slot: u16) -> ServiceKey {
        self.key_in(SCOPE_EXTERNAL, slot)
    }

    pub fn key_in(&self, scope: u8, slot: u16) -> ServiceKey {
        ServiceKey {
            addr: u32::from_ne_bytes(self.addr.octets()),
            port: self.port.to_be(),
            slot,
            proto: self.proto,
            scope,
            _pad: [0; 2],
        }
    }
}

/// Internet checksum (RFC 1071) over `data`, with a starting partial `sum`.
pub fn checksum(sum: u32, data: &[u8]) -> u16 {
    let mut sum = sum;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One's-complement sum of the TCP/UDP pseudo-header (RFC 793 / RFC 768), to start
/// [`checksum`] with.
pub fn pseudo_header_sum(saddr: [u8; 4], daddr: [u8; 4], proto: u8, l4_len: usize) -> u32 {
    let mut sum = 0u32;
    for pair in [saddr, daddr] {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        sum += u32::from(u16::from_be_bytes([pair[2], pair[3]]));
    }
    sum + u32::from(proto) + l4_len as u32
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum (pseudo-header included)
/// of an Ethernet frame from its bytes; panics naming the first one that is wrong. A UDP
/// checksum of 0 ("none") is accepted as such.
pub fn verify_checksums(frame: &[u8]) {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    assert_eq!(checksum(0, &ip[..ihl]), 0, "IPv4 header checksum is wrong");
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &ip[ihl..tot_len];
    let proto = ip[9];
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    let daddr = [ip[16], ip[17], ip[18], ip[19]];
    if proto == PROTO_UDP && l4[6] == 0 && l4[7] == 0 {
        return;
    }
    let sum = pseudo_header_sum(saddr, daddr, proto, l4.len());
    assert_eq!(
        checksum(sum, l4),
        0,
        "L4 checksum (protocol {proto}) is wrong"
    );
}

/// One Ethernet + IPv4 + TCP/UDP frame, built with correct checksums.
#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ttl: u8,
    pub id: u16,
    /// TCP flags byte (ignored for UDP).
    pub tcp_flags: u8,
    /// TCP sequence number (ignored for UDP).
    pub seq: u32,
    /// TCP options, a multiple of 4 bytes (ignored for UDP).
    pub tcp_options: Vec<u8>,
    /// UDP only: send a zero ("no") checksum.
    pub udp_no_checksum: bool,
    pub payload: Vec<u8>,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// A Linux SYN's TCP options with the timestamp value `tsval`: MSS, SACK permitted,
/// timestamp, NOP, window scale.
#[allow(dead_code)] // used by tcx_packets.rs only
pub fn syn_options(tsval: u32) -> Vec<u8> {
    let mut options = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
    options.extend_from_slice(&tsval.to_be_bytes());
    options.extend_from_slice(&[0, 0, 0, 0, 1, 3, 3, 7]);
    options
}

/// The TCP options of a Linux segment after the handshake with the timestamp value
/// `tsval`: two NOPs, timestamp.
#[allow(dead_code)] // used by tcx_packets.rs only
pub fn segment_options(tsval: u32) -> Vec<u8> {
    let mut options = vec![1, 1, 8, 10];
    options.extend_from_slice(&tsval.to_be_bytes());
    options.extend_from_slice(&[0, 0, 0, 0]);
    options
}

impl Frame {
    pub fn tcp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> Self {
        Frame {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            saddr,
            daddr,
            sport,
            dport,
            proto: PROTO_TCP,
            ttl: 64,
            id: 0x1234,
            tcp_flags: TCP_SYN,
            seq: 0x0102_0304,
            tcp_options: Vec::new(),
            udp_no_checksum: false,
            payload: b"GET / HTTP/1.1\r\n".to_vec(),
        }
    }

    pub fn udp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> Self {
        Frame {
            proto: PROTO_UDP,
            payload: b"dns query".to_vec(),
            ..Frame::tcp(saddr, sport, daddr, dport)
        }
    }

    /// The same frame with source and destination swapped (a reply).
    pub fn reply(&self) -> Self {
        Frame {
            dst_mac: self.src_mac,
            src_mac: self.dst_mac,
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            tcp_flags: TCP_SYN | TCP_ACK,
            payload: b"HTTP/1.1 200 OK\r\n".to_vec(),
            ..self.clone()
        }
    }

    /// This frame with another 4-tuple, everything else equal.
    pub fn with_tuple(&self, saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> Self {
        Frame {
            saddr,
            sport,
            daddr,
            dport,
            ..self.clone()
        }
    }

    pub fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == PROTO_TCP {
            assert!(
                self.tcp_options.len().is_multiple_of(4) && self.tcp_options.len() <= 40,
                "TCP options fill whole words, at most ten"
            );
            l4.extend_from_slice(&self.seq.to_be_bytes());
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push(((5 + self.tcp_options.len() / 4) as u8) << 4); // data offset
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&64240u16.to_be_bytes()); // window
            l4.extend_from_slice(&[0, 0]); // checksum
            l4.extend_from_slice(&[0, 0]); // urgent pointer
            l4.extend_from_slice(&self.tcp_options);
        } else {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        let csum_off = if self.proto == PROTO_TCP { 16 } else { 6 };
        if !(self.proto == PROTO_UDP && self.udp_no_checksum) {
            let sum = pseudo_header_sum(
                self.saddr.octets(),
                self.daddr.octets(),
                self.proto,
                l4.len(),
            );
            let mut csum = checksum(sum, &l4);
            if csum == 0 && self.proto == PROTO_UDP {
                csum = 0xffff;
            }
            l4[csum_off..csum_off + 2].copy_from_slice(&csum.to_be_bytes());
        }
        l4
    }

    /// The frame's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut ip = vec![
            0x45,
            0,
            0,
            0,
            (self.id >> 8) as u8,
            self.id as u8,
            0x40, // don't fragment
            0,
            self.ttl,
            self.proto,
            0,
            0,
        ];
        ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.saddr.octets());
        ip.extend_from_slice(&self.daddr.octets());
        let csum = checksum(0, &ip);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }
}

/// An ICMP error frame (`icmp_type`, `code`) from `saddr` to `daddr` quoting the IPv4
/// header and the first `quote_l4` bytes of transport header and data of `quoted`, with
/// correct checksums. `rest` is the type's 4 bytes after the checksum (the next-hop MTU of
/// "fragmentation needed").
#[allow(dead_code)] // used by tcx_packets.rs only
pub fn icmp_error(
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &Frame,
    quote_l4: usize,
) -> Vec<u8> {
    icmp_error_quoting(
        saddr,
        daddr,
        icmp_type,
        code,
        rest,
        &quoted.bytes(),
        quote_l4,
    )
}

/// [`icmp_error`] about an Ethernet frame given as bytes (IPv4 without options): sent back
/// to where it came from, its Ethernet addresses swapped.
pub fn icmp_error_quoting(
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &[u8],
    quote_l4: usize,
) -> Vec<u8> {
    let quote = &quoted[14..(14 + 20 + quote_l4).min(quoted.len())];
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quote);
    let csum = checksum(0, &icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let mut ip = vec![0x45, 0xc0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&saddr.octets());
    ip.extend_from_slice(&daddr.octets());
    let csum = checksum(0, &ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&quoted[6..12]);
    frame.extend_from_slice(&quoted[..6]);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&icmp);
    frame
}

/// What the programs answer the TCP or UDP packet `quoted` with (`icmp.rs`, `answer`):
/// [`icmp_error_quoting`] with 8 bytes of it, then, past the IPv4 datagram, the one's
/// complement of the word a checksum offload writes over (at the quoted packet's L4
/// checksum offset past the ICMP header's start).
pub fn answer_to(
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    (icmp_type, code): (u8, u8),
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let mut frame = icmp_error_quoting(saddr, daddr, icmp_type, code, rest, quoted, 8);
    let at = 14 + 20 + if quoted[14 + 9] == 6 { 16 } else { 6 };
    let word = u16::from_be_bytes([frame[at], frame[at + 1]]);
    frame.extend_from_slice(&(!word).to_be_bytes());
    frame
}

/// Checks that an answer of the programs (`answer_to`) comes through a checksum fill of the
/// packet it was made of unchanged (`CHECKSUM_PARTIAL`: `skb_checksum_help` sums from the
/// old L4 header's start, the ICMP header's now, to the end, and writes the result, 0xffff
/// for 0, at the old checksum's offset: 16 for TCP, 6 for UDP). 0xffff over 0 counts as
/// unchanged: the same in the checksum's arithmetic.
#[allow(dead_code)] // used by tcx_packets.rs only
pub fn assert_checksum_fill_keeps(frame: &[u8]) {
    let quoted_proto = frame[14 + 20 + 8 + 9];
    let at = 14 + 20 + if quoted_proto == 6 { 16 } else { 6 };
    let filled = match checksum(0, &frame[14 + 20..]) {
        0 => 0xffff,
        sum => sum,
    };
    let there = u16::from_be_bytes([frame[at], frame[at + 1]]);
    assert!(
        filled == there || (there == 0 && filled == 0xffff),
        "a checksum fill writes {filled:#06x} over {there:#06x} at byte {at}:\n{}",
        hex(frame)
    );
}

/// Verifies an ICMP error frame's checksums: the outer IPv4 header, the ICMP message and the
/// quoted IPv4 header; panics naming the first one that is wrong.
#[allow(dead_code)] // used by tcx_packets.rs only
pub fn verify_icmp_checksums(frame: &[u8]) {
    let ip = &frame[14..];
    assert_eq!(
        checksum(0, &ip[..20]),
        0,
        "outer IPv4 header checksum is wrong"
    );
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(checksum(0, &ip[20..tot_len]), 0, "ICMP checksum is wrong");
    assert_eq!(
        checksum(0, &ip[28..48]),
        0,
        "quoted IPv4 header checksum is wrong"
    );
}

/// (outer source, outer destination, quoted 4-tuple) of an ICMP error frame.
#[allow(dead_code)] // used by tcx_packets.rs only
pub fn icmp_tuples(frame: &[u8]) -> ((Ipv4Addr, Ipv4Addr), (Ipv4Addr, u16, Ipv4Addr, u16)) {
    let outer = tuple_of(frame);
    let quoted = tuple_of(&frame[28..]);
    ((outer.0, outer.2), quoted)
}

/// The 4-tuple of an Ethernet/IPv4/TCP-or-UDP frame without IP options.
pub fn tuple_of(frame: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let ip = &frame[14..];
    let l4 = &ip[20..];
    (
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        u16::from_be_bytes([l4[0], l4[1]]),
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        u16::from_be_bytes([l4[2], l4[3]]),
    )
}

/// A readable diff of two frames for assertion messages.
pub fn hex(frame: &[u8]) -> String {
    frame
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}
