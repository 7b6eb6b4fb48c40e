//! Workload recording and deterministic replay on virtual time, with fault injection
//! and reports.
//!
//! Architecture invariant: no quinn and no real time; the simulator drives the same
//! state machines as the live runtime.
//!
//! Status: built in issue [5/6]. Until then this crate only re-exports the actors.

pub use agentmesh_actors as actors;
