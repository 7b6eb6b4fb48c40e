//! `agentmesh bench scale`: what an idle agent costs. One node in this process
//! registers N `sleep` agents (each its own supervised actor with its own Agent ID and
//! registry record) and reports the registration rate and the resident memory added
//! per agent.

use std::time::Duration;

// Wall-clock rate, as the user sees it.
use tokio::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use crate::builtin::Sleep;
use crate::local::LocalCluster;

#[derive(Debug, Args)]
pub struct ScaleBench {
    /// Agents to register.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    agents: u32,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Figures {
    agents: u32,
    seconds: f64,
    registrations_per_sec: f64,
    rss_before_mib: f64,
    rss_after_mib: f64,
    bytes_per_idle_agent: f64,
}

/// This process's resident set, in bytes (Linux: /proc/self/status).
fn rss_bytes() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS in /proc/self/status")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS without a value")?
        .parse()
        .context("VmRSS is not a number")?;
    Ok(kib * 1024)
}

pub fn run(args: ScaleBench) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let agents = args.agents;
    // The registrations run as a task on the runtime's workers, as an application's
    // actors would; from the thread blocking on the runtime, every step would be a
    // cross-thread wake-up.
    let task = runtime.spawn(async move {
        let cluster = LocalCluster::start(&["scale"]).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_bytes()?;
        let started = Instant::now();
        for _ in 0..agents {
            cluster.host(0).add(Sleep, 1).await?;
        }
        let known = cluster.host(0).status().await?.agents.len();
        let seconds = started.elapsed().as_secs_f64();
        if known != agents as usize {
            bail!("the registry holds {known} agents, not {agents}");
        }
        // Let anything started by the registrations finish before measuring.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_bytes()?;
        cluster.shutdown().await;
        anyhow::Ok(Figures {
            agents,
            seconds,
            registrations_per_sec: f64::from(agents) / seconds,
            rss_before_mib: before as f64 / (1 << 20) as f64,
            rss_after_mib: after as f64 / (1 << 20) as f64,
            bytes_per_idle_agent: after.saturating_sub(before) as f64 / f64::from(agents),
        })
    });
    let figures = runtime.block_on(task)??;
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        println!(
            "{} idle agents on one node: registered in {:.2} s ({:.0}/s); resident memory {:.1} MiB -> {:.1} MiB, {:.0} bytes per agent",
            figures.agents,
            figures.seconds,
            figures.registrations_per_sec,
            figures.rss_before_mib,
            figures.rss_after_mib,
            figures.bytes_per_idle_agent
        );
    }
    Ok(())
}
