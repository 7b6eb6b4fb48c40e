//! Checkpoints in flight from a coordinator to its standbys: at most one to each, so
//! that answers come in the order sent, which leases (`lease.rs`) count on. A node
//! held down and up again while a checkpoint to it was still in flight gets a new one;
//! the answer to the old one, when it comes, is stale and must be ignored (before,
//! it was taken, and a lease answered out of order tripped `Leases::granted`). No I/O.

use std::collections::HashMap;
use std::sync::Arc;

/// Why no checkpoint goes to a standby now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Busy {
    /// The checkpoint with this number is in flight.
    InFlight(u64),
    /// The last one failed; the next may go at this time (ms).
    RetryAt(u64),
}

/// The standbys a checkpoint cannot go to now, and the numbering of checkpoints.
#[derive(Debug, Default)]
pub struct InFlight {
    busy: HashMap<Arc<str>, Busy>,
    /// Checkpoints sent so far: the next one's number.
    sent: u64,
}

impl InFlight {
    /// A checkpoint goes to `node` now: its number, to hand back with the answer.
    pub fn send(&mut self, node: Arc<str>) -> u64 {
        debug_assert!(
            !matches!(self.busy.get(&node), Some(Busy::InFlight(_))),
            "one checkpoint in flight per standby"
        );
        let number = self.sent;
        self.sent += 1;
        self.busy.insert(node, Busy::InFlight(number));
        number
    }

    /// The checkpoint `number` to `node` was answered (or failed): true if it is the
    /// one in flight to `node`, which no longer is; false if it is stale (sent before
    /// `node` was last forgotten), and nothing changes.
    pub fn answered(&mut self, node: &str, number: u64) -> bool {
        let current = self.busy.get(node) == Some(&Busy::InFlight(number));
        if current {
            self.busy.remove(node);
        }
        current
    }

    /// Nothing goes to `node` before `at_ms` (its last checkpoint failed).
    pub fn retry_at(&mut self, node: Arc<str>, at_ms: u64) {
        self.busy.insert(node, Busy::RetryAt(at_ms));
    }

    /// Whether a checkpoint to `node` is in flight (not merely waiting to retry).
    pub fn in_flight(&self, node: &str) -> bool {
        matches!(self.busy.get(node), Some(Busy::InFlight(_)))
    }

    /// `node` is down: what is in flight to it is stale from now on.
    pub fn forget(&mut self, node: &str) {
        self.busy.remove(node);
    }

    /// Whether nothing may go to `node` at `now_ms`. (A retry time passed stays until
    /// the next send to `node` or its `forget`: at most one entry per node.)
    pub fn blocks(&self, node: &str, now_ms: u64) -> bool {
        match self.busy.get(node) {
            Some(Busy::InFlight(_)) => true,
            Some(Busy::RetryAt(at)) => *at > now_ms,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One in flight per node; one sent before the node was forgotten is stale when
    /// answered, even after a newer one was answered, and does not free the node.
    #[test]
    fn an_answer_to_a_checkpoint_sent_before_the_node_went_down_is_stale() {
        let mut f = InFlight::default();
        let b: Arc<str> = Arc::from("b");
        let old = f.send(b.clone());
        assert!(f.blocks("b", 0) && f.blocks("b", u64::MAX));
        f.forget("b");
        assert!(!f.blocks("b", 0), "down: the next goes when it is up again");
        let new = f.send(b.clone());
        assert_ne!(old, new);
        assert!(!f.answered("b", old), "stale while the new one flies");
        assert!(f.blocks("b", 0), "a stale answer frees nothing");
        assert!(f.answered("b", new));
        assert!(!f.blocks("b", 0));
        assert!(!f.answered("b", old), "stale after it too");
        assert!(!f.answered("b", new), "answered once");
    }

    #[test]
    fn a_failed_checkpoint_blocks_its_node_until_the_retry_time() {
        let mut f = InFlight::default();
        let b: Arc<str> = Arc::from("b");
        let n = f.send(b.clone());
        assert!(f.answered("b", n));
        f.retry_at(b.clone(), 500);
        assert!(f.blocks("b", 499));
        assert!(!f.blocks("b", 500));
        f.send(b);
        assert!(f.blocks("b", u64::MAX), "in flight does not expire");
    }
}
