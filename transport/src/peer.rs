//! One peer connection: its lanes (a byte-bounded queue and a writer per lane, each
//! lane one long-lived, prioritized QUIC stream), its datagrams, and the readers that
//! check every incoming frame before handing it to the transport's owner.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{SendDatagramError, VarInt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::endpoint::{PeerName, Shared, TransportError, TransportEvent};
use crate::headroom::WindowGauge;
use crate::ingress::{Arrival, DropReason, IngressGuard, Verdict, Via};
use crate::stats::TransportStats;
use crate::wire::{
    AcpErrorCode, Flags, Frame, FrameDecoder, Lane, Message, Reassembler, HEADER_LEN, TIMESTAMP_LEN,
};

/// A writer takes up to this many queued bytes into one write.
const BATCH_BYTES: usize = 64 * 1024;
/// Lower lanes write in pieces of this size, checking for headroom before each.
const GATED_CHUNK_BYTES: usize = 16 * 1024;
/// Largest piece a reader takes from quinn at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Highest Stream Prio of the bulk lane, where oversized datagrams fall back to.
const BULK_PRIO_MAX: u8 = 63;

struct Queued {
    message: Message,
    _permit: OwnedSemaphorePermit,
}

struct LaneTx {
    tx: mpsc::UnboundedSender<Queued>,
    /// Bytes that may be queued; the unbounded channel is bounded by these permits.
    budget: Arc<Semaphore>,
    budget_bytes: usize,
}

/// The state of one connection to a peer.
pub(crate) struct PeerConn {
    pub(crate) name: PeerName,
    pub(crate) conn: quinn::Connection,
    pub(crate) dialled_by_us: bool,
    lanes: [LaneTx; 4],
    datagram_seq: AtomicU32,
    gauge: Arc<WindowGauge>,
}

impl PeerConn {
    /// Sets up lanes and starts the connection's writer and reader tasks.
    pub(crate) fn start(
        shared: Arc<Shared>,
        conn: quinn::Connection,
        name: PeerName,
        dialled_by_us: bool,
        gauge: Arc<WindowGauge>,
        handshake: watch::Receiver<bool>,
    ) -> Arc<PeerConn> {
        let config = &shared.config;
        let lanes = Lane::ALL.map(|lane| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(write_lane(
                LaneWriter {
                    conn: conn.clone(),
                    lane,
                    gauge: gauge.clone(),
                    stats: shared.stats.clone(),
                    max_frame_payload: config.max_frame_payload,
                    handshake: handshake.clone(),
                },
                rx,
            ));
            let budget_bytes = config.lane_queue_bytes.clamp(1, Semaphore::MAX_PERMITS);
            LaneTx {
                tx,
                budget: Arc::new(Semaphore::new(budget_bytes)),
                budget_bytes,
            }
        });
        let reader = Reader {
            guard: Arc::new(Mutex::new(IngressGuard::new(
                config.ingress,
                config.timestamps,
            ))),
            shared: shared.clone(),
            name: name.clone(),
            conn: conn.clone(),
        };
        tokio::spawn(accept_lanes(reader.clone()));
        tokio::spawn(read_datagrams(reader));
        Arc::new(PeerConn {
            name,
            conn,
            dialled_by_us,
            lanes,
            datagram_seq: AtomicU32::new(0),
            gauge,
        })
    }

    /// Wakes senders waiting for queue space: the connection is gone.
    pub(crate) fn shut(&self) {
        for lane in &self.lanes {
            lane.budget.close();
        }
    }
}

/// A handle on one peer connection, for sending and inspecting it.
#[derive(Clone)]
pub struct PeerHandle {
    shared: Arc<Shared>,
    conn: Arc<PeerConn>,
}

impl PeerHandle {
    pub(crate) fn new(shared: Arc<Shared>, conn: Arc<PeerConn>) -> PeerHandle {
        PeerHandle { shared, conn }
    }

    /// The peer's node name.
    pub fn name(&self) -> &PeerName {
        &self.conn.name
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.conn.conn.remote_address()
    }

    /// quinn's smoothed round-trip time to the peer.
    pub fn rtt(&self) -> Duration {
        self.conn.conn.rtt()
    }

    /// quinn's connection statistics (packets, losses, congestion window).
    pub fn connection_stats(&self) -> quinn::ConnectionStats {
        self.conn.conn.stats()
    }

    /// The congestion window and bytes in flight the lane writers see.
    pub fn window(&self) -> (u64, u64) {
        (
            self.conn.gauge.window_bytes(),
            self.conn.gauge.in_flight_bytes(),
        )
    }

    /// True while the connection is open.
    pub fn is_open(&self) -> bool {
        self.conn.conn.close_reason().is_none()
    }

    /// Queues `message` on the lane its header picks (its sequence number is set by the
    /// lane), waiting while that lane's queue is full. Other lanes are unaffected.
    pub async fn send(&self, message: Message) -> Result<(), TransportError> {
        let max = self.shared.config.max_frame_payload;
        if message.timestamp_ms.is_some() && message.body.len() + TIMESTAMP_LEN > max {
            return Err(TransportError::Unframeable(crate::wire::FrameTooLarge {
                len: message.body.len() + TIMESTAMP_LEN,
            }));
        }
        let lane = &self.conn.lanes[Lane::for_header(&message.header).index()];
        let cost = message.body.len() + HEADER_LEN * message.frame_count(max);
        let permits = u32::try_from(cost.min(lane.budget_bytes)).unwrap_or(u32::MAX);
        let closed = || TransportError::PeerClosed(self.conn.name.to_string());
        let permit = lane
            .budget
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| closed())?;
        lane.tx
            .send(Queued {
                message,
                _permit: permit,
            })
            .map_err(|_| closed())
    }

    /// Sends `message` as a timestamped QUIC datagram (unreliable). If it is larger than
    /// the path allows, it goes on the bulk lane instead, with its Stream Prio lowered
    /// into the bulk range. Returns how it went.
    pub async fn send_datagram(&self, mut message: Message) -> Result<Via, TransportError> {
        let now_ms = self.shared.clock.now_unix_ms();
        message.timestamp_ms = Some(now_ms);
        message.header.flags = message.header.flags.without(Flags::CONTINUATION);
        let wire_len = HEADER_LEN + TIMESTAMP_LEN + message.body.len();
        let room = self.conn.conn.max_datagram_size().unwrap_or(0);
        if wire_len <= room && wire_len <= HEADER_LEN + self.shared.config.max_frame_payload {
            let mut header = message.header;
            header.seq = self.conn.datagram_seq.fetch_add(1, Ordering::Relaxed) as u16;
            let frame = Frame::timestamped(header, now_ms, message.body.clone())?;
            match self.conn.conn.send_datagram(frame.to_bytes()) {
                Ok(()) => {
                    self.shared.stats.sent(Via::Datagram, 1, wire_len as u64);
                    return Ok(Via::Datagram);
                }
                Err(SendDatagramError::ConnectionLost(_)) => {
                    return Err(TransportError::PeerClosed(self.conn.name.to_string()));
                }
                Err(e) => {
                    debug!(peer = %self.conn.name, error = %e, "datagram refused; using the bulk lane")
                }
            }
        }
        self.shared.stats.datagram_fallback();
        message.header.prio = message.header.prio.min(BULK_PRIO_MAX);
        message.header.flags = message.header.flags.without(Flags::URGENT);
        if message.body.len() + TIMESTAMP_LEN > self.shared.config.max_frame_payload {
            message.timestamp_ms = None;
        }
        self.send(message).await?;
        Ok(Via::Lane(Lane::Bulk))
    }

    /// Closes the connection with `code`.
    pub fn close(&self, code: AcpErrorCode, reason: &str) {
        self.conn
            .conn
            .close(VarInt::from_u32(code.code()), reason.as_bytes());
    }
}

struct LaneWriter {
    conn: quinn::Connection,
    lane: Lane,
    gauge: Arc<WindowGauge>,
    stats: Arc<TransportStats>,
    max_frame_payload: usize,
    handshake: watch::Receiver<bool>,
}

/// Drains one lane's queue into its stream, batching small messages into one write.
/// Sequence numbers are assigned here, the one place that knows the lane's order.
async fn write_lane(mut w: LaneWriter, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut stream: Option<quinn::SendStream> = None;
    let mut seq: u16 = 0;
    let mut buf = BytesMut::with_capacity(BATCH_BYTES);
    let mut batch: Vec<Queued> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut queued = first.message.body.len();
        batch.push(first);
        while queued < BATCH_BYTES {
            match rx.try_recv() {
                Ok(q) => {
                    queued += q.message.body.len() + HEADER_LEN;
                    batch.push(q);
                }
                Err(_) => break,
            }
        }
        let mut frames = 0u64;
        for q in &batch {
            match q.message.encode_frames(seq, w.max_frame_payload, &mut buf) {
                Ok(n) => {
                    seq = seq.wrapping_add(n);
                    frames += u64::from(n);
                }
                // `PeerHandle::send` refuses unframeable messages before queueing them.
                Err(e) => {
                    warn!(lane = w.lane.name(), error = %e, "dropping an unframeable message")
                }
            }
        }
        if stream.is_none() {
            // State-changing frames travel on these lanes: never in 0-RTT data.
            if matches!(w.lane, Lane::Urgent | Lane::Coordination)
                && w.handshake.wait_for(|done| *done).await.is_err()
            {
                return;
            }
            match w.conn.open_uni().await {
                Ok(s) => {
                    let _ = s.set_priority(w.lane.index() as i32);
                    stream = Some(s);
                }
                Err(_) => return,
            }
        }
        let Some(s) = stream.as_mut() else { return };
        let bytes = buf.split().freeze();
        let len = bytes.len() as u64;
        let written = if w.lane <= Lane::Normal {
            write_gated(s, bytes, &w.gauge).await
        } else {
            s.write_chunk(bytes).await
        };
        if written.is_err() {
            return;
        }
        w.stats.sent(Via::Lane(w.lane), frames, len);
        batch.clear();
    }
    if let Some(mut s) = stream {
        let _ = s.finish();
    }
}

/// Writes a lower lane's bytes in pieces, each only once the window has headroom.
async fn write_gated(
    stream: &mut quinn::SendStream,
    mut bytes: Bytes,
    gauge: &WindowGauge,
) -> Result<(), quinn::WriteError> {
    while !bytes.is_empty() {
        gauge.wait_for_room().await;
        let piece = bytes.split_to(bytes.len().min(GATED_CHUNK_BYTES));
        stream.write_chunk(piece).await?;
    }
    Ok(())
}

/// What every reader task of one connection shares.
#[derive(Clone)]
struct Reader {
    shared: Arc<Shared>,
    name: PeerName,
    conn: quinn::Connection,
    guard: Arc<Mutex<IngressGuard>>,
}

impl Reader {
    fn close(&self, code: AcpErrorCode, why: &str) {
        self.shared.stats.closed_for_cause(code);
        warn!(peer = %self.name, code = %code, reason = why, "closing the connection");
        self.conn
            .close(VarInt::from_u32(code.code()), why.as_bytes());
    }

    fn verdict(&self, via: Via, frame: &Frame, zero_rtt: bool, now_ms: u64) -> Verdict {
        let header = frame.header();
        let arrival = Arrival {
            via,
            header,
            timestamp_ms: frame.timestamp_ms(),
            wire_bytes: frame.encoded_len() as u64,
            zero_rtt,
            agent_owned: self.shared.ownership.may_send_as(&self.name, header.agent),
        };
        match self.guard.lock() {
            Ok(mut guard) => guard.check(arrival, now_ms),
            Err(_) => Verdict::Close(AcpErrorCode::InternalError, "ingress state poisoned"),
        }
    }

    fn dropped(&self, why: DropReason, via: Via, frame: &Frame) {
        self.shared.stats.dropped(why, via);
        debug!(peer = %self.name, via = via.name(), seq = frame.header().seq, reason = ?why, "dropped a frame");
    }
}

async fn accept_lanes(reader: Reader) {
    let claimed = Arc::new(Mutex::new([false; 4]));
    while let Ok(recv) = reader.conn.accept_uni().await {
        tokio::spawn(read_lane(reader.clone(), recv, claimed.clone()));
    }
}

fn claim(claimed: &Mutex<[bool; 4]>, lane: Lane) -> bool {
    claimed
        .lock()
        .map(|mut c| !std::mem::replace(&mut c[lane.index()], true))
        .unwrap_or(false)
}

/// Reads one lane: frames, ingress checks on each message's first frame, reassembly,
/// and hand-off to the owner (waiting when the event queue is full, which holds back
/// this lane only, through QUIC flow control).
async fn read_lane(reader: Reader, mut recv: quinn::RecvStream, claimed: Arc<Mutex<[bool; 4]>>) {
    let config = &reader.shared.config;
    let zero_rtt = recv.is_0rtt();
    let mut decoder = FrameDecoder::new(config.max_frame_payload);
    let mut reassembler = Reassembler::new(config.max_message_bytes);
    let mut buf = BytesMut::new();
    let mut lane: Option<Lane> = None;
    // True while skipping the remaining fragments of a dropped message.
    let mut skipping = false;
    loop {
        let chunk = match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) | Err(_) => return,
        };
        buf.extend_from_slice(&chunk);
        let now_ms = reader.shared.clock.now_unix_ms();
        let mut messages = Vec::new();
        let (mut frames, mut bytes) = (0u64, 0u64);
        loop {
            let frame = match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return reader.close(e.code(), &e.to_string()),
            };
            let this = Lane::for_header(frame.header());
            match lane {
                None if !claim(&claimed, this) => {
                    return reader
                        .close(AcpErrorCode::ProtocolViolation, "two streams for one lane")
                }
                None => lane = Some(this),
                Some(l) if l != this => {
                    return reader.close(AcpErrorCode::ProtocolViolation, "frame on the wrong lane")
                }
                Some(_) => {}
            }
            let via = Via::Lane(this);
            frames += 1;
            bytes += frame.encoded_len() as u64;
            let more = frame.header().flags.contains(Flags::CONTINUATION);
            if skipping {
                skipping = more;
                continue;
            }
            if !reassembler.in_progress() {
                match reader.verdict(via, &frame, zero_rtt, now_ms) {
                    Verdict::Accept => {}
                    Verdict::Drop(why) => {
                        reader.dropped(why, via, &frame);
                        skipping = more;
                        continue;
                    }
                    Verdict::Close(code, why) => return reader.close(code, why),
                }
            }
            match reassembler.push(frame) {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => {}
                Err(e) => return reader.close(e.code(), &e.to_string()),
            }
        }
        if let Some(lane) = lane {
            reader.shared.stats.received(Via::Lane(lane), frames, bytes);
            if !messages.is_empty() {
                let event = TransportEvent::Received {
                    peer: reader.name.clone(),
                    via: Via::Lane(lane),
                    messages,
                };
                if reader.shared.events.send(event).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads datagrams: one timestamped frame each. When the owner's queue is full a
/// datagram is shed, never waited for: datagrams are the unreliable carrier.
async fn read_datagrams(reader: Reader) {
    let max = reader.shared.config.max_frame_payload;
    while let Ok(datagram) = reader.conn.read_datagram().await {
        let len = datagram.len() as u64;
        let frame = match Frame::decode_datagram(datagram, max) {
            Ok(frame) => frame,
            Err(e) => return reader.close(e.code(), &e.to_string()),
        };
        reader.shared.stats.received(Via::Datagram, 1, len);
        let now_ms = reader.shared.clock.now_unix_ms();
        match reader.verdict(Via::Datagram, &frame, false, now_ms) {
            Verdict::Accept => {}
            Verdict::Drop(why) => {
                reader.dropped(why, Via::Datagram, &frame);
                continue;
            }
            Verdict::Close(code, why) => return reader.close(code, why),
        }
        let event = TransportEvent::Received {
            peer: reader.name.clone(),
            via: Via::Datagram,
            messages: vec![Message::from(frame)],
        };
        match reader.shared.events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                reader.shared.stats.dropped(DropReason::Shed, Via::Datagram);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}
