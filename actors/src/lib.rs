//! The user-facing `Agent` API and the Discovery, Coordinator and Worker actors.
//!
//! Architecture invariant: no sockets and no quinn here; actors reach other nodes
//! only through `agentmesh-runtime`. Decision logic (registry, allocation ledger)
//! is plain state machines that take `now` as input, so `agentmesh-sims` can run it.
//!
//! Status: the Agent API (`agent`), workers (`worker`), the allocation ledger
//! (`ledger`) and discovery's registry (`registry`) are in; the discovery and
//! coordinator actors that put them on the mesh, and the CLI, are being built (issue
//! [4/6]).

pub mod agent;
pub mod ledger;
pub mod registry;
pub mod worker;

pub use agentmesh_runtime as runtime;
