//! `agentmesh sim`: a shipped workload replays with the figures the issue asks for,
//! twice to the same digest; a bad workload or a bad argument is refused with exit 2.
#![allow(clippy::unwrap_used)]

mod common;

use common::{agentmesh, temp_dir};
use serde_json::Value;

fn sim_json(args: &[&str]) -> Value {
    let out = agentmesh().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_shipped_workload_replays_to_the_same_digest_with_its_figures() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/sims/workloads/smoke.jsonl");
    let a = sim_json(&["sim", "run", file, "--json", "--seed", "5"]);
    for key in [
        "lost",
        "duplicates_accepted",
        "reallocated",
        "events",
        "events_per_sec",
        "digest",
    ] {
        assert!(!a[key].is_null(), "{key} missing: {a}");
    }
    assert_eq!(a["lost"], 0);
    assert_eq!(a["duplicates_accepted"], 0);
    let b = sim_json(&["sim", "run", file, "--json", "--seed", "5"]);
    assert_eq!(a["digest"], b["digest"]);
    let c = sim_json(&[
        "sim", "run", file, "--json", "--seed", "5", "--faults", "loss=5%",
    ]);
    assert_ne!(a["digest"], c["digest"]);
}

#[test]
fn bad_workloads_and_arguments_exit_2_with_the_reason() {
    let dir = temp_dir("sim-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"agentmesh_workload\":1,\"name\":\"x\"}\n{\"t\":0,\"ev\":\"node_crash\",\"node\":\"ghost\"}\n",
    )
    .unwrap();
    let smoke = concat!(env!("CARGO_MANIFEST_DIR"), "/sims/workloads/smoke.jsonl");
    for (args, expected) in [
        (vec!["sim", "run", bad.to_str().unwrap()], "line 2"),
        (vec!["sim", "run", "/nonexistent.jsonl"], "cannot open"),
        (
            vec!["sim", "run", smoke, "--faults", "crash=7"],
            "not a chance",
        ),
        (vec!["sim", "gen", "everything"], "no workload kind"),
        (
            vec!["sim", "run", smoke, "--report", "/tmp/x.png"],
            "must name an .svg file",
        ),
    ] {
        let out = agentmesh().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_report_draws_completions_with_crash_markers_and_latency_by_priority() {
    let dir = temp_dir("sim-report");
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("smoke.svg");
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/sims/workloads/smoke.jsonl");
    let r = sim_json(&[
        "sim",
        "run",
        file,
        "--json",
        "--report",
        svg.to_str().unwrap(),
    ]);
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(
        drawn.starts_with("<svg"),
        "{}",
        &drawn[..drawn.len().min(200)]
    );
    assert!(drawn.contains("segments completed"));
    // The legend names each crash count and each priority class that completed tasks.
    let crashes = r["crashes"].as_u64().unwrap();
    assert!(crashes > 0, "the smoke workload crashes a node");
    assert!(drawn.contains(&format!("{crashes} node crashes")));
    for (class, l) in r["latency_by_priority"].as_object().unwrap() {
        assert!(
            drawn.contains(&format!("{class}: {} tasks", l["tasks"])),
            "{class} missing from the chart"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
