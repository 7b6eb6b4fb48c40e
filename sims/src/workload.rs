//! The workload format: what happened to a cluster, one event per line (JSON Lines),
//! versioned, with times relative to the start. `sims/README.md` documents it; the
//! recorder writes it, the simulator replays it.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

/// The format version this build reads and writes.
pub const VERSION: u32 = 1;

/// Longest line accepted, in bytes (a line is one event; none needs more).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The first line of a workload file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// The format version: [`VERSION`].
    pub agentmesh_workload: u32,
    /// A short name.
    pub name: String,
    /// What it is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// One event and when it happened, in milliseconds since the start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the start; never less than the line before.
    pub t: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

fn one() -> u32 {
    1
}

fn default_priority() -> u8 {
    128
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// What can happen to a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum EventKind {
    /// A node starts and joins the cluster (through any node already up).
    NodeJoin {
        /// Its name.
        node: String,
    },
    /// A node leaves cleanly (the others see it down at once).
    NodeLeave {
        /// Its name.
        node: String,
    },
    /// A node dies without a word (SIGKILL, power loss).
    NodeCrash {
        /// Its name.
        node: String,
    },
    /// A node that crashed or left starts again, with the agents it had.
    NodeRestart {
        /// Its name.
        node: String,
    },
    /// Agents register on a node.
    Register {
        /// The node.
        node: String,
        /// Their type.
        agent_type: String,
        /// Capability names they offer.
        capabilities: Vec<String>,
        /// Tags on every capability.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tags: Vec<String>,
        /// Segments each runs at once.
        #[serde(default = "one", skip_serializing_if = "is_one")]
        capacity: u32,
        /// Their coordination group.
        #[serde(default, skip_serializing_if = "is_zero")]
        group: u16,
        /// How many such agents (one line for many alike).
        #[serde(default = "one", skip_serializing_if = "is_one")]
        count: u32,
    },
    /// A task is submitted to a node's coordinator.
    Submit {
        /// The node.
        node: String,
        /// The capability it needs.
        capability: String,
        /// Its priority (0..=255, higher first).
        #[serde(default = "default_priority")]
        priority: u8,
        /// The submitting coordination group.
        #[serde(default, skip_serializing_if = "is_zero")]
        group: u16,
        /// Segments it is split into.
        segments: u32,
        /// Work time per segment, in milliseconds.
        work_ms: u64,
    },
    /// The agent of this type on this node panics in the middle of a segment.
    AgentPanic {
        /// The node.
        node: String,
        /// The agent's type.
        agent_type: String,
    },
    /// The network splits: nodes on different sides cannot reach each other (nodes
    /// not listed form one more side).
    Partition {
        /// The sides.
        sides: Vec<Vec<String>>,
    },
    /// Every partition heals.
    Heal,
    /// Loss and latency change, for every link.
    Net {
        /// Packets lost, in thousandths.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss_permille: Option<u32>,
        /// One-way latency, in microseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latency_us: Option<u64>,
    },
}

/// A whole workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Its first line.
    pub header: Header,
    /// Its events, in time order.
    pub events: Vec<Event>,
}

/// Why a workload file was refused.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// It could not be read.
    #[error("cannot read the workload: {0}")]
    Io(#[from] std::io::Error),
    /// It has no header line.
    #[error("the workload is empty (its first line must be the header)")]
    Empty,
    /// A line is not what the format says.
    #[error("line {line}: {why}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// Written by a newer (or unknown) version of the format.
    #[error("workload format version {0} is not supported (this build reads {VERSION})")]
    Version(u32),
}

impl Workload {
    /// A workload with no events yet.
    pub fn new(name: &str, description: &str) -> Workload {
        Workload {
            header: Header {
                agentmesh_workload: VERSION,
                name: name.to_string(),
                description: description.to_string(),
            },
            events: Vec::new(),
        }
    }

    /// Reads and checks a workload: the header, each event's shape, times that never
    /// go back, and nodes named only once they have joined.
    pub fn read(input: impl BufRead) -> Result<Workload, WorkloadError> {
        let mut lines = input.lines().enumerate().filter_map(|(i, l)| match l {
            Ok(l) if l.trim().is_empty() => None,
            other => Some((i + 1, other)),
        });
        let (n, first) = lines.next().ok_or(WorkloadError::Empty)?;
        let first = first?;
        let header: Header = serde_json::from_str(&first).map_err(|e| WorkloadError::Line {
            line: n,
            why: format!("not a workload header: {e}"),
        })?;
        if header.agentmesh_workload != VERSION {
            return Err(WorkloadError::Version(header.agentmesh_workload));
        }
        let mut workload = Workload {
            header,
            events: Vec::new(),
        };
        let mut known: BTreeSet<String> = BTreeSet::new();
        let mut last_t = 0;
        for (line, text) in lines {
            let text = text?;
            let bad = |why: String| WorkloadError::Line { line, why };
            if text.len() > MAX_LINE_BYTES {
                return Err(bad(format!("longer than {MAX_LINE_BYTES} bytes")));
            }
            let event: Event = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            if event.t < last_t {
                return Err(bad(format!(
                    "time {} ms is before the previous event's {last_t} ms",
                    event.t
                )));
            }
            last_t = event.t;
            check_event(&event.kind, &mut known).map_err(bad)?;
            workload.events.push(event);
        }
        Ok(workload)
    }

    /// Writes the workload in the format [`Workload::read`] reads.
    pub fn write(&self, mut out: impl Write) -> std::io::Result<()> {
        serde_json::to_writer(&mut out, &self.header)?;
        out.write_all(b"\n")?;
        for e in &self.events {
            serde_json::to_writer(&mut out, e)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Time of the last event.
    pub fn duration_ms(&self) -> u64 {
        self.events.last().map_or(0, |e| e.t)
    }
}

/// Checks one event against the nodes seen so far.
fn check_event(kind: &EventKind, known: &mut BTreeSet<String>) -> Result<(), String> {
    let need = |node: &String| {
        if known.contains(node) {
            Ok(())
        } else {
            Err(format!("node {node:?} has not joined yet"))
        }
    };
    match kind {
        EventKind::NodeJoin { node } => {
            if node.is_empty() {
                return Err("a node needs a name".into());
            }
            if !known.insert(node.clone()) {
                return Err(format!("node {node:?} joined twice (use node_restart)"));
            }
            Ok(())
        }
        EventKind::NodeLeave { node }
        | EventKind::NodeCrash { node }
        | EventKind::NodeRestart { node }
        | EventKind::AgentPanic { node, .. } => need(node),
        EventKind::Register {
            node,
            capabilities,
            capacity,
            count,
            ..
        } => {
            need(node)?;
            if capabilities.is_empty() {
                return Err("an agent needs at least one capability".into());
            }
            if *capacity == 0 || *count == 0 {
                return Err("capacity and count must be at least 1".into());
            }
            Ok(())
        }
        EventKind::Submit { node, segments, .. } => {
            need(node)?;
            if *segments == 0 {
                return Err("a task needs at least one segment".into());
            }
            Ok(())
        }
        EventKind::Partition { sides } => sides.iter().flatten().try_for_each(need),
        EventKind::Heal => Ok(()),
        EventKind::Net { loss_permille, .. } => match loss_permille {
            Some(l) if *l > 1000 => Err(format!("loss_permille {l} is over 1000")),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SMALL: &str = r#"{"agentmesh_workload":1,"name":"t"}
{"t":0,"ev":"node_join","node":"a"}
{"t":0,"ev":"register","node":"a","agent_type":"sleep","capabilities":["sleep"],"count":3}
{"t":10,"ev":"submit","node":"a","capability":"sleep","segments":4,"work_ms":20}
{"t":20,"ev":"net","loss_permille":20}
"#;

    #[test]
    fn a_workload_reads_and_writes_back_the_same() {
        let w = Workload::read(SMALL.as_bytes()).unwrap();
        assert_eq!(w.events.len(), 4);
        let mut out = Vec::new();
        w.write(&mut out).unwrap();
        assert_eq!(Workload::read(&out[..]).unwrap(), w);
    }

    #[test]
    fn bad_lines_are_refused_with_their_line_number() {
        let cases = [
            ("", "empty"),
            ("{\"agentmesh_workload\":2,\"name\":\"x\"}\n", "version 2"),
            ("{\"name\":\"x\"}\n", "line 1"),
            (
                "{\"agentmesh_workload\":1,\"name\":\"x\"}\n{\"t\":0,\"ev\":\"node_crash\",\"node\":\"a\"}\n",
                "line 2: node \"a\" has not joined",
            ),
            (
                "{\"agentmesh_workload\":1,\"name\":\"x\"}\n{\"t\":5,\"ev\":\"node_join\",\"node\":\"a\"}\n{\"t\":4,\"ev\":\"heal\"}\n",
                "line 3: time 4 ms is before",
            ),
            (
                "{\"agentmesh_workload\":1,\"name\":\"x\"}\n{\"t\":0,\"ev\":\"explode\"}\n",
                "line 2: unknown variant",
            ),
            (
                "{\"agentmesh_workload\":1,\"name\":\"x\"}\nnot json\n",
                "line 2",
            ),
        ];
        for (text, expected) in cases {
            let err = Workload::read(text.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
