//! Mutual TLS on real QUIC over loopback: cluster members connect, everything else is
//! refused at the handshake, logged and counted.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use agentmesh_transport::tls::{self, ClusterCa, NodeIdentity};
use agentmesh_transport::{EndpointConfig, TransportEvent};
use common::*;

#[tokio::test]
async fn members_of_one_cluster_connect_and_learn_each_others_names() {
    let ca = ClusterCa::generate().unwrap();
    let mut a = node(&ca, "alpha");
    let mut b = node(&ca, "beta");
    let name = a.transport.connect(b.addr, None).await.unwrap();
    assert_eq!(&*name, "beta");
    let up = next_matching(&mut b.events, |e| match e {
        TransportEvent::PeerUp { peer, .. } => Some(peer),
        _ => None,
    })
    .await;
    assert_eq!(&*up, "alpha");
    next_matching(&mut a.events, |e| {
        matches!(e, TransportEvent::PeerUp { .. }).then_some(())
    })
    .await;
    assert!(a.transport.peer("beta").unwrap().is_open());
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_and_counted() {
    let ca = ClusterCa::generate().unwrap();
    let a = node(&ca, "alpha");
    // Trusts our CA (so it goes through with the handshake) but holds a certificate
    // from another one.
    let mut identity = ClusterCa::generate()
        .unwrap()
        .node_identity("mallory")
        .unwrap();
    identity.ca = ca.cert_der().clone();
    let client = RawClient::new(&identity);
    attempt_handshake(&client.endpoint, client.config.clone(), &a).await;
    wait_for_refusal(&a, 1).await;
    // A stranger that does not trust us either refuses us first: the server sees the
    // alert and counts it as another kind of failure.
    let stranger = node(&ClusterCa::generate().unwrap(), "eve");
    let err = stranger.transport.connect(a.addr, None).await.unwrap_err();
    // The error says what to look at, not only which check failed.
    assert!(err.to_string().contains("different cluster CAs"), "{err}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_and_counted() {
    let ca = ClusterCa::generate().unwrap();
    let a = node(&ca, "alpha");
    let expired = ca.issue_valid("old", (2020, 1, 1), (2021, 1, 1)).unwrap();
    let identity = NodeIdentity::from_pem("old", &expired, &ca.pem().cert_pem).unwrap();
    let client = RawClient::new(&identity);
    attempt_handshake(&client.endpoint, client.config.clone(), &a).await;
    wait_for_refusal(&a, 2).await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_and_counted() {
    let ca = ClusterCa::generate().unwrap();
    let a = node(&ca, "alpha");
    // Trusts the cluster CA but presents no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let mut crypto = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    crypto.alpn_protocols = vec![tls::ALPN_ACP_V1.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client(loopback()).unwrap();
    attempt_handshake(&endpoint, config, &a).await;
    wait_for_refusal(&a, 0).await;
}

#[tokio::test]
async fn dialling_the_wrong_name_is_refused() {
    let ca = ClusterCa::generate().unwrap();
    let a = node(&ca, "alpha");
    let b = node(&ca, "beta");
    let err = a
        .transport
        .connect(b.addr, Some("gamma"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("beta"), "{err}");
}

/// A handshake the client leaves unfinished (its packets reach the node, the node's
/// never reach it back: a client paused or cut off mid-handshake, which gives up) is
/// no refusal: it is counted apart, and logged at debug, not as a refused connection.
#[tokio::test]
async fn a_handshake_left_unfinished_is_not_counted_as_refused() {
    let ca = ClusterCa::generate().unwrap();
    let config = EndpointConfig {
        idle_timeout_ms: 300,
        ..EndpointConfig::new(loopback())
    };
    let a = node_with(&ca, "alpha", config.clone());
    let b = node_with(&ca, "beta", config);
    // A one-way relay to alpha: what beta sends reaches alpha, alpha's answers stop here.
    let relay = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let server = a.addr;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = relay.recv_from(&mut buf).await {
            if from != server {
                let _ = relay.send_to(&buf[..n], server).await;
            }
        }
    });
    assert!(b.transport.connect(relay_addr, None).await.is_err());
    for _ in 0..100 {
        if a.transport.stats().handshakes_unfinished > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let stats = a.transport.stats();
    assert_eq!(stats.handshakes_unfinished, 1);
    assert_eq!(stats.handshakes_refused, [0; 4]);
}

/// Dials `node` as "alpha" and waits for the outcome. The server refuses after the
/// client's last flight, so the client may see the handshake succeed and then the close.
async fn attempt_handshake(endpoint: &quinn::Endpoint, config: quinn::ClientConfig, node: &Node) {
    let result = endpoint
        .connect_with(config, node.addr, "alpha")
        .unwrap()
        .await;
    if let Ok(conn) = result {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed()).await;
    }
}

/// Waits until `node` has counted a refused handshake of kind `index` (no cert,
/// unknown issuer, expired, other).
async fn wait_for_refusal(node: &Node, index: usize) {
    for _ in 0..100 {
        if node.transport.stats().handshakes_refused[index] > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "no refusal of kind {index} counted: {:?}",
        node.transport.stats().handshakes_refused
    );
}
