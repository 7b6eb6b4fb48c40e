//! `agentmesh demo`: the whole mesh in under a minute on one machine. Three real node
//! processes on loopback (mutual TLS against a CA made in a temporary folder) run
//! retrieval and summarization agents; questions about AgentMesh's own documents go
//! through two chained stages each; one node is SIGKILLed midway; a live view follows
//! every task, and the summary checks that no segment was lost or accepted twice.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// The demo measures wall-clock latency, as its user sees it.
use tokio::time::Instant;

use anyhow::bail;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::actors::pages::rest_of;
use crate::actors::service::serde_bytes_vec::Blob;
use crate::actors::service::{
    AgentsStatus, SubmitRequest, TaskOutcome, TaskStatus, COORDINATOR_SERVICE,
};
use crate::local::{input, inputs, results};
use crate::rag::{chunks, Passage, RetrieveInput, SummarizeInput, Summary, CORPUS};
use crate::runtime::{Client, RemoteMessage};
use crate::sims::report::{class, quantile};
use crate::transport::tls::NodeIdentity;

use super::procs::{agents_status, free_tcp_ports, NodeSpec, Processes, WorkDir};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Questions to answer; each is a retrieve stage then a summarize stage.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=QUESTIONS.len() as i64))]
    questions: u32,
    /// Chunks each of the three documents is cut into (retrieve segments per question:
    /// three times this).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
    chunks: u32,
    /// Model time each segment stands for, in milliseconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    segment_ms: u64,
    /// Kill the node when this share of the retrieval segments is done (0 to 100; 100:
    /// never kill).
    #[arg(long, default_value_t = 35, value_parser = clap::value_parser!(u8).range(0..=100))]
    kill_at_percent: u8,
    /// Keep the certificates and node logs in this folder instead of a temporary one.
    #[arg(long)]
    keep: Option<PathBuf>,
}

/// The questions, with their priority (urgent 224, high 160, normal 96, low 32).
const QUESTIONS: &[(&str, u8)] = &[
    (
        "How is a crashed node's segment reallocated by the ledger?",
        224,
    ),
    ("What does the replay window refuse on a lane?", 96),
    ("How are lanes mapped onto QUIC streams by priority?", 32),
    (
        "How does discovery replicate the registry between nodes?",
        160,
    ),
    (
        "What happens when a policy file is applied without a restart?",
        224,
    ),
    (
        "How are certificates and the cluster CA used for mutual TLS?",
        96,
    ),
    ("When do REPORT frames travel as QUIC datagrams?", 32),
    (
        "How does the coordinator choose an agent for a segment?",
        160,
    ),
    ("What does the simulator check at every event?", 96),
    (
        "How are duplicate results from two attempts discarded?",
        224,
    ),
    ("What does a worker do when it receives ADJUST?", 32),
    (
        "How does the membership failure detector decide a node is down?",
        160,
    ),
];

const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// The node killed midway (never the one tasks are submitted to).
const VICTIM: usize = 2;
const AGENTS_PER_NODE: &str = "retrieve=3,summarize=1";
/// Registry records: one per agent type per node (replicas share their agent's ID).
const AGENTS_TOTAL: usize = 3 * 2;
/// Passages handed from the retrieve stage to the summarize stage.
const PASSAGES_KEPT: usize = 12;
const STATUS_EVERY: Duration = Duration::from_millis(200);
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);
const TASK_TIMEOUT: Duration = Duration::from_secs(120);

/// One question's way through the two stages.
#[derive(Default)]
struct Flow {
    stage: &'static str,
    retrieve: Option<TaskOutcome>,
    summarize: Option<TaskOutcome>,
    summary: Option<Summary>,
    misplaced: u64,
    latency: Option<Duration>,
    error: Option<String>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let (work, ca) = WorkDir::with_certs(args.keep.as_deref(), "demo", &NODES)?;
    // A node keeps one connection per peer name: every concurrent client has its own.
    let identity = ca.node_identity("demo-watch")?;
    let flow_identities: Vec<NodeIdentity> = (1..=args.questions)
        .map(|q| ca.node_identity(&format!("demo-q{q}")))
        .collect::<Result<_, _>>()?;
    let metrics = free_tcp_ports(NODES.len())?;
    let specs: Vec<NodeSpec<'_>> = NODES
        .iter()
        .zip(&metrics)
        .map(|(name, m)| NodeSpec {
            name,
            agents: AGENTS_PER_NODE,
            metrics: Some(*m),
        })
        .collect();
    let mut procs = Processes::start(&work.path, &specs)?;
    let addrs = procs.addrs.clone();
    println!(
        "AgentMesh demo: three nodes on loopback, mutual TLS with a CA made in {}",
        work.path.display()
    );
    for (i, name) in NODES.iter().enumerate() {
        println!(
            "  {name}  acp {}  metrics http://{}/metrics",
            addrs[i], metrics[i]
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = drive(&args, &identity, &flow_identities, &addrs, &mut procs) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    let flows = outcome?;
    let reallocated_metric = scrape(metrics[0], "agentmesh_segments_reallocated_total");
    drop(procs);
    summarize_run(&args, &flows, reallocated_metric)
}

async fn status(client: &mut Client) -> anyhow::Result<AgentsStatus> {
    agents_status(client, Duration::from_secs(5)).await
}

/// Waits for the cluster, runs every question's flow with a live view, kills the victim
/// midway.
async fn drive(
    args: &DemoArgs,
    identity: &NodeIdentity,
    flow_identities: &[NodeIdentity],
    addrs: &[SocketAddr],
    procs: &mut Processes,
) -> anyhow::Result<Vec<Arc<Mutex<Flow>>>> {
    let started = Instant::now();
    let mut watcher = loop {
        procs.check_alive()?;
        if started.elapsed() > CLUSTER_TIMEOUT {
            bail!("the cluster did not form within {CLUSTER_TIMEOUT:?}");
        }
        match Client::connect(identity, addrs[0]).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(STATUS_EVERY).await,
        }
    };
    loop {
        procs.check_alive()?;
        let known = status(&mut watcher)
            .await
            .map(|s| s.agents.len())
            .unwrap_or(0);
        if known >= AGENTS_TOTAL {
            break;
        }
        if started.elapsed() > CLUSTER_TIMEOUT {
            bail!("the registry knows {known} of {AGENTS_TOTAL} agents after {CLUSTER_TIMEOUT:?}");
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
    println!(
        "cluster formed in {} ms: {AGENTS_PER_NODE} replicas on each node\n",
        started.elapsed().as_millis()
    );

    let chunk_count = args.chunks as usize;
    let docs: Vec<(String, String)> = CORPUS
        .iter()
        .flat_map(|(name, text)| {
            chunks(text, chunk_count)
                .into_iter()
                .enumerate()
                .map(move |(i, c)| (format!("{name}#{i}"), c))
        })
        .collect();
    let questions = &QUESTIONS[..args.questions as usize];
    let segments_per_question = docs.len() as u64;
    let total_retrieve = segments_per_question * questions.len() as u64;

    let live = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:<4} {bar:30} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut flows = Vec::new();
    let mut bars = Vec::new();
    for (q, (text, priority)) in questions.iter().enumerate() {
        let bar = multi.add(ProgressBar::new(1000));
        bar.set_style(style.clone());
        bar.set_prefix(format!("q{}", q + 1));
        bar.set_message(format!("[{}] waiting  {text}", class(*priority)));
        bars.push(bar);
        let flow = Arc::new(Mutex::new(Flow {
            stage: "waiting",
            ..Flow::default()
        }));
        flows.push(flow.clone());
        let (identity, to, docs) = (flow_identities[q].clone(), addrs[0], docs.clone());
        let (text, priority, ms) = (text.to_string(), *priority, args.segment_ms);
        tokio::spawn(async move {
            let began = Instant::now();
            if let Err(e) = question_flow(q, &text, priority, ms, &docs, &identity, to, &flow).await
            {
                lock(&flow).error = Some(format!("{e:#}"));
            }
            lock(&flow).latency = Some(began.elapsed());
        });
    }
    let say = |line: String| {
        if live {
            multi.suspend(|| println!("{line}"));
        } else {
            println!("{line}");
        }
    };

    let kill_at = total_retrieve * u64::from(args.kill_at_percent) / 100;
    let mut killed = false;
    let mut done_retrieve = 0u64;
    loop {
        let s = status(&mut watcher).await.unwrap_or_default();
        let mut running: BTreeMap<String, (u16, u32, u32, u64)> = BTreeMap::new();
        for t in &s.tasks {
            if let Some(label) = &t.label {
                running.insert(
                    label.clone(),
                    (t.progress_permille, t.completed, t.segments, t.reallocated),
                );
            }
        }
        let mut all_done = true;
        let mut retrieve_now = 0u64;
        for (q, (flow, bar)) in flows.iter().zip(&bars).enumerate() {
            let f = lock(flow);
            let (_, priority) = questions[q];
            let finished = f.latency.is_some();
            all_done &= finished;
            let retrieve_done = f.retrieve.as_ref().map_or(0, |o| u64::from(o.completed));
            let live_r = running.get(&format!("q{} retrieve", q + 1));
            retrieve_now += live_r.map_or(retrieve_done, |r| u64::from(r.1));
            let (pos, detail) = match (
                f.stage,
                live_r,
                running.get(&format!("q{} summarize", q + 1)),
            ) {
                (_, _, _) if finished => (
                    1000,
                    match &f.error {
                        Some(e) => format!("FAILED: {e}"),
                        None => format!(
                            "done in {} ms, {} reallocated",
                            f.latency.unwrap_or_default().as_millis(),
                            f.retrieve.as_ref().map_or(0, |o| o.reallocated)
                                + f.summarize.as_ref().map_or(0, |o| o.reallocated)
                        ),
                    },
                ),
                ("retrieve", Some((p, c, n, r)), _) => (
                    u64::from(*p) * 8 / 10,
                    format!("retrieve {c}/{n} segments, {r} reallocated"),
                ),
                ("summarize", _, Some((p, _, _, r))) => (
                    800 + u64::from(*p) / 5,
                    format!("summarize, {r} reallocated"),
                ),
                ("summarize", _, None) => (800, "summarize".to_string()),
                (stage, _, _) => (0, stage.to_string()),
            };
            bar.set_position(pos);
            bar.set_message(format!("[{}] {detail}", class(priority)));
        }
        done_retrieve = done_retrieve.max(retrieve_now);
        if !killed && args.kill_at_percent < 100 && done_retrieve >= kill_at {
            procs.kill(VICTIM)?;
            killed = true;
            say(format!(
                ">>> SIGKILL {} at {done_retrieve}/{total_retrieve} retrieval segments done ({} ms in); its segments are reallocated",
                NODES[VICTIM],
                started.elapsed().as_millis()
            ));
        }
        if all_done {
            break;
        }
        if started.elapsed() > TASK_TIMEOUT {
            bail!("the workload did not finish within {TASK_TIMEOUT:?}");
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
    for bar in &bars {
        bar.finish();
    }
    if !live {
        for (q, flow) in flows.iter().enumerate() {
            let f = lock(flow);
            say(format!(
                "q{} [{}] {} in {} ms",
                q + 1,
                class(questions[q].1),
                if f.error.is_some() { "failed" } else { "done" },
                f.latency.unwrap_or_default().as_millis()
            ));
        }
    }
    watcher.close().await;
    Ok(flows)
}

fn lock(flow: &Mutex<Flow>) -> std::sync::MutexGuard<'_, Flow> {
    flow.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn submit(
    client: &mut Client,
    label: String,
    capability: &str,
    priority: u8,
    inputs: Vec<Blob>,
) -> anyhow::Result<TaskOutcome> {
    let request = SubmitRequest::new(capability, inputs)
        .with_priority(priority)
        .with_label(label);
    let first: TaskOutcome = client
        .request(
            COORDINATOR_SERVICE,
            <SubmitRequest as RemoteMessage>::KIND,
            &request,
            TASK_TIMEOUT,
        )
        .await?;
    let outcome = rest_of(client, first, TASK_TIMEOUT).await?;
    if outcome.status == TaskStatus::Failed {
        bail!(
            "{capability} stage failed: {}",
            outcome.reason.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(outcome)
}

/// Stage 1 asks every chunk for passages; stage 2 composes the answer from the best.
#[allow(clippy::too_many_arguments)]
async fn question_flow(
    q: usize,
    query: &str,
    priority: u8,
    ms: u64,
    docs: &[(String, String)],
    identity: &NodeIdentity,
    to: SocketAddr,
    flow: &Mutex<Flow>,
) -> anyhow::Result<()> {
    let mut client = Client::connect(identity, to).await?;
    lock(flow).stage = "retrieve";
    let inputs = inputs(docs.iter().map(|(source, text)| RetrieveInput {
        query: query.into(),
        source: source.clone(),
        text: text.clone(),
        top: 4,
        ms,
    }))?;
    let retrieved = submit(
        &mut client,
        format!("q{} retrieve", q + 1),
        "retrieve",
        priority,
        inputs,
    )
    .await?;
    // Each result must be its own segment's: a result accepted for the wrong segment, or
    // twice, would show here as a source that does not match.
    let found: Vec<Vec<Passage>> = results(&retrieved)?;
    let mut misplaced = docs.len().abs_diff(found.len()) as u64;
    for (passages, (source, _)) in found.iter().zip(docs) {
        misplaced += passages.iter().filter(|p| &p.source != source).count() as u64;
    }
    let mut passages: Vec<Passage> = found.into_iter().flatten().collect();
    passages.sort_by(|a, b| b.score.cmp(&a.score).then(a.text.len().cmp(&b.text.len())));
    passages.truncate(PASSAGES_KEPT);
    {
        let mut f = lock(flow);
        f.stage = "summarize";
        f.retrieve = Some(retrieved);
        f.misplaced = misplaced;
    }
    let input = input(&SummarizeInput {
        query: query.into(),
        passages,
        sentences: 2,
        ms,
    })?;
    let summarized = submit(
        &mut client,
        format!("q{} summarize", q + 1),
        "summarize",
        priority,
        vec![input],
    )
    .await?;
    let summary: Summary = results(&summarized)?.into_iter().next().unwrap_or_default();
    client.close().await;
    let mut f = lock(flow);
    f.stage = "done";
    f.summarize = Some(summarized);
    f.summary = Some(summary);
    Ok(())
}

/// Reads one counter from a node's Prometheus endpoint (summed over its labels).
fn scrape(addr: SocketAddr, name: &str) -> Option<f64> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.take(4 << 20).read_to_string(&mut body).ok()?;
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

fn summarize_run(
    args: &DemoArgs,
    flows: &[Arc<Mutex<Flow>>],
    reallocated_metric: Option<f64>,
) -> anyhow::Result<()> {
    let questions = &QUESTIONS[..args.questions as usize];
    let (mut tasks, mut completed, mut failed) = (0u64, 0u64, 0u64);
    let (mut segments, mut done, mut reallocated, mut discarded, mut misplaced) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut by_class: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    println!();
    for (q, flow) in flows.iter().enumerate() {
        let f = lock(flow);
        let (text, priority) = questions[q];
        for o in [&f.retrieve, &f.summarize].into_iter().flatten() {
            tasks += 1;
            completed += 1;
            segments += u64::from(o.segments);
            done += u64::from(o.completed);
            reallocated += o.reallocated;
            discarded += o.duplicates_discarded;
        }
        misplaced += f.misplaced;
        match (&f.error, &f.summary) {
            (None, Some(s)) => {
                by_class
                    .entry(class(priority))
                    .or_default()
                    .push(f.latency.unwrap_or_default().as_millis() as u64);
                println!("q{} {text}", q + 1);
                for sentence in &s.sentences {
                    let short: String = sentence.chars().take(150).collect();
                    println!(
                        "     {short}{}",
                        if short.len() < sentence.len() {
                            "…"
                        } else {
                            ""
                        }
                    );
                }
                println!("     (from {})", s.sources.join(", "));
            }
            (e, _) => {
                failed += 1;
                tasks += 1;
                println!(
                    "q{} {text}\n     FAILED: {}",
                    q + 1,
                    e.as_deref().unwrap_or("no answer")
                );
            }
        }
    }
    let lost = segments - done;
    println!("\n{:<36} {}", "tasks (2 stages per question)", tasks);
    println!("{:<36} {completed}", "tasks completed");
    println!("{:<36} {failed}", "tasks failed");
    println!("{:<36} {segments}", "segments");
    println!("{:<36} {reallocated}", "segments reallocated");
    println!("{:<36} {lost}", "segments lost");
    println!("{:<36} {misplaced}", "duplicates accepted (or misplaced)");
    println!("{:<36} {discarded}", "late copies discarded");
    if let Some(m) = reallocated_metric {
        println!("{:<36} {m}", "n1 agentmesh_segments_reallocated_total");
    }
    println!(
        "\n{:<10} {:>6} {:>10} {:>10}",
        "priority", "questions", "p50 (ms)", "p99 (ms)"
    );
    for name in ["urgent", "high", "normal", "low"] {
        if let Some(v) = by_class.get_mut(name) {
            v.sort_unstable();
            println!(
                "{name:<10} {:>6} {:>10} {:>10}",
                v.len(),
                quantile(v, 0.5),
                quantile(v, 0.99)
            );
        }
    }
    if failed > 0 || lost > 0 || misplaced > 0 {
        bail!("the demo lost work: {failed} questions failed, {lost} segments lost, {misplaced} results misplaced");
    }
    println!("\nnothing lost, nothing accepted twice");
    Ok(())
}
