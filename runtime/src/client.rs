//! A short-lived client of one node, for the CLI (`status`, `submit`, `policy apply`):
//! it holds a certificate of the cluster, connects over the same mutual-TLS QUIC as
//! nodes do, asks a node service with an ENVELOPE and waits for the answer. It does not
//! join the cluster.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use agentmesh_transport::tls::{NodeIdentity, Role};
use agentmesh_transport::wire::payload::Envelope;
use agentmesh_transport::wire::{AcpErrorCode, Header, Message, MessageType, Payload};
use agentmesh_transport::{
    EndpointConfig, OwnershipTable, Transport, TransportError, TransportEvent, TransportEvents,
};

/// The kind a node answers with when a request failed (the body is the reason).
pub(crate) const ERROR_KIND: &str = "agentmesh.error";
/// The kind a node answers with when the actor asked dropped the request without
/// answering: it stopped (the node may be leaving) or failed while holding it.
pub(crate) const UNANSWERED_KIND: &str = "agentmesh.unanswered";

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node could not be reached.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// No answer in time.
    #[error("no answer from {0} within {1} ms")]
    Timeout(SocketAddr, u64),
    /// The connection closed while the request waited for its answer.
    #[error("lost the connection to {addr} while waiting for an answer: {reason}")]
    Disconnected {
        /// The node's address.
        addr: SocketAddr,
        /// Why, as quinn or the node put it.
        reason: String,
        /// The code the node closed with, if it closed the connection itself.
        node_code: Option<u64>,
    },
    /// The node answered with an error.
    #[error("{addr} refused: {reason}")]
    Refused {
        /// The node's address.
        addr: SocketAddr,
        /// What it said.
        reason: String,
    },
    /// The node's actor dropped the request without answering: it stopped (the node
    /// may be leaving) or failed while it held the request, which may or may not have
    /// taken effect there.
    #[error("{addr} did not answer: {reason}")]
    Unanswered {
        /// The node's address.
        addr: SocketAddr,
        /// What it said.
        reason: String,
    },
    /// The request or the answer did not encode or decode.
    #[error("bad exchange with {addr}: {reason}")]
    BadReply {
        /// The node's address.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
}

impl ClientError {
    /// Whether the request may be worth making again, on a new connection: the
    /// connection could not be made, or was lost (timed out, reset, or closed by the
    /// node for a reason that passes: leaving, overload), or the node dropped the
    /// request unanswered (its actor stopped, as when the node leaves, which it tells
    /// before it closes the connection). Not when the node closed it for what this
    /// client sent (a message too large, say), nor for any other error.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            ClientError::Transport(_) | ClientError::Unanswered { .. } => true,
            ClientError::Disconnected { node_code, .. } => node_code.is_none_or(|code| {
                AcpErrorCode::from_code(code).is_some_and(|c| !c.blames_the_receiver())
            }),
            _ => false,
        }
    }
}

/// A connection to one node for requests.
pub struct Client {
    transport: Transport,
    events: TransportEvents,
    peer: String,
    addr: SocketAddr,
    next_correlation: u64,
}

impl Client {
    /// Connects to the node at `addr` as `identity` (a certificate of the same cluster).
    pub async fn connect(identity: &NodeIdentity, addr: SocketAddr) -> Result<Client, ClientError> {
        // Bind where the node can be reached from: loopback for a local node.
        let ip: IpAddr = match (addr.is_ipv4(), addr.ip().is_loopback()) {
            (true, true) => Ipv4Addr::LOCALHOST.into(),
            (true, false) => Ipv4Addr::UNSPECIFIED.into(),
            (false, true) => Ipv6Addr::LOCALHOST.into(),
            (false, false) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let (transport, events) = Transport::bind(
            EndpointConfig {
                role: Role::Client,
                ..EndpointConfig::new(SocketAddr::new(ip, 0))
            },
            identity,
            Arc::new(OwnershipTable::new()),
        )?;
        let peer = transport.connect(addr, None).await?;
        Ok(Client {
            transport,
            events,
            peer: peer.to_string(),
            addr,
            // Random, not 1: a node answers by the client's connection, and a reply
            // still on its way to a former connection of this program must not pass
            // for an answer to this one.
            next_correlation: std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                0u8,
            ),
        })
    }

    /// The node's name, from its certificate.
    pub fn node(&self) -> &str {
        &self.peer
    }

    /// Asks `service` with a raw body of `kind`; returns the answer's body.
    pub async fn request_raw(
        &mut self,
        service: &str,
        kind: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, ClientError> {
        let correlation = self.next_correlation;
        self.next_correlation = self.next_correlation.wrapping_add(1);
        let payload = Payload::Envelope(Envelope {
            to: service.into(),
            kind: kind.into(),
            correlation,
            reply: false,
            trace_id: None,
            body,
        })
        .encode()
        .map_err(|e| self.bad(e))?;
        let message = Message::new(Header::new(MessageType::Envelope), Bytes::from(payload));
        self.transport.send(&self.peer, message).await?;
        let (addr, node) = (self.addr, self.peer.as_str());
        let events = &mut self.events;
        let lost = |reason: String, node_code| ClientError::Disconnected {
            addr,
            reason,
            node_code,
        };
        let answer = tokio::time::timeout(timeout, async {
            while let Some(event) = events.recv().await {
                let messages = match event {
                    TransportEvent::Received { messages, .. } => messages,
                    TransportEvent::PeerDown {
                        peer,
                        reason,
                        peer_code,
                    } if &*peer == node => return Err(lost(reason, peer_code)),
                    _ => continue,
                };
                for m in messages {
                    if let Ok(Payload::Envelope(e)) = Payload::decode(m.header.msg_type, &m.body) {
                        if e.reply && e.correlation == correlation {
                            return Ok(e);
                        }
                    }
                }
            }
            Err(lost("the transport stopped".into(), None))
        })
        .await
        .map_err(|_| ClientError::Timeout(addr, timeout.as_millis() as u64))??;
        if answer.kind == ERROR_KIND {
            return Err(ClientError::Refused {
                addr: self.addr,
                reason: String::from_utf8_lossy(&answer.body).into_owned(),
            });
        }
        if answer.kind == UNANSWERED_KIND {
            return Err(ClientError::Unanswered {
                addr: self.addr,
                reason: String::from_utf8_lossy(&answer.body).into_owned(),
            });
        }
        Ok(answer.body)
    }

    /// Asks `service` with a typed request (msgpack) and decodes the typed answer.
    pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        service: &str,
        kind: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, ClientError> {
        let body = rmp_serde::to_vec_named(request).map_err(|e| self.bad(e))?;
        let answer = self
            .request_raw(service, kind, Bytes::from(body), timeout)
            .await?;
        rmp_serde::from_slice(&answer).map_err(|e| self.bad(e))
    }

    /// Asks the node at `addr` once, as a short-lived client: connects, sends
    /// [`request`](Self::request), and closes.
    pub async fn request_once<Req: Serialize, Resp: DeserializeOwned>(
        identity: &NodeIdentity,
        addr: SocketAddr,
        service: &str,
        kind: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, ClientError> {
        let mut client = Client::connect(identity, addr).await?;
        let answer = client.request(service, kind, request, timeout).await;
        client.close().await;
        answer
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.transport
            .shutdown(AcpErrorCode::NoError, "client done")
            .await;
    }

    fn bad(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::BadReply {
            addr: self.addr,
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_loss_that_may_pass_is_worth_a_new_connection() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let closed = |node_code| ClientError::Disconnected {
            addr,
            reason: String::new(),
            node_code,
        };
        let code = |c: AcpErrorCode| Some(u64::from(c.code()));
        assert!(closed(None).is_connection_lost());
        assert!(closed(code(AcpErrorCode::Leaving)).is_connection_lost());
        assert!(closed(code(AcpErrorCode::ExcessiveLoad)).is_connection_lost());
        assert!(!closed(code(AcpErrorCode::FrameTooLarge)).is_connection_lost());
        assert!(!closed(code(AcpErrorCode::PolicyDenied)).is_connection_lost());
        assert!(!closed(Some(0x1234)).is_connection_lost());
        assert!(!ClientError::Timeout(addr, 1).is_connection_lost());
        let said = |reason: &str| reason.to_string();
        let unanswered = ClientError::Unanswered {
            addr,
            reason: said("the actor dropped the request without answering"),
        };
        assert!(unanswered.is_connection_lost());
        let refused = ClientError::Refused {
            addr,
            reason: said("denied by policy"),
        };
        assert!(!refused.is_connection_lost());
    }
}
