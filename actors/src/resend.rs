//! Puts `kept.rs` on the mesh for the two senders that keep frames until they surely
//! arrived, the coordinator's (ALLOCATEs, ADJUSTs) and the worker host's (final
//! REPORTs): sends a frame and keeps it, sends again the frames whose connection was
//! lost on their node's connection now, and counts what went again or was let go.

use std::collections::BTreeSet;

use agentmesh_runtime::transport::wire::Message;
use agentmesh_runtime::transport::PeerHandle;
use agentmesh_runtime::{Mesh, SendError};
use tracing::info;

use crate::kept::KeptFrames;

/// Which frames a sender keeps, by the names its log line and counters go by.
pub(crate) struct Kind {
    /// What they are, for the log ("final REPORTs", "ALLOCATEs").
    pub what: &'static str,
    /// The counter of frames sent again.
    pub resent: &'static str,
    /// The counter of frames let go before they surely arrived, by reason.
    pub unkept: &'static str,
    /// Whether a frame that found no connection to its node is kept for the next one
    /// (an ALLOCATE is not: its attempt ends as a refusal, and the segment goes again).
    pub keep_unsent: bool,
}

impl Kind {
    /// Counts `n` frames let go for `reason` ("full": past the bounds; "no_connection":
    /// none to their node for the give-up time).
    pub(crate) fn unkept(&self, reason: &'static str, n: usize) {
        if n > 0 {
            metrics::counter!(self.unkept, "reason" => reason).increment(n as u64);
        }
    }
}

/// Sends `message` to `node` and keeps it in `kept` (as `item(message)`) until it surely
/// arrived: on the connection it went on, or, if it found none and `kind` says so, for
/// the node's next. A frame to this node itself is handed over, and one that can never
/// go is not kept. What the send gave.
pub(crate) async fn send_and_keep<M: Clone>(
    mesh: &Mesh,
    kept: &mut KeptFrames<PeerHandle, M>,
    kind: &Kind,
    node: &str,
    message: Message,
    item: impl FnOnce(Message) -> M,
    now_ms: u64,
) -> Result<(), SendError> {
    let bytes = message.body.len();
    let sent = mesh.send_acp_via(node, message.clone()).await;
    let on = match &sent {
        Ok(None) => return Ok(()),
        Ok(Some(peer)) => Some(peer.clone()),
        Err(e) if kind.keep_unsent && unreachable(e) => None,
        Err(_) => return sent.map(drop),
    };
    kind.unkept("full", kept.keep(node, item(message), bytes, on, now_ms));
    sent.map(drop)
}

/// Whether `e` says the frame found no connection to its node, not that it can never
/// go (it does not encode, does not fit a frame, or is longer than a peer takes).
pub(crate) fn unreachable(e: &SendError) -> bool {
    match e {
        SendError::Encode(_) => false,
        SendError::Transport(e) => !e.never_sendable(),
        _ => true,
    }
}

/// Sends again the frames of `kept` whose connection was lost, or that had none, on
/// their node's connection now; `frame` gives the message of a kept frame.
pub(crate) async fn resend<M: Clone>(
    mesh: &Mesh,
    kept: &mut KeptFrames<PeerHandle, M>,
    now_ms: u64,
    kind: &Kind,
    frame: impl Fn(M) -> Message,
) {
    let tick = kept.tick(now_ms, PeerHandle::link, |node| mesh.connection(node));
    kind.unkept("no_connection", tick.given_up);
    if tick.resend.is_empty() {
        return;
    }
    let nodes: BTreeSet<&str> = tick.resend.iter().map(|(p, _)| &**p.name()).collect();
    info!(
        frames = tick.resend.len(),
        ?nodes,
        "sending {} again: the connection they went on was lost, or there was none",
        kind.what
    );
    metrics::counter!(kind.resent).increment(tick.resend.len() as u64);
    for (peer, kept) in tick.resend {
        // If this connection is lost too, the next check sends it again.
        let _ = peer.send(frame(kept)).await;
    }
}
