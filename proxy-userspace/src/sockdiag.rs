//! Closing connected UDP sockets whose backend went away (BEHAVIOUR C27).
//!
//! `connect4` fixes a connected UDP socket's peer once; unlike unconnected `sendto` (where
//! `sendmsg4` checks at every datagram that the socket's backend is still the Service's) it
//! would keep sending to a deleted pod forever.
//! kube-proxy flushes the conntrack entries of such flows; the socket-level equivalent (as in
//! Cilium) is to destroy the sockets through sock_diag (`SOCK_DESTROY`, kernel option
//! `INET_DIAG_DESTROY`): the application sees an error (ECONNABORTED) and reconnects, and its
//! next `connect()` selects a live backend.
//!
//! Sockets live in every pod's network namespace, so each namespace is visited from a thread
//! of its own (`setns` changes only the calling thread). Namespaces are found through
//! `/run/netns` (where CNI plugins pin pod namespaces) and `/proc/*/ns/net`.
//!
//! `AF_INET6` sockets connected to an IPv4-mapped Service address (`connect6`: Java's and
//! .NET's dual-stack sockets) are dumped too: sock_diag lists a socket under its own
//! family only.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_ESTABLISHED: u32 = 1;

/// `struct inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlHeader {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// The part of `struct inet_diag_msg` we read.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
}

/// A connected UDP socket, as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    pub cookie: u64,
    /// The IPv4 peer (of an `AF_INET6` socket: the address its IPv4-mapped peer maps).
    pub peer: (Ipv4Addr, u16),
    /// `AF_INET` or `AF_INET6`, as the destroy request must name it.
    family: u8,
    id_raw: [u8; size_of::<SockId>()],
}

/// What one pass over the network namespaces did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Sockets destroyed.
    pub destroyed: usize,
    /// Namespaces the agent was not allowed to enter (`setns` needs `CAP_SYS_ADMIN`).
    pub denied: usize,
    /// Namespaces where the kernel cannot destroy a socket (`SOCK_DESTROY` needs
    /// `CONFIG_INET_DIAG_DESTROY`).
    pub unsupported: usize,
}

impl Pass {
    /// Counts a namespace whose visit failed with `e`, where the failure is one the
    /// operator must hear of (the others are logged at debug level).
    fn failed(&mut self, e: &io::Error) {
        if e.kind() == io::ErrorKind::PermissionDenied {
            self.denied += 1;
        } else if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            self.unsupported += 1;
        }
    }
}

/// Namespaces visited at once: a thread each (`setns` changes only the calling thread),
/// so that a node with hundreds of pods does not start hundreds of threads.
const NAMESPACES_AT_ONCE: usize = 16;

/// Destroys, in every network namespace, the connected UDP sockets whose peer is one of
/// `backends` (any, with `None`) and for which `translated(socket)` says the socket
/// programs chose that backend. Namespaces that cannot be entered are skipped (logged at
/// debug level; those refused for want of privilege are counted).
pub fn destroy_udp_sockets(
    backends: Option<&BTreeSet<(Ipv4Addr, u16)>>,
    translated: &(dyn Fn(&UdpSocket) -> bool + Sync),
) -> Pass {
    let mut pass = Pass::default();
    if backends.is_some_and(BTreeSet::is_empty) {
        return pass;
    }
    let namespaces = network_namespaces();
    for batch in namespaces.chunks(NAMESPACES_AT_ONCE) {
        std::thread::scope(|scope| {
            let workers: Vec<_> = batch
                .iter()
                .map(|ns| {
                    std::thread::Builder::new()
                        .name("stale-udp-ns".into())
                        .spawn_scoped(scope, move || destroy_in(ns, backends, translated))
                })
                .collect();
            for (worker, ns) in workers.into_iter().zip(batch) {
                let result = match worker {
                    Ok(worker) => worker
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("the thread panicked"))),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(n) => pass.destroyed += n,
                    Err(e) => {
                        tracing::debug!(namespace = %ns.display(), "sock_diag: {e}");
                        pass.failed(&e);
                    }
                }
            }
        });
    }
    pass
}

/// [`destroy_udp_sockets`] in the network namespace at `ns`, from a thread of its own.
fn destroy_in(
    ns: &PathBuf,
    backends: Option<&BTreeSet<(Ipv4Addr, u16)>>,
    translated: &(dyn Fn(&UdpSocket) -> bool + Sync),
) -> io::Result<usize> {
    enter(ns)?;
    let diag = open_diag()?;
    let mut destroyed = 0;
    let mut sockets = dump_connected_udp(&diag, libc::AF_INET)?;
    // The IPv4 sockets are closed even where listing IPv6 ones fails.
    match dump_connected_udp(&diag, libc::AF_INET6) {
        Ok(dual_stack) => sockets.extend(dual_stack),
        Err(e) => tracing::debug!(namespace = %ns.display(), "sock_diag, AF_INET6: {e}"),
    }
    for socket in sockets {
        if backends.is_none_or(|b| b.contains(&socket.peer)) && translated(&socket) {
            match destroy(&diag, &socket) {
                Ok(()) => destroyed += 1,
                // Closed since the dump (a resolver's socket per query): nothing to do, and
                // the namespace's other sockets still to look at.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(destroyed)
}

/// One path per distinct network namespace: pinned ones first, then those of processes.
fn network_namespaces() -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut paths = Vec::new();
    let pinned = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()));
    let of_processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    for path in pinned.chain(of_processes) {
        if let Ok(meta) = std::fs::metadata(&path)
            && seen.insert((meta.dev(), meta.ino()))
        {
            paths.push(path);
        }
    }
    paths
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &PathBuf) -> io::Result<()> {
    let ns = File::open(path)?;
    // SAFETY: setns on a valid namespace fd affects only this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_diag() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn as_bytes<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: T is a #[repr(C)] plain-data struct without padding holes that matter here
    // (every field is an integer); reading its bytes is sound.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

fn read_struct<T: Copy + Default>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    let mut value = T::default();
    // SAFETY: T is plain data; exactly size_of::<T>() bytes are copied into it.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut value as *mut T).cast::<u8>(),
            size_of::<T>(),
        )
    };
    Some(value)
}

fn send(diag: &OwnedFd, kind: u16, flags: u16, request: &Request) -> io::Result<()> {
    let header = NlHeader {
        len: (size_of::<NlHeader>() + size_of::<Request>()) as u32,
        kind,
        flags,
        seq: 1,
        pid: 0,
    };
    let mut message = as_bytes(&header).to_vec();
    message.extend_from_slice(as_bytes(request));
    // SAFETY: sending an initialised buffer on a netlink socket.
    let sent = unsafe { libc::send(diag.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives netlink messages until DONE (dump) or the first ERROR/ACK; calls `each` with
/// (type, payload).
fn receive(diag: &OwnedFd, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into a buffer we own, of the given length.
        let n = unsafe {
            libc::recv(
                diag.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buffer[..n as usize];
        while let Some(header) = read_struct::<NlHeader>(rest) {
            let len = header.len as usize;
            if len < size_of::<NlHeader>() || len > rest.len() {
                return Err(io::Error::other("malformed netlink message"));
            }
            let payload = &rest[size_of::<NlHeader>()..len];
            match header.kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = read_struct::<i32>(payload).unwrap_or(0);
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                kind => each(kind, payload),
            }
            // Messages are 4-byte aligned.
            let advance = (len + 3) & !3;
            rest = rest.get(advance..).unwrap_or(&[]);
        }
    }
}

/// The connected UDP sockets of `family` with an IPv4 peer (for `AF_INET6`: an
/// IPv4-mapped one; others are no Service's).
fn dump_connected_udp(diag: &OwnedFd, family: i32) -> io::Result<Vec<UdpSocket>> {
    let request = Request {
        family: family as u8,
        protocol: libc::IPPROTO_UDP as u8,
        states: 1 << TCP_ESTABLISHED,
        ..Default::default()
    };
    send(
        diag,
        SOCK_DIAG_BY_FAMILY,
        (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        &request,
    )?;
    let mut sockets = Vec::new();
    receive(diag, |kind, payload| {
        if kind != SOCK_DIAG_BY_FAMILY {
            return;
        }
        let Some(msg) = read_struct::<DiagMsg>(payload) else {
            return;
        };
        let Some(peer) = ipv4_peer(family, &msg.id.dst) else {
            return;
        };
        let mut id_raw = [0u8; size_of::<SockId>()];
        id_raw.copy_from_slice(as_bytes(&msg.id));
        sockets.push(UdpSocket {
            cookie: u64::from(msg.id.cookie[0]) | (u64::from(msg.id.cookie[1]) << 32),
            peer: (peer, u16::from_be(msg.id.dport)),
            family: family as u8,
            id_raw,
        });
    })?;
    Ok(sockets)
}

/// The IPv4 address in a sock_diag address of `family` (words in network order): the
/// first word of an `AF_INET` one, the last of an IPv4-mapped `AF_INET6` one
/// (`::ffff:a.b.c.d`).
fn ipv4_peer(family: i32, dst: &[u32; 4]) -> Option<Ipv4Addr> {
    let bytes = |word: u32| word.to_ne_bytes();
    match family {
        libc::AF_INET => Some(Ipv4Addr::from(bytes(dst[0]))),
        libc::AF_INET6 if dst[0] == 0 && dst[1] == 0 && bytes(dst[2]) == [0, 0, 0xff, 0xff] => {
            Some(Ipv4Addr::from(bytes(dst[3])))
        }
        _ => None,
    }
}

fn destroy(diag: &OwnedFd, socket: &UdpSocket) -> io::Result<()> {
    let request = Request {
        family: socket.family,
        protocol: libc::IPPROTO_UDP as u8,
        states: u32::MAX,
        id: read_struct::<SockId>(&socket.id_raw).unwrap_or_default(),
        ..Default::default()
    };
    send(
        diag,
        SOCK_DESTROY,
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        &request,
    )?;
    receive(diag, |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused `setns` and a kernel without socket destroy are counted, each once per
    /// namespace, for the warnings; other failures are not.
    #[test]
    fn a_pass_counts_the_failures_an_operator_must_hear_of() {
        let mut pass = Pass::default();
        for errno in [
            libc::EPERM,
            libc::EOPNOTSUPP,
            libc::EOPNOTSUPP,
            libc::ENOENT,
        ] {
            pass.failed(&io::Error::from_raw_os_error(errno));
        }
        assert_eq!((pass.denied, pass.unsupported, pass.destroyed), (1, 2, 0));
    }

    #[test]
    fn layouts_match_the_kernel_uapi() {
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<Request>(), 56);
        assert_eq!(size_of::<NlHeader>(), 16);
        assert_eq!(size_of::<DiagMsg>(), 52);
    }

    /// A socket closed between the dump and its destroy (a resolver's socket per query)
    /// answers ENOENT; the namespace's other sockets are still destroyed. In a network
    /// namespace of the test thread's own, on loopback; connecting a UDP socket sends
    /// nothing.
    #[test]
    fn a_socket_closed_since_the_dump_leaves_the_others_to_be_destroyed() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test makes a network namespace and uses sock_diag: run it as root");
        }
        // A thread of its own, which alone enters the new namespace and ends with it.
        std::thread::spawn(|| {
            // SAFETY: unshare changes only the calling thread's namespaces.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            // A child forked from this thread starts in its namespace.
            let lo = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("running ip");
            assert!(lo.success(), "ip link set lo up");
            a_closed_socket_in_this_namespace_is_skipped();
        })
        .join()
        .expect("the test thread");
    }

    fn a_closed_socket_in_this_namespace_is_skipped() {
        use std::net::UdpSocket as Socket;
        use std::os::fd::AsRawFd;
        use std::sync::Mutex;

        let cookie = |s: &Socket| {
            let mut value = 0u64;
            let mut len = size_of::<u64>() as libc::socklen_t;
            // SAFETY: SO_COOKIE writes a u64 into `value`.
            let rc = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_COOKIE,
                    (&mut value as *mut u64).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0, "SO_COOKIE");
            value
        };
        let peer = (Ipv4Addr::LOCALHOST, 9);
        let connected = || {
            let s = Socket::bind("127.0.0.1:0").expect("bind");
            s.connect(peer).expect("connect");
            s
        };
        let sockets = Mutex::new(vec![Some(connected()), Some(connected())]);
        let cookies: Vec<u64> = sockets
            .lock()
            .expect("lock")
            .iter()
            .flatten()
            .map(cookie)
            .collect();
        // The first socket asked about is closed before its destroy.
        let closed = Mutex::new(None);
        let translated = |socket: &UdpSocket| {
            let Some(i) = cookies.iter().position(|c| *c == socket.cookie) else {
                return false;
            };
            let mut closed = closed.lock().expect("lock");
            if closed.is_none() {
                *closed = Some(i);
                sockets.lock().expect("lock")[i] = None;
            }
            true
        };
        let ns = PathBuf::from("/proc/thread-self/ns/net");
        let destroyed = destroy_in(&ns, Some(&BTreeSet::from([peer])), &translated)
            .expect("the pass goes on past the closed socket");
        assert_eq!(destroyed, 1);
        let closed = closed
            .lock()
            .expect("lock")
            .expect("a socket was asked about");
        let other = sockets.lock().expect("lock")[1 - closed]
            .take()
            .expect("the other socket");
        assert_eq!(
            other
                .take_error()
                .expect("SO_ERROR")
                .and_then(|e| e.raw_os_error()),
            Some(libc::ECONNABORTED),
            "the other socket was destroyed"
        );
    }

    #[test]
    fn peers_are_read_from_ipv4_and_ipv4_mapped_addresses_only() {
        let word = |bytes: [u8; 4]| u32::from_ne_bytes(bytes);
        let service = [10, 96, 0, 10];
        assert_eq!(
            ipv4_peer(libc::AF_INET, &[word(service), 0, 0, 0]),
            Some(Ipv4Addr::from(service))
        );
        let mapped = [0, 0, word([0, 0, 0xff, 0xff]), word(service)];
        assert_eq!(
            ipv4_peer(libc::AF_INET6, &mapped),
            Some(Ipv4Addr::from(service))
        );
        // fd00::a60:a, and ::a60:a (IPv4-compatible, not mapped): no Service's peer.
        let native = [word([0xfd, 0, 0, 0]), 0, 0, word(service)];
        assert_eq!(ipv4_peer(libc::AF_INET6, &native), None);
        assert_eq!(ipv4_peer(libc::AF_INET6, &[0, 0, 0, word(service)]), None);
    }
}
