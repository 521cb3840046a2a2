//! Retry policy: the user's raw [`RetryPolicy`], its validation against the
//! operator's [`RetryLimits`] into a [`ValidRetryPolicy`], and the retry
//! math (exponential backoff with a cap and jitter, and the decision whether
//! a failure is retried, honouring the handling table of
//! [`crate::ErrorType::handling`]).
//!
//! Randomness is passed in: [`ValidRetryPolicy::delay`] takes a number in
//! `[0, 1)` drawn by the caller.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorType, FieldError};

/// How a backoff delay is randomised. Serialized `"FULL"`, `"EQUAL"`,
/// `"NONE"`; default `FULL`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Jitter {
    /// Uniform in `[0, base]`.
    #[default]
    Full,
    /// Uniform in `[base/2, base]`.
    Equal,
    /// Exactly `base`.
    None,
}

/// A retry policy as the user wrote it. Numeric fields are wide signed or
/// floating types so that bad values reach [`RetryPolicy::validate`] (which
/// names the field) instead of failing in deserialization. Fields left out
/// take their value from [`RetryPolicy::default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so `2` allows 3 attempts in total).
    pub max_retries: i64,
    /// Delay before the first retry, in milliseconds.
    pub retry_interval: i64,
    /// Factor applied to the delay after each retry (at least 1).
    pub backoff_multiplier: f64,
    /// Cap on the delay, in milliseconds; `null` means the operator's cap.
    pub max_interval: Option<i64>,
    /// Randomisation of the delay.
    pub jitter: Jitter,
    /// Error types retried besides `ENVIRONMENT_SETUP` (always retried).
    /// Types that are never retried are ignored here.
    pub retryable_errors: Vec<ErrorType>,
}

impl Default for RetryPolicy {
    /// The seed's default: 2 retries, 1000 ms interval, multiplier 2, capped
    /// at 60000 ms, full jitter, retrying `ENVIRONMENT_SETUP` and `INTERNAL`.
    fn default() -> Self {
        RetryPolicy {
            max_retries: 2,
            retry_interval: 1000,
            backoff_multiplier: 2.0,
            max_interval: Some(60_000),
            jitter: Jitter::Full,
            retryable_errors: vec![ErrorType::EnvironmentSetup, ErrorType::Internal],
        }
    }
}

/// Operator bounds on retry policies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryLimits {
    /// Largest `maxRetries` (default 100).
    pub max_retries: u32,
    /// Largest `retryInterval` and `maxInterval`, in ms (default 3600000).
    pub max_interval_ms: u64,
    /// Largest `backoffMultiplier` (default 10).
    pub max_multiplier: f64,
}

impl Default for RetryLimits {
    fn default() -> Self {
        RetryLimits {
            max_retries: 100,
            max_interval_ms: 3_600_000,
            max_multiplier: 10.0,
        }
    }
}

/// A retry policy that passed validation, in typed form.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Delay before the first retry.
    pub interval: Duration,
    /// Backoff factor (at least 1).
    pub multiplier: f64,
    /// Cap on any delay.
    pub max_interval: Duration,
    /// Randomisation of the delay.
    pub jitter: Jitter,
    /// Listed retryable error types (deduplicated, in the order given).
    pub retryable: Vec<ErrorType>,
}

impl RetryPolicy {
    /// Validates against the operator's bounds. Errors name the field
    /// (`retryPolicy.maxRetries`, `retryPolicy.retryInterval`,
    /// `retryPolicy.backoffMultiplier`, `retryPolicy.maxInterval`) and the
    /// accepted range.
    pub fn validate(&self, limits: &RetryLimits) -> Result<ValidRetryPolicy, FieldError> {
        let max_retries = u32::try_from(self.max_retries)
            .ok()
            .filter(|n| *n <= limits.max_retries)
            .ok_or_else(|| {
                FieldError::new(
                    "retryPolicy.maxRetries",
                    format!(
                        "{} is out of range; expected an integer from 0 to {}",
                        self.max_retries, limits.max_retries
                    ),
                )
            })?;

        let interval_ms = u64::try_from(self.retry_interval)
            .ok()
            .filter(|n| *n <= limits.max_interval_ms)
            .ok_or_else(|| {
                FieldError::new(
                    "retryPolicy.retryInterval",
                    format!(
                        "{} is out of range; expected a number of milliseconds from 0 to {}",
                        self.retry_interval, limits.max_interval_ms
                    ),
                )
            })?;

        let m = self.backoff_multiplier;
        if !(m.is_finite() && m >= 1.0 && m <= limits.max_multiplier) {
            return Err(FieldError::new(
                "retryPolicy.backoffMultiplier",
                format!(
                    "{m} is out of range; expected a number from 1 to {}",
                    limits.max_multiplier
                ),
            ));
        }

        let max_interval_ms = match self.max_interval {
            None => limits.max_interval_ms.max(interval_ms),
            Some(raw) => u64::try_from(raw)
                .ok()
                .filter(|n| (interval_ms..=limits.max_interval_ms).contains(n))
                .ok_or_else(|| {
                    FieldError::new(
                        "retryPolicy.maxInterval",
                        format!(
                            "{raw} is out of range; expected a number of milliseconds from `retryPolicy.retryInterval` ({interval_ms}) to {}",
                            limits.max_interval_ms
                        ),
                    )
                })?,
        };

        let mut retryable = Vec::new();
        for e in &self.retryable_errors {
            if !retryable.contains(e) {
                retryable.push(*e);
            }
        }

        Ok(ValidRetryPolicy {
            max_retries,
            interval: Duration::from_millis(interval_ms),
            multiplier: m,
            max_interval: Duration::from_millis(max_interval_ms),
            jitter: self.jitter,
            retryable,
        })
    }
}

impl ValidRetryPolicy {
    /// Total attempts allowed: `max_retries + 1`.
    pub fn max_attempts(&self) -> u32 {
        self.max_retries.saturating_add(1)
    }

    /// The delay before retry number `retry_index + 1` without jitter:
    /// `min(max_interval, interval * multiplier^retry_index)`. Index 0 is the
    /// delay before the second attempt. Never overflows or panics, for any
    /// index and any field values.
    pub fn base_delay(&self, retry_index: u32) -> Duration {
        // Guard against hand-built policies with bad multipliers.
        let m = if self.multiplier >= 1.0 {
            self.multiplier
        } else {
            1.0
        };
        if self.interval.is_zero() || self.max_interval.is_zero() {
            return Duration::ZERO;
        }
        let cap = self.max_interval.as_secs_f64();
        let secs = self.interval.as_secs_f64() * m.powf(f64::from(retry_index));
        if !secs.is_finite() || secs >= cap {
            return self.max_interval;
        }
        Duration::try_from_secs_f64(secs).map_or(self.max_interval, |d| d.min(self.max_interval))
    }

    /// The delay before retry number `retry_index + 1`, with jitter applied
    /// using `unit_random`, a number in `[0, 1)` supplied by the caller
    /// (values outside are clamped; NaN counts as 0). `FULL`: `base * r`;
    /// `EQUAL`: `base/2 + base/2 * r`; `NONE`: `base`.
    pub fn delay(&self, retry_index: u32, unit_random: f64) -> Duration {
        let base = self.base_delay(retry_index);
        let r = if unit_random.is_nan() {
            0.0
        } else {
            unit_random.clamp(0.0, 1.0)
        };
        match self.jitter {
            Jitter::None => base,
            Jitter::Full => base.mul_f64(r).min(base),
            Jitter::Equal => {
                let half = base / 2;
                (half + (base - half).mul_f64(r)).min(base)
            }
        }
    }

    /// Whether a failure of type `error` is retried after `attempts_made`
    /// attempts have run. Never-retried types (`INPUT_VALIDATION`,
    /// `COMPILATION_ERROR`, `CANCELLED`, `MAX_RETRIES_EXCEEDED`) never are;
    /// `ENVIRONMENT_SETUP` always is; the others only if listed in
    /// `retryable`. In every case `attempts_made` must not exceed
    /// `max_retries` (so `max_retries = 2` allows 3 attempts in total).
    pub fn should_retry(&self, error: ErrorType, attempts_made: u32) -> bool {
        if error.never_retried() || attempts_made > self.max_retries {
            return false;
        }
        error.always_retryable() || self.retryable.contains(&error)
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> RetryLimits {
        RetryLimits::default()
    }

    fn valid(p: RetryPolicy) -> ValidRetryPolicy {
        p.validate(&limits()).expect("valid policy")
    }

    fn field_of(p: RetryPolicy) -> FieldError {
        p.validate(&limits()).expect_err("invalid policy")
    }

    #[test]
    fn default_policy() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_retries, 2);
        assert_eq!(p.retry_interval, 1000);
        assert_eq!(p.backoff_multiplier, 2.0);
        assert_eq!(p.max_interval, Some(60_000));
        assert_eq!(p.jitter, Jitter::Full);
        assert_eq!(
            p.retryable_errors,
            vec![ErrorType::EnvironmentSetup, ErrorType::Internal]
        );
        let v = valid(p);
        assert_eq!(v.max_retries, 2);
        assert_eq!(v.max_attempts(), 3);
        assert_eq!(v.interval, Duration::from_secs(1));
        assert_eq!(v.max_interval, Duration::from_secs(60));
        let l = limits();
        assert_eq!(
            (l.max_retries, l.max_interval_ms, l.max_multiplier),
            (100, 3_600_000, 10.0)
        );
    }

    #[test]
    fn json_shape_and_partial_policies() {
        let p: RetryPolicy = serde_json::from_str(r#"{"maxRetries": 5}"#).expect("partial");
        assert_eq!(p.max_retries, 5);
        assert_eq!(p.retry_interval, 1000);
        let json = serde_json::to_value(RetryPolicy::default()).expect("ser");
        assert_eq!(
            json,
            serde_json::json!({
                "maxRetries": 2, "retryInterval": 1000, "backoffMultiplier": 2.0,
                "maxInterval": 60000, "jitter": "FULL",
                "retryableErrors": ["ENVIRONMENT_SETUP", "INTERNAL"]
            })
        );
        let none: RetryPolicy =
            serde_json::from_str(r#"{"maxInterval": null, "jitter": "NONE"}"#).expect("null");
        assert_eq!(none.max_interval, None);
        assert_eq!(none.jitter, Jitter::None);
        let back: RetryPolicy =
            serde_json::from_value(serde_json::to_value(&none).expect("ser")).expect("de");
        assert_eq!(back, none);
        let err = serde_json::from_str::<RetryPolicy>(r#"{"retries": 1}"#).expect_err("unknown");
        assert!(err.to_string().contains("retries"), "{err}");
    }

    #[test]
    fn rejects_huge_retry_counts() {
        let e = field_of(RetryPolicy {
            max_retries: 1_000_000_000,
            ..RetryPolicy::default()
        });
        assert_eq!(e.field, "retryPolicy.maxRetries");
        assert!(e.message.contains("from 0 to 100"), "{}", e.message);
        let e = field_of(RetryPolicy {
            max_retries: -1,
            ..RetryPolicy::default()
        });
        assert_eq!(e.field, "retryPolicy.maxRetries");
        assert_eq!(
            valid(RetryPolicy {
                max_retries: 100,
                ..RetryPolicy::default()
            })
            .max_retries,
            100
        );
    }

    #[test]
    fn rejects_bad_multipliers() {
        for m in [
            0.0,
            0.5,
            -2.0,
            10.5,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let e = field_of(RetryPolicy {
                backoff_multiplier: m,
                ..RetryPolicy::default()
            });
            assert_eq!(e.field, "retryPolicy.backoffMultiplier", "{m}");
            assert!(e.message.contains("from 1 to 10"), "{}", e.message);
        }
        for m in [1.0, 10.0] {
            assert_eq!(
                valid(RetryPolicy {
                    backoff_multiplier: m,
                    ..RetryPolicy::default()
                })
                .multiplier,
                m
            );
        }
    }

    #[test]
    fn rejects_bad_intervals() {
        let e = field_of(RetryPolicy {
            retry_interval: -1,
            ..RetryPolicy::default()
        });
        assert_eq!(e.field, "retryPolicy.retryInterval");
        assert!(e.message.contains("from 0 to 3600000"), "{}", e.message);

        let e = field_of(RetryPolicy {
            retry_interval: 3_600_001,
            max_interval: None,
            ..RetryPolicy::default()
        });
        assert_eq!(e.field, "retryPolicy.retryInterval");

        for bad in [-1, 3_600_001, 999] {
            let e = field_of(RetryPolicy {
                max_interval: Some(bad),
                ..RetryPolicy::default()
            });
            assert_eq!(e.field, "retryPolicy.maxInterval", "{bad}");
            assert!(e.message.contains("retryInterval"), "{}", e.message);
        }

        let v = valid(RetryPolicy {
            max_interval: None,
            ..RetryPolicy::default()
        });
        assert_eq!(v.max_interval, Duration::from_secs(3600));
        let zero = valid(RetryPolicy {
            retry_interval: 0,
            max_interval: Some(0),
            ..RetryPolicy::default()
        });
        assert_eq!(zero.base_delay(5), Duration::ZERO);
    }

    #[test]
    fn backoff_sequence() {
        let v = valid(RetryPolicy {
            max_retries: 10,
            jitter: Jitter::None,
            ..RetryPolicy::default()
        });
        let delays: Vec<u64> = (0..8).map(|i| v.delay(i, 0.3).as_millis() as u64).collect();
        assert_eq!(
            delays,
            vec![1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]
        );
        assert_eq!(v.base_delay(u32::MAX), Duration::from_secs(60));
    }

    /// A thousand tasks failing at one instant (an outage) with the default
    /// policy come back spread over the whole backoff window, not at once.
    #[test]
    fn a_thousand_retries_at_one_instant_spread_over_the_window() {
        let v = valid(RetryPolicy::default());
        let window = v.base_delay(2);
        // A seeded xorshift stands in for the service's random source.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buckets = [0u32; 10];
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let r = (x >> 11) as f64 / (1u64 << 53) as f64;
            let d = v.delay(2, r);
            assert!(d <= window, "{d:?} past {window:?}");
            let i = (d.as_secs_f64() / window.as_secs_f64() * 10.0) as usize;
            buckets[i.min(9)] += 1;
        }
        // Uniform: 100 per tenth of the window, give or take.
        assert!(
            buckets.iter().all(|n| (60..=140).contains(n)),
            "{buckets:?}"
        );
    }

    #[test]
    fn jitter_modes() {
        let mut v = valid(RetryPolicy::default());
        v.jitter = Jitter::Full;
        assert_eq!(v.delay(1, 0.0), Duration::ZERO);
        assert_eq!(v.delay(1, 0.5), Duration::from_secs(1));
        v.jitter = Jitter::Equal;
        assert_eq!(v.delay(1, 0.0), Duration::from_secs(1));
        assert_eq!(v.delay(1, 0.5), Duration::from_millis(1500));
        v.jitter = Jitter::None;
        assert_eq!(v.delay(1, 0.9), Duration::from_secs(2));
        v.jitter = Jitter::Full;
        assert_eq!(v.delay(1, f64::NAN), Duration::ZERO);
        assert_eq!(v.delay(1, 7.0), Duration::from_secs(2));
    }

    #[test]
    fn should_retry_honours_the_handling_table() {
        let v = valid(RetryPolicy {
            retryable_errors: vec![ErrorType::Timeout, ErrorType::InputValidation],
            ..RetryPolicy::default()
        });
        assert!(v.should_retry(ErrorType::Timeout, 1));
        assert!(
            v.should_retry(ErrorType::EnvironmentSetup, 1),
            "always retryable"
        );
        assert!(!v.should_retry(ErrorType::RuntimeError, 1), "not listed");
        assert!(!v.should_retry(ErrorType::Internal, 1), "not listed here");
        assert!(
            !v.should_retry(ErrorType::InputValidation, 1),
            "never, even if listed"
        );
        assert!(!v.should_retry(ErrorType::CompilationError, 1));
        assert!(!v.should_retry(ErrorType::Cancelled, 1));
        assert!(!v.should_retry(ErrorType::MaxRetriesExceeded, 1));
    }

    #[test]
    fn max_retries_two_allows_three_attempts() {
        let v = valid(RetryPolicy::default());
        assert!(v.should_retry(ErrorType::EnvironmentSetup, 1));
        assert!(v.should_retry(ErrorType::EnvironmentSetup, 2));
        assert!(!v.should_retry(ErrorType::EnvironmentSetup, 3));
        let none = valid(RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        });
        assert!(!none.should_retry(ErrorType::EnvironmentSetup, 1));
    }

    #[test]
    fn retryable_list_is_deduplicated() {
        let v = valid(RetryPolicy {
            retryable_errors: vec![ErrorType::Timeout, ErrorType::Timeout, ErrorType::Internal],
            ..RetryPolicy::default()
        });
        assert_eq!(v.retryable, vec![ErrorType::Timeout, ErrorType::Internal]);
    }

    fn any_valid_policy() -> impl Strategy<Value = ValidRetryPolicy> {
        (
            0u32..=100,
            0u64..=3_600_000,
            1.0f64..=10.0,
            0u64..=3_600_000,
            prop_oneof![Just(Jitter::Full), Just(Jitter::Equal), Just(Jitter::None)],
            proptest::collection::vec(proptest::sample::select(ErrorType::ALL.to_vec()), 0..10),
        )
            .prop_map(|(n, a, m, b, jitter, retryable)| {
                let (lo, hi) = (a.min(b), a.max(b));
                RetryPolicy {
                    max_retries: i64::from(n),
                    retry_interval: i64::try_from(lo).expect("small"),
                    backoff_multiplier: m,
                    max_interval: Some(i64::try_from(hi).expect("small")),
                    jitter,
                    retryable_errors: retryable,
                }
                .validate(&RetryLimits::default())
                .expect("generated policies are valid")
            })
    }

    proptest! {
        #[test]
        fn base_delay_is_monotonic_and_capped(p in any_valid_policy(), i in any::<u32>()) {
            let a = p.base_delay(i);
            prop_assert!(a <= p.max_interval);
            if i < u32::MAX {
                prop_assert!(a <= p.base_delay(i + 1), "{:?} > {:?}", a, p.base_delay(i + 1));
            }
        }

        #[test]
        fn base_delay_small_indexes_are_monotonic(p in any_valid_policy(), i in 0u32..64) {
            prop_assert!(p.base_delay(i) <= p.base_delay(i + 1));
            prop_assert!(p.base_delay(i) >= p.interval.min(p.max_interval));
        }

        #[test]
        fn delay_stays_within_the_jitter_band(p in any_valid_policy(), i in any::<u32>(), r in 0.0f64..1.0) {
            let base = p.base_delay(i);
            let d = p.delay(i, r);
            match p.jitter {
                Jitter::Full => prop_assert!(d <= base),
                Jitter::Equal => prop_assert!(d >= base / 2 && d <= base),
                Jitter::None => prop_assert_eq!(d, base),
            }
        }

        #[test]
        fn never_retried_types_are_never_retried(p in any_valid_policy(), n in any::<u32>()) {
            for t in ErrorType::ALL {
                if t.never_retried() {
                    prop_assert!(!p.should_retry(t, n));
                }
            }
        }

        #[test]
        fn retries_stop_after_max_retries(p in any_valid_policy(), t in proptest::sample::select(ErrorType::ALL.to_vec()), extra in 1u32..1000) {
            prop_assert!(!p.should_retry(t, p.max_retries.saturating_add(extra)));
        }

        #[test]
        fn hand_built_policies_never_panic(
            interval in any::<u64>(), max in any::<u64>(), m in any::<f64>(), i in any::<u32>(), r in any::<f64>()
        ) {
            let p = ValidRetryPolicy {
                max_retries: 1,
                interval: Duration::from_millis(interval),
                multiplier: m,
                max_interval: Duration::from_millis(max),
                jitter: Jitter::Equal,
                retryable: vec![],
            };
            prop_assert!(p.base_delay(i) <= p.max_interval);
            prop_assert!(p.delay(i, r) <= p.base_delay(i));
        }
    }
}
