//! Remote actor messaging: ractor actors registered under cluster-wide names, typed
//! serde messages sent to them from any node (locally without serialization), request
//! and reply, and monitors that fire when a named actor stops or its node dies.

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use foldhash::HashMap;
use ractor::{ActorRef, RpcReplyPort};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, warn};

use agentmesh_transport::wire::payload::EnvelopeRef;
use agentmesh_transport::wire::{EnvelopeParts, Header, Message, MessageRef, MessageType};
use agentmesh_transport::{OwnershipTable, PeerHandle, Transport, TransportError};

/// A message that can cross nodes.
pub trait RemoteMessage: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Names the type on the wire; sender and receiver must agree.
    const KIND: &'static str;

    /// The Stream Prio it travels with, which picks its lane (default: normal).
    fn priority(&self) -> u8 {
        96
    }
}

/// A cluster-wide actor address: a serializable remote reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ActorAddr {
    /// The node the actor runs on.
    pub node: String,
    /// Its registered name.
    pub name: String,
}

/// Why a message was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No actor is registered under that name anywhere this node knows of.
    #[error("no actor named {0:?} in the cluster")]
    UnknownName(String),
    /// The actor takes another message type.
    #[error("actor {name:?} takes {expected}, not {got}")]
    WrongKind {
        /// The actor's name.
        name: String,
        /// What it takes.
        expected: &'static str,
        /// What was sent.
        got: &'static str,
    },
    /// The local actor has stopped.
    #[error("actor {0:?} has stopped")]
    Stopped(String),
    /// The local actor (registered with [`Mesh::register_bounded`]) has as many
    /// messages waiting as it takes; this one was not sent.
    #[error("actor {name:?} has {limit} messages waiting; this one was not sent")]
    Full {
        /// The actor's name.
        name: String,
        /// Its limit.
        limit: usize,
    },
    /// The actor's node is not connected.
    #[error("node {0:?} is not connected")]
    NodeUnreachable(String),
    /// The message did not encode.
    #[error("cannot encode the message: {0}")]
    Encode(String),
    /// The transport refused it.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Why an ask got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The request was not sent.
    #[error(transparent)]
    Send(#[from] SendError),
    /// No answer in time.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The other side answered with an error.
    #[error("{0}")]
    Remote(String),
    /// The answer did not decode.
    #[error("cannot decode the answer: {0}")]
    Decode(String),
    /// Too many asks are waiting for answers.
    #[error("{0} asks already wait for answers")]
    TooMany(usize),
    /// The connection the request went on was lost before an answer came: the request
    /// may or may not have been handled there (as after a timeout).
    #[error("the connection to {node} was lost before it answered: {why}")]
    ConnectionLost {
        /// The node asked.
        node: String,
        /// How the connection ended.
        why: String,
    },
}

/// Why a monitored actor is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Down {
    /// The actor stopped (or its name was unregistered).
    Stopped(ActorAddr),
    /// Its node left or was declared down.
    NodeDown(ActorAddr),
    /// No such actor was known when the monitor was set.
    Unknown(ActorAddr),
}

/// Why a registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The name is taken on this node.
    #[error("an actor is already registered as {0:?} here")]
    Taken(String),
    /// The name is reserved or malformed.
    #[error("actor name {0:?} is reserved or empty")]
    BadName(String),
}

/// How long an ACP message that came reliably (on a lane, or from this node) waits for
/// room in its consumer's full channel before it is shed: a burst (a coordinator's
/// ALLOCATEs to a thousand free replicas, their final REPORTs) waits for the consumer
/// to catch up and holds its lane back, through QUIC flow control, rather than be lost
/// for the segment timeout; a consumer stuck longer sheds as before.
const ACP_WAIT: Duration = Duration::from_secs(1);

/// Where the ACP messages of some types go ([`Mesh::route_acp`]).
struct AcpRoute {
    to: mpsc::Sender<FromPeer<Message>>,
    /// A message waited [`ACP_WAIT`] in vain: until the channel has room again, the
    /// next ones are shed at once, so that a stuck consumer costs its senders' lanes
    /// one wait, not one per message.
    stuck: AtomicBool,
}

/// Registry service name and kinds on the wire.
pub(crate) const REGISTRY_SERVICE: &str = "agentmesh.registry";
const REGISTRY_UPDATE: &str = "agentmesh.registry.update";
use crate::answer::{self, Answering, Outcome, PendingReply, ReplyTo, Replying, Waiting};
use crate::client::{ERROR_KIND, UNANSWERED_KIND};
/// Asks waiting for answers at once, per node.
const MAX_PENDING_ASKS: usize = 65_536;
/// Monitors set at once, per node.
const MAX_MONITORS: usize = 65_536;
/// Names known cluster-wide, per node.
const MAX_REMOTE_NAMES: usize = 1_000_000;
/// How long a local actor may take to answer a remote ask.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a send to a node just reported up waits for the connection to it.
const UP_WAIT: Duration = Duration::from_secs(2);

/// A node's names, as it announces them.
#[derive(Debug, Serialize, Deserialize)]
struct RegistryUpdate {
    /// The node the names belong to (must be the sender).
    node: String,
    /// True if `added` is the node's whole list, replacing what was known.
    full: bool,
    added: Vec<String>,
    removed: Vec<String>,
}

/// Decodes an envelope body and delivers it: (sending node, kind, body).
type Deliver = Box<dyn Fn(&str, &str, &[u8]) -> Result<(), String> + Send + Sync>;
/// Delivers a typed message from a node: the local fast path and `Deliver`'s last step.
type Cast<M> = Arc<dyn Fn(M, &str) -> Result<(), Refused> + Send + Sync>;

/// Why a cast did not reach the actor's mailbox.
#[derive(Debug)]
enum Refused {
    /// The actor has stopped (ractor's reason).
    Stopped(String),
    /// The actor, registered with [`Mesh::register_bounded`], has `limit` messages
    /// waiting or in hand.
    Full { limit: usize },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Stopped(why) => write!(f, "the actor has stopped: {why}"),
            Refused::Full { limit } => write!(f, "the actor has {limit} messages waiting"),
        }
    }
}

/// A message for an actor registered with [`Mesh::register_bounded`]: the message and
/// its authenticated sender, as in [`FromPeer`], and its place among the messages the
/// actor has waiting. The place is given back when this is dropped, so it counts
/// against the limit until the actor has handled the message (or takes it out with
/// [`Bounded::into_parts`]).
#[derive(Debug)]
pub struct Bounded<M> {
    /// The sending node.
    pub peer: String,
    /// The message.
    pub message: M,
    place: Place,
}

impl<M> Bounded<M> {
    /// The sender and the message; the message's place is given back at once.
    pub fn into_parts(self) -> (String, M) {
        let Bounded {
            peer,
            message,
            place,
        } = self;
        drop(place);
        (peer, message)
    }
}

/// How many messages a bounded actor has waiting or in hand, and how many it may.
#[derive(Debug)]
struct Intake {
    held: AtomicUsize,
    limit: usize,
}

impl Intake {
    /// A place for one more message, unless all `limit` are taken.
    fn admit(self: &Arc<Intake>) -> Option<Place> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(self.clone()))
    }
}

/// One message's place in a bounded actor's intake, given back on drop.
#[derive(Debug)]
struct Place(Arc<Intake>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The cast of an actor with a bounded mailbox (see [`Mesh::register_bounded`]): each
/// delivery takes one of `limit` places, and `wrap` puts the message, its sender and
/// its place into the actor's own message.
fn bounded_cast<M: RemoteMessage, Msg: ractor::Message>(
    name: &str,
    target: ActorRef<Msg>,
    wrap: impl Fn(Bounded<M>) -> Msg + Send + Sync + 'static,
    limit: usize,
) -> Cast<M> {
    let intake = Arc::new(Intake {
        held: AtomicUsize::new(0),
        limit: limit.max(1),
    });
    let label = name.to_string();
    Arc::new(move |message, peer| {
        let Some(place) = intake.admit() else {
            metrics::counter!("agentmesh_actor_shed_total", "actor" => label.clone()).increment(1);
            return Err(Refused::Full {
                limit: intake.limit,
            });
        };
        // A refused cast hands the message back and drops it, place and all.
        target
            .cast(wrap(Bounded {
                peer: peer.to_string(),
                message,
                place,
            }))
            .map_err(stopped)
    })
}

/// What a refused ractor cast becomes.
fn stopped<T>(e: ractor::MessagingErr<T>) -> Refused {
    Refused::Stopped(e.to_string())
}

/// A message together with the node that sent it: the authenticated peer for a message
/// from another node (its certificate's name), this node for a local one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromPeer<M> {
    /// The sending node.
    pub peer: String,
    /// The message.
    pub message: M,
}
/// Decodes a request and hands it to the actor: the answer to come, or why there is
/// none.
type Answer = Box<dyn Fn(&str, &[u8]) -> Result<Box<dyn PendingReply>, String> + Send + Sync>;

/// A locally registered actor, with typed handles for local sends and erased ones for
/// what arrives from the network.
struct LocalActor {
    kind: &'static str,
    /// `Cast<M>` for casts, or `Ask<Req, Resp>` for asks.
    typed: Arc<dyn Any + Send + Sync>,
    deliver: Option<Deliver>,
    answer: Option<Answer>,
    /// How long a request may wait for the actor's answer.
    answer_timeout: Duration,
    actor_id: ractor::ActorId,
    /// A node service (`agentmesh.*`, on every node, addressed by node): never announced.
    service: bool,
}

type Ask<Req, Resp> =
    Arc<dyn Fn(Req, &str) -> Result<oneshot::Receiver<Resp>, String> + Send + Sync>;

/// Remote messaging for one node. Cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    pub(crate) inner: Arc<Inner>,
}

/// A [`Mesh`] that does not keep it alive: what the transport's inbox holds, since the
/// mesh holds the transport.
pub(crate) struct WeakMesh(std::sync::Weak<Inner>);

impl WeakMesh {
    pub(crate) fn upgrade(&self) -> Option<Mesh> {
        self.0.upgrade().map(|inner| Mesh { inner })
    }
}

pub(crate) struct Inner {
    node: String,
    /// Which life of the node this process is ([`crate::NodeId::life`]).
    life: u64,
    transport: Transport,
    local: RwLock<HashMap<String, LocalActor>>,
    remote: RwLock<HashMap<String, ActorAddr>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, String>>>>,
    monitors: Mutex<HashMap<ActorAddr, Vec<oneshot::Sender<Down>>>>,
    acp_routes: RwLock<HashMap<MessageType, Arc<AcpRoute>>>,
    /// Nodes reported up whose connection is still being made, each with what its
    /// waiting senders are woken by when it is (see [`Mesh::peer_ready`]).
    connecting: Mutex<HashMap<String, Arc<Notify>>>,
    /// Requests from other nodes waiting for local actors' answers.
    pub(crate) answers: Waiting,
    next_correlation: AtomicU64,
    trace_prefix: u64,
}

/// A trace id shown in hex, computed only if a log line is written.
struct HexId<'a>(Option<&'a [u8]>);

impl std::fmt::Display for HexId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0.unwrap_or_default() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn encode<M: Serialize>(m: &M) -> Result<Bytes, SendError> {
    // Room for a small message up front: growing from empty cost more than encoding.
    let mut out = Vec::with_capacity(128);
    write_message(&mut out, m)?;
    Ok(Bytes::from(out))
}

pub(crate) fn write_message<M: Serialize>(out: &mut Vec<u8>, m: &M) -> Result<(), SendError> {
    rmp_serde::encode::write_named(out, m).map_err(|e| SendError::Encode(e.to_string()))
}

thread_local! {
    /// The buffer outgoing envelopes are encoded into, one per thread and reused: the
    /// lane copies the bytes into its frames, so a message costs no allocation of its
    /// own. A sender takes it out for the length of one send (its task may move to
    /// another thread meanwhile) and puts it back after.
    static ENVELOPE_BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A buffer larger than this (a big message went through it) is dropped rather than
/// kept for the next send.
const ENVELOPE_BUF_KEEP_BYTES: usize = 64 * 1024;

/// This thread's envelope buffer, taken out for one send.
struct EnvelopeBuf(Vec<u8>);

impl EnvelopeBuf {
    fn take() -> EnvelopeBuf {
        let mut buf = ENVELOPE_BUF.with(std::cell::Cell::take);
        buf.clear();
        EnvelopeBuf(buf)
    }

    /// Puts the buffer back for this thread's next send (its task may have moved to
    /// another thread meanwhile: that thread gets it), unless a big message grew it.
    fn give_back(self) {
        if self.0.capacity() <= ENVELOPE_BUF_KEEP_BYTES {
            ENVELOPE_BUF.with(|b| b.set(self.0));
        }
    }
}

/// What [`Mesh::try_send_encoded`] did with a message.
pub(crate) enum Offer {
    /// The lane took it.
    Taken,
    /// The lane could not take it at once: its encoded ENVELOPE, not sent.
    Busy(Vec<u8>),
}

/// The header of an ENVELOPE sent with Stream Prio `prio`.
fn envelope_header(prio: u8) -> Header {
    let mut header = Header::new(MessageType::Envelope);
    header.prio = prio;
    header
}

impl Mesh {
    pub(crate) fn new(node: &str, incarnation: u64, transport: Transport) -> Mesh {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        node.hash(&mut hasher);
        Mesh {
            inner: Arc::new(Inner {
                node: node.to_string(),
                life: crate::NodeId::life_of(incarnation),
                transport,
                local: RwLock::new(HashMap::default()),
                remote: RwLock::new(HashMap::default()),
                pending: Mutex::new(HashMap::default()),
                monitors: Mutex::new(HashMap::default()),
                acp_routes: RwLock::new(HashMap::default()),
                connecting: Mutex::new(HashMap::default()),
                answers: Waiting::default(),
                next_correlation: AtomicU64::new(1),
                trace_prefix: hasher.finish() ^ incarnation,
            }),
        }
    }

    pub(crate) fn downgrade(&self) -> WeakMesh {
        WeakMesh(Arc::downgrade(&self.inner))
    }

    /// The transport the mesh sends on.
    pub(crate) fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// Which life of this node the process is ([`crate::NodeId::life`]): a restart
    /// takes a later one, a renewal keeps it.
    pub fn life(&self) -> u64 {
        self.inner.life
    }

    /// Whether this node has an open connection to node `name` now. Members keep one
    /// to each other (probes and keep-alives), so one up without it for long is cut
    /// off from this node, though others may still reach it.
    pub fn is_connected(&self, name: &str) -> bool {
        self.connection(name).is_some()
    }

    /// The address of `name` on this node.
    pub fn local_addr(&self, name: &str) -> ActorAddr {
        ActorAddr {
            node: self.inner.node.clone(),
            name: name.to_string(),
        }
    }

    /// Registers a local actor under a cluster-wide name: other nodes can `send` to it
    /// once they hear of it (at once for connected nodes). The name is released when the
    /// actor stops.
    pub fn register<M: RemoteMessage>(
        &self,
        name: &str,
        actor: ActorRef<M>,
    ) -> Result<ActorAddr, RegisterError> {
        let target = actor.clone();
        let cast: Cast<M> = Arc::new(move |message, _| target.cast(message).map_err(stopped));
        self.register_cast(name, actor.get_cell(), cast, false)
    }

    /// Like [`Mesh::register`], for an actor that needs to know which node sent each
    /// message (to check that a node speaks only for itself, say): it gets
    /// [`FromPeer`], with the authenticated sender.
    pub fn register_from_peer<M: RemoteMessage>(
        &self,
        name: &str,
        actor: ActorRef<FromPeer<M>>,
    ) -> Result<ActorAddr, RegisterError> {
        let target = actor.clone();
        let cast: Cast<M> = Arc::new(move |message, peer| {
            target
                .cast(FromPeer {
                    peer: peer.to_string(),
                    message,
                })
                .map_err(stopped)
        });
        self.register_cast(name, actor.get_cell(), cast, false)
    }

    /// Like [`Mesh::register_from_peer`], with a bounded mailbox: at most `limit`
    /// messages (at least 1) wait for the actor or are in its hands, each a
    /// [`Bounded`] that keeps its place until dropped. A message past that is not
    /// delivered: a local send gets [`SendError::Full`], and one from another node is
    /// dropped (casts are at most once) and counted in `agentmesh_actor_shed_total`
    /// with the actor's name. What a plain [`Mesh::register`] cannot do, since
    /// ractor's mailboxes are unbounded and tell no one when a message is taken.
    pub fn register_bounded<M: RemoteMessage>(
        &self,
        name: &str,
        actor: ActorRef<Bounded<M>>,
        limit: usize,
    ) -> Result<ActorAddr, RegisterError> {
        let cast = bounded_cast(name, actor.clone(), |b| b, limit);
        self.register_cast(name, actor.get_cell(), cast, false)
    }

    /// Registers a node service: an actor that every node runs under the same
    /// `agentmesh.`-prefixed name (discovery, the coordinator …), addressed with
    /// [`ActorAddr`] on a given node and never announced to the cluster. `wrap` turns
    /// each message, with its authenticated sender, into the actor's own message.
    pub fn register_service<M: RemoteMessage, Msg: ractor::Message>(
        &self,
        name: &str,
        actor: ActorRef<Msg>,
        wrap: fn(FromPeer<M>) -> Msg,
    ) -> Result<ActorAddr, RegisterError> {
        let target = actor.clone();
        let cast: Cast<M> = Arc::new(move |message, peer| {
            target
                .cast(wrap(FromPeer {
                    peer: peer.to_string(),
                    message,
                }))
                .map_err(stopped)
        });
        self.register_cast(name, actor.get_cell(), cast, true)
    }

    /// [`Mesh::register_service`] with a bounded mailbox, as [`Mesh::register_bounded`]:
    /// for a service whose senders recover from a dropped message (discovery's deltas
    /// are versioned, and a gap makes the receiver ask for the whole list).
    pub fn register_service_bounded<M: RemoteMessage, Msg: ractor::Message>(
        &self,
        name: &str,
        actor: ActorRef<Msg>,
        wrap: fn(Bounded<M>) -> Msg,
        limit: usize,
    ) -> Result<ActorAddr, RegisterError> {
        let cast = bounded_cast(name, actor.clone(), wrap, limit);
        self.register_cast(name, actor.get_cell(), cast, true)
    }

    fn register_cast<M: RemoteMessage>(
        &self,
        name: &str,
        cell: ractor::ActorCell,
        cast: Cast<M>,
        service: bool,
    ) -> Result<ActorAddr, RegisterError> {
        let remote = cast.clone();
        let deliver: Deliver = Box::new(move |peer, kind, body| {
            if kind != M::KIND {
                return Err(format!("takes {}, not {kind}", M::KIND));
            }
            let message: M = rmp_serde::from_slice(body).map_err(|e| e.to_string())?;
            remote(message, peer).map_err(|e| e.to_string())
        });
        let id = cell.get_id();
        self.insert(
            name,
            LocalActor {
                kind: M::KIND,
                typed: Arc::new(cast),
                deliver: Some(deliver),
                answer: None,
                answer_timeout: ANSWER_TIMEOUT,
                actor_id: id,
                service,
            },
        )?;
        self.watch(name, cell, id);
        Ok(self.local_addr(name))
    }

    /// Registers a local actor that answers requests: `wrap` turns a request and the
    /// port to answer on into the actor's own message.
    pub fn register_rpc<Req, Resp, Msg>(
        &self,
        name: &str,
        actor: ActorRef<Msg>,
        wrap: fn(Req, RpcReplyPort<Resp>) -> Msg,
    ) -> Result<ActorAddr, RegisterError>
    where
        Req: RemoteMessage,
        Resp: RemoteMessage,
        Msg: ractor::Message,
    {
        let wrap = move |req, _: &str, port| wrap(req, port);
        self.rpc(name, actor, wrap, ANSWER_TIMEOUT, false)
    }

    /// Like [`Mesh::register_rpc`], for a node service (see [`Mesh::register_service`])
    /// that may take up to `answer_timeout` to answer (a submitted task runs to its end).
    pub fn register_service_rpc<Req, Resp, Msg>(
        &self,
        name: &str,
        actor: ActorRef<Msg>,
        wrap: fn(Req, RpcReplyPort<Resp>) -> Msg,
        answer_timeout: Duration,
    ) -> Result<ActorAddr, RegisterError>
    where
        Req: RemoteMessage,
        Resp: RemoteMessage,
        Msg: ractor::Message,
    {
        let wrap = move |req, _: &str, port| wrap(req, port);
        self.rpc(name, actor, wrap, answer_timeout, true)
    }

    /// Like [`Mesh::register_service_rpc`], for a service that needs to know which node
    /// sent each request (to check that a node speaks only for itself): it gets
    /// [`FromPeer`], with the authenticated sender (this node, for a local request).
    pub fn register_service_rpc_from_peer<Req, Resp, Msg>(
        &self,
        name: &str,
        actor: ActorRef<Msg>,
        wrap: fn(FromPeer<Req>, RpcReplyPort<Resp>) -> Msg,
        answer_timeout: Duration,
    ) -> Result<ActorAddr, RegisterError>
    where
        Req: RemoteMessage,
        Resp: RemoteMessage,
        Msg: ractor::Message,
    {
        let wrap = move |message, peer: &str, port| {
            let peer = peer.to_string();
            wrap(FromPeer { peer, message }, port)
        };
        self.rpc(name, actor, wrap, answer_timeout, true)
    }

    fn rpc<Req, Resp, Msg>(
        &self,
        name: &str,
        actor: ActorRef<Msg>,
        wrap: impl Fn(Req, &str, RpcReplyPort<Resp>) -> Msg + Send + Sync + 'static,
        answer_timeout: Duration,
        service: bool,
    ) -> Result<ActorAddr, RegisterError>
    where
        Req: RemoteMessage,
        Resp: RemoteMessage,
        Msg: ractor::Message,
    {
        let target = actor.clone();
        let ask: Ask<Req, Resp> = Arc::new(move |req: Req, peer: &str| {
            let (tx, rx) = oneshot::channel();
            let port = RpcReplyPort::from(tx);
            target
                .cast(wrap(req, peer, port))
                .map_err(|e| e.to_string())?;
            Ok(rx)
        });
        let erased = ask.clone();
        let answer: Answer = Box::new(move |peer, body| {
            let req: Req = rmp_serde::from_slice(body).map_err(|e| e.to_string())?;
            let reply: Box<dyn PendingReply> = Box::new(Replying::new(erased(req, peer)?));
            Ok(reply)
        });
        let id = actor.get_id();
        self.insert(
            name,
            LocalActor {
                kind: Req::KIND,
                typed: Arc::new(ask),
                deliver: None,
                answer: Some(answer),
                answer_timeout,
                actor_id: id,
                service,
            },
        )?;
        self.watch(name, actor.get_cell(), id);
        Ok(self.local_addr(name))
    }

    fn insert(&self, name: &str, actor: LocalActor) -> Result<(), RegisterError> {
        let service = actor.service;
        let reserved = name == REGISTRY_SERVICE || name == crate::node::STATUS_SERVICE;
        if name.is_empty() || name.starts_with("agentmesh.") != service || reserved {
            return Err(RegisterError::BadName(name.to_string()));
        }
        {
            let mut local = self
                .inner
                .local
                .write()
                .map_err(|_| RegisterError::Taken(name.into()))?;
            if local.contains_key(name) {
                return Err(RegisterError::Taken(name.to_string()));
            }
            local.insert(name.to_string(), actor);
        }
        if service {
            return Ok(());
        }
        self.broadcast(RegistryUpdate {
            node: self.inner.node.clone(),
            full: false,
            added: vec![name.to_string()],
            removed: Vec::new(),
        });
        Ok(())
    }

    /// Releases `name` when the actor stops.
    fn watch(&self, name: &str, cell: ractor::ActorCell, id: ractor::ActorId) {
        let (mesh, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            let _ = cell.wait(None).await;
            mesh.unregister_if(&name, id);
        });
    }

    fn unregister_if(&self, name: &str, id: ractor::ActorId) {
        let removed = self
            .inner
            .local
            .write()
            .map(|mut local| match local.get(name) {
                Some(a) if a.actor_id == id => local.remove(name).map(|a| a.service),
                _ => None,
            })
            .unwrap_or(None);
        if let Some(service) = removed {
            self.fire(&self.local_addr(name), Down::Stopped);
            if service {
                return;
            }
            self.broadcast(RegistryUpdate {
                node: self.inner.node.clone(),
                full: false,
                added: Vec::new(),
                removed: vec![name.to_string()],
            });
        }
    }

    /// Hands every ACP message of these types that arrives (from any peer, or from this
    /// node through [`Mesh::send_acp`]) to `to`, with its authenticated sender. The
    /// channel is the bound. When it is full, a message that came as a datagram is
    /// dropped and counted (`agentmesh_acp_shed_total`); one that came on a lane, or
    /// from this node, waits up to 1 s for room (holding back its lane, and the local
    /// sender), and is dropped and counted only then. Once one waited in vain, the
    /// next are dropped at once until the channel has room again: one stuck consumer
    /// stalls each lane once, not for each message. ENVELOPE and MEMBERSHIP belong to
    /// the node and cannot be routed.
    pub fn route_acp(&self, types: &[MessageType], to: mpsc::Sender<FromPeer<Message>>) {
        let route = Arc::new(AcpRoute {
            to,
            stuck: AtomicBool::new(false),
        });
        if let Ok(mut routes) = self.inner.acp_routes.write() {
            for t in types {
                if !matches!(t, MessageType::Envelope | MessageType::Membership) {
                    routes.insert(*t, route.clone());
                }
            }
        }
    }

    /// Delivers an ACP message that arrived from `peer` to the consumer of its type;
    /// `reliably` (on a lane, or from this node) it waits a while for room
    /// ([`Mesh::route_acp`]).
    pub(crate) async fn on_acp(&self, peer: &str, message: Message, reliably: bool) {
        let msg_type = message.header.msg_type;
        let route = self
            .inner
            .acp_routes
            .read()
            .ok()
            .and_then(|r| r.get(&msg_type).cloned());
        let Some(route) = route else {
            return debug!(%peer, %msg_type, "no consumer for this message type");
        };
        let item = FromPeer {
            peer: peer.to_string(),
            message,
        };
        let shed = |why: &str| {
            metrics::counter!("agentmesh_acp_shed_total", "type" => msg_type.name()).increment(1);
            debug!(%peer, %msg_type, why, "ACP message shed");
        };
        let item = match route.to.try_send(item) {
            Ok(()) => {
                // Written only when it changes: every lane reader passes here.
                if route.stuck.load(Ordering::Relaxed) {
                    route.stuck.store(false, Ordering::Relaxed);
                }
                return;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return shed("its consumer has stopped"),
            Err(mpsc::error::TrySendError::Full(item))
                if reliably && !route.stuck.load(Ordering::Relaxed) =>
            {
                item
            }
            Err(mpsc::error::TrySendError::Full(_)) => return shed("its consumer is behind"),
        };
        metrics::counter!("agentmesh_acp_waited_total", "type" => msg_type.name()).increment(1);
        match tokio::time::timeout(ACP_WAIT, route.to.send(item)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => shed("its consumer has stopped"),
            Err(_) => {
                route.stuck.store(true, Ordering::Relaxed);
                shed("its consumer is stuck");
            }
        }
    }

    /// The connection to `node`, if there is one.
    fn peer(&self, node: &str) -> Result<PeerHandle, SendError> {
        self.inner
            .transport
            .peer(node)
            .ok_or_else(|| SendError::NodeUnreachable(node.to_string()))
    }

    /// The connection to `node`. A node's subscribers hear that it is up before the
    /// connection to it is made, and often send to it at once (discovery its list, the
    /// policy actor the policy): for a node reported up whose connection is still being
    /// made, this waits for it, up to [`UP_WAIT`], instead of failing.
    async fn peer_ready(&self, node: &str) -> Result<PeerHandle, SendError> {
        if let Some(peer) = self.inner.transport.peer(node) {
            return Ok(peer);
        }
        if let Some(made) = self.connecting(node) {
            let notified = made.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Checked after `enable`: a connection made since is not waited for, and
            // one made from now on wakes this waiter.
            let still = self
                .connecting(node)
                .is_some_and(|m| Arc::ptr_eq(&m, &made));
            if still && self.inner.transport.peer(node).is_none() {
                let _ = tokio::time::timeout(UP_WAIT, notified).await;
            }
        }
        self.peer(node)
    }

    fn connecting(&self, node: &str) -> Option<Arc<Notify>> {
        self.inner.connecting.lock().ok()?.get(node).cloned()
    }

    /// `node` is no longer being connected to: wakes the senders waiting for it.
    fn connected(&self, node: &str, made: &Arc<Notify>) {
        if let Ok(mut connecting) = self.inner.connecting.lock() {
            if connecting.get(node).is_some_and(|m| Arc::ptr_eq(m, made)) {
                connecting.remove(node);
            }
        }
        made.notify_waiters();
    }

    /// Sends an ACP message to `node` on the lane its Stream Prio picks; to this node
    /// itself it is handed straight to the local consumer.
    pub async fn send_acp(&self, node: &str, message: Message) -> Result<(), SendError> {
        self.send_acp_via(node, message).await.map(drop)
    }

    /// [`Mesh::send_acp`], returning the connection the message went on (`None` to this
    /// node itself), so that a sender can tell whether that connection was lost
    /// before it surely arrived ([`PeerHandle::link`]).
    pub async fn send_acp_via(
        &self,
        node: &str,
        message: Message,
    ) -> Result<Option<PeerHandle>, SendError> {
        if node == self.inner.node {
            self.on_acp(node, message, true).await;
            return Ok(None);
        }
        let peer = self.peer_ready(node).await?;
        peer.send(message).await?;
        Ok(Some(peer))
    }

    /// The longest message (ENVELOPE or other ACP body) a node takes, and sends.
    pub fn max_message_bytes(&self) -> usize {
        self.inner.transport.max_message_bytes()
    }

    /// The open connection to `node`, if there is one now.
    pub fn connection(&self, node: &str) -> Option<PeerHandle> {
        self.inner.transport.peer(node).filter(PeerHandle::is_open)
    }

    /// Sends an ACP message to `node` as a datagram (unreliable: progress reports),
    /// on the bulk lane if it is too large.
    pub async fn send_acp_datagram(&self, node: &str, message: Message) -> Result<(), SendError> {
        if node == self.inner.node {
            self.on_acp(node, message, false).await;
            return Ok(());
        }
        self.peer_ready(node)
            .await?
            .send_datagram(message)
            .await
            .map(|_| ())
            .map_err(SendError::from)
    }

    /// Which node owns which Agent ID: the transport refuses frames from a peer
    /// speaking for an agent it does not own. Discovery fills it.
    pub fn ownership(&self) -> Arc<OwnershipTable> {
        self.inner.transport.ownership().clone()
    }

    /// Where `name` lives, if this node knows.
    pub fn lookup(&self, name: &str) -> Option<ActorAddr> {
        if self.inner.local.read().ok()?.contains_key(name) {
            return Some(self.local_addr(name));
        }
        self.inner.remote.read().ok()?.get(name).cloned()
    }

    /// The local actor registered as `name`: the kind it takes, its typed handle, and
    /// whether it takes casts (as opposed to requests).
    fn local_entry(
        &self,
        name: &str,
    ) -> Result<(&'static str, Arc<dyn Any + Send + Sync>, bool), SendError> {
        let local = self
            .inner
            .local
            .read()
            .map_err(|_| SendError::Stopped(name.to_string()))?;
        let actor = local
            .get(name)
            .ok_or_else(|| SendError::UnknownName(name.to_string()))?;
        Ok((actor.kind, actor.typed.clone(), actor.deliver.is_some()))
    }

    /// Sends `message` to the actor registered as `name`, wherever it runs.
    pub async fn send<M: RemoteMessage>(&self, name: &str, message: M) -> Result<(), SendError> {
        let addr = self
            .lookup(name)
            .ok_or_else(|| SendError::UnknownName(name.to_string()))?;
        self.send_to(&addr, message).await
    }

    /// Sends `message` to the actor at `addr`. A local actor gets it by a plain cast,
    /// with no serialization.
    pub async fn send_to<M: RemoteMessage>(
        &self,
        addr: &ActorAddr,
        message: M,
    ) -> Result<(), SendError> {
        if addr.node == self.inner.node {
            let (kind, typed, takes_casts) = self.local_entry(&addr.name)?;
            if kind != M::KIND || !takes_casts {
                return Err(SendError::WrongKind {
                    name: addr.name.clone(),
                    expected: kind,
                    got: M::KIND,
                });
            }
            let cast = typed
                .downcast_ref::<Cast<M>>()
                .ok_or_else(|| SendError::WrongKind {
                    name: addr.name.clone(),
                    expected: "another type",
                    got: M::KIND,
                })?;
            return cast(message, &self.inner.node).map_err(|e| match e {
                Refused::Stopped(_) => SendError::Stopped(addr.name.clone()),
                Refused::Full { limit } => SendError::Full {
                    name: addr.name.clone(),
                    limit,
                },
            });
        }
        let prio = message.priority();
        let trace_id = self.trace_id();
        debug!(to = %addr.name, node = %addr.node, kind = M::KIND, trace_id = %HexId(Some(&trace_id)), "actor message sent");
        let envelope = EnvelopeParts {
            to: &addr.name,
            kind: M::KIND,
            correlation: 0,
            reply: false,
            trace_id: Some(&trace_id),
            body: &[],
        };
        self.send_encoded(&addr.node, prio, |out| {
            envelope.encode_into_with(out, |out| write_message(out, &message))
        })
        .await
    }

    /// Sends `request` to the actor registered as `name` and waits for its answer.
    pub async fn ask<Req: RemoteMessage, Resp: RemoteMessage>(
        &self,
        name: &str,
        request: Req,
        timeout: Duration,
    ) -> Result<Resp, AskError> {
        let addr = self
            .lookup(name)
            .ok_or_else(|| SendError::UnknownName(name.to_string()))?;
        self.ask_at(&addr, request, timeout).await
    }

    /// Sends `request` to the actor at `addr` and waits for its answer.
    pub async fn ask_at<Req: RemoteMessage, Resp: RemoteMessage>(
        &self,
        addr: &ActorAddr,
        request: Req,
        timeout: Duration,
    ) -> Result<Resp, AskError> {
        let timeout_ms = timeout.as_millis() as u64;
        if addr.node == self.inner.node {
            let (_, typed, _) = self.local_entry(&addr.name)?;
            let ask =
                typed
                    .downcast_ref::<Ask<Req, Resp>>()
                    .ok_or_else(|| SendError::WrongKind {
                        name: addr.name.clone(),
                        expected: "another request or answer type",
                        got: Req::KIND,
                    })?;
            let answer = ask(request, &self.inner.node).map_err(AskError::Remote)?;
            return match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(_)) => Err(AskError::Remote(
                    "the actor dropped the request without answering".into(),
                )),
                Err(_) => Err(AskError::Timeout(timeout_ms)),
            };
        }
        let correlation = self.inner.next_correlation.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self
                .inner
                .pending
                .lock()
                .map_err(|_| AskError::TooMany(0))?;
            if pending.len() >= MAX_PENDING_ASKS {
                return Err(AskError::TooMany(pending.len()));
            }
            pending.insert(correlation, tx);
        }
        let trace_id = self.trace_id();
        let envelope = EnvelopeParts {
            to: &addr.name,
            kind: Req::KIND,
            correlation,
            reply: false,
            trace_id: Some(&trace_id),
            body: &[],
        };
        let sent = self
            .send_encoded_via(&addr.node, request.priority(), |out| {
                envelope.encode_into_with(out, |out| write_message(out, &request))
            })
            .await;
        let result = match sent {
            Err(e) => Err(AskError::Send(e)),
            Ok(peer) => {
                // A connection lost with the request on it brings no answer: the ask
                // fails then, not at its timeout (a retry may go on a new one).
                let lost = async {
                    match peer.lost().await {
                        Some(why) => why,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    // An answer that came before the connection closed is taken.
                    biased;
                    answer = tokio::time::timeout(timeout, rx) => match answer {
                        Ok(Ok(Ok(body))) => rmp_serde::from_slice(&body)
                            .map_err(|e| AskError::Decode(e.to_string())),
                        Ok(Ok(Err(remote))) => Err(AskError::Remote(remote)),
                        Ok(Err(_)) => Err(AskError::Remote("the node went away".into())),
                        Err(_) => Err(AskError::Timeout(timeout_ms)),
                    },
                    why = lost => Err(AskError::ConnectionLost {
                        node: addr.node.clone(),
                        why,
                    }),
                }
            }
        };
        if let Ok(mut pending) = self.inner.pending.lock() {
            pending.remove(&correlation);
        }
        result
    }

    /// Resolves when the actor at `addr` stops or its node goes down.
    pub fn monitor(&self, addr: &ActorAddr) -> oneshot::Receiver<Down> {
        let (tx, rx) = oneshot::channel();
        let known = if addr.node == self.inner.node {
            self.inner
                .local
                .read()
                .map(|l| l.contains_key(&addr.name))
                .unwrap_or(false)
        } else {
            self.inner
                .remote
                .read()
                .map(|r| r.get(&addr.name) == Some(addr))
                .unwrap_or(false)
        };
        if !known {
            let _ = tx.send(Down::Unknown(addr.clone()));
            return rx;
        }
        if let Ok(mut monitors) = self.inner.monitors.lock() {
            if monitors.len() < MAX_MONITORS || monitors.contains_key(addr) {
                monitors.entry(addr.clone()).or_default().push(tx);
                return rx;
            }
        }
        warn!(actor = %addr.name, node = %addr.node, "too many monitors; this one fires at once");
        let _ = tx.send(Down::Unknown(addr.clone()));
        rx
    }

    fn fire(&self, addr: &ActorAddr, why: fn(ActorAddr) -> Down) {
        let waiting = self
            .inner
            .monitors
            .lock()
            .ok()
            .and_then(|mut m| m.remove(addr));
        for tx in waiting.into_iter().flatten() {
            let _ = tx.send(why(addr.clone()));
        }
    }

    fn trace_id(&self) -> [u8; 16] {
        let n = self.inner.next_correlation.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.inner.trace_prefix.to_be_bytes());
        id[8..].copy_from_slice(&n.to_be_bytes());
        id
    }

    async fn send_envelope(
        &self,
        node: &str,
        prio: u8,
        envelope: &EnvelopeParts<'_>,
    ) -> Result<(), SendError> {
        self.send_encoded(node, prio, |out| {
            envelope.encode_into(out);
            Ok(())
        })
        .await
    }

    /// [`Mesh::send_encoded`] for a caller that may not wait: sends the message if the
    /// lane takes it at once, or else hands its encoded bytes back, with nothing sent.
    pub(crate) fn try_send_encoded(
        &self,
        node: &str,
        prio: u8,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), SendError>,
    ) -> Result<Offer, SendError> {
        let peer = self.peer(node)?;
        let mut buf = EnvelopeBuf::take();
        encode(&mut buf.0)?;
        let sent = peer.try_send_ref(MessageRef::new(envelope_header(prio), &buf.0));
        let offer = match sent {
            Ok(true) => Ok(Offer::Taken),
            Ok(false) => Ok(Offer::Busy(buf.0.clone())),
            Err(e) => Err(SendError::from(e)),
        };
        buf.give_back();
        offer
    }

    /// Sends the ENVELOPE `encode` writes, from this thread's reused buffer.
    pub(crate) async fn send_encoded(
        &self,
        node: &str,
        prio: u8,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), SendError>,
    ) -> Result<(), SendError> {
        self.send_encoded_via(node, prio, encode).await.map(drop)
    }

    /// [`Mesh::send_encoded`], returning the connection it was sent on.
    async fn send_encoded_via(
        &self,
        node: &str,
        prio: u8,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), SendError>,
    ) -> Result<PeerHandle, SendError> {
        let peer = self.peer_ready(node).await?;
        let mut buf = EnvelopeBuf::take();
        encode(&mut buf.0)?;
        let sent = peer
            .send_ref(MessageRef::new(envelope_header(prio), &buf.0))
            .await;
        buf.give_back();
        sent.map_err(SendError::from)?;
        Ok(peer)
    }

    /// Sends this node's names to every connected peer (a change) in the background.
    fn broadcast(&self, update: RegistryUpdate) {
        let mesh = self.clone();
        tokio::spawn(async move {
            let Ok(body) = encode(&update) else { return };
            for peer in mesh.inner.transport.peers() {
                let _ = mesh.send_registry(peer.name(), &body).await;
            }
        });
    }

    async fn send_registry(&self, node: &str, body: &[u8]) -> Result<(), SendError> {
        let envelope = EnvelopeParts {
            to: REGISTRY_SERVICE,
            kind: REGISTRY_UPDATE,
            correlation: 0,
            reply: false,
            trace_id: None,
            body,
        };
        self.send_envelope(node, MessageType::Allocate.default_prio(), &envelope)
            .await
    }

    /// `node` has come up: connects to it (if membership heard of it through others),
    /// in the background, and sends it every local name. Until the connection is made,
    /// sends to `node` wait for it (see [`Mesh::peer_ready`]).
    pub(crate) fn node_up(&self, node: &str, addr: std::net::SocketAddr) {
        let made = Arc::new(Notify::new());
        if let Ok(mut connecting) = self.inner.connecting.lock() {
            connecting.insert(node.to_string(), made.clone());
        }
        let (mesh, node) = (self.clone(), node.to_string());
        tokio::spawn(async move {
            let dialled = mesh.inner.transport.connect(addr, Some(&node)).await;
            mesh.connected(&node, &made);
            match dialled {
                Ok(_) => mesh.send_names(&node).await,
                Err(e) => debug!(%node, error = %e, "cannot reach a node that came up"),
            }
        });
    }

    /// Sends every local name to `node`.
    async fn send_names(&self, node: &str) {
        let names: Vec<String> = self
            .inner
            .local
            .read()
            .map(|l| {
                l.iter()
                    .filter(|(_, a)| !a.service)
                    .map(|(name, _)| name.clone())
                    .collect()
            })
            .unwrap_or_default();
        let update = RegistryUpdate {
            node: self.inner.node.clone(),
            full: true,
            added: names,
            removed: Vec::new(),
        };
        if let Ok(body) = encode(&update) {
            if let Err(e) = self.send_registry(node, &body).await {
                debug!(%node, error = %e, "registry not sent");
            }
        }
    }

    /// Forgets every name on `node` and fires the monitors of its actors; senders
    /// waiting for a connection to it stop waiting.
    pub(crate) fn node_down(&self, node: &str) {
        let connecting = self.inner.connecting.lock().ok();
        if let Some(made) = connecting.and_then(|mut c| c.remove(node)) {
            made.notify_waiters();
        }
        let gone: Vec<ActorAddr> = self
            .inner
            .remote
            .write()
            .map(|mut remote| {
                let gone = remote
                    .values()
                    .filter(|a| a.node == node)
                    .cloned()
                    .collect();
                remote.retain(|_, a| a.node != node);
                gone
            })
            .unwrap_or_default();
        for addr in &gone {
            self.fire(addr, Down::NodeDown);
        }
        let orphans: Vec<ActorAddr> = self
            .inner
            .monitors
            .lock()
            .map(|m| m.keys().filter(|a| a.node == node).cloned().collect())
            .unwrap_or_default();
        for addr in &orphans {
            self.fire(addr, Down::NodeDown);
        }
    }

    /// Handles an ENVELOPE from `peer` that is not for the node's own services. It came
    /// with Stream Prio `prio`: an answer goes back at the request's priority, so an
    /// urgent ask is answered on the urgent lane.
    pub(crate) async fn on_envelope(&self, peer: &str, prio: u8, envelope: EnvelopeRef<'_>) {
        if envelope.reply {
            let waiting = self
                .inner
                .pending
                .lock()
                .ok()
                .and_then(|mut p| p.remove(&envelope.correlation));
            if let Some(tx) = waiting {
                let result = if envelope.kind == ERROR_KIND || envelope.kind == UNANSWERED_KIND {
                    Err(String::from_utf8_lossy(&envelope.body).into_owned())
                } else {
                    Ok(envelope.body)
                };
                let _ = tx.send(result);
            }
            return;
        }
        if envelope.to == REGISTRY_SERVICE {
            return self.on_registry(peer, &envelope.body);
        }
        let trace = HexId(envelope.trace_id.as_deref());
        let span = tracing::debug_span!("actor_message", %peer, to = %envelope.to, kind = %envelope.kind, trace_id = %trace);
        let _entered = span.enter();
        debug!("actor message arrived");
        let outcome = {
            let local = match self.inner.local.read() {
                Ok(local) => local,
                Err(_) => return,
            };
            match local.get(&*envelope.to) {
                None => Err(format!(
                    "no actor named {:?} on node {}",
                    envelope.to, self.inner.node
                )),
                Some(actor) if envelope.correlation == 0 => match &actor.deliver {
                    Some(deliver) => deliver(peer, &envelope.kind, &envelope.body).map(|()| None),
                    None => Err(format!("actor {:?} only answers requests", envelope.to)),
                },
                Some(actor) => match &actor.answer {
                    Some(answer) if envelope.kind == actor.kind => answer(peer, &envelope.body)
                        .map(|reply| Some((reply, actor.answer_timeout))),
                    Some(_) => Err(format!(
                        "actor {:?} takes {}, not {}",
                        envelope.to, actor.kind, envelope.kind
                    )),
                    None => Err(format!("actor {:?} does not answer requests", envelope.to)),
                },
            }
        };
        if matches!(outcome, Ok(None)) {
            return;
        }
        if let Err(e) = &outcome {
            debug!(%peer, to = %envelope.to, error = %e, "actor message not delivered");
            if envelope.correlation == 0 {
                return;
            }
        }
        let to = ReplyTo {
            peer: peer.to_string(),
            prio,
            correlation: envelope.correlation,
            kind: envelope.kind.into_owned(),
            trace_id: envelope.trace_id,
        };
        // The actor may take its time: its answer is sent when it gives it, from its
        // own thread (see `answer`), so the node's driver goes on meanwhile.
        match outcome {
            Ok(None) => {}
            Ok(Some((reply, timeout))) => Answering::start(self, to, reply, timeout),
            Err(e) => answer::send(
                self,
                &to,
                &tokio::runtime::Handle::current(),
                Outcome::Error(e),
            ),
        }
    }

    fn on_registry(&self, peer: &str, body: &[u8]) {
        let update: RegistryUpdate = match rmp_serde::from_slice(body) {
            Ok(u) => u,
            Err(e) => return warn!(%peer, error = %e, "bad registry update"),
        };
        if update.node != peer {
            return warn!(%peer, claimed = %update.node, "a node may only announce its own names");
        }
        let mut gone = Vec::new();
        if let Ok(mut remote) = self.inner.remote.write() {
            if update.full {
                let keep: std::collections::HashSet<&String> = update.added.iter().collect();
                let dropped: Vec<String> = remote
                    .iter()
                    .filter(|(name, a)| a.node == peer && !keep.contains(name))
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in dropped {
                    if let Some(addr) = remote.remove(&name) {
                        gone.push(addr);
                    }
                }
            }
            for name in update.removed {
                if remote.get(&name).is_some_and(|a| a.node == peer) {
                    if let Some(addr) = remote.remove(&name) {
                        gone.push(addr);
                    }
                }
            }
            for name in update.added {
                if remote.len() >= MAX_REMOTE_NAMES {
                    warn!(%peer, "name registry full; ignoring new names");
                    break;
                }
                remote.insert(
                    name.clone(),
                    ActorAddr {
                        node: peer.to_string(),
                        name,
                    },
                );
            }
        }
        for addr in &gone {
            self.fire(addr, Down::Stopped);
        }
    }
}
