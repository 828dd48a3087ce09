//! Link and IPv4 address events of the agent's network namespace (rtnetlink's multicast
//! groups), which wake the main loop to serve devices at once.
//!
//! A pod's device appears when the CNI sets up its sandbox, before its containers start;
//! in host-namespace-only mode its Service traffic is translated only once `ekp_pod_in`
//! is attached there, and a pod often calls a Service (DNS first) as it starts. The node's
//! north-south devices and their addresses change by the same events. The events are not
//! parsed: any of them means "look at the devices again", which is cheap and idempotent.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A subscription to the namespace's link and IPv4 address events.
pub struct LinkEvents {
    socket: AsyncFd<OwnedFd>,
}

impl LinkEvents {
    /// Subscribes in the calling thread's network namespace.
    pub fn subscribe() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR) as u32;
        // SAFETY: a valid socket and an address of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd is a valid, open descriptor, owned by the AsyncFd from here
        // until it is dropped; its `as_raw_fd` always returns that descriptor.
        let socket = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(LinkEvents { socket })
    }

    /// Waits for events, then reads all that are queued. Lost events (the socket's buffer
    /// overran: `ENOBUFS`) count as an event: the caller looks at everything again anyway.
    pub async fn changed(&self) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        loop {
            let mut ready = self.socket.readable().await?;
            let mut seen = false;
            loop {
                // SAFETY: receiving into a buffer of the length passed.
                let n = unsafe {
                    libc::recv(
                        self.socket.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n >= 0 {
                    seen = true;
                    continue;
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        ready.clear_ready();
                        break;
                    }
                    Some(libc::ENOBUFS) => seen = true,
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
            }
            if seen {
                return Ok(());
            }
        }
    }
}
