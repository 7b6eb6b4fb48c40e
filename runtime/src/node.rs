//! A running node: the secure transport plus cluster membership, driven by one task
//! that owns the membership state machine. Gossip travels as ACP MEMBERSHIP datagrams;
//! members the node hears of are dialled; subscribers get `NodeUp` and `NodeDown`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use agentmesh_transport::clock::Clock;
use agentmesh_transport::tls::NodeIdentity;
use agentmesh_transport::wire::payload::{Envelope, EnvelopeRef, Membership as MembershipPayload};
use agentmesh_transport::wire::{AcpErrorCode, Header, Message, MessageType, Payload};
use agentmesh_transport::{
    EndpointConfig, Inbox, Lane, Leftover, OwnershipTable, PeerName, Transport, TransportError,
    TransportEvent, TransportEvents, Via,
};

use crate::client::{Client, ClientError};
use crate::membership::{
    MemberState, Membership, MembershipConfig, MembershipOutput, MembershipTimer, NodeId,
};
use crate::remote::{Mesh, WeakMesh};

/// How a node is set up.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Transport settings, including the address to listen on.
    pub transport: EndpointConfig,
    /// Addresses of members to join through, dialled as soon as the node has started.
    /// A node that should be seen only once it hosts its services and agents leaves
    /// this empty and calls [`Node::join`] when they are up.
    pub join: Vec<SocketAddr>,
    /// Failure-detection timing.
    pub membership: MembershipConfig,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The address other nodes reach this one at, as membership tells them. Default:
    /// [`advertised_addr`] of the bound address and `join`.
    pub advertise: Option<SocketAddr>,
}

/// The address a node bound at `bound` tells the cluster when not told one: `bound`
/// itself if it names one address. Bound to every address (`0.0.0.0`), the address
/// this host reaches the first of `seeds` from, or with no seed the address of its
/// default route (loopback if it has none), at the bound port: `0.0.0.0` would send
/// the other nodes to themselves.
pub fn advertised_addr(bound: SocketAddr, seeds: &[SocketAddr]) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let route_source = || {
        // A documentation address stands for "anywhere": only the route is looked up,
        // nothing is sent.
        let anywhere: SocketAddr = if bound.is_ipv4() {
            (Ipv4Addr::new(192, 0, 2, 1), 9).into()
        } else {
            (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9).into()
        };
        let target = seeds
            .iter()
            .copied()
            .find(|s| s.is_ipv4() == bound.is_ipv4())
            .unwrap_or(anywhere);
        let socket = std::net::UdpSocket::bind(SocketAddr::new(bound.ip(), 0)).ok()?;
        socket.connect(target).ok()?;
        Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_unspecified())
    };
    let loopback: IpAddr = if bound.is_ipv4() {
        Ipv4Addr::LOCALHOST.into()
    } else {
        Ipv6Addr::LOCALHOST.into()
    };
    SocketAddr::new(route_source().unwrap_or(loopback), bound.port())
}

/// A change in cluster membership, for subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A node joined or came back.
    NodeUp(NodeId),
    /// A node failed or left.
    NodeDown(NodeId),
}

/// One member as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Its name.
    pub name: String,
    /// Its address.
    pub addr: SocketAddr,
    /// `up`, `suspect` or `down`.
    pub state: MemberState,
    /// Which life of the node.
    pub incarnation: u64,
    /// Round-trip time on the connection to it, if connected.
    pub rtt_us: Option<u64>,
}

/// The cluster-wide name of the status service every node runs.
pub const STATUS_SERVICE: &str = "agentmesh.status";
const STATUS_REQUEST: &str = "agentmesh.status.request";
const STATUS_REPLY: &str = "agentmesh.status.reply";

/// What a node reports about itself and the cluster (`agentmesh status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The node asked.
    pub node: String,
    /// Every member it knows of, itself included (with no RTT), sorted by name.
    pub members: Vec<MemberInfo>,
}

/// Asks the node at `addr` for its [`StatusReport`], as a short-lived client holding
/// `identity` (a certificate of the same cluster).
pub async fn request_status(
    identity: &NodeIdentity,
    addr: SocketAddr,
    timeout_ms: u64,
) -> Result<StatusReport, ClientError> {
    let mut client = Client::connect(identity, addr).await?;
    let report = status_of(&mut client, addr, timeout_ms).await;
    client.close().await;
    report
}

/// [`request_status`] on a client already connected to the node at `addr`.
pub async fn status_of(
    client: &mut Client,
    addr: SocketAddr,
    timeout_ms: u64,
) -> Result<StatusReport, ClientError> {
    let answer = client
        .request_raw(
            STATUS_SERVICE,
            STATUS_REQUEST,
            Bytes::new(),
            Duration::from_millis(timeout_ms),
        )
        .await?;
    rmp_serde::from_slice(&answer).map_err(|e| ClientError::BadReply {
        addr,
        reason: e.to_string(),
    })
}

fn envelope(e: Envelope) -> Result<Message, agentmesh_transport::wire::PayloadError> {
    let body = Bytes::from(Payload::Envelope(e).encode()?);
    Ok(Message::new(Header::new(MessageType::Envelope), body))
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The transport could not start.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The supervision tree could not start.
    #[error("cannot start the node's actors: {0}")]
    Start(String),
    /// The metrics address could not be bound.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A running node. Dropping it stops its tasks without telling the cluster; call
/// [`Node::leave`] to leave cleanly.
pub struct Node {
    transport: Transport,
    mesh: Mesh,
    me: NodeId,
    cluster_events: broadcast::Sender<ClusterEvent>,
    /// The cluster actor now (none while it restarts).
    current: watch::Receiver<Option<ActorRef<ClusterMsg>>>,
    supervisor: ActorRef<()>,
    supervisor_handle: JoinHandle<()>,
    metrics: Option<(SocketAddr, JoinHandle<()>)>,
    /// The member list, as the cluster actor last published it.
    member_list: watch::Receiver<Vec<MemberInfo>>,
}

/// Gossip messages kept for a member while its connection is being set up.
const PENDING_GOSSIP_PER_MEMBER: usize = 16;
/// Cluster events buffered per subscriber; a slow subscriber misses the oldest.
const CLUSTER_EVENT_BUFFER: usize = 1024;

impl Node {
    /// Binds the transport, starts membership and dials the `join` addresses.
    pub async fn start(
        config: NodeConfig,
        identity: &NodeIdentity,
        clock: Arc<dyn Clock>,
    ) -> Result<Node, NodeError> {
        let ownership = Arc::new(OwnershipTable::new());
        let (transport, events) = Transport::bind_with_clock(
            config.transport.clone(),
            identity,
            ownership,
            clock.clone(),
        )?;
        let (started_tx, started) = watch::channel(None);
        transport.set_inbox(Arc::new(MeshInbox(started)));
        let me = NodeId {
            name: Arc::from(identity.name.as_str()),
            addr: match config.advertise {
                Some(addr) => addr,
                None => advertised_addr(transport.local_addr()?, &config.join),
            },
            incarnation: NodeId::first_of_life(clock.now_unix_ms()),
        };
        let mesh = Mesh::new(&me.name, me.incarnation, transport.clone());
        let (cluster_events, _) = broadcast::channel(CLUSTER_EVENT_BUFFER);
        let (members_tx, members_rx) = watch::channel(Vec::new());
        let metrics = match config.metrics {
            Some(addr) => {
                let served = crate::metrics::serve(addr, transport.clone(), members_rx.clone())
                    .await
                    .map_err(|source| NodeError::Metrics { addr, source })?;
                info!(addr = %served.0, "serving metrics at /metrics");
                Some(served)
            }
            None => None,
        };
        let (current_tx, current) = watch::channel(None);
        let args = SupervisorArgs {
            cluster: ClusterArgs {
                me: me.clone(),
                config: config.membership,
                transport: transport.clone(),
                mesh: mesh.clone(),
                cluster_events: cluster_events.clone(),
                members_tx: Arc::new(members_tx),
                seeds: Arc::new(std::sync::Mutex::new(Vec::new())),
                highest_incarnation: Arc::new(AtomicU64::new(me.incarnation)),
            },
            current: current_tx,
        };
        let (supervisor, supervisor_handle) = Actor::spawn(None, NodeSupervisor, args)
            .await
            .map_err(|e| NodeError::Start(e.to_string()))?;
        tokio::spawn(pump(events, current.clone(), mesh.clone()));
        started_tx.send_replace(Some(mesh.downgrade()));
        info!(node = %me.name, addr = %me.addr, incarnation = me.incarnation, "node started");
        let node = Node {
            transport,
            mesh,
            me,
            cluster_events,
            current,
            supervisor,
            supervisor_handle,
            metrics,
            member_list: members_rx,
        };
        node.join(config.join);
        Ok(node)
    }

    /// Joins the cluster through `seeds`: dials each (retrying with backoff until one
    /// answers) and announces this node. Until then other nodes learn of it only if
    /// they dial it themselves.
    pub fn join(&self, seeds: impl IntoIterator<Item = SocketAddr>) {
        let alone = Alone {
            members: self.member_list.clone(),
            me: self.me.name.clone(),
            told: Arc::new(AtomicBool::new(false)),
        };
        for addr in seeds {
            tokio::spawn(dial_seed(
                self.transport.clone(),
                addr,
                self.current.clone(),
                alone.clone(),
            ));
        }
    }

    /// This node's identity.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// Where metrics are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(addr, _)| *addr)
    }

    /// Remote actor messaging on this node.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// The node's transport.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The member list as last published on every membership change (without asking
    /// the cluster actor): for a subscriber that missed events to catch up.
    pub fn member_list(&self) -> watch::Receiver<Vec<MemberInfo>> {
        self.member_list.clone()
    }

    /// Membership changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.cluster_events.subscribe()
    }

    /// The members this node knows of, with their state (empty while the cluster
    /// actor restarts).
    pub async fn members(&self) -> Vec<MemberInfo> {
        let Some(actor) = self.current.borrow().clone() else {
            return Vec::new();
        };
        ractor::call!(actor, ClusterMsg::Members).unwrap_or_default()
    }

    /// Tells the cluster this node leaves, closes every connection with LEAVING, and
    /// stops.
    pub async fn leave(self) {
        let actor = self.current.borrow().clone();
        if let Some(actor) = actor {
            let _ = ractor::call!(actor, ClusterMsg::Leave);
        }
        self.supervisor.stop(Some("leaving".into()));
        self.transport
            .shutdown(AcpErrorCode::Leaving, "node leaving")
            .await;
        let _ = self.supervisor_handle.await;
        if let Some((_, server)) = self.metrics {
            server.abort();
        }
    }

    /// Resolves when the node's supervision tree has stopped (it gave up restarting,
    /// or the node left).
    pub async fn stopped(&mut self) {
        let _ = (&mut self.supervisor_handle).await;
    }

    /// Makes the cluster actor fail, to exercise supervision (tests and drills).
    #[doc(hidden)]
    pub fn fail_cluster_actor(&self) {
        if let Some(actor) = self.current.borrow().clone() {
            let _ = actor.cast(ClusterMsg::Fail);
        }
    }
}

/// How long after a join a node that sees no other member up says so.
const ALONE_AFTER_JOIN: Duration = Duration::from_secs(10);

/// What a join needs to tell that no member took this node in: the member list, this
/// node's name, and whether another join told it already.
#[derive(Clone)]
struct Alone {
    members: watch::Receiver<Vec<MemberInfo>>,
    me: Arc<str>,
    told: Arc<AtomicBool>,
}

impl Alone {
    /// Warns once (for all seeds) if no other member has been up by [`ALONE_AFTER_JOIN`]:
    /// the seed answered the handshake, but nothing of the membership came back (the
    /// others refuse this node's probes: its clock is off, say, which they log).
    async fn warn_if_alone_after(mut self, seed: &str, addr: SocketAddr) {
        let deadline = tokio::time::sleep(ALONE_AFTER_JOIN);
        tokio::pin!(deadline);
        loop {
            let others_up = self
                .members
                .borrow_and_update()
                .iter()
                .any(|m| *m.name != *self.me && m.state == MemberState::Up);
            if others_up {
                return;
            }
            tokio::select! {
                _ = &mut deadline => break,
                changed = self.members.changed() => if changed.is_err() { return },
            }
        }
        if !self.told.swap(true, Ordering::Relaxed) {
            warn!(
                %seed,
                %addr,
                after_s = ALONE_AFTER_JOIN.as_secs(),
                "no other member is up since this node joined: the cluster has not taken it in; \
                 the node it joined through may refuse its membership probes (a clock off by \
                 more than a second, which that node logs), or something drops UDP datagrams"
            );
        }
    }
}

/// Connects to a seed address until it answers, then hands its name to the cluster
/// actor.
async fn dial_seed(
    transport: Transport,
    addr: SocketAddr,
    mut current: watch::Receiver<Option<ActorRef<ClusterMsg>>>,
    alone: Alone,
) {
    let mut delay = Duration::from_millis(100);
    let via = loop {
        match transport.connect(addr, None).await {
            Ok(name) => {
                break NodeId {
                    name,
                    addr,
                    incarnation: 0,
                }
            }
            // `--join` may list every node, this one too: it joins through the others.
            Err(TransportError::SelfConnect { .. }) => {
                return info!(%addr, "not joining through this node's own address");
            }
            Err(e) => {
                let retry_in_ms = delay.as_millis() as u64;
                if matches!(
                    e,
                    TransportError::NameInUse { .. } | TransportError::SameName { .. }
                ) {
                    error!(%addr, error = %e, retry_in_ms, "cannot join");
                } else {
                    warn!(%addr, error = %e, retry_in_ms, "cannot reach the node to join");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    let seed = via.name.clone();
    loop {
        if let Some(actor) = current.borrow_and_update().clone() {
            let _ = actor.cast(ClusterMsg::Joined(via));
            break;
        }
        if current.changed().await.is_err() {
            return;
        }
    }
    alone.warn_if_alone_after(&seed, addr).await;
}

/// The cluster actor's state: membership and what it asked for.
struct Driver {
    myself: ActorRef<ClusterMsg>,
    mesh: Mesh,
    /// The member list, republished on every membership change (for metrics).
    members_tx: Arc<watch::Sender<Vec<MemberInfo>>>,
    membership: Membership,
    transport: Transport,
    cluster_events: broadcast::Sender<ClusterEvent>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_payloads: HashMap<u64, MembershipTimer>,
    next_timer: u64,
    /// Gossip waiting for a connection, per member name.
    pending: HashMap<String, VecDeque<Bytes>>,
    dialling: HashSet<String>,
    /// Members whose connection was logged up at INFO (so its end is too).
    logged_up: HashSet<String>,
    /// Seeds joined through (kept across restarts; membership re-announces to them
    /// until someone answers).
    seeds: Arc<std::sync::Mutex<Vec<NodeId>>>,
    /// When the pending `Wake` is due, if one is.
    wake_at: Option<Instant>,
    highest_incarnation: Arc<AtomicU64>,
}

/// What the cluster actor handles.
pub(crate) enum ClusterMsg {
    /// Something from the transport; the permit bounds how many wait in the mailbox.
    Transport(TransportEvent, OwnedSemaphorePermit),
    /// A timer or re-announcement may be due.
    Wake,
    /// A seed answered: join through it.
    Joined(NodeId),
    /// A dial to a member finished.
    Dialled(String, bool),
    /// Who the members are.
    Members(RpcReplyPort<Vec<MemberInfo>>),
    /// Leave the cluster, then stop.
    Leave(RpcReplyPort<()>),
    /// Fails on purpose, to exercise supervision.
    Fail,
}

/// Owns membership, answers the node's services and routes envelopes to the mesh.
struct ClusterActor;

/// What the cluster actor starts from; kept by the supervisor to restart it.
#[derive(Clone)]
struct ClusterArgs {
    me: NodeId,
    config: MembershipConfig,
    transport: Transport,
    mesh: Mesh,
    cluster_events: broadcast::Sender<ClusterEvent>,
    members_tx: Arc<watch::Sender<Vec<MemberInfo>>>,
    seeds: Arc<std::sync::Mutex<Vec<NodeId>>>,
    /// The highest incarnation this node has had, renewals included: a restarted
    /// cluster actor takes the next one. Taking its start incarnation plus one could
    /// repeat the identity of a renewed former self, which the others would not take
    /// for a newer one (the simulator found this with restarts under faults).
    highest_incarnation: Arc<AtomicU64>,
}

impl Actor for ClusterActor {
    type Msg = ClusterMsg;
    type State = Driver;
    type Arguments = ClusterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ClusterMsg>,
        args: ClusterArgs,
    ) -> Result<Driver, ActorProcessingErr> {
        let mut membership = Membership::new(args.me.clone(), args.config, args.me.incarnation);
        // After a restart, the members the node's services were last told of (up or
        // suspect) are probed again, so one that died meanwhile is told down here too.
        let former: Vec<NodeId> = args
            .members_tx
            .borrow()
            .iter()
            .filter(|m| m.state != MemberState::Down)
            .map(|m| NodeId {
                name: Arc::from(m.name.as_str()),
                addr: m.addr,
                incarnation: m.incarnation,
            })
            .collect();
        if let Err(e) = membership.restore(former) {
            warn!(error = %e, "cannot restore the former members");
        }
        // After a restart, rejoin through whoever is still connected.
        let seeds = args.seeds.lock().map(|s| s.clone()).unwrap_or_default();
        for peer in args.transport.peers() {
            let via = NodeId {
                name: Arc::from(peer.name().as_ref()),
                addr: peer.remote_addr(),
                incarnation: 0,
            };
            let _ = membership.join(via);
        }
        let mut driver = Driver {
            myself: myself.clone(),
            mesh: args.mesh,
            members_tx: args.members_tx,
            membership,
            transport: args.transport,
            cluster_events: args.cluster_events,
            timers: BinaryHeap::new(),
            timer_payloads: HashMap::new(),
            next_timer: 0,
            pending: HashMap::new(),
            dialling: HashSet::new(),
            logged_up: HashSet::new(),
            seeds: args.seeds,
            wake_at: None,
            highest_incarnation: args.highest_incarnation,
        };
        for seed in seeds {
            let _ = driver.membership.join(seed);
        }
        driver.drain().await;
        driver.schedule_wake();
        Ok(driver)
    }

    async fn handle(
        &self,
        myself: ActorRef<ClusterMsg>,
        msg: ClusterMsg,
        d: &mut Driver,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ClusterMsg::Transport(event, _permit) => d.on_transport(event).await,
            ClusterMsg::Wake => {
                d.wake_at = None;
                d.on_wake();
            }
            ClusterMsg::Joined(via) => {
                info!(seed = %via.name, addr = %via.addr, "joining through");
                if let Ok(mut seeds) = d.seeds.lock() {
                    seeds.push(via.clone());
                }
                if let Err(e) = d.membership.join(via) {
                    warn!(error = %e, "cannot announce");
                }
            }
            ClusterMsg::Dialled(name, ok) => {
                d.dialling.remove(&name);
                let queued = d.pending.remove(&name).unwrap_or_default();
                if ok {
                    for data in queued {
                        d.send_gossip(&name, data).await;
                    }
                }
            }
            ClusterMsg::Members(reply) => {
                let _ = reply.send(d.member_infos());
            }
            ClusterMsg::Leave(reply) => {
                if let Err(e) = d.membership.leave() {
                    warn!(error = %e, "membership refused to leave");
                }
                d.drain().await;
                // Let the leave gossip reach the wire before connections close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = reply.send(());
                myself.stop(Some("left the cluster".into()));
                return Ok(());
            }
            ClusterMsg::Fail => return Err("failing on request".into()),
        }
        d.drain().await;
        d.schedule_wake();
        Ok(())
    }
}

/// Restarts allowed within [`RESTART_WINDOW`] before the node gives up.
const MAX_RESTARTS: usize = 5;
/// The window over which restarts are counted.
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The root of the node's supervision tree. Policy: when the cluster actor fails it
/// is restarted after a backoff (100 ms, doubling), as a renewal of the node's
/// identity (same life, next incarnation), rejoining through the peers still
/// connected; the transport, its connections and the name registry are kept. More
/// than 5 failures within 60 s stop the node.
struct NodeSupervisor;

struct SupervisorState {
    args: ClusterArgs,
    current: watch::Sender<Option<ActorRef<ClusterMsg>>>,
    child: ActorRef<ClusterMsg>,
    failures: VecDeque<Instant>,
}

struct SupervisorArgs {
    cluster: ClusterArgs,
    current: watch::Sender<Option<ActorRef<ClusterMsg>>>,
}

impl Actor for NodeSupervisor {
    type Msg = ();
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let (child, _) =
            Actor::spawn_linked(None, ClusterActor, args.cluster.clone(), myself.get_cell())
                .await?;
        args.current.send_replace(Some(child.clone()));
        Ok(SupervisorState {
            args: args.cluster,
            current: args.current,
            child,
            failures: VecDeque::new(),
        })
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) if cell.get_id() == state.child.get_id() => {
                state.current.send_replace(None);
                let now = Instant::now();
                state.failures.push_back(now);
                while state
                    .failures
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
                {
                    state.failures.pop_front();
                }
                if state.failures.len() > MAX_RESTARTS {
                    error!(%error, "the cluster actor keeps failing; stopping the node");
                    myself.stop(Some("too many restarts".into()));
                    return Ok(());
                }
                let backoff = Duration::from_millis(100 << (state.failures.len() - 1));
                warn!(%error, backoff_ms = backoff.as_millis() as u64, "the cluster actor failed; restarting it");
                tokio::time::sleep(backoff).await;
                // The incarnation after the highest so far (which starts at, and
                // never falls below, the one the node started with), in the same
                // life: the others take it as a renewal, the new identity replacing
                // the old with no NodeDown, so the agents here, which outlive the
                // cluster actor, keep their work. Never a former identity.
                state.args.me.incarnation = state
                    .args
                    .highest_incarnation
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                let (child, _) =
                    Actor::spawn_linked(None, ClusterActor, state.args.clone(), myself.get_cell())
                        .await?;
                state.child = child.clone();
                state.current.send_replace(Some(child));
            }
            SupervisionEvent::ActorTerminated(cell, _, reason)
                if cell.get_id() == state.child.get_id() =>
            {
                info!(
                    reason = reason.as_deref().unwrap_or(""),
                    "the cluster actor stopped; the node stops"
                );
                state.current.send_replace(None);
                myself.stop(reason);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Delivers what arrives from the transport. Actor messages (ENVELOPE) and the other
/// ACP types routed to actors that come as datagrams go straight to the mesh from
/// here, in arrival order, one hop fewer than through the cluster actor (lane
/// messages reach the mesh on their reader's task, through [`MeshInbox`]). What is the
/// cluster actor's own (membership gossip, status requests, connection events) moves
/// into its mailbox, at most [`MAILBOX_EVENTS`] events at a time, so the mailbox stays
/// bounded and the transport's own queues push back when the actor is slow.
async fn pump(
    mut events: TransportEvents,
    mut current: watch::Receiver<Option<ActorRef<ClusterMsg>>>,
    mesh: Mesh,
) {
    let permits = Arc::new(Semaphore::new(MAILBOX_EVENTS));
    while let Some(event) = events.recv().await {
        let event = match event {
            // Datagrams bypass the inbox, so they are sorted here. What a lane brings
            // has been through the inbox already: its leftovers are the cluster
            // actor's (sorting them again would decode a status request twice).
            TransportEvent::Received {
                peer,
                via: via @ Via::Datagram,
                messages,
            } => {
                let driver_part = take_for_mesh(&mesh, &peer, messages, false).await;
                if driver_part.is_empty() {
                    continue;
                }
                TransportEvent::Received {
                    peer,
                    via,
                    messages: driver_part,
                }
            }
            other => other,
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let actor = loop {
            if let Some(actor) = current.borrow_and_update().clone() {
                break actor;
            }
            // Restarting: wait for the next actor (or the end of the node).
            if current.changed().await.is_err() {
                return;
            }
        };
        if actor.cast(ClusterMsg::Transport(event, permit)).is_err() {
            debug!("an event was lost while the cluster actor restarted");
        }
    }
}

/// Hands what arrived from `peer` to the mesh (actor messages and the ACP types it
/// routes) and returns what is the cluster actor's: membership gossip and requests to
/// the node's status service. What came on a lane (`reliably`) waits a while for a
/// full ACP consumer ([`Mesh::route_acp`]); datagrams do not.
async fn take_for_mesh(
    mesh: &Mesh,
    peer: &str,
    messages: Vec<Message>,
    reliably: bool,
) -> Vec<Message> {
    let mut driver_part = Vec::new();
    for message in messages {
        match message.header.msg_type {
            MessageType::Membership => driver_part.push(message),
            MessageType::Envelope => {
                if let Some(m) = deliver_envelope(mesh, peer, message).await {
                    driver_part.push(m);
                }
            }
            _ => mesh.on_acp(peer, message, reliably).await,
        }
    }
    driver_part
}

/// The transport's inbox: hands lane messages to the mesh on the lane reader's own
/// task, so an actor message or an answer does not wait for the pump's turn (one task
/// hop fewer on every request and every reply); the rest still goes to the pump.
///
/// It is set right after the transport is bound, before any peer can have connected,
/// and holds lane readers back until the node has started (as the pump, not yet
/// running, did): so every lane message goes through it, in lane order.
///
/// It holds the mesh once the node has started (`None` before); weakly, since the mesh
/// holds the transport.
struct MeshInbox(watch::Receiver<Option<WeakMesh>>);

impl Inbox for MeshInbox {
    fn take<'a>(&'a self, peer: &'a PeerName, _: Lane, messages: Vec<Message>) -> Leftover<'a> {
        Box::pin(async move {
            let started = |m: &Option<WeakMesh>| m.as_ref().map(WeakMesh::upgrade);
            // Once started, a look at the current value; before, a wait for it.
            let now = started(&self.0.borrow());
            let mesh = match now {
                Some(mesh) => mesh,
                None => match self.0.clone().wait_for(Option::is_some).await {
                    Ok(m) => started(&m).flatten(),
                    Err(_) => None,
                },
            };
            match mesh {
                Some(mesh) => take_for_mesh(&mesh, peer, messages, true).await,
                // The node is gone or never started: the pump, if any, sees them.
                None => messages,
            }
        })
    }
}

/// Hands an ENVELOPE to the mesh, or gives it back if it asks the node itself (status,
/// which the cluster actor answers from the membership it owns). A payload that does
/// not decode closes the sender's connection with the ACP error code.
async fn deliver_envelope(mesh: &Mesh, peer: &str, message: Message) -> Option<Message> {
    let envelope = match EnvelopeRef::decode(&message.body) {
        Ok(e) => e,
        Err(e) => {
            warn!(%peer, error = %e, "bad envelope");
            if let Some(p) = mesh.transport().peer(peer) {
                p.close(e.code(), "bad envelope");
            }
            return None;
        }
    };
    if is_status_request(&envelope) {
        drop(envelope);
        return Some(message);
    }
    mesh.on_envelope(peer, message.header.prio, envelope).await;
    None
}

/// A request to the node's own status service, which the cluster actor answers.
fn is_status_request(envelope: &EnvelopeRef<'_>) -> bool {
    envelope.to == STATUS_SERVICE && envelope.kind == STATUS_REQUEST && !envelope.reply
}

/// Transport events waiting in the cluster actor's mailbox at most.
const MAILBOX_EVENTS: usize = 1024;

impl Driver {
    /// Makes sure a `Wake` arrives when the next membership timer is due.
    fn schedule_wake(&mut self) {
        let Some(Reverse((due, _))) = self.timers.peek().copied() else {
            return;
        };
        if self.wake_at.is_some_and(|at| at <= due) {
            return;
        }
        self.wake_at = Some(due);
        let after = due.saturating_duration_since(Instant::now());
        // Dropping the handle detaches the timer; it still fires.
        drop(self.myself.send_after(after, || ClusterMsg::Wake));
    }

    fn on_wake(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(timer) = self.timer_payloads.remove(&key) {
                if let Err(e) = self.membership.handle_timer(timer) {
                    debug!(error = %e, "membership timer");
                }
            }
        }
    }

    async fn on_transport(&mut self, event: TransportEvent) {
        match event {
            TransportEvent::Received { peer, messages, .. } => {
                // The pump hands everything else to the mesh: what reaches the actor is
                // membership gossip and requests to the node's status service.
                for message in messages {
                    if message.header.msg_type == MessageType::Envelope {
                        self.answer_status(&peer, &message).await;
                        continue;
                    }
                    match Payload::decode(MessageType::Membership, &message.body) {
                        Ok(Payload::Membership(m)) => {
                            if let Err(e) = self.membership.handle_data(&m.gossip) {
                                debug!(%peer, error = %e, "gossip refused");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            warn!(%peer, error = %e, "bad membership payload");
                            if let Some(p) = self.transport.peer(&peer) {
                                p.close(e.code(), "bad membership payload");
                            }
                        }
                    }
                }
            }
            // Logged at INFO for members held up only: every `agentmesh status` or
            // `submit` is a short-lived client connection too, and a member held down
            // (it left, or died) is dialled every few seconds while it is remembered,
            // to heal partitions, each dial "up" at once with 0-RTT and down 3 s later.
            TransportEvent::PeerUp { peer, addr } => match self.member_state(&peer) {
                Some(MemberState::Up | MemberState::Suspect) => {
                    if !self.log_member_connection(&peer, addr) {
                        // Two nodes that dialled each other at once keep one of the
                        // two connections (no "down" comes for the one retired).
                        debug!(%peer, %addr, "connection to member replaced");
                    }
                }
                Some(MemberState::Down) => {
                    debug!(%peer, %addr, "connection to a member held down up")
                }
                None => debug!(%peer, %addr, "connection up"),
            },
            TransportEvent::PeerDown { peer, reason, .. } => {
                if self.logged_up.remove(&*peer) {
                    info!(%peer, %reason, "connection to member down");
                } else {
                    debug!(%peer, %reason, "connection down");
                }
            }
        }
    }

    /// Answers a request to the node's status service (the pump has already decoded
    /// the envelope once and sent it here for that reason alone).
    async fn answer_status(&mut self, peer: &str, message: &Message) {
        let Ok(request) = EnvelopeRef::decode(&message.body) else {
            return;
        };
        if !is_status_request(&request) {
            return;
        }
        let me = self.membership.me();
        let mut members = self.member_infos();
        members.push(MemberInfo {
            name: me.name.to_string(),
            addr: me.addr,
            state: MemberState::Up,
            incarnation: me.incarnation,
            rtt_us: None,
        });
        members.sort_by(|a, b| a.name.cmp(&b.name).then(b.incarnation.cmp(&a.incarnation)));
        let report = StatusReport {
            node: me.name.to_string(),
            members,
        };
        let body = match rmp_serde::to_vec_named(&report) {
            Ok(body) => Bytes::from(body),
            Err(e) => return warn!(error = %e, "cannot encode status"),
        };
        let reply = envelope(Envelope {
            to: String::new(),
            kind: STATUS_REPLY.into(),
            correlation: request.correlation,
            reply: true,
            trace_id: request.trace_id,
            body,
        });
        match reply {
            Ok(reply) => {
                if let Err(e) = self.transport.send(peer, reply).await {
                    debug!(%peer, error = %e, "status reply not sent");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode status reply"),
        }
    }

    /// Carries out everything membership has asked for.
    async fn drain(&mut self) {
        while let Some(output) = self.membership.poll() {
            match output {
                MembershipOutput::Send { to, data } => {
                    if self.transport.peer(&to.name).is_some() {
                        self.send_gossip(&to.name, data).await;
                    } else {
                        self.queue_and_dial(to, data);
                    }
                }
                MembershipOutput::SetTimer { after, timer } => {
                    self.next_timer += 1;
                    self.timers
                        .push(Reverse((Instant::now() + after, self.next_timer)));
                    self.timer_payloads.insert(self.next_timer, timer);
                }
                MembershipOutput::NodeUp(id) => {
                    // Publish first: whoever sees the log line sees the new list.
                    self.members_tx.send_replace(self.member_infos());
                    info!(node = %id.name, addr = %id.addr, incarnation = id.incarnation, "node up");
                    // A node that joined through this one connected before it was a
                    // member: its connection is logged now, so that its end is too.
                    if let Some(peer) = self.transport.peer(&id.name) {
                        self.log_member_connection(&id.name, peer.remote_addr());
                    }
                    self.mesh.node_up(&id.name, id.addr);
                    let _ = self.cluster_events.send(ClusterEvent::NodeUp(id));
                }
                MembershipOutput::NodeDown(id) => {
                    self.members_tx.send_replace(self.member_infos());
                    info!(node = %id.name, addr = %id.addr, incarnation = id.incarnation, "node down");
                    self.transport.ownership().remove_node(&id.name);
                    self.mesh.node_down(&id.name);
                    let _ = self.cluster_events.send(ClusterEvent::NodeDown(id));
                }
                MembershipOutput::Renewed(id) => {
                    self.highest_incarnation
                        .fetch_max(id.incarnation, Ordering::Relaxed);
                    warn!(
                        incarnation = id.incarnation,
                        "declared down by the cluster; rejoined as a new incarnation"
                    );
                }
            }
        }
    }

    async fn send_gossip(&mut self, to: &str, data: Bytes) {
        let Some(peer) = self.transport.peer(to) else {
            return;
        };
        let body = match Payload::Membership(MembershipPayload { gossip: data }).encode() {
            Ok(body) => Bytes::from(body),
            Err(e) => return warn!(error = %e, "cannot encode gossip"),
        };
        let message = Message::new(Header::new(MessageType::Membership), body);
        if let Err(e) = peer.send_datagram(message).await {
            debug!(peer = %to, error = %e, "gossip not sent");
        }
    }

    fn queue_and_dial(&mut self, to: NodeId, data: Bytes) {
        let queue = self.pending.entry(to.name.to_string()).or_default();
        if queue.len() == PENDING_GOSSIP_PER_MEMBER {
            queue.pop_front();
        }
        queue.push_back(data);
        if self.dialling.insert(to.name.to_string()) {
            let (transport, done) = (self.transport.clone(), self.myself.clone());
            tokio::spawn(async move {
                let ok = transport.connect(to.addr, Some(&to.name)).await.is_ok();
                let _ = done.cast(ClusterMsg::Dialled(to.name.to_string(), ok));
            });
        }
    }

    /// Logs a member's connection up, once until it is logged down; false if it was
    /// logged up already.
    fn log_member_connection(&mut self, peer: &str, addr: SocketAddr) -> bool {
        let first = self.logged_up.insert(peer.to_string());
        if first {
            info!(%peer, %addr, "connection to member up");
        }
        first
    }

    /// What membership holds of `peer` (up, suspect, or down and not yet forgotten;
    /// an incarnation held up first, if an older one is still remembered down); None
    /// for a client.
    fn member_state(&self, peer: &str) -> Option<MemberState> {
        self.membership
            .member_states()
            .filter(|(id, _)| *id.name == *peer)
            .map(|(_, state)| state)
            .min_by_key(|state| *state == MemberState::Down)
    }

    fn member_infos(&self) -> Vec<MemberInfo> {
        let mut members: Vec<MemberInfo> = self
            .membership
            .member_states()
            .map(|(id, state)| MemberInfo {
                name: id.name.to_string(),
                addr: id.addr,
                state,
                incarnation: id.incarnation,
                rtt_us: self
                    .transport
                    .peer(&id.name)
                    .map(|p| p.rtt().as_micros() as u64),
            })
            .collect();
        members.sort_by(|a, b| a.name.cmp(&b.name).then(b.incarnation.cmp(&a.incarnation)));
        members
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_node_advertises_an_address_others_can_dial() {
        let bound: SocketAddr = "10.1.2.3:7600".parse().unwrap();
        assert_eq!(advertised_addr(bound, &[]), bound);
        let wildcard: SocketAddr = "0.0.0.0:7600".parse().unwrap();
        let seed: SocketAddr = "127.0.0.1:7601".parse().unwrap();
        assert_eq!(
            advertised_addr(wildcard, &[seed]),
            "127.0.0.1:7600".parse().unwrap()
        );
        let alone = advertised_addr(wildcard, &[]);
        assert!(
            !alone.ip().is_unspecified() && alone.port() == 7600,
            "{alone}"
        );
    }
}
