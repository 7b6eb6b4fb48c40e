//! Lanes, datagrams and ingress security on real QUIC over loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use agentmesh_transport::tls::ClusterCa;
use agentmesh_transport::wire::{AcpErrorCode, Lane, MessageType};
use agentmesh_transport::{EndpointConfig, EventQueues, TransportError, TransportEvent, Via};
use common::*;

async fn pair(ca: &ClusterCa) -> (Node, Node) {
    let mut a = node(ca, "alpha");
    let mut b = node(ca, "beta");
    a.transport.connect(b.addr, None).await.unwrap();
    for n in [&mut a, &mut b] {
        next_matching(&mut n.events, |e| {
            matches!(e, TransportEvent::PeerUp { .. }).then_some(())
        })
        .await;
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_frames_overtake_queued_bulk_frames() {
    let ca = ClusterCa::generate().unwrap();
    let (a, mut b) = pair(&ca).await;
    let peer = a.transport.peer("beta").unwrap();
    const BULK: usize = 300;
    const URGENT: usize = 20;
    let bulk_sender = {
        let peer = peer.clone();
        tokio::spawn(async move {
            for i in 0..BULK {
                let mut body = vec![0u8; 32 * 1024];
                body[..4].copy_from_slice(&(i as u32).to_be_bytes());
                peer.send(envelope(10, &body)).await.unwrap();
            }
        })
    };
    // Let the bulk lane fill its queue and start flowing.
    let mut order = Vec::new();
    while order.len() < 10 {
        order.extend(
            receive(&mut b.events, 1)
                .await
                .into_iter()
                .map(|(via, _)| via),
        );
    }
    for i in 0..URGENT {
        peer.send(envelope(230, format!("urgent {i}").as_bytes()))
            .await
            .unwrap();
    }
    while order.len() < BULK + URGENT {
        order.extend(
            receive(&mut b.events, 1)
                .await
                .into_iter()
                .map(|(via, _)| via),
        );
    }
    bulk_sender.await.unwrap();
    let last_urgent = order
        .iter()
        .rposition(|v| *v == Via::Lane(Lane::Urgent))
        .unwrap();
    let bulk_before = order[..last_urgent]
        .iter()
        .filter(|v| **v == Via::Lane(Lane::Bulk))
        .count();
    assert_eq!(
        order
            .iter()
            .filter(|v| **v == Via::Lane(Lane::Urgent))
            .count(),
        URGENT
    );
    assert!(
        bulk_before < BULK / 2,
        "{bulk_before} of {BULK} bulk frames arrived before the last urgent one"
    );
}

#[tokio::test]
async fn a_malformed_frame_closes_only_the_offender() {
    let ca = ClusterCa::generate().unwrap();
    let (a, mut b) = pair(&ca).await;
    let raw = RawClient::new(&ca.node_identity("gamma").unwrap());
    let conn = raw.connect(a.addr, "alpha").await;
    let mut stream = conn.open_uni().await.unwrap();
    // Version 2 in the first nibble.
    stream
        .write_all(&[0x29, 0, 96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    assert_eq!(
        close_code(&conn).await,
        Some(u64::from(AcpErrorCode::UnsupportedVersion.code()))
    );
    assert_eq!(
        a.transport
            .stats()
            .closed_with(AcpErrorCode::UnsupportedVersion),
        1
    );
    a.transport
        .send("beta", envelope(96, b"still here"))
        .await
        .unwrap();
    let got = receive(&mut b.events, 1).await;
    assert_eq!(&got[0].1.body[..], b"still here");
}

#[tokio::test]
async fn a_replayed_frame_is_dropped_and_counted() {
    let ca = ClusterCa::generate().unwrap();
    let mut a = node(&ca, "alpha");
    let raw = RawClient::new(&ca.node_identity("gamma").unwrap());
    let conn = raw.connect(a.addr, "alpha").await;
    let mut stream = conn.open_uni().await.unwrap();
    let first = frame_bytes(MessageType::Envelope, 96, 0, 5, b"once");
    stream.write_all(&first).await.unwrap();
    stream.write_all(&first).await.unwrap();
    stream
        .write_all(&frame_bytes(MessageType::Envelope, 96, 0, 6, b"next"))
        .await
        .unwrap();
    let got = receive(&mut a.events, 2).await;
    let bodies: Vec<&[u8]> = got.iter().map(|(_, m)| &m.body[..]).collect();
    assert_eq!(bodies, [&b"once"[..], &b"next"[..]]);
    assert_eq!(a.transport.stats().replayed(), 1);
    assert!(
        conn.close_reason().is_none(),
        "a replay is dropped, not fatal"
    );
}

#[tokio::test]
async fn reports_travel_as_datagrams_and_oversized_ones_fall_back_to_the_bulk_lane() {
    let ca = ClusterCa::generate().unwrap();
    let (a, mut b) = pair(&ca).await;
    let peer = a.transport.peer("beta").unwrap();
    let mut report = envelope(96, &[1; 100]);
    report.header.msg_type = MessageType::Report;
    assert_eq!(
        peer.send_datagram(report.clone()).await.unwrap(),
        Via::Datagram
    );
    let got = receive(&mut b.events, 1).await;
    assert_eq!(got[0].0, Via::Datagram);
    assert!(got[0].1.timestamp_ms.is_some());
    report.body = vec![2; 5_000].into();
    assert_eq!(
        peer.send_datagram(report).await.unwrap(),
        Via::Lane(Lane::Bulk)
    );
    let got = receive(&mut b.events, 1).await;
    assert_eq!(got[0].0, Via::Lane(Lane::Bulk));
    assert_eq!(got[0].1.body.len(), 5_000);
    assert_eq!(a.transport.stats().datagram_fallbacks, 1);
}

/// Membership gossip has a queue of its own at the receiver, read first: a flood of
/// progress REPORT datagrams that fills the datagram queue sheds REPORTs, not the
/// failure detector's probes, which would have busy nodes declared down. (Found with
/// 10,000 replicas finishing at once: two nodes declared each other down over and over.)
#[tokio::test]
async fn a_flood_of_report_datagrams_does_not_crowd_out_membership_gossip() {
    let ca = ClusterCa::generate().unwrap();
    let mut a = node(&ca, "alpha");
    let queues = EventQueues {
        datagrams: 4,
        gossip: 16,
        ..EventQueues::default()
    };
    let mut config = EndpointConfig::new(loopback());
    config.event_queues = queues;
    let mut b = node_with(&ca, "beta", config);
    a.transport.connect(b.addr, None).await.unwrap();
    for n in [&mut a, &mut b] {
        next_matching(&mut n.events, |e| {
            matches!(e, TransportEvent::PeerUp { .. }).then_some(())
        })
        .await;
    }
    let peer = a.transport.peer("beta").unwrap();
    // beta reads nothing meanwhile.
    for i in 0..40u8 {
        let mut report = envelope(96, &[i; 100]);
        report.header.msg_type = MessageType::Report;
        assert_eq!(peer.send_datagram(report).await.unwrap(), Via::Datagram);
    }
    for i in 0..10u8 {
        let mut gossip = envelope(160, &[i; 100]);
        gossip.header.msg_type = MessageType::Membership;
        assert_eq!(peer.send_datagram(gossip).await.unwrap(), Via::Datagram);
    }
    // Time for all to arrive before beta reads (one that came later would find room).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut gossip = Vec::new();
    let mut reports = 0;
    while let Ok(got) =
        tokio::time::timeout(Duration::from_millis(300), receive(&mut b.events, 1)).await
    {
        let (_, message) = &got[0];
        match message.header.msg_type {
            MessageType::Membership => gossip.push(message.body[0]),
            _ => reports += 1,
        }
    }
    assert_eq!(gossip, (0..10).collect::<Vec<u8>>());
    assert!(reports <= 4, "{reports} REPORTs in a queue of 4");
}

/// A message longer than peers take (`max_message_bytes`) is refused at the sender,
/// and the connection goes on. Before, it went out, and the receiver closed the
/// connection for it (FRAME_TOO_LARGE), taking everything else on it down; a worker's
/// final REPORT, sent again on each new connection, closed each of them in turn.
#[tokio::test]
async fn a_message_longer_than_peers_take_is_refused_at_the_sender() {
    let ca = ClusterCa::generate().unwrap();
    let (a, mut b) = pair(&ca).await;
    let peer = a.transport.peer("beta").unwrap();
    let limit = a.transport.max_message_bytes();
    let too_long = envelope(96, &vec![7; limit + 1]);
    assert!(matches!(
        peer.send(too_long).await,
        Err(e @ TransportError::TooLarge { .. }) if e.never_sendable()
    ));
    // The longest one allowed goes, and the connection stays open.
    peer.send(envelope(96, &vec![8; limit])).await.unwrap();
    let got = receive(&mut b.events, 1).await;
    assert_eq!(got[0].1.body.len(), limit);
    assert!(peer.is_open());
    assert_eq!(b.transport.stats().closed_for_cause, [0; 16]);
}

#[tokio::test]
async fn a_frame_with_an_agent_id_the_peer_does_not_own_is_refused() {
    let ca = ClusterCa::generate().unwrap();
    let mut a = node(&ca, "alpha");
    let c = node(&ca, "gamma");
    a.transport.ownership().assign(42, "beta");
    a.transport.ownership().assign(43, "gamma");
    c.transport.connect(a.addr, None).await.unwrap();
    for agent in [42, 43] {
        let mut m = envelope(96, format!("as {agent}").as_bytes());
        m.header.agent = agent;
        c.transport.send("alpha", m).await.unwrap();
    }
    let got = receive(&mut a.events, 1).await;
    assert_eq!(got[0].1.header.agent, 43);
    assert_eq!(a.transport.stats().not_owned(), 1);
}

/// Connects once (leaving a session ticket behind), then reconnects in 0-RTT.
async fn resumed_0rtt(raw: &RawClient, addr: std::net::SocketAddr) -> quinn::Connection {
    let first = raw.connect(addr, "alpha").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.close(0u32.into(), b"bye");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let connecting = raw
        .endpoint
        .connect_with(raw.config.clone(), addr, "alpha")
        .unwrap();
    let (conn, _accepted) = connecting
        .into_0rtt()
        .unwrap_or_else(|_| panic!("no 0-RTT on resumption"));
    conn
}

#[tokio::test]
async fn actor_messages_are_accepted_in_0rtt_data() {
    let ca = ClusterCa::generate().unwrap();
    let mut a = node(&ca, "alpha");
    let raw = RawClient::new(&ca.node_identity("gamma").unwrap());
    let conn = resumed_0rtt(&raw, a.addr).await;
    let mut normal = conn.open_uni().await.unwrap();
    normal
        .write_all(&frame_bytes(MessageType::Envelope, 96, 0, 0, b"early"))
        .await
        .unwrap();
    let got = receive(&mut a.events, 1).await;
    assert_eq!(&got[0].1.body[..], b"early");
    assert!(conn.close_reason().is_none());
}

#[tokio::test]
async fn state_changing_frames_are_refused_in_0rtt_data() {
    let ca = ClusterCa::generate().unwrap();
    let a = node(&ca, "alpha");
    let raw = RawClient::new(&ca.node_identity("gamma").unwrap());
    let conn = resumed_0rtt(&raw, a.addr).await;
    let mut coordination = conn.open_uni().await.unwrap();
    coordination
        .write_all(&frame_bytes(MessageType::Allocate, 160, 0, 0, b"x"))
        .await
        .unwrap();
    // The refusal comes while the handshake still runs, when QUIC may not carry an
    // application code (RFC 9000 section 10.2.3): the client sees a bare abort, or the
    // code if the handshake finished first. The server counts it by code.
    let code = close_code(&conn).await;
    assert!(
        code.is_none() || code == Some(u64::from(AcpErrorCode::ZeroRttRefused.code())),
        "{code:?}"
    );
    assert_eq!(
        a.transport
            .stats()
            .closed_with(AcpErrorCode::ZeroRttRefused),
        1
    );
}

#[tokio::test]
async fn simultaneous_dials_leave_one_connection_on_both_sides() {
    let ca = ClusterCa::generate().unwrap();
    let mut a = node(&ca, "alpha");
    let mut b = node(&ca, "beta");
    let (x, y) = tokio::join!(
        a.transport.connect(b.addr, Some("beta")),
        b.transport.connect(a.addr, Some("alpha"))
    );
    assert_eq!(&*x.unwrap(), "beta");
    assert_eq!(&*y.unwrap(), "alpha");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (n, peer) in [(&a, "beta"), (&b, "alpha")] {
        let peers = n.transport.peers();
        assert_eq!(peers.len(), 1);
        assert!(n.transport.peer(peer).unwrap().is_open());
    }
    a.transport
        .send("beta", envelope(96, b"to b"))
        .await
        .unwrap();
    b.transport
        .send("alpha", envelope(96, b"to a"))
        .await
        .unwrap();
    assert_eq!(&receive(&mut b.events, 1).await[0].1.body[..], b"to b");
    assert_eq!(&receive(&mut a.events, 1).await[0].1.body[..], b"to a");
}

/// Both nodes dial at once and send from the moment their dial returns, so frames go
/// out on the connection that is about to lose: every frame a send took must arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_on_the_losing_connection_of_simultaneous_dials_all_arrive() {
    const EACH: u32 = 300;
    let ca = ClusterCa::generate().unwrap();
    // Beta, which loses, dials first; alpha dials a little later each round, so some
    // rounds find beta's connection in use when alpha's arrives.
    let mut retirements = 0;
    for round in 0..20u64 {
        let mut a = node(&ca, "alpha");
        let mut b = node(&ca, "beta");
        let send_all = |n: &Node, to: &'static str, addr, after: u64| {
            let transport = n.transport.clone();
            async move {
                tokio::time::sleep(Duration::from_micros(after)).await;
                transport.connect(addr, Some(to)).await.unwrap();
                let mut taken = 0;
                for i in 0..EACH {
                    if transport
                        .send(to, envelope(96, &i.to_be_bytes()))
                        .await
                        .is_ok()
                    {
                        taken += 1;
                    }
                    if i % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                taken
            }
        };
        let (to_b, to_a) = tokio::join!(
            send_all(&a, "beta", b.addr, round * 150),
            send_all(&b, "alpha", a.addr, 0)
        );
        assert_eq!(
            (to_b, to_a),
            (EACH, EACH),
            "round {round}: every send taken"
        );
        for (n, from) in [(&mut a, "beta"), (&mut b, "alpha")] {
            let mut got: Vec<u32> = receive(&mut n.events, EACH as usize)
                .await
                .into_iter()
                .map(|(_, m)| u32::from_be_bytes(m.body[..].try_into().unwrap()))
                .collect();
            got.sort_unstable();
            assert_eq!(
                got,
                (0..EACH).collect::<Vec<_>>(),
                "round {round}: from {from}"
            );
        }
        // The losing connection, retired on both sides, drains and closes, never on
        // the timeout.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while [&a, &b].iter().any(|n| n.transport.open_connections() > 1)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for n in [&a, &b] {
            assert_eq!(n.transport.open_connections(), 1, "round {round}");
        }
        let retired = |n: &Node| n.transport.stats().duplicates_retired;
        assert_eq!(retired(&a), retired(&b), "round {round}");
        assert_eq!(retired(&a)[1], 0, "round {round}: none closed late");
        retirements += retired(&a)[0];
    }
    assert!(retirements > 0, "no round had a duplicate connection");
}

/// Two dials from one node to the same peer at once (membership and a node coming up
/// both dial, say) make one connection: the second waits for the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_dials_from_one_node_to_one_peer_make_one_connection() {
    let ca = ClusterCa::generate().unwrap();
    for round in 0..10 {
        let a = node(&ca, "alpha");
        let mut b = node(&ca, "beta");
        let (x, y, z) = tokio::join!(
            a.transport.connect(b.addr, Some("beta")),
            a.transport.connect(b.addr, Some("beta")),
            a.transport.connect(b.addr, None)
        );
        for name in [x, y, z] {
            assert_eq!(&*name.unwrap(), "beta", "round {round}");
        }
        a.transport
            .send("beta", envelope(96, b"after"))
            .await
            .unwrap();
        assert_eq!(&receive(&mut b.events, 1).await[0].1.body[..], b"after");
        for n in [&a, &b] {
            assert_eq!(n.transport.open_connections(), 1, "round {round}");
            assert_eq!(
                n.transport.stats().duplicates_retired,
                [0, 0],
                "round {round}"
            );
        }
    }
}

/// A dial by address alone to a peer already connected at that address (a seed that
/// dialled this node first, or a dial that ended at once on a resumed session) uses
/// that connection. Before, it made a second one, which the two nodes then retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_by_address_to_a_connected_peer_makes_no_second_connection() {
    let ca = ClusterCa::generate().unwrap();
    let (a, b) = pair(&ca).await;
    assert_eq!(&*b.transport.connect(a.addr, None).await.unwrap(), "alpha");
    assert_eq!(&*a.transport.connect(b.addr, None).await.unwrap(), "beta");
    for n in [&a, &b] {
        assert_eq!(n.transport.open_connections(), 1);
        assert_eq!(n.transport.stats().duplicates_retired, [0, 0]);
    }
}

#[tokio::test]
async fn a_leaving_peer_is_reported_down_at_once() {
    let ca = ClusterCa::generate().unwrap();
    let (mut a, b) = pair(&ca).await;
    b.transport.shutdown(AcpErrorCode::Leaving, "bye").await;
    let (peer, reason) = next_matching(&mut a.events, |e| match e {
        TransportEvent::PeerDown { peer, reason, .. } => Some((peer, reason)),
        _ => None,
    })
    .await;
    assert_eq!(&*peer, "beta");
    assert!(
        reason.contains("11") || reason.to_lowercase().contains("closed"),
        "{reason}"
    );
}

#[tokio::test]
async fn over_its_rate_a_peer_loses_bulk_frames_first_and_never_urgent_ones() {
    let ca = ClusterCa::generate().unwrap();
    let mut config = agentmesh_transport::EndpointConfig::new(loopback());
    // A bucket of 64 KiB that barely refills: bulk needs it half full to pass.
    config.ingress = agentmesh_transport::ingress::IngressLimits {
        rate_bytes_per_sec: 1,
        burst_bytes: 64 * 1024,
    };
    let mut a = node_with(&ca, "alpha", config);
    let b = node(&ca, "beta");
    b.transport.connect(a.addr, None).await.unwrap();
    let peer = loop {
        if let Some(p) = b.transport.peer("alpha") {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // 40 KiB of bulk: the first 8 KiB frames pass while the bucket is over half full.
    for _ in 0..5 {
        peer.send(envelope(10, &[0; 8 * 1024])).await.unwrap();
    }
    for i in 0..5u8 {
        peer.send(envelope(230, &[i; 100])).await.unwrap();
    }
    let mut urgent = 0;
    let mut bulk = 0;
    while urgent < 5 {
        for (via, _) in receive(&mut a.events, 1).await {
            match via {
                Via::Lane(Lane::Urgent) => urgent += 1,
                Via::Lane(Lane::Bulk) => bulk += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Some(event) = a.events.try_recv() {
        if let TransportEvent::Received {
            via: Via::Lane(Lane::Bulk),
            messages,
            ..
        } = event
        {
            bulk += messages.len();
        }
    }
    let shed = a.transport.stats().shed;
    assert_eq!(urgent, 5, "urgent frames are never shed");
    assert!(
        bulk < 5,
        "{bulk} bulk frames passed a bucket that only had room for a few"
    );
    assert_eq!(
        shed[Lane::Bulk.index()] as usize,
        5 - bulk,
        "every bulk frame not delivered was counted as shed"
    );
    assert_eq!(shed[Lane::Urgent.index()], 0);
}

/// Takes the messages whose body starts with `in`, in the order it is given them.
struct TakeIn(std::sync::Mutex<Vec<(Lane, Vec<u8>)>>);

impl agentmesh_transport::Inbox for TakeIn {
    fn take<'a>(
        &'a self,
        _: &'a agentmesh_transport::PeerName,
        lane: Lane,
        messages: Vec<agentmesh_transport::Message>,
    ) -> agentmesh_transport::Leftover<'a> {
        Box::pin(async move {
            let (taken, left): (Vec<_>, Vec<_>) = messages
                .into_iter()
                .partition(|m| m.body.starts_with(b"in"));
            let mut got = self.0.lock().unwrap();
            got.extend(taken.into_iter().map(|m| (lane, m.body.to_vec())));
            left
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_takes_lane_messages_in_lane_order_and_leaves_the_rest_to_the_events() {
    let ca = ClusterCa::generate().unwrap();
    let (a, mut b) = pair(&ca).await;
    let inbox = std::sync::Arc::new(TakeIn(std::sync::Mutex::new(Vec::new())));
    assert!(b.transport.set_inbox(inbox.clone()));
    assert!(
        !b.transport.set_inbox(inbox.clone()),
        "only the first inbox counts"
    );
    let peer = a.transport.peer("beta").unwrap();
    for i in 0..300 {
        let (prio, body) = match i % 3 {
            0 => (96, format!("in-{i}")),
            1 => (224, format!("in-{i}")),
            _ => (96, format!("out-{i}")),
        };
        peer.send(envelope(prio, body.as_bytes())).await.unwrap();
    }
    let left = receive(&mut b.events, 100).await;
    let left: Vec<(Via, String)> = left
        .into_iter()
        .map(|(via, m)| (via, String::from_utf8(m.body.to_vec()).unwrap()))
        .collect();
    let expected: Vec<(Via, String)> = (0..300)
        .filter(|i| i % 3 == 2)
        .map(|i| (Via::Lane(Lane::Normal), format!("out-{i}")))
        .collect();
    assert_eq!(left, expected, "what the inbox leaves reaches the events");
    // The inbox ran before the leftovers were queued, so it has seen all of the
    // normal lane; the urgent lane is read by a task of its own.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while inbox.0.lock().unwrap().len() < 200 {
        assert!(tokio::time::Instant::now() < deadline, "the inbox got 200");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = inbox.0.lock().unwrap().clone();
    for (lane, rest) in [(Lane::Normal, 0), (Lane::Urgent, 1)] {
        let on_lane: Vec<String> = got
            .iter()
            .filter(|(l, _)| *l == lane)
            .map(|(_, b)| String::from_utf8(b.clone()).unwrap())
            .collect();
        let expected: Vec<String> = (0..300)
            .filter(|i| i % 3 == rest)
            .map(|i| format!("in-{i}"))
            .collect();
        assert_eq!(on_lane, expected, "{lane:?}: taken in lane order");
    }
    assert!(b.events.try_recv().is_none(), "nothing else was queued");
}

/// A sender that finds a lower lane idle writes to its stream itself; others queue for
/// the lane's writer. Mixed, every message still arrives once and in its sender's
/// order, and none is taken for a replay (the sequence numbers stay in lane order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_that_find_a_lower_lane_idle_write_to_it_themselves_in_lane_order() {
    let ca = ClusterCa::generate().unwrap();
    let (a, mut b) = pair(&ca).await;
    let peer = a.transport.peer("beta").unwrap();
    const SENDERS: u32 = 4;
    const EACH: u32 = 1000;
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let peer = peer.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    let body = format!("{s}:{i}");
                    peer.send(envelope(96, body.as_bytes())).await.unwrap();
                    // Pauses leave the lane idle now and then; between them the four
                    // senders contend and queue.
                    if i % 100 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    } else if i % 4 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    let got = receive(&mut b.events, (SENDERS * EACH) as usize).await;
    let mut next = vec![0u32; SENDERS as usize];
    for (via, m) in got {
        assert_eq!(via, Via::Lane(Lane::Normal));
        let body = String::from_utf8(m.body.to_vec()).unwrap();
        let (s, i) = body.split_once(':').unwrap();
        let (s, i): (usize, u32) = (s.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, next[s], "sender {s}: in order, none missing");
        next[s] += 1;
    }
    assert_eq!(next, vec![EACH; SENDERS as usize]);
    assert_eq!(b.transport.stats().replayed(), 0);
    // The writer counts frames once quinn has taken them, which may be just after the
    // receiver already has them: wait for the count rather than race it.
    let normal = Lane::Normal.index();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.transport.stats().frames_out[normal] < u64::from(SENDERS * EACH)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = a.transport.stats();
    assert_eq!(sent.frames_out[normal], u64::from(SENDERS * EACH));
    assert!(
        sent.direct_sends[normal] > 0,
        "a sender that found the lane idle wrote to it"
    );
    assert!(
        sent.direct_sends[normal] < u64::from(SENDERS * EACH),
        "the first message opened the stream through the writer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_may_not_wait_sends_only_what_the_lane_takes_at_once() {
    let ca = ClusterCa::generate().unwrap();
    let (a, mut b) = pair(&ca).await;
    let peer = a.transport.peer("beta").unwrap();
    // Urgent (written by its senders) and normal (a queue and a writer task).
    for (prio, lane) in [(224u8, Lane::Urgent), (96, Lane::Normal)] {
        // The lane's stream is not open yet: nothing is sent, the caller must wait.
        let early = envelope(prio, b"early");
        assert!(!peer.try_send_ref(early.parts()).unwrap(), "{lane:?}");
        peer.send(envelope(prio, b"opens")).await.unwrap();
        let got = receive(&mut b.events, 1).await;
        assert_eq!(&got[0].1.body[..], b"opens");
        // Open and idle: taken at once. A writer task may still hold the stream for a
        // moment after its last write, so the first may need a few tries.
        let first = envelope(prio, b"now 0");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !peer.try_send_ref(first.parts()).unwrap() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{lane:?} never idle"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for i in 1..10 {
            let m = envelope(prio, format!("now {i}").as_bytes());
            assert!(peer.try_send_ref(m.parts()).unwrap(), "{lane:?} {i}");
        }
        let got = receive(&mut b.events, 10).await;
        for (i, (via, m)) in got.into_iter().enumerate() {
            assert_eq!(via, Via::Lane(lane));
            assert_eq!(
                m.body,
                format!("now {i}").as_bytes(),
                "in order, none twice"
            );
        }
    }
}
