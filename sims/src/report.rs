//! What a simulation run measured, and the digest of its event log.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// The digest of an event log: every line's fields (event number, time, then each
/// piece as written) folded in one 64-bit word at a time, as values rather than as
/// the text they print as, so a run need not format its lines unless the log itself
/// is asked for. Equal logs give equal digests, with or without `--log`. Not a
/// cryptographic hash; it tells runs apart, it does not authenticate them.
#[derive(Clone, Copy, Debug)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Digest {
        Digest::new()
    }
}

/// FxHash's multiplier: one multiply per word folded in.
const K: u64 = 0x517c_c1b7_2722_0a95;

impl Digest {
    /// The digest of nothing.
    pub fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }

    /// Folds in one word (a number, a flag, half a UUID).
    pub fn word(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
    }

    /// Folds in a piece of text: its bytes eight at a time, then its length, so
    /// pieces cannot run into each other.
    pub fn bytes(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.word(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(b));
        }
        self.word(bytes.len() as u64);
    }

    /// Ends a line.
    pub fn end_line(&mut self) {
        self.word(0x0a0a_0a0a_0a0a_0a0a);
    }

    /// As 16 hex digits (after a final mix, so every bit of the state shows).
    pub fn hex(&self) -> String {
        // The finalizer of MurmurHash3.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        format!("{h:016x}")
    }
}

/// How one task ended.
#[derive(Clone, Copy, Debug)]
pub struct TaskRecord {
    /// Completed (or failed).
    pub completed: bool,
    /// Its priority.
    pub priority: u8,
    /// When it was submitted (simulated microseconds).
    pub submitted_us: u64,
    /// When it ended.
    pub ended_us: u64,
    /// Its segments.
    pub segments: u32,
    /// Segments with an accepted result.
    pub completed_segments: u32,
    /// Attempts started again elsewhere.
    pub reallocated: u64,
}

/// Latency of completed tasks of one priority class.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Tasks completed.
    pub tasks: u64,
    /// Median submit-to-completion time, simulated milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

/// The figures of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// The workload's name.
    pub workload: String,
    /// The seed.
    pub seed: u64,
    /// Events in the workload file.
    pub workload_events: u64,
    /// Agents registered (restarts register again).
    pub agents_registered: u64,
    /// Registrations refused (registry full).
    pub registrations_refused: u64,
    /// Tasks submitted.
    pub tasks_submitted: u64,
    /// Tasks completed.
    pub tasks_completed: u64,
    /// Tasks failed (with a reason).
    pub tasks_failed: u64,
    /// Tasks refused at submission (coordinator down).
    pub tasks_refused: u64,
    /// Tasks lost because their coordinator's node crashed.
    pub tasks_lost_with_coordinator: u64,
    /// Why tasks failed, and how many for each reason.
    pub failure_reasons: BTreeMap<String, u64>,
    /// Segments in the tasks submitted.
    pub segments_submitted: u64,
    /// Segments of completed tasks without an accepted result (must be 0).
    pub lost: u64,
    /// Results accepted a second time (must be 0).
    pub duplicates_accepted: u64,
    /// Result copies discarded by the ledger.
    pub duplicates_discarded: u64,
    /// Reports for attempts or tasks the ledger no longer knows.
    pub stale_reports: u64,
    /// Attempts started again elsewhere.
    pub reallocated: u64,
    /// ALLOCATEs sent.
    pub allocations: u64,
    /// Attempts that ran to their end.
    pub attempts_finished: u64,
    /// Node crashes (workload's and random).
    pub crashes: u64,
    /// Agent panics.
    pub panics: u64,
    /// Replicas sent to rest: they panicked more often than the restart policy allows.
    pub replica_rests: u64,
    /// ALLOCATEs refused unrun because every replica of the agent rested (`no_agent`).
    pub allocations_refused: u64,
    /// Partitions.
    pub partitions: u64,
    /// Messages put on the simulated network.
    pub messages: u64,
    /// Messages lost or dropped (loss, partition, dead receiver).
    pub messages_dropped: u64,
    /// Time from a node's crash to each of its segments' reallocation (its coordinator
    /// took it back to give it another worker), simulated ms. Bounded by the checker.
    pub crash_to_realloc_p50_ms: f64,
    /// 99th percentile.
    pub crash_to_realloc_p99_ms: f64,
    /// Segments reallocated after crashes (the sample of the two figures above).
    pub crash_reallocations: u64,
    /// Time from a node's crash to each of its segments' next attempt, simulated ms:
    /// the reallocation, plus any wait for a free worker when the agents are all busy.
    pub crash_to_attempt_p50_ms: f64,
    /// 99th percentile.
    pub crash_to_attempt_p99_ms: f64,
    /// From the first submission to the last task's end, simulated ms.
    pub makespan_ms: f64,
    /// Task latency by priority class (urgent 192+, high 128+, normal 64+, low).
    pub latency_by_priority: BTreeMap<String, Latency>,
    /// Simulated time at the end, ms.
    pub simulated_ms: f64,
    /// Events processed.
    pub events: u64,
    /// Wall-clock time of the run, ms.
    pub wall_ms: f64,
    /// Events per second of wall time.
    pub events_per_sec: f64,
    /// Peak resident memory of the process, MiB (Linux; 0 elsewhere).
    pub peak_memory_mib: f64,
    /// Digest of the event log.
    pub digest: String,
    #[serde(skip)]
    ended: Vec<TaskRecord>,
    /// When each segment result was accepted, simulated microseconds (for the chart).
    #[serde(skip)]
    completions_us: Vec<u64>,
    /// When each node crashed, simulated microseconds, with the node's name.
    #[serde(skip)]
    crashes_us: Vec<(u64, String)>,
}

/// The class name of a priority: urgent 192+, high 128+, normal 64+, low.
pub fn class(priority: u8) -> &'static str {
    match priority {
        192.. => "urgent",
        128..=191 => "high",
        64..=127 => "normal",
        _ => "low",
    }
}

/// The `q` quantile of sorted values, by nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Report {
    /// An empty report.
    pub fn new(workload: &str, seed: u64) -> Report {
        Report {
            workload: workload.to_string(),
            seed,
            ..Report::default()
        }
    }

    /// A task ended.
    pub fn task_ended(&mut self, t: TaskRecord) {
        if t.completed {
            self.tasks_completed += 1;
            self.lost += u64::from(t.segments.saturating_sub(t.completed_segments));
        } else {
            self.tasks_failed += 1;
        }
        self.reallocated += t.reallocated;
        self.ended.push(t);
    }

    /// Counts a failure reason (the task's own id left out, so alike reasons add up).
    pub fn note_failure(&mut self, reason: &str) {
        *self.failure_reasons.entry(reason.to_string()).or_default() += 1;
    }

    /// A segment's result was accepted at `at_us`.
    pub fn segment_completed(&mut self, at_us: u64) {
        self.completions_us.push(at_us);
    }

    /// A node crashed at `at_us`.
    pub fn node_crashed(&mut self, at_us: u64, node: &str) {
        self.crashes += 1;
        self.crashes_us.push((at_us, node.to_string()));
    }

    /// When segment results were accepted, in order, simulated microseconds.
    pub fn completions_us(&self) -> &[u64] {
        &self.completions_us
    }

    /// When nodes crashed, in order, simulated microseconds, with their names.
    pub fn crashes_us(&self) -> &[(u64, String)] {
        &self.crashes_us
    }

    /// The tasks that ended, in the order they did.
    pub fn tasks(&self) -> &[TaskRecord] {
        &self.ended
    }

    /// Fills in the figures known at the end.
    pub fn finish(
        &mut self,
        events: u64,
        now_us: u64,
        wall: Duration,
        digest: String,
        mut realloc_us: Vec<u64>,
        mut restart_us: Vec<u64>,
    ) {
        self.events = events;
        self.simulated_ms = now_us as f64 / 1000.0;
        self.wall_ms = wall.as_secs_f64() * 1000.0;
        self.events_per_sec = events as f64 / wall.as_secs_f64().max(1e-9);
        self.digest = digest;
        realloc_us.sort_unstable();
        self.crash_reallocations = realloc_us.len() as u64;
        self.crash_to_realloc_p50_ms = quantile(&realloc_us, 0.5) as f64 / 1000.0;
        self.crash_to_realloc_p99_ms = quantile(&realloc_us, 0.99) as f64 / 1000.0;
        restart_us.sort_unstable();
        self.crash_to_attempt_p50_ms = quantile(&restart_us, 0.5) as f64 / 1000.0;
        self.crash_to_attempt_p99_ms = quantile(&restart_us, 0.99) as f64 / 1000.0;
        let first = self.ended.iter().map(|t| t.submitted_us).min().unwrap_or(0);
        let last = self.ended.iter().map(|t| t.ended_us).max().unwrap_or(0);
        self.makespan_ms = last.saturating_sub(first) as f64 / 1000.0;
        let mut by_class: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for t in self.ended.iter().filter(|t| t.completed) {
            by_class
                .entry(class(t.priority))
                .or_default()
                .push(t.ended_us - t.submitted_us);
        }
        for (name, mut v) in by_class {
            v.sort_unstable();
            self.latency_by_priority.insert(
                name.to_string(),
                Latency {
                    tasks: v.len() as u64,
                    p50_ms: quantile(&v, 0.5) as f64 / 1000.0,
                    p99_ms: quantile(&v, 0.99) as f64 / 1000.0,
                },
            );
        }
        self.peak_memory_mib = peak_memory_mib();
    }
}

/// The process's peak resident set (VmHWM), in MiB.
fn peak_memory_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&[], 0.5), 0);
        assert_eq!(quantile(&[7], 0.99), 7);
    }

    #[test]
    fn the_digest_tells_logs_apart() {
        let line = |parts: &[&[u8]]| {
            let mut d = Digest::new();
            d.word(1);
            d.word(0);
            for p in parts {
                d.bytes(p);
            }
            d.end_line();
            d.hex()
        };
        assert_ne!(line(&[b"join a"]), line(&[b"join b"]));
        // Pieces cannot run into each other, and every byte of a long piece counts.
        assert_ne!(line(&[b"ab", b"c"]), line(&[b"a", b"bc"]));
        assert_ne!(line(&[b"0123456789abcdef0"]), line(&[b"0123456789abcdef1"]));
        assert_ne!(line(&[b""]), line(&[]));
        assert_ne!(Digest::new().hex(), line(&[]));
    }
}
