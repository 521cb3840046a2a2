//! The registry of fork servers: one per key (kind, mounts, support files,
//! preload list), at most [`MAX_SERVERS`] of them with the least recently
//! used idle one stopped to make room, worn ones replaced ([`Recycle`]),
//! starts rationed ([`crate::fork_server::start_limit`]) and failed ones backed off.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::fork_server::start_limit::{StartLimit, StartLimiter};
use crate::spawn::{CancelToken, RunOutcome, RunRequest, Sandbox, SandboxError};

use super::Fallback;
use super::server::{START_TIMEOUT, Server, server_source, start_server};
use super::spare::{ChildUid, Spare};

/// The fork servers of one executor, by key (kind, mounts, support files).
#[derive(Debug)]
pub(crate) struct ForkServers {
    pub(super) sandbox: Arc<Sandbox>,
    pub(super) servers: Mutex<HashMap<u64, Arc<Server>>>,
    /// Finished children go here: a thread waits for their last process
    /// and removes their cgroup. `None` once shut down.
    pub(super) reaper: Mutex<Option<std::sync::mpsc::Sender<Spare>>>,
    pub(super) reaper_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Threads of servers that died and left the map, for `shutdown`.
    pub(super) retired: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Keys whose server failed to start, and when: their requests run
    /// cold without trying again for [`START_BACKOFF`] (a module of
    /// `definition.preload` that does not import would otherwise cost a
    /// server start per task).
    pub(super) failed: Mutex<HashMap<u64, Instant>>,
    /// Servers that failed to start, since the beginning.
    pub(super) start_failures: std::sync::atomic::AtomicU64,
    /// When a server is replaced by a fresh one.
    pub(super) recycle: Recycle,
    /// Servers replaced so far for their age or runs.
    pub(super) recycled: std::sync::atomic::AtomicU64,
    /// Keys whose first server is starting, without the servers' lock.
    pub(super) starting: Mutex<HashMap<u64, Arc<Pending>>>,
    /// Which server starts may go ahead now ([`crate::fork_server::start_limit`]).
    pub(super) limiter: Mutex<StartLimiter>,
    /// Servers started so far (first starts and replacements).
    pub(super) starts: std::sync::atomic::AtomicU64,
    /// Starts the limiter refused so far.
    pub(super) starts_refused: std::sync::atomic::AtomicU64,
    /// CPU time of servers' starts so far, started or failed, in
    /// nanoseconds.
    pub(super) start_cpu_nanos: Arc<std::sync::atomic::AtomicU64>,
}

/// A server start in progress, for the requests of its key that wait.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub(super) done: Mutex<bool>,
    pub(super) ended: Condvar,
}

impl Pending {
    pub(super) fn finish(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.ended.notify_all();
    }

    /// Until the start ends, or `limit`.
    pub(super) fn wait(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            done = self
                .ended
                .wait_timeout(done, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// When a fork server is replaced by a fresh one: everything a task can
/// learn of the pre-fork image (the string-hash secret, the address-space
/// layout) is then shared by that many tasks at most, for that long at
/// most. Runs in flight finish in the old server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recycle {
    /// Runs handed to one server at most.
    pub max_runs: u64,
    /// A server's longest life.
    pub max_age: Duration,
}

impl Default for Recycle {
    fn default() -> Self {
        Self {
            max_runs: 1000,
            max_age: Duration::from_secs(600),
        }
    }
}

/// Servers running at once at most; past it, the least recently used idle
/// one is stopped to make room (each is an interpreter with its spares).
pub(super) const MAX_SERVERS: usize = 8;

/// How long a key whose server failed to start runs cold before the next
/// try.
pub(super) const START_BACKOFF: Duration = Duration::from_secs(30);

pub(super) fn key_of(kind: &str, req: &RunRequest) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    kind.hash(&mut h);
    for m in &req.ro_mounts {
        (&m.path, m.optional).hash(&mut h);
    }
    for f in &req.support_files {
        (&f.path, &f.content, f.executable).hash(&mut h);
    }
    preload_list(req).hash(&mut h);
    h.finish()
}

/// The modules a server of `req` preloads, sorted and deduplicated: lists
/// that differ only in order or repeats share one server (each new list
/// costs a server start).
pub(super) fn preload_list(req: &RunRequest) -> Vec<&String> {
    let mut list: Vec<&String> = req.preload.iter().collect();
    list.sort();
    list.dedup();
    list
}

/// How long a finished run's cgroup waits for the reaper.
pub(super) const REAP_DELAY: Duration = Duration::from_millis(10);

impl ForkServers {
    pub(crate) fn new(sandbox: Arc<Sandbox>, recycle: Recycle, limit: StartLimit) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Spare>();
        // Dropping a spare kills what is left of it, waits until it is
        // gone and removes its cgroup (see `Drop for Spare`). Finished runs
        // wait a little and go in batches: the work is then off the moment
        // a task's answer goes out and the next one comes in.
        let thread = std::thread::Builder::new()
            .name("fork-server-reaper".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    let until = Instant::now() + REAP_DELAY;
                    while let Ok(more) =
                        rx.recv_timeout(until.saturating_duration_since(Instant::now()))
                    {
                        batch.push(more);
                    }
                    drop(batch);
                }
            })
            .ok();
        Self {
            sandbox,
            servers: Mutex::new(HashMap::new()),
            reaper: Mutex::new(thread.is_some().then_some(tx)),
            reaper_thread: Mutex::new(thread),
            retired: Mutex::new(Vec::new()),
            failed: Mutex::new(HashMap::new()),
            start_failures: std::sync::atomic::AtomicU64::new(0),
            recycle,
            recycled: std::sync::atomic::AtomicU64::new(0),
            starting: Mutex::new(HashMap::new()),
            limiter: Mutex::new(StartLimiter::new(limit, Instant::now())),
            starts: std::sync::atomic::AtomicU64::new(0),
            starts_refused: std::sync::atomic::AtomicU64::new(0),
            start_cpu_nanos: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Servers started so far.
    pub(crate) fn starts(&self) -> u64 {
        self.starts.load(Ordering::Relaxed)
    }

    /// Server starts the limiter refused so far.
    pub(crate) fn starts_refused(&self) -> u64 {
        self.starts_refused.load(Ordering::Relaxed)
    }

    /// CPU time spent on server starts so far.
    pub(crate) fn start_cpu(&self) -> Duration {
        Duration::from_nanos(self.start_cpu_nanos.load(Ordering::Relaxed))
    }

    /// Whether a start of `key` (`None`: a worn server's replacement) may
    /// go ahead now; counts a refusal.
    pub(super) fn may_start(&self, key: Option<u64>) -> bool {
        let mut limiter = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        let allowed = match key {
            Some(key) => limiter.try_start(key, Instant::now()),
            None => limiter.try_replace(Instant::now()),
        };
        drop(limiter);
        if !allowed {
            self.starts_refused.fetch_add(1, Ordering::Relaxed);
        }
        allowed
    }

    /// Starts a server of `key`, counting the start and its CPU time.
    pub(super) fn start(
        &self,
        key: u64,
        kind: &str,
        req: &RunRequest,
    ) -> Result<Arc<Server>, SandboxError> {
        let started = start_server(
            Arc::clone(&self.sandbox),
            key,
            kind,
            req,
            Arc::clone(&self.start_cpu_nanos),
        );
        if started.is_ok() {
            self.starts.fetch_add(1, Ordering::Relaxed);
        }
        started
    }

    /// Servers replaced so far for their age or runs.
    pub(crate) fn recycled(&self) -> u64 {
        self.recycled.load(Ordering::Relaxed)
    }

    /// Servers that failed to start so far.
    pub(crate) fn start_failures(&self) -> u64 {
        self.start_failures.load(Ordering::Relaxed)
    }

    /// Number of running servers.
    pub(crate) fn count(&self) -> usize {
        self.servers.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Spare children waiting for a task, all servers together.
    pub(crate) fn spare_count(&self) -> usize {
        // Counted under the map's lock, without a reference of our own: the
        // last reference to a server stops it, and that is `shutdown`'s.
        self.servers.lock().map_or(0, |map| {
            map.values()
                .map(|s| s.spares.lock().map_or(0, |sp| sp.len()))
                .sum()
        })
    }

    /// Runs `req` in a fork-server child, or says why it must run cold.
    pub(crate) fn run(
        &self,
        req: &RunRequest,
        cancel: Option<&CancelToken>,
    ) -> Result<Result<RunOutcome, SandboxError>, Fallback> {
        let Some(kind) = req.fork_server.as_deref() else {
            return Err(Fallback::NotEligible);
        };
        if server_source(kind).is_none() || req.user.is_some() || req.collect_dir.is_some() {
            return Err(Fallback::NotEligible);
        }
        let key = key_of(kind, req);
        let server = self.server(key, kind, req)?;
        let Some(uid) = server.take_uid() else {
            return Err(Fallback::Busy);
        };
        let lease = ChildUid {
            server: Arc::downgrade(&server),
            uid,
            _block: Arc::clone(&server.ids),
        };
        let Some(reaper) = self.reaper.lock().ok().and_then(|r| r.as_ref().cloned()) else {
            return Err(Fallback::NotEligible); // shut down (the lease gives the uid back)
        };
        let result = server.run(&self.sandbox, req, cancel, lease, &reaper);
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                // Nothing of the task ran; a dead server is replaced.
                if !server.alive() {
                    self.forget(&server);
                }
                Err(Fallback::ServerFailed(e))
            }
        }
    }

    pub(super) fn forget(&self, server: &Arc<Server>) {
        if let Ok(mut map) = self.servers.lock()
            && map.get(&server.key).is_some_and(|s| Arc::ptr_eq(s, server))
        {
            map.remove(&server.key);
            self.retire(server);
        }
    }

    /// Stops a server that left the map (its spares go now) and keeps its
    /// thread for [`ForkServers::shutdown`] to wait for: that thread may
    /// hold the server's last reference, and so destroy it, a little later.
    pub(super) fn retire(&self, server: &Server) {
        server.stop();
        let handle = server.refill_thread.lock().ok().and_then(|mut h| h.take());
        if let (Some(h), Ok(mut retired)) = (handle, self.retired.lock()) {
            retired.retain(|h| !h.is_finished());
            retired.push(h);
        }
    }

    pub(super) fn server(
        &self,
        key: u64,
        kind: &str,
        req: &RunRequest,
    ) -> Result<Arc<Server>, Fallback> {
        loop {
            let mut map = self.servers.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = map.get(&key).cloned() {
                if s.alive() {
                    let worn = s.runs.load(Ordering::SeqCst) >= self.recycle.max_runs
                        || s.started.elapsed() >= self.recycle.max_age;
                    // One request replaces a worn server, unless a start of
                    // this key failed a short while ago; the others keep
                    // using it meanwhile.
                    if worn
                        && !self.recently_failed(key)
                        && s.replacing
                            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                    {
                        drop(map);
                        return self.replace(key, kind, req, &s);
                    }
                    s.touch();
                    s.runs.fetch_add(1, Ordering::SeqCst);
                    return Ok(s);
                }
                // Dead: runs in flight keep it until they end (its last
                // reference stops it).
                map.remove(&key);
                self.retire(&s);
            }
            let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pending) = starting.get(&key).cloned() {
                // Racing first requests wait for one server instead of
                // starting several; then look again.
                drop(starting);
                drop(map);
                pending.wait(START_TIMEOUT + Duration::from_secs(5));
                continue;
            }
            if self.recently_failed(key) {
                return Err(Fallback::StartBackoff);
            }
            // Before any eviction: a refused start stops no other server.
            if !self.may_start(Some(key)) {
                return Err(Fallback::StartRefused);
            }
            if map.len() + starting.len() >= MAX_SERVERS {
                // Room for one more: stop the least recently used idle server.
                let idle = map
                    .iter()
                    .filter(|(_, s)| s.in_flight.load(Ordering::SeqCst) == 0)
                    .min_by_key(|(_, s)| s.last_used())
                    .map(|(k, _)| *k);
                match idle.and_then(|k| map.remove(&k)) {
                    Some(evicted) => self.retire(&evicted),
                    None => return Err(Fallback::Busy),
                }
            }
            // The start (tens of milliseconds, longer with heavy modules to
            // preload) runs without the servers' lock: other keys' requests
            // go on meanwhile.
            let pending = Arc::new(Pending::default());
            starting.insert(key, Arc::clone(&pending));
            drop(starting);
            drop(map);
            let started = self.start(key, kind, req);
            let mut map = self.servers.lock().unwrap_or_else(|p| p.into_inner());
            self.starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            let shut_down = self.reaper.lock().map_or(true, |r| r.is_none());
            let out = match started {
                Ok(server) if shut_down => {
                    // `shutdown` ran meanwhile: this one goes too.
                    drop(map);
                    self.retire(&server);
                    drop(server);
                    Err(Fallback::NotEligible)
                }
                Ok(server) => {
                    server.runs.fetch_add(1, Ordering::SeqCst);
                    map.insert(key, Arc::clone(&server));
                    Ok(server)
                }
                Err(e) => {
                    self.start_failed(key);
                    Err(Fallback::ServerFailed(e))
                }
            };
            pending.finish();
            return out;
        }
    }

    /// Whether a server of `key` failed to start within [`START_BACKOFF`].
    pub(super) fn recently_failed(&self, key: u64) -> bool {
        self.failed.lock().is_ok_and(|mut failed| {
            failed.retain(|_, at| at.elapsed() < START_BACKOFF);
            failed.contains_key(&key)
        })
    }

    /// Starts the replacement of the worn server `old` of `key`, without
    /// the servers' lock (other keys' requests, and this key's on `old`,
    /// go on meanwhile), then puts it in `old`'s place and retires `old`,
    /// whose runs in flight finish there. If the start fails, `old` keeps
    /// serving until the next try.
    pub(super) fn replace(
        &self,
        key: u64,
        kind: &str,
        req: &RunRequest,
        old: &Arc<Server>,
    ) -> Result<Arc<Server>, Fallback> {
        if !self.may_start(None) {
            // The worn server serves on until a start is allowed.
            old.replacing.store(false, Ordering::SeqCst);
            old.touch();
            old.runs.fetch_add(1, Ordering::SeqCst);
            return Ok(Arc::clone(old));
        }
        let started = self.start(key, kind, req);
        let mut map = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        let new = match started {
            Ok(new) => new,
            Err(e) => {
                self.start_failed(key);
                eprintln!(
                    "taskexec: a fork server's replacement did not start, the old one serves on: {}",
                    crate::warm::error_chain(&e)
                );
                old.replacing.store(false, Ordering::SeqCst);
                old.runs.fetch_add(1, Ordering::SeqCst);
                return Ok(Arc::clone(old));
            }
        };
        if let Some(current) = map.get(&key)
            && !Arc::ptr_eq(current, old)
        {
            // `old` died meanwhile and another request replaced it: use
            // that one, ours goes.
            let current = Arc::clone(current);
            drop(map);
            self.retire(&new);
            current.runs.fetch_add(1, Ordering::SeqCst);
            return Ok(current);
        }
        self.recycled.fetch_add(1, Ordering::Relaxed);
        new.runs.fetch_add(1, Ordering::SeqCst);
        map.insert(key, Arc::clone(&new));
        drop(map);
        self.retire(old);
        Ok(new)
    }

    /// Counts a failed start of `key`'s server and holds the key back for
    /// [`START_BACKOFF`].
    pub(super) fn start_failed(&self, key: u64) {
        self.start_failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut failed) = self.failed.lock() {
            failed.insert(key, Instant::now());
        }
    }

    /// Stops every server and waits until its processes and cgroups are
    /// gone.
    pub(crate) fn shutdown(&self) {
        let servers: Vec<Arc<Server>> = match self.servers.lock() {
            Ok(mut map) => map.drain().map(|(_, s)| s).collect(),
            Err(_) => return,
        };
        for server in servers {
            server.stop();
            let handle = server.refill_thread.lock().ok().and_then(|mut h| h.take());
            // Our reference goes first: the thread waits for the last one
            // (a run still in flight holds one until it ends).
            drop(server);
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
        // Servers that died earlier: their threads may still hold them.
        let retired: Vec<_> = self
            .retired
            .lock()
            .map(|mut r| r.drain(..).collect())
            .unwrap_or_default();
        for h in retired {
            let _ = h.join();
        }
        // Then every finished child is reaped before we return.
        if let Ok(mut r) = self.reaper.lock() {
            r.take();
        }
        let thread = self.reaper_thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for ForkServers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(preload: &[&str]) -> RunRequest {
        RunRequest {
            preload: preload.iter().map(|m| m.to_string()).collect(),
            ..crate::spawn::test_request("/usr/bin/python3")
        }
    }

    #[test]
    fn preload_lists_alike_but_for_order_and_repeats_share_a_key() {
        let a = key_of("python", &request(&["json", "numpy"]));
        let b = key_of("python", &request(&["numpy", "json", "json"]));
        assert_eq!(a, b);
        assert_ne!(a, key_of("python", &request(&["json"])));
        assert_ne!(a, key_of("node", &request(&["json", "numpy"])));
    }

    #[test]
    fn per_task_parts_do_not_change_the_key() {
        let mut other = request(&[]);
        other.argv.push("-c".into());
        other.env.push(("A".into(), "B".into()));
        other.limits.timeout = Duration::from_secs(9);
        assert_eq!(key_of("python", &request(&[])), key_of("python", &other));
    }
}
