//! Remote actor messaging between real nodes in one process: loopback QUIC, mutual TLS,
//! SWIM membership, ractor actors. Sends by cluster-wide name and by address, asks,
//! local sends that never touch the network, monitors, and typed errors.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use agentmesh_runtime::{
    ActorAddr, AskError, Bounded, ClusterEvent, Down, FromPeer, MembershipConfig, Node, NodeConfig,
    RemoteMessage, SendError,
};
use agentmesh_transport::clock::SystemClock;
use agentmesh_transport::tls::ClusterCa;
use agentmesh_transport::wire::{AcpErrorCode, Header, Message, MessageType};
use agentmesh_transport::EndpointConfig;
use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Serialize, Deserialize)]
struct Note {
    text: String,
    reply_to: Option<ActorAddr>,
}
impl RemoteMessage for Note {
    const KIND: &'static str = "test.Note";
}

#[derive(Debug, Serialize, Deserialize)]
struct Add(u64, u64);
impl RemoteMessage for Add {
    const KIND: &'static str = "test.Add";
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Sum(u64);
impl RemoteMessage for Sum {
    const KIND: &'static str = "test.Sum";
}

/// Forwards every note it gets to a channel the test reads.
struct Inbox;
impl Actor for Inbox {
    type Msg = Note;
    type State = mpsc::UnboundedSender<Note>;
    type Arguments = mpsc::UnboundedSender<Note>;
    async fn pre_start(
        &self,
        _: ActorRef<Note>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }
    async fn handle(
        &self,
        _: ActorRef<Note>,
        note: Note,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = tx.send(note);
        Ok(())
    }
}

enum AdderMsg {
    Add(Add, RpcReplyPort<Sum>),
}

struct Adder;
impl Actor for Adder {
    type Msg = AdderMsg;
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<AdderMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(
        &self,
        _: ActorRef<AdderMsg>,
        msg: AdderMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let AdderMsg::Add(Add(a, b), reply) = msg;
        let _ = reply.send(Sum(a + b));
        Ok(())
    }
}

/// A node on loopback, joining through `join`.
async fn start(ca: &ClusterCa, name: &str, join: Vec<std::net::SocketAddr>) -> Node {
    let config = NodeConfig {
        transport: EndpointConfig::new("127.0.0.1:0".parse().unwrap()),
        join,
        membership: MembershipConfig::default(),
        metrics: None,
        advertise: None,
    };
    let identity = ca.node_identity(name).unwrap();
    Node::start(config, &identity, Arc::new(SystemClock))
        .await
        .unwrap()
}

async fn cluster(ca: &ClusterCa, names: &[&str]) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for name in names {
        let join = nodes.first().map(|n| vec![n.me().addr]).unwrap_or_default();
        nodes.push(start(ca, name, join).await);
    }
    for node in &nodes {
        for _ in 0..200 {
            if node.members().await.len() == names.len() - 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            node.members().await.len(),
            names.len() - 1,
            "{} sees all",
            node.me().name
        );
    }
    nodes
}

/// Waits until `node` knows where `name` lives.
async fn resolves(node: &Node, name: &str) -> ActorAddr {
    for _ in 0..200 {
        if let Some(addr) = node.mesh().lookup(name) {
            return addr;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never heard of {name}", node.me().name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_by_name_reaches_the_actor_on_another_node_and_it_replies_by_reference() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let (a_tx, mut a_rx) = mpsc::unbounded_channel();
    let (b_tx, mut b_rx) = mpsc::unbounded_channel();
    let (inbox_a, _) = Actor::spawn(None, Inbox, a_tx).await.unwrap();
    let (inbox_b, _) = Actor::spawn(None, Inbox, b_tx).await.unwrap();
    nodes[0].mesh().register("inbox-a", inbox_a).unwrap();
    let addr_b = nodes[1].mesh().register("inbox-b", inbox_b).unwrap();
    resolves(&nodes[1], "inbox-a").await;
    nodes[1]
        .mesh()
        .send(
            "inbox-a",
            Note {
                text: "hello".into(),
                reply_to: Some(addr_b),
            },
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), a_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.text, "hello");
    // Reply through the serialized remote reference.
    let back = got.reply_to.unwrap();
    assert_eq!(back.node, "beta");
    nodes[0]
        .mesh()
        .send_to(
            &back,
            Note {
                text: "hi back".into(),
                reply_to: None,
            },
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), b_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.text, "hi back");
}

#[derive(Debug, Serialize, Deserialize)]
struct UrgentAdd(u64, u64);
impl RemoteMessage for UrgentAdd {
    const KIND: &'static str = "test.UrgentAdd";
    fn priority(&self) -> u8 {
        230
    }
}

enum UrgentAdderMsg {
    Add(UrgentAdd, RpcReplyPort<Sum>),
}

struct UrgentAdder;
impl Actor for UrgentAdder {
    type Msg = UrgentAdderMsg;
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        UrgentAdderMsg::Add(UrgentAdd(a, b), reply): Self::Msg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let _ = reply.send(Sum(a + b));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_ask_is_answered_on_the_urgent_lane() {
    const URGENT: usize = 3; // StatsSnapshot carriers: bulk, normal, coordination, urgent, datagram
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let (adder, _) = Actor::spawn(None, UrgentAdder, ()).await.unwrap();
    nodes[0]
        .mesh()
        .register_rpc("urgent-adder", adder, UrgentAdderMsg::Add)
        .unwrap();
    resolves(&nodes[1], "urgent-adder").await;
    let before = nodes[0].transport().stats().frames_out[URGENT];
    for i in 0..20 {
        let sum: Sum = nodes[1]
            .mesh()
            .ask("urgent-adder", UrgentAdd(i, 1), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(sum, Sum(i + 1));
    }
    // The answering node counts a reply once quinn has taken it, which may be just
    // after the asker already has it: wait for the count rather than race it.
    let answered = || nodes[0].transport().stats().frames_out[URGENT] - before;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while answered() < 20 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        answered() >= 20,
        "{} urgent frames from the answering node",
        answered()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_across_nodes_gets_the_answer() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let (adder, _) = Actor::spawn(None, Adder, ()).await.unwrap();
    nodes[0]
        .mesh()
        .register_rpc("adder", adder, AdderMsg::Add)
        .unwrap();
    resolves(&nodes[1], "adder").await;
    let sum: Sum = nodes[1]
        .mesh()
        .ask("adder", Add(2, 40), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(sum, Sum(42));
    // The same ask locally.
    let sum: Sum = nodes[0]
        .mesh()
        .ask("adder", Add(1, 1), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(sum, Sum(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_sends_stay_local() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (inbox, _) = Actor::spawn(None, Inbox, tx).await.unwrap();
    nodes[0].mesh().register("inbox", inbox).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let envelopes_before = nodes[0].transport().stats().frames_out_by_type[9];
    for i in 0..100 {
        nodes[0]
            .mesh()
            .send(
                "inbox",
                Note {
                    text: i.to_string(),
                    reply_to: None,
                },
            )
            .await
            .unwrap();
    }
    for _ in 0..100 {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        nodes[0].transport().stats().frames_out_by_type[9],
        envelopes_before,
        "no ENVELOPE left the node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_fire_when_the_actor_stops_or_its_node_leaves() {
    let ca = ClusterCa::generate().unwrap();
    let mut nodes = cluster(&ca, &["alpha", "beta", "gamma"]).await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let (inbox, _) = Actor::spawn(None, Inbox, tx.clone()).await.unwrap();
    nodes[0]
        .mesh()
        .register("short-lived", inbox.clone())
        .unwrap();
    let addr = resolves(&nodes[1], "short-lived").await;
    let stopped = nodes[1].mesh().monitor(&addr);
    inbox.stop(None);
    let down = tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(down, Down::Stopped(addr.clone()));
    assert!(nodes[1].mesh().lookup("short-lived").is_none());

    let (on_gamma, _) = Actor::spawn(None, Inbox, tx).await.unwrap();
    nodes[2].mesh().register("on-gamma", on_gamma).unwrap();
    let addr = resolves(&nodes[1], "on-gamma").await;
    let gone = nodes[1].mesh().monitor(&addr);
    nodes.pop().unwrap().leave().await;
    let down = tokio::time::timeout(Duration::from_secs(5), gone)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(down, Down::NodeDown(addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistakes_come_back_as_typed_errors() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let err = nodes[1]
        .mesh()
        .send(
            "nobody",
            Note {
                text: String::new(),
                reply_to: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::UnknownName(_)), "{err}");
    let (tx, _rx) = mpsc::unbounded_channel();
    let (inbox, _) = Actor::spawn(None, Inbox, tx).await.unwrap();
    nodes[0].mesh().register("inbox", inbox.clone()).unwrap();
    assert!(
        nodes[0].mesh().register("inbox", inbox).is_err(),
        "a name is registered once per node"
    );
    resolves(&nodes[1], "inbox").await;
    // Asking an actor that only takes casts: the remote side answers with an error.
    let err = nodes[1]
        .mesh()
        .ask::<Add, Sum>("inbox", Add(1, 2), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, AskError::Remote(ref why) if why.contains("does not answer")),
        "{err}"
    );
    // A message of the wrong type to a local actor.
    let err = nodes[0].mesh().send("inbox", Sum(1)).await.unwrap_err();
    assert!(matches!(err, SendError::WrongKind { .. }), "{err}");
}

/// Forwards what it gets, with the sending node, to a channel the test reads.
struct Witness;
impl Actor for Witness {
    type Msg = agentmesh_runtime::FromPeer<Note>;
    type State = mpsc::UnboundedSender<(String, String)>;
    type Arguments = mpsc::UnboundedSender<(String, String)>;
    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }
    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = tx.send((msg.peer, msg.message.text));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_can_know_which_node_sent_each_message() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (witness, _) = Actor::spawn(None, Witness, tx).await.unwrap();
    nodes[0]
        .mesh()
        .register_from_peer::<Note>("witness", witness)
        .unwrap();
    resolves(&nodes[1], "witness").await;
    nodes[1]
        .mesh()
        .send(
            "witness",
            Note {
                text: "from beta".into(),
                reply_to: None,
            },
        )
        .await
        .unwrap();
    nodes[0]
        .mesh()
        .send(
            "witness",
            Note {
                text: "from alpha".into(),
                reply_to: None,
            },
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(
            tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("alpha".to_string(), "from alpha".to_string()),
            ("beta".to_string(), "from beta".to_string())
        ]
    );
}

#[derive(Debug, Serialize, Deserialize)]
struct Who;
impl RemoteMessage for Who {
    const KIND: &'static str = "test.Who";
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Name(String);
impl RemoteMessage for Name {
    const KIND: &'static str = "test.Name";
}

/// Answers each `Who` with the node that asked.
struct Echo;
impl Actor for Echo {
    type Msg = (agentmesh_runtime::FromPeer<Who>, RpcReplyPort<Name>);
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        (asked, reply): Self::Msg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let _ = reply.send(Name(asked.peer));
        Ok(())
    }
}

/// A service that answers requests can know which node asked: the authenticated peer
/// for a request from another node, this node for a local one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_answers_can_know_which_node_asked() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let (echo, _) = Actor::spawn(None, Echo, ()).await.unwrap();
    let service = "agentmesh.test.who";
    nodes[0]
        .mesh()
        .register_service_rpc_from_peer(service, echo, |w, r| (w, r), Duration::from_secs(5))
        .unwrap();
    let at = ActorAddr {
        node: "alpha".into(),
        name: service.into(),
    };
    for (node, expected) in [(&nodes[1], "beta"), (&nodes[0], "alpha")] {
        let name: Name = node
            .mesh()
            .ask_at(&at, Who, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(name, Name(expected.into()));
    }
}

/// Answers `Add(a, b)` in one of several ways, picked by `a`: 0 drops the reply port,
/// 1 keeps it and never answers, 2 answers from a thread of its own (outside the
/// runtime) a little later, 3 holds requests until `b` of them have come and then
/// answers them all, last first; anything else answers at once.
struct Moody;
impl Actor for Moody {
    type Msg = AdderMsg;
    type State = (Vec<RpcReplyPort<Sum>>, Vec<(u64, RpcReplyPort<Sum>)>);
    type Arguments = ();
    async fn pre_start(
        &self,
        _: ActorRef<AdderMsg>,
        _: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Default::default())
    }
    async fn handle(
        &self,
        _: ActorRef<AdderMsg>,
        msg: AdderMsg,
        (kept, held): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let AdderMsg::Add(Add(a, b), reply) = msg;
        match a {
            0 => drop(reply),
            1 => kept.push(reply),
            2 => {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    let _ = reply.send(Sum(b));
                });
            }
            3 => {
                held.push((b, reply));
                if held.len() as u64 == b {
                    for (i, (_, reply)) in held.drain(..).enumerate().rev() {
                        let _ = reply.send(Sum(i as u64));
                    }
                }
            }
            _ => {
                let _ = reply.send(Sum(a + b));
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_remote_ask_gets_one_answer_however_the_actor_replies() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let (moody, _) = Actor::spawn(None, Moody, ()).await.unwrap();
    let addr = nodes[0]
        .mesh()
        .register_service_rpc(
            "agentmesh.test.moody",
            moody,
            AdderMsg::Add,
            Duration::from_secs(1),
        )
        .unwrap();
    let asker = nodes[1].mesh();
    let ask = |a, b| asker.ask_at::<Add, Sum>(&addr, Add(a, b), Duration::from_secs(10));

    assert_eq!(ask(5, 6).await.unwrap(), Sum(11));
    let dropped = ask(0, 0).await.unwrap_err();
    assert!(
        matches!(dropped, AskError::Remote(ref why) if why.contains("without answering")),
        "{dropped}"
    );
    // A reply given on a thread outside the runtime still goes out.
    assert_eq!(ask(2, 7).await.unwrap(), Sum(7));
    // An actor that keeps the port: the node answers for it when its time is up (the
    // asker would wait 10 s).
    let started = tokio::time::Instant::now();
    let kept = ask(1, 0).await.unwrap_err();
    assert!(
        matches!(kept, AskError::Remote(ref why) if why.contains("did not answer within 1 s")),
        "{kept}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Many requests waiting at once, answered out of order: each gets its own answer.
    const AT_ONCE: u64 = 300;
    let mut asks = tokio::task::JoinSet::new();
    for _ in 0..AT_ONCE {
        let (mesh, addr) = (asker.clone(), addr.clone());
        asks.spawn(async move {
            mesh.ask_at::<Add, Sum>(&addr, Add(3, AT_ONCE), Duration::from_secs(10))
                .await
        });
    }
    let mut got: Vec<u64> = asks
        .join_all()
        .await
        .into_iter()
        .map(|a| a.unwrap().0)
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..AT_ONCE).collect::<Vec<_>>());
    // And the node still answers at once afterwards.
    assert_eq!(ask(4, 4).await.unwrap(), Sum(8));
}

#[derive(Debug, Serialize, Deserialize)]
struct Tick(u32);
impl RemoteMessage for Tick {
    const KIND: &'static str = "test.Tick";
}

/// Handles each tick only once the test lets it (one permit each), then passes it on.
struct Gated;
impl Actor for Gated {
    type Msg = Bounded<Tick>;
    type State = (Arc<tokio::sync::Semaphore>, mpsc::UnboundedSender<u32>);
    type Arguments = Self::State;
    async fn pre_start(
        &self,
        _: ActorRef<Bounded<Tick>>,
        state: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(state)
    }
    async fn handle(
        &self,
        _: ActorRef<Bounded<Tick>>,
        tick: Bounded<Tick>,
        (gate, tx): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        gate.acquire().await?.forget();
        let _ = tx.send(tick.message.0);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_actor_that_falls_behind_sheds_what_does_not_fit_and_takes_more_once_it_catches_up(
) {
    const LIMIT: usize = 4;
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (tx, mut ticks) = mpsc::unbounded_channel();
    let (gated, _) = Actor::spawn(None, Gated, (gate.clone(), tx)).await.unwrap();
    let slow = nodes[1]
        .mesh()
        .register_bounded::<Tick>("slow", gated, LIMIT)
        .unwrap();
    // A second actor on beta, sent to after the ticks on the same lane: when its note
    // arrives, every tick before it has been delivered or shed.
    let (ntx, mut notes) = mpsc::unbounded_channel();
    let (inbox, _) = Actor::spawn(None, Inbox, ntx).await.unwrap();
    nodes[1].mesh().register("marker", inbox).unwrap();
    resolves(&nodes[0], "slow").await;
    resolves(&nodes[0], "marker").await;
    let marker = |text: &str| Note {
        text: text.into(),
        reply_to: None,
    };

    let alpha = nodes[0].mesh();
    for i in 0..50 {
        alpha.send_to(&slow, Tick(i)).await.unwrap();
    }
    alpha.send("marker", marker("after 50")).await.unwrap();
    let note = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(note.text, "after 50");

    // Full: one tick in the actor's hands, the rest of the limit in its mailbox. A send
    // on its own node is told so.
    let err = nodes[1].mesh().send_to(&slow, Tick(99)).await.unwrap_err();
    assert!(matches!(err, SendError::Full { limit: LIMIT, .. }), "{err}");

    // Caught up: exactly the first LIMIT ticks were kept, in order.
    gate.add_permits(1_000);
    let mut got = Vec::new();
    for _ in 0..LIMIT {
        got.push(
            tokio::time::timeout(Duration::from_secs(5), ticks.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(got, (0..LIMIT as u32).collect::<Vec<_>>());

    // Every place was given back: a new tick gets through, and nothing else came.
    alpha.send_to(&slow, Tick(100)).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), ticks.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next, 100);
    alpha.send("marker", marker("after 100")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(ticks.try_recv().is_err(), "a shed tick was delivered");
}

/// An ACP message of `msg_type` on the coordination lane (Stream Prio 160), carrying `n`.
fn acp(msg_type: MessageType, n: u8) -> Message {
    let mut header = Header::new(msg_type);
    header.prio = 160;
    Message::new(header, Bytes::from(vec![n]))
}

/// What `rx` has, waiting up to 5 s for each of `n`.
async fn take(rx: &mut mpsc::Receiver<FromPeer<Message>>, n: usize) -> Vec<(String, u8)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a message that came reliably was lost")
            .unwrap();
        got.push((m.peer, m.message.body[0]));
    }
    got
}

/// A consumer of ACP messages that falls behind (a worker node handed ALLOCATEs for a
/// thousand free replicas at once) gets every one that came on a lane or from its own
/// node, in order: they wait for room, holding the lane back. Before, all past its
/// channel's bound were shed, and each lost ALLOCATE cost its segment the 30 s
/// timeout. A datagram still does not wait, and a consumer stuck past 1 s holds a lane
/// back once, not for each message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acp_consumer_that_falls_behind_loses_nothing_that_came_reliably() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let (tx, mut reports) = mpsc::channel(2);
    nodes[1].mesh().route_acp(&[MessageType::Report], tx);

    let alpha = nodes[0].mesh().clone();
    let remote = tokio::spawn(async move {
        for n in 0..20 {
            alpha
                .send_acp("beta", acp(MessageType::Report, n))
                .await
                .unwrap();
        }
    });
    let beta = nodes[1].mesh().clone();
    let local = tokio::spawn(async move {
        for n in 100..120 {
            beta.send_acp("beta", acp(MessageType::Report, n))
                .await
                .unwrap();
        }
    });
    // Nothing is taken meanwhile: the channel is full and both senders wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = take(&mut reports, 40).await;
    remote.await.unwrap();
    local.await.unwrap();
    let from = |peer: &str| -> Vec<u8> {
        got.iter()
            .filter(|(p, _)| p == peer)
            .map(|(_, n)| *n)
            .collect()
    };
    assert_eq!(from("alpha"), (0..20).collect::<Vec<u8>>());
    assert_eq!(from("beta"), (100..120).collect::<Vec<u8>>());

    // Full again, of beta's own: a datagram finds no room and is shed at once.
    for n in 200..202 {
        let m = acp(MessageType::Report, n);
        nodes[1].mesh().send_acp("beta", m).await.unwrap();
    }
    for n in 0..20 {
        let m = acp(MessageType::Report, n);
        nodes[0].mesh().send_acp_datagram("beta", m).await.unwrap();
    }
    // Time for every datagram to arrive (had one come after the channel was emptied,
    // it would find room: that is not waiting).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        take(&mut reports, 2).await,
        [("beta".into(), 200), ("beta".into(), 201)]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(reports.try_recv().is_err(), "a datagram waited for room");

    // A consumer that never takes anything: the first message waits 1 s in vain, the
    // rest are shed at once, and a message behind them on the lane for another
    // consumer arrives soon after (10 s later if each waited).
    let (stuck_tx, _stuck) = mpsc::channel(1);
    nodes[1].mesh().route_acp(&[MessageType::Sync], stuck_tx);
    for n in 0..11 {
        let m = acp(MessageType::Sync, n);
        nodes[0].mesh().send_acp("beta", m).await.unwrap();
    }
    let marker = acp(MessageType::Report, 7);
    nodes[0].mesh().send_acp("beta", marker).await.unwrap();
    assert_eq!(take(&mut reports, 1).await, [("alpha".into(), 7)]);
}

/// A node hears that another is up (here through gossip, before any connection to it)
/// and sends to it at once, as discovery and the policy actor do: the send waits for
/// the connection being made rather than failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_to_a_node_just_reported_up_waits_for_its_connection() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["a", "b"]).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (sink, _) = Actor::spawn(None, Inbox, tx).await.unwrap();
    nodes[0].mesh().register("sink", sink).unwrap();
    // c joins through b, so it hears of a from b's gossip.
    let c = start(&ca, "c", Vec::new()).await;
    let mut events = c.subscribe();
    c.join([nodes[1].me().addr]);
    let at_a = ActorAddr {
        node: "a".into(),
        name: "sink".into(),
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await.unwrap() {
                ClusterEvent::NodeUp(id) if &*id.name == "a" => break,
                _ => {}
            }
        }
    })
    .await
    .expect("c hears that a is up");
    let note = Note {
        text: "first words".into(),
        reply_to: None,
    };
    c.mesh().send_to(&at_a, note).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.text, "first words");
}

/// Keeps every request's reply port, unanswered, and reports each arrival.
struct Keeper;
impl Actor for Keeper {
    type Msg = AdderMsg;
    type State = (mpsc::UnboundedSender<()>, Vec<RpcReplyPort<Sum>>);
    type Arguments = mpsc::UnboundedSender<()>;
    async fn pre_start(
        &self,
        _: ActorRef<AdderMsg>,
        arrived: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok((arrived, Vec::new()))
    }
    async fn handle(
        &self,
        _: ActorRef<AdderMsg>,
        AdderMsg::Add(_, reply): AdderMsg,
        (arrived, kept): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        kept.push(reply);
        let _ = arrived.send(());
        Ok(())
    }
}

/// An ask whose connection is lost (here the asked node closes it for an error) fails
/// then with `ConnectionLost`, instead of waiting out its timeout for an answer that
/// cannot come on it; the mesh reconnects and the next ask is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_fails_when_its_connection_is_lost_not_at_its_timeout() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (keeper, _) = Actor::spawn(None, Keeper, arrived_tx).await.unwrap();
    let kept = nodes[0]
        .mesh()
        .register_service_rpc(
            "agentmesh.test.keeper",
            keeper,
            AdderMsg::Add,
            Duration::from_secs(120),
        )
        .unwrap();
    let (adder, _) = Actor::spawn(None, Adder, ()).await.unwrap();
    let adds = nodes[0]
        .mesh()
        .register_service_rpc(
            "agentmesh.test.adder",
            adder,
            AdderMsg::Add,
            Duration::from_secs(5),
        )
        .unwrap();
    // Closed by the asked node, then by the asking node itself: lost either way.
    for closer in [0, 1] {
        let (asker, kept) = (nodes[1].mesh().clone(), kept.clone());
        let ask = tokio::spawn(async move {
            asker
                .ask_at::<Add, Sum>(&kept, Add(1, 2), Duration::from_secs(120))
                .await
        });
        arrived.recv().await.unwrap();
        let other = if closer == 0 { "beta" } else { "alpha" };
        nodes[closer]
            .transport()
            .peer(other)
            .unwrap()
            .close(AcpErrorCode::ProtocolViolation, "test: lose the connection");
        let lost = tokio::time::timeout(Duration::from_secs(60), ask)
            .await
            .expect("the ask ended long before its timeout")
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(lost, AskError::ConnectionLost { ref node, .. } if node == "alpha"),
            "closed by node {closer}: {lost}"
        );
        // Membership dials again; asks go on the new connection.
        let mut answered = None;
        for _ in 0..100 {
            match nodes[1]
                .mesh()
                .ask_at::<Add, Sum>(&adds, Add(2, 3), Duration::from_secs(5))
                .await
            {
                Ok(sum) => {
                    answered = Some(sum);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        assert_eq!(answered, Some(Sum(5)), "closed by node {closer}");
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Pad(usize);
impl RemoteMessage for Pad {
    const KIND: &'static str = "test.Pad";
}

#[derive(Debug, Serialize, Deserialize)]
struct Padded(String);
impl RemoteMessage for Padded {
    const KIND: &'static str = "test.Padded";
}

enum PadderMsg {
    Pad(Pad, RpcReplyPort<Padded>),
}

/// Answers `Pad(n)` with `n` bytes of text.
struct Padder;
impl Actor for Padder {
    type Msg = PadderMsg;
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<PadderMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(
        &self,
        _: ActorRef<PadderMsg>,
        PadderMsg::Pad(Pad(n), reply): PadderMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let _ = reply.send(Padded("x".repeat(n)));
        Ok(())
    }
}

/// An answer longer than one message may carry comes back as an error saying so, and
/// the connection goes on. Before, it went out whole, and the asking node closed the
/// connection for it (FRAME_TOO_LARGE): `agentmesh submit` of a task whose results
/// came to 24 MB in all lost its connection, asked again for 60 s, and was answered
/// the same way each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_longer_than_a_message_carries_comes_back_as_an_error() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let (padder, _) = Actor::spawn(None, Padder, ()).await.unwrap();
    nodes[0]
        .mesh()
        .register_rpc("padder", padder, PadderMsg::Pad)
        .unwrap();
    resolves(&nodes[1], "padder").await;
    let limit = nodes[0].mesh().max_message_bytes();
    let refused = nodes[1]
        .mesh()
        .ask::<Pad, Padded>("padder", Pad(limit), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains(&format!("more than the {limit} one message may carry")),
        "{refused}"
    );
    let fits: Padded = nodes[1]
        .mesh()
        .ask("padder", Pad(1_000), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(fits.0.len(), 1_000);
    for node in &nodes {
        assert_eq!(node.transport().stats().closed_for_cause, [0; 16]);
    }
}
