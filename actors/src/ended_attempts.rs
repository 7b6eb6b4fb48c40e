//! The attempts that ended at this worker node lately, so that an ALLOCATE that comes
//! again does not run its attempt a second time. A coordinator sends an ALLOCATE again
//! when the connection it went on was lost (`kept.rs`), not knowing whether it arrived
//! first: the attempt may have run here and ended, its final REPORT on its way. Without
//! this, each ALLOCATE of the last ten seconds before such a loss ran again. An attempt
//! whose cancel came before its ALLOCATE (it overtook it on the urgent lane,
//! `early_adjusts.rs`) is remembered the same way once the ALLOCATE comes. Bounded in attempts and in time. No I/O and no clock: the
//! caller says when.

use std::collections::{HashSet, VecDeque};

use uuid::Uuid;

/// An attempt: task, segment, attempt number.
pub type AttemptKey = (Uuid, u32, u32);

/// Attempts that ended, with when, oldest first.
#[derive(Debug)]
pub struct EndedAttempts {
    keep_ms: u64,
    max: usize,
    keys: HashSet<AttemptKey>,
    order: VecDeque<(u64, AttemptKey)>,
}

impl EndedAttempts {
    /// Remembers each ended attempt for `keep_ms`, and `max` of them at most (past it,
    /// the oldest is forgotten first).
    pub fn new(keep_ms: u64, max: usize) -> EndedAttempts {
        EndedAttempts {
            keep_ms,
            max,
            keys: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// `attempt` ended at `now_ms`.
    pub fn insert(&mut self, attempt: AttemptKey, now_ms: u64) {
        self.expire(now_ms);
        if self.max == 0 || !self.keys.insert(attempt) {
            return;
        }
        self.order.push_back((now_ms, attempt));
        while self.order.len() > self.max {
            self.pop_oldest();
        }
    }

    /// Whether `attempt` ended here within `keep_ms` of `now_ms`.
    pub fn contains(&mut self, attempt: &AttemptKey, now_ms: u64) -> bool {
        self.expire(now_ms);
        self.keys.contains(attempt)
    }

    /// How many are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True if none is.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn expire(&mut self, now_ms: u64) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now_ms >= at.saturating_add(self.keep_ms))
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front() {
            self.keys.remove(&key);
        }
        debug_assert_eq!(self.keys.len(), self.order.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(segment: u32) -> AttemptKey {
        (Uuid::from_u128(7), segment, 1)
    }

    #[test]
    fn an_ended_attempt_is_remembered_for_keep_ms() {
        let mut ended = EndedAttempts::new(1_000, 10);
        ended.insert(key(0), 100);
        assert!(ended.contains(&key(0), 1_099));
        assert!(!ended.contains(&key(1), 1_099));
        assert!(!ended.contains(&key(0), 1_100));
        assert!(ended.is_empty());
    }

    #[test]
    fn past_max_the_oldest_is_forgotten() {
        let mut ended = EndedAttempts::new(1_000, 2);
        ended.insert(key(0), 0);
        ended.insert(key(1), 1);
        ended.insert(key(1), 2); // Once only.
        assert_eq!(ended.len(), 2);
        ended.insert(key(2), 3);
        assert_eq!(ended.len(), 2);
        assert!(!ended.contains(&key(0), 4));
        assert!(ended.contains(&key(1), 4));
        assert!(ended.contains(&key(2), 4));
    }

    #[test]
    fn another_attempt_of_the_same_segment_is_not_taken_for_it() {
        let mut ended = EndedAttempts::new(1_000, 10);
        ended.insert((Uuid::from_u128(7), 3, 1), 0);
        assert!(!ended.contains(&(Uuid::from_u128(7), 3, 2), 1));
        assert!(!ended.contains(&(Uuid::from_u128(8), 3, 1), 1));
    }
}
