//! What a benchmark client prints: one JSON object of figures, the same shape for
//! every system, so the report can put them side by side.

use serde::{Deserialize, Serialize};

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

/// Fills the urgent fields from round trips in milliseconds.
pub fn urgent(figures: &mut Figures, rtts_ms: Vec<f64>, bulk_bytes: u64, seconds: f64) {
    let rtts = sorted(rtts_ms);
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
