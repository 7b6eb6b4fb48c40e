//! The agent layer of one node: starts discovery, the worker host, the coordinator
//! and the policy actor under one supervisor on top of a running `Node`, routes ACP
//! frames to them through bounded queues, feeds them membership changes, and lets a
//! program add its agents. This is what `agentmesh node --agents …` and
//! `agentmesh::Cli` run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::{broadcast, mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use agentmesh_runtime::transport::clock::{Clock, SystemClock};
use agentmesh_runtime::transport::wire::payload::Capability;
use agentmesh_runtime::transport::wire::{Message, MessageType};
use agentmesh_runtime::{
    ActorAddr, Bounded, ClusterEvent, FromPeer, MemberInfo, MemberState, Mesh, Node, NodeId,
};

use crate::agent::Agent;
use crate::coordinator::{Coordinator, CoordinatorArgs, CoordinatorMsg, Drained, TICK};
use crate::discovery::{Discovery, DiscoveryArgs, DiscoveryMsg};
use crate::ledger::LedgerConfig;
use crate::policy::{Policy, PolicyError, VersionedPolicy};
use crate::record::{Observation, Recorder};
use crate::service::{
    AdjustAnswer, AdjustRequest, AgentsRequest, AgentsStatus, ApplyPolicy, PolicyApplied,
    PolicyInForce, SubmitRequest, TaskOutcome, POLICY_SERVICE, POLICY_SPREAD_SERVICE,
};
use crate::worker::{RestartPolicy, WorkerArgs, WorkerEvent, WorkerMsg, WorkerSupervisor};
use crate::workers::{Workers, WorkersArgs, WorkersMsg};

/// ACP frames queued for the workers or the coordinator at most; more wait a while
/// (holding back their lane), or are shed if they came as datagrams
/// (`Mesh::route_acp`).
const ACP_QUEUE: usize = 4_096;
/// Of those, handed to the actor's mailbox at once (the mailbox stays bounded).
const ACP_IN_MAILBOX: usize = 1_024;
/// Worker events queued per agent at most (replicas wait when it is full).
const EVENTS_PER_AGENT: usize = 1_024;

/// The policy in force on this node, shared by the actors that enforce it.
#[derive(Clone)]
pub struct PolicyStore {
    inner: Arc<RwLock<(VersionedPolicy, Arc<Policy>)>>,
}

impl PolicyStore {
    /// A store holding `policy`, read from `text`, as version 0 (a node's start-up
    /// file; any policy applied later replaces it).
    pub fn new(policy: Policy, text: String, origin: &str) -> PolicyStore {
        let versioned = VersionedPolicy {
            version: 0,
            origin: origin.to_string(),
            text,
        };
        record_policy_version(0);
        PolicyStore {
            inner: Arc::new(RwLock::new((versioned, Arc::new(policy)))),
        }
    }

    /// Which policy this is, as `agentmesh status` shows it.
    pub fn in_force(&self) -> PolicyInForce {
        self.inner
            .read()
            .map(|g| PolicyInForce {
                version: g.0.version,
                origin: g.0.origin.clone(),
                groups: g.1.groups.len(),
            })
            .unwrap_or_default()
    }

    /// The policy now.
    pub fn get(&self) -> Arc<Policy> {
        self.inner.read().map(|g| g.1.clone()).unwrap_or_default()
    }

    /// The policy now, with its version.
    pub fn current(&self) -> VersionedPolicy {
        self.inner
            .read()
            .map(|g| g.0.clone())
            .unwrap_or_else(|_| VersionedPolicy {
                version: 0,
                origin: String::new(),
                text: String::new(),
            })
    }

    /// Takes `offered` if it is newer than the policy in force and valid; true if it
    /// replaced it.
    pub fn offer(&self, offered: VersionedPolicy) -> Result<bool, PolicyError> {
        // The same version comes again with every periodic spread: not parsed again.
        if !offered.newer_than(&self.current()) {
            return Ok(false);
        }
        let policy = Policy::from_toml(&offered.text)?;
        let mut guard = self
            .inner
            .write()
            .map_err(|_| PolicyError::Parse("policy store poisoned".into()))?;
        if !offered.newer_than(&guard.0) {
            return Ok(false);
        }
        record_policy_version(offered.version);
        *guard = (offered, Arc::new(policy));
        Ok(true)
    }
}

/// The version in force as a gauge, so a scrape of every node shows one that lags.
fn record_policy_version(version: u64) {
    // Unix ms stay below 2^53: exact as f64.
    metrics::gauge!("agentmesh_policy_version").set(version as f64);
}

/// How a node's agent layer is set up.
#[derive(Clone, Debug, Default)]
pub struct HostConfig {
    /// The coordination group agents join unless told otherwise.
    pub group: u16,
    /// The policy file's text, read at start (`--policy FILE`).
    pub policy: Option<String>,
    /// Ledger tuning for the coordinator.
    pub ledger: LedgerConfig,
    /// Where what the node sees is observed (`agentmesh node --record`).
    pub recorder: Option<Recorder>,
    /// How often the policy in force goes again to every member, so that a node that
    /// missed a spread catches up; `None`: [`POLICY_RESPREAD_EVERY`].
    pub policy_respread: Option<Duration>,
    /// How often the coordinator checks timeouts and offers waiting segments again;
    /// `None`: every 50 ms. (A worker that reports a result is offered work at once,
    /// whatever this is.)
    pub coordinator_tick: Option<Duration>,
    /// How the replicas of this node's agents are restarted when they panic.
    pub restarts: RestartPolicy,
}

/// How often a node sends its policy to every member again (see
/// [`HostConfig::policy_respread`]).
pub const POLICY_RESPREAD_EVERY: Duration = Duration::from_secs(15);
/// Policy spreads from other nodes waiting for the policy actor at most; one past that
/// is dropped (counted in `agentmesh_actor_shed_total`), and the next periodic spread
/// brings the policy it carried.
const SPREAD_INBOX: usize = 64;

/// Why the agent layer could not start or take an agent.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The policy file is not valid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// An actor could not start.
    #[error("cannot start {what}: {reason}")]
    Start {
        /// Which actor.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Discovery refused the agent.
    #[error("cannot register agent {agent_type:?}: {reason}")]
    Register {
        /// The agent's type.
        agent_type: String,
        /// Why.
        reason: String,
    },
    /// The coordinator did not answer.
    #[error("the coordinator did not answer: {0}")]
    Coordinator(String),
}

fn start_err(what: &'static str) -> impl Fn(ractor::SpawnErr) -> HostError {
    move |e| HostError::Start {
        what,
        reason: e.to_string(),
    }
}

/// How often a draining layer asks its actors what is left ([`AgentHost::drain`]).
const DRAIN_CHECK: Duration = Duration::from_millis(50);

/// What a drain left ([`AgentHost::drain`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Draining {
    /// What the coordinator still waited for.
    pub coordinator: Drained,
    /// Attempts given to this node's agents not ended, or with their final REPORT
    /// still to go.
    pub attempts_here: usize,
}

impl Draining {
    /// Nothing was left.
    pub fn is_done(&self) -> bool {
        self.coordinator.is_done() && self.attempts_here == 0
    }
}

/// The agent layer of a running node.
pub struct AgentHost {
    discovery: ActorRef<DiscoveryMsg>,
    workers: ActorRef<WorkersMsg>,
    coordinator: ActorRef<CoordinatorMsg>,
    policy: PolicyStore,
    group: u16,
    restarts: RestartPolicy,
    supervisor: ActorRef<()>,
    stopped: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl AgentHost {
    /// Starts discovery, the worker host, the coordinator and the policy actor on
    /// `node`.
    pub async fn start(node: &Node, config: HostConfig) -> Result<AgentHost, HostError> {
        let mesh = node.mesh().clone();
        let me = node.me().name.clone();
        let text = config.policy.clone().unwrap_or_default();
        let policy = PolicyStore::new(Policy::from_toml(&text)?, text, &me);
        let (stopped_tx, stopped) = watch::channel(false);
        let (supervisor, _) = Actor::spawn(None, HostSupervisor, stopped_tx)
            .await
            .map_err(start_err("the agent supervisor"))?;
        let cell = supervisor.get_cell();
        // Subscribe before taking the member list: a node that comes up in between is
        // then in the list, or in the events, or both (harmless), never in neither.
        let membership_events = node.subscribe();
        let up = up_members(&node.members().await);
        let members: Vec<String> = up.keys().cloned().collect();
        // Nodes started in the same millisecond have the same incarnation: the name
        // keeps their Agent ID sequences apart (collisions are still resolved, but each
        // costs a renumbering).
        let name_hash = node
            .me()
            .name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let seed = node.me().incarnation ^ name_hash ^ 0x9e37_79b9_7f4a_7c15;
        let capacity_freed = Arc::new(tokio::sync::Notify::new());
        let (discovery, _) = Actor::spawn_linked(
            None,
            Discovery,
            DiscoveryArgs {
                mesh: mesh.clone(),
                members: members.clone(),
                seed,
                recorder: config.recorder.clone(),
                capacity_freed: capacity_freed.clone(),
            },
            cell.clone(),
        )
        .await
        .map_err(start_err("discovery"))?;
        let (workers, _) = Actor::spawn_linked(
            None,
            Workers,
            WorkersArgs {
                mesh: mesh.clone(),
                discovery: discovery.clone(),
                policy: policy.clone(),
            },
            cell.clone(),
        )
        .await
        .map_err(start_err("the worker host"))?;
        let _ = discovery.cast(DiscoveryMsg::SetWorkers(workers.clone()));
        let (coordinator, _) = Actor::spawn_linked(
            None,
            Coordinator,
            CoordinatorArgs {
                mesh: mesh.clone(),
                discovery: discovery.clone(),
                policy: policy.clone(),
                ledger: config.ledger,
                recorder: config.recorder.clone(),
                tick: config.coordinator_tick.unwrap_or(TICK),
                capacity_freed,
                members: up.clone(),
            },
            cell.clone(),
        )
        .await
        .map_err(start_err("the coordinator"))?;
        let (policy_actor, _) = Actor::spawn_linked(
            None,
            PolicyActor,
            PolicyArgs {
                mesh: mesh.clone(),
                store: policy.clone(),
                members,
                respread: config.policy_respread.unwrap_or(POLICY_RESPREAD_EVERY),
            },
            cell,
        )
        .await
        .map_err(start_err("the policy actor"))?;

        let mut tasks = Vec::new();
        let (to_workers, rx) = mpsc::channel(ACP_QUEUE);
        mesh.route_acp(
            &[
                MessageType::Allocate,
                MessageType::Adjust,
                MessageType::Sync,
                MessageType::SyncAck,
            ],
            to_workers,
        );
        tasks.push(tokio::spawn(pump(rx, workers.clone(), WorkersMsg::Acp)));
        let (to_coordinator, rx) = mpsc::channel(ACP_QUEUE);
        mesh.route_acp(&[MessageType::Report], to_coordinator);
        tasks.push(tokio::spawn(pump(
            rx,
            coordinator.clone(),
            CoordinatorMsg::Acp,
        )));
        tasks.push(tokio::spawn(follow_membership(
            MembershipFeed {
                events: membership_events,
                list: node.member_list(),
                up,
            },
            discovery.clone(),
            coordinator.clone(),
            workers.clone(),
            policy_actor,
            config.recorder.clone(),
        )));
        info!(node = %me, group = config.group, "agent layer started");
        Ok(AgentHost {
            discovery,
            workers,
            coordinator,
            policy,
            group: config.group,
            restarts: config.restarts,
            supervisor,
            stopped,
            tasks,
        })
    }

    /// Runs `agent` with `replicas` segments at once on this node, in the default
    /// group; returns its Agent ID.
    pub async fn add<A: Agent>(&self, agent: A, replicas: usize) -> Result<u32, HostError> {
        self.add_in_group(agent, replicas, self.group).await
    }

    /// Like [`AgentHost::add`], in coordination group `group`.
    pub async fn add_in_group<A: Agent>(
        &self,
        agent: A,
        replicas: usize,
        group: u16,
    ) -> Result<u32, HostError> {
        let replicas = replicas.max(1);
        let agent_type = agent.agent_type().to_string();
        let mut capabilities = agent.capabilities();
        for c in &mut capabilities {
            c.capacity = replicas as u32;
        }
        let (events, events_rx) = mpsc::channel(EVENTS_PER_AGENT);
        let (supervisor, _) = Actor::spawn_linked(
            None,
            WorkerSupervisor::<A>::default(),
            WorkerArgs {
                agent: Arc::new(agent),
                replicas,
                events,
                restarts: self.restarts,
            },
            self.workers.get_cell(),
        )
        .await
        .map_err(start_err("a worker supervisor"))?;
        self.register_worker(agent_type, capabilities, group, supervisor, events_rx)
            .await
    }

    /// The power path: registers a plain ractor actor as a worker of this node and
    /// returns its Agent ID. The actor takes [`WorkerMsg`]: `Run` for each allocated
    /// attempt, `Adjust` and `Sync` for running ones (`Finished` is the supervisor's
    /// own and never sent to it). It reports every attempt's progress and end, and
    /// its SYNCs, as [`WorkerEvent`]s on the sender whose receiver is `events` (a
    /// bounded channel the caller makes, so the actor can hold the sender from its
    /// start).
    pub async fn add_actor(
        &self,
        agent_type: &str,
        capabilities: Vec<Capability>,
        group: u16,
        actor: ActorRef<WorkerMsg>,
        events: mpsc::Receiver<WorkerEvent>,
    ) -> Result<u32, HostError> {
        self.register_worker(agent_type.to_string(), capabilities, group, actor, events)
            .await
    }

    async fn register_worker(
        &self,
        agent_type: String,
        capabilities: Vec<Capability>,
        group: u16,
        supervisor: ActorRef<WorkerMsg>,
        mut events_rx: mpsc::Receiver<WorkerEvent>,
    ) -> Result<u32, HostError> {
        let register = ractor::call!(self.discovery, |reply| DiscoveryMsg::Register {
            agent_type: agent_type.clone(),
            capabilities,
            group,
            reply,
        });
        let ack = match register {
            Ok(Ok(ack)) => ack,
            Ok(Err(reason)) => {
                supervisor.stop(None);
                return Err(HostError::Register { agent_type, reason });
            }
            Err(e) => {
                supervisor.stop(None);
                return Err(HostError::Register {
                    agent_type,
                    reason: e.to_string(),
                });
            }
        };
        let _ = self.workers.cast(WorkersMsg::Add {
            agent: ack.agent,
            agent_type,
            group,
            supervisor,
        });
        let (workers, agent) = (self.workers.clone(), ack.agent);
        tokio::spawn(async move {
            while let Some(event) = events_rx.recv().await {
                if workers.cast(WorkersMsg::Event(agent, event)).is_err() {
                    return;
                }
            }
        });
        Ok(ack.agent)
    }

    /// Submits a task to this node's coordinator and waits for its end. Each segment's
    /// input goes to its worker in one message, so one longer than the node's message
    /// limit less 64 KiB is refused (a failed outcome that says so), as are the other
    /// limits the coordinator keeps (open tasks, segments, label, segment timeout).
    pub async fn submit(&self, request: SubmitRequest) -> Result<TaskOutcome, HostError> {
        ractor::call!(self.coordinator, CoordinatorMsg::Submit, request)
            .map_err(|e| HostError::Coordinator(e.to_string()))
    }

    /// Steers a running task of this node's coordinator (ADJUST to every attempt
    /// running; `cancel` ends it).
    pub async fn adjust(&self, request: AdjustRequest) -> Result<AdjustAnswer, HostError> {
        ractor::call!(self.coordinator, CoordinatorMsg::Adjust, request)
            .map_err(|e| HostError::Coordinator(e.to_string()))
    }

    /// The agents this node knows and the tasks its coordinator runs.
    pub async fn status(&self) -> Result<AgentsStatus, HostError> {
        ractor::call!(self.coordinator, CoordinatorMsg::Status, AgentsRequest {})
            .map_err(|e| HostError::Coordinator(e.to_string()))
    }

    /// The policy in force.
    pub fn policy(&self) -> &PolicyStore {
        &self.policy
    }

    /// Resolves if one of the layer's actors failed (the layer stops; the node should
    /// too, and be restarted by whatever runs it).
    pub async fn stopped(&mut self) {
        let _ = self.stopped.wait_for(|s| *s).await;
    }

    /// Drains the layer before its node leaves: the worker host refuses new
    /// allocations (their coordinators give them to other nodes at once) and the
    /// coordinator allocates nothing more, while the attempts given here, and those of
    /// this coordinator's tasks anywhere, run to their end and their results reach the
    /// coordinators and the standbys. Then a standby takes each task over with nothing
    /// to run again. Returns what was still left when it stopped waiting: nothing, or
    /// what `within` cut short (that runs again elsewhere, as after a crash); `None` if
    /// its actors did not answer within `within`.
    pub async fn drain(&self, within: Duration) -> Option<Draining> {
        let deadline = tokio::time::Instant::now() + within;
        let mut left = None;
        loop {
            // Bounded even if an actor does not answer: `None` then, if it never did.
            let Ok(now) = tokio::time::timeout_at(deadline, self.left_to_drain()).await else {
                return left;
            };
            let Some(now) = now else {
                // An actor stopped: the layer is stopping anyway.
                return Some(Draining::default());
            };
            if now.is_done() || tokio::time::Instant::now() >= deadline {
                return Some(now);
            }
            left = Some(now);
            tokio::time::sleep(DRAIN_CHECK).await;
        }
    }

    /// Asks the coordinator and the worker host what is left to drain (and has them
    /// drain, the first time); `None` if one of them has stopped.
    async fn left_to_drain(&self) -> Option<Draining> {
        let coordinator = ractor::call!(self.coordinator, CoordinatorMsg::Drain).ok()?;
        let attempts_here = ractor::call!(self.workers, WorkersMsg::Drain).ok()?;
        Some(Draining {
            coordinator,
            attempts_here,
        })
    }

    /// Stops the agent layer.
    pub fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.supervisor.stop(Some("node stopping".into()));
    }
}

/// Moves routed ACP frames into an actor's mailbox, at most [`ACP_IN_MAILBOX`] at once.
async fn pump<M: ractor::Message>(
    mut rx: mpsc::Receiver<FromPeer<Message>>,
    actor: ActorRef<M>,
    wrap: fn(FromPeer<Message>, OwnedSemaphorePermit) -> M,
) {
    let permits = Arc::new(Semaphore::new(ACP_IN_MAILBOX));
    while let Some(item) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        if actor.cast(wrap(item, permit)).is_err() {
            return;
        }
    }
}

/// Where the agent layer learns of membership: the events, and the published member
/// list to catch up from when events were missed.
struct MembershipFeed {
    events: broadcast::Receiver<ClusterEvent>,
    list: watch::Receiver<Vec<MemberInfo>>,
    /// The nodes told up so far, with their life (see [`NodeId::life`]).
    up: BTreeMap<String, u64>,
}

/// The members up in `list`, with their life: a renewal keeps it, so a node renewed
/// while events were missed is still the same node up, not one down and another up.
fn up_members(list: &[MemberInfo]) -> BTreeMap<String, u64> {
    list.iter()
        .filter(|m| m.state == MemberState::Up)
        .map(|m| (m.name.clone(), NodeId::life_of(m.incarnation)))
        .collect()
}

/// Tells the actors about nodes coming and going.
async fn follow_membership(
    mut feed: MembershipFeed,
    discovery: ActorRef<DiscoveryMsg>,
    coordinator: ActorRef<CoordinatorMsg>,
    workers: ActorRef<WorkersMsg>,
    policy: ActorRef<PolicyMsg>,
    recorder: Option<Recorder>,
) {
    let tell = |up: bool, name: String, life: u64| {
        if let Some(r) = &recorder {
            r.observe(if up {
                Observation::NodeUp(name.clone())
            } else {
                Observation::NodeDown(name.clone())
            });
        }
        if up {
            let _ = discovery.cast(DiscoveryMsg::NodeUp(name.clone()));
            let _ = coordinator.cast(CoordinatorMsg::NodeUp {
                node: name.clone(),
                life,
            });
            let _ = policy.cast(PolicyMsg::NodeUp(name));
        } else {
            let _ = discovery.cast(DiscoveryMsg::NodeDown(name.clone()));
            let _ = coordinator.cast(CoordinatorMsg::NodeDown {
                node: name.clone(),
                life,
            });
            let _ = workers.cast(WorkersMsg::NodeDown(name.clone()));
            let _ = policy.cast(PolicyMsg::NodeDown(name));
        }
    };
    loop {
        match feed.events.recv().await {
            Ok(ClusterEvent::NodeUp(id)) => {
                feed.up.insert(id.name.to_string(), id.life());
                tell(true, id.name.to_string(), id.life());
            }
            Ok(ClusterEvent::NodeDown(id)) => {
                feed.up.remove(&*id.name);
                tell(false, id.name.to_string(), id.life());
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                // Catch up from the member list: what went down (or came back as
                // another life) is told down, what came up is told up. Without it a
                // missed "down" would leave that node's segments to their timeouts,
                // and a missed "up" would keep its agents from being offered.
                let now = up_members(&feed.list.borrow());
                warn!(
                    missed = n,
                    "membership events missed; catching up from the member list"
                );
                for (name, life) in &feed.up {
                    if now.get(name) != Some(life) {
                        tell(false, name.clone(), *life);
                    }
                }
                for (name, life) in &now {
                    if feed.up.get(name) != Some(life) {
                        tell(true, name.clone(), *life);
                    }
                }
                feed.up = now;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Supervises the layer's actors: any failure stops the layer (their state, the
/// ledger above all, cannot be rebuilt from nothing; the node is restarted whole).
struct HostSupervisor;

impl Actor for HostSupervisor {
    type Msg = ();
    type State = watch::Sender<bool>;
    type Arguments = watch::Sender<bool>;

    async fn pre_start(
        &self,
        _: ActorRef<()>,
        stopped: watch::Sender<bool>,
    ) -> Result<watch::Sender<bool>, ActorProcessingErr> {
        Ok(stopped)
    }

    async fn post_stop(
        &self,
        _: ActorRef<()>,
        stopped: &mut watch::Sender<bool>,
    ) -> Result<(), ActorProcessingErr> {
        stopped.send_replace(true);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        _: &mut watch::Sender<bool>,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, e) = event {
            error!(actor = ?cell.get_id(), error = %e, "an agent-layer actor failed; stopping the agent layer");
            myself.stop(Some("an agent-layer actor failed".into()));
        }
        Ok(())
    }
}

/// What the policy actor handles.
pub enum PolicyMsg {
    /// `agentmesh policy apply`.
    Apply(ApplyPolicy, RpcReplyPort<PolicyApplied>),
    /// A policy spread by another node.
    Spread(Bounded<VersionedPolicy>),
    /// Send the policy in force to every member again (periodic).
    Respread,
    /// A node came up: it gets the policy in force.
    NodeUp(String),
    /// A node is down.
    NodeDown(String),
}

struct PolicyActor;

struct PolicyArgs {
    mesh: Mesh,
    store: PolicyStore,
    members: Vec<String>,
    respread: Duration,
}

struct PolicyState {
    mesh: Mesh,
    store: PolicyStore,
    members: BTreeSet<String>,
}

impl Actor for PolicyActor {
    type Msg = PolicyMsg;
    type State = PolicyState;
    type Arguments = PolicyArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<PolicyMsg>,
        args: PolicyArgs,
    ) -> Result<PolicyState, ActorProcessingErr> {
        args.mesh.register_service_rpc(
            POLICY_SERVICE,
            myself.clone(),
            PolicyMsg::Apply,
            Duration::from_secs(10),
        )?;
        args.mesh.register_service_bounded(
            POLICY_SPREAD_SERVICE,
            myself.clone(),
            PolicyMsg::Spread,
            SPREAD_INBOX,
        )?;
        drop(myself.send_interval(args.respread, || PolicyMsg::Respread));
        Ok(PolicyState {
            mesh: args.mesh,
            store: args.store,
            members: args.members.into_iter().collect(),
        })
    }

    async fn handle(
        &self,
        _: ActorRef<PolicyMsg>,
        msg: PolicyMsg,
        state: &mut PolicyState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PolicyMsg::Apply(ApplyPolicy { text }, reply) => {
                let current = state.store.current();
                let offered = VersionedPolicy {
                    version: SystemClock.now_unix_ms().max(current.version + 1),
                    origin: state.mesh.node().to_string(),
                    text,
                };
                let error = match state.store.offer(offered.clone()) {
                    Ok(_) => {
                        info!(version = offered.version, "policy applied");
                        state.spread_to_members(&offered);
                        None
                    }
                    Err(e) => {
                        warn!(error = %e, "policy refused");
                        Some(e.to_string())
                    }
                };
                let now = state.store.in_force();
                let _ = reply.send(PolicyApplied {
                    version: now.version,
                    origin: now.origin,
                    groups: now.groups,
                    error,
                });
            }
            PolicyMsg::Spread(spread) => {
                let (peer, message) = spread.into_parts();
                if message.version == 0 {
                    return Ok(()); // Start-up files stay on their node.
                }
                match state.store.offer(message) {
                    Ok(true) => info!(from = %peer, "policy updated by another node"),
                    Ok(false) => {}
                    Err(e) => warn!(from = %peer, error = %e, "policy from another node refused"),
                }
            }
            PolicyMsg::Respread => {
                let current = state.store.current();
                if current.version > 0 {
                    state.spread_to_members(&current);
                }
            }
            PolicyMsg::NodeUp(node) => {
                state.members.insert(node.clone());
                let current = state.store.current();
                if current.version > 0 {
                    state.spread(node, current);
                }
            }
            PolicyMsg::NodeDown(node) => {
                state.members.remove(&node);
            }
        }
        Ok(())
    }
}

impl PolicyState {
    fn spread_to_members(&self, policy: &VersionedPolicy) {
        for node in &self.members {
            self.spread(node.clone(), policy.clone());
        }
    }

    fn spread(&self, node: String, policy: VersionedPolicy) {
        let mesh = self.mesh.clone();
        tokio::spawn(async move {
            let addr = ActorAddr {
                node,
                name: POLICY_SPREAD_SERVICE.into(),
            };
            if let Err(e) = mesh.send_to(&addr, policy).await {
                warn!(node = %addr.node, error = %e, "policy not spread");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;

    type Log = Arc<Mutex<Vec<String>>>;

    /// Writes down the node up/down messages an actor of the agent layer gets.
    struct Rec<M>(std::marker::PhantomData<fn() -> M>);

    impl<M: ractor::Message> Actor for Rec<M> {
        type Msg = M;
        type State = (Log, fn(&M) -> Option<String>);
        type Arguments = (Log, fn(&M) -> Option<String>);

        async fn pre_start(
            &self,
            _: ActorRef<M>,
            args: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(args)
        }

        async fn handle(
            &self,
            _: ActorRef<M>,
            msg: M,
            (log, name): &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            if let Some(line) = name(&msg) {
                log.lock().unwrap().push(line);
            }
            Ok(())
        }
    }

    /// A `Rec` writing `line(message)` into `log`.
    async fn spawn_rec<M: ractor::Message>(
        log: Log,
        line: fn(&M) -> Option<String>,
    ) -> ActorRef<M> {
        let (actor, _) = Actor::spawn(None, Rec(std::marker::PhantomData), (log, line))
            .await
            .unwrap();
        actor
    }

    /// The identity of `name` in life `life`, renewed `renewals` times.
    fn id(name: &str, life: u64, renewals: u64) -> NodeId {
        NodeId {
            name: name.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            incarnation: NodeId::first_of_life(life) + renewals,
        }
    }

    fn member(name: &str, life: u64, renewals: u64) -> MemberInfo {
        MemberInfo {
            name: name.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            state: MemberState::Up,
            incarnation: id(name, life, renewals).incarnation,
            rtt_us: None,
        }
    }

    /// Events missed (the subscriber lagged) are caught up from the member list: a
    /// node that restarted meanwhile is told down (so the coordinator reallocates
    /// what its former life held) and up again, a node that came up is told up, and a
    /// node that only renewed itself (same life) is not told down.
    #[tokio::test]
    async fn missed_membership_events_are_caught_up_from_the_member_list() {
        let (discovery_log, coordinator_log) = (Log::default(), Log::default());
        let discovery = spawn_rec(discovery_log.clone(), |m: &DiscoveryMsg| match m {
            DiscoveryMsg::NodeUp(n) => Some(format!("up {n}")),
            DiscoveryMsg::NodeDown(n) => Some(format!("down {n}")),
            _ => None,
        })
        .await;
        let coordinator = spawn_rec(coordinator_log.clone(), |m: &CoordinatorMsg| match m {
            CoordinatorMsg::NodeDown { node, life } => Some(format!("down {node} {life}")),
            CoordinatorMsg::NodeUp { node, life } => Some(format!("up {node} {life}")),
            _ => None,
        })
        .await;
        let policy = spawn_rec(Log::default(), |_: &PolicyMsg| None).await;

        // Room for two events; six happen before the follower reads any.
        let (events_tx, events) = broadcast::channel(2);
        let _ = events_tx.send(ClusterEvent::NodeUp(id("d", 1, 3)));
        let _ = events_tx.send(ClusterEvent::NodeDown(id("a", 1, 0)));
        let _ = events_tx.send(ClusterEvent::NodeUp(id("a", 2, 0)));
        let _ = events_tx.send(ClusterEvent::NodeUp(id("b", 1, 0)));
        let _ = events_tx.send(ClusterEvent::NodeDown(id("b", 1, 0)));
        let _ = events_tx.send(ClusterEvent::NodeUp(id("c", 1, 0)));
        let (_list_tx, list) = watch::channel(vec![
            member("a", 2, 0),
            member("c", 1, 0),
            member("d", 1, 3),
        ]);
        let feed = MembershipFeed {
            events,
            list,
            up: BTreeMap::from([("a".to_string(), 1), ("d".to_string(), 1)]),
        };
        let workers = spawn_rec(Log::default(), |_: &WorkersMsg| None).await;
        let follower = tokio::spawn(follow_membership(
            feed,
            discovery.clone(),
            coordinator.clone(),
            workers,
            policy.clone(),
            None,
        ));
        drop(events_tx);
        follower.await.unwrap();
        // Each actor handles its mailbox in order; a stop waits behind it.
        for stop in [
            discovery.stop_and_wait(None, None),
            coordinator.stop_and_wait(None, None),
            policy.stop_and_wait(None, None),
        ] {
            stop.await.unwrap();
        }
        let told = coordinator_log.lock().unwrap().clone();
        let downs: Vec<&String> = told.iter().filter(|l| l.starts_with("down")).collect();
        assert_eq!(
            downs,
            ["down a 1", "down b 1"],
            "a's former life is reported down, d's renewal is not"
        );
        // The coordinator learns the life each node is up in: a's later one (it
        // restarted, so what its former life left is taken over at once).
        let down_a = told.iter().position(|l| l == "down a 1").unwrap();
        let up_a = told.iter().position(|l| l == "up a 2");
        assert!(up_a.is_some_and(|up| up > down_a), "{told:?}");
        assert!(told.contains(&"up c 1".to_string()), "{told:?}");
        assert!(!told.contains(&"down d 1".to_string()), "{told:?}");
        let seen = discovery_log.lock().unwrap().clone();
        let last = |node: &str| {
            seen.iter()
                .rev()
                .find(|l| l.ends_with(&format!(" {node}")))
                .cloned()
        };
        assert_eq!(last("a").as_deref(), Some("up a"), "{seen:?}");
        assert_eq!(last("b").as_deref(), Some("down b"), "{seen:?}");
        assert_eq!(last("c").as_deref(), Some("up c"), "{seen:?}");
        assert!(!seen.contains(&"down d".to_string()), "{seen:?}");
    }
}
