//! Fuzzes the ACP stream decoder, reassembly and payload decoding with arbitrary
//! bytes cut into arbitrary chunks: none of it may panic, and whatever decodes must
//! encode back to the bytes it came from.
#![no_main]

use agentmesh_transport::wire::{FrameDecoder, MessageType, Payload, Reassembler};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let chunk = usize::from(cut).max(1);
    let mut decoder = FrameDecoder::default();
    let mut reassembler = Reassembler::new(1 << 20);
    let mut buf = BytesMut::new();
    let mut consumed = 0usize;
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let wire = frame.to_bytes();
                    assert_eq!(&rest[consumed..consumed + wire.len()], &wire[..]);
                    consumed += wire.len();
                    let _ = Payload::decode(frame.header().msg_type, frame.body());
                    if let Ok(Some(message)) = reassembler.push(frame) {
                        for t in MessageType::ALL {
                            let _ = Payload::decode(t, &message.body);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
