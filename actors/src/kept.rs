//! Frames that must arrive, kept until they surely did: the final REPORTs a worker
//! node sends, and the ALLOCATEs a coordinator sends. Each rides a lane of one QUIC
//! connection; if that connection is lost before the other side read it (a link that
//! breaks for longer than the idle timeout, say), it is gone, and when a new connection
//! came up before either side gave up on the old one (a second later), nothing told
//! the other side: a coordinator waited for the segment timeout for a result whose
//! final REPORT was lost, or for an attempt whose ALLOCATE never came, and ran the
//! segment again then. So each frame is kept until the connection it went on has stayed
//! open `keep_ms` (it arrived, or is on its way), or closed with its frames delivered,
//! and is sent again on the next connection to its node when it was lost or never had
//! one. Receivers take copies as no-ops: the coordinator takes the first result of a
//! segment and a failure or refusal of an attempt it no longer waits for changes
//! nothing; a worker node runs an attempt once (`workers.rs`). Bounded in frames and
//! bytes. No I/O and no clock: the caller says how each connection is ([`Link`]) and
//! which is open to a node now.

use std::collections::VecDeque;

pub use agentmesh_runtime::transport::Link;

/// How long frames are kept, and at most how many.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A frame is dropped once the connection it went on has been open this long
    /// since: a connection that delivers nothing for the idle timeout (3 s) closes.
    pub keep_ms: u64,
    /// A frame with no open connection to send it on this long after it was first
    /// sent is given up.
    pub give_up_ms: u64,
    /// Frames kept at most, and their bytes: past either, the oldest is dropped.
    pub max_frames: usize,
    /// See `max_frames`.
    pub max_bytes: usize,
}

/// What [`KeptFrames::tick`] found.
#[derive(Debug)]
pub struct Tick<C, M> {
    /// Frames to send again, each on the connection given (those that went on one
    /// connection in the order they went).
    pub resend: Vec<(C, M)>,
    /// Frames given up: no connection to their node for `give_up_ms`.
    pub given_up: usize,
}

struct Kept<M> {
    message: M,
    bytes: usize,
    /// When it last went out.
    sent_ms: u64,
    /// When it first went out.
    first_ms: u64,
}

/// Frames to one node that last went out on one connection (`None`: there was none,
/// or it was lost and let go), oldest first. A check asks each run's connection once,
/// not each frame's.
struct Run<C, M> {
    node: String,
    on: Option<C>,
    kept: VecDeque<Kept<M>>,
}

/// Frames sent and kept, in runs by connection.
pub struct KeptFrames<C, M> {
    runs: Vec<Run<C, M>>,
    len: usize,
    bytes: usize,
    limits: Limits,
}

impl<C: Clone + PartialEq, M: Clone> KeptFrames<C, M> {
    /// None kept yet.
    pub fn new(limits: Limits) -> KeptFrames<C, M> {
        KeptFrames {
            runs: Vec::new(),
            len: 0,
            bytes: 0,
            limits,
        }
    }

    /// Keeps `message` (`bytes` long), a frame to `node` that went out on `on` (`None`:
    /// there was no connection) at `now_ms`. How many older ones were dropped to make
    /// room.
    pub fn keep(
        &mut self,
        node: &str,
        message: M,
        bytes: usize,
        on: Option<C>,
        now_ms: u64,
    ) -> usize {
        let kept = Kept {
            message,
            bytes,
            sent_ms: now_ms,
            first_ms: now_ms,
        };
        self.run_for(node, on).kept.push_back(kept);
        self.len += 1;
        self.bytes += bytes;
        let mut dropped = 0;
        while self.len > self.limits.max_frames
            || (self.bytes > self.limits.max_bytes && self.len > 1)
        {
            self.drop_oldest();
            dropped += 1;
        }
        dropped
    }

    /// The run of frames to `node` on `on`, made if there is none.
    fn run_for(&mut self, node: &str, on: Option<C>) -> &mut Run<C, M> {
        let at = match self.runs.iter().position(|r| r.node == node && r.on == on) {
            Some(at) => at,
            None => {
                self.runs.push(Run {
                    node: node.to_string(),
                    on,
                    kept: VecDeque::new(),
                });
                self.runs.len() - 1
            }
        };
        &mut self.runs[at]
    }

    /// Drops one of the frames kept longest: the first of the run whose first was sent
    /// earliest.
    fn drop_oldest(&mut self) {
        let oldest = self
            .runs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.kept.front().map(|k| (k.first_ms, i)))
            .min();
        if let Some((_, i)) = oldest {
            if let Some(k) = self.runs[i].kept.pop_front() {
                self.len -= 1;
                self.bytes -= k.bytes;
            }
            if self.runs[i].kept.is_empty() {
                self.runs.swap_remove(i);
            }
        }
    }

    /// At `now_ms`: drops the frames surely delivered, or given up, and says which to
    /// send again. `link` says how a connection is; `open` gives the open connection to
    /// a node, if any. A frame to send again counts as sent on that connection now.
    pub fn tick(
        &mut self,
        now_ms: u64,
        link: impl Fn(&C) -> Link,
        mut open: impl FnMut(&str) -> Option<C>,
    ) -> Tick<C, M> {
        let mut resend = Vec::new();
        let mut given_up = 0;
        let limits = self.limits;
        let mut moved = Vec::new();
        let (mut len, mut bytes) = (self.len, self.bytes);
        let mut drop_where = |kept: &mut VecDeque<Kept<M>>, gone: &dyn Fn(&Kept<M>) -> bool| {
            kept.retain(|k| {
                let keep = !gone(k);
                if !keep {
                    len -= 1;
                    bytes -= k.bytes;
                }
                keep
            });
        };
        for run in &mut self.runs {
            match run.on.as_ref().map(&link) {
                Some(Link::Open) => {
                    drop_where(&mut run.kept, &|k| {
                        now_ms >= k.sent_ms.saturating_add(limits.keep_ms)
                    });
                }
                Some(Link::Delivered) => drop_where(&mut run.kept, &|_| true),
                Some(Link::Lost) | None => match open(&run.node) {
                    Some(c) => {
                        for k in &mut run.kept {
                            resend.push((c.clone(), k.message.clone()));
                            k.sent_ms = now_ms;
                        }
                        moved.push((run.node.clone(), Some(c), std::mem::take(&mut run.kept)));
                    }
                    None => {
                        let before = run.kept.len();
                        drop_where(&mut run.kept, &|k| {
                            now_ms >= k.first_ms.saturating_add(limits.give_up_ms)
                        });
                        given_up += before - run.kept.len();
                        if run.on.is_some() {
                            // The lost connection is let go (its handle holds its
                            // queues); the frames wait for the next one as unsent.
                            moved.push((run.node.clone(), None, std::mem::take(&mut run.kept)));
                        }
                    }
                },
            }
        }
        (self.len, self.bytes) = (len, bytes);
        self.runs.retain(|r| !r.kept.is_empty());
        for (node, on, kept) in moved {
            let run = self.run_for(&node, on);
            // After the frames already there (sent earlier on that connection).
            run.kept.extend(kept);
        }
        Tick { resend, given_up }
    }

    /// Drops the frames to `node` (it is down: what it was sent is handled as such). How
    /// many.
    pub fn forget_node(&mut self, node: &str) -> usize {
        self.forget(node, |_| true)
    }

    /// Drops the frames to `node` that `which` picks (no longer wanted: an attempt its
    /// coordinator cancelled, say). How many.
    pub fn forget(&mut self, node: &str, which: impl Fn(&M) -> bool) -> usize {
        let (mut dropped, mut bytes) = (0, 0);
        for run in self.runs.iter_mut().filter(|r| r.node == node) {
            run.kept.retain(|k| {
                let gone = which(&k.message);
                if gone {
                    dropped += 1;
                    bytes += k.bytes;
                }
                !gone
            });
        }
        self.runs.retain(|r| !r.kept.is_empty());
        self.len -= dropped;
        self.bytes -= bytes;
        dropped
    }

    /// Frames kept.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if none is kept.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Their bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const LIMITS: Limits = Limits {
        keep_ms: 10_000,
        give_up_ms: 60_000,
        max_frames: 4,
        max_bytes: 1_000,
    };

    /// Connections by number, with how each is.
    #[derive(Default)]
    struct Links {
        links: HashMap<u32, Link>,
        open: HashMap<&'static str, u32>,
    }

    impl Links {
        fn open(&mut self, node: &'static str, c: u32) {
            self.links.insert(c, Link::Open);
            self.open.insert(node, c);
        }

        fn close(&mut self, node: &'static str, how: Link) {
            if let Some(c) = self.open.remove(node) {
                self.links.insert(c, how);
            }
        }

        fn tick(
            &self,
            kept: &mut KeptFrames<u32, &'static str>,
            now: u64,
        ) -> Tick<u32, &'static str> {
            kept.tick(now, |c| self.links[c], |n| self.open.get(n).copied())
        }
    }

    /// Final "r1" to node "c", sent at 0 on connection 1, which is open.
    fn one_final_on_connection_1() -> (Links, KeptFrames<u32, &'static str>) {
        let mut links = Links::default();
        links.open("c", 1);
        let mut kept = KeptFrames::new(LIMITS);
        kept.keep("c", "r1", 10, Some(1), 0);
        (links, kept)
    }

    #[test]
    fn a_final_on_a_connection_that_stays_open_is_dropped_after_keep_ms() {
        let (links, mut kept) = one_final_on_connection_1();
        let t = links.tick(&mut kept, 9_999);
        assert!(t.resend.is_empty());
        assert_eq!(kept.len(), 1);
        let t = links.tick(&mut kept, 10_000);
        assert!(t.resend.is_empty());
        assert_eq!(t.given_up, 0);
        assert!(kept.is_empty());
        assert_eq!(kept.bytes(), 0);
    }

    #[test]
    fn finals_on_a_lost_connection_go_again_in_order_on_the_next_one() {
        let mut links = Links::default();
        links.open("c", 1);
        links.open("d", 7);
        let mut kept = KeptFrames::new(LIMITS);
        kept.keep("c", "r1", 10, Some(1), 0);
        kept.keep("d", "other", 10, Some(7), 0);
        kept.keep("c", "r2", 10, Some(1), 100);
        links.close("c", Link::Lost);
        // No connection yet: they wait.
        let t = links.tick(&mut kept, 3_000);
        assert!(t.resend.is_empty());
        assert_eq!(kept.len(), 3);
        links.open("c", 2);
        let t = links.tick(&mut kept, 3_500);
        assert_eq!(t.resend, vec![(2, "r1"), (2, "r2")]);
        // Sent on connection 2 now: kept keep_ms from the resend, not from the first.
        assert!(links.tick(&mut kept, 12_000).resend.is_empty());
        assert_eq!(kept.len(), 2, "r1 and r2 are kept, d's is dropped");
        assert!(links.tick(&mut kept, 13_500).resend.is_empty());
        assert!(kept.is_empty());
    }

    #[test]
    fn a_check_asks_each_connection_once() {
        let mut links = Links::default();
        links.open("c", 1);
        links.open("d", 2);
        let mut kept = KeptFrames::new(Limits {
            max_frames: 100,
            ..LIMITS
        });
        for i in 0..30 {
            let (node, c) = if i % 3 == 0 { ("d", 2) } else { ("c", 1) };
            kept.keep(node, "r", 1, Some(c), i);
        }
        let asked = std::cell::Cell::new(0);
        let t = kept.tick(
            100,
            |c| {
                asked.set(asked.get() + 1);
                links.links[c]
            },
            |n| links.open.get(n).copied(),
        );
        assert!(t.resend.is_empty());
        assert_eq!(asked.get(), 2);
        assert_eq!(kept.len(), 30);
    }

    #[test]
    fn a_final_sent_with_no_connection_goes_when_one_opens() {
        let mut links = Links::default();
        let mut kept = KeptFrames::new(LIMITS);
        kept.keep("c", "r1", 10, None, 0);
        assert!(links.tick(&mut kept, 500).resend.is_empty());
        links.open("c", 3);
        assert_eq!(links.tick(&mut kept, 1_000).resend, vec![(3, "r1")]);
        assert!(links.tick(&mut kept, 1_500).resend.is_empty(), "sent once");
    }

    #[test]
    fn a_connection_closed_with_its_frames_delivered_sends_nothing_again() {
        let (mut links, mut kept) = one_final_on_connection_1();
        links.close("c", Link::Delivered);
        links.open("c", 2);
        let t = links.tick(&mut kept, 500);
        assert!(t.resend.is_empty());
        assert!(kept.is_empty());
    }

    #[test]
    fn a_lost_connection_is_let_go_while_its_finals_wait() {
        let (mut links, mut kept) = one_final_on_connection_1();
        links.close("c", Link::Lost);
        let asked = std::cell::Cell::new(0);
        let tick = |kept: &mut KeptFrames<u32, &'static str>, links: &Links, now| {
            kept.tick(
                now,
                |c| {
                    asked.set(asked.get() + 1);
                    links.links[c]
                },
                |n| links.open.get(n).copied(),
            )
        };
        assert!(tick(&mut kept, &links, 100).resend.is_empty());
        assert_eq!(asked.get(), 1);
        assert!(tick(&mut kept, &links, 200).resend.is_empty());
        assert_eq!(asked.get(), 1, "connection 1 is no longer held");
        assert_eq!((kept.len(), kept.bytes()), (1, 10));
        links.open("c", 2);
        assert_eq!(tick(&mut kept, &links, 300).resend, vec![(2, "r1")]);
    }

    #[test]
    fn a_final_with_no_connection_for_give_up_ms_is_given_up() {
        let (mut links, mut kept) = one_final_on_connection_1();
        links.close("c", Link::Lost);
        let t = links.tick(&mut kept, 59_999);
        assert_eq!((t.resend.len(), t.given_up), (0, 0));
        let t = links.tick(&mut kept, 60_000);
        assert_eq!((t.resend.len(), t.given_up), (0, 1));
        assert!(kept.is_empty());
        assert_eq!(kept.bytes(), 0);
    }

    #[test]
    fn the_oldest_are_dropped_past_the_bounds() {
        let mut kept: KeptFrames<u32, &str> = KeptFrames::new(LIMITS);
        for (i, r) in ["r1", "r2", "r3", "r4"].into_iter().enumerate() {
            assert_eq!(kept.keep("c", r, 100, None, i as u64), 0);
        }
        assert_eq!(kept.keep("c", "r5", 100, None, 4), 1, "past max_frames");
        assert_eq!((kept.len(), kept.bytes()), (4, 400));
        assert_eq!(kept.keep("c", "big", 900, None, 5), 3, "past max_bytes");
        assert_eq!((kept.len(), kept.bytes()), (2, 1_000));
        // One larger than max_bytes alone is still kept: it is the newest.
        assert_eq!(kept.keep("c", "huge", 2_000, None, 6), 2);
        assert_eq!((kept.len(), kept.bytes()), (1, 2_000));
        let mut links = Links::default();
        links.open("c", 1);
        assert_eq!(links.tick(&mut kept, 7).resend, vec![(1, "huge")]);
    }

    #[test]
    fn a_node_down_drops_its_finals_only() {
        let mut kept: KeptFrames<u32, &str> = KeptFrames::new(LIMITS);
        kept.keep("c", "r1", 10, None, 0);
        kept.keep("d", "r2", 20, None, 0);
        kept.keep("c", "r3", 30, None, 0);
        assert_eq!(kept.forget_node("c"), 2);
        assert_eq!((kept.len(), kept.bytes()), (1, 20));
    }

    #[test]
    fn forget_drops_the_frames_it_picks_to_that_node_only() {
        let (mut links, mut kept) = one_final_on_connection_1();
        kept.keep("c", "r2", 20, Some(1), 0);
        kept.keep("c", "r3", 30, None, 0);
        kept.keep("d", "r2", 40, None, 0);
        assert_eq!(kept.forget("c", |m| *m != "r1"), 2);
        assert_eq!((kept.len(), kept.bytes()), (2, 50));
        links.close("c", Link::Lost);
        links.open("c", 2);
        links.open("d", 3);
        let mut resent = links.tick(&mut kept, 100).resend;
        resent.sort();
        assert_eq!(resent, vec![(2, "r1"), (3, "r2")]);
        assert_eq!(kept.forget("c", |_| true), 1);
        assert_eq!((kept.len(), kept.bytes()), (1, 40));
    }
}
