//! Replays of the shipped small workloads: the same seed gives the same event log
//! (digest), another seed another one; nothing is lost or accepted twice; and the
//! checkers stop a run at the first violated invariant.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use agentmesh_sims::check::REALLOCATED_IN_TIME;
use agentmesh_sims::{FaultSpec, Sim, SimConfig, Workload};

fn workload(name: &str) -> Workload {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("workloads")
        .join(format!("{name}.jsonl"));
    Workload::read(std::io::BufReader::new(std::fs::File::open(path).unwrap())).unwrap()
}

fn run(name: &str, config: SimConfig) -> (agentmesh_sims::Report, Vec<String>) {
    Sim::new(workload(name), config)
        .run(|_, _| {})
        .unwrap_or_else(|stopped| panic!("{stopped}"))
}

#[test]
fn the_same_workload_and_seed_give_a_byte_identical_event_log() {
    let config = SimConfig {
        seed: 7,
        keep_log: true,
        ..SimConfig::default()
    };
    let (a, log_a) = run("smoke", config.clone());
    let (b, log_b) = run("smoke", config.clone());
    assert_eq!(log_a, log_b);
    assert_eq!(a.digest, b.digest);
    assert!(a.events > 100, "{a:?}");
    // The digest folds each line's fields in whether or not the text is kept.
    let (unkept, none) = run(
        "smoke",
        SimConfig {
            keep_log: false,
            ..config.clone()
        },
    );
    assert!(none.is_empty());
    assert_eq!(unkept.digest, a.digest);
    let (c, _) = run("smoke", SimConfig { seed: 8, ..config });
    assert_ne!(a.digest, c.digest, "another seed, another run");
}

#[test]
fn the_smoke_run_loses_nothing_and_reallocates_the_crashed_nodes_segments() {
    let (r, _) = run("smoke", SimConfig::default());
    assert_eq!(r.tasks_submitted, 5);
    assert_eq!(r.tasks_completed, 5, "{r:?}");
    assert_eq!(r.lost, 0);
    assert_eq!(r.duplicates_accepted, 0);
    assert_eq!(r.crashes, 1);
    assert_eq!(r.panics, 1);
    assert!(r.reallocated > 0, "{r:?}");
    assert!(r.crash_reallocations > 0, "{r:?}");
    assert!(r.crash_to_realloc_p99_ms < 5_000.0, "{r:?}");
}

/// Nothing lost, nothing accepted twice, and every task submitted ended one way.
fn assert_every_task_ended_once(r: &agentmesh_sims::Report) {
    assert_eq!(r.lost, 0, "seed {}", r.seed);
    assert_eq!(r.duplicates_accepted, 0, "seed {}", r.seed);
    assert_eq!(
        r.tasks_completed + r.tasks_failed + r.tasks_lost_with_coordinator + r.tasks_refused,
        r.tasks_submitted,
        "seed {}: {} completed, {} failed, {} lost with their coordinator, {} refused",
        r.seed,
        r.tasks_completed,
        r.tasks_failed,
        r.tasks_lost_with_coordinator,
        r.tasks_refused
    );
}

#[test]
fn the_rag_burst_with_random_faults_keeps_every_invariant() {
    let faults: FaultSpec = "crash=0.05,partition=0.05,loss=1%,restart=1000ms"
        .parse()
        .unwrap();
    for seed in 1..=3 {
        let (r, _) = run(
            "rag",
            SimConfig {
                seed,
                faults,
                ..SimConfig::default()
            },
        );
        assert_every_task_ended_once(&r);
    }
}

/// Random agent panics (`panic=R`): segments fail mid-run, replicas restart or rest
/// under the restart policy, and every invariant holds; a run repeats byte for byte.
#[test]
fn random_agent_panics_keep_every_invariant_and_runs_repeat() {
    let faults: FaultSpec = "panic=0.5,crash=0.05,loss=2%,restart=300ms"
        .parse()
        .unwrap();
    for seed in 1..=3 {
        let config = SimConfig {
            seed,
            faults,
            keep_log: seed == 1,
            ..SimConfig::default()
        };
        let (r, log) = run("rag", config.clone());
        assert!(r.panics >= 50, "seed {seed}: {} panics", r.panics);
        assert_every_task_ended_once(&r);
        if seed == 1 {
            assert!(log
                .iter()
                .any(|l| l.contains("(fault)") && l.contains("panic")));
            let (_, again) = run("rag", config);
            assert_eq!(log, again);
        }
    }
}

#[test]
fn a_checker_stops_the_run_at_the_first_violation_with_seed_and_event() {
    // Failure detection takes hundreds of milliseconds: a 1 ms bound cannot hold.
    let stopped = Sim::new(
        workload("smoke"),
        SimConfig {
            seed: 3,
            realloc_bound_ms: 1,
            ..SimConfig::default()
        },
    )
    .run(|_, _| {})
    .unwrap_err();
    assert_eq!(stopped.violation.invariant, REALLOCATED_IN_TIME);
    assert_eq!(stopped.seed, 3);
    assert!(stopped.event > 0);
    let text = stopped.to_string();
    assert!(text.contains("seed 3") && text.contains("event"), "{text}");
}

/// Seeds under which the chaos run once broke "every segment of a dead node
/// reallocated within the bound": a coordinator declared down by mistake renewed its
/// identity, its first gossip went to members under identities they no longer had,
/// and it stayed out of the cluster, deaf to a later crash. Membership now announces
/// until it is back; this replays those schedules with every checker on.
#[test]
fn chaos_schedules_that_once_left_a_renewed_node_out_keep_every_invariant() {
    for seed in [11, 55] {
        let (r, _) = run(
            "chaos",
            SimConfig {
                seed,
                ..SimConfig::default()
            },
        );
        assert_eq!(r.lost, 0);
        assert_eq!(r.duplicates_accepted, 0);
        assert!(r.crash_reallocations > 0, "{r:?}");
    }
}

/// Schedules with fast restarts under which a crashed node's segments once waited for
/// good. With `restart=500ms` a node came back with the very identity its renewed
/// former self had, so no one saw the crash; with `restart=100ms` a coordinator that
/// had the node's agents (from its delta) but had not yet seen it up in membership
/// never got a "down" for that life. Now a new life outranks every earlier identity,
/// and the registry offers only agents of nodes membership reports up.
#[test]
fn fast_restarts_under_faults_leave_no_segment_of_a_dead_node_behind() {
    for (seed, faults) in [
        (20, "crash=0.05,partition=0.02,loss=10%,restart=500ms"),
        (23, "crash=0.1,restart=100ms"),
    ] {
        let (r, _) = run(
            "chaos",
            SimConfig {
                seed,
                faults: faults.parse().unwrap(),
                ..SimConfig::default()
            },
        );
        assert_eq!(r.lost, 0);
        assert_eq!(r.duplicates_accepted, 0);
        assert!(r.crashes > 10, "{r:?}");
    }
}

/// More work than agents: a crashed node's segments are taken back within the bound,
/// then wait their turn behind higher-priority work. Queueing behind busy agents is
/// not a violation (the checker used to stop this run at 9 s of simulated time).
#[test]
fn an_overloaded_cluster_reallocates_in_time_and_queues_the_rest() {
    let mut lines = vec![
        r#"{"agentmesh_workload":1,"name":"overload"}"#.to_string(),
        r#"{"t":0,"ev":"node_join","node":"a"}"#.to_string(),
        r#"{"t":0,"ev":"node_join","node":"b"}"#.to_string(),
        r#"{"t":0,"ev":"node_join","node":"c"}"#.to_string(),
    ];
    for node in ["a", "b", "c"] {
        lines.push(format!(
            r#"{{"t":100,"ev":"register","node":"{node}","agent_type":"w","capabilities":["work"],"count":2}}"#
        ));
    }
    // A long low-priority task takes all six agents; then 40 urgent segments queue.
    lines.push(
        r#"{"t":1000,"ev":"submit","node":"a","capability":"work","priority":0,"segments":6,"work_ms":10000}"#
            .to_string(),
    );
    for i in 0..4 {
        lines.push(format!(
            r#"{{"t":{},"ev":"submit","node":"a","capability":"work","priority":255,"segments":10,"work_ms":2000}}"#,
            2_000 + i
        ));
    }
    lines.push(r#"{"t":4000,"ev":"node_crash","node":"c"}"#.to_string());
    let workload = Workload::read(std::io::Cursor::new(lines.join("\n"))).unwrap();
    let (r, _) = Sim::new(workload, SimConfig::default())
        .run(|_, _| {})
        .unwrap_or_else(|stopped| panic!("{stopped}"));
    assert_eq!((r.lost, r.duplicates_accepted), (0, 0), "{r:?}");
    assert_eq!(r.tasks_completed, 5, "{r:?}");
    assert_eq!(r.crash_reallocations, 2, "{r:?}");
    assert!(r.crash_to_realloc_p99_ms < 5_000.0, "{r:?}");
    // The two low-priority segments waited for the urgent ones on the four agents left.
    assert!(r.crash_to_attempt_p50_ms > 15_000.0, "{r:?}");
}

/// Nodes a (the coordinator, no agents), b with a one-replica "fragile" agent that
/// panics six times in four seconds (more than the default restart policy allows), and
/// c, with, if `steady`, a one-replica agent of the same capability; one task of 20
/// segments of 100 ms.
fn fragile(steady: bool) -> Workload {
    let mut lines = vec![
        r#"{"agentmesh_workload":1,"name":"fragile"}"#.to_string(),
        r#"{"t":0,"ev":"node_join","node":"a"}"#.to_string(),
        r#"{"t":0,"ev":"node_join","node":"b"}"#.to_string(),
        r#"{"t":0,"ev":"node_join","node":"c"}"#.to_string(),
        r#"{"t":100,"ev":"register","node":"b","agent_type":"fragile","capabilities":["work"]}"#
            .to_string(),
    ];
    if steady {
        lines.push(
            r#"{"t":100,"ev":"register","node":"c","agent_type":"steady","capabilities":["work"]}"#
                .to_string(),
        );
    }
    lines.push(
        r#"{"t":1000,"ev":"submit","node":"a","capability":"work","segments":20,"work_ms":100}"#
            .to_string(),
    );
    // Each after the replica is back from the previous one's backoff (50 ms doubling).
    for t in [1100, 1200, 1400, 1700, 2200, 3100] {
        lines.push(format!(
            r#"{{"t":{t},"ev":"agent_panic","node":"b","agent_type":"fragile"}}"#
        ));
    }
    Workload::read(std::io::Cursor::new(lines.join("\n"))).unwrap()
}

#[test]
fn a_replica_that_keeps_panicking_rests_and_its_agent_gets_no_work_meanwhile() {
    let run = |steady| {
        Sim::new(fragile(steady), SimConfig::default())
            .run(|_, _| {})
            .unwrap_or_else(|stopped| panic!("{stopped}"))
            .0
    };
    // With another capable agent, the task goes on there: once the fragile agent is
    // unhealthy, coordinators offer it nothing (at most what crossed the news in flight
    // is refused unrun, at no attempt's cost).
    let r = run(true);
    assert_eq!((r.panics, r.replica_rests), (6, 1), "{r:?}");
    assert_eq!(
        (r.tasks_completed, r.lost, r.duplicates_accepted),
        (1, 0, 0),
        "{r:?}"
    );
    assert!(r.allocations_refused <= 2, "{r:?}");
    assert!(r.makespan_ms < 10_000.0, "{r:?}");
    // Alone, the fragile agent's task waits out the 30 s rest, then completes.
    let r = run(false);
    assert_eq!((r.panics, r.replica_rests), (6, 1), "{r:?}");
    assert_eq!(
        (r.tasks_completed, r.tasks_failed, r.lost),
        (1, 0, 0),
        "{r:?}"
    );
    assert!(r.makespan_ms > 30_000.0, "{r:?}");
}
