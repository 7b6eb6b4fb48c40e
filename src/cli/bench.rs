//! `agentmesh bench transport`: ACP's throughput and latency over loopback, next to a
//! bare quinn stream measured in the same run, so our own overhead is visible.
//!
//! Both sides use the same TLS configuration and the same UDP socket setup; the
//! differences measured are ACP's framing, lanes, ingress checks and headroom control.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use serde::Serialize;
use tokio::time::Instant;

use crate::transport::endpoint::bind_socket;
use crate::transport::tls::{self, ClusterCa, NodeIdentity};
use crate::transport::wire::{Flags, Header, Lane, Message, MessageType};
use crate::transport::{
    EndpointConfig, Inbox, Leftover, OwnershipTable, PeerHandle, PeerName, Transport,
    TransportEvent,
};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Two endpoints on loopback: throughput, request/reply and urgent latency, for ACP
    /// and for a bare quinn stream.
    Transport(TransportBench),
    /// SIGKILL of a worker node: time until the coordinator has reallocated all its
    /// segments, over many runs (three node processes each).
    Failover(super::failover::FailoverBench),
    /// Memory per idle agent and registration rate, for many agents on one node.
    Scale(super::scale::ScaleBench),
    /// Thousands of small tasks submitted at once to one coordinator, against a tenth
    /// as many: time per task, and how it grows with the tasks open.
    Tasks(super::tasks::TasksBench),
}

#[derive(Clone, Debug, Args)]
pub struct TransportBench {
    /// 64-byte messages sent one way for the throughput figure.
    #[arg(long, default_value_t = 3_000_000)]
    messages: u64,
    /// Round trips per latency figure.
    #[arg(long, default_value_t = 5_000)]
    round_trips: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// ACP: share of the congestion window, in thousandths, the bulk and normal lanes
    /// may fill (default: the node's default).
    #[arg(long)]
    lower_lane_share_permille: Option<u64>,
    /// ACP: cap on bytes in flight while the bulk and normal lanes write.
    #[arg(long)]
    max_lower_in_flight_bytes: Option<u64>,
}

impl TransportBench {
    fn endpoint_config(&self) -> EndpointConfig {
        let mut config = EndpointConfig::new(loopback());
        if let Some(share) = self.lower_lane_share_permille {
            config.lower_lane_window_share_permille = share;
        }
        if let Some(cap) = self.max_lower_in_flight_bytes {
            config.max_lower_in_flight_bytes = cap;
        }
        config
    }
}

const PAYLOAD_BYTES: usize = 64;
const BULK_MESSAGE_BYTES: usize = 64 * 1024;
const PRIO_NORMAL: u8 = 96;
const PRIO_URGENT: u8 = 230;
const PRIO_BULK: u8 = 10;

/// One side's figures.
#[derive(Debug, Default, Serialize)]
struct Figures {
    /// ACP: `send` per message. Bare quinn: 64 KiB writes of 64-byte records.
    messages_per_sec: f64,
    /// ACP: `send_batch` with 256 messages per call. Bare quinn: as above.
    messages_per_sec_batched: f64,
    /// CPU time of both endpoints (this process's threads) per message in the
    /// `messages_per_sec_batched` run, in ns: unlike the rate, it holds still when
    /// other work on the machine takes cores away (NaN where /proc is missing).
    cpu_ns_per_message_batched: f64,
    /// ACP: the requester waits for each reply on the transport's event stream, in a
    /// task of its own. Bare quinn: the requester reads its reply stream itself.
    request_reply_p50_us: f64,
    request_reply_p99_us: f64,
    /// ACP: the requester's inbox takes each reply on the lane reader's task and sends
    /// the next request from there, as the runtime's mesh takes messages. Bare quinn:
    /// the same figure as above (its requester is the stream's reader already).
    request_reply_inbox_p50_us: f64,
    request_reply_inbox_p99_us: f64,
    /// Context switches of the process's threads per round trip (Linux; NaN elsewhere):
    /// how often a round trip woke a parked thread rather than staying on one.
    request_reply_switches: f64,
    request_reply_inbox_switches: f64,
    /// Request/reply with the replies read by a task of their own and handed to the
    /// requester over a channel. ACP: the event stream figures above (that is its
    /// shape). Bare quinn: measured so, for a like-for-like ratio.
    request_reply_handed_over_p50_us: f64,
    request_reply_handed_over_switches: f64,
    urgent_idle_p50_us: f64,
    urgent_idle_p99_us: f64,
    urgent_with_bulk_p50_us: f64,
    urgent_with_bulk_p99_us: f64,
    /// ACP: the urgent figures with the requester's inbox taking each reply (as for
    /// `request_reply_inbox_*`). Bare quinn: the same figures as above.
    urgent_idle_inbox_p50_us: f64,
    urgent_idle_inbox_p99_us: f64,
    urgent_with_bulk_inbox_p50_us: f64,
    urgent_with_bulk_inbox_p99_us: f64,
    bulk_mb_per_sec_during_urgent: f64,
    lost_packets: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    acp: Figures,
    bare_quinn: Figures,
    throughput_ratio: f64,
    request_reply_p50_ratio: f64,
    request_reply_inbox_p50_ratio: f64,
    /// ACP's event stream against bare quinn with the same hand-over to another task.
    request_reply_handed_over_p50_ratio: f64,
    acp_urgent_bulk_vs_idle_p50_ratio: f64,
    acp_urgent_bulk_vs_idle_inbox_p50_ratio: f64,
    quinn_urgent_bulk_vs_idle_p50_ratio: f64,
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    let args = match command {
        BenchCommand::Transport(args) => args,
        BenchCommand::Failover(args) => return super::failover::run(args),
        BenchCommand::Scale(args) => return super::scale::run(args),
        BenchCommand::Tasks(args) => return super::tasks::run(args),
    };
    if args.messages == 0 || args.round_trips == 0 {
        bail!("--messages and --round-trips must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Both sides run as tasks on the runtime's workers, as a node's actors do; from the
    // thread blocking on the runtime, every send would be a cross-thread wake-up.
    let bench_args = args.clone();
    let task = runtime.spawn(async move {
        let args = bench_args;
        let ca = ClusterCa::generate()?;
        let acp = bench_acp(&ca, &args).await.context("ACP")?;
        let bare = bench_quinn(&ca, &args).await.context("bare quinn")?;
        anyhow::Ok(Report {
            throughput_ratio: acp.messages_per_sec_batched / bare.messages_per_sec,
            request_reply_p50_ratio: acp.request_reply_p50_us / bare.request_reply_p50_us,
            request_reply_inbox_p50_ratio: acp.request_reply_inbox_p50_us
                / bare.request_reply_inbox_p50_us,
            request_reply_handed_over_p50_ratio: acp.request_reply_handed_over_p50_us
                / bare.request_reply_handed_over_p50_us,
            acp_urgent_bulk_vs_idle_p50_ratio: acp.urgent_with_bulk_p50_us / acp.urgent_idle_p50_us,
            acp_urgent_bulk_vs_idle_inbox_p50_ratio: acp.urgent_with_bulk_inbox_p50_us
                / acp.urgent_idle_inbox_p50_us,
            quinn_urgent_bulk_vs_idle_p50_ratio: bare.urgent_with_bulk_p50_us
                / bare.urgent_idle_p50_us,
            acp,
            bare_quinn: bare,
        })
    });
    let report = runtime.block_on(task)??;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report, &args);
    }
    Ok(())
}

fn print_table(r: &Report, args: &TransportBench) {
    println!(
        "agentmesh bench transport: two endpoints on loopback, one process, 2 runtime threads"
    );
    println!(
        "({} messages of {PAYLOAD_BYTES} B one way; {} round trips per latency figure)\n",
        args.messages, args.round_trips
    );
    println!(
        "{:<40} {:>14} {:>14} {:>10}",
        "", "ACP", "bare quinn", "ACP/quinn"
    );
    let row = |name: &str, a: f64, q: f64| {
        println!("{name:<40} {a:>14.1} {q:>14.1} {:>10.2}", a / q);
    };
    row(
        "throughput, send() each (messages/s)",
        r.acp.messages_per_sec,
        r.bare_quinn.messages_per_sec,
    );
    row(
        "throughput, send_batch(256) (messages/s)",
        r.acp.messages_per_sec_batched,
        r.bare_quinn.messages_per_sec_batched,
    );
    row(
        "  CPU per message, both ends (ns)",
        r.acp.cpu_ns_per_message_batched,
        r.bare_quinn.cpu_ns_per_message_batched,
    );
    row(
        "request/reply p50 (us)",
        r.acp.request_reply_p50_us,
        r.bare_quinn.request_reply_p50_us,
    );
    row(
        "request/reply p99 (us)",
        r.acp.request_reply_p99_us,
        r.bare_quinn.request_reply_p99_us,
    );
    row(
        "request/reply in the inbox p50 (us)",
        r.acp.request_reply_inbox_p50_us,
        r.bare_quinn.request_reply_inbox_p50_us,
    );
    row(
        "request/reply in the inbox p99 (us)",
        r.acp.request_reply_inbox_p99_us,
        r.bare_quinn.request_reply_inbox_p99_us,
    );
    let switches = |name: &str, a: f64, q: f64| {
        // A ratio against (nearly) none means nothing: leave it out.
        println!("{name:<40} {a:>14.2} {q:>14.2}");
    };
    switches(
        "  context switches per round trip",
        r.acp.request_reply_switches,
        r.bare_quinn.request_reply_switches,
    );
    switches(
        "  the same, in the inbox",
        r.acp.request_reply_inbox_switches,
        r.bare_quinn.request_reply_inbox_switches,
    );
    row(
        "request/reply, handed over p50 (us)",
        r.acp.request_reply_handed_over_p50_us,
        r.bare_quinn.request_reply_handed_over_p50_us,
    );
    switches(
        "  context switches per round trip",
        r.acp.request_reply_handed_over_switches,
        r.bare_quinn.request_reply_handed_over_switches,
    );

    row(
        "urgent p50, no bulk (us)",
        r.acp.urgent_idle_p50_us,
        r.bare_quinn.urgent_idle_p50_us,
    );
    row(
        "urgent p99, no bulk (us)",
        r.acp.urgent_idle_p99_us,
        r.bare_quinn.urgent_idle_p99_us,
    );
    row(
        "urgent p50, bulk saturated (us)",
        r.acp.urgent_with_bulk_p50_us,
        r.bare_quinn.urgent_with_bulk_p50_us,
    );
    row(
        "urgent p99, bulk saturated (us)",
        r.acp.urgent_with_bulk_p99_us,
        r.bare_quinn.urgent_with_bulk_p99_us,
    );
    row(
        "urgent in the inbox p50, no bulk (us)",
        r.acp.urgent_idle_inbox_p50_us,
        r.bare_quinn.urgent_idle_inbox_p50_us,
    );
    row(
        "urgent in the inbox p99, no bulk (us)",
        r.acp.urgent_idle_inbox_p99_us,
        r.bare_quinn.urgent_idle_inbox_p99_us,
    );
    row(
        "urgent in the inbox p50, bulk (us)",
        r.acp.urgent_with_bulk_inbox_p50_us,
        r.bare_quinn.urgent_with_bulk_inbox_p50_us,
    );
    row(
        "urgent in the inbox p99, bulk (us)",
        r.acp.urgent_with_bulk_inbox_p99_us,
        r.bare_quinn.urgent_with_bulk_inbox_p99_us,
    );
    row(
        "bulk MB/s while urgent probes run",
        r.acp.bulk_mb_per_sec_during_urgent,
        r.bare_quinn.bulk_mb_per_sec_during_urgent,
    );
    println!(
        "{:<40} {:>14} {:>14}",
        "packets lost (quinn stats)", r.acp.lost_packets, r.bare_quinn.lost_packets
    );
    println!(
        "\nurgent p50 with bulk / without: ACP {:.2}x (in the inbox {:.2}x), bare quinn {:.2}x",
        r.acp_urgent_bulk_vs_idle_p50_ratio,
        r.acp_urgent_bulk_vs_idle_inbox_p50_ratio,
        r.quinn_urgent_bulk_vs_idle_p50_ratio
    );
    println!(
        "request/reply: the ACP requester waits on the event stream, in a task of its own;\n\
         in the inbox: it takes each reply on the lane reader's task and sends the next\n\
         request from there, as the runtime's mesh does (bare quinn's requester reads its\n\
         stream itself either way). \"handed over\" gives bare quinn the event stream's\n\
         shape: a task reads the replies and hands each to the requester over a channel.\n\
         That hop alone costs bare quinn most of what the event stream costs ACP: the\n\
         requester and quinn's connection driver end up on different threads (see the\n\
         context switches; docs/architecture.md, transport, says what was measured)."
    );
}

/// A counter of this process from /proc, read at a start: how much it rose since.
struct Since {
    read: fn() -> Option<u64>,
    start: Option<u64>,
}

impl Since {
    fn start(read: fn() -> Option<u64>) -> Since {
        Since {
            read,
            start: read(),
        }
    }

    /// The rise since `start` per one of `n` (NaN where /proc is missing).
    fn per(&self, n: u64) -> f64 {
        match (self.start, (self.read)()) {
            (Some(before), Some(after)) => after.saturating_sub(before) as f64 / n as f64,
            _ => f64::NAN,
        }
    }
}

/// Round trips a round-trip loop runs for `n` timed ones: it warms up with n/10 first.
fn with_warm_up(n: usize) -> u64 {
    (n + n / 10) as u64
}

/// Time this process's threads have run on a CPU, in ns, summed (from /proc; `None`
/// where there is none). A thread that ends takes its time with it: the runtime's
/// workers, where both endpoints run, live as long as the bench.
fn cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let schedstat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += schedstat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Context switches so far, voluntary and not, summed over this process's threads
/// (from /proc; `None` where there is none).
fn context_switches() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += n.trim().parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}

fn percentile_us(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i.min(samples.len() - 1)].as_secs_f64() * 1e6
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

// ---------------------------------------------------------------- ACP ----

fn probe(prio: u8, body: &Bytes) -> Message {
    let mut header = Header::new(MessageType::Envelope);
    header.prio = prio;
    header.flags = Flags::ACK_REQUESTED;
    Message::new(header, body.clone())
}

fn plain(prio: u8, body: &Bytes) -> Message {
    let mut header = Header::new(MessageType::Envelope);
    header.prio = prio;
    Message::new(header, body.clone())
}

/// The echo side's inbox: counts every message and answers those that ask for an
/// acknowledgement on their own lane, on the lane reader's task, as the runtime's
/// inbox hands messages to actors.
struct Echo {
    peer: PeerHandle,
    received: Arc<AtomicU64>,
}

impl Inbox for Echo {
    fn take<'a>(&'a self, _: &'a PeerName, _: Lane, messages: Vec<Message>) -> Leftover<'a> {
        Box::pin(async move {
            self.received
                .fetch_add(messages.len() as u64, Ordering::Relaxed);
            for m in messages {
                if m.header.flags.contains(Flags::ACK_REQUESTED) {
                    let mut reply = m;
                    reply.header.flags = Flags::empty();
                    if self.peer.send(reply).await.is_err() {
                        break;
                    }
                }
            }
            Vec::new()
        })
    }
}

/// The requester's inbox. While a round is on, it takes each reply on the lane
/// reader's task, records the round trip and sends the next request from there, as
/// the runtime's mesh takes messages; otherwise it leaves everything to the events.
struct Requester {
    peer: PeerHandle,
    round: std::sync::Mutex<Option<Round>>,
    done: tokio::sync::Notify,
}

/// One inbox round: `left` replies still to come.
struct Round {
    prio: u8,
    left: usize,
    sent_at: Instant,
    samples: Vec<Duration>,
    body: Bytes,
    /// A pause before each next request, as between `acp_round_trips`' requests.
    gap: Option<Duration>,
}

impl Requester {
    fn round(&self) -> std::sync::MutexGuard<'_, Option<Round>> {
        self.round.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Times `n` round trips (after n/10 for warm-up), each request sent as the
    /// previous reply arrives, or `gap` after it.
    async fn round_trips(
        &self,
        prio: u8,
        n: usize,
        gap: Option<Duration>,
    ) -> anyhow::Result<Vec<Duration>> {
        let body = Bytes::from(vec![7u8; PAYLOAD_BYTES]);
        let warm_up = n / 10;
        let done = self.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        *self.round() = Some(Round {
            prio,
            left: n + warm_up,
            sent_at: Instant::now(),
            samples: Vec::with_capacity(n + warm_up),
            body: body.clone(),
            gap,
        });
        self.peer.send(probe(prio, &body)).await?;
        tokio::time::timeout(Duration::from_secs(30), done)
            .await
            .context("the inbox round did not finish within 30 s")?;
        let round = self.round().take().context("the round is gone")?;
        Ok(round.samples[warm_up..].to_vec())
    }
}

impl Inbox for Requester {
    fn take<'a>(&'a self, _: &'a PeerName, _: Lane, messages: Vec<Message>) -> Leftover<'a> {
        Box::pin(async move {
            let (next, gap) = {
                let mut round = self.round();
                let Some(r) = round.as_mut().filter(|r| r.left > 0) else {
                    return messages;
                };
                for _ in &messages {
                    r.samples.push(r.sent_at.elapsed());
                    r.left = r.left.saturating_sub(1);
                }
                if r.left == 0 {
                    self.done.notify_one();
                    (None, None)
                } else {
                    r.sent_at = Instant::now();
                    (Some(probe(r.prio, &r.body)), r.gap)
                }
            };
            if let Some(request) = next {
                if let Some(gap) = gap {
                    // Only this lane's reader waits: no other request is out.
                    tokio::time::sleep(gap).await;
                    if let Some(r) = self.round().as_mut() {
                        r.sent_at = Instant::now();
                    }
                }
                let _ = self.peer.send(request).await;
            }
            Vec::new()
        })
    }
}

/// Times `n` round trips (after n/10 for warm-up), reading the replies straight off
/// the transport's event stream, as an owner would.
async fn acp_round_trips(
    peer: &PeerHandle,
    events: &mut crate::transport::TransportEvents,
    prio: u8,
    n: usize,
    gap: Option<Duration>,
) -> anyhow::Result<Vec<Duration>> {
    let body = Bytes::from(vec![7u8; PAYLOAD_BYTES]);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let start = Instant::now();
        peer.send(probe(prio, &body)).await?;
        tokio::time::timeout(Duration::from_secs(10), next_reply(events))
            .await
            .context("no reply within 10 s")??;
        if i >= n / 10 {
            samples.push(start.elapsed());
        }
        if let Some(gap) = gap {
            tokio::time::sleep(gap).await;
        }
    }
    Ok(samples)
}

async fn next_reply(events: &mut crate::transport::TransportEvents) -> anyhow::Result<()> {
    loop {
        match events.recv().await.context("event stream ended")? {
            TransportEvent::Received { .. } => return Ok(()),
            _ => continue,
        }
    }
}

async fn bench_acp(ca: &ClusterCa, args: &TransportBench) -> anyhow::Result<Figures> {
    let bind = |name: &str| -> anyhow::Result<(Transport, crate::transport::TransportEvents)> {
        let identity = ca.node_identity(name)?;
        Ok(Transport::bind(
            args.endpoint_config(),
            &identity,
            Arc::new(OwnershipTable::new()),
        )?)
    };
    let (a, mut a_events) = bind("bench-a")?;
    let (b, mut b_events) = bind("bench-b")?;
    a.connect(b.local_addr()?, Some("bench-b")).await?;
    let to_b = a.peer("bench-b").context("connected")?;
    let requester = Arc::new(Requester {
        peer: to_b.clone(),
        round: std::sync::Mutex::new(None),
        done: tokio::sync::Notify::new(),
    });
    a.set_inbox(requester.clone());
    let to_a = loop {
        if let Some(p) = b.peer("bench-a") {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let received = Arc::new(AtomicU64::new(0));
    b.set_inbox(Arc::new(Echo {
        peer: to_a,
        received: received.clone(),
    }));
    // The inbox takes every message; what is left are peer events.
    tokio::spawn(async move { while b_events.recv().await.is_some() {} });

    let mut f = Figures::default();
    // Throughput: one way, normal lane.
    let body = Bytes::from(vec![1u8; PAYLOAD_BYTES]);
    let start = Instant::now();
    let sender = {
        let (peer, body, n) = (to_b.clone(), body.clone(), args.messages);
        tokio::spawn(async move {
            for _ in 0..n {
                if peer.send(plain(PRIO_NORMAL, &body)).await.is_err() {
                    return;
                }
            }
        })
    };
    wait_count(&received, args.messages).await?;
    f.messages_per_sec = args.messages as f64 / start.elapsed().as_secs_f64();
    sender.await?;

    const BATCH: u64 = 256;
    let (start, cpu) = (Instant::now(), Since::start(cpu_ns));
    let sender = {
        let (peer, body, n) = (to_b.clone(), body.clone(), args.messages);
        tokio::spawn(async move {
            for _ in 0..n.div_ceil(BATCH) {
                let batch = (0..BATCH).map(|_| plain(PRIO_NORMAL, &body)).collect();
                if peer.send_batch(batch).await.is_err() {
                    return;
                }
            }
        })
    };
    let target = 2 * args.messages + (BATCH - args.messages % BATCH) % BATCH;
    wait_count(&received, target).await?;
    f.messages_per_sec_batched = (target - args.messages) as f64 / start.elapsed().as_secs_f64();
    f.cpu_ns_per_message_batched = cpu.per(target - args.messages);
    sender.await?;

    let switches = Since::start(context_switches);
    let mut rr = acp_round_trips(&to_b, &mut a_events, PRIO_NORMAL, args.round_trips, None).await?;
    f.request_reply_switches = switches.per(with_warm_up(args.round_trips));
    f.request_reply_p50_us = percentile_us(&mut rr, 0.5);
    f.request_reply_p99_us = percentile_us(&mut rr, 0.99);
    f.request_reply_handed_over_p50_us = f.request_reply_p50_us;
    f.request_reply_handed_over_switches = f.request_reply_switches;
    let switches = Since::start(context_switches);
    let mut rr = requester
        .round_trips(PRIO_NORMAL, args.round_trips, None)
        .await?;
    f.request_reply_inbox_switches = switches.per(with_warm_up(args.round_trips));
    f.request_reply_inbox_p50_us = percentile_us(&mut rr, 0.5);
    f.request_reply_inbox_p99_us = percentile_us(&mut rr, 0.99);
    let gap = Some(Duration::from_micros(200));
    let mut idle =
        acp_round_trips(&to_b, &mut a_events, PRIO_URGENT, args.round_trips, gap).await?;
    f.urgent_idle_p50_us = percentile_us(&mut idle, 0.5);
    f.urgent_idle_p99_us = percentile_us(&mut idle, 0.99);
    let mut idle = requester
        .round_trips(PRIO_URGENT, args.round_trips, gap)
        .await?;
    f.urgent_idle_inbox_p50_us = percentile_us(&mut idle, 0.5);
    f.urgent_idle_inbox_p99_us = percentile_us(&mut idle, 0.99);

    // Urgent round trips while the bulk lane is kept full.
    let stop = Arc::new(AtomicBool::new(false));
    let bulk_sent = Arc::new(AtomicU64::new(0));
    let bulk = {
        let (peer, stop, sent) = (to_b.clone(), stop.clone(), bulk_sent.clone());
        let chunk = Bytes::from(vec![3u8; BULK_MESSAGE_BYTES]);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if peer.send(plain(PRIO_BULK, &chunk)).await.is_err() {
                    return;
                }
                sent.fetch_add(BULK_MESSAGE_BYTES as u64, Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (start, before) = (Instant::now(), bulk_sent.load(Ordering::Relaxed));
    let mut busy =
        acp_round_trips(&to_b, &mut a_events, PRIO_URGENT, args.round_trips, gap).await?;
    let mut busy_inbox = requester
        .round_trips(PRIO_URGENT, args.round_trips, gap)
        .await?;
    f.bulk_mb_per_sec_during_urgent =
        (bulk_sent.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64() / 1e6;
    stop.store(true, Ordering::Relaxed);
    f.urgent_with_bulk_p50_us = percentile_us(&mut busy, 0.5);
    f.urgent_with_bulk_p99_us = percentile_us(&mut busy, 0.99);
    f.urgent_with_bulk_inbox_p50_us = percentile_us(&mut busy_inbox, 0.5);
    f.urgent_with_bulk_inbox_p99_us = percentile_us(&mut busy_inbox, 0.99);
    f.lost_packets = to_b.connection_stats().path.lost_packets;
    let _ = tokio::time::timeout(Duration::from_secs(5), bulk).await;
    a.shutdown(crate::transport::wire::AcpErrorCode::NoError, "done")
        .await;
    b.shutdown(crate::transport::wire::AcpErrorCode::NoError, "done")
        .await;
    Ok(f)
}

async fn wait_count(counter: &AtomicU64, target: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while counter.load(Ordering::Relaxed) < target {
        if Instant::now() > deadline {
            bail!(
                "only {} of {target} messages arrived within 120 s",
                counter.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    Ok(())
}

// --------------------------------------------------------- bare quinn ----

/// The first byte of each bare-quinn stream says what it is for.
const SINK: u8 = 0;
const ECHO: u8 = 1;

fn quinn_endpoint(identity: &NodeIdentity, server: bool) -> anyhow::Result<quinn::Endpoint> {
    let server_config = if server {
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls::server_config(identity)?)?;
        Some(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
    } else {
        None
    };
    let socket = bind_socket(
        loopback(),
        EndpointConfig::new(loopback()).socket_buffer_bytes,
    )?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server_config,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls::client_config(identity)?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(endpoint)
}

/// Serves one connection: sink streams are drained and counted, echo streams are
/// answered 64 bytes for 64 bytes on one reply stream.
async fn quinn_server(conn: quinn::Connection, received: Arc<AtomicU64>) {
    let reply = Arc::new(tokio::sync::Mutex::new(None::<quinn::SendStream>));
    while let Ok(mut recv) = conn.accept_uni().await {
        let (conn, received, reply) = (conn.clone(), received.clone(), reply.clone());
        tokio::spawn(async move {
            let mut kind = [0u8; 1];
            if recv.read_exact(&mut kind).await.is_err() {
                return;
            }
            if kind[0] == SINK {
                while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
                    received.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                }
                return;
            }
            let mut buf = [0u8; PAYLOAD_BYTES];
            while recv.read_exact(&mut buf).await.is_ok() {
                let mut guard = reply.lock().await;
                if guard.is_none() {
                    let Ok(s) = conn.open_uni().await else { return };
                    let _ = s.set_priority(3);
                    *guard = Some(s);
                }
                let Some(s) = guard.as_mut() else { return };
                if s.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn quinn_round_trips(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    n: usize,
    gap: Option<Duration>,
) -> anyhow::Result<Vec<Duration>> {
    let body = [7u8; PAYLOAD_BYTES];
    let mut back = [0u8; PAYLOAD_BYTES];
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let start = Instant::now();
        send.write_all(&body).await?;
        recv.read_exact(&mut back).await?;
        if i >= n / 10 {
            samples.push(start.elapsed());
        }
        if let Some(gap) = gap {
            tokio::time::sleep(gap).await;
        }
    }
    Ok(samples)
}

/// [`quinn_round_trips`] with the replies read by a task of their own and handed to
/// the requester over a channel, as the transport's lane reader hands them to the event
/// stream's owner: the same task hop, on bare quinn. Returns the reply stream after.
async fn quinn_round_trips_handed_over(
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    n: usize,
) -> anyhow::Result<(Vec<Duration>, quinn::RecvStream)> {
    let total = n + n / 10;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(256);
    let reader = tokio::spawn(async move {
        let mut back = [0u8; PAYLOAD_BYTES];
        for _ in 0..total {
            recv.read_exact(&mut back).await?;
            if tx.send(()).await.is_err() {
                break;
            }
        }
        anyhow::Ok(recv)
    });
    let body = [7u8; PAYLOAD_BYTES];
    let mut samples = Vec::with_capacity(n);
    for i in 0..total {
        let start = Instant::now();
        send.write_all(&body).await?;
        rx.recv().await.context("the reply reader stopped")?;
        if i >= n / 10 {
            samples.push(start.elapsed());
        }
    }
    Ok((samples, reader.await??))
}

async fn bench_quinn(ca: &ClusterCa, args: &TransportBench) -> anyhow::Result<Figures> {
    let server = quinn_endpoint(&ca.node_identity("quinn-b")?, true)?;
    let client = quinn_endpoint(&ca.node_identity("quinn-a")?, false)?;
    let received = Arc::new(AtomicU64::new(0));
    {
        let (server, received) = (server.clone(), received.clone());
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                if let Ok(conn) = incoming.await {
                    tokio::spawn(quinn_server(conn, received.clone()));
                }
            }
        });
    }
    let conn = client.connect(server.local_addr()?, "quinn-b")?.await?;
    let mut f = Figures::default();

    // Throughput: 64-byte records written in 64 KiB batches, as ACP's writer batches.
    let total = args.messages * PAYLOAD_BYTES as u64;
    let (start, cpu) = (Instant::now(), Since::start(cpu_ns));
    let mut sink = conn.open_uni().await?;
    sink.write_all(&[SINK]).await?;
    let batch = Bytes::from(vec![1u8; (64 * 1024 / PAYLOAD_BYTES) * PAYLOAD_BYTES]);
    let mut left = total;
    while left > 0 {
        let n = left.min(batch.len() as u64) as usize;
        sink.write_chunk(batch.slice(..n)).await?;
        left -= n as u64;
    }
    wait_count(&received, total).await?;
    f.messages_per_sec = args.messages as f64 / start.elapsed().as_secs_f64();
    f.messages_per_sec_batched = f.messages_per_sec;
    f.cpu_ns_per_message_batched = cpu.per(args.messages);

    let mut echo = conn.open_uni().await?;
    echo.set_priority(3)?;
    // The server opens its reply stream on the first request.
    echo.write_all(&[ECHO]).await?;
    echo.write_all(&[0u8; PAYLOAD_BYTES]).await?;
    let mut back = conn.accept_uni().await?;
    back.read_exact(&mut [0u8; PAYLOAD_BYTES]).await?;
    let switches = Since::start(context_switches);
    let mut rr = quinn_round_trips(&mut echo, &mut back, args.round_trips, None).await?;
    f.request_reply_switches = switches.per(with_warm_up(args.round_trips));
    f.request_reply_inbox_switches = f.request_reply_switches;
    f.request_reply_p50_us = percentile_us(&mut rr, 0.5);
    f.request_reply_p99_us = percentile_us(&mut rr, 0.99);
    f.request_reply_inbox_p50_us = f.request_reply_p50_us;
    f.request_reply_inbox_p99_us = f.request_reply_p99_us;
    let switches = Since::start(context_switches);
    let (mut rr, back_again) =
        quinn_round_trips_handed_over(&mut echo, back, args.round_trips).await?;
    back = back_again;
    f.request_reply_handed_over_switches = switches.per(with_warm_up(args.round_trips));
    f.request_reply_handed_over_p50_us = percentile_us(&mut rr, 0.5);
    let gap = Some(Duration::from_micros(200));
    let mut idle = quinn_round_trips(&mut echo, &mut back, args.round_trips, gap).await?;
    f.urgent_idle_p50_us = percentile_us(&mut idle, 0.5);
    f.urgent_idle_p99_us = percentile_us(&mut idle, 0.99);

    let stop = Arc::new(AtomicBool::new(false));
    let bulk_sent = Arc::new(AtomicU64::new(0));
    let mut bulk_stream = conn.open_uni().await?;
    bulk_stream.set_priority(0)?;
    bulk_stream.write_all(&[SINK]).await?;
    let bulk = {
        let (stop, sent) = (stop.clone(), bulk_sent.clone());
        let chunk = Bytes::from(vec![3u8; BULK_MESSAGE_BYTES]);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if bulk_stream.write_chunk(chunk.clone()).await.is_err() {
                    return;
                }
                sent.fetch_add(BULK_MESSAGE_BYTES as u64, Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (start, before) = (Instant::now(), bulk_sent.load(Ordering::Relaxed));
    let mut busy = quinn_round_trips(&mut echo, &mut back, args.round_trips, gap).await?;
    f.bulk_mb_per_sec_during_urgent =
        (bulk_sent.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64() / 1e6;
    stop.store(true, Ordering::Relaxed);
    f.urgent_with_bulk_p50_us = percentile_us(&mut busy, 0.5);
    f.urgent_with_bulk_p99_us = percentile_us(&mut busy, 0.99);
    f.urgent_idle_inbox_p50_us = f.urgent_idle_p50_us;
    f.urgent_idle_inbox_p99_us = f.urgent_idle_p99_us;
    f.urgent_with_bulk_inbox_p50_us = f.urgent_with_bulk_p50_us;
    f.urgent_with_bulk_inbox_p99_us = f.urgent_with_bulk_p99_us;
    f.lost_packets = conn.stats().path.lost_packets;
    let _ = tokio::time::timeout(Duration::from_secs(5), bulk).await;
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    Ok(f)
}
