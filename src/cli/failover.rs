//! `agentmesh bench failover`: how long a node's segments stay orphaned after the
//! node is SIGKILLed. Each run starts three node processes (a coordinator and two
//! worker nodes), gives the workers a task, kills the worker node holding segments,
//! and times from the kill to the coordinator having reallocated every one of them;
//! then it waits for the task and checks that nothing was lost.

use std::time::Duration;

// Wall-clock time as the user sees it, across processes.
use tokio::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use crate::builtin::SegmentInput;
use crate::runtime::{Client, RemoteMessage};
use crate::sims::report::quantile;
use crate::transport::tls::NodeIdentity;

use super::procs::{agents_status, NodeSpec, Processes, WorkDir};
use crate::actors::service::{
    AgentsStatus, SubmitRequest, TaskOutcome, TaskStatus, COORDINATOR_SERVICE,
};
use crate::local::input;

#[derive(Debug, Args)]
pub struct FailoverBench {
    /// Kills to time.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// `sleep` agent replicas on each worker node (and segments per task).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    replicas: u32,
    /// How long each segment works, in milliseconds.
    #[arg(long, default_value_t = 1_500, value_parser = clap::value_parser!(u64).range(200..=60_000))]
    segment_ms: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

const NODES: [&str; 3] = ["fo-coordinator", "fo-worker-a", "fo-worker-b"];
const COORDINATOR: usize = 0;
const VICTIM: usize = 2;
const CLIENTS: [&str; 3] = ["fo-watch", "fo-probe", "fo-submit"];
const POLL: Duration = Duration::from_millis(2);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
const ASK: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
struct Figures {
    runs: u32,
    /// Runs where the victim held no segment (not timed, run again).
    skipped: u32,
    segments_reallocated: u64,
    lost: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    samples_ms: Vec<f64>,
}

pub fn run(args: FailoverBench) -> anyhow::Result<()> {
    let names: Vec<&str> = NODES.iter().chain(CLIENTS.iter()).copied().collect();
    let (work, ca) = WorkDir::with_certs(None, "failover", &names)?;
    let identities: Vec<NodeIdentity> = CLIENTS
        .iter()
        .map(|c| ca.node_identity(c))
        .collect::<Result<_, _>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let agents = format!("sleep={}", args.replicas);
    let mut samples = Vec::new();
    let (mut skipped, mut reallocated, mut lost) = (0, 0, 0);
    while samples.len() < args.runs as usize {
        if skipped > args.runs * 3 {
            bail!("the victim held no segment in {skipped} runs");
        }
        let specs: Vec<NodeSpec<'_>> = NODES
            .iter()
            .enumerate()
            .map(|(i, name)| NodeSpec {
                name,
                agents: if i == COORDINATOR { "" } else { &agents },
                metrics: None,
            })
            .collect();
        let mut procs = Processes::start(&work.path, &specs)?;
        let outcome = runtime.block_on(one_run(&args, &identities, &mut procs));
        drop(procs);
        match outcome.with_context(|| format!("run {}", samples.len() + 1))? {
            None => skipped += 1,
            Some((ms, held, missing)) => {
                if !args.json {
                    eprintln!(
                        "run {:>3}: {held} segments reallocated {ms:.1} ms after the kill",
                        samples.len() + 1
                    );
                }
                samples.push(ms);
                reallocated += held;
                lost += missing;
            }
        }
    }
    let mut sorted: Vec<u64> = samples.iter().map(|ms| (ms * 1e3) as u64).collect();
    sorted.sort_unstable();
    let ms = |us: u64| us as f64 / 1e3;
    let figures = Figures {
        runs: args.runs,
        skipped,
        segments_reallocated: reallocated,
        lost,
        p50_ms: ms(quantile(&sorted, 0.50)),
        p99_ms: ms(quantile(&sorted, 0.99)),
        max_ms: ms(sorted.last().copied().unwrap_or(0)),
        samples_ms: samples,
    };
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        println!(
            "failover over {} runs (SIGKILL of a worker node -> all its segments reallocated)",
            figures.runs
        );
        println!(
            "p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms   segments reallocated {}   lost {}",
            figures.p50_ms,
            figures.p99_ms,
            figures.max_ms,
            figures.segments_reallocated,
            figures.lost
        );
    }
    if lost > 0 {
        bail!("{lost} segments were lost");
    }
    Ok(())
}

async fn connect(
    identity: &NodeIdentity,
    procs: &mut Processes,
    i: usize,
) -> anyhow::Result<Client> {
    let started = Instant::now();
    loop {
        procs.check_alive()?;
        match Client::connect(identity, procs.addrs[i]).await {
            Ok(c) => return Ok(c),
            Err(e) if started.elapsed() > SETTLE_TIMEOUT => {
                return Err(e).context("connecting to a node")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn status(client: &mut Client) -> anyhow::Result<AgentsStatus> {
    agents_status(client, ASK).await
}

/// One kill: `None` if the victim held no segment, else the milliseconds from the
/// kill to every one of its segments reallocated, how many it held, and how many
/// segments the task ended without.
async fn one_run(
    args: &FailoverBench,
    identities: &[NodeIdentity],
    procs: &mut Processes,
) -> anyhow::Result<Option<(f64, u64, u64)>> {
    let mut watch = connect(&identities[0], procs, COORDINATOR).await?;
    let mut probe = connect(&identities[1], procs, VICTIM).await?;
    // Wait until the coordinator knows both worker nodes' agents. A node that has
    // just started accepts connections a moment before its agents service is
    // registered, so a refusal counts as "not yet" until the settle timeout.
    let started = Instant::now();
    loop {
        let known = status(&mut watch).await.map(|s| s.agents.len());
        if matches!(known, Ok(n) if n >= 2) {
            break;
        }
        procs.check_alive()?;
        if started.elapsed() > SETTLE_TIMEOUT {
            let why = known.map_or_else(|e| format!("{e:#}"), |n| format!("{n} agents known"));
            bail!("the coordinator never learnt of both worker nodes ({why})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let inputs = (0..args.replicas)
        .map(|segment| {
            input(&SegmentInput {
                segment,
                ms: args.segment_ms,
                ..SegmentInput::default()
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let request = SubmitRequest::new("sleep", inputs)
        .with_priority(96)
        .with_label("failover");
    let mut submitter = connect(&identities[2], procs, COORDINATOR).await?;
    let task = tokio::spawn(async move {
        submitter
            .request::<_, TaskOutcome>(
                COORDINATOR_SERVICE,
                <SubmitRequest as RemoteMessage>::KIND,
                &request,
                Duration::from_secs(120),
            )
            .await
    });
    // Every segment is allocated at once (there are twice as many workers); the first
    // progress shows they have started. Then the victim's own registry, which knows
    // exactly what its agents hold, says how many it has.
    let started = Instant::now();
    loop {
        let tasks = status(&mut watch).await?.tasks;
        if tasks.first().is_some_and(|t| t.progress_permille > 0) {
            break;
        }
        if started.elapsed() > SETTLE_TIMEOUT {
            bail!("the task never started");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held: u64 = status(&mut probe)
        .await?
        .agents
        .iter()
        .filter(|a| &*a.node == NODES[VICTIM])
        .map(|a| u64::from(a.load))
        .sum();
    if held == 0 {
        task.abort();
        return Ok(None);
    }
    let killed = Instant::now();
    procs.kill(VICTIM)?;
    let elapsed = loop {
        let tasks = status(&mut watch).await?.tasks;
        if tasks.first().is_some_and(|t| t.reallocated >= held) {
            break killed.elapsed();
        }
        if killed.elapsed() > SETTLE_TIMEOUT {
            bail!("{held} segments were never reallocated");
        }
        tokio::time::sleep(POLL).await;
    };
    let outcome = task.await??;
    if outcome.status != TaskStatus::Completed {
        bail!(
            "the task ended {:?}: {}",
            outcome.status,
            outcome.reason.unwrap_or_default()
        );
    }
    // Segments without a result (the ledger's count and the results agree on a
    // completed task; take the larger if they ever did not).
    let missing = u64::from(outcome.segments.saturating_sub(outcome.completed))
        .max(u64::from(args.replicas).saturating_sub(outcome.results.len() as u64));
    Ok(Some((elapsed.as_secs_f64() * 1e3, held, missing)))
}
