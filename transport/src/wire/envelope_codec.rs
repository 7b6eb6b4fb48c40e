//! A hand-written MessagePack codec for ENVELOPE, the one payload on the path of every
//! remote actor message. It writes exactly the bytes serde's named-map encoding
//! writes, and reads that layout without serde; anything else (other key orders,
//! extra keys, other types) falls back to the general decoder, which is also the
//! one that reports errors. The tests hold both to the same bytes.

use std::borrow::Cow;

use bytes::Bytes;

use super::payload::{Envelope, EnvelopeRef};

const KEYS: [&str; 6] = ["to", "kind", "correlation", "reply", "trace_id", "body"];

/// Encodes as `rmp_serde::to_vec_named` does.
pub(crate) fn encode(e: &Envelope) -> Vec<u8> {
    EnvelopeParts {
        to: &e.to,
        kind: &e.kind,
        correlation: e.correlation,
        reply: e.reply,
        trace_id: e.trace_id.as_deref(),
        body: &e.body,
    }
    .encode()
}

/// An ENVELOPE's fields, borrowed: what a sender has in hand before it would build an
/// [`Envelope`], so that encoding one costs one allocation (the output).
#[derive(Clone, Copy, Debug)]
pub struct EnvelopeParts<'a> {
    /// The receiving actor's cluster-wide name.
    pub to: &'a str,
    /// The message's type tag.
    pub kind: &'a str,
    /// Request/reply correlation (0: none).
    pub correlation: u64,
    /// True if this answers the request with the same correlation.
    pub reply: bool,
    /// Trace id, or absent.
    pub trace_id: Option<&'a [u8]>,
    /// The message.
    pub body: &'a [u8],
}

impl EnvelopeParts<'_> {
    /// Encodes the fields as an [`Envelope`] holding them is encoded.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.to.len() + self.kind.len() + self.body.len());
        self.encode_into(&mut out);
        out
    }

    /// [`EnvelopeParts::encode`], appended to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.encode_head(out);
        // Writing to a Vec cannot fail.
        let _ = rmp::encode::write_bin(out, self.body);
    }

    /// Appends the envelope with its body written by `write` straight into `out` (and
    /// `self.body` ignored): the bytes [`EnvelopeParts::encode`] gives for the body
    /// `write` produces, without that body being built apart and copied in.
    pub fn encode_into_with<E>(
        &self,
        out: &mut Vec<u8>,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.encode_head(out);
        // A bin8 marker first; if the body turns out longer, the marker widens and
        // the body moves up by the difference (rare for actor messages).
        let start = out.len();
        out.extend_from_slice(&[BIN8, 0]);
        write(out)?;
        let len = out.len() - start - 2;
        if let Ok(len) = u8::try_from(len) {
            out[start + 1] = len;
        } else if let Ok(len) = u16::try_from(len) {
            out.insert(start + 1, 0);
            out[start] = BIN16;
            out[start + 1..start + 3].copy_from_slice(&len.to_be_bytes());
        } else {
            // Envelopes are bounded far below 4 GiB by `max_message_bytes`; a body
            // beyond u32 could not be sent anyway and is cut to the length field.
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            out.splice(start + 1..start + 1, [0, 0, 0]);
            out[start] = BIN32;
            out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
        }
        Ok(())
    }

    /// Everything up to and including the `body` key.
    fn encode_head(&self, out: &mut Vec<u8>) {
        let e = self;
        // Writing to a Vec cannot fail: the results are Ok by construction.
        let _ = rmp::encode::write_map_len(out, KEYS.len() as u32);
        let _ = rmp::encode::write_str(out, KEYS[0]);
        let _ = rmp::encode::write_str(out, e.to);
        let _ = rmp::encode::write_str(out, KEYS[1]);
        let _ = rmp::encode::write_str(out, e.kind);
        let _ = rmp::encode::write_str(out, KEYS[2]);
        let _ = rmp::encode::write_uint(out, e.correlation);
        let _ = rmp::encode::write_str(out, KEYS[3]);
        let _ = rmp::encode::write_bool(out, e.reply);
        let _ = rmp::encode::write_str(out, KEYS[4]);
        match e.trace_id {
            Some(t) => {
                let _ = rmp::encode::write_bin(out, t);
            }
            None => {
                let _ = rmp::encode::write_nil(out);
            }
        }
        let _ = rmp::encode::write_str(out, KEYS[5]);
    }
}

/// MessagePack's bin markers, 8-, 16- and 32-bit lengths.
const BIN8: u8 = 0xc4;
const BIN16: u8 = 0xc5;
const BIN32: u8 = 0xc6;

/// Takes `len` bytes off the front of `rd`.
fn take<'a>(rd: &mut &'a [u8], len: u32) -> Option<&'a [u8]> {
    let len = usize::try_from(len).ok()?;
    if rd.len() < len {
        return None;
    }
    let (head, rest) = rd.split_at(len);
    *rd = rest;
    Some(head)
}

fn string<'a>(rd: &mut &'a [u8]) -> Option<&'a str> {
    let len = rmp::decode::read_str_len(rd).ok()?;
    std::str::from_utf8(take(rd, len)?).ok()
}

/// Takes the key `K` if it comes next as `encode` writes it (a fixstr: marker and
/// bytes compared at once). Any other spelling of the key goes to the general decoder.
fn key<const K: usize>(rd: &mut &[u8]) -> Option<()> {
    let name = KEYS[K].as_bytes();
    let (&marker, rest) = rd.split_first()?;
    // Every key is shorter than 32 bytes: a fixstr.
    if usize::from(marker) != (0xa0 | name.len()) || !rest.starts_with(name) {
        return None;
    }
    *rd = &rest[name.len()..];
    Some(())
}

fn bin<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = rmp::decode::read_bin_len(rd).ok()?;
    take(rd, len)
}

/// Reads the layout [`encode`] writes (any integer width for `correlation`); `None`
/// for anything else, including trailing bytes. The envelope is copied once, whole;
/// its trace id and body share that copy.
pub(crate) fn decode(body: &[u8]) -> Option<Envelope> {
    decode_ref(&Bytes::copy_from_slice(body)).map(EnvelopeRef::into_owned)
}

/// As [`decode`], with `to` and `kind` borrowed from `body` and the trace id and body
/// sharing its buffer: nothing is allocated.
pub(crate) fn decode_ref(body: &Bytes) -> Option<EnvelopeRef<'_>> {
    let mut rd = &body[..];
    if rmp::decode::read_map_len(&mut rd).ok()? != KEYS.len() as u32 {
        return None;
    }
    key::<0>(&mut rd)?;
    let to = string(&mut rd)?;
    key::<1>(&mut rd)?;
    let kind = string(&mut rd)?;
    key::<2>(&mut rd)?;
    let correlation: u64 = rmp::decode::read_int(&mut rd).ok()?;
    key::<3>(&mut rd)?;
    let reply = rmp::decode::read_bool(&mut rd).ok()?;
    key::<4>(&mut rd)?;
    let trace_id = if rd.first() == Some(&0xc0) {
        rd = &rd[1..];
        None
    } else {
        Some(bin(&mut rd)?)
    };
    key::<5>(&mut rd)?;
    let payload = bin(&mut rd)?;
    rd.is_empty().then(|| EnvelopeRef {
        to: Cow::Borrowed(to),
        kind: Cow::Borrowed(kind),
        correlation,
        reply,
        trace_id: trace_id.map(|t| body.slice_ref(t)),
        body: body.slice_ref(payload),
    })
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use proptest::prelude::*;

    use super::*;

    fn envelope() -> impl Strategy<Value = Envelope> {
        (
            ".{0,40}",
            ".{0,300}",
            any::<u64>(),
            any::<bool>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::collection::vec(any::<u8>(), 0..70_000),
        )
            .prop_map(|(to, kind, correlation, reply, trace, body)| Envelope {
                to,
                kind,
                correlation,
                reply,
                trace_id: trace.map(Bytes::from),
                body: Bytes::from(body),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn writes_what_serde_writes_and_reads_it_back(e in envelope()) {
            let fast = encode(&e);
            let serde = rmp_serde::to_vec_named(&e).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&fast, &serde);
            prop_assert_eq!(decode(&fast), Some(e.clone()));
            // The borrowing decoder reads the same, with the body pointing into the buffer.
            let whole = Bytes::from(fast);
            let shared = decode_ref(&whole).map(EnvelopeRef::into_owned);
            prop_assert_eq!(shared.as_ref(), Some(&e));
            if let Some(s) = shared.filter(|s| !s.body.is_empty()) {
                let range = whole.as_ptr_range();
                prop_assert!(range.contains(&s.body.as_ptr()));
            }
            // The receive path's view reads the same, its names borrowed, and refuses
            // a trace id that is not 16 bytes.
            let view = EnvelopeRef::decode(&whole);
            let valid = e.trace_id.as_ref().is_none_or(|t| t.len() == 16);
            let expected = valid.then(|| EnvelopeRef::from(e.clone()));
            prop_assert_eq!(view.as_ref().ok(), expected.as_ref());
            if let Ok(v) = view {
                prop_assert!(matches!((&v.to, &v.kind), (Cow::Borrowed(_), Cow::Borrowed(_))));
                prop_assert_eq!(v.into_owned(), e);
            }
        }

        #[test]
        fn never_panics_and_agrees_with_serde_on_whatever_it_accepts(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Some(e) = decode(&bytes) {
                let serde: Envelope = rmp_serde::from_slice(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(e, serde);
            }
        }
    }

    #[test]
    fn a_body_written_in_place_gives_the_bytes_of_one_built_apart() {
        for len in [0usize, 1, 255, 256, 65_535, 65_536, 70_000] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let parts = EnvelopeParts {
                to: "echo",
                kind: "bench.ping",
                correlation: 7,
                reply: false,
                trace_id: Some(&[1; 16]),
                body: &body,
            };
            // After bytes already in the buffer, as a reused buffer would hold them.
            let mut out = b"prefix".to_vec();
            let written: Result<(), ()> = parts.encode_into_with(&mut out, |out| {
                out.extend_from_slice(&body);
                Ok(())
            });
            assert_eq!(written, Ok(()));
            assert_eq!(&out[..6], b"prefix");
            assert_eq!(out[6..], parts.encode()[..], "body of {len} bytes");
        }
        // A failing writer's error comes back as it is.
        let mut out = Vec::new();
        let parts = EnvelopeParts {
            to: "a",
            kind: "k",
            correlation: 0,
            reply: false,
            trace_id: None,
            body: &[],
        };
        assert_eq!(parts.encode_into_with(&mut out, |_| Err("no")), Err("no"));
    }

    #[test]
    fn the_view_takes_other_layouts_through_serde_and_refuses_what_it_refuses() {
        let e = Envelope {
            to: "a".into(),
            kind: "k".into(),
            correlation: 3,
            reply: true,
            trace_id: Some(Bytes::from_static(&[5; 16])),
            body: Bytes::from_static(b"x"),
        };
        // serde's compact form (fields as an array) is read by the general decoder.
        let compact = Bytes::from(rmp_serde::to_vec(&e).unwrap_or_default());
        let view = EnvelopeRef::decode(&compact).map(EnvelopeRef::into_owned);
        assert_eq!(view.ok(), Some(e.clone()));
        // A trace id of the wrong length is refused, whichever layout carried it.
        let bad = Envelope {
            trace_id: Some(Bytes::from_static(&[5; 3])),
            ..e
        };
        let err = EnvelopeRef::decode(&Bytes::from(encode(&bad))).err();
        assert!(
            matches!(
                err,
                Some(crate::wire::PayloadError::Invalid {
                    field: "trace_id",
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(EnvelopeRef::decode(&Bytes::from_static(b"\x93")).is_err());
    }

    #[test]
    fn other_layouts_are_left_to_the_general_decoder() {
        let e = Envelope {
            to: "a".into(),
            kind: "k".into(),
            correlation: 300,
            reply: false,
            trace_id: None,
            body: Bytes::from_static(b"x"),
        };
        let mut bytes = encode(&e);
        bytes.push(0);
        assert_eq!(decode(&bytes), None, "trailing bytes");
        // Fields as an array (serde's compact form) are not the fast path's.
        let compact = rmp_serde::to_vec(&e).unwrap_or_default();
        assert_eq!(decode(&compact), None);
        assert_eq!(decode(&encode(&e)[..5]), None, "truncated");
    }
}
