//! ACP application error codes, sent in QUIC CONNECTION_CLOSE when a node drops a
//! peer, and carried by the decode errors that cause them.

use std::fmt;

/// Why a connection was closed. Values are stable on the wire (`docs/acp.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum AcpErrorCode {
    /// Orderly close.
    NoError = 0x00,
    /// A frame broke a rule of the protocol not covered below.
    ProtocolViolation = 0x01,
    /// The Ver field named a version this node does not speak.
    UnsupportedVersion = 0x02,
    /// The Type field held a reserved code.
    UnknownType = 0x03,
    /// A frame or reassembled message was larger than this node accepts.
    FrameTooLarge = 0x04,
    /// A payload did not decode as its type's schema, or broke a field rule.
    BadPayload = 0x05,
    /// A frame carried an Agent ID that the authenticated peer does not own.
    AgentNotOwned = 0x06,
    /// Coordination-group policy refused the peer outright.
    PolicyDenied = 0x07,
    /// The peer kept exceeding its rate limit.
    ExcessiveLoad = 0x08,
    /// A state-changing frame arrived as 0-RTT data.
    ZeroRttRefused = 0x09,
    /// This node failed; not the peer's fault.
    InternalError = 0x0a,
    /// This node is leaving the cluster.
    Leaving = 0x0b,
    /// The peer's certificate names a node that another live connection, from another
    /// address, already speaks for (or this node itself): two nodes share a name.
    NameInUse = 0x0c,
}

impl AcpErrorCode {
    /// Every code, in code order.
    pub const ALL: [AcpErrorCode; 13] = [
        AcpErrorCode::NoError,
        AcpErrorCode::ProtocolViolation,
        AcpErrorCode::UnsupportedVersion,
        AcpErrorCode::UnknownType,
        AcpErrorCode::FrameTooLarge,
        AcpErrorCode::BadPayload,
        AcpErrorCode::AgentNotOwned,
        AcpErrorCode::PolicyDenied,
        AcpErrorCode::ExcessiveLoad,
        AcpErrorCode::ZeroRttRefused,
        AcpErrorCode::InternalError,
        AcpErrorCode::Leaving,
        AcpErrorCode::NameInUse,
    ];

    /// The code as sent in CONNECTION_CLOSE.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The code `code` stands for, if it is one.
    pub fn from_code(code: u64) -> Option<AcpErrorCode> {
        AcpErrorCode::ALL
            .into_iter()
            .find(|c| u64::from(c.code()) == code)
    }

    /// Whether a connection closed with this code says the side told broke a rule
    /// (what it sent was wrong, or not allowed): sending the same again is refused
    /// again. The others (an orderly close, leaving, overload, the closer's own
    /// failure) may pass with time.
    pub fn blames_the_receiver(self) -> bool {
        !matches!(
            self,
            AcpErrorCode::NoError
                | AcpErrorCode::ExcessiveLoad
                | AcpErrorCode::InternalError
                | AcpErrorCode::Leaving
        )
    }
}

impl fmt::Display for AcpErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?} (0x{:02x})", self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back() {
        for (i, code) in AcpErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(code.code() as usize, i);
            assert_eq!(AcpErrorCode::from_code(u64::from(code.code())), Some(code));
        }
        assert_eq!(AcpErrorCode::from_code(0x0d), None);
    }
}
