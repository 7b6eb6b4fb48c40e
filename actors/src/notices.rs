//! Tasks a standby is still to be told to forget (a checkpoint part with `ended`), by
//! standby node: they ended, or moved to another standby while it was held down. The
//! notices wait while that node is down, and a checkpoint that carried some and failed,
//! or whose answer came stale (the node was held down meanwhile), queues them again: a
//! standby back from being held down must not go on holding such a task, or it would
//! take it over and run it again when this node goes down. Bounded. No I/O.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use uuid::Uuid;

/// Forget notices waiting to go to their standbys.
#[derive(Debug)]
pub struct ForgetNotices {
    by_node: HashMap<Arc<str>, HashSet<Uuid>>,
    total: usize,
    max: usize,
}

impl ForgetNotices {
    /// At most `max` waiting, for all standbys together.
    pub fn new(max: usize) -> ForgetNotices {
        ForgetNotices {
            by_node: HashMap::new(),
            total: 0,
            max,
        }
    }

    /// Queues a notice to forget `task` for `node`: false, and dropped, past the bound
    /// (that standby then holds the task until this node's own end).
    pub fn push(&mut self, node: Arc<str>, task: Uuid) -> bool {
        if self.total >= self.max {
            return false;
        }
        if self.by_node.entry(node).or_default().insert(task) {
            self.total += 1;
        }
        true
    }

    /// `task` is given to `node` again (its start goes there next): a notice to forget
    /// it, still waiting, must not follow and undo that.
    pub fn cancel(&mut self, node: &str, task: Uuid) {
        let Some(tasks) = self.by_node.get_mut(node) else {
            return;
        };
        if tasks.remove(&task) {
            self.total -= 1;
            if tasks.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// Queues again notices that went to `node` in a checkpoint that may not have been
    /// applied there; as many as the bound allows. Told twice, a standby forgets a
    /// task it no longer holds, which changes nothing. (The caller leaves out tasks
    /// given to `node` again since.)
    pub fn requeue(&mut self, node: Arc<str>, tasks: Vec<Uuid>) {
        for task in tasks {
            if !self.push(node.clone(), task) {
                return;
            }
        }
    }

    /// Whether any waits for a node `ready` says a checkpoint may go to now.
    pub fn any_for(&self, ready: impl Fn(&str) -> bool) -> bool {
        self.by_node.keys().any(|n| ready(n))
    }

    /// Takes every notice waiting for the nodes `ready` accepts, by node; the others
    /// (a node down, or with a checkpoint in flight) go on waiting.
    pub fn take(&mut self, ready: impl Fn(&str) -> bool) -> Vec<(Arc<str>, Vec<Uuid>)> {
        let nodes: Vec<Arc<str>> = self.by_node.keys().filter(|n| ready(n)).cloned().collect();
        let taken: Vec<(Arc<str>, Vec<Uuid>)> = nodes
            .into_iter()
            .filter_map(|n| self.by_node.remove_entry(&n))
            .map(|(n, tasks)| {
                let mut tasks: Vec<Uuid> = tasks.into_iter().collect();
                // In one order, for logs and tests.
                tasks.sort();
                (n, tasks)
            })
            .collect();
        self.total -= taken.iter().map(|(_, t)| t.len()).sum::<usize>();
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// Notices for a node that is not ready wait (before, a standby held down lost
    /// them), those for a ready one are taken, and a checkpoint's that may not have
    /// arrived are queued again.
    #[test]
    fn notices_wait_for_their_node_and_come_back_when_not_applied() {
        let mut q = ForgetNotices::new(10);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(q.push(a.clone(), t(1)));
        assert!(q.push(a.clone(), t(2)));
        assert!(q.push(b.clone(), t(3)));
        let only_b = |n: &str| n == "b";
        assert!(q.any_for(only_b));
        assert_eq!(q.take(only_b), vec![(b.clone(), vec![t(3)])]);
        assert!(!q.any_for(only_b));
        assert_eq!(q.total, 2, "a's wait while a is not ready");
        q.requeue(b.clone(), vec![t(3)]);
        let mut taken = q.take(|_| true);
        taken.sort();
        assert_eq!(taken, vec![(a, vec![t(1), t(2)]), (b, vec![t(3)])]);
        assert_eq!(q.total, 0);
    }

    /// A task given to a node again leaves no notice behind that would undo it, and a
    /// task is told once however often it is queued.
    #[test]
    fn a_task_given_to_the_node_again_is_not_told_to_forget() {
        let mut q = ForgetNotices::new(10);
        let a: Arc<str> = "a".into();
        q.push(a.clone(), t(1));
        q.push(a.clone(), t(1));
        q.requeue(a.clone(), vec![t(1), t(2)]);
        assert_eq!(q.total, 2);
        q.cancel("a", t(1));
        q.cancel("b", t(2));
        assert_eq!(q.take(|_| true), vec![(a.clone(), vec![t(2)])]);
        q.push(a.clone(), t(3));
        q.cancel("a", t(3));
        assert_eq!(q.total, 0);
        assert!(!q.any_for(|_| true));
    }

    /// The bound holds for new notices and for those queued again.
    #[test]
    fn stays_within_its_bound() {
        let mut q = ForgetNotices::new(3);
        let a: Arc<str> = "a".into();
        assert!(q.push(a.clone(), t(1)));
        assert!(q.push(a.clone(), t(2)));
        q.requeue(a.clone(), vec![t(3), t(4)]);
        assert_eq!(q.total, 3);
        assert!(!q.push(a.clone(), t(5)));
        assert_eq!(q.take(|_| true), vec![(a, vec![t(1), t(2), t(3)])]);
        assert_eq!(q.total, 0);
    }
}
