//! The AgentMesh node: supervision root, cluster membership and failure detection,
//! peer connections, routing of actor messages by priority, policy enforcement,
//! metrics and tracing, clock and RNG injection.
//!
//! Architecture invariant: this crate knows nothing of what a task or a capability
//! means; it moves actor messages between nodes over `agentmesh-transport`.
//!
//! Status: membership and failure detection (`membership`, sans-IO over foca) and the
//! node that drives them over the transport (`node`) are in; the supervision tree,
//! remote actor messaging and metrics are being built (issue [3/6]).

pub mod client;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod remote;

pub use client::{Client, ClientError};
pub use membership::{MemberState, MembershipConfig, NodeId};
pub use node::{
    request_status, ClusterEvent, MemberInfo, Node, NodeConfig, NodeError, StatusReport,
    STATUS_SERVICE,
};
pub use remote::{
    ActorAddr, AskError, Down, FromPeer, Mesh, RegisterError, RemoteMessage, SendError,
};

pub use agentmesh_transport as transport;
