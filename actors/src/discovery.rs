//! The discovery actor: puts the replicated registry (`registry`, no I/O) on the mesh.
//! Local agents register here (REGISTER -> REGISTER_ACK); changes go to discovery on
//! every other node, in order, and theirs come here, each accepted only from the node
//! it speaks for; a node declared down has its agents purged. Agent ownership feeds the
//! transport, which then refuses frames from a peer speaking for an agent not its own.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use agentmesh_runtime::transport::wire::payload::{AgentInfo, Capability, Health, RegisterAck};
use agentmesh_runtime::transport::OwnershipTable;
use agentmesh_runtime::{ActorAddr, Bounded, Mesh};

use crate::record::{Observation, Recorder};
use crate::registry::{AgentRecord, Registry, RegistryDelta, RegistryOutput};
use crate::service::DISCOVERY_SERVICE;
use crate::workers::WorkersMsg;

/// Agents the registry holds at most, cluster-wide.
pub const MAX_AGENTS: usize = 1_000_000;
/// Deltas waiting to go out at most; one that finds the queue full is dropped, and
/// the members find out from the next delta or summary (see [`RegistryDelta`]) and ask
/// for the whole list.
const OUTBOX: usize = 4_096;
/// Deltas from other nodes waiting for this actor at most; one past that is dropped
/// (counted in `agentmesh_actor_shed_total`), and the gap in versions makes this node
/// ask its sender for the whole list, as for a delta lost on the way.
const INBOX: usize = 4_096;
/// How often every member gets a summary of this node's list (its version), so one
/// that missed a delta asks for the whole list.
const SUMMARY_EVERY: Duration = Duration::from_secs(5);
/// Room a part of a whole list leaves, below the message limit, for the rest of the
/// message (records are counted at their most, `registry::record_bytes`).
const PART_SLACK: usize = 64 * 1024;

/// What discovery handles.
pub enum DiscoveryMsg {
    /// REGISTER from a local agent.
    Register {
        /// Its type.
        agent_type: String,
        /// What it can do.
        capabilities: Vec<Capability>,
        /// Its coordination group.
        group: u16,
        /// REGISTER_ACK, or why not.
        reply: RpcReplyPort<Result<RegisterAck, String>>,
    },
    /// A local agent is gone.
    Deregister(u32),
    /// A local agent's load and health changed.
    Update {
        /// The agent.
        agent: u32,
        /// Segments in hand.
        load: u32,
        /// Health.
        health: Health,
    },
    /// QUERY_CAPABLE_AGENTS -> LIST_AGENTS.
    Query {
        /// The capability.
        capability: String,
        /// Tags it must have.
        tags: Vec<String>,
        /// At most this many (0: all).
        limit: usize,
        /// The answer.
        reply: RpcReplyPort<Vec<AgentInfo>>,
    },
    /// How many agents with the capability are known but not offered yet (their node
    /// is not reported up): see [`Registry::capable_unwatched`].
    CountUnwatched {
        /// The capability.
        capability: String,
        /// Tags it must have.
        tags: Vec<String>,
        /// The count.
        reply: RpcReplyPort<usize>,
    },
    /// Every agent known.
    List(RpcReplyPort<Vec<AgentRecord>>),
    /// The node an agent runs on.
    Locate(u32, RpcReplyPort<Option<String>>),
    /// A delta from another node.
    Delta(Bounded<RegistryDelta>),
    /// A node came up: it gets our whole list.
    NodeUp(String),
    /// A node is down: its agents are purged.
    NodeDown(String),
    /// Where to tell about local agents that changed ID after a collision.
    SetWorkers(ActorRef<WorkersMsg>),
    /// Send every member a summary of our list (periodic repair).
    SendSummary,
}

/// The discovery actor.
pub struct Discovery;

/// How discovery starts.
pub struct DiscoveryArgs {
    /// The node's mesh.
    pub mesh: Mesh,
    /// Nodes up when discovery starts.
    pub members: Vec<String>,
    /// Seed for Agent IDs.
    pub seed: u64,
    /// Where agents that appear are observed (`--record`).
    pub recorder: Option<Recorder>,
    /// Notified when an agent's load goes down (the coordinator offers waiting work).
    pub capacity_freed: Arc<Notify>,
}

/// Discovery's state.
pub struct DiscoveryState {
    registry: Registry,
    ownership: Arc<OwnershipTable>,
    members: BTreeSet<String>,
    outbox: mpsc::Sender<(Vec<String>, RegistryDelta)>,
    workers: Option<ActorRef<WorkersMsg>>,
    recorder: Option<Recorder>,
    capacity_freed: Arc<Notify>,
}

impl Actor for Discovery {
    type Msg = DiscoveryMsg;
    type State = DiscoveryState;
    type Arguments = DiscoveryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<DiscoveryMsg>,
        args: DiscoveryArgs,
    ) -> Result<DiscoveryState, ActorProcessingErr> {
        args.mesh.register_service_bounded(
            DISCOVERY_SERVICE,
            myself.clone(),
            DiscoveryMsg::Delta,
            INBOX,
        )?;
        let (outbox, queue) = mpsc::channel(OUTBOX);
        tokio::spawn(send_deltas(args.mesh.clone(), queue));
        drop(myself.send_interval(SUMMARY_EVERY, || DiscoveryMsg::SendSummary));
        let mut registry = Registry::new(args.mesh.node(), MAX_AGENTS, args.seed);
        // A whole list longer than a message goes in parts (a node of some 130,000
        // agents fills 16 MiB): sent whole, the sender refused it for its length, and a
        // node that joined later never learnt of any of them.
        registry.set_part_bytes(args.mesh.max_message_bytes().saturating_sub(PART_SLACK));
        for member in &args.members {
            registry.handle_node_up(member);
        }
        let state = DiscoveryState {
            registry,
            ownership: args.mesh.ownership(),
            members: args.members.into_iter().collect(),
            outbox,
            workers: None,
            recorder: args.recorder,
            capacity_freed: args.capacity_freed,
        };
        Ok(state)
    }

    async fn handle(
        &self,
        _: ActorRef<DiscoveryMsg>,
        msg: DiscoveryMsg,
        state: &mut DiscoveryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DiscoveryMsg::Register {
                agent_type,
                capabilities,
                group,
                reply,
            } => {
                let answer = state
                    .registry
                    .register(agent_type.as_str(), capabilities, group)
                    .map(|record| RegisterAck {
                        nonce: 0,
                        agent: record.agent,
                        group,
                    })
                    .map_err(|e| e.to_string());
                if let Ok(ack) = &answer {
                    info!(agent = ack.agent, %agent_type, group, "agent registered");
                }
                let _ = reply.send(answer);
            }
            DiscoveryMsg::Deregister(agent) => state.registry.deregister(agent),
            DiscoveryMsg::Update {
                agent,
                load,
                health,
            } => state.registry.update(agent, load, health),
            DiscoveryMsg::Query {
                capability,
                tags,
                limit,
                reply,
            } => {
                let _ = reply.send(state.registry.query(&capability, &tags, limit));
            }
            DiscoveryMsg::CountUnwatched {
                capability,
                tags,
                reply,
            } => {
                let _ = reply.send(state.registry.capable_unwatched(&capability, &tags));
            }
            DiscoveryMsg::List(reply) => {
                let mut all = Vec::with_capacity(state.registry.len());
                all.extend(state.registry.records().cloned());
                let _ = reply.send(all);
            }
            DiscoveryMsg::Locate(agent, reply) => {
                let _ = reply.send(state.registry.get(agent).map(|r| r.node.to_string()));
            }
            DiscoveryMsg::Delta(Bounded { peer, message, .. }) => {
                if let Err(e) = state.registry.handle_delta(&peer, &message) {
                    warn!(%peer, error = %e, "registry delta refused");
                    metrics::counter!("agentmesh_registry_deltas_refused_total").increment(1);
                }
            }
            DiscoveryMsg::NodeUp(node) => {
                if node != state.registry.me() {
                    state.registry.handle_node_up(&node);
                    state.members.insert(node.clone());
                    for part in state.registry.full_parts() {
                        state.queue(vec![node.clone()], part);
                    }
                }
            }
            DiscoveryMsg::NodeDown(node) => {
                state.members.remove(&node);
                state.registry.handle_node_down(&node);
            }
            DiscoveryMsg::SetWorkers(workers) => state.workers = Some(workers),
            DiscoveryMsg::SendSummary => {
                let summary = state.registry.summary();
                state.queue_to_members(summary);
            }
        }
        state.drain();
        if state.registry.take_capacity_freed() {
            state.capacity_freed.notify_one();
        }
        Ok(())
    }
}

impl DiscoveryState {
    fn queue(&mut self, targets: Vec<String>, delta: RegistryDelta) {
        if targets.is_empty() {
            return;
        }
        if self.outbox.try_send((targets, delta)).is_err() {
            metrics::counter!("agentmesh_registry_deltas_dropped_total").increment(1);
        }
    }

    /// Queues `delta` for every member.
    fn queue_to_members(&mut self, delta: RegistryDelta) {
        let targets: Vec<String> = self.members.iter().cloned().collect();
        self.queue(targets, delta);
    }

    /// Carries out what the registry asked for.
    fn drain(&mut self) {
        while let Some(output) = self.registry.poll() {
            match output {
                RegistryOutput::Broadcast(delta) => self.queue_to_members(delta),
                RegistryOutput::Own { agents, node } => {
                    self.ownership.assign_all(&agents, &node);
                    if let Some(recorder) = &self.recorder {
                        for &agent in &agents {
                            let Some(r) = self.registry.get(agent) else {
                                continue;
                            };
                            recorder.observe(Observation::Registered {
                                agent,
                                node: node.to_string(),
                                agent_type: r.agent_type.to_string(),
                                capabilities: r.capabilities.to_vec(),
                                group: r.group,
                            });
                        }
                    }
                }
                RegistryOutput::Disown { agents } => self.ownership.remove_all(&agents),
                RegistryOutput::Send { to, delta } => self.queue(vec![to.to_string()], delta),
                RegistryOutput::Reidentified { old, new } => {
                    info!(
                        old,
                        new, "a local agent lost an ID collision and was renumbered"
                    );
                    if let Some(w) = &self.workers {
                        let _ = w.cast(WorkersMsg::Reidentified { old, new });
                    }
                }
            }
        }
    }
}

/// Sends deltas in the order they were made, one node after another.
async fn send_deltas(mesh: Mesh, mut queue: mpsc::Receiver<(Vec<String>, RegistryDelta)>) {
    while let Some((targets, delta)) = queue.recv().await {
        for node in targets {
            let addr = ActorAddr {
                node,
                name: DISCOVERY_SERVICE.into(),
            };
            if let Err(e) = mesh.send_to(&addr, delta.clone()).await {
                debug!(node = %addr.node, error = %e, "registry delta not sent");
            }
        }
    }
}
