//! The node's supervision tree with real nodes: a failed cluster actor is restarted
//! as a renewal of the node's identity, which the cluster sees with no NodeDown, with
//! the transport and the name registry intact; failing too often stops the node.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use agentmesh_runtime::{ClusterEvent, MembershipConfig, Node, NodeConfig, RemoteMessage};
use agentmesh_transport::clock::SystemClock;
use agentmesh_transport::tls::ClusterCa;
use agentmesh_transport::EndpointConfig;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Serialize, Deserialize)]
struct Ping(u32);
impl RemoteMessage for Ping {
    const KIND: &'static str = "test.Ping";
}

struct Sink;
impl Actor for Sink {
    type Msg = Ping;
    type State = mpsc::UnboundedSender<u32>;
    type Arguments = mpsc::UnboundedSender<u32>;
    async fn pre_start(
        &self,
        _: ActorRef<Ping>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }
    async fn handle(
        &self,
        _: ActorRef<Ping>,
        Ping(n): Ping,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = tx.send(n);
        Ok(())
    }
}

async fn start(ca: &ClusterCa, name: &str, join: Option<&Node>) -> Node {
    let config = NodeConfig {
        transport: EndpointConfig::new("127.0.0.1:0".parse().unwrap()),
        join: join.map(|n| vec![n.me().addr]).unwrap_or_default(),
        membership: MembershipConfig::default(),
        metrics: None,
        advertise: None,
    };
    Node::start(
        config,
        &ca.node_identity(name).unwrap(),
        Arc::new(SystemClock),
    )
    .await
    .unwrap()
}

async fn sees(node: &Node, n: usize) -> bool {
    for _ in 0..250 {
        if node
            .members()
            .await
            .iter()
            .filter(|m| m.state == agentmesh_runtime::MemberState::Up)
            .count()
            == n
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cluster_actor_is_restarted_and_the_node_carries_on() {
    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, "alpha", None).await;
    let b = start(&ca, "beta", Some(&a)).await;
    assert!(sees(&a, 1).await && sees(&b, 1).await);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (sink, _) = Actor::spawn(None, Sink, tx).await.unwrap();
    a.mesh().register("sink", sink).unwrap();
    for _ in 0..100 {
        if b.mesh().lookup("sink").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut events = b.subscribe();
    a.fail_cluster_actor();
    // beta sees alpha renewed: a newer incarnation of the same life, never down (its
    // agents outlived the cluster actor, so their work must not be reallocated).
    let back = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Ok(ClusterEvent::NodeUp(id))
                    if &*id.name == "alpha" && id.incarnation > a.me().incarnation =>
                {
                    return id;
                }
                Ok(ClusterEvent::NodeDown(id)) => panic!("{} was declared down", id.name),
                _ => {}
            }
        }
    })
    .await
    .expect("alpha came back");
    assert_eq!(back.addr, a.me().addr);
    assert_eq!(back.life(), a.me().life(), "a renewal, not a new life");
    // Nor is the old identity declared down later, by the failure detector.
    let later = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Ok(ClusterEvent::NodeDown(id)) = events.recv().await {
                return id;
            }
        }
    })
    .await;
    assert!(later.is_err(), "declared down after the restart: {later:?}");
    assert!(sees(&a, 1).await, "the restarted actor knows beta again");
    // The connection and the name registry survived the restart.
    b.mesh().send("sink", Ping(7)).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap(),
        Some(7)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_too_often_stops_the_node() {
    let ca = ClusterCa::generate().unwrap();
    let mut a = start(&ca, "alpha", None).await;
    let gave_up = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            a.fail_cluster_actor();
            tokio::select! {
                _ = a.stopped() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    })
    .await;
    assert!(
        gave_up.is_ok(),
        "the supervisor gave up after too many failures"
    );
}
