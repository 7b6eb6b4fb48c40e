//! The ractor_cluster side of the peer benchmarks: a sink actor behind a
//! `NodeServer` (TCP), and a client node that casts 64-byte messages to it and calls it
//! for request/reply, each in its own process. `peers report` starts both.
//!
//! It is a crate of its own because ractor_cluster needs ractor's `cluster` feature,
//! which takes away the blanket `Message` impl our crates rely on.

use std::time::Duration;

// Wall-clock time, as a user of ractor_cluster sees it.
use tokio::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::{NodeServer, NodeServerMessage, RactorClusterMessage};

const GROUP: &str = "agentmesh-bench";
const COOKIE: &str = "agentmesh-bench";
const PAYLOAD_BYTES: usize = 64;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the sink node on PORT until killed; prints READY once it listens.
    Serve {
        #[arg(long)]
        port: u16,
    },
    /// Connects a client node to the sink on PORT and prints one JSON line of figures.
    Client {
        #[arg(long)]
        server_port: u16,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 200_000)]
        messages: u64,
        #[arg(long, default_value_t = 5_000)]
        round_trips: usize,
    },
}

/// What the sink takes: one-way pings, a count of them, and an echo.
#[derive(RactorClusterMessage)]
enum SinkMsg {
    Ping(Vec<u8>),
    #[rpc]
    Count(RpcReplyPort<u64>),
    #[rpc]
    Echo(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

struct Sink;

impl Actor for Sink {
    type Msg = SinkMsg;
    type State = u64;
    type Arguments = ();

    async fn pre_start(&self, myself: ActorRef<SinkMsg>, _: ()) -> Result<u64, ActorProcessingErr> {
        ractor::pg::join(GROUP.to_string(), vec![myself.get_cell()]);
        Ok(0)
    }

    async fn handle(
        &self,
        _: ActorRef<SinkMsg>,
        message: SinkMsg,
        count: &mut u64,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SinkMsg::Ping(_) => *count += 1,
            SinkMsg::Count(reply) => {
                let _ = reply.send(*count);
            }
            SinkMsg::Echo(payload, reply) => {
                let _ = reply.send(payload);
            }
        }
        Ok(())
    }
}

async fn node(port: u16, name: &str) -> anyhow::Result<ActorRef<NodeServerMessage>> {
    let server = NodeServer::new(
        port,
        COOKIE.to_string(),
        name.to_string(),
        "localhost".to_string(),
        None,
        None,
    )
    .with_listen_addr([127, 0, 0, 1].into());
    let (actor, _) = Actor::spawn(None, server, ())
        .await
        .context("starting the NodeServer")?;
    Ok(actor)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Serve { port } => {
            let _server = node(port, "bench-server").await?;
            let _sink = Actor::spawn(None, Sink, ()).await?;
            println!("READY");
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
        Command::Client {
            server_port,
            port,
            messages,
            round_trips,
        } => {
            // As a task on the runtime's workers, as an application's actors run.
            tokio::spawn(client(server_port, port, messages, round_trips)).await?
        }
    }
}

async fn client(
    server_port: u16,
    port: u16,
    messages: u64,
    round_trips: usize,
) -> anyhow::Result<()> {
    let server = node(port, "bench-client").await?;
    ractor_cluster::client_connect(&server, ("127.0.0.1", server_port))
        .await
        .context("connecting to the sink node")?;
    let started = Instant::now();
    let sink = loop {
        let remote = ractor::pg::get_members(&GROUP.to_string())
            .into_iter()
            .find(|cell| !cell.get_id().is_local());
        if let Some(cell) = remote {
            break ActorRef::<SinkMsg>::from(cell);
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the sink never showed up in the process group");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    let payload = vec![7u8; PAYLOAD_BYTES];
    let started = Instant::now();
    for _ in 0..messages {
        sink.cast(SinkMsg::Ping(payload.clone()))?;
    }
    loop {
        let count = ractor::call_t!(sink, SinkMsg::Count, 30_000)?;
        if count >= messages {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let seconds = started.elapsed().as_secs_f64();

    let mut rtts = Vec::with_capacity(round_trips);
    for _ in 0..round_trips {
        let sent = Instant::now();
        let echoed = ractor::call_t!(sink, SinkMsg::Echo, 5_000, payload.clone())?;
        rtts.push(sent.elapsed().as_secs_f64() * 1e6);
        if echoed.len() != PAYLOAD_BYTES {
            bail!("the echo came back with {} bytes", echoed.len());
        }
    }
    rtts.sort_by(f64::total_cmp);
    let figures = serde_json::json!({
        "system": "ractor_cluster",
        "messages": messages,
        "seconds": seconds,
        "messages_per_sec": messages as f64 / seconds,
        "rr_p50_us": percentile(&rtts, 50.0),
        "rr_p99_us": percentile(&rtts, 99.0),
    });
    println!("{figures}");
    Ok(())
}
