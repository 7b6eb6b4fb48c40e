//! Discovery's replicated registry: registration, replication between nodes, queries,
//! purging a dead node, refusing a node that speaks for another, and resolving an
//! Agent ID chosen by two nodes at once the same way on both.
#![allow(clippy::unwrap_used)]

use agentmesh_actors::registry::{
    record_bytes, AgentRecord, Registry, RegistryDelta, RegistryError, RegistryOutput,
};
use agentmesh_runtime::transport::wire::payload::{Capability, Health};

fn cap(name: &str, tags: &[&str], capacity: u32) -> Capability {
    Capability {
        name: name.into(),
        version: "1.0.0".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        capacity,
    }
}

fn drain(r: &mut Registry) -> Vec<RegistryOutput> {
    std::iter::from_fn(|| r.poll()).collect()
}

/// Delivers every broadcast `from` has queued to `to`; returns the other outputs.
fn deliver(from: &mut Registry, from_name: &str, to: &mut Registry) -> Vec<RegistryOutput> {
    let mut rest = Vec::new();
    for out in drain(from) {
        match out {
            RegistryOutput::Broadcast(delta) => to.handle_delta(from_name, &delta).unwrap(),
            other => rest.push(other),
        }
    }
    rest
}

/// Nodes a and b, with two "summarize" agents registered on a and replicated to b
/// (every output drained). b's membership has not reported a up yet.
fn two_agents_of_a_known_to_b() -> (Registry, Registry, AgentRecord, AgentRecord) {
    let mut a = Registry::new("a", 100, 1);
    let mut b = Registry::new("b", 100, 2);
    let x = a.register("s", vec![cap("summarize", &[], 4)], 0).unwrap();
    let y = a.register("s", vec![cap("summarize", &[], 4)], 0).unwrap();
    deliver(&mut a, "a", &mut b);
    drain(&mut b);
    (a, b, x, y)
}

#[test]
fn a_registered_agent_gets_an_id_ownership_and_a_broadcast() {
    let mut r = Registry::new("a", 100, 1);
    let rec = r
        .register("summarizer", vec![cap("summarize", &[], 4)], 7)
        .unwrap();
    assert_ne!(rec.agent, 0);
    assert_eq!((&*rec.node, rec.group), ("a", 7));
    let out = drain(&mut r);
    assert!(out.contains(&RegistryOutput::Own {
        agents: vec![rec.agent],
        node: "a".into()
    }));
    assert!(out
        .iter()
        .any(|o| matches!(o, RegistryOutput::Broadcast(d) if d.upserts == vec![rec.clone()])));
    assert_eq!(r.register("x", vec![], 0), Err(RegistryError::NoCapability));
}

#[test]
fn agents_replicate_to_other_nodes_and_queries_rank_by_health_and_load() {
    let mut a = Registry::new("a", 100, 1);
    let mut b = Registry::new("b", 100, 2);
    let x = a
        .register("s", vec![cap("summarize", &["en"], 4)], 0)
        .unwrap();
    let y = a
        .register("s", vec![cap("summarize", &["en", "gpu"], 4)], 0)
        .unwrap();
    let z = a.register("t", vec![cap("translate", &[], 1)], 0).unwrap();
    a.update(x.agent, 3, Health::Ok);
    a.update(y.agent, 1, Health::Ok);
    b.handle_node_up("a");
    let owned = deliver(&mut a, "a", &mut b);
    assert!(owned
        .iter()
        .all(|o| matches!(o, RegistryOutput::Own { .. })));
    assert_eq!(b.len(), 3);
    // The three agents of one delta: one output naming all of them.
    let mut taken = match drain(&mut b).as_slice() {
        [RegistryOutput::Own { agents, node }] if &**node == "a" => agents.clone(),
        other => panic!("{other:?}"),
    };
    taken.sort_unstable();
    let mut sent = vec![x.agent, y.agent, z.agent];
    sent.sort_unstable();
    assert_eq!(taken, sent);
    let found: Vec<u32> = b
        .query("summarize", &[], 0)
        .iter()
        .map(|i| i.agent)
        .collect();
    assert_eq!(found, vec![y.agent, x.agent], "least loaded first");
    assert_eq!(b.query("summarize", &["gpu".into()], 0).len(), 1);
    assert_eq!(b.query("summarize", &[], 1).len(), 1);
    assert_eq!(b.query("nothing", &[], 0).len(), 0);
    a.update(y.agent, 1, Health::Unhealthy);
    deliver(&mut a, "a", &mut b);
    assert_eq!(
        b.query("summarize", &[], 0)[0].agent,
        x.agent,
        "healthy before unhealthy"
    );
    a.deregister(z.agent);
    deliver(&mut a, "a", &mut b);
    assert!(b.get(z.agent).is_none());
}

#[test]
fn a_dead_nodes_agents_are_purged_and_a_full_delta_replaces_a_nodes_list() {
    let (a, mut b, x, y) = two_agents_of_a_known_to_b();
    // A full list without y drops y.
    let mut full = a.full_delta();
    full.upserts.retain(|r| r.agent != y.agent);
    b.handle_delta("a", &full).unwrap();
    assert!(b.get(y.agent).is_none() && b.get(x.agent).is_some());
    b.handle_node_down("a");
    assert!(b.is_empty());
    // y's removal and then x's (the node went down) come as one output, in order.
    let disowned: Vec<u32> = drain(&mut b)
        .into_iter()
        .flat_map(|o| match o {
            RegistryOutput::Disown { agents } => agents,
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(disowned, vec![y.agent, x.agent]);
}

#[test]
fn a_node_may_only_speak_for_itself() {
    let mut b = Registry::new("b", 100, 2);
    let delta = RegistryDelta {
        node: "a".into(),
        full: true,
        upserts: Vec::new(),
        removals: Vec::new(),
        since: 0,
        version: 0,
        want_full: false,
        part: 0,
        parts: 0,
    };
    assert!(b.handle_delta("mallory", &delta).is_err());
    let own = RegistryDelta {
        node: "b".into(),
        ..delta
    };
    assert!(
        b.handle_delta("b", &own).is_err(),
        "nobody speaks for this node but itself"
    );
}

#[test]
fn an_id_picked_by_two_nodes_at_once_stays_with_the_first_name_and_the_other_moves() {
    // Same seed: both pick the same first ID.
    let mut a = Registry::new("a", 100, 42);
    let mut b = Registry::new("b", 100, 42);
    let ra = a.register("s", vec![cap("summarize", &[], 1)], 0).unwrap();
    let rb = b.register("s", vec![cap("summarize", &[], 1)], 0).unwrap();
    assert_eq!(ra.agent, rb.agent, "the test needs a collision");
    // Both deltas cross in flight.
    let from_a: Vec<_> = drain(&mut a);
    let from_b: Vec<_> = drain(&mut b);
    for o in from_a {
        if let RegistryOutput::Broadcast(d) = o {
            b.handle_delta("a", &d).unwrap();
        }
    }
    for o in from_b {
        if let RegistryOutput::Broadcast(d) = o {
            a.handle_delta("b", &d).unwrap();
        }
    }
    // "a" sorts first and keeps the ID; "b" moved its agent and says so.
    let moved = drain(&mut b);
    let new = moved
        .iter()
        .find_map(|o| match o {
            RegistryOutput::Reidentified { old, new } => Some((*old, *new)),
            _ => None,
        })
        .expect("b re-identified its agent");
    assert_eq!(new.0, ra.agent);
    assert_ne!(new.1, ra.agent);
    for o in moved {
        if let RegistryOutput::Broadcast(d) = o {
            a.handle_delta("b", &d).unwrap();
        }
    }
    for r in [&a, &b] {
        assert_eq!(r.get(ra.agent).unwrap().node.as_ref(), "a");
        assert_eq!(r.get(new.1).unwrap().node.as_ref(), "b");
        assert_eq!(r.len(), 2);
    }
}

#[test]
fn the_registry_is_bounded() {
    let mut a = Registry::new("a", 2, 1);
    a.register("s", vec![cap("c", &[], 1)], 0).unwrap();
    a.register("s", vec![cap("c", &[], 1)], 0).unwrap();
    assert_eq!(
        a.register("s", vec![cap("c", &[], 1)], 0),
        Err(RegistryError::Full(2))
    );
}

#[test]
fn a_known_agent_is_updated_in_place_and_its_copies_share_the_node_name() {
    let (mut a, mut b, x, y) = two_agents_of_a_known_to_b();
    b.handle_node_up("a");
    // The two copies share one name.
    let (bx, by) = (b.get(x.agent).unwrap(), b.get(y.agent).unwrap());
    assert!(std::sync::Arc::ptr_eq(&bx.node, &by.node));

    // New load, health and capabilities replace the old ones; ownership is unchanged,
    // so nothing is said about it.
    a.update(x.agent, 2, Health::Degraded);
    deliver(&mut a, "a", &mut b);
    let mut changed = a.get(x.agent).unwrap().clone();
    changed.capabilities = vec![cap("translate", &[], 1)].into();
    b.handle_delta(
        "a",
        &RegistryDelta {
            upserts: vec![changed],
            ..a.summary()
        },
    )
    .unwrap();
    assert_eq!(drain(&mut b), vec![]);
    let held = b.get(x.agent).unwrap();
    assert_eq!((held.load, held.health), (2, Health::Degraded));
    assert_eq!(&held.capabilities[..], &[cap("translate", &[], 1)]);
    assert!(b
        .query("summarize", &[], 0)
        .iter()
        .all(|i| i.agent != x.agent));
    assert_eq!(b.query("translate", &[], 0)[0].agent, x.agent);
}

#[test]
fn an_agent_back_from_unhealthy_frees_capacity_here_and_on_other_nodes() {
    let (mut a, mut b, x, _) = two_agents_of_a_known_to_b();
    b.handle_node_up("a");
    a.update(x.agent, 0, Health::Unhealthy);
    deliver(&mut a, "a", &mut b);
    // Worse health frees nothing.
    assert!(!a.take_capacity_freed() && !b.take_capacity_freed());
    // Back at the same load: its capacity is on offer again, so waiting work may go.
    a.update(x.agent, 0, Health::Degraded);
    deliver(&mut a, "a", &mut b);
    assert!(a.take_capacity_freed(), "on its own node");
    assert!(b.take_capacity_freed(), "on another node");
    assert!(!a.take_capacity_freed() && !b.take_capacity_freed());
    // Degraded to ok at the same load was never full: nothing to say.
    a.update(x.agent, 0, Health::Ok);
    deliver(&mut a, "a", &mut b);
    assert!(!a.take_capacity_freed() && !b.take_capacity_freed());
}

#[test]
fn news_between_polls_goes_out_as_one_delta_unless_a_removal_follows_an_upsert() {
    let (mut a, mut b, x, y) = two_agents_of_a_known_to_b();
    let z = a.register("s", vec![cap("summarize", &[], 4)], 0).unwrap();
    let w = a.register("s", vec![cap("summarize", &[], 4)], 0).unwrap();
    a.deregister(z.agent);
    a.deregister(x.agent);
    let broadcasts: Vec<RegistryDelta> = drain(&mut a)
        .into_iter()
        .filter_map(|o| match o {
            RegistryOutput::Broadcast(d) => Some(d),
            _ => None,
        })
        .collect();
    // The two registrations travel together; the removals may not join them (z would
    // be removed before it is added), so they follow as a second delta.
    assert_eq!(broadcasts.len(), 2);
    assert_eq!(broadcasts[0].upserts, vec![z.clone(), w.clone()]);
    assert!(broadcasts[0].removals.is_empty());
    assert!(broadcasts[1].upserts.is_empty());
    assert_eq!(broadcasts[1].removals, vec![z.agent, x.agent]);
    for d in &broadcasts {
        b.handle_delta("a", d).unwrap();
    }
    let mut held: Vec<u32> = b.records().map(|r| r.agent).collect();
    held.sort_unstable();
    let mut expected = vec![y.agent, w.agent];
    expected.sort_unstable();
    assert_eq!(held, expected);
}

/// Agents of another node are offered only while membership reports that node up: a
/// delta can arrive first (a node sends its list when *it* sees the receiver up), and
/// a segment given to a node this one does not watch would never be reallocated if
/// that node died unseen. The records are kept meanwhile, and offered once it is up.
#[test]
fn agents_of_a_node_are_offered_only_while_membership_reports_it_up() {
    let (mut a, mut b, x, _) = two_agents_of_a_known_to_b();
    let offered = |r: &Registry| r.query("summarize", &[], 0).len();
    assert_eq!(b.len(), 2, "both records kept");
    assert_eq!(offered(&b), 0, "a not yet seen up by b");
    assert_eq!(
        b.capable_unwatched("summarize", &[]),
        2,
        "known, to wait for"
    );
    assert_eq!(b.capable_unwatched("translate", &[]), 0);
    b.handle_node_up("a");
    assert_eq!(offered(&b), 2);
    assert_eq!(b.capable_unwatched("summarize", &[]), 0);
    assert_eq!(offered(&a), 2, "a node's own agents are always offered");
    b.handle_node_down("a");
    assert_eq!(offered(&b), 0);
    assert_eq!(b.len(), 0, "a down node's agents are purged");
    // A stale delta from the dead life is kept but not offered until a is up again.
    a.update(x.agent, 1, Health::Ok);
    deliver(&mut a, "a", &mut b);
    assert_eq!(offered(&b), 0);
    b.handle_node_up("a");
    assert_eq!(offered(&b), 1);
}

#[derive(Clone, Debug)]
enum Step {
    /// Node `node` (1 or 2) registers an agent; its news reaches `a` or is held back.
    Register {
        node: usize,
        reaches: bool,
    },
    /// Node `node` drops its oldest agent.
    Deregister {
        node: usize,
    },
    /// Node `node` sends `a` its whole list.
    Full {
        node: usize,
    },
    Up {
        node: usize,
    },
    Down {
        node: usize,
    },
    /// `a` registers an agent of its own.
    Local,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (1usize..3, any::<bool>()).prop_map(|(node, reaches)| Step::Register { node, reaches }),
        1 => (1usize..3).prop_map(|node| Step::Deregister { node }),
        1 => (1usize..3).prop_map(|node| Step::Full { node }),
        2 => (1usize..3).prop_map(|node| Step::Up { node }),
        2 => (1usize..3).prop_map(|node| Step::Down { node }),
        1 => Just(Step::Local),
    ]
}

proptest::proptest! {
    /// Whatever order deltas and membership news come in, `a` offers exactly the
    /// agents it holds of itself and of the nodes membership last reported up.
    #[test]
    fn offered_agents_are_exactly_those_of_this_node_and_of_nodes_up(
        steps in proptest::collection::vec(step(), 1..80),
    ) {
        let names = ["a", "b", "c"];
        let mut regs: Vec<Registry> =
            names.iter().enumerate().map(|(i, n)| Registry::new(n, 1_000, i as u64 + 7)).collect();
        let mut up = [false; 3];
        let mut mine: [Vec<u32>; 3] = Default::default();
        for s in steps {
            match s {
                Step::Register { node, reaches } => {
                    let rec = regs[node].register("w", vec![cap("x", &[], 1)], 0).unwrap();
                    mine[node].push(rec.agent);
                    if reaches {
                        let (a, rest) = regs.split_at_mut(1);
                        deliver(&mut rest[node - 1], names[node], &mut a[0]);
                    }
                }
                Step::Deregister { node } => {
                    if !mine[node].is_empty() {
                        let agent = mine[node].remove(0);
                        regs[node].deregister(agent);
                        let (a, rest) = regs.split_at_mut(1);
                        deliver(&mut rest[node - 1], names[node], &mut a[0]);
                    }
                }
                Step::Full { node } => {
                    let full = regs[node].full_delta();
                    regs[0].handle_delta(names[node], &full).unwrap();
                }
                Step::Up { node } => {
                    up[node] = true;
                    regs[0].handle_node_up(names[node]);
                }
                Step::Down { node } => {
                    up[node] = false;
                    regs[0].handle_node_down(names[node]);
                }
                Step::Local => {
                    regs[0].register("w", vec![cap("x", &[], 1)], 0).unwrap();
                }
            }
            drain(&mut regs[0]);
            let mut offered: Vec<u32> = regs[0].query("x", &[], 0).iter().map(|i| i.agent).collect();
            let mut expected: Vec<u32> = regs[0]
                .records()
                .filter(|r| &*r.node == "a" || (&*r.node == "b" && up[1]) || (&*r.node == "c" && up[2]))
                .map(|r| r.agent)
                .collect();
            offered.sort_unstable();
            expected.sort_unstable();
            proptest::prop_assert_eq!(offered, expected);
            // Every record is found where the index says it is, removals included.
            for r in regs[0].records() {
                proptest::prop_assert_eq!(regs[0].get(r.agent), Some(r));
            }
        }
    }
}

/// Nodes come and go in any order (a node's last agent leaves, a node goes down,
/// another node's records arrive in between, the first comes back): every record
/// stays with its own node, and what is offered is exactly the agents of the nodes
/// up. The registry keeps records per node and reuses a gone node's room, which
/// this walks through.
#[test]
fn records_stay_with_their_node_as_nodes_come_and_go() {
    let mut me = Registry::new("me", 1000, 9);
    let mut nodes: Vec<Registry> = ["n1", "n2", "n3"]
        .iter()
        .enumerate()
        .map(|(i, n)| Registry::new(n, 1000, 10 + i as u64))
        .collect();
    // Registers one "work" agent on `r`; its Agent ID.
    let worker = |r: &mut Registry| r.register("w", vec![cap("work", &[], 1)], 0).unwrap().agent;
    let mut ids: Vec<Vec<u32>> = Vec::new();
    for (i, r) in nodes.iter_mut().enumerate() {
        let mine = (0..=i).map(|_| worker(r)).collect();
        ids.push(mine);
        drain(r);
    }
    let own = worker(&mut me);
    let names = ["n1", "n2", "n3"];
    let offered = |me: &Registry| {
        let mut v: Vec<(String, u32)> = me
            .capable("work", &[])
            .map(|(r, _)| (r.node.to_string(), r.agent))
            .collect();
        v.sort();
        v
    };
    let expect = |up: &[usize], ids: &[Vec<u32>]| {
        let mut v: Vec<(String, u32)> = vec![("me".to_string(), own)];
        for &i in up {
            v.extend(ids[i].iter().map(|&a| (names[i].to_string(), a)));
        }
        v.sort();
        v
    };
    for (i, r) in nodes.iter().enumerate() {
        me.handle_delta(names[i], &r.full_delta()).unwrap();
        me.handle_node_up(names[i]);
    }
    assert_eq!(offered(&me), expect(&[0, 1, 2], &ids));

    // n1's only agent leaves: n1 holds nothing here any more.
    nodes[0].deregister(ids[0][0]);
    deliver(&mut nodes[0], "n1", &mut me);
    ids[0].clear();
    assert_eq!(offered(&me), expect(&[1, 2], &ids));
    // n2 goes down; n3 registers more meanwhile.
    me.handle_node_down("n2");
    ids[2].push(worker(&mut nodes[2]));
    deliver(&mut nodes[2], "n3", &mut me);
    assert_eq!(offered(&me), expect(&[2], &ids));
    assert!(ids[1].iter().all(|&a| me.get(a).is_none()));
    // n2 comes back (its list arrives before membership says it is up: held, not
    // offered), and n1 registers again.
    me.handle_delta("n2", &nodes[1].full_delta()).unwrap();
    assert_eq!(offered(&me), expect(&[2], &ids));
    assert_eq!(me.capable_unwatched("work", &[]), ids[1].len());
    me.handle_node_up("n2");
    ids[0].push(worker(&mut nodes[0]));
    deliver(&mut nodes[0], "n1", &mut me);
    assert_eq!(offered(&me), expect(&[0, 1, 2], &ids));
    assert_eq!(me.len(), 1 + ids.iter().map(Vec::len).sum::<usize>());
    for (i, list) in ids.iter().enumerate() {
        for &a in list {
            assert_eq!(me.get(a).map(|r| &*r.node), Some(names[i]));
        }
    }
    assert_eq!(me.capable_unwatched("work", &[]), 0);
}

/// Moves what `a` and `b` send each other (broadcasts and deltas to one node) until
/// neither has anything left, losing each message for which `lose` says so; the
/// number of requests for a whole list that were made.
fn exchange(a: &mut Registry, b: &mut Registry, mut lose: impl FnMut() -> bool) -> usize {
    let mut requests = 0;
    loop {
        let (moved_ab, asked_ab) = pass(a, "a", b, &mut lose);
        let (moved_ba, asked_ba) = pass(b, "b", a, &mut lose);
        requests += asked_ab + asked_ba;
        if moved_ab + moved_ba == 0 {
            return requests;
        }
    }
}

/// One round of [`exchange`] from `from` to `to`: how many messages went, and how many
/// of them asked for a whole list.
fn pass(
    from: &mut Registry,
    from_name: &str,
    to: &mut Registry,
    lose: &mut impl FnMut() -> bool,
) -> (usize, usize) {
    let (mut moved, mut requests) = (0, 0);
    for out in drain(from) {
        let delta = match out {
            RegistryOutput::Broadcast(delta) | RegistryOutput::Send { delta, .. } => delta,
            _ => continue,
        };
        moved += 1;
        requests += usize::from(delta.want_full);
        if !lose() {
            to.handle_delta(from_name, &delta).unwrap();
        }
    }
    (moved, requests)
}

/// `b`'s copy of `a`'s agents, with their loads.
fn copy_of_a(b: &Registry) -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = b
        .records()
        .filter(|r| &*r.node == "a")
        .map(|r| (r.agent, r.load))
        .collect();
    v.sort_unstable();
    v
}

fn list_of_a(a: &Registry) -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = a.records().map(|r| (r.agent, r.load)).collect();
    v.sort_unstable();
    v
}

/// A delta lost on the way is noticed by the next one (its list version does not
/// follow on from the one held): the receiver asks for the whole list once, and the
/// whole list repairs its copy. Later deltas follow on again and ask for nothing.
#[test]
fn a_missed_delta_is_noticed_by_the_next_and_the_whole_list_repairs_the_copy() {
    let mut a = Registry::new("a", 100, 1);
    let mut b = Registry::new("b", 100, 2);
    a.register("s", vec![cap("x", &[], 1)], 0).unwrap();
    assert_eq!(exchange(&mut a, &mut b, || false), 0);
    let lost = a.register("s", vec![cap("x", &[], 1)], 0).unwrap();
    drain(&mut a);
    assert!(b.get(lost.agent).is_none());
    a.register("s", vec![cap("x", &[], 1)], 0).unwrap();
    assert_eq!(exchange(&mut a, &mut b, || false), 1);
    assert_eq!(copy_of_a(&b), list_of_a(&a));
    a.register("s", vec![cap("x", &[], 1)], 0).unwrap();
    assert_eq!(exchange(&mut a, &mut b, || false), 0);
    assert_eq!(copy_of_a(&b), list_of_a(&a));
}

/// With no change after the loss, the summary every member gets (a few bytes, however
/// long the list) finds it: the receiver asks, at every summary until the whole list
/// arrives (a lost request is made again). A summary that finds the copy up to date
/// asks for nothing.
#[test]
fn a_summary_finds_a_missed_delta_and_asks_again_until_the_whole_list_arrives() {
    let mut a = Registry::new("a", 100, 1);
    let mut b = Registry::new("b", 100, 2);
    let x = a.register("s", vec![cap("x", &[], 1)], 0).unwrap();
    exchange(&mut a, &mut b, || false);
    b.handle_delta("a", &a.summary()).unwrap();
    assert_eq!(drain(&mut b), vec![]);
    a.update(x.agent, 3, Health::Ok);
    drain(&mut a);
    let summary = a.summary();
    assert!(summary.upserts.is_empty() && summary.removals.is_empty());
    b.handle_delta("a", &summary).unwrap();
    // The request is lost; the next summary asks again, and that one gets through.
    assert!(
        matches!(&drain(&mut b)[..], [RegistryOutput::Send { to, delta }] if &**to == "a" && delta.want_full)
    );
    b.handle_delta("a", &a.summary()).unwrap();
    assert_eq!(exchange(&mut a, &mut b, || false), 1);
    assert_eq!(copy_of_a(&b), vec![(x.agent, 3)]);
    b.handle_delta("a", &a.summary()).unwrap();
    assert_eq!(drain(&mut b), vec![]);
}

/// A whole list longer than one message goes in parts, each within the bytes given
/// (records counted at their most), and the receiver applies them together once the
/// last is in: until then it keeps the copy it held. Before, the whole list went as one
/// message, which the sender refused past 16 MiB (some 130,000 agents), and a node
/// that joined later never learnt of any of them.
#[test]
fn a_whole_list_longer_than_a_message_goes_in_parts_applied_together() {
    let mut a = Registry::new("a", 1_000, 1);
    let mut b = Registry::new("b", 1_000, 2);
    for _ in 0..10 {
        a.register("s", vec![cap("x", &["t"], 1)], 0).unwrap();
    }
    exchange(&mut a, &mut b, || false);
    let before = copy_of_a(&b);
    assert_eq!(before.len(), 10);
    // Forty more, whose deltas b misses.
    for _ in 0..40 {
        a.register("s", vec![cap("x", &["t"], 1)], 0).unwrap();
    }
    drain(&mut a);
    a.set_part_bytes(1_000);
    let parts = a.full_parts();
    assert!(parts.len() > 5, "{} parts", parts.len());
    for (i, part) in parts.iter().enumerate() {
        assert!(part.full);
        assert_eq!((part.part, part.parts), (i as u32 + 1, parts.len() as u32));
        let bytes: usize = part.upserts.iter().map(record_bytes).sum();
        assert!(bytes <= 1_000, "part {i}: {bytes} bytes");
        for record in &part.upserts {
            assert!(rmp_serde::to_vec_named(record).unwrap().len() <= record_bytes(record));
        }
    }
    let (last, first) = parts.split_last().unwrap();
    for part in first {
        b.handle_delta("a", part).unwrap();
        assert_eq!(copy_of_a(&b), before, "applied before the last part");
    }
    b.handle_delta("a", last).unwrap();
    assert_eq!(copy_of_a(&b), list_of_a(&a));
    assert_eq!(copy_of_a(&b).len(), 50);
    // Up to date: the next summary asks for nothing.
    drain(&mut b);
    b.handle_delta("a", &a.summary()).unwrap();
    assert_eq!(drain(&mut b), vec![]);
}

/// A part lost on the way drops the parts before it; the next summary finds the list
/// not held, asks for it again, and it comes in parts again.
#[test]
fn a_whole_list_missing_a_part_is_asked_for_again() {
    let mut a = Registry::new("a", 1_000, 1);
    let mut b = Registry::new("b", 1_000, 2);
    for _ in 0..30 {
        a.register("s", vec![cap("x", &[], 1)], 0).unwrap();
    }
    drain(&mut a);
    a.set_part_bytes(1_000);
    let parts = a.full_parts();
    assert!(parts.len() > 2);
    for (i, part) in parts.iter().enumerate() {
        if i != 1 {
            b.handle_delta("a", part).unwrap();
        }
    }
    assert!(copy_of_a(&b).is_empty());
    drain(&mut b);
    b.handle_delta("a", &a.summary()).unwrap();
    assert_eq!(exchange(&mut a, &mut b, || false), 1);
    assert_eq!(copy_of_a(&b), list_of_a(&a));
}

#[derive(Clone, Debug)]
enum Change {
    Register,
    Deregister,
    Load(u32),
}

fn change() -> impl proptest::strategy::Strategy<Value = Change> {
    use proptest::prelude::*;
    prop_oneof![
        3 => Just(Change::Register),
        1 => Just(Change::Deregister),
        2 => (0u32..5).prop_map(Change::Load),
    ]
}

proptest::proptest! {
    /// Whatever of `a`'s deltas, requests and whole lists (and their parts) are lost, once a summary
    /// gets through with nothing lost after it, `b` holds exactly `a`'s list; and
    /// while nothing is lost, nobody asks for a whole list.
    #[test]
    fn one_summary_after_the_last_loss_brings_a_copy_up_to_date(
        changes in proptest::collection::vec(
            (
                change(),
                proptest::bool::weighted(0.2),
                proptest::bool::weighted(0.2),
            ),
            1..60,
        ),
        part_bytes in 0usize..2_000,
    ) {
        let mut a = Registry::new("a", 1_000, 1);
        let mut b = Registry::new("b", 1_000, 2);
        // Whole lists in parts of about 0 to 13 records.
        a.set_part_bytes(part_bytes);
        let mut mine: Vec<u32> = Vec::new();
        let mut lost_any = false;
        for (i, (change, lose, summary)) in changes.into_iter().enumerate() {
            match change {
                Change::Register => {
                    mine.push(a.register("w", vec![cap("x", &[], 1)], 0).unwrap().agent);
                }
                Change::Deregister => {
                    if !mine.is_empty() {
                        a.deregister(mine.remove(i % mine.len()));
                    }
                }
                Change::Load(load) => {
                    if !mine.is_empty() {
                        a.update(mine[i % mine.len()], load, Health::Ok);
                    }
                }
            }
            lost_any |= lose;
            let requests = exchange(&mut a, &mut b, || lose);
            proptest::prop_assert!(lost_any || requests == 0);
            if summary {
                b.handle_delta("a", &a.summary()).unwrap();
                let requests = exchange(&mut a, &mut b, || lose);
                proptest::prop_assert!(lost_any || requests == 0);
            }
        }
        b.handle_delta("a", &a.summary()).unwrap();
        exchange(&mut a, &mut b, || false);
        proptest::prop_assert_eq!(copy_of_a(&b), list_of_a(&a));
    }
}

proptest::proptest! {
    /// Agents registered together share one capability list, and `capable` reuses its
    /// answer while the list is the same one: whatever the mix of shared and separate
    /// lists (equal or not), it finds exactly the agents a plain check of each record
    /// finds, in the same order, with the same capability.
    #[test]
    fn capable_finds_what_each_record_offers(picks in proptest::collection::vec((0usize..3, proptest::bool::ANY), 1..60)) {
        use std::sync::Arc;
        let lists: Vec<Arc<[Capability]>> = vec![
            vec![cap("x", &["a"], 1)].into(),
            vec![cap("x", &[], 2), cap("y", &["a"], 3)].into(),
            vec![cap("y", &[], 4)].into(),
        ];
        let mut r = Registry::new("n", 1_000, 5);
        for (kind, fresh) in picks {
            // A fresh list: equal to the shared one, but another allocation.
            let list = if fresh { lists[kind].to_vec().into() } else { lists[kind].clone() };
            r.register("t", list, 0).unwrap();
        }
        for (name, tags) in [("x", vec![]), ("x", vec!["a".to_string()]), ("y", vec![]), ("y", vec!["a".to_string()]), ("z", vec![])] {
            let found: Vec<(u32, u32)> = r.capable(name, &tags).map(|(a, c)| (a.agent, c.capacity)).collect();
            let plain: Vec<(u32, u32)> = r
                .records()
                .filter_map(|a| {
                    a.capabilities
                        .iter()
                        .find(|c| c.name == name && tags.iter().all(|t| c.tags.contains(t)))
                        .map(|c| (a.agent, c.capacity))
                })
                .collect();
            proptest::prop_assert_eq!(found, plain);
        }
    }
}
