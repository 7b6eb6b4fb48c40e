//! `peers`: AgentMesh measured against its peers (tonic gRPC, ractor_cluster, plain
//! TCP) with the same workloads, client and server in separate processes.
//!
//! `peers serve SYSTEM` and `peers client SYSTEM` are the two halves of one
//! measurement; `peers report` starts them all (ractor_cluster through the separate
//! `ractor-peer` binary), runs the head-of-line runs inside a network namespace with
//! packet loss, adds AgentMesh's failover and scale figures, and writes the Markdown
//! table. `benches/run.sh` builds everything and calls it.

mod grpc;
mod mesh;
mod report;
mod stats;
mod tcp;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Every small message is this big.
pub const PAYLOAD_BYTES: usize = 64;
/// A bulk transfer moves chunks of this size.
pub const BULK_BYTES: usize = 64 * 1024;

#[derive(Parser)]
#[command(about = "AgentMesh against its peers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves one system on ADDR until killed; prints `READY <addr>` once it listens.
    Serve {
        system: System,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Folder with ca.crt and the bench-server/bench-client certificates (AgentMesh).
        #[arg(long)]
        certs: Option<PathBuf>,
    },
    /// Runs one workload against a server and prints one JSON line of figures.
    Client {
        system: System,
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        certs: Option<PathBuf>,
        #[command(subcommand)]
        workload: Workload,
    },
    /// Runs everything and writes the Markdown report.
    Report(report::ReportArgs),
    /// The same messages cast to a ractor actor in this one process, with no network:
    /// the most a remote actor message into a ractor actor can reach on this machine.
    /// Prints one JSON line of figures (round trips are not measured).
    Ceiling(Messaging),
}

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum System {
    /// AgentMesh remote actor messages over ACP/QUIC with mutual TLS.
    Agentmesh,
    /// tonic gRPC over HTTP/2 (no TLS).
    Tonic,
    /// One plain TCP connection with interleaved frames (head-of-line runs only).
    Tcp,
}

#[derive(Subcommand)]
enum Workload {
    /// Small-message throughput one way, then request/reply latency.
    Messaging(Messaging),
    /// Urgent request/reply every interval while a bulk transfer fills the connection.
    Hol(Hol),
}

/// The small-message workload.
#[derive(Args, Debug, Clone)]
pub struct Messaging {
    /// 64-byte messages sent one way.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Request/reply round trips, one at a time.
    #[arg(long, default_value_t = 5_000)]
    pub round_trips: usize,
}

/// The head-of-line workload.
#[derive(Args, Debug, Clone)]
pub struct Hol {
    /// Urgent requests.
    #[arg(long, default_value_t = 1_000)]
    pub requests: usize,
    /// Milliseconds between urgent requests.
    #[arg(long, default_value_t = 10)]
    pub interval_ms: u64,
}

/// Tells the parent process where this server listens.
pub fn ready(addr: SocketAddr) {
    println!("READY {addr}");
}

fn certs(certs: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    certs.ok_or_else(|| {
        anyhow::anyhow!(
            "AgentMesh needs --certs (a folder made by `peers report` or `agentmesh certs`)"
        )
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("peers: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Everything runs as a task on the runtime's workers, as an application's actors
    // do, not on the thread that blocks on the runtime.
    let task = runtime.spawn(async move {
        match cli.command {
            Command::Serve {
                system,
                listen,
                certs: dir,
            } => match system {
                System::Agentmesh => mesh::serve(&certs(dir)?, listen).await,
                System::Tonic => grpc::serve(listen).await,
                System::Tcp => tcp::serve(listen).await,
            },
            Command::Client {
                system,
                server,
                certs: dir,
                workload,
            } => {
                let figures = match (system, &workload) {
                    (System::Agentmesh, Workload::Messaging(m)) => {
                        mesh::messaging(&certs(dir)?, server, m).await?
                    }
                    (System::Agentmesh, Workload::Hol(h)) => {
                        mesh::hol(&certs(dir)?, server, h).await?
                    }
                    (System::Tonic, Workload::Messaging(m)) => grpc::messaging(server, m).await?,
                    (System::Tonic, Workload::Hol(h)) => grpc::hol(server, h).await?,
                    (System::Tcp, Workload::Hol(h)) => tcp::hol(server, h).await?,
                    (System::Tcp, Workload::Messaging(_)) => {
                        anyhow::bail!("plain TCP takes part in the head-of-line runs only")
                    }
                };
                println!("{}", serde_json::to_string(&figures)?);
                Ok(())
            }
            Command::Report(args) => report::run_all(args).await,
            Command::Ceiling(run) => {
                println!("{}", serde_json::to_string(&mesh::ceiling(&run).await?)?);
                Ok(())
            }
        }
    });
    let result = runtime
        .block_on(task)
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the benchmark task failed: {e}")));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peers: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
