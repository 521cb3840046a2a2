//! Adaptive concurrency: how many tasks this node runs at once, below what
//! admission allows, adjusted to how well the host copes.
//!
//! Admission (`--workers`, CPU and memory capacity) is a static bound on
//! declared requests. A host reaches its real limit earlier or later than
//! that: starting a sandbox takes cgroup, mount and namespace work from the
//! kernel, and a burst of thousands of tasks that each fit the capacity can
//! still leave every start waiting on every other one, or fill memory that
//! the declared limits said was free. The [`Limiter`] watches two signals
//! and keeps a limit between [`LimiterConfig::min`] and
//! [`LimiterConfig::max`] (the admission bound):
//!
//! - **Sandbox start latency**: the time from the start of a sandbox run to
//!   the exec of the task's code. Samples are averaged over a *window* (at
//!   least [`LimiterConfig::window_samples`] samples and
//!   [`LimiterConfig::window_min`] long). Each window's average is the
//!   short-term latency; an exponential moving average of the windows (over
//!   about [`LimiterConfig::baseline_windows`]) is the long-term baseline.
//!   As in Netflix's `Gradient2Limit`, the gradient
//!   `clamp(tolerance × baseline / short, 0.5, 1)` says how much slower
//!   starts have become than usual: 1 when they are within the tolerance,
//!   down to 0.5. Below 1 the limit is cut multiplicatively,
//!   `limit × (1 − smoothing × (1 − gradient))` (at most a quarter per
//!   window with the default smoothing); at 1 it grows additively by
//!   [`LimiterConfig::increase`] per window, unless the node did not use
//!   half of its limit in that window (then the latency says nothing about
//!   a higher limit, and the limit stays). When the baseline is more than
//!   twice the short-term latency (starts got fast again after a spike) it
//!   is lowered by 5 % per window on top of the average, so the limiter
//!   does not compare new starts to a stale slow baseline for long.
//! - **Memory pressure**: readings of the host ([`MemoryReading`], taken by
//!   the service every second). When the PSI memory stall (`some avg10`)
//!   reaches [`LimiterConfig::memory_stall_percent`], or the available
//!   memory falls under [`LimiterConfig::memory_available_min`], the limit
//!   is multiplied by [`LimiterConfig::memory_backoff`], at most once per
//!   [`LimiterConfig::memory_cooldown`] (PSI's `avg10` is a 10 s average:
//!   without a cool-down one episode would cut the limit again and again),
//!   and it does not grow until a reading shows the pressure gone.
//!
//! A lower limit never stops running tasks: the node only starts no new
//! ones until fewer than the limit run.
//!
//! The limiter is pure: no I/O, no clock. Time comes in as an [`Instant`]
//! with every call, so tests drive it with made-up times and latencies.

use std::time::{Duration, Instant};

use crate::pressure::MemoryReading;

/// The settings of adaptive concurrency in the service; the rest of
/// [`LimiterConfig`] keeps its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyConfig {
    /// Lowest limit (at least 1).
    pub min: usize,
    /// Highest limit; `None`: the node's worker count.
    pub max: Option<usize>,
    /// Read the host's memory pressure (`/proc/pressure/memory`,
    /// `/proc/meminfo`); off, only the start latency counts.
    pub memory_signal: bool,
    /// Samples a window needs ([`LimiterConfig::window_samples`]).
    pub window_samples: usize,
    /// Shortest window ([`LimiterConfig::window_min`]).
    pub window_min: Duration,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        Self {
            min: 1,
            max: None,
            memory_signal: true,
            window_samples: 8,
            window_min: Duration::from_millis(500),
        }
    }
}

impl ConcurrencyConfig {
    /// The limiter of a node with `workers` slots and `cores` cores of CPU
    /// capacity (None for a node that runs no tasks). The maximum is
    /// `max` or `workers`, never more than `workers`; the limit starts at
    /// one per core, within the bounds, so a burst on a node with more
    /// workers than cores ramps up rather than starting every worker at once.
    pub fn limiter(&self, workers: usize, cores: usize) -> Option<Limiter> {
        if workers == 0 {
            return None;
        }
        let max = self.max.unwrap_or(workers).min(workers);
        let min = self.min.clamp(1, max.max(1));
        Some(Limiter::new(LimiterConfig {
            window_samples: self.window_samples,
            window_min: self.window_min,
            ..LimiterConfig::new(min, max, cores)
        }))
    }
}

/// Settings of a [`Limiter`]. [`LimiterConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterConfig {
    /// Lowest limit, at least 1.
    pub min: usize,
    /// Highest limit: what admission allows.
    pub max: usize,
    /// The limit at start (clamped to `min..=max`).
    pub initial: usize,
    /// Samples a window needs before it closes (default 8).
    pub window_samples: usize,
    /// Shortest window (default 500 ms): a burst of samples within a few
    /// milliseconds is one observation, not several.
    pub window_min: Duration,
    /// How much slower than the baseline the short-term latency may be
    /// before the limit drops (default 1.5: 50 % slower).
    pub tolerance: f64,
    /// Windows the baseline averages over; its weight per window is
    /// `2 / (baseline_windows + 1)` (default 60).
    pub baseline_windows: u32,
    /// Share of the gradient's cut applied per window, in (0, 1]
    /// (default 0.5).
    pub smoothing: f64,
    /// Added to the limit per window of healthy starts (default 1).
    pub increase: f64,
    /// PSI memory `some avg10`, in percent, from which the host counts as
    /// under memory pressure (default 10).
    pub memory_stall_percent: f64,
    /// Share of memory available under which the host counts as under
    /// memory pressure (default 0.1).
    pub memory_available_min: f64,
    /// Factor applied to the limit on memory pressure (default 0.75).
    pub memory_backoff: f64,
    /// Least time between two cuts for memory pressure (default 5 s).
    pub memory_cooldown: Duration,
}

impl LimiterConfig {
    /// The defaults, for a limit from `min` to `max` starting at `initial`.
    pub fn new(min: usize, max: usize, initial: usize) -> Self {
        Self {
            min,
            max,
            initial,
            window_samples: 8,
            window_min: Duration::from_millis(500),
            tolerance: 1.5,
            baseline_windows: 60,
            smoothing: 0.5,
            increase: 1.0,
            memory_stall_percent: 10.0,
            memory_available_min: 0.1,
            memory_backoff: 0.75,
            memory_cooldown: Duration::from_secs(5),
        }
    }

    /// Whether a reading shows memory pressure.
    pub fn is_memory_pressure(&self, r: &MemoryReading) -> bool {
        r.stall_percent
            .is_some_and(|s| s >= self.memory_stall_percent)
            || r.available_ratio
                .is_some_and(|a| a < self.memory_available_min)
    }
}

/// Start latencies collected since the last window closed.
#[derive(Debug, Clone, Default)]
struct Window {
    started: Option<Instant>,
    samples: usize,
    total_secs: f64,
    max_in_flight: usize,
}

/// What changed the limit last; for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No change yet.
    Initial,
    /// Starts got slower than the baseline allows.
    LatencyRise,
    /// Starts were within the tolerance and the node used its limit.
    Healthy,
    /// Starts were within the tolerance but the node used less than half
    /// of its limit: no change.
    Underused,
    /// Memory pressure.
    MemoryPressure,
    /// Starts were within the tolerance, but the last memory reading showed
    /// pressure: no growth.
    HeldByMemory,
}

/// The concurrency limiter. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Limiter {
    config: LimiterConfig,
    /// The limit, kept fractional so that small cuts add up.
    limit: f64,
    window: Window,
    /// Long-term start latency, in seconds.
    baseline: Option<f64>,
    memory_pressure: bool,
    last_memory_cut: Option<Instant>,
    last_reason: Reason,
}

impl Limiter {
    /// A limiter at `config.initial`. Bounds are made sane: `min` at least
    /// 1, `max` at least `min`.
    pub fn new(mut config: LimiterConfig) -> Self {
        config.min = config.min.max(1);
        config.max = config.max.max(config.min);
        config.smoothing = config.smoothing.clamp(f64::MIN_POSITIVE, 1.0);
        config.window_samples = config.window_samples.max(1);
        let limit = config.initial.clamp(config.min, config.max) as f64;
        Self {
            config,
            limit,
            window: Window::default(),
            baseline: None,
            memory_pressure: false,
            last_memory_cut: None,
            last_reason: Reason::Initial,
        }
    }

    /// The settings, as sanitised by [`Limiter::new`].
    pub fn config(&self) -> &LimiterConfig {
        &self.config
    }

    /// The current limit: how many tasks may be in flight at once.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "the cast saturates (NaN to 0) and the result is clamped"
    )]
    pub fn limit(&self) -> usize {
        (self.limit.floor() as usize).clamp(self.config.min, self.config.max)
    }

    /// The long-term start latency, once a window has closed.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline.map(Duration::from_secs_f64)
    }

    /// Whether the last memory reading showed pressure.
    pub fn memory_pressure(&self) -> bool {
        self.memory_pressure
    }

    /// What decided the limit last.
    pub fn last_reason(&self) -> Reason {
        self.last_reason
    }

    /// Records one sandbox start that took `latency`, seen at `now` with
    /// `in_flight` tasks running on the node. Closes the window when it is
    /// full and returns the limit.
    pub fn on_start(&mut self, now: Instant, latency: Duration, in_flight: usize) -> usize {
        let w = &mut self.window;
        let started = *w.started.get_or_insert(now);
        w.samples += 1;
        w.total_secs += latency.as_secs_f64();
        w.max_in_flight = w.max_in_flight.max(in_flight);
        if w.samples >= self.config.window_samples
            && now.saturating_duration_since(started) >= self.config.window_min
        {
            let w = std::mem::take(&mut self.window);
            self.close_window(w.total_secs / w.samples as f64, w.max_in_flight);
        }
        self.limit()
    }

    /// Records a memory reading taken at `now`; returns the limit.
    pub fn on_memory(&mut self, now: Instant, reading: &MemoryReading) -> usize {
        self.memory_pressure = self.config.is_memory_pressure(reading);
        let cooled = self
            .last_memory_cut
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.memory_cooldown);
        if self.memory_pressure && cooled {
            self.last_memory_cut = Some(now);
            self.set(self.limit * self.config.memory_backoff);
            self.last_reason = Reason::MemoryPressure;
        }
        self.limit()
    }

    /// One window's verdict: `short` is its mean start latency in seconds.
    fn close_window(&mut self, short: f64, max_in_flight: usize) {
        let c = &self.config;
        let weight = 2.0 / (f64::from(c.baseline_windows) + 1.0);
        let mut baseline = match self.baseline {
            None => short,
            Some(b) => b + (short - b) * weight,
        };
        if baseline > 2.0 * short {
            baseline *= 0.95;
        }
        self.baseline = Some(baseline);
        let gradient = if short > 0.0 {
            (c.tolerance * baseline / short).clamp(0.5, 1.0)
        } else {
            1.0
        };
        if gradient < 1.0 {
            self.set(self.limit * (1.0 - c.smoothing * (1.0 - gradient)));
            self.last_reason = Reason::LatencyRise;
        } else if self.memory_pressure {
            self.last_reason = Reason::HeldByMemory;
        } else if max_in_flight * 2 < self.limit() {
            self.last_reason = Reason::Underused;
        } else {
            self.set(self.limit + c.increase);
            self.last_reason = Reason::Healthy;
        }
    }

    fn set(&mut self, limit: f64) {
        self.limit = limit.clamp(self.config.min as f64, self.config.max as f64);
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

    const MS: Duration = Duration::from_millis(1);

    /// A limiter and a clock of its own.
    struct Sim {
        l: Limiter,
        now: Instant,
    }

    impl Sim {
        fn new(min: usize, max: usize, initial: usize) -> Self {
            Self {
                l: Limiter::new(LimiterConfig::new(min, max, initial)),
                now: Instant::now(),
            }
        }

        /// `windows` full windows of starts taking `latency` each, with the
        /// node running as many tasks as its limit allows (`busy`) or one.
        fn run(&mut self, windows: usize, latency: Duration, busy: bool) -> usize {
            // Samples spaced so that each window closes on its last one.
            let n = self.l.config().window_samples;
            let step =
                self.l.config().window_min / (n.max(2) - 1) as u32 + Duration::from_micros(1);
            for _ in 0..windows {
                for _ in 0..n {
                    self.now += step;
                    let in_flight = if busy { self.l.limit() } else { 1 };
                    self.l.on_start(self.now, latency, in_flight);
                }
            }
            self.l.limit()
        }

        fn memory(&mut self, after: Duration, reading: MemoryReading) -> usize {
            self.now += after;
            self.l.on_memory(self.now, &reading)
        }
    }

    fn stall(percent: f64) -> MemoryReading {
        MemoryReading {
            stall_percent: Some(percent),
            available_ratio: Some(0.8),
        }
    }

    #[test]
    fn steady_latency_grows_the_limit_to_max_and_no_further() {
        let mut s = Sim::new(1, 32, 4);
        assert_eq!(s.l.limit(), 4);
        assert_eq!(s.run(1, 10 * MS, true), 5);
        assert_eq!(s.l.last_reason(), Reason::Healthy);
        assert_eq!(s.run(27, 10 * MS, true), 32);
        assert_eq!(s.run(50, 10 * MS, true), 32, "never above max");
        let b = s.l.baseline().expect("baseline");
        assert!(b.abs_diff(10 * MS) < Duration::from_micros(1), "{b:?}");
    }

    #[test]
    fn a_window_needs_its_samples_and_its_duration() {
        let mut s = Sim::new(1, 32, 4);
        let t0 = s.now;
        // Many samples at the same instant: the window is not long enough.
        for _ in 0..100 {
            s.l.on_start(t0, 10 * MS, 4);
        }
        assert_eq!(s.l.limit(), 4);
        assert_eq!(s.l.baseline(), None);
        // Long enough, and the window closes on the next sample.
        s.l.on_start(t0 + Duration::from_secs(1), 10 * MS, 4);
        assert_eq!(s.l.limit(), 5);
        // A long time with fewer samples than a window needs: no change.
        for i in 1..8 {
            s.l.on_start(t0 + Duration::from_secs(10 * i), 10 * MS, 5);
        }
        assert_eq!(s.l.limit(), 5);
    }

    #[test]
    fn a_latency_rise_lowers_the_limit_and_recovery_raises_it_again() {
        let mut s = Sim::new(1, 32, 32);
        s.run(20, 10 * MS, true);
        assert_eq!(s.l.limit(), 32);
        // Starts become five times slower: the limit is cut window after
        // window, a quarter at most each time.
        let mut last = s.l.limit();
        for _ in 0..5 {
            let now = s.run(1, 50 * MS, true);
            assert!(now < last, "{now} < {last}");
            assert!(
                now as f64 >= (last as f64 * 0.75).floor(),
                "{now} vs {last}"
            );
            assert_eq!(s.l.last_reason(), Reason::LatencyRise);
            last = now;
        }
        let low = s.run(5, 50 * MS, true);
        assert!(low <= 8, "the limit fell to {low}");
        // Starts are fast again: the limit grows back, one per window.
        let mut last = low;
        for _ in 0..5 {
            let now = s.run(1, 10 * MS, true);
            assert_eq!(now, last + 1);
            assert_eq!(s.l.last_reason(), Reason::Healthy);
            last = now;
        }
        assert_eq!(s.run(40, 10 * MS, true), 32);
    }

    #[test]
    fn latency_within_the_tolerance_does_not_lower_the_limit() {
        let mut s = Sim::new(1, 64, 16);
        s.run(20, 10 * MS, true);
        let before = s.l.limit();
        assert_eq!(before, 36);
        // 40 % slower, under the 50 % tolerance.
        assert!(s.run(3, 14 * MS, true) >= before);
        assert_eq!(s.l.last_reason(), Reason::Healthy);
    }

    #[test]
    fn the_baseline_comes_down_quickly_after_a_spike() {
        let mut s = Sim::new(1, 32, 8);
        s.run(1, 100 * MS, true);
        assert_eq!(s.l.baseline(), Some(100 * MS));
        s.run(10, 10 * MS, true);
        let b = s.l.baseline().expect("baseline");
        // The moving average alone (weight 2/61 per window) would still be
        // above 72 ms; with the decay it is about 45 ms.
        assert!(b < 50 * MS, "baseline {b:?}");
    }

    #[test]
    fn an_underused_node_does_not_grow_its_limit() {
        let mut s = Sim::new(1, 32, 8);
        assert_eq!(s.run(10, 10 * MS, false), 8);
        assert_eq!(s.l.last_reason(), Reason::Underused);
    }

    #[test]
    fn memory_pressure_lowers_the_limit_with_a_cooldown_and_holds_growth() {
        let mut s = Sim::new(1, 32, 32);
        s.run(5, 10 * MS, true);
        assert_eq!(s.memory(Duration::ZERO, stall(25.0)), 24);
        assert_eq!(s.l.last_reason(), Reason::MemoryPressure);
        assert!(s.l.memory_pressure());
        // Within the cool-down: the same episode does not cut again.
        assert_eq!(s.memory(Duration::from_secs(1), stall(25.0)), 24);
        // Healthy starts do not raise the limit while memory is short.
        assert_eq!(s.run(3, 10 * MS, true), 24);
        assert_eq!(s.l.last_reason(), Reason::HeldByMemory);
        // After the cool-down, still under pressure: another cut.
        assert_eq!(s.memory(Duration::from_secs(5), stall(25.0)), 18);
        // The pressure is gone: growth resumes.
        assert_eq!(s.memory(Duration::from_secs(1), stall(0.5)), 18);
        assert!(!s.l.memory_pressure());
        assert_eq!(s.run(2, 10 * MS, true), 20);
    }

    #[test]
    fn low_available_memory_is_pressure_too() {
        let mut s = Sim::new(1, 32, 16);
        let no_psi = |available| MemoryReading {
            stall_percent: None,
            available_ratio: Some(available),
        };
        assert_eq!(s.memory(Duration::ZERO, no_psi(0.5)), 16);
        assert_eq!(s.memory(Duration::ZERO, no_psi(0.05)), 12);
        // A reading with neither part is no pressure.
        assert_eq!(
            s.memory(Duration::from_secs(10), MemoryReading::default()),
            12
        );
        assert!(!s.l.memory_pressure());
    }

    #[test]
    fn the_limit_never_goes_below_min() {
        let mut s = Sim::new(3, 32, 32);
        s.run(5, 10 * MS, true);
        for _ in 0..20 {
            s.memory(Duration::from_secs(10), stall(90.0));
        }
        assert_eq!(s.l.limit(), 3);
        s.run(20, 500 * MS, true);
        assert_eq!(s.l.limit(), 3);
    }

    #[test]
    fn bounds_are_made_sane() {
        let l = Limiter::new(LimiterConfig::new(0, 0, 0));
        assert_eq!((l.config().min, l.config().max, l.limit()), (1, 1, 1));
        let l = Limiter::new(LimiterConfig::new(4, 2, 100));
        assert_eq!((l.config().min, l.config().max, l.limit()), (4, 4, 4));
        let l = Limiter::new(LimiterConfig::new(2, 10, 100));
        assert_eq!(l.limit(), 10);
    }

    #[test]
    fn the_service_limiter_is_bounded_by_the_workers() {
        let c = ConcurrencyConfig::default();
        assert!(c.limiter(0, 4).is_none(), "a node without workers");
        let l = c.limiter(16, 4).expect("limiter");
        assert_eq!((l.config().min, l.config().max, l.limit()), (1, 16, 4));
        let c = ConcurrencyConfig {
            min: 2,
            max: Some(100),
            ..ConcurrencyConfig::default()
        };
        let l = c.limiter(8, 16).expect("limiter");
        assert_eq!((l.config().min, l.config().max, l.limit()), (2, 8, 8));
        let c = ConcurrencyConfig {
            min: 50,
            ..ConcurrencyConfig::default()
        };
        let l = c.limiter(8, 1).expect("limiter");
        assert_eq!((l.config().min, l.config().max, l.limit()), (8, 8, 8));
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the latencies, loads and memory readings, the limit
        /// stays within its bounds.
        #[test]
        fn the_limit_stays_within_its_bounds(
            min in 1usize..8,
            extra in 0usize..64,
            initial in 0usize..100,
            events in proptest::collection::vec(
                (0u64..2_000, 0u64..5_000, 0usize..100, proptest::option::of(0.0f64..100.0), proptest::option::of(0.0f64..1.0), any::<bool>()),
                0..400,
            ),
        ) {
            let max = min + extra;
            let mut l = Limiter::new(LimiterConfig::new(min, max, initial));
            let mut now = Instant::now();
            for (step_ms, latency_us, in_flight, stall, available, memory) in events {
                now += Duration::from_millis(step_ms);
                let limit = if memory {
                    l.on_memory(now, &MemoryReading { stall_percent: stall, available_ratio: available })
                } else {
                    l.on_start(now, Duration::from_micros(latency_us), in_flight)
                };
                prop_assert!((min..=max).contains(&limit), "{limit} not in {min}..={max}");
            }
        }
    }
}
