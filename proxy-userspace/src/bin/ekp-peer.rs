//! `ekp-peer`: the pods and clients of the demo and the privileged tests.
//!
//! - `serve --name NAME --tcp PORT... --udp PORT...`: answers every TCP connection with a
//!   tiny HTTP response whose body is NAME, and every UDP datagram with NAME, padded with
//!   newlines to the request's size when the request is longer (so that a large request
//!   gets an answer as large, fragmented alike on its way back). Prints
//!   `ready` once all sockets are bound, so callers wait for that instead of sleeping.
//!   `--echo-peer` appends the client address the server saw to the TCP answer
//!   (`NAME ADDR`), for tests of source NAT. An HTTP/1.1 request keeps the connection open
//!   for the next one. `--sink PORT` reads each TCP connection to its end and answers with
//!   the number of bytes it read, for uploads.
//! - `tcp ADDR:PORT COUNT`, `udp ADDR:PORT COUNT [--connected]`: make COUNT requests (a
//!   new socket each) and print one JSON line per request: what answered, the peer address
//!   the application saw (getpeername / recvfrom), or the error and its errno.
//!   `tcp ... --keep-connection` makes all requests on one HTTP/1.1 connection, replaced
//!   only when it fails; each line's `connection` counts the connections opened so far.
//!   `--every-ms N` paces the requests N ms apart, for clients that must span an event.
//!   `ADDR:PORT,ADDR:PORT...` sends the requests to each address in turn.
//!   `udp ... --keep-socket` uses one socket for all requests, like a resolver, and replaces
//!   it only when it fails (e.g. ECONNABORTED after the agent destroyed it); with
//!   `--connected --reconnect` it connects the kept socket again before each request. `udp ...
//!   --size N` sends N bytes per request (a new unconnected socket each); the line's
//!   `bytes` is the size of the answer, whose padding is not part of `answer`.
//!
//! An IPv6 `ADDR`, such as the IPv4-mapped `[::ffff:10.96.0.10]:80`, is reached from an
//! `AF_INET6` socket, as Java's and .NET's dual-stack sockets reach IPv4 addresses.
//!
//! Not shipped in the container image; std and serde_json only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("tcp") if args.iter().any(|a| a == "--keep-connection") => {
            let mut kept = KeptTcp::default();
            client(&args[1..], &mut |to| kept.request(to))
        }
        Some("tcp") => client(&args[1..], &mut tcp_request),
        Some("udp") => udp(&args[1..]),
        _ => Err(
            "usage: ekp-peer serve --name NAME [--tcp PORT]... [--udp PORT]... [--sink PORT]... [--echo-peer] | \
                  tcp ADDR:PORT[,...] COUNT [--keep-connection] | udp ADDR:PORT[,...] COUNT [--connected] [--keep-socket [--reconnect]] [--size N]"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ekp-peer: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `udp ADDR:PORT COUNT [--connected] [--keep-socket [--reconnect]] [--size N]`.
fn udp(args: &[String]) -> Result<(), String> {
    let connected = args.iter().any(|a| a == "--connected");
    let size = match args.iter().position(|a| a == "--size") {
        Some(i) => Some(
            args.get(i + 1)
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|n| (1..=65507).contains(n))
                .ok_or("--size takes a datagram size of 1-65507 bytes")?,
        ),
        None => None,
    };
    if let Some(size) = size {
        let request = vec![b'x'; size];
        client(args, &mut |to| udp_request_with(to, &request))
    } else if args.iter().any(|a| a == "--keep-socket") {
        let reconnect = args.iter().any(|a| a == "--reconnect");
        let mut kept = KeptUdp::new(connected, reconnect);
        client(args, &mut |to| kept.request(to))
    } else if connected {
        client(args, &mut udp_connected_request)
    } else {
        client(args, &mut udp_request)
    }
}

fn serve(args: &[String]) -> Result<(), String> {
    let mut name = None;
    let (mut tcp_ports, mut udp_ports, mut sink_ports) = (Vec::new(), Vec::new(), Vec::new());
    let mut echo_peer = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--echo-peer" {
            echo_peer = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--name" => name = Some(value.clone()),
            "--tcp" => tcp_ports.push(parse_port(value)?),
            "--udp" => udp_ports.push(parse_port(value)?),
            "--sink" => sink_ports.push(parse_port(value)?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let name = name.ok_or("--name is required")?;
    let mut threads = Vec::new();
    for port in tcp_ports {
        let listener =
            TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind tcp {port}: {e}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            serve_tcp(listener, &name, echo_peer)
        }));
    }
    for port in sink_ports {
        let listener =
            TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind tcp {port}: {e}"))?;
        threads.push(std::thread::spawn(move || serve_sink(listener)));
    }
    for port in udp_ports {
        let socket =
            UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("bind udp {port}: {e}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || serve_udp(socket, &name)));
    }
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("invalid port {s:?}"))
}

fn serve_tcp(listener: TcpListener, name: &str, echo_peer: bool) {
    for stream in listener.incoming().flatten() {
        let answer = match stream.peer_addr() {
            Ok(peer) if echo_peer => format!("{name} {}", peer.ip()),
            _ => name.to_owned(),
        };
        std::thread::spawn(move || {
            let _ = answer_http(stream, &answer);
        });
    }
}

fn serve_sink(listener: TcpListener) {
    for mut stream in listener.incoming().flatten() {
        std::thread::spawn(move || -> std::io::Result<()> {
            stream.set_read_timeout(Some(TIMEOUT))?;
            let read = std::io::copy(&mut stream, &mut std::io::sink())?;
            stream.write_all(read.to_string().as_bytes())
        });
    }
}

/// Reads each request head (or until the client stops sending) and answers with NAME; an
/// HTTP/1.1 request keeps the connection for the next one, any other ends it.
fn answer_http(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    loop {
        let request = read_head(&mut stream)?;
        if request.is_empty() {
            return Ok(());
        }
        let keep = request.starts_with(b"GET / HTTP/1.1\r\n");
        let body = format!("{name}\n");
        let (version, connection) = if keep {
            ("1.1", "keep-alive")
        } else {
            ("1.0", "close")
        };
        let response = format!(
            "HTTP/{version} 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes())?;
        if !keep {
            return Ok(());
        }
    }
}

/// Reads up to the end of a head (`\r\n\r\n`), or until the peer stops sending; the
/// clients here send nothing after a head before its answer.
fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf)? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    Ok(head)
}

fn serve_udp(socket: UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        let mut answer = name.as_bytes().to_vec();
        if n > answer.len() {
            answer.resize(n, b'\n');
        }
        let _ = socket.send_to(&answer, from);
    }
}

/// One request's outcome, printed as a JSON line.
struct Outcome {
    /// The answer as received (a large UDP one padded with newlines, which the printed
    /// `answer` leaves out).
    answer: String,
    /// The remote address as the application sees it.
    peer: SocketAddr,
    /// Which kept connection answered (`--keep-connection`).
    connection: Option<u32>,
}

fn client(
    args: &[String],
    request: &mut dyn FnMut(SocketAddr) -> std::io::Result<Outcome>,
) -> Result<(), String> {
    let targets: Vec<SocketAddr> = args
        .first()
        .ok_or("missing ADDR:PORT")?
        .split(',')
        .map(|t| {
            t.parse()
                .map_err(|e| format!("invalid ADDR:PORT {t:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let count: u32 = args
        .get(1)
        .ok_or("missing COUNT")?
        .parse()
        .map_err(|e| format!("invalid COUNT: {e}"))?;
    let pace = match args.iter().position(|a| a == "--every-ms") {
        Some(i) => {
            let ms: u64 = args
                .get(i + 1)
                .ok_or("--every-ms needs a value")?
                .parse()
                .map_err(|e| format!("invalid --every-ms: {e}"))?;
            Some(Duration::from_millis(ms))
        }
        None => None,
    };
    let mut out = std::io::stdout().lock();
    for to in targets.iter().cycle().take(count as usize) {
        if let Some(pace) = pace {
            std::thread::sleep(pace);
        }
        let line = match request(*to) {
            Ok(o) => serde_json::json!({
                "ok": true,
                "answer": o.answer.trim_end_matches('\n'),
                "bytes": o.answer.len(),
                "peer": o.peer.to_string(),
                "connection": o.connection,
            }),
            Err(e) => serde_json::json!({
                "ok": false,
                "error": e.to_string(),
                "errno": e.raw_os_error(),
            }),
        };
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn tcp_request(to: SocketAddr) -> std::io::Result<Outcome> {
    let mut stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = stream.peer_addr()?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: ekp-peer\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_owned())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    Ok(Outcome {
        answer: body,
        peer,
        connection: None,
    })
}

/// One HTTP/1.1 connection kept across requests, replaced after an error.
#[derive(Default)]
struct KeptTcp {
    stream: Option<TcpStream>,
    /// Connections opened so far.
    opened: u32,
}

impl KeptTcp {
    fn request(&mut self, to: SocketAddr) -> std::io::Result<Outcome> {
        let result = self.exchange(to);
        if result.is_err() {
            self.stream = None;
        }
        result.map(|mut o| {
            o.connection = Some(self.opened);
            o
        })
    }

    fn exchange(&mut self, to: SocketAddr) -> std::io::Result<Outcome> {
        let mut stream = match self.stream.take() {
            Some(s) => s,
            None => {
                let s = TcpStream::connect_timeout(&to, TIMEOUT)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                self.opened += 1;
                s
            }
        };
        stream.write_all(b"GET / HTTP/1.1\r\nHost: ekp-peer\r\n\r\n")?;
        let head = read_head(&mut stream)?;
        let head = String::from_utf8_lossy(&head).into_owned();
        let (head, mut body) = head
            .split_once("\r\n\r\n")
            .map(|(h, b)| (h.to_owned(), b.as_bytes().to_vec()))
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .ok_or_else(|| std::io::Error::other(format!("no Content-Length: {head:?}")))?;
        while body.len() < length {
            let mut buf = [0u8; 256];
            match stream.read(&mut buf)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => body.extend_from_slice(&buf[..n]),
            }
        }
        let peer = stream.peer_addr()?;
        self.stream = Some(stream);
        Ok(Outcome {
            answer: String::from_utf8_lossy(&body).trim().to_owned(),
            peer,
            connection: None,
        })
    }
}

/// A UDP socket of `to`'s family: `AF_INET6` for an IPv6 target, such as an IPv4-mapped
/// `[::ffff:10.96.0.10]:53`, as a dual-stack application would use.
fn udp_socket_for(to: SocketAddr) -> std::io::Result<UdpSocket> {
    match to {
        SocketAddr::V4(_) => UdpSocket::bind("0.0.0.0:0"),
        SocketAddr::V6(_) => UdpSocket::bind("[::]:0"),
    }
}

fn udp_request(to: SocketAddr) -> std::io::Result<Outcome> {
    udp_request_with(to, b"ping")
}

/// One request of `request`'s bytes on a new unconnected socket.
fn udp_request_with(to: SocketAddr, request: &[u8]) -> std::io::Result<Outcome> {
    let socket = udp_socket_for(to)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send_to(request, to)?;
    let mut buf = vec![0u8; 65536];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok(Outcome {
        answer: String::from_utf8_lossy(&buf[..n]).into_owned(),
        peer: from,
        connection: None,
    })
}

/// One UDP socket kept across requests (connected or not), replaced after an error.
struct KeptUdp {
    connected: bool,
    /// Connect the kept socket again before each request (`--reconnect`).
    reconnect: bool,
    socket: Option<UdpSocket>,
}

impl KeptUdp {
    fn new(connected: bool, reconnect: bool) -> Self {
        KeptUdp {
            connected,
            reconnect,
            socket: None,
        }
    }

    fn request(&mut self, to: SocketAddr) -> std::io::Result<Outcome> {
        let result = self.exchange(to);
        if result.is_err() {
            self.socket = None;
        }
        result
    }

    fn exchange(&mut self, to: SocketAddr) -> std::io::Result<Outcome> {
        let socket = match self.socket.take() {
            Some(s) if self.connected && self.reconnect => {
                s.connect(to)?;
                s
            }
            Some(s) => s,
            None => {
                let s = udp_socket_for(to)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                if self.connected {
                    s.connect(to)?;
                }
                s
            }
        };
        let mut buf = [0u8; 2048];
        let (n, peer) = if self.connected {
            socket.send(b"ping")?;
            let n = socket.recv(&mut buf)?;
            (n, socket.peer_addr()?)
        } else {
            socket.send_to(b"ping", to)?;
            socket.recv_from(&mut buf)?
        };
        self.socket = Some(socket);
        Ok(Outcome {
            answer: String::from_utf8_lossy(&buf[..n]).into_owned(),
            peer,
            connection: None,
        })
    }
}

fn udp_connected_request(to: SocketAddr) -> std::io::Result<Outcome> {
    let socket = udp_socket_for(to)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect(to)?;
    socket.send(b"ping")?;
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf)?;
    Ok(Outcome {
        answer: String::from_utf8_lossy(&buf[..n]).into_owned(),
        peer: socket.peer_addr()?,
        connection: None,
    })
}
