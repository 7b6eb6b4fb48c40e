//! The workloads shipped in `sims/workloads/`, generated from a seed so they can be
//! made again (`agentmesh sim gen KIND`): a small smoke run, a RAG burst, a chaos run
//! and a scale run.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::workload::{Event, EventKind, Workload};

/// The kinds of workload that can be generated.
pub const KINDS: [&str; 4] = ["smoke", "rag", "chaos", "scale"];

/// Generates the workload `kind`, or `None` if there is no such kind.
pub fn generate(kind: &str) -> Option<Workload> {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    Some(match kind {
        "smoke" => smoke(),
        "rag" => rag(&mut rng),
        "chaos" => chaos(&mut rng),
        "scale" => scale(&mut rng),
        _ => return None,
    })
}

fn push(w: &mut Workload, t: u64, kind: EventKind) {
    w.events.push(Event { t, kind });
}

fn join(w: &mut Workload, t: u64, node: &str) {
    push(w, t, EventKind::NodeJoin { node: node.into() });
}

fn register(w: &mut Workload, t: u64, node: &str, agent_type: &str, capacity: u32, count: u32) {
    push(
        w,
        t,
        EventKind::Register {
            node: node.into(),
            agent_type: agent_type.into(),
            capabilities: vec![agent_type.into()],
            tags: Vec::new(),
            capacity,
            group: 0,
            count,
        },
    );
}

fn submit(
    w: &mut Workload,
    t: u64,
    node: &str,
    capability: &str,
    priority: u8,
    segments: u32,
    work_ms: u64,
) {
    push(
        w,
        t,
        EventKind::Submit {
            node: node.into(),
            capability: capability.into(),
            priority,
            group: 0,
            segments,
            work_ms,
        },
    );
}

fn node(i: usize) -> String {
    format!("n{i}")
}

/// Three nodes, a few agents, five tasks; one node crashes mid-run, an agent panics.
fn smoke() -> Workload {
    let mut w = Workload::new(
        "smoke",
        "3 nodes, 7 agents, 5 tasks; a node crash and an agent panic",
    );
    for i in 0..3 {
        join(&mut w, 0, &node(i));
    }
    for i in 0..3 {
        register(&mut w, 100, &node(i), "sleep", 1, 2);
    }
    register(&mut w, 100, "n0", "echo", 2, 1);
    submit(&mut w, 1_000, "n0", "sleep", 128, 12, 200);
    submit(&mut w, 1_050, "n1", "sleep", 200, 6, 100);
    submit(&mut w, 1_100, "n0", "echo", 64, 4, 10);
    push(
        &mut w,
        1_300,
        EventKind::AgentPanic {
            node: "n1".into(),
            agent_type: "sleep".into(),
        },
    );
    push(&mut w, 1_500, EventKind::NodeCrash { node: "n2".into() });
    submit(&mut w, 2_000, "n1", "sleep", 128, 8, 150);
    push(
        &mut w,
        2_500,
        EventKind::Net {
            loss_permille: Some(20),
            latency_us: Some(1_000),
        },
    );
    submit(&mut w, 3_000, "n0", "sleep", 250, 4, 100);
    push(&mut w, 4_000, EventKind::NodeRestart { node: "n2".into() });
    w
}

/// About 100 agents on 5 nodes; a burst of 200 retrieval and summary tasks in two
/// seconds; a node dies in the middle of it.
fn rag(rng: &mut StdRng) -> Workload {
    let mut w = Workload::new("rag", "5 nodes, 100 agents (retrievers, embedders, summarizers); a burst of 200 tasks; a node crash mid-burst");
    for i in 0..5 {
        join(&mut w, 0, &node(i));
    }
    for i in 0..5 {
        register(&mut w, 200, &node(i), "retrieve", 2, 8);
        register(&mut w, 200, &node(i), "embed", 4, 4);
        register(&mut w, 200, &node(i), "summarize", 1, 8);
    }
    let mut t = 1_000;
    for k in 0..200 {
        t += rng.random_range(0..20);
        let (cap, work) = match k % 3 {
            0 => ("retrieve", rng.random_range(20..80)),
            1 => ("embed", rng.random_range(5..20)),
            _ => ("summarize", rng.random_range(100..400)),
        };
        let priority = [64u8, 128, 128, 200][rng.random_range(0..4)];
        let at = node(rng.random_range(0..4)); // n4 will crash: no coordinator there
        submit(&mut w, t, &at, cap, priority, rng.random_range(2..10), work);
        if k == 100 {
            push(&mut w, t, EventKind::NodeCrash { node: "n4".into() });
        }
    }
    w
}

/// 20 nodes and 1,000 agents; 400 tasks over a minute while nodes crash and come
/// back, the network splits and heals, loss comes and goes, and agents panic.
fn chaos(rng: &mut StdRng) -> Workload {
    let mut w = Workload::new("chaos", "20 nodes, 1,000 agents, 400 tasks over 60 s with crashes, restarts, partitions, loss and panics");
    let nodes = 20;
    for i in 0..nodes {
        join(&mut w, (i as u64) * 10, &node(i));
    }
    for i in 0..nodes {
        register(&mut w, 500, &node(i), "analyze", 2, 30);
        register(&mut w, 500, &node(i), "summarize", 1, 20);
    }
    // Coordinators on n0..n3, which never crash; workers anywhere.
    let mut events: Vec<(u64, EventKind)> = Vec::new();
    for _ in 0..400 {
        let t = rng.random_range(2_000..60_000);
        let cap = if rng.random_range(0..2) == 0 {
            "analyze"
        } else {
            "summarize"
        };
        let priority = [32u8, 96, 128, 224][rng.random_range(0..4)];
        events.push((
            t,
            EventKind::Submit {
                node: node(rng.random_range(0..4)),
                capability: cap.into(),
                priority,
                group: 0,
                segments: rng.random_range(5..40),
                work_ms: rng.random_range(50..800),
            },
        ));
    }
    let mut t = 5_000;
    while t < 58_000 {
        let victim = node(rng.random_range(4..nodes));
        events.push((
            t,
            EventKind::NodeCrash {
                node: victim.clone(),
            },
        ));
        events.push((
            t + rng.random_range(1_000..5_000),
            EventKind::NodeRestart { node: victim },
        ));
        t += rng.random_range(2_000..6_000);
    }
    for start in [15_000u64, 35_000, 50_000] {
        let cut = rng.random_range(5..nodes);
        events.push((
            start,
            EventKind::Partition {
                sides: vec![(cut..nodes).map(node).collect()],
            },
        ));
        events.push((start + rng.random_range(1_000..3_000), EventKind::Heal));
    }
    for (t, loss) in [(10_000u64, 20u32), (25_000, 0), (40_000, 50), (45_000, 0)] {
        events.push((
            t,
            EventKind::Net {
                loss_permille: Some(loss),
                latency_us: None,
            },
        ));
    }
    for _ in 0..30 {
        let t = rng.random_range(2_000..60_000);
        let cap = if rng.random_range(0..2) == 0 {
            "analyze"
        } else {
            "summarize"
        };
        events.push((
            t,
            EventKind::AgentPanic {
                node: node(rng.random_range(0..nodes)),
                agent_type: cap.into(),
            },
        ));
    }
    events.sort_by_key(|(t, _)| *t);
    // Keep crashes and restarts of one node in order when times tie.
    for (t, kind) in events {
        push(&mut w, t, kind);
    }
    w
}

/// 100,000 agents on 10 nodes; 2,000 tasks of 50 segments over 30 s; one node crash.
fn scale(rng: &mut StdRng) -> Workload {
    let mut w = Workload::new(
        "scale",
        "10 nodes, 100,000 agents, 2,000 tasks of 50 segments over 30 s, one node crash",
    );
    let nodes = 10;
    for i in 0..nodes {
        join(&mut w, 0, &node(i));
    }
    for i in 0..nodes {
        register(&mut w, 500, &node(i), "infer", 1, 10_000);
    }
    let mut t = 2_000;
    for k in 0..2_000 {
        t += rng.random_range(0..30);
        let priority = [64u8, 128, 200][rng.random_range(0..3)];
        submit(
            &mut w,
            t,
            &node(rng.random_range(0..nodes - 1)),
            "infer",
            priority,
            50,
            rng.random_range(100..2_000),
        );
        if k == 1_000 {
            push(
                &mut w,
                t,
                EventKind::NodeCrash {
                    node: node(nodes - 1),
                },
            );
        }
    }
    w
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_kind_generates_a_valid_workload() {
        for kind in KINDS {
            let w = generate(kind).unwrap();
            let mut out = Vec::new();
            w.write(&mut out).unwrap();
            assert_eq!(Workload::read(&out[..]).unwrap(), w, "{kind}");
        }
        assert!(generate("nope").is_none());
    }
}
