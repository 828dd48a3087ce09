//! Privileged: the agent killed and restarted while clients connect (BEHAVIOUR C33).
//! Pinned maps and links keep translating while no agent runs; a new agent adopts them
//! (atomic program replacement, no flush) and applies what changed while it was down.

mod common;

use std::os::fd::AsRawFd;

use common::{Harness, Pins, service, slice};
use proxy_userspace::dataplane;

#[test]
fn c33_sigkill_and_restart_loses_no_connection_and_applies_changes_made_while_down() {
    let mut h = Harness::new("restart", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[5353]);
    h.write_web_with_dns("10.96.0.10");
    h.start_agent();
    let both = ["10.244.0.10:8080", "10.244.0.11:8080"];
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&both));

    // Clients run through all restarts: new TCP connections and UDP requests in a loop,
    // 1 ms apart, for as long as the test takes (they are stopped at its end).
    let tcp = h.spawn_client(
        "tcp",
        &["tcp", "10.96.0.10:80", "1000000", "--every-ms", "1"],
    );
    let udp = h.spawn_client(
        "udp",
        &["udp", "10.96.0.10:53", "1000000", "--every-ms", "1"],
    );
    tcp.wait_for_lines(1);
    udp.wait_for_lines(1);

    for round in 0..6 {
        h.kill_agent();
        if round == 2 {
            // While no agent runs: a second Service appears.
            h.write_manifest(
                "later.yaml",
                &service("later", "10.96.0.20", &[("http", 80, "TCP")]),
            );
            h.write_manifest(
                "later-eps.yaml",
                &slice(
                    "later-1",
                    "later",
                    &[("http", 8080, "TCP")],
                    &[("10.244.0.11", true)],
                ),
            );
        }
        h.start_agent();
        // Ready again: this start has loaded its programs and adopted the pins (the log
        // says so once per start; the pinned maps alone would list the frontends at once).
        h.wait_for_ready_starts(round + 2);
        if round >= 2 {
            h.wait_for_frontend("10.96.0.20:80", "TCP", Some(&["10.244.0.11:8080"]));
        }
        // Both clients were answered through this restart, and after it.
        let (t, u) = (tcp.lines_so_far(), udp.lines_so_far());
        tcp.wait_for_lines(t + 20);
        udp.wait_for_lines(u + 20);
    }

    for (what, client) in [("TCP", &tcp), ("UDP", &udp)] {
        let lines = client.lines_now();
        let failed: Vec<_> = lines.iter().filter(|l| l["ok"] != true).collect();
        assert!(
            failed.is_empty(),
            "{what}: {} failed, e.g. {}",
            failed.len(),
            failed[0]
        );
    }
}

/// Two agents on one pin directory would hand out backend and rev-NAT ids from two mirrors
/// of the maps, each overwriting the other's writes: a second one (a renamed release's
/// DaemonSet starting while the old one's pods still run) waits until the first stops,
/// then takes over.
#[test]
fn a_second_agent_on_the_same_pins_waits_for_the_first_to_stop() {
    let mut h = Harness::new("pin-lock", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[5353]);
    h.write_web_with_dns("10.96.0.10");
    h.start_agent();
    h.wait_for_ready_starts(1);
    let _second = h.spawn_second_agent();
    h.wait_for_log("another ebpf-kube-proxy holds the pin directory");
    h.stop_agent();
    h.wait_for_ready_starts(2);
    let both = ["10.244.0.10:8080", "10.244.0.11:8080"];
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&both));
}

/// The lock is the directory's: an agent that waited while the directory was removed (by
/// hand, or by a `cleanup` of a version before the lock) and got the lock of the removed
/// one locks the directory now at the path, so that a third agent cannot take it beside it.
#[test]
fn the_pin_lock_follows_a_directory_removed_while_an_agent_waited() {
    let pins = Pins::new("pin-relock");
    let first =
        dataplane::lock_pin_dir(&pins.0, || panic!("nobody holds it yet")).expect("the first lock");
    let (waiting_tx, waiting_rx) = std::sync::mpsc::channel();
    let path = pins.0.clone();
    let second = std::thread::spawn(move || {
        dataplane::lock_pin_dir(&path, || {
            let _ = waiting_tx.send(());
        })
    });
    waiting_rx
        .recv_timeout(common::CONDITION_LIMIT)
        .expect("the second waits");
    std::fs::remove_dir_all(&pins.0).expect("removing the pin directory");
    drop(first);
    let _second = second
        .join()
        .expect("the second lock's thread")
        .expect("the second lock");
    // A third finds the directory at the path locked.
    let dir = std::fs::File::open(&pins.0).expect("the directory at the path");
    // SAFETY: a plain syscall on an open descriptor.
    let locked = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(locked, -1, "the directory at the path is not locked");
}

/// `cleanup` under a running agent would unpin the maps it writes, and its programs would
/// detach when it stops: refused while the agent holds the pin directory, done once it
/// stopped.
#[test]
fn cleanup_is_refused_while_an_agent_runs() {
    let mut h = Harness::new("cleanup-refused", &["pod-a"]);
    h.write_web_with_dns("10.96.0.10");
    h.start_agent();
    h.wait_for_ready_starts(1);
    let pin_path = h.pin_path.clone();
    let cleanup = || {
        std::process::Command::new(common::AGENT)
            .arg("--pin-path")
            .arg(&pin_path)
            .arg("cleanup")
            .output()
            .expect("running cleanup")
    };
    let refused = cleanup();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("an agent runs on"),
        "{refused:?}"
    );
    assert!(h.pin_path.join("maps").exists(), "the maps were unpinned");
    h.stop_agent();
    let done = cleanup();
    assert!(done.status.success(), "{done:?}");
    assert!(
        !h.pin_path.exists(),
        "{} still exists",
        h.pin_path.display()
    );
}

/// `cleanup-iptables` removes kube-proxy's rules only where an agent serves the node (its
/// rules may be all the node has): refused while nothing holds the pin directory, or while
/// something holds it but no programs are attached; done while the agent runs; refused
/// again once it stopped, unless `--without-agent`. Run in the node's namespace, which
/// holds nothing of kube-proxy's: nothing is removed either way.
#[test]
fn cleanup_iptables_runs_only_where_an_agent_serves() {
    let mut h = Harness::new("cleanup-iptables", &["pod-a"]);
    h.write_web_with_dns("10.96.0.10");
    let cleanup = |h: &Harness, extra: &[&str]| {
        let mut command = h
            .topo
            .node
            .command(common::AGENT, None)
            .expect("a command in the node's namespace");
        command
            .arg("--pin-path")
            .arg(&h.pin_path)
            .arg("cleanup-iptables")
            .args(extra);
        command.output().expect("running cleanup-iptables")
    };
    let refused = |out: std::process::Output, why: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && stderr.contains(why),
            "not refused for {why:?}: {out:?}"
        );
    };
    refused(cleanup(&h, &[]), "no ebpf-kube-proxy agent runs");
    {
        let _held = dataplane::lock_pin_dir(&h.pin_path, || panic!("nobody holds it yet"))
            .expect("locking the pin directory");
        refused(cleanup(&h, &[]), "has not attached its programs");
    }
    h.start_agent();
    h.wait_for_ready_starts(1);
    let served = cleanup(&h, &[]);
    assert!(served.status.success(), "{served:?}");
    h.stop_agent();
    refused(cleanup(&h, &[]), "no ebpf-kube-proxy agent runs");
    let forced = cleanup(&h, &["--without-agent"]);
    assert!(forced.status.success(), "{forced:?}");
}

/// Two agents on two pin directories (a changed `bpf.pinPath`, a renamed release) both
/// translate, and the lock on a directory cannot tell. The second finds the first's
/// programs on its cgroup, names each in its log and counts them in a metric; its full
/// syncs look again, and the count drops once those programs are gone.
#[test]
fn an_agent_finds_the_programs_another_pin_directory_attached() {
    let mut h = Harness::new("foreign", &["pod-a"]);
    h.write_web_with_dns("10.96.0.10");
    h.start_agent();
    h.wait_for_ready_starts(1);

    let other = Pins::new("foreign-other");
    let log = Log::beside(&other);
    let agent = std::process::Command::new(common::AGENT);
    let _second = h.spawn_agent_on(agent, &other.0, &log.0, &["--sync-period", "1s"]);
    let found = "another agent's program is attached here";
    // The socket programs; the kernel keeps 15 bytes of a name (`ekp_sock_releas`).
    let programs = dataplane::SOCK_PROGRAMS.map(|name| name.get(..15).unwrap_or(name));
    log.wait_for("named the first agent's programs", &|text| {
        text.lines().filter(|l| l.contains(found)).count() >= programs.len()
    });
    let text = log.read();
    let named: Vec<&str> = text.lines().filter(|l| l.contains(found)).collect();
    assert_eq!(named.len(), programs.len(), "{named:#?}");
    let cgroup = format!("at=cgroup {}", h.topo.cgroup.path().display());
    for program in programs {
        assert!(
            named
                .iter()
                .any(|l| l.contains(&format!("program={program} ")) && l.contains(&cgroup)),
            "{program} not named on {cgroup}: {named:#?}"
        );
    }
    let metrics = common::address_after(&text, "serving metrics on http://");
    assert_eq!(
        sample(&metrics, "ebpf_kube_proxy_foreign_programs "),
        Some(programs.len() as f64)
    );

    // The first agent stopped and its pins removed (its links with them): gone at the
    // second's next full sync.
    h.stop_agent();
    common::cleanup_pins(&h.pin_path);
    log.wait_for("saw the programs go", &|text| {
        text.contains("no other agent's programs are attached here any more")
    });
    assert_eq!(
        sample(&metrics, "ebpf_kube_proxy_foreign_programs "),
        Some(0.0)
    );
}

/// Without `CAP_SYS_ADMIN` the agent cannot name the programs attached beside its own
/// (`BPF_PROG_GET_FD_BY_ID`): it says so once, however many full syncs look again.
#[test]
fn without_sys_admin_the_look_for_other_agents_programs_fails_once() {
    let mut h = Harness::new("foreign-noadm", &["pod-a"]);
    h.write_web_with_dns("10.96.0.10");
    h.start_agent();
    h.wait_for_ready_starts(1);

    let other = Pins::new("foreign-noadm-other");
    let log = Log::beside(&other);
    let agent = common::agent_with_capabilities(&["bpf", "net_admin", "perfmon"]);
    let _second = h.spawn_agent_on(agent, &other.0, &log.0, &["--sync-period", "1s"]);
    let failed = "looking for other agents' programs failed";
    log.wait_for("said it could not look", &|text| text.contains(failed));
    let metrics = common::address_after(&log.read(), "serving metrics on http://");
    // Three more full syncs, a second apart, looked again.
    let full_syncs = "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} ";
    let deadline = std::time::Instant::now() + common::CONDITION_LIMIT;
    while sample(&metrics, full_syncs).unwrap_or(0.0) < 4.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no four full syncs: {:?}",
            sample(&metrics, full_syncs)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let text = log.read();
    assert_eq!(text.matches(failed).count(), 1, "{text}");
    assert!(text.contains("needs CAP_SYS_ADMIN"), "{text}");
}

/// The value of the first metrics sample whose line starts with `prefix`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    let (_, text) = common::http_get(metrics, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// The log of an agent beside the harness's, removed when the test ends (and shown if it
/// failed).
struct Log(std::path::PathBuf);

impl Log {
    /// A log named after the pin directory `pins`.
    fn beside(pins: &Pins) -> Self {
        let name = pins
            .0
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("agent");
        Log(std::env::temp_dir().join(format!("{name}.log")))
    }

    fn read(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }

    /// Waits until `done` holds for the log's text.
    fn wait_for(&self, what: &str, done: &dyn Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + common::CONDITION_LIMIT;
        while !done(&self.read()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the second agent never {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.0.display(), self.read());
        }
        let _ = std::fs::remove_file(&self.0);
    }
}
