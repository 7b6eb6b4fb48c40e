//! `agentmesh bench tasks`: what a coordinator pays per task when thousands run at
//! once. A cluster in this process (real nodes on loopback, real QUIC and mutual TLS)
//! with `sleep` agents on every node; T tasks of one segment are submitted to one
//! node at once, and then, as the baseline measured in the same run, T/10. If the
//! coordinator's work per task grew with the tasks open (a round over every waiting
//! task after each result, a pass over every task its standby lacks after each
//! message), the time per task of the large run is a multiple of the small one's.

use std::sync::Arc;

// Wall-clock time, as the user sees it.
use tokio::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use crate::actors::coordinator::MAX_OPEN_TASKS;
use crate::actors::service::{SubmitRequest, TaskStatus};
use crate::builtin::{SegmentInput, Sleep};
use crate::local::{input, LocalCluster};
use crate::sims::report::quantile;

#[derive(Debug, Args)]
pub struct TasksBench {
    /// Tasks submitted at once in the large run (the baseline submits a tenth).
    #[arg(long, default_value_t = 9_000, value_parser = clap::value_parser!(u32).range(10..=MAX_OPEN_TASKS as i64))]
    tasks: u32,
    /// Nodes in the cluster; the tasks go to the first, whose standby is another.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=5))]
    nodes: u32,
    /// `sleep` replicas on each node.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    replicas: u32,
    /// How long each task's one segment works, in milliseconds.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    segment_ms: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Run {
    tasks: u32,
    completed: u32,
    seconds: f64,
    tasks_per_sec: f64,
    /// From a task's submission to its outcome.
    p50_ms: f64,
    p99_ms: f64,
    reallocated: u64,
}

#[derive(Debug, Serialize)]
struct Figures {
    nodes: u32,
    workers: u32,
    segment_ms: u64,
    baseline: Run,
    large: Run,
    /// Seconds per task of the large run over the baseline's: 1 if the cost per task
    /// does not grow with the tasks open.
    per_task_ratio: f64,
}

pub fn run(args: TasksBench) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let figures = runtime.block_on(runtime.spawn(measure(
        args.tasks,
        args.nodes,
        args.replicas,
        args.segment_ms,
    )))??;
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
        return Ok(());
    }
    println!(
        "agentmesh bench tasks: {} nodes in one process, {} sleep agents in all, tasks of one {} ms segment submitted at once to one node",
        figures.nodes, figures.workers, figures.segment_ms
    );
    println!(
        "{:>8} {:>10} {:>10} {:>12} {:>10} {:>10} {:>12}",
        "tasks", "completed", "seconds", "tasks/s", "p50 ms", "p99 ms", "reallocated"
    );
    for r in [&figures.baseline, &figures.large] {
        println!(
            "{:>8} {:>10} {:>10.2} {:>12.0} {:>10.1} {:>10.1} {:>12}",
            r.tasks, r.completed, r.seconds, r.tasks_per_sec, r.p50_ms, r.p99_ms, r.reallocated
        );
    }
    println!(
        "time per task, {} tasks over {}: {:.2}x (1.00x: the coordinator's cost per task does not grow with the tasks open)",
        figures.large.tasks, figures.baseline.tasks, figures.per_task_ratio
    );
    Ok(())
}

async fn measure(
    tasks: u32,
    nodes: u32,
    replicas: u32,
    segment_ms: u64,
) -> anyhow::Result<Figures> {
    let names: Vec<String> = (0..nodes).map(|i| format!("tasks-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let cluster = Arc::new(LocalCluster::start(&names).await?);
    for node in 0..cluster.len() {
        cluster.host(node).add(Sleep, replicas as usize).await?;
    }
    cluster.wait_for_agents(cluster.len()).await?;
    let baseline = submit_at_once(&cluster, (tasks / 10).max(1), segment_ms).await?;
    let large = submit_at_once(&cluster, tasks, segment_ms).await?;
    if let Ok(cluster) = Arc::try_unwrap(cluster) {
        cluster.shutdown().await;
    }
    let per_task = |r: &Run| r.seconds / f64::from(r.tasks);
    Ok(Figures {
        nodes,
        workers: nodes * replicas,
        segment_ms,
        per_task_ratio: per_task(&large) / per_task(&baseline),
        baseline,
        large,
    })
}

/// Submits `tasks` tasks to node 0 at once and waits for every outcome; an error if
/// one did not complete.
async fn submit_at_once(
    cluster: &Arc<LocalCluster>,
    tasks: u32,
    segment_ms: u64,
) -> anyhow::Result<Run> {
    let segment = input(&SegmentInput {
        ms: segment_ms,
        ..SegmentInput::default()
    })?;
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (cluster, segment) = (cluster.clone(), segment.clone());
        running.spawn(async move {
            let submitted = Instant::now();
            let outcome = cluster
                .host(0)
                .submit(SubmitRequest::new("sleep", vec![segment]))
                .await;
            (outcome, submitted.elapsed())
        });
    }
    let (mut completed, mut reallocated, mut latencies_us) = (0, 0, Vec::new());
    while let Some(joined) = running.join_next().await {
        let (outcome, took) = joined.context("a submitting task panicked")?;
        let outcome = outcome?;
        if outcome.status != TaskStatus::Completed {
            bail!(
                "task {} ended {:?}: {}",
                outcome.task,
                outcome.status,
                outcome.reason.as_deref().unwrap_or("no reason given")
            );
        }
        completed += 1;
        reallocated += outcome.reallocated;
        latencies_us.push(took.as_micros() as u64);
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    let ms = |q| quantile(&latencies_us, q) as f64 / 1e3;
    Ok(Run {
        tasks,
        completed,
        seconds,
        tasks_per_sec: f64::from(tasks) / seconds,
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        reallocated,
    })
}
