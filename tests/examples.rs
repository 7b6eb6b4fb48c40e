//! The examples run as a user would run them (`cargo run --example NAME`), and what
//! they print is checked: each starts a real in-process cluster on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use common::example;

fn run(name: &str, args: &[&str]) -> String {
    let out = example(name).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn rag_answers_from_the_documents_in_two_stages() {
    let out = run(
        "rag",
        &["How are lanes mapped onto QUIC streams by priority?"],
    );
    assert!(out.contains("stage 1: 12 chunks searched"), "{out}");
    assert!(out.contains("stage 2: summarized"), "{out}");
    let answer: Vec<&str> = out.lines().filter(|l| l.starts_with("A: ")).collect();
    assert!(!answer.is_empty(), "{out}");
    assert!(
        answer.iter().any(|a| a.to_lowercase().contains("lane")),
        "the answer is about lanes: {out}"
    );
}

#[test]
fn negotiation_bids_through_sync_and_closes_on_adjust() {
    let out = run("negotiation", &[]);
    // The ceiling (680) is under foundry's floor (700): it must withdraw; the others
    // must end at or under the ceiling and at or over their floors.
    assert!(out.contains("foundry  withdrew"), "{out}");
    let price = |who: &str| -> u64 {
        let line = out.lines().find(|l| l.starts_with(who)).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    assert!((640..=680).contains(&price("mill")), "{out}");
    assert!((610..=680).contains(&price("forge")), "{out}");
    // Bids went back and forth: more than one round before the close.
    assert!(out.contains("ADJUST close=now"), "{out}");
    assert!(!out.contains("after 1 rounds"), "{out}");
    assert!(out.contains("contract: "), "{out}");
}

#[test]
fn swarm_spreads_a_task_over_hundreds_of_agents() {
    let out = run("swarm", &["150", "600"]);
    assert!(out.contains("300 foragers registered on 2 nodes"), "{out}");
    assert!(out.contains("600 segments in"), "{out}");
    let worked: usize = out
        .lines()
        .find(|l| l.contains("foragers worked"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        worked >= 200,
        "the work spread over most of the swarm: {out}"
    );
    // The longest Collatz trail below 300,000 starts at 230,631 (442 steps).
    assert!(out.contains(": 230631 (442 steps)"), "{out}");
}
