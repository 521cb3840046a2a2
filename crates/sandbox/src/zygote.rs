//! Fork servers ("zygotes"): a pre-started interpreter that has already
//! imported the handler wrapper forks one child per task, and the child
//! enters the task's own isolation before it touches the task's input.
//!
//! A fork server lives in a sandbox of its own, built by the ordinary
//! launcher with [`LaunchSpec::fork_server`] set: new PID, mount, network,
//! IPC, UTS and cgroup namespaces, the read-only root of the runtime, its own
//! cgroup. It runs as root of a user namespace of its own
//! ([`LaunchSpec::userns`]), whose ids are a block of [`SERVER_UIDS`] host
//! uids it leases from the node's allocator ([`crate::uids`]) for its life:
//! its uid 0 is the block's first id, [`FORK_UIDS`] its next ones. The
//! sandbox's init writes the maps before the server runs anything, so the
//! code it imports (the wrapper, the modules of `definition.preload`, chosen
//! by tasks) holds capabilities only over the namespaces the server creates
//! for its children, none over the host's (it cannot mount, change the
//! host name or address anything of the namespaces the launcher built). It
//! keeps only [`seccomp::FORK_SERVER_CAPS`] there and runs under the
//! fork-server seccomp profile. The server code itself is
//! `zygote/python_zygote.py` (its docstring has the protocol).
//!
//! Ahead of any task, a server's thread keeps *spare* children
//! ([`Server::make_spare`]):
//! 1. make the task channel (a stream socket pair with `SO_PASSCRED` on our
//!    end), the stdout/stderr pipes and a status pipe, and send the far ends
//!    to the server with one request; it forks;
//! 2. the child says hello: the kernel stamps the message with the child's
//!    pid (translated into our PID namespace), and we move the child into a
//!    cgroup of its own (off the task's path: on cgroup v1 a move can wait
//!    out an RCU grace period);
//! 3. we say "prepare": the child unshares its namespaces, mounts a fresh
//!    tmpfs for /task and /tmp, brings up loopback and loads the task
//!    seccomp filter but for its `mount` rule.
//!
//! One run ([`ForkServers::run`]): take a spare, give it the task's limits
//! and a uid, send the spec (files, argv, env, limits); the child sizes its
//! tmpfs, writes the files, drops everything (uid, capabilities, the last
//! seccomp rule) and reports `m` with the work dir's descriptor, which keeps
//! that tmpfs readable after the child and its mount namespace are gone.
//! The run ends on the child's last words (`x<code>`, sent as it exits) or
//! on the server's report of its exit status; we kill whatever is left in
//! the cgroup, read the output back through the work dir descriptor
//! (symlink-proof, as for a cold run), and hand the cgroup to a reaper
//! thread that waits for its last process and removes it.
//!
//! Concurrent children of one server share its PID namespace, so each runs
//! under a uid of its own from [`FORK_UIDS`] (with /proc's `hidepid` and
//! distinct uids, a child can neither see nor signal another); a request
//! that asks for a specific uid runs cold instead. Those uids are host uids
//! of the server's block, so no two tasks running on the node share a uid
//! (nor a per-uid kernel limit), whichever server or cold sandbox runs them.
//!
//! Server starts are rationed ([`crate::start_limit`]): a start that the
//! node's or the key's token bucket refuses runs its request cold and stops
//! no other server. The CPU time of every start (its server cgroup's, until
//! ready or failed) is summed for the metrics.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, setsockopt, socketpair, sockopt,
};
use serde::Serialize;

use crate::capture::{Capped, drain_capped, over_cap};
use crate::cgroup::{CgroupLimits, TaskCgroup};
use crate::closer::{Deferred, dispose};
use crate::frame::{read_frame, write_frame};
use crate::launcher::{LAUNCHER_ARG, TASK_FOLLOWS, mono_ns};
use crate::seccomp;
use crate::spawn::{
    CancelToken, ReadBackResult, RunOutcome, RunRequest, Sandbox, SandboxError, Termination,
    cgroup_name, drain, etc_files, io, metas, nix_io, ns_delta, pidfd_open, poll_tags,
};
use crate::spec::{ExitStatus, IdRange, LaunchSpec, Report, RlimitSpec, SandboxFile};
use crate::start_limit::{StartLimit, StartLimiter};

/// The uids children of one fork server run as, one per concurrent child,
/// inside the server's user namespace (the host sees the server's block).
pub const FORK_UIDS: std::ops::RangeInclusive<u32> = 62000..=62063;

/// Host uids a fork server leases for its life: its own root, then one per
/// uid of [`FORK_UIDS`].
pub(crate) const SERVER_UIDS: u32 = 1 + (*FORK_UIDS.end() - *FORK_UIDS.start() + 1);

/// The fork-server program of each kind.
fn server_source(kind: &str) -> Option<&'static str> {
    match kind {
        "python" => Some(include_str!("../zygote/python_zygote.py")),
        _ => None,
    }
}

const SERVER_FILE: &str = "taskexec_zygote.py";
/// The child's filters: loaded while spare, and on hand-over.
const FILTER_FILE: &str = "seccomp-child.bpf";
const FINAL_FILTER_FILE: &str = "seccomp-child-final.bpf";
/// How long a new server may take to import its wrapper and say ready.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child may take to say hello and to finish its setup.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The fork servers of one executor, by key (kind, mounts, support files).
#[derive(Debug)]
pub(crate) struct ForkServers {
    sandbox: Arc<Sandbox>,
    servers: Mutex<HashMap<u64, Arc<Server>>>,
    /// Finished children go here: a thread waits for their last process
    /// and removes their cgroup. `None` once shut down.
    reaper: Mutex<Option<std::sync::mpsc::Sender<Spare>>>,
    reaper_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Threads of servers that died and left the map, for `shutdown`.
    retired: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Keys whose server failed to start, and when: their requests run
    /// cold without trying again for [`START_BACKOFF`] (a module of
    /// `definition.preload` that does not import would otherwise cost a
    /// server start per task).
    failed: Mutex<HashMap<u64, Instant>>,
    /// Servers that failed to start, since the beginning.
    start_failures: std::sync::atomic::AtomicU64,
    /// When a server is replaced by a fresh one.
    recycle: Recycle,
    /// Servers replaced so far for their age or runs.
    recycled: std::sync::atomic::AtomicU64,
    /// Keys whose first server is starting, without the servers' lock.
    starting: Mutex<HashMap<u64, Arc<Pending>>>,
    /// Which server starts may go ahead now ([`crate::start_limit`]).
    limiter: Mutex<StartLimiter>,
    /// Servers started so far (first starts and replacements).
    starts: std::sync::atomic::AtomicU64,
    /// Starts the limiter refused so far.
    starts_refused: std::sync::atomic::AtomicU64,
    /// CPU time of servers' starts so far, started or failed, in
    /// nanoseconds.
    start_cpu_nanos: Arc<std::sync::atomic::AtomicU64>,
}

/// A server start in progress, for the requests of its key that wait.
#[derive(Debug, Default)]
struct Pending {
    done: Mutex<bool>,
    ended: Condvar,
}

impl Pending {
    fn finish(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.ended.notify_all();
    }

    /// Until the start ends, or `limit`.
    fn wait(&self, limit: Duration) {
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
const MAX_SERVERS: usize = 8;

/// How long a key whose server failed to start runs cold before the next
/// try.
const START_BACKOFF: Duration = Duration::from_secs(30);

/// One running fork server.
#[derive(Debug)]
struct Server {
    key: u64,
    launcher: Mutex<std::process::Child>,
    launcher_pidfd: OwnedFd,
    /// Kept open: the launcher and the server's init report on it.
    _channel: UnixStream,
    control: Mutex<OwnedFd>,
    cgroup: Mutex<Box<dyn TaskCgroup>>,
    /// The host uids of the server's user namespace; its children's leases
    /// hold it too, so it goes back only once the last of their cgroups is
    /// empty.
    ids: Arc<crate::uids::UidLease>,
    /// Uids not lent now, least recently given back first.
    free_uids: Mutex<VecDeque<u32>>,
    log: Arc<Mutex<Vec<u8>>>,
    work_dir: String,
    spares: Mutex<VecDeque<Spare>>,
    refill: Condvar,
    in_flight: AtomicUsize,
    /// When a run last started here (for [`MAX_SERVERS`]' eviction).
    last_used: Mutex<Instant>,
    /// When it started, and the runs handed to it (for [`Recycle`]).
    started: Instant,
    runs: std::sync::atomic::AtomicU64,
    /// A request is starting this server's replacement ([`Recycle`]).
    replacing: AtomicBool,
    stopping: AtomicBool,
    refill_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The limits new spares get: the last task's.
    spare_limits: Mutex<CgroupLimits>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(mut l) = self.launcher.lock() {
            let _ = l.kill();
            let _ = l.wait();
        }
        if let Ok(cgroup) = self.cgroup.lock() {
            if cgroup.kill_all().is_err() {
                // Something of the server may live on: its ids are never
                // lent again.
                std::mem::forget(Arc::clone(&self.ids));
            }
            let _ = cgroup.remove();
        }
    }
}

/// Limits of a spare child's cgroup until a task sets its own (after the
/// first task, spares are made with the last task's limits, so a run of
/// alike tasks skips rewriting them).
const SPARE_LIMITS: CgroupLimits = CgroupLimits {
    memory_bytes: 64 << 20,
    pids: 16,
    cpu_request_millis: 100,
    cpu_limit_millis: None,
};

/// Spare children kept per server at most.
const MAX_SPARES: usize = 8;

/// A forked child, attached to its own cgroup, waiting for its spec.
#[derive(Debug)]
struct Spare {
    /// The limits its cgroup was made with.
    limits: CgroupLimits,
    /// Our end of the task channel. Once the task runs, its code can queue
    /// descriptors in it, and closing it closes them: it is closed on the
    /// closer thread ([`crate::closer`]).
    task: Deferred<UnixStream>,
    out_r: OwnedFd,
    err_r: OwnedFd,
    status_r: OwnedFd,
    cgroup: Box<dyn TaskCgroup>,
    /// The uid of the task it was given: back to the server only once
    /// every process of the task is gone.
    lease: Option<ChildUid>,
}

/// A uid of a server's pool, lent to one run. Given back when dropped:
/// by a run that never handed its task over, at once; by a run that did,
/// with its spare, after the spare's cgroup is empty, so no process of one
/// task can still be there when a later task gets the same uid. It keeps
/// the server's block of host uids leased meanwhile.
#[derive(Debug)]
struct ChildUid {
    server: Weak<Server>,
    uid: u32,
    _block: Arc<crate::uids::UidLease>,
}

impl Drop for ChildUid {
    fn drop(&mut self) {
        if let Some(server) = self.server.upgrade() {
            server.give_uid(self.uid);
        }
    }
}

impl Spare {
    /// Still alive and silent (a dead child's status pipe is readable).
    fn waiting(&self) -> bool {
        !wait_readable(&[self.status_r.as_fd(), self.task.as_fd()], Duration::ZERO)
            .map(|r| r[0] || r[1])
            .unwrap_or(true)
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        // An unused spare, or a finished run handed to the reaper: kill
        // what is left, wait until it is gone, remove the cgroup. Then its
        // uid goes back (the lease drops after this), unless something of
        // the task may have survived: that uid is then never lent again.
        if self.cgroup.kill_all().is_err()
            && let Some(lease) = self.lease.take()
        {
            std::mem::forget(lease);
        }
        let _ = self.cgroup.remove();
    }
}

/// Counts a run in flight while alive.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a request could not be served warm; the caller runs it cold.
#[derive(Debug)]
pub(crate) enum Fallback {
    /// Not a request a fork server can take.
    NotEligible,
    /// A request a fork server can take, but every uid of its server is
    /// taken by a run in flight.
    Busy,
    /// The server failed before the task was handed over.
    ServerFailed(SandboxError),
    /// The server of this kind of request failed to start a short while
    /// ago ([`START_BACKOFF`]); not tried again yet.
    StartBackoff,
    /// The request needs a server start and the start limiter
    /// ([`crate::start_limit`]) refused it.
    StartRefused,
}

fn key_of(kind: &str, req: &RunRequest) -> u64 {
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
fn preload_list(req: &RunRequest) -> Vec<&String> {
    let mut list: Vec<&String> = req.preload.iter().collect();
    list.sort();
    list.dedup();
    list
}

/// What the child needs of the request (the `spec frame` of the server's
/// protocol).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ChildSpec<'a> {
    uid: u32,
    gid: u32,
    argv: &'a [String],
    env: &'a [(String, String)],
    work_files: Vec<crate::spec::FileMeta>,
    disk_bytes: u64,
    disk_inodes: u64,
    stdin_path: Option<&'a str>,
    rlimits: RlimitSpec,
}

/// For each of `fds`, whether it is readable within `timeout`.
fn wait_readable(
    fds: &[std::os::fd::BorrowedFd<'_>],
    timeout: Duration,
) -> Result<Vec<bool>, SandboxError> {
    let watched: Vec<(i32, bool, std::os::fd::BorrowedFd<'_>)> =
        (0i32..).zip(fds).map(|(i, fd)| (i, true, *fd)).collect();
    let ready = poll_tags(&watched, None, timeout)?;
    Ok((0i32..)
        .take(fds.len())
        .map(|i| ready.contains(&i))
        .collect())
}

/// How long a finished run's cgroup waits for the reaper.
const REAP_DELAY: Duration = Duration::from_millis(10);

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
    fn may_start(&self, key: Option<u64>) -> bool {
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
    fn start(&self, key: u64, kind: &str, req: &RunRequest) -> Result<Arc<Server>, SandboxError> {
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

    fn forget(&self, server: &Arc<Server>) {
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
    fn retire(&self, server: &Server) {
        server.stop();
        let handle = server.refill_thread.lock().ok().and_then(|mut h| h.take());
        if let (Some(h), Ok(mut retired)) = (handle, self.retired.lock()) {
            retired.retain(|h| !h.is_finished());
            retired.push(h);
        }
    }

    fn server(&self, key: u64, kind: &str, req: &RunRequest) -> Result<Arc<Server>, Fallback> {
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
    fn recently_failed(&self, key: u64) -> bool {
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
    fn replace(
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
    fn start_failed(&self, key: u64) {
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

/// Starts a server on a thread of its own that then keeps its spare
/// children topped up (two more than the runs in flight, at most
/// [`MAX_SPARES`]) for as long as the server lives. The launcher must be
/// spawned by a thread that outlives it: its parent-death signal fires when
/// the spawning *thread* ends.
fn start_server(
    sandbox: Arc<Sandbox>,
    key: u64,
    kind: &str,
    req: &RunRequest,
    start_cpu_nanos: Arc<std::sync::atomic::AtomicU64>,
) -> Result<Arc<Server>, SandboxError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let (kind, req) = (kind.to_string(), req.clone());
    let handle = std::thread::Builder::new()
        .name("fork-server".into())
        .spawn(move || {
            let server = match Server::start(&sandbox, key, &kind, &req, &start_cpu_nanos) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let weak: Weak<Server> = Arc::downgrade(&server);
            if tx.send(Ok(server)).is_err() {
                return;
            }
            refill(&weak, &sandbox);
        })
        .map_err(io("starting the fork server's thread"))?;
    let server = rx
        .recv()
        .map_err(|_| SandboxError::Protocol("the fork server's thread ended".into()))??;
    if let Ok(mut h) = server.refill_thread.lock() {
        *h = Some(handle);
    }
    Ok(server)
}

/// The refill loop; returns when the server stops or is gone.
fn refill(weak: &Weak<Server>, sandbox: &Sandbox) {
    loop {
        let Some(server) = weak.upgrade() else {
            return;
        };
        if server.stopping.load(Ordering::SeqCst) {
            // The server's launcher dies with this thread (its parent-death
            // signal follows the thread that spawned it), and with it every
            // child of the server: a stopped server (recycled, evicted)
            // may still have runs in flight. Wait until ours is the last
            // reference, then drop it here, so the server's `Drop` (kill,
            // wait, remove the cgroup) runs on this thread, off the path of
            // the last run's answer.
            while Arc::strong_count(&server) > 1 {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(server);
            return;
        }
        // Two ahead: a spare's cgroup attach can wait out an RCU grace
        // period (cgroup v1), longer than a task takes.
        let target = (server.in_flight.load(Ordering::SeqCst) + 2).min(MAX_SPARES);
        let have = server.spares.lock().map(|s| s.len()).unwrap_or(MAX_SPARES);
        if have < target {
            match server.make_spare(sandbox) {
                Ok(spare) => {
                    if let Ok(mut spares) = server.spares.lock() {
                        spares.push_back(spare);
                    }
                }
                Err(_) if !server.alive() => return,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
            continue;
        }
        let guard = server.spares.lock().unwrap_or_else(|p| p.into_inner());
        let _ = server.refill.wait_timeout(guard, Duration::from_secs(1));
    }
}

impl Server {
    /// Marks the server used now.
    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    fn last_used(&self) -> Instant {
        self.last_used
            .lock()
            .map(|t| *t)
            .unwrap_or_else(|_| Instant::now())
    }

    /// Stops the refill thread and drops the spare children.
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.refill.notify_all();
        if let Ok(mut spares) = self.spares.lock() {
            spares.clear();
        }
    }

    fn alive(&self) -> bool {
        !wait_readable(&[self.launcher_pidfd.as_fd()], Duration::ZERO)
            .map(|r| r[0])
            .unwrap_or(true)
    }

    fn take_uid(&self) -> Option<u32> {
        self.free_uids.lock().ok()?.pop_front()
    }

    fn give_uid(&self, uid: u32) {
        if let Ok(mut free) = self.free_uids.lock()
            && !free.contains(&uid)
        {
            free.push_back(uid);
        }
    }

    /// Starts a server for requests like `req`, and adds the CPU time its
    /// processes spent until it was ready (or failed) to `start_cpu_nanos`.
    fn start(
        sandbox: &Sandbox,
        key: u64,
        kind: &str,
        req: &RunRequest,
        start_cpu_nanos: &std::sync::atomic::AtomicU64,
    ) -> Result<Self, SandboxError> {
        let source = server_source(kind).ok_or_else(|| SandboxError::Setup {
            stage: "fork server".into(),
            message: format!("no fork server of kind {kind}"),
        })?;
        let config = &sandbox.config;
        let wrapper_file = req
            .support_files
            .first()
            .ok_or_else(|| SandboxError::Protocol("a fork-server request has no wrapper".into()))?;
        let wrapper = format!("{}/{}", config.support_dir, wrapper_file.path);
        let seccomp_err = |e: seccomp::SeccompError| SandboxError::Setup {
            stage: "seccomp".into(),
            message: e.to_string(),
        };
        let filters =
            seccomp::build_filters_for(seccomp::Profile::ForkChild).map_err(seccomp_err)?;
        let final_filter = seccomp::build_mount_filter().map_err(seccomp_err)?;
        let mut support: Vec<SandboxFile> = req.support_files.clone();
        support.push(SandboxFile {
            path: SERVER_FILE.into(),
            content: source.as_bytes().to_vec(),
            executable: false,
        });
        support.push(SandboxFile {
            path: FILTER_FILE.into(),
            content: seccomp::to_bytes(&filters),
            executable: false,
        });
        support.push(SandboxFile {
            path: FINAL_FILTER_FILE.into(),
            content: seccomp::to_bytes(&[final_filter]),
            executable: false,
        });
        // The server's host uids: its root, then its children's.
        let ids = sandbox
            .uids
            .lease(SERVER_UIDS)
            .ok_or_else(|| SandboxError::Setup {
                stage: "uids".into(),
                message: format!(
                    "no block of {SERVER_UIDS} free task uids in {} for a fork server",
                    config.task_uids
                ),
            })?;
        let userns = vec![
            IdRange {
                inside: 0,
                outside: ids.first(),
                count: 1,
            },
            IdRange {
                inside: *FORK_UIDS.start(),
                outside: ids.first() + 1,
                count: SERVER_UIDS - 1,
            },
        ];
        // The host id of the server's first child uid: what the launcher
        // gives the (unused) work dir of the server's own sandbox.
        let first_child = ids.first() + 1;
        // /etc/passwd names every uid a child may get.
        let mut etc = etc_files(*FORK_UIDS.start(), *FORK_UIDS.start(), &config.hostname);
        etc[0].content = std::iter::once("root:x:0:0:root:/root:/bin/false\n".to_string())
            .chain(FORK_UIDS.map(|u| format!("sandbox:x:{u}:{u}:sandbox:/task:/bin/false\n")))
            .collect::<String>()
            .into_bytes();
        etc[1].content = std::iter::once("root:x:0:\n".to_string())
            .chain(FORK_UIDS.map(|u| format!("sandbox:x:{u}:\n")))
            .collect::<String>()
            .into_bytes();
        let interpreter = req
            .argv
            .first()
            .ok_or_else(|| SandboxError::Protocol("empty argv".into()))?;
        // Only the variables the executor itself sets for every task, never
        // the first request's own: the server's initial environment block
        // stays on its stack, and so in every child it forks, where any
        // later task could read it.
        let env: Vec<(String, String)> = req
            .env
            .iter()
            .filter(|(k, _)| matches!(k.as_str(), "PATH" | "HOME" | "LANG"))
            .cloned()
            .collect();
        let spec = LaunchSpec {
            hostname: config.hostname.clone(),
            uid: first_child,
            gid: first_child,
            argv: vec![
                interpreter.clone(),
                "-E".into(),
                "-s".into(),
                "-B".into(),
                "-u".into(),
                format!("{}/{SERVER_FILE}", config.support_dir),
                wrapper.clone(),
                format!("{}/{FILTER_FILE}", config.support_dir),
                format!("{}/{FINAL_FILTER_FILE}", config.support_dir),
            ]
            .into_iter()
            .chain(preload_list(req).into_iter().cloned())
            .collect(),
            env,
            ro_mounts: req.ro_mounts.clone(),
            work_files: Vec::new(),
            support_files: metas(&support),
            etc_files: metas(&etc),
            work_dir: config.work_dir.clone(),
            support_dir: config.support_dir.clone(),
            disk_bytes: 1 << 20,
            disk_inodes: 1024,
            stdin_path: None,
            rlimits: RlimitSpec {
                nofile: 4096,
                fsize: 1 << 30,
                cpu_seconds: None,
                stack: 8 << 20,
            },
            read_back: Vec::new(),
            read_back_cap: 0,
            collect_dir: None,
            collect_cap: 0,
            share_network: false,
            fork_server: true,
            userns,
            self_join: Vec::new(),
            task_join: None,
        };
        let blobs: Vec<&[u8]> = support
            .iter()
            .chain(&etc)
            .map(|f| f.content.as_slice())
            .collect();

        let cgroup = sandbox.cgroups.create(
            &cgroup_name(),
            &CgroupLimits {
                memory_bytes: 512 << 20,
                pids: 1024,
                cpu_request_millis: 1000,
                cpu_limit_millis: None,
            },
        )?;
        let (ours, theirs) = UnixStream::pair().map_err(io("socketpair"))?;
        let (control, control_theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(nix_io("socketpair"))?;
        let (log_r, log_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(nix_io("pipe"))?;
        let mut cmd = Command::new(&config.launcher.program);
        cmd.arg(LAUNCHER_ARG)
            .arg(std::process::id().to_string())
            .env_clear()
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::from(control_theirs))
            .stderr(Stdio::from(log_w))
            .current_dir("/");
        let child = cmd
            .spawn()
            .map_err(io("spawning the fork server's launcher"))?;
        let launcher_pidfd = pidfd_open(child.id()).map_err(io("pidfd_open"))?;
        let server = Server {
            key,
            launcher: Mutex::new(child),
            launcher_pidfd,
            _channel: ours,
            control: Mutex::new(control),
            cgroup: Mutex::new(cgroup),
            ids: Arc::new(ids),
            free_uids: Mutex::new(FORK_UIDS.collect()),
            log: Arc::new(Mutex::new(Vec::new())),
            work_dir: config.work_dir.clone(),
            spares: Mutex::new(VecDeque::new()),
            refill: Condvar::new(),
            in_flight: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            started: Instant::now(),
            runs: std::sync::atomic::AtomicU64::new(0),
            replacing: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            refill_thread: Mutex::new(None),
            spare_limits: Mutex::new(SPARE_LIMITS),
        };
        // The server's log: kept (capped) for error messages.
        let log = Arc::clone(&server.log);
        std::thread::Builder::new()
            .name("fork-server-log".into())
            .spawn(move || {
                let mut f = std::fs::File::from(log_r);
                let mut buf = [0u8; 4096];
                while let Ok(n) = f.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut l) = log.lock() {
                        // Keep the last 16 KiB.
                        l.extend_from_slice(&buf[..n]);
                        let excess = l.len().saturating_sub(16 << 10);
                        l.drain(..excess);
                    }
                }
            })
            .map_err(io("starting the fork server's log thread"))?;

        let mut w = &server._channel;
        // The launcher's two frames: the sandbox's shape, then the "task"
        // (the server itself, with no work files).
        write_frame(&mut w, &spec.base(), &blobs)
            .and_then(|()| w.write_all(&[TASK_FOLLOWS]))
            .and_then(|()| write_frame(&mut w, &spec, &[]))
            .map_err(io("sending the fork server's spec"))?;
        let pid = server.launcher.lock().map(|l| l.id()).unwrap_or(0);
        server
            .cgroup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attach(pid as i32)?;
        w.write_all(b"g").map_err(io("starting the fork server"))?;
        let ready = server.await_ready();
        // The launcher joined the server's cgroup before it built anything
        // and the server forks no spare before it is ready: the cgroup's
        // CPU time is the start's (a failed start's launcher is killed by
        // now, so its time is all there too).
        let cpu = server
            .cgroup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cpu_time();
        if let Ok(cpu) = cpu {
            let nanos = u64::try_from(cpu.as_nanos()).unwrap_or(u64::MAX);
            start_cpu_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
        ready?;
        Ok(server)
    }

    /// Waits for the server's `R` (or its launcher's failure report).
    fn await_ready(&self) -> Result<(), SandboxError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.failed("did not start in time"));
            }
            let ready = wait_readable(&[control.as_fd(), self.launcher_pidfd.as_fd()], left)?;
            if ready[0] {
                let mut b = [0u8; 1];
                return match nix::unistd::read(&*control, &mut b) {
                    Ok(1) if b[0] == b'R' => Ok(()),
                    _ => Err(self.failed("ended before it was ready")),
                };
            }
            if ready[1] {
                return Err(self.failed("ended before it was ready"));
            }
        }
    }

    /// A setup error with what the launcher reported and the server logged.
    fn failed(&self, what: &str) -> SandboxError {
        let _ = self.launcher.lock().map(|mut l| l.kill());
        let mut message = format!("the fork server {what}");
        let mut channel = &self._channel;
        let _ = channel.set_nonblocking(true);
        let mut bytes = Vec::new();
        let _ = channel.read_to_end(&mut bytes);
        let mut cursor = &bytes[..];
        while let Ok(Some((report, _))) = read_frame::<_, Report>(&mut cursor) {
            if let Report::SetupFailed { stage, message: m } = report {
                message.push_str(&format!("; setup failed at {stage}: {m}"));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(log) = self.log.lock() {
            let tail = String::from_utf8_lossy(&log).trim().to_string();
            if !tail.is_empty() {
                message.push_str(&format!("; its log: {tail}"));
            }
        }
        SandboxError::Setup {
            stage: "fork server".into(),
            message,
        }
    }

    /// Forks a child in a cgroup of its own: a spare, ready for any task.
    /// Made ahead of time by the refill thread, so the fork and the cgroup
    /// are off the task's path. On cgroup v1 the child moves itself into
    /// the cgroup (`0` into the `tasks` files it gets with the request,
    /// see [`TaskCgroup::self_join_files`]) before it says hello; otherwise
    /// we move it by the pid its hello carries.
    fn make_spare(&self, sandbox: &Sandbox) -> Result<Spare, SandboxError> {
        let cloexec = OFlag::O_CLOEXEC;
        let (task, task_theirs) = UnixStream::pair().map_err(io("socketpair"))?;
        setsockopt(&task, sockopt::PassCred, &true).map_err(nix_io("SO_PASSCRED"))?;
        let (out_r, out_w) = nix::unistd::pipe2(cloexec).map_err(nix_io("pipe"))?;
        let (err_r, err_w) = nix::unistd::pipe2(cloexec).map_err(nix_io("pipe"))?;
        let (status_r, status_w) = nix::unistd::pipe2(cloexec).map_err(nix_io("pipe"))?;
        // Spare limits until a task sets its own. From here on a failure
        // drops the spare, which removes its cgroup.
        let limits = *self.spare_limits.lock().unwrap_or_else(|p| p.into_inner());
        let spare = Spare {
            limits,
            task: Deferred::new(task),
            out_r,
            err_r,
            status_r,
            cgroup: sandbox.cgroups.create(&cgroup_name(), &limits)?,
            lease: None,
        };
        let join: Vec<std::fs::File> = spare
            .cgroup
            .self_join_files()
            .iter()
            .map(|p| std::fs::OpenOptions::new().write(true).open(p))
            .collect::<Result<_, _>>()
            .map_err(io("opening the cgroup's tasks files"))?;
        let moves_itself = !join.is_empty();
        {
            let control = self.control.lock().unwrap_or_else(|p| p.into_inner());
            let mut fds: Vec<RawFd> = vec![
                task_theirs.as_raw_fd(),
                out_w.as_raw_fd(),
                err_w.as_raw_fd(),
                status_w.as_raw_fd(),
            ];
            fds.extend(join.iter().map(|f| f.as_raw_fd()));
            let request = format!("{{\"join\":{}}}", join.len());
            sendmsg::<()>(
                control.as_raw_fd(),
                &[IoSlice::new(request.as_bytes())],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(nix_io("sending a request to the fork server"))?;
        }
        drop((task_theirs, out_w, err_w, status_w, join));
        // Hello: the child's pid (and, on v1, the child in its cgroup).
        let (msg, pid) = recv_with_creds(&spare.task, &spare.status_r, STEP_TIMEOUT)?;
        if msg.first() != Some(&b'h') {
            return Err(self.failed("child did not say hello"));
        }
        let pid = pid.ok_or_else(|| SandboxError::Protocol("hello without credentials".into()))?;
        if !moves_itself {
            spare.cgroup.attach(pid)?;
        }
        // In its cgroup: the child builds its namespaces and mounts now,
        // ahead of any task.
        (&*spare.task)
            .write_all(b"p")
            .map_err(io("preparing a fork-server child"))?;
        Ok(spare)
    }

    /// A spare child: a ready one if there is one, else a fresh one.
    fn take_spare(&self, sandbox: &Sandbox) -> Result<Spare, SandboxError> {
        loop {
            let next = self
                .spares
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            self.refill.notify_one();
            match next {
                Some(spare) if spare.waiting() => return Ok(spare),
                Some(_dead) => continue,
                None => return self.make_spare(sandbox),
            }
        }
    }

    /// Runs one request in a child running as `uid`. The outer `Err` means
    /// the task was never handed over (run it cold); the inner result is the
    /// run's.
    fn run(
        &self,
        sandbox: &Sandbox,
        req: &RunRequest,
        cancel: Option<&CancelToken>,
        lease: ChildUid,
        reaper: &std::sync::mpsc::Sender<Spare>,
    ) -> Result<Result<RunOutcome, SandboxError>, SandboxError> {
        let t0 = Instant::now();
        let t0_mono = mono_ns();
        let limits = &req.limits;
        let mut phases: Vec<(&'static str, Duration)> = Vec::new();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight(&self.in_flight);
        let mut spare = self.take_spare(sandbox)?;
        let uid = lease.uid;
        spare.lease = Some(lease);
        phases.push(("takeChild", t0.elapsed()));
        let t_limits = Instant::now();
        let task_limits = CgroupLimits {
            memory_bytes: limits.memory_bytes,
            pids: limits.pids,
            cpu_request_millis: limits.cpu_request_millis,
            cpu_limit_millis: limits.cpu_limit_millis,
        };
        if spare.limits != task_limits {
            spare.cgroup.set_limits(&task_limits)?;
            *self.spare_limits.lock().unwrap_or_else(|p| p.into_inner()) = task_limits;
        }
        // The CPU the idle child used is not the task's.
        let cpu_base = spare.cgroup.cpu_time().unwrap_or_default();
        phases.push(("cgroupLimits", t_limits.elapsed()));

        // The spec; from here on the task is handed over.
        let spec = ChildSpec {
            uid,
            gid: uid,
            argv: &req.argv,
            env: &req.env,
            work_files: metas(&req.work_files),
            disk_bytes: limits.disk_bytes,
            disk_inodes: (limits.disk_bytes / 4096).clamp(1024, 1 << 20),
            stdin_path: req.stdin_path.as_deref(),
            rlimits: RlimitSpec {
                nofile: limits.nofile,
                fsize: limits.disk_bytes,
                cpu_seconds: limits.cpu_time.map(|d| d.as_secs_f64().ceil() as u64 + 1),
                stack: 8 << 20,
            },
        };
        let blobs: Vec<&[u8]> = req
            .work_files
            .iter()
            .map(|f| f.content.as_slice())
            .collect();
        let t_spec = Instant::now();
        let sent = write_frame(&mut &*spare.task, &spec, &blobs);
        // Whether the task's code may have run: `m` received, or the run
        // was stopped (cancel, limits) and its verdict stands.
        let mut started = false;
        let result = self.watch(
            req,
            cancel,
            &spare,
            &mut phases,
            (t0, t0_mono, t_spec),
            sent,
            &mut started,
        );
        let t_clean = Instant::now();
        let stats = spare.cgroup.stats();
        // Waiting for the last process to be gone and removing the cgroup
        // happen off the task's path; a run whose task was never handed
        // over keeps it synchronous (the caller runs the task cold next).
        if started {
            if let Err(std::sync::mpsc::SendError(spare)) = reaper.send(spare) {
                drop(spare);
            }
        } else {
            drop(spare);
        }
        phases.push(("cleanup", t_clean.elapsed()));
        let finish = (|| {
            let mut outcome = result?;
            outcome.stats = stats?;
            outcome.stats.cpu_time = outcome.stats.cpu_time.saturating_sub(cpu_base);
            outcome.wall_time = t0.elapsed();
            outcome.phases = phases;
            Ok::<_, SandboxError>(outcome)
        })();
        match finish {
            // The child died before the task's code could start (its server
            // was killed, say): nothing of the task ran, so it may run cold.
            Err(e) if !started => Err(e),
            other => Ok(other),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn watch(
        &self,
        req: &RunRequest,
        cancel: Option<&CancelToken>,
        spare: &Spare,
        phases: &mut Vec<(&'static str, Duration)>,
        (t0, t0_mono, t_spec): (Instant, u64, Instant),
        sent: std::io::Result<()>,
        started: &mut bool,
    ) -> Result<RunOutcome, SandboxError> {
        let Spare {
            task,
            out_r,
            err_r,
            status_r,
            cgroup,
            ..
        } = spare;
        let cgroup = cgroup.as_ref();
        let limits = &req.limits;
        let deadline = t0 + limits.timeout;
        for fd in [out_r, err_r, status_r] {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .map_err(nix_io("fcntl"))?;
        }
        task.set_nonblocking(true).map_err(io("fcntl"))?;
        let mut stdout = Capped::new(limits.output_bytes);
        let mut stderr = Capped::new(limits.output_bytes);
        let mut status_bytes = Vec::new();
        let mut task_bytes = Vec::new();
        let mut work_dir: Option<OwnedFd> = None;
        let (mut out_open, mut err_open, mut status_open, mut task_open) = (true, true, true, true);
        let mut killed: Option<Termination> = None;
        let mut started_mono: Option<u64> = None;
        let mut exited_mono: Option<u64> = None;
        let cpu_poll = limits
            .cpu_time
            .map(|c| (c / 20).clamp(Duration::from_millis(5), Duration::from_millis(100)));
        let mut drain_deadline: Option<Instant> = None;
        // The child's last words ("x<code>", sent as it calls _exit): the
        // result is known before its exit and its server's report.
        let mut last_words: Vec<u8> = Vec::new();
        let mut early: Option<ExitStatus> = None;
        if sent.is_err() {
            // The child is gone already; its status says why.
            task_open = false;
        }
        loop {
            let now = Instant::now();
            if early.is_some() && killed.is_none() {
                // Its output is flushed; kill the rest of the task without
                // waiting for its exit (the reaper makes sure later), take
                // what the pipes hold, and stop.
                exited_mono = Some(mono_ns());
                cgroup.signal_all()?;
                drain(out_r, |d| stdout.push(d));
                drain(err_r, |d| stderr.push(d));
                break;
            }
            if !status_open {
                if exited_mono.is_none() {
                    exited_mono = Some(mono_ns());
                    // The main process ended: nothing else of the task may
                    // outlive it (daemons included).
                    cgroup.kill_all()?;
                }
                if !(out_open || err_open || task_open) {
                    break;
                }
                let d = *drain_deadline.get_or_insert(now + Duration::from_millis(500));
                if now >= d {
                    break;
                }
            }
            if killed.is_none() && status_open {
                let reason = if cancel.is_some_and(CancelToken::is_cancelled) {
                    Some(Termination::Cancelled)
                } else if let Some(stream) = over_cap(&stdout, &stderr) {
                    Some(Termination::OutputCapped(stream))
                } else if now >= deadline {
                    Some(Termination::TimedOut)
                } else if let Some(limit) = limits.cpu_time {
                    (cgroup.cpu_time()? > limit).then_some(Termination::CpuTimeExceeded)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    killed = Some(reason);
                    *started = true;
                    cgroup.kill_all()?;
                }
            }
            let mut wait = if killed.is_some() || !status_open {
                Duration::from_millis(50)
            } else {
                deadline.saturating_duration_since(now)
            };
            if let Some(p) = cpu_poll {
                wait = wait.min(p);
            }
            let ready = poll_tags(
                &[
                    (0, status_open, status_r.as_fd()),
                    (1, out_open, out_r.as_fd()),
                    (2, err_open, err_r.as_fd()),
                    (3, task_open, task.as_fd()),
                ],
                cancel.filter(|_| killed.is_none()),
                wait,
            )?;
            for tag in ready {
                match tag {
                    0 => status_open = drain(status_r, |d| status_bytes.extend_from_slice(d)),
                    1 => out_open = drain_capped(out_r, &mut stdout),
                    2 => err_open = drain_capped(err_r, &mut stderr),
                    // Once the task runs, its code holds the other end:
                    // we only peek there (below), and never receive.
                    3 if started_mono.is_some() => match peek_last_words(task, &last_words) {
                        Peeked::Words(status) => early = Some(status),
                        Peeked::Nothing => {}
                        // Anything else (junk, the end): the exit status
                        // comes from the server's report.
                        Peeked::Other => task_open = false,
                    },
                    3 => loop {
                        match recv_message(task) {
                            Ok(Some((bytes, fd))) => {
                                // Our own code's messages: `m` with the
                                // work dir, or `E` with a setup error.
                                if work_dir.is_none() {
                                    work_dir = fd;
                                } else {
                                    dispose(fd);
                                }
                                if bytes.first() == Some(&b'm') && bytes.len() >= 9 {
                                    let stamp = <[u8; 8]>::try_from(&bytes[1..9])
                                        .map(u64::from_le_bytes)
                                        .unwrap_or_else(|_| mono_ns());
                                    started_mono = Some(stamp);
                                    *started = true;
                                    phases.push(("setup", t_spec.elapsed()));
                                    // Bytes past `m` in the same read are the
                                    // start of the last words.
                                    last_words = bytes[9..].to_vec();
                                    if !last_words.is_empty() {
                                        early = parse_last_words(&last_words);
                                        task_open = early.is_none() && last_words.len() <= 32;
                                    }
                                    break;
                                }
                                if task_bytes.len() < 64 << 10 {
                                    task_bytes.extend_from_slice(&bytes);
                                }
                            }
                            Ok(None) => {
                                task_open = false;
                                break;
                            }
                            Err(nix::errno::Errno::EAGAIN) => break,
                            Err(nix::errno::Errno::EINTR) => continue,
                            Err(_) => {
                                task_open = false;
                                break;
                            }
                        }
                    },
                    _ => {}
                }
            }
        }
        let exited_mono = exited_mono.unwrap_or_else(mono_ns);
        // A stream that went past its cap as the task ended: the same
        // verdict as when it is caught running.
        if killed.is_none() {
            killed = over_cap(&stdout, &stderr).map(Termination::OutputCapped);
            if killed.is_some() {
                *started = true;
                cgroup.kill_all()?;
            }
        }
        if killed.is_none() && task_bytes.first() == Some(&b'E') {
            return Err(SandboxError::Setup {
                stage: "fork server child".into(),
                message: String::from_utf8_lossy(&task_bytes[1..]).into_owned(),
            });
        }
        let status = early.or_else(|| parse_status(&status_bytes));
        if killed.is_none() && (status.is_none() || started_mono.is_none()) {
            let log = self
                .log
                .lock()
                .map(|l| String::from_utf8_lossy(&l).trim().to_string())
                .unwrap_or_default();
            return Err(SandboxError::Protocol(format!(
                "the fork-server child ended (status {:?}) without starting the task; server log: {log}",
                String::from_utf8_lossy(&status_bytes)
            )));
        }
        let mut outcome = RunOutcome::captured(
            killed.unwrap_or(Termination::Cancelled),
            stdout,
            stderr,
            t0,
            started_mono
                .map(|s| ns_delta(t0_mono, s))
                .unwrap_or_default(),
        );
        outcome.run_time = started_mono
            .map(|s| ns_delta(s, exited_mono))
            .unwrap_or_default();
        phases.push(("run", outcome.run_time));
        if killed.is_some() {
            return Ok(outcome);
        }
        outcome.termination = Termination::Exited(status.unwrap_or(ExitStatus::Code(125)));
        let t_read = Instant::now();
        let work = work_dir.ok_or_else(|| {
            SandboxError::Protocol("no work dir from the fork-server child".into())
        })?;
        for path in &req.read_back {
            let rel = path
                .strip_prefix(self.work_dir.as_str())
                .map(|p| p.trim_start_matches('/'))
                .ok_or_else(|| SandboxError::Protocol(format!("{path} is outside the work dir")))?;
            outcome.read_back.push(
                match crate::fsread::read_capped(&work, rel, limits.output_bytes) {
                    Ok((data, truncated)) => ReadBackResult::Read { data, truncated },
                    Err(crate::fsread::ReadError::Missing) => ReadBackResult::Missing,
                    Err(e) => ReadBackResult::Refused {
                        reason: e.to_string(),
                    },
                },
            );
        }
        outcome.disk_full = nix::sys::statvfs::fstatvfs(&work)
            .map(|s| s.blocks_available() == 0 || s.files_available() == 0)
            .unwrap_or(false);
        phases.push(("teardown", t_read.elapsed()));
        Ok(outcome)
    }
}

/// The child's last words: `x` and its exit code in decimal, exactly.
fn parse_last_words(bytes: &[u8]) -> Option<ExitStatus> {
    let digits = bytes.strip_prefix(b"x")?;
    if digits.is_empty() || digits.len() > 3 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code: i32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (code <= 255).then_some(ExitStatus::Code(code))
}

fn parse_status(bytes: &[u8]) -> Option<ExitStatus> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (kind, num) = text.split_at_checked(1)?;
    let n: i32 = num.parse().ok()?;
    match kind {
        "e" => Some(ExitStatus::Code(n)),
        "s" => Some(ExitStatus::Signal(n)),
        _ => None,
    }
}

/// Receives one message with its credentials, waiting at most `timeout`
/// (and giving up early when the status pipe says the child has ended).
fn recv_with_creds(
    task: &UnixStream,
    status_r: &OwnedFd,
    timeout: Duration,
) -> Result<(Vec<u8>, Option<i32>), SandboxError> {
    let ready = wait_readable(&[task.as_fd(), status_r.as_fd()], timeout)?;
    if !ready[0] {
        return Err(SandboxError::Protocol(if ready[1] {
            "the fork-server child ended before its hello".into()
        } else {
            "no hello from the fork-server child in time".into()
        }));
    }
    let (bytes, pid, _fds) = receive(task, MsgFlags::empty()).map_err(nix_io("recvmsg"))?;
    Ok((bytes, pid))
}

/// One message of the task socket: its bytes, the sender's pid (with
/// `SO_PASSCRED`) and the descriptors it carried.
fn receive(
    task: &UnixStream,
    flags: MsgFlags,
) -> nix::Result<(Vec<u8>, Option<i32>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 65536];
    let mut iov = [IoSliceMut::new(&mut buf)];
    // Room for the most descriptors one message can carry (`SCM_MAX_FD`):
    // the kernel never drops (and so closes, on this thread) any of them
    // for lack of room, and each arrives close-on-exec.
    let mut space = nix::cmsg_space!(libc::ucred, [RawFd; 253]);
    let msg = recvmsg::<()>(
        task.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    )?;
    let mut pid = None;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
            ControlMessageOwned::ScmRights(raw_fds) => {
                for raw in raw_fds {
                    // SAFETY: the kernel just installed `raw` in our table
                    // for this message; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            _ => {}
        }
    }
    let n = msg.bytes;
    Ok((buf[..n].to_vec(), pid, fds))
}

/// One nonblocking receive: `Ok(None)` at end of stream; of the
/// descriptors a message carried, the first is kept (the others go to the
/// closer thread). Only while our own code holds the child's end.
fn recv_message(task: &UnixStream) -> nix::Result<Option<(Vec<u8>, Option<OwnedFd>)>> {
    let (bytes, _pid, fds) = receive(task, MsgFlags::MSG_DONTWAIT)?;
    if bytes.is_empty() && fds.is_empty() {
        return Ok(None);
    }
    let mut fds = fds.into_iter();
    let first = fds.next();
    let rest: Vec<OwnedFd> = fds.collect();
    if !rest.is_empty() {
        dispose(rest);
    }
    Ok(Some((bytes, first)))
}

/// What the head of a started task's channel holds.
#[derive(Debug, PartialEq, Eq)]
enum Peeked {
    /// Well-formed last words (after `before`, the bytes read with `m`).
    Words(ExitStatus),
    /// Nothing yet.
    Nothing,
    /// Anything else, or the end of the stream.
    Other,
}

/// Looks at the head of the channel once the task's code holds its other
/// end, without taking anything off it: a peek with no room for control
/// messages installs no descriptor in our table and closes none (the
/// queue keeps its own references), so nothing the task queued is ever
/// closed, or waited for, on the thread that enforces its limits. The
/// queue goes with the socket, on the closer thread.
fn peek_last_words(task: &UnixStream, before: &[u8]) -> Peeked {
    let mut buf = [0u8; 33];
    let n = loop {
        match nix::sys::socket::recv(
            task.as_raw_fd(),
            &mut buf,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Peeked::Nothing,
            Err(_) => return Peeked::Other,
        }
    };
    if n == 0 {
        return Peeked::Other;
    }
    let words: Vec<u8> = before.iter().chain(&buf[..n]).copied().collect();
    match parse_last_words(&words) {
        Some(status) => Peeked::Words(status),
        None => Peeked::Other,
    }
}
