//! Typed ACP payloads: one struct per message type, encoded as msgpack maps with
//! named fields (rmp-serde). Receivers ignore keys they do not know, so fields can be
//! added within version 1; every field listed here is required.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use super::error_code::AcpErrorCode;
use super::header::MessageType;

/// Why a payload was refused.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The bytes are not msgpack of the type's schema.
    #[error("{msg_type} payload does not decode: {reason}")]
    Undecodable {
        /// The header's type.
        msg_type: MessageType,
        /// What the msgpack decoder said.
        reason: String,
    },
    /// Bytes remain after the msgpack value.
    #[error("{msg_type} payload has {extra} bytes after its value")]
    TrailingBytes {
        /// The header's type.
        msg_type: MessageType,
        /// How many.
        extra: usize,
    },
    /// The value decoded but breaks a rule of its schema.
    #[error("{msg_type} payload: field `{field}` {rule}")]
    Invalid {
        /// The header's type.
        msg_type: MessageType,
        /// The field at fault.
        field: &'static str,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// Encoding failed (only possible for values a custom serializer rejects).
    #[error("{msg_type} payload does not encode: {reason}")]
    Unencodable {
        /// The payload's type.
        msg_type: MessageType,
        /// What the encoder said.
        reason: String,
    },
}

impl PayloadError {
    /// The error code to close the offending connection with.
    pub fn code(&self) -> AcpErrorCode {
        AcpErrorCode::BadPayload
    }
}

/// Longest intermediate-result hash a SYNC may carry (a SHA-512 fits).
pub const MAX_HASH_LEN: usize = 64;
/// Length of a trace id (W3C trace-context size).
pub const TRACE_ID_LEN: usize = 16;
/// Progress is reported in thousandths; this is "done".
pub const PROGRESS_DONE_PERMILLE: u16 = 1000;

/// What an agent can do, as it registers and as discovery lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// The capability's name, e.g. `"summarize"`.
    pub name: String,
    /// The implementation's version, e.g. `"1.2.0"`.
    pub version: String,
    /// Free-form tags for finer matching, e.g. `["gpu", "en"]`.
    pub tags: Vec<String>,
    /// How many segments the agent runs at once.
    pub capacity: u32,
}

/// An agent's health as its node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Working normally.
    Ok,
    /// Working, but slow or failing some segments.
    Degraded,
    /// Not fit to receive work.
    Unhealthy,
}

/// ALLOCATE (0): run one attempt of one segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocate {
    /// The worker agent that is to run it.
    pub target: u32,
    /// The task the segment belongs to.
    pub task: Uuid,
    /// The segment's index within its task.
    pub segment: u32,
    /// Attempt number, from 1; a retry or reallocation increments it.
    pub attempt: u32,
    /// The capability asked for.
    pub capability: String,
    /// How long the coordinator waits for a result before retrying elsewhere.
    pub timeout_ms: u32,
    /// The segment's input, opaque to ACP (the agent's own serde encoding).
    #[serde(with = "super::bytes_serde")]
    pub input: Bytes,
    /// Workers holding other segments of the task when this one was allocated, for
    /// SYNC between them (optional; absent means none known).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<u32>,
    /// The parameters ADJUSTs set for the task so far, which the attempt starts with
    /// (optional; absent means none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
}

/// REPORT (1): progress and health of one attempt, and finally its result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The coordinator agent the report is for.
    pub target: u32,
    /// The task.
    pub task: Uuid,
    /// The segment.
    pub segment: u32,
    /// The attempt this report is about.
    pub attempt: u32,
    /// Progress in thousandths, 0..=1000.
    pub progress_permille: u16,
    /// The worker's health.
    pub health: Health,
    /// Segments the worker has in hand, this one included.
    pub load: u32,
    /// The result, present in the final report of a successful attempt.
    #[serde(with = "super::bytes_serde::option")]
    pub output: Option<Bytes>,
    /// Why the attempt failed, present in the final report of a failed attempt.
    pub error: Option<String>,
    /// Set (with `error`) when the worker's node refused the ALLOCATE without running
    /// it: the segment goes to another agent, and the refusal is not a failed attempt.
    /// Added within version 1: senders leave the key out when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
    /// With `refused: rate`: milliseconds until the agent takes an allocation again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u32>,
}

/// Why a worker's node refused an ALLOCATE without running it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Its policy does not let the sender's group send to the agent's group.
    Policy,
    /// The agent is at its rate limit (`retry_after_ms` says for how long).
    Rate,
    /// No such agent on that node (any more), or none of its replicas runs (each
    /// panicked too often and rests).
    NoAgent,
}

impl Refusal {
    /// Its name on the wire (`"policy"`, `"rate"`, `"no_agent"`).
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Policy => "policy",
            Refusal::Rate => "rate",
            Refusal::NoAgent => "no_agent",
        }
    }
}

impl Report {
    /// True if this report ends its attempt (it carries an output or an error).
    pub fn is_final(&self) -> bool {
        self.output.is_some() || self.error.is_some()
    }
}

/// SYNC (2): an intermediate result shared between workers of one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sync {
    /// The peer worker agent.
    pub target: u32,
    /// The task both work on.
    pub task: Uuid,
    /// The sender's segment.
    pub segment: u32,
    /// Sync round, increasing per sender and task.
    pub round: u32,
    /// Hash of the intermediate result, at most 64 bytes.
    #[serde(with = "super::bytes_serde")]
    pub hash: Bytes,
    /// Optional small data to go with it (a bid, a partial result); may be empty.
    #[serde(with = "super::bytes_serde")]
    pub body: Bytes,
}

/// ADJUST (3): steer running work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjust {
    /// The worker agent.
    pub target: u32,
    /// The task.
    pub task: Uuid,
    /// The segment, or `None` for every segment of the task at that worker.
    pub segment: Option<u32>,
    /// New parameter values by name.
    pub params: BTreeMap<String, String>,
    /// New Stream Prio for the task's traffic, if it changes.
    pub priority: Option<u8>,
    /// Stop the work and report it cancelled.
    pub cancel: bool,
    /// The attempt of `segment` it is for, or `None` for whichever runs. A
    /// coordinator names it, so that an ADJUST sent again (its connection was lost)
    /// never reaches a later attempt of the segment at that worker. Added within
    /// version 1: senders leave the key out when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// REGISTER (4): a node registers one of its agents with discovery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// Chosen by the sender to match the REGISTER_ACK to this request.
    pub nonce: u64,
    /// The agent's type name, e.g. `"summarizer"`.
    pub agent_type: String,
    /// What it can do.
    pub capabilities: Vec<Capability>,
}

/// REGISTER_ACK (5): discovery's answer to a REGISTER.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterAck {
    /// The REGISTER's nonce.
    pub nonce: u64,
    /// The Agent ID assigned, owned by the registering node from now on.
    pub agent: u32,
    /// The coordination group the agent belongs to.
    pub group: u16,
}

/// QUERY_CAPABLE_AGENTS (6): which agents offer a capability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryCapableAgents {
    /// Chosen by the sender to match the LIST_AGENTS to this query.
    pub query: u64,
    /// The capability's name.
    pub capability: String,
    /// Tags every listed agent must have.
    pub tags: Vec<String>,
    /// Most agents to list (0: no limit beyond the message size).
    pub limit: u32,
}

/// One agent in a LIST_AGENTS answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Its Agent ID.
    pub agent: u32,
    /// The name of the node that runs it.
    pub node: String,
    /// Its type name.
    pub agent_type: String,
    /// Its coordination group.
    pub group: u16,
    /// The matching capability.
    pub capability: Capability,
    /// Segments in hand.
    pub load: u32,
    /// Its health.
    pub health: Health,
}

/// LIST_AGENTS (7): the answer to a query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListAgents {
    /// The query's id.
    pub query: u64,
    /// Matching agents.
    pub agents: Vec<AgentInfo>,
}

/// SYNC_ACK (8): confirms a SYNC (the draft's COORD_ACK).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncAck {
    /// The worker that sent the SYNC.
    pub target: u32,
    /// The task.
    pub task: Uuid,
    /// The segment of the SYNC's sender.
    pub segment: u32,
    /// The round confirmed.
    pub round: u32,
    /// The receiver's own hash for that round, for comparison.
    #[serde(with = "super::bytes_serde")]
    pub hash: Bytes,
    /// Whether the receiver agrees with the sender's intermediate result.
    pub agreed: bool,
}

/// ENVELOPE (9): a generic actor message addressed by cluster-wide name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The receiving actor's cluster-wide name.
    pub to: String,
    /// The message's type tag, for the receiver to pick its decoder.
    pub kind: String,
    /// Request/reply correlation (0: none).
    pub correlation: u64,
    /// True if this answers the request with the same correlation.
    pub reply: bool,
    /// Trace id to follow one task across nodes: 16 bytes, or absent.
    #[serde(with = "super::bytes_serde::option")]
    pub trace_id: Option<Bytes>,
    /// The message, opaque to ACP.
    #[serde(with = "super::bytes_serde")]
    pub body: Bytes,
}

/// An ENVELOPE as the receive path reads it: `to` and `kind` borrowed from the frame
/// it came in (owned only when the sender used another msgpack layout than ours), the
/// trace id and body sharing the frame's buffer. Delivering one allocates nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvelopeRef<'a> {
    /// As [`Envelope::to`].
    pub to: Cow<'a, str>,
    /// As [`Envelope::kind`].
    pub kind: Cow<'a, str>,
    /// As [`Envelope::correlation`].
    pub correlation: u64,
    /// As [`Envelope::reply`].
    pub reply: bool,
    /// As [`Envelope::trace_id`].
    pub trace_id: Option<Bytes>,
    /// As [`Envelope::body`].
    pub body: Bytes,
}

impl<'a> EnvelopeRef<'a> {
    /// Decodes and validates an ENVELOPE body, as [`Payload::decode`] does, without
    /// copying it.
    pub fn decode(body: &'a Bytes) -> Result<EnvelopeRef<'a>, PayloadError> {
        let fast =
            super::envelope_codec::decode_ref(body).filter(|e| trace_id_valid(e.trace_id.as_ref()));
        if let Some(e) = fast {
            return Ok(e);
        }
        // Another layout, or a rule broken: the general decoder reads it or says why.
        match Payload::decode(MessageType::Envelope, body)? {
            Payload::Envelope(e) => Ok(EnvelopeRef::from(e)),
            other => Err(PayloadError::Undecodable {
                msg_type: MessageType::Envelope,
                reason: format!("decoded as {}", other.msg_type()),
            }),
        }
    }

    /// The envelope with its names owned.
    pub fn into_owned(self) -> Envelope {
        Envelope {
            to: self.to.into_owned(),
            kind: self.kind.into_owned(),
            correlation: self.correlation,
            reply: self.reply,
            trace_id: self.trace_id,
            body: self.body,
        }
    }
}

impl From<Envelope> for EnvelopeRef<'_> {
    fn from(e: Envelope) -> Self {
        EnvelopeRef {
            to: Cow::Owned(e.to),
            kind: Cow::Owned(e.kind),
            correlation: e.correlation,
            reply: e.reply,
            trace_id: e.trace_id,
            body: e.body,
        }
    }
}

/// MEMBERSHIP (10): cluster membership gossip, opaque to ACP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The membership protocol's own encoding.
    #[serde(with = "super::bytes_serde")]
    pub gossip: Bytes,
}

/// What a CONTROL frame asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlOp {
    /// Answer with a pong carrying the same nonce.
    Ping,
    /// The answer to a ping.
    Pong,
    /// The sender leaves the cluster; do not wait for the failure detector.
    Leave,
}

/// CONTROL (11): connection control between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// What is asked.
    pub op: ControlOp,
    /// Matches a pong to its ping (0 for leave).
    pub nonce: u64,
    /// The sending node's name.
    pub node: String,
}

/// A decoded payload of any type.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)] // each variant is documented on its struct
pub enum Payload {
    Allocate(Allocate),
    Report(Report),
    Sync(Sync),
    Adjust(Adjust),
    Register(Register),
    RegisterAck(RegisterAck),
    QueryCapableAgents(QueryCapableAgents),
    ListAgents(ListAgents),
    SyncAck(SyncAck),
    Envelope(Envelope),
    Membership(Membership),
    Control(Control),
}

macro_rules! for_each_payload {
    ($value:expr, $inner:ident => $body:expr) => {
        match $value {
            Payload::Allocate($inner) => $body,
            Payload::Report($inner) => $body,
            Payload::Sync($inner) => $body,
            Payload::Adjust($inner) => $body,
            Payload::Register($inner) => $body,
            Payload::RegisterAck($inner) => $body,
            Payload::QueryCapableAgents($inner) => $body,
            Payload::ListAgents($inner) => $body,
            Payload::SyncAck($inner) => $body,
            Payload::Envelope($inner) => $body,
            Payload::Membership($inner) => $body,
            Payload::Control($inner) => $body,
        }
    };
}

impl Payload {
    /// The message type this payload goes with.
    pub fn msg_type(&self) -> MessageType {
        match self {
            Payload::Allocate(_) => MessageType::Allocate,
            Payload::Report(_) => MessageType::Report,
            Payload::Sync(_) => MessageType::Sync,
            Payload::Adjust(_) => MessageType::Adjust,
            Payload::Register(_) => MessageType::Register,
            Payload::RegisterAck(_) => MessageType::RegisterAck,
            Payload::QueryCapableAgents(_) => MessageType::QueryCapableAgents,
            Payload::ListAgents(_) => MessageType::ListAgents,
            Payload::SyncAck(_) => MessageType::SyncAck,
            Payload::Envelope(_) => MessageType::Envelope,
            Payload::Membership(_) => MessageType::Membership,
            Payload::Control(_) => MessageType::Control,
        }
    }

    /// Deserializes the payload of `msg_type` from any serde format (msgpack on the
    /// wire, JSON in the CLI). Does not validate; see [`Payload::validate`].
    pub fn deserialize_as<'de, D: Deserializer<'de>>(
        msg_type: MessageType,
        d: D,
    ) -> Result<Payload, D::Error> {
        Ok(match msg_type {
            MessageType::Allocate => Payload::Allocate(Deserialize::deserialize(d)?),
            MessageType::Report => Payload::Report(Deserialize::deserialize(d)?),
            MessageType::Sync => Payload::Sync(Deserialize::deserialize(d)?),
            MessageType::Adjust => Payload::Adjust(Deserialize::deserialize(d)?),
            MessageType::Register => Payload::Register(Deserialize::deserialize(d)?),
            MessageType::RegisterAck => Payload::RegisterAck(Deserialize::deserialize(d)?),
            MessageType::QueryCapableAgents => {
                Payload::QueryCapableAgents(Deserialize::deserialize(d)?)
            }
            MessageType::ListAgents => Payload::ListAgents(Deserialize::deserialize(d)?),
            MessageType::SyncAck => Payload::SyncAck(Deserialize::deserialize(d)?),
            MessageType::Envelope => Payload::Envelope(Deserialize::deserialize(d)?),
            MessageType::Membership => Payload::Membership(Deserialize::deserialize(d)?),
            MessageType::Control => Payload::Control(Deserialize::deserialize(d)?),
        })
    }

    /// Decodes and validates the msgpack body of a message of `msg_type`: ENVELOPE's
    /// usual layout through the hand-written codec, anything else through serde.
    pub fn decode(msg_type: MessageType, body: &[u8]) -> Result<Payload, PayloadError> {
        if msg_type == MessageType::Envelope {
            if let Some(e) = super::envelope_codec::decode(body) {
                let payload = Payload::Envelope(e);
                payload.validate()?;
                return Ok(payload);
            }
        }
        // The reader-based deserializer copies declared lengths through `take(len)`,
        // so a length field that lies cannot make it allocate more than `body` holds.
        let mut de = rmp_serde::Deserializer::new(body);
        let payload =
            Payload::deserialize_as(msg_type, &mut de).map_err(|e| PayloadError::Undecodable {
                msg_type,
                reason: e.to_string(),
            })?;
        let extra = de.get_ref().len();
        if extra != 0 {
            return Err(PayloadError::TrailingBytes { msg_type, extra });
        }
        payload.validate()?;
        Ok(payload)
    }

    /// Encodes the payload as a msgpack map with named fields.
    pub fn encode(&self) -> Result<Vec<u8>, PayloadError> {
        if let Payload::Envelope(e) = self {
            return Ok(super::envelope_codec::encode(e));
        }
        rmp_serde::to_vec_named(self).map_err(|e| PayloadError::Unencodable {
            msg_type: self.msg_type(),
            reason: e.to_string(),
        })
    }

    /// Checks the field rules that the schema's types alone do not express.
    pub fn validate(&self) -> Result<(), PayloadError> {
        let msg_type = self.msg_type();
        let invalid = |field, rule| {
            Err(PayloadError::Invalid {
                msg_type,
                field,
                rule,
            })
        };
        match self {
            Payload::Report(r) if r.progress_permille > PROGRESS_DONE_PERMILLE => {
                invalid("progress_permille", "must be at most 1000")
            }
            Payload::Report(r) if r.output.is_some() && r.error.is_some() => {
                invalid("output", "and `error` cannot both be present")
            }
            Payload::Report(r) if r.refused.is_some() && r.error.is_none() => {
                invalid("refused", "needs `error`")
            }
            Payload::Report(r)
                if r.retry_after_ms.is_some() && r.refused != Some(Refusal::Rate) =>
            {
                invalid("retry_after_ms", "is only sent with `refused: rate`")
            }
            Payload::Sync(s) if s.hash.len() > MAX_HASH_LEN => {
                invalid("hash", "must be at most 64 bytes")
            }
            Payload::SyncAck(s) if s.hash.len() > MAX_HASH_LEN => {
                invalid("hash", "must be at most 64 bytes")
            }
            Payload::Adjust(a) if a.attempt.is_some() && a.segment.is_none() => {
                invalid("attempt", "needs `segment`")
            }
            Payload::Envelope(e) if !trace_id_valid(e.trace_id.as_ref()) => {
                invalid("trace_id", "must be 16 bytes when present")
            }
            _ => Ok(()),
        }
    }
}

/// An ENVELOPE's trace id is 16 bytes or absent.
fn trace_id_valid(trace_id: Option<&Bytes>) -> bool {
    trace_id.is_none_or(|t| t.len() == TRACE_ID_LEN)
}

/// Serializes the inner struct only: the type travels in the header, not the payload.
impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        for_each_payload!(self, inner => inner.serialize(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            target: 1,
            task: Uuid::from_u128(7),
            segment: 2,
            attempt: 1,
            progress_permille: 500,
            health: Health::Ok,
            load: 3,
            output: None,
            error: None,
            refused: None,
            retry_after_ms: None,
        }
    }

    #[test]
    fn payloads_are_named_msgpack_maps() {
        let p = Payload::Control(Control {
            op: ControlOp::Ping,
            nonce: 1,
            node: "a".into(),
        });
        let bytes = p.encode().unwrap();
        // fixmap of 3, then "op" => "ping", "nonce" => 1, "node" => "a"
        assert_eq!(
            hex::encode(&bytes),
            "83a26f70a470696e67a56e6f6e636501a46e6f6465a161"
        );
        assert_eq!(Payload::decode(MessageType::Control, &bytes).unwrap(), p);
    }

    #[test]
    fn uuids_and_bytes_are_msgpack_bin() {
        let p = Payload::Report(Report {
            output: Some(Bytes::from_static(b"ok")),
            ..report()
        });
        let bytes = p.encode().unwrap();
        // "task" => bin8 of 16, "output" => bin8 of 2
        assert!(hex::encode(&bytes).contains("a47461736bc410"));
        assert!(hex::encode(&bytes).contains("a66f7574707574c4026f6b"));
        assert_eq!(Payload::decode(MessageType::Report, &bytes).unwrap(), p);
    }

    #[test]
    fn field_rules_are_enforced_on_decode() {
        let bad = Payload::Report(Report {
            progress_permille: 1001,
            ..report()
        });
        let bytes = bad.encode().unwrap();
        assert!(matches!(
            Payload::decode(MessageType::Report, &bytes),
            Err(PayloadError::Invalid {
                field: "progress_permille",
                ..
            })
        ));
        let both = Payload::Report(Report {
            output: Some(Bytes::new()),
            error: Some("x".into()),
            ..report()
        });
        assert!(Payload::decode(MessageType::Report, &both.encode().unwrap()).is_err());
    }

    #[test]
    fn a_refusal_is_a_typed_final_report_and_absent_keys_stay_out() {
        // Without a refusal the keys are left out: older vectors stay byte-identical.
        let plain = Payload::Report(report()).encode().unwrap();
        assert!(!hex::encode(&plain).contains(&hex::encode("refused")));
        assert!(!hex::encode(&plain).contains(&hex::encode("retry_after_ms")));

        let rate = Payload::Report(Report {
            error: Some("rate limited".into()),
            refused: Some(Refusal::Rate),
            retry_after_ms: Some(200),
            ..report()
        });
        let bytes = rate.encode().unwrap();
        // "refused" => "rate", "retry_after_ms" => 200 (uint8 0xcc c8)
        assert!(hex::encode(&bytes).contains("a772656675736564a472617465"));
        assert!(hex::encode(&bytes).contains("ae72657472795f61667465725f6d73ccc8"));
        assert_eq!(Payload::decode(MessageType::Report, &bytes).unwrap(), rate);
        for r in [Refusal::Policy, Refusal::Rate, Refusal::NoAgent] {
            let named = rmp_serde::to_vec(&r).unwrap();
            assert_eq!(rmp_serde::from_slice::<String>(&named).unwrap(), r.name());
        }

        for (bad, field) in [
            (
                Report {
                    refused: Some(Refusal::Policy),
                    ..report()
                },
                "refused",
            ),
            (
                Report {
                    error: Some("denied".into()),
                    refused: Some(Refusal::Policy),
                    retry_after_ms: Some(5),
                    ..report()
                },
                "retry_after_ms",
            ),
        ] {
            let bytes = Payload::Report(bad).encode().unwrap();
            assert!(matches!(
                Payload::decode(MessageType::Report, &bytes),
                Err(PayloadError::Invalid { field: f, .. }) if f == field
            ));
        }
    }

    #[test]
    fn an_adjust_names_its_attempt_only_when_it_has_one() {
        let adjust = Adjust {
            target: 3,
            task: Uuid::from_u128(7),
            segment: Some(2),
            params: BTreeMap::new(),
            priority: None,
            cancel: true,
            attempt: None,
        };
        // Without one the key is left out: older vectors stay byte-identical.
        let plain = Payload::Adjust(adjust.clone()).encode().unwrap();
        assert!(!hex::encode(&plain).contains(&hex::encode("attempt")));
        let named = Payload::Adjust(Adjust {
            attempt: Some(5),
            ..adjust.clone()
        });
        let bytes = named.encode().unwrap();
        // "attempt" => 5
        assert!(hex::encode(&bytes).contains("a7617474656d707405"));
        assert_eq!(Payload::decode(MessageType::Adjust, &bytes).unwrap(), named);
        // An attempt of no segment is refused.
        let bad = Payload::Adjust(Adjust {
            segment: None,
            attempt: Some(5),
            ..adjust
        });
        assert!(matches!(
            Payload::decode(MessageType::Adjust, &bad.encode().unwrap()),
            Err(PayloadError::Invalid {
                field: "attempt",
                ..
            })
        ));
    }

    #[test]
    fn wrong_schema_and_trailing_bytes_are_typed_errors() {
        let bytes = Payload::Report(report()).encode().unwrap();
        assert!(matches!(
            Payload::decode(MessageType::Allocate, &bytes),
            Err(PayloadError::Undecodable {
                msg_type: MessageType::Allocate,
                ..
            })
        ));
        let mut long = bytes.clone();
        long.push(0xc0);
        assert!(matches!(
            Payload::decode(MessageType::Report, &long),
            Err(PayloadError::TrailingBytes { extra: 1, .. })
        ));
        assert!(Payload::decode(MessageType::Report, &[]).is_err());
    }

    #[test]
    fn a_lying_length_does_not_allocate_what_it_claims() {
        // map of 1, key "gossip", bin32 claiming 4 GiB, then 3 bytes.
        let mut bytes = vec![0x81, 0xa6];
        bytes.extend_from_slice(b"gossip");
        bytes.extend_from_slice(&[0xc6, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        assert!(matches!(
            Payload::decode(MessageType::Membership, &bytes),
            Err(PayloadError::Undecodable { .. })
        ));
    }
}
