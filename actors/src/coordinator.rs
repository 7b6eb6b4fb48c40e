//! The coordinator actor: puts the allocation ledger (`ledger`, no I/O) on the mesh.
//! It takes submitted tasks, asks discovery for capable agents (filtered by the
//! policy), sends ALLOCATE on the coordination lane, reads REPORTs (trusting a result
//! only from the agent and node that were given the attempt), cancels with ADJUST on
//! the urgent lane, reallocates when a node goes down, and answers the submitter when
//! the task completes or fails.
//!
//! It also keeps its open tasks alive beyond its own node: each task, and each result
//! it accepts, is checkpointed to the coordinator of one other node (its standby,
//! `standby.rs`), which takes the task over if this node goes down. Each answer from
//! the standby is a lease, and a task the standby holds is allocated only under it
//! (`lease.rs`): a coordinator paused past the failure detector does not go on running
//! a task its standby took over meanwhile.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use uuid::Uuid;

use agentmesh_runtime::transport::wire::payload::{Adjust, AgentInfo, Allocate, Health, Report};
use agentmesh_runtime::transport::wire::{Flags, Message, Payload};
use agentmesh_runtime::transport::PeerHandle;
use agentmesh_runtime::{FromPeer, Mesh};

use crate::cut_off::CutOffs;
use crate::dirty::Dirty;
use crate::discovery::DiscoveryMsg;
use crate::ended::{Ended, EndedLimits, EndedTasks};
use crate::ended_attempts::AttemptKey;
use crate::host::PolicyStore;
use crate::in_flight::InFlight;
use crate::kept::{KeptFrames, Limits};
use crate::lease::{Granted, Leases};
use crate::ledger::{
    need_class, Candidates, CandidatesBuilder, Ledger, LedgerConfig, LedgerOutput, Rank,
    ResultVerdict, TaskFigures,
};
use crate::notices::{ForgetNotices, Unheld};
use crate::pages;
use crate::policy::RateLimiter;
use crate::record::{Observation, Recorder};
use crate::refusals::{Refusals, Room};
use crate::resend::{resend, send_and_keep, unreachable, Kind};
use crate::service::serde_bytes_vec::Blob;
use crate::service::{
    allocate_prio, done_bytes, encoded_len, params_bytes, AdjustAnswer, AdjustRequest,
    AgentsRequest, AgentsStatus, Checkpoint, CheckpointAck, OpenTask, ResultsRequest, SoFar,
    SubmitRequest, TaskCheckpoint, TaskOutcome, TaskStatus, TaskSummary, ADJUST_SERVICE,
    AGENTS_SERVICE, COORDINATOR_SERVICE, MAX_GENERATION, MAX_LABEL_LEN, MAX_SEGMENT_TIMEOUT_MS,
    RESULTS_SERVICE, STANDBY_SERVICE,
};
use crate::standby::{HeldTask, Standby, StandbyLimits, Takeover, LEASE_MS, TRUSTED_FOR_MS};
use crate::workers::encode;

/// How often timeouts are checked and waiting segments offered to free workers, unless
/// configured otherwise.
pub const TICK: Duration = Duration::from_millis(50);
/// Frames waiting to go out at most (the coordinator waits when it is full).
const OUTBOX: usize = 4_096;
/// How often the connections the kept ALLOCATEs went on are checked.
const ALLOCATES_CHECK: Duration = Duration::from_millis(250);
/// ALLOCATEs kept until they surely arrived ([`KeptFrames`]): 10 s on an open connection
/// (one that delivers nothing closes after the 3 s idle timeout), until the node is
/// down or cut off ([`CUT_OFF_MS`]) with no connection (60 s at most), and 65,536 of
/// them and 32 MiB at most (past either, the oldest is let go: its attempt waits for
/// its segment timeout if it was lost).
const ALLOCATES: Limits = Limits {
    keep_ms: 10_000,
    give_up_ms: 60_000,
    max_frames: 65_536,
    max_bytes: 32 << 20,
};
/// Tasks open at once at one coordinator; more are refused.
pub const MAX_OPEN_TASKS: usize = 10_000;
/// Segments in one task at most.
pub const MAX_SEGMENTS: usize = 1_000_000;
/// How long a submitter may wait for its task.
pub const SUBMIT_TIMEOUT: Duration = Duration::from_secs(3_600);
/// How long a standby has to answer a checkpoint.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(3);
/// After a checkpoint failed, how long before that standby is tried again.
const CHECKPOINT_RETRY_MS: u64 = 200;
/// How long a standby that is up may leave checkpoints unanswered (from the sending of
/// the first that failed) before its tasks go to another standby. Its lease has lapsed
/// long before, so those tasks allocate nothing meanwhile; a standby that only this
/// node cannot reach (the others do, so no one holds it down) would hold them back for
/// good. The standby given up on still holds copies of them: it runs its copies at a
/// takeover only if it heard from this node within `TRUSTED_FOR_MS`, which must stay
/// below this, with room for a checkpoint's way there.
const STANDBY_GIVE_UP_MS: u64 = 5_000;
const _: () = assert!(TRUSTED_FOR_MS + 500 <= STANDBY_GIVE_UP_MS);
/// A gap at least this long between two messages the coordinator handles (it gets a
/// tick every [`TICK`]) says this node was not running: stopped (SIGSTOP, a paused VM)
/// or starved of CPU. What its standbys left unanswered then says nothing of them, so
/// none is given up on until [`STANDBY_GIVE_UP_MS`] after it runs again. At least four
/// ticks, for ticks set longer.
const PAUSED_AFTER_MS: u64 = 1_000;
/// Bytes of running tasks' parts (starts and results) in one checkpoint, past which
/// the rest waits for the next (one start or result more may go, if the message has
/// room); as many again of tasks' end notices. Half a message at most for the tasks'
/// parts, at nodes whose messages are short; a whole checkpoint is never longer than
/// a message carries (less `CHECKPOINT_SLACK`).
const CHECKPOINT_BYTES: usize = 4 << 20;
/// Bytes of a message a checkpoint leaves to all but its tasks' parts: its own fields
/// (the coordinator's name, numbers) and the mesh's envelope.
const CHECKPOINT_SLACK: usize = 4 << 10;
/// Bytes a result adds to its task's part on top of its own, at most: its segment and
/// the headers of its pair and its bytes.
const DONE_BYTES: usize = 16;
/// Bytes of an end notice's own fields, at most, but for its outcome's reason: what a
/// checkpoint keeps beside the results and outcome the notice carries.
const NOTICE_BYTES: usize = 1 << 10;
/// Bytes of a message an ALLOCATE leaves to all but its segment's input: its other
/// fields (the capability, the roster of the task's holders, its parameters) and the
/// mesh's envelope.
/// A segment's input goes to its worker whole, in one message, so a longer input is
/// refused at submission.
const ALLOCATE_SLACK: usize = 64 << 10;
/// Bytes of the parameters `adjust` sets for one task, names and values together, at
/// most: they go with each of its ALLOCATEs (within `ALLOCATE_SLACK`), ADJUSTs and
/// checkpoints.
pub const MAX_PARAMS_BYTES: usize = 16 << 10;
/// Tasks a standby is still to be told to forget (ended, or moved to another standby),
/// at most: past it the standby is not told, and holds the task until this node's own
/// end.
const MAX_FORGET_NOTICES: usize = 100_000;
/// Segments whose results their standbys may lack, kept with the notices of ended tasks
/// (4 bytes each), at most: past it, a notice carries the task's whole outcome.
const MAX_UNHELD_SEGMENTS: usize = 1 << 20;
/// How often every open task is checkpointed, even with nothing new: a standby that
/// lost it (restarted) or took it over (held this node down) says so in its answer.
const CHECKPOINT_REFRESH_MS: u64 = 5_000;
/// How long a node up may have no connection from this one, while holding attempts of
/// its tasks, before those attempts are given to other workers: its REPORTs cannot
/// arrive. The connection closes after the QUIC idle timeout (3 s) with nothing heard,
/// so this is counted on top of that; a redial that succeeds meanwhile ends it.
pub(crate) const CUT_OFF_MS: u64 = 1_000;
/// Nodes down remembered as taken over from, at most; past it, no task is adopted from
/// the others ([`SubmitRequest::adopt_from`]).
const MAX_TAKEN_OVER_FROM: usize = 4_096;
/// Attempt numbers per generation of coordinators of a task (see [`OpenTask`]).
const GENERATION_ATTEMPTS: u32 = 1 << 24;
// The attempts of a task taken over at the highest generation a standby holds fit.
const _: () =
    assert!((MAX_GENERATION as u64 + 2) * GENERATION_ATTEMPTS as u64 - 1 <= u32::MAX as u64);
/// Generations an adopted task starts at: one drawn from these, not 1. The coordinator
/// it is adopted from (gone before its standby had the task) may itself have taken it
/// over, at generation 1 or more, and its attempts may still run at workers that have
/// not heard it is down. Workers know an attempt by task, segment and number, so an
/// attempt numbered as one of those would be taken there for a copy of it and ignored,
/// and its segment would wait for its timeout (30 s). The generation before is not
/// known here, hence drawn, and above those a chain of takeovers reaches.
const ADOPTED_GENERATIONS: std::ops::Range<u32> = 128..192;

/// What the coordinator handles.
pub enum CoordinatorMsg {
    /// A task to run; answered when it ends, with the whole outcome.
    Submit(SubmitRequest, RpcReplyPort<TaskOutcome>),
    /// The same from a client over the network: answered with as many results as one
    /// message carries (`pages.rs`).
    SubmitFromClient(SubmitRequest, RpcReplyPort<TaskOutcome>),
    /// Later results of an ended task, for a client over the network.
    Results(ResultsRequest, RpcReplyPort<TaskOutcome>),
    /// An ACP frame for the coordinator (REPORT).
    Acp(FromPeer<Message>, OwnedSemaphorePermit),
    /// A node is down: its attempts are reallocated.
    NodeDown {
        /// Its name.
        node: String,
        /// Which of its lives went down (`NodeId::life`).
        life: u64,
    },
    /// An agent's load went down: waiting segments are offered again (answered once
    /// they have been).
    CapacityFreed(RpcReplyPort<()>),
    /// An ALLOCATE could not be sent.
    SendFailed {
        /// The attempt.
        attempt: (Uuid, u32, u32),
        /// Why.
        reason: String,
        /// It could not go for want of a connection to its node, not for what it is:
        /// the attempt never ran, and counts as no failure.
        unreachable: bool,
    },
    /// Check timeouts and offer waiting segments to workers.
    Tick,
    /// The agents and tasks this node knows.
    Status(AgentsRequest, RpcReplyPort<AgentsStatus>),
    /// The same for a client over the network: as many agents as fit in one message.
    StatusFromClient(AgentsRequest, RpcReplyPort<AgentsStatus>),
    /// Steer a running task: ADJUST on the urgent lane to every attempt running.
    Adjust(AdjustRequest, RpcReplyPort<AdjustAnswer>),
    /// A node is up: it may be a standby. In a later life than one whose tasks are
    /// held here, it restarted, and those are taken over.
    NodeUp {
        /// Its name.
        node: String,
        /// Which of its lives is up (`NodeId::life`).
        life: u64,
    },
    /// Another coordinator's tasks, to hold as its standby, with the node that sent them.
    Checkpoint(FromPeer<Checkpoint>, RpcReplyPort<CheckpointAck>),
    /// The node is leaving: allocate nothing more, and say what is left to wait for
    /// (asked again until nothing is, or the node gives up waiting).
    Drain(RpcReplyPort<Drained>),
    /// A standby answered a checkpoint (or did not).
    CheckpointAnswered {
        /// The standby's node.
        node: Arc<str>,
        /// What was sent: each task's part.
        sent: Vec<SentPart>,
        /// Tasks whose end or move it was told, each with what the standby lacked.
        ended: Vec<(Uuid, Unheld)>,
        /// When it was sent (the lease in the answer counts from then).
        sent_ms: u64,
        /// Which checkpoint it was (this coordinator numbers them).
        number: u64,
        /// Its answer.
        answer: Result<CheckpointAck, String>,
    },
}

/// What a draining coordinator still waits for before its node leaves
/// ([`CoordinatorMsg::Drain`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Attempts of its tasks still running, on any node.
    pub running: u64,
    /// Open tasks whose standby lacks something of them (their start, a result, a
    /// change), while another node is up to hold them.
    pub unheld: usize,
    /// Whether a standby is still to be told of tasks that ended here, or has a
    /// checkpoint in flight.
    pub telling: bool,
    /// Open tasks while no other node is up: no standby can take them over, so they
    /// run on here, and are lost if they have not ended when the node leaves.
    pub alone_open: usize,
}

impl Drained {
    /// Nothing is left: its standby can take every task over with nothing run twice.
    pub fn is_done(&self) -> bool {
        *self == Drained::default()
    }
}

/// The coordinator actor.
pub struct Coordinator;

/// How the coordinator starts.
pub struct CoordinatorArgs {
    /// The node's mesh.
    pub mesh: Mesh,
    /// Discovery on this node.
    pub discovery: ActorRef<DiscoveryMsg>,
    /// The policy in force.
    pub policy: PolicyStore,
    /// Ledger tuning.
    pub ledger: LedgerConfig,
    /// Where submissions and segment times are observed (`--record`).
    pub recorder: Option<Recorder>,
    /// How often timeouts are checked and waiting segments offered again ([`TICK`]).
    pub tick: Duration,
    /// Notified by discovery when an agent's load goes down: waiting segments are
    /// offered again then, not at the next tick.
    pub capacity_freed: Arc<Notify>,
    /// The nodes up when it starts, with their life (later ones come as
    /// [`CoordinatorMsg::NodeUp`]).
    pub members: BTreeMap<String, u64>,
}

/// What a coordinator can offer the tasks with one need (capability, tags, group).
#[derive(Clone)]
enum Offer {
    Workers(Candidates),
    NoneCapable { unwatched: bool },
    Denied { groups: Vec<u16> },
}

/// The offers looked up in one round of assignment, by need (its class, and the need
/// itself: two needs of one class get an offer each).
type Round = HashMap<u64, ((String, Vec<String>, u16), Offer)>;

/// The agent and node an attempt was given to.
type Given = (u32, Arc<str>);

/// Set in a task's class (`Rank::class`) while it waits for its standby to hold its
/// start: such tasks are a class of their own, which a round after a result passes
/// over at the first of them. Before, that round looked at each one, and thousands of
/// tasks submitted at once wait for their standby together.
const AWAITING_STANDBY: u64 = 0x8000_0000_0000_0001;

/// What an offer to one task came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Served {
    /// It found no free worker among the capable agents (none, or all at work): the
    /// other tasks of its need would find none either.
    Full,
    /// It waits for its standby, as the tasks of its class did before this offer.
    Parked,
    /// Anything else: it got workers, or waits for a reason of its own.
    Other,
}

/// How far an offer round goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// Every waiting task is looked at: one queued behind work starts its wait for a
    /// worker again, one that waited in vain for `max_wait_ms` fails (the tick's round,
    /// and rounds after a node came or went).
    Whole,
    /// Each class of tasks stops at its first task that finds its list with no free
    /// worker: what follows a result, which frees one worker. With thousands of tasks
    /// waiting, looking at every one after every result cost a round per result times
    /// the tasks waiting (9,000 tasks of one 100 ms segment on 1,000 workers took 8.2 s).
    UntilFull,
}

struct TaskMeta {
    capability: String,
    label: Option<String>,
    tags: Vec<String>,
    group: u16,
    priority: u8,
    inputs: Vec<Bytes>,
    /// Latest progress of each segment's running attempt, in thousandths.
    progress: HashMap<u32, u16>,
    started: Instant,
    /// When it was submitted, on the ledger's clock (orders waiting tasks).
    submitted_ms: u64,
    /// Its need's class ([`need_class`]).
    class: u64,
    /// It is in the class of its need's tasks that wait for their standby
    /// ([`AWAITING_STANDBY`]).
    parked: bool,
    reply: Waiters,
    /// Coordinators that ran it before this one (see [`OpenTask::generation`]).
    generation: u32,
    /// Segments in the order their results were accepted, for the standby.
    done_log: Vec<u32>,
    replica: Replica,
    /// Its standby took it over: it ends here as unknown.
    moved: bool,
    /// The figures of the coordinators that ran it before this one, when this one
    /// took it over (zero if it was submitted here): the outcome counts them too.
    before: SoFar,
    /// The parameters `adjust` set for it so far (later values replace earlier ones
    /// by name): each ADJUST carries them all, and each attempt starts with them.
    params: BTreeMap<String, String>,
    /// How many times `adjust` changed its priority or parameters: the task stays
    /// dirty until its standby answered a checkpoint that carried the latest.
    changes: u64,
}

impl TaskMeta {
    /// A task from its submission, started now (`submitted_ms` on the ledger's clock).
    fn new(
        request: SubmitRequest,
        priority: u8,
        submitted_ms: u64,
        reply: Waiters,
        generation: u32,
        done_log: Vec<u32>,
    ) -> TaskMeta {
        TaskMeta {
            class: need_class(&request.capability, &request.tags, request.group),
            parked: false,
            capability: request.capability,
            label: request.label,
            tags: request.tags,
            group: request.group,
            priority,
            inputs: request
                .inputs
                .into_iter()
                .map(|b| Bytes::from(b.0))
                .collect(),
            progress: HashMap::new(),
            started: Instant::now(),
            submitted_ms,
            reply,
            generation,
            done_log,
            replica: Replica::default(),
            moved: false,
            before: SoFar::default(),
            params: BTreeMap::new(),
            changes: 0,
        }
    }

    /// Its standby has its start, every result accepted so far and its latest change.
    fn standby_has_all(&self) -> bool {
        let r = &self.replica;
        r.opened && r.acked == self.done_log.len() && r.changes == self.changes
    }

    /// Its place in the service order while it waits.
    fn rank(&self) -> Rank {
        Rank {
            class: match self.parked {
                true => self.class ^ AWAITING_STANDBY,
                false => self.class,
            },
            priority: self.priority,
            since: self.submitted_ms,
        }
    }

    /// Its figures so far, from its submission, given the ledger's `figures` of it
    /// (this coordinator's alone); `running` is left at 0.
    fn so_far(&self, figures: &TaskFigures) -> SoFar {
        SoFar {
            running: 0,
            elapsed_ms: self
                .before
                .elapsed_ms
                .saturating_add(self.started.elapsed().as_millis() as u64),
            reallocated: self.before.reallocated + figures.reallocated,
            duplicates_discarded: self.before.duplicates_discarded + figures.duplicates_discarded,
        }
    }
}

/// One checkpoint being put together.
#[derive(Default)]
struct Batch {
    parts: Vec<TaskCheckpoint>,
    /// The tasks whose end or move it tells, each with what the standby lacked.
    ended: Vec<(Uuid, Unheld)>,
    /// Each task's part.
    sent: Vec<SentPart>,
    /// What its parts take encoded (`encoded_len`), results counted at their most.
    bytes: usize,
    /// It goes even with no task in it: it renews the lease.
    renewal: bool,
}

/// One task's part of a checkpoint, as sent.
#[derive(Clone, Copy, Debug)]
pub struct SentPart {
    task: Uuid,
    /// How much of its log of results.
    upto: usize,
    /// Whether its start went.
    opened: bool,
    /// Which of the task's changes (`TaskMeta::changes`) it carried.
    changes: u64,
    /// Whether it told that attempts of the task run.
    running: bool,
}

/// What the end notices of one checkpoint may still carry ([`CoordinatorState::end_part`]).
struct NoticeRoom {
    /// Bytes of results and outcomes: `CHECKPOINT_BYTES` at most, on top of the tasks'.
    results: usize,
    /// Bytes the checkpoint may still grow by: past them it is longer than a message.
    message: usize,
    /// Nothing is in the checkpoint yet.
    empty: bool,
}

impl NoticeRoom {
    /// A part of `len` bytes goes, leaving `results` for results and outcomes.
    fn take(&mut self, len: usize, results: usize) {
        self.message = self.message.saturating_sub(len);
        self.results = results;
        self.empty = false;
    }
}

/// What a checkpoint carries for a task that ended here or moved ([`CoordinatorState::end_part`]).
enum EndPart {
    /// The notice that tells the standby to forget it.
    Notice(TaskCheckpoint),
    /// Results the standby lacks, as for a running task; the notice waits for a later
    /// checkpoint with those still lacking (`rest`).
    Results {
        part: TaskCheckpoint,
        rest: Vec<u32>,
    },
    /// Nothing now: the notice waits for a checkpoint with room.
    Later,
}

/// How far a task's standby has it.
#[derive(Debug, Default)]
struct Replica {
    standby: Option<Arc<str>>,
    /// The standby has the task's start.
    opened: bool,
    /// The standby has `done_log[..acked]`.
    acked: usize,
    /// The standby has the task's priority and parameters as of this change
    /// (`TaskMeta::changes`).
    changes: u64,
    /// The standby was told that attempts of it run (a checkpoint it answered carried
    /// a running count above 0), which it counts as reallocated should it take the
    /// task over. A task's start goes before anything of it runs, and without a result
    /// nothing else made it go again for 5 s: a standby that took over 200 tasks whose
    /// 2,000 segments all ran at the dead node counted 10 reallocated.
    running_told: bool,
    /// The standby refused it: no other is tried.
    off: bool,
    /// Since when the standby holds it, as far as this node knows: the sending time
    /// of the last checkpoint it answered as holding it (of the task's start, until
    /// answered). None: the standby has never been sent it, and cannot take it over.
    held_ms: Option<u64>,
}

/// The coordinator's state.
pub struct CoordinatorState {
    discovery: ActorRef<DiscoveryMsg>,
    policy: PolicyStore,
    ledger: Ledger,
    tasks: HashMap<Uuid, TaskMeta>,
    /// Every attempt started, by task, then segment and attempt, with the agent and node
    /// it was given to, until its task ends: a result is trusted only from them (a late
    /// one from a dead node too). By task, so that a task's end drops its own at once:
    /// one map of all, gone over at each end, cost the open tasks' attempts per task.
    attempts: HashMap<Uuid, HashMap<(u32, u32), Given>>,
    epoch: Instant,
    rng: StdRng,
    outbox: mpsc::Sender<ToSender>,
    /// The policy's allocations per second per agent, as this coordinator spends them
    /// (workers enforce them too, for every coordinator).
    limiter: RateLimiter,
    /// Each known agent's group, for its rate limit.
    agent_groups: HashMap<u32, u16>,
    /// What worker nodes said when they refused ALLOCATEs unrun.
    refusals: Refusals,
    recorder: Option<Recorder>,
    /// When each attempt was allocated, by task (only while recording).
    allocated_ms: HashMap<Uuid, HashMap<(u32, u32), u64>>,
    /// Tasks that ended here: for a client that submits one again.
    ended: EndedTasks,
    mesh: Mesh,
    myself: ActorRef<CoordinatorMsg>,
    /// Other nodes up, with the life each is in, as told with its "up"
    /// (`NodeId::life`). Standbys are picked among them.
    up: BTreeMap<Arc<str>, u64>,
    /// Tasks with something their standby does not have yet.
    dirty: Dirty,
    /// Standbys with a checkpoint in flight, or whose last one failed.
    in_flight: InFlight,
    /// This run, for the standbys: with the checkpoint's number it lets them drop one
    /// that arrives after a later one (`Checkpoint::incarnation`). Never 0.
    incarnation: u64,
    /// Tasks a standby is still to be told to forget: they ended here, or moved to
    /// another standby while it was held down.
    forget_notices: ForgetNotices,
    /// Other coordinators' tasks held here.
    standby: Standby,
    /// Clients waiting here for a task held for another node, until it is taken
    /// over (or ends there).
    standby_waiters: HashMap<Uuid, Waiters>,
    /// When every open task was last checkpointed ([`CHECKPOINT_REFRESH_MS`]).
    refreshed_ms: u64,
    /// The leases from this node's standbys: what fences its tasks.
    leases: Leases,
    /// Nodes down whose tasks held here wait for their lease to end: until when, and
    /// which life of the node went down.
    takeovers_due: HashMap<Arc<str>, (u64, u64)>,
    /// Standbys whose lapsed lease holds tasks back, already logged.
    fence_logged: HashSet<Arc<str>>,
    /// Standbys up whose checkpoints have failed since they last answered: when the
    /// first of those was sent.
    unanswered_since: HashMap<Arc<str>, u64>,
    /// When the coordinator last handled a message, and when it last ran again after a
    /// gap of [`PAUSED_AFTER_MS`] (or four ticks) or more: silence from a standby counts
    /// against it only from then.
    handled_ms: u64,
    resumed_ms: u64,
    paused_after_ms: u64,
    /// Standbys up given up on ([`STANDBY_GIVE_UP_MS`]): no task goes to them until
    /// they answer again (a notice to forget the tasks that moved on, say).
    given_up: HashSet<Arc<str>>,
    /// Nodes whose tasks held here were taken over (their lease ended, or they
    /// restarted), with the life taken over from, until they are up again in that
    /// life: a client may have this node adopt a task of theirs that no one holds
    /// ([`CoordinatorState::adopts_from`]). At most [`MAX_TAKEN_OVER_FROM`].
    taken_over_from: HashMap<Arc<str>, u64>,
    /// Nodes up with no open connection from this one ([`CUT_OFF_MS`]).
    cut_offs: CutOffs,
    /// The node is leaving: nothing more is allocated; the attempts running end, their
    /// results reach the standbys, and then the standbys take the tasks over.
    draining: bool,
}

/// The standby `node` picks among `candidates` (other nodes): the first after it in name
/// order, or else the first. One rule for picking a standby and for finding which node
/// adopts a lost node's task ([`CoordinatorState::adopts_from`]).
fn standby_among<'a>(
    node: &str,
    candidates: impl Iterator<Item = &'a str> + Clone,
) -> Option<&'a str> {
    let after = candidates.clone().filter(|n| *n > node).min();
    after.or_else(|| candidates.min())
}

/// What a standby's answer lets the coordinator allocate.
enum Unblocked {
    /// Every waiting task: the lease had lapsed and runs again.
    All,
    /// These tasks: the standby now holds their start.
    Tasks(Vec<Uuid>),
}

/// What the coordinator's sender takes, in order.
enum ToSender {
    /// A frame to send.
    Frame(Outgoing),
    /// A node is down, or cut off: the attempts sent there went to other workers, so
    /// the ALLOCATEs kept for it are let go.
    NodeGone(Arc<str>),
}

struct Outgoing {
    node: Arc<str>,
    message: Message,
    what: Sending,
}

/// What a frame is, to the sender.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sending {
    /// The ALLOCATE of this attempt: a failure to send it ends the attempt (a refusal if
    /// there was no connection, else a failure), and it is kept until it surely arrived
    /// ([`KeptFrames`]).
    Allocate(AttemptKey),
    /// The ADJUST that cancels this attempt: its ALLOCATE and earlier ADJUSTs are no
    /// longer sent again, and it is kept as an ALLOCATE is.
    Cancel(AttemptKey),
    /// An ADJUST of this attempt's parameters or priority: kept as an ALLOCATE is, in
    /// place of one kept before for that attempt (the worker takes the latest ADJUST as
    /// it comes, so an earlier one sent again after it would undo it).
    Adjust(AttemptKey),
}

impl Actor for Coordinator {
    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<CoordinatorMsg>,
        args: CoordinatorArgs,
    ) -> Result<CoordinatorState, ActorProcessingErr> {
        args.mesh.register_service_rpc(
            COORDINATOR_SERVICE,
            myself.clone(),
            CoordinatorMsg::SubmitFromClient,
            SUBMIT_TIMEOUT,
        )?;
        args.mesh.register_service_rpc(
            RESULTS_SERVICE,
            myself.clone(),
            CoordinatorMsg::Results,
            Duration::from_secs(10),
        )?;
        args.mesh.register_service_rpc(
            AGENTS_SERVICE,
            myself.clone(),
            CoordinatorMsg::StatusFromClient,
            Duration::from_secs(10),
        )?;
        args.mesh.register_service_rpc(
            ADJUST_SERVICE,
            myself.clone(),
            CoordinatorMsg::Adjust,
            Duration::from_secs(10),
        )?;
        args.mesh.register_service_rpc_from_peer(
            STANDBY_SERVICE,
            myself.clone(),
            CoordinatorMsg::Checkpoint,
            CHECKPOINT_TIMEOUT,
        )?;
        let (outbox, queue) = mpsc::channel(OUTBOX);
        tokio::spawn(send_frames(args.mesh.clone(), queue, myself.clone()));
        drop(myself.send_interval(args.tick, || CoordinatorMsg::Tick));
        // One offer round per burst of freed capacity: the next waits for this one.
        let (me, freed) = (myself.clone(), args.capacity_freed.clone());
        tokio::spawn(async move {
            loop {
                freed.notified().await;
                if ractor::call!(me, CoordinatorMsg::CapacityFreed).is_err() {
                    return;
                }
            }
        });
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Ok(CoordinatorState {
            discovery: args.discovery,
            policy: args.policy,
            ledger: Ledger::new(args.ledger, seed),
            tasks: HashMap::new(),
            attempts: HashMap::new(),
            epoch: Instant::now(),
            rng: StdRng::seed_from_u64(seed.rotate_left(17)),
            outbox,
            limiter: RateLimiter::default(),
            agent_groups: HashMap::new(),
            refusals: Refusals::new(),
            recorder: args.recorder,
            allocated_ms: HashMap::new(),
            ended: EndedTasks::new(EndedLimits::default()),
            up: args
                .members
                .iter()
                .filter(|(m, _)| **m != args.mesh.node())
                .map(|(m, life)| (Arc::from(m.as_str()), *life))
                .collect(),
            mesh: args.mesh,
            myself,
            dirty: Dirty::default(),
            in_flight: InFlight::default(),
            incarnation: seed.rotate_left(41) | 1,
            forget_notices: ForgetNotices::new(MAX_FORGET_NOTICES, MAX_UNHELD_SEGMENTS),
            standby: Standby::new(StandbyLimits::default(), LEASE_MS),
            standby_waiters: HashMap::new(),
            refreshed_ms: 0,
            leases: Leases::default(),
            takeovers_due: HashMap::new(),
            fence_logged: HashSet::new(),
            draining: false,
            unanswered_since: HashMap::new(),
            handled_ms: 0,
            resumed_ms: 0,
            paused_after_ms: PAUSED_AFTER_MS.max(4 * args.tick.as_millis() as u64),
            given_up: HashSet::new(),
            taken_over_from: HashMap::new(),
            cut_offs: CutOffs::new(CUT_OFF_MS),
        })
    }

    async fn handle(
        &self,
        _: ActorRef<CoordinatorMsg>,
        msg: CoordinatorMsg,
        state: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        let now = state.now_ms();
        state.note_gap(now);
        match msg {
            CoordinatorMsg::Submit(request, reply) => {
                state.submit(request, Waiter::whole(reply)).await
            }
            CoordinatorMsg::SubmitFromClient(request, reply) => {
                let waiter = Waiter::paged(reply, state.mesh.max_message_bytes());
                state.submit(request, waiter).await
            }
            CoordinatorMsg::Results(request, reply) => state.results(request, reply),
            CoordinatorMsg::Acp(FromPeer { peer, message }, permit) => {
                state.on_acp(&peer, message).await;
                drop(permit);
            }
            CoordinatorMsg::NodeDown { node, life } => {
                match state.ledger.handle_node_down(&node, now) {
                    0 => debug!(%node, "node down: none of its attempts ran here"),
                    lost => info!(%node, attempts = lost, "node down: reallocating its segments"),
                }
                state.node_down(&node, life);
                state
                    .to_sender(ToSender::NodeGone(Arc::from(node.as_str())))
                    .await;
                state.assign_waiting(Pass::Whole).await;
            }
            CoordinatorMsg::NodeUp { node, life } => {
                if state.node_up(&node, life) {
                    state.assign_waiting(Pass::Whole).await;
                }
            }
            CoordinatorMsg::Checkpoint(FromPeer { peer, message }, reply) => {
                let _ = reply.send(state.hold(&peer, message));
            }
            CoordinatorMsg::CheckpointAnswered {
                node,
                sent,
                ended,
                sent_ms,
                number,
                answer,
            } => match state.checkpoint_answered(node, sent, ended, sent_ms, number, answer) {
                Unblocked::All => state.assign_waiting(Pass::UntilFull).await,
                Unblocked::Tasks(tasks) => {
                    let mut round = Round::new();
                    for task in tasks {
                        state.assign_in(task, &mut round).await;
                    }
                }
            },
            CoordinatorMsg::SendFailed {
                attempt,
                reason,
                unreachable,
            } => {
                let (task, segment, attempt) = attempt;
                if unreachable {
                    // Like a refusal: the segment waits, with nothing counted against
                    // it or the worker (`offer` offers such a node's agents as full).
                    state
                        .ledger
                        .handle_refusal(task, segment, attempt, &reason, now);
                } else {
                    state
                        .ledger
                        .handle_failure(task, segment, attempt, &reason, now);
                }
                state.assign(task).await;
            }
            CoordinatorMsg::CapacityFreed(done) => {
                state.assign_waiting(Pass::UntilFull).await;
                let _ = done.send(());
            }
            CoordinatorMsg::Tick => {
                metrics::gauge!("agentmesh_tasks_open").set(state.tasks.len() as f64);
                metrics::gauge!("agentmesh_segments_waiting")
                    .set(state.ledger.pending_segments() as f64);
                metrics::gauge!("agentmesh_standby_tasks_held").set(state.standby.len() as f64);
                state.takeovers_now_due(now);
                state.ended.expire(now);
                if state.reallocate_from_cut_off(now).await {
                    state.assign_waiting(Pass::UntilFull).await;
                }
                if state.tasks.is_empty() {
                    state.checkpoint();
                    return Ok(());
                }
                if now >= state.refreshed_ms + CHECKPOINT_REFRESH_MS {
                    state.refreshed_ms = now;
                    for (task, meta) in &state.tasks {
                        if meta.replica.opened {
                            state.dirty.insert(*task);
                        }
                    }
                }
                state.ledger.handle_timeout(now);
                state.assign_waiting(Pass::Whole).await;
            }
            CoordinatorMsg::Adjust(request, reply) => {
                let answer = state.adjust(request).await;
                let _ = reply.send(answer);
            }
            CoordinatorMsg::Drain(reply) => {
                if !state.draining {
                    state.draining = true;
                    match state.up.is_empty() {
                        false => info!(tasks = state.tasks.len(), "draining: no more allocations; waiting for the attempts running to end and the standbys to hold every task"),
                        true => info!(tasks = state.tasks.len(), "draining with no other node up to take the tasks over: running them on, to end them before leaving"),
                    }
                }
                let _ = reply.send(state.drained(now));
            }
            CoordinatorMsg::Status(_, reply) => {
                let _ = reply.send(state.status().await);
            }
            CoordinatorMsg::StatusFromClient(_, reply) => {
                let mut status = state.status().await;
                status.fit(state.mesh.max_message_bytes());
                let _ = reply.send(status);
            }
        }
        state.drain().await;
        state.checkpoint();
        Ok(())
    }
}

impl CoordinatorState {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Notes a message handled at `now`, and whether this node was not running before
    /// it ([`PAUSED_AFTER_MS`]).
    fn note_gap(&mut self, now: u64) {
        let gap = now.saturating_sub(self.handled_ms);
        if gap >= self.paused_after_ms {
            warn!(gap_ms = gap, "this node did not run for a while (stopped, or starved of CPU): its standbys' silence meanwhile is not held against them");
            self.resumed_ms = now;
        }
        self.handled_ms = now;
    }

    async fn submit(&mut self, request: SubmitRequest, reply: Waiter) {
        let task = match request.task {
            Some(task) => task,
            None => uuid::Builder::from_random_bytes(self.rng.random()).into_uuid(),
        };
        let segments = request.inputs.len() as u32;
        let refuse = |reason: String| TaskOutcome::refused(task, segments, reason);
        // The same task again: its client lost the connection it waited on.
        if let Some(meta) = self.tasks.get_mut(&task) {
            if meta.capability != request.capability
                || meta.group != request.group
                || meta.inputs.len() != request.inputs.len()
            {
                reply.send(refuse(format!("task id {task} is taken by another task")));
                return;
            }
            info!(%task, "a client waits again for the task");
            // The waiters before it stay: one may be this client's, over a connection
            // it lost, or another client's (see `Waiters`).
            meta.reply.add(reply);
            return;
        }
        // Which coordinator of the task this one is: 0 for one submitted here, one of
        // ADOPTED_GENERATIONS for a task adopted from a node that went down, whose
        // attempts may still run at workers under its numbers.
        let mut generation = 0;
        // For an adopted task: how long its client has waited for it already.
        let mut waited_ms = 0;
        let lost = request
            .attach
            .then(|| self.ended_at_gone_node(task))
            .flatten();
        match self.ended_here(task) {
            Ended::Outcome(outcome) => {
                info!(%task, "a client asked again for the outcome of the task");
                reply.send(outcome.clone());
                return;
            }
            Ended::Forgotten => {
                reply.send(refuse(format!(
                    "task {task} ended here already; its outcome is no longer kept"
                )));
                return;
            }
            Ended::Unknown if self.standby.holds(task) => {
                info!(%task, "a client waits here for a task this node holds as standby");
                self.standby_waiters.entry(task).or_default().add(reply);
                return;
            }
            Ended::Unknown if lost.is_some() => {
                let (ended_at, outcome) = lost.unwrap_or_default();
                if let Some(outcome) = outcome {
                    info!(%task, node = %ended_at, "a client asks for a task that ended at a node gone since: it gets the outcome that node sent here");
                    metrics::counter!("agentmesh_task_outcomes_given_for_others_total")
                        .increment(1);
                    reply.send(outcome);
                } else {
                    warn!(%task, node = %ended_at, "a client asks for a task that ended at a node gone since: its outcome is lost with that node, and the task is not run again");
                    metrics::counter!("agentmesh_task_outcomes_lost_total").increment(1);
                    reply.send(refuse(format!(
                        "task {task} ended at {ended_at}, which went down before its outcome reached you: the outcome is lost, and the task is not run again"
                    )));
                }
                return;
            }
            Ended::Unknown if request.attach => match request.adopt_from.as_deref() {
                Some(from) if self.adopts_from(from, request.adopt_from_life) => {
                    if from == self.mesh.node() {
                        info!(%task, "starting a task whose submission never reached this node: no member holds it, and its client submitted it to this node in this life");
                    } else {
                        info!(%task, %from, "adopting a task no member holds: its coordinator's node went down before its standby had it, and its client asked here");
                    }
                    metrics::counter!("agentmesh_tasks_adopted_total").increment(1);
                    generation = self.rng.random_range(ADOPTED_GENERATIONS);
                    waited_ms = request.waited_ms;
                }
                _ => {
                    reply.send(TaskOutcome {
                        unknown: true,
                        ..refuse(format!(
                            "task {task} is not known here: it never reached this node, or the node restarted since; submit it again"
                        ))
                    });
                    return;
                }
            },
            Ended::Unknown => {}
        }
        if self.tasks.len() >= MAX_OPEN_TASKS {
            reply.send(refuse(format!(
                "the coordinator runs {MAX_OPEN_TASKS} tasks already; try later"
            )));
            return;
        }
        if request
            .label
            .as_ref()
            .is_some_and(|l| l.len() > MAX_LABEL_LEN)
        {
            reply.send(refuse(format!(
                "a task label has at most {MAX_LABEL_LEN} bytes"
            )));
            return;
        }
        if request.inputs.len() > MAX_SEGMENTS {
            reply.send(refuse(format!(
                "a task has at most {MAX_SEGMENTS} segments"
            )));
            return;
        }
        let max_input = self.mesh.max_message_bytes().saturating_sub(ALLOCATE_SLACK);
        if let Some((segment, long)) = request
            .inputs
            .iter()
            .enumerate()
            .find(|(_, input)| input.0.len() > max_input)
        {
            reply.send(refuse(format!(
                "the input of segment {segment} takes {} bytes, and one goes to its worker in one message, so it takes at most {max_input} here: split it over more segments",
                long.0.len()
            )));
            return;
        }
        if request
            .segment_timeout_ms
            .is_some_and(|t| !(1..=MAX_SEGMENT_TIMEOUT_MS).contains(&t))
        {
            reply.send(refuse(format!(
                "a segment timeout is 1..={MAX_SEGMENT_TIMEOUT_MS} ms"
            )));
            return;
        }
        let first_attempt = generation * GENERATION_ATTEMPTS + 1;
        let now = self.now_ms();
        if let Err(e) = self.ledger.resume(task, segments, [], first_attempt, now) {
            reply.send(refuse(e.to_string()));
            return;
        }
        if let Some(timeout_ms) = request.segment_timeout_ms {
            self.ledger.set_segment_timeout(task, timeout_ms);
        }
        let priority = request
            .priority
            .unwrap_or_else(|| self.policy.get().priority(request.group));
        info!(%task, capability = %request.capability, segments = request.inputs.len(), priority, group = request.group, "task submitted");
        if let Some(recorder) = &self.recorder {
            recorder.observe(Observation::Submitted {
                task,
                capability: request.capability.clone(),
                priority,
                group: request.group,
                segments: request.inputs.len() as u32,
            });
        }
        let mut meta = TaskMeta::new(
            request,
            priority,
            now,
            Waiters::one(reply),
            generation,
            Vec::new(),
        );
        // An adopted task counts from its submission, as a taken-over one does. What
        // the coordinator that went down ran of it is not known here.
        meta.before.elapsed_ms = waited_ms;
        self.ledger.set_rank(task, meta.rank());
        self.tasks.insert(task, meta);
        self.dirty.insert(task);
        self.assign(task).await;
    }

    /// The agents and tasks this node knows, and the policy it holds.
    async fn status(&self) -> AgentsStatus {
        let agents = ractor::call!(self.discovery, DiscoveryMsg::List).unwrap_or_default();
        let mut tasks: Vec<TaskSummary> = self
            .tasks
            .iter()
            .map(|(id, meta)| {
                let f = self.ledger.figures(*id).unwrap_or_default();
                let so_far = meta.so_far(&f);
                // Done segments count whole; running ones by their last REPORT.
                let running: u64 = meta.progress.values().map(|p| u64::from(*p)).sum();
                let progress_permille = ((u64::from(f.completed) * 1000 + running)
                    / u64::from(f.segments.max(1)))
                .min(1000) as u16;
                TaskSummary {
                    task: *id,
                    capability: meta.capability.clone(),
                    label: meta.label.clone(),
                    priority: meta.priority,
                    group: meta.group,
                    segments: f.segments,
                    completed: f.completed,
                    reallocated: so_far.reallocated,
                    progress_permille,
                    elapsed_ms: so_far.elapsed_ms,
                }
            })
            .collect();
        tasks.sort_by_key(|t| t.task);
        AgentsStatus {
            agents,
            tasks,
            policy: self.policy.in_force(),
            agents_not_listed: 0,
        }
    }

    /// What this coordinator knows of `task` having ended here: its outcome from the
    /// ended-task cache, or, for one too large for it, held apart for its client's pages.
    fn ended_here(&self, task: Uuid) -> Ended<'_> {
        self.ended.get(task, self.now_ms())
    }

    /// The page of an ended task's results that `request` asks for, from the outcome
    /// kept here as its coordinator or as its standby. A page is cut from the outcome
    /// afresh each time, so a client that lost one asks again for the same.
    fn results(&self, request: ResultsRequest, reply: RpcReplyPort<TaskOutcome>) {
        let task = request.task;
        let ended = self.ended_here(task);
        let kept = match ended {
            Ended::Outcome(outcome) => Some(outcome),
            Ended::Forgotten | Ended::Unknown => self.standby.outcome(task, self.now_ms()),
        };
        if let Some(outcome) = kept {
            metrics::counter!("agentmesh_task_result_pages_total").increment(1);
            let _ = reply.send(pages::page(
                outcome,
                request.from,
                self.mesh.max_message_bytes(),
            ));
            return;
        }
        let answer = if ended == Ended::Forgotten {
            let kept_mib = self.ended.limits().result_bytes >> 20;
            TaskOutcome::refused(
                task,
                0,
                format!(
                    "the node it ended at no longer keeps its outcome (it keeps its latest tasks' outcomes, up to {kept_mib} MiB of results, and larger ones for a minute)"
                ),
            )
        } else {
            TaskOutcome {
                unknown: true,
                ..TaskOutcome::refused(task, 0, format!("task {task}'s outcome is not kept here"))
            }
        };
        let _ = reply.send(answer);
    }

    async fn adjust(&mut self, request: AdjustRequest) -> AdjustAnswer {
        let Some(meta) = self.tasks.get_mut(&request.task) else {
            return AdjustAnswer {
                sent: 0,
                error: Some(format!("no task {} runs here", request.task)),
                unknown: true,
            };
        };
        let group = meta.group;
        if !request.params.is_empty() {
            let mut params = meta.params.clone();
            params.extend(request.params);
            let bytes = params_bytes(&params);
            if bytes > MAX_PARAMS_BYTES {
                return AdjustAnswer {
                    sent: 0,
                    error: Some(format!(
                        "the task's parameters would take {bytes} bytes, and take at most {MAX_PARAMS_BYTES}"
                    )),
                    unknown: false,
                };
            }
            // The attempts started from now on start with them; so do those of its
            // standby, should it take the task over.
            meta.params = params;
            meta.changes += 1;
            self.dirty.insert(request.task);
        }
        if let Some(p) = request.priority {
            meta.priority = p;
            self.ledger.set_rank(request.task, meta.rank());
            meta.changes += 1;
            // Its standby runs it at this one if it takes it over.
            self.dirty.insert(request.task);
        }
        if request.cancel {
            info!(task = %request.task, "task cancelled");
            let running = self.ledger.live_attempts(request.task).len() as u32;
            self.ledger.cancel(request.task);
            return AdjustAnswer {
                sent: running,
                error: None,
                unknown: false,
            };
        }
        let params = meta.params.clone();
        let mut sent = 0;
        for (segment, attempt, agent, node) in self.ledger.live_attempts(request.task) {
            let adjust = Adjust {
                target: agent,
                task: request.task,
                segment: Some(segment),
                params: params.clone(),
                priority: request.priority,
                cancel: false,
                attempt: Some(attempt),
            };
            if let Some(mut message) = encode(Payload::Adjust(adjust), 0, group, None) {
                message.header.flags = message.header.flags.with(Flags::URGENT);
                let what = Sending::Adjust((request.task, segment, attempt));
                self.send(node, message, what).await;
                sent += 1;
            }
        }
        AdjustAnswer {
            sent,
            error: None,
            unknown: false,
        }
    }

    /// What is left before the node may leave ([`Drained`]).
    fn drained(&self, now_ms: u64) -> Drained {
        let others = !self.up.is_empty();
        let lacks = |meta: &TaskMeta| !meta.replica.off && !meta.standby_has_all();
        Drained {
            running: self
                .tasks
                .keys()
                .map(|t| u64::from(self.ledger.running(*t)))
                .sum(),
            unheld: match others {
                true => self.tasks.values().filter(|m| lacks(m)).count(),
                false => 0,
            },
            telling: self
                .forget_notices
                .any_for(|n| self.up.contains_key(n) && !self.in_flight.blocks(n, now_ms))
                || self.up.keys().any(|n| self.in_flight.in_flight(n)),
            alone_open: match others {
                true => 0,
                false => self.tasks.len(),
            },
        }
    }

    /// Offers the waiting segments of every task to capable workers, in service order
    /// ([`Rank`]). Tasks that need the same capability, tags and group share one
    /// discovery query and one candidate list in a round, so a round costs distinct
    /// needs × agents, not waiting tasks × agents; and once that list has no free
    /// worker, the ledger tells the rest at once, or, in a [`Pass::UntilFull`], the
    /// round leaves them out.
    async fn assign_waiting(&mut self, pass: Pass) {
        let mut round = self.ledger.service_round();
        let mut offers = Round::new();
        while let Some(task) = round.next(&self.ledger) {
            let served = self.assign_in(task, &mut offers).await;
            if served != Served::Other && pass == Pass::UntilFull {
                round.skip_class();
            }
        }
    }

    /// Offers one task's waiting segments to the capable agents its group may use.
    async fn assign(&mut self, task: Uuid) {
        self.assign_in(task, &mut Round::new()).await;
    }

    /// [`assign`](Self::assign) with the offers of a round. A task that waits for its
    /// standby moves to its need's class of such tasks ([`AWAITING_STANDBY`]), and
    /// back once it no longer waits: a whole round, on every tick, looks at each.
    async fn assign_in(&mut self, task: Uuid, offers: &mut Round) -> Served {
        // A draining coordinator allocates nothing more while another node is up to
        // take its tasks over; alone, it runs them on, to end them before it leaves.
        let Some(meta) = self
            .tasks
            .get(&task)
            .filter(|_| !self.draining || self.up.is_empty())
        else {
            return Served::Other;
        };
        if !self.ledger.has_pending(task) {
            return Served::Other;
        }
        let (awaits, parked) = (self.awaits_standby(&meta.replica), meta.parked);
        if awaits != parked {
            if let Some(meta) = self.tasks.get_mut(&task) {
                meta.parked = awaits;
                self.ledger.set_rank(task, meta.rank());
            }
        }
        if awaits {
            debug!(%task, "a task waits until its standby holds it");
            return if parked {
                Served::Parked
            } else {
                Served::Other
            };
        }
        let Some(meta) = self.tasks.get(&task) else {
            return Served::Other;
        };
        let now = self.now_ms();
        if let (Some(standby), Some(held_ms)) = (&meta.replica.standby, meta.replica.held_ms) {
            if !self.leases.allows(standby, held_ms, now) {
                if !self.leases.knows(standby) {
                    debug!(%task, %standby, "a task waits for its standby's first answer");
                } else if self.fence_logged.insert(standby.clone()) {
                    info!(%task, %standby, "a task waits: its standby's lease lapsed, and the standby may have taken it over; allocating again once the standby answers for it");
                }
                return Served::Other;
            }
        }
        let class = meta.class;
        let same = |(c, t, g): &(String, Vec<String>, u16)| {
            *c == meta.capability && *t == meta.tags && *g == meta.group
        };
        let offer = match offers.get(&class) {
            Some((need, offer)) if same(need) => offer.clone(),
            cached => {
                let need = (meta.capability.clone(), meta.tags.clone(), meta.group);
                let collides = cached.is_some();
                let offer = self.offer(&need.0, &need.1, need.2).await;
                if !collides {
                    offers.insert(class, (need, offer.clone()));
                }
                offer
            }
        };
        let Some(meta) = self.tasks.get(&task) else {
            return Served::Other;
        };
        let group = meta.group;
        match offer {
            Offer::Workers(candidates) => match self.ledger.assign_from(task, &candidates, now) {
                true => Served::Full,
                false => Served::Other,
            },
            Offer::NoneCapable { unwatched } => {
                self.ledger
                    .no_candidates(task, &meta.capability, unwatched, now);
                Served::Full
            }
            Offer::Denied { groups } => {
                metrics::counter!("agentmesh_policy_denials_total", "reason" => "group", "from" => group.to_string(), "to" => "any").increment(1);
                warn!(%task, group, ?groups, "policy denies every capable agent");
                let capability = &meta.capability;
                let reason = format!(
                    "denied by policy: group {group} may not send to group(s) {groups:?}, where every agent with capability {capability:?} is"
                );
                self.ledger.fail_task(task, reason);
                Served::Other
            }
        }
    }

    /// The node `task` ended at, if this node was its standby, was told so, and has
    /// since taken over from that node's life (it went down, or restarted), with the
    /// outcome it sent along, if kept here: what a client that lost that node before
    /// the outcome reached it gets here. It must not have the task adopted, which would
    /// run it again.
    fn ended_at_gone_node(&self, task: Uuid) -> Option<(String, Option<TaskOutcome>)> {
        let now = self.now_ms();
        let ended = self.standby.ended(task, now)?;
        let taken_over = self.taken_over_from.get(ended.node.as_str())?;
        let outcome = self.standby.outcome(task, now).cloned();
        (*taken_over >= ended.life).then(|| (ended.node.clone(), outcome))
    }

    /// Whether this node starts a task that a client lost with `from` and that no other
    /// member holds ([`SubmitRequest::adopt_from`]): `from` is down here, or up in a
    /// later life (it restarted), and its tasks held here were taken over (its lease
    /// ended), and this node is the one `from` would pick as its standby (the first
    /// node after it in name order, among those up here and this one). Only one node
    /// should answer yes, the one `from` gives its tasks to if it was only held down
    /// and comes back: its checkpoint of the task is then answered `taken_over`, and it
    /// drops its copy.
    ///
    /// Or, instead of having taken over from `from`: `from` is up here in a later life
    /// than `submitted_to`, the life the client submitted to. That life has ended, and
    /// nothing of it runs; no lease of it fences anything. This node may never have
    /// seen it: restarted too, it knows `from` only in its new life (found under 30%
    /// packet loss: the standby dropped its copies of a dead node's tasks, unheard for
    /// 4.6 s, and restarted before their clients asked it to adopt them).
    ///
    /// Or `from` is this node, in the life the client submitted to: this node holds
    /// nothing of the task, and the client found no member that does, so its
    /// submission never reached this node (the connection it went on was lost first;
    /// under 30% packet loss such a client was told "submit it again"). Started here,
    /// the task is known by its id again, so the submission, should it come late after
    /// all, only waits for it.
    fn adopts_from(&self, from: &str, submitted_to: Option<u64>) -> bool {
        let me = self.mesh.node();
        if from == me {
            return submitted_to == Some(self.mesh.life());
        }
        let restarted =
            || submitted_to.is_some_and(|life| self.up.get(from).is_some_and(|now| *now > life));
        if !(self.taken_over_from.contains_key(from) || restarted()) {
            return false;
        }
        let candidates = self
            .up
            .keys()
            .map(|n| &**n)
            .filter(|n| *n != from)
            .chain(std::iter::once(me));
        standby_among(from, candidates) == Some(me)
    }

    /// Whether a task must wait for its standby to hold it before anything of it is
    /// allocated: there is a standby to hold it, it has not refused it, and it has not
    /// answered holding the task's start. If this node dies before then, no one else
    /// has the task, and the client may have it started again elsewhere (as adopted,
    /// [`CoordinatorState::adopts_from`]): what ran here meanwhile would run twice.
    fn awaits_standby(&self, replica: &Replica) -> bool {
        !replica.opened
            && !replica.off
            && (replica.standby.is_some() || self.pick_standby().is_some())
    }

    /// What discovery and policy offer a task of `group` that needs `capability` and
    /// `tags`.
    async fn offer(&mut self, capability: &str, tags: &[String], group: u16) -> Offer {
        let found = ractor::call!(self.discovery, |reply| DiscoveryMsg::Query {
            capability: capability.to_string(),
            tags: tags.to_vec(),
            limit: 0,
            reply,
        })
        .unwrap_or_default();
        let policy = self.policy.get();
        let now = self.now_ms();
        self.refusals.policy_in_force(&policy);
        for a in &found {
            self.agent_groups.insert(a.agent, a.group);
        }
        // Denied by this node's policy, or by the agent's node when it refused.
        let permitted: Vec<&AgentInfo> = found
            .iter()
            .filter(|a| policy.allows(group, a.group) && !self.refusals.denies(group, a.agent, now))
            .collect();
        // An agent that cannot take work now (unhealthy, at its rate limit, unknown to
        // its node, on a node this one has no connection to) is offered as full, so
        // that segments wait for it rather than the task failing for want of a capable
        // agent. Before, an ALLOCATE to a node cut off from this one alone failed at
        // once, and each try counted as a failed attempt: a task whose only workers
        // were there failed within seconds of the cut.
        let mut candidates = CandidatesBuilder::with_capacity(permitted.len());
        // Asked once per node, not per agent: a node may run thousands of agents.
        let mut connected: HashMap<&str, bool> = HashMap::new();
        for a in &permitted {
            let (mut capacity, mut load) = (a.capability.capacity.max(1), a.load);
            let room = self.refusals.room(a.agent, now);
            let unreachable = !*connected
                .entry(&*a.node)
                .or_insert_with(|| *a.node == *self.mesh.node() || self.mesh.is_connected(&a.node));
            if a.health == Health::Unhealthy || room == Room::None || unreachable {
                load = capacity;
                candidates.push_named(a.agent, &a.node, capacity, load);
                continue;
            }
            if room == Room::One {
                capacity = capacity.min(load.saturating_add(1));
            }
            if let Some(rate) = policy.rate_per_agent(a.group) {
                // An agent at its rate limit takes no more than its tokens allow.
                let tokens = self.limiter.tokens(a.agent, rate, now);
                let room = capacity.min(load.saturating_add(tokens));
                if room <= load {
                    load = capacity; // No token left: it looks full, so segments wait.
                } else {
                    capacity = room;
                }
            }
            candidates.push_named(a.agent, &a.node, capacity, load);
        }
        if found.is_empty() {
            let unwatched = ractor::call!(self.discovery, |reply| DiscoveryMsg::CountUnwatched {
                capability: capability.to_string(),
                tags: tags.to_vec(),
                reply,
            })
            .unwrap_or(0);
            Offer::NoneCapable {
                unwatched: unwatched > 0,
            }
        } else if permitted.is_empty() {
            let mut groups: Vec<u16> = found.iter().map(|a| a.group).collect();
            groups.sort_unstable();
            groups.dedup();
            Offer::Denied { groups }
        } else {
            Offer::Workers(candidates.build())
        }
    }

    async fn on_acp(&mut self, peer: &str, message: Message) {
        let header = message.header;
        let report = match Payload::decode(header.msg_type, &message.body) {
            Ok(Payload::Report(r)) => r,
            Ok(other) => {
                return debug!(%peer, msg_type = %other.msg_type(), "not for the coordinator")
            }
            Err(e) => return warn!(%peer, error = %e, "REPORT refused"),
        };
        let given = self
            .attempts
            .get(&report.task)
            .and_then(|a| a.get(&(report.segment, report.attempt)));
        match given {
            Some((agent, node)) if *agent == header.agent && &**node == peer => {}
            Some(_) => {
                metrics::counter!("agentmesh_reports_refused_total", "reason" => "not_its_attempt")
                    .increment(1);
                return warn!(%peer, agent = header.agent, task = %report.task, "REPORT for an attempt given to another agent");
            }
            None => {
                // An attempt of a task already ended, or never ours: a worker paused or
                // cut off past its reallocation reports late.
                metrics::counter!("agentmesh_reports_refused_total", "reason" => "no_such_attempt")
                    .increment(1);
                return debug!(%peer, task = %report.task, segment = report.segment, attempt = report.attempt, "REPORT for no current attempt");
            }
        }
        self.on_report(header.agent, report).await;
    }

    async fn on_report(&mut self, agent: u32, report: Report) {
        let now = self.now_ms();
        let (task, segment, attempt) = (report.task, report.segment, report.attempt);
        if report.is_final() {
            if let Some(meta) = self.tasks.get_mut(&task) {
                meta.progress.remove(&segment);
            }
        }
        if let Some(output) = report.output {
            match self
                .ledger
                .handle_result(task, segment, attempt, output.to_vec())
            {
                ResultVerdict::Accepted => {
                    metrics::counter!("agentmesh_segments_completed_total").increment(1);
                    if let Some(meta) = self.tasks.get_mut(&task) {
                        meta.done_log.push(segment);
                        self.dirty.insert(task);
                    }
                    if let (Some(recorder), Some(t0)) = (
                        &self.recorder,
                        self.allocated_ms
                            .get_mut(&task)
                            .and_then(|a| a.remove(&(segment, attempt))),
                    ) {
                        recorder.observe(Observation::SegmentDone {
                            task,
                            work_ms: now.saturating_sub(t0),
                        });
                    }
                }
                verdict => {
                    if verdict == ResultVerdict::Duplicate {
                        metrics::counter!("agentmesh_results_discarded_total").increment(1);
                    }
                    debug!(%task, segment, attempt, ?verdict, "result discarded")
                }
            }
            // Its worker is free: offer it work now, not at the next tick (a worker
            // waited 25 ms on average between segments, and a task of short segments
            // on few workers ran at 20 segments a second per worker).
            self.assign_waiting(Pass::UntilFull).await;
        } else if report.error.is_none() {
            if let Some(meta) = self.tasks.get_mut(&task) {
                meta.progress
                    .insert(segment, report.progress_permille.min(1000));
            }
        }
        if let Some(error) = report.error {
            match report.refused {
                Some(refusal) => {
                    if !self
                        .ledger
                        .handle_refusal(task, segment, attempt, &error, now)
                    {
                        // A copy (sent again after a lost connection), or late: it
                        // changes nothing, and does not keep the agent out again.
                        return debug!(%task, segment, attempt, agent, "refusal of an attempt that had ended");
                    }
                    info!(%task, segment, attempt, agent, ?refusal, %error, "allocation refused by the worker's node");
                    metrics::counter!("agentmesh_allocations_refused_total", "refused" => refusal.name())
                        .increment(1);
                    if let Some(meta) = self.tasks.get(&task) {
                        self.refusals.record(
                            meta.group,
                            agent,
                            refusal,
                            report.retry_after_ms,
                            now,
                        );
                    }
                }
                None => {
                    info!(%task, segment, attempt, %error, "attempt failed");
                    if let Some(recorder) = &self.recorder {
                        if error.starts_with(crate::worker::PANICKED) {
                            recorder.observe(Observation::AgentPanicked { agent });
                        }
                    }
                    self.ledger
                        .handle_failure(task, segment, attempt, &error, now);
                }
            }
            self.assign(task).await;
        }
    }

    /// Carries out what the ledger asked for.
    async fn drain(&mut self) {
        while let Some(output) = self.ledger.poll() {
            match output {
                LedgerOutput::Allocate {
                    task,
                    segment,
                    attempt,
                    agent,
                    node,
                } => {
                    let Some(meta) = self.tasks.get(&task) else {
                        continue;
                    };
                    // Its standby learns that it runs (see `Replica::running_told`).
                    if meta.replica.opened && !meta.replica.running_told {
                        self.dirty.insert(task);
                    }
                    let allocate = Allocate {
                        target: agent,
                        task,
                        segment,
                        attempt,
                        capability: meta.capability.clone(),
                        timeout_ms: self
                            .ledger
                            .segment_timeout_ms(task)
                            .min(u64::from(u32::MAX)) as u32,
                        input: meta
                            .inputs
                            .get(segment as usize)
                            .cloned()
                            .unwrap_or_default(),
                        peers: self.ledger.holders(task),
                        params: meta.params.clone(),
                    };
                    // The task's priority orders ALLOCATEs within the coordination lane
                    // and the worker's queue.
                    let prio = allocate_prio(meta.priority);
                    let Some(message) =
                        encode(Payload::Allocate(allocate), 0, meta.group, Some(prio))
                    else {
                        continue;
                    };
                    self.attempts
                        .entry(task)
                        .or_default()
                        .insert((segment, attempt), (agent, node.clone()));
                    metrics::counter!("agentmesh_attempts_started_total").increment(1);
                    if self.recorder.is_some() {
                        let now = self.now_ms();
                        self.allocated_ms
                            .entry(task)
                            .or_default()
                            .insert((segment, attempt), now);
                    }
                    let group = self.agent_groups.get(&agent).copied().unwrap_or(0);
                    if let Some(rate) = self.policy.get().rate_per_agent(group) {
                        let now = self.now_ms();
                        let _ = self.limiter.allow(agent, rate, now);
                    }
                    self.send(node, message, Sending::Allocate((task, segment, attempt)))
                        .await;
                }
                LedgerOutput::Cancel {
                    task,
                    segment,
                    attempt,
                    agent,
                    node,
                } => {
                    debug!(%task, segment, attempt, agent, %node, "cancelling an attempt");
                    let group = self.tasks.get(&task).map_or(0, |m| m.group);
                    let adjust = Adjust {
                        target: agent,
                        task,
                        segment: Some(segment),
                        params: Default::default(),
                        priority: None,
                        cancel: true,
                        attempt: Some(attempt),
                    };
                    if let Some(mut message) = encode(Payload::Adjust(adjust), 0, group, None) {
                        message.header.flags = message.header.flags.with(Flags::URGENT);
                        self.send(node, message, Sending::Cancel((task, segment, attempt)))
                            .await;
                    }
                }
                LedgerOutput::Reallocated { task, segment } => {
                    metrics::counter!("agentmesh_segments_reallocated_total").increment(1);
                    debug!(%task, segment, "segment waits for a worker again");
                }
                LedgerOutput::TaskCompleted {
                    task,
                    results,
                    figures,
                } => self.finish(task, TaskStatus::Completed, None, figures, results),
                LedgerOutput::TaskFailed {
                    task,
                    reason,
                    figures,
                } => self.finish(task, TaskStatus::Failed, Some(reason), figures, Vec::new()),
            }
        }
    }

    fn finish(
        &mut self,
        task: Uuid,
        status: TaskStatus,
        reason: Option<String>,
        figures: TaskFigures,
        results: Vec<Vec<u8>>,
    ) {
        self.attempts.remove(&task);
        let Some(meta) = self.tasks.remove(&task) else {
            return;
        };
        if let Some(recorder) = &self.recorder {
            self.allocated_ms.remove(&task);
            recorder.observe(Observation::TaskEnded { task });
        }
        let so_far = meta.so_far(&figures);
        let elapsed_ms = so_far.elapsed_ms;
        info!(%task, ?status, completed = figures.completed, reallocated = so_far.reallocated, duplicates = so_far.duplicates_discarded, elapsed_ms, reason = reason.as_deref().unwrap_or(""), "task ended");
        let label = match status {
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
        };
        metrics::counter!("agentmesh_tasks_total", "status" => label).increment(1);
        metrics::histogram!("agentmesh_task_duration_seconds", "status" => label)
            .record(meta.started.elapsed().as_secs_f64());
        let outcome = TaskOutcome {
            task,
            status,
            segments: figures.segments,
            completed: figures.completed,
            duplicates_discarded: so_far.duplicates_discarded,
            reallocated: so_far.reallocated,
            elapsed_ms,
            reason,
            results: results.into_iter().map(Blob).collect(),
            unknown: meta.moved,
            results_from: 0,
            more_results: false,
        };
        self.dirty.remove(&task);
        // Told even if its start is still on its way there: checkpoints to one standby
        // go one at a time, so the end arrives after the start.
        if let Some(standby) = meta.replica.standby {
            // What it may lack of the results: those accepted since it last answered.
            let unheld = (meta.replica.opened && !meta.replica.off)
                .then(|| meta.done_log.get(meta.replica.acked..).map(<[u32]>::to_vec))
                .flatten();
            if !self.forget_notices.push(standby.clone(), task, unheld) {
                debug!(%task, %standby, "too many task ends waiting for their standbys: this one is not told");
            }
        }
        // One that moved to another coordinator did not end: that one may later have
        // this node hold it, and take it over again.
        if !meta.moved {
            self.ended.record(outcome.clone(), self.now_ms());
        }
        meta.reply.send(outcome);
    }

    /// Node `node` is up in life `life`: tasks with no standby get one. If it
    /// restarted (a later life than one taken over, due to be, or whose tasks are held
    /// here), those lives have ended with nothing of theirs running, so what they left
    /// here is taken over now, lease or not, and a client may still have their lost
    /// tasks adopted here. The same life back (it was only held down) still holds its
    /// tasks. True if any was taken over.
    fn node_up(&mut self, node: &str, life: u64) -> bool {
        let node: Arc<str> = Arc::from(node);
        if *node == *self.mesh.node() || self.up.contains_key(&node) {
            return false;
        }
        self.up.insert(node.clone(), life);
        let due = self.takeovers_due.remove(&node).map(|(_, down)| down);
        let taken = self.taken_over_from.remove(&node);
        let now = self.now_ms();
        let ended = self.standby.take_over_ended(&node, life, now);
        let any = !ended.run.is_empty();
        if any || !ended.dropped.is_empty() || due.or(taken).is_some_and(|l| l < life) {
            // It restarted: its lives before this one.
            self.taken_over(&node, life.saturating_sub(1));
        }
        if any {
            info!(%node, tasks = ended.run.len(), "node restarted: taking over the tasks of its former life");
        }
        self.run_taken_over(&node, ended);
        for (task, meta) in &self.tasks {
            if meta.replica.standby.is_none() && !meta.replica.off {
                self.dirty.insert(*task);
            }
        }
        any
    }

    /// Notes that the tasks of `node`'s lives up to `life` held here were taken over
    /// (for [`CoordinatorState::adopts_from`]), within [`MAX_TAKEN_OVER_FROM`] nodes.
    fn taken_over(&mut self, node: &Arc<str>, life: u64) {
        if self.taken_over_from.len() < MAX_TAKEN_OVER_FROM
            || self.taken_over_from.contains_key(node)
        {
            self.taken_over_from.insert(node.clone(), life);
        }
    }

    /// Gives the attempts at nodes up that this node has had no connection to for
    /// [`CUT_OFF_MS`] to other workers, once per cut (a worker node that only this one
    /// cannot reach: the others keep it up, and its REPORTs would never arrive, so its
    /// segments waited for their 30 s timeout). A result it sends after the link heals
    /// is taken if the segment has none yet, else discarded as a duplicate, and the
    /// ALLOCATEs kept for it are not sent again. True if any was.
    async fn reallocate_from_cut_off(&mut self, now: u64) -> bool {
        let mut lost = 0;
        let cut: Vec<Arc<str>> = self
            .up
            .keys()
            .filter(|node| self.cut_offs.due(node, self.mesh.is_connected(node), now))
            .cloned()
            .collect();
        for node in cut {
            self.to_sender(ToSender::NodeGone(node.clone())).await;
            let n = self.ledger.handle_node_cut_off(&node, now);
            if n > 0 {
                warn!(%node, attempts = n, "no connection to the node, which others hold up: reallocating its segments");
                metrics::counter!("agentmesh_cut_off_reallocations_total").increment(n as u64);
                lost += n;
            }
        }
        lost > 0
    }

    /// A node is down in life `life`: the tasks held for it are taken over, and the
    /// tasks it was standby for go to another.
    fn node_down(&mut self, node: &str, life: u64) {
        self.up.remove(node);
        self.cut_offs.forget(node);
        self.given_up.remove(node);
        self.in_flight.forget(node);
        let down: Arc<str> = Arc::from(node);
        self.move_tasks_off(&down);
        self.take_over_from(down, life);
    }

    /// The tasks `node` is standby for go to another, from their start: `node` is down,
    /// or given up on. Its lease is forgotten; its copies are dropped when it is back
    /// (held down or cut off, it still holds them, and would take them over too when
    /// this node goes down, as the next standby would).
    fn move_tasks_off(&mut self, node: &Arc<str>) {
        self.leases.forget(node);
        self.fence_logged.remove(node);
        self.unanswered_since.remove(node);
        for (task, meta) in &mut self.tasks {
            if meta.replica.standby.as_ref() == Some(node) {
                if meta.replica.held_ms.is_some()
                    && !self.forget_notices.push(node.clone(), *task, None)
                {
                    debug!(%task, standby = %node, "too many notices waiting: the former standby is not told the task moved");
                }
                meta.replica = Replica::default();
                self.dirty.insert(*task);
            }
        }
    }

    /// Takes over the tasks held for `node`, down in life `life`, unless the lease
    /// granted to it still runs: then they are taken over when it ends, if `node` is
    /// still down (or at once if it is back in a later life).
    fn take_over_from(&mut self, node: Arc<str>, life: u64) {
        let now = self.now_ms();
        match self.standby.take_over(&node, life, now) {
            Ok(takeover) => {
                self.takeovers_due.remove(&node);
                self.taken_over(&node, life);
                self.run_taken_over(&node, takeover);
            }
            Err(until) => {
                if !self.takeovers_due.contains_key(&node) {
                    info!(%node, in_ms = until - now, "node down: its tasks held here are taken over when the lease granted to it ends");
                }
                self.takeovers_due.insert(node, (until, life));
            }
        }
    }

    /// Takes over the tasks of nodes still down whose lease has ended.
    fn takeovers_now_due(&mut self, now: u64) {
        let due: Vec<(Arc<str>, u64)> = self
            .takeovers_due
            .iter()
            .filter(|(_, (until, _))| *until <= now)
            .map(|(node, (_, life))| (node.clone(), *life))
            .collect();
        for (node, life) in due {
            self.take_over_from(node, life);
        }
    }

    /// Runs the tasks of a takeover from `node`, and drops those whose copies here may
    /// be outdated: their clients, if waiting here, are told to ask the other nodes.
    fn run_taken_over(&mut self, node: &str, takeover: Takeover) {
        if !takeover.dropped.is_empty() {
            warn!(%node, tasks = takeover.dropped.len(), unheard_ms = takeover.unheard_ms, "not taking over the tasks held for the node: it was last heard from too long before, and may have given them to another standby");
            metrics::counter!("agentmesh_standby_copies_dropped_total")
                .increment(takeover.dropped.len() as u64);
        }
        for task in takeover.dropped {
            if let Some(waiters) = self.standby_waiters.remove(&task) {
                let reason = format!(
                    "task {task} is no longer held here: node {node} went down long after it was last heard from, and may have given it to another standby"
                );
                waiters.send(not_here(task, reason));
            }
        }
        for (task, held) in takeover.run {
            self.take_over(task, held, node);
        }
    }

    /// Runs a task held for `node`, which went down, from where that node left it.
    fn take_over(&mut self, task: Uuid, held: HeldTask, node: &str) {
        let waiters = self.standby_waiters.remove(&task).unwrap_or_default();
        if let Some(meta) = self.tasks.get_mut(&task) {
            // Submitted here too meanwhile: it runs here already.
            meta.reply.join(waiters);
            return;
        }
        let generation = held.open.generation.saturating_add(1);
        let request = held.open.request;
        let segments = request.inputs.len() as u32;
        let done_log: Vec<u32> = held.done.keys().copied().collect();
        let done_count = done_log.len() as u32;
        let first_attempt = generation
            .saturating_mul(GENERATION_ATTEMPTS)
            .saturating_add(1);
        let now = self.now_ms();
        if let Err(e) = self
            .ledger
            .resume(task, segments, held.done, first_attempt, now)
        {
            return warn!(%task, error = %e, "a task held for a node that went down could not be taken over");
        }
        if let Some(timeout_ms) = request.segment_timeout_ms {
            self.ledger.set_segment_timeout(task, timeout_ms);
        }
        info!(%task, from = %node, done = done_log.len(), segments, "took over a task from a node that went down");
        metrics::counter!("agentmesh_tasks_taken_over_total").increment(1);
        let priority = request
            .priority
            .unwrap_or_else(|| self.policy.get().priority(request.group));
        let mut meta = TaskMeta::new(request, priority, now, waiters, generation, done_log);
        meta.params = held.params;
        // The time since its last checkpoint here counts too: the former coordinator
        // ran it until it went down. So do the attempts it had running then, as of
        // that checkpoint: they start again here.
        let left = segments.saturating_sub(done_count);
        meta.before = SoFar {
            elapsed_ms: held.so_far.elapsed_ms + now.saturating_sub(held.so_far_ms),
            reallocated: held.so_far.reallocated + u64::from(held.so_far.running.min(left)),
            duplicates_discarded: held.so_far.duplicates_discarded,
            running: 0,
        };
        self.ledger.set_rank(task, meta.rank());
        self.tasks.insert(task, meta);
        self.dirty.insert(task);
    }

    /// Takes another coordinator's checkpoint, from node `peer`, as its standby. A node
    /// speaks only for itself: a checkpoint naming another node as the tasks'
    /// coordinator is refused whole (it could otherwise have tasks held, and taken
    /// over, in that node's name, or end them here).
    fn hold(&mut self, peer: &str, checkpoint: Checkpoint) -> CheckpointAck {
        let primary = checkpoint.primary.clone();
        if primary != peer {
            warn!(%peer, claimed = %primary, "refused a checkpoint from a node for another node's tasks");
            metrics::counter!("agentmesh_checkpoints_refused_total").increment(1);
            return CheckpointAck {
                refused: checkpoint.tasks.iter().map(|t| t.task).collect(),
                ..CheckpointAck::default()
            };
        }
        // A task that runs here is not held: its sender is a coordinator of it from
        // before a takeover here, back from being held down. Unless the sender's copy
        // is of a later coordinator than this one's (a higher generation): then this
        // one is that earlier coordinator, and its copy gives way (below). A task that
        // ended here is not held again either, or its former coordinator would have it
        // held for a second takeover. (One that moved from here to its standby is not
        // among those ended here.)
        let superseded: Vec<Uuid> = checkpoint
            .tasks
            .iter()
            .filter(|part| {
                let (Some(open), Some(meta)) = (&part.open, self.tasks.get(&part.task)) else {
                    return false;
                };
                open.generation > meta.generation
            })
            .map(|part| part.task)
            .collect();
        let (tasks, ended) = (&self.tasks, &self.ended);
        let now = self.now_ms();
        let ack = match self.standby.apply(
            checkpoint,
            |t| {
                (tasks.contains_key(&t) && !superseded.contains(&t))
                    || !matches!(ended.get(t, now), Ended::Unknown)
            },
            now,
        ) {
            Ok(ack) => ack,
            Err(stale) => {
                // Its sender ignores any answer to it (it has sent a later one): an
                // empty answer, with no lease.
                debug!(%peer, %stale, "dropped a checkpoint older than one applied");
                metrics::counter!("agentmesh_checkpoints_stale_total").increment(1);
                return CheckpointAck::default();
            }
        };
        for task in superseded {
            let Some(meta) = self.tasks.get_mut(&task) else {
                continue;
            };
            warn!(%task, node = %primary, "node took the task over while this node was held down, and runs it now: this node's copy, of an earlier coordinator, ends");
            // Its client is told the task is not here, and asks the others.
            meta.moved = true;
            self.ledger.fail_task(
                task,
                format!(
                    "taken over by node {primary} while this node was held down; it runs there now"
                ),
            );
        }
        // Clients waiting here for a task that has now ended at its coordinator: they
        // get the outcome it sent along, if it did, or are told to ask the others.
        let gone: Vec<Uuid> = self
            .standby_waiters
            .keys()
            .filter(|t| !self.standby.holds(**t) && !self.tasks.contains_key(t))
            .copied()
            .collect();
        let now = self.now_ms();
        for task in gone {
            let Some(waiters) = self.standby_waiters.remove(&task) else {
                continue;
            };
            if let Some(outcome) = self.standby.outcome(task, now) {
                info!(%task, node = %primary, "a client waiting here gets the outcome of the task, which ended at its coordinator");
                waiters.send(outcome.clone());
            } else {
                let reason = format!(
                    "task {task} is no longer held here: node {primary} ended it (and keeps its outcome) or gave it to another standby"
                );
                waiters.send(not_here(task, reason));
            }
        }
        ack
    }

    /// The standby for this node's tasks: the first node up after this one, in name
    /// order (all of a coordinator's tasks go to one standby, in one checkpoint).
    fn pick_standby(&self) -> Option<Arc<str>> {
        let usable = self
            .up
            .keys()
            .filter(|n| !self.given_up.contains(*n))
            .map(|n| &**n);
        let standby = standby_among(self.mesh.node(), usable)?;
        self.up.get_key_value(standby).map(|(n, _)| n.clone())
    }

    /// Sends each standby with no checkpoint in flight what it does not have yet, and
    /// renews the leases due.
    fn checkpoint(&mut self) {
        let now = self.now_ms();
        let standby = self.pick_standby();
        // A lease is asked of the standby before any task goes there, and kept while
        // it is this node's standby, so that a new task need not wait for one.
        let first = standby
            .as_ref()
            .is_some_and(|s| !self.leases.knows(s) && !self.in_flight.blocks(s, now));
        let renew = first || self.leases.standbys().any(|s| self.leases.due(s, now));
        // Whether a checkpoint may go to a node now (for the notices waiting for it).
        let (up, in_flight) = (&self.up, &self.in_flight);
        let ready = |n: &str| up.contains_key(n) && !in_flight.blocks(n, now);
        if self.dirty.is_empty() && !self.forget_notices.any_for(ready) && !renew {
            return;
        }
        if self.up.keys().all(|n| self.in_flight.blocks(n, now)) {
            return; // Nowhere to send now (checked once per message handled).
        }
        // A checkpoint is one message: what does not fit in it waits for the next.
        let budget = self
            .mesh
            .max_message_bytes()
            .saturating_sub(CHECKPOINT_SLACK);
        // The tasks' parts stop at `fill` (past it by one start or result at most), so
        // that the notices of tasks' ends find room beside them.
        let fill = CHECKPOINT_BYTES.min(budget / 2);
        let mut batches: HashMap<Arc<str>, Batch> = HashMap::new();
        // Tasks whose start, or next result, is longer than any checkpoint carries.
        let mut too_long = Vec::new();
        // Starts first, the oldest first: a task is allocated only once its standby
        // holds its start, and a long one, which fits only a checkpoint with room for
        // it, must not wait behind a stream of other tasks' parts for good. (Only the
        // starts are sorted: this runs after every message the coordinator handles,
        // and the starts are few, each sent once.)
        // Unless every task is held back by a checkpoint in flight, as the last pass
        // found them (what `dirty.rs` tells without a pass over them all).
        let worth = {
            let (tasks, in_flight, dirty) = (&self.tasks, &self.in_flight, &mut self.dirty);
            let goes = |t| {
                let replica = &tasks.get(&t).filter(|m| !m.replica.off)?.replica;
                replica.standby.clone().or_else(|| standby.clone())
            };
            dirty.worth_a_pass(standby.as_ref(), |n| in_flight.blocks(n, now), goes)
        };
        let (mut starts, rest): (Vec<Uuid>, Vec<Uuid>) = match worth {
            true => self
                .dirty
                .iter()
                .partition(|t| self.tasks.get(t).is_some_and(|m| !m.replica.opened)),
            false => (Vec::new(), Vec::new()),
        };
        starts.sort_by_cached_key(|t| self.tasks.get(t).map(|m| m.submitted_ms));
        // The standbys that held back a task of this pass or took one; whether a task
        // was left for want of room.
        let mut held_by: Vec<Arc<str>> = Vec::new();
        let mut hold = |node: &Arc<str>| {
            if !held_by.contains(node) {
                held_by.push(node.clone());
            }
        };
        let mut no_room = false;
        for task in starts.into_iter().chain(rest) {
            let Some(meta) = self.tasks.get_mut(&task) else {
                self.dirty.remove(&task);
                continue;
            };
            if meta.replica.off {
                self.dirty.remove(&task);
                continue;
            }
            let node = match (&meta.replica.standby, &standby) {
                (Some(node), _) => node.clone(),
                (None, Some(node)) => {
                    meta.replica.standby = Some(node.clone());
                    // Its start goes there next: a notice to forget it from before
                    // (it moved away when the node was held down) must not undo that.
                    self.forget_notices.cancel(node, task);
                    node.clone()
                }
                // No other node: it waits for one to come up.
                (None, None) => {
                    self.dirty.remove(&task);
                    continue;
                }
            };
            // A standby met in this pass: it holds the task back, or takes it (a pass
            // that left a task for want of room is not remembered).
            hold(&node);
            if self.in_flight.blocks(&node, now) {
                continue;
            }
            let Batch {
                parts, sent, bytes, ..
            } = batches.entry(node).or_default();
            if *bytes >= fill {
                no_room = true;
                continue;
            }
            let opens = !meta.replica.opened;
            let open = opens.then(|| OpenTask {
                request: SubmitRequest {
                    capability: meta.capability.clone(),
                    tags: meta.tags.clone(),
                    priority: Some(meta.priority),
                    group: meta.group,
                    inputs: meta.inputs.iter().map(|b| Blob(b.to_vec())).collect(),
                    label: meta.label.clone(),
                    task: Some(task),
                    attach: false,
                    adopt_from: None,
                    waited_ms: 0,
                    segment_timeout_ms: self.ledger.own_segment_timeout_ms(task),
                    adopt_from_life: None,
                },
                generation: meta.generation,
            });
            let from = if opens { 0 } else { meta.replica.acked };
            let figures = self.ledger.figures(task).unwrap_or_default();
            let so_far = SoFar {
                running: self.ledger.running(task),
                ..meta.so_far(&figures)
            };
            let mut part =
                TaskCheckpoint::running(task, open, Vec::new(), so_far, Some(meta.priority));
            // Its parameters go with its start, and after that when they changed since
            // what the standby answered for: a part without them leaves them as they were.
            if opens || meta.changes > meta.replica.changes {
                part.params.clone_from(&meta.params);
            }
            let mut len = encoded_len(&part);
            let mut upto = from;
            for &segment in &meta.done_log[from..] {
                let result = self.ledger.result(task, segment).unwrap_or_default();
                let more = result.len() + DONE_BYTES;
                // One result of each task at least, if the message has room for it.
                if (*bytes + len >= fill && upto > from) || *bytes + len + more > budget {
                    break;
                }
                len += more;
                part.done.push((segment, Blob(result.to_vec())));
                upto += 1;
            }
            let stuck = upto == from && from < meta.done_log.len() && !opens;
            if *bytes == 0 && (len > budget || stuck) {
                too_long.push(task);
                continue;
            }
            if *bytes + len > budget {
                no_room = true;
                continue; // Its start waits for a checkpoint with room.
            }
            if opens {
                meta.replica.held_ms.get_or_insert(now);
            }
            *bytes += len;
            sent.push(SentPart {
                task,
                upto,
                opened: opens,
                changes: meta.changes,
                running: so_far.running > 0,
            });
            parts.push(part);
        }
        if worth {
            self.dirty
                .passed((!no_room).then_some(held_by), standby.clone());
        }
        for (node, ended) in self.forget_notices.take(ready) {
            let batch = batches.entry(node.clone()).or_default();
            let mut room = NoticeRoom {
                results: CHECKPOINT_BYTES,
                message: budget.saturating_sub(batch.bytes),
                empty: batch.parts.is_empty(),
            };
            let mut notices = Vec::new();
            // What this checkpoint tells, queued again if it may not have arrived.
            let mut told = Vec::new();
            for (task, unheld) in ended {
                match self.end_part(task, unheld.as_deref(), &mut room) {
                    EndPart::Notice(notice) => {
                        notices.push(notice);
                        told.push((task, unheld));
                    }
                    EndPart::Results { part, rest } => {
                        // The notice follows with the rest; should this checkpoint not
                        // arrive, all of them (a notice queued again takes in what it
                        // carried: `ForgetNotices::requeue`).
                        notices.push(part);
                        told.push((task, unheld));
                        if !self.forget_notices.push(node.clone(), task, Some(rest)) {
                            debug!(%task, standby = %node, "too many task ends waiting for their standbys: this one is not told");
                        }
                    }
                    EndPart::Later => {
                        if !self.forget_notices.push(node.clone(), task, unheld) {
                            debug!(%task, standby = %node, "too many task ends waiting for their standbys: this one is not told");
                        }
                    }
                }
            }
            batch.bytes = budget - room.message;
            // First in the checkpoint, as they were queued before anything else in it.
            batch.parts.splice(0..0, notices);
            batch.ended = told;
        }
        for task in too_long {
            self.cannot_checkpoint(task);
        }
        if renew {
            self.renewals(now, standby, &mut batches);
        }
        for (
            node,
            Batch {
                parts: tasks,
                ended,
                sent,
                renewal,
                ..
            },
        ) in batches
        {
            if tasks.is_empty() && !renewal {
                continue;
            }
            let number = self.in_flight.send(node.clone());
            let result_bytes: usize = tasks.iter().map(TaskCheckpoint::result_bytes).sum();
            metrics::counter!("agentmesh_checkpoint_result_bytes_total")
                .increment(result_bytes as u64);
            let checkpoint = Checkpoint {
                primary: self.mesh.node().to_string(),
                tasks,
                incarnation: self.incarnation,
                number,
                life: self.mesh.life(),
            };
            let (mesh, me) = (self.mesh.clone(), self.myself.clone());
            tokio::spawn(async move {
                let to = agentmesh_runtime::ActorAddr {
                    node: node.to_string(),
                    name: STANDBY_SERVICE.to_string(),
                };
                let answer = mesh
                    .ask_at::<Checkpoint, CheckpointAck>(&to, checkpoint, CHECKPOINT_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string());
                let _ = me.cast(CoordinatorMsg::CheckpointAnswered {
                    node,
                    sent,
                    ended,
                    sent_ms: now,
                    number,
                    answer,
                });
            });
        }
    }

    /// What goes to a standby in this checkpoint for `task`, which ended here or moved,
    /// within `room`: the notice to forget it ([`Self::end_notice`]), unless the standby
    /// lacks more of its results than `room` takes. Then those that fit go as for a
    /// running task, and the notice waits for the next checkpoint with the rest; if
    /// none fits, all of it waits. Before, the notice went at once without the
    /// outcome, and the standby kept none: a client whose coordinator's node went down
    /// before it had the outcome (or, since pages, all of it) was told it is lost.
    fn end_part(&self, task: Uuid, unheld: Option<&[u32]>, room: &mut NoticeRoom) -> EndPart {
        // Results and outcomes that fit beside the notice's own fields in what is left
        // of the message (whether they do, with the outcome's reason, `len` says).
        let mut results = room.results.min(room.message.saturating_sub(NOTICE_BYTES));
        let part = self.end_part_within(task, unheld, &mut results, room.empty);
        let len = match &part {
            EndPart::Notice(part) | EndPart::Results { part, .. } => encoded_len(part),
            EndPart::Later => return EndPart::Later,
        };
        if len <= room.message {
            room.take(len, results);
            return part;
        }
        if !room.empty {
            return EndPart::Later; // It waits for a checkpoint with room.
        }
        // Too long for any checkpoint: the notice goes without the outcome, and the
        // standby keeps none.
        let notice = self.end_notice(task, unheld, &mut 0);
        room.take(encoded_len(&notice), room.results);
        EndPart::Notice(notice)
    }

    /// [`Self::end_part`], with `results` bytes of results and outcomes at most, on
    /// top of one lacking result if the checkpoint is `empty` so far.
    fn end_part_within(
        &self,
        task: Uuid,
        unheld: Option<&[u32]>,
        results: &mut usize,
        empty: bool,
    ) -> EndPart {
        let Ended::Outcome(outcome) = self.ended_here(task) else {
            return EndPart::Notice(self.end_notice(task, unheld, results));
        };
        let complete = outcome.status == TaskStatus::Completed
            && outcome.results.len() == outcome.segments as usize;
        let Some(unheld) = unheld.filter(|_| complete) else {
            return EndPart::Notice(self.end_notice(task, unheld, results));
        };
        let size = |s: u32| {
            outcome
                .results
                .get(s as usize)
                .map_or(0, |r| r.0.len() + DONE_BYTES)
        };
        if unheld.iter().map(|&s| size(s)).sum::<usize>() <= *results {
            return EndPart::Notice(self.end_notice(task, Some(unheld), results));
        }
        // As many as fit, in order; one at least in a checkpoint with nothing else yet
        // (whether the message has room for it, `end_part` sees).
        let mut taken = 0;
        for &s in unheld {
            if size(s) > *results && !(taken == 0 && empty) {
                break;
            }
            *results = results.saturating_sub(size(s));
            taken += 1;
        }
        if taken == 0 {
            return EndPart::Later;
        }
        let done = unheld[..taken]
            .iter()
            .filter_map(|&s| Some((s, outcome.results.get(s as usize)?.clone())))
            .collect();
        let so_far = SoFar {
            running: 0,
            elapsed_ms: outcome.elapsed_ms,
            reallocated: outcome.reallocated,
            duplicates_discarded: outcome.duplicates_discarded,
        };
        EndPart::Results {
            part: TaskCheckpoint::running(task, None, done, so_far, None),
            rest: unheld[taken..].to_vec(),
        }
    }

    /// `task`'s start, or its next result, is longer than any checkpoint carries: it
    /// runs on without a standby, as one its standby refused, and a standby that holds
    /// its start is told to forget it (or it would run the task again should this
    /// node go down). Before, the checkpoint went anyway, was refused at the sender for
    /// its length at each retry, and the coordinator gave up on the standby after 5 s.
    fn cannot_checkpoint(&mut self, task: Uuid) {
        let Some(meta) = self.tasks.get_mut(&task) else {
            return;
        };
        warn!(%task, "the task's start, or a result of it, is longer than a checkpoint carries: it ends with this node if this node goes down");
        meta.replica.off = true;
        self.dirty.remove(&task);
        if let (Some(standby), Some(_)) = (&meta.replica.standby, meta.replica.held_ms.take()) {
            if !self.forget_notices.push(standby.clone(), task, None) {
                debug!(%task, %standby, "too many notices waiting: the standby is not told to forget the task");
            }
        }
    }

    /// The notice that tells a standby to forget `task`: whether the task ended here
    /// (rather than moved to another standby, or to the standby that took it over; a
    /// task that moved and then ended here ended too) and, while the ended-task cache
    /// has it and it fits in `room`, its outcome. When the standby holds all but the
    /// `unheld` segments' results, only those go, with the outcome less its results
    /// (`outcome_from_held`).
    fn end_notice(&self, task: Uuid, unheld: Option<&[u32]>, room: &mut usize) -> TaskCheckpoint {
        let mut notice = TaskCheckpoint {
            task,
            open: None,
            done: Vec::new(),
            ended: true,
            finished: false,
            outcome: None,
            outcome_from_held: None,
            so_far: SoFar::default(),
            priority: None,
            params: BTreeMap::new(),
        };
        match self.ended_here(task) {
            Ended::Outcome(outcome) => {
                notice.finished = true;
                let complete = outcome.status == TaskStatus::Completed
                    && outcome.results.len() == outcome.segments as usize;
                match unheld.filter(|_| complete) {
                    Some(unheld) => {
                        let done: Vec<(u32, Blob)> = unheld
                            .iter()
                            .filter_map(|&s| Some((s, outcome.results.get(s as usize)?.clone())))
                            .collect();
                        let bytes = done_bytes(&done) + done.len() * DONE_BYTES;
                        if bytes <= *room {
                            *room -= bytes;
                            notice.done = done;
                            notice.outcome_from_held = Some(outcome.without_results());
                        }
                    }
                    None => {
                        let bytes = outcome.result_bytes() + outcome.results.len() * DONE_BYTES;
                        if bytes <= *room {
                            *room -= bytes;
                            notice.outcome = Some(outcome.clone());
                        }
                    }
                }
            }
            Ended::Forgotten => notice.finished = true,
            Ended::Unknown => {}
        }
        notice
    }

    /// Adds a lease request to `batches` for each standby whose lease is due, and for
    /// `current` (the standby new tasks go to) if it has not answered yet, unless a
    /// checkpoint to it is in flight. A former standby that holds none of this node's
    /// tasks any more is forgotten instead; the scan of the tasks runs once per renewal.
    fn renewals(
        &mut self,
        now: u64,
        current: Option<Arc<str>>,
        batches: &mut HashMap<Arc<str>, Batch>,
    ) {
        let mut due: Vec<Arc<str>> = self
            .leases
            .standbys()
            .filter(|s| self.leases.due(s, now))
            .cloned()
            .collect();
        if let Some(current) = current.as_ref().filter(|s| !self.leases.knows(s)) {
            due.push(current.clone());
        }
        for standby in due {
            if self.in_flight.blocks(&standby, now) {
                continue;
            }
            let used = current.as_ref() == Some(&standby)
                || self.tasks.values().any(|m| {
                    m.replica.held_ms.is_some() && m.replica.standby.as_ref() == Some(&standby)
                });
            if used {
                batches.entry(standby).or_default().renewal = true;
            } else {
                self.leases.forget(&standby);
                self.fence_logged.remove(&standby);
            }
        }
    }

    /// Records what a standby has now, and the lease it granted, from the answer to
    /// the checkpoint in flight to it (any other is stale and ignored). Says what may
    /// be allocated now: every task, if the lease had lapsed and runs again; else the
    /// tasks whose start the standby now holds.
    fn checkpoint_answered(
        &mut self,
        node: Arc<str>,
        sent: Vec<SentPart>,
        ended: Vec<(Uuid, Unheld)>,
        sent_ms: u64,
        number: u64,
        answer: Result<CheckpointAck, String>,
    ) -> Unblocked {
        if !self.in_flight.answered(&node, number) {
            // Sent before `node` was last held down: what it answers was reset then,
            // and a later checkpoint may be in flight. The task ends it carried may
            // not have arrived (or were dropped there as stale): they go again.
            debug!(%node, "answer to a checkpoint sent before the node was down; ignored");
            let ended = self.not_given_to(&node, ended);
            self.forget_notices.requeue(node, ended);
            return Unblocked::Tasks(Vec::new());
        }
        let ack = match answer {
            Ok(ack) => ack,
            Err(e) => {
                debug!(%node, error = %e, "checkpoint not taken; sent again shortly");
                if self.up.contains_key(&node) {
                    let now = self.now_ms();
                    self.in_flight
                        .retry_at(node.clone(), now + CHECKPOINT_RETRY_MS);
                    let since = *self.unanswered_since.entry(node.clone()).or_insert(sent_ms);
                    // Not from before this node last ran again after a gap.
                    let since = since.max(self.resumed_ms);
                    if now.saturating_sub(since) >= STANDBY_GIVE_UP_MS
                        && self.given_up.insert(node.clone())
                    {
                        warn!(standby = %node, unanswered_ms = now - since, "gave up on the standby: it is up but has answered no checkpoint; its tasks go to another");
                        metrics::counter!("agentmesh_standbys_given_up_total").increment(1);
                        self.move_tasks_off(&node);
                    }
                }
                // Sent again once the node can take a checkpoint (up, and past the
                // retry time).
                let ended = self.not_given_to(&node, ended);
                self.forget_notices.requeue(node, ended);
                return Unblocked::Tasks(Vec::new());
            }
        };
        if self.given_up.remove(&node) {
            info!(standby = %node, "the standby given up on answers again: new tasks may go to it");
        }
        self.unanswered_since.remove(&node);
        let now = self.now_ms();
        let was_valid = self.leases.runs(&node, now);
        let granted = self.leases.granted(&node, sent_ms, ack.lease_ms);
        let mut opened_now = Vec::new();
        for SentPart {
            task,
            upto,
            opened,
            changes,
            running,
        } in sent
        {
            let Some(meta) = self.tasks.get_mut(&task) else {
                continue;
            };
            if meta.replica.standby.as_deref() != Some(&*node) {
                continue;
            }
            if opened && !meta.replica.opened {
                opened_now.push(task);
            }
            meta.replica.opened |= opened;
            meta.replica.acked = meta.replica.acked.max(upto);
            meta.replica.changes = meta.replica.changes.max(changes);
            meta.replica.running_told |= running;
            // Held there when this checkpoint arrived (unless the answer says not,
            // below): no takeover before that.
            meta.replica.held_ms = meta.replica.held_ms.max(Some(sent_ms));
            // Unless it changed again since this checkpoint was built (it was in
            // flight when `adjust` came): that goes in the next.
            if meta.standby_has_all()
                && (meta.replica.running_told || self.ledger.running(task) == 0)
            {
                self.dirty.remove(&task);
            }
        }
        // Only for tasks still given to `node` (not moved off since it was given up on).
        let mine = |meta: &&mut TaskMeta| meta.replica.standby.as_deref() == Some(&*node);
        for task in ack.unknown {
            if let Some(meta) = self.tasks.get_mut(&task).filter(mine) {
                meta.replica.opened = false;
                meta.replica.acked = 0;
                meta.replica.changes = 0;
                meta.replica.running_told = false;
                meta.replica.held_ms = None;
                self.dirty.insert(task);
            }
        }
        for task in ack.refused {
            if let Some(meta) = self.tasks.get_mut(&task).filter(mine) {
                warn!(%task, standby = %node, "the standby cannot hold the task: it ends with this node if this node goes down");
                meta.replica.off = true;
                meta.replica.held_ms = None;
                self.dirty.remove(&task);
            }
        }
        for task in ack.taken_over {
            if let Some(meta) = self.tasks.get_mut(&task) {
                warn!(%task, standby = %node, "the standby took the task over while this node was held down; it runs there now");
                // Its client is told the task is not here, and asks the others.
                meta.moved = true;
                self.ledger.fail_task(
                    task,
                    format!("taken over by node {node}, which held this node for down; it runs there now"),
                );
            }
        }
        if let Granted::AfterLapse { since_ms } = granted {
            // The standby may have taken over what it held before the lapse: each such
            // task waits until the standby has answered for it again.
            let mut waiting = 0;
            for (task, meta) in &self.tasks {
                let before = meta.replica.held_ms.is_some_and(|h| h < since_ms);
                if before && meta.replica.standby.as_deref() == Some(&*node) && !meta.moved {
                    self.dirty.insert(*task);
                    waiting += 1;
                }
            }
            if waiting > 0 {
                info!(standby = %node, tasks = waiting, "the lease from the standby had lapsed: its tasks wait until it answers for them again");
            }
        }
        let valid = self.leases.runs(&node, now);
        if valid {
            self.fence_logged.remove(&node);
        }
        if valid && !was_valid {
            return Unblocked::All;
        }
        // Those the answer says the standby does not hold after all wait on.
        opened_now.retain(|t| self.tasks.get(t).is_some_and(|m| m.replica.opened));
        Unblocked::Tasks(opened_now)
    }

    /// `tasks` less those given to `node` since (their start went there again, or
    /// will): a notice to forget one, queued again, would undo that.
    fn not_given_to(&self, node: &str, mut tasks: Vec<(Uuid, Unheld)>) -> Vec<(Uuid, Unheld)> {
        tasks.retain(|(t, _)| {
            self.tasks
                .get(t)
                .is_none_or(|m| m.replica.standby.as_deref() != Some(node))
        });
        tasks
    }

    async fn send(&self, node: Arc<str>, message: Message, what: Sending) {
        let out = Outgoing {
            node,
            message,
            what,
        };
        self.to_sender(ToSender::Frame(out)).await;
    }

    async fn to_sender(&self, item: ToSender) {
        if self.outbox.send(item).await.is_err() {
            warn!("the coordinator's sender has stopped");
        }
    }
}

/// What tells a client waiting here for `task` that it is not held here (`unknown`),
/// so that it asks the other nodes.
fn not_here(task: Uuid, reason: String) -> TaskOutcome {
    TaskOutcome {
        unknown: true,
        ..TaskOutcome::refused(task, 0, reason)
    }
}

/// Clients waiting for one task's outcome, each answered when it ends. Usually one; a
/// client that lost its connection and asked again is a second (the first's answer
/// goes nowhere), and so is another client given the same task id. Before, the one
/// who asked last took the place of the one before, whose request was dropped: with
/// a dropped request answered as unanswered, two clients waiting for one task would
/// take each other's place every second until it ended. At most [`MAX_WAITERS`]: past
/// that the one waiting longest is let go (its client, if still there, asks again).
#[derive(Default)]
pub(crate) struct Waiters(Vec<Waiter>);

/// See [`Waiters`].
const MAX_WAITERS: usize = 8;

impl Waiters {
    fn one(waiter: Waiter) -> Waiters {
        Waiters(vec![waiter])
    }

    fn add(&mut self, waiter: Waiter) {
        if self.0.len() >= MAX_WAITERS {
            self.0.remove(0);
        }
        self.0.push(waiter);
    }

    /// Adds `other`'s waiters after these.
    fn join(&mut self, other: Waiters) {
        for waiter in other.0 {
            self.add(waiter);
        }
    }

    /// Answers each with `outcome` (or its first page).
    fn send(self, outcome: TaskOutcome) {
        let mut waiters = self.0.into_iter().peekable();
        while let Some(waiter) = waiters.next() {
            match waiters.peek() {
                Some(_) => waiter.send(outcome.clone()),
                None => return waiter.send(outcome),
            }
        }
    }
}

/// A client waiting for a task's outcome: in this process, or over the network, where
/// an outcome longer than one message goes in pages (the first here, the rest asked
/// for with [`ResultsRequest`]s).
pub(crate) struct Waiter {
    reply: RpcReplyPort<TaskOutcome>,
    /// The longest message the client takes, if it is not in this process.
    max_message_bytes: Option<usize>,
}

impl Waiter {
    /// One in this process: it gets the whole outcome.
    fn whole(reply: RpcReplyPort<TaskOutcome>) -> Waiter {
        Waiter {
            reply,
            max_message_bytes: None,
        }
    }

    /// One over the network, on a node whose messages are at most `max_message_bytes`.
    fn paged(reply: RpcReplyPort<TaskOutcome>, max_message_bytes: usize) -> Waiter {
        Waiter {
            reply,
            max_message_bytes: Some(max_message_bytes),
        }
    }

    /// Answers with `outcome`, or its first page if it does not go whole.
    fn send(self, outcome: TaskOutcome) {
        let outcome = match self.max_message_bytes {
            Some(max) if !pages::fits(&outcome, max) => {
                metrics::counter!("agentmesh_task_result_pages_total").increment(1);
                pages::page(&outcome, 0, max)
            }
            _ => outcome,
        };
        let _ = self.reply.send(outcome);
    }
}

/// Sends frames in the order they were queued; a failed ALLOCATE fails its attempt. An
/// ALLOCATE sent is kept, and sent again on the next connection to its node if the one
/// it went on was lost ([`KeptFrames`]): before, an ALLOCATE lost with its connection
/// when the next came up within [`CUT_OFF_MS`] left its attempt waiting for the segment
/// timeout (30 s, or a task's own: a day at most). The worker node runs an attempt once
/// however often its ALLOCATE comes (`ended_attempts.rs`). ADJUSTs are kept and sent
/// again the same way ([`Sending::Cancel`], [`Sending::Adjust`]).
async fn send_frames(
    mesh: Mesh,
    mut queue: mpsc::Receiver<ToSender>,
    coordinator: ActorRef<CoordinatorMsg>,
) {
    let epoch = Instant::now();
    let now_ms = move || epoch.elapsed().as_millis() as u64;
    let mut allocates: KeptFrames<PeerHandle, (AttemptKey, Message)> = KeptFrames::new(ALLOCATES);
    // ADJUSTs are kept within the same bounds, apart: each kind is sent again, and
    // counted, on its own.
    let mut adjusts: KeptFrames<PeerHandle, (AttemptKey, Message)> = KeptFrames::new(ALLOCATES);
    let mut check = tokio::time::interval(ALLOCATES_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let out = tokio::select! {
            out = queue.recv() => match out {
                Some(ToSender::Frame(out)) => out,
                Some(ToSender::NodeGone(node)) => {
                    allocates.forget_node(&node);
                    adjusts.forget_node(&node);
                    continue;
                }
                None => return,
            },
            _ = check.tick(), if !allocates.is_empty() || !adjusts.is_empty() => {
                let now = now_ms();
                resend(&mesh, &mut allocates, now, &KEPT_ALLOCATES, |(_, m)| m).await;
                resend(&mesh, &mut adjusts, now, &KEPT_ADJUSTS, |(_, m)| m).await;
                continue;
            }
        };
        let Outgoing {
            node,
            message,
            what,
        } = out;
        let sent = match what {
            Sending::Allocate(attempt) => {
                let item = |m| (attempt, m);
                let sent = send_and_keep(
                    &mesh,
                    &mut allocates,
                    &KEPT_ALLOCATES,
                    &node,
                    message,
                    item,
                    now_ms(),
                )
                .await;
                if let Err(e) = &sent {
                    let _ = coordinator.cast(CoordinatorMsg::SendFailed {
                        attempt,
                        reason: e.to_string(),
                        unreachable: unreachable(e),
                    });
                }
                sent
            }
            Sending::Cancel(attempt) | Sending::Adjust(attempt) => {
                if matches!(what, Sending::Cancel(_)) {
                    allocates.forget(&node, |(a, _)| *a == attempt);
                }
                adjusts.forget(&node, |(a, _)| *a == attempt);
                let item = |m| (attempt, m);
                send_and_keep(
                    &mesh,
                    &mut adjusts,
                    &KEPT_ADJUSTS,
                    &node,
                    message,
                    item,
                    now_ms(),
                )
                .await
            }
        };
        if let Err(e) = sent {
            debug!(%node, error = %e, "frame not sent");
        }
    }
}

/// How the coordinator's sender names the ALLOCATEs it keeps.
const KEPT_ALLOCATES: Kind = Kind {
    what: "ALLOCATEs",
    resent: "agentmesh_allocates_resent_total",
    unkept: "agentmesh_allocates_unkept_total",
    keep_unsent: false,
};

/// How the coordinator's sender names the ADJUSTs it keeps.
const KEPT_ADJUSTS: Kind = Kind {
    what: "ADJUSTs",
    resent: "agentmesh_adjusts_resent_total",
    unkept: "agentmesh_adjusts_unkept_total",
    keep_unsent: true,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Every client waiting for a task gets its outcome, up to `MAX_WAITERS`: past
    /// that, the one waiting longest is let go (its request dropped, unanswered).
    #[test]
    fn each_waiter_gets_the_outcome_and_the_longest_waiting_is_let_go_past_the_bound() {
        let mut waiters = Waiters::default();
        let mut answers = Vec::new();
        for _ in 0..=MAX_WAITERS {
            let (tx, rx) = ractor::concurrency::oneshot();
            waiters.add(Waiter::whole(tx.into()));
            answers.push(rx);
        }
        let outcome = TaskOutcome::refused(Uuid::from_u128(7), 3, "ended".into());
        waiters.send(outcome.clone());
        let mut answers = answers.into_iter();
        let first = answers.next().map(|mut rx| rx.try_recv());
        assert!(matches!(first, Some(Err(_))), "{first:?}");
        for mut rx in answers {
            assert_eq!(rx.try_recv().ok(), Some(outcome.clone()));
        }
    }

    /// What a checkpoint counts for its parts is what they take encoded: `encoded_len`
    /// is the length `rmp_serde` writes, and a result adds at most `DONE_BYTES` to its
    /// part beside its own bytes, whatever the counts, lengths and segments (MessagePack's
    /// headers grow at 16 and 65,536 items, and at 256 and 65,536 bytes). An end
    /// notice's own fields take at most `NOTICE_BYTES`, its outcome's reason aside.
    #[test]
    fn a_checkpoint_counts_its_parts_at_their_most() {
        let so_far = SoFar {
            elapsed_ms: u64::MAX,
            reallocated: u64::MAX,
            duplicates_discarded: u64::MAX,
            running: u32::MAX,
        };
        let task = Uuid::from_u128(u128::MAX);
        let empty = TaskCheckpoint::running(task, None, Vec::new(), so_far, Some(255));
        let written = |part: &TaskCheckpoint| rmp_serde::to_vec_named(part).map_or(0, |b| b.len());
        assert_eq!(encoded_len(&empty), written(&empty));
        let cases = [1, 15, 16, 17, 300]
            .into_iter()
            .flat_map(|n| [0, 1, 255, 256, 65_535, 65_536].map(|bytes| (n, bytes)))
            .chain([(65_535, 0), (65_536, 1)]);
        for (count, bytes) in cases {
            let done = (0..count)
                .map(|i| (u32::MAX - i as u32, Blob(vec![1; bytes])))
                .collect();
            let part = TaskCheckpoint {
                done,
                ..empty.clone()
            };
            let len = encoded_len(&part);
            assert_eq!(len, written(&part), "{count} results of {bytes} bytes");
            let most = encoded_len(&empty) + count * (bytes + DONE_BYTES);
            assert!(
                len <= most,
                "{count} results of {bytes} bytes: {len} > {most}"
            );
        }
        let outcome = TaskOutcome {
            task,
            status: TaskStatus::Completed,
            segments: u32::MAX,
            completed: u32::MAX,
            duplicates_discarded: u64::MAX,
            reallocated: u64::MAX,
            elapsed_ms: u64::MAX,
            reason: None,
            results: Vec::new(),
            unknown: true,
            results_from: u32::MAX,
            more_results: true,
        };
        let notice = TaskCheckpoint {
            ended: true,
            finished: true,
            outcome_from_held: Some(outcome),
            ..empty
        };
        assert!(
            encoded_len(&notice) <= NOTICE_BYTES,
            "{}",
            encoded_len(&notice)
        );
    }
}
