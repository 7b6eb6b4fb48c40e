//! Checks the codec against `docs/acp-test-vectors.json`, which an independent
//! Python implementation (`docs/acp_vectors.py`) builds from `docs/acp.md`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use agentmesh_transport::wire::{
    decode_all, DecodeError, Frame, Header, MessageType, Payload, MAX_PAYLOAD_LEN,
};
use bytes::Bytes;
use serde_json::Value;

const VECTORS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../docs/acp-test-vectors.json"
));

fn vectors() -> Value {
    serde_json::from_str(VECTORS).expect("the vector file is JSON")
}

fn bytes_of(v: &Value) -> Bytes {
    Bytes::from(hex::decode(v["hex"].as_str().unwrap()).unwrap())
}

fn int(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is an integer"))
}

#[test]
fn there_are_enough_vectors_covering_every_type() {
    let all = vectors();
    let valid = all["valid"].as_array().unwrap();
    assert!(valid.len() >= 8);
    for t in MessageType::ALL {
        assert!(
            valid.iter().any(|v| v["header"]["type"] == t.name()),
            "no vector for {t}"
        );
    }
}

#[test]
fn valid_vectors_decode_to_their_fields() {
    for v in vectors()["valid"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let wire = bytes_of(v);
        let frames = decode_all(&wire, MAX_PAYLOAD_LEN).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(frames.len(), 1, "{name}");
        let frame = &frames[0];
        let h = frame.header();
        let want = &v["header"];
        assert_eq!(int(want, "ver"), 1, "{name}");
        assert_eq!(h.msg_type.name(), want["type"], "{name}");
        assert_eq!(
            u64::from(h.msg_type.code()),
            int(want, "type_code"),
            "{name}"
        );
        assert_eq!(u64::from(h.flags.bits()), int(want, "flags"), "{name}");
        assert_eq!(u64::from(h.prio), int(want, "prio"), "{name}");
        assert_eq!(u64::from(h.group), int(want, "group"), "{name}");
        assert_eq!(u64::from(h.agent), int(want, "agent_id"), "{name}");
        assert_eq!(u64::from(h.seq), int(want, "seq"), "{name}");
        assert_eq!(u64::from(frame.payload_len()), int(want, "len"), "{name}");
        assert_eq!(frame.timestamp_ms(), v["timestamp_ms"].as_u64(), "{name}");
        match v.get("payload") {
            Some(json) => {
                let p = Payload::decode(h.msg_type, frame.body())
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(&serde_json::to_value(&p).unwrap(), json, "{name}");
            }
            None => {
                assert_eq!(v["payload_decodes"], false, "{name}");
                assert!(Payload::decode(h.msg_type, frame.body()).is_err(), "{name}");
            }
        }
    }
}

#[test]
fn encoding_the_fields_gives_the_vector_back() {
    for v in vectors()["valid"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let want = &v["header"];
        let msg_type = MessageType::from_name(want["type"].as_str().unwrap()).unwrap();
        let header = Header {
            msg_type,
            flags: agentmesh_transport::Flags::from_bits(int(want, "flags") as u8).unwrap(),
            prio: int(want, "prio") as u8,
            group: int(want, "group") as u16,
            agent: int(want, "agent_id") as u32,
            seq: int(want, "seq") as u16,
        };
        let body = match v.get("payload") {
            Some(json) => {
                let p = Payload::deserialize_as(msg_type, json.clone()).unwrap();
                p.validate().unwrap();
                Bytes::from(p.encode().unwrap())
            }
            None => bytes_of(v).slice(13..),
        };
        let frame = match v["timestamp_ms"].as_u64() {
            Some(ts) => Frame::timestamped(header, ts, body),
            None => Frame::new(header, body),
        }
        .unwrap();
        assert_eq!(
            hex::encode(frame.to_bytes()),
            v["hex"].as_str().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn invalid_vectors_are_refused_for_their_reason() {
    for v in vectors()["invalid"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let reason = v["error"].as_str().unwrap();
        let got = match decode_all(&bytes_of(v), MAX_PAYLOAD_LEN) {
            Err(DecodeError::UnsupportedVersion { .. }) => "unsupported_version",
            Err(DecodeError::UnknownType { .. }) => "unknown_type",
            Err(DecodeError::ReservedFlags { .. }) => "reserved_flags",
            Err(DecodeError::FragmentedTimestamp) => "fragmented_timestamp",
            Err(DecodeError::MissingTimestamp { .. }) => "missing_timestamp",
            Err(DecodeError::Truncated { .. }) => "truncated",
            Err(other) => panic!("{name}: unexpected {other}"),
            Ok(frames) => match Payload::decode(frames[0].header().msg_type, frames[0].body()) {
                Err(_) => "bad_payload",
                Ok(p) => panic!("{name}: accepted {p:?}"),
            },
        };
        assert_eq!(got, reason, "{name}");
    }
}
