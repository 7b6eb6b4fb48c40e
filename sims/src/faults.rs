//! Seeded random faults added on top of a workload's own (`--faults`): node crashes
//! (each restarts after a while), partitions (each heals after a while), agent panics
//! (the worker supervisor brings the replica back) and loss.

use std::str::FromStr;

/// How often random faults strike. `Default` is none.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FaultSpec {
    /// Chance per node per simulated second that it crashes.
    pub crash_per_sec: f64,
    /// How long a crashed node stays down before it restarts.
    pub restart_ms: u64,
    /// Chance per simulated second that the cluster splits in two.
    pub partition_per_sec: f64,
    /// How long a partition lasts.
    pub partition_ms: u64,
    /// Packets lost on every link, in thousandths (added to the workload's).
    pub loss_permille: u32,
    /// Chance per agent per simulated second that one of its replicas panics (in the
    /// middle of a segment, if it runs one).
    pub panic_per_sec: f64,
}

impl FaultSpec {
    /// True if it adds no fault at all.
    pub fn is_none(&self) -> bool {
        self.crash_per_sec == 0.0
            && self.partition_per_sec == 0.0
            && self.loss_permille == 0
            && self.panic_per_sec == 0.0
    }
}

/// Why a fault spec was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad --faults {spec:?}: {why} (expected e.g. crash=0.01,partition=0.005,panic=0.01,loss=2%,restart=3000ms)")]
pub struct FaultSpecError {
    spec: String,
    why: String,
}

impl FromStr for FaultSpec {
    type Err = FaultSpecError;

    /// `crash=R`, `partition=R` and `panic=R` are chances per second (0..=1); `loss=P%` a
    /// percentage (0..=100, kept in thousandths); `restart=Nms` and `heal=Nms` how
    /// long crashes and partitions last (3000 and 2000 unless given).
    fn from_str(spec: &str) -> Result<FaultSpec, FaultSpecError> {
        let err = |why: String| FaultSpecError {
            spec: spec.to_string(),
            why,
        };
        let mut f = FaultSpec {
            restart_ms: 3_000,
            partition_ms: 2_000,
            ..FaultSpec::default()
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err(format!("{part:?} is not key=value")))?;
            let rate = |v: &str| -> Result<f64, FaultSpecError> {
                let r: f64 = v
                    .parse()
                    .map_err(|_| err(format!("{key}: {v:?} is not a number")))?;
                if !(0.0..=1.0).contains(&r) {
                    return Err(err(format!("{key}: {r} is not a chance between 0 and 1")));
                }
                Ok(r)
            };
            let millis = |v: &str| -> Result<u64, FaultSpecError> {
                v.trim_end_matches("ms")
                    .parse()
                    .map_err(|_| err(format!("{key}: {v:?} is not a number of milliseconds")))
            };
            match key {
                "crash" => f.crash_per_sec = rate(value)?,
                "partition" => f.partition_per_sec = rate(value)?,
                "panic" => f.panic_per_sec = rate(value)?,
                "restart" => f.restart_ms = millis(value)?,
                "heal" => f.partition_ms = millis(value)?,
                "loss" => {
                    let pct: f64 = value
                        .trim_end_matches('%')
                        .parse()
                        .map_err(|_| err(format!("loss: {value:?} is not a percentage")))?;
                    if !(0.0..=100.0).contains(&pct) {
                        return Err(err(format!("loss: {pct}% is not between 0 and 100")));
                    }
                    f.loss_permille = (pct * 10.0).round() as u32;
                }
                other => return Err(err(format!("unknown fault {other:?}"))),
            }
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let f: FaultSpec = "crash=0.01, partition=0.005,loss=2%,restart=500ms,panic=0.2"
            .parse()
            .unwrap();
        assert_eq!(f.panic_per_sec, 0.2);
        assert_eq!(f.crash_per_sec, 0.01);
        assert_eq!(f.partition_per_sec, 0.005);
        assert_eq!(f.loss_permille, 20);
        assert_eq!(f.restart_ms, 500);
        assert_eq!(f.partition_ms, 2_000);
        assert!("".parse::<FaultSpec>().unwrap().is_none());
        for (bad, why) in [
            ("crash=2", "not a chance"),
            ("panic=-1", "not a chance"),
            ("loss=x", "not a percentage"),
            ("quake=1", "unknown fault"),
            ("crash", "not key=value"),
        ] {
            let e = bad.parse::<FaultSpec>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
