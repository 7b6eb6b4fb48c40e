//! Which nodes this one has had no connection to for long enough to act on, once per
//! cut: a coordinator gives the attempts at such a node to other workers, a worker node
//! cancels the attempts of such a node's coordinator. No I/O and no clock: the caller
//! says whether each node is connected, and when.

use std::collections::HashMap;

/// Nodes with no connection from this one: since when, and whether the cut was acted
/// on already.
#[derive(Debug)]
pub struct CutOffs {
    after_ms: u64,
    since: HashMap<String, (u64, bool)>,
}

impl CutOffs {
    /// Cuts are due after `after_ms` without a connection.
    pub fn new(after_ms: u64) -> CutOffs {
        CutOffs {
            after_ms,
            since: HashMap::new(),
        }
    }

    /// Whether `node`, `connected` or not at `now_ms`, has been without a connection
    /// for `after_ms`: true once per cut. A connection ends the cut.
    pub fn due(&mut self, node: &str, connected: bool, now_ms: u64) -> bool {
        if connected {
            self.since.remove(node);
            return false;
        }
        let (since, acted) = match self.since.get_mut(node) {
            Some(entry) => entry,
            None => self
                .since
                .entry(node.to_string())
                .or_insert((now_ms, false)),
        };
        if *acted || now_ms < since.saturating_add(self.after_ms) {
            return false;
        }
        *acted = true;
        true
    }

    /// Forgets `node` (it is down: what ran there is handled as such).
    pub fn forget(&mut self, node: &str) {
        self.since.remove(node);
    }

    /// Forgets the nodes `keep` says no to.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.since.retain(|node, _| keep(node));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cut is due once, `after_ms` after it was first seen; a connection ends it,
    /// and the next cut counts from its own start.
    #[test]
    fn a_cut_is_due_once_after_its_time_and_a_connection_ends_it() {
        let mut cuts = CutOffs::new(1_000);
        assert!(!cuts.due("a", false, 100));
        assert!(!cuts.due("a", false, 1_099));
        assert!(cuts.due("a", false, 1_100));
        assert!(!cuts.due("a", false, 5_000), "once per cut");
        assert!(!cuts.due("b", true, 5_000));
        assert!(!cuts.due("a", true, 5_100));
        assert!(!cuts.due("a", false, 5_200));
        assert!(cuts.due("a", false, 6_200), "a new cut");
        cuts.retain(|n| n != "a");
        assert!(!cuts.due("a", false, 9_000), "forgotten: counts again");
        cuts.forget("a");
        assert!(!cuts.due("a", false, 9_500));
        assert!(cuts.due("a", false, 10_500));
    }
}
