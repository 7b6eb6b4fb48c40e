//! The node services' names and the requests and answers they exchange as actor
//! messages (ENVELOPE): what `agentmesh submit`, `status` and `policy apply` send, and
//! what nodes tell each other about their agents and the policy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use agentmesh_runtime::RemoteMessage;

use crate::policy::VersionedPolicy;
use crate::registry::{AgentRecord, RegistryDelta};

/// Discovery on every node: takes registry deltas from the others.
pub const DISCOVERY_SERVICE: &str = "agentmesh.discovery";
/// The coordinator on every node: takes submissions and answers status.
pub const COORDINATOR_SERVICE: &str = "agentmesh.coordinator";
/// Later pages of an ended task's results ([`ResultsRequest`]).
pub const RESULTS_SERVICE: &str = "agentmesh.coordinator.results";
/// The coordinator's ADJUST requests (`agentmesh adjust`).
pub const ADJUST_SERVICE: &str = "agentmesh.coordinator.adjust";
/// The status of agents and tasks on every node.
pub const AGENTS_SERVICE: &str = "agentmesh.agents";
/// The policy on every node: takes a new file, and policies spread by other nodes.
pub const POLICY_SERVICE: &str = "agentmesh.policy";
/// Where nodes spread policies (kept apart from `apply`, which answers).
pub const POLICY_SPREAD_SERVICE: &str = "agentmesh.policy.spread";
/// The coordinator as another coordinator's standby: keeps copies of its open tasks
/// and takes them over if its node goes down.
pub const STANDBY_SERVICE: &str = "agentmesh.coordinator.standby";

impl RemoteMessage for RegistryDelta {
    const KIND: &'static str = "agentmesh.registry.delta";

    fn priority(&self) -> u8 {
        160
    }
}

impl RemoteMessage for VersionedPolicy {
    const KIND: &'static str = "agentmesh.policy.spread";

    fn priority(&self) -> u8 {
        224
    }
}

/// A task, as submitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// The capability every segment needs.
    pub capability: String,
    /// Tags the agents must have too.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The task's priority, 0..=255 (default: its group's, from the policy).
    #[serde(default)]
    pub priority: Option<u8>,
    /// The coordination group the task acts in.
    #[serde(default)]
    pub group: u16,
    /// Each segment's input, as the agent decodes it (msgpack).
    pub inputs: Vec<serde_bytes_vec::Blob>,
    /// A name for people (shown by `status` and the demo), at most
    /// [`MAX_LABEL_LEN`] bytes.
    #[serde(default)]
    pub label: Option<String>,
    /// The task's id, chosen by the client so that it can submit again after losing
    /// its connection while it waited: a submission with the id of a task that runs on
    /// the coordinator waits for that task (in place of the waiter before it), one
    /// with the id of a task that ended there gets its outcome; the task does not run
    /// twice. Without it the coordinator picks one.
    #[serde(default)]
    pub task: Option<Uuid>,
    /// Only wait for the task `task` names, never start it: what a client sends
    /// again after losing its connection, so that a node restarted meanwhile (which
    /// no longer knows the task) says so instead of running it a second time.
    #[serde(default)]
    pub attach: bool,
    /// With `attach`: the node the task was submitted to, which the client lost, once
    /// every other member it listed has said it does not hold the task (that node went
    /// down before its standby had it). The node that the lost one would pick as its
    /// standby starts the task, if it holds that node down and has taken over its
    /// tasks, or holds it up in a later life than `adopt_from_life`; any other says it
    /// does not know the task. A coordinator allocates
    /// nothing of a task before its standby holds it, so nothing of it ran there.
    /// The named node itself starts it if it is in the life `adopt_from_life` names:
    /// then the submission never reached it (the client asks it so only when every
    /// member it listed answered that it does not hold the task).
    #[serde(default)]
    pub adopt_from: Option<String>,
    /// With `adopt_from`: how long the client has waited for the task since it first
    /// submitted it, in ms. An adopted task's figures (`TaskOutcome::elapsed_ms`)
    /// count from then, not from the adoption.
    #[serde(default)]
    pub waited_ms: u64,
    /// How long each attempt of a segment may run before the coordinator starts the
    /// segment again elsewhere, in ms, 1..=[`MAX_SEGMENT_TIMEOUT_MS`] (absent: the
    /// coordinator's, 30 s). Work that takes longer than that, a long model call say,
    /// needs a longer one, or each segment runs on several workers at once.
    #[serde(default)]
    pub segment_timeout_ms: Option<u64>,
    /// With `adopt_from`: the life of that node the task was submitted to (the high
    /// bits of its incarnation, `NodeId::life`), as the client saw it then. A node
    /// that holds `adopt_from` up in a later life may adopt the task without having
    /// taken over from it: that life has ended, and nothing of it runs (its standby,
    /// restarted too, never saw it). Absent: only a node that took over from it adopts.
    #[serde(default)]
    pub adopt_from_life: Option<u64>,
}

/// The longest task label accepted.
pub const MAX_LABEL_LEN: usize = 128;
/// The longest segment timeout a task may ask for: a day.
pub const MAX_SEGMENT_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;

impl SubmitRequest {
    /// A task of one segment per input, each needing `capability`: no tags, its
    /// group's priority, group 0, no label, and an id the coordinator picks. The
    /// `with_*` methods change the rest.
    pub fn new(capability: impl Into<String>, inputs: Vec<serde_bytes_vec::Blob>) -> Self {
        SubmitRequest {
            capability: capability.into(),
            tags: Vec::new(),
            priority: None,
            group: 0,
            inputs,
            label: None,
            task: None,
            attach: false,
            adopt_from: None,
            waited_ms: 0,
            segment_timeout_ms: None,
            adopt_from_life: None,
        }
    }

    /// How long each attempt of a segment may run before it is started again
    /// elsewhere (see [`SubmitRequest::segment_timeout_ms`]).
    pub fn with_segment_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.segment_timeout_ms = Some(timeout_ms);
        self
    }

    /// Tags the agents must offer too.
    pub fn with_tags<T: Into<String>>(mut self, tags: impl IntoIterator<Item = T>) -> Self {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// The task's priority, 0..=255 (higher goes first).
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    /// The coordination group the task acts in.
    pub fn with_group(mut self, group: u16) -> Self {
        self.group = group;
        self
    }

    /// A name for people, shown by `status` (at most [`MAX_LABEL_LEN`] bytes).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The task's id, for a client that may submit it again (see [`SubmitRequest::task`]).
    pub fn with_id(mut self, task: Uuid) -> Self {
        self.task = Some(task);
        self
    }
}

impl RemoteMessage for SubmitRequest {
    const KIND: &'static str = "agentmesh.task.submit";

    fn priority(&self) -> u8 {
        160
    }
}

/// `completed` or `failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Every segment has a result.
    Completed,
    /// The task cannot complete (see the reason).
    Failed,
}

/// How a task ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutcome {
    /// The task's id.
    pub task: Uuid,
    /// How it ended.
    pub status: TaskStatus,
    /// Segments in the task.
    pub segments: u32,
    /// Distinct segments completed.
    pub completed: u32,
    /// Result copies discarded because the segment already had one.
    pub duplicates_discarded: u64,
    /// Attempts started again elsewhere.
    pub reallocated: u64,
    /// From submission to the end, at the coordinator.
    pub elapsed_ms: u64,
    /// Why it failed.
    pub reason: Option<String>,
    /// Each segment's result (msgpack of the agent's output), in segment order;
    /// empty when the task failed. Sent to a client over the network, these are the
    /// results from [`results_from`](Self::results_from) on that fit in one message.
    pub results: Vec<serde_bytes_vec::Blob>,
    /// Only for an `attach`: this node does not know the task (the client may ask
    /// another node, where a standby may have taken it over).
    #[serde(default)]
    pub unknown: bool,
    /// The segment of the first of `results` (0 unless this is a later page).
    #[serde(default)]
    pub results_from: u32,
    /// More results follow those in `results`: ask for them with a
    /// [`ResultsRequest`] (`crate::pages`).
    #[serde(default)]
    pub more_results: bool,
}

impl TaskOutcome {
    /// A task of `segments` segments that failed before any ran, for `reason`.
    pub fn refused(task: Uuid, segments: u32, reason: String) -> TaskOutcome {
        TaskOutcome {
            task,
            status: TaskStatus::Failed,
            segments,
            completed: 0,
            duplicates_discarded: 0,
            reallocated: 0,
            elapsed_ms: 0,
            reason: Some(reason),
            results: Vec::new(),
            unknown: false,
            results_from: 0,
            more_results: false,
        }
    }

    /// Bytes of its results: what it costs to keep or send, about.
    pub fn result_bytes(&self) -> usize {
        self.results.iter().map(|r| r.0.len()).sum()
    }

    /// The same outcome with no results (for [`TaskCheckpoint::outcome_from_held`]).
    pub fn without_results(&self) -> TaskOutcome {
        TaskOutcome {
            task: self.task,
            status: self.status,
            segments: self.segments,
            completed: self.completed,
            duplicates_discarded: self.duplicates_discarded,
            reallocated: self.reallocated,
            elapsed_ms: self.elapsed_ms,
            reason: self.reason.clone(),
            results: Vec::new(),
            unknown: self.unknown,
            results_from: 0,
            more_results: false,
        }
    }
}

impl RemoteMessage for TaskOutcome {
    const KIND: &'static str = "agentmesh.task.submit";
}

/// Asks for an ended task's results from segment `from` on, after an outcome that
/// said [`TaskOutcome::more_results`]: answered with the next page, from the
/// outcome the node keeps as the task's coordinator or its standby, or with `unknown`
/// if it keeps none. It never starts a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultsRequest {
    /// The task.
    pub task: Uuid,
    /// The first segment whose result is wanted.
    pub from: u32,
}

impl RemoteMessage for ResultsRequest {
    const KIND: &'static str = "agentmesh.task.results";
}

/// What a coordinator sends its standby on another node: its open tasks as they were
/// submitted, then each segment's accepted result, then their end. The standby takes
/// the tasks over if the coordinator's node goes down (`standby.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The coordinator's node: its tasks are taken over when it goes down.
    pub primary: String,
    /// What changed in each task since the last checkpoint the standby answered.
    pub tasks: Vec<TaskCheckpoint>,
    /// The sending coordinator's run: drawn at random when it starts (never 0). With
    /// `number`, it lets the standby drop a checkpoint that arrives after a later one
    /// of the same run (across connections: a retired duplicate's frames, say), which
    /// would otherwise take back what the later one gave. 0 or absent: unnumbered (an
    /// older node), always applied.
    #[serde(default)]
    pub incarnation: u64,
    /// The checkpoint's number in its run, rising with each sent (to any standby).
    #[serde(default)]
    pub number: u64,
    /// Which life of its node the sender is (`NodeId::life`): when the node is up
    /// again in a later life (it restarted), the tasks of the lives before have no
    /// coordinator, and the standby takes them over at once. 0 or absent: unknown (an
    /// older node).
    #[serde(default)]
    pub life: u64,
}

impl RemoteMessage for Checkpoint {
    const KIND: &'static str = "agentmesh.coordinator.checkpoint";

    fn priority(&self) -> u8 {
        160
    }
}

/// One task's part of a [`Checkpoint`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCheckpoint {
    /// The task.
    pub task: Uuid,
    /// The task as submitted (its id and its priority set), in the first checkpoint
    /// of the task to this standby: what the standby holds starts again from here.
    pub open: Option<OpenTask>,
    /// Segments whose results were accepted since, with those results.
    pub done: Vec<(u32, serde_bytes_vec::Blob)>,
    /// The standby forgets the task: it ended, or moved to another standby.
    pub ended: bool,
    /// With `ended`: the task ended at its coordinator (it did not move). The standby
    /// remembers that for a while, so that a client that lost the coordinator before
    /// the outcome reached it is told the outcome is lost, not have the task adopted
    /// and run again. Absent from older nodes: false.
    #[serde(default)]
    pub finished: bool,
    /// With `finished`: the task's outcome, if its coordinator still had it and it
    /// fitted the checkpoint. The standby gives it to a client that lost the
    /// coordinator before the outcome reached it.
    #[serde(default)]
    pub outcome: Option<TaskOutcome>,
    /// With `finished`, instead of `outcome`: the task's outcome with its results left
    /// out. They are the results this standby holds for the task from the checkpoints
    /// before, with those in `done` (accepted since the last checkpoint it answered):
    /// the end does not send again what the standby has. A standby that lacks any of
    /// them keeps no outcome. A separate key, so that an older standby, which does not
    /// know it, keeps no outcome rather than one without results.
    #[serde(default)]
    pub outcome_from_held: Option<TaskOutcome>,
    /// The task's figures so far at its coordinator (absent from older nodes: zero).
    #[serde(default)]
    pub so_far: SoFar,
    /// The task's priority now, which `agentmesh adjust` may have changed since its
    /// `open`: a coordinator that takes the task over runs it at this one. Absent
    /// (older nodes, end notices): as in its `open`.
    #[serde(default)]
    pub priority: Option<u8>,
    /// The parameters `agentmesh adjust` set for the task so far: a coordinator that
    /// takes the task over starts its attempts with them. They go with the task's
    /// start and when they changed since the standby last answered for them. Absent
    /// (then, older nodes, end notices, none set): as they were.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
}

/// The Stream Prio of a task's ALLOCATEs, and the queue priority of its attempts at a
/// worker: in the coordination lane (128..=191), higher for a task of higher priority.
pub fn allocate_prio(task_priority: u8) -> u8 {
    128 + task_priority / 4
}

/// Bytes of a task's parameters (`agentmesh adjust`), names and values together.
pub fn params_bytes(params: &BTreeMap<String, String>) -> usize {
    params.iter().map(|(k, v)| k.len() + v.len()).sum()
}

impl TaskCheckpoint {
    /// The part of a task that runs, or whose end waits for the results its standby
    /// lacks: its start if `open` is given, results accepted, its figures and priority.
    pub fn running(
        task: Uuid,
        open: Option<OpenTask>,
        done: Vec<(u32, serde_bytes_vec::Blob)>,
        so_far: SoFar,
        priority: Option<u8>,
    ) -> TaskCheckpoint {
        TaskCheckpoint {
            task,
            open,
            done,
            ended: false,
            finished: false,
            outcome: None,
            outcome_from_held: None,
            so_far,
            priority,
            params: BTreeMap::new(),
        }
    }

    /// Bytes of segment results it carries: in `done`, and in an outcome.
    pub fn result_bytes(&self) -> usize {
        done_bytes(&self.done) + self.outcome.as_ref().map_or(0, TaskOutcome::result_bytes)
    }
}

/// Bytes `value` takes as the mesh sends it (MessagePack with field names), counted
/// without writing them anywhere: a blob costs an addition, not a copy.
pub(crate) fn encoded_len<T: Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match rmp_serde::encode::write_named(&mut count, value) {
        Ok(()) => count.0,
        // Nothing the coordinator builds fails to encode; counted as no room at all.
        Err(_) => usize::MAX,
    }
}

/// Bytes of the results in a checkpoint's `done`.
pub(crate) fn done_bytes(done: &[(u32, serde_bytes_vec::Blob)]) -> usize {
    done.iter().map(|(_, r)| r.0.len()).sum()
}

/// A task's figures so far, carried in checkpoints so that a standby that takes the
/// task over reports them with its own: the outcome counts from the submission, not
/// from the takeover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoFar {
    /// Since the task was submitted.
    pub elapsed_ms: u64,
    /// Attempts started again elsewhere.
    pub reallocated: u64,
    /// Result copies discarded.
    pub duplicates_discarded: u64,
    /// Attempts running (at this coordinator alone): if it goes down, those are
    /// started again by the one that takes the task over.
    #[serde(default)]
    pub running: u32,
}

/// The highest [`OpenTask::generation`] a standby holds a task at (it refuses one
/// above): the coordinator that takes such a task over numbers its attempts from
/// `(generation + 1) << 24`, and `255 << 24` starts the last such range within a u32.
pub const MAX_GENERATION: u32 = 254;

/// A task as a standby holds it from its start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenTask {
    /// The submission, with `task` and `priority` filled in.
    pub request: SubmitRequest,
    /// How many coordinators ran the task before this one took it over (0: the
    /// one it was submitted to). A coordinator that takes a task over numbers its
    /// attempts from `(generation + 1) << 24`, apart from any attempt of the ones before.
    pub generation: u32,
}

/// A standby's answer to a [`Checkpoint`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointAck {
    /// Tasks it does not hold (it restarted, or never got their start): to be sent
    /// again from their start.
    pub unknown: Vec<Uuid>,
    /// Tasks it cannot hold (at its limits): not sent to it again.
    pub refused: Vec<Uuid>,
    /// Tasks it runs itself: it took them over when it held the sender for down.
    pub taken_over: Vec<Uuid>,
    /// How long from receiving the checkpoint it promises not to take over any of the
    /// sender's tasks (its lease; `lease.rs`). 0: no promise (an older node).
    #[serde(default)]
    pub lease_ms: u64,
}

impl RemoteMessage for CheckpointAck {
    const KIND: &'static str = "agentmesh.coordinator.checkpoint.ack";
}

/// A request for the agents and tasks a node knows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentsRequest {}

impl RemoteMessage for AgentsRequest {
    const KIND: &'static str = "agentmesh.agents.status";
}

/// A task still running at a coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSummary {
    /// The task's id.
    pub task: Uuid,
    /// The capability it needs.
    pub capability: String,
    /// The label it was submitted with.
    #[serde(default)]
    pub label: Option<String>,
    /// Its priority.
    pub priority: u8,
    /// Its group.
    pub group: u16,
    /// Segments in it.
    pub segments: u32,
    /// Segments completed so far.
    pub completed: u32,
    /// Reallocations so far.
    pub reallocated: u64,
    /// Progress of the whole task in thousandths (done segments, plus running ones by
    /// their last REPORT).
    pub progress_permille: u16,
    /// Since submission.
    pub elapsed_ms: u64,
}

/// The agents a node knows (cluster-wide) and the tasks its coordinator runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentsStatus {
    /// Every agent in the replicated registry, by Agent ID.
    pub agents: Vec<AgentRecord>,
    /// Tasks running at this node's coordinator.
    pub tasks: Vec<TaskSummary>,
    /// The policy this node holds (absent from nodes older than this field).
    #[serde(default)]
    pub policy: PolicyInForce,
    /// Agents left out of `agents` so that the answer fits in one message (absent: 0).
    #[serde(default)]
    pub agents_not_listed: u64,
}

impl AgentsStatus {
    /// Leaves out the agents past those that fit, with the rest, in a message of
    /// `max_message_bytes` (less 64 KiB), and counts them in `agents_not_listed`.
    /// Records are counted at their most (`registry::record_bytes`): about 160 bytes
    /// for a built-in agent, so a 16 MiB message lists some 100,000.
    pub fn fit(&mut self, max_message_bytes: usize) {
        let rest = AgentsStatus {
            agents: Vec::new(),
            tasks: self.tasks.clone(),
            policy: self.policy.clone(),
            agents_not_listed: u64::MAX,
        };
        let fixed = rmp_serde::to_vec_named(&rest).map_or(usize::MAX, |b| b.len());
        let mut room = max_message_bytes.saturating_sub(64 * 1024 + fixed);
        let listed = self
            .agents
            .iter()
            .take_while(|r| {
                let len = crate::registry::record_bytes(r);
                let fits = len <= room;
                room = room.saturating_sub(len);
                fits
            })
            .count();
        self.agents_not_listed += (self.agents.len() - listed) as u64;
        self.agents.truncate(listed);
    }
}

/// Which policy a node holds: after `agentmesh policy apply`, every node should show
/// the version it printed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInForce {
    /// 0 for the node's start-up file (or none); else Unix ms when it was applied.
    pub version: u64,
    /// The node it was applied at (for version 0: this node).
    pub origin: String,
    /// Groups with rules.
    pub groups: usize,
}

impl RemoteMessage for AgentsStatus {
    const KIND: &'static str = "agentmesh.agents.status";
}

/// A new policy file for `agentmesh policy apply`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyPolicy {
    /// The file's text (TOML).
    pub text: String,
}

impl RemoteMessage for ApplyPolicy {
    const KIND: &'static str = "agentmesh.policy.apply";

    fn priority(&self) -> u8 {
        224
    }
}

/// The policy now in force at the node asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyApplied {
    /// Its version (Unix ms when it was applied).
    pub version: u64,
    /// The node it was applied at.
    pub origin: String,
    /// Groups with rules.
    pub groups: usize,
    /// Why the file was refused (the policy above stays in force).
    pub error: Option<String>,
}

impl RemoteMessage for PolicyApplied {
    const KIND: &'static str = "agentmesh.policy.apply";
}

/// Byte strings carried as msgpack `bin` (not arrays of integers).
pub mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// A byte string that serializes as msgpack `bin`.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Blob(pub Vec<u8>);

    impl Serialize for Blob {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for Blob {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Blob, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = Blob;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
                    Ok(Blob(v.to_vec()))
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
                    Ok(Blob(v))
                }
            }
            d.deserialize_bytes(V)
        }
    }
}

/// Steers a running task (`agentmesh adjust`): new parameters and priority go to
/// every attempt running; `cancel` ends the task as failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustRequest {
    /// The task.
    pub task: Uuid,
    /// Parameters to set, by name.
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, String>,
    /// A new priority.
    #[serde(default)]
    pub priority: Option<u8>,
    /// Stop the task.
    #[serde(default)]
    pub cancel: bool,
}

impl RemoteMessage for AdjustRequest {
    const KIND: &'static str = "agentmesh.task.adjust";

    fn priority(&self) -> u8 {
        224
    }
}

/// What an ADJUST request reached.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustAnswer {
    /// ADJUST frames sent (one per running attempt).
    pub sent: u32,
    /// Why nothing was done, if so.
    pub error: Option<String>,
    /// The task does not run here (with `error`): another member may coordinate it,
    /// one that took it over, say. Absent from older nodes: false.
    #[serde(default)]
    pub unknown: bool,
}

impl RemoteMessage for AdjustAnswer {
    const KIND: &'static str = "agentmesh.task.adjust";
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status answer lists the agents that fit in one message and counts the rest.
    #[test]
    fn a_status_lists_the_agents_that_fit_and_counts_the_rest() {
        use agentmesh_runtime::transport::wire::payload::{Capability, Health};
        let capabilities: std::sync::Arc<[Capability]> = vec![Capability {
            name: "sleep".into(),
            version: "0.1.0".into(),
            tags: vec!["builtin".into()],
            capacity: 1,
        }]
        .into();
        let status = AgentsStatus {
            agents: (0..1_000)
                .map(|agent| AgentRecord {
                    agent,
                    node: "node-1".into(),
                    agent_type: "sleep".into(),
                    group: 0,
                    capabilities: capabilities.clone(),
                    load: 0,
                    health: Health::Ok,
                })
                .collect(),
            tasks: Vec::new(),
            policy: PolicyInForce::default(),
            agents_not_listed: 0,
        };
        let mut all = status.clone();
        all.fit(16 << 20);
        assert_eq!(all, status);
        let mut some = status.clone();
        some.fit(64 * 1024 + 50_000);
        let listed = some.agents.len();
        assert!((200..1_000).contains(&listed), "{listed} listed");
        assert_eq!(some.agents[..], status.agents[..listed]);
        assert_eq!(some.agents_not_listed, 1_000 - listed as u64);
        assert!(rmp_serde::to_vec_named(&some).unwrap().len() <= 50_000);
    }

    /// A checkpoint from a node that does not number them (encoded as nodes encode
    /// messages, fields by name) reads as unnumbered, which a standby always applies.
    #[test]
    fn a_checkpoint_without_numbers_reads_as_unnumbered() {
        #[derive(Serialize)]
        struct Unnumbered {
            primary: String,
            tasks: Vec<TaskCheckpoint>,
        }
        let bytes = rmp_serde::to_vec_named(&Unnumbered {
            primary: "n0".into(),
            tasks: Vec::new(),
        })
        .unwrap();
        let read: Checkpoint = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(
            (read.primary.as_str(), read.incarnation, read.number),
            ("n0", 0, 0)
        );
    }
}
