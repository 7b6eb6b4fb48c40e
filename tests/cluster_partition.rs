//! Full network partitions of live node processes (real QUIC and mutual TLS), made
//! with nftables inside a network namespace of the test's own. Four nodes split two and
//! two while a task runs: the coordinator's side declares the other side down and
//! reallocates its segments; the cut is held past the QUIC idle timeout, then heals;
//! all four see each other again, and the task completes with every segment's result
//! accepted exactly once. A coordinator
//! with no agent of its own is cut off from every worker: its task waits there instead
//! of failing, its standby on the other side takes it over, and after the heal the
//! client gets the outcome once. A coordinator cut off from its standby alone (every
//! other node reaches both, so no one holds either down) gives its task to another
//! standby and goes on. A coordinator that dies before its standby has a task (cut off
//! from it alone) has run nothing of it, and the client has the standby adopt it. A
//! worker node cut off from its coordinator alone has its segments reallocated within
//! seconds, not at their 30 s timeout, and cancels that coordinator's attempts. A task
//! taken over by a node that dies before its own standby has it is adopted. A standby
//! given up on does not run its copy of a task that moved on to another. Final
//! REPORTs lost with their connection are sent again on the next one. A client whose
//! task moved on from its node and back to it (as the standby of the node that took it
//! over and died) finds it there. A submission lost with its connection is started by
//! the node it was for, in the same life, once no member holds it.
//!
//! It needs root (to create the namespace), iproute2 and nftables, which `.ci/run`
//! installs. Elsewhere, without them, it says so and passes; under CI it fails.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // waiting on child processes is wall time

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{
    done_in, ended_within, free_ports, outcome, outcome_and_log, task_in, temp_dir, NodeProcess,
};
use serde_json::Value;

/// A network namespace with its loopback up, removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// The namespace, or `None` (with the reason printed) where this machine cannot
    /// make one and the test is not running under CI.
    fn create(tag: &str) -> Option<Netns> {
        let name = format!("agentmesh-{tag}-{}", std::process::id());
        let ok = |cmd: &mut Command| cmd.status().map(|s| s.success()).unwrap_or(false);
        let made = ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        let usable = made
            && ok(ns.exec("ip").args(["link", "set", "lo", "up"]))
            && ok(ns.exec("nft").args(["list", "tables"]));
        if usable {
            return Some(ns);
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to make a network namespace and run nft in it (root, iproute2, nftables)"
        );
        eprintln!(
            "skipped: no network namespace with nftables here (needs root, iproute2, nftables)"
        );
        None
    }

    /// `program` run inside the namespace.
    fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    fn nft(&self, script: &str) {
        let out = self.exec("nft").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "nft {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

struct Cluster {
    ns: Netns,
    dir: PathBuf,
    ports: Vec<u16>,
    /// Held while the cluster lives: one test of this file at a time.
    _one: MutexGuard<'static, ()>,
}

impl Cluster {
    fn start_with(&self, i: usize, extra: &[&str]) -> NodeProcess {
        let name = format!("n{i}");
        let listen = self.addr(i);
        let seed = self.addr(0);
        let mut args = vec!["--name", &name, "--listen", &listen];
        args.extend(extra);
        if i > 0 {
            args.extend(["--join", &seed]);
        }
        NodeProcess::start_program(
            self.ns.exec(env!("CARGO_BIN_EXE_agentmesh")),
            &args,
            Some(&self.dir.join("ca")),
        )
    }

    fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.ns.exec(env!("CARGO_BIN_EXE_agentmesh"));
        cmd.args(args)
            .env("AGENTMESH_DEV_CA_DIR", self.dir.join("ca"));
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn status(&self, i: usize) -> Option<Value> {
        let out = self.run(&["status", "--json", "--to", &self.addr(i)]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Node `i`'s view: member name to state.
    fn states(&self, i: usize) -> HashMap<String, String> {
        let Some(status) = self.status(i) else {
            return HashMap::new();
        };
        status["members"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        (
                            m["name"].as_str().unwrap_or_default().to_string(),
                            m["state"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops every datagram between the nodes `a` and the nodes `b`, both ways.
    fn partition(&self, a: &[usize], b: &[usize]) {
        let ports = |side: &[usize]| {
            side.iter()
                .map(|i| self.ports[*i].to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (a, b) = (ports(a), ports(b));
        self.drop_where(&[
            format!("udp sport {{ {a} }} udp dport {{ {b} }}"),
            format!("udp sport {{ {b} }} udp dport {{ {a} }}"),
        ]);
    }

    /// Drops every datagram node `i` sends to a port no node of the cluster has: what
    /// it sends to its clients.
    fn cut_off_clients_of(&self, i: usize) {
        let nodes: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        let nodes = nodes.join(", ");
        self.drop_where(&[format!(
            "udp sport {} udp dport != {{ {nodes} }}",
            self.ports[i]
        )]);
    }

    /// Drops every datagram that matches one of `matches` (nft match expressions),
    /// until [`Cluster::heal`].
    fn drop_where(&self, matches: &[String]) {
        self.nft("add table inet partition");
        self.nft(
            "add chain inet partition input { type filter hook input priority 0 ; policy accept ; }",
        );
        for m in matches {
            self.nft(&format!("add rule inet partition input {m} drop"));
        }
    }

    /// Counter `name` (with its labels) as node `i` serves it at `metrics`, read from
    /// inside the namespace.
    fn counter(&self, metrics: &str, name: &str) -> u64 {
        let (host, port) = metrics.split_once(':').unwrap();
        let script = format!(
            "exec 3<>/dev/tcp/{host}/{port}; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
        );
        let out = self.ns.exec("bash").args(["-c", &script]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }

    fn heal(&self) {
        self.nft("delete table inet partition");
    }

    fn nft(&self, script: &str) {
        self.ns.nft(script);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + limit;
    loop {
        let Some(why_not) = done() else { return };
        assert!(Instant::now() < deadline, "{what}: {why_not}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The tests of this file one at a time: each runs four node processes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Four nodes' addresses (and two more ports) in a namespace of their own, or `None`
/// where there can be none. Waits for the tests of this file before it.
fn cluster(tag: &str) -> Option<Cluster> {
    let one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::create(tag)?;
    let dir = temp_dir(tag);
    std::fs::create_dir_all(&dir).unwrap();
    Some(Cluster {
        ns,
        dir,
        ports: free_ports(6),
        _one: one,
    })
}

/// `--agents sleep=2` (one agent, two replicas) for every node but those in `without`.
fn sleepers_except(without: &[usize]) -> impl Fn(usize) -> Vec<String> + '_ {
    move |i| {
        if without.contains(&i) {
            Vec::new()
        } else {
            vec!["--agents".into(), "sleep=2".into()]
        }
    }
}

impl Cluster {
    /// Starts n0 (and waits until it listens), then n1 to n3, each with `args(i)`, and
    /// waits until n0 lists every agent they run (one per node started with `--agents`).
    fn start_four(&self, args: impl Fn(usize) -> Vec<String>) -> Vec<NodeProcess> {
        let start = |i: usize| {
            let args = args(i);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.start_with(i, &args)
        };
        let first = start(0);
        first.expect(&["listening"]);
        let mut nodes = vec![first];
        nodes.extend((1..4).map(start));
        let agents = (0..4)
            .filter(|i| args(*i).iter().any(|a| a == "--agents"))
            .count();
        self.wait_for_agents(0, agents);
        nodes
    }

    /// Starts n0 (and waits until it listens) and n1, each with `--agents sleep=2`, and
    /// waits until n0 lists both agents: two nodes, each the other's standby.
    fn start_two(&self) -> [NodeProcess; 2] {
        let first = self.start_with(0, &["--agents", "sleep=2"]);
        first.expect(&["listening"]);
        let second = self.start_with(1, &["--agents", "sleep=2"]);
        self.wait_for_agents(0, 2);
        [first, second]
    }

    /// Waits until node `i` lists `n` agents.
    fn wait_for_agents(&self, i: usize, n: usize) {
        wait_until(
            &format!("n{i} lists {n} agents"),
            Duration::from_secs(20),
            || {
                let found = self
                    .status(i)
                    .and_then(|s| s["agents"].as_array().map(Vec::len))
                    .unwrap_or(0);
                (found != n).then(|| format!("{found} agents"))
            },
        );
    }

    /// `submit --json --results` of `segments` segments of 300 ms to n0, in the background.
    fn submit(&self, segments: u32) -> Child {
        self.submit_ms(segments, 300)
    }

    /// `submit --json --results` of `segments` segments of `ms` to n0, in the background.
    fn submit_ms(&self, segments: u32, ms: u64) -> Child {
        self.submit_with(segments, ms, &[])
    }

    /// [`Cluster::submit_ms`] with `extra` arguments.
    fn submit_with(&self, segments: u32, ms: u64, extra: &[&str]) -> Child {
        let (to, segments, ms) = (self.addr(0), segments.to_string(), ms.to_string());
        let mut args = vec![
            "submit",
            "--json",
            "--to",
            &to,
            "--capability",
            "sleep",
            "--segments",
            &segments,
            "--segment-ms",
            &ms,
            "--results",
        ];
        args.extend(extra);
        self.command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The segments n2's agent has in hand, as n2's status shows them.
    fn n2_load(&self) -> Option<u64> {
        self.status(2).and_then(|s| {
            s["agents"]
                .as_array()?
                .iter()
                .find(|a| a["node"] == "n2")
                .and_then(|a| a["load"].as_u64())
        })
    }

    fn wait_until_all_up(&self) {
        wait_until(
            "all four nodes see all four up again",
            Duration::from_secs(20),
            || {
                let views: Vec<HashMap<String, String>> = (0..4).map(|i| self.states(i)).collect();
                let healed = views
                    .iter()
                    .all(|v| v.len() == 4 && v.values().all(|s| s == "up"));
                (!healed).then(|| format!("{views:?}"))
            },
        );
    }
}

/// The task's outcome: completed, with one accepted result (300) per segment.
fn completed_once(submit: Child, segments: u64) -> Value {
    completed_once_of(submit, segments, 300)
}

/// The task's outcome: completed, with one accepted result (`ms`) per segment.
fn completed_once_of(submit: Child, segments: u64, ms: u64) -> Value {
    completed_once_logged(submit, segments, ms).0
}

/// [`completed_once_of`], and what the `submit` logged.
fn completed_once_logged(submit: Child, segments: u64, ms: u64) -> (Value, String) {
    let (status, task, log) = outcome_and_log(submit);
    assert!(status.success(), "{task}");
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["segments"], segments, "{task}");
    assert_eq!(task["completed"], segments, "{task}");
    let results = task["results"].as_array().unwrap();
    assert_eq!(
        results.len() as u64,
        segments,
        "one accepted result per segment: {task}"
    );
    assert!(results.iter().all(|r| r == ms), "{task}");
    (task, log)
}

#[test]
fn a_partitioned_cluster_reallocates_heals_and_completes_every_segment_once() {
    let Some(cluster) = cluster("partition") else {
        return;
    };
    let nodes = cluster.start_four(sleepers_except(&[]));
    let first = &nodes[0];

    // 60 segments of 300 ms on 8 replicas: about 2.3 s of work with every node up.
    let submit = cluster.submit(60);
    std::thread::sleep(Duration::from_millis(700));

    // n0 (the coordinator) and n1 on one side, n2 and n3 (holding segments) on the other.
    cluster.partition(&[0, 1], &[2, 3]);
    first.expect(&["node down: reallocating its segments", "node=n2"]);
    first.expect(&["node down: reallocating its segments", "node=n3"]);
    nodes[2].expect(&["node down", "node=n0 "]);
    // Held past the QUIC idle timeout (3 s): the connections across the cut close, and
    // the nodes must dial each other again after the heal.
    std::thread::sleep(Duration::from_millis(3500));
    cluster.heal();
    cluster.wait_until_all_up();
    let task = completed_once(submit, 60);
    assert!(task["reallocated"].as_u64().unwrap() > 0, "{task}");
    drop(nodes);
}

/// The coordinator runs no agent of its own and is cut off from every node that does:
/// its task has no capable agent anywhere it can see. It waits for them (as for busy
/// ones, up to `max_wait_ms`) instead of failing. On the other side its standby, n1,
/// holds it for down and takes the task over. After the heal the client gets one
/// outcome with every segment's result once: from n0, if n0 completes its own copy
/// first, or from n1, if n0 learns first that n1 runs the task (n0 then ends its copy
/// and tells the client to ask the others).
#[test]
fn a_coordinator_cut_off_from_every_worker_waits_and_its_standby_completes_the_task() {
    let Some(cluster) = cluster("cutoff") else {
        return;
    };
    let nodes = cluster.start_four(sleepers_except(&[0]));
    let first = &nodes[0];

    // 30 segments of 300 ms on 6 replicas: about 1.5 s of work.
    let submit = cluster.submit(30);
    std::thread::sleep(Duration::from_millis(500));
    cluster.partition(&[0], &[1, 2, 3]);
    for n in ["node=n1", "node=n2", "node=n3"] {
        first.expect(&["node down: reallocating its segments", n]);
    }
    nodes[1].expect(&["took over a task from a node that went down", "from=n0"]);
    // Long enough for several coordinator ticks with nobody to allocate to.
    std::thread::sleep(Duration::from_millis(1500));
    cluster.heal();
    cluster.wait_until_all_up();
    completed_once(submit, 30);
    drop(nodes);
}

/// Only the link between the coordinator (n0) and its standby (n1, with no agent of its
/// own) is cut. n2 and n3 reach both, so SWIM's indirect probes keep every node up in
/// every view, and no one takes anything over. n0's lease from n1 lapses and its
/// checkpoints fail; 5 s on it gives the task to n2 and goes on. Before, the task
/// stopped allocating for good (in a run by hand, 40 of 80 segments done, unchanged
/// 30 s later). After the heal n1 answers again and is told to forget its copy.
#[test]
fn a_coordinator_cut_off_from_its_standby_alone_gives_its_task_to_another_and_goes_on() {
    let Some(cluster) = cluster("standby-link") else {
        return;
    };
    let nodes = cluster.start_four(sleepers_except(&[1]));
    let first = &nodes[0];

    // 80 segments of 300 ms on 6 replicas: about 4 s of work with nothing cut.
    let submit = cluster.submit(80);
    std::thread::sleep(Duration::from_millis(700));
    cluster.partition(&[0], &[1]);
    first.expect(&["gave up on the standby", "standby=n1"]);
    let task = completed_once(submit, 80);
    assert_eq!(task["reallocated"], 0, "no node was held down: {task}");
    cluster.heal();
    first.expect(&["the standby given up on answers again", "standby=n1"]);
    drop(nodes);
}

/// The coordinator (n0) is cut off from its standby (n1) alone and gets a task at once,
/// while its lease from n1 still runs: the task's start never reaches n1, and n0
/// allocates nothing of it, since n1 does not hold it. n0 then dies (SIGKILL) before it
/// would give up on n1. Every other member tells the client it does not hold the task,
/// so the client asks them to adopt it, and n1, which n0 would pick as its standby,
/// starts it. Its segments run once: the workers' nodes get one ALLOCATE per segment.
/// Before, n0 allocated the task's segments under the lease, and the task was lost
/// with n0: the client found no member that knew it.
#[test]
fn a_task_whose_coordinator_dies_before_its_standby_has_it_is_adopted_and_runs_once() {
    lost_before_its_standby_has_the_task(Lost::Killed);
}

/// As above, but n0 is only paused (SIGSTOP) and goes on once n1 has adopted the task
/// and the cut has healed: its checkpoint of the task is answered `taken_over`, so it
/// drops its copy, having allocated nothing of it. The pause lasts past the 5 s after
/// which n0 gives up on a standby that leaves its checkpoints unanswered; n0 does not
/// hold the time it did not run against n1. Before, it gave up on n1 at once when the
/// checkpoint in flight at the pause failed, gave the task to n2, and allocated 4
/// attempts of it before n1's answer came (one CI run in eight).
#[test]
fn a_coordinator_paused_before_its_standby_has_a_task_finds_it_adopted_and_drops_it() {
    lost_before_its_standby_has_the_task(Lost::Paused);
}

/// As above, but n0 is started again at once (joining through n2; still cut off from
/// n1), so the others see its new life up before, or instead of, the old one down. The
/// new life says it does not know the task, and the client, asking the others for a
/// while, has n1 adopt it once n1 knows that n0 restarted. Before, n1 adopted only
/// from a node it held down: the client was told, after one round of asking, that no
/// one knew its task.
#[test]
fn a_task_whose_coordinator_restarts_before_its_standby_has_it_is_adopted_and_runs_once() {
    lost_before_its_standby_has_the_task(Lost::Restarted);
}

/// As above, and n1 is started again too (also joining through n2, still cut off
/// from n0) once n0's new life is up: n1's new life never saw n0's former one, and has
/// taken nothing over from it. It adopts the task because the client says which life
/// of n0 it submitted to, and n0 is up in a later one: that life has ended, with
/// nothing of it running. Before, only a node that had taken over from n0 adopted, n1
/// answered that it did not know the task, and the client gave up after 10 s: the task
/// was lost (found under 30% packet loss in `chaos.sh`: n2 dropped its copies of n1's
/// tasks, unheard for 4.6 s, and restarted before their clients asked it to adopt).
#[test]
fn a_task_whose_coordinator_and_standby_to_be_restart_is_adopted_and_runs_once() {
    lost_before_its_standby_has_the_task(Lost::BothRestarted);
}

#[derive(PartialEq)]
enum Lost {
    Killed,
    Paused,
    Restarted,
    BothRestarted,
}

fn lost_before_its_standby_has_the_task(how: Lost) {
    let Some(cluster) = cluster("adopt") else {
        return;
    };
    // n2 and n3 serve metrics at the two spare ports.
    let metrics: Vec<String> = (4..6).map(|i| cluster.addr(i)).collect();
    let mut nodes = cluster.start_four(|i| match i {
        0 | 1 => Vec::new(),
        _ => vec![
            "--agents".into(),
            "sleep=2".into(),
            "--metrics".into(),
            metrics[i - 2].clone(),
        ],
    });

    cluster.partition(&[0], &[1]);
    let submit = cluster.submit(20);
    nodes[0].expect(&["task submitted", "segments=20"]);
    // Less than the 5 s after which n0 would give the task to another standby.
    std::thread::sleep(Duration::from_millis(1500));
    let pid = nodes[0].child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success(), "kill {sig}");
    };
    let paused = Instant::now();
    match how {
        Lost::Killed => nodes[0].kill(),
        Lost::Paused => signal("-STOP"),
        Lost::Restarted => {
            nodes[0].kill();
            let seed = cluster.addr(2);
            nodes.push(cluster.start_with(0, &["--join", &seed]));
        }
        Lost::BothRestarted => {
            nodes[0].kill();
            let seed = cluster.addr(2);
            nodes.push(cluster.start_with(0, &["--join", &seed]));
            let started = nodes[4].expect(&["node started", "node=n0"]);
            let life = started
                .split_whitespace()
                .find(|w| w.starts_with("incarnation="));
            nodes[2].expect(&["node up", "node=n0 ", life.unwrap()]);
            nodes[1].kill();
            // Put in n1's place: the new life is the one that adopts.
            nodes[1] = cluster.start_with(1, &["--join", &seed]);
        }
    }
    nodes[1].expect(&["adopting a task no member holds", "from=n0"]);
    if how == Lost::Paused {
        // Past the 5 s after which n0 would give up on n1, had it been running.
        std::thread::sleep(Duration::from_secs(6).saturating_sub(paused.elapsed()));
        cluster.heal();
        signal("-CONT");
        nodes[0].expect(&["this node did not run for a while"]);
        nodes[0].expect(&["the standby took the task over", "standby=n1"]);
        let gave_up = nodes[0].expect_within(&["gave up on the standby"], Duration::ZERO);
        assert!(
            gave_up.is_err(),
            "n0 held its pause against n1: {gave_up:?}"
        );
    }
    let task = completed_once(submit, 20);
    assert_eq!(task["reallocated"], 0, "{task}");
    let allocations: u64 = metrics
        .iter()
        .map(|m| {
            cluster.counter(
                m,
                "agentmesh_frames_received_by_type_total{type=\"ALLOCATE\"}",
            )
        })
        .sum();
    assert_eq!(allocations, 20, "one ALLOCATE per segment, none from n0");
    drop(nodes);
}

/// The node a task was submitted to (n0) restarts while its standby (n1), which takes
/// the task over, cannot answer clients (what n1 sends them is dropped) for 25 s. The
/// `submit`, told by n0's new life that it does not know the task, cannot ask n1, and
/// goes on asking while n1 cannot be asked; once it can, it gets the outcome. Before,
/// it gave up 10 s after the restart with "not known here" while n1 ran its task to
/// its end (found under 30% packet loss in `chaos.sh`).
#[test]
fn a_client_that_cannot_ask_the_standby_goes_on_asking_while_it_may_hold_the_task() {
    let Some(cluster) = cluster("unasked-standby") else {
        return;
    };
    let mut nodes = cluster.start_four(sleepers_except(&[0, 1]));
    // 12 segments of 1 s on 4 replicas: about 3 s of work.
    let submit = cluster.submit_ms(12, 1_000);
    nodes[0].expect(&["task submitted", "segments=12"]);
    std::thread::sleep(Duration::from_millis(1_000));
    cluster.cut_off_clients_of(1);
    nodes[0].kill();
    let seed = cluster.addr(2);
    nodes.push(cluster.start_with(0, &["--join", &seed]));
    // At the restart, or at n0's former life's lease end if that is seen down first.
    nodes[1].expect(&["took over a task from a node that went down", "from=n0"]);
    // Well past the 10 s for which the client asks the others once n0 said it does
    // not know the task (each round waits a few seconds for n1 to answer).
    std::thread::sleep(Duration::from_secs(25));
    cluster.heal();
    completed_once_of(submit, 12, 1_000);
    drop(nodes);
}

/// Only the link between the coordinator (n0, with no agent of its own) and a worker
/// node (n2) is cut while n2 runs segments. n1 and n3 reach both, so no one holds
/// either down. n0's connection to n2 closes after the QUIC idle timeout, and a
/// second on n0 gives n2's attempts to the other workers. Before, their REPORTs never
/// came and they waited for the 30 s segment timeout: in a run by hand the task took
/// 31.0 s, against about 3 s of work.
#[test]
fn a_worker_node_cut_off_from_its_coordinator_alone_has_its_segments_reallocated() {
    let Some(cluster) = cluster("worker-link") else {
        return;
    };
    let nodes = cluster.start_four(sleepers_except(&[0]));
    let first = &nodes[0];

    // 60 segments of 300 ms on 6 replicas: about 3 s of work with nothing cut.
    let submit = cluster.submit(60);
    std::thread::sleep(Duration::from_millis(700));
    cluster.partition(&[0], &[2]);
    first.expect(&["no connection to the node", "node=n2"]);
    let task = completed_once(submit, 60);
    let elapsed = task["elapsed_ms"].as_u64().unwrap();
    assert!(
        elapsed < 20_000,
        "done well before the 30 s segment timeout: {task}"
    );
    assert!(task["reallocated"].as_u64().unwrap() > 0, "{task}");
    drop(nodes);
}

/// As above, with segments of 8 s: the worker node (n2) cannot reach the coordinator
/// (n0) either, and cancels n0's attempts there (twice the coordinator's wait after its
/// connection closed) rather than run them to their end for nothing, since n0 has
/// given them to other workers. Before, they held n2's replicas for the rest of their
/// 8 s.
#[test]
fn a_worker_node_cut_off_from_a_coordinator_cancels_its_attempts() {
    let Some(cluster) = cluster("worker-cancel") else {
        return;
    };
    let nodes = cluster.start_four(sleepers_except(&[0]));
    let (first, third) = (&nodes[0], &nodes[2]);

    // 6 segments of 8 s on 6 replicas, two per worker node.
    let submit = cluster.submit_ms(6, 8_000);
    std::thread::sleep(Duration::from_millis(1_000));
    cluster.partition(&[0], &[2]);
    first.expect(&["no connection to the node", "node=n2"]);
    third.expect(&[
        "no connection to the node of a coordinator with attempts here: cancelling them",
        "node=n0",
        "attempts=2",
    ]);
    let task = completed_once_of(submit, 6, 8_000);
    assert_eq!(task["reallocated"], 2, "{task}");
    drop(nodes);
}

/// A chain: the coordinator (n0) dies and its standby (n1) takes the task over, but
/// n1 is cut off from its own standby (n2) alone, so it waits to allocate; n1 dies too
/// before n2 has the task. No member holds it. The client cannot ask n0 or n1, but n2
/// and n3 answer, and hold both down: the client has the task adopted from n0, and n2,
/// the node n0 would now pick as standby, runs it. Before, the client asked for
/// adoption only when it could ask every member, and gave up after 60 s.
#[test]
fn a_task_taken_over_by_a_node_that_dies_before_its_standby_has_it_is_adopted() {
    let Some(cluster) = cluster("chain") else {
        return;
    };
    let mut nodes = cluster.start_four(sleepers_except(&[0, 1]));

    cluster.partition(&[1], &[2]);
    let submit = cluster.submit(20);
    nodes[0].expect(&["task submitted", "segments=20"]);
    std::thread::sleep(Duration::from_millis(500));
    nodes[0].kill();
    nodes[1].expect(&["took over a task from a node that went down", "from=n0"]);
    // Less than the 5 s after which n1 would give the task to another standby.
    std::thread::sleep(Duration::from_millis(1_500));
    nodes[1].kill();
    nodes[2].expect(&["adopting a task no member holds", "from=n0"]);
    completed_once(submit, 20);
    drop(nodes);
}

/// The coordinator (n0, no agent) is cut off from its standby (n1, no agent) alone,
/// after n1 has its task: 5 s on, n0 gives the task, with the results it accepted
/// meanwhile, to n2 and goes on. Then n0 dies before the cut heals, so n1 is never
/// told to forget its copy. n1 last heard from n0 more than 4 s before it went down,
/// so n0 may have given its tasks to another standby (it had): n1 drops its copy,
/// and n2 alone takes the task over, from n0's results. Before, n1 took it over too
/// (in 2 of 3 runs, first), from its copy of before the cut: with no results, so
/// every segment ran again, or, had n2 taken it over first, the rest ran on both.
#[test]
fn a_standby_given_up_on_does_not_take_over_a_task_that_moved_on() {
    let Some(cluster) = cluster("stale-copy") else {
        return;
    };
    let mut nodes = cluster.start_four(sleepers_except(&[0, 1]));

    // 60 segments of 1 s on 4 replicas: about 15 s of work.
    let submit = cluster.submit_ms(60, 1_000);
    nodes[0].expect(&["task submitted", "segments=60"]);
    // n0 allocates only once n1 holds the task's start.
    std::thread::sleep(Duration::from_millis(700));
    cluster.partition(&[0], &[1]);
    nodes[0].expect(&["gave up on the standby", "standby=n1"]);
    // Time for n0's checkpoint of the task to reach n2.
    std::thread::sleep(Duration::from_millis(1_000));
    nodes[0].kill();
    let took_over = nodes[2].expect(&["took over a task from a node that went down", "from=n0"]);
    // The first 4 segments ended before n0's lease from n1 lapsed, after the cut.
    assert!(
        done_in(&took_over) >= 4,
        "n2 takes over n0's results: {took_over}"
    );
    nodes[1].expect(&["not taking over", "node=n0"]);
    completed_once_of(submit, 60, 1_000);
    assert!(
        nodes[1]
            .expect_within(&["took over a task"], Duration::ZERO)
            .is_err(),
        "n1 ran its copy too"
    );
    drop(nodes);
}

/// Four nodes, n0 (the coordinator) and n1 (its standby) with no agent; a task of 4
/// segments of `ms` submitted to n0, and, once n0 has it, whatever n0 sends to its
/// client dropped. `None` where there can be no namespace.
fn cut_off_from_its_client(tag: &str, ms: u64) -> Option<(Cluster, Vec<NodeProcess>, Child)> {
    let cluster = cluster(tag)?;
    let nodes = cluster.start_four(sleepers_except(&[0, 1]));
    let submit = cluster.submit_ms(4, ms);
    nodes[0].expect(&["task submitted", "segments=4"]);
    cluster.cut_off_clients_of(0);
    Some((cluster, nodes, submit))
}

/// The coordinator (n0, no agent) ends a task whose outcome never reaches its client
/// (what n0 sends to clients is dropped), tells its standby (n1, no agent) that the
/// task ended, with its outcome, and dies. The client, its connection lost, asks the
/// other members: n1, which has taken over from n0 since, gives it that outcome. At
/// first (7b2b18c), n1 answered that the outcome was lost; before that, n1 had
/// forgotten the task like any that ended, no member held it, so the client had n1
/// adopt it and every segment ran a second time.
#[test]
fn a_task_that_ended_at_a_node_that_died_before_its_client_heard_is_not_run_again() {
    // 4 segments of 1 s on 4 replicas: one round.
    let Some((_cluster, mut nodes, submit)) = cut_off_from_its_client("lost-outcome", 1_000) else {
        return;
    };
    nodes[0].expect(&["task ended", "completed=4"]);
    // Time for the end to reach n1 in a checkpoint.
    std::thread::sleep(Duration::from_millis(1_000));
    nodes[0].kill();

    completed_once_of(submit, 4, 1_000);
    nodes[1].expect(&["it gets the outcome that node sent here", "node=n0"]);
    for node in &nodes[1..] {
        assert!(
            node.expect_within(&["adopting"], Duration::ZERO).is_err(),
            "the task ran again"
        );
    }
    drop(nodes);
}

/// The client loses its connection to the coordinator (n0, no agent) while the task
/// runs (what n0 sends to clients is dropped), and asks the others: n1, n0's standby
/// (no agent), holds the task and has the client wait. n0 stays up and ends the task;
/// n1, told so with the outcome, gives the waiting client that outcome. Before, n1 told
/// it to ask the others, none of which had the task or could adopt it while n0 was up,
/// and the client, unable to reach n0, gave up after a minute.
#[test]
fn a_client_waiting_at_the_standby_gets_the_outcome_when_the_task_ends() {
    // 4 segments of 6 s on 4 replicas: one round, past the client's 3 s idle timeout.
    let Some((_cluster, nodes, mut submit)) = cut_off_from_its_client("waiting-outcome", 6_000)
    else {
        return;
    };
    nodes[1].expect(&["a client waits here for a task this node holds as standby"]);
    ended_within(&mut submit, Duration::from_secs(20));
    completed_once_of(submit, 4, 6_000);
    nodes[1].expect(&["a client waiting here gets the outcome of the task"]);
    drop(nodes);
}

/// The link between the coordinator (n0, no agent) and the only worker node (n2) is
/// cut while n2 runs the task's two segments of 8 s; they end during the cut, so their
/// final REPORTs go out on a connection that then times out. The cut heals half a
/// second after n0 gave the attempts up (a second after the connection closed; there
/// is nowhere else to run them), and n2 sends the kept finals again on the new
/// connection, where n0 takes them: 6.5 s after the cut in two runs. Before, they were
/// lost with the old connection and the segments ran a second time: 17.0 s after it.
#[test]
fn final_reports_lost_with_their_connection_are_sent_again_on_the_next() {
    let Some(cluster) = cluster("finals") else {
        return;
    };
    let metrics = cluster.addr(4);
    let nodes = cluster.start_four(|i| match i {
        2 => vec![
            "--agents".into(),
            "sleep=2".into(),
            "--metrics".into(),
            metrics.clone(),
        ],
        _ => Vec::new(),
    });
    let first = &nodes[0];

    let submit = cluster.submit_ms(2, 8_000);
    first.expect(&["task submitted", "segments=2"]);
    std::thread::sleep(Duration::from_millis(6_000));
    let cut = Instant::now();
    cluster.partition(&[0], &[2]);
    // The segments end about 2 s into the cut, the connection times out at 3 s.
    first.expect(&["no connection to the node", "node=n2"]);
    std::thread::sleep(Duration::from_millis(500));
    cluster.heal();
    let task = completed_once_of(submit, 2, 8_000);
    let after_cut = cut.elapsed();
    assert!(
        after_cut < Duration::from_secs(12),
        "the first attempts' results are taken, {after_cut:?} after the cut: {task}"
    );
    let resent = cluster.counter(&metrics, "agentmesh_final_reports_resent_total");
    assert!(resent >= 2, "n2 sent its finals again: {resent}");
    drop(nodes);
}

/// n0 with metrics at port 4, n2 (the only node with agents) with metrics at port 5,
/// n1 and n3 with neither, all up.
fn n2_works_for_n0(cluster: &Cluster) -> Vec<NodeProcess> {
    let (coordinator, worker) = (cluster.addr(4), cluster.addr(5));
    cluster.start_four(|i| match i {
        0 => vec!["--metrics".into(), coordinator.clone()],
        2 => vec![
            "--agents".into(),
            "sleep=2".into(),
            "--metrics".into(),
            worker.clone(),
        ],
        _ => Vec::new(),
    })
}

/// Heals the cut once n0 has lost its connection to n2 (the 3 s idle timeout), so
/// that the next connection comes up at once, within n0's cut-off second.
fn heal_when_n0_loses_n2(cluster: &Cluster, n0: &NodeProcess) {
    n0.expect(&["connection to member down", "peer=n2"]);
    cluster.heal();
}

/// An ALLOCATE lost with its connection goes again on the next one. n2, the only node
/// with agents, is cut off from n0 alone (n1 and n3 reach both, so no one holds either
/// down), and a task submitted to n0 during the cut has its ALLOCATEs go out on a
/// connection that is to time out. The cut heals as n0 loses that connection, and the
/// next comes up within n0's cut-off second: n0 does not give n2's attempts to others
/// but sends their ALLOCATEs again on the new connection. The task ends about 4 s after
/// the cut, reallocated 0 (6 runs of 6). Before, its attempts waited for the task's
/// segment timeout: 60.9 s after the cut, 2 runs of 2. Should a slow machine bring the
/// new connection up after the cut-off second, n0 gives the attempts to others then
/// instead (about 10 s), and that path is checked for its time only.
#[test]
fn allocates_lost_with_their_connection_are_sent_again_on_the_next() {
    let Some(cluster) = cluster("allocates") else {
        return;
    };
    let nodes = n2_works_for_n0(&cluster);
    let first = &nodes[0];

    cluster.partition(&[0], &[2]);
    let cut = Instant::now();
    let submit = cluster.submit_with(2, 500, &["--segment-timeout-ms", "60000"]);
    first.expect(&["task submitted", "segments=2"]);
    heal_when_n0_loses_n2(&cluster, first);
    let task = completed_once_of(submit, 2, 500);
    let after_cut = cut.elapsed();
    assert!(
        after_cut < Duration::from_secs(25),
        "the attempts did not wait for their 60 s timeout: {after_cut:?} after the cut: {task}"
    );
    let cut_off = first
        .expect_within(
            &["no connection to the node", "node=n2"],
            Duration::from_millis(200),
        )
        .is_ok();
    if !cut_off {
        let resent = cluster.counter(&cluster.addr(4), "agentmesh_allocates_resent_total");
        assert!(resent >= 1, "n0 sent its ALLOCATEs again: {resent}");
        assert_eq!(task["reallocated"], 0, "{task}");
    }
    drop(nodes);
}

/// An ALLOCATE that came, and comes again, runs its attempt once. n2 has both attempts
/// of a task when the link to n0 is cut; they end during the cut, and the connection
/// is lost with their final REPORTs. On the next connection n0 sends its ALLOCATEs
/// again (it cannot tell that they came) and n2 its finals: n2 takes the ALLOCATEs for
/// attempts that ended here, and runs neither again (`agentmesh_allocates_repeated_total`;
/// 0 with each attempt run again, as before the worker node remembered them).
#[test]
fn an_allocate_sent_again_for_an_attempt_that_ended_runs_nothing() {
    let Some(cluster) = cluster("repeated") else {
        return;
    };
    let nodes = n2_works_for_n0(&cluster);
    let first = &nodes[0];

    let submit = cluster.submit_with(2, 1_500, &["--segment-timeout-ms", "60000"]);
    first.expect(&["task submitted", "segments=2"]);
    // Both ALLOCATEs came: n2's agent has both attempts in hand.
    wait_until("n2 runs both attempts", Duration::from_secs(10), || {
        let load = cluster.n2_load();
        (load != Some(2)).then(|| format!("load {load:?}"))
    });
    cluster.partition(&[0], &[2]);
    heal_when_n0_loses_n2(&cluster, first);
    let task = completed_once_of(submit, 2, 1_500);
    let worker = cluster.addr(5);
    wait_until(
        "n2 takes the ALLOCATEs sent again for attempts that ended there",
        Duration::from_secs(10),
        || {
            let repeated = cluster.counter(&worker, "agentmesh_allocates_repeated_total");
            (repeated < 2).then(|| format!("{repeated} of them; {task}"))
        },
    );
    assert_eq!(task["reallocated"], 0, "{task}");
    drop(nodes);
}

/// A cancel lost with its connection goes again on the next one. n2, the only node
/// with agents, runs both segments (20 s each) of a task of n0's when the n0<->n2 link
/// alone is cut (n1 and n3 reach both, so no one holds either down), and the task is
/// cancelled at n0 in the cut: the ADJUSTs that cancel its attempts go out on a
/// connection that is to time out. The cut heals as n0 loses that connection; the next
/// comes up within n0's cut-off second and n2's two, so n2 goes on with the attempts,
/// and n0 sends the cancels again on it. n2's agent is free within seconds. Before, the
/// cancels were lost with the connection, and n2 ran both segments to their end, 20 s,
/// for results no one takes.
#[test]
fn cancels_lost_with_their_connection_are_sent_again_on_the_next() {
    let Some(cluster) = cluster("cancels") else {
        return;
    };
    let nodes = n2_works_for_n0(&cluster);
    let first = &nodes[0];

    let submit = cluster.submit_with(2, 20_000, &[]);
    let line = first.expect(&["task submitted", "segments=2"]);
    let task = task_in(&line);
    wait_until("n2 runs both attempts", Duration::from_secs(10), || {
        let load = cluster.n2_load();
        (load != Some(2)).then(|| format!("load {load:?}"))
    });
    cluster.partition(&[0], &[2]);
    let out = cluster
        .command(&[
            "adjust",
            "--to",
            &cluster.addr(0),
            "--task",
            &task,
            "--cancel",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.starts_with(&format!("cancelled task {task}")),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, outcome) = outcome(submit);
    assert_eq!(status.code(), Some(1), "{outcome}");
    assert_eq!(outcome["reason"], "cancelled", "{outcome}");
    heal_when_n0_loses_n2(&cluster, first);
    wait_until(
        "n2's agent is free again well before its 20 s segments end",
        Duration::from_secs(10),
        || {
            let load = cluster.n2_load();
            (load != Some(0)).then(|| format!("load {load:?}"))
        },
    );
    let resent = cluster.counter(&cluster.addr(4), "agentmesh_adjusts_resent_total");
    assert!(resent >= 2, "{resent} ADJUSTs sent again");
    drop(nodes);
}

/// A task whose only workers are on a node cut off from its coordinator alone waits
/// for the link, and completes once it heals. n2, the only node with agents, is cut
/// off from n0 for 12 s (n1 and n3 reach both, so no one holds either down), and a
/// task goes to n0 in the cut. Before, each ALLOCATE to n2 failed at once for want of a
/// connection and counted as a failed attempt: the task failed 9 s after it was
/// submitted ("segment 0 failed 5 attempts (last: node \"n2\" is not connected)"), while
/// the link was still cut. Now n2's agents are offered as full while n0 has no
/// connection to n2, and an ALLOCATE that finds none counts as a refusal, not a failure.
#[test]
fn a_task_whose_only_workers_are_cut_off_from_its_coordinator_waits_for_the_link() {
    let Some(cluster) = cluster("waits") else {
        return;
    };
    let nodes = n2_works_for_n0(&cluster);
    let first = &nodes[0];

    cluster.partition(&[0], &[2]);
    let cut = Instant::now();
    let mut submit = cluster.submit_with(2, 500, &[]);
    first.expect(&["task submitted", "segments=2"]);
    first.expect(&["connection to member down", "peer=n2"]);
    std::thread::sleep(Duration::from_millis(12_000).saturating_sub(cut.elapsed()));
    assert!(
        submit.try_wait().unwrap().is_none(),
        "the task ended while its only workers were cut off"
    );
    cluster.heal();
    completed_once_of(submit, 2, 500);
    drop(nodes);
}

/// Two nodes, so each is the other's standby. The coordinator (n0) is cut off from n1,
/// which holds it down and takes its task over; after the heal n0 ends its copy as
/// moved and tells its client, whose connection to n0 the cut did not touch, that the
/// task runs at n1. The client waits there, for long enough that when n1 dies it takes
/// n1 for a member that held the task and was lost. n0, now n1's standby for the task,
/// takes it over and completes it. Before, the client asked only n1, the other member
/// it listed, for a minute and printed the task failed, "taken over by node n1", though
/// n0 had completed it.
#[test]
fn a_task_that_comes_back_to_the_node_it_was_submitted_to_is_found_there() {
    let Some(cluster) = cluster("back-home") else {
        return;
    };
    let [first, mut second] = cluster.start_two();

    // 60 segments of 1 s on 4 replicas: about 15 s of work with nothing cut.
    let mut submit = cluster.submit_ms(60, 1_000);
    first.expect(&["task submitted", "segments=60"]);
    // n0 allocates only once n1 holds the task's start.
    std::thread::sleep(Duration::from_millis(700));
    cluster.partition(&[0], &[1]);
    second.expect(&["took over a task from a node that went down", "from=n0"]);
    cluster.heal();
    // Told by n1's checkpoint ("node=n1") or by its answer to n0's ("standby=n1").
    first.expect(&["took the task over while this node was held down", "=n1"]);
    second.expect(&["a client waits again for the task"]);
    // Time for n1's checkpoint of the task to reach n0, and for the client to wait at
    // n1 past HELD_AFTER (5 s) once the connection is found lost (3 s idle timeout).
    std::thread::sleep(Duration::from_millis(3_000));
    second.kill();
    first.expect(&["took over a task from a node that went down", "from=n1"]);
    // Within the minute after which the client gave up before.
    ended_within(&mut submit, Duration::from_secs(45));
    let (_, log) = completed_once_logged(submit, 60, 1_000);
    assert!(log.contains("lost the node that held the task"), "{log}");
}

/// The task's submission never reaches the coordinator (n0): what the client sends it
/// in full-size packets of an established connection is dropped, so the handshake and
/// the member listing go through but the SUBMIT does not, and then the connection is
/// cut until it is lost. The client connects again and asks for the task: n0, in the
/// same life, does not know it, nor does n1. n0 then starts it, at the client's
/// asking. Before, the client printed "not known here ... submit it again" (under 30%
/// packet loss in `chaos.sh`, 1 task of 30 in a run at e29c41f).
#[test]
fn a_submission_lost_with_its_connection_is_started_by_the_node_it_was_for() {
    let Some(cluster) = cluster("lost-submission") else {
        return;
    };
    let [first, second] = cluster.start_two();

    // Inputs of about 2 KB each: the SUBMIT takes several full-size packets.
    let input = cluster.dir.join("input.txt");
    std::fs::write(&input, "word ".repeat(1_600)).unwrap();
    let nodes = format!("{}, {}", cluster.ports[0], cluster.ports[1]);
    cluster.drop_where(&[format!(
        "udp dport {} udp sport != {{ {nodes} }} @th,64,1 0 udp length > 1000",
        cluster.ports[0]
    )]);
    let submit = cluster.submit_with(4, 1_000, &["--input", input.to_str().unwrap()]);
    // Time for the client to connect, list the members and send the SUBMIT.
    std::thread::sleep(Duration::from_secs(6));
    cluster.cut_off_clients_of(0);
    cluster.drop_where(&[format!(
        "udp dport {} udp sport != {{ {nodes} }}",
        cluster.ports[0]
    )]);
    // Past the 3 s idle timeout on both sides.
    std::thread::sleep(Duration::from_secs(4));
    cluster.heal();

    completed_once_of(submit, 4, 1_000);
    first.expect(&["starting a task whose submission never reached this node"]);
    assert!(
        second.expect_within(&["adopting"], Duration::ZERO).is_err(),
        "n1 adopted the task"
    );
}
