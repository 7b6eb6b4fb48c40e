//! Counters of what the transport did, refused and shed, readable without a metrics
//! recorder (tests, `bench`), and exported to Prometheus by the runtime.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::ingress::{DropReason, Via};
use crate::wire::{AcpErrorCode, Lane, MessageType};

/// Live counters, shared by every task of one endpoint.
#[derive(Debug, Default)]
pub struct TransportStats {
    handshakes_refused: [AtomicU64; 4],
    handshakes_unfinished: AtomicU64,
    frames_in: [AtomicU64; 5],
    frames_out: [AtomicU64; 5],
    bytes_in: [AtomicU64; 5],
    bytes_out: [AtomicU64; 5],
    dropped: [AtomicU64; 3],
    shed: [AtomicU64; 5],
    closed_for_cause: [AtomicU64; 16],
    datagram_fallbacks: AtomicU64,
    direct_sends: [AtomicU64; 2],
    duplicates_retired: [AtomicU64; 2],
    frames_in_by_type: [AtomicU64; 12],
    frames_out_by_type: [AtomicU64; 12],
}

/// Frame counts by message type code, gathered per batch before they are added to the
/// shared counters (one atomic add per type per batch, not per frame).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TypeCounts(pub [u64; 12]);

impl TypeCounts {
    /// Counts one frame of `msg_type`.
    pub fn add(&mut self, msg_type: MessageType) {
        self.add_frames(msg_type, 1);
    }

    /// Counts `n` frames of `msg_type`.
    pub fn add_frames(&mut self, msg_type: MessageType, n: u16) {
        self.0[usize::from(msg_type.code())] += u64::from(n);
    }
}

/// Why a handshake was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeRefusal {
    /// The client presented no certificate.
    NoCertificate,
    /// The certificate does not chain to the cluster CA.
    UnknownIssuer,
    /// The certificate is expired or not yet valid.
    Expired,
    /// Anything else (bad ALPN, bad name, protocol error).
    Other,
}

impl HandshakeRefusal {
    /// Classifies the error text quinn reports for a failed handshake.
    pub fn classify(error: &str) -> HandshakeRefusal {
        let e = error.to_ascii_lowercase();
        if [
            "no certificate",
            "certificate required",
            "certificaterequired",
        ]
        .iter()
        .any(|s| e.contains(s))
        {
            HandshakeRefusal::NoCertificate
        } else if ["expired", "not valid yet", "notvalidyet"]
            .iter()
            .any(|s| e.contains(s))
        {
            HandshakeRefusal::Expired
        } else if [
            "unknownissuer",
            "badsignature",
            "unknown issuer",
            "unknown ca",
            "unknownca",
        ]
        .iter()
        .any(|s| e.contains(s))
        {
            // A CA with the same name but another key fails as a bad signature.
            HandshakeRefusal::UnknownIssuer
        } else {
            HandshakeRefusal::Other
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

fn via_index(via: Via) -> usize {
    match via {
        Via::Lane(lane) => lane.index(),
        Via::Datagram => 4,
    }
}

/// A copy of the counters at one moment. Arrays by carrier are indexed bulk, normal,
/// coordination, urgent, datagram.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Handshakes refused: no certificate, unknown issuer, expired, other.
    pub handshakes_refused: [u64; 4],
    /// Incoming handshakes that ended unfinished, refused by no one: the client went
    /// silent (timed out), reset or closed it (it gave up, or was paused past its own
    /// timeout while its first packets waited here).
    pub handshakes_unfinished: u64,
    /// Frames received, by carrier.
    pub frames_in: [u64; 5],
    /// Frames sent, by carrier.
    pub frames_out: [u64; 5],
    /// Bytes received, by carrier.
    pub bytes_in: [u64; 5],
    /// Bytes sent, by carrier.
    pub bytes_out: [u64; 5],
    /// Frames dropped on ingress: replayed, stale timestamp, agent not owned.
    pub dropped: [u64; 3],
    /// Frames shed by the rate limiter or a full event queue, by carrier.
    pub shed: [u64; 5],
    /// Connections this node closed because of what the peer sent, by ACP error code
    /// (index = code; codes above 15 count at 15).
    pub closed_for_cause: [u64; 16],
    /// Datagram frames sent on the bulk lane because they were too large.
    pub datagram_fallbacks: u64,
    /// Sends on the bulk and normal lanes that found their lane idle and wrote to its
    /// stream themselves instead of queueing for the lane's writer.
    pub direct_sends: [u64; 2],
    /// Duplicate connections retired (one of two simultaneous dials): closed once
    /// drained both ways, and closed when the peer had not ended its lanes in time.
    pub duplicates_retired: [u64; 2],
    /// Frames received, by message type code.
    pub frames_in_by_type: [u64; 12],
    /// Frames sent, by message type code.
    pub frames_out_by_type: [u64; 12],
}

impl StatsSnapshot {
    /// Frames dropped as replays.
    pub fn replayed(&self) -> u64 {
        self.dropped[DropReason::Replayed as usize]
    }

    /// Frames dropped because their Agent ID was not the peer's.
    pub fn not_owned(&self) -> u64 {
        self.dropped[DropReason::NotOwned as usize]
    }

    /// Connections closed for what the peer sent, with `code`.
    pub fn closed_with(&self, code: AcpErrorCode) -> u64 {
        self.closed_for_cause[(code.code() as usize).min(15)]
    }
}

fn load<const N: usize>(a: &[AtomicU64; N]) -> [u64; N] {
    std::array::from_fn(|i| a[i].load(Ordering::Relaxed))
}

impl TransportStats {
    pub(crate) fn handshake_refused(&self, why: HandshakeRefusal) {
        self.handshakes_refused[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn handshake_unfinished(&self) {
        self.handshakes_unfinished.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, via: Via, frames: u64, bytes: u64) {
        self.frames_in[via_index(via)].fetch_add(frames, Ordering::Relaxed);
        self.bytes_in[via_index(via)].fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn sent(&self, via: Via, frames: u64, bytes: u64) {
        self.frames_out[via_index(via)].fetch_add(frames, Ordering::Relaxed);
        self.bytes_out[via_index(via)].fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self, why: DropReason, via: Via) {
        match why {
            DropReason::Shed => self.shed[via_index(via)].fetch_add(1, Ordering::Relaxed),
            other => self.dropped[other as usize].fetch_add(1, Ordering::Relaxed),
        };
    }

    pub(crate) fn closed_for_cause(&self, code: AcpErrorCode) {
        let i = (code.code() as usize).min(15);
        self.closed_for_cause[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn received_types(&self, counts: &TypeCounts) {
        for (slot, n) in self.frames_in_by_type.iter().zip(counts.0) {
            if n > 0 {
                slot.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn sent_types(&self, counts: &TypeCounts) {
        for (slot, n) in self.frames_out_by_type.iter().zip(counts.0) {
            if n > 0 {
                slot.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// A send on a lower lane (`lane` is bulk or normal) that skipped the writer.
    pub(crate) fn direct_send(&self, lane: Lane) {
        if let Some(slot) = self.direct_sends.get(lane.index()) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A duplicate connection was retired: drained both ways (`in_time`) or not.
    pub(crate) fn duplicate_retired(&self, in_time: bool) {
        self.duplicates_retired[usize::from(!in_time)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn datagram_fallback(&self) {
        self.datagram_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            handshakes_refused: load(&self.handshakes_refused),
            handshakes_unfinished: self.handshakes_unfinished.load(Ordering::Relaxed),
            frames_in: load(&self.frames_in),
            frames_out: load(&self.frames_out),
            bytes_in: load(&self.bytes_in),
            bytes_out: load(&self.bytes_out),
            dropped: load(&self.dropped),
            shed: load(&self.shed),
            closed_for_cause: load(&self.closed_for_cause),
            datagram_fallbacks: self.datagram_fallbacks.load(Ordering::Relaxed),
            direct_sends: load(&self.direct_sends),
            duplicates_retired: load(&self.duplicates_retired),
            frames_in_by_type: load(&self.frames_in_by_type),
            frames_out_by_type: load(&self.frames_out_by_type),
        }
    }
}
