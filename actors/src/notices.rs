//! Tasks a standby is still to be told to forget (a checkpoint part with `ended`), by
//! standby node: they ended, or moved to another standby while it was held down. The
//! notices wait while that node is down, and a checkpoint that carried some and failed,
//! or whose answer came stale (the node was held down meanwhile), queues them again: a
//! standby back from being held down must not go on holding such a task, or it would
//! take it over and run it again when this node goes down. A task that ended keeps with
//! its notice the segments the standby may lack the results of (`Unheld`), so that the
//! end sends only those, not every result again. Bounded. No I/O.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use uuid::Uuid;

/// What a standby may lack of the results of a task that ended at its coordinator:
/// the segments accepted since the last checkpoint it answered for the task. The
/// notice carries their results and the outcome without results, and the standby
/// takes the others from its copy. None: it may hold none of them (its copy never
/// opened there, the task only moved, or the bound on segments kept here was
/// reached), and the notice carries the whole outcome if it fits.
pub type Unheld = Option<Vec<u32>>;

/// The notices for one standby node: each task, with what that standby lacks.
pub type NodeNotices = (Arc<str>, Vec<(Uuid, Unheld)>);

/// Segments an [`Unheld`] keeps.
fn segments_in(unheld: &Unheld) -> usize {
    unheld.as_ref().map_or(0, Vec::len)
}

/// Forget notices waiting to go to their standbys.
#[derive(Debug)]
pub struct ForgetNotices {
    by_node: HashMap<Arc<str>, HashMap<Uuid, Unheld>>,
    total: usize,
    max: usize,
    /// Segments in the [`Unheld`] lists kept, and at most how many: past it, a notice
    /// keeps none.
    segments: usize,
    max_segments: usize,
}

impl ForgetNotices {
    /// At most `max` waiting, for all standbys together, keeping at most
    /// `max_segments` segments in their [`Unheld`] lists.
    pub fn new(max: usize, max_segments: usize) -> ForgetNotices {
        ForgetNotices {
            by_node: HashMap::new(),
            total: 0,
            max,
            segments: 0,
            max_segments,
        }
    }

    /// Queues a notice to forget `task` for `node`: false, and dropped, past the bound
    /// (that standby then holds the task until this node's own end). A task queued
    /// already keeps the notice it has.
    pub fn push(&mut self, node: Arc<str>, task: Uuid, unheld: Unheld) -> bool {
        if self.total >= self.max {
            return false;
        }
        if let Entry::Vacant(e) = self.by_node.entry(node).or_default().entry(task) {
            let unheld = unheld.filter(|s| self.segments + s.len() <= self.max_segments);
            self.segments += segments_in(&unheld);
            e.insert(unheld);
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
        if let Some(unheld) = tasks.remove(&task) {
            self.total -= 1;
            self.segments -= segments_in(&unheld);
            if tasks.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// Queues again notices that went to `node` in a checkpoint that may not have been
    /// applied there; as many as the bound allows. Told twice, a standby forgets a
    /// task it no longer holds, which changes nothing. (The caller leaves out tasks
    /// given to `node` again since.) A task queued again meanwhile keeps its notice,
    /// but for the segments the lost one said the standby lacks, which it takes in:
    /// after a checkpoint that carried the first of a task's results the notice waits
    /// with the rest, and if that checkpoint was lost the standby lacks both.
    pub fn requeue(&mut self, node: Arc<str>, tasks: Vec<(Uuid, Unheld)>) {
        for (task, unheld) in tasks {
            if let Some(queued) = self.by_node.get_mut(&node).and_then(|t| t.get_mut(&task)) {
                if let (Some(lacking), Some(more)) = (queued.as_mut(), unheld) {
                    let before = lacking.len();
                    lacking.extend(more);
                    lacking.sort_unstable();
                    lacking.dedup();
                    if self.segments - before + lacking.len() <= self.max_segments {
                        self.segments = self.segments - before + lacking.len();
                    } else {
                        self.segments -= before;
                        *queued = None;
                    }
                }
                continue;
            }
            if !self.push(node.clone(), task, unheld) {
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
    pub fn take(&mut self, ready: impl Fn(&str) -> bool) -> Vec<NodeNotices> {
        let nodes: Vec<Arc<str>> = self.by_node.keys().filter(|n| ready(n)).cloned().collect();
        let taken: Vec<NodeNotices> = nodes
            .into_iter()
            .filter_map(|n| self.by_node.remove_entry(&n))
            .map(|(n, tasks)| {
                let mut tasks: Vec<(Uuid, Unheld)> = tasks.into_iter().collect();
                // In one order, for logs and tests.
                tasks.sort_by_key(|(t, _)| *t);
                (n, tasks)
            })
            .collect();
        for (_, tasks) in &taken {
            self.total -= tasks.len();
            self.segments -= tasks.iter().map(|(_, u)| segments_in(u)).sum::<usize>();
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// The notice of a task that moved, or whose standby may hold nothing of it.
    fn moved(n: u128) -> (Uuid, Unheld) {
        (t(n), None)
    }

    /// Notices for a node that is not ready wait (before, a standby held down lost
    /// them), those for a ready one are taken, and a checkpoint's that may not have
    /// arrived are queued again, with what their standby lacks.
    #[test]
    fn notices_wait_for_their_node_and_come_back_when_not_applied() {
        let mut q = ForgetNotices::new(10, 100);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(q.push(a.clone(), t(1), None));
        assert!(q.push(a.clone(), t(2), Some(vec![4, 2])));
        assert!(q.push(b.clone(), t(3), Some(vec![0])));
        let only_b = |n: &str| n == "b";
        assert!(q.any_for(only_b));
        let taken = q.take(only_b);
        assert_eq!(taken, vec![(b.clone(), vec![(t(3), Some(vec![0]))])]);
        assert!(!q.any_for(only_b));
        assert_eq!(
            (q.total, q.segments),
            (2, 2),
            "a's wait while a is not ready"
        );
        q.requeue(b.clone(), taken[0].1.clone());
        let mut taken = q.take(|_| true);
        taken.sort();
        assert_eq!(
            taken,
            vec![
                (a, vec![moved(1), (t(2), Some(vec![4, 2]))]),
                (b, vec![(t(3), Some(vec![0]))])
            ]
        );
        assert_eq!((q.total, q.segments), (0, 0));
    }

    /// A notice queued again while its task waits with the rest of its results (the
    /// checkpoint that carried the first of them may not have arrived) takes them in.
    #[test]
    fn a_lost_checkpoint_gives_back_the_results_it_carried() {
        let mut q = ForgetNotices::new(10, 100);
        let a: Arc<str> = "a".into();
        assert!(q.push(a.clone(), t(1), Some(vec![7, 8])));
        q.requeue(a.clone(), vec![(t(1), Some(vec![5, 6, 7, 8]))]);
        assert_eq!(q.segments, 4);
        assert_eq!(
            q.take(|_| true),
            vec![(a.clone(), vec![(t(1), Some(vec![5, 6, 7, 8]))])]
        );
        // Past the bound on segments kept, the notice keeps none (the outcome goes whole).
        let mut q = ForgetNotices::new(10, 3);
        assert!(q.push(a.clone(), t(1), Some(vec![7, 8])));
        q.requeue(a.clone(), vec![(t(1), Some(vec![5, 6, 7, 8]))]);
        assert_eq!(q.segments, 0);
        assert_eq!(q.take(|_| true), vec![(a, vec![moved(1)])]);
    }

    /// A task given to a node again leaves no notice behind that would undo it, and a
    /// task is told once however often it is queued, with what it was first queued
    /// with.
    #[test]
    fn a_task_given_to_the_node_again_is_not_told_to_forget() {
        let mut q = ForgetNotices::new(10, 100);
        let a: Arc<str> = "a".into();
        q.push(a.clone(), t(1), Some(vec![1, 2]));
        q.push(a.clone(), t(1), None);
        q.requeue(a.clone(), vec![moved(1), (t(2), Some(vec![3]))]);
        assert_eq!((q.total, q.segments), (2, 3));
        q.cancel("a", t(1));
        q.cancel("b", t(2));
        assert_eq!(q.segments, 1);
        assert_eq!(
            q.take(|_| true),
            vec![(a.clone(), vec![(t(2), Some(vec![3]))])]
        );
        q.push(a.clone(), t(3), Some(vec![5]));
        q.cancel("a", t(3));
        assert_eq!((q.total, q.segments), (0, 0));
        assert!(!q.any_for(|_| true));
    }

    /// The bounds hold for new notices and for those queued again: past the bound on
    /// segments, a notice keeps none, so its end carries the whole outcome.
    #[test]
    fn stays_within_its_bounds() {
        let mut q = ForgetNotices::new(3, 4);
        let a: Arc<str> = "a".into();
        assert!(q.push(a.clone(), t(1), Some(vec![1, 2, 3])));
        assert!(q.push(a.clone(), t(2), Some(vec![1, 2])));
        q.requeue(a.clone(), vec![(t(3), Some(vec![7])), moved(4)]);
        assert_eq!((q.total, q.segments), (3, 4));
        assert!(!q.push(a.clone(), t(5), None));
        assert_eq!(
            q.take(|_| true),
            vec![(
                a,
                vec![(t(1), Some(vec![1, 2, 3])), moved(2), (t(3), Some(vec![7]))]
            )]
        );
        assert_eq!((q.total, q.segments), (0, 0));
    }
}
