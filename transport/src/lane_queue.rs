//! The send queue of a lower lane (normal, bulk): senders encode their frames into one
//! shared, byte-bounded buffer and the lane's writer takes all of it at once, so a
//! message costs a short lock and a copy, not a channel node, a semaphore permit of
//! its own and a later re-encoding by the writer.
//!
//! Bound: senders take byte permits from a semaphore (FIFO, so a large message is not
//! starved by small ones) before they encode; the writer gives them back once quinn has
//! taken the bytes. A message larger than the whole budget waits for the queue to empty
//! and then goes in alone, as it did with per-message permits.
//!
//! Senders encode into blocks of at most 64 KiB ([`BLOCK_BYTES`]; a larger message gets
//! a block of its own), not into one buffer that grows to the whole budget: quinn holds
//! what the writer hands it until the peer acknowledges it, so no buffer can be reused,
//! and one of megabytes came fresh from the OS each time, a page fault per 4 KiB.
//!
//! A sender that finds the queue empty while it holds the lane's stream (so the writer
//! is not writing) may instead encode its message itself, numbered in lane order, and
//! write it straight to the stream ([`LaneQueue::encode_if_idle`]); what quinn does not
//! take goes back to the head of the queue ([`LaneQueue::put_back`]).

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, Semaphore};
use tracing::warn;

use crate::stats::TypeCounts;
use crate::wire::{FrameTooLarge, Message, MessageRef, HEADER_LEN, TIMESTAMP_LEN};

/// What a lane takes from senders: whole messages, or messages with borrowed bodies.
pub(crate) trait Outgoing: Sync {
    fn parts(&self) -> MessageRef<'_>;
}

impl Outgoing for Message {
    fn parts(&self) -> MessageRef<'_> {
        Message::parts(self)
    }
}

impl Outgoing for MessageRef<'_> {
    fn parts(&self) -> MessageRef<'_> {
        *self
    }
}

/// The most a block of encoded frames holds, unless one message needs more: below
/// glibc's mmap threshold (128 KiB), so blocks are recycled by the allocator's heap.
/// With one buffer grown to megabytes, `bench transport --messages 2000000` took
/// 35,000-61,000 page faults a run; with these blocks, 12,000-28,000.
pub(crate) const BLOCK_BYTES: usize = 64 * 1024;

/// The lane is gone (its connection closed or its writer stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// One lower lane's queue.
pub(crate) struct LaneQueue {
    state: Mutex<State>,
    /// Byte permits: what may be queued or in the writer's hands.
    budget: Semaphore,
    budget_bytes: usize,
    max_frame_payload: usize,
    /// The writer waits here for bytes.
    filled: Notify,
}

/// A lane's sequence numbers, and the frames encoded since the statistics last took
/// their counts: what every lane's sender side keeps, queued or direct.
#[derive(Default)]
pub(crate) struct Numbering {
    seq: u16,
    frames: u64,
    types: TypeCounts,
}

impl Numbering {
    /// Appends `message`'s frames to `out`, numbered on from the lane's last frame.
    pub(crate) fn encode(
        &mut self,
        message: MessageRef<'_>,
        max_frame_payload: usize,
        out: &mut BytesMut,
    ) -> Result<(), FrameTooLarge> {
        let n = message.encode_frames(self.seq, max_frame_payload, out)?;
        self.seq = self.seq.wrapping_add(n);
        self.frames += u64::from(n);
        self.types.add_frames(message.header.msg_type, n);
        Ok(())
    }

    /// Frames, and frames by type, encoded since the last call.
    pub(crate) fn take_counts(&mut self) -> (u64, TypeCounts) {
        (
            std::mem::take(&mut self.frames),
            std::mem::take(&mut self.types),
        )
    }
}

#[derive(Default)]
struct State {
    /// Encoded frames, in lane order, sequence numbers assigned: full blocks, then
    /// `buf`, the block being filled.
    blocks: VecDeque<Bytes>,
    buf: BytesMut,
    numbering: Numbering,
    /// Permits held by what is in `buf`.
    permits: usize,
    closed: bool,
    /// No more senders: the writer writes what is queued, then stops.
    sealed: bool,
}

impl State {
    fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.buf.is_empty()
    }

    /// Makes room in `buf` for `bytes` more: a new block once the current one is full.
    fn room_for(&mut self, bytes: usize) {
        if self.buf.capacity() - self.buf.len() < bytes {
            let fresh = BytesMut::with_capacity(bytes.max(BLOCK_BYTES));
            let full = std::mem::replace(&mut self.buf, fresh);
            if !full.is_empty() {
                self.blocks.push_back(full.freeze());
            }
        }
    }
}

/// What the writer takes off the queue at once.
pub(crate) struct Taken {
    /// The encoded frames, in order.
    pub(crate) blocks: Vec<Bytes>,
    /// How many frames, for the statistics.
    pub(crate) frames: u64,
    /// Frames by message type, for the statistics.
    pub(crate) types: TypeCounts,
    permits: usize,
}

impl Taken {
    /// Bytes taken.
    pub(crate) fn len(&self) -> usize {
        self.blocks.iter().map(Bytes::len).sum()
    }

    /// The blocks as one buffer.
    #[cfg(test)]
    fn joined(&self) -> Bytes {
        self.blocks.concat().into()
    }
}

impl LaneQueue {
    /// A queue holding at most `budget_bytes` of encoded frames (at least 1).
    pub(crate) fn new(budget_bytes: usize, max_frame_payload: usize) -> LaneQueue {
        let budget_bytes = budget_bytes.clamp(1, Semaphore::MAX_PERMITS);
        LaneQueue {
            state: Mutex::new(State::default()),
            budget: Semaphore::new(budget_bytes),
            budget_bytes,
            max_frame_payload,
            filled: Notify::new(),
        }
    }

    /// Bytes `messages` take on the wire.
    fn wire_bytes(&self, messages: &[impl Outgoing]) -> usize {
        messages.iter().map(|m| self.wire_len(m.parts())).sum()
    }

    /// Bytes one message takes on the wire.
    fn wire_len(&self, m: MessageRef<'_>) -> usize {
        let ts = m.timestamp_ms.map_or(0, |_| TIMESTAMP_LEN);
        m.body.len() + ts + HEADER_LEN * m.frame_count(self.max_frame_payload)
    }

    /// Encodes `messages` at the end of the queue, in order and with consecutive
    /// sequence numbers, waiting while the queue is full. Cancel-safe: a sender dropped
    /// while it waits has queued nothing.
    pub(crate) async fn push(&self, messages: &[impl Outgoing]) -> Result<(), Closed> {
        let wanted = self.wire_bytes(messages).min(self.budget_bytes);
        // `wanted` <= budget_bytes <= Semaphore::MAX_PERMITS < u32::MAX.
        let permits = wanted as u32;
        // The acquire also counts against tokio's cooperative budget, so a sender that
        // always finds room still gives its thread up now and then, to the tasks that
        // carry urgent frames among others.
        self.budget
            .acquire_many(permits)
            .await
            .map_err(|_| Closed)?
            .forget();
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.closed || s.sealed {
                return Err(Closed);
            }
            for message in messages {
                let message = message.parts();
                s.room_for(self.wire_len(message));
                let State { buf, numbering, .. } = &mut *s;
                // `PeerHandle::send` refuses unframeable messages before this.
                if let Err(e) = numbering.encode(message, self.max_frame_payload, buf) {
                    warn!(error = %e, "dropping an unframeable message");
                }
            }
            s.permits += wanted;
        }
        self.filled.notify_one();
        Ok(())
    }

    /// Takes everything queued, waiting while nothing is; `None` once the queue is
    /// closed.
    #[cfg(test)]
    pub(crate) async fn take(&self) -> Option<Taken> {
        loop {
            if !self.filled().await {
                return None;
            }
            if let Some(taken) = self.take_now() {
                return Some(taken);
            }
        }
    }

    /// Waits until something is queued (true) or the queue is closed, or sealed with
    /// nothing left (false). Only the lane's writer calls it.
    pub(crate) async fn filled(&self) -> bool {
        loop {
            {
                let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if s.closed {
                    return false;
                }
                if !s.is_empty() {
                    return true;
                }
                if s.sealed {
                    return false;
                }
            }
            // A `notify_one` with no writer waiting is kept for the next wait, so a
            // push between the check above and this wait is not missed.
            self.filled.notified().await;
        }
    }

    /// Takes everything queued, if anything is. Only the lane's writer calls it.
    pub(crate) fn take_now(&self) -> Option<Taken> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.closed || s.is_empty() {
            return None;
        }
        let (frames, types) = s.numbering.take_counts();
        let mut blocks: Vec<Bytes> = s.blocks.drain(..).collect();
        if !s.buf.is_empty() {
            // The rest of this block's room stays with `buf` for the next senders.
            blocks.push(s.buf.split().freeze());
        }
        Some(Taken {
            blocks,
            frames,
            types,
            permits: std::mem::take(&mut s.permits),
        })
    }

    /// For a sender that holds the lane's stream, so that the writer is not writing:
    /// if nothing is queued, encodes `messages` into `out`, numbered on in the lane's
    /// order, and returns their frame counts, for the sender to write them itself.
    /// Returns `None`, with nothing changed, if something is queued (it must go
    /// first) or the messages are larger than `max_bytes`.
    pub(crate) fn encode_if_idle(
        &self,
        messages: &[impl Outgoing],
        max_bytes: usize,
        out: &mut BytesMut,
    ) -> Option<(u64, TypeCounts)> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Under load something is queued: that answer comes before any sizing.
        if s.closed || s.sealed || !s.is_empty() || self.wire_bytes(messages) > max_bytes {
            return None;
        }
        for message in messages {
            // `PeerHandle::send` refuses unframeable messages before this.
            if let Err(e) = s
                .numbering
                .encode(message.parts(), self.max_frame_payload, out)
            {
                warn!(error = %e, "dropping an unframeable message");
            }
        }
        // Nothing was queued, so these are the counts of `messages` alone.
        Some(s.numbering.take_counts())
    }

    /// Puts back what a sender encoded with [`LaneQueue::encode_if_idle`] but quinn did
    /// not take at once, ahead of anything queued since, for the writer. It holds no
    /// permits: what a lane holds is its budget plus at most one such message.
    pub(crate) fn put_back(&self, rest: Bytes) {
        if rest.is_empty() {
            return;
        }
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.blocks.push_front(rest);
        }
        self.filled.notify_one();
    }

    /// quinn has taken what `take` gave: its room is free for senders again.
    pub(crate) fn written(&self, taken: &Taken) {
        self.budget.add_permits(taken.permits);
    }

    /// Seals the queue, for a connection being retired: waiting and later senders get
    /// [`Closed`], and the writer writes what is queued and then stops.
    pub(crate) fn seal(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).sealed = true;
        self.budget.close();
        self.filled.notify_one();
    }

    /// True once [`LaneQueue::seal`] was called.
    pub(crate) fn is_sealed(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).sealed
    }

    /// Closes the queue: waiting and later senders get [`Closed`], the writer stops,
    /// what is queued is dropped with the connection.
    pub(crate) fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.budget.close();
        self.filled.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Header, MessageType};

    fn message(len: usize, fill: u8) -> Message {
        Message::new(
            Header::new(MessageType::Envelope),
            Bytes::from(vec![fill; len]),
        )
    }

    /// A sender pushing `message` in its own task, so a test can see it wait.
    fn spawn_push(
        q: &std::sync::Arc<LaneQueue>,
        message: Message,
    ) -> tokio::task::JoinHandle<Result<(), Closed>> {
        let q = q.clone();
        tokio::spawn(async move { q.push(&[message]).await })
    }

    fn decode_all(bytes: &Bytes) -> Vec<(u16, usize, u8)> {
        crate::wire::decode_all(bytes, 65_535)
            .unwrap()
            .iter()
            .map(|f| {
                let first = f.body().first().copied().unwrap_or(0);
                (f.header().seq, f.body().len(), first)
            })
            .collect()
    }

    #[tokio::test]
    async fn frames_come_out_in_order_with_consecutive_sequence_numbers() {
        let q = LaneQueue::new(1 << 20, 10);
        q.push(&[message(3, 1)]).await.unwrap();
        q.push(&[message(25, 2), message(0, 3)]).await.unwrap();
        let taken = q.take().await.unwrap();
        assert_eq!(taken.frames, 5);
        assert_eq!(
            decode_all(&taken.joined()),
            [(0, 3, 1), (1, 10, 2), (2, 10, 2), (3, 5, 2), (4, 0, 0)]
        );
        q.written(&taken);
        q.push(&[message(1, 4)]).await.unwrap();
        assert_eq!(decode_all(&q.take().await.unwrap().joined()), [(5, 1, 4)]);
    }

    #[tokio::test]
    async fn senders_fill_blocks_of_bounded_size_and_a_larger_message_gets_its_own() {
        let q = LaneQueue::new(1 << 20, 65_535);
        let frame = HEADER_LEN + 30_000;
        q.push(&[message(30_000, 1), message(30_000, 2)])
            .await
            .unwrap();
        q.push(&[message(30_000, 3)]).await.unwrap();
        q.push(&[message(100_000, 4), message(10, 5)])
            .await
            .unwrap();
        let taken = q.take().await.unwrap();
        let sizes: Vec<usize> = taken.blocks.iter().map(Bytes::len).collect();
        let big = 2 * HEADER_LEN + 100_000;
        assert_eq!(
            sizes,
            [2 * frame, frame, big, HEADER_LEN + 10],
            "two frames fit a block of {BLOCK_BYTES}, a third does not"
        );
        assert_eq!(taken.len(), sizes.iter().sum::<usize>());
        let seqs: Vec<(u16, u8)> = decode_all(&taken.joined())
            .iter()
            .map(|&(seq, _, first)| (seq, first))
            .collect();
        assert_eq!(seqs, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 4), (5, 5)]);
        q.written(&taken);
        // The last block's room is used by the next senders; what a direct send puts
        // back still goes ahead of it.
        q.push(&[message(10, 6)]).await.unwrap();
        q.put_back(Bytes::from_static(b"first"));
        let taken = q.take().await.unwrap();
        assert_eq!(taken.blocks.len(), 2);
        assert_eq!(&taken.blocks[0][..], b"first");
    }

    #[tokio::test]
    async fn a_direct_send_is_numbered_in_lane_order_and_what_it_puts_back_goes_first() {
        let q = LaneQueue::new(1 << 20, 1000);
        let mut out = BytesMut::new();
        let (frames, _) = q.encode_if_idle(&[message(3, 1)], 1000, &mut out).unwrap();
        assert_eq!(frames, 1);
        q.push(&[message(2, 2)]).await.unwrap();
        assert!(
            q.encode_if_idle(&[message(1, 3)], 1000, &mut BytesMut::new())
                .is_none(),
            "a queued message goes first"
        );
        // quinn took none of the direct send: it goes ahead of the queued one.
        q.put_back(out.split().freeze());
        let taken = q.take().await.unwrap();
        assert_eq!(decode_all(&taken.joined()), [(0, 3, 1), (1, 2, 2)]);
        assert_eq!(
            taken.frames, 1,
            "the direct send's frame was counted by its sender"
        );
        q.written(&taken);
        assert!(
            q.encode_if_idle(&[message(100, 4)], 50, &mut BytesMut::new())
                .is_none(),
            "too large to skip the writer"
        );
        let mut out = BytesMut::new();
        q.encode_if_idle(&[message(1, 5)], 1000, &mut out).unwrap();
        assert_eq!(decode_all(&out.freeze()), [(2, 1, 5)]);
    }

    #[tokio::test]
    async fn a_full_queue_makes_senders_wait_until_the_writer_has_written() {
        let q = std::sync::Arc::new(LaneQueue::new(100, 1000));
        q.push(&[message(80, 1)]).await.unwrap();
        let blocked = spawn_push(&q, message(20, 2));
        tokio::task::yield_now().await;
        assert!(
            !blocked.is_finished(),
            "93 + 33 bytes exceed the budget of 100"
        );
        let taken = q.take().await.unwrap();
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished(), "taken is not yet written");
        q.written(&taken);
        blocked.await.unwrap().unwrap();
        assert_eq!(decode_all(&q.take().await.unwrap().joined()), [(1, 20, 2)]);
    }

    #[tokio::test]
    async fn a_message_larger_than_the_budget_goes_alone_once_the_queue_is_empty() {
        let q = std::sync::Arc::new(LaneQueue::new(100, 1000));
        q.push(&[message(10, 1)]).await.unwrap();
        let big = spawn_push(&q, message(500, 2));
        tokio::task::yield_now().await;
        assert!(!big.is_finished());
        let taken = q.take().await.unwrap();
        q.written(&taken);
        big.await.unwrap().unwrap();
        assert_eq!(decode_all(&q.take().await.unwrap().joined()), [(1, 500, 2)]);
    }

    #[tokio::test]
    async fn closing_wakes_waiting_senders_and_the_writer() {
        let q = std::sync::Arc::new(LaneQueue::new(10, 1000));
        q.push(&[message(5, 1)]).await.unwrap();
        let waiting = spawn_push(&q, message(5, 2));
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(waiting.await.unwrap(), Err(Closed));
        assert!(q.take().await.is_none());
        assert_eq!(q.push(&[message(1, 3)]).await, Err(Closed));
    }

    #[tokio::test]
    async fn a_sealed_queue_refuses_senders_but_gives_the_writer_what_it_holds() {
        let q = std::sync::Arc::new(LaneQueue::new(10, 1000));
        q.push(&[message(5, 1)]).await.unwrap();
        let waiting = spawn_push(&q, message(5, 2));
        tokio::task::yield_now().await;
        q.seal();
        assert!(q.is_sealed());
        assert_eq!(waiting.await.unwrap(), Err(Closed));
        assert_eq!(q.push(&[message(1, 3)]).await, Err(Closed));
        assert!(q
            .encode_if_idle(&[message(1, 4)], 1000, &mut BytesMut::new())
            .is_none());
        let taken = q.take().await.unwrap();
        assert_eq!(decode_all(&taken.joined()), [(0, 5, 1)]);
        q.written(&taken);
        assert!(
            q.take().await.is_none(),
            "sealed and drained: the writer stops"
        );
    }
}
