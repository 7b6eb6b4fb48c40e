//! `agentmesh submit`: hands a task to a node's coordinator and waits for its end.
//! Each segment's input is built here: from a JSON Lines file (one segment per line,
//! for any agent), from a text file cut into `--segments` chunks (for `wordcount`,
//! `echo`), or from `--segment-ms` alone (for `sleep`, `crash`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use tokio::time::Instant;
use tracing::{debug, warn};
use uuid::Uuid;

use super::client::{runtime, ClientArgs};
use crate::actors::coordinator::SUBMIT_TIMEOUT;
use crate::actors::pages::{rest_from, results_at, Patience};
use crate::actors::service::serde_bytes_vec::Blob;
use crate::actors::service::{
    SubmitRequest, TaskOutcome, TaskStatus, COORDINATOR_SERVICE, MAX_SEGMENT_TIMEOUT_MS,
};
use crate::builtin::SegmentInput;
use crate::local::input;
use crate::runtime::{
    request_status, status_of, Client, ClientError, MemberInfo, MemberState, NodeId, RemoteMessage,
};
use crate::transport::tls::NodeIdentity;
use crate::transport::{TransportError, DEFAULT_MAX_MESSAGE_BYTES};

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The capability every segment needs.
    #[arg(long)]
    capability: String,
    /// Segments to split the task into (with a .jsonl --input: its line count).
    #[arg(long)]
    segments: Option<u32>,
    /// Milliseconds each segment works (`sleep`, `crash`).
    #[arg(long, default_value_t = 0)]
    segment_ms: u64,
    /// Milliseconds an attempt of a segment may run before it is started again on
    /// another worker (default: the coordinator's, 30 s). Give more for work that takes
    /// longer, or each such segment runs on several workers at once.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_SEGMENT_TIMEOUT_MS))]
    segment_timeout_ms: Option<u64>,
    /// Input: a .jsonl file gives one segment's input per line (as JSON); any other
    /// file is text cut into --segments chunks at word boundaries.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Task priority 0..=255 (default: the group's, from the policy, else 128).
    #[arg(long)]
    priority: Option<u8>,
    /// The coordination group the task acts in.
    #[arg(long, default_value_t = 0)]
    group: u16,
    /// Tags the agents must have.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// `crash` agents panic on attempts up to this one.
    #[arg(long, default_value_t = 0)]
    panic_attempts: u32,
    /// A name for the task, shown by `agentmesh status` (at most 128 bytes).
    #[arg(long)]
    label: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also print each segment's result.
    #[arg(long)]
    results: bool,
}

/// Segments in one submission at most.
const MAX_SEGMENTS: u32 = 1_000_000;
/// Largest input file read.
const MAX_INPUT_BYTES: u64 = 256 * 1024 * 1024;

/// Checks the arguments, loads the identity and builds the inputs: failures here are
/// bad input.
pub fn prepare(args: &SubmitArgs) -> anyhow::Result<(NodeIdentity, Vec<Blob>)> {
    let identity = args.client.identity("submit")?;
    let inputs = inputs(args)?;
    // What a node takes in one message, less room for the request's other fields.
    let limit = DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024;
    let size: usize = inputs.iter().map(|b| b.0.len() + 5).sum();
    if size > limit {
        bail!(
            "the inputs take {size} bytes, and a submission carries at most {limit}: submit smaller or fewer inputs"
        );
    }
    Ok((identity, inputs))
}

fn inputs(args: &SubmitArgs) -> anyhow::Result<Vec<Blob>> {
    if args.capability.is_empty() {
        bail!("--capability must not be empty");
    }
    let max_label = agentmesh_actors::service::MAX_LABEL_LEN;
    if args.label.as_ref().is_some_and(|l| l.len() > max_label) {
        bail!("--label has at most {max_label} bytes");
    }
    let jsonl = args
        .input
        .as_ref()
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"));
    let text = match &args.input {
        None => None,
        Some(path) => {
            let len = std::fs::metadata(path)
                .with_context(|| format!("reading {}", path.display()))?
                .len();
            if len > MAX_INPUT_BYTES {
                bail!("{} is larger than {MAX_INPUT_BYTES} bytes", path.display());
            }
            Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {} (as UTF-8 text)", path.display()))?,
            )
        }
    };
    if let Some(path) = jsonl {
        let mut out = Vec::new();
        for (i, line) in text.unwrap_or_default().lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("line {} of {} is not JSON", i + 1, path.display()))?;
            out.push(input(&value)?);
        }
        if out.is_empty() {
            bail!("{} has no segments", path.display());
        }
        if args.segments.is_some_and(|n| n as usize != out.len()) {
            bail!(
                "--segments says {} but the input has {} lines",
                args.segments.unwrap_or_default(),
                out.len()
            );
        }
        return Ok(out);
    }
    let n = args
        .segments
        .context("--segments is needed (unless --input is a .jsonl file)")?;
    if n == 0 || n > MAX_SEGMENTS {
        bail!("--segments must be 1..={MAX_SEGMENTS}");
    }
    let chunks = match text {
        Some(text) => split_words(&text, n as usize),
        None => vec![String::new(); n as usize],
    };
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, text)| {
            input(&SegmentInput {
                segment: i as u32,
                ms: args.segment_ms,
                text,
                panic_attempts: args.panic_attempts,
            })
        })
        .collect()
}

/// Cuts `text` into `n` chunks of about the same number of words.
fn split_words(text: &str, n: usize) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let per = words.len().div_ceil(n).max(1);
    let mut chunks: Vec<String> = words.chunks(per).map(|c| c.join(" ")).collect();
    chunks.resize(n, String::new());
    chunks
}

#[derive(Serialize)]
struct Printed<'a> {
    task: String,
    status: TaskStatus,
    segments: u32,
    completed: u32,
    duplicates_discarded: u64,
    reallocated: u64,
    elapsed_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    results: Option<Vec<serde_json::Value>>,
}

/// How long `submit` tries to reach the node again after losing its connection.
const RECONNECT_WITHIN: Duration = Duration::from_secs(60);
/// The pause between two tries.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// How long `submit` tries to make its first connection (each try times out after the
/// 3 s idle timeout): a handshake can lose every try's packets at a few percent of
/// packet loss, or the node may be starting. Nothing was sent before it, so trying
/// again is safe. A wrong address is reported after this long, not after one try.
const FIRST_CONNECT_WITHIN: Duration = Duration::from_secs(10);
/// How long `submit`, told by its node that it does not know the task (it restarted),
/// keeps asking the other members: they learn of the restart within seconds, and
/// only then may one take the task over or adopt it.
const RESTARTED_WITHIN: Duration = Duration::from_secs(10);
/// How long a node has to answer with a page of results.
const RESULTS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the node has to list its members.
const MEMBERS_TIMEOUT_MS: u64 = 2_000;
/// How many of the members that answered are asked whether those out of reach are
/// down, before the task is adopted.
const DOWN_VIEWS: usize = 4;
/// A member that lost the connection after the client's request had waited there
/// this long held the task: one that does not answers at once, and a connection
/// that hears nothing closes after the 3 s idle timeout.
const HELD_AFTER: Duration = Duration::from_secs(5);

/// Submits `request` and waits for the task's outcome. If the connection is lost after
/// the first submission (the node paused, restarting its network, ...), it connects
/// again and submits the same task (same id): the coordinator then waits for the task
/// it already runs, or answers with its outcome if it ended meanwhile, so the task runs
/// once. If that node is gone or no longer knows the task, the other members it listed
/// at the submission are asked: the one that holds the task as standby waits for it
/// (and takes it over once the node is found down or restarted; a node that says it
/// does not know the task is taken for restarted, and the others are asked for
/// [`RESTARTED_WITHIN`]). If no one of them holds the task (the node went down before
/// its standby had it, or with it), they are asked to adopt it
/// ([`SubmitRequest::adopt_from`]), and the node's standby-to-be starts it once it has
/// taken over from that node. It gives up after [`RECONNECT_WITHIN`] without a
/// connection. An outcome longer than one message comes in pages, and the rest is
/// asked for ([`rest_from_members`]).
async fn wait_for(
    identity: &NodeIdentity,
    to: SocketAddr,
    request: SubmitRequest,
) -> anyhow::Result<TaskOutcome> {
    // The node's name and the other members, as it listed them at the submission.
    let mut members = Members::default();
    let first = first_answer(identity, to, request, &mut members).await?;
    rest_from_members(identity, to, &members, first).await
}

/// [`wait_for`] up to the outcome's first page.
async fn first_answer(
    identity: &NodeIdentity,
    to: SocketAddr,
    mut request: SubmitRequest,
    members: &mut Members,
) -> anyhow::Result<TaskOutcome> {
    let task = request.task.map(|t| t.to_string()).unwrap_or_default();
    // Whether the task was submitted once, and since when connections keep failing
    // (a connection that lasted starts the count again).
    let mut submitted = false;
    let mut failing_since: Option<Instant> = None;
    let first_try = Instant::now();
    loop {
        // Sent again, the task is only waited for: a node that restarted meanwhile
        // does not know it and says so, rather than run it again.
        request.attach = submitted;
        // Listed again while the list is empty: at the submission the node may not
        // have answered in time (under heavy loss), and a client with no other member
        // to ask loses its task with the node.
        let list = (!submitted || members.others.is_empty()).then_some(&mut *members);
        let (error, connected) = match ask(identity, to, &request, list, &mut submitted).await {
            Ok(outcome) if !outcome.unknown => return Ok(outcome),
            Ok(unknown) => {
                // The node restarted: a standby may take the task over, or adopt it.
                return Ok(
                    ask_others_until(identity, members, &request, RESTARTED_WITHIN)
                        .await
                        .unwrap_or(unknown),
                );
            }
            Err(failed) => failed,
        };
        if !submitted && unanswered(&error) && first_try.elapsed() < FIRST_CONNECT_WITHIN {
            // Not connected yet: nothing of the task went out.
            warn!(%error, %to, "no connection to the node yet; trying again");
            tokio::time::sleep(RECONNECT_PAUSE).await;
            continue;
        }
        if !submitted || !error.is_connection_lost() {
            return Err(error.into());
        }
        let lost_a_holder = match ask_others(identity, members, &request, false).await {
            Ok(outcome) => return Ok(outcome),
            Err(why) => why == NotFound::Lost,
        };
        // The count starts again after a connection to the node that lasted, or a
        // member the client waited at that is lost: its standby takes the task over.
        if connected >= RECONNECT_WITHIN || lost_a_holder {
            failing_since = None;
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= RECONNECT_WITHIN {
            bail!(
                "{error}; no lasting connection to {to} for {} s: task {task} may still run there (`agentmesh status --to {to}` lists it)",
                RECONNECT_WITHIN.as_secs()
            );
        }
        warn!(%error, %task, "asking the node again for the task");
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// The whole outcome, given its `first` answer: if that says more results follow, asks
/// for them page by page, of `to` first and then of the other members (a standby keeps
/// the outcome its coordinator sent with the task's end), trying again while nodes
/// cannot be reached, for up to [`RECONNECT_WITHIN`] without a page.
async fn rest_from_members(
    identity: &NodeIdentity,
    to: SocketAddr,
    members: &Members,
    first: TaskOutcome,
) -> anyhow::Result<TaskOutcome> {
    let nodes: Vec<SocketAddr> = std::iter::once(to)
        .chain(members.others.iter().copied().filter(|a| *a != to))
        .collect();
    let patience = Patience {
        within: RECONNECT_WITHIN,
        pause: RECONNECT_PAUSE,
    };
    let ask = |addr, request| results_at(identity, addr, request, RESULTS_TIMEOUT);
    Ok(rest_from(first, nodes, ask, patience).await?)
}

/// Whether a connection attempt timed out (no answer: packets lost, or no node there
/// yet), rather than failed for a reason another try would meet again (a certificate
/// of another cluster, another node at the address).
fn unanswered(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Transport(TransportError::Connection {
            source: quinn::ConnectionError::TimedOut,
            ..
        })
    )
}

/// The node a task was submitted to (its name and address), the other members it
/// listed then (or, if it listed none, when it was asked again), and when the task
/// was submitted.
#[derive(Default)]
struct Members {
    node: String,
    /// The node's life (`NodeId::life`) when the task was submitted, or when it was
    /// first listed after, if it was not then.
    life: Option<u64>,
    addr: Option<SocketAddr>,
    others: Vec<SocketAddr>,
    since: Option<Instant>,
}

/// Sends `request` to the node at `addr` and waits for the answer; with `members`,
/// first lists the node's other members there. `sent` becomes true once connected
/// (the request may have reached the node from then on). An error comes with how long
/// the connection lasted (zero if there was none).
async fn ask(
    identity: &NodeIdentity,
    addr: SocketAddr,
    request: &SubmitRequest,
    members: Option<&mut Members>,
    sent: &mut bool,
) -> Result<TaskOutcome, (ClientError, Duration)> {
    let mut client = Client::connect(identity, addr)
        .await
        .map_err(|e| (e, Duration::ZERO))?;
    *sent = true;
    let connected_at = Instant::now();
    if let Some(members) = members {
        // The first connection's: the task's figures count from its submission.
        members.since.get_or_insert(connected_at);
        members.node = client.node().to_string();
        members.addr = Some(addr);
        list_members(&mut client, addr, members).await;
    }
    let outcome = client
        .request(
            COORDINATOR_SERVICE,
            <SubmitRequest as RemoteMessage>::KIND,
            request,
            SUBMIT_TIMEOUT,
        )
        .await;
    client.close().await;
    outcome.map_err(|e| (e, connected_at.elapsed()))
}

/// Lists the other members up at the node `client` is connected to (at `addr`), and
/// that node's life if none is known yet. Without the list, a task outlives its node
/// only if that node comes back.
async fn list_members(client: &mut Client, addr: SocketAddr, members: &mut Members) {
    let Ok(report) = status_of(client, addr, MEMBERS_TIMEOUT_MS).await else {
        return;
    };
    // Listed after the submission, the node may be in a later life than the one
    // submitted to: that only keeps a node that saw neither from adopting.
    members.life = members.life.or_else(|| {
        report
            .members
            .iter()
            .find(|m| m.name == client.node())
            .map(|m| NodeId::life_of(m.incarnation))
    });
    members.others = report
        .members
        .into_iter()
        .filter(|m| m.state == MemberState::Up && m.name != client.node())
        .map(|m| m.addr)
        .collect();
}

/// [`list_members`] at the node the task was submitted to, if none is listed: the
/// node may have been alone at the submission, or, under heavy loss, not have
/// answered the listing in time.
async fn list_if_none(identity: &NodeIdentity, members: &mut Members) {
    let Some(addr) = members.addr.filter(|_| members.others.is_empty()) else {
        return;
    };
    if let Ok(mut client) = Client::connect(identity, addr).await {
        list_members(&mut client, addr, members).await;
        client.close().await;
    }
}

/// Asks each of the other members for the task (as `attach`): the first that knows it
/// answers with its outcome, once the task ends. If every one answers that it does not
/// hold it, or could not be asked and is held down by those that answered, the node
/// it was submitted to is asked too, and then those that answered are asked again to
/// adopt it from that node. That node is asked before an adoption because the task may
/// have come back to it: moved on by leaves (n1 to n3 to n0), it was held by n1,
/// restarted, as n0's standby, and a client that asked only n0, n2 and n3 had n2 adopt
/// it, which ran it beside n1 until n1 found that out (4 attempts twice, in a
/// `chaos.sh` run). If the node itself `answered` last (that it does not hold the
/// task), it is asked even when no other member answers: the one that took the task
/// over may have died, with the node as its standby (with two nodes, each is the
/// other's). If every member, the node too, answers that it does not hold the task,
/// the node is asked last to start it: in the life the client submitted to, it does
/// so, since the submission never reached it (lost with its connection).
async fn ask_others(
    identity: &NodeIdentity,
    members: &Members,
    request: &SubmitRequest,
    answered: bool,
) -> Result<TaskOutcome, NotFound> {
    let attach = SubmitRequest {
        attach: true,
        adopt_from: None,
        ..request.clone()
    };
    let mut asked = match ask_each(identity, &members.others, &attach).await {
        Ok(outcome) => return Ok(outcome),
        Err(asked) => asked,
    };
    if (asked.answered.is_empty() && !answered) || members.node.is_empty() {
        return Err(asked.not_found());
    }
    let mut adopters = asked.answered.clone();
    if let Some(addr) = members.addr {
        match ask_each(identity, &[addr], &attach).await {
            Ok(outcome) => return Ok(outcome),
            // It does not hold the task. It may start it only if no member could be
            // out of reach: one may have taken the task over from it.
            Err(again) => {
                if again.unreachable.is_empty() && asked.unreachable.is_empty() {
                    adopters.push(addr);
                }
                asked.unreachable.extend(again.unreachable);
                asked.lost_a_holder |= again.lost_a_holder;
            }
        }
    }
    // One that could not be asked may hold the task: adopted, it would run twice.
    // Unless a member that answered holds each of them down: they are gone (the node's
    // standby died with it, say), and nothing of theirs runs. Not in a round that lost
    // a member the client waited at: those asked before answered while it held the
    // task, and its standby may have a copy by the next round.
    if asked.lost_a_holder || (!asked.unreachable.is_empty() && !held_down(identity, &asked).await)
    {
        return Err(asked.not_found());
    }
    debug!(node = %members.node, down = ?asked.unreachable, "no member holds the task: asking them to adopt it");
    let adopt = SubmitRequest {
        adopt_from: Some(members.node.clone()),
        // The task's figures count from its submission, not from the adoption.
        waited_ms: members.since.map_or(0, |t| t.elapsed().as_millis() as u64),
        // So that a node that never saw that life may adopt too, now that it ended.
        adopt_from_life: members.life,
        ..attach
    };
    ask_each(identity, &adopters, &adopt)
        .await
        .map_err(|again| again.not_found())
}

/// Why [`ask_others`] got no outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NotFound {
    /// Every member asked answered that it does not hold the task.
    Nowhere,
    /// A member could not be asked, and may hold the task.
    Unasked,
    /// A member held the task, and the client waited there until the connection was
    /// lost: the member may have died, and its standby takes the task over.
    Lost,
}

/// [`ask_others`] every [`RECONNECT_PAUSE`] until one gives the outcome, or `limit`
/// has passed with every member answering that it does not hold the task. While a
/// member cannot be asked it may hold the task, so the asking goes on for up to
/// [`RECONNECT_WITHIN`]: under 30% packet loss a client gave up after 10 s with "not
/// known here" while the standby it could not reach ran its task to its end.
async fn ask_others_until(
    identity: &NodeIdentity,
    members: &mut Members,
    request: &SubmitRequest,
    limit: Duration,
) -> Option<TaskOutcome> {
    let mut patience = Asking::new(limit, Instant::now());
    loop {
        // A node that says the task moved on (taken over while it was held down) may
        // be the only member listed: under 30% packet loss such a client was told the
        // task failed, "taken over by node n0", which completed it 10 s later.
        list_if_none(identity, members).await;
        let why = match ask_others(identity, members, request, true).await {
            Ok(outcome) => return Some(outcome),
            Err(why) => why,
        };
        if members.others.is_empty() || patience.gives_up(why, Instant::now()) {
            return None;
        }
        debug!(
            ?why,
            "no other member has given the task's outcome yet: asking again"
        );
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// How long [`ask_others_until`] goes on: `limit` while every member answers that it
/// does not hold the task, [`RECONNECT_WITHIN`] while one cannot be asked, counted
/// from its start or from the last member lost while the client waited there. Before,
/// the count ran through the wait, and a client that waited at a member longer than
/// the limit gave up after the first round that found the task nowhere (the likeliest
/// reading of a failure under 30% packet loss: the client had waited at a standby that
/// was then SIGKILLed, and its task completed elsewhere).
struct Asking {
    limit: Duration,
    since: Instant,
}

impl Asking {
    fn new(limit: Duration, now: Instant) -> Asking {
        Asking { limit, since: now }
    }

    /// Whether to give up, the task not found (`why`) in the round that ended `now`.
    fn gives_up(&mut self, why: NotFound, now: Instant) -> bool {
        let limit = match why {
            NotFound::Nowhere => self.limit,
            NotFound::Unasked => RECONNECT_WITHIN,
            NotFound::Lost => {
                self.since = now;
                RECONNECT_WITHIN
            }
        };
        now.duration_since(self.since) >= limit
    }
}

/// No node gave an outcome: those that answered they do not hold the task, those that
/// could not be asked, and whether one was lost after the client had waited there
/// [`HELD_AFTER`] (it held the task).
struct AskedEach {
    answered: Vec<SocketAddr>,
    unreachable: Vec<SocketAddr>,
    lost_a_holder: bool,
}

impl AskedEach {
    fn not_found(&self) -> NotFound {
        match (self.lost_a_holder, self.unreachable.is_empty()) {
            (true, _) => NotFound::Lost,
            (false, true) => NotFound::Nowhere,
            (false, false) => NotFound::Unasked,
        }
    }
}

/// Whether the members that answered (the first [`DOWN_VIEWS`] of them) hold every
/// one that could not be asked down ([`down_in`] their views).
async fn held_down(identity: &NodeIdentity, asked: &AskedEach) -> bool {
    let mut views = Vec::new();
    for &addr in asked.answered.iter().take(DOWN_VIEWS) {
        if let Ok(report) = request_status(identity, addr, MEMBERS_TIMEOUT_MS).await {
            views.push(report.members);
        }
    }
    asked.unreachable.iter().all(|gone| down_in(&views, *gone))
}

/// Whether the members' `views` hold the member at `addr` down: one lists it down,
/// and none up or suspect. One that does not list it says neither: it may have
/// restarted and not heard of it yet, or forgotten it 30 s after it went down. Before,
/// the first member that answered decided alone, and not listing it counted as down:
/// under 30% packet loss a node just restarted, which had not heard of the member
/// that held the task, adopted it (its standby, which knew the task had ended, made
/// it stop at once, but the client gave up).
fn down_in(views: &[Vec<MemberInfo>], addr: SocketAddr) -> bool {
    let states: Vec<MemberState> = views
        .iter()
        .flatten()
        .filter(|m| m.addr == addr)
        .map(|m| m.state)
        .collect();
    !states.is_empty() && states.iter().all(|s| *s == MemberState::Down)
}

/// Asks each node at `addrs` in turn; the first that knows the task answers with its
/// outcome, once the task ends.
async fn ask_each(
    identity: &NodeIdentity,
    addrs: &[SocketAddr],
    request: &SubmitRequest,
) -> Result<TaskOutcome, AskedEach> {
    let mut asked = AskedEach {
        answered: Vec::new(),
        unreachable: Vec::new(),
        lost_a_holder: false,
    };
    for &addr in addrs {
        match ask(identity, addr, request, None, &mut false).await {
            Ok(outcome) if !outcome.unknown => return Ok(outcome),
            Ok(_) => {
                debug!(%addr, "this node does not hold the task");
                asked.answered.push(addr);
            }
            Err((error, waited)) if waited >= HELD_AFTER => {
                asked.unreachable.push(addr);
                asked.lost_a_holder = true;
                warn!(%addr, %error, waited_ms = waited.as_millis() as u64, "lost the node that held the task; asking the others");
            }
            Err((error, _)) => {
                asked.unreachable.push(addr);
                debug!(%addr, %error, "this node could not be asked for the task");
            }
        }
    }
    Err(asked)
}

/// Submits and waits; a task that failed is an error (exit code 1) after its figures
/// are printed.
pub fn run(args: SubmitArgs, identity: NodeIdentity, inputs: Vec<Blob>) -> anyhow::Result<()> {
    let request = SubmitRequest {
        tags: args.tags.clone(),
        priority: args.priority,
        group: args.group,
        label: args.label.clone(),
        task: Some(Uuid::new_v4()),
        segment_timeout_ms: args.segment_timeout_ms,
        ..SubmitRequest::new(args.capability.clone(), inputs)
    };
    let outcome: TaskOutcome = runtime()?.block_on(wait_for(&identity, args.client.to, request))?;
    let results = args.results.then(|| {
        outcome
            .results
            .iter()
            .map(|r| rmp_serde::from_slice::<serde_json::Value>(&r.0).unwrap_or_default())
            .collect::<Vec<_>>()
    });
    let printed = Printed {
        task: outcome.task.to_string(),
        status: outcome.status,
        segments: outcome.segments,
        completed: outcome.completed,
        duplicates_discarded: outcome.duplicates_discarded,
        reallocated: outcome.reallocated,
        elapsed_ms: outcome.elapsed_ms,
        reason: outcome.reason.as_deref(),
        results,
    };
    if args.json {
        println!("{}", serde_json::to_string(&printed)?);
    } else {
        let status = match outcome.status {
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
        };
        println!(
            "task {} {status}: {}/{} segments, {} reallocated, {} duplicates discarded, {} ms",
            printed.task,
            outcome.completed,
            outcome.segments,
            outcome.reallocated,
            outcome.duplicates_discarded,
            outcome.elapsed_ms
        );
        if let Some(reason) = &outcome.reason {
            println!("reason: {reason}");
        }
        for (i, r) in printed.results.iter().flatten().enumerate() {
            println!("segment {i}: {r}");
        }
    }
    if outcome.status == TaskStatus::Failed {
        bail!(
            "the task failed: {}",
            outcome.reason.unwrap_or_else(|| "no reason given".into())
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn asking_gives_up_after_the_limit_while_no_member_holds_the_task() {
        let start = Instant::now();
        let mut asking = Asking::new(10 * S, start);
        assert!(!asking.gives_up(NotFound::Nowhere, start + 9 * S));
        assert!(asking.gives_up(NotFound::Nowhere, start + 10 * S));
    }

    #[test]
    fn asking_goes_on_for_a_minute_while_a_member_cannot_be_asked() {
        let start = Instant::now();
        let mut asking = Asking::new(10 * S, start);
        assert!(!asking.gives_up(NotFound::Unasked, start + 59 * S));
        assert!(asking.gives_up(NotFound::Unasked, start + 60 * S));
    }

    #[test]
    fn asking_counts_again_from_the_loss_of_a_member_that_held_the_task() {
        let start = Instant::now();
        let mut asking = Asking::new(10 * S, start);
        // The client waited 70 s at the member before it was lost.
        let lost = start + 70 * S;
        assert!(!asking.gives_up(NotFound::Lost, lost));
        assert!(!asking.gives_up(NotFound::Nowhere, lost + 9 * S));
        assert!(!asking.gives_up(NotFound::Unasked, lost + 59 * S));
        assert!(asking.gives_up(NotFound::Nowhere, lost + 10 * S));
    }

    #[test]
    fn a_member_is_held_down_if_one_view_lists_it_down_and_none_up() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let member = |addr, state| MemberInfo {
            name: "n".into(),
            addr,
            state,
            incarnation: 0,
            rtt_us: None,
        };
        let down = vec![member(a, MemberState::Down), member(b, MemberState::Up)];
        let up = vec![member(a, MemberState::Up)];
        let suspect = vec![member(a, MemberState::Suspect)];
        let unlisted = vec![member(b, MemberState::Up)];
        assert!(down_in(std::slice::from_ref(&down), a));
        assert!(down_in(&[unlisted.clone(), down.clone()], a));
        assert!(!down_in(&[down.clone(), up], a));
        assert!(!down_in(&[suspect, down.clone()], a));
        // Not listed at all: restarted and not yet told of it, or long forgotten.
        assert!(!down_in(&[unlisted], a));
        assert!(!down_in(&[], a));
        // A later life up at the same address.
        let restarted = vec![member(a, MemberState::Down), member(a, MemberState::Up)];
        assert!(!down_in(&[restarted], a));
        assert!(!down_in(&[down], b));
    }

    #[test]
    fn a_member_lost_after_the_client_waited_there_makes_the_round_lost() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let asked = |lost_a_holder, unreachable: &[SocketAddr]| AskedEach {
            answered: vec![addr],
            unreachable: unreachable.to_vec(),
            lost_a_holder,
        };
        assert_eq!(asked(false, &[]).not_found(), NotFound::Nowhere);
        assert_eq!(asked(false, &[addr]).not_found(), NotFound::Unasked);
        assert_eq!(asked(true, &[addr]).not_found(), NotFound::Lost);
    }
}
