//! The tonic side: a gRPC service over plain HTTP/2 (h2c) with a bidirectional stream
//! for throughput, unary calls for request/reply, and a client stream for the bulk
//! transfer of the head-of-line run; the code is generated from Rust in `build.rs`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::stats::{self, Echo, Figures};
use crate::{Hol, Messaging, BULK_BYTES, PAYLOAD_BYTES};

/// Bytes, both ways.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Blob {
    /// The payload.
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
}

/// How many blobs the server has taken so far.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    /// The count.
    #[prost(uint64, tag = "1")]
    pub count: u64,
}

#[allow(missing_docs, clippy::all, rust_2018_idioms)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/agentmesh.bench.Bench.rs"));
}
use generated::bench_client::BenchClient;
use generated::bench_server::{Bench, BenchServer};

/// How often the bidirectional stream acknowledges.
const ACK_EVERY: u64 = 4096;

struct Service;

type AckStream = std::pin::Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;

#[tonic::async_trait]
impl Bench for Service {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<Blob>>,
    ) -> Result<Response<AckStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut count = 0u64;
            while let Some(blob) = incoming.next().await {
                if blob.is_err() {
                    break;
                }
                count += 1;
                if count.is_multiple_of(ACK_EVERY) && tx.send(Ok(Ack { count })).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Ok(Ack { count })).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn echo(&self, request: Request<Blob>) -> Result<Response<Blob>, Status> {
        Ok(Response::new(request.into_inner()))
    }

    async fn bulk(&self, request: Request<Streaming<Blob>>) -> Result<Response<Ack>, Status> {
        let mut incoming = request.into_inner();
        let mut count = 0;
        while let Some(blob) = incoming.next().await {
            blob?;
            count += 1;
        }
        Ok(Response::new(Ack { count }))
    }
}

impl Echo for BenchClient<tonic::transport::Channel> {
    async fn echo(&mut self) -> anyhow::Result<usize> {
        let blob = Blob {
            data: vec![9u8; PAYLOAD_BYTES],
        };
        Ok(BenchClient::echo(self, blob).await?.into_inner().data.len())
    }
}

/// Serves until killed.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    crate::ready(listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(BenchServer::new(Service))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

async fn connect(server: SocketAddr) -> anyhow::Result<BenchClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connecting to the gRPC server")?;
    Ok(BenchClient::new(channel))
}

/// Throughput over one bidirectional stream, then unary request/reply.
pub async fn messaging(server: SocketAddr, run: &Messaging) -> anyhow::Result<Figures> {
    let mut client = connect(server).await?;
    let messages = run.messages;
    let payload = vec![7u8; PAYLOAD_BYTES];
    let started = Instant::now();
    let outgoing = {
        let payload = payload.clone();
        tokio_stream::iter(0..messages).map(move |_| Blob {
            data: payload.clone(),
        })
    };
    let mut acks = client.stream(outgoing).await?.into_inner();
    let mut counted = 0;
    while let Some(ack) = acks.next().await {
        counted = ack?.count;
        if counted >= messages {
            break;
        }
    }
    if counted < messages {
        bail!("the server counted {counted} of {messages}");
    }
    let seconds = started.elapsed().as_secs_f64();

    let rtts = stats::round_trips(run.round_trips, None, &mut client).await?;
    let mut figures = Figures {
        system: "tonic".into(),
        messages,
        messages_per_sec: messages as f64 / seconds,
        ..Figures::default()
    };
    stats::request_reply(&mut figures, rtts);
    Ok(figures)
}

/// Unary urgent calls every interval while a client-streaming call carries bulk data,
/// both on one channel (one HTTP/2 connection).
pub async fn hol(server: SocketAddr, run: &Hol) -> anyhow::Result<Figures> {
    let mut client = connect(server).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let bulk_task = {
        let (mut client, stop, sent_bytes) = (client.clone(), stop.clone(), sent_bytes.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<Blob>(4);
        tokio::spawn(async move {
            let chunk = vec![1u8; BULK_BYTES];
            while !stop.load(Ordering::Relaxed) {
                if tx
                    .send(Blob {
                        data: chunk.clone(),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
                sent_bytes.fetch_add(BULK_BYTES as u64, Ordering::Relaxed);
            }
        });
        tokio::spawn(async move {
            client
                .bulk(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        })
    };
    stats::under_bulk("tonic", run, &mut client, &sent_bytes, &stop, bulk_task).await
}
