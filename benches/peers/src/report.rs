//! `peers report`: runs every measurement with server and client in separate
//! processes, the head-of-line runs inside a network namespace with packet loss, and
//! writes the Markdown report with the machine it ran on.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use agentmesh::transport::tls::ClusterCa;

use crate::stats::Figures;

/// Where the report goes and how big the runs are.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The Markdown file to write.
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
    /// 64-byte messages per throughput run.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Round trips per request/reply run.
    #[arg(long, default_value_t = 5_000)]
    pub round_trips: usize,
    /// Runs of the small-message workload per system; the median run is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Urgent requests per head-of-line run.
    #[arg(long, default_value_t = 1_000)]
    pub hol_requests: usize,
    /// Packet loss, in percent, of each head-of-line run.
    #[arg(long, value_delimiter = ',', default_value = "0,2")]
    pub loss: Vec<u8>,
    /// Kills timed by the failover run.
    #[arg(long, default_value_t = 20)]
    pub failover_runs: u32,
    /// Agents registered by the scale run.
    #[arg(long, default_value_t = 100_000)]
    pub scale_agents: u32,
    /// Tasks submitted at once by the many-tasks run (`agentmesh bench tasks`).
    #[arg(long, default_value_t = 9_000)]
    pub tasks: u32,
    /// Folder holding the `agentmesh` and `ractor-peer` binaries (default: this one's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

const NETNS: &str = "agentmesh-hol";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A server process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    /// Starts `program args` (prefixed with `ip netns exec` inside the namespace) and
    /// waits for its `READY [addr]` line.
    async fn start(netns: Option<&str>, program: &Path, args: &[String]) -> anyhow::Result<Server> {
        let mut cmd = command(netns, program, args);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(READY_TIMEOUT, lines.next_line())
            .await
            .context("the server never said READY")??
            .context("the server exited before it was ready")?;
        let Some(rest) = line.strip_prefix("READY") else {
            bail!("the server said {line:?}, not READY");
        };
        Ok(Server {
            child,
            addr: rest.trim().to_string(),
        })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn command(netns: Option<&str>, program: &Path, args: &[String]) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program).args(args);
            cmd
        }
        None => {
            let mut cmd = Command::new(program);
            cmd.args(args);
            cmd
        }
    }
}

/// Runs a client to its end and parses the JSON line it prints last.
async fn client<T: for<'de> Deserialize<'de>>(
    netns: Option<&str>,
    program: &Path,
    args: &[String],
) -> anyhow::Result<T> {
    let output = command(netns, program, args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let last = stdout
        .lines()
        .last()
        .context("the client printed nothing")?;
    serde_json::from_str(last).with_context(|| format!("reading the client's figures {last:?}"))
}

/// The network namespace of the head-of-line runs: lo at MTU 1500, segmentation and
/// receive offloads off (so a packet on lo is one MTU-sized packet for TCP and QUIC
/// alike), and nftables dropping `loss` percent of packets at random where they
/// arrive. Deleted when dropped.
struct Netns;

impl Netns {
    fn create(loss: u8) -> anyhow::Result<Netns> {
        let _ = run("ip", &["netns", "del", NETNS]);
        run("ip", &["netns", "add", NETNS])?;
        let ns = Netns;
        run(
            "ip",
            &["-n", NETNS, "link", "set", "lo", "mtu", "1500", "up"],
        )?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                NETNS,
                "ethtool",
                "-K",
                "lo",
                "tso",
                "off",
                "gso",
                "off",
                "gro",
                "off",
                "tx-udp-segmentation",
                "off",
            ],
        )?;
        if loss > 0 {
            // At ingress on lo, after segmentation: every MTU-sized packet (and every
            // datagram of a UDP GSO batch) has its own chance of being dropped.
            let nft = |rule: &str| {
                let mut args = vec!["netns", "exec", NETNS, "nft"];
                args.extend(rule.split(' '));
                run("ip", &args)
            };
            nft("add table netdev agentmesh_hol")?;
            nft("add chain netdev agentmesh_hol lossy { type filter hook ingress device lo priority 0 ; policy accept ; }")?;
            nft(&format!(
                "add rule netdev agentmesh_hol lossy numgen random mod 100 < {loss} counter drop"
            ))?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", NETNS]);
    }
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

#[derive(Debug, Default, Deserialize)]
struct Failover {
    runs: u32,
    segments_reallocated: u64,
    lost: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Default, Deserialize)]
struct Scale {
    agents: u32,
    seconds: f64,
    registrations_per_sec: f64,
    bytes_per_idle_agent: f64,
    rss_after_mib: f64,
}

#[derive(Debug, Default, Deserialize)]
struct Tasks {
    nodes: u32,
    workers: u32,
    baseline: TasksRun,
    large: TasksRun,
    per_task_ratio: f64,
}

#[derive(Debug, Default, Deserialize)]
struct TasksRun {
    tasks: u32,
    completed: u32,
    seconds: f64,
    tasks_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    reallocated: u64,
}

struct Hol {
    loss: u8,
    rows: Vec<Figures>,
}

/// Runs it all.
pub async fn run_all(args: ReportArgs) -> anyhow::Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program has no folder")?
            .to_path_buf(),
    };
    let peers = std::env::current_exe()?;
    let agentmesh = bin_dir.join("agentmesh");
    let ractor_peer = bin_dir.join("ractor-peer");
    for p in [&agentmesh, &ractor_peer] {
        if !p.exists() {
            bail!(
                "{} is missing: build it first (benches/run.sh does)",
                p.display()
            );
        }
    }
    let certs = std::env::temp_dir().join(format!("agentmesh-peers-{}", std::process::id()));
    std::fs::create_dir_all(&certs)?;
    let ca = ClusterCa::generate()?;
    ca.save(&certs)?;
    ca.issue_to(&certs, "bench-server")?;
    ca.issue_to(&certs, "bench-client")?;
    let certs_arg = certs.display().to_string();
    let result = measure(&args, &peers, &agentmesh, &ractor_peer, &certs_arg).await;
    let _ = std::fs::remove_dir_all(&certs);
    let report = result?;
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &report)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("{report}");
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// The small-message workload once for one system.
async fn messaging_once(
    system: &str,
    peers: &Path,
    ractor_peer: &Path,
    certs: &str,
    args: &ReportArgs,
) -> anyhow::Result<Figures> {
    let (server, program, mut client_args) = if system == "ractor_cluster" {
        let port = free_tcp_port()?;
        let server = Server::start(None, ractor_peer, &[s("serve"), s("--port"), s(port)]).await?;
        let client_args = vec![
            s("client"),
            s("--server-port"),
            s(port),
            s("--port"),
            s(free_tcp_port()?),
        ];
        (server, ractor_peer, client_args)
    } else {
        let server = Server::start(
            None,
            peers,
            &[s("serve"), s(system), s("--certs"), s(certs)],
        )
        .await?;
        let client_args = vec![
            s("client"),
            s(system),
            s("--server"),
            server.addr.clone(),
            s("--certs"),
            s(certs),
            s("messaging"),
        ];
        (server, peers, client_args)
    };
    client_args.extend([
        s("--messages"),
        s(args.messages),
        s("--round-trips"),
        s(args.round_trips),
    ]);
    let figures = client(None, program, &client_args).await;
    server.stop().await;
    figures
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The median run by throughput, with the median of the latency figures.
fn median(mut runs: Vec<Figures>) -> Figures {
    let mid = runs.len() / 2;
    let mut p50: Vec<f64> = runs.iter().map(|f| f.rr_p50_us).collect();
    let mut p99: Vec<f64> = runs.iter().map(|f| f.rr_p99_us).collect();
    p50.sort_by(f64::total_cmp);
    p99.sort_by(f64::total_cmp);
    runs.sort_by(|a, b| a.messages_per_sec.total_cmp(&b.messages_per_sec));
    let mut m = runs.swap_remove(mid);
    m.rr_p50_us = p50[mid];
    m.rr_p99_us = p99[mid];
    m
}

async fn measure(
    args: &ReportArgs,
    peers: &Path,
    agentmesh: &Path,
    ractor_peer: &Path,
    certs: &str,
) -> anyhow::Result<String> {
    if !args.loss.is_empty() {
        // Fail before the long runs, not after them, when the namespace cannot be made.
        drop(Netns::create(0).context(
            "setting up the network namespace for the head-of-line runs (needs root, ip, ethtool and nft)",
        )?);
    }
    let mut messaging = Vec::new();
    for system in ["agentmesh", "ractor_cluster", "tonic"] {
        let mut runs = Vec::new();
        for i in 0..args.repeats.max(1) {
            eprintln!("small messages: {system}, run {}", i + 1);
            runs.push(
                messaging_once(system, peers, ractor_peer, certs, args)
                    .await
                    .with_context(|| format!("{system}, small messages"))?,
            );
        }
        messaging.push(median(runs));
    }
    let mut runs = Vec::new();
    for i in 0..args.repeats.max(1) {
        eprintln!("small messages: ractor in one process, run {}", i + 1);
        let run = client(
            None,
            peers,
            &[s("ceiling"), s("--messages"), s(args.messages)],
        )
        .await
        .context("ractor in one process")?;
        runs.push(run);
    }
    let ceiling = median(runs);

    let mut hol = Vec::new();
    for &loss in &args.loss {
        let _netns = Netns::create(loss)
            .context("setting up the network namespace (needs root, ip, ethtool and nft)")?;
        let mut rows = Vec::new();
        for system in ["agentmesh", "tcp", "tonic"] {
            eprintln!("head-of-line: {system}, {loss}% loss");
            let server = Server::start(
                Some(NETNS),
                peers,
                &[s("serve"), s(system), s("--certs"), s(certs)],
            )
            .await?;
            let figures = client(
                Some(NETNS),
                peers,
                &[
                    s("client"),
                    s(system),
                    s("--server"),
                    server.addr.clone(),
                    s("--certs"),
                    s(certs),
                    s("hol"),
                    s("--requests"),
                    s(args.hol_requests),
                ],
            )
            .await;
            server.stop().await;
            rows.push(figures.with_context(|| format!("{system}, head-of-line at {loss}% loss"))?);
        }
        hol.push(Hol { loss, rows });
    }

    eprintln!("failover: {} runs", args.failover_runs);
    let failover: Failover = client(
        None,
        agentmesh,
        &[
            s("bench"),
            s("failover"),
            s("--runs"),
            s(args.failover_runs),
            s("--json"),
        ],
    )
    .await
    .context("failover")?;
    eprintln!("scale: {} agents", args.scale_agents);
    let scale: Scale = client(
        None,
        agentmesh,
        &[
            s("bench"),
            s("scale"),
            s("--agents"),
            s(args.scale_agents),
            s("--json"),
        ],
    )
    .await
    .context("scale")?;
    eprintln!("tasks: {} at once", args.tasks);
    let tasks: Tasks = client(
        None,
        agentmesh,
        &[
            s("bench"),
            s("tasks"),
            s("--tasks"),
            s(args.tasks),
            s("--json"),
        ],
    )
    .await
    .context("tasks")?;
    let measured = Measured {
        messaging: &messaging,
        ceiling: &ceiling,
        hol: &hol,
        failover: &failover,
        scale: &scale,
        tasks: &tasks,
    };
    Ok(render(args, &measured))
}

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let rustc = run("rustc", &["-V"]).unwrap_or_else(|_| "rustc (unknown)".into());
    format!("{cores} cores ({cpu}), {mem_gib:.0} GiB, Linux {kernel}, {rustc}")
}

fn verdict(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**not met**"
    }
}

/// Everything one report measured.
struct Measured<'a> {
    messaging: &'a [Figures],
    ceiling: &'a Figures,
    hol: &'a [Hol],
    failover: &'a Failover,
    scale: &'a Scale,
    tasks: &'a Tasks,
}

fn render(args: &ReportArgs, measured: &Measured<'_>) -> String {
    let Measured {
        messaging,
        ceiling,
        hol,
        failover,
        scale,
        tasks,
    } = *measured;
    let mut md = String::new();
    let date = run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let commit = run("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|_| "unknown".into());
    let _ = writeln!(md, "# Benchmarks: AgentMesh and its peers\n");
    let _ = writeln!(
        md,
        "Written by `benches/run.sh` (`peers report`) on {date} at commit `{commit}`.  \nMachine: {}.\n",
        machine()
    );
    let _ = writeln!(md, "Every figure below comes from one run of the script; run it again to check them on your machine. Client and server are separate processes on loopback.\n");

    let _ = writeln!(md, "## Small messages (64-byte payloads)\n");
    let _ = writeln!(
        md,
        "{} messages one way from one sender, timed until the server has counted them all, then {} request/reply round trips one at a time; median of {} runs per system.\n",
        args.messages, args.round_trips, args.repeats
    );
    let _ = writeln!(
        md,
        "| system | how | messages/s | AgentMesh ÷ this | request/reply p50 (µs) | p99 (µs) |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|");
    let am = &messaging[0];
    for f in messaging {
        let how = match f.system.as_str() {
            "agentmesh" => "remote actor messages (`Mesh::send_to`, `ask_at`), QUIC + mutual TLS",
            "ractor_cluster" => "remote actor `cast`, `call` over its TCP session",
            _ => "gRPC over h2c: one bidirectional stream; unary for request/reply",
        };
        let _ = writeln!(
            md,
            "| {} | {how} | {:.0} | {:.2} | {:.0} | {:.0} |",
            f.system,
            f.messages_per_sec,
            am.messages_per_sec / f.messages_per_sec,
            f.rr_p50_us,
            f.rr_p99_us
        );
    }
    let _ = writeln!(
        md,
        "| {} | `ActorRef::cast` of each message, decoded from its bytes, to the same sink actor in one process: no network, no encryption; a bound for AgentMesh and ractor_cluster, whose messages each end in such a cast (the tonic server only counts them) | {:.0} | {:.2} | – | – |",
        ceiling.system,
        ceiling.messages_per_sec,
        am.messages_per_sec / ceiling.messages_per_sec,
    );
    let (ractor, tonic) = (&messaging[1], &messaging[2]);
    let tput = am.messages_per_sec / ractor.messages_per_sec;
    let _ = writeln!(md, "\nTargets:");
    let _ = writeln!(
        md,
        "- remote actor messages at least 10× ractor_cluster's throughput: {tput:.1}×, {}. \
         10× is {:.0} messages/s, {:.2}× what ractor itself does in one process with no network \
         ({:.0} messages/s, using {:.0} ns of CPU per message on the two cores); the \
         AgentMesh row used about {:.0}% of that rate.",
        verdict(tput >= 10.0),
        10.0 * ractor.messages_per_sec,
        10.0 * ractor.messages_per_sec / ceiling.messages_per_sec,
        ceiling.messages_per_sec,
        ceiling.cpu_ns_per_message,
        100.0 * am.messages_per_sec / ceiling.messages_per_sec,
    );
    let _ = writeln!(
        md,
        "- stretch, no less than tonic bidirectional streaming: {:.2}×, {}",
        am.messages_per_sec / tonic.messages_per_sec,
        verdict(am.messages_per_sec >= tonic.messages_per_sec)
    );
    let _ = writeln!(
        md,
        "- request/reply p50 below tonic unary: {:.0} µs against {:.0} µs, {}\n",
        am.rr_p50_us,
        tonic.rr_p50_us,
        verdict(am.rr_p50_us < tonic.rr_p50_us)
    );

    let _ = writeln!(md, "## Head-of-line blocking\n");
    let _ = writeln!(md, "Inside a network namespace: lo at MTU 1500 with tso, gso, gro and UDP segmentation off, and nftables dropping the given share of packets at random as they arrive on lo. One connection carries a bulk transfer (64 KiB messages on AgentMesh's bulk lane; 16 KiB frames on TCP; a client-streaming call of 64 KiB messages on tonic) while an urgent 64-byte request goes every 10 ms (AgentMesh: an ask on the urgent lane; TCP: a frame the writer puts before the next bulk frame; tonic: a unary call on the same channel). {} urgent requests per run.\n", args.hol_requests);
    let _ = writeln!(
        md,
        "| loss | system | urgent p50 (ms) | p99 (ms) | max (ms) | bulk meanwhile (MB/s) |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|");
    for h in hol {
        for f in &h.rows {
            let _ = writeln!(
                md,
                "| {}% | {} | {:.2} | {:.2} | {:.2} | {:.1} |",
                h.loss,
                f.system,
                f.urgent_p50_ms,
                f.urgent_p99_ms,
                f.urgent_max_ms,
                f.bulk_mb_per_sec
            );
        }
    }
    if let Some(h) = hol.iter().find(|h| h.loss == 2) {
        let am = &h.rows[0];
        let _ = writeln!(md, "\nTargets at 2% loss:");
        for peer in &h.rows[1..] {
            let ratio = peer.urgent_p99_ms / am.urgent_p99_ms;
            let _ = writeln!(
                md,
                "- urgent p99 at least 10× lower than {}: {ratio:.1}× lower, {}; p50 no higher: {:.2} ms against {:.2} ms, {}",
                peer.system,
                verdict(ratio >= 10.0),
                am.urgent_p50_ms,
                peer.urgent_p50_ms,
                verdict(am.urgent_p50_ms <= peer.urgent_p50_ms)
            );
        }
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "## Failover\n");
    let _ = writeln!(md, "`agentmesh bench failover`: three node processes (a coordinator and two worker nodes with `sleep` agents); a task's segments run on both worker nodes; the worker node holding segments is SIGKILLed; the time is from the kill to the coordinator having reallocated every segment that node held (it reallocates a dead node's segments in one step, and hands them to free workers in the same step). The task must then complete with nothing lost.\n");
    let _ = writeln!(
        md,
        "| runs | segments reallocated | lost | p50 (ms) | p99 (ms) | max (ms) |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        md,
        "| {} | {} | {} | {:.0} | {:.0} | {:.0} |",
        failover.runs,
        failover.segments_reallocated,
        failover.lost,
        failover.p50_ms,
        failover.p99_ms,
        failover.max_ms
    );
    let _ = writeln!(
        md,
        "\nTarget: p99 under 1 second: {}\n",
        verdict(failover.p99_ms < 1000.0 && failover.lost == 0)
    );

    let _ = writeln!(md, "## Scale\n");
    let _ = writeln!(md, "`agentmesh bench scale`: one node registers {} `sleep` agents one after another (each a supervised actor with its own Agent ID and registry record), then sits idle.\n", scale.agents);
    let _ = writeln!(md, "| agents | registration time (s) | registrations/s | resident memory after (MiB) | bytes per idle agent |");
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        md,
        "| {} | {:.2} | {:.0} | {:.0} | {:.0} |",
        scale.agents,
        scale.seconds,
        scale.registrations_per_sec,
        scale.rss_after_mib,
        scale.bytes_per_idle_agent
    );

    let _ = writeln!(md, "\n## Many tasks at once\n");
    let _ = writeln!(md, "`agentmesh bench tasks`: {} nodes in one process with {} `sleep` workers in all; one-segment tasks of 0 ms submitted at once to the first node, whose coordinator runs them all (its standby holds each); first a tenth as many as the baseline. The ratio is the large run's time per task over the baseline's: 1.00 means a coordinator's cost per task does not grow with the tasks it has open.\n", tasks.nodes, tasks.workers);
    let _ = writeln!(md, "| run | tasks | completed | seconds | tasks/s | latency p50 (ms) | p99 (ms) | reallocated |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, run) in [("baseline", &tasks.baseline), ("large", &tasks.large)] {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {:.2} | {:.0} | {:.1} | {:.1} | {} |",
            run.tasks,
            run.completed,
            run.seconds,
            run.tasks_per_sec,
            run.p50_ms,
            run.p99_ms,
            run.reallocated
        );
    }
    let _ = writeln!(
        md,
        "\nTime per task, large over baseline: {:.2}× (no target was set).",
        tasks.per_task_ratio
    );
    md
}
