//! Latency series and their summaries: nearest-rank percentiles, mean,
//! throughput over the wall time the series was measured in.

use std::collections::BTreeMap;

use serde::Serialize;

/// Percentile of a sorted series (nearest rank); NaN when empty.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "the cast saturates and the rank is clamped below"
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What a series measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    /// The same program run directly by the interpreter, no sandbox.
    Bare,
    /// The engine, every task in a sandbox built for it.
    Cold,
    /// The engine with warm launcher pools and fork servers.
    Warm,
    /// A whole `taskexec run` process (CLI start included; cold).
    Cli,
    /// A `taskexec serve` child: submit → final result stored.
    Service,
}

/// The raw samples of one series.
#[derive(Debug)]
pub struct Samples {
    /// Display name.
    pub name: String,
    /// What it measures.
    pub kind: Kind,
    /// Per-task latency, ms.
    pub ms: Vec<f64>,
    /// Wall time spent measuring, seconds (for throughput).
    pub wall_s: f64,
    /// Sandbox phase timings per task, ms.
    pub phases: BTreeMap<String, Vec<f64>>,
}

impl Samples {
    /// An empty series.
    pub fn new(name: impl Into<String>, kind: Kind) -> Self {
        Self {
            name: name.into(),
            kind,
            ms: Vec::new(),
            wall_s: 0.0,
            phases: BTreeMap::new(),
        }
    }

    /// The summary, with the p50 ratio against `baseline_p50`.
    pub fn summary(&self, baseline_p50: Option<f64>) -> Summary {
        let mut s = self.ms.clone();
        s.sort_by(f64::total_cmp);
        let p50 = pct(&s, 50.0);
        let phases = self
            .phases
            .iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                v.sort_by(f64::total_cmp);
                (k.clone(), round3(pct(&v, 50.0)))
            })
            .collect();
        Summary {
            name: self.name.clone(),
            kind: self.kind,
            n: s.len(),
            p50_ms: round3(p50),
            p99_ms: round3(pct(&s, 99.0)),
            mean_ms: round3(s.iter().sum::<f64>() / s.len().max(1) as f64),
            min_ms: round3(s.first().copied().unwrap_or(f64::NAN)),
            throughput_per_s: round3(if self.wall_s > 0.0 {
                s.len() as f64 / self.wall_s
            } else {
                f64::NAN
            }),
            p50_ratio: baseline_p50.and_then(|b| round3(p50 / b)),
            sandbox_phases_p50_ms: phases,
        }
    }
}

/// A series summarised; times in ms.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Display name.
    pub name: String,
    /// What it measures.
    pub kind: Kind,
    /// Measured tasks.
    pub n: usize,
    /// Median latency.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency (the maximum below 100 samples).
    pub p99_ms: Option<f64>,
    /// Mean latency.
    pub mean_ms: Option<f64>,
    /// Fastest task.
    pub min_ms: Option<f64>,
    /// Tasks per second over the wall time of the series.
    pub throughput_per_s: Option<f64>,
    /// p50 over the group's bare p50 (None for the bare series itself when
    /// there is no baseline).
    pub p50_ratio: Option<f64>,
    /// Median of each sandbox phase (engine series only).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub sandbox_phases_p50_ms: BTreeMap<String, Option<f64>>,
}

/// Rounds to 3 decimals; None for NaN or infinite (JSON has neither).
pub fn round3(v: f64) -> Option<f64> {
    v.is_finite().then(|| (v * 1000.0).round() / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&s, 50.0), 50.0);
        assert_eq!(pct(&s, 99.0), 99.0);
        assert_eq!(pct(&[3.0], 99.0), 3.0);
        assert!(pct(&[], 50.0).is_nan());
    }

    #[test]
    fn summary_has_ratio_and_throughput() {
        let mut s = Samples::new("x", Kind::Cold);
        s.ms = vec![4.0, 2.0, 6.0];
        s.wall_s = 1.5;
        let sum = s.summary(Some(2.0));
        assert_eq!(sum.p50_ms, Some(4.0));
        assert_eq!(sum.p50_ratio, Some(2.0));
        assert_eq!(sum.throughput_per_s, Some(2.0));
        let empty = Samples::new("e", Kind::Bare).summary(None);
        assert_eq!(empty.p50_ms, None);
        assert_eq!(empty.throughput_per_s, None);
    }
}
