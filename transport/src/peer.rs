//! One peer connection: its lanes (a byte-bounded queue and a writer per lane, each
//! lane one long-lived, prioritized QUIC stream), its datagrams, and the readers that
//! check every incoming frame before handing it to the transport's owner.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{SendDatagramError, VarInt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::endpoint::{PeerName, Shared, TransportError, TransportEvent};
use crate::headroom::WindowGauge;
use crate::ingress::{Arrival, DropReason, IngressGuard, Verdict, Via};
use crate::lane_queue::{Closed, LaneQueue, Numbering, Outgoing};
use crate::stats::{TransportStats, TypeCounts};
use crate::wire::{
    AcpErrorCode, Flags, Frame, FrameDecoder, Lane, Message, MessageRef, Reassembler, HEADER_LEN,
    TIMESTAMP_LEN,
};

/// Lower lanes write in pieces of this size, checking for headroom before each.
const GATED_CHUNK_BYTES: usize = 16 * 1024;
/// Most chunks (each typically one packet's stream data) a lane reader takes at once.
const READ_CHUNKS: usize = 64;
/// The same for the bulk lane: few, so a busy bulk reader gives the thread back often
/// to the tasks that carry urgent frames.
const BULK_READ_CHUNKS: usize = 12;
/// Highest Stream Prio of the bulk lane, where oversized datagrams fall back to.
const BULK_PRIO_MAX: u8 = 63;

/// How messages reach a lane's stream.
enum LaneTx {
    /// Bulk and normal: a byte-bounded buffer of encoded frames, drained by a writer
    /// task that writes all of it at once and waits for congestion-window headroom;
    /// a sender that finds the lane idle writes its message itself.
    Queued(QueuedLane),
    /// Urgent and coordination: the sender writes to the stream itself, under a lock,
    /// which saves a task hop on the latency-critical lanes.
    Direct(Arc<tokio::sync::Mutex<DirectLane>>),
}

/// A lower lane: its queue, and its stream shared between the writer task and
/// senders that find the lane idle.
struct QueuedLane {
    lane: Lane,
    queue: Arc<LaneQueue>,
    stream: Arc<tokio::sync::Mutex<LaneStream>>,
    gauge: Arc<WindowGauge>,
    /// The writer task; it ends with the lane's finished stream when the lane is sealed.
    writer: Mutex<Option<tokio::task::JoinHandle<Option<quinn::SendStream>>>>,
}

/// A lower lane's stream, once its writer has opened it, and the buffer a sender that
/// writes to it itself encodes into.
#[derive(Default)]
struct LaneStream {
    stream: Option<quinn::SendStream>,
    buf: BytesMut,
}

impl QueuedLane {
    /// Writes `messages` straight to the stream if the lane is idle: its writer is not
    /// writing, nothing is queued, the window has room for the lower lanes, and the
    /// messages are small. This saves a task hop (the writer's) on a request or reply
    /// that finds the lane quiet; under load, the writer's batching goes on as before.
    /// Returns false, with nothing sent, if the lane was not idle.
    fn try_direct(&self, messages: &[impl Outgoing], stats: &TransportStats) -> bool {
        let Ok(mut guard) = self.stream.try_lock() else {
            return false;
        };
        let LaneStream { stream, buf } = &mut *guard;
        let Some(stream) = stream.as_mut() else {
            // Not opened yet: the writer opens it.
            return false;
        };
        let (limit, _) = self.gauge.lower_lane_limit(self.lane == Lane::Bulk);
        if self.gauge.in_flight_bytes() >= limit {
            return false;
        }
        let Some((frames, types)) = self.queue.encode_if_idle(messages, GATED_CHUNK_BYTES, buf)
        else {
            return false;
        };
        let bytes = buf.split().freeze();
        // The lock is held by no one who waits. What quinn does not take now goes to
        // the writer, ahead of anything queued since, and the writer deals with it.
        let taken = offer_once(stream, &bytes);
        self.queue.put_back(bytes.slice(taken..));
        // The frames count as sent here; their bytes as quinn takes them, these now,
        // the rest when the writer writes them.
        stats.sent(Via::Lane(self.lane), frames, taken as u64);
        stats.direct_send(self.lane);
        stats.sent_types(&types);
        true
    }
}

/// Offers `bytes` to quinn in one poll, never waiting, for a sender that writes to a
/// lane's stream itself: returns how many quinn took (none if its buffer is full or
/// the stream failed; the caller leaves the rest for a task that may wait).
fn offer_once(stream: &mut quinn::SendStream, bytes: &[u8]) -> usize {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(stream).poll_write(&mut cx, bytes) {
        std::task::Poll::Ready(Ok(n)) => n,
        _ => 0,
    }
}

/// A lane written by its senders directly.
struct DirectLane {
    lane: Lane,
    conn: quinn::Connection,
    handshake: watch::Receiver<bool>,
    stream: Option<quinn::SendStream>,
    numbering: Numbering,
    /// Encoded bytes not yet taken by quinn. A sender whose future is dropped mid-write
    /// leaves the rest here and the next sender writes it first, so frames are never cut.
    pending: Bytes,
    buf: BytesMut,
    urgent: Arc<UrgentActivity>,
    /// The connection is being retired: sends are refused.
    sealed: bool,
}

impl DirectLane {
    async fn send(
        &mut self,
        messages: &[impl Outgoing],
        max_frame_payload: usize,
        stats: &TransportStats,
    ) -> Result<(), ()> {
        if self.sealed {
            return Err(());
        }
        self.flush().await?;
        for message in messages {
            self.numbering
                .encode(message.parts(), max_frame_payload, &mut self.buf)
                .map_err(|_| ())?;
        }
        let (frames, types) = self.numbering.take_counts();
        self.pending = self.buf.split().freeze();
        let len = self.pending.len() as u64;
        self.flush().await?;
        stats.sent(Via::Lane(self.lane), frames, len);
        if self.lane == Lane::Urgent {
            self.urgent.bump();
        }
        stats.sent_types(&types);
        Ok(())
    }

    /// [`DirectLane::send`] without waiting, for a sender that may not await: if the
    /// stream is open and nothing of an earlier send is left, encodes `messages` and
    /// offers them to quinn once. Returns `None`, with nothing changed, if it could not
    /// start; `Some(true)` if quinn took everything, `Some(false)` if some bytes are
    /// left in `pending` for [`DirectLane::flush`] to write.
    fn send_now(
        &mut self,
        messages: &[impl Outgoing],
        max_frame_payload: usize,
        stats: &TransportStats,
    ) -> Option<bool> {
        if !self.pending.is_empty() {
            return None;
        }
        let stream = self.stream.as_mut()?;
        for message in messages {
            // `PeerHandle::try_send_ref` refuses unframeable messages before this.
            if let Err(e) = self
                .numbering
                .encode(message.parts(), max_frame_payload, &mut self.buf)
            {
                warn!(error = %e, "dropping an unframeable message");
            }
        }
        let (frames, types) = self.numbering.take_counts();
        let mut bytes = self.buf.split().freeze();
        let len = bytes.len() as u64;
        let taken = offer_once(stream, &bytes);
        bytes::Buf::advance(&mut bytes, taken);
        self.pending = bytes;
        stats.sent(Via::Lane(self.lane), frames, len);
        if self.lane == Lane::Urgent {
            self.urgent.bump();
        }
        stats.sent_types(&types);
        Some(self.pending.is_empty())
    }

    async fn flush(&mut self) -> Result<(), ()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.open().await?;
        let Some(stream) = self.stream.as_mut() else {
            return Err(());
        };
        while !self.pending.is_empty() {
            let n = stream.write(&self.pending).await.map_err(|_| ())?;
            bytes::Buf::advance(&mut self.pending, n);
        }
        Ok(())
    }

    /// Opens the lane's stream on first use.
    async fn open(&mut self) -> Result<(), ()> {
        if self.stream.is_none() {
            // State-changing frames travel on these lanes: never in 0-RTT data.
            self.handshake
                .wait_for(|done| *done)
                .await
                .map_err(|_| ())?;
            self.stream = Some(open_lane(&self.conn, self.lane).await.ok_or(())?);
        }
        Ok(())
    }

    /// For a connection being retired: writes what an earlier sender left, refuses
    /// later sends, and finishes the stream, opened now if the lane was never used so
    /// that the peer sees every lane end. Returns the finished stream, whose
    /// acknowledgement the caller waits for.
    async fn seal(&mut self) -> Option<quinn::SendStream> {
        if self.sealed {
            return None;
        }
        self.sealed = true;
        self.flush().await.ok()?;
        self.open().await.ok()?;
        let mut stream = self.stream.take()?;
        stream.finish().ok()?;
        Some(stream)
    }
}

/// When urgent frames last moved on one connection (sent or received), so the lower
/// lanes' tasks can tell that urgent frames are about and step aside for them.
struct UrgentActivity {
    epoch: tokio::time::Instant,
    /// Microseconds after `epoch` of the last urgent send or arrival.
    last_us: AtomicU64,
}

impl Default for UrgentActivity {
    fn default() -> Self {
        UrgentActivity {
            epoch: tokio::time::Instant::now(),
            last_us: AtomicU64::new(0),
        }
    }
}

/// How long after an urgent frame moved the lower lanes keep stepping aside: longer
/// than an urgent round trip under load on loopback, so a request and its answer are
/// both covered.
const URGENT_RECENT: Duration = Duration::from_millis(5);

impl UrgentActivity {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn bump(&self) {
        // +1 so that activity at the epoch itself is told apart from none.
        self.last_us.store(self.now_us() + 1, Ordering::Relaxed);
    }

    /// True if urgent frames moved within [`URGENT_RECENT`].
    fn recent(&self) -> bool {
        let last = self.last_us.load(Ordering::Relaxed);
        last != 0 && self.now_us() < last + URGENT_RECENT.as_micros() as u64
    }
}

/// The state of one connection to a peer.
pub(crate) struct PeerConn {
    pub(crate) name: PeerName,
    pub(crate) conn: quinn::Connection,
    pub(crate) dialled_by_us: bool,
    lanes: [LaneTx; 4],
    /// How many of the peer's lane streams have been read to their end.
    ended: watch::Receiver<usize>,
    /// Set when the connection starts being retired: its senders move to its successor.
    retired: AtomicBool,
    datagram_seq: AtomicU32,
    gauge: Arc<WindowGauge>,
    /// The runtime the connection's tasks run on, for work started off it (a send from
    /// a waker, say).
    runtime: tokio::runtime::Handle,
    /// When it was set up.
    pub(crate) started: tokio::time::Instant,
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
        let urgent = Arc::new(UrgentActivity::default());
        let lanes = Lane::ALL.map(|lane| {
            if matches!(lane, Lane::Urgent | Lane::Coordination) {
                return LaneTx::Direct(Arc::new(tokio::sync::Mutex::new(DirectLane {
                    lane,
                    conn: conn.clone(),
                    handshake: handshake.clone(),
                    stream: None,
                    numbering: Numbering::default(),
                    pending: Bytes::new(),
                    buf: BytesMut::new(),
                    urgent: urgent.clone(),
                    sealed: false,
                })));
            }
            let queue = Arc::new(LaneQueue::new(
                config.lane_queue_bytes,
                config.max_frame_payload,
            ));
            let stream = Arc::new(tokio::sync::Mutex::new(LaneStream::default()));
            let writer = tokio::spawn(write_lane(
                LaneWriter {
                    conn: conn.clone(),
                    lane,
                    gauge: gauge.clone(),
                    stats: shared.stats.clone(),
                    urgent: urgent.clone(),
                },
                queue.clone(),
                stream.clone(),
            ));
            LaneTx::Queued(QueuedLane {
                lane,
                queue,
                stream,
                gauge: gauge.clone(),
                writer: Mutex::new(Some(writer)),
            })
        });
        let (ended_tx, ended) = watch::channel(0);
        let reader = Reader {
            guard: Arc::new(Mutex::new(IngressGuard::new(
                config.ingress,
                config.timestamps,
            ))),
            shared: shared.clone(),
            name: name.clone(),
            conn: conn.clone(),
            urgent,
            ended: Arc::new(ended_tx),
        };
        tokio::spawn(accept_lanes(reader.clone()));
        tokio::spawn(read_datagrams(reader));
        Arc::new(PeerConn {
            name,
            conn,
            dialled_by_us,
            lanes,
            ended,
            retired: AtomicBool::new(false),
            datagram_seq: AtomicU32::new(0),
            gauge,
            runtime: tokio::runtime::Handle::current(),
            started: tokio::time::Instant::now(),
        })
    }

    /// Retires a connection that lost to a duplicate (see `endpoint::register`)
    /// without losing what is on it. Sends on it go to its successor from now on (a
    /// sender holding its handle finds the lane sealed and moves on); what its
    /// lanes hold is written and every lane finished (one never used is opened to be
    /// finished, so the peer sees all four end). Once the peer has acknowledged all of
    /// it, and all four of the peer's lanes have been read to their end here, the
    /// connection is closed. Both nodes retire the same connection, so when either
    /// closes it, each has everything the other sent on it (quinn lets what has arrived
    /// be read from a closed connection). A peer that has not ended its lanes within
    /// `within` is closed on anyway: returns false in that case, true if the
    /// connection drained or the peer closed it first.
    pub(crate) async fn retire(&self, within: Duration) -> bool {
        self.retired.store(true, Ordering::Release);
        let drained = async {
            let mut finished = Vec::with_capacity(self.lanes.len());
            for lane in &self.lanes {
                if let LaneTx::Queued(q) = lane {
                    q.queue.seal();
                }
            }
            for lane in &self.lanes {
                match lane {
                    LaneTx::Direct(direct) => finished.extend(direct.lock().await.seal().await),
                    LaneTx::Queued(q) => {
                        let writer = q.writer.lock().ok().and_then(|mut w| w.take());
                        if let Some(writer) = writer {
                            finished.extend(writer.await.ok().flatten());
                        }
                    }
                }
            }
            for stream in &finished {
                let _ = stream.stopped().await;
            }
            let mut ended = self.ended.clone();
            let _ = ended.wait_for(|n| *n >= Lane::ALL.len()).await;
        };
        // The peer closing first is the normal end for one of the two nodes; what it
        // sent is read on by the lane readers, which end at its FIN or the close.
        let in_time = tokio::select! {
            _ = drained => true,
            _ = self.conn.closed() => true,
            _ = tokio::time::sleep(within) => false,
        };
        self.conn.close(
            VarInt::from_u32(AcpErrorCode::NoError.code()),
            b"duplicate connection",
        );
        self.shut();
        in_time
    }

    /// Wakes senders waiting for queue space: the connection is gone.
    pub(crate) fn shut(&self) {
        for lane in &self.lanes {
            if let LaneTx::Queued(q) = lane {
                q.queue.close();
            }
        }
    }
}

/// What became of a connection, as [`PeerHandle::link`] sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// It is open: what was sent on it is delivered or on its way.
    Open,
    /// It closed with everything sent on it delivered: retired as a duplicate, or
    /// closed by the peer with no error.
    Delivered,
    /// It was lost (timed out, reset, closed for an error): what was in flight on it
    /// may never have arrived.
    Lost,
}

/// A handle on one peer connection, for sending and inspecting it.
#[derive(Clone)]
pub struct PeerHandle {
    shared: Arc<Shared>,
    conn: Arc<PeerConn>,
}

/// Two handles are equal when they are on the same connection.
impl PartialEq for PeerHandle {
    fn eq(&self, other: &PeerHandle) -> bool {
        Arc::ptr_eq(&self.conn, &other.conn)
    }
}

impl Eq for PeerHandle {}

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

    /// Resolves when the connection closes: with why, if it was lost (it timed out,
    /// was reset, the peer closed it for an error, or this node closed it for any
    /// reason but retiring it), so that what was in flight on it may never arrive and
    /// no answer to it may come; with `None` if it was retired as a duplicate (its
    /// frames are delivered first and its senders move to the connection kept) or the
    /// peer closed it with no error (retiring it, or leaving).
    pub async fn lost(&self) -> Option<String> {
        let closed = self.conn.conn.closed().await;
        self.lost_by(closed)
    }

    /// [`PeerHandle::lost`] as of now, without waiting: whether the connection is
    /// open, closed with what was sent on it delivered, or lost.
    pub fn link(&self) -> Link {
        match self.conn.conn.close_reason() {
            None => Link::Open,
            Some(closed) => match self.lost_by(closed) {
                None => Link::Delivered,
                Some(_) => Link::Lost,
            },
        }
    }

    fn lost_by(&self, closed: quinn::ConnectionError) -> Option<String> {
        let no_error = VarInt::from_u32(AcpErrorCode::NoError.code());
        match closed {
            quinn::ConnectionError::LocallyClosed if self.conn.retired.load(Ordering::Acquire) => {
                None
            }
            quinn::ConnectionError::ApplicationClosed(close) if close.error_code == no_error => {
                None
            }
            error => Some(error.to_string()),
        }
    }

    /// Queues `message` on the lane its header picks (its sequence number is set by the
    /// lane), waiting while that lane's queue is full. Other lanes are unaffected.
    pub async fn send(&self, message: Message) -> Result<(), TransportError> {
        self.send_ref(message.parts()).await
    }

    /// [`PeerHandle::send`] for a message whose body the caller keeps: the lane copies
    /// it, so a sender can encode into one buffer of its own and reuse it.
    pub async fn send_ref(&self, message: MessageRef<'_>) -> Result<(), TransportError> {
        self.check_frameable(message)?;
        let lane = Lane::for_header(&message.header);
        self.enqueue(lane, &[message]).await
    }

    /// [`PeerHandle::send_ref`] for a caller that may not wait (it runs inside a waker,
    /// say): sends `message` now if its lane can take it at once, and returns false,
    /// with nothing sent, if the caller must use [`PeerHandle::send_ref`] instead. A
    /// message sent here keeps the lane's order like any other.
    pub fn try_send_ref(&self, message: MessageRef<'_>) -> Result<bool, TransportError> {
        self.check_frameable(message)?;
        if !self.is_open() {
            return Err(TransportError::PeerClosed(self.conn.name.to_string()));
        }
        let lane = Lane::for_header(&message.header);
        let messages = [message];
        match &self.conn.lanes[lane.index()] {
            LaneTx::Queued(q) => Ok(q.try_direct(&messages, &self.shared.stats)),
            LaneTx::Direct(direct) => {
                let Ok(mut guard) = direct.try_lock() else {
                    return Ok(false);
                };
                let max = self.shared.config.max_frame_payload;
                match guard.send_now(&messages, max, &self.shared.stats) {
                    None => Ok(false),
                    Some(true) => Ok(true),
                    Some(false) => {
                        // quinn's buffer is full: a task writes the rest, as the next
                        // sender would, so the message is not left waiting for one.
                        drop(guard);
                        let direct = direct.clone();
                        self.conn.runtime.spawn(async move {
                            let _ = direct.lock().await.flush().await;
                        });
                        Ok(true)
                    }
                }
            }
        }
    }

    /// Queues several messages at once: in order within each lane, for one queue
    /// operation per lane rather than one per message.
    pub async fn send_batch(&self, messages: Vec<Message>) -> Result<(), TransportError> {
        for m in &messages {
            self.check_frameable(m.parts())?;
        }
        let first_lane = messages.first().map(|m| Lane::for_header(&m.header));
        if let Some(lane) =
            first_lane.filter(|l| messages.iter().all(|m| Lane::for_header(&m.header) == *l))
        {
            return self.enqueue(lane, &messages).await;
        }
        let mut by_lane: [Vec<Message>; 4] = Default::default();
        for m in messages {
            by_lane[Lane::for_header(&m.header).index()].push(m);
        }
        for lane in Lane::ALL.into_iter().rev() {
            let batch = &by_lane[lane.index()];
            if !batch.is_empty() {
                self.enqueue(lane, batch).await?;
            }
        }
        Ok(())
    }

    fn check_frameable(&self, message: MessageRef<'_>) -> Result<(), TransportError> {
        // A peer closes the connection for a longer one: everything else on it would
        // go down with it, and a sender that keeps its frames would send it again.
        let limit = self.shared.config.max_message_bytes;
        if message.body.len() > limit {
            return Err(TransportError::TooLarge {
                len: message.body.len(),
                limit,
            });
        }
        let max = self.shared.config.max_frame_payload;
        if message.timestamp_ms.is_some() && message.body.len() + TIMESTAMP_LEN > max {
            return Err(TransportError::Unframeable(crate::wire::FrameTooLarge {
                len: message.body.len() + TIMESTAMP_LEN,
            }));
        }
        Ok(())
    }

    /// Queues `messages` on `lane`. A handle taken just before its connection was
    /// retired (see [`PeerConn::retire`]) sends on the connection that replaced it.
    async fn enqueue(&self, lane: Lane, messages: &[impl Outgoing]) -> Result<(), TransportError> {
        match self.enqueue_on(&self.conn, lane, messages).await {
            Err(e) if self.conn.retired.load(Ordering::Acquire) => match self.successor() {
                Some(next) => self.enqueue_on(&next, lane, messages).await,
                None => Err(e),
            },
            sent => sent,
        }
    }

    /// The connection to the same peer that replaced this one in the peer table.
    fn successor(&self) -> Option<Arc<PeerConn>> {
        let peers = self.shared.peers.lock().ok()?;
        peers
            .get(&self.conn.name)
            .filter(|p| !Arc::ptr_eq(p, &self.conn))
            .cloned()
    }

    async fn enqueue_on(
        &self,
        conn: &PeerConn,
        lane: Lane,
        messages: &[impl Outgoing],
    ) -> Result<(), TransportError> {
        let max = self.shared.config.max_frame_payload;
        let closed = || TransportError::PeerClosed(conn.name.to_string());
        match &conn.lanes[lane.index()] {
            LaneTx::Direct(direct) => direct
                .lock()
                .await
                .send(messages, max, &self.shared.stats)
                .await
                .map_err(|()| closed()),
            LaneTx::Queued(q) => {
                if q.try_direct(messages, &self.shared.stats) {
                    return Ok(());
                }
                q.queue.push(messages).await.map_err(|Closed| closed())
            }
        }
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
                    let mut types = TypeCounts::default();
                    types.add(header.msg_type);
                    self.shared.stats.sent_types(&types);
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
    urgent: Arc<UrgentActivity>,
}

/// Drains one queued lane (bulk or normal) into its stream: it takes everything its
/// senders have encoded since the last write and writes it in pieces, each once the
/// window has headroom. It holds the stream while it takes and writes, so a sender
/// writing to an idle lane itself never cuts in. These lanes carry nothing
/// state-changing, so they may open in 0-RTT data.
async fn write_lane(
    w: LaneWriter,
    queue: Arc<LaneQueue>,
    stream: Arc<tokio::sync::Mutex<LaneStream>>,
) -> Option<quinn::SendStream> {
    let mut broken = false;
    while queue.filled().await {
        let mut guard = stream.lock().await;
        let Some(taken) = queue.take_now() else {
            continue;
        };
        let Some(s) = w.open(&mut guard.stream).await else {
            broken = true;
            break;
        };
        let len = taken.len() as u64;
        let bulk = w.lane == Lane::Bulk;
        if write_gated(s, &taken.blocks, &w.gauge, bulk, &w.urgent)
            .await
            .is_err()
        {
            broken = true;
            break;
        }
        queue.written(&taken);
        w.stats.sent(Via::Lane(w.lane), taken.frames, len);
        w.stats.sent_types(&taken.types);
    }
    // A sealed lane ends with everything written; the stream is opened if it never
    // was, so the peer sees the lane end.
    let sealed = !broken && queue.is_sealed();
    // Senders waiting for room learn that the lane is gone.
    queue.close();
    let mut guard = stream.lock().await;
    if sealed {
        w.open(&mut guard.stream).await;
    }
    let mut s = guard.stream.take()?;
    s.finish().ok()?;
    sealed.then_some(s)
}

impl LaneWriter {
    /// The lane's stream, opened on first use; `None` if the connection is gone.
    async fn open<'a>(
        &self,
        stream: &'a mut Option<quinn::SendStream>,
    ) -> Option<&'a mut quinn::SendStream> {
        if stream.is_none() {
            *stream = Some(open_lane(&self.conn, self.lane).await?);
        }
        stream.as_mut()
    }
}

/// Opens a stream for `lane`, at the lane's QUIC priority; `None` if the connection
/// is gone.
async fn open_lane(conn: &quinn::Connection, lane: Lane) -> Option<quinn::SendStream> {
    let stream = conn.open_uni().await.ok()?;
    let _ = stream.set_priority(lane.index() as i32);
    Some(stream)
}

/// Writes a lower lane's blocks in pieces, each only once the window has headroom.
async fn write_gated(
    stream: &mut quinn::SendStream,
    blocks: &[Bytes],
    gauge: &WindowGauge,
    bulk: bool,
    urgent: &UrgentActivity,
) -> Result<(), quinn::WriteError> {
    let mut left: usize = blocks.iter().map(Bytes::len).sum();
    for mut bytes in blocks.iter().cloned() {
        while !bytes.is_empty() {
            gauge.wait_for_room(bulk).await;
            let piece = bytes.split_to(bytes.len().min(GATED_CHUNK_BYTES));
            left -= piece.len();
            stream.write_chunk(piece).await?;
            if left > 0 && urgent.recent() {
                // quinn takes a piece without waiting while its buffer has room, so a
                // lower lane with megabytes queued would keep this thread from the tasks
                // that carry urgent frames until all of it is handed over. While urgent
                // frames are about, it lets them go first after every piece.
                tokio::task::yield_now().await;
            }
        }
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
    urgent: Arc<UrgentActivity>,
    /// Counts the peer's lane streams read to their end.
    ended: Arc<watch::Sender<usize>>,
}

impl Reader {
    fn close(&self, code: AcpErrorCode, why: &str) {
        self.shared.stats.closed_for_cause(code);
        warn!(peer = %self.name, code = %code, reason = why, "closing the connection");
        self.conn
            .close(VarInt::from_u32(code.code()), why.as_bytes());
    }

    fn verdict(
        &self,
        guard: &mut IngressGuard,
        via: Via,
        frame: &Frame,
        zero_rtt: bool,
        now_ms: u64,
    ) -> Verdict {
        let header = frame.header();
        let arrival = Arrival {
            via,
            header,
            timestamp_ms: frame.timestamp_ms(),
            wire_bytes: frame.encoded_len() as u64,
            zero_rtt,
            agent_owned: self.shared.ownership.may_send_as(&self.name, header.agent),
        };
        let verdict = guard.check(arrival, now_ms);
        if let Some(warning) = guard.take_clock_warning() {
            warn!(peer = %self.name, "{warning}");
        }
        verdict
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

/// The receiving state of one lane stream.
struct LaneReader {
    zero_rtt: bool,
    decoder: FrameDecoder,
    reassembler: Reassembler,
    buf: BytesMut,
    lane: Option<Lane>,
    /// True while skipping the remaining fragments of a dropped message.
    skipping: bool,
}

/// Why a lane reader closes the connection.
type Close = (AcpErrorCode, String);

impl LaneReader {
    /// Cuts every whole frame out of the buffer, checks each message's first frame,
    /// joins fragments; returns the whole messages and the frames and bytes read.
    fn take_messages(
        &mut self,
        reader: &Reader,
        claimed: &Mutex<[bool; 4]>,
        now_ms: u64,
    ) -> Result<(Vec<Message>, u64, u64), Close> {
        let mut guard = reader.guard.lock().map_err(|_| {
            (
                AcpErrorCode::InternalError,
                "ingress state poisoned".to_string(),
            )
        })?;
        let mut messages = Vec::new();
        let (mut frames, mut bytes) = (0u64, 0u64);
        let mut types = TypeCounts::default();
        while let Some(frame) = self
            .decoder
            .decode(&mut self.buf)
            .map_err(|e| (e.code(), e.to_string()))?
        {
            types.add(frame.header().msg_type);
            let h = frame.header();
            let _frame = tracing::trace_span!(
                "acp_frame",
                peer = %reader.name,
                msg_type = h.msg_type.name(),
                seq = h.seq,
                agent = h.agent,
                len = frame.body().len()
            )
            .entered();
            let this = Lane::for_header(frame.header());
            match self.lane {
                None if !claim(claimed, this) => {
                    return Err((
                        AcpErrorCode::ProtocolViolation,
                        "two streams for one lane".into(),
                    ))
                }
                None => self.lane = Some(this),
                Some(l) if l != this => {
                    return Err((
                        AcpErrorCode::ProtocolViolation,
                        "frame on the wrong lane".into(),
                    ))
                }
                Some(_) => {}
            }
            let via = Via::Lane(this);
            frames += 1;
            bytes += frame.encoded_len() as u64;
            let more = frame.header().flags.contains(Flags::CONTINUATION);
            if self.skipping {
                self.skipping = more;
                continue;
            }
            if !self.reassembler.in_progress() {
                match reader.verdict(&mut guard, via, &frame, self.zero_rtt, now_ms) {
                    Verdict::Accept => {}
                    Verdict::Drop(why) => {
                        reader.dropped(why, via, &frame);
                        self.skipping = more;
                        continue;
                    }
                    Verdict::Close(code, why) => return Err((code, why.to_string())),
                }
            }
            if let Some(message) = self
                .reassembler
                .push(frame)
                .map_err(|e| (e.code(), e.to_string()))?
            {
                messages.push(message);
            }
        }
        reader.shared.stats.received_types(&types);
        Ok((messages, frames, bytes))
    }
}

/// Reads one lane: frames, ingress checks on each message's first frame, reassembly,
/// and hand-off to the owner (waiting when the lane's event queue is full, which holds
/// back this lane only, through QUIC flow control).
async fn read_lane(reader: Reader, mut recv: quinn::RecvStream, claimed: Arc<Mutex<[bool; 4]>>) {
    let config = &reader.shared.config;
    let mut state = LaneReader {
        zero_rtt: recv.is_0rtt(),
        decoder: FrameDecoder::new(config.max_frame_payload),
        reassembler: Reassembler::new(config.max_message_bytes),
        buf: BytesMut::new(),
        lane: None,
        skipping: false,
    };
    let mut chunks: [Bytes; READ_CHUNKS] = std::array::from_fn(|_| Bytes::new());
    loop {
        // Take every chunk quinn holds (up to READ_CHUNKS, each about a packet's worth)
        // in one go, so per-read costs are paid per batch, not per packet. The bulk
        // lane takes fewer at a time to keep its task's turns short, so the tasks of
        // urgent frames wait less for a thread.
        let max = if state.lane == Some(Lane::Bulk) {
            BULK_READ_CHUNKS
        } else {
            READ_CHUNKS
        };
        let n = match recv.read_chunks(&mut chunks[..max]).await {
            Ok(Some(n)) => n,
            Ok(None) => {
                // The peer finished the lane: it is retiring the connection.
                reader.ended.send_modify(|n| *n += 1);
                return;
            }
            Err(_) => return,
        };
        for chunk in &mut chunks[..n] {
            state.buf.extend_from_slice(chunk);
            *chunk = Bytes::new();
        }
        let now_ms = reader.shared.clock.now_unix_ms();
        let (messages, frames, bytes) = match state.take_messages(&reader, &claimed, now_ms) {
            Ok(taken) => taken,
            Err((code, why)) => return reader.close(code, &why),
        };
        let Some(lane) = state.lane else { continue };
        reader.shared.stats.received(Via::Lane(lane), frames, bytes);
        match lane {
            Lane::Urgent if frames > 0 => reader.urgent.bump(),
            // As the bulk writer does: while urgent frames are about, the bulk
            // reader lets their tasks go first after each of its batches.
            Lane::Bulk if reader.urgent.recent() => tokio::task::yield_now().await,
            _ => {}
        }
        let messages = match reader.shared.inbox.get() {
            Some(inbox) if !messages.is_empty() => inbox.take(&reader.name, lane, messages).await,
            _ => messages,
        };
        if messages.is_empty() {
            continue;
        }
        let event = TransportEvent::Received {
            peer: reader.name.clone(),
            via: Via::Lane(lane),
            messages,
        };
        if reader.shared.events.lane(lane).send(event).await.is_err() {
            return;
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
        let mut types = TypeCounts::default();
        types.add(frame.header().msg_type);
        reader.shared.stats.received_types(&types);
        let now_ms = reader.shared.clock.now_unix_ms();
        let verdict = match reader.guard.lock() {
            Ok(mut guard) => reader.verdict(&mut guard, Via::Datagram, &frame, false, now_ms),
            Err(_) => Verdict::Close(AcpErrorCode::InternalError, "ingress state poisoned"),
        };
        match verdict {
            Verdict::Accept => {}
            Verdict::Drop(why) => {
                reader.dropped(why, Via::Datagram, &frame);
                continue;
            }
            Verdict::Close(code, why) => return reader.close(code, why),
        }
        let queue = reader.shared.events.datagram(frame.header().msg_type);
        let event = TransportEvent::Received {
            peer: reader.name.clone(),
            via: Via::Datagram,
            messages: vec![Message::from(frame)],
        };
        match queue.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                reader.shared.stats.dropped(DropReason::Shed, Via::Datagram);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}
