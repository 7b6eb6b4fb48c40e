//! The tasks whose standby lacks something of them (their start, results, changed
//! parameters), and whether a checkpoint could take any of them now without a look at
//! them all. The coordinator asks after every message it handles; with thousands of
//! tasks open and a checkpoint in flight to their standby, a pass over all of them
//! after every result found nothing to send and cost most of the coordinator's time
//! (9,000 tasks submitted at once on three nodes). A pass remembers the standbys that
//! held back every task it left (each had a checkpoint in flight, or was waiting to
//! retry one); until one of them may take a checkpoint again, or a task made dirty
//! since goes elsewhere, another pass would find nothing either. No I/O.

use std::collections::HashSet;
use std::sync::Arc;

use uuid::Uuid;

/// Tasks made dirty since the last pass that are looked at one by one; past this
/// many, a pass is simply made (the tick makes every open task dirty now and then).
pub const FRESH_MAX: usize = 1_024;

/// The coordinator's dirty tasks, with what its last pass over them found.
#[derive(Debug, Default)]
pub struct Dirty {
    tasks: HashSet<Uuid>,
    /// Set by a pass that left every task it did not send held back by a standby.
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    /// The standbys that held them back, or took a checkpoint in that pass.
    by: Vec<Arc<str>>,
    /// The standby a task with none of its own went to then.
    standby: Option<Arc<str>>,
    /// Tasks made dirty since and not looked at yet, at most [`FRESH_MAX`].
    fresh: Vec<Uuid>,
}

impl Dirty {
    /// Marks `task` dirty; true if it was not.
    pub fn insert(&mut self, task: Uuid) -> bool {
        if let Some(held) = &mut self.held {
            if held.fresh.len() < FRESH_MAX {
                held.fresh.push(task);
            } else {
                self.held = None;
            }
        }
        self.tasks.insert(task)
    }

    /// Its standby has all of `task` now (or never will); true if it was dirty.
    pub fn remove(&mut self, task: &Uuid) -> bool {
        self.tasks.remove(task)
    }

    /// Whether no task is dirty.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The dirty tasks, in no useful order.
    pub fn iter(&self) -> impl Iterator<Item = &Uuid> + '_ {
        self.tasks.iter()
    }

    /// Whether a pass over the dirty tasks may find one to send. Not if the last pass
    /// left every task held back by standbys that still `block`, the standby a task
    /// without one of its own goes to is still `standby`, and each task made dirty
    /// since goes (`goes`: its standby, or none if it goes nowhere) to a standby that
    /// blocks too. Each task made dirty since is looked at once: the standby holding
    /// it back joins those the last pass found.
    pub fn worth_a_pass(
        &mut self,
        standby: Option<&Arc<str>>,
        blocks: impl Fn(&str) -> bool,
        goes: impl Fn(Uuid) -> Option<Arc<str>>,
    ) -> bool {
        let Some(held) = &mut self.held else {
            return true;
        };
        if held.standby.as_ref() != standby || !held.by.iter().all(|n| blocks(n)) {
            return true;
        }
        while let Some(&task) = held.fresh.last() {
            match goes(task) {
                Some(node) if !blocks(&node) => return true,
                Some(node) if !held.by.contains(&node) => held.by.push(node),
                _ => {}
            }
            held.fresh.pop();
        }
        false
    }

    /// A pass over the dirty tasks ended. `held_by`: the standbys that held back every
    /// task it left dirty, or took a checkpoint in it; None if it left one for another
    /// reason (the checkpoint had no room left for it). `standby`: where a task without
    /// one of its own went.
    pub fn passed(&mut self, held_by: Option<Vec<Arc<str>>>, standby: Option<Arc<str>>) {
        self.held = held_by.map(|by| Held {
            by,
            standby,
            fresh: Vec::new(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> Arc<str> {
        Arc::from(n)
    }

    #[test]
    fn a_pass_is_worth_making_only_when_something_may_go() {
        let (a, b) = (node("a"), node("b"));
        let (t1, t2, t3) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let mut d = Dirty::default();
        let only_a = |n: &str| n == "a";
        let a_and_b = |n: &str| n == "a" || n == "b";
        let to_a = |_| Some(node("a"));
        // Never passed: always worth it.
        d.insert(t1);
        assert!(d.worth_a_pass(Some(&a), only_a, to_a));
        // A pass left everything held back by a: while a blocks, nothing may go.
        d.passed(Some(vec![a.clone()]), Some(a.clone()));
        assert!(!d.worth_a_pass(Some(&a), only_a, to_a));
        d.insert(t2);
        assert!(!d.worth_a_pass(Some(&a), only_a, to_a));
        // a takes checkpoints again.
        assert!(d.worth_a_pass(Some(&a), |_| false, to_a));
        // A task made dirty since goes to b, which does not block...
        d.insert(t3);
        let to_b = |_| Some(node("b"));
        assert!(d.worth_a_pass(Some(&a), only_a, to_b));
        // ...and then blocks: b joins the standbys that hold tasks back.
        assert!(!d.worth_a_pass(Some(&a), a_and_b, to_b));
        assert!(d.worth_a_pass(Some(&a), only_a, to_a));
        // One that goes nowhere (ended meanwhile) needs no pass.
        d.passed(Some(vec![a.clone()]), Some(a.clone()));
        d.insert(t3);
        assert!(!d.worth_a_pass(Some(&a), only_a, |_| None));
        // The standby for tasks without one changed.
        assert!(d.worth_a_pass(Some(&b), only_a, to_a));
        assert!(d.worth_a_pass(None, only_a, to_a));
        // A pass that left a task for want of room: worth another.
        d.passed(None, Some(a.clone()));
        assert!(d.worth_a_pass(Some(&a), only_a, to_a));
        // Past FRESH_MAX tasks made dirty between two looks, a pass is made.
        d.passed(Some(vec![a.clone()]), Some(a.clone()));
        for n in 0..FRESH_MAX as u128 {
            d.insert(Uuid::from_u128(10 + n));
        }
        assert!(!d.worth_a_pass(Some(&a), only_a, to_a));
        for n in 0..=FRESH_MAX as u128 {
            d.insert(Uuid::from_u128(10 + n));
        }
        assert!(d.worth_a_pass(Some(&a), only_a, to_a));
        assert!(d.remove(&t3) && !d.remove(&t3));
        assert!(!d.is_empty());
    }
}
