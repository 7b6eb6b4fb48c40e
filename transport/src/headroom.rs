//! Keeps room in the shared congestion window for urgent frames.
//!
//! All lanes of a connection share one QUIC congestion window, and stream priority
//! only picks what is sent next. If the bulk and normal lanes fill the window, an
//! urgent frame waits for acknowledgements (after a loss, for recovery). So the lower
//! lanes write into quinn only while the bytes in flight stay under a share of the
//! window and under an absolute cap. [`HeadroomController`] wraps quinn's Cubic to
//! publish the window and the bytes in flight to the writers ([`WindowGauge`]), and
//! tells Cubic the connection was window-limited, not application-limited, while a
//! lower lane waits for headroom; otherwise Cubic would never grow the window past
//! what the capped lanes use.

use std::any::Any;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use quinn::congestion::{Controller, ControllerFactory, CubicConfig};
use quinn_proto::RttEstimator;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Shared between a connection's congestion controller and its lane writers.
#[derive(Debug)]
pub struct WindowGauge {
    window_bytes: AtomicU64,
    in_flight_bytes: AtomicU64,
    /// Lower-lane writers waiting for the window share (not the absolute cap).
    waiting_for_share: AtomicUsize,
    changed: Notify,
    share_permille: u64,
    max_lower_in_flight_bytes: u64,
    /// Twice the estimated bandwidth-delay product: what the lower lanes may keep in
    /// flight so that they build at most about one BDP of queue in front of urgent
    /// frames. Starts at [`INITIAL_BDP_CAP_BYTES`] and follows the path.
    bdp_cap_bytes: AtomicU64,
}

/// The lower lanes' in-flight cap before any delivery rate is measured.
const INITIAL_BDP_CAP_BYTES: u64 = 64 * 1024;
/// The cap never goes below this, so a lower lane always makes progress.
const MIN_BDP_CAP_BYTES: u64 = 16 * 1024;
/// Delivery-rate samples kept for the max filter.
const RATE_SAMPLES: usize = 8;

impl WindowGauge {
    /// A gauge letting lower lanes use `share_permille`/1000 of the window, and never
    /// more than `max_lower_in_flight_bytes` in flight.
    pub fn new(share_permille: u64, max_lower_in_flight_bytes: u64) -> WindowGauge {
        WindowGauge {
            window_bytes: AtomicU64::new(u64::MAX),
            in_flight_bytes: AtomicU64::new(0),
            waiting_for_share: AtomicUsize::new(0),
            changed: Notify::new(),
            share_permille: share_permille.min(1000),
            max_lower_in_flight_bytes,
            bdp_cap_bytes: AtomicU64::new(INITIAL_BDP_CAP_BYTES.min(max_lower_in_flight_bytes)),
        }
    }

    /// The congestion window, as last reported by the controller.
    pub fn window_bytes(&self) -> u64 {
        self.window_bytes.load(Ordering::Relaxed)
    }

    /// Bytes in flight, as last reported by the controller.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes.load(Ordering::Relaxed)
    }

    /// The in-flight bytes a lower lane may write up to now, and whether the window
    /// share (rather than a cap) is what binds. The bulk lane is also held to twice the
    /// bandwidth-delay product, so it keeps at most about one BDP of queue in front of
    /// urgent frames; the normal lane only to the share and the absolute cap.
    pub fn lower_lane_limit(&self, bulk: bool) -> (u64, bool) {
        let share = self.window_bytes().saturating_mul(self.share_permille) / 1000;
        let cap = if bulk {
            self.bdp_cap_bytes
                .load(Ordering::Relaxed)
                .min(self.max_lower_in_flight_bytes)
        } else {
            self.max_lower_in_flight_bytes
        };
        if share <= cap {
            (share, true)
        } else {
            (cap, false)
        }
    }

    /// The current cap from the bandwidth-delay estimate.
    pub fn bdp_cap_bytes(&self) -> u64 {
        self.bdp_cap_bytes.load(Ordering::Relaxed)
    }

    /// Waits until a lower lane (`bulk` or normal) may write more. Returns at once if
    /// it may.
    pub async fn wait_for_room(&self, bulk: bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (limit, by_share) = self.lower_lane_limit(bulk);
            if self.in_flight_bytes() < limit {
                return;
            }
            if by_share {
                self.waiting_for_share.fetch_add(1, Ordering::Relaxed);
            }
            notified.await;
            if by_share {
                self.waiting_for_share.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn held_back_by_share(&self) -> bool {
        self.waiting_for_share.load(Ordering::Relaxed) > 0
    }

    fn publish(&self, window_bytes: u64, in_flight_bytes: u64) {
        self.window_bytes.store(window_bytes, Ordering::Relaxed);
        self.in_flight_bytes
            .store(in_flight_bytes, Ordering::Relaxed);
        self.changed.notify_waiters();
    }
}

/// Delivery-rate estimation for the bandwidth-delay cap: bytes acknowledged per
/// interval of at least one min-RTT, max-filtered over the last few intervals.
#[derive(Clone, Debug)]
struct RateEstimate {
    interval_start: Option<Instant>,
    acked_bytes: u64,
    min_rtt: Duration,
    samples: [u64; RATE_SAMPLES],
    next: usize,
}

impl RateEstimate {
    fn new() -> RateEstimate {
        RateEstimate {
            interval_start: None,
            acked_bytes: 0,
            min_rtt: Duration::MAX,
            samples: [0; RATE_SAMPLES],
            next: 0,
        }
    }

    /// Records acknowledged bytes; returns a new cap when an interval closes.
    fn on_acked(
        &mut self,
        now: Instant,
        bytes: u64,
        min_rtt: Duration,
        max_cap: u64,
    ) -> Option<u64> {
        self.min_rtt = self.min_rtt.min(min_rtt);
        self.acked_bytes += bytes;
        let start = *self.interval_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed < self.min_rtt.max(Duration::from_millis(1)) {
            return None;
        }
        let rate_bytes_per_sec =
            (self.acked_bytes as u128 * 1_000_000 / elapsed.as_micros().max(1)) as u64;
        self.samples[self.next] = rate_bytes_per_sec;
        self.next = (self.next + 1) % RATE_SAMPLES;
        self.interval_start = Some(now);
        self.acked_bytes = 0;
        let max_rate = self.samples.iter().copied().max().unwrap_or(0);
        let bdp = (max_rate as u128 * self.min_rtt.as_micros() / 1_000_000) as u64;
        Some((2 * bdp).clamp(MIN_BDP_CAP_BYTES, max_cap.max(MIN_BDP_CAP_BYTES)))
    }
}

/// Cubic, reporting to a [`WindowGauge`].
pub struct HeadroomController {
    inner: Box<dyn Controller>,
    gauge: Arc<WindowGauge>,
    in_flight_bytes: u64,
    rate: RateEstimate,
}

impl Controller for HeadroomController {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
        self.in_flight_bytes = self.in_flight_bytes.saturating_add(bytes);
        self.gauge
            .in_flight_bytes
            .store(self.in_flight_bytes, Ordering::Relaxed);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        let app_limited = app_limited && !self.gauge.held_back_by_share();
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        let max_cap = self.gauge.max_lower_in_flight_bytes;
        if let Some(cap) = self.rate.on_acked(now, bytes, rtt.min(), max_cap) {
            self.gauge.bdp_cap_bytes.store(cap, Ordering::Relaxed);
        }
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        let app_limited = app_limited && !self.gauge.held_back_by_share();
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
        self.in_flight_bytes = in_flight;
        self.gauge.publish(self.inner.window(), in_flight);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(lost_bytes);
        self.gauge
            .publish(self.inner.window(), self.in_flight_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
        self.gauge
            .publish(self.inner.window(), self.in_flight_bytes);
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> quinn::congestion::ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(HeadroomController {
            inner: self.inner.clone_box(),
            gauge: self.gauge.clone(),
            in_flight_bytes: self.in_flight_bytes,
            rate: self.rate.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Builds one [`HeadroomController`] per connection, all reporting to one gauge.
/// A factory therefore serves exactly one connection: the endpoint makes a transport
/// config per connection.
pub struct HeadroomFactory {
    cubic: Arc<CubicConfig>,
    gauge: Arc<WindowGauge>,
}

impl HeadroomFactory {
    /// A factory for a connection whose writers watch `gauge`.
    pub fn new(gauge: Arc<WindowGauge>) -> HeadroomFactory {
        HeadroomFactory {
            cubic: Arc::new(CubicConfig::default()),
            gauge,
        }
    }
}

impl ControllerFactory for HeadroomFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let inner = self.cubic.clone().build(now, current_mtu);
        self.gauge.publish(inner.window(), 0);
        Box::new(HeadroomController {
            inner,
            gauge: self.gauge.clone(),
            in_flight_bytes: 0,
            rate: RateEstimate::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)] // a fixed base instant; the test moves time by hand
    fn base() -> Instant {
        Instant::now()
    }

    #[test]
    fn the_cap_follows_twice_the_bandwidth_delay_product() {
        let t0 = base();
        let mut r = RateEstimate::new();
        let min_rtt = Duration::from_millis(2);
        // 100 MB/s: 200 KB per 2 ms interval; BDP = 200 KB; cap = 400 KB.
        let mut cap = None;
        for i in 1..=10u64 {
            cap = r
                .on_acked(
                    t0 + Duration::from_millis(2 * i),
                    200_000,
                    min_rtt,
                    10_000_000,
                )
                .or(cap);
        }
        let cap = cap.unwrap();
        assert!((390_000..=410_000).contains(&cap), "{cap}");
    }

    #[test]
    fn the_cap_stays_within_its_bounds_and_survives_a_pause() {
        let t0 = base();
        let mut r = RateEstimate::new();
        let min_rtt = Duration::from_millis(1);
        r.on_acked(t0, 1_000_000, min_rtt, 10_000_000);
        let high = r
            .on_acked(t0 + Duration::from_millis(1), 1_000_000, min_rtt, 300_000)
            .unwrap();
        assert_eq!(high, 300_000, "never above the absolute cap");
        // A few idle intervals do not collapse the estimate (max filter) ...
        let after_pause = r
            .on_acked(t0 + Duration::from_millis(5), 0, min_rtt, 10_000_000)
            .unwrap();
        assert!(after_pause > MIN_BDP_CAP_BYTES);
        // ... but a long silence lets it fall to the floor, not below.
        let mut last = after_pause;
        for i in 0..RATE_SAMPLES as u64 + 1 {
            last = r
                .on_acked(
                    t0 + Duration::from_millis(10 + 2 * i),
                    0,
                    min_rtt,
                    10_000_000,
                )
                .unwrap();
        }
        assert_eq!(last, MIN_BDP_CAP_BYTES);
    }
}
