//! How a node identity travels in membership gossip: it comes back as it went, for
//! IPv4 and IPv6 addresses, and a malformed address refuses the datagram instead of
//! yielding a wrong identity.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use agentmesh_runtime::membership::NodeId;
use foca::{Codec, Member, PostcardCodec};
use serde::{Deserialize, Serialize};

fn round_trip(id: NodeId) -> NodeId {
    let mut buf = Vec::new();
    PostcardCodec
        .encode_member(&Member::alive(id), &mut buf)
        .unwrap();
    let decoded: Member<NodeId> = PostcardCodec.decode_member(&buf[..]).unwrap();
    decoded.id().clone()
}

#[test]
fn an_identity_comes_back_as_it_went() {
    for addr in ["10.0.3.7:7600", "[2001:db8::42]:65535", "127.0.0.1:1"] {
        let id = NodeId {
            name: Arc::from("n-ü-7"),
            addr: addr.parse().unwrap(),
            incarnation: u64::MAX - 3,
        };
        assert_eq!(round_trip(id.clone()), id);
    }
}

/// The same fields as `NodeId` on the wire, but an address of any length.
#[derive(Serialize, Deserialize)]
struct Forged {
    name: String,
    #[serde(with = "bytes_field")]
    addr: Vec<u8>,
    incarnation: u64,
}

mod bytes_field {
    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        <Vec<u8> as serde::Deserialize>::deserialize(d)
    }
}

#[test]
fn an_address_of_the_wrong_length_refuses_the_datagram() {
    let decode = |addr: Vec<u8>| {
        let forged = Forged {
            name: "n1".into(),
            addr,
            incarnation: 1,
        };
        let mut buf = Vec::new();
        PostcardCodec
            .encode_member(&Member::alive(forged), &mut buf)
            .unwrap();
        PostcardCodec
            .decode_member(&buf[..])
            .map(|m: Member<NodeId>| m.id().addr)
    };
    assert_eq!(
        decode(vec![10, 0, 0, 1, 0x1d, 0xb0]).unwrap(),
        "10.0.0.1:7600".parse::<SocketAddr>().unwrap()
    );
    for len in [0, 5, 7, 17, 19] {
        assert!(
            decode(vec![1; len]).is_err(),
            "{len} address bytes accepted"
        );
    }
}
