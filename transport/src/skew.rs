//! What a peer's timestamps say about the two nodes' clocks, so that a node whose
//! clock is off says so in its log. Datagrams (membership probes, progress REPORTs)
//! carry the sender's wall clock, and the timestamp window refuses those more than a
//! second ahead of the receiver's clock or five seconds behind it: a node whose clock
//! ran three seconds ahead never joined, and no line said why. No I/O and no clock:
//! the caller says when.

use std::fmt;

use crate::wire::{ReplayError, TimestampWindow};

/// How long the timestamps must show a difference before it is told (a node paused,
/// or a receive backlog read at once, shows old timestamps in a burst, not for long),
/// and how often it is told again at most.
pub const SKEW_SEEN_FOR_MS: u64 = 2_000;
/// At most one warning per connection in this long.
pub const SKEW_WARN_EVERY_MS: u64 = 30_000;
/// Frames it takes to tell that this node's clock is ahead of the peer's.
const SKEW_MIN_FRAMES: u64 = 5;

/// What the timestamps of one peer's frames showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockWarning {
    /// Its frames were refused as ahead of this node's clock: its clock runs ahead of
    /// this one's (by `ahead_ms` at most), more than `limit_ms` allows.
    PeerAhead {
        /// The most any was ahead.
        ahead_ms: u64,
        /// The limit.
        limit_ms: u64,
        /// How many were refused.
        refused: u64,
    },
    /// Its frames were refused as too old: its clock runs behind this one's, or its
    /// frames were held up on their way.
    PeerBehind {
        /// The least old any refused one was.
        age_ms: u64,
        /// The limit.
        limit_ms: u64,
        /// How many were refused.
        refused: u64,
    },
    /// Its frames were taken, but each was at least `age_ms` old: this node's clock
    /// runs ahead of the peer's by about that, so a peer with the same limits refuses
    /// this node's frames as ahead of its clock.
    ThisAhead {
        /// The least old any was.
        age_ms: u64,
        /// The limit a peer with the same window holds this node's frames to.
        limit_ms: u64,
    },
}

impl fmt::Display for ClockWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ClockWarning::PeerAhead {
                ahead_ms,
                limit_ms,
                refused,
            } => write!(
                f,
                "{refused} timestamped frames (membership probes, progress reports) refused: \
                 the peer's clock is up to {ahead_ms} ms ahead of this node's, more than the \
                 {limit_ms} ms allowed; keep the nodes' clocks in sync (NTP)"
            ),
            ClockWarning::PeerBehind {
                age_ms,
                limit_ms,
                refused,
            } => write!(
                f,
                "{refused} timestamped frames (membership probes, progress reports) refused: \
                 they were at least {age_ms} ms old by this node's clock, more than the \
                 {limit_ms} ms allowed; the peer's clock is behind this node's, or its frames \
                 are held up; keep the nodes' clocks in sync (NTP)"
            ),
            ClockWarning::ThisAhead { age_ms, limit_ms } => write!(
                f,
                "the peer's timestamped frames arrive at least {age_ms} ms old by this node's \
                 clock: this node's clock is ahead of the peer's by about that, and a peer \
                 refuses frames more than {limit_ms} ms ahead of its own clock; keep the \
                 nodes' clocks in sync (NTP)"
            ),
        }
    }
}

/// Frames of one kind seen since the last warning: when, how many, and the extreme.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    first_ms: u64,
    count: u64,
    extreme_ms: u64,
}

impl Seen {
    /// Counts one at `now_ms`, keeping the larger extreme if `max`, else the smaller.
    fn add(&mut self, value_ms: u64, now_ms: u64, max: bool) {
        if self.count == 0 {
            *self = Seen {
                first_ms: now_ms,
                count: 1,
                extreme_ms: value_ms,
            };
            return;
        }
        self.count += 1;
        self.extreme_ms = if max {
            self.extreme_ms.max(value_ms)
        } else {
            self.extreme_ms.min(value_ms)
        };
    }

    /// Seen for at least [`SKEW_SEEN_FOR_MS`] by `now_ms`.
    fn lasting(&self, now_ms: u64) -> bool {
        self.count > 0 && now_ms.saturating_sub(self.first_ms) >= SKEW_SEEN_FOR_MS
    }
}

/// Watches one connection's timestamps for a clock difference the window refuses.
#[derive(Clone, Debug)]
pub struct ClockWatch {
    window: TimestampWindow,
    ahead: Seen,
    old: Seen,
    /// Frames taken, with the least age: reset whenever one arrives no older than
    /// the window's skew allows.
    taken_old: Seen,
    /// No warning before this.
    quiet_until_ms: u64,
    /// A warning not yet taken ([`ClockWatch::take_warning`]).
    pending: Option<ClockWarning>,
}

impl ClockWatch {
    /// Watches timestamps against `window`.
    pub fn new(window: TimestampWindow) -> ClockWatch {
        ClockWatch {
            window,
            ahead: Seen::default(),
            old: Seen::default(),
            taken_old: Seen::default(),
            quiet_until_ms: 0,
            pending: None,
        }
    }

    /// Checks a frame stamped `timestamp_ms` against the window at `now_ms`, and
    /// watches what it shows ([`ClockWatch::observe`]): a warning it draws waits for
    /// [`ClockWatch::take_warning`].
    pub fn check(&mut self, timestamp_ms: u64, now_ms: u64) -> Result<(), ReplayError> {
        let checked = self.window.check(timestamp_ms, now_ms);
        if let Some(warning) = self.observe(timestamp_ms, checked, now_ms) {
            self.pending = Some(warning);
        }
        checked
    }

    /// The warning [`ClockWatch::check`] drew, once.
    pub fn take_warning(&mut self) -> Option<ClockWarning> {
        self.pending.take()
    }

    /// A frame stamped `timestamp_ms` arrived at `now_ms` and the window said
    /// `checked`. A warning, if the timestamps have shown one for
    /// [`SKEW_SEEN_FOR_MS`] and none was given in the last [`SKEW_WARN_EVERY_MS`].
    pub fn observe(
        &mut self,
        timestamp_ms: u64,
        checked: Result<(), ReplayError>,
        now_ms: u64,
    ) -> Option<ClockWarning> {
        let age_ms = now_ms.saturating_sub(timestamp_ms);
        // Each tally goes on while no frame shows the difference gone, and is told
        // only on a frame that shows it still: a burst of old frames (a node paused,
        // a backlog read at once) followed by frames on time is not told.
        let warning = match checked {
            Err(ReplayError::FromTheFuture { ahead_ms, .. }) => {
                self.ahead.add(ahead_ms, now_ms, true);
                ClockWarning::PeerAhead {
                    ahead_ms: self.ahead.extreme_ms,
                    limit_ms: self.window.max_skew_ms,
                    refused: self.ahead.count,
                }
            }
            Err(ReplayError::Stale { age_ms, .. }) => {
                self.old.add(age_ms, now_ms, false);
                ClockWarning::PeerBehind {
                    age_ms: self.old.extreme_ms,
                    limit_ms: self.window.max_age_ms,
                    refused: self.old.count,
                }
            }
            Err(_) => return None,
            Ok(()) => {
                if timestamp_ms <= now_ms {
                    self.ahead = Seen::default();
                }
                if age_ms <= self.window.max_skew_ms {
                    self.old = Seen::default();
                    self.taken_old = Seen::default();
                    return None;
                }
                self.taken_old.add(age_ms, now_ms, false);
                if self.taken_old.count < SKEW_MIN_FRAMES {
                    return None;
                }
                ClockWarning::ThisAhead {
                    age_ms: self.taken_old.extreme_ms,
                    limit_ms: self.window.max_skew_ms,
                }
            }
        };
        let seen = match warning {
            ClockWarning::PeerAhead { .. } => &self.ahead,
            ClockWarning::PeerBehind { .. } => &self.old,
            ClockWarning::ThisAhead { .. } => &self.taken_old,
        };
        if now_ms < self.quiet_until_ms || !seen.lasting(now_ms) {
            return None;
        }
        self.ahead = Seen::default();
        self.old = Seen::default();
        self.taken_old = Seen::default();
        self.quiet_until_ms = now_ms.saturating_add(SKEW_WARN_EVERY_MS);
        Some(warning)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames every 100 ms from `from_ms` to `to_ms`, stamped `offset_ms` off the
    /// receiver's clock; the warnings they drew.
    fn feed(
        watch: &mut ClockWatch,
        from_ms: u64,
        to_ms: u64,
        offset_ms: i64,
    ) -> Vec<(u64, ClockWarning)> {
        let window = TimestampWindow::default();
        let mut warnings = Vec::new();
        for now_ms in (from_ms..=to_ms).step_by(100) {
            let stamp = now_ms.saturating_add_signed(offset_ms);
            if let Some(w) = watch.observe(stamp, window.check(stamp, now_ms), now_ms) {
                warnings.push((now_ms, w));
            }
        }
        warnings
    }

    const START: u64 = 1_800_000_000_000;

    #[test]
    fn a_peer_clock_ahead_is_told_after_two_seconds_then_every_thirty() {
        let mut watch = ClockWatch::new(TimestampWindow::default());
        let warnings = feed(&mut watch, START, START + 65_000, 3_000);
        let at: Vec<u64> = warnings.iter().map(|(t, _)| t - START).collect();
        assert_eq!(at, [2_000, 32_000, 62_000]);
        assert_eq!(
            warnings[0].1,
            ClockWarning::PeerAhead {
                ahead_ms: 3_000,
                limit_ms: 1_000,
                refused: 21,
            }
        );
        assert!(warnings[0].1.to_string().contains("3000 ms ahead"));
    }

    #[test]
    fn a_peer_clock_behind_is_told_and_so_is_this_clock_ahead_of_it() {
        let mut watch = ClockWatch::new(TimestampWindow::default());
        let warnings = feed(&mut watch, START, START + 3_000, -6_000);
        assert!(matches!(
            warnings[..],
            [(
                _,
                ClockWarning::PeerBehind {
                    age_ms: 6_000,
                    limit_ms: 5_000,
                    ..
                }
            )]
        ));
        // Taken (within 5 s), but 3 s old each: this node's clock is the one ahead.
        let mut watch = ClockWatch::new(TimestampWindow::default());
        let warnings = feed(&mut watch, START, START + 3_000, -3_000);
        assert_eq!(
            warnings,
            [(
                START + 2_000,
                ClockWarning::ThisAhead {
                    age_ms: 3_000,
                    limit_ms: 1_000,
                }
            )]
        );
    }

    #[test]
    fn clocks_within_the_window_and_bursts_of_old_frames_are_not_told() {
        let mut watch = ClockWatch::new(TimestampWindow::default());
        assert!(feed(&mut watch, START, START + 60_000, 800).is_empty());
        assert!(feed(&mut watch, START, START + 60_000, -900).is_empty());
        // A node paused 8 s reads its backlog at once: old, but in one burst, then
        // frames on time again.
        let window = TimestampWindow::default();
        let now = START + 100_000;
        for i in 0..80 {
            let stamp = now - 8_000 + i * 100;
            assert_eq!(watch.observe(stamp, window.check(stamp, now), now), None);
        }
        assert!(feed(&mut watch, now + 10, now + 30_000, -1).is_empty());
    }
}
