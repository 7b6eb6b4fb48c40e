//! Invariant checkers that watch a simulation as it runs and stop it at the first
//! violation: no segment lost, no result accepted twice, every segment of a dead node
//! reallocated within a bound, no task left hanging.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use foldhash::fast::FixedState;

use uuid::Uuid;

/// An invariant that did not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub invariant: &'static str,
    /// What was seen.
    pub detail: String,
}

/// No segment lost.
pub const NO_SEGMENT_LOST: &str = "no segment lost";
/// No result accepted twice.
pub const NO_DUPLICATE_ACCEPTED: &str = "no result accepted twice";
/// A dead node's segments are reallocated within the bound.
pub const REALLOCATED_IN_TIME: &str = "every segment of a dead node reallocated within the bound";
/// No task left hanging.
pub const NO_TASK_HANGING: &str = "no task left hanging";

/// A segment of a task of one coordinator (by node index).
type Key = (usize, Uuid, u32);

/// What the checkers remember.
#[derive(Debug, Default)]
pub struct Checker {
    realloc_bound_us: u64,
    accepted: HashSet<(Uuid, u32), FixedState>,
    accepted_per_task: HashMap<Uuid, u32, FixedState>,
    /// Segments whose worker's node crashed and that their coordinator has not yet
    /// taken back: since when.
    awaiting: BTreeMap<Key, u64>,
    awaiting_by_time: BTreeSet<(u64, Key)>,
    /// Segments taken back after a crash, waiting for a free worker: crash time.
    /// Not bounded: under overload a segment waits its turn like any other.
    restarting: BTreeMap<Key, u64>,
    /// Time from a crash to each of its segments' reallocation (taken back).
    pub realloc_latencies_us: Vec<u64>,
    /// Time from a crash to each of its segments' next attempt.
    pub restart_latencies_us: Vec<u64>,
}

impl Checker {
    /// Checkers with this bound on reallocation after a crash.
    pub fn new(realloc_bound_us: u64) -> Checker {
        Checker {
            realloc_bound_us,
            ..Checker::default()
        }
    }

    /// A coordinator accepted a result.
    pub fn result_accepted(
        &mut self,
        coord: usize,
        task: Uuid,
        segment: u32,
    ) -> Result<(), Violation> {
        if !self.accepted.insert((task, segment)) {
            return Err(Violation {
                invariant: NO_DUPLICATE_ACCEPTED,
                detail: format!("task {task} segment {segment} had a result accepted already"),
            });
        }
        *self.accepted_per_task.entry(task).or_default() += 1;
        self.forget((coord, task, segment));
        Ok(())
    }

    /// A task completed: every one of its segments must have had a result accepted.
    pub fn task_completed(
        &mut self,
        coord: usize,
        task: Uuid,
        segments: u32,
    ) -> Result<(), Violation> {
        let accepted = self.accepted_per_task.remove(&task).unwrap_or(0);
        self.task_ended(coord, task);
        if accepted != segments {
            return Err(Violation {
                invariant: NO_SEGMENT_LOST,
                detail: format!(
                    "task {task} completed with {accepted} of its {segments} segments accepted"
                ),
            });
        }
        for s in 0..segments {
            self.accepted.remove(&(task, s));
        }
        Ok(())
    }

    /// A task ended (completed, failed, or lost with its coordinator).
    pub fn task_ended(&mut self, coord: usize, task: Uuid) {
        let range = (coord, task, 0)..=(coord, task, u32::MAX);
        let keys: Vec<Key> = self
            .awaiting
            .range(range.clone())
            .chain(self.restarting.range(range))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.forget(k);
        }
    }

    /// The node of these segments' running attempts crashed at `now_us`.
    pub fn node_crashed(&mut self, now_us: u64, segments: impl IntoIterator<Item = Key>) {
        for key in segments {
            if self.awaiting.insert(key, now_us).is_none() {
                self.awaiting_by_time.insert((now_us, key));
            }
        }
    }

    /// A coordinator took a segment back (its attempt ended without a result) to
    /// give it another worker: for a crashed node's segment, within the bound.
    pub fn reallocated(&mut self, now_us: u64, key: Key) -> Result<(), Violation> {
        let Some(since) = self.forget(key) else {
            return Ok(());
        };
        self.restarting.insert(key, since);
        self.realloc_latencies_us.push(now_us - since);
        if now_us - since > self.realloc_bound_us {
            return Err(Violation {
                invariant: REALLOCATED_IN_TIME,
                detail: format!(
                    "task {} segment {} reallocated {} ms after its node crashed (bound {} ms)",
                    key.1,
                    key.2,
                    (now_us - since) / 1000,
                    self.realloc_bound_us / 1000
                ),
            });
        }
        Ok(())
    }

    /// A coordinator started a new attempt of a segment.
    pub fn allocated(&mut self, now_us: u64, key: Key) -> Result<(), Violation> {
        if self.awaiting.contains_key(&key) {
            self.reallocated(now_us, key)?;
        }
        if let Some(since) = self.restarting.remove(&key) {
            self.restart_latencies_us.push(now_us - since);
        }
        Ok(())
    }

    /// Checks the time-bound invariant at `now_us`.
    pub fn check_time(&self, now_us: u64) -> Result<(), Violation> {
        match self.awaiting_by_time.first() {
            Some((since, (_, task, segment))) if now_us > since + self.realloc_bound_us => {
                Err(Violation {
                    invariant: REALLOCATED_IN_TIME,
                    detail: format!(
                        "task {task} segment {segment} still not reallocated {} ms after its node crashed (bound {} ms)",
                        (now_us - since) / 1000,
                        self.realloc_bound_us / 1000
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    /// Segments still waiting for reallocation.
    pub fn awaiting(&self) -> usize {
        self.awaiting.len()
    }

    fn forget(&mut self, key: Key) -> Option<u64> {
        self.restarting.remove(&key);
        let since = self.awaiting.remove(&key)?;
        self.awaiting_by_time.remove(&(since, key));
        Some(since)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t() -> Uuid {
        Uuid::from_u128(9)
    }

    #[test]
    fn a_second_accepted_result_is_a_violation() {
        let mut c = Checker::new(1_000);
        c.result_accepted(0, t(), 3).unwrap();
        let v = c.result_accepted(0, t(), 3).unwrap_err();
        assert_eq!(v.invariant, NO_DUPLICATE_ACCEPTED);
    }

    #[test]
    fn a_task_completed_without_all_its_results_lost_a_segment() {
        let mut c = Checker::new(1_000);
        c.result_accepted(0, t(), 0).unwrap();
        let v = c.task_completed(0, t(), 2).unwrap_err();
        assert_eq!(v.invariant, NO_SEGMENT_LOST);
        c.result_accepted(1, Uuid::from_u128(1), 0).unwrap();
        c.task_completed(1, Uuid::from_u128(1), 1).unwrap();
    }

    #[test]
    fn a_crashed_segment_must_be_reallocated_within_the_bound() {
        let mut c = Checker::new(1_000);
        c.node_crashed(10, [(0, t(), 0), (0, t(), 1)]);
        c.allocated(500, (0, t(), 0)).unwrap();
        assert_eq!(c.realloc_latencies_us, vec![490]);
        assert_eq!(c.restart_latencies_us, vec![490]);
        c.check_time(1_010).unwrap();
        let v = c.check_time(1_011).unwrap_err();
        assert_eq!(v.invariant, REALLOCATED_IN_TIME);
        c.task_ended(0, t());
        c.check_time(5_000).unwrap();
        assert_eq!(c.awaiting(), 0);
        c.node_crashed(6_000, [(0, t(), 2)]);
        let late = c.allocated(7_001, (0, t(), 2)).unwrap_err();
        assert_eq!(late.invariant, REALLOCATED_IN_TIME);
    }

    #[test]
    fn a_segment_taken_back_in_time_may_wait_for_a_free_worker() {
        let mut c = Checker::new(1_000);
        c.node_crashed(0, [(0, t(), 0)]);
        c.reallocated(800, (0, t(), 0)).unwrap();
        // Overloaded: no worker is free for a long while; that is queueing, not loss.
        c.check_time(60_000).unwrap();
        c.allocated(60_000, (0, t(), 0)).unwrap();
        assert_eq!(c.realloc_latencies_us, vec![800]);
        assert_eq!(c.restart_latencies_us, vec![60_000]);
        // Taken back too late is still a violation, whether or not a worker is free.
        c.node_crashed(100_000, [(0, t(), 1)]);
        let late = c.reallocated(101_001, (0, t(), 1)).unwrap_err();
        assert_eq!(late.invariant, REALLOCATED_IN_TIME);
    }
}
