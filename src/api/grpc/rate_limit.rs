//! Rate limits and stream caps at the edge: a token bucket per agent for
//! transitions, one per authenticated principal for requests, and caps on
//! open WatchEvents streams per principal and in total. A refused call gets
//! RESOURCE_EXHAUSTED with a `RetryInfo` saying when to try again.
//!
//! The server's own automation (health monitor, pollers) calls the service
//! directly and is not limited. The sizes of single fields are the
//! domain's (`domain::limits`), not this module's.
//!
//! Depends on the domain's [`Caller`] and the crate's [`Error`] only: the
//! layer and the handlers turn a refusal into a `Status` (`status.rs`).

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::warn;

use crate::{
    Error,
    domain::{AgentId, Caller},
};

/// Buckets kept before idle (full) ones are dropped.
const MAX_BUCKETS: usize = 100_000;

/// The limits (`[limits]` in the configuration file). A rate of 0 turns
/// its limit off.
#[derive(Clone, Debug, PartialEq)]
pub struct LimitSettings {
    /// Transitions per second per agent (sustained).
    pub agent_transitions_per_second: f64,
    /// Transitions an agent may make at once.
    pub agent_transition_burst: f64,
    /// Requests per second per authenticated principal.
    pub principal_requests_per_second: f64,
    /// Requests a principal may make at once.
    pub principal_request_burst: f64,
    /// Open WatchEvents streams per authenticated principal.
    pub max_watches_per_principal: usize,
    /// Open WatchEvents streams in total.
    pub max_watches: usize,
}

impl Default for LimitSettings {
    /// Generous: no well-behaved agent or client comes near them.
    fn default() -> Self {
        LimitSettings {
            agent_transitions_per_second: 1000.0,
            agent_transition_burst: 1000.0,
            principal_requests_per_second: 10_000.0,
            principal_request_burst: 20_000.0,
            max_watches_per_principal: 1_000,
            max_watches: 10_000,
        }
    }
}

impl LimitSettings {
    /// No limits at all (the library's default: an embedding program sets
    /// its own).
    pub fn unlimited() -> Self {
        LimitSettings {
            agent_transitions_per_second: 0.0,
            agent_transition_burst: 0.0,
            principal_requests_per_second: 0.0,
            principal_request_burst: 0.0,
            max_watches_per_principal: usize::MAX,
            max_watches: usize::MAX,
        }
    }
}

/// A token bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key.
#[derive(Debug)]
struct Buckets<K> {
    rate: f64,
    burst: f64,
    /// Hashed with foldhash (seeded per process): one lookup per call.
    buckets: Mutex<foldhash::HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(rate: f64, burst: f64) -> Self {
        Buckets {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::default(),
        }
    }

    /// Takes a token for `key`; when there is none, how long until there is.
    fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
    }
}

/// Open WatchEvents streams.
#[derive(Debug, Default)]
struct Watches {
    total: usize,
    by_principal: HashMap<Arc<str>, usize>,
}

/// The limits in force, shared by the layer and the handler.
#[derive(Debug)]
pub struct Limits {
    settings: LimitSettings,
    agents: Buckets<AgentId>,
    principals: Buckets<Arc<str>>,
    watches: Arc<Mutex<Watches>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(LimitSettings::unlimited())
    }
}

/// The error refusing a call over a limit (RESOURCE_EXHAUSTED, with
/// `RetryInfo` when `retry` is known; see `status.rs`).
fn exhausted(reason: &'static str, message: String, retry: Option<Duration>) -> Error {
    Error::ResourceExhausted {
        reason,
        message,
        retry_after: retry,
    }
}

impl Limits {
    /// Limits with `settings`.
    pub fn new(settings: LimitSettings) -> Self {
        Limits {
            agents: Buckets::new(
                settings.agent_transitions_per_second,
                settings.agent_transition_burst,
            ),
            principals: Buckets::new(
                settings.principal_requests_per_second,
                settings.principal_request_burst,
            ),
            watches: Arc::default(),
            settings,
        }
    }

    /// One request of `caller` (authenticated principals only).
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED (`RATE_LIMITED`) with the delay.
    pub fn admit_request(&self, caller: &Caller) -> Result<(), Error> {
        let Some(principal) = &caller.principal else {
            return Ok(());
        };
        self.principals
            .take(principal, Instant::now())
            .map_err(|delay| {
                warn!(principal = %caller, retry_ms = delay.as_millis() as u64, "refused: rate limited");
                exhausted(
                    "RATE_LIMITED",
                    format!(
                        "{caller} is over {} requests per second; retry in {} ms",
                        self.settings.principal_requests_per_second,
                        delay.as_millis().max(1)
                    ),
                    Some(delay),
                )
            })
    }

    /// One change of agent `id` by `caller`.
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED (`AGENT_RATE_LIMITED`) with the delay.
    pub fn admit_transition(&self, caller: &Caller, id: AgentId) -> Result<(), Error> {
        self.agents.take(&id, Instant::now()).map_err(|delay| {
            warn!(principal = %caller, agent_id = %id, retry_ms = delay.as_millis() as u64, "refused: agent transition rate limited");
            exhausted(
                "AGENT_RATE_LIMITED",
                format!(
                    "agent {id} is over {} transitions per second; retry in {} ms",
                    self.settings.agent_transitions_per_second,
                    delay.as_millis().max(1)
                ),
                Some(delay),
            )
        })
    }

    /// Opens a WatchEvents stream for `caller`; the stream holds the
    /// returned permit until it ends.
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED (`TOO_MANY_WATCHES`).
    pub fn open_watch(&self, caller: &Caller) -> Result<WatchPermit, Error> {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        if watches.total >= self.settings.max_watches {
            warn!(principal = %caller, open = watches.total, "refused: too many watch streams");
            return Err(exhausted(
                "TOO_MANY_WATCHES",
                format!(
                    "the server has {} WatchEvents streams open, its limit",
                    watches.total
                ),
                None,
            ));
        }
        if let Some(principal) = &caller.principal {
            let open = watches.by_principal.get(principal).copied().unwrap_or(0);
            if open >= self.settings.max_watches_per_principal {
                warn!(principal = %caller, open, "refused: too many watch streams");
                return Err(exhausted(
                    "TOO_MANY_WATCHES",
                    format!("{caller} has {open} WatchEvents streams open, its limit"),
                    None,
                ));
            }
            *watches
                .by_principal
                .entry(Arc::clone(principal))
                .or_default() += 1;
        }
        watches.total += 1;
        Ok(WatchPermit {
            watches: Arc::clone(&self.watches),
            principal: caller.principal.clone(),
        })
    }
}

/// One open WatchEvents stream, counted until dropped.
#[derive(Debug)]
pub struct WatchPermit {
    watches: Arc<Mutex<Watches>>,
    principal: Option<Arc<str>>,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        watches.total = watches.total.saturating_sub(1);
        if let Some(principal) = &self.principal
            && let Some(open) = watches.by_principal.get_mut(principal)
        {
            *open = open.saturating_sub(1);
            if *open == 0 {
                watches.by_principal.remove(principal);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_their_rate() {
        let buckets = Buckets::new(10.0, 2.0);
        let start = Instant::now();
        assert!(buckets.take(&1, start).is_ok());
        assert!(buckets.take(&1, start).is_ok());
        let wait = buckets.take(&1, start).expect_err("empty");
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        assert!(buckets.take(&2, start).is_ok(), "per key");
        assert!(buckets.take(&1, start + Duration::from_millis(100)).is_ok());
        let off = Buckets::new(0.0, 0.0);
        for _ in 0..1000 {
            assert!(off.take(&1, start).is_ok());
        }
    }

    #[test]
    fn watch_permits_count_until_dropped() {
        let limits = Limits::new(LimitSettings {
            max_watches_per_principal: 1,
            max_watches: 2,
            ..LimitSettings::default()
        });
        let alice = Caller::principal("alice");
        let first = limits.open_watch(&alice).expect("first");
        let refused = limits.open_watch(&alice).expect_err("per principal");
        assert!(matches!(
            refused,
            Error::ResourceExhausted {
                reason: "TOO_MANY_WATCHES",
                ..
            }
        ));
        let anonymous = limits.open_watch(&Caller::anonymous()).expect("total 2");
        assert!(
            limits.open_watch(&Caller::principal("bob")).is_err(),
            "total"
        );
        drop(first);
        drop(anonymous);
        limits.open_watch(&alice).expect("released");
    }
}
