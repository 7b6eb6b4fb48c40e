//! Helpers shared by the transport's integration tests: nodes on loopback with real
//! certificates, and a raw quinn client for sending what a well-behaved node never would.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_transport::tls::{self, ClusterCa, NodeIdentity};
use agentmesh_transport::wire::{Flags, Frame, Header, Message, MessageType};
use agentmesh_transport::{EndpointConfig, OwnershipTable, Transport, TransportEvent, Via};
use bytes::Bytes;

pub struct Node {
    pub transport: Transport,
    pub events: agentmesh_transport::TransportEvents,
    pub addr: SocketAddr,
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn node(ca: &ClusterCa, name: &str) -> Node {
    node_with(ca, name, EndpointConfig::new(loopback()))
}

pub fn node_with(ca: &ClusterCa, name: &str, config: EndpointConfig) -> Node {
    let identity = ca.node_identity(name).unwrap();
    let (transport, events) =
        Transport::bind(config, &identity, Arc::new(OwnershipTable::new())).unwrap();
    let addr = transport.local_addr().unwrap();
    Node {
        transport,
        events,
        addr,
    }
}

/// Waits for the next event that matches, skipping others, up to 10 s.
pub async fn next_matching<T>(
    events: &mut agentmesh_transport::TransportEvents,
    mut pick: impl FnMut(TransportEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events.recv().await.expect("event stream open");
            if let Some(t) = pick(event) {
                return t;
            }
        }
    })
    .await
    .expect("the expected event within 10 s")
}

/// Collects received messages until `n` have come, up to 10 s.
pub async fn receive(
    events: &mut agentmesh_transport::TransportEvents,
    n: usize,
) -> Vec<(Via, Message)> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch = next_matching(events, |e| match e {
            TransportEvent::Received { via, messages, .. } => Some((via, messages)),
            _ => None,
        })
        .await;
        out.extend(batch.1.into_iter().map(|m| (batch.0, m)));
    }
    out
}

pub fn envelope(prio: u8, body: &[u8]) -> Message {
    let mut header = Header::new(MessageType::Envelope);
    header.prio = prio;
    Message::new(header, Bytes::copy_from_slice(body))
}

/// A bare quinn client holding a cluster certificate: it completes the handshake as
/// node `name` and then writes whatever bytes a test wants.
pub struct RawClient {
    pub endpoint: quinn::Endpoint,
    pub config: quinn::ClientConfig,
}

impl RawClient {
    pub fn new(identity: &NodeIdentity) -> RawClient {
        let crypto = tls::client_config(identity).unwrap();
        let config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
        ));
        let endpoint = quinn::Endpoint::client(loopback()).unwrap();
        RawClient { endpoint, config }
    }

    pub async fn connect(&self, addr: SocketAddr, server: &str) -> quinn::Connection {
        self.endpoint
            .connect_with(self.config.clone(), addr, server)
            .unwrap()
            .await
            .unwrap()
    }
}

/// One frame's bytes, with the given header fields.
pub fn frame_bytes(msg_type: MessageType, prio: u8, agent: u32, seq: u16, body: &[u8]) -> Bytes {
    let header = Header {
        msg_type,
        flags: Flags::empty(),
        prio,
        group: 0,
        agent,
        seq,
    };
    Frame::new(header, Bytes::copy_from_slice(body))
        .unwrap()
        .to_bytes()
}

/// Waits until the connection is closed and returns the ACP error code it was closed with.
pub async fn close_code(conn: &quinn::Connection) -> Option<u64> {
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("closed within 10 s");
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}
