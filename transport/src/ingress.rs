//! What a node checks on every frame from a peer before handing it on, as a state
//! machine with no I/O: replay windows per lane and for datagrams, the timestamp
//! window, agent ownership, the 0-RTT rule, lane consistency, and a per-peer token
//! bucket that sheds the lowest priorities first.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::skew::{ClockWarning, ClockWatch};
use crate::wire::{AcpErrorCode, Header, Lane, ReplayWindow, TimestampWindow};

/// How a frame arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    /// On a lane stream.
    Lane(Lane),
    /// As a QUIC datagram.
    Datagram,
}

impl Via {
    /// Lower-case name for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Via::Lane(lane) => lane.name(),
            Via::Datagram => "datagram",
        }
    }
}

/// Why a frame was dropped without closing the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The replay window had seen its sequence number, or it was too old.
    Replayed = 0,
    /// Its timestamp was outside the timestamp window.
    Stale = 1,
    /// Its Agent ID belongs to another node.
    NotOwned = 2,
    /// The peer is over its rate and this frame's priority is shed first.
    Shed = 3,
}

/// What to do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it on.
    Accept,
    /// Drop it and count it; the connection goes on.
    Drop(DropReason),
    /// Close the connection with this code.
    Close(AcpErrorCode, &'static str),
}

/// Which node owns which Agent ID. Discovery fills it (through the runtime); the
/// transport only reads it. Agent ID 0 is the node itself and always allowed.
#[derive(Debug, Default)]
pub struct OwnershipTable {
    owners: RwLock<HashMap<u32, Arc<str>>>,
}

impl OwnershipTable {
    /// An empty table.
    pub fn new() -> OwnershipTable {
        OwnershipTable::default()
    }

    /// Records that `node` owns `agent`.
    pub fn assign(&self, agent: u32, node: &str) {
        if let Ok(mut owners) = self.owners.write() {
            owners.insert(agent, Arc::from(node));
        }
    }

    /// Records that `node` owns every one of `agents`, under one lock and with one
    /// shared copy of the name.
    pub fn assign_all(&self, agents: &[u32], node: &Arc<str>) {
        if let Ok(mut owners) = self.owners.write() {
            owners.reserve(agents.len());
            for &agent in agents {
                owners.insert(agent, node.clone());
            }
        }
    }

    /// Forgets every one of `agents`, under one lock.
    pub fn remove_all(&self, agents: &[u32]) {
        if let Ok(mut owners) = self.owners.write() {
            for agent in agents {
                owners.remove(agent);
            }
        }
    }

    /// Forgets every agent `node` owned (it left or died).
    pub fn remove_node(&self, node: &str) {
        if let Ok(mut owners) = self.owners.write() {
            owners.retain(|_, owner| &**owner != node);
        }
    }

    /// True if `peer` may send as `agent`.
    pub fn may_send_as(&self, peer: &str, agent: u32) -> bool {
        agent == 0
            || self
                .owners
                .read()
                .map(|owners| owners.get(&agent).is_some_and(|owner| &**owner == peer))
                .unwrap_or(false)
    }
}

/// Per-peer ingress limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngressLimits {
    /// Sustained bytes per second a peer may send on the limited carriers (normal and
    /// bulk lanes, datagrams). Coordination and urgent frames are never shed, but
    /// they spend the budget too.
    pub rate_bytes_per_sec: u64,
    /// Bucket size: how far a peer may burst above the rate.
    pub burst_bytes: u64,
}

impl Default for IngressLimits {
    fn default() -> IngressLimits {
        IngressLimits {
            rate_bytes_per_sec: 512 * 1024 * 1024,
            burst_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A token bucket that admits by priority: the emptier it gets, the fewer classes it
/// admits. Bulk needs the bucket at least half full, datagrams a quarter, normal just
/// enough for the frame; coordination and urgent always pass.
#[derive(Clone, Debug)]
struct PriorityBucket {
    limits: IngressLimits,
    tokens: u64,
    last_ms: Option<u64>,
}

impl PriorityBucket {
    fn new(limits: IngressLimits) -> PriorityBucket {
        PriorityBucket {
            limits,
            tokens: limits.burst_bytes,
            last_ms: None,
        }
    }

    fn admit(&mut self, via: Via, bytes: u64, now_ms: u64) -> bool {
        let elapsed_ms = self.last_ms.map_or(0, |last| now_ms.saturating_sub(last));
        self.last_ms = Some(now_ms.max(self.last_ms.unwrap_or(0)));
        let refill = elapsed_ms.saturating_mul(self.limits.rate_bytes_per_sec) / 1000;
        self.tokens = self
            .tokens
            .saturating_add(refill)
            .min(self.limits.burst_bytes);
        let reserve = match via {
            Via::Lane(Lane::Urgent | Lane::Coordination) => {
                self.tokens = self.tokens.saturating_sub(bytes);
                return true;
            }
            Via::Lane(Lane::Normal) => 0,
            Via::Datagram => self.limits.burst_bytes / 4,
            Via::Lane(Lane::Bulk) => self.limits.burst_bytes / 2,
        };
        if self.tokens >= bytes.saturating_add(reserve) {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }
}

/// The ingress state for one peer connection.
#[derive(Clone, Debug)]
pub struct IngressGuard {
    lanes: [ReplayWindow; 4],
    datagrams: ReplayWindow,
    /// The timestamp window, and what the timestamps say of the peer's clock.
    clock: ClockWatch,
    bucket: PriorityBucket,
}

/// One frame's facts, as the guard needs them.
#[derive(Clone, Copy, Debug)]
pub struct Arrival<'a> {
    /// How it came.
    pub via: Via,
    /// Its header.
    pub header: &'a Header,
    /// Its timestamp, if it has one.
    pub timestamp_ms: Option<u64>,
    /// Its size on the wire.
    pub wire_bytes: u64,
    /// True if it came on a stream the peer opened in 0-RTT data.
    pub zero_rtt: bool,
    /// True if the peer owns the header's Agent ID.
    pub agent_owned: bool,
}

impl IngressGuard {
    /// A guard with fresh windows and a full bucket.
    pub fn new(limits: IngressLimits, timestamps: TimestampWindow) -> IngressGuard {
        IngressGuard {
            lanes: Default::default(),
            datagrams: ReplayWindow::new(),
            clock: ClockWatch::new(timestamps),
            bucket: PriorityBucket::new(limits),
        }
    }

    /// What the peer's timestamps have lately shown of its clock, once (at most one
    /// warning per 30 s: [`ClockWatch`]).
    pub fn take_clock_warning(&mut self) -> Option<ClockWarning> {
        self.clock.take_warning()
    }

    /// Decides what to do with a frame; `now_ms` is the receiver's wall clock.
    pub fn check(&mut self, arrival: Arrival<'_>, now_ms: u64) -> Verdict {
        let h = arrival.header;
        if arrival.zero_rtt && h.msg_type.is_state_changing() {
            return Verdict::Close(
                AcpErrorCode::ZeroRttRefused,
                "state-changing frame in 0-RTT data",
            );
        }
        let window = match arrival.via {
            Via::Lane(lane) => {
                if Lane::for_header(h) != lane {
                    return Verdict::Close(
                        AcpErrorCode::ProtocolViolation,
                        "frame on the wrong lane",
                    );
                }
                &mut self.lanes[lane.index()]
            }
            Via::Datagram => {
                if arrival.timestamp_ms.is_none() {
                    return Verdict::Close(
                        AcpErrorCode::ProtocolViolation,
                        "datagram without timestamp",
                    );
                }
                &mut self.datagrams
            }
        };
        if let Some(ts) = arrival.timestamp_ms {
            if self.clock.check(ts, now_ms).is_err() {
                return Verdict::Drop(DropReason::Stale);
            }
        }
        if window.accept(h.seq).is_err() {
            return Verdict::Drop(DropReason::Replayed);
        }
        if !arrival.agent_owned {
            return Verdict::Drop(DropReason::NotOwned);
        }
        if !self.bucket.admit(arrival.via, arrival.wire_bytes, now_ms) {
            return Verdict::Drop(DropReason::Shed);
        }
        Verdict::Accept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MessageType;

    fn header(t: MessageType, seq: u16) -> Header {
        let mut h = Header::new(t);
        h.seq = seq;
        h
    }

    fn arrival(via: Via, h: &Header) -> Arrival<'_> {
        Arrival {
            via,
            header: h,
            timestamp_ms: (via == Via::Datagram).then_some(1_000),
            wire_bytes: 100,
            zero_rtt: false,
            agent_owned: true,
        }
    }

    fn guard(rate: u64, burst: u64) -> IngressGuard {
        IngressGuard::new(
            IngressLimits {
                rate_bytes_per_sec: rate,
                burst_bytes: burst,
            },
            TimestampWindow::default(),
        )
    }

    #[test]
    fn state_changing_frames_in_0rtt_close_the_connection() {
        let mut g = guard(1 << 30, 1 << 30);
        for t in [MessageType::Allocate, MessageType::Adjust] {
            let h = header(t, 0);
            let a = Arrival {
                zero_rtt: true,
                via: Via::Lane(Lane::for_header(&h)),
                ..arrival(Via::Datagram, &h)
            };
            assert!(matches!(
                g.check(a, 1_000),
                Verdict::Close(AcpErrorCode::ZeroRttRefused, _)
            ));
        }
        let h = header(MessageType::Envelope, 0);
        let a = Arrival {
            zero_rtt: true,
            ..arrival(Via::Lane(Lane::Normal), &h)
        };
        assert_eq!(g.check(a, 1_000), Verdict::Accept);
    }

    #[test]
    fn replays_spoofs_and_stale_datagrams_are_dropped_not_closed() {
        let mut g = guard(1 << 30, 1 << 30);
        let h = header(MessageType::Envelope, 5);
        assert_eq!(
            g.check(arrival(Via::Lane(Lane::Normal), &h), 1_000),
            Verdict::Accept
        );
        assert_eq!(
            g.check(arrival(Via::Lane(Lane::Normal), &h), 1_000),
            Verdict::Drop(DropReason::Replayed)
        );
        let h = header(MessageType::Envelope, 6);
        let spoof = Arrival {
            agent_owned: false,
            ..arrival(Via::Lane(Lane::Normal), &h)
        };
        assert_eq!(g.check(spoof, 1_000), Verdict::Drop(DropReason::NotOwned));
        let h = header(MessageType::Report, 1);
        assert_eq!(g.check(arrival(Via::Datagram, &h), 1_000), Verdict::Accept);
        let h = header(MessageType::Report, 2);
        assert_eq!(
            g.check(arrival(Via::Datagram, &h), 60_000),
            Verdict::Drop(DropReason::Stale)
        );
    }

    #[test]
    fn frames_on_the_wrong_lane_or_untimestamped_datagrams_close() {
        let mut g = guard(1 << 30, 1 << 30);
        let h = header(MessageType::Adjust, 0);
        assert!(matches!(
            g.check(arrival(Via::Lane(Lane::Bulk), &h), 0),
            Verdict::Close(AcpErrorCode::ProtocolViolation, _)
        ));
        let h = header(MessageType::Report, 0);
        let a = Arrival {
            timestamp_ms: None,
            ..arrival(Via::Datagram, &h)
        };
        assert!(matches!(
            g.check(a, 0),
            Verdict::Close(AcpErrorCode::ProtocolViolation, _)
        ));
    }

    #[test]
    fn an_emptying_bucket_sheds_bulk_first_then_datagrams_then_normal_never_urgent() {
        // 1,000-byte bucket, no refill within the test's instant.
        let mut g = guard(0, 1_000);
        let mut seq = 0u16;
        let mut send = |g: &mut IngressGuard, via: Via, t: MessageType, bytes: u64| {
            seq += 1;
            let mut h = header(t, seq);
            h.prio = match via {
                Via::Lane(lane) => [32, 96, 160, 224][lane.index()],
                Via::Datagram => 96,
            };
            let a = Arrival {
                wire_bytes: bytes,
                ..arrival(via, &h)
            };
            g.check(a, 1_000)
        };
        assert_eq!(
            send(&mut g, Via::Lane(Lane::Bulk), MessageType::Envelope, 400),
            Verdict::Accept
        ); // 600 left
        assert_eq!(
            send(&mut g, Via::Lane(Lane::Bulk), MessageType::Envelope, 200),
            Verdict::Drop(DropReason::Shed)
        ); // needs 700
        assert_eq!(
            send(&mut g, Via::Datagram, MessageType::Report, 300),
            Verdict::Accept
        ); // 300 left
        assert_eq!(
            send(&mut g, Via::Datagram, MessageType::Report, 100),
            Verdict::Drop(DropReason::Shed)
        ); // needs 350
        assert_eq!(
            send(&mut g, Via::Lane(Lane::Normal), MessageType::Envelope, 300),
            Verdict::Accept
        ); // 0 left
        assert_eq!(
            send(&mut g, Via::Lane(Lane::Normal), MessageType::Envelope, 1),
            Verdict::Drop(DropReason::Shed)
        );
        assert_eq!(
            send(&mut g, Via::Lane(Lane::Urgent), MessageType::Adjust, 500),
            Verdict::Accept
        );
        assert_eq!(
            send(
                &mut g,
                Via::Lane(Lane::Coordination),
                MessageType::Allocate,
                500
            ),
            Verdict::Accept
        );
    }

    #[test]
    fn the_bucket_refills_at_its_rate() {
        let mut b = PriorityBucket::new(IngressLimits {
            rate_bytes_per_sec: 1_000,
            burst_bytes: 1_000,
        });
        assert!(b.admit(Via::Lane(Lane::Normal), 1_000, 0));
        assert!(!b.admit(Via::Lane(Lane::Normal), 100, 0));
        assert!(b.admit(Via::Lane(Lane::Normal), 100, 100));
        assert!(!b.admit(Via::Lane(Lane::Normal), 100, 100));
    }

    #[test]
    fn ownership_is_per_node_and_agent_zero_is_the_node() {
        let t = OwnershipTable::new();
        t.assign(7, "a");
        assert!(t.may_send_as("a", 7));
        assert!(!t.may_send_as("b", 7));
        assert!(t.may_send_as("b", 0));
        t.remove_node("a");
        assert!(!t.may_send_as("a", 7));
    }
}
