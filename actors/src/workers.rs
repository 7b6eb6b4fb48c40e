//! The node's worker host: the actor between ACP and the worker supervisors of this
//! node's agents. ALLOCATE from a coordinator (checked against the policy and the
//! agent's rate limit) becomes a run on the agent's supervisor; the attempt's progress
//! goes back as REPORT datagrams and its end as a REPORT on the coordination lane;
//! ADJUST from the task's coordinator reaches the running segment; SYNC and SYNC_ACK go
//! worker to worker, never through the coordinator.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use uuid::Uuid;

use agentmesh_runtime::transport::wire::payload::{
    Adjust, Allocate, Health, Refusal, Report, Sync, SyncAck,
};
use agentmesh_runtime::transport::wire::{Header, Message, Payload};
use agentmesh_runtime::transport::PeerHandle;
use agentmesh_runtime::{FromPeer, Mesh};

use crate::agent::{Adjustment, SyncEvent};
use crate::cut_off::CutOffs;
use crate::discovery::DiscoveryMsg;
use crate::early_adjusts::{EarlyAdjust, EarlyAdjusts};
use crate::ended_attempts::EndedAttempts;
use crate::host::PolicyStore;
use crate::kept::{KeptFrames, Limits};
use crate::policy::RateLimiter;
use crate::resend::{resend, send_and_keep, Kind};
use crate::service::allocate_prio;
use crate::worker::{Allocation, WorkerEvent, WorkerMsg};

/// Frames waiting to go out from this host at most (the host waits when it is full).
const OUTBOX: usize = 4_096;
/// Stream Prio of final REPORTs: the coordination lane, reliable and in order.
const FINAL_REPORT_PRIO: u8 = 160;
/// How long this node may have no connection to a coordinator's node before it cancels
/// the attempts that coordinator gave here: twice the time after which the coordinator
/// gives them to other workers ([`crate::coordinator::CUT_OFF_MS`]), so they run
/// elsewhere by then, and their REPORTs could not arrive anyway.
const CUT_OFF_CANCEL_MS: u64 = 2 * crate::coordinator::CUT_OFF_MS;
/// How often the connections to coordinators with attempts here are checked.
const CUT_OFF_CHECK: std::time::Duration = std::time::Duration::from_millis(500);
/// How often the connections the kept final REPORTs went on are checked.
const FINALS_CHECK: std::time::Duration = std::time::Duration::from_millis(250);
/// Final REPORTs kept until they surely arrived ([`KeptFrames`]): for 10 s on an open
/// connection (one that delivers nothing closes after the 3 s idle timeout), for 60 s
/// at most with no connection to their coordinator's node, and at most 65,536 of them
/// and 32 MiB.
const FINALS: Limits = Limits {
    keep_ms: 10_000,
    give_up_ms: 60_000,
    max_frames: 65_536,
    max_bytes: 32 << 20,
};

/// How long, and how many at most, the attempts that ended here are remembered, so that
/// an ALLOCATE its coordinator sends again does not run one twice ([`EndedAttempts`]):
/// longer than a coordinator keeps an ALLOCATE to send again (10 s on an open
/// connection, then until it gives the node up for cut off: 1 s past the 3 s idle
/// timeout), with room to spare. Past the count (65,536 attempts ending within 70 s, at
/// about 64 bytes each), a late copy may run an attempt again, whose result the
/// coordinator discards.
const ENDED_ATTEMPTS_MS: u64 = 70_000;
/// See [`ENDED_ATTEMPTS_MS`].
const MAX_ENDED_ATTEMPTS: usize = 65_536;
/// How long, how many and how many bytes at most of the ADJUSTs that came before their
/// attempt's ALLOCATE are kept for it ([`EarlyAdjusts`]): as long as the attempts that
/// ended (an ALLOCATE sent again comes within that), 16,384 of them and 16 MiB (a
/// thousand carrying the 16 KiB of parameters a task may have). Past that, an attempt
/// whose ALLOCATE comes later runs as of its ALLOCATE, as it did before they were kept.
const EARLY_ADJUSTS_MS: u64 = ENDED_ATTEMPTS_MS;
/// See [`EARLY_ADJUSTS_MS`].
const MAX_EARLY_ADJUSTS: usize = 16_384;
/// See [`EARLY_ADJUSTS_MS`].
const MAX_EARLY_ADJUST_BYTES: usize = 16 << 20;

/// What the worker host handles.
pub enum WorkersMsg {
    /// A local agent registered: its supervisor takes its allocations.
    Add {
        /// Its Agent ID.
        agent: u32,
        /// Its type.
        agent_type: String,
        /// Its coordination group.
        group: u16,
        /// Its supervisor.
        supervisor: ActorRef<WorkerMsg>,
    },
    /// An ACP frame for the workers (ALLOCATE, ADJUST, SYNC, SYNC_ACK).
    Acp(FromPeer<Message>, OwnedSemaphorePermit),
    /// What an agent's supervisor reports.
    Event(u32, WorkerEvent),
    /// A node is down: the attempts its coordinator gave here are cancelled.
    NodeDown(String),
    /// Check the connections to the coordinators with attempts here
    /// ([`CUT_OFF_CANCEL_MS`]).
    CheckConnections,
    /// The node is leaving: refuse new ALLOCATEs, and answer how many attempts given
    /// here have not ended or have their final REPORT still to go (asked again until
    /// none, or the node gives up waiting).
    Drain(ractor::RpcReplyPort<usize>),
    /// A local agent has a new ID (it lost a collision).
    Reidentified {
        /// The ID it had.
        old: u32,
        /// The ID it has now.
        new: u32,
    },
}

/// The worker host actor.
pub struct Workers;

/// How the worker host starts.
pub struct WorkersArgs {
    /// The node's mesh.
    pub mesh: Mesh,
    /// Discovery on this node.
    pub discovery: ActorRef<DiscoveryMsg>,
    /// The policy in force.
    pub policy: PolicyStore,
}

struct Slot {
    group: u16,
    supervisor: ActorRef<WorkerMsg>,
    load: u32,
    /// As its supervisor last reported it.
    health: Health,
}

struct AttemptInfo {
    agent: u32,
    coordinator: String,
    coordinator_agent: u32,
}

/// The worker host's state.
pub struct WorkersState {
    mesh: Mesh,
    discovery: ActorRef<DiscoveryMsg>,
    policy: PolicyStore,
    agents: HashMap<u32, Slot>,
    /// The attempts given here and not ended, in order, so that a task's are one range:
    /// whether any is left is asked at every attempt's end.
    attempts: BTreeMap<(Uuid, u32, u32), AttemptInfo>,
    /// Agents known to work on each task here (from ALLOCATE and from their SYNCs).
    rosters: HashMap<Uuid, BTreeSet<u32>>,
    /// Our agents' own hashes, by (task, agent, round), to answer SYNC_ACK.
    hashes: HashMap<(Uuid, u32, u32), Vec<u8>>,
    limiter: RateLimiter,
    epoch: Instant,
    outbox: mpsc::Sender<ToSender>,
    /// Coordinators' nodes with attempts here and no connection from this node
    /// ([`CUT_OFF_CANCEL_MS`]).
    cut_offs: CutOffs,
    /// The attempts that ended here lately: the same ALLOCATE again runs nothing.
    ended: EndedAttempts,
    /// ADJUSTs that came before their attempt's ALLOCATE, for it to start with.
    early: EarlyAdjusts,
    /// The node is leaving: other nodes' ALLOCATEs are refused, as if it had no such
    /// agent, so that their coordinators give them to other nodes at once. (This
    /// node's coordinator allocates only while no other node is up.)
    draining: bool,
}

/// What the worker host's sender takes, in order.
enum ToSender {
    /// A frame to send.
    Frame(Outgoing),
    /// A node is down: the finals kept for it are dropped.
    NodeDown(String),
}

struct Outgoing {
    node: String,
    message: Message,
    how: Delivery,
}

/// How a frame goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// As a datagram (progress REPORTs).
    Datagram,
    /// On its lane.
    Lane,
    /// On its lane, and kept until it surely arrived: a final REPORT.
    Final,
}

impl Actor for Workers {
    type Msg = WorkersMsg;
    type State = WorkersState;
    type Arguments = WorkersArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkersMsg>,
        args: WorkersArgs,
    ) -> Result<WorkersState, ActorProcessingErr> {
        drop(myself.send_interval(CUT_OFF_CHECK, || WorkersMsg::CheckConnections));
        let (outbox, queue) = mpsc::channel(OUTBOX);
        tokio::spawn(send_frames(args.mesh.clone(), queue));
        Ok(WorkersState {
            mesh: args.mesh,
            discovery: args.discovery,
            policy: args.policy,
            agents: HashMap::new(),
            attempts: BTreeMap::new(),
            rosters: HashMap::new(),
            hashes: HashMap::new(),
            limiter: RateLimiter::default(),
            epoch: Instant::now(),
            outbox,
            cut_offs: CutOffs::new(CUT_OFF_CANCEL_MS),
            ended: EndedAttempts::new(ENDED_ATTEMPTS_MS, MAX_ENDED_ATTEMPTS),
            early: EarlyAdjusts::new(EARLY_ADJUSTS_MS, MAX_EARLY_ADJUSTS, MAX_EARLY_ADJUST_BYTES),
            draining: false,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<WorkersMsg>,
        msg: WorkersMsg,
        state: &mut WorkersState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkersMsg::Add {
                agent,
                agent_type,
                group,
                supervisor,
            } => {
                debug!(agent, %agent_type, group, "worker added");
                state.agents.insert(
                    agent,
                    Slot {
                        group,
                        supervisor,
                        load: 0,
                        health: Health::Ok,
                    },
                );
            }
            WorkersMsg::Acp(FromPeer { peer, message }, permit) => {
                state.on_acp(&peer, message).await;
                drop(permit);
            }
            WorkersMsg::Event(agent, event) => state.on_event(agent, event).await,
            WorkersMsg::NodeDown(node) => {
                let _ = state.outbox.send(ToSender::NodeDown(node.clone())).await;
                state.early.forget_node(&node);
                let n = state.cancel_attempts_of(&node);
                if n > 0 {
                    info!(%node, attempts = n, "cancelling the attempts of a coordinator whose node went down");
                }
            }
            WorkersMsg::CheckConnections => state.cancel_cut_off(),
            WorkersMsg::Drain(reply) => {
                if !state.draining {
                    state.draining = true;
                    info!(attempts = state.attempts.len(), "draining: refusing other nodes' new allocations, giving back those queued; waiting for the attempts running here to end");
                    let me = state.mesh.node();
                    let reason = format!("node {me} is leaving");
                    // This node's own coordinator allocates here only while no other
                    // node is up to take its tasks over: they run here to their end.
                    let theirs: HashSet<(Uuid, u32, u32)> = state
                        .attempts
                        .iter()
                        .filter(|(_, info)| info.coordinator != me)
                        .map(|(key, _)| *key)
                        .collect();
                    let attempts = Arc::new(theirs);
                    for slot in state.agents.values() {
                        let (reason, attempts) = (reason.clone(), attempts.clone());
                        let _ = slot
                            .supervisor
                            .cast(WorkerMsg::HandBack { reason, attempts });
                    }
                }
                let unsent = state.outbox.max_capacity() - state.outbox.capacity();
                let _ = reply.send(state.attempts.len() + unsent);
            }
            WorkersMsg::Reidentified { old, new } => {
                if let Some(slot) = state.agents.remove(&old) {
                    state.agents.insert(new, slot);
                }
                for a in state.attempts.values_mut().filter(|a| a.agent == old) {
                    a.agent = new;
                }
            }
        }
        Ok(())
    }
}

impl WorkersState {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Cancels the attempts a coordinator on `node` gave here (its node is down, or
    /// this one has had no connection to it for [`CUT_OFF_CANCEL_MS`]): no one takes
    /// their REPORTs, and the coordinator (or its standby) allocates those segments
    /// again elsewhere, so they would hold replicas for nothing. How many.
    fn cancel_attempts_of(&mut self, node: &str) -> usize {
        let mut cancelled = 0;
        for ((task, segment, attempt), info) in &self.attempts {
            if info.coordinator != node {
                continue;
            }
            if let Some(slot) = self.agents.get(&info.agent) {
                let _ = slot.supervisor.cast(WorkerMsg::Cancel {
                    task: *task,
                    segment: *segment,
                    attempt: *attempt,
                });
                cancelled += 1;
            }
        }
        cancelled
    }

    /// Cancels, once per cut, the attempts of coordinators whose node this one has
    /// had no connection to for [`CUT_OFF_CANCEL_MS`]: a link cut between the two
    /// alone (others reach both, so neither is held down). The coordinator has given
    /// them to other workers by then; before, they ran to their end here for nothing.
    fn cancel_cut_off(&mut self) {
        let now = self.now_ms();
        let me = self.mesh.node();
        let coordinators: BTreeSet<String> = self
            .attempts
            .values()
            .filter(|a| a.coordinator != me)
            .map(|a| a.coordinator.clone())
            .collect();
        self.cut_offs.retain(|node| coordinators.contains(node));
        for node in coordinators {
            if !self.cut_offs.due(&node, self.mesh.is_connected(&node), now) {
                continue;
            }
            let n = self.cancel_attempts_of(&node);
            warn!(%node, attempts = n, "no connection to the node of a coordinator with attempts here: cancelling them");
            metrics::counter!("agentmesh_cut_off_cancellations_total").increment(n as u64);
        }
    }

    async fn on_acp(&mut self, peer: &str, message: Message) {
        let header = message.header;
        let payload = match Payload::decode(header.msg_type, &message.body) {
            Ok(p) => p,
            Err(e) => {
                // The transport checked the frame; a payload that does not decode is
                // the sender's bug: drop it, tell the logs, go on serving others.
                return warn!(%peer, msg_type = %header.msg_type, error = %e, "payload refused");
            }
        };
        match payload {
            Payload::Allocate(a) => self.on_allocate(peer, header, a).await,
            Payload::Adjust(a) => self.on_adjust(peer, a),
            Payload::Sync(s) => self.on_sync(peer, header, s).await,
            Payload::SyncAck(s) => self.on_sync_ack(header, s),
            other => debug!(%peer, msg_type = %other.msg_type(), "not for the workers"),
        }
    }

    async fn on_allocate(&mut self, peer: &str, header: Header, a: Allocate) {
        let key = (a.task, a.segment, a.attempt);
        let now_ms = self.now_ms();
        // The same ALLOCATE again (sent again after a lost connection, `kept.rs`): the
        // attempt runs already, or ended here and its final REPORT went or goes.
        if self.attempts.contains_key(&key) || self.ended.contains(&key, now_ms) {
            metrics::counter!("agentmesh_allocates_repeated_total").increment(1);
            return debug!(%peer, task = %a.task, segment = a.segment, attempt = a.attempt, "the same ALLOCATE again: not run twice");
        }
        // An ADJUST of this attempt from the same node overtook it.
        let early = self.early.take(&key, peer, now_ms);
        if early.as_ref().is_some_and(|e| e.cancel) {
            self.ended.insert(key, now_ms);
            metrics::counter!("agentmesh_allocates_repeated_total").increment(1);
            return debug!(%peer, task = %a.task, segment = a.segment, attempt = a.attempt, "ALLOCATE of an attempt cancelled before it came: not run");
        }
        let refusal = match self.agents.get(&a.target) {
            _ if self.draining && peer != self.mesh.node() => Some((
                Refusal::NoAgent,
                None,
                format!("node {} is leaving", self.mesh.node()),
            )),
            None => Some((
                Refusal::NoAgent,
                None,
                format!("no agent {} on node {}", a.target, self.mesh.node()),
            )),
            Some(slot) => {
                let policy = self.policy.get();
                if !policy.allows(header.group, slot.group) {
                    deny("group", header.group, slot.group);
                    Some((
                        Refusal::Policy,
                        None,
                        format!(
                            "denied by policy: group {} may not send to group {}",
                            header.group, slot.group
                        ),
                    ))
                } else if let Some(rate) = policy.rate_per_agent(slot.group) {
                    if self.limiter.allow(a.target, rate, now_ms) {
                        None
                    } else {
                        deny("rate", header.group, slot.group);
                        let after = self.limiter.next_token_ms(a.target, rate, now_ms);
                        Some((
                            Refusal::Rate,
                            Some(u32::try_from(after).unwrap_or(u32::MAX)),
                            format!(
                                "rate limited: agent {} takes {rate} allocations per second",
                                a.target
                            ),
                        ))
                    }
                } else {
                    None
                }
            }
        };
        if let Some((refused, retry_after_ms, reason)) = refusal {
            match self.draining {
                // Said once, when the drain began.
                true => {
                    debug!(%peer, task = %a.task, segment = a.segment, %reason, "allocation refused")
                }
                false => {
                    warn!(%peer, task = %a.task, segment = a.segment, %reason, "allocation refused")
                }
            }
            self.ended.insert(key, now_ms);
            // Sent as the agent, if this node has it; else as the node (agent 0).
            let (agent, group, health) = self
                .agents
                .get(&a.target)
                .map_or((0, 0, Health::Ok), |s| (a.target, s.group, s.health));
            let report = Report {
                target: header.agent,
                task: a.task,
                segment: a.segment,
                attempt: a.attempt,
                progress_permille: 0,
                health,
                load: 0,
                output: None,
                error: Some(reason),
                refused: Some(refused),
                retry_after_ms,
            };
            if let Some(m) = report_message(report, agent, group, true) {
                self.send(peer, m, Delivery::Final).await;
            }
            return;
        }
        let Some(slot) = self.agents.get_mut(&a.target) else {
            return;
        };
        slot.load += 1;
        let (load, health, supervisor) = (slot.load, slot.health, slot.supervisor.clone());
        let roster = self.rosters.entry(a.task).or_default();
        roster.extend(a.peers.iter().copied());
        roster.insert(a.target);
        self.attempts.insert(
            key,
            AttemptInfo {
                agent: a.target,
                coordinator: peer.to_string(),
                coordinator_agent: header.agent,
            },
        );
        let mut run = Allocation {
            task: a.task,
            segment: a.segment,
            attempt: a.attempt,
            input: a.input.to_vec(),
            priority: header.prio,
            params: a.params,
            adjusted_priority: None,
        };
        if let Some(early) = early {
            // Sent after the ALLOCATE, it carries the task's parameters as of later.
            metrics::counter!("agentmesh_adjusts_before_allocate_total").increment(1);
            run.params = early.params;
            if let Some(p) = early.priority {
                run.priority = allocate_prio(p);
                run.adjusted_priority = Some(p);
            }
        }
        let run = WorkerMsg::Run(run);
        if supervisor.cast(run).is_err() {
            self.on_event(
                a.target,
                WorkerEvent::Failed {
                    allocation: key,
                    reason: "the agent's supervisor has stopped".into(),
                },
            )
            .await;
            return;
        }
        let _ = self.discovery.cast(DiscoveryMsg::Update {
            agent: a.target,
            load,
            health,
        });
    }

    fn on_adjust(&mut self, peer: &str, a: Adjust) {
        if let (Some(segment), Some(attempt)) = (a.segment, a.attempt) {
            // For one attempt: it may have ended here, or not come yet (an ADJUST on
            // the urgent lane can overtake its ALLOCATE). An ADJUST sent again after a
            // lost connection must not reach a later attempt of the segment.
            let key = (a.task, segment, attempt);
            if !self.attempts.contains_key(&key) {
                let now_ms = self.now_ms();
                if !self.ended.contains(&key, now_ms) {
                    // Its ALLOCATE, should it come from this node, starts it so.
                    let early = EarlyAdjust {
                        params: a.params,
                        priority: a.priority,
                        cancel: a.cancel,
                    };
                    self.early.insert(key, peer, early, now_ms);
                }
                return debug!(%peer, task = %a.task, segment, attempt, cancel = a.cancel, "ADJUST of an attempt not running here");
            }
        }
        let from_coordinator = self
            .attempts
            .iter()
            .any(|((task, _, _), info)| *task == a.task && info.coordinator == peer);
        if !from_coordinator {
            metrics::counter!("agentmesh_adjust_refused_total").increment(1);
            return debug!(%peer, task = %a.task, "ADJUST from a node that does not coordinate this task");
        }
        let Some(slot) = self.agents.get(&a.target) else {
            return;
        };
        if let (Some(segment), Some(attempt)) = (a.segment, a.attempt) {
            if a.cancel {
                let _ = slot.supervisor.cast(WorkerMsg::Cancel {
                    task: a.task,
                    segment,
                    attempt,
                });
                return;
            }
        }
        let _ = slot.supervisor.cast(WorkerMsg::Adjust {
            task: a.task,
            segment: a.segment,
            adjustment: Adjustment {
                params: a.params,
                priority: a.priority,
                cancelled: a.cancel,
            },
        });
    }

    async fn on_sync(&mut self, peer: &str, header: Header, s: Sync) {
        let Some(slot) = self.agents.get(&s.target) else {
            return;
        };
        let mine = self.hashes.get(&(s.task, s.target, s.round));
        let agreed = mine.is_some_and(|h| h.as_slice() == s.hash.as_ref());
        let _ = slot.supervisor.cast(WorkerMsg::Sync {
            task: s.task,
            skip_segment: (header.agent == s.target).then_some(s.segment),
            event: SyncEvent::Sync {
                from: header.agent,
                segment: s.segment,
                round: s.round,
                hash: s.hash.to_vec(),
                body: s.body.to_vec(),
            },
        });
        if let Some(roster) = self.rosters.get_mut(&s.task) {
            roster.insert(header.agent);
        }
        let ack = SyncAck {
            target: header.agent,
            task: s.task,
            segment: s.segment,
            round: s.round,
            hash: s.hash,
            agreed,
        };
        let group = slot.group;
        if let Some(m) = encode(Payload::SyncAck(ack), s.target, group, None) {
            self.send(peer, m, Delivery::Lane).await;
        }
    }

    fn on_sync_ack(&mut self, header: Header, s: SyncAck) {
        let Some(slot) = self.agents.get(&s.target) else {
            return;
        };
        let _ = slot.supervisor.cast(WorkerMsg::Sync {
            task: s.task,
            skip_segment: None,
            event: SyncEvent::Ack {
                from: header.agent,
                round: s.round,
                agreed: s.agreed,
            },
        });
    }

    async fn on_event(&mut self, agent: u32, event: WorkerEvent) {
        let (key, progress, output, error, refused) = match event {
            WorkerEvent::Progress {
                allocation,
                permille,
            } => (allocation, permille, None, None, None),
            WorkerEvent::Done { allocation, output } => {
                (allocation, 1000, Some(Bytes::from(output)), None, None)
            }
            WorkerEvent::Failed { allocation, reason } => (allocation, 0, None, Some(reason), None),
            WorkerEvent::Refused { allocation, reason } => {
                (allocation, 0, None, Some(reason), Some(Refusal::NoAgent))
            }
            WorkerEvent::Sync {
                allocation,
                round,
                hash,
                body,
            } => return self.share(agent, allocation, round, hash, body).await,
            WorkerEvent::Health(health) => return self.on_health(agent, health),
        };
        let is_final = output.is_some() || error.is_some();
        let Some(info) = (if is_final {
            let now_ms = self.now_ms();
            self.ended.insert(key, now_ms);
            self.attempts.remove(&key)
        } else {
            self.attempts.get(&key).map(|i| AttemptInfo {
                agent: i.agent,
                coordinator: i.coordinator.clone(),
                coordinator_agent: i.coordinator_agent,
            })
        }) else {
            return;
        };
        let (load, group, health) = match self.agents.get_mut(&info.agent) {
            Some(slot) => {
                if is_final {
                    slot.load = slot.load.saturating_sub(1);
                }
                (slot.load, slot.group, slot.health)
            }
            None => (0, 0, Health::Ok),
        };
        if refused.is_some() {
            let reason = error.as_deref().unwrap_or_default();
            match self.draining {
                true => {
                    debug!(coordinator = %info.coordinator, task = %key.0, segment = key.1, reason, "allocation given back")
                }
                false => {
                    warn!(coordinator = %info.coordinator, task = %key.0, segment = key.1, reason, "allocation refused")
                }
            }
        }
        let report = Report {
            target: info.coordinator_agent,
            task: key.0,
            segment: key.1,
            attempt: key.2,
            progress_permille: progress,
            health,
            load,
            output,
            error,
            refused,
            retry_after_ms: None,
        };
        // A result no message can carry fails its attempt, saying so: sent as it is,
        // the coordinator's node would close the connection for it.
        let limit = self.mesh.max_message_bytes();
        let message = match report_message(report.clone(), info.agent, group, is_final) {
            Some(m) if m.body.len() <= limit => Some(m),
            built => report_message(
                Report {
                    output: None,
                    error: Some(match built {
                        Some(m) => format!(
                            "its result is {} bytes, more than the {limit} one message may carry",
                            m.body.len()
                        ),
                        None => "the result does not encode as a REPORT".into(),
                    }),
                    ..report
                },
                info.agent,
                group,
                is_final,
            ),
        };
        if let Some(message) = message {
            let how = if is_final {
                Delivery::Final
            } else {
                Delivery::Datagram
            };
            self.send(&info.coordinator, message, how).await;
        }
        if is_final {
            let _ = self.discovery.cast(DiscoveryMsg::Update {
                agent: info.agent,
                load,
                health,
            });
            let task = (key.0, 0, 0)..=(key.0, u32::MAX, u32::MAX);
            if self.attempts.range(task).next().is_none() {
                self.rosters.remove(&key.0);
                self.hashes.retain(|(t, _, _), _| *t != key.0);
            }
        }
    }

    /// An agent's supervisor reports a change of health: discovery spreads it, and
    /// coordinators give an unhealthy agent nothing until it is well again.
    fn on_health(&mut self, agent: u32, health: Health) {
        let Some(slot) = self.agents.get_mut(&agent) else {
            return;
        };
        slot.health = health;
        let _ = self.discovery.cast(DiscoveryMsg::Update {
            agent,
            load: slot.load,
            health,
        });
    }

    /// Sends an agent's SYNC to every other worker of its task that this host knows.
    async fn share(
        &mut self,
        agent: u32,
        (task, segment, attempt): (Uuid, u32, u32),
        round: u32,
        hash: Vec<u8>,
        body: Vec<u8>,
    ) {
        if !self.attempts.contains_key(&(task, segment, attempt)) {
            return;
        }
        self.hashes.insert((task, agent, round), hash.clone());
        let group = self.agents.get(&agent).map_or(0, |s| s.group);
        let peers: Vec<u32> = self
            .rosters
            .get(&task)
            .map(|r| r.iter().copied().collect())
            .unwrap_or_default();
        for peer_agent in peers {
            let node = match ractor::call!(self.discovery, DiscoveryMsg::Locate, peer_agent) {
                Ok(Some(node)) => node,
                _ => continue,
            };
            let sync = Sync {
                target: peer_agent,
                task,
                segment,
                round,
                hash: Bytes::from(hash.clone()),
                body: Bytes::from(body.clone()),
            };
            if let Some(m) = encode(Payload::Sync(sync), agent, group, None) {
                self.send(&node, m, Delivery::Lane).await;
            }
        }
    }

    async fn send(&self, node: &str, message: Message, how: Delivery) {
        let out = Outgoing {
            node: node.to_string(),
            message,
            how,
        };
        if self.outbox.send(ToSender::Frame(out)).await.is_err() {
            warn!("the worker host's sender has stopped");
        }
    }
}

fn deny(reason: &'static str, from: u16, to: u16) {
    metrics::counter!(
        "agentmesh_policy_denials_total",
        "reason" => reason,
        "from" => from.to_string(),
        "to" => to.to_string()
    )
    .increment(1);
}

/// An ACP message from `agent` of `group` with this payload (and Stream Prio, or the
/// type's default).
pub(crate) fn encode(
    payload: Payload,
    agent: u32,
    group: u16,
    prio: Option<u8>,
) -> Option<Message> {
    let msg_type = payload.msg_type();
    match payload.encode() {
        Ok(body) => {
            let mut header = Header::new(msg_type);
            header.agent = agent;
            header.group = group;
            if let Some(p) = prio {
                header.prio = p;
            }
            Some(Message::new(header, Bytes::from(body)))
        }
        Err(e) => {
            warn!(%msg_type, error = %e, "cannot encode");
            None
        }
    }
}

fn report_message(report: Report, agent: u32, group: u16, is_final: bool) -> Option<Message> {
    let prio = is_final.then_some(FINAL_REPORT_PRIO);
    encode(Payload::Report(report), agent, group, prio)
}

/// Sends frames in the order they were queued, and final REPORTs again when the
/// connection they went on was lost ([`KeptFrames`]).
async fn send_frames(mesh: Mesh, mut queue: mpsc::Receiver<ToSender>) {
    let epoch = Instant::now();
    let now_ms = move || epoch.elapsed().as_millis() as u64;
    let mut kept: KeptFrames<PeerHandle, Message> = KeptFrames::new(FINALS);
    let mut check = tokio::time::interval(FINALS_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let out = tokio::select! {
            out = queue.recv() => match out {
                Some(ToSender::Frame(out)) => out,
                Some(ToSender::NodeDown(node)) => {
                    kept.forget_node(&node);
                    continue;
                }
                None => return,
            },
            _ = check.tick(), if !kept.is_empty() => {
                resend(&mesh, &mut kept, now_ms(), &KEPT_FINALS, |m| m).await;
                continue;
            }
        };
        let node = out.node;
        let sent = match out.how {
            Delivery::Datagram => mesh.send_acp_datagram(&node, out.message).await,
            Delivery::Lane => mesh.send_acp(&node, out.message).await,
            Delivery::Final => {
                let now = now_ms();
                send_and_keep(
                    &mesh,
                    &mut kept,
                    &KEPT_FINALS,
                    &node,
                    out.message,
                    |m| m,
                    now,
                )
                .await
            }
        };
        if let Err(e) = sent {
            debug!(%node, error = %e, "frame not sent");
        }
    }
}

/// How the worker host's sender names the final REPORTs it keeps.
const KEPT_FINALS: Kind = Kind {
    what: "final REPORTs",
    resent: "agentmesh_final_reports_resent_total",
    unkept: "agentmesh_final_reports_unkept_total",
    keep_unsent: true,
};
