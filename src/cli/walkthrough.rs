//! `agentmesh acp walkthrough`: the ACP draft's task sequence (register, query, allocate, sync,
//! report, adjust) encoded frame by frame, cut into arbitrary chunks as a stream
//! would, decoded, reassembled, checked against the replay window, and printed.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use clap::Args;
use uuid::Uuid;

use crate::transport::wire::payload::{
    Adjust, AgentInfo, Allocate, Capability, Health, ListAgents, QueryCapableAgents, Register,
    RegisterAck, Report, Sync, SyncAck,
};
use crate::transport::wire::{
    Flags, FrameDecoder, Header, Lane, Message, Payload, Reassembler, ReplayError, ReplayWindow,
    TimestampWindow, MAX_PAYLOAD_LEN,
};

#[derive(Debug, Args)]
pub struct WalkthroughArgs {
    /// Size in bytes of the chunks the byte streams are cut into before decoding.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    chunk_bytes: u32,
}

/// One endpoint of the walkthrough, with its per-lane sequence counters.
struct Party {
    name: &'static str,
    agent: u32,
    next_seq: [u16; 4],
}

/// The receiving side of one (sending peer, lane): exactly what a node keeps per lane.
#[derive(Default)]
struct LaneReceiver {
    buf: BytesMut,
    decoder: FrameDecoder,
    reassembler: Option<Reassembler>,
    replay: ReplayWindow,
}

struct Walkthrough {
    chunk_bytes: usize,
    now_ms: u64,
    lanes: BTreeMap<(&'static str, Lane), LaneReceiver>,
    datagrams: BTreeMap<&'static str, ReplayWindow>,
    frames: usize,
    bytes: usize,
    last_wire: Option<(&'static str, Lane, Bytes)>,
}

const GROUP: u16 = 7;

impl Walkthrough {
    /// Encodes `payload` from `from`, carries it over a lane (or as a datagram), decodes
    /// it on the far side and prints one row.
    fn send(
        &mut self,
        from: &mut Party,
        to: &str,
        payload: Payload,
        datagram: bool,
    ) -> anyhow::Result<()> {
        let msg_type = payload.msg_type();
        let mut header = Header::new(msg_type);
        header.group = GROUP;
        header.agent = from.agent;
        if msg_type == crate::transport::MessageType::Adjust {
            header.flags = Flags::URGENT;
        }
        let lane = Lane::for_header(&header);
        let body = Bytes::from(payload.encode()?);
        let (received, frames, wire_len) = if datagram {
            let seq = &mut from.next_seq[0];
            let mut msg = Message::new(header, body);
            msg.timestamp_ms = Some(self.now_ms);
            let frames = msg.into_frames(*seq, MAX_PAYLOAD_LEN)?;
            *seq = seq.wrapping_add(1);
            let wire = frames[0].to_bytes();
            let frame = crate::transport::Frame::decode_datagram(wire.clone(), MAX_PAYLOAD_LEN)?;
            TimestampWindow::default().check(frame.timestamp_ms().unwrap_or(0), self.now_ms)?;
            self.datagrams
                .entry(from.name)
                .or_default()
                .accept(frame.header().seq)?;
            (Message::from(frame), 1, wire.len())
        } else {
            let seq = &mut from.next_seq[lane.index()];
            let frames = Message::new(header, body).into_frames(*seq, MAX_PAYLOAD_LEN)?;
            *seq = seq.wrapping_add(frames.len() as u16);
            let mut wire = BytesMut::new();
            for f in &frames {
                f.encode(&mut wire);
            }
            let wire = wire.freeze();
            self.last_wire = Some((from.name, lane, wire.clone()));
            let n = frames.len();
            let message = self.receive(from.name, lane, &wire)?;
            (message, n, wire.len())
        };
        let decoded = Payload::decode(received.header.msg_type, &received.body)?;
        if decoded != payload {
            bail!("{msg_type} did not survive the round trip");
        }
        self.frames += frames;
        self.bytes += wire_len;
        let carrier = if datagram {
            "datagram".to_string()
        } else {
            format!("{} lane", lane.name())
        };
        println!(
            "{:<12} {:<22} {:<18} {:>2} {:>8}  {}",
            format!("{} -> {to}", from.name),
            msg_type.name(),
            carrier,
            frames,
            wire_len,
            summary(&decoded)
        );
        self.now_ms += 3;
        Ok(())
    }

    /// Feeds stream bytes in chunks to the (sender, lane) receiver; returns the one
    /// whole message they hold.
    fn receive(
        &mut self,
        sender: &'static str,
        lane: Lane,
        wire: &[u8],
    ) -> anyhow::Result<Message> {
        let rx = self.lanes.entry((sender, lane)).or_default();
        let reassembler = rx
            .reassembler
            .get_or_insert_with(|| Reassembler::new(Reassembler::DEFAULT_MAX_MESSAGE_LEN));
        let mut done = None;
        for chunk in wire.chunks(self.chunk_bytes) {
            rx.buf.extend_from_slice(chunk);
            while let Some(frame) = rx.decoder.decode(&mut rx.buf)? {
                rx.replay.accept(frame.header().seq)?;
                if let Some(message) = reassembler.push(frame)? {
                    done = Some(message);
                }
            }
        }
        done.context("the stream ended inside a message")
    }
}

fn summary(p: &Payload) -> String {
    match p {
        Payload::Register(r) => format!("register {} ({})", r.agent_type, r.capabilities[0].name),
        Payload::RegisterAck(a) => format!("agent id {} in group {}", a.agent, a.group),
        Payload::QueryCapableAgents(q) => format!("who can `{}`?", q.capability),
        Payload::ListAgents(l) => {
            let ids: Vec<String> = l
                .agents
                .iter()
                .map(|a| format!("{}@{}", a.agent, a.node))
                .collect();
            format!("capable: {}", ids.join(", "))
        }
        Payload::Allocate(a) => format!(
            "segment {} attempt {}, {} input bytes",
            a.segment,
            a.attempt,
            a.input.len()
        ),
        Payload::Sync(s) => format!("round {} hash {}", s.round, hex::encode(&s.hash[..4])),
        Payload::SyncAck(s) => format!("round {} agreed={}", s.round, s.agreed),
        Payload::Report(r) if r.is_final() => format!(
            "segment {} done, {} output bytes",
            r.segment,
            r.output.as_ref().map_or(0, Bytes::len)
        ),
        Payload::Report(r) => format!(
            "segment {} at {}‰, health {:?}",
            r.segment, r.progress_permille, r.health
        ),
        Payload::Adjust(a) => format!("params {:?} cancel={}", a.params, a.cancel),
        other => format!("{:?}", other.msg_type()),
    }
}

pub fn run(args: WalkthroughArgs) -> anyhow::Result<()> {
    println!("AgentMesh demo: the ACP draft's task sequence through the real wire codec.");
    println!("(This build has the ACP wire format; the networked cluster is not built yet.)\n");
    let mut w = Walkthrough {
        chunk_bytes: args.chunk_bytes as usize,
        now_ms: 1_750_000_000_000,
        lanes: BTreeMap::new(),
        datagrams: BTreeMap::new(),
        frames: 0,
        bytes: 0,
        last_wire: None,
    };
    let mut d = Party {
        name: "D",
        agent: 1,
        next_seq: [0; 4],
    };
    let mut c = Party {
        name: "C",
        agent: 10,
        next_seq: [0; 4],
    };
    let mut w1 = Party {
        name: "W1",
        agent: 0,
        next_seq: [0; 4],
    };
    let mut w2 = Party {
        name: "W2",
        agent: 0,
        next_seq: [0; 4],
    };
    let task = Uuid::from_u128(0x5eed_0000_0000_4000_8000_0000_0000_0001);
    let cap = Capability {
        name: "summarize".into(),
        version: "1.0.0".into(),
        tags: vec!["en".into()],
        capacity: 4,
    };

    println!(
        "{:<12} {:<22} {:<18} {:>2} {:>8}  what",
        "hop", "type", "carried on", "fr", "bytes"
    );
    for (i, worker) in [&mut w1, &mut w2].into_iter().enumerate() {
        let nonce = i as u64 + 1;
        let register = Register {
            nonce,
            agent_type: "summarizer".into(),
            capabilities: vec![cap.clone()],
        };
        w.send(worker, "D", Payload::Register(register), false)?;
        let agent = 100 + i as u32;
        let ack = RegisterAck {
            nonce,
            agent,
            group: GROUP,
        };
        w.send(&mut d, worker.name, Payload::RegisterAck(ack), false)?;
        worker.agent = agent;
    }
    let query = QueryCapableAgents {
        query: 1,
        capability: "summarize".into(),
        tags: vec![],
        limit: 0,
    };
    w.send(&mut c, "D", Payload::QueryCapableAgents(query), false)?;
    let agents = [&w1, &w2]
        .iter()
        .map(|p| AgentInfo {
            agent: p.agent,
            node: format!("node-{}", p.name.to_lowercase()),
            agent_type: "summarizer".into(),
            group: GROUP,
            capability: cap.clone(),
            load: 0,
            health: Health::Ok,
        })
        .collect();
    w.send(
        &mut d,
        "C",
        Payload::ListAgents(ListAgents { query: 1, agents }),
        false,
    )?;

    // Segment A carries 150 KB: more than one frame holds, so it travels as fragments.
    let inputs = [
        Bytes::from(vec![b'a'; 150_000]),
        Bytes::from_static(b"segment B text"),
    ];
    for (segment, (worker, input)) in [&w1, &w2].into_iter().zip(inputs).enumerate() {
        let alloc = Allocate {
            target: worker.agent,
            task,
            segment: segment as u32,
            attempt: 1,
            capability: "summarize".into(),
            timeout_ms: 30_000,
            input,
            peers: Vec::new(),
            params: Default::default(),
        };
        let to = worker.name;
        w.send(&mut c, to, Payload::Allocate(alloc), false)?;
    }
    let hash = Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]);
    let sync = Sync {
        target: w2.agent,
        task,
        segment: 0,
        round: 1,
        hash: hash.clone(),
        body: Bytes::new(),
    };
    w.send(&mut w1, "W2", Payload::Sync(sync), false)?;
    let ack = SyncAck {
        target: w1.agent,
        task,
        segment: 0,
        round: 1,
        hash,
        agreed: true,
    };
    w.send(&mut w2, "W1", Payload::SyncAck(ack), false)?;
    let progress = |segment, permille, output: Option<Bytes>| Report {
        target: 10,
        task,
        segment,
        attempt: 1,
        progress_permille: permille,
        health: Health::Ok,
        load: 1,
        output,
        error: None,
        refused: None,
        retry_after_ms: None,
    };
    w.send(&mut w1, "C", Payload::Report(progress(0, 900, None)), true)?;
    let adjust = Adjust {
        target: w2.agent,
        task,
        segment: Some(1),
        params: BTreeMap::from([("temperature".into(), "0.2".into())]),
        priority: Some(200),
        cancel: false,
        attempt: Some(1),
    };
    w.send(&mut c, "W2", Payload::Adjust(adjust), false)?;
    w.send(
        &mut w1,
        "C",
        Payload::Report(progress(0, 1000, Some(Bytes::from_static(b"summary A")))),
        false,
    )?;
    w.send(
        &mut w2,
        "C",
        Payload::Report(progress(1, 1000, Some(Bytes::from_static(b"summary B")))),
        false,
    )?;

    // An attacker (or a confused retry) sends the last stream bytes again.
    let (sender, lane, wire) = w.last_wire.clone().context("nothing was sent")?;
    let replayed = match w.receive(sender, lane, &wire) {
        Err(e) => match e.downcast_ref::<ReplayError>() {
            Some(ReplayError::Duplicate { seq }) => format!("refused: duplicate seq {seq}"),
            _ => bail!("the replay was refused for the wrong reason: {e}"),
        },
        Ok(_) => bail!("a replayed frame was accepted"),
    };
    println!(
        "\n{} frames, {} bytes on the wire; replaying the last frame: {replayed}",
        w.frames, w.bytes
    );
    Ok(())
}
