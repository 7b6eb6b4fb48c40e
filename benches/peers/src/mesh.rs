//! The AgentMesh side: remote actor messages between two nodes (real QUIC, mutual TLS),
//! exactly as applications send them: `Mesh::send_to` for casts, `Mesh::ask_at` for
//! request/reply, each message's priority picking its lane.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::time::Instant;

use agentmesh::runtime::remote::{ActorAddr, Mesh, RemoteMessage};
use agentmesh::runtime::{MembershipConfig, Node, NodeConfig};
use agentmesh::transport::clock::SystemClock;
use agentmesh::transport::tls::NodeIdentity;
use agentmesh::transport::EndpointConfig;

use crate::stats::{self, Echo, Figures};
use crate::{Hol, Messaging, BULK_BYTES, PAYLOAD_BYTES};

const SERVER: &str = "bench-server";
const CLIENT: &str = "bench-client";
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// A one-way 64-byte message, on the normal lane.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Ping(ByteBuf);

impl RemoteMessage for Ping {
    const KIND: &'static str = "bench.ping";
}

/// A request on the urgent lane.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Urgent(ByteBuf);

impl RemoteMessage for Urgent {
    const KIND: &'static str = "bench.urgent";

    fn priority(&self) -> u8 {
        230
    }
}

/// A chunk of the bulk transfer, on the bulk lane.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Bulk(ByteBuf);

impl RemoteMessage for Bulk {
    const KIND: &'static str = "bench.bulk";

    fn priority(&self) -> u8 {
        10
    }
}

/// Asks how many pings the sink has counted.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CountRequest;

impl RemoteMessage for CountRequest {
    const KIND: &'static str = "bench.count";
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Count(u64);

impl RemoteMessage for Count {
    const KIND: &'static str = "bench.count.reply";
}

/// Counts what arrives (pings and bulk chunks alike).
struct Sink<M>(Arc<AtomicU64>, std::marker::PhantomData<M>);

impl<M: Send + Sync + 'static> Actor for Sink<M> {
    type Msg = M;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<M>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(&self, _: ActorRef<M>, _: M, _: &mut ()) -> Result<(), ActorProcessingErr> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Answers requests: echoes, or the sink's count.
enum Answer {
    Echo(Ping, RpcReplyPort<Ping>),
    Urgent(Urgent, RpcReplyPort<Urgent>),
    Count(CountRequest, RpcReplyPort<Count>),
}

struct Answerer(Arc<AtomicU64>);

impl Actor for Answerer {
    type Msg = Answer;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<Answer>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<Answer>,
        message: Answer,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match message {
            Answer::Echo(ping, reply) => {
                let _ = reply.send(ping);
            }
            Answer::Urgent(urgent, reply) => {
                let _ = reply.send(urgent);
            }
            Answer::Count(_, reply) => {
                let _ = reply.send(Count(self.0.load(Ordering::Relaxed)));
            }
        }
        Ok(())
    }
}

async fn start_node(
    certs: &Path,
    name: &str,
    listen: SocketAddr,
    join: Vec<SocketAddr>,
) -> anyhow::Result<Node> {
    let identity = NodeIdentity::load(certs, name).context("loading the benchmark certificates")?;
    let config = NodeConfig {
        transport: EndpointConfig::new(listen),
        join,
        membership: MembershipConfig::default(),
        metrics: None,
        advertise: None,
    };
    Ok(Node::start(config, &identity, Arc::new(SystemClock)).await?)
}

/// Serves until killed: `sink` and `bulk` count, `echo`, `urgent` and `count` answer.
pub async fn serve(certs: &Path, listen: SocketAddr) -> anyhow::Result<()> {
    let node = start_node(certs, SERVER, listen, Vec::new()).await?;
    let mesh = node.mesh().clone();
    let pings = Arc::new(AtomicU64::new(0));
    let (sink, _) = Actor::spawn(None, Sink::<Ping>(pings.clone(), Default::default()), ()).await?;
    mesh.register("sink", sink)?;
    let (bulk, _) = Actor::spawn(
        None,
        Sink::<Bulk>(Arc::new(AtomicU64::new(0)), Default::default()),
        (),
    )
    .await?;
    mesh.register("bulk", bulk)?;
    let (answerer, _) = Actor::spawn(None, Answerer(pings), ()).await?;
    mesh.register_rpc("echo", answerer.clone(), Answer::Echo)?;
    mesh.register_rpc("urgent", answerer.clone(), Answer::Urgent)?;
    mesh.register_rpc("count", answerer, Answer::Count)?;
    crate::ready(node.me().addr);
    std::future::pending::<()>().await;
    Ok(())
}

/// An ask of a 64-byte payload, on the normal lane or the urgent one.
struct MeshEcho {
    mesh: Mesh,
    to: ActorAddr,
    urgent: bool,
}

impl Echo for MeshEcho {
    async fn echo(&mut self) -> anyhow::Result<usize> {
        let payload = ByteBuf::from(vec![9u8; PAYLOAD_BYTES]);
        Ok(if self.urgent {
            let Urgent(back) = self
                .mesh
                .ask_at(&self.to, Urgent(payload), ASK_TIMEOUT)
                .await?;
            back.len()
        } else {
            let Ping(back) = self
                .mesh
                .ask_at(&self.to, Ping(payload), ASK_TIMEOUT)
                .await?;
            back.len()
        })
    }
}

/// Joins the server's node and waits until its actors are known here.
async fn join(certs: &Path, server: SocketAddr) -> anyhow::Result<(Node, Vec<ActorAddr>)> {
    let node = start_node(certs, CLIENT, ([127, 0, 0, 1], 0).into(), vec![server]).await?;
    let names = ["sink", "bulk", "echo", "urgent", "count"];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<ActorAddr> = names.iter().filter_map(|n| node.mesh().lookup(n)).collect();
        if found.len() == names.len() {
            return Ok((node, found));
        }
        if Instant::now() > deadline {
            bail!("the server's actors never became known");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Throughput (one sender, `send_to` per message) and request/reply.
pub async fn messaging(
    certs: &Path,
    server: SocketAddr,
    run: &Messaging,
) -> anyhow::Result<Figures> {
    let (node, addrs) = join(certs, server).await?;
    let mesh = node.mesh().clone();
    let (sink, echo, count) = (&addrs[0], &addrs[2], &addrs[4]);
    let payload = ByteBuf::from(vec![7u8; PAYLOAD_BYTES]);

    let started = Instant::now();
    for _ in 0..run.messages {
        mesh.send_to(sink, Ping(payload.clone())).await?;
    }
    loop {
        let Count(n) = mesh.ask_at(count, CountRequest, ASK_TIMEOUT).await?;
        if n >= run.messages {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let seconds = started.elapsed().as_secs_f64();

    let mut echo = MeshEcho {
        mesh: mesh.clone(),
        to: echo.clone(),
        urgent: false,
    };
    let rtts = stats::round_trips(run.round_trips, None, &mut echo).await?;
    let mut figures = Figures {
        system: "agentmesh".into(),
        messages: run.messages,
        messages_per_sec: run.messages as f64 / seconds,
        ..Figures::default()
    };
    stats::request_reply(&mut figures, rtts);
    node.leave().await;
    Ok(figures)
}

/// Urgent requests every interval while one task keeps the bulk lane full.
pub async fn hol(certs: &Path, server: SocketAddr, run: &Hol) -> anyhow::Result<Figures> {
    let (node, addrs) = join(certs, server).await?;
    let mesh = node.mesh().clone();
    let (bulk, urgent) = (addrs[1].clone(), addrs[3].clone());
    let stop = Arc::new(AtomicBool::new(false));
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let bulk_task = {
        let (mesh, stop, sent_bytes) = (mesh.clone(), stop.clone(), sent_bytes.clone());
        tokio::spawn(async move {
            let chunk = ByteBuf::from(vec![1u8; BULK_BYTES]);
            while !stop.load(Ordering::Relaxed) {
                mesh.send_to(&bulk, Bulk(chunk.clone())).await?;
                sent_bytes.fetch_add(BULK_BYTES as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };
    let mut echo = MeshEcho {
        mesh,
        to: urgent,
        urgent: true,
    };
    let figures =
        stats::under_bulk("agentmesh", run, &mut echo, &sent_bytes, &stop, bulk_task).await?;
    node.leave().await;
    Ok(figures)
}

/// The most any remote actor message into a ractor actor can reach here: one task
/// decodes each 64-byte message from its bytes and casts it to the same `Sink` actor
/// the server uses, in one process, with no network, no encryption and no framing.
/// Every system in the table ends in such a cast (ractor_cluster's too).
pub async fn ceiling(run: &Messaging) -> anyhow::Result<Figures> {
    let pings = Arc::new(AtomicU64::new(0));
    let (sink, _) = Actor::spawn(None, Sink::<Ping>(pings.clone(), Default::default()), ()).await?;
    let encoded = rmp_serde::to_vec(&Ping(ByteBuf::from(vec![7u8; PAYLOAD_BYTES])))?;
    let cpu_before = stats::process_cpu_seconds()?;
    let started = Instant::now();
    for _ in 0..run.messages {
        sink.cast(rmp_serde::from_slice::<Ping>(&encoded)?)?;
    }
    // Polled every 100 µs: a spinning wait would add its own CPU to the figure.
    while pings.load(Ordering::Relaxed) < run.messages {
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = stats::process_cpu_seconds()? - cpu_before;
    sink.stop(None);
    Ok(Figures {
        system: "ractor, one process".into(),
        messages: run.messages,
        messages_per_sec: run.messages as f64 / seconds,
        cpu_ns_per_message: cpu * 1e9 / run.messages as f64,
        ..Figures::default()
    })
}
