//! The user-facing `Agent` API and the Discovery, Coordinator and Worker actors.
//!
//! Architecture invariant: no sockets and no quinn here; actors reach other nodes
//! only through `agentmesh-runtime`. Decision logic (registry, allocation ledger,
//! policy) is plain state machines that take `now` as input, so `agentmesh-sims` can
//! run it; the actors (`discovery`, `coordinator`, `workers`, `worker`) put them on
//! the mesh, and `host` starts them on a node.

pub mod agent;
pub mod coordinator;
pub mod cut_off;
pub mod dirty;
pub mod discovery;
pub mod early_adjusts;
pub mod ended;
pub mod ended_attempts;
pub mod host;
pub mod in_flight;
pub mod kept;
pub mod lease;
pub mod ledger;
pub mod notices;
pub mod pages;
pub mod policy;
pub mod record;
pub mod refusals;
pub mod registry;
pub(crate) mod resend;
pub mod restarts;
pub mod service;
pub mod standby;
pub mod worker;
pub mod workers;

pub use agent::{Adjustment, Agent, AgentError, SegmentContext, SyncEvent};
pub use host::{AgentHost, HostConfig, HostError, PolicyStore, POLICY_RESPREAD_EVERY};
pub use service::{SubmitRequest, TaskOutcome, TaskStatus};
pub use worker::{Allocation, RestartPolicy, WorkerEvent, WorkerMsg};

pub use agentmesh_runtime as runtime;
