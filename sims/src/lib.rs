//! Workload recording and deterministic replay on virtual time, with fault injection
//! and reports.
//!
//! Architecture invariant: no quinn and no real time; the simulator drives the same
//! state machines as the live runtime (`Registry`, `Ledger`, `Membership`), it never
//! re-implements them.
//!
//! Map: `workload` (the JSON Lines format), `sim` (the simulator), `check` (the
//! invariant checkers), `faults` (random faults, `--faults`), `report` (figures and the
//! event log's digest), `line` (log lines without `core::fmt`), `plot` (the SVG report),
//! `timeline` (the simulator's event queue).

pub mod check;
pub mod faults;
pub mod generate;
mod line;
pub mod plot;
pub mod report;
pub mod sim;
mod timeline;
pub mod workload;

pub use agentmesh_actors as actors;
pub use faults::FaultSpec;
pub use plot::{draw_svg, PlotError};
pub use report::Report;
pub use sim::{Sim, SimConfig, Stopped};
pub use workload::{Event, EventKind, Workload, WorkloadError};
