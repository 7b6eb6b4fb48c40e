//! What worker nodes said when they refused this coordinator's ALLOCATEs unrun, so
//! that the next offer rounds heed it instead of sending the same refused work again.
//!
//! A worker's node checks its own policy and rate limits (docs/acp.md §9). When the
//! coordinator's node holds another policy (a node started with another `--policy`
//! file, or a `policy apply` still spreading), the worker's node refuses with a final
//! REPORT carrying `refused`. Without this memory the coordinator counted each refusal
//! as a failed attempt: a rate-limited task failed in 35 ms ("segment 5 failed 5
//! attempts"), and a denied one retried the same agent for 10 s.

use std::collections::HashMap;
use std::sync::Arc;

use agentmesh_runtime::transport::wire::payload::Refusal;

use crate::policy::Policy;

/// How long a denial is believed (it is forgotten sooner when this node's policy
/// changes, since a `policy apply` reaches every node).
pub const DENIAL_MEMORY_MS: u64 = 30_000;
/// How long an agent its node does not know, or whose replicas all rest, is left out
/// (discovery drops it, or lists it unhealthy, when its node's update arrives, usually
/// well before).
pub const GONE_MEMORY_MS: u64 = 5_000;
/// A rate refusal without `retry_after_ms` rests the agent this long.
pub const DEFAULT_RETRY_AFTER_MS: u64 = 100;
/// The longest rest a rate refusal may ask for.
pub const MAX_RETRY_AFTER_MS: u64 = 10_000;
/// After its rest, an agent refused for its rate gets one allocation at a time for this
/// long: offering it every waiting segment at once would have its node refuse all but
/// its tokens' worth, round after round (n² refusals for n segments).
pub const ONE_AT_A_TIME_MS: u64 = 2_000;
/// Entries per kind; past it expired ones are dropped, and if none has expired the
/// new one is not kept (a later refusal says it again).
pub const MAX_ENTRIES: usize = 16_384;

/// What refusals leave of an agent's room for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// Nothing now: at its rate limit, unknown to its node, or with no replica running.
    None,
    /// One allocation at a time: just back from a rate limit.
    One,
    /// What its capacity and load allow.
    Any,
}

/// Refusals heard, each until it expires.
#[derive(Debug)]
pub struct Refusals {
    /// (sender group, agent) -> until (ms): the agent's node denies that group.
    denied: HashMap<(u16, u32), u64>,
    /// agent -> rest until (ms): at its rate limit on its node (then one at a time for
    /// [`ONE_AT_A_TIME_MS`]).
    resting: HashMap<u32, u64>,
    /// agent -> until (ms): its node says it has no such agent, or none of its
    /// replicas runs.
    gone: HashMap<u32, u64>,
    /// The policy the denials were heard under.
    policy: Option<Arc<Policy>>,
}

impl Default for Refusals {
    fn default() -> Refusals {
        Refusals::new()
    }
}

impl Refusals {
    /// Nothing heard yet.
    pub fn new() -> Refusals {
        Refusals {
            denied: HashMap::new(),
            resting: HashMap::new(),
            gone: HashMap::new(),
            policy: None,
        }
    }

    /// `agent`'s node refused work for a task of `group`.
    pub fn record(
        &mut self,
        group: u16,
        agent: u32,
        refusal: Refusal,
        retry_after_ms: Option<u32>,
        now_ms: u64,
    ) {
        match refusal {
            Refusal::Policy => {
                let until = now_ms + DENIAL_MEMORY_MS;
                insert(&mut self.denied, (group, agent), until, now_ms, 0);
            }
            Refusal::Rate => {
                let rest = retry_after_ms
                    .map_or(DEFAULT_RETRY_AFTER_MS, u64::from)
                    .clamp(1, MAX_RETRY_AFTER_MS);
                let until = now_ms + rest;
                insert(&mut self.resting, agent, until, now_ms, ONE_AT_A_TIME_MS);
            }
            Refusal::NoAgent => {
                let until = now_ms + GONE_MEMORY_MS;
                insert(&mut self.gone, agent, until, now_ms, 0);
            }
        }
    }

    /// Called with the policy in force before each offer: denials heard under another
    /// policy are forgotten (the worker nodes have most likely taken the new one too).
    pub fn policy_in_force(&mut self, policy: &Arc<Policy>) {
        if !self.policy.as_ref().is_some_and(|p| Arc::ptr_eq(p, policy)) {
            self.denied.clear();
            self.policy = Some(policy.clone());
        }
    }

    /// Whether `agent`'s node denies tasks of `group`.
    pub fn denies(&self, group: u16, agent: u32, now_ms: u64) -> bool {
        self.denied
            .get(&(group, agent))
            .is_some_and(|&t| t > now_ms)
    }

    /// How much work `agent` may be given now, as far as refusals tell.
    pub fn room(&self, agent: u32, now_ms: u64) -> Room {
        if self.gone.get(&agent).is_some_and(|&t| t > now_ms) {
            return Room::None;
        }
        match self.resting.get(&agent) {
            Some(&rest) if rest > now_ms => Room::None,
            Some(&rest) if rest + ONE_AT_A_TIME_MS > now_ms => Room::One,
            _ => Room::Any,
        }
    }

    /// Entries held, of every kind.
    pub fn len(&self) -> usize {
        self.denied.len() + self.resting.len() + self.gone.len()
    }

    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps `key` until `until_ms` (the later if it is held already); an entry counts as
/// expired `linger_ms` after its time.
fn insert<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, u64>,
    key: K,
    until_ms: u64,
    now_ms: u64,
    linger_ms: u64,
) {
    if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
        map.retain(|_, t| *t + linger_ms > now_ms);
        if map.len() >= MAX_ENTRIES {
            return;
        }
    }
    let t = map.entry(key).or_insert(until_ms);
    *t = (*t).max(until_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_keeps_its_agent_out_for_its_own_time() {
        let mut r = Refusals::new();
        r.record(3, 7, Refusal::Policy, None, 1_000);
        assert!(r.denies(3, 7, 1_000));
        assert!(!r.denies(4, 7, 1_000), "a denial is for the group refused");
        assert_eq!(
            r.room(7, 1_000),
            Room::Any,
            "denied to group 3, not to others"
        );
        assert!(!r.denies(3, 7, 1_000 + DENIAL_MEMORY_MS));

        r.record(3, 8, Refusal::Rate, Some(200), 1_000);
        assert_eq!(r.room(8, 1_199), Room::None);
        assert_eq!(r.room(8, 1_200), Room::One, "then one at a time");
        assert_eq!(r.room(8, 1_200 + ONE_AT_A_TIME_MS), Room::Any);
        r.record(3, 8, Refusal::Rate, Some(u32::MAX), 5_000);
        assert_eq!(
            r.room(8, 5_000 + MAX_RETRY_AFTER_MS),
            Room::One,
            "a rest is capped"
        );
        r.record(3, 8, Refusal::Rate, None, 20_000);
        assert_eq!(r.room(8, 20_000 + DEFAULT_RETRY_AFTER_MS - 1), Room::None);

        r.record(3, 9, Refusal::NoAgent, None, 1_000);
        assert_eq!(r.room(9, 1_000 + GONE_MEMORY_MS - 1), Room::None);
        assert_eq!(r.room(9, 1_000 + GONE_MEMORY_MS), Room::Any);
    }

    #[test]
    fn a_new_policy_forgets_the_denials() {
        let mut r = Refusals::new();
        let (old, new) = (Arc::new(Policy::default()), Arc::new(Policy::default()));
        r.policy_in_force(&old);
        r.record(3, 7, Refusal::Policy, None, 0);
        r.record(3, 8, Refusal::Rate, Some(500), 0);
        r.policy_in_force(&old);
        assert!(r.denies(3, 7, 1));
        r.policy_in_force(&new);
        assert!(!r.denies(3, 7, 1));
        assert_eq!(
            r.room(8, 1),
            Room::None,
            "rate rests are not about the policy"
        );
    }

    #[test]
    fn the_memory_is_bounded() {
        let mut r = Refusals::new();
        for agent in 0..(MAX_ENTRIES as u32 + 10) {
            r.record(1, agent, Refusal::Policy, None, 0);
        }
        assert_eq!(
            r.len(),
            MAX_ENTRIES,
            "full, nothing expired: new ones are not kept"
        );
        r.record(1, u32::MAX, Refusal::Policy, None, DENIAL_MEMORY_MS);
        assert_eq!(r.len(), 1, "expired ones make room");
        assert!(r.denies(1, u32::MAX, DENIAL_MEMORY_MS));
    }
}
