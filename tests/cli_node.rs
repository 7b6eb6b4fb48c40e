//! `agentmesh certs` and `agentmesh node`, run as the built binary: certificates on
//! disk with private keys at mode 0600, two nodes joining over real QUIC with them,
//! the development CA when no certificates are given, and a graceful leave.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // deadlines for child processes are wall time

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn agentmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agentmesh"))
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agentmesh-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node process whose stderr lines arrive on a channel.
struct NodeProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl NodeProcess {
    fn start(args: &[&str], dev_ca: Option<&Path>) -> NodeProcess {
        let mut cmd = agentmesh();
        cmd.arg("node")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(dir) = dev_ca {
            cmd.env("AGENTMESH_DEV_CA_DIR", dir);
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
        NodeProcess { child, lines }
    }

    /// Waits up to 15 s for a log line containing every one of `words`.
    fn expect(&self, words: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if words.iter().all(|w| line.contains(w)) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!("no line with {words:?}; saw:\n{}", seen.join("\n"));
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn certs_init_and_issue_write_owner_only_keys_and_refuse_to_overwrite() {
    let dir = temp_dir("certs");
    let d = dir.to_str().unwrap();
    assert!(agentmesh()
        .args(["certs", "init", "--dir", d])
        .status()
        .unwrap()
        .success());
    assert!(agentmesh()
        .args(["certs", "issue", "--dir", d, "--node", "n1"])
        .status()
        .unwrap()
        .success());
    #[cfg(unix)]
    for key in ["ca.key", "n1.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let again = agentmesh()
        .args(["certs", "init", "--dir", d])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let bad = agentmesh()
        .args(["certs", "issue", "--dir", d, "--node", "Bad_Name"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nodes_with_issued_certificates_join_and_leave_gracefully() {
    let dir = temp_dir("join");
    let d = dir.to_str().unwrap();
    assert!(agentmesh()
        .args(["certs", "init", "--dir", d])
        .status()
        .unwrap()
        .success());
    for n in ["n1", "n2"] {
        assert!(agentmesh()
            .args(["certs", "issue", "--dir", d, "--node", n])
            .status()
            .unwrap()
            .success());
    }
    let (p1, p2) = (free_port(), free_port());
    let a1 = format!("127.0.0.1:{p1}");
    let a2 = format!("127.0.0.1:{p2}");
    let n1 = NodeProcess::start(&["--certs", d, "--name", "n1", "--listen", &a1], None);
    n1.expect(&["listening"]);
    let mut n2 = NodeProcess::start(
        &["--certs", d, "--name", "n2", "--listen", &a2, "--join", &a1],
        None,
    );
    n2.expect(&["peer up", "n1"]);
    n1.expect(&["peer up", "n2"]);
    assert!(
        n2.terminate().success(),
        "a node leaving on SIGTERM exits 0"
    );
    let down = n1.expect(&["peer down", "n2"]);
    assert!(
        down.contains("code 11"),
        "the leave carries LEAVING: {down}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_certificates_nodes_use_the_development_ca_and_say_so() {
    let dev = temp_dir("dev-ca");
    let (p1, p2) = (free_port(), free_port());
    let a1 = format!("127.0.0.1:{p1}");
    let a2 = format!("127.0.0.1:{p2}");
    let n1 = NodeProcess::start(&["--name", "d1", "--listen", &a1], Some(&dev));
    n1.expect(&["development mode"]);
    let n2 = NodeProcess::start(
        &["--name", "d2", "--listen", &a2, "--join", &a1],
        Some(&dev),
    );
    n2.expect(&["peer up", "d1"]);
    assert!(dev.join("ca.crt").exists() && dev.join("ca.key").exists());
    drop((n1, n2));
    std::fs::remove_dir_all(&dev).unwrap();
}
