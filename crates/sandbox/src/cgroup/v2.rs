//! cgroup v2: the unified hierarchy. The executor's parent cgroup must have
//! the memory, pids and cpu controllers enabled for its children; when the
//! parent still holds processes (the executor itself), the executor moves
//! itself into a leaf first, as the "no internal processes" rule requires.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    CgroupDriver, CgroupError, CgroupLimits, CgroupStats, CgroupVersion, TaskCgroup, io_err, keyed,
    kill_procs, read, read_u64, remove_dir, signal_procs, write,
};

const NEEDED: [&str; 3] = ["memory", "pids", "cpu"];
/// Leaf the executor moves itself into when its own cgroup must become a parent.
pub const EXECUTOR_LEAF: &str = "taskexec-executor";
const CPU_PERIOD_US: u64 = 100_000;

/// The v2 driver: task cgroups are created in `parent`.
#[derive(Debug, Clone)]
pub struct V2Driver {
    parent: PathBuf,
}

impl V2Driver {
    /// Prepares `mount`/`parent_rel` to hold task cgroups: checks the needed
    /// controllers are available there and enables them for its children,
    /// moving process `self_pid` into a leaf first if the parent holds it.
    pub fn new(mount: &Path, parent_rel: &str, self_pid: u32) -> Result<Self, CgroupError> {
        let parent = mount.join(parent_rel.trim_start_matches('/'));
        let available = read(&parent.join("cgroup.controllers"))?;
        let missing: Vec<&str> = NEEDED
            .iter()
            .copied()
            .filter(|c| !available.split_whitespace().any(|a| a == *c))
            .collect();
        if !missing.is_empty() {
            return Err(CgroupError::Unavailable {
                detail: format!(
                    "controllers {} not available in {} (have: {:?})",
                    missing.join(","),
                    parent.display(),
                    available.trim()
                ),
            });
        }
        let enabled = read(&parent.join("cgroup.subtree_control")).unwrap_or_default();
        if NEEDED
            .iter()
            .all(|c| enabled.split_whitespace().any(|e| e == *c))
        {
            return Ok(Self { parent });
        }
        let control = parent.join("cgroup.subtree_control");
        let enable = "+memory +pids +cpu";
        match fs::write(&control, enable) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // The parent holds processes ("no internal processes"): move
                // ourselves, and whoever shares the cgroup with us (a
                // systemd unit without delegation), into a leaf, as
                // systemd-managed services do, then enable the controllers.
                let leaf = parent.join(EXECUTOR_LEAF);
                match fs::create_dir(&leaf) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err("create", &leaf)(e)),
                }
                write(&leaf.join("cgroup.procs"), &self_pid.to_string())?;
                let mut last = None;
                // Processes of the cgroup may fork while we move them: a
                // few rounds until it is empty.
                for _ in 0..10 {
                    move_procs(&parent.join("cgroup.procs"), &leaf.join("cgroup.procs"))?;
                    match fs::write(&control, enable) {
                        Ok(()) => {
                            last = None;
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                if let Some(e) = last {
                    return Err(CgroupError::Unavailable {
                        detail: format!(
                            "cannot enable controllers in {}: {e}; processes keep appearing in \
                             the executor's cgroup: run it in a delegated cgroup of its own \
                             (systemd Delegate=yes) or pass a parent cgroup",
                            parent.display()
                        ),
                    });
                }
            }
            Err(e) => return Err(io_err("write", &control)(e)),
        }
        Ok(Self { parent })
    }

    /// The directory task cgroups are created in.
    pub fn parent(&self) -> &Path {
        &self.parent
    }
}

/// Moves every process listed in `from` (a `cgroup.procs` file) into the
/// cgroup of `to`; processes that exit meanwhile are skipped.
fn move_procs(from: &Path, to: &Path) -> Result<(), CgroupError> {
    for pid in read(from)?.lines().filter(|l| !l.trim().is_empty()) {
        match fs::write(to, pid.trim()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(io_err("write", to)(e)),
        }
    }
    Ok(())
}

impl CgroupDriver for V2Driver {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn parents(&self) -> Vec<PathBuf> {
        vec![self.parent.clone()]
    }

    fn create(
        &self,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<Box<dyn TaskCgroup>, CgroupError> {
        let dir = self.parent.join(name);
        let cg = V2Cgroup {
            supervisor: dir.join(SUPERVISOR_LEAF),
            task: dir.join(TASK_LEAF),
            dir,
        };
        fs::create_dir(&cg.dir).map_err(io_err("create", &cg.dir))?;
        let made = cg.make(limits);
        if made.is_err() {
            let _ = cg.remove();
        }
        made.map(|()| Box::new(cg) as Box<dyn TaskCgroup>)
    }
}

/// The leaf of a task cgroup that holds the sandbox's supervisor (the
/// launcher and the sandbox's init).
pub const SUPERVISOR_LEAF: &str = "supervisor";
/// The leaf of a task cgroup that holds the task's processes.
pub const TASK_LEAF: &str = "task";
/// Processes of the supervisor's leaf beyond the task's own count: the
/// launcher, the init, and the task's first process until it moves to its
/// leaf.
const SUPERVISOR_PIDS: u64 = 4;

/// One task's v2 cgroup: a parent with two leaves, `supervisor` and `task`.
///
/// The parent holds the whole sandbox's limits (memory, with the supervisor's
/// few pages and the work files it writes; pids; CPU) and its accounting.
/// The task's leaf holds the task's own memory and pids limits and
/// `memory.oom.group`: an OOM kill takes every process of the task and none
/// of the supervisor, whose processes also have `oom_score_adj` -1000, so
/// the sandbox's init outlives the task and reports its end like on v1.
#[derive(Debug)]
struct V2Cgroup {
    dir: PathBuf,
    supervisor: PathBuf,
    task: PathBuf,
}

impl V2Cgroup {
    fn make(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        write(
            &self.dir.join("cgroup.subtree_control"),
            "+memory +pids +cpu",
        )?;
        for leaf in [&self.supervisor, &self.task] {
            fs::create_dir(leaf).map_err(io_err("create", leaf))?;
        }
        self.apply(limits)
    }

    fn apply(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let memory = limits.memory_bytes.to_string();
        for dir in [&self.dir, &self.task] {
            write(&dir.join("memory.max"), &memory)?;
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
        }
        // One OOM kill takes the whole task down, not a random process of
        // it, and nothing of the supervisor.
        let group = self.task.join("memory.oom.group");
        if group.exists() {
            write(&group, "1")?;
        }
        write(&self.task.join("pids.max"), &limits.pids.to_string())?;
        write(
            &self.dir.join("pids.max"),
            &(u64::from(limits.pids) + SUPERVISOR_PIDS).to_string(),
        )?;
        let weight = (u64::from(limits.cpu_request_millis) / 10).clamp(1, 10_000);
        write(&self.dir.join("cpu.weight"), &weight.to_string())?;
        if let Some(limit) = limits.cpu_limit_millis {
            let quota = (u64::from(limit) * CPU_PERIOD_US / 1000).max(1000);
            write(
                &self.dir.join("cpu.max"),
                &format!("{quota} {CPU_PERIOD_US}"),
            )?;
        } else if self.dir.join("cpu.max").exists() {
            write(&self.dir.join("cpu.max"), &format!("max {CPU_PERIOD_US}"))?;
        }
        Ok(())
    }

    fn leaves(&self) -> [&PathBuf; 2] {
        [&self.task, &self.supervisor]
    }
}

impl TaskCgroup for V2Cgroup {
    fn set_limits(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        self.apply(limits)
    }

    fn attach(&self, pid: i32) -> Result<(), CgroupError> {
        write(&self.task.join("cgroup.procs"), &pid.to_string())
    }

    fn attach_supervisor(&self, pid: i32) -> Result<(), CgroupError> {
        write(&self.supervisor.join("cgroup.procs"), &pid.to_string())
    }

    fn task_join_file(&self) -> Option<PathBuf> {
        Some(self.task.join("cgroup.procs"))
    }

    fn cpu_time(&self) -> Result<Duration, CgroupError> {
        keyed(&self.dir.join("cpu.stat"), "usage_usec").map(Duration::from_micros)
    }

    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        // memory.events counts the events of the whole subtree. pids.events
        // counts a refused fork in the forking process's cgroup (on kernels
        // before 6.13; from there on, hierarchically): the leaves' sum counts
        // each once either way.
        let events = self.dir.join("memory.events");
        let mut pids_max_hits = 0;
        for leaf in self.leaves() {
            pids_max_hits += keyed(&leaf.join("pids.events"), "max")?;
        }
        Ok(CgroupStats {
            cpu_time: self.cpu_time()?,
            peak_memory_bytes: read_u64(&self.dir.join("memory.peak")).ok(),
            oom_kills: keyed(&events, "oom_kill")?,
            pids_max_hits,
            memory_max_hits: keyed(&events, "max")?,
        })
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        let kill = self.dir.join("cgroup.kill");
        if kill.exists() {
            write(&kill, "1")?;
        }
        for leaf in self.leaves() {
            kill_procs(&leaf.join("cgroup.procs"))?;
        }
        Ok(())
    }

    fn signal_all(&self) -> Result<(), CgroupError> {
        let kill = self.dir.join("cgroup.kill");
        if kill.exists() {
            return write(&kill, "1");
        }
        for leaf in self.leaves() {
            signal_procs(&leaf.join("cgroup.procs"))?;
        }
        Ok(())
    }

    fn remove(&self) -> Result<(), CgroupError> {
        for leaf in self.leaves() {
            remove_dir(leaf)?;
        }
        remove_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_tree(controllers: &str, subtree: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tmp");
        let parent = root.path().join("system.slice/taskexec.service");
        fs::create_dir_all(&parent).expect("mkdir");
        fs::write(parent.join("cgroup.controllers"), controllers).expect("w");
        fs::write(parent.join("cgroup.subtree_control"), subtree).expect("w");
        root
    }

    fn limits(cpu_limit: Option<u32>) -> CgroupLimits {
        CgroupLimits {
            memory_bytes: 128 << 20,
            pids: 64,
            cpu_request_millis: 500,
            cpu_limit_millis: cpu_limit,
        }
    }

    #[test]
    fn enables_controllers_in_the_parent() {
        let root = fake_tree("cpuset cpu io memory pids\n", "");
        let d = V2Driver::new(root.path(), "/system.slice/taskexec.service", 1).expect("driver");
        let control = fs::read_to_string(d.parent().join("cgroup.subtree_control")).expect("read");
        assert_eq!(control, "+memory +pids +cpu");
    }

    #[test]
    fn refuses_a_parent_without_the_controllers() {
        let root = fake_tree("cpu io\n", "");
        let err =
            V2Driver::new(root.path(), "/system.slice/taskexec.service", 1).expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("memory,pids"), "{msg}");
    }

    #[test]
    fn creates_a_task_cgroup_with_a_supervisor_leaf_and_a_task_leaf() {
        let root = fake_tree("cpu memory pids\n", "cpu memory pids\n");
        let d = V2Driver::new(root.path(), "system.slice/taskexec.service", 1).expect("driver");
        let dir = d.parent().join("task-1");
        // Without the kernel, create() makes the directories and writes files.
        let cg = d.create("task-1", &limits(Some(1500))).expect("create");
        let f = |n: &str| fs::read_to_string(dir.join(n)).expect("read");
        assert_eq!(f("cgroup.subtree_control"), "+memory +pids +cpu");
        assert_eq!(f("memory.max"), (128u64 << 20).to_string());
        assert_eq!(f("task/memory.max"), (128u64 << 20).to_string());
        assert_eq!(f("task/pids.max"), "64");
        assert_eq!(f("pids.max"), (64 + SUPERVISOR_PIDS).to_string());
        assert_eq!(f("cpu.weight"), "50");
        assert_eq!(f("cpu.max"), "150000 100000");
        cg.attach(42).expect("attach");
        assert_eq!(f("task/cgroup.procs"), "42");
        cg.attach_supervisor(7).expect("attach the supervisor");
        assert_eq!(f("supervisor/cgroup.procs"), "7");
        assert_eq!(cg.task_join_file(), Some(dir.join("task/cgroup.procs")));
    }

    #[test]
    fn no_cpu_quota_unless_a_limit_is_asked_for() {
        let root = fake_tree("cpu memory pids\n", "cpu memory pids\n");
        let d = V2Driver::new(root.path(), "system.slice/taskexec.service", 1).expect("driver");
        d.create("task-2", &limits(None)).expect("create");
        assert!(!d.parent().join("task-2/cpu.max").exists());
    }

    #[test]
    fn stats_come_from_v2_files() {
        let root = fake_tree("cpu memory pids\n", "cpu memory pids\n");
        let d = V2Driver::new(root.path(), "system.slice/taskexec.service", 1).expect("driver");
        let cg = d.create("task-3", &limits(None)).expect("create");
        let dir = d.parent().join("task-3");
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
        )
        .expect("w");
        fs::write(dir.join("memory.peak"), "1048576\n").expect("w");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        )
        .expect("w");
        fs::write(dir.join("task/pids.events"), "max 2\n").expect("w");
        fs::write(dir.join("supervisor/pids.events"), "max 0\n").expect("w");
        let s = cg.stats().expect("stats");
        assert_eq!(s.cpu_time, Duration::from_micros(2500));
        assert_eq!(s.peak_memory_bytes, Some(1 << 20));
        assert_eq!((s.oom_kills, s.pids_max_hits, s.memory_max_hits), (1, 2, 4));
    }
}
