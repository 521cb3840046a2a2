//! One fork-server process: its start in a sandbox of its own (launcher,
//! user namespace, cgroup, log), its readiness, and its stop.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use super::registry::preload_list;
use super::spare::{SPARE_LIMITS, Spare, refill};
use super::wire::wait_readable;
use crate::cgroup::{CgroupLimits, TaskCgroup};
use crate::frame::{read_frame, write_frame};
use crate::launcher::TASK_FOLLOWS;
use crate::seccomp;
use crate::spawn::{
    RunRequest, Sandbox, SandboxError, cgroup_name, etc_files, io, metas, nix_io, spawn_launcher,
};
use crate::spec::{IdRange, LaunchSpec, Report, RlimitSpec, SandboxFile};

use super::{FORK_UIDS, SERVER_UIDS};

/// The fork-server program of each kind.
pub(super) fn server_source(kind: &str) -> Option<&'static str> {
    match kind {
        "python" => Some(include_str!("../../zygote/python_zygote.py")),
        _ => None,
    }
}

pub(super) const SERVER_FILE: &str = "taskexec_zygote.py";
/// The child's filters: loaded while spare, and on hand-over.
pub(super) const FILTER_FILE: &str = "seccomp-child.bpf";
pub(super) const FINAL_FILTER_FILE: &str = "seccomp-child-final.bpf";
/// How long a new server may take to import its wrapper and say ready.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child may take to say hello and to finish its setup.
pub(super) const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// One running fork server.
#[derive(Debug)]
pub(super) struct Server {
    pub(super) key: u64,
    pub(super) launcher: Mutex<std::process::Child>,
    pub(super) launcher_pidfd: OwnedFd,
    /// Kept open: the launcher and the server's init report on it.
    pub(super) _channel: UnixStream,
    pub(super) control: Mutex<OwnedFd>,
    pub(super) cgroup: Mutex<Box<dyn TaskCgroup>>,
    /// The host uids of the server's user namespace; its children's leases
    /// hold it too, so it goes back only once the last of their cgroups is
    /// empty.
    pub(super) ids: Arc<crate::uids::UidLease>,
    /// Uids not lent now, least recently given back first.
    pub(super) free_uids: Mutex<VecDeque<u32>>,
    pub(super) log: Arc<Mutex<Vec<u8>>>,
    pub(super) work_dir: String,
    pub(super) spares: Mutex<VecDeque<Spare>>,
    pub(super) refill: Condvar,
    pub(super) in_flight: AtomicUsize,
    /// When a run last started here (for [`super::registry::MAX_SERVERS`]' eviction).
    pub(super) last_used: Mutex<Instant>,
    /// When it started, and the runs handed to it (for [`super::Recycle`]).
    pub(super) started: Instant,
    pub(super) runs: std::sync::atomic::AtomicU64,
    /// A request is starting this server's replacement ([`super::Recycle`]).
    pub(super) replacing: AtomicBool,
    pub(super) stopping: AtomicBool,
    pub(super) refill_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The limits new spares get: the last task's.
    pub(super) spare_limits: Mutex<CgroupLimits>,
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

/// children topped up (two more than the runs in flight, at most
/// [`super::spare::MAX_SPARES`]) for as long as the server lives. The launcher must be
/// spawned by a thread that outlives it: its parent-death signal fires when
/// the spawning *thread* ends.
pub(super) fn start_server(
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

impl Server {
    /// Marks the server used now.
    pub(super) fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    pub(super) fn last_used(&self) -> Instant {
        self.last_used
            .lock()
            .map(|t| *t)
            .unwrap_or_else(|_| Instant::now())
    }

    /// Stops the refill thread and drops the spare children.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.refill.notify_all();
        if let Ok(mut spares) = self.spares.lock() {
            spares.clear();
        }
    }

    pub(super) fn alive(&self) -> bool {
        !wait_readable(&[self.launcher_pidfd.as_fd()], Duration::ZERO)
            .map(|r| r[0])
            .unwrap_or(true)
    }

    pub(super) fn take_uid(&self) -> Option<u32> {
        self.free_uids.lock().ok()?.pop_front()
    }

    pub(super) fn give_uid(&self, uid: u32) {
        if let Ok(mut free) = self.free_uids.lock()
            && !free.contains(&uid)
        {
            free.push_back(uid);
        }
    }

    /// Starts a server for requests like `req`, and adds the CPU time its
    /// processes spent until it was ready (or failed) to `start_cpu_nanos`.
    pub(super) fn start(
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
        let (child, launcher_pidfd) = spawn_launcher(
            &config.launcher.program,
            OwnedFd::from(theirs),
            control_theirs,
            log_w,
            "spawning the fork server's launcher",
        )?;
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
        #[allow(clippy::cast_possible_wrap, reason = "a pid is at most pid_max, 2^22")]
        let pid = pid as i32;
        server
            .cgroup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attach(pid)?;
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
    pub(super) fn await_ready(&self) -> Result<(), SandboxError> {
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
    pub(super) fn failed(&self, what: &str) -> SandboxError {
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
}
