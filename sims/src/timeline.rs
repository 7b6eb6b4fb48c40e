//! The simulator's timeline: events waiting for their virtual time, taken earliest
//! first and, at equal times, in the order they were pushed.
//!
//! Virtual time never goes back (an event is never scheduled before the one being
//! handled), so this is a radix heap rather than a binary heap: an entry sits in the
//! bucket of the highest bit where its time differs from the time reached. When
//! nothing is due, the lowest non-empty bucket is emptied into lower ones, so an entry
//! moves down a few times in its life instead of being sifted through the whole heap
//! at every pop. The order is exactly a binary heap's on (time, push number).

use std::collections::VecDeque;

use slab::Slab;

/// An entry: its time, its push number and where its event waits. Events stay put in
/// the slab while entries move between buckets.
#[derive(Clone, Copy)]
struct Entry {
    at: u64,
    pushed: u64,
    slot: u32,
}

/// Events of type `E` in (time, push order).
pub(crate) struct Timeline<E> {
    /// The time reached: the time of the last event taken.
    now: u64,
    /// The entries due at `now`, in push order.
    due: VecDeque<Entry>,
    /// `buckets[i]` holds the entries whose time's highest bit differing from `now`
    /// is bit `i`.
    buckets: [Vec<Entry>; 64],
    /// Bit `i` is set when `buckets[i]` is not empty.
    occupied: u64,
    slots: Slab<E>,
    pushed: u64,
}

impl<E> Default for Timeline<E> {
    fn default() -> Timeline<E> {
        Timeline {
            now: 0,
            due: VecDeque::new(),
            buckets: std::array::from_fn(|_| Vec::new()),
            occupied: 0,
            slots: Slab::new(),
            pushed: 0,
        }
    }
}

impl<E> Timeline<E> {
    /// Schedules `event` at `at`, which may not be before the last event taken.
    pub(crate) fn push(&mut self, at: u64, event: E) {
        assert!(
            at >= self.now,
            "an event scheduled at {at}, before the time already reached ({})",
            self.now
        );
        self.pushed += 1;
        let slot = self.slots.insert(event) as u32;
        let entry = Entry {
            at,
            pushed: self.pushed,
            slot,
        };
        if at == self.now {
            // Pushed after every entry already due.
            self.due.push_back(entry);
        } else {
            self.place(entry);
        }
    }

    /// Takes the earliest event (the first pushed among equals) and its time.
    pub(crate) fn pop(&mut self) -> Option<(u64, E)> {
        if self.due.is_empty() {
            if self.occupied == 0 {
                return None;
            }
            let i = self.occupied.trailing_zeros() as usize;
            let mut entries = std::mem::take(&mut self.buckets[i]);
            self.occupied &= !(1u64 << i);
            self.now = entries.iter().map(|e| e.at).min().unwrap_or(self.now);
            // Every entry of bucket i agrees with the new time above bit i, so each
            // lands in a lower bucket or is due now.
            for e in entries.drain(..) {
                if e.at == self.now {
                    self.due.push_back(e);
                } else {
                    self.place(e);
                }
            }
            // Entries reach a bucket by push and by moving down from higher ones, so
            // the ones due together may be out of push order.
            if self.due.len() > 1 {
                self.due
                    .make_contiguous()
                    .sort_unstable_by_key(|e| e.pushed);
            }
            // Keep the emptied vector's room for the next entries of that bucket.
            self.buckets[i] = entries;
        }
        let entry = self.due.pop_front()?;
        let event = self.slots.try_remove(entry.slot as usize)?;
        Some((entry.at, event))
    }

    /// Events waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Puts an entry later than `now` in its bucket.
    fn place(&mut self, e: Entry) {
        let i = 63 - (e.at ^ self.now).leading_zeros() as usize;
        self.buckets[i].push(e);
        self.occupied |= 1u64 << i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    #[derive(Clone, Debug)]
    enum Op {
        /// Push an event this long after the time reached.
        Push(u64),
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => prop_oneof![Just(0u64), 0u64..8, 0u64..1_000, any::<u32>().prop_map(u64::from)].prop_map(Op::Push),
            2 => Just(Op::Pop),
        ]
    }

    proptest! {
        /// Events come out exactly as a binary heap ordered by (time, push number)
        /// gives them, whatever mix of pushes and pops, with many equal times.
        #[test]
        fn events_come_out_by_time_then_push_order(ops in proptest::collection::vec(op(), 0..400)) {
            let mut timeline = Timeline::default();
            let mut model = BinaryHeap::new();
            let (mut now, mut n) = (0u64, 0u32);
            for op in ops.iter().chain(std::iter::repeat_n(&Op::Pop, 400)) {
                match op {
                    Op::Push(after) => {
                        n += 1;
                        timeline.push(now + after, n);
                        model.push(Reverse((now + after, n)));
                    }
                    Op::Pop => {
                        let got = timeline.pop();
                        let want = model.pop().map(|Reverse(e)| e);
                        prop_assert_eq!(got, want);
                        if let Some((at, _)) = got {
                            now = at;
                        }
                    }
                }
                prop_assert_eq!(timeline.len(), model.len());
            }
        }
    }

    #[test]
    #[should_panic(expected = "before the time already reached")]
    fn an_event_in_the_past_is_refused() {
        let mut timeline = Timeline::default();
        timeline.push(10, ());
        timeline.pop();
        timeline.push(9, ());
    }

    #[test]
    fn an_empty_timeline_gives_nothing_and_can_be_refilled() {
        let mut timeline = Timeline::default();
        assert_eq!(timeline.pop(), None);
        timeline.push(u64::MAX, 'b');
        timeline.push(5, 'a');
        assert_eq!(timeline.pop(), Some((5, 'a')));
        assert_eq!(timeline.pop(), Some((u64::MAX, 'b')));
        assert_eq!(timeline.pop(), None);
        timeline.push(u64::MAX, 'c');
        assert_eq!(timeline.pop(), Some((u64::MAX, 'c')));
    }
}
