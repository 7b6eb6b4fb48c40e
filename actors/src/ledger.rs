//! The coordinator's allocation ledger: which segment of which task runs where, in
//! which attempt, and what has completed. A state machine with no I/O and no clock:
//! inputs carry `now_ms`, outputs are values (allocations to send, attempts to cancel,
//! tasks finished, when to wake up). The live coordinator and the simulator run it.
//!
//! Exactly-once accounting over a weak transport: every attempt has a number; the
//! first result for a segment is accepted whichever attempt produced it (the work is
//! done), every later copy is counted and discarded, and attempts still running
//! elsewhere are cancelled.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use foldhash::fast::SeedableRandomState;
use foldhash::SharedSeed;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use uuid::Uuid;

/// A worker agent, as discovery lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its Agent ID.
    pub agent: u32,
    /// The node it runs on (shared with the registry's record).
    pub node: Arc<str>,
    /// Segments it runs at once.
    pub capacity: u32,
    /// Segments it reported in hand (its own view, from REPORTs or discovery).
    pub load: u32,
}

/// A list of capable workers that a driver offers to several tasks in one round (the
/// tasks that need the same capability). The ledger remembers the list it last found
/// with no free worker and which workers were freed since, so later tasks and rounds
/// look at those few instead of at every worker again: under overload a round would
/// otherwise cost waiting tasks × workers.
///
/// A list holds each node's name once and its workers as plain numbers (16 bytes
/// each), so building and dropping a list of 100,000 workers touches no reference
/// count per worker, and a worker drawn at random is one small read.
#[derive(Clone, Debug)]
pub struct Candidates {
    /// Unique in the process: a list is never mistaken for another one that happens
    /// to sit at the same address or to have the same length.
    id: u64,
    list: Arc<List>,
}

#[derive(Debug)]
struct List {
    /// The workers' nodes, each once.
    nodes: Vec<Arc<str>>,
    workers: Vec<Worker>,
    /// Agent ID -> position in `workers`, built the first time a full list has
    /// workers freed in it.
    index: std::sync::OnceLock<HashMap<u32, u32, foldhash::fast::FixedState>>,
}

/// A worker in a [`Candidates`] list; `node` is its node's place in the list's names.
#[derive(Clone, Copy, Debug)]
struct Worker {
    agent: u32,
    node: u32,
    capacity: u32,
    load: u32,
}

/// Builds a [`Candidates`] list worker by worker, keeping each node's name once.
#[derive(Debug, Default)]
pub struct CandidatesBuilder {
    nodes: Vec<Arc<str>>,
    /// Name -> place in `nodes`, for workers that do not come node by node (a list
    /// sorted by load mixes the nodes).
    places: HashMap<Arc<str>, u32, foldhash::fast::FixedState>,
    workers: Vec<Worker>,
}

impl CandidatesBuilder {
    /// Room for `workers` workers.
    pub fn with_capacity(workers: usize) -> CandidatesBuilder {
        CandidatesBuilder {
            workers: Vec::with_capacity(workers),
            ..CandidatesBuilder::default()
        }
    }

    /// Room for `more` workers.
    pub fn reserve(&mut self, more: usize) {
        self.workers.reserve(more);
    }

    /// Adds a worker: Agent ID, its node, segments it runs at once, segments in hand.
    pub fn push(&mut self, agent: u32, node: &Arc<str>, capacity: u32, load: u32) {
        // Workers of a registry's list come node by node, sharing their node's name:
        // the last name is nearly always the one, and the same allocation.
        let node = match self.nodes.last() {
            Some(last) if Arc::ptr_eq(last, node) => self.nodes.len() - 1,
            _ => self.place(node, || node.clone()),
        };
        self.push_at(agent, node, capacity, load);
    }

    /// [`push`](Self::push) for a node known by name only.
    pub fn push_named(&mut self, agent: u32, node: &str, capacity: u32, load: u32) {
        let node = self.place(node, || Arc::from(node));
        self.push_at(agent, node, capacity, load);
    }

    fn place(&mut self, node: &str, name: impl FnOnce() -> Arc<str>) -> usize {
        if self.nodes.last().is_some_and(|last| **last == *node) {
            return self.nodes.len() - 1;
        }
        if let Some(&i) = self.places.get(node) {
            return i as usize;
        }
        let name = name();
        self.places.insert(name.clone(), self.nodes.len() as u32);
        self.nodes.push(name);
        self.nodes.len() - 1
    }

    fn push_at(&mut self, agent: u32, node: usize, capacity: u32, load: u32) {
        self.workers.push(Worker {
            agent,
            node: node as u32,
            capacity,
            load,
        });
    }

    /// The list, ready to share.
    pub fn build(self) -> Candidates {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Candidates {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            list: Arc::new(List {
                nodes: self.nodes,
                workers: self.workers,
                index: std::sync::OnceLock::new(),
            }),
        }
    }
}

impl Candidates {
    /// Wraps a list for sharing across the tasks of a round.
    pub fn new(list: impl IntoIterator<Item = Candidate>) -> Candidates {
        let list = list.into_iter();
        let mut builder = CandidatesBuilder::with_capacity(list.size_hint().0);
        for c in list {
            builder.push(c.agent, &c.node, c.capacity, c.load);
        }
        builder.build()
    }

    /// A builder for the next list, empty, with this list's memory if nothing else
    /// holds it (a new list of 100,000 workers is 1.6 MB of fresh pages).
    pub fn into_builder(self) -> CandidatesBuilder {
        match Arc::try_unwrap(self.list) {
            Ok(mut list) => {
                list.nodes.clear();
                list.workers.clear();
                CandidatesBuilder {
                    nodes: list.nodes,
                    places: HashMap::default(),
                    workers: list.workers,
                }
            }
            Err(_) => CandidatesBuilder::default(),
        }
    }

    /// How many workers it lists.
    pub fn len(&self) -> usize {
        self.list.workers.len()
    }

    /// Whether it lists no worker.
    pub fn is_empty(&self) -> bool {
        self.list.workers.is_empty()
    }

    /// Its workers, in order.
    pub fn iter(&self) -> impl Iterator<Item = Candidate> + '_ {
        self.list.workers.iter().map(|w| Candidate {
            agent: w.agent,
            node: self.node(w).clone(),
            capacity: w.capacity,
            load: w.load,
        })
    }

    fn node(&self, w: &Worker) -> &Arc<str> {
        &self.list.nodes[w.node as usize]
    }

    fn position(&self, agent: u32) -> Option<&Worker> {
        let workers = &self.list.workers;
        let index = self.list.index.get_or_init(|| {
            let mut index = HashMap::with_capacity_and_hasher(workers.len(), Default::default());
            for (i, w) in workers.iter().enumerate() {
                index.entry(w.agent).or_insert(i as u32);
            }
            index
        });
        index.get(&agent).map(|&i| &workers[i as usize])
    }
}

/// Where a task stands in its coordinator's service order while it waits: highest
/// priority first, then the earliest submitted, then by task id, so the order is total
/// and the same live and simulated. Tasks of one `class` need the same candidate list
/// (capability, tags, group: [`need_class`]); a round can so leave out the rest of a
/// class once its list has no free worker ([`ServiceRound::skip_class`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rank {
    /// The need it shares with the other tasks of its class.
    pub class: u64,
    /// Its priority, 0..=255: higher first.
    pub priority: u8,
    /// When it was submitted, on the driver's clock: earlier first.
    pub since: u64,
}

impl Rank {
    /// A task's place among the waiting ones of its class.
    fn place(&self, task: Uuid) -> Place {
        (Reverse(self.priority), self.since, task)
    }
}

/// The class of tasks that need `capability` with `tags` in coordination group
/// `group`: a hash of the three (two needs sharing one would only make an offer round
/// that stops early for one of them stop early for the other too).
pub fn need_class(capability: &str, tags: &[String], group: u16) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x5e41_ce0d).hash_one((capability, tags, group))
}

/// A waiting task's key in its class: ordered as [`Rank`] says.
type Place = (Reverse<u8>, u64, Uuid);

/// The tasks with at least one segment pending, per class, in service order.
#[derive(Debug, Default)]
struct Waiting {
    classes: HashMap<u64, BTreeSet<Place>, foldhash::fast::FixedState>,
    len: usize,
}

impl Waiting {
    fn insert(&mut self, task: Uuid, rank: &Rank) {
        if self
            .classes
            .entry(rank.class)
            .or_default()
            .insert(rank.place(task))
        {
            self.len += 1;
        }
    }

    fn remove(&mut self, task: Uuid, rank: &Rank) {
        if let Some(class) = self.classes.get_mut(&rank.class) {
            if class.remove(&rank.place(task)) {
                self.len -= 1;
            }
            if class.is_empty() {
                self.classes.remove(&rank.class);
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.classes.values().flatten().map(|p| p.2)
    }
}

/// One pass over the waiting tasks in service order ([`Rank`]), the classes merged:
/// from [`Ledger::service_round`]. It reads the ledger as it is at each step, so the
/// driver may assign between steps; a task that stopped waiting meanwhile may still be
/// given (check [`Ledger::has_pending`]), and one that started waiting behind the
/// round's place in its class is given too. A step costs the classes in the round and
/// a lookup, not the waiting tasks: a round that stops at the first task of each class
/// whose list is full costs those few, however many wait behind them.
#[derive(Debug)]
pub struct ServiceRound {
    /// Each class left in the round, with the place of the next task it gives.
    heads: Vec<(Place, u64)>,
    /// The class of the task given last.
    last: Option<u64>,
}

impl ServiceRound {
    /// The next waiting task in service order, if any is left in the round.
    pub fn next(&mut self, ledger: &Ledger) -> Option<Uuid> {
        let (i, &(place, class)) = self.heads.iter().enumerate().min_by_key(|(_, h)| h.0)?;
        let after = ledger
            .waiting
            .classes
            .get(&class)
            .and_then(|set| set.range((Bound::Excluded(place), Bound::Unbounded)).next());
        match after {
            Some(next) => self.heads[i].0 = *next,
            None => {
                self.heads.swap_remove(i);
            }
        }
        self.last = Some(class);
        Some(place.2)
    }

    /// Leaves the rest of the last task's class out of this round: its list has no
    /// free worker, so they would find none either.
    pub fn skip_class(&mut self) {
        if let Some(class) = self.last {
            self.heads.retain(|h| h.1 != class);
        }
    }
}

/// Tuning of the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerConfig {
    /// How long an attempt may run before it is retried elsewhere, for a task with
    /// no timeout of its own ([`Ledger::set_segment_timeout`]).
    pub segment_timeout_ms: u64,
    /// Attempts per segment before the task fails.
    pub max_attempts: u32,
    /// Retries allowed on top of first attempts, in thousandths of them (Linkerd-style
    /// budget: 200 = 20 % extra load).
    pub retry_ratio_permille: u64,
    /// Retries always allowed per second, whatever the ratio says.
    pub retry_floor_per_sec: u64,
    /// Consecutive failures after which a worker is skipped for a while.
    pub breaker_failures: u32,
    /// How long a tripped worker is skipped.
    pub breaker_cooldown_ms: u64,
    /// How long a task may wait for a free capable worker before it fails: with a
    /// segment pending, none of its segments given a worker meanwhile, and no capable
    /// worker at work (with segments in hand and no failure here since its last
    /// success). A task queued behind work, its own or other tasks', waits for it.
    pub max_wait_ms: u64,
}

impl Default for LedgerConfig {
    fn default() -> LedgerConfig {
        LedgerConfig {
            segment_timeout_ms: 30_000,
            max_attempts: 5,
            retry_ratio_permille: 200,
            retry_floor_per_sec: 10,
            breaker_failures: 3,
            breaker_cooldown_ms: 5_000,
            max_wait_ms: 60_000,
        }
    }
}

/// Something the ledger asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerOutput {
    /// Send ALLOCATE for this attempt to this worker.
    Allocate {
        /// The task.
        task: Uuid,
        /// The segment.
        segment: u32,
        /// The attempt number, from 1.
        attempt: u32,
        /// The worker.
        agent: u32,
        /// Its node.
        node: Arc<str>,
    },
    /// Send ADJUST cancel: this attempt is no longer needed.
    Cancel {
        /// The task.
        task: Uuid,
        /// The segment.
        segment: u32,
        /// The attempt.
        attempt: u32,
        /// The worker.
        agent: u32,
        /// Its node.
        node: Arc<str>,
    },
    /// A segment's attempt ended without a result (its worker or node went down, it
    /// failed, it timed out) and the segment waits for a worker again. Nothing to send:
    /// this tells a driver when work was taken back, which the simulator's checker
    /// bounds after a crash.
    Reallocated {
        /// The task.
        task: Uuid,
        /// The segment.
        segment: u32,
    },
    /// Every segment has a result.
    TaskCompleted {
        /// The task.
        task: Uuid,
        /// Results in segment order.
        results: Vec<Vec<u8>>,
        /// Its figures at the end.
        figures: TaskFigures,
    },
    /// The task cannot complete.
    TaskFailed {
        /// The task.
        task: Uuid,
        /// Why, for people.
        reason: String,
        /// Its figures at the end.
        figures: TaskFigures,
    },
}

/// What the ledger made of a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultVerdict {
    /// The first result for the segment: counted.
    Accepted,
    /// The segment already had a result: discarded.
    Duplicate,
    /// No such task (finished or never known): discarded.
    UnknownTask,
    /// The ledger never started that attempt: discarded.
    UnknownAttempt,
}

/// Why a submission was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The task id is in use.
    #[error("task {0} is already known")]
    Duplicate(Uuid),
    /// A task needs at least one segment.
    #[error("a task needs at least one segment")]
    NoSegments,
}

/// Counters for reports and checkers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerStats {
    /// Segments whose result was accepted.
    pub segments_completed: u64,
    /// Result copies discarded because the segment was already done.
    pub duplicates_discarded: u64,
    /// Attempts started again elsewhere (failure, timeout, worker or node down).
    pub reallocated: u64,
    /// Retries the budget refused (the segment waited instead).
    pub retries_deferred: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SegmentState {
    /// Waiting for a worker (how long the task has waited is the task's
    /// `last_active_ms`).
    Pending {
        is_retry: bool,
    },
    /// An attempt is running (see `Segment::live`).
    Running,
    Done,
}

#[derive(Clone, Debug)]
struct Segment {
    state: SegmentState,
    /// Attempts started so far (counted from `base`).
    attempts: u32,
    /// Attempt numbers up to this one were a former coordinator's (see
    /// [`Ledger::resume`]); they do not count against the retry budget.
    base: u32,
    /// Of those, attempts the worker's node refused unrun (not failures).
    refused: u32,
    /// The attempt started and not yet finished or cancelled. There is at most one: an
    /// attempt starts only while the segment waits, and it waits again only once its
    /// attempt has ended.
    live: Option<Live>,
    result: Option<Vec<u8>>,
}

/// A segment's running attempt.
#[derive(Clone, Debug)]
struct Live {
    attempt: u32,
    agent: u32,
    node: Arc<str>,
    /// When it times out (its entry in `Ledger::deadlines`).
    deadline_ms: u64,
}

/// When running attempts time out, earliest first.
///
/// An attempt that ends leaves its entry behind, to be dropped when it reaches the
/// front (or when such entries are half the queue): a running attempt's deadline is
/// then one push onto the back, where an ordered map took an insertion and a removal,
/// each comparing 28-byte keys all the way down. An entry counts only while its
/// segment's running attempt has that deadline (`Deadlines::live`).
#[derive(Debug, Default)]
struct Deadlines {
    /// In time order; equal times in the order they came.
    queue: VecDeque<Deadline>,
    /// About how many entries of `queue` belong to attempts that ended (exact after a
    /// compaction; a duplicate entry can leave it high until the next).
    ended: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at_ms: u64,
    task: Uuid,
    segment: u32,
}

/// Below this many ended entries, the queue is not compacted: they go from the front.
const DEADLINES_COMPACT_MIN: usize = 64;

impl Deadlines {
    fn push(&mut self, d: Deadline) {
        // Deadlines are now plus a timeout, so they come in time order while the tasks
        // running share one timeout and the caller's clock does not go back. A task
        // with a timeout of its own, or a clock that steps back, goes in place: a
        // move of the entries after it (those of longer timeouts).
        if self.queue.back().is_none_or(|b| b.at_ms <= d.at_ms) {
            self.queue.push_back(d);
        } else {
            let i = self.queue.partition_point(|e| e.at_ms <= d.at_ms);
            self.queue.insert(i, d);
        }
    }

    /// The running attempt whose deadline `d` is, if it still runs.
    fn running<'a>(
        tasks: &'a HashMap<Uuid, Task, SeedableRandomState>,
        d: &Deadline,
    ) -> Option<&'a Live> {
        tasks
            .get(&d.task)?
            .segments
            .get(d.segment as usize)?
            .live
            .as_ref()
            .filter(|l| l.deadline_ms == d.at_ms)
    }

    /// True if `d` is the deadline of its segment's running attempt.
    fn live(tasks: &HashMap<Uuid, Task, SeedableRandomState>, d: &Deadline) -> bool {
        Deadlines::running(tasks, d).is_some()
    }

    /// Counts an attempt that ended, then drops ended entries from the front, and
    /// compacts the queue once they would be half of it, so it stays within about twice
    /// the running attempts.
    fn ended(&mut self, tasks: &HashMap<Uuid, Task, SeedableRandomState>) {
        self.ended += 1;
        while let Some(d) = self.queue.front() {
            if Deadlines::live(tasks, d) {
                break;
            }
            self.queue.pop_front();
            self.ended = self.ended.saturating_sub(1);
        }
        if self.ended >= DEADLINES_COMPACT_MIN && self.ended * 2 > self.queue.len() {
            self.queue.retain(|d| Deadlines::live(tasks, d));
            self.ended = 0;
        }
    }

    /// The earliest deadline of a running attempt: the front, since `ended` drops the
    /// entries of attempts that ended from there.
    fn next(&self, tasks: &HashMap<Uuid, Task, SeedableRandomState>) -> Option<u64> {
        let d = self.queue.front()?;
        debug_assert!(Deadlines::live(tasks, d), "an ended attempt at the front");
        Some(d.at_ms)
    }
}

#[derive(Clone, Debug)]
struct Task {
    segments: Vec<Segment>,
    done: u32,
    /// Segments in the `Pending` state.
    pending: u32,
    /// Task-level statistics.
    duplicates: u64,
    reallocated: u64,
    /// When it was last seen with a segment given a worker or running (at first, when
    /// it was submitted).
    last_active_ms: u64,
    /// No segment before this one waits (where an offer round starts looking).
    next_pending: u32,
    /// The agents running its attempts, with how many each (what [`Ledger::holders`]
    /// lists in every ALLOCATE, without a pass over the segments).
    holders: BTreeMap<u32, u32>,
    /// Its own segment timeout, if it has one (else the config's).
    segment_timeout_ms: Option<u64>,
    /// Its place in the service order while it waits.
    rank: Rank,
}

impl Task {
    fn hold(&mut self, agent: u32) {
        *self.holders.entry(agent).or_default() += 1;
    }

    fn unhold(&mut self, agent: u32) {
        if let std::collections::btree_map::Entry::Occupied(mut n) = self.holders.entry(agent) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }

    /// Since when the task has waited for a worker in vain, if a segment waits: since
    /// it was last seen with a segment running, or was submitted. A task with a segment
    /// running is not waiting in vain, however long its queue (100,000 segments on two
    /// workers, or segments longer than `max_wait_ms`): that segment ends or times out.
    /// (A segment starts waiting when the task is submitted or when one of its attempts
    /// ends, both of which count as seen running: so the longest-waiting segment never
    /// waits from earlier.) None if no segment waits. Constant time: it runs at every
    /// offer round, and a round follows every result.
    fn waiting_since_ms(&mut self, now_ms: u64) -> Option<u64> {
        if self.pending == 0 {
            return None;
        }
        let running = self.segments.len() as u32 - self.done - self.pending;
        if running > 0 {
            self.last_active_ms = self.last_active_ms.max(now_ms);
        }
        Some(self.last_active_ms)
    }

    fn figures(&self) -> TaskFigures {
        TaskFigures {
            segments: self.segments.len() as u32,
            completed: self.done,
            duplicates_discarded: self.duplicates,
            reallocated: self.reallocated,
        }
    }
}

/// Per-task figures, for `agentmesh submit --json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskFigures {
    /// Segments in the task.
    pub segments: u32,
    /// Distinct segments completed.
    pub completed: u32,
    /// Result copies discarded.
    pub duplicates_discarded: u64,
    /// Attempts started again elsewhere.
    pub reallocated: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Breaker {
    consecutive_failures: u32,
    open_until_ms: u64,
}

/// A shared candidate list seen with no eligible worker, and what may have changed
/// since. The list itself never changes; starting attempts and opening breakers only
/// make workers less eligible; so only a worker freed since, or a breaker reaching the
/// end of its cool-down, can make one eligible again.
#[derive(Debug)]
struct NoneFree {
    list: u64,
    /// Whether a worker of the list was at work when it was seen so ([`Full`]).
    working: bool,
    /// When the first breaker that kept a worker out closes (exclusive).
    until_ms: u64,
    /// Workers freed since (an attempt ended, a breaker closed), at most
    /// `FREED_TRACKED`: the only ones of the list that may be eligible now.
    freed: Vec<u32>,
}

/// No worker of a list is eligible now.
#[derive(Clone, Copy, Debug)]
struct Full {
    /// Some worker is at work: it has segments in hand and has not failed here since
    /// its last success. A task that waits for it is queued behind work, its own or
    /// other tasks' (of higher priority, or submitted earlier, or another
    /// coordinator's), not waiting in vain.
    working: bool,
}

/// Past this many freed workers, a full list is simply looked at again.
const FREED_TRACKED: usize = 32;

/// A sliding count over the last ten seconds, one bucket per second.
#[derive(Clone, Debug, Default)]
struct Window {
    buckets: [(u64, u64); 10],
}

impl Window {
    fn add(&mut self, now_ms: u64) {
        let sec = now_ms / 1000;
        let slot = &mut self.buckets[(sec % 10) as usize];
        if slot.0 != sec {
            *slot = (sec, 0);
        }
        slot.1 += 1;
    }

    fn count(&self, now_ms: u64) -> u64 {
        let sec = now_ms / 1000;
        self.buckets
            .iter()
            .filter(|(s, _)| sec.saturating_sub(*s) < 10 && *s <= sec)
            .map(|(_, n)| n)
            .sum()
    }
}

/// A segment of `task` left the Pending state: the task stops waiting with its last.
fn leave_pending(waiting: &mut Waiting, task: Uuid, rank: &Rank, pending: &mut u32) {
    *pending -= 1;
    if *pending == 0 {
        waiting.remove(task, rank);
    }
}

/// Why a segment waits for a worker again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Requeue {
    /// Its attempt failed or timed out: a retry, within the retry budget.
    Retry,
    /// Its attempt was lost with its worker or node: reallocated outside the budget.
    Lost,
    /// The worker's node refused the attempt unrun: neither a retry nor a reallocation.
    Refused,
}

/// Refusals (ALLOCATEs a worker's node turned down unrun) a segment may meet before
/// its task fails. Each sends the segment to another worker without counting as a
/// failed attempt; this bound keeps a segment from going round for ever.
pub const MAX_REFUSALS: u32 = 100;

/// The allocation ledger of one coordinator.
pub struct Ledger {
    config: LedgerConfig,
    tasks: HashMap<Uuid, Task, SeedableRandomState>,
    /// Workers this ledger has work on: agent -> segments in flight from here.
    in_flight: HashMap<u32, u32, SeedableRandomState>,
    breakers: HashMap<u32, Breaker, SeedableRandomState>,
    /// Tasks with at least one segment pending, in service order, so a coordinator's
    /// round looks at those rather than at every open task.
    waiting: Waiting,
    first_attempts: Window,
    retries: Window,
    rng: StdRng,
    outputs: VecDeque<LedgerOutput>,
    stats: LedgerStats,
    /// When each running attempt times out.
    deadlines: Deadlines,
    /// The last shared list seen with no eligible worker: under overload, the other
    /// tasks of a round, and the rounds after a worker is freed, look only at what may
    /// have changed instead of at every worker.
    none_free: Option<NoneFree>,
}

impl Ledger {
    /// An empty ledger; `seed` feeds the power-of-two-choices picks and its hash maps'
    /// hasher (foldhash: these maps are looked up for every result and every pick).
    pub fn new(config: LedgerConfig, seed: u64) -> Ledger {
        let hasher = SeedableRandomState::with_seed(seed, SharedSeed::global_fixed());
        Ledger {
            config,
            tasks: HashMap::with_hasher(hasher.clone()),
            in_flight: HashMap::with_hasher(hasher.clone()),
            breakers: HashMap::with_hasher(hasher),
            waiting: Waiting::default(),
            first_attempts: Window::default(),
            retries: Window::default(),
            rng: StdRng::seed_from_u64(seed),
            outputs: VecDeque::new(),
            stats: LedgerStats::default(),
            deadlines: Deadlines::default(),
            none_free: None,
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> LedgerStats {
        self.stats
    }

    /// Tasks not finished yet.
    pub fn open_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Figures of a task still open.
    pub fn figures(&self, task: Uuid) -> Option<TaskFigures> {
        self.tasks.get(&task).map(Task::figures)
    }

    /// How many live attempts `task` has (0 if it is not open).
    pub fn running(&self, task: Uuid) -> u32 {
        self.tasks
            .get(&task)
            .map_or(0, |t| t.holders.values().sum())
    }

    /// The agents holding live attempts of `task` (for SYNC rosters), each once.
    pub fn holders(&self, task: Uuid) -> Vec<u32> {
        self.tasks
            .get(&task)
            .map(|t| t.holders.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The live attempts of `task`: (segment, attempt, agent, node).
    pub fn live_attempts(&self, task: Uuid) -> Vec<(u32, u32, u32, Arc<str>)> {
        let Some(t) = self.tasks.get(&task) else {
            return Vec::new();
        };
        t.segments
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let l = s.live.as_ref()?;
                Some((i as u32, l.attempt, l.agent, l.node.clone()))
            })
            .collect()
    }

    /// Segments waiting for a worker, over every task (a pass over the tasks that
    /// wait: the coordinator reads it once a tick).
    pub fn pending_segments(&self) -> u64 {
        self.waiting
            .iter()
            .filter_map(|t| self.tasks.get(&t))
            .map(|t| u64::from(t.pending))
            .sum()
    }

    /// True if `task` has segments waiting for a worker.
    pub fn has_pending(&self, task: Uuid) -> bool {
        self.tasks.get(&task).is_some_and(|t| t.pending > 0)
    }

    /// The tasks with segments waiting for a worker (those for which `has_pending` is
    /// true), in no useful order: [`service_round`](Self::service_round) gives them in
    /// service order.
    pub fn waiting(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.waiting.iter()
    }

    /// How many tasks have segments waiting for a worker.
    pub fn waiting_tasks(&self) -> usize {
        self.waiting.len
    }

    /// A pass over the waiting tasks in service order ([`Rank`]).
    pub fn service_round(&self) -> ServiceRound {
        ServiceRound {
            heads: self
                .waiting
                .classes
                .iter()
                .filter_map(|(&class, set)| Some((*set.first()?, class)))
                .collect(),
            last: None,
        }
    }

    /// Sets where `task` stands in the service order (from its submission, it has
    /// class 0, priority 0 and `since` its submission time): the driver gives each
    /// task its need's class, and its priority again when that changes.
    pub fn set_rank(&mut self, task_id: Uuid, rank: Rank) {
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        if task.pending > 0 {
            self.waiting.remove(task_id, &task.rank);
            self.waiting.insert(task_id, &rank);
        }
        task.rank = rank;
    }

    /// Fails a task for a reason of the driver's (say, policy forbids every capable
    /// agent): its running attempts are cancelled, nothing more is accepted.
    pub fn fail_task(&mut self, task_id: Uuid, reason: String) {
        self.fail(task_id, reason);
    }

    /// No capable agent is offered for `task_id`. It is waited for, as a busy one is,
    /// until the task has waited `max_wait_ms` (see `Task::waiting_since_ms`), if agents are held for
    /// nodes membership has not reported up yet (`unwatched`: their list can arrive
    /// first), or if the task has run before (its capable agents were there, and their
    /// nodes went down or out of reach: a partition that cut the coordinator off from
    /// every one of them heals, a node restarts). A task that never found one fails at
    /// once, as it does after the wait.
    pub fn no_candidates(&mut self, task_id: Uuid, capability: &str, unwatched: bool, now_ms: u64) {
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        let Some(since_ms) = task.waiting_since_ms(now_ms) else {
            return;
        };
        let has_run = task.segments.iter().any(|s| s.attempts > 0);
        let waited = now_ms.saturating_sub(since_ms) >= self.config.max_wait_ms;
        let reason = if !unwatched && !has_run {
            format!("no agent offers capability {capability:?}")
        } else if !waited {
            return;
        } else if unwatched {
            format!(
                "no agent offers capability {capability:?} on a node seen up for {} ms",
                self.config.max_wait_ms
            )
        } else {
            format!(
                "no agent offering capability {capability:?} came back within {} ms",
                self.config.max_wait_ms
            )
        };
        self.fail(task_id, reason);
    }

    /// Takes the next thing to do.
    pub fn poll(&mut self) -> Option<LedgerOutput> {
        self.outputs.pop_front()
    }

    /// When the ledger next needs [`Ledger::handle_timeout`] (the earliest deadline).
    pub fn next_wakeup_ms(&self) -> Option<u64> {
        self.deadlines.next(&self.tasks)
    }

    /// Takes a task of `segments` segments; allocate with [`Ledger::assign`].
    pub fn submit(&mut self, task: Uuid, segments: u32, now_ms: u64) -> Result<(), SubmitError> {
        if segments == 0 {
            return Err(SubmitError::NoSegments);
        }
        if self.tasks.contains_key(&task) {
            return Err(SubmitError::Duplicate(task));
        }
        let rank = Rank {
            class: 0,
            priority: 0,
            since: now_ms,
        };
        let segment = Segment {
            state: SegmentState::Pending { is_retry: false },
            attempts: 0,
            base: 0,
            refused: 0,
            live: None,
            result: None,
        };
        self.tasks.insert(
            task,
            Task {
                segments: vec![segment; segments as usize],
                done: 0,
                pending: segments,
                duplicates: 0,
                reallocated: 0,
                last_active_ms: now_ms,
                next_pending: 0,
                holders: BTreeMap::new(),
                segment_timeout_ms: None,
                rank,
            },
        );
        self.waiting.insert(task, &rank);
        Ok(())
    }

    /// Takes over a task another coordinator ran: `done` holds the segments it had
    /// completed, with their results (accepted here as they were there), and the rest
    /// wait for workers. Attempt numbers start after `first_attempt - 1`, so no attempt
    /// started here has the number of one the former coordinator may still have
    /// running on a worker (workers know an attempt by task, segment and number); the
    /// retry budget counts from there. A task whose segments are all done completes at
    /// once.
    pub fn resume(
        &mut self,
        task_id: Uuid,
        segments: u32,
        done: impl IntoIterator<Item = (u32, Vec<u8>)>,
        first_attempt: u32,
        now_ms: u64,
    ) -> Result<(), SubmitError> {
        self.submit(task_id, segments, now_ms)?;
        let base = first_attempt.saturating_sub(1);
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return Ok(());
        };
        for seg in &mut task.segments {
            seg.attempts = base;
            seg.base = base;
        }
        for (segment, result) in done {
            let Some(seg) = task.segments.get_mut(segment as usize) else {
                continue;
            };
            if seg.state == SegmentState::Done {
                continue;
            }
            seg.state = SegmentState::Done;
            seg.result = Some(result);
            task.done += 1;
            leave_pending(&mut self.waiting, task_id, &task.rank, &mut task.pending);
        }
        task.next_pending = task
            .segments
            .iter()
            .position(|s| s.state != SegmentState::Done)
            .unwrap_or(0) as u32;
        self.maybe_complete(task_id);
        Ok(())
    }

    /// Gives `task_id` a segment timeout of its own: how long each of its attempts
    /// started from now on may run before it is retried elsewhere (the config's
    /// `segment_timeout_ms` is for tasks with none).
    pub fn set_segment_timeout(&mut self, task_id: Uuid, timeout_ms: u64) {
        if let Some(task) = self.tasks.get_mut(&task_id) {
            task.segment_timeout_ms = Some(timeout_ms);
        }
    }

    /// How long an attempt of `task_id` may run before it is retried elsewhere.
    pub fn segment_timeout_ms(&self, task_id: Uuid) -> u64 {
        self.own_segment_timeout_ms(task_id)
            .unwrap_or(self.config.segment_timeout_ms)
    }

    /// The segment timeout `task_id` was given ([`Ledger::set_segment_timeout`]), if any.
    pub fn own_segment_timeout_ms(&self, task_id: Uuid) -> Option<u64> {
        self.tasks.get(&task_id).and_then(|t| t.segment_timeout_ms)
    }

    /// The accepted result of a segment, if it has one.
    pub fn result(&self, task_id: Uuid, segment: u32) -> Option<&[u8]> {
        self.tasks
            .get(&task_id)?
            .segments
            .get(segment as usize)?
            .result
            .as_deref()
    }

    /// Allocates every pending segment it can to `candidates` (the capable workers
    /// discovery listed), by power of two choices over load. A task with segments still
    /// pending and no candidate at all fails at once; one that gets no free worker for
    /// any of its segments for `max_wait_ms` fails too.
    pub fn assign(&mut self, task_id: Uuid, candidates: &[Candidate], now_ms: u64) {
        let list = Candidates::new(candidates.iter().cloned());
        self.assign_inner(task_id, &list, false, now_ms);
    }

    /// [`assign`](Self::assign) from a list shared by the tasks of one round: once the
    /// list has no free worker, the round's other tasks see that without a scan.
    /// Returns true if the task found the list with no free worker (it waits for one):
    /// the tasks behind it in the round that share the list would find none either.
    pub fn assign_from(&mut self, task_id: Uuid, candidates: &Candidates, now_ms: u64) -> bool {
        self.assign_inner(task_id, candidates, true, now_ms)
    }

    /// `shared`: the list is offered to other tasks too, so the ledger may remember it
    /// was seen with no free worker. Returns true if it found the list with none.
    fn assign_inner(
        &mut self,
        task_id: Uuid,
        candidates: &Candidates,
        shared: bool,
        now_ms: u64,
    ) -> bool {
        let Some(task) = self.tasks.get_mut(&task_id).filter(|t| t.pending > 0) else {
            return false;
        };
        let Some(since_ms) = task.waiting_since_ms(now_ms) else {
            return false;
        };
        if candidates.is_empty() {
            self.fail(
                task_id,
                "no agent offers the capability this task needs".into(),
            );
            return false;
        }
        // Segment by segment rather than gathered first: under overload most calls stop
        // at the first pick, and gathering them all was a good share of their cost.
        // From the first that may wait: starting at 0 made a round cost the whole task,
        // and with a round after every result a task of n segments cost n² (50,000
        // segments of 1 ms on 50 workers took 16 s).
        let (from, len) = (task.next_pending as usize, task.segments.len());
        // The first segment left waiting, where the next round starts.
        let mut left = None;
        let leave = |ledger: &mut Ledger, at: usize| {
            if let Some(task) = ledger.tasks.get_mut(&task_id) {
                task.next_pending = at as u32;
            }
        };
        for segment in from..len {
            let is_retry = match self.tasks.get(&task_id).map(|t| &t.segments[segment].state) {
                Some(SegmentState::Pending { is_retry, .. }) => *is_retry,
                _ => continue,
            };
            if is_retry && !self.retry_allowed(now_ms) {
                self.stats.retries_deferred += 1;
                left = left.or(Some(segment));
                continue;
            }
            match self.pick(candidates, shared, now_ms) {
                Ok(worker) => {
                    let node = candidates.node(&worker).clone();
                    self.start_attempt(
                        task_id,
                        segment as u32,
                        worker.agent,
                        node,
                        is_retry,
                        now_ms,
                    )
                }
                // No worker is free now: the other segments would find none either.
                Err(full) => {
                    leave(self, left.unwrap_or(segment));
                    if full.working {
                        // Queued behind work: the wait starts again.
                        if let Some(task) = self.tasks.get_mut(&task_id) {
                            task.last_active_ms = task.last_active_ms.max(now_ms);
                        }
                    } else if now_ms.saturating_sub(since_ms) >= self.config.max_wait_ms {
                        self.fail_waited(task_id);
                    }
                    return true;
                }
            }
        }
        leave(self, left.unwrap_or(len));
        false
    }

    fn fail_waited(&mut self, task_id: Uuid) {
        let why = format!(
            "no capable agent was free for {} ms",
            self.config.max_wait_ms
        );
        self.fail(task_id, why);
    }

    /// Records a result for an attempt. The first result for a segment is accepted,
    /// whichever attempt produced it and whatever became of its worker since (a late
    /// result from a node already declared dead is still the work done); other attempts
    /// of that segment are cancelled; later copies are discarded.
    pub fn handle_result(
        &mut self,
        task_id: Uuid,
        segment: u32,
        attempt: u32,
        output: Vec<u8>,
    ) -> ResultVerdict {
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return ResultVerdict::UnknownTask;
        };
        let Some(seg) = task.segments.get_mut(segment as usize) else {
            return ResultVerdict::UnknownTask;
        };
        if attempt <= seg.base || attempt > seg.attempts {
            return ResultVerdict::UnknownAttempt;
        }
        if seg.state == SegmentState::Done {
            task.duplicates += 1;
            self.stats.duplicates_discarded += 1;
            return ResultVerdict::Duplicate;
        }
        if matches!(seg.state, SegmentState::Pending { .. }) {
            leave_pending(&mut self.waiting, task_id, &task.rank, &mut task.pending);
        }
        seg.state = SegmentState::Done;
        seg.result = Some(output);
        task.done += 1;
        self.stats.segments_completed += 1;
        if let Some(live) = seg.live.take() {
            task.unhold(live.agent);
            self.deadlines.ended(&self.tasks);
            self.release(live.agent);
            if live.attempt == attempt {
                self.breaker_success(live.agent);
            } else {
                self.outputs.push_back(LedgerOutput::Cancel {
                    task: task_id,
                    segment,
                    attempt: live.attempt,
                    agent: live.agent,
                    node: live.node,
                });
            }
        }
        self.maybe_complete(task_id);
        ResultVerdict::Accepted
    }

    /// Records that an attempt failed (the worker said so, or it panicked): the segment
    /// goes back to waiting for another worker, unless it has used all its attempts.
    pub fn handle_failure(
        &mut self,
        task_id: Uuid,
        segment: u32,
        attempt: u32,
        reason: &str,
        now_ms: u64,
    ) {
        let Some(agent) = self.end_attempt(task_id, segment, attempt) else {
            return;
        };
        self.breaker_failure(agent, now_ms);
        self.requeue(task_id, segment, now_ms, reason, Requeue::Retry);
    }

    /// The worker's node refused the attempt without running it (its policy or rate
    /// limit, or no such agent there): the segment waits for another worker. Not a
    /// failure: neither the worker's breaker nor the segment's attempts nor the retry
    /// budget count it; [`MAX_REFUSALS`] bounds how often it may happen. False if the
    /// attempt had ended already (a copy of the refusal, sent again after a lost
    /// connection, or one that came after the attempt was given up): nothing changes.
    pub fn handle_refusal(
        &mut self,
        task_id: Uuid,
        segment: u32,
        attempt: u32,
        reason: &str,
        now_ms: u64,
    ) -> bool {
        let ended = self.end_attempt(task_id, segment, attempt).is_some();
        if ended {
            self.requeue(task_id, segment, now_ms, reason, Requeue::Refused);
        }
        ended
    }

    /// Every attempt running on `node` is lost: reallocate them all. These are not
    /// retries of failed work, so the retry budget does not hold them back.
    pub fn handle_node_down(&mut self, node: &str, now_ms: u64) -> usize {
        self.lose_node(node, now_ms, &format!("node {node} is down"))
    }

    /// Every attempt running on `node` is lost to this coordinator, which has no
    /// connection to it (others may still reach it): as [`Ledger::handle_node_down`].
    pub fn handle_node_cut_off(&mut self, node: &str, now_ms: u64) -> usize {
        self.lose_node(node, now_ms, &format!("no connection to node {node}"))
    }

    fn lose_node(&mut self, node: &str, now_ms: u64, reason: &str) -> usize {
        let lost = self.attempts_where(|_, n| n == node);
        let n = lost.len();
        self.reallocate_lost(lost, now_ms, reason);
        n
    }

    /// Every attempt running on `agent` is lost (it stopped for good).
    pub fn handle_worker_down(&mut self, agent: u32, now_ms: u64) {
        let lost = self.attempts_where(|a, _| a == agent);
        self.reallocate_lost(lost, now_ms, &format!("agent {agent} is gone"));
    }

    /// Ends attempts lost with their worker and puts their segments back to wait,
    /// outside the retry budget (they are not retries of failed work).
    fn reallocate_lost(&mut self, lost: Vec<(Uuid, u32, u32)>, now_ms: u64, reason: &str) {
        for (task, segment, attempt) in lost {
            if self.end_attempt(task, segment, attempt).is_some() {
                self.requeue(task, segment, now_ms, reason, Requeue::Lost);
            }
        }
    }

    /// Attempts past their deadline count as failures of their workers (the breaker
    /// learns of slow workers too); their segments wait for another attempt.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let mut due: Vec<Deadline> = self
            .deadlines
            .queue
            .iter()
            .take_while(|d| d.at_ms <= now_ms)
            .copied()
            .collect();
        // By time, then task and segment, whatever order they were started in.
        due.sort_unstable();
        due.dedup();
        for d in due {
            // Skips an attempt that ended before, or in an earlier timeout that failed
            // its task.
            let Some(attempt) = Deadlines::running(&self.tasks, &d).map(|l| l.attempt) else {
                continue;
            };
            if let Some(agent) = self.end_attempt(d.task, d.segment, attempt) {
                self.breaker_failure(agent, now_ms);
                self.requeue(d.task, d.segment, now_ms, "timed out", Requeue::Retry);
            }
        }
    }

    /// Cancels a task: its running attempts are cancelled, nothing more is accepted.
    pub fn cancel(&mut self, task_id: Uuid) {
        self.fail(task_id, "cancelled".into());
    }

    fn attempts_where(&self, pred: impl Fn(u32, &str) -> bool) -> Vec<(Uuid, u32, u32)> {
        let mut out = Vec::new();
        for (id, task) in &self.tasks {
            for (i, seg) in task.segments.iter().enumerate() {
                if let Some(l) = &seg.live {
                    if pred(l.agent, &l.node) {
                        out.push((*id, i as u32, l.attempt));
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Removes a live attempt; returns its agent if it was live.
    fn end_attempt(&mut self, task_id: Uuid, segment: u32, attempt: u32) -> Option<u32> {
        let task = self.tasks.get_mut(&task_id)?;
        let seg = task.segments.get_mut(segment as usize)?;
        let live = seg.live.take_if(|l| l.attempt == attempt)?;
        task.unhold(live.agent);
        self.deadlines.ended(&self.tasks);
        self.release(live.agent);
        Some(live.agent)
    }

    /// Puts a segment back to wait for a worker (see [`Requeue`] for how each reason
    /// counts).
    fn requeue(&mut self, task_id: Uuid, segment: u32, now_ms: u64, reason: &str, why: Requeue) {
        let max_attempts = self.config.max_attempts;
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        let Some(seg) = task.segments.get_mut(segment as usize) else {
            return;
        };
        if seg.state == SegmentState::Done || seg.live.is_some() {
            return;
        }
        if why == Requeue::Refused {
            seg.refused += 1;
            if seg.refused >= MAX_REFUSALS {
                let failure =
                    format!("segment {segment} was refused {MAX_REFUSALS} times (last: {reason})");
                return self.fail(task_id, failure);
            }
        }
        // Refused attempts never ran (every attempt ended is counted, refused or not).
        if seg.attempts - seg.base - seg.refused >= max_attempts {
            let failure =
                format!("segment {segment} failed {max_attempts} attempts (last: {reason})");
            return self.fail(task_id, failure);
        }
        seg.state = SegmentState::Pending {
            is_retry: why == Requeue::Retry,
        };
        // It ran until now: the wait for a worker starts again.
        task.last_active_ms = task.last_active_ms.max(now_ms);
        task.next_pending = task.next_pending.min(segment);
        task.pending += 1;
        self.waiting.insert(task_id, &task.rank);
        if why != Requeue::Refused {
            task.reallocated += 1;
            self.stats.reallocated += 1;
            self.outputs.push_back(LedgerOutput::Reallocated {
                task: task_id,
                segment,
            });
        }
    }

    fn start_attempt(
        &mut self,
        task_id: Uuid,
        segment: u32,
        agent: u32,
        node: Arc<str>,
        is_retry: bool,
        now_ms: u64,
    ) {
        let deadline_ms = now_ms + self.segment_timeout_ms(task_id);
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        let Some(seg) = task.segments.get_mut(segment as usize) else {
            return;
        };
        if matches!(seg.state, SegmentState::Pending { .. }) {
            leave_pending(&mut self.waiting, task_id, &task.rank, &mut task.pending);
        }
        task.last_active_ms = task.last_active_ms.max(now_ms);
        assert!(seg.live.is_none(), "a segment runs one attempt at a time");
        seg.attempts += 1;
        let attempt = seg.attempts;
        seg.live = Some(Live {
            attempt,
            agent,
            node: node.clone(),
            deadline_ms,
        });
        seg.state = SegmentState::Running;
        task.hold(agent);
        *self.in_flight.entry(agent).or_default() += 1;
        self.deadlines.push(Deadline {
            at_ms: deadline_ms,
            task: task_id,
            segment,
        });
        if is_retry {
            self.retries.add(now_ms);
        } else {
            self.first_attempts.add(now_ms);
        }
        self.outputs.push_back(LedgerOutput::Allocate {
            task: task_id,
            segment,
            attempt,
            agent,
            node,
        });
    }

    fn release(&mut self, agent: u32) {
        self.note_freed(agent);
        if let Some(n) = self.in_flight.get_mut(&agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(&agent);
            }
        }
    }

    /// Linkerd-style budget: retries within the last 10 s may not exceed the ratio of
    /// first attempts plus a floor per second.
    fn retry_allowed(&self, now_ms: u64) -> bool {
        let allowed = self.first_attempts.count(now_ms) * self.config.retry_ratio_permille / 1000
            + self.config.retry_floor_per_sec * 10;
        self.retries.count(now_ms) < allowed
    }

    /// Segments `c` has in hand: as it reported, or as this ledger gave it, the more.
    fn busy(&self, c: &Worker) -> u32 {
        c.load
            .max(self.in_flight.get(&c.agent).copied().unwrap_or(0))
    }

    fn eligible(&self, c: &Worker, now_ms: u64) -> bool {
        let busy = self.busy(c);
        let open = self
            .breakers
            .get(&c.agent)
            .is_some_and(|b| b.open_until_ms > now_ms);
        busy < c.capacity.max(1) && !open
    }

    /// Power of two choices: two random eligible workers, the less loaded wins. Drawn
    /// by sampling (a few draws, whatever the number of candidates); only when that
    /// finds fewer than two does it look at every candidate.
    fn pick(&mut self, list: &Candidates, shared: bool, now_ms: u64) -> Result<Worker, Full> {
        const DRAWS: usize = 8;
        if shared {
            if let Some(m) = self
                .none_free
                .as_ref()
                .filter(|m| m.list == list.id && now_ms < m.until_ms)
            {
                // Only the workers freed since the list was seen full may be eligible.
                let eligible: Vec<&Worker> = m
                    .freed
                    .iter()
                    .filter_map(|&a| list.position(a))
                    .filter(|c| self.eligible(c, now_ms))
                    .collect();
                if eligible.is_empty() {
                    // A worker freed since may have stopped working.
                    let working = if m.freed.is_empty() {
                        m.working
                    } else {
                        self.any_working(list)
                    };
                    if let Some(m) = self.none_free.as_mut() {
                        m.freed.clear();
                        m.working = working;
                    }
                    return Err(Full { working });
                }
                return Ok(*self.two_choices(&eligible));
            }
        }
        let candidates = &list.list.workers;
        if candidates.len() > DRAWS {
            let mut found: [Option<usize>; 2] = [None, None];
            for _ in 0..DRAWS {
                let i = self.rng.random_range(0..candidates.len());
                if found[0] == Some(i) || !self.eligible(&candidates[i], now_ms) {
                    continue;
                }
                if found[0].is_none() {
                    found[0] = Some(i);
                } else {
                    found[1] = Some(i);
                    break;
                }
            }
            if let [Some(a), Some(b)] = found {
                let (a, b) = (&candidates[a], &candidates[b]);
                return Ok(*if self.score(a) <= self.score(b) { a } else { b });
            }
        }
        let eligible: Vec<&Worker> = candidates
            .iter()
            .filter(|c| self.eligible(c, now_ms))
            .collect();
        if eligible.is_empty() {
            let working = self.any_working(list);
            if shared {
                let until_ms = self
                    .breakers
                    .values()
                    .map(|b| b.open_until_ms)
                    .filter(|&t| t > now_ms)
                    .min()
                    .unwrap_or(u64::MAX);
                self.none_free = Some(NoneFree {
                    list: list.id,
                    working,
                    until_ms,
                    freed: Vec::new(),
                });
            }
            return Err(Full { working });
        }
        Ok(*self.two_choices(&eligible))
    }

    /// Whether a worker of `list` is at work ([`Full::working`]).
    fn any_working(&self, list: &Candidates) -> bool {
        list.list
            .workers
            .iter()
            .any(|c| self.busy(c) > 0 && !self.breakers.contains_key(&c.agent))
    }

    /// Power of two choices among eligible workers (at least one).
    fn two_choices<'a>(&mut self, eligible: &[&'a Worker]) -> &'a Worker {
        match eligible.len() {
            1 => eligible[0],
            n => {
                let a = self.rng.random_range(0..n);
                let mut b = self.rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                if self.score(eligible[a]) <= self.score(eligible[b]) {
                    eligible[a]
                } else {
                    eligible[b]
                }
            }
        }
    }

    fn note_freed(&mut self, agent: u32) {
        if let Some(m) = self.none_free.as_mut() {
            if m.freed.len() < FREED_TRACKED {
                m.freed.push(agent);
            } else {
                self.none_free = None;
            }
        }
    }

    /// Load as a fraction of capacity, in thousandths, then the agent for ties.
    fn score(&self, c: &Worker) -> (u64, u32) {
        let busy = self.busy(c);
        (
            u64::from(busy) * 1000 / u64::from(c.capacity.max(1)),
            c.agent,
        )
    }

    fn breaker_failure(&mut self, agent: u32, now_ms: u64) {
        let b = self.breakers.entry(agent).or_default();
        b.consecutive_failures += 1;
        if b.consecutive_failures >= self.config.breaker_failures {
            b.open_until_ms = now_ms + self.config.breaker_cooldown_ms;
            b.consecutive_failures = 0;
            // A worker freed and then shut out by this breaker is eligible again when
            // it closes, even if the list's record of freed workers forgot it.
            if let Some(m) = self.none_free.as_mut() {
                m.until_ms = m.until_ms.min(b.open_until_ms);
            }
        }
    }

    fn breaker_success(&mut self, agent: u32) {
        if self.breakers.remove(&agent).is_some() {
            self.note_freed(agent);
        }
    }

    fn maybe_complete(&mut self, task_id: Uuid) {
        let complete = self
            .tasks
            .get(&task_id)
            .is_some_and(|t| t.done as usize == t.segments.len());
        if !complete {
            return;
        }
        if let Some(task) = self.tasks.remove(&task_id) {
            self.waiting.remove(task_id, &task.rank);
            let figures = task.figures();
            let results = task
                .segments
                .into_iter()
                .map(|s| s.result.unwrap_or_default())
                .collect();
            self.outputs.push_back(LedgerOutput::TaskCompleted {
                task: task_id,
                results,
                figures,
            });
        }
    }

    fn fail(&mut self, task_id: Uuid, reason: String) {
        let Some(task) = self.tasks.remove(&task_id) else {
            return;
        };
        self.waiting.remove(task_id, &task.rank);
        let figures = task.figures();
        for (i, seg) in task.segments.into_iter().enumerate() {
            if let Some(live) = seg.live {
                self.deadlines.ended(&self.tasks);
                self.release(live.agent);
                self.outputs.push_back(LedgerOutput::Cancel {
                    task: task_id,
                    segment: i as u32,
                    attempt: live.attempt,
                    agent: live.agent,
                    node: live.node,
                });
            }
        }
        self.outputs.push_back(LedgerOutput::TaskFailed {
            task: task_id,
            reason,
            figures,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: u32) -> Vec<Candidate> {
        (1..=n)
            .map(|agent| Candidate {
                agent,
                node: "n".into(),
                capacity: 1,
                load: 0,
            })
            .collect()
    }

    fn allocations(l: &mut Ledger) -> Vec<(u32, u32)> {
        std::iter::from_fn(|| l.poll())
            .filter_map(|o| match o {
                LedgerOutput::Allocate {
                    segment, attempt, ..
                } => Some((segment, attempt)),
                _ => None,
            })
            .collect()
    }

    fn failure(l: &mut Ledger) -> Option<String> {
        std::iter::from_fn(|| l.poll()).find_map(|o| match o {
            LedgerOutput::TaskFailed { reason, .. } => Some(reason),
            _ => None,
        })
    }

    /// A task taken over from another coordinator keeps the results that coordinator
    /// had accepted, runs only the rest, numbers its attempts after the former ones,
    /// and has its whole retry budget.
    #[test]
    fn a_resumed_task_runs_only_what_was_not_done_and_numbers_attempts_apart() {
        let config = LedgerConfig::default();
        let mut l = Ledger::new(config, 7);
        let task = Uuid::from_u128(1);
        let done = vec![(0, b"zero".to_vec()), (2, b"two".to_vec())];
        l.resume(task, 4, done, 1 << 24, 0).unwrap();
        assert_eq!(l.result(task, 2), Some(&b"two"[..]));
        assert_eq!(l.result(task, 1), None);
        let two = vec![Candidate {
            capacity: 2,
            ..workers(1)[0].clone()
        }];
        l.assign(task, &two, 0);
        let first = 1 << 24;
        assert_eq!(allocations(&mut l), vec![(1, first), (3, first)]);
        // A late result numbered as the former coordinator's attempt is no attempt here.
        assert_eq!(
            l.handle_result(task, 1, 1, vec![]),
            ResultVerdict::UnknownAttempt
        );
        // The whole budget: max_attempts - 1 failures, then a result.
        // (Each retry goes to a new worker, so that no breaker opens.)
        for n in 0..config.max_attempts - 1 {
            l.handle_failure(task, 3, first + n, "agent panicked", 10);
            let fresh = Candidate {
                agent: 10 + n,
                ..workers(1)[0].clone()
            };
            l.assign(task, &[fresh], 10);
            assert_eq!(allocations(&mut l), vec![(3, first + n + 1)]);
        }
        assert_eq!(failure(&mut l), None);
        l.handle_result(task, 1, first, b"one".to_vec());
        l.handle_result(task, 3, first + config.max_attempts - 1, b"three".to_vec());
        let results = std::iter::from_fn(|| l.poll()).find_map(|o| match o {
            LedgerOutput::TaskCompleted {
                results, figures, ..
            } => Some((results, figures.completed)),
            _ => None,
        });
        let want: Vec<Vec<u8>> = ["zero", "one", "two", "three"]
            .map(|s| s.as_bytes().to_vec())
            .into();
        assert_eq!(results, Some((want, 4)));
        // Every segment done already: it completes at once.
        let all = Uuid::from_u128(2);
        l.resume(all, 1, vec![(0, vec![1])], 1 << 24, 0).unwrap();
        assert!(std::iter::from_fn(|| l.poll())
            .any(|o| matches!(o, LedgerOutput::TaskCompleted { task, .. } if task == all)));
    }

    /// An offer round starts at the first segment that may wait, and a segment put back
    /// to wait before that point is found again.
    #[test]
    fn a_segment_requeued_behind_the_round_start_is_offered_again() {
        let mut l = Ledger::new(LedgerConfig::default(), 7);
        let task = Uuid::from_u128(1);
        let two = vec![Candidate {
            capacity: 2,
            ..workers(1)[0].clone()
        }];
        l.submit(task, 4, 0).unwrap();
        l.assign(task, &two, 0);
        assert_eq!(allocations(&mut l), vec![(0, 1), (1, 1)]);
        l.handle_result(task, 1, 1, vec![]);
        l.assign(task, &two, 10);
        assert_eq!(allocations(&mut l), vec![(2, 1)]);
        l.handle_failure(task, 0, 1, "worker stopped", 20);
        l.assign(task, &two, 20);
        assert_eq!(allocations(&mut l), vec![(0, 2)]);
        l.handle_result(task, 2, 1, vec![]);
        l.handle_result(task, 0, 2, vec![]);
        l.assign(task, &two, 30);
        assert_eq!(allocations(&mut l), vec![(3, 1)]);
    }

    /// A refusal by the worker's node sends the segment to a worker again without
    /// counting as a failed attempt or against the worker's breaker; only
    /// `MAX_REFUSALS` of them fail the task.
    #[test]
    fn refusals_are_not_failures_but_are_bounded() {
        let config = LedgerConfig::default();
        let mut l = Ledger::new(config, 7);
        let task = Uuid::from_u128(1);
        let one = workers(1);
        l.submit(task, 1, 0).unwrap();
        // Far more refusals than attempts or breaker failures allow.
        let many = config.max_attempts.max(config.breaker_failures) * 3;
        for attempt in 1..=many {
            l.assign(task, &one, u64::from(attempt));
            assert_eq!(
                allocations(&mut l),
                vec![(0, attempt)],
                "the breaker stays shut"
            );
            assert!(l.handle_refusal(task, 0, attempt, "rate limited", u64::from(attempt)));
            // A copy of it (sent again after a lost connection) changes nothing.
            assert!(!l.handle_refusal(task, 0, attempt, "rate limited", u64::from(attempt)));
        }
        assert_eq!(failure(&mut l), None);
        l.assign(task, &one, 100);
        assert_eq!(allocations(&mut l), vec![(0, many + 1)]);
        l.handle_result(task, 0, many + 1, vec![1]);
        match std::iter::from_fn(|| l.poll()).last() {
            Some(LedgerOutput::TaskCompleted { figures, .. }) => {
                assert_eq!(figures.reallocated, 0, "a refusal is no reallocation")
            }
            other => panic!("{other:?}"),
        }

        // Failures still count, whatever refusals came before them.
        let task = Uuid::from_u128(2);
        l.submit(task, 1, 200).unwrap();
        let mut attempt = 0;
        for _ in 0..3 {
            attempt += 1;
            l.assign(task, &workers(2), 200);
            allocations(&mut l);
            l.handle_refusal(task, 0, attempt, "denied", 200);
        }
        for _ in 0..config.max_attempts {
            attempt += 1;
            l.assign(task, &workers(2), 200);
            allocations(&mut l);
            l.handle_failure(task, 0, attempt, "panicked", 200);
        }
        let why = failure(&mut l).unwrap();
        assert!(why.contains("failed 5 attempts (last: panicked)"), "{why}");

        // And refusals without end fail the task.
        let task = Uuid::from_u128(3);
        l.submit(task, 1, 300).unwrap();
        for attempt in 1..=MAX_REFUSALS {
            l.assign(task, &workers(2), 300);
            allocations(&mut l);
            l.handle_refusal(task, 0, attempt, "rate limited", 300);
        }
        let why = failure(&mut l).unwrap();
        assert!(
            why.contains("refused 100 times (last: rate limited)"),
            "{why}"
        );
    }

    /// The agents an ALLOCATE names as the task's peers are those running its attempts
    /// now, kept as attempts start and end.
    #[test]
    fn holders_are_the_agents_running_the_task_now() {
        let mut l = Ledger::new(LedgerConfig::default(), 7);
        let task = Uuid::from_u128(1);
        l.submit(task, 3, 0).unwrap();
        l.assign(task, &workers(2), 0);
        let _ = allocations(&mut l);
        assert_eq!(l.holders(task), vec![1, 2]);
        assert_eq!(l.running(task), 2);
        let live = l.live_attempts(task);
        let scan = |l: &Ledger| {
            let mut agents: Vec<u32> = l.live_attempts(task).iter().map(|a| a.2).collect();
            agents.sort_unstable();
            agents.dedup();
            agents
        };
        let (segment, attempt, _, _) = live[0].clone();
        l.handle_result(task, segment, attempt, vec![]);
        assert_eq!(l.holders(task), scan(&l));
        let (segment, attempt, _, _) = live[1].clone();
        l.handle_failure(task, segment, attempt, "stopped", 10);
        assert_eq!(l.holders(task), Vec::<u32>::new());
        l.assign(task, &workers(2), 20);
        let _ = allocations(&mut l);
        assert_eq!(l.holders(task), scan(&l));
        assert_eq!(l.holders(task).len(), 2);
        assert_eq!(l.running(task) as usize, l.live_attempts(task).len());
        assert_eq!(l.running(Uuid::from_u128(9)), 0, "not open");
    }

    /// A task whose capable workers are at work is not waiting in vain, however long its
    /// queue: not when its own segments keep them busy (with segments longer than
    /// `max_wait_ms` on one worker, it used to fail with "no capable agent was free" at
    /// the first tick past the wait), and not when another task's do. A task queued
    /// behind another used to fail after `max_wait_ms` with none of its segments run:
    /// 11 of 60 tasks submitted at once to 16 replicas, in a run by hand.
    #[test]
    fn a_task_queued_behind_work_waits_for_it() {
        // Offered a list of its own each time, and one list shared by both tasks.
        for shared in [false, true] {
            queued_behind_work(shared);
        }
    }

    fn queued_behind_work(shared: bool) {
        let config = LedgerConfig {
            max_wait_ms: 1_000,
            segment_timeout_ms: 100_000,
            ..LedgerConfig::default()
        };
        let mut l = Ledger::new(config, 7);
        let (first, queued) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let one = workers(1);
        let list = Candidates::new(one.iter().cloned());
        l.submit(first, 3, 0).unwrap();
        l.submit(queued, 1, 0).unwrap();
        // Segments of 1.5 s, ticks every 100 ms, the first task offered the worker first:
        // the queued task gets it only when the first is done, at 4.5 s.
        let mut running: Vec<(Uuid, u32, u32)> = Vec::new();
        let mut done = Vec::new();
        let mut queued_from = None;
        for now in (0..=6_000u64).step_by(100) {
            if now > 0 && now % 1_500 == 0 {
                let (task, segment, attempt) = running.remove(0);
                l.handle_result(task, segment, attempt, vec![]);
            }
            for task in [first, queued] {
                if shared {
                    l.assign_from(task, &list, now);
                } else {
                    l.assign(task, &one, now);
                }
            }
            while let Some(output) = l.poll() {
                match output {
                    LedgerOutput::Allocate {
                        task,
                        segment,
                        attempt,
                        ..
                    } => {
                        if task == queued {
                            queued_from = Some(now);
                        }
                        running.push((task, segment, attempt));
                    }
                    LedgerOutput::TaskCompleted { task, .. } => done.push((task, now)),
                    LedgerOutput::TaskFailed { reason, .. } => {
                        panic!("shared {shared}, at {now} ms: {reason}")
                    }
                    _ => {}
                }
            }
        }
        assert_eq!(queued_from, Some(4_500), "shared {shared}");
        assert_eq!(done, vec![(first, 4_500), (queued, 6_000)]);
    }

    /// Attempts that end leave entries behind; the queue still stays within about twice
    /// the running attempts, and the next wake-up is a running attempt's.
    #[test]
    fn ended_deadlines_do_not_pile_up() {
        let config = LedgerConfig {
            segment_timeout_ms: 1_000_000,
            ..LedgerConfig::default()
        };
        let mut l = Ledger::new(config, 7);
        let task = Uuid::from_u128(1);
        l.submit(task, 20_000, 0).unwrap();
        let workers = workers(100);
        let mut running: Vec<(u32, u32)> = Vec::new();
        let mut most = 0;
        for now in 0..10_000u64 {
            l.assign(task, &workers, now);
            running.extend(allocations(&mut l));
            // Finish all but the five oldest, which hold the front of the queue.
            running.sort_unstable();
            while running.len() > 5 {
                let (segment, attempt) = running.pop().unwrap();
                assert_eq!(
                    l.handle_result(task, segment, attempt, vec![]),
                    ResultVerdict::Accepted
                );
            }
            let len = l.deadlines.queue.len();
            assert!(
                len <= 2 * running.len() + DEADLINES_COMPACT_MIN,
                "{len} entries for {} running attempts",
                running.len()
            );
            most = most.max(len);
        }
        assert!(
            most > DEADLINES_COMPACT_MIN,
            "the test never let ended entries build up"
        );
        assert_eq!(running.len(), 5);
        assert_eq!(l.next_wakeup_ms(), Some(1_000_000));
    }

    /// A caller whose clock steps back still gets deadlines in time order.
    #[test]
    fn deadlines_stay_in_time_order_when_the_clock_steps_back() {
        let config = LedgerConfig {
            segment_timeout_ms: 100,
            ..LedgerConfig::default()
        };
        let mut l = Ledger::new(config, 7);
        let (late, early) = (Uuid::from_u128(1), Uuid::from_u128(2));
        l.submit(late, 1, 0).unwrap();
        l.submit(early, 1, 0).unwrap();
        l.assign(late, &workers(2), 500);
        l.assign(early, &workers(2), 200);
        assert_eq!(allocations(&mut l).len(), 2);
        assert_eq!(l.next_wakeup_ms(), Some(300));
        l.handle_timeout(300);
        assert_eq!(l.next_wakeup_ms(), Some(600));
        assert!(l.has_pending(early) && !l.has_pending(late));
    }

    /// A task with a segment timeout of its own has its attempts retried after it;
    /// one with none, after the config's.
    #[test]
    fn a_tasks_own_segment_timeout_is_its_attempts_deadline() {
        let config = LedgerConfig {
            segment_timeout_ms: 1_000,
            ..LedgerConfig::default()
        };
        let mut l = Ledger::new(config, 7);
        let (long, short, default) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        for task in [long, short, default] {
            l.submit(task, 1, 0).unwrap();
        }
        l.set_segment_timeout(long, 60_000);
        l.set_segment_timeout(short, 200);
        assert_eq!(l.segment_timeout_ms(long), 60_000);
        assert_eq!(l.segment_timeout_ms(default), 1_000);
        for task in [long, short, default] {
            l.assign(task, &workers(3), 0);
        }
        assert_eq!(allocations(&mut l).len(), 3);
        assert_eq!(l.next_wakeup_ms(), Some(200));
        l.handle_timeout(200);
        assert!(l.has_pending(short) && !l.has_pending(default) && !l.has_pending(long));
        l.handle_timeout(1_000);
        assert!(l.has_pending(default) && !l.has_pending(long));
        assert_eq!(l.next_wakeup_ms(), Some(60_000));
        l.handle_timeout(59_999);
        assert!(!l.has_pending(long), "running until its own timeout");
    }
}
