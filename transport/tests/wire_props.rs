//! Properties of the ACP codec: encode then decode is the identity, for frames,
//! fragmented messages and payloads; decoding arbitrary bytes never panics.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;

use agentmesh_transport::wire::payload::*;
use agentmesh_transport::wire::{
    decode_all, Flags, Frame, FrameDecoder, Header, Message, MessageType, Payload, Reassembler,
    MAX_PAYLOAD_LEN,
};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use uuid::Uuid;

fn any_type() -> impl Strategy<Value = MessageType> {
    proptest::sample::select(MessageType::ALL.to_vec())
}

fn any_header() -> impl Strategy<Value = Header> {
    (
        any_type(),
        0u8..0x10,
        any::<u8>(),
        any::<u16>(),
        any::<u32>(),
        any::<u16>(),
    )
        .prop_map(|(msg_type, flags, prio, group, agent, seq)| Header {
            msg_type,
            flags: Flags::from_bits(flags).unwrap(),
            prio,
            group,
            agent,
            seq,
        })
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn text() -> impl Strategy<Value = String> {
    "[a-z0-9._ -]{0,40}"
}

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn health() -> impl Strategy<Value = Health> {
    prop_oneof![
        Just(Health::Ok),
        Just(Health::Degraded),
        Just(Health::Unhealthy)
    ]
}

/// A refusal and its retry-after, as a worker's node sends them (with an error).
fn refusal() -> impl Strategy<Value = (Option<Refusal>, Option<u32>)> {
    prop_oneof![
        Just((None, None)),
        Just((Some(Refusal::Policy), None)),
        Just((Some(Refusal::NoAgent), None)),
        any::<u32>().prop_map(|ms| (Some(Refusal::Rate), Some(ms))),
    ]
}

fn capability() -> impl Strategy<Value = Capability> {
    (
        text(),
        text(),
        proptest::collection::vec(text(), 0..4),
        any::<u32>(),
    )
        .prop_map(|(name, version, tags, capacity)| Capability {
            name,
            version,
            tags,
            capacity,
        })
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        (
            any::<u32>(),
            uuid(),
            any::<u32>(),
            any::<u32>(),
            text(),
            any::<u32>(),
            bytes(300),
            proptest::collection::vec(any::<u32>(), 0..4),
            proptest::collection::btree_map(text(), text(), 0..3),
        )
            .prop_map(
                |(target, task, segment, attempt, capability, timeout_ms, input, peers, params)| {
                    Payload::Allocate(Allocate {
                        target,
                        task,
                        segment,
                        attempt,
                        capability,
                        timeout_ms,
                        input,
                        peers,
                        params,
                    })
                }
            ),
        (
            any::<u32>(),
            uuid(),
            any::<u32>(),
            0u16..=1000,
            health(),
            any::<u32>(),
            proptest::option::of(bytes(100)),
            any::<bool>(),
            text(),
            refusal()
        )
            .prop_map(
                |(
                    target,
                    task,
                    segment,
                    progress_permille,
                    health,
                    load,
                    output,
                    failed,
                    why,
                    refusal,
                )| {
                    let error = (failed && output.is_none()).then_some(why);
                    let (refused, retry_after_ms) = if error.is_some() {
                        refusal
                    } else {
                        (None, None)
                    };
                    Payload::Report(Report {
                        target,
                        task,
                        segment,
                        attempt: 1,
                        progress_permille,
                        health,
                        load,
                        output,
                        error,
                        refused,
                        retry_after_ms,
                    })
                }
            ),
        (
            any::<u32>(),
            uuid(),
            any::<u32>(),
            any::<u32>(),
            bytes(MAX_HASH_LEN + 1),
            bytes(100)
        )
            .prop_map(
                |(target, task, segment, round, hash, body)| Payload::Sync(Sync {
                    target,
                    task,
                    segment,
                    round,
                    hash,
                    body
                })
            ),
        (
            any::<u32>(),
            uuid(),
            proptest::option::of(any::<u32>()),
            proptest::collection::btree_map(text(), text(), 0..4),
            proptest::option::of(any::<u8>()),
            any::<bool>(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(
                |(target, task, segment, params, priority, cancel, attempt)| Payload::Adjust(
                    Adjust {
                        target,
                        task,
                        segment,
                        params: params.into_iter().collect::<BTreeMap<_, _>>(),
                        priority,
                        cancel,
                        // An attempt is named only with its segment.
                        attempt: segment.and(attempt),
                    }
                )
            ),
        (
            any::<u64>(),
            text(),
            proptest::collection::vec(capability(), 0..3)
        )
            .prop_map(
                |(nonce, agent_type, capabilities)| Payload::Register(Register {
                    nonce,
                    agent_type,
                    capabilities
                })
            ),
        (any::<u64>(), any::<u32>(), any::<u16>()).prop_map(|(nonce, agent, group)| {
            Payload::RegisterAck(RegisterAck {
                nonce,
                agent,
                group,
            })
        }),
        (
            any::<u64>(),
            text(),
            proptest::collection::vec(text(), 0..3),
            any::<u32>()
        )
            .prop_map(
                |(query, capability, tags, limit)| Payload::QueryCapableAgents(
                    QueryCapableAgents {
                        query,
                        capability,
                        tags,
                        limit
                    }
                )
            ),
        (
            any::<u64>(),
            proptest::collection::vec(
                (
                    any::<u32>(),
                    text(),
                    text(),
                    any::<u16>(),
                    capability(),
                    any::<u32>(),
                    health()
                ),
                0..4
            )
        )
            .prop_map(|(query, agents)| Payload::ListAgents(ListAgents {
                query,
                agents: agents
                    .into_iter()
                    .map(
                        |(agent, node, agent_type, group, capability, load, health)| AgentInfo {
                            agent,
                            node,
                            agent_type,
                            group,
                            capability,
                            load,
                            health
                        }
                    )
                    .collect()
            })),
        (
            any::<u32>(),
            uuid(),
            any::<u32>(),
            any::<u32>(),
            bytes(MAX_HASH_LEN + 1),
            any::<bool>()
        )
            .prop_map(
                |(target, task, segment, round, hash, agreed)| Payload::SyncAck(SyncAck {
                    target,
                    task,
                    segment,
                    round,
                    hash,
                    agreed
                })
            ),
        (
            text(),
            text(),
            any::<u64>(),
            any::<bool>(),
            proptest::option::of(any::<u128>()),
            bytes(200)
        )
            .prop_map(
                |(to, kind, correlation, reply, trace, body)| Payload::Envelope(Envelope {
                    to,
                    kind,
                    correlation,
                    reply,
                    trace_id: trace.map(|t| Bytes::copy_from_slice(&t.to_be_bytes())),
                    body
                })
            ),
        bytes(200).prop_map(|gossip| Payload::Membership(Membership { gossip })),
        (
            prop_oneof![
                Just(ControlOp::Ping),
                Just(ControlOp::Pong),
                Just(ControlOp::Leave)
            ],
            any::<u64>(),
            text()
        )
            .prop_map(|(op, nonce, node)| Payload::Control(Control { op, nonce, node })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn frames_survive_encode_then_decode(header in any_header(), body in bytes(2_000), ts in proptest::option::of(any::<u64>())) {
        let frame = match ts {
            Some(ts) => Frame::timestamped(header, ts, body),
            None => Frame::new(header, body),
        }.unwrap();
        let wire = frame.to_bytes();
        prop_assert_eq!(wire.len(), frame.encoded_len());
        prop_assert_eq!(decode_all(&wire, MAX_PAYLOAD_LEN).unwrap(), vec![frame]);
    }

    #[test]
    fn payloads_survive_encode_then_decode_in_msgpack_and_json(p in payload()) {
        let wire = p.encode().unwrap();
        prop_assert_eq!(&Payload::decode(p.msg_type(), &wire).unwrap(), &p);
        let json = serde_json::to_value(&p).unwrap();
        prop_assert_eq!(&Payload::deserialize_as(p.msg_type(), json).unwrap(), &p);
    }

    #[test]
    fn messages_survive_fragmentation_over_a_chunked_stream(
        header in any_header(),
        len in 0usize..300_000,
        chunk in 1usize..70_000,
        frame_max in 1usize..=MAX_PAYLOAD_LEN,
        first_seq in any::<u16>(),
    ) {
        let body = Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let msg = Message::new(header, body);
        let frames = msg.clone().into_frames(first_seq, frame_max).unwrap();
        let mut wire = BytesMut::new();
        for f in &frames { f.encode(&mut wire); }
        let mut dec = FrameDecoder::default();
        let mut reasm = Reassembler::new(Reassembler::DEFAULT_MAX_MESSAGE_LEN);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                if let Some(m) = reasm.push(f).unwrap() { out.push(m); }
            }
        }
        let mut want = msg;
        want.header.seq = first_seq;
        want.header.flags = want.header.flags.without(Flags::CONTINUATION).without(Flags::TIMESTAMPED);
        prop_assert_eq!(out, vec![want]);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(data in proptest::collection::vec(any::<u8>(), 0..400), limit in 0usize..=MAX_PAYLOAD_LEN) {
        let mut dec = FrameDecoder::new(limit);
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(frame)) = dec.decode(&mut buf) {
            for t in MessageType::ALL {
                let _ = Payload::decode(t, frame.body());
            }
        }
        let _ = decode_all(&Bytes::from(data.clone()), limit);
        let _ = Frame::decode_datagram(Bytes::from(data.clone()), limit);
        for t in MessageType::ALL {
            let _ = Payload::decode(t, &data);
        }
    }

    #[test]
    fn arbitrary_bodies_after_a_valid_header_never_panic(header in any_header(), body in bytes(400)) {
        let wire = Frame::new(header, body).unwrap().to_bytes();
        if let Ok(frames) = decode_all(&wire, MAX_PAYLOAD_LEN) {
            for f in frames { let _ = Payload::decode(f.header().msg_type, f.body()); }
        }
    }
}
