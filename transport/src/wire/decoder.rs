//! Incremental frame decoding for stream bytes, in the manner of tokio-util's
//! `Decoder`: `Ok(None)` until a whole frame has arrived.

use bytes::{Bytes, BytesMut};

use super::error_code::AcpErrorCode;
use super::frame::Frame;
use super::header::{Header, HEADER_LEN, MAX_PAYLOAD_LEN};

/// Why bytes are not a valid ACP frame. Every variant is fatal for the stream it came
/// from: the receiver closes the connection with [`DecodeError::code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The Ver field is not 1.
    #[error("unsupported ACP version {version} (this node speaks 1)")]
    UnsupportedVersion {
        /// The version on the wire.
        version: u8,
    },
    /// The Type field holds a reserved code (12..=15).
    #[error("unknown message type code {code}")]
    UnknownType {
        /// The 4-bit code on the wire.
        code: u8,
    },
    /// A reserved flag bit (5..=7) is set.
    #[error("reserved flag bits set in 0x{flags:02x}")]
    ReservedFlags {
        /// The whole Flags byte.
        flags: u8,
    },
    /// `TIMESTAMPED` and `CONTINUATION` together, which version 1 forbids.
    #[error("a timestamped frame cannot be a fragment (TIMESTAMPED with CONTINUATION)")]
    FragmentedTimestamp,
    /// `TIMESTAMPED` set but the payload is shorter than the 8-byte timestamp.
    #[error("TIMESTAMPED frame with only {payload_len} payload bytes (needs at least 8)")]
    MissingTimestamp {
        /// The Payload Length field.
        payload_len: u16,
    },
    /// The Payload Length exceeds what this receiver accepts.
    #[error("payload of {len} bytes exceeds the limit of {limit}")]
    PayloadTooLarge {
        /// The Payload Length field.
        len: usize,
        /// The receiver's configured limit.
        limit: usize,
    },
    /// The input ended inside a frame (only for decoding a complete buffer).
    #[error("truncated frame: needs {needed} bytes, {available} available")]
    Truncated {
        /// Bytes the frame needs, header included.
        needed: usize,
        /// Bytes there were.
        available: usize,
    },
    /// Bytes left over after the frame in a datagram.
    #[error("{extra} bytes after the frame")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A datagram carried a `CONTINUATION` fragment; fragments go on lanes only.
    #[error("a datagram cannot carry a fragment (CONTINUATION set)")]
    FragmentedDatagram,
}

impl DecodeError {
    /// The error code to close the offending connection with.
    pub fn code(&self) -> AcpErrorCode {
        match self {
            DecodeError::UnsupportedVersion { .. } => AcpErrorCode::UnsupportedVersion,
            DecodeError::UnknownType { .. } => AcpErrorCode::UnknownType,
            DecodeError::PayloadTooLarge { .. } => AcpErrorCode::FrameTooLarge,
            DecodeError::ReservedFlags { .. }
            | DecodeError::FragmentedTimestamp
            | DecodeError::MissingTimestamp { .. }
            | DecodeError::Truncated { .. }
            | DecodeError::TrailingBytes { .. }
            | DecodeError::FragmentedDatagram => AcpErrorCode::ProtocolViolation,
        }
    }
}

/// Cuts frames out of a byte stream.
///
/// The Payload Length is checked against `max_payload_len` before anything is
/// reserved for the payload, so a peer cannot make the receiver allocate more than
/// `HEADER_LEN + max_payload_len` bytes per stream.
#[derive(Clone, Debug)]
pub struct FrameDecoder {
    max_payload_len: usize,
}

impl Default for FrameDecoder {
    fn default() -> FrameDecoder {
        FrameDecoder::new(MAX_PAYLOAD_LEN)
    }
}

impl FrameDecoder {
    /// A decoder accepting payloads up to `max_payload_len` bytes (capped at 65,535).
    pub fn new(max_payload_len: usize) -> FrameDecoder {
        FrameDecoder {
            max_payload_len: max_payload_len.min(MAX_PAYLOAD_LEN),
        }
    }

    /// The payload limit in force.
    pub fn max_payload_len(&self) -> usize {
        self.max_payload_len
    }

    /// Takes the next whole frame off the front of `buf`, or returns `Ok(None)` and
    /// leaves `buf` as it was if the frame is not complete yet. After an error the
    /// stream is unusable: framing is lost.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let (header, len) = self.check(head)?;
        let total = HEADER_LEN + len;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        // One buffer handle per frame: skip the header in place, split off the payload.
        bytes::Buf::advance(buf, HEADER_LEN);
        let payload = buf.split_to(len).freeze();
        Ok(Some(Frame::from_wire(header, payload)))
    }

    fn check(&self, head: &[u8; HEADER_LEN]) -> Result<(Header, usize), DecodeError> {
        let (header, len) = Header::decode(head)?;
        let len = usize::from(len);
        if len > self.max_payload_len {
            return Err(DecodeError::PayloadTooLarge {
                len,
                limit: self.max_payload_len,
            });
        }
        Ok((header, len))
    }
}

/// Decodes the frame at the start of a complete buffer; returns it and the bytes used.
pub(crate) fn decode_one(
    input: &Bytes,
    max_payload_len: usize,
) -> Result<(Frame, usize), DecodeError> {
    let decoder = FrameDecoder::new(max_payload_len);
    let head = input
        .first_chunk::<HEADER_LEN>()
        .ok_or(DecodeError::Truncated {
            needed: HEADER_LEN,
            available: input.len(),
        })?;
    let (header, len) = decoder.check(head)?;
    let total = HEADER_LEN + len;
    if input.len() < total {
        return Err(DecodeError::Truncated {
            needed: total,
            available: input.len(),
        });
    }
    Ok((
        Frame::from_wire(header, input.slice(HEADER_LEN..total)),
        total,
    ))
}

/// Decodes every frame in a complete buffer (a capture, a log line). Fails on the
/// first bad or incomplete frame.
pub fn decode_all(input: &Bytes, max_payload_len: usize) -> Result<Vec<Frame>, DecodeError> {
    let mut frames = Vec::new();
    let mut rest = input.clone();
    while !rest.is_empty() {
        let (frame, used) = decode_one(&rest, max_payload_len)?;
        frames.push(frame);
        rest = rest.slice(used..);
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Flags, MessageType};

    fn sample() -> Frame {
        let mut h = Header::new(MessageType::Sync);
        h.seq = 42;
        Frame::new(h, Bytes::from_static(b"hello")).unwrap()
    }

    #[test]
    fn needs_more_until_the_whole_frame_is_there_whichever_way_it_is_cut() {
        let wire = sample().to_bytes();
        for cut in 0..wire.len() {
            let mut dec = FrameDecoder::default();
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(dec.decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "a partial frame is left in place");
            buf.extend_from_slice(&wire[cut..]);
            assert_eq!(dec.decode(&mut buf), Ok(Some(sample())));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn back_to_back_frames_come_out_in_order() {
        let mut buf = BytesMut::new();
        for seq in 0..3u16 {
            let mut h = Header::new(MessageType::Envelope);
            h.seq = seq;
            Frame::new(h, Bytes::from(vec![seq as u8; usize::from(seq)]))
                .unwrap()
                .encode(&mut buf);
        }
        let mut dec = FrameDecoder::default();
        for seq in 0..3u16 {
            let f = dec.decode(&mut buf).unwrap().unwrap();
            assert_eq!(f.header().seq, seq);
        }
        assert_eq!(dec.decode(&mut buf), Ok(None));
    }

    #[test]
    fn a_length_over_the_limit_is_refused_before_any_payload_arrives() {
        let mut h = Header::new(MessageType::Envelope);
        h.flags = Flags::empty();
        let mut buf = BytesMut::new();
        h.encode(1025, &mut buf);
        let mut dec = FrameDecoder::new(1024);
        assert_eq!(
            dec.decode(&mut buf),
            Err(DecodeError::PayloadTooLarge {
                len: 1025,
                limit: 1024
            })
        );
        assert!(
            buf.capacity() < 1024,
            "nothing reserved for a refused payload"
        );
    }

    #[test]
    fn header_errors_map_to_close_codes() {
        let cases: [(&[u8], DecodeError); 5] = [
            (
                &[0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                DecodeError::UnsupportedVersion { version: 2 },
            ),
            (
                &[0x1c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                DecodeError::UnknownType { code: 12 },
            ),
            (
                &[0x10, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                DecodeError::ReservedFlags { flags: 0x20 },
            ),
            (
                &[0x10, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
                DecodeError::FragmentedTimestamp,
            ),
            (
                &[0x11, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
                DecodeError::MissingTimestamp { payload_len: 7 },
            ),
        ];
        for (bytes, want) in cases {
            let mut buf = BytesMut::from(bytes);
            assert_eq!(FrameDecoder::default().decode(&mut buf), Err(want.clone()));
            assert_ne!(want.code(), AcpErrorCode::NoError);
        }
    }

    #[test]
    fn datagrams_hold_exactly_one_unfragmented_frame() {
        let wire = sample().to_bytes();
        assert_eq!(
            Frame::decode_datagram(wire.clone(), MAX_PAYLOAD_LEN),
            Ok(sample())
        );
        let mut two = BytesMut::from(&wire[..]);
        two.extend_from_slice(&wire);
        assert_eq!(
            Frame::decode_datagram(two.freeze(), MAX_PAYLOAD_LEN),
            Err(DecodeError::TrailingBytes { extra: wire.len() })
        );
        let mut h = Header::new(MessageType::Report);
        h.flags = Flags::CONTINUATION;
        let frag = Frame::new(h, Bytes::new()).unwrap().to_bytes();
        assert_eq!(
            Frame::decode_datagram(frag, MAX_PAYLOAD_LEN),
            Err(DecodeError::FragmentedDatagram)
        );
        assert_eq!(
            decode_all(&wire.slice(..wire.len() - 1), MAX_PAYLOAD_LEN),
            Err(DecodeError::Truncated {
                needed: wire.len(),
                available: wire.len() - 1
            })
        );
    }
}
