//! The allocation ledger, transition by transition, and its exactly-once invariants
//! under arbitrary interleavings of results, copies, failures, crashes and timeouts.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};

use agentmesh_actors::ledger::{
    Candidate, Candidates, CandidatesBuilder, Ledger, LedgerConfig, LedgerOutput, Rank,
    ResultVerdict, TaskFigures,
};
use proptest::prelude::*;
use uuid::Uuid;

fn worker(agent: u32, node: &str, capacity: u32) -> Candidate {
    Candidate {
        agent,
        node: node.into(),
        capacity,
        load: 0,
    }
}

fn drain(l: &mut Ledger) -> Vec<LedgerOutput> {
    std::iter::from_fn(|| l.poll()).collect()
}

/// (segment, attempt, agent) of every ALLOCATE in `out`.
fn allocations(out: &[LedgerOutput]) -> Vec<(u32, u32, u32)> {
    out.iter()
        .filter_map(|o| match o {
            LedgerOutput::Allocate {
                segment,
                attempt,
                agent,
                ..
            } => Some((*segment, *attempt, *agent)),
            _ => None,
        })
        .collect()
}

fn task() -> Uuid {
    Uuid::from_u128(0xfeed)
}

#[test]
fn a_task_is_split_across_workers_and_completes_once_with_results_in_order() {
    let mut l = Ledger::new(LedgerConfig::default(), 1);
    let workers = [worker(1, "a", 4), worker(2, "b", 4), worker(3, "c", 4)];
    l.submit(task(), 6, 0).unwrap();
    l.assign(task(), &workers, 0);
    let allocs = allocations(&drain(&mut l));
    assert_eq!(allocs.len(), 6);
    let used: BTreeSet<u32> = allocs.iter().map(|a| a.2).collect();
    assert!(
        used.len() >= 2,
        "power of two choices spreads the load: {allocs:?}"
    );
    for (segment, attempt, _) in &allocs {
        assert_eq!(*attempt, 1);
        let verdict = l.handle_result(task(), *segment, *attempt, vec![*segment as u8]);
        assert_eq!(verdict, ResultVerdict::Accepted);
    }
    let out = drain(&mut l);
    assert_eq!(
        out,
        vec![LedgerOutput::TaskCompleted {
            task: task(),
            results: (0..6).map(|i| vec![i]).collect(),
            figures: TaskFigures {
                segments: 6,
                completed: 6,
                duplicates_discarded: 0,
                reallocated: 0
            }
        }]
    );
    assert_eq!(
        l.handle_result(task(), 0, 1, vec![9]),
        ResultVerdict::UnknownTask
    );
    assert_eq!(l.open_tasks(), 0);
}

#[test]
fn a_copy_of_a_result_is_counted_and_discarded() {
    let mut l = Ledger::new(LedgerConfig::default(), 1);
    l.submit(task(), 2, 0).unwrap();
    l.assign(task(), &[worker(1, "a", 4)], 0);
    drain(&mut l);
    assert_eq!(
        l.handle_result(task(), 0, 1, vec![1]),
        ResultVerdict::Accepted
    );
    assert_eq!(
        l.handle_result(task(), 0, 1, vec![1]),
        ResultVerdict::Duplicate
    );
    assert_eq!(l.figures(task()).unwrap().duplicates_discarded, 1);
    assert_eq!(l.stats().duplicates_discarded, 1);
    assert_eq!(l.stats().segments_completed, 1);
}

#[test]
fn a_failed_attempt_is_reallocated_and_too_many_failures_fail_the_task() {
    let config = LedgerConfig {
        max_attempts: 2,
        breaker_failures: 100,
        ..LedgerConfig::default()
    };
    let mut l = Ledger::new(config, 1);
    let workers = [worker(1, "a", 4), worker(2, "b", 4)];
    l.submit(task(), 1, 0).unwrap();
    l.assign(task(), &workers, 0);
    let first = allocations(&drain(&mut l))[0];
    l.handle_failure(task(), 0, first.1, "agent panicked", 10);
    assert_eq!(l.figures(task()).unwrap().reallocated, 1);
    l.assign(task(), &workers, 10);
    let second = allocations(&drain(&mut l))[0];
    assert_eq!(second.1, 2, "attempt numbers go up");
    l.handle_failure(task(), 0, second.1, "agent panicked", 20);
    match drain(&mut l).as_slice() {
        [LedgerOutput::TaskFailed { reason, .. }] => {
            assert!(reason.contains("2 attempts"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_dead_nodes_segments_are_reallocated_and_its_late_result_still_counts_once() {
    let mut l = Ledger::new(LedgerConfig::default(), 1);
    l.submit(task(), 1, 0).unwrap();
    l.assign(task(), &[worker(1, "dead", 4)], 0);
    let on_dead = allocations(&drain(&mut l))[0];
    assert_eq!(l.handle_node_down("dead", 100), 1, "attempts it held");
    assert_eq!(l.stats().reallocated, 1);
    assert_eq!(l.handle_node_down("idle", 100), 0);
    l.assign(task(), &[worker(2, "alive", 4)], 100);
    let on_alive = allocations(&drain(&mut l))[0];
    assert_eq!((on_alive.1, on_alive.2), (2, 2));
    // The "dead" node had finished after all: its result arrives late, and counts.
    assert_eq!(
        l.handle_result(task(), 0, on_dead.1, b"late".to_vec()),
        ResultVerdict::Accepted
    );
    let out = drain(&mut l);
    assert!(
        out.contains(&LedgerOutput::Cancel {
            task: task(),
            segment: 0,
            attempt: 2,
            agent: 2,
            node: "alive".into()
        }),
        "{out:?}"
    );
    assert!(out.iter().any(|o| matches!(o,
        LedgerOutput::TaskCompleted { task: t, results, figures }
            if *t == task() && results == &vec![b"late".to_vec()] && figures.completed == 1
    )));
    // The cancelled attempt answers anyway: a duplicate, not a second completion.
    assert_eq!(
        l.handle_result(task(), 0, 2, b"again".to_vec()),
        ResultVerdict::UnknownTask
    );
}

#[test]
fn a_result_from_an_earlier_attempt_wins_and_the_later_one_is_cancelled() {
    let config = LedgerConfig {
        segment_timeout_ms: 1_000,
        ..LedgerConfig::default()
    };
    let mut l = Ledger::new(config, 1);
    l.submit(task(), 2, 0).unwrap();
    l.assign(task(), &[worker(1, "a", 1), worker(2, "b", 1)], 0);
    let allocs = allocations(&drain(&mut l));
    let slow = allocs.iter().find(|a| a.0 == 0).copied().unwrap();
    assert_eq!(l.next_wakeup_ms(), Some(1_000));
    l.handle_timeout(1_000);
    l.handle_result(task(), 1, 1, vec![1]);
    drain(&mut l);
    l.assign(task(), &[worker(1, "a", 1), worker(2, "b", 1)], 1_000);
    let retry = allocations(&drain(&mut l))[0];
    assert_eq!(retry.1, 2);
    assert_eq!(
        l.handle_result(task(), 0, slow.1, vec![0]),
        ResultVerdict::Accepted
    );
    let out = drain(&mut l);
    assert!(
        out.iter()
            .any(|o| matches!(o, LedgerOutput::Cancel { attempt: 2, .. })),
        "{out:?}"
    );
    assert!(out
        .iter()
        .any(|o| matches!(o, LedgerOutput::TaskCompleted { .. })));
}

/// Settings where `failures` failures in a row shut a worker out for 1 s, with
/// attempts enough never to fail a task.
fn breaker_after(failures: u32) -> LedgerConfig {
    LedgerConfig {
        breaker_failures: failures,
        breaker_cooldown_ms: 1_000,
        max_attempts: 100,
        ..LedgerConfig::default()
    }
}

#[test]
fn a_worker_that_keeps_failing_is_skipped_for_a_while() {
    let mut l = Ledger::new(breaker_after(2), 1);
    let bad = worker(1, "a", 10);
    let good = worker(2, "b", 10);
    // Two failures in a row trip the bad worker's breaker.
    let first = Uuid::from_u128(1);
    l.submit(first, 1, 0).unwrap();
    for now in [0, 1] {
        l.assign(first, std::slice::from_ref(&bad), now);
        let a = allocations(&drain(&mut l))[0];
        l.handle_failure(first, 0, a.1, "error", now);
    }
    // While it is open, work offered to both goes to the good one only.
    let second = Uuid::from_u128(2);
    l.submit(second, 5, 2).unwrap();
    l.assign(second, &[bad.clone(), good.clone()], 2);
    let allocs = allocations(&drain(&mut l));
    assert_eq!(allocs.len(), 5);
    assert!(allocs.iter().all(|a| a.2 == 2), "{allocs:?}");
    // After the cooldown it is offered work again.
    let third = Uuid::from_u128(3);
    l.submit(third, 1, 1_002).unwrap();
    l.assign(third, std::slice::from_ref(&bad), 1_002);
    assert_eq!(allocations(&drain(&mut l))[0].2, 1);
}

#[test]
fn a_list_keeps_each_workers_node_however_the_nodes_come() {
    // Nodes interleaved, by name and by shared name: each ALLOCATE names the node the
    // worker was listed with, and the list reads back as it was built.
    let (a, b): (std::sync::Arc<str>, std::sync::Arc<str>) = ("a".into(), "b".into());
    let mut builder = CandidatesBuilder::with_capacity(6);
    builder.push(1, &a, 1, 0);
    builder.push_named(2, "b", 1, 0);
    builder.push(3, &a, 1, 0);
    builder.push(4, &b, 1, 0);
    builder.push_named(5, "c", 1, 0);
    builder.push_named(6, "a", 1, 0);
    let list = builder.build();
    let node_of = |agent: u32| ["a", "b", "a", "b", "c", "a"][agent as usize - 1];
    let listed: Vec<(u32, String)> = list.iter().map(|c| (c.agent, c.node.to_string())).collect();
    let expected: Vec<(u32, String)> = (1..=6).map(|a| (a, node_of(a).to_string())).collect();
    assert_eq!(listed, expected);
    assert_eq!(list.len(), 6);

    let mut l = Ledger::new(LedgerConfig::default(), 3);
    l.submit(task(), 6, 0).unwrap();
    l.assign_from(task(), &list, 0);
    let mut placed: Vec<(u32, String)> = drain(&mut l)
        .into_iter()
        .filter_map(|o| match o {
            LedgerOutput::Allocate { agent, node, .. } => Some((agent, node.to_string())),
            _ => None,
        })
        .collect();
    placed.sort();
    assert_eq!(placed, expected, "one segment on each worker of capacity 1");
}

#[test]
fn a_list_taken_back_for_the_next_one_starts_empty() {
    let stale = Candidates::new(vec![worker(1, "a", 1), worker(2, "b", 1)]);
    let held = stale.clone();
    // Still held elsewhere: a new builder; held by none: its memory. Empty either way.
    for stale in [stale, held] {
        let mut next = stale.into_builder();
        next.push_named(3, "c", 2, 1);
        next.push_named(4, "a", 1, 0);
        let list = next.build();
        let listed: Vec<(u32, String, u32, u32)> = list
            .iter()
            .map(|c| (c.agent, c.node.to_string(), c.capacity, c.load))
            .collect();
        assert_eq!(
            listed,
            vec![(3, "c".to_string(), 2, 1), (4, "a".to_string(), 1, 0)]
        );
    }
}

#[test]
fn a_shared_list_seen_full_still_finds_workers_freed_or_let_back_in_later() {
    let mut l = Ledger::new(breaker_after(1), 7);
    let list = Candidates::new(vec![worker(1, "a", 1), worker(2, "b", 1)]);
    let (first, second) = (Uuid::from_u128(1), Uuid::from_u128(2));
    l.submit(first, 3, 0).unwrap();
    l.submit(second, 1, 0).unwrap();
    l.assign_from(first, &list, 0);
    let running = allocations(&drain(&mut l));
    assert_eq!(running.len(), 2, "two workers of capacity 1: {running:?}");
    // Full: the second task gets nothing in the same round.
    l.assign_from(second, &list, 0);
    assert!(allocations(&drain(&mut l)).is_empty());
    // A result frees worker 1 within the same millisecond: it is found again.
    let (segment, attempt, agent) = running[0];
    l.handle_result(first, segment, attempt, vec![]);
    drain(&mut l);
    l.assign_from(second, &list, 0);
    assert_eq!(allocations(&drain(&mut l)), vec![(0, 1, agent)]);
    // A failure frees worker 2 but opens its breaker: not offered work until the
    // breaker closes, then offered work although nothing else changed.
    let (segment, attempt, other) = running[1];
    l.handle_failure(first, segment, attempt, "error", 10);
    drain(&mut l);
    l.assign_from(first, &list, 10);
    assert!(allocations(&drain(&mut l)).is_empty());
    l.assign_from(first, &list, 500);
    assert!(allocations(&drain(&mut l)).is_empty());
    l.assign_from(first, &list, 1_010);
    assert_eq!(allocations(&drain(&mut l))[0].2, other);
}

/// A task waits for a worker as long as one of its segments runs (that one ends or
/// times out); one that gets no worker at all fails after `max_wait_ms` if no capable
/// one is at work: here the only one is busy, but its last two attempts here failed
/// (a busy worker that has not failed here since its last success keeps a task waiting
/// however long: `ledger::tests::a_task_queued_behind_work_waits_for_it`). Its running
/// attempts are cancelled.
#[test]
fn capacity_is_respected_and_the_rest_waits_then_fails_if_nothing_frees_up() {
    let config = LedgerConfig {
        max_wait_ms: 500,
        ..LedgerConfig::default()
    };
    let mut l = Ledger::new(config, 1);
    let one = [worker(1, "a", 2)];
    l.submit(task(), 5, 0).unwrap();
    l.assign(task(), &one, 0);
    let allocs = allocations(&drain(&mut l));
    assert_eq!(allocs.len(), 2, "capacity 2");
    for a in &allocs {
        l.handle_result(task(), a.0, a.1, vec![]);
    }
    l.assign(task(), &one, 100);
    let running = allocations(&drain(&mut l));
    assert_eq!(running.len(), 2);
    // Nothing finishes; the fifth segment waits, past `max_wait_ms` too, while the two
    // attempts run.
    l.assign(task(), &one, 400);
    assert!(drain(&mut l).is_empty());
    l.assign(task(), &one, 700);
    assert!(drain(&mut l).is_empty());
    // One attempt fails; the worker is busy with other work from then on, and fails
    // here again below: it is not counted at work.
    l.handle_failure(task(), running[0].0, running[0].1, "worker stopped", 800);
    let _ = drain(&mut l);
    let busy = [Candidate {
        load: 2,
        ..worker(1, "a", 2)
    }];
    l.assign(task(), &busy, 800);
    assert!(drain(&mut l).is_empty(), "one attempt still runs");
    // The other ends too, by timing out say: from then on nothing of the task runs.
    l.handle_failure(task(), running[1].0, running[1].1, "timed out", 900);
    let _ = drain(&mut l);
    l.assign(task(), &busy, 900);
    l.assign(task(), &busy, 1_300);
    assert!(drain(&mut l).is_empty(), "waited 400 ms");
    l.assign(task(), &busy, 1_400);
    let out = drain(&mut l);
    assert!(
        matches!(out.last(), Some(LedgerOutput::TaskFailed { reason, .. }) if reason.contains("no capable agent was free")),
        "{out:?}"
    );
}

#[test]
fn no_capable_agent_fails_the_task_at_once() {
    let mut l = Ledger::new(LedgerConfig::default(), 1);
    l.submit(task(), 3, 0).unwrap();
    l.assign(task(), &[], 0);
    match drain(&mut l).as_slice() {
        [LedgerOutput::TaskFailed { reason, .. }] => assert!(reason.contains("no agent offers")),
        other => panic!("{other:?}"),
    }
    assert_eq!(l.open_tasks(), 0);
}

#[test]
fn a_task_that_ran_waits_for_its_vanished_workers_then_fails_with_a_reason() {
    let config = LedgerConfig {
        max_wait_ms: 500,
        ..LedgerConfig::default()
    };
    let mut l = Ledger::new(config, 1);
    l.submit(task(), 4, 0).unwrap();
    l.assign(task(), &[worker(1, "far", 4)], 0);
    assert_eq!(allocations(&drain(&mut l)).len(), 4);
    // A partition cuts the coordinator off from every capable agent: their node is
    // down, its segments are pending again, and nobody is offered.
    l.handle_node_down("far", 100);
    drain(&mut l);
    l.no_candidates(task(), "sleep", false, 100);
    l.no_candidates(task(), "sleep", false, 550);
    assert!(
        drain(&mut l).is_empty(),
        "it waits: the task has run before"
    );
    assert_eq!(l.open_tasks(), 1);
    // The partition heals within the wait: the segments go out again.
    l.assign(task(), &[worker(1, "far", 4)], 560);
    assert_eq!(allocations(&drain(&mut l)).len(), 4);

    // Cut off again, and for longer than the wait: the task fails, and says why.
    l.handle_node_down("far", 1_000);
    drain(&mut l);
    l.no_candidates(task(), "sleep", false, 1_499);
    assert!(drain(&mut l).is_empty());
    l.no_candidates(task(), "sleep", false, 1_500);
    match drain(&mut l).as_slice() {
        [LedgerOutput::TaskFailed { reason, .. }] => {
            assert!(reason.contains("came back within 500 ms"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(l.open_tasks(), 0);
}

#[test]
fn the_retry_budget_defers_retries_beyond_its_ratio_and_floor() {
    let config = LedgerConfig {
        retry_ratio_permille: 0,
        retry_floor_per_sec: 1,
        breaker_failures: 1_000,
        max_attempts: 1_000,
        ..LedgerConfig::default()
    };
    let mut l = Ledger::new(config, 1);
    let w = [worker(1, "a", 1_000)];
    l.submit(task(), 1, 0).unwrap();
    l.assign(task(), &w, 0);
    let mut attempt = allocations(&drain(&mut l))[0].1;
    // A floor of 1/s over a 10 s window: 10 retries, then deferral.
    let mut retried = 0;
    for now in 1..50 {
        l.handle_failure(task(), 0, attempt, "error", now);
        l.assign(task(), &w, now);
        match allocations(&drain(&mut l)).first() {
            Some(a) => {
                attempt = a.1;
                retried += 1;
            }
            None => break,
        }
    }
    assert_eq!(retried, 10);
    assert!(l.stats().retries_deferred >= 1);
}

#[test]
fn a_dead_nodes_segments_are_reallocated_even_with_the_retry_budget_spent() {
    let config = LedgerConfig {
        retry_ratio_permille: 0,
        retry_floor_per_sec: 0,
        ..LedgerConfig::default()
    };
    let mut l = Ledger::new(config, 1);
    l.submit(task(), 40, 0).unwrap();
    l.assign(task(), &[worker(1, "a", 100)], 0);
    assert_eq!(allocations(&drain(&mut l)).len(), 40);
    l.handle_node_down("a", 10);
    l.assign(task(), &[worker(2, "b", 100)], 10);
    let again = allocations(&drain(&mut l));
    assert_eq!(again.len(), 40, "{again:?}");
    assert!(again
        .iter()
        .all(|(_, attempt, agent)| *attempt == 2 && *agent == 2));
    assert_eq!(l.stats().retries_deferred, 0);
}

#[test]
fn power_of_two_choices_over_many_candidates_prefers_the_less_loaded() {
    let mut l = Ledger::new(LedgerConfig::default(), 7);
    // 1,000 workers, half of them nearly full: the picks land on the idle half far
    // more often than a uniform draw would (half).
    let workers: Vec<Candidate> = (1..=1_000)
        .map(|a| Candidate {
            load: if a % 2 == 0 { 9 } else { 0 },
            ..worker(a, "n", 10)
        })
        .collect();
    l.submit(task(), 400, 0).unwrap();
    l.assign(task(), &workers, 0);
    let allocs = allocations(&drain(&mut l));
    assert_eq!(allocs.len(), 400);
    let idle = allocs.iter().filter(|a| a.2 % 2 == 1).count();
    assert!(idle > 260, "{idle} of 400 on idle workers");
}

#[test]
fn submissions_are_checked() {
    let mut l = Ledger::new(LedgerConfig::default(), 1);
    assert!(l.submit(task(), 0, 0).is_err());
    l.submit(task(), 1, 0).unwrap();
    assert!(l.submit(task(), 1, 0).is_err());
}

/// Every task a round gives, in order, driving nothing between steps.
fn round(l: &Ledger) -> Vec<Uuid> {
    let mut round = l.service_round();
    std::iter::from_fn(|| round.next(l)).collect()
}

#[test]
fn a_round_gives_the_waiting_tasks_by_priority_then_age_across_classes() {
    let mut l = Ledger::new(LedgerConfig::default(), 1);
    let id = |n: u128| Uuid::from_u128(n);
    // (task, class, priority, since)
    let tasks = [
        (1, 7, 128, 30),
        (2, 9, 200, 40),
        (3, 7, 128, 10),
        (4, 9, 128, 10), // same priority and age as 3: the lower id first
        (5, 7, 255, 50),
        (6, 8, 0, 0),
    ];
    for (task, class, priority, since) in tasks {
        l.submit(id(task), 1, 0).unwrap();
        l.set_rank(
            id(task),
            Rank {
                class,
                priority,
                since,
            },
        );
    }
    assert_eq!(round(&l), [5, 2, 3, 4, 1, 6].map(id));
    // A priority raised later moves the task; one given a worker leaves the round.
    l.set_rank(
        id(6),
        Rank {
            class: 8,
            priority: 255,
            since: 0,
        },
    );
    l.assign(id(5), &[worker(1, "a", 1)], 0);
    assert_eq!(round(&l), [6, 2, 3, 4, 1].map(id));
}

/// After a result frees one worker, a round that leaves out the rest of a class once a
/// task of it finds the list full looks at a few tasks, not at all that wait: with a
/// round after every result, looking at every waiting task made many small tasks cost
/// their number squared.
#[test]
fn a_round_that_skips_a_full_class_looks_at_few_of_many_waiting_tasks() {
    let mut l = Ledger::new(LedgerConfig::default(), 1);
    let (busy, other) = (1, 2);
    let workers = Candidates::new((1..=4).map(|a| worker(a, "a", 1)));
    let others = Candidates::new([worker(10, "b", 1)]);
    let id = |n: u128| Uuid::from_u128(n);
    for n in 0..5_000u128 {
        l.submit(id(n), 1, 0).unwrap();
        l.set_rank(
            id(n),
            Rank {
                class: busy,
                priority: 128,
                since: n as u64,
            },
        );
    }
    for n in [100_000, 100_001] {
        l.submit(id(n), 1, 0).unwrap();
        l.set_rank(
            id(n),
            Rank {
                class: other,
                priority: 0,
                since: 0,
            },
        );
    }
    let list = |task: Uuid| {
        if task.as_u128() >= 100_000 {
            &others
        } else {
            &workers
        }
    };
    // A whole round: every waiting task is looked at, and the first ones get workers.
    let mut round = l.service_round();
    let mut looked = 0;
    while let Some(task) = round.next(&l) {
        looked += 1;
        l.assign_from(task, list(task), 0);
    }
    assert_eq!(looked, 5_002);
    let started: Vec<LedgerOutput> = drain(&mut l);
    let running: Vec<Uuid> = started
        .iter()
        .filter_map(|o| match o {
            LedgerOutput::Allocate { task, .. } => Some(*task),
            _ => None,
        })
        .collect();
    assert_eq!(running, [0, 1, 2, 3, 100_000].map(id));
    assert_eq!(l.waiting_tasks(), 5_002 - 5);
    // One result frees one worker: the next task in order gets it, the one after finds
    // the list full, and so does the other class's; the round ends there.
    let attempt = |task: Uuid| {
        started.iter().find_map(|o| match o {
            LedgerOutput::Allocate {
                task: t, attempt, ..
            } if *t == task => Some(*attempt),
            _ => None,
        })
    };
    l.handle_result(id(2), 0, attempt(id(2)).unwrap(), Vec::new());
    drain(&mut l);
    let mut round = l.service_round();
    let mut looked = Vec::new();
    while let Some(task) = round.next(&l) {
        looked.push(task);
        if l.assign_from(task, list(task), 0) {
            round.skip_class();
        }
    }
    assert_eq!(looked, [4, 5, 100_001].map(id));
    assert_eq!(allocations(&drain(&mut l)).len(), 1);
    assert!(!l.has_pending(id(4)) && l.has_pending(id(5)));
}

#[derive(Clone, Debug)]
enum Step {
    Assign,
    AssignShared,
    Result { pick: usize },
    Copy { pick: usize },
    Fail { pick: usize },
    NodeDown { node: usize },
    Tick { ms: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => Just(Step::Assign),
        2 => Just(Step::AssignShared),
        4 => any::<usize>().prop_map(|pick| Step::Result { pick }),
        2 => any::<usize>().prop_map(|pick| Step::Copy { pick }),
        2 => any::<usize>().prop_map(|pick| Step::Fail { pick }),
        1 => (0usize..3).prop_map(|node| Step::NodeDown { node }),
        2 => (0u64..2_000).prop_map(|ms| Step::Tick { ms }),
    ]
}

proptest! {
    /// Whatever happens, a segment's result is accepted at most once, a task completes
    /// at most once and only with every segment, and nothing is lost: every open task
    /// still has its segments accounted for. The waiting list agrees with `has_pending`,
    /// and the next wake-up is the earliest deadline of an attempt still running.
    #[test]
    fn results_are_accepted_exactly_once(seed in any::<u64>(), segments in 1u32..8, steps in proptest::collection::vec(step(), 1..120)) {
        let config = LedgerConfig { segment_timeout_ms: 500, max_attempts: 1_000, breaker_failures: 1_000, retry_floor_per_sec: 1_000, ..LedgerConfig::default() };
        let mut l = Ledger::new(config, seed);
        let nodes = ["n0", "n1", "n2"];
        let workers: Vec<Candidate> = (0..3).map(|i| worker(i as u32 + 1, nodes[i], 1)).collect();
        let shared = Candidates::new(workers.clone());
        let mut held: Vec<LedgerOutput> = Vec::new();
        l.submit(task(), segments, 0).unwrap();
        let mut now = 0u64;
        let mut issued: Vec<(u32, u32)> = Vec::new();
        let mut started: HashMap<(u32, u32), u64> = HashMap::new();
        let mut delivered: Vec<(u32, u32)> = Vec::new();
        let mut accepted: HashMap<u32, u32> = HashMap::new();
        let mut completions = 0;
        for s in steps {
            match s {
                Step::Assign => l.assign(task(), &workers, now),
                Step::AssignShared => {
                    // The shared list may skip looking at workers it saw busy, never
                    // at one that is free: a full look right after finds nothing more.
                    l.assign_from(task(), &shared, now);
                    held.extend(std::iter::from_fn(|| l.poll()));
                    l.assign(task(), &workers, now);
                    let more: Vec<LedgerOutput> = std::iter::from_fn(|| l.poll()).collect();
                    prop_assert!(!more.iter().any(|o| matches!(o, LedgerOutput::Allocate { .. })), "a free worker was missed: {:?}", more);
                    held.extend(more);
                }
                Step::Result { pick } if !issued.is_empty() => {
                    let (seg, att) = issued[pick % issued.len()];
                    delivered.push((seg, att));
                    if l.handle_result(task(), seg, att, vec![seg as u8]) == ResultVerdict::Accepted {
                        *accepted.entry(seg).or_default() += 1;
                    }
                }
                Step::Copy { pick } if !delivered.is_empty() => {
                    let (seg, att) = delivered[pick % delivered.len()];
                    prop_assert_ne!(l.handle_result(task(), seg, att, vec![seg as u8]), ResultVerdict::Accepted);
                }
                Step::Fail { pick } if !issued.is_empty() => {
                    let (seg, att) = issued[pick % issued.len()];
                    l.handle_failure(task(), seg, att, "error", now);
                }
                Step::NodeDown { node } => {
                    l.handle_node_down(nodes[node], now);
                }
                Step::Tick { ms } => {
                    now += ms;
                    l.handle_timeout(now);
                }
                _ => {}
            }
            prop_assert_eq!(l.waiting().collect::<Vec<_>>(), if l.has_pending(task()) { vec![task()] } else { vec![] });
            let outs: Vec<LedgerOutput> = held.drain(..).chain(std::iter::from_fn(|| l.poll())).collect();
            for out in outs {
                match out {
                    LedgerOutput::Allocate { segment, attempt, .. } => {
                        issued.push((segment, attempt));
                        started.insert((segment, attempt), now);
                    }
                    LedgerOutput::TaskCompleted { results, .. } => {
                        completions += 1;
                        prop_assert_eq!(results.len() as u32, segments);
                        prop_assert_eq!(accepted.len() as u32, segments);
                    }
                    _ => {}
                }
            }
            let earliest = l.live_attempts(task()).iter().map(|(s, a, _, _)| started[&(*s, *a)] + 500).min();
            prop_assert_eq!(l.next_wakeup_ms(), earliest);
        }
        prop_assert!(accepted.values().all(|n| *n == 1), "accepted twice: {:?}", accepted);
        prop_assert!(completions <= 1);
        if completions == 0 {
            let f = l.figures(task()).unwrap();
            prop_assert_eq!(f.completed as usize, accepted.len());
        }
    }
}
