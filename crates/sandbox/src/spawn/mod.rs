//! The executor's side of a sandbox run: create the task cgroup, spawn the
//! launcher ([`mod@launch`]), attach it, hand it the spec, then watch the run
//! in one poll loop ([`mod@watch`]) and clean up whatever happens. What a run
//! is asked to do and what it gives back is in [`mod@request`].

mod launch;
mod request;
mod watch;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;

use launch::Launcher;
pub(crate) use launch::{Handed, Prepared, pidfd_open, spawn_launcher, watch};
pub use request::{
    CancelToken, LauncherCommand, ReadBackResult, RunOutcome, RunRequest, SandboxConfig,
    SandboxError, SandboxLimits, Termination,
};
pub(crate) use request::{io, nix_io};
pub(crate) use watch::{
    Supervised, Watch, Watched, drain, drain_while, poll_tags, set_nonblocking, watch_run,
};

use crate::cgroup::{CgroupDriver, TaskCgroup};
use crate::frame::write_frame;
use crate::launcher::mono_ns;
use crate::spec::{FileMeta, LaunchSpec, SandboxFile};
use crate::uids::{UidLease, UidPool};

/// Synthetic /etc files: the task sees only itself and root, never the
/// host's accounts.
pub(crate) fn etc_files(uid: u32, gid: u32, hostname: &str) -> Vec<SandboxFile> {
    let f = |path: &str, content: String| SandboxFile {
        path: path.into(),
        content: content.into_bytes(),
        executable: false,
    };
    vec![
        f(
            "passwd",
            format!(
                "root:x:0:0:root:/root:/bin/false\nsandbox:x:{uid}:{gid}:sandbox:/task:/bin/false\n"
            ),
        ),
        f("group", format!("root:x:0:\nsandbox:x:{gid}:\n")),
        f(
            "hosts",
            format!("127.0.0.1 localhost {hostname}\n::1 localhost\n"),
        ),
        f(
            "nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files\n".into(),
        ),
    ]
}

/// The sandbox: spawns one launcher per run.
#[derive(Debug)]
pub struct Sandbox {
    pub(crate) config: SandboxConfig,
    pub(crate) cgroups: Box<dyn CgroupDriver>,
    /// The node's one allocator of task uids (cold runs, pre-built
    /// sandboxes and fork servers alike).
    pub(crate) uids: UidPool,
}

/// Numbers task cgroups uniquely within this process (names carry the pid,
/// so they are unique on the host), whatever the number of `Sandbox`es.
static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh task cgroup name: `taskexec-<pid>-<n>` (the stale-cgroup sweep
/// relies on that shape).
pub(crate) fn cgroup_name() -> String {
    format!(
        "taskexec-{}-{}",
        std::process::id(),
        RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Sandbox {
    /// A sandbox using `cgroups` for limits.
    pub fn new(config: SandboxConfig, cgroups: Box<dyn CgroupDriver>) -> Self {
        Self {
            uids: UidPool::new(config.task_uids),
            config,
            cgroups,
        }
    }

    /// The cgroup driver in use.
    pub fn cgroups(&self) -> &dyn CgroupDriver {
        self.cgroups.as_ref()
    }

    /// Runs one task to its end and cleans up: afterwards no process, mount,
    /// cgroup or temp dir of the run remains.
    pub fn run(
        &self,
        req: &RunRequest,
        cancel: Option<&CancelToken>,
    ) -> Result<RunOutcome, SandboxError> {
        let t0 = Instant::now();
        let t0_mono = mono_ns();
        let mut phases: Vec<(&'static str, Duration)> = Vec::new();
        let (lease, user) = self.user_for(req)?;
        let cgroup = self.new_cgroup(&req.limits)?;
        phases.push(("cgroupCreate", t0.elapsed()));
        let result = self.run_in(req, user, cancel, cgroup.as_ref(), &mut phases, t0, t0_mono);
        finish_run(cgroup.as_ref(), result, phases, t0, Duration::ZERO, lease)
    }

    /// A new task cgroup (named by [`cgroup_name`]) with the limits of
    /// `limits`.
    pub(crate) fn new_cgroup(
        &self,
        limits: &SandboxLimits,
    ) -> Result<Box<dyn TaskCgroup>, SandboxError> {
        Ok(self
            .cgroups
            .create(&cgroup_name(), &limits.cgroup_limits())?)
    }

    /// The (uid, gid) `req` runs as: the one it names, else a uid of its
    /// own, leased until its cgroup is empty (see [`finish_run`]).
    pub(crate) fn user_for(
        &self,
        req: &RunRequest,
    ) -> Result<(Option<UidLease>, (u32, u32)), SandboxError> {
        if let Some(user) = req.user {
            return Ok((None, user));
        }
        let lease = self.uids.lease(1).ok_or_else(|| SandboxError::Setup {
            stage: "uids".into(),
            message: format!(
                "every task uid of {} is in use; widen the range (--task-uids)",
                self.config.task_uids
            ),
        })?;
        let uid = lease.first();
        Ok((Some(lease), (uid, uid)))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_in(
        &self,
        req: &RunRequest,
        user: (u32, u32),
        cancel: Option<&CancelToken>,
        cgroup: &dyn TaskCgroup,
        phases: &mut Vec<(&'static str, Duration)>,
        t0: Instant,
        t0_mono: u64,
    ) -> Result<RunOutcome, SandboxError> {
        let limits = &req.limits;
        let (mut spec, etc) = self.launch_spec(req, user)?;
        spec.self_join = cgroup.self_join_files();
        spec.task_join = cgroup.task_join_file();
        let prepared = self.prepare(&spec, &req.support_files, &etc)?;
        phases.push(("spawn", prepared.spawn_time));
        let deadline = prepared.t_spawn + limits.timeout;
        // Hand over the task right behind the base spec. The launcher moves
        // itself into its cgroup first thing where the driver allows it;
        // otherwise we move it, while it builds namespaces and mounts and
        // writes the task's files (a move by pid waits for an RCU grace
        // period when it is the first in a while).
        let sent = prepared.send_task(&spec, &req.work_files);
        if spec.self_join.is_empty() {
            let t_attach = Instant::now();
            #[allow(clippy::cast_possible_wrap, reason = "a pid is at most pid_max, 2^22")]
            let pid = prepared.pid() as i32;
            cgroup.attach_supervisor(pid)?;
            phases.push(("cgroupAttach", t_attach.elapsed()));
        }
        let attached_mono = mono_ns();
        let go = sent.and_then(|()| prepared.send_go());
        watch(
            Handed {
                prepared,
                go,
                deadline,
                attached_mono,
                cpu_base: Duration::ZERO,
                t0,
                t0_mono,
            },
            cgroup,
            limits,
            cancel,
            phases,
            &mut false,
        )
    }

    /// Spawns a launcher and sends it the base of `spec` (see
    /// [`LaunchSpec::base`]) with the contents of the support and /etc
    /// files: the launcher builds the sandbox from it, then waits for its
    /// task ([`Prepared::send_task`]).
    pub(crate) fn prepare(
        &self,
        spec: &LaunchSpec,
        support: &[SandboxFile],
        etc: &[SandboxFile],
    ) -> Result<Prepared, SandboxError> {
        let cloexec = OFlag::O_CLOEXEC;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(io("socketpair"))?;
        let (out_r, out_w) = nix::unistd::pipe2(cloexec).map_err(nix_io("pipe"))?;
        let (err_r, err_w) = nix::unistd::pipe2(cloexec).map_err(nix_io("pipe"))?;
        let t_spawn = Instant::now();
        let launcher = Launcher::spawn(
            &self.config.launcher.program,
            OwnedFd::from(theirs),
            out_w,
            err_w,
        )?;
        let spawn_time = t_spawn.elapsed();
        let spawned_mono = mono_ns();
        let blobs: Vec<&[u8]> = support
            .iter()
            .chain(etc)
            .map(|f| f.content.as_slice())
            .collect();
        // A launcher that died early closes the channel: its report says why.
        let sent = write_frame(&mut &ours, &spec.base(), &blobs);
        Ok(Prepared {
            launcher,
            channel: ours,
            out_r,
            err_r,
            t_spawn,
            spawn_time,
            spawned_mono,
            sent,
        })
    }

    /// The launcher's whole spec for `req`, and the synthetic /etc files it
    /// names (their contents travel with the base spec).
    pub(crate) fn launch_spec(
        &self,
        req: &RunRequest,
        (uid, gid): (u32, u32),
    ) -> Result<(LaunchSpec, Vec<SandboxFile>), SandboxError> {
        let limits = &req.limits;
        if uid == 0 || gid == 0 {
            return Err(SandboxError::Setup {
                stage: "spec".into(),
                message: "tasks never run as root".into(),
            });
        }
        let etc = etc_files(uid, gid, &self.config.hostname);
        let spec = LaunchSpec {
            hostname: self.config.hostname.clone(),
            uid,
            gid,
            argv: req.argv.clone(),
            env: req.env.clone(),
            ro_mounts: req.ro_mounts.clone(),
            work_files: metas(&req.work_files),
            support_files: metas(&req.support_files),
            etc_files: metas(&etc),
            work_dir: self.config.work_dir.clone(),
            support_dir: self.config.support_dir.clone(),
            disk_bytes: limits.disk_bytes,
            disk_inodes: limits.disk_inodes(),
            stdin_path: req.stdin_path.clone(),
            rlimits: limits.rlimits(),
            read_back: req.read_back.clone(),
            read_back_cap: limits.output_bytes,
            collect_dir: req.collect_dir.clone(),
            collect_cap: 64 << 20,
            share_network: false,
            fork_server: false,
            userns: Vec::new(),
            self_join: Vec::new(),
            task_join: None,
        };
        Ok((spec, etc))
    }
}

/// The end of every run: kills whatever is left in the cgroup, gives the
/// task's uid back (`lease`; lost if the cgroup could not be emptied),
/// reads its accounting (less `cpu_base`, the CPU time used before the task
/// was handed over) and removes it, then completes the outcome.
pub(crate) fn finish_run(
    cgroup: &dyn TaskCgroup,
    result: Result<RunOutcome, SandboxError>,
    mut phases: Vec<(&'static str, Duration)>,
    t0: Instant,
    cpu_base: Duration,
    lease: Option<UidLease>,
) -> Result<RunOutcome, SandboxError> {
    let t_clean = Instant::now();
    let kill = cgroup.kill_all();
    crate::uids::release(lease, &kill);
    let stats = cgroup.stats();
    let removed = cgroup.remove();
    phases.push(("cleanup", t_clean.elapsed()));
    let mut outcome = result?;
    kill?;
    removed?;
    outcome.stats = stats?;
    outcome.stats.cpu_time = outcome.stats.cpu_time.saturating_sub(cpu_base);
    outcome.wall_time = t0.elapsed();
    outcome.phases = phases;
    Ok(outcome)
}

pub(crate) fn metas(files: &[SandboxFile]) -> Vec<FileMeta> {
    files
        .iter()
        .map(|f| FileMeta {
            path: f.path.clone(),
            executable: f.executable,
        })
        .collect()
}

pub(crate) fn ns_delta(from: u64, to: u64) -> Duration {
    Duration::from_nanos(to.saturating_sub(from))
}

/// A small request for unit tests: `argv0` alone, tight limits.
#[cfg(test)]
pub(crate) fn test_request(argv0: &str) -> RunRequest {
    RunRequest {
        argv: vec![argv0.into()],
        env: Vec::new(),
        ro_mounts: Vec::new(),
        work_files: Vec::new(),
        support_files: Vec::new(),
        stdin_path: None,
        read_back: Vec::new(),
        collect_dir: None,
        limits: SandboxLimits {
            memory_bytes: 64 << 20,
            disk_bytes: 1 << 20,
            pids: 16,
            cpu_request_millis: 100,
            cpu_limit_millis: None,
            timeout: Duration::from_secs(1),
            cpu_time: None,
            output_bytes: 1024,
            nofile: 64,
        },
        user: None,
        fork_server: None,
        preload: Vec::new(),
    }
}
