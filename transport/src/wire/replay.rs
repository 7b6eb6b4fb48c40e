//! Replay protection: a sliding window over the 16-bit sequence number (RFC 4303
//! style, with the high bits inferred as for extended sequence numbers) and a
//! timestamp window for datagrams. Pure state machines; `now` is an argument.

/// Why a frame was refused as a replay. Not fatal: the frame is dropped and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// This sequence number was already accepted inside the window.
    #[error("duplicate sequence number {seq}")]
    Duplicate {
        /// The sequence number on the wire.
        seq: u16,
    },
    /// The sequence number is further behind the newest one than the window reaches.
    #[error("sequence number {seq} is {behind} behind the newest, outside the window")]
    TooOld {
        /// The sequence number on the wire.
        seq: u16,
        /// How far behind the newest accepted number it is.
        behind: u64,
    },
    /// The timestamp is older than the window allows.
    #[error("timestamp {timestamp_ms} ms is {age_ms} ms old (limit {max_age_ms} ms)")]
    Stale {
        /// The frame's timestamp.
        timestamp_ms: u64,
        /// Its age by the receiver's clock.
        age_ms: u64,
        /// The limit.
        max_age_ms: u64,
    },
    /// The timestamp is further in the future than clock skew explains.
    #[error("timestamp {timestamp_ms} ms is {ahead_ms} ms ahead (limit {max_skew_ms} ms)")]
    FromTheFuture {
        /// The frame's timestamp.
        timestamp_ms: u64,
        /// How far ahead of the receiver's clock it is.
        ahead_ms: u64,
        /// The limit.
        max_skew_ms: u64,
    },
}

/// Anti-replay window for one (peer, lane) or one peer's datagrams.
///
/// Tracks the newest accepted sequence number as a 64-bit extended number: a 16-bit
/// `seq` is taken to be the extended number closest to the newest one (serial number
/// arithmetic, RFC 1982), so it may be up to 32,767 ahead or 32,768 behind. Of the
/// numbers behind, only the last [`ReplayWindow::SIZE`] are remembered; older ones
/// are refused. The first frame seen starts the window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// Extended number of the newest accepted frame; `None` before the first.
    top: Option<u64>,
    /// Bit `i` set: extended number `top - i` was accepted.
    seen: u128,
}

impl ReplayWindow {
    /// How many sequence numbers, counting the newest, the window remembers.
    pub const SIZE: u64 = 128;

    /// An empty window.
    pub fn new() -> ReplayWindow {
        ReplayWindow::default()
    }

    /// Checks `seq` without recording it; returns its extended number.
    pub fn check(&self, seq: u16) -> Result<u64, ReplayError> {
        let Some(top) = self.top else {
            return Ok(u64::from(seq));
        };
        // The low 16 bits of `top` compared to `seq`, as a signed distance.
        let delta = seq.wrapping_sub(top as u16) as i16;
        if delta > 0 {
            return Ok(top + delta as u64);
        }
        let behind = u64::from(delta.unsigned_abs());
        if behind > top || behind >= Self::SIZE {
            return Err(ReplayError::TooOld { seq, behind });
        }
        if self.seen & (1u128 << behind) != 0 {
            return Err(ReplayError::Duplicate { seq });
        }
        Ok(top - behind)
    }

    /// Checks `seq` and, if acceptable, records it.
    pub fn accept(&mut self, seq: u16) -> Result<u64, ReplayError> {
        let ext = self.check(seq)?;
        match self.top {
            None => {
                self.top = Some(ext);
                self.seen = 1;
            }
            Some(top) if ext > top => {
                let shift = ext - top;
                self.seen = if shift >= Self::SIZE {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.top = Some(ext);
            }
            Some(top) => self.seen |= 1u128 << (top - ext),
        }
        Ok(ext)
    }

    /// Extended number of the newest accepted frame.
    pub fn newest(&self) -> Option<u64> {
        self.top
    }
}

/// Freshness check for timestamped frames (datagrams): refuses a timestamp older than
/// `max_age_ms` or more than `max_skew_ms` ahead of the receiver's clock. Together with
/// a [`ReplayWindow`] this bounds replays of a datagram to its age limit even after the
/// 16-bit sequence number has wrapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimestampWindow {
    /// Oldest acceptable age.
    pub max_age_ms: u64,
    /// Largest acceptable lead over the receiver's clock.
    pub max_skew_ms: u64,
}

impl Default for TimestampWindow {
    fn default() -> TimestampWindow {
        TimestampWindow {
            max_age_ms: 5_000,
            max_skew_ms: 1_000,
        }
    }
}

impl TimestampWindow {
    /// Checks a frame's timestamp against the receiver's `now_ms`.
    pub fn check(&self, timestamp_ms: u64, now_ms: u64) -> Result<(), ReplayError> {
        if timestamp_ms > now_ms {
            let ahead_ms = timestamp_ms - now_ms;
            if ahead_ms > self.max_skew_ms {
                return Err(ReplayError::FromTheFuture {
                    timestamp_ms,
                    ahead_ms,
                    max_skew_ms: self.max_skew_ms,
                });
            }
            return Ok(());
        }
        let age_ms = now_ms - timestamp_ms;
        if age_ms > self.max_age_ms {
            return Err(ReplayError::Stale {
                timestamp_ms,
                age_ms,
                max_age_ms: self.max_age_ms,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_numbers_pass_and_repeats_do_not() {
        let mut w = ReplayWindow::new();
        for seq in 0..1000u16 {
            assert_eq!(w.accept(seq), Ok(u64::from(seq)));
            assert_eq!(w.accept(seq), Err(ReplayError::Duplicate { seq }));
        }
    }

    #[test]
    fn the_window_follows_the_sequence_across_the_wrap() {
        let mut w = ReplayWindow::new();
        w.accept(65_530).unwrap();
        for i in 1..=20u64 {
            let seq = (65_530 + i) as u16;
            assert_eq!(w.accept(seq), Ok(65_530 + i));
        }
        assert_eq!(w.newest(), Some(65_550));
        assert_eq!(
            w.accept(65_535),
            Err(ReplayError::Duplicate { seq: 65_535 })
        );
        assert_eq!(w.accept(3), Err(ReplayError::Duplicate { seq: 3 }));
    }

    #[test]
    fn late_but_inside_the_window_is_accepted_once() {
        let mut w = ReplayWindow::new();
        w.accept(200).unwrap();
        assert_eq!(w.accept(100), Ok(100));
        assert_eq!(w.accept(100), Err(ReplayError::Duplicate { seq: 100 }));
        assert_eq!(w.accept(73), Ok(73));
        assert_eq!(
            w.accept(72),
            Err(ReplayError::TooOld {
                seq: 72,
                behind: 128
            })
        );
    }

    #[test]
    fn numbers_before_the_first_frame_are_too_old() {
        let mut w = ReplayWindow::new();
        w.accept(5).unwrap();
        assert_eq!(
            w.accept(65_535),
            Err(ReplayError::TooOld {
                seq: 65_535,
                behind: 6
            })
        );
    }

    #[test]
    fn a_jump_past_the_window_forgets_everything_behind() {
        let mut w = ReplayWindow::new();
        w.accept(1).unwrap();
        w.accept(1_000).unwrap();
        assert_eq!(w.accept(999), Ok(999));
        assert!(matches!(w.accept(1), Err(ReplayError::TooOld { .. })));
    }

    #[test]
    fn timestamps_outside_the_window_are_refused() {
        let w = TimestampWindow {
            max_age_ms: 100,
            max_skew_ms: 10,
        };
        assert_eq!(w.check(1_000, 1_100), Ok(()));
        assert_eq!(w.check(1_010, 1_000), Ok(()));
        assert!(matches!(
            w.check(999, 1_100),
            Err(ReplayError::Stale { age_ms: 101, .. })
        ));
        assert!(matches!(
            w.check(1_011, 1_000),
            Err(ReplayError::FromTheFuture { ahead_ms: 11, .. })
        ));
    }

    proptest! {
        /// Against a model that remembers every extended number: the window never
        /// accepts a number twice, and accepts every fresh number within its reach.
        #[test]
        fn never_accepts_twice_and_never_refuses_fresh_recent_numbers(
            steps in proptest::collection::vec((0u16..200, any::<bool>()), 1..400)
        ) {
            let mut w = ReplayWindow::new();
            let mut model = std::collections::BTreeSet::new();
            let mut top: u64 = 1_000;
            w.accept(top as u16).unwrap();
            model.insert(top);
            for (jump, forward) in steps {
                let ext = if forward { top + u64::from(jump) } else { top.saturating_sub(u64::from(jump)) };
                let got = w.accept(ext as u16);
                let fresh = !model.contains(&ext);
                let reachable = ext + ReplayWindow::SIZE > top;
                if fresh && reachable {
                    prop_assert_eq!(got, Ok(ext));
                    model.insert(ext);
                    top = top.max(ext);
                } else {
                    prop_assert!(got.is_err(), "accepted {} again or too old (top {})", ext, top);
                }
            }
        }
    }
}
