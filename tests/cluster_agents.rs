//! Agents across real node processes (loopback, real QUIC and mutual TLS): a task
//! survives the SIGKILL of a node with every segment completed once; a crash agent's
//! panic is restarted and its segment completed; a policy denial fails a task, is
//! counted, and a new policy applied without restart lifts it; a worker node's own
//! policy steers a coordinator that does not hold it; a capability nobody has fails
//! the task with a reason.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // waiting on child processes is wall time

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    agentmesh, done_in, ended_within, example, free_port, free_ports, outcome, outcome_within,
    task_in, temp_dir, NodeProcess,
};
use serde_json::{json, Value};

struct Cluster {
    dir: PathBuf,
    addrs: Vec<String>,
}

impl Cluster {
    fn new(tag: &str, nodes: usize) -> Cluster {
        let dir = temp_dir(tag);
        std::fs::create_dir_all(&dir).unwrap();
        Cluster {
            dir,
            addrs: free_ports(nodes)
                .into_iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
        }
    }

    fn start(&self, i: usize, extra: &[&str]) -> NodeProcess {
        let name = format!("n{i}");
        let mut args = vec!["--name", &name, "--listen", &self.addrs[i]];
        if i > 0 {
            args.extend(["--join", &self.addrs[0]]);
        }
        args.extend(extra);
        NodeProcess::start(&args, Some(&self.dir.join("ca")))
    }

    /// Starts n0 again, under the same name and address, as a process supervisor would
    /// after it died: with `--agents sleep=2`, joining through n1.
    fn start_again_first(&self) -> NodeProcess {
        let args = [
            "--name",
            "n0",
            "--listen",
            &self.addrs[0],
            "--join",
            &self.addrs[1],
            "--agents",
            "sleep=2",
        ];
        NodeProcess::start(&args, Some(&self.dir.join("ca")))
    }

    /// Starts node `i` running `agents` in `group`, with the policy `toml` as its
    /// start-up file and metrics served; returns it and its metrics address.
    fn start_with_policy(
        &self,
        i: usize,
        agents: &str,
        group: &str,
        toml: &str,
    ) -> (NodeProcess, String) {
        let policy = self.dir.join(format!("policy-{i}.toml"));
        std::fs::write(&policy, toml).unwrap();
        let metrics = format!("127.0.0.1:{}", free_port());
        let node = self.start(
            i,
            &[
                "--agents",
                agents,
                "--group",
                group,
                "--policy",
                policy.to_str().unwrap(),
                "--metrics",
                &metrics,
            ],
        );
        (node, metrics)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = agentmesh();
        cmd.args(args)
            .env("AGENTMESH_DEV_CA_DIR", self.dir.join("ca"));
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `submit --json` to node `i`, started in the background.
    fn submit(&self, i: usize, args: &[&str]) -> Child {
        let mut all = vec!["submit", "--json", "--to", &self.addrs[i]];
        all.extend(args);
        self.command(&all)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits until node `i`'s registry lists `n` agents.
    fn wait_for_agents(&self, i: usize, n: usize) {
        self.wait_for_status(i, |status| {
            status["agents"].as_array().map_or(0, Vec::len) == n
        });
    }

    /// Waits until every node lists `n` agents and every member up: a node that
    /// submits at once then picks the standby the test expects (the next up by name),
    /// not one before it because the next was not up there yet.
    fn wait_until_settled(&self, n: usize) {
        for i in 0..self.addrs.len() {
            self.wait_for_status(i, |status| {
                let members = status["members"].as_array().cloned().unwrap_or_default();
                status["agents"].as_array().map_or(0, Vec::len) == n
                    && members.len() == self.addrs.len()
                    && members.iter().all(|m| m["state"] == "up")
            });
        }
    }

    /// Waits until node `i`'s `status --json` satisfies `done`.
    fn wait_for_status(&self, i: usize, done: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.run(&["status", "--json", "--to", &self.addrs[i]]);
            if out.status.success() {
                let status: Value = serde_json::from_slice(&out.stdout).unwrap();
                if done(&status) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {i} never got there: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `submit` arguments for a task of the built-in `crash` agent whose segments panic
/// on their first attempt.
fn crash_task<'a>(segments: &'a str, segment_ms: &'a str) -> [&'a str; 8] {
    [
        "--capability",
        "crash",
        "--segments",
        segments,
        "--segment-ms",
        segment_ms,
        "--panic-attempts",
        "1",
    ]
}

/// Three nodes with two `sleep` replicas each, once n0 lists all three agents.
fn three_sleep_nodes(tag: &str) -> (Cluster, [NodeProcess; 3]) {
    three_sleep_nodes_with(tag, &[])
}

/// [`three_sleep_nodes`] with more arguments for n0.
fn three_sleep_nodes_with(tag: &str, first_args: &[&str]) -> (Cluster, [NodeProcess; 3]) {
    let cluster = Cluster::new(tag, 3);
    let first = cluster.start(0, &[&["--agents", "sleep=2"], first_args].concat());
    first.expect(&["listening"]);
    let second = cluster.start(1, &["--agents", "sleep=2"]);
    let third = cluster.start(2, &["--agents", "sleep=2"]);
    cluster.wait_until_settled(3);
    (cluster, [first, second, third])
}

/// Checks a `submit --json --results` of `segments` sleep segments of `ms` each:
/// completed, with one result (`ms`) per segment.
fn completed_with_every_result(
    status: std::process::ExitStatus,
    task: &Value,
    segments: u64,
    ms: u64,
) {
    assert!(status.success(), "{task}");
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["completed"], segments, "{task}");
    let results = task["results"].as_array().unwrap();
    assert_eq!(results.len() as u64, segments);
    assert!(results.iter().all(|r| r == ms), "{task}");
}

/// `submit` arguments for a task of the built-in `sleep` agent.
fn sleep_task<'a>(segments: &'a str, segment_ms: &'a str) -> [&'a str; 6] {
    [
        "--capability",
        "sleep",
        "--segments",
        segments,
        "--segment-ms",
        segment_ms,
    ]
}

/// Runs `agentmesh adjust` of `task` through node `to`, which must succeed; its stdout.
fn adjust(cluster: &Cluster, to: usize, task: &str, extra: &[&str]) -> String {
    let mut args = vec!["adjust", "--to", &cluster.addrs[to], "--task", task];
    args.extend(extra);
    let out = cluster.run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pauses `node`'s process for `pause` (SIGSTOP), then lets it go on (SIGCONT).
fn pause(node: &NodeProcess, pause: Duration) {
    let pid = node.child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success(), "kill {sig}");
    };
    signal("-STOP");
    std::thread::sleep(pause);
    signal("-CONT");
}

#[test]
fn a_task_survives_the_sigkill_of_a_node_with_every_segment_completed_once() {
    let (cluster, [first, _second, mut third]) = three_sleep_nodes("agents-kill");

    // 30 segments of 300 ms on 6 replicas: about 1.5 s of work.
    let submit = cluster.submit(0, &[&sleep_task("30", "300")[..], &["--results"]].concat());
    // n2 holds two segments at any time once work starts.
    std::thread::sleep(Duration::from_millis(700));
    third.kill();

    let (status, task) = outcome(submit);
    completed_with_every_result(status, &task, 30, 300);
    assert_eq!(task["segments"], 30, "{task}");
    assert!(task["reallocated"].as_u64().unwrap() > 0, "{task}");
    assert!(task["elapsed_ms"].as_u64().is_some(), "{task}");
    assert!(task["duplicates_discarded"].as_u64().is_some(), "{task}");
    first.expect(&["node down: reallocating its segments", "node=n2"]);
}

/// The node a task was submitted to is SIGKILLed midway. Its standby (the next node
/// by name) had the task and the results accepted so far: it takes the task over and
/// runs only the rest, the waiting `submit` finds it there, and every segment
/// completes once; the workers cancel the attempts n0 gave them. Before, the task was
/// lost with its node. The outcome counts from the submission, n0's part too: about
/// 14 s, with n0's attempts that ran again reallocated (before, it counted from the
/// takeover: about 8 s, two rounds on the 4 replicas left, and none reallocated).
#[test]
fn a_task_outlives_the_sigkill_of_the_node_it_was_submitted_to() {
    let (cluster, [mut first, second, _third]) = three_sleep_nodes("agents-coordinator-kill");

    // 12 segments of 4 s on 6 replicas: two rounds. n0 dies 1 s into the second, when
    // the first round's results are checkpointed, with 3 s left for the second round's
    // attempts on n1 and n2 (n0 is found down in about 1.5 s).
    let submit = cluster.submit(0, &[&sleep_task("12", "4000")[..], &["--results"]].concat());
    first.expect(&["task submitted"]);
    std::thread::sleep(Duration::from_millis(5_000));
    first.kill();

    let (status, task) = outcome(submit);
    completed_with_every_result(status, &task, 12, 4000);
    assert!(
        task["elapsed_ms"].as_u64().unwrap() >= 12_000,
        "counted from the submission: {task}"
    );
    // n0's attempts of the second round ran again at n1.
    assert!(task["reallocated"].as_u64().unwrap() > 0, "{task}");
    let line = second.expect(&["took over a task from a node that went down", "from=n0"]);
    // It started from what n0 had checkpointed, not from nothing.
    assert!((1..12).contains(&done_in(&line)), "{line}");
    // n0's attempts still running on n1 were cancelled, not left to hold its replicas.
    second.expect(&[
        "cancelling the attempts of a coordinator whose node went down",
        "node=n0",
    ]);
}

/// The node a task was submitted to leaves (SIGTERM) while the task runs, and its drain
/// is cut short by `--drain-timeout` before the attempts end: the waiting `submit`
/// follows the task to the standby that takes it over, as after a crash. Before, the
/// leaving node stopped its coordinator first, which dropped the waiting request, and
/// `submit` took the node's answer that it was dropped for a refusal and failed (200
/// of 200 by hand), while the standby ran the task to its end.
#[test]
fn a_task_outlives_the_graceful_leave_of_the_node_it_was_submitted_to() {
    let (cluster, [mut first, second, _third]) =
        three_sleep_nodes_with("agents-coordinator-leave", &["--drain-timeout", "1"]);

    // 6 segments of 4 s on 6 replicas: one round, still running when n0's drain of
    // 1 s, begun 1.5 s in, is cut short.
    let submit = cluster.submit(0, &[&sleep_task("6", "4000")[..], &["--results"]].concat());
    first.expect(&["task submitted"]);
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(first.terminate().success());
    first.expect(&["drain cut short by --drain-timeout", "running=6"]);

    let (status, task) = outcome(submit);
    completed_with_every_result(status, &task, 6, 4000);
    second.expect(&["took over a task from a node that went down", "from=n0"]);
}

/// The node a task was submitted to leaves (SIGTERM) while the first of two rounds of
/// its segments runs: it drains first, allocating nothing more while that round runs to
/// its end and its results reach the standby, which then takes the task over and runs
/// the second round. Nothing runs twice: 0 reallocated, where a leave without the drain
/// runs the first round's attempts again (6, or those the standby was told of).
#[test]
fn a_node_that_leaves_drains_its_running_attempts_first() {
    let (cluster, [mut first, second, _third]) = three_sleep_nodes("agents-coordinator-drain");

    // 12 segments of 2 s on 6 replicas: two rounds. n0 leaves 1 s into the first.
    let submit = cluster.submit(0, &[&sleep_task("12", "2000")[..], &["--results"]].concat());
    first.expect(&["task submitted"]);
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(first.terminate().success());
    first.expect(&["drained"]);

    let (status, task) = outcome(submit);
    completed_with_every_result(status, &task, 12, 2000);
    assert_eq!(task["reallocated"], 0, "{task}");
    let line = second.expect(&["took over a task from a node that went down", "from=n0"]);
    // With the first round's results: the standby ran only the second.
    assert_eq!(done_in(&line), 6, "{line}");
}

/// A worker node leaves (SIGTERM) while two of a task's attempts run there: it drains,
/// refusing new allocations, until they end and their results have gone, so nothing of
/// it runs twice.
#[test]
fn a_worker_node_that_leaves_drains_its_running_attempts_first() {
    let (cluster, [_first, _second, mut third]) = three_sleep_nodes("agents-worker-drain");

    // 12 segments of 2 s on 6 replicas: two rounds; n2 leaves 1 s into the first.
    let submit = cluster.submit(0, &[&sleep_task("12", "2000")[..], &["--results"]].concat());
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(third.terminate().success());
    third.expect(&["drained"]);

    let (status, task) = outcome(submit);
    completed_with_every_result(status, &task, 12, 2000);
    assert_eq!(task["reallocated"], 0, "{task}");
}

/// A node with no other up leaves (SIGTERM) in the middle of a task: with no standby to
/// take the task over, its drain runs the task on to its end before the node leaves.
/// Before, it waited only for the attempts running, and the task was lost with the
/// node: the client gave up after a minute.
#[test]
fn a_node_alone_runs_its_tasks_to_their_end_before_it_leaves() {
    let cluster = Cluster::new("agents-alone-drain", 1);
    let mut node = cluster.start(0, &["--agents", "sleep=2"]);
    cluster.wait_for_agents(0, 1);

    // 4 segments of 1.5 s on 2 replicas: two rounds; the node leaves 0.5 s into the first.
    let submit = cluster.submit(0, &[&sleep_task("4", "1500")[..], &["--results"]].concat());
    node.expect(&["task submitted"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(node.terminate().success());
    node.expect(&["drained"]);

    let (status, task) = outcome_within(submit, Duration::from_secs(30));
    completed_with_every_result(status, &task, 4, 1500);
    assert_eq!(task["reallocated"], 0, "{task}");
}

/// The node a task was submitted to is SIGKILLed while the task's first attempts run,
/// before any result. Its standby had the task's start and takes it over, with nothing
/// done: every segment runs again, and the outcome counts each reallocated. Before,
/// the standby had been told only the start, which goes before anything runs, and
/// nothing else for 5 s (no result made the task go again): it counted none.
#[test]
fn a_task_taken_over_before_any_result_counts_its_attempts_reallocated() {
    let (cluster, [mut first, second, _third]) = three_sleep_nodes("agents-coordinator-kill-early");

    // 6 segments of 4 s on 6 replicas: one round, all running when n0 dies 2 s in.
    let submit = cluster.submit(0, &[&sleep_task("6", "4000")[..], &["--results"]].concat());
    first.expect(&["task submitted"]);
    std::thread::sleep(Duration::from_millis(2_000));
    first.kill();

    let (status, task) = outcome(submit);
    completed_with_every_result(status, &task, 6, 4000);
    let line = second.expect(&["took over a task from a node that went down", "from=n0"]);
    assert_eq!(done_in(&line), 0, "{line}");
    assert!(task["reallocated"].as_u64().unwrap() >= 6, "{task}");
}

/// The node a task was submitted to is SIGKILLed midway and started again at once
/// (under the same name and address, as a process supervisor would), so the others
/// see its new life before they find the old one down. Its standby takes the task over
/// at once, although the lease it granted the old life still runs, and the `submit`,
/// told by the new life that it does not know the task, finds it there. Before, the
/// standby left the takeover to the lease's end and dropped it when the node was up
/// again: the task stalled for good (over 20 minutes in a run by hand).
#[test]
fn a_task_outlives_a_quick_restart_of_the_node_it_was_submitted_to() {
    let (cluster, [mut first, second, _third]) = three_sleep_nodes("agents-coordinator-restart");

    // As above: 12 segments of 4 s, n0 killed 1 s into the second round.
    let submit = cluster.submit(0, &[&sleep_task("12", "4000")[..], &["--results"]].concat());
    first.expect(&["task submitted"]);
    std::thread::sleep(Duration::from_millis(5_000));
    first.kill();
    let _again = cluster.start_again_first();

    let (status, task) = outcome_within(submit, Duration::from_secs(60));
    completed_with_every_result(status, &task, 12, 4000);
    second.expect(&[
        "node restarted: taking over the tasks of its former life",
        "node=n0",
    ]);
    let line = second.expect(&["took over a task from a node that went down", "from=n0"]);
    assert!((1..12).contains(&done_in(&line)), "{line}");
}

/// The node a task was submitted to (n0) was alone then, so `submit` listed no other
/// member; n1 joins later and becomes the task's standby. n0 is SIGKILLed and started
/// again at once, and its new life does not know the task. `submit`, with no member
/// listed, lists n0's members again when it asks there, finds n1, which took the task
/// over, and gets the outcome from it. Before, it asked no one else and gave up, "not
/// known here": found under 30% packet loss, where the listing at the submission
/// timed out (1 of 30 tasks lost so in `chaos.sh`).
#[test]
fn a_submit_that_listed_no_member_lists_them_when_it_asks_again() {
    let cluster = Cluster::new("agents-late-members", 2);
    let mut first = cluster.start(0, &["--agents", "sleep=2"]);
    first.expect(&["listening"]);
    // 8 segments of 1.5 s: n0 alone runs 2 at a time, n1 two more once it joined.
    let submit = cluster.submit(0, &[&sleep_task("8", "1500")[..], &["--results"]].concat());
    first.expect(&["task submitted"]);
    let second = cluster.start(1, &["--agents", "sleep=2"]);
    cluster.wait_until_settled(2);
    // Time for n0's checkpoints to give n1 the task.
    std::thread::sleep(Duration::from_millis(1_500));
    first.kill();
    let _again = cluster.start_again_first();

    let (status, task) = outcome_within(submit, Duration::from_secs(60));
    completed_with_every_result(status, &task, 8, 1500);
    second.expect(&[
        "node restarted: taking over the tasks of its former life",
        "node=n0",
    ]);
}

/// The node a task was submitted to (n0) and its standby (n1) are SIGKILLed together
/// while the task runs, so no one holds the task. The `submit` cannot ask n1, but n2,
/// which answers that it does not hold the task, holds n1 down: so nothing of n1 runs,
/// and the client has n2 adopt the task. It completes, every segment run again. Before,
/// a member that could not be asked kept the client from asking for adoption, and it
/// gave up after 60 s. Its outcome counts from the submission, not from the adoption.
#[test]
fn a_task_whose_coordinator_and_standby_die_together_is_adopted() {
    let (cluster, [mut first, mut second, third]) = three_sleep_nodes("agents-both-kill");

    // 6 segments of 2 s on 6 replicas: one round, killed 1 s in.
    let started = Instant::now();
    let submit = cluster.submit(0, &[&sleep_task("6", "2000")[..], &["--results"]].concat());
    first.expect(&["task submitted"]);
    std::thread::sleep(Duration::from_millis(1_000));
    first.kill();
    second.kill();

    let (status, task) = outcome_within(submit, Duration::from_secs(60));
    let wall_ms = started.elapsed().as_millis() as u64;
    completed_with_every_result(status, &task, 6, 2000);
    third.expect(&["adopting a task no member holds", "from=n0"]);
    // The client's start-up and connection come before its count starts.
    let elapsed = task["elapsed_ms"].as_u64().unwrap();
    assert!(
        elapsed <= wall_ms && elapsed + 2_000 >= wall_ms,
        "{elapsed} ms of {wall_ms}: {task}"
    );
}

/// The node a task was submitted to is paused (SIGSTOP) past the failure detector:
/// its standby takes the task over once the lease it granted ends. When n0 wakes, its
/// own lease has lapsed, so it allocates nothing more and asks its standby, which
/// answers that it took the task over; the rest runs once, at n1. Before the lease,
/// n0 went on allocating the remaining segments (38 of 60 in a run by hand).
#[test]
fn a_coordinator_paused_past_its_lease_allocates_nothing_its_standby_took_over() {
    let cluster = Cluster::new("agents-coordinator-stop", 3);
    let metrics = format!("127.0.0.1:{}", free_port());
    let first = cluster.start(0, &["--agents", "sleep=2", "--metrics", &metrics]);
    first.expect(&["listening"]);
    let second = cluster.start(1, &["--agents", "sleep=2"]);
    let _third = cluster.start(2, &["--agents", "sleep=2"]);
    cluster.wait_for_agents(0, 3);

    // 30 segments of 2 s on 6 replicas: five rounds. n0 stops 0.5 s into the second.
    let submit = cluster.submit(0, &[&sleep_task("30", "2000")[..], &["--results"]].concat());
    first.expect(&["task submitted"]);
    std::thread::sleep(Duration::from_millis(2_500));
    let before = counter(&scrape(&metrics), "agentmesh_attempts_started_total");
    assert!(before >= 6, "the first round ran: {before}");
    pause(&first, Duration::from_secs(4));

    let (status, task) = outcome(submit);
    completed_with_every_result(status, &task, 30, 2000);
    second.expect(&["took over a task from a node that went down", "from=n0"]);
    first.expect(&["the standby took the task over", "standby=n1"]);
    let after = counter(&scrape(&metrics), "agentmesh_attempts_started_total");
    assert_eq!(after, before, "n0 allocated after it woke");
}

/// n0 is alone when a task is submitted to it, so `submit` lists no other member; n1
/// and n2 join, one of them becomes the task's standby, and n0 is paused past its
/// lease (but not past the client's connection), so that standby takes the task over.
/// Back, n0 tells the waiting client that the task moved on. The client lists n0's
/// members then, finds the task where it runs, and gets the outcome there. Before, it
/// had no member to ask and took that notice for the task's end: failed, "taken over
/// by node n2" (found under 30% packet loss in `chaos.sh`, where the listing at the
/// submission timed out, while the node that took the task over completed it).
#[test]
fn a_submit_that_listed_no_member_follows_its_task_to_the_node_that_took_it_over() {
    let cluster = Cluster::new("agents-pause-unlisted", 3);
    let first = cluster.start(0, &["--agents", "sleep=2"]);
    first.expect(&["listening"]);
    cluster.wait_for_agents(0, 1);

    // 16 segments of 1 s: n0 alone runs 2 at a time, 6 once n1 and n2 have joined.
    let submit = cluster.submit(0, &[&sleep_task("16", "1000")[..], &["--results"]].concat());
    first.expect(&["task submitted"]);
    let _second = cluster.start(1, &["--agents", "sleep=2"]);
    let _third = cluster.start(2, &["--agents", "sleep=2"]);
    cluster.wait_for_agents(0, 3);
    std::thread::sleep(Duration::from_millis(1_500));
    // Past n0's lease (1 s) and its detection; within the client's idle timeout (3 s).
    pause(&first, Duration::from_millis(2_700));

    let (status, task) = outcome(submit);
    // Not checked that the standby took the task over: on a loaded machine that may
    // come after n0 wakes, and then n0 completes the task itself.
    completed_with_every_result(status, &task, 16, 1000);
}

/// Two nodes, so each is the other's standby. The coordinator (n0) is paused past its
/// lease, and n1 takes its task over. Back, n0 is n1's standby for it: it holds n1's
/// copy, whether its own copy has ended by then (moved) or not (one of an earlier
/// coordinator, which gives way). The task completes at n1. Before, n0 answered that
/// the task ran there (its own copy, or its end as moved), n1 dropped its copy too, and
/// the task was lost: in a run by hand of 40 tasks over 4 nodes paused in turn
/// (/tmp/qa/stop.sh), 7 failed this way.
#[test]
fn a_coordinator_back_from_a_pause_holds_the_task_its_standby_took_over() {
    let cluster = Cluster::new("agents-pause-back", 2);
    let first = cluster.start(0, &["--agents", "sleep=2"]);
    first.expect(&["listening"]);
    let second = cluster.start(1, &["--agents", "sleep=2"]);
    cluster.wait_for_agents(0, 2);

    // 24 segments of 1 s on 4 replicas: six rounds, more while n0 is paused.
    let submit = cluster.submit(0, &[&sleep_task("24", "1000")[..], &["--results"]].concat());
    first.expect(&["task submitted"]);
    std::thread::sleep(Duration::from_millis(1_500));
    pause(&first, Duration::from_secs(4));
    second.expect(&["took over a task from a node that went down", "from=n0"]);

    let (status, task) = outcome_within(submit, Duration::from_secs(90));
    completed_with_every_result(status, &task, 24, 1000);
    assert!(
        !dropped_its_copy(&second),
        "n1 dropped its copy for one at n0"
    );
}

/// Whether `node` has logged (among the lines no `expect` took yet) that it dropped
/// its copy of a task for the copy of a node that took the task over.
fn dropped_its_copy(node: &NodeProcess) -> bool {
    node.expect_within(
        &["took the task over while this node was held down"],
        Duration::ZERO,
    )
    .is_ok()
}

/// Three nodes paused in turn: the coordinator (n1) is paused past its lease, and its
/// standby (n2) takes the task over; n1, back, ends its copy as moved. Then n2 is
/// paused, and its standby (n0) takes the task over and picks n1 as its standby. n1
/// holds it: the task moved on from there, and did not end there. Before, n1 kept the
/// move among its ended tasks, answered that the task ran there, and n0 dropped its copy:
/// the task was lost.
#[test]
fn a_coordinator_holds_a_task_that_moved_on_from_it_when_it_comes_back() {
    let (cluster, [first, second, third]) = three_sleep_nodes("agents-pause-twice");

    // 60 segments of 1 s on 6 replicas: ten rounds, more while nodes are paused.
    let submit = cluster.submit(1, &[&sleep_task("60", "1000")[..], &["--results"]].concat());
    second.expect(&["task submitted"]);
    std::thread::sleep(Duration::from_millis(1_500));
    pause(&second, Duration::from_secs(4));
    third.expect(&["took over a task from a node that went down", "from=n1"]);
    second.expect(&["the standby took the task over", "standby=n2"]);
    pause(&third, Duration::from_secs(4));
    first.expect(&["took over a task from a node that went down", "from=n2"]);

    let (status, task) = outcome_within(submit, Duration::from_secs(90));
    completed_with_every_result(status, &task, 60, 1000);
    assert!(
        !dropped_its_copy(&first),
        "n0 dropped its copy for one at n1"
    );
}

/// The standby (n1) of the coordinator (n0) is paused (SIGSTOP) past the failure
/// detector while a task runs at n0, which gives the task to the next standby (n2)
/// from its start. Back, n1 is told to forget its copy: it holds none, and took
/// nothing over. Before, it kept the copy for good, and would have taken the task over,
/// running it again, when n0 went down.
#[test]
fn a_standby_held_down_and_back_forgets_the_task_that_moved_on() {
    let cluster = Cluster::new("agents-standby-stop", 3);
    let metrics = format!("127.0.0.1:{}", free_port());
    let first = cluster.start(0, &["--agents", "sleep=2"]);
    first.expect(&["listening"]);
    let second = cluster.start(1, &["--agents", "sleep=2", "--metrics", &metrics]);
    let _third = cluster.start(2, &["--agents", "sleep=2"]);
    cluster.wait_for_agents(0, 3);

    // 18 segments of 1 s on 6 replicas: three rounds, more with n1's replicas gone.
    let submit = cluster.submit(0, &[&sleep_task("18", "1000")[..], &["--results"]].concat());
    first.expect(&["task submitted"]);
    let held = |expected: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = counter(&scrape(&metrics), "agentmesh_standby_tasks_held");
            if now == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "n1 holds {now} tasks for n0, not {expected}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    held(1);
    pause(&second, Duration::from_secs(3));
    first.expect(&["node down: reallocating its segments", "node=n1"]);
    // Once n1 is back, and while the task may still run at n0.
    held(0);
    let (status, task) = outcome(submit);
    completed_with_every_result(status, &task, 18, 1000);
    let scraped = scrape(&metrics);
    assert_eq!(counter(&scraped, "agentmesh_tasks_taken_over_total"), 0);
    assert_eq!(counter(&scraped, "agentmesh_standby_tasks_held"), 0);
}

/// `submit` loses its connection while it waits (the node is paused with SIGSTOP past
/// the client's 3 s idle timeout), connects again and submits the same task id: it
/// gets the outcome, and the node ran the task once. Before, it waited for good.
#[test]
fn a_submit_that_loses_its_connection_asks_again_and_the_task_runs_once() {
    let cluster = Cluster::new("agents-stop", 1);
    let metrics = format!("127.0.0.1:{}", free_port());
    let node = cluster.start(0, &["--agents", "sleep=2", "--metrics", &metrics]);
    cluster.wait_for_agents(0, 1);
    // 8 segments of 500 ms on 2 replicas: about 2 s of work.
    let mut submit = cluster.submit(
        0,
        &[
            "--capability",
            "sleep",
            "--segments",
            "8",
            "--segment-ms",
            "500",
        ],
    );
    node.expect(&["task submitted"]);
    pause(&node, Duration::from_secs(4));
    ended_within(&mut submit, Duration::from_secs(60));
    let out = submit.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("asking the node again for the task"),
        "{stderr}"
    );
    let task: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["completed"], 8, "{task}");
    assert_eq!(task["duplicates_discarded"], 0, "{task}");
    node.expect(&["a client", "again", "the task"]);
    let metrics = scrape(&metrics);
    assert!(
        metrics.contains("agentmesh_tasks_total{status=\"completed\"} 1\n"),
        "{metrics}"
    );
}

#[test]
fn a_crash_agents_panic_is_restarted_and_its_segment_completed() {
    let cluster = Cluster::new("agents-crash", 1);
    let node = cluster.start(0, &["--agents", "crash=1"]);
    cluster.wait_for_agents(0, 1);
    let submit = cluster.submit(0, &crash_task("2", "50"));
    let (status, task) = outcome(submit);
    assert!(status.success(), "{task}");
    assert_eq!(task["completed"], 2, "{task}");
    assert!(task["reallocated"].as_u64().unwrap() >= 2, "{task}");
    node.expect(&["restarting a replica after a panic"]);
}

#[test]
fn the_restart_policy_flags_make_a_replica_rest_and_its_task_wait_for_it() {
    let cluster = Cluster::new("agents-rest", 1);
    // No restart allowed: the first panic sends the only replica to rest for 2 s.
    let node = cluster.start(
        0,
        &[
            "--agents",
            "crash=1",
            "--max-restarts",
            "0",
            "--restart-rest",
            "2",
        ],
    );
    cluster.wait_for_agents(0, 1);
    let submit = cluster.submit(0, &crash_task("1", "10"));
    let (status, task) = outcome(submit);
    assert!(status.success(), "{task}");
    assert_eq!(task["completed"], 1, "{task}");
    // It waited out the rest (with the default policy it is back after 50 ms).
    assert!(task["elapsed_ms"].as_u64().unwrap() >= 2_000, "{task}");
    node.expect(&["rests before it comes back", "rest_s=2"]);
    node.expect(&["back from its rest"]);
}

#[test]
fn a_policy_denial_fails_the_task_is_counted_and_a_new_policy_lifts_it() {
    let cluster = Cluster::new("agents-policy", 2);
    let strict = "[[group]]\nid = 1\nname = \"frontline\"\nmay_send_to = [3]\n";
    let (_node, metrics) = cluster.start_with_policy(0, "echo=1", "2", strict);
    // A second node, with no agents and no policy file, to which the policy spreads.
    let metrics1 = format!("127.0.0.1:{}", free_port());
    let _other = cluster.start(1, &["--metrics", &metrics1]);
    cluster.wait_for_agents(0, 1);
    cluster.wait_for_agents(1, 1);
    assert_eq!(policy_of(&cluster, 0)["groups"], 1);
    assert_eq!(policy_of(&cluster, 0)["version"], 0);
    let args = ["--capability", "echo", "--segments", "2", "--group", "1"];

    let (status, task) = outcome(cluster.submit(0, &args));
    assert!(!status.success());
    assert_eq!(task["status"], "failed", "{task}");
    let reason = task["reason"].as_str().unwrap();
    assert!(reason.contains("denied by policy"), "{reason}");
    assert!(reason.contains("group 1"), "{reason}");
    let scraped = scrape(&metrics);
    assert!(
        scraped
            .lines()
            .any(|l| l.starts_with("agentmesh_policy_denials_total") && l.contains("from=\"1\"")),
        "{scraped}"
    );

    // Group 0 (unlisted) may still send anywhere.
    let (status, task) = outcome(cluster.submit(0, &["--capability", "echo", "--segments", "1"]));
    assert!(status.success(), "{task}");
    // The coordinator's figures, described, as they happen.
    let scraped = scrape(&metrics);
    for line in [
        "# HELP agentmesh_tasks_total ",
        "agentmesh_tasks_total{status=\"failed\"} 1",
        "agentmesh_tasks_total{status=\"completed\"} 1",
        "agentmesh_segments_completed_total 1",
        "agentmesh_task_duration_seconds_count{status=\"completed\"} 1",
    ] {
        assert!(
            scraped.lines().any(|l| l.starts_with(line)),
            "{line} in {scraped}"
        );
    }

    let open = cluster.dir.join("open.toml");
    std::fs::write(&open, "[[group]]\nid = 1\nmay_send_to = [2, 3]\n").unwrap();
    let out = cluster.run(&[
        "policy",
        "apply",
        "--json",
        open.to_str().unwrap(),
        "--to",
        &cluster.addrs[0],
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied: Value = serde_json::from_slice(&out.stdout).unwrap();
    let version = applied["version"].as_u64().unwrap();
    assert!(version > 0, "{applied}");
    // Both nodes show the version `apply` printed, in `status` and as a gauge.
    assert_eq!(
        policy_of(&cluster, 0),
        json!({"version": version, "origin": "n0", "groups": 1})
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while policy_of(&cluster, 1)["version"] != version {
        assert!(Instant::now() < deadline, "{}", policy_of(&cluster, 1));
        std::thread::sleep(Duration::from_millis(50));
    }
    for m in [&metrics, &metrics1] {
        let scraped = scrape(m);
        let gauge = format!("agentmesh_policy_version {version}");
        assert!(scraped.lines().any(|l| l == gauge), "{gauge} in {scraped}");
    }
    let (status, task) = outcome(cluster.submit(0, &args));
    assert!(status.success(), "{task}");
    assert_eq!(task["completed"], 2, "{task}");

    let bad = cluster.dir.join("bad.toml");
    std::fs::write(&bad, "[[group]]\nid = 1\nmay_sent_to = [2]\n").unwrap();
    let out = cluster.run(&[
        "policy",
        "apply",
        bad.to_str().unwrap(),
        "--to",
        &cluster.addrs[0],
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("may_sent_to"), "{err}");
}

#[test]
fn a_rate_limit_per_agent_spaces_allocations_out() {
    let cluster = Cluster::new("agents-rate", 1);
    let policy = cluster.dir.join("rate.toml");
    // Two allocations per second per agent (a burst of two, then one every 500 ms).
    std::fs::write(&policy, "[[group]]\nid = 0\nrate_per_agent = 2\n").unwrap();
    let _node = cluster.start(
        0,
        &["--agents", "echo=8", "--policy", policy.to_str().unwrap()],
    );
    cluster.wait_for_agents(0, 1);
    let (status, task) = outcome(cluster.submit(0, &["--capability", "echo", "--segments", "6"]));
    assert!(status.success(), "{task}");
    assert_eq!(task["completed"], 6, "{task}");
    // Without the limit 6 echoes on 8 replicas take a few ms; with it the last two
    // tokens come 4 x 500 ms after the burst. A lower bound only: a slow machine
    // cannot make this fail.
    assert!(task["elapsed_ms"].as_u64().unwrap() >= 1_500, "{task}");
}

/// A coordinator whose node holds no policy meets a worker node that holds one (its
/// start-up file, which does not spread): the worker's node refuses, and the refusals
/// steer the coordinator instead of failing attempts.
#[test]
fn a_worker_nodes_policy_steers_a_coordinator_that_does_not_hold_it() {
    let cluster = Cluster::new("agents-refusals", 2);
    let policy = "[[group]]\nid = 1\nrate_per_agent = 2\n\n[[group]]\nid = 3\nmay_send_to = [3]\n";
    let (_workers, metrics) = cluster.start_with_policy(0, "echo=8", "1", policy);
    let _coordinator = cluster.start(1, &[]);
    cluster.wait_for_agents(1, 1);
    assert_eq!(
        policy_of(&cluster, 1)["groups"],
        0,
        "the start-up file stays put"
    );

    // Group 3 may not send to group 1 there: the task fails as denied, at once, not
    // after its segments failed five attempts each.
    let denied = ["--capability", "echo", "--segments", "4", "--group", "3"];
    let (status, task) = outcome(cluster.submit(1, &denied));
    assert!(!status.success(), "{task}");
    let reason = task["reason"].as_str().unwrap();
    assert!(reason.starts_with("denied by policy: group 3"), "{reason}");

    // Two allocations per second there: the task waits for tokens and completes.
    let limited = ["--capability", "echo", "--segments", "6", "--group", "1"];
    let (status, task) = outcome(cluster.submit(1, &limited));
    assert!(status.success(), "{task}");
    assert_eq!(task["completed"], 6, "{task}");
    assert_eq!(
        task["reallocated"], 0,
        "a refusal is no reallocation: {task}"
    );
    assert!(task["elapsed_ms"].as_u64().unwrap() >= 1_500, "{task}");
    // Refused allocations, by the worker node's own count: the coordinator rests the
    // agent for the time each refusal gives, then sends one at a time, so a refusal
    // costs a round trip now and then, not one per waiting segment per round.
    let refused: f64 = scrape(&metrics)
        .lines()
        .filter(|l| l.starts_with("agentmesh_policy_denials_total") && l.contains("rate"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!((1.0..=12.0).contains(&refused), "{refused} rate refusals");
}

#[test]
fn a_users_own_binary_runs_its_agent_with_the_whole_cli() {
    let cluster = Cluster::new("agents-own", 1);
    let name = "own0";
    let args = [
        "--name",
        name,
        "--listen",
        &cluster.addrs[0],
        "--agents",
        "echo=1",
    ];
    let _node = NodeProcess::start_program(
        example("custom_agent"),
        &args,
        Some(&cluster.dir.join("ca")),
    );
    // Its own `shout` (always started) and the built-in `echo` it asked for.
    cluster.wait_for_agents(0, 2);
    let text = cluster.dir.join("words.txt");
    std::fs::write(&text, "quiet words grow loud when shouted").unwrap();
    let (status, task) = outcome(cluster.submit(
        0,
        &[
            "--capability",
            "shout",
            "--segments",
            "2",
            "--input",
            text.to_str().unwrap(),
            "--results",
        ],
    ));
    assert!(status.success(), "{task}");
    assert_eq!(task["completed"], 2, "{task}");
    assert_eq!(
        task["results"],
        serde_json::json!(["QUIET WORDS GROW", "LOUD WHEN SHOUTED"]),
        "{task}"
    );
}

#[test]
fn a_recorded_live_run_replays_in_the_simulator() {
    let cluster = Cluster::new("agents-record", 2);
    let file = cluster.dir.join("live.jsonl");
    let mut first = cluster.start(
        0,
        &["--agents", "sleep=2", "--record", file.to_str().unwrap()],
    );
    let _second = cluster.start(1, &["--agents", "sleep=2,crash=1"]);
    cluster.wait_for_agents(0, 3);
    let (status, task) = outcome(cluster.submit(
        0,
        &[
            "--capability",
            "sleep",
            "--segments",
            "6",
            "--segment-ms",
            "100",
        ],
    ));
    assert!(status.success(), "{task}");
    // Each segment's first attempt panics on the other node, and is run again.
    let (status, task) = outcome(cluster.submit(0, &crash_task("2", "10")));
    assert!(status.success(), "{task}");
    assert!(first.terminate().success());

    let text = std::fs::read_to_string(&file).unwrap();
    let events: Vec<Value> = text
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |ev: &str| events.iter().filter(|e| e["ev"] == ev).count();
    assert_eq!(count("node_join"), 2, "{text}");
    assert_eq!(count("register"), 3, "{text}");
    assert_eq!(count("submit"), 2, "{text}");
    let panics: Vec<_> = events.iter().filter(|e| e["ev"] == "agent_panic").collect();
    assert_eq!(panics.len(), 2, "{text}");
    for p in panics {
        assert_eq!(p["agent_type"], "crash", "{text}");
        assert_ne!(p["node"], events[0]["node"], "on the other node: {text}");
    }
    let submit = events.iter().find(|e| e["ev"] == "submit").unwrap();
    assert_eq!(submit["segments"], 6, "{text}");
    assert!(submit["work_ms"].as_u64().unwrap() >= 100, "{text}");

    let out = cluster.run(&["sim", "run", file.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replay: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(replay["tasks_completed"], 2, "{replay}");
    assert_eq!(replay["lost"], 0, "{replay}");
    assert_eq!(replay["agents_registered"], 3, "{replay}");
    assert_eq!(replay["panics"], 2, "{replay}");
}

#[test]
fn adjust_steers_a_running_task_and_cancel_ends_it() {
    let cluster = Cluster::new("agents-adjust", 1);
    let _node = cluster.start(0, &["--agents", "sleep=2"]);
    cluster.wait_for_agents(0, 1);
    // Two segments run at a time for 10 s each: the task is running when steered.
    let submit = cluster.submit(
        0,
        &[
            "--capability",
            "sleep",
            "--segments",
            "6",
            "--segment-ms",
            "10000",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let task = loop {
        let out = cluster.run(&["status", "--json", "--to", &cluster.addrs[0]]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(task) = status["tasks"][0]["task"].as_str() {
            break task.to_string();
        }
        assert!(Instant::now() < deadline, "the task never showed: {status}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let adjust = |extra: &[&str]| adjust(&cluster, 0, &task, extra);
    let said = adjust(&["--param", "temperature=0.2", "--priority", "200"]);
    assert!(said.starts_with("adjusted "), "{said}");
    let said = adjust(&["--cancel"]);
    assert!(
        said.starts_with(&format!("cancelled task {task}")),
        "{said}"
    );
    // The submitter hears at once, not after the segments' 10 s.
    let started = Instant::now();
    let (status, outcome) = outcome(submit);
    assert_eq!(status.code(), Some(1), "{outcome}");
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert_eq!(outcome["reason"], "cancelled", "{outcome}");
    assert_eq!(outcome["completed"], 0, "{outcome}");
    assert!(started.elapsed() < Duration::from_secs(5), "{outcome}");
}

/// `adjust`, sent to n2, finds the task at its node (n0) and raises its priority. n0
/// is SIGKILLed and n1 takes the task over, at the new priority; `adjust`, sent to n2
/// again, finds it at n1, steers it and cancels it. Before, a task could be steered
/// only at the node that runs it: n2 answered that no such task ran there, and a user
/// had to find the node that took the task over; and a taker-over ran the task at
/// the priority it was submitted with.
#[test]
fn adjust_sent_to_any_member_finds_a_task_taken_over() {
    let (cluster, [mut first, second, _third]) = three_sleep_nodes("agents-adjust-moved");
    // 12 segments of 10 s on 6 replicas: running for a while yet when steered.
    let submit = cluster.submit(0, &sleep_task("12", "10000"));
    let line = first.expect(&["task submitted"]);
    let task = task_in(&line);
    let adjust = |extra: &[&str]| adjust(&cluster, 2, &task, extra);
    let said = adjust(&["--priority", "200"]);
    assert!(said.starts_with("adjusted "), "{said}");
    // Its standby has the new priority within a checkpoint's round trip.
    std::thread::sleep(Duration::from_millis(1_000));
    first.kill();
    second.expect(&["took over a task from a node that went down", "from=n0"]);
    let out = cluster.run(&["status", "--json", "--to", &cluster.addrs[1]]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["tasks"][0]["task"], task.as_str(), "{status}");
    assert_eq!(status["tasks"][0]["priority"], 200, "{status}");

    let said = adjust(&["--param", "temperature=0.2"]);
    assert!(said.starts_with("adjusted "), "{said}");
    let said = adjust(&["--cancel"]);
    assert!(
        said.starts_with(&format!("cancelled task {task}")),
        "{said}"
    );
    second.expect(&["task cancelled", &task]);
    let (status, outcome) = outcome_within(submit, Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{outcome}");
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert_eq!(outcome["reason"], "cancelled", "{outcome}");

    // A task no member runs: a clear error, exit code 1.
    let out = cluster.run(&[
        "adjust",
        "--to",
        &cluster.addrs[2],
        "--task",
        &task,
        "--cancel",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("no member runs task {task}")),
        "{stderr}"
    );
}

/// The parameters `adjust` sets hold for the task's later segments, at the node that
/// takes it over too. 12 segments of 10 s on 6 replicas; `ms=200` is set while the
/// first round runs, n0 is SIGKILLed, and n1, its standby, runs every segment again
/// from its start (none had ended), each in 200 ms, as its checkpoint said. Before,
/// an ADJUST reached only the attempts running then, and a taker-over knew nothing
/// of it: each segment ran its 10 s again.
#[test]
fn a_tasks_parameters_hold_for_its_later_segments_at_the_node_that_took_it_over() {
    let (cluster, [mut first, second, _third]) = three_sleep_nodes("agents-params-moved");
    let submit = cluster.submit(
        0,
        &[&sleep_task("12", "10000")[..], &["--results"]].concat(),
    );
    let task = task_in(&first.expect(&["task submitted"]));
    adjust(&cluster, 2, &task, &["--param", "ms=200"]);
    // Its standby has the parameter within a checkpoint's round trip.
    std::thread::sleep(Duration::from_millis(1_000));
    first.kill();
    second.expect(&["took over a task from a node that went down", "from=n0"]);
    let (status, outcome) = outcome_within(submit, Duration::from_secs(30));
    completed_with_every_result(status, &outcome, 12, 200);
}

/// A task's own segment timeout holds at the node that takes it over too: n0 is
/// SIGKILLed before either segment of 2.5 s ends, and n1 runs both again, each started
/// again on another replica after 1 s, as at n0 (4 reallocated in 3 runs). With the
/// default 30 s there (the timeout left out at the takeover), none was.
#[test]
fn a_tasks_own_segment_timeout_holds_at_the_node_that_took_it_over() {
    let (cluster, [mut first, second, _third]) = three_sleep_nodes("agents-timeout-moved");
    let submit = cluster.submit(
        0,
        &[
            &sleep_task("2", "2500")[..],
            &["--segment-timeout-ms", "1000", "--results"],
        ]
        .concat(),
    );
    first.expect(&["task submitted"]);
    std::thread::sleep(Duration::from_millis(500));
    first.kill();
    second.expect(&["took over a task from a node that went down", "from=n0"]);
    let (status, task) = outcome_within(submit, Duration::from_secs(30));
    completed_with_every_result(status, &task, 2, 2500);
    assert!(task["reallocated"].as_u64().unwrap() >= 2, "{task}");
}

/// `submit --segment-timeout-ms` gives a task's attempts a timeout of their own: with
/// 1 s for segments of 2.5 s, each segment is started again on another replica before
/// its first attempt ends (whose result, the first, is still taken). With the default
/// 30 s none would be.
#[test]
fn a_tasks_own_segment_timeout_applies_to_its_attempts() {
    let cluster = Cluster::new("agents-segment-timeout", 1);
    let _node = cluster.start(0, &["--agents", "sleep=4"]);
    cluster.wait_for_agents(0, 1);
    let (status, task) = outcome(
        cluster.submit(
            0,
            &[
                &sleep_task("2", "2500")[..],
                &["--segment-timeout-ms", "1000", "--results"],
            ]
            .concat(),
        ),
    );
    completed_with_every_result(status, &task, 2, 2500);
    assert!(task["reallocated"].as_u64().unwrap() >= 2, "{task}");
}

#[test]
fn a_task_for_a_capability_nobody_has_fails_with_a_reason() {
    let cluster = Cluster::new("agents-none", 1);
    let _node = cluster.start(0, &["--agents", "echo=1"]);
    cluster.wait_for_agents(0, 1);
    let (status, task) =
        outcome(cluster.submit(0, &["--capability", "translate", "--segments", "3"]));
    assert_eq!(status.code(), Some(1));
    assert_eq!(task["status"], "failed");
    assert_eq!(task["completed"], 0);
    assert!(
        task["reason"].as_str().unwrap().contains("\"translate\""),
        "{task}"
    );
    let out = cluster.run(&[
        "adjust",
        "--to",
        &cluster.addrs[0],
        "--task",
        "6f1c2a4e-0000-4000-8000-000000000001",
        "--cancel",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no member runs task 6f1c2a4e-0000-4000-8000-000000000001: it ended, or never ran (asked n0, the only member up)"),
        "{err}"
    );
}

#[test]
fn bad_submit_and_node_arguments_are_refused_with_exit_code_2() {
    let cluster = Cluster::new("agents-args", 1);
    // More than one message to a node carries (16 MiB).
    let big = cluster.dir.join("big.txt");
    std::fs::write(&big, "word ".repeat(3_500_000)).unwrap();
    let big = big.to_str().unwrap();
    let long_label = "x".repeat(129);
    for args in [
        vec![
            "submit",
            "--to",
            "127.0.0.1:1",
            "--capability",
            "x",
            "--segments",
            "1",
            "--label",
            &long_label,
        ],
        vec![
            "submit",
            "--to",
            "127.0.0.1:1",
            "--capability",
            "wordcount",
            "--segments",
            "4",
            "--input",
            big,
        ],
        vec![
            "submit",
            "--to",
            "127.0.0.1:1",
            "--capability",
            "x",
            "--segments",
            "1",
            "--segment-timeout-ms",
            "0",
        ],
        vec!["node", "--agents", "bogus=1"],
        vec!["node", "--agents", "sleep=0"],
        vec!["node", "--agents", "sleep"],
        vec!["node", "--max-restarts", "1001"],
        vec!["node", "--restart-window", "0"],
        vec!["node", "--restart-rest", "-1"],
        vec!["submit", "--to", "127.0.0.1:1", "--capability", "x"],
        vec![
            "adjust",
            "--to",
            "127.0.0.1:1",
            "--task",
            "nope",
            "--cancel",
        ],
        vec![
            "adjust",
            "--to",
            "127.0.0.1:1",
            "--task",
            "6f1c2a4e-0000-4000-8000-000000000001",
        ],
        vec![
            "submit",
            "--to",
            "127.0.0.1:1",
            "--capability",
            "x",
            "--segments",
            "0",
        ],
    ] {
        let out = cluster.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.trim().is_empty(), "{args:?}");
    }
    // A bad line of a .jsonl input is named with its file.
    let jsonl = cluster.dir.join("segments.jsonl");
    std::fs::write(&jsonl, "{\"a\": 1}\nnot json\n").unwrap();
    let jsonl = jsonl.to_str().unwrap();
    let out = cluster.run(&[
        "submit",
        "--to",
        "127.0.0.1:1",
        "--capability",
        "echo",
        "--input",
        jsonl,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("line 2 of {jsonl} is not JSON")),
        "{err}"
    );
}

/// The policy node `i` reports in `status --json`.
fn policy_of(cluster: &Cluster, i: usize) -> Value {
    let out = cluster.run(&["status", "--json", "--to", &cluster.addrs[i]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    status["policy"].clone()
}

/// A counter's value in a scrape (0 if absent).
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}
