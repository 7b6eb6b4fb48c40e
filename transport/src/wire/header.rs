//! The 13-byte ACP header: field layout, message types and flags.
//!
//! Layout (big-endian, widths from the draft, which are normative):
//! `Ver 4 | Type 4 | Flags 8 | Stream Prio 8 | Group 16 | Agent ID 32 | Seq 16 | Payload Length 16`.

use std::fmt;

use bytes::BufMut;

use super::decoder::DecodeError;

/// The only protocol version this implementation speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Length of the ACP header on the wire, in bytes (104 bits).
pub const HEADER_LEN: usize = 13;
/// Largest payload one frame can carry: the Payload Length field is 16 bits.
pub const MAX_PAYLOAD_LEN: usize = u16::MAX as usize;
/// Length of the timestamp that starts the payload of a `TIMESTAMPED` frame.
pub const TIMESTAMP_LEN: usize = 8;

/// The 4-bit Type field. Codes 0..=3 are fixed by the draft; 4..=11 are ours; 12..=15
/// are reserved and refused by decoders of version 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum MessageType {
    /// Coordinator to worker: run one attempt of one task segment.
    Allocate = 0,
    /// Worker to coordinator: progress, health, and finally the segment's result.
    Report = 1,
    /// Worker to worker of the same task: an intermediate-result hash.
    Sync = 2,
    /// Coordinator to worker: new parameters, a new priority, or cancel.
    Adjust = 3,
    /// Node to discovery: register an agent with its capabilities.
    Register = 4,
    /// Discovery to node: the Agent ID and coordination group assigned.
    RegisterAck = 5,
    /// Coordinator to discovery: which agents offer a capability.
    QueryCapableAgents = 6,
    /// Discovery to coordinator: the answer to a query, with load and health.
    ListAgents = 7,
    /// Worker to worker: confirms a SYNC (the draft's COORD_ACK).
    SyncAck = 8,
    /// A generic actor message addressed by cluster-wide name.
    Envelope = 9,
    /// Cluster membership gossip (SWIM), opaque to ACP.
    Membership = 10,
    /// Connection control between nodes: ping, pong, leave.
    Control = 11,
}

impl MessageType {
    /// Every defined type, in code order.
    pub const ALL: [MessageType; 12] = [
        MessageType::Allocate,
        MessageType::Report,
        MessageType::Sync,
        MessageType::Adjust,
        MessageType::Register,
        MessageType::RegisterAck,
        MessageType::QueryCapableAgents,
        MessageType::ListAgents,
        MessageType::SyncAck,
        MessageType::Envelope,
        MessageType::Membership,
        MessageType::Control,
    ];

    /// The type for a 4-bit code, or `None` for a reserved code.
    pub fn from_code(code: u8) -> Option<MessageType> {
        MessageType::ALL.get(usize::from(code)).copied()
    }

    /// The 4-bit code on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The name used in `docs/acp.md`, logs and the CLI (`"ALLOCATE"`).
    pub fn name(self) -> &'static str {
        match self {
            MessageType::Allocate => "ALLOCATE",
            MessageType::Report => "REPORT",
            MessageType::Sync => "SYNC",
            MessageType::Adjust => "ADJUST",
            MessageType::Register => "REGISTER",
            MessageType::RegisterAck => "REGISTER_ACK",
            MessageType::QueryCapableAgents => "QUERY_CAPABLE_AGENTS",
            MessageType::ListAgents => "LIST_AGENTS",
            MessageType::SyncAck => "SYNC_ACK",
            MessageType::Envelope => "ENVELOPE",
            MessageType::Membership => "MEMBERSHIP",
            MessageType::Control => "CONTROL",
        }
    }

    /// Parses a name as printed by [`MessageType::name`], ignoring ASCII case.
    pub fn from_name(name: &str) -> Option<MessageType> {
        MessageType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// True for types that change another node's state and so are never accepted
    /// from 0-RTT data, which an attacker can replay.
    pub fn is_state_changing(self) -> bool {
        matches!(self, MessageType::Allocate | MessageType::Adjust)
    }

    /// The Stream Prio a sender uses for this type unless it has a reason not to.
    pub fn default_prio(self) -> u8 {
        match self {
            MessageType::Control | MessageType::Adjust => 224,
            MessageType::Allocate
            | MessageType::Register
            | MessageType::RegisterAck
            | MessageType::QueryCapableAgents
            | MessageType::ListAgents
            | MessageType::Membership => 160,
            MessageType::Report
            | MessageType::Sync
            | MessageType::SyncAck
            | MessageType::Envelope => 96,
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The 8-bit Flags field. Bits 5..=7 are reserved: senders write 0 and version-1
/// receivers refuse a frame that sets them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u8);

impl Flags {
    /// The sender wants an acknowledgement (a REPORT, SYNC_ACK, REGISTER_ACK ...).
    pub const ACK_REQUESTED: Flags = Flags(0x01);
    /// This frame repeats an earlier one (same segment and attempt): receivers
    /// deduplicate by payload identity, not by this bit.
    pub const RETRY: Flags = Flags(0x02);
    /// Time-critical: travels on the urgent lane whatever its Stream Prio.
    pub const URGENT: Flags = Flags(0x04);
    /// More fragments of this message follow on the same lane.
    pub const CONTINUATION: Flags = Flags(0x08);
    /// The payload starts with an 8-byte big-endian timestamp (ms since the Unix epoch).
    pub const TIMESTAMPED: Flags = Flags(0x10);
    /// The bits version 1 defines.
    pub const KNOWN_BITS: u8 = 0x1f;

    /// No flag set.
    pub const fn empty() -> Flags {
        Flags(0)
    }

    /// The raw byte.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Flags from a raw byte, or `None` if a reserved bit is set.
    pub const fn from_bits(bits: u8) -> Option<Flags> {
        if bits & !Flags::KNOWN_BITS == 0 {
            Some(Flags(bits))
        } else {
            None
        }
    }

    /// True if every bit of `other` is set here.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// These flags with `other`'s bits set.
    #[must_use]
    pub const fn with(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    /// These flags with `other`'s bits cleared.
    #[must_use]
    pub const fn without(self, other: Flags) -> Flags {
        Flags(self.0 & !other.0)
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        self.with(rhs)
    }
}

/// The header fields of a frame, without version and payload length, which the
/// codec derives (the version is always [`PROTOCOL_VERSION`], the length comes from
/// the payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the payload is.
    pub msg_type: MessageType,
    /// Flags; `TIMESTAMPED` and `CONTINUATION` are managed by [`super::Frame`].
    pub flags: Flags,
    /// Relative priority, 0 (lowest) to 255 (highest); picks the lane.
    pub prio: u8,
    /// The coordination group the sender acts in.
    pub group: u16,
    /// The sending agent (0: the node itself, or an agent not yet registered).
    pub agent: u32,
    /// Sequence number, per sender and lane, wrapping at 2^16.
    pub seq: u16,
}

impl Header {
    /// A header with no flags, the type's default priority, group 0, agent 0, seq 0.
    pub fn new(msg_type: MessageType) -> Header {
        Header {
            msg_type,
            flags: Flags::empty(),
            prio: msg_type.default_prio(),
            group: 0,
            agent: 0,
            seq: 0,
        }
    }

    /// Writes the 13 header bytes for a payload of `payload_len` bytes.
    pub fn encode(&self, payload_len: u16, out: &mut impl BufMut) {
        out.put_slice(&self.to_bytes(payload_len));
    }

    /// The 13 header bytes for a payload of `payload_len` bytes: built in place and
    /// appended at once, as a sender encodes millions a second.
    pub fn to_bytes(&self, payload_len: u16) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = (PROTOCOL_VERSION << 4) | self.msg_type.code();
        b[1] = self.flags.bits();
        b[2] = self.prio;
        b[3..5].copy_from_slice(&self.group.to_be_bytes());
        b[5..9].copy_from_slice(&self.agent.to_be_bytes());
        b[9..11].copy_from_slice(&self.seq.to_be_bytes());
        b[11..13].copy_from_slice(&payload_len.to_be_bytes());
        b
    }

    /// Parses and checks 13 header bytes; returns the header and the payload length.
    ///
    /// Checks version, type, reserved flags and flag combinations, and that a
    /// `TIMESTAMPED` payload is long enough to hold its timestamp. Does not check the
    /// length against a receiver's limit: that is the decoder's job.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<(Header, u16), DecodeError> {
        let version = bytes[0] >> 4;
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion { version });
        }
        let code = bytes[0] & 0x0f;
        let msg_type = MessageType::from_code(code).ok_or(DecodeError::UnknownType { code })?;
        let flags =
            Flags::from_bits(bytes[1]).ok_or(DecodeError::ReservedFlags { flags: bytes[1] })?;
        if flags.contains(Flags::TIMESTAMPED | Flags::CONTINUATION) {
            return Err(DecodeError::FragmentedTimestamp);
        }
        let be16 = |i: usize| u16::from_be_bytes([bytes[i], bytes[i + 1]]);
        let header = Header {
            msg_type,
            flags,
            prio: bytes[2],
            group: be16(3),
            agent: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]),
            seq: be16(9),
        };
        let payload_len = be16(11);
        if flags.contains(Flags::TIMESTAMPED) && usize::from(payload_len) < TIMESTAMP_LEN {
            return Err(DecodeError::MissingTimestamp { payload_len });
        }
        Ok((header, payload_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_codes_round_trip_and_reserved_codes_are_unknown() {
        for (i, t) in MessageType::ALL.iter().enumerate() {
            assert_eq!(usize::from(t.code()), i);
            assert_eq!(MessageType::from_code(t.code()), Some(*t));
            assert_eq!(MessageType::from_name(&t.name().to_lowercase()), Some(*t));
        }
        for code in 12..=15 {
            assert_eq!(MessageType::from_code(code), None);
        }
    }

    #[test]
    fn reserved_flag_bits_are_refused() {
        for bit in 5..8 {
            assert_eq!(Flags::from_bits(1 << bit), None);
        }
        assert_eq!(Flags::from_bits(0x1f).map(Flags::bits), Some(0x1f));
    }

    #[test]
    fn header_layout_is_big_endian_in_draft_order() {
        let header = Header {
            msg_type: MessageType::Adjust,
            flags: Flags::URGENT,
            prio: 0xe0,
            group: 0x0102,
            agent: 0x0304_0506,
            seq: 0x0708,
        };
        let mut out = Vec::new();
        header.encode(0x090a, &mut out);
        assert_eq!(
            out,
            [0x13, 0x04, 0xe0, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a]
        );
        let bytes: [u8; HEADER_LEN] = out.try_into().unwrap();
        assert_eq!(Header::decode(&bytes), Ok((header, 0x090a)));
    }
}
