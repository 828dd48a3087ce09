//! Latency clients measured in turns: one `ekp-bench --stepped` client per mode, each
//! started and warmed up, then handed a few operations in turn until every one has made
//! its count.
//!
//! Modes measured batch after batch (a tenth of a second or more each) meet whatever slows
//! a virtual machine for a while (another guest, the host) at different times: on the AMD
//! VM, one round's p50 ratio of two modes ranged from 0.56 to 1.61 where the programs
//! differ by a few percent. In turns of [`STEP_OPS`] operations, a millisecond or so, the
//! modes meet it alike. The order of the clients rotates from turn to turn, so that none
//! always follows the same one.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context, Result, bail};
use xtask::cmd;

/// Operations per client and turn.
pub const STEP_OPS: usize = 10;

/// A started `ekp-bench --stepped` client, past its warm-up; killed and reaped on drop.
pub struct Stepped {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Stepped {
    /// Starts `command` (an `ekp-bench` client with `--stepped`) and waits for its `ready`;
    /// `what` names it in errors.
    pub fn start(mut command: Command, what: String) -> Result<Self> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("starting `{}`", cmd::display(&command)))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("stdout was piped")?);
        let mut client = Stepped {
            what,
            child,
            stdin,
            stdout,
        };
        client.expect("ready")?;
        Ok(client)
    }

    /// Hands the client `ops` operations and waits until it made them.
    pub fn step(&mut self, ops: usize) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the client's input is closed")?;
        writeln!(stdin, "{ops}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("{}: handing over a step", self.what))?;
        self.expect("done")
    }

    /// Ends the client's input and returns what it printed last (its summary).
    pub fn finish(mut self) -> Result<String> {
        drop(self.stdin.take());
        let mut summary = String::new();
        self.stdout.read_to_string(&mut summary)?;
        let status = self.child.wait()?;
        if !status.success() {
            let said = self.stderr();
            bail!("{}: {status}: {said}", self.what);
        }
        Ok(summary)
    }

    fn expect(&mut self, word: &str) -> Result<()> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.trim_end() != word {
            // Usually it exited; should it have printed something else, it must not be
            // left waiting for a step that never comes.
            let _ = self.child.kill();
            let _ = self.child.wait();
            let said = self.stderr();
            bail!("{}: expected {word:?}, got {line:?}: {said}", self.what);
        }
        Ok(())
    }

    /// What the client said on stderr (read once it exited).
    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(stderr) = self.child.stderr.as_mut() {
            let _ = stderr.read_to_string(&mut text);
        }
        text.trim().to_owned()
    }
}

impl Drop for Stepped {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Hands `count` operations to each client, `step` at a time, in turns; `between` runs
/// after each turn (to stop on an interrupt).
pub fn in_turns(
    clients: &mut [Stepped],
    count: usize,
    step: usize,
    mut between: impl FnMut() -> Result<()>,
) -> Result<()> {
    let step = step.max(1);
    let n = clients.len();
    let mut done = 0;
    let mut turn = 0;
    while done < count {
        let ops = step.min(count - done);
        for k in 0..n {
            clients[(turn + k) % n].step(ops)?;
        }
        between()?;
        done += ops;
        turn += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of this test process's own, removed on drop.
    struct Log(std::path::PathBuf);

    impl Log {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("ekp-lockstep-{name}-{}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            Log(path)
        }
    }

    impl Drop for Log {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A stand-in for `ekp-bench --stepped`: appends "NAME K" to `log` for each step.
    fn fake(name: &str, log: &std::path::Path) -> Stepped {
        let script = format!(
            "echo ready; n=0; while read k; do echo \"{name} $k\" >> '{}'; n=$((n + k)); \
             echo done; done; echo \"{name} made $n\"",
            log.display()
        );
        Stepped::start(cmd::new("sh", &["-c", &script]), name.to_owned()).expect("starts")
    }

    #[test]
    fn clients_take_turns_in_a_rotating_order_until_each_made_its_count() {
        let log = Log::new("turns");
        let mut clients = vec![fake("a", &log.0), fake("b", &log.0), fake("c", &log.0)];
        let mut turns = 0;
        in_turns(&mut clients, 25, 10, || {
            turns += 1;
            Ok(())
        })
        .expect("in turns");
        assert_eq!(turns, 3);
        let steps = std::fs::read_to_string(&log.0).expect("log");
        assert_eq!(
            steps.lines().collect::<Vec<_>>(),
            [
                "a 10", "b 10", "c 10", //
                "b 10", "c 10", "a 10", //
                "c 5", "a 5", "b 5",
            ]
        );
        let summaries: Vec<String> = clients
            .into_iter()
            .map(|c| c.finish().expect("finishes"))
            .collect();
        assert_eq!(summaries, ["a made 25\n", "b made 25\n", "c made 25\n"]);
    }

    #[test]
    fn a_client_that_dies_is_an_error_with_what_it_said() {
        let script = "echo ready; read k; echo 'no server' >&2; exit 3";
        let mut client =
            Stepped::start(cmd::new("sh", &["-c", script]), "udp".to_owned()).expect("starts");
        let e = format!("{:#}", client.step(10).expect_err("the client died"));
        assert!(e.contains("udp") && e.contains("no server"), "{e}");
    }
}
