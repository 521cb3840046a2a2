//! Rate limits on fork-server starts: a start costs an interpreter's start
//! and its preloaded imports (about 150 ms of CPU for the python server,
//! more with heavy modules) that no task is charged for, and past
//! the registry's server cap ([`super::registry`]) it stops another key's
//! server. A task
//! that changes its `definition.preload` list on every run could otherwise
//! turn each run into a server start and keep evicting everyone else's
//! servers.
//!
//! Two token buckets decide whether a start may go ahead: one for the node,
//! one per key (runtime, mounts, support files and preload list). A start
//! takes a token from both or from neither; the replacement of a worn
//! server (see [`super::Recycle`]) takes one from the node's only.
//! A request whose start is refused runs cold; nothing is evicted for it. The buckets are pure: the
//! caller passes the time, so tests drive them without sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How many fork-server starts may happen and how fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartLimit {
    /// Starts the node may make at once after a quiet spell.
    pub node_burst: u32,
    /// One more node start per this much time, sustained.
    pub node_interval: Duration,
    /// Starts one key may make at once after a quiet spell: its first
    /// start and one restart after its server was evicted, died or failed.
    pub key_burst: u32,
    /// One more start of the same key per this much time, sustained.
    pub key_interval: Duration,
}

impl StartLimit {
    /// Node starts per second by default (each ~150 ms of CPU: a sustained
    /// ~0.3 of a core at most).
    pub const DEFAULT_NODE_RATE: f64 = 2.0;

    /// The default limits with a node rate of `per_second` starts, or
    /// `None` if that is not a positive number of at most 1000.
    pub fn with_node_rate(per_second: f64) -> Option<Self> {
        if !(per_second.is_finite() && per_second > 0.0 && per_second <= 1000.0) {
            return None;
        }
        Some(Self {
            node_interval: Duration::from_secs_f64(1.0 / per_second),
            ..Self::default()
        })
    }
}

impl Default for StartLimit {
    fn default() -> Self {
        Self {
            // More than the 8 servers a node keeps, so filling every slot
            // and a few restarts after a quiet spell never wait.
            node_burst: 16,
            node_interval: Duration::from_millis(500),
            key_burst: 2,
            key_interval: Duration::from_secs(5),
        }
    }
}

/// A token bucket: holds up to `capacity` tokens and gains one every
/// `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenBucket {
    capacity: u32,
    interval: Duration,
    tokens: u32,
    /// The time the tokens were last counted up to (a partial interval
    /// after it is carried over).
    since: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub(crate) fn full(capacity: u32, interval: Duration, now: Instant) -> Self {
        Self {
            capacity,
            interval,
            tokens: capacity,
            since: now,
        }
    }

    /// Adds the tokens earned up to `now`.
    fn refill(&mut self, now: Instant) {
        if self.tokens >= self.capacity {
            self.since = now.max(self.since);
            return;
        }
        let elapsed = now.saturating_duration_since(self.since);
        let interval = self.interval.max(Duration::from_nanos(1));
        let earned = elapsed.as_nanos() / interval.as_nanos();
        if earned == 0 {
            return;
        }
        let room = u128::from(self.capacity - self.tokens);
        if earned >= room {
            self.tokens = self.capacity;
            self.since = now;
        } else {
            // `earned < room <= u32::MAX`.
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens += earned;
            self.since += interval * earned;
        }
    }

    /// Whether a token is there at `now` (without taking it).
    pub(crate) fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0
    }

    /// Takes a token if there is one at `now`.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let ready = self.ready(now);
        if ready {
            self.tokens -= 1;
        }
        ready
    }

    /// Whether the bucket is full at `now` (then it is no different from a
    /// new one).
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

/// The node's bucket and one per key that started lately.
#[derive(Debug)]
pub(crate) struct StartLimiter {
    limit: StartLimit,
    node: TokenBucket,
    /// Keys whose bucket is not full; a key not here has a full one.
    keys: HashMap<u64, TokenBucket>,
}

impl StartLimiter {
    pub(crate) fn new(limit: StartLimit, now: Instant) -> Self {
        Self {
            limit,
            node: TokenBucket::full(limit.node_burst, limit.node_interval, now),
            keys: HashMap::new(),
        }
    }

    /// Takes a start of `key` at `now` from both buckets, or from neither
    /// and says no.
    pub(crate) fn try_start(&mut self, key: u64, now: Instant) -> bool {
        // Full buckets go: the map holds only keys that started within
        // `key_burst * key_interval`, so it stays small whatever the keys.
        self.keys.retain(|_, b| !b.is_full(now));
        let limit = self.limit;
        let bucket = self
            .keys
            .entry(key)
            .or_insert_with(|| TokenBucket::full(limit.key_burst, limit.key_interval, now));
        if !bucket.ready(now) || !self.node.ready(now) {
            return false;
        }
        bucket.take(now) && self.node.take(now)
    }

    /// Takes a start of a worn server's replacement at `now` from the
    /// node's bucket only, or says no: replacements of one key are already
    /// spaced by its recycling policy, and a refused one leaves the worn
    /// server serving.
    pub(crate) fn try_replace(&mut self, now: Instant) -> bool {
        self.node.take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn a_bucket_gives_its_burst_then_one_token_per_interval() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3, Duration::from_millis(100), t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(!b.take(at(t0, 99)));
        assert!(b.take(at(t0, 100)));
        assert!(!b.take(at(t0, 150)));
        // The half interval after the last token is carried over.
        assert!(b.take(at(t0, 200)));
        assert!(!b.take(at(t0, 299)));
    }

    #[test]
    fn a_bucket_never_holds_more_than_its_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(2, Duration::from_millis(100), t0);
        assert!(b.take(t0) && b.take(t0));
        let later = at(t0, 60_000);
        assert!(b.take(later) && b.take(later));
        assert!(!b.take(later));
        assert!(b.take(at(t0, 60_100)));
    }

    #[test]
    fn a_clock_going_backwards_earns_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::full(1, Duration::from_millis(100), t0);
        assert!(b.take(t0));
        assert!(!b.take(t0 - Duration::from_secs(5)));
        assert!(b.take(at(t0, 100)));
    }

    fn limit() -> StartLimit {
        StartLimit {
            node_burst: 4,
            node_interval: Duration::from_millis(500),
            key_burst: 2,
            key_interval: Duration::from_secs(5),
        }
    }

    #[test]
    fn distinct_keys_start_up_to_the_node_burst_then_at_the_node_rate() {
        let t0 = Instant::now();
        let mut l = StartLimiter::new(limit(), t0);
        let started: Vec<bool> = (0..6).map(|k| l.try_start(k, t0)).collect();
        assert_eq!(started, [true, true, true, true, false, false]);
        assert!(!l.try_start(6, at(t0, 499)));
        assert!(l.try_start(6, at(t0, 500)));
        assert!(!l.try_start(7, at(t0, 500)));
        assert!(l.try_start(7, at(t0, 1000)));
    }

    #[test]
    fn one_key_restarts_once_at_once_then_every_key_interval() {
        let t0 = Instant::now();
        let mut l = StartLimiter::new(limit(), t0);
        assert!(l.try_start(1, t0), "its first start");
        assert!(l.try_start(1, at(t0, 10)), "a restart after an eviction");
        assert!(!l.try_start(1, at(t0, 20)));
        assert!(!l.try_start(1, at(t0, 4_999)));
        assert!(l.try_start(1, at(t0, 5_000)));
        // Other keys are not held back by this one.
        assert!(l.try_start(2, at(t0, 5_000)));
    }

    #[test]
    fn a_start_refused_by_one_bucket_takes_nothing_from_the_other() {
        let t0 = Instant::now();
        let mut l = StartLimiter::new(limit(), t0);
        assert!(l.try_start(1, t0) && l.try_start(1, t0));
        // Key 1 is out of tokens: the node keeps its two.
        assert!(!l.try_start(1, t0));
        assert!(!l.try_start(1, t0));
        assert!(l.try_start(2, t0) && l.try_start(3, t0));
        assert!(!l.try_start(4, t0));
        // The node is out of tokens: key 5 keeps its burst.
        assert!(!l.try_start(5, t0));
        assert!(l.try_start(5, at(t0, 500)));
        assert!(l.try_start(5, at(t0, 1000)));
    }

    #[test]
    fn replacements_take_from_the_node_bucket_only() {
        let t0 = Instant::now();
        let mut l = StartLimiter::new(limit(), t0);
        assert!(l.try_start(1, t0) && l.try_start(1, t0));
        assert!(l.try_replace(t0) && l.try_replace(t0));
        assert!(!l.try_replace(t0), "the node's burst is spent");
        assert!(!l.try_start(2, t0));
        assert!(l.try_replace(at(t0, 500)));
    }

    #[test]
    fn keys_with_full_buckets_are_forgotten() {
        let t0 = Instant::now();
        let mut l = StartLimiter::new(
            StartLimit {
                node_burst: 1000,
                ..limit()
            },
            t0,
        );
        for k in 0..100 {
            assert!(l.try_start(k, t0));
        }
        assert_eq!(l.keys.len(), 100);
        assert!(l.try_start(1000, at(t0, 5_000)));
        assert_eq!(l.keys.len(), 1, "only the key that just started");
    }

    #[test]
    fn node_rates_outside_the_accepted_range_are_refused() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1000.5] {
            assert_eq!(StartLimit::with_node_rate(bad), None, "{bad}");
        }
        let l = StartLimit::with_node_rate(4.0).expect("valid");
        assert_eq!(l.node_interval, Duration::from_millis(250));
        assert_eq!(l.node_burst, StartLimit::default().node_burst);
    }
}
