//! One QUIC endpoint per node that both accepts and dials, with mutual TLS; the table
//! of peer connections (one per pair of nodes, simultaneous dials resolved the same way
//! on both sides); and the events the transport reports to its owner.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foldhash::HashMap;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use tokio::sync::watch;
use tracing::{debug, error, warn};

use crate::clock::{Clock, SystemClock};
use crate::events::{EventQueues, EventSenders, Inbox, TransportEvents};
use crate::headroom::{HeadroomFactory, WindowGauge};
use crate::ingress::{IngressLimits, OwnershipTable, Via};
use crate::peer::{PeerConn, PeerHandle};
use crate::stats::{HandshakeRefusal, StatsSnapshot, TransportStats};
use crate::tls::{self, NodeIdentity, Role, TlsError};
use crate::wire::{AcpErrorCode, Message, TimestampWindow, MAX_PAYLOAD_LEN};

/// A peer's node name, as its certificate gives it.
pub type PeerName = Arc<str>;

/// The SNI used when dialling an address whose node name is not known yet.
const UNKNOWN_PEER_SNI: &str = "agentmesh";

/// The largest reassembled message a node accepts unless configured otherwise.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Knobs of one node's transport. `EndpointConfig::new` gives the defaults.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// Address to bind (the node's `--listen`).
    pub listen: SocketAddr,
    /// A node, or a client that only dials nodes (and does not accept).
    pub role: Role,
    /// QUIC keep-alive interval: a silent peer is pinged this often, so the idle timeout
    /// only fires when it is really gone.
    pub keep_alive_interval_ms: u64,
    /// A connection with nothing received for this long is closed. The failure
    /// detector works above this, on its own, shorter timers; this is the backstop.
    pub idle_timeout_ms: u64,
    /// Bytes each lane may hold queued before senders on that lane wait.
    pub lane_queue_bytes: usize,
    /// Largest frame payload sent and accepted (at most 65,535).
    pub max_frame_payload: usize,
    /// Largest reassembled message accepted.
    pub max_message_bytes: usize,
    /// Share of the congestion window, in thousandths, that the bulk and normal lanes
    /// may fill; the rest is kept for urgent and coordination frames.
    pub lower_lane_window_share_permille: u64,
    /// Absolute cap on bytes in flight while the lower lanes write.
    pub max_lower_in_flight_bytes: u64,
    /// Per-peer ingress rate limit.
    pub ingress: IngressLimits,
    /// Freshness window for timestamped frames.
    pub timestamps: TimestampWindow,
    /// Events buffered for the owner, per carrier, before lane readers wait (and
    /// datagrams are shed).
    pub event_queues: EventQueues,
    /// UDP socket send and receive buffer size asked of the OS.
    pub socket_buffer_bytes: usize,
    /// The longest the peer may hold back an ACK, asked of it through QUIC's ACK
    /// frequency extension (QUIC's default is 25 ms). It bounds how soon a lost tail
    /// packet, such as an urgent reply with nothing sent after it, is probed again.
    pub max_ack_delay_ms: u64,
}

impl EndpointConfig {
    /// Defaults for a node listening on `listen`.
    pub fn new(listen: SocketAddr) -> EndpointConfig {
        EndpointConfig {
            listen,
            role: Role::Node,
            keep_alive_interval_ms: 250,
            idle_timeout_ms: 3_000,
            lane_queue_bytes: 4 * 1024 * 1024,
            max_frame_payload: MAX_PAYLOAD_LEN,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            lower_lane_window_share_permille: 500,
            max_lower_in_flight_bytes: 256 * 1024,
            ingress: IngressLimits::default(),
            timestamps: TimestampWindow::default(),
            event_queues: EventQueues::default(),
            socket_buffer_bytes: 8 * 1024 * 1024,
            max_ack_delay_ms: 2,
        }
    }
}

/// What the transport tells its owner.
#[derive(Debug)]
pub enum TransportEvent {
    /// A connection to `peer` is up.
    PeerUp {
        /// The peer's node name.
        peer: PeerName,
        /// Its address.
        addr: SocketAddr,
    },
    /// The connection to `peer` is gone.
    PeerDown {
        /// The peer's node name.
        peer: PeerName,
        /// Why, as quinn or the peer put it.
        reason: String,
        /// The code the peer closed the connection with, if it closed it (ACP error
        /// codes, docs/acp.md); none if it timed out, was reset or closed here.
        peer_code: Option<u64>,
    },
    /// Messages arrived from `peer`, in order within the carrier.
    Received {
        /// The peer's node name.
        peer: PeerName,
        /// The lane they came on, or datagram.
        via: Via,
        /// Whole messages (fragments already joined).
        messages: Vec<Message>,
    },
}

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The UDP socket could not be set up.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The TLS identity or configuration is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// quinn refused to start a connection.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The connection failed or was closed.
    #[error("connection to {addr} failed: {source}{}", handshake_hint(source))]
    Connection {
        /// The address.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectionError,
    },
    /// The peer's certificate names another node than the one dialled.
    #[error("dialled {expected} but {addr} is {actual}")]
    WrongPeer {
        /// The address.
        addr: SocketAddr,
        /// The name expected.
        expected: String,
        /// The name in its certificate.
        actual: String,
    },
    /// The address is this node itself.
    #[error("{addr} is this node ({name})")]
    SelfConnect {
        /// The address.
        addr: SocketAddr,
        /// This node's name.
        name: String,
    },
    /// The node at `addr` presents this node's own name.
    #[error("the node at {addr} is named {name}, as this node is: node names must be unique in a cluster")]
    SameName {
        /// The address dialled.
        addr: SocketAddr,
        /// The name both have.
        name: String,
    },
    /// The node at `addr` presents a name that another live node, connected from
    /// `holder`, holds. Node names must be unique in a cluster.
    #[error("the node at {addr} is named {name}, like the live node at {holder}: node names must be unique in a cluster")]
    NameInUse {
        /// The address dialled.
        addr: SocketAddr,
        /// The name it presented.
        name: String,
        /// Where the node already holding the name is.
        holder: SocketAddr,
    },
    /// No connection to that peer.
    #[error("not connected to {0}")]
    NotConnected(String),
    /// The connection went away while sending.
    #[error("connection to {0} closed")]
    PeerClosed(String),
    /// The message cannot be sent (a timestamped message too large for one frame).
    #[error("message cannot be framed: {0}")]
    Unframeable(#[from] crate::wire::FrameTooLarge),
    /// The message is longer than a peer takes (`max_message_bytes`, which peers are
    /// expected to share): the peer would close the connection for it.
    #[error("a message of {len} bytes is more than the {limit} one message may carry")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A dial to the same address, made at the same time and waited for, failed.
    #[error("connection to {addr} failed: {reason}")]
    Dial {
        /// The address.
        addr: SocketAddr,
        /// Why the dial failed.
        reason: String,
    },
}

impl TransportError {
    /// True if the message can never be sent, on this connection or any other: it
    /// does not fit a frame, or is longer than a peer takes. Sending it again is
    /// pointless.
    pub fn never_sendable(&self) -> bool {
        matches!(
            self,
            TransportError::Unframeable(_) | TransportError::TooLarge { .. }
        )
    }
}

/// What a failed handshake most likely means, for people reading the error: rustls
/// names the check that failed, not the set-up mistake behind it.
fn handshake_hint(error: &quinn::ConnectionError) -> &'static str {
    match HandshakeRefusal::classify(&error.to_string()) {
        HandshakeRefusal::UnknownIssuer => {
            " (the two sides' certificates come from different cluster CAs)"
        }
        HandshakeRefusal::Expired => " (a certificate is expired or not valid yet)",
        HandshakeRefusal::NoCertificate => " (one side presented no certificate)",
        HandshakeRefusal::Other => "",
    }
}

/// How a dial ended, for connects to the same address that waited for it.
type DialOutcome = Option<Result<PeerName, String>>;

/// A dial in flight, in [`Shared::dials`] until it ends, even if its connect is dropped.
struct Dialling<'a> {
    shared: &'a Shared,
    addr: SocketAddr,
    outcome: watch::Sender<DialOutcome>,
}

impl Drop for Dialling<'_> {
    fn drop(&mut self) {
        if let Ok(mut dials) = self.shared.dials.lock() {
            dials.remove(&self.addr);
        }
    }
}

pub(crate) struct Shared {
    pub(crate) name: PeerName,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) config: EndpointConfig,
    pub(crate) peers: Mutex<HashMap<PeerName, Arc<PeerConn>>>,
    pub(crate) events: EventSenders,
    /// The owner's handler for received lane messages, once it has set one.
    pub(crate) inbox: std::sync::OnceLock<Arc<dyn Inbox>>,
    pub(crate) ownership: Arc<OwnershipTable>,
    pub(crate) stats: Arc<TransportStats>,
    pub(crate) clock: Arc<dyn Clock>,
    /// Set once another live node is found holding this node's name (see
    /// [`Transport::name_conflict`]).
    name_conflict: watch::Sender<Option<String>>,
    /// Dials in flight, by address (see [`Transport::connect`]).
    dials: Mutex<HashMap<SocketAddr, watch::Receiver<DialOutcome>>>,
    client_crypto: Arc<QuicClientConfig>,
    server_crypto: Arc<QuicServerConfig>,
}

/// A node's transport: cheap to clone, all clones share one endpoint.
#[derive(Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

impl Transport {
    /// Binds the endpoint and starts accepting. Returns the transport and the stream of
    /// its events, which the owner must drain (lane readers wait when it is full).
    pub fn bind(
        config: EndpointConfig,
        identity: &NodeIdentity,
        ownership: Arc<OwnershipTable>,
    ) -> Result<(Transport, TransportEvents), TransportError> {
        Transport::bind_with_clock(config, identity, ownership, Arc::new(SystemClock))
    }

    /// [`Transport::bind`] with an explicit wall clock.
    pub fn bind_with_clock(
        config: EndpointConfig,
        identity: &NodeIdentity,
        ownership: Arc<OwnershipTable>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Transport, TransportEvents), TransportError> {
        let tls_err =
            |e: &dyn std::fmt::Display| TransportError::Tls(TlsError::Config(e.to_string()));
        let server_crypto = Arc::new(
            QuicServerConfig::try_from(tls::server_config(identity)?).map_err(|e| tls_err(&e))?,
        );
        let client_crypto = Arc::new(
            QuicClientConfig::try_from(tls::client_config_as(identity, config.role)?)
                .map_err(|e| tls_err(&e))?,
        );
        let socket = bind_socket(config.listen, config.socket_buffer_bytes)?;
        // A client accepts nothing: quinn refuses whatever dials it.
        let default_server = (config.role == Role::Node).then(|| {
            server_config(
                &server_crypto,
                &config,
                Arc::new(WindowGauge::new(
                    config.lower_lane_window_share_permille,
                    config.max_lower_in_flight_bytes,
                )),
            )
        });
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            default_server,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| TransportError::Bind {
            addr: config.listen,
            source,
        })?;
        let (events, rx) = crate::events::channels(config.event_queues);
        let shared = Arc::new(Shared {
            name: Arc::from(identity.name.as_str()),
            endpoint,
            config,
            peers: Mutex::new(HashMap::default()),
            events,
            inbox: std::sync::OnceLock::new(),
            ownership,
            stats: Arc::new(TransportStats::default()),
            clock,
            name_conflict: watch::Sender::new(None),
            dials: Mutex::new(HashMap::default()),
            client_crypto,
            server_crypto,
        });
        tokio::spawn(accept_loop(shared.clone()));
        Ok((Transport { shared }, rx))
    }

    /// Hands received lane messages to `inbox` on the lane readers' tasks from now on
    /// (what it leaves still goes to the event queues). Only the first call counts: it
    /// returns false if an inbox was already set.
    pub fn set_inbox(&self, inbox: Arc<dyn Inbox>) -> bool {
        self.shared.inbox.set(inbox).is_ok()
    }

    /// This node's name.
    pub fn name(&self) -> &PeerName {
        &self.shared.name
    }

    /// The longest message this node takes, and sends (`max_message_bytes`).
    pub fn max_message_bytes(&self) -> usize {
        self.shared.config.max_message_bytes
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.shared
            .endpoint
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: self.shared.config.listen,
                source,
            })
    }

    /// Becomes `Some(why)` once another live node is found holding this node's name: a
    /// node it dialled has the name, or a node refused it with `NAME_IN_USE`. The
    /// cluster will not take this node; its owner should stop it.
    pub fn name_conflict(&self) -> watch::Receiver<Option<String>> {
        self.shared.name_conflict.subscribe()
    }

    /// The counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The agent-ownership table the ingress checks read.
    pub fn ownership(&self) -> &Arc<OwnershipTable> {
        &self.shared.ownership
    }

    /// Connects to the node at `addr` (or returns the connection already there) and
    /// returns its name. With `expected` set, a peer with another name is refused, and
    /// a resumed session may send 0-RTT data on the lanes where that is safe. A connect
    /// to an address this node is dialling already waits for that dial instead of
    /// making a second connection (which the two nodes might not agree to retire).
    /// Without `expected`, an open connection to a peer at `addr` is the one there: a
    /// dial that ended before this connect began (at once, when it resumed a session)
    /// is not dialled twice.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: Option<&str>,
    ) -> Result<PeerName, TransportError> {
        loop {
            let there = match expected {
                Some(name) => self.peer(name).map(|peer| peer.name().clone()),
                None => self.peer_at(addr),
            };
            if let Some(name) = there {
                return Ok(name);
            }
            // A dial to `addr` in flight, or the sender for the one this connect makes.
            let in_flight = {
                let mut dials = self.shared.dials.lock().unwrap_or_else(|e| e.into_inner());
                match dials.get(&addr) {
                    Some(rx) => Ok(rx.clone()),
                    None => {
                        let (outcome, rx) = watch::channel(None);
                        dials.insert(addr, rx);
                        Err(outcome)
                    }
                }
            };
            let mut rx = match in_flight {
                Ok(rx) => rx,
                Err(outcome) => {
                    let dialling = Dialling {
                        shared: &self.shared,
                        addr,
                        outcome,
                    };
                    let result = self.dial(addr, expected).await;
                    let shared = result.as_ref().map(Arc::clone).map_err(|e| e.to_string());
                    dialling.outcome.send_replace(Some(shared));
                    return result;
                }
            };
            // A dial dropped before it ended tells nothing: this connect dials anew.
            let Some(outcome) = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|o| o.clone())
            else {
                continue;
            };
            return match outcome {
                Ok(name) => match expected {
                    Some(want) if *name != *want => Err(TransportError::WrongPeer {
                        addr,
                        expected: want.to_string(),
                        actual: name.to_string(),
                    }),
                    _ => Ok(name),
                },
                Err(reason) => Err(TransportError::Dial { addr, reason }),
            };
        }
    }

    /// Dials `addr` (see [`Transport::connect`]).
    async fn dial(
        &self,
        addr: SocketAddr,
        expected: Option<&str>,
    ) -> Result<PeerName, TransportError> {
        let shared = &self.shared;
        let gauge = new_gauge(&shared.config);
        let mut client = quinn::ClientConfig::new(shared.client_crypto.clone());
        client.transport_config(Arc::new(transport_config(&shared.config, gauge.clone())));
        let connecting = shared
            .endpoint
            .connect_with(client, addr, expected.unwrap_or(UNKNOWN_PEER_SNI))
            .map_err(|source| TransportError::Connect { addr, source })?;
        let (conn, handshake) = match (expected, connecting) {
            // A resumed session to a named peer: usable at once for 0-RTT-safe lanes.
            (Some(want), connecting) => match connecting.into_0rtt() {
                Ok((conn, accepted)) => {
                    let (tx, rx) = watch::channel(false);
                    let (check, want) = (conn.clone(), want.to_string());
                    tokio::spawn(async move {
                        accepted.await;
                        match peer_name(&check) {
                            Ok(name) if *name == *want => {
                                let _ = tx.send(true);
                            }
                            _ => check.close(
                                VarInt::from_u32(AcpErrorCode::ProtocolViolation.code()),
                                b"wrong node",
                            ),
                        }
                    });
                    (conn, rx)
                }
                Err(connecting) => (
                    wait_handshake(connecting, addr).await?,
                    watch::channel(true).1,
                ),
            },
            (None, connecting) => (
                wait_handshake(connecting, addr).await?,
                watch::channel(true).1,
            ),
        };
        let name = match expected {
            Some(name) if !*handshake.borrow() => Arc::from(name),
            _ => peer_name(&conn).map_err(TransportError::Tls)?,
        };
        if let Some(want) = expected {
            if &*name != want {
                conn.close(
                    VarInt::from_u32(AcpErrorCode::ProtocolViolation.code()),
                    b"wrong node",
                );
                return Err(TransportError::WrongPeer {
                    addr,
                    expected: want.to_string(),
                    actual: name.to_string(),
                });
            }
        }
        if let Some(holder) = name_held_elsewhere(shared, &conn, &name, addr).await {
            refuse_name(shared, &conn, &name, holder);
            if name != shared.name {
                return Err(TransportError::NameInUse {
                    addr,
                    name: name.to_string(),
                    holder,
                });
            }
            let error = TransportError::SameName {
                addr,
                name: name.to_string(),
            };
            shared.name_conflict.send_replace(Some(error.to_string()));
            return Err(error);
        }
        register(shared.clone(), conn, name, true, gauge, handshake).ok_or_else(|| {
            TransportError::SelfConnect {
                addr,
                name: shared.name.to_string(),
            }
        })
    }

    /// Connections quinn holds open, counting ones being retired or drained after a
    /// close, and clients' (such as `agentmesh status`) that are not peers.
    pub fn open_connections(&self) -> usize {
        self.shared.endpoint.open_connections()
    }

    /// The peer whose open connection has `addr` at its other end, if any.
    fn peer_at(&self, addr: SocketAddr) -> Option<PeerName> {
        let peers = self.shared.peers.lock().ok()?;
        peers
            .iter()
            .find(|(_, p)| {
                same_addr(p.conn.remote_address(), addr) && p.conn.close_reason().is_none()
            })
            .map(|(name, _)| name.clone())
    }

    /// A handle on the connection to `peer`, if there is one.
    pub fn peer(&self, peer: &str) -> Option<PeerHandle> {
        let conn = self.shared.peers.lock().ok()?.get(peer)?.clone();
        Some(PeerHandle::new(self.shared.clone(), conn))
    }

    /// The peers connected now.
    pub fn peers(&self) -> Vec<PeerHandle> {
        let Ok(peers) = self.shared.peers.lock() else {
            return Vec::new();
        };
        peers
            .values()
            .map(|c| PeerHandle::new(self.shared.clone(), c.clone()))
            .collect()
    }

    /// Sends `message` to `peer` on the lane its header picks; waits while that lane's
    /// queue is full.
    pub async fn send(&self, peer: &str, message: Message) -> Result<(), TransportError> {
        self.peer(peer)
            .ok_or_else(|| TransportError::NotConnected(peer.to_string()))?
            .send(message)
            .await
    }

    /// Closes every connection with `code` and waits (briefly) for the peers to learn.
    pub async fn shutdown(&self, code: AcpErrorCode, reason: &str) {
        self.shared
            .endpoint
            .close(VarInt::from_u32(code.code()), reason.as_bytes());
        let _ = tokio::time::timeout(Duration::from_millis(500), self.shared.endpoint.wait_idle())
            .await;
    }
}

async fn wait_handshake(
    connecting: quinn::Connecting,
    addr: SocketAddr,
) -> Result<quinn::Connection, TransportError> {
    connecting
        .await
        .map_err(|source| TransportError::Connection { addr, source })
}

fn new_gauge(config: &EndpointConfig) -> Arc<WindowGauge> {
    Arc::new(WindowGauge::new(
        config.lower_lane_window_share_permille,
        config.max_lower_in_flight_bytes,
    ))
}

fn transport_config(config: &EndpointConfig, gauge: Arc<WindowGauge>) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(config.keep_alive_interval_ms)));
    t.max_idle_timeout(IdleTimeout::try_from(Duration::from_millis(config.idle_timeout_ms)).ok());
    // One unidirectional stream per lane; no bidirectional streams.
    t.max_concurrent_uni_streams(VarInt::from_u32(4));
    t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    t.datagram_receive_buffer_size(Some(1024 * 1024));
    t.datagram_send_buffer_size(1024 * 1024);
    t.congestion_controller_factory(Arc::new(HeadroomFactory::new(gauge)));
    // The probe timeout is RTT + 4 RTT variance + the peer's max_ack_delay: with the
    // default 25 ms, a lost urgent reply waited ~25 ms for its probe on a 1 ms path.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.max_ack_delay(Some(Duration::from_millis(config.max_ack_delay_ms)));
    t.ack_frequency_config(Some(ack));
    t
}

fn server_config(
    crypto: &Arc<QuicServerConfig>,
    config: &EndpointConfig,
    gauge: Arc<WindowGauge>,
) -> quinn::ServerConfig {
    let mut server = quinn::ServerConfig::with_crypto(crypto.clone());
    server.transport_config(Arc::new(transport_config(config, gauge)));
    server
}

/// Binds a UDP socket with large buffers, so that loopback at full speed does not
/// overflow them (a small receive buffer shows up as packet loss in quinn's stats).
pub fn bind_socket(
    addr: SocketAddr,
    buffer_bytes: usize,
) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| TransportError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    // Best effort: the OS caps these at net.core.{r,w}mem_max unless we may force it.
    for (set, force) in [
        (
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> std::io::Result<()>,
            "SO_RCVBUF",
        ),
        (Socket::set_send_buffer_size, "SO_SNDBUF"),
    ] {
        if let Err(e) = set(&socket, buffer_bytes) {
            debug!(%addr, option = force, error = %e, "could not size the UDP socket buffer");
        }
    }
    let recv = socket.recv_buffer_size().unwrap_or(0);
    if recv < buffer_bytes / 2 {
        debug!(%addr, asked = buffer_bytes, got = recv, "UDP receive buffer smaller than asked (raise net.core.rmem_max)");
    }
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let gauge = new_gauge(&shared.config);
            let config = Arc::new(server_config(
                &shared.server_crypto,
                &shared.config,
                gauge.clone(),
            ));
            let connecting = match incoming.accept_with(config) {
                Ok(c) => c,
                Err(e) => {
                    debug!(%remote, error = %e, "incoming connection failed");
                    return;
                }
            };
            // Take the connection before the handshake ends, so that streams a resuming
            // client opens in 0-RTT data are accepted while handshaking and flagged
            // (`RecvStream::is_0rtt`). On the server this always succeeds.
            let (conn, handshake_done) = match connecting.into_0rtt() {
                Ok(pair) => pair,
                Err(connecting) => match connecting.await {
                    Ok(conn) => {
                        return accepted(shared, conn, gauge, Box::pin(async { true })).await;
                    }
                    Err(e) => return handshake_failed(&shared, remote, &e),
                },
            };
            accepted(shared, conn, gauge, Box::pin(handshake_done)).await;
        });
    }
}

/// Logs and counts an incoming handshake that ended without a connection: refused,
/// by this node's TLS or the client's, or left unfinished by the client.
fn handshake_failed(shared: &Shared, remote: SocketAddr, error: &quinn::ConnectionError) {
    if is_refusal(error) {
        let error = error.to_string();
        let why = HandshakeRefusal::classify(&error);
        shared.stats.handshake_refused(why);
        warn!(%remote, reason = ?why, error, "refused a connection at the handshake");
    } else {
        shared.stats.handshake_unfinished();
        debug!(%remote, %error, "an incoming handshake did not finish");
    }
}

/// Whether a failed handshake was refused: this node found an error (its TLS refused
/// the client's certificate, or the client broke the protocol), or the client closed
/// with a TLS alert (it refused ours). Anything else (the client timed out, reset or
/// closed without an alert) is a handshake left unfinished: a client that gave up, or
/// one paused past its own timeout while its first packets waited here.
fn is_refusal(error: &quinn::ConnectionError) -> bool {
    const TLS_ALERTS: std::ops::Range<u64> = 0x100..0x200;
    match error {
        quinn::ConnectionError::TransportError(_) => true,
        quinn::ConnectionError::ConnectionClosed(close) => {
            TLS_ALERTS.contains(&u64::from(close.error_code))
        }
        _ => false,
    }
}

/// Registers an incoming connection. A resumed session names its client before the
/// handshake ends (the identity comes from the session), so it is registered at once
/// and checked again when the handshake ends; any other waits for the handshake.
/// `handshake_done` resolves when the handshake ends either way (its value says
/// whether 0-RTT was accepted, not whether the handshake succeeded).
async fn accepted(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    gauge: Arc<WindowGauge>,
    handshake_done: std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>,
) {
    let remote = conn.remote_address();
    let role = peer_role(&conn);
    let early = peer_name(&conn).ok().filter(|name| {
        // A name that may be another node's waits for the handshake and the check.
        role == Role::Node && !may_be_held_elsewhere(&shared, name, remote)
    });
    if let Some(early) = early {
        let (tx, rx) = watch::channel(false);
        register(
            shared.clone(),
            conn.clone(),
            early.clone(),
            false,
            gauge,
            rx,
        );
        handshake_done.await;
        match (conn.close_reason(), peer_name(&conn)) {
            (None, Ok(name)) if name == early => {
                let _ = tx.send(true);
            }
            _ => {
                if let Some(reason) = conn.close_reason() {
                    handshake_failed(&shared, remote, &reason);
                }
                conn.close(
                    VarInt::from_u32(AcpErrorCode::ProtocolViolation.code()),
                    b"handshake failed",
                );
            }
        }
        return;
    }
    handshake_done.await;
    if let Some(reason) = conn.close_reason() {
        return handshake_failed(&shared, remote, &reason);
    }
    match peer_name(&conn) {
        Ok(name) => {
            let name = match role {
                Role::Node => {
                    if let Some(holder) = name_held_elsewhere(&shared, &conn, &name, remote).await {
                        warn!(%remote, peer = %name, %holder,
                            "refused a node presenting a name another live node holds: node names must be unique in a cluster");
                        return refuse_name(&shared, &conn, &name, holder);
                    }
                    name
                }
                Role::Client => client_key(&name, remote),
            };
            register(shared, conn, name, false, gauge, watch::channel(true).1);
        }
        Err(e) => {
            shared.stats.handshake_refused(HandshakeRefusal::Other);
            warn!(%remote, error = %e, "peer certificate names no node");
            conn.close(
                VarInt::from_u32(AcpErrorCode::ProtocolViolation.code()),
                b"no node name",
            );
        }
    }
}

/// How long a retired duplicate connection waits for the peer to end its lanes.
const RETIRE_WITHIN: Duration = Duration::from_secs(10);

/// Retires a duplicate connection, and says how it went.
async fn retire(shared: Arc<Shared>, peer: Arc<PeerConn>) {
    let in_time = peer.retire(RETIRE_WITHIN).await;
    shared.stats.duplicate_retired(in_time);
    if in_time {
        debug!(peer = %peer.name, "retired a duplicate connection");
    } else {
        warn!(peer = %peer.name, within_ms = RETIRE_WITHIN.as_millis() as u64,
            "a duplicate connection did not drain in time; closed it anyway");
    }
}

/// Whether `name`, presented from `remote`, could be another live node's: it is this
/// node's own name, or a peer of that name is connected from another address.
fn may_be_held_elsewhere(shared: &Shared, name: &str, remote: SocketAddr) -> bool {
    if name == &*shared.name {
        return true;
    }
    let Ok(peers) = shared.peers.lock() else {
        return false;
    };
    peers.get(name).is_some_and(|existing| {
        existing.conn.close_reason().is_none() && !same_addr(existing.conn.remote_address(), remote)
    })
}

/// A connection to a peer older than this, when another comes from the same address,
/// is checked for life: the node may have restarted there. Younger, the two are taken
/// for simultaneous dials, which `register` settles.
const SAME_ADDRESS_CHECK_AFTER: Duration = Duration::from_secs(1);

/// Where the live node holding `name` is, if it is not the node at `remote`: this
/// node, when `remote` is not this node's own address (dialling itself, through a
/// `--join` that lists every node, is no conflict: `register` refuses that apart); or
/// a peer connected from another address that is still heard from. Two connections
/// of one node come from one address (a node dials from the socket it listens on).
/// A peer that has gone silent is a node restarted under its name, elsewhere or at the
/// same address: its former connection is closed, and the new one takes its place
/// (instead of being retired as a duplicate while the dead one waits for its idle
/// timeout).
async fn name_held_elsewhere(
    shared: &Shared,
    conn: &quinn::Connection,
    name: &str,
    remote: SocketAddr,
) -> Option<SocketAddr> {
    if name == &*shared.name {
        let own = shared.endpoint.local_addr().unwrap_or(shared.config.listen);
        return (!is_own_address(own, conn, remote)).then_some(own);
    }
    let existing = shared.peers.lock().ok()?.get(name).cloned()?;
    let holder = existing.conn.remote_address();
    let moved = !same_addr(holder, remote);
    if existing.conn.close_reason().is_some()
        || (!moved && existing.started.elapsed() < SAME_ADDRESS_CHECK_AFTER)
    {
        return None;
    }
    // A live peer sends something within two keep-alive intervals: its own keep-alive,
    // or the acknowledgement of ours.
    let heard = || existing.conn.stats().udp_rx.datagrams;
    let before = heard();
    let wait =
        Duration::from_millis(2 * shared.config.keep_alive_interval_ms) + existing.conn.rtt() * 3;
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = existing.conn.closed() => {}
    }
    if existing.conn.close_reason().is_none() && heard() > before {
        // From the same address: the same node, dialling again.
        return moved.then_some(holder);
    }
    debug!(peer = %name, former = %holder, now = %remote,
        "a node's former connection is silent: the node came back");
    existing.conn.close(
        VarInt::from_u32(AcpErrorCode::NoError.code()),
        b"replaced by the node's new connection",
    );
    None
}

/// Closes a connection whose node name another live node holds, and counts it.
fn refuse_name(shared: &Shared, conn: &quinn::Connection, name: &str, holder: SocketAddr) {
    shared.stats.closed_for_cause(AcpErrorCode::NameInUse);
    conn.close(
        VarInt::from_u32(AcpErrorCode::NameInUse.code()),
        format!("the name {name} is held by the node at {holder}").as_bytes(),
    );
}

/// Whether `addr`, dialled or dialling on `conn`, is this endpoint's own socket
/// (bound at `own`): a packet from it to itself. On a wildcard bind, any loopback
/// address or the address the connection arrived on, at the same port, is.
fn is_own_address(own: SocketAddr, conn: &quinn::Connection, addr: SocketAddr) -> bool {
    let ip = addr.ip().to_canonical();
    addr.port() == own.port()
        && (ip == own.ip().to_canonical()
            || (own.ip().is_unspecified()
                && (ip.is_loopback() || conn.local_ip().map(|l| l.to_canonical()) == Some(ip))))
}

fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// What the dialling side says it is, by the ALPN protocol it chose (a node, unless
/// it asked for the client protocol).
fn peer_role(conn: &quinn::Connection) -> Role {
    let protocol = conn
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if protocol.as_deref() == Some(tls::ALPN_ACP_CLIENT_V1) {
        Role::Client
    } else {
        Role::Node
    }
}

/// The name a client connection goes by here: its certificate name and its address
/// (`admin@127.0.0.1:50312`), so that clients sharing a certificate, such as two
/// `agentmesh submit` at once, each get their own connection and their own answers.
/// No node name contains `@`.
fn client_key(name: &str, remote: SocketAddr) -> PeerName {
    Arc::from(format!("{name}@{remote}").as_str())
}

/// The node name in the peer's certificate (verified during the handshake).
fn peer_name(conn: &quinn::Connection) -> Result<PeerName, TlsError> {
    let certs = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or_else(|| TlsError::Malformed {
            what: "peer identity".into(),
            reason: "no certificate".into(),
        })?;
    let leaf = certs.first().ok_or_else(|| TlsError::Malformed {
        what: "peer identity".into(),
        reason: "empty chain".into(),
    })?;
    Ok(Arc::from(tls::node_name_of(leaf)?.as_str()))
}

/// Adds a connection to the peer table. If one to the same peer exists, both nodes
/// keep the connection dialled by the node whose name sorts first, and retire the
/// other: it leaves the table at once, so new sends take the kept one, and is closed
/// once what was sent on it either way has arrived (see [`PeerConn::retire`]).
/// Returns `None` for a connection to this node itself.
fn register(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    name: PeerName,
    dialled_by_us: bool,
    gauge: Arc<WindowGauge>,
    handshake: watch::Receiver<bool>,
) -> Option<PeerName> {
    if name == shared.name {
        conn.close(
            VarInt::from_u32(AcpErrorCode::ProtocolViolation.code()),
            b"connected to itself",
        );
        return None;
    }
    let preferred_dialler_is_us = *shared.name < *name;
    let new_preferred = dialled_by_us == preferred_dialler_is_us;
    let peer = {
        let Ok(mut peers) = shared.peers.lock() else {
            return None;
        };
        if let Some(existing) = peers.get(&name) {
            let existing_alive = existing.conn.close_reason().is_none();
            let existing_preferred = existing.dialled_by_us == preferred_dialler_is_us;
            if existing_alive && (existing_preferred || !new_preferred) {
                debug!(peer = %name, "retiring a duplicate connection");
                // The peer may have sent on it already: it is read to its end.
                let loser = PeerConn::start(
                    shared.clone(),
                    conn,
                    name.clone(),
                    dialled_by_us,
                    gauge,
                    handshake,
                );
                tokio::spawn(retire(shared.clone(), loser));
                return Some(name);
            }
            if existing_alive {
                debug!(peer = %name, "replacing the connection with the preferred one");
                tokio::spawn(retire(shared.clone(), existing.clone()));
            }
        }
        let peer = PeerConn::start(
            shared.clone(),
            conn.clone(),
            name.clone(),
            dialled_by_us,
            gauge,
            handshake,
        );
        peers.insert(name.clone(), peer.clone());
        peer
    };
    let addr = conn.remote_address();
    debug!(peer = %name, %addr, dialled = dialled_by_us, "peer connected");
    let events = shared.events.peers().clone();
    let up = TransportEvent::PeerUp {
        peer: name.clone(),
        addr,
    };
    tokio::spawn(async move {
        let _ = events.send(up).await;
        let reason = peer.conn.closed().await;
        let (peer_code, peer_reason) = match &reason {
            quinn::ConnectionError::ApplicationClosed(close) => (
                Some(close.error_code.into_inner()),
                String::from_utf8_lossy(&close.reason).into_owned(),
            ),
            _ => (None, String::new()),
        };
        if peer_code == Some(u64::from(AcpErrorCode::NameInUse.code())) {
            error!(peer = %peer.name, reason = %peer_reason,
                "refused by the peer: another live node has this node's name (node names must be unique in a cluster)");
            shared.name_conflict.send_replace(Some(format!(
                "{} refused this node: {peer_reason}; node names must be unique in a cluster",
                peer.name
            )));
        }
        let removed = shared
            .peers
            .lock()
            .map(|mut peers| {
                let same = peers
                    .get(&peer.name)
                    .is_some_and(|p| p.conn.stable_id() == peer.conn.stable_id());
                if same {
                    peers.remove(&peer.name);
                }
                same
            })
            .unwrap_or(false);
        peer.shut();
        if removed {
            debug!(peer = %peer.name, %reason, "peer disconnected");
            let _ = events
                .send(TransportEvent::PeerDown {
                    peer: peer.name.clone(),
                    reason: reason.to_string(),
                    peer_code,
                })
                .await;
        }
    });
    Some(name)
}
