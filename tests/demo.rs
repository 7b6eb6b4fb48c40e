//! `agentmesh demo`, the README's main job: three real node processes, one SIGKILLed
//! midway, every question answered, nothing lost, exit 0.
#![allow(clippy::unwrap_used)]

mod common;

use common::agentmesh;

#[test]
fn the_demo_kills_a_node_midway_and_loses_nothing() {
    let out = agentmesh()
        .args(["demo", "--questions", "4", "--segment-ms", "300"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(">>> SIGKILL n3"), "{stdout}");
    let figure = |name: &str| -> u64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} in {stdout}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(figure("tasks completed"), 8);
    assert_eq!(figure("segments lost"), 0);
    assert_eq!(figure("duplicates accepted"), 0);
    assert!(stdout.contains("metrics http://127.0.0.1:"));
    // Every question got an answer drawn from the documents.
    assert_eq!(stdout.matches("     (from ").count(), 4, "{stdout}");
}
