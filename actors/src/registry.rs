//! Discovery's registry, replicated on every node as a state machine with no I/O: each
//! node is authoritative for its own agents and tells the others; a dead node's agents
//! are purged; queries find capable agents with their load and health. Agent IDs are
//! chosen by the owning node without coordination, and a collision (two nodes picking
//! the same ID at once) is resolved the same way everywhere: the node whose name sorts
//! first keeps the ID, the other gives its agent a new one.
//!
//! Agents are kept in one list per node, found through one hash map keyed by Agent
//! ID and hashed with a per-registry seed: every node holds every agent of the
//! cluster, and a delta is a lookup and an insert per record, which a hash map does in
//! about one cache miss where a B-tree of 100,000 agents takes several (see
//! [`Registry`] for why per node). Walks over the agents follow the lists, in the order
//! records came, so a simulation run is repeatable; the seed comes from the caller, and
//! live nodes each hash differently.

use std::collections::hash_map::{Entry, VacantEntry};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use foldhash::fast::SeedableRandomState;
use foldhash::SharedSeed;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use slab::Slab;

use agentmesh_runtime::transport::wire::payload::{AgentInfo, Capability, Health};

/// One agent as the registry knows it. Its strings and capabilities are shared
/// (`Arc`), so the copies every node keeps of every agent cost a reference count, not
/// an allocation; on the wire they are plain strings and lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Its Agent ID, unique in the cluster.
    pub agent: u32,
    /// The node that runs it and owns the ID.
    pub node: Arc<str>,
    /// Its type name.
    pub agent_type: Arc<str>,
    /// Its coordination group.
    pub group: u16,
    /// What it can do.
    pub capabilities: Arc<[Capability]>,
    /// Segments in hand.
    pub load: u32,
    /// Its health.
    pub health: Health,
}

/// What one node tells the others about its agents.
///
/// Every change a node makes to its list takes its list's version one higher, and a
/// delta says which version it brings the list from (`since`) and to (`version`): a
/// receiver that holds the list at `since` is now at `version`; one that does not has
/// missed something (a delta dropped by a full queue, a broken connection, a
/// partition) and asks for the whole list. A delta with no change (`since ==
/// version`) is a summary, sent to every member every few seconds, so a receiver
/// also finds out what it missed when no change follows. Nodes before versions send
/// 0 and 0, and are taken at their word.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryDelta {
    /// The node speaking; it may only speak for its own agents.
    pub node: String,
    /// True if `upserts` is the node's whole list, replacing what was known of it.
    pub full: bool,
    /// Agents added or changed.
    pub upserts: Vec<AgentRecord>,
    /// Agents gone.
    pub removals: Vec<u32>,
    /// The version of the sender's list this delta applies to (for a whole list: the
    /// same as `version`).
    #[serde(default)]
    pub since: u64,
    /// The version of the sender's list once this delta is applied.
    #[serde(default)]
    pub version: u64,
    /// The sender asks for the receiver's whole list (it missed something of it).
    #[serde(default)]
    pub want_full: bool,
    /// A whole list longer than one message goes in `parts` deltas, each `full` with
    /// the same version, numbered `part` 1..=`parts` and sent in order; the receiver
    /// applies them together once the last is in (0 and 0: the whole list in one).
    #[serde(default)]
    pub part: u32,
    /// See `part`.
    #[serde(default)]
    pub parts: u32,
}

impl RegistryDelta {
    /// True for a summary or a request for a whole list: no records, nothing to apply.
    pub fn is_summary(&self) -> bool {
        !self.full && self.upserts.is_empty() && self.removals.is_empty()
    }
}

/// Something the registry asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryOutput {
    /// Send this delta to every other node.
    Broadcast(RegistryDelta),
    /// `node` owns `agents` (for the transport's ownership table). Consecutive news of
    /// one node's agents come as one output: a node's whole list, applied on another
    /// node, makes one output rather than one per agent.
    Own {
        /// The Agent IDs, in the order they were taken up.
        agents: Vec<u32>,
        /// Their node.
        node: Arc<str>,
    },
    /// Nobody owns `agents` any more (consecutive news come as one output, as for
    /// [`RegistryOutput::Own`]: a node that went down makes one).
    Disown {
        /// The Agent IDs.
        agents: Vec<u32>,
    },
    /// Send this delta to `to` only: this node's whole list, which `to` asked for, or
    /// a request for `to`'s whole list, after something of it was missed here.
    Send {
        /// The node.
        to: Arc<str>,
        /// What to send it.
        delta: RegistryDelta,
    },
    /// A local agent lost an ID collision and now has a new ID.
    Reidentified {
        /// The ID it had.
        old: u32,
        /// The ID it has now.
        new: u32,
    },
}

/// Why a registration was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry holds as many agents as it may.
    #[error("the registry is full ({0} agents)")]
    Full(usize),
    /// An agent must offer at least one capability.
    #[error("an agent must offer at least one capability")]
    NoCapability,
}

/// Why a delta from another node was refused (it is dropped; the node goes on).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta speaks for another node than the one that sent it.
    #[error("{sender} sent a delta for {claimed}")]
    NotItsOwn {
        /// The authenticated sender.
        sender: String,
        /// The node the delta claims to be.
        claimed: String,
    },
}

/// One node's agents, as held here.
struct NodeAgents {
    /// The node's name: the one shared copy every record of the node points to.
    name: Arc<str>,
    /// Whether [`Registry::capable`] offers these agents: this node's, or a node
    /// membership reports up. A node's delta can arrive before membership reports it
    /// up (it sends its list when *it* sees this node); if such a node crashed and came
    /// back before this node ever saw it up, no "down" would ever come for the life its
    /// segments were on, and they would wait for good (the simulator found this: chaos
    /// under `crash=0.1,restart=100ms`, seed 23).
    offered: bool,
    /// Its records, side by side in the order they came (a removal moves the last one
    /// into the gap); [`Registry::index`] holds where each one is.
    records: Vec<AgentRecord>,
}

/// Where a record is held: its node's slot, and its position in that node's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    slot: u32,
    pos: u32,
}

/// The registry on one node.
///
/// Records are kept per node, side by side in a list, and one index maps each Agent
/// ID to its node's slot and its place in that list. What the registry does most
/// often touches one node at a time (a delta speaks for one node, a node that goes
/// down takes all its agents with it), so that work stays within one node's list, and
/// a walk over the candidates for a capability reads memory in order. With one table
/// of all records, a node's crash cost a cache miss per agent in a table of every
/// agent of the cluster; with a hash table per node, the records took nearly twice
/// the memory (a table is at most seven-eighths full, and grows by doubling) and every
/// new record cost two hash insertions instead of one.
pub struct Registry {
    me: Arc<str>,
    max_agents: usize,
    /// Agent ID → the slot in `nodes` of the node holding it, and its place there.
    index: HashMap<u32, Place, SeedableRandomState>,
    /// The nodes with records here, by slot; a node whose last record goes frees its
    /// slot for the next node.
    nodes: Slab<NodeAgents>,
    /// Node name → its slot in `nodes`.
    slots: HashMap<Arc<str>, u32, SeedableRandomState>,
    /// The other nodes membership reports up (see [`NodeAgents::offered`]).
    up: HashSet<Arc<str>, SeedableRandomState>,
    hasher: SeedableRandomState,
    rng: StdRng,
    outputs: VecDeque<RegistryOutput>,
    /// The news not yet polled, gathered into one delta (see [`Registry::poll`]).
    unsent: Option<RegistryDelta>,
    /// The version of this node's list: how many deltas of its changes went out.
    version: u64,
    /// Per other node that sent a delta: the version of its list held here, or `None`
    /// once a delta was missed and until its whole list arrives. A node not in it is
    /// held at 0, the version of an empty list; one declared down leaves it.
    held: HashMap<Arc<str>, Option<u64>, SeedableRandomState>,
    /// An agent's load went down, or it came back from unhealthy, since
    /// [`Registry::take_capacity_freed`] last asked.
    capacity_freed: bool,
    /// Bytes of records in one part of this node's whole list, at most
    /// ([`Registry::set_part_bytes`]).
    part_bytes: usize,
    /// Per other node sending its whole list in parts: the parts in so far.
    gathering: HashMap<Arc<str>, Gathering, SeedableRandomState>,
}

/// A whole list coming in parts: the version it is of, its part count, the next part
/// expected and the records of those before.
struct Gathering {
    version: u64,
    parts: u32,
    next: u32,
    records: Vec<AgentRecord>,
}

/// Bytes of records in one part of a whole list, unless [`Registry::set_part_bytes`]
/// says otherwise: a 16 MiB message less room for the rest.
pub const DEFAULT_PART_BYTES: usize = 16 * 1024 * 1024 - 64 * 1024;

/// At most what `record` takes as msgpack with field names (as deltas are sent): the
/// fixed fields and every length header at their largest, and its strings.
pub fn record_bytes(record: &AgentRecord) -> usize {
    let capabilities: usize = record
        .capabilities
        .iter()
        .map(|c| {
            48 + c.name.len() + c.version.len() + c.tags.iter().map(|t| t.len() + 5).sum::<usize>()
        })
        .sum();
    96 + record.node.len() + record.agent_type.len() + capabilities
}

impl Registry {
    /// The registry of node `me`, holding at most `max_agents` agents cluster-wide.
    pub fn new(me: &str, max_agents: usize, seed: u64) -> Registry {
        let hasher = SeedableRandomState::with_seed(seed, SharedSeed::global_fixed());
        Registry {
            me: Arc::from(me),
            max_agents,
            index: HashMap::with_hasher(hasher.clone()),
            nodes: Slab::new(),
            slots: HashMap::with_hasher(hasher.clone()),
            up: HashSet::with_hasher(hasher.clone()),
            rng: StdRng::seed_from_u64(seed),
            outputs: VecDeque::new(),
            unsent: None,
            version: 0,
            held: HashMap::with_hasher(hasher.clone()),
            capacity_freed: false,
            part_bytes: DEFAULT_PART_BYTES,
            gathering: HashMap::with_hasher(hasher.clone()),
            hasher,
        }
    }

    /// Sets how many bytes of records one part of this node's whole list carries at
    /// most ([`record_bytes`] each; at least one record a part): below the message
    /// size the nodes take, less room for the rest of the message.
    pub fn set_part_bytes(&mut self, bytes: usize) {
        self.part_bytes = bytes;
    }

    /// Makes room for `agents` agents at once (at most the registry's bound), for a
    /// caller that knows how many to expect: the index then never grows and rehashes
    /// on the way there.
    pub fn reserve(&mut self, agents: usize) {
        let more = agents.min(self.max_agents).saturating_sub(self.index.len());
        self.index.reserve(more);
    }

    /// Takes the next thing to do. News made between two polls (a burst of
    /// registrations) comes out as one `Broadcast`, after the other outputs, unless a
    /// removal would otherwise undo an upsert it follows: then the deltas stay apart,
    /// in order.
    pub fn poll(&mut self) -> Option<RegistryOutput> {
        match self.outputs.pop_front() {
            Some(output) => Some(output),
            None => self.close_unsent().map(RegistryOutput::Broadcast),
        }
    }

    /// Agents known, cluster-wide.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True if no agent is known.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Every agent known, node by node.
    pub fn records(&self) -> impl Iterator<Item = &AgentRecord> {
        self.nodes.iter().flat_map(|(_, n)| n.records.iter())
    }

    /// The record of `agent`.
    pub fn get(&self, agent: u32) -> Option<&AgentRecord> {
        let at = *self.index.get(&agent)?;
        self.node(at.slot).records.get(at.pos as usize)
    }

    /// Registers a local agent: picks an unused ID, records it, and asks for the news
    /// to be broadcast (REGISTER handled; the record is the REGISTER_ACK's content).
    /// The type and capabilities may be shared (`Arc`) by many agents of one kind.
    pub fn register(
        &mut self,
        agent_type: impl Into<Arc<str>>,
        capabilities: impl Into<Arc<[Capability]>>,
        group: u16,
    ) -> Result<AgentRecord, RegistryError> {
        let capabilities = capabilities.into();
        if capabilities.is_empty() {
            return Err(RegistryError::NoCapability);
        }
        if self.len() >= self.max_agents {
            return Err(RegistryError::Full(self.max_agents));
        }
        let slot = self.slot(&self.me.clone());
        let record = AgentRecord {
            agent: self.fresh_id(),
            node: self.node(slot).name.clone(),
            agent_type: agent_type.into(),
            group,
            capabilities,
            load: 0,
            health: Health::Ok,
        };
        self.insert_at(slot, record.clone());
        self.broadcast(vec![record.clone()], Vec::new());
        Ok(record)
    }

    /// Removes a local agent.
    pub fn deregister(&mut self, agent: u32) {
        if self.get(agent).is_some_and(|r| r.node == self.me) {
            self.remove(agent);
            self.broadcast(Vec::new(), vec![agent]);
        }
    }

    /// Whether an agent's load went down (a worker freed, here or on another node) or
    /// it came back from unhealthy since the last call: waiting work may be offered
    /// again.
    pub fn take_capacity_freed(&mut self) -> bool {
        std::mem::take(&mut self.capacity_freed)
    }

    /// Updates a local agent's load and health, and spreads the change.
    pub fn update(&mut self, agent: u32, load: u32, health: Health) {
        let Some(&slot) = self.slots.get(&*self.me) else {
            return;
        };
        let Some(at) = self.index.get(&agent).copied().filter(|at| at.slot == slot) else {
            return;
        };
        let record = &mut self.node_mut(slot).records[at.pos as usize];
        if (record.load, record.health) == (load, health) {
            return;
        }
        let freed = frees_capacity(record, load, health);
        record.load = load;
        record.health = health;
        let record = record.clone();
        self.capacity_freed |= freed;
        self.broadcast(vec![record], Vec::new());
    }

    /// The delta that tells a node that has just come up (or asked for it) about every
    /// local agent.
    pub fn full_delta(&self) -> RegistryDelta {
        RegistryDelta {
            full: true,
            upserts: self.local_records(),
            ..self.summary()
        }
    }

    /// [`Registry::full_delta`] in as many parts as its records need
    /// ([`Registry::set_part_bytes`]): one delta if they fit in one.
    pub fn full_parts(&self) -> Vec<RegistryDelta> {
        let mut whole = self.full_delta();
        // How many records each part takes.
        let mut sizes = vec![0usize];
        let mut bytes = 0;
        for record in &whole.upserts {
            let len = record_bytes(record);
            let last = sizes.len() - 1;
            if sizes[last] > 0 && bytes + len > self.part_bytes {
                sizes.push(0);
                bytes = 0;
            }
            bytes += len;
            let last = sizes.len() - 1;
            sizes[last] += 1;
        }
        if sizes.len() == 1 {
            return vec![whole];
        }
        let parts = sizes.len() as u32;
        let mut records = std::mem::take(&mut whole.upserts).into_iter();
        sizes
            .into_iter()
            .enumerate()
            .map(|(i, size)| RegistryDelta {
                upserts: records.by_ref().take(size).collect(),
                part: i as u32 + 1,
                parts,
                ..whole.clone()
            })
            .collect()
    }

    /// The summary every member gets every few seconds: no change, only the version
    /// of this node's list, which a member that missed a delta finds it does not hold
    /// (and asks for the whole list). Its size does not grow with the list's.
    pub fn summary(&self) -> RegistryDelta {
        RegistryDelta {
            node: self.me.to_string(),
            full: false,
            upserts: Vec::new(),
            removals: Vec::new(),
            since: self.version,
            version: self.version,
            want_full: false,
            part: 0,
            parts: 0,
        }
    }

    /// Applies a delta sent by `sender` (the authenticated peer). A record the registry
    /// already holds for that node is updated in place, and the copies it keeps share
    /// the sender's strings, so a full delta repeated when a node is seen again costs a
    /// comparison per agent, not an allocation.
    pub fn handle_delta(&mut self, sender: &str, delta: &RegistryDelta) -> Result<(), DeltaError> {
        if delta.node != sender || sender == &*self.me {
            return Err(DeltaError::NotItsOwn {
                sender: sender.to_string(),
                claimed: delta.node.clone(),
            });
        }
        if delta.is_summary() {
            self.track(sender, delta);
            return Ok(());
        }
        if delta.full && delta.parts > 1 {
            // Applied once every part is in, as one whole list: applied part by part,
            // each would drop the agents of the others, which a coordinator would then
            // miss in between.
            if let Some(whole) = self.gather(sender, delta) {
                return self.handle_delta(sender, &whole);
            }
            return Ok(());
        }
        let slot = self.slot(sender);
        if delta.full {
            let mut keep =
                HashSet::with_capacity_and_hasher(delta.upserts.len(), self.hasher.clone());
            keep.extend(delta.upserts.iter().map(|r| r.agent));
            let dropped: Vec<u32> = self
                .node(slot)
                .records
                .iter()
                .map(|r| r.agent)
                .filter(|id| !keep.contains(id))
                .collect();
            for agent in dropped {
                self.remove_at(slot, agent);
            }
        }
        for &agent in &delta.removals {
            // Only the sender's own: `remove_at` leaves another node's agent alone.
            self.remove_at(slot, agent);
        }
        // Room for a large delta (a node's whole list, a burst of registrations) at
        // once, rather than growing the index step by step while applying it. A whole
        // list repeats what is held of the sender (its other records were dropped
        // above), so only the rest needs room. The index's growth history decides its
        // iteration order (nothing follows it: candidate lists follow the records'
        // order).
        let held = self.node(slot).records.len();
        let news = if delta.full {
            delta.upserts.len().saturating_sub(held)
        } else {
            delta.upserts.len()
        };
        let news = news.min(self.max_agents - self.len().min(self.max_agents));
        self.index.reserve(news);
        self.node_mut(slot).records.reserve(news);
        for record in &delta.upserts {
            self.upsert(slot, record);
        }
        self.free_if_empty(slot);
        self.track(sender, delta);
        Ok(())
    }

    /// Takes one part of `sender`'s whole list; the whole list once its last part is
    /// in. A part that does not follow the ones before drops them: the sender's next
    /// summary then finds its list not held here, and it is asked for again. The parts
    /// held are bounded by the registry's size.
    fn gather(&mut self, sender: &str, part: &RegistryDelta) -> Option<RegistryDelta> {
        let follows = |g: &Gathering| {
            g.version == part.version && g.parts == part.parts && g.next == part.part
        };
        if part.part == 1 {
            self.gathering.insert(
                Arc::from(sender),
                Gathering {
                    version: part.version,
                    parts: part.parts,
                    next: 1,
                    records: Vec::new(),
                },
            );
        }
        let gathering = self.gathering.get_mut(sender).filter(|g| follows(g));
        let Some(gathering) = gathering else {
            self.gathering.remove(sender);
            return None;
        };
        if gathering.records.len() + part.upserts.len() > self.max_agents {
            self.gathering.remove(sender);
            return None;
        }
        gathering.records.extend(part.upserts.iter().cloned());
        gathering.next += 1;
        if gathering.next <= gathering.parts {
            return None;
        }
        let done = self.gathering.remove(sender)?;
        Some(RegistryDelta {
            node: sender.to_string(),
            full: true,
            upserts: done.records,
            removals: Vec::new(),
            since: done.version,
            version: done.version,
            want_full: false,
            part: 0,
            parts: 0,
        })
    }

    /// Keeps the version of `node`'s list held here up to date after `delta` from it,
    /// asks for its whole list if something of it was missed, and answers its request
    /// for ours. A request goes out when the list held here first falls behind, and
    /// again at each summary that finds it still behind (a lost request is retried).
    fn track(&mut self, node: &str, delta: &RegistryDelta) {
        if delta.want_full {
            for part in self.full_parts() {
                self.outputs.push_back(RegistryOutput::Send {
                    to: Arc::from(node),
                    delta: part,
                });
            }
        }
        // A node not heard of yet is held at version 0: its empty list.
        let held = self.held.get(node).copied().unwrap_or(Some(0));
        let now = if delta.full || held == Some(delta.since) {
            Some(delta.version)
        } else {
            None
        };
        if now.is_none() && (held.is_some() || delta.is_summary()) {
            let request = RegistryDelta {
                want_full: true,
                ..self.summary()
            };
            self.outputs.push_back(RegistryOutput::Send {
                to: Arc::from(node),
                delta: request,
            });
        }
        match self.held.get_mut(node) {
            Some(held) => *held = now,
            None => {
                self.held.insert(Arc::from(node), now);
            }
        }
    }

    /// Applies one record sent by the node in `slot` (it speaks for itself, whatever
    /// node the record names).
    fn upsert(&mut self, slot: u32, record: &AgentRecord) {
        let len = self.index.len();
        let holder_first = match self.index.entry(record.agent) {
            Entry::Occupied(at) if at.get().slot == slot => {
                // Known, and the sender's already: only what changed is replaced.
                let at = *at.get();
                let held = &mut self.node_mut(slot).records[at.pos as usize];
                let freed = frees_capacity(held, record.load, record.health);
                update(held, record);
                self.capacity_freed |= freed;
                return;
            }
            Entry::Occupied(held) => {
                self.nodes[held.get().slot as usize].name < self.nodes[slot as usize].name
            }
            Entry::Vacant(new) => {
                // New here (the usual case): one lookup places it.
                if len >= self.max_agents {
                    return;
                }
                let copy = held_copy(&self.nodes[slot as usize].name, record);
                push_new(&mut self.nodes, new, slot, copy);
                return self.tell_owner(slot, record.agent);
            }
        };
        if holder_first {
            // The holder sorts first and keeps the ID; the sender will move its agent
            // when it hears of the holder's.
            return;
        }
        // The sender sorts first and takes the ID.
        let record = held_copy(&self.node(slot).name, record);
        if let Some(ours) = self.remove(record.agent).filter(|r| r.node == self.me) {
            self.insert_at(slot, record);
            return self.move_local(ours);
        }
        if self.len() >= self.max_agents {
            return;
        }
        self.insert_at(slot, record);
    }

    /// Membership reports `node` up: its agents may be offered from now on.
    pub fn handle_node_up(&mut self, node: &str) {
        if *node != *self.me && !self.up.contains(node) {
            let name = match self.slots.get(node) {
                Some(&slot) => {
                    let n = self.node_mut(slot);
                    n.offered = true;
                    n.name.clone()
                }
                None => Arc::from(node),
            };
            self.up.insert(name);
        }
    }

    /// Purges every agent of a node that is down.
    pub fn handle_node_down(&mut self, node: &str) {
        self.up.remove(node);
        self.held.remove(node);
        self.gathering.remove(node);
        // Every record of the node goes: its whole table at once.
        let Some(gone) = self
            .slots
            .remove(node)
            .and_then(|slot| self.nodes.try_remove(slot as usize))
        else {
            return;
        };
        for record in gone.records {
            self.index.remove(&record.agent);
            self.disowned(record.agent);
        }
    }

    /// Every agent offering `capability` with every one of `tags`, with that capability,
    /// on this node or on a node membership reports up, in the registry's order (the
    /// same for the same seed and history), borrowed (for callers that need only a few
    /// fields).
    pub fn capable<'a>(
        &'a self,
        capability: &'a str,
        tags: &'a [String],
    ) -> impl Iterator<Item = (&'a AgentRecord, &'a Capability)> + 'a {
        self.nodes
            .iter()
            .map(|(_, n)| n)
            .filter(|n| n.offered)
            .flat_map(|n| n.records.iter())
            .scan(None::<(&[Capability], Option<usize>)>, move |last, r| {
                // Agents registered together share one capability list: the answer for
                // the last list seen holds for the same list again.
                let found = match last {
                    Some((list, found)) if std::ptr::eq(*list, &*r.capabilities) => *found,
                    _ => {
                        let found = position(r, capability, tags);
                        *last = Some((&r.capabilities, found));
                        found
                    }
                };
                Some(found.map(|i| (r, &r.capabilities[i])))
            })
            .flatten()
    }

    /// How many agents offering `capability` with every one of `tags` are held but not
    /// offered, because membership has not reported their node up (yet). A coordinator
    /// that finds no offered agent waits for these rather than failing the task.
    pub fn capable_unwatched(&self, capability: &str, tags: &[String]) -> usize {
        self.nodes
            .iter()
            .map(|(_, n)| n)
            .filter(|n| !n.offered)
            .flat_map(|n| n.records.iter())
            .filter(|r| offers(r, capability, tags).is_some())
            .count()
    }

    /// Agents offering `capability` with every one of `tags`, healthiest and least
    /// loaded first, at most `limit` (0: all).
    pub fn query(&self, capability: &str, tags: &[String], limit: usize) -> Vec<AgentInfo> {
        let mut found: Vec<AgentInfo> = self
            .capable(capability, tags)
            .map(|(r, cap)| AgentInfo {
                agent: r.agent,
                node: r.node.to_string(),
                agent_type: r.agent_type.to_string(),
                group: r.group,
                capability: cap.clone(),
                load: r.load,
                health: r.health,
            })
            .collect();
        let health_rank = |h: Health| match h {
            Health::Ok => 0,
            Health::Degraded => 1,
            Health::Unhealthy => 2,
        };
        found.sort_by_key(|a| {
            let share = u64::from(a.load) * 1000 / u64::from(a.capability.capacity.max(1));
            (health_rank(a.health), share, a.agent)
        });
        if limit > 0 {
            found.truncate(limit);
        }
        found
    }

    fn local_records(&self) -> Vec<AgentRecord> {
        match self.slots.get(&*self.me) {
            Some(&slot) => self.node(slot).records.clone(),
            None => Vec::new(),
        }
    }

    /// Gives a local agent that lost its ID a fresh one, and says so.
    fn move_local(&mut self, mut ours: AgentRecord) {
        let old = ours.agent;
        ours.agent = self.fresh_id();
        let new = ours.agent;
        let slot = self.slot(&self.me.clone());
        self.insert_at(slot, ours.clone());
        self.outputs
            .push_back(RegistryOutput::Reidentified { old, new });
        self.broadcast(vec![ours], vec![old]);
    }

    fn fresh_id(&mut self) -> u32 {
        loop {
            let id = self.rng.random_range(1..=u32::MAX);
            if !self.index.contains_key(&id) {
                return id;
            }
        }
    }

    /// The node in `slot`, which is in use (`slots` and `index` only name slots in
    /// use).
    fn node(&self, slot: u32) -> &NodeAgents {
        &self.nodes[slot as usize]
    }

    fn node_mut(&mut self, slot: u32) -> &mut NodeAgents {
        &mut self.nodes[slot as usize]
    }

    /// The slot of `node`, taken (empty) if it has none.
    fn slot(&mut self, node: &str) -> u32 {
        if let Some(&slot) = self.slots.get(node) {
            return slot;
        }
        let name: Arc<str> = Arc::from(node);
        let table = NodeAgents {
            offered: name == self.me || self.up.contains(&name),
            name: name.clone(),
            records: Vec::new(),
        };
        let slot = self.nodes.insert(table) as u32;
        self.slots.insert(name, slot);
        slot
    }

    /// Frees `slot` if its node has no record left.
    fn free_if_empty(&mut self, slot: u32) {
        if self.node(slot).records.is_empty() {
            let n = self.nodes.remove(slot as usize);
            self.slots.remove(&n.name);
        }
    }

    /// Holds `record` (of the node in `slot`, whose name it shares) and tells of its
    /// owner. Its ID is unused, or already the node's.
    fn insert_at(&mut self, slot: u32, record: AgentRecord) {
        let agent = record.agent;
        match self.index.entry(agent) {
            Entry::Occupied(held) => {
                let at = *held.get();
                debug_assert_eq!(at.slot, slot, "an ID held by another node");
                self.nodes[at.slot as usize].records[at.pos as usize] = record;
                return;
            }
            Entry::Vacant(new) => push_new(&mut self.nodes, new, slot, record),
        }
        self.tell_owner(slot, agent);
    }

    /// Tells that the node in `slot` now owns `agent`, in the last ownership output if
    /// it is that node's.
    fn tell_owner(&mut self, slot: u32, agent: u32) {
        let node = &self.nodes[slot as usize].name;
        match self.outputs.back_mut() {
            Some(RegistryOutput::Own { agents, node: last }) if Arc::ptr_eq(last, node) => {
                agents.push(agent)
            }
            _ => self.outputs.push_back(RegistryOutput::Own {
                agents: vec![agent],
                node: node.clone(),
            }),
        }
    }

    /// Drops `agent` from the node in `slot`, which keeps its slot even if empty; an
    /// agent held for another node stays.
    fn remove_at(&mut self, slot: u32, agent: u32) -> Option<AgentRecord> {
        let at = match self.index.entry(agent) {
            Entry::Occupied(held) if held.get().slot == slot => held.remove(),
            _ => return None,
        };
        let records = &mut self.node_mut(slot).records;
        let record = records.swap_remove(at.pos as usize);
        // The last record took the gap.
        if let Some(moved) = records.get(at.pos as usize).map(|r| r.agent) {
            if let Some(place) = self.index.get_mut(&moved) {
                place.pos = at.pos;
            }
        }
        self.disowned(agent);
        Some(record)
    }

    fn remove(&mut self, agent: u32) -> Option<AgentRecord> {
        let slot = self.index.get(&agent)?.slot;
        let record = self.remove_at(slot, agent);
        self.free_if_empty(slot);
        record
    }

    fn disowned(&mut self, agent: u32) {
        match self.outputs.back_mut() {
            Some(RegistryOutput::Disown { agents }) => agents.push(agent),
            _ => self.outputs.push_back(RegistryOutput::Disown {
                agents: vec![agent],
            }),
        }
    }

    fn broadcast(&mut self, upserts: Vec<AgentRecord>, removals: Vec<u32>) {
        if let Some(unsent) = &mut self.unsent {
            // A receiver applies a delta's removals before its upserts, so a removal
            // may join a delta only if it holds no upserts (one could be of the same
            // agent); upserts may always join.
            if removals.is_empty() || unsent.upserts.is_empty() {
                unsent.upserts.extend(upserts);
                unsent.removals.extend(removals);
                return;
            }
            let earlier = self.close_unsent().map(RegistryOutput::Broadcast);
            self.outputs.extend(earlier);
        }
        self.unsent = Some(RegistryDelta {
            node: self.me.to_string(),
            full: false,
            upserts,
            removals,
            since: 0,
            version: 0,
            want_full: false,
            part: 0,
            parts: 0,
        });
    }

    /// Takes the news gathered so far as the next version of this node's list.
    fn close_unsent(&mut self) -> Option<RegistryDelta> {
        let mut delta = self.unsent.take()?;
        delta.since = self.version;
        self.version += 1;
        delta.version = self.version;
        Some(delta)
    }
}

/// Holds `record`, whose ID the index has no place for yet, at the end of the list of
/// the node in `slot`, and gives the ID that place.
#[inline]
fn push_new(
    nodes: &mut Slab<NodeAgents>,
    new: VacantEntry<'_, u32, Place>,
    slot: u32,
    record: AgentRecord,
) {
    let records = &mut nodes[slot as usize].records;
    new.insert(Place {
        slot,
        pos: records.len() as u32,
    });
    records.push(record);
}

/// A copy of `record` held for the node named `node` (sharing that one name).
fn held_copy(node: &Arc<str>, record: &AgentRecord) -> AgentRecord {
    AgentRecord {
        agent: record.agent,
        node: node.clone(),
        agent_type: record.agent_type.clone(),
        group: record.group,
        capabilities: record.capabilities.clone(),
        load: record.load,
        health: record.health,
    }
}

/// Brings a record up to date with what its node now says, replacing only what changed
/// (shared strings and capability lists are kept when they are equal).
fn update(held: &mut AgentRecord, news: &AgentRecord) {
    if held.agent_type != news.agent_type {
        held.agent_type = news.agent_type.clone();
    }
    if held.capabilities != news.capabilities {
        held.capabilities = news.capabilities.clone();
    }
    held.group = news.group;
    held.load = news.load;
    held.health = news.health;
}

/// The capability `record` offers under that name with every one of `tags`, if any.
fn offers<'a>(
    record: &'a AgentRecord,
    capability: &str,
    tags: &[String],
) -> Option<&'a Capability> {
    position(record, capability, tags).map(|i| &record.capabilities[i])
}

/// Where `capability` with every one of `tags` is in the record's capabilities.
fn position(record: &AgentRecord, capability: &str, tags: &[String]) -> Option<usize> {
    record
        .capabilities
        .iter()
        .position(|c| c.name == capability && tags.iter().all(|t| c.tags.contains(t)))
}

/// Whether `held` taking `load` and `health` can free room for waiting work: its load
/// went down, or it came back from unhealthy (coordinators treat an unhealthy agent as
/// full).
fn frees_capacity(held: &AgentRecord, load: u32, health: Health) -> bool {
    load < held.load || (held.health == Health::Unhealthy && health != Health::Unhealthy)
}
