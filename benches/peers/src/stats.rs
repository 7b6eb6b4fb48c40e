//! What a benchmark client prints: one JSON object of figures, the same shape for
//! every system, so the report can put them side by side.

use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{Hol, PAYLOAD_BYTES};

/// How long a bulk transfer runs before the urgent requests start, to fill the pipe.
const WARM_UP: Duration = Duration::from_millis(500);

/// One client run's figures; the fields a workload does not measure stay zero.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Figures {
    /// Which system was measured.
    pub system: String,
    /// 64-byte messages sent one way.
    #[serde(default)]
    pub messages: u64,
    /// Their rate, from the first send to the server having counted them all.
    #[serde(default)]
    pub messages_per_sec: f64,
    /// Request/reply (64 bytes each way), one at a time.
    #[serde(default)]
    pub rr_p50_us: f64,
    /// As above, 99th percentile.
    #[serde(default)]
    pub rr_p99_us: f64,
    /// Head-of-line run: urgent requests answered.
    #[serde(default)]
    pub urgent_count: usize,
    /// Their round trip while the bulk transfer ran.
    #[serde(default)]
    pub urgent_p50_ms: f64,
    /// As above, 99th percentile.
    #[serde(default)]
    pub urgent_p99_ms: f64,
    /// As above, the slowest.
    #[serde(default)]
    pub urgent_max_ms: f64,
    /// What the bulk transfer moved meanwhile.
    #[serde(default)]
    pub bulk_mb_per_sec: f64,
    /// CPU time (all threads, user and system) per message of the throughput run;
    /// measured where client and server share one process (`peers ceiling`).
    #[serde(default)]
    pub cpu_ns_per_message: f64,
}

/// CPU time this process has used so far, all threads, user and system, from
/// `/proc/self/stat` (in ticks of 1/100 s, the USER_HZ Linux reports them in).
pub fn process_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The command name, in parentheses, may hold spaces: count fields after it.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("/proc/self/stat has no command name"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: the 12th and 13th after ')'.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("/proc/self/stat is too short"))?
            .parse::<u64>()? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// The `p`th percentile (nearest rank) of sorted samples; 0 for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Sorts samples (any order in, ascending out).
pub fn sorted(mut samples: Vec<f64>) -> Vec<f64> {
    samples.sort_by(f64::total_cmp);
    samples
}

/// One request/reply of a 64-byte payload, as each system makes it.
pub(crate) trait Echo {
    /// Sends the request and returns the length of the payload that came back.
    async fn echo(&mut self) -> anyhow::Result<usize>;
}

/// Times `n` round trips one after another, spaced `every` apart if given, each
/// checked to bring the payload back; microseconds.
pub(crate) async fn round_trips(
    n: usize,
    every: Option<Duration>,
    echo: &mut impl Echo,
) -> anyhow::Result<Vec<f64>> {
    let mut tick = every.map(|e| {
        let mut t = tokio::time::interval(e);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let sent = Instant::now();
        let len = echo.echo().await?;
        rtts.push(sent.elapsed().as_secs_f64() * 1e6);
        if len != PAYLOAD_BYTES {
            bail!("the echo came back with {len} bytes, not {PAYLOAD_BYTES}");
        }
    }
    Ok(rtts)
}

/// The head-of-line measurement, with a bulk transfer already started (it counts
/// what it sends in `bulk_sent` and stops when `stop` is set): lets it fill the pipe,
/// times the urgent requests, and checks that the transfer ran throughout.
pub(crate) async fn under_bulk<T: Debug>(
    system: &str,
    run: &Hol,
    echo: &mut impl Echo,
    bulk_sent: &AtomicU64,
    stop: &AtomicBool,
    bulk: JoinHandle<T>,
) -> anyhow::Result<Figures> {
    tokio::time::sleep(WARM_UP).await;
    let before = bulk_sent.load(Ordering::Relaxed);
    let started = Instant::now();
    let rtts = round_trips(
        run.requests,
        Some(Duration::from_millis(run.interval_ms)),
        echo,
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let moved = bulk_sent.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    if bulk.is_finished() {
        bail!("the bulk transfer stopped early: {:?}", bulk.await);
    }
    bulk.abort();
    let mut figures = Figures {
        system: system.into(),
        ..Figures::default()
    };
    urgent(&mut figures, rtts, moved, seconds);
    Ok(figures)
}

/// Fills the urgent fields from round trips in microseconds.
pub fn urgent(figures: &mut Figures, rtts_us: Vec<f64>, bulk_bytes: u64, seconds: f64) {
    let rtts: Vec<f64> = sorted(rtts_us).into_iter().map(|us| us / 1e3).collect();
    figures.urgent_count = rtts.len();
    figures.urgent_p50_ms = percentile(&rtts, 50.0);
    figures.urgent_p99_ms = percentile(&rtts, 99.0);
    figures.urgent_max_ms = rtts.last().copied().unwrap_or(0.0);
    figures.bulk_mb_per_sec = bulk_bytes as f64 / 1e6 / seconds.max(1e-9);
}

/// Fills the request/reply fields from round trips in microseconds.
pub fn request_reply(figures: &mut Figures, rtts_us: Vec<f64>) {
    let rtts = sorted(rtts_us);
    figures.rr_p50_us = percentile(&rtts, 50.0);
    figures.rr_p99_us = percentile(&rtts, 99.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let s = sorted((1..=100).rev().map(f64::from).collect());
        assert_eq!(percentile(&s, 50.0), 51.0);
        assert_eq!(percentile(&s, 99.0), 99.0);
        assert_eq!(percentile(&s, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
