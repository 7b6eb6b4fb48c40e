//! The ACP wire format: header, frames, typed payloads, incremental decoding,
//! fragmentation and replay protection. No I/O and no clock in here.
//!
//! The normative description is `docs/acp.md`; `docs/acp-test-vectors.json` holds the
//! hex vectors that the tests in this module (and any other implementation) check.

mod bytes_serde;
mod decoder;
mod envelope_codec;
mod error_code;
mod frame;
mod header;
mod lane;
pub mod payload;
mod reassembly;
mod replay;

pub use decoder::{decode_all, DecodeError, FrameDecoder};
pub use envelope_codec::EnvelopeParts;
pub use error_code::AcpErrorCode;
pub use frame::{Frame, FrameTooLarge, Message, MessageRef};
pub use header::{
    Flags, Header, MessageType, HEADER_LEN, MAX_PAYLOAD_LEN, PROTOCOL_VERSION, TIMESTAMP_LEN,
};
pub use lane::Lane;
pub use payload::{Payload, PayloadError};
pub use reassembly::{Reassembler, ReassemblyError};
pub use replay::{ReplayError, ReplayWindow, TimestampWindow};
