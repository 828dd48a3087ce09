//! The node's devices for the north-south programs (`run --devices`): the address traffic to
//! remote backends is source-NATed to, and the SNAT port range checked against the host's
//! own ephemeral ports.

use std::ffi::CStr;
use std::fs;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};

/// Where the kernel keeps the host's ephemeral port range (per network namespace).
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// The first IPv4 address of `device`, in the kernel's order (the primary address unless
/// the device has several); `None` when it has none.
pub fn first_ipv4(device: &str) -> Result<Option<Ipv4Addr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut found = None;
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
        if family != libc::AF_INET || name.to_bytes() != device.as_bytes() {
            continue;
        }
        // SAFETY: AF_INET: the sockaddr is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        break;
    }
    // SAFETY: the list came from getifaddrs and is not used any more.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
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
    fn overlap_is_inclusive_on_both_ends() {
        assert!(!overlap((61000, 65535), (32768, 60999)));
        assert!(overlap((61000, 65535), (32768, 61000)));
        assert!(overlap((61000, 65535), (1024, 65535)));
        assert!(overlap((62000, 62000), (61000, 65535)));
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
