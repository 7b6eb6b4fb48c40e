//! A whole cluster inside one process, for examples, experiments and tests: real nodes
//! on loopback with real QUIC and mutual TLS against a CA generated in memory, each
//! with its agent layer. Nothing is faked; only the processes are shared.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use agentmesh::local::LocalCluster;
//! let cluster = LocalCluster::start(&["a", "b", "c"]).await?;
//! cluster.host(0).add(agentmesh::builtin::Sleep, 4).await?;
//! cluster.wait_for_agents(4).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::actors::service::serde_bytes_vec::Blob;
use crate::actors::service::{SubmitRequest, TaskOutcome, TaskStatus};
use crate::actors::{AgentHost, HostConfig};
use crate::runtime::{MembershipConfig, Node, NodeConfig};
use crate::transport::clock::SystemClock;
use crate::transport::tls::ClusterCa;
use crate::transport::EndpointConfig;

/// How long [`LocalCluster::start`] and [`LocalCluster::wait_for_agents`] wait.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// Nodes of one cluster running in this process.
pub struct LocalCluster {
    members: Vec<(Node, AgentHost)>,
}

impl LocalCluster {
    /// Starts one node per name (each joining the first), waits until every node sees
    /// all the others, and starts their agent layers.
    pub async fn start(names: &[&str]) -> anyhow::Result<LocalCluster> {
        LocalCluster::start_with(names, HostConfig::default()).await
    }

    /// [`LocalCluster::start`] with the agent layer's configuration.
    pub async fn start_with(names: &[&str], config: HostConfig) -> anyhow::Result<LocalCluster> {
        if names.is_empty() {
            bail!("a cluster needs at least one node");
        }
        let ca = ClusterCa::generate()?;
        // Each node joins only once its agent layer is up, so a node the others can
        // see already answers for its services.
        let mut members: Vec<(Node, AgentHost)> = Vec::with_capacity(names.len());
        for name in names {
            let node_config = NodeConfig {
                transport: EndpointConfig::new(([127, 0, 0, 1], 0).into()),
                join: Vec::new(),
                membership: MembershipConfig::default(),
                metrics: None,
                advertise: None,
            };
            let identity = ca.node_identity(name)?;
            let node = Node::start(node_config, &identity, Arc::new(SystemClock))
                .await
                .with_context(|| format!("starting node {name}"))?;
            let host = AgentHost::start(&node, config.clone()).await?;
            if let Some((seed, _)) = members.first() {
                node.join([seed.me().addr]);
            }
            members.push((node, host));
        }
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        for (node, _) in &members {
            while node.members().await.len() < names.len() - 1 {
                if tokio::time::Instant::now() > deadline {
                    bail!("node {} never saw the whole cluster", node.me().name);
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(LocalCluster { members })
    }

    /// Nodes in the cluster.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never true: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The agent layer of node `i` (in the order of the names given).
    pub fn host(&self, i: usize) -> &AgentHost {
        &self.members[i].1
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.members[i].0
    }

    /// Waits until node 0's registry knows `n` agents (registrations on other nodes
    /// reach it through discovery).
    pub async fn wait_for_agents(&self, n: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        loop {
            let known = self.host(0).status().await?.agents.len();
            if known >= n {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the registry knows {known} agents, never {n}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Submits a task through node `i`'s coordinator, waits for its end and decodes
    /// each segment's result; a failed task is an error with its reason.
    pub async fn run<T: DeserializeOwned>(
        &self,
        i: usize,
        request: SubmitRequest,
    ) -> anyhow::Result<(TaskOutcome, Vec<T>)> {
        let outcome = self.host(i).submit(request).await?;
        if outcome.status == TaskStatus::Failed {
            bail!(
                "task {} failed: {}",
                outcome.task,
                outcome.reason.as_deref().unwrap_or("no reason given")
            );
        }
        let results = results(&outcome)?;
        Ok((outcome, results))
    }

    /// Stops every agent layer and has every node leave.
    pub async fn shutdown(self) {
        for (node, host) in self.members {
            host.stop();
            node.leave().await;
        }
    }
}

/// Encodes one segment input the way agents decode it (MessagePack with field names).
pub fn input<T: Serialize + ?Sized>(item: &T) -> anyhow::Result<Blob> {
    Ok(Blob(rmp_serde::to_vec_named(item)?))
}

/// Encodes segment inputs, one per segment (see [`input`]).
pub fn inputs<T: Serialize>(items: impl IntoIterator<Item = T>) -> anyhow::Result<Vec<Blob>> {
    items.into_iter().map(|item| input(&item)).collect()
}

/// Decodes each segment's result, in segment order.
pub fn results<T: DeserializeOwned>(outcome: &TaskOutcome) -> anyhow::Result<Vec<T>> {
    outcome
        .results
        .iter()
        .enumerate()
        .map(|(i, r)| rmp_serde::from_slice(&r.0).with_context(|| format!("segment {i}'s result")))
        .collect()
}
