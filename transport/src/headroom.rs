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
use std::time::Instant;
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
}

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

    /// The in-flight bytes a lower lane may write up to now.
    pub fn lower_lane_limit(&self) -> (u64, bool) {
        let share = self.window_bytes().saturating_mul(self.share_permille) / 1000;
        if share <= self.max_lower_in_flight_bytes {
            (share, true)
        } else {
            (self.max_lower_in_flight_bytes, false)
        }
    }

    /// Waits until a lower lane may write more. Returns at once if it may.
    pub async fn wait_for_room(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (limit, by_share) = self.lower_lane_limit();
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

/// Cubic, reporting to a [`WindowGauge`].
pub struct HeadroomController {
    inner: Box<dyn Controller>,
    gauge: Arc<WindowGauge>,
    in_flight_bytes: u64,
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
        })
    }
}
