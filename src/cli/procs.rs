//! Node processes on loopback for the commands that run a whole cluster on this
//! machine (`demo`, `bench failover`): a work folder with the CA and certificates,
//! free ports, `agentmesh node` children killed whatever happens.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

use crate::actors::service::{AgentsRequest, AgentsStatus, AGENTS_SERVICE};
use crate::runtime::{Client, RemoteMessage};
use crate::transport::tls::ClusterCa;

/// One node to start.
pub struct NodeSpec<'a> {
    /// Its name (it gets a certificate of that name).
    pub name: &'a str,
    /// `--agents`, for example `sleep=4`.
    pub agents: &'a str,
    /// Where it serves Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
}

/// The node processes; killed when dropped, whatever happened.
pub struct Processes {
    names: Vec<String>,
    children: Vec<Option<Child>>,
    logs: Vec<PathBuf>,
    /// Each node's ACP address, in the order given.
    pub addrs: Vec<SocketAddr>,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Processes {
    /// Starts one `agentmesh node` per spec, each after the first joining the first,
    /// with the certificates in `dir` and its log in `dir/NAME.log`.
    pub fn start(dir: &Path, specs: &[NodeSpec<'_>]) -> anyhow::Result<Processes> {
        let exe = std::env::current_exe().context("finding this program to start the nodes")?;
        let mut procs = Processes {
            names: Vec::new(),
            children: Vec::new(),
            logs: Vec::new(),
            addrs: Vec::new(),
        };
        let listen = free_udp_ports(specs.len())?;
        for (spec, &addr) in specs.iter().zip(&listen) {
            let log_path = dir.join(format!("{}.log", spec.name));
            let log = std::fs::File::create(&log_path)?;
            let mut cmd = Command::new(&exe);
            cmd.arg("node")
                .args(["--name", spec.name])
                .args(["--listen", &addr.to_string()])
                .arg("--certs")
                .arg(dir)
                .args(["--agents", spec.agents])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            if let Some(metrics) = spec.metrics {
                cmd.args(["--metrics", &metrics.to_string()]);
            }
            if let Some(first) = procs.addrs.first() {
                cmd.args(["--join", &first.to_string()]);
            }
            let child = cmd
                .spawn()
                .with_context(|| format!("starting node {}", spec.name))?;
            procs.names.push(spec.name.to_string());
            procs.children.push(Some(child));
            procs.logs.push(log_path);
            procs.addrs.push(addr);
        }
        Ok(procs)
    }

    /// SIGKILLs node `i` (no goodbye: its peers must find out by themselves).
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.children[i].take() {
            child.kill().context("killing the node")?;
            let _ = child.wait();
        }
        Ok(())
    }

    /// A node that exited on its own is an error, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (i, child) in self.children.iter_mut().enumerate() {
            if let Some(c) = child {
                if let Some(status) = c.try_wait()? {
                    let log = std::fs::read_to_string(&self.logs[i]).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(8).collect();
                    bail!(
                        "node {} exited ({status}); the end of its log:\n{}",
                        self.names[i],
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
        Ok(())
    }
}

/// The folder for certificates and logs: removed at the end unless asked to keep it.
pub struct WorkDir {
    /// The folder.
    pub path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

impl WorkDir {
    /// `keep` if given (and kept), else a fresh temporary folder named after `purpose`;
    /// either way holding a new CA and a certificate for each of `names`.
    pub fn with_certs(
        keep: Option<&Path>,
        purpose: &str,
        names: &[&str],
    ) -> anyhow::Result<(WorkDir, ClusterCa)> {
        let work = match keep {
            Some(p) => WorkDir {
                path: p.to_path_buf(),
                keep: true,
            },
            None => WorkDir {
                path: std::env::temp_dir()
                    .join(format!("agentmesh-{purpose}-{}", std::process::id())),
                keep: false,
            },
        };
        std::fs::create_dir_all(&work.path)
            .with_context(|| format!("creating {}", work.path.display()))?;
        let ca = ClusterCa::generate()?;
        ca.save(&work.path)?;
        for name in names {
            ca.issue_to(&work.path, name)?;
        }
        Ok((work, ca))
    }
}

/// `n` distinct loopback UDP addresses free right now. All are held until all are
/// picked: one at a time, the OS may hand out a port it has just freed again.
pub fn free_udp_ports(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    free_ports(n, |a| UdpSocket::bind(a), UdpSocket::local_addr)
}

/// `n` distinct loopback TCP addresses free right now (held as `free_udp_ports` does).
pub fn free_tcp_ports(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    free_ports(n, |a| TcpListener::bind(a), TcpListener::local_addr)
}

/// `n` sockets bound with `bind` to free loopback ports, all held until all are picked.
fn free_ports<S>(
    n: usize,
    bind: impl Fn(&str) -> std::io::Result<S>,
    local_addr: impl Fn(&S) -> std::io::Result<SocketAddr>,
) -> anyhow::Result<Vec<SocketAddr>> {
    let held: Vec<S> = (0..n)
        .map(|_| bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    Ok(held.iter().map(local_addr).collect::<Result<_, _>>()?)
}

/// The agents a node knows and the tasks its coordinator runs.
pub async fn agents_status(
    client: &mut Client,
    timeout: std::time::Duration,
) -> anyhow::Result<AgentsStatus> {
    Ok(client
        .request(
            AGENTS_SERVICE,
            <AgentsRequest as RemoteMessage>::KIND,
            &AgentsRequest {},
            timeout,
        )
        .await?)
}
