//! The `agentmesh acp` operator tools, run as the built binary: decode prints the
//! documented JSON, encode is its inverse, bad input exits 2 with one line on stderr.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const VECTORS: &str = include_str!("../docs/acp-test-vectors.json");

fn agentmesh(args: &[&str]) -> Output {
    agentmesh_with_stdin(args, "")
}

fn agentmesh_with_stdin(args: &[&str], stdin: &str) -> Output {
    run(args, stdin, true)
}

/// Runs the binary with `stdin`; with `read_stdout` false, its stdout is closed before
/// it starts (a reader that went away), and what it does not read of stdin is dropped.
fn run(args: &[&str], stdin: &str, read_stdout: bool) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentmesh"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    if !read_stdout {
        drop(child.stdout.take());
    }
    let mut input = child.stdin.take().unwrap();
    let written = input.write_all(stdin.as_bytes());
    if read_stdout {
        written.unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn vectors() -> Value {
    serde_json::from_str(VECTORS).unwrap()
}

#[test]
fn decode_prints_the_documented_keys_as_integers() {
    let v = &vectors()["valid"][1];
    let out = agentmesh(&["acp", "decode", v["hex"].as_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1);
    let got: Value = serde_json::from_str(&text).unwrap();
    let keys: Vec<&str> = got
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    const INTEGER_KEYS: [&str; 8] = [
        "ver",
        "type_code",
        "flags",
        "prio",
        "group",
        "agent_id",
        "seq",
        "len",
    ];
    let mut want: Vec<&str> = INTEGER_KEYS
        .into_iter()
        .chain(["type", "payload"])
        .collect();
    want.sort_unstable();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort_unstable();
    assert_eq!(keys_sorted, want);
    assert_eq!(got["type"], "ALLOCATE");
    for k in INTEGER_KEYS {
        assert!(got[k].is_u64(), "{k} is a JSON integer");
        assert_eq!(got[k], v["header"][k], "{k}");
    }
    assert_eq!(got["payload"], v["payload"]);
}

#[test]
fn decode_prints_undecodable_payloads_as_hex() {
    let vs = vectors();
    let v = vs["valid"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "empty-payload")
        .unwrap();
    let out = agentmesh(&["acp", "decode", v["hex"].as_str().unwrap()]);
    assert!(out.status.success());
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["payload"], "");
    assert_eq!(got["len"], 0);
}

#[test]
fn encode_is_the_inverse_of_decode_for_every_vector() {
    for v in vectors()["valid"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let hex = v["hex"].as_str().unwrap();
        // Through stdin: the largest vector is over Linux's 128 KiB argument limit.
        let out = agentmesh_with_stdin(&["acp", "decode", "-"], hex);
        assert!(out.status.success(), "{name}");
        let d: Value = serde_json::from_slice(&out.stdout).unwrap();
        let s = |k: &str| d[k].to_string();
        let mut args = vec![
            "acp".to_string(),
            "encode".into(),
            "--type".into(),
            d["type"].as_str().unwrap().into(),
            "--flags".into(),
            s("flags"),
            "--prio".into(),
            s("prio"),
            "--group".into(),
            s("group"),
            "--agent-id".into(),
            s("agent_id"),
            "--seq".into(),
            s("seq"),
        ];
        if let Some(ts) = d.get("timestamp_ms") {
            args.extend(["--timestamp-ms".into(), ts.to_string()]);
        }
        let stdin = if v.get("payload").is_some() {
            args.extend(["--payload".into(), "-".into()]);
            d["payload"].to_string()
        } else {
            args.extend(["--payload-hex".into(), "-".into()]);
            d["payload"].as_str().unwrap().to_string()
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = agentmesh_with_stdin(&args, &stdin);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), hex, "{name}");
    }
}

#[test]
fn bad_input_exits_2_with_one_line_and_no_panic() {
    let vs = vectors();
    let mut cases: Vec<String> = vec!["zz".into(), "".into(), "10".into(), "abc".into()];
    cases.extend(
        vs["invalid"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["error"] != "bad_payload")
            .map(|v| v["hex"].as_str().unwrap().to_string()),
    );
    for hex in &cases {
        let out = agentmesh(&["acp", "decode", hex]);
        assert_eq!(out.status.code(), Some(2), "{hex}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{hex}: {err}");
        assert!(err.starts_with("agentmesh: "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(out.stdout.is_empty());
    }
    let bad_encodes: [&[&str]; 5] = [
        &["acp", "encode", "--type", "NOPE", "--payload-hex", ""],
        &[
            "acp",
            "encode",
            "--type",
            "CONTROL",
            "--flags",
            "32",
            "--payload-hex",
            "",
        ],
        &[
            "acp",
            "encode",
            "--type",
            "CONTROL",
            "--payload",
            "{\"op\":\"ping\"}",
        ],
        &[
            "acp",
            "encode",
            "--type",
            "CONTROL",
            "--ver",
            "2",
            "--payload-hex",
            "",
        ],
        &[
            "acp",
            "encode",
            "--type",
            "REPORT",
            "--flags",
            "16",
            "--payload-hex",
            "",
        ],
    ];
    for args in bad_encodes {
        let out = agentmesh(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).lines().count(),
            1,
            "{args:?}"
        );
    }
}

#[test]
fn decode_reads_several_frames_from_one_capture() {
    let vs = vectors();
    let a = vs["valid"][0]["hex"].as_str().unwrap();
    let b = vs["valid"][2]["hex"].as_str().unwrap();
    let out = agentmesh(&["acp", "decode", &format!("0x{a} {b}")]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 2);
}

#[test]
fn the_walkthrough_follows_the_task_sequence_and_refuses_the_replay() {
    let out = agentmesh(&["acp", "walkthrough", "--chunk-bytes", "7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for t in [
        "REGISTER",
        "REGISTER_ACK",
        "QUERY_CAPABLE_AGENTS",
        "LIST_AGENTS",
        "ALLOCATE",
        "SYNC",
        "SYNC_ACK",
        "REPORT",
        "ADJUST",
    ] {
        assert!(text.contains(&format!(" {t} ")), "{t} missing:\n{text}");
    }
    assert!(text.contains("refused: duplicate seq"), "{text}");
}

/// Output piped into a reader that has gone (`agentmesh ... | head -1`) ends the
/// command quietly with 141, as SIGPIPE would: no panic and backtrace (a `println!`
/// on the closed pipe), no "Broken pipe" error line. The reader here is gone before
/// the command writes anything.
#[test]
fn a_reader_that_goes_away_ends_the_command_quietly() {
    let frame = "1500a00000000000010001001683a56e6f6e636501a56167656e7465a567726f757007\n";
    for (args, stdin) in [
        (&["acp", "decode", "-"][..], frame.repeat(1000)),
        (
            &[
                "sim",
                "run",
                concat!(env!("CARGO_MANIFEST_DIR"), "/sims/workloads/chaos.jsonl"),
            ][..],
            String::new(),
        ),
    ] {
        let out = run(args, &stdin, false);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}
