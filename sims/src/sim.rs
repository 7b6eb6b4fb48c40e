//! The simulator: a workload replayed on virtual time over a simulated network, with
//! the live runtime's own state machines (discovery's `Registry`, the coordinator's
//! `Ledger`, SWIM `Membership`, the worker supervisor's `restarts`) called as they are.
//! Time jumps from one event or timer to the next; every random choice comes from one
//! seeded RNG; every event processed is a line of the event log, whose digest says
//! whether two runs were the same.
//!
//! What is modelled around the state machines, and how simply: a message between two
//! nodes takes the link's latency plus a little jitter; a reliable message (ALLOCATE,
//! REPORT, ADJUST, registry deltas) that loses a packet arrives one retransmission
//! later, a gossip datagram is lost; a partition drops what crosses it. An agent runs
//! `capacity` segments at once, each for the workload's work time, and queues the rest.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

use agentmesh_actors::ledger::{
    need_class, Candidates, CandidatesBuilder, Ledger, LedgerConfig, LedgerOutput, Rank,
    ResultVerdict, TaskFigures,
};
use agentmesh_actors::registry::{Registry, RegistryDelta, RegistryOutput};
use agentmesh_actors::restarts::{self, Panics, RestartPolicy};
use agentmesh_actors::runtime::membership::{Membership, MembershipOutput, MembershipTimer};
use agentmesh_actors::runtime::transport::wire::payload::{Capability, Health};
use agentmesh_actors::runtime::{MembershipConfig, NodeId};
use bytes::Bytes;
use foldhash::fast::FixedState;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use uuid::Uuid;

use crate::check::{Checker, Violation, NO_TASK_HANGING};
use crate::faults::FaultSpec;
use crate::line::log;
use crate::report::{Digest, Report, TaskRecord};
use crate::timeline::Timeline;
use crate::workload::{EventKind, Workload};

/// How often a coordinator looks at its open tasks (as the live one does).
const TICK_US: u64 = 50_000;
/// Agents registered cluster-wide, at most (as discovery's bound).
const MAX_AGENTS: usize = 2_000_000;
/// Attempts queued per agent while all its slots are busy (as the worker's bound).
const MAX_QUEUED: usize = 1_024;
/// How often random faults are drawn.
const FAULT_PERIOD_US: u64 = 1_000_000;
/// How often a node sends every member a summary of its agent list (as discovery).
const SUMMARY_PERIOD_US: u64 = 5_000_000;

/// Settings of one run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seeds every random choice.
    pub seed: u64,
    /// Random faults on top of the workload's.
    pub faults: FaultSpec,
    /// The coordinators' ledger settings.
    pub ledger: LedgerConfig,
    /// Failure detection settings.
    pub membership: MembershipConfig,
    /// How the worker supervisors bring back replicas that panic.
    pub restarts: RestartPolicy,
    /// A crashed node's segments must get a new attempt within this long.
    pub realloc_bound_ms: u64,
    /// One-way latency at the start, in microseconds.
    pub latency_us: u64,
    /// Keep the event log's lines (for `--log`); the digest is computed either way.
    pub keep_log: bool,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            seed: 1,
            faults: FaultSpec::default(),
            ledger: LedgerConfig::default(),
            membership: MembershipConfig::default(),
            restarts: RestartPolicy::default(),
            realloc_bound_ms: 5_000,
            latency_us: 500,
            keep_log: false,
        }
    }
}

/// A run that stopped at a violated invariant.
#[derive(Debug)]
pub struct Stopped {
    /// The run's seed.
    pub seed: u64,
    /// The number of the event at which it stopped.
    pub event: u64,
    /// Simulated time then, in milliseconds.
    pub t_ms: u64,
    /// What did not hold.
    pub violation: Violation,
    /// The figures up to that point.
    pub report: Report,
    /// The event log up to that point, if kept.
    pub log: Vec<String>,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invariant violated: {} (seed {}, event {}, t = {} ms): {}",
            self.violation.invariant, self.seed, self.event, self.t_ms, self.violation.detail
        )
    }
}

type NodeIx = usize;
type AgentIx = usize;

enum Msg {
    Gossip(Bytes),
    Delta(Rc<RegistryDelta>),
    Allocate {
        task: Uuid,
        segment: u32,
        attempt: u32,
        agent: u32,
        work_us: u64,
        coordinator: NodeIx,
    },
    Report {
        task: Uuid,
        segment: u32,
        attempt: u32,
        outcome: Outcome,
    },
    Cancel {
        task: Uuid,
        segment: u32,
        attempt: u32,
        agent: u32,
    },
}

/// How an attempt ended, as its final REPORT says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Failed,
    /// Refused unrun: every replica of the agent rests (`no_agent`).
    Refused,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        }
    }
}

enum Event {
    Workload(usize),
    Deliver {
        from: NodeIx,
        to: NodeIx,
        epoch: u32,
        msg: Msg,
    },
    Timer {
        node: NodeIx,
        epoch: u32,
        timer: MembershipTimer,
    },
    Tick {
        node: NodeIx,
        epoch: u32,
    },
    Summary {
        node: NodeIx,
        epoch: u32,
    },
    WorkDone {
        agent: AgentIx,
        gen: u64,
        key: (Uuid, u32, u32),
    },
    ReplicaBack {
        agent: AgentIx,
        gen: u64,
        /// The replica's panics, passed on to the one that replaces it.
        panics: Panics,
        /// It was resting, not restarting.
        rested: bool,
    },
    Restart(NodeIx),
    Heal,
    Faults,
}

/// One agent to register (again after a restart); agents of one workload event share
/// their type and capabilities.
struct AgentSpec {
    agent_type: Arc<str>,
    capabilities: Arc<[Capability]>,
    group: u16,
}

struct TaskMeta {
    capability: String,
    priority: u8,
    work_us: u64,
    segments: u32,
    submitted_us: u64,
}

struct SimNode {
    name: String,
    up: bool,
    /// Bumped at every crash and restart: events for an older life are dropped.
    epoch: u32,
    membership: Membership,
    registry: Registry,
    /// Bumped when the registry changes, to invalidate `candidates`.
    registry_gen: u64,
    candidates: BTreeMap<String, (u64, Candidates)>,
    /// The full delta of this node's agents, kept until one of them changes (it is
    /// sent to every node that comes up).
    full_delta: Option<Rc<RegistryDelta>>,
    ledger: Ledger,
    tasks: BTreeMap<Uuid, TaskMeta>,
    /// Agent ID -> the simulated agent, for agents of this node. Looked up for every
    /// segment allocated (a B-tree of 10,000 agents cost several cache misses each);
    /// every walk over it is independent of its order (the panic victim has a unique
    /// key, a crash's orphans are sorted), so runs still repeat.
    agents: HashMap<u32, AgentIx, FixedState>,
    specs: Vec<AgentSpec>,
    tick_armed: bool,
    /// The side of the partition it is on (0 when there is none).
    side: u32,
}

struct Running {
    key: (Uuid, u32, u32),
    coordinator: NodeIx,
}

struct Queued {
    key: (Uuid, u32, u32),
    coordinator: NodeIx,
    work_us: u64,
}

struct SimAgent {
    node: NodeIx,
    /// Its Agent ID on its node.
    id: u32,
    agent_type: Arc<str>,
    capacity: u32,
    /// Bumped when the agent's work is lost (its node crashed).
    gen: u64,
    running: Vec<Running>,
    queue: VecDeque<Queued>,
    /// The panics of the replicas that are up; the other `capacity - up.len()` are
    /// restarting or resting after a panic.
    up: Vec<Panics>,
    /// Replicas down and resting (the others down are restarting).
    resting: u32,
    /// As its supervisor reports it: unhealthy while every replica rests.
    health: Health,
    alive: bool,
}

/// One simulation run.
pub struct Sim {
    config: SimConfig,
    workload: Workload,
    rng: StdRng,
    now_us: u64,
    queue: Timeline<Event>,
    nodes: Vec<SimNode>,
    by_name: HashMap<String, NodeIx, FixedState>,
    agents: Vec<SimAgent>,
    loss_permille: u32,
    latency_us: u64,
    checker: Checker,
    report: Report,
    digest: Digest,
    line: String,
    log: Vec<String>,
    events: u64,
    /// What the workload's registrations add up to: how many agents a replica is
    /// sized for when its node starts (a hint; a restarted node registers its agents
    /// again, and a replica may hold old and new for a while).
    expected_agents: usize,
    workload_done: bool,
    /// Tasks open at live coordinators.
    open: BTreeMap<(NodeIx, Uuid), ()>,
}

impl Sim {
    /// A run of `workload` with `config`.
    pub fn new(workload: Workload, config: SimConfig) -> Sim {
        let mut report = Report::new(&workload.header.name, config.seed);
        report.workload_events = workload.events.len() as u64;
        let expected_agents = workload
            .events
            .iter()
            .map(|e| match &e.kind {
                EventKind::Register { count, .. } => *count as usize,
                _ => 0,
            })
            .fold(0usize, usize::saturating_add);
        Sim {
            expected_agents,
            rng: StdRng::seed_from_u64(config.seed),
            checker: Checker::new(config.realloc_bound_ms * 1000),
            loss_permille: config.faults.loss_permille,
            latency_us: config.latency_us,
            config,
            workload,
            now_us: 0,
            queue: Timeline::default(),
            nodes: Vec::new(),
            by_name: HashMap::default(),
            agents: Vec::new(),
            report,
            digest: Digest::new(),
            line: String::new(),
            log: Vec::new(),
            events: 0,
            workload_done: false,
            open: BTreeMap::new(),
        }
    }

    /// Runs to the end: every workload event replayed and every task ended (or the
    /// horizon passed), or the first violated invariant. `progress` is called now and
    /// then with (simulated ms, events so far).
    pub fn run(
        mut self,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(Report, Vec<String>), Box<Stopped>> {
        // Wall time measures the simulator itself (events per second); it never feeds
        // the simulation, whose time is virtual.
        #[allow(clippy::disallowed_methods)]
        let started = std::time::Instant::now();
        if !self.workload.events.is_empty() {
            let t = self.workload.events[0].t * 1000;
            self.schedule_at(t, Event::Workload(0));
        }
        if !self.config.faults.is_none() {
            self.schedule(FAULT_PERIOD_US, Event::Faults);
        }
        let end_of_workload_us = self.workload.duration_ms() * 1000;
        let c = self.config.ledger;
        let hang_us = (c.segment_timeout_ms * u64::from(c.max_attempts.max(1)) + c.max_wait_ms)
            * 1000
            + self.config.realloc_bound_ms * 1000;
        let horizon_us = end_of_workload_us + hang_us;
        while let Some((at, event)) = self.queue.pop() {
            if self.workload_done && self.open.is_empty() {
                break;
            }
            if at > horizon_us {
                self.now_us = horizon_us;
                break;
            }
            self.now_us = at;
            self.events += 1;
            if let Err(v) = self.handle(event) {
                return Err(self.stop(v, started));
            }
            if let Err(v) = self.checker.check_time(self.now_us) {
                return Err(self.stop(v, started));
            }
            if self.events.is_multiple_of(65_536) {
                progress(self.now_us / 1000, self.events);
            }
        }
        if let Err(v) = self.checker.check_time(self.now_us) {
            return Err(self.stop(v, started));
        }
        if let Some(((node, task), _)) = self.open.iter().next() {
            let v = Violation {
                invariant: NO_TASK_HANGING,
                detail: format!(
                    "task {task} at {} still open {} ms after the workload ended ({} open in all)",
                    self.nodes[*node].name,
                    (self.now_us - end_of_workload_us) / 1000,
                    self.open.len()
                ),
            };
            return Err(self.stop(v, started));
        }
        let report = self.finish(started);
        Ok((report, std::mem::take(&mut self.log)))
    }

    fn finish(&mut self, started: std::time::Instant) -> Report {
        let mut report = std::mem::replace(&mut self.report, Report::new("", 0));
        report.finish(
            self.events,
            self.now_us,
            started.elapsed(),
            self.digest.hex(),
            std::mem::take(&mut self.checker.realloc_latencies_us),
            std::mem::take(&mut self.checker.restart_latencies_us),
        );
        report
    }

    fn stop(&mut self, violation: Violation, started: std::time::Instant) -> Box<Stopped> {
        Box::new(Stopped {
            seed: self.config.seed,
            event: self.events,
            t_ms: self.now_us / 1000,
            violation,
            report: self.finish(started),
            log: std::mem::take(&mut self.log),
        })
    }

    fn schedule(&mut self, after_us: u64, event: Event) {
        self.schedule_at(self.now_us + after_us, event);
    }

    fn schedule_at(&mut self, at: u64, event: Event) {
        self.queue.push(at, event);
    }

    /// Appends a line to the event log (and its digest), for the rare events whose
    /// line needs `core::fmt`; the others use [`log!`].
    fn log(&mut self, args: std::fmt::Arguments<'_>) {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        let _ = line.write_fmt(args);
        self.begin_fold();
        self.digest.bytes(line.as_bytes());
        self.digest.end_line();
        if self.config.keep_log {
            let mut kept = self.begin_line();
            kept.push_str(&line);
            self.keep_line(kept);
        }
        self.line = line;
    }

    /// Folds a line's prefix (event number, time) into the digest.
    fn begin_fold(&mut self) {
        self.digest.word(self.events);
        self.digest.word(self.now_us);
    }

    /// A kept log line's prefix (event number, time), to be completed and kept.
    fn begin_line(&mut self) -> String {
        let mut line = String::with_capacity(64);
        crate::line::Part::put(&self.events, &mut line);
        line.push(' ');
        crate::line::Part::put(&self.now_us, &mut line);
        line.push(' ');
        line
    }

    fn keep_line(&mut self, line: String) {
        self.log.push(line);
    }

    fn chance(&mut self, permille: u32) -> bool {
        permille > 0 && self.rng.random_range(0..1000) < permille
    }

    fn handle(&mut self, event: Event) -> Result<(), Violation> {
        match event {
            Event::Workload(i) => self.workload_event(i),
            Event::Deliver {
                from,
                to,
                epoch,
                msg,
            } => {
                let n = &self.nodes[to];
                if !n.up || n.epoch != epoch || n.side != self.nodes[from].side {
                    log!(self, "drop ", from, ">", to);
                    self.report.messages_dropped += 1;
                    return Ok(());
                }
                self.deliver(from, to, msg)
            }
            Event::Timer { node, epoch, timer } => {
                if self.nodes[node].up && self.nodes[node].epoch == epoch {
                    log!(self, "timer ", node);
                    let _ = self.nodes[node].membership.handle_timer(timer);
                    self.drain_membership(node)?;
                }
                Ok(())
            }
            Event::Tick { node, epoch } => {
                if self.nodes[node].up && self.nodes[node].epoch == epoch {
                    self.nodes[node].tick_armed = false;
                    log!(self, "tick ", node);
                    self.coordinate(node)?;
                }
                Ok(())
            }
            Event::Summary { node, epoch } => {
                if self.nodes[node].up && self.nodes[node].epoch == epoch {
                    log!(self, "summary ", node);
                    let summary = self.nodes[node].registry.summary();
                    self.send_to_members(node, summary);
                    self.schedule(SUMMARY_PERIOD_US, Event::Summary { node, epoch });
                }
                Ok(())
            }
            Event::WorkDone { agent, gen, key } => self.work_done(agent, gen, key),
            Event::ReplicaBack {
                agent,
                gen,
                panics,
                rested,
            } => {
                let a = &mut self.agents[agent];
                if a.gen == gen && a.alive {
                    a.up.push(panics);
                    if rested {
                        a.resting = a.resting.saturating_sub(1);
                    }
                    log!(self, "replica-back ", agent, " ", rested);
                    self.health_changed(agent);
                    self.start_queued(agent);
                }
                Ok(())
            }
            Event::Restart(node) => {
                self.log(format_args!("restart {node} (fault)"));
                self.start_node(node);
                Ok(())
            }
            Event::Heal => {
                self.log(format_args!("heal (fault)"));
                self.heal();
                Ok(())
            }
            Event::Faults => {
                self.random_faults();
                Ok(())
            }
        }
    }

    fn workload_event(&mut self, i: usize) -> Result<(), Violation> {
        let kind = self.workload.events[i].kind.clone();
        match self.workload.events.get(i + 1).map(|e| e.t * 1000) {
            Some(t) => self.schedule_at(t.max(self.now_us), Event::Workload(i + 1)),
            None => self.workload_done = true,
        }
        match kind {
            EventKind::NodeJoin { node } => {
                self.log(format_args!("join {node}"));
                let ix = self.add_node(&node);
                self.start_node(ix);
            }
            EventKind::NodeRestart { node } => {
                self.log(format_args!("restart {node}"));
                let ix = self.by_name[&node];
                if !self.nodes[ix].up {
                    self.start_node(ix);
                }
            }
            EventKind::NodeCrash { node } => {
                self.log(format_args!("crash {node}"));
                let ix = self.by_name[&node];
                self.crash(ix);
            }
            EventKind::NodeLeave { node } => {
                self.log(format_args!("leave {node}"));
                let ix = self.by_name[&node];
                if self.nodes[ix].up {
                    let _ = self.nodes[ix].membership.leave();
                    self.drain_membership(ix)?;
                    self.crash(ix);
                }
            }
            EventKind::Register {
                node,
                agent_type,
                capabilities,
                tags,
                capacity,
                group,
                count,
            } => {
                self.log(format_args!("register {node} {agent_type} x{count}"));
                let ix = self.by_name[&node];
                let agent_type: Arc<str> = Arc::from(agent_type);
                let capabilities: Arc<[Capability]> = capabilities
                    .into_iter()
                    .map(|name| Capability {
                        name,
                        version: "1".into(),
                        tags: tags.clone(),
                        capacity,
                    })
                    .collect();
                for _ in 0..count {
                    self.nodes[ix].specs.push(AgentSpec {
                        agent_type: agent_type.clone(),
                        capabilities: capabilities.clone(),
                        group,
                    });
                }
                if self.nodes[ix].up {
                    let from = self.nodes[ix].specs.len() - count as usize;
                    self.register_specs(ix, from);
                }
            }
            EventKind::Submit {
                node,
                capability,
                priority,
                segments,
                work_ms,
                ..
            } => {
                let ix = self.by_name[&node];
                let task = Uuid::from_u128(self.rng.random::<u128>());
                self.log(format_args!(
                    "submit {node} {task} {capability} p{priority} x{segments}"
                ));
                self.report.tasks_submitted += 1;
                if !self.nodes[ix].up {
                    self.report.tasks_refused += 1;
                    return Ok(());
                }
                let now_ms = self.now_us / 1000;
                let n = &mut self.nodes[ix];
                if n.ledger.submit(task, segments, now_ms).is_err() {
                    self.report.tasks_refused += 1;
                    return Ok(());
                }
                let rank = Rank {
                    class: need_class(&capability, &[], 0),
                    priority,
                    since: self.now_us,
                };
                n.ledger.set_rank(task, rank);
                n.tasks.insert(
                    task,
                    TaskMeta {
                        capability,
                        priority,
                        work_us: work_ms * 1000,
                        segments,
                        submitted_us: self.now_us,
                    },
                );
                self.open.insert((ix, task), ());
                self.report.segments_submitted += u64::from(segments);
                self.coordinate(ix)?;
            }
            EventKind::AgentPanic { node, agent_type } => {
                self.log(format_args!("panic {node} {agent_type}"));
                let ix = self.by_name[&node];
                self.panic_agent(ix, &agent_type);
            }
            EventKind::Partition { sides } => {
                self.log(format_args!("partition {sides:?}"));
                for n in &mut self.nodes {
                    n.side = sides.len() as u32 + 1;
                }
                for (i, side) in sides.iter().enumerate() {
                    for name in side {
                        if let Some(&ix) = self.by_name.get(name) {
                            self.nodes[ix].side = i as u32 + 1;
                        }
                    }
                }
                self.report.partitions += 1;
            }
            EventKind::Heal => {
                self.log(format_args!("heal"));
                self.heal();
            }
            EventKind::Net {
                loss_permille,
                latency_us,
            } => {
                self.log(format_args!("net {loss_permille:?} {latency_us:?}"));
                if let Some(l) = loss_permille {
                    self.loss_permille = (l + self.config.faults.loss_permille).min(1000);
                }
                if let Some(l) = latency_us {
                    self.latency_us = l;
                }
            }
        }
        Ok(())
    }

    fn heal(&mut self) {
        for n in &mut self.nodes {
            n.side = 0;
        }
    }

    fn add_node(&mut self, name: &str) -> NodeIx {
        let ix = self.nodes.len();
        let seed = self.config.seed ^ (ix as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let id = node_id(name, ix, 0);
        self.nodes.push(SimNode {
            name: name.to_string(),
            up: false,
            epoch: 0,
            membership: Membership::new(id, self.config.membership, seed),
            registry: Registry::new(name, MAX_AGENTS, seed),
            registry_gen: 0,
            candidates: BTreeMap::new(),
            full_delta: None,
            ledger: Ledger::new(self.config.ledger, seed),
            tasks: BTreeMap::new(),
            agents: HashMap::default(),
            specs: Vec::new(),
            tick_armed: false,
            side: 0,
        });
        self.by_name.insert(name.to_string(), ix);
        ix
    }

    /// Starts (or restarts) a node with fresh state, joins it to the cluster through
    /// another node that is up, and registers its agents.
    fn start_node(&mut self, ix: NodeIx) {
        let seed = self.rng.random::<u64>();
        let n = &mut self.nodes[ix];
        n.epoch += 1;
        n.up = true;
        // A new life must outrank every identity the node had, renewals included, and
        // be told apart from a renewal: a restart that took the identity of its own
        // renewed former self, or only a renewal's next one, would look alive all
        // along to the others, and the crash would never be seen (so its segments
        // would never be reallocated). The live node does the same.
        let incarnation = NodeId::first_of_next_life(n.membership.me().incarnation);
        n.membership = Membership::new(
            node_id(&n.name, ix, incarnation),
            self.config.membership,
            seed,
        );
        n.registry = Registry::new(&n.name, MAX_AGENTS, seed);
        // The workload says how many agents will register, cluster-wide: every replica
        // gets room for them at once.
        n.registry.reserve(self.expected_agents);
        n.registry_gen += 1;
        n.full_delta = None;
        n.ledger = Ledger::new(self.config.ledger, seed);
        n.tasks.clear();
        n.agents.clear();
        n.tick_armed = false;
        let via = (0..self.nodes.len()).find(|&o| o != ix && self.nodes[o].up);
        if let Some(via) = via {
            let id = self.nodes[via].membership.me().clone();
            let _ = self.nodes[ix].membership.join(id);
        }
        let _ = self.drain_membership(ix);
        let epoch = self.nodes[ix].epoch;
        self.schedule(SUMMARY_PERIOD_US, Event::Summary { node: ix, epoch });
        self.register_specs(ix, 0);
    }

    fn register_specs(&mut self, ix: NodeIx, from: usize) {
        for s in from..self.nodes[ix].specs.len() {
            let spec = &self.nodes[ix].specs[s];
            let (agent_type, caps, group) = (
                spec.agent_type.clone(),
                spec.capabilities.clone(),
                spec.group,
            );
            let capacity = caps.iter().map(|c| c.capacity).max().unwrap_or(1);
            let Ok(record) = self.nodes[ix]
                .registry
                .register(agent_type.clone(), caps, group)
            else {
                self.report.registrations_refused += 1;
                continue;
            };
            let a = self.agents.len();
            self.agents.push(SimAgent {
                node: ix,
                id: record.agent,
                agent_type,
                capacity,
                gen: 0,
                running: Vec::new(),
                queue: VecDeque::new(),
                up: vec![Panics::default(); capacity as usize],
                resting: 0,
                health: Health::Ok,
                alive: true,
            });
            self.nodes[ix].agents.insert(record.agent, a);
            self.report.agents_registered += 1;
        }
        self.nodes[ix].registry_gen += 1;
        self.drain_registry(ix);
    }

    /// Sends the registry's news as the live discovery does: each delta as it comes,
    /// to every member, in the order the registry made them. (The registry already
    /// gathers what it can into one delta; merging its deltas further here could put a
    /// removal after an upsert of the same agent, which its own rule keeps apart.)
    fn drain_registry(&mut self, ix: NodeIx) {
        while let Some(out) = self.nodes[ix].registry.poll() {
            match out {
                RegistryOutput::Broadcast(d) => {
                    self.nodes[ix].full_delta = None;
                    self.send_to_members(ix, d);
                }
                RegistryOutput::Send { to, delta } => {
                    if let Some(&to) = self.by_name.get(&*to) {
                        self.send(ix, to, Msg::Delta(Rc::new(delta)), true);
                    }
                }
                RegistryOutput::Reidentified { old, new } => {
                    if let Some(a) = self.nodes[ix].agents.remove(&old) {
                        self.nodes[ix].agents.insert(new, a);
                        self.agents[a].id = new;
                    }
                }
                RegistryOutput::Own { .. } | RegistryOutput::Disown { .. } => {}
            }
        }
    }

    /// Sends `delta` to every member `ix` holds up, one shared copy.
    fn send_to_members(&mut self, ix: NodeIx, delta: RegistryDelta) {
        let delta = Rc::new(delta);
        for to in self.members_of(ix) {
            self.send(ix, to, Msg::Delta(delta.clone()), true);
        }
    }

    /// The nodes `ix` holds up.
    fn members_of(&self, ix: NodeIx) -> Vec<NodeIx> {
        self.nodes[ix]
            .membership
            .members()
            .filter_map(|m| self.by_name.get(&*m.name).copied())
            .collect()
    }

    fn drain_membership(&mut self, ix: NodeIx) -> Result<(), Violation> {
        while let Some(out) = self.nodes[ix].membership.poll() {
            match out {
                MembershipOutput::Send { to, data } => {
                    if let Some(&to) = self.by_name.get(&*to.name) {
                        self.send(ix, to, Msg::Gossip(data), false);
                    }
                }
                MembershipOutput::SetTimer { after, timer } => {
                    let epoch = self.nodes[ix].epoch;
                    self.schedule(
                        after.as_micros() as u64,
                        Event::Timer {
                            node: ix,
                            epoch,
                            timer,
                        },
                    );
                }
                MembershipOutput::NodeUp(id) => {
                    log!(self, "up ", ix, " sees ", &*id.name);
                    let n = &mut self.nodes[ix];
                    n.registry.handle_node_up(&id.name);
                    n.registry_gen += 1;
                    if let Some(&to) = self.by_name.get(&*id.name) {
                        let n = &mut self.nodes[ix];
                        let full = n
                            .full_delta
                            .get_or_insert_with(|| Rc::new(n.registry.full_delta()))
                            .clone();
                        self.send(ix, to, Msg::Delta(full), true);
                    }
                }
                MembershipOutput::NodeDown(id) => {
                    log!(self, "down ", ix, " sees ", &*id.name);
                    let now_ms = self.now_us / 1000;
                    let n = &mut self.nodes[ix];
                    n.registry.handle_node_down(&id.name);
                    n.registry_gen += 1;
                    n.ledger.handle_node_down(&id.name, now_ms);
                    self.drain_ledger(ix)?;
                    self.coordinate(ix)?;
                }
                MembershipOutput::Renewed(_) => {}
            }
        }
        Ok(())
    }

    /// Puts a message on the simulated network.
    fn send(&mut self, from: NodeIx, to: NodeIx, msg: Msg, reliable: bool) {
        if from == to {
            let epoch = self.nodes[to].epoch;
            self.schedule(
                0,
                Event::Deliver {
                    from,
                    to,
                    epoch,
                    msg,
                },
            );
            return;
        }
        let mut delay = self.latency_us + self.rng.random_range(0..=self.latency_us / 4);
        if reliable {
            // Each lost packet costs a retransmission (about a probe timeout).
            let mut tries = 0;
            while self.chance(self.loss_permille) && tries < 16 {
                delay += (3 * self.latency_us).max(1_000);
                tries += 1;
            }
        } else if self.chance(self.loss_permille) {
            self.report.messages_dropped += 1;
            return;
        }
        if self.nodes[from].side != self.nodes[to].side {
            self.report.messages_dropped += 1;
            return;
        }
        self.report.messages += 1;
        let epoch = self.nodes[to].epoch;
        self.schedule(
            delay,
            Event::Deliver {
                from,
                to,
                epoch,
                msg,
            },
        );
    }

    fn deliver(&mut self, from: NodeIx, to: NodeIx, msg: Msg) -> Result<(), Violation> {
        match msg {
            Msg::Gossip(data) => {
                log!(self, "gossip ", from, ">", to, " ", data.len());
                let _ = self.nodes[to].membership.handle_data(&data);
                self.drain_membership(to)
            }
            Msg::Delta(delta) => {
                log!(
                    self,
                    "delta ",
                    from,
                    ">",
                    to,
                    " +",
                    delta.upserts.len(),
                    " -",
                    delta.removals.len()
                );
                let sender = self.nodes[from].name.clone();
                let n = &mut self.nodes[to];
                // A summary changes nothing the candidate lists show.
                if n.registry.handle_delta(&sender, &delta).is_ok() && !delta.is_summary() {
                    n.registry_gen += 1;
                }
                self.drain_registry(to);
                Ok(())
            }
            Msg::Allocate {
                task,
                segment,
                attempt,
                agent,
                work_us,
                coordinator,
            } => {
                log!(
                    self,
                    "allocate ",
                    task,
                    " ",
                    segment,
                    "/",
                    attempt,
                    " > ",
                    agent
                );
                let key = (task, segment, attempt);
                let Some(&a) = self.nodes[to].agents.get(&agent) else {
                    self.report_to(to, coordinator, key, Outcome::Failed);
                    return Ok(());
                };
                let ag = &mut self.agents[a];
                if ag.health == Health::Unhealthy {
                    self.report.allocations_refused += 1;
                    self.report_to(to, coordinator, key, Outcome::Refused);
                    return Ok(());
                }
                if ag.queue.len() >= MAX_QUEUED {
                    self.report_to(to, coordinator, key, Outcome::Failed);
                    return Ok(());
                }
                ag.queue.push_back(Queued {
                    key,
                    coordinator,
                    work_us,
                });
                self.start_queued(a);
                Ok(())
            }
            Msg::Report {
                task,
                segment,
                attempt,
                outcome,
            } => {
                log!(
                    self,
                    "report ",
                    task,
                    " ",
                    segment,
                    "/",
                    attempt,
                    " ",
                    outcome.name()
                );
                let now_ms = self.now_us / 1000;
                match outcome {
                    Outcome::Done => {
                        let verdict =
                            self.nodes[to]
                                .ledger
                                .handle_result(task, segment, attempt, Vec::new());
                        match verdict {
                            ResultVerdict::Accepted => {
                                if let Err(v) = self.checker.result_accepted(to, task, segment) {
                                    self.report.duplicates_accepted += 1;
                                    return Err(v);
                                }
                                self.report.segment_completed(self.now_us);
                                // Its worker is free: the live coordinator offers work now.
                                self.drain_ledger(to)?;
                                if self.nodes[to].ledger.waiting().next().is_some() {
                                    self.offer_waiting(to, false)?;
                                }
                            }
                            ResultVerdict::Duplicate => self.report.duplicates_discarded += 1,
                            ResultVerdict::UnknownTask | ResultVerdict::UnknownAttempt => {
                                self.report.stale_reports += 1
                            }
                        }
                    }
                    // Costs the segment no attempt; it waits for another agent.
                    Outcome::Refused => {
                        self.nodes[to]
                            .ledger
                            .handle_refusal(task, segment, attempt, "no_agent", now_ms);
                    }
                    Outcome::Failed => self.nodes[to]
                        .ledger
                        .handle_failure(task, segment, attempt, "failed", now_ms),
                }
                self.drain_ledger(to)?;
                self.arm_tick(to);
                Ok(())
            }
            Msg::Cancel {
                task,
                segment,
                attempt,
                agent,
            } => {
                log!(self, "cancel ", task, " ", segment, "/", attempt);
                let key = (task, segment, attempt);
                if let Some(&a) = self.nodes[to].agents.get(&agent) {
                    let ag = &mut self.agents[a];
                    ag.queue.retain(|q| q.key != key);
                    let before = ag.running.len();
                    ag.running.retain(|r| r.key != key);
                    if ag.running.len() != before {
                        self.start_queued(a);
                    }
                }
                Ok(())
            }
        }
    }

    fn report_to(
        &mut self,
        from: NodeIx,
        coordinator: NodeIx,
        key: (Uuid, u32, u32),
        outcome: Outcome,
    ) {
        let (task, segment, attempt) = key;
        self.send(
            from,
            coordinator,
            Msg::Report {
                task,
                segment,
                attempt,
                outcome,
            },
            true,
        );
    }

    /// What the worker supervisor does when its replicas change: works out the
    /// agent's health; while unhealthy, refuses what waits; tells discovery of a change
    /// (which spreads it as the live registry does).
    fn health_changed(&mut self, a: AgentIx) {
        let ag = &mut self.agents[a];
        let health = restarts::health(ag.capacity as usize, ag.up.len(), ag.resting as usize);
        if health == ag.health {
            return;
        }
        ag.health = health;
        let (node, id) = (ag.node, ag.id);
        let refused: Vec<Queued> = if health == Health::Unhealthy {
            ag.queue.drain(..).collect()
        } else {
            Vec::new()
        };
        log!(self, "health ", a, " ", health_name(health));
        for q in refused {
            self.report.allocations_refused += 1;
            self.report_to(node, q.coordinator, q.key, Outcome::Refused);
        }
        let n = &mut self.nodes[node];
        n.registry.update(id, 0, health);
        n.registry_gen += 1;
        self.drain_registry(node);
    }

    /// Starts queued attempts on free slots.
    fn start_queued(&mut self, a: AgentIx) {
        loop {
            let ag = &mut self.agents[a];
            if !ag.alive || ag.running.len() >= ag.up.len() {
                return;
            }
            let Some(q) = ag.queue.pop_front() else {
                return;
            };
            ag.running.push(Running {
                key: q.key,
                coordinator: q.coordinator,
            });
            let gen = ag.gen;
            self.schedule(
                q.work_us,
                Event::WorkDone {
                    agent: a,
                    gen,
                    key: q.key,
                },
            );
        }
    }

    fn work_done(&mut self, a: AgentIx, gen: u64, key: (Uuid, u32, u32)) -> Result<(), Violation> {
        let ag = &mut self.agents[a];
        if ag.gen != gen || !ag.alive {
            return Ok(());
        }
        let Some(i) = ag.running.iter().position(|r| r.key == key) else {
            return Ok(()); // cancelled meanwhile
        };
        let r = ag.running.swap_remove(i);
        let node = ag.node;
        log!(self, "done ", key.0, " ", key.1, "/", key.2, " at ", a);
        self.report.attempts_finished += 1;
        self.report_to(node, r.coordinator, key, Outcome::Done);
        self.start_queued(a);
        Ok(())
    }

    fn panic_agent(&mut self, node: NodeIx, agent_type: &str) {
        let victim = self.nodes[node]
            .agents
            .values()
            .copied()
            .filter(|&a| {
                let ag = &self.agents[a];
                &*ag.agent_type == agent_type && ag.alive && !ag.up.is_empty()
            })
            .max_by_key(|&a| (self.agents[a].running.len(), std::cmp::Reverse(a)));
        if let Some(a) = victim {
            self.panic_replica(node, a);
        }
    }

    /// A replica of agent `a` (on `node`) that is up panics, failing the first segment
    /// it runs, if any; the supervisor brings it back after the restart policy's delay.
    fn panic_replica(&mut self, node: NodeIx, a: AgentIx) {
        let now = std::time::Duration::from_micros(self.now_us);
        let policy = self.config.restarts;
        let ag = &mut self.agents[a];
        // A replica that is up panics (none is, while all restart or rest).
        let Some(mut panics) = ag.up.pop() else {
            return;
        };
        self.report.panics += 1;
        let comeback = panics.record(now, &policy);
        if comeback.rests() {
            ag.resting += 1;
            self.report.replica_rests += 1;
        }
        let gen = ag.gen;
        if !ag.running.is_empty() {
            let r = ag.running.remove(0);
            self.report_to(node, r.coordinator, r.key, Outcome::Failed);
        }
        self.schedule(
            comeback.after().as_micros() as u64,
            Event::ReplicaBack {
                agent: a,
                gen,
                panics,
                rested: comeback.rests(),
            },
        );
        self.health_changed(a);
    }

    /// A node dies: its agents' work, its ledger and its registry are gone.
    fn crash(&mut self, ix: NodeIx) {
        if !self.nodes[ix].up {
            return;
        }
        let name = self.nodes[ix].name.clone();
        self.report.node_crashed(self.now_us, &name);
        // The checker learns which segments lost their worker.
        let now = self.now_us;
        let mut orphans = Vec::new();
        for &a in self.nodes[ix].agents.values() {
            let ag = &self.agents[a];
            for r in &ag.running {
                orphans.push((r.coordinator, r.key.0, r.key.1));
            }
            for q in &ag.queue {
                orphans.push((q.coordinator, q.key.0, q.key.1));
            }
        }
        // Only attempts their coordinator still counts as live: a task that ended, or
        // a segment done by another attempt, has nothing left to reallocate.
        orphans.retain(|(c, task, segment)| {
            *c != ix
                && self.nodes[*c].up
                && self.nodes[*c]
                    .ledger
                    .live_attempts(*task)
                    .iter()
                    .any(|(s, _, _, node)| s == segment && **node == *self.nodes[ix].name)
        });
        orphans.sort();
        orphans.dedup();
        self.checker.node_crashed(now, orphans);
        let agents: Vec<AgentIx> = self.nodes[ix].agents.values().copied().collect();
        for a in agents {
            let ag = &mut self.agents[a];
            ag.alive = false;
            ag.gen += 1;
            ag.running.clear();
            ag.queue.clear();
        }
        // Tasks it coordinated are lost with it (their submitters see an error).
        let tasks: Vec<Uuid> = self.nodes[ix].tasks.keys().copied().collect();
        for task in tasks {
            self.open.remove(&(ix, task));
            self.checker.task_ended(ix, task);
            self.report.tasks_lost_with_coordinator += 1;
        }
        let n = &mut self.nodes[ix];
        n.up = false;
        n.epoch += 1;
        n.tasks.clear();
        n.agents.clear();
    }

    fn random_faults(&mut self) {
        let f = self.config.faults;
        if self.workload_done {
            return;
        }
        let crash_permille = (f.crash_per_sec * 1_000_000.0) as u64;
        for ix in 0..self.nodes.len() {
            if self.nodes[ix].up && self.rng.random_range(0..1_000_000) < crash_permille {
                self.log(format_args!("crash {ix} (fault)"));
                self.crash(ix);
                self.schedule(f.restart_ms * 1000, Event::Restart(ix));
            }
        }
        // Drawn only when asked for, so that runs without panics keep their digests.
        let panic = (f.panic_per_sec * 1_000_000.0) as u64;
        if panic > 0 {
            for ix in 0..self.nodes.len() {
                if !self.nodes[ix].up {
                    continue;
                }
                let mut agents: Vec<AgentIx> = self.nodes[ix].agents.values().copied().collect();
                agents.sort_unstable(); // in a fixed order, so runs repeat
                for a in agents {
                    let ag = &self.agents[a];
                    if ag.alive && !ag.up.is_empty() && self.rng.random_range(0..1_000_000) < panic
                    {
                        self.log(format_args!("panic {ix} agent {a} (fault)"));
                        self.panic_replica(ix, a);
                    }
                }
            }
        }
        let partition = (f.partition_per_sec * 1_000_000.0) as u64;
        if self.nodes.len() > 1
            && self.nodes.iter().all(|n| n.side == 0)
            && self.rng.random_range(0..1_000_000) < partition
        {
            let cut = self.rng.random_range(1..self.nodes.len());
            for (i, n) in self.nodes.iter_mut().enumerate() {
                n.side = if i < cut { 1 } else { 2 };
            }
            self.report.partitions += 1;
            self.log(format_args!("partition at {cut} (fault)"));
            self.schedule(f.partition_ms * 1000, Event::Heal);
        }
        self.schedule(FAULT_PERIOD_US, Event::Faults);
    }

    fn arm_tick(&mut self, ix: NodeIx) {
        let n = &mut self.nodes[ix];
        if n.up && !n.tick_armed && n.ledger.open_tasks() > 0 {
            n.tick_armed = true;
            let epoch = n.epoch;
            self.schedule(TICK_US, Event::Tick { node: ix, epoch });
        }
    }

    /// What the live coordinator does on its tick: timeouts, then an offer round.
    fn coordinate(&mut self, ix: NodeIx) -> Result<(), Violation> {
        let now_ms = self.now_us / 1000;
        self.nodes[ix].ledger.handle_timeout(now_ms);
        self.offer_waiting(ix, true)
    }

    /// An offer round, as the live coordinator makes on its tick (`whole`: every task
    /// with segments waiting gets the capable agents discovery lists) and whenever a
    /// worker reports a result (each capability's tasks until one finds no free agent).
    fn offer_waiting(&mut self, ix: NodeIx, whole: bool) -> Result<(), Violation> {
        let now_ms = self.now_us / 1000;
        let mut round = self.nodes[ix].ledger.service_round();
        while let Some(task) = round.next(&self.nodes[ix].ledger) {
            let Some(meta) = self.nodes[ix].tasks.get(&task) else {
                continue;
            };
            let capability = meta.capability.clone();
            let candidates = self.candidates(ix, &capability);
            let n = &mut self.nodes[ix];
            let full = if candidates.is_empty() {
                let unwatched = n.registry.capable_unwatched(&capability, &[]) > 0;
                n.ledger.no_candidates(task, &capability, unwatched, now_ms);
                true
            } else {
                n.ledger.assign_from(task, &candidates, now_ms)
            };
            if full && !whole {
                round.skip_class();
            }
        }
        self.drain_ledger(ix)?;
        self.arm_tick(ix);
        Ok(())
    }

    /// The capable agents in this node's registry, cached until the registry changes.
    fn candidates(&mut self, ix: NodeIx, capability: &str) -> Candidates {
        let n = &mut self.nodes[ix];
        if let Some((gen, list)) = n.candidates.get(capability) {
            if *gen == n.registry_gen {
                return list.clone();
            }
        }
        // The stale list's memory if it is free, and room for every agent at once:
        // growing a list of 100,000 step by step cost more than filling it.
        let mut list = match n.candidates.remove(capability) {
            Some((_, stale)) => stale.into_builder(),
            None => CandidatesBuilder::default(),
        };
        list.reserve(n.registry.len());
        for (a, cap) in n.registry.capable(capability, &[]) {
            // As the live coordinator: an unhealthy agent is offered as full, so
            // segments wait for it rather than the task failing.
            let load = if a.health == Health::Unhealthy {
                cap.capacity
            } else {
                a.load
            };
            list.push(a.agent, &a.node, cap.capacity, load);
        }
        let list = list.build();
        n.candidates
            .insert(capability.to_string(), (n.registry_gen, list.clone()));
        list
    }

    fn drain_ledger(&mut self, ix: NodeIx) -> Result<(), Violation> {
        while let Some(out) = self.nodes[ix].ledger.poll() {
            match out {
                LedgerOutput::Allocate {
                    task,
                    segment,
                    attempt,
                    agent,
                    node,
                } => {
                    self.checker.allocated(self.now_us, (ix, task, segment))?;
                    self.report.allocations += 1;
                    let work_us = self.nodes[ix].tasks.get(&task).map_or(0, |m| m.work_us);
                    if let Some(&to) = self.by_name.get(&*node) {
                        self.send(
                            ix,
                            to,
                            Msg::Allocate {
                                task,
                                segment,
                                attempt,
                                agent,
                                work_us,
                                coordinator: ix,
                            },
                            true,
                        );
                    }
                }
                LedgerOutput::Cancel {
                    task,
                    segment,
                    attempt,
                    agent,
                    node,
                } => {
                    if let Some(&to) = self.by_name.get(&*node) {
                        self.send(
                            ix,
                            to,
                            Msg::Cancel {
                                task,
                                segment,
                                attempt,
                                agent,
                            },
                            true,
                        );
                    }
                }
                LedgerOutput::Reallocated { task, segment } => {
                    self.checker.reallocated(self.now_us, (ix, task, segment))?;
                }
                LedgerOutput::TaskCompleted { task, figures, .. } => {
                    log!(self, "completed ", task);
                    let meta = self.take_task(ix, task);
                    let segments = meta.as_ref().map_or(figures.segments, |m| m.segments);
                    if let Err(v) = self.checker.task_completed(ix, task, segments) {
                        self.report.lost +=
                            u64::from(figures.segments - figures.completed.min(figures.segments))
                                .max(1);
                        return Err(v);
                    }
                    self.record_end(meta.as_ref(), true, figures);
                }
                LedgerOutput::TaskFailed {
                    task,
                    reason,
                    figures,
                } => {
                    self.log(format_args!("failed {task}: {reason}"));
                    let meta = self.take_task(ix, task);
                    self.checker.task_ended(ix, task);
                    self.record_end(meta.as_ref(), false, figures);
                    self.report.note_failure(&reason);
                }
            }
        }
        Ok(())
    }
}

impl Sim {
    /// A task of coordinator `ix` ended: it is no longer open there.
    fn take_task(&mut self, ix: NodeIx, task: Uuid) -> Option<TaskMeta> {
        self.open.remove(&(ix, task));
        self.nodes[ix].tasks.remove(&task)
    }

    fn record_end(&mut self, meta: Option<&TaskMeta>, completed: bool, figures: TaskFigures) {
        self.report.task_ended(TaskRecord {
            completed,
            priority: meta.map_or(128, |m| m.priority),
            submitted_us: meta.map_or(0, |m| m.submitted_us),
            ended_us: self.now_us,
            segments: figures.segments,
            completed_segments: figures.completed,
            reallocated: figures.reallocated,
        });
    }
}

/// A node's identity in the simulation: a made-up address, and an incarnation that
/// counts lives (deterministic, unlike the live node's clock-based one).
fn node_id(name: &str, ix: usize, incarnation: u64) -> NodeId {
    let ip = Ipv4Addr::new(10, 0, (ix / 250) as u8, (ix % 250) as u8 + 1);
    NodeId {
        name: Arc::from(name),
        addr: SocketAddr::new(ip.into(), 7600),
        incarnation,
    }
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Ok => "ok",
        Health::Degraded => "degraded",
        Health::Unhealthy => "unhealthy",
    }
}
