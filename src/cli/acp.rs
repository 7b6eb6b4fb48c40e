//! `agentmesh acp decode|encode`: ACP frames to JSON and back, for reading captures
//! and logs by hand.

use std::io::Write;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::transport::wire::{
    decode_all, Flags, Frame, Header, MessageType, Payload, MAX_PAYLOAD_LEN, PROTOCOL_VERSION,
};

#[derive(Debug, Subcommand)]
pub enum AcpCommand {
    /// Decode hex-encoded frames; prints one JSON object per frame.
    Decode {
        /// The frame(s) as hex, or `-` to read them from stdin; whitespace, ':' and a
        /// leading 0x are ignored.
        hex: String,
    },
    /// Encode one frame from its header fields and a JSON payload; prints hex.
    Encode(EncodeArgs),
    /// Walk the draft's task sequence through the codec and print each frame.
    Walkthrough(super::walkthrough::WalkthroughArgs),
}

#[derive(Debug, Args)]
pub struct EncodeArgs {
    /// Message type, by name (ALLOCATE) or code (0..=11).
    #[arg(long = "type")]
    msg_type: String,
    /// Protocol version; only 1 is defined.
    #[arg(long, default_value_t = PROTOCOL_VERSION)]
    ver: u8,
    /// The Flags byte; TIMESTAMPED (0x10) is set by --timestamp-ms.
    #[arg(long, default_value_t = 0)]
    flags: u8,
    /// Stream Prio, 0..=255 (default: the type's default).
    #[arg(long)]
    prio: Option<u8>,
    /// Coordination Group ID.
    #[arg(long, default_value_t = 0)]
    group: u16,
    /// Agent ID of the sender.
    #[arg(long = "agent-id", default_value_t = 0)]
    agent_id: u32,
    /// Sequence Number.
    #[arg(long, default_value_t = 0)]
    seq: u16,
    /// Put this timestamp (ms since the Unix epoch) before the payload.
    #[arg(long = "timestamp-ms")]
    timestamp_ms: Option<u64>,
    /// The payload as JSON, in the shape `acp decode` prints it (`-`: from stdin).
    #[arg(
        long,
        conflicts_with = "payload_hex",
        required_unless_present = "payload_hex"
    )]
    payload: Option<String>,
    /// The payload as raw hex bytes instead, for fragments or deliberately bad frames
    /// (`-`: from stdin).
    #[arg(long = "payload-hex")]
    payload_hex: Option<String>,
}

/// The JSON shape of a decoded frame. Field order is the header's.
#[derive(Serialize)]
struct DecodedFrame {
    ver: u8,
    #[serde(rename = "type")]
    msg_type: &'static str,
    type_code: u8,
    flags: u8,
    prio: u8,
    group: u16,
    agent_id: u32,
    seq: u16,
    len: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp_ms: Option<u64>,
    payload: PayloadJson,
}

/// The decoded payload in schema order, or its bytes as hex when it does not decode.
#[derive(Serialize)]
#[serde(untagged)]
enum PayloadJson {
    Decoded(Payload),
    Raw(String),
}

impl DecodedFrame {
    fn new(frame: &Frame) -> DecodedFrame {
        let h = frame.header();
        let payload = match Payload::decode(h.msg_type, frame.body()) {
            Ok(p) => PayloadJson::Decoded(p),
            Err(_) => PayloadJson::Raw(hex::encode(frame.body())),
        };
        DecodedFrame {
            ver: PROTOCOL_VERSION,
            msg_type: h.msg_type.name(),
            type_code: h.msg_type.code(),
            flags: h.flags.bits(),
            prio: h.prio,
            group: h.group,
            agent_id: h.agent,
            seq: h.seq,
            len: frame.payload_len(),
            timestamp_ms: frame.timestamp_ms(),
            payload,
        }
    }
}

pub fn run(command: AcpCommand) -> anyhow::Result<()> {
    match command {
        AcpCommand::Decode { hex } => decode(&hex),
        AcpCommand::Encode(args) => encode(args),
        AcpCommand::Walkthrough(args) => super::walkthrough::run(args),
    }
}

/// The argument itself, or all of stdin when it is `-` (arguments are limited to
/// 128 KiB on Linux; a 64 KiB frame is 128 KiB of hex).
fn arg_or_stdin(value: &str) -> anyhow::Result<String> {
    if value != "-" {
        return Ok(value.to_string());
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
        .context("reading stdin")?;
    Ok(text)
}

fn parse_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    let cleaned: String = text
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    hex::decode(&cleaned).map_err(|e| anyhow!("not hex: {e}"))
}

fn decode(text: &str) -> anyhow::Result<()> {
    let bytes = Bytes::from(parse_hex(&arg_or_stdin(text)?)?);
    if bytes.is_empty() {
        bail!("no bytes to decode");
    }
    let frames = decode_all(&bytes, MAX_PAYLOAD_LEN).context("not an ACP frame")?;
    let mut out = std::io::stdout().lock();
    for frame in &frames {
        let line = serde_json::to_string(&DecodedFrame::new(frame))?;
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn encode(args: EncodeArgs) -> anyhow::Result<()> {
    if args.ver != PROTOCOL_VERSION {
        bail!(
            "--ver {}: only ACP version {PROTOCOL_VERSION} is defined",
            args.ver
        );
    }
    let msg_type = match args.msg_type.parse::<u8>() {
        Ok(code) => MessageType::from_code(code),
        Err(_) => MessageType::from_name(&args.msg_type),
    }
    .ok_or_else(|| anyhow!("--type {}: not an ACP message type", args.msg_type))?;
    let flags = Flags::from_bits(args.flags)
        .ok_or_else(|| anyhow!("--flags 0x{:02x}: bits 5..7 are reserved", args.flags))?;
    if flags.contains(Flags::TIMESTAMPED) && args.timestamp_ms.is_none() {
        bail!("--flags has TIMESTAMPED (0x10): give the timestamp with --timestamp-ms");
    }
    let body = match (&args.payload, &args.payload_hex) {
        (Some(json), _) => {
            let value: serde_json::Value =
                serde_json::from_str(&arg_or_stdin(json)?).context("--payload is not JSON")?;
            let payload = Payload::deserialize_as(msg_type, value)
                .with_context(|| format!("--payload is not a {msg_type} payload"))?;
            payload.validate()?;
            payload.encode()?
        }
        (None, Some(hex)) => parse_hex(&arg_or_stdin(hex)?).context("--payload-hex")?,
        (None, None) => bail!("give --payload or --payload-hex"),
    };
    let header = Header {
        msg_type,
        flags,
        prio: args.prio.unwrap_or(msg_type.default_prio()),
        group: args.group,
        agent: args.agent_id,
        seq: args.seq,
    };
    let body = Bytes::from(body);
    let frame = match args.timestamp_ms {
        Some(ts) => Frame::timestamped(header, ts, body),
        None => Frame::new(header, body),
    }
    .context("this tool encodes single frames; ACP fragments larger messages")?;
    println!("{}", hex::encode(frame.to_bytes()));
    Ok(())
}
