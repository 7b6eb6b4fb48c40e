//! AgentMesh: a runtime for many AI agents across machines. Each agent is a
//! supervised ractor actor; nodes talk the Agent Coordination Protocol (ACP) over
//! QUIC with mutual TLS.
//!
//! This facade re-exports the member crates; `agentmesh::prelude` gathers what an
//! application needs.

pub mod builtin;
mod cli;
pub mod local;
pub mod rag;

pub use cli::{AgentCatalog, Cli};

pub use agentmesh_actors as actors;
pub use agentmesh_runtime as runtime;
pub use agentmesh_sims as sims;
pub use agentmesh_transport as transport;

pub mod prelude {
    //! The names most applications use.
    pub use agentmesh_actors::{
        Adjustment, Agent, AgentError, AgentHost, Allocation, HostConfig, RestartPolicy,
        SegmentContext, SubmitRequest, SyncEvent, TaskOutcome, TaskStatus, WorkerEvent, WorkerMsg,
    };
    pub use agentmesh_runtime::{Node, NodeConfig};

    pub use crate::Cli;
    pub use agentmesh_transport::wire::payload::{
        Adjust, AgentInfo, Allocate, Capability, Control, ControlOp, Envelope, Health, ListAgents,
        Membership, QueryCapableAgents, Register, RegisterAck, Report, Sync, SyncAck,
    };
    pub use agentmesh_transport::{
        AcpErrorCode, DecodeError, Flags, Frame, FrameDecoder, Header, Lane, Message, MessageType,
        Payload, PayloadError,
    };
}
