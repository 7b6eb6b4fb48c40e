//! `agentmesh bench transport`, and `bench failover` and `bench scale` (the two
//! benchmarks `benches/run.sh` takes from the binary), and `bench tasks`: small runs
//! that must report what they measured, and lose nothing.
#![allow(clippy::unwrap_used)]

mod common;

use common::agentmesh;

fn json(args: &[&str]) -> serde_json::Value {
    let out = agentmesh().args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn failover_times_the_reallocation_of_a_killed_nodes_segments() {
    let f = json(&[
        "bench",
        "failover",
        "--runs",
        "2",
        "--replicas",
        "2",
        "--segment-ms",
        "600",
        "--json",
    ]);
    assert_eq!(f["runs"], 2);
    assert_eq!(f["lost"], 0);
    assert_eq!(f["samples_ms"].as_array().unwrap().len(), 2);
    // The victim held at least one segment in each timed run, and each was reallocated.
    assert!(f["segments_reallocated"].as_u64().unwrap() >= 2, "{f}");
    let (p50, max) = (f["p50_ms"].as_f64().unwrap(), f["max_ms"].as_f64().unwrap());
    // Detection runs on SWIM timers of a few hundred ms: never instant, never the
    // 3 s QUIC idle timeout on a healthy machine. Generous bounds: CI is shared.
    assert!(p50 > 50.0 && p50 <= max && max < 30_000.0, "{f}");
}

#[test]
fn scale_registers_every_agent_and_reports_its_cost() {
    let f = json(&["bench", "scale", "--agents", "300", "--json"]);
    assert_eq!(f["agents"], 300);
    assert!(f["registrations_per_sec"].as_f64().unwrap() > 0.0, "{f}");
    assert!(f["bytes_per_idle_agent"].as_f64().unwrap() > 0.0, "{f}");
}

#[test]
fn tasks_submitted_at_once_all_complete_and_their_cost_is_reported() {
    let f = json(&[
        "bench",
        "tasks",
        "--tasks",
        "200",
        "--nodes",
        "2",
        "--replicas",
        "8",
        "--json",
    ]);
    assert_eq!(f["workers"], 16);
    assert_eq!(f["baseline"]["tasks"], 20);
    assert_eq!(f["baseline"]["completed"], 20);
    assert_eq!(f["large"]["completed"], 200);
    assert!(f["per_task_ratio"].as_f64().unwrap() > 0.0, "{f}");
}

#[test]
fn bad_arguments_are_refused_with_a_usage_error() {
    for args in [
        &["bench", "failover", "--runs", "0"][..],
        &["bench", "failover", "--segment-ms", "5"],
        &["bench", "scale", "--agents", "0"],
        &["bench", "tasks", "--tasks", "10001"],
        &["bench", "tasks", "--nodes", "0"],
    ] {
        let out = agentmesh().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn transport_reports_every_figure_for_both_sides() {
    let r = json(&[
        "bench",
        "transport",
        "--messages",
        "20000",
        "--round-trips",
        "100",
        "--json",
    ]);
    for side in ["acp", "bare_quinn"] {
        for figure in [
            "messages_per_sec",
            "messages_per_sec_batched",
            "request_reply_p50_us",
            "request_reply_inbox_p50_us",
            "request_reply_handed_over_p50_us",
            "urgent_idle_p50_us",
            "urgent_with_bulk_p50_us",
            "bulk_mb_per_sec_during_urgent",
        ] {
            let v = r[side][figure].as_f64().unwrap();
            assert!(v > 0.0, "{side}.{figure} = {v}: {r}");
        }
        // Counted from /proc on Linux (NaN, serialised as null, where it cannot be).
        for figure in [
            "request_reply_switches",
            "request_reply_inbox_switches",
            "request_reply_handed_over_switches",
        ] {
            let v = r[side][figure].as_f64();
            assert!(v.is_some_and(|v| v >= 0.0), "{side}.{figure}: {r}");
        }
    }
    for ratio in [
        "throughput_ratio",
        "request_reply_p50_ratio",
        "request_reply_inbox_p50_ratio",
        "request_reply_handed_over_p50_ratio",
        "acp_urgent_bulk_vs_idle_p50_ratio",
    ] {
        assert!(r[ratio].as_f64().unwrap() > 0.0, "{ratio}: {r}");
    }
}
