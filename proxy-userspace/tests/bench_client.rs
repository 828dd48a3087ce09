//! `ekp-bench`'s latency client with `--stepped`, as `cargo xtask bench` drives it: it
//! makes its warm-up, then exactly the operations each step hands it, and no more than its
//! count. Unprivileged: a UDP responder of the test's own on loopback.

use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const BENCH: &str = env!("CARGO_BIN_EXE_ekp-bench");

/// Answers every datagram on 127.0.0.1 and counts them.
fn responder() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = socket.local_addr().expect("its address");
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = socket.send_to(b"pod-a\n", from);
        }
    });
    (addr, seen)
}

/// Killed on drop, should an assertion fail first.
struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stepped_client_makes_the_operations_each_step_hands_it() {
    let (addr, seen) = responder();
    let mut client = Client(
        Command::new(BENCH)
            .args(["udp", &addr.to_string(), "--count", "25", "--warmup", "3"])
            .args(["--timeout-ms", "2000", "--raw", "--stepped"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start ekp-bench"),
    );
    let mut stdin = client.0.stdin.take().expect("piped");
    let mut stdout = BufReader::new(client.0.stdout.take().expect("piped"));
    let mut line = String::new();
    let mut next_line = |stdout: &mut BufReader<_>| {
        line.clear();
        stdout.read_line(&mut line).expect("read a line");
        line.trim_end().to_owned()
    };

    assert_eq!(next_line(&mut stdout), "ready");
    // Each request was answered before the client went on, so the count is exact.
    assert_eq!(
        seen.load(Ordering::SeqCst),
        3,
        "the warm-up only, before any step"
    );
    for (step, total) in [(10, 13), (10, 23), (10, 28)] {
        writeln!(stdin, "{step}").expect("hand a step");
        assert_eq!(next_line(&mut stdout), "done");
        assert_eq!(
            seen.load(Ordering::SeqCst),
            total,
            "after a step of {step} (the last one cut to the 5 left)"
        );
    }
    drop(stdin);
    let summary: serde_json::Value =
        serde_json::from_str(&next_line(&mut stdout)).expect("a JSON summary");
    assert_eq!(summary["samples"], 25);
    assert_eq!(summary["errors"], 0);
    assert_eq!(summary["samples_ns"].as_array().map(Vec::len), Some(25));
    assert!(
        summary["rate_per_s"].as_f64().is_some_and(|r| r > 0.0),
        "{summary}"
    );
    let status = client.0.wait().expect("wait");
    assert!(status.success(), "{status}");
}
