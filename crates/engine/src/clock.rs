//! Time and randomness as seams: the real clock sleeps and reads the system
//! time; tests use a manual clock that records the requested delays, so
//! backoff is checked without real sleeps.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use time::OffsetDateTime;

/// A boxed future, as returned by [`Clock::sleep`].
pub type BoxFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The engine's view of time.
pub trait Clock: Send + Sync + Debug {
    /// The current wall-clock time.
    fn now(&self) -> OffsetDateTime;
    /// Waits for `d` (a backoff delay).
    fn sleep(&self, d: Duration) -> BoxFuture<'_>;
    /// A random number in [0, 1) for jitter.
    fn random_unit(&self) -> f64;
}

/// The system clock, with a small non-cryptographic generator for jitter.
#[derive(Debug)]
pub struct SystemClock {
    state: Mutex<u64>,
}

impl Default for SystemClock {
    fn default() -> Self {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a seed: the low 64 bits of the time are what varies"
        )]
        let seed =
            OffsetDateTime::now_utc().unix_timestamp_nanos() as u64 ^ u64::from(std::process::id());
        Self {
            state: Mutex::new(seed | 1),
        }
    }
}

/// splitmix64: enough to spread retries apart, not for secrets.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'_> {
        Box::pin(tokio::time::sleep(d))
    }

    fn random_unit(&self) -> f64 {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (splitmix(&mut s) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A clock for tests: `sleep` returns at once (or never, when `hold` is
/// set) and records the delay; `random_unit` returns a fixed value.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<OffsetDateTime>,
    sleeps: Mutex<Vec<Duration>>,
    random: f64,
    hold: bool,
}

impl ManualClock {
    /// A clock whose sleeps return at once, with `random` as the jitter draw.
    pub fn new(random: f64) -> Self {
        Self {
            now: Mutex::new(OffsetDateTime::UNIX_EPOCH),
            sleeps: Mutex::new(Vec::new()),
            random,
            hold: false,
        }
    }

    /// A clock whose sleeps never end (to test cancellation during backoff).
    pub fn holding() -> Self {
        Self {
            hold: true,
            ..Self::new(0.5)
        }
    }

    /// The delays requested so far.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.sleeps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'_> {
        self.sleeps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *now += d;
        if self.hold {
            Box::pin(std::future::pending())
        } else {
            Box::pin(std::future::ready(()))
        }
    }

    fn random_unit(&self) -> f64 {
        self.random
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_units_stay_in_range() {
        let c = SystemClock::default();
        for _ in 0..10_000 {
            let r = c.random_unit();
            assert!((0.0..1.0).contains(&r), "{r}");
        }
    }
}
