//! Membership on virtual time: N state machines, a simulated network with a fixed
//! latency, and a clock that jumps to the next delivery or timer (after quinn-proto's
//! test `Pair`). Nothing here sleeps, so the bounds checked are exact, not flaky.
#![allow(clippy::unwrap_used)]

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::SocketAddr;

use agentmesh_runtime::membership::{
    Membership, MembershipConfig, MembershipOutput, NodeId, Timer,
};

const LATENCY_US: u64 = 200;

enum Event {
    Deliver {
        to: String,
        data: Vec<u8>,
    },
    Timer {
        node: String,
        incarnation: u64,
        timer: Timer<NodeId>,
    },
}

struct Cluster {
    now_us: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    nodes: HashMap<String, Membership>,
    /// What each node has been told: the names it believes up.
    views: HashMap<String, BTreeSet<String>>,
    crashed: BTreeSet<String>,
}

fn id(name: &str, incarnation: u64) -> NodeId {
    let port = 7000 + name.bytes().map(u16::from).sum::<u16>();
    NodeId {
        name: name.into(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        incarnation,
    }
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            now_us: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            nodes: HashMap::new(),
            views: HashMap::new(),
            crashed: BTreeSet::new(),
        }
    }

    fn push(&mut self, at_us: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at_us, self.seq)));
        self.events.insert(self.seq, event);
    }

    fn start(&mut self, name: &str, incarnation: u64, via: Option<&str>) {
        let mut m = Membership::new(
            id(name, incarnation),
            MembershipConfig::default(),
            incarnation ^ 0x5eed,
        );
        if let Some(seed) = via {
            m.join(id(seed, 0)).unwrap();
        }
        self.nodes.insert(name.into(), m);
        self.views.insert(name.into(), BTreeSet::new());
        self.crashed.remove(name);
        self.drain(name);
    }

    fn crash(&mut self, name: &str) {
        self.nodes.remove(name);
        self.crashed.insert(name.into());
    }

    fn drain(&mut self, name: &str) {
        let incarnation = self.nodes[name].me().incarnation;
        while let Some(out) = self.nodes.get_mut(name).unwrap().poll() {
            match out {
                MembershipOutput::Send { to, data } => {
                    let at = self.now_us + LATENCY_US;
                    self.push(
                        at,
                        Event::Deliver {
                            to: to.name.to_string(),
                            data: data.to_vec(),
                        },
                    );
                }
                MembershipOutput::SetTimer { after, timer } => {
                    let at = self.now_us + after.as_micros() as u64;
                    self.push(
                        at,
                        Event::Timer {
                            node: name.into(),
                            incarnation,
                            timer,
                        },
                    );
                }
                MembershipOutput::NodeUp(n) => {
                    self.views.get_mut(name).unwrap().insert(n.name.to_string());
                }
                MembershipOutput::NodeDown(n) => {
                    self.views.get_mut(name).unwrap().remove(&*n.name);
                }
                MembershipOutput::Renewed(_) => {}
            }
        }
    }

    /// Runs events until `done` holds or `limit_us` of virtual time passes; returns
    /// the virtual time at which `done` first held.
    fn run_until(&mut self, limit_us: u64, done: impl Fn(&Cluster) -> bool) -> Option<u64> {
        let end = self.now_us + limit_us;
        while !done(self) {
            let Reverse((at, seq)) = self.queue.pop()?;
            if at > end {
                return None;
            }
            self.now_us = at;
            match self.events.remove(&seq).unwrap() {
                Event::Deliver { to, data } => {
                    if let Some(m) = self.nodes.get_mut(&to) {
                        let _ = m.handle_data(&data);
                        self.drain(&to);
                    }
                }
                Event::Timer {
                    node,
                    incarnation,
                    timer,
                } => {
                    let live = self
                        .nodes
                        .get(&node)
                        .is_some_and(|m| m.me().incarnation == incarnation);
                    if live {
                        let _ = self.nodes.get_mut(&node).unwrap().handle_timer(timer);
                        self.drain(&node);
                    }
                }
            }
        }
        Some(self.now_us)
    }

    fn sees(&self, who: &str, names: &[&str]) -> bool {
        let want: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
        self.views.get(who).is_some_and(|v| *v == want)
    }
}

fn three_nodes() -> Cluster {
    let mut c = Cluster::new();
    c.start("a", 1, None);
    c.start("b", 1, Some("a"));
    c.start("c", 1, Some("a"));
    let joined = c.run_until(2_000_000, |c| {
        c.sees("a", &["b", "c"]) && c.sees("b", &["a", "c"]) && c.sees("c", &["a", "b"])
    });
    assert!(joined.is_some(), "all see all within 2 s: {:?}", c.views);
    c
}

#[test]
fn nodes_joining_through_one_seed_learn_of_each_other() {
    three_nodes();
}

#[test]
fn a_crashed_node_is_declared_down_by_everyone_within_a_second() {
    let mut c = three_nodes();
    let crashed_at = c.now_us;
    c.crash("c");
    let detected = c
        .run_until(5_000_000, |c| c.sees("a", &["b"]) && c.sees("b", &["a"]))
        .unwrap();
    let took_ms = (detected - crashed_at) / 1_000;
    eprintln!("crash detected after {took_ms} ms");
    assert!(took_ms < 1_000, "declared down after {took_ms} ms");
}

#[test]
fn a_restarted_node_rejoins_as_a_new_incarnation() {
    let mut c = three_nodes();
    c.crash("c");
    c.run_until(5_000_000, |c| c.sees("a", &["b"])).unwrap();
    c.start("c", 2, Some("b"));
    let back = c.run_until(3_000_000, |c| {
        c.sees("a", &["b", "c"]) && c.sees("b", &["a", "c"]) && c.sees("c", &["a", "b"])
    });
    assert!(back.is_some(), "rejoined: {:?}", c.views);
    assert!(c.nodes["a"]
        .members()
        .any(|m| &*m.name == "c" && m.incarnation == 2));
}

#[test]
fn a_leaving_node_is_seen_down_at_once() {
    let mut c = three_nodes();
    let left_at = c.now_us;
    c.nodes.get_mut("c").unwrap().leave().unwrap();
    c.drain("c");
    let seen = c
        .run_until(5_000_000, |c| c.sees("a", &["b"]) && c.sees("b", &["a"]))
        .unwrap();
    let took_ms = (seen - left_at) / 1_000;
    eprintln!("leave seen after {took_ms} ms");
    assert!(took_ms < 100, "leave seen after {took_ms} ms");
}
