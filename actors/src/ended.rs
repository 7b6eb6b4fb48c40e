//! What a coordinator remembers of the tasks that ended on it, so that a client that
//! lost its connection while waiting can submit the same task again and get its
//! outcome, and a task never runs twice: the ids of many ended tasks, and the whole
//! outcomes of the latest few. Both are bounded. An outcome too large for the cache is
//! held apart for a minute, the latest two (`pages::LargeOutcomes`), long enough for
//! its client to fetch its pages. A standby keeps the same of the outcomes its
//! coordinators send with their tasks' ends (`standby.rs`).

use std::collections::{HashSet, VecDeque};

use uuid::Uuid;

use crate::pages::LargeOutcomes;
use crate::service::TaskOutcome;

/// How much is remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndedLimits {
    /// Ended task ids (16 bytes each, twice over).
    pub ids: usize,
    /// Whole outcomes.
    pub outcomes: usize,
    /// Bytes of results across the outcomes kept.
    pub result_bytes: usize,
}

impl Default for EndedLimits {
    fn default() -> EndedLimits {
        EndedLimits {
            ids: 65_536,
            outcomes: 256,
            result_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What is known of a task id.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended<'a> {
    /// It ended here lately: its outcome.
    Outcome(&'a TaskOutcome),
    /// It ended here, and its outcome is no longer kept.
    Forgotten,
    /// It did not end here (or so long ago that its id is gone too).
    Unknown,
}

/// The ended tasks a coordinator remembers, oldest first.
#[derive(Debug)]
pub struct EndedTasks {
    limits: EndedLimits,
    ids: VecDeque<Uuid>,
    known: HashSet<Uuid>,
    outcomes: VecDeque<TaskOutcome>,
    result_bytes: usize,
    /// Outcomes too large for `outcomes`, held apart for a minute.
    large: LargeOutcomes,
}

impl Default for EndedTasks {
    fn default() -> EndedTasks {
        EndedTasks::new(EndedLimits::default())
    }
}

impl EndedTasks {
    /// Nothing remembered yet.
    pub fn new(limits: EndedLimits) -> EndedTasks {
        EndedTasks {
            limits,
            ids: VecDeque::new(),
            known: HashSet::new(),
            outcomes: VecDeque::new(),
            result_bytes: 0,
            large: LargeOutcomes::default(),
        }
    }

    /// Remembers that `outcome`'s task ended at `now_ms`, and its outcome while it fits:
    /// the oldest make room. An outcome whose results alone exceed the byte limit is
    /// held apart for a minute instead, in place of the oldest such.
    pub fn record(&mut self, outcome: TaskOutcome, now_ms: u64) {
        if self.known.insert(outcome.task) {
            self.ids.push_back(outcome.task);
        }
        while self.ids.len() > self.limits.ids {
            if let Some(old) = self.ids.pop_front() {
                self.known.remove(&old);
            }
        }
        let bytes = outcome.result_bytes();
        if self.limits.outcomes == 0 || bytes > self.limits.result_bytes {
            return self.large.hold(outcome, now_ms);
        }
        while self.outcomes.len() >= self.limits.outcomes
            || self.result_bytes + bytes > self.limits.result_bytes
        {
            let Some(old) = self.outcomes.pop_front() else {
                break;
            };
            self.result_bytes -= old.result_bytes();
        }
        self.result_bytes += bytes;
        self.outcomes.push_back(outcome);
        debug_assert!(self.outcomes.len() <= self.limits.outcomes);
        debug_assert!(self.result_bytes <= self.limits.result_bytes);
        debug_assert_eq!(self.ids.len(), self.known.len());
    }

    /// How much is remembered.
    pub fn limits(&self) -> EndedLimits {
        self.limits
    }

    /// What is known of `task` at `now_ms`: its outcome from the cache or, for one
    /// too large for it, held apart while its minute runs.
    pub fn get(&self, task: Uuid, now_ms: u64) -> Ended<'_> {
        match self.cached(task) {
            Ended::Forgotten => self
                .large
                .get(task, now_ms)
                .map_or(Ended::Forgotten, Ended::Outcome),
            known => known,
        }
    }

    /// Lets go of the outcomes held apart whose minute is over at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        self.large.expire(now_ms);
    }

    /// Outcomes held apart now.
    #[cfg(test)]
    pub(crate) fn held_apart(&self) -> usize {
        self.large.len()
    }

    /// What the cache alone knows of `task`.
    fn cached(&self, task: Uuid) -> Ended<'_> {
        if !self.known.contains(&task) {
            return Ended::Unknown;
        }
        match self.outcomes.iter().rev().find(|o| o.task == task) {
            Some(outcome) => Ended::Outcome(outcome),
            None => Ended::Forgotten,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::TaskStatus;

    fn outcome(n: u8, bytes: usize) -> TaskOutcome {
        TaskOutcome {
            task: Uuid::from_bytes([n; 16]),
            status: TaskStatus::Completed,
            segments: 1,
            completed: 1,
            duplicates_discarded: 0,
            reallocated: 0,
            elapsed_ms: 1,
            reason: None,
            results: vec![crate::service::serde_bytes_vec::Blob(vec![n; bytes])],
            unknown: false,
            results_from: 0,
            more_results: false,
        }
    }

    #[test]
    fn keeps_the_latest_outcomes_and_more_ids_within_its_limits() {
        let mut ended = EndedTasks::new(EndedLimits {
            ids: 4,
            outcomes: 2,
            result_bytes: 100,
        });
        for n in 1..=5 {
            ended.record(outcome(n, 10), 0);
        }
        let id = |n: u8| Uuid::from_bytes([n; 16]);
        assert_eq!(ended.cached(id(5)), Ended::Outcome(&outcome(5, 10)));
        assert_eq!(ended.cached(id(4)), Ended::Outcome(&outcome(4, 10)));
        assert_eq!(ended.cached(id(3)), Ended::Forgotten);
        assert_eq!(ended.cached(id(2)), Ended::Forgotten);
        assert_eq!(ended.cached(id(1)), Ended::Unknown);
        assert_eq!(ended.cached(id(9)), Ended::Unknown);
        // Bytes bound too: a 95-byte outcome leaves room for no other.
        ended.record(outcome(6, 95), 0);
        assert_eq!(ended.cached(id(5)), Ended::Forgotten);
        assert_eq!(ended.cached(id(6)), Ended::Outcome(&outcome(6, 95)));
        // One larger than the whole budget keeps only its id, and evicts nothing.
        ended.record(outcome(7, 101), 0);
        assert_eq!(ended.cached(id(7)), Ended::Forgotten);
        assert_eq!(ended.cached(id(6)), Ended::Outcome(&outcome(6, 95)));
    }
}
