//! Access policy per coordination group, with no I/O: which groups may send work to
//! which, how many allocations per second each agent of a group takes, and the queue
//! priority a group's tasks get when they name none. Read from TOML; a newer policy
//! replaces the older one everywhere without a restart.
//!
//! ```toml
//! # Groups not listed may send to any group.
//! [[group]]
//! id = 1
//! name = "frontline"
//! may_send_to = [1, 2]   # its own group is always allowed
//! priority = 200         # default priority of its tasks (0..=255)
//! rate_per_agent = 50    # allocations per second each of its agents accepts
//! ```

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// One group's rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupPolicy {
    /// The coordination group.
    pub id: u16,
    /// A name for people.
    #[serde(default)]
    pub name: Option<String>,
    /// Groups this group may allocate work to (its own is always allowed); absent: all.
    #[serde(default)]
    pub may_send_to: Option<Vec<u16>>,
    /// Priority of its tasks when a submission names none.
    #[serde(default)]
    pub priority: Option<u8>,
    /// Allocations per second each of its agents accepts (burst: one second's worth).
    #[serde(default)]
    pub rate_per_agent: Option<u32>,
}

/// The whole policy, as written in the TOML file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Rules per group.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupPolicy>,
}

/// Why a policy file was refused (the policy in force stays).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not valid TOML or not the expected shape.
    #[error("policy is not valid: {0}")]
    Parse(String),
    /// A group is listed twice.
    #[error("group {0} is listed twice")]
    DuplicateGroup(u16),
    /// A rate of zero would refuse all work; leave it out to mean unlimited.
    #[error("group {0}: rate_per_agent must be at least 1 (leave it out for no limit)")]
    ZeroRate(u16),
}

/// Priority of a task whose submission and group name none.
pub const DEFAULT_PRIORITY: u8 = 128;

impl Policy {
    /// Parses and checks a policy file's text.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = toml::from_str(text)
            .map_err(|e| PolicyError::Parse(e.to_string().lines().collect::<Vec<_>>().join(" ")))?;
        let mut seen = std::collections::BTreeSet::new();
        for g in &policy.groups {
            if !seen.insert(g.id) {
                return Err(PolicyError::DuplicateGroup(g.id));
            }
            if g.rate_per_agent == Some(0) {
                return Err(PolicyError::ZeroRate(g.id));
            }
        }
        Ok(policy)
    }

    fn group(&self, id: u16) -> Option<&GroupPolicy> {
        self.groups.iter().find(|g| g.id == id)
    }

    /// True if a task of group `from` may run on an agent of group `to`.
    pub fn allows(&self, from: u16, to: u16) -> bool {
        from == to
            || self
                .group(from)
                .and_then(|g| g.may_send_to.as_ref())
                .is_none_or(|allowed| allowed.contains(&to))
    }

    /// The priority for a task of `group` that names none.
    pub fn priority(&self, group: u16) -> u8 {
        self.group(group)
            .and_then(|g| g.priority)
            .unwrap_or(DEFAULT_PRIORITY)
    }

    /// Allocations per second an agent of `group` accepts, if limited.
    pub fn rate_per_agent(&self, group: u16) -> Option<u32> {
        self.group(group).and_then(|g| g.rate_per_agent)
    }
}

/// A policy as it spreads: the newest version wins everywhere (ties: the origin whose
/// name sorts last), so every node ends up with the same one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionedPolicy {
    /// When it was applied (Unix ms at the node that took it).
    pub version: u64,
    /// The node it was applied at.
    pub origin: String,
    /// The file's text, parsed again by each node.
    pub text: String,
}

impl VersionedPolicy {
    /// True if `self` replaces `other`.
    pub fn newer_than(&self, other: &VersionedPolicy) -> bool {
        (self.version, &self.origin) > (other.version, &other.origin)
    }
}

/// Token buckets, one per agent: allocations an agent accepts per second.
#[derive(Debug, Default)]
pub struct RateLimiter {
    /// agent -> (tokens in thousandths, last refill ms).
    buckets: HashMap<u32, (u64, u64)>,
}

impl RateLimiter {
    /// Takes one token from `agent`'s bucket (refilled at `rate` per second, holding at
    /// most `rate`); false if it is empty.
    pub fn allow(&mut self, agent: u32, rate: u32, now_ms: u64) -> bool {
        let cap = u64::from(rate) * 1000;
        let (tokens, last) = self.buckets.entry(agent).or_insert((cap, now_ms));
        let refill = now_ms.saturating_sub(*last) * u64::from(rate);
        *tokens = (*tokens + refill).min(cap);
        *last = now_ms;
        if *tokens >= 1000 {
            *tokens -= 1000;
            true
        } else {
            false
        }
    }

    /// Whole tokens in `agent`'s bucket now (none is taken).
    pub fn tokens(&self, agent: u32, rate: u32, now_ms: u64) -> u32 {
        let cap = u64::from(rate) * 1000;
        let (tokens, last) = self.buckets.get(&agent).copied().unwrap_or((cap, now_ms));
        let refill = now_ms.saturating_sub(last) * u64::from(rate);
        ((tokens + refill).min(cap) / 1000) as u32
    }

    /// Milliseconds until `agent`'s bucket holds a whole token (0 if it does now).
    pub fn next_token_ms(&self, agent: u32, rate: u32, now_ms: u64) -> u64 {
        let cap = u64::from(rate) * 1000;
        let (tokens, last) = self.buckets.get(&agent).copied().unwrap_or((cap, now_ms));
        let have = (tokens + now_ms.saturating_sub(last) * u64::from(rate)).min(cap);
        // Refilled at `rate` thousandths per millisecond.
        (1000u64.saturating_sub(have)).div_ceil(u64::from(rate.max(1)))
    }

    /// Forgets `agent`.
    pub fn forget(&mut self, agent: u32) {
        self.buckets.remove(&agent);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const FILE: &str = r#"
[[group]]
id = 1
name = "frontline"
may_send_to = [2]
priority = 200
rate_per_agent = 2

[[group]]
id = 3
"#;

    #[test]
    fn parses_and_answers() {
        let p = Policy::from_toml(FILE).unwrap();
        assert!(p.allows(1, 1), "own group always");
        assert!(p.allows(1, 2));
        assert!(!p.allows(1, 3));
        assert!(p.allows(3, 1), "no may_send_to: anywhere");
        assert!(p.allows(9, 1), "unlisted group: anywhere");
        assert_eq!(p.priority(1), 200);
        assert_eq!(p.priority(3), DEFAULT_PRIORITY);
        assert_eq!(p.rate_per_agent(1), Some(2));
        assert_eq!(p.rate_per_agent(3), None);
    }

    #[test]
    fn refuses_bad_files() {
        assert!(matches!(
            Policy::from_toml("[[group]]\nid = 1\nbogus = 2"),
            Err(PolicyError::Parse(_))
        ));
        assert!(matches!(
            Policy::from_toml("[[group]]\nid = 70000"),
            Err(PolicyError::Parse(_))
        ));
        assert_eq!(
            Policy::from_toml("[[group]]\nid = 1\n[[group]]\nid = 1"),
            Err(PolicyError::DuplicateGroup(1))
        );
        assert_eq!(
            Policy::from_toml("[[group]]\nid = 4\nrate_per_agent = 0"),
            Err(PolicyError::ZeroRate(4))
        );
        assert_eq!(Policy::from_toml("").unwrap(), Policy::default());
    }

    #[test]
    fn newest_policy_wins_with_a_total_order() {
        let a = VersionedPolicy {
            version: 5,
            origin: "a".into(),
            text: String::new(),
        };
        let b = VersionedPolicy {
            origin: "b".into(),
            ..a.clone()
        };
        let c = VersionedPolicy {
            version: 6,
            ..a.clone()
        };
        assert!(b.newer_than(&a) && !a.newer_than(&b));
        assert!(c.newer_than(&b) && !a.newer_than(&a));
    }

    #[test]
    fn rate_limiter_refills_over_time() {
        let mut r = RateLimiter::default();
        assert!(r.allow(7, 2, 0));
        assert!(r.allow(7, 2, 0));
        assert!(!r.allow(7, 2, 0), "burst of one second's worth");
        assert!(!r.allow(7, 2, 400));
        assert_eq!(r.next_token_ms(7, 2, 400), 100, "what a refusal tells");
        assert_eq!(r.next_token_ms(7, 2, 450), 50);
        assert_eq!(r.next_token_ms(7, 2, 500), 0);
        assert!(
            r.allow(7, 2, 500),
            "one token back after half a second at 2/s"
        );
        assert!(r.allow(8, 2, 500), "buckets are per agent");
        assert_eq!(r.tokens(7, 2, 500), 0);
        assert_eq!(r.tokens(7, 2, 1000), 1, "counting takes nothing");
        assert_eq!(r.tokens(7, 2, 1000), 1);
        assert_eq!(r.tokens(7, 2, 5000), 2, "at most one second's worth");
        assert_eq!(r.tokens(9, 3, 0), 3, "a new bucket starts full");
        assert_eq!(r.next_token_ms(9, 3, 0), 0);
        assert!(r.allow(10, 3, 0) && r.allow(10, 3, 0) && r.allow(10, 3, 0));
        assert_eq!(r.next_token_ms(10, 3, 0), 334, "rounded up: 1000 / 3");
    }
}
