//! How the transport hands what it receives to its owner: one bounded queue per
//! carrier, read in priority order, so an urgent message never waits behind bulk data
//! that already arrived, and membership gossip is never crowded out by other datagrams.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;

use crate::endpoint::{PeerName, TransportEvent};
use crate::wire::{Lane, Message, MessageType};

/// What [`Inbox::take`] returns: the messages it left for the event queues.
pub type Leftover<'a> = Pin<Box<dyn Future<Output = Vec<Message>> + Send + 'a>>;

/// An owner's handler that runs on a lane reader's own task, before anything is
/// queued: it takes the messages it can deal with at once and leaves the rest for
/// [`TransportEvents`]. It saves the hop from the reader to the owner's task (a wake-up
/// and a queue per batch) on the paths where that hop is most of the latency.
///
/// It is called for one lane at a time, in that lane's order; lanes run concurrently,
/// as they always did. Its future holds that lane back while it runs (as a full event
/// queue does), so it should hand work off rather than do it.
pub trait Inbox: Send + Sync + 'static {
    /// Takes what it handles of `messages` (from `peer`, on `lane`) and returns the rest.
    fn take<'a>(&'a self, peer: &'a PeerName, lane: Lane, messages: Vec<Message>) -> Leftover<'a>;
}

/// Queue sizes, in events. A lane reader waits when its queue is full, which holds
/// that lane back through QUIC flow control; a datagram is shed instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventQueues {
    /// Peer up and down.
    pub peers: usize,
    /// Urgent-lane events.
    pub urgent: usize,
    /// Coordination-lane events.
    pub coordination: usize,
    /// Normal-lane events.
    pub normal: usize,
    /// Bulk-lane events: kept short, so bulk data waits in flow control, not in memory.
    pub bulk: usize,
    /// Datagram events.
    pub datagrams: usize,
    /// Membership gossip datagrams (MEMBERSHIP), queued apart from the other datagrams
    /// and read before them: a flood of progress REPORTs that fills the datagram queue
    /// would otherwise shed the failure detector's probes and acks, and have nodes that
    /// are only busy declared down.
    pub gossip: usize,
}

impl Default for EventQueues {
    fn default() -> EventQueues {
        EventQueues {
            peers: 256,
            urgent: 256,
            coordination: 256,
            normal: 256,
            bulk: 8,
            datagrams: 256,
            gossip: 256,
        }
    }
}

/// The sending halves, held by the transport's tasks.
#[derive(Clone)]
pub(crate) struct EventSenders {
    peers: mpsc::Sender<TransportEvent>,
    lanes: [mpsc::Sender<TransportEvent>; 4],
    datagrams: mpsc::Sender<TransportEvent>,
    gossip: mpsc::Sender<TransportEvent>,
}

impl EventSenders {
    pub(crate) fn peers(&self) -> &mpsc::Sender<TransportEvent> {
        &self.peers
    }

    /// The queue of a lane's messages.
    pub(crate) fn lane(&self, lane: Lane) -> &mpsc::Sender<TransportEvent> {
        &self.lanes[lane.index()]
    }

    /// The queue of a datagram of this type: MEMBERSHIP has its own.
    pub(crate) fn datagram(&self, msg_type: MessageType) -> &mpsc::Sender<TransportEvent> {
        match msg_type {
            MessageType::Membership => &self.gossip,
            _ => &self.datagrams,
        }
    }
}

/// What the owner of a transport reads: events in priority order (peer changes, then
/// membership gossip, urgent, coordination, other datagrams, normal, bulk); within one
/// carrier, in arrival order.
pub struct TransportEvents {
    peers: mpsc::Receiver<TransportEvent>,
    gossip: mpsc::Receiver<TransportEvent>,
    urgent: mpsc::Receiver<TransportEvent>,
    coordination: mpsc::Receiver<TransportEvent>,
    datagrams: mpsc::Receiver<TransportEvent>,
    normal: mpsc::Receiver<TransportEvent>,
    bulk: mpsc::Receiver<TransportEvent>,
}

pub(crate) fn channels(sizes: EventQueues) -> (EventSenders, TransportEvents) {
    let (peers_tx, peers) = mpsc::channel(sizes.peers.max(1));
    let (bulk_tx, bulk) = mpsc::channel(sizes.bulk.max(1));
    let (normal_tx, normal) = mpsc::channel(sizes.normal.max(1));
    let (coordination_tx, coordination) = mpsc::channel(sizes.coordination.max(1));
    let (urgent_tx, urgent) = mpsc::channel(sizes.urgent.max(1));
    let (datagrams_tx, datagrams) = mpsc::channel(sizes.datagrams.max(1));
    let (gossip_tx, gossip) = mpsc::channel(sizes.gossip.max(1));
    // Indexed by `Lane::index`: bulk, normal, coordination, urgent.
    let lanes = [bulk_tx, normal_tx, coordination_tx, urgent_tx];
    debug_assert!(Lane::ALL.iter().enumerate().all(|(i, l)| l.index() == i));
    (
        EventSenders {
            peers: peers_tx,
            lanes,
            datagrams: datagrams_tx,
            gossip: gossip_tx,
        },
        TransportEvents {
            peers,
            gossip,
            urgent,
            coordination,
            datagrams,
            normal,
            bulk,
        },
    )
}

impl TransportEvents {
    /// The next event, highest priority first; `None` once the transport is gone and
    /// every queue is drained.
    pub async fn recv(&mut self) -> Option<TransportEvent> {
        tokio::select! {
            biased;
            Some(e) = self.peers.recv() => Some(e),
            Some(e) = self.gossip.recv() => Some(e),
            Some(e) = self.urgent.recv() => Some(e),
            Some(e) = self.coordination.recv() => Some(e),
            Some(e) = self.datagrams.recv() => Some(e),
            Some(e) = self.normal.recv() => Some(e),
            Some(e) = self.bulk.recv() => Some(e),
            else => None,
        }
    }

    /// The next event if one is ready now, highest priority first.
    pub fn try_recv(&mut self) -> Option<TransportEvent> {
        [
            &mut self.peers,
            &mut self.gossip,
            &mut self.urgent,
            &mut self.coordination,
            &mut self.datagrams,
            &mut self.normal,
            &mut self.bulk,
        ]
        .into_iter()
        .find_map(|rx| rx.try_recv().ok())
    }
}
