//! Prometheus metrics: the node's counters exported at `--metrics ADDR` (`GET
//! /metrics`). Values are read from the transport's counters and from membership when
//! scraped, so the hot paths carry no metrics calls of their own.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
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

/// The process-wide Prometheus recorder, installed on first use.
pub fn recorder() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => Some(handle),
            Err(e) => {
                warn!(error = %e, "cannot install the metrics recorder");
                None
            }
        })
        .clone()
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
