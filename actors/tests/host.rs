//! The agent layer on real nodes in one process (loopback QUIC, mutual TLS): workers of
//! one task on two nodes exchange SYNC and SYNC_ACK directly; the coordinator steers a
//! running segment with ADJUST and cancels a task; a spoofed Agent ID is refused by
//! the transport once discovery has filled the ownership table; an agent whose
//! replicas all rest after panicking is seen unhealthy cluster-wide and gets no work.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use agentmesh_actors::pages;
use agentmesh_actors::policy::VersionedPolicy;
use agentmesh_actors::service::serde_bytes_vec::Blob;
use agentmesh_actors::service::{
    AdjustRequest, AgentsRequest, AgentsStatus, ResultsRequest, SubmitRequest, TaskOutcome,
    TaskStatus, AGENTS_SERVICE, COORDINATOR_SERVICE, RESULTS_SERVICE,
};
use agentmesh_actors::{
    Agent, AgentError, AgentHost, HostConfig, RestartPolicy, SegmentContext, SyncEvent,
    WorkerEvent, WorkerMsg,
};
use agentmesh_runtime::transport::clock::SystemClock;
use agentmesh_runtime::transport::tls::ClusterCa;
use agentmesh_runtime::transport::wire::payload::{Adjust, Allocate, Capability, Health};
use agentmesh_runtime::transport::wire::{Flags, Header, Message, Payload};
use agentmesh_runtime::transport::EndpointConfig;
use agentmesh_runtime::{
    Client, ClusterEvent, MembershipConfig, Node, NodeConfig, NodeId, RemoteMessage,
};

async fn cluster(ca: &ClusterCa, names: &[&str]) -> Vec<(Node, AgentHost)> {
    cluster_with(ca, names, HostConfig::default()).await
}

async fn cluster_with(
    ca: &ClusterCa,
    names: &[&str],
    config: HostConfig,
) -> Vec<(Node, AgentHost)> {
    let transport = EndpointConfig::new("127.0.0.1:0".parse().unwrap());
    cluster_of(ca, names, config, transport).await
}

/// Nodes whose messages take `max_message_bytes` at most.
async fn cluster_limited(
    ca: &ClusterCa,
    names: &[&str],
    max_message_bytes: usize,
) -> Vec<(Node, AgentHost)> {
    let transport = EndpointConfig {
        max_message_bytes,
        ..EndpointConfig::new("127.0.0.1:0".parse().unwrap())
    };
    cluster_of(ca, names, HostConfig::default(), transport).await
}

async fn cluster_of(
    ca: &ClusterCa,
    names: &[&str],
    config: HostConfig,
    transport: EndpointConfig,
) -> Vec<(Node, AgentHost)> {
    let mut nodes: Vec<Node> = Vec::new();
    for name in names {
        let join = nodes.first().map(|n| vec![n.me().addr]).unwrap_or_default();
        let config = NodeConfig {
            transport: transport.clone(),
            join,
            membership: MembershipConfig::default(),
            metrics: None,
            advertise: None,
        };
        let identity = ca.node_identity(name).unwrap();
        nodes.push(
            Node::start(config, &identity, Arc::new(SystemClock))
                .await
                .unwrap(),
        );
    }
    for node in &nodes {
        for _ in 0..200 {
            if node.members().await.len() == names.len() - 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut out = Vec::new();
    for node in nodes {
        let host = AgentHost::start(&node, config.clone()).await.unwrap();
        out.push((node, host));
    }
    out
}

async fn wait_for_agents(host: &AgentHost, n: usize) {
    for _ in 0..300 {
        if host.status().await.unwrap().agents.len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never saw {n} agents");
}

fn caps(name: &str) -> Vec<Capability> {
    vec![Capability {
        name: name.into(),
        version: "1".into(),
        tags: Vec::new(),
        capacity: 1,
    }]
}

fn inputs(n: u32) -> Vec<Blob> {
    (0..n)
        .map(|i| Blob(rmp_serde::to_vec_named(&i).unwrap()))
        .collect()
}

/// Segment 0 offers a bid until segment 1 answers with its own; segment 1 waits for
/// the offer, answers with the same hash and expects agreement.
struct Bidder;

const HASH: &[u8] = b"round-1-state";

impl Agent for Bidder {
    type Input = u32;
    type Output = Vec<String>;

    fn agent_type(&self) -> &str {
        "bidder"
    }

    fn capabilities(&self) -> Vec<Capability> {
        caps("bid")
    }

    async fn work(
        &self,
        segment: u32,
        ctx: &mut SegmentContext,
    ) -> Result<Vec<String>, AgentError> {
        let mut seen = Vec::new();
        let body = format!("bid:{segment}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        if segment == 1 {
            loop {
                match tokio::time::timeout_at(deadline, ctx.next_sync()).await {
                    Ok(Some(SyncEvent::Sync { body, segment, .. })) => {
                        seen.push(format!(
                            "sync from {segment}: {}",
                            String::from_utf8_lossy(&body)
                        ));
                        break;
                    }
                    Ok(Some(_)) => {}
                    _ => return Err(AgentError::new("no offer came")),
                }
            }
        }
        loop {
            ctx.sync(1, HASH, body.as_bytes()).await;
            let wait = tokio::time::Instant::now() + Duration::from_millis(200);
            while let Ok(Some(event)) = tokio::time::timeout_at(wait, ctx.next_sync()).await {
                match event {
                    SyncEvent::Sync { body, segment, .. } => seen.push(format!(
                        "sync from {segment}: {}",
                        String::from_utf8_lossy(&body)
                    )),
                    SyncEvent::Ack { agreed, round, .. } => {
                        seen.push(format!("ack {round} agreed={agreed}"))
                    }
                }
            }
            let done = if segment == 0 {
                seen.iter().any(|s| s == "sync from 1: bid:1")
            } else {
                seen.iter().any(|s| s == "ack 1 agreed=true")
            };
            if done {
                return Ok(seen);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(AgentError::new(format!("no answer; saw {seen:?}")));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_one_task_on_two_nodes_sync_with_each_other() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    nodes[0].1.add(Bidder, 1).await.unwrap();
    nodes[1].1.add(Bidder, 1).await.unwrap();
    wait_for_agents(&nodes[0].1, 2).await;
    let outcome = nodes[0]
        .1
        .submit(SubmitRequest::new("bid", inputs(2)))
        .await
        .unwrap();
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    let results: Vec<Vec<String>> = outcome
        .results
        .iter()
        .map(|r| rmp_serde::from_slice(&r.0).unwrap())
        .collect();
    assert!(
        results[0].contains(&"sync from 1: bid:1".to_string()),
        "{results:?}"
    );
    assert!(
        results[1].contains(&"sync from 0: bid:0".to_string()),
        "{results:?}"
    );
    assert!(
        results[1].contains(&"ack 1 agreed=true".to_string()),
        "{results:?}"
    );
}

/// Waits until the coordinator sets the `answer` parameter, and returns it.
struct Patient;

impl Agent for Patient {
    type Input = u32;
    type Output = String;

    fn agent_type(&self) -> &str {
        "patient"
    }

    fn capabilities(&self) -> Vec<Capability> {
        caps("wait")
    }

    async fn work(&self, _: u32, ctx: &mut SegmentContext) -> Result<String, AgentError> {
        loop {
            let adjustment = tokio::time::timeout(Duration::from_secs(10), ctx.adjusted())
                .await
                .map_err(|_| AgentError::new("never adjusted"))?;
            if adjustment.cancelled {
                return Err(AgentError::new("cancelled"));
            }
            if let Some(answer) = adjustment.params.get("answer") {
                return Ok(format!("{answer} at priority {:?}", adjustment.priority));
            }
        }
    }
}

async fn running_task(host: &AgentHost) -> uuid::Uuid {
    for _ in 0..300 {
        let status = host.status().await.unwrap();
        if let Some(t) = status.tasks.first() {
            return t.task;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no task running");
}

/// alpha and beta, two replicas of [`Patient`] on beta, and a request for two
/// segments of what they do.
async fn patients_on_beta(ca: &ClusterCa) -> (Arc<Vec<(Node, AgentHost)>>, SubmitRequest) {
    let nodes = Arc::new(cluster(ca, &["alpha", "beta"]).await);
    nodes[1].1.add(Patient, 2).await.unwrap();
    wait_for_agents(&nodes[0].1, 1).await;
    let request = SubmitRequest::new("wait", inputs(2));
    (nodes, request)
}

/// Once `n` segments of `task` run (the ALLOCATEs may still be on their way), adjusts
/// it with the one parameter `key` = 42, which reaches those `n`. (Adjusted sooner, the
/// segments would start with the parameter instead.)
async fn adjust_until_reached(
    host: &AgentHost,
    task: uuid::Uuid,
    key: &str,
    priority: Option<u8>,
    n: u32,
) {
    // An ADJUST with nothing in it changes nothing; it counts the segments running.
    let running = || {
        host.adjust(AdjustRequest {
            task,
            ..Default::default()
        })
    };
    for _ in 0..100 {
        if running().await.unwrap().sent == n {
            let reached = host
                .adjust(AdjustRequest {
                    task,
                    params: [(key.to_string(), "42".to_string())].into(),
                    priority,
                    cancel: false,
                })
                .await
                .unwrap()
                .sent;
            assert_eq!(reached, n);
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{n} segments never ran at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_steers_a_running_segment_with_adjust_and_can_cancel_a_task() {
    let ca = ClusterCa::generate().unwrap();
    let (nodes, request) = patients_on_beta(&ca).await;
    let n = nodes.clone();
    let r = request.clone();
    let submitted = tokio::spawn(async move { n[0].1.submit(r).await.unwrap() });
    let task = running_task(&nodes[0].1).await;
    adjust_until_reached(&nodes[0].1, task, "answer", Some(200), 2).await;
    let outcome = submitted.await.unwrap();
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    for r in &outcome.results {
        let text: String = rmp_serde::from_slice(&r.0).unwrap();
        assert_eq!(text, "42 at priority Some(200)");
    }

    let n = nodes.clone();
    let submitted = tokio::spawn(async move { n[0].1.submit(request).await.unwrap() });
    let task = running_task(&nodes[0].1).await;
    nodes[0]
        .1
        .adjust(AdjustRequest {
            task,
            cancel: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let outcome = submitted.await.unwrap();
    assert_eq!(outcome.status, TaskStatus::Failed);
    assert_eq!(outcome.reason.as_deref(), Some("cancelled"));
    let unknown = nodes[0].1.adjust(AdjustRequest::default()).await.unwrap();
    assert!(unknown.error.is_some());
}

/// The parameters an ADJUST sets hold for the task's segments started after it too:
/// with one replica, the second segment starts once the first is done, with them, and
/// an agent that waits for `adjusted()` sees them at once. Before, it started without
/// them and waited for an ADJUST that had gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adjustment_holds_for_the_segments_started_after_it() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = Arc::new(cluster(&ca, &["alpha", "beta"]).await);
    nodes[1].1.add(Patient, 1).await.unwrap();
    wait_for_agents(&nodes[0].1, 1).await;
    let n = nodes.clone();
    let request = SubmitRequest::new("wait", inputs(2));
    let submitted = tokio::spawn(async move { n[0].1.submit(request).await.unwrap() });
    let task = running_task(&nodes[0].1).await;
    adjust_until_reached(&nodes[0].1, task, "answer", None, 1).await;
    let outcome = submitted.await.unwrap();
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    assert_eq!(outcome.reallocated, 0, "{outcome:?}");
    for r in &outcome.results {
        let text: String = rmp_serde::from_slice(&r.0).unwrap();
        assert_eq!(text, "42 at priority None");
    }
}

/// Tells, for each attempt it runs, the input and the adjustment it started with.
struct Teller(tokio::sync::mpsc::UnboundedSender<String>);

impl Agent for Teller {
    type Input = u32;
    type Output = ();

    fn agent_type(&self) -> &str {
        "teller"
    }

    fn capabilities(&self) -> Vec<Capability> {
        caps("tell")
    }

    async fn work(&self, input: u32, ctx: &mut SegmentContext) -> Result<(), AgentError> {
        let a = ctx.adjustment();
        let _ = self.0.send(format!(
            "{input}: {:?} at priority {:?}",
            a.params.get("answer"),
            a.priority
        ));
        Ok(())
    }
}

/// An ACP message from node `alpha`'s coordinator (agent 0) of group 0, at Stream Prio
/// `prio` but on the urgent lane.
fn from_coordinator(payload: Payload, prio: u8) -> Message {
    let mut header = Header::new(payload.msg_type());
    header.prio = prio;
    header.flags = header.flags.with(Flags::URGENT);
    Message::new(header, payload.encode().unwrap().into())
}

/// An ADJUST sent after its attempt's ALLOCATE can arrive first: it goes on the urgent
/// lane, the ALLOCATE on the coordination lane, perhaps behind large inputs. The
/// worker's node keeps it, and the ALLOCATE from the same node starts the attempt with
/// its parameters and priority, or not at all if it cancelled it. Before, the worker
/// dropped it: the attempt ran as of its ALLOCATE, or ran although cancelled. Here
/// alpha's mesh plays its coordinator and sends the ALLOCATEs behind the ADJUSTs on
/// the urgent lane, where order holds, so that the ADJUSTs surely come first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adjust_that_overtook_its_allocate_holds_for_the_attempt() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let (told, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let agent = nodes[1].1.add(Teller(told), 2).await.unwrap();
    let mesh = nodes[0].0.mesh();
    let task = uuid::Uuid::new_v4();
    let adjust = |attempt, cancel| Adjust {
        target: agent,
        task,
        segment: Some(0),
        params: [("answer".to_string(), "42".to_string())].into(),
        priority: Some(200),
        cancel,
        attempt: Some(attempt),
    };
    let allocate = |attempt, input: u32| Allocate {
        target: agent,
        task,
        segment: 0,
        attempt,
        capability: "tell".into(),
        timeout_ms: 10_000,
        input: rmp_serde::to_vec_named(&input).unwrap().into(),
        peers: Vec::new(),
        params: Default::default(),
    };
    for (attempt, cancel) in [(1, false), (2, true)] {
        let m = from_coordinator(Payload::Adjust(adjust(attempt, cancel)), 0);
        mesh.send_acp("beta", m).await.unwrap();
    }
    for (attempt, input) in [(1, 1), (2, 2), (3, 3)] {
        let m = from_coordinator(Payload::Allocate(allocate(attempt, input)), 130);
        mesh.send_acp("beta", m).await.unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let next = tokio::time::timeout(Duration::from_secs(10), heard.recv()).await;
        seen.push(next.expect("an attempt ran").unwrap());
    }
    // Attempt 3's ALLOCATE came after attempt 2's on the same lane: had 2 run, it
    // would have been told by now too (it runs on the second replica).
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(more) = heard.try_recv() {
        seen.push(more);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "1: Some(\"42\") at priority Some(200)",
            "3: None at priority None"
        ]
    );
}

/// A submission with the id of a task that runs waits for that task (beside the waiter
/// before it: both get the outcome), one with the id of a task that ended gets its outcome, and
/// one with the id but not the shape of a running task is refused: the task runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_submitted_again_by_its_id_runs_once() {
    let ca = ClusterCa::generate().unwrap();
    let (nodes, mut request) = patients_on_beta(&ca).await;
    let id = uuid::Uuid::from_u128(0x5eed);
    request.task = Some(id);
    let (n, r) = (nodes.clone(), request.clone());
    let first = tokio::spawn(async move { n[0].1.submit(r).await });
    assert_eq!(running_task(&nodes[0].1).await, id);

    let other = SubmitRequest {
        capability: "something else".into(),
        ..request.clone()
    };
    let refused = nodes[0].1.submit(other).await.unwrap();
    assert_eq!(refused.status, TaskStatus::Failed);
    assert!(refused.reason.unwrap().contains("taken by another task"));

    let (n, r) = (nodes.clone(), request.clone());
    let again = tokio::spawn(async move { n[0].1.submit(r).await.unwrap() });
    adjust_until_reached(&nodes[0].1, id, "answer", None, 2).await;
    let outcome = again.await.unwrap();
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    assert_eq!(outcome.task, id);
    // The first waiter waited on beside the second, and got the same outcome. Before,
    // the second took its place and it was let go with an error.
    assert_eq!(first.await.unwrap().unwrap(), outcome);

    let status = nodes[0].1.status().await.unwrap();
    assert!(status.tasks.is_empty(), "{:?}", status.tasks);
    let later = nodes[0].1.submit(request.clone()).await.unwrap();
    assert_eq!(later, outcome);
    let status = nodes[0].1.status().await.unwrap();
    assert!(status.tasks.is_empty(), "ran again: {:?}", status.tasks);

    // Waiting for a task the node does not know (it restarted, say) starts nothing.
    let unknown = SubmitRequest {
        task: Some(uuid::Uuid::from_u128(0x0dd)),
        attach: true,
        ..request
    };
    let refused = nodes[0].1.submit(unknown.clone()).await.unwrap();
    assert_eq!(refused.status, TaskStatus::Failed);
    assert!(refused.reason.unwrap().contains("not known here"));
    let status = nodes[0].1.status().await.unwrap();
    assert!(status.tasks.is_empty(), "started: {:?}", status.tasks);

    // Asked to start it as a submission that never reached it (no member holds it):
    // not if the client submitted to another life of this node, which may have run it.
    let me = nodes[0].0.me();
    let life = NodeId::life_of(me.incarnation);
    let never_reached = |life| SubmitRequest {
        adopt_from: Some(me.name.to_string()),
        adopt_from_life: Some(life),
        ..unknown.clone()
    };
    for other in [life - 1, life + 1] {
        let refused = nodes[0].1.submit(never_reached(other)).await.unwrap();
        assert!(refused.reason.unwrap().contains("not known here"));
    }
    let status = nodes[0].1.status().await.unwrap();
    assert!(status.tasks.is_empty(), "started: {:?}", status.tasks);
    // In this life, it starts it.
    let (n, r) = (nodes.clone(), never_reached(life));
    let started = tokio::spawn(async move { n[0].1.submit(r).await.unwrap() });
    assert_eq!(running_task(&nodes[0].1).await, unknown.task.unwrap());
    adjust_until_reached(&nodes[0].1, unknown.task.unwrap(), "answer", None, 2).await;
    let outcome = started.await.unwrap();
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_cluster_actor_leaves_the_segments_of_its_agents_running() {
    let ca = ClusterCa::generate().unwrap();
    let (nodes, request) = patients_on_beta(&ca).await;
    let n = nodes.clone();
    let submitted = tokio::spawn(async move { n[0].1.submit(request).await.unwrap() });
    let task = running_task(&nodes[0].1).await;
    // Both segments are at beta's agents once an adjustment reaches two of them (one
    // without an answer: they keep waiting for one).
    adjust_until_reached(&nodes[0].1, task, "hold", None, 2).await;

    let mut events = nodes[0].0.subscribe();
    let before = nodes[1].0.me().incarnation;
    nodes[1].0.fail_cluster_actor();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(ClusterEvent::NodeUp(id)) = events.recv().await {
                if &*id.name == "beta" && id.incarnation > before {
                    return;
                }
            }
        }
    })
    .await
    .expect("alpha saw beta's cluster actor come back");

    // The same two attempts finish the task: nothing was reallocated.
    adjust_until_reached(&nodes[0].1, task, "answer", None, 2).await;
    let outcome = submitted.await.unwrap();
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    assert_eq!(outcome.reallocated, 0, "{outcome:?}");
    assert_eq!(outcome.completed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_fills_the_ownership_table_that_the_transport_checks() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["alpha", "beta"]).await;
    let id = nodes[1].1.add(Patient, 1).await.unwrap();
    wait_for_agents(&nodes[0].1, 1).await;
    let table = nodes[0].0.transport().ownership();
    assert!(table.may_send_as("beta", id));
    assert!(
        !table.may_send_as("alpha", id),
        "only its node may speak for it"
    );
    assert!(!table.may_send_as("beta", id.wrapping_add(1)));
}

/// The power path: a plain ractor actor speaking the worker message, no Agent trait.
struct Doubler;

impl ractor::Actor for Doubler {
    type Msg = WorkerMsg;
    type State = tokio::sync::mpsc::Sender<WorkerEvent>;
    type Arguments = tokio::sync::mpsc::Sender<WorkerEvent>;

    async fn pre_start(
        &self,
        _: ractor::ActorRef<WorkerMsg>,
        events: Self::Arguments,
    ) -> Result<Self::State, ractor::ActorProcessingErr> {
        Ok(events)
    }

    async fn handle(
        &self,
        _: ractor::ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        events: &mut Self::State,
    ) -> Result<(), ractor::ActorProcessingErr> {
        if let WorkerMsg::Run(a) = msg {
            let allocation = (a.task, a.segment, a.attempt);
            let event = match rmp_serde::from_slice::<u32>(&a.input) {
                Ok(n) => WorkerEvent::Done {
                    allocation,
                    output: rmp_serde::to_vec(&(n * 2)).unwrap(),
                },
                Err(e) => WorkerEvent::Failed {
                    allocation,
                    reason: e.to_string(),
                },
            };
            events.send(event).await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_ractor_actor_serves_as_a_worker() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["solo"]).await;
    let host = &nodes[0].1;
    let (events, events_rx) = tokio::sync::mpsc::channel(16);
    let (actor, _) = ractor::Actor::spawn(None, Doubler, events).await.unwrap();
    let id = host
        .add_actor("doubler", caps("double"), 0, actor, events_rx)
        .await
        .unwrap();
    wait_for_agents(host, 1).await;
    let outcome = host
        .submit(SubmitRequest::new("double", inputs(5)))
        .await
        .unwrap();
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    let doubled: Vec<u32> = outcome
        .results
        .iter()
        .map(|r| rmp_serde::from_slice(&r.0).unwrap())
        .collect();
    assert_eq!(doubled, vec![0, 2, 4, 6, 8]);
    assert!(host
        .status()
        .await
        .unwrap()
        .agents
        .iter()
        .any(|a| a.agent == id));
}

/// A node that missed a policy spread gets the policy with the next periodic one. Here
/// the spread is missed for sure: the policy goes into a's store without being spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_a_policy_spread_gets_it_with_the_periodic_one() {
    let ca = ClusterCa::generate().unwrap();
    let config = HostConfig {
        policy_respread: Some(Duration::from_millis(100)),
        ..HostConfig::default()
    };
    let nodes = cluster_with(&ca, &["a", "b"], config).await;
    let newer = VersionedPolicy {
        version: 7,
        origin: "a".into(),
        text: "[[group]]\nid = 1\npriority = 200\n".into(),
    };
    assert!(nodes[0].1.policy().offer(newer.clone()).unwrap());
    for _ in 0..250 {
        if nodes[1].1.policy().current().version == newer.version {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(nodes[1].1.policy().current(), newer);
    assert_eq!(nodes[1].1.policy().get().groups.len(), 1);
}

/// Answers at once with its input.
/// Submits `request` and expects it to complete within 30 s (without waiting for
/// `not_waiting_for`); returns its results, each a u32.
async fn completed(host: &AgentHost, request: SubmitRequest, not_waiting_for: &str) -> Vec<u32> {
    let outcome = tokio::time::timeout(Duration::from_secs(30), host.submit(request))
        .await
        .unwrap_or_else(|_| panic!("the task did not end: it waited for {not_waiting_for}"))
        .unwrap();
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    outcome
        .results
        .iter()
        .map(|r| rmp_serde::from_slice(&r.0).unwrap())
        .collect()
}

struct Quick;

impl Agent for Quick {
    type Input = u32;
    type Output = u32;

    fn agent_type(&self) -> &str {
        "quick"
    }

    fn capabilities(&self) -> Vec<Capability> {
        caps("quick")
    }

    async fn work(&self, n: u32, _: &mut SegmentContext) -> Result<u32, AgentError> {
        Ok(n)
    }
}

/// A worker that reports a result is offered the next waiting segment at once. With
/// the coordinator's periodic round an hour apart, a task of twenty segments on one
/// worker (on the other node) completes only that way; it used to wait for the round
/// (50 ms by default) between segments, so that short segments ran at 20 a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_reports_is_offered_the_next_segment_at_once() {
    let ca = ClusterCa::generate().unwrap();
    let config = HostConfig {
        coordinator_tick: Some(Duration::from_secs(3_600)),
        ..HostConfig::default()
    };
    let nodes = cluster_with(&ca, &["a", "b"], config).await;
    nodes[1].1.add(Quick, 1).await.unwrap();
    wait_for_agents(&nodes[0].1, 1).await;
    let request = SubmitRequest::new("quick", inputs(20));
    let results = completed(&nodes[0].1, request, "the coordinator's round").await;
    assert_eq!(results, (0..20).collect::<Vec<u32>>());
}

/// Answers its input, or, if fragile, panics on every segment (and counts its panics).
struct Brittle {
    fragile: bool,
    panics: Arc<std::sync::atomic::AtomicUsize>,
}

impl Agent for Brittle {
    type Input = u32;
    type Output = u32;

    fn agent_type(&self) -> &str {
        if self.fragile {
            "fragile"
        } else {
            "sturdy"
        }
    }

    fn capabilities(&self) -> Vec<Capability> {
        caps("mend")
    }

    async fn work(&self, n: u32, _: &mut SegmentContext) -> Result<u32, AgentError> {
        if self.fragile {
            self.panics
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            panic!("fragile agent: segment {n}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(n)
    }
}

/// A replica that panics more than its restart policy allows rests; with every
/// replica of its agent resting, the agent is unhealthy, which discovery spreads to
/// the coordinator on the other node: it sends the agent no more work, and the task
/// completes on the healthy agent. Only one segment ever reaches the fragile agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_replicas_rest_is_unhealthy_everywhere_and_gets_no_work() {
    let ca = ClusterCa::generate().unwrap();
    let config = HostConfig {
        restarts: RestartPolicy {
            max_restarts: 0,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(10),
            rest: Duration::from_secs(60),
        },
        ..HostConfig::default()
    };
    let nodes = cluster_with(&ca, &["a", "b"], config).await;
    let panics = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let fragile = Brittle {
        fragile: true,
        panics: panics.clone(),
    };
    let sturdy = Brittle {
        fragile: false,
        panics: panics.clone(),
    };
    let fragile_id = nodes[1].1.add(fragile, 1).await.unwrap();
    nodes[0].1.add(sturdy, 1).await.unwrap();
    wait_for_agents(&nodes[0].1, 2).await;

    let request = SubmitRequest::new("mend", inputs(12));
    let results = completed(&nodes[0].1, request, "the resting agent").await;
    assert_eq!(results, (0..12).collect::<Vec<u32>>());
    assert_eq!(
        panics.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a resting agent ran work"
    );
    // Discovery spreads the change on its own time: wait for it (5 s at most).
    for _ in 0..250 {
        let status = nodes[0].1.status().await.unwrap();
        let seen = status.agents.iter().find(|a| a.agent == fragile_id);
        if seen.unwrap().health == Health::Unhealthy {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the coordinator's node never saw the fragile agent unhealthy");
}

/// Answers its segment's number followed by `bytes` bytes of `x`, after 200 ms (so
/// that the standby holds each result before the next is accepted).
struct Wide {
    bytes: usize,
}

impl Agent for Wide {
    type Input = u32;
    type Output = String;

    fn agent_type(&self) -> &str {
        "wide"
    }

    fn capabilities(&self) -> Vec<Capability> {
        caps("wide")
    }

    async fn work(&self, segment: u32, _: &mut SegmentContext) -> Result<String, AgentError> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(format!("{segment}:{}", "x".repeat(self.bytes)))
    }
}

/// A result longer than one message may carry fails its attempt, saying so, and the
/// task fails with that reason once its attempts are spent, in seconds. Before, the
/// worker's node sent the final REPORT whole; the coordinator's node closed the
/// connection for it (FRAME_TOO_LARGE), the worker sent it again on each new
/// connection, and each was closed in turn: the two nodes declared each other down,
/// and the task never ended (found by hand, a result of 17 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_longer_than_a_message_carries_fails_its_attempt_saying_so() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["a", "b"]).await;
    let limit = nodes[1].0.mesh().max_message_bytes();
    nodes[1].1.add(Wide { bytes: limit }, 1).await.unwrap();
    wait_for_agents(&nodes[0].1, 1).await;
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        nodes[0].1.submit(SubmitRequest::new("wide", inputs(1))),
    )
    .await
    .expect("the task ends")
    .unwrap();
    assert_eq!(outcome.status, TaskStatus::Failed, "{outcome:?}");
    let reason = outcome.reason.unwrap_or_default();
    assert!(
        reason.contains(&format!("more than the {limit} one message may carry")),
        "{reason}"
    );
    for (node, _) in &nodes {
        assert_eq!(node.transport().stats().closed_for_cause, [0; 16]);
    }
}

/// The page `request` asks for from the node at `addr`, once that node keeps the
/// outcome (a standby has it once the task's end reaches it), within 5 s.
async fn kept_at(
    identity: &agentmesh_runtime::transport::tls::NodeIdentity,
    addr: std::net::SocketAddr,
    request: ResultsRequest,
) -> TaskOutcome {
    for _ in 0..100 {
        let page = pages::results_at(identity, addr, request.clone(), Duration::from_secs(10))
            .await
            .unwrap();
        if !page.unknown {
            return page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} never kept the outcome");
}

/// An outcome whose results are longer than one message reaches a client over the
/// network in pages: the first with the outcome, the rest as the client asks for them,
/// while a caller in the node's own process gets it whole. Before, the answer was
/// refused at the sender for its length, and the client got an error for a task that
/// had completed (found by hand: 12 results of 2 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_longer_than_a_message_reaches_a_client_in_pages() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["a", "b"]).await;
    let limit = nodes[0].0.mesh().max_message_bytes();
    // Six results of a fifth of a message each: two pages. (Below the 4 MiB a
    // checkpoint carries, so the standby gets the last with the task's end.)
    let bytes = limit / 5;
    nodes[1].1.add(Wide { bytes }, 1).await.unwrap();
    wait_for_agents(&nodes[0].1, 1).await;
    let request = SubmitRequest::new("wide", inputs(6)).with_id(uuid::Uuid::from_u128(0x9a9e));

    let mut client = Client::connect(&ca.node_identity("client").unwrap(), nodes[0].0.me().addr)
        .await
        .unwrap();
    let first: TaskOutcome = client
        .request(
            COORDINATOR_SERVICE,
            <SubmitRequest as RemoteMessage>::KIND,
            &request,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(first.status, TaskStatus::Completed, "{:?}", first.reason);
    assert!(first.more_results);
    assert_eq!(first.results.len(), 4, "as many as fit in one message");
    let whole = pages::rest_of(&mut client, first, Duration::from_secs(30))
        .await
        .unwrap();
    client.close().await;
    assert!(!whole.more_results);
    let results: Vec<String> = whole
        .results
        .iter()
        .map(|r| rmp_serde::from_slice(&r.0).unwrap())
        .collect();
    assert_eq!(results.len(), 6);
    for (segment, result) in results.iter().enumerate() {
        assert_eq!(result.len(), format!("{segment}:").len() + bytes);
        assert!(result.starts_with(&format!("{segment}:x")));
    }

    // In the node's own process, the same task's outcome comes whole.
    let local = nodes[0].1.submit(request.clone()).await.unwrap();
    assert_eq!(local, whole);

    // The coordinator's standby (b, the next node by name) keeps the outcome that came
    // with the task's end, and gives pages of it.
    let identity = ca.node_identity("client").unwrap();
    let (a, b) = (nodes[0].0.me().addr, nodes[1].0.me().addr);
    let ask = |addr, request| pages::results_at(&identity, addr, request, Duration::from_secs(30));
    let from_standby = ResultsRequest {
        task: whole.task,
        from: 4,
    };
    let page = kept_at(&identity, b, from_standby).await;
    assert_eq!((page.results_from, page.more_results), (4, false));
    assert_eq!(page.results, whole.results[4..]);

    // A client whose coordinator's node goes down after the first page gets the rest
    // there.
    let first: TaskOutcome = Client::request_once(
        &identity,
        a,
        COORDINATOR_SERVICE,
        <SubmitRequest as RemoteMessage>::KIND,
        &request,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!((first.results.len(), first.more_results), (4, true));
    let mut nodes = nodes;
    let (coordinator, host) = nodes.remove(0);
    host.stop();
    coordinator.leave().await;
    let patience = pages::Patience {
        within: Duration::from_secs(30),
        pause: Duration::from_millis(100),
    };
    let rest = pages::rest_from(first, vec![a, b], ask, patience)
        .await
        .unwrap();
    assert_eq!(rest, whole);
    for (node, _) in &nodes {
        assert_eq!(node.transport().stats().closed_for_cause, [0; 16]);
    }
}

/// A node whose agents' whole list is longer than one message tells a node that joins
/// later about every one of them, in parts. Before, the whole list went as one message,
/// which the sender refused for its length, and the node that joined never learnt of
/// any of them (found by hand: 150,000 agents on a node at the default 16 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_later_learns_of_more_agents_than_a_message_lists() {
    const AGENTS: usize = 3_000;
    let ca = ClusterCa::generate().unwrap();
    // Messages of 256 KiB at most: 3,000 records take some 370 KB.
    let config = |join| NodeConfig {
        transport: EndpointConfig {
            max_message_bytes: 256 * 1024,
            ..EndpointConfig::new("127.0.0.1:0".parse().unwrap())
        },
        join,
        membership: MembershipConfig::default(),
        metrics: None,
        advertise: None,
    };
    let start = |name: &str, join| {
        let identity = ca.node_identity(name).unwrap();
        async move {
            let node = Node::start(config(join), &identity, Arc::new(SystemClock))
                .await
                .unwrap();
            let host = AgentHost::start(&node, HostConfig::default())
                .await
                .unwrap();
            (node, host)
        }
    };
    let (a, a_host) = start("a", Vec::new()).await;
    for _ in 0..AGENTS {
        a_host.add(Wide { bytes: 0 }, 1).await.unwrap();
    }
    let (b, b_host) = start("b", vec![a.me().addr]).await;
    let mut seen = 0;
    for _ in 0..300 {
        seen = b_host.status().await.unwrap().agents.len();
        if seen == AGENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, AGENTS, "b learnt of {seen} of a's agents");

    // Asked over the network, b lists the agents that fit in one message, and counts
    // the rest. Before, the answer was refused for its length.
    let status: AgentsStatus = Client::request_once(
        &ca.node_identity("client").unwrap(),
        b.me().addr,
        AGENTS_SERVICE,
        <AgentsRequest as RemoteMessage>::KIND,
        &AgentsRequest {},
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let listed = status.agents.len();
    assert!((1_000..AGENTS).contains(&listed), "{listed} listed");
    assert_eq!(listed as u64 + status.agents_not_listed, AGENTS as u64);
    for node in [&a, &b] {
        assert_eq!(node.transport().stats().closed_for_cause, [0; 16]);
    }
}

/// The standby gets the results it lacks when a task ends, over as many checkpoints
/// as they need, and then keeps the outcome: a client whose coordinator's node goes
/// down before it has the outcome gets it there. Before, the end notice carried at
/// most 4 MiB of the results the standby lacked; past that it went without them, and
/// the standby kept no outcome (found by hand: 30 results of 2 MiB accepted within
/// 140 ms, coordinator SIGKILLed while its client fetched the pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_keeps_an_outcome_whose_last_results_it_lacked() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["a", "b"]).await;
    // Twelve results of 1.2 MB that all come at once: far more than one checkpoint
    // (4 MiB) carries when the task ends.
    nodes[1].1.add(Wide { bytes: 1_200_000 }, 12).await.unwrap();
    wait_for_agents(&nodes[0].1, 1).await;
    let outcome = nodes[0]
        .1
        .submit(SubmitRequest::new("wide", inputs(12)))
        .await
        .unwrap();
    assert_eq!(
        outcome.status,
        TaskStatus::Completed,
        "{:?}",
        outcome.reason
    );
    let identity = ca.node_identity("client").unwrap();
    let all = ResultsRequest {
        task: outcome.task,
        from: 0,
    };
    let kept = kept_at(&identity, nodes[1].0.me().addr, all).await;
    assert_eq!(kept.results, outcome.results);
    assert!(!kept.more_results);
}

/// The standby keeps an outcome larger than the ended-task cache keeps (64 MiB of
/// results) for a minute, as its coordinator does (`LargeOutcomes`): a client whose coordinator's node
/// goes down while it fetches the pages gets the rest there. Before, the coordinator
/// looked for the outcome in its cache alone when it told the standby of the end, so
/// the notice went without it, and the standby kept none (found by hand: 40 results
/// of 2 MiB, the coordinator SIGKILLed while `agentmesh submit` fetched the pages; the
/// rest was lost in 4 of 4 tries); nor did the standby keep one that large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_keeps_an_outcome_larger_than_the_cache_keeps() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["a", "b"]).await;
    // 34 results of 2 MiB: 68 MiB.
    nodes[1].1.add(Wide { bytes: 2 << 20 }, 12).await.unwrap();
    wait_for_agents(&nodes[0].1, 1).await;
    let outcome = nodes[0]
        .1
        .submit(SubmitRequest::new("wide", inputs(34)))
        .await
        .unwrap();
    assert_eq!(outcome.status, TaskStatus::Completed);
    assert!(outcome.result_bytes() > 64 << 20);
    let identity = ca.node_identity("client").unwrap();
    let last = ResultsRequest {
        task: outcome.task,
        from: 33,
    };
    let kept = kept_at(&identity, nodes[1].0.me().addr, last.clone()).await;
    assert!(kept.results[..] == outcome.results[33..]);
    // The coordinator holds it apart too, and gives the same page.
    let own = kept_at(&identity, nodes[0].0.me().addr, last).await;
    assert!(own.results[..] == outcome.results[33..]);
}

/// Takes an input of any length; answers with `bytes` bytes after `pause`.
struct Heavy {
    bytes: usize,
    pause: Duration,
}

impl Agent for Heavy {
    type Input = Vec<u8>;
    type Output = String;

    fn agent_type(&self) -> &str {
        "heavy"
    }

    fn capabilities(&self) -> Vec<Capability> {
        caps("heavy")
    }

    async fn work(&self, input: Vec<u8>, _: &mut SegmentContext) -> Result<String, AgentError> {
        tokio::time::sleep(self.pause).await;
        Ok(format!("{}:{}", input.len(), "x".repeat(self.bytes)))
    }
}

/// Nodes a and b that take 256 KiB messages, with `replicas` of a [`Heavy`] agent of
/// `bytes` and `pause` on b, once a sees it.
async fn heavy_pair(
    ca: &ClusterCa,
    bytes: usize,
    pause: Duration,
    replicas: usize,
) -> Arc<Vec<(Node, AgentHost)>> {
    let nodes = cluster_limited(ca, &["a", "b"], 256 * 1024).await;
    nodes[1]
        .1
        .add(Heavy { bytes, pause }, replicas)
        .await
        .unwrap();
    wait_for_agents(&nodes[0].1, 1).await;
    Arc::new(nodes)
}

/// A [`Heavy`] agent's input of `bytes` bytes.
fn input(bytes: usize) -> Blob {
    Blob(rmp_serde::to_vec(&vec![7u8; bytes]).unwrap())
}

/// Submits `requests` at the first of `nodes` all at once; each completes.
async fn all_complete(
    nodes: &Arc<Vec<(Node, AgentHost)>>,
    requests: Vec<SubmitRequest>,
) -> Vec<TaskOutcome> {
    let mut running = tokio::task::JoinSet::new();
    for (i, request) in requests.into_iter().enumerate() {
        let nodes = nodes.clone();
        running.spawn(async move { (i, nodes[0].1.submit(request).await.unwrap()) });
    }
    let mut outcomes = Vec::new();
    while let Some(done) = tokio::time::timeout(Duration::from_secs(60), running.join_next())
        .await
        .expect("every task ends within a minute")
    {
        outcomes.push(done.unwrap());
    }
    outcomes.sort_by_key(|(i, _)| *i);
    let outcomes: Vec<TaskOutcome> = outcomes.into_iter().map(|(_, o)| o).collect();
    for outcome in &outcomes {
        assert_eq!(
            outcome.status,
            TaskStatus::Completed,
            "{:?}",
            outcome.reason
        );
    }
    outcomes
}

/// A checkpoint never grows longer than a message carries, however many task starts
/// and results wait for it: those that do not fit go in the next. Before, a checkpoint
/// took task starts and results until it held 4 MiB of their bytes, counting nothing
/// else, on top of a first start or result of any length: at nodes that take 256 KiB
/// messages, three starts of 150 KB, or eight results of 100 KB, went in one
/// checkpoint, which the sender refused, again at each retry, until the coordinator
/// gave up on its standby after 5 s; the tasks waited meanwhile, then ran without
/// one, and the standby kept no outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_stay_within_a_message_however_much_waits_for_them() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = heavy_pair(&ca, 100_000, Duration::from_millis(50), 8).await;
    // Submitted at once: three tasks whose one input takes 150 KB, and one whose
    // eight segments' results take 100 KB each.
    let mut requests: Vec<SubmitRequest> = (0..3)
        .map(|_| SubmitRequest::new("heavy", vec![input(150_000)]))
        .collect();
    requests.push(SubmitRequest::new("heavy", vec![input(10); 8]));
    let outcomes = all_complete(&nodes, requests).await;
    standby_keeps(&ca, &nodes, &outcomes, outcomes.len()).await;
}

/// A task's end whose results the standby lacks, more than a message carries, goes in
/// as many checkpoints as they need, and the standby keeps the outcome. Before, with
/// the notices' own 4 MiB larger than the 256 KiB a message carried here, the notice
/// took all eight results of 100 KB, did not fit, and went without the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_whose_lacking_results_exceed_a_message_keeps_its_outcome() {
    let ca = ClusterCa::generate().unwrap();
    // Eight results that come at once.
    let nodes = heavy_pair(&ca, 100_000, Duration::ZERO, 8).await;
    let request = SubmitRequest::new("heavy", vec![input(10); 8]);
    let outcomes = all_complete(&nodes, vec![request]).await;
    standby_keeps(&ca, &nodes, &outcomes, 1).await;
}

/// A task whose start is longer than any checkpoint carries (submitted in the node's
/// own process: over the network a submission carries 64 KiB less than a message)
/// runs at once without a standby, and the standby is still told of its end, with its
/// outcome. Before, the checkpoint went anyway, was refused at the sender for its
/// length at each retry, and the task waited until the coordinator gave up on the
/// standby after 5 s (5,092 ms here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_too_long_for_any_checkpoint_runs_without_a_standby() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = heavy_pair(&ca, 10, Duration::ZERO, 1).await;
    // Two inputs of 150 KB: each goes to its worker in one message, both in no
    // checkpoint.
    let request = SubmitRequest::new("heavy", vec![input(150_000); 2]);
    let outcomes = all_complete(&nodes, vec![request]).await;
    // It did not wait for the coordinator to give up on its standby (5 s); it takes
    // some 100 ms.
    assert!(
        outcomes[0].elapsed_ms < 4_000,
        "{} ms",
        outcomes[0].elapsed_ms
    );
    standby_keeps(&ca, &nodes, &outcomes, 1).await;
}

/// A segment's input goes to its worker in one message: a longer one is refused at
/// submission, with the reason, rather than tried at each worker and failed after
/// five attempts (5 s), as it was. Inputs that fit beside it still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_longer_than_a_message_is_refused_at_submission() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = heavy_pair(&ca, 10, Duration::ZERO, 1).await;
    let most = 256 * 1024 - 64 * 1024;
    let request = SubmitRequest::new("heavy", vec![input(1_000), input(300_000)]);
    let outcome = nodes[0].1.submit(request).await.unwrap();
    assert_eq!(outcome.status, TaskStatus::Failed);
    assert_eq!((outcome.completed, outcome.reallocated), (0, 0));
    let reason = outcome.reason.unwrap_or_default();
    assert!(
        reason.contains("segment 1 takes 300005 bytes")
            && reason.contains(&format!("at most {most}")),
        "{reason}"
    );
    // One that just fits runs (its input's bytes, with the header `input` adds).
    let request = SubmitRequest::new("heavy", vec![input(most - 5)]);
    all_complete(&nodes, vec![request]).await;
}

/// The standby, `nodes[1]`, keeps `at_least` of `outcomes` (it held those tasks),
/// each with the same results.
async fn standby_keeps(
    ca: &ClusterCa,
    nodes: &[(Node, AgentHost)],
    outcomes: &[TaskOutcome],
    at_least: usize,
) {
    let identity = ca.node_identity("client").unwrap();
    let mut client = Client::connect(&identity, nodes[1].0.me().addr)
        .await
        .unwrap();
    let kind = <ResultsRequest as RemoteMessage>::KIND;
    let mut kept = 0;
    // The last end notices may be on their way.
    for _ in 0..20 {
        kept = 0;
        for outcome in outcomes {
            let all = ResultsRequest {
                task: outcome.task,
                from: 0,
            };
            let page: TaskOutcome = client
                .request(RESULTS_SERVICE, kind, &all, Duration::from_secs(10))
                .await
                .unwrap();
            if !page.unknown {
                // The first page of it.
                let n = page.results.len();
                assert!(n > 0 && page.results[..] == outcome.results[..n]);
                kept += 1;
            }
        }
        if kept >= at_least {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(kept >= at_least, "the standby keeps {kept} outcomes");
    for (node, _) in nodes {
        assert_eq!(node.transport().stats().closed_for_cause, [0; 16]);
    }
}

/// A checkpoint counts each task's part whole, not only its inputs and results: at
/// nodes that take 256 KiB messages, the starts of 2,000 tasks of one small segment
/// went in one checkpoint of some 600 KB (their inputs made 10 KB of it), which the
/// sender refused, as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_many_small_tasks_stays_within_a_message() {
    let ca = ClusterCa::generate().unwrap();
    let nodes = heavy_pair(&ca, 0, Duration::ZERO, 8).await;
    let requests = (0..2_000)
        .map(|_| SubmitRequest::new("heavy", vec![input(1)]))
        .collect();
    let outcomes = all_complete(&nodes, requests).await;
    // It keeps the latest 256 outcomes (`standby.rs`).
    standby_keeps(&ca, &nodes, &outcomes, 200).await;
}
