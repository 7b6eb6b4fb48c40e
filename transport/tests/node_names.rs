//! A node's name is its identity in the cluster: a node dialling its own address is
//! told so, a second live node presenting a name already held is refused, and a node
//! that comes back under its name replaces its former, silent connection. Real QUIC
//! and mutual TLS on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentmesh_transport::tls::ClusterCa;
use agentmesh_transport::wire::AcpErrorCode;
use agentmesh_transport::{EndpointConfig, TransportError, TransportEvent};
use common::*;

#[tokio::test]
async fn a_node_dialling_its_own_address_is_told_so() {
    let ca = ClusterCa::generate().unwrap();
    let a = node(&ca, "alpha");
    let err = a.transport.connect(a.addr, None).await.unwrap_err();
    assert!(matches!(err, TransportError::SelfConnect { .. }), "{err}");
    // Bound to every address, it is itself at any loopback address of its port (a
    // `--join` list naming every node, this one by 127.0.0.1).
    let b = node_with(
        &ca,
        "beta",
        EndpointConfig::new("0.0.0.0:0".parse().unwrap()),
    );
    let own: SocketAddr = ([127, 0, 0, 1], b.addr.port()).into();
    let err = b.transport.connect(own, None).await.unwrap_err();
    assert!(matches!(err, TransportError::SelfConnect { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_node_with_a_name_already_held_is_refused() {
    let ca = ClusterCa::generate().unwrap();
    let mut b = node(&ca, "beta");
    let mut first = node(&ca, "alpha");
    let mut second = node(&ca, "alpha");
    first.transport.connect(b.addr, None).await.unwrap();
    next_matching(&mut b.events, |e| {
        matches!(e, TransportEvent::PeerUp { .. }).then_some(())
    })
    .await;

    // The second finishes its handshake, then the node closes the connection once it
    // has heard from the first meanwhile.
    second.transport.connect(b.addr, None).await.unwrap();
    let code = next_matching(&mut second.events, |e| match e {
        TransportEvent::PeerDown { peer_code, .. } => Some(peer_code),
        _ => None,
    })
    .await;
    assert_eq!(code, Some(u64::from(AcpErrorCode::NameInUse.code())));
    assert_eq!(b.transport.stats().closed_with(AcpErrorCode::NameInUse), 1);
    // The first keeps the name: what goes to "alpha" reaches it.
    assert_eq!(b.transport.peer("alpha").unwrap().remote_addr(), first.addr);
    b.transport
        .send("alpha", envelope(128, b"still you"))
        .await
        .unwrap();
    let got = receive(&mut first.events, 1).await;
    assert_eq!(&got[0].1.body[..], b"still you");

    // Dialling a node of its own name, it is told at once.
    let err = second
        .transport
        .connect(first.addr, None)
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::SameName { .. }), "{err}");
    // Either way, its owner learns that the cluster will not take it.
    let why = second.transport.name_conflict().borrow().clone();
    assert!(why.is_some_and(|w| w.contains("names must be unique")));
    assert!(first.transport.name_conflict().borrow().is_none());
    assert!(b.transport.name_conflict().borrow().is_none());
}

/// A UDP relay in front of `server`: it passes packets between the server and one
/// client at a time, so that two clients in turn reach the server from one address
/// (a node that died and came back at its address). The other's packets are dropped.
async fn relay(server: SocketAddr) -> (SocketAddr, Arc<Mutex<Option<SocketAddr>>>) {
    let socket = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let client = Arc::new(Mutex::new(None::<SocketAddr>));
    let slot = client.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let current = *slot.lock().unwrap();
            let to = if from == server {
                current
            } else {
                (current == Some(from)).then_some(server)
            };
            if let Some(to) = to {
                let _ = socket.send_to(&buf[..n], to).await;
            }
        }
    });
    (addr, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_at_its_address_replaces_its_silent_connection() {
    let ca = ClusterCa::generate().unwrap();
    let mut b = node(&ca, "beta");
    let (via, client) = relay(b.addr).await;
    let before = node(&ca, "alpha");
    let mut after = node(&ca, "alpha");

    *client.lock().unwrap() = Some(before.addr);
    before.transport.connect(via, None).await.unwrap();
    next_matching(&mut b.events, |e| {
        matches!(e, TransportEvent::PeerUp { .. }).then_some(())
    })
    .await;
    // Connected a while: no longer taken for one of two simultaneous dials.
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    // "alpha" dies (its packets no longer arrive) and comes back at the same address,
    // long before its former connection would time out.
    *client.lock().unwrap() = Some(after.addr);
    after.transport.connect(via, None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let _ = b
                .transport
                .send("alpha", envelope(128, b"welcome back"))
                .await;
            if let Ok(Some(TransportEvent::Received { messages, .. })) =
                tokio::time::timeout(Duration::from_millis(200), after.events.recv()).await
            {
                assert_eq!(&messages[0].body[..], b"welcome back");
                return;
            }
        }
    })
    .await
    .expect("the node's new connection takes the place of the silent one");
    assert_eq!(b.transport.stats().closed_with(AcpErrorCode::NameInUse), 0);
    assert!(after.transport.peer("beta").unwrap().is_open());
    drop(before);
}
