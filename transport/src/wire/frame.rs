//! Frames (one header plus at most 65,535 payload bytes) and messages (what a
//! sender meant to send, which may span several frames).

use bytes::{BufMut, Bytes, BytesMut};

use super::decoder::DecodeError;
use super::header::{Flags, Header, HEADER_LEN, MAX_PAYLOAD_LEN, TIMESTAMP_LEN};

/// A payload that does not fit in one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("payload of {len} bytes does not fit in one frame (at most {MAX_PAYLOAD_LEN})")]
pub struct FrameTooLarge {
    /// The payload length that was asked for, timestamp included.
    pub len: usize,
}

/// One ACP frame as it travels: header, optional timestamp, body.
///
/// The constructors keep the `TIMESTAMPED` flag in step with the timestamp and the
/// payload within [`MAX_PAYLOAD_LEN`], so encoding a `Frame` cannot fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    header: Header,
    timestamp_ms: Option<u64>,
    body: Bytes,
}

impl Frame {
    /// A frame without timestamp. Clears `TIMESTAMPED` in `header.flags`.
    pub fn new(mut header: Header, body: Bytes) -> Result<Frame, FrameTooLarge> {
        if body.len() > MAX_PAYLOAD_LEN {
            return Err(FrameTooLarge { len: body.len() });
        }
        header.flags = header.flags.without(Flags::TIMESTAMPED);
        Ok(Frame {
            header,
            timestamp_ms: None,
            body,
        })
    }

    /// A frame whose payload starts with `timestamp_ms`, as datagrams must. Sets
    /// `TIMESTAMPED` and clears `CONTINUATION` (timestamped frames never fragment).
    pub fn timestamped(
        mut header: Header,
        timestamp_ms: u64,
        body: Bytes,
    ) -> Result<Frame, FrameTooLarge> {
        let len = body.len() + TIMESTAMP_LEN;
        if len > MAX_PAYLOAD_LEN {
            return Err(FrameTooLarge { len });
        }
        header.flags = header
            .flags
            .with(Flags::TIMESTAMPED)
            .without(Flags::CONTINUATION);
        Ok(Frame {
            header,
            timestamp_ms: Some(timestamp_ms),
            body,
        })
    }

    /// The header (its flags are consistent with the timestamp).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The sender's timestamp, present exactly when the `TIMESTAMPED` flag is set.
    pub fn timestamp_ms(&self) -> Option<u64> {
        self.timestamp_ms
    }

    /// The payload after the timestamp, if any.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The Payload Length field: body plus timestamp.
    pub fn payload_len(&self) -> u16 {
        let len = self.body.len() + self.timestamp_ms.map_or(0, |_| TIMESTAMP_LEN);
        // The constructors and the decoder keep len <= MAX_PAYLOAD_LEN.
        u16::try_from(len).unwrap_or(u16::MAX)
    }

    /// Bytes this frame takes on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + usize::from(self.payload_len())
    }

    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut impl BufMut) {
        self.header.encode(self.payload_len(), out);
        if let Some(ts) = self.timestamp_ms {
            out.put_u64(ts);
        }
        out.put_slice(&self.body);
    }

    /// The frame as one contiguous buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out.freeze()
    }

    /// Builds a frame from a checked header and its whole payload (timestamp included).
    pub(crate) fn from_wire(header: Header, mut payload: Bytes) -> Frame {
        let timestamp_ms = if header.flags.contains(Flags::TIMESTAMPED) {
            // Header::decode guarantees the payload holds the timestamp.
            let ts = payload.split_to(TIMESTAMP_LEN);
            let mut raw = [0u8; TIMESTAMP_LEN];
            raw.copy_from_slice(&ts);
            Some(u64::from_be_bytes(raw))
        } else {
            None
        };
        Frame {
            header,
            timestamp_ms,
            body: payload,
        }
    }

    /// Decodes a datagram, which must hold exactly one unfragmented frame.
    pub fn decode_datagram(datagram: Bytes, max_payload_len: usize) -> Result<Frame, DecodeError> {
        let (frame, used) = super::decoder::decode_one(&datagram, max_payload_len)?;
        if used != datagram.len() {
            return Err(DecodeError::TrailingBytes {
                extra: datagram.len() - used,
            });
        }
        if frame.header.flags.contains(Flags::CONTINUATION) {
            return Err(DecodeError::FragmentedDatagram);
        }
        Ok(frame)
    }
}

/// A whole message: the header of its first frame (without `CONTINUATION`), the
/// optional timestamp and the complete body, which may exceed one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Header of the first frame; `seq` is the first frame's sequence number.
    pub header: Header,
    /// Present when the message was sent timestamped (always a single frame).
    pub timestamp_ms: Option<u64>,
    /// The complete body.
    pub body: Bytes,
}

impl Message {
    /// A message with no timestamp.
    pub fn new(header: Header, body: Bytes) -> Message {
        Message {
            header,
            timestamp_ms: None,
            body,
        }
    }

    /// Splits the message into frames of at most `max_frame_payload` body bytes with
    /// consecutive sequence numbers starting at `first_seq` (wrapping). Every frame
    /// but the last carries `CONTINUATION`. A timestamped message must fit in one frame.
    pub fn into_frames(
        self,
        first_seq: u16,
        max_frame_payload: usize,
    ) -> Result<Vec<Frame>, FrameTooLarge> {
        let pieces = self.parts().cut(first_seq, max_frame_payload)?;
        match self.timestamp_ms {
            Some(ts) => pieces
                .map(|(header, _)| Frame::timestamped(header, ts, self.body.clone()))
                .collect(),
            None => pieces
                .map(|(header, range)| Frame::new(header, self.body.slice(range)))
                .collect(),
        }
    }

    /// The message with its body borrowed.
    pub fn parts(&self) -> MessageRef<'_> {
        MessageRef {
            header: self.header,
            timestamp_ms: self.timestamp_ms,
            body: &self.body,
        }
    }
}

/// A message whose body is borrowed: what a sender that encodes into a buffer of its
/// own, and reuses it, hands to a lane, which copies the body into its frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageRef<'a> {
    /// As [`Message::header`].
    pub header: Header,
    /// As [`Message::timestamp_ms`].
    pub timestamp_ms: Option<u64>,
    /// The complete body.
    pub body: &'a [u8],
}

impl<'a> MessageRef<'a> {
    /// A message with no timestamp.
    pub fn new(header: Header, body: &'a [u8]) -> MessageRef<'a> {
        MessageRef {
            header,
            timestamp_ms: None,
            body,
        }
    }

    /// Appends the message's frames to `out` (the bytes [`Message::into_frames`] would
    /// encode to), numbered from `first_seq`; returns how many frames it wrote.
    pub fn encode_frames(
        &self,
        first_seq: u16,
        max_frame_payload: usize,
        out: &mut BytesMut,
    ) -> Result<u16, FrameTooLarge> {
        let pieces = self.cut(first_seq, max_frame_payload)?;
        let ts = self.timestamp_ms.map_or(0, |_| TIMESTAMP_LEN);
        out.reserve(self.body.len() + ts + HEADER_LEN * self.frame_count(max_frame_payload));
        let mut count = 0u16;
        for (header, range) in pieces {
            let part = &self.body[range];
            // Every piece fits the length field: `Cut` keeps it within MAX_PAYLOAD_LEN.
            match self.timestamp_ms {
                Some(ts) => {
                    header.encode((part.len() + TIMESTAMP_LEN) as u16, out);
                    out.put_u64(ts);
                }
                None => header.encode(part.len() as u16, out),
            }
            out.put_slice(part);
            count = count.wrapping_add(1);
        }
        Ok(count)
    }

    /// The message's frames: each one's header and the range of the body it carries.
    fn cut(&self, first_seq: u16, max_frame_payload: usize) -> Result<Cut, FrameTooLarge> {
        Cut::new(
            self.header,
            first_seq,
            self.timestamp_ms.is_some(),
            self.body.len(),
            max_frame_payload,
        )
    }

    /// How many frames this message takes at `max_frame_payload` bytes per frame.
    pub fn frame_count(&self, max_frame_payload: usize) -> usize {
        self.body
            .len()
            .div_ceil(chunk_len(max_frame_payload))
            .max(1)
    }
}

/// Body bytes per frame for a `max_frame_payload` setting.
fn chunk_len(max_frame_payload: usize) -> usize {
    max_frame_payload.clamp(1, MAX_PAYLOAD_LEN)
}

/// How a message is cut into frames, the one rule [`Message::into_frames`] and
/// [`MessageRef::encode_frames`] both follow: pieces of at most the frame payload,
/// numbered from the first sequence number (wrapping), `CONTINUATION` on every piece
/// but the last, `TIMESTAMPED` only on a timestamped message, which must fit in one
/// frame. Yields each frame's header and the range of the body it carries.
struct Cut {
    header: Header,
    len: usize,
    chunk: usize,
    at: usize,
    done: bool,
}

impl Cut {
    fn new(
        mut header: Header,
        first_seq: u16,
        timestamped: bool,
        len: usize,
        max_frame_payload: usize,
    ) -> Result<Cut, FrameTooLarge> {
        let chunk = chunk_len(max_frame_payload);
        header.seq = first_seq;
        header.flags = header.flags.without(Flags::CONTINUATION);
        header.flags = if timestamped {
            if len + TIMESTAMP_LEN > chunk {
                return Err(FrameTooLarge {
                    len: len + TIMESTAMP_LEN,
                });
            }
            header.flags.with(Flags::TIMESTAMPED)
        } else {
            header.flags.without(Flags::TIMESTAMPED)
        };
        Ok(Cut {
            header,
            len,
            chunk,
            at: 0,
            done: false,
        })
    }
}

impl Iterator for Cut {
    type Item = (Header, std::ops::Range<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let end = self.len.min(self.at + self.chunk);
        let mut header = self.header;
        if end < self.len {
            header.flags = header.flags.with(Flags::CONTINUATION);
        } else {
            self.done = true;
        }
        let piece = (header, self.at..end);
        self.at = end;
        self.header.seq = self.header.seq.wrapping_add(1);
        Some(piece)
    }
}

impl From<Frame> for Message {
    fn from(frame: Frame) -> Message {
        let mut header = frame.header;
        header.flags = header.flags.without(Flags::CONTINUATION);
        Message {
            header,
            timestamp_ms: frame.timestamp_ms,
            body: frame.body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MessageType;

    #[test]
    fn timestamp_flag_follows_the_constructor() {
        let mut h = Header::new(MessageType::Report);
        h.flags = Flags::TIMESTAMPED;
        let f = Frame::new(h, Bytes::from_static(b"x")).unwrap();
        assert!(!f.header().flags.contains(Flags::TIMESTAMPED));
        assert_eq!(f.payload_len(), 1);
        let f = Frame::timestamped(Header::new(MessageType::Report), 7, Bytes::new()).unwrap();
        assert!(f.header().flags.contains(Flags::TIMESTAMPED));
        assert_eq!(f.payload_len(), 8);
        assert_eq!(f.encoded_len(), f.to_bytes().len());
    }

    #[test]
    fn oversized_bodies_are_refused() {
        let h = Header::new(MessageType::Envelope);
        assert!(Frame::new(h, Bytes::from(vec![0; MAX_PAYLOAD_LEN])).is_ok());
        assert_eq!(
            Frame::new(h, Bytes::from(vec![0; MAX_PAYLOAD_LEN + 1])),
            Err(FrameTooLarge {
                len: MAX_PAYLOAD_LEN + 1
            })
        );
        assert!(Frame::timestamped(h, 0, Bytes::from(vec![0; MAX_PAYLOAD_LEN - 7])).is_err());
    }

    #[test]
    fn messages_split_into_continuation_frames_with_wrapping_seq() {
        let body = Bytes::from((0..=255u8).cycle().take(25).collect::<Vec<_>>());
        let msg = Message::new(Header::new(MessageType::Envelope), body.clone());
        let frames = msg.into_frames(u16::MAX - 1, 10).unwrap();
        let seqs: Vec<u16> = frames.iter().map(|f| f.header().seq).collect();
        assert_eq!(seqs, [u16::MAX - 1, u16::MAX, 0]);
        let cont: Vec<bool> = frames
            .iter()
            .map(|f| f.header().flags.contains(Flags::CONTINUATION))
            .collect();
        assert_eq!(cont, [true, true, false]);
        let joined: Vec<u8> = frames.iter().flat_map(|f| f.body().to_vec()).collect();
        assert_eq!(joined, body);
    }

    proptest::proptest! {
        /// `MessageRef::encode_frames` (straight from the borrowed body) writes exactly
        /// the bytes of the frames `into_frames` builds, and those frames follow the
        /// rule: pieces of at most `chunk` bytes that join into the body, consecutive
        /// sequence numbers, `CONTINUATION` on all but the last, `TIMESTAMPED` (one
        /// frame) exactly when there is a timestamp.
        #[test]
        fn encode_frames_writes_the_frames_into_frames_builds(
            flags in proptest::prelude::any::<u8>(),
            ts in proptest::option::of(proptest::prelude::any::<u64>()),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            chunk in 1usize..400,
            seq in proptest::prelude::any::<u16>(),
        ) {
            let mut header = Header::new(MessageType::Envelope);
            header.flags = Flags::from_bits(flags & 0x1f).unwrap_or_default();
            let msg = Message { header, timestamp_ms: ts, body: Bytes::from(body) };
            let mut out = BytesMut::new();
            let fast = msg.parts().encode_frames(seq, chunk, &mut out);
            match msg.clone().into_frames(seq, chunk) {
                Ok(frames) => {
                    let body = &msg.body;
                    let pieces = if ts.is_some() { 1 } else { body.len().div_ceil(chunk).max(1) };
                    proptest::prop_assert_eq!(frames.len(), pieces);
                    proptest::prop_assert_eq!(frames.len(), msg.parts().frame_count(chunk));
                    let joined: Vec<u8> = frames.iter().flat_map(|f| f.body().to_vec()).collect();
                    proptest::prop_assert_eq!(&joined[..], &body[..]);
                    for (i, f) in frames.iter().enumerate() {
                        let h = f.header();
                        proptest::prop_assert_eq!(h.seq, seq.wrapping_add(i as u16));
                        proptest::prop_assert_eq!(h.flags.contains(Flags::CONTINUATION), i + 1 < frames.len());
                        proptest::prop_assert_eq!(h.flags.contains(Flags::TIMESTAMPED), ts.is_some());
                        proptest::prop_assert!(f.body().len() <= chunk);
                    }
                    let mut expected = BytesMut::new();
                    for f in &frames {
                        f.encode(&mut expected);
                    }
                    proptest::prop_assert_eq!(fast, Ok(frames.len() as u16));
                    proptest::prop_assert_eq!(out, expected);
                }
                Err(e) => {
                    proptest::prop_assert!(ts.is_some() && msg.body.len() + TIMESTAMP_LEN > chunk);
                    proptest::prop_assert_eq!(fast, Err(e));
                }
            }
        }
    }

    #[test]
    fn an_empty_message_is_one_empty_frame() {
        let msg = Message::new(Header::new(MessageType::Control), Bytes::new());
        let frames = msg.into_frames(5, MAX_PAYLOAD_LEN).unwrap();
        assert_eq!(frames.len(), 1);
        assert!(frames[0].body().is_empty());
    }
}
