//! Prometheus metrics: the node's counters exported at `--metrics ADDR` (`GET
//! /metrics`). Values are read from the transport's counters and from membership when
//! scraped, so the hot paths carry no metrics calls of their own.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

use agentmesh_transport::wire::{Lane, MessageType};
use agentmesh_transport::Transport;

use crate::membership::MemberState;
use crate::node::MemberInfo;

/// Scrapes served at once; more wait for a turn.
const CONCURRENT_SCRAPES: usize = 8;
/// Largest request head read from a scraper.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A scraper gets this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a metric is, for its `# TYPE` and `# HELP` lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution (buckets).
    Histogram,
}

/// Every metric a node exports, with its help text: `# HELP` in the scrape, and the
/// list docs/architecture.md points to. A test checks that every metric the code
/// records is here.
pub const METRICS: &[(&str, Kind, &str)] = &[
    ("agentmesh_frames_received_total", Kind::Counter, "ACP frames received, by carrier (lane or datagram)"),
    ("agentmesh_frames_sent_total", Kind::Counter, "ACP frames sent, by carrier (lane or datagram)"),
    ("agentmesh_bytes_received_total", Kind::Counter, "ACP bytes received, by carrier"),
    ("agentmesh_bytes_sent_total", Kind::Counter, "ACP bytes sent, by carrier"),
    ("agentmesh_frames_shed_total", Kind::Counter, "frames shed by the per-peer ingress limits, by carrier (lowest priorities first)"),
    ("agentmesh_frames_received_by_type_total", Kind::Counter, "ACP frames received, by message type"),
    ("agentmesh_frames_sent_by_type_total", Kind::Counter, "ACP frames sent, by message type"),
    ("agentmesh_frames_dropped_total", Kind::Counter, "frames dropped on arrival: replayed, stale timestamp, or an Agent ID the peer does not own"),
    ("agentmesh_handshakes_refused_total", Kind::Counter, "TLS handshakes refused, by reason"),
    ("agentmesh_handshakes_unfinished_total", Kind::Counter, "handshakes that did not finish in time"),
    ("agentmesh_connections_closed_total", Kind::Counter, "connections this node closed for a cause, by ACP error code"),
    ("agentmesh_datagram_fallbacks_total", Kind::Counter, "datagram messages sent on a lane because they did not fit a datagram"),
    ("agentmesh_lane_direct_sends_total", Kind::Counter, "sends written straight to an idle lane's stream, skipping its writer task"),
    ("agentmesh_duplicate_connections_retired_total", Kind::Counter, "second connections between two nodes retired, by outcome"),
    ("agentmesh_peer_rtt_seconds", Kind::Gauge, "round-trip time to each member"),
    ("agentmesh_members", Kind::Gauge, "members as this node sees them, by state"),
    ("agentmesh_membership_stray_down_notices_total", Kind::Counter, "notices that a member was declared down which foca would have sent to a member this node holds up or suspect (it refuted a suspicion in time), dropped"),
    ("agentmesh_acp_shed_total", Kind::Counter, "ACP messages shed because a route's queue to its actor was full: a datagram at once, one that came on a lane or from this node after waiting 1 s in vain (or at once while its route is stuck), by type"),
    ("agentmesh_acp_waited_total", Kind::Counter, "ACP messages that came on a lane or from this node and found their route's queue full, so waited for room (up to 1 s) instead of being shed, by type"),
    ("agentmesh_actor_shed_total", Kind::Counter, "remote actor messages shed because a bounded mailbox was full"),
    ("agentmesh_tasks_total", Kind::Counter, "tasks ended at this node's coordinator, by status"),
    ("agentmesh_task_duration_seconds", Kind::Histogram, "time from submission to the end of each task, by status"),
    ("agentmesh_tasks_open", Kind::Gauge, "tasks open at this node's coordinator"),
    ("agentmesh_tasks_taken_over_total", Kind::Counter, "tasks this node's coordinator took over from a node that went down, as its standby"),
    ("agentmesh_tasks_adopted_total", Kind::Counter, "tasks this node's coordinator started for a client that lost their coordinator's node before its standby had them (no member held them)"),
    ("agentmesh_task_outcomes_given_for_others_total", Kind::Counter, "outcomes of tasks that ended at a node that went down before the outcome reached the client, given here (the node's standby) from what that node sent with the task's end"),
    ("agentmesh_task_result_pages_total", Kind::Counter, "pages of task results sent to clients over the network: outcomes longer than one message go in pages, the first with the outcome and the rest as the client asks for them"),
    ("agentmesh_task_outcomes_lost_total", Kind::Counter, "clients told that their task ended at a node that went down before the outcome reached them, whose outcome this node (its standby) did not keep: the outcome is lost, and the task is not run again"),
    ("agentmesh_checkpoint_result_bytes_total", Kind::Counter, "bytes of segment results this node's coordinator sent its standbys, in checkpoints as they were accepted and with tasks' ends (only those the standby may lack, when it holds the rest)"),
    ("agentmesh_checkpoints_refused_total", Kind::Counter, "checkpoints refused whole because they named another node than their sender as the tasks' coordinator"),
    ("agentmesh_standbys_given_up_total", Kind::Counter, "standbys up whose checkpoints failed for 5 s, whose tasks this node's coordinator gave to another standby"),
    ("agentmesh_standby_copies_dropped_total", Kind::Counter, "copies of tasks held as standby that were dropped, not run, when their coordinator went down: it had not been heard from for 4 s, and may have given them to another standby"),
    ("agentmesh_checkpoints_stale_total", Kind::Counter, "checkpoints dropped whole because they arrived after a later one of the same coordinator run"),
    ("agentmesh_standby_tasks_held", Kind::Gauge, "other coordinators' open tasks this node holds as their standby"),
    ("agentmesh_segments_waiting", Kind::Gauge, "segments of this coordinator's tasks waiting for a worker"),
    ("agentmesh_attempts_started_total", Kind::Counter, "attempts this node's coordinator allocated to a worker (first attempts and reallocations)"),
    ("agentmesh_segments_completed_total", Kind::Counter, "segment results accepted by this node's coordinator"),
    ("agentmesh_cut_off_reallocations_total", Kind::Counter, "attempts given to other workers because this node had no connection to their node, which others held up"),
    ("agentmesh_cut_off_cancellations_total", Kind::Counter, "attempts cancelled on this worker node because it had no connection to their coordinator's node"),
    ("agentmesh_final_reports_resent_total", Kind::Counter, "final REPORTs this worker node sent again because the connection they went on was lost, or there was none"),
    ("agentmesh_final_reports_unkept_total", Kind::Counter, "final REPORTs this worker node stopped keeping before it was sure they arrived, by reason (full: past its bounds; no_connection: none to their coordinator's node for 60 s)"),
    ("agentmesh_allocates_resent_total", Kind::Counter, "ALLOCATEs this coordinator sent again because the connection they went on was lost"),
    ("agentmesh_allocates_unkept_total", Kind::Counter, "ALLOCATEs this coordinator stopped keeping before it was sure they arrived, by reason (full: past its bounds; no_connection: none to their node for 60 s)"),
    ("agentmesh_allocates_repeated_total", Kind::Counter, "ALLOCATEs this worker node took no action on: their attempt runs here already, ended here lately, or was cancelled before its ALLOCATE came"),
    ("agentmesh_adjusts_resent_total", Kind::Counter, "ADJUSTs this coordinator sent again because the connection they went on was lost, or there was none"),
    ("agentmesh_adjusts_unkept_total", Kind::Counter, "ADJUSTs this coordinator stopped keeping before it was sure they arrived, by reason (full: past its bounds; no_connection: none to their node for 60 s)"),
    ("agentmesh_segments_reallocated_total", Kind::Counter, "segments given to a worker again after a failure, a timeout, or the loss of their worker or node"),
    ("agentmesh_results_discarded_total", Kind::Counter, "result copies discarded because the segment was already done"),
    ("agentmesh_allocations_refused_total", Kind::Counter, "ALLOCATEs from this node refused unrun by the worker's node, by refusal"),
    ("agentmesh_reports_refused_total", Kind::Counter, "REPORTs refused by the coordinator, by reason"),
    ("agentmesh_adjusts_before_allocate_total", Kind::Counter, "attempts this worker node started as an ADJUST that came before their ALLOCATE asked (it overtook the ALLOCATE on the urgent lane)"),
    ("agentmesh_adjust_refused_total", Kind::Counter, "ADJUSTs dropped by a worker node because they did not come from the task's coordinator"),
    ("agentmesh_policy_denials_total", Kind::Counter, "work denied by policy, by reason (group or rate) and groups"),
    ("agentmesh_policy_version", Kind::Gauge, "the version of the policy this node holds (0: its start-up file)"),
    ("agentmesh_registry_deltas_dropped_total", Kind::Counter, "registry deltas not sent because the outbox was full (members catch up from the summary)"),
    ("agentmesh_registry_deltas_refused_total", Kind::Counter, "registry deltas from other nodes refused, by reason"),
    ("agentmesh_record_dropped_total", Kind::Counter, "workload observations not recorded because the recorder fell behind"),
];

/// Buckets of `agentmesh_task_duration_seconds`.
const TASK_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The process-wide Prometheus recorder, installed on first use, with every metric of
/// [`METRICS`] described.
pub fn recorder() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets_for_metric(
                Matcher::Full("agentmesh_task_duration_seconds".into()),
                TASK_DURATION_BUCKETS,
            );
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    warn!(error = %e, "cannot install the metrics recorder");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    for &(name, kind, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

const CARRIERS: [&str; 5] = ["bulk", "normal", "coordination", "urgent", "datagram"];

/// Records the transport's counters and the members' states as metrics.
pub fn record(transport: &Transport, members: &[MemberInfo]) {
    let s = transport.stats();
    for (i, carrier) in CARRIERS.iter().enumerate() {
        metrics::counter!("agentmesh_frames_received_total", "carrier" => *carrier)
            .absolute(s.frames_in[i]);
        metrics::counter!("agentmesh_frames_sent_total", "carrier" => *carrier)
            .absolute(s.frames_out[i]);
        metrics::counter!("agentmesh_bytes_received_total", "carrier" => *carrier)
            .absolute(s.bytes_in[i]);
        metrics::counter!("agentmesh_bytes_sent_total", "carrier" => *carrier)
            .absolute(s.bytes_out[i]);
        metrics::counter!("agentmesh_frames_shed_total", "carrier" => *carrier).absolute(s.shed[i]);
    }
    for t in MessageType::ALL {
        let i = usize::from(t.code());
        metrics::counter!("agentmesh_frames_received_by_type_total", "type" => t.name())
            .absolute(s.frames_in_by_type[i]);
        metrics::counter!("agentmesh_frames_sent_by_type_total", "type" => t.name())
            .absolute(s.frames_out_by_type[i]);
    }
    for (i, reason) in ["replayed", "stale", "not_owned"].iter().enumerate() {
        metrics::counter!("agentmesh_frames_dropped_total", "reason" => *reason)
            .absolute(s.dropped[i]);
    }
    for (i, reason) in ["no_certificate", "unknown_issuer", "expired", "other"]
        .iter()
        .enumerate()
    {
        metrics::counter!("agentmesh_handshakes_refused_total", "reason" => *reason)
            .absolute(s.handshakes_refused[i]);
    }
    metrics::counter!("agentmesh_handshakes_unfinished_total").absolute(s.handshakes_unfinished);
    for (code, n) in s
        .closed_for_cause
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
    {
        metrics::counter!("agentmesh_connections_closed_total", "code" => format!("0x{code:02x}"))
            .absolute(*n);
    }
    metrics::counter!("agentmesh_datagram_fallbacks_total").absolute(s.datagram_fallbacks);
    for (lane, n) in [Lane::Bulk, Lane::Normal].iter().zip(s.direct_sends) {
        metrics::counter!("agentmesh_lane_direct_sends_total", "lane" => lane.name()).absolute(n);
    }
    for (i, outcome) in ["drained", "late"].iter().enumerate() {
        metrics::counter!("agentmesh_duplicate_connections_retired_total", "outcome" => *outcome)
            .absolute(s.duplicates_retired[i]);
    }
    // Members only: every `agentmesh status` or `submit` is a connection too, and a
    // series per client would pile up for as long as the node runs.
    let is_member = |name: &str| members.iter().any(|m| m.name == name);
    for peer in transport.peers().iter().filter(|p| is_member(p.name())) {
        metrics::gauge!("agentmesh_peer_rtt_seconds", "peer" => peer.name().to_string())
            .set(peer.rtt().as_secs_f64());
    }
    for (state, label) in [
        (MemberState::Up, "up"),
        (MemberState::Suspect, "suspect"),
        (MemberState::Down, "down"),
    ] {
        let n = members.iter().filter(|m| m.state == state).count();
        metrics::gauge!("agentmesh_members", "state" => label).set(n as f64);
    }
}

/// Serves `GET /metrics` on `addr` until the task is dropped; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    transport: Transport,
    members: watch::Receiver<Vec<MemberInfo>>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let handle = recorder();
    let turns = Arc::new(Semaphore::new(CONCURRENT_SCRAPES));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let Ok(turn) = turns.clone().acquire_owned().await else {
                return;
            };
            let (transport, members, handle) = (transport.clone(), members.clone(), handle.clone());
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &transport, &members, handle.as_ref()).await {
                    debug!(%peer, error = %e, "metrics request failed");
                }
                drop(turn);
            });
        }
    });
    Ok((local, task))
}

async fn answer(
    mut stream: TcpStream,
    transport: &Transport,
    members: &watch::Receiver<Vec<MemberInfo>>,
    handle: Option<&PrometheusHandle>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
        match handle {
            Some(handle) => {
                let members = members.borrow().clone();
                record(transport, &members);
                ("200 OK", handle.render())
            }
            None => (
                "503 Service Unavailable",
                "metrics recorder unavailable\n".to_string(),
            ),
        }
    } else if line.starts_with(b"GET ") {
        ("404 Not Found", "try /metrics\n".to_string())
    } else {
        ("400 Bad Request", "GET /metrics\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    /// `"agentmesh_…"` literals in the Rust files under `dir`.
    fn names_in(dir: &Path, found: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                names_in(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for piece in text.split("\"agentmesh_").skip(1) {
                    let name: String = piece
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && piece[name.len()..].starts_with('"') {
                        found.insert(format!("agentmesh_{name}"));
                    }
                }
            }
        }
    }

    #[test]
    fn every_metric_recorded_is_described_and_every_description_is_used() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut used = BTreeSet::new();
        for dir in ["actors/src", "runtime/src", "transport/src", "src"] {
            names_in(&root.join(dir), &mut used);
        }
        let described: BTreeSet<String> = METRICS.iter().map(|m| m.0.to_string()).collect();
        let undescribed: Vec<_> = used.difference(&described).collect();
        assert!(undescribed.is_empty(), "add to METRICS: {undescribed:?}");
        let unused: Vec<_> = described.difference(&used).collect();
        assert!(unused.is_empty(), "no longer recorded: {unused:?}");
    }

    #[test]
    fn a_scrape_carries_help_and_task_duration_buckets() {
        let handle = recorder().unwrap();
        metrics::counter!("agentmesh_tasks_total", "status" => "completed").increment(1);
        metrics::histogram!("agentmesh_task_duration_seconds", "status" => "completed").record(0.3);
        let text = handle.render();
        assert!(
            text.contains("# HELP agentmesh_tasks_total tasks ended"),
            "{text}"
        );
        assert!(
            text.contains(
                "agentmesh_task_duration_seconds_bucket{status=\"completed\",le=\"0.5\"} 1"
            ),
            "{text}"
        );
    }
}
