//! Warm launcher pools: sandboxes whose namespaces, mounts and cgroup are
//! built ahead of time, per runtime and limit class, each used for exactly
//! one task and then destroyed.
//!
//! A pre-built sandbox is a launcher that got the *base* of a spec (see
//! [`crate::launcher`]): it has unshared its namespaces, built the root with
//! an empty work dir and compiled its seccomp filter, sits in its own task
//! cgroup (limits applied), has reported `Ready`, and blocks reading its
//! task. A task that finds one ready for its key (mounts, support files,
//! user, limit class) sends its spec (work files, argv, environment...) and
//! the go; the launcher writes the files, forks the init and execs the task,
//! and from there the run is watched and torn down exactly like a cold one:
//! launcher, namespaces, tmpfs and cgroup all end with it. Nothing is ever reused: the pool only moves
//! the building of a fresh sandbox off the task's critical path.
//!
//! One maintenance thread per pool keeps each key's sandboxes ready: it
//! builds them one at a time, up to a target that follows the key's recent
//! arrivals (a time-decayed count of the tasks that came in the last couple
//! of seconds), clamped to `[min_per_key, max_per_key]` and to `max_total`
//! over all keys. A key with no task for `idle_after` shrinks to
//! `min_per_key`. Sandboxes whose launcher died are thrown away and rebuilt.
//! A task never waits for the pool: without a ready sandbox (or if the one
//! it took turns out dead) it runs cold at once, and its arrival makes the
//! pool grow.
//!
//! The launchers are spawned by the maintenance thread and die with it
//! (their parent-death signal follows the spawning thread), so the thread
//! lives until the pool is shut down and every run in a pooled sandbox has
//! ended.
//!
//! (Past 700 lines with its unit tests only: the pool's code is one piece,
//! the key, the pre-built sandbox and the maintenance thread that plans
//! for both.)

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cgroup::TaskCgroup;
use crate::launcher::mono_ns;
use crate::spawn::{
    CancelToken, Handed, Prepared, RunOutcome, RunRequest, Sandbox, SandboxError, finish_run, watch,
};
use crate::uids::UidLease;

/// Sizing of the pools.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Warm sandboxes kept per key even when idle.
    pub min_per_key: usize,
    /// Warm sandboxes at most per key.
    pub max_per_key: usize,
    /// Warm sandboxes at most in all.
    pub max_total: usize,
    /// A key that saw no task for this long shrinks to `min_per_key`.
    pub idle_after: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            min_per_key: 0,
            max_per_key: 4,
            max_total: 16,
            idle_after: Duration::from_secs(30),
        }
    }
}

/// Counters and gauges of a [`LauncherPool`], for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Tasks that ran in a pre-built sandbox.
    pub hits: u64,
    /// Tasks that found no ready sandbox of their key and ran cold.
    pub misses: u64,
    /// Sandboxes built ahead of time.
    pub created: u64,
    /// Pre-built sandboxes found dead (their launcher gone) and thrown away.
    pub discarded: u64,
    /// Pre-built sandboxes destroyed unused: an idle key shrinking, room
    /// made for a busier key, shutdown.
    pub retired: u64,
    /// Attempts to build a sandbox ahead of time that failed.
    pub failed: u64,
    /// Sandboxes ready now, all keys together.
    pub warm: usize,
    /// What the pool aims to keep ready now, all keys together.
    pub target: usize,
    /// Keys (runtime and limit classes) the pool knows.
    pub keys: usize,
}

/// How long a key's arrivals count towards its target: the target is about
/// the number of tasks of the key that arrived in the last `DEMAND_TAU`
/// (each arrival's weight decays as `exp(-age / DEMAND_TAU)`), which covers
/// a burst like the last one while a single thread rebuilds.
const DEMAND_TAU: Duration = Duration::from_secs(2);
/// How often the maintenance thread looks for dead launchers and idle keys
/// when nothing wakes it.
const TICK: Duration = Duration::from_millis(250);
/// How long a launcher may take to build its sandbox.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause before building again for a key whose builds fail.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A key unseen for this many `idle_after` is forgotten (its floor too).
const FORGET_AFTER_IDLES: u32 = 10;

/// Everything that shapes a pre-built sandbox: the read-only mounts, the
/// support files (the handler wrapper), the user a request names (else
/// each sandbox leases a uid of its own when it is built; the synthetic
/// `/etc` names it) and the limit class (cgroup limits and scratch size). Tasks
/// with equal keys can use each other's pre-built sandboxes; the rest of a
/// request (files, argv, environment, stdin, rlimits, read-back, time and
/// output limits) travels with the task.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    user: Option<(u32, u32)>,
    ro_mounts: Vec<(String, bool)>,
    support_files: Vec<(String, Vec<u8>, bool)>,
    memory_bytes: u64,
    disk_bytes: u64,
    pids: u32,
    cpu_request_millis: u32,
    cpu_limit_millis: Option<u32>,
}

impl PoolKey {
    fn of(req: &RunRequest) -> Self {
        let l = &req.limits;
        Self {
            user: req.user,
            ro_mounts: req
                .ro_mounts
                .iter()
                .map(|m| (m.path.clone(), m.optional))
                .collect(),
            support_files: req
                .support_files
                .iter()
                .map(|f| (f.path.clone(), f.content.clone(), f.executable))
                .collect(),
            memory_bytes: l.memory_bytes,
            disk_bytes: l.disk_bytes,
            pids: l.pids,
            cpu_request_millis: l.cpu_request_millis,
            cpu_limit_millis: l.cpu_limit_millis,
        }
    }
}

/// A sandbox built ahead of its task: its cgroup, its launcher waiting
/// for the task, and the user it was built for. Dropped unused, all are
/// destroyed (the uid goes back once the cgroup is empty).
#[derive(Debug)]
struct Prebuilt {
    /// `None` once handed to a task.
    launcher: Option<Prepared>,
    /// `None` once handed to a task.
    cgroup: Option<Box<dyn TaskCgroup>>,
    /// The uid leased for the sandbox's task, if the request named none.
    lease: Option<UidLease>,
    /// The (uid, gid) its task runs as.
    user: (u32, u32),
}

impl Drop for Prebuilt {
    fn drop(&mut self) {
        // The launcher first (killed and reaped), then its cgroup.
        drop(self.launcher.take());
        if let Some(cgroup) = self.cgroup.take() {
            let emptied = cgroup.kill_all();
            crate::uids::release(self.lease.take(), &emptied);
            let _ = cgroup.remove();
        }
    }
}

impl Prebuilt {
    /// Builds a sandbox for requests like `template`: a fresh cgroup with
    /// its limits, a launcher that got the base spec and sits in the cgroup,
    /// and its `Ready`.
    fn build(sandbox: &Sandbox, template: &RunRequest) -> Result<Self, SandboxError> {
        let (lease, user) = sandbox.user_for(template)?;
        let (mut spec, etc) = sandbox.launch_spec(template, user)?;
        let cgroup = sandbox.new_cgroup(&template.limits)?;
        spec.self_join = cgroup.self_join_files();
        spec.task_join = cgroup.task_join_file();
        let mut built = Self {
            launcher: None,
            cgroup: Some(cgroup),
            lease,
            user,
        };
        let launcher = sandbox.prepare(&spec, &template.support_files, &etc)?;
        let pid = launcher.pid();
        let launcher = built.launcher.insert(launcher);
        if spec.self_join.is_empty()
            && let Some(cgroup) = &built.cgroup
        {
            #[allow(clippy::cast_possible_wrap, reason = "a pid is at most pid_max, 2^22")]
            let pid = pid as i32;
            cgroup.attach_supervisor(pid)?;
        }
        launcher.wait_ready(READY_TIMEOUT)?;
        Ok(built)
    }

    /// Whether the launcher still waits for a task.
    fn is_waiting(&self) -> bool {
        self.launcher.as_ref().is_some_and(Prepared::is_waiting)
    }

    /// Hands `req` over and watches the run to its end, exactly like a cold
    /// run from the go on; the wall-clock limit starts now. `None` when the
    /// launcher turned out dead: before the hand-over, or after it without
    /// any report (so the task never reported its start); either way this
    /// sandbox is destroyed.
    fn run(
        mut self,
        sandbox: &Sandbox,
        req: &RunRequest,
        cancel: Option<&CancelToken>,
    ) -> Option<Result<RunOutcome, SandboxError>> {
        let t0 = Instant::now();
        let t0_mono = mono_ns();
        if !self.is_waiting() {
            return None;
        }
        let (spec, _etc) = match sandbox.launch_spec(req, self.user) {
            Ok(spec) => spec,
            Err(e) => return Some(Err(e)),
        };
        let (launcher, cgroup) = (self.launcher.take()?, self.cgroup.take()?);
        let lease = self.lease.take();
        // The launcher's own set-up in the cgroup is not the task's.
        let cpu_base = cgroup.cpu_time().unwrap_or_default();
        let sent = launcher
            .send_task(&spec, &req.work_files)
            .and_then(|()| launcher.send_go());
        if sent.is_err() {
            // It died since the check: nothing of the task ran.
            drop(launcher);
            let emptied = cgroup.kill_all();
            crate::uids::release(lease, &emptied);
            let _ = cgroup.remove();
            return None;
        }
        let mut phases = vec![("poolHandover", t0.elapsed())];
        let mut heard = false;
        let result = watch(
            Handed {
                prepared: launcher,
                go: Ok(()),
                deadline: t0 + req.limits.timeout,
                attached_mono: mono_ns(),
                cpu_base,
                t0,
                t0_mono,
            },
            cgroup.as_ref(),
            &req.limits,
            cancel,
            &mut phases,
            &mut heard,
        );
        let died_unheard = result.is_err() && !heard;
        let result = finish_run(cgroup.as_ref(), result, phases, t0, cpu_base, lease);
        // A launcher that ended without a word after the hand-over was dying
        // already (killed between the check and the hand-over): its init
        // never reported the task's start, and a sandbox has no effect
        // outside itself, so the task may run again elsewhere.
        (!died_unheard).then_some(result)
    }
}

/// One key's pool.
#[derive(Debug)]
struct KeyPool {
    /// A request of the key with no task in it, to build from.
    template: RunRequest,
    /// Ready sandboxes, oldest first.
    ready: VecDeque<Prebuilt>,
    /// Decayed count of arrivals, as of `demand_at`.
    demand: f64,
    demand_at: Instant,
    last_arrival: Instant,
    /// Failed builds in a row, and when to try again.
    failures: u32,
    retry_at: Option<Instant>,
}

impl KeyPool {
    fn new(req: &RunRequest, now: Instant) -> Self {
        Self {
            template: RunRequest {
                argv: Vec::new(),
                env: Vec::new(),
                work_files: Vec::new(),
                stdin_path: None,
                read_back: Vec::new(),
                collect_dir: None,
                ..req.clone()
            },
            ready: VecDeque::new(),
            demand: 0.0,
            demand_at: now,
            last_arrival: now,
            failures: 0,
            retry_at: None,
        }
    }

    fn demand(&self, now: Instant) -> f64 {
        let age = now.saturating_duration_since(self.demand_at).as_secs_f64();
        self.demand * (-age / DEMAND_TAU.as_secs_f64()).exp()
    }

    fn arrive(&mut self, now: Instant) {
        self.demand = self.demand(now) + 1.0;
        self.demand_at = now;
        self.last_arrival = now;
    }

    fn idle(&self, now: Instant, config: &PoolConfig) -> bool {
        now.saturating_duration_since(self.last_arrival) >= config.idle_after
    }

    /// How many ready sandboxes the key should have now.
    fn target(&self, now: Instant, config: &PoolConfig) -> usize {
        let floor = config.min_per_key.min(config.max_per_key);
        if self.idle(now, config) {
            return floor;
        }
        // Recent arrivals, rounded down once they have mostly decayed.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "non-negative; the cast saturates and the result is clamped"
        )]
        let recent = (self.demand(now) - 0.05).ceil().max(0.0) as usize;
        recent.clamp(floor, config.max_per_key)
    }
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<PoolKey, KeyPool>,
    /// Runs in pooled sandboxes under way (their launchers die with the
    /// maintenance thread, which waits for them).
    in_flight: usize,
    shutdown: bool,
    stats: PoolStats,
}

impl State {
    fn warm(&self) -> usize {
        self.keys.values().map(|k| k.ready.len()).sum()
    }
}

#[derive(Debug)]
struct Shared {
    sandbox: Arc<Sandbox>,
    config: PoolConfig,
    state: Mutex<State>,
    /// Signalled on arrivals, the end of pooled runs and shutdown.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Pools of pre-built sandboxes in front of a cold [`Sandbox`].
#[derive(Debug)]
pub struct LauncherPool {
    shared: Arc<Shared>,
    maintainer: Mutex<Option<JoinHandle<()>>>,
}

impl LauncherPool {
    /// Pools in front of `sandbox`, with their maintenance thread started.
    /// The pools fill as tasks arrive (a key is learnt from its first task).
    pub fn new(sandbox: Arc<Sandbox>, config: PoolConfig) -> Self {
        let shared = Arc::new(Shared {
            sandbox,
            config,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let worker = Arc::clone(&shared);
        let maintainer = std::thread::Builder::new()
            .name("taskexec-pool".into())
            .spawn(move || maintain(&worker));
        let maintainer = match maintainer {
            Ok(handle) => Some(handle),
            Err(_) => {
                // No thread, no pool: every task runs cold.
                shared.lock().shutdown = true;
                None
            }
        };
        Self {
            shared,
            maintainer: Mutex::new(maintainer),
        }
    }

    /// The sizing in use.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// The pool's counters and gauges now.
    pub fn stats(&self) -> PoolStats {
        let now = Instant::now();
        let st = self.shared.lock();
        PoolStats {
            warm: st.warm(),
            target: st
                .keys
                .values()
                .map(|k| k.target(now, &self.shared.config))
                .sum(),
            keys: st.keys.len(),
            ..st.stats
        }
    }

    /// Runs `req` in a pre-built sandbox of its key when one is ready, else
    /// cold at once. Either way the sandbox serves this task only and is
    /// gone when this returns, as with [`Sandbox::run`]. A warm run's
    /// phases start with `poolHandover`.
    pub fn run(
        &self,
        req: &RunRequest,
        cancel: Option<&CancelToken>,
    ) -> Result<RunOutcome, SandboxError> {
        let shared = &self.shared;
        let key = PoolKey::of(req);
        let mut arrived = false;
        loop {
            let taken = {
                let mut st = shared.lock();
                if st.shutdown {
                    None
                } else {
                    let now = Instant::now();
                    let pool = st
                        .keys
                        .entry(key.clone())
                        .or_insert_with(|| KeyPool::new(req, now));
                    if !arrived {
                        pool.arrive(now);
                        arrived = true;
                    }
                    let taken = pool.ready.pop_front();
                    if taken.is_some() {
                        st.in_flight += 1;
                    } else {
                        st.stats.misses += 1;
                    }
                    taken
                }
            };
            shared.changed.notify_all();
            let Some(prebuilt) = taken else {
                return shared.sandbox.run(req, cancel);
            };
            let _in_flight = InFlight(shared);
            match prebuilt.run(&shared.sandbox, req, cancel) {
                Some(result) => {
                    shared.lock().stats.hits += 1;
                    return result;
                }
                // Dead before it got the task: try another, or cold.
                None => shared.lock().stats.discarded += 1,
            }
        }
    }

    /// Destroys every pre-built sandbox and stops the maintenance thread,
    /// after the runs in pooled sandboxes under way have ended. Later tasks
    /// run cold. Dropping the pool does the same.
    pub fn shutdown(&self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        let handle = self
            .maintainer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for LauncherPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Counts a run in a pooled sandbox while it lasts.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
        self.0.changed.notify_all();
    }
}

/// What the maintenance thread does next.
enum Step {
    /// Build one sandbox for this key, from this template.
    Build(PoolKey, Box<RunRequest>),
    /// Nothing to build: wait for a change or the next tick.
    Wait,
}

/// The maintenance thread: throws dead sandboxes away, shrinks idle keys,
/// and builds towards each key's target, one sandbox at a time.
fn maintain(shared: &Shared) {
    let config = &shared.config;
    loop {
        let mut doomed: Vec<Prebuilt> = Vec::new();
        let step = {
            let mut st = shared.lock();
            if st.shutdown {
                let n = st.warm();
                st.stats.retired += n as u64;
                for pool in st.keys.values_mut() {
                    doomed.extend(pool.ready.drain(..));
                }
                break_out(st, doomed, shared);
                return;
            }
            let now = Instant::now();
            plan(&mut st, now, config, &mut doomed)
        };
        // Destroying waits for the launcher and the cgroup: not under the lock.
        drop(doomed);
        match step {
            Step::Build(key, template) => {
                let built = Prebuilt::build(&shared.sandbox, &template);
                let now = Instant::now();
                let mut st = shared.lock();
                match built {
                    Ok(prebuilt) => {
                        st.stats.created += 1;
                        let pool = if st.shutdown {
                            None
                        } else {
                            st.keys.get_mut(&key)
                        };
                        match pool {
                            Some(pool) => {
                                pool.failures = 0;
                                pool.retry_at = None;
                                pool.ready.push_back(prebuilt);
                            }
                            None => {
                                st.stats.retired += 1;
                                drop(st);
                                drop(prebuilt);
                            }
                        }
                    }
                    Err(_) => {
                        st.stats.failed += 1;
                        if let Some(pool) = st.keys.get_mut(&key) {
                            pool.failures = pool.failures.saturating_add(1);
                            let backoff = Duration::from_secs(1)
                                .saturating_mul(1 << pool.failures.min(6).saturating_sub(1))
                                .min(MAX_BACKOFF);
                            pool.retry_at = Some(now + backoff);
                        }
                    }
                }
            }
            Step::Wait => {
                let st = shared.lock();
                if !st.shutdown {
                    let _ = shared.changed.wait_timeout(st, TICK);
                }
            }
        }
    }
}

/// Leaves the maintenance thread: destroys `doomed` (every ready sandbox),
/// then waits for the runs in pooled sandboxes still under way, whose
/// launchers would die with this thread.
fn break_out(st: MutexGuard<'_, State>, doomed: Vec<Prebuilt>, shared: &Shared) {
    drop(st);
    drop(doomed);
    let mut st = shared.lock();
    while st.in_flight > 0 {
        st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
    }
}

/// Under the lock: moves dead and surplus sandboxes to `doomed` and picks
/// the key to build for next.
fn plan(st: &mut State, now: Instant, config: &PoolConfig, doomed: &mut Vec<Prebuilt>) -> Step {
    // Dead launchers.
    let mut dead = 0;
    for pool in st.keys.values_mut() {
        let (alive, gone): (VecDeque<_>, VecDeque<_>) =
            pool.ready.drain(..).partition(Prebuilt::is_waiting);
        pool.ready = alive;
        dead += gone.len();
        doomed.extend(gone);
    }
    st.stats.discarded += dead as u64;

    // Idle keys shrink to their floor; long-forgotten keys go entirely.
    let mut retired = 0;
    let forget_after = config.idle_after.saturating_mul(FORGET_AFTER_IDLES);
    st.keys.retain(|_, pool| {
        let keep = if pool.idle(now, config) {
            pool.target(now, config)
        } else {
            usize::MAX
        };
        while pool.ready.len() > keep {
            doomed.extend(pool.ready.pop_back());
            retired += 1;
        }
        let forgotten = now.saturating_duration_since(pool.last_arrival) >= forget_after
            || (keep == 0 && pool.idle(now, config));
        if forgotten {
            retired += pool.ready.len();
            doomed.extend(pool.ready.drain(..));
        }
        !forgotten
    });
    st.stats.retired += retired as u64;

    // The key furthest below its target (not in a failure back-off).
    let wanted = st
        .keys
        .iter()
        .filter(|(_, p)| p.retry_at.is_none_or(|t| now >= t))
        .map(|(k, p)| (p.target(now, config).saturating_sub(p.ready.len()), k))
        .filter(|(deficit, _)| *deficit > 0)
        .max_by_key(|(deficit, _)| *deficit)
        .map(|(_, k)| k.clone());
    let Some(key) = wanted else {
        return Step::Wait;
    };
    if st.warm() >= config.max_total {
        // Full: make room from a key holding more than its target.
        let surplus = st
            .keys
            .iter_mut()
            .filter(|(k, _)| **k != key)
            .find(|(_, p)| p.ready.len() > p.target(now, config))
            .and_then(|(_, p)| p.ready.pop_back());
        match surplus {
            Some(prebuilt) => {
                st.stats.retired += 1;
                doomed.push(prebuilt);
            }
            None => return Step::Wait,
        }
    }
    match st.keys.get(&key) {
        Some(pool) => Step::Build(key, Box::new(pool.template.clone())),
        None => Step::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PoolConfig {
        PoolConfig {
            min_per_key: 1,
            max_per_key: 4,
            max_total: 8,
            idle_after: Duration::from_secs(30),
        }
    }

    fn request() -> RunRequest {
        crate::spawn::test_request("/bin/true")
    }

    #[test]
    fn the_pool_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<LauncherPool>();
    }

    #[test]
    fn the_target_follows_recent_arrivals_within_floor_and_cap() {
        let t0 = Instant::now();
        let mut pool = KeyPool::new(&request(), t0);
        let cfg = config();
        // Before any arrival counts, the floor.
        assert_eq!(pool.target(t0, &cfg), 1);
        for _ in 0..3 {
            pool.arrive(t0);
        }
        assert_eq!(pool.target(t0, &cfg), 3);
        for _ in 0..10 {
            pool.arrive(t0);
        }
        assert_eq!(pool.target(t0, &cfg), 4, "capped at max_per_key");
        // Arrivals decay: long after a burst (but before idle_after) the
        // target is back at the floor.
        assert_eq!(pool.target(t0 + Duration::from_secs(20), &cfg), 1);
        // Idle: the floor, whatever the demand.
        pool.arrive(t0 + Duration::from_secs(1));
        assert_eq!(pool.target(t0 + Duration::from_secs(31), &cfg), 1);
    }

    #[test]
    fn per_task_parts_do_not_change_the_key_but_limits_and_user_do() {
        let a = request();
        let mut b = request();
        b.argv = vec!["/usr/bin/python3".into()];
        b.env = vec![("X".into(), "1".into())];
        b.work_files = vec![crate::SandboxFile {
            path: "main.py".into(),
            content: b"print(1)".to_vec(),
            executable: false,
        }];
        b.limits.timeout = Duration::from_secs(9);
        b.limits.output_bytes = 7;
        assert_eq!(PoolKey::of(&a), PoolKey::of(&b));
        let mut c = request();
        c.limits.memory_bytes *= 2;
        assert_ne!(PoolKey::of(&a), PoolKey::of(&c));
        let mut d = request();
        d.user = Some((1000, 1000));
        assert_ne!(PoolKey::of(&a), PoolKey::of(&d));
    }
}
