//! Joins `CONTINUATION` fragments from one lane back into whole messages, within a
//! size limit.

use bytes::BytesMut;

use super::error_code::AcpErrorCode;
use super::frame::{Frame, Message};
use super::header::{Flags, Header};

/// Why fragments could not be joined. Fatal for the lane: the receiver closes the
/// connection with [`ReassemblyError::code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReassemblyError {
    /// The message grew past the receiver's limit.
    #[error("message of at least {len} bytes exceeds the limit of {limit}")]
    MessageTooLarge {
        /// Bytes the message had reached, counting the refused fragment.
        len: usize,
        /// The receiver's limit.
        limit: usize,
    },
    /// A fragment's type, group, agent or priority differs from the first fragment's.
    #[error("fragment does not belong to the message in progress")]
    Interleaved,
    /// A fragment's sequence number is not the one after the previous fragment's.
    #[error("fragment has seq {got}, expected {expected}")]
    OutOfOrder {
        /// The sequence number expected.
        expected: u16,
        /// The sequence number received.
        got: u16,
    },
}

impl ReassemblyError {
    /// The error code to close the offending connection with.
    pub fn code(&self) -> AcpErrorCode {
        match self {
            ReassemblyError::MessageTooLarge { .. } => AcpErrorCode::FrameTooLarge,
            _ => AcpErrorCode::ProtocolViolation,
        }
    }
}

struct Partial {
    header: Header,
    body: BytesMut,
    next_seq: u16,
}

/// Per-lane reassembly state: at most one message in progress, since a lane is one
/// ordered stream and senders write a message's fragments back to back.
pub struct Reassembler {
    max_message_len: usize,
    partial: Option<Partial>,
}

impl Reassembler {
    /// Default limit for a reassembled message: 16 MiB.
    pub const DEFAULT_MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024;

    /// A reassembler refusing messages over `max_message_len` bytes.
    pub fn new(max_message_len: usize) -> Reassembler {
        Reassembler {
            max_message_len,
            partial: None,
        }
    }

    /// True while a fragmented message is incomplete.
    pub fn in_progress(&self) -> bool {
        self.partial.is_some()
    }

    /// Bytes held for the message in progress.
    pub fn buffered_len(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.body.len())
    }

    /// Feeds the next frame of the lane; returns a message when one is complete.
    pub fn push(&mut self, frame: Frame) -> Result<Option<Message>, ReassemblyError> {
        let more = frame.header().flags.contains(Flags::CONTINUATION);
        let Some(mut partial) = self.partial.take() else {
            if !more {
                self.check_len(frame.body().len())?;
                return Ok(Some(Message::from(frame)));
            }
            let header = *frame.header();
            self.check_len(frame.body().len())?;
            self.partial = Some(Partial {
                header,
                body: BytesMut::from(&frame.body()[..]),
                next_seq: header.seq.wrapping_add(1),
            });
            return Ok(None);
        };
        let h = frame.header();
        let first = &partial.header;
        if (h.msg_type, h.group, h.agent, h.prio)
            != (first.msg_type, first.group, first.agent, first.prio)
        {
            return Err(ReassemblyError::Interleaved);
        }
        if h.seq != partial.next_seq {
            return Err(ReassemblyError::OutOfOrder {
                expected: partial.next_seq,
                got: h.seq,
            });
        }
        self.check_len(partial.body.len() + frame.body().len())?;
        partial.body.extend_from_slice(frame.body());
        partial.next_seq = partial.next_seq.wrapping_add(1);
        if more {
            self.partial = Some(partial);
            return Ok(None);
        }
        let mut header = partial.header;
        header.flags = header.flags.without(Flags::CONTINUATION);
        Ok(Some(Message::new(header, partial.body.freeze())))
    }

    fn check_len(&self, len: usize) -> Result<(), ReassemblyError> {
        if len > self.max_message_len {
            return Err(ReassemblyError::MessageTooLarge {
                len,
                limit: self.max_message_len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MessageType;
    use bytes::Bytes;

    fn message(len: usize) -> Message {
        let mut h = Header::new(MessageType::Envelope);
        h.agent = 9;
        Message::new(
            h,
            Bytes::from((0..len).map(|i| i as u8).collect::<Vec<_>>()),
        )
    }

    #[test]
    fn fragments_join_into_the_message_that_was_split() {
        let msg = message(100_000);
        let frames = msg.clone().into_frames(65_500, 30_000).unwrap();
        assert_eq!(frames.len(), 4);
        let mut r = Reassembler::new(Reassembler::DEFAULT_MAX_MESSAGE_LEN);
        let mut out = None;
        for f in frames {
            assert!(out.is_none());
            out = r.push(f).unwrap();
        }
        let mut want = msg;
        want.header.seq = 65_500;
        assert_eq!(out, Some(want));
        assert_eq!(r.buffered_len(), 0);
    }

    #[test]
    fn the_limit_holds_across_fragments() {
        let frames = message(2_500).into_frames(0, 1_000).unwrap();
        let mut r = Reassembler::new(2_000);
        assert_eq!(r.push(frames[0].clone()), Ok(None));
        assert_eq!(r.push(frames[1].clone()), Ok(None));
        assert_eq!(
            r.push(frames[2].clone()),
            Err(ReassemblyError::MessageTooLarge {
                len: 2_500,
                limit: 2_000
            })
        );
    }

    #[test]
    fn gaps_and_strangers_are_refused() {
        let frames = message(30).into_frames(10, 10).unwrap();
        let mut r = Reassembler::new(1_000);
        r.push(frames[0].clone()).unwrap();
        assert_eq!(
            r.push(frames[2].clone()),
            Err(ReassemblyError::OutOfOrder {
                expected: 11,
                got: 12
            })
        );
        let mut r = Reassembler::new(1_000);
        r.push(frames[0].clone()).unwrap();
        let mut h = *frames[1].header();
        h.agent = 10;
        let stranger = Frame::new(h, frames[1].body().clone()).unwrap();
        assert_eq!(r.push(stranger), Err(ReassemblyError::Interleaved));
    }
}
