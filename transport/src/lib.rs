//! The Agent Coordination Protocol (ACP) for AgentMesh: wire format and, in later
//! steps, the QUIC transport that carries it.
//!
//! `wire` is pure protocol logic: it never touches a socket or reads a clock, so the
//! runtime and the deterministic simulator run exactly the same code (see
//! `docs/architecture.md`, invariant 1). Inputs that depend on time take `now` as an
//! argument.
//!
//! This crate knows nothing about ractor, agents or tasks: it moves typed frames.

pub mod clock;
pub mod endpoint;
pub mod events;
pub mod headroom;
pub mod ingress;
mod lane_queue;
mod peer;
pub mod skew;
pub mod stats;
pub mod tls;
pub mod wire;

pub use endpoint::{
    EndpointConfig, PeerName, Transport, TransportError, TransportEvent, DEFAULT_MAX_MESSAGE_BYTES,
};
pub use events::{EventQueues, Inbox, Leftover, TransportEvents};
pub use ingress::{OwnershipTable, Via};
pub use peer::{Link, PeerHandle};

pub use wire::{
    AcpErrorCode, DecodeError, Flags, Frame, FrameDecoder, Header, Lane, Message, MessageRef,
    MessageType, Payload, PayloadError, Reassembler, ReplayError, ReplayWindow, TimestampWindow,
};
