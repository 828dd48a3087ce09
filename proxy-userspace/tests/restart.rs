//! Privileged: the agent killed and restarted while clients connect (BEHAVIOUR C33).
//! Pinned maps and links keep translating while no agent runs; a new agent adopts them
//! (atomic program replacement, no flush) and applies what changed while it was down.

mod common;

use common::{Harness, service, slice};

#[test]
fn c33_sigkill_and_restart_loses_no_connection_and_applies_changes_made_while_down() {
    let mut h = Harness::new("restart", &["pod-a", "pod-b"]);
    let _servers = h.serve(&[8080], &[5353]);
    h.write_web_with_dns("10.96.0.10");
    h.start_agent();
    let both = ["10.244.0.10:8080", "10.244.0.11:8080"];
    h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&both));

    // Clients run through all restarts: new TCP connections and UDP requests in a loop.
    // Paced (1 ms apart) so that they span several restarts on any machine.
    let mut tcp = h.spawn_client("tcp", &["tcp", "10.96.0.10:80", "3000", "--every-ms", "1"]);
    let mut udp = h.spawn_client("udp", &["udp", "10.96.0.10:53", "3000", "--every-ms", "1"]);

    // Restart until the clients are done; count the restarts that happened entirely while
    // both were still sending.
    let mut restarts_under_load = 0;
    let mut round = 0;
    loop {
        if !(tcp.running() && udp.running()) {
            break;
        }
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
        // Ready again: the adopted state is listed, and after round 2 the new Service too.
        h.wait_for_frontend("10.96.0.10:80", "TCP", Some(&both));
        if round >= 2 {
            h.wait_for_frontend("10.96.0.20:80", "TCP", Some(&["10.244.0.11:8080"]));
        }
        if tcp.running() && udp.running() {
            restarts_under_load += 1;
        }
        round += 1;
    }
    assert!(
        restarts_under_load >= 5,
        "only {restarts_under_load} restarts happened while the clients ran; make them longer"
    );
    assert!(
        round > 2,
        "the change made while the agent was down was never exercised"
    );

    for (what, client) in [("TCP", tcp), ("UDP", udp)] {
        let lines = client.lines();
        assert_eq!(lines.len(), 3000, "{what}");
        let failed: Vec<_> = lines.iter().filter(|l| l["ok"] != true).collect();
        assert!(
            failed.is_empty(),
            "{what}: {} failed, e.g. {}",
            failed.len(),
            failed[0]
        );
    }
}
