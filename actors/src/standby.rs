//! What a coordinator keeps as another coordinator's standby: copies of that
//! coordinator's open tasks (as submitted, and the results it accepted), to take over
//! if its node goes down, so that a task outlives the node it was submitted to. No I/O:
//! the coordinator actor feeds it checkpoints and node-down events.
//!
//! Bounded: at most `max_tasks` tasks and `max_bytes` of inputs and results; a task
//! past either limit is refused, and its coordinator stops sending it here.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use crate::service::{Checkpoint, CheckpointAck, OpenTask};

/// How much a standby holds at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandbyLimits {
    /// Tasks held, for all coordinators together.
    pub max_tasks: usize,
    /// Bytes of inputs and results held, for all coordinators together.
    pub max_bytes: usize,
}

impl Default for StandbyLimits {
    fn default() -> StandbyLimits {
        StandbyLimits {
            max_tasks: crate::coordinator::MAX_OPEN_TASKS,
            max_bytes: 1 << 30,
        }
    }
}

/// A task held for another coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldTask {
    /// The coordinator's node.
    pub primary: String,
    /// The task as submitted.
    pub open: OpenTask,
    /// The results that coordinator accepted, by segment.
    pub done: BTreeMap<u32, Vec<u8>>,
}

impl HeldTask {
    fn bytes(&self) -> usize {
        let inputs: usize = self.open.request.inputs.iter().map(|b| b.0.len()).sum();
        inputs + self.done.values().map(Vec::len).sum::<usize>()
    }
}

/// The tasks a coordinator holds as standby.
#[derive(Debug, Default)]
pub struct Standby {
    limits: StandbyLimits,
    held: HashMap<Uuid, HeldTask>,
    bytes: usize,
}

impl Standby {
    /// An empty standby within `limits`.
    pub fn new(limits: StandbyLimits) -> Standby {
        Standby {
            limits,
            ..Standby::default()
        }
    }

    /// Tasks held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether it holds `task`.
    pub fn holds(&self, task: Uuid) -> bool {
        self.held.contains_key(&task)
    }

    /// Takes a checkpoint from `checkpoint.primary`. `running` says whether a task
    /// runs here already (taken over earlier): such a task is not held again, and the
    /// answer says so, so that a coordinator that was only cut off stops running it.
    pub fn apply(
        &mut self,
        checkpoint: Checkpoint,
        running: impl Fn(Uuid) -> bool,
    ) -> CheckpointAck {
        let mut ack = CheckpointAck::default();
        let primary = checkpoint.primary;
        for part in checkpoint.tasks {
            let task = part.task;
            if running(task) {
                ack.taken_over.push(task);
                continue;
            }
            if part.ended {
                self.forget(task);
                continue;
            }
            if let Some(open) = part.open {
                self.forget(task);
                let held = HeldTask {
                    primary: primary.clone(),
                    open,
                    done: BTreeMap::new(),
                };
                let bytes = held.bytes();
                if self.held.len() >= self.limits.max_tasks
                    || self.bytes + bytes > self.limits.max_bytes
                {
                    ack.refused.push(task);
                    continue;
                }
                self.bytes += bytes;
                self.held.insert(task, held);
            }
            let Some(held) = self.held.get_mut(&task).filter(|h| h.primary == primary) else {
                ack.unknown.push(task);
                continue;
            };
            let segments = held.open.request.inputs.len();
            let mut over = false;
            for (segment, result) in part.done {
                if segment as usize >= segments || held.done.contains_key(&segment) {
                    continue;
                }
                if self.bytes + result.0.len() > self.limits.max_bytes {
                    over = true;
                    break;
                }
                self.bytes += result.0.len();
                held.done.insert(segment, result.0);
            }
            if over {
                self.forget(task);
                ack.refused.push(task);
            }
        }
        ack
    }

    /// Every task held for `node`, which is down: the caller runs them now.
    pub fn take_over(&mut self, node: &str) -> Vec<(Uuid, HeldTask)> {
        let tasks: Vec<Uuid> = self
            .held
            .iter()
            .filter(|(_, h)| h.primary == node)
            .map(|(t, _)| *t)
            .collect();
        let mut out: Vec<(Uuid, HeldTask)> = tasks
            .into_iter()
            .filter_map(|t| {
                let held = self.held.remove(&t)?;
                self.bytes -= held.bytes();
                Some((t, held))
            })
            .collect();
        // By id: the same order on every run, for logs and tests.
        out.sort_by_key(|(t, _)| *t);
        out
    }

    fn forget(&mut self, task: Uuid) {
        if let Some(held) = self.held.remove(&task) {
            self.bytes -= held.bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::serde_bytes_vec::Blob;
    use crate::service::{SubmitRequest, TaskCheckpoint};

    fn open(task: u128, segments: usize, input_bytes: usize) -> TaskCheckpoint {
        let inputs = vec![Blob(vec![1; input_bytes]); segments];
        TaskCheckpoint {
            task: Uuid::from_u128(task),
            open: Some(OpenTask {
                request: SubmitRequest::new("sleep", inputs).with_id(Uuid::from_u128(task)),
                generation: 0,
            }),
            done: Vec::new(),
            ended: false,
        }
    }

    fn done(task: u128, segments: &[(u32, usize)]) -> TaskCheckpoint {
        TaskCheckpoint {
            task: Uuid::from_u128(task),
            open: None,
            done: segments
                .iter()
                .map(|(s, n)| (*s, Blob(vec![2; *n])))
                .collect(),
            ended: false,
        }
    }

    fn from(primary: &str, tasks: Vec<TaskCheckpoint>) -> Checkpoint {
        Checkpoint {
            primary: primary.into(),
            tasks,
        }
    }

    /// A task is held from its start, gathers the results its coordinator accepted,
    /// is handed over when that coordinator's node goes down, and is forgotten when it
    /// ends; a task it never saw start is asked for again from its start.
    #[test]
    fn holds_tasks_until_they_end_or_their_coordinator_goes_down() {
        let mut s = Standby::new(StandbyLimits::default());
        let no = |_| false;
        let ack = s.apply(from("a", vec![open(1, 3, 10), open(2, 1, 10)]), no);
        assert_eq!(ack, CheckpointAck::default());
        let ack = s.apply(
            from(
                "a",
                vec![done(1, &[(0, 4), (2, 4), (9, 4)]), done(3, &[(0, 1)])],
            ),
            no,
        );
        assert_eq!(ack.unknown, vec![Uuid::from_u128(3)], "never opened here");
        let ended = TaskCheckpoint {
            ended: true,
            ..done(2, &[])
        };
        s.apply(from("a", vec![ended]), no);
        assert!(!s.holds(Uuid::from_u128(2)));
        assert!(s.take_over("b").is_empty());
        let taken = s.take_over("a");
        assert_eq!(taken.len(), 1);
        let (task, held) = &taken[0];
        assert_eq!(*task, Uuid::from_u128(1));
        assert_eq!(
            held.done.keys().copied().collect::<Vec<_>>(),
            vec![0, 2],
            "segment 9 is not one"
        );
        assert!(s.is_empty());
        assert_eq!(s.bytes, 0);
    }

    /// Results from a node that is not the task's coordinator are not taken, and a
    /// task this node runs itself (taken over earlier) is said to be so.
    #[test]
    fn only_the_tasks_coordinator_adds_to_it_and_a_task_run_here_is_not_held() {
        let mut s = Standby::new(StandbyLimits::default());
        s.apply(from("a", vec![open(1, 2, 1)]), |_| false);
        let ack = s.apply(from("b", vec![done(1, &[(0, 1)])]), |_| false);
        assert_eq!(ack.unknown, vec![Uuid::from_u128(1)]);
        let ack = s.apply(from("a", vec![open(7, 1, 1)]), |t| t == Uuid::from_u128(7));
        assert_eq!(ack.taken_over, vec![Uuid::from_u128(7)]);
        assert!(!s.holds(Uuid::from_u128(7)));
        assert!(s.take_over("a")[0].1.done.is_empty());
    }

    /// Past its task or byte limit a standby refuses, and frees what it refused.
    #[test]
    fn stays_within_its_limits() {
        let mut s = Standby::new(StandbyLimits {
            max_tasks: 2,
            max_bytes: 100,
        });
        let no = |_| false;
        let ack = s.apply(
            from("a", vec![open(1, 1, 10), open(2, 1, 10), open(3, 1, 10)]),
            no,
        );
        assert_eq!(ack.refused, vec![Uuid::from_u128(3)]);
        let ack = s.apply(from("a", vec![done(1, &[(0, 90)])]), no);
        assert_eq!(ack.refused, vec![Uuid::from_u128(1)]);
        assert!(!s.holds(Uuid::from_u128(1)));
        assert_eq!(s.bytes, 10);
        let ack = s.apply(from("a", vec![open(4, 1, 95)]), no);
        assert_eq!(ack.refused, vec![Uuid::from_u128(4)]);
        assert_eq!((s.len(), s.bytes), (1, 10));
    }
}
