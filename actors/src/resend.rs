//! Puts `kept.rs` on the mesh for the two senders that keep frames until they surely
//! arrived, the coordinator's (ALLOCATEs) and the worker host's (final REPORTs): sends
//! again the frames whose connection was lost, on their node's connection now, and
//! counts what went again or was let go.

use std::collections::BTreeSet;

use agentmesh_runtime::transport::wire::Message;
use agentmesh_runtime::transport::PeerHandle;
use agentmesh_runtime::Mesh;
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
