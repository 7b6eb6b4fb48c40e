//! When a replica that panicked comes back, and what an agent's replicas add up to as
//! its health: plain decisions over injected time, so that the worker supervisor and
//! the simulator restart, rest and report health alike.

use std::collections::VecDeque;
use std::time::Duration;

use agentmesh_runtime::transport::wire::payload::Health;

/// How replicas that panic are restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts of one replica allowed within `window`; one more panic and it rests.
    pub max_restarts: usize,
    /// The window panics are counted in.
    pub window: Duration,
    /// The wait before the first restart, doubled for each panic in the window.
    pub backoff: Duration,
    /// How long a replica that panicked too often rests before it comes back. If it
    /// panics again within the window, it rests again at once.
    pub rest: Duration,
}

impl Default for RestartPolicy {
    /// 5 restarts in 60 s (after 50, 100, 200, 400 and 800 ms); then 30 s of rest.
    fn default() -> RestartPolicy {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(50),
            rest: Duration::from_secs(30),
        }
    }
}

/// When a replica that panicked comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comeback {
    /// After this backoff.
    Restart(Duration),
    /// After this rest: it panicked more often than the policy allows.
    Rest(Duration),
}

impl Comeback {
    /// How long until it is back.
    pub fn after(self) -> Duration {
        match self {
            Comeback::Restart(d) | Comeback::Rest(d) => d,
        }
    }

    /// Whether it rests (rather than restarts).
    pub fn rests(self) -> bool {
        matches!(self, Comeback::Rest(_))
    }
}

/// One replica's panics within the policy's window, passed on to the replica that
/// replaces it. Times are the caller's clock (any fixed origin), never read here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Panics {
    at: VecDeque<Duration>,
}

impl Panics {
    /// Records a panic at `now` and says when the replica comes back: after a backoff
    /// that doubles with each panic in the window, or after a rest once it panicked
    /// more than `max_restarts` times in it. Panics older than the window are
    /// forgotten, so the history holds at most `max_restarts + 1` entries.
    pub fn record(&mut self, now: Duration, policy: &RestartPolicy) -> Comeback {
        self.at.push_back(now);
        while self
            .at
            .front()
            .is_some_and(|t| now.saturating_sub(*t) > policy.window)
        {
            self.at.pop_front();
        }
        while self.at.len() > policy.max_restarts.saturating_add(1) {
            self.at.pop_front();
        }
        if self.at.len() > policy.max_restarts {
            Comeback::Rest(policy.rest)
        } else {
            let doublings = (self.at.len() - 1).min(16) as u32;
            Comeback::Restart(policy.backoff.saturating_mul(1 << doublings))
        }
    }

    /// Panics within the window at the last record.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether it never panicked (within the window).
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

/// An agent's health from its replicas: ok while all of them run, unhealthy while
/// every one rests (none will run for a while), degraded otherwise.
pub fn health(replicas: usize, up: usize, resting: usize) -> Health {
    if up >= replicas {
        Health::Ok
    } else if up == 0 && resting >= replicas {
        Health::Unhealthy
    } else {
        Health::Degraded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_doubles_then_the_replica_rests_and_old_panics_are_forgotten() {
        let policy = RestartPolicy::default();
        let mut p = Panics::default();
        let got: Vec<Comeback> = (0..6).map(|i| p.record(ms(i * 10), &policy)).collect();
        assert_eq!(
            got,
            [50, 100, 200, 400, 800]
                .map(|b| Comeback::Restart(ms(b)))
                .into_iter()
                .chain([Comeback::Rest(policy.rest)])
                .collect::<Vec<_>>()
        );
        // Still within the window: rests again at once.
        assert!(p.record(ms(31_000), &policy).rests());
        assert_eq!(p.len(), policy.max_restarts + 1, "bounded");
        // A minute after the last, the window is empty again: the first backoff.
        assert_eq!(p.record(ms(92_000), &policy), Comeback::Restart(ms(50)));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn health_is_ok_degraded_or_unhealthy() {
        assert_eq!(health(2, 2, 0), Health::Ok);
        assert_eq!(health(2, 1, 1), Health::Degraded);
        assert_eq!(health(2, 0, 1), Health::Degraded, "one restarting");
        assert_eq!(health(2, 0, 2), Health::Unhealthy);
    }
}
