//! Workers running real agents as ractor actors: results and progress, concurrency
//! bounded by replicas, adjustments reaching the running segment, bad input, a
//! panicking agent whose segment is reported failed while its replica restarts, and
//! one that keeps panicking: it rests, is reported unhealthy, its allocations are
//! refused, and it comes back.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentmesh_actors::agent::{Adjustment, Agent, AgentError, SegmentContext};
use agentmesh_actors::worker::{
    Allocation, RestartPolicy, WorkerArgs, WorkerEvent, WorkerMsg, WorkerSupervisor,
};
use agentmesh_runtime::transport::wire::payload::{Capability, Health};
use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;
use uuid::Uuid;

struct Doubler;
impl Agent for Doubler {
    type Input = u64;
    type Output = u64;
    fn agent_type(&self) -> &str {
        "doubler"
    }
    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability {
            name: "double".into(),
            version: "1".into(),
            tags: vec![],
            capacity: 1,
        }]
    }
    async fn work(&self, n: u64, ctx: &mut SegmentContext) -> Result<u64, AgentError> {
        ctx.progress(500);
        if n == 13 {
            return Err(AgentError::new("unlucky"));
        }
        Ok(n * 2)
    }
}

/// Sleeps its input in milliseconds, in steps, stopping early when cancelled; counts
/// how many run at once, and panics on u64::MAX.
#[derive(Default)]
struct Sleeper {
    running: AtomicUsize,
    most: AtomicUsize,
}
impl Agent for Sleeper {
    type Input = u64;
    type Output = String;
    fn agent_type(&self) -> &str {
        "sleeper"
    }
    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability {
            name: "sleep".into(),
            version: "1".into(),
            tags: vec![],
            capacity: 2,
        }]
    }
    async fn work(&self, ms: u64, ctx: &mut SegmentContext) -> Result<String, AgentError> {
        if ms == u64::MAX {
            panic!("asked to crash");
        }
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let mut slept = 0;
        while slept < ms && !ctx.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            slept += 5;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        let adjustment = ctx.adjustment();
        let tag = adjustment.params.get("tag").cloned().unwrap_or_default();
        Ok(match adjustment.priority {
            Some(p) => format!("{tag} at {p}"),
            None => tag,
        })
    }
}

fn alloc(segment: u32, input: &impl serde::Serialize) -> Allocation {
    Allocation {
        task: Uuid::from_u128(1),
        segment,
        attempt: 1,
        input: rmp_serde::to_vec_named(input).unwrap(),
        priority: 128,
        params: Default::default(),
        adjusted_priority: None,
    }
}

async fn start<A: Agent>(
    agent: Arc<A>,
    replicas: usize,
) -> (ActorRef<WorkerMsg>, mpsc::Receiver<WorkerEvent>) {
    start_with(agent, replicas, RestartPolicy::default()).await
}

async fn start_with<A: Agent>(
    agent: Arc<A>,
    replicas: usize,
    restarts: RestartPolicy,
) -> (ActorRef<WorkerMsg>, mpsc::Receiver<WorkerEvent>) {
    let (events, rx) = mpsc::channel(1024);
    let (worker, _) = Actor::spawn(
        None,
        WorkerSupervisor::<A>::default(),
        WorkerArgs {
            agent,
            replicas,
            events,
            restarts,
        },
    )
    .await
    .unwrap();
    (worker, rx)
}

/// The next event that is not progress.
async fn next(rx: &mut mpsc::Receiver<WorkerEvent>) -> WorkerEvent {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        if !matches!(e, WorkerEvent::Progress { .. }) {
            return e;
        }
    }
}

/// Collects events until `n` of them end an attempt (Done or Failed); changes of
/// health are left out.
/// An ADJUST that cancels task 1's `segment`, or all of it.
fn cancel(segment: Option<u32>) -> WorkerMsg {
    WorkerMsg::Adjust {
        task: Uuid::from_u128(1),
        segment,
        adjustment: Adjustment {
            cancelled: true,
            ..Adjustment::default()
        },
    }
}

/// An ADJUST that sets task 1's parameter `tag` to "steered", for `segment` or all of
/// it.
fn steer(segment: Option<u32>) -> WorkerMsg {
    let mut adjustment = Adjustment::default();
    adjustment.params.insert("tag".into(), "steered".into());
    WorkerMsg::Adjust {
        task: Uuid::from_u128(1),
        segment,
        adjustment,
    }
}

/// The outputs of the next `n` attempts to end (as strings), by segment, each that
/// ended otherwise left out.
async fn outputs(rx: &mut mpsc::Receiver<WorkerEvent>, n: usize) -> Vec<(u32, String)> {
    let mut done: Vec<(u32, String)> = outcomes(rx, n)
        .await
        .into_iter()
        .filter_map(|e| match e {
            WorkerEvent::Done { allocation, output } => {
                Some((allocation.1, rmp_serde::from_slice(&output).unwrap()))
            }
            _ => None,
        })
        .collect();
    done.sort();
    done
}

async fn outcomes(rx: &mut mpsc::Receiver<WorkerEvent>, n: usize) -> Vec<WorkerEvent> {
    let mut all = Vec::new();
    let mut ended = 0;
    while ended < n {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        match e {
            WorkerEvent::Health(_) => continue,
            WorkerEvent::Progress { .. } => {}
            _ => ended += 1,
        }
        all.push(e);
    }
    all
}

#[tokio::test]
async fn segments_run_and_report_progress_and_typed_results() {
    let (worker, mut rx) = start(Arc::new(Doubler), 2).await;
    worker.cast(WorkerMsg::Run(alloc(0, &21u64))).unwrap();
    worker.cast(WorkerMsg::Run(alloc(1, &13u64))).unwrap();
    let events = outcomes(&mut rx, 2).await;
    let id = |s| (Uuid::from_u128(1), s, 1);
    assert!(events.contains(&WorkerEvent::Progress {
        allocation: id(0),
        permille: 500
    }));
    assert!(events.contains(&WorkerEvent::Done {
        allocation: id(0),
        output: rmp_serde::to_vec_named(&42u64).unwrap()
    }));
    assert!(events.contains(&WorkerEvent::Failed {
        allocation: id(1),
        reason: "unlucky".into()
    }));
}

/// Reports progress a thousand times in about a second.
struct Chatty;
impl Agent for Chatty {
    type Input = u64;
    type Output = u64;
    fn agent_type(&self) -> &str {
        "chatty"
    }
    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability {
            name: "chat".into(),
            version: "1".into(),
            tags: vec![],
            capacity: 1,
        }]
    }
    async fn work(&self, n: u64, ctx: &mut SegmentContext) -> Result<u64, AgentError> {
        for i in 1..=1000u16 {
            ctx.progress(i);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(n)
    }
}

/// However often an agent reports progress, its attempt's progress goes out at most
/// every 200 ms, the latest value each time; the result follows at once.
#[tokio::test]
async fn progress_goes_out_at_most_every_200_ms() {
    let (worker, mut rx) = start(Arc::new(Chatty), 1).await;
    let started = tokio::time::Instant::now();
    worker.cast(WorkerMsg::Run(alloc(0, &7u64))).unwrap();
    let events = outcomes(&mut rx, 1).await;
    let took = started.elapsed();
    let progress: Vec<u16> = events
        .iter()
        .filter_map(|e| match e {
            WorkerEvent::Progress { permille, .. } => Some(*permille),
            _ => None,
        })
        .collect();
    // One at once, then one per 200 ms at most (and a spare for rounding).
    let most = 2 + (took.as_millis() / 200) as usize;
    assert!(
        !progress.is_empty() && progress.len() <= most,
        "{} progress reports in {took:?}: {progress:?}",
        progress.len()
    );
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
    assert!(matches!(events.last(), Some(WorkerEvent::Done { .. })));
}

#[tokio::test]
async fn replicas_bound_how_many_segments_run_at_once() {
    let agent = Arc::new(Sleeper::default());
    let (worker, mut rx) = start(agent.clone(), 2).await;
    for s in 0..6 {
        worker.cast(WorkerMsg::Run(alloc(s, &30u64))).unwrap();
    }
    let events = outcomes(&mut rx, 6).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, WorkerEvent::Done { .. }))
            .count(),
        6
    );
    assert_eq!(agent.most.load(Ordering::SeqCst), 2);
}

/// An ADJUST of the whole task reaches its attempts still queued too (its priority as
/// well as its parameters), and an attempt allocated with parameters starts with them.
#[tokio::test]
async fn queued_attempts_take_an_adjustment_and_allocations_carry_parameters() {
    let (worker, mut rx) = start(Arc::new(Sleeper::default()), 1).await;
    worker.cast(WorkerMsg::Run(alloc(0, &100u64))).unwrap();
    // Queued behind segment 0 on the one replica.
    worker.cast(WorkerMsg::Run(alloc(1, &0u64))).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let WorkerMsg::Adjust {
        task,
        segment,
        mut adjustment,
    } = steer(None)
    else {
        unreachable!()
    };
    adjustment.priority = Some(9);
    worker
        .cast(WorkerMsg::Adjust {
            task,
            segment,
            adjustment,
        })
        .unwrap();
    let mut given = alloc(2, &0u64);
    given.params.insert("tag".into(), "given".into());
    worker.cast(WorkerMsg::Run(given)).unwrap();
    let done = outputs(&mut rx, 3).await;
    let tag = |s: u32, t: &str| (s, t.to_string());
    assert_eq!(
        done,
        [
            tag(0, "steered at 9"),
            tag(1, "steered at 9"),
            tag(2, "given")
        ]
    );
}

/// An ADJUST that sets only parameters leaves the priority an earlier one set, for the
/// attempt running and for the one still queued.
#[tokio::test]
async fn a_later_adjust_of_parameters_only_keeps_the_priority_set_before() {
    let (worker, mut rx) = start(Arc::new(Sleeper::default()), 1).await;
    worker.cast(WorkerMsg::Run(alloc(0, &100u64))).unwrap();
    worker.cast(WorkerMsg::Run(alloc(1, &0u64))).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut first = Adjustment {
        priority: Some(9),
        ..Adjustment::default()
    };
    first.params.insert("tag".into(), "first".into());
    worker
        .cast(WorkerMsg::Adjust {
            task: Uuid::from_u128(1),
            segment: None,
            adjustment: first,
        })
        .unwrap();
    worker.cast(steer(None)).unwrap();
    let done = outputs(&mut rx, 2).await;
    let tag = |s: u32, t: &str| (s, t.to_string());
    assert_eq!(done, [tag(0, "steered at 9"), tag(1, "steered at 9")]);
}

/// Handed back (its node is leaving), the attempts named that are still queued are
/// refused with the reason given, for their coordinators to give elsewhere, while the
/// one running, and a queued one not named (its node's own coordinator's), go on to
/// their end.
#[tokio::test]
async fn a_hand_back_refuses_the_queued_attempts_named_and_lets_the_others_end() {
    let (worker, mut rx) = start(Arc::new(Sleeper::default()), 1).await;
    worker.cast(WorkerMsg::Run(alloc(0, &100u64))).unwrap();
    worker.cast(WorkerMsg::Run(alloc(1, &0u64))).unwrap();
    worker.cast(WorkerMsg::Run(alloc(2, &0u64))).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let reason = "node n0 is leaving".to_string();
    let named = [0, 1].map(|s| (Uuid::from_u128(1), s, 1));
    let attempts = Arc::new(std::collections::HashSet::from(named));
    worker
        .cast(WorkerMsg::HandBack { reason, attempts })
        .unwrap();
    let mut ended: Vec<(u32, String)> = outcomes(&mut rx, 3)
        .await
        .into_iter()
        .filter_map(|e| match e {
            WorkerEvent::Done { allocation, .. } => Some((allocation.1, "done".into())),
            WorkerEvent::Refused { allocation, reason } => Some((allocation.1, reason)),
            _ => None,
        })
        .collect();
    ended.sort();
    let end = |s: u32, how: &str| (s, how.to_string());
    assert_eq!(
        ended,
        [end(0, "done"), end(1, "node n0 is leaving"), end(2, "done")]
    );
}

/// An ADJUST that raises a task's priority moves its queued attempts ahead of those of
/// tasks it now outranks.
#[tokio::test]
async fn a_priority_adjustment_moves_queued_attempts_ahead() {
    let (worker, mut rx) = start(Arc::new(Sleeper::default()), 1).await;
    // The one replica is busy; segments 1 and 2 of task 1, then segment 0 of task 2,
    // wait at the same priority.
    worker.cast(WorkerMsg::Run(alloc(0, &100u64))).unwrap();
    worker.cast(WorkerMsg::Run(alloc(1, &0u64))).unwrap();
    worker.cast(WorkerMsg::Run(alloc(2, &0u64))).unwrap();
    let mut other = alloc(0, &0u64);
    other.task = Uuid::from_u128(2);
    worker.cast(WorkerMsg::Run(other)).unwrap();
    worker
        .cast(WorkerMsg::Adjust {
            task: Uuid::from_u128(2),
            segment: None,
            adjustment: Adjustment {
                priority: Some(255),
                ..Adjustment::default()
            },
        })
        .unwrap();
    let order: Vec<(u128, u32, String)> = outcomes(&mut rx, 4)
        .await
        .into_iter()
        .filter_map(|e| match e {
            WorkerEvent::Done { allocation, output } => Some((
                allocation.0.as_u128(),
                allocation.1,
                rmp_serde::from_slice(&output).unwrap(),
            )),
            _ => None,
        })
        .collect();
    let done = |t, s, out: &str| (t, s, out.to_string());
    assert_eq!(
        order,
        [
            done(1, 0, ""),
            done(2, 0, " at 255"),
            done(1, 1, ""),
            done(1, 2, "")
        ]
    );
}

#[tokio::test]
async fn adjustments_reach_the_running_segment_and_cancel_stops_it() {
    let (worker, mut rx) = start(Arc::new(Sleeper::default()), 1).await;
    worker.cast(WorkerMsg::Run(alloc(0, &200u64))).unwrap();
    worker.cast(WorkerMsg::Run(alloc(1, &200u64))).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    worker.cast(steer(Some(0))).unwrap();
    let events = outcomes(&mut rx, 1).await;
    assert_eq!(
        events.last(),
        Some(&WorkerEvent::Done {
            allocation: (Uuid::from_u128(1), 0, 1),
            output: rmp_serde::to_vec_named("steered").unwrap()
        })
    );
    // Cancel the whole task: the running segment stops early.
    worker.cast(cancel(None)).unwrap();
    let events = outcomes(&mut rx, 1).await;
    assert_eq!(
        events.last(),
        Some(&WorkerEvent::Failed {
            allocation: (Uuid::from_u128(1), 1, 1),
            reason: "cancelled".into()
        })
    );
}

/// A queued attempt that is cancelled, alone or with its task, ends as a running one
/// does: reported failed, "cancelled". Before, it left the queue unreported, so the
/// worker host kept it as running for ever, with the agent's load one too high.
#[tokio::test]
async fn a_queued_attempt_that_is_cancelled_is_reported_cancelled() {
    let (worker, mut rx) = start(Arc::new(Sleeper::default()), 1).await;
    for s in 0..4 {
        worker.cast(WorkerMsg::Run(alloc(s, &200u64))).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    worker
        .cast(WorkerMsg::Cancel {
            task: Uuid::from_u128(1),
            segment: 2,
            attempt: 1,
        })
        .unwrap();
    worker.cast(cancel(Some(3))).unwrap();
    let cancelled = |segment| WorkerEvent::Failed {
        allocation: (Uuid::from_u128(1), segment, 1),
        reason: "cancelled".into(),
    };
    let events = outcomes(&mut rx, 2).await;
    assert_eq!(events, vec![cancelled(2), cancelled(3)], "before 0 ends");
    let events = outcomes(&mut rx, 2).await;
    assert!(matches!(
        events[0],
        WorkerEvent::Done {
            allocation: (_, 0, 1),
            ..
        }
    ));
    assert!(matches!(
        events[1],
        WorkerEvent::Done {
            allocation: (_, 1, 1),
            ..
        }
    ));
}

#[tokio::test]
async fn input_that_does_not_decode_fails_the_attempt() {
    let (worker, mut rx) = start(Arc::new(Doubler), 1).await;
    worker
        .cast(WorkerMsg::Run(alloc(0, &"not a number")))
        .unwrap();
    match outcomes(&mut rx, 1).await.last() {
        Some(WorkerEvent::Failed { reason, .. }) => {
            assert!(reason.contains("does not decode"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_panic_fails_its_segment_and_the_replica_comes_back() {
    let (worker, mut rx) = start(Arc::new(Sleeper::default()), 1).await;
    worker.cast(WorkerMsg::Run(alloc(0, &u64::MAX))).unwrap();
    match outcomes(&mut rx, 1).await.last() {
        Some(WorkerEvent::Failed { reason, .. }) => {
            assert!(reason.contains("panicked"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The only replica was restarted: the next segment still runs.
    worker.cast(WorkerMsg::Run(alloc(1, &5u64))).unwrap();
    assert!(matches!(
        outcomes(&mut rx, 1).await.last(),
        Some(WorkerEvent::Done { .. })
    ));
}

#[tokio::test]
async fn a_replica_that_keeps_panicking_rests_and_its_allocations_are_refused_meanwhile() {
    let restarts = RestartPolicy {
        max_restarts: 1,
        window: Duration::from_secs(60),
        backoff: Duration::from_millis(10),
        rest: Duration::from_millis(400),
    };
    let (worker, mut rx) = start_with(Arc::new(Sleeper::default()), 1, restarts).await;

    // One panic is within the policy: degraded while the replica restarts, then ok.
    worker.cast(WorkerMsg::Run(alloc(0, &u64::MAX))).unwrap();
    assert!(matches!(next(&mut rx).await, WorkerEvent::Failed { .. }));
    assert_eq!(next(&mut rx).await, WorkerEvent::Health(Health::Degraded));
    assert_eq!(next(&mut rx).await, WorkerEvent::Health(Health::Ok));

    // A second panic within the window is one too many: the replica rests, the agent
    // is unhealthy, and the attempt queued behind the panicking one is refused, not
    // left waiting for a replica that is not there.
    worker.cast(WorkerMsg::Run(alloc(1, &u64::MAX))).unwrap();
    worker.cast(WorkerMsg::Run(alloc(2, &5u64))).unwrap();
    assert!(matches!(
        next(&mut rx).await,
        WorkerEvent::Failed {
            allocation: (_, 1, _),
            ..
        }
    ));
    match next(&mut rx).await {
        WorkerEvent::Refused {
            allocation: (_, 2, _),
            reason,
        } => assert!(reason.contains("rests"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(next(&mut rx).await, WorkerEvent::Health(Health::Unhealthy));

    // While it rests, a new allocation is refused at once.
    worker.cast(WorkerMsg::Run(alloc(3, &5u64))).unwrap();
    assert!(matches!(
        next(&mut rx).await,
        WorkerEvent::Refused {
            allocation: (_, 3, _),
            ..
        }
    ));

    // After its rest it is back, and works.
    assert_eq!(next(&mut rx).await, WorkerEvent::Health(Health::Ok));
    worker.cast(WorkerMsg::Run(alloc(4, &5u64))).unwrap();
    assert!(matches!(
        next(&mut rx).await,
        WorkerEvent::Done {
            allocation: (_, 4, _),
            ..
        }
    ));
}

#[tokio::test]
async fn one_replica_resting_leaves_the_agent_degraded_and_working() {
    let restarts = RestartPolicy {
        max_restarts: 0,
        window: Duration::from_secs(60),
        backoff: Duration::from_millis(10),
        rest: Duration::from_secs(60),
    };
    let (worker, mut rx) = start_with(Arc::new(Sleeper::default()), 2, restarts).await;
    worker.cast(WorkerMsg::Run(alloc(0, &u64::MAX))).unwrap();
    assert!(matches!(next(&mut rx).await, WorkerEvent::Failed { .. }));
    assert_eq!(next(&mut rx).await, WorkerEvent::Health(Health::Degraded));
    // The other replica takes the work.
    worker.cast(WorkerMsg::Run(alloc(1, &5u64))).unwrap();
    worker.cast(WorkerMsg::Run(alloc(2, &5u64))).unwrap();
    let ends = outcomes(&mut rx, 2).await;
    let done = ends
        .iter()
        .filter(|e| matches!(e, WorkerEvent::Done { .. }))
        .count();
    assert_eq!(done, 2, "{ends:?}");
}
