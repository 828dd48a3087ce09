//! The node's devices for the north-south programs (`run --devices`): which devices they
//! attach to when the flag is not given, the address traffic to remote backends is
//! source-NATed to, and the SNAT port range checked against the host's own ephemeral ports.

use std::ffi::CStr;
use std::fs;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::kube_proxy_cleanup::IPVS_DUMMY;

/// Where the kernel keeps the host's ephemeral port range (per network namespace).
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Where the kernel keeps the ports taken out of that range (`1,3-5`; per namespace).
const LOCAL_RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Where the kernel lists the IPv4 routes of the main table (of this network namespace).
const IPV4_ROUTES: &str = "/proc/net/route";

/// The devices `run` attaches to without `--devices` (Cilium's detection): those carrying
/// one of `node_addresses` (the Node's InternalIP and ExternalIP addresses), in that order,
/// then those with an IPv4 default route; never `lo`, never one without an IPv4 address.
/// The SNAT address is the first node address found on a device.
pub fn detect(node_addresses: &[Ipv4Addr]) -> Result<(Vec<String>, Option<Ipv4Addr>)> {
    let addresses = ipv4_addresses()?;
    let mut devices: Vec<String> = Vec::new();
    let mut snat = None;
    for node_address in node_addresses {
        let carriers = addresses
            .iter()
            .filter(|(d, a)| a == node_address && d != "lo");
        for (device, _) in carriers {
            snat.get_or_insert(*node_address);
            if !devices.contains(device) {
                devices.push(device.clone());
            }
        }
    }
    let routes =
        fs::read_to_string(IPV4_ROUTES).with_context(|| format!("reading {IPV4_ROUTES}"))?;
    for device in default_route_devices(&routes) {
        if device != "lo"
            && !devices.contains(&device)
            && addresses.iter().any(|(d, _)| *d == device)
        {
            devices.push(device);
        }
    }
    Ok((devices, snat))
}

/// The devices of the IPv4 default routes in `/proc/net/route`'s text (destination and mask
/// zero), in table order.
fn default_route_devices(routes: &str) -> Vec<String> {
    let mut devices = Vec::new();
    for line in routes.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        let (Some(device), Some(&"00000000"), Some(&"00000000")) =
            (fields.first(), fields.get(1), fields.get(7))
        else {
            continue;
        };
        if !devices.iter().any(|d| d == device) {
            devices.push((*device).to_owned());
        }
    }
    devices
}

/// The first IPv4 address of `device`, in the kernel's order (the primary address unless
/// the device has several); `None` when it has none.
pub fn first_ipv4(device: &str) -> Result<Option<Ipv4Addr>> {
    Ok(ipv4_addresses()?
        .into_iter()
        .find(|(d, _)| d == device)
        .map(|(_, a)| a))
}

/// This network namespace's IPv4 addresses, loopback ones and those of kube-proxy's IPVS
/// dummy device aside (it carries every Service address of an IPVS-mode node not yet
/// cleaned up; kube-proxy leaves them out of its node addresses too); sorted.
pub fn local_ipv4() -> Result<Vec<Ipv4Addr>> {
    let mut addresses: Vec<Ipv4Addr> = ipv4_addresses()?
        .into_iter()
        .filter(|(device, a)| !a.is_loopback() && device != IPVS_DUMMY)
        .map(|(_, a)| a)
        .collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// Every (device, IPv4 address) of this network namespace, in the kernel's order.
fn ipv4_addresses() -> Result<Vec<(String, Ipv4Addr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut found = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a non-null entry of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string; ifa_addr a valid sockaddr whose
        // family says which sockaddr_* it is.
        let (name, family) = unsafe {
            (
                CStr::from_ptr(ifa.ifa_name),
                i32::from((*ifa.ifa_addr).sa_family),
            )
        };
        if family != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET: the sockaddr is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        found.push((
            name.to_string_lossy().into_owned(),
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        ));
    }
    // SAFETY: the list came from getifaddrs and is not used any more.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// The (name, ifindex) of this network namespace's links (netlink, unlike
/// `/sys/class/net`, which shows the namespace sysfs was mounted in).
pub fn links() -> Result<Vec<(String, u32)>> {
    // SAFETY: if_nameindex returns a list terminated by a zero entry, or null on error; it
    // is freed below with if_freenameindex.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(std::io::Error::last_os_error()).context("if_nameindex");
    }
    let mut names = Vec::new();
    let mut entry = list;
    // SAFETY: entries up to the terminating one (index 0) are valid, with NUL-terminated
    // names.
    unsafe {
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            names.push((name, (*entry).if_index));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(names)
}

/// Whether the device of `ifindex` no longer has the name `name`: it is gone (`ENODEV`),
/// or was created again under its name (another ifindex). Not when the name could not be
/// looked up for another reason (no file descriptor left, say).
pub fn gone(name: &str, ifindex: u32) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return true;
    };
    // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODEV),
        now => now != ifindex,
    }
}

/// Whether `device` is named by one of `patterns`: a name, or a prefix ending in `*`.
pub fn matches(patterns: &[String], device: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => device.starts_with(prefix),
        None => p == device,
    })
}

/// The cookie of the network namespace this process runs in (`SO_NETNS_COOKIE`), as the
/// socket programs see it with `bpf_get_netns_cookie`.
pub fn own_netns_cookie() -> Result<u64> {
    // Unbound: a namespace whose loopback is down has no 127.0.0.1 to bind.
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").context("opening a probe socket")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket fd and an out buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

/// An inclusive port range, `first-last` (the flag) or `first<whitespace>last` (procfs).
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let s = s.trim();
    let (first, last) = s
        .split_once('-')
        .or_else(|| s.split_once(char::is_whitespace))
        .ok_or_else(|| format!("{s:?} is not a port range such as 61000-65535"))?;
    let first: u16 = first
        .trim()
        .parse()
        .map_err(|e| format!("{s:?}: first port: {e}"))?;
    let last: u16 = last
        .trim()
        .parse()
        .map_err(|e| format!("{s:?}: last port: {e}"))?;
    if first == 0 || first > last {
        return Err(format!(
            "{s:?}: the range must be non-empty and start above 0"
        ));
    }
    Ok((first, last))
}

/// The host's ephemeral port range (`net.ipv4.ip_local_port_range`) in this namespace.
pub fn ephemeral_ports() -> Result<(u16, u16)> {
    let raw = fs::read_to_string(LOCAL_PORT_RANGE)
        .with_context(|| format!("reading {LOCAL_PORT_RANGE}"))?;
    parse_port_range(&raw).map_err(|e| anyhow::anyhow!("{LOCAL_PORT_RANGE}: {e}"))
}

/// Whether two inclusive port ranges share a port.
pub fn overlap(a: (u16, u16), b: (u16, u16)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// The ports the host's connections never pick (`net.ipv4.ip_local_reserved_ports`) in
/// this namespace, as inclusive ranges.
pub fn reserved_ports() -> Result<Vec<(u16, u16)>> {
    let raw = fs::read_to_string(LOCAL_RESERVED_PORTS)
        .with_context(|| format!("reading {LOCAL_RESERVED_PORTS}"))?;
    parse_port_list(&raw).map_err(|e| anyhow::anyhow!("{LOCAL_RESERVED_PORTS}: {e}"))
}

/// A list of ports and port ranges as the kernel writes `ip_local_reserved_ports`: `1,3-5`,
/// or nothing.
fn parse_port_list(s: &str) -> Result<Vec<(u16, u16)>, String> {
    s.trim()
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            if item.contains('-') {
                parse_port_range(item)
            } else {
                let port: u16 = item.trim().parse().map_err(|e| format!("{item:?}: {e}"))?;
                Ok((port, port))
            }
        })
        .collect()
}

/// Whether `snat` shares a port with `ephemeral` that `reserved` does not take out of it:
/// one the host's own connections may pick.
pub fn collides_with_host(
    ephemeral: (u16, u16),
    reserved: &[(u16, u16)],
    snat: (u16, u16),
) -> bool {
    if !overlap(ephemeral, snat) {
        return false;
    }
    let (first, last) = (ephemeral.0.max(snat.0), ephemeral.1.min(snat.1));
    let mut reserved = reserved.to_vec();
    reserved.sort_unstable();
    // The first port of `first..=last` not covered yet (u32: it may pass 65535).
    let mut next = u32::from(first);
    for (from, to) in reserved {
        if u32::from(from) > next {
            break;
        }
        next = next.max(u32::from(to) + 1);
    }
    next <= u32::from(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_read_from_the_flag_and_from_procfs() {
        let rows: [(&str, Option<(u16, u16)>); 7] = [
            ("61000-65535", Some((61000, 65535))),
            ("32768\t60999\n", Some((32768, 60999))),
            ("1024 1024", Some((1024, 1024))),
            ("65535-61000", None),
            ("0-10", None),
            ("61000", None),
            ("61000-70000", None),
        ];
        for (input, want) in rows {
            assert_eq!(parse_port_range(input).ok(), want, "{input:?}");
        }
    }

    #[test]
    fn reserved_ports_read_as_the_kernel_writes_them() {
        assert_eq!(parse_port_list("\n"), Ok(vec![]));
        assert_eq!(
            parse_port_list("1,3-5,40000-60999\n"),
            Ok(vec![(1, 1), (3, 5), (40000, 60999)])
        );
        assert!(parse_port_list("1,x").is_err());
    }

    #[test]
    fn snat_ports_collide_only_where_the_host_may_pick_them() {
        let ephemeral = (32768, 60999);
        // The default: above the ephemeral range.
        assert!(!collides_with_host(ephemeral, &[], (61000, 65535)));
        // Widened into it: host connections may take those ports...
        assert!(collides_with_host(ephemeral, &[], (40000, 65535)));
        // ...unless they are reserved, in one range or several that meet.
        assert!(!collides_with_host(
            ephemeral,
            &[(40000, 60999)],
            (40000, 65535)
        ));
        assert!(!collides_with_host(
            ephemeral,
            &[(50000, 60999), (40000, 49999)],
            (40000, 65535)
        ));
        // A gap, at either end or inside.
        assert!(collides_with_host(
            ephemeral,
            &[(40001, 60999)],
            (40000, 65535)
        ));
        assert!(collides_with_host(
            ephemeral,
            &[(40000, 60998)],
            (40000, 65535)
        ));
        assert!(collides_with_host(
            ephemeral,
            &[(40000, 45000), (45002, 60999)],
            (40000, 65535)
        ));
        // Reserved up to 65535 (the counter must not wrap).
        assert!(!collides_with_host(
            (1024, 65535),
            &[(60000, 65535)],
            (61000, 65535)
        ));
    }

    #[test]
    fn overlap_is_inclusive_on_both_ends() {
        assert!(!overlap((61000, 65535), (32768, 60999)));
        assert!(overlap((61000, 65535), (32768, 61000)));
        assert!(overlap((61000, 65535), (1024, 65535)));
        assert!(overlap((62000, 62000), (61000, 65535)));
    }

    #[test]
    fn device_patterns_are_names_or_prefixes() {
        let patterns = ["lxc*".to_owned(), "eth1".to_owned()];
        assert!(matches(&patterns, "lxc12ab"));
        assert!(matches(&patterns, "eth1"));
        assert!(!matches(&patterns, "eth10"));
        assert!(!matches(&patterns, "vethlxc"));
        assert!(!matches(&[], "lxc1"));
    }

    #[test]
    fn this_namespace_has_lo_and_a_cookie() {
        assert!(
            links()
                .expect("if_nameindex")
                .iter()
                .any(|(n, _)| n == "lo")
        );
        assert_ne!(own_netns_cookie().expect("SO_NETNS_COOKIE"), 0);
    }

    #[test]
    fn default_routes_are_read_from_procfs() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            bond1\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth2\t00000000\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n";
        assert_eq!(default_route_devices(routes), ["eth0", "bond1"]);
        assert!(default_route_devices("Iface\n").is_empty());
    }

    #[test]
    fn detection_finds_the_device_of_a_node_address_and_never_lo() {
        let (devices, snat) = detect(&[Ipv4Addr::LOCALHOST]).expect("detect");
        assert!(!devices.iter().any(|d| d == "lo"), "{devices:?}");
        // 127.0.0.1 is on lo only: not a device to attach to, nor a SNAT address.
        assert_eq!(snat, None);
    }

    #[test]
    fn loopback_has_127_0_0_1_and_a_missing_device_has_nothing() {
        // Every network namespace has lo; its address may be missing only while it is down
        // without one, which `first_ipv4` then reports as None rather than an error.
        let lo = first_ipv4("lo").expect("getifaddrs");
        assert!(lo.is_none_or(|a| a.is_loopback()), "{lo:?}");
        assert_eq!(first_ipv4("ekp-no-such-dev0").expect("getifaddrs"), None);
    }
}
