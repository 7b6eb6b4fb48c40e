//! Cluster membership and failure detection as a state machine with no I/O: foca's
//! SWIM (with the infection and suspicion extensions) over node identities that name
//! the node, its address and its incarnation. The caller feeds it gossip and timer
//! events and carries out what it asks: bytes to send, timers to set, members up and
//! down. Nothing here reads a clock; the only randomness is a seeded RNG.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use foca::{
    AccumulatingRuntime, Codec, Config, Foca, Message, NoCustomBroadcast, OwnedNotification,
    PostcardCodec,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use foca::Timer;

/// A node as membership knows it. The name is the key: one live incarnation per name.
///
/// Encoded (for foca's gossip, opaque to ACP) as its name, its address as one byte
/// string (4 or 16 address bytes, then the port, big-endian) and its incarnation:
/// three calls into the serializer rather than one per address byte, which is what
/// serde's `SocketAddr` costs (every gossip datagram carries several identities).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(from = "WireNodeId<'_>")]
pub struct NodeId {
    /// The node's name, as in its certificate (shared: foca compares and copies
    /// identities' names on every update it applies).
    pub name: Arc<str>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Which life of the node this is, and which renewal within that life: the life
    /// in the high bits (see [`NodeId::life`]), renewals in the low
    /// [`RENEWAL_BITS`]. A restarted node takes a higher life (its start time in
    /// milliseconds), so it replaces its former self at once; a live node declared
    /// down renews itself within its life (`incarnation + 1`), which the others can
    /// tell from a restart.
    pub incarnation: u64,
}

/// Low bits of [`NodeId::incarnation`] that count renewals within one life.
pub const RENEWAL_BITS: u32 = 16;

impl NodeId {
    /// The first incarnation of life `life` (a restart's start time in milliseconds,
    /// or any number higher than the life before).
    pub fn first_of_life(life: u64) -> u64 {
        life.saturating_mul(1 << RENEWAL_BITS)
    }

    /// Which life of its node this identity belongs to: a renewal keeps it, a restart
    /// takes a higher one. After 65,535 renewals in one life the count carries over
    /// into the life, and the next renewal looks like a restart (which is safe: its
    /// segments are reallocated once).
    pub fn life(&self) -> u64 {
        NodeId::life_of(self.incarnation)
    }

    /// The life an incarnation belongs to (see [`NodeId::life`]).
    pub fn life_of(incarnation: u64) -> u64 {
        incarnation >> RENEWAL_BITS
    }

    /// The first incarnation of the life after `incarnation`'s: a restart's, which
    /// the others tell from a renewal.
    pub fn first_of_next_life(incarnation: u64) -> u64 {
        NodeId::first_of_life(NodeId::life_of(incarnation).saturating_add(1))
    }
}

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut addr = [0u8; 18];
        let len = match self.addr {
            SocketAddr::V4(a) => {
                addr[..4].copy_from_slice(&a.ip().octets());
                addr[4..6].copy_from_slice(&a.port().to_be_bytes());
                6
            }
            SocketAddr::V6(a) => {
                addr[..16].copy_from_slice(&a.ip().octets());
                addr[16..].copy_from_slice(&a.port().to_be_bytes());
                18
            }
        };
        let mut s = serializer.serialize_struct("NodeId", 3)?;
        s.serialize_field("name", &*self.name)?;
        s.serialize_field("addr", &WireAddrBytes(&addr[..len]))?;
        s.serialize_field("incarnation", &self.incarnation)?;
        s.end()
    }
}

/// An address's bytes, serialized as one byte string.
struct WireAddrBytes<'a>(&'a [u8]);

impl Serialize for WireAddrBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// `NodeId` as it is decoded: the name borrowed from the datagram when the format
/// allows, so that it is copied once, into its `Arc`, instead of into a `String` first.
#[derive(Deserialize)]
#[serde(rename = "NodeId")]
struct WireNodeId<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    addr: WireAddr,
    incarnation: u64,
}

/// A `SocketAddr` read from its byte string (see [`NodeId`]); any other length is
/// refused, and with it the datagram.
struct WireAddr(SocketAddr);

impl<'de> Deserialize<'de> for WireAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<WireAddr, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = WireAddr;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("6 or 18 address bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<WireAddr, E> {
                let port = |p: &[u8]| u16::from_be_bytes([p[0], p[1]]);
                match b.len() {
                    6 => {
                        let ip: [u8; 4] = [b[0], b[1], b[2], b[3]];
                        Ok(WireAddr(SocketAddr::from((ip, port(&b[4..])))))
                    }
                    18 => {
                        let mut ip = [0u8; 16];
                        ip.copy_from_slice(&b[..16]);
                        Ok(WireAddr(SocketAddr::from((ip, port(&b[16..])))))
                    }
                    n => Err(E::invalid_length(n, &self)),
                }
            }
        }
        deserializer.deserialize_bytes(Visit)
    }
}

impl From<WireNodeId<'_>> for NodeId {
    fn from(w: WireNodeId<'_>) -> NodeId {
        NodeId {
            name: Arc::from(&*w.name),
            addr: w.addr.0,
            incarnation: w.incarnation,
        }
    }
}

impl foca::Identity for NodeId {
    type Addr = Arc<str>;

    /// After being declared down, a live node comes back as its next incarnation.
    fn renew(&self) -> Option<NodeId> {
        Some(NodeId {
            incarnation: self.incarnation.saturating_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> Arc<str> {
        self.name.clone()
    }

    fn win_addr_conflict(&self, adversary: &NodeId) -> bool {
        self.incarnation > adversary.incarnation
    }
}

/// Failure-detection timing. The defaults declare a node that stops answering down in
/// under a second on a LAN or loopback; see `docs/architecture.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MembershipConfig {
    /// How often each node probes one random member.
    pub probe_period_ms: u64,
    /// How long a direct probe may take before indirect probes go out.
    pub probe_rtt_ms: u64,
    /// How long a member stays suspect before it is declared down.
    pub suspect_to_down_after_ms: u64,
    /// How long a down member is remembered (so a stale copy cannot come back).
    pub remove_down_after_ms: u64,
    /// How often each node gossips to a few members, and how many.
    pub gossip_period_ms: u64,
    /// Largest gossip packet, in bytes (it must fit a QUIC datagram).
    pub max_packet_bytes: usize,
    /// While this node is out of the cluster (not yet joined, cut off from every
    /// member, or just renewed after being declared down), how often it announces
    /// itself again to a few of the nodes it knows (at least every 10 ms, so a zero
    /// cannot make it spin).
    pub reannounce_ms: u64,
    /// How often this node announces itself to one member it holds down (0: never).
    /// Two groups cut apart by a partition each see the other down and stay connected
    /// among themselves, so neither re-announces; without this they would never merge
    /// again once the partition heals. A down member is remembered for
    /// `remove_down_after_ms`, which bounds the partitions this heals.
    pub down_announce_ms: u64,
    /// How often a connected node announces itself to one of the nodes it joined
    /// through that is not a member it holds up (0: never). foca forgets a down member
    /// after `remove_down_after_ms`; two groups apart for longer know nothing of each
    /// other any more, and only the join contacts, which are never forgotten, can
    /// bring them together again.
    pub contact_announce_ms: u64,
}

impl Default for MembershipConfig {
    fn default() -> MembershipConfig {
        MembershipConfig {
            probe_period_ms: 150,
            probe_rtt_ms: 60,
            suspect_to_down_after_ms: 250,
            remove_down_after_ms: 30_000,
            gossip_period_ms: 100,
            max_packet_bytes: 1_100,
            reannounce_ms: 300,
            down_announce_ms: 500,
            contact_announce_ms: 5_000,
        }
    }
}

impl MembershipConfig {
    fn foca(&self) -> Config {
        let mut config = Config::simple();
        config.probe_period = Duration::from_millis(self.probe_period_ms);
        config.probe_rtt = Duration::from_millis(self.probe_rtt_ms);
        config.num_indirect_probes = NonZeroUsize::MIN.saturating_add(1);
        config.max_transmissions = NonZeroU8::new(6).unwrap_or(NonZeroU8::MIN);
        config.suspect_to_down_after = Duration::from_millis(self.suspect_to_down_after_ms);
        config.remove_down_after = Some(Duration::from_millis(self.remove_down_after_ms));
        config.max_packet_size =
            NonZeroUsize::new(self.max_packet_bytes).unwrap_or(NonZeroUsize::MIN);
        config.notify_down_members = true;
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(self.gossip_period_ms),
            num_members: NonZeroUsize::MIN.saturating_add(2),
        });
        config.periodic_announce_to_down_members =
            (self.down_announce_ms > 0).then(|| foca::PeriodicParams {
                frequency: Duration::from_millis(self.down_announce_ms),
                num_members: NonZeroUsize::MIN,
            });
        config
    }
}

/// What a node believes of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Answering.
    Up,
    /// Not answering lately; declared down unless it refutes in time.
    Suspect,
    /// Failed or left.
    Down,
}

/// Something membership asks its driver to do.
#[derive(Debug)]
pub enum MembershipOutput {
    /// Send these bytes to that node (as an ACP MEMBERSHIP frame).
    Send {
        /// The node.
        to: NodeId,
        /// foca's encoded message.
        data: Bytes,
    },
    /// Call [`Membership::handle_timer`] with `timer` after this long.
    SetTimer {
        /// The delay.
        after: Duration,
        /// The timer to hand back.
        timer: MembershipTimer,
    },
    /// A node is up (joined, or came back).
    NodeUp(NodeId),
    /// A node is down (failed, or left).
    NodeDown(NodeId),
    /// This node was declared down by the others and rejoined as a new incarnation.
    Renewed(NodeId),
}

/// Why membership refused an input.
#[derive(Debug, thiserror::Error)]
#[error("membership: {0}")]
pub struct MembershipError(String);

/// A timer membership set through [`MembershipOutput::SetTimer`], to be handed back to
/// [`Membership::handle_timer`] when due. Opaque to the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipTimer(TimerKind);

#[derive(Clone, Debug, PartialEq, Eq)]
enum TimerKind {
    /// One of foca's (probe, suspicion, gossip, ...).
    Foca(Timer<NodeId>),
    /// Time to announce again if still out of the cluster.
    Reannounce,
    /// Time to announce to a join contact that is not up, if any.
    ContactCheck,
}

/// Where one of this module's own timers (re-announce, contact check) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerState {
    /// None set.
    Off,
    /// To be handed to the driver at the next poll.
    Due,
    /// Set, not yet handled.
    Set,
}

/// How many join addresses are remembered as contacts for re-announcing.
const MAX_CONTACTS: usize = 16;
/// How many nodes each re-announce round goes to.
const ANNOUNCE_FANOUT: usize = 3;

/// The membership state of one node.
pub struct Membership {
    foca: Foca<NodeId, PostcardCodec, StdRng, NoCustomBroadcast>,
    runtime: AccumulatingRuntime<NodeId>,
    /// The second half of a rename (up after down), held for the next poll.
    pending_up: Option<NodeId>,
    /// The incarnation each member was last reported up at, while it is up. foca
    /// tells of a member that comes back under a new identity twice (a rename, then
    /// "up" since it was down): the second is not passed on. One entry per member
    /// reported up and not since down.
    reported_up: HashMap<Arc<str>, u64>,
    /// Whether foca is connected: it has an active member and is probing. foca stops
    /// every timer when it is not (cut off from all, or renewed after being declared
    /// down) and only connects again when a message addressed to its current identity
    /// arrives; so until then this node announces itself, see [`Membership::poll`].
    connected: bool,
    /// The nodes this node was asked to join through (the newest last, bounded).
    contacts: Vec<NodeId>,
    /// Where the next announce round starts among the candidates.
    next_contact: usize,
    reannounce: TimerState,
    reannounce_after: Duration,
    /// The contact check's timer (see `contact_announce_ms`).
    contact_check: TimerState,
    contact_check_after: Option<Duration>,
}

impl Membership {
    /// Membership for `me`, with a seeded RNG (the live node seeds it from its
    /// incarnation; the simulator from its seed).
    pub fn new(me: NodeId, config: MembershipConfig, seed: u64) -> Membership {
        Membership {
            foca: Foca::new(
                me,
                config.foca(),
                StdRng::seed_from_u64(seed),
                PostcardCodec,
            ),
            runtime: AccumulatingRuntime::new(),
            pending_up: None,
            reported_up: HashMap::new(),
            connected: false,
            contacts: Vec::new(),
            next_contact: 0,
            reannounce: TimerState::Off,
            reannounce_after: Duration::from_millis(config.reannounce_ms.max(10)),
            contact_check: TimerState::Off,
            contact_check_after: (config.contact_announce_ms > 0)
                .then(|| Duration::from_millis(config.contact_announce_ms.max(10))),
        }
    }

    /// This node's current identity.
    pub fn me(&self) -> &NodeId {
        self.foca.identity()
    }

    /// Asks the node `via` (its name is enough; its incarnation may be unknown) to let
    /// this node in. Until this node is connected it announces again every
    /// `reannounce_ms`, to this node among others.
    pub fn join(&mut self, via: NodeId) -> Result<(), MembershipError> {
        self.contacts.retain(|c| c.name != via.name);
        if self.contacts.len() == MAX_CONTACTS {
            self.contacts.remove(0);
        }
        self.contacts.push(via.clone());
        self.foca
            .announce(via, &mut self.runtime)
            .map_err(|e| MembershipError(e.to_string()))?;
        self.set_reannounce();
        if self.contact_check == TimerState::Off && self.contact_check_after.is_some() {
            self.contact_check = TimerState::Due;
        }
        Ok(())
    }

    /// Takes up `members`, the members a former membership of this node held up or
    /// suspect (a restarted cluster actor's), as up, without telling the others (they
    /// know better). They are probed as any member is: one that died while this node
    /// was away, and that the others have already declared down and stopped gossiping
    /// about, is declared down here too, so this node's services hear of it. Started
    /// from nothing, this node would never have heard of it again. A member that came
    /// back meanwhile as a newer identity replaces its former self as soon as this node
    /// hears of it (a down for a former life, as ever). This node's own name is skipped.
    pub fn restore(
        &mut self,
        members: impl IntoIterator<Item = NodeId>,
    ) -> Result<(), MembershipError> {
        let me = self.foca.identity().name.clone();
        let members = members
            .into_iter()
            .filter(|m| m.name != me)
            .map(foca::Member::alive);
        self.foca
            .apply_many(members, false, &mut self.runtime)
            .map_err(|e| MembershipError(e.to_string()))
    }

    /// Feeds gossip received from the network.
    pub fn handle_data(&mut self, data: &[u8]) -> Result<(), MembershipError> {
        self.foca
            .handle_data(data, &mut self.runtime)
            .map_err(|e| MembershipError(e.to_string()))
    }

    /// Feeds a timer set by an earlier [`MembershipOutput::SetTimer`].
    pub fn handle_timer(&mut self, timer: MembershipTimer) -> Result<(), MembershipError> {
        match timer.0 {
            TimerKind::Foca(timer) => self
                .foca
                .handle_timer(timer, &mut self.runtime)
                .map_err(|e| MembershipError(e.to_string())),
            TimerKind::Reannounce => {
                self.reannounce = TimerState::Off;
                if !self.connected {
                    self.announce_round();
                }
                Ok(())
            }
            TimerKind::ContactCheck => {
                self.contact_check = TimerState::Due;
                if self.connected {
                    self.announce_to_a_lost_contact();
                }
                Ok(())
            }
        }
    }

    /// Announces this node to one join contact that is not a member it holds up (the
    /// next one each time), so groups apart long enough to have forgotten each other
    /// meet again through the contacts once the partition heals.
    fn announce_to_a_lost_contact(&mut self) {
        let lost: Vec<NodeId> = self
            .contacts
            .iter()
            .filter(|c| !self.members().any(|m| m.name == c.name))
            .cloned()
            .collect();
        if lost.is_empty() {
            return;
        }
        let to = lost[self.next_contact % lost.len()].clone();
        self.next_contact = self.next_contact.wrapping_add(1);
        // Encoding our own identity cannot fail; if it did, the next check retries.
        let _ = self.foca.announce(to, &mut self.runtime);
    }

    /// Announces this node to a few of the nodes it knows: the contacts it joined
    /// through and every member it remembers, down ones included (they may be back
    /// by now; a node that is really gone costs one lost datagram). An announce is
    /// accepted by the node's name whatever incarnation the sender had in mind, and
    /// answered with a feed addressed to this node's current identity, which is what
    /// foca needs to connect again. Sets the next round's timer.
    fn announce_round(&mut self) {
        let mut candidates: Vec<NodeId> = self.contacts.clone();
        for (id, _) in self.member_states() {
            if !candidates.iter().any(|c| c.name == id.name) {
                candidates.push(id.clone());
            }
        }
        if candidates.is_empty() {
            return;
        }
        for i in 0..ANNOUNCE_FANOUT.min(candidates.len()) {
            let to = candidates[(self.next_contact + i) % candidates.len()].clone();
            // Encoding our own identity cannot fail; if it did, the next round retries.
            let _ = self.foca.announce(to, &mut self.runtime);
        }
        self.next_contact = (self.next_contact + ANNOUNCE_FANOUT) % candidates.len();
        self.set_reannounce();
    }

    fn set_reannounce(&mut self) {
        if self.reannounce == TimerState::Off {
            self.reannounce = TimerState::Due;
        }
    }

    /// foca went out of the cluster: announce now, and on a timer until back.
    fn lost_contact(&mut self) {
        self.connected = false;
        if self.reannounce == TimerState::Off {
            self.announce_round();
        }
    }

    /// Tells the cluster this node leaves.
    pub fn leave(&mut self) -> Result<(), MembershipError> {
        self.foca
            .leave_cluster(&mut self.runtime)
            .map_err(|e| MembershipError(e.to_string()))
    }

    /// Takes the next thing to do: data first, then timers, then notifications. A node
    /// seen again as a newer life (it restarted) is reported down (old, unless that
    /// life was reported down already) then up (new); one seen renewed within its
    /// life is reported up (new) only.
    ///
    /// When foca reports that this node went out of the cluster (idle: every member is
    /// down; or renewed: the cluster declared it down and it took its next
    /// incarnation), this node announces itself to a few nodes it knows, and again
    /// every `reannounce_ms` until it is connected. Without that, a node whose first
    /// word after a renewal went to identities that no longer exist stayed out for
    /// good, silent and blind to crashes (the simulator found it); and a node cut off
    /// from every member never came back after the partition healed.
    pub fn poll(&mut self) -> Option<MembershipOutput> {
        let output = self.next_output()?;
        match &output {
            MembershipOutput::NodeUp(id) => {
                self.reported_up.insert(id.name.clone(), id.incarnation);
            }
            MembershipOutput::NodeDown(id) => {
                self.reported_up.remove(&id.name);
            }
            _ => {}
        }
        Some(output)
    }

    /// Whether `id` is the identity last reported up for its name.
    fn reported(&self, id: &NodeId) -> bool {
        self.reported_up.get(&id.name) == Some(&id.incarnation)
    }

    /// The next output of [`Membership::poll`], before it is recorded.
    fn next_output(&mut self) -> Option<MembershipOutput> {
        loop {
            if let Some(id) = self.pending_up.take() {
                return Some(MembershipOutput::NodeUp(id));
            }
            if let Some((to, data)) = self.runtime.to_send() {
                if self.is_stray_down_notice(&data) {
                    metrics::counter!("agentmesh_membership_stray_down_notices_total").increment(1);
                    continue;
                }
                return Some(MembershipOutput::Send { to, data });
            }
            if let Some((after, timer)) = self.runtime.to_schedule() {
                let timer = MembershipTimer(TimerKind::Foca(timer));
                return Some(MembershipOutput::SetTimer { after, timer });
            }
            if self.reannounce == TimerState::Due {
                self.reannounce = TimerState::Set;
                let timer = MembershipTimer(TimerKind::Reannounce);
                let after = self.reannounce_after;
                return Some(MembershipOutput::SetTimer { after, timer });
            }
            if let (TimerState::Due, Some(after)) = (self.contact_check, self.contact_check_after) {
                self.contact_check = TimerState::Set;
                let timer = MembershipTimer(TimerKind::ContactCheck);
                return Some(MembershipOutput::SetTimer { after, timer });
            }
            match self.runtime.to_notify()? {
                OwnedNotification::MemberUp(id) if self.reported(&id) => {}
                OwnedNotification::MemberUp(id) => return Some(MembershipOutput::NodeUp(id)),
                OwnedNotification::MemberDown(id) => return Some(MembershipOutput::NodeDown(id)),
                OwnedNotification::Rejoin(id) => {
                    self.lost_contact();
                    return Some(MembershipOutput::Renewed(id));
                }
                OwnedNotification::Rename(old, new) if old.life() == new.life() => {
                    // A renewal: the node was declared down somewhere (a partition,
                    // a long pause) and took its next identity, but it is the same
                    // process, with the same agents and the work they hold. Where it
                    // was up all along nothing is lost, so it stays up; where it was
                    // declared down, that "down" came when it was declared.
                    return Some(MembershipOutput::NodeUp(new));
                }
                // A restart seen after its old life was declared down: that life's
                // "down" was said already (saying it twice reallocated and purged by
                // name once more, after the new life's first word had come).
                OwnedNotification::Rename(old, new) if !self.reported(&old) => {
                    return Some(MembershipOutput::NodeUp(new));
                }
                OwnedNotification::Rename(old, new) => {
                    self.pending_up = Some(new);
                    return Some(MembershipOutput::NodeDown(old));
                }
                OwnedNotification::Active => self.connected = true,
                OwnedNotification::Idle | OwnedNotification::Defunct => self.lost_contact(),
            }
        }
    }

    /// Whether `data` is foca's notice to a member that it was declared down
    /// (`TurnUndead`) addressed to a member this node holds up or suspect. foca 2.0.0
    /// sends it when a suspicion's timer fires, whether or not the member refuted the
    /// suspicion meanwhile (its `ChangeSuspectToDown` sends on finding the member, not
    /// on declaring it down), and the member, told so, renews its identity for nothing:
    /// under 5% packet loss three live nodes did so 14 times a minute. foca sends the
    /// notice rightly only to a member it holds down (just declared, or heard from after
    /// it was), so one to any other member is dropped.
    fn is_stray_down_notice(&self, data: &[u8]) -> bool {
        let Ok(header) = PostcardCodec.decode_header(data) else {
            return false;
        };
        header.message == Message::TurnUndead
            && self
                .foca
                .iter_membership_state()
                .any(|m| *m.id() == header.dst && m.state() != foca::State::Down)
    }

    /// The members this node believes are up (itself excluded).
    pub fn members(&self) -> impl Iterator<Item = &NodeId> {
        self.foca.iter_members().map(|m| m.id())
    }

    /// Every member this node knows of, with its state, including those down and not
    /// yet forgotten (itself excluded).
    pub fn member_states(&self) -> impl Iterator<Item = (&NodeId, MemberState)> {
        self.foca.iter_membership_state().map(|m| {
            let state = match m.state() {
                foca::State::Alive => MemberState::Up,
                foca::State::Suspect => MemberState::Suspect,
                foca::State::Down => MemberState::Down,
            };
            (m.id(), state)
        })
    }
}
