//! ADJUSTs that reached this worker node before the ALLOCATE of their attempt, kept so
//! that the ALLOCATE, when it comes from the same node, starts the attempt as adjusted.
//! A coordinator sends ADJUST on the urgent lane and ALLOCATE at its task's priority,
//! and order holds within a lane only: an ADJUST sent after an ALLOCATE can arrive
//! first, above all while the ALLOCATE waits behind bulk frames. Dropped, as it was
//! before, its attempt ran with the parameters as of its ALLOCATE, or ran although
//! cancelled. Bounded in entries, bytes and time. No I/O and no clock: the caller says
//! when.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::ended_attempts::AttemptKey;
use crate::service::params_bytes;

/// What an ADJUST asked of an attempt that had not come yet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EarlyAdjust {
    /// The task's parameters as the ADJUST carried them (all set so far).
    pub params: BTreeMap<String, String>,
    /// The priority it set, if it set one.
    pub priority: Option<u8>,
    /// Whether it cancelled the attempt.
    pub cancel: bool,
}

/// Bytes an entry is counted for besides its parameters: its key, its node's name and
/// what the maps hold it in.
const ENTRY_BYTES: usize = 96;

/// The ADJUSTs of attempts not here yet, by attempt and sending node, oldest first.
#[derive(Debug)]
pub struct EarlyAdjusts {
    keep_ms: u64,
    max: usize,
    max_bytes: usize,
    bytes: usize,
    entries: HashMap<(AttemptKey, String), EarlyAdjust>,
    /// When each came, oldest first.
    order: VecDeque<(u64, AttemptKey, String)>,
}

impl EarlyAdjusts {
    /// Keeps each for `keep_ms` after the first ADJUST of its attempt, and at most `max`
    /// of them and `max_bytes` (past either, the oldest is forgotten first).
    pub fn new(keep_ms: u64, max: usize, max_bytes: usize) -> EarlyAdjusts {
        EarlyAdjusts {
            keep_ms,
            max,
            max_bytes,
            bytes: 0,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// `peer` sent this ADJUST for `attempt`, not here, at `now_ms`. A later one for the
    /// same attempt from the same node replaces what an earlier one asked (each carries
    /// all the task's parameters), but a cancel stays, and so does a priority until a
    /// later one sets another.
    pub fn insert(&mut self, attempt: AttemptKey, peer: &str, adjust: EarlyAdjust, now_ms: u64) {
        self.expire(now_ms);
        let size = entry_bytes(peer, &adjust);
        if self.max == 0 || size > self.max_bytes {
            return;
        }
        let id = (attempt, peer.to_string());
        match self.entries.get_mut(&id) {
            Some(kept) => {
                self.bytes -= entry_bytes(peer, kept);
                let cancel = kept.cancel || adjust.cancel;
                let priority = adjust.priority.or(kept.priority);
                *kept = EarlyAdjust {
                    cancel,
                    priority,
                    ..adjust
                };
                self.bytes += size;
            }
            None => {
                self.entries.insert(id, adjust);
                self.order.push_back((now_ms, attempt, peer.to_string()));
                self.bytes += size;
            }
        }
        while self.entries.len() > self.max || self.bytes > self.max_bytes {
            self.pop_oldest();
        }
    }

    /// What `peer` asked of `attempt` before its ALLOCATE came, if it did within
    /// `keep_ms`, forgotten once taken. What another node sent is not given.
    pub fn take(&mut self, attempt: &AttemptKey, peer: &str, now_ms: u64) -> Option<EarlyAdjust> {
        self.expire(now_ms);
        if self.entries.is_empty() {
            // As nearly always: no key built for each ALLOCATE.
            return None;
        }
        let id = (*attempt, peer.to_string());
        let adjust = self.entries.remove(&id)?;
        self.bytes -= entry_bytes(peer, &adjust);
        self.order
            .retain(|(_, a, p)| (a, p.as_str()) != (attempt, peer));
        self.check();
        Some(adjust)
    }

    /// Forgets what `peer` sent: it went down, and what it allocates in a later life
    /// is new attempts.
    pub fn forget_node(&mut self, peer: &str) {
        let before = self.entries.len();
        self.entries.retain(|(_, p), _| p != peer);
        if self.entries.len() != before {
            self.order.retain(|(_, _, p)| p != peer);
            self.bytes = self
                .entries
                .iter()
                .map(|((_, p), a)| entry_bytes(p, a))
                .sum();
        }
        self.check();
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if none is.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes kept, as counted against `max_bytes`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn expire(&mut self, now_ms: u64) {
        while self
            .order
            .front()
            .is_some_and(|(at, _, _)| now_ms >= at.saturating_add(self.keep_ms))
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, attempt, peer)) = self.order.pop_front() {
            if let Some(adjust) = self.entries.remove(&(attempt, peer.clone())) {
                self.bytes -= entry_bytes(&peer, &adjust);
            }
        }
        self.check();
    }

    fn check(&self) {
        debug_assert_eq!(self.entries.len(), self.order.len());
    }
}

fn entry_bytes(peer: &str, adjust: &EarlyAdjust) -> usize {
    ENTRY_BYTES + peer.len() + params_bytes(&adjust.params)
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn key(segment: u32) -> AttemptKey {
        (Uuid::from_u128(7), segment, 1)
    }

    fn params(value: &str) -> EarlyAdjust {
        EarlyAdjust {
            params: BTreeMap::from([("k".to_string(), value.to_string())]),
            ..EarlyAdjust::default()
        }
    }

    #[test]
    fn an_adjust_is_given_once_to_the_allocate_from_its_node_within_keep_ms() {
        let mut early = EarlyAdjusts::new(1_000, 10, 1 << 20);
        early.insert(key(0), "alpha", params("1"), 100);
        assert_eq!(early.take(&key(0), "beta", 200), None, "another node's");
        assert_eq!(early.take(&key(1), "alpha", 200), None, "another attempt's");
        assert_eq!(early.take(&key(0), "alpha", 200), Some(params("1")));
        assert_eq!(early.take(&key(0), "alpha", 200), None, "taken once");
        assert_eq!(early.bytes(), 0);

        early.insert(key(0), "alpha", params("1"), 100);
        assert_eq!(early.take(&key(0), "alpha", 1_100), None, "kept 1 s");
        assert!(early.is_empty());
        assert_eq!(early.bytes(), 0);
    }

    #[test]
    fn a_later_adjust_replaces_an_earlier_one_but_not_its_cancel() {
        let mut early = EarlyAdjusts::new(1_000, 10, 1 << 20);
        early.insert(key(0), "alpha", params("1"), 0);
        early.insert(key(0), "alpha", params("22"), 1);
        assert_eq!(early.len(), 1);
        assert_eq!(early.bytes(), ENTRY_BYTES + "alpha".len() + "k22".len());
        assert_eq!(early.take(&key(0), "alpha", 2), Some(params("22")));

        let cancel = EarlyAdjust {
            cancel: true,
            ..EarlyAdjust::default()
        };
        early.insert(key(0), "alpha", cancel, 3);
        early.insert(key(0), "alpha", params("3"), 4);
        let taken = early.take(&key(0), "alpha", 5).unwrap();
        assert!(taken.cancel, "{taken:?}");
        assert_eq!(taken.params, params("3").params);

        // A priority stays until a later ADJUST sets another.
        let raise = EarlyAdjust {
            priority: Some(200),
            ..params("4")
        };
        early.insert(key(0), "alpha", raise, 5);
        early.insert(key(0), "alpha", params("5"), 5);
        let taken = early.take(&key(0), "alpha", 5).unwrap();
        assert_eq!(
            (taken.priority, taken.params),
            (Some(200), params("5").params)
        );

        // Another node's ADJUST of the same attempt is kept beside it, not over it.
        early.insert(key(0), "alpha", params("1"), 6);
        early.insert(key(0), "mallory", params("evil"), 7);
        assert_eq!(early.take(&key(0), "alpha", 8), Some(params("1")));
    }

    #[test]
    fn past_max_or_max_bytes_the_oldest_is_forgotten() {
        let one = ENTRY_BYTES + "alpha".len() + "k1".len();
        let mut early = EarlyAdjusts::new(1_000, 2, 10 * one);
        early.insert(key(0), "alpha", params("1"), 0);
        early.insert(key(1), "alpha", params("1"), 1);
        early.insert(key(2), "alpha", params("1"), 2);
        assert_eq!(early.len(), 2);
        assert_eq!(early.take(&key(0), "alpha", 3), None);
        assert!(early.take(&key(1), "alpha", 3).is_some());
        assert!(early.take(&key(2), "alpha", 3).is_some());

        let mut early = EarlyAdjusts::new(1_000, 10, 2 * one);
        early.insert(key(0), "alpha", params("1"), 0);
        early.insert(key(1), "alpha", params("1"), 1);
        assert_eq!(early.bytes(), 2 * one);
        early.insert(key(2), "alpha", params("1"), 2);
        assert_eq!(early.bytes(), 2 * one);
        assert_eq!(early.take(&key(0), "alpha", 3), None);
        // One larger than all the room is not kept, and pushes nothing out.
        early.insert(key(3), "alpha", params(&"x".repeat(3 * one)), 4);
        assert_eq!(early.len(), 2);
        assert_eq!(early.take(&key(3), "alpha", 5), None);
    }

    /// What [`EarlyAdjusts`] should hold, written plainly: entries oldest first.
    #[derive(Default)]
    struct Model {
        entries: Vec<(u64, AttemptKey, String, EarlyAdjust)>,
    }

    impl Model {
        fn bytes(&self) -> usize {
            self.entries
                .iter()
                .map(|(_, _, p, a)| entry_bytes(p, a))
                .sum()
        }

        fn expire(&mut self, keep_ms: u64, now_ms: u64) {
            self.entries.retain(|(at, ..)| now_ms < at + keep_ms);
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Insert(u32, usize, u8, bool),
        Take(u32, usize),
        Forget(usize),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (0u32..3, 0usize..2, 0u8..40, proptest::bool::weighted(0.3))
                .prop_map(|(s, p, n, c)| Step::Insert(s, p, n, c)),
            (0u32..3, 0usize..2).prop_map(|(s, p)| Step::Take(s, p)),
            (0usize..2).prop_map(Step::Forget),
        ]
    }

    proptest::proptest! {
        /// Whatever comes, in whatever order, it holds what the model holds, within
        /// its bounds, and gives what the model gives.
        #[test]
        fn it_keeps_what_a_plain_model_keeps(
            steps in proptest::collection::vec((step(), 0u64..300), 1..120),
            max in 0usize..5,
        ) {
            const KEEP_MS: u64 = 1_000;
            let max_bytes = 3 * ENTRY_BYTES;
            let peers = ["alpha", "beta"];
            let mut early = EarlyAdjusts::new(KEEP_MS, max, max_bytes);
            let mut model = Model::default();
            let mut now = 0;
            for (step, dt) in steps {
                now += dt;
                match step {
                    Step::Insert(segment, peer, n, cancel) => {
                        let adjust = EarlyAdjust {
                            params: BTreeMap::from([("k".to_string(), "v".repeat(n as usize * 4))]),
                            priority: (n % 3 != 0).then_some(n),
                            cancel,
                        };
                        let peer = peers[peer];
                        early.insert(key(segment), peer, adjust.clone(), now);
                        model.expire(KEEP_MS, now);
                        if max > 0 && entry_bytes(peer, &adjust) <= max_bytes {
                            let same = |e: &&mut (u64, AttemptKey, String, EarlyAdjust)| {
                                e.1 == key(segment) && e.2 == peer
                            };
                            match model.entries.iter_mut().find(|e| same(e)) {
                                Some(e) => {
                                    let cancel = e.3.cancel || adjust.cancel;
                                    let priority = adjust.priority.or(e.3.priority);
                                    e.3 = EarlyAdjust { cancel, priority, ..adjust };
                                }
                                None => model.entries.push((now, key(segment), peer.to_string(), adjust)),
                            }
                            while model.entries.len() > max || model.bytes() > max_bytes {
                                model.entries.remove(0);
                            }
                        }
                    }
                    Step::Take(segment, peer) => {
                        let peer = peers[peer];
                        let got = early.take(&key(segment), peer, now);
                        model.expire(KEEP_MS, now);
                        let at = model.entries.iter().position(|e| e.1 == key(segment) && e.2 == peer);
                        let want = at.map(|i| model.entries.remove(i).3);
                        proptest::prop_assert_eq!(got, want);
                    }
                    Step::Forget(peer) => {
                        early.forget_node(peers[peer]);
                        model.entries.retain(|e| e.2 != peers[peer]);
                    }
                }
                proptest::prop_assert_eq!(early.len(), model.entries.len());
                proptest::prop_assert_eq!(early.bytes(), model.bytes());
                proptest::prop_assert!(early.len() <= max && early.bytes() <= max_bytes);
            }
        }
    }

    #[test]
    fn a_node_that_went_down_leaves_nothing_kept() {
        let mut early = EarlyAdjusts::new(1_000, 10, 1 << 20);
        early.insert(key(0), "alpha", params("1"), 0);
        early.insert(key(1), "beta", params("1"), 1);
        early.insert(key(2), "alpha", params("1"), 2);
        early.forget_node("alpha");
        assert_eq!(early.len(), 1);
        assert_eq!(early.bytes(), ENTRY_BYTES + "beta".len() + "k1".len());
        assert!(early.take(&key(1), "beta", 3).is_some());
        assert_eq!(early.bytes(), 0);
    }
}
