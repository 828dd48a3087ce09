//! `ekp-bench`: the servers and the latency client of `cargo xtask bench`.
//!
//! The client measures in-process with the monotonic clock, one operation after the other,
//! so that no process start ever enters a sample:
//!
//! - `connect ADDR`: a new TCP socket and `connect` per operation (closed with RST, so that
//!   no TIME_WAIT piles up on the client);
//! - `crr ADDR`: connect, one request, the response, close (the server closes first, as an
//!   HTTP/1.0 server does), a new connection each time;
//! - `rr ADDR`: request/response on one established connection;
//! - `udp ADDR`: a new unconnected UDP socket per request (`sendto`, `recvfrom`), like a
//!   DNS client;
//! - `udprr ADDR`: request/response on one unconnected UDP socket, kept for every request
//!   (`sendto` names the destination each time), like a DNS forwarder or a metrics client.
//!
//! `ADDR` may be a comma-separated list: each operation then goes to one of them at random
//! (`rr`, `udprr`: every operation to the one chosen for the connection or socket), as a
//! Service's translation spreads its connections over the endpoints and keeps a socket's
//! datagrams on one. The `direct` floor uses the same endpoints, so that both meet the same
//! servers and the same per-destination state.
//!
//! Options: `--count N` measured operations after `--warmup W` unmeasured ones,
//! `--timeout-ms T` per operation, `--raw` to add every sample (ns) to the summary,
//! `--stepped` to measure in steps a caller paces (below). The
//! output is one JSON object: samples, errors, p50/p90/p99/mean in µs, rate, and the SYNs
//! the client's kernel sent again during the measured operations (`syn_retransmits`, from
//! its network namespace's `TcpExt` counters; `null` if unreadable): a connection whose
//! first SYN went unanswered waits for the retransmission, so these explain outliers.
//!
//! `--stepped`: after the warm-up the client prints `ready`, then for each line `K` read on
//! its standard input makes K measured operations (at most the count left) and prints
//! `done`; at the end of its input it prints the summary. A caller that runs one such
//! client per mode and hands them steps in turn interleaves the modes operation by
//! operation, not batch by batch: what slows the machine for a while slows every mode
//! alike. The rate counts only the time spent in steps, and the SYNs resent are counted
//! per step, so that clients sharing a network namespace do not count each other's.
//!
//! `wait ADDR --answer NAME|any` prints `ready`, then makes request after request until
//! NAME answers and prints the CLOCK_MONOTONIC time (ns) of that answer, so that a caller
//! that noted the same clock before a change gets the time the change took to take effect.
//!
//! `idle-memory [--idle-ms MS]` characterizes the machine, not a mode: the cost of touching
//! a 4 KiB page again after it has been left alone for MS (default 1200, the bench's pause
//! between endpoint changes), against touching it again at once. Some virtual machines
//! make the first touch after a pause tens of µs per page, which every process that wakes
//! up to do some work pays for every page of code and data it touches.
//!
//! `hooks --cgroup DIR --device DEV...` attaches programs that do nothing (allow; next
//! program) at every hook the agent uses: `connect4`, `sendmsg4`, `recvmsg4`,
//! `getpeername4`, their IPv6 counterparts for IPv4-mapped addresses (`connect6`,
//! `recvmsg6`, `getpeername6`) and `sock_release` on the cgroup DIR, TCX ingress and egress
//! on each DEV (`--device` repeated; in the caller's network namespace). It prints `ready`
//! and holds them until it is killed, when the kernel detaches them. A client in DIR that
//! connects to pod addresses then pays what the hooks cost on their own, which no program
//! can take away: the bench's `hooks` mode.
//!
//! `nfacct NAME...` creates the nfacct counters NAME in the caller's network namespace (one
//! that exists is kept), as kube-proxy's iptables mode does when it starts: its rules count
//! through them (`-m nfacct`) once they exist, and `iptables-restore` rejects such a rule
//! before. The bench's `iptables` mode creates kube-proxy's two in its node.
//!
//! `serve --name NAME --tcp PORT --udp PORT` answers every request with NAME and a newline:
//! on TCP, `K` asks for an answer and keeps the connection, `C` for an answer and a close.
//! A few threads block in `accept` on the same socket, so no thread is spawned per
//! connection. Prints `ready` once bound.
//!
//! Not shipped in the container image; std, libc (SO_LINGER, the monotonic clock, bpf(2))
//! and serde_json only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Threads per TCP port, each serving one connection at a time: more than the connections
/// the bench keeps open to one server at once. Its `rr` clients, one per mode (five), each
/// hold a connection while the others take their turns; with fewer threads than that,
/// a connection beyond them went unanswered until the others closed.
const SERVER_THREADS: usize = 8;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("wait") => wait(&args[1..]),
        Some("idle-memory") => idle_memory(&args[1..]),
        Some("hooks") => hooks(&args[1..]),
        Some("nfacct") => nfacct(&args[1..]),
        Some(kind @ ("connect" | "crr" | "rr" | "udp" | "udprr")) => measure(kind, &args[1..]),
        _ => Err("usage: ekp-bench serve --name NAME [--tcp PORT]... [--udp PORT]... | \
                  (connect|crr|rr|udp|udprr) ADDR:PORT[,ADDR:PORT]... [--count N] [--warmup W] [--timeout-ms T] [--raw] | \
                  wait ADDR:PORT --answer NAME|any [--timeout-ms T] | idle-memory [--idle-ms MS] | \
                  hooks --cgroup DIR --device DEV... | nfacct NAME..."
            .into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ekp-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// Servers

fn serve(args: &[String]) -> Result<(), String> {
    let mut name = None;
    let (mut tcp_ports, mut udp_ports) = (Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--name" => name = Some(value.clone()),
            "--tcp" => tcp_ports.push(parse::<u16>(value, "port")?),
            "--udp" => udp_ports.push(parse::<u16>(value, "port")?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let name = name.ok_or("--name is required")?;
    let reply: &'static [u8] = Box::leak(format!("{name}\n").into_bytes().into_boxed_slice());
    let mut threads = Vec::new();
    for port in tcp_ports {
        let listener =
            TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind tcp {port}: {e}"))?;
        // std listens with a backlog of 128. A `connect` batch outruns the accepting
        // threads (the client shares their CPU); with the queue full the kernel drops SYNs,
        // and the client retransmits one a second later: a 1 s sample. Listening again
        // raises the backlog to the kernel's cap (`net.core.somaxconn`).
        // SAFETY: a valid, listening socket descriptor.
        if unsafe { libc::listen(listener.as_raw_fd(), libc::SOMAXCONN) } != 0 {
            return Err(format!(
                "listen tcp {port}: {}",
                std::io::Error::last_os_error()
            ));
        }
        for _ in 0..SERVER_THREADS {
            let listener = listener.try_clone().map_err(|e| e.to_string())?;
            threads.push(std::thread::spawn(move || {
                loop {
                    if let Ok((stream, _)) = listener.accept() {
                        let _ = answer_tcp(stream, reply);
                    }
                }
            }));
        }
    }
    for port in udp_ports {
        let socket =
            UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("bind udp {port}: {e}"))?;
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(reply, from);
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// `K`: answer, keep the connection; `C`: answer and close; EOF: close.
fn answer_tcp(mut stream: TcpStream, reply: &[u8]) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = [0u8; 64];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        for &byte in &buf[..n] {
            match byte {
                b'K' => stream.write_all(reply)?,
                b'C' => return stream.write_all(reply),
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client

struct Options {
    targets: Vec<SocketAddr>,
    count: usize,
    warmup: usize,
    timeout: Duration,
    raw: bool,
    stepped: bool,
}

/// Picks one of several targets per operation: xorshift64, seeded from the clock. Its few
/// instructions are the same in every mode, one target or two.
struct Picker(u64);

impl Picker {
    fn new() -> Self {
        Picker(monotonic_ns() | 1)
    }

    fn pick(&mut self, targets: &[SocketAddr]) -> SocketAddr {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        targets[(self.0 % targets.len() as u64) as usize]
    }
}

fn options(args: &[String]) -> Result<(Options, Vec<(String, String)>), String> {
    let targets = args
        .first()
        .ok_or("missing ADDR:PORT")?
        .split(',')
        .map(|t| {
            t.parse()
                .map_err(|e| format!("invalid ADDR:PORT {t:?}: {e}"))
        })
        .collect::<Result<Vec<SocketAddr>, String>>()?;
    let mut o = Options {
        targets,
        count: 1000,
        warmup: 50,
        timeout: Duration::from_secs(1),
        raw: false,
        stepped: false,
    };
    let mut rest = Vec::new();
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--raw" => {
                o.raw = true;
                continue;
            }
            "--stepped" => {
                o.stepped = true;
                continue;
            }
            _ => {}
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--count" => o.count = parse(value, "count")?,
            "--warmup" => o.warmup = parse(value, "warmup")?,
            "--timeout-ms" => o.timeout = Duration::from_millis(parse(value, "timeout")?),
            _ => rest.push((flag.clone(), value.clone())),
        }
    }
    Ok((o, rest))
}

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("invalid {what} {s:?}"))
}

fn measure(kind: &str, args: &[String]) -> Result<(), String> {
    let (o, rest) = options(args)?;
    if let Some((flag, _)) = rest.first() {
        return Err(format!("unknown flag {flag}"));
    }
    let mut picker = Picker::new();
    let timeout = o.timeout;
    // One operation towards the target picked for it (`rr`, `udprr`: that of its one
    // connection or socket).
    let mut op: Box<dyn FnMut(SocketAddr) -> std::io::Result<()>> = match kind {
        "rr" => {
            let target = picker.pick(&o.targets);
            let mut stream = TcpStream::connect_timeout(&target, timeout)
                .map_err(|e| format!("connecting to {target}: {e}"))?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            Box::new(move |_| exchange(&mut stream, b'K').map(|_| ()))
        }
        "udprr" => {
            let target = picker.pick(&o.targets);
            let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            socket
                .set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            Box::new(move |_| udp_exchange(&socket, target).map(|_| ()))
        }
        "connect" => Box::new(move |target| connect_once(target, timeout)),
        "crr" => Box::new(move |target| crr_once(target, timeout).map(|_| ())),
        _ => Box::new(move |target| udp_once(target, timeout).map(|_| ())),
    };
    let mut run = Measured::new(o.count);
    let mut ops = |run: &mut Measured, count: usize, measured: bool| {
        for _ in 0..count {
            let target = picker.pick(&o.targets);
            let started = Instant::now();
            let result = op(target);
            run.record(started, result, measured);
        }
    };
    ops(&mut run, o.warmup, false);
    if o.stepped {
        println!("ready");
        std::io::stdout().flush().map_err(|e| e.to_string())?;
        let mut left = o.count;
        for line in std::io::stdin().lines() {
            let line = line.map_err(|e| format!("reading a step: {e}"))?;
            let step = parse::<usize>(line.trim(), "step")?.min(left);
            run.step(|run| ops(run, step, true));
            left -= step;
            println!("done");
            std::io::stdout().flush().map_err(|e| e.to_string())?;
        }
    } else {
        run.step(|run| ops(run, o.count, true));
    }
    let busy = run.busy.as_secs_f64();
    let mut summary = summarize(kind, &o, run.samples, run.errors, run.first_error, busy);
    summary["syn_retransmits"] = serde_json::json!(run.syn_retransmits);
    println!("{summary}");
    Ok(())
}

/// What the measured operations gave, step by step.
struct Measured {
    samples: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    /// Time spent in steps, for the rate.
    busy: Duration,
    /// SYNs resent during steps; `None` once a count was unreadable.
    syn_retransmits: Option<u64>,
}

impl Measured {
    fn new(count: usize) -> Self {
        Measured {
            samples: Vec::with_capacity(count),
            errors: 0,
            first_error: None,
            busy: Duration::ZERO,
            syn_retransmits: Some(0),
        }
    }

    /// An operation started at `started` ended with `result`; warm-up ones
    /// (`measured: false`) count their errors only.
    fn record(&mut self, started: Instant, result: std::io::Result<()>, measured: bool) {
        let elapsed = started.elapsed().as_nanos() as u64;
        match result {
            Ok(()) if measured => self.samples.push(elapsed),
            Ok(()) => {}
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Runs one step of measured operations, timing it and counting its resent SYNs.
    fn step(&mut self, ops: impl FnOnce(&mut Self)) {
        let resent_before = syn_retransmits();
        let started = Instant::now();
        ops(self);
        self.busy += started.elapsed();
        let resent = syn_retransmits()
            .zip(resent_before)
            .map(|(after, before)| after.saturating_sub(before));
        self.syn_retransmits = self.syn_retransmits.zip(resent).map(|(a, b)| a + b);
    }
}

/// The network namespace's count of retransmitted SYNs (`TcpExt: TCPSynRetrans` in
/// /proc/net/netstat: a header line of names, then a line of values); `None` if unreadable.
fn syn_retransmits() -> Option<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names
        .split_whitespace()
        .position(|n| n == "TCPSynRetrans")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

fn summarize(
    kind: &str,
    o: &Options,
    mut samples: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    elapsed: f64,
) -> serde_json::Value {
    let raw = o.raw.then(|| samples.clone());
    samples.sort_unstable();
    let pct = |p: f64| -> Option<f64> {
        if samples.is_empty() {
            return None;
        }
        // Nearest rank.
        let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        Some(samples[rank.clamp(1, samples.len()) - 1] as f64 / 1000.0)
    };
    let mean = (!samples.is_empty())
        .then(|| samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1000.0);
    let mut v = serde_json::json!({
        "kind": kind,
        "targets": o.targets.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "samples": samples.len(),
        "errors": errors,
        "first_error": first_error,
        "p50_us": pct(50.0),
        "p90_us": pct(90.0),
        "p99_us": pct(99.0),
        "mean_us": mean,
        "rate_per_s": if elapsed > 0.0 { samples.len() as f64 / elapsed } else { 0.0 },
    });
    if let Some(raw) = raw {
        v["samples_ns"] = serde_json::json!(raw);
    }
    v
}

fn connect_once(target: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let stream = TcpStream::connect_timeout(&target, timeout)?;
    reset_on_close(&stream);
    Ok(())
}

/// SO_LINGER {on, 0}: close sends RST and leaves no TIME_WAIT behind.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Connect, ask, read the answer up to the server's close; returns the answer.
fn crr_once(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"C")?;
    let mut answer = Vec::with_capacity(64);
    stream.read_to_end(&mut answer)?;
    answer_text(&answer)
}

/// Sends `request` and reads one answer line.
fn exchange(stream: &mut TcpStream, request: u8) -> std::io::Result<String> {
    stream.write_all(&[request])?;
    let mut answer = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !answer.ends_with(b"\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        answer.extend_from_slice(&buf[..n]);
    }
    answer_text(&answer)
}

fn udp_once(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(timeout))?;
    udp_exchange(&socket, target)
}

/// One request and its answer on `socket`.
fn udp_exchange(socket: &UdpSocket, target: SocketAddr) -> std::io::Result<String> {
    socket.send_to(b"K", target)?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf)?;
    answer_text(&buf[..n])
}

fn answer_text(bytes: &[u8]) -> std::io::Result<String> {
    let text = String::from_utf8_lossy(bytes).trim().to_owned();
    if text.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "empty answer",
        ));
    }
    Ok(text)
}

/// CLOCK_MONOTONIC in ns: the same clock in every process of the machine.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn idle_memory(args: &[String]) -> Result<(), String> {
    let mut idle = Duration::from_millis(1200);
    for pair in args.chunks(2) {
        match pair {
            [flag, ms] if flag == "--idle-ms" => idle = Duration::from_millis(parse(ms, "idle")?),
            _ => return Err(format!("unknown arguments {pair:?}")),
        }
    }
    const PAGE: usize = 4096;
    const PAGES: usize = 16384; // 64 MiB
    const TOUCHED: usize = 256;
    let mut memory = vec![1u8; PAGE * PAGES];
    // Pages far apart in a fixed scattered order, so that no prefetcher helps.
    let pages: Vec<usize> = (0..TOUCHED).map(|i| (i * 7919) % PAGES).collect();
    let touch = |memory: &mut [u8]| {
        let started = Instant::now();
        for p in &pages {
            let b = &mut memory[p * PAGE];
            *b = std::hint::black_box(b.wrapping_add(1));
        }
        started.elapsed().as_secs_f64() * 1e6 / TOUCHED as f64
    };
    let (mut warm, mut after_idle) = (Vec::new(), Vec::new());
    touch(&mut memory);
    for _ in 0..3 {
        warm.push(touch(&mut memory));
        std::thread::sleep(idle);
        after_idle.push(touch(&mut memory));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let v = serde_json::json!({
        "idle_ms": idle.as_millis() as u64,
        "warm_us_per_page": median(&mut warm),
        "idle_us_per_page": median(&mut after_idle),
    });
    println!("{v}");
    Ok(())
}

fn wait(args: &[String]) -> Result<(), String> {
    let (mut o, rest) = options(args)?;
    let mut answer = None;
    let mut limit = Duration::from_secs(60);
    for (flag, value) in rest {
        match flag.as_str() {
            "--answer" => answer = Some(value),
            "--limit-ms" => limit = Duration::from_millis(parse(&value, "limit")?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let answer = answer.ok_or("--answer is required")?;
    let [target] = o.targets[..] else {
        return Err("wait takes one ADDR:PORT".into());
    };
    o.timeout = o.timeout.min(Duration::from_millis(200));
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut attempts = 0u64;
    let mut last_error = String::new();
    while started.elapsed() < limit {
        attempts += 1;
        match crr_once(target, o.timeout) {
            Ok(got) if answer == "any" || got == answer => {
                let seen = monotonic_ns();
                let v = serde_json::json!({"seen_ns": seen, "attempts": attempts, "answer": got});
                println!("{v}");
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => last_error = e.to_string(),
        }
        // Paced, whatever the answer: a prober spinning on the old endpoint would take the
        // cores the change is being programmed with (2 on the reference machine), and time
        // its own contention. The pause bounds the resolution (200 µs + one exchange).
        std::thread::sleep(Duration::from_micros(200));
    }
    Err(format!(
        "{answer} did not answer at {target} within {limit:?} ({attempts} attempts, last error: {last_error})"
    ))
}

// ---------------------------------------------------------------------------------------
// Programs that do nothing, at the agent's hooks

/// bpf(2) commands, program types and attach types (uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const PROG_TYPE_SCHED_CLS: u32 = 3;
const PROG_TYPE_CGROUP_SOCK: u32 = 9;
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_UDP4_SENDMSG: u32 = 14;
const ATTACH_UDP4_RECVMSG: u32 = 19;
const ATTACH_INET4_GETPEERNAME: u32 = 29;
const ATTACH_INET6_CONNECT: u32 = 11;
const ATTACH_UDP6_RECVMSG: u32 = 20;
const ATTACH_INET6_GETPEERNAME: u32 = 30;
const ATTACH_INET_SOCK_RELEASE: u32 = 34;
const ATTACH_TCX_INGRESS: u32 = 46;
const ATTACH_TCX_EGRESS: u32 = 47;
/// What a cgroup program returns to let the operation go on unchanged.
const CGROUP_ALLOW: i32 = 1;
/// `TCX_NEXT`: no verdict, on to the next program or the stack (what the agent's TCX
/// programs return for traffic that is not theirs).
const TCX_NEXT: i32 = -1;

fn hooks(args: &[String]) -> Result<(), String> {
    let (mut cgroup, mut devices) = (None, Vec::new());
    for pair in args.chunks(2) {
        match pair {
            [flag, dir] if flag == "--cgroup" => cgroup = Some(dir.clone()),
            [flag, dev] if flag == "--device" => devices.push(dev.clone()),
            _ => return Err(format!("unknown arguments {pair:?}")),
        }
    }
    let cgroup = cgroup.ok_or("--cgroup is required")?;
    if devices.is_empty() {
        return Err("--device is required".into());
    }
    let cgroup_dir = std::fs::File::open(&cgroup).map_err(|e| format!("opening {cgroup}: {e}"))?;
    let cgroup_fd = cgroup_dir.as_raw_fd() as u32;
    let mut hooks = vec![
        (
            PROG_TYPE_CGROUP_SOCK_ADDR,
            ATTACH_INET4_CONNECT,
            CGROUP_ALLOW,
            cgroup_fd,
        ),
        (
            PROG_TYPE_CGROUP_SOCK_ADDR,
            ATTACH_UDP4_SENDMSG,
            CGROUP_ALLOW,
            cgroup_fd,
        ),
        (
            PROG_TYPE_CGROUP_SOCK_ADDR,
            ATTACH_UDP4_RECVMSG,
            CGROUP_ALLOW,
            cgroup_fd,
        ),
        (
            PROG_TYPE_CGROUP_SOCK_ADDR,
            ATTACH_INET4_GETPEERNAME,
            CGROUP_ALLOW,
            cgroup_fd,
        ),
        (
            PROG_TYPE_CGROUP_SOCK_ADDR,
            ATTACH_INET6_CONNECT,
            CGROUP_ALLOW,
            cgroup_fd,
        ),
        (
            PROG_TYPE_CGROUP_SOCK_ADDR,
            ATTACH_UDP6_RECVMSG,
            CGROUP_ALLOW,
            cgroup_fd,
        ),
        (
            PROG_TYPE_CGROUP_SOCK_ADDR,
            ATTACH_INET6_GETPEERNAME,
            CGROUP_ALLOW,
            cgroup_fd,
        ),
        (
            PROG_TYPE_CGROUP_SOCK,
            ATTACH_INET_SOCK_RELEASE,
            CGROUP_ALLOW,
            cgroup_fd,
        ),
    ];
    for device in &devices {
        let name = std::ffi::CString::new(device.as_str()).map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated name; returns 0 when there is no such device.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(format!("no device {device} in this network namespace"));
        }
        hooks.push((PROG_TYPE_SCHED_CLS, ATTACH_TCX_INGRESS, TCX_NEXT, ifindex));
        hooks.push((PROG_TYPE_SCHED_CLS, ATTACH_TCX_EGRESS, TCX_NEXT, ifindex));
    }
    // Held until the process ends: closing a link's last descriptor detaches it.
    let mut held = Vec::new();
    for (prog_type, attach_type, verdict, target) in hooks {
        let prog = load_nop(prog_type, attach_type, verdict)
            .map_err(|e| format!("loading a program for attach type {attach_type}: {e}"))?;
        let link = link_create(&prog, target, attach_type)
            .map_err(|e| format!("attaching at attach type {attach_type}: {e}"))?;
        held.push((prog, link));
    }
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    loop {
        // SAFETY: waits for a signal; the caller ends us with one.
        unsafe { libc::pause() };
    }
}

/// `bpf(cmd, attr)` for a command that returns a new descriptor.
fn bpf_fd(cmd: libc::c_long, attr: &mut [u8; 144]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-filled `union bpf_attr` (the kernel reads the command's
    // fields and requires every byte beyond those it knows to be zero), valid for the size
    // passed; the pointers in it are valid for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads `r0 = verdict; exit`, a program of `prog_type` for `attach_type`.
fn load_nop(prog_type: u32, attach_type: u32, verdict: i32) -> std::io::Result<OwnedFd> {
    // `struct bpf_insn`: opcode, registers (dst in the low nibble), offset, immediate.
    let mut insns = [0u8; 16];
    insns[0] = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K, dst r0
    insns[4..8].copy_from_slice(&verdict.to_le_bytes());
    insns[8] = 0x95; // BPF_JMP | BPF_EXIT
    let license = c"GPL";
    let mut attr = [0u8; 144];
    attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..56].copy_from_slice(b"ekp_nop\0");
    attr[68..72].copy_from_slice(&attach_type.to_ne_bytes());
    bpf_fd(BPF_PROG_LOAD, &mut attr)
}

/// Attaches `prog` to `target` (a cgroup descriptor, or an ifindex for TCX) with a link.
fn link_create(prog: &OwnedFd, target: u32, attach_type: u32) -> std::io::Result<OwnedFd> {
    let mut attr = [0u8; 144];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&target.to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// nfnetlink's accounting subsystem (`NFNL_SUBSYS_ACCT`) and its "new counter" message.
const NFNL_SUBSYS_ACCT: u16 = 7;
const NFNL_MSG_ACCT_NEW: u16 = 0;
const NFACCT_NAME: u16 = 1;

fn nfacct(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err("nfacct needs at least one counter name".into());
    }
    // SAFETY: a plain socket(2) call; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(format!(
            "netfilter netlink socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    for (seq, name) in names.iter().enumerate() {
        let request = nfacct_new_message(name, seq as u32 + 1)?;
        match netlink_ack(&socket, &request) {
            // EBUSY: a counter of that name exists (created without NLM_F_REPLACE).
            Ok(()) | Err(libc::EBUSY) => {}
            Err(errno) => {
                return Err(format!(
                    "nfacct counter {name}: {}",
                    std::io::Error::from_raw_os_error(errno)
                ));
            }
        }
    }
    Ok(())
}

/// `NFNL_MSG_ACCT_NEW` for the counter `name`: netlink header, nfgenmsg (AF_UNSPEC,
/// version 0), the `NFACCT_NAME` attribute (NUL-terminated, padded to 4 bytes).
fn nfacct_new_message(name: &str, seq: u32) -> Result<Vec<u8>, String> {
    // The kernel's NFACCT_NAME_MAX is 32, the NUL included.
    if name.is_empty() || name.len() > 31 || name.contains('\0') {
        return Err(format!("{name:?} is not an nfacct counter name"));
    }
    let attr_len = 4 + name.len() + 1;
    let padded = attr_len.next_multiple_of(4);
    let total = 16 + 4 + padded;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_ACCT << 8) | NFNL_MSG_ACCT_NEW).to_ne_bytes());
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE;
    m.extend_from_slice(&(flags as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&NFACCT_NAME.to_ne_bytes());
    m.extend_from_slice(name.as_bytes());
    m.resize(total, 0);
    Ok(m)
}

/// Sends one request to the kernel and reads its acknowledgement: `Err(errno)` if the
/// kernel refused it (or the exchange failed).
fn netlink_ack(socket: &OwnedFd, request: &[u8]) -> Result<(), i32> {
    let last_errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: an all-zero sockaddr_nl is valid; family set below (pid 0: the kernel).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: the buffer and the address outlive the call.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(last_errno());
    }
    let mut answer = [0u8; 4096];
    // SAFETY: the buffer outlives the call.
    let got = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            answer.as_mut_ptr().cast(),
            answer.len(),
            0,
        )
    };
    if got < 0 {
        return Err(last_errno());
    }
    // nlmsghdr (16 bytes), then for NLMSG_ERROR the negative errno (0: acknowledged).
    let answer = &answer[..got as usize];
    if answer.len() < 20 || u16::from_ne_bytes([answer[4], answer[5]]) != libc::NLMSG_ERROR as u16 {
        return Err(libc::EPROTO);
    }
    let error = i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]);
    if error == 0 { Ok(()) } else { Err(-error) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_nfacct_request_names_its_counter_in_a_padded_attribute() {
        let m = nfacct_new_message("ct_state_invalid_dropped_pkts", 7).expect("valid name");
        // 16 (nlmsghdr) + 4 (nfgenmsg) + 4 + 30 padded to 36 (the attribute).
        assert_eq!(m.len(), 56);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 56);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 7 << 8);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(u16::from_ne_bytes([m[20], m[21]]), 34);
        assert_eq!(u16::from_ne_bytes([m[22], m[23]]), NFACCT_NAME);
        assert_eq!(&m[24..53], b"ct_state_invalid_dropped_pkts");
        assert!(m[53..].iter().all(|b| *b == 0));
        assert!(nfacct_new_message("", 1).is_err());
        assert!(nfacct_new_message(&"x".repeat(32), 1).is_err());
    }
}
