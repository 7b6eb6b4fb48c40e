//! The `Agent` API: what a user implements to put an AI agent on the mesh. Typed input
//! and output (serde), the capabilities it offers, and an async `work` method that gets
//! one segment and a context for progress and adjustments.

use std::collections::BTreeMap;
use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use agentmesh_runtime::transport::wire::payload::{Capability, MAX_HASH_LEN};
use uuid::Uuid;

use crate::worker::WorkerEvent;

/// An agent: the unit of work on the mesh. One value serves every segment its worker
/// runs; replicas of a worker share it.
pub trait Agent: Send + Sync + 'static {
    /// A segment's input.
    type Input: DeserializeOwned + Send + 'static;
    /// A segment's result.
    type Output: Serialize + Send + 'static;

    /// The agent's type name, as discovery lists it (e.g. `"summarizer"`).
    fn agent_type(&self) -> &str;

    /// What it can do.
    fn capabilities(&self) -> Vec<Capability>;

    /// Works on one segment. Report progress and watch for adjustments through `ctx`.
    /// An error fails this attempt (the coordinator may retry it elsewhere); a panic
    /// does too, and restarts the replica.
    fn work(
        &self,
        input: Self::Input,
        ctx: &mut SegmentContext,
    ) -> impl Future<Output = Result<Self::Output, AgentError>> + Send;
}

/// Why an agent could not finish a segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AgentError(pub String);

impl AgentError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> AgentError {
        AgentError(message.into())
    }
}

/// What the coordinator changed about a running segment (ADJUST).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Adjustment {
    /// Parameters set so far, by name: an attempt starts with those set for its task
    /// before it was allocated.
    pub params: BTreeMap<String, String>,
    /// The priority the latest ADJUST that set one gave, if any did since this attempt
    /// was allocated (its allocation's priority stands otherwise): an ADJUST that sets
    /// only parameters leaves it.
    pub priority: Option<u8>,
    /// Stop: the result is no longer wanted.
    pub cancelled: bool,
}

/// What another worker of the same task shared (SYNC), or its answer to ours
/// (SYNC_ACK).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncEvent {
    /// Another worker's intermediate result.
    Sync {
        /// Its Agent ID.
        from: u32,
        /// Its segment.
        segment: u32,
        /// Its sync round.
        round: u32,
        /// Hash of its intermediate result.
        hash: Vec<u8>,
        /// The data it sent along.
        body: Vec<u8>,
    },
    /// Another worker's answer to one of our SYNCs.
    Ack {
        /// Its Agent ID.
        from: u32,
        /// The round answered.
        round: u32,
        /// True if its own hash for that round matched ours.
        agreed: bool,
    },
}

/// One segment's view of the mesh while an agent works on it.
pub struct SegmentContext {
    task: Uuid,
    segment: u32,
    attempt: u32,
    progress: watch::Sender<u16>,
    adjustments: watch::Receiver<Adjustment>,
    syncs: mpsc::Receiver<SyncEvent>,
    events: mpsc::Sender<WorkerEvent>,
}

impl SegmentContext {
    pub(crate) fn new(
        (task, segment, attempt): (Uuid, u32, u32),
        progress: watch::Sender<u16>,
        adjustments: watch::Receiver<Adjustment>,
        syncs: mpsc::Receiver<SyncEvent>,
        events: mpsc::Sender<WorkerEvent>,
    ) -> SegmentContext {
        SegmentContext {
            task,
            segment,
            attempt,
            progress,
            adjustments,
            syncs,
            events,
        }
    }

    /// The task this segment belongs to.
    pub fn task(&self) -> Uuid {
        self.task
    }

    /// Shares an intermediate result with the other workers of this task (SYNC, sent
    /// worker to worker, never through the coordinator). `hash` is cut to 64 bytes.
    /// Workers whose own hash for `round` matches answer `agreed` (see
    /// [`SegmentContext::next_sync`]).
    pub async fn sync(&self, round: u32, hash: &[u8], body: &[u8]) {
        let hash = hash[..hash.len().min(MAX_HASH_LEN)].to_vec();
        let _ = self
            .events
            .send(WorkerEvent::Sync {
                allocation: (self.task, self.segment, self.attempt),
                round,
                hash,
                body: body.to_vec(),
            })
            .await;
    }

    /// Waits for the next SYNC or SYNC_ACK from another worker of this task.
    pub async fn next_sync(&mut self) -> Option<SyncEvent> {
        self.syncs.recv().await
    }

    /// The next SYNC or SYNC_ACK if one is waiting.
    pub fn try_next_sync(&mut self) -> Option<SyncEvent> {
        self.syncs.try_recv().ok()
    }

    /// The segment's index in its task.
    pub fn segment(&self) -> u32 {
        self.segment
    }

    /// Which attempt this is (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Reports progress in thousandths (0..=1000; more is taken as 1000). Call it as
    /// often as you like: the latest value goes to the coordinator at most every
    /// 200 ms ([`crate::worker::PROGRESS_EVERY`]).
    pub fn progress(&self, permille: u16) {
        self.progress.send_replace(permille.min(1000));
    }

    /// The latest adjustment.
    pub fn adjustment(&self) -> Adjustment {
        self.adjustments.borrow().clone()
    }

    /// True once the coordinator cancelled this segment.
    pub fn is_cancelled(&self) -> bool {
        self.adjustments.borrow().cancelled
    }

    /// Waits for the next adjustment (for agents that want to react at once). An
    /// attempt that starts with its task's parameters already set (by ADJUSTs before it
    /// was allocated) gets them from its first call at once.
    pub async fn adjusted(&mut self) -> Adjustment {
        let _ = self.adjustments.changed().await;
        self.adjustments.borrow_and_update().clone()
    }
}
