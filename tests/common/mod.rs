//! Helpers for tests that run the `agentmesh` binary: temporary folders, free ports,
//! and node processes whose log lines can be awaited.
#![allow(dead_code, clippy::unwrap_used, clippy::disallowed_methods)] // wall-clock deadlines for child processes

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn agentmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agentmesh"))
}

/// An example program built by `cargo test` (which builds every example) next to the
/// test binaries: `target/<profile>/examples/NAME`.
pub fn example(name: &str) -> Command {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let path = profile.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo test` (it builds the examples) or `cargo build --examples`",
        path.display()
    );
    Command::new(path)
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agentmesh-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The task id a node's "task submitted" log line names (`task=ID`).
pub fn task_in(line: &str) -> String {
    line.split("task=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no task= in {line:?}"))
        .to_string()
}

/// The results a takeover started from: the `done=` of a "took over a task" log line.
pub fn done_in(line: &str) -> u32 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("done="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no done= in {line}"))
}

/// Waits for a `submit` to end, failing the test (with its stderr) if it has not
/// within `limit`.
pub fn ended_within(child: &mut Child, limit: Duration) {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
            }
            panic!("submit still waiting after {limit:?}; stderr: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`outcome`], failing the test if the `submit` has not ended within `limit`.
pub fn outcome_within(mut child: Child, limit: Duration) -> (ExitStatus, serde_json::Value) {
    ended_within(&mut child, limit);
    outcome(child)
}

/// Waits for a `submit --json` and returns its exit status and object.
pub fn outcome(child: Child) -> (ExitStatus, serde_json::Value) {
    let (status, json, _) = outcome_and_log(child);
    (status, json)
}

/// [`outcome`], and what the `submit` logged (its stderr).
pub fn outcome_and_log(child: Child) -> (ExitStatus, serde_json::Value, String) {
    let out = child.wait_with_output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status, json, log)
}

pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct loopback UDP ports free right now. All are held until all are picked:
/// one at a time, the OS may hand out a port it has just freed again.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::UdpSocket> = (0..n)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect()
}

/// A node process whose stderr lines arrive on a channel.
pub struct NodeProcess {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines read but not matched yet, for later calls of `expect`.
    backlog: std::sync::Mutex<Vec<String>>,
}

impl NodeProcess {
    pub fn start(args: &[&str], dev_ca: Option<&Path>) -> NodeProcess {
        NodeProcess::start_program(agentmesh(), args, dev_ca)
    }

    /// `node` of another program that runs the agentmesh CLI (an example).
    pub fn start_program(mut cmd: Command, args: &[&str], dev_ca: Option<&Path>) -> NodeProcess {
        cmd.arg("node")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(dir) = dev_ca {
            cmd.env("AGENTMESH_DEV_CA_DIR", dir);
        }
        // The log lines tests wait for are the default ones, whatever the caller's shell
        // has set, unless the test sets its own filter.
        if !cmd.get_envs().any(|(key, _)| key == "RUST_LOG") {
            cmd.env_remove("RUST_LOG");
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        NodeProcess {
            child,
            lines,
            backlog: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Waits up to 15 s for a log line containing every one of `words`.
    pub fn expect(&self, words: &[&str]) -> String {
        self.expect_within(words, Duration::from_secs(15))
            .unwrap_or_else(|seen| panic!("no line with {words:?}; saw:\n{}", seen.join("\n")))
    }

    /// Waits up to `limit` for a log line containing every one of `words` (lines read
    /// earlier and not matched yet count too); on failure returns the lines seen.
    pub fn expect_within(&self, words: &[&str], limit: Duration) -> Result<String, Vec<String>> {
        let matches = |line: &str| words.iter().all(|w| line.contains(w));
        let mut backlog = self.backlog.lock().unwrap();
        if let Some(i) = backlog.iter().position(|l| matches(l)) {
            return Ok(backlog.remove(i));
        }
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return Ok(line),
                Ok(line) => backlog.push(line),
                Err(_) => break,
            }
        }
        seen.extend(backlog.iter().cloned());
        Err(seen)
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "node did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProcess {
    /// Kills the process; when a test failed, first prints how it ended and its last
    /// log lines not yet matched, so that a failure under CI can be read from its output.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let pid = self.child.id();
            let ended = self.child.try_wait().ok().flatten();
            let mut lines =
                std::mem::take(&mut *self.backlog.lock().unwrap_or_else(|e| e.into_inner()));
            lines.extend(self.lines.try_iter());
            let skip = lines.len().saturating_sub(LINES_SHOWN_ON_FAILURE);
            eprintln!(
                "--- node process {pid} ({}), its last {} unmatched log lines:\n{}",
                ended.map_or("still running".to_string(), |s| format!("ended: {s}")),
                lines.len() - skip,
                lines[skip..].join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many of a node's log lines a failed test prints.
const LINES_SHOWN_ON_FAILURE: usize = 60;
