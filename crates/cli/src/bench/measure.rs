//! Interleaved measurement of a group of contenders (bare interpreter,
//! cold engine, warm engine, CLI, service) at one concurrency, so that a
//! noisy shared machine skews every contender of the group alike.
//!
//! At concurrency 1 the contenders take turns task by task (the order
//! rotates each turn). At concurrency c > 1 they take turns chunk by chunk:
//! a chunk is 4·c tasks kept c in flight, timed as a whole for throughput
//! (so each chunk's ramp-up and tail count against every contender alike).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;

use super::progress::Progress;
use super::stats::{Kind, Samples};

/// What one task took.
#[derive(Debug, Default)]
pub struct Sample {
    /// Latency, ms.
    pub ms: f64,
    /// Sandbox phase timings, ms (engine contenders).
    pub phases: BTreeMap<String, f64>,
}

/// Runs one task and times it; called from several threads at once.
pub type RunOnce<'a> = Box<dyn Fn() -> anyhow::Result<Sample> + Sync + 'a>;

/// One side of a comparison.
pub struct Contender<'a> {
    /// Display name.
    pub name: String,
    /// What it measures.
    pub kind: Kind,
    /// One task.
    pub run: RunOnce<'a>,
}

impl std::fmt::Debug for Contender<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contender")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// How many tasks, how many at once.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Tasks in flight.
    pub concurrency: usize,
    /// Tasks to measure per contender (rounded up to whole chunks).
    pub tasks: usize,
    /// Unmeasured rounds of `concurrency` tasks per contender first
    /// (page cache, compiled classes, warm pools filled).
    pub warmup: usize,
}

impl Plan {
    fn chunk(&self) -> usize {
        if self.concurrency <= 1 {
            1
        } else {
            4 * self.concurrency
        }
    }

    fn rounds(&self) -> usize {
        self.tasks.max(1).div_ceil(self.chunk())
    }

    /// Tasks measured per contender.
    pub fn measured(&self) -> usize {
        self.rounds() * self.chunk()
    }

    /// Progress units of a group of `contenders`.
    pub fn units(&self, contenders: usize) -> u64 {
        (contenders * (self.measured() + self.warmup * self.concurrency.max(1))) as u64
    }
}

/// Measures `contenders` under `plan`; one [`Samples`] each, in order.
pub fn measure(
    contenders: &[Contender<'_>],
    plan: Plan,
    progress: &Progress,
) -> anyhow::Result<Vec<Samples>> {
    let c = plan.concurrency.max(1);
    let mut out: Vec<Samples> = contenders
        .iter()
        .map(|k| Samples::new(k.name.clone(), k.kind))
        .collect();
    for k in contenders {
        batch(k, plan.warmup * c, c, progress).with_context(|| format!("{} (warm-up)", k.name))?;
    }
    let n = contenders.len();
    for round in 0..plan.rounds() {
        for j in 0..n {
            let i = (round + j) % n;
            let (samples, wall) = batch(&contenders[i], plan.chunk(), c, progress)
                .with_context(|| contenders[i].name.clone())?;
            let s = &mut out[i];
            s.wall_s += wall;
            for x in samples {
                s.ms.push(x.ms);
                for (k, v) in x.phases {
                    s.phases.entry(k).or_default().push(v);
                }
            }
        }
    }
    Ok(out)
}

/// Runs `count` tasks of `k`, `c` at a time; their samples and the wall time.
fn batch(
    k: &Contender<'_>,
    count: usize,
    c: usize,
    progress: &Progress,
) -> anyhow::Result<(Vec<Sample>, f64)> {
    let t0 = Instant::now();
    if c <= 1 {
        let mut v = Vec::with_capacity(count);
        for _ in 0..count {
            v.push((k.run)()?);
            progress.inc(1);
        }
        return Ok((v, t0.elapsed().as_secs_f64()));
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let samples = Mutex::new(Vec::with_capacity(count));
    let error = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..c.min(count) {
            scope.spawn(|| {
                while next.fetch_add(1, Ordering::SeqCst) < count && !failed.load(Ordering::SeqCst)
                {
                    match (k.run)() {
                        Ok(x) => samples.lock().unwrap_or_else(|p| p.into_inner()).push(x),
                        Err(e) => {
                            failed.store(true, Ordering::SeqCst);
                            error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                        }
                    }
                    progress.inc(1);
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok((
        samples.into_inner().unwrap_or_else(|p| p.into_inner()),
        wall,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaves_and_counts() {
        let calls = Mutex::new(Vec::new());
        let mk = |name: &'static str| Contender {
            name: name.into(),
            kind: Kind::Bare,
            run: Box::new({
                let calls = &calls;
                move || {
                    calls.lock().expect("lock").push(name);
                    Ok(Sample {
                        ms: 1.0,
                        ..Sample::default()
                    })
                }
            }),
        };
        let ks = [mk("a"), mk("b")];
        let p = Progress::new(0);
        let plan = Plan {
            concurrency: 1,
            tasks: 3,
            warmup: 1,
        };
        let out = measure(&ks, plan, &p).expect("measure");
        assert_eq!(out[0].ms.len(), 3);
        assert_eq!(p.done(), plan.units(2));
        // warm-up a, b; then a b, b a, a b.
        assert_eq!(
            *calls.lock().expect("lock"),
            ["a", "b", "a", "b", "b", "a", "a", "b"]
        );
        let plan4 = Plan {
            concurrency: 2,
            tasks: 9,
            warmup: 0,
        };
        let out = measure(&ks, plan4, &p).expect("measure");
        assert_eq!(out[1].ms.len(), 16);
        assert!(out[1].wall_s > 0.0);
    }

    #[test]
    fn a_failure_stops_the_group() {
        let k = Contender {
            name: "bad".into(),
            kind: Kind::Cold,
            run: Box::new(|| anyhow::bail!("boom")),
        };
        let plan = Plan {
            concurrency: 3,
            tasks: 5,
            warmup: 0,
        };
        let e = measure(&[k], plan, &Progress::new(0)).expect_err("fails");
        assert!(format!("{e:#}").contains("boom"));
    }
}
