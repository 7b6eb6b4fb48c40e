//! What a node sees, handed to a recorder as observations (`agentmesh node --record`
//! turns them into a workload the simulator replays). Observing never blocks the
//! node: a full recorder queue drops the observation and counts it.

use tokio::sync::mpsc;
use uuid::Uuid;

use agentmesh_runtime::transport::wire::payload::Capability;

/// Observations queued for the recorder at most.
pub const RECORDER_QUEUE: usize = 16_384;

/// Something the node saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// A member is up (joined, or came back).
    NodeUp(String),
    /// A member is down (crashed or left).
    NodeDown(String),
    /// An agent appeared in the registry (this node's or another's). The same agent
    /// may be observed again (resyncs); the recorder keeps the first.
    Registered {
        /// Its Agent ID.
        agent: u32,
        /// Its node.
        node: String,
        /// Its type.
        agent_type: String,
        /// What it offers.
        capabilities: Vec<Capability>,
        /// Its coordination group.
        group: u16,
    },
    /// A task was submitted to this node's coordinator.
    Submitted {
        /// The task.
        task: Uuid,
        /// The capability it needs.
        capability: String,
        /// Its priority.
        priority: u8,
        /// The submitting group.
        group: u16,
        /// Its segments.
        segments: u32,
    },
    /// A segment's result was accepted, this long after its attempt was allocated.
    SegmentDone {
        /// The task.
        task: Uuid,
        /// From ALLOCATE to the accepted result, in milliseconds.
        work_ms: u64,
    },
    /// An agent panicked running an attempt of this node's task (its REPORT said so).
    AgentPanicked {
        /// Its Agent ID.
        agent: u32,
    },
    /// A task ended (completed or failed).
    TaskEnded {
        /// The task.
        task: Uuid,
    },
}

/// Where a node's observations go.
#[derive(Clone, Debug)]
pub struct Recorder(mpsc::Sender<Observation>);

impl Recorder {
    /// A recorder and the receiving end of its bounded queue.
    pub fn new() -> (Recorder, mpsc::Receiver<Observation>) {
        let (tx, rx) = mpsc::channel(RECORDER_QUEUE);
        (Recorder(tx), rx)
    }

    /// Hands over an observation, or drops it (counted) if the queue is full.
    pub fn observe(&self, observation: Observation) {
        if self.0.try_send(observation).is_err() {
            metrics::counter!("agentmesh_record_dropped_total").increment(1);
        }
    }
}
