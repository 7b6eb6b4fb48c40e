//! Workers: a supervisor running replicas of one agent as ractor actors, handing each
//! allocated segment to a free replica, reporting progress and results, routing
//! adjustments to the running segment, and restarting a replica that panics (its
//! segment is reported failed, so the coordinator reallocates it). A replica that keeps
//! panicking rests before it comes back; the agent's health (ok, degraded while some
//! replicas are down, unhealthy while every one rests) goes to discovery, so
//! coordinators route around it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use agentmesh_runtime::transport::wire::payload::Health;

use crate::agent::{Adjustment, Agent, SegmentContext, SyncEvent};
pub use crate::restarts::RestartPolicy;
use crate::restarts::{self, Comeback, Panics};
use crate::service::allocate_prio;

/// One attempt of one segment, as the coordinator allocated it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The task.
    pub task: Uuid,
    /// The segment.
    pub segment: u32,
    /// The attempt number.
    pub attempt: u32,
    /// The segment's input (the agent's own msgpack encoding).
    pub input: Vec<u8>,
    /// Queue priority: higher runs first when every replica is busy.
    pub priority: u8,
    /// The parameters set for the task so far (ADJUST): the attempt starts with them.
    pub params: BTreeMap<String, String>,
    /// The priority an ADJUST of this attempt set before it started, if one did: its
    /// adjustment starts with it, as if the ADJUST had come once it ran.
    pub adjusted_priority: Option<u8>,
}

/// How a failed attempt's reason starts when its replica panicked (REPORT `error`),
/// so that a coordinator can tell a panic from an error the agent returned.
pub const PANICKED: &str = "agent panicked: ";

/// What a worker reports about an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerEvent {
    /// Progress in thousandths.
    Progress {
        /// The attempt.
        allocation: (Uuid, u32, u32),
        /// 0..=1000.
        permille: u16,
    },
    /// The attempt produced a result (msgpack of the agent's output).
    Done {
        /// The attempt.
        allocation: (Uuid, u32, u32),
        /// The result.
        output: Vec<u8>,
    },
    /// The attempt failed: the agent said so, its input did not decode, it was
    /// cancelled, or its replica panicked.
    Failed {
        /// The attempt.
        allocation: (Uuid, u32, u32),
        /// Why.
        reason: String,
    },
    /// The agent shares an intermediate result with the other workers of its task.
    Sync {
        /// The attempt.
        allocation: (Uuid, u32, u32),
        /// Its sync round.
        round: u32,
        /// Hash of the intermediate result (at most 64 bytes).
        hash: Vec<u8>,
        /// Small data to go with it.
        body: Vec<u8>,
    },
    /// The attempt was not run and never will be here: no replica of the agent runs
    /// (every one panicked too often and rests). Its node refuses it (`"no_agent"`), so
    /// the coordinator gives it to another agent without counting an attempt.
    Refused {
        /// The attempt.
        allocation: (Uuid, u32, u32),
        /// Why.
        reason: String,
    },
    /// The agent's health changed: ok (every replica runs), degraded (some are being
    /// restarted or rest), unhealthy (every one rests: allocations are refused).
    Health(Health),
}

/// What a worker supervisor handles.
pub enum WorkerMsg {
    /// Run this attempt on a free replica (queued while all are busy).
    Run(Allocation),
    /// Adjust a running or queued attempt of this task (and segment, if given).
    Adjust {
        /// The task.
        task: Uuid,
        /// The segment, or every segment of the task here.
        segment: Option<u32>,
        /// The change.
        adjustment: Adjustment,
    },
    /// Cancel this one attempt, running or queued (its coordinator's node went down:
    /// another coordinator runs the segment, as another attempt, if any does).
    Cancel {
        /// The task.
        task: Uuid,
        /// The segment.
        segment: u32,
        /// The attempt.
        attempt: u32,
    },
    /// Give back these attempts if still queued, unstarted, as refused for `reason`:
    /// the node is leaving, and their coordinators give them to other nodes at once
    /// rather than wait for them here.
    HandBack {
        /// Why, for the coordinators.
        reason: String,
        /// Which: those of other nodes' coordinators.
        attempts: Arc<HashSet<(Uuid, u32, u32)>>,
    },
    /// A SYNC or SYNC_ACK for the running attempts of this task (but not the one of
    /// `skip_segment`, the sender's own).
    Sync {
        /// The task.
        task: Uuid,
        /// The sending segment, if it runs here too.
        skip_segment: Option<u32>,
        /// What arrived.
        event: SyncEvent,
    },
    /// A replica finished its attempt.
    Finished(ActorId),
    /// Sent by the supervisor to itself: a replica that panicked is due back, with its
    /// panics in the restart window so far.
    Respawn {
        /// Its panics within the restart window.
        panics: Panics,
        /// It was resting (it panicked more than the policy allows), not restarting.
        rested: bool,
    },
}

/// Attempts waiting for a free replica, at most; more are refused as failed.
const MAX_QUEUED: usize = 1_024;

/// How often an attempt's progress goes to its coordinator at most: an agent that
/// reports progress every few milliseconds, times thousands of replicas, would send
/// datagrams its coordinator's node sheds, crowding the node's queues.
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Supervises the replicas of one agent.
pub struct WorkerSupervisor<A: Agent> {
    _agent: std::marker::PhantomData<fn() -> A>,
}

impl<A: Agent> Default for WorkerSupervisor<A> {
    fn default() -> Self {
        WorkerSupervisor {
            _agent: std::marker::PhantomData,
        }
    }
}

/// How a worker supervisor starts.
pub struct WorkerArgs<A: Agent> {
    /// The agent the replicas run.
    pub agent: Arc<A>,
    /// How many segments run at once.
    pub replicas: usize,
    /// Where reports go (the node sends them on as REPORTs).
    pub events: mpsc::Sender<WorkerEvent>,
    /// How replicas that panic are restarted.
    pub restarts: RestartPolicy,
}

struct Running {
    allocation: Allocation,
    adjust: watch::Sender<Adjustment>,
    sync: mpsc::Sender<SyncEvent>,
}

/// SYNC messages waiting for an agent to read them, per running segment; more are
/// dropped (SYNC is advisory).
const SYNC_INBOX: usize = 64;

/// The supervisor's state.
pub struct WorkerState<A: Agent> {
    agent: Arc<A>,
    events: mpsc::Sender<WorkerEvent>,
    idle: Vec<ActorRef<ReplicaMsg>>,
    running: HashMap<ActorId, (ActorRef<ReplicaMsg>, Running)>,
    queue: VecDeque<Allocation>,
    failures: HashMap<ActorId, Panics>,
    restarts: RestartPolicy,
    /// The origin of the times in `failures`.
    epoch: Instant,
    /// Replicas it runs when none is down.
    replicas: usize,
    /// Replicas down and resting (the others down are being restarted).
    resting: usize,
    /// The health last reported.
    health: Health,
}

impl<A: Agent> WorkerState<A> {
    /// Ok while every replica runs, degraded while some are down, unhealthy while
    /// every one rests (none will run for a while).
    fn health_now(&self) -> Health {
        restarts::health(
            self.replicas,
            self.idle.len() + self.running.len(),
            self.resting,
        )
    }

    /// Reports a change of health; while unhealthy, refuses what waits.
    async fn report_health(&mut self) {
        let health = self.health_now();
        if health == Health::Unhealthy && !self.queue.is_empty() {
            self.hand_back(self.resting(), |_| true).await;
        }
        if health != self.health {
            self.health = health;
            let _ = self.events.send(WorkerEvent::Health(health)).await;
        }
    }

    /// Refuses the queued attempts `which` picks for `reason`: all while unhealthy,
    /// and those of other nodes' coordinators when the node is leaving
    /// ([`WorkerMsg::HandBack`]).
    async fn hand_back(&mut self, reason: String, which: impl Fn(&Allocation) -> bool) {
        for allocation in self.take_queued(which) {
            let refused = WorkerEvent::Refused {
                allocation,
                reason: reason.clone(),
            };
            let _ = self.events.send(refused).await;
        }
    }

    /// Drops the queued attempts `which` picks, each reported failed as cancelled, as a
    /// running one that is cancelled is: its host then forgets it and lowers the
    /// agent's load.
    async fn cancel_queued(&mut self, which: impl Fn(&Allocation) -> bool) {
        for allocation in self.take_queued(which) {
            let failed = WorkerEvent::Failed {
                allocation,
                reason: "cancelled".into(),
            };
            let _ = self.events.send(failed).await;
        }
    }

    /// Takes the queued attempts `which` picks out of the queue: their keys, in order.
    fn take_queued(&mut self, which: impl Fn(&Allocation) -> bool) -> Vec<(Uuid, u32, u32)> {
        let mut taken = Vec::new();
        self.queue.retain(|a| {
            let keep = !which(a);
            if !keep {
                taken.push(key(a));
            }
            keep
        });
        taken
    }

    fn refusal(&self, allocation: &Allocation) -> WorkerEvent {
        WorkerEvent::Refused {
            allocation: key(allocation),
            reason: self.resting(),
        }
    }

    /// Why an attempt is refused while every replica rests.
    fn resting(&self) -> String {
        format!(
            "no replica of agent {} runs: each panicked more than {} times in {} s and rests for up to {} s",
            self.agent.agent_type(),
            self.restarts.max_restarts,
            self.restarts.window.as_secs(),
            self.restarts.rest.as_secs()
        )
    }
}

impl<A: Agent> Actor for WorkerSupervisor<A> {
    type Msg = WorkerMsg;
    type State = WorkerState<A>;
    type Arguments = WorkerArgs<A>;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        args: WorkerArgs<A>,
    ) -> Result<WorkerState<A>, ActorProcessingErr> {
        let replicas = args.replicas.max(1);
        let mut idle = Vec::with_capacity(replicas);
        for _ in 0..replicas {
            idle.push(spawn_replica(&myself, &args.agent, &args.events).await?);
        }
        Ok(WorkerState {
            agent: args.agent,
            events: args.events,
            idle,
            running: HashMap::new(),
            queue: VecDeque::new(),
            failures: HashMap::new(),
            restarts: args.restarts,
            epoch: Instant::now(),
            replicas,
            resting: 0,
            health: Health::Ok,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        state: &mut WorkerState<A>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Run(allocation) => {
                if state.health == Health::Unhealthy {
                    let _ = state.events.send(state.refusal(&allocation)).await;
                } else if state.queue.len() >= MAX_QUEUED {
                    let _ = state.events.try_send(WorkerEvent::Failed {
                        allocation: key(&allocation),
                        reason: "worker queue full".into(),
                    });
                } else {
                    // Highest priority first, first come first within a priority.
                    let at = state
                        .queue
                        .iter()
                        .position(|a| a.priority < allocation.priority)
                        .unwrap_or(state.queue.len());
                    state.queue.insert(at, allocation);
                }
            }
            WorkerMsg::Adjust {
                task,
                segment,
                adjustment,
            } => {
                for (_, run) in state.running.values() {
                    let a = &run.allocation;
                    if a.task == task && segment.is_none_or(|s| s == a.segment) {
                        // The same ADJUST again (sent again after a lost connection)
                        // wakes no one. One that sets only parameters leaves the
                        // priority an earlier one set.
                        run.adjust.send_if_modified(|now| {
                            let next = Adjustment {
                                priority: adjustment.priority.or(now.priority),
                                ..adjustment.clone()
                            };
                            let changed = *now != next;
                            if changed {
                                *now = next;
                            }
                            changed
                        });
                    }
                }
                if adjustment.cancelled {
                    state
                        .cancel_queued(|a| a.task == task && segment.is_none_or(|s| s == a.segment))
                        .await;
                } else {
                    // One still queued starts with them, and waits as its new priority
                    // says.
                    for a in state.queue.iter_mut() {
                        if a.task == task && segment.is_none_or(|s| s == a.segment) {
                            a.params.clone_from(&adjustment.params);
                            if let Some(p) = adjustment.priority {
                                a.adjusted_priority = Some(p);
                                a.priority = allocate_prio(p);
                            }
                        }
                    }
                    if adjustment.priority.is_some() {
                        // Stable: first come first within a priority still.
                        state
                            .queue
                            .make_contiguous()
                            .sort_by_key(|a| std::cmp::Reverse(a.priority));
                    }
                }
            }
            WorkerMsg::HandBack { reason, attempts } => {
                state
                    .hand_back(reason, |a| attempts.contains(&key(a)))
                    .await
            }
            WorkerMsg::Cancel {
                task,
                segment,
                attempt,
            } => {
                let this =
                    |a: &Allocation| a.task == task && a.segment == segment && a.attempt == attempt;
                for (_, run) in state.running.values() {
                    if this(&run.allocation) {
                        run.adjust.send_replace(Adjustment {
                            cancelled: true,
                            ..Adjustment::default()
                        });
                    }
                }
                state.cancel_queued(this).await;
            }
            WorkerMsg::Sync {
                task,
                skip_segment,
                event,
            } => {
                for (_, run) in state.running.values() {
                    let a = &run.allocation;
                    if a.task == task && skip_segment != Some(a.segment) {
                        let _ = run.sync.try_send(event.clone());
                    }
                }
            }
            WorkerMsg::Finished(id) => {
                if let Some((replica, _)) = state.running.remove(&id) {
                    state.idle.push(replica);
                }
            }
            WorkerMsg::Respawn { panics, rested } => {
                let replica = spawn_replica(&myself, &state.agent, &state.events).await?;
                state.failures.insert(replica.get_id(), panics);
                state.idle.push(replica);
                if rested {
                    state.resting = state.resting.saturating_sub(1);
                    info!(
                        agent = state.agent.agent_type(),
                        "a replica is back from its rest"
                    );
                }
                state.report_health().await;
            }
        }
        dispatch(state);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<WorkerMsg>,
        event: SupervisionEvent,
        state: &mut WorkerState<A>,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, error) = event else {
            return Ok(());
        };
        let id = cell.get_id();
        state.idle.retain(|r| r.get_id() != id);
        if let Some((_, run)) = state.running.remove(&id) {
            let _ = state
                .events
                .send(WorkerEvent::Failed {
                    allocation: key(&run.allocation),
                    reason: format!("{PANICKED}{error}"),
                })
                .await;
        }
        let mut panics = state.failures.remove(&id).unwrap_or_default();
        let comeback = panics.record(state.epoch.elapsed(), &state.restarts);
        // The replica comes back later, by a message to this supervisor: it keeps
        // taking messages meanwhile, and the other replicas keep working.
        match comeback {
            Comeback::Rest(rest) => {
                state.resting += 1;
                warn!(
                    agent = state.agent.agent_type(),
                    rest_s = rest.as_secs(),
                    "a replica keeps panicking; it rests before it comes back"
                );
            }
            Comeback::Restart(backoff) => info!(
                agent = state.agent.agent_type(),
                backoff_ms = backoff.as_millis() as u64,
                "restarting a replica after a panic"
            ),
        }
        let rested = comeback.rests();
        // Dropping the handle detaches the timer; it still fires.
        drop(
            myself.send_after(comeback.after(), move || WorkerMsg::Respawn {
                panics,
                rested,
            }),
        );
        state.report_health().await;
        dispatch(state);
        Ok(())
    }
}

fn key(a: &Allocation) -> (Uuid, u32, u32) {
    (a.task, a.segment, a.attempt)
}

/// Hands queued attempts to idle replicas.
fn dispatch<A: Agent>(state: &mut WorkerState<A>) {
    while !state.queue.is_empty() {
        let Some(replica) = state.idle.pop() else {
            return;
        };
        let Some(allocation) = state.queue.pop_front() else {
            return;
        };
        // It starts with the parameters set for its task so far (and a priority set
        // while it waited), as if adjusted at once: an agent that waits for
        // `adjusted()` sees them.
        let given = !allocation.params.is_empty() || allocation.adjusted_priority.is_some();
        let (adjust, mut adjustments) = watch::channel(Adjustment {
            params: allocation.params.clone(),
            priority: allocation.adjusted_priority,
            ..Adjustment::default()
        });
        if given {
            adjustments.mark_changed();
        }
        let (sync, syncs) = mpsc::channel(SYNC_INBOX);
        let run = Running {
            allocation: allocation.clone(),
            adjust,
            sync,
        };
        if replica
            .cast(ReplicaMsg::Run(allocation, adjustments, syncs))
            .is_ok()
        {
            state.running.insert(replica.get_id(), (replica, run));
        }
    }
}

async fn spawn_replica<A: Agent>(
    supervisor: &ActorRef<WorkerMsg>,
    agent: &Arc<A>,
    events: &mpsc::Sender<WorkerEvent>,
) -> Result<ActorRef<ReplicaMsg>, ActorProcessingErr> {
    let args = ReplicaArgs {
        agent: agent.clone(),
        events: events.clone(),
        supervisor: supervisor.clone(),
    };
    let (replica, _) =
        Actor::spawn_linked(None, Replica::<A>::default(), args, supervisor.get_cell()).await?;
    Ok(replica)
}

/// What a replica handles.
pub enum ReplicaMsg {
    /// Work on this attempt, watching these adjustments and SYNCs.
    Run(
        Allocation,
        watch::Receiver<Adjustment>,
        mpsc::Receiver<SyncEvent>,
    ),
}

/// One replica of an agent: runs one segment at a time.
pub struct Replica<A: Agent> {
    _agent: std::marker::PhantomData<fn() -> A>,
}

impl<A: Agent> Default for Replica<A> {
    fn default() -> Self {
        Replica {
            _agent: std::marker::PhantomData,
        }
    }
}

/// How a replica starts.
pub struct ReplicaArgs<A: Agent> {
    agent: Arc<A>,
    events: mpsc::Sender<WorkerEvent>,
    supervisor: ActorRef<WorkerMsg>,
}

impl<A: Agent> Actor for Replica<A> {
    type Msg = ReplicaMsg;
    type State = ReplicaArgs<A>;
    type Arguments = ReplicaArgs<A>;

    async fn pre_start(
        &self,
        _: ActorRef<ReplicaMsg>,
        args: ReplicaArgs<A>,
    ) -> Result<ReplicaArgs<A>, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<ReplicaMsg>,
        msg: ReplicaMsg,
        state: &mut ReplicaArgs<A>,
    ) -> Result<(), ActorProcessingErr> {
        let ReplicaMsg::Run(allocation, adjustments, syncs) = msg;
        let id = key(&allocation);
        let event = match rmp_serde::from_slice::<A::Input>(&allocation.input) {
            Err(e) => WorkerEvent::Failed {
                allocation: id,
                reason: format!("input does not decode: {e}"),
            },
            Ok(input) => {
                let (progress_tx, mut progress_rx) = watch::channel(0);
                let mut ctx =
                    SegmentContext::new(id, progress_tx, adjustments, syncs, state.events.clone());
                let events = state.events.clone();
                let (ended, mut ending) = oneshot::channel::<()>();
                // The latest progress, at most every PROGRESS_EVERY, however often the
                // agent reports it; once the work ends, the last one not sent yet goes
                // at once (the pause is cut short), before the end.
                let forward = tokio::spawn(async move {
                    let mut over = false;
                    while progress_rx.changed().await.is_ok() {
                        let permille = *progress_rx.borrow_and_update();
                        let progress = WorkerEvent::Progress {
                            allocation: id,
                            permille,
                        };
                        if events.send(progress).await.is_err() {
                            return;
                        }
                        if !over {
                            tokio::select! {
                                _ = tokio::time::sleep(PROGRESS_EVERY) => {}
                                _ = &mut ending => over = true,
                            }
                        }
                    }
                });
                let result = state.agent.work(input, &mut ctx).await;
                let cancelled = ctx.is_cancelled();
                drop(ctx);
                let _ = ended.send(());
                let _ = forward.await;
                match result {
                    _ if cancelled => WorkerEvent::Failed {
                        allocation: id,
                        reason: "cancelled".into(),
                    },
                    Ok(output) => match rmp_serde::to_vec_named(&output) {
                        Ok(output) => WorkerEvent::Done {
                            allocation: id,
                            output,
                        },
                        Err(e) => WorkerEvent::Failed {
                            allocation: id,
                            reason: format!("output does not encode: {e}"),
                        },
                    },
                    Err(e) => WorkerEvent::Failed {
                        allocation: id,
                        reason: e.0,
                    },
                }
            }
        };
        let _ = state.events.send(event).await;
        let _ = state.supervisor.cast(WorkerMsg::Finished(myself.get_id()));
        Ok(())
    }
}
