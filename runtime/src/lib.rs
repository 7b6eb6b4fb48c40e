//! The AgentMesh node: supervision root, cluster membership and failure detection,
//! peer connections, routing of actor messages by priority, policy enforcement,
//! metrics and tracing, clock and RNG injection.
//!
//! Architecture invariant: this crate knows nothing of what a task or a capability
//! means; it moves actor messages between nodes over `agentmesh-transport`.
//!
//! Status: the node is built in issue [3/6]. Until then this crate only re-exports the
//! transport it stands on, so the dependency direction is fixed from the start.

pub use agentmesh_transport as transport;
