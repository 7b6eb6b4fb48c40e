//! Hundreds of agents on one machine: two nodes in this process each start 250
//! foragers (each its own supervised actor with its own Agent ID), and one task of
//! 2,000 segments spreads over the swarm. The coordinator picks by power of two
//! choices, so the work evens out without a central queue per agent.
//!
//! ```text
//! cargo run --example swarm            # or: cargo run --example swarm -- 400 5000
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh::local::{inputs, LocalCluster};
use agentmesh::prelude::*;

/// Searches its patch (a range of numbers) for the longest Collatz trail, and says
/// which forager it was.
struct Forager {
    id: u32,
}

impl Agent for Forager {
    type Input = (u64, u64);
    type Output = (u32, u64, u32);

    fn agent_type(&self) -> &str {
        "forager"
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability {
            name: "forage".into(),
            version: "1".into(),
            tags: Vec::new(),
            capacity: 1,
        }]
    }

    async fn work(
        &self,
        (from, to): (u64, u64),
        _: &mut SegmentContext,
    ) -> Result<(u32, u64, u32), AgentError> {
        let trail = |mut n: u64| {
            let mut steps = 0u32;
            while n != 1 {
                n = if n.is_multiple_of(2) {
                    n / 2
                } else {
                    3 * n + 1
                };
                steps += 1;
            }
            steps
        };
        let (best, steps) = (from.max(1)..to)
            .map(|n| (n, trail(n)))
            .max_by_key(|&(_, s)| s)
            .unwrap_or((from, 0));
        // A little simulated thinking, so many foragers are busy at once.
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok((self.id, best, steps))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let per_node: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(250);
    let segments: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2_000);

    let cluster = LocalCluster::start(&["hive-a", "hive-b"]).await?;
    let started = tokio::time::Instant::now();
    for node in 0..cluster.len() {
        for i in 0..per_node {
            let id = node as u32 * per_node + i;
            cluster.host(node).add(Forager { id }, 1).await?;
        }
    }
    let agents = per_node as usize * cluster.len();
    cluster.wait_for_agents(agents).await?;
    println!(
        "{agents} foragers registered on {} nodes in {} ms",
        cluster.len(),
        started.elapsed().as_millis()
    );

    const PATCH: u64 = 500;
    let patches = (0..segments).map(|s| (s * PATCH, (s + 1) * PATCH));
    let (outcome, found): (_, Vec<(u32, u64, u32)>) = cluster
        .run(
            0,
            SubmitRequest::new("forage", inputs(patches)?).with_label("forage"),
        )
        .await?;
    let mut per_agent: BTreeMap<u32, u32> = BTreeMap::new();
    for (id, _, _) in &found {
        *per_agent.entry(*id).or_default() += 1;
    }
    let (best, steps) = found
        .iter()
        .map(|&(_, n, s)| (n, s))
        .max_by_key(|&(_, s)| s)
        .unwrap_or_default();
    let most = per_agent.values().max().copied().unwrap_or(0);
    println!(
        "{} segments in {} ms ({:.0} segments/s), {} reallocated",
        outcome.segments,
        outcome.elapsed_ms,
        f64::from(outcome.segments) * 1000.0 / outcome.elapsed_ms.max(1) as f64,
        outcome.reallocated
    );
    println!(
        "{} of {agents} foragers worked; the busiest took {most} segments (even share {:.1})",
        per_agent.len(),
        outcome.segments as f64 / agents as f64
    );
    println!(
        "longest Collatz trail below {}: {best} ({steps} steps)",
        segments * PATCH
    );
    cluster.shutdown().await;
    Ok(())
}
