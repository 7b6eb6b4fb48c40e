//! Clients of a node (the CLI's `status`, `submit`, …) over real QUIC and mutual TLS:
//! many may hold one certificate name at once, and each gets its own answers.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use agentmesh_runtime::node::status_of;
use agentmesh_runtime::{Client, MembershipConfig, Node, NodeConfig};
use agentmesh_transport::clock::SystemClock;
use agentmesh_transport::tls::ClusterCa;
use agentmesh_transport::EndpointConfig;

/// Two clients with the same certificate (two `agentmesh submit --certs D` at once,
/// both `admin`) used to look like one peer connecting twice: the node kept one
/// connection, retired the other, and sent both clients' answers to the one it kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_sharing_a_certificate_each_get_their_answers() {
    let ca = ClusterCa::generate().unwrap();
    let config = NodeConfig {
        transport: EndpointConfig::new("127.0.0.1:0".parse().unwrap()),
        join: Vec::new(),
        membership: MembershipConfig::default(),
        metrics: None,
        advertise: None,
    };
    let node = Node::start(
        config,
        &ca.node_identity("n1").unwrap(),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let addr = node.me().addr;
    let admin = ca.node_identity("admin").unwrap();

    let mut first = Client::connect(&admin, addr).await.unwrap();
    let mut second = Client::connect(&admin, addr).await.unwrap();
    for round in 0..3 {
        for (which, client) in [("second", &mut second), ("first", &mut first)] {
            let report = status_of(client, addr, 3_000)
                .await
                .unwrap_or_else(|e| panic!("round {round}: the {which} client: {e}"));
            assert_eq!(report.node, "n1");
        }
    }
    first.close().await;
    // The other goes on when one leaves.
    let report = status_of(&mut second, addr, 3_000).await.unwrap();
    assert_eq!(report.node, "n1");
    second.close().await;
    node.leave().await;
}
