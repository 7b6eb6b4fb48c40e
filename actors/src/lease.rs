//! Fencing a coordinator against its own standby: the leases it holds from its
//! standbys, and which of its tasks it may allocate under them. Without them, a
//! coordinator that was only paused (or stalled) past the failure detector's patience
//! went on running tasks its standby had meanwhile taken over, so their remaining
//! segments ran twice. No I/O: the coordinator feeds it answers and the time.
//!
//! The rule: a standby that answers a checkpoint promises not to take over any of the
//! sender's tasks for `lease_ms` from when it received it (`standby.rs`). The sender
//! counts that lease from when it *sent* the checkpoint, which is earlier, so on the
//! sender's clock the lease always ends first. A task the standby holds is allocated
//! only while the lease runs, and only if no lapse came between the moment the
//! standby last said it held the task and now: after a lapse the standby may have
//! taken it over, so each such task waits until the standby has answered for it again
//! (holding it, or saying it took it over). A task the standby was never sent is not
//! fenced: no one else can run it.
//!
//! This covers a paused or stalled coordinator. It does not cover a partition that
//! leaves both sides up: each side then holds the other for down, the coordinator
//! moves its tasks to another standby and goes on, and the old standby takes them over
//! (see docs/architecture.md).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// One standby's lease, on the coordinator's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lease {
    /// The lease runs until then.
    until_ms: u64,
    /// When the checkpoint that began the current unbroken run of leases was sent: no
    /// lapse since then.
    since_ms: u64,
    /// How long the standby's leases last.
    lease_ms: u64,
}

/// What an answer with a lease did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granted {
    /// The lease ran on without a gap.
    Renewed,
    /// The lease had lapsed (or there was none) before the checkpoint was sent: the
    /// tasks the standby held before `since_ms` must be answered for again.
    AfterLapse {
        /// When the new run of leases began.
        since_ms: u64,
    },
    /// The standby grants no lease (an older node): its tasks are not fenced.
    None,
}

/// The leases a coordinator holds from its standbys.
#[derive(Debug, Default)]
pub struct Leases {
    by_standby: HashMap<Arc<str>, Lease>,
    /// Standbys that answered with no lease (older nodes).
    no_lease: HashSet<Arc<str>>,
}

impl Leases {
    /// `standby` answered a checkpoint sent at `sent_ms` with a lease of `lease_ms`.
    /// Answers come in the order their checkpoints were sent (one in flight per
    /// standby).
    pub fn granted(&mut self, standby: &Arc<str>, sent_ms: u64, lease_ms: u64) -> Granted {
        if lease_ms == 0 {
            self.by_standby.remove(standby);
            self.no_lease.insert(standby.clone());
            return Granted::None;
        }
        self.no_lease.remove(standby);
        let until_ms = sent_ms.saturating_add(lease_ms);
        match self.by_standby.get_mut(standby) {
            Some(lease) if sent_ms < lease.until_ms => {
                debug_assert!(sent_ms >= lease.since_ms, "answers in the order sent");
                lease.until_ms = lease.until_ms.max(until_ms);
                lease.lease_ms = lease_ms;
                Granted::Renewed
            }
            _ => {
                self.by_standby.insert(
                    standby.clone(),
                    Lease {
                        until_ms,
                        since_ms: sent_ms,
                        lease_ms,
                    },
                );
                Granted::AfterLapse { since_ms: sent_ms }
            }
        }
    }

    /// Whether a task that `standby` has said it held at `held_ms` (the sending time
    /// of that checkpoint; its start's sending time until answered) may be allocated
    /// at `now_ms`. Before a standby's first answer its tasks wait; a standby that
    /// grants no lease fences nothing.
    pub fn allows(&self, standby: &str, held_ms: u64, now_ms: u64) -> bool {
        self.runs(standby, now_ms)
            && self
                .by_standby
                .get(standby)
                .is_none_or(|lease| lease.since_ms <= held_ms)
    }

    /// Whether the lease from `standby` runs at `now_ms` (true for a standby that
    /// grants none: it fences nothing).
    pub fn runs(&self, standby: &str, now_ms: u64) -> bool {
        match self.by_standby.get(standby) {
            Some(lease) => now_ms < lease.until_ms,
            None => self.no_lease.contains(standby),
        }
    }

    /// Whether `standby` has answered (with a lease or without) since it was last
    /// forgotten.
    pub fn knows(&self, standby: &str) -> bool {
        self.by_standby.contains_key(standby) || self.no_lease.contains(standby)
    }

    /// Whether the lease from `standby` should be renewed now: past half its length,
    /// or lapsed.
    pub fn due(&self, standby: &str, now_ms: u64) -> bool {
        self.by_standby
            .get(standby)
            .is_some_and(|l| now_ms.saturating_add(l.lease_ms / 2) >= l.until_ms)
    }

    /// The standbys this coordinator holds leases from.
    pub fn standbys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.by_standby.keys()
    }

    /// Forgets `standby` (down, or no longer used).
    pub fn forget(&mut self, standby: &str) {
        self.by_standby.remove(standby);
        self.no_lease.remove(standby);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    /// A lease counts from the sending of the checkpoint; a task held before a lapse
    /// waits for a new answer, one held since does not; renewals before the end keep
    /// the run unbroken.
    #[test]
    fn a_lapse_fences_the_tasks_held_before_it_until_answered_again() {
        let mut l = Leases::default();
        let b = s("b");
        assert!(!l.allows("b", 0, 0), "no answer yet");
        assert!(!l.knows("b"));
        assert_eq!(
            l.granted(&b, 100, 1000),
            Granted::AfterLapse { since_ms: 100 }
        );
        assert!(l.allows("b", 100, 500));
        assert!(!l.allows("b", 99, 500), "held before the run began");
        assert!(!l.allows("b", 100, 1100), "lapsed: ends at sending + lease");
        assert!(!l.due("b", 599));
        assert!(l.due("b", 600));
        assert_eq!(l.granted(&b, 700, 1000), Granted::Renewed);
        assert!(l.allows("b", 100, 1600), "renewed before the end");
        // Nothing sent until 1800: a lapse.
        assert!(!l.allows("b", 100, 1750));
        assert_eq!(
            l.granted(&b, 1800, 1000),
            Granted::AfterLapse { since_ms: 1800 }
        );
        assert!(!l.allows("b", 700, 1900), "held before the lapse");
        assert!(l.allows("b", 1800, 1900), "answered for after it");
        assert_eq!(l.granted(&b, 1900, 0), Granted::None);
        assert!(
            l.allows("b", 0, 5000),
            "a standby that grants none fences nothing"
        );
        l.forget("b");
        assert!(!l.allows("b", 0, 5000));
    }
}
