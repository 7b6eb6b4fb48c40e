//! What a coordinator keeps as another coordinator's standby: copies of that
//! coordinator's open tasks (as submitted, and the results it accepted), to take over
//! if its node goes down, so that a task outlives the node it was submitted to. No I/O:
//! the coordinator actor feeds it checkpoints and node-down events.
//!
//! Bounded: at most `max_tasks` tasks and `max_bytes` of inputs and results; a task
//! past either limit is refused, and its coordinator stops sending it here.
//!
//! Each answer is a lease: for `lease_ms` from a checkpoint's arrival, none of its
//! sender's tasks is taken over, even if the sender's node is held for down meanwhile
//! (the takeover waits for the lease to end). The sender allocates only under the
//! lease (`lease.rs`), so a coordinator paused past the failure detector does not go
//! on running what was taken over here.
//!
//! A task that ended at its coordinator is remembered for [`ENDED_MEMORY_MS`] (at most
//! [`ENDED_REMEMBERED`] of them), with its outcome while that fits (the latest 256, at
//! most 64 MiB of results; a larger one, the latest two, for a minute, as its
//! coordinator keeps it: `pages::LargeOutcomes`): if that coordinator's node goes down
//! before the outcome, or all its pages, reached the client, the client gets the
//! outcome here, or is told it is lost, rather than have the task adopted and run a
//! second time.
//!
//! A copy is run at a takeover only if its coordinator was heard from (a checkpoint
//! applied) within [`TRUSTED_FOR_MS`] before: past that, the coordinator may have
//! given up on this standby and handed its tasks to another, which runs them.

use std::collections::{BTreeMap, HashMap, VecDeque};

use uuid::Uuid;

use crate::ended::{Ended, EndedTasks};
use crate::service::serde_bytes_vec::Blob;
use crate::service::{
    params_bytes, Checkpoint, CheckpointAck, OpenTask, SoFar, TaskOutcome, TaskStatus,
    MAX_GENERATION,
};

/// How much a standby holds at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandbyLimits {
    /// Tasks held, for all coordinators together.
    pub max_tasks: usize,
    /// Bytes of inputs and results held, for all coordinators together.
    pub max_bytes: usize,
}

impl Default for StandbyLimits {
    fn default() -> StandbyLimits {
        StandbyLimits {
            max_tasks: crate::coordinator::MAX_OPEN_TASKS,
            max_bytes: 1 << 30,
        }
    }
}

/// A task held for another coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldTask {
    /// The coordinator's node.
    pub primary: String,
    /// Which life of that node sent it ([`Checkpoint::life`]; 0 if unknown): a task
    /// of a life that ended (the node restarted) is taken over even while the node
    /// is up again.
    pub life: u64,
    /// The task as submitted.
    pub open: OpenTask,
    /// The results that coordinator accepted, by segment.
    pub done: BTreeMap<u32, Vec<u8>>,
    /// The task's figures in the last checkpoint of it applied here.
    pub so_far: SoFar,
    /// When that checkpoint was applied (on this node's clock).
    pub so_far_ms: u64,
    /// The parameters `adjust` set for the task so far, as of the latest checkpoint.
    pub params: BTreeMap<String, String>,
}

impl HeldTask {
    fn bytes(&self) -> usize {
        let inputs: usize = self.open.request.inputs.iter().map(|b| b.0.len()).sum();
        inputs + self.done.values().map(Vec::len).sum::<usize>() + params_bytes(&self.params)
    }

    /// `outcome` (a completed task's, sent without its results) with each segment's
    /// result: from `sent`, else from this copy, whose results move into it. None if
    /// one is in neither, or the outcome is not of a completed task of this copy's
    /// segments.
    fn into_outcome(self, mut outcome: TaskOutcome, sent: Vec<(u32, Blob)>) -> Option<TaskOutcome> {
        let segments = self.open.request.inputs.len();
        if outcome.status != TaskStatus::Completed || outcome.segments as usize != segments {
            return None;
        }
        let mut sent: HashMap<u32, Blob> = sent.into_iter().collect();
        let mut held = self.done;
        outcome.results = (0..segments as u32)
            .map(|s| sent.remove(&s).or_else(|| held.remove(&s).map(Blob)))
            .collect::<Option<Vec<Blob>>>()?;
        Some(outcome)
    }
}

/// How long a standby's answer promises not to take over the sender's tasks: what
/// a takeover may wait after the failure detector, and how often a coordinator with
/// open tasks renews (at half of it).
pub const LEASE_MS: u64 = 1_000;

/// How long after the last checkpoint applied from a coordinator's life its copies
/// held here are still run at a takeover. A coordinator gives up on a standby that
/// has answered nothing for 5 s (the coordinator's `STANDBY_GIVE_UP_MS`) and gives
/// its tasks to another; a second less leaves room for the checkpoint's way here. A
/// copy past it is dropped: its task runs at the other standby, or, if it never got
/// there, is adopted at the client's asking.
pub const TRUSTED_FOR_MS: u64 = 4_000;

/// How long a standby remembers a task that ended at its coordinator: well past what a
/// client spends asking the members after losing its node (about a minute).
pub const ENDED_MEMORY_MS: u64 = 10 * 60_000;
/// How many such tasks a standby remembers at most (about 100 bytes each).
pub const ENDED_REMEMBERED: usize = 65_536;

/// A task that ended at the coordinator this node was standby for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedAt {
    /// The coordinator's node.
    pub node: String,
    /// Which life of it ([`Checkpoint::life`]).
    pub life: u64,
    /// When this node was told (on its clock).
    pub at_ms: u64,
}

/// What a takeover hands the caller.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Takeover {
    /// The tasks to run now, by id.
    pub run: Vec<(Uuid, HeldTask)>,
    /// The tasks dropped instead, by id: their coordinator was last heard from
    /// [`TRUSTED_FOR_MS`] or more before.
    pub dropped: Vec<Uuid>,
    /// For the log: how long before the takeover the coordinator of the dropped
    /// tasks was last heard from, at least.
    pub unheard_ms: u64,
}

/// A numbered checkpoint that arrived after a later one of the same coordinator run:
/// applying it would take back what the later one gave, so it is dropped whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("checkpoint {number} arrived after checkpoint {applied} of the same coordinator run")]
pub struct Stale {
    /// The dropped checkpoint's number.
    pub number: u64,
    /// The number of the latest applied.
    pub applied: u64,
}

/// The tasks a coordinator holds as standby.
#[derive(Debug, Default)]
pub struct Standby {
    limits: StandbyLimits,
    lease_ms: u64,
    held: HashMap<Uuid, HeldTask>,
    bytes: usize,
    /// Leases granted, by coordinator's node: until when (on this node's clock).
    leases: HashMap<String, u64>,
    /// The latest numbered checkpoint applied, by coordinator's node: its run and
    /// number. One entry per node that sent one, dropped when its tasks are taken over.
    applied: HashMap<String, (u64, u64)>,
    /// When a checkpoint was last applied, by coordinator's node and life: one entry
    /// per life heard from, dropped when that life's tasks are taken over.
    heard: HashMap<(String, u64), u64>,
    /// Tasks that ended at their coordinators, and in the order they were told.
    ended: HashMap<Uuid, EndedAt>,
    ended_order: VecDeque<(Uuid, u64)>,
    /// The outcomes that came with those ends, while they fit (larger ones for a
    /// minute).
    outcomes: EndedTasks,
}

impl Standby {
    /// An empty standby within `limits`, answering with leases of `lease_ms`.
    pub fn new(limits: StandbyLimits, lease_ms: u64) -> Standby {
        Standby {
            limits,
            lease_ms,
            ..Standby::default()
        }
    }

    /// Tasks held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether it holds `task`.
    pub fn holds(&self, task: Uuid) -> bool {
        self.held.contains_key(&task)
    }

    /// Where and when `task` ended, if its coordinator told this node so within
    /// [`ENDED_MEMORY_MS`] before `now_ms` (and it is among the last
    /// [`ENDED_REMEMBERED`] told).
    pub fn ended(&self, task: Uuid, now_ms: u64) -> Option<&EndedAt> {
        self.ended
            .get(&task)
            .filter(|e| now_ms.saturating_sub(e.at_ms) < ENDED_MEMORY_MS)
    }

    /// The outcome that came with `task`'s end, if it is still kept (and the end is
    /// still remembered, [`Standby::ended`]).
    pub fn outcome(&self, task: Uuid, now_ms: u64) -> Option<&TaskOutcome> {
        self.ended(task, now_ms)?;
        match self.outcomes.get(task, now_ms) {
            Ended::Outcome(outcome) => Some(outcome),
            Ended::Forgotten | Ended::Unknown => None,
        }
    }

    fn remember_ended(&mut self, task: Uuid, node: &str, life: u64, now_ms: u64) {
        while let Some(&(oldest, at_ms)) = self.ended_order.front() {
            let expired = now_ms.saturating_sub(at_ms) >= ENDED_MEMORY_MS;
            if !expired && self.ended_order.len() < ENDED_REMEMBERED {
                break;
            }
            self.ended_order.pop_front();
            if self.ended.get(&oldest).is_some_and(|e| e.at_ms == at_ms) {
                self.ended.remove(&oldest);
            }
        }
        let node = node.to_string();
        self.ended.insert(
            task,
            EndedAt {
                node,
                life,
                at_ms: now_ms,
            },
        );
        self.ended_order.push_back((task, now_ms));
    }

    /// Takes a checkpoint from `checkpoint.primary`, arrived at `now_ms`, and grants
    /// its sender a lease from then. `running` says whether a task runs here already
    /// (taken over earlier): such a task is not held again, and the answer says so, so
    /// that a coordinator that was only cut off stops running it.
    ///
    /// A numbered checkpoint older than one already applied from the same coordinator
    /// run is dropped whole, with no lease: `Stale`. (Its sender has moved on: it sends
    /// the next only once the one before is answered, failed, or its standby was held
    /// down, and then ignores any answer to the one before.) One from another run
    /// starts that run's numbering here.
    pub fn apply(
        &mut self,
        checkpoint: Checkpoint,
        running: impl Fn(Uuid) -> bool,
        now_ms: u64,
    ) -> Result<CheckpointAck, Stale> {
        let primary = checkpoint.primary;
        let life = checkpoint.life;
        if checkpoint.incarnation != 0 {
            let run = (checkpoint.incarnation, checkpoint.number);
            match self.applied.get_mut(&primary) {
                Some((incarnation, applied))
                    if *incarnation == run.0 && *applied >= checkpoint.number =>
                {
                    return Err(Stale {
                        number: checkpoint.number,
                        applied: *applied,
                    });
                }
                Some(last) => *last = run,
                None => {
                    self.applied.insert(primary.clone(), run);
                }
            }
        }
        self.heard.insert((primary.clone(), life), now_ms);
        let mut ack = CheckpointAck {
            lease_ms: self.lease_ms,
            ..CheckpointAck::default()
        };
        // At most one lease per coordinator node; lapsed ones go, as do large outcomes
        // whose minute is over.
        self.leases.retain(|_, until| *until > now_ms);
        self.outcomes.expire(now_ms);
        let until = now_ms.saturating_add(self.lease_ms);
        let lease = self.leases.entry(primary.clone()).or_default();
        *lease = (*lease).max(until);
        for part in checkpoint.tasks {
            let task = part.task;
            let so_far = part.so_far;
            if running(task) {
                ack.taken_over.push(task);
                continue;
            }
            if part.ended {
                let held = self.forget(task);
                if part.finished {
                    self.remember_ended(task, &primary, life, now_ms);
                    let outcome = part.outcome.or_else(|| {
                        let held = held.filter(|h| h.primary == primary)?;
                        held.into_outcome(part.outcome_from_held?, part.done)
                    });
                    // Only the task's own outcome.
                    if let Some(outcome) = outcome.filter(|o| o.task == task) {
                        self.outcomes.record(outcome, now_ms);
                    }
                }
                continue;
            }
            if let Some(open) = part.open {
                self.forget(task);
                // The same id submitted again, after its end.
                self.ended.remove(&task);
                // Taken over, its attempt numbers would not fit in a u32.
                if open.generation > MAX_GENERATION {
                    ack.refused.push(task);
                    continue;
                }
                let held = HeldTask {
                    primary: primary.clone(),
                    life,
                    open,
                    done: BTreeMap::new(),
                    so_far,
                    so_far_ms: now_ms,
                    params: BTreeMap::new(),
                };
                let bytes = held.bytes();
                if self.held.len() >= self.limits.max_tasks
                    || self.bytes + bytes > self.limits.max_bytes
                {
                    ack.refused.push(task);
                    continue;
                }
                self.bytes += bytes;
                self.held.insert(task, held);
            }
            let Some(held) = self.held.get_mut(&task).filter(|h| h.primary == primary) else {
                ack.unknown.push(task);
                continue;
            };
            held.so_far = so_far;
            held.so_far_ms = now_ms;
            if let Some(priority) = part.priority {
                held.open.request.priority = Some(priority);
            }
            // Set once, they are only ever added to or changed, never cleared: a part
            // without them (unchanged since this node answered for them, or from an
            // older node) leaves them as they were.
            if !part.params.is_empty() && part.params != held.params {
                let (was, now) = (params_bytes(&held.params), params_bytes(&part.params));
                self.bytes = (self.bytes + now).saturating_sub(was);
                held.params = part.params;
            }
            let segments = held.open.request.inputs.len();
            let mut over = false;
            for (segment, result) in part.done {
                if segment as usize >= segments || held.done.contains_key(&segment) {
                    continue;
                }
                if self.bytes + result.0.len() > self.limits.max_bytes {
                    over = true;
                    break;
                }
                self.bytes += result.0.len();
                held.done.insert(segment, result.0);
            }
            if over {
                self.forget(task);
                ack.refused.push(task);
            }
        }
        Ok(ack)
    }

    /// Every task held for `node`, whose life `life` is down at `now_ms`, from that
    /// life or an earlier one: the caller runs them now, but for those whose life was
    /// last heard from [`TRUSTED_FOR_MS`] or more before, which are dropped. While a
    /// lease granted to `node` runs, none: `Err` says until when. Tasks of a later life
    /// (the node restarted, and its checkpoint came before word that its former life
    /// is down) stay held.
    pub fn take_over(&mut self, node: &str, life: u64, now_ms: u64) -> Result<Takeover, u64> {
        if let Some(&until) = self.leases.get(node) {
            if until > now_ms {
                return Err(until);
            }
            self.leases.remove(node);
        }
        // Its next checkpoint, if it was only cut off, starts again here.
        self.applied.remove(node);
        Ok(self.take(node, |held| held <= life, now_ms))
    }

    /// Every task held for `node` from a life before `life`, in which it is up again
    /// at `now_ms`: it restarted, so those lives have ended and nothing of theirs runs,
    /// whatever lease they were granted. The caller runs them now, but for those of a
    /// life last heard from [`TRUSTED_FOR_MS`] or more before, which are dropped.
    pub fn take_over_ended(&mut self, node: &str, life: u64, now_ms: u64) -> Takeover {
        self.take(node, |held| held < life, now_ms)
    }

    /// The tasks held for `node` whose life passes `of_life`, no longer held: to run,
    /// or dropped if their life was last heard from too long before `now_ms`.
    fn take(&mut self, node: &str, of_life: impl Fn(u64) -> bool, now_ms: u64) -> Takeover {
        let lives: Vec<(u64, u64)> = self
            .heard
            .iter()
            .filter(|((n, l), _)| n == node && of_life(*l))
            .map(|((_, l), at)| (*l, *at))
            .collect();
        for (l, _) in &lives {
            self.heard.remove(&(node.to_string(), *l));
        }
        // A life with a task held here had a checkpoint applied, so it has an entry.
        let unheard = |life: u64| {
            lives
                .iter()
                .find(|(l, _)| *l == life)
                .map_or(0, |(_, at)| now_ms.saturating_sub(*at))
        };
        let mut takeover = Takeover::default();
        for (task, held) in self.take_all(node, of_life) {
            let unheard_ms = unheard(held.life);
            if unheard_ms >= TRUSTED_FOR_MS {
                takeover.unheard_ms = takeover.unheard_ms.max(unheard_ms);
                takeover.dropped.push(task);
            } else {
                takeover.run.push((task, held));
            }
        }
        takeover
    }

    /// The tasks held for `node` whose life passes `of_life`, no longer held.
    fn take_all(&mut self, node: &str, of_life: impl Fn(u64) -> bool) -> Vec<(Uuid, HeldTask)> {
        let tasks: Vec<Uuid> = self
            .held
            .iter()
            .filter(|(_, h)| h.primary == node && of_life(h.life))
            .map(|(t, _)| *t)
            .collect();
        let mut out: Vec<(Uuid, HeldTask)> = tasks
            .into_iter()
            .filter_map(|t| Some((t, self.forget(t)?)))
            .collect();
        // By id: the same order on every run, for logs and tests.
        out.sort_by_key(|(t, _)| *t);
        out
    }

    /// Stops holding `task`: what was held of it, if anything.
    fn forget(&mut self, task: Uuid) -> Option<HeldTask> {
        let held = self.held.remove(&task)?;
        self.bytes -= held.bytes();
        Some(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{SubmitRequest, TaskCheckpoint};

    fn open(task: u128, segments: usize, input_bytes: usize) -> TaskCheckpoint {
        let inputs = vec![Blob(vec![1; input_bytes]); segments];
        TaskCheckpoint {
            task: Uuid::from_u128(task),
            open: Some(OpenTask {
                request: SubmitRequest::new("sleep", inputs).with_id(Uuid::from_u128(task)),
                generation: 0,
            }),
            done: Vec::new(),
            ended: false,
            finished: false,
            outcome: None,
            outcome_from_held: None,
            so_far: SoFar::default(),
            priority: None,
            params: Default::default(),
        }
    }

    fn done(task: u128, segments: &[(u32, usize)]) -> TaskCheckpoint {
        TaskCheckpoint {
            task: Uuid::from_u128(task),
            open: None,
            done: segments
                .iter()
                .map(|(s, n)| (*s, Blob(vec![2; *n])))
                .collect(),
            ended: false,
            finished: false,
            outcome: None,
            outcome_from_held: None,
            so_far: SoFar::default(),
            priority: None,
            params: Default::default(),
        }
    }

    /// A completed outcome of two results of `bytes` each.
    fn outcome(task: u128, bytes: usize) -> TaskOutcome {
        TaskOutcome {
            task: Uuid::from_u128(task),
            status: crate::service::TaskStatus::Completed,
            segments: 2,
            completed: 2,
            duplicates_discarded: 0,
            reallocated: 0,
            elapsed_ms: 40,
            reason: None,
            results: vec![Blob(vec![3; bytes]); 2],
            unknown: false,
            results_from: 0,
            more_results: false,
        }
    }

    /// An outcome too large for the cache (64 MiB of results) is held apart for a
    /// minute: a client whose coordinator's node went down while it fetched the pages
    /// gets the rest here. Before, the standby kept none.
    #[test]
    fn an_outcome_too_large_for_the_cache_is_held_for_a_minute() {
        let mut s = Standby::new(StandbyLimits::default(), LEASE_MS);
        let large = outcome(1, 33 << 20);
        let end = TaskCheckpoint {
            ended: true,
            finished: true,
            outcome: Some(large.clone()),
            ..done(1, &[])
        };
        s.apply(from("a", vec![end]), |_| false, 100).unwrap();
        let task = Uuid::from_u128(1);
        assert!(s.outcome(task, 100) == Some(&large));
        let over = 100 + crate::pages::LARGE_OUTCOME_HOLD_MS;
        assert!(s.outcome(task, over - 1).is_some());
        assert!(s.outcome(task, over).is_none());
        s.apply(from("a", Vec::new()), |_| false, over).unwrap();
        assert!(
            s.outcomes.held_apart() == 0,
            "let go at the next checkpoint after its minute"
        );
    }

    /// A task that ended at its coordinator is remembered, with that node and life and
    /// the outcome that came with the end, for ENDED_MEMORY_MS and among the last
    /// ENDED_REMEMBERED; one that only moved to another standby, or that is opened
    /// again, is not.
    #[test]
    fn a_task_that_ended_at_its_coordinator_is_remembered_for_a_while() {
        let mut s = Standby::new(StandbyLimits::default(), LEASE_MS);
        let no = |_| false;
        s.apply(from("a", vec![open(1, 2, 10), open(2, 2, 10)]), no, 0)
            .unwrap();
        let end = |task, finished| TaskCheckpoint {
            ended: true,
            finished,
            ..done(task, &[])
        };
        let outcome = |task: u128| outcome(task, 4);
        let mut checkpoint = from(
            "a",
            vec![
                TaskCheckpoint {
                    outcome: Some(outcome(1)),
                    ..end(1, true)
                },
                TaskCheckpoint {
                    outcome: Some(outcome(1)),
                    ..end(2, false)
                },
                TaskCheckpoint {
                    outcome: Some(outcome(4)),
                    ..end(3, true)
                },
            ],
        );
        checkpoint.life = 7;
        s.apply(checkpoint, no, 100).unwrap();
        assert_eq!(s.outcome(Uuid::from_u128(1), 100), Some(&outcome(1)));
        assert_eq!(s.outcome(Uuid::from_u128(2), 100), None, "it moved");
        assert_eq!(s.outcome(Uuid::from_u128(3), 100), None, "another task's");
        assert!(s.ended(Uuid::from_u128(3), 100).is_some());
        assert!(!s.holds(Uuid::from_u128(1)) && !s.holds(Uuid::from_u128(2)));
        let expected = EndedAt {
            node: "a".into(),
            life: 7,
            at_ms: 100,
        };
        assert_eq!(s.ended(Uuid::from_u128(1), 100), Some(&expected));
        assert_eq!(s.ended(Uuid::from_u128(2), 100), None, "it moved");
        assert_eq!(s.ended(Uuid::from_u128(1), 100 + ENDED_MEMORY_MS), None);
        assert_eq!(s.outcome(Uuid::from_u128(1), 100 + ENDED_MEMORY_MS), None);
        // The same id opened again is a task that runs.
        s.apply(from("a", vec![open(1, 1, 10)]), no, 200).unwrap();
        assert_eq!(s.ended(Uuid::from_u128(1), 200), None);
        // Bounded: the oldest go first.
        for task in 10..(10 + ENDED_REMEMBERED as u128 + 1) {
            s.apply(from("a", vec![end(task, true)]), no, 300).unwrap();
        }
        assert_eq!(s.ended.len(), ENDED_REMEMBERED);
        assert_eq!(s.ended_order.len(), ENDED_REMEMBERED);
        assert!(s.ended(Uuid::from_u128(10), 300).is_none());
        assert!(s.ended(Uuid::from_u128(11), 300).is_some());
    }

    /// The end of a task whose results the standby holds carries only those accepted
    /// since the last checkpoint (`outcome_from_held`): the outcome kept has every
    /// result, from the copy and from the end. One with a result in neither is not
    /// kept (the task is still remembered as ended), nor one from another coordinator
    /// than the copy's.
    #[test]
    fn an_outcome_is_made_of_the_results_held_and_those_sent_with_the_end() {
        let mut s = Standby::new(StandbyLimits::default(), LEASE_MS);
        let no = |_| false;
        let opens = vec![open(1, 3, 10), open(2, 3, 10), open(3, 3, 10)];
        s.apply(from("a", opens), no, 0).unwrap();
        let dones = vec![
            done(1, &[(0, 4), (2, 5)]),
            done(2, &[(0, 4)]),
            done(3, &[(0, 4), (1, 4)]),
        ];
        s.apply(from("a", dones), no, 10).unwrap();
        let end = |task: u128, sent: &[(u32, usize)]| TaskCheckpoint {
            ended: true,
            finished: true,
            outcome_from_held: Some(TaskOutcome {
                task: Uuid::from_u128(task),
                status: TaskStatus::Completed,
                segments: 3,
                completed: 3,
                duplicates_discarded: 0,
                reallocated: 1,
                elapsed_ms: 40,
                reason: None,
                results: Vec::new(),
                unknown: false,
                results_from: 0,
                more_results: false,
            }),
            ..done(task, sent)
        };
        s.apply(
            from("a", vec![end(1, &[(1, 6)]), end(2, &[(1, 6)])]),
            no,
            20,
        )
        .unwrap();
        s.apply(from("b", vec![end(3, &[(2, 6)])]), no, 20).unwrap();
        let one = s.outcome(Uuid::from_u128(1), 20).expect("task 1's outcome");
        let sizes: Vec<usize> = one.results.iter().map(|r| r.0.len()).collect();
        assert_eq!(sizes, [4, 6, 5], "held, sent, held");
        assert_eq!((one.reallocated, one.elapsed_ms), (1, 40));
        assert_eq!(s.outcome(Uuid::from_u128(2), 20), None, "segment 2 nowhere");
        assert!(s.ended(Uuid::from_u128(2), 20).is_some());
        assert_eq!(s.outcome(Uuid::from_u128(3), 20), None, "not a's end");
        assert!(!s.holds(Uuid::from_u128(1)) && !s.holds(Uuid::from_u128(2)));
    }

    fn from(primary: &str, tasks: Vec<TaskCheckpoint>) -> Checkpoint {
        Checkpoint {
            primary: primary.into(),
            tasks,
            incarnation: 0,
            number: 0,
            life: 0,
        }
    }

    fn numbered(
        primary: &str,
        incarnation: u64,
        number: u64,
        tasks: Vec<TaskCheckpoint>,
    ) -> Checkpoint {
        Checkpoint {
            incarnation,
            number,
            ..from(primary, tasks)
        }
    }

    /// A numbered checkpoint that arrives after a later one of the same coordinator
    /// run is dropped whole, with no lease: here an older start of task 1 would have
    /// taken back two of its three results. Another run (the coordinator restarted)
    /// and unnumbered checkpoints are applied, and a takeover starts the numbering
    /// again.
    #[test]
    fn a_checkpoint_older_than_one_applied_from_the_same_run_is_dropped() {
        let mut s = Standby::new(StandbyLimits::default(), 1_000);
        let no = |_| false;
        let mut later = open(1, 3, 1);
        later.done = done(1, &[(0, 1), (1, 1), (2, 1)]).done;
        let mut earlier = open(1, 3, 1);
        earlier.done = done(1, &[(0, 1)]).done;
        s.apply(numbered("a", 7, 5, vec![later]), no, 0).unwrap();
        assert_eq!(
            s.apply(numbered("a", 7, 4, vec![earlier.clone()]), no, 10),
            Err(Stale {
                number: 4,
                applied: 5
            })
        );
        assert_eq!(
            s.apply(numbered("a", 7, 5, Vec::new()), no, 10),
            Err(Stale {
                number: 5,
                applied: 5
            }),
            "the same number twice"
        );
        assert_eq!(s.held[&Uuid::from_u128(1)].done.len(), 3);
        assert_eq!(
            s.take_over("a", 0, 900),
            Err(1000),
            "no lease from the stale one"
        );
        // Another node's numbering is its own.
        s.apply(numbered("b", 7, 0, vec![open(2, 1, 1)]), no, 10)
            .unwrap();
        // A new run of "a" (its node restarted) starts again from any number.
        s.apply(numbered("a", 8, 0, vec![earlier.clone()]), no, 20)
            .unwrap();
        assert_eq!(s.held[&Uuid::from_u128(1)].done.len(), 1);
        // Unnumbered (an older node): always applied.
        s.apply(from("a", vec![done(1, &[(1, 1)])]), no, 30)
            .unwrap();
        assert_eq!(s.held[&Uuid::from_u128(1)].done.len(), 2);
        // After a takeover the node's numbering starts again.
        assert_eq!(s.take_over("a", 0, 1_030).unwrap().run.len(), 1);
        s.apply(numbered("a", 8, 0, vec![earlier]), no, 1_040)
            .unwrap();
        assert!(s.holds(Uuid::from_u128(1)));
    }

    /// A node's lives are told apart: when one life is down, the tasks of that life
    /// and earlier ones are taken over, not those a later life (the node restarted)
    /// sent meanwhile; when the node is up again in a later life, the tasks of the
    /// lives before go at once, lease or not, and the later life's stay.
    #[test]
    fn a_restarted_nodes_former_lives_are_taken_over_and_its_new_one_is_not() {
        let mut s = Standby::new(StandbyLimits::default(), 1_000);
        let no = |_| false;
        let of_life = |life, tasks| Checkpoint {
            life,
            ..from("a", tasks)
        };
        s.apply(of_life(5, vec![open(1, 1, 1)]), no, 0).unwrap();
        s.apply(of_life(5, vec![open(2, 1, 1)]), no, 0).unwrap();
        s.apply(of_life(9, vec![open(3, 1, 1)]), no, 10).unwrap();
        assert_eq!(s.take_over("a", 5, 500), Err(1_010), "the lease runs");
        let ids = |taken: Takeover| {
            assert!(taken.dropped.is_empty());
            taken
                .run
                .into_iter()
                .map(|(t, h)| (t.as_u128(), h.life))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(s.take_over_ended("a", 9, 500)), [(1, 5), (2, 5)]);
        assert!(s.holds(Uuid::from_u128(3)), "the new life's task stays");
        assert_eq!(s.take_over_ended("a", 9, 500), Takeover::default());
        s.apply(of_life(5, vec![open(4, 1, 1)]), no, 20).unwrap();
        assert_eq!(
            ids(s.take_over("a", 5, 2_000).unwrap()),
            [(4, 5)],
            "life 5 down: life 9's task stays"
        );
        assert_eq!(ids(s.take_over("a", 9, 2_000).unwrap()), [(3, 9)]);
        assert!(s.is_empty());
        assert_eq!(s.bytes, 0);
    }

    /// The parameters `adjust` set go with the task's parts: kept, replaced by later
    /// ones, left as they were by a part without any, and counted in the bytes held.
    #[test]
    fn a_tasks_parameters_are_kept_as_of_its_latest_part() {
        let mut s = Standby::new(StandbyLimits::default(), 0);
        let no = |_| false;
        s.apply(from("a", vec![open(1, 2, 10)]), no, 0).unwrap();
        let with = |k: &str, v: &str| TaskCheckpoint {
            params: [(k.to_string(), v.to_string())].into(),
            ..done(1, &[])
        };
        let params = |s: &Standby| s.held[&Uuid::from_u128(1)].params.clone();
        s.apply(from("a", vec![with("answer", "4")]), no, 0)
            .unwrap();
        assert_eq!(s.bytes, 20 + 7);
        s.apply(from("a", vec![done(1, &[])]), no, 0).unwrap();
        assert_eq!(params(&s), [("answer".into(), "4".into())].into());
        s.apply(from("a", vec![with("answer", "42")]), no, 0)
            .unwrap();
        assert_eq!(params(&s), [("answer".into(), "42".into())].into());
        assert_eq!(s.bytes, 20 + 8);
        let ended = TaskCheckpoint {
            ended: true,
            ..done(1, &[])
        };
        s.apply(from("a", vec![ended]), no, 0).unwrap();
        assert_eq!(s.bytes, 0);
    }

    /// A task is held from its start, gathers the results its coordinator accepted,
    /// is handed over when that coordinator's node goes down, and is forgotten when it
    /// ends; a task it never saw start is asked for again from its start.
    #[test]
    fn holds_tasks_until_they_end_or_their_coordinator_goes_down() {
        let mut s = Standby::new(StandbyLimits::default(), 0);
        let no = |_| false;
        let ack = s
            .apply(from("a", vec![open(1, 3, 10), open(2, 1, 10)]), no, 0)
            .unwrap();
        assert_eq!(ack, CheckpointAck::default());
        let ack = s
            .apply(
                from(
                    "a",
                    vec![done(1, &[(0, 4), (2, 4), (9, 4)]), done(3, &[(0, 1)])],
                ),
                no,
                0,
            )
            .unwrap();
        assert_eq!(ack.unknown, vec![Uuid::from_u128(3)], "never opened here");
        let so_far = SoFar {
            elapsed_ms: 700,
            reallocated: 2,
            duplicates_discarded: 1,
            running: 3,
        };
        // With a priority changed since the start (`agentmesh adjust`).
        let figures = TaskCheckpoint {
            so_far,
            priority: Some(200),
            ..done(1, &[])
        };
        s.apply(from("a", vec![figures]), no, 40).unwrap();
        let held = &s.held[&Uuid::from_u128(1)];
        assert_eq!(
            (held.so_far, held.so_far_ms),
            (so_far, 40),
            "the latest figures"
        );
        // A part with no priority leaves it as it was.
        s.apply(from("a", vec![done(1, &[])]), no, 40).unwrap();
        assert_eq!(
            s.held[&Uuid::from_u128(1)].open.request.priority,
            Some(200),
            "the latest priority"
        );
        let ended = TaskCheckpoint {
            ended: true,
            ..done(2, &[])
        };
        s.apply(from("a", vec![ended]), no, 0).unwrap();
        assert!(!s.holds(Uuid::from_u128(2)));
        assert_eq!(s.take_over("b", 0, 40), Ok(Takeover::default()));
        let taken = s.take_over("a", 0, 40).unwrap().run;
        assert_eq!(taken.len(), 1);
        let (task, held) = &taken[0];
        assert_eq!(*task, Uuid::from_u128(1));
        assert_eq!(
            held.done.keys().copied().collect::<Vec<_>>(),
            vec![0, 2],
            "segment 9 is not one"
        );
        assert!(s.is_empty());
        assert_eq!(s.bytes, 0);
    }

    /// Results from a node that is not the task's coordinator are not taken, and a
    /// task this node runs itself (taken over earlier) is said to be so.
    #[test]
    fn only_the_tasks_coordinator_adds_to_it_and_a_task_run_here_is_not_held() {
        let mut s = Standby::new(StandbyLimits::default(), 0);
        s.apply(from("a", vec![open(1, 2, 1)]), |_| false, 0)
            .unwrap();
        let ack = s
            .apply(from("b", vec![done(1, &[(0, 1)])]), |_| false, 0)
            .unwrap();
        assert_eq!(ack.unknown, vec![Uuid::from_u128(1)]);
        let ack = s
            .apply(
                from("a", vec![open(7, 1, 1)]),
                |t| t == Uuid::from_u128(7),
                0,
            )
            .unwrap();
        assert_eq!(ack.taken_over, vec![Uuid::from_u128(7)]);
        assert!(!s.holds(Uuid::from_u128(7)));
        assert!(s.take_over("a", 0, 0).unwrap().run[0].1.done.is_empty());
    }

    /// Past its task or byte limit, or its generation limit, a standby refuses, and
    /// frees what it refused.
    #[test]
    fn stays_within_its_limits() {
        let mut s = Standby::new(
            StandbyLimits {
                max_tasks: 2,
                max_bytes: 100,
            },
            0,
        );
        let no = |_| false;
        let ack = s
            .apply(
                from("a", vec![open(1, 1, 10), open(2, 1, 10), open(3, 1, 10)]),
                no,
                0,
            )
            .unwrap();
        assert_eq!(ack.refused, vec![Uuid::from_u128(3)]);
        let ack = s
            .apply(from("a", vec![done(1, &[(0, 90)])]), no, 0)
            .unwrap();
        assert_eq!(ack.refused, vec![Uuid::from_u128(1)]);
        assert!(!s.holds(Uuid::from_u128(1)));
        assert_eq!(s.bytes, 10);
        let ack = s.apply(from("a", vec![open(4, 1, 95)]), no, 0).unwrap();
        assert_eq!(ack.refused, vec![Uuid::from_u128(4)]);
        assert_eq!((s.len(), s.bytes), (1, 10));
        // A generation whose taker-over's attempt numbers would not fit in a u32 (the
        // checkpoint is bytes from another node): refused.
        let mut too_far = open(5, 1, 1);
        too_far.open.as_mut().unwrap().generation = MAX_GENERATION + 1;
        let ack = s.apply(from("a", vec![too_far]), no, 0).unwrap();
        assert_eq!(ack.refused, vec![Uuid::from_u128(5)]);
        let mut last = open(5, 1, 1);
        last.open.as_mut().unwrap().generation = MAX_GENERATION;
        let ack = s.apply(from("a", vec![last]), no, 0).unwrap();
        assert!(ack.refused.is_empty() && s.holds(Uuid::from_u128(5)));
    }

    /// A checkpoint's arrival starts a lease: its sender's tasks are not taken over
    /// until it ends, even with the sender held for down; a later checkpoint moves the
    /// end on; the answer says how long.
    #[test]
    fn a_takeover_waits_for_the_lease_granted_with_the_last_answer() {
        let mut s = Standby::new(StandbyLimits::default(), 1000);
        let ack = s
            .apply(from("a", vec![open(1, 1, 1)]), |_| false, 100)
            .unwrap();
        assert_eq!(ack.lease_ms, 1000);
        assert_eq!(s.take_over("a", 0, 500), Err(1100));
        let ack = s.apply(from("a", Vec::new()), |_| false, 600).unwrap();
        assert_eq!(ack.lease_ms, 1000, "a renewal with no task");
        assert_eq!(s.take_over("a", 0, 1100), Err(1600));
        assert_eq!(s.take_over("b", 0, 1100), Ok(Takeover::default()));
        let taken = s.take_over("a", 0, 1600).unwrap().run;
        assert_eq!(taken.len(), 1);
        assert!(s.is_empty());
    }

    /// A copy is run at a takeover only if its coordinator's life was heard from
    /// within `TRUSTED_FOR_MS` before: a coordinator that has heard nothing back for
    /// longer may have given its tasks to another standby. A renewal with no task
    /// counts as heard; each life is timed on its own, so a restarted node's new life
    /// speaking does not vouch for its former life's copies.
    #[test]
    fn a_copy_from_a_coordinator_unheard_for_too_long_is_dropped_not_run() {
        let mut s = Standby::new(StandbyLimits::default(), 1_000);
        let no = |_| false;
        let of_life = |primary, life, tasks| Checkpoint {
            life,
            ..from(primary, tasks)
        };
        s.apply(of_life("a", 1, vec![open(1, 1, 1)]), no, 0)
            .unwrap();
        s.apply(of_life("a", 1, Vec::new()), no, 2_000).unwrap();
        let taken = s.take_over("a", 1, 2_000 + TRUSTED_FOR_MS - 1).unwrap();
        assert_eq!(taken.run.len(), 1, "heard from (a renewal) just in time");

        s.apply(of_life("b", 1, vec![open(2, 1, 1)]), no, 0)
            .unwrap();
        let taken = s.take_over("b", 1, TRUSTED_FOR_MS).unwrap();
        assert!(taken.run.is_empty());
        assert_eq!(taken.dropped, [Uuid::from_u128(2)]);
        assert_eq!(taken.unheard_ms, TRUSTED_FOR_MS);
        assert!(s.is_empty(), "dropped, not held on");

        s.apply(of_life("c", 1, vec![open(3, 1, 1)]), no, 0)
            .unwrap();
        s.apply(of_life("c", 2, vec![open(4, 1, 1)]), no, 5_000)
            .unwrap();
        let taken = s.take_over_ended("c", 2, 5_000);
        assert_eq!(
            taken.dropped,
            [Uuid::from_u128(3)],
            "life 2 speaks only for itself"
        );
        assert!(s.holds(Uuid::from_u128(4)));
        assert_eq!(s.bytes, 1);
        assert_eq!(s.heard.len(), 1, "only c's life 2 is left to time");
    }
}
