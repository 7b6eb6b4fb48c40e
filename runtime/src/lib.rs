//! The AgentMesh node: supervision root, cluster membership and failure detection,
//! peer connections, routing of actor messages and ACP frames by priority, metrics
//! and tracing, clock injection.
//!
//! Architecture invariant: this crate knows nothing of what a task or a capability
//! means; it moves actor messages between nodes over `agentmesh-transport`.
//!
//! Map: `membership` (sans-IO failure detection over foca), `node` (the supervision
//! tree that drives it over the transport), `remote` (cluster-wide actor names, typed
//! messages, ask/reply, node services, ACP routes), `client` (requests from outside
//! the cluster, for the CLI), `metrics` (the Prometheus endpoint). Coordination-group
//! policy lives with the agents in `agentmesh-actors`, which knows what a group is.

mod answer;
pub mod client;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod remote;

pub use client::{Client, ClientError};
pub use membership::{MemberState, MembershipConfig, NodeId};
pub use node::{
    advertised_addr, request_status, status_of, ClusterEvent, MemberInfo, Node, NodeConfig,
    NodeError, StatusReport, STATUS_SERVICE,
};
pub use remote::{
    ActorAddr, AskError, Bounded, Down, FromPeer, Mesh, RegisterError, RemoteMessage, SendError,
};

pub use agentmesh_transport as transport;
