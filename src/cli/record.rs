//! `agentmesh node --record FILE`: turns what the node observes into a workload
//! (sims/README.md's format) that `agentmesh sim run` replays. The file is rewritten
//! whole, atomically, at most once a second while something changed and once more at
//! shutdown, so a crash of the recording node loses at most the last second.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::warn;
use uuid::Uuid;

use crate::actors::record::Observation;
use crate::sims::workload::{Event, EventKind, Workload};

/// Events kept at most; past that the recording stops growing (said once in the log).
const MAX_EVENTS: usize = 1_000_000;

struct OpenTask {
    index: usize,
    done: u64,
    work_ms: u64,
}

/// The workload being recorded.
struct Recording {
    workload: Workload,
    start: tokio::time::Instant,
    up: BTreeSet<String>,
    known: BTreeSet<String>,
    /// Agents seen registered: their node and type.
    agents: BTreeMap<u32, (String, String)>,
    open: BTreeMap<Uuid, OpenTask>,
    full: bool,
}

impl Recording {
    fn new(me: &str) -> Recording {
        let mut r = Recording {
            workload: Workload::new(
                &format!("recorded at {me}"),
                "what one live node saw (agentmesh node --record)",
            ),
            start: tokio::time::Instant::now(),
            up: BTreeSet::new(),
            known: BTreeSet::new(),
            agents: BTreeMap::new(),
            open: BTreeMap::new(),
            full: false,
        };
        r.join(me);
        r
    }

    fn push(&mut self, kind: EventKind) -> Option<usize> {
        if self.workload.events.len() >= MAX_EVENTS {
            if !self.full {
                warn!(
                    limit = MAX_EVENTS,
                    "the recording is full; later events are not recorded"
                );
                self.full = true;
            }
            return None;
        }
        let t = self.start.elapsed().as_millis() as u64;
        self.workload.events.push(Event { t, kind });
        Some(self.workload.events.len() - 1)
    }

    fn join(&mut self, node: &str) {
        if self.up.contains(node) {
            return;
        }
        let kind = if self.known.contains(node) {
            EventKind::NodeRestart { node: node.into() }
        } else {
            EventKind::NodeJoin { node: node.into() }
        };
        self.known.insert(node.to_string());
        self.up.insert(node.to_string());
        self.push(kind);
    }

    fn observe(&mut self, o: Observation) {
        match o {
            Observation::NodeUp(node) => self.join(&node),
            Observation::NodeDown(node) => {
                if self.up.remove(&node) {
                    self.push(EventKind::NodeCrash { node });
                }
            }
            Observation::Registered {
                agent,
                node,
                agent_type,
                capabilities,
                group,
            } => {
                match self.agents.entry(agent) {
                    Entry::Occupied(_) => return,
                    Entry::Vacant(new) => new.insert((node.clone(), agent_type.clone())),
                };
                self.join(&node);
                self.push(EventKind::Register {
                    node,
                    agent_type,
                    tags: capabilities
                        .first()
                        .map(|c| c.tags.clone())
                        .unwrap_or_default(),
                    capacity: capabilities
                        .iter()
                        .map(|c| c.capacity)
                        .max()
                        .unwrap_or(1)
                        .max(1),
                    capabilities: capabilities.into_iter().map(|c| c.name).collect(),
                    group,
                    count: 1,
                });
            }
            Observation::Submitted {
                task,
                capability,
                priority,
                group,
                segments,
            } => {
                let node = self.workload.events[0].kind.clone();
                let EventKind::NodeJoin { node } = node else {
                    return;
                };
                if let Some(index) = self.push(EventKind::Submit {
                    node,
                    capability,
                    priority,
                    group,
                    segments: segments.max(1),
                    work_ms: 0,
                }) {
                    self.open.insert(
                        task,
                        OpenTask {
                            index,
                            done: 0,
                            work_ms: 0,
                        },
                    );
                }
            }
            Observation::SegmentDone { task, work_ms } => {
                if let Some(t) = self.open.get_mut(&task) {
                    t.done += 1;
                    t.work_ms += work_ms;
                    let mean = t.work_ms / t.done;
                    if let EventKind::Submit { work_ms, .. } =
                        &mut self.workload.events[t.index].kind
                    {
                        *work_ms = mean;
                    }
                }
            }
            Observation::AgentPanicked { agent } => {
                if let Some((node, agent_type)) = self.agents.get(&agent).cloned() {
                    self.push(EventKind::AgentPanic { node, agent_type });
                }
            }
            Observation::TaskEnded { task } => {
                self.open.remove(&task);
            }
        }
    }
}

fn write(path: &Path, workload: &Workload) -> std::io::Result<()> {
    let tmp = path.with_extension("recording");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    workload.write(&mut out)?;
    std::io::Write::flush(&mut out)?;
    drop(out);
    std::fs::rename(tmp, path)
}

/// Records until `finish` fires, then writes the file a last time.
pub async fn record(
    me: String,
    path: PathBuf,
    mut observations: mpsc::Receiver<Observation>,
    mut finish: oneshot::Receiver<()>,
) {
    let mut recording = Recording::new(&me);
    let mut dirty = true;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            o = observations.recv() => match o {
                Some(o) => {
                    recording.observe(o);
                    dirty = true;
                }
                None => break,
            },
            _ = every.tick() => {
                if dirty {
                    if let Err(e) = write(&path, &recording.workload) {
                        warn!(file = %path.display(), error = %e, "cannot write the recording");
                    }
                    dirty = false;
                }
            }
            _ = &mut finish => break,
        }
    }
    while let Ok(o) = observations.try_recv() {
        recording.observe(o);
    }
    if let Err(e) = write(&path, &recording.workload) {
        warn!(file = %path.display(), error = %e, "cannot write the recording");
    }
}
